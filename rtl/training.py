"""The training core: HEL cores plus the on-chip training loop (docs/onchip.md).

:class:`TrainingCore` holds ``cfg.engines`` = C :class:`~hel_fpga.rtl.engine.SampleEngine`
components (each a :class:`hel_fpga.rtl.core.HELCore` with the per-sample half of the
loop) and executes the training operations of :class:`hel_fpga.rtl.core.Op`
(TRAIN_SETUP … STREAM) around them, bit-exact with
:class:`hel_fpga.sim.onchip.OnChipTrainer`. The loop drives the cores only through
their own commands (LOAD, FORWARD, ECHO, READ_ACC, WRITE_PARAMS, CLEAR_ACC,
CLEAR_FLAGS), exactly as the golden model drives its ``GoldenCore`` engines. With
C = 1 it is one core and the loop around it.

Ports
-----
Every member of :class:`HELCore` with the same name and shape, plus

========== ===== ============================== =============================================
member     dir   payload                        use
========== ===== ============================== =============================================
wide_in    In    signed(acc_width)              WRITE_MASTER: master weights or moments
metrics    Out   :data:`MetricsLayout`          running pass (:class:`~hel_fpga.spec.protocol.Pass`),
                                                samples, loss_sum, correct, skipped
training   Out   1                              a TRAIN or EVAL pass runs (``running != NONE``)
streaming  Out   1                              a streamed pass runs: STREAM is taken
setup_ok   Out   1                              the last TRAIN_SETUP is one the device accepts
reset      In    1                              the command unit's reset of the core (RESET)
========== ===== ============================== =============================================

**Reset.** The core resets itself from ``reset`` instead of being wrapped in a
``ResetInserter`` (as the command unit wraps a bare :class:`HELCore`): ``reset`` is
registered once for the controller and once for each engine, and each copy resets
only its own part. So no one net runs from the command unit through a gate to
every flip-flop of the core, which with the engines spread over the die was the
ECP5 builds' critical path. The core is therefore reset one cycle after ``reset``;
the command unit waits that cycle before its next command.

Operations 0 … 9 pass straight through while this unit is idle: ``cmd`` waits in a
command register (``creg``) until engine 0, or every engine for WRITE_PARAMS,
CLEAR_ACC and CLEAR_FLAGS (so that the engines' parameters and flags stay equal),
has taken it; engine 0's ``done`` is kept and answered once every engine named has
answered. A mode register (``ext``) connects the outer streams to engine 0's (a 2:1
multiplexer per inward payload, an AND per handshake); WRITE_PARAMS' words go to
every engine, each word held until all have taken it. ``state_overflow`` and
``acc_overflow`` are the OR over the engines. A training operation's
op, length, bank and seed go into registers in the cycle it is taken and are
decoded in the next (state DECODE), so the command's path ends at registers.
The training operations:

* **TRAIN_SETUP** takes :data:`~hel_fpga.spec.training.SETUP_WORDS` words from
  ``inputs`` (low 16 bits each), checks each field's range as it arrives, derives
  the layout (the order generator's bit count and shifts; T·k and T·o, products of
  two setup fields, on the serial multiplier, then the record length and the
  offsets inside a record) and multiplies (train + test samples) × record, or
  ``stream_slots`` × record, with the serial multiplier to check that the sets or
  the ring fit; ``setup_ok`` is exactly ":func:`~hel_fpga.spec.training.unpack_setup`
  does not raise". Then the ring's constants (its length, last word, last record)
  from that product; no multiplier block anywhere.
* **STORE** writes ``length`` words from ``inputs`` at ``seed`` … (BAD_ARG for an
  empty or out-of-range span).
* **WRITE_MASTER** / **READ_MASTER** move the master weights (``bank`` 0, clamped to
  the master range) or moments (1, saturated) between ``wide_in`` / ``acc_out``
  and their memories; after master weights, the core gets ``requantize`` of them.
* **TRAIN** (``length`` = epoch e) and **EVAL** (``bank`` = set) answer OK at once,
  with ``training`` already high, and run the pass in the background (WRONG_STATE
  without an accepted setup; EVAL of a ``bank`` > 1 is BAD_ARG). With a streamed
  setup ``streaming`` rises with ``training`` (not for an EVAL of an empty set).
* **STREAM** (``length`` words from ``inputs``) is taken only while ``streaming``
  is high, beside the running pass (below, "Streamed passes"); elsewhere it is
  WRONG_STATE. It has an op of its own, ``Op.STREAM`` = 16, so :class:`Op` is five
  bits wide (the inner core answers the training ops BAD_ARG and never sees them).

Memories
--------
============ ========================== =====================================================
memory       words × bits               read by
============ ========================== =====================================================
store        store_words × OW           the records: inputs, labels, masks, targets
master       P × (OW + 16)              optimiser, requantisation, READ_MASTER
moment       P × (OW + 24)              optimiser, READ_MASTER
============ ========================== =====================================================

(P = M·N + M·K + M + N.) Each memory is read through a *prefetch* stream: an
address register, the block RAM's own read register, a data register after the
RAMs' output multiplexer, and a 6-word FIFO, with a credit counter that issues
an address only when the FIFO has room for it. The store may be 64 block RAMs
(65 536 words on ECP5): its address fan-out and its 64-way read multiplexer get a
cycle each, and no ``ready`` reaches a RAM's clock enable (the credit counter is a
register), so the consumer's handshake never sits in a RAM path. Six words of
credit cover the four cycles from issue to FIFO output, so a stream delivers one
word per cycle.

Sequencing of a training epoch
------------------------------
CLEAR_ACC, CLEAR_FLAGS (every engine); then for each sample, from the order
generator (below), or the ring in a streamed pass ("Streamed passes"):

1. The sample goes to engine ``slot`` (the sample's index in its batch mod C; in
   EVAL its index in the pass mod C) once that engine is idle, and the store
   prefetch walks its record into the engine (each word tagged with its kind and
   the engine): the T·k inputs, then for one-hot the label word, for mse per step
   t the mask word and the o targets. The engine runs LOAD, FORWARD with the loss
   and ECHO on its own (:mod:`hel_fpga.rtl.engine`); the walk moves on to the next
   sample as soon as it has issued the record's last read, so C engines compute
   at once while one record at a time is walked.
2. After B samples, and after the last sample if a batch is open, once every
   engine is idle: if an engine's ``state_overflow`` or ``acc_overflow`` is set,
   ``skipped`` counts it. Else, with C > 1, a READ_ACC of every engine sums each
   element's C words (an adder tree, a register per level) and checks that every
   sum fits acc_width (else ``skipped`` counts it, as the golden model's
   :func:`~hel_fpga.sim.onchip.sum_accumulators` says). Then a READ_ACC whose sums
   join the master and moment of the same element (prefetched in the same
   canonical order, tagged with their array) into
   :class:`~hel_fpga.rtl.trainer.OptimiserUnit`, whose θ' and m' are written back;
   then WRITE_PARAMS streams the master memory through the requantiser
   (``sat(rshift_round(θ, 16), OW)``) into every engine. Then CLEAR_ACC,
   CLEAR_FLAGS.

The re-quantised parameters come from a second pass over the master memory
rather than from the optimiser's ``param`` output: the core takes WRITE_PARAMS
only after READ_ACC has finished, so ``param`` would need a P-word buffer, while
the second pass reuses the master prefetch and costs one adder and a
saturation; WRITE_MASTER needs the same pass anyway. It costs P cycles per
batch, the length of the WRITE_PARAMS the core needs in any case.

EVAL runs step 1 for samples 0 … count−1 of the set, FORWARD only (the core's
centred FORWARD accumulates nothing). ``metrics.samples`` counts finished samples
(after the ECHO in training, after FORWARD in EVAL); ``loss_sum`` and ``correct``
are the sums over the engines' loss units (saturating as one unit's would);
``running`` returns to NONE when the pass is over, and the
counts stay until the next pass or a reset.

Order generator and addresses
-----------------------------
:func:`~hel_fpga.spec.training.epoch_order` in hardware (resident passes): at TRAIN, the bit-serial
:class:`~hel_fpga.rtl.core.Mix32Serial` (about 80 logic cells, 97 cycles per
word) derives ``mix32(seed)`` and the three round keys (about 400 cycles, once
per epoch, overlapping CLEAR_ACC; the first sample waits for them); then each
candidate index takes one add–xorshift–multiply round per two cycles and a compare
with the set size. A sample's base address is its record index × record
length, from a shift-add serial multiplier (≤ 17 cycles). Both run one sample
ahead, during the current sample, so neither adds to a sample's time.
``lr_shift_at(tc, e)`` is computed serially at TRAIN (one compare per halving).

Overhead, measured in simulation (N = M = 4, K = 1, O = 2, T = 5, one lane;
about 1 100 cycles of core work per training sample): the inner core is idle
about 10 cycles per sample in EVAL (command hand-overs through the command
registers, the engine's registered ``start`` and ``idle``, ``slot_idle`` and the
first store word's latency) and about 16 per sample in TRAIN (also the ECHO's
hand-over and the per-batch commands), plus about 400 cycles per epoch for the
round keys.

A label word (one-hot) outside 0 … o−1, as a signed operand word, is passed to
the loss unit as "no class": it is the target of no output and never correct.

Streamed passes
---------------
With ``stream_slots`` = n ≥ 1 the store's first n·record words are a ring
(:class:`~hel_fpga.spec.training.StoreLayout`). TRAIN and EVAL start the pass as
above but start no order generator: sample j of the pass is the j-th record to
arrive. A separate small state machine (``sop``) takes STREAM while the main one
runs the pass:

* **Writing.** A word on ``inputs`` is taken while the ring has a free word
  (``r_free``, a down-counter: ``ready`` is a zero test of a register) and written
  at ``start`` (the write pointer; 0 at the pass's start, wrapping after the
  ring's last word), through the store's registered write path. A record is
  complete after ``record`` words (``w_pos``); complete records not yet taken
  are counted (``recs_avail``).
* **Reading.** SAMPLE_START waits for a complete record and walks it from
  ``rd_base`` (advancing by ``record``, wrapping to 0 after the last slot): the
  same walk, loss unit, ECHO and batches as a resident pass, so the schedule,
  overflow skips and metrics are those of the resident pass over the same
  samples in the same order.
* **Freeing.** A record's words are free once the walk has issued its last read
  (one register later, so every read precedes a later write to its word by two
  cycles), not at the sample's end: the host's next record can arrive while the
  sample runs, even in a ring of one slot.
* **Surplus** words after the pass's last record (``w_all``) are taken and
  dropped (not written), so the transfer completes.
* **Done.** A STREAM is done when it has taken its ``length`` words, and, if it
  delivered the pass's last record, when the pass is over (PASS_END waits for a
  STREAM still taking surplus words). So the command unit's final ack of that
  transfer comes after the pass, as the protocol model's, and the pass can end
  only inside a STREAM: ``streaming`` never falls between two of them.

Back-pressure of a full ring simply stops taking words: the command unit's
unpacker, and behind it the receive ring and the protocol's window, wait.
``inputs`` ends in a two-word register slice (:func:`~hel_fpga.rtl.bram.stream_slice`)
that takes words only in the states that take all of a transfer's words
(SETUP_WORDS, STORE_WORDS, STREAM's WORDS, or engine 0 taking a LOAD's): its
``ready`` is a decode of state registers, and the counting, the ring's test and
the store's write sit behind the slice, off the command unit's paths. A rejected
command leaves ``ready`` low. The words land in the store at their ring
positions, as in the golden :class:`~hel_fpga.sim.onchip.TrainingUnit`.

Reset: every register resets to idle (``setup_ok`` low, ``running`` NONE,
``streaming`` low, counters 0; a STREAM in progress is forgotten); memory
contents survive.
"""

from __future__ import annotations

import math
from functools import reduce
from types import SimpleNamespace

from amaranth.hdl import (Cat, Const, Module, Mux, ResetInserter, Shape, Signal, signed,
                          unsigned)
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for, ceil_log2

from hel_fpga.rtl.bram import NO_RW_CHECK, BankedMemory, Prefetch, stream_slice
from hel_fpga.rtl.core import CmdLayout, DoneLayout, Mix32Serial, Op, Result
from hel_fpga.rtl.engine import SampleEngine, Word
from hel_fpga.rtl.tanh import saturate_signed
from hel_fpga.rtl.trainer import LossKind, OptimiserUnit, Optimizer, ParamArray
from hel_fpga.spec.formats import HelConfig
from hel_fpga.spec.protocol import Pass
from hel_fpga.spec.training import (BATCH_LOG2_RANGE, BETA_LOG2_RANGE, COUNT_WIDTH,
                                    EPS_LOG2_RANGE, HALVINGS_RANGE, LOSS_SUM_WIDTH,
                                    LR_LOG2_RANGE, SETUP_FIELDS, SETUP_WORD_BITS,
                                    SGDM_LR_LOG2_MIN, TrainFormats)

__all__ = ["TrainingCore", "MetricsLayout"]

#: ``metrics``: the running pass (:class:`hel_fpga.spec.protocol.Pass`) and its counts.
MetricsLayout = data.StructLayout({
    "running": unsigned(2),
    "samples": unsigned(COUNT_WIDTH),
    "loss_sum": unsigned(LOSS_SUM_WIDTH),
    "correct": unsigned(COUNT_WIDTH),
    "skipped": unsigned(COUNT_WIDTH),
})

assert SETUP_WORD_BITS == 16


def _times(x, c: int):
    """``x · c`` for a constant ``c`` as shifts and adds (no multiplier block)."""
    terms = [x << i for i in range(c.bit_length()) if (c >> i) & 1]
    return reduce(lambda a, b: a + b, terms) if terms else Const(0)


class _Sop(enum.Enum, shape=2):
    """The STREAM operation's state."""
    IDLE = 0
    WORDS = 1       # taking ``length`` words into the ring (or dropping them)
    FINISH = 2      # done (after the pass's end if it delivered the last record)


class _Su(enum.Enum, shape=3):
    """The sample unit's state."""
    IDLE = 0
    KEYS = 1
    ROUND = 2
    CHECK = 3
    COUNT = 4
    MUL = 5
    HAVE = 6
    ROUND2 = 7


def _sum_tree(m: Module, name: str, values, shape):
    """``Σ values`` in ``shape``, one register per level of a binary adder tree:
    (the sum, the number of levels; 0 for a single value, which is returned as it is)."""
    level, n = list(values), 0
    while len(level) > 1:
        nxt = []
        for i in range(0, len(level), 2):
            r = Signal(shape, name=f"{name}_l{n}_{i // 2}")
            m.d.sync += r.eq(level[i] + level[i + 1] if i + 1 < len(level) else level[i])
            nxt.append(r)
        level, n = nxt, n + 1
    return level[0], n


#: Most words of one store bank: 4096 operand words are four ECP5 block RAMs (18
#: bits) or eight iCE40 ones (16 bits); larger stores are banked (:class:`BankedMemory`).
STORE_BANK_WORDS = 4096


class TrainingCore(wiring.Component):
    """:class:`HELCore` with the on-chip training loop (see the module docstring).

    Parameters
    ----------
    cfg : HelConfig
        The core's configuration; ``store_words`` must be > 0.
    store_bank_words : int
        Most words of one store bank (:class:`BankedMemory`; default
        :data:`STORE_BANK_WORDS`).
    core_kwargs
        Passed to :class:`HELCore` (``seq_ram``, ``compact``).

    Attributes
    ----------
    core : HELCore
        The wrapped core (a submodule).
    n_params : int
        P, the parameter elements.
    probes : dict
        Internal signals for simulation tests, filled by ``elaborate``:
        ``sample_start`` (a sample's store walk starts), ``sample_base`` (its first
        word's address), ``lr_shift`` (the epoch's learning-rate shift).
    """

    def __init__(self, cfg: HelConfig, *, store_bank_words: int | None = None, **core_kwargs):
        if cfg.store_words <= 0:
            raise ValueError("TrainingCore needs cfg.store_words > 0")
        self.cfg = cfg
        self.store_bank_words = store_bank_words or STORE_BANK_WORDS
        self.fm = TrainFormats(cfg)
        self.engines = [SampleEngine(cfg, **core_kwargs) for _ in range(cfg.engines)]
        self.core = self.engines[0].core
        self.n_params = sum(math.prod(s) for s in cfg.param_shapes().values())
        self.probes: dict = {}
        members = dict(self.core.signature.members)
        members.update({
            "wide_in": In(stream.Signature(signed(cfg.acc_width))),
            "metrics": Out(MetricsLayout),
            "training": Out(1),
            "streaming": Out(1),
            "setup_ok": Out(1),
            "reset": In(1),
        })
        super().__init__(members)

    # ------------------------------------------------------------------------------
    def elaborate(self, platform):
        # The reset tree (module docstring, "Reset"): the controller (``m``) and each
        # engine are siblings, each reset by its own registered copy of ``reset``.
        outer, m = Module(), Module()
        cfg, fm = self.cfg, self.fm
        engines = self.engines
        C = len(engines)
        for e, eng in enumerate(engines):
            eng_rst = Signal(name=f"engine{e}_rst")
            outer.d.sync += eng_rst.eq(self.reset)
            outer.submodules[f"engine{e}"] = ResetInserter({"sync": eng_rst})(eng)
        ctl_rst = Signal()
        outer.d.sync += ctl_rst.eq(self.reset)
        outer.submodules.control = ResetInserter({"sync": ctl_rst})(m)
        m.submodules.opt = opt = OptimiserUnit(cfg)
        m.submodules.mix = mix = Mix32Serial(1)

        N, M, K, O, T_MAX = cfg.n, cfg.m, cfg.k, cfg.o, cfg.t_max
        ow, sw, aw = cfg.operand_width, cfg.state_width, cfg.acc_width
        mw, gw = fm.master.width, fm.moment.width
        P = self.n_params
        SWORDS = cfg.store_words
        abits = max(1, ceil_log2(SWORDS + 1))       # a store address or a word count
        rec_max = T_MAX * (K + O + 1)
        pw = max(abits, 17 + bits_for(rec_max))     # serial multiplier's product

        # ---------------------------------------------------------------- memories
        # STORE and passes never overlap: no read-during-write
        store = BankedMemory(m, "store", signed(ow), SWORDS, self.store_bank_words, NO_RW_CHECK)
        store_wen = Signal()                # STORE: the word on ``inputs`` goes to ``start``
        ring_wen = Signal()                 # STREAM: the word on ``inputs`` goes to ``start``
        mmem = m.submodules.master = Memory(shape=signed(mw), depth=P, init=[],
                                            attrs=NO_RW_CHECK)   # reads run ahead of writes
        gmem = m.submodules.moment = Memory(shape=signed(gw), depth=P, init=[],
                                            attrs=NO_RW_CHECK)
        mmem_wr, gmem_wr = mmem.write_port(), gmem.write_port()
        ebits = max(1, ceil_log2(C))
        spf = Prefetch(m, "spf", [store], tag_width=2 + ebits)    # (word kind, engine)
        ppf = Prefetch(m, "ppf", [mmem, gmem], tag_width=2)

        # ---------------------------------------------------------------- registers
        ext = Signal(init=1)            # the outer streams are the core's
        x_op = Signal(Op)               # the training operation IDLE took (DECODE's)
        length = Signal(32)
        s_left = Signal(32)             # STREAM's words still to take (beside the pass)
        bank = Signal(2)
        start = Signal(32)
        # The command unit's words wait in a register slice, taken only in the states
        # that take words (``accept``, a decode of state registers): the handshake
        # never waits on the logic that counts the words.
        accept = Signal()
        ins = stream_slice(m, "inputs", self.inputs, len(self.inputs.payload), accept)
        store.write(m, start, ins.r_data, store_wen | ring_wen)
        result = Signal(Result)

        # setup (one register per SETUP_FIELDS entry, seed_lo/hi in one)
        st = SimpleNamespace(
            loss=Signal(LossKind, name="s_loss"), optimizer=Signal(Optimizer, name="s_opt"),
            eps_log2=Signal(5, name="s_eps"), batch_log2=Signal(4, name="s_batch"),
            lr_log2=Signal(signed(7), name="s_lr"), beta_log2=Signal(5, name="s_beta"),
            beta2_log2=Signal(5, name="s_beta2"), halvings=Signal(4, name="s_halv"),
            epochs=Signal(16, name="s_epochs"), seed=Signal(32, name="s_seed"),
            steps=Signal(range(T_MAX + 1), name="s_steps"), train_count=Signal(16, name="s_train"),
            test_count=Signal(16, name="s_test"), inputs=Signal(range(K + 1), name="s_k"),
            outputs=Signal(range(O + 1), name="s_o"), stream_slots=Signal(16, name="s_slots"))
        s_loss, s_opt, s_eps, s_batch = st.loss, st.optimizer, st.eps_log2, st.batch_log2
        s_lr, s_beta, s_beta2, s_halv = st.lr_log2, st.beta_log2, st.beta2_log2, st.halvings
        s_epochs, s_seed, s_steps = st.epochs, st.seed, st.steps
        s_train, s_test = st.train_count, st.test_count
        s_k, s_o, s_slots = st.inputs, st.outputs, st.stream_slots
        s_bad = Signal()
        s_index = Signal(range(len(SETUP_FIELDS)))
        setup_ok = Signal()
        m.d.comb += self.setup_ok.eq(setup_ok)
        # derived from the setup (k, o: the data's inputs and outputs)
        d_tk = Signal(range(T_MAX * K + 1))                 # T·k
        d_to = Signal(range(T_MAX * O + 1))                 # T·o
        d_mask_off = Signal(range(T_MAX * (K + O) + 1))     # T·(k + o)
        d_record = Signal(range(rec_max + 1))
        d_o_last = Signal(range(O))                         # o − 1
        d_record_last = Signal(range(rec_max + 1))          # record − 1
        d_streamed = Signal()                               # stream_slots ≥ 1
        d_ring = Signal(abits)                              # slots·record
        d_ring_last = Signal(abits)                         # slots·record − 1
        d_ring_lastrec = Signal(abits)                      # (slots − 1)·record
        d_bits = Signal(range(17))
        d_omask = Signal(16)
        d_s1 = Signal(range(9))
        d_s2 = Signal(range(6))

        onehot = s_loss == LossKind.ONEHOT

        # metrics
        running = Signal(2)
        samples = Signal(COUNT_WIDTH)
        skipped = Signal(COUNT_WIDTH)
        # the engines' loss sums and correct counts, summed (a register per tree level)
        loss_total, levels_m = _sum_tree(m, "loss_total", [eng.loss_sum for eng in engines],
                                         unsigned(LOSS_SUM_WIDTH + ceil_log2(C)))
        correct_total, _ = _sum_tree(m, "correct_total", [eng.correct for eng in engines],
                                     unsigned(COUNT_WIDTH))
        loss_max = (1 << (LOSS_SUM_WIDTH - 1)) - 1      # the engines' loss sums saturate here
        m.d.comb += [self.metrics.running.eq(running), self.metrics.samples.eq(samples),
                     self.metrics.loss_sum.eq(Mux(loss_total > loss_max, loss_max, loss_total)),
                     self.metrics.correct.eq(correct_total),
                     self.metrics.skipped.eq(skipped),
                     self.training.eq(running != Pass.NONE)]
        streaming = Signal()                    # a streamed pass runs (STREAM is taken)
        m.d.comb += self.streaming.eq(streaming)

        # pass
        epoch = Signal(32)
        lr_shift = Signal(signed(7))
        lr_left = Signal(4)                     # halvings still to compare
        lr_sh = Signal(16)                      # E >> h
        left = Signal(17)                       # samples still to run
        in_batch = Signal(BATCH_LOG2_RANGE[1] + 2)
        slot = Signal(range(max(C, 2)))         # the engine of the next sample
        pass_start = Signal()                   # comb: a TRAIN or EVAL starts
        is_train = running == Pass.TRAIN

        # ---------------------------------------------------------------- units' settings
        rows = Signal(range(T_MAX * O + 1))         # T·O: the nudge buffers' rows
        last_row = Signal(range(T_MAX * O + 1))     # (T − 1)·O
        steps_o = _times(s_steps, O)
        m.d.sync += [rows.eq(steps_o), last_row.eq(steps_o - O)]
        for eng in engines:
            m.d.comb += [eng.settings.rows.eq(rows), eng.settings.last_row.eq(last_row),
                         eng.settings.steps.eq(s_steps), eng.settings.inputs.eq(s_k),
                         eng.settings.outputs.eq(s_o), eng.settings.kind.eq(s_loss),
                         eng.settings.eps_log2.eq(s_eps), eng.clear.eq(pass_start),
                         eng.train.eq(is_train)]
        m.d.comb += [opt.optimizer.eq(s_opt), opt.eps_log2.eq(s_eps), opt.batch_log2.eq(s_batch),
                     opt.lr_shift.eq(lr_shift), opt.beta_log2.eq(s_beta),
                     opt.beta2_log2.eq(s_beta2)]

        # ---------------------------------------------------------------- serial multiplier
        mul_start = Signal()
        mul_a_in = Signal(17)
        mul_b_in = Signal(pw)
        mul_a = Signal(17)
        mul_b = Signal(pw)
        mul_p = Signal(pw)
        mul_busy = Signal()
        with m.If(mul_start):
            m.d.sync += [mul_a.eq(mul_a_in), mul_b.eq(mul_b_in), mul_p.eq(0), mul_busy.eq(1)]
        with m.Elif(mul_busy):
            m.d.sync += [mul_p.eq(mul_p + Mux(mul_a[0], mul_b, 0)), mul_a.eq(mul_a >> 1),
                         mul_b.eq(mul_b << 1), mul_busy.eq(mul_a[1:] != 0)]

        # ---------------------------------------------------------------- learning-rate shift
        lr_start = Signal()
        with m.If(lr_start):
            m.d.sync += [lr_shift.eq(s_lr), lr_left.eq(s_halv), lr_sh.eq(s_epochs)]
        with m.Elif(lr_left != 0):
            sh_next = lr_sh >> 1
            thr = Signal(16)
            m.d.comb += thr.eq(s_epochs - sh_next)
            m.d.sync += [lr_sh.eq(sh_next), lr_left.eq(lr_left - 1)]
            with m.If((epoch[16:] != 0) | (epoch[:16] >= thr)):
                m.d.sync += lr_shift.eq(lr_shift + 1)

        # ---------------------------------------------------------------- sample unit
        # Produces the next sample's base address one sample ahead: epoch_order
        # (TRAIN) or offset + 0, 1, … (EVAL), times the record length.
        su_start = Signal()             # comb, with su_train and su_offset
        su_train = Signal()
        su_offset = Signal(16)
        su_take = Signal()              # comb: the FSM takes next_base
        su_mode_train = Signal()
        su_off = Signal(16)
        su_ctr = Signal(18)
        su_x = Signal(16)
        su_rnd = Signal(2)
        su_kstep = Signal(2)
        su_wait = Signal()
        su_base = Signal(32)
        keys = [Signal(16, name=f"key{r}") for r in range(3)]
        next_base = Signal(abits)
        next_valid = Signal()

        su_end = Signal(17)              # 2^bits: one past the last candidate
        m.d.comb += su_end.eq(Const(1, 17) << d_bits)
        key = Signal(16)
        with m.Switch(su_rnd):
            for r in range(3):
                with m.Case(r):
                    m.d.comb += key.eq(keys[r])
        x_in = Mux(su_rnd == 0, su_ctr[:16], su_x)
        # a round in two cycles (ROUND, ROUND2), ``su_rb`` between its two halves:
        # add, mask and xorshift; then shift-add and mask
        r_a = Signal(16)
        r_b = Signal(16)
        su_rb = Signal(16)
        r_c = Signal(16)
        m.d.comb += [r_a.eq((x_in + key) & d_omask),
                     r_b.eq(r_a ^ (r_a >> d_s1)),
                     r_c.eq((su_rb + (su_rb << d_s2)) & d_omask)]
        m.d.comb += mix.tag.eq(0)

        su = Signal(_Su)
        with m.Switch(su):
            with m.Case(_Su.KEYS):      # mix32(seed), then the three round keys
                mix_x = Mux(su_kstep == 0, s_seed,
                            su_base ^ Cat((su_kstep - 1)[:2], epoch[:30]))
                m.d.comb += [mix.x.eq(mix_x), mix.valid.eq(~su_wait)]
                with m.If(mix.valid & mix.ready):
                    m.d.sync += su_wait.eq(1)
                with m.If(mix.y_valid):
                    m.d.sync += [su_wait.eq(0), su_kstep.eq(su_kstep + 1)]
                    with m.Switch(su_kstep):
                        with m.Case(0):
                            m.d.sync += su_base.eq(mix.y)
                        for r in range(3):
                            with m.Case(r + 1):
                                m.d.sync += keys[r].eq(mix.y[:16] & d_omask)
                    with m.If(su_kstep == 3):
                        m.d.sync += [su_ctr.eq(0), su_rnd.eq(0), su.eq(_Su.ROUND)]
            with m.Case(_Su.ROUND):     # one round of _permute per two cycles
                m.d.sync += [su_rb.eq(r_b), su.eq(_Su.ROUND2)]
            with m.Case(_Su.ROUND2):
                m.d.sync += [su_x.eq(r_c), su_rnd.eq(su_rnd + 1), su.eq(_Su.ROUND)]
                with m.If(su_rnd == 2):
                    m.d.sync += [su_rnd.eq(0), su.eq(_Su.CHECK)]
            with m.Case(_Su.CHECK):
                m.d.sync += su_ctr.eq(su_ctr + 1)
                with m.If(su_x < s_train):
                    m.d.comb += [mul_start.eq(1), mul_a_in.eq(su_x), mul_b_in.eq(d_record)]
                    m.d.sync += su.eq(_Su.MUL)
                with m.Elif(su_ctr == su_end - 1):
                    m.d.sync += su.eq(_Su.IDLE)
                with m.Else():
                    m.d.sync += su.eq(_Su.ROUND)
            with m.Case(_Su.COUNT):     # EVAL: offset + ctr
                m.d.comb += [mul_start.eq(1), mul_a_in.eq(su_off + su_ctr[:16]),
                             mul_b_in.eq(d_record)]
                m.d.sync += [su_ctr.eq(su_ctr + 1), su.eq(_Su.MUL)]
            with m.Case(_Su.MUL):
                with m.If(~mul_busy):
                    m.d.sync += [next_base.eq(mul_p[:abits]), next_valid.eq(1), su.eq(_Su.HAVE)]
            with m.Case(_Su.HAVE):
                with m.If(su_take):
                    m.d.sync += next_valid.eq(0)
                    with m.If(~su_mode_train):
                        m.d.sync += su.eq(_Su.COUNT)
                    with m.Elif(su_ctr == su_end):
                        m.d.sync += su.eq(_Su.IDLE)
                    with m.Else():
                        m.d.sync += su.eq(_Su.ROUND)
        with m.If(su_start):            # from any state
            m.d.sync += [su_mode_train.eq(su_train), su_off.eq(su_offset), su_ctr.eq(0),
                         su_rnd.eq(0), su_kstep.eq(0), su_wait.eq(0), next_valid.eq(0),
                         su.eq(Mux(su_train, _Su.KEYS, _Su.COUNT))]

        # ---------------------------------------------------------------- store prefetch
        # One job per sample: inputs, then the label (one-hot) or per step the mask
        # word and the O targets (mse).
        sj_start = Signal()             # comb, with sj_base
        sj_base = Signal(abits)
        sj_phase = Signal(Word)
        sj_active = Signal()
        sj_lin = Signal(abits)
        sj_mask = Signal(abits)
        sj_cnt = Signal(range(max(T_MAX * K, 2)))
        sj_t = Signal(range(T_MAX + 1))
        sj_o = Signal(range(O + 1))
        sj_eng = Signal(ebits)          # the engine the record goes to
        m.d.comb += [spf.addr.eq(Mux(sj_phase == Word.MASK, sj_mask, sj_lin)),
                     spf.tag.eq(Cat(sj_phase, sj_eng)), spf.issue.eq(sj_active & spf.can_issue)]
        with m.If(sj_start):
            m.d.sync += [sj_active.eq(1), sj_eng.eq(slot), sj_phase.eq(Word.INPUT), sj_lin.eq(sj_base),
                         sj_mask.eq(sj_base + d_mask_off), sj_cnt.eq(d_tk - 1),
                         sj_t.eq(s_steps - 1)]
        with m.Elif(spf.issue):
            with m.Switch(sj_phase):
                with m.Case(Word.INPUT):
                    m.d.sync += [sj_lin.eq(sj_lin + 1), sj_cnt.eq(sj_cnt - 1)]
                    with m.If(sj_cnt == 0):
                        m.d.sync += sj_phase.eq(Mux(onehot, Word.LABEL, Word.MASK))
                with m.Case(Word.LABEL):
                    m.d.sync += sj_active.eq(0)
                with m.Case(Word.MASK):
                    m.d.sync += [sj_mask.eq(sj_mask + 1), sj_phase.eq(Word.TARGET),
                                 sj_o.eq(d_o_last)]
                with m.Case(Word.TARGET):
                    m.d.sync += [sj_lin.eq(sj_lin + 1), sj_o.eq(sj_o - 1)]
                    with m.If(sj_o == 0):
                        m.d.sync += [sj_phase.eq(Word.MASK), sj_t.eq(sj_t - 1)]
                        with m.If(sj_t == 0):
                            m.d.sync += sj_active.eq(0)

        # ---------------------------------------------------------------- stream ring
        # A streamed pass: the first slots·record store words are a ring. STREAM's
        # words are written at ``start`` (wrapping at the ring's end) while the ring
        # has a free word; a record is complete after ``record`` words, and a sample
        # takes the oldest complete record (from ``rd_base``). A sample's record is
        # free once its walk has issued the record's last read (``free_p``, one cycle
        # later, so the read precedes any write to those words by two cycles).
        # Words beyond the pass's records (``w_all``) are taken and dropped.
        ring_start = Signal()           # comb: a streamed pass starts, with ring_count
        ring_count = Signal(16)
        r_free = Signal(range(SWORDS + 1))          # ring words free for writing
        recs_avail = Signal(17)                     # complete records not yet taken
        rd_base = Signal(abits)                     # the next sample's record
        rd_take = Signal()                          # comb: a sample takes it
        w_pos = Signal(range(rec_max + 1))          # the written word's place in its record
        w_left = Signal(17)                         # records still to be written
        w_all = Signal()                            # every record of the pass is written
        sop = Signal(_Sop)
        ring_rdy = Signal()
        m.d.comb += [ring_rdy.eq((sop == _Sop.WORDS) & (w_all | (r_free != 0))),
                     ring_wen.eq(ins.r_rdy & ring_rdy & ~w_all)]
        walk_end = Signal()             # comb: the walk issues its record's last read
        m.d.comb += walk_end.eq(spf.issue & ((sj_phase == Word.LABEL)
                                            | ((sj_phase == Word.TARGET) & (sj_o == 0)
                                               & (sj_t == 0))))
        free_p = Signal()
        m.d.sync += free_p.eq(walk_end)
        rec_done = Signal()
        m.d.comb += rec_done.eq(ring_wen & (w_pos == d_record_last))
        m.d.sync += r_free.eq(r_free - ring_wen + Mux(free_p, d_record, 0))
        m.d.sync += recs_avail.eq(recs_avail + rec_done - rd_take)
        with m.If(ring_wen):
            # (start < slots·record here: its bits above the store address are zero)
            m.d.sync += [start.eq(Mux(start[:abits] == d_ring_last, 0, start + 1)),
                         w_pos.eq(Mux(rec_done, 0, w_pos + 1))]
        with m.If(rec_done):
            m.d.sync += [w_left.eq(w_left - 1), w_all.eq(w_left == 1)]
        with m.If(rd_take):
            m.d.sync += rd_base.eq(Mux(rd_base == d_ring_lastrec, 0, rd_base + d_record))
        with m.If(ring_start):
            m.d.sync += [r_free.eq(d_ring), recs_avail.eq(0), rd_base.eq(0), w_pos.eq(0),
                         w_left.eq(ring_count), w_all.eq(ring_count == 0)]

        # ---------------------------------------------------------------- parameter prefetch
        # Master and moment of elements 0 … P − 1, tagged with their array.
        pj_start = Signal()
        pj_active = Signal()
        pj_addr = Signal(range(max(P, 2)))
        ends = [M * N, M * N + M * K, M * N + M * K + M]
        m.d.comb += [ppf.addr.eq(pj_addr), ppf.issue.eq(pj_active & ppf.can_issue),
                     ppf.tag.eq(Mux(pj_addr < ends[0], ParamArray.W,
                                    Mux(pj_addr < ends[1], ParamArray.B,
                                        Mux(pj_addr < ends[2], ParamArray.b, ParamArray.alpha))))]
        with m.If(pj_start):
            m.d.sync += [pj_active.eq(1), pj_addr.eq(0)]
        with m.Elif(ppf.issue):
            m.d.sync += pj_addr.eq(pj_addr + 1)
            with m.If(pj_addr == P - 1):
                m.d.sync += pj_active.eq(0)
        master_word, moment_word = ppf.data
        requant = saturate_signed(m, (master_word + (1 << (fm.master_extra - 1)))
                                  >> fm.master_extra, ow, "requant")

        # ---------------------------------------------------------------- records → engines
        # Each word read by the walk goes to the engine in its tag; words of the
        # previous record may still be on their way when the next record's walk
        # starts.
        st_kind, st_eng = spf.tag_out[:2], spf.tag_out[2:]
        st_word = spf.data[0]
        eng_ready = Signal()
        for e, eng in enumerate(engines):
            m.d.comb += [eng.record.valid.eq(spf.valid & ~ext & (st_eng == e)),
                         eng.record.payload.kind.eq(st_kind), eng.record.payload.word.eq(st_word)]
            with m.If(st_eng == e):
                m.d.comb += eng_ready.eq(eng.record.ready)
        m.d.comb += spf.ready.eq(eng_ready & ~ext)
        eng_start = Signal()            # comb: engine ``slot`` takes the next sample
        for e, eng in enumerate(engines):
            m.d.comb += eng.start.eq(eng_start & (slot == e))
        all_idle = Signal()
        m.d.comb += all_idle.eq(Cat(eng.idle for eng in engines).all())
        finished = Cat(eng.finished for eng in engines)
        n_finished = sum((f for f in finished), Const(0, range(C + 1))) if C > 1 else finished
        # metrics settle ``levels_m`` cycles after the last engine went idle
        quiet = Signal(range(levels_m + 2))
        with m.If(~all_idle):
            m.d.sync += quiet.eq(0)
        with m.Elif(quiet <= levels_m):
            m.d.sync += quiet.eq(quiet + 1)
        settled = all_idle & (quiet > levels_m)
        # engine ``slot`` is idle: a register (one cycle late), so that the path from an
        # engine's ``idle`` through SAMPLE_START back to the engines' ``start`` crosses
        # the die once; ``slot`` changes only in WALK, at least a cycle before SAMPLE_START.
        slot_idle = Signal()
        with m.Switch(slot):
            for e, eng in enumerate(engines):
                with m.Case(e):
                    m.d.sync += slot_idle.eq(eng.idle)
        m.d.sync += samples.eq(samples + n_finished)
        sum_bad = Signal()                  # an accumulator sum does not fit acc_width

        # ---------------------------------------------------------------- acc → optimiser
        opt_sel = Signal()                  # the parameter prefetch feeds the optimiser
        chk_sel = Signal()                  # the accumulator sums go to the range check
        wp_sel = Signal()                   # … the requantiser (WRITE_PARAMS)
        rm_sel = Signal()                   # … acc_out (READ_MASTER)
        # READ_ACC of every engine: the C words of an element are taken together and
        # summed (a register per tree level: the accumulator RAMs sit wherever the
        # placer puts them, so their read data and the engines' read-address
        # advance get a cycle of their own), then wait in ``accq`` with a bit that
        # says whether the sum fits acc_width. A credit counter keeps the tree from
        # overrunning the queue, so no ``ready`` of the optimiser reaches a RAM.
        sum_shape = signed(aw + ceil_log2(C))
        acc_sum, levels_a = _sum_tree(m, "acc_sum", [eng.acc_out.payload for eng in engines],
                                      sum_shape)
        accq_depth = levels_a + 2
        accq = m.submodules.accq = SyncFIFO(width=aw + 1, depth=accq_depth)
        acc_used = Signal(range(accq_depth + 1))
        acc_take = Signal()
        sum_valid = Signal(levels_a + 1)
        m.d.comb += [acc_take.eq(~ext & Cat(eng.acc_out.valid for eng in engines).all()
                                 & (acc_used < accq_depth)),
                     sum_valid[0].eq(acc_take)]
        m.d.sync += sum_valid[1:].eq(sum_valid[:-1])
        high = acc_sum.as_unsigned()[aw - 1:]     # the sum's bits from the sign of aw up
        m.d.comb += [accq.w_en.eq(sum_valid[-1]),
                     accq.w_data.eq(Cat(acc_sum[:aw], (high == 0) | (high == (1 << len(high)) - 1)))]
        m.d.sync += acc_used.eq(acc_used + acc_take - (accq.r_en & accq.r_rdy))
        acc_word = Signal(signed(aw))
        acc_fits = Signal()
        m.d.comb += [acc_word.eq(accq.r_data[:aw]), acc_fits.eq(accq.r_data[aw])]
        m.d.comb += [
            opt.sink.valid.eq(opt_sel & accq.r_rdy & ppf.valid),
            opt.sink.payload.acc.eq(acc_word),
            opt.sink.payload.master.eq(master_word),
            opt.sink.payload.moment.eq(moment_word),
            opt.sink.payload.array.eq(ppf.tag_out),
            opt.source.ready.eq(1),
        ]
        wr_idx = Signal(range(P + 1))
        wm_sel = Signal()                   # WRITE_MASTER owns the write ports
        with m.If(wm_sel):
            m.d.comb += [mmem_wr.addr.eq(wr_idx), gmem_wr.addr.eq(wr_idx),
                         mmem_wr.data.eq(saturate_signed(m, self.wide_in.payload, mw, "wm_master")),
                         gmem_wr.data.eq(saturate_signed(m, self.wide_in.payload, gw, "wm_moment")),
                         mmem_wr.en.eq(self.wide_in.valid & (bank == 0)),
                         gmem_wr.en.eq(self.wide_in.valid & (bank == 1))]
        with m.Else():
            m.d.comb += [mmem_wr.addr.eq(wr_idx), gmem_wr.addr.eq(wr_idx),
                         mmem_wr.data.eq(opt.source.payload.master),
                         gmem_wr.data.eq(opt.source.payload.moment),
                         mmem_wr.en.eq(opt.source.valid), gmem_wr.en.eq(opt.source.valid)]
        with m.If(opt.source.valid | (wm_sel & self.wide_in.valid)):
            m.d.sync += wr_idx.eq(wr_idx + 1)
        rm_word = Signal(signed(aw))
        m.d.comb += rm_word.eq(Mux(bank == 0, master_word, moment_word))
        m.d.comb += accq.r_en.eq(chk_sel | (opt_sel & opt.sink.ready & ppf.valid))
        params_ready = Signal()             # every engine takes the parameter word
        m.d.comb += ppf.ready.eq(
            (opt_sel & opt.sink.ready & accq.r_rdy)
            | (wp_sel & params_ready)
            | (rm_sel & self.acc_out.ready))

        # ---------------------------------------------------------------- the engines' commands
        # A command goes to every engine (the training loop's own, and WRITE_PARAMS,
        # CLEAR_ACC, CLEAR_FLAGS from outside: the engines' parameters and flags stay
        # equal) or to engine 0 (the host's other commands). It waits in ``creg``
        # until each engine named in ``pend`` has taken it; ``owe`` names the engines
        # whose ``done`` is still due, and engine 0's is kept for the outer ``done``.
        internal_cmd = Signal(CmdLayout)
        sel_cmd = Signal(CmdLayout)
        sel_valid, sel_ready = Signal(), Signal()
        creg = Signal(CmdLayout, reset_less=True)
        pend = Signal(C)
        owe = Signal(C)
        done0 = Signal(DoneLayout, reset_less=True)
        cmd_idle = Signal()
        m.d.comb += [cmd_idle.eq((pend == 0) & (owe == 0)), sel_ready.eq(cmd_idle)]
        everyone = ~ext | (sel_cmd.op == Op.WRITE_PARAMS) | (sel_cmd.op == Op.CLEAR_ACC) \
            | (sel_cmd.op == Op.CLEAR_FLAGS)
        targets = Mux(everyone, (1 << C) - 1, 1)
        taken = Cat(eng.cmd.valid & eng.cmd.ready for eng in engines)
        answered = Cat(eng.done.valid & eng.done.ready for eng in engines)
        with m.If(sel_valid & sel_ready):
            m.d.sync += [creg.eq(sel_cmd), pend.eq(targets), owe.eq(targets)]
        with m.Else():
            m.d.sync += [pend.eq(pend & ~taken), owe.eq(owe & ~answered)]
        for e, eng in enumerate(engines):
            m.d.comb += [eng.cmd.valid.eq(pend[e]), eng.cmd.payload.eq(creg),
                         eng.done.ready.eq(owe[e])]
        with m.If(engines[0].done.valid & engines[0].done.ready):
            m.d.sync += done0.eq(engines[0].done.payload)

        # ---------------------------------------------------------------- the engines' streams
        # Parameters to every engine: the word stays until each has taken it (``p_took``).
        p_valid = Mux(ext, self.params_in.valid, wp_sel & ppf.valid)
        p_word = Mux(ext, self.params_in.payload, requant)
        p_took = Signal(C)
        m.d.comb += params_ready.eq(Cat(p_took[e] | eng.params_in.ready
                                        for e, eng in enumerate(engines)).all())
        with m.If(p_valid & params_ready):
            m.d.sync += p_took.eq(0)
        with m.Else():
            m.d.sync += p_took.eq(p_took | Cat(eng.params_in.valid & eng.params_in.ready
                                               for eng in engines))
        for e, eng in enumerate(engines):
            m.d.comb += [eng.params_in.valid.eq(p_valid & ~p_took[e]),
                         eng.params_in.payload.eq(p_word)]
        # The host's streams are engine 0's.
        e0 = engines[0]
        m.d.comb += [
            self.params_in.ready.eq(ext & params_ready),
            self.params_out.valid.eq(ext & e0.params_out.valid),
            self.params_out.payload.eq(e0.params_out.payload),
            e0.params_out.ready.eq(ext & self.params_out.ready),
            e0.inputs.valid.eq(ext & ins.r_rdy),
            e0.inputs.payload.eq(ins.r_data),
            self.outputs.valid.eq(ext & e0.outputs.valid),
            self.outputs.payload.eq(e0.outputs.payload),
            e0.outputs.ready.eq(ext & self.outputs.ready),
            e0.nudges.valid.eq(ext & self.nudges.valid),
            e0.nudges.payload.eq(self.nudges.payload),
            self.nudges.ready.eq(ext & e0.nudges.ready),
            self.acc_out.valid.eq(Mux(ext, e0.acc_out.valid, rm_sel & ppf.valid)),
            self.acc_out.payload.eq(Mux(ext, e0.acc_out.payload, rm_word)),
            self.state_out.valid.eq(ext & e0.state_out.valid),
            self.state_out.payload.eq(e0.state_out.payload),
            e0.state_out.ready.eq(ext & self.state_out.ready),
            self.state_overflow.eq(Cat(eng.state_overflow for eng in engines).any()),
            self.acc_overflow.eq(Cat(eng.acc_overflow for eng in engines).any()),
            sel_cmd.eq(Mux(ext, self.cmd.payload.as_value(), internal_cmd.as_value())),
            self.done.payload.result.eq(result),
        ]
        for e, eng in enumerate(engines):
            m.d.comb += eng.acc_out.ready.eq(Mux(ext, self.acc_out.ready if e == 0 else 0,
                                                 acc_take))
        inputs_ready = Signal()             # TRAIN_SETUP, STORE, STREAM take the inputs
        take_words = Signal()               # in SETUP_WORDS, STORE_WORDS or sop WORDS
        m.d.comb += [ins.r_en.eq(Mux(ext, e0.inputs.ready, inputs_ready)),
                     accept.eq(Mux(ext, e0.inputs.ready, take_words))]

        # ---------------------------------------------------------------- control
        word16 = ins.r_data[:16]
        in_take = ins.r_rdy & ins.r_en
        cmd = self.cmd.payload
        m.d.comb += self.busy.eq(1)

        def issue(op_, nxt, **fields):
            m.d.comb += [sel_valid.eq(1), internal_cmd.op.eq(op_)]
            for k, v in fields.items():
                m.d.comb += getattr(internal_cmd, k).eq(v)
            with m.If(sel_ready):
                m.next = nxt

        def wait(nxt):
            with m.If(cmd_idle):
                m.next = nxt

        def to_idle():
            m.d.sync += ext.eq(1)
            m.next = "IDLE"

        with m.FSM(name="ctl"):
            with m.State("IDLE"):
                m.d.comb += self.busy.eq(0)
                is_core_op = cmd.op.as_value() < Op.TRAIN_SETUP.value
                with m.If(is_core_op):
                    m.d.comb += [sel_valid.eq(self.cmd.valid), self.cmd.ready.eq(sel_ready)]
                    with m.If(self.cmd.valid & sel_ready):
                        m.next = "CORE"
                with m.Else():
                    m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid & ~is_core_op):
                    m.d.sync += [x_op.eq(cmd.op), length.eq(cmd.length), bank.eq(cmd.bank),
                                 start.eq(cmd.seed), result.eq(Result.OK), ext.eq(0),
                                 wr_idx.eq(0)]
                    m.next = "DECODE"

            # A training operation is decoded from the registers IDLE loaded (op,
            # length, bank, seed in ``start``): nothing of the outer command's path
            # reaches this decode or the units it starts.
            with m.State("DECODE"):
                m.next = "DONE"
                with m.Switch(x_op):
                    with m.Case(Op.TRAIN_SETUP):
                        m.d.sync += [s_index.eq(0), s_bad.eq(0), setup_ok.eq(0)]
                        m.next = "SETUP_WORDS"
                    with m.Case(Op.STORE):
                        end = start + length
                        with m.If((length == 0) | (end > SWORDS)):
                            m.d.sync += result.eq(Result.BAD_ARG)
                        with m.Else():
                            m.next = "STORE_WORDS"
                    with m.Case(Op.WRITE_MASTER):
                        with m.If(bank > 1):
                            m.d.sync += result.eq(Result.BAD_ARG)
                        with m.Else():
                            m.next = "WM_WORDS"
                    with m.Case(Op.READ_MASTER):
                        with m.If(bank > 1):
                            m.d.sync += result.eq(Result.BAD_ARG)
                        with m.Else():
                            m.d.comb += pj_start.eq(1)
                            m.next = "RM_WORDS"
                    with m.Case(Op.TRAIN):
                        with m.If(~setup_ok):
                            m.d.sync += result.eq(Result.WRONG_STATE)
                        with m.Else():
                            # streamed: no order generator (the host's order)
                            m.d.comb += [pass_start.eq(1), lr_start.eq(1),
                                         su_start.eq(~d_streamed), su_train.eq(1),
                                         ring_start.eq(d_streamed), ring_count.eq(s_train)]
                            m.d.sync += [running.eq(Pass.TRAIN), epoch.eq(length),
                                         left.eq(s_train), streaming.eq(d_streamed),
                                         start.eq(0)]
                            m.next = "PASS_ACK"
                    with m.Case(Op.EVAL):
                        with m.If(bank > 1):
                            m.d.sync += result.eq(Result.BAD_ARG)
                        with m.Elif(~setup_ok):
                            m.d.sync += result.eq(Result.WRONG_STATE)
                        with m.Else():
                            count = Mux(bank[0], s_test, s_train)
                            m.d.comb += [pass_start.eq(1), su_start.eq(~d_streamed),
                                         su_train.eq(0),
                                         su_offset.eq(Mux(bank[0], s_train, 0)),
                                         ring_start.eq(d_streamed), ring_count.eq(count)]
                            m.d.sync += [running.eq(Pass.EVAL), left.eq(count),
                                         streaming.eq(d_streamed & (count != 0)),
                                         start.eq(0)]
                            m.next = "PASS_ACK"
                    with m.Case(Op.STREAM):     # no streamed pass runs
                        m.d.sync += result.eq(Result.WRONG_STATE)
                with m.If(pass_start):
                    m.d.sync += [samples.eq(0), skipped.eq(0), in_batch.eq(0), slot.eq(0)]

            with m.State("CORE"):
                m.d.comb += [self.done.valid.eq(cmd_idle), self.done.payload.eq(done0)]
                with m.If(cmd_idle & self.done.ready):
                    m.next = "IDLE"

            with m.State("DONE"):
                m.d.comb += self.done.valid.eq(1)
                with m.If(self.done.ready):
                    to_idle()

            # ---- TRAIN_SETUP
            with m.State("SETUP_WORDS"):
                m.d.comb += [inputs_ready.eq(1), take_words.eq(1)]
                w = word16
                ws = w.as_signed()
                bad = Signal()
                with m.If(in_take):
                    m.d.sync += s_index.eq(s_index + 1)
                    with m.Switch(s_index):
                        for i, f in enumerate(SETUP_FIELDS):
                            with m.Case(i):
                                self._setup_field(m, f, w, ws, bad, st)
                    with m.If(bad):
                        m.d.sync += s_bad.eq(1)
                    with m.If(s_index == len(SETUP_FIELDS) - 1):
                        m.next = "SETUP_DERIVE"
            with m.State("SETUP_DERIVE"):
                m.d.sync += d_o_last.eq(s_o - 1)
                # order_bits(train_count) = max(1, bit_length(train_count − 1))
                tc1 = Signal(16)
                m.d.comb += tc1.eq(s_train - 1)
                nb = Signal(range(17))
                m.d.comb += nb.eq(1)
                for i in range(1, 16):
                    with m.If(tc1[i]):
                        m.d.comb += nb.eq(i + 1)
                m.d.sync += d_bits.eq(nb)
                with m.Switch(nb):
                    for b in range(1, 17):
                        with m.Case(b):
                            m.d.sync += [d_omask.eq((1 << b) - 1), d_s1.eq(max(1, (b + 1) // 2)),
                                         d_s2.eq(max(1, b // 3))]
                m.next = "SETUP_TK"
            # T·k and T·o (run-time × run-time) on the serial multiplier: a few cycles
            # each (k and o have few bits), no multiplier on a timing path.
            for name, factor, product, nxt in (("SETUP_TK", s_k, d_tk, "SETUP_TO"),
                                               ("SETUP_TO", s_o, d_to, "SETUP_RECORD")):
                with m.State(name):
                    m.d.comb += [mul_start.eq(1), mul_a_in.eq(factor), mul_b_in.eq(s_steps)]
                    m.next = f"{name}_WAIT"
                with m.State(f"{name}_WAIT"):
                    with m.If(~mul_busy):
                        m.d.sync += product.eq(mul_p)
                        m.next = nxt
            with m.State("SETUP_RECORD"):
                m.d.sync += [d_mask_off.eq(d_tk + d_to),
                             d_record.eq(Mux(onehot, d_tk + 1, d_tk + d_to + s_steps))]
                m.next = "SETUP_MUL"
            with m.State("SETUP_MUL"):
                m.d.sync += d_record_last.eq(d_record - 1)
                # the store words of the layout: both sets, or the ring (StoreLayout.words)
                m.d.comb += [mul_start.eq(1),
                             mul_a_in.eq(Mux(s_slots != 0, s_slots, s_train + s_test)),
                             mul_b_in.eq(d_record)]
                m.next = "SETUP_WAIT"
            with m.State("SETUP_WAIT"):
                with m.If(~mul_busy):
                    m.d.sync += [setup_ok.eq(~s_bad & (mul_p <= SWORDS)),
                                 d_ring.eq(mul_p[:abits])]
                    m.next = "SETUP_RING"
            with m.State("SETUP_RING"):
                m.d.sync += [d_ring_last.eq(d_ring - 1), d_ring_lastrec.eq(d_ring - d_record),
                             d_streamed.eq(s_slots != 0)]
                m.next = "DONE"

            # ---- STORE
            with m.State("STORE_WORDS"):
                m.d.comb += [inputs_ready.eq(1), take_words.eq(1), store_wen.eq(in_take)]
                with m.If(in_take):
                    m.d.sync += [start.eq(start + 1), length.eq(length - 1)]
                    with m.If(length == 1):
                        m.next = "DONE"

            # ---- WRITE_MASTER / READ_MASTER
            with m.State("WM_WORDS"):
                m.d.comb += [wm_sel.eq(1), self.wide_in.ready.eq(1)]
                with m.If(self.wide_in.valid & (wr_idx == P - 1)):
                    with m.If(bank == 0):
                        m.d.comb += pj_start.eq(1)
                        m.next = "WP_ISSUE"
                    with m.Else():
                        m.next = "DONE"
            with m.State("RM_WORDS"):
                m.d.comb += rm_sel.eq(1)
                with m.If(self.acc_out.valid & self.acc_out.ready):
                    m.d.sync += wr_idx.eq(wr_idx + 1)
                    with m.If(wr_idx == P - 1):
                        m.next = "DONE"

            # ---- requantised master weights into the core
            with m.State("WP_ISSUE"):
                m.d.comb += wp_sel.eq(1)
                issue(Op.WRITE_PARAMS, "WP_WAIT", skip=0)
            with m.State("WP_WAIT"):
                m.d.comb += wp_sel.eq(1)
                with m.If(running == Pass.NONE):
                    wait("DONE")
                with m.Else():
                    wait("CLR_ACC_ISSUE")

            # ---- TRAIN / EVAL
            with m.State("PASS_ACK"):
                m.d.comb += self.done.valid.eq(1)
                with m.If(self.done.ready):
                    with m.If(is_train):
                        m.next = "CLR_ACC_ISSUE"
                    with m.Else():
                        m.next = "NEXT"
            with m.State("CLR_ACC_ISSUE"):
                issue(Op.CLEAR_ACC, "CLR_ACC_WAIT")
            with m.State("CLR_ACC_WAIT"):
                wait("CLR_FLAGS_ISSUE")
            with m.State("CLR_FLAGS_ISSUE"):
                issue(Op.CLEAR_FLAGS, "CLR_FLAGS_WAIT")
            with m.State("CLR_FLAGS_WAIT"):
                m.d.sync += [in_batch.eq(0), slot.eq(0)]
                wait("NEXT")
            with m.State("NEXT"):
                full = in_batch.bit_select(s_batch, 1)   # in_batch == B (in_batch ≤ B)
                with m.If(full | ((left == 0) & (in_batch != 0))):
                    m.next = "BATCH_END"
                with m.Elif(left == 0):
                    m.next = "PASS_END"
                with m.Else():
                    m.next = "SAMPLE_START"
            # A sample: engine ``slot`` takes it once idle, and its record is walked
            # into the engine; the next sample can start as soon as the walk has
            # issued its last read.
            with m.State("SAMPLE_START"):
                with m.If(slot_idle):
                    with m.If(d_streamed):      # the oldest complete record of the ring
                        with m.If(recs_avail != 0):
                            m.d.comb += [rd_take.eq(1), sj_start.eq(1), sj_base.eq(rd_base),
                                         eng_start.eq(1)]
                            m.next = "WALK"
                    with m.Elif(next_valid):
                        m.d.comb += [su_take.eq(1), sj_start.eq(1), sj_base.eq(next_base),
                                     eng_start.eq(1)]
                        m.next = "WALK"
            with m.State("WALK"):
                with m.If(~sj_active):
                    m.d.sync += [left.eq(left - 1), in_batch.eq(in_batch + is_train),
                                 slot.eq(Mux(slot == C - 1, 0, slot + 1))]
                    m.next = "NEXT"
            with m.State("BATCH_END"):
                with m.If(all_idle):
                    with m.If(self.state_overflow | self.acc_overflow):
                        m.d.sync += skipped.eq(skipped + 1)
                        m.next = "CLR_ACC_ISSUE"
                    with m.Else():
                        m.d.sync += [wr_idx.eq(0), sum_bad.eq(0)]
                        if C > 1:
                            m.next = "CHECK_ISSUE"
                        else:
                            m.d.comb += pj_start.eq(1)
                            m.next = "OPT_ISSUE"
            # With several engines, the sum of their accumulators may not fit
            # acc_width although each does: a first READ_ACC only checks the sums.
            if C > 1:
                with m.State("CHECK_ISSUE"):
                    m.d.comb += chk_sel.eq(1)
                    issue(Op.READ_ACC, "CHECK_RUN")
                with m.State("CHECK_RUN"):
                    m.d.comb += chk_sel.eq(1)
                    with m.If(accq.r_rdy):
                        m.d.sync += wr_idx.eq(wr_idx + 1)
                        with m.If(~acc_fits):
                            m.d.sync += sum_bad.eq(1)
                    with m.If((wr_idx == P) & cmd_idle):
                        with m.If(sum_bad):
                            m.d.sync += skipped.eq(skipped + 1)
                            m.next = "CLR_ACC_ISSUE"
                        with m.Else():
                            m.d.comb += pj_start.eq(1)
                            m.d.sync += wr_idx.eq(0)
                            m.next = "OPT_ISSUE"
            with m.State("OPT_ISSUE"):
                m.d.comb += opt_sel.eq(1)
                issue(Op.READ_ACC, "OPT_RUN")
            with m.State("OPT_RUN"):
                m.d.comb += opt_sel.eq(1)
                with m.If((wr_idx == P) & cmd_idle):
                    m.d.comb += pj_start.eq(1)
                    m.next = "WP_ISSUE"
            with m.State("PASS_END"):
                # a STREAM still taking (surplus) words keeps the pass, and ``inputs``
                with m.If(settled & (sop != _Sop.WORDS)):
                    m.d.sync += [running.eq(Pass.NONE), streaming.eq(0)]
                    to_idle()

        # ---- STREAM, beside the pass (it arrives while the FSM above runs the pass)
        with m.Switch(sop):
            with m.Case(_Sop.IDLE):
                with m.If(streaming & (cmd.op == Op.STREAM)):
                    m.d.comb += self.cmd.ready.eq(1)
                    with m.If(self.cmd.valid):
                        m.d.sync += [s_left.eq(cmd.length), result.eq(Result.OK),
                                     sop.eq(Mux(cmd.length == 0, _Sop.FINISH, _Sop.WORDS))]
            with m.Case(_Sop.WORDS):
                m.d.comb += [inputs_ready.eq(ring_rdy), take_words.eq(1)]
                with m.If(in_take):
                    m.d.sync += s_left.eq(s_left - 1)
                    with m.If(s_left == 1):
                        m.d.sync += sop.eq(_Sop.FINISH)
            with m.Case(_Sop.FINISH):
                # the transfer that delivered the pass's last record ends with the pass
                m.d.comb += self.done.valid.eq(~(streaming & w_all))
                with m.If(self.done.valid & self.done.ready):
                    m.d.sync += sop.eq(_Sop.IDLE)

        self.probes.update(sample_start=sj_start, sample_base=sj_base, lr_shift=lr_shift)
        return outer

    # ------------------------------------------------------------------------------
    def _setup_field(self, m, field, w, ws, bad, st):
        """One TRAIN_SETUP word ``w`` (``ws``: the same bits signed): latch it into its
        register of ``st`` and flag a value that
        :func:`~hel_fpga.spec.training.unpack_setup` refuses (``bad``, comb)."""
        cfg, fm = self.cfg, self.fm
        eps_max = min(EPS_LOG2_RANGE[1], cfg.state_width - cfg.dt_log2 - 2)   # check_for
        if field == "loss":
            ok = (w == 0) if cfg.o < 2 else (w < 2)
            m.d.sync += st.loss.eq(w[0])
        elif field == "optimizer":
            ok = w < 2
            m.d.sync += st.optimizer.eq(w[0])
        elif field == "eps_log2":
            ok = (w >= EPS_LOG2_RANGE[0]) & (w <= eps_max)
            m.d.sync += st.eps_log2.eq(w[:5])
        elif field == "batch_log2":
            ok = w <= BATCH_LOG2_RANGE[1]
            m.d.sync += st.batch_log2.eq(w[:4])
        elif field == "lr_log2":
            lo = Mux(st.optimizer == Optimizer.SGDM, SGDM_LR_LOG2_MIN, LR_LOG2_RANGE[0])
            ok = (ws >= lo) & (ws <= LR_LOG2_RANGE[1])
            m.d.sync += st.lr_log2.eq(ws[:7])
        elif field in ("beta_log2", "beta2_log2"):
            ok = (w >= BETA_LOG2_RANGE[0]) & (w <= BETA_LOG2_RANGE[1])
            m.d.sync += getattr(st, field).eq(w[:5])
        elif field == "halvings":
            lion_worst = st.lr_log2 + w[:4]
            ok = (w <= HALVINGS_RANGE[1]) & ~((st.optimizer == Optimizer.LION)
                                              & (lion_worst > fm.master.frac))
            m.d.sync += st.halvings.eq(w[:4])
        elif field == "epochs":
            ok = w != 0
            m.d.sync += st.epochs.eq(w)
        elif field == "seed_lo":
            ok = Const(1)
            m.d.sync += st.seed[:16].eq(w)
        elif field == "seed_hi":
            ok = Const(1)
            m.d.sync += st.seed[16:].eq(w)
        elif field == "steps":
            ok = (w >= 1) & (w <= cfg.t_max)
            m.d.sync += st.steps.eq(w[:len(st.steps)])
        elif field == "train_count":
            ok = w != 0
            m.d.sync += st.train_count.eq(w)
        elif field == "test_count":
            ok = Const(1)
            m.d.sync += st.test_count.eq(w)
        elif field == "inputs":
            ok = (w >= 1) & (w <= cfg.k)
            m.d.sync += st.inputs.eq(w[:len(st.inputs)])
        elif field == "outputs":
            # loss precedes outputs: one-hot needs two classes
            ok = (w >= 1) & (w <= cfg.o) & ~((st.loss == LossKind.ONEHOT) & (w < 2))
            m.d.sync += st.outputs.eq(w[:len(st.outputs)])
        elif field == "stream_slots":
            ok = Const(1)
            m.d.sync += st.stream_slots.eq(w)
        else:                                   # pragma: no cover - SETUP_FIELDS changed
            raise AssertionError(f"unknown setup field {field!r}")
        m.d.comb += bad.eq(~ok)
