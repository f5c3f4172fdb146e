"""The command unit: good frames in, replies out, the HEL core's operations in between.

:class:`CommandUnit` is the device side of the command layer (``docs/protocol.md``; its
constants and tables: :mod:`hel_fpga.spec.protocol`). Its byte-for-byte reference is
:class:`hel_fpga.sim.protocol_model.ProtocolModel`: for the same request bytes the gateware
sends the same reply bytes (``tests/test_command.py`` checks this).

Data path
---------
::

    FrameDecoder.source ──► header/payload capture ──► checks ──► core.cmd
         (good frames)         (cmd, seq, ≤ 8 bytes)      │
    FrameDecoder.error ───────────────────────────────────┤ error replies
                                                          ▼
    DATA payload bytes ──► WordUnpacker ──► core.params_in / inputs / nudges
    core.params_out / outputs / acc_out / state_out ──► DataReplier ──► tx
    small replies (header + ≤ 8 bytes: STATUS, acks, errors; IDENT from a ROM) ──► tx
    tx ──► FrameEncoder.sink

Design decisions
----------------
* **One frame at a time.** The unit reads a frame's ``cmd``, ``seq`` and up to
  eight payload bytes into registers (DATA: only its two index bytes), makes
  every check of the protocol's order (unknown command, BUSY, request length,
  state, field values) on those registers, registers the verdict (state
  ``VERDICT``) and only then acts on it (``CHECK``). The extra cycle per frame
  keeps the checks' priority chain and the DATA chunk-length arithmetic out of
  the path into the core's command handshake, which would otherwise be the
  longest path of the ECP5 builds. A rejected frame is drained (its remaining
  bytes read and dropped) and answered with an ERROR; nothing else changes.
  The decoder's ``length`` field gives the payload length at the first byte, so
  a DATA chunk of the wrong length is rejected before any of its words reaches
  the core.
* **Reports in wire order.** :class:`hel_fpga.rtl.framing.FrameDecoder` queues bad-frame
  reports behind the frames before them, and the unit takes a report only
  between frames, so replies leave in the order the model sends them.
* **Transfers stream.** A transfer-opening command (WRITE_PARAMS, LOAD, ECHO)
  issues the core operation at once; the core then waits for words. DATA
  chunks are unpacked straight into the core's input stream at the core's pace
  (back-pressure goes into the decoder's receive ring, which the protocol's
  window of 2 sizes). A chunk is acked when its last byte has been consumed;
  the final chunk's ack waits for the core's ``done`` (for ECHO: the last echo
  step accumulated). Words therefore reach the core chunk by chunk, where the
  model applies a transfer at its end; nothing can observe the difference,
  because while a transfer is open only DATA, STATUS, IDENT and RESET are
  accepted, and RESET clears everything.
* **Passes.** On a device with the training core, TRAIN and EVAL are answered
  at once and the pass runs in the core; while it runs (``core.training``) only
  STATUS, IDENT, RESET and METRICS are taken, plus STREAM while the core says a
  streamed pass runs (``core.streaming``; outside one STREAM is WRONG_STATE). A
  STREAM opens a transfer of operand words into the core's ``inputs`` like
  STORE; its DATA chunks are then under the transfer rule, not the pass's. The
  core holds the words back while its ring is full, so the unpacker stalls and
  the chunk's ack waits; the final chunk's ack waits for the core's ``done``,
  which comes after the pass's end if the transfer completed the pass.
* **Bit-serial packing.** :class:`WordUnpacker` and :class:`DataReplier` move
  one bit per cycle between a byte register and a word register. That costs
  about 9 cycles per byte, far below a UART byte (10 × divisor ≥ 40 cycles),
  needs no barrel shifter, and handles every word width (operand, state,
  accumulator) with one register pair, the width being only a bit count.
* **The unit keeps the protocol state.** ``t_loaded``, ``forwarded``,
  ``one_sided``, the transfer registers and the retransmission registers
  (``last_cmd``/``last_seq``) live here, so every check is made before the core
  sees a command; the core's own result codes are never needed.
* **RESET** pulses ``core_rst`` (the top level wraps the core in a
  ``ResetInserter``), which aborts any operation and clears the core's
  registers and flags, then zeroes the core's memories with ordinary
  operations fed with zeros: WRITE_PARAMS (all zero), LOAD of one zero step,
  a centred FORWARD (zeroes the fwd bank; its outputs are dropped), a one-row
  ECHO with a zero nudge (zeroes the ±ε banks, the flip of a zero state being
  zero) and CLEAR_ACC. Only then is RESET answered. This needs no extra core
  operation and costs a few hundred cycles.
* **Retransmissions** follow the protocol: a request equal in ``cmd`` and
  ``seq`` to the last good, executed frame is a duplicate. A duplicate FORWARD
  runs again with the core's ``no_acc`` bit (same outputs, nothing
  accumulated, one-sided mode kept); a duplicate transfer-opening command whose
  transfer is open with no chunk applied is acked again.
* **Small.** The IDENT reply is a ROM in a block RAM (registered read); counters
  are as wide as the configuration's chunk counts, not the wire's u16; the
  replier's word input is multiplexed only over the bits each stream has and
  reads the unit's frame registers instead of copies; the unpacker takes bits
  straight from its input stream and leaves words at bit 0 (no output
  multiplexer per width); a frame's body length is kept as the decoder gives it
  (the chunk-length check folds the header into its rounding). The unit needs
  no multiplier. Measured sizes: ``docs/boards.md``.

Timing differences from the model (allowed by the protocol): the model answers
every frame at once, so it never overruns by itself (a frame the decoder could not
take in reaches the unit as an ``OVERRUN`` report in the frame's place, see
:class:`hel_fpga.rtl.framing.FrameDecoder`, and is answered like any link error), and
it updates STATUS's overflow bits of an ECHO at its end, the gateware as the echo
runs. While the core runs
FORWARD, SELFTEST, a read-out or a transfer's last chunk, the unit reads no
further frame (frames wait in the receive ring), so a SELFTEST of very many
steps keeps the device deaf until it ends; the model answers at once.
"""

from __future__ import annotations

import functools
import math
import operator

from amaranth.hdl import Cat, Const, Module, Mux, ResetInserter, Signal, signed
from amaranth.lib import enum, fifo, memory, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from hel_fpga.spec import protocol as P
from hel_fpga.rtl.core import HELCore, Op
from hel_fpga.spec.training import SETUP_WORDS
from hel_fpga.spec.formats import HelConfig
from hel_fpga.spec.names import BANKS, ESTIMATORS, PARAM_NAMES
from hel_fpga.rtl.framing import LENGTH_BITS, FrameByte, LinkError
from hel_fpga.spec.protocol import Command, ErrorCode, StatusFlag

__all__ = ["CommandUnit", "DataReplier", "WordUnpacker", "ReplyKind", "WORD_WIDTHS", "CORE_OP",
           "RESET_OPS", "COMMAND_REPLY", "mul_const"]

#: The word widths the unit moves, as HelConfig fields. The replier's ``width`` is an
#: index into all three, the unpacker's into the first two, or all three on a device
#: with on-chip training (WRITE_MASTER's words are acc words).
WORD_WIDTHS = ("operand_width", "state_width", "acc_width")
assert set(P.WORD_WIDTH.values()) == set(WORD_WIDTHS)
assert all(WORD_WIDTHS.index(P.WORD_WIDTH[c]) < 2 for c in P.OPENS_TRANSFER
           if c not in P.TRAINING_COMMANDS)

#: The core operation of each command that needs the core.
CORE_OP = {
    Command.CLEAR_FLAGS: Op.CLEAR_FLAGS, Command.CLEAR_ACC: Op.CLEAR_ACC,
    Command.READ_ACC: Op.READ_ACC, Command.READ_PARAMS: Op.READ_PARAMS,
    Command.READ_STATE: Op.READ_STATE, Command.SELFTEST: Op.SELFTEST,
    Command.FORWARD: Op.FORWARD, Command.WRITE_PARAMS: Op.WRITE_PARAMS,
    Command.LOAD: Op.LOAD, Command.ECHO: Op.ECHO,
    Command.TRAIN_SETUP: Op.TRAIN_SETUP, Command.STORE: Op.STORE,
    Command.WRITE_MASTER: Op.WRITE_MASTER, Command.READ_MASTER: Op.READ_MASTER,
    Command.TRAIN: Op.TRAIN, Command.EVAL: Op.EVAL, Command.STREAM: Op.STREAM,
}

#: The core operations that zero the core's memories after its local reset (see RESET).
RESET_OPS = (Op.WRITE_PARAMS, Op.LOAD, Op.FORWARD, Op.ECHO, Op.CLEAR_ACC)


class ReplyKind(enum.Enum, shape=3):
    """The payload of a small reply (after ``cmd | 0x80`` or ERROR_REPLY, and ``seq``)."""

    EMPTY = 0       # none
    IDENT = 1       # the IDENT record and name, from the ROM
    STATUS = 2      # STATUS_LAYOUT
    ERROR = 3       # ERROR_LAYOUT
    ACK = 4         # a DATA chunk's ack: next:u16
    RESULT = 5      # SELFTEST's result:u8
    METRICS = 6     # METRICS_LAYOUT, latched from the training core when accepted


#: The small reply of each command that has a non-empty one.
COMMAND_REPLY = {Command.IDENT: ReplyKind.IDENT, Command.STATUS: ReplyKind.STATUS,
                 Command.SELFTEST: ReplyKind.RESULT, Command.DATA: ReplyKind.ACK,
                 Command.METRICS: ReplyKind.METRICS}


def _layout_len(layout) -> int:
    return sum(size for _, size in layout)


def mul_const(x, c: int):
    """``x · c`` for a constant ``c ≥ 0`` as shifts and adds (never a DSP multiplier)."""
    terms = [x << i for i in range(c.bit_length()) if c >> i & 1]
    if not terms:
        return Const(0, 1)
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def _select(m: Module, sel, values, name: str):
    """A signal equal to ``values[sel]`` (constants)."""
    out = Signal(range(max(values) + 1), name=name)
    with m.Switch(sel):
        for i, v in enumerate(values):
            with m.Case(i):
                m.d.comb += out.eq(v)
    return out


class DataReplier(wiring.Component):
    """Words → data-reply frames: ``cmd|0x80, seq, index:u16, packed words`` per chunk.

    On ``start`` it latches ``total`` (≥ 1 words), then takes ``total`` words
    from ``words`` and sends chunks of :func:`hel_fpga.spec.protocol.chunk_words` words,
    each its own frame with indices 0, 1, …, bit-packed LSB first with zero
    padding (the format of :mod:`hel_fpga.spec.wire`). ``width`` (an index into
    ``widths``), ``cmd`` and ``seq`` are not latched: the producer holds them
    from ``start`` until ``busy`` falls (the command unit's frame registers do;
    no copies). ``busy`` is high from the cycle after ``start`` until the last
    byte has been accepted.

    Packing is bit-serial: a word is loaded into a shift register and its bits
    move one per cycle into a byte register, which is sent when full (or padded
    after a chunk's last word). About 9 cycles per byte, any width.
    """

    def __init__(self, widths, total_bits: int):
        self.widths = tuple(widths)
        self.max_width = max(self.widths)
        super().__init__({
            "start": In(1),
            "width": In(range(len(self.widths))),
            "total": In(total_bits),
            "cmd": In(8),
            "seq": In(8),
            "words": In(stream.Signature(signed(self.max_width))),
            "source": Out(stream.Signature(FrameByte)),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        max_width = self.max_width
        chunk_words_of = [P.chunk_words(w) for w in self.widths]

        width, cmd, seq = self.width, self.cmd, self.seq
        total_left = Signal.like(self.total)
        chunk_left = Signal(range(max(chunk_words_of) + 1))
        # chunk indices up to the most chunks ``total`` words can make (sent as u16): the
        # widest words have the fewest per chunk, so they make the most chunks
        most_chunks = max(P.chunk_count((1 << len(self.total)) - 1, w) for w in self.widths)
        index = Signal(range(most_chunks + 1))
        index_u16 = Cat(index, Const(0, 16 - len(index)))
        word_reg = Signal(max_width)
        word_bits = Signal(range(max_width + 1))
        byte_reg = Signal(8)
        byte_bits = Signal(range(9))
        word_width = _select(m, width, self.widths, "word_width")
        words_per_chunk = _select(m, width, chunk_words_of, "words_per_chunk")
        source = self.source

        with m.FSM(name="replier"):
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [total_left.eq(self.total), index.eq(0)]
                    m.next = "NEXT"
            with m.State("NEXT"):
                m.d.comb += self.busy.eq(1)
                # a chunk ends after words_per_chunk words or with the block, whichever comes first
                m.d.sync += [chunk_left.eq(words_per_chunk), word_bits.eq(0), byte_bits.eq(0)]
                m.next = "H0"
            for i, (state, value) in enumerate([("H0", cmd | P.REPLY_BIT), ("H1", seq),
                                                ("H2", index_u16[:8]), ("H3", index_u16[8:])]):
                with m.State(state):
                    m.d.comb += [self.busy.eq(1), source.valid.eq(1),
                                 source.payload.data.eq(value), source.payload.first.eq(i == 0)]
                    with m.If(source.ready):
                        m.next = ["H1", "H2", "H3", "BODY"][i]
            with m.State("BODY"):
                m.d.comb += self.busy.eq(1)
                more = (chunk_left != 0) & (total_left != 0)     # words left in this chunk
                last = ~more & (word_bits == 0)
                with m.If(byte_bits == 8):
                    m.d.comb += [source.valid.eq(1), source.payload.data.eq(byte_reg),
                                 source.payload.last.eq(last)]
                    with m.If(source.ready):
                        m.d.sync += byte_bits.eq(0)
                        with m.If(last):
                            m.d.sync += index.eq(index + 1)
                            m.next = "CHUNK_END"
                with m.Elif(word_bits != 0):
                    m.d.sync += [byte_reg.eq(Cat(byte_reg[1:], word_reg[0])),
                                 word_reg.eq(word_reg >> 1),
                                 word_bits.eq(word_bits - 1), byte_bits.eq(byte_bits + 1)]
                with m.Elif(more):
                    m.d.comb += self.words.ready.eq(1)
                    with m.If(self.words.valid):
                        m.d.sync += [word_reg.eq(self.words.payload), word_bits.eq(word_width),
                                     chunk_left.eq(chunk_left - 1),
                                     total_left.eq(total_left - 1)]
                with m.Else():      # pad the chunk's last byte with zeros
                    m.d.sync += [byte_reg.eq(Cat(byte_reg[1:], 0)), byte_bits.eq(byte_bits + 1)]
            with m.State("CHUNK_END"):
                m.d.comb += self.busy.eq(1)
                with m.If(total_left == 0):
                    m.next = "IDLE"
                with m.Else():
                    m.next = "NEXT"
        return m


class WordUnpacker(wiring.Component):
    """Bytes → words (the inverse of :class:`DataReplier`'s packing).

    On ``start`` it latches ``width`` (an index into ``widths``) and ``count``
    (≥ 1 words), then takes exactly the bytes that hold ``count`` packed words
    from ``sink`` and sends the words on ``words``; the pad bits of the last
    byte are dropped. ``busy`` is high from the cycle after ``start`` until the
    last word has been accepted. Bit-serial like :class:`DataReplier`.

    A ``w``-bit word is ``words.payload[:w]``; the bits above it are undefined
    (a consumer takes its own width, two's complement). Each bit enters the word
    register at bit ``w − 1`` and moves down, so a word always ends at bit 0: no
    multiplexer per width at the output, only one at each width's entry bit.
    """

    def __init__(self, widths, count_bits: int):
        self.widths = tuple(widths)
        self.max_width = max(self.widths)
        super().__init__({
            "start": In(1),
            "width": In(range(len(self.widths))),
            "count": In(count_bits),
            "sink": In(stream.Signature(8)),
            "words": Out(stream.Signature(signed(self.max_width))),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        max_width = self.max_width
        width = Signal.like(self.width)
        left = Signal.like(self.count)
        word_reg = Signal(max_width)    # bits enter at bit w-1: a w-bit word ends in word_reg[:w]
        word_bits = Signal(range(max_width + 1))
        bit_pos = Signal(3)             # the bit of the byte on ``sink`` taken next
        word_width = _select(m, width, self.widths, "word_width")
        shifted = Signal(max_width)     # word_reg one bit down, the next bit entering at w-1
        m.d.comb += shifted.eq(word_reg >> 1)
        for i, w in enumerate(self.widths):
            with m.If(width == i):
                m.d.comb += shifted[w - 1].eq(self.sink.payload.bit_select(bit_pos, 1))
        m.d.comb += self.words.payload.eq(word_reg)

        with m.FSM(name="unpacker"):
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [width.eq(self.width), left.eq(self.count), word_bits.eq(0),
                                 bit_pos.eq(0)]
                    m.next = "RUN"
            with m.State("RUN"):
                # The bits are taken straight from ``sink`` (a stream holds its payload
                # until accepted); a byte is accepted with its last bit, or, the last
                # byte, with the last word (its pad bits are dropped).
                m.d.comb += self.busy.eq(1)
                with m.If(word_bits == word_width):
                    m.d.comb += self.words.valid.eq(1)
                    with m.If(self.words.ready):
                        m.d.sync += [word_bits.eq(0), left.eq(left - 1)]
                        with m.If(left == 1):
                            m.d.comb += self.sink.ready.eq(bit_pos != 0)
                            m.next = "IDLE"
                with m.Elif(self.sink.valid):
                    m.d.comb += self.sink.ready.eq(bit_pos == 7)
                    m.d.sync += [word_reg.eq(shifted), word_bits.eq(word_bits + 1),
                                 bit_pos.eq(bit_pos + 1)]
        return m


class CommandUnit(wiring.Component):
    """The command layer between the frame codec and :class:`hel_fpga.rtl.core.HELCore`.

    See the module docstring for the design. Connect ``rx``/``rx_error`` to
    :class:`hel_fpga.rtl.framing.FrameDecoder`'s ``source``/``error``, ``tx`` to
    :class:`hel_fpga.rtl.framing.FrameEncoder`'s ``sink``, ``core`` to a ``HELCore(cfg)``
    wrapped in ``ResetInserter({"sync": core_rst})``, or to a ``TrainingCore(cfg)``,
    which takes ``core_rst`` on its own ``reset`` member and resets itself.

    Parameters
    ----------
    cfg : HelConfig
        The core's configuration (reported by IDENT).
    clk_hz, baud : int
        Reported by IDENT.
    name : str
        Board name reported by IDENT (ASCII, truncated to 32 bytes).

    Attributes
    ----------
    rx : In(stream.Signature(FrameByte))
        Good frames (``length`` must be the body length, as the decoder gives it).
    rx_error : In(stream.Signature(LinkError))
        Bad-frame reports; each is answered with ``ERROR(code, cmd=0, arg=0)``.
    tx : Out(stream.Signature(FrameByte))
        Reply bodies for the encoder.
    core : the flipped signature of ``HELCore(cfg)`` (or of ``core_signature``)
    core_rst : Out(1)
        Pulses for one cycle on RESET: the core's local synchronous reset.
    """

    def __init__(self, cfg: HelConfig, *, clk_hz: int, baud: int, name: str = "hel-fpga",
                 core_signature: wiring.Signature | None = None):
        self.cfg = cfg
        #: the device has on-chip training: ``core`` is a TrainingCore's signature
        self.training = cfg.store_words > 0
        self.ident = P.pack_ident(cfg, clk_hz, baud, name)
        self.widths = tuple(getattr(cfg, f) for f in WORD_WIDTHS)
        shapes = cfg.param_shapes()
        self.param_sizes = [math.prod(shapes[k]) for k in PARAM_NAMES]
        self.n_params = sum(self.param_sizes)
        # The words of every block each direction carries, with their widths.
        ow, sw = cfg.operand_width, cfg.state_width
        blocks_in = [(self.n_params, ow), (cfg.t_max * cfg.k, ow), (cfg.t_max * cfg.o, sw)]
        blocks_out = [(self.n_params, ow), (cfg.t_max * cfg.o, sw),
                      (self.n_params, cfg.acc_width), (2 * cfg.n, sw)]
        if self.training:
            blocks_in += [(SETUP_WORDS, ow), (cfg.store_words, ow),
                          (self.n_params, cfg.acc_width)]
        self.max_in = max(total for total, _ in blocks_in)
        self.max_out = max(total for total, _ in blocks_out)
        # the most chunks a transfer can have (xfer_done counts up to it); every block
        # must fit the protocol's chunk indices
        self.max_in_chunks = max(P.block_chunks(total, w) for total, w in blocks_in)
        for total, w in blocks_out:
            P.block_chunks(total, w)
        super().__init__({
            "rx": In(stream.Signature(FrameByte)),
            "rx_error": In(stream.Signature(LinkError)),
            "tx": Out(stream.Signature(FrameByte)),
            "core": In(core_signature or self._core_signature(cfg)),
            "core_rst": Out(1),
        })

    @staticmethod
    def _core_signature(cfg: HelConfig) -> wiring.Signature:
        from hel_fpga.rtl.training import TrainingCore
        core = TrainingCore(cfg) if cfg.store_words else HELCore(cfg)
        core._MustUse__silence = True      # built only for its signature
        return core.signature

    def elaborate(self, platform):
        return _CommandUnitBuilder(self).build()


class _CommandUnitBuilder:
    """The netlist of one :class:`CommandUnit`, built section by section.

    Each method adds one part of the unit to ``self.m`` and keeps the signals other
    parts use as attributes: :meth:`registers` (the state kept between frames and
    between the FSM's states), :meth:`decode` (the current frame's command and
    fields), :meth:`checks` (the verdict of the protocol's checks),
    :meth:`accepted` (what an accepted command does), :meth:`core_command`,
    :meth:`core_streams` and :meth:`control` (the FSM, one method per group of
    states).
    """

    def __init__(self, unit: CommandUnit):
        self.unit = unit
        self.cfg = unit.cfg
        self.m = Module()

    def has(self, c: Command) -> bool:
        """Whether this device executes ``c`` (the training commands need the training core)."""
        return self.unit.training or c not in P.TRAINING_COMMANDS

    def build(self) -> Module:
        self.helpers()
        self.registers()
        self.decode()
        self.checks()
        self.accepted()
        self.core_command()
        self.core_streams()
        self.control()
        return self.m

    # ------------------------------------------------------------------ helpers
    def helpers(self):
        """The data replier, the DATA unpacker and the IDENT ROM."""
        m, unit = self.m, self.unit
        m.submodules.replier = self.replier = DataReplier(
            unit.widths, len(Signal(range(unit.max_out + 1))))
        self.in_widths = unit.widths if unit.training else unit.widths[:2]
        self.chunk_words_range = range(max(P.chunk_words(w) for w in self.in_widths) + 1)
        m.submodules.unpacker = self.unpacker = WordUnpacker(
            self.in_widths, len(Signal(self.chunk_words_range)))
        # A block RAM, which Yosys does not infer for so small a ROM unless told: its
        # read is registered, so REPLY addresses the byte of the next cycle.
        m.submodules.rom = ident_rom = memory.Memory(
            shape=8, depth=len(unit.ident), init=list(unit.ident), attrs={"ram_style": "block"})
        self.ident_read = ident_rom.read_port()

    # ------------------------------------------------------------------ registers
    def registers(self):
        """The registers: the current frame, the protocol state, the verdict, the reply."""
        cfg, unit = self.cfg, self.unit
        # the current frame (cmd 0 for a link error report)
        self.frame_cmd = Signal(8)
        self.frame_seq = Signal(8)
        self.frame_len = Signal(LENGTH_BITS)    # its body length: HEADER_LEN + payload bytes
        self.frame_done = Signal()              # its last byte has been consumed
        self.payload = Signal(64)               # its first 8 payload bytes
        self.payload_count = Signal(range(9))

        # the retransmission rule: the last good, executed frame
        self.last_valid = Signal()
        self.last_cmd = Signal(8)
        self.last_seq = Signal(8)

        self.t_loaded = Signal(range(cfg.t_max + 1))
        self.forwarded = Signal()
        self.one_sided = Signal()

        self.xfer_open = Signal()
        self.xfer_cmd = Signal(8)               # the STATUS field: open or last transfer
        self.xfer_done = Signal(range(unit.max_in_chunks + 1))   # chunks applied = the next index
        self.xfer_done_u16 = Cat(self.xfer_done, Const(0, 16 - len(self.xfer_done)))
        self.xfer_words_left = Signal(range(unit.max_in + 1))   # words not yet received
        self.xfer_width = Signal(range(3))      # the transfer's words: a WORD_WIDTHS index
        self.load_t = Signal(range(cfg.t_max + 1))      # an open LOAD's T
        self.done_seen = Signal()

        # VERDICT → CHECK: the checks' result, registered (the longest path otherwise)
        self.verdict_code = Signal(8)           # the ErrorCode, 0 = accepted
        self.verdict_ack_again = Signal()       # accepted, but only acked again (a duplicate)
        self.verdict_needs_core = Signal()      # the command needs the core
        self.verdict_chunk_words = Signal(self.chunk_words_range)   # DATA: the chunk's words

        # the small reply: cmd|0x80 (ERROR_REPLY for ERROR), frame_seq, a payload of one kind
        self.reply_len = {
            ReplyKind.EMPTY: 0, ReplyKind.IDENT: len(unit.ident),
            ReplyKind.STATUS: _layout_len(P.STATUS_LAYOUT),
            ReplyKind.ERROR: _layout_len(P.ERROR_LAYOUT),
            ReplyKind.ACK: P.CHUNK_HEADER_LEN, ReplyKind.RESULT: 1,
        }
        self.reply_kind = Signal(ReplyKind)
        self.reply_code = Signal(8)             # ERROR: code
        self.reply_arg_next = Signal()          # ERROR: arg = the next chunk index (else 0)
        self.selftest_pass = Signal()           # RESULT
        self.reply_index = Signal(range(len(unit.ident) + 3))   # the reply byte being sent
        assert len(unit.ident) > _layout_len(P.METRICS_LAYOUT)
        self.reply_len[ReplyKind.METRICS] = _layout_len(P.METRICS_LAYOUT)
        # the training core's metrics as METRICS was accepted (a pass updates them)
        self.metrics_latched = Signal(8 * _layout_len(P.METRICS_LAYOUT))
        self.reset_step = Signal(range(len(RESET_OPS)))

    # ------------------------------------------------------------------ decode
    def decode(self):
        """The frame's command, its fields and the retransmission and in-transfer rules."""
        m = self.m
        cmd, frame_len = self.frame_cmd, self.frame_len
        self.is_cmd = {c: Signal(name=f"is_{c.name.lower()}") for c in Command}
        for c, sig in self.is_cmd.items():
            m.d.comb += sig.eq(cmd == c)
        self.known = Signal()
        m.d.comb += self.known.eq(Cat(*(sig for c, sig in self.is_cmd.items()
                                        if self.unit.training
                                        or c not in P.TRAINING_COMMANDS)).any())
        self.duplicate = Signal()
        m.d.comb += self.duplicate.eq(self.last_valid & (self.last_cmd == cmd)
                                      & (self.last_seq == self.frame_seq))
        self.allowed_in_transfer = Signal()
        m.d.comb += self.allowed_in_transfer.eq(
            Cat(*(self.is_cmd[c] for c in P.DURING_TRANSFER)).any())
        # the training core's state (constant on a device without it)
        core = self.unit.core
        self.in_pass = core.training if self.unit.training else Const(0)
        self.streaming = core.streaming if self.unit.training else Const(0)
        self.setup_ok = core.setup_ok if self.unit.training else Const(0)
        self.allowed_in_pass = Signal()
        m.d.comb += self.allowed_in_pass.eq(
            Cat(*(self.is_cmd[c] for c in P.DURING_PASS)).any()
            | (self.is_cmd[Command.STREAM] & self.streaming))
        self.length_ok = Signal()
        with m.Switch(cmd):
            for c, n in P.REQUEST_LEN.items():
                with m.Case(c):
                    n += P.HEADER_LEN
                    m.d.comb += self.length_ok.eq(frame_len >= n if c in P.VARIABLE_LENGTH
                                                  else frame_len == n)
        # the request fields by type (a command has at most one u8 and one u32)
        self.u8 = self.payload[:8]
        self.u32 = self.payload[:32]
        self.index = self.payload[:16]          # DATA: the chunk index
        self.mask_ok = (self.u8 != 0) & (self.u8 <= P.PARAM_MASK_ALL)
        self.masked_total = Signal(range(self.unit.n_params + 1))
        m.d.comb += self.masked_total.eq(sum(Mux(self.u8[i], size, 0)
                                             for i, size in enumerate(self.unit.param_sizes)))
        self._expected_chunk()

    def _expected_chunk(self):
        """DATA: the words and the body length of the chunk expected next.

        Registers, two stages, out of the path into the verdict: xfer_words_left and
        xfer_width change only in CHECK and UNPACK, and the next DATA frame
        reaches VERDICT at least four cycles later (DRAIN, IDLE, SEQ, two PAYLOAD
        bytes), when both stages have long settled.
        """
        m, cfg = self.m, self.cfg
        widths = self.in_widths
        chunk_words = Signal(self.chunk_words_range)
        with m.Switch(self.xfer_width):
            for i, w in enumerate(widths):
                with m.Case(i):
                    m.d.comb += chunk_words.eq(P.chunk_words(w))
        self.expected_chunk_words = Signal.like(self.verdict_chunk_words)
        m.d.sync += self.expected_chunk_words.eq(
            Mux(self.xfer_words_left > chunk_words, chunk_words, self.xfer_words_left))
        # its frame's body length: cmd, seq, index and the packed words, rounded up
        self.expected_chunk_len = Signal(LENGTH_BITS + 1)
        pad = 7 + 8 * (P.HEADER_LEN + P.CHUNK_HEADER_LEN)
        words = self.expected_chunk_words
        with m.Switch(self.xfer_width):
            for i, w in enumerate(widths):
                with m.Case(i):
                    m.d.sync += self.expected_chunk_len.eq((mul_const(words, w) + pad) >> 3)

    # ------------------------------------------------------------------ checks
    def checks(self):
        """The checks of CHECK, in the protocol's order, as one priority chain."""
        m, cfg, is_cmd = self.m, self.cfg, self.is_cmd
        u8, u32 = self.u8, self.u32
        is_forward, is_echo, is_data = (is_cmd[Command.FORWARD], is_cmd[Command.ECHO],
                                        is_cmd[Command.DATA])
        self.duplicate_opening = Signal()       # a retransmitted transfer opening: ack again
        m.d.comb += self.duplicate_opening.eq(
            self.xfer_open & ~self.allowed_in_transfer & self.duplicate
            & (self.frame_cmd == self.xfer_cmd) & (self.xfer_done == 0))
        wrong_state = Signal()
        wrong_states = [is_forward & (self.t_loaded == 0), is_echo & ~self.forwarded,
                        is_data & ~self.xfer_open]
        bad_values = []
        # The training commands' checks exist only on a device with the training core
        # (elsewhere the commands are unknown, and their logic would only slow the unit).
        if self.unit.training:
            wrong_states.append((is_cmd[Command.TRAIN] | is_cmd[Command.EVAL]) & ~self.setup_ok)
            wrong_states.append(is_cmd[Command.STREAM] & ~self.streaming)
            # STORE: count ≥ 1 and start + count ≤ store_words (start is the second u32)
            store_end = Signal(34)
            m.d.comb += store_end.eq(u32 + self.payload[32:64])
            bad_values += [
                (is_cmd[Command.WRITE_MASTER] | is_cmd[Command.READ_MASTER]
                 | is_cmd[Command.EVAL]) & (u8 > 1),
                is_cmd[Command.STORE] & ((u32 == 0) | (store_end > cfg.store_words)),
                is_cmd[Command.STREAM] & ((u32 == 0) | (u32 > cfg.store_words))]
        m.d.comb += wrong_state.eq(functools.reduce(operator.or_, wrong_states))
        bad_value = Signal()
        m.d.comb += bad_value.eq(
            ((is_cmd[Command.READ_PARAMS] | is_cmd[Command.WRITE_PARAMS]) & ~self.mask_ok)
            | (is_cmd[Command.READ_STATE] & (u8 > len(BANKS) - 1))
            | (is_cmd[Command.SELFTEST] & (u32 == 0))
            | (is_forward & (u8 > len(ESTIMATORS) - 1))
            | (is_cmd[Command.LOAD] & ((u32 == 0) | (u32 > cfg.t_max)))
            | (is_echo & (u32 != 1) & (u32 != self.t_loaded))
            | functools.reduce(operator.or_, bad_values, Const(0)))
        self.data_old = Signal()                # DATA: a chunk already applied
        m.d.comb += self.data_old.eq(self.index < self.xfer_done)
        self.verdict = Signal(8)                # an ErrorCode, 0 = accepted
        verdict = self.verdict
        with m.If(~self.known):
            m.d.comb += verdict.eq(ErrorCode.UNKNOWN_COMMAND)
        with m.Elif(self.xfer_open & ~self.allowed_in_transfer):
            m.d.comb += verdict.eq(Mux(self.duplicate_opening, 0, ErrorCode.BUSY))
        if self.unit.training:
            # (a transfer open in a pass is a STREAM's: the transfer's rule above applies)
            with m.Elif(self.in_pass & ~self.xfer_open & ~self.allowed_in_pass):
                m.d.comb += verdict.eq(ErrorCode.BUSY)
        with m.Elif(~self.length_ok):
            m.d.comb += verdict.eq(ErrorCode.OUT_OF_RANGE)
        with m.Elif(wrong_state):
            m.d.comb += verdict.eq(ErrorCode.WRONG_STATE)
        with m.Elif(bad_value):
            m.d.comb += verdict.eq(ErrorCode.OUT_OF_RANGE)
        with m.Elif(is_data & ~self.data_old & (self.index != self.xfer_done)):
            m.d.comb += verdict.eq(ErrorCode.SEQUENCE)
        with m.Elif(is_data & ~self.data_old & (self.frame_len != self.expected_chunk_len)):
            m.d.comb += verdict.eq(ErrorCode.OUT_OF_RANGE)

    # ------------------------------------------------------------------ accepted
    def accepted(self):
        """What an accepted command does: its reply, its core use, its transfer or stream."""
        m, cfg, is_cmd = self.m, self.cfg, self.is_cmd
        u32, replier = self.u32, self.replier
        self.command_reply = Signal(ReplyKind)
        m.d.comb += self.command_reply.eq(ReplyKind.EMPTY)
        for c, kind in COMMAND_REPLY.items():
            if self.has(c):
                with m.If(is_cmd[c]):
                    m.d.comb += self.command_reply.eq(kind)
        self.needs_core = Cat(*(is_cmd[c] for c in CORE_OP if self.has(c))).any()
        self.opens = functools.reduce(operator.or_, (is_cmd[c] for c in P.OPENS_TRANSFER
                                                     if self.has(c)))
        self.xfer_total = Signal.like(self.xfer_words_left)
        with m.If(is_cmd[Command.WRITE_PARAMS]):
            m.d.comb += self.xfer_total.eq(self.masked_total)
        with m.Elif(is_cmd[Command.LOAD]):
            m.d.comb += self.xfer_total.eq(mul_const(u32[:len(self.load_t)], cfg.k))
        if self.unit.training:
            with m.Elif(is_cmd[Command.TRAIN_SETUP]):
                m.d.comb += self.xfer_total.eq(SETUP_WORDS)
            with m.Elif(is_cmd[Command.STORE] | is_cmd[Command.STREAM]):
                m.d.comb += self.xfer_total.eq(u32)
            with m.Elif(is_cmd[Command.WRITE_MASTER]):
                m.d.comb += self.xfer_total.eq(self.unit.n_params)
        with m.Else():
            m.d.comb += self.xfer_total.eq(Mux(u32 == 1, cfg.o, mul_const(self.t_loaded, cfg.o)))
        # data replies: each command's word width and total
        self.streams = functools.reduce(operator.or_, (is_cmd[c] for c in P.DATA_REPLIES
                                                       if self.has(c)))
        totals = {Command.READ_PARAMS: self.masked_total,
                  Command.FORWARD: mul_const(self.t_loaded, cfg.o),
                  Command.READ_ACC: self.unit.n_params, Command.READ_STATE: 2 * cfg.n,
                  Command.READ_MASTER: self.unit.n_params}
        m.d.comb += [replier.cmd.eq(self.frame_cmd), replier.seq.eq(self.frame_seq)]
        replies = [c for c in P.DATA_REPLIES if self.has(c)]
        for i, c in enumerate(replies):
            if i == 0:
                branch = m.If(is_cmd[c])
            elif i < len(replies) - 1:
                branch = m.Elif(is_cmd[c])
            else:
                branch = m.Else()
            with branch:
                m.d.comb += [replier.width.eq(WORD_WIDTHS.index(P.WORD_WIDTH[c])),
                             replier.total.eq(totals[c])]
        m.d.comb += [self.unpacker.width.eq(self.xfer_width),
                     self.unpacker.count.eq(self.verdict_chunk_words)]

        # The core's reset is a register (high in the RESET state): it reaches every
        # flip-flop of the core, so no logic may sit in front of it (its decode from
        # the state plus a net across an ECP5 die does not fit a 60 MHz period).
        self.core_rst = Signal()
        m.d.comb += self.unit.core_rst.eq(self.core_rst)
        if self.unit.training:      # a TrainingCore resets itself from its ``reset``
            m.d.comb += self.unit.core.reset.eq(self.core_rst)

    # ------------------------------------------------------------------ core command
    def core_command(self):
        """The core's command: the frame's operation, or RESET's zeroing steps.

        The fields come straight from the payload registers whatever the operation
        (the core ignores those its operation does not use), so the command needs no
        register and almost no multiplexers. RESET's zeroing steps set payload = 1:
        LOAD of one step, ECHO with a single (kick) row, and never a retransmission.
        """
        m, core, is_cmd = self.m, self.unit.core, self.is_cmd
        u8, u32 = self.u8, self.u32
        self.in_reset = Signal()
        reset_op = Signal(Op)
        self.frame_op = Signal(Op)
        for c, op in CORE_OP.items():
            if self.has(c):
                with m.If(is_cmd[c]):
                    m.d.comb += self.frame_op.eq(op)
        with m.Switch(self.reset_step):
            for i, op in enumerate(RESET_OPS):
                with m.Case(i):
                    m.d.comb += reset_op.eq(op)
        # The decoded fields (operation, kick, retransmission) are registered in VERDICT
        # with the verdict, which keeps the command decode off the path through the
        # core's command decode into its enables.
        self.verdict_op = Signal(Op)
        self.verdict_kick = Signal()
        self.verdict_no_acc = Signal()
        in_reset = self.in_reset
        command = core.cmd.payload
        m.d.comb += [command.op.eq(Mux(in_reset, reset_op, self.verdict_op)),
                     command.length.eq(u32),
                     command.seed.eq(self.payload[32:]), command.bank.eq(u8[:2]),
                     command.one_sided.eq(u8[0] & ~in_reset),
                     command.kick.eq(in_reset | self.verdict_kick),
                     command.skip.eq(Mux(in_reset, 0, ~u8[:4])),   # bit i set: leave array i out
                     command.no_acc.eq(self.verdict_no_acc & ~in_reset)]  # a retransmitted FORWARD

    # ------------------------------------------------------------------ core streams
    def core_streams(self):
        """The core's output streams into the replier, the unpacker into its input streams."""
        m, core, is_cmd = self.m, self.unit.core, self.is_cmd
        replier, unpacker = self.replier, self.unpacker
        # outputs of the core → the replier (it sends only a word's low ``w`` bits)
        # (READ_MASTER's words come on acc_out too: the training core sends them there)
        acc_reply = is_cmd[Command.READ_ACC] | (is_cmd[Command.READ_MASTER] if self.unit.training
                                                else Const(0))
        self.outs = [(core.params_out, is_cmd[Command.READ_PARAMS]),
                     (core.outputs, is_cmd[Command.FORWARD]), (core.acc_out, acc_reply),
                     (core.state_out, is_cmd[Command.READ_STATE])]
        for st, sel in self.outs:
            with m.If(sel):
                m.d.comb += [replier.words.valid.eq(st.valid), st.ready.eq(replier.words.ready)]
        # The payload bit by bit from the streams wide enough to have that bit, the widest
        # one by default: a bit only the accumulators have needs no multiplexer at all.
        by_width = sorted(((len(st.payload), st.payload.as_unsigned(), sel)
                           for st, sel in self.outs), key=lambda t: t[0])
        bits = []
        for b in range(len(replier.words.payload)):
            have = [(p, sel) for w, p, sel in by_width if w > b]
            bit = have[-1][0][b]
            for p, sel in have[:-1]:
                bit = Mux(sel, p[b], bit)
            bits.append(bit)
        m.d.comb += replier.words.payload.eq(Cat(*bits))
        # the unpacker → the core's input of the open transfer
        ins = [(core.params_in, (Command.WRITE_PARAMS,)), (core.inputs, (Command.LOAD,)),
               (core.nudges, (Command.ECHO,))]
        if self.unit.training:
            ins[1] = (core.inputs, (Command.LOAD, Command.TRAIN_SETUP, Command.STORE,
                                    Command.STREAM))
            ins.append((core.wide_in, (Command.WRITE_MASTER,)))
        # One word waits between them, which keeps the core's ready off a path through
        # the unpacker into rx.ready; the unpacker is bit-serial, so a one-word buffer
        # keeps its pace. It is emptied with the core's reset: a RESET may arrive while
        # the core still holds off a word.
        word_buf = fifo.SyncFIFO(width=len(unpacker.words.payload), depth=1)
        m.submodules.word_buf = ResetInserter({"sync": self.unit.core_rst})(word_buf)
        m.d.comb += [word_buf.w_data.eq(unpacker.words.payload),
                     word_buf.w_en.eq(unpacker.words.valid),
                     unpacker.words.ready.eq(word_buf.w_rdy)]
        for st, cmds in ins:
            m.d.comb += st.payload.eq(word_buf.r_data)
            with m.If(functools.reduce(operator.or_, (self.xfer_cmd == c for c in cmds))):
                m.d.comb += [st.valid.eq(word_buf.r_rdy), word_buf.r_en.eq(st.ready)]


    # ------------------------------------------------------------------ control
    def control(self):
        """The unit's FSM: receive a frame, check it, act, reply."""
        m, core = self.m, self.unit.core
        assert [int(f) for f in (StatusFlag.STATE_OVERFLOW, StatusFlag.ACC_OVERFLOW,
                                 StatusFlag.LOADED, StatusFlag.FORWARDED, StatusFlag.ONE_SIDED,
                                 StatusFlag.XFER_OPEN)] == [1, 2, 4, 8, 16, 32]
        self.status = Cat(core.state_overflow, core.acc_overflow, self.t_loaded != 0,
                          self.forwarded, self.forwarded & self.one_sided, self.xfer_open,
                          Const(0, 2), self.xfer_cmd, self.xfer_done_u16, self.t_loaded,
                          Const(0, 32 - len(self.t_loaded)))

        # CHECK hands a command to the core only while the core is idle, and nothing else
        # can give it work, so it still accepts the command in the next cycle: the valid
        # is registered, which keeps the command unit's decode and the core's command
        # decode on separate paths.
        self.core_issue = Signal()
        core_issued = Signal()
        m.d.sync += core_issued.eq(self.core_issue)
        m.d.comb += core.cmd.valid.eq(core_issued)

        with m.FSM(name="control"):
            self._receive_states()
            self._check_states()
            self._operation_states()
            self._reset_states()
            self._reply_states()

    def _receive_states(self):
        """IDLE, SEQ, PAYLOAD: a frame's header and first payload bytes, or a link error."""
        m = self.m
        rx, rxp = self.unit.rx, self.unit.rx.payload
        rx_error = self.unit.rx_error
        with m.State("IDLE"):
            m.d.comb += rx.ready.eq(1)
            with m.If(rx.valid):
                with m.If(rxp.first):
                    m.d.sync += [self.frame_cmd.eq(rxp.data), self.frame_len.eq(rxp.length),
                                 self.frame_done.eq(0), self.payload_count.eq(0)]
                    m.next = "SEQ"
            with m.Elif(rx_error.valid):       # a link error: ERROR(code, 0, 0)
                m.d.comb += rx_error.ready.eq(1)
                m.d.sync += [self.frame_cmd.eq(0), self.frame_seq.eq(rx_error.payload.seq),
                             self.frame_done.eq(1), self.reply_kind.eq(ReplyKind.ERROR),
                             self.reply_code.eq(rx_error.payload.code),
                             self.reply_arg_next.eq(0)]
                m.next = "DRAIN"

        with m.State("SEQ"):
            m.d.comb += rx.ready.eq(1)
            with m.If(rx.valid):
                m.d.sync += self.frame_seq.eq(rxp.data)
                with m.If(rxp.last):
                    m.d.sync += self.frame_done.eq(1)
                    m.next = "VERDICT"
                with m.Else():
                    m.next = "PAYLOAD"

        with m.State("PAYLOAD"):
            # all of a command's payload (only the first 8 bytes are kept);
            # of a DATA frame only the index
            m.d.comb += rx.ready.eq(1)
            with m.If(rx.valid):
                with m.Switch(self.payload_count):
                    for i in range(8):
                        with m.Case(i):
                            m.d.sync += self.payload[8 * i:8 * i + 8].eq(rxp.data)
                with m.If(self.payload_count != 8):
                    m.d.sync += self.payload_count.eq(self.payload_count + 1)
                with m.If(rxp.last):
                    m.d.sync += self.frame_done.eq(1)
                    m.next = "VERDICT"
                with m.Elif(self.is_cmd[Command.DATA]
                            & (self.payload_count == P.REQUEST_LEN[Command.DATA] - 1)):
                    m.next = "VERDICT"           # the index: the unpacker takes the rest

    def _check_states(self):
        """VERDICT registers the checks' result, CHECK acts on it."""
        m, core, is_cmd = self.m, self.unit.core, self.is_cmd
        with m.State("VERDICT"):
            # Register the verdict and what CHECK needs of the chunk arithmetic: its
            # inputs are registers, stable from here until CHECK has acted.
            m.d.sync += [self.verdict_code.eq(self.verdict),
                         self.verdict_ack_again.eq(self.duplicate_opening
                                                   | (is_cmd[Command.DATA] & self.data_old)),
                         self.verdict_needs_core.eq(self.needs_core),
                         self.verdict_chunk_words.eq(self.expected_chunk_words),
                         self.verdict_op.eq(self.frame_op),
                         self.verdict_kick.eq(self.u32 == 1),
                         self.verdict_no_acc.eq(self.duplicate)]
            m.next = "CHECK"

        with m.State("CHECK"):
            # Without an open transfer the core is idle (or about to be: wait for it),
            # so a command that needs it is handed over in this very cycle.
            code = self.verdict_code
            with m.If(self.xfer_open | core.cmd.ready | self.in_pass):
                m.d.sync += [self.reply_kind.eq(Mux(code != 0, ReplyKind.ERROR,
                                                    self.command_reply)),
                             self.reply_code.eq(code),
                             self.reply_arg_next.eq(code == ErrorCode.SEQUENCE),
                             self.last_valid.eq(code == 0), self.last_cmd.eq(self.frame_cmd),
                             self.last_seq.eq(self.frame_seq), self.done_seen.eq(0)]
                with m.If(code != 0):
                    m.next = "DRAIN"
                with m.Elif(self.verdict_ack_again):
                    m.next = "DRAIN"        # ack again
                with m.Else():
                    self._execute()

    def _execute(self):
        """CHECK, an accepted command: start it and go to the state that waits for it."""
        m, is_cmd, u8, u32 = self.m, self.is_cmd, self.u8, self.u32
        m.d.comb += [self.core_issue.eq(self.verdict_needs_core),
                     self.replier.start.eq(self.streams)]
        with m.If(is_cmd[Command.FORWARD]):
            m.d.sync += [self.forwarded.eq(1), self.one_sided.eq(u8[0])]
        with m.If(is_cmd[Command.SELFTEST] | is_cmd[Command.LOAD]):
            m.d.sync += [self.forwarded.eq(0), self.one_sided.eq(0)]
        with m.If(is_cmd[Command.LOAD]):
            m.d.sync += [self.t_loaded.eq(0), self.load_t.eq(u32)]
        xfer_width = Signal.like(self.xfer_width)
        for c in P.OPENS_TRANSFER:
            if self.has(c):
                with m.If(is_cmd[c]):
                    m.d.comb += xfer_width.eq(WORD_WIDTHS.index(P.WORD_WIDTH[c]))
        with m.If(self.opens):
            m.d.sync += [self.xfer_open.eq(1), self.xfer_cmd.eq(self.frame_cmd),
                         self.xfer_done.eq(0), self.xfer_words_left.eq(self.xfer_total),
                         self.xfer_width.eq(xfer_width)]
        if self.unit.training:
            # a pass leaves nothing loaded and nothing to echo
            with m.If(is_cmd[Command.TRAIN] | is_cmd[Command.EVAL]):
                m.d.sync += [self.t_loaded.eq(0), self.forwarded.eq(0), self.one_sided.eq(0)]
            with m.If(is_cmd[Command.METRICS]):
                mt = self.unit.core.metrics
                m.d.sync += self.metrics_latched.eq(Cat(
                    mt.running, Const(0, 8 - len(mt.running)), mt.samples, mt.loss_sum,
                    mt.correct, mt.skipped))
        with m.If(is_cmd[Command.DATA]):
            m.d.comb += self.unpacker.start.eq(1)
        m.next = "DRAIN"
        with m.If(is_cmd[Command.RESET]):
            m.d.sync += self.core_rst.eq(1)
            m.next = "RESET"
        waits = [Command.CLEAR_FLAGS, Command.CLEAR_ACC, Command.SELFTEST]
        if self.unit.training:
            waits += [Command.TRAIN, Command.EVAL]
        with m.If(functools.reduce(operator.or_, (is_cmd[c] for c in waits))):
            m.next = "CORE_WAIT"
        with m.If(self.streams):
            m.next = "STREAM"
        with m.If(is_cmd[Command.DATA]):
            m.next = "UNPACK"

    def _operation_states(self):
        """CORE_WAIT, STREAM (core operations); UNPACK, XFER_END (transfers)."""
        m, core = self.m, self.unit.core
        rx, rxp, tx = self.unit.rx, self.unit.rx.payload, self.unit.tx
        replier, unpacker = self.replier, self.unpacker
        with m.State("CORE_WAIT"):
            m.d.comb += core.done.ready.eq(1)
            with m.If(core.done.valid):
                m.d.sync += self.selftest_pass.eq(core.done.payload.selftest_pass)
                m.next = "DRAIN"
        with m.State("STREAM"):
            wiring.connect(m, replier.source, wiring.flipped(tx))
            m.d.comb += core.done.ready.eq(1)
            with m.If(core.done.valid):
                m.d.sync += self.done_seen.eq(1)
            with m.If(~replier.busy & (self.done_seen | core.done.valid)):
                m.next = "IDLE"

        with m.State("UNPACK"):
            m.d.comb += [unpacker.sink.valid.eq(rx.valid), unpacker.sink.payload.eq(rxp.data),
                         rx.ready.eq(unpacker.sink.ready)]
            with m.If(rx.valid & rx.ready & rxp.last):
                m.d.sync += self.frame_done.eq(1)
            with m.If(~unpacker.busy):
                m.d.sync += [self.xfer_done.eq(self.xfer_done + 1),
                             self.xfer_words_left.eq(self.xfer_words_left
                                                     - self.verdict_chunk_words)]
                with m.If(self.xfer_words_left == self.verdict_chunk_words):
                    m.next = "XFER_END"
                with m.Else():
                    m.next = "DRAIN"
        with m.State("XFER_END"):
            m.d.comb += core.done.ready.eq(1)
            with m.If(core.done.valid):
                m.d.sync += self.xfer_open.eq(0)
                with m.If(self.xfer_cmd == Command.LOAD):
                    m.d.sync += self.t_loaded.eq(self.load_t)
                with m.If(self.xfer_cmd == Command.ECHO):
                    m.d.sync += [self.forwarded.eq(0), self.one_sided.eq(0)]
                m.next = "DRAIN"

    def _reset_states(self):
        """RESET: the core's local reset, then the operations that zero its memories."""
        m, core = self.m, self.unit.core
        with m.State("RESET"):
            m.d.sync += self.core_rst.eq(0)
            m.d.sync += [self.xfer_open.eq(0), self.xfer_cmd.eq(0), self.xfer_done.eq(0),
                         self.t_loaded.eq(0), self.forwarded.eq(0), self.one_sided.eq(0),
                         self.reset_step.eq(0), self.payload.eq(1)]
            m.next = "RESET_HOLD" if self.unit.training else "RESET_ISSUE"
        if self.unit.training:
            # A TrainingCore registers ``reset`` before applying it: it is reset at
            # the end of this cycle, so its first zeroing command waits for the next.
            with m.State("RESET_HOLD"):
                m.next = "RESET_ISSUE"
        with m.State("RESET_ISSUE"):
            m.d.comb += [self.in_reset.eq(1), core.cmd.valid.eq(1)]
            with m.If(core.cmd.ready):
                m.next = "RESET_WAIT"
        with m.State("RESET_WAIT"):
            for st in (core.params_in, core.inputs, core.nudges):
                m.d.comb += [st.valid.eq(1), st.payload.eq(0)]
            for st, _ in self.outs:
                m.d.comb += st.ready.eq(1)
            m.d.comb += core.done.ready.eq(1)
            with m.If(core.done.valid):
                m.d.sync += self.reset_step.eq(self.reset_step + 1)
                with m.If(self.reset_step == len(RESET_OPS) - 1):
                    m.next = "DRAIN"
                with m.Else():
                    m.next = "RESET_ISSUE"

    def _reply_states(self):
        """DRAIN (the rest of the frame), then REPLY (the small reply)."""
        m = self.m
        rx, rxp, tx = self.unit.rx, self.unit.rx.payload, self.unit.tx
        with m.State("DRAIN"):
            with m.If(self.frame_done):
                m.d.sync += self.reply_index.eq(0)
                m.next = "REPLY"
            with m.Else():
                m.d.comb += rx.ready.eq(1)
                with m.If(rx.valid & rxp.last):
                    m.d.sync += self.frame_done.eq(1)
        with m.State("REPLY"):
            self._reply()

    def _reply(self):
        """REPLY: header (cmd|0x80 or ERROR_REPLY, seq), then the payload of its kind."""
        m, tx = self.m, self.unit.tx
        kind, reply_index = self.reply_kind, self.reply_index
        ident_read = self.ident_read
        i = Signal.like(reply_index)            # the payload byte
        m.d.comb += [i.eq(reply_index - 2),
                     ident_read.addr.eq(Mux(tx.ready, reply_index - 1, i))]
        is_error = kind == ReplyKind.ERROR
        reply_len = Signal(range(max(self.reply_len.values()) + 1))
        with m.Switch(kind):
            for k, n in self.reply_len.items():
                with m.Case(k):
                    m.d.comb += reply_len.eq(n)
        # The payload bytes of every kind but IDENT, merged by position (a byte past
        # a kind's length is never sent, so only positions kinds share need a
        # multiplexer): STATUS flags xfer_cmd xfer_done:u16 t_loaded:u32;
        # ERROR code cmd arg:u16 (arg = xfer_done or 0); ACK next:u16; RESULT.
        is_status, is_ack = kind == ReplyKind.STATUS, kind == ReplyKind.ACK
        done_lo, done_hi = self.xfer_done_u16[:8], self.xfer_done_u16[8:]
        status = self.status
        arg_zero = is_error & ~self.reply_arg_next
        small = [
            Mux(is_status, status[:8],
                Mux(is_error, self.reply_code, Mux(is_ack, done_lo, self.selftest_pass))),
            Mux(is_status, self.xfer_cmd, Mux(is_error, self.frame_cmd, done_hi)),
            Mux(arg_zero, 0, done_lo),
            Mux(arg_zero, 0, done_hi),
            *(status[32 + 8 * j:40 + 8 * j] for j in range(4)),
        ]
        assert len(status) == 64 and self.reply_len[ReplyKind.STATUS] == 8
        body = Signal(8)
        with m.Switch(i[:3]):
            for j, byte in enumerate(small):
                with m.Case(j):
                    m.d.comb += body.eq(byte)
        with m.If(kind == ReplyKind.IDENT):
            m.d.comb += body.eq(ident_read.data)
        if self.unit.training:
            with m.If(kind == ReplyKind.METRICS):
                m.d.comb += body.eq(self.metrics_latched.word_select(
                    i[:ceil_log2(len(self.metrics_latched) // 8)], 8))
        with m.Switch(reply_index):
            with m.Case(0):
                m.d.comb += tx.payload.data.eq(Mux(is_error, P.ERROR_REPLY,
                                                   self.frame_cmd | P.REPLY_BIT))
            with m.Case(1):
                m.d.comb += tx.payload.data.eq(self.frame_seq)
            with m.Default():
                m.d.comb += tx.payload.data.eq(body)
        last = reply_index == reply_len + 1
        m.d.comb += [tx.valid.eq(1), tx.payload.first.eq(reply_index == 0),
                     tx.payload.last.eq(last)]
        with m.If(tx.ready):
            m.d.sync += reply_index.eq(reply_index + 1)
            with m.If(last):
                m.next = "IDLE"
