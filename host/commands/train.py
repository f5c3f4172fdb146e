"""``hel train``: train an oscillator network with HEL through a device (or a float baseline).

See :mod:`hel_fpga.host.train` for the tasks, engines, checkpoints and plots, and
docs/train.md for usage and measured results.
"""

from __future__ import annotations

import json
import sys

from hel_fpga.host.errors import UsageError


def add_arguments(p):
    from hel_fpga.host.registry import device_help
    from hel_fpga.host.train.loop import DEFAULT_DEVICE
    p.add_argument("--task", metavar="NAME|PATH.npz",
                   help="oscillators (default), sine, digits, aeon:NAME (a time-series archive data set bundled "
                        "with aeon, e.g. aeon:GunPoint), or a .npz file (u, y[, mask] | labels[, split])")
    p.add_argument("--device", metavar="DEV",
                   help="where HEL runs: " + device_help(default=DEFAULT_DEVICE))
    p.add_argument("--algorithm", choices=("hel", "bptt", "rhel-float"),
                   help="hel: integer HEL on the device (default); bptt: exact float BPTT on the CPU; "
                        "rhel-float: float RHEL on the CPU")
    p.add_argument("--on-chip", action="store_true",
                   help="the device trains on its own (data, loss, batches, optimiser on chip; "
                        "docs/train.md): sim (the golden model, then the default), model, sim-board, "
                        "or a board whose bitstream has a training store")
    p.add_argument("--data", choices=("auto", "resident", "stream"),
                   help="--on-chip only: resident writes both sets into the device's store once; stream "
                        "sends each pass's samples into a ring in the store while it trains; auto "
                        "(default) is resident when the sets fit the store")
    p.add_argument("--board", metavar="NAME",
                   help="run the named device (sim, model, sim-board) with board entry NAME's "
                        "configuration (N, M, K, O, t_max, store), i.e. what that board would do; "
                        "see hel build --list")
    p.add_argument("--optimizer", choices=("lion", "sgdm"),
                   help="--on-chip only: the device's optimiser (default lion)")
    p.add_argument("--epochs", type=int, metavar="E", help="epochs (default: the task's)")
    p.add_argument("--batch", type=int, metavar="B",
                   help="samples per optimiser step (default: the task's; a power of two with --on-chip)")
    p.add_argument("--lr", type=float, metavar="LR",
                   help="Adam learning rate (default: the task's); with --on-chip the device "
                        "optimiser's, a power of two (default 2^-7 for lion)")
    p.add_argument("--lr-schedule", choices=("cosine", "constant", "halving"),
                   help="cosine decay from LR to LR/20 over the epochs (default) or constant; with "
                        "--on-chip halving (default: halves at 1/2, 3/4, 7/8 of the run) or constant")
    p.add_argument("--eps", type=float, metavar="E",
                   help="nudge strength ε (default: 0.03 centred; with --on-chip a power of two, "
                        "default 2^-5, or 2^-2 for a final-step loss; see docs/train.md)")
    p.add_argument("--estimator", choices=("centred", "one-sided"),
                   help="two ±ε echoes, bias O(ε²) (default), or one echo against the forward pass")
    p.add_argument("--seed", type=int, metavar="S", help="initialisation and batch order (default 0)")
    p.add_argument("--oscillators", type=int, metavar="N", help="oscillators N (default: the task's)")
    p.add_argument("--hidden", type=int, metavar="M", help="hidden units M (default: the task's)")
    p.add_argument("--validation", type=float, metavar="FRAC",
                   help="model selection: hold out FRAC of the training split (per class) and report "
                        "it in place of the test split, which is not read")
    p.add_argument("--out", metavar="DIR",
                   help="run directory (default runs/<task>-<algorithm>[-<device>]; runs/<task>-onchip-<device> "
                        "with --on-chip)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in DIR from its last checkpoint (--epochs may extend it)")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if DIR holds a run")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--json", action="store_true", help="no progress bars; print metrics.json to stdout")


def _summary(m: dict) -> str:
    on_chip = m.get("mode") == "on-chip"
    lines = [f"task {m['task']} ({m['loss']}), algorithm {m['algorithm']}"
             + (" on-chip" if on_chip else "") + f", device {m['device']}, "
             f"{m['epochs']} epochs in {m['wall_seconds']:.1f} s"
             + (f" ({m['samples_per_second']:.1f} training samples/s)" if m.get("samples_per_second") else "")]
    def f(x):
        return "n/a" if x is None else f"{x:.4g}"
    split = m.get("evaluated_on", "test")
    lines.append(f"  {split} loss {f(m['initial_test_loss'])} (initial) → {f(m['final_test_loss'])}; "
                 f"train loss {f(m['final_train_loss'])}")
    if "test_accuracy" in m:
        ta = m["test_accuracy"]
        lines.append(f"  accuracy: train {m['train_accuracy']:.1%}, {split} "
                     + ("n/a" if ta is None else f"{ta:.1%}")
                     + (f" (initial {m['initial_test_accuracy']:.1%})" if m.get("initial_test_accuracy") is not None else ""))
    if on_chip:
        tc = m["train_config"]
        line = (f"  on-chip ({tc['optimizer']}, lr 2^-{tc['lr_log2']}, ε 2^-{tc['eps_log2']}, "
                f"batch {tc['batch']}): device loss {f(m['onchip_final_test_loss'])} ({split}), "
                f"{f(m['onchip_final_train_loss'])} (train)")
        if m.get("onchip_final_test_accuracy") is not None:
            line += f", {split} accuracy {m['onchip_final_test_accuracy']:.1%}"
        lines.append(line)
    if m.get("gradient_cosine"):
        worst = {k: min(v.values()) for k, v in m["gradient_cosine"].items()}
        lines.append("  gradient cosine vs BPTT (worst parameter): "
                     + ", ".join(f"{k} {v:.5f}" for k, v in worst.items()))
    if m.get("overflow_batches"):
        lines.append(f"  warning: {m['overflow_batches']} batches skipped after a device overflow flag")
    lines.append(f"  wrote {m['out']}/: metrics.json, log.csv, checkpoint.npz"
                 + ("".join(f", {v}" for v in m.get("plots", {}).values())))
    return "\n".join(lines)


def run(args) -> int:
    from hel_fpga.host.train.loop import TrainError, TrainOptions, train

    opts = TrainOptions(task=args.task, device=args.device, algorithm=args.algorithm, epochs=args.epochs,
                        batch=args.batch, lr=args.lr, lr_schedule=args.lr_schedule, eps=args.eps,
                        estimator=args.estimator, seed=args.seed, oscillators=args.oscillators,
                        hidden=args.hidden, validation=args.validation, out=args.out, resume=args.resume, overwrite=args.overwrite,
                        plots=not args.no_plots, progress=not args.json, on_chip=args.on_chip,
                        optimizer=args.optimizer, data=args.data, board=args.board)
    try:
        metrics = train(opts)
    except TrainError as e:
        print(f"hel train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hel train: interrupted; the last completed epoch is checkpointed — continue with "
              "hel train --resume (and the same --out)", file=sys.stderr)
        return 130
    except UsageError:
        raise
    if args.json:
        json.dump(metrics, sys.stdout, indent=2)
        print()
    else:
        print(_summary(metrics))
    return 0
