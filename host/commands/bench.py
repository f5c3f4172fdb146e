"""``hel bench core``: cycles per step of the HEL core, measured in simulation.

For each configuration the core (:class:`rtl.core.HELCore`) runs in Amaranth's
simulator: random parameters are written, a short sequence is loaded, then a
centred FORWARD and a centred ECHO run with the output stream always ready and
the nudges always valid. The core's ``step_strobe`` marks the first product of
every step; the cycles between two strobes of the same pass are the cycles of
one step (steady state, the pass's first and last step excluded from nothing:
every step of a pass has the same schedule). The MACs per step are
``cfg.macs_forward_step`` / ``cfg.macs_echo_step`` (:mod:`rtl.formats`) and the
ratio is ``cycles / (MACs / P)`` with ``P`` = the core's multipliers.

The subcommand is a positional choice (``core`` now) so other benchmarks
(``hel bench link``) can be added next to it.
"""

from __future__ import annotations

import json

HELP = "benchmark the HEL core (cycles per step vs MACs/P, by simulation)"

#: (n, m, k, lanes) measured by default: the issue's target is ratio ≤ 1.25 for
#: P ≥ 2 at N = M = 16.
DEFAULT_CONFIGS = [(16, 16, 2, 1), (16, 16, 2, 2), (16, 16, 2, 4), (16, 16, 2, 8),
                   (32, 32, 2, 8), (32, 32, 2, 16)]
TARGET_RATIO = 1.25


def add_arguments(p):
    p.add_argument("what", choices=["core"], help="what to benchmark")
    p.add_argument("--json", action="store_true",
                   help="print a list of objects (n, m, k, p, cycles_forward_step, "
                        "cycles_echo_step, macs_forward_step, macs_echo_step, ratio_forward, "
                        "ratio_echo)")
    p.add_argument("--config", action="append", metavar="N,M,K,P",
                   help="measure this shape instead of the default set (repeatable)")


def _parse(spec: str) -> tuple[int, int, int, int]:
    from host.errors import UsageError
    try:
        n, m, k, p = (int(x) for x in spec.split(","))
    except ValueError:
        raise UsageError(f"--config wants N,M,K,P (four integers), got {spec!r}") from None
    return n, m, k, p


def measure_core(cfg, steps: int = 3, seed: int = 0) -> dict:
    """Run FORWARD and centred ECHO of ``steps`` steps; return the measured row."""
    import numpy as np
    from amaranth.sim import Simulator

    from rtl.core import CmdLayout, HELCore, Op
    from rtl.formats import PARAM_NAMES

    def cmd_word(op, **fields):
        word = 0
        for name, value in dict(op=op.value, **fields).items():
            f = CmdLayout[name]
            word |= (int(value) & ((1 << f.width) - 1)) << f.offset
        return word

    rng = np.random.default_rng(seed)
    shapes = cfg.param_shapes()
    params = {name: rng.normal(0, 0.3, shapes[name]) for name in PARAM_NAMES}
    params["alpha"] = np.abs(params["alpha"]) + 0.5
    iparams = cfg.quantize_params(params)
    words = [int(x) for name in PARAM_NAMES for x in iparams[name].ravel()]
    u = cfg.quantize_inputs(rng.normal(0, 0.5, (steps, cfg.k)))

    dut = HELCore(cfg)
    strobes: dict[str, list[int]] = {"forward": [], "echo": []}

    async def bench(ctx):
        cycle = 0

        async def tick():
            nonlocal cycle
            await ctx.tick()
            cycle += 1

        async def command(word, stream=None, data=(), record=None):
            ctx.set(dut.cmd.payload.as_value(), word)
            ctx.set(dut.cmd.valid, 1)
            await ctx.tick().until(dut.cmd.ready)
            ctx.set(dut.cmd.valid, 0)
            data = list(data)
            ctx.set(dut.done.ready, 1)
            while True:
                if stream is not None:
                    ctx.set(stream.valid, int(bool(data)))
                    if data:
                        ctx.set(stream.payload, data[0])
                        if ctx.get(stream.ready):
                            data.pop(0)
                if record is not None and ctx.get(dut.step_strobe):
                    strobes[record].append(cycle)
                done = ctx.get(dut.done.valid)
                await tick()
                if done:
                    break
            ctx.set(dut.done.ready, 0)
            if stream is not None:
                ctx.set(stream.valid, 0)

        ctx.set(dut.outputs.ready, 1)
        await command(cmd_word(Op.WRITE_PARAMS), dut.params_in, words)
        await command(cmd_word(Op.LOAD, length=steps), dut.inputs, [int(x) for x in u.ravel()])
        await command(cmd_word(Op.FORWARD), record="forward")
        await command(cmd_word(Op.ECHO), dut.nudges, [0] * (steps * cfg.o), record="echo")

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()

    def per_step(xs):
        if len(xs) < 2:
            raise RuntimeError("need at least two steps to measure")
        d = np.diff(xs)
        return int(d.max())

    P = cfg.lanes
    cf, ce = per_step(strobes["forward"]), per_step(strobes["echo"])
    mf, me = cfg.macs_forward_step, cfg.macs_echo_step
    return dict(n=cfg.n, m=cfg.m, k=cfg.k, p=P, cycles_forward_step=cf, cycles_echo_step=ce,
                macs_forward_step=mf, macs_echo_step=me,
                ratio_forward=round(cf / (mf / P), 4), ratio_echo=round(ce / (me / P), 4))


def format_table(rows: list[dict]) -> list[str]:
    head = ["N", "M", "K", "P", "cycles/fwd step", "MACs/fwd step", "ratio fwd",
            "cycles/echo step", "MACs/echo step", "ratio echo"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in rows:
        cells = [r["n"], r["m"], r["k"], r["p"], r["cycles_forward_step"], r["macs_forward_step"],
                 f"{r['ratio_forward']:.3f}", r["cycles_echo_step"], r["macs_echo_step"],
                 f"{r['ratio_echo']:.3f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def run(args) -> int:
    from rtl.formats import HelConfig

    shapes = [_parse(s) for s in args.config] if args.config else DEFAULT_CONFIGS
    rows = []
    for n, m, k, p in shapes:
        cfg = HelConfig(n=n, m=m, k=k, o=1, lanes=p, t_max=16)
        rows.append(measure_core(cfg))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("\n".join(format_table(rows)))
    print(f"\nratio = cycles per step ÷ (MACs per step / P), P = multipliers; "
          f"target ≤ {TARGET_RATIO} for P ≥ 2 at N = M = 16 (centred echo: each weight read "
          f"serves both banks on two cycles of the same P multipliers).")
    return 0
