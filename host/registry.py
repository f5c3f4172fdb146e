"""Every ``--device``: the names, what each one is, and the one function that opens it.

A named device runs the configuration the host gives it:

* ``sim`` — the golden model in-process (:class:`~hel_fpga.host.device.GoldenDevice`):
  the integer arithmetic, no link;
* ``model`` — the protocol model in-process (:class:`~hel_fpga.host.link.SerialDevice`
  over :class:`hel_fpga.sim.protocol_model.ModelPort`): the real byte protocol, no port;
* ``sim-board`` — the Verilator-simulated board (a ``SerialDevice`` over its pty),
  built and cached per configuration; its clock counter is ``Device.cycles()``.

Anything else is a board with a configuration of its own, reported through
IDENT: a serial device path, optionally ending in ``@BAUD`` (default:
:data:`hel_fpga.boards.table.DEFAULT_BAUD`, 3 Mbaud, the rate every board in the
table runs), or a pyserial URL (``scheme://…``).

Every command that takes ``--device`` builds its help from :func:`device_help`
and opens the device with :func:`open_device`, so a new kind of device is added
here once.
"""

from __future__ import annotations

import sys

from hel_fpga.boards.table import DEFAULT_BAUD
from hel_fpga.host.device import Device, DeviceError, GoldenDevice
from hel_fpga.host.link import SerialDevice
from hel_fpga.spec.formats import HelConfig

__all__ = ["DEVICES", "DEVICE_NAMES", "DEFAULT_BAUD", "device_help", "takes_config", "open_device"]

#: The named devices, in the order help texts list them, and what each one is.
DEVICES = {
    "sim": "golden model in-process",
    "model": "protocol model in-process",
    "sim-board": "Verilator-simulated board",
}
DEVICE_NAMES = tuple(DEVICES)
#: What a ``--device`` may be besides a name.
OTHER_DEVICES = "a serial path[@BAUD] or a pyserial URL"


def device_help(default: str | None = None, *, exclude: tuple[str, ...] = ()) -> str:
    """The ``--device`` help text: every name with what it is, then paths and URLs."""
    names = [f"{name} ({what})" for name, what in DEVICES.items() if name not in exclude]
    text = ", ".join(names + [OTHER_DEVICES])
    return text + (f" (default: {default})" if default else "")


def takes_config(spec: str) -> bool:
    """Whether the device ``spec`` runs the host's configuration (every named device
    does); a board has its own and reports it through IDENT."""
    return spec in DEVICE_NAMES


def open_device(spec: str, cfg: HelConfig | None = None, *, timeout: float = 2.0,
                retries: int = 4) -> Device:
    """Open the device ``spec`` (a name, a serial path[@BAUD] or a pyserial URL).

    ``cfg`` is the configuration to run on a named device (required for ``sim``
    and ``model``; ``sim-board`` defaults to
    :data:`hel_fpga.sim.board.SIM_CONFIG`) and the one a board must report
    (checked against its IDENT, except ``lanes``). ``timeout`` and ``retries``
    apply to serial devices (:class:`~hel_fpga.host.link.SerialDevice`).
    Raises :class:`~hel_fpga.host.device.DeviceError` with a one-line reason.
    """
    if spec in ("sim", "model") and cfg is None:
        raise DeviceError(f"--device {spec} needs a configuration")
    if spec == "sim":
        return GoldenDevice(cfg)
    if spec == "model":
        from hel_fpga.sim.protocol_model import ModelPort, ProtocolModel  # noqa: PLC0415
        return SerialDevice(ModelPort(ProtocolModel(cfg)), timeout=timeout, retries=retries,
                            expect=cfg)
    import serial  # noqa: PLC0415 (pyserial only for a port)

    board = None
    path = spec
    if spec == "sim-board":
        from hel_fpga.sim import board as sim_board  # noqa: PLC0415 (Amaranth only when simulated)

        def progress(line):  # the first Verilator build of a configuration takes ~30 s
            print(line, file=sys.stderr, flush=True)
        try:
            # A simulated board can take any configuration: build the one expected,
            # with no more MAC lanes than the network has rows.
            build_cfg = None if cfg is None else cfg.replace(
                lanes=min(sim_board.SIM_CONFIG.lanes, max(cfg.n, cfg.m)))
            board = sim_board.start(build_cfg, progress=progress)
        except sim_board.SimBoardError as e:
            raise DeviceError(f"the simulated board did not start: {e}") from None
        path = board.path
    baud = DEFAULT_BAUD
    try:
        if "://" in path:
            port = serial.serial_for_url(path, baudrate=baud, timeout=0.05)
        else:
            path, _, b = path.partition("@")
            if b:
                try:
                    baud = int(b)
                except ValueError:
                    raise DeviceError(f"bad baud rate {b!r} in device {spec!r}") from None
            port = serial.Serial(path, baudrate=baud, timeout=0.05)
    except (serial.SerialException, ValueError, OSError) as e:
        if board is not None:
            board.stop()
        hint = "" if "/" in spec or "://" in spec else \
            f" (a device is {', '.join(DEVICE_NAMES)}, {OTHER_DEVICES})"
        raise DeviceError(f"cannot open device {spec!r}: {e}{hint}") from None
    try:
        return SerialDevice(port, timeout=timeout, retries=retries, expect=cfg, board=board)
    except BaseException:
        port.close()
        if board is not None:
            board.stop()
        raise
