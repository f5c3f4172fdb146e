"""Run a :mod:`scenario` on :class:`hel_fpga.rtl.core.HELCore` in Amaranth's simulator.

The same stream discipline as the cocotb testbench: sources hold ``valid`` until
accepted and insert random idle cycles, sinks drop ``ready`` at random; every
received word, every ``done`` and the flags after every command are compared
with the golden model's. Returns a list of mismatch descriptions (empty = pass).
"""

from __future__ import annotations

import random

from amaranth.sim import Simulator

from hel_fpga.rtl.core import HELCore
from hel_fpga.spec.formats import HelConfig

from .scenario import SINKS, SOURCES, Step
from .scoreboard import Observed, compare, offered_word_taken, received_word, where


def run_scenario(cfg: HelConfig, steps: list[Step], seed: int = 0, idle: float = 0.3,
                 backpressure: float = 0.3, vcd: str | None = None,
                 timeout_cycles: int = 200_000, **core_kwargs) -> list[str]:
    dut = HELCore(cfg, **core_kwargs)
    rng = random.Random(seed)
    queues: dict[str, list[int]] = {s: [] for s in SOURCES}
    received: dict[str, list[int]] = {s: [] for s in SINKS}
    errors: list[str] = []

    def source(name):
        async def proc(ctx):
            st = getattr(dut, name)
            while True:
                q = queues[name]
                if q and rng.random() >= idle:
                    ctx.set(st.payload, q[0])
                    ctx.set(st.valid, 1)
                    await ctx.tick().until(st.ready)
                    ctx.set(st.valid, 0)
                    q.pop(0)
                else:
                    await ctx.tick()
        return proc

    def sink(name):
        async def proc(ctx):
            st = getattr(dut, name)
            while True:
                ctx.set(st.ready, int(rng.random() >= backpressure))
                _, _, valid, ready, payload = await ctx.tick().sample(st.valid, st.ready, st.payload)
                if valid and ready:
                    received[name].append(received_word(cfg, name, int(payload)))
        return proc

    async def main(ctx):
        for n, step in enumerate(steps):
            for s in SINKS:
                received[s].clear()
            for s, words in step.send.items():
                queues[s].extend(words)
            offers = {s: w for s, w in step.offer.items()}
            for s, w in offers.items():
                st = getattr(dut, s)
                ctx.set(st.payload, w[0])
                ctx.set(st.valid, 1)
            ctx.set(dut.cmd.payload.as_value(), step.cmd_word)
            ctx.set(dut.cmd.valid, 1)
            await ctx.tick().until(dut.cmd.ready)
            ctx.set(dut.cmd.valid, 0)
            ctx.set(dut.done.ready, 1)
            cycles = 0
            while True:
                for s in offers:
                    if ctx.get(getattr(dut, s).ready):
                        errors.append(offered_word_taken(n, step, s))
                _, _, dv, dp = await ctx.tick().sample(dut.done.valid, dut.done.payload.as_value())
                cycles += 1
                if dv:
                    break
                if cycles > timeout_cycles:
                    errors.append(f"{where(n, step)}: timeout")
                    return
            ctx.set(dut.done.ready, 0)
            for s in offers:
                ctx.set(getattr(dut, s).valid, 0)
            # let the sinks catch a word handed over in the done cycle
            await ctx.tick()
            errors.extend(compare(n, step, Observed(
                done=int(dp), received={s: list(received[s]) for s in SINKS},
                untaken={s: len(queues[s]) for s in SOURCES},
                state_overflow=bool(ctx.get(dut.state_overflow)),
                acc_overflow=bool(ctx.get(dut.acc_overflow)), busy=bool(ctx.get(dut.busy)))))
            for s in SOURCES:
                queues[s].clear()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    for s in SOURCES:
        sim.add_testbench(source(s), background=True)
    for s in SINKS:
        sim.add_testbench(sink(s), background=True)
    sim.add_testbench(main)
    if vcd:
        with sim.write_vcd(vcd):
            sim.run()
    else:
        sim.run()
    return errors
