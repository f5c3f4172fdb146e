"""The command unit: good frames in, replies out, the HEL core's operations in between.

:class:`CommandUnit` is the device side of the command layer of :mod:`rtl.protocol`
(prose: ``docs/protocol.md``). Its byte-for-byte reference is
:class:`sim.protocol_model.ProtocolModel`: for the same request bytes the gateware
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
  state, field values) in one cycle on those registers, and only then acts. A
  rejected frame is drained (its remaining bytes read and dropped) and answered
  with an ERROR; nothing else changes. The decoder's ``length`` field gives the
  payload length at the first byte, so a DATA chunk of the wrong length is
  rejected before any of its words reaches the core.
* **Reports in wire order.** :class:`rtl.framing.FrameDecoder` queues bad-frame
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
sent out of order (see :class:`rtl.framing.FrameDecoder`).
"""

from __future__ import annotations

import math

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import memory, stream, wiring
from amaranth.lib.wiring import In, Out

from rtl import protocol as P
from rtl.core import CmdLayout, HELCore, Op
from rtl.formats import PARAM_NAMES, HelConfig
from rtl.framing import LENGTH_BITS, FrameByte, LinkError
from rtl.protocol import Command, ErrorCode, StatusFlag

__all__ = ["CommandUnit", "DataReplier", "WordUnpacker", "REQUEST_LEN", "DURING_TRANSFER",
           "ident_payload", "mul_const"]

#: Exact request payload length of each command (DATA: at least its index).
REQUEST_LEN = {
    Command.IDENT: 0, Command.STATUS: 0, Command.CLEAR_FLAGS: 0, Command.RESET: 0,
    Command.WRITE_PARAMS: 1, Command.READ_PARAMS: 1, Command.LOAD: 4, Command.FORWARD: 1,
    Command.ECHO: 4, Command.READ_ACC: 0, Command.CLEAR_ACC: 0, Command.READ_STATE: 1,
    Command.SELFTEST: 8, Command.DATA: P.CHUNK_HEADER_LEN,
}
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

    On ``start`` it latches ``width`` (an index into ``widths``), ``total``
    (≥ 1 words), ``cmd`` and ``seq``, then takes ``total`` words from ``words``
    and sends chunks of :func:`rtl.protocol.chunk_words` words, each its own
    frame with indices 0, 1, …, bit-packed LSB first with zero padding (the
    format of :mod:`host.wire`). ``busy`` is high from the cycle after ``start``
    until the last byte has been accepted.

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

        width = Signal.like(self.width)
        cmd = Signal(8)
        seq = Signal(8)
        total_left = Signal.like(self.total)
        chunk_left = Signal(range(max(cws) + 1))
        index = Signal(16)
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
                    m.d.sync += [width.eq(self.width), cmd.eq(self.cmd), seq.eq(self.seq),
                                 total_left.eq(self.total), index.eq(0)]
                    m.next = "NEXT"
            with m.State("NEXT"):
                m.d.comb += self.busy.eq(1)
                n = Mux(total_left > c_sel, c_sel, total_left)
                m.d.sync += [chunk_left.eq(n), total_left.eq(total_left - n),
                             wbits.eq(0), bbits.eq(0)]
                m.next = "H0"
            for i, (state, value) in enumerate([("H0", cmd | P.REPLY_BIT), ("H1", seq),
                                                ("H2", index[:8]), ("H3", index[8:])]):
                with m.State(state):
                    m.d.comb += [self.busy.eq(1), src.valid.eq(1),
                                 src.payload.data.eq(value), src.payload.first.eq(i == 0)]
                    with m.If(src.ready):
                        m.next = ["H1", "H2", "H3", "BODY"][i]
            with m.State("BODY"):
                m.d.comb += self.busy.eq(1)
                last = (chunk_left == 0) & (wbits == 0)
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
                with m.Elif(chunk_left != 0):
                    m.d.comb += self.words.ready.eq(1)
                    with m.If(self.words.valid):
                        m.d.sync += [wreg.eq(self.words.payload), wbits.eq(w_sel),
                                     chunk_left.eq(chunk_left - 1)]
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
    """Bytes → sign-extended words (the inverse of :class:`DataReplier`'s packing).

    On ``start`` it latches ``width`` (an index into ``widths``) and ``count``
    (≥ 1 words), then takes exactly the bytes that hold ``count`` packed words
    from ``sink`` and sends the words on ``words``; the pad bits of the last
    byte are dropped. ``busy`` is high from the cycle after ``start`` until the
    last word has been accepted. Bit-serial like :class:`DataReplier`.
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
        wreg = Signal(W)            # bits enter at the top: a w-bit word ends in wreg[W-w:]
        wbits = Signal(range(W + 1))
        breg = Signal(8)
        bbits = Signal(range(9))
        w_sel = _select(m, width, self.widths, "w_sel")
        word = Signal(signed(W))
        with m.Switch(width):
            for i, w in enumerate(self.widths):
                with m.Case(i):
                    m.d.comb += word.eq(wreg[W - w:].as_signed())
        m.d.comb += self.words.payload.eq(word)

        with m.FSM(name="unpacker"):
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [width.eq(self.width), left.eq(self.count), wbits.eq(0),
                                 bbits.eq(0)]
                    m.next = "RUN"
            with m.State("RUN"):
                m.d.comb += self.busy.eq(1)
                with m.If(wbits == w_sel):
                    m.d.comb += self.words.valid.eq(1)
                    with m.If(self.words.ready):
                        m.d.sync += [wbits.eq(0), left.eq(left - 1)]
                        with m.If(left == 1):
                            m.next = "IDLE"
                with m.Elif(bbits != 0):
                    m.d.sync += [wreg.eq(Cat(wreg[1:], breg[0])), breg.eq(breg >> 1),
                                 bbits.eq(bbits - 1), wbits.eq(wbits + 1)]
                with m.Else():
                    m.d.comb += self.sink.ready.eq(1)
                    with m.If(self.sink.valid):
                        m.d.sync += [breg.eq(self.sink.payload), bbits.eq(8)]
        return m


class CommandUnit(wiring.Component):
    """The command layer between the frame codec and :class:`rtl.core.HELCore`.

    See the module docstring for the design. Connect ``rx``/``rx_error`` to
    :class:`rtl.framing.FrameDecoder`'s ``source``/``error``, ``tx`` to
    :class:`rtl.framing.FrameEncoder`'s ``sink``, ``core`` to a ``HELCore(cfg)``
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
        N, M, K, O = cfg.n, cfg.m, cfg.k, cfg.o
        ow, sw, aw = cfg.operand_width, cfg.state_width, cfg.acc_width
        core = self.core
        rx, rxp = self.rx, self.rx.payload
        tx = self.tx
        has_skip = "skip" in CmdLayout.members
        has_no_acc = "no_acc" in CmdLayout.members

        # ---------------------------------------------------------------- helpers
        m.submodules.replier = replier = DataReplier((ow, sw, aw), len(Signal(range(self.max_out + 1))))
        m.submodules.unpacker = unpacker = WordUnpacker((ow, sw), 16)
        R_OP, R_ST, R_ACC = 0, 1, 2          # replier widths
        U_OP, U_ST = 0, 1                    # unpacker widths

        rom = self.ident
        m.submodules.rom = rom_mem = memory.Memory(shape=8, depth=len(rom), init=list(rom))
        rom_rd = rom_mem.read_port(domain="comb")

        # ---------------------------------------------------------------- registers
        f_cmd = Signal(8)
        f_seq = Signal(8)
        f_plen = Signal(LENGTH_BITS)       # payload bytes of the current frame
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
        xfer_done = Signal(16)             # chunks applied = the next index expected
        xfer_left = Signal(range(self.max_in + 1))   # words not yet received
        xfer_w = Signal()                  # U_OP / U_ST
        xfer_t = Signal(range(cfg.t_max + 1))        # LOAD: its T
        chunk_n = Signal(range(max(P.chunk_words(ow), P.chunk_words(sw)) + 1))

        c_cmd = Signal(CmdLayout)          # the core command to issue
        c_flow = Signal(2)                 # after the issue: wait+reply, stream, reply
        FLOW_WAIT, FLOW_STREAM, FLOW_REPLY = 0, 1, 2
        done_seen = Signal()

        r_cmd = Signal(8)                  # the small reply
        r_seq = Signal(8)
        r_len = Signal(range(max(len(rom), 8) + 1))
        r_rom = Signal()
        r_i = Signal(range(max(len(rom), 8) + 3))
        sbuf = Signal(64)

        rst_step = Signal(range(5))

        # ---------------------------------------------------------------- decode
        cmd = f_cmd
        is_ = {c: Signal(name=f"is_{c.name.lower()}") for c in Command}
        for c, s in is_.items():
            m.d.comb += s.eq(cmd == c)
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
                    m.d.comb += len_ok.eq(f_plen >= n if c == Command.DATA else f_plen == n)
        u8 = pbuf[:8]
        u32 = pbuf[:32]
        index = pbuf[:16]
        mask_ok = (u8 != 0) & (u8 <= P.PARAM_MASK_ALL)
        masked_total = Signal(range(self.n_params + 1))
        m.d.comb += masked_total.eq(sum(Mux(u8[i], size, 0)
                                        for i, size in enumerate(self.param_sizes)))
        # DATA: words and bytes of the chunk expected next
        cw_op, cw_st = P.chunk_words(ow), P.chunk_words(sw)
        c_w = Mux(xfer_w, cw_st, cw_op)
        exp_words = Signal.like(chunk_n)
        m.d.comb += exp_words.eq(Mux(xfer_left > c_w, c_w, xfer_left))
        exp_bytes = Signal(LENGTH_BITS)
        m.d.comb += exp_bytes.eq(Mux(xfer_w, (mul_const(exp_words, sw) + 7) >> 3,
                                     (mul_const(exp_words, ow) + 7) >> 3))

        def error(code, arg=0):
            m.d.sync += [r_cmd.eq(P.ERROR_REPLY), r_seq.eq(f_seq), r_rom.eq(0), r_len.eq(4),
                         sbuf.eq(Cat(Const(code, 8), f_cmd, Const(arg, 16) if isinstance(arg, int)
                                     else arg)),
                         last_valid.eq(0)]
            m.next = "DRAIN"

        def ok():
            m.d.sync += [last_valid.eq(1), last_cmd.eq(f_cmd), last_seq.eq(f_seq)]

        def reply(payload=None, nbytes=0, state="DRAIN"):
            m.d.sync += [r_cmd.eq(f_cmd | P.REPLY_BIT), r_seq.eq(f_seq), r_rom.eq(0),
                         r_len.eq(nbytes)]
            if payload is not None:
                m.d.sync += sbuf.eq(payload)
            if state is not None:
                m.next = state

        def issue(op, flow, **fields):
            m.d.sync += [c_cmd.eq(0), c_cmd.op.eq(op), c_flow.eq(flow), done_seen.eq(0)]
            for k, v in fields.items():
                if k in CmdLayout.members:
                    m.d.sync += getattr(c_cmd, k).eq(v)
            m.next = "ISSUE"

        def stream_out(width, total):
            m.d.comb += [replier.start.eq(1), replier.width.eq(width), replier.total.eq(total),
                         replier.cmd.eq(f_cmd), replier.seq.eq(f_seq)]

        def open_xfer(total, w):
            m.d.sync += [xfer_open.eq(1), xfer_cmd.eq(f_cmd), xfer_done.eq(0),
                         xfer_left.eq(total), xfer_w.eq(w)]
            reply(nbytes=0, state=None)

        # ---------------------------------------------------------------- core streams
        # outputs of the core → the replier (sign-extended to its width)
        outs = [(core.params_out, Op.READ_PARAMS), (core.outputs, Op.FORWARD),
                (core.acc_out, Op.READ_ACC), (core.state_out, Op.READ_STATE)]
        for st, op in outs:
            with m.If(c_cmd.op == op):
                m.d.comb += [replier.words.valid.eq(st.valid), replier.words.payload.eq(st.payload),
                             st.ready.eq(replier.words.ready)]
        # the unpacker → the core's input of the open transfer
        ins = [(core.params_in, Command.WRITE_PARAMS), (core.inputs, Command.LOAD),
               (core.nudges, Command.ECHO)]
        for st, c in ins:
            m.d.comb += st.payload.eq(unpacker.words.payload)
            with m.If(xfer_cmd == c):
                m.d.comb += [st.valid.eq(unpacker.words.valid),
                             unpacker.words.ready.eq(st.ready)]

        # ---------------------------------------------------------------- control
        assert [int(f) for f in (StatusFlag.STATE_OVERFLOW, StatusFlag.ACC_OVERFLOW,
                                 StatusFlag.LOADED, StatusFlag.FORWARDED, StatusFlag.ONE_SIDED,
                                 StatusFlag.XFER_OPEN)] == [1, 2, 4, 8, 16, 32]
        status = Cat(core.state_overflow, core.acc_overflow, t_loaded != 0, forwarded,
                     forwarded & one_sided, xfer_open, Const(0, 2),
                     xfer_cmd, xfer_done, t_loaded, Const(0, 32 - len(t_loaded)))

        with m.FSM(name="cu"):
            with m.State("IDLE"):
                m.d.comb += rx.ready.eq(1)
                with m.If(rx.valid):
                    with m.If(rxp.first):
                        m.d.sync += [f_cmd.eq(rxp.data), f_plen.eq(rxp.length - P.HEADER_LEN),
                                     f_done.eq(0), pcount.eq(0), pbuf.eq(0)]
                        m.next = "SEQ"
                with m.Elif(self.rx_error.valid):
                    m.d.comb += self.rx_error.ready.eq(1)
                    m.d.sync += [r_cmd.eq(P.ERROR_REPLY), r_seq.eq(self.rx_error.payload.seq),
                                 r_rom.eq(0), r_len.eq(4),
                                 sbuf.eq(Cat(self.rx_error.payload.code, Const(0, 24)))]
                    m.next = "REPLY"

            with m.State("SEQ"):
                m.d.comb += rx.ready.eq(1)
                with m.If(rx.valid):
                    m.d.sync += f_seq.eq(rxp.data)
                    with m.If(rxp.last):
                        m.d.sync += f_done.eq(1)
                        m.next = "CHECK"
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
                        m.next = "CHECK"
                    with m.Elif(is_[Command.DATA] & (pcount == 1)):
                        m.next = "CHECK"

            with m.State("CHECK"):
                with m.If(~known):
                    error(ErrorCode.UNKNOWN_COMMAND)
                with m.Elif(xfer_open & ~in_xfer_ok):
                    with m.If(dup & (f_cmd == xfer_cmd) & (xfer_done == 0)):
                        ok()
                        reply()          # a retransmitted opening: ack again
                    with m.Else():
                        error(ErrorCode.BUSY)
                with m.Elif(~len_ok):
                    error(ErrorCode.OUT_OF_RANGE)
                with m.Else():
                    with m.Switch(f_cmd):
                        with m.Case(Command.IDENT):
                            ok()
                            reply()
                            m.d.sync += [r_rom.eq(1), r_len.eq(len(rom))]
                        with m.Case(Command.STATUS):
                            ok()
                            reply(status, 8)
                        with m.Case(Command.CLEAR_FLAGS):
                            ok()
                            reply(state=None)
                            issue(Op.CLEAR_FLAGS, FLOW_WAIT)
                        with m.Case(Command.RESET):
                            ok()
                            reply(state=None)
                            m.next = "RESET"
                        with m.Case(Command.CLEAR_ACC):
                            ok()
                            reply(state=None)
                            issue(Op.CLEAR_ACC, FLOW_WAIT)
                        with m.Case(Command.READ_ACC):
                            ok()
                            stream_out(R_ACC, self.n_params)
                            issue(Op.READ_ACC, FLOW_STREAM)
                        with m.Case(Command.READ_PARAMS):
                            with m.If(~mask_ok):
                                error(ErrorCode.OUT_OF_RANGE)
                            with m.Else():
                                ok()
                                stream_out(R_OP, masked_total)
                                issue(Op.READ_PARAMS, FLOW_STREAM, skip=~u8[:4])
                        with m.Case(Command.READ_STATE):
                            with m.If(u8 > 2):
                                error(ErrorCode.OUT_OF_RANGE)
                            with m.Else():
                                ok()
                                stream_out(R_ST, 2 * N)
                                issue(Op.READ_STATE, FLOW_STREAM, bank=u8[:2])
                        with m.Case(Command.SELFTEST):
                            with m.If(u32 == 0):
                                error(ErrorCode.OUT_OF_RANGE)
                            with m.Else():
                                ok()
                                reply(nbytes=1, state=None)
                                m.d.sync += [forwarded.eq(0), one_sided.eq(0)]
                                issue(Op.SELFTEST, FLOW_WAIT, length=u32, seed=pbuf[32:])
                        with m.Case(Command.FORWARD):
                            with m.If(t_loaded == 0):
                                error(ErrorCode.WRONG_STATE)
                            with m.Elif(u8 > 1):
                                error(ErrorCode.OUT_OF_RANGE)
                            with m.Else():
                                ok()
                                stream_out(R_ST, mul_const(t_loaded, O))
                                m.d.sync += [forwarded.eq(1), one_sided.eq(u8[0])]
                                issue(Op.FORWARD, FLOW_STREAM, length=t_loaded,
                                      one_sided=u8[0], no_acc=dup)
                        with m.Case(Command.WRITE_PARAMS):
                            with m.If(~mask_ok):
                                error(ErrorCode.OUT_OF_RANGE)
                            with m.Else():
                                ok()
                                open_xfer(masked_total, U_OP)
                                issue(Op.WRITE_PARAMS, FLOW_REPLY, skip=~u8[:4])
                        with m.Case(Command.LOAD):
                            with m.If((u32 == 0) | (u32 > cfg.t_max)):
                                error(ErrorCode.OUT_OF_RANGE)
                            with m.Else():
                                ok()
                                open_xfer(mul_const(u32[:len(xfer_t)], K), U_OP)
                                m.d.sync += [xfer_t.eq(u32), t_loaded.eq(0), forwarded.eq(0),
                                             one_sided.eq(0)]
                                issue(Op.LOAD, FLOW_REPLY, length=u32)
                        with m.Case(Command.ECHO):
                            with m.If(~forwarded):
                                error(ErrorCode.WRONG_STATE)
                            with m.Elif((u32 != 1) & (u32 != t_loaded)):
                                error(ErrorCode.OUT_OF_RANGE)
                            with m.Else():
                                ok()
                                open_xfer(Mux(u32 == 1, O, mul_const(t_loaded, O)), U_ST)
                                issue(Op.ECHO, FLOW_REPLY, kick=u32 == 1)
                        with m.Case(Command.DATA):
                            with m.If(~xfer_open):
                                error(ErrorCode.WRONG_STATE)
                            with m.Elif(index < xfer_done):     # retransmitted: ack again
                                ok()
                                reply(xfer_done, 2)
                            with m.Elif(index > xfer_done):
                                error(ErrorCode.SEQUENCE, xfer_done)
                            with m.Elif(f_plen - P.CHUNK_HEADER_LEN != exp_bytes):
                                error(ErrorCode.OUT_OF_RANGE)
                            with m.Else():
                                ok()
                                m.d.comb += [unpacker.start.eq(1), unpacker.width.eq(xfer_w),
                                             unpacker.count.eq(exp_words)]
                                m.d.sync += chunk_n.eq(exp_words)
                                m.next = "UNPACK"

            # ---- core operations
            with m.State("ISSUE"):
                m.d.comb += [core.cmd.valid.eq(1), core.cmd.payload.eq(c_cmd)]
                with m.If(core.cmd.ready):
                    with m.Switch(c_flow):
                        with m.Case(FLOW_WAIT):
                            m.next = "CORE_WAIT"
                        with m.Case(FLOW_STREAM):
                            m.next = "STREAM"
                        with m.Default():
                            m.next = "DRAIN"
            with m.State("CORE_WAIT"):
                m.d.comb += core.done.ready.eq(1)
                with m.If(core.done.valid):
                    m.d.sync += sbuf.eq(core.done.payload.selftest_pass)
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
                    m.d.sync += [xfer_done.eq(xfer_done + 1), xfer_left.eq(xfer_left - chunk_n)]
                    m.d.sync += [r_cmd.eq(Command.DATA | P.REPLY_BIT), r_seq.eq(f_seq),
                                 r_rom.eq(0), r_len.eq(2), sbuf.eq(xfer_done + 1)]
                    with m.If(xfer_left == chunk_n):
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
                m.d.comb += self.core_rst.eq(1)
                m.d.sync += [xfer_open.eq(0), xfer_cmd.eq(0), xfer_done.eq(0), t_loaded.eq(0),
                             forwarded.eq(0), one_sided.eq(0), rst_step.eq(0)]
                m.next = "RST_ISSUE"
            with m.State("RST_ISSUE"):
                m.d.comb += core.cmd.valid.eq(1)
                with m.Switch(rst_step):
                    with m.Case(0):
                        m.d.comb += core.cmd.payload.op.eq(Op.WRITE_PARAMS)
                    with m.Case(1):
                        m.d.comb += [core.cmd.payload.op.eq(Op.LOAD), core.cmd.payload.length.eq(1)]
                    with m.Case(2):
                        m.d.comb += core.cmd.payload.op.eq(Op.FORWARD)
                    with m.Case(3):
                        m.d.comb += [core.cmd.payload.op.eq(Op.ECHO), core.cmd.payload.kick.eq(1)]
                    with m.Case(4):
                        m.d.comb += core.cmd.payload.op.eq(Op.CLEAR_ACC)
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
                    with m.If(rst_step == 4):
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
                m.d.comb += rom_rd.addr.eq(r_i - 2)
                data_byte = Mux(r_i == 0, r_cmd, Mux(r_i == 1, r_seq,
                                                     Mux(r_rom, rom_rd.data, sbuf[:8])))
                m.d.comb += [tx.valid.eq(1), tx.payload.data.eq(data_byte),
                             tx.payload.first.eq(r_i == 0), tx.payload.last.eq(r_i == r_len + 1)]
                with m.If(tx.ready):
                    m.d.sync += r_i.eq(r_i + 1)
                    with m.If(r_i >= 2):
                        m.d.sync += sbuf.eq(sbuf >> 8)
                    with m.If(r_i == r_len + 1):
                        m.d.sync += r_i.eq(0)
                        m.next = "IDLE"
        return m
