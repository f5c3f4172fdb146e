"""A sample engine: one :class:`~hel_fpga.rtl.core.HELCore` with the per-sample half of
the on-chip training loop (docs/onchip.md "Sample engines").

:class:`hel_fpga.rtl.training.TrainingCore` holds ``cfg.engines`` = C of them. The
schedule of a sample does not depend on its data, and the only thing the samples of
a batch share is the parameters, so C samples run at once on C engines, each with
its own state banks, activations, products and contrast accumulators; the batch's
gradient is the sum of the C accumulators. The training core walks each sample's
record out of the store into the engine that runs it (about ``record`` cycles) and
moves on to the next engine while this one computes (thousands of cycles), so C
engines give C times the samples per second as long as C records can be walked in
the time of one sample.

What an engine does with a sample, once ``start`` has named it (``train``: FORWARD
and ECHO, else FORWARD only):

1. The record's words arrive on ``record`` tagged with their kind (inputs; the
   label, or per step the mask word and the o targets) and wait in the record FIFO
   (a block RAM). LOAD takes the T·k inputs from it; after a step's k words the
   core gets K−k zeros (a column counter and a registered "pad" bit beside it).
2. FORWARD (centred): each output word joins the next target (mse) or the label
   (one-hot) in the :class:`~hel_fpga.rtl.trainer.LossUnit`; its nudges go to the
   nudge buffer at row T−1−t (forward step t). Outputs o … O−1 of a step join no
   record word (the loss unit gives them D = 0).
3. Training: once the loss unit has delivered the sample's last word, ECHO (T rows;
   one-hot: ``kick`` and row 0) streamed from the nudge buffer.

``finished`` pulses when the sample's last command is done; ``idle`` is high when
the engine can take a sample or a command. The record FIFO holds
:data:`RECORD_FIFO_WORDS` words at most: a record whose targets do not fit makes
the training core's walk wait for this engine's FORWARD (slower, never wrong).

While no sample runs, the engine is its core: ``cmd``, ``done`` and every stream of
:class:`HELCore` pass straight through (the training core's batch operations, and
the host's commands on engine 0). ``params_in``, ``params_out``, ``acc_out`` and
``state_out`` always belong to the outer side (no sample uses them). Every command,
the outer ones and the engine's own, reaches the core from one register (``creg``),
so no selection sits on the path into the core's command decode.

The engines of a device sit wherever the placer puts them, far from the training
core's shared logic and from each other. So every handshake that crosses the
boundary ends in registers on both sides: ``record``, ``params_in``, ``acc_out`` and
``done`` pass through two-word FIFOs (their ``ready`` and ``valid`` are tests of a
level register); ``start``, ``train``, ``clear`` and ``settings`` are registered on
arrival (a sample starts one cycle after ``start``); and ``idle`` is a register:
it falls in the cycle after ``start`` and rises one cycle after the engine has
become idle. The record FIFO is a block RAM whose read data (5.8 ns clock-to-out
on ECP5) passes through two more registered words before anything decodes it.
"""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.fifo import SyncFIFO, SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from hel_fpga.rtl.bram import NO_RW_CHECK, Prefetch, stream_slice
from hel_fpga.rtl.core import CmdLayout, DoneLayout, HELCore, Op
from hel_fpga.rtl.trainer import LossKind, LossUnit
from hel_fpga.spec.formats import HelConfig
from hel_fpga.spec.training import COUNT_WIDTH, LOSS_SUM_WIDTH

__all__ = ["SampleEngine", "Word", "RecordWordLayout", "SampleSettingsLayout",
           "RECORD_FIFO_WORDS"]

#: Most words of an engine's record FIFO: one ECP5 block RAM of 18-bit words (two
#: iCE40 ones). It holds a record's targets while the walk moves on to the next
#: engine (oscillators: 128 words).
RECORD_FIFO_WORDS = 1024


class Word(enum.Enum, shape=2):
    """What a record word is for."""
    INPUT = 0
    LABEL = 1
    MASK = 2
    TARGET = 3


def RecordWordLayout(cfg: HelConfig) -> data.StructLayout:
    """A record word on its way to an engine: its kind and the store word."""
    return data.StructLayout({"kind": Word, "word": signed(cfg.operand_width)})


def SampleSettingsLayout(cfg: HelConfig) -> data.StructLayout:
    """The run's settings an engine needs (held by the training core's setup)."""
    return data.StructLayout({
        "steps": unsigned(range(cfg.t_max + 1).stop.bit_length()),
        "inputs": unsigned(max(1, cfg.k.bit_length())),
        "outputs": unsigned(max(1, cfg.o.bit_length())),
        "kind": LossKind,
        "eps_log2": unsigned(5),
        "rows": unsigned(range(cfg.t_max * cfg.o + 1).stop.bit_length()),      # T·O
        "last_row": unsigned(range(cfg.t_max * cfg.o + 1).stop.bit_length()),  # (T − 1)·O
    })


class SampleEngine(wiring.Component):
    """One core and the per-sample training loop around it (module docstring).

    Parameters
    ----------
    cfg : HelConfig
        The core's configuration.
    core_kwargs
        Passed to :class:`HELCore` (``seq_ram``, ``compact``).

    Members: every member of :class:`HELCore` with the same name and shape, plus

    ========== ===== ===================================== =====================================
    member     dir   payload                               use
    ========== ===== ===================================== =====================================
    record     In    :func:`RecordWordLayout`              the running sample's record words
    start      In    1                                     run a sample (only while ``idle``)
    train      In    1                                     with ``start``: FORWARD and ECHO
    settings   In    :func:`SampleSettingsLayout`          steps, k, o, loss kind, eps_log2
    clear      In    1                                     zero the loss metrics (pass start)
    idle       Out   1                                     no sample runs, the loss unit is empty
    finished   Out   1                                     pulse: a sample's last command is done
    loss_sum   Out   LOSS_SUM_WIDTH                        Σ e² of this engine's samples (saturating)
    correct    Out   COUNT_WIDTH                           its correct samples (one-hot)
    ========== ===== ===================================== =====================================
    """

    def __init__(self, cfg: HelConfig, **core_kwargs):
        self.cfg = cfg
        self.core = HELCore(cfg, **core_kwargs)
        members = dict(self.core.signature.members)
        members.update({
            "record": In(stream.Signature(RecordWordLayout(cfg))),
            "start": In(1),
            "train": In(1),
            "settings": In(SampleSettingsLayout(cfg)),
            "clear": In(1),
            "idle": Out(1),
            "finished": Out(1),
            "loss_sum": Out(LOSS_SUM_WIDTH),
            "correct": Out(COUNT_WIDTH),
        })
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        cfg, core = self.cfg, self.core
        m.submodules.core = core
        m.submodules.loss = loss = LossUnit(cfg)
        K, O, T_MAX = cfg.k, cfg.o, cfg.t_max
        sw, ow = cfg.state_width, cfg.operand_width
        # What the training core sends every engine arrives through registers: the
        # engines sit anywhere on the die, and these nets fan out to all of them.
        s = Signal(SampleSettingsLayout(cfg))
        start, train_in, clear = Signal(), Signal(), Signal()
        m.d.sync += [s.eq(self.settings), start.eq(self.start), train_in.eq(self.train),
                     clear.eq(self.clear)]
        onehot = s.kind == LossKind.ONEHOT

        depth = min(RECORD_FIFO_WORDS, T_MAX * (K + O + 1) + 1)
        m.submodules.rbuf = rbuf = SyncFIFOBuffered(width=2 + ow, depth=depth)
        rec_in = stream_slice(m, "record", self.record, 2 + ow)
        m.d.comb += [rbuf.w_data.eq(rec_in.r_data), rbuf.w_en.eq(rec_in.r_rdy),
                     rec_in.r_en.eq(rbuf.w_rdy)]
        # The block RAM's read data (5.8 ns clock-to-out on ECP5) goes through two
        # registered words before anything decodes it.
        m.submodules.rfifo = rfifo = SyncFIFO(width=2 + ow, depth=2)
        m.d.comb += [rfifo.w_data.eq(rbuf.r_data), rfifo.w_en.eq(rbuf.r_rdy),
                     rbuf.r_en.eq(rfifo.w_rdy)]
        head = RecordWordLayout(cfg)(rfifo.r_data)
        st_kind, st_word = head.kind, head.word

        nbuf = m.submodules.nbuf = Memory(shape=signed(sw), depth=T_MAX * O, init=[],
                                          attrs=NO_RW_CHECK)     # ECHO reads after the last write
        nbuf_wr = nbuf.write_port()
        npf = Prefetch(m, "npf", [nbuf])

        m.d.comb += [loss.kind.eq(s.kind), loss.eps_log2.eq(s.eps_log2),
                     loss.clear.eq(clear), loss.outputs.eq(s.outputs),
                     self.loss_sum.eq(loss.loss_sum), self.correct.eq(loss.correct_count)]

        run = Signal()                  # a sample owns the core's streams
        train = Signal()
        loss_end = Signal()             # the loss unit delivered the sample's last word
        fwd_reset = Signal()

        # ---------------------------------------------------------------- nudge prefetch
        nj_start = Signal()
        nj_active = Signal()
        nj_addr = Signal(range(max(T_MAX * O, 2)))
        nj_last = Signal(range(max(T_MAX * O, 2)))
        m.d.comb += [npf.addr.eq(nj_addr), npf.issue.eq(nj_active & npf.can_issue)]
        with m.If(nj_start):
            m.d.sync += [nj_active.eq(1), nj_addr.eq(0),
                         nj_last.eq(Mux(onehot, O - 1, s.rows - 1))]
        with m.Elif(npf.issue):
            m.d.sync += nj_addr.eq(nj_addr + 1)
            with m.If(nj_addr == nj_last):
                m.d.sync += nj_active.eq(0)

        # ---------------------------------------------------------------- outputs → loss unit
        label = Signal(loss.in_layout["label"].shape)
        mask_bit = Signal()
        f_t = Signal(range(T_MAX))          # the forward step of the next output word
        f_o = Signal(range(O))
        # ``f_pad``: output f_o is not one of the data's (f_o ≥ o): it has no target
        # word (the loss unit gives it D = 0). A register beside f_o.
        f_pad = Signal()
        have_target = onehot | f_pad | (rfifo.r_rdy & (st_kind == Word.TARGET))
        join_ready = Signal()
        m.d.comb += [
            loss.sink.valid.eq(core.outputs.valid & have_target & run),
            join_ready.eq(loss.sink.ready & have_target),
            loss.sink.payload.output.eq(core.outputs.payload),
            loss.sink.payload.target.eq(st_word),
            loss.sink.payload.mask.eq(mask_bit),
            loss.sink.payload.last.eq(f_t == s.steps - 1),
            loss.sink.payload.label.eq(label),
        ]
        with m.If(fwd_reset):
            m.d.sync += [f_t.eq(0), f_o.eq(0), f_pad.eq(0)]
        with m.Elif(loss.sink.valid & loss.sink.ready):
            m.d.sync += [f_o.eq(Mux(f_o == O - 1, 0, f_o + 1)),
                         f_pad.eq((f_o != O - 1) & (f_o + 1 >= s.outputs))]
            with m.If(f_o == O - 1):
                m.d.sync += f_t.eq(f_t + 1)

        # ``in_pad``: the core's input in_col of a step is not one of the data's
        # (in_col ≥ k): the core gets a zero, no record word. A register beside in_col.
        in_col = Signal(range(K))
        in_pad = Signal()
        st_ready = Signal()
        with m.Switch(st_kind):
            with m.Case(Word.INPUT):
                m.d.comb += st_ready.eq(core.inputs.ready & ~in_pad)
            with m.Case(Word.LABEL, Word.MASK):
                m.d.comb += st_ready.eq(1)
            with m.Case(Word.TARGET):
                m.d.comb += st_ready.eq(loss.sink.ready & core.outputs.valid & ~f_pad)
        m.d.comb += rfifo.r_en.eq(st_ready & run)
        with m.If(rfifo.r_rdy & rfifo.r_en):
            with m.If(st_kind == Word.LABEL):
                in_range = (st_word >= 0) & (st_word < s.outputs)
                m.d.sync += label.eq(Mux(in_range, st_word[:len(label)], (1 << len(label)) - 1))
            with m.If(st_kind == Word.MASK):
                m.d.sync += mask_bit.eq(st_word != 0)

        # loss unit → nudge buffer (forward step t → row T − 1 − t)
        nw_row = Signal(range(T_MAX * O + 1))
        nw_col = Signal(range(O))
        m.d.comb += [loss.source.ready.eq(1), nbuf_wr.addr.eq(nw_row + nw_col),
                     nbuf_wr.data.eq(loss.source.payload.nudge), nbuf_wr.en.eq(loss.source.valid)]
        with m.If(fwd_reset):
            m.d.sync += [nw_row.eq(s.last_row), nw_col.eq(0), loss_end.eq(0)]
        with m.Elif(loss.source.valid):
            m.d.sync += nw_col.eq(Mux(nw_col == O - 1, 0, nw_col + 1))
            with m.If(nw_col == O - 1):
                m.d.sync += nw_row.eq(nw_row - O)
            with m.If(loss.source.payload.end):
                m.d.sync += loss_end.eq(1)

        # ---------------------------------------------------------------- the core's streams
        own_cmd = Signal(CmdLayout)
        own_valid = Signal()
        creg = Signal(CmdLayout, reset_less=True)
        creg_valid = Signal()
        m.d.comb += [core.cmd.valid.eq(creg_valid), core.cmd.payload.eq(creg),
                     self.cmd.ready.eq(~run & ~creg_valid)]
        with m.If(own_valid & ~creg_valid):
            m.d.sync += [creg.eq(own_cmd), creg_valid.eq(1)]
        with m.Elif(self.cmd.valid & self.cmd.ready):
            m.d.sync += [creg.eq(self.cmd.payload), creg_valid.eq(1)]
        with m.Elif(core.cmd.ready):
            m.d.sync += creg_valid.eq(0)
        core_in_take = Signal()
        p_in = stream_slice(m, "params", self.params_in, ow)
        m.d.comb += [core.params_in.valid.eq(p_in.r_rdy), core.params_in.payload.eq(p_in.r_data),
                     p_in.r_en.eq(core.params_in.ready)]
        acc = m.submodules.acc_slice = SyncFIFO(width=cfg.acc_width, depth=2)
        m.d.comb += [acc.w_en.eq(core.acc_out.valid), acc.w_data.eq(core.acc_out.payload),
                     core.acc_out.ready.eq(acc.w_rdy),
                     self.acc_out.valid.eq(acc.r_rdy), self.acc_out.payload.eq(acc.r_data),
                     acc.r_en.eq(self.acc_out.ready)]
        # the outer commands' done words; the engine's own are taken from the core
        dn = m.submodules.done_slice = SyncFIFO(width=DoneLayout.size, depth=2)
        m.d.comb += [dn.w_data.eq(core.done.payload),
                     self.done.valid.eq(dn.r_rdy), self.done.payload.eq(dn.r_data),
                     dn.r_en.eq(self.done.ready)]
        wiring.connect(m, core.params_out, wiring.flipped(self.params_out))
        wiring.connect(m, core.state_out, wiring.flipped(self.state_out))
        m.d.comb += [
            core.inputs.valid.eq(Mux(run, in_pad | (rfifo.r_rdy & (st_kind == Word.INPUT)),
                                     self.inputs.valid)),
            core.inputs.payload.eq(Mux(run, Mux(in_pad, 0, st_word), self.inputs.payload)),
            self.inputs.ready.eq(~run & core.inputs.ready),
            self.outputs.valid.eq(~run & core.outputs.valid),
            self.outputs.payload.eq(core.outputs.payload),
            core.outputs.ready.eq(Mux(run, join_ready, self.outputs.ready)),
            core.nudges.valid.eq(Mux(run, npf.valid, self.nudges.valid)),
            core.nudges.payload.eq(Mux(run, npf.data[0], self.nudges.payload)),
            self.nudges.ready.eq(~run & core.nudges.ready),
            npf.ready.eq(run & core.nudges.ready),
            self.busy.eq(core.busy),
            self.state_overflow.eq(core.state_overflow),
            self.acc_overflow.eq(core.acc_overflow),
            core_in_take.eq(run & core.inputs.valid & core.inputs.ready),
        ]
        if K > 1:
            with m.If(start):
                m.d.sync += [in_col.eq(0), in_pad.eq(0)]
            with m.Elif(core_in_take):
                m.d.sync += [in_col.eq(Mux(in_col == K - 1, 0, in_col + 1)),
                             in_pad.eq((in_col != K - 1) & (in_col + 1 >= s.inputs))]

        # ---------------------------------------------------------------- the sample
        def issue(op, nxt, **fields):
            m.d.comb += [own_valid.eq(1), own_cmd.op.eq(op)]
            for k, v in fields.items():
                m.d.comb += getattr(own_cmd, k).eq(v)
            with m.If(~creg_valid):
                m.next = nxt

        idle = Signal()
        idle_r = Signal()
        m.d.sync += idle_r.eq(idle & ~self.start & ~start)
        m.d.comb += self.idle.eq(idle_r)
        with m.FSM(name="sample"):
            with m.State("IDLE"):
                m.d.comb += [idle.eq(~loss.busy), core.done.ready.eq(dn.w_rdy),
                             dn.w_en.eq(core.done.valid)]
                with m.If(start):
                    m.d.sync += [train.eq(train_in), run.eq(1)]
                    m.next = "LOAD_ISSUE"
            with m.State("LOAD_ISSUE"):
                issue(Op.LOAD, "LOAD_WAIT", length=s.steps)
            with m.State("LOAD_WAIT"):
                m.d.comb += core.done.ready.eq(1)
                with m.If(core.done.valid):
                    m.next = "FWD_ISSUE"
            with m.State("FWD_ISSUE"):
                m.d.comb += fwd_reset.eq(1)
                issue(Op.FORWARD, "FWD_WAIT")
            with m.State("FWD_WAIT"):
                m.d.comb += core.done.ready.eq(1)
                with m.If(core.done.valid):
                    with m.If(train):
                        m.next = "ECHO_START"
                    with m.Else():
                        m.d.comb += self.finished.eq(1)
                        m.d.sync += run.eq(0)
                        m.next = "IDLE"
            with m.State("ECHO_START"):
                with m.If(loss_end):
                    m.d.comb += nj_start.eq(1)
                    m.next = "ECHO_ISSUE"
            with m.State("ECHO_ISSUE"):
                issue(Op.ECHO, "ECHO_WAIT", kick=onehot)
            with m.State("ECHO_WAIT"):
                m.d.comb += core.done.ready.eq(1)
                with m.If(core.done.valid):
                    m.d.comb += self.finished.eq(1)
                    m.d.sync += run.eq(0)
                    m.next = "IDLE"
        return m
