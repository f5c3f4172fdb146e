"""Amaranth-simulator harness shared by the link tests: clock, watchdog, VCD on request."""

import contextlib
import os

from amaranth.sim import Simulator

from conftest import wave_file, waves_enabled


CLOCK_PERIOD = 1e-6


def simulate(dut, *testbenches, background=(), max_cycles=100_000):
    """Simulate until ``testbenches`` finish, failing after ``max_cycles`` (a hung
    handshake must fail the test, not hang it); with ``WAVES=1`` (as for every
    simulation test, see ``conftest.py``), dump a VCD named after the test under
    ``build/waves/``."""
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
    if not waves_enabled():
        return contextlib.nullcontext()
    test = os.environ.get("PYTEST_CURRENT_TEST", "sim").split(" ")[0]
    return sim.write_vcd(str(wave_file(test)) + ".vcd")
