"""cocotb testbench of ``training_core`` (the Verilog of :class:`hel_fpga.rtl.training.TrainingCore`).

Started by ``tests/test_training_cocotb.py`` with the configuration in ``HEL_CFG``
and the random seed in ``HEL_SEED``. The reference is the device's golden unit,
:class:`hel_fpga.sim.onchip.TrainingUnit` on a :class:`~hel_fpga.sim.golden.GoldenCore`,
fed the same commands: master weights and moments read back after every pass,
and the metrics of every pass, must equal it bit for bit. Sources insert random
idle cycles, sinks drop ``ready`` at random (``HEL_IDLE``, ``HEL_BACKPRESSURE``).

Handshakes are sampled at the falling edge and driven right after the rising edge,
as in :mod:`cocotb_core.tb_core`.
"""

from __future__ import annotations

import os
import random

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, RisingEdge

from hel_fpga.rtl.core import CmdLayout, DoneLayout, Op, Result
from hel_fpga.rtl.training import MetricsLayout
from hel_fpga.sim.golden import GoldenCore
from hel_fpga.sim.onchip import SampleStore, TrainingUnit
from hel_fpga.spec.formats import HelConfig
from hel_fpga.spec.names import PARAM_NAMES
from hel_fpga.spec.training import TrainConfig, TrainFormats, epoch_order, pack_setup

CFG = HelConfig.from_json(os.environ.get("HEL_CFG", "{}"))
SEED = int(os.environ.get("HEL_SEED", "1"))
IDLE = float(os.environ.get("HEL_IDLE", "0.3"))
BACKPRESSURE = float(os.environ.get("HEL_BACKPRESSURE", "0.3"))
TIMEOUT_CYCLES = 3_000_000
RESULT_MASK = (1 << DoneLayout["result"].width) - 1


def _signed(v: int, width: int) -> int:
    return v - (1 << width) if v >> (width - 1) & 1 else v


class Driver:
    def __init__(self, dut, rng: random.Random):
        self.dut, self.rng, self.cycles = dut, rng, 0

    async def tick(self):
        await RisingEdge(self.dut.clk)
        self.cycles += 1
        assert self.cycles < TIMEOUT_CYCLES, "watchdog: a handshake hung"

    async def send(self, port: str, words, width: int):
        valid, ready, payload = (getattr(self.dut, f"{port}__{m}") for m in ("valid", "ready", "payload"))
        for w in words:
            while self.rng.random() < IDLE:
                await self.tick()
            payload.value = int(w) & ((1 << width) - 1)
            valid.value = 1
            while True:
                await FallingEdge(self.dut.clk)
                taken = int(ready.value)
                await self.tick()
                if taken:
                    break
            valid.value = 0

    async def receive(self, port: str, n: int, width: int) -> list[int]:
        valid, ready, payload = (getattr(self.dut, f"{port}__{m}") for m in ("valid", "ready", "payload"))
        got = []
        while len(got) < n:
            ready.value = int(self.rng.random() >= BACKPRESSURE)
            await FallingEdge(self.dut.clk)
            if int(valid.value) and int(ready.value):
                got.append(_signed(int(payload.value), width))
            await self.tick()
        ready.value = 0
        return got

    async def command(self, op, *, length=0, bank=0, seed=0, send=None, port=None, width=0,
                      receive=0, out=None, out_width=0):
        dut = self.dut
        dut.cmd__payload.value = CmdLayout.const({"op": op, "length": length, "bank": bank,
                                                  "seed": seed}).as_value().value
        dut.cmd__valid.value = 1
        while True:
            await FallingEdge(dut.clk)
            taken = int(dut.cmd__ready.value)
            await self.tick()
            if taken:
                break
        dut.cmd__valid.value = 0
        if send is not None:
            await self.send(port, send, width)
        got = await self.receive(out, receive, out_width) if receive else None
        while True:
            dut.done__ready.value = int(self.rng.random() >= BACKPRESSURE)
            await FallingEdge(dut.clk)
            if int(dut.done__valid.value) and int(dut.done__ready.value):
                result = int(dut.done__payload.value) & RESULT_MASK
                await self.tick()
                break
            await self.tick()
        dut.done__ready.value = 0
        assert result == Result.OK.value, f"{op.name}: result {result}"
        return got

    def metrics(self) -> dict[str, int]:
        raw = int(self.dut.metrics.value)
        return {name: raw >> f.offset & ((1 << f.width) - 1) for name, f in MetricsLayout}

    async def wait_pass(self):
        while int(self.dut.training.value):
            await self.tick()


def _store(cfg, loss, count, steps, rng, k, o):
    u = rng.integers(-(1 << 13), 1 << 13, (count, steps, k))
    if loss == "onehot":
        return SampleStore.classification(cfg, u, rng.integers(0, o, count), classes=o)
    f = TrainFormats(cfg).target
    y = rng.integers(f.min_int // 4, f.max_int // 4, (count, steps, o))
    return SampleStore.regression(cfg, u, y, rng.integers(0, 2, (count, steps)))


async def _scenario(dut, loss: str, slots: int):
    rng_py = random.Random(SEED * 7 + slots + (loss == "onehot"))
    rng = np.random.default_rng(SEED * 7 + slots)
    cfg, ow, aw = CFG, CFG.operand_width, CFG.acc_width
    Clock(dut.clk, 10, unit="ns").start()
    dut.rst.value = 1
    dut.reset.value = 0
    for s in ("cmd", "inputs", "wide_in", "params_in", "nudges"):
        getattr(dut, f"{s}__valid").value = 0
    for s in ("done", "acc_out", "params_out", "outputs", "state_out"):
        getattr(dut, f"{s}__ready").value = 0
    for _ in range(3):
        await RisingEdge(dut.clk)
    dut.rst.value = 0
    d = Driver(dut, rng_py)
    ref = TrainingUnit(cfg, GoldenCore(cfg))

    k = max(1, cfg.k - 1)                       # data narrower than the core
    o = cfg.o if loss == "mse" else max(2, cfg.o - 1)
    steps, n_train, n_test = 4, 5, 3
    train, test = (_store(cfg, loss, n, steps, rng, k, o) for n in (n_train, n_test))
    tc = TrainConfig(loss=loss, optimizer="lion", eps_log2=4 if loss == "mse" else 2,
                     batch_log2=1, lr_log2=6, epochs=2, seed=SEED)
    setup = pack_setup(cfg, tc, steps, n_train, n_test, k=k, o=o, slots=slots)
    n_params = sum(int(np.prod(s)) for s in cfg.param_shapes().values())
    fm = TrainFormats(cfg)
    master = rng.integers(fm.master.min_int // 3, fm.master.max_int // 3, n_params)

    # WRITE_MASTER, TRAIN_SETUP, STORE (resident)
    await d.command(Op.WRITE_MASTER, bank=0, send=master, port="wide_in", width=aw)
    ref.write_master(0, master)
    await d.command(Op.TRAIN_SETUP, send=[w if w < (1 << (ow - 1)) else w - (1 << ow) for w in setup],
                    port="inputs", width=ow)
    ref.write_setup(setup)
    assert int(dut.setup_ok.value) == 1 and ref.setup is not None
    if not slots:
        image = np.concatenate([train.image(cfg), test.image(cfg)])
        await d.command(Op.STORE, length=len(image), seed=0, send=image, port="inputs", width=ow)
        ref.write_store(0, image)

    recs = {"train": train.image(cfg).reshape(n_train, -1), "test": test.image(cfg).reshape(n_test, -1)}
    for epoch in range(tc.epochs):
        for op, arg, which, order in ((Op.TRAIN, epoch, "train", epoch_order(n_train, tc.seed, epoch)),
                                      (Op.EVAL, 1, "test", range(n_test))):
            if op == Op.TRAIN:
                await d.command(op, length=arg)
                want = ref.train(arg)
            else:
                await d.command(op, bank=arg)
                want = ref.evaluate(True)
            if slots:
                words = recs[which][list(order)].ravel()
                await d.command(Op.STREAM, length=len(words), send=words, port="inputs", width=ow)
                want = ref.write_stream(words)
            await d.wait_pass()
            got = d.metrics()
            assert got["running"] == 0
            assert (got["samples"], got["loss_sum"], got["correct"], got["skipped"]) == ref.metrics, \
                f"{op.name} {epoch}: {got} != {ref.metrics}"
            assert want is not None and want.samples == got["samples"]
        for which in (0, 1):
            back = await d.command(Op.READ_MASTER, bank=which, receive=n_params, out="acc_out",
                                   out_width=aw)
            assert back == [int(x) for x in ref.read_master(which)], f"epoch {epoch}: READ_MASTER {which}"
    dut._log.info(f"{loss}, slots {slots}: {tc.epochs} epochs equal to the golden unit in {d.cycles} cycles")


@cocotb.test()
async def resident_mse(dut):
    await _scenario(dut, "mse", 0)


@cocotb.test()
async def streamed_onehot(dut):
    await _scenario(dut, "onehot", 2)
