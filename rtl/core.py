"""The HEL core: forward and echo dynamics as fixed-point hardware, bit-exact with
:class:`hel_fpga.sim.golden.GoldenCore` (docs/design.md §3; docs/core.md).

Interface
---------
:class:`HELCore` is a ``wiring.Component`` built from a
:class:`hel_fpga.spec.formats.HelConfig` (``P = cfg.lanes`` MAC lanes). Commands
arrive on ``cmd`` (one at a time, accepted only while idle); each produces exactly
one ``done`` word. Data moves on ``amaranth.lib.stream`` streams with full
handshakes in both directions:

========== ===== ======================= =====================================================
member     dir   payload                 use
========== ===== ======================= =====================================================
cmd        In    :data:`CmdLayout`       ``op`` (:class:`Op`), ``length``, ``one_sided``,
                                         ``kick``, ``bank``, ``seed``, ``skip``, ``no_acc``
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

Two fields serve the command unit: ``skip`` transfers a subset of the parameter
arrays (WRITE/READ_PARAMS of the remaining arrays in canonical order;
GoldenCore.write_params takes any subset), and ``no_acc`` repeats a one-sided
FORWARD (same outputs, fwd bank and one-sided mode) without subtracting G(0) a
second time, for protocol retransmissions.

Results: ``OK``; ``WRONG_STATE`` exactly where GoldenCore raises StateError
(FORWARD with nothing loaded; ECHO without a FORWARD of the loaded sequence);
``BAD_ARG`` where GoldenCore raises FormatError/KeyError on a command argument
(LOAD length outside 1..t_max, SELFTEST with 0 steps, READ_STATE bank 3, an
unknown op), so that a bad LOAD length is rejected rather than clamped or left
waiting for words. On any error nothing changes and no stream word is consumed.

Schedule of one step
--------------------
The step is three or four phases (:class:`Phase`) on the P multiplier lanes (see
:mod:`hel_fpga.rtl.mac` for the banking), with the chunk counts of
:class:`hel_fpga.rtl.mac.LaneGeometry`: ``RA = ⌈(N+K)/P⌉`` chunks of P columns per
z row (``⌈N/P⌉`` with the U phase), ``RC = ⌈(N+K+1)/P⌉`` per contrast row,
``RN = ⌈N/P⌉`` oscillator rows, ``LB = max(M+1, P)`` slots per oscillator row of
the force, ``nb`` working banks (2 in a centred echo, else 1). In a centred echo
every weight read serves both banks on two consecutive cycles (the read port
holds its data), so each phase takes twice as long with the same P multipliers:

* **U** (:attr:`Phase.INPUT`; only for ``P ≥ 8`` when the K input columns would
  add a mostly empty chunk to every z row — :attr:`LaneGeometry.u_mode`):
  ``⌈M/P⌉·K`` slots, lane ``p`` sums ``c_j = Σ_k B_jk u_k`` for rows ``j ≡ p``;
  ``c_j`` waits in that lane. Issued while the previous step drains.
* **A** (:attr:`Phase.Z`): ``M·RA`` slots. All lanes multiply row ``j`` chunk
  ``r`` of ``[W|B]`` (of ``W`` in u_mode) by ``[qo|u]``; each lane's adder passes
  its product (lane ``j mod P`` adds ``c_j`` in the row's first chunk), a pipelined
  adder tree and an accumulator (initialised with ``b_j·2^OF``) form ``z_j``; the
  tanh unit turns it into ``a_j`` (a small memory, one word per bank).
* **C** (:attr:`Phase.CONTRAST`; one-sided forward and echo only):
  ``2·(M·RC + RN)`` slots, two products per accumulator element (the ±ε banks, or
  the one bank and a zero). Starts as soon as ``a_0`` exists (interlock on the
  count of finished ``a``). Where it saves slots
  (:attr:`LaneGeometry.contrast_packed`) the rows carry only the ``N`` oscillator
  columns and the input columns follow in ``2·⌈M/P⌉·(K+1)`` slots, lane ``p``
  taking rows ``j ≡ p`` from its own copy of the activations.
* **B** (:attr:`Phase.FORCE`): ``RN·LB`` slots. Lane ``p`` sums
  ``F_i = α_i qo_i + Σ_j W_ji a_j`` for its oscillator ``i = rP + p`` over ``j`` —
  again reading only its bank. Finished sums go to a per-lane kick register and
  from there, one oscillator per cycle, through the serial **state unit**, which
  reads ``(Q, Wv)``, applies the kick and both half drifts, adds the next step's
  nudge, writes the state back, emits outputs and computes the next step's
  operand ``qo`` — so the state of all three banks lives in one block RAM, never
  in registers.

A step waits for the previous one to drain (its last oscillators' new ``qo``);
that fixed drain of about ``nb·P + 9`` cycles plus unused lanes in the last
chunk of a row is the overhead over ``MACs / P``. The ECP5 form runs phase C
after B (``late_contrast``), so the contrast's slots fill that drain: its
state unit writes the new ``qo`` into the other page of the operand memories
(``x_page``, turned as a step starts) while the contrast still reads the old
one, and the contrast takes the step's inputs from a copy (``u_contrast``) as
the loader already fetches the next step's. In an echo step the next step's U
slots go between B and C (``u_ahead``), and the next step's A waits only for
what it uses (``step_drained``), not for the contrast's tail. The compact
(iCE40) form keeps C before B, where it covers the tanh unit's latency ahead of B.

Multiplier count is exactly ``P``; the tanh interpolation has its own small
multiplier (not a MAC).

Every wrap of the state (half drifts, kick, nudge, flip) and of an accumulator
sets the sticky flag at the same operations as the golden model.

Where each part is built
------------------------
:meth:`HELCore.elaborate` calls one builder per section, in datapath order; the
pipeline stages are S0 (issue: the control FSM drives ``tag0`` and the lane
memories' addresses), S1 (operands), S2, S3 (products, as in
:class:`hel_fpga.rtl.mac.MacLane`):

============================== ================================================================
builder                        section
============================== ================================================================
``_build_memories``            parameter, b, operand, activation, state and sequence memories
``_build_units``               MAC lanes, accumulator groups, tanh unit, self-test generator
``_build_nudge_buffer``        the nudge row (stream source or FIFO)
``_build_flags``               sticky wrap flags
``_build_command_registers``   latched command, engine mode, steps left
``_build_issue_signals``       S0: slot tags, read addresses, issue counters
``_build_operand_select``      S1: the lanes' operands by phase
``_build_lane_controls``       S2: the lanes' adder controls, the c_j token ring
``_build_z_path``              A: adder tree, z accumulators, tanh, activation memory
``_build_contrast``            C: the ±ε difference into the accumulator groups
``_build_kick_serializer``     B: finished force sums one oscillator per cycle
``_build_state_unit``          the serial state unit (stages ``op0``…``op4``)
``_build_input_loader``        the next step's inputs, LOAD's write address
``_build_drain_detect``        ``drained``: nothing of the step in flight
``_build_stream_counters``     ``outputs`` stream, nudge words still accepted
``_build_control``             control FSM: ``_idle_state``, ``_parameter_states``,
                               ``_readout_states``, ``_load_state``, ``_pre_step_states``,
                               ``_phase_states`` (one method per phase)
============================== ================================================================
"""

from __future__ import annotations

from types import SimpleNamespace

from amaranth.hdl import (Array, Cat, ClockSignal, Const, Instance, Module, Mux, Signal, Value,
                          signed, unsigned)
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.fifo import SyncFIFO, SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from hel_fpga.rtl.bram import NO_RW_CHECK, ram_read_port
from hel_fpga.spec.formats import HelConfig
from hel_fpga.rtl.mac import AccumulatorGroup, LaneGeometry, MacLane
from hel_fpga.rtl.tanh import TanhUnit, saturate_signed
from hel_fpga.spec.names import MIX32_FINAL_SHIFT, MIX32_ROUNDS

__all__ = ["HELCore", "Op", "Result", "Phase", "ForwardMode", "CmdLayout", "DoneLayout", "Mix32",
           "Mix32Serial", "SequenceBuffer"]


class Op(enum.Enum, shape=5):
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
    # The on-chip training operations: :class:`hel_fpga.rtl.training.TrainingCore`
    # executes them around the core; the core itself answers them BAD_ARG.
    TRAIN_SETUP = 10
    STORE = 11
    WRITE_MASTER = 12
    READ_MASTER = 13
    TRAIN = 14
    EVAL = 15
    STREAM = 16


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


class Phase(enum.Enum, shape=2):
    """The phase of an issued slot (the module docstring's schedule: A, B, C, U)."""
    Z = 0           # A: z sums
    FORCE = 1       # B: force sums
    CONTRAST = 2    # C: contrast accumulation
    INPUT = 3       # U: input products c_j


class ForwardMode(enum.Enum, shape=2):
    """What the last FORWARD left for an ECHO: nothing to echo (no FORWARD of the
    loaded sequence, or it was consumed), a centred or a one-sided forward pass."""
    NONE = 0
    CENTRED = 1
    ONE_SIDED = 2


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

    ``registered``: ``addr``, ``wdata`` and ``we`` are registered before the
    memory (the ECP5 form: LOAD's words come from far away), so a write lands a
    cycle later and the read latency is 2.
    """

    def __init__(self, depth: int, width: int, spram: bool, registered: bool = False):
        self.depth, self.width, self.spram = depth, width, spram
        self.registered = registered
        self.read_latency = 2 if registered else 1
        super().__init__({"addr": In(range(max(depth, 2))), "wdata": In(signed(width)),
                          "we": In(1), "rdata": Out(signed(width))})

    def elaborate(self, platform):
        m = Module()
        if self.registered:
            port = SimpleNamespace(addr=Signal.like(self.addr, name="addr_r"),
                                   wdata=Signal.like(self.wdata, name="wdata_r"),
                                   we=Signal(name="we_r"), rdata=self.rdata)
            m.d.sync += [port.addr.eq(self.addr), port.wdata.eq(self.wdata),
                         port.we.eq(self.we)]
        else:
            port = self
        if self.spram:
            raw = Signal(16)
            addr, din = Signal(14), Signal(16)
            m.d.comb += [addr.eq(port.addr), din.eq(port.wdata.as_unsigned())]
            m.submodules.spram = Instance(
                "SB_SPRAM256KA",
                i_ADDRESS=addr, i_DATAIN=din, i_MASKWREN=Const(0b1111, 4), i_WREN=port.we,
                i_CHIPSELECT=Const(1), i_CLOCK=ClockSignal(), i_STANDBY=Const(0),
                i_SLEEP=Const(0), i_POWEROFF=Const(1), o_DATAOUT=raw)
            m.d.comb += self.rdata.eq(raw[:self.width].as_signed())
        else:
            mem = m.submodules.mem = Memory(shape=signed(self.width), depth=self.depth, init=[],
                                            attrs=NO_RW_CHECK)   # read disabled while writing
            rd, wr = ram_read_port(m, mem, "rd"), mem.write_port()
            m.d.comb += [rd.addr.eq(port.addr), wr.addr.eq(port.addr), wr.data.eq(port.wdata),
                         wr.en.eq(port.we), rd.en.eq(~port.we), self.rdata.eq(rd.data)]
        return m


def _param_word(m, walker, param_rd, b_rd, name):
    """READ_PARAMS: the word ``walker`` addresses, from its lane's parameter memory
    (read port ``param_rd[lane]``, selected into a signal called ``name``) or from
    the b memory's (``b_rd``)."""
    lane_word = Signal.like(param_rd[0].data, name=name)
    with m.Switch(walker.lane):
        for p, port in enumerate(param_rd):
            with m.Case(p):
                m.d.comb += lane_word.eq(port.data)
    return Mux(walker.is_b, b_rd.data, lane_word)


def _registered_write_port(m, mem, name):
    """A write port of ``mem`` whose address, data and enable (``addr``, ``data``,
    ``en`` of the returned object) are registered first, so the write lands a
    cycle later. The registers load every cycle (no clock enable: the enable
    comes late, from the stream's valid, and would reach every bit)."""
    port = mem.write_port()
    staged = SimpleNamespace(addr=Signal.like(port.addr, name=f"{name}_addr"),
                             data=Signal.like(port.data, name=f"{name}_data"),
                             en=Signal(name=f"{name}_en"))
    m.d.sync += [port.en.eq(staged.en), port.addr.eq(staged.addr),
                 port.data.eq(staged.data)]
    return staged


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
        after them: one cycle less per step, and per word read), and none of the
        ECP5 form's other register stages (docs/core.md, "Accumulators": read
        addresses, the kick, the pre-step ops, memory writes, the READ_ACC word,
        the tanh ROM word, …; two more cycles per step). ``None``: compact when
        elaborated for an iCE40 platform. Results and interface are
        the same either way.

    Attributes
    ----------
    geometry : LaneGeometry
        Banking and schedule lengths.
    step_strobe : Signal
        Pulses when a step's first product is issued (for benchmarks; not a port).
    probes : dict
        Internal memories and signals for simulation tests, filled by ``elaborate``
        (``pmem``, ``bmem``, ``xmem``, ``amem``, ``smem``, ``u``;
        ``k_valid``/``k_i``/``k_kick``/``k_slot``: rounded kicks (finished force sums)
        entering the state unit, with oscillator and bank; ``z_valid``/``z_out``;
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
        # the contrast after the force, overlapping the state unit's drain (ECP5 form)
        s.late_contrast = not s.compact
        self._build_memories(m, s, platform)
        self._build_units(m, s)
        self._build_nudge_buffer(m, s)
        self._build_flags(m, s)
        self._build_command_registers(m, s)
        self._build_issue_signals(m, s)
        self._build_operand_select(m, s)
        self._build_lane_controls(m, s)
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
            m.d.sync += s.activation_count.eq(s.activation_count + 1)
            if self.geometry.contrast_packed:
                with m.If(s.two_banks & ~s.act_bank):
                    m.d.sync += s.act_bank.eq(1)
                with m.Else():
                    m.d.sync += s.act_bank.eq(0)
                    with m.If(s.act_lane == self.geometry.p - 1):
                        m.d.sync += [s.act_lane.eq(0), s.act_group.eq(s.act_group + 1)]
                    with m.Else():
                        m.d.sync += s.act_lane.eq(s.act_lane + 1)

        self.probes.update(pmem=s.pmem, bmem=s.bmem, xmem=s.xmem, amem=s.amem, smem=s.smem,
                           u=s.u_current, k_valid=s.kick_valid, k_i=s.kick_osc, k_kick=s.kick,
                           k_slot=s.kick_bank, z_valid=s.z_valid, z_out=s.z_out,
                           a_valid=s.tanh.a_valid, a=s.tanh.a, a_tag=s.a_tag)
        # the b memory is read ahead of the z adder (the walker owns it in READ_PARAMS_ISSUE)
        with m.If(s.b_tag.valid & (s.b_tag.phase == Phase.Z)):
            m.d.comb += s.b_rd.addr.eq(s.b_tag.row)

        return m

    # ---------------------------------------------------------------- memories and units
    def _build_memories(self, m, s, platform):
        """The parameter (``pmem``, one per lane), b, operand (``xmem``, one per lane),
        activation, state and sequence memories and their ports.

        The ECP5 form registers the parameter and b memories' write ports (the
        words come from far away: the command unit, or the training core's
        requantisation), so WRITE_PARAMS's last word lands in DONE.

        None of them needs a defined read of a word in the cycle it is written
        (NO_RW_CHECK): parameters are written only by WRITE_PARAMS; an operand (x)
        row is rewritten after the last read of the old operand (or, late contrast,
        in the page the step does not read) and read again only after the step
        drains; an activation is read only once its row is counted
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
        seqbuf = SequenceBuffer(cfg.t_max * cfg.k, ow, self._use_spram(platform),
                                registered=not s.compact)
        # late contrast: two pages of (fwd|+ε, −ε) rows, one read by the step and
        # one written by its state unit (``x_page``)
        xmem = [Memory(shape=signed(ow), depth=(4 if s.late_contrast else 2) * RN, init=[],
                       attrs=NO_RW_CHECK)
                for _ in range(P)]
        amem = Memory(shape=signed(ow), depth=2 * M, init=[], attrs=NO_RW_CHECK)
        # packed contrast: each lane's copy of the activations of its rows j ≡ p
        # (row group j // P, both banks), for the input columns' slots
        lane_amem = ([Memory(shape=signed(ow), depth=2 * g.ru, init=[], attrs=NO_RW_CHECK)
                      for _ in range(P)] if g.contrast_packed else [])
        for p, lm in enumerate(lane_amem):
            m.submodules[f"lane_amem{p}"] = lm
        s.lane_activation_rd = [ram_read_port(m, lm, f"lane_activation_rd{p}")
                                for p, lm in enumerate(lane_amem)]
        s.lane_activation_wr = [lm.write_port() for lm in lane_amem]
        smem = Memory(shape=unsigned(2 * sw), depth=3 * N, init=[], attrs=NO_RW_CHECK)
        for p in range(P):
            m.submodules[f"pmem{p}"] = pmem[p]
            m.submodules[f"xmem{p}"] = xmem[p]
        m.submodules.bmem = bmem
        m.submodules.seqbuf = seqbuf
        m.submodules.amem = amem
        m.submodules.smem = smem
        s.pmem, s.bmem, s.xmem, s.amem, s.smem, s.seqbuf = pmem, bmem, xmem, amem, smem, seqbuf
        s.param_rd = [ram_read_port(m, pm, f"param_rd{p}") for p, pm in enumerate(pmem)]
        if s.compact:
            s.param_wr = [pm.write_port() for pm in pmem]
            b_rd, b_wr = ram_read_port(m, bmem, "b_rd"), bmem.write_port()
        else:
            s.param_wr = [_registered_write_port(m, pm, f"param_wr{p}")
                          for p, pm in enumerate(pmem)]
            b_rd, b_wr = ram_read_port(m, bmem, "b_rd"), _registered_write_port(m, bmem, "b_wr")
        s.operand_rd = [ram_read_port(m, om, f"operand_rd{p}") for p, om in enumerate(xmem)]
        s.operand_wr = [om.write_port() for om in xmem]
        activation_rd, activation_wr = ram_read_port(m, amem, "activation_rd"), amem.write_port()
        state_rd, state_wr = ram_read_port(m, smem, "state_rd"), smem.write_port()
        s.b_rd, s.b_wr = b_rd, b_wr
        s.activation_rd, s.activation_wr = activation_rd, activation_wr
        s.state_rd, s.state_wr = state_rd, state_wr

    def _build_units(self, m, s):
        """The P MAC lanes, the accumulator groups, the tanh unit, the self-test
        generator and the outputs FIFO."""
        cfg, g = self.cfg, self.geometry
        P, K, O, group_lanes = g.p, cfg.k, cfg.o, g.group_lanes
        # one lane: the serializer takes the force sums straight from the running sums
        # and the kick's rounding half is the force sums' initial value (f_bias)
        ks = cfg.kick_shift
        # The ECP5 form's lanes sum in every phase, so only a lane's adder takes its
        # product; the iCE40 form's one lane sums B only (its product also feeds the
        # z path and the contrast's difference directly: no extra cycle).
        s.lane_sums = not s.compact or g.u_mode
        lanes = [MacLane(cfg, kick_regs=P > 1, f_bias=(1 << (ks - 1)) if ks > 0 else 0,
                         first_lane=p == 0, every_phase=s.lane_sums)
                 for p in range(P)]
        for p in range(P):
            m.submodules[f"lane{p}"] = lanes[p]
        groups = [AccumulatorGroup(cfg, lanes=min(group_lanes, P - q * group_lanes),
                                   pipelined=not s.compact)
                  for q in range(g.groups)]
        for q, grp in enumerate(groups):
            m.submodules[f"accgroup{q}"] = grp
        s.lanes, s.groups = lanes, groups
        s.tanh = m.submodules.tanh = TanhUnit(cfg, g.z_width, z_biased=True,
                                              pipelined=not s.compact)
        s.mix = m.submodules.mix = (Mix32Serial if s.compact else Mix32)(
            tag_width=max(1, ceil_log2(K + 1)))
        # One row of outputs: a single register when O = 1; else O + 1 words, because
        # SyncFIFOBuffered moves a word from its memory to its output register before
        # the memory takes the O-th of O back-to-back writes.
        s.fifo_depth = 1 if O == 1 else O + 1
        s.output_fifo = m.submodules.ofifo = SyncFIFOBuffered(width=cfg.state_width,
                                                              depth=s.fifo_depth)

    def _build_nudge_buffer(self, m, s):
        """Nudges: with O = 1 in the compact form the row waits in the stream source
        itself (a stream holds its payload until ready) and is taken when the state
        unit has used it for both banks; else it waits in a FIFO of one row (with
        O = 1 a single register: the ECP5 form keeps the source's payload and
        valid, which come from the command unit, out of the state unit's adders)."""
        O, sw = self.cfg.o, self.cfg.state_width
        nudge_accept = Signal()       # nudge rows are still to come
        nudge_row_ready = Signal()    # a row (O words) is available
        nudge_take = Signal()         # the state unit is done with the row's next word
        nudge = Signal(signed(sw))
        if O == 1 and s.compact:
            m.d.comb += [nudge.eq(self.nudges.payload),
                         nudge_row_ready.eq(self.nudges.valid & nudge_accept),
                         self.nudges.ready.eq(nudge_take & nudge_accept)]
        else:
            nudge_fifo = m.submodules.nfifo = SyncFIFOBuffered(width=sw, depth=s.fifo_depth)
            m.d.comb += [nudge_fifo.w_data.eq(self.nudges.payload),
                         nudge_fifo.w_en.eq(self.nudges.valid & nudge_accept),
                         self.nudges.ready.eq(nudge_fifo.w_rdy & nudge_accept),
                         nudge.eq(nudge_fifo.r_data.as_signed()), nudge_fifo.r_en.eq(nudge_take),
                         nudge_row_ready.eq(nudge_fifo.level >= O)]
        s.nudge_accept, s.nudge_row_ready = nudge_accept, nudge_row_ready
        s.nudge_take, s.nudge = nudge_take, nudge

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
        if s.compact:
            state_ovf_pulse = state_ovf_set
        else:
            # ECP5: the wraps of the state unit's adders are registered before the
            # flag (the flag is set a cycle later, still before the pass ends)
            state_ovf_pulse = Signal()
            m.d.sync += state_ovf_pulse.eq(state_ovf_set)
        with m.If(clear_flags):
            m.d.sync += [state_ovf.eq(0), acc_ovf.eq(0)]
        with m.Else():
            with m.If(state_ovf_pulse):
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
        s.cmd_op = Signal(Op)
        s.cmd_length = Signal(32)
        s.cmd_bank = Signal(2)
        s.cmd_seed = Signal(32)
        s.cmd_skip = Signal(4)
        s.result = Signal(Result)
        s.selftest_pass = Signal()
        s.loaded_length = Signal(range(cfg.t_max + 1))
        s.last_row_base = Signal(range(max(seq_depth, 2)))   # LOAD: the last row's t·K
        s.forward_mode = Signal(ForwardMode)

        # The engine's mode, set by IDLE for a FORWARD, ECHO or SELFTEST pass.
        s.emit_outputs = Signal()     # FORWARD: stream the outputs
        s.echo = Signal()             # echo of a FORWARD: pos/neg banks, nudges
        s.selftest = Signal()         # SELFTEST
        s.selftest_echo = Signal()    # SELFTEST, second half
        s.two_banks = Signal()        # two working banks (centred echo)
        s.accumulate = Signal()       # phase C runs (contrast into the accumulators)
        s.one_sided = Signal()        # one-sided FORWARD (the next echo is one-sided)
        s.negate_contrast = Signal()  # C subtracts (one-sided forward): product in the −ε slot
        s.kick_only = Signal()        # ECHO with one nudge row (HEB)
        s.flip_state = Signal()       # the pre-step flips (else zeroes) the state
        steps_left = Signal(32)       # steps after the current one
        has_next = Signal()
        # one decrementer: a pass starts with (SELFTEST length or loaded T) − 1 steps
        # to follow (set when PRE_STEP_START hands over), and each step takes one off
        steps_left_load = Signal()
        steps_left_dec = Signal()
        steps_left_next = Signal(32)
        first = Mux(s.selftest, s.cmd_length, s.loaded_length)
        m.d.comb += steps_left_next.eq(Mux(steps_left_load, first, steps_left) - 1)
        with m.If(steps_left_load | steps_left_dec):
            m.d.sync += steps_left.eq(steps_left_next)
        if s.compact:
            m.d.comb += has_next.eq(steps_left != 0)
        else:   # ECP5: a register beside steps_left (no 32-bit compare behind it)
            with m.If(steps_left_load | steps_left_dec):
                m.d.sync += has_next.eq(steps_left_next != 0)
        s.has_next, s.steps_left_load, s.steps_left_dec = has_next, steps_left_load, steps_left_dec

    # ---------------------------------------------------------------- issue stage (S0)
    def _build_issue_signals(self, m, s):
        """The slot tags (``tag0`` issued in S0, ``tag1``…``tag3`` its copies a stage
        later each), the lane memories' read addresses the control FSM drives in S0,
        its slot counters, the count of finished activations, and the current inputs
        ``u_current``.

        A tag says what a slot's products are for: ``phase``; ``bank`` (0: the fwd or
        +ε bank, 1: the −ε bank); ``row`` (j; in B the slot number t, 0 for α and
        j + 1 for W_ji) and ``chunk`` (r, a group of P columns; the input k in U);
        ``first``/``last`` product of a sum; ``alpha_row``: the contrast's row M.
        """
        cfg, g = self.cfg, self.geometry
        M, K, RA, LB, max_chunks = cfg.m, cfg.k, g.ra, g.lb, g.rmax
        ow = cfg.operand_width
        fields = {
            "valid": 1, "phase": Phase, "bank": 1, "chunk": range(max(max_chunks, 2)),
            "row": range(M + 1), "first": 1, "last": 1, "alpha_row": 1,
        }
        if g.contrast_packed:
            fields["input_row"] = 1     # the contrast's input columns (row group, k)
        s.tag_layout = data.StructLayout(fields)
        tag0 = Signal(s.tag_layout)
        tag1 = Signal(s.tag_layout)
        tag2 = Signal(s.tag_layout)
        tag3 = Signal(s.tag_layout)
        s.param_addr = Signal(range(max(g.param_depth, 2)))
        s.param_en = Signal()
        s.operand_addr = Signal(range(max(2 * g.rn, 2)))
        s.activation_addr = Signal(range(max(2 * M, 2)))
        s.issue_mode = Signal()   # the engine drives the lane memories' read ports
        operand_read = s.operand_addr
        if s.late_contrast:
            # The operand page a step reads; its state unit writes the other one, which
            # the next step reads (the page turns as it starts), so the contrast after
            # the force still reads this step's qo while the new qo is written.
            s.x_page = Signal()
            with m.If(s.steps_left_dec):
                m.d.sync += s.x_page.eq(~s.x_page)
            operand_read = Signal(range(4 * g.rn), name="operand_read")
            m.d.comb += operand_read.eq(s.operand_addr + Mux(s.x_page, 2 * g.rn, 0))
        # What the lane memories' read ports take: in the compact form the FSM's
        # S0 signals themselves; in the ECP5 form a register stage of them (S0r:
        # ``tag0r`` and the read addresses), so the control FSM's decode and the
        # routing to the memories spread over the die (amem is a LUT RAM far
        # from the controller) are in separate cycles. Then every slot reaches S1
        # a cycle later; the interlocks decided in S0 only become more
        # conservative, and ``drained`` covers the extra stage.
        issue_sigs = [tag0, s.issue_mode, s.param_addr, s.param_en, operand_read,
                      s.activation_addr]
        if g.contrast_packed:
            # the lanes' own activation memories: row group g (and bank) of rows j ≡ p
            s.lane_activation_addr = Signal(range(max(2 * g.ru, 2)))
            issue_sigs.append(s.lane_activation_addr)
        if s.compact:
            rd_sigs = issue_sigs
            s.tag_rd_valid = []
        else:
            rd_sigs = [Signal.like(x, name=x.name + "_r") for x in issue_sigs[1:]]
            rd_sigs.insert(0, Signal(s.tag_layout, name="tag0r"))
            m.d.sync += [r.eq(x) for r, x in zip(rd_sigs, issue_sigs)]
            s.tag_rd_valid = [rd_sigs[0].valid]
        (s.tag0r, s.rd_issue_mode, s.rd_param_addr, s.rd_param_en, s.rd_operand_addr,
         s.rd_activation_addr) = rd_sigs[:6]
        s.rd_lane_activation_addr = rd_sigs[6] if g.contrast_packed else None
        m.d.sync += [tag1.eq(s.tag0r), tag2.eq(tag1), tag3.eq(tag2)]
        s.tag0, s.tag1, s.tag2, s.tag3 = tag0, tag1, tag2, tag3
        s.issue_bank = Signal()
        s.issue_chunk = Signal(range(max(max_chunks, 2)))
        s.issue_row = Signal(range(M + 1))
        s.issue_slot = Signal(range(LB + 1))     # B: 0 for α, j + 1 for W_ji
        s.issue_row_base = Signal(range(g.param_depth + RA + 1))
        s.issue_weight_addr = Signal(range(g.param_depth + RA + 1))   # B: W_ji's address
        # Activations written this step. They come in issue order — (bank 0, row 0),
        # (bank 1, row 0), (0, 1), … — so the count is also the a memory's address
        # (2j + bank in centred echo, else j) and, halved in centred echo, the
        # number of finished rows the contrast and force phases wait for.
        activation_count = Signal(range(2 * M + 1))
        activation_rows = Signal(range(M + 1))
        m.d.comb += activation_rows.eq(Mux(s.two_banks, activation_count >> 1, activation_count))
        s.activation_count, s.activation_rows = activation_count, activation_rows
        s.step_after_input = Signal()   # leaving the U phase starts the next step (not the first)
        s.u_ahead = Signal()    # late contrast: the next step's U ran before this one's C
        last_bank = Signal()            # the bank of the last working bank's slot
        m.d.comb += last_bank.eq(s.two_banks)
        s.last_bank = last_bank

        s.u_current = [Signal(signed(ow), name=f"u{k}") for k in range(K)]
        # late contrast: the step's inputs, kept for its contrast while the loader
        # already fetches the next step's into u_current
        s.u_contrast = ([Signal(signed(ow), name=f"u_contrast{k}") for k in range(K)]
                        if s.late_contrast else s.u_current)

    # ---------------------------------------------------------------- S1: operands
    def _build_operand_select(self, m, s):
        """S1: each lane's two operands for the slot in ``tag1``, by phase: A weight ×
        x (qo, u or 0), B weight × qo or activation, U weight × input, C activation ×
        x (or qo², or zeros for the single bank's unused slot)."""
        cfg, g = self.cfg, self.geometry
        P, N, K, max_chunks = g.p, cfg.n, cfg.k, g.rmax
        ow = cfg.operand_width
        param_rd, operand_rd, activation_rd = s.param_rd, s.operand_rd, s.activation_rd
        tag1, u_current, u_contrast = s.tag1, s.u_current, s.u_contrast
        for p in range(P):
            with m.If(s.rd_issue_mode):
                m.d.comb += [param_rd[p].addr.eq(s.rd_param_addr),
                             param_rd[p].en.eq(s.rd_param_en)]
            m.d.comb += operand_rd[p].addr.eq(s.rd_operand_addr)
        m.d.comb += activation_rd.addr.eq(s.rd_activation_addr)
        for rd in s.lane_activation_rd:
            m.d.comb += rd.addr.eq(s.rd_lane_activation_addr)
        if g.contrast_packed:
            # the packed input columns: x_k = u_k of the step, or 1 (b) for k = K
            u_input = Signal(signed(ow))
            with m.Switch(tag1.chunk):
                for k in range(K):
                    with m.Case(k):
                        m.d.comb += u_input.eq(u_contrast[k])
                with m.Default():
                    m.d.comb += u_input.eq(1)

        u_selected = Signal(signed(ow))    # U phase: input k = tag1.chunk, the same for every lane
        with m.Switch(tag1.chunk):
            for k in range(K):
                with m.Case(k):
                    m.d.comb += u_selected.eq(u_current[k])
        in_contrast = tag1.phase == Phase.CONTRAST
        for p in range(P):
            lane = s.lanes[p]
            qo_read = operand_rd[p].data
            x_value = Signal(signed(ow), name=f"x_value{p}")    # x_c of column c = rP + p
            qo_alpha = Signal(signed(ow), name=f"qo_alpha{p}")  # qo_c for the α row (qo²)
            with m.Switch(tag1.chunk):
                for r in range(max_chunks):
                    c = r * P + p
                    with m.Case(r):
                        if c < N:
                            m.d.comb += [x_value.eq(qo_read), qo_alpha.eq(qo_read)]
                        elif c < N + K:
                            if g.u_mode:   # the z rows have no input columns then
                                m.d.comb += x_value.eq(Mux(in_contrast, u_contrast[c - N], 0))
                            elif s.late_contrast:
                                m.d.comb += x_value.eq(Mux(in_contrast, u_contrast[c - N],
                                                           u_current[c - N]))
                            else:
                                m.d.comb += x_value.eq(u_current[c - N])
                        elif c == N + K:
                            m.d.comb += x_value.eq(in_contrast)
            # single bank: one contrast slot is zero — the −ε slot (diff = +product), or,
            # to accumulate −G(0) in a one-sided forward, the +ε slot (diff = −product),
            # so the accumulator only ever adds
            zero_slot = Signal(name=f"zero_slot{p}")
            m.d.comb += zero_slot.eq(in_contrast & ~s.two_banks
                                     & (tag1.bank != s.negate_contrast))
            with m.Switch(tag1.phase):
                with m.Case(Phase.Z):
                    m.d.comb += [lane.a.eq(param_rd[p].data), lane.b.eq(x_value)]
                with m.Case(Phase.FORCE):
                    m.d.comb += [lane.a.eq(param_rd[p].data),
                                 lane.b.eq(Mux(tag1.first, qo_read, activation_rd.data))]
                with m.Case(Phase.INPUT):
                    m.d.comb += [lane.a.eq(param_rd[p].data), lane.b.eq(u_selected)]
                with m.Case(Phase.CONTRAST):
                    with m.If(zero_slot):
                        m.d.comb += [lane.a.eq(0), lane.b.eq(0)]
                    with m.Elif(tag1.alpha_row):
                        m.d.comb += [lane.a.eq(qo_alpha), lane.b.eq(qo_alpha)]
                    if g.contrast_packed:
                        with m.Elif(tag1.input_row):
                            m.d.comb += [lane.a.eq(s.lane_activation_rd[p].data),
                                         lane.b.eq(u_input)]
                    with m.Else():
                        m.d.comb += [lane.a.eq(activation_rd.data), lane.b.eq(x_value)]

    # ---------------------------------------------------------------- S2: lane controls
    def _build_lane_controls(self, m, s):
        """The lanes' adder controls, for the products of phases B and U (and, with
        ``lane_sums``, C and A; with a U phase, the ring that passes the c_j token): the lanes
        take them a stage ahead, from ``tag2``, and register them."""
        tag2 = s.tag2
        in_force = tag2.phase == Phase.FORCE
        u_mode = self.geometry.u_mode
        if u_mode:
            for p, lane in enumerate(s.lanes):
                m.d.comb += lane.turn_in.eq(s.lanes[p - 1].turn_out)   # a ring: lane P−1 → 0
        for lane in s.lanes:
            m.d.comb += lane.f_en.eq(tag2.valid & (in_force | (tag2.phase == Phase.INPUT)))
            if s.lane_sums:
                m.d.comb += [lane.c_en.eq(tag2.valid & (tag2.phase == Phase.CONTRAST)),
                             lane.z_en.eq(tag2.valid & (tag2.phase == Phase.Z))]
            if u_mode:
                m.d.comb += [lane.z_row0.eq(tag2.row == 0),
                             lane.u_last.eq(tag2.valid & (tag2.phase == Phase.INPUT) & tag2.last)]
            m.d.comb += [lane.f_first.eq(tag2.first), lane.f_last.eq(tag2.last & in_force),
                         lane.f_alpha.eq(in_force), lane.f_slot.eq(tag2.bank)]

    # ---------------------------------------------------------------- S3+: z path
    def _build_z_path(self, m, s):
        """Phase A's sums: a registered adder tree over the lanes' sums, then per
        bank an accumulator over a row's chunks that starts from the row's initial
        value; the finished ``z_j`` goes to the tanh unit and its activation into
        the a memory (at the count of activations written)."""
        cfg, g = self.cfg, self.geometry
        P, M, of = g.p, cfg.m, cfg.operand_frac
        tag1, tag2, tag3, b_rd, tanh = s.tag1, s.tag2, s.tag3, s.b_rd, s.tanh
        # The tree adds the lanes' running-sum registers: in a z slot the lane's adder
        # passes its product (plus c_j in the first chunk of row j in lane j mod P),
        # so a product has no consumer outside its lane but the lane's adder.
        width = g.c_width + 1 if g.u_mode else g.prod_width    # |p + c_j| < 2^c_width
        tag_chain = [tag1, tag2, tag3]     # the tags a stage of the tree later each
        if s.lane_sums:
            sums = [s.lanes[p].sum0[:width].as_signed() for p in range(P)]
            tag4 = Signal(s.tag_layout)
            m.d.sync += tag4.eq(tag3)
            tag_chain.append(tag4)
        else:
            sums = [s.lanes[p].p for p in range(P)]
        level = 0
        while len(sums) > 1:
            width += 1
            next_sums = []
            for i in range(0, len(sums), 2):
                pair = Signal(signed(width), name=f"tree{level}_{i // 2}")
                m.d.sync += pair.eq(sums[i] + sums[i + 1] if i + 1 < len(sums) else sums[i])
                next_sums.append(pair)
            t = Signal(s.tag_layout, name=f"tagt{level}")
            m.d.sync += t.eq(tag_chain[-1])
            tag_chain.append(t)
            sums = next_sums
            level += 1
        tree_sum = sums[0]
        tag_z = tag_chain[-1]
        tag_z_before = tag_chain[-2]
        tag_z_before2 = tag_chain[-3]
        s.z_busy_bits = tag_chain[3:]     # tag4 (the lanes' sums) and the tree's

        z_acc = [Signal(signed(g.z_width), name=f"z_acc{b}") for b in range(2)]
        z_sum = Signal(signed(g.z_width))
        z_valid = Signal()
        z_bank = Signal()
        # The row's initial value b_j·2^OF (in u_mode formed one stage ahead), plus the
        # tanh unit's rounding half 2^(z_shift−1) (z_biased): below the b term's
        # zero bits it is one constant bit, not an adder. The z width has room for
        # it (|z| stays far below 2^(z_width−2)).
        z_init = Signal(signed(g.z_width))
        zs = cfg.z_shift
        b_term = Signal(signed(g.z_width))
        if zs <= 0:
            m.d.comb += b_term.eq(b_rd.data << of)
        elif zs - 1 < of:
            m.d.comb += b_term.eq((b_rd.data << of) | (1 << (zs - 1)))
        else:
            m.d.comb += b_term.eq((b_rd.data << of) + (1 << (zs - 1)))
        if g.u_mode:
            m.d.sync += z_init.eq(b_term)
            s.b_tag = tag_z_before2     # b is read two stages ahead: z_init is a register
        else:
            m.d.comb += z_init.eq(b_term)
            s.b_tag = tag_z_before      # b_j straight from the RAM's read register
        m.d.comb += z_sum.eq(Mux(tag_z.first, z_init, Mux(tag_z.bank, z_acc[1], z_acc[0]))
                             + tree_sum)
        z_in_phase = Signal()
        m.d.comb += z_in_phase.eq(tag_z.valid & (tag_z.phase == Phase.Z))
        m.d.sync += z_valid.eq(z_in_phase & tag_z.last)
        with m.If(z_in_phase):
            with m.If(tag_z.bank):
                m.d.sync += z_acc[1].eq(z_sum)
            with m.Else():
                m.d.sync += z_acc[0].eq(z_sum)
            m.d.sync += z_bank.eq(tag_z.bank)
        # the finished sum is still in its accumulator when the tanh unit takes it
        z_out = Signal(signed(g.z_width))
        m.d.comb += [z_out.eq(Mux(z_bank, z_acc[1], z_acc[0])),
                     tanh.z.eq(z_out), tanh.valid.eq(z_valid), tanh.tag.eq(0)]
        # activations into the a memory; count finished rows for the interlocks
        activation_wr = s.activation_wr
        m.d.comb += [activation_wr.addr.eq(s.activation_count), activation_wr.data.eq(tanh.a),
                     activation_wr.en.eq(tanh.a_valid)]
        if g.contrast_packed:
            # and into lane j mod P's own memory, at row group j // P (and bank): the
            # counters follow the activations' order as activation_count does
            s.act_lane = Signal(range(P), name="act_lane")
            s.act_group = Signal(range(max(g.ru, 2)), name="act_group")
            s.act_bank = Signal(name="act_bank")
            for p, wr in enumerate(s.lane_activation_wr):
                m.d.comb += [wr.addr.eq(Mux(s.two_banks, Cat(s.act_bank, s.act_group),
                                            s.act_group)),
                             wr.data.eq(tanh.a), wr.en.eq(tanh.a_valid & (s.act_lane == p))]
        a_tag = Signal(1 + ceil_log2(M + 1))    # bank | row << 1 (probe)
        m.d.comb += a_tag.eq(Cat(s.two_banks & s.activation_count[0], s.activation_rows))
        s.z_valid, s.z_out, s.a_tag = z_valid, z_out, a_tag

    # ---------------------------------------------------------------- S3: contrast
    def _build_contrast(self, m, s):
        """Phase C: each lane forms its contrast term (the +ε bank's product waits in
        the lane, the −ε bank's is subtracted from it: ``MacLane.diff``) and the
        lane's accumulator group adds it to the element (``contrast_elem``)."""
        cfg, g = self.cfg, self.geometry
        P, N, K, group_lanes = g.p, cfg.n, cfg.k, g.group_lanes
        tag2, tag3, lanes = s.tag2, s.tag3, s.lanes
        # chunks in which lane p has an oscillator column / a contrast column
        osc_rows = [max(0, -(-(N - p) // P)) for p in range(P)]
        contrast_rows = [max(0, -(-(N + K + 1 - p) // P)) for p in range(P)]
        input_groups = [max(0, -(-(cfg.m - p) // P)) for p in range(P)]   # row groups with j ≡ p
        contrast_valid = Signal()
        m.d.comb += contrast_valid.eq(tag3.valid & (tag3.phase == Phase.CONTRAST))
        if s.lane_sums:
            diffs = [lane.diff for lane in lanes]
        else:
            # the +ε product waits here, the group takes the difference with the −ε one
            plus_product = [Signal(signed(g.prod_width), name=f"plus_product{p}")
                            for p in range(P)]
            for p in range(P):
                with m.If(contrast_valid & ~tag3.bank):
                    m.d.sync += plus_product[p].eq(lanes[p].p)
            diffs = [plus_product[p] - lanes[p].p for p in range(P)]
        # The element index counts at S3 rather than travelling with the tags: the
        # contrast updates arrive in element order, after the step's z slots.
        contrast_elem = Signal(range(max(g.elems, 2)))
        with m.If(tag3.valid & (tag3.phase == Phase.Z)):
            m.d.sync += contrast_elem.eq(0)
        with m.Elif(contrast_valid & tag3.bank):
            m.d.sync += contrast_elem.eq(contrast_elem + 1)
        if s.compact:
            contrast_second = contrast_valid & tag3.bank
        else:
            # ECP5: the groups' valid (their RAMs' read address select) from a register
            contrast_second = Signal()
            m.d.sync += contrast_second.eq(tag2.valid & (tag2.phase == Phase.CONTRAST)
                                           & tag2.bank)
        for q, grp in enumerate(s.groups):
            m.d.comb += [grp.valid.eq(contrast_second), grp.elem.eq(contrast_elem)]
            for li in range(grp.lanes):
                p = q * group_lanes + li
                en = Signal(name=f"contrast_en{p}")
                if g.contrast_packed:
                    m.d.comb += en.eq(Mux(tag3.input_row, tag3.row < input_groups[p],
                                          tag3.chunk < osc_rows[p]))
                else:
                    m.d.comb += en.eq(Mux(tag3.alpha_row, tag3.chunk < osc_rows[p],
                                          tag3.chunk < contrast_rows[p]))
                m.d.comb += [getattr(grp, f"en{li}").eq(en),
                             getattr(grp, f"diff{li}").eq(diffs[p])]
        m.d.comb += s.acc_ovf_set.eq(sum(grp.overflow for grp in s.groups) != 0)

    # ---------------------------------------------------------------- kick serializer
    def _build_kick_serializer(self, m, s):
        """Phase B's finished force sums, one oscillator (and bank) per cycle, as the
        rounded kick ``kick`` of oscillator ``kick_osc`` for the state unit."""
        cfg, g = self.cfg, self.geometry
        P, N, RN, ks = g.p, cfg.n, g.rn, cfg.kick_shift
        tag3, last_bank = s.tag3, s.last_bank
        serial_active = Signal()
        serial_lane = Signal(range(P))
        serial_bank = Signal()
        serial_row = Signal(range(max(RN, 2)))
        serial_osc_base = Signal(range(N + P))
        serial_start = Signal()
        # start with the +ε bank's last product: its sums are final one cycle before the
        # −ε bank's, which the serializer reaches a cycle later anyway
        m.d.comb += serial_start.eq(tag3.valid & (tag3.phase == Phase.FORCE) & tag3.last
                                    & ~tag3.bank)
        serial_done = Signal()
        m.d.comb += serial_done.eq((serial_lane == P - 1) & (serial_bank == last_bank))
        with m.If(serial_start):
            m.d.sync += [serial_active.eq(1), serial_lane.eq(0), serial_bank.eq(0),
                         serial_row.eq(tag3.chunk), serial_osc_base.eq(tag3.chunk * P)]
        with m.Elif(serial_active):
            with m.If(serial_done):
                m.d.sync += serial_active.eq(0)
            with m.Elif(serial_bank != last_bank):
                m.d.sync += serial_bank.eq(1)
            with m.Else():
                m.d.sync += [serial_bank.eq(0), serial_lane.eq(serial_lane + 1)]
        # the selected force sum (comb, or registered in the ECP5 form; the kick is
        # rounded into the state unit's op1)
        kick_valid = Signal()
        kick_sum = Signal(signed(g.f_width))
        kick_osc = Signal(range(N + P))
        kick_lane = Signal(range(P))
        kick_row = Signal(range(max(RN, 2)))
        kick_bank = Signal()
        serial_sum = Signal(signed(g.f_width))
        lanes = s.lanes
        if P > 1:
            # the lanes' kick chain brings the sums to lane 0 in the serializer's order
            for p, lane in enumerate(lanes):
                m.d.comb += [lane.two_banks.eq(s.two_banks),
                             lane.chain_in.eq(lanes[p + 1].kick0 if p + 1 < P else 0)]
            m.d.comb += serial_sum.eq(lanes[0].kick0)
        else:
            with m.Switch(serial_bank):
                for b in range(2):
                    with m.Case(b):
                        m.d.comb += serial_sum.eq(lanes[0].kick1 if b else lanes[0].kick0)
        kick_sigs = [kick_valid, kick_sum, kick_osc, kick_lane, kick_row, kick_bank]
        kick_values = [serial_active & (serial_osc_base + serial_lane < N), serial_sum,
                       serial_osc_base + serial_lane, serial_lane, serial_row, serial_bank]
        if s.compact:
            m.d.comb += [x.eq(v) for x, v in zip(kick_sigs, kick_values)]
            s.kick_reg_valid = []
        else:
            s.kick_reg_valid = [kick_valid]
            # ECP5: the kick and its oscillator are registered before the state unit
            # (which lies apart from the lanes), a cycle later
            m.d.sync += [x.eq(v) for x, v in zip(kick_sigs, kick_values)]
        kick = Signal(signed(g.kick_width))
        if ks > 0:      # the sums carry the rounding half (f_bias)
            m.d.comb += kick.eq(kick_sum >> ks)
        else:
            m.d.comb += kick.eq(kick_sum << -ks)
        s.serial_active = serial_active
        s.kick_valid, s.kick_osc, s.kick_lane = kick_valid, kick_osc, kick_lane
        s.kick_row, s.kick_bank, s.kick = kick_row, kick_bank, kick

    # ---------------------------------------------------------------- state unit
    def _state_bank(self, s, bank):
        """The state bank that working bank ``bank`` uses: fwd (0), or in an echo
        pos (1) and neg (2)."""
        return Mux(bank, 2, Mux(s.echo, 1, 0))

    def _state_base(self, state_bank):
        """The state memory's address of oscillator 0 of ``state_bank``."""
        N = self.cfg.n
        return Mux(state_bank == 2, 2 * N, Mux(state_bank == 1, N, 0))

    def _build_state_unit(self, m, s):
        """The serial state unit: one oscillator op per cycle, from the kick serializer
        or the pre-step generator (``pre_op``), through five stages; ``opN`` is the
        op in stage N:

        * 0 (comb): address the state memory (Q, Wv) of the op's source bank;
        * 1: QH = Q + Wv (``qh``), Wv' = Wv − kick (``w2``); a pre-step op keeps Q
          and gives −Wv (flip) or zeroes both;
        * 2: Q' = QH + Wv' (``q2``), Wv' ± ν with the next step's nudge (``wn``);
        * 3: write (Q', Wv') back to the destination bank, emit Q' as an output,
          form Q' + Wv' (``qn``); the self-test checks for zero here;
        * 4: the next step's operand qo = sat(rshift(Q' + Wv')) into the operand
          memory of the oscillator's lane.

        The ECP5 form registers the state word after the memory (``op0_reg``): then
        stage 1 is a cycle later.
        """
        cfg, g = self.cfg, self.geometry
        P, N, O, RN = g.p, cfg.n, cfg.o, g.rn
        ow, sw = cfg.operand_width, cfg.state_width
        state_rd, state_wr, operand_wr = s.state_rd, s.state_wr, s.operand_wr
        output_fifo, nudge = s.output_fifo, s.nudge
        op_layout = data.StructLayout({
            "valid": 1,
            "update": 1,        # kick update (else a pre-step op)
            "zero": 1,          # pre-step: zero the state (else flip)
            "src_bank": 2, "dst_bank": 2,   # state banks read and written
            "osc": range(N + P), "lane": range(P), "row": range(max(RN, 2)),   # osc = row·P + lane
            "bank": 1,          # working bank: the operand row and the nudge's sign
            "nudge": 1,         # add the next step's nudge
            "next": 1,          # there is a next step: write its operand
            "emit": 1,          # FORWARD output
            "check": 1,         # the self-test's last step: the state must be zero
        })
        op0 = Signal(op_layout)
        op0_kick = Signal(signed(g.kick_width))
        pre_op = Signal(op_layout)     # from the pre-step generator (comb)
        s.pre_op = pre_op
        first_output = N - O

        if s.compact:
            pre_op_source, pre_busy = pre_op, []
        else:
            # ECP5: the pre-step's ops (decoded from the control FSM's state) are
            # registered, so op0 and the state memory's address come from registers
            pre_op_source = Signal(op_layout)
            m.d.sync += pre_op_source.eq(pre_op)
            pre_busy = [pre_op_source.valid]
        with m.If(s.kick_valid):
            kick_bank, kick_osc, has_next = s.kick_bank, s.kick_osc, s.has_next
            output_osc = kick_osc >= first_output
            m.d.comb += [op0.valid.eq(1), op0.update.eq(1), op0.zero.eq(0),
                         op0.src_bank.eq(self._state_bank(s, kick_bank)),
                         op0.dst_bank.eq(self._state_bank(s, kick_bank)), op0.osc.eq(kick_osc),
                         op0.lane.eq(s.kick_lane), op0.row.eq(s.kick_row),
                         op0.bank.eq(kick_bank),
                         op0.nudge.eq(s.echo & ~s.kick_only & has_next & output_osc),
                         op0.next.eq(has_next), op0.emit.eq(s.emit_outputs & output_osc),
                         op0.check.eq(s.selftest_echo & ~has_next), op0_kick.eq(s.kick)]
        with m.Else():
            m.d.comb += op0.eq(pre_op_source)

        with m.If(op0.valid):
            m.d.comb += state_rd.addr.eq(self._state_base(op0.src_bank) + op0.osc)
        op1 = Signal(op_layout)
        op1_kick = Signal(signed(g.kick_width))
        # The state word: straight from the memory in the compact form; else its
        # read data is registered first (stage 1 a cycle later), as on ECP5 the block
        # RAM's clock-to-out, routing and the adders do not fit 60 MHz together.
        state_word = Signal.like(state_rd.data)
        s.state_word = state_word
        if s.compact:
            m.d.sync += [op1.eq(op0), op1_kick.eq(op0_kick)]
            m.d.comb += state_word.eq(state_rd.data)
            op_reading = []
        else:
            op0_reg = Signal(op_layout)
            op0_reg_kick = Signal(signed(g.kick_width))
            m.d.sync += [op0_reg.eq(op0), op0_reg_kick.eq(op0_kick),
                         op1.eq(op0_reg), op1_kick.eq(op0_reg_kick),
                         state_word.eq(state_rd.data)]
            op_reading = [op0_reg.valid]
        Q = Signal(signed(sw))
        Wv = Signal(signed(sw))
        m.d.comb += [Q.eq(Mux(op1.zero, 0, state_word[:sw].as_signed())),
                     Wv.eq(Mux(op1.zero, 0, state_word[sw:].as_signed()))]
        # a pre-step op keeps Q: its qh is Q itself (no separate copy of Q)
        qh, qh_ovf = _wrap(m, Q + Mux(op1.update, Wv, 0), sw, "qh")
        w2, w2_ovf = _wrap(m, Mux(op1.update, Wv - op1_kick, -Wv), sw, "w2")
        op2 = Signal(op_layout)
        qh_r = Signal(signed(sw))
        w2_r = Signal(signed(sw))
        m.d.sync += [op2.eq(op1), qh_r.eq(qh), w2_r.eq(w2)]
        q2, q2_ovf = _wrap(m, qh_r + w2_r, sw, "q2")
        wn, wn_ovf = _wrap(m, Mux(op2.bank, w2_r - nudge, w2_r + nudge), sw, "wn")
        m.d.comb += s.nudge_take.eq(op2.valid & op2.nudge & (op2.bank == s.last_bank))
        op3 = Signal(op_layout)
        q3 = Signal(signed(sw))
        w3 = Signal(signed(sw))
        m.d.sync += [op3.eq(op2), q3.eq(Mux(op2.update, q2, qh_r)),
                     w3.eq(Mux(op2.nudge, wn, w2_r))]
        m.d.comb += [state_wr.addr.eq(self._state_base(op3.dst_bank) + op3.osc),
                     state_wr.data.eq(Cat(q3, w3)), state_wr.en.eq(op3.valid),
                     output_fifo.w_data.eq(q3), output_fifo.w_en.eq(op3.valid & op3.emit)]
        qn, qn_ovf = _wrap(m, q3 + w3, sw, "qn")
        with m.If(op3.valid & op3.check & ((q3 != 0) | (w3 != 0))):
            m.d.sync += s.selftest_pass.eq(0)
        op4 = Signal(op_layout)
        qn_r = Signal(signed(sw))
        m.d.sync += [op4.eq(op3), qn_r.eq(qn)]
        osh = cfg.operand_shift
        qo_wide = Signal(signed(sw + 1))
        if osh > 0:
            m.d.comb += qo_wide.eq((qn_r + (1 << (osh - 1))) >> osh)
        else:
            m.d.comb += qo_wide.eq(qn_r)
        qo = saturate_signed(m, qo_wide, ow, "qo")
        operand_wr_addr = Mux(op4.bank, RN + op4.row, op4.row)
        if s.late_contrast:
            # a step's kicks write the next step's page; the pre-step's ops the page
            # the first step reads
            operand_wr_addr = operand_wr_addr + Mux(op4.update ^ s.x_page, 2 * RN, 0)
        for p in range(P):
            m.d.comb += [operand_wr[p].addr.eq(operand_wr_addr),
                         operand_wr[p].data.eq(qo),
                         operand_wr[p].en.eq(op4.valid & op4.next & (op4.lane == p))]
        m.d.comb += s.state_ovf_set.eq(
            (op1.valid & ((op1.update & qh_ovf) | w2_ovf))
            | (op2.valid & ((op2.update & q2_ovf) | (op2.nudge & wn_ovf)))
            | (op3.valid & op3.next & qn_ovf))
        state_busy = Signal()
        # stage 4 (the operand memory write) is left out: a step may issue its first
        # read in the cycle after that write
        m.d.comb += state_busy.eq(Cat(s.serial_active, *s.kick_reg_valid, *pre_busy,
                                      *op_reading, op1.valid, op2.valid, op3.valid) != 0)
        s.state_busy = state_busy

    # ---------------------------------------------------------------- input loader
    def _build_input_loader(self, m, s):
        """The inputs of the next step into ``u_current``: K words read from the
        sequence buffer (or made by the self-test generator) at the sequence index
        ``seq_index``; and LOAD's write address ``load_addr`` of the same buffer.

        ``loader_start`` (comb) starts a row; ``loader_advance`` marks a start for the
        next step (rather than the pass's first), which in an echo
        (``loader_down``) also moves the index back two rows."""
        cfg = self.cfg
        K, ow, of = cfg.k, cfg.operand_width, cfg.operand_frac
        seq_depth = cfg.t_max * K
        mix, seqbuf, u_current = s.mix, s.seqbuf, s.u_current
        s.load_rows_left = Signal(range(cfg.t_max + 1))   # LOAD rows still to come
        s.load_col = Signal(range(K + 1))
        load_addr = Signal(range(seq_depth + 1))
        s.load_addr = load_addr
        loader_busy = Signal()
        loader_issue = Signal()
        loader_col = Signal(range(K + 1))
        loader_words_left = Signal(range(K + 1))   # words still to be written
        # seq_index: the sequence index t·K + k of the next word, one counter with one
        # adder. Issuing a row leaves it at the next row (t+1)·K, which is where a
        # forward pass goes next; an echo goes back two rows (−2K), and the
        # self-test's echo starts one row back (−K, seq_index_back).
        seq_index = Signal(32)
        seq_index_init = Signal()        # comb: load seq_index with seq_index_init_value
        seq_index_init_value = Signal(32)
        seq_index_back = Signal()        # comb: step back one row
        loader_start = Signal()
        loader_advance = Signal()
        loader_down = Signal()
        loader_ready = Signal()
        s.seq_index_init, s.seq_index_init_value = seq_index_init, seq_index_init_value
        s.seq_index_back = seq_index_back
        s.loader_start, s.loader_advance = loader_start, loader_advance
        s.loader_down, s.loader_ready = loader_down, loader_ready
        seq_index_delta = Signal(signed(ceil_log2(2 * K + 1) + 2))
        loader_go = Signal()           # issue a word: the generator takes it (self-test)
        m.d.comb += loader_go.eq(loader_issue & (~s.selftest | mix.ready))
        m.d.comb += seq_index_delta.eq(Mux(loader_issue, 1, Mux(seq_index_back, -K, -2 * K)))
        seq_index_next = Signal(32)
        m.d.comb += seq_index_next.eq(seq_index + seq_index_delta)
        with m.If(seq_index_init):
            m.d.sync += seq_index.eq(seq_index_init_value)
        with m.Elif(loader_start):
            m.d.sync += [loader_busy.eq(1), loader_issue.eq(1), loader_col.eq(0),
                         loader_words_left.eq(K)]
            with m.If(loader_advance & loader_down):
                m.d.sync += seq_index.eq(seq_index_next)
        with m.Elif(loader_go | seq_index_back):
            m.d.sync += seq_index.eq(seq_index_next)
        with m.If(loader_go & ~loader_start):
            m.d.sync += loader_col.eq(loader_col + 1)
            with m.If(loader_col == K - 1):
                m.d.sync += loader_issue.eq(0)
        m.d.comb += loader_ready.eq(~loader_busy)
        # One address for both ports of the sequence buffer (LOAD writes, the loader
        # reads, never at once): a single-port memory, which Yosys can place in an
        # iCE40UP5K SPRAM (synth_ice40 -spram) for long sequences.
        seq_addr = Signal(range(max(seq_depth, 2)))
        loading = Signal()
        s.loading = loading
        m.d.comb += [seq_addr.eq(Mux(loading, load_addr, seq_index)),
                     seqbuf.addr.eq(seq_addr)]
        m.d.comb += [mix.x.eq(seq_index ^ s.cmd_seed),
                     mix.valid.eq(loader_go & s.selftest), mix.tag.eq(loader_col)]
        # the word read arrives seqbuf.read_latency cycles after its address
        read_valid = loader_go & ~s.selftest
        read_col = loader_col
        for i in range(seqbuf.read_latency, 0, -1):
            sfx = str(i - 1) if i > 1 else ""
            rv, rc = Signal(name="read_valid" + sfx), Signal(range(K + 1), name="read_col" + sfx)
            m.d.sync += [rv.eq(read_valid), rc.eq(read_col)]
            read_valid, read_col = rv, rc
        u_write = Signal()
        u_write_col = Signal(range(K + 1))
        u_write_value = Signal(signed(ow))
        with m.If(s.selftest):
            m.d.comb += [u_write.eq(mix.y_valid), u_write_col.eq(mix.y_tag),
                         u_write_value.eq(mix.y[:ow].as_signed() >> (ow + 1 - of))]
        with m.Else():
            m.d.comb += [u_write.eq(read_valid), u_write_col.eq(read_col),
                         u_write_value.eq(seqbuf.rdata)]
        with m.If(u_write):
            for k in range(K):
                with m.If(u_write_col == k):
                    m.d.sync += u_current[k].eq(u_write_value)
            with m.If(loader_words_left == 1):
                m.d.sync += loader_busy.eq(0)
            m.d.sync += loader_words_left.eq(loader_words_left - 1)

    # ---------------------------------------------------------------- drain, streams
    def _build_drain_detect(self, m, s):
        """``drained``: no slot, sum, activation or state op of the step in flight."""
        drained = Signal()
        busy_bits = (s.tag_rd_valid + [s.tag1.valid, s.tag2.valid, s.tag3.valid, s.z_valid,
                                        s.tanh.busy, s.state_busy]
                     + [t.valid for t in s.z_busy_bits] + [grp.busy for grp in s.groups])
        m.d.comb += drained.eq(Cat(*busy_bits) == 0)
        s.drained = drained
        # What the next step's A phase waits for: with the contrast last, everything
        # but the contrast's own tail (its slots in flight and the accumulator
        # groups), which shares no register, memory word or counter with phase A
        # (the contrast's element counter restarts only when A's first slot
        # reaches it, behind the contrast's last), nor U's and B's slots in the
        # adder tree's tag stages, which only z sums use.
        s.step_drained = drained
        if s.late_contrast:
            def other(tag):
                return tag.valid & (tag.phase != Phase.CONTRAST)
            step_bits = ([other(s.tag0r)] if s.tag_rd_valid else []) + \
                [other(s.tag1), other(s.tag2), other(s.tag3), s.z_valid, s.tanh.busy,
                 s.state_busy] + [t.valid & (t.phase == Phase.Z) for t in s.z_busy_bits]
            s.step_drained = Signal()
            m.d.comb += s.step_drained.eq(Cat(*step_bits) == 0)

    def _build_stream_counters(self, m, s):
        """The ``outputs`` stream from the outputs FIFO, and the count of nudge words
        an ECHO still accepts (``nudge_rows_left`` rows of O words)."""
        cfg, output_fifo = self.cfg, s.output_fifo
        O = cfg.o
        m.d.comb += [self.outputs.payload.eq(output_fifo.r_data.as_signed()),
                     self.outputs.valid.eq(output_fifo.r_rdy),
                     output_fifo.r_en.eq(self.outputs.ready)]
        nudge_rows_left = Signal(range(cfg.t_max + 1))   # nudge rows still to accept
        nudge_col = Signal(range(O + 1))
        m.d.comb += s.nudge_accept.eq(nudge_rows_left != 0)
        with m.If(self.nudges.valid & self.nudges.ready):
            with m.If(nudge_col == O - 1):
                m.d.sync += [nudge_col.eq(0), nudge_rows_left.eq(nudge_rows_left - 1)]
            with m.Else():
                m.d.sync += nudge_col.eq(nudge_col + 1)
        s.nudge_rows_left, s.nudge_col = nudge_rows_left, nudge_col

    # ---------------------------------------------------------------- control
    def _build_control(self, m, s):
        """The control FSM ``ctl``: IDLE takes a command, DONE reports its result; the
        transfer states move parameters, accumulators, state and the sequence; the
        engine states run the pre-step and then every step's phases."""
        cfg, g = self.cfg, self.geometry
        N, RN, ow = cfg.n, g.rn, cfg.operand_width
        s.param_walker = s.acc_walker = _Walker(m, g, "walk")     # one walker for both orders
        m.d.comb += s.param_walker.skip.eq(s.cmd_skip)

        if not s.compact:
            # READ_PARAMS: in the ECP5 form the addressed word comes from a register
            # (a block RAM's clock-to-out, the P-way selection and the reply's bit
            # selection do not fit 60 MHz in one cycle)
            param_word = Signal(signed(ow))
            m.d.sync += param_word.eq(_param_word(m, s.param_walker, s.param_rd, s.b_rd,
                                                  "param_lane_word"))
            s.param_word = param_word

        # readout helper register: index into state / clear address
        s.readout_index = Signal(range(max(2 * N, g.acc_depth) + 1))
        s.readout_wv = Signal()   # READ_STATE: Wv pass

        # pre-step generator
        s.pre_osc = Signal(range(N + 1))
        s.pre_lane = Signal(range(g.p))
        s.pre_row = Signal(range(max(RN, 2)))
        s.pre_bank = Signal()

        m.d.comb += [self.cmd.ready.eq(0), self.busy.eq(1)]
        m.d.comb += self.done.payload.result.eq(s.result)
        m.d.comb += self.done.payload.selftest_pass.eq(s.selftest_pass)

        with m.FSM(name="ctl"):
            self._idle_state(m, s)
            self._parameter_states(m, s)
            self._readout_states(m, s)
            self._load_state(m, s)
            self._pre_step_states(m, s)
            self._phase_states(m, s)

    @staticmethod
    def _set_mode(s, *, emit_outputs, echo, selftest, two_banks, accumulate, negate_contrast,
                  kick_only, flip_state, loader_down):
        """The assignments that set the engine's mode for a FORWARD, ECHO or SELFTEST
        pass; each consumes the forward (``forward_mode`` NONE)."""
        return [s.emit_outputs.eq(emit_outputs), s.echo.eq(echo), s.selftest.eq(selftest),
                s.selftest_echo.eq(0), s.two_banks.eq(two_banks), s.accumulate.eq(accumulate),
                s.negate_contrast.eq(negate_contrast), s.kick_only.eq(kick_only),
                s.flip_state.eq(flip_state), s.loader_down.eq(loader_down),
                s.forward_mode.eq(ForwardMode.NONE)]

    def _idle_state(self, m, s):
        """IDLE: latch a command, check its arguments and the core's state as GoldenCore
        does, set the engine's mode; DONE: hand back the result."""
        cfg = self.cfg
        with m.State("IDLE"):
            m.d.comb += [self.cmd.ready.eq(1), self.busy.eq(0)]
            cmd = self.cmd.payload
            with m.If(self.cmd.valid):
                m.d.sync += [s.cmd_op.eq(cmd.op), s.cmd_length.eq(cmd.length),
                             s.cmd_bank.eq(cmd.bank), s.cmd_seed.eq(cmd.seed),
                             s.cmd_skip.eq(cmd.skip),
                             s.result.eq(Result.OK), s.selftest_pass.eq(0)]
                with m.Switch(cmd.op):
                    with m.Case(Op.WRITE_PARAMS, Op.READ_PARAMS):
                        m.next = "PARAMS_START"
                    with m.Case(Op.LOAD):
                        tb = cfg.t_max.bit_length()   # > t_max without a 32-bit compare
                        too_long = (cmd.length[tb:] != 0) | (cmd.length[:tb] > cfg.t_max)
                        with m.If((cmd.length == 0) | too_long):
                            m.d.sync += s.result.eq(Result.BAD_ARG)
                            m.next = "DONE"
                        with m.Else():
                            m.d.sync += [s.load_rows_left.eq(cmd.length), s.load_col.eq(0),
                                         s.load_addr.eq(0)]
                            m.next = "LOAD"
                    with m.Case(Op.FORWARD):
                        with m.If(s.loaded_length == 0):
                            m.d.sync += s.result.eq(Result.WRONG_STATE)
                            m.next = "DONE"
                        with m.Else():
                            m.d.comb += [s.seq_index_init.eq(1), s.seq_index_init_value.eq(0)]
                            m.d.sync += self._set_mode(
                                s, emit_outputs=1, echo=0, selftest=0, two_banks=0,
                                accumulate=cmd.one_sided & ~cmd.no_acc, negate_contrast=1,
                                kick_only=0, flip_state=0, loader_down=0)
                            m.d.sync += s.one_sided.eq(cmd.one_sided)
                            m.next = "PRE_STEP_START"
                    with m.Case(Op.ECHO):
                        with m.If(s.forward_mode == ForwardMode.NONE):
                            m.d.sync += s.result.eq(Result.WRONG_STATE)
                            m.next = "DONE"
                        with m.Else():
                            m.d.comb += [s.seq_index_init.eq(1),
                                         s.seq_index_init_value.eq(s.last_row_base)]
                            m.d.sync += self._set_mode(
                                s, emit_outputs=0, echo=1, selftest=0,
                                two_banks=s.forward_mode == ForwardMode.CENTRED, accumulate=1,
                                negate_contrast=0, kick_only=cmd.kick, flip_state=1,
                                loader_down=1)
                            m.d.sync += [s.nudge_rows_left.eq(Mux(cmd.kick, 1, s.loaded_length)),
                                         s.nudge_col.eq(0)]
                            m.next = "PRE_STEP_START"
                    with m.Case(Op.READ_ACC):
                        m.d.comb += [s.acc_walker.reset.eq(1), s.acc_walker.acc.eq(1)]
                        m.next = "READ_ACC_ISSUE"
                    with m.Case(Op.CLEAR_ACC):
                        m.d.sync += s.readout_index.eq(0)
                        m.next = "CLEAR_ACC"
                    with m.Case(Op.READ_STATE):
                        with m.If(cmd.bank == 3):
                            m.d.sync += s.result.eq(Result.BAD_ARG)
                            m.next = "DONE"
                        with m.Else():
                            m.d.sync += [s.readout_index.eq(0), s.readout_wv.eq(0)]
                            m.next = "READ_STATE_ISSUE"
                    with m.Case(Op.CLEAR_FLAGS):
                        m.d.comb += s.clear_flags.eq(1)
                        m.next = "DONE"
                    with m.Case(Op.SELFTEST):
                        with m.If(cmd.length == 0):
                            m.d.sync += s.result.eq(Result.BAD_ARG)
                            m.next = "DONE"
                        with m.Else():
                            m.d.comb += [s.seq_index_init.eq(1), s.seq_index_init_value.eq(0)]
                            m.d.sync += self._set_mode(
                                s, emit_outputs=0, echo=0, selftest=1, two_banks=0,
                                accumulate=0, negate_contrast=0, kick_only=0, flip_state=0,
                                loader_down=0)
                            m.next = "PRE_STEP_START"
                    with m.Default():
                        m.d.sync += s.result.eq(Result.BAD_ARG)
                        m.next = "DONE"

        with m.State("DONE"):
            m.d.comb += self.done.valid.eq(1)
            with m.If(self.done.ready):
                m.next = "IDLE"

    def _parameter_states(self, m, s):
        """WRITE_PARAMS and READ_PARAMS: the walker in canonical order over the lanes'
        parameter memories and the b memory (it needs the latched skip mask)."""
        P, compact = self.geometry.p, s.compact
        param_walker, param_rd, param_wr = s.param_walker, s.param_rd, s.param_wr
        b_rd, b_wr, word_in = s.b_rd, s.b_wr, self.params_in.payload
        with m.State("PARAMS_START"):
            m.d.comb += param_walker.reset.eq(1)
            with m.If(s.cmd_skip == 0b1111):
                m.next = "DONE"
            with m.Elif(s.cmd_op == Op.WRITE_PARAMS):
                m.next = "WRITE_PARAMS"
            with m.Else():
                m.next = "READ_PARAMS_ISSUE"

        with m.State("WRITE_PARAMS"):
            m.d.comb += self.params_in.ready.eq(1)
            with m.If(self.params_in.valid):
                with m.If(param_walker.is_b):
                    m.d.comb += [b_wr.addr.eq(param_walker.j), b_wr.data.eq(word_in),
                                 b_wr.en.eq(1)]
                with m.Else():
                    for p in range(P):
                        m.d.comb += [param_wr[p].addr.eq(param_walker.addr),
                                     param_wr[p].data.eq(word_in),
                                     param_wr[p].en.eq(param_walker.lane == p)]
                m.d.comb += param_walker.step.eq(1)
                with m.If(param_walker.last):
                    m.next = "DONE"

        with m.State("READ_PARAMS_ISSUE"):
            for p in range(P):
                m.d.comb += [param_rd[p].addr.eq(param_walker.addr), param_rd[p].en.eq(1)]
            m.d.comb += [b_rd.addr.eq(param_walker.j), b_rd.en.eq(1)]
            m.next = "READ_PARAMS_HOLD" if compact else "READ_PARAMS_REG"
        if not compact:
            with m.State("READ_PARAMS_REG"):     # the word reaches param_word
                for p in range(P):
                    m.d.comb += param_rd[p].en.eq(0)
                m.d.comb += b_rd.en.eq(0)
                m.next = "READ_PARAMS_HOLD"
        with m.State("READ_PARAMS_HOLD"):
            for p in range(P):
                m.d.comb += param_rd[p].en.eq(0)
            m.d.comb += b_rd.en.eq(0)
            if compact:     # the word straight from the memories
                param_word = _param_word(m, param_walker, param_rd, b_rd, "param_word")
            else:
                param_word = s.param_word
            _offer_walked_word(m, self.params_out, param_word, param_walker, "READ_PARAMS_ISSUE")

    def _readout_states(self, m, s):
        """READ_ACC (the walker in accumulator order), CLEAR_ACC and READ_STATE."""
        cfg, g = self.cfg, self.geometry
        N, aw, sw = cfg.n, cfg.acc_width, cfg.state_width
        acc_walker, groups, state_rd = s.acc_walker, s.groups, s.state_rd
        readout_index, readout_wv = s.readout_index, s.readout_wv
        if s.compact:
            with m.State("READ_ACC_ISSUE"):
                for grp in groups:
                    m.d.comb += [grp.ext.eq(1), grp.ext_raddr.eq(acc_walker.acc_addr)]
                m.next = "READ_ACC_HOLD"
            with m.State("READ_ACC_HOLD"):
                acc_word = Signal(signed(aw))
                with m.Switch(acc_walker.group):
                    for q, grp in enumerate(groups):
                        with m.Case(q):
                            m.d.comb += acc_word.eq(grp.ext_rdata)
                for grp in groups:   # keep the address so the data stays
                    m.d.comb += [grp.ext.eq(1), grp.ext_raddr.eq(acc_walker.acc_addr)]
                _offer_walked_word(m, self.acc_out, acc_word, acc_walker, "READ_ACC_ISSUE")
        else:
            # One word per cycle: READ_ACC_ISSUE reads the walker's next word while
            # credit lasts. The pipelined groups register the address (cycle 1),
            # their memory's word arrives (2) and the selected word is registered
            # (3) into a FIFO that feeds ``acc_out``; the credit counts words issued
            # and not yet taken, so the FIFO never overflows and ``acc_out``'s
            # ``ready`` reaches no memory.
            depth = 6
            fifo = m.submodules.acc_fifo = SyncFIFO(width=aw, depth=depth)
            issue = Signal(name="acc_issue")
            used = Signal(range(depth + 1), name="acc_used")
            v1, v2, v3 = Signal(name="acc_v1"), Signal(name="acc_v2"), Signal(name="acc_v3")
            grp1 = Signal.like(acc_walker.group, name="acc_group1")
            grp2 = Signal.like(acc_walker.group, name="acc_group2")
            acc_word_r = Signal(signed(aw))
            m.d.sync += [v1.eq(issue), v2.eq(v1), v3.eq(v2),
                         grp1.eq(acc_walker.group), grp2.eq(grp1),
                         acc_word_r.eq(Array(grp.ext_rdata for grp in groups)[grp2])]
            taken = fifo.r_rdy & fifo.r_en
            m.d.sync += used.eq(used + issue - taken)
            m.d.comb += [fifo.w_en.eq(v3), fifo.w_data.eq(acc_word_r),
                         self.acc_out.valid.eq(fifo.r_rdy),
                         self.acc_out.payload.eq(fifo.r_data.as_signed()),
                         fifo.r_en.eq(self.acc_out.ready)]
            with m.State("READ_ACC_ISSUE"):
                for grp in groups:
                    m.d.comb += [grp.ext.eq(1), grp.ext_raddr.eq(acc_walker.acc_addr)]
                with m.If(used < depth):
                    m.d.comb += [issue.eq(1), acc_walker.step.eq(1)]
                    with m.If(acc_walker.last):
                        m.next = "READ_ACC_DRAIN"
            with m.State("READ_ACC_DRAIN"):
                with m.If(used == 0):
                    m.next = "DONE"
        with m.State("CLEAR_ACC"):
            for grp in groups:
                m.d.comb += [grp.ext.eq(1), grp.ext_waddr.eq(readout_index),
                             grp.ext_clear.eq(1)]
            m.d.sync += readout_index.eq(readout_index + 1)
            with m.If(readout_index == g.acc_depth - 1):
                m.d.comb += s.clear_acc_flag.eq(1)
                m.next = "DONE"

        with m.State("READ_STATE_ISSUE"):
            m.d.comb += [state_rd.addr.eq(self._state_base(s.cmd_bank) + readout_index),
                         state_rd.en.eq(1)]
            m.next = "READ_STATE_HOLD" if s.compact else "READ_STATE_REG"
        if not s.compact:
            with m.State("READ_STATE_REG"):     # the word reaches state_word
                m.d.comb += state_rd.en.eq(0)
                m.next = "READ_STATE_HOLD"
        with m.State("READ_STATE_HOLD"):
            state_word = s.state_word
            m.d.comb += [state_rd.en.eq(0), self.state_out.valid.eq(1),
                         self.state_out.payload.eq(Mux(readout_wv, state_word[sw:],
                                                       state_word[:sw]))]
            with m.If(self.state_out.ready):
                with m.If(readout_index == N - 1):
                    m.d.sync += [readout_index.eq(0), readout_wv.eq(1)]
                    with m.If(readout_wv):
                        m.next = "DONE"
                    with m.Else():
                        m.next = "READ_STATE_ISSUE"
                with m.Else():
                    m.d.sync += readout_index.eq(readout_index + 1)
                    m.next = "READ_STATE_ISSUE"

    def _load_state(self, m, s):
        """LOAD: T·K words into the sequence buffer; the last row's base is where an
        echo starts reading."""
        K, seqbuf = self.cfg.k, s.seqbuf
        load_addr, load_col, load_rows_left = s.load_addr, s.load_col, s.load_rows_left
        with m.State("LOAD"):
            m.d.comb += [self.inputs.ready.eq(1), s.loading.eq(1),
                         seqbuf.wdata.eq(self.inputs.payload), seqbuf.we.eq(self.inputs.valid)]
            with m.If(self.inputs.valid):
                m.d.sync += load_addr.eq(load_addr + 1)
                with m.If(load_col == 0):
                    m.d.sync += s.last_row_base.eq(load_addr)
                with m.If(load_col == K - 1):
                    m.d.sync += [load_col.eq(0), load_rows_left.eq(load_rows_left - 1)]
                    with m.If(load_rows_left == 1):
                        m.d.sync += [s.loaded_length.eq(s.cmd_length),
                                     s.forward_mode.eq(ForwardMode.NONE)]
                        m.next = "DONE"
                with m.Else():
                    m.d.sync += load_col.eq(load_col + 1)

    def _pre_step_states(self, m, s):
        """PRE_STEP_START and PRE_STEP: the pre-step zeroes (FORWARD, SELFTEST) or
        flips (ECHO, the self-test's echo) every oscillator of every working bank
        through the state unit, reading the fwd bank; STEP_WAIT: the first step
        starts once the pre-step has drained."""
        g, N = self.geometry, self.cfg.n
        P, first_output = g.p, N - self.cfg.o
        pre_op, pre_osc, pre_lane, pre_row = s.pre_op, s.pre_osc, s.pre_lane, s.pre_row
        pre_bank = s.pre_bank
        echo, last_bank = s.echo, s.last_bank
        with m.State("PRE_STEP_START"):
            # the first step's nudge row must be buffered before the flip uses it
            need_nudge = echo & ~s.nudge_row_ready
            with m.If(~need_nudge):
                m.d.comb += [s.loader_start.eq(1), s.loader_advance.eq(0),
                             s.steps_left_load.eq(1)]
                m.d.sync += [pre_osc.eq(0), pre_lane.eq(0), pre_row.eq(0), pre_bank.eq(0)]
                with m.If(s.selftest_echo):
                    m.d.sync += s.selftest_pass.eq(1)
                m.next = "PRE_STEP"
        with m.State("PRE_STEP"):
            m.d.comb += [pre_op.valid.eq(1), pre_op.update.eq(0), pre_op.zero.eq(~s.flip_state),
                         pre_op.src_bank.eq(0),
                         pre_op.dst_bank.eq(self._state_bank(s, pre_bank)),
                         pre_op.osc.eq(pre_osc), pre_op.lane.eq(pre_lane), pre_op.row.eq(pre_row),
                         pre_op.bank.eq(pre_bank),
                         pre_op.nudge.eq(echo & (pre_osc >= first_output)),
                         pre_op.next.eq(1)]
            with m.If(pre_bank != last_bank):
                m.d.sync += pre_bank.eq(1)
            with m.Else():
                m.d.sync += [pre_bank.eq(0), pre_osc.eq(pre_osc + 1)]
                with m.If(pre_lane == P - 1):
                    m.d.sync += [pre_lane.eq(0), pre_row.eq(pre_row + 1)]
                with m.Else():
                    m.d.sync += pre_lane.eq(pre_lane + 1)
                with m.If(pre_osc == N - 1):
                    m.next = "STEP_WAIT"

        # ---- wait for the pre-step to drain, then start the first step
        with m.State("STEP_WAIT"):
            with m.If(s.drained & s.loader_ready):
                m.d.sync += self._restart_issue(s)
                if g.u_mode:
                    m.d.sync += [s.issue_row_base.eq(g.u_base), s.step_after_input.eq(0)]
                    m.next = "INPUT_PRODUCTS"
                else:
                    m.next = "Z_SUMS"

    @staticmethod
    def _restart_issue(s):
        """The assignments that set the issue counters to phase A's first slot."""
        restart = [s.issue_bank.eq(0), s.issue_chunk.eq(0), s.issue_row.eq(0),
                   s.issue_row_base.eq(0), s.activation_count.eq(0)]
        if hasattr(s, "act_lane"):
            restart += [s.act_lane.eq(0), s.act_group.eq(0), s.act_bank.eq(0)]
        return restart

    def _start_input_products(self, s):
        """The assignments that set the issue counters to phase U's first slot of the
        next step."""
        return [s.issue_chunk.eq(0), s.issue_row.eq(0),
                s.issue_row_base.eq(self.geometry.u_base), s.step_after_input.eq(1)]

    def _phase_states(self, m, s):
        """One step: INPUT_PRODUCTS and INPUT_DRAIN (phase U, in u_mode), Z_SUMS (A),
        CONTRAST (C, when accumulating), FORCE_GATE and FORCE_SUMS (B), STEP_END;
        PASS_END after the last step. With ``late_contrast`` C follows B. Each issue state drives ``tag0`` and the lane
        memories' read addresses for one slot a cycle, with the issue counters
        ``issue_bank`` (working bank), ``issue_row`` (j), ``issue_chunk`` (r) and
        ``issue_slot`` (B: t)."""
        if self.geometry.u_mode:
            self._input_phase_states(m, s)
        self._z_state(m, s)
        self._contrast_state(m, s)
        self._force_states(m, s)
        self._step_end_states(m, s)

    def _input_phase_states(self, m, s):
        """Phase U: the next step's input products, ``⌈M/P⌉·K`` slots issued while the
        previous step drains; then the A phase starts once they have drained."""
        g, K = self.geometry, self.cfg.k
        tag0, chunk, row, row_base = s.tag0, s.issue_chunk, s.issue_row, s.issue_row_base
        with m.State("INPUT_PRODUCTS"):
            m.d.comb += [s.issue_mode.eq(1), tag0.valid.eq(1), tag0.phase.eq(Phase.INPUT),
                         tag0.row.eq(row), tag0.chunk.eq(chunk), tag0.first.eq(chunk == 0),
                         tag0.last.eq(chunk == K - 1), s.param_addr.eq(row_base),
                         s.param_en.eq(1)]
            m.d.sync += row_base.eq(row_base + 1)
            with m.If(chunk == K - 1):
                m.d.sync += [chunk.eq(0), row.eq(row + 1)]
                with m.If(row == g.ru - 1):
                    if s.late_contrast:
                        with m.If(s.u_ahead):
                            m.d.sync += row.eq(0)
                            m.next = "CONTRAST"
                        with m.Else():
                            m.next = "INPUT_DRAIN"
                    else:
                        m.next = "INPUT_DRAIN"
            with m.Else():
                m.d.sync += chunk.eq(chunk + 1)
        with m.State("INPUT_DRAIN"):
            with m.If(s.step_drained):
                with m.If(s.step_after_input):
                    m.d.comb += s.steps_left_dec.eq(1)
                m.d.sync += self._restart_issue(s)
                m.next = "Z_SUMS"

    def _z_state(self, m, s):
        """Phase A: ``M·RA`` slots (per working bank), row j chunk r of ``[W|B]``
        times ``[qo|u]``; a weight read serves both banks on consecutive cycles."""
        g, M = self.geometry, self.cfg.m
        RA, RN = g.ra, g.rn
        tag0, bank, chunk, row = s.tag0, s.issue_bank, s.issue_chunk, s.issue_row
        row_base = s.issue_row_base
        with m.State("Z_SUMS"):
            m.d.comb += [s.issue_mode.eq(1), tag0.valid.eq(1), tag0.phase.eq(Phase.Z),
                         tag0.bank.eq(bank), tag0.chunk.eq(chunk), tag0.row.eq(row),
                         tag0.first.eq(chunk == 0), tag0.last.eq(chunk == RA - 1),
                         s.param_addr.eq(row_base + chunk), s.param_en.eq(~bank),
                         s.operand_addr.eq(Mux(bank, RN + chunk, chunk))]
            with m.If((chunk == 0) & (row == 0) & ~bank):
                m.d.comb += self.step_strobe.eq(1)
            with m.If(bank != s.last_bank):
                m.d.sync += bank.eq(1)
            with m.Else():
                m.d.sync += bank.eq(0)
                with m.If(chunk == RA - 1):
                    m.d.sync += [chunk.eq(0), row.eq(row + 1), row_base.eq(row_base + RA)]
                    with m.If(row == M - 1):
                        m.d.sync += row.eq(0)
                        if s.late_contrast:
                            m.next = "FORCE_GATE"
                        else:
                            with m.If(s.accumulate):
                                m.next = "CONTRAST"
                            with m.Else():
                                m.next = "FORCE_GATE"
                with m.Else():
                    m.d.sync += chunk.eq(chunk + 1)

    def _contrast_state(self, m, s):
        """Phase C: ``2·(M·rw + RN)`` slots (CONTRAST), two per accumulator element
        (the two banks, or the one bank and a zero); row j may issue once ``a_j``
        exists, row M (α: qo²) at once. Packed (:attr:`LaneGeometry.contrast_packed`),
        CONTRAST_INPUTS then issues the input columns' ``2·⌈M/P⌉·(K+1)`` slots:
        lane p multiplies its own copy of ``a_j`` (j = gP + p) by ``u_k`` or 1."""
        g, M, K = self.geometry, self.cfg.m, self.cfg.k
        RW, RN = g.rw, g.rn
        tag0, bank, chunk, row = s.tag0, s.issue_bank, s.issue_chunk, s.issue_row
        two_banks = s.two_banks
        after = "STEP_END" if s.late_contrast else "FORCE_GATE"
        with m.State("CONTRAST"):
            alpha_row = Signal()
            m.d.comb += alpha_row.eq(row == M)
            can_issue = Signal()
            m.d.comb += can_issue.eq(alpha_row | bank | (s.activation_rows > row))
            m.d.comb += [s.issue_mode.eq(1), tag0.phase.eq(Phase.CONTRAST), tag0.bank.eq(bank),
                         tag0.chunk.eq(chunk), tag0.row.eq(row), tag0.alpha_row.eq(alpha_row),
                         s.operand_addr.eq(Mux(bank & two_banks, RN + chunk, chunk)),
                         s.activation_addr.eq(Mux(two_banks, Cat(bank, row), row))]
            def after_alpha_row():
                with m.If(alpha_row):
                    if g.contrast_packed:
                        m.d.sync += row.eq(0)
                        m.next = "CONTRAST_INPUTS"
                    else:
                        m.next = after
            _issue_pair(m, tag0, bank, chunk, row, can_issue,
                        Mux(alpha_row, chunk == RN - 1, chunk == RW - 1), after_alpha_row)
        if not g.contrast_packed:
            return
        with m.State("CONTRAST_INPUTS"):
            # row group ``row``, column k = ``chunk`` (K: b), once every a_j exists
            can_issue = Signal()
            m.d.comb += can_issue.eq(bank | (s.activation_rows == M))
            m.d.comb += [s.issue_mode.eq(1), tag0.phase.eq(Phase.CONTRAST), tag0.bank.eq(bank),
                         tag0.chunk.eq(chunk), tag0.row.eq(row), tag0.input_row.eq(1),
                         s.lane_activation_addr.eq(Mux(two_banks, Cat(bank, row), row))]
            def after_group():
                with m.If(row == g.ru - 1):
                    m.next = after
            _issue_pair(m, tag0, bank, chunk, row, can_issue, chunk == K, after_group)

    def _force_states(self, m, s):
        """Phase B: FORCE_GATE waits for room for the step's outputs and for the next
        nudge row, and starts loading the next step's inputs; FORCE_SUMS issues
        ``RN·LB`` slots (per working bank): for oscillator row r, slot t = 0 is
        ``α_i·qo_i``, slot t = j + 1 is ``W_ji·a_j`` (once ``a_j`` exists), slots
        beyond M pad the row to P for the serial state unit."""
        cfg, g = self.cfg, self.geometry
        M, O = cfg.m, cfg.o
        RA, RN, LB = g.ra, g.rn, g.lb
        tag0, bank, chunk, slot = s.tag0, s.issue_bank, s.issue_chunk, s.issue_slot
        weight_addr, two_banks, has_next = s.issue_weight_addr, s.two_banks, s.has_next
        with m.State("FORCE_GATE"):
            out_ok = ~s.emit_outputs | (s.output_fifo.level <= s.fifo_depth - O)  # room for O
            nudge_ok = ~(s.echo & ~s.kick_only & has_next) | s.nudge_row_ready
            with m.If(out_ok & nudge_ok):
                m.d.comb += [s.loader_start.eq(has_next), s.loader_advance.eq(1)]
                if s.late_contrast:
                    m.d.sync += [uc.eq(u) for uc, u in zip(s.u_contrast, s.u_current)]
                m.d.sync += [bank.eq(0), chunk.eq(0), slot.eq(0), weight_addr.eq(0)]
                m.next = "FORCE_SUMS"

        with m.State("FORCE_SUMS"):
            padding = Signal()
            m.d.comb += padding.eq(slot > M)
            can_issue = Signal()
            m.d.comb += can_issue.eq(padding | bank | (slot == 0) | (s.activation_rows >= slot))
            weight_row = Signal(range(M + 1))
            m.d.comb += weight_row.eq(slot - 1)
            m.d.comb += [s.issue_mode.eq(1), tag0.phase.eq(Phase.FORCE), tag0.bank.eq(bank),
                         tag0.chunk.eq(chunk), tag0.row.eq(slot),
                         tag0.first.eq(slot == 0), tag0.last.eq(slot == M),
                         s.param_addr.eq(Mux(slot == 0, M * RA + chunk, weight_addr)),
                         s.param_en.eq(~bank),
                         s.operand_addr.eq(Mux(bank, RN + chunk, chunk)),
                         s.activation_addr.eq(Mux(two_banks, Cat(bank, weight_row), weight_row))]
            with m.If(can_issue):
                m.d.comb += tag0.valid.eq(~padding)
                with m.If(bank != s.last_bank):
                    m.d.sync += bank.eq(1)
                with m.Else():
                    m.d.sync += bank.eq(0)
                    with m.If(slot == 0):
                        m.d.sync += weight_addr.eq(chunk)
                    with m.Else():
                        m.d.sync += weight_addr.eq(weight_addr + RA)
                    with m.If(slot == LB - 1):
                        m.d.sync += [slot.eq(0), chunk.eq(chunk + 1)]
                        with m.If(chunk == RN - 1):
                            self._leave_force(m, s)
                    with m.Else():
                        m.d.sync += slot.eq(slot + 1)

    def _leave_force(self, m, s):
        """After the force's last slot: STEP_END; or with the contrast after the force
        (when accumulating) CONTRAST, in u_mode first the next step's U slots once
        its inputs are loaded (``u_ahead``), so that the contrast covers U's drain."""
        g = self.geometry
        if not s.late_contrast:
            m.next = "STEP_END"
            return
        with m.If(s.accumulate):
            m.d.sync += [s.issue_chunk.eq(0), s.issue_row.eq(0)]
            if g.u_mode:
                with m.If(s.has_next & s.loader_ready):
                    m.d.sync += [s.issue_row_base.eq(g.u_base), s.step_after_input.eq(1),
                                 s.u_ahead.eq(1)]
                    m.next = "INPUT_PRODUCTS"
                with m.Else():
                    m.next = "CONTRAST"
            else:
                m.next = "CONTRAST"
        with m.Else():
            m.next = "STEP_END"

    def _step_end_states(self, m, s):
        """STEP_END: the next step starts when this one has drained (in u_mode with
        its input products, at once); PASS_END: once the outputs are out, the
        self-test turns from forward to echo, or the command is done (a FORWARD
        leaves its mode for the ECHO)."""
        g = self.geometry
        has_next, drained, loader_ready = s.has_next, s.drained, s.loader_ready
        with m.State("STEP_END"):
            if g.u_mode:
                if s.late_contrast:
                    with m.If(s.u_ahead):       # U already ran: start A once drained
                        with m.If(s.step_drained):
                            m.d.comb += s.steps_left_dec.eq(1)
                            m.d.sync += self._restart_issue(s) + [s.u_ahead.eq(0)]
                            m.next = "Z_SUMS"
                with (m.Elif if s.late_contrast else m.If)(has_next & loader_ready):
                    m.d.sync += self._start_input_products(s)
                    m.next = "INPUT_PRODUCTS"
                with m.Elif(~has_next & drained):
                    m.next = "PASS_END"
            ready = Mux(has_next, s.step_drained, drained) if s.late_contrast else drained
            with m.If(ready & loader_ready & (not g.u_mode)):
                with m.If(has_next):
                    m.d.comb += s.steps_left_dec.eq(1)
                    m.d.sync += self._restart_issue(s)
                    m.next = "Z_SUMS"
                with m.Else():
                    m.next = "PASS_END"

        with m.State("PASS_END"):
            with m.If(s.output_fifo.level == 0):
                with m.If(s.selftest & ~s.selftest_echo):
                    m.d.comb += s.seq_index_back.eq(1)
                    m.d.sync += [s.selftest_echo.eq(1), s.flip_state.eq(1), s.loader_down.eq(1)]
                    m.next = "PRE_STEP_START"
                with m.Else():
                    with m.If(s.emit_outputs):
                        m.d.sync += s.forward_mode.eq(Mux(s.one_sided, ForwardMode.ONE_SIDED,
                                                          ForwardMode.CENTRED))
                    m.next = "DONE"

def _issue_pair(m, tag0, bank, chunk, row, can_issue, row_end, at_row_end) -> None:
    """Issue the contrast slot in ``tag0`` when ``can_issue``: an element's two slots
    (``bank`` 0 then 1) follow each other, then the next chunk, or after ``row_end``
    the next row, where ``at_row_end()`` adds the state's own transitions."""
    with m.If(can_issue):
        m.d.comb += tag0.valid.eq(1)
        with m.If(~bank):
            m.d.sync += bank.eq(1)
        with m.Else():
            m.d.sync += bank.eq(0)
            with m.If(row_end):
                m.d.sync += [chunk.eq(0), row.eq(row + 1)]
                at_row_end()
            with m.Else():
                m.d.sync += chunk.eq(chunk + 1)


def _offer_walked_word(m, out, word, walker, again: str) -> None:
    """Offer the walker's current ``word`` on the stream ``out``; once taken, step the
    walker and go to DONE after its last word, else to the state ``again``."""
    m.d.comb += [out.valid.eq(1), out.payload.eq(word)]
    with m.If(out.ready):
        m.d.comb += walker.step.eq(1)
        with m.If(walker.last):
            m.next = "DONE"
        with m.Else():
            m.next = again


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
        n_sections = len(kinds[0])
        assert len(kinds[1]) == n_sections
        P = g.p
        self.reset = Signal(name=f"{name}_reset")
        self.step = Signal(name=f"{name}_step")
        self.acc = Signal(name=f"{name}_acc")
        self.skip = Signal(n_sections, name=f"{name}_skip")
        allsecs = kinds[0] + kinds[1]
        maxrows = max(s["rows"] for s in allsecs)
        maxcols = max(s["c1"] - s["c0"] for s in allsecs)
        maxaddr = max(s["base0"] + s["rows"] * s["stride"] for s in allsecs) + g.rmax + 1
        self.kind = Signal(name=f"{name}_kind")   # 1: accumulators
        self.section = Signal(range(n_sections), name=f"{name}_section")
        self.j = Signal(range(maxrows + 1), name=f"{name}_j")
        self.col = Signal(range(maxcols + 1), name=f"{name}_col")
        self.lane = Signal(range(P), name=f"{name}_lane")
        self.chunk = Signal(range(g.rmax + 1), name=f"{name}_chunk")
        self.base = Signal(range(maxaddr), name=f"{name}_base")
        self.addr = Signal(range(maxaddr), name=f"{name}_addr")
        self.is_b = Signal(name=f"{name}_is_b")
        self.last = Signal(name=f"{name}_last")
        self.group = Signal(range(g.groups), name=f"{name}_group")
        self.acc_addr = Signal(range(max(g.acc_depth, 2)), name=f"{name}_acc_addr")

        m.d.comb += self.addr.eq(self.base + self.chunk)
        if g.group_lanes == 2:
            m.d.comb += [self.group.eq(self.lane >> 1),
                         self.acc_addr.eq(Cat(self.lane[0], self.addr))]
        else:
            m.d.comb += [self.group.eq(0), self.acc_addr.eq(self.addr)]

        def field(s, f, kind):
            """Section ``s``'s constant ``f`` (a function of the section dict) for ``kind``."""
            a, b = f(kinds[0][s]), f(kinds[1][s])
            if isinstance(kind, int):
                return b if kind else a
            return a if a == b else Mux(kind, b, a)

        def start(s, kind):
            lane = field(s, lambda d: 0 if d["mem"] == "row" else d["c0"] % P, kind)
            chunk = field(s, lambda d: 0 if d["mem"] == "row" else d["c0"] // P, kind)
            return [self.section.eq(s), self.lane.eq(lane), self.chunk.eq(chunk),
                    self.base.eq(field(s, lambda d: d["base0"], kind)),
                    self.col.eq(0), self.j.eq(0)]

        def first_of(candidates, kind, skip):
            """Go to the first section of ``candidates`` not skipped (priority chain)."""
            for n, s in enumerate(candidates):
                with (m.If if n == 0 else m.Elif)(~skip[s]):
                    m.d.sync += start(s, kind)

        def step_lane(s):        # banked by column: lane, then chunk, then row
            ncols = field(s, lambda d: d["c1"] - d["c0"], self.kind)
            with m.If(self.col != ncols - 1):
                m.d.sync += self.col.eq(self.col + 1)
                with m.If(self.lane == P - 1):
                    m.d.sync += [self.lane.eq(0), self.chunk.eq(self.chunk + 1)]
                with m.Else():
                    m.d.sync += self.lane.eq(self.lane + 1)
            with m.Elif(self.j != kinds[0][s]["rows"] - 1):
                m.d.sync += [self.col.eq(0),
                             self.lane.eq(field(s, lambda d: d["c0"] % P, self.kind)),
                             self.chunk.eq(field(s, lambda d: d["c0"] // P, self.kind)),
                             self.j.eq(self.j + 1),
                             self.base.eq(self.base + field(s, lambda d: d["stride"], self.kind))]

        def step_row(s, kind):   # banked by row (u_mode B, packed contrast inputs):
            # column, then row, lane = row mod P; ``kind``: the walk kind, or a
            # constant when only that kind's section is banked by row
            ncols = field(s, lambda d: d["c1"] - d["c0"], kind)
            with m.If(self.col != ncols - 1):
                m.d.sync += [self.col.eq(self.col + 1), self.chunk.eq(self.chunk + 1)]
            with m.Elif(self.j != kinds[0][s]["rows"] - 1):
                m.d.sync += [self.col.eq(0), self.chunk.eq(0), self.j.eq(self.j + 1)]
                with m.If(self.lane == P - 1):
                    m.d.sync += [self.lane.eq(0),
                                 self.base.eq(self.base + field(s, lambda d: d["stride"],
                                                                kind))]
                with m.Else():
                    m.d.sync += self.lane.eq(self.lane + 1)

        # the accumulators are never skipped
        skip_now = Mux(self.kind, 0, self.skip)
        with m.If(self.reset):
            m.d.sync += self.kind.eq(self.acc)
            first_of(range(n_sections), self.acc, Mux(self.acc, 0, self.skip))
        with m.Elif(self.step):
            with m.Switch(self.section):
                for s in range(n_sections):
                    with m.Case(s):
                        assert kinds[0][s]["rows"] == kinds[1][s]["rows"]
                        mems = [kinds[0][s]["mem"], kinds[1][s]["mem"]]
                        if mems == ["row", "row"]:
                            step_row(s, self.kind)
                        elif "row" in mems:
                            with m.If(self.kind == mems.index("row")):
                                step_row(s, mems.index("row"))
                            with m.Else():
                                step_lane(s)
                        else:
                            step_lane(s)
                        if s + 1 < n_sections:
                            ncols = field(s, lambda d: d["c1"] - d["c0"], self.kind)
                            with m.If((self.col == ncols - 1)
                                      & (self.j == kinds[0][s]["rows"] - 1)):
                                first_of(range(s + 1, n_sections), self.kind, skip_now)
        with m.Switch(self.section):
            for s in range(n_sections):
                with m.Case(s):
                    m.d.comb += self.is_b.eq(field(s, lambda d: d["mem"] == "b", self.kind))
                    later_skipped = ((skip_now[s + 1:] == (1 << (n_sections - s - 1)) - 1)
                                     if s + 1 < n_sections else 1)
                    m.d.comb += self.last.eq(
                        later_skipped & (self.j == kinds[0][s]["rows"] - 1)
                        & (self.col == field(s, lambda d: d["c1"] - d["c0"], self.kind) - 1))
