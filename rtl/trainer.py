"""On-chip training gateware: the optimiser unit and the loss unit (docs/onchip.md).

Both are standalone ``wiring.Component`` s with ``amaranth.lib.stream`` ports
(``sink`` in, ``source`` out), bit-exact with :mod:`hel_fpga.sim.onchip`; the
training controller that feeds them from the core and the memories is a
separate unit. Formats and settings come from :mod:`hel_fpga.spec.training`.

:class:`OptimiserUnit` — one parameter element per beat, after each batch:
``gradient_from_acc`` → ``lion_step`` / ``sgdm_step`` → ``requantize``.

:class:`LossUnit` — one FORWARD output word per beat, as the core streams them
(step ``t`` = 0, 1, …, T−1, and within a step outputs ``o`` = 0 … O−1, i.e.
oscillators N−O … N−1): the nudge word and the squared error of ``sample_nudges``,
the argmax and correct flag of the final step, and the running metrics of
:class:`hel_fpga.sim.onchip.Metrics`.

Shared techniques
-----------------
* **Rounding shifts by a run-time amount without a rounding constant.**
  ``rshift_round(x, s) = (x + 2^(s−1)) >> s`` needs a decoded half. For
  ``s ≥ 1`` it equals ``((x >> (s − 1)) + 1) >> 1`` (write ``x = q·2^(s−1) + r``:
  both are ``⌊(q + 1)/2⌋``), so the barrel shifter shifts by ``s − 1`` and a
  fixed increment and one-bit shift finish the rounding. A negative ``s`` (an
  exact left shift) joins the same shifter by pre-shifting the operand left by
  the largest left shift ``L`` plus one and shifting right by ``s + L``: one
  shifter, one direction, for both signs, and ``(2y + 1) >> 1 = y`` makes the
  increment harmless for left shifts. The increment often folds into the next
  adder: ``m + ((r + 1) >> 1) = ((2m + 1) + r) >> 1`` and
  ``θ − ((r + 1) >> 1) = (2θ − r) >> 1``.
* **Saturation before the increment.** ``sat((r + 1) >> 1, w)`` equals
  ``sat((sat(r, w + 1) + 1) >> 1, w)``: clamping the wide shifted value to
  ``w + 1`` bits keeps every out-of-range value out of range on the same side,
  and the final clamp only meets ``2^(w−1)`` (from ``r = 2^w − 1``). The wide
  shifters saturate as they shift (:func:`shift_right_saturate`); the other
  saturations use :func:`hel_fpga.rtl.tanh.saturate_signed` (a test of the top
  bits, not two wide comparators).
* **Flow control.** Each pipeline stage has a valid bit and advances when it is
  empty or the next stage advances (``en_i = ~v_i | en_{i+1}``,
  ``en_last = ~v_last | source.ready``, ``sink.ready = en_0``): a stalled output
  holds every full stage, bubbles are squeezed out, and one beat per cycle flows
  when the output is ready. ``sink.ready`` depends combinationally on
  ``source.ready`` (a handful of gates; allowed by the stream rules, and no
  ``valid`` depends on a ``ready``). Datapath registers have no reset; only the
  valid bits do.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for

from hel_fpga.rtl.tanh import saturate_signed
from hel_fpga.spec.formats import HelConfig
from hel_fpga.spec.names import PARAM_NAMES
from hel_fpga.spec.training import (BATCH_LOG2_RANGE, BETA_LOG2_RANGE, COUNT_WIDTH, EPS_LOG2_RANGE,
                                    LOSS_KINDS, LOSS_SUM_WIDTH, LR_SHIFT_RANGE, OPTIMIZERS,
                                    TrainFormats)

__all__ = ["Optimizer", "LossKind", "ParamArray", "OptimiserUnit", "LossUnit", "shift_right_saturate"]


class Optimizer(enum.Enum, shape=1):
    """``TrainConfig.optimizer``, numbered as :data:`hel_fpga.spec.training.OPTIMIZERS`."""
    SGDM = 0
    LION = 1


class LossKind(enum.Enum, shape=1):
    """``TrainConfig.loss``, numbered as :data:`hel_fpga.spec.training.LOSS_KINDS`."""
    MSE = 0
    ONEHOT = 1


class ParamArray(enum.Enum, shape=2):
    """The parameter array of an optimiser beat, numbered as :data:`PARAM_NAMES`."""
    W = 0
    B = 1
    b = 2
    alpha = 3


assert [o.lower() for o in OPTIMIZERS] == [o.name.lower() for o in Optimizer]
assert [k.lower() for k in LOSS_KINDS] == [k.name.lower() for k in LossKind]
assert list(PARAM_NAMES) == [a.name for a in ParamArray]

# The units' shifters are sized for the setting ranges of hel_fpga.spec.training
# (EPS_LOG2_RANGE, BATCH_LOG2_RANGE, BETA_LOG2_RANGE, LR_SHIFT_RANGE); Lion also
# needs lr_shift ≤ MF, which TrainConfig.check_for enforces.


def _pipeline(m: Module, sink, source, depth: int):
    """Valid bits and stage enables of a ``depth``-stage pipeline between two streams
    (the module docstring's flow control). Returns (valid, enable) lists."""
    v = [Signal(name=f"v{i}") for i in range(depth)]
    en = [Signal(name=f"en{i}") for i in range(depth)]
    m.d.comb += en[-1].eq(~v[-1] | source.ready)
    for i in range(depth - 1):
        m.d.comb += en[i].eq(~v[i] | en[i + 1])
    m.d.comb += [sink.ready.eq(en[0]), source.valid.eq(v[-1])]
    for i in range(depth):
        with m.If(en[i]):
            m.d.sync += v[i].eq(sink.valid if i == 0 else v[i - 1])
    return v, en


def shift_right_saturate(m: Module, x, amount, amount_max: int, width: int, name: str) -> Signal:
    """``sat(x >> amount, width)`` (arithmetic) for ``0 ≤ amount ≤ amount_max``, as a
    logarithmic shifter that shifts by the largest power first.

    After the stage that shifts by 2^j, at most 2^j − 1 more bit positions can
    come down, so only the low ``width + 2^j − 1`` bits can still reach the
    ``width``-bit result: every stage keeps just those, and the bits it drops
    only decide the saturation (the result fits iff every dropped bit and the
    result's top bit equal the sign of ``x``). Yosys' generic shifter keeps the
    full width in every stage and needs a wide saturation test after it; with
    this one the optimiser shrank from 1856 LUT4 + 425 PFUMX to 1306 LUT4 (ECP5).
    """
    xw = len(x)
    sign = x[xw - 1]
    cur = x.as_unsigned()       # bits only: a signed/unsigned Mux would widen
    dropped = []
    for j in reversed(range(max(1, amount_max.bit_length()))):
        sh = 1 << j
        shifted = Cat(cur[sh:], sign.replicate(min(sh, len(cur)))) if sh < len(cur) \
            else sign.replicate(len(cur))
        nxt = Signal(len(cur), name=f"{name}_s{j}")      # a signal per stage: no tree
        m.d.comb += nxt.eq(Mux(amount[j], shifted, cur))
        keep = min(len(cur), width + sh - 1)
        if keep < len(cur):
            dropped.append(nxt[keep:])
        cur = nxt[:keep]
    out = Signal(signed(width), name=name)
    if len(cur) < width:        # narrow input: nothing can overflow
        m.d.comb += out.eq(Cat(cur, sign.replicate(width - len(cur))).as_signed())
        return out
    bad = Cat(*dropped, cur[width - 1]) if dropped else cur[width - 1]
    fits = Signal(name=f"{name}_fits")
    m.d.comb += fits.eq(Mux(sign, bad.all(), ~bad.any()))
    lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
    m.d.comb += out.eq(Mux(fits, cur[:width].as_signed(), Mux(sign, lo, hi)))
    return out


def _reg(shape, name):
    return Signal(shape, name=name, reset_less=True)


class OptimiserUnit(wiring.Component):
    """One optimiser step per parameter element, one element per beat.

    For each beat: ``g = shift_saturate(−acc, s_p, MomW)`` with
    ``s_p = TrainFormats.grad_shift(array, eps_log2, batch_log2)``; then Lion
    (``c = EMA_β1(m, g)``, ``θ' = clamp(θ − sign(c)·2^(MF − lr_shift))``,
    ``m' = EMA_β2(m, g)``) or SGD-momentum (``m' = EMA_β(m, g)``,
    ``θ' = clamp(θ − rshift_round(m', lr_shift))``); and ``param =
    sat(rshift_round(θ', 16), OW)``. Exactly ``gradient_from_acc`` →
    ``lion_step`` / ``sgdm_step`` → ``requantize`` of :mod:`hel_fpga.sim.onchip`.

    Ports
    -----
    sink : In(stream of :attr:`in_layout`)
        ``acc`` (signed ``acc_width``), ``master`` θ (master format), ``moment`` m
        (moment format), ``array`` (:class:`ParamArray`, selects the gradient shift).
    source : Out(stream of :attr:`out_layout`)
        ``master`` θ', ``moment`` m', ``param`` (operand width), in input order.
    optimizer : In(:class:`Optimizer`); lr_shift : In(signed(7)); beta_log2, beta2_log2 : In(5)
        Held while beats are in flight (``lr_shift`` is ``lr_shift_at(tc, epoch)``).
    eps_log2, batch_log2 : In(5), In(4)
        Held too; sampled only as a beat enters (they fix its gradient shift).
    busy : Out(1)
        A beat is in the pipeline.

    Latency 6 cycles (a beat taken at clock edge i leaves at edge i + 6), one beat
    per cycle. No multiplier: four shifters (the gradient's, 0 … 41 positions at
    the default formats; the two EMAs', 0 … 15; the step's, 0 … 40), adders, clamps.

    Size (Yosys ``synth_ecp5`` and nextpnr-ecp5 out of context on an LFE5U-25F,
    ECP5 formats, 2026-12-07): 1306 LUT4 + 149 CCU2C (1638 TRELLIS_COMB), 667 FF,
    80 MHz; ``synth_ice40`` at the iCEBreaker formats: 1493 LUT4, 265 SB_CARRY,
    627 FF. The shifters are most of the LUTs (their ranges are the settings'
    full ranges); the registers are mostly θ and m travelling with their beat.

    Pipeline
    --------
    ====== ================================================================= =================
    stage  work                                                              registers
    ====== ================================================================= =================
    1      ``x = −acc``; shifter amount ``t = s_p + Lg`` (per array, ≥ 0)    x, t, θ, m
    2      ``r = (x ≪ (Lg+1)) ≫ t`` saturated to MomW + 1 bits               r, θ, m
    3      ``g = sat((r + 1) ≫ 1)``; ``d = g − m``                           d, θ, m
    4      ``c = ((2m+1) + (d ≫ (β1−1))) ≫ 1``: sign and zero;               c±, c≠0, m', θ
           ``m' = ((2m+1) + (d ≫ (β'−1))) ≫ 1``, β' = β2 (Lion) or β
    5      ``u = (w ≪ (Lr+1)) ≫ (lr_shift + Lr)``, w = sign(c)·2^MF (Lion)   u, m', θ
           or m' (sgdm), clamped to MW + 2 bits
    6      ``θ' = sat((2θ − u) ≫ 1, MW)``; ``param = sat((θ' + 2^15) ≫ 16)``  θ', m', param
    ====== ================================================================= =================

    Why these steps are exact (the golden functions' saturations included):

    * EMA: ``m + rshift_round(g − m, s)`` lies between ``m`` and ``g`` for
      ``s ≥ 1``, so with ``m`` and ``g`` in the moment range the golden
      ``sat(·, MomW)`` never acts and m' is the sum's low MomW bits.
    * Lion's step ``sign(c)·2^(MF − lr_shift)`` is ``rshift_round(sign(c)·2^MF,
      lr_shift)`` for ``0 ≤ lr_shift ≤ MF`` (the shifted-out bits are zero), so
      Lion and sgdm share the step shifter and the final subtraction.
    * Step clamp: any step ``y`` with ``y ≥ 2^MW − 1`` or ``y ≤ −2^MW`` takes any θ
      to the same clamp limit, so ``y`` may be saturated to MW + 1 bits first
      (the shifter's output to MW + 2 bits before the folded increment).
    * ``requantize`` saturates for ``θ' ≥ 2^(MW−1) − 2^15`` (it rounds up to
      ``2^(OW−1)``), so the saturation is built, not assumed away.

    The shifters cover the full ranges of :class:`TrainConfig` (``EPS_LOG2_RANGE``,
    ``BATCH_LOG2_RANGE``, ``BETA_LOG2_RANGE``, ``LR_SHIFT_RANGE``); settings outside
    them (which ``TrainConfig`` refuses) give undefined results.
    """

    LATENCY = 6

    def __init__(self, cfg: HelConfig):
        self.cfg = cfg
        self.fm = fm = TrainFormats(cfg)
        self.mw, self.gw, self.mf = fm.master.width, fm.moment.width, fm.master.frac
        self.in_layout = data.StructLayout({
            "acc": signed(cfg.acc_width), "master": signed(self.mw),
            "moment": signed(self.gw), "array": ParamArray})
        self.out_layout = data.StructLayout({
            "master": signed(self.mw), "moment": signed(self.gw),
            "param": signed(cfg.operand_width)})
        # Gradient shifter: s_p = grad_shift(p, 0, 0) − eps + batch over the settings' ranges.
        base = {p: fm.grad_shift(p, 0, 0) for p in PARAM_NAMES}
        s_min = min(base.values()) - EPS_LOG2_RANGE[1] + BATCH_LOG2_RANGE[0]
        s_max = max(base.values()) - EPS_LOG2_RANGE[0] + BATCH_LOG2_RANGE[1]
        self.grad_left = max(0, -s_min)                 # Lg: the largest left shift
        self.grad_t_max = s_max + self.grad_left
        self.grad_base = {p: base[p] + self.grad_left for p in PARAM_NAMES}  # t − batch + eps
        self.step_left = max(0, -LR_SHIFT_RANGE[0])     # Lr
        super().__init__({
            "sink": In(stream.Signature(self.in_layout)),
            "source": Out(stream.Signature(self.out_layout)),
            "optimizer": In(Optimizer),
            "eps_log2": In(5), "batch_log2": In(4),
            "lr_shift": In(signed(7)),
            "beta_log2": In(5), "beta2_log2": In(5),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.cfg
        mw, gw, mf, ow = self.mw, self.gw, self.mf, cfg.operand_width
        extra = self.fm.master_extra
        v, en = _pipeline(m, self.sink, self.source, self.LATENCY)
        m.d.comb += self.busy.eq(Cat(*v).any())
        lion = self.optimizer == Optimizer.LION
        p = self.sink.payload

        # 1: negate the accumulator; the array's shifter amount (small adder).
        x1 = _reg(signed(cfg.acc_width + 1), "x1")
        t1 = _reg(unsigned(bits_for(self.grad_t_max)), "t1")
        th1, m1 = _reg(signed(mw), "th1"), _reg(signed(gw), "m1")
        base = Signal(range(max(self.grad_base.values()) + 1))
        with m.Switch(p.array):
            for name, k in self.grad_base.items():
                with m.Case(ParamArray[name]):
                    m.d.comb += base.eq(k)
        with m.If(en[0]):
            m.d.sync += [x1.eq(-p.acc), t1.eq(base + self.batch_log2 - self.eps_log2),
                         th1.eq(p.master), m1.eq(p.moment)]

        # 2: one right shift for both signs of s_p; clamp before the rounding increment.
        r2 = _reg(signed(gw + 1), "r2")
        th2, m2 = _reg(signed(mw), "th2"), _reg(signed(gw), "m2")
        r2w = shift_right_saturate(m, x1 << (self.grad_left + 1), t1, self.grad_t_max, gw + 1,
                                   "r2w")
        with m.If(en[1]):
            m.d.sync += [r2.eq(r2w), th2.eq(th1), m2.eq(m1)]

        # 3: g = shift_saturate(−acc, s_p, MomW); the EMAs' common difference g − m.
        g3 = saturate_signed(m, (r2 + 1) >> 1, gw, "g3")
        d3 = _reg(signed(gw + 1), "d3")
        th3, m3 = _reg(signed(mw), "th3"), _reg(signed(gw), "m3")
        with m.If(en[2]):
            m.d.sync += [d3.eq(g3 - m2), th3.eq(th2), m3.eq(m2)]

        # 4: both EMAs, m + rshift_round(d, β) = ((2m + 1) + (d >> (β − 1))) >> 1.
        two_m1 = Cat(Const(1, 1), m3).as_signed()
        sh_a = Signal(4)
        sh_b = Signal(4)
        m.d.comb += [sh_a.eq(self.beta_log2 - 1),
                     sh_b.eq(Mux(lion, self.beta2_log2, self.beta_log2) - 1)]
        c4w = Signal(signed(gw + 2))
        mp4w = Signal(signed(gw + 2))
        m.d.comb += [c4w.eq((two_m1 + (d3 >> sh_a)) >> 1),
                     mp4w.eq((two_m1 + (d3 >> sh_b)) >> 1)]
        c_neg4, c_nz4 = _reg(1, "c_neg4"), _reg(1, "c_nz4")
        mp4, th4 = _reg(signed(gw), "mp4"), _reg(signed(mw), "th4")
        with m.If(en[3]):
            m.d.sync += [c_neg4.eq(c4w[-1]), c_nz4.eq(c4w.any()),
                         mp4.eq(mp4w[:gw].as_signed()),   # between m and g: fits MomW
                         th4.eq(th3)]

        # 5: the step, rshift_round(w, lr_shift) before its increment, clamped.
        w5 = Signal(signed(gw))
        m.d.comb += w5.eq(Mux(lion, Mux(c_nz4, Mux(c_neg4, -(1 << mf), 1 << mf), 0), mp4))
        t5 = Signal(range(self.step_left + LR_SHIFT_RANGE[1] + 1))
        m.d.comb += t5.eq(self.lr_shift + self.step_left)
        u5w = shift_right_saturate(m, w5 << (self.step_left + 1), t5,
                                   self.step_left + LR_SHIFT_RANGE[1], mw + 2, "u5w")
        u5, mp5, th5 = _reg(signed(mw + 2), "u5"), _reg(signed(gw), "mp5"), _reg(signed(mw), "th5")
        with m.If(en[4]):
            m.d.sync += [u5.eq(u5w), mp5.eq(mp4), th5.eq(th4)]

        # 6: θ' = clamp(θ − ((u + 1) >> 1)) = clamp((2θ − u) >> 1); requantise.
        th6w = saturate_signed(m, ((th5 << 1) - u5) >> 1, mw, "th6w")
        q6w = saturate_signed(m, (th6w + (1 << (extra - 1))) >> extra, ow, "q6w")
        out = Signal(self.out_layout, reset_less=True)
        with m.If(en[5]):
            m.d.sync += [out.master.eq(th6w), out.moment.eq(mp5), out.param.eq(q6w)]
        m.d.comb += self.source.payload.eq(out)
        return m


class LossUnit(wiring.Component):
    """Nudges, squared errors, argmax and metrics from FORWARD's output words.

    One beat per output word, in the core's order (steps t = 0 … T−1; in a step
    outputs o = 0 … O−1). The unit counts ``o`` itself, so beats must come in whole
    steps of O words; ``last`` marks the words of the final step. Only the data's
    first ``outputs`` outputs are in the loss (a core with more outputs than the
    data set); the others get D = 0. Per beat::

        (y, mask) = (target, mask)                      mse
                  = (onehot_on if o == label, last)     onehot (target only at t = T−1)
        D  = mask and o < outputs ? ŷ − (y ≪ (SF − OF)) : 0
        ν  = rshift_round(D, dt_log2 + 1 + eps_log2)    nudge (forward order)
        e  = sat(rshift_round(D, SF − OF), OW);  sq = e²

    exactly as :func:`hel_fpga.sim.onchip.sample_nudges` (its ``nu`` is in echo
    order: the nudge of forward step t goes to echo row T−1−t, which the nudge
    buffer's write address does). On the last word of a sample (``end``) the
    beat also carries the first largest of outputs 0 … ``outputs``−1 of the final
    step (``argmax``; ties to the lower index) and ``correct`` = onehot and
    argmax == label (never for a label ≥ ``outputs``).

    Ports
    -----
    sink : In(stream of :attr:`in_layout`)
        ``output`` ŷ (state format), ``target`` (target format; mse), ``mask`` (the
        step's loss bit; mse), ``last`` (final step), ``label`` (onehot; one bit
        wider than an output index: a label ≥ O is the target of no output and
        never correct).
    source : Out(stream of :attr:`out_layout`)
        ``nudge`` (state format), ``sq`` = e² (unsigned 2·OW bits, 2·OF fractional),
        ``end``, ``argmax``, ``correct``.
    kind : In(:class:`LossKind`); eps_log2 : In(5); outputs : In(range(O + 1), init O)
        The run's settings (held; ``outputs`` is the setup's, 1 … O, and may change
        only while ``clear`` is asserted or between samples).
    loss_sum : Out(64), correct_count : Out(32), samples : Out(32)
        Running metrics over the beats delivered on ``source``: Σ sq saturating at
        2^63 − 1 (``Metrics.loss_sum``: a sum of non-negative terms saturates to the
        same value in any order), the correct samples (onehot), the samples
        (``end`` beats). ``loss_elements`` is a property of the store (Σ mask·O or
        S·O), not counted here.
    clear : In(1)
        Zero the metrics and the output counter; assert between passes, with
        ``busy`` low.
    busy : Out(1)
        A beat is in the pipeline.

    Latency 3 cycles, one beat per cycle. One multiplier (OW × OW, the square
    for the loss sum; Yosys maps ``e * e`` to one DSP block: SB_MAC16 on iCE40,
    MULT18X18D on ECP5, with ``e`` as its input and ``sq`` as its output
    register). Stage 1 forms ``D`` and tracks the argmax; stage 2 has the nudge's
    shifter (``eps_log2``, 0 … 16) and the error's fixed rounding and
    saturation; stage 3 squares.

    Size (as for :class:`OptimiserUnit`; ECP5 formats, O = 9): 430 LUT4 + 124
    CCU2C, 352 FF (64 of them the loss sum, 64 the two counters), 1 MULT18X18D,
    95 MHz; at the iCEBreaker formats (O = 1) 370 LUT4, 193 SB_CARRY, 250 FF,
    1 SB_MAC16.
    """

    LATENCY = 3

    def __init__(self, cfg: HelConfig):
        self.cfg = cfg
        self.fm = fm = TrainFormats(cfg)
        sw, ow = cfg.state_width, cfg.operand_width
        self.ts = fm.target_shift
        assert fm.error_shift == self.ts and fm.error.width == ow and fm.target.width == ow
        self.d_width = max(sw, ow + self.ts) + 1
        # ν = rshift_round(D, ≥ 2) fits d_width − 2 bits (+1 for the rounding carry).
        if self.d_width - 1 > sw:
            raise ValueError(f"nudges of a {ow}-bit target shifted by {self.ts} do not fit the "
                             f"{sw}-bit state")
        index = unsigned(max(1, (cfg.o - 1).bit_length()))
        # One bit wider than an output index, so that "no class" (any value ≥ O) fits.
        label = unsigned(index.width + 1)
        self.in_layout = data.StructLayout({
            "output": signed(sw), "target": signed(ow), "mask": 1, "last": 1,
            "label": label})
        self.out_layout = data.StructLayout({
            "nudge": signed(sw), "sq": unsigned(2 * ow), "end": 1, "argmax": index,
            "correct": 1})
        super().__init__({
            "sink": In(stream.Signature(self.in_layout)),
            "source": Out(stream.Signature(self.out_layout)),
            "kind": In(LossKind),
            "eps_log2": In(5),
            "outputs": In(range(cfg.o + 1), init=cfg.o),
            "clear": In(1),
            "loss_sum": Out(LOSS_SUM_WIDTH),
            "correct_count": Out(COUNT_WIDTH),
            "samples": Out(COUNT_WIDTH),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        cfg, fm = self.cfg, self.fm
        sw, ow, o_n, ts = cfg.state_width, cfg.operand_width, cfg.o, self.ts
        v, en = _pipeline(m, self.sink, self.source, self.LATENCY)
        m.d.comb += self.busy.eq(Cat(*v).any())
        p = self.sink.payload
        onehot = self.kind == LossKind.ONEHOT
        take = self.sink.valid & self.sink.ready

        # 1: which output this is (the core's order), the target, D, the argmax.
        o = Signal(range(o_n), name="o")
        last_o = o == o_n - 1
        # ``act``: o < outputs, kept as a register beside o (outputs ≥ 1: o = 0 is in)
        act = Signal(init=1, name="act")
        with m.If(take):
            m.d.sync += [o.eq(Mux(last_o, 0, o + 1)),
                         act.eq(last_o | (o + 1 < self.outputs))]
        y = Signal(signed(ow))
        msk = Signal()
        m.d.comb += [
            y.eq(Mux(onehot, Mux(p.last & (o == p.label), fm.onehot_on(), 0), p.target)),
            msk.eq(Mux(onehot, p.last, p.mask) & act),
        ]
        best = Signal(signed(sw), name="best", reset_less=True)
        best_o = Signal(range(o_n), name="best_o")
        # strictly greater: first largest wins; outputs ≥ ``outputs`` never win
        greater = act & ((o == 0) | (p.output > best))
        with m.If(take & p.last & greater):
            m.d.sync += [best.eq(p.output), best_o.eq(o)]
        amax = Mux(greater, o, best_o)                # the argmax once o = O − 1
        d1 = _reg(signed(self.d_width), "d1")
        end1, amax1, ok1 = _reg(1, "end1"), _reg(self.out_layout["argmax"].shape, "amax1"), \
            _reg(1, "ok1")
        with m.If(en[0]):
            m.d.sync += [d1.eq(Mux(msk, p.output - (y << ts), 0)),
                         end1.eq(p.last & last_o), amax1.eq(amax),
                         ok1.eq(onehot & (amax == p.label))]

        # 2: ν = ((D ≫ (dt + eps)) + 1) ≫ 1; e = sat(rshift_round(D, SF − OF), OW).
        nu2w = Signal(signed(self.d_width))
        m.d.comb += nu2w.eq((((d1 >> cfg.dt_log2) >> self.eps_log2) + 1) >> 1)
        e_round = (d1 + (1 << (ts - 1))) >> ts if ts > 0 else d1
        e2w = saturate_signed(m, e_round, ow, "e2w")
        nu2, e2 = _reg(signed(sw), "nu2"), _reg(signed(ow), "e2")
        end2, amax2, ok2 = _reg(1, "end2"), _reg(amax1.shape(), "amax2"), _reg(1, "ok2")
        with m.If(en[1]):
            m.d.sync += [nu2.eq(nu2w), e2.eq(e2w), end2.eq(end1), amax2.eq(amax1),
                         ok2.eq(ok1)]

        # 3: the square (the unit's one multiplier).
        out = Signal(self.out_layout, reset_less=True)
        with m.If(en[2]):
            m.d.sync += [out.nudge.eq(nu2), out.sq.eq((e2 * e2).as_unsigned()),
                         out.end.eq(end2), out.argmax.eq(amax2), out.correct.eq(ok2)]
        m.d.comb += self.source.payload.eq(out)

        # Metrics, on delivery.
        top = (1 << (LOSS_SUM_WIDTH - 1)) - 1
        total = Signal(LOSS_SUM_WIDTH)
        m.d.comb += total.eq(self.loss_sum + out.sq)   # < 2^64: loss_sum ≤ 2^63 − 1
        with m.If(self.clear):
            m.d.sync += [self.loss_sum.eq(0), self.correct_count.eq(0), self.samples.eq(0),
                         o.eq(0), act.eq(1)]
        with m.Elif(self.source.valid & self.source.ready):
            m.d.sync += [self.loss_sum.eq(Mux(total[-1], top, total)),
                         self.correct_count.eq(self.correct_count + (out.end & out.correct)),
                         self.samples.eq(self.samples + out.end)]
        return m
