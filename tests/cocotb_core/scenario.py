"""Command scenarios for the HEL core, with every expected word from the golden model.

A scenario is a list of :class:`Step`: one command, the words the testbench
sends on the core's input streams, the words it must receive on the output
streams (bit for bit), the ``done`` result and the flags after the command.
The same scenarios drive the Amaranth-simulator test and the cocotb/Verilator
test, so both check the gateware against :class:`hel_fpga.sim.golden.GoldenCore`
on identical vectors. No cocotb or simulator import here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hel_fpga.rtl.core import CmdLayout, DoneLayout, Op, Result
from hel_fpga.spec.formats import FormatError, HelConfig
from hel_fpga.spec.names import PARAM_NAMES
from hel_fpga.sim.golden import GoldenCore, StateError

#: stream members of HELCore: testbench → core, core → testbench
SOURCES = ("params_in", "inputs", "nudges")
SINKS = ("params_out", "outputs", "acc_out", "state_out")
BANK_NUM = {"fwd": 0, "pos": 1, "neg": 2}


def pack_cmd(op: Op, length=0, one_sided=0, kick=0, bank=0, seed=0, skip=0, no_acc=0) -> int:
    """The ``cmd`` payload as an integer (bit layout of :data:`hel_fpga.rtl.core.CmdLayout`)."""
    fields = dict(op=int(op.value), length=length, one_sided=one_sided, kick=kick, bank=bank,
                  seed=seed, skip=skip, no_acc=no_acc)
    word = 0
    for name, value in fields.items():
        f = CmdLayout[name]
        word |= (int(value) & ((1 << f.width) - 1)) << f.offset
    return word


def unpack_done(word: int) -> tuple[int, int]:
    """``(result, selftest_pass)`` from a ``done`` payload integer."""
    r, s = DoneLayout["result"], DoneLayout["selftest_pass"]
    return (word >> r.offset) & ((1 << r.width) - 1), (word >> s.offset) & 1


def to_signed(v: int, width: int) -> int:
    v &= (1 << width) - 1
    return v - (1 << width) if v >> (width - 1) else v


@dataclass
class Step:
    name: str
    op: Op
    length: int = 0
    one_sided: int = 0
    kick: int = 0
    bank: int = 0
    seed: int = 0
    skip: int = 0
    no_acc: int = 0
    send: dict[str, list[int]] = field(default_factory=dict)
    expect: dict[str, list[int]] = field(default_factory=dict)
    offer: dict[str, list[int]] = field(default_factory=dict)   # presented, must not be taken
    result: Result = Result.OK
    selftest_pass: int | None = None
    state_overflow: bool = False
    acc_overflow: bool = False

    @property
    def cmd_word(self) -> int:
        return pack_cmd(self.op, self.length, self.one_sided, self.kick, self.bank, self.seed,
                        self.skip, self.no_acc)


def canonical(arrays: dict[str, np.ndarray], skip: int = 0) -> list[int]:
    """Words of ``arrays`` in canonical order, leaving out array i when bit i of ``skip`` is set."""
    return [int(x) for i, name in enumerate(PARAM_NAMES) if not skip >> i & 1
            for x in np.asarray(arrays[name]).ravel()]


class ScenarioBuilder:
    """Runs commands on a :class:`GoldenCore` and records them as :class:`Step` s."""

    def __init__(self, cfg: HelConfig, seed: int = 0):
        self.cfg = cfg
        self.golden = GoldenCore(cfg)
        self.rng = np.random.default_rng(seed)
        self.steps: list[Step] = []

    # ---- random data ------------------------------------------------------------
    def random_params(self, w_scale: float = 1.0) -> dict[str, np.ndarray]:
        c, rng = self.cfg, self.rng
        lim = c.param.max_value * 0.999
        p = dict(W=rng.normal(0, w_scale / np.sqrt(c.n), (c.m, c.n)),
                 B=rng.normal(0, 0.5, (c.m, c.k)), b=rng.normal(0, 0.2, c.m),
                 alpha=rng.uniform(0.3, 1.5, c.n))
        return c.quantize_params({k: np.clip(v, -lim, lim) for k, v in p.items()})

    def random_inputs(self, t: int, scale: float = 0.7) -> np.ndarray:
        c = self.cfg
        lim = c.operand.max_value * 0.999
        return c.quantize_inputs(np.clip(self.rng.normal(0, scale, (t, c.k)), -lim, lim))

    def random_nudges(self, rows: int, lsb_log2: int | None = None) -> np.ndarray:
        c = self.cfg
        if lsb_log2 is None:
            lsb_log2 = max(c.state_frac - 10, 2)
        mag = 1 << lsb_log2
        return self.rng.integers(-mag, mag + 1, (rows, c.o)).astype(np.int64)

    # ---- commands -----------------------------------------------------------------
    def _record(self, step: Step) -> Step:
        step.state_overflow = bool(self.golden.state_overflow)
        step.acc_overflow = bool(self.golden.acc_overflow)
        self.steps.append(step)
        return step

    def write_params(self, params: dict[str, np.ndarray], skip: int = 0) -> Step:
        self.golden.write_params(**{k: v for i, (k, v) in enumerate(params.items())
                                    if not skip >> PARAM_NAMES.index(k) & 1})
        return self._record(Step(f"write_params skip={skip:#x}", Op.WRITE_PARAMS, skip=skip,
                                 send={"params_in": canonical(params, skip)}))

    def read_params(self, skip: int = 0) -> Step:
        return self._record(Step(f"read_params skip={skip:#x}", Op.READ_PARAMS, skip=skip,
                                 expect={"params_out": canonical(self.golden.read_params(), skip)}))

    def load(self, u: np.ndarray) -> Step:
        self.golden.load(u)
        return self._record(Step(f"load T={len(u)}", Op.LOAD, length=len(u),
                                 send={"inputs": [int(x) for x in np.asarray(u).ravel()]}))

    def bad_load(self, length: int) -> Step:
        try:
            self.golden.load(np.zeros((length, self.cfg.k), dtype=np.int64))
        except FormatError:
            pass
        else:
            raise AssertionError("golden accepted a bad LOAD")
        return self._record(Step(f"bad load T={length}", Op.LOAD, length=length,
                                 result=Result.BAD_ARG,
                                 offer={"inputs": [1] * self.cfg.k}))

    def forward(self, one_sided: bool = False, no_acc: bool = False) -> Step:
        """FORWARD; ``no_acc`` repeats it without accumulating (as the protocol model's
        retransmission: accumulators and their flag restored around the golden forward)."""
        est = "one-sided" if one_sided else "centred"
        name = f"forward {est}{' no_acc' if no_acc else ''}"
        g = self.golden
        acc, flag = g.read_accumulators(), g.acc_overflow
        try:
            out = g.forward(est)
        except StateError:
            return self._record(Step(f"{name} (wrong state)", Op.FORWARD, one_sided=int(one_sided),
                                     no_acc=int(no_acc), result=Result.WRONG_STATE))
        if no_acc:
            g.acc, g.acc_overflow = acc, flag
        return self._record(Step(name, Op.FORWARD, one_sided=int(one_sided), no_acc=int(no_acc),
                                 expect={"outputs": [int(x) for x in out.ravel()]}))

    def echo(self, nudges: np.ndarray | None, kick: bool = False) -> Step:
        t_len = len(self.golden.inputs)
        if nudges is None:
            nudges = self.random_nudges(1 if kick else max(t_len, 1))
        words = [int(x) for x in np.asarray(nudges).ravel()]
        try:
            self.golden.echo(nudges)
        except StateError:
            return self._record(Step("echo (wrong state)", Op.ECHO, kick=int(kick),
                                     result=Result.WRONG_STATE, offer={"nudges": words[:1]}))
        return self._record(Step(f"echo{' kick' if kick else ''}", Op.ECHO, kick=int(kick),
                                 send={"nudges": words}))

    def read_acc(self) -> Step:
        return self._record(Step("read_acc", Op.READ_ACC,
                                 expect={"acc_out": canonical(self.golden.read_accumulators())}))

    def clear_acc(self) -> Step:
        self.golden.clear_accumulators()
        return self._record(Step("clear_acc", Op.CLEAR_ACC))

    def read_state(self, bank: str) -> Step:
        st = self.golden.read_state(bank)
        return self._record(Step(f"read_state {bank}", Op.READ_STATE, bank=BANK_NUM[bank],
                                 expect={"state_out": [int(x) for x in st.q]
                                         + [int(x) for x in st.w]}))

    def bad_bank(self) -> Step:
        return self._record(Step("read_state bank 3", Op.READ_STATE, bank=3,
                                 result=Result.BAD_ARG))

    def clear_flags(self) -> Step:
        self.golden.clear_flags()
        return self._record(Step("clear_flags", Op.CLEAR_FLAGS))

    def selftest(self, steps: int, seed: int) -> Step:
        ok = self.golden.selftest(steps, seed)
        return self._record(Step(f"selftest {steps}", Op.SELFTEST, length=steps, seed=seed,
                                 selftest_pass=int(ok)))

    def read_all_states(self) -> None:
        for b in ("fwd", "pos", "neg"):
            self.read_state(b)


def _prologue(sb: ScenarioBuilder, t: int, w_scale: float = 1.0) -> None:
    sb.write_params(sb.random_params(w_scale))
    sb.load(sb.random_inputs(t))


def scenario_protocol(cfg: HelConfig, sb: ScenarioBuilder, t: int) -> None:
    """Wrong-state and bad-argument commands (no stream word may be taken), the
    parameter round trip, and which commands consume or keep a FORWARD."""
    sb.forward()                              # nothing loaded
    sb.echo(sb.random_nudges(1), kick=True)   # nothing forwarded
    sb.bad_load(0)
    sb.bad_load(cfg.t_max + 1)
    sb.bad_bank()
    sb.write_params(sb.random_params())
    sb.read_params()
    for skip in (0b0001, 0b0110, 0b1011, 0b1110, 0b1111):   # subsets of W, B, b, α
        sb.write_params(sb.random_params(), skip=skip)
        sb.read_params(skip=skip ^ 0b0101)
    sb.read_params()
    sb.load(sb.random_inputs(t))
    sb.echo(None)                             # loaded but not forwarded
    sb.forward()
    sb.write_params(sb.random_params())       # parameters may change between passes
    sb.read_params()
    sb.echo(None)
    sb.echo(None)                             # the echo consumed the forward
    sb.forward(one_sided=True)
    sb.load(sb.random_inputs(t))              # a new sequence drops the forward
    sb.echo(None)
    sb.forward()
    sb.selftest(2, seed=7)                    # so does the self-test
    sb.echo(None)
    sb.read_acc()


def scenario_centred(cfg: HelConfig, sb: ScenarioBuilder, t: int) -> None:
    """Centred forward + echo on two samples: outputs, all banks, accumulation."""
    _prologue(sb, t)
    sb.forward()
    sb.echo(None)
    sb.read_all_states()
    sb.read_acc()
    sb.load(sb.random_inputs(max(1, t - 1)))
    sb.forward()
    sb.echo(None)
    sb.read_all_states()
    sb.read_acc()


def scenario_one_sided(cfg: HelConfig, sb: ScenarioBuilder, t: int) -> None:
    """One-sided: the forward pass accumulates −G(0), the echo adds G(+ε)."""
    _prologue(sb, t)
    sb.forward(one_sided=True)
    sb.read_acc()
    sb.read_state("fwd")
    sb.forward(one_sided=True, no_acc=True)   # a repeat: same outputs, nothing accumulated
    sb.read_acc()
    sb.echo(None)
    sb.read_acc()
    sb.read_state("pos")
    sb.forward(no_acc=True)                   # no_acc on a centred forward changes nothing
    sb.echo(None)
    sb.read_all_states()
    sb.forward(one_sided=True)
    sb.echo(np.zeros((t, cfg.o), dtype=np.int64))   # un-nudged: contrast cancels
    sb.read_acc()
    sb.read_state("pos")


def scenario_kick(cfg: HelConfig, sb: ScenarioBuilder, t: int) -> None:
    """Final-step loss (HEB): one nudge row before the first echo step only."""
    _prologue(sb, t)
    sb.forward()
    sb.echo(None, kick=True)
    sb.read_all_states()
    sb.read_acc()
    sb.forward(one_sided=True)
    sb.echo(None, kick=True)
    sb.read_state("pos")
    sb.read_acc()


def scenario_selftest(cfg: HelConfig, sb: ScenarioBuilder, t: int) -> None:
    """Self-test longer than t_max; it keeps accumulators and the loaded sequence."""
    _prologue(sb, t)
    sb.forward()
    sb.echo(None)
    sb.selftest(cfg.t_max + 3, seed=int(sb.rng.integers(0, 2**32)))
    sb.read_state("fwd")
    sb.read_acc()
    sb.forward()
    sb.clear_flags()
    sb.clear_acc()
    sb.read_acc()


SCENARIOS = {
    "protocol": scenario_protocol,
    "centred": scenario_centred,
    "one_sided": scenario_one_sided,
    "kick": scenario_kick,
    "selftest": scenario_selftest,
}


def build_scenario(name: str, cfg: HelConfig, seed: int, t: int | None = None) -> list[Step]:
    """The steps of scenario ``name`` (a key of :data:`SCENARIOS` or ``"overflow"``)."""
    t = t if t is not None else min(cfg.t_max, 6)
    if name == "overflow":
        return overflow_scenario(cfg, seed, cfg.t_max)
    sb = ScenarioBuilder(cfg, seed)
    SCENARIOS[name](cfg, sb, t)
    return sb.steps


def standard_scenario(cfg: HelConfig, seed: int, t: int | None = None) -> list[Step]:
    """All of :data:`SCENARIOS` back to back on one core (the Amaranth-sim smoke test)."""
    t = t if t is not None else min(cfg.t_max, 6)
    sb = ScenarioBuilder(cfg, seed)
    for fn in SCENARIOS.values():
        fn(cfg, sb, t)
    return sb.steps


def overflow_scenario(cfg: HelConfig, seed: int, t: int, max_samples: int = 40) -> list[Step]:
    """Anti-restoring oscillators (α < 0) on a narrow state: the state wraps in the
    first forward pass, then one-sided forwards (each subtracting qo² ≈ 2^30 per
    step once the operands saturate) until an accumulator wraps; the un-nudged
    echo and the self-test still return bit-exactly. Meant for a configuration
    like ``state_width=20, state_frac=15, dt_log2=2, t_max=16, acc_width=38``
    (17 samples to the accumulator wrap)."""
    sb = ScenarioBuilder(cfg, seed)
    p = sb.random_params(w_scale=2.0)
    p["alpha"] = np.clip(-3 * np.abs(p["alpha"]), cfg.param.min_int, cfg.param.max_int)
    sb.write_params(p)
    sb.load(sb.random_inputs(t, scale=1.5))
    sb.forward()
    sb.echo(np.zeros((t, cfg.o), dtype=np.int64))
    sb.read_all_states()
    for _ in range(max_samples):
        sb.forward(one_sided=True)
        if sb.golden.acc_overflow:
            break
    sb.read_acc()
    sb.forward()
    sb.echo(None)
    sb.read_acc()
    sb.read_all_states()
    sb.clear_flags()
    sb.selftest(3 * cfg.t_max, seed=12345)
    sb.read_state("fwd")
    sb.clear_acc()
    sb.read_acc()
    return sb.steps
