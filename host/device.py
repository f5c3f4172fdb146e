"""The device API: one interface for every place a HEL core can live.

A :class:`Device` offers the core's operations with integer arguments in the
formats of :mod:`hel_fpga.spec.formats`. Implementations:

* :class:`GoldenDevice` — the integer golden model in-process (``--device sim``);
  the fastest way to run the exact integer arithmetic of the hardware.
* ``hel_fpga.host.link.SerialDevice`` — the command protocol over a serial port (a real
  board, the Verilator-simulated board, the protocol model, or any pyserial URL).

:func:`hel_fpga.host.registry.open_device` opens either from a ``--device``
string. Everything above (``hel compare``, ``hel train``, ``hel selftest``) is
written against :class:`Device` only, so the same host code runs on every device.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

from hel_fpga.spec.formats import HelConfig
from hel_fpga.sim.golden import GoldenCore

__all__ = ["Device", "DeviceError", "GoldenDevice", "Ident", "Status"]


class DeviceError(RuntimeError):
    """A device failed or refused an operation (message says which and why)."""


@dataclass(frozen=True)
class Ident:
    """What a device reports about itself (the IDENT reply)."""

    protocol_version: int
    config: HelConfig
    clock_hz: int = 0
    baud: int = 0
    name: str = ""


@dataclass(frozen=True)
class Status:
    state_overflow: bool
    acc_overflow: bool


class Device(abc.ABC):
    """Operations of one HEL core (see hel_fpga.sim.golden.GoldenCore for their semantics)."""

    @property
    @abc.abstractmethod
    def config(self) -> HelConfig: ...

    @abc.abstractmethod
    def ident(self) -> Ident: ...

    @abc.abstractmethod
    def write_params(self, params: dict[str, np.ndarray]) -> None: ...

    @abc.abstractmethod
    def read_params(self) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def load(self, u: np.ndarray) -> None: ...

    @abc.abstractmethod
    def forward(self, estimator: str = "centred") -> np.ndarray: ...

    @abc.abstractmethod
    def echo(self, nudges: np.ndarray) -> None: ...

    @abc.abstractmethod
    def read_accumulators(self) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def clear_accumulators(self) -> None: ...

    @abc.abstractmethod
    def read_state(self, bank: str = "fwd") -> tuple[np.ndarray, np.ndarray]: ...

    @abc.abstractmethod
    def status(self) -> Status: ...

    @abc.abstractmethod
    def clear_flags(self) -> None: ...

    @abc.abstractmethod
    def selftest(self, steps: int, seed: int = 1) -> bool: ...

    def cycles(self) -> int | None:
        """Clock cycles the device has run since it started, read now; None unless the
        device is simulated (a real board has no counter the host can read)."""
        return None

    def close(self) -> None:
        """Release the device (close ports, stop owned processes)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class GoldenDevice(Device):
    """The golden model in-process: the integer arithmetic, no link."""

    PROTOCOL_VERSION = 0  # not a wire device

    def __init__(self, cfg: HelConfig):
        self.core = GoldenCore(cfg)

    @property
    def config(self) -> HelConfig:
        return self.core.cfg

    def ident(self) -> Ident:
        return Ident(self.PROTOCOL_VERSION, self.core.cfg, name="golden model (in-process)")

    def write_params(self, params):
        self.core.write_params(**params)

    def read_params(self):
        return self.core.read_params()

    def load(self, u):
        self.core.load(u)

    def forward(self, estimator="centred"):
        return self.core.forward(estimator)

    def echo(self, nudges):
        self.core.echo(nudges)

    def read_accumulators(self):
        return self.core.read_accumulators()

    def clear_accumulators(self):
        self.core.clear_accumulators()

    def read_state(self, bank="fwd"):
        b = self.core.read_state(bank)
        return b.q, b.w

    def status(self):
        return Status(self.core.state_overflow, self.core.acc_overflow)

    def clear_flags(self):
        self.core.clear_flags()

    def selftest(self, steps, seed=1):
        return self.core.selftest(steps, seed)
