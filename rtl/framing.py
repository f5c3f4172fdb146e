"""The link's frame layer in gateware: COBS, CRC-32 and length checks.

The frame format is defined once in :mod:`hel_fpga.spec.protocol`; in short, a frame on
the wire is ``COBS(cmd ‖ seq ‖ payload ‖ crc32_le) ‖ 0x00``.

* :class:`FrameDecoder` — raw bytes from the UART → *good frames only*
  (``cmd ‖ seq ‖ payload``, CRC stripped) as a byte stream with
  ``first``/``last`` markers, plus an ``error`` stream reporting every bad
  frame with its :class:`hel_fpga.spec.protocol.ErrorCode`.
* :class:`FrameEncoder` — reply bytes with ``first``/``last`` markers → COBS
  encoded frame with the CRC appended and the delimiter.

Both compute the CRC-32 one bit per cycle (:data:`CRC_BIT_PARAMETERS`), which
costs a third of a byte-wise CRC's logic: the decoder needs its input bytes at
least :data:`BYTE_CYCLES` cycles apart, the encoder takes a body byte per
:data:`BYTE_CYCLES` cycles. A UART byte takes 10 × divisor ≥ 40 cycles, so
neither ever limits the link.

Both streams inside the device use :data:`FrameByte` so that a decoder can be
looped straight into an encoder (an echo server, as in the tests).
"""

from amaranth import *
from amaranth.lib import crc, data, enum, memory, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from hel_fpga.spec import protocol
from hel_fpga.rtl.bram import NO_RW_CHECK, ram_read_port
from hel_fpga.spec.protocol import ErrorCode

__all__ = ["BlockRAMQueue", "CRC_PARAMETERS", "CRC_BIT_PARAMETERS", "BYTE_CYCLES", "LENGTH_BITS",
           "less_than", "FrameByte", "FrameDecoder", "FrameEncoder", "LinkError"]


#: The link CRC (CRC-32/ISO-HDLC) over bytes, built from :mod:`hel_fpga.spec.protocol`'s numbers.
CRC_PARAMETERS = crc.Algorithm(
    crc_width=protocol.CRC_WIDTH, polynomial=protocol.CRC_POLY, initial_crc=protocol.CRC_INIT,
    reflect_input=protocol.CRC_REFLECT, reflect_output=protocol.CRC_REFLECT,
    xor_output=protocol.CRC_XOR_OUT)(data_width=8)
assert CRC_PARAMETERS.compute(b"123456789") == protocol.CRC_CHECK

#: The same CRC one bit at a time (bytes fed LSB first: the byte-wise algorithm's
#: ``reflect_input``). Both codecs use it: a byte-wise CRC-32 costs about 110 iCE40
#: LUTs (each register bit an XOR of up to ~20 terms), a bit-serial one about 32 (a
#: shift with the polynomial's 14 taps), and a UART byte leaves plenty of cycles.
CRC_BIT_PARAMETERS = CRC_PARAMETERS.algorithm(data_width=1)
assert CRC_BIT_PARAMETERS.compute([b >> i & 1 for b in b"123456789" for i in range(8)]) \
    == protocol.CRC_CHECK

#: Cycles the bit-serial CRC takes per byte: the decoder needs its input bytes at
#: least this far apart (a UART byte takes 10 × divisor ≥ 40 cycles), and the
#: encoder takes at most one body byte per this many cycles.
BYTE_CYCLES = 8

def less_than(x, c: int):
    """``x < c`` for a constant ``c ≥ 1``: a comparison only as wide as ``c`` needs, and
    the rest of ``x`` tested for zero (Yosys would build a carry chain as wide as ``x``)."""
    k = (c - 1).bit_length()
    high_zero = x[k:] == 0 if len(x) > k else Const(1, 1)
    return high_zero if c == 1 << k else high_zero & (x[:k] < c)


#: Bits of :data:`FrameByte`'s ``length`` (a body without its CRC has at most 1026 bytes).
LENGTH_BITS = (protocol.MAX_BODY_LEN - protocol.CRC_LEN).bit_length()

#: One byte of a frame body (``cmd``, ``seq``, payload), with frame boundaries.
FrameByte = data.StructLayout({
    "data": 8,
    "first": 1,    # this is the frame's first byte (cmd)
    "last": 1,     # this is the frame's last byte
    # FrameDecoder: the frame's body length without the CRC (cmd, seq, payload: 2 + payload
    # bytes), the same on every byte of the frame, so a consumer knows the payload length
    # at the first byte (e.g. to reject a wrong-length chunk before consuming any of it).
    # FrameEncoder ignores it.
    "length": LENGTH_BITS,
})

#: A bad-frame report.
LinkError = data.StructLayout({
    "code": 8,     # an hel_fpga.spec.protocol.ErrorCode
    "seq": 8,      # the frame's second decoded byte (0 if it had none): best effort only,
                   # as the frame is known to be corrupt
})


class BlockRAMQueue(wiring.Component):
    """A first-word-fall-through FIFO in one block RAM, with the port names of
    :mod:`amaranth.lib.fifo` (``w_data``/``w_en``/``w_rdy``, ``r_data``/``r_en``/``r_rdy``).

    It holds ``depth + 1`` entries: ``depth`` in the memory (a power of two) and one
    in the read port's output register, which is ``r_data``. Why not
    ``amaranth.lib.fifo.SyncFIFOBuffered``: that keeps a level counter (up/down, and
    a wrap-around compare for its ``depth − 1`` entries in memory) beside its two
    pointers; here the pointers carry a wrap bit and full/empty are equalities,
    which takes fewer LUTs, flip-flops and carries. Throughput is the same (one
    entry per cycle each way), and so is the latency: an entry written in one
    cycle is on ``r_data`` two cycles later. No level output.
    """

    @staticmethod
    def check_entries(name: str, entries: int) -> None:
        """Refuse a queue size ``name`` = ``entries`` that is not a power of two ≥ 2
        plus one (the memory's depth plus the output register)."""
        if entries < 3 or (entries - 1) & (entries - 2):
            raise ValueError(f"{name} must be a power of two plus one (a BlockRAMQueue), "
                             f"not {entries}")

    def __init__(self, width: int, depth: int):
        if depth < 2 or depth & (depth - 1):
            raise ValueError(f"depth must be a power of two >= 2, not {depth}")
        self.width, self.depth = width, depth
        super().__init__({
            "w_data": In(width), "w_en": In(1), "w_rdy": Out(1),
            "r_data": Out(width), "r_en": In(1), "r_rdy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        k = ceil_log2(self.depth)
        # The read never addresses the word being written (below), so the read port
        # needs no read-during-write logic (NO_RW_CHECK).
        m.submodules.storage = storage = memory.Memory(shape=self.width, depth=self.depth,
                                                       init=[], attrs=NO_RW_CHECK)
        wr = storage.write_port()
        rd = ram_read_port(m, storage, "rd")
        w_ptr = Signal(k + 1)         # pointers with a wrap bit: full and empty differ
        r_ptr = Signal(k + 1)
        empty = w_ptr == r_ptr
        full = (w_ptr[:k] == r_ptr[:k]) & (w_ptr[k] != r_ptr[k])
        m.d.comb += [self.w_rdy.eq(~full),
                     wr.addr.eq(w_ptr[:k]), wr.data.eq(self.w_data),
                     wr.en.eq(self.w_en & ~full)]
        with m.If(self.w_en & ~full):
            m.d.sync += w_ptr.eq(w_ptr + 1)
        # Fetch into the output register when it is free or being read. An entry in
        # memory was written in an earlier cycle, so the read never races its write
        # (the write address equals the read address only when empty, or when full,
        # and then nothing is written).
        fetch = ~empty & (~self.r_rdy | self.r_en)
        m.d.comb += [rd.addr.eq(r_ptr[:k]), rd.en.eq(fetch), self.r_data.eq(rd.data)]
        with m.If(fetch):
            m.d.sync += [r_ptr.eq(r_ptr + 1), self.r_rdy.eq(1)]
        with m.Elif(self.r_en):
            m.d.sync += self.r_rdy.eq(0)
        return m


class FrameDecoder(wiring.Component):
    """Check incoming frames and pass on the good ones, whole.

    Design: buffer, then release
    ----------------------------
    A frame is only known to be good at its delimiter, when the CRC has been
    checked. The decoder therefore writes the decoded body into a receive ring
    as it arrives and *commits* it at the delimiter if it is good; a bad frame
    is rolled back (its bytes are simply overwritten by the next frame) and
    reported on ``error``. ``source`` only ever carries complete, CRC-checked
    frames, so the command unit needs no undo logic: it can act on each byte
    as it reads it (write a parameter, store an input) and never sees garbage.
    The CRC bytes are not passed on.

    Every frame the decoder takes in gets one entry in a frame queue (one block
    RAM, 16-bit entries, :attr:`Entry`): a good frame's body length, or a bad
    frame's report. ``frames`` frames may wait (one in the queue's output
    register, the rest in its memory) besides the one the reader presents, as long
    as the good ones' bytes fit the ring. The consumer frees ring space byte by
    byte as it reads. Every byte on ``source`` carries its frame's body length
    (``length``), so the consumer knows the payload length at ``cmd``.

    One answer per frame, in wire order
    -----------------------------------
    Reports travel through the same queue as the good frames' lengths, so
    ``error`` presents a report only after every good frame that preceded the bad
    one on the wire has been read completely (its last byte accepted). A consumer
    that takes a report only between frames therefore sees frames and reports
    exactly in wire order and can answer them in that order, as the reference
    device :class:`hel_fpga.sim.protocol_model.ProtocolModel` does.

    A frame the decoder cannot take in (the queue is full, or a good frame's body
    does not fit the ring) needs an answer too, but storing one per frame would
    need unbounded memory: a flood of 2-byte garbage frames is answered with
    12-byte ERROR frames, so answers can fall behind without limit. Such frames are
    *counted* instead (``dropped``, ``max_dropped`` at most), and the count goes
    into the queue as one ``RUN`` entry as soon as a slot is free; a frame that
    arrives while the count is not yet queued is counted too, so it cannot overtake
    the run. At the head of the queue a run becomes that many ``OVERRUN`` reports
    on ``error`` (seq :data:`hel_fpga.spec.protocol.OVERRUN_SEQ`: nothing of the
    frames was kept), each in the place of its frame. So every frame gets exactly
    one report or one frame on ``source``, in wire order, whatever the traffic,
    as long as at most ``max_dropped`` frames are counted at once: the count
    saturates there, and a frame that finds it saturated is lost (a host that keeps
    at most :data:`~hel_fpga.spec.protocol.MAX_UNANSWERED` frames unanswered never
    gets there).
    Why runs in the queue rather than a count in every entry: the entry stays 16
    bits (one iCE40 block RAM), and the counter belongs to the writer alone (the
    reader counts a run down in its own register), so no count is shared between
    the two sides.

    The consumer must take reports: one left on ``error`` holds back the frames
    behind it. The default ring of 2048 bytes holds one maximal incoming frame
    (1030 bytes with CRC) while up to 1018 bytes of earlier frames are still
    unread, or two 1024-byte DATA frames (:data:`hel_fpga.spec.protocol.WINDOW`).

    ``sink`` is always ready: a UART receiver cannot be paused, so the decoder
    accepts every byte, unconditionally, and never back-pressures it. Bytes must
    come at least :data:`BYTE_CYCLES` cycles apart: the CRC takes a byte's bits
    one per cycle (bit 0 at once, the other seven from a shift register), and
    must be done with the last one when the delimiter arrives. A UART byte takes
    at least 40 cycles.
    (Its ``ready`` is the constant 1, so the decoder cannot be the top level of
    ``verilog.convert`` by itself; it converts as part of any design.)

    COBS decoding is done on the fly (a code byte ``c`` announces ``c − 1`` data
    bytes and, unless ``c == 0xFF``, a zero before the next block); a delimiter
    inside a block (a truncated frame) is a ``BAD_LENGTH`` error. After any bad
    frame, the decoder is back in step at the next ``0x00``: garbage on the line
    costs one ``error`` report and never the following good frame. Empty frames
    (``0x00 0x00``) are ignored silently, so a host may send a ``0x00`` before a
    frame to flush a partial one.

    Verdicts, in order of precedence (see :class:`hel_fpga.spec.protocol.ErrorCode`):

    * ``BAD_LENGTH``: decoded body shorter than ``MIN_BODY_LEN``, longer than
      ``max_body``, or cut short inside a COBS block;
    * ``BAD_CRC``: CRC mismatch;
    * otherwise the frame is committed and appears on ``source``;

    unless the frame is not taken in (above): then it is counted, and reported as
    ``OVERRUN`` whatever its verdict.

    Timing: a committed frame's first byte is on ``source`` 4 cycles after its
    delimiter was accepted (one for the queue's block RAM read); ``source``
    then delivers one byte per cycle while ready, with one idle cycle between
    frames. A report is on ``error`` 2 cycles after its delimiter if nothing was
    waiting before it (it is presented straight from the queue's output register),
    and holds until taken; a run's first OVERRUN comes one cycle after the run
    reaches the head, the following ones one per cycle while ``error`` is ready.

    Parameters
    ----------
    depth : int
        Receive ring size in bytes, a power of two larger than ``max_body``.
    max_body : int
        Longest accepted decoded body, CRC included (:data:`hel_fpga.spec.protocol.MAX_BODY_LEN`).
    frames : int
        Entries of the frame queue: how many frames (good or bad) may wait behind
        the one the reader is presenting: a power of two plus one (a
        :class:`BlockRAMQueue`: 256 entries in memory and its output register by
        default, :data:`hel_fpga.spec.protocol.RX_QUEUE_FRAMES`).
    max_dropped : int
        Most frames counted as not taken in before the count is queued (at most
        :attr:`MAX_RUN`; the protocol's :data:`hel_fpga.spec.protocol.MAX_UNANSWERED`
        by default).

    Attributes
    ----------
    sink : In(stream.Signature(8, always_ready=True))
        Raw bytes from the line (e.g. :class:`hel_fpga.rtl.uart.UARTRx`).
    source : Out(stream.Signature(FrameByte))
        Good frames: ``cmd``, ``seq``, payload; ``first`` on ``cmd``, ``last`` on the final byte,
        ``length`` (body length without CRC) on every byte.
    error : Out(stream.Signature(LinkError))
        One report per bad frame and per frame not taken in (``OVERRUN``), in wire
        order with the frames on ``source``.
    """

    class EntryKind(enum.Enum, shape=2):
        """What a frame queue entry holds in its ``value``."""
        FRAME = 0     # a good frame's body length without the CRC (in the ring)
        REPORT = 1    # a bad frame's report: seq (bits 0..7), code (bits 8..9)
        RUN = 2       # a count of consecutive frames not taken in (OVERRUN each)

    #: A frame queue entry.
    Entry = data.StructLayout({"value": 14, "kind": EntryKind})

    #: Most frames an entry's ``value`` can count.
    MAX_RUN = (1 << 14) - 1

    def __init__(self, *, depth=protocol.RX_RING_BYTES, max_body=protocol.MAX_BODY_LEN,
                 frames=protocol.RX_QUEUE_FRAMES, max_dropped=protocol.MAX_UNANSWERED):
        if depth & (depth - 1) or depth <= max_body:
            raise ValueError(f"depth must be a power of two larger than max_body={max_body}, "
                             f"not {depth}")
        if not protocol.MIN_BODY_LEN <= max_body <= (1 << LENGTH_BITS) - 1 + protocol.CRC_LEN:
            raise ValueError(f"max_body must be in {protocol.MIN_BODY_LEN}.."
                             f"{(1 << LENGTH_BITS) - 1 + protocol.CRC_LEN}")
        self._depth = depth
        self._max_body = max_body
        BlockRAMQueue.check_entries("frames", frames)
        self._frames = frames
        if not 1 <= max_dropped <= self.MAX_RUN:
            raise ValueError(f"max_dropped must be in 1..{self.MAX_RUN}, not {max_dropped}")
        self._max_dropped = max_dropped
        super().__init__({
            "sink": In(stream.Signature(8, always_ready=True)),
            "source": Out(stream.Signature(FrameByte)),
            "error": Out(stream.Signature(LinkError)),
        })

    @property
    def depth(self):
        return self._depth

    @property
    def max_body(self):
        return self._max_body

    def elaborate(self, platform):
        m = Module()
        abits = ceil_log2(self._depth)

        # The reader uses a byte only below ``commit``, the writer writes at or above
        # it and never wraps onto unread bytes (``ring_full``): a read of the word
        # being written is never used (NO_RW_CHECK).
        m.submodules.ring = ring = memory.Memory(shape=8, depth=self._depth, init=[],
                                                 attrs=NO_RW_CHECK)
        wr_port = ring.write_port()
        rd_port = ram_read_port(m, ring, "rd")
        # One queue entry per frame taken in (a good frame's body length, a bad frame's
        # report) or per run of frames not taken in (their count). 16 bits: one 256 × 16
        # iCE40 block RAM holds the default queue (a BlockRAMQueue: memory plus its
        # output register), one DP16KD on ECP5.
        Entry = self.Entry
        m.submodules.queue = queue = BlockRAMQueue(Entry.size, self._frames - 1)
        w_entry = Signal(Entry)
        r_entry = Entry(queue.r_data)
        m.d.comb += queue.w_data.eq(w_entry)
        m.submodules.crc = crc_check = CRC_BIT_PARAMETERS.create()

        # Ring pointers carry one extra bit so that full and empty differ.
        commit = Signal(abits + 1)    # end of committed frames = start of the incoming one
        rd_ptr = Signal(abits + 1)    # next byte the reader fetches
        n = Signal(range(self._max_body + 2))   # decoded bytes of the incoming frame, saturating

        # --- COBS decoder -------------------------------------------------------------
        cobs_left = Signal(8)         # data bytes still due in the current block
        cobs_zero = Signal()          # the current block ends in an implied zero
        in_frame = Signal()           # a code byte has been seen since the last delimiter
        overrun = Signal()
        seq = Signal(8)

        byte = self.sink.payload
        emit = Signal()
        emit_data = Signal(8)
        delimiter = self.sink.valid & (byte == protocol.DELIMITER)

        with m.If(self.sink.valid):
            with m.If(byte == protocol.DELIMITER):
                m.d.sync += [cobs_left.eq(0), in_frame.eq(0)]
            with m.Elif(cobs_left == 0):
                # A code byte: it completes the previous block's implied zero.
                m.d.comb += [emit.eq(in_frame & cobs_zero), emit_data.eq(0)]
                m.d.sync += [
                    cobs_left.eq(byte - 1),
                    cobs_zero.eq(byte != 0xFF),
                    in_frame.eq(1),
                ]
            with m.Else():
                m.d.comb += [emit.eq(1), emit_data.eq(byte)]
                m.d.sync += cobs_left.eq(cobs_left - 1)

        # --- decoded bytes: CRC, ring, length ---------------------------------------
        # ``n`` counts to max_body + 1 and stops: its bounds are equalities, not carry
        # chains. ``used`` stays below 2 · depth (committed bytes ≤ depth, n ≤ max_body + 1
        # < depth), so its top bit alone tells whether the ring is full.
        n_at_max = n == self._max_body
        n_over = n == self._max_body + 1
        used = Signal(abits + 1)
        ring_full = used[abits]
        m.d.comb += [
            used.eq(commit + n - rd_ptr),
            wr_port.addr.eq(commit + n),
            wr_port.data.eq(emit_data),
            wr_port.en.eq(emit & ~n_at_max & ~n_over & ~ring_full & ~overrun),
        ]
        # The CRC takes a decoded byte's bits one per cycle, bit 0 at once, the other
        # seven from a shift register: done before the next byte can arrive.
        crc_sh = Signal(7)
        crc_bits = Signal(range(8))
        with m.If(emit):
            m.d.comb += [crc_check.data.eq(emit_data[0]), crc_check.valid.eq(1)]
            m.d.sync += [crc_sh.eq(emit_data[1:]), crc_bits.eq(7)]
        with m.Elif(crc_bits != 0):
            m.d.comb += [crc_check.data.eq(crc_sh[0]), crc_check.valid.eq(1)]
            m.d.sync += [crc_sh.eq(crc_sh >> 1), crc_bits.eq(crc_bits - 1)]

        with m.If(emit):
            with m.If(~n_over):
                m.d.sync += n.eq(n + 1)
            with m.If(n == 1):
                m.d.sync += seq.eq(emit_data)
            with m.If(~n_at_max & ~n_over & ring_full):
                m.d.sync += overrun.eq(1)

        # --- verdict at the delimiter ------------------------------------------------
        m.d.comb += crc_check.start.eq(delimiter)
        bad_length = less_than(n, protocol.MIN_BODY_LEN) | n_over | (cobs_left != 0)
        verdict = Signal(2)
        assert max(ErrorCode.BAD_LENGTH, ErrorCode.BAD_CRC) < 4  # 2 bits
        with m.If(bad_length):
            m.d.comb += verdict.eq(ErrorCode.BAD_LENGTH)
        with m.Elif(~crc_check.match_detected):
            m.d.comb += verdict.eq(ErrorCode.BAD_CRC)

        # Frames not taken in are counted in ``dropped`` and queued as one RUN entry as
        # soon as the queue has room. While the count is non-zero, a frame is counted
        # too, even if a slot has just come free: it must not overtake the run.
        dropped = Signal(range(self._max_dropped + 1))
        take_in = queue.w_rdy & (dropped == 0)
        with m.If(delimiter & in_frame):
            with m.If(take_in & (verdict != 0)):
                m.d.comb += [queue.w_en.eq(1), w_entry.kind.eq(self.EntryKind.REPORT),
                             w_entry.value.eq(Cat(Mux(n[1:] != 0, seq, 0), verdict))]
            with m.Elif(take_in & ~overrun):
                body_len = n - protocol.CRC_LEN
                m.d.comb += [queue.w_en.eq(1), w_entry.kind.eq(self.EntryKind.FRAME),
                             w_entry.value.eq(body_len)]
                m.d.sync += commit.eq(commit + body_len)
            with m.Elif(dropped != self._max_dropped):
                m.d.sync += dropped.eq(dropped + 1)
        with m.Elif((dropped != 0) & queue.w_rdy):
            m.d.comb += [queue.w_en.eq(1), w_entry.kind.eq(self.EntryKind.RUN),
                         w_entry.value.eq(dropped)]
            m.d.sync += dropped.eq(0)
        with m.If(delimiter):
            m.d.sync += [n.eq(0), overrun.eq(0)]

        # --- reader: committed frames → source ---------------------------------------
        remaining = Signal(range(self._max_body + 1))
        first = Signal()
        length = Signal(LENGTH_BITS)  # stays while the frame's last byte waits on source
        out_first = Signal()
        out_last = Signal()
        advance = ~self.source.valid | self.source.ready

        m.d.comb += [
            rd_port.addr.eq(rd_ptr),
            rd_port.en.eq(advance),
            self.source.payload.data.eq(rd_port.data),
            self.source.payload.first.eq(out_first),
            self.source.payload.last.eq(out_last),
            self.source.payload.length.eq(length),
        ]
        with m.If(advance):
            with m.If(remaining != 0):
                m.d.sync += [
                    self.source.valid.eq(1),
                    out_first.eq(first),
                    out_last.eq(remaining == 1),
                    first.eq(0),
                    rd_ptr.eq(rd_ptr + 1),
                    remaining.eq(remaining - 1),
                ]
            with m.Else():
                m.d.sync += self.source.valid.eq(0)

        # A report or a run waits at the queue's head (its output register holds it, no
        # copy) until the frames before it have been read completely; a run is then
        # taken into ``overruns``, which presents one OVERRUN report per frame and holds
        # back everything behind it. A frame's entry is taken once the previous frame's
        # last byte has been accepted (or is being accepted), so ``length`` needs no
        # copy for the presented byte either.
        overruns = Signal.like(dropped)
        head = queue.r_rdy & (overruns == 0)
        between = (remaining == 0) & ~self.source.valid
        head_report = head & (r_entry.kind == self.EntryKind.REPORT) & between
        with m.If(head & (r_entry.kind == self.EntryKind.FRAME) & (remaining == 0) & advance):
            m.d.comb += queue.r_en.eq(1)
            m.d.sync += [remaining.eq(r_entry.value), length.eq(r_entry.value), first.eq(1)]
        with m.If(head & (r_entry.kind == self.EntryKind.RUN) & between):
            m.d.comb += queue.r_en.eq(1)
            m.d.sync += overruns.eq(r_entry.value)
        with m.If(overruns != 0):
            m.d.comb += [self.error.valid.eq(1), self.error.payload.code.eq(ErrorCode.OVERRUN),
                         self.error.payload.seq.eq(protocol.OVERRUN_SEQ)]
            with m.If(self.error.ready):
                m.d.sync += overruns.eq(overruns - 1)
        with m.Else():
            m.d.comb += [self.error.valid.eq(head_report),
                         self.error.payload.code.eq(r_entry.value[8:10]),
                         self.error.payload.seq.eq(r_entry.value[:8])]
            with m.If(head_report & self.error.ready):
                m.d.comb += queue.r_en.eq(1)

        return m


class FrameEncoder(wiring.Component):
    """Turn reply bodies into COBS frames with CRC and delimiter.

    The body bytes arrive on ``sink`` (a frame ends at the byte marked ``last``;
    ``first`` is accepted for symmetry with :class:`FrameDecoder`, so a decoder
    can feed an encoder directly, and otherwise ignored). The encoder appends
    the CRC-32 of the body, little-endian, COBS-encodes the result and ends it
    with ``0x00``. The encoding is the canonical one of :mod:`hel_fpga.spec.protocol`,
    byte for byte what :func:`hel_fpga.spec.framing.encode_frame` produces. The body
    length is not checked: producers keep payloads within
    :data:`hel_fpga.spec.protocol.MAX_PAYLOAD`.

    Design: a data ring and a block queue
    -------------------------------------
    A COBS block's code byte (its length) precedes its data, so the encoder must
    look up to 254 bytes ahead. The input side cuts the body (then the CRC) into
    blocks as it arrives: a block ends at a zero byte, which is not stored, or
    after 254 non-zero bytes. Data bytes go into a 512-byte ring (one iCE40
    block RAM) and, when a block ends, its length goes into a queue. The
    output side takes a length from the queue and sends the code byte, then the
    block's bytes from the ring, then ``0x00`` after a frame's last block. The
    ring holds two full blocks, so the input side fills one while the output
    side sends the other; the queue lets runs of short blocks (bodies with many
    zeros) pass without stalling either side.

    Throughput and latency: the input side takes a body byte per
    :data:`BYTE_CYCLES` cycles (the bit-serial CRC; it holds ``sink`` until the
    CRC has taken the byte's last bit), then the four CRC bytes one per cycle; the
    output side sends one byte per cycle. A
    block only leaves when it is complete, so the output trails the input by
    up to one block (254 bytes) plus whatever is queued ahead of it. The block
    queue is deep (257 entries, in block RAM), so the ring, not the queue,
    bounds how far the input may run ahead: 512 data bytes, whatever the mix
    of long and short blocks. That matters when the producer is only a little
    faster than the line (a FORWARD reply: one output word per core step):
    while a long block fills at the producer's rate, the line keeps sending
    the blocks already complete. A shallow queue would fill with a run of short
    blocks and stall the producer with little data buffered, and the line would
    then idle waiting for the next long block (measured line use: ``docs/link.md``).
    On the worst mix of content (alternating zero-free and zero-heavy
    1024-byte bodies, output always ready) the input side keeps its full rate
    and the line side keeps pace with it. The first byte of a frame leaves
    after its first zero byte or its 254th byte, whichever comes first.

    Parameters
    ----------
    blocks : int
        Depth of the block queue, a power of two plus one (a :class:`BlockRAMQueue`;
        one block RAM on iCE40 and ECP5 at the default 257, i.e. more than a ring's
        worth of 1-byte blocks).

    Attributes
    ----------
    sink : In(stream.Signature(FrameByte))
        Frame bodies (``cmd``, ``seq``, payload), ``last`` on each frame's final byte.
    source : Out(stream.Signature(8))
        Encoded bytes for the line (e.g. :class:`hel_fpga.rtl.uart.UARTTx`).
    """

    sink: In(stream.Signature(FrameByte))
    source: Out(stream.Signature(8))

    #: A completed block: ``length`` data bytes (0..254) in the ring; ``code``: send
    #: ``length + 1`` before them (clear only for a frame's delimiter-only tail, see
    #: below); ``final``: send the delimiter after them.
    Block = data.StructLayout({"length": 8, "code": 1, "final": 1})

    def __init__(self, *, blocks=257):
        BlockRAMQueue.check_entries("blocks", blocks)
        self._blocks = blocks
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        Block = self.Block

        # A ring byte is read for the line only once its block is queued, cycles
        # after it was written; other reads (in CODE and DELIMITER) go unused, so a
        # read of the word being written is never used (NO_RW_CHECK).
        m.submodules.ring = ring = memory.Memory(shape=8, depth=512, init=[],
                                                 attrs=NO_RW_CHECK)
        wr_port = ring.write_port()
        rd_port = ram_read_port(m, ring, "rd")
        m.submodules.queue = queue = BlockRAMQueue(Block.size, self._blocks - 1)
        m.submodules.crc = crc_gen = CRC_BIT_PARAMETERS.create()

        wr_ptr = Signal(10)           # ring pointers, with a wrap bit
        rd_ptr = Signal(10)
        used = Signal(10)
        m.d.comb += used.eq(wr_ptr - rd_ptr)

        # --- input side: body, then CRC, cut into blocks ---------------------------------
        count = Signal(8)             # bytes in the block being filled
        after_run = Signal()          # the last block ended as a full 254-byte run
        crc_index = Signal(2)
        crc_bit = Signal(3)           # the body byte's bit the CRC takes this cycle
        raw = Signal(8)               # body or CRC byte
        raw_valid = Signal()
        # One step may store a byte and/or close a block: require room for both.
        # (used ≤ 512: its top bit alone says whether the ring is full)
        can_fill = queue.w_rdy & ~used[9]

        finish = Signal()
        finish_block = Signal(Block)
        m.d.comb += [queue.w_en.eq(finish), queue.w_data.eq(finish_block)]

        with m.FSM():
            with m.State("BODY"):
                # A body byte waits on ``sink`` while the CRC takes its bits (the
                # stream holds it stable), and is accepted with its last bit.
                take = Signal()
                m.d.comb += [
                    take.eq(self.sink.valid & can_fill),
                    self.sink.ready.eq(can_fill & (crc_bit == 7)),
                    raw.eq(self.sink.payload.data),
                    raw_valid.eq(take & (crc_bit == 7)),
                    crc_gen.data.eq(self.sink.payload.data.bit_select(crc_bit, 1)),
                    crc_gen.valid.eq(take),
                ]
                with m.If(take):
                    m.d.sync += crc_bit.eq(crc_bit + 1)
                with m.If(take & (crc_bit == 7) & self.sink.payload.last):
                    m.d.sync += crc_index.eq(0)
                    m.next = "CRC"
            with m.State("CRC"):
                # The CRC register includes the last body byte from this cycle on.
                m.d.comb += [
                    raw.eq(crc_gen.crc.word_select(crc_index, 8)),
                    raw_valid.eq(can_fill),
                ]
                with m.If(can_fill):
                    m.d.sync += crc_index.eq(crc_index + 1)
                    with m.If(crc_index == protocol.CRC_LEN - 1):
                        m.next = "TAIL"
            with m.State("TAIL"):
                # Close the last block. COBS drops the implied zero after it; after a
                # final full 254-byte run there is no block left to close, and only the
                # delimiter remains to be sent (canonical form: no empty 0x01 block).
                with m.If(can_fill):
                    m.d.comb += [
                        finish.eq(1),
                        finish_block.length.eq(count),
                        finish_block.code.eq(~((count == 0) & after_run)),
                        finish_block.final.eq(1),
                        crc_gen.start.eq(1),
                    ]
                    m.d.sync += [count.eq(0), after_run.eq(0)]
                    m.next = "BODY"

        m.d.comb += [wr_port.addr.eq(wr_ptr), wr_port.data.eq(raw)]
        with m.If(raw_valid):
            with m.If(raw == 0):
                m.d.comb += [finish.eq(1), finish_block.length.eq(count),
                             finish_block.code.eq(1)]
                m.d.sync += [count.eq(0), after_run.eq(0)]
            with m.Else():
                m.d.comb += wr_port.en.eq(1)
                m.d.sync += wr_ptr.eq(wr_ptr + 1)
                with m.If(count == protocol.COBS_MAX_RUN - 1):
                    m.d.comb += [finish.eq(1), finish_block.length.eq(protocol.COBS_MAX_RUN),
                                 finish_block.code.eq(1)]
                    m.d.sync += [count.eq(0), after_run.eq(1)]
                with m.Else():
                    m.d.sync += count.eq(count + 1)

        # --- output side: code byte, data bytes, delimiter ----------------------------------
        current = Block(queue.r_data)
        index = Signal(8)             # the data byte being sent, from 1
        out_const = Signal(8)
        out_from_ring = Signal()
        advance = ~self.source.valid | self.source.ready

        m.d.comb += [
            rd_port.addr.eq(rd_ptr),
            rd_port.en.eq(advance),
            self.source.payload.eq(Mux(out_from_ring, rd_port.data, out_const)),
        ]

        with m.FSM():
            with m.State("CODE"):
                with m.If(advance):
                    m.d.sync += [self.source.valid.eq(queue.r_rdy), out_from_ring.eq(0),
                                 index.eq(1)]
                    with m.If(queue.r_rdy):
                        with m.If(~current.code):
                            m.d.sync += out_const.eq(protocol.DELIMITER)
                            m.d.comb += queue.r_en.eq(1)
                        with m.Else():
                            m.d.sync += out_const.eq(current.length + 1)
                            with m.If(current.length != 0):
                                m.next = "DATA"
                            with m.Elif(current.final):
                                m.next = "DELIMITER"
                            with m.Else():
                                m.d.comb += queue.r_en.eq(1)
            with m.State("DATA"):
                with m.If(advance):
                    m.d.sync += [self.source.valid.eq(1), out_from_ring.eq(1),
                                 rd_ptr.eq(rd_ptr + 1), index.eq(index + 1)]
                    with m.If(index == current.length):
                        with m.If(current.final):
                            m.next = "DELIMITER"
                        with m.Else():
                            m.d.comb += queue.r_en.eq(1)
                            m.next = "CODE"
            with m.State("DELIMITER"):
                with m.If(advance):
                    m.d.sync += [self.source.valid.eq(1), out_from_ring.eq(0),
                                 out_const.eq(protocol.DELIMITER)]
                    m.d.comb += queue.r_en.eq(1)
                    m.next = "CODE"

        return m
