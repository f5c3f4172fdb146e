"""The one definition of hel-fpga's serial link: frame layer constants and codes.

This module is pure Python (no Amaranth import) so that the gateware (``rtl``),
the host (``host``) and any third-party host can share it. Nothing here may be
re-derived elsewhere: import it.

Physical layer
--------------
UART, 8 data bits, no parity, 1 stop bit (8N1), least significant bit first, line
idle high. The bit rate is ``clock / divisor`` (see :class:`rtl.uart.UART`); the
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
  ``0x01`` block (this is what the PyPI ``cobs`` package produces; decoders
  accept both forms). Overhead: at most one byte per 254 body bytes, at least
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
  payload efficiency, far above the 90 % target for long LOAD/ECHO streams.
  Larger frames gain < 1 %.
* Retry cost: a full frame takes 89 ms at 115 200 baud (8.9 ms at 1 Mbaud),
  so resending one after a CRC error costs little.
* Gateware buffers: the receive ring (:class:`rtl.framing.FrameDecoder`) of
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

__all__ = [
    "DELIMITER", "HEADER_LEN", "CRC_LEN", "MAX_PAYLOAD", "MIN_BODY_LEN", "MAX_BODY_LEN",
    "MAX_ENCODED_LEN", "COBS_MAX_RUN",
    "CRC_WIDTH", "CRC_POLY", "CRC_INIT", "CRC_REFLECT", "CRC_XOR_OUT", "CRC_CHECK", "CRC_RESIDUE",
    "crc32", "cobs_max_encoded_len", "wire_len",
    "ErrorCode", "FrameError",
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
# >>> COMMAND CODES: to be filled in by the command unit (issue 4). <<<
#
# One u8 per command (IDENT, WRITE/READ params, LOAD, FORWARD, ECHO, READ/CLEAR
# accumulators, READ state, STATUS, SELFTEST, RESET, ...). The reply convention
# (same cmd, or cmd | 0x80, and the error reply's cmd) belongs here too.
#
# class Command(enum.IntEnum):
#     ...
# >>> end of command codes <<<


# ---------------------------------------------------------------------------
# Error codes
# ---------------------------------------------------------------------------

class ErrorCode(enum.IntEnum):
    """Error codes (u8) reported by the device and raised by the host.

    Codes ``0x01..0x0F`` are link faults detected by the frame layer before a
    command is looked at; the command unit's codes follow from ``0x10``.
    """

    # --- link layer (rtl.framing.FrameDecoder, host.framing) ---
    #: The CRC over cmd, seq and payload does not match the trailing CRC.
    BAD_CRC = 0x01
    #: Decoded body shorter than MIN_BODY_LEN or longer than MAX_BODY_LEN,
    #: or a COBS block cut short by the delimiter (a truncated frame).
    BAD_LENGTH = 0x02
    #: A good frame was dropped because the device's receive buffer was full
    #: (the host sent faster than the command unit consumed).
    OVERRUN = 0x03

    # >>> COMMAND-UNIT ERROR CODES (0x10 and up): to be filled in (issue 4) <<<
    # UNKNOWN_COMMAND = 0x10
    # WRONG_STATE     = 0x11
    # OUT_OF_RANGE    = 0x12
    # >>> end of command-unit error codes <<<


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
