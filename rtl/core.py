"""The HEL core: forward and echo dynamics as fixed-point hardware, bit-exact with
:class:`hel_fpga.sim.golden.GoldenCore`.

Interface
---------
:class:`HELCore` is a ``wiring.Component`` built from a :class:`hel_fpga.spec.formats.HelConfig`
(``P = cfg.lanes`` MAC lanes). Commands arrive on ``cmd`` (one at a time, accepted
only while idle); each produces exactly one ``done`` word. Data moves on
``amaranth.lib.stream`` streams with full handshakes in both directions:

========== ===== ======================= =====================================================
member     dir   payload                 use
========== ===== ======================= =====================================================
cmd        In    :data:`CmdLayout`       ``op`` (:class:`Op`), ``length``, ``one_sided``, ``kick``,
                                         ``bank``, ``seed``
done       Out   :data:`DoneLayout`      ``result`` (:class:`Result`), ``selftest_pass``
params_in  In    signed(operand_width)   WRITE_PARAMS: W (M×N), B (M×K), b (M), α (N)
params_out Out   signed(operand_width)   READ_PARAMS, same order
inputs     In    signed(operand_width)   LOAD: T·K words, row-major (T×K)
outputs    Out   signed(state_width)     FORWARD: Q[N−O:] after every step (T·O words)
nudges     In    signed(state_width)     ECHO: T·O words in echo order (O with ``kick``)
acc_out    Out   signed(acc_width)       READ_ACC: W, B, b, α accumulators
state_out  Out   signed(state_width)     READ_STATE: Q (N) then Wv (N) of ``bank``
busy       Out   1                       a command is being executed
state_overflow, acc_overflow  Out 1      sticky wrap flags (as GoldenCore's)
========== ===== ======================= =====================================================

Two fields go beyond the brief's interface, for the command unit: ``skip``
transfers a subset of the parameter arrays (WRITE/READ_PARAMS of the remaining
arrays in canonical order; GoldenCore.write_params takes any subset), and
``no_acc`` repeats a one-sided FORWARD (same outputs, fwd bank and one-sided
mode) without subtracting G(0) a second time, for protocol retransmissions.

Results: ``OK``; ``WRONG_STATE`` exactly where GoldenCore raises StateError
(FORWARD with nothing loaded; ECHO without a FORWARD of the loaded sequence);
``BAD_ARG`` where GoldenCore raises FormatError/KeyError on a command argument
(LOAD length outside 1..t_max, SELFTEST with 0 steps, READ_STATE bank 3, an
unknown op). On any error nothing changes and no stream word is consumed.
(``BAD_ARG`` is an addition to the two results of the brief: without it a bad
LOAD length would have to be silently clamped or hang waiting for words.)

Schedule of one step
--------------------
The step is three phases on the P multiplier lanes (see :mod:`hel_fpga.rtl.mac` for the
banking); in centred echo every weight read serves both banks on two
consecutive cycles (the read port holds its data), so each phase takes twice
as long with the same P multipliers:

* **U** (inputs, only for ``P ≥ 8`` when the K input columns would add a
  mostly empty chunk to every z row — :attr:`LaneGeometry.u_mode`):
  ``⌈M/P⌉·K`` slots, lane ``p`` sums ``c_j = Σ_k B_jk u_k`` for rows ``j ≡ p``;
  ``c_j`` waits in a register per row. Issued while the previous step drains.
* **A** (z): ``M·RA`` slots. All lanes multiply row ``j`` chunk ``r`` of ``[W|B]``
  (of ``W`` in u_mode) by ``[qo|u]``; a pipelined adder tree and an accumulator
  (initialised with ``b_j·2^OF`` (+ ``c_j``)) form ``z_j``; the tanh unit turns it
  into ``a_j`` (a small memory, one word per bank).
* **C** (contrast, one-sided forward and echo only): ``2·(M·RC + RN)`` slots, two
  products per accumulator element (the ±ε banks, or the one bank and a zero).
  Starts as soon as ``a_0`` exists (interlock on the count of finished ``a``).
* **B** (force): ``RN·LB`` slots. Lane ``p`` sums ``F_i = α_i qo_i + Σ_j W_ji a_j``
  for its oscillator ``i = rP + p`` over ``j`` — again reading only its bank.
  Finished sums go to a per-lane kick register and from there, one oscillator
  per cycle, through the serial **state unit**, which reads ``(Q, Wv)``, applies
  the kick and both half drifts, adds the next step's nudge, writes the state
  back, emits outputs and computes the next step's operand ``qo`` — so the
  state of all three banks lives in one block RAM, never in registers.

A step waits for the previous one to drain (its last oscillators' new ``qo``);
that fixed drain of about ``nb·P + 9`` cycles plus unused lanes in the last
chunk of a row is the overhead over ``MACs / P``. Multiplier count is exactly
``P``; the tanh interpolation has its own small multiplier (not a MAC).

Every wrap of the state (half drifts, kick, nudge, flip) and of an accumulator
sets the sticky flag at the same operations as the golden model.
"""

from __future__ import annotations

from types import SimpleNamespace

from amaranth.hdl import (Cat, ClockSignal, Const, Instance, Module, Mux, Signal, Value, signed,
                          unsigned)
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from hel_fpga.rtl.bram import NO_RW_CHECK, ram_read_port
from hel_fpga.spec.formats import HelConfig
from hel_fpga.rtl.mac import AccumulatorGroup, LaneGeometry, MacLane
from hel_fpga.rtl.tanh import TanhUnit, saturate_signed
from hel_fpga.spec.names import MIX32_FINAL_SHIFT, MIX32_ROUNDS

__all__ = ["HELCore", "Op", "Result", "CmdLayout", "DoneLayout", "Mix32", "Mix32Serial", "SequenceBuffer"]


class Op(enum.Enum, shape=4):
    WRITE_PARAMS = 0
    READ_PARAMS = 1
    LOAD = 2
    FORWARD = 3
    ECHO = 4
    READ_ACC = 5
    CLEAR_ACC = 6
    READ_STATE = 7
    CLEAR_FLAGS = 8
    SELFTEST = 9


class Result(enum.Enum, shape=2):
    OK = 0
    WRONG_STATE = 1
    BAD_ARG = 2


CmdLayout = data.StructLayout({
    "op": Op,
    "length": unsigned(32),     # LOAD: T; SELFTEST: steps
    "one_sided": unsigned(1),   # FORWARD: accumulate −G(0) for a one-sided echo
    "kick": unsigned(1),        # ECHO: one nudge row (HEB) instead of T rows
    "bank": unsigned(2),        # READ_STATE: 0 fwd, 1 pos, 2 neg
    "seed": unsigned(32),       # SELFTEST
    "skip": unsigned(4),        # WRITE/READ_PARAMS: bit i set = leave PARAM_NAMES[i] out
    "no_acc": unsigned(1),      # FORWARD: accumulate nothing, even when one_sided
})

DoneLayout = data.StructLayout({
    "result": Result,
    "selftest_pass": unsigned(1),
})

_PH_A, _PH_B, _PH_C, _PH_U = 0, 1, 2, 3
_FWD_NONE, _FWD_CENTRED, _FWD_ONE = 0, 1, 2


def _device(platform) -> str:
    """The platform's device name in capitals ("" without a platform, e.g. in simulation)."""
    return str(getattr(platform, "device", "") or "").upper()


class _Mix32Ports(wiring.Component):
    """The ports both forms of the self-test generator share: an argument ``x`` is
    taken when ``valid & ready``; ``y`` comes later with ``y_valid`` and the
    argument's ``tag``. ``ROUNDS`` are :func:`hel_fpga.spec.names.mix32`'s (s, m) pairs:
    ``x ^= x >> s`` then ``x += x << m``, and a final ``x ^= x >> MIX32_FINAL_SHIFT``."""

    ROUNDS = MIX32_ROUNDS

    def __init__(self, tag_width: int = 1):
        self.tag_width = tag_width
        super().__init__({"x": In(32), "valid": In(1), "tag": In(tag_width), "ready": Out(1),
                          "y": Out(32), "y_valid": Out(1), "y_tag": Out(tag_width)})


class Mix32(_Mix32Ports):
    """:func:`hel_fpga.spec.names.mix32` as a 3-stage pipeline (one add per stage).

    Takes an argument every cycle (``ready`` is always high); ``y`` follows
    ``LATENCY`` cycles later with ``y_valid`` and the argument's ``tag``.
    """

    LATENCY = 3

    def elaborate(self, platform):
        m = Module()
        M32 = 0xFFFF_FFFF

        def xs(v, s):
            return v ^ (v >> s)

        stage = self.x
        for i, ((sh, mul), name) in enumerate(zip(self.ROUNDS, "abc")):   # a stage a round
            a = Signal(32, name=name)
            r = Signal(32, name=f"s{i + 1}")
            m.d.comb += a.eq(xs(stage, sh))
            m.d.sync += r.eq((a + (a << mul)) & M32)
            stage = r
        m.d.comb += self.y.eq(xs(stage, MIX32_FINAL_SHIFT))
        v = [Signal(name=f"v{i}") for i in range(3)]
        t = [Signal(self.tag_width, name=f"t{i}") for i in range(3)]
        m.d.sync += [v[0].eq(self.valid), t[0].eq(self.tag)]
        for i in (1, 2):
            m.d.sync += [v[i].eq(v[i - 1]), t[i].eq(t[i - 1])]
        m.d.comb += [self.y_valid.eq(v[2]), self.y_tag.eq(t[2]), self.ready.eq(1)]
        return m


class Mix32Serial(_Mix32Ports):
    """:func:`hel_fpga.spec.names.mix32` bit-serially: one argument per 97 cycles, ~80 logic cells.

    The self-test generator needs K words per step, a step takes hundreds of
    cycles with few lanes, so on iCE40 the three 32-bit add-shift rounds of
    :class:`Mix32` (about 230 logic cells) are one full adder run LSB first.
    Each round ``r = a + (a << m)``, ``a = x ^ (x >> s)``, takes 32 cycles: ``x``
    shifts right one bit a cycle (so ``x >> s`` is a fixed tap, masked once the
    result bits that enter at the top reach it), the last ``m`` bits of ``a`` wait
    in a short shift register, and the sum bit enters ``x`` at the top; after 32
    cycles ``x`` holds the round's result. ``y = x ^ (x >> MIX32_FINAL_SHIFT)`` is combinational.

    Same ports as :class:`Mix32`; an argument is taken when ``valid & ready``,
    ``y`` is valid (``y_valid``, with the argument's ``tag``) 97 cycles later.
    """

    def elaborate(self, platform):
        m = Module()
        hist_len = max(mm for _, mm in self.ROUNDS)
        x = Signal(32)
        busy = Signal()
        rnd = Signal(range(len(self.ROUNDS)))
        i = Signal(5)
        carry = Signal()
        hist = Signal(hist_len)        # hist[k] = the bit of a from k + 1 cycles ago
        y_valid = Signal()
        tag = Signal(self.tag_width)
        m.d.comb += [self.ready.eq(~busy), self.y.eq(x ^ (x >> MIX32_FINAL_SHIFT)),
                     self.y_valid.eq(y_valid), self.y_tag.eq(tag)]

        xs_bit = Signal()    # bit i + s of the round's input (0 beyond bit 31)
        am_bit = Signal()    # bit i − m of a (0 below bit 0: hist starts cleared)
        with m.Switch(rnd):
            for r, (s, mm) in enumerate(self.ROUNDS):
                with m.Case(r):
                    m.d.comb += [xs_bit.eq(x[s] & (i < 32 - s)), am_bit.eq(hist[mm - 1])]
        a = Signal()
        m.d.comb += a.eq(x[0] ^ xs_bit)
        m.d.sync += y_valid.eq(0)
        with m.If(~busy):
            with m.If(self.valid):
                m.d.sync += [x.eq(self.x), busy.eq(1), rnd.eq(0), i.eq(0), carry.eq(0),
                             hist.eq(0), tag.eq(self.tag)]
        with m.Else():
            m.d.sync += [x.eq(Cat(x[1:], a ^ am_bit ^ carry)),
                         carry.eq((a & am_bit) | (carry & (a ^ am_bit))),
                         hist.eq(Cat(a, hist[:-1])), i.eq(i + 1)]
            with m.If(i == 31):
                m.d.sync += [carry.eq(0), hist.eq(0), rnd.eq(rnd + 1)]
                with m.If(rnd == len(self.ROUNDS) - 1):
                    m.d.sync += [busy.eq(0), y_valid.eq(1)]
        return m


class SequenceBuffer(wiring.Component):
    """The input sequence buffer: one address, write or read (1-cycle read latency).

    Block RAM (:class:`amaranth.lib.memory.Memory`) or an iCE40UP
    ``SB_SPRAM256KA`` (16K × 16, single port; the core never reads and writes it
    in the same cycle). Words are stored in the low ``width`` bits.
    """

    def __init__(self, depth: int, width: int, spram: bool):
        self.depth, self.width, self.spram = depth, width, spram
        super().__init__({"addr": In(range(max(depth, 2))), "wdata": In(signed(width)),
                          "we": In(1), "rdata": Out(signed(width))})

    def elaborate(self, platform):
        m = Module()
        if self.spram:
            raw = Signal(16)
            addr, din = Signal(14), Signal(16)
            m.d.comb += [addr.eq(self.addr), din.eq(self.wdata.as_unsigned())]
            m.submodules.spram = Instance(
                "SB_SPRAM256KA",
                i_ADDRESS=addr, i_DATAIN=din, i_MASKWREN=Const(0b1111, 4), i_WREN=self.we,
                i_CHIPSELECT=Const(1), i_CLOCK=ClockSignal(), i_STANDBY=Const(0),
                i_SLEEP=Const(0), i_POWEROFF=Const(1), o_DATAOUT=raw)
            m.d.comb += self.rdata.eq(raw[:self.width].as_signed())
        else:
            mem = m.submodules.mem = Memory(shape=signed(self.width), depth=self.depth, init=[],
                                            attrs=NO_RW_CHECK)   # read disabled while writing
            rd, wr = ram_read_port(m, mem, "rd"), mem.write_port()
            m.d.comb += [rd.addr.eq(self.addr), wr.addr.eq(self.addr), wr.data.eq(self.wdata),
                         wr.en.eq(self.we), rd.en.eq(~self.we), self.rdata.eq(rd.data)]
        return m


def _param_word(m, walk, pr, br, name):
    """READ_PARAMS: the word ``walk`` addresses, from its lane's parameter memory
    (read port ``pr[lane]``, selected into a signal called ``name``) or from b's (``br``)."""
    lane_word = Signal.like(pr[0].data, name=name)
    with m.Switch(walk.lane):
        for p, port in enumerate(pr):
            with m.Case(p):
                m.d.comb += lane_word.eq(port.data)
    return Mux(walk.is_b, br.data, lane_word)


def _wrap(m, expr, width, name):
    """Two's-complement wrap of ``expr`` to ``width`` bits and whether it wrapped
    (the bits from ``width − 1`` up are not all equal: no wide comparison)."""
    expr = Value.cast(expr)
    full = Signal(signed(max(len(expr), width + 1)), name=name + "_full")
    m.d.comb += full.eq(expr)
    w = Signal(signed(width), name=name)
    m.d.comb += w.eq(full[:width])
    top = full[width - 1:]
    ovf = Signal(name=name + "_ovf")
    m.d.comb += ovf.eq(~((top == 0) | (top == (1 << len(top)) - 1)))
    return w, ovf


class _Shared(SimpleNamespace):
    """The signals, memory ports and units that one section of :meth:`HELCore.elaborate`
    makes and later sections use (each builder adds its own)."""


class HELCore(wiring.Component):
    """The HEL core (see the module docstring for interface and schedule).

    Parameters
    ----------
    cfg : HelConfig
        Shapes, formats and ``lanes`` (P, the number of multipliers).
    seq_ram : str
        Where the input sequence buffer lives: ``"block"`` (block RAM), ``"spram"``
        (an iCE40UP ``SB_SPRAM256KA``, 16K × 16 bits: operands ≤ 16 bits,
        t_max·K ≤ 16384) or ``"auto"`` (SPRAM when elaborated for an iCE40 UP
        platform and it fits, else block RAM). Amaranth memories always carry an
        initial value, which SPRAM cannot have, so Yosys never infers it; on the
        iCE40UP5K it saves a block RAM per 256 words (8 at t_max = 1024, K = 2).
    compact : bool or None
        The smallest form, for iCE40 (slow clock, scarce logic cells): the
        accumulator groups' read-modify-write in two cycles instead of the
        pipelined form (:class:`hel_fpga.rtl.mac.AccumulatorGroup` ``pipelined``: the
        block-RAM read and the wide add in separate stages, for ECP5 at 60 MHz),
        the bit-serial self-test generator (:class:`Mix32Serial`, 97 cycles
        per word, instead of :class:`Mix32`), and the state unit's adders and the
        READ_PARAMS words fed straight from their memories (not from a register
        after them: one cycle less per step, and per word read). ``None``:
        compact when elaborated for an iCE40 platform. Results and interface are
        the same either way.

    Attributes
    ----------
    geometry : LaneGeometry
        Banking and schedule lengths.
    step_strobe : Signal
        Pulses when a step's first product is issued (for benchmarks; not a port).
    probes : dict
        Internal memories and signals for simulation tests, filled by ``elaborate``
        (``pmem``, ``bmem``, ``xmem``, ``amem``, ``smem``, ``u``, ``k_valid``/``k_i``/``k_kick``/``k_slot``:
        rounded kicks (finished force sums) entering the state unit, ``z_valid``/``z_out``,
        ``a_valid``/``a``/``a_tag``: activations written, tag = bank | j << 1).
    """

    def __init__(self, cfg: HelConfig, seq_ram: str = "auto", compact: bool | None = None):
        if seq_ram not in ("auto", "block", "spram"):
            raise ValueError(f"seq_ram must be 'auto', 'block' or 'spram', got {seq_ram!r}")
        self.cfg = cfg
        self.seq_ram = seq_ram
        self.compact = compact
        self.geometry = LaneGeometry(cfg)
        ow, sw, aw = cfg.operand_width, cfg.state_width, cfg.acc_width
        super().__init__({
            "cmd": In(stream.Signature(CmdLayout)),
            "done": Out(stream.Signature(DoneLayout)),
            "params_in": In(stream.Signature(signed(ow))),
            "params_out": Out(stream.Signature(signed(ow))),
            "inputs": In(stream.Signature(signed(ow))),
            "outputs": Out(stream.Signature(signed(sw))),
            "nudges": In(stream.Signature(signed(sw))),
            "acc_out": Out(stream.Signature(signed(aw))),
            "state_out": Out(stream.Signature(signed(sw))),
            "busy": Out(1),
            "state_overflow": Out(1),
            "acc_overflow": Out(1),
        })
        self.step_strobe = Signal()
        self.probes: dict = {}

    def _use_spram(self, platform) -> bool:
        cfg = self.cfg
        fits = cfg.operand_width <= 16 and cfg.t_max * cfg.k <= 16384
        if self.seq_ram == "spram":
            if not fits:
                raise ValueError("the sequence buffer does not fit one SB_SPRAM256KA "
                                 "(needs operand_width ≤ 16 and t_max·k ≤ 16384)")
            return True
        if self.seq_ram == "block":
            return False
        return fits and _device(platform).startswith("ICE40UP")

    def _is_compact(self, platform) -> bool:
        if self.compact is not None:
            return self.compact
        return _device(platform).startswith("ICE40")

    # ------------------------------------------------------------------------------
    def elaborate(self, platform):
        """The core, section by section in datapath order (each builder's docstring
        says what it makes); the sections share their signals through ``s``."""
        m = Module()
        s = _Shared(compact=self._is_compact(platform))
        self._build_memories(m, s, platform)
        self._build_units(m, s)
        self._build_nudge_buffer(m, s)
        self._build_flags(m, s)
        self._build_command_registers(m, s)
        self._build_issue_signals(m, s)
        self._build_operand_select(m, s)
        self._build_force_controls(m, s)
        self._build_input_products(m, s)
        self._build_z_path(m, s)
        self._build_contrast(m, s)
        self._build_kick_serializer(m, s)
        self._build_state_unit(m, s)
        self._build_input_loader(m, s)
        self._build_drain_detect(m, s)
        self._build_stream_counters(m, s)
        self._build_control(m, s)

        # After the control FSM, so that these take priority over its assignments.
        with m.If(s.tanh.a_valid):
            m.d.sync += s.a_count.eq(s.a_count + 1)

        self.probes.update(pmem=s.pmem, bmem=s.bmem, xmem=s.xmem, amem=s.amem, smem=s.smem,
                           u=s.u_cur, k_valid=s.k_valid, k_i=s.k_i, k_kick=s.k_kick,
                           k_slot=s.k_slot, z_valid=s.z_valid, z_out=s.z_out,
                           a_valid=s.tanh.a_valid, a=s.tanh.a, a_tag=s.a_tag)
        # the b memory is read ahead of the z adder (the walker owns it in RPARAM)
        with m.If(s.b_tag.valid & (s.b_tag.phase == _PH_A)):
            m.d.comb += s.br.addr.eq(s.b_tag.j)

        return m

    # ---------------------------------------------------------------- memories and units
    def _build_memories(self, m, s, platform):
        """The parameter (``pmem``, one per lane), b, operand (``xmem``, one per lane),
        activation, state and sequence memories and their ports.

        None of them needs a defined read of a word in the cycle it is written
        (NO_RW_CHECK): parameters are written only by WRITE_PARAMS; an operand (x)
        row is rewritten after the last read of the old operand and read again only
        after the step drains; an activation is read only once its row is counted
        finished; the state unit writes an oscillator three (pipelined: four) ops
        after reading it (and a step starts only when the previous one has
        drained). Where a read and a write do meet, the read is an idle or stalled
        one whose data is unused.
        """
        cfg, g = self.cfg, self.geometry
        P, N, M, RN = g.p, cfg.n, cfg.m, g.rn
        ow, sw = cfg.operand_width, cfg.state_width
        pmem = [Memory(shape=signed(ow), depth=g.param_depth, init=[], attrs=NO_RW_CHECK)
                for _ in range(P)]
        bmem = Memory(shape=signed(ow), depth=M, init=[], attrs=NO_RW_CHECK)
        seqbuf = SequenceBuffer(cfg.t_max * cfg.k, ow, self._use_spram(platform))
        xmem = [Memory(shape=signed(ow), depth=2 * RN, init=[], attrs=NO_RW_CHECK)
                for _ in range(P)]
        amem = Memory(shape=signed(ow), depth=2 * M, init=[], attrs=NO_RW_CHECK)
        smem = Memory(shape=unsigned(2 * sw), depth=3 * N, init=[], attrs=NO_RW_CHECK)
        for p in range(P):
            m.submodules[f"pmem{p}"] = pmem[p]
            m.submodules[f"xmem{p}"] = xmem[p]
        m.submodules.bmem = bmem
        m.submodules.seqbuf = seqbuf
        m.submodules.amem = amem
        m.submodules.smem = smem
        s.pmem, s.bmem, s.xmem, s.amem, s.smem, s.seqbuf = pmem, bmem, xmem, amem, smem, seqbuf
        s.pr = [ram_read_port(m, pm, f"pr{p}") for p, pm in enumerate(pmem)]
        s.pw = [pm.write_port() for pm in pmem]
        br, bw = ram_read_port(m, bmem, "br"), bmem.write_port()
        s.xr = [ram_read_port(m, xm, f"xr{p}") for p, xm in enumerate(xmem)]
        s.xw = [xm.write_port() for xm in xmem]
        ar, aw_ = ram_read_port(m, amem, "ar"), amem.write_port()
        sr, swp = ram_read_port(m, smem, "sr"), smem.write_port()
        s.br, s.bw, s.ar, s.aw_, s.sr, s.swp = br, bw, ar, aw_, sr, swp

    def _build_units(self, m, s):
        """The P MAC lanes, the accumulator groups, the tanh unit, the self-test
        generator and the outputs FIFO."""
        cfg, g = self.cfg, self.geometry
        P, K, O, GL = g.p, cfg.k, cfg.o, g.group_lanes
        # one lane: the serializer takes the force sums straight from the running sums
        # and the kick's rounding half is the force sums' initial value (f_bias)
        ks = cfg.kick_shift
        lanes = [MacLane(cfg, kick_regs=P > 1, f_bias=(1 << (ks - 1)) if ks > 0 else 0)
                 for _ in range(P)]
        for p in range(P):
            m.submodules[f"lane{p}"] = lanes[p]
        groups = [AccumulatorGroup(cfg, lanes=min(GL, P - q * GL), pipelined=not s.compact)
                  for q in range(g.groups)]
        for q, grp in enumerate(groups):
            m.submodules[f"accgroup{q}"] = grp
        s.lanes, s.groups = lanes, groups
        s.tanh = m.submodules.tanh = TanhUnit(cfg, g.z_width, z_biased=True)
        s.mix = m.submodules.mix = (Mix32Serial if s.compact else Mix32)(
            tag_width=max(1, ceil_log2(K + 1)))
        # One row of outputs: a single register when O = 1; else O + 1 words, because
        # SyncFIFOBuffered moves a word from its memory to its output register before
        # the memory takes the O-th of O back-to-back writes.
        s.fifo_depth = 1 if O == 1 else O + 1
        s.ofifo = m.submodules.ofifo = SyncFIFOBuffered(width=cfg.state_width, depth=s.fifo_depth)

    def _build_nudge_buffer(self, m, s):
        """Nudges: with O = 1 the row waits in the stream source itself (a stream holds
        its payload until ready) and is taken when the state unit has used it for
        both banks; else it waits in a FIFO of one row."""
        O, sw = self.cfg.o, self.cfg.state_width
        n_accept = Signal()          # nudge rows are still to come
        nu_have = Signal()           # a row (O words) is available
        nu_take = Signal()           # the state unit is done with the row's next word
        nu = Signal(signed(sw))
        if O == 1:
            m.d.comb += [nu.eq(self.nudges.payload), nu_have.eq(self.nudges.valid & n_accept),
                         self.nudges.ready.eq(nu_take & n_accept)]
        else:
            nfifo = m.submodules.nfifo = SyncFIFOBuffered(width=sw, depth=s.fifo_depth)
            m.d.comb += [nfifo.w_data.eq(self.nudges.payload),
                         nfifo.w_en.eq(self.nudges.valid & n_accept),
                         self.nudges.ready.eq(nfifo.w_rdy & n_accept),
                         nu.eq(nfifo.r_data.as_signed()), nfifo.r_en.eq(nu_take),
                         nu_have.eq(nfifo.level >= O)]
        s.n_accept, s.nu_have, s.nu_take, s.nu = n_accept, nu_have, nu_take, nu

    # ---------------------------------------------------------------- status and command
    def _build_flags(self, m, s):
        """The sticky wrap flags: set by any wrap of this cycle (``state_ovf_set``,
        ``acc_ovf_set``), cleared by CLEAR_FLAGS (both) and CLEAR_ACC (accumulators)."""
        state_ovf = Signal()
        acc_ovf = Signal()
        m.d.comb += [self.state_overflow.eq(state_ovf), self.acc_overflow.eq(acc_ovf)]
        state_ovf_set = Signal()     # OR of this cycle's state wraps
        acc_ovf_set = Signal()
        clear_flags = Signal()
        clear_acc_flag = Signal()
        with m.If(clear_flags):
            m.d.sync += [state_ovf.eq(0), acc_ovf.eq(0)]
        with m.Else():
            with m.If(state_ovf_set):
                m.d.sync += state_ovf.eq(1)
            with m.If(clear_acc_flag):
                m.d.sync += acc_ovf.eq(0)
            with m.Elif(acc_ovf_set):
                m.d.sync += acc_ovf.eq(1)
        s.state_ovf_set, s.acc_ovf_set = state_ovf_set, acc_ovf_set
        s.clear_flags, s.clear_acc_flag = clear_flags, clear_acc_flag

    def _build_command_registers(self, m, s):
        """The latched command, the result, what LOAD and FORWARD leave for later
        commands, the engine's mode and the count of steps still to run."""
        cfg = self.cfg
        seq_depth = cfg.t_max * cfg.k
        s.c_op = Signal(Op)
        s.c_len = Signal(32)
        s.c_one = Signal()
        s.c_kick = Signal()
        s.c_bank = Signal(2)
        s.c_seed = Signal(32)
        s.c_skip = Signal(4)
        s.res = Signal(Result)
        s.st_pass = Signal()
        s.loaded_len = Signal(range(cfg.t_max + 1))
        s.seq_last_base = Signal(range(max(seq_depth, 2)))
        s.fwd_mode = Signal(2)

        # engine mode
        s.e_out = Signal()     # FORWARD: emit outputs
        s.e_echo = Signal()    # echo of a FORWARD: pos/neg banks, nudges
        s.e_st = Signal()      # SELFTEST
        s.e_st_echo = Signal()  # SELFTEST, second half
        s.e_nb2 = Signal()     # two working banks (centred echo)
        s.e_acc = Signal()     # contrast phase C
        s.e_one = Signal()     # one-sided FORWARD (the next echo is one-sided)
        s.e_sub = Signal()     # C subtracts (one-sided forward): product in the −ε slot
        s.e_kick = Signal()
        s.e_flip = Signal()    # pre-step flips (else zeroes) the state
        remaining = Signal(32)  # steps after the current one
        has_next = Signal()
        m.d.comb += has_next.eq(remaining != 0)
        # one decrementer: a pass starts with (SELFTEST length or loaded T) − 1 steps
        # to follow (set when PRE hands over), and each step takes one off
        rem_load = Signal()
        rem_dec = Signal()
        rem_next = Signal(32)
        m.d.comb += rem_next.eq(Mux(rem_load, Mux(s.e_st, s.c_len, s.loaded_len), remaining) - 1)
        with m.If(rem_load | rem_dec):
            m.d.sync += remaining.eq(rem_next)
        s.has_next, s.rem_load, s.rem_dec = has_next, rem_load, rem_dec

    # ---------------------------------------------------------------- issue stage (S0)
    def _build_issue_signals(self, m, s):
        """The slot tags (``tag0`` issued in S0, ``tag1``…``tag3`` its copies a stage
        later each), the lane memories' read addresses the control FSM drives in S0,
        its slot counters, the count of finished activations, and the current inputs
        ``u_cur``."""
        cfg, g = self.cfg, self.geometry
        M, K, RA, LB, RMAX = cfg.m, cfg.k, g.ra, g.lb, g.rmax
        ow = cfg.operand_width
        s.tag_layout = data.StructLayout({
            "valid": 1, "phase": 2, "sub": 1, "r": range(max(RMAX, 2)), "j": range(M + 1),
            "first": 1, "last": 1, "jm": 1,
        })
        tag0 = Signal(s.tag_layout)
        tag1 = Signal(s.tag_layout)
        tag2 = Signal(s.tag_layout)
        tag3 = Signal(s.tag_layout)
        m.d.sync += [tag1.eq(tag0), tag2.eq(tag1), tag3.eq(tag2)]
        s.tag0, s.tag1, s.tag2, s.tag3 = tag0, tag1, tag2, tag3
        s.p_addr = Signal(range(max(g.param_depth, 2)))
        s.p_en = Signal()
        s.x_addr = Signal(range(max(2 * g.rn, 2)))
        s.a_addr = Signal(range(max(2 * M, 2)))
        s.issue_mode = Signal()   # the engine drives the lane memories' read ports
        s.i_sub = Signal()
        s.i_r = Signal(range(max(RMAX, 2)))
        s.i_j = Signal(range(M + 1))
        s.i_t = Signal(range(LB + 1))
        s.i_pbase = Signal(range(g.param_depth + RA + 1))
        s.i_bptr = Signal(range(g.param_depth + RA + 1))
        # Activations written this step. They come in issue order — (bank 0, row 0),
        # (bank 1, row 0), (0, 1), … — so the count is also the a memory's address
        # (2j + bank in centred echo, else j) and, halved in centred echo, the
        # number of finished rows the contrast and force phases wait for.
        a_count = Signal(range(2 * M + 1))
        a_rows = Signal(range(M + 1))
        m.d.comb += a_rows.eq(Mux(s.e_nb2, a_count >> 1, a_count))
        s.a_count, s.a_rows = a_count, a_rows
        s.u_dec = Signal()     # leaving the U phase starts the next step (not the first)
        nb_last = Signal()   # sub value of the last working bank
        m.d.comb += nb_last.eq(s.e_nb2)
        s.nb_last = nb_last

        s.u_cur = [Signal(signed(ow), name=f"u{k}") for k in range(K)]

    # ---------------------------------------------------------------- S1: operands
    def _build_operand_select(self, m, s):
        """S1: each lane's two operands for the slot in ``tag1``, by phase: A weight ×
        x (qo, u or 0), B weight × qo or activation, U weight × input, C activation ×
        x (or qo², or zeros for the single bank's unused slot)."""
        cfg, g = self.cfg, self.geometry
        P, N, K, RMAX = g.p, cfg.n, cfg.k, g.rmax
        ow = cfg.operand_width
        pr, xr, ar, tag1, u_cur = s.pr, s.xr, s.ar, s.tag1, s.u_cur
        for p in range(P):
            with m.If(s.issue_mode):
                m.d.comb += [pr[p].addr.eq(s.p_addr), pr[p].en.eq(s.p_en)]
            m.d.comb += xr[p].addr.eq(s.x_addr)
        m.d.comb += ar.addr.eq(s.a_addr)

        u_sel = Signal(signed(ow))    # U phase: input k = tag1.r, the same for every lane
        with m.Switch(tag1.r):
            for k in range(K):
                with m.Case(k):
                    m.d.comb += u_sel.eq(u_cur[k])
        for p in range(P):
            lane = s.lanes[p]
            xq = xr[p].data
            xval = Signal(signed(ow), name=f"xval{p}")
            xq_m = Signal(signed(ow), name=f"xqm{p}")
            with m.Switch(tag1.r):
                for r in range(RMAX):
                    c = r * P + p
                    with m.Case(r):
                        if c < N:
                            m.d.comb += [xval.eq(xq), xq_m.eq(xq)]
                        elif c < N + K:
                            if g.u_mode:   # the z rows have no input columns then
                                m.d.comb += xval.eq(Mux(tag1.phase == _PH_C, u_cur[c - N], 0))
                            else:
                                m.d.comb += xval.eq(u_cur[c - N])
                        elif c == N + K:
                            m.d.comb += xval.eq(tag1.phase == _PH_C)
            # single bank: one contrast slot is zero — the −ε slot (diff = +product), or,
            # to accumulate −G(0) in a one-sided forward, the +ε slot (diff = −product),
            # so the accumulator only ever adds
            zero_sub = Signal(name=f"zsub{p}")
            m.d.comb += zero_sub.eq((tag1.phase == _PH_C) & ~s.e_nb2 & (tag1.sub != s.e_sub))
            with m.Switch(tag1.phase):
                with m.Case(_PH_A):
                    m.d.comb += [lane.a.eq(pr[p].data), lane.b.eq(xval)]
                with m.Case(_PH_B):
                    m.d.comb += [lane.a.eq(pr[p].data), lane.b.eq(Mux(tag1.first, xq, ar.data))]
                with m.Case(_PH_U):
                    m.d.comb += [lane.a.eq(pr[p].data), lane.b.eq(u_sel)]
                with m.Case(_PH_C):
                    with m.If(zero_sub):
                        m.d.comb += [lane.a.eq(0), lane.b.eq(0)]
                    with m.Elif(tag1.jm):
                        m.d.comb += [lane.a.eq(xq_m), lane.b.eq(xq_m)]
                    with m.Else():
                        m.d.comb += [lane.a.eq(ar.data), lane.b.eq(xval)]

    # ---------------------------------------------------------------- S3: force sums
    def _build_force_controls(self, m, s):
        """The lanes' force-sum controls, for the products of phases B and U (the lanes
        take them a stage ahead, from ``tag2``, and register them)."""
        tag2 = s.tag2
        in_b = tag2.phase == _PH_B
        for lane in s.lanes:
            m.d.comb += [lane.f_en.eq(tag2.valid & (in_b | (tag2.phase == _PH_U))),
                         lane.f_first.eq(tag2.first), lane.f_last.eq(tag2.last & in_b),
                         lane.f_alpha.eq(in_b), lane.f_slot.eq(tag2.sub)]

    def _build_input_products(self, m, s):
        """U phase: ``c_j = Σ_k B_jk u_k`` from lane j mod P, one register per row
        (``creg``), taken from the lane's sum register a cycle after the last product,
        under an enable per group of P rows decoded in that cycle: the c_j registers
        are spread over the die on ECP5, so only register outputs travel to them.
        (The A phase that reads them starts after the U products have drained.)"""
        g, M, P, tag3 = self.geometry, self.cfg.m, self.geometry.p, s.tag3
        creg = [Signal(signed(g.c_width), name=f"c{j}") for j in range(M)] if g.u_mode else []
        c_we = [Signal(name=f"c_we{r}") for r in range(g.ru)] if g.u_mode else []
        for r, we in enumerate(c_we):
            m.d.sync += we.eq(tag3.valid & (tag3.phase == _PH_U) & tag3.last & (tag3.j == r))
        for j, c_j in enumerate(creg):
            with m.If(c_we[j // P]):
                m.d.sync += c_j.eq(s.lanes[j % P].sum0)
        s.creg = creg

    # ---------------------------------------------------------------- S3+: z path
    def _build_z_path(self, m, s):
        """Phase A's sums: a registered adder tree over the lanes' products, then per
        bank an accumulator over a row's chunks that starts from the row's initial
        value; the finished ``z_j`` goes to the tanh unit and its activation into
        the a memory (at the count of activations written)."""
        cfg, g = self.cfg, self.geometry
        P, M, of = g.p, cfg.m, cfg.operand_frac
        tag1, tag2, tag3, br, tanh = s.tag1, s.tag2, s.tag3, s.br, s.tanh
        vals = [s.lanes[p].p for p in range(P)]
        tag_chain = [tag1, tag2, tag3]
        width = g.prod_width
        lvl = 0
        while len(vals) > 1:
            width += 1
            nv = []
            for i in range(0, len(vals), 2):
                t_sum = Signal(signed(width), name=f"tree{lvl}_{i // 2}")
                m.d.sync += t_sum.eq(vals[i] + vals[i + 1] if i + 1 < len(vals) else vals[i])
                nv.append(t_sum)
            t = Signal(s.tag_layout, name=f"tagt{lvl}")
            m.d.sync += t.eq(tag_chain[-1])
            tag_chain.append(t)
            vals = nv
            lvl += 1
        tree_sum = vals[0]
        tagz = tag_chain[-1]
        tagz_prev = tag_chain[-2]
        tagz_prev2 = tag_chain[-3]
        s.z_busy_bits = tag_chain[3:]

        zacc = [Signal(signed(g.z_width), name=f"zacc{b}") for b in range(2)]
        zsum = Signal(signed(g.z_width))
        z_valid = Signal()
        z_sub = Signal()
        # The row's initial value b_j·2^OF (+ c_j; then formed one stage ahead), plus the
        # tanh unit's rounding half 2^(z_shift−1) (z_biased): below the b term's
        # zero bits it is one constant bit, not an adder. The z width has room for
        # it (|z| stays far below 2^(z_width−2)).
        zinit = Signal(signed(g.z_width))
        zs = cfg.z_shift
        bterm = Signal(signed(g.z_width))
        if zs <= 0:
            m.d.comb += bterm.eq(br.data << of)
        elif zs - 1 < of:
            m.d.comb += bterm.eq((br.data << of) | (1 << (zs - 1)))
        else:
            m.d.comb += bterm.eq((br.data << of) + (1 << (zs - 1)))
        if g.u_mode:
            # The rows take c_j in order (the first chunk of row j in each working
            # bank), so the c_j registers form a shift chain read at its head, which
            # moves on after the last bank's first chunk: no M-way selection by the
            # tag's row (its decode and spread-out inputs were an ECP5 critical
            # path). The shift enable is decoded a stage ahead; the U phase refills
            # the chain before the next step's A phase.
            creg = s.creg
            c_shift = Signal()
            m.d.sync += c_shift.eq(tagz_prev2.valid & (tagz_prev2.phase == _PH_A)
                                   & tagz_prev2.first & (tagz_prev2.sub == s.nb_last))
            with m.If(c_shift):
                m.d.sync += [creg[j].eq(creg[j + 1]) for j in range(M - 1)]
            m.d.sync += zinit.eq(bterm + creg[0])
            s.b_tag = tagz_prev2     # b is read two stages ahead: zinit is a register
        else:
            m.d.comb += zinit.eq(bterm)
            s.b_tag = tagz_prev      # b_j straight from the RAM's read register
        m.d.comb += zsum.eq(Mux(tagz.first, zinit, Mux(tagz.sub, zacc[1], zacc[0])) + tree_sum)
        z_in_a = Signal()
        m.d.comb += z_in_a.eq(tagz.valid & (tagz.phase == _PH_A))
        m.d.sync += z_valid.eq(z_in_a & tagz.last)
        with m.If(z_in_a):
            with m.If(tagz.sub):
                m.d.sync += zacc[1].eq(zsum)
            with m.Else():
                m.d.sync += zacc[0].eq(zsum)
            m.d.sync += z_sub.eq(tagz.sub)
        # the finished sum is still in its accumulator when the tanh unit takes it
        z_out = Signal(signed(g.z_width))
        m.d.comb += [z_out.eq(Mux(z_sub, zacc[1], zacc[0])),
                     tanh.z.eq(z_out), tanh.valid.eq(z_valid), tanh.tag.eq(0)]
        # activations into the a memory; count finished rows for the interlocks
        m.d.comb += [s.aw_.addr.eq(s.a_count), s.aw_.data.eq(tanh.a), s.aw_.en.eq(tanh.a_valid)]
        a_tag = Signal(1 + ceil_log2(M + 1))    # bank | row << 1 (probe)
        m.d.comb += a_tag.eq(Cat(s.e_nb2 & s.a_count[0], s.a_rows))
        s.z_valid, s.z_out, s.a_tag = z_valid, z_out, a_tag

    # ---------------------------------------------------------------- S3: contrast
    def _build_contrast(self, m, s):
        """Phase C: the first product of an element (+ε bank) waits in ``prod0``; with
        the second the lane's accumulator group adds the difference to the element
        (``c_elem``, counted here: the updates arrive in element order)."""
        cfg, g = self.cfg, self.geometry
        P, N, K, GL = g.p, cfg.n, cfg.k, g.group_lanes
        tag3, lanes = s.tag3, s.lanes
        nq = [max(0, -(-(N - p) // P)) for p in range(P)]          # rows with an oscillator
        nc = [max(0, -(-(N + K + 1 - p) // P)) for p in range(P)]  # rows with a contrast column
        prod0 = [Signal(signed(g.prod_width), name=f"prod0_{p}") for p in range(P)]
        c_valid = Signal()
        m.d.comb += c_valid.eq(tag3.valid & (tag3.phase == _PH_C))
        for p in range(P):
            with m.If(c_valid & ~tag3.sub):
                m.d.sync += prod0[p].eq(lanes[p].p)
        # The element index counts at S3 rather than travelling with the tags: the
        # contrast updates arrive in element order, after the step's z slots.
        c_elem = Signal(range(max(g.elems, 2)))
        with m.If(tag3.valid & (tag3.phase == _PH_A)):
            m.d.sync += c_elem.eq(0)
        with m.Elif(c_valid & tag3.sub):
            m.d.sync += c_elem.eq(c_elem + 1)
        for q, grp in enumerate(s.groups):
            m.d.comb += [grp.valid.eq(c_valid & tag3.sub), grp.elem.eq(c_elem)]
            for li in range(grp.lanes):
                p = q * GL + li
                en = Signal(name=f"cen{p}")
                m.d.comb += en.eq(Mux(tag3.jm, tag3.r < nq[p], tag3.r < nc[p]))
                m.d.comb += [getattr(grp, f"en{li}").eq(en),
                             getattr(grp, f"diff{li}").eq(prod0[p] - lanes[p].p)]
        m.d.comb += s.acc_ovf_set.eq(sum(grp.overflow for grp in s.groups) != 0)

    # ---------------------------------------------------------------- kick serializer
    def _build_kick_serializer(self, m, s):
        """Phase B's finished force sums, one oscillator (and bank) per cycle, as the
        rounded kick ``k_kick`` of oscillator ``k_i`` for the state unit."""
        cfg, g = self.cfg, self.geometry
        P, N, RN, ks = g.p, cfg.n, g.rn, cfg.kick_shift
        tag3, nb_last = s.tag3, s.nb_last
        ser_active = Signal()
        ser_p = Signal(range(P))
        ser_slot = Signal()
        ser_r = Signal(range(max(RN, 2)))
        ser_ibase = Signal(range(N + P))
        ser_start = Signal()
        # start with the +ε bank's last product: its sums are final one cycle before the
        # −ε bank's, which the serializer reaches a cycle later anyway
        m.d.comb += ser_start.eq(tag3.valid & (tag3.phase == _PH_B) & tag3.last & ~tag3.sub)
        ser_done = Signal()
        m.d.comb += ser_done.eq((ser_p == P - 1) & (ser_slot == nb_last))
        with m.If(ser_start):
            m.d.sync += [ser_active.eq(1), ser_p.eq(0), ser_slot.eq(0), ser_r.eq(tag3.r),
                         ser_ibase.eq(tag3.r * P)]
        with m.Elif(ser_active):
            with m.If(ser_done):
                m.d.sync += ser_active.eq(0)
            with m.Elif(ser_slot != nb_last):
                m.d.sync += ser_slot.eq(1)
            with m.Else():
                m.d.sync += [ser_slot.eq(0), ser_p.eq(ser_p + 1)]
        # the selected force sum (comb; the kick is rounded into the U0 register)
        k_valid = Signal()
        k_f = Signal(signed(g.f_width))
        k_i = Signal(range(N + P))
        k_p = Signal(range(P))
        k_r = Signal(range(max(RN, 2)))
        k_slot = Signal()
        ser_f = Signal(signed(g.f_width))
        with m.Switch(Cat(ser_slot, ser_p)):
            for p in range(P):
                for b in range(2):
                    with m.Case(b | (p << 1)):
                        m.d.comb += ser_f.eq(s.lanes[p].kick1 if b else s.lanes[p].kick0)
        m.d.comb += [k_valid.eq(ser_active & (ser_ibase + ser_p < N)), k_f.eq(ser_f),
                     k_i.eq(ser_ibase + ser_p), k_p.eq(ser_p), k_r.eq(ser_r), k_slot.eq(ser_slot)]
        k_kick = Signal(signed(g.kick_width))
        if ks > 0:      # the sums carry the rounding half (f_bias)
            m.d.comb += k_kick.eq(k_f >> ks)
        else:
            m.d.comb += k_kick.eq(k_f << -ks)
        s.ser_active = ser_active
        s.k_valid, s.k_i, s.k_p, s.k_r, s.k_slot, s.k_kick = k_valid, k_i, k_p, k_r, k_slot, k_kick

    # ---------------------------------------------------------------- state unit
    def _state_bank(self, s, slot):
        """The state bank a working bank (``slot``) uses: fwd (0), or pos (1) / neg (2)
        in an echo."""
        return Mux(slot, 2, Mux(s.e_echo, 1, 0))

    def _state_base(self, bank):
        """The state memory's address of oscillator 0 of ``bank``."""
        N = self.cfg.n
        return Mux(bank == 2, 2 * N, Mux(bank == 1, N, 0))

    def _build_state_unit(self, m, s):
        """The serial state unit: one oscillator op per cycle, from the kick serializer
        or the pre-step generator (``pre_op``), through the stages U0 (address the
        state memory), U1 (QH = Q + Wv, Wv' = Wv − kick), U2 (Q' = QH + Wv', the
        nudge), U3 (write back, outputs, Q' + Wv') and U4 (the next operand qo into
        the lane's operand memory)."""
        cfg, g = self.cfg, self.geometry
        P, N, O, RN = g.p, cfg.n, cfg.o, g.rn
        ow, sw = cfg.operand_width, cfg.state_width
        sr, swp, xw, ofifo, nu = s.sr, s.swp, s.xw, s.ofifo, s.nu
        uop_layout = data.StructLayout({
            "valid": 1, "upd": 1, "zero": 1, "src": 2, "dst": 2, "i": range(N + P),
            "p": range(P), "r": range(max(RN, 2)), "slot": 1, "nudge": 1, "next": 1,
            "out": 1, "chk": 1,
        })
        s.uop_layout = uop_layout
        # U0 (comb): the op, from the serializer or the pre-step generator, addresses
        # the state memory at once; its registers (U1) meet the read data.
        u0 = Signal(uop_layout)
        u0_kick = Signal(signed(g.kick_width))
        pre_op = Signal(uop_layout)     # from the pre-step generator (comb)
        s.pre_op = pre_op
        lo_out = N - O

        with m.If(s.k_valid):
            k_slot, k_i, has_next = s.k_slot, s.k_i, s.has_next
            m.d.comb += [u0.valid.eq(1), u0.upd.eq(1), u0.zero.eq(0),
                         u0.src.eq(self._state_bank(s, k_slot)),
                         u0.dst.eq(self._state_bank(s, k_slot)), u0.i.eq(k_i), u0.p.eq(s.k_p),
                         u0.r.eq(s.k_r), u0.slot.eq(k_slot),
                         u0.nudge.eq(s.e_echo & ~s.e_kick & has_next & (k_i >= lo_out)),
                         u0.next.eq(has_next), u0.out.eq(s.e_out & (k_i >= lo_out)),
                         u0.chk.eq(s.e_st_echo & ~has_next), u0_kick.eq(s.k_kick)]
        with m.Else():
            m.d.comb += u0.eq(pre_op)

        with m.If(u0.valid):
            m.d.comb += sr.addr.eq(self._state_base(u0.src) + u0.i)
        u1 = Signal(uop_layout)
        u1_kick = Signal(signed(g.kick_width))
        # The state word: straight from the memory in the compact form; else its
        # read data is registered first (U1 a cycle later), as on ECP5 the block
        # RAM's clock-to-out, routing and the adders did not fit 60 MHz together.
        s_data = Signal.like(sr.data)
        s.s_data = s_data
        if s.compact:
            m.d.sync += [u1.eq(u0), u1_kick.eq(u0_kick)]
            m.d.comb += s_data.eq(sr.data)
            u_read = []
        else:
            u0r = Signal(uop_layout)
            u0r_kick = Signal(signed(g.kick_width))
            m.d.sync += [u0r.eq(u0), u0r_kick.eq(u0_kick), u1.eq(u0r), u1_kick.eq(u0r_kick),
                         s_data.eq(sr.data)]
            u_read = [u0r.valid]
        Q = Signal(signed(sw))
        W = Signal(signed(sw))
        m.d.comb += [Q.eq(Mux(u1.zero, 0, s_data[:sw].as_signed())),
                     W.eq(Mux(u1.zero, 0, s_data[sw:].as_signed()))]
        # a pre-step op keeps Q: its qh is Q itself (no separate copy of Q)
        qh, qh_ovf = _wrap(m, Q + Mux(u1.upd, W, 0), sw, "qh")
        w2, w2_ovf = _wrap(m, Mux(u1.upd, W - u1_kick, -W), sw, "w2")
        u2 = Signal(uop_layout)
        qh_r = Signal(signed(sw))
        w2_r = Signal(signed(sw))
        m.d.sync += [u2.eq(u1), qh_r.eq(qh), w2_r.eq(w2)]
        q2, q2_ovf = _wrap(m, qh_r + w2_r, sw, "q2")
        wn, wn_ovf = _wrap(m, Mux(u2.slot, w2_r - nu, w2_r + nu), sw, "wn")
        m.d.comb += s.nu_take.eq(u2.valid & u2.nudge & (u2.slot == s.nb_last))
        u3 = Signal(uop_layout)
        q3 = Signal(signed(sw))
        w3 = Signal(signed(sw))
        m.d.sync += [u3.eq(u2), q3.eq(Mux(u2.upd, q2, qh_r)), w3.eq(Mux(u2.nudge, wn, w2_r))]
        m.d.comb += [swp.addr.eq(self._state_base(u3.dst) + u3.i), swp.data.eq(Cat(q3, w3)),
                     swp.en.eq(u3.valid),
                     ofifo.w_data.eq(q3), ofifo.w_en.eq(u3.valid & u3.out)]
        qn, qn_ovf = _wrap(m, q3 + w3, sw, "qn")
        with m.If(u3.valid & u3.chk & ((q3 != 0) | (w3 != 0))):
            m.d.sync += s.st_pass.eq(0)
        u4 = Signal(uop_layout)
        qn_r = Signal(signed(sw))
        m.d.sync += [u4.eq(u3), qn_r.eq(qn)]
        osh = cfg.operand_shift
        qo_wide = Signal(signed(sw + 1))
        if osh > 0:
            m.d.comb += qo_wide.eq((qn_r + (1 << (osh - 1))) >> osh)
        else:
            m.d.comb += qo_wide.eq(qn_r)
        qo = saturate_signed(m, qo_wide, ow, "qo")
        for p in range(P):
            m.d.comb += [xw[p].addr.eq(Mux(u4.slot, RN + u4.r, u4.r)), xw[p].data.eq(qo),
                         xw[p].en.eq(u4.valid & u4.next & (u4.p == p))]
        m.d.comb += s.state_ovf_set.eq(
            (u1.valid & ((u1.upd & qh_ovf) | w2_ovf))
            | (u2.valid & ((u2.upd & q2_ovf) | (u2.nudge & wn_ovf)))
            | (u3.valid & u3.next & qn_ovf))
        state_busy = Signal()
        # U4 (the operand memory write) is left out: a step may issue its first read in
        # the cycle after that write
        m.d.comb += state_busy.eq(Cat(s.ser_active, *u_read, u1.valid, u2.valid, u3.valid) != 0)
        s.state_busy = state_busy

    # ---------------------------------------------------------------- input loader
    def _build_input_loader(self, m, s):
        """The inputs of the next step into ``u_cur``: K words read from the sequence
        buffer (or made by the self-test generator) at the sequence index
        ``ul_word``; and LOAD's write address ``ld_addr`` of the same buffer."""
        cfg = self.cfg
        K, ow, of = cfg.k, cfg.operand_width, cfg.operand_frac
        seq_depth = cfg.t_max * K
        mix, seqbuf, u_cur = s.mix, s.seqbuf, s.u_cur
        s.ld_left = Signal(range(cfg.t_max + 1))   # LOAD rows still to come
        s.ld_k = Signal(range(K + 1))
        ld_addr = Signal(range(seq_depth + 1))
        s.ld_addr = ld_addr
        ul_busy = Signal()
        ul_issue = Signal()
        ul_k = Signal(range(K + 1))
        ul_left = Signal(range(K + 1))     # words still to be written
        # ul_word: the sequence index t·K + k of the next word, one counter with one
        # adder. Issuing a row leaves it at the next row (t+1)·K, which is where a
        # forward pass goes next; an echo goes back two rows (−2K), and the
        # self-test's echo starts one row back (−K, ul_back).
        ul_word = Signal(32)
        ul_init = Signal()          # comb: load ul_word with ul_init_val
        ul_init_val = Signal(32)
        ul_back = Signal()          # comb: step back one row
        u_start = Signal()
        u_adv = Signal()
        u_down = Signal()
        u_ready = Signal()
        s.ul_init, s.ul_init_val, s.ul_back = ul_init, ul_init_val, ul_back
        s.u_start, s.u_adv, s.u_down, s.u_ready = u_start, u_adv, u_down, u_ready
        ul_delta = Signal(signed(ceil_log2(2 * K + 1) + 2))
        ul_go = Signal()            # issue a word: the generator takes it (self-test)
        m.d.comb += ul_go.eq(ul_issue & (~s.e_st | mix.ready))
        m.d.comb += ul_delta.eq(Mux(ul_issue, 1, Mux(ul_back, -K, -2 * K)))
        ul_next = Signal(32)
        m.d.comb += ul_next.eq(ul_word + ul_delta)
        with m.If(ul_init):
            m.d.sync += ul_word.eq(ul_init_val)
        with m.Elif(u_start):
            m.d.sync += [ul_busy.eq(1), ul_issue.eq(1), ul_k.eq(0), ul_left.eq(K)]
            with m.If(u_adv & u_down):
                m.d.sync += ul_word.eq(ul_next)
        with m.Elif(ul_go | ul_back):
            m.d.sync += ul_word.eq(ul_next)
        with m.If(ul_go & ~u_start):
            m.d.sync += ul_k.eq(ul_k + 1)
            with m.If(ul_k == K - 1):
                m.d.sync += ul_issue.eq(0)
        m.d.comb += u_ready.eq(~ul_busy)
        # One address for both ports of the sequence buffer (LOAD writes, the loader
        # reads, never at once): a single-port memory, which Yosys can place in an
        # iCE40UP5K SPRAM (synth_ice40 -spram) for long sequences.
        seq_addr = Signal(range(max(seq_depth, 2)))
        loading = Signal()
        s.loading = loading
        m.d.comb += [seq_addr.eq(Mux(loading, ld_addr, ul_word)), seqbuf.addr.eq(seq_addr)]
        m.d.comb += [mix.x.eq(ul_word ^ s.c_seed),
                     mix.valid.eq(ul_go & s.e_st), mix.tag.eq(ul_k)]
        q_valid = Signal()
        q_k = Signal(range(K + 1))
        m.d.sync += [q_valid.eq(ul_go & ~s.e_st), q_k.eq(ul_k)]
        wr_en = Signal()
        wr_k = Signal(range(K + 1))
        wr_val = Signal(signed(ow))
        with m.If(s.e_st):
            m.d.comb += [wr_en.eq(mix.y_valid), wr_k.eq(mix.y_tag),
                         wr_val.eq(mix.y[:ow].as_signed() >> (ow + 1 - of))]
        with m.Else():
            m.d.comb += [wr_en.eq(q_valid), wr_k.eq(q_k), wr_val.eq(seqbuf.rdata)]
        with m.If(wr_en):
            for k in range(K):
                with m.If(wr_k == k):
                    m.d.sync += u_cur[k].eq(wr_val)
            with m.If(ul_left == 1):
                m.d.sync += ul_busy.eq(0)
            m.d.sync += ul_left.eq(ul_left - 1)

    # ---------------------------------------------------------------- drain, streams
    def _build_drain_detect(self, m, s):
        """``drained``: no slot, sum, activation or state op of the step in flight."""
        drained = Signal()
        busy_bits = ([s.tag1.valid, s.tag2.valid, s.tag3.valid, s.z_valid, s.tanh.busy,
                      s.state_busy]
                     + [t.valid for t in s.z_busy_bits] + [grp.busy for grp in s.groups])
        m.d.comb += drained.eq(Cat(*busy_bits) == 0)
        s.drained = drained

    def _build_stream_counters(self, m, s):
        """The ``outputs`` stream from the outputs FIFO, and the count of nudge words
        an ECHO still accepts (``n_rows`` rows of O words)."""
        cfg, ofifo = self.cfg, s.ofifo
        O = cfg.o
        m.d.comb += [self.outputs.payload.eq(ofifo.r_data.as_signed()),
                     self.outputs.valid.eq(ofifo.r_rdy), ofifo.r_en.eq(self.outputs.ready)]
        n_rows = Signal(range(cfg.t_max + 1))   # nudge rows still to accept
        n_col = Signal(range(O + 1))
        m.d.comb += s.n_accept.eq(n_rows != 0)
        with m.If(self.nudges.valid & self.nudges.ready):
            with m.If(n_col == O - 1):
                m.d.sync += [n_col.eq(0), n_rows.eq(n_rows - 1)]
            with m.Else():
                m.d.sync += n_col.eq(n_col + 1)
        s.n_rows, s.n_col = n_rows, n_col

    # ---------------------------------------------------------------- control
    def _build_control(self, m, s):
        """The control FSM ``ctl``: IDLE takes a command, DONE reports its result; the
        transfer states move parameters, accumulators, state and the sequence; the
        engine states run the pre-step and then every step's phases."""
        cfg, g = self.cfg, self.geometry
        N, RN, ow = cfg.n, g.rn, cfg.operand_width
        s.pwalk = s.awalk = _Walker(m, g, "walk")     # one walker for both orders
        m.d.comb += s.pwalk.skip.eq(s.c_skip)

        if not s.compact:
            # READ_PARAMS: in the ECP5 form the addressed word comes from a register
            # (a block RAM's clock-to-out, the P-way selection and the reply's bit
            # selection did not fit 60 MHz in one cycle)
            p_word = Signal(signed(ow))
            m.d.sync += p_word.eq(_param_word(m, s.pwalk, s.pr, s.br, "p_lane"))
            s.p_word = p_word

        # readout helper register: index into state / clear address
        s.ro_i = Signal(range(max(2 * N, g.acc_depth) + 1))
        s.ro_w = Signal()   # READ_STATE: Wv pass

        # pre-step generator
        s.pre_i = Signal(range(N + 1))
        s.pre_p = Signal(range(g.p))
        s.pre_r = Signal(range(max(RN, 2)))
        s.pre_slot = Signal()

        m.d.comb += [self.cmd.ready.eq(0), self.busy.eq(1)]
        m.d.comb += self.done.payload.result.eq(s.res)
        m.d.comb += self.done.payload.selftest_pass.eq(s.st_pass)

        with m.FSM(name="ctl"):
            self._idle_state(m, s)
            self._parameter_states(m, s)
            self._readout_states(m, s)
            self._load_state(m, s)
            self._pre_step_states(m, s)
            self._phase_states(m, s)

    def _idle_state(self, m, s):
        """IDLE: latch a command, check its arguments and the core's state against
        GoldenCore's, set the engine's mode; DONE: hand back the result."""
        cfg = self.cfg
        with m.State("IDLE"):
            m.d.comb += [self.cmd.ready.eq(1), self.busy.eq(0)]
            cmd = self.cmd.payload
            with m.If(self.cmd.valid):
                m.d.sync += [s.c_op.eq(cmd.op), s.c_len.eq(cmd.length), s.c_one.eq(cmd.one_sided),
                             s.c_kick.eq(cmd.kick), s.c_bank.eq(cmd.bank), s.c_seed.eq(cmd.seed),
                             s.c_skip.eq(cmd.skip),
                             s.res.eq(Result.OK), s.st_pass.eq(0)]
                with m.Switch(cmd.op):
                    with m.Case(Op.WRITE_PARAMS, Op.READ_PARAMS):
                        m.next = "PSTART"
                    with m.Case(Op.LOAD):
                        tb = cfg.t_max.bit_length()   # > t_max without a 32-bit compare
                        too_long = (cmd.length[tb:] != 0) | (cmd.length[:tb] > cfg.t_max)
                        with m.If((cmd.length == 0) | too_long):
                            m.d.sync += s.res.eq(Result.BAD_ARG)
                            m.next = "DONE"
                        with m.Else():
                            m.d.sync += [s.ld_left.eq(cmd.length), s.ld_k.eq(0), s.ld_addr.eq(0)]
                            m.next = "LOAD"
                    with m.Case(Op.FORWARD):
                        with m.If(s.loaded_len == 0):
                            m.d.sync += s.res.eq(Result.WRONG_STATE)
                            m.next = "DONE"
                        with m.Else():
                            m.d.comb += [s.ul_init.eq(1), s.ul_init_val.eq(0)]
                            m.d.sync += [s.e_out.eq(1), s.e_echo.eq(0), s.e_st.eq(0),
                                         s.e_st_echo.eq(0), s.e_nb2.eq(0),
                                         s.e_acc.eq(cmd.one_sided & ~cmd.no_acc),
                                         s.e_one.eq(cmd.one_sided),
                                         s.e_sub.eq(1), s.e_kick.eq(0), s.e_flip.eq(0),
                                         s.u_down.eq(0),
                                         s.fwd_mode.eq(_FWD_NONE)]
                            m.next = "PRE"
                    with m.Case(Op.ECHO):
                        with m.If(s.fwd_mode == _FWD_NONE):
                            m.d.sync += s.res.eq(Result.WRONG_STATE)
                            m.next = "DONE"
                        with m.Else():
                            m.d.comb += [s.ul_init.eq(1), s.ul_init_val.eq(s.seq_last_base)]
                            m.d.sync += [s.e_out.eq(0), s.e_echo.eq(1), s.e_st.eq(0),
                                         s.e_st_echo.eq(0),
                                         s.e_nb2.eq(s.fwd_mode == _FWD_CENTRED), s.e_acc.eq(1),
                                         s.e_sub.eq(0), s.e_kick.eq(cmd.kick), s.e_flip.eq(1),
                                         s.u_down.eq(1),
                                         s.n_rows.eq(Mux(cmd.kick, 1, s.loaded_len)),
                                         s.n_col.eq(0),
                                         s.fwd_mode.eq(_FWD_NONE)]
                            m.next = "PRE"
                    with m.Case(Op.READ_ACC):
                        m.d.comb += [s.awalk.reset.eq(1), s.awalk.acc.eq(1)]
                        m.next = "RACC_ISSUE"
                    with m.Case(Op.CLEAR_ACC):
                        m.d.sync += s.ro_i.eq(0)
                        m.next = "CLRACC"
                    with m.Case(Op.READ_STATE):
                        with m.If(cmd.bank == 3):
                            m.d.sync += s.res.eq(Result.BAD_ARG)
                            m.next = "DONE"
                        with m.Else():
                            m.d.sync += [s.ro_i.eq(0), s.ro_w.eq(0)]
                            m.next = "RSTATE_ISSUE"
                    with m.Case(Op.CLEAR_FLAGS):
                        m.d.comb += s.clear_flags.eq(1)
                        m.next = "DONE"
                    with m.Case(Op.SELFTEST):
                        with m.If(cmd.length == 0):
                            m.d.sync += s.res.eq(Result.BAD_ARG)
                            m.next = "DONE"
                        with m.Else():
                            m.d.comb += [s.ul_init.eq(1), s.ul_init_val.eq(0)]
                            m.d.sync += [s.e_out.eq(0), s.e_echo.eq(0), s.e_st.eq(1),
                                         s.e_st_echo.eq(0), s.e_nb2.eq(0), s.e_acc.eq(0),
                                         s.e_sub.eq(0), s.e_kick.eq(0), s.e_flip.eq(0),
                                         s.u_down.eq(0),
                                         s.fwd_mode.eq(_FWD_NONE)]
                            m.next = "PRE"
                    with m.Default():
                        m.d.sync += s.res.eq(Result.BAD_ARG)
                        m.next = "DONE"

        with m.State("DONE"):
            m.d.comb += self.done.valid.eq(1)
            with m.If(self.done.ready):
                m.next = "IDLE"

    def _parameter_states(self, m, s):
        """WRITE_PARAMS and READ_PARAMS: the walker in canonical order over the lanes'
        parameter memories and the b memory (it needs the latched skip mask)."""
        P, compact = self.geometry.p, s.compact
        pwalk, pr, pw, br, bw = s.pwalk, s.pr, s.pw, s.br, s.bw
        with m.State("PSTART"):
            m.d.comb += pwalk.reset.eq(1)
            with m.If(s.c_skip == 0b1111):
                m.next = "DONE"
            with m.Elif(s.c_op == Op.WRITE_PARAMS):
                m.next = "WPARAM"
            with m.Else():
                m.next = "RPARAM_ISSUE"

        with m.State("WPARAM"):
            m.d.comb += self.params_in.ready.eq(1)
            with m.If(self.params_in.valid):
                with m.If(pwalk.is_b):
                    m.d.comb += [bw.addr.eq(pwalk.j), bw.data.eq(self.params_in.payload),
                                 bw.en.eq(1)]
                with m.Else():
                    for p in range(P):
                        m.d.comb += [pw[p].addr.eq(pwalk.addr), pw[p].data.eq(self.params_in.payload),
                                     pw[p].en.eq(pwalk.lane == p)]
                m.d.comb += pwalk.step.eq(1)
                with m.If(pwalk.last):
                    m.next = "DONE"

        with m.State("RPARAM_ISSUE"):
            for p in range(P):
                m.d.comb += [pr[p].addr.eq(pwalk.addr), pr[p].en.eq(1)]
            m.d.comb += [br.addr.eq(pwalk.j), br.en.eq(1)]
            m.next = "RPARAM_HOLD" if compact else "RPARAM_REG"
        if not compact:
            with m.State("RPARAM_REG"):     # the word reaches p_word
                for p in range(P):
                    m.d.comb += pr[p].en.eq(0)
                m.d.comb += br.en.eq(0)
                m.next = "RPARAM_HOLD"
        with m.State("RPARAM_HOLD"):
            for p in range(P):
                m.d.comb += pr[p].en.eq(0)
            m.d.comb += br.en.eq(0)
            if compact:     # the word straight from the memories
                p_word = _param_word(m, pwalk, pr, br, "pdata")
            else:
                p_word = s.p_word
            m.d.comb += [self.params_out.valid.eq(1), self.params_out.payload.eq(p_word)]
            with m.If(self.params_out.ready):
                m.d.comb += pwalk.step.eq(1)
                with m.If(pwalk.last):
                    m.next = "DONE"
                with m.Else():
                    m.next = "RPARAM_ISSUE"

    def _readout_states(self, m, s):
        """READ_ACC (the walker in accumulator order), CLEAR_ACC and READ_STATE."""
        cfg, g = self.cfg, self.geometry
        N, aw, sw = cfg.n, cfg.acc_width, cfg.state_width
        awalk, groups, ro_i, ro_w, sr = s.awalk, s.groups, s.ro_i, s.ro_w, s.sr
        with m.State("RACC_ISSUE"):
            for grp in groups:
                m.d.comb += [grp.ext.eq(1), grp.ext_raddr.eq(awalk.acc_addr)]
            m.next = "RACC_HOLD"
        with m.State("RACC_HOLD"):
            adata = Signal(signed(aw))
            with m.Switch(awalk.group):
                for q, grp in enumerate(groups):
                    with m.Case(q):
                        m.d.comb += adata.eq(grp.ext_rdata)
            for grp in groups:   # keep the address so the data stays
                m.d.comb += [grp.ext.eq(1), grp.ext_raddr.eq(awalk.acc_addr)]
            m.d.comb += [self.acc_out.valid.eq(1), self.acc_out.payload.eq(adata)]
            with m.If(self.acc_out.ready):
                m.d.comb += awalk.step.eq(1)
                with m.If(awalk.last):
                    m.next = "DONE"
                with m.Else():
                    m.next = "RACC_ISSUE"
        with m.State("CLRACC"):
            for grp in groups:
                m.d.comb += [grp.ext.eq(1), grp.ext_waddr.eq(ro_i), grp.ext_clear.eq(1)]
            m.d.sync += ro_i.eq(ro_i + 1)
            with m.If(ro_i == g.acc_depth - 1):
                m.d.comb += s.clear_acc_flag.eq(1)
                m.next = "DONE"

        with m.State("RSTATE_ISSUE"):
            m.d.comb += [sr.addr.eq(self._state_base(s.c_bank) + ro_i), sr.en.eq(1)]
            m.next = "RSTATE_HOLD" if s.compact else "RSTATE_REG"
        if not s.compact:
            with m.State("RSTATE_REG"):     # the word reaches s_data
                m.d.comb += sr.en.eq(0)
                m.next = "RSTATE_HOLD"
        with m.State("RSTATE_HOLD"):
            s_data = s.s_data
            m.d.comb += [sr.en.eq(0), self.state_out.valid.eq(1),
                         self.state_out.payload.eq(Mux(ro_w, s_data[sw:], s_data[:sw]))]
            with m.If(self.state_out.ready):
                with m.If(ro_i == N - 1):
                    m.d.sync += [ro_i.eq(0), ro_w.eq(1)]
                    with m.If(ro_w):
                        m.next = "DONE"
                    with m.Else():
                        m.next = "RSTATE_ISSUE"
                with m.Else():
                    m.d.sync += ro_i.eq(ro_i + 1)
                    m.next = "RSTATE_ISSUE"

    def _load_state(self, m, s):
        """LOAD: T·K words into the sequence buffer; the last row's base is where an
        echo starts reading."""
        K, seqbuf, ld_addr, ld_k, ld_left = self.cfg.k, s.seqbuf, s.ld_addr, s.ld_k, s.ld_left
        with m.State("LOAD"):
            m.d.comb += [self.inputs.ready.eq(1), s.loading.eq(1),
                         seqbuf.wdata.eq(self.inputs.payload), seqbuf.we.eq(self.inputs.valid)]
            with m.If(self.inputs.valid):
                m.d.sync += ld_addr.eq(ld_addr + 1)
                with m.If(ld_k == 0):
                    m.d.sync += s.seq_last_base.eq(ld_addr)
                with m.If(ld_k == K - 1):
                    m.d.sync += [ld_k.eq(0), ld_left.eq(ld_left - 1)]
                    with m.If(ld_left == 1):
                        m.d.sync += [s.loaded_len.eq(s.c_len), s.fwd_mode.eq(_FWD_NONE)]
                        m.next = "DONE"
                with m.Else():
                    m.d.sync += ld_k.eq(ld_k + 1)

    def _pre_step_states(self, m, s):
        """PRE and PRE_RUN: the pre-step zeroes (FORWARD, SELFTEST) or flips (ECHO, the
        self-test's echo) every oscillator of every working bank through the state
        unit; STEP_WAIT: the first step starts once it has drained."""
        g, N = self.geometry, self.cfg.n
        P, lo_out = g.p, N - self.cfg.o
        pre_op, pre_i, pre_p, pre_r, pre_slot = s.pre_op, s.pre_i, s.pre_p, s.pre_r, s.pre_slot
        e_echo, nb_last = s.e_echo, s.nb_last
        with m.State("PRE"):
            # the first step's nudge row must be buffered before the flip uses it
            need_nudge = e_echo & ~s.nu_have
            with m.If(~need_nudge):
                m.d.comb += [s.u_start.eq(1), s.u_adv.eq(0), s.rem_load.eq(1)]
                m.d.sync += [pre_i.eq(0), pre_p.eq(0), pre_r.eq(0), pre_slot.eq(0)]
                with m.If(s.e_st_echo):
                    m.d.sync += s.st_pass.eq(1)
                m.next = "PRE_RUN"
        with m.State("PRE_RUN"):
            m.d.comb += [pre_op.valid.eq(1), pre_op.upd.eq(0), pre_op.zero.eq(~s.e_flip),
                         pre_op.src.eq(0), pre_op.dst.eq(self._state_bank(s, pre_slot)),
                         pre_op.i.eq(pre_i), pre_op.p.eq(pre_p), pre_op.r.eq(pre_r),
                         pre_op.slot.eq(pre_slot),
                         pre_op.nudge.eq(e_echo & (pre_i >= lo_out)),
                         pre_op.next.eq(1)]
            with m.If(pre_slot != nb_last):
                m.d.sync += pre_slot.eq(1)
            with m.Else():
                m.d.sync += [pre_slot.eq(0), pre_i.eq(pre_i + 1)]
                with m.If(pre_p == P - 1):
                    m.d.sync += [pre_p.eq(0), pre_r.eq(pre_r + 1)]
                with m.Else():
                    m.d.sync += pre_p.eq(pre_p + 1)
                with m.If(pre_i == N - 1):
                    m.next = "STEP_WAIT"

        # ---- wait for the previous step (or pre-step) to drain, then start a step
        with m.State("STEP_WAIT"):
            with m.If(s.drained & s.u_ready):
                m.d.sync += [s.i_sub.eq(0), s.i_r.eq(0), s.i_j.eq(0), s.i_pbase.eq(0),
                             s.a_count.eq(0)]
                if g.u_mode:
                    m.d.sync += [s.i_pbase.eq(g.u_base), s.u_dec.eq(0)]
                    m.next = "U"
                else:
                    m.next = "A"

    def _phase_states(self, m, s):
        """One step: U (u_mode), A, C (with the contrast), B_GATE, B, STEP_END; FIN
        after the last step (and the self-test's turn from forward to echo)."""
        cfg, g = self.cfg, self.geometry
        N, M, K, O = cfg.n, cfg.m, cfg.k, cfg.o
        RA, RC, RN, LB = g.ra, g.rc, g.rn, g.lb
        tag0, issue_mode, p_addr, p_en, x_addr, a_addr = (s.tag0, s.issue_mode, s.p_addr,
                                                          s.p_en, s.x_addr, s.a_addr)
        i_sub, i_r, i_j, i_t, i_pbase, i_bptr = s.i_sub, s.i_r, s.i_j, s.i_t, s.i_pbase, s.i_bptr
        a_count, a_rows, nb_last, e_nb2 = s.a_count, s.a_rows, s.nb_last, s.e_nb2
        drained, u_ready, u_dec, rem_dec, has_next = (s.drained, s.u_ready, s.u_dec, s.rem_dec,
                                                      s.has_next)
        if g.u_mode:
            # the next step's input products, issued while the previous step drains
            with m.State("U"):
                m.d.comb += [issue_mode.eq(1), tag0.valid.eq(1), tag0.phase.eq(_PH_U),
                             tag0.j.eq(i_j), tag0.r.eq(i_r), tag0.first.eq(i_r == 0),
                             tag0.last.eq(i_r == K - 1), p_addr.eq(i_pbase), p_en.eq(1)]
                m.d.sync += i_pbase.eq(i_pbase + 1)
                with m.If(i_r == K - 1):
                    m.d.sync += [i_r.eq(0), i_j.eq(i_j + 1)]
                    with m.If(i_j == g.ru - 1):
                        m.next = "U_WAIT"
                with m.Else():
                    m.d.sync += i_r.eq(i_r + 1)
            with m.State("U_WAIT"):
                with m.If(drained):
                    with m.If(u_dec):
                        m.d.comb += rem_dec.eq(1)
                    m.d.sync += [i_sub.eq(0), i_r.eq(0), i_j.eq(0), i_pbase.eq(0),
                                 a_count.eq(0)]
                    m.next = "A"

        with m.State("A"):
            m.d.comb += [issue_mode.eq(1), tag0.valid.eq(1), tag0.phase.eq(_PH_A),
                         tag0.sub.eq(i_sub), tag0.r.eq(i_r), tag0.j.eq(i_j),
                         tag0.first.eq(i_r == 0), tag0.last.eq(i_r == RA - 1),
                         p_addr.eq(i_pbase + i_r), p_en.eq(~i_sub),
                         x_addr.eq(Mux(i_sub, RN + i_r, i_r))]
            with m.If((i_r == 0) & (i_j == 0) & ~i_sub):
                m.d.comb += self.step_strobe.eq(1)
            with m.If(i_sub != nb_last):
                m.d.sync += i_sub.eq(1)
            with m.Else():
                m.d.sync += i_sub.eq(0)
                with m.If(i_r == RA - 1):
                    m.d.sync += [i_r.eq(0), i_j.eq(i_j + 1), i_pbase.eq(i_pbase + RA)]
                    with m.If(i_j == M - 1):
                        m.d.sync += i_j.eq(0)
                        with m.If(s.e_acc):
                            m.next = "C"
                        with m.Else():
                            m.next = "B_GATE"
                with m.Else():
                    m.d.sync += i_r.eq(i_r + 1)

        with m.State("C"):
            jm = Signal()
            m.d.comb += jm.eq(i_j == M)
            ok = Signal()
            m.d.comb += ok.eq(jm | i_sub | (a_rows > i_j))
            m.d.comb += [issue_mode.eq(1), tag0.phase.eq(_PH_C), tag0.sub.eq(i_sub),
                         tag0.r.eq(i_r), tag0.j.eq(i_j), tag0.jm.eq(jm),
                         x_addr.eq(Mux(i_sub & e_nb2, RN + i_r, i_r)),
                         a_addr.eq(Mux(e_nb2, Cat(i_sub, i_j), i_j))]
            with m.If(ok):
                m.d.comb += tag0.valid.eq(1)
                with m.If(~i_sub):
                    m.d.sync += i_sub.eq(1)
                with m.Else():
                    m.d.sync += i_sub.eq(0)
                    row_end = Mux(jm, i_r == RN - 1, i_r == RC - 1)
                    with m.If(row_end):
                        m.d.sync += [i_r.eq(0), i_j.eq(i_j + 1)]
                        with m.If(jm):
                            m.next = "B_GATE"
                    with m.Else():
                        m.d.sync += i_r.eq(i_r + 1)

        with m.State("B_GATE"):
            e_echo, e_out = s.e_echo, s.e_out
            out_ok = ~e_out | (s.ofifo.level <= s.fifo_depth - O)   # room for O words
            nudge_ok = ~(e_echo & ~s.e_kick & has_next) | s.nu_have
            with m.If(out_ok & nudge_ok):
                m.d.comb += [s.u_start.eq(has_next), s.u_adv.eq(1)]
                m.d.sync += [i_sub.eq(0), i_r.eq(0), i_t.eq(0), i_bptr.eq(0)]
                m.next = "B"

        with m.State("B"):
            pad = Signal()
            m.d.comb += pad.eq(i_t > M)
            ok = Signal()
            m.d.comb += ok.eq(pad | i_sub | (i_t == 0) | (a_rows >= i_t))
            t_prev = Signal(range(M + 1))
            m.d.comb += t_prev.eq(i_t - 1)
            m.d.comb += [issue_mode.eq(1), tag0.phase.eq(_PH_B), tag0.sub.eq(i_sub),
                         tag0.r.eq(i_r), tag0.j.eq(i_t),
                         tag0.first.eq(i_t == 0), tag0.last.eq(i_t == M),
                         p_addr.eq(Mux(i_t == 0, M * RA + i_r, i_bptr)), p_en.eq(~i_sub),
                         x_addr.eq(Mux(i_sub, RN + i_r, i_r)),
                         a_addr.eq(Mux(e_nb2, Cat(i_sub, t_prev), t_prev))]
            with m.If(ok):
                m.d.comb += tag0.valid.eq(~pad)
                with m.If(i_sub != nb_last):
                    m.d.sync += i_sub.eq(1)
                with m.Else():
                    m.d.sync += i_sub.eq(0)
                    with m.If(i_t == 0):
                        m.d.sync += i_bptr.eq(i_r)
                    with m.Else():
                        m.d.sync += i_bptr.eq(i_bptr + RA)
                    with m.If(i_t == LB - 1):
                        m.d.sync += [i_t.eq(0), i_r.eq(i_r + 1)]
                        with m.If(i_r == RN - 1):
                            m.next = "STEP_END"
                    with m.Else():
                        m.d.sync += i_t.eq(i_t + 1)

        with m.State("STEP_END"):
            if g.u_mode:
                with m.If(has_next & u_ready):
                    m.d.sync += [i_r.eq(0), i_j.eq(0), i_pbase.eq(g.u_base), u_dec.eq(1)]
                    m.next = "U"
                with m.Elif(~has_next & drained):
                    m.next = "FIN"
            with m.If(drained & u_ready & (not g.u_mode)):
                with m.If(has_next):
                    m.d.comb += rem_dec.eq(1)
                    m.d.sync += [i_sub.eq(0), i_r.eq(0),
                                 i_j.eq(0), i_pbase.eq(0), a_count.eq(0)]
                    m.next = "A"
                with m.Else():
                    m.next = "FIN"

        with m.State("FIN"):
            with m.If(s.ofifo.level == 0):
                with m.If(s.e_st & ~s.e_st_echo):
                    m.d.comb += s.ul_back.eq(1)
                    m.d.sync += [s.e_st_echo.eq(1), s.e_flip.eq(1), s.u_down.eq(1)]
                    m.next = "PRE"
                with m.Else():
                    with m.If(s.e_out):
                        m.d.sync += s.fwd_mode.eq(Mux(s.e_one, _FWD_ONE, _FWD_CENTRED))
                    m.next = "DONE"


class _Walker:
    """Canonical-order address generator over the sections of :meth:`LaneGeometry.walk_sections`,
    for both the parameters and the accumulators (never walked at once, so one set of
    counters and adders serves both; the sections' constants are multiplexed).

    ``reset``/``step`` are comb strobes; ``acc`` (comb, with ``reset``) selects the
    accumulator order, latched for the walk; ``skip`` (one bit per section, W B b α)
    leaves parameter sections out. ``lane``, ``addr`` (row base + chunk), ``j``
    (row), ``is_b`` (b memory section), ``last`` describe the current word; for
    accumulators ``group``/``acc_addr`` locate it.
    """

    def __init__(self, m: Module, g: LaneGeometry, name: str):
        kinds = [g.walk_sections("param"), g.walk_sections("acc")]
        ns = len(kinds[0])
        assert len(kinds[1]) == ns
        P = g.p
        self.reset = Signal(name=f"{name}_reset")
        self.step = Signal(name=f"{name}_step")
        self.acc = Signal(name=f"{name}_acc")
        self.skip = Signal(ns, name=f"{name}_skip")
        allsecs = kinds[0] + kinds[1]
        maxrows = max(s["rows"] for s in allsecs)
        maxcols = max(s["c1"] - s["c0"] for s in allsecs)
        maxaddr = max(s["base0"] + s["rows"] * s["stride"] for s in allsecs) + g.rmax + 1
        self.kind = Signal(name=f"{name}_kind")   # 1: accumulators
        self.sec = Signal(range(ns), name=f"{name}_sec")
        self.j = Signal(range(maxrows + 1), name=f"{name}_j")
        self.cc = Signal(range(maxcols + 1), name=f"{name}_cc")
        self.lane = Signal(range(P), name=f"{name}_lane")
        self.chunk = Signal(range(g.rmax + 1), name=f"{name}_chunk")
        self.base = Signal(range(maxaddr), name=f"{name}_base")
        self.addr = Signal(range(maxaddr), name=f"{name}_addr")
        self.is_b = Signal(name=f"{name}_isb")
        self.last = Signal(name=f"{name}_last")
        self.group = Signal(range(g.groups), name=f"{name}_group")
        self.acc_addr = Signal(range(max(g.acc_depth, 2)), name=f"{name}_accaddr")

        m.d.comb += self.addr.eq(self.base + self.chunk)
        if g.group_lanes == 2:
            m.d.comb += [self.group.eq(self.lane >> 1), self.acc_addr.eq(Cat(self.lane[0], self.addr))]
        else:
            m.d.comb += [self.group.eq(0), self.acc_addr.eq(self.addr)]

        def field(s, f, kind):
            """Section ``s``'s constant ``f`` (a function of the section dict) for ``kind``."""
            a, b = f(kinds[0][s]), f(kinds[1][s])
            return a if a == b else Mux(kind, b, a)

        def start(s, kind):
            lane = field(s, lambda d: 0 if d["mem"] == "row" else d["c0"] % P, kind)
            chunk = field(s, lambda d: 0 if d["mem"] == "row" else d["c0"] // P, kind)
            return [self.sec.eq(s), self.lane.eq(lane), self.chunk.eq(chunk),
                    self.base.eq(field(s, lambda d: d["base0"], kind)),
                    self.cc.eq(0), self.j.eq(0)]

        def first_of(candidates, kind, skip):
            """Go to the first section of ``candidates`` not skipped (priority chain)."""
            for n, s in enumerate(candidates):
                with (m.If if n == 0 else m.Elif)(~skip[s]):
                    m.d.sync += start(s, kind)

        def step_lane(s):        # banked by column: lane, then chunk, then row
            ncols = field(s, lambda d: d["c1"] - d["c0"], self.kind)
            with m.If(self.cc != ncols - 1):
                m.d.sync += self.cc.eq(self.cc + 1)
                with m.If(self.lane == P - 1):
                    m.d.sync += [self.lane.eq(0), self.chunk.eq(self.chunk + 1)]
                with m.Else():
                    m.d.sync += self.lane.eq(self.lane + 1)
            with m.Elif(self.j != kinds[0][s]["rows"] - 1):
                m.d.sync += [self.cc.eq(0),
                             self.lane.eq(field(s, lambda d: d["c0"] % P, self.kind)),
                             self.chunk.eq(field(s, lambda d: d["c0"] // P, self.kind)),
                             self.j.eq(self.j + 1),
                             self.base.eq(self.base + field(s, lambda d: d["stride"], self.kind))]

        def step_row(s, sd):     # banked by row (u_mode B): column, then row, lane = row mod P
            ncols = sd["c1"] - sd["c0"]
            with m.If(self.cc != ncols - 1):
                m.d.sync += [self.cc.eq(self.cc + 1), self.chunk.eq(self.chunk + 1)]
            with m.Elif(self.j != sd["rows"] - 1):
                m.d.sync += [self.cc.eq(0), self.chunk.eq(0), self.j.eq(self.j + 1)]
                with m.If(self.lane == P - 1):
                    m.d.sync += [self.lane.eq(0), self.base.eq(self.base + sd["stride"])]
                with m.Else():
                    m.d.sync += self.lane.eq(self.lane + 1)

        # the accumulators are never skipped
        skip_now = Mux(self.kind, 0, self.skip)
        with m.If(self.reset):
            m.d.sync += self.kind.eq(self.acc)
            first_of(range(ns), self.acc, Mux(self.acc, 0, self.skip))
        with m.Elif(self.step):
            with m.Switch(self.sec):
                for s in range(ns):
                    with m.Case(s):
                        assert kinds[0][s]["rows"] == kinds[1][s]["rows"]
                        mems = [kinds[0][s]["mem"], kinds[1][s]["mem"]]
                        if "row" in mems:
                            with m.If(self.kind == mems.index("row")):
                                step_row(s, kinds[mems.index("row")][s])
                            with m.Else():
                                step_lane(s)
                        else:
                            step_lane(s)
                        if s + 1 < ns:
                            with m.If((self.cc == field(s, lambda d: d["c1"] - d["c0"], self.kind) - 1)
                                      & (self.j == kinds[0][s]["rows"] - 1)):
                                first_of(range(s + 1, ns), self.kind, skip_now)
        with m.Switch(self.sec):
            for s in range(ns):
                with m.Case(s):
                    m.d.comb += self.is_b.eq(field(s, lambda d: d["mem"] == "b", self.kind))
                    later_skipped = ((skip_now[s + 1:] == (1 << (ns - s - 1)) - 1)
                                     if s + 1 < ns else 1)
                    m.d.comb += self.last.eq(
                        later_skipped & (self.j == kinds[0][s]["rows"] - 1)
                        & (self.cc == field(s, lambda d: d["c1"] - d["c0"], self.kind) - 1))
