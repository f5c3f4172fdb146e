"""Training checkpoints: written atomically, read back exactly.

One file, ``DIR/checkpoint.npz``, written after every epoch: the float64 master
weights (``param_<name>``), Adam's moments (``m_<name>``, ``v_<name>``) and a JSON
document (``meta``) with the completed epoch count, Adam's step count, the
batch-order generator's exact state, the run's settings, the core
configuration, the per-epoch history and the wall time so far.

Atomicity: the file is written to a temporary name in the same directory,
flushed to disk, then moved over the old one with :func:`os.replace`, so a run
killed at any instant leaves either the previous checkpoint or the new one,
never a torn file. A killed run therefore loses at most the epoch in progress.

On-chip runs (``hel train --on-chip``) keep their optimiser in the device: their
checkpoint has no Adam arrays but the device's training state, integer arrays
``onchip_master_<name>`` and ``onchip_moment_<name>`` (master units), and a
``meta["onchip"]`` document (the TrainConfig and the epoch the state is at);
``param_<name>`` then holds the float values of the re-quantised parameters.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hel_fpga.host.errors import UsageError
from hel_fpga.spec.names import PARAM_NAMES

__all__ = ["Checkpoint", "CheckpointError", "save_checkpoint", "load_checkpoint",
           "CHECKPOINT_NAME", "atomic_write_text", "resumed_settings"]

CHECKPOINT_NAME = "checkpoint.npz"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A missing, unreadable or incompatible checkpoint."""


@dataclass
class Checkpoint:
    params: dict[str, np.ndarray]
    adam: dict[str, np.ndarray]
    adam_t: int
    epoch: int
    rng_state: dict
    settings: dict
    config: dict
    history: list = field(default_factory=list)
    wall_seconds: float = 0.0
    train_seconds: float = 0.0
    train_samples: int = 0
    #: On-chip runs only: the device's training state (integer arrays by name, without
    #: the ``onchip_`` prefix) and what describes it (JSON); None for host-driven runs.
    onchip_state: dict[str, np.ndarray] | None = None
    onchip: dict | None = None


def resumed_settings(ck_settings: dict, explicit: dict) -> dict:
    """The settings a resumed run continues with: the checkpoint's, of which only
    ``epochs`` may be changed (extended) by an explicit option; any other
    explicit setting that differs is a :class:`UsageError` naming each. The
    device is not a setting (every device computes the same integers)."""
    s = dict(ck_settings)
    s.pop("device", None)
    conflicts = [f"--{k.replace('_', '-')} {v} (checkpoint: {s.get(k)})" for k, v in explicit.items()
                 if k != "epochs" and v != s.get(k)]
    if conflicts:
        raise UsageError("--resume continues the checkpoint's run; these options differ from it: "
                         + ", ".join(conflicts))
    if "epochs" in explicit:
        s["epochs"] = explicit["epochs"]
    return s


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(directory, ck: Checkpoint) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / CHECKPOINT_NAME
    meta = {"format": FORMAT_VERSION, "epoch": ck.epoch, "adam_t": ck.adam_t, "rng_state": ck.rng_state,
            "settings": ck.settings, "config": ck.config, "history": ck.history,
            "wall_seconds": ck.wall_seconds, "train_seconds": ck.train_seconds,
            "train_samples": ck.train_samples}
    if ck.onchip is not None:
        meta["onchip"] = ck.onchip
    arrays = {f"param_{k}": np.asarray(ck.params[k], dtype=np.float64) for k in PARAM_NAMES}
    arrays.update({k: np.asarray(v, dtype=np.float64) for k, v in ck.adam.items()})
    for k, v in (ck.onchip_state or {}).items():
        arrays[f"onchip_{k}"] = np.asarray(v, dtype=np.int64)
    arrays["meta"] = np.array(json.dumps(meta))
    tmp = d / f".{CHECKPOINT_NAME}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(directory) -> Checkpoint:
    path = Path(directory) / CHECKPOINT_NAME
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
        meta = json.loads(str(data["meta"]))
        if meta.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: checkpoint format {meta.get('format')} is not supported")
        params = {k: data[f"param_{k}"] for k in PARAM_NAMES}
        onchip = meta.get("onchip")
        if onchip is None:
            adam = {f"{s}_{k}": data[f"{s}_{k}"] for s in ("m", "v") for k in PARAM_NAMES}
            onchip_state = None
        else:
            adam = {}
            onchip_state = {k[len("onchip_"):]: data[k].astype(np.int64)
                            for k in data if k.startswith("onchip_")}
            missing = [f"onchip_{p}_{k}" for p in ("master", "moment") for k in PARAM_NAMES
                       if f"{p}_{k}" not in onchip_state]
            if missing:
                raise CheckpointError(f"{path}: on-chip checkpoint without {', '.join(missing)}")
        return Checkpoint(params=params, adam=adam, adam_t=int(meta["adam_t"]), epoch=int(meta["epoch"]),
                          rng_state=meta["rng_state"], settings=meta["settings"], config=meta["config"],
                          history=meta["history"], wall_seconds=float(meta["wall_seconds"]),
                          train_seconds=float(meta.get("train_seconds", 0.0)),
                          train_samples=int(meta.get("train_samples", 0)),
                          onchip_state=onchip_state, onchip=onchip)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint to resume in {directory} ({CHECKPOINT_NAME} not found)") from None
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e})") from None
