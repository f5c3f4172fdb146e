"""``hel archive``: the time-series archive benchmark behind the README's table.

Two stages, both on the data sets of ``--datasets`` (default: the README's four,
:data:`hel_fpga.host.train.archive.BENCHMARK_DATASETS`):

``--select``
    Model selection on the training split only. A stratified quarter of it is
    held out as a validation split (``hel train --validation``; the test split
    is not read). ``--algorithms`` says what is selected: any of ``bptt``,
    ``rhel-float``, ``hel`` the float settings, ``onchip`` the on-chip rates
    (both when both are named).

    Float: BPTT runs every point of :data:`GRID` (model size, learning rate,
    epochs) with :data:`SELECT_SEEDS`; the point with the best mean validation
    accuracy wins (ties: lower validation loss, then the smaller, shorter,
    slower point). Float RHEL then picks ε from :data:`EPS_GRID` at that point,
    the same way. The chosen settings are printed as the
    :data:`~hel_fpga.host.train.archive.DATASET_DEFAULTS` entry they become.

    On chip: for each data set the archive board takes
    (:func:`~hel_fpga.host.train.archive.board_fit`; the others are reported
    with what the board lacks), ``hel train --on-chip --device sim --board``
    :data:`~hel_fpga.host.train.archive.ARCHIVE_BOARD` (the golden model of that
    board's configuration) runs every point of :data:`ONCHIP_GRID` (Lion's lr × ε,
    powers of two) at the data set's epochs and batch, with
    :data:`SELECT_SEEDS`; the best mean validation
    accuracy wins (ties: lower validation loss, then the lower lr, then the
    smaller ε; :func:`best_point`). The result is printed as the
    :data:`~hel_fpga.host.train.archive.ONCHIP_DEFAULTS` entry it becomes.

    ``--json FILE`` writes the chosen settings with their validation scores
    (with both selections: under the keys ``float`` and ``onchip``).

default (the table)
    Every algorithm of ``--algorithms`` (float BPTT, float RHEL, integer HEL on
    ``--device``; and ``onchip``, ``hel train --on-chip --board ARCHIVE_BOARD`` on
    ``--device`` with the settings of
    :data:`~hel_fpga.host.train.archive.ONCHIP_DEFAULTS`, or the device's own rates
    for a data set not listed there) trains every data set with its default
    settings for every seed of ``--seeds``, on the archive's train split, and is
    scored on its test split. On chip, sets that fit the board's store are
    resident and the others streamed; a data set the board cannot take (more
    channels, classes or steps) gets no on-chip run: its cell says why. Prints a Markdown table (mean ± standard deviation over seeds, and the
    range) with the published accuracies of
    :data:`~hel_fpga.host.train.archive.REFERENCES` beside it; ``--json FILE``
    writes every run's figures.

Runs go to ``--out`` (default ``runs/archive``), one directory per run; a
complete run whose settings match is reused rather than repeated, so an
interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

from hel_fpga.host.errors import UsageError

#: ``--select``: the grid float BPTT searches (every combination) and the seeds
#: each point is averaged over.
GRID = {"oscillators": (32, 64), "lr": (0.005, 0.01, 0.02), "epochs": (20, 40, 80)}
SELECT_SEEDS = (0, 1)
#: ``--select``: ε candidates, tried with float RHEL at the chosen point.
EPS_GRID = (0.01, 0.03, 0.1)
#: ``--select``: the fraction of the training split held out for validation.
VALIDATION = 0.25
#: ``--select --algorithms onchip``: Lion's learning rates × ε, the powers of two the
#: device takes (every combination).
ONCHIP_GRID = {"lr": (2.0 ** -6, 2.0 ** -7, 2.0 ** -8), "eps": (2.0 ** -2, 2.0 ** -3)}
ONCHIP_OPTIMIZER = "lion"
#: ``--select`` names: the float selection (one for all three) and the on-chip one.
FLOAT_ALGORITHMS = ("bptt", "rhel-float", "hel")
#: What ``--algorithms`` may name: the three host-side algorithms of ``hel train``, and
#: ``onchip`` (``hel train --on-chip`` on ``--device``, with the data set's
#: :data:`~hel_fpga.host.train.archive.ONCHIP_DEFAULTS`).
ALGORITHMS = ("bptt", "rhel-float", "hel", "onchip")
DEFAULT_ALGORITHMS = ("bptt", "rhel-float", "hel")
COLUMN = {"bptt": "float BPTT", "rhel-float": "float RHEL", "hel": "HEL, integer", "onchip": "HEL, on chip"}


def add_arguments(p):
    from hel_fpga.host.registry import device_help
    from hel_fpga.host.train.archive import BENCHMARK_DATASETS
    p.add_argument("--datasets", metavar="A,B,...", default=",".join(BENCHMARK_DATASETS),
                   help="archive data sets bundled with aeon (default: %(default)s)")
    p.add_argument("--seeds", metavar="S,S,...", default="0,1,2",
                   help="seeds of the table's runs (default: %(default)s)")
    p.add_argument("--algorithms", metavar="A,B,...", default=",".join(DEFAULT_ALGORITHMS),
                   help=f"algorithms of the table, of {', '.join(ALGORITHMS)} (default: %(default)s)")
    p.add_argument("--device", default="sim",
                   help="where the hel runs go: " + device_help(default="sim"))
    p.add_argument("--select", action="store_true",
                   help="choose each data set's settings on a validation split of its training split "
                        "instead of running the table: float BPTT grid, then ε with float RHEL (for "
                        "bptt, rhel-float, hel of --algorithms); Lion's lr × ε on chip (for onchip)")
    p.add_argument("--out", metavar="DIR", default="runs/archive",
                   help="directory of the individual runs (default: %(default)s)")
    p.add_argument("--json", metavar="FILE", help="also write every run's figures to FILE")


def _list(text: str, what: str, cast=str) -> list:
    try:
        items = [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--{what}: expected a comma-separated list, got {text!r}") from None
    if not items:
        raise UsageError(f"--{what} is empty")
    return items


def _slug(*parts) -> str:
    return "-".join(str(p).replace(":", "_").replace("/", "_") for p in parts)


def _run(out: Path, say, **options) -> dict:
    """One ``hel train`` run (quiet, no plots); reuses a complete run with the same settings."""
    from hel_fpga.host.train.loop import TrainOptions, train
    metrics_file = out / "metrics.json"
    if metrics_file.exists():
        old = json.loads(metrics_file.read_text())
        if old.get("complete") and all(old["settings"].get(k) == v for k, v in options.items()):
            say(f"  reused {out}")
            return old
    t0 = time.perf_counter()
    metrics = train(TrainOptions(out=str(out), overwrite=True, plots=False, progress=False, **options))
    say(f"  {out.name}: {metrics.get('test_accuracy', float('nan')):.3f} "
        f"({metrics['evaluated_on']}) in {time.perf_counter() - t0:.0f} s")
    return metrics


def select(datasets, out: Path, say) -> dict:
    """Model selection per data set on a validation split (module docstring)."""
    chosen = {}
    for ds in datasets:
        task = f"aeon:{ds}"
        say(f"{ds}: float BPTT over {len(list(itertools.product(*GRID.values())))} settings × "
            f"{len(SELECT_SEEDS)} seeds, validation {VALIDATION:g} of the training split")
        scores = []
        for n, lr, epochs in itertools.product(*GRID.values()):
            runs = [_run(out / "select" / _slug(ds, "bptt", f"n{n}", f"lr{lr}", f"e{epochs}", f"s{s}"), say,
                         task=task, algorithm="bptt", oscillators=n, hidden=n, lr=lr, epochs=epochs,
                         seed=s, validation=VALIDATION)
                    for s in SELECT_SEEDS]
            acc = statistics.mean(r["test_accuracy"] for r in runs)
            loss = statistics.mean(r["final_test_loss"] for r in runs)
            scores.append(((-acc, loss, n, epochs, lr), dict(oscillators=n, hidden=n, lr=lr, epochs=epochs),
                           acc))
        scores.sort(key=lambda x: x[0])
        _, best, best_acc = scores[0]
        say(f"{ds}: BPTT chose N = M = {best['oscillators']}, lr {best['lr']}, {best['epochs']} epochs "
            f"(validation accuracy {best_acc:.3f}); now ε with float RHEL")
        eps_scores = []
        for eps in EPS_GRID:
            runs = [_run(out / "select" / _slug(ds, "rhel", f"n{best['oscillators']}", f"lr{best['lr']}",
                                                f"e{best['epochs']}", f"eps{eps}", f"s{s}"), say,
                         task=task, algorithm="rhel-float", eps=eps, seed=s, validation=VALIDATION, **best)
                    for s in SELECT_SEEDS]
            acc = statistics.mean(r["test_accuracy"] for r in runs)
            loss = statistics.mean(r["final_test_loss"] for r in runs)
            eps_scores.append(((-acc, loss, -eps), eps, acc))
        eps_scores.sort(key=lambda x: x[0])
        _, eps, eps_acc = eps_scores[0]
        chosen[ds] = dict(best, eps=eps, batch=8, validation_accuracy_bptt=best_acc,
                          validation_accuracy_rhel=eps_acc)
        say(f"{ds}: ε = {eps} (validation accuracy {eps_acc:.3f})")
    return chosen


def best_point(scores: list[tuple[dict, float, float]]) -> tuple[dict, float, float]:
    """The on-chip selection's winner among ``(point, mean validation accuracy, mean
    validation loss)``: the highest accuracy; ties go to the lower loss, then the
    lower lr, then the smaller ε."""
    return min(scores, key=lambda x: (-x[1], x[2], x[0]["lr"], x[0]["eps"]))


def _log2_name(x: float) -> str:
    return f"2^{int(round(math.log2(x)))}"


def select_onchip(datasets, out: Path, say) -> dict:
    """On-chip rates per data set on a validation split (module docstring). Returns,
    per data set, the chosen settings with ``validation_accuracy``/``validation_loss``
    and every point's scores, or ``fits: False`` with the store figures."""
    from hel_fpga.host.train.archive import ARCHIVE_BOARD, DATASET_DEFAULTS, GENERIC_DEFAULTS, board_fit
    chosen = {}
    points = [dict(zip(ONCHIP_GRID, v)) for v in itertools.product(*ONCHIP_GRID.values())]
    for ds in datasets:
        fit = board_fit(ds)
        if not fit.fits:
            say(f"{ds}: the {fit.board} board cannot take it ({fit.describe()}); no on-chip selection")
            chosen[ds] = dict(fits=False, why=fit.describe())
            continue
        d = DATASET_DEFAULTS.get(ds, GENERIC_DEFAULTS)
        size = dict(epochs=d["epochs"], batch=d["batch"])
        say(f"{ds}: on chip on {ARCHIVE_BOARD} ({fit.describe()}), {size['epochs']} epochs, "
            f"batch {size['batch']}: {len(points)} (lr, ε) × {len(SELECT_SEEDS)} seeds, validation "
            f"{VALIDATION:g} of the training split")
        scores = []
        for pt in points:
            runs = [_run(out / "select" / _slug(ds, "onchip", ARCHIVE_BOARD, f"e{size['epochs']}",
                                                f"lr{_log2_name(pt['lr'])}", f"eps{_log2_name(pt['eps'])}",
                                                f"s{s}"), say,
                         task=f"aeon:{ds}", on_chip=True, device="sim", board=ARCHIVE_BOARD,
                         optimizer=ONCHIP_OPTIMIZER, seed=s, validation=VALIDATION, **size, **pt)
                    for s in SELECT_SEEDS]
            scores.append((pt, statistics.mean(r["test_accuracy"] for r in runs),
                           statistics.mean(r["final_test_loss"] for r in runs)))
        best, acc, loss = best_point(scores)
        chosen[ds] = dict(size, optimizer=ONCHIP_OPTIMIZER, **best, fits=True, validation_accuracy=acc,
                          validation_loss=loss,
                          scores=[dict(p, validation_accuracy=a, validation_loss=v) for p, a, v in scores])
        say(f"{ds}: on chip chose lr {_log2_name(best['lr'])}, ε {_log2_name(best['eps'])} "
            f"(validation accuracy {acc:.3f}, loss {loss:.4f})")
    return chosen


def onchip_options(ds: str) -> dict:
    """The settings of the table's on-chip runs of ``ds`` (besides task, device, seed):
    the archive board and :data:`~hel_fpga.host.train.archive.ONCHIP_DEFAULTS`, or the
    data set's epochs and batch with the device's own rates."""
    from hel_fpga.host.train.archive import ARCHIVE_BOARD, DATASET_DEFAULTS, GENERIC_DEFAULTS, ONCHIP_DEFAULTS
    if ds in ONCHIP_DEFAULTS:
        return dict(ONCHIP_DEFAULTS[ds], board=ARCHIVE_BOARD)
    d = DATASET_DEFAULTS.get(ds, GENERIC_DEFAULTS)
    return dict({k: d[k] for k in ("epochs", "batch")}, board=ARCHIVE_BOARD)


def table_runs(datasets, algorithms, seeds, device: str, out: Path, say) -> list[dict]:
    from hel_fpga.host.train.archive import board_fit
    from hel_fpga.host.train.tasks import load_task
    rows = []
    defaults = {ds: load_task(f"aeon:{ds}").defaults for ds in datasets}
    fits = {ds: board_fit(ds) for ds in datasets} if "onchip" in algorithms else {}
    for ds in datasets:
        if ds in fits and not fits[ds].fits:
            say(f"{ds}: no on-chip runs: the {fits[ds].board} board cannot take it "
                f"({fits[ds].describe()})")
    for ds, alg, seed in itertools.product(datasets, algorithms, seeds):
        # The settings are explicit so that a reused run is one with these settings.
        if alg == "onchip":
            if not fits[ds].fits:
                continue
            opts = dict(task=f"aeon:{ds}", on_chip=True, device=device, seed=seed, **onchip_options(ds))
        else:
            opts = dict(task=f"aeon:{ds}", algorithm=alg, seed=seed, **defaults[ds])
        if alg == "hel":
            opts["device"] = device
        on_device = alg in ("hel", "onchip")
        m = _run(out / _slug(ds, alg, *([device] if on_device else []), f"s{seed}"), say, **opts)
        rows.append({"dataset": ds, "algorithm": alg, "device": m["device"], "seed": seed,
                     "test_accuracy": m["test_accuracy"], "final_test_loss": m["final_test_loss"],
                     "train_accuracy": m["train_accuracy"], "settings": m["settings"],
                     "wall_seconds": m["wall_seconds"], "history": m["history"]})
    return rows


def _cell(values) -> str:
    if not values:
        return "–"
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {statistics.stdev(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def format_table(rows: list[dict], datasets, algorithms) -> list[str]:
    from hel_fpga.host.train.archive import REFERENCES, board_fit
    refs = ("1-NN DTW", "ROCKET", "InceptionTime")
    onchip = "onchip" in algorithms
    head = (["data set", "N = M, epochs, lr, ε"] + (["on chip: lr, ε"] if onchip else [])
            + [COLUMN[a] for a in algorithms] + list(refs))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ds in datasets:
        mine = [r for r in rows if r["dataset"] == ds]
        fit = board_fit(ds) if onchip else None
        if not mine and (fit is None or fit.fits):
            continue
        cells = [ds]
        # the data set's settings (an on-chip run has its own rates)
        host = [r["settings"] for r in mine if r["algorithm"] != "onchip"]
        cells.append(f"{host[0]['oscillators']}, {host[0]['epochs']}, {host[0]['lr']:g}, {host[0]['eps']:g}"
                     if host else "–")
        if onchip:
            s = next((r["settings"] for r in mine if r["algorithm"] == "onchip"), None)
            cells.append(f"{_log2_name(s['lr'])}, {_log2_name(s['eps'])}" if s else "–")
        for a in algorithms:
            if a == "onchip" and not fit.fits:
                cells.append(f"the board lacks {fit.describe()}")
                continue
            cells.append(_cell([r["test_accuracy"] for r in mine if r["algorithm"] == a]))
        for ref in refs:
            r = REFERENCES.get(ds, {}).get(ref)
            cells.append("–" if r is None or r.accuracy is None else f"{r.accuracy:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def run(args) -> int:
    from hel_fpga.host.train.archive import bundled_datasets
    from hel_fpga.host.train.tasks import TaskError
    try:
        known = {n.lower(): n for n in bundled_datasets()}
    except TaskError as e:
        raise UsageError(str(e)) from None
    datasets = []
    for d in _list(args.datasets, "datasets"):
        if d.lower() not in known:
            raise UsageError(f"--datasets: unknown archive data set {d!r}; aeon bundles: "
                             f"{', '.join(known.values())}")
        datasets.append(known[d.lower()])
    seeds = _list(args.seeds, "seeds", int)
    algorithms = _list(args.algorithms, "algorithms")
    bad = [a for a in algorithms if a not in ALGORITHMS]
    if bad:
        raise UsageError(f"--algorithms: unknown {', '.join(bad)} (choose from {', '.join(ALGORITHMS)})")
    out = Path(args.out)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    if args.select:
        result = {}
        if any(a in FLOAT_ALGORITHMS for a in algorithms):
            chosen = result["float"] = select(datasets, out, say)
            print("DATASET_DEFAULTS = {")
            for ds, c in chosen.items():
                entry = {k: c[k] for k in ("oscillators", "hidden", "epochs", "batch", "lr", "eps")}
                print(f"    {ds!r}: dict({', '.join(f'{k}={v!r}' for k, v in entry.items())}),")
            print("}")
        if "onchip" in algorithms:
            chosen = result["onchip"] = select_onchip(datasets, out, say)
            print("ONCHIP_DEFAULTS = {")
            for ds, c in chosen.items():
                if not c["fits"]:
                    print(f"    # {ds}: the board cannot take it ({c['why']})")
                    continue
                entry = ", ".join(f"{k}={c[k]!r}" for k in ("epochs", "batch", "optimizer"))
                print(f"    {ds!r}: dict({entry}, lr=2.0 ** {round(math.log2(c['lr']))}, "
                      f"eps=2.0 ** {round(math.log2(c['eps']))}),  # validation accuracy "
                      f"{c['validation_accuracy']:.3f}")
            print("}")
        if args.json:
            Path(args.json).write_text(json.dumps(result if len(result) > 1 else next(iter(result.values())),
                                                  indent=2) + "\n")
        say(f"selection took {time.perf_counter() - t0:.0f} s")
        return 0
    rows = table_runs(datasets, algorithms, seeds, args.device, out, say)
    print("\n".join(format_table(rows, datasets, algorithms)))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    say(f"{len(rows)} runs in {time.perf_counter() - t0:.0f} s")
    return 0
