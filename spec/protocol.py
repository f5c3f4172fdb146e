"""The one definition of hel-fpga's serial link: frames, commands, codes and tables.

This module is pure Python (no Amaranth import) so that the gateware
(``hel_fpga.rtl``), the reference device (``hel_fpga.sim.protocol_model``), the
host (``hel_fpga.host``) and any third-party host can share it. Nothing here may
be re-derived elsewhere: import it. docs/protocol.md is the prose for
implementers; docs/design.md §4 summarises the link.

Physical layer
--------------
UART, 8 data bits, no parity, 1 stop bit (8N1), least significant bit first, line
idle high. The bit rate is ``clock / divisor`` (see :class:`hel_fpga.rtl.uart.UART`); the
board chooses it.

Frame layer
-----------
A frame on the wire is the COBS encoding of a *body*, followed by one delimiter
byte ``0x00``::

    wire   = COBS(body) ‖ 0x00
    body   = cmd:u8 ‖ seq:u8 ‖ payload:(0..MAX_PAYLOAD bytes) ‖ crc:u32 little-endian
    crc    = CRC-32/ISO-HDLC(cmd ‖ seq ‖ payload)          (= zlib.crc32)

* **COBS** (Consistent Overhead Byte Stuffing, Cheshire & Baker 1999) removes
  every ``0x00`` from the body, so ``0x00`` only ever appears as the delimiter.
  Each code byte ``c`` (1..255) is followed by ``c − 1`` non-zero data bytes and
  stands for an implied ``0x00`` after them, except when ``c == 0xFF`` (a full
  254-byte run, no implied zero) and after the last block of a frame. The
  encoding is canonical: a final 254-byte run is *not* followed by an empty
  ``0x01`` block (this is what the PyPI ``cobs`` package produces). Decoders
  accept the other form too (``0xFF`` run ‖ ``0x01`` at the end of a frame, as
  encoders with a trailing phantom zero write it): it decodes to the same body,
  which the CRC checks. Overhead: at most one byte per 254 body bytes, at least
  one.
* **Resynchronisation** is free: a receiver that lost its place (noise, a
  reset, a partial frame) discards everything up to the next ``0x00``, and
  the byte after it starts a frame. A sender may therefore precede a frame
  with an extra ``0x00`` to flush a partial frame on the line; an empty frame
  (two delimiters in a row) is ignored silently, it is not an error.
* **CRC**: CRC-32/ISO-HDLC (polynomial 0x04C11DB7, reflected in and out, init
  and final XOR 0xFFFFFFFF), the CRC of Ethernet, zlib and PNG, so every
  language has it in its standard library. It covers cmd, seq and payload and
  is sent least significant byte first, so a receiver may equally run the CRC
  over the whole body and compare the register against :data:`CRC_RESIDUE`.
  CRC-32 has Hamming distance 4 up to 91 607 bits, far beyond the longest body
  (8 240 bits): every 1-, 2- and 3-bit error and every burst up to 32 bits in a
  frame is detected.
* **Length** limits apply to the *decoded* body: ``MIN_BODY_LEN <= len(body)
  <= MAX_BODY_LEN``. Anything else, including a COBS block cut short by the
  delimiter (a truncated frame), is :attr:`ErrorCode.BAD_LENGTH`.
* **seq** is chosen by the host and echoed in the reply, so the host can pair
  replies with requests and drop stale ones after a retry.

A receiver reports a bad frame with one of the link :class:`ErrorCode` values
and otherwise ignores it: bad frames never change state.

Why ``MAX_PAYLOAD = 1024``
--------------------------
* Efficiency: per frame the link spends 2 (cmd, seq) + 4 (CRC) + 1 (delimiter)
  bytes plus one COBS byte per 254, i.e. 12 bytes for a full frame: 98.8 %
  payload efficiency for long LOAD/ECHO streams. Larger frames gain < 1 %.
* Retry cost: a full frame takes 89 ms at 115 200 baud (8.9 ms at 1 Mbaud),
  so resending one after a CRC error costs little.
* Gateware buffers: the receive ring (:class:`hel_fpga.rtl.framing.FrameDecoder`) of
  2048 bytes (four 512×8 iCE40 block RAMs, one ECP5 DP16KD) holds one maximal
  frame while the command unit still has up to 1018 unread bytes of the
  previous one; 1024 is also a multiple of common word sizes on the wire
  (2-, 4-, 8-byte words; 16 × 64 bytes).

Worked example (``cmd = 0x01, seq = 0x07``, empty payload)::

    body   = 01 07 1D B6 A6 C6          crc32(01 07) = 0xC6A6B61D
    wire   = 07 01 07 1D B6 A6 C6 00    one COBS block: code 07 + six bytes
"""

from __future__ import annotations

import enum
import zlib
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from hel_fpga.spec.formats import HelConfig

__all__ = [
    "DELIMITER", "HEADER_LEN", "CRC_LEN", "MAX_PAYLOAD", "MIN_BODY_LEN", "MAX_BODY_LEN",
    "MAX_ENCODED_LEN", "COBS_MAX_RUN",
    "CRC_WIDTH", "CRC_POLY", "CRC_INIT", "CRC_REFLECT", "CRC_XOR_OUT", "CRC_CHECK", "CRC_RESIDUE",
    "crc32", "cobs_max_encoded_len", "wire_len",
    "ErrorCode", "FrameError",
    "PROTOCOL_VERSION", "REPLY_BIT", "ERROR_REPLY", "Command", "ERROR_LAYOUT", "IDENT_FIELDS",
    "IDENT_NAME_MAX", "IDENT_LINK_FIELDS", "STATUS_LAYOUT", "METRICS_LAYOUT", "Pass",
    "TRAINING_COMMANDS", "DURING_PASS", "StatusFlag", "PARAM_MASK_ALL",
    "CHUNK_HEADER_LEN", "CHUNK_DATA_MAX", "WINDOW", "RX_RING_BYTES", "RX_QUEUE_FRAMES",
    "MAX_UNANSWERED", "OVERRUN_SEQ", "body_len", "pipelining_fits", "MAX_CHUNKS", "IDEMPOTENT",
    "REQUEST_LEN", "VARIABLE_LENGTH", "request_len_ok", "DURING_TRANSFER", "WORD_WIDTH", "OPENS_TRANSFER",
    "DATA_REPLIES", "word_width", "MAX_WORD_WIDTH", "check_word_width", "packed_len",
    "chunk_words", "chunk_count", "block_chunks", "chunk_bytes", "pack_fields", "unpack_fields",
    "IdentRecord", "pack_ident", "unpack_ident",
]


# ---------------------------------------------------------------------------
# Frame layout
# ---------------------------------------------------------------------------

#: Frame delimiter on the wire; never occurs inside a COBS-encoded body.
DELIMITER = 0x00

#: Bytes before the payload: ``cmd``, ``seq``.
HEADER_LEN = 2

#: Bytes of the trailing CRC-32 (little-endian).
CRC_LEN = 4

#: Largest payload of one frame, in bytes (see the module docstring for why).
MAX_PAYLOAD = 1024

#: Shortest valid decoded body: header and CRC, empty payload.
MIN_BODY_LEN = HEADER_LEN + CRC_LEN

#: Longest valid decoded body.
MAX_BODY_LEN = HEADER_LEN + MAX_PAYLOAD + CRC_LEN

#: Longest run of non-zero bytes one COBS block carries (code byte 0xFF).
COBS_MAX_RUN = 254


def cobs_max_encoded_len(n: int) -> int:
    """Worst-case length of the COBS encoding of ``n`` bytes (delimiter excluded)."""
    return n + max(1, -(-n // COBS_MAX_RUN))


#: Longest valid frame on the wire, delimiter excluded. Receivers may discard a
#: frame as soon as it grows beyond this without waiting for its delimiter.
MAX_ENCODED_LEN = cobs_max_encoded_len(MAX_BODY_LEN)


def wire_len(payload_len: int) -> int:
    """Worst-case bytes on the wire for a frame with ``payload_len`` payload bytes."""
    return cobs_max_encoded_len(HEADER_LEN + payload_len + CRC_LEN) + 1


# ---------------------------------------------------------------------------
# CRC: CRC-32/ISO-HDLC, in the Rocksoft/"reveng" parameter model used by
# amaranth.lib.crc.Algorithm (the gateware builds its CRC from these numbers).
# ---------------------------------------------------------------------------

CRC_WIDTH = 32
CRC_POLY = 0x04C11DB7
CRC_INIT = 0xFFFFFFFF
CRC_REFLECT = True          # both reflect_input and reflect_output
CRC_XOR_OUT = 0xFFFFFFFF
#: CRC of ``b"123456789"`` (the catalogue's check value).
CRC_CHECK = 0xCBF43926
#: CRC of any body whose last four bytes are the little-endian CRC of the rest.
CRC_RESIDUE = 0x2144DF1C


def crc32(data: bytes) -> int:
    """The link CRC of ``data`` (identical to :func:`zlib.crc32`)."""
    return zlib.crc32(data) & 0xFFFFFFFF


# ---------------------------------------------------------------------------
# Command codes
# ---------------------------------------------------------------------------
# The command layer is documented in full in docs/protocol.md. In short: the
# host sends a request frame ``cmd, seq``; the device answers every good frame
# with replies of ``cmd | REPLY_BIT`` and the same ``seq``, or with one ERROR
# frame (``cmd = ERROR_REPLY``). Bad frames are answered with ERROR frames too.

#: Version of the command layer below; IDENT reports it. Bump on any change.
PROTOCOL_VERSION = 4

#: A reply's cmd is the request's cmd with this bit set.
REPLY_BIT = 0x80

#: cmd of an error reply; payload :data:`ERROR_LAYOUT`.
ERROR_REPLY = 0xFF


class Command(enum.IntEnum):
    """Request command codes (u8). Replies use ``cmd | REPLY_BIT``."""

    #: → IDENT_FIELDS reply (protocol version, configuration, clock, baud, name).
    IDENT = 0x01
    #: → STATUS_LAYOUT reply (flags, transfer progress, loaded T).
    STATUS = 0x02
    #: Clear the sticky overflow flags. → empty reply.
    CLEAR_FLAGS = 0x03
    #: Abort any transfer; parameters, accumulators, banks, sequence, flags → zero/none.
    RESET = 0x04
    #: mask:u8 → empty reply, then DATA chunks of the masked parameters (operand words).
    WRITE_PARAMS = 0x10
    #: mask:u8 → data replies of the masked parameters (operand words).
    READ_PARAMS = 0x11
    #: T:u32 → empty reply, then DATA chunks of T·K input words (operand words).
    LOAD = 0x12
    #: estimator:u8 (0 centred, 1 one-sided) → data replies of T·O outputs (state words).
    FORWARD = 0x13
    #: rows:u32 (T or 1) → empty reply, then DATA chunks of rows·O nudges (state words).
    ECHO = 0x14
    #: → data replies of the accumulators W, B, b, alpha (acc words).
    READ_ACC = 0x15
    #: Zero the accumulators and clear acc_overflow. → empty reply.
    CLEAR_ACC = 0x16
    #: bank:u8 (0 fwd, 1 pos = +ε, 2 neg = −ε) → data replies of Q then Wv (state words).
    READ_STATE = 0x17
    #: steps:u32, seed:u32 → result:u8 (1 pass, 0 fail).
    SELFTEST = 0x18
    #: index:u16 ‖ packed words: one chunk of a host → device transfer. → ack next:u16.
    DATA = 0x20

    # --- on-chip training (devices with store_words > 0; docs/onchip.md) ---
    #: → empty reply, then DATA chunks of the SETUP_WORDS setup words (operand words).
    TRAIN_SETUP = 0x30
    #: count:u32 ‖ start:u32 → empty reply, then DATA chunks of count store words
    #: (operand words) for addresses start … start + count − 1.
    STORE = 0x31
    #: which:u8 (0 master weights, 1 moment) → empty reply, then DATA chunks of the
    #: parameters' master weights or moments (acc words, W, B, b, alpha order).
    WRITE_MASTER = 0x32
    #: which:u8 → data replies of the master weights or moments (acc words).
    READ_MASTER = 0x33
    #: epoch:u32 → empty reply; the epoch then runs in the device (METRICS).
    TRAIN = 0x34
    #: set:u8 (0 training set, 1 test set) → empty reply; the pass then runs (METRICS).
    EVAL = 0x35
    #: → METRICS_LAYOUT reply: the running or last pass's metrics.
    METRICS = 0x36
    #: count:u32 → empty reply, then DATA chunks of count store words (operand words):
    #: records for the ring of a streamed pass (only while one runs; count ≤ store_words).
    #: The device takes each word when its ring slot is free, so a chunk is acked
    #: once the pass has made room for it.
    STREAM = 0x37



# ---------------------------------------------------------------------------
# Error codes
# ---------------------------------------------------------------------------

class ErrorCode(enum.IntEnum):
    """Error codes (u8) reported by the device and raised by the host.

    Codes ``0x01..0x0F`` are link faults detected by the frame layer before a
    command is looked at; the command unit's codes follow from ``0x10``.
    """

    # --- link layer (hel_fpga.rtl.framing.FrameDecoder, hel_fpga.spec.framing) ---
    #: The CRC over cmd, seq and payload does not match the trailing CRC.
    BAD_CRC = 0x01
    #: Decoded body shorter than MIN_BODY_LEN or longer than MAX_BODY_LEN,
    #: or a COBS block cut short by the delimiter (a truncated frame).
    BAD_LENGTH = 0x02
    #: A frame the device could not take in (its frame queue was full, or a good
    #: frame's body did not fit the receive ring): the host sent faster than the
    #: command unit consumed. Its seq is :data:`OVERRUN_SEQ`.
    OVERRUN = 0x03

    # --- command unit ---
    #: The cmd byte is not a :class:`Command` (replies' codes included).
    UNKNOWN_COMMAND = 0x10
    #: Not allowed in the current state (GoldenCore's StateError: FORWARD with
    #: no sequence loaded, ECHO without a FORWARD since the last LOAD/ECHO/
    #: SELFTEST, DATA with no transfer open).
    WRONG_STATE = 0x11
    #: A request payload of the wrong length for its command (or a DATA chunk of
    #: the wrong length for the configuration), or a field outside its range:
    #: T outside 1..t_max, steps = 0, rows not in {1, T}, estimator > 1,
    #: bank > 2, mask = 0 or > 15, a transfer of more than 65 535 chunks.
    OUT_OF_RANGE = 0x12
    #: A command other than DATA, STATUS, IDENT or RESET while a transfer is open.
    BUSY = 0x13
    #: A DATA chunk whose index is ahead of the next expected one (an earlier
    #: chunk was lost); the error's ``arg`` is the index the device expects.
    SEQUENCE = 0x14


class FrameError(Exception):
    """A frame the host received (or was asked to decode) is not a valid frame.

    Attributes
    ----------
    code : ErrorCode
        The link error code the device would report for the same frame.
    reason : str
        A human-readable explanation (lengths, CRC values).
    """

    def __init__(self, code: ErrorCode, reason: str):
        self.code = ErrorCode(code)
        self.reason = reason
        super().__init__(f"{self.code.name}: {reason}")


#: ERROR reply payload: (field, bytes), little-endian.
ERROR_LAYOUT = (("code", 1), ("cmd", 1), ("arg", 2))

#: IDENT reply payload: (field, bytes), little-endian unsigned; followed by the
#: board name in ASCII (0..IDENT_NAME_MAX bytes, the rest of the payload). The
#: HelConfig fields appear under their HelConfig names (hel_fpga.spec.formats);
#: :func:`pack_ident` and :func:`unpack_ident` build and read the whole payload.
IDENT_FIELDS = (
    ("protocol_version", 1),
    ("n", 2), ("m", 2), ("k", 2), ("o", 2),
    ("t_max", 4),
    ("state_width", 1), ("state_frac", 1),
    ("operand_width", 1), ("operand_frac", 1),
    ("act_frac", 1), ("param_frac", 1),
    ("dt_log2", 1),
    ("tanh_range_log2", 1), ("tanh_segments_log2", 1), ("z_frac", 1),
    ("acc_width", 1),
    ("lanes", 2),
    ("store_words", 4),
    ("engines", 1),
    ("clock_hz", 4),
    ("baud", 4),
)
IDENT_NAME_MAX = 32
#: The IDENT fields that describe the device and link rather than the HelConfig.
IDENT_LINK_FIELDS = ("protocol_version", "clock_hz", "baud")

#: METRICS reply payload: ``running`` (:class:`Pass`: the pass in progress, NONE
#: when none is), ``samples`` done in it so far (or in the last pass), the sum of
#: squared errors (``2·OF`` fractional bits, saturating), the correct count
#: (classification) and the updates skipped after an overflow flag.
METRICS_LAYOUT = (("running", 1), ("samples", 4), ("loss_sum", 8), ("correct", 4),
                  ("skipped", 4))


class Pass(enum.IntEnum):
    """METRICS ``running``: the pass in progress."""

    NONE = 0
    TRAIN = 1
    EVAL = 2


#: STATUS reply payload.
STATUS_LAYOUT = (("flags", 1), ("xfer_cmd", 1), ("xfer_done", 2), ("t_loaded", 4))


class StatusFlag(enum.IntFlag):
    """Bits of STATUS ``flags``."""

    STATE_OVERFLOW = 0x01   # sticky: the state wrapped
    ACC_OVERFLOW = 0x02     # sticky: an accumulator wrapped
    LOADED = 0x04           # a sequence is loaded (t_loaded ≥ 1)
    FORWARDED = 0x08        # an ECHO may follow (FORWARD since the last LOAD/ECHO/SELFTEST)
    ONE_SIDED = 0x10        # ... and that FORWARD was one-sided
    XFER_OPEN = 0x20        # a transfer is open: xfer_cmd, xfer_done are its progress
    # Otherwise xfer_cmd/xfer_done describe the last completed transfer (0, 0 after RESET).
    # During an open ECHO transfer the overflow bits may lag (the golden model
    # updates them when the echo completes).


#: Bits of WRITE_PARAMS/READ_PARAMS ``mask``: bit i = hel_fpga.spec.names.PARAM_NAMES[i]
#: (W, B, b, alpha); the selected arrays travel in that order, each row-major.
PARAM_MASK_ALL = 0x0F

#: READ_STATE ``bank`` codes: the index in :data:`hel_fpga.spec.names.BANKS`.
#: FORWARD ``estimator`` codes: the index in :data:`hel_fpga.spec.names.ESTIMATORS`.

#: Bytes before the packed words of a chunk (``index:u16``).
CHUNK_HEADER_LEN = 2

#: Most packed bytes in one chunk: a chunk frame (2 + 2 + 1016 + CRC) fits twice in
#: the 2 KiB receive ring, which the window of 2 relies on (docs/protocol.md §4).
CHUNK_DATA_MAX = 1016

#: Un-acked DATA chunks the host may have in flight: two full chunk frames fill
#: :data:`RX_RING_BYTES` exactly (:func:`pipelining_fits`).
WINDOW = 2

# ---------------------------------------------------------------------------
# Receive capacity and OVERRUN (docs/protocol.md §4): what a host may pipeline.
# ---------------------------------------------------------------------------

#: The device's receive ring: the decoded bodies of frames taken in and not yet read
#: by the command unit (without their CRC), plus the body of the frame arriving
#: (with its CRC).
RX_RING_BYTES = 2048

#: The device's frame queue: one entry per frame taken in (good or bad) and not yet
#: read by the command unit.
RX_QUEUE_FRAMES = 257

#: A frame the device cannot take in (its queue full, or a good frame's body does not
#: fit the ring) is not stored but counted, and answered ERROR OVERRUN in its place
#: in wire order. The count saturates here: while a host keeps at most this many
#: frames unanswered, every frame gets exactly one answer, in order.
MAX_UNANSWERED = 16383

#: seq of every OVERRUN reply: the device keeps nothing of a frame it could not take
#: in, so a host pairs an OVERRUN with its frame by order.
OVERRUN_SEQ = 0


def body_len(payload_len: int) -> int:
    """Decoded body length (cmd, seq, payload, CRC) of a frame with ``payload_len`` bytes."""
    return HEADER_LEN + payload_len + CRC_LEN


def pipelining_fits(bodies) -> bool:
    """Whether frames whose decoded body lengths are ``bodies`` (every frame sent and
    not yet answered, the one about to be sent included) are certain to be taken in:
    at most :data:`RX_QUEUE_FRAMES` of them, their bodies adding up to at most
    :data:`RX_RING_BYTES`. A host that keeps this never sees OVERRUN."""
    bodies = list(bodies)
    return len(bodies) <= RX_QUEUE_FRAMES and sum(bodies) <= RX_RING_BYTES

#: Chunk indices are u16.
MAX_CHUNKS = 0xFFFF

#: Commands a host may repeat freely after a timeout or a bad reply.
IDEMPOTENT = frozenset({Command.IDENT, Command.STATUS, Command.READ_PARAMS, Command.READ_ACC,
                        Command.READ_STATE, Command.CLEAR_FLAGS, Command.CLEAR_ACC,
                        Command.SELFTEST, Command.RESET, Command.READ_MASTER,
                        Command.METRICS})

# ---------------------------------------------------------------------------
# Command rules: the tables the device (gateware and model) checks requests
# against and the host builds them from.
# ---------------------------------------------------------------------------

#: Request payload length of each command, in bytes: exact, except for DATA, whose
#: payload is at least its chunk index (the packed words follow).
REQUEST_LEN = {
    Command.IDENT: 0, Command.STATUS: 0, Command.CLEAR_FLAGS: 0, Command.RESET: 0,
    Command.WRITE_PARAMS: 1, Command.READ_PARAMS: 1, Command.LOAD: 4, Command.FORWARD: 1,
    Command.ECHO: 4, Command.READ_ACC: 0, Command.CLEAR_ACC: 0, Command.READ_STATE: 1,
    Command.SELFTEST: 8, Command.DATA: CHUNK_HEADER_LEN,
    Command.TRAIN_SETUP: 0, Command.STORE: 8, Command.WRITE_MASTER: 1, Command.READ_MASTER: 1,
    Command.TRAIN: 4, Command.EVAL: 1, Command.METRICS: 0, Command.STREAM: 4,
}

#: The on-chip training commands: a device whose IDENT reports ``store_words = 0``
#: answers them UNKNOWN_COMMAND.
TRAINING_COMMANDS = frozenset({Command.TRAIN_SETUP, Command.STORE, Command.WRITE_MASTER,
                               Command.READ_MASTER, Command.TRAIN, Command.EVAL,
                               Command.METRICS, Command.STREAM})

#: Commands accepted while a TRAIN or EVAL pass runs (any other gets BUSY), and
#: STREAM while a streamed pass runs (outside one it is WRONG_STATE).
DURING_PASS = frozenset({Command.STATUS, Command.IDENT, Command.RESET, Command.METRICS})


#: Commands whose :data:`REQUEST_LEN` is a least length (packed words follow it).
VARIABLE_LENGTH = frozenset({Command.DATA})


def request_len_ok(cmd: Command, payload_len: int) -> bool:
    """Whether a ``cmd`` request may carry ``payload_len`` payload bytes (:data:`REQUEST_LEN`)."""
    if cmd in VARIABLE_LENGTH:
        return payload_len >= REQUEST_LEN[cmd]
    return payload_len == REQUEST_LEN[cmd]


#: Commands accepted while a transfer is open (any other gets BUSY, except the
#: retransmission of the opening request while no chunk has been applied).
DURING_TRANSFER = frozenset({Command.DATA, Command.STATUS, Command.IDENT, Command.RESET})

#: The width of the words a command moves, as the HelConfig field that holds it:
#: the transfer-opening commands' (their DATA chunks) and the data replies'.
WORD_WIDTH = {
    Command.WRITE_PARAMS: "operand_width", Command.LOAD: "operand_width",
    Command.ECHO: "state_width",
    Command.READ_PARAMS: "operand_width", Command.FORWARD: "state_width",
    Command.READ_ACC: "acc_width", Command.READ_STATE: "state_width",
    Command.TRAIN_SETUP: "operand_width", Command.STORE: "operand_width",
    Command.STREAM: "operand_width", Command.WRITE_MASTER: "acc_width",
    Command.READ_MASTER: "acc_width",
}


def word_width(cfg: HelConfig, cmd: Command) -> int:
    """The width in bits of the words ``cmd`` moves under ``cfg`` (:data:`WORD_WIDTH`)."""
    return getattr(cfg, WORD_WIDTH[cmd])

#: Commands that open a transfer (host → device words, in DATA chunks).
OPENS_TRANSFER = (Command.WRITE_PARAMS, Command.LOAD, Command.ECHO, Command.TRAIN_SETUP,
                  Command.STORE, Command.WRITE_MASTER, Command.STREAM)

#: Commands answered with data replies (device → host words).
DATA_REPLIES = (Command.READ_PARAMS, Command.FORWARD, Command.READ_ACC, Command.READ_STATE,
                Command.READ_MASTER)

assert set(WORD_WIDTH) == set(OPENS_TRANSFER) | set(DATA_REPLIES)

# ---------------------------------------------------------------------------
# Words and chunks
# ---------------------------------------------------------------------------

#: Widest word the packing carries (words travel as two's complement in an int64).
MAX_WORD_WIDTH = 64


def check_word_width(width: int) -> None:
    """Raise ``ValueError`` unless ``width`` is a word width the packing carries (1..64)."""
    if not 1 <= width <= MAX_WORD_WIDTH:
        raise ValueError(f"word width must be in 1..{MAX_WORD_WIDTH}, got {width}")


def packed_len(count: int, width: int) -> int:
    """Bytes of ``count`` packed words of ``width`` bits (the last byte zero-padded)."""
    return -(-count * width // 8)


def chunk_words(width: int) -> int:
    """Words of ``width`` bits per full chunk: the largest multiple of 8 in CHUNK_DATA_MAX."""
    check_word_width(width)
    return 8 * (CHUNK_DATA_MAX // width)


def chunk_count(total_words: int, width: int) -> int:
    """Chunks needed for ``total_words`` words (at least one, even for zero words)."""
    return max(1, -(-total_words // chunk_words(width)))


def block_chunks(total_words: int, width: int) -> int:
    """:func:`chunk_count`, raising ``ValueError`` if the block needs more than MAX_CHUNKS."""
    n = chunk_count(total_words, width)
    if n > MAX_CHUNKS:
        raise ValueError(f"a block of {total_words} {width}-bit words needs {n} chunks, "
                         f"more than the protocol's {MAX_CHUNKS}")
    return n


def chunk_bytes(total_words: int, width: int, index: int) -> int:
    """Packed bytes of chunk ``index`` (its payload is 2 bytes longer)."""
    c = chunk_words(width)
    n = min(c, total_words - index * c)
    if n < 0:
        raise ValueError(f"chunk {index} is beyond {total_words} words")
    return packed_len(n, width)


def pack_fields(layout, values) -> bytes:
    """Pack ``values[name]`` for each ``(name, nbytes)`` of ``layout``, little-endian."""
    out = bytearray()
    for name, size in layout:
        v = int(values[name])
        if not 0 <= v < 1 << (8 * size):
            raise ValueError(f"{name} = {v} does not fit {size} bytes")
        out += v.to_bytes(size, "little")
    return bytes(out)


def unpack_fields(layout, payload: bytes) -> tuple[dict[str, int], bytes]:
    """Inverse of :func:`pack_fields`; returns the fields and the remaining bytes."""
    need = sum(size for _, size in layout)
    if len(payload) < need:
        raise ValueError(f"payload of {len(payload)} bytes, layout needs {need}")
    out, pos = {}, 0
    for name, size in layout:
        out[name] = int.from_bytes(payload[pos:pos + size], "little")
        pos += size
    return out, bytes(payload[pos:])


class IdentRecord(NamedTuple):
    """An IDENT reply payload, read by :func:`unpack_ident`."""

    protocol_version: int
    #: The HelConfig fields, by name (``HelConfig.from_dict`` validates them).
    config: dict[str, int]
    clock_hz: int
    baud: int
    name: str


def pack_ident(cfg: HelConfig, clock_hz: int, baud: int, name: str) -> bytes:
    """The IDENT reply payload: :data:`IDENT_FIELDS` of this protocol version and ``cfg``,
    then ``name`` in ASCII, truncated to :data:`IDENT_NAME_MAX` bytes."""
    values = {"protocol_version": PROTOCOL_VERSION, **cfg.to_dict(),
              "clock_hz": clock_hz, "baud": baud}
    return pack_fields(IDENT_FIELDS, values) + name.encode("ascii")[:IDENT_NAME_MAX]


def unpack_ident(payload: bytes) -> IdentRecord:
    """Inverse of :func:`pack_ident`; ``ValueError`` if ``payload`` is too short.

    A name byte outside ASCII reads as U+FFFD; the protocol version is returned as
    sent (the caller decides whether it speaks it).
    """
    fields, name = unpack_fields(IDENT_FIELDS, payload)
    config = {k: v for k, v in fields.items() if k not in IDENT_LINK_FIELDS}
    return IdentRecord(fields["protocol_version"], config, fields["clock_hz"], fields["baud"],
                       name.decode("ascii", "replace"))
