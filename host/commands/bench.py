"""``hel bench core``: cycles per step of the HEL core, measured in simulation.

For each configuration the core (:class:`hel_fpga.rtl.core.HELCore`) runs in Amaranth's
simulator: random parameters are written, a short sequence is loaded, then a
centred FORWARD and a centred ECHO run with the output stream always ready and
the nudges always valid. The core's ``step_strobe`` marks the first product of
every step; the cycles between two strobes of the same pass are the cycles of
one step (every step of a pass has the same schedule; the largest gap is
reported). The MACs per step are
``cfg.macs_forward_step`` / ``cfg.macs_echo_step`` (:mod:`hel_fpga.spec.formats`) and the
ratio is ``cycles / (MACs / P)`` with ``P`` = the core's multipliers.

``hel bench link``: the serial link's payload efficiency during LOAD, FORWARD
and ECHO, and the simulated board's speed (see :func:`measure_link`).

``hel bench train``: training samples/s on chip (RTL simulation cycles × each
board's clock), host-driven (protocol-model traffic projected at the baud) and on
the CPU (float BPTT), side by side (:mod:`hel_fpga.host.commands.bench_train`).

The subcommand is a positional choice (``core``, ``link``, ``train``).
"""

from __future__ import annotations

import json

from hel_fpga.host.commands.bench_train import CountingPort  # noqa: F401 (part of this module's API)

#: (n, m, k, lanes) measured by default; the target is ratio ≤ 1.25 for P ≥ 2 at
#: N = M = 16.
DEFAULT_CONFIGS = [(16, 16, 2, 1), (16, 16, 2, 2), (16, 16, 2, 4), (16, 16, 2, 8),
                   (32, 32, 2, 8), (32, 32, 2, 16)]
TARGET_RATIO = 1.25

#: ``hel bench link``: sequence lengths measured by default, and the link's targets.
LINK_LENGTHS = (16, 256, 4096)
TARGET_LINK_EFFICIENCY = 0.90
#: The phases of one HEL sample, as :func:`hel_fpga.host.learning.hel_sample` names them.
PHASES = ("LOAD", "FORWARD", "ECHO")
#: ε that scales ``hel bench link``'s random output gradients into nudges.
NUDGE_EPS = 0.03
TARGET_CYCLES_PER_S = 1_000_000


def add_arguments(p):
    p.add_argument("what", choices=["core", "link", "train"],
                   help="core: cycles per step of the HEL core; link: payload efficiency of the "
                        "serial link and the simulated board's cycles per second; train: "
                        "training samples/s on chip, host-driven and on the CPU")
    p.add_argument("--json", action="store_true",
                   help="core: print a list of objects (n, m, k, p, cycles_forward_step, "
                        "cycles_echo_step, macs_forward_step, macs_echo_step, ratio_forward, "
                        "ratio_echo); link: print the measurement as one object (phases, "
                        "board, targets); train: print a list of rows (target, mode, task, n, m, "
                        "k, o, t, c, p, cycles_per_sample, clock_hz, samples_per_s, source)")
    p.add_argument("--config", action="append", metavar="N,M,K,P",
                   help="core: measure this shape instead of the default set (repeatable)")
    p.add_argument("--lengths", metavar="T,T,...", default=",".join(map(str, LINK_LENGTHS)),
                   help="link: sequence lengths to measure (default %(default)s); the simulated "
                        "board is built with t_max ≥ the longest")
    from hel_fpga.host.registry import device_help
    p.add_argument("--device", default="sim-board",
                   help="link: " + device_help(default="sim-board", exclude=("sim",))
                   + "; time in simulated cycles on sim-board, else in wall seconds at the baud "
                     "rate IDENT reports")
    p.add_argument("--seed", type=int, default=0,
                   help="link: seed of the random data; train: seed of the initialisation")
    from hel_fpga.host.commands.bench_train import DEFAULT_TASKS, MODES
    p.add_argument("--tasks", default=DEFAULT_TASKS, metavar="TASK[@N],...",
                   help="train: workloads, a task at its default size or at N = M = N "
                        "(default %(default)s)")
    p.add_argument("--modes", default=",".join(MODES), metavar="MODE,...",
                   help="train: which rows to measure, a subset of " + ", ".join(MODES)
                        + " (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="train: fewer samples (16 on chip, one batch host-driven, one CPU epoch)")
    p.add_argument("--engines", type=int, metavar="C",
                   help="train: simulate the on-chip rows with C sample engines instead of each "
                        "board's own (a configuration, not the board's bitstream; rows say so)")


def _parse(spec: str) -> tuple[int, int, int, int]:
    from hel_fpga.host.errors import UsageError
    try:
        n, m, k, p = (int(x) for x in spec.split(","))
    except ValueError:
        raise UsageError(f"--config wants N,M,K,P (four integers), got {spec!r}") from None
    return n, m, k, p


def measure_core(cfg, steps: int = 3, seed: int = 0) -> dict:
    """Run FORWARD and centred ECHO of ``steps`` steps; return the measured row."""
    import numpy as np
    from amaranth.sim import Simulator

    from hel_fpga.rtl.core import CmdLayout, HELCore, Op
    from hel_fpga.spec.names import PARAM_NAMES

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


# ---- hel bench link ----------------------------------------------------------------------
def _link_lengths(spec: str) -> list[int]:
    from hel_fpga.host.errors import UsageError
    try:
        lengths = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise UsageError(f"--lengths wants comma-separated integers, got {spec!r}") from None
    if not lengths or lengths[0] < 1:
        raise UsageError(f"--lengths wants positive sequence lengths, got {spec!r}")
    return lengths


def link_config(lengths):
    """The simulated board's configuration with t_max ≥ the longest length (a power of two)."""
    from hel_fpga.sim.board import SIM_CONFIG
    t_max = SIM_CONFIG.t_max
    while t_max < max(lengths):
        t_max *= 2
    return SIM_CONFIG.replace(t_max=t_max)


def measure_link(dev, lengths, *, board=None, seed: int = 0, min_payload: int = 8192,
                 max_reps: int = 64, progress=None) -> dict:
    """Measure LOAD, FORWARD and ECHO over ``dev`` for every sequence length.

    ``dev`` is a :class:`hel_fpga.host.link.SerialDevice` whose ``port`` is a
    :class:`CountingPort`. For each length ``T`` one HEL sample
    (:func:`hel_fpga.host.learning.hel_sample`: random parameters and inputs,
    random output gradients in place of a loss) runs ``reps`` times (enough for
    ``min_payload`` bytes per phase, at most ``max_reps``); each phase is timed
    from just before its request to just after its last reply. The same samples
    run on the golden model, whose outputs, accumulators and flags must match at
    every length.

    Time on the line: with ``board`` (a :class:`hel_fpga.sim.board.SimBoard`) each phase
    is bracketed by two reads of the board's cycle counter (:class:`~hel_fpga.host.commands.bench_train.CycleMarks`):
    its duration is in *simulated cycles*, and the line carries one byte per
    ``10 · divisor`` cycles. Without a board the duration is wall time and the
    line carries ``baud / 10`` bytes per second (the baud rate from IDENT).

    Useful payload: the packed words of the data (inputs T·K·operand_width,
    outputs and nudges T·O·state_width bits) ÷ 8. Wire bytes: what the port
    carried in the payload's direction (frames, COBS, CRC, chunk indices,
    delimiters, the request opening the transfer); the acks and the request's
    reply go the other way and are reported separately.
    """
    import math
    import time

    import numpy as np

    from hel_fpga.host.device import GoldenDevice
    from hel_fpga.host.learning import hel_sample
    from hel_fpga.spec.wire import packed_len
    from hel_fpga.spec.names import PARAM_NAMES

    port = dev.port
    cfg = dev.config
    ident = dev.ident()
    from hel_fpga.host.commands.bench_train import CycleMarks
    marks = CycleMarks(board) if board is not None else None
    divisor = board.divisor if board is not None else None
    line_rate_wall = ident.baud / 10 if ident.baud else None      # bytes per wall second
    rng = np.random.default_rng(seed)
    gold = GoldenDevice(cfg)
    params = {"W": rng.normal(0, 1 / np.sqrt(cfg.n), (cfg.m, cfg.n)),
              "B": rng.normal(0, 0.5, (cfg.m, cfg.k)), "b": rng.normal(0, 0.1, cfg.m),
              "alpha": rng.uniform(0.5, 1.5, cfg.n)}
    iparams = cfg.quantize_params(params)
    for d in (dev, gold):
        d.write_params(iparams)
        d.clear_accumulators()
        d.clear_flags()
    say = progress or (lambda line: None)
    first_mark = last_mark = None

    phases = []
    for t in lengths:
        if t > cfg.t_max:
            say(f"bench link: T = {t} skipped (the device's t_max is {cfg.t_max})")
            continue
        u = cfg.quantize_inputs(rng.normal(0, 0.5, (t, cfg.k)))
        grad = rng.normal(0, 0.3, (t, cfg.o))

        def loss_fn(y_hat):
            return 0.0, grad

        payload = {"LOAD": packed_len(t * cfg.k, cfg.operand_width),
                   "FORWARD": packed_len(t * cfg.o, cfg.state_width),
                   "ECHO": packed_len(t * cfg.o, cfg.state_width)}
        direction = {"LOAD": "tx", "FORWARD": "rx", "ECHO": "tx"}
        reps = max(1, min(max_reps, math.ceil(min_payload / min(payload.values()))))
        acc = {name: {"wall": 0.0, "tx": 0, "rx": 0, "cycles": 0, "missed": 0} for name in PHASES}

        def timed(name, op):
            nonlocal first_mark, last_mark
            a = acc[name]
            tx0, rx0 = port.tx, port.rx
            n0 = marks.count() if marks else 0
            if marks:
                marks.mark()
            w0 = time.monotonic()
            result = op()
            wall = time.monotonic() - w0
            if marks:
                marks.mark()
            a["wall"] += wall
            a["tx"] += port.tx - tx0
            a["rx"] += port.rx - rx0
            if marks:
                got = marks.collect(n0, 2)
                if len(got) == 2:
                    a["cycles"] += got[1]["cycles"] - got[0]["cycles"]
                    first_mark = first_mark or got[0]
                    last_mark = got[1]
                else:       # should not happen: both marks in one service interval
                    a["missed"] += 1
            return result

        say(f"bench link: T = {t}, {reps} run(s) of LOAD, FORWARD, ECHO")
        exact = True
        for _ in range(reps):
            got = hel_sample(dev, u, loss_fn, NUDGE_EPS, "centred", phase=timed)
            want = hel_sample(gold, u, loss_fn, NUDGE_EPS, "centred")
            exact = exact and bool(np.array_equal(got.outputs, want.outputs))
        dacc, gacc = dev.read_accumulators(), gold.read_accumulators()
        exact = exact and all(np.array_equal(dacc[k], gacc[k]) for k in PARAM_NAMES)
        exact = exact and dev.status() == gold.status()
        for name in PHASES:
            a = acc[name]
            pay = payload[name] * reps
            wire = a[direction[name]]
            row = {"phase": name, "t": t, "reps": reps, "payload_bytes": pay,
                   "wire_bytes": wire,
                   "wire_bytes_other_way": a["rx" if direction[name] == "tx" else "tx"],
                   "payload_per_wire": round(pay / wire, 4) if wire else None,
                   "wall_s": round(a["wall"], 4), "bit_exact": exact}
            if marks and not a["missed"]:
                line_bytes = a["cycles"] / (10 * divisor)
                macs = cfg.macs_forward_step if name == "FORWARD" else \
                    cfg.macs_echo_step if name == "ECHO" else 0
                core_floor = t * reps * macs / cfg.lanes
                wire_floor = wire * 10 * divisor
                row.update(time_base="simulated cycles", sim_cycles=a["cycles"],
                           cycles_per_step=round(a["cycles"] / (t * reps), 1),
                           core_floor_per_step=round(macs / cfg.lanes, 1),
                           line_capacity_bytes=round(line_bytes),
                           line_utilisation=round(pay / line_bytes, 4),
                           line_busy=round(wire / line_bytes, 4),
                           core_floor_cycles=round(core_floor), wire_floor_cycles=wire_floor,
                           bound="core" if core_floor > wire_floor else "line")
            elif line_rate_wall and not marks:
                line_bytes = a["wall"] * line_rate_wall
                row.update(time_base="wall seconds", line_capacity_bytes=round(line_bytes),
                           line_utilisation=round(pay / line_bytes, 4),
                           line_busy=round(wire / line_bytes, 4))
            phases.append(row)

    board_info = None
    if marks and first_mark and last_mark and last_mark["seconds"] > first_mark["seconds"]:
        cycles = last_mark["cycles"] - first_mark["cycles"]
        seconds = last_mark["seconds"] - first_mark["seconds"]
        rate = cycles / seconds
        board_info = {"divisor": divisor, "clk_hz": ident.clock_hz, "baud": ident.baud,
                      "cycles_per_byte": 10 * divisor, "cycles_per_s": round(rate),
                      "simulated_cycles": int(cycles), "seconds": round(seconds, 3)}
        if ident.clock_hz:
            # The UART's byte rate in wall-clock terms: baud/10 scaled by the simulation speed.
            board_info["wall_byte_rate"] = round(ident.baud / 10 * rate / ident.clock_hz)
    longest = max((r["t"] for r in phases), default=None)
    verdicts = []
    for r in phases:
        if r["t"] != longest:
            continue
        framing_ok = (r["payload_per_wire"] or 0) >= TARGET_LINK_EFFICIENCY
        if r.get("bound") == "core":
            # The core, not the line, sets the pace: only the framing can be judged.
            met = None if framing_ok else False
            note = (f"core-bound here (the core needs more cycles per step than the line): "
                    f"{r['cycles_per_step']:g} cycles/step through the link, "
                    f"{r['cycles_per_step'] / r['core_floor_per_step']:.3f}× the core's ideal "
                    f"of {r['core_floor_per_step']:g} (MACs/P); framing met")
        elif "line_utilisation" not in r:
            met, note = (None if framing_ok else False), "no line rate known; framing met"
        else:
            met = framing_ok and r.get("line_utilisation", 0) >= TARGET_LINK_EFFICIENCY
            note = "payload/line rate"
        verdicts.append({"phase": r["phase"], "t": r["t"], "met": met, "note": note,
                         "payload_per_wire": r["payload_per_wire"],
                         "line_utilisation": r.get("line_utilisation")})
    return {"device": ident.name, "config": cfg.to_dict(), "baud": ident.baud,
            "clock_hz": ident.clock_hz, "phases": phases, "board": board_info,
            "targets": {"payload_efficiency": TARGET_LINK_EFFICIENCY,
                        "cycles_per_s": TARGET_CYCLES_PER_S,
                        "efficiency_met": verdicts,
                        "cycles_per_s_met": None if board_info is None
                        else bool(board_info["cycles_per_s"] >= TARGET_CYCLES_PER_S)},
            "bit_exact": all(r["bit_exact"] for r in phases),
            "stats": dict(dev.stats)}


def format_link(result: dict) -> list[str]:
    sim = result["board"] is not None
    head = ["phase", "T", "runs", "payload B", "wire B", "payload/wire",
            "sim cycles" if sim else "wall s", "line capacity B", "payload/line rate",
            "wire/line rate"] + (["bound"] if sim else []) + ["bit-exact"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    for r in result["phases"]:
        cells = [r["phase"], r["t"], r["reps"], r["payload_bytes"], r["wire_bytes"],
                 f"{r['payload_per_wire']:.1%}" if r["payload_per_wire"] else "-",
                 f"{r['sim_cycles']:,}" if sim else f"{r['wall_s']:.3f}",
                 r.get("line_capacity_bytes", "-"),
                 f"{r['line_utilisation']:.1%}" if "line_utilisation" in r else "-",
                 f"{r['line_busy']:.1%}" if "line_busy" in r else "-"]
        if sim:
            cells.append(r["bound"])
        cells.append("yes" if r["bit_exact"] else "NO")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def run_link(args) -> int:
    import sys

    from hel_fpga.host.device import DeviceError
    from hel_fpga.host.errors import UsageError
    from hel_fpga.host.link import SerialDevice
    from hel_fpga.host.registry import open_device, takes_config

    lengths = _link_lengths(args.lengths)

    def progress(line):
        print(line, file=sys.stderr, flush=True)

    cfg = link_config(lengths) if takes_config(args.device) else None
    try:
        dev = open_device(args.device, cfg, timeout=5.0)
    except DeviceError as e:
        raise UsageError(str(e)) from None
    if not isinstance(dev, SerialDevice):
        dev.close()
        raise UsageError(f"--device {args.device} has no serial link to measure")
    try:
        with dev:
            dev.port = CountingPort(dev.port)
            result = measure_link(dev, lengths, board=dev.board, seed=args.seed,
                                  progress=progress)
    except DeviceError as e:
        raise UsageError(str(e)) from None
    if args.json:
        import json
        print(json.dumps(result, indent=2))
        return 0
    c = result["config"]
    b = result["board"]
    print(f"device: {args.device} ({result['device']}; N={c['n']} M={c['m']} K={c['k']} O={c['o']} "
          f"P={c['lanes']} t_max={c['t_max']}; words: operands {c['operand_width']} b, state "
          f"{c['state_width']} b)")
    if b:
        print(f"line: {b['baud']} baud at a nominal {b['clk_hz']} Hz = {b['divisor']} clocks per bit, "
              f"{b['cycles_per_byte']} simulated cycles per byte; time below is simulated time")
    else:
        print(f"line: {result['baud']} baud = {result['baud'] / 10:.0f} bytes/s; time below is wall time")
    print()
    print("\n".join(format_link(result)))
    print()
    print("payload = packed words of the data (inputs, outputs, nudges); wire = bytes on the line in "
          "the data's direction (frames, COBS, CRC, chunk index, delimiters);")
    print("payload/line rate = payload bytes ÷ the bytes the line could have carried in the "
          "phase's time (request to last reply, host turnarounds included);")
    if b:
        print("bound: the phase is limited by the line (wire bytes × cycles per byte) or by the core "
              "(steps × MACs/P cycles, ideal) — whichever floor is higher.")
        print()
        print(f"simulated board: {b['cycles_per_s']:,} cycles/s from the first to the last phase "
              f"({b['simulated_cycles']:,} cycles in {b['seconds']:.2f} s, golden-model checks "
              f"included); its UART's byte rate in wall-clock terms: "
              f"{b['baud'] // 10:,} B/s × {b['cycles_per_s']:,}/{b['clk_hz']:,} = "
              f"{b.get('wall_byte_rate', 0):,} B/s")
    tg = result["targets"]
    for v in tg["efficiency_met"]:
        what = (f"payload/line rate {v['line_utilisation']:.1%}" if v["line_utilisation"] is not None
                else "") + f", payload/wire {v['payload_per_wire']:.1%}"
        verdict = {True: "met", False: "NOT met", None: v["note"]}[v["met"]]
        print(f"target ≥ {tg['payload_efficiency']:.0%} payload efficiency, {v['phase']} at "
              f"T = {v['t']} ({what.lstrip(', ')}): {verdict}")
    if tg["cycles_per_s_met"] is not None:
        print(f"target ≥ {tg['cycles_per_s']:,} simulated cycles/s: "
              + ("met" if tg["cycles_per_s_met"] else "NOT met"))
    return 0


def run(args) -> int:
    if args.what == "link":
        return run_link(args)
    if args.what == "train":
        from hel_fpga.host.commands.bench_train import run_train
        return run_train(args)
    from hel_fpga.spec.formats import HelConfig

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
