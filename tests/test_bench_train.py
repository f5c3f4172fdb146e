"""``hel bench train`` (host/commands/bench_train.py).

* The JSON rows of a ``--quick`` run restricted to the cheap rows (host-driven on the
  protocol model, the CPU): exactly the documented keys, their types, one pair of
  host-driven rows per board, the CPU rows.
* The host-driven projection against the same arithmetic written out here, on the
  traffic measured separately; the turnaround count of :class:`TrafficPort` on a
  scripted port.
* (Verilator) The on-chip cycles of one TRAIN epoch, measured over the protocol on the
  simulated board of a tiny configuration, bracket the pass's cycles counted directly
  in Amaranth's simulator of :class:`~hel_fpga.rtl.training.TrainingCore` (from the
  TRAIN command's done to ``training`` low), with the same data and state.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from hel_fpga.boards.table import BOARDS
from hel_fpga.host.cli import main
from hel_fpga.host.commands import bench_train as bt
from hel_fpga.host.errors import UsageError
from hel_fpga.host.train.tasks import load_task


def _types_ok(r: dict) -> list[str]:
    bad = []
    for key in ("target", "mode", "task", "source"):
        if not isinstance(r[key], str):
            bad.append(key)
    for key in ("n", "m", "k", "o", "t"):
        if not (isinstance(r[key], int) and not isinstance(r[key], bool) and r[key] >= 1):
            bad.append(key)
    for key in ("c", "p"):      # None on the CPU
        if r[key] is not None and not (isinstance(r[key], int) and r[key] >= 1):
            bad.append(key)
    if r["clock_hz"] is not None and not (isinstance(r["clock_hz"], int) and r["clock_hz"] > 0):
        bad.append("clock_hz")
    for key in ("cycles_per_sample", "samples_per_s"):
        v = r[key]
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
            bad.append(key)
    return bad


@pytest.fixture(scope="module")
def quick_rows():
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["bench", "train", "--json", "--quick", "--modes", "host-driven,cpu",
                   "--tasks", "oscillators"])
    assert rc == 0
    return json.loads(out.getvalue())


def test_quick_json_rows_have_exactly_the_documented_keys_and_types(quick_rows):
    assert isinstance(quick_rows, list) and quick_rows
    for r in quick_rows:
        assert tuple(r) == bt.ROW_KEYS, r
        assert not _types_ok(r), (r, _types_ok(r))
        assert r["source"].startswith(tuple(bt.SOURCES.values())), r["source"]
        assert (r["task"], r["n"], r["m"], r["k"], r["o"], r["t"]) == \
            ("oscillators", 16, 16, 2, 1, 64)
        # samples in flight: one host-driven, none on the CPU (no engines)
        assert r["c"] == (None if r["target"] == "cpu" else 1), r
    hd = [r for r in quick_rows if r["mode"].startswith("host-driven")]
    assert sorted((r["target"], r["mode"]) for r in hd) == sorted(
        (b, m) for b in BOARDS for m in bt.LATENCIES)
    for r in hd:
        b = BOARDS[r["target"]]
        assert r["clock_hz"] == b.clk_hz and r["p"] == b.config.lanes
        assert r["cycles_per_sample"] is None and r["samples_per_s"] > 0
        assert r["source"].startswith(bt.SOURCES["projection"])
    cpu = {r["mode"]: r for r in quick_rows if r["target"] == "cpu"}
    assert set(cpu) == {"float-bptt", "torch-bptt"}
    assert cpu["float-bptt"]["samples_per_s"] > 0 and cpu["float-bptt"]["p"] is None
    assert cpu["float-bptt"]["source"].startswith(bt.SOURCES["cpu"])
    if not bt.torch_available():
        assert cpu["torch-bptt"]["samples_per_s"] is None
        assert cpu["torch-bptt"]["source"].startswith(bt.SOURCES["skipped"])
    assert not [r for r in quick_rows if r["mode"] == "on-chip"]


def test_projection_is_bytes_at_the_baud_plus_a_latency_per_turnaround(quick_rows):
    # The formula, by hand: 1000 B × 10 bits at 3 Mbaud = 3.333 ms, 5 × 1 ms: 8.333 ms.
    assert bt.project_samples_per_s(1000, 5, 3_000_000, 1e-3) == pytest.approx(120.0)
    assert bt.project_samples_per_s(300, 0, 3_000_000, 16e-3) == pytest.approx(1000.0)
    # The rows, from the traffic measured again here (the same seed: the same bytes).
    task = load_task("oscillators")
    for name in ("icebreaker", "ulx3s-85f"):
        b = BOARDS[name]
        cfg = bt.workload_config(b.config, task, 16, 16)
        tr = bt.measure_host_traffic(cfg, task, bt.HOST_BATCHES[1])
        assert tr.samples == task.defaults["batch"]
        for mode, lat in bt.LATENCIES.items():
            want = 1.0 / ((tr.tx + tr.rx) / tr.samples * 10 / b.baud
                          + tr.turnarounds / tr.samples * lat)
            got, = [r["samples_per_s"] for r in quick_rows
                    if r["target"] == name and r["mode"] == mode]
            assert got == pytest.approx(want, abs=0.006)


class ScriptedPort:
    def __init__(self, replies):
        self.replies = list(replies)
        self.timeout = 0.05
        self.written = b""

    @property
    def in_waiting(self):
        return len(self.replies[0]) if self.replies else 0

    def write(self, data):
        self.written += data
        return len(data)

    def read(self, n=1):
        return self.replies.pop(0) if self.replies else b""

    def close(self):
        pass


def test_traffic_port_counts_bytes_both_ways_and_one_turnaround_per_wait():
    p = bt.TrafficPort(ScriptedPort([b"ab", b"", b"cde", b"f", b"gh"]))
    p.write(b"123")            # request
    p.read(2)                  # reply starts: turnaround 1
    p.read(1)                  # nothing yet
    p.read(3)                  # more of the same reply: no new turnaround
    p.write(b"4")
    p.write(b"56")             # one request in two writes
    p.read(1)                  # turnaround 2
    p.reset_input_buffer()     # flushed bytes count, same turnaround
    assert (p.tx, p.rx, p.turnarounds) == (6, 8, 2)


def test_workload_specs():
    w = bt.Workload.parse("oscillators@32")
    assert (w.task_name, w.size) == ("oscillators", 32)
    assert bt.Workload.parse(" sine ").size is None
    with pytest.raises(UsageError):
        bt.Workload.parse("sine@x")
    task, n, m = bt.Workload.parse("oscillators").load()
    assert (n, m, task.k, task.o, task.t) == (16, 16, 2, 1, 64)
    # The simulated configuration: the board's, with the workload's sizes and a store
    # for the whole training set (128 records of T·(K + O + 1) = 256 words).
    cfg = bt.onchip_config(BOARDS["ulx3s-85f"].config, task, 16, 16, len(task.train_idx))
    assert cfg == BOARDS["ulx3s-85f"].config.replace(n=16, m=16, store_words=32768)
    n64 = bt.onchip_config(BOARDS["ulx3s-85f-n64"].config, task, 32, 32, len(task.train_idx))
    assert (n64.n, n64.k, n64.o, n64.lanes, n64.t_max) == (32, 2, 1, 8, 512)


# ---------------------------------------------------------------------------- on chip
#: A tiny core with a real store: the pass is about 20,000 cycles (Amaranth's simulator
#: takes some seconds for it).
TINY = dict(n=4, m=4, k=1, o=1, t_max=16, lanes=1)


def _tiny_setup():
    from hel_fpga.host.train.onchip import TrainState
    from hel_fpga.sim.onchip import SampleStore
    from hel_fpga.spec.formats import HelConfig
    from hel_fpga.spec.training import TrainConfig, TrainFormats, record_words

    count, steps = 6, 16
    tc = TrainConfig(loss="mse", optimizer="lion", batch_log2=1, lr_log2=7, epochs=4, seed=5)
    words = 1 << (count * record_words(HelConfig(**TINY), "mse", steps) - 1).bit_length()
    cfg = HelConfig(**TINY, store_words=words)
    rng = np.random.default_rng(7)
    f = cfg.operand
    u = np.clip(np.rint(rng.normal(0, 0.5, (count, steps, cfg.k)) * f.scale), f.min_int, f.max_int)
    y = np.clip(np.rint(rng.normal(0, 0.3, (count, steps, cfg.o)) * f.scale), f.min_int, f.max_int)
    store = SampleStore.regression(cfg, u.astype(np.int64), y.astype(np.int64))
    fm = TrainFormats(cfg)
    master = {k: np.rint(rng.normal(0, 0.3, s) * fm.master.scale).astype(np.int64)
              for k, s in cfg.param_shapes().items()}
    master["alpha"] = np.abs(master["alpha"]) + int(fm.master.scale) // 2
    moment = {k: np.zeros(s, dtype=np.int64) for k, s in cfg.param_shapes().items()}
    return cfg, store, tc, TrainState(master, moment, 0)


def _direct_pass_cycles(cfg, store, tc, state) -> tuple[int, dict]:
    """TRAIN of epoch 0 on TrainingCore alone in Amaranth's simulator, no idle and no
    backpressure: cycles from the command's done to ``training`` low."""
    from test_training_core import Driver, flat, run

    from hel_fpga.rtl.core import Op
    from hel_fpga.rtl.training import TrainingCore
    from hel_fpga.spec.training import pack_setup

    dut = TrainingCore(cfg)
    out = {}

    async def bench(ctx):
        d = Driver(ctx, dut, random.Random(0), idle=0.0, stall=0.0)
        # The host's order (ProtocolOnChipDevice): store, setup, moments, master weights.
        await d.store([int(x) for x in store.image(cfg)])
        assert await d.setup(pack_setup(cfg, tc, store.steps, store.count, 0)) == 1
        await d.write_master(1, flat(state.moment))
        await d.write_master(0, flat(state.master))
        out["metrics"], out["cycles"] = await d.run_pass(Op.TRAIN, length=0)

    run(dut, bench, max_cycles=5_000_000)
    return out["cycles"], out["metrics"]


@pytest.mark.verilator
def test_onchip_cycles_over_the_protocol_bracket_the_direct_count():
    cfg, store, tc, state = _tiny_setup()
    direct, metrics = _direct_pass_cycles(cfg, store, tc, state)
    assert metrics["samples"] == store.count
    r = bt.measure_onchip(cfg, store, tc, state)
    assert r.samples == store.count
    assert r.lower <= direct <= r.cycles, (r.lower, direct, r.cycles)
    # The over-count is the TRAIN frame and about two METRICS exchanges: a few
    # thousand cycles at the simulated board's 40 cycles per byte.
    assert r.cycles - direct < 10_000, (r.cycles, direct)


@pytest.mark.parametrize("engines", ["0", "17"])
def test_engines_out_of_range_is_one_line(engines, capsys):
    assert main(["bench", "train", "--modes", "cpu", "--engines", engines]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--engines wants 1" in err and engines in err


@pytest.mark.parametrize("engines", [None, 1, 3])
def test_engines_apply_to_every_on_chip_target_including_the_store_less_sim_board(engines):
    """``--engines C`` reaches the simulated board, whose base configuration has no
    store (a store-less configuration rejects C > 1), and every table board with one."""
    from hel_fpga.sim.board import SIM_CONFIG
    task = load_task("oscillators")
    bases = [SIM_CONFIG] + [b.config for b in BOARDS.values() if b.config.store_words]
    for base in bases:
        cfg = bt.onchip_config(base, task, 16, 16, len(task.train_idx), engines)
        assert cfg.store_words > 0
        assert cfg.engines == (base.engines if engines is None else engines)
        assert (cfg.n, cfg.m, cfg.k, cfg.o) == (16, 16, task.k, task.o)
