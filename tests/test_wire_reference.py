"""The wire-word packing against an independent reference written with ``bitstring``.

The reference (:func:`ref_pack`, :func:`ref_unpack`, :func:`ref_chunk_words`) is
docs/protocol.md §3 "Words on the wire" transcribed literally, bit by bit:
word ``i`` takes stream bits ``i·w … i·w+w−1`` LSB first, stream bit ``j`` is
bit ``j mod 8`` of byte ``j div 8``, the last byte is zero-padded, the receiver
ignores the padding and sign-extends bit ``w−1``; a block is cut into chunks of
``8·⌊1016/w⌋`` words, each packed on its own. The fast packing the host
(:mod:`hel_fpga.host.link`) and the protocol model (:mod:`hel_fpga.sim.protocol_model`)
use, :mod:`hel_fpga.spec.wire`, must agree with it in both directions for every
word width a :class:`~hel_fpga.spec.formats.HelConfig` allows.
"""

from __future__ import annotations

import numpy as np
import pytest
from bitstring import Bits

from hel_fpga.spec import protocol, wire
from hel_fpga.spec.formats import ConfigError, HelConfig

# ---- the reference, from docs/protocol.md ----------------------------------------------------


def ref_pack(values, w: int) -> bytes:
    stream = Bits().join(Bits(int=int(v), length=w)[::-1] for v in values)  # bit 0 of a word first
    pad = -len(stream) % 8                                    # zero bits up to a whole byte
    stream += Bits(bytes(1))[:pad]
    return bytes(stream[8 * k:8 * k + 8][::-1].uint for k in range(len(stream) // 8))


def ref_unpack(data: bytes, w: int, count: int) -> list[int]:
    stream = Bits().join(Bits(uint=b, length=8)[::-1] for b in data)
    return [stream[i * w:(i + 1) * w][::-1].int for i in range(count)]


def ref_chunk_words(w: int) -> int:
    return 8 * (1016 // w)


def ref_split(values, w: int) -> list[bytes]:
    n = ref_chunk_words(w)
    return [ref_pack(values[i:i + n], w) for i in range(0, len(values), n)]


# ---- the widths the formats allow ------------------------------------------------------------

#: A configuration with every width at its smallest (acc_width's lower bound grows
#: with operand_width and t_max, so both are minimal here).
SMALLEST = dict(operand_width=4, operand_frac=1, act_frac=1, param_frac=1, z_frac=2,
                tanh_range_log2=0, tanh_segments_log2=1, t_max=1, state_width=8, state_frac=1,
                acc_width=10)

#: block → (field of HelConfig, smallest and largest width it accepts); docs/protocol.md §3
#: names the width of each block.
STREAM_WIDTHS = {
    "parameters, inputs": ("operand_width", 4, 25),
    "outputs, nudges, state": ("state_width", 8, 48),
    "accumulators": ("acc_width", 10, 63),
}
WIDTHS = sorted({w for _, lo, hi in STREAM_WIDTHS.values() for w in range(lo, hi + 1)})


def _config_with(field: str, w: int) -> HelConfig:
    kw = dict(SMALLEST, **{field: w})
    if field == "operand_width":
        kw["acc_width"] = min(63, max(10, 2 * w + 3))
    return HelConfig(**kw)


@pytest.mark.parametrize("block", list(STREAM_WIDTHS))
def test_width_table_is_helconfigs_limits(block):
    field, lo, hi = STREAM_WIDTHS[block]
    assert getattr(_config_with(field, lo), field) == lo
    assert getattr(_config_with(field, hi), field) == hi
    for outside in (lo - 1, hi + 1):
        with pytest.raises(ConfigError):
            _config_with(field, outside)


# ---- the reference is the document -----------------------------------------------------------


def test_reference_gives_the_documents_example():
    assert ref_pack([1, -2, 3], 4) == bytes([0xE1, 0x03])
    assert ref_unpack(bytes([0xE1, 0x03]), 4, 3) == [1, -2, 3]


def test_reference_chunk_sizes_are_the_documents_examples():
    assert [ref_chunk_words(w) for w in (16, 36, 56)] == [504, 224, 144]


# ---- the fast packing against the reference --------------------------------------------------


def extremes(w: int) -> list[int]:
    lo, hi = -(1 << (w - 1)), (1 << (w - 1)) - 1
    return [lo, hi, -1, 0, 1, lo + 1, hi - 1]


def values_for(w: int, count: int, rng) -> list[int]:
    """``count`` words: the extremes of ``w`` bits first, then uniformly random ones."""
    lo, hi = -(1 << (w - 1)), (1 << (w - 1)) - 1
    ext = extremes(w)
    rnd = [int(x) for x in rng.integers(lo, hi, size=max(0, count - len(ext)), endpoint=True)]
    return (ext + rnd)[:count]


def lengths_for(w: int) -> list[int]:
    """Short blocks around whole bytes, and one chunk's length ± 1."""
    n = ref_chunk_words(w)
    return sorted({0, 1, 2, 3, 7, 8, 9, 15, 16, 17, n - 1, n, n + 1})


@pytest.mark.parametrize("w", WIDTHS)
def test_pack_and_unpack_equal_the_reference(w):
    rng = np.random.default_rng(w)
    for count in lengths_for(w):
        values = values_for(w, count, rng)
        ref = ref_pack(values, w)
        assert wire.pack_words(values, w) == ref, f"pack, {count} words"
        assert wire.packed_len(count, w) == len(ref)
        assert wire.unpack_words(ref, w, count).tolist() == values, f"unpack, {count} words"
        assert ref_unpack(ref, w, count) == values


@pytest.mark.parametrize("w", WIDTHS)
def test_unpack_ignores_the_padding(w):
    rng = np.random.default_rng(1000 + w)
    for count in (1, 3, 5, 7):
        pad = -count * w % 8
        if not pad:
            continue
        values = values_for(w, count, rng)
        data = bytearray(ref_pack(values, w))
        data[-1] |= ((1 << pad) - 1) << (8 - pad)       # the pad bits are the last byte's top bits
        assert wire.unpack_words(bytes(data), w, count).tolist() == values


@pytest.mark.parametrize("w", WIDTHS)
def test_values_outside_the_width_are_refused(w):
    lo, hi = -(1 << (w - 1)), (1 << (w - 1)) - 1
    for bad in (lo - 1, hi + 1):
        with pytest.raises(ValueError):
            ref_pack([bad], w)
        with pytest.raises(ValueError):
            wire.pack_words([0, bad], w)


@pytest.mark.parametrize("w", WIDTHS)
def test_chunks_equal_the_reference(w):
    """What the host sends and the protocol model replies (split_chunks) and what both
    decode (join_chunks), for blocks of one chunk ± 1 and of several chunks."""
    rng = np.random.default_rng(2000 + w)
    n = ref_chunk_words(w)
    assert protocol.chunk_words(w) == n
    assert n * w % 8 == 0, "a full chunk is a whole number of bytes"
    for count in (1, n - 1, n, n + 1, 2 * n + 5):
        values = values_for(w, count, rng)
        ref = ref_split(values, w)
        assert all(len(c) <= protocol.CHUNK_DATA_MAX for c in ref)
        assert wire.split_chunks(values, w) == ref, f"{count} words"
        assert protocol.chunk_count(count, w) == len(ref)
        assert wire.join_chunks(ref, count, w).tolist() == values, f"{count} words"
