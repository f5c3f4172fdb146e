"""The link's frame codec in Python (layout: :mod:`hel_fpga.spec.protocol`).

The reference codec, used by the host (:mod:`hel_fpga.host.link`) and the
protocol model (:mod:`hel_fpga.sim.protocol_model`): the PyPI ``cobs`` package
for byte stuffing and :func:`zlib.crc32` for the CRC, wrapped in the frame
layout that :mod:`hel_fpga.spec.protocol` defines. The gateware
(:mod:`hel_fpga.rtl.framing`) is tested against these functions, so they are
kept as plain as possible.

* :func:`encode_frame` builds the bytes to write to the serial port.
* :func:`decode_frame` checks and unpacks one frame (delimiter stripped).
* :class:`FrameReader` splits an arbitrary byte stream (as it arrives from a
  serial port, in chunks of any size) at the delimiters and decodes each frame.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from cobs import cobs

from hel_fpga.spec.protocol import (CRC_LEN, DELIMITER, HEADER_LEN, MAX_BODY_LEN, MAX_ENCODED_LEN,
                          MAX_PAYLOAD, MIN_BODY_LEN, ErrorCode, FrameError, crc32)

__all__ = ["Frame", "FrameReader", "decode_frame", "encode_frame", "FrameError"]

_DELIM = bytes([DELIMITER])


class Frame(NamedTuple):
    """One decoded frame."""

    cmd: int
    seq: int
    payload: bytes


def encode_frame(cmd: int, seq: int, payload: bytes = b"") -> bytes:
    """Return the wire bytes of one frame: ``COBS(cmd ‖ seq ‖ payload ‖ crc32) ‖ 0x00``.

    Raises
    ------
    ValueError
        If ``cmd`` or ``seq`` is not a byte or the payload exceeds ``MAX_PAYLOAD``.
    """
    if not (0 <= cmd <= 0xFF and 0 <= seq <= 0xFF):
        raise ValueError(f"cmd and seq must be bytes, got cmd={cmd!r} seq={seq!r}")
    payload = bytes(payload)
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds MAX_PAYLOAD={MAX_PAYLOAD}")
    body = bytes((cmd, seq)) + payload
    body += struct.pack("<I", crc32(body))
    return cobs.encode(body) + _DELIM


def decode_frame(raw: bytes) -> Frame:
    """Decode one frame; ``raw`` is the COBS data between two delimiters.

    A single trailing delimiter is tolerated (so ``decode_frame(encode_frame(...))``
    round-trips).

    Raises
    ------
    FrameError
        ``BAD_LENGTH`` for a COBS error (a block cut short: a truncated frame, or a
        stray ``0x00``) or a body outside ``MIN_BODY_LEN..MAX_BODY_LEN``;
        ``BAD_CRC`` if the CRC does not match.
    """
    raw = bytes(raw)
    if raw.endswith(_DELIM):
        raw = raw[:-1]
    if len(raw) > MAX_ENCODED_LEN:
        raise FrameError(ErrorCode.BAD_LENGTH,
                         f"{len(raw)} encoded bytes exceed MAX_ENCODED_LEN={MAX_ENCODED_LEN}")
    try:
        body = cobs.decode(raw)
    except cobs.DecodeError as exc:
        raise FrameError(ErrorCode.BAD_LENGTH, f"COBS decode error: {exc}") from None
    if not MIN_BODY_LEN <= len(body) <= MAX_BODY_LEN:
        raise FrameError(ErrorCode.BAD_LENGTH,
                         f"body of {len(body)} bytes, expected {MIN_BODY_LEN}..{MAX_BODY_LEN}")
    data, (sent,) = body[:-CRC_LEN], struct.unpack("<I", body[-CRC_LEN:])
    if crc32(data) != sent:
        raise FrameError(ErrorCode.BAD_CRC,
                         f"CRC 0x{crc32(data):08X} computed, 0x{sent:08X} received")
    return Frame(data[0], data[1], data[HEADER_LEN:])


class FrameReader:
    """Split a byte stream into frames at the delimiters and decode them.

    Feed it whatever the serial port returned; it keeps the bytes of an
    unfinished frame for the next call. Bytes before the first delimiter are
    treated as a frame like any other, so garbage on the line yields one
    :class:`FrameError` and the reader is in step again at the next ``0x00``
    (the same rule as the gateware decoder). Empty frames (consecutive
    delimiters) are skipped silently. A frame that grows beyond
    ``MAX_ENCODED_LEN`` is not buffered further; it is reported as
    ``BAD_LENGTH`` when its delimiter arrives, so memory stays bounded on a
    line that never sends ``0x00``.

    Example
    -------
    ::

        reader = FrameReader()
        for item in reader.feed(port.read(port.in_waiting or 1)):
            if isinstance(item, FrameError):
                ...   # bad frame: count it, maybe retry the request
            else:
                cmd, seq, payload = item
    """

    def __init__(self):
        self._buf = bytearray()
        self._oversized = False

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame held in the buffer."""
        return len(self._buf)

    def reset(self) -> None:
        """Forget any partial frame (e.g. after reopening the port)."""
        self._buf.clear()
        self._oversized = False

    def feed(self, data: bytes) -> list[Frame | FrameError]:
        """Consume ``data``; return every frame it completes, in order.

        Good frames are returned as :class:`Frame`, bad ones as :class:`FrameError`
        *instances* (not raised), so one bad frame does not hide the good ones
        that follow it in the same chunk.
        """
        out: list[Frame | FrameError] = []
        for chunk_end, part in _split_keep(bytes(data)):
            if not self._oversized:
                self._buf += part
                if len(self._buf) > MAX_ENCODED_LEN:
                    self._oversized = True
                    self._buf.clear()
            if not chunk_end:
                continue
            if self._oversized:
                out.append(FrameError(ErrorCode.BAD_LENGTH,
                                      f"frame exceeds MAX_ENCODED_LEN={MAX_ENCODED_LEN} bytes"))
            elif self._buf:
                try:
                    out.append(decode_frame(self._buf))
                except FrameError as exc:
                    out.append(exc)
            self._buf.clear()
            self._oversized = False
        return out


def _split_keep(data: bytes):
    """Yield ``(ends_at_delimiter, bytes)`` pieces of ``data``."""
    *complete, rest = data.split(_DELIM)
    for part in complete:
        yield True, part
    if rest:
        yield False, rest
