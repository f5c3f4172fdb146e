"""Names every layer shares, and the self-test generator's arithmetic.

Their order is part of the protocol (a bank or estimator travels as its index
here, parameters as a bit of a mask in :data:`PARAM_NAMES` order), so the golden
model, the float references, the gateware, the protocol model and the host all
import them from here.
"""

from __future__ import annotations

__all__ = ["PARAM_NAMES", "BANKS", "ESTIMATORS", "MIX32_ROUNDS", "MIX32_FINAL_SHIFT", "mix32"]

#: Parameter arrays in their canonical order (memories, wire format, checkpoints).
PARAM_NAMES = ("W", "B", "b", "alpha")

#: State banks: the forward pass, the +ε echo and the −ε echo (READ_STATE codes).
BANKS = ("fwd", "pos", "neg")

#: Echo estimators (FORWARD codes): centred (±ε, O(ε²)) and one-sided (+ε against
#: the forward state, O(ε)).
ESTIMATORS = ("centred", "one-sided")

#: mix32's rounds, each ``x ^= x >> s`` then ``x += x << m`` (mod 2³²) for (s, m)
#: in order, then ``x ^= x >> MIX32_FINAL_SHIFT``: shifts and adds only, so the
#: gateware needs no multiplier for it.
MIX32_ROUNDS = ((16, 5), (7, 3), (13, 11))
MIX32_FINAL_SHIFT = 15

_M32 = 0xFFFF_FFFF


def mix32(x):
    """A multiplier-free 32-bit mixing function: the self-test's counter-based generator.

    Input ``k`` of step ``t`` is ``mix32(seed ^ (t·K + k))``, so the echo regenerates
    the inputs in reverse order from a down-counter with no stored sequence. Works on
    Python ints and on NumPy uint64 arrays.
    """
    x = x & _M32
    for s, m in MIX32_ROUNDS:
        x ^= x >> s
        x = (x + (x << m)) & _M32
    return x ^ (x >> MIX32_FINAL_SHIFT)
