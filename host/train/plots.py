"""Training plots (matplotlib, Agg backend, PNG files in the run directory).

* ``curves.png`` — train/test loss per epoch (and accuracy for classification);
* ``echo.png`` — forward trajectory of the output oscillators for one test
  sample against the echo run backwards in time: the un-nudged echo retraces
  the forward pass (bit for bit on the integer model), the ±ε echoes diverge
  slightly, and the lower panel shows those differences;
* ``gradients.png`` — agreement of the HEL gradients with BPTT, cosine per
  parameter array on one batch at the final parameters.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_curves", "plot_echo", "plot_gradients"]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(path: Path, history: list[dict], title: str, classification: bool, loss_name: str) -> None:
    plt = _plt()
    ep = [h["epoch"] for h in history]
    ncols = 2 if classification else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 3.6), squeeze=False)
    ax = axes[0, 0]
    tr = [(e, h["train_loss"]) for e, h in zip(ep, history) if h.get("train_loss") is not None]
    te = [(e, h["test_loss"]) for e, h in zip(ep, history) if h.get("test_loss") is not None]
    if tr:
        ax.plot(*zip(*tr), "o-", label="train (running mean)")
    if te:
        ax.plot(*zip(*te), "s-", label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel(loss_name)
    if not classification:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    if classification:
        ax = axes[0, 1]
        tr = [(e, h["train_accuracy"]) for e, h in zip(ep, history) if h.get("train_accuracy") is not None]
        te = [(e, h["test_accuracy"]) for e, h in zip(ep, history) if h.get("test_accuracy") is not None]
        if tr:
            ax.plot(*zip(*tr), "o-", label="train (running)")
        if te:
            ax.plot(*zip(*te), "s-", label="test")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_echo(path: Path, time: np.ndarray, fwd: np.ndarray, retrace: np.ndarray, plus: np.ndarray,
              minus: np.ndarray, eps: float, title: str) -> None:
    """All trajectories are (T+1, O) position records indexed by forward time."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(7.5, 5.4), sharex=True,
                                 gridspec_kw={"height_ratios": [2, 1]})
    for j in range(fwd.shape[1]):
        a1.plot(time, fwd[:, j], "k-", lw=2.4, alpha=0.35, label="forward" if not j else None)
        a1.plot(time, retrace[:, j], "C0--", lw=1.2, label="echo, no nudge (time-reversed)" if not j else None)
        a1.plot(time, plus[:, j], "C3:", lw=1.0, label=f"echo +ε (ε = {eps:g})" if not j else None)
        a1.plot(time, minus[:, j], "C2:", lw=1.0, label="echo −ε" if not j else None)
    a1.set_ylabel("output position")
    a1.legend(fontsize=8, loc="best")
    a1.grid(alpha=0.3)
    a2.plot(time, (retrace - fwd)[:, 0], "C0-", label="no nudge − forward")
    a2.plot(time, (plus - fwd)[:, 0], "C3-", label="+ε − forward")
    a2.plot(time, (minus - fwd)[:, 0], "C2-", label="−ε − forward")
    a2.set_xlabel("forward time (echo runs right to left)")
    a2.set_ylabel("difference (output 0)")
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gradients(path: Path, rows: dict[str, dict[str, float]], title: str) -> None:
    """``rows``: method → {param: cosine vs BPTT}."""
    plt = _plt()
    methods = list(rows)
    params = list(next(iter(rows.values())))
    x = np.arange(len(params))
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    lo = 1.0
    for i, m in enumerate(methods):
        vals = [rows[m][p] for p in params]
        lo = min(lo, min(vals))
        bars = ax.bar(x + (i - (len(methods) - 1) / 2) * width, vals, width, label=m)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v - 0.0003, f"{v:.5f}", ha="center", va="top",
                    fontsize=7, rotation=90, color="white")
    ax.set_xticks(x, params)
    ax.set_ylabel("cosine with BPTT gradient")
    ax.set_ylim(min(0.99, lo - 0.002), 1.0015)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
