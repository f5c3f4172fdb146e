"""The one definition of hel-fpga's integer formats and core configuration.

Everything that turns the float model of docs/design.md §1 into integers lives
here (docs/design.md §2 describes the format): the golden model
(``hel_fpga.sim.golden``), the gateware (``hel_fpga.rtl``) and the host
(``hel_fpga.host``) import these numbers and functions and never re-derive them.

The integer model ("w-form")
----------------------------
Positions ``Q = q·2^SF`` and scaled momenta ``Wv = (δ/2)·p·2^SF`` are signed
``state_width``-bit integers with ``SF = state_frac`` fractional bits. One leapfrog
step with input ``u`` is three integer shears::

    QH  = wrap(Q + Wv)                       # half drift, exact
    Wv' = wrap(Wv − kick(QH, u))             # kick, the only rounding
    Q'  = wrap(QH + Wv')                     # half drift, exact

Each shear is invertible for any deterministic ``kick``, so flipping ``Wv`` and
replaying the inputs backwards returns to the initial state bit for bit. The
state wraps (two's complement) rather than saturating because wrapping is a
bijection; any wrap raises a sticky overflow flag.

The kick only sees a *truncation* of ``QH`` (``operand``): the multiplier
operands are ``operand_width`` bits (16 on iCE40's SB_MAC16, 18 on ECP5's
MULT18X18D) while precision lives in the wide state::

    qo  = sat(rshift(QH, SF − OF))                    operand format (OF frac bits)
    Z   = W·qo + B·u + (b << OF)                      exact, PF+OF frac bits
    a   = tanh_pwl(sat(rshift(Z, PF+OF − ZF)))        activation format (AF frac bits)
    F   = ((α⊙qo) << (AF − OF)) + Wᵀ·a                exact, PF+AF frac bits
    kick = rshift(F, PF + AF + 2·dt_log2 + 1 − SF)    κ·f in state units, κ = δ²/2

The activation format has its own, finer scale (|tanh| ≤ 1 needs two integer
bits, positions need more): the ±ε contrast of ∂V/∂B and ∂V/∂b is the
difference of two activations, so their resolution sets the gradient's noise
floor. On final-step losses AF = OW − 2 gives a several-fold smaller
worst-case gradient error than AF = OF, at no hardware cost.

``rshift`` rounds half up (add half, arithmetic shift): deterministic and
unbiased enough, and one adder in hardware. ``sat`` saturates; it is allowed
on these intermediates because they are functions of ``QH`` only.

The local learning quantities are products of operands (exact integers):
``∂V/∂W ∝ a·qoᵀ``, ``∂V/∂B ∝ a·uᵀ``, ``∂V/∂b ∝ a``, ``∂V/∂α ∝ qo⊙qo``; the
accumulators sum them (or their ±ε difference, per step) in ``acc_width``-bit
wrapping registers with a sticky flag. :class:`HelConfig` converts them to
gradients (:meth:`HelConfig.gradients_from_accumulators`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np

from hel_fpga.spec.names import PARAM_NAMES

__all__ = [
    "ConfigError", "FormatError", "Fixed", "HelConfig", "ENGINES_MAX",
    "rshift_round", "saturate", "wrap",
]



#: Most sample engines of one device (:attr:`HelConfig.engines`).
ENGINES_MAX = 16


class ConfigError(ValueError):
    """An impossible or unsupported core configuration."""


class FormatError(ValueError):
    """A value that does not fit the integer format it is converted into."""


# --- integer primitives shared by the golden model and the gateware's reference tests

def wrap(x, width: int):
    """Two's-complement wrap of ``x`` to ``width`` bits (NumPy int64 or Python int)."""
    half = 1 << (width - 1)
    if isinstance(x, np.ndarray):
        return ((x + half) & ((1 << width) - 1)) - half
    return ((int(x) + half) & ((1 << width) - 1)) - half


def saturate(x, width: int):
    """Clamp ``x`` to the signed ``width``-bit range."""
    lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
    if isinstance(x, np.ndarray):
        return np.clip(x, lo, hi)
    return min(max(int(x), lo), hi)


def rshift_round(x, shift: int):
    """``x · 2^-shift`` rounded half up (``shift`` ≤ 0 is an exact left shift)."""
    if shift <= 0:
        return x << -shift
    return (x + (1 << (shift - 1))) >> shift


@dataclass(frozen=True)
class Fixed:
    """A signed fixed-point format: ``width`` bits, ``frac`` of them fractional."""

    width: int
    frac: int

    @property
    def min_int(self) -> int:
        return -(1 << (self.width - 1))

    @property
    def max_int(self) -> int:
        return (1 << (self.width - 1)) - 1

    @property
    def scale(self) -> float:
        return float(1 << self.frac) if self.frac >= 0 else 2.0 ** self.frac

    @property
    def max_value(self) -> float:
        return self.max_int / self.scale

    def quantize(self, x, what: str = "value") -> np.ndarray:
        """Round float(s) to this format; raise :class:`FormatError` if out of range."""
        arr = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise FormatError(f"{what} contains NaN or infinity")
        q = np.rint(arr * self.scale)
        if q.size and (q.min() < self.min_int or q.max() > self.max_int):
            worst = float(np.abs(arr).max())
            raise FormatError(
                f"{what} does not fit the {self.width}-bit format with {self.frac} "
                f"fractional bits (|value| up to {worst:.4g}, format range "
                f"±{self.max_value:.4g})")
        return q.astype(np.int64)

    def to_float(self, x) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) / self.scale

    def check_int(self, x, what: str = "value") -> np.ndarray:
        """Validate integer(s) against this format's range; return them as int64."""
        arr = np.asarray(x)
        if arr.dtype.kind not in "iu":
            raise FormatError(f"{what} must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64)
        if arr.size and (arr.min() < self.min_int or arr.max() > self.max_int):
            raise FormatError(
                f"{what} out of range for {self.width}-bit signed integers "
                f"[{self.min_int}, {self.max_int}]")
        return arr


def _ceil_log2(x: int) -> int:
    return max(0, math.ceil(math.log2(x))) if x > 1 else 0


@dataclass(frozen=True)
class HelConfig:
    """Shape and number formats of one HEL core.

    Parameters
    ----------
    n, m, k, o:
        Oscillators, hidden units (rows of W), inputs, outputs (the last ``o``
        oscillators are the outputs).
    t_max:
        Longest input sequence the sequence buffer holds.
    state_width, state_frac:
        Width and fractional bits of the wrapping state ``Q``/``Wv``.
    operand_width, operand_frac:
        Multiplier operand format of the truncated positions and of the inputs.
        16 for iCE40 (SB_MAC16), 18 for ECP5 (MULT18X18D).
    act_frac:
        Fractional bits of the tanh outputs (``operand_width`` bits, |a| ≤ 1).
    param_frac:
        Fractional bits of W, B, b, α (stored at ``operand_width`` bits).
    dt_log2:
        Time step δ = 2^-dt_log2.
    tanh_range_log2, tanh_segments_log2, z_frac:
        The tanh unit saturates z to [-2^r, 2^r) with ``z_frac`` fractional bits
        and interpolates linearly between 2^s + 1 knots.
    acc_width:
        Width of the contrast accumulators (wrapping, sticky flag).
    lanes:
        MAC lanes of the gateware (P); not used by the golden model's arithmetic.
    store_words:
        Operand words of the on-chip training store (docs/onchip.md); 0 = the
        device has no on-chip training. Not used by the core's arithmetic.
    engines:
        Sample engines of the on-chip training loop (C): the samples of a batch run
        on C cores at once, each accumulating its own contrast; the batch's
        gradient is their sum (docs/onchip.md "Sample engines"). 1 without a
        store.
    """

    n: int = 16
    m: int = 16
    k: int = 2
    o: int = 1
    t_max: int = 256
    state_width: int = 36
    state_frac: int = 28
    operand_width: int = 16
    operand_frac: int = 13
    act_frac: int = 14
    param_frac: int = 12
    dt_log2: int = 3
    tanh_range_log2: int = 3
    tanh_segments_log2: int = 10
    z_frac: int = 12
    acc_width: int = 56
    lanes: int = 1
    store_words: int = 0
    engines: int = 1

    def __post_init__(self):
        self.validate()

    # ---- validation -------------------------------------------------------------
    def validate(self) -> None:
        problems: list[str] = []
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"{f.name} must be an integer, got {v!r}")
        for name in ("n", "m", "k", "o", "t_max", "lanes"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be ≥ 1 (got {getattr(self, name)})")
        if self.o > self.n:
            problems.append(f"o = {self.o} outputs cannot exceed n = {self.n} oscillators")
        if not 8 <= self.state_width <= 48:
            problems.append(f"state_width must be in 8..48 (got {self.state_width})")
        if not 0 < self.state_frac < self.state_width - 1:
            problems.append(f"state_frac must be in 1..state_width-2 (got {self.state_frac})")
        if not 4 <= self.operand_width <= 25:
            problems.append(f"operand_width must be in 4..25 (got {self.operand_width})")
        if not 0 < self.operand_frac < self.operand_width - 1:
            problems.append(f"operand_frac must be in 1..operand_width-2 (got {self.operand_frac})")
        if not self.operand_frac <= self.act_frac <= self.operand_width - 2:
            problems.append(f"act_frac must be in operand_frac..operand_width-2 (got {self.act_frac})")
        if not 0 < self.param_frac < self.operand_width - 1:
            problems.append(f"param_frac must be in 1..operand_width-2 (got {self.param_frac})")
        if self.operand_frac > self.state_frac:
            problems.append("operand_frac cannot exceed state_frac (operands truncate the state)")
        if not 1 <= self.dt_log2 <= 12:
            problems.append(f"dt_log2 must be in 1..12 (got {self.dt_log2})")
        if not 0 <= self.tanh_range_log2 <= 5:
            problems.append(f"tanh_range_log2 must be in 0..5 (got {self.tanh_range_log2})")
        if not 1 <= self.tanh_segments_log2 <= 12:
            problems.append(f"tanh_segments_log2 must be in 1..12 (got {self.tanh_segments_log2})")
        if self.z_frac < 0 or self.z_frac > self.param_frac + self.operand_frac:
            problems.append("z_frac must be in 0..param_frac+operand_frac")
        elif self.tanh_segments_log2 > self.z_width - 1:
            problems.append("tanh_segments_log2 exceeds the resolution of the z format")
        if self.lanes > max(self.n, self.m):
            problems.append(f"lanes = {self.lanes} exceeds max(n, m) = {max(self.n, self.m)}")
        if self.t_max > 1 << 20:
            problems.append(f"t_max must be ≤ 2^20 (got {self.t_max})")
        if not 0 <= self.store_words <= 1 << 24:
            problems.append(f"store_words must be in 0..2^24 (got {self.store_words})")
        elif self.store_words and self.operand_width < 16:
            problems.append("on-chip training (store_words > 0) needs operand_width ≥ 16 "
                            "(its setup words are 16 bits)")
        if not 1 <= self.engines <= ENGINES_MAX:
            problems.append(f"engines must be in 1..{ENGINES_MAX} (got {self.engines})")
        elif self.engines > 1 and not self.store_words:
            problems.append("engines > 1 needs an on-chip training store (store_words > 0)")
        need = self.acc_min_width
        if not need <= self.acc_width <= 63:
            problems.append(
                f"acc_width must be in {need}..63 for t_max = {self.t_max} "
                f"(got {self.acc_width})")
        if problems:
            raise ConfigError("invalid HEL configuration: " + "; ".join(problems))

    # ---- derived formats --------------------------------------------------------
    @property
    def state(self) -> Fixed:
        return Fixed(self.state_width, self.state_frac)

    @property
    def operand(self) -> Fixed:
        return Fixed(self.operand_width, self.operand_frac)

    @property
    def act(self) -> Fixed:
        return Fixed(self.operand_width, self.act_frac)

    @property
    def param(self) -> Fixed:
        return Fixed(self.operand_width, self.param_frac)

    @property
    def z_width(self) -> int:
        """Bits of the saturated tanh argument (range ±2^tanh_range_log2)."""
        return self.z_frac + self.tanh_range_log2 + 1

    @property
    def z(self) -> Fixed:
        return Fixed(self.z_width, self.z_frac)

    @property
    def product_frac(self) -> int:
        """Fractional bits of a parameter × operand product (the z sums)."""
        return self.param_frac + self.operand_frac

    @property
    def force_frac(self) -> int:
        """Fractional bits of the force sum (parameter × activation products)."""
        return self.param_frac + self.act_frac

    @property
    def alpha_shift(self) -> int:
        """Left shift aligning α·qo with Wᵀ·a in the force sum."""
        return self.act_frac - self.operand_frac

    @property
    def z_shift(self) -> int:
        return self.product_frac - self.z_frac

    @property
    def kick_shift(self) -> int:
        """Right shift taking the force sum to κ·f in state units."""
        return self.force_frac + 2 * self.dt_log2 + 1 - self.state_frac

    @property
    def operand_shift(self) -> int:
        return self.state_frac - self.operand_frac

    @property
    def tanh_frac_bits(self) -> int:
        """Low bits of the offset z that interpolate inside one tanh segment."""
        return self.z_width - self.tanh_segments_log2

    @property
    def dt(self) -> float:
        return 2.0 ** -self.dt_log2

    @property
    def acc_min_width(self) -> int:
        """Narrowest accumulator that holds one sample of t_max steps in any mode."""
        return 2 * self.operand_width + 1 + _ceil_log2(self.t_max) + 1

    @property
    def acc_safe_samples(self) -> int:
        """Samples of t_max steps that can accumulate before the flag may be raised."""
        return 1 << (self.acc_width - self.acc_min_width)

    @property
    def macs_forward_step(self) -> int:
        """Multiply-accumulates of one forward step (z, then force)."""
        return self.m * (self.n + self.k) + self.n * (self.m + 1)

    @property
    def macs_echo_step(self) -> int:
        """MACs of one centred echo step: two banks' steps and their contrast."""
        contrast = self.m * (self.n + self.k) + self.n
        return 2 * self.macs_forward_step + 2 * contrast

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"W": (self.m, self.n), "B": (self.m, self.k), "b": (self.m,),
                "alpha": (self.n,)}

    # ---- tanh ---------------------------------------------------------------------
    def tanh_knots(self) -> np.ndarray:
        """The 2^s + 1 knots of the piecewise-linear tanh, activation format, int64.

        Knot i sits at z = -2^r + i·2^(r+1-s). Built once here; the golden model and
        the gateware's ROM both use this table.
        """
        r, s = self.tanh_range_log2, self.tanh_segments_log2
        zs = -(2.0 ** r) + np.arange((1 << s) + 1) * 2.0 ** (r + 1 - s)
        return self.act.quantize(np.tanh(zs), "tanh knots")

    def tanh_int(self, zt: np.ndarray, knots: np.ndarray | None = None) -> np.ndarray:
        """Integer piecewise-linear tanh of saturated z (``z`` format) → activation format."""
        if knots is None:
            knots = self.tanh_knots()
        fb = self.tanh_frac_bits
        off = zt + (1 << (self.z_width - 1))
        idx = off >> fb
        frac = off & ((1 << fb) - 1)
        lo = knots[idx]
        hi = knots[idx + 1]
        return lo + rshift_round((hi - lo) * frac, fb)

    # ---- float ↔ integer conversions used by the host ----------------------------
    def quantize_params(self, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
        out = {}
        shapes = self.param_shapes()
        for name in PARAM_NAMES:
            if name not in params:
                raise FormatError(f"parameter {name} is missing")
            arr = np.asarray(params[name], dtype=np.float64)
            if arr.shape != shapes[name]:
                raise FormatError(
                    f"parameter {name} has shape {arr.shape}, expected {shapes[name]}")
            out[name] = self.param.quantize(arr, f"parameter {name}")
        return out

    def params_to_float(self, iparams: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: self.param.to_float(iparams[name]) for name in PARAM_NAMES}

    def quantize_inputs(self, u) -> np.ndarray:
        arr = np.asarray(u, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != self.k:
            raise FormatError(f"inputs must have shape (T, {self.k}), got {arr.shape}")
        if not 1 <= arr.shape[0] <= self.t_max:
            raise FormatError(f"sequence length {arr.shape[0]} is outside 1..t_max = {self.t_max}")
        return self.operand.quantize(arr, "inputs")

    def nudges(self, grad_out, eps: float) -> np.ndarray:
        """Integer nudges ν = round((δ/2)·ε·∂ℓ/∂ŷ·2^SF) for the echo.

        ``grad_out`` is (T, O): row t is ∂ℓ/∂ŷ_{t+1} of forward step t (zero off
        the loss steps). The result is in echo order: row s is applied before
        echo step s, i.e. it nudges with the gradient of forward step T−1−s.
        """
        g = np.asarray(grad_out, dtype=np.float64)
        if g.ndim != 2 or g.shape[1] != self.o:
            raise FormatError(f"output gradients must have shape (T, {self.o}), got {g.shape}")
        return self.state.quantize(g[::-1] * (self.dt / 2) * eps, "nudges")

    def gradients_from_accumulators(self, acc: Mapping[str, np.ndarray], eps: float,
                                    centred: bool = True) -> dict[str, np.ndarray]:
        """Scale accumulated contrasts to ∇θL ≈ −δ·ΔG/(cε), c = 2 centred, 1 one-sided."""
        c = 2.0 if centred else 1.0
        of, af = self.operand_frac, self.act_frac
        scale = {"W": 2.0 ** (-of - af), "B": 2.0 ** (-of - af), "b": 2.0 ** (-af),
                 "alpha": 0.5 * 2.0 ** (-2 * of)}
        return {name: -self.dt * np.asarray(acc[name], dtype=np.float64) * scale[name] / (c * eps)
                for name in PARAM_NAMES}

    def outputs_to_float(self, y_int) -> np.ndarray:
        return self.state.to_float(y_int)

    # ---- serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}")
        return cls(**dict(d))

    @classmethod
    def from_json(cls, text: str) -> "HelConfig":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"configuration is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError("configuration JSON must be an object")
        return cls.from_dict(d)

    @classmethod
    def load(cls, path) -> "HelConfig":
        with open(path) as f:
            return cls.from_json(f.read())

    def replace(self, **changes) -> "HelConfig":
        return dataclasses.replace(self, **changes)


#: Operand width per DSP family (the config's operand_width on each FPGA).
ICE40_OPERAND = dict(operand_width=16, operand_frac=13, act_frac=14, param_frac=12, z_frac=12)
ECP5_OPERAND = dict(operand_width=18, operand_frac=15, act_frac=16, param_frac=14, z_frac=14)
