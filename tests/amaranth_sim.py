"""Amaranth-simulator harness shared by the link tests: clock, watchdog, VCD on request."""

import contextlib
import os
import re

from amaranth.sim import Simulator


CLOCK_PERIOD = 1e-6


def simulate(dut, *testbenches, background=(), max_cycles=100_000):
    """Simulate until ``testbenches`` finish, failing after ``max_cycles`` (a hung
    handshake must fail the test, not hang it); with ``HEL_VCD=<dir>`` set, dump a
    waveform named after the test."""
    sim = Simulator(dut)
    sim.add_clock(CLOCK_PERIOD)
    for tb in testbenches:
        sim.add_testbench(tb)
    for tb in background:
        sim.add_testbench(tb, background=True)

    async def watchdog(ctx):
        await ctx.delay(max_cycles * CLOCK_PERIOD)
        raise AssertionError(f"simulation still running after {max_cycles} cycles")

    sim.add_testbench(watchdog, background=True)
    with vcd_dump(sim):
        sim.run()


def vcd_dump(sim):
    folder = os.environ.get("HEL_VCD")
    if not folder:
        return contextlib.nullcontext()
    test = os.environ.get("PYTEST_CURRENT_TEST", "sim").split(" ")[0]
    os.makedirs(folder, exist_ok=True)
    return sim.write_vcd(os.path.join(folder, re.sub(r"[^\w.-]+", "_", test) + ".vcd"))
