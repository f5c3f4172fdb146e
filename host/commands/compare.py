"""``hel compare``: HEL gradients against float BPTT, parameter by parameter.

Runs float BPTT (exact reference), float RHEL, and the integer path — the
golden model in-process, or a device with ``--device`` — on one problem and
prints, per parameter, the cosine similarity and the norm ratio against BPTT,
like the gradient comparison of the RHEL paper.

With a device other than ``sim`` the same quantised problem also runs on the
golden model (with the device's configuration) and the device's FORWARD
outputs, raw accumulators and overflow flags must equal the golden model's bit
for bit: the verdict is printed (``"bit_exact"`` in the JSON) and the exit
status is 1 when they differ. ``--save`` writes the device's gradients under
the ``golden_*`` keys.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from hel_fpga.host.errors import UsageError


def add_arguments(p):
    p.add_argument("--problem", metavar="FILE.npz",
                   help="problem file (W, B, b, alpha, u, y, mask, dt); default: the seeded reference problem")
    p.add_argument("--eps", type=float, default=None,
                   help="nudge strength ε (default: by estimator and loss kind, see hel_fpga.host.learning.DEFAULT_EPS)")
    p.add_argument("--estimator", choices=("centred", "one-sided"), default="centred",
                   help="two ±ε echoes (O(ε²) bias) or one echo against the forward pass (O(ε))")
    p.add_argument("--config", metavar="FILE.json",
                   help="core configuration (JSON); default: the default format sized to the problem")
    from hel_fpga.host.registry import device_help
    p.add_argument("--device", default="sim",
                   help="where the integer path runs: " + device_help(default="sim"))
    p.add_argument("--save", metavar="OUT.npz", help="write all gradients (bptt_*, rhel_*, golden_*)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")


def cosine(a, b) -> float:
    a, b = np.ravel(a), np.ravel(b)
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else float("nan")


def norm_ratio(a, ref) -> float:
    d = np.linalg.norm(ref)
    return float(np.linalg.norm(a) / d) if d > 0 else float("nan")


def integer_run(dev, problem, eps, estimator) -> dict:
    """The hardware flow on one problem: quantise, one HEL sample, read the raw results.

    Returns ``outputs`` (the FORWARD outputs, integers, T×O), ``acc`` (the raw
    accumulators by parameter), ``status`` and ``gradients`` (``acc`` scaled
    back to float).
    """
    from hel_fpga.host.learning import hel_sample, masked_mse, read_batch
    cfg = dev.config
    dev.write_params(cfg.quantize_params(problem.params))
    dev.clear_accumulators()
    dev.clear_flags()
    sample = hel_sample(dev, cfg.quantize_inputs(problem.u), masked_mse(problem.y, problem.mask),
                        eps, estimator)
    batch = read_batch(dev, eps, estimator)
    return {"outputs": sample.outputs, "acc": batch.acc, "status": batch.status,
            "gradients": batch.gradients}


def bit_exact_diff(got: dict, want: dict) -> list[str]:
    """Where two :func:`integer_run` results differ (empty: bit for bit equal)."""
    from hel_fpga.spec.names import PARAM_NAMES
    diffs = []
    a, b = np.asarray(got["outputs"]), np.asarray(want["outputs"])
    if a.shape != b.shape:
        diffs.append(f"outputs: shape {a.shape} vs {b.shape}")
    elif not np.array_equal(a, b):
        diffs.append(f"outputs: {int(np.count_nonzero(a != b))} of {a.size} differ")
    for name in PARAM_NAMES:
        a, b = np.asarray(got["acc"][name]), np.asarray(want["acc"][name])
        if a.shape != b.shape:
            diffs.append(f"{name} accumulators: shape {a.shape} vs {b.shape}")
        elif not np.array_equal(a, b):
            diffs.append(f"{name} accumulators: {int(np.count_nonzero(a != b))} of {a.size} differ")
    if got["status"] != want["status"]:
        diffs.append(f"overflow flags: {got['status']} vs {want['status']}")
    return diffs


def run(args) -> int:
    from hel_fpga.host.device import DeviceError, GoldenDevice
    from hel_fpga.host.learning import config_for, default_eps
    from hel_fpga.host.registry import open_device
    from hel_fpga.spec.formats import ConfigError, FormatError, HelConfig
    from hel_fpga.spec.names import PARAM_NAMES
    from hel_fpga.sim import reference
    from hel_fpga.sim.problems import ProblemError, load_problem, reference_problem

    try:
        problem = load_problem(args.problem) if args.problem else reference_problem()
    except ProblemError as e:
        raise UsageError(str(e)) from None
    eps = default_eps(problem.mask, args.estimator) if args.eps is None else args.eps
    if not 0 < eps <= 1:
        raise UsageError(f"--eps must be in (0, 1], got {eps}")
    n, m, k, o, t = problem.W.shape[1], problem.W.shape[0], problem.u.shape[1], problem.y.shape[1], len(problem.u)
    try:
        if args.config:
            cfg = HelConfig.load(args.config)
            shape = dict(n=n, m=m, k=k, o=o)
            bad = [f"{key} = {getattr(cfg, key)} (problem: {v})" for key, v in shape.items() if getattr(cfg, key) != v]
            if bad:
                raise UsageError(f"configuration {args.config} does not match the problem: " + ", ".join(bad))
            if t > cfg.t_max:
                raise UsageError(f"problem length T = {t} exceeds the configuration's t_max = {cfg.t_max}")
            if cfg.dt != problem.dt:
                raise UsageError(f"problem dt = {problem.dt} differs from the configuration's δ = {cfg.dt}")
        else:
            cfg = config_for(n, m, k, o, t, problem.dt)
    except (ConfigError, OSError) as e:
        raise UsageError(str(e)) from None

    _, g_bptt = reference.bptt(problem)
    g_rhel = reference.rhel(problem, eps, estimator=args.estimator)
    try:
        dev = open_device(args.device, cfg)
    except DeviceError as e:
        raise UsageError(str(e)) from None
    try:
        with dev:
            run_dev = integer_run(dev, problem, eps, args.estimator)
            dev_cfg = dev.config
    except FormatError as e:
        raise UsageError(f"the problem does not fit the integer format: {e}") from None
    except DeviceError as e:
        raise UsageError(str(e)) from None
    g_int, status = run_dev["gradients"], run_dev["status"]
    diffs = None
    if args.device != "sim":
        # The same quantised problem on the golden model with the device's configuration.
        diffs = bit_exact_diff(run_dev, integer_run(GoldenDevice(dev_cfg), problem, eps,
                                                    args.estimator))

    rows = []
    for name in PARAM_NAMES:
        rows.append({
            "param": name,
            "rhel_cos": cosine(g_rhel[name], g_bptt[name]),
            "rhel_norm_ratio": norm_ratio(g_rhel[name], g_bptt[name]),
            "golden_cos": cosine(g_int[name], g_bptt[name]),
            "golden_norm_ratio": norm_ratio(g_int[name], g_bptt[name]),
        })
    result = {"problem": args.problem or "reference", "device": args.device, "estimator": args.estimator,
              "eps": eps, "config": cfg.to_dict(), "state_overflow": status.state_overflow,
              "acc_overflow": status.acc_overflow, "rows": rows}
    if diffs is not None:
        result["bit_exact"] = not diffs
        result["golden_differences"] = diffs
        result["device_config"] = dev_cfg.to_dict()
    if args.save:
        out = {}
        for name in PARAM_NAMES:
            out[f"bptt_{name}"] = g_bptt[name]
            out[f"rhel_{name}"] = g_rhel[name]
            out[f"golden_{name}"] = g_int[name]
        np.savez(args.save, **out)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return 1 if diffs else 0
    label = "golden integer" if args.device == "sim" else f"device {args.device}"
    print(f"problem: {result['problem']}  (N={n}, M={m}, K={k}, O={o}, T={t}, dt={problem.dt})")
    print(f"estimator: {args.estimator}, eps = {eps}; integer format: state {cfg.state_width}b/"
          f"{cfg.state_frac}f, operands {cfg.operand_width}b/{cfg.operand_frac}f")
    print(f"{'param':<7}{'float RHEL':>24}{label:>28}")
    print(f"{'':<7}{'cosine':>12}{'norm ratio':>12}{'cosine':>16}{'norm ratio':>12}")
    for r in rows:
        print(f"{r['param']:<7}{r['rhel_cos']:>12.6f}{r['rhel_norm_ratio']:>12.4f}"
              f"{r['golden_cos']:>16.6f}{r['golden_norm_ratio']:>12.4f}")
    if status.state_overflow or status.acc_overflow:
        print("warning: the device raised an overflow flag "
              f"(state: {status.state_overflow}, accumulators: {status.acc_overflow})")
    if diffs is not None:
        if diffs:
            print("device != golden model: NOT bit-exact (" + "; ".join(diffs) + ")")
        else:
            print(f"device == golden model: bit-exact ({t}×{o} outputs, "
                  f"{sum(int(np.size(a)) for a in run_dev['acc'].values())} accumulators, flags)")
    return 1 if diffs else 0
