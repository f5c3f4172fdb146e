"""Frame corruption shared by the fuzz tests of the protocol model and the simulated board."""

import random


def corrupt(rng: random.Random, frame: bytes, *, max_garbage: int) -> bytes:
    """``frame`` (an encoded frame without its delimiter) damaged in one of four ways:
    1–3 flipped bits, truncation, replacement by 1..``max_garbage`` random bytes, or a
    burst of up to 4 random bytes. No delimiter is appended."""
    frame = bytearray(frame)
    kind = rng.randrange(4)
    if kind == 0:                                    # flip 1..3 bits
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(frame))
            frame[i] ^= 1 << rng.randrange(8)
    elif kind == 1:                                  # truncate
        del frame[rng.randrange(len(frame)):]
    elif kind == 2:                                  # garbage
        frame = bytearray(rng.randrange(256) for _ in range(rng.randrange(1, max_garbage)))
    else:                                            # a burst of random bytes
        i = rng.randrange(len(frame))
        for j in range(i, min(len(frame), i + rng.randint(1, 4))):
            frame[j] = rng.randrange(256)
    return bytes(frame)
