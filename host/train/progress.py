"""Per-epoch progress bars (tqdm on stderr), silent with ``--json``."""

from __future__ import annotations

import sys

__all__ = ["EpochProgress"]


class EpochProgress:
    """One tqdm bar per epoch counting training samples; shows the running loss,
    accuracy (classification) and samples/s, then the test figures at the end."""

    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.bar = None

    def start(self, epoch: int, epochs: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm
        self.bar = tqdm(total=total, desc=f"epoch {epoch}/{epochs}", unit="sample", leave=True,
                        file=self.stream, dynamic_ncols=True, smoothing=0.1)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def show(self, **values) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                                  for k, v in values.items() if v is not None}, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)
