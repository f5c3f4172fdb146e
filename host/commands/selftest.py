"""``hel selftest``: run the device's SELFTEST and report pass/fail.

SELFTEST runs ``--steps`` leapfrog steps forward from the zero state on
pseudo-random inputs generated on the device (``hel_fpga.sim.golden.selftest_inputs``
with ``--seed``), flips the momenta and runs the same steps backwards. The
integer leapfrog is exactly reversible, so a working core returns to the zero
state bit for bit; any stuck bit, wrong rounding or lost carry shows up.

By default the device first gets pseudo-random parameters (drawn like
``Problem.random``, seeded with ``--seed``), so the test exercises every
multiplier with non-zero operands (a freshly reset core has all-zero
parameters and would pass trivially). ``--keep-params`` runs with the
parameters already on the device instead. The golden model runs the same test
with the same parameters and its verdict is printed next to the device's.

Exit status: 0 only when the device reports a bit-exact return (and its state,
read back, is zero); 1 when it does not; 2 for usage or device errors (one line).
"""

from __future__ import annotations

import json
import sys
import time

from hel_fpga.host.errors import UsageError


def add_arguments(p):
    from hel_fpga.host.registry import device_help
    p.add_argument("--device", default="sim", help=device_help(default="sim"))
    p.add_argument("--steps", type=int, default=1000,
                   help="leapfrog steps each way (default 1000; 1 .. 2^32-1)")
    p.add_argument("--seed", type=int, default=1,
                   help="seed of the self-test inputs and of the random parameters (default 1)")
    p.add_argument("--config", metavar="FILE.json",
                   help="core configuration (JSON): for a named device the configuration to run "
                        "(default: the simulated board's, hel_fpga.sim.board.SIM_CONFIG); for a serial "
                        "device the one it must report")
    p.add_argument("--keep-params", action="store_true",
                   help="use the parameters already on the device (default: write seeded random ones)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def random_params(cfg, seed: int):
    """Integer parameters drawn like ``Problem.random`` (W ~ N(0, 1/N), α ∈ [0.5, 1.5], …)."""
    import numpy as np

    from hel_fpga.sim.reference import Problem
    rng = np.random.default_rng(seed)
    p = Problem.random(rng, n=cfg.n, m=cfg.m, k=cfg.k, o=cfg.o, t=1, dt=cfg.dt)
    return cfg.quantize_params(p.params)


def _load_config(path):
    from hel_fpga.spec.formats import ConfigError, HelConfig
    try:
        return HelConfig.load(path)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    except ConfigError as e:
        raise UsageError(f"{path}: {e}") from None


def run(args) -> int:
    import numpy as np

    from hel_fpga.host.device import DeviceError, GoldenDevice
    from hel_fpga.host.registry import open_device, takes_config
    from hel_fpga.spec.formats import FormatError

    if not 1 <= args.steps <= 0xFFFFFFFF:
        raise UsageError(f"--steps must be in 1 .. 2^32-1, got {args.steps}")
    if not 0 <= args.seed <= 0xFFFFFFFF:
        raise UsageError(f"--seed must be in 0 .. 2^32-1, got {args.seed}")
    cfg = _load_config(args.config) if args.config else None
    if cfg is None and takes_config(args.device):
        from hel_fpga.sim.board import SIM_CONFIG
        cfg = SIM_CONFIG

    try:
        dev = open_device(args.device, cfg)
    except DeviceError as e:
        raise UsageError(str(e)) from None
    try:
        with dev:
            ident = dev.ident()
            cfg = dev.config
            params = None if args.keep_params else random_params(cfg, args.seed)
            if params is not None:
                dev.write_params(params)
            else:
                params = dev.read_params()
            cycles0 = dev.cycles()
            t0 = time.monotonic()
            passed = dev.selftest(args.steps, args.seed)
            seconds = time.monotonic() - t0
            cycles1 = dev.cycles() if cycles0 is not None else None
            q, w = dev.read_state("fwd")
            state_zero = bool(np.all(q == 0) and np.all(w == 0))
    except FormatError as e:
        raise UsageError(str(e)) from None
    except DeviceError as e:
        raise UsageError(str(e)) from None

    golden = None
    if args.device != "sim":
        g = GoldenDevice(cfg)
        g.write_params(params)
        golden = g.selftest(args.steps, args.seed)
    ok = passed and state_zero
    cycles = None if cycles0 is None or cycles1 is None else cycles1 - cycles0
    result = {"device": args.device, "name": ident.name, "config": cfg.to_dict(),
              "steps": args.steps, "seed": args.seed,
              "params": "device's own" if args.keep_params else f"random (seed {args.seed})",
              "pass": ok, "device_result": passed, "state_zero": state_zero,
              "golden_result": golden, "seconds": round(seconds, 4),
              "simulated_cycles": cycles}
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return 0 if ok else 1
    print(f"selftest on {args.device} ({ident.name or 'unnamed'}; N={cfg.n} M={cfg.m} K={cfg.k} "
          f"O={cfg.o}, P={cfg.lanes}): {args.steps} steps forward + {args.steps} back, "
          f"seed {args.seed}, parameters: {result['params']}")
    timing = f"{seconds:.3f} s"
    if cycles is not None:
        timing += f", ≈{cycles:,} simulated cycles incl. the link, ≈{cycles / (2 * args.steps):.0f}/step"
    verdict = "PASS: the state returned to zero bit for bit" if ok else \
        ("FAIL: the device reported a state other than zero" if not passed
         else "FAIL: the device reported a pass but its state read back is not zero")
    extra = "" if golden is None else f"; golden model: {'pass' if golden else 'FAIL'}"
    print(f"{verdict} ({timing}{extra})")
    return 0 if ok else 1
