"""The board clock plan: oscillator → PLL → the design's ``sync`` domain.

:class:`BoardClocks` is the one place that creates the ``sync`` clock domain on a
real board; the top level is its submodule. The top level (``hel_fpga.rtl.top.Top``) only *uses* ``sync``; it runs at
``Board.clk_hz``, the frequency this module produces and constrains.

The PLL parameters are computed here (not pasted from ``icepll``/``ecppll``
output) so that changing a board's design clock in :mod:`hel_fpga.boards.table` is a
one-number edit. :func:`ice40_pll` searches like Project IceStorm's ``icepll``
and :func:`ecp5_pll` like Project Trellis' ``ecppll``; the tests compare both
against those tools when they are installed (``yowasp-icepll``,
``yowasp-ecppll``).

Reset
-----
``sync`` is held in reset until the PLL reports lock and then for a further
``POR_SECONDS`` of design clock cycles: iCE40 block RAMs read garbage for a few
microseconds after configuration, and the lock output of both PLL families
can chatter while the VCO settles. The lock signal is asynchronous to the
output clock, so it passes a two-stage synchroniser first; the reset itself is
released synchronously.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from amaranth.hdl import ClockDomain, Elaboratable, Instance, Module, Signal
from amaranth.lib import io
from amaranth.lib.cdc import FFSynchronizer

__all__ = ["PLLError", "Ice40PLL", "Ecp5PLL", "ice40_pll", "ecp5_pll", "BoardClocks", "POR_SECONDS"]

#: Reset hold after PLL lock (covers the iCE40 BRAM power-up time of ~3 µs).
POR_SECONDS = 15e-6


class PLLError(ValueError):
    """No PLL setting reaches the requested frequency within tolerance."""


# --------------------------------------------------------------------------------------
# iCE40 SB_PLL40 (simple feedback), limits from the iCE40 sysCLOCK PLL guide / icepll
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ice40PLL:
    """SB_PLL40 divider setting: f_out = f_in·(DIVF+1) / ((DIVR+1)·2^DIVQ)."""

    f_in_hz: int
    divr: int
    divf: int
    divq: int

    @property
    def f_pfd_hz(self) -> float:
        return self.f_in_hz / (self.divr + 1)

    @property
    def f_vco_hz(self) -> float:
        return self.f_pfd_hz * (self.divf + 1)

    @property
    def f_out_hz(self) -> float:
        return self.f_vco_hz / (1 << self.divq)

    @property
    def filter_range(self) -> int:
        f = self.f_pfd_hz / 1e6
        return 1 if f < 17 else 2 if f < 26 else 3 if f < 44 else 4 if f < 66 else 5 if f < 101 else 6


def ice40_pll(f_in_hz: int, f_out_hz: int, tolerance: float = 0.0) -> Ice40PLL:
    """The SB_PLL40 setting closest to ``f_out_hz`` (first found on ties, as icepll).

    Raises :class:`PLLError` if the best relative error exceeds ``tolerance``.
    """
    best, best_err = None, math.inf
    for divr in range(16):
        f_pfd = f_in_hz / (divr + 1)
        if not 10e6 <= f_pfd <= 133e6:
            continue
        for divf in range(128):
            f_vco = f_pfd * (divf + 1)
            if not 533e6 <= f_vco <= 1066e6:
                continue
            for divq in range(1, 7):
                err = abs(f_vco / (1 << divq) - f_out_hz)
                if err < best_err:
                    best, best_err = Ice40PLL(f_in_hz, divr, divf, divq), err
    if best is None or best_err > tolerance * f_out_hz:
        raise PLLError(f"iCE40 PLL cannot make {f_out_hz / 1e6:g} MHz from {f_in_hz / 1e6:g} MHz"
                       + (f" (closest {best.f_out_hz / 1e6:g} MHz)" if best else ""))
    return best


# --------------------------------------------------------------------------------------
# ECP5 EHXPLLL (CLKOP feedback), limits as in Project Trellis' ecppll
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ecp5PLL:
    """EHXPLLL divider setting: f_out = f_in·CLKFB_DIV / CLKI_DIV, f_vco = f_out·CLKOP_DIV."""

    f_in_hz: int
    clki_div: int
    clkfb_div: int
    clkop_div: int

    @property
    def f_out_hz(self) -> float:
        return self.f_in_hz * self.clkfb_div / self.clki_div

    @property
    def f_vco_hz(self) -> float:
        return self.f_out_hz * self.clkop_div

    @property
    def clkop_cphase(self) -> int:
        # About 180° of the output, as Lattice's tools and ecppll choose; with
        # CLKOP feedback the phase does not change the output frequency.
        return (self.clkop_div - 1) // 2


def ecp5_pll(f_in_hz: int, f_out_hz: int, tolerance: float = 0.0) -> Ecp5PLL:
    """The EHXPLLL setting closest to ``f_out_hz``, ties broken by VCO nearest 600 MHz."""
    best, key_best = None, (math.inf, math.inf)
    for clki_div in range(1, 129):
        f_pfd = f_in_hz / clki_div
        if not 3.125e6 <= f_pfd <= 400e6:
            continue
        for clkfb_div in range(1, 81):
            for clkop_div in range(1, 129):
                f_vco = f_pfd * clkfb_div * clkop_div
                if not 400e6 <= f_vco <= 800e6:
                    continue
                f_out = f_pfd * clkfb_div
                key = (abs(f_out - f_out_hz), abs(f_vco - 600e6))
                if key < key_best:
                    best, key_best = Ecp5PLL(f_in_hz, clki_div, clkfb_div, clkop_div), key
    if best is None or key_best[0] > tolerance * f_out_hz:
        raise PLLError(f"ECP5 PLL cannot make {f_out_hz / 1e6:g} MHz from {f_in_hz / 1e6:g} MHz"
                       + (f" (closest {best.f_out_hz / 1e6:g} MHz)" if best else ""))
    return best


# --------------------------------------------------------------------------------------
# The clock-and-reset generator
# --------------------------------------------------------------------------------------

class BoardClocks(Elaboratable):
    """Creates the ``sync`` domain at ``board.clk_hz`` and runs ``design`` in it.

    The domain is defined here, in the design's parent, because from Amaranth
    0.6 on a domain defined in one submodule does not reach its siblings.

    Parameters
    ----------
    board:
        A :class:`hel_fpga.boards.table.Board`; its ``clock`` field says which oscillator
        resource to request, its frequency, and which PLL (if any) to use.
    design:
        The top level (``hel_fpga.rtl.top.Top`` or a stand-in), added as submodule
        ``top``; it uses ``sync`` without defining it. ``None`` for just the
        clocks.

    Attributes
    ----------
    locked: Signal
        PLL lock (constant 1 without a PLL), in no clock domain.
    """

    def __init__(self, board, design=None):
        self.board = board
        self.design = design
        self.locked = Signal()

    def elaborate(self, platform):
        b = self.board
        clk = b.clock
        m = Module()
        m.domains.sync = cd_sync = ClockDomain("sync")
        design_clk = cd_sync.clk
        clk_io = platform.request(clk.resource, 0, dir="-")

        if clk.pll is None:
            if clk.osc_hz != b.clk_hz:
                raise PLLError(f"{b.name}: no PLL, so the design clock must equal the oscillator")
            m.submodules.clk_buf = buf = io.Buffer("i", clk_io)
            m.d.comb += [design_clk.eq(buf.i), self.locked.eq(1)]
        elif clk.pll == "SB_PLL40_PAD":
            # The iCE40's PLL sits behind the oscillator's pad: it takes the pin
            # itself, not a buffered net.
            s = ice40_pll(clk.osc_hz, b.clk_hz)
            m.submodules.pll = Instance(
                "SB_PLL40_PAD",
                p_FEEDBACK_PATH="SIMPLE",
                p_DIVR=s.divr, p_DIVF=s.divf, p_DIVQ=s.divq,
                p_FILTER_RANGE=s.filter_range,
                i_PACKAGEPIN=clk_io.io,
                i_RESETB=1, i_BYPASS=0,
                o_PLLOUTGLOBAL=design_clk,
                o_LOCK=self.locked)
        elif clk.pll == "EHXPLLL":
            s = ecp5_pll(clk.osc_hz, b.clk_hz)
            m.submodules.clk_buf = buf = io.Buffer("i", clk_io)
            m.submodules.pll = Instance(
                "EHXPLLL",
                a_FREQUENCY_PIN_CLKI=f"{clk.osc_hz / 1e6:g}",
                a_FREQUENCY_PIN_CLKOP=f"{b.clk_hz / 1e6:g}",
                a_ICP_CURRENT="12", a_LPF_RESISTOR="8",
                a_MFG_ENABLE_FILTEROPAMP="1", a_MFG_GMCREF_SEL="2",
                p_PLLRST_ENA="DISABLED", p_INTFB_WAKE="DISABLED",
                p_STDBY_ENABLE="DISABLED", p_DPHASE_SOURCE="DISABLED",
                p_OUTDIVIDER_MUXA="DIVA", p_OUTDIVIDER_MUXB="DIVB",
                p_OUTDIVIDER_MUXC="DIVC", p_OUTDIVIDER_MUXD="DIVD",
                p_CLKI_DIV=s.clki_div, p_CLKFB_DIV=s.clkfb_div,
                p_CLKOP_ENABLE="ENABLED", p_CLKOP_DIV=s.clkop_div,
                p_CLKOP_CPHASE=s.clkop_cphase, p_CLKOP_FPHASE=0,
                p_FEEDBK_PATH="CLKOP",
                i_RST=0, i_STDBY=0, i_CLKI=buf.i, i_CLKFB=design_clk,
                i_PHASESEL0=0, i_PHASESEL1=0, i_PHASEDIR=1, i_PHASESTEP=1,
                i_PHASELOADREG=1, i_PLLWAKESYNC=0, i_ENCLKOP=0,
                o_CLKOP=design_clk, o_LOCK=self.locked)
        else:
            raise PLLError(f"{b.name}: unknown PLL primitive {clk.pll!r}")

        # No explicit constraint on design_clk: Amaranth's hierarchical name for
        # it does not survive Yosys' flattening, and nextpnr derives the exact
        # constraint through the PLL from the oscillator's (which the platform
        # sets). hel_fpga.boards.build checks that a clock carries the target.

        m.domains.por = cd_por = ClockDomain("por", reset_less=True, local=True)
        m.d.comb += cd_por.clk.eq(design_clk)

        locked = Signal()
        m.submodules.lock_sync = FFSynchronizer(self.locked, locked, o_domain="por")
        delay = max(1, math.ceil(POR_SECONDS * b.clk_hz))
        count = Signal(range(delay + 1))
        ready = Signal()
        with m.If(~locked):
            m.d.por += [count.eq(0), ready.eq(0)]
        with m.Elif(count == delay):
            m.d.por += ready.eq(1)
        with m.Else():
            m.d.por += count.eq(count + 1)
        m.d.comb += cd_sync.rst.eq(~ready)
        if self.design is not None:
            m.submodules.top = self.design
        return m
