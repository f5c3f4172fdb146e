"""The piecewise-linear tanh unit: ``a = tanh_pwl(sat(rshift_round(z, z_shift)))``.

The table is :meth:`hel_fpga.spec.formats.HelConfig.tanh_knots` (the one definition); the
ROM stores, per segment, the left knot and the difference to the right knot, so
one read gives both and the unit accepts one argument per cycle::

    zt   = saturate(rshift_round(z, z_shift), z_width)        (z format)
    off  = zt + 2^(z_width-1)                                 (flip the sign bit)
    idx, frac = off >> fb, off mod 2^fb                       (fb = tanh_frac_bits)
    a    = lo[idx] + rshift_round(d[idx] · frac, fb)          (activation format)

The knots are odd-symmetric (``K[2^s − i] = −K[i]``: the knot positions are
symmetric and rounding to nearest commutes with negation), so the ROM holds only
the upper half of the segments: a lower segment ``idx`` uses the entry of its
mirror ``2^s − 1 − idx`` (same ``d``, ``lo = −(K + d)``). This halves the largest
ROM of the core (1024 segments: 4 iCE40 block RAMs instead of 8). :func:`tanh_rom`
checks the symmetry and falls back to the full table if a table lacks it; the
interpolation is the same for both tables, so the result is bit-exact either way.

Pipeline (``LATENCY`` = 4 registers): round; saturate + ROM address (the
ROM's output register); interpolation product; sum. The interpolation multiplier is small
(``d`` spans a few bits more than one segment's rise, ``frac`` is ``fb`` bits).
The ``pipelined`` form (ECP5) registers the ROM's word before the multiplier
(``LATENCY`` = 5): a DP16KD's clock-to-out, the routing to the MULT18X18D and the
multiply do not fit 100 MHz in one cycle.
"""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from hel_fpga.spec.formats import HelConfig

__all__ = ["TanhUnit", "tanh_rom", "saturate_signed"]


def saturate_signed(m: Module, x, width: int, name: str) -> Signal:
    """``x`` (signed) saturated to ``width`` bits, decided by its top bits.

    ``x`` fits when the bits from ``width − 1`` up are all equal; otherwise its
    sign picks the limit. Equivalent to comparing against both limits, but a few
    LUTs instead of two carry chains as wide as ``x``.
    """
    out = Signal(signed(width), name=name)
    xw = len(x)
    if xw <= width:
        m.d.comb += out.eq(x)
        return out
    top = x[width - 1:]
    fits = (top == 0) | (top == (1 << len(top)) - 1)
    lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
    m.d.comb += out.eq(Mux(fits, x[:width].as_signed(), Mux(x[xw - 1], lo, hi)))
    return out


def tanh_rom(cfg: HelConfig) -> tuple[list[int], int, bool]:
    """ROM words ``(lo, d)`` packed as ``lo | d << operand_width``, the width of ``d``,
    and whether the table is the upper half only (odd symmetry)."""
    knots = [int(x) for x in cfg.tanh_knots()]
    segs = len(knots) - 1
    deltas = [knots[i + 1] - knots[i] for i in range(segs)]
    dw = max(max(abs(d) for d in deltas).bit_length() + 1, 2)
    ow = cfg.operand_width
    half = segs >= 2 and all(knots[segs - i] == -knots[i] for i in range(segs + 1))
    first = segs // 2 if half else 0
    words = [(knots[i] & ((1 << ow) - 1)) | ((deltas[i] & ((1 << dw) - 1)) << ow)
             for i in range(first, segs)]
    return words, dw, half


class TanhUnit(wiring.Component):
    """Pipelined integer tanh of a wide z sum (one argument per cycle).

    Attributes
    ----------
    z : In(signed(z_in_width))
        The exact sum ``W·qo + B·u + b·2^OF`` (product format), with ``valid`` and
        an opaque ``tag`` that travels along.
    a : Out(signed(operand_width))
        The activation, ``LATENCY`` cycles later, with ``a_valid`` and ``a_tag``.
    busy : Out(1)
        A value is in flight.

    Parameters
    ----------
    z_biased : bool
        ``z`` already includes the rounding half ``2^(z_shift−1)`` (the core
        starts its z sums with it), so stage 1 is a plain shift instead of a
        wide adder. ``z + 2^(z_shift−1)`` must fit ``z_in_width``.
    pipelined : bool
        Register the ROM's word (knot, delta, the segment's fraction) before the
        interpolation multiplier: ``LATENCY`` 5 instead of 4.
    """

    LATENCY = 4

    def __init__(self, cfg: HelConfig, z_in_width: int, tag_width: int = 1,
                 z_biased: bool = False, pipelined: bool = False):
        self.cfg = cfg
        self.z_biased = z_biased
        self.pipelined = pipelined
        self.LATENCY = 5 if pipelined else 4
        self.z_in_width = z_in_width
        self.tag_width = tag_width
        super().__init__({
            "z": In(signed(z_in_width)), "valid": In(1), "tag": In(unsigned(tag_width)),
            "a": Out(signed(cfg.operand_width)), "a_valid": Out(1),
            "a_tag": Out(unsigned(tag_width)), "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.cfg
        ow, zw, zs, fb = cfg.operand_width, cfg.z_width, cfg.z_shift, cfg.tanh_frac_bits
        words, dw, half = tanh_rom(cfg)
        s = cfg.tanh_segments_log2
        rom = m.submodules.rom = Memory(shape=unsigned(ow + dw), depth=len(words), init=words)
        rp = rom.read_port()

        lat = self.LATENCY
        valid = [Signal(name=f"v{i}") for i in range(lat)]
        tag = [Signal(self.tag_width, name=f"t{i}") for i in range(lat)]
        m.d.sync += [valid[0].eq(self.valid), tag[0].eq(self.tag)]
        for i in range(1, lat):
            m.d.sync += [valid[i].eq(valid[i - 1]), tag[i].eq(tag[i - 1])]
        m.d.comb += [self.a_valid.eq(valid[-1]), self.a_tag.eq(tag[-1]),
                     self.busy.eq(sum(valid) != 0)]

        # 1: round to the z format (wide)
        zr = Signal(signed(self.z_in_width + 1 - max(zs, 0) if zs > 0 else self.z_in_width))
        if zs > 0 and self.z_biased:
            m.d.sync += zr.eq(self.z >> zs)
        elif zs > 0:
            m.d.sync += zr.eq((self.z + (1 << (zs - 1))) >> zs)
        else:
            m.d.sync += zr.eq(self.z)
        # 2: saturate, offset, ROM address (the ROM's output register is stage 3)
        zt = saturate_signed(m, zr, zw, "zt")
        off = Signal(unsigned(zw))
        m.d.comb += off.eq(zt.as_unsigned() ^ (1 << (zw - 1)))
        frac2 = Signal(unsigned(fb), reset_less=True)   # no reset: DSP registers
        mirror2 = Signal()
        idx = off[fb:]
        if half:   # lower half: the mirrored segment's entry (~idx in the low s-1 bits)
            m.d.comb += rp.addr.eq(Mux(idx[s - 1], idx[:s - 1], ~idx[:s - 1]))
            m.d.sync += mirror2.eq(~idx[s - 1])
        else:
            m.d.comb += rp.addr.eq(idx)
        m.d.sync += frac2.eq(off[:fb])
        # 3: interpolation product (pipelined: of the ROM's word registered first)
        lo3 = Signal(signed(ow))
        d3 = Signal(signed(dw))
        k3 = Signal(signed(ow))
        if self.pipelined:
            word3 = Signal.like(rp.data, name="word3", reset_less=True)
            frac3 = Signal(unsigned(fb), reset_less=True)
            mirror3 = Signal()
            m.d.sync += [word3.eq(rp.data), frac3.eq(frac2), mirror3.eq(mirror2)]
            frac2, mirror2 = frac3, mirror3
        else:
            word3 = rp.data
        m.d.comb += [k3.eq(word3[:ow].as_signed()), d3.eq(word3[ow:].as_signed()),
                     lo3.eq(Mux(mirror2, -(k3 + d3), k3))]
        prod4 = Signal(signed(dw + fb + 1), reset_less=True)
        lo4 = Signal(signed(ow))
        m.d.sync += [prod4.eq(d3 * frac2), lo4.eq(lo3)]
        # 4: a = lo + rshift_round(d·frac, fb)
        m.d.sync += self.a.eq(lo4 + ((prod4 + (1 << (fb - 1))) >> fb))
        return m
