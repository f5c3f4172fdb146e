"""The command unit: good frames in, replies out, the HEL core's operations in between.

:class:`CommandUnit` is the device side of the command layer of :mod:`hel_fpga.spec.protocol`
(prose: ``docs/protocol.md``). Its byte-for-byte reference is
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
  the path into the core's command handshake, which was the ECP5 boards'
  critical path (18 ns, 55.5 MHz on the 25F) when CHECK acted on them directly. A
  rejected frame is drained (its remaining bytes read and dropped) and answered
  with an ERROR; nothing else changes. The decoder's ``length`` field gives the
  payload length at the first byte, so a DATA chunk of the wrong length is
  rejected before any of its words reaches the core.
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

Timing differences from the model (allowed by the protocol): the model never
overruns and updates STATUS's overflow bits of an ECHO at its end, the gateware
as the echo runs; a bad frame's report that finds the decoder's queue full is
sent out of order (see :class:`hel_fpga.rtl.framing.FrameDecoder`). While the core runs
FORWARD, SELFTEST, a read-out or a transfer's last chunk, the unit reads no
further frame (frames wait in the receive ring), so a SELFTEST of very many
steps keeps the device deaf until it ends; the model answers at once.

Resources (the iCEBreaker's configuration of ``boards/table.py``, ``synth_ice40
-dsp -noflatten``): about 960 LUT4 (control 730, :class:`DataReplier` 170,
:class:`WordUnpacker` 55), 340 flip-flops, one block RAM (the IDENT ROM), no
multiplier. What kept it there, from 1150 LUT4 and 400 flip-flops: the IDENT ROM
in a block RAM (a registered read, ~30 LUTs less); counters as wide as the
configuration's chunk counts, not the wire's u16; the replier's words multiplexed
only over the bits each stream has; the replier using the unit's frame registers
instead of copies; the unpacker taking bits straight from its input stream and
leaving words at bit 0 (no output multiplexer per width); a frame's body length
kept as the decoder gives it (the chunk check folds the header into its rounding).
"""

from __future__ import annotations

import math

from amaranth.hdl import Cat, Const, Module, Mux, ResetInserter, Signal, signed
from amaranth.lib import fifo, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from hel_fpga.spec import protocol as P
from hel_fpga.rtl.core import HELCore, Op
from hel_fpga.spec.formats import HelConfig
from hel_fpga.spec.names import PARAM_NAMES
from hel_fpga.rtl.framing import LENGTH_BITS, FrameByte, LinkError
from hel_fpga.spec.protocol import Command, ErrorCode, StatusFlag

__all__ = ["CommandUnit", "DataReplier", "WordUnpacker", "REQUEST_LEN", "DURING_TRANSFER",
           "ident_payload", "mul_const"]

#: Exact request payload length of each command (DATA: at least its index).
REQUEST_LEN = {
    Command.IDENT: 0, Command.STATUS: 0, Command.CLEAR_FLAGS: 0, Command.RESET: 0,
    Command.WRITE_PARAMS: 1, Command.READ_PARAMS: 1, Command.LOAD: 4, Command.FORWARD: 1,
    Command.ECHO: 4, Command.READ_ACC: 0, Command.CLEAR_ACC: 0, Command.READ_STATE: 1,
    Command.SELFTEST: 8, Command.DATA: P.CHUNK_HEADER_LEN,
}
#: The core operations that zero the core's memories after its local reset (see RESET).
RESET_OPS = (Op.WRITE_PARAMS, Op.LOAD, Op.FORWARD, Op.ECHO, Op.CLEAR_ACC)

#: Commands accepted while a transfer is open.
DURING_TRANSFER = frozenset({Command.DATA, Command.STATUS, Command.IDENT, Command.RESET})


def ident_payload(cfg: HelConfig, clk_hz: int, baud: int, name: str) -> bytes:
    """The IDENT reply payload: ``IDENT_FIELDS`` of the configuration, then the name."""
    values = {"protocol_version": P.PROTOCOL_VERSION, **cfg.to_dict(),
              "clock_hz": clk_hz, "baud": baud}
    return P.pack_fields(P.IDENT_FIELDS, values) + name.encode("ascii")[:P.IDENT_NAME_MAX]


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
        self.wmax = max(self.widths)
        super().__init__({
            "start": In(1),
            "width": In(range(len(self.widths))),
            "total": In(total_bits),
            "cmd": In(8),
            "seq": In(8),
            "words": In(stream.Signature(signed(self.wmax))),
            "source": Out(stream.Signature(FrameByte)),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        W = self.wmax
        cws = [P.chunk_words(w) for w in self.widths]

        width, cmd, seq = self.width, self.cmd, self.seq
        total_left = Signal.like(self.total)
        chunk_left = Signal(range(max(cws) + 1))
        # chunk indices up to the most chunks ``total`` words can make (sent as u16)
        index = Signal(range(P.chunk_count((1 << len(self.total)) - 1, min(self.widths)) + 1))
        index16 = Cat(index, Const(0, 16 - len(index)))
        wreg = Signal(W)
        wbits = Signal(range(W + 1))
        breg = Signal(8)
        bbits = Signal(range(9))
        w_sel = _select(m, width, self.widths, "w_sel")
        c_sel = _select(m, width, cws, "c_sel")
        src = self.source

        with m.FSM(name="replier"):
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [total_left.eq(self.total), index.eq(0)]
                    m.next = "NEXT"
            with m.State("NEXT"):
                m.d.comb += self.busy.eq(1)
                # a chunk ends after c_sel words or with the block, whichever comes first
                m.d.sync += [chunk_left.eq(c_sel), wbits.eq(0), bbits.eq(0)]
                m.next = "H0"
            for i, (state, value) in enumerate([("H0", cmd | P.REPLY_BIT), ("H1", seq),
                                                ("H2", index16[:8]), ("H3", index16[8:])]):
                with m.State(state):
                    m.d.comb += [self.busy.eq(1), src.valid.eq(1),
                                 src.payload.data.eq(value), src.payload.first.eq(i == 0)]
                    with m.If(src.ready):
                        m.next = ["H1", "H2", "H3", "BODY"][i]
            with m.State("BODY"):
                m.d.comb += self.busy.eq(1)
                more = (chunk_left != 0) & (total_left != 0)     # words left in this chunk
                last = ~more & (wbits == 0)
                with m.If(bbits == 8):
                    m.d.comb += [src.valid.eq(1), src.payload.data.eq(breg),
                                 src.payload.last.eq(last)]
                    with m.If(src.ready):
                        m.d.sync += bbits.eq(0)
                        with m.If(last):
                            m.d.sync += index.eq(index + 1)
                            m.next = "CHUNK_END"
                with m.Elif(wbits != 0):
                    m.d.sync += [breg.eq(Cat(breg[1:], wreg[0])), wreg.eq(wreg >> 1),
                                 wbits.eq(wbits - 1), bbits.eq(bbits + 1)]
                with m.Elif(more):
                    m.d.comb += self.words.ready.eq(1)
                    with m.If(self.words.valid):
                        m.d.sync += [wreg.eq(self.words.payload), wbits.eq(w_sel),
                                     chunk_left.eq(chunk_left - 1),
                                     total_left.eq(total_left - 1)]
                with m.Else():      # pad the chunk's last byte with zeros
                    m.d.sync += [breg.eq(Cat(breg[1:], 0)), bbits.eq(bbits + 1)]
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
        self.wmax = max(self.widths)
        super().__init__({
            "start": In(1),
            "width": In(range(len(self.widths))),
            "count": In(count_bits),
            "sink": In(stream.Signature(8)),
            "words": Out(stream.Signature(signed(self.wmax))),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        W = self.wmax
        width = Signal.like(self.width)
        left = Signal.like(self.count)
        wreg = Signal(W)            # bits enter at bit w-1: a w-bit word ends in wreg[:w]
        wbits = Signal(range(W + 1))
        bpos = Signal(3)            # the bit of the byte on ``sink`` taken next
        w_sel = _select(m, width, self.widths, "w_sel")
        shifted = Signal(W)         # wreg one bit down, the next bit entering at w-1
        m.d.comb += shifted.eq(wreg >> 1)
        for i, w in enumerate(self.widths):
            with m.If(width == i):
                m.d.comb += shifted[w - 1].eq(self.sink.payload.bit_select(bpos, 1))
        m.d.comb += self.words.payload.eq(wreg)

        with m.FSM(name="unpacker"):
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [width.eq(self.width), left.eq(self.count), wbits.eq(0),
                                 bpos.eq(0)]
                    m.next = "RUN"
            with m.State("RUN"):
                # The bits are taken straight from ``sink`` (a stream holds its payload
                # until accepted); a byte is accepted with its last bit, or, the last
                # byte, with the last word (its pad bits are dropped).
                m.d.comb += self.busy.eq(1)
                with m.If(wbits == w_sel):
                    m.d.comb += self.words.valid.eq(1)
                    with m.If(self.words.ready):
                        m.d.sync += [wbits.eq(0), left.eq(left - 1)]
                        with m.If(left == 1):
                            m.d.comb += self.sink.ready.eq(bpos != 0)
                            m.next = "IDLE"
                with m.Elif(self.sink.valid):
                    m.d.comb += self.sink.ready.eq(bpos == 7)
                    m.d.sync += [wreg.eq(shifted), wbits.eq(wbits + 1), bpos.eq(bpos + 1)]
        return m


class CommandUnit(wiring.Component):
    """The command layer between the frame codec and :class:`hel_fpga.rtl.core.HELCore`.

    See the module docstring for the design. Connect ``rx``/``rx_error`` to
    :class:`hel_fpga.rtl.framing.FrameDecoder`'s ``source``/``error``, ``tx`` to
    :class:`hel_fpga.rtl.framing.FrameEncoder`'s ``sink``, ``core`` to a ``HELCore(cfg)``
    wrapped in ``ResetInserter({"sync": core_rst})``.

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
        self.ident = ident_payload(cfg, clk_hz, baud, name)
        ow, sw = cfg.operand_width, cfg.state_width
        shapes = cfg.param_shapes()
        self.param_sizes = [math.prod(shapes[k]) for k in PARAM_NAMES]
        self.n_params = sum(self.param_sizes)
        # the largest blocks each direction can carry, and their chunk counts
        self.max_in = max(self.n_params, cfg.t_max * cfg.k, cfg.t_max * cfg.o)
        self.max_out = max(self.n_params, cfg.t_max * cfg.o, 2 * cfg.n)
        # the most chunks a transfer can have (xfer_done counts up to it)
        self.max_in_chunks = max(P.chunk_count(self.n_params, ow),
                                 P.chunk_count(cfg.t_max * cfg.k, ow),
                                 P.chunk_count(cfg.t_max * cfg.o, sw))
        for total, w in [(self.n_params, ow), (cfg.t_max * cfg.k, ow), (cfg.t_max * cfg.o, sw),
                         (self.n_params, cfg.acc_width), (2 * cfg.n, sw)]:
            if P.chunk_count(total, w) > P.MAX_CHUNKS:
                raise ValueError(f"a block of {total} {w}-bit words needs more than "
                                 f"{P.MAX_CHUNKS} chunks: the protocol cannot carry it")
        super().__init__({
            "rx": In(stream.Signature(FrameByte)),
            "rx_error": In(stream.Signature(LinkError)),
            "tx": Out(stream.Signature(FrameByte)),
            "core": In(core_signature or self._core_signature(cfg)),
            "core_rst": Out(1),
        })

    @staticmethod
    def _core_signature(cfg: HelConfig) -> wiring.Signature:
        core = HELCore(cfg)
        core._MustUse__silence = True      # built only for its signature
        return core.signature

    def elaborate(self, platform):
        m = Module()
        cfg = self.cfg
        N, K, O = cfg.n, cfg.k, cfg.o
        ow, sw, aw = cfg.operand_width, cfg.state_width, cfg.acc_width
        core = self.core
        rx, rxp = self.rx, self.rx.payload
        tx = self.tx

        # ---------------------------------------------------------------- helpers
        m.submodules.replier = replier = DataReplier(
            (ow, sw, aw), len(Signal(range(self.max_out + 1))))
        chunk_words = range(max(P.chunk_words(ow), P.chunk_words(sw)) + 1)  # a DATA chunk's words
        m.submodules.unpacker = unpacker = WordUnpacker((ow, sw), len(Signal(chunk_words)))
        R_OP, R_ST, R_ACC = 0, 1, 2          # replier widths

        rom = self.ident
        # A block RAM (Yosys keeps so small a ROM in LUTs, ~65 iCE40 LUTs, unless told):
        # its read is registered, so REPLY addresses the byte of the next cycle.
        m.submodules.rom = rom_mem = memory.Memory(shape=8, depth=len(rom), init=list(rom),
                                                   attrs={"ram_style": "block"})
        rom_rd = rom_mem.read_port()

        # ---------------------------------------------------------------- registers
        f_cmd = Signal(8)                  # the current frame (0 for a link error report)
        f_seq = Signal(8)
        f_len = Signal(LENGTH_BITS)        # its body length: HEADER_LEN + payload bytes
        f_done = Signal()                  # its last byte has been consumed
        pbuf = Signal(64)                  # its first 8 payload bytes
        pcount = Signal(range(9))

        last_valid = Signal()              # the retransmission rule
        last_cmd = Signal(8)
        last_seq = Signal(8)

        t_loaded = Signal(range(cfg.t_max + 1))
        forwarded = Signal()
        one_sided = Signal()

        xfer_open = Signal()
        xfer_cmd = Signal(8)               # the STATUS field: open or last transfer
        xfer_done = Signal(range(self.max_in_chunks + 1))  # chunks applied = the next index
        xfer_done16 = Cat(xfer_done, Const(0, 16 - len(xfer_done)))   # as the wire has it
        xfer_left = Signal(range(self.max_in + 1))   # words not yet received
        xfer_w = Signal()                  # the transfer's words: 0 operands, 1 state
        xfer_t = Signal(range(cfg.t_max + 1))        # LOAD: its T
        done_seen = Signal()

        # VERDICT → CHECK: the checks' result, registered (it is the longest path otherwise)
        v_code = Signal(8)                 # the ErrorCode, 0 = accepted
        v_again = Signal()                 # accepted, but only acked again (a duplicate)
        v_core = Signal()                  # the command needs the core
        v_words = Signal(chunk_words)      # DATA: the chunk's words (held until unpacked)

        # the small reply: cmd|0x80 (0xFF for ERROR), f_seq, a payload of one kind
        KINDS = {"EMPTY": 0, "ROM": len(rom), "STATUS": 8, "ERROR": 4, "ACK": 2, "RESULT": 1}
        kind_code = {k: i for i, k in enumerate(KINDS)}
        r_kind = Signal(range(len(KINDS)))
        r_code = Signal(8)                 # ERROR: code
        r_arg_next = Signal()              # ERROR: arg = the next chunk index (else 0)
        r_pass = Signal()                  # RESULT: SELFTEST passed
        r_i = Signal(range(len(rom) + 3))
        rst_step = Signal(range(len(RESET_OPS)))

        # ---------------------------------------------------------------- decode
        cmd = f_cmd
        is_ = {c: Signal(name=f"is_{c.name.lower()}") for c in Command}
        for c, sig in is_.items():
            m.d.comb += sig.eq(cmd == c)
        known = Signal()
        m.d.comb += known.eq(Cat(*is_.values()).any())
        dup = Signal()
        m.d.comb += dup.eq(last_valid & (last_cmd == cmd) & (last_seq == f_seq))
        in_xfer_ok = Signal()
        m.d.comb += in_xfer_ok.eq(Cat(*(is_[c] for c in DURING_TRANSFER)).any())
        len_ok = Signal()
        with m.Switch(cmd):
            for c, n in REQUEST_LEN.items():
                with m.Case(c):
                    n += P.HEADER_LEN
                    m.d.comb += len_ok.eq(f_len >= n if c == Command.DATA else f_len == n)
        u8 = pbuf[:8]
        u32 = pbuf[:32]
        index = pbuf[:16]
        mask_ok = (u8 != 0) & (u8 <= P.PARAM_MASK_ALL)
        masked_total = Signal(range(self.n_params + 1))
        m.d.comb += masked_total.eq(sum(Mux(u8[i], size, 0)
                                        for i, size in enumerate(self.param_sizes)))
        # DATA: words and bytes of the chunk expected next. Registers, two stages: the
        # compare, multiply and add were the iCEBreaker's critical path into the verdict.
        # xfer_left and xfer_w change only in CHECK and UNPACK, and the next DATA frame
        # reaches VERDICT at least four cycles later (DRAIN, IDLE, SEQ, two PAYLOAD bytes),
        # when both stages have long settled.
        cw_op, cw_st = P.chunk_words(ow), P.chunk_words(sw)
        c_w = Mux(xfer_w, cw_st, cw_op)
        exp_words = Signal.like(v_words)
        m.d.sync += exp_words.eq(Mux(xfer_left > c_w, c_w, xfer_left))
        # its frame's body length: cmd, seq, index and the packed words, rounded up
        exp_len = Signal(LENGTH_BITS + 1)
        pad = 7 + 8 * (P.HEADER_LEN + P.CHUNK_HEADER_LEN)
        m.d.sync += exp_len.eq(Mux(xfer_w, (mul_const(exp_words, sw) + pad) >> 3,
                                   (mul_const(exp_words, ow) + pad) >> 3))

        # ---------------------------------------------------------------- verdict
        # The checks of CHECK, in the protocol's order, as one priority chain.
        is_rp, is_wp = is_[Command.READ_PARAMS], is_[Command.WRITE_PARAMS]
        is_fw, is_echo, is_data = is_[Command.FORWARD], is_[Command.ECHO], is_[Command.DATA]
        is_load = is_[Command.LOAD]
        dup_open = Signal()         # a retransmitted transfer opening: ack again
        m.d.comb += dup_open.eq(xfer_open & ~in_xfer_ok & dup & (f_cmd == xfer_cmd)
                                & (xfer_done == 0))
        wrong_state = Signal()
        m.d.comb += wrong_state.eq((is_fw & (t_loaded == 0)) | (is_echo & ~forwarded)
                                   | (is_data & ~xfer_open))
        bad_value = Signal()
        m.d.comb += bad_value.eq(((is_rp | is_wp) & ~mask_ok)
                                 | (is_[Command.READ_STATE] & (u8 > 2))
                                 | (is_[Command.SELFTEST] & (u32 == 0))
                                 | (is_fw & (u8 > 1))
                                 | (is_load & ((u32 == 0) | (u32 > cfg.t_max)))
                                 | (is_echo & (u32 != 1) & (u32 != t_loaded)))
        data_old = Signal()         # DATA: a chunk already applied
        m.d.comb += data_old.eq(index < xfer_done)
        verdict = Signal(8)         # an ErrorCode, 0 = accepted
        with m.If(~known):
            m.d.comb += verdict.eq(ErrorCode.UNKNOWN_COMMAND)
        with m.Elif(xfer_open & ~in_xfer_ok):
            m.d.comb += verdict.eq(Mux(dup_open, 0, ErrorCode.BUSY))
        with m.Elif(~len_ok):
            m.d.comb += verdict.eq(ErrorCode.OUT_OF_RANGE)
        with m.Elif(wrong_state):
            m.d.comb += verdict.eq(ErrorCode.WRONG_STATE)
        with m.Elif(bad_value):
            m.d.comb += verdict.eq(ErrorCode.OUT_OF_RANGE)
        with m.Elif(is_data & ~data_old & (index != xfer_done)):
            m.d.comb += verdict.eq(ErrorCode.SEQUENCE)
        with m.Elif(is_data & ~data_old & (f_len != exp_len)):
            m.d.comb += verdict.eq(ErrorCode.OUT_OF_RANGE)

        # what an accepted command does
        cmd_kind = Signal.like(r_kind)      # its small reply
        m.d.comb += cmd_kind.eq(kind_code["EMPTY"])
        for c, k in [(Command.IDENT, "ROM"), (Command.STATUS, "STATUS"),
                     (Command.SELFTEST, "RESULT"), (Command.DATA, "ACK")]:
            with m.If(is_[c]):
                m.d.comb += cmd_kind.eq(kind_code[k])
        needs_core = Cat(*(is_[c] for c in (
            Command.CLEAR_FLAGS, Command.CLEAR_ACC, Command.READ_ACC, Command.READ_PARAMS,
            Command.READ_STATE, Command.SELFTEST, Command.FORWARD, Command.WRITE_PARAMS,
            Command.LOAD, Command.ECHO))).any()
        opens = is_wp | is_load | is_echo
        xfer_total = Signal.like(xfer_left)
        with m.If(is_wp):
            m.d.comb += xfer_total.eq(masked_total)
        with m.Elif(is_load):
            m.d.comb += xfer_total.eq(mul_const(u32[:len(xfer_t)], K))
        with m.Else():
            m.d.comb += xfer_total.eq(Mux(u32 == 1, O, mul_const(t_loaded, O)))
        # data replies
        streams = is_rp | is_fw | is_[Command.READ_ACC] | is_[Command.READ_STATE]
        m.d.comb += [replier.cmd.eq(f_cmd), replier.seq.eq(f_seq)]
        with m.If(is_rp):
            m.d.comb += [replier.width.eq(R_OP), replier.total.eq(masked_total)]
        with m.Elif(is_fw):
            m.d.comb += [replier.width.eq(R_ST), replier.total.eq(mul_const(t_loaded, O))]
        with m.Elif(is_[Command.READ_ACC]):
            m.d.comb += [replier.width.eq(R_ACC), replier.total.eq(self.n_params)]
        with m.Else():
            m.d.comb += [replier.width.eq(R_ST), replier.total.eq(2 * N)]
        m.d.comb += [unpacker.width.eq(xfer_w), unpacker.count.eq(v_words)]

        # The core's reset is a register (high in the RESET state): it reaches every
        # flip-flop of the core, so no logic may sit in front of it (on ECP5 its
        # decode from the state plus a net across the die exceeded 60 MHz's period).
        core_rst = Signal()
        m.d.comb += self.core_rst.eq(core_rst)

        # ---------------------------------------------------------------- core commands
        # The fields come straight from the payload registers whatever the operation
        # (the core ignores those its operation does not use), so the command needs no
        # register and almost no multiplexers. RESET's zeroing steps set pbuf = 1:
        # LOAD of one step, ECHO with a single (kick) row.
        in_rst = Signal()
        rst_op = Signal(Op)
        frame_op = Signal(Op)
        for c, op in [(Command.CLEAR_FLAGS, Op.CLEAR_FLAGS), (Command.CLEAR_ACC, Op.CLEAR_ACC),
                      (Command.READ_ACC, Op.READ_ACC), (Command.READ_PARAMS, Op.READ_PARAMS),
                      (Command.READ_STATE, Op.READ_STATE), (Command.SELFTEST, Op.SELFTEST),
                      (Command.FORWARD, Op.FORWARD), (Command.WRITE_PARAMS, Op.WRITE_PARAMS),
                      (Command.LOAD, Op.LOAD), (Command.ECHO, Op.ECHO)]:
            with m.If(is_[c]):
                m.d.comb += frame_op.eq(op)
        with m.Switch(rst_step):
            for i, op in enumerate(RESET_OPS):
                with m.Case(i):
                    m.d.comb += rst_op.eq(op)
        # The decoded fields (operation, kick, retransmission) are registered in VERDICT
        # with the verdict: decoding them in CHECK put the command decode, the core's
        # command decode and its enables on one path (the iCEBreaker's critical path).
        # During RESET, pbuf = 1: a kick, and never a retransmission.
        v_op = Signal(Op)
        v_kick = Signal()
        v_no_acc = Signal()
        cp = core.cmd.payload
        m.d.comb += [cp.op.eq(Mux(in_rst, rst_op, v_op)), cp.length.eq(u32),
                     cp.seed.eq(pbuf[32:]), cp.bank.eq(u8[:2]),
                     cp.one_sided.eq(u8[0] & ~in_rst), cp.kick.eq(in_rst | v_kick),
                     cp.skip.eq(Mux(in_rst, 0, ~u8[:4])),      # bit i set: leave array i out
                     cp.no_acc.eq(v_no_acc & ~in_rst)]         # a retransmitted FORWARD

        # ---------------------------------------------------------------- core streams
        # outputs of the core → the replier (it sends only a word's low ``w`` bits)
        outs = [(core.params_out, Command.READ_PARAMS), (core.outputs, Command.FORWARD),
                (core.acc_out, Command.READ_ACC), (core.state_out, Command.READ_STATE)]
        for st, c in outs:
            with m.If(is_[c]):
                m.d.comb += [replier.words.valid.eq(st.valid), st.ready.eq(replier.words.ready)]
        # The payload bit by bit from the streams wide enough to have that bit, the widest
        # one by default: a bit only the accumulators have needs no multiplexer at all.
        by_width = sorted(((len(st.payload), st.payload.as_unsigned(), is_[c]) for st, c in outs),
                          key=lambda t: t[0])
        bits = []
        for b in range(len(replier.words.payload)):
            have = [(p, sel) for w, p, sel in by_width if w > b]
            bit = have[-1][0][b]
            for p, sel in have[:-1]:
                bit = Mux(sel, p[b], bit)
            bits.append(bit)
        m.d.comb += replier.words.payload.eq(Cat(*bits))
        # the unpacker → the core's input of the open transfer
        ins = [(core.params_in, Command.WRITE_PARAMS), (core.inputs, Command.LOAD),
               (core.nudges, Command.ECHO)]
        # One word waits between them: otherwise the core's ready reached the decoder
        # through the unpacker and rx.ready in one cycle (the iCEBreaker's critical path).
        # The unpacker is bit-serial, so a one-word buffer keeps its pace. It is emptied
        # with the core's reset: a RESET may arrive while the core still holds off a word.
        word_buf = fifo.SyncFIFO(width=len(unpacker.words.payload), depth=1)
        m.submodules.word_buf = ResetInserter({"sync": self.core_rst})(word_buf)
        m.d.comb += [word_buf.w_data.eq(unpacker.words.payload),
                     word_buf.w_en.eq(unpacker.words.valid),
                     unpacker.words.ready.eq(word_buf.w_rdy)]
        for st, c in ins:
            m.d.comb += st.payload.eq(word_buf.r_data)
            with m.If(xfer_cmd == c):
                m.d.comb += [st.valid.eq(word_buf.r_rdy), word_buf.r_en.eq(st.ready)]

        # ---------------------------------------------------------------- control
        assert [int(f) for f in (StatusFlag.STATE_OVERFLOW, StatusFlag.ACC_OVERFLOW,
                                 StatusFlag.LOADED, StatusFlag.FORWARDED, StatusFlag.ONE_SIDED,
                                 StatusFlag.XFER_OPEN)] == [1, 2, 4, 8, 16, 32]
        status = Cat(core.state_overflow, core.acc_overflow, t_loaded != 0, forwarded,
                     forwarded & one_sided, xfer_open, Const(0, 2),
                     xfer_cmd, xfer_done16, t_loaded, Const(0, 32 - len(t_loaded)))

        # CHECK hands a command to the core only while the core is idle, and nothing else
        # can give it work, so it still accepts the command in the next cycle: the valid
        # is registered, which keeps the command unit's decode and the core's command
        # decode on separate paths.
        issue = Signal()
        issued = Signal()
        m.d.sync += issued.eq(issue)
        m.d.comb += core.cmd.valid.eq(issued)

        with m.FSM(name="cu"):
            with m.State("IDLE"):
                m.d.comb += rx.ready.eq(1)
                with m.If(rx.valid):
                    with m.If(rxp.first):
                        m.d.sync += [f_cmd.eq(rxp.data), f_len.eq(rxp.length),
                                     f_done.eq(0), pcount.eq(0)]
                        m.next = "SEQ"
                with m.Elif(self.rx_error.valid):       # a link error: ERROR(code, 0, 0)
                    m.d.comb += self.rx_error.ready.eq(1)
                    m.d.sync += [f_cmd.eq(0), f_seq.eq(self.rx_error.payload.seq), f_done.eq(1),
                                 r_kind.eq(kind_code["ERROR"]), r_code.eq(self.rx_error.payload.code),
                                 r_arg_next.eq(0)]
                    m.next = "DRAIN"

            with m.State("SEQ"):
                m.d.comb += rx.ready.eq(1)
                with m.If(rx.valid):
                    m.d.sync += f_seq.eq(rxp.data)
                    with m.If(rxp.last):
                        m.d.sync += f_done.eq(1)
                        m.next = "VERDICT"
                    with m.Else():
                        m.next = "PAYLOAD"

            with m.State("PAYLOAD"):
                # all of a command's payload (only the first 8 bytes are kept);
                # of a DATA frame only the index
                m.d.comb += rx.ready.eq(1)
                with m.If(rx.valid):
                    with m.Switch(pcount):
                        for i in range(8):
                            with m.Case(i):
                                m.d.sync += pbuf[8 * i:8 * i + 8].eq(rxp.data)
                    with m.If(pcount != 8):
                        m.d.sync += pcount.eq(pcount + 1)
                    with m.If(rxp.last):
                        m.d.sync += f_done.eq(1)
                        m.next = "VERDICT"
                    with m.Elif(is_[Command.DATA] & (pcount == 1)):
                        m.next = "VERDICT"

            with m.State("VERDICT"):
                # Register the verdict and what CHECK needs of the chunk arithmetic: its
                # inputs are registers, stable from here until CHECK has acted.
                m.d.sync += [v_code.eq(verdict), v_again.eq(dup_open | (is_data & data_old)),
                             v_core.eq(needs_core), v_words.eq(exp_words),
                             v_op.eq(frame_op), v_kick.eq(u32 == 1), v_no_acc.eq(dup)]
                m.next = "CHECK"

            with m.State("CHECK"):
                # Without an open transfer the core is idle (or about to be: wait for it),
                # so a command that needs it is handed over in this very cycle.
                with m.If(xfer_open | core.cmd.ready):
                    m.d.sync += [r_kind.eq(Mux(v_code != 0, kind_code["ERROR"], cmd_kind)),
                                 r_code.eq(v_code),
                                 r_arg_next.eq(v_code == ErrorCode.SEQUENCE),
                                 last_valid.eq(v_code == 0), last_cmd.eq(f_cmd),
                                 last_seq.eq(f_seq), done_seen.eq(0)]
                    with m.If(v_code != 0):
                        m.next = "DRAIN"
                    with m.Elif(v_again):
                        m.next = "DRAIN"        # ack again
                    with m.Else():
                        m.d.comb += [issue.eq(v_core), replier.start.eq(streams)]
                        with m.If(is_[Command.FORWARD]):
                            m.d.sync += [forwarded.eq(1), one_sided.eq(u8[0])]
                        with m.If(is_[Command.SELFTEST] | is_[Command.LOAD]):
                            m.d.sync += [forwarded.eq(0), one_sided.eq(0)]
                        with m.If(is_[Command.LOAD]):
                            m.d.sync += [t_loaded.eq(0), xfer_t.eq(u32)]
                        with m.If(opens):
                            m.d.sync += [xfer_open.eq(1), xfer_cmd.eq(f_cmd), xfer_done.eq(0),
                                         xfer_left.eq(xfer_total), xfer_w.eq(is_[Command.ECHO])]
                        with m.If(is_[Command.DATA]):
                            m.d.comb += unpacker.start.eq(1)
                        m.next = "DRAIN"
                        with m.If(is_[Command.RESET]):
                            m.d.sync += core_rst.eq(1)
                            m.next = "RESET"
                        with m.If(is_[Command.CLEAR_FLAGS] | is_[Command.CLEAR_ACC]
                                  | is_[Command.SELFTEST]):
                            m.next = "CORE_WAIT"
                        with m.If(streams):
                            m.next = "STREAM"
                        with m.If(is_[Command.DATA]):
                            m.next = "UNPACK"

            # ---- core operations
            with m.State("CORE_WAIT"):
                m.d.comb += core.done.ready.eq(1)
                with m.If(core.done.valid):
                    m.d.sync += r_pass.eq(core.done.payload.selftest_pass)
                    m.next = "DRAIN"
            with m.State("STREAM"):
                wiring.connect(m, replier.source, wiring.flipped(tx))
                m.d.comb += core.done.ready.eq(1)
                with m.If(core.done.valid):
                    m.d.sync += done_seen.eq(1)
                with m.If(~replier.busy & (done_seen | core.done.valid)):
                    m.next = "IDLE"

            # ---- transfers
            with m.State("UNPACK"):
                m.d.comb += [unpacker.sink.valid.eq(rx.valid), unpacker.sink.payload.eq(rxp.data),
                             rx.ready.eq(unpacker.sink.ready)]
                with m.If(rx.valid & rx.ready & rxp.last):
                    m.d.sync += f_done.eq(1)
                with m.If(~unpacker.busy):
                    m.d.sync += [xfer_done.eq(xfer_done + 1), xfer_left.eq(xfer_left - v_words)]
                    with m.If(xfer_left == v_words):
                        m.next = "XFER_END"
                    with m.Else():
                        m.next = "DRAIN"
            with m.State("XFER_END"):
                m.d.comb += core.done.ready.eq(1)
                with m.If(core.done.valid):
                    m.d.sync += xfer_open.eq(0)
                    with m.If(xfer_cmd == Command.LOAD):
                        m.d.sync += t_loaded.eq(xfer_t)
                    with m.If(xfer_cmd == Command.ECHO):
                        m.d.sync += [forwarded.eq(0), one_sided.eq(0)]
                    m.next = "DRAIN"

            # ---- RESET: local reset of the core, then zero its memories
            with m.State("RESET"):
                m.d.sync += core_rst.eq(0)
                m.d.sync += [xfer_open.eq(0), xfer_cmd.eq(0), xfer_done.eq(0), t_loaded.eq(0),
                             forwarded.eq(0), one_sided.eq(0), rst_step.eq(0), pbuf.eq(1)]
                m.next = "RST_ISSUE"
            with m.State("RST_ISSUE"):
                m.d.comb += [in_rst.eq(1), core.cmd.valid.eq(1)]
                with m.If(core.cmd.ready):
                    m.next = "RST_WAIT"
            with m.State("RST_WAIT"):
                for st in (core.params_in, core.inputs, core.nudges):
                    m.d.comb += [st.valid.eq(1), st.payload.eq(0)]
                for st, _ in outs:
                    m.d.comb += st.ready.eq(1)
                m.d.comb += core.done.ready.eq(1)
                with m.If(core.done.valid):
                    m.d.sync += rst_step.eq(rst_step + 1)
                    with m.If(rst_step == len(RESET_OPS) - 1):
                        m.next = "DRAIN"
                    with m.Else():
                        m.next = "RST_ISSUE"

            # ---- the rest of the frame, then the small reply
            with m.State("DRAIN"):
                with m.If(f_done):
                    m.d.sync += r_i.eq(0)
                    m.next = "REPLY"
                with m.Else():
                    m.d.comb += rx.ready.eq(1)
                    with m.If(rx.valid & rxp.last):
                        m.d.sync += f_done.eq(1)
            with m.State("REPLY"):
                i = Signal.like(r_i)
                m.d.comb += [i.eq(r_i - 2), rom_rd.addr.eq(Mux(tx.ready, r_i - 1, i))]
                is_error = r_kind == kind_code["ERROR"]
                r_len = Signal(range(max(KINDS.values()) + 1))
                with m.Switch(r_kind):
                    for k, n in KINDS.items():
                        with m.Case(kind_code[k]):
                            m.d.comb += r_len.eq(n)
                # The payload bytes of every kind but ROM, merged by position (a byte past
                # a kind's length is never sent, so only positions kinds share need a
                # multiplexer): STATUS flags xfer_cmd xfer_done:u16 t_loaded:u32;
                # ERROR code cmd arg:u16 (arg = xfer_done or 0); ACK next:u16; RESULT.
                def kind_is(*ks):
                    return Cat(*(r_kind == kind_code[k] for k in ks)).any()
                done_lo, done_hi = xfer_done16[:8], xfer_done16[8:]
                arg_zero = is_error & ~r_arg_next
                small = [
                    Mux(kind_is("STATUS"), status[:8],
                        Mux(is_error, r_code, Mux(kind_is("ACK"), done_lo, r_pass))),
                    Mux(kind_is("STATUS"), xfer_cmd, Mux(is_error, f_cmd, done_hi)),
                    Mux(arg_zero, 0, done_lo),
                    Mux(arg_zero, 0, done_hi),
                    *(status[32 + 8 * j:40 + 8 * j] for j in range(4)),
                ]
                assert len(status) == 64 and KINDS["STATUS"] == 8
                body = Signal(8)
                with m.Switch(i[:3]):
                    for j, byte in enumerate(small):
                        with m.Case(j):
                            m.d.comb += body.eq(byte)
                with m.If(r_kind == kind_code["ROM"]):
                    m.d.comb += body.eq(rom_rd.data)
                with m.Switch(r_i):
                    with m.Case(0):
                        m.d.comb += tx.payload.data.eq(Mux(is_error, P.ERROR_REPLY,
                                                           f_cmd | P.REPLY_BIT))
                    with m.Case(1):
                        m.d.comb += tx.payload.data.eq(f_seq)
                    with m.Default():
                        m.d.comb += tx.payload.data.eq(body)
                last = r_i == r_len + 1
                m.d.comb += [tx.valid.eq(1), tx.payload.first.eq(r_i == 0),
                             tx.payload.last.eq(last)]
                with m.If(tx.ready):
                    m.d.sync += r_i.eq(r_i + 1)
                    with m.If(last):
                        m.next = "IDLE"
        return m
