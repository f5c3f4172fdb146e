"""The wire format of words: bit-packing for host and model (layout: :mod:`hel_fpga.spec.protocol`).

The one implementation of how integer words travel in the link's payloads, used
by the host (:mod:`hel_fpga.host.link`) and by the reference device model
(:mod:`hel_fpga.sim.protocol_model`), and the reference for the gateware's pack/unpack
shift registers. ``tests/test_wire_reference.py`` holds it against an independent
implementation of docs/protocol.md §3 with ``bitstring``, so the host and the model,
which share this code, cannot share a packing bug unnoticed.

Words of one width ``w`` are packed LSB first into a bit stream (word ``i`` at
stream bits ``i·w … i·w+w−1``; stream bit ``j`` = bit ``j mod 8`` of byte
``j div 8``), the last byte zero-padded; unpacking sign-extends bit ``w − 1``.
Blocks longer than one frame are split into chunks of
:func:`hel_fpga.spec.protocol.chunk_words` words, each packed on its own.

Example: the 4-bit words ``[1, -2, 3]`` pack to ``0xE1 0x03``.
"""

from __future__ import annotations

import numpy as np

from hel_fpga.spec.protocol import (block_chunks, check_word_width, chunk_bytes, chunk_words,
                                    packed_len)

__all__ = ["pack_words", "unpack_words", "packed_len", "split_chunks", "join_chunks"]


def pack_words(values, width: int) -> bytes:
    """Pack integers (two's complement, ``width`` bits each) LSB first.

    Raises ``ValueError`` if a value does not fit ``width`` signed bits.
    """
    check_word_width(width)
    v = np.asarray(values, dtype=np.int64).ravel()
    if v.size == 0:
        return b""
    lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
    if v.min() < lo or v.max() > hi:
        raise ValueError(f"value outside the {width}-bit signed range [{lo}, {hi}]")
    u = v.view(np.uint64)
    bits = ((u[:, None] >> np.arange(width, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.ravel(), bitorder="little").tobytes()


def unpack_words(data: bytes, width: int, count: int) -> np.ndarray:
    """Unpack ``count`` sign-extended words of ``width`` bits (int64). Pad bits are ignored.

    Raises ``ValueError`` if ``data`` is shorter than ``packed_len(count, width)``.
    """
    check_word_width(width)
    need = packed_len(count, width)
    if len(data) < need:
        raise ValueError(f"{len(data)} bytes hold fewer than {count} words of {width} bits")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(bytes(data[:need]), dtype=np.uint8), bitorder="little")
    bits = bits[:count * width].reshape(count, width).astype(np.uint64)
    raw = (bits << np.arange(width, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)
    shift = np.uint64(64 - width)
    return ((raw << shift).view(np.int64)) >> np.int64(64 - width)


def split_chunks(values, width: int) -> list[bytes]:
    """Pack a block of words into its chunks' packed bytes (index header not included)."""
    v = np.asarray(values, dtype=np.int64).ravel()
    n = block_chunks(v.size, width)
    c = chunk_words(width)
    return [pack_words(v[i * c:(i + 1) * c], width) for i in range(n)]


def join_chunks(chunks, total: int, width: int) -> np.ndarray:
    """Unpack a block from its chunks' packed bytes (in index order); lengths are checked."""
    c = chunk_words(width)
    parts = []
    for i, data in enumerate(chunks):
        if len(data) != chunk_bytes(total, width, i):
            raise ValueError(f"chunk {i} has {len(data)} bytes, expected "
                             f"{chunk_bytes(total, width, i)}")
        parts.append(unpack_words(data, width, min(c, total - i * c)))
    out = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if out.size != total:
        raise ValueError(f"{out.size} words received, expected {total}")
    return out
