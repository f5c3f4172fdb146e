"""Archive tasks (``--task aeon:NAME``), validation hold-outs and ``hel archive``.

The reference for every data check is aeon's own loader, read here directly
and normalised with plain NumPy, independent of :mod:`hel_fpga.host.train.archive`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

aeon_datasets = pytest.importorskip("aeon.datasets")

from hel_fpga.host.cli import main  # noqa: E402
from hel_fpga.host.errors import UsageError  # noqa: E402
from hel_fpga.host.train.archive import REFERENCES, bundled_datasets, load_aeon_task  # noqa: E402
from hel_fpga.host.train.loop import _adapt_to_device  # noqa: E402
from hel_fpga.host.train.tasks import INPUT_LIMIT, TaskError, load_task, make_oscillators  # noqa: E402
from hel_fpga.spec.formats import HelConfig  # noqa: E402


def _raw(name):
    """aeon's arrays for both splits: list of (T_i, K) series, label strings."""
    out = {}
    for split in ("train", "test"):
        x, y = aeon_datasets.load_classification(name, split=split)
        out[split] = ([np.asarray(s, float).T for s in x], [str(v).lower() for v in y])
    return out


def test_bundled_datasets_are_the_classification_sets_aeon_loads_offline():
    names = bundled_datasets()
    assert {"JapaneseVowels", "GunPoint", "ItalyPowerDemand", "BasicMotions"} <= set(names)
    # Regression and forecasting folders of the wheel are not offered.
    assert "Covid3Month" not in names and "Airline" not in names
    for name in names:
        x, y = aeon_datasets.load_classification(name, split="test")
        assert len(x) == len(y) > 0


def test_archive_split_labels_and_normalisation_follow_the_training_split_only():
    raw = _raw("BasicMotions")
    task = load_task("aeon:BasicMotions")
    train_x, train_y = raw["train"]
    test_x, test_y = raw["test"]
    assert (task.split == 0).sum() == len(train_x) and (task.split == 1).sum() == len(test_x)
    # Labels: one output per class, the same class always the same output.
    names = train_y + test_y
    assert task.o == len(set(names))
    for c in set(names):
        assert len(set(task.labels[[i for i, v in enumerate(names) if v == c]])) == 1
    # Per-channel z-score with the training split's statistics, clipped to the input range.
    steps = np.concatenate(train_x)
    mean, std = steps.mean(0), steps.std(0)
    want = np.clip((np.stack(train_x + test_x) - mean) / std, -INPUT_LIMIT, INPUT_LIMIT)
    np.testing.assert_allclose(task.u, want, rtol=0, atol=1e-12)
    assert np.abs(task.u).max() <= INPUT_LIMIT


def test_variable_length_series_are_front_padded_so_each_ends_on_the_final_step():
    raw = _raw("JapaneseVowels")
    task = load_task("aeon:JapaneseVowels")
    series = raw["train"][0] + raw["test"][0]
    lengths = {len(s) for s in series}
    assert len(lengths) > 1 and task.t == max(lengths)
    steps = np.concatenate(raw["train"][0])
    mean, std = steps.mean(0), steps.std(0)
    for i in (0, 1, len(raw["train"][0]), len(series) - 1):
        s = series[i]
        pad = task.t - len(s)
        assert np.all(task.u[i, :pad] == 0)
        np.testing.assert_allclose(task.u[i, pad:], np.clip((s - mean) / std, -INPUT_LIMIT, INPUT_LIMIT),
                                   atol=1e-12)


def test_unknown_archive_name_is_one_line_naming_the_bundled_sets():
    with pytest.raises(TaskError) as e:
        load_task("aeon:NoSuchSet")
    msg = str(e.value)
    assert "\n" not in msg and "NoSuchSet" in msg and "GunPoint" in msg and "JapaneseVowels" in msg
    # Names are matched without regard to case.
    assert load_aeon_task("gunpoint").name == "aeon:GunPoint"


def test_holdout_takes_a_stratified_part_of_the_training_split_and_no_test_sample():
    task = load_task("aeon:JapaneseVowels")
    val = task.holdout(0.25, seed=3)
    train_u = task.u[task.split == 0]
    # Every sample of the hold-out task is a training sample of the original.
    flat = {u.tobytes() for u in train_u}
    assert all(u.tobytes() in flat for u in val.u)
    assert len(val.u) == len(train_u)
    per_class = np.bincount(val.labels[val.split == 1], minlength=task.o)
    totals = np.bincount(task.labels[task.split == 0], minlength=task.o)
    np.testing.assert_array_equal(per_class, np.round(0.25 * totals).astype(int))
    # Same seed, same split; the regression path keeps targets and masks aligned.
    np.testing.assert_array_equal(task.holdout(0.25, seed=3).split, val.split)
    osc = make_oscillators()
    v = osc.holdout(0.5)
    i = int(np.flatnonzero(v.split == 1)[0])
    j = int(np.flatnonzero((osc.u == v.u[i]).all(axis=(1, 2)))[0])
    np.testing.assert_array_equal(v.y[i], osc.y[j])
    with pytest.raises(TaskError, match="fraction"):
        task.holdout(1.0)


def _device(**kw):
    return HelConfig(**{**dict(n=64, m=64, k=12, o=9, t_max=256, dt_log2=3), **kw})


def test_a_classifier_runs_on_a_device_with_more_outputs_and_inputs():
    task = load_task("aeon:GunPoint")
    settings = {"oscillators": 64, "hidden": 64}
    _adapt_to_device(_device(), "board", task, settings, fixed_size=False)
    assert task.o == 9 and task.k == 12
    assert np.all(task.u[:, :, 1:] == 0)
    # Labels stay where they were: the extra outputs are classes that never occur.
    assert task.labels.max() == 1


@pytest.mark.parametrize("kw, words", [
    (dict(o=4), ["4 outputs", "9"]),
    (dict(k=2), ["2 inputs", "12"]),
    (dict(t_max=16), ["t_max 16", "29 steps"]),
])
def test_a_device_too_small_for_the_data_set_says_what_does_not_fit(kw, words):
    task = load_task("aeon:JapaneseVowels")
    with pytest.raises(UsageError) as e:
        _adapt_to_device(_device(**kw), "/dev/ttyUSB1", task, {"oscillators": 64, "hidden": 64},
                         fixed_size=False)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words) and "board" in msg


def test_a_regression_task_still_needs_exactly_the_device_outputs():
    task = make_oscillators()
    with pytest.raises(UsageError, match=r"2 outputs \(the task has 1\)"):
        _adapt_to_device(_device(o=2, k=2), "board", task, {"oscillators": 64, "hidden": 64},
                         fixed_size=False)


def test_every_reference_figure_names_its_source():
    for ds, refs in REFERENCES.items():
        assert ds in bundled_datasets()
        for name, ref in refs.items():
            assert ref.source
            assert ref.accuracy is None or 0 < ref.accuracy <= 1


def test_hel_train_on_an_archive_task_with_validation_reports_the_validation_split(tmp_path, capsys):
    rc = main(["train", "--task", "aeon:UnitTest", "--algorithm", "bptt", "--epochs", "1",
               "--oscillators", "8", "--hidden", "8", "--validation", "0.3", "--no-plots", "--json",
               "--out", str(tmp_path / "run")])
    assert rc == 0
    m = json.loads(capsys.readouterr().out)
    assert m["evaluated_on"] == "validation" and m["settings"]["validation"] == 0.3
    train_n = int((load_task("aeon:UnitTest").split == 0).sum())
    # The validation samples come out of the training split (none of the 22 test series).
    assert m["history"][-1]["test_accuracy"] is not None
    assert round(m["train_seconds"] * m["samples_per_second"]) < train_n


def test_hel_archive_rejects_unknown_data_sets_and_algorithms(capsys):
    assert main(["archive", "--datasets", "GunPoint,Nope"]) == 2
    assert "unknown archive data set 'Nope'" in capsys.readouterr().err
    assert main(["archive", "--algorithms", "sgd"]) == 2
    assert "unknown sgd" in capsys.readouterr().err


def test_hel_archive_table_reuses_complete_runs_and_prints_references(tmp_path, capsys, monkeypatch):
    from hel_fpga.host.train import archive
    monkeypatch.setitem(archive.DATASET_DEFAULTS, "ItalyPowerDemand",
                        dict(oscillators=8, hidden=8, epochs=1, batch=8, lr=0.01, eps=0.03))
    args = ["archive", "--datasets", "ItalyPowerDemand", "--seeds", "0", "--algorithms", "bptt",
            "--out", str(tmp_path), "--json", str(tmp_path / "rows.json")]
    assert main(args) == 0
    first = capsys.readouterr()
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert len(rows) == 1 and rows[0]["algorithm"] == "bptt"
    assert "| ItalyPowerDemand |" in first.out and "0.950" in first.out  # 1-NN DTW beside ours
    assert main(args) == 0
    assert "reused" in capsys.readouterr().err
    assert json.loads((tmp_path / "rows.json").read_text())[0]["test_accuracy"] == rows[0]["test_accuracy"]


@pytest.fixture
def tiny_board(monkeypatch):
    """A board entry of N = M = 8, K = O = 2 with a store, registered as the archive board."""
    import dataclasses

    from hel_fpga.boards import table
    from hel_fpga.host.train import archive
    n64 = table.BOARDS["ulx3s-85f-n64"]
    board = dataclasses.replace(n64, name="test-tiny", config=n64.config.replace(
        n=8, m=8, k=2, o=2, t_max=64, store_words=4096))
    monkeypatch.setitem(table.BOARDS, board.name, board)
    monkeypatch.setattr(archive, "ARCHIVE_BOARD", board.name)
    return board.name


def test_hel_archive_on_chip_column_equals_hel_train_on_chip_on_the_board(tmp_path, capsys, monkeypatch,
                                                                          tiny_board):
    """``--algorithms onchip`` is ``hel train --on-chip --board`` with the set's epochs
    and batch and the device's own rates: the same accuracy as that run."""
    from hel_fpga.host.train import archive
    monkeypatch.setitem(archive.DATASET_DEFAULTS, "UnitTest",
                        dict(oscillators=8, hidden=8, epochs=2, batch=8, lr=0.01, eps=0.03))
    assert main(["archive", "--datasets", "UnitTest", "--seeds", "0", "--algorithms", "onchip",
                 "--out", str(tmp_path / "a"), "--json", str(tmp_path / "rows.json")]) == 0
    assert "HEL, on chip" in capsys.readouterr().out
    row, = json.loads((tmp_path / "rows.json").read_text())
    assert main(["train", "--task", "aeon:UnitTest", "--on-chip", "--device", "sim", "--seed", "0",
                 "--board", tiny_board, "--epochs", "2", "--batch", "8", "--no-plots",
                 "--json", "--out", str(tmp_path / "direct")]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert row["settings"]["on_chip"] is True and row["settings"]["board"] == tiny_board
    assert direct["config"]["n"] == 8 and direct["config"]["k"] == 2
    assert (row["test_accuracy"], row["final_test_loss"]) == (direct["test_accuracy"], direct["final_test_loss"])


# --------------------------------------------------------------------------- on chip

def test_board_fit_counts_the_records_of_both_splits_against_the_archive_board():
    """Independent count: aeon's series per split, T = the longest, one record is
    T·K input words (the data set's own K) plus a label word; the store, K, O and
    t_max are the board entry's."""
    from hel_fpga.boards.table import BOARDS
    from hel_fpga.host.train.archive import ARCHIVE_BOARD, board_fit
    board = BOARDS[ARCHIVE_BOARD].config
    assert (board.store_words, board.k, board.o) == (65536, 12, 9)
    for name in ("JapaneseVowels", "GunPoint", "ItalyPowerDemand", "BasicMotions"):
        raw = _raw(name)
        series = raw["train"][0] + raw["test"][0]
        t, k = max(len(s) for s in series), series[0].shape[1]
        fit = board_fit(name)
        assert (fit.samples, fit.steps, fit.k) == (len(series), t, k)
        assert fit.words == len(series) * (t * k + 1)
        assert fit.resident == (len(series) * (t * k + 1) <= 65536) and fit.fits
    jv = board_fit("JapaneseVowels")
    assert not jv.resident and jv.describe() == "640 × 349 = 223,360 words > 65,536: streamed"
    assert all(board_fit(n).resident for n in ("GunPoint", "ItalyPowerDemand", "BasicMotions"))
    assert board_fit("GunPoint").describe() == "200 × 151 = 30,200 words ≤ 65,536: resident"
    small = board_fit("BasicMotions", board="ulx3s-85f")        # K = 2, O = 1
    assert not small.fits and small.describe() == "6 channels > K = 2; 4 classes > O = 1"


def test_best_point_takes_accuracy_then_lower_loss_then_lower_lr_then_smaller_eps():
    from hel_fpga.host.commands.archive import best_point

    def pt(lr, eps):
        return {"lr": 2.0 ** -lr, "eps": 2.0 ** -eps}
    scores = [(pt(6, 2), 0.90, 0.10), (pt(7, 2), 0.95, 0.30), (pt(8, 3), 0.95, 0.20)]
    assert best_point(scores)[0] == pt(8, 3)                           # same accuracy, lower loss
    assert best_point(scores + [(pt(6, 3), 0.96, 9.0)])[0] == pt(6, 3)  # accuracy first
    tie = [(pt(6, 2), 0.9, 0.2), (pt(7, 2), 0.9, 0.2), (pt(7, 3), 0.9, 0.2)]
    assert best_point(tie)[0] == pt(7, 3)                               # lower lr, then smaller ε


def _fake_run(calls, best):
    """A stand-in for one ``hel train`` run: its accuracy peaks at ``best`` (lr, ε),
    the two next points tie on accuracy and differ in loss."""
    def run(out, say, **o):
        calls.append(o)
        key = (o.get("lr"), o.get("eps"))
        acc = 0.9 if key == best else 0.8 if key in ((2.0 ** -6, 0.25), (2.0 ** -8, 0.125)) else 0.5
        loss = 0.3 if key == (2.0 ** -6, 0.25) else 0.4
        return {"test_accuracy": acc + 0.01 * o["seed"], "final_test_loss": loss, "train_accuracy": acc,
                "device": o.get("device", "cpu"), "settings": dict(o), "wall_seconds": 1.0, "history": []}
    return run


def test_onchip_selection_uses_the_validation_split_on_the_archive_board(capsys, monkeypatch, tiny_board):
    from hel_fpga.host.commands import archive as cmd
    from hel_fpga.host.train import archive
    monkeypatch.setitem(archive.DATASET_DEFAULTS, "UnitTest",
                        dict(oscillators=8, hidden=8, epochs=3, batch=4, lr=0.01, eps=0.03))
    calls = []
    monkeypatch.setattr(cmd, "_run", _fake_run(calls, best=(2.0 ** -7, 0.125)))
    assert main(["archive", "--select", "--algorithms", "onchip", "--datasets", "UnitTest,BasicMotions",
                 "--out", "unused"]) == 0
    out = capsys.readouterr().out
    # Every run: on chip, the golden model of the archive board, the validation hold-out
    # (never the test split), the data set's epochs and batch; the whole grid for seeds 0 and 1.
    assert all(c["on_chip"] and c["device"] == "sim" and c["board"] == tiny_board
               and c["validation"] == 0.25 and c["optimizer"] == "lion"
               and (c["epochs"], c["batch"]) == (3, 4) and "oscillators" not in c for c in calls)
    assert {c["task"] for c in calls} == {"aeon:UnitTest"}     # BasicMotions: no run at all
    assert sorted((c["lr"], c["eps"], c["seed"]) for c in calls) == sorted(
        (lr, eps, s) for lr in (2 ** -6, 2 ** -7, 2 ** -8) for eps in (0.25, 0.125) for s in (0, 1))
    assert ("'UnitTest': dict(epochs=3, batch=4, optimizer='lion', "
            "lr=2.0 ** -7, eps=2.0 ** -3),  # validation accuracy 0.905") in out
    assert "# BasicMotions: the board cannot take it (6 channels > K = 2; 4 classes > O = 2; T = 100 > t_max = 64)" in out
    # Without the peak, the tie at 0.8 goes to the lower validation loss.
    calls.clear()
    monkeypatch.setattr(cmd, "_run", _fake_run(calls, best=None))
    assert main(["archive", "--select", "--algorithms", "onchip", "--datasets", "UnitTest", "--out", "x"]) == 0
    assert "lr=2.0 ** -6, eps=2.0 ** -2" in capsys.readouterr().out


def test_table_on_chip_runs_take_onchip_defaults_on_the_board_and_name_sets_it_cannot_take(
        capsys, monkeypatch, tiny_board):
    from hel_fpga.host.commands import archive as cmd
    from hel_fpga.host.train import archive
    monkeypatch.setitem(archive.DATASET_DEFAULTS, "UnitTest",
                        dict(oscillators=8, hidden=8, epochs=3, batch=4, lr=0.01, eps=0.03))
    monkeypatch.setitem(archive.ONCHIP_DEFAULTS, "UnitTest", dict(epochs=3, batch=4, optimizer="lion",
                                                                  lr=2.0 ** -8, eps=0.125))
    calls = []
    monkeypatch.setattr(cmd, "_run", _fake_run(calls, best=None))
    assert main(["archive", "--algorithms", "hel,onchip", "--seeds", "0,1", "--datasets",
                 "UnitTest,BasicMotions", "--device", "sim", "--out", "unused"]) == 0
    out = capsys.readouterr().out
    onchip = [c for c in calls if c.get("on_chip")]
    assert [c["seed"] for c in onchip] == [0, 1] and all(
        c["task"] == "aeon:UnitTest" and (c["lr"], c["eps"], c["board"], c["epochs"], c["batch"])
        == (2.0 ** -8, 0.125, tiny_board, 3, 4) for c in onchip)
    bm = next(line for line in out.splitlines() if line.startswith("| BasicMotions |"))
    assert "the board lacks 6 channels > K = 2; 4 classes > O = 2; T = 100 > t_max = 64" in bm
    assert "| 2^-8, 2^-3 |" in next(line for line in out.splitlines() if line.startswith("| UnitTest |"))
