"""The board table: every fact about a supported board, defined once.

``hel build``, ``hel program``, the tests and ``docs/boards.md`` all read
:data:`BOARDS`; nothing else in the project names a board's platform, device,
clock, core configuration or programmer.

Adding a board is one :class:`Board` entry. The ``config`` is the core that
fits the device: N = M and the MAC lanes P are sized to the DSP blocks, the
operand width follows the DSP family (16 bits for iCE40's SB_MAC16, 18 for
ECP5's MULT18X18D, see ``hel_fpga.spec.formats``), and ``t_max`` to the block RAM left
after the parameter, accumulator and link buffers.

Every board runs its UART at the same :data:`DEFAULT_BAUD`, so the host can
open any board's serial port at one rate and read the clock and the
configuration from IDENT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from hel_fpga.spec.formats import ECP5_OPERAND, ICE40_OPERAND, HelConfig

__all__ = [
    "Board", "ClockPlan", "ResourceKind", "Programmer", "BOARDS", "DEFAULT_BAUD",
    "UnknownBoard", "get_board",
]

#: The rate the host opens a serial path at when no ``@BAUD`` is given: every
#: board's ``baud`` (each entry says why; ``tests/test_boards.py`` checks they
#: agree), so IDENT answers on any board's port at once. 3 Mbaud = 300 000 bytes/s:
#: a 1 KiB frame takes ~3.4 ms.
DEFAULT_BAUD = 3_000_000


class UnknownBoard(KeyError):
    """A board name that is not in :data:`BOARDS`."""

    def __str__(self):
        return self.args[0]


@dataclass(frozen=True)
class ResourceKind:
    """One resource kind of the report's ``utilization``.

    ``cell`` is the nextpnr cell type counted for it (the key in nextpnr's
    ``--report`` JSON) and ``available`` the device's total, as nextpnr counts
    it (the tests check the two agree on a real build).
    """

    cell: str
    available: int
    description: str


@dataclass(frozen=True)
class ClockPlan:
    """Oscillator resource and frequency, and the PLL primitive that makes ``clk_hz``."""

    resource: str
    osc_hz: int
    pll: str | None   # "SB_PLL40_PAD", "EHXPLLL" or None (oscillator = design clock)


@dataclass(frozen=True)
class Programmer:
    """How the board is programmed.

    ``ofl_board`` is openFPGALoader's ``-b`` name. ``ofl_sram``/``ofl_flash``
    are the extra arguments for a volatile (SRAM) load and a flash write,
    ``None`` when the board cannot do that mode with openFPGALoader.
    ``usual`` is the board's traditional programmer, used when openFPGALoader
    is not installed: ``{bitstream}`` stands for the file.
    """

    ofl_board: str
    ofl_sram: tuple[str, ...] | None
    ofl_flash: tuple[str, ...] | None
    default_mode: str               # "sram" or "flash"
    usual: tuple[str, ...] | None = None
    note: str = ""


@dataclass(frozen=True)
class Board:
    """One supported board. Field by field:

    name:       the ``--board`` name.
    title:      human name.
    platform:   the amaranth-boards platform class (instantiated per build).
    family:     ``"ice40"`` or ``"ecp5"``: synthesis options and report parsing.
    device:     the FPGA part as the report states it (device-package).
    resources:  report kind → :class:`ResourceKind` (``utilization`` keys).
    uart:       the UART resource name and number the top level requests.
    clock:      oscillator and PLL (:class:`ClockPlan`).
    clk_hz:     the design (``sync``) clock; the build's timing target.
    baud:       the UART bit rate.
    config:     the HEL core configuration that fits this board.
    bitstream:  the bitstream file name written to the build directory.
    programmer: how ``hel program`` loads it (:class:`Programmer`).
    synth_opts: extra ``synth_<family>`` options (``-dsp`` maps multipliers to
                SB_MAC16 on iCE40; ECP5 maps MULT18X18D by default).
    """

    name: str
    title: str
    platform: Callable
    family: str
    device: str
    resources: Mapping[str, ResourceKind]
    uart: tuple[str, int]
    clock: ClockPlan
    clk_hz: int
    baud: int
    config: HelConfig
    bitstream: str
    programmer: Programmer
    synth_opts: tuple[str, ...] = ()
    nextpnr_opts: tuple[str, ...] = field(default=())

    @property
    def target_mhz(self) -> float:
        return self.clk_hz / 1e6

    def make_platform(self):
        return self.platform()

    def summary(self) -> dict:
        """The board's facts as plain JSON-able data (``hel build --list``, docs)."""
        return {
            "board": self.name, "title": self.title, "family": self.family,
            "device": self.device, "clk_hz": self.clk_hz, "osc_hz": self.clock.osc_hz,
            "pll": self.clock.pll, "baud": self.baud, "bitstream": self.bitstream,
            "uart": list(self.uart),
            "available": {k: r.available for k, r in self.resources.items()},
            "config": self.config.to_dict(),
            "programmer": {"openFPGALoader": ["-b", self.programmer.ofl_board],
                           "default_mode": self.programmer.default_mode},
        }


def _icebreaker_platform():
    from amaranth_boards.icebreaker import ICEBreakerPlatform
    return ICEBreakerPlatform()


def _ulx3s_platform(size: str):
    def make():
        from amaranth_boards import ulx3s
        return getattr(ulx3s, f"ULX3S_{size}_Platform")()
    make.__qualname__ = make.__name__ = f"ULX3S_{size}_Platform"
    return make


_ICE40_UP5K = {
    "LC":    ResourceKind("ICESTORM_LC", 5280, "logic cells (LUT4 + DFF)"),
    "DSP":   ResourceKind("ICESTORM_DSP", 8, "SB_MAC16 16×16 multiply-accumulate blocks"),
    "EBR":   ResourceKind("ICESTORM_RAM", 30, "4 kbit block RAMs"),
    "SPRAM": ResourceKind("ICESTORM_SPRAM", 4, "256 kbit single-port RAMs"),
    "PLL":   ResourceKind("ICESTORM_PLL", 1, "SB_PLL40"),
    "IO":    ResourceKind("SB_IO", 39, "I/O cells"),
}


def _ecp5(luts: int, mults: int, ebr: int, plls: int, ios: int) -> dict[str, ResourceKind]:
    return {
        "LUT4":   ResourceKind("TRELLIS_COMB", luts, "4-input LUTs"),
        "FF":     ResourceKind("TRELLIS_FF", luts, "flip-flops"),
        "MULT18": ResourceKind("MULT18X18D", mults, "18×18 multipliers"),
        "EBR":    ResourceKind("DP16KD", ebr, "18 kbit block RAMs"),
        "PLL":    ResourceKind("EHXPLLL", plls, "PLLs"),
        "IO":     ResourceKind("TRELLIS_IO", ios, "I/O cells"),
    }


_ULX3S_PROGRAMMER = Programmer(
    ofl_board="ulx3s", ofl_sram=("-m",), ofl_flash=("-f",), default_mode="sram",
    usual=("fujprog", "{bitstream}"),
    note="SRAM load by default (lost at power-off); --flash writes the SPI flash.")

#: nextpnr-ecp5's default router (router1) does not converge on the HEL top level in
#: usable time; router2 routes it (docs/boards.md, "Building").
_ECP5_NEXTPNR = ("--router", "router2")

#: 12 MHz → 24 MHz: the iCE40 target clock; 8 clocks per UART bit at 3 Mbaud.
_ICEBREAKER_CLK = 24_000_000
#: 25 MHz → 60 MHz: the ECP5 target clock, for both dies at P = 8 (post-route
#: figures per build: docs/boards.md); 20 clocks per UART bit at 3 Mbaud.
_ULX3S_CLK = 60_000_000
#: 25 MHz → 45 MHz: the clock of the N = 64 entry with the training core
#: (docs/boards.md "On-chip training"); 15 clocks per UART bit at 3 Mbaud.
_ULX3S_TRAIN_CLK = 45_000_000


def _ulx3s(die: str, *, resources, config: HelConfig, variant: str = "", purpose: str = "",
           clk_hz: int = _ULX3S_CLK) -> Board:
    """A ULX3S board entry: the dies differ in resources and core only; a ``variant``
    is a second core for the same board (its name gets ``-variant``)."""
    return Board(
        name=f"ulx3s-{die.lower()}" + (f"-{variant}" if variant else ""),
        title=f"ULX3S with LFE5U-{die} (ECP5)" + (f", {purpose}" if purpose else ""),
        platform=_ulx3s_platform(die),
        family="ecp5",
        device=f"LFE5U-{die}-6BG381C",
        resources=resources,
        uart=("uart", 0),
        clock=ClockPlan("clk25", 25_000_000, "EHXPLLL"),
        clk_hz=clk_hz,
        baud=3_000_000,   # the FT231X's maximum (3 MHz/1), 20 or 15 clocks/bit: exact
        config=config,
        bitstream="top.bit",
        programmer=_ULX3S_PROGRAMMER,
        nextpnr_opts=_ECP5_NEXTPNR,
    )


BOARDS: dict[str, Board] = {b.name: b for b in [
    Board(
        name="icebreaker",
        title="iCEBreaker (Lattice iCE40UP5K)",
        platform=_icebreaker_platform,
        family="ice40",
        device="iCE40UP5K-SG48",
        resources=_ICE40_UP5K,
        uart=("uart", 0),
        clock=ClockPlan("clk12", 12_000_000, "SB_PLL40_PAD"),
        clk_hz=_ICEBREAKER_CLK,
        baud=3_000_000,   # FT2232H 12 MHz/4, 8 clocks/bit: exact; faster, the 1-lane core paces
        # The UP5K's 5280 LCs, not its DSPs, set this core (docs/boards.md):
        # one MAC lane (SB_MAC16; a second one does the tanh interpolation),
        # 48-bit accumulators (acc_safe_samples = 16 samples of t_max steps)
        # and a 28-bit state with 20 fractional bits (hel compare on the
        # reference problem: cosine 0.999997 centred, as close to float RHEL
        # as the 36-bit state one-sided); the sequence buffer is in SPRAM.
        config=HelConfig(n=16, m=16, k=2, o=1, t_max=1024, lanes=1, acc_width=48,
                         state_width=28, state_frac=20, **ICE40_OPERAND),
        bitstream="top.bin",
        programmer=Programmer(
            ofl_board="ice40_generic", ofl_sram=None, ofl_flash=(), default_mode="flash",
            usual=("iceprog", "{bitstream}"),
            note="openFPGALoader writes the iCE40's SPI flash (it has no SRAM mode "
                 "for ice40_generic); the FPGA boots the new bitstream at once."),
        synth_opts=("-dsp",),
    ),
    # Both N = 32 entries carry the training core with an 8 k-word store (two banks of
    # 4 block RAMs) at 60 MHz; larger stores spread the core over the die (docs/boards.md
    # "On-chip training"). The 85F runs two sample engines (docs/onchip.md §13): 67.3 MHz
    # at seed 1; three engines, and two of 16 lanes each, did not route (docs/boards.md
    # "Sample engines on the 85F", "One consumer per product"). The 25F has room for one
    # engine.
    _ulx3s("85F", resources=_ecp5(luts=83640, mults=156, ebr=208, plls=4, ios=365),
           config=HelConfig(n=32, m=32, k=2, o=1, t_max=4096, lanes=8, store_words=8192,
                            engines=2, **ECP5_OPERAND)),
    _ulx3s("25F", resources=_ecp5(luts=24288, mults=28, ebr=56, plls=2, ios=197),
           config=HelConfig(n=32, m=32, k=2, o=1, t_max=2048, lanes=8, store_words=8192,
                            **ECP5_OPERAND)),
    # The time-series archive's core: N = M = 64 and the widest of the benchmark
    # sets (JapaneseVowels: K = 12 channels, O = 9 classes). t_max = 512 keeps the
    # sequence buffer (t_max·K words) six block RAMs deep: at 2048 its read
    # multiplexer was the critical path and missed 60 MHz (docs/boards.md).
    # It trains on chip too, sets whose records (K = 12, O = 9 words per step) fit its store.
    _ulx3s("85F", resources=_ecp5(luts=83640, mults=156, ebr=208, plls=4, ios=365),
           config=HelConfig(n=64, m=64, k=12, o=9, t_max=512, lanes=8, store_words=65536,
                            **ECP5_OPERAND),
           variant="n64", purpose="N = M = 64 for the time-series archive",
           clk_hz=_ULX3S_TRAIN_CLK),
]}


def get_board(name: str) -> Board:
    """The board called ``name``; :class:`UnknownBoard` names the choices."""
    try:
        return BOARDS[name]
    except KeyError:
        raise UnknownBoard(f"unknown board {name!r}; choose one of: {', '.join(BOARDS)}") from None
