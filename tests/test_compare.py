"""``hel compare``: the golden integer gradients against float BPTT (issue 2's bar)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from hel_fpga.host.cli import main
from hel_fpga.host.commands.compare import integer_run
from hel_fpga.host.device import GoldenDevice
from hel_fpga.host.learning import config_for, default_eps
from hel_fpga.sim.problems import load_problem, reference_problem, save_problem
from hel_fpga.sim.reference import Problem, bptt, cosine


def rel_norm_ratio(a, b):
    return np.linalg.norm(a) / np.linalg.norm(b)


def check_problem(p: Problem, estimator="centred"):
    _, g_ref = bptt(p)
    cfg = config_for(p.n, p.m, p.k, p.o, p.t, p.dt)
    run = integer_run(GoldenDevice(cfg), p, default_eps(p.mask, estimator), estimator)
    g, status = run["gradients"], run["status"]
    assert not status.state_overflow and not status.acc_overflow
    for name in g_ref:
        assert cosine(g[name], g_ref[name]) >= 0.999, name
        assert abs(rel_norm_ratio(g[name], g_ref[name]) - 1) <= 0.02, name


@pytest.mark.parametrize("final_step_only", [False, True])
def test_golden_gradient_matches_bptt_on_the_reference_problem(final_step_only):
    check_problem(reference_problem(final_step_only=final_step_only))


@pytest.mark.parametrize("seed", range(16))
def test_golden_gradient_matches_bptt_on_random_problems(seed):
    """N, M ≤ 20, T ≤ 120, the issue's distributions; odd seeds use a final-step loss."""
    rng = np.random.default_rng(1000 + seed)
    p = Problem.random(rng, n=int(rng.integers(4, 21)), m=int(rng.integers(4, 21)), k=2,
                       o=int(rng.integers(1, 3)), t=int(rng.integers(20, 121)), dt=1 / 8,
                       final_step_only=bool(seed % 2))
    check_problem(p)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "hel_fpga.host.cli", *args], capture_output=True, text=True)


def test_compare_json_and_save_report_the_same_gradients(tmp_path, capsys):
    out = tmp_path / "g.npz"
    assert main(["compare", "--json", "--save", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["param"] for r in report["rows"]] == ["W", "B", "b", "alpha"]
    saved = np.load(out)
    assert sorted(saved.files) == sorted(f"{a}_{p}" for a in ("bptt", "rhel", "golden")
                                         for p in ("W", "B", "b", "alpha"))
    for row in report["rows"]:
        p = row["param"]
        assert row["golden_cos"] == pytest.approx(cosine(saved[f"golden_{p}"], saved[f"bptt_{p}"]))
    _, g_ref = bptt(reference_problem())
    assert np.allclose(saved["bptt_W"], g_ref["W"])


def test_compare_reads_a_problem_file(tmp_path, capsys):
    path = tmp_path / "p.npz"
    p = Problem.random(np.random.default_rng(5), n=6, m=5, k=3, o=2, t=30, dt=1 / 16)
    save_problem(path, p)
    assert load_problem(path).W.shape == (5, 6)
    assert main(["compare", "--problem", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["n"] == 6 and report["config"]["dt_log2"] == 4
    assert min(r["golden_cos"] for r in report["rows"]) > 0.999


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("alpha"), "missing array(s) alpha"),
    (lambda d: d.update(B=np.zeros((3, 3))), "B has shape (3, 3), expected (5, 3)"),
    (lambda d: d.update(dt=np.float64(0.1)), "dt = 0.1 is not a power of two"),
    (lambda d: d.update(W=d["W"] * 1000), "parameter W does not fit"),
    (lambda d: d.update(mask=np.zeros(30, bool)), "mask selects no loss step"),
])
def test_malformed_problem_files_get_a_one_line_error_and_exit_2(tmp_path, mutate, message):
    p = Problem.random(np.random.default_rng(5), n=6, m=5, k=3, o=2, t=30, dt=1 / 16)
    d = dict(W=p.W, B=p.B, b=p.b, alpha=p.alpha, u=p.u, y=p.y, mask=p.mask, dt=np.float64(p.dt))
    mutate(d)
    path = tmp_path / "bad.npz"
    np.savez(path, **d)
    r = run_cli("compare", "--problem", str(path))
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_not_a_problem_file_is_rejected(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip")
    r = run_cli("compare", "--problem", str(path))
    assert r.returncode == 2 and "not a readable .npz file" in r.stderr


def test_hel_help_lists_compare():
    r = run_cli("--help")
    assert r.returncode == 0 and "compare" in r.stdout
