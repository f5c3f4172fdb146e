"""MAC lanes of the HEL core: memory banking, one multiplier lane, one accumulator group.

Banking (:class:`LaneGeometry`)
-------------------------------
The core has ``P = cfg.lanes`` multiplier lanes. Every matrix the lanes touch is
banked by *column modulo P*, so that lane ``p`` only ever reads its own memory:

* Parameter memory of lane ``p``: the ``(M+1) × (N+K)`` matrix ``[W | B ; α]``
  (row ``M`` holds ``α`` under the oscillator columns), columns ``c ≡ p (mod P)``,
  at address ``row·RA + c // P`` with ``RA = ⌈(N+K)/P⌉``. ``b`` lives in a small
  separate memory: it enters ``z`` as the initial value of the sum, not as a product.
* Operand vector ``x = [qo | u | 1]``: ``qo_i`` sits in lane ``i mod P``'s operand
  memory at row ``i // P``; ``u`` and the constant are multiplexed from registers.
* Accumulators: the ``(M+1) × (N+K+1)`` matrix ``[ΣW | ΣB | Σb ; Σα]`` (column
  ``N+K`` of a row holds ``Σb_j``, the product ``a_j·1``), element index
  ``e = row·RC + c // P`` with ``RC = ⌈(N+K+1)/P⌉``. Two lanes share one memory
  ("group", address ``2e + (p mod 2)``) because the centred contrast needs two
  products per element: each lane issues one read-modify-write every second
  cycle, so a pseudo-dual-port block RAM (one read, one write port) serves two
  lanes, and the two lanes share one wide adder. This halves the accumulator
  block RAMs, the largest memory of the core.

All lanes always address the same row/chunk at the same time, so one address
generator drives every bank. The products of one step:

* ``z_j = Σ_c [W|B]_jc x_c``: all lanes on row ``j``, chunk ``r`` (columns
  ``rP … rP+P-1``); an adder tree reduces the lanes and an accumulator the chunks.
* ``F_i = α_i qo_i + Σ_j W_ji a_j``: lane ``p`` owns oscillator ``i = rP + p`` and
  accumulates over ``j`` (``M+1`` slots per oscillator row ``r``), reading its own
  bank at column ``i``.
* Contrast: element ``(j, c)`` gets ``a_j x_c`` (``x_c = qo_i, u_k`` or 1) and
  row ``M`` gets ``qo_i²``; in centred mode ``a⁺x⁺ − a⁻x⁻`` from two products.

The Python-side address functions here are the single definition of the
layout; the gateware's address generators and the tests both use them.
"""

from __future__ import annotations

from dataclasses import dataclass

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from hel_fpga.rtl.bram import NO_RW_CHECK, ram_read_port
from hel_fpga.spec.formats import HelConfig

__all__ = ["LaneGeometry", "MacLane", "AccumulatorGroup", "ceil_div"]

def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class LaneGeometry:
    """Banking, schedule lengths and datapath widths of a core with ``cfg.lanes`` lanes.

    Attributes
    ----------
    p:
        Number of MAC lanes (multipliers).
    u_mode:
        The input products ``c_j = Σ_k B_jk u_k`` have their own phase (U) instead
        of riding in the z rows: ``B`` is banked by row (lane ``j mod P``, address
        ``u_base + (j // P)·K + k``) and lane ``p`` sums rows ``j ≡ p`` over ``k``;
        ``c_j`` waits in that lane, which adds it to its product in the first
        chunk of row ``j``. Then a z row is only the ``N`` oscillator columns,
        without the partly empty chunk the ``K`` input columns cause when ``P`` is
        large. Costs ``⌈M/P⌉`` registers of ``c_width`` bits per lane, so it is
        used only for ``P ≥ 8`` (and only when the input columns add a chunk).
    ra, rc, rn, ru:
        Chunks of ``P`` columns per row in the z product (``N+K`` columns, or ``N``
        in u_mode), in the contrast (``N+K+1``) and oscillator rows of the force
        (``N``); row groups of the U phase (``⌈M/P⌉``).
    lb:
        Slots per oscillator row of the force: ``α`` then ``M`` weights, padded to
        ``P`` so the serial state unit (one oscillator per cycle) keeps up.
    group_lanes, groups:
        Lanes per accumulator memory (2, or 1 when ``P == 1``) and memories.
    contrast_packed, rw:
        The contrast's input columns (``u_k`` for B, 1 for b) are banked by row
        like U's ``B``: lane ``p`` takes the ``K + 1`` elements of rows
        ``j ≡ p`` in ``⌈M/P⌉·(K+1)`` slots after the α row, instead of riding in
        the last chunk of every contrast row. Used when that saves slots
        (``M·(RC − RN) > ⌈M/P⌉·(K+1)``: a row's input columns add a mostly empty
        chunk). ``rw`` is the chunks of a contrast row then: ``RN``, else ``RC``.
    elems:
        Accumulator elements per lane (``M·rw + RN``, plus ``⌈M/P⌉·(K+1)`` packed).
    """

    cfg: HelConfig

    @property
    def p(self) -> int:
        return self.cfg.lanes

    @property
    def u_mode(self) -> bool:
        n, k, p = self.cfg.n, self.cfg.k, self.p
        return p >= 8 and ceil_div(n + k, p) > ceil_div(n, p)

    @property
    def ra(self) -> int:
        n, k = self.cfg.n, self.cfg.k
        return ceil_div(n if self.u_mode else n + k, self.p)

    @property
    def ru(self) -> int:
        return ceil_div(self.cfg.m, self.p)

    @property
    def u_base(self) -> int:
        """Parameter-memory address of the row-banked ``B`` (u_mode)."""
        return (self.cfg.m + 1) * self.ra

    @property
    def c_width(self) -> int:
        """``c_j = Σ_k B_jk u_k`` (u_mode)."""
        return self.prod_width + ceil_log2(self.cfg.k) + 1

    @property
    def rc(self) -> int:
        return ceil_div(self.cfg.n + self.cfg.k + 1, self.p)

    @property
    def rn(self) -> int:
        return ceil_div(self.cfg.n, self.p)

    @property
    def contrast_packed(self) -> bool:
        return self.cfg.m * (self.rc - self.rn) > self.ru * (self.cfg.k + 1)

    @property
    def rw(self) -> int:
        return self.rn if self.contrast_packed else self.rc

    @property
    def input_base(self) -> int:
        """Element of the packed input columns' first row group (after W and α)."""
        return self.cfg.m * self.rw + self.rn

    @property
    def rmax(self) -> int:
        return max(self.ra, self.rc, self.rn, self.cfg.k + int(self.contrast_packed))

    @property
    def lb(self) -> int:
        return max(self.cfg.m + 1, self.p)

    @property
    def group_lanes(self) -> int:
        return 2 if self.p >= 2 else 1

    @property
    def groups(self) -> int:
        return ceil_div(self.p, self.group_lanes)

    @property
    def elems(self) -> int:
        return self.input_base + (self.ru * (self.cfg.k + 1) if self.contrast_packed else 0)

    @property
    def param_depth(self) -> int:
        return self.u_base + (self.ru * self.cfg.k if self.u_mode else 0)

    @property
    def acc_depth(self) -> int:
        return self.elems * self.group_lanes

    # ---- datapath widths ---------------------------------------------------------
    @property
    def prod_width(self) -> int:
        """A signed operand × operand product."""
        return 2 * self.cfg.operand_width

    @property
    def z_width(self) -> int:
        """The exact z sum (N+K products plus b·2^OF)."""
        return self.prod_width + ceil_log2(self.cfg.n + self.cfg.k + 1) + 1

    @property
    def f_width(self) -> int:
        """The exact force sum: ``(α·qo) << alpha_shift`` plus M products."""
        return self.prod_width + self.cfg.alpha_shift + ceil_log2(self.cfg.m + 1) + 1

    @property
    def lane_width(self) -> int:
        """A lane's running sum: a force sum, or ``c_j`` in the U phase."""
        return max(self.f_width, self.c_width)

    @property
    def kick_width(self) -> int:
        ks = self.cfg.kick_shift
        return self.f_width + 1 - ks if ks > 0 else self.f_width - ks

    @property
    def diff_width(self) -> int:
        """One contrast term: product(+ε) − product(−ε)."""
        return self.prod_width + 1

    # ---- layout (the one definition) ---------------------------------------------
    def param_location(self, name: str, idx: tuple[int, ...]) -> tuple[str, int, int]:
        """Where parameter ``name[idx]`` lives: ``("lane", p, addr)`` or ``("b", 0, j)``."""
        n, k, m = self.cfg.n, self.cfg.k, self.cfg.m
        if name == "W":
            j, c = idx
        elif name == "B":
            if self.u_mode:
                j, kk = idx
                return ("lane", j % self.p, self.u_base + (j // self.p) * k + kk)
            j, c = idx[0], n + idx[1]
        elif name == "alpha":
            j, c = m, idx[0]
        elif name == "b":
            return ("b", 0, idx[0])
        else:
            raise KeyError(name)
        return ("lane", c % self.p, j * self.ra + c // self.p)

    def acc_location(self, name: str, idx: tuple[int, ...]) -> tuple[int, int]:
        """``(group, address)`` of accumulator ``name[idx]``."""
        n, k, m = self.cfg.n, self.cfg.k, self.cfg.m
        if name in ("B", "b") and self.contrast_packed:    # banked by row
            j, kk = idx[0], (idx[1] if name == "B" else k)
            lane, elem = j % self.p, self.input_base + (j // self.p) * (k + 1) + kk
        else:                                               # banked by column
            if name == "W":
                j, c = idx
            elif name == "B":
                j, c = idx[0], n + idx[1]
            elif name == "b":
                j, c = idx[0], n + k
            elif name == "alpha":
                j, c = m, idx[0]
            else:
                raise KeyError(name)
            lane, elem = c % self.p, j * self.rw + c // self.p
        return lane // self.group_lanes, elem * self.group_lanes + lane % self.group_lanes

    def walk_sections(self, kind: str) -> list[dict]:
        """Canonical-order sections (W, B, b, α) for the parameter or accumulator walker.

        Each section is ``rows`` rows of columns ``c0 … c1-1`` at row bases
        ``base0 + j·stride``; ``mem`` is ``"lane"`` (banked by column), ``"row"``
        (banked by row: lane ``j mod P``, address ``base0 + (j // P)·stride + c``)
        or ``"b"`` (b memory).
        """
        n, k, m = self.cfg.n, self.cfg.k, self.cfg.m
        stride = self.ra if kind == "param" else self.rw
        packed = kind == "acc" and self.contrast_packed
        secs = [dict(rows=m, c0=0, c1=n, base0=0, stride=stride, mem="lane")]
        if kind == "param" and self.u_mode:
            secs.append(dict(rows=m, c0=0, c1=k, base0=self.u_base, stride=k, mem="row"))
        elif packed:
            secs.append(dict(rows=m, c0=0, c1=k, base0=self.input_base, stride=k + 1, mem="row"))
        else:
            secs.append(dict(rows=m, c0=n, c1=n + k, base0=0, stride=stride, mem="lane"))
        if kind == "param":
            secs.append(dict(rows=m, c0=0, c1=1, base0=0, stride=1, mem="b"))
        elif packed:
            secs.append(dict(rows=m, c0=0, c1=1, base0=self.input_base + k, stride=k + 1,
                             mem="row"))
        else:
            secs.append(dict(rows=m, c0=n + k, c1=n + k + 1, base0=0, stride=stride, mem="lane"))
        secs.append(dict(rows=1, c0=0, c1=n, base0=m * stride, stride=stride, mem="lane"))
        return secs


class MacLane(wiring.Component):
    """One MAC lane: a registered multiplier and one adder, whose running sums
    serve every phase (``every_phase``, the ECP5 form): the force sums (B), the
    input sums ``c_j`` (U), the contrast's terms (C), and the z products on their
    way to the core's adder tree (A). Then only this adder takes the product ``p``.

    Timing (cycle numbers relative to the issue cycle S0 of a slot): the core
    presents the operands ``a``, ``b`` in S1 (from block-RAM outputs), they are
    registered (DSP input registers), multiplied and registered again (DSP output
    register), so ``p`` is the product in S3. This is the SB_MAC16 / MULT18X18D
    pipeline with both register stages.

    The force accumulators ``F[slot]`` (two: ±ε banks in centred echo) are driven in
    S3 (controls presented in S2) by ``f_en`` / ``f_first`` / ``f_last`` /
    ``f_slot``: ``f_first`` starts a sum with the product, shifted by
    ``cfg.alpha_shift`` when ``f_alpha`` (the first product of an oscillator is
    ``α_i·qo_i``, aligned with the ``W·a`` products in the activation format);
    ``sum0`` is the first bank's running-sum register.

    In a z slot (``z_en``) the adder writes the product to ``sum0``, which the
    core's adder tree takes a cycle later; in the first chunk of a row
    ``j ≡ p (mod P)`` it adds the row's ``c_j``, which the lane keeps from the U
    phase (:meth:`_input_sums`). So the tree, not ``p``'s DSP output, is what
    spreads over the die, and the ``c_j`` stay in the lane that summed them.

    The same adder forms the contrast's term (``c_en``, presented in S2 like
    the force controls): the +ε slot's product (``f_slot`` 0) waits in the
    first running-sum register, and the −ε slot's gives ``diff`` = that product
    minus this one, the adder subtracting (the product inverted, a carry in).
    No lane needs a second adder for the difference.

    ``f_last`` copies the finished sum into the lane's kick register, where it
    waits for the serial state unit while the lane already sums the next
    oscillator.

    The kick registers of the P lanes form a shift chain towards lane 0, whose
    head the core's serializer reads, one oscillator (and bank) per cycle: each
    lane wires only to its neighbour, instead of every lane's sums into one
    2P-way selection beside the state unit. Lane ``p`` holds ``kick0`` (loaded
    with each finished sum, either bank) and ``kick_odd``; every cycle without a
    load ``kick0 ← kick_odd`` and ``kick_odd ← chain_in`` (lane ``p+1``'s
    ``kick0``) with two banks, ``kick0 ← chain_in`` with one. The ±ε banks finish
    a cycle apart, so after the second load the chain reads (lane 0, +ε),
    (lane 0, −ε), (lane 1, +ε), … at its head, as the serializer takes them;
    the next oscillator row's sums come at least 2P cycles later (``lb ≥ P``
    slots per row), when the chain has been read.

    Attributes
    ----------
    a, b : In(signed(operand_width))
        Operands in S1.
    p : Out(signed(2·operand_width))
        Product in S3.
    f_en, f_first, f_last, f_slot, f_alpha : In(1)
        Force-sum control for the product ``p`` of the next cycle: presented in S2,
        registered in the lane, acting in S3.
    c_en : In(1)
        The product of the next cycle is a contrast term, of bank ``f_slot``
        (presented in S2 with ``f_slot``; ``f_en`` low).
    z_en, z_row0 : In(1)
        The product of the next cycle is a z product (of row 0); with ``f_first``
        (chunk 0) and ``f_slot`` (bank), presented in S2. ``z_row0`` only with a
        U phase, as the next two.
    u_last : In(1)
        The product of the next cycle is a U row's last (S2): its sum is a ``c_j``.
    turn_in, turn_out : In(1), Out(1)
        The token of the row whose ``c_j`` is due, from lane ``p−1`` (lane P−1
        for lane 0) and to lane ``p+1``.
    diff : Out(signed(2·operand_width + 1))
        In S3 of a −ε contrast slot: the +ε slot's product minus this one.
    kick0 : Out(signed(lane_width))
        The kick chain's register of this lane (its head at lane 0); with a
        single lane (no kick registers) the first bank's running sum.
    kick1 : Out(signed(lane_width))
        With a single lane, the second bank's running sum (the serializer takes
        it a cycle after ``kick0``).
    chain_in : In(signed(lane_width))
        Lane ``p+1``'s ``kick0`` (zero for the last lane).
    two_banks : In(1)
        The pass runs two working banks (the chain's order); constant in a pass.

    Parameters
    ----------
    kick_regs : bool
        Hold the finished sums in the kick chain, so the lane can sum the next
        oscillator while the serial state unit still waits to take them. With a
        single lane the state unit takes them one and two cycles after
        ``f_last`` — before the next oscillator's first product overwrites the
        running sums — so ``kick0``/``kick1`` are the running sums themselves and
        the chain's registers are saved.
    first_lane : bool
        Lane 0: it holds the token at row 0.
    every_phase : bool
        The adder serves A, C and U as above (the ECP5 form; required with a U
        phase). Without it (the iCE40 form's single lane at 24 MHz) the adder
        sums B only, and the core takes ``p`` itself for the adder tree and the
        contrast's difference, a cycle earlier; the ports ``c_en``, ``diff`` and
        ``z_en`` are absent.
    f_bias : int
        Added to every force sum (with its first, α, product). The core passes
        the kick's rounding half ``2^(kick_shift−1)``, so rounding the finished
        sum is a plain shift, and the lane's one adder does it for free. The U
        phase's sums (``f_alpha`` low) are not biased.
    """

    def __init__(self, cfg: HelConfig, kick_regs: bool = True, f_bias: int = 0,
                 first_lane: bool = False, every_phase: bool = True):
        self.cfg = cfg
        self.kick_regs = kick_regs
        self.f_bias = f_bias
        self.first_lane = first_lane
        self.every_phase = every_phase
        g = LaneGeometry(cfg)
        self._c_rows = g.ru if g.u_mode else 0
        self._c_width = g.c_width
        if self._c_rows and not every_phase:
            raise ValueError("the U phase's c_j live in the lanes: every_phase is required")
        ow = cfg.operand_width
        ports = {
            "a": In(signed(ow)), "b": In(signed(ow)),
            "p": Out(signed(2 * ow)),
            "f_en": In(1), "f_first": In(1), "f_last": In(1), "f_slot": In(1), "f_alpha": In(1),
            "kick0": Out(signed(g.lane_width)), "kick1": Out(signed(g.lane_width)),
            "chain_in": In(signed(g.lane_width)), "two_banks": In(1),
            "sum0": Out(signed(g.lane_width)),
        }
        if every_phase:
            ports.update({"c_en": In(1), "diff": Out(signed(g.diff_width)), "z_en": In(1)})
        if self._c_rows:
            ports.update({"z_row0": In(1), "u_last": In(1), "turn_in": In(1), "turn_out": Out(1)})
        super().__init__(ports)
        self._fw = g.lane_width

    def elaborate(self, platform):
        m = Module()
        ow = self.cfg.operand_width
        # Without reset, so Yosys can fold the three registers into the SB_MAC16 (a
        # reset would leave them in the fabric: 64 flip-flops per lane); nothing
        # uses a product without a valid tag, which the reset does clear.
        a_r = Signal(signed(ow), reset_less=True)
        b_r = Signal(signed(ow), reset_less=True)
        p_r = Signal(signed(2 * ow), reset_less=True)
        m.d.sync += [a_r.eq(self.a), b_r.eq(self.b), p_r.eq(a_r * b_r)]
        m.d.comb += self.p.eq(p_r)

        # one adder for both banks: their products alternate cycle by cycle
        facc = [Signal(signed(self._fw), name=f"facc{s}") for s in range(2)]
        total = Signal(signed(self._fw))     # the running sum with this cycle's product
        m.d.comb += self.sum0.eq(facc[0])
        # The controls arrive in S2 and are decoded into registers here, so only
        # register outputs fan out to the adder's bits (on ECP5 a decode behind the
        # distant tag register plus the fan-out to eight lanes does not fit 60 MHz).
        take = [Signal(name=f"take{s}") for s in range(2)]      # add to facc[s]
        shifted = Signal()      # an oscillator's first product: f_bias + (α·qo << alpha_shift)
        sub = Signal()          # a −ε contrast term: facc[0] − product
        write = [Signal(name=f"write{s}") for s in range(2)]
        last = Signal()
        two = Signal()      # a registered copy of two_banks: constant in a pass
        if self.every_phase or self.kick_regs:
            m.d.sync += two.eq(self.two_banks)
        if self.every_phase:
            self._every_phase_adder(m, facc, total, take, shifted, sub, write, last, two)
        else:
            # B (and U) only: the product goes to the core's adder tree and contrast too
            for s in range(2):
                m.d.sync += [take[s].eq(~self.f_first & (self.f_slot == s)),
                             write[s].eq(self.f_en & (self.f_slot == s))]
            m.d.sync += [shifted.eq(self.f_first & self.f_alpha), last.eq(self.f_last)]
            acc_in = Mux(take[1], facc[1], Mux(take[0], facc[0], Mux(shifted, self.f_bias, 0)))
            m.d.comb += total.eq(acc_in + Mux(shifted, self.p << self.cfg.alpha_shift, self.p))
        for s in range(2):
            with m.If(write[s]):
                m.d.sync += facc[s].eq(total)
            if not self.kick_regs:
                m.d.comb += (self.kick0, self.kick1)[s].eq(facc[s])
        if self.kick_regs:
            kick_odd = Signal(signed(self._fw))
            m.d.sync += kick_odd.eq(self.chain_in)
            with m.If((write[0] | write[1]) & last):
                m.d.sync += self.kick0.eq(total)
            with m.Else():
                m.d.sync += self.kick0.eq(Mux(two, kick_odd, self.chain_in))
        return m

    def _every_phase_adder(self, m, facc, total, take, shifted, sub, write, last, two):
        """The adder's controls and operands for all four phases (``every_phase``)."""
        force_sum = self.f_en & ~self.f_first
        second = self.c_en & self.f_slot
        m.d.sync += [take[0].eq((force_sum & ~self.f_slot) | second),
                     take[1].eq(force_sum & self.f_slot),
                     sub.eq(second),
                     write[0].eq(((self.f_en | self.c_en) & ~self.f_slot) | self.z_en),
                     write[1].eq(self.f_en & self.f_slot),
                     shifted.eq(self.f_first & self.f_alpha), last.eq(self.f_last)]
        c_term = self._input_sums(m, facc[0], two)
        acc_in = Mux(take[1], facc[1], Mux(take[0], facc[0], Mux(shifted, self.f_bias, c_term)))
        # ± the product in one carry chain: inverted, with the carry in, to subtract
        addend = Signal(signed(self._fw))
        m.d.comb += [addend.eq(Mux(shifted, self.p << self.cfg.alpha_shift, self.p)
                               ^ Mux(sub, -1, 0)),
                     total.eq(acc_in + addend + sub),
                     self.diff.eq(total)]

    def _input_sums(self, m, sum0, two):
        """The U phase's ``c_j`` of this lane's rows (``j ≡ p``), kept for phase A.

        A U row's sum is taken from ``sum0`` a cycle after its last product, into a
        shift register of ``⌈M/P⌉`` words whose head belongs to the lane's next row.
        The rows of phase A go in order, so the lane whose row it is passes along
        the lanes with a token (``turn``, lane 0's at row 0): in the first chunk of
        its row the lane adds the head to the product (the term this returns), and
        after the last working bank's first chunk the head moves on. Returns 0
        without a U phase.
        """
        if not self._c_rows:
            return 0
        zf = self.z_en & self.f_first
        turn = Signal()
        turn_now = Signal()
        m.d.comb += [turn_now.eq(Mux(self.z_row0, int(self.first_lane), turn)),
                     self.turn_out.eq(turn_now)]
        row_done = zf & (self.f_slot == two)      # the last bank's first chunk of a row
        with m.If(row_done):
            m.d.sync += turn.eq(self.turn_in)
        add_c = Signal()
        used = Signal()
        u_taken = Signal()
        u_store = Signal()
        m.d.sync += [add_c.eq(zf & turn_now), used.eq(row_done & turn_now),
                     u_taken.eq(self.u_last), u_store.eq(u_taken)]
        c = [Signal(signed(self._c_width), name=f"c{r}") for r in range(self._c_rows)]
        with m.If(u_store | used):
            m.d.sync += [c[r].eq(c[r + 1]) for r in range(self._c_rows - 1)]
            m.d.sync += c[-1].eq(sum0)
        return Mux(add_c, c[0], 0)


class AccumulatorGroup(wiring.Component):
    """The contrast accumulators of up to two lanes in one block RAM with one adder.

    The core presents one contrast term per lane (``diff0``, ``diff1``: the
    product of the +ε bank minus that of the −ε bank, or the one-sided product)
    with ``valid`` at most every second cycle, together with the element index
    ``elem`` and per-lane write enables. The group reads lane 0's word in that
    cycle and lane 1's word in the next; each word is added to its term and
    written back ``read_latency`` cycles after its read: one read port, one write
    port, one adder, which the two lanes use on consecutive cycles.

    The update is always ``acc + diff`` (the core forms ``−product`` for the
    one-sided forward pass's −G(0)), wrapping to ``acc_width`` bits; ``overflow``
    pulses when an update wrapped — the operands' signs agree and the sum's
    differs — and the core keeps the sticky flag, so the flag matches
    :meth:`hel_fpga.sim.golden.GoldenCore._accumulate` update for update.

    Parameters
    ----------
    lanes : int
        Lanes sharing the memory (1 or 2).
    pipelined : bool
        ``False``: read-modify-write in two cycles (read; add + write), the
        smallest form, used on iCE40 where the 24 MHz clock leaves room for a
        block-RAM read and a 48-bit add in one cycle. ``True``: the read data is
        registered first (the block RAM's output register, or a fabric register
        right at the RAM), so the adder starts from a register — on ECP5 the
        DP16KD's clock-to-out (5.6 ns) plus a 56-bit carry chain plus the
        write-back do not fit 60 MHz in one cycle. The add's operand, enable and
        address are selected a cycle ahead (registers), and the overflow pulse is
        registered, so a stage holds just the carry chain. A word is then written
        two cycles after its read; a read in the same cycle as a write to the
        same address (the same element in two successive updates) gets the written
        value forwarded. No other write can be missed: with ``valid`` at most every
        second cycle, the write one cycle after a read always goes to the other
        lane's word.

    When ``ext`` is set the memory belongs to the readout/clear sequencers:
    ``ext_raddr`` (data in ``ext_rdata`` next cycle), ``ext_clear`` writes zero to
    ``ext_waddr``; the pipelined group registers these four inputs first, so its
    word comes (and its clear is written) a cycle later. ``busy`` covers every
    update (and overflow pulse) in flight.
    """

    def __init__(self, cfg: HelConfig, lanes: int, pipelined: bool = False):
        assert lanes in (1, 2)
        self.cfg = cfg
        self.lanes = lanes
        self.pipelined = pipelined
        g = LaneGeometry(cfg)
        self.depth = g.acc_depth
        aw = cfg.acc_width
        super().__init__({
            "valid": In(1), "elem": In(range(max(g.elems, 2))),
            "en0": In(1), "en1": In(1),
            "diff0": In(signed(g.diff_width)), "diff1": In(signed(g.diff_width)),
            "overflow": Out(1), "busy": Out(1),
            "ext": In(1), "ext_raddr": In(range(self.depth)), "ext_rdata": Out(signed(aw)),
            "ext_waddr": In(range(self.depth)), "ext_clear": In(1),
        })
        self._dw = g.diff_width
        self._gl = g.group_lanes

    def _addr(self, elem, lane):
        # address = elem · group_lanes + lane, as wiring (no multiplier)
        return Cat(Const(lane, 1), elem) if self._gl == 2 else elem

    def elaborate(self, platform):
        m = Module()
        aw = self.cfg.acc_width
        # A write never meets a read of its word whose data is used: the unpipelined
        # group writes a word the cycle after its read, when the other lane's word
        # (or nothing) is read; the pipelined group forwards the written word.
        mem = m.submodules.mem = Memory(shape=signed(aw), depth=self.depth, init=[],
                                        attrs=NO_RW_CHECK)
        rd = ram_read_port(m, mem, "rd")
        wr = mem.write_port()
        two = self.lanes == 2
        lat = 2 if self.pipelined else 1     # read to add
        # The readout/clear controls come from the core's control FSM, which lies far
        # from most groups on ECP5: the pipelined group registers them first, so
        # the decode and the routing across the die are in a cycle of their own
        # (a readout's word then comes a cycle later, a clear is written a cycle
        # later).
        if self.pipelined:
            ext = Signal(name="ext_r")
            ext_raddr = Signal.like(self.ext_raddr, name="ext_raddr_r")
            ext_waddr = Signal.like(self.ext_waddr, name="ext_waddr_r")
            ext_clear = Signal(name="ext_clear_r")
            m.d.sync += [ext.eq(self.ext), ext_raddr.eq(self.ext_raddr),
                         ext_waddr.eq(self.ext_waddr), ext_clear.eq(self.ext_clear)]
        else:
            ext, ext_raddr, ext_waddr, ext_clear = (self.ext, self.ext_raddr, self.ext_waddr,
                                                    self.ext_clear)

        # s1: the update presented last cycle (lane 1 reads its word now); s2 (pipelined).
        v1, e1, en0_1, en1_1 = Signal(), Signal.like(self.elem), Signal(), Signal()
        d0_1, d1_1 = Signal(signed(self._dw)), Signal(signed(self._dw))
        m.d.sync += [v1.eq(self.valid & ~ext), e1.eq(self.elem), en0_1.eq(self.en0),
                     en1_1.eq(self.en1), d0_1.eq(self.diff0), d1_1.eq(self.diff1)]
        if lat == 2:
            v2, e2, en1_2 = Signal(), Signal.like(self.elem), Signal()
            d1_2 = Signal(signed(self._dw))
            m.d.sync += [v2.eq(v1), e2.eq(e1), en1_2.eq(en1_1), d1_2.eq(d1_1)]
            # lane 0 adds two cycles after the presentation (source s1), lane 1 three (s2)
            src0 = (v1, en0_1, d0_1, self._addr(e1, 0))
            src1 = (v2, en1_2, d1_2, self._addr(e2, 1))
        else:
            src0 = (self.valid & ~ext, self.en0, self.diff0, self._addr(self.elem, 0))
            src1 = (v1, en1_1, d1_1, self._addr(e1, 1))

        # The add stage's operand, enable and address, selected a cycle ahead (the two
        # sources are never valid together: updates are at least two cycles apart).
        add_v, add_en = Signal(), Signal()
        add_d = Signal(signed(self._dw))
        add_addr = Signal(range(self.depth))
        sel1 = src1[0] if two else Const(0)
        m.d.sync += [add_v.eq(src0[0] | sel1),
                     add_en.eq(Mux(sel1, src1[1], src0[0] & src0[1])),
                     add_d.eq(Mux(sel1, src1[2], src0[2])),
                     add_addr.eq(Mux(sel1, src1[3], src0[3]))]

        if lat == 2:
            base = Signal(signed(aw))      # the word read two cycles ago, or a forwarded write
            fwd = Signal()
            wlast = Signal(signed(aw))
            m.d.sync += [fwd.eq(wr.en & (wr.addr == rd.addr)), wlast.eq(wr.data),
                         base.eq(Mux(fwd, wlast, rd.data))]
        else:
            base = rd.data
        new = Signal(signed(aw))
        m.d.comb += new.eq(base + add_d)
        wrapped = Signal()   # |diff| < 2^(aw-1): a wrap is a sign flip against equal signs
        m.d.comb += wrapped.eq((base[-1] == add_d[-1]) & (new[-1] != base[-1]))
        ovf = Signal()
        if lat == 2:
            ovf_v = Signal()
            m.d.sync += [ovf.eq(add_en & wrapped & ~ext), ovf_v.eq(add_v)]
            m.d.comb += self.busy.eq(v1 | v2 | add_v | ovf_v)
        else:
            m.d.comb += [ovf.eq(add_en & wrapped & ~ext), self.busy.eq(v1 | add_v)]
        m.d.comb += self.overflow.eq(ovf)

        m.d.comb += self.ext_rdata.eq(rd.data)
        with m.If(ext):
            m.d.comb += [rd.addr.eq(ext_raddr), wr.addr.eq(ext_waddr), wr.data.eq(0),
                         wr.en.eq(ext_clear)]
        with m.Else():
            with m.If(self.valid):
                m.d.comb += rd.addr.eq(self._addr(self.elem, 0))
            if two:
                with m.Elif(v1):
                    m.d.comb += rd.addr.eq(self._addr(e1, 1))
            m.d.comb += [wr.addr.eq(add_addr), wr.data.eq(new), wr.en.eq(add_en)]
        return m
