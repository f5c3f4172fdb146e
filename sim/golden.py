"""The integer golden model: the bit-exact specification of the HEL core.

:class:`GoldenCore` exposes exactly the operations the gateware implements (and
the serial protocol carries): write/read parameters, load an input sequence,
forward, echo, read/clear accumulators, read state, status flags and self-test.
All arithmetic is NumPy ``int64`` on the formats of :mod:`hel_fpga.spec.formats`; no float
enters the integer path (floats appear only in :mod:`hel_fpga.spec.formats`'s table builder
and the host-side conversions). docs/design.md §2 describes the format and why
it is reversible.

Operation semantics (shared with the gateware)
----------------------------------------------
* ``forward(estimator)`` clears the state to zero and runs one leapfrog step per
  loaded input, returning the output positions ``Q[N−O:]`` after every step. With
  ``estimator="one-sided"`` it also subtracts the local quantities at every
  half-step position from the accumulators (the un-nudged echo visits the same
  half-step positions bit for bit, so this is −G(0)).
* ``echo(nudges)`` flips the momenta into the echo bank(s) and replays the inputs
  backwards. Row ``s`` of ``nudges`` (echo order, O integers) is added to the
  output oscillators' ``Wv`` right before echo step ``s`` — ``+ν`` in the +ε bank,
  ``−ν`` in the −ε bank. A single row is a kick before step 0 only (HEB). Centred
  mode runs the two banks in lockstep and adds ``G(+ε) − G(−ε)`` per step;
  one-sided mode runs the +ε bank and adds ``G(+ε)``.
* Accumulators are ``acc_width``-bit wrapping registers updated once per element
  per step; any wrap sets the sticky ``acc_overflow`` flag. Any wrap of the state
  (half drift, kick, nudge, flip of the most negative value) sets ``state_overflow``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hel_fpga.spec.formats import FormatError, HelConfig, rshift_round, saturate, wrap
from hel_fpga.spec.names import ESTIMATORS, PARAM_NAMES, mix32

__all__ = ["GoldenCore", "StateError", "selftest_inputs"]

_M32 = 0xFFFF_FFFF


class StateError(RuntimeError):
    """An operation issued in a state that does not allow it (e.g. ECHO before FORWARD)."""


def selftest_inputs(cfg: HelConfig, steps: int, seed: int) -> np.ndarray:
    """The self-test's pseudo-random inputs, (steps, K) in operand format (|u| ≤ 0.5)."""
    idx = np.arange(steps * cfg.k, dtype=np.uint64)
    h = mix32(idx ^ np.uint64(seed & _M32)).astype(np.int64)
    ow = cfg.operand_width
    raw = wrap(h & ((1 << ow) - 1), ow)
    return (raw >> (ow + 1 - cfg.operand_frac)).reshape(steps, cfg.k)


@dataclass
class Bank:
    """One state bank: positions Q and scaled momenta Wv (state format, int64)."""

    q: np.ndarray
    w: np.ndarray

    def copy(self) -> "Bank":
        return Bank(self.q.copy(), self.w.copy())


class GoldenCore:
    """Bit-exact integer model of one HEL core.

    Parameters
    ----------
    cfg:
        The core configuration (shapes and formats).
    """

    def __init__(self, cfg: HelConfig):
        self.cfg = cfg
        self.knots = cfg.tanh_knots()
        shapes = cfg.param_shapes()
        self.params = {name: np.zeros(shapes[name], dtype=np.int64) for name in PARAM_NAMES}
        self.acc = {name: np.zeros(shapes[name], dtype=np.int64) for name in PARAM_NAMES}
        self.inputs = np.zeros((0, cfg.k), dtype=np.int64)
        self.banks = {name: self._zero_bank() for name in ("fwd", "pos", "neg")}
        self.state_overflow = False
        self.acc_overflow = False
        self._forwarded: str | None = None  # estimator of the last FORWARD, if echo may follow

    # ---- configuration / parameters -----------------------------------------------
    def _zero_bank(self) -> Bank:
        n = self.cfg.n
        return Bank(np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64))

    def write_params(self, **arrays: np.ndarray) -> None:
        """Write any subset of W, B, b, alpha (integers in the parameter format).

        Validates every array before writing any, so a bad write changes nothing.
        """
        shapes = self.cfg.param_shapes()
        checked = {}
        for name, arr in arrays.items():
            if name not in shapes:
                raise FormatError(f"unknown parameter {name!r}")
            a = self.cfg.param.check_int(arr, f"parameter {name}")
            if a.shape != shapes[name]:
                raise FormatError(f"parameter {name} has shape {a.shape}, expected {shapes[name]}")
            checked[name] = a.copy()
        self.params.update(checked)

    def read_params(self) -> dict[str, np.ndarray]:
        return {name: a.copy() for name, a in self.params.items()}

    def load(self, u: np.ndarray) -> None:
        """Load an input sequence (T, K) in operand format, 1 ≤ T ≤ t_max."""
        arr = np.asarray(u)
        if arr.ndim != 2 or arr.shape[1] != self.cfg.k:
            raise FormatError(f"inputs must have shape (T, {self.cfg.k}), got {arr.shape}")
        if not 1 <= arr.shape[0] <= self.cfg.t_max:
            raise FormatError(f"sequence length {arr.shape[0]} is outside 1..{self.cfg.t_max}")
        self.inputs = self.cfg.operand.check_int(arr, "inputs").copy()
        self._forwarded = None

    # ---- the datapath --------------------------------------------------------------
    def _wrap_state(self, x: np.ndarray) -> np.ndarray:
        y = wrap(x, self.cfg.state_width)
        if not self.state_overflow and np.any(y != x):
            self.state_overflow = True
        return y

    def operands(self, qh: np.ndarray) -> np.ndarray:
        """Multiplier operands from half-step positions: rounded, saturated truncation."""
        c = self.cfg
        return saturate(rshift_round(qh, c.operand_shift), c.operand_width)

    def activations(self, qo: np.ndarray, u: np.ndarray) -> np.ndarray:
        """a = tanh_pwl(z), z = W·qo + B·u + b (rows of ``qo`` are banks)."""
        c, p = self.cfg, self.params
        z = qo @ p["W"].T + u @ p["B"].T + (p["b"] << c.operand_frac)
        zt = saturate(rshift_round(z, c.z_shift), c.z_width)
        return c.tanh_int(zt, self.knots)

    def kick(self, qo: np.ndarray, a: np.ndarray) -> np.ndarray:
        """κ·f in state units: rshift((α⊙qo << alpha_shift) + Wᵀa)."""
        p = self.params
        f = ((p["alpha"] * qo) << self.cfg.alpha_shift) + a @ p["W"]
        return rshift_round(f, self.cfg.kick_shift)

    def step(self, q: np.ndarray, w: np.ndarray, u: np.ndarray):
        """One integer leapfrog step of one or more banks (rows) with input ``u``.

        Returns ``(q', w', qo, a)``: the new state plus the operands and
        activations at the half-step position (the local learning quantities).
        """
        qh = self._wrap_state(q + w)
        qo = self.operands(qh)
        a = self.activations(qo, u)
        w2 = self._wrap_state(w - self.kick(qo, a))
        q2 = self._wrap_state(qh + w2)
        return q2, w2, qo, a

    def local_terms(self, qo: np.ndarray, a: np.ndarray, u: np.ndarray) -> dict[str, np.ndarray]:
        """Integer ∂θV of one bank: a·qoᵀ, a·uᵀ, a, qo⊙qo (scaling in hel_fpga.spec.formats)."""
        return {"W": np.outer(a, qo), "B": np.outer(a, u), "b": a, "alpha": qo * qo}

    def _accumulate(self, terms: dict[str, np.ndarray]) -> None:
        aw = self.cfg.acc_width
        for name in PARAM_NAMES:
            s = self.acc[name] + terms[name]
            w = wrap(s, aw)
            if not self.acc_overflow and np.any(w != s):
                self.acc_overflow = True
            self.acc[name] = w

    # ---- operations --------------------------------------------------------------------
    def forward(self, estimator: str = "centred") -> np.ndarray:
        """Run the loaded sequence from the zero state; return outputs (T, O).

        ``estimator="one-sided"`` also accumulates −G(0) for a one-sided echo.
        """
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if len(self.inputs) == 0:
            raise StateError("FORWARD needs a loaded input sequence")
        c = self.cfg
        bank = self._zero_bank()
        q, w = bank.q[None], bank.w[None]
        out = np.empty((len(self.inputs), c.o), dtype=np.int64)
        for t, u in enumerate(self.inputs):
            q, w, qo, a = self.step(q, w, u[None])
            if estimator == "one-sided":
                self._accumulate({k: -v for k, v in self.local_terms(qo[0], a[0], u).items()})
            out[t] = q[0, c.n - c.o:]
        self.banks["fwd"] = Bank(q[0], w[0])
        self._forwarded = estimator
        return out

    def echo(self, nudges: np.ndarray) -> np.ndarray:
        """Run the echo(es) of the last forward pass with integer nudges.

        ``nudges`` is (T, O) in echo order, or (1, O) for a single kick (HEB).
        Returns the output positions of each echo bank after every step,
        shape (banks, T, O): banks = 2 (+ε, −ε) centred, 1 one-sided.
        """
        if self._forwarded is None:
            raise StateError("ECHO needs a FORWARD of the loaded sequence first")
        c = self.cfg
        t_len = len(self.inputs)
        nu = np.asarray(nudges)
        if nu.ndim != 2 or nu.shape[1] != c.o or nu.shape[0] not in (1, t_len):
            raise FormatError(f"nudges must have shape ({t_len}, {c.o}) or (1, {c.o}), got {nu.shape}")
        nu = c.state.check_int(nu, "nudges")
        centred = self._forwarded == "centred"
        signs = np.array([1, -1] if centred else [1], dtype=np.int64)[:, None]
        fwd = self.banks["fwd"]
        q = np.repeat(fwd.q[None], len(signs), axis=0)
        # Flip = integer negation; only the most negative value wraps.
        w = self._wrap_state(np.repeat(-fwd.w[None], len(signs), axis=0))
        out = np.empty((len(signs), t_len, c.o), dtype=np.int64)
        lo = c.n - c.o
        for s in range(t_len):
            if s < len(nu):
                w[:, lo:] = self._wrap_state(w[:, lo:] + signs * nu[s])
            u = self.inputs[t_len - 1 - s]
            q, w, qo, a = self.step(q, w, u[None])
            terms = self.local_terms(qo[0], a[0], u)
            if centred:
                neg = self.local_terms(qo[1], a[1], u)
                terms = {k: terms[k] - neg[k] for k in PARAM_NAMES}
            self._accumulate(terms)
            out[:, s] = q[:, lo:]
        self.banks["pos"] = Bank(q[0], w[0])
        if centred:
            self.banks["neg"] = Bank(q[1], w[1])
        self._forwarded = None
        return out

    def read_accumulators(self) -> dict[str, np.ndarray]:
        return {name: a.copy() for name, a in self.acc.items()}

    def clear_accumulators(self) -> None:
        for a in self.acc.values():
            a[:] = 0
        self.acc_overflow = False

    def read_state(self, bank: str = "fwd") -> Bank:
        return self.banks[bank].copy()

    def clear_flags(self) -> None:
        self.state_overflow = False
        self.acc_overflow = False

    def selftest(self, steps: int, seed: int = 1) -> bool:
        """Forward ``steps`` pseudo-random inputs from zero, flip, un-nudged echo.

        Passes when the state returns bit-exactly to zero. Uses the fwd bank and
        the current parameters; the accumulators and the loaded sequence are kept.
        """
        if steps < 1:
            raise FormatError("selftest needs at least one step")
        u = selftest_inputs(self.cfg, steps, seed)
        q = np.zeros((1, self.cfg.n), dtype=np.int64)
        w = q.copy()
        for t in range(steps):
            q, w, _, _ = self.step(q, w, u[t][None])
        w = self._wrap_state(-w)
        for t in range(steps - 1, -1, -1):
            q, w, _, _ = self.step(q, w, u[t][None])
        self.banks["fwd"] = Bank(q[0], w[0])
        self._forwarded = None
        return bool(np.all(q == 0) and np.all(w == 0))
