"""cocotb testbench of ``hel_core`` (the Verilog of :class:`hel_fpga.rtl.core.HELCore`).

Started by ``tests/test_core_cocotb.py`` through the cocotb runner, one simulator
run per test, with the configuration in ``HEL_CFG`` (JSON), the random seed in
``HEL_SEED`` and the stream randomisation in ``HEL_IDLE`` / ``HEL_BACKPRESSURE``.
Each test replays one golden-model scenario (:mod:`scenario`): sources insert
random idle cycles and hold ``valid`` until a word is taken, sinks drop
``ready`` at random; every word received, every ``done`` and both flags after
every command must equal the golden model's bit for bit.

Timing discipline: all handshakes are sampled at the falling edge (the values
the DUT sees at the next rising edge, since nothing the testbench drives
changes in between) and new values are driven right after the rising edge.
"""

from __future__ import annotations

import os
import random

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, RisingEdge

from hel_fpga.spec.formats import HelConfig

from .scenario import SINKS, SOURCES, Step, build_scenario
from .scoreboard import Observed, compare, offered_word_taken, received_word, where

CFG = HelConfig.from_json(os.environ.get("HEL_CFG", "{}"))
SEED = int(os.environ.get("HEL_SEED", "1"))
IDLE = float(os.environ.get("HEL_IDLE", "0.3"))
BACKPRESSURE = float(os.environ.get("HEL_BACKPRESSURE", "0.3"))
TIMEOUT_CYCLES = 2_000_000


def _sig(dut, stream, member):
    return getattr(dut, f"{stream}__{member}")


async def run_steps(dut, steps: list[Step], seed: int) -> list[str]:
    rng = random.Random(seed)
    clk = dut.clk
    Clock(clk, 10, unit="ns").start()
    dut.rst.value = 1
    for s in SOURCES + ("cmd",):
        _sig(dut, s, "valid").value = 0
    for s in SINKS + ("done",):
        _sig(dut, s, "ready").value = 0
    for _ in range(3):
        await RisingEdge(clk)
    dut.rst.value = 0

    errors: list[str] = []
    for n, step in enumerate(steps):
        queues = {s: list(step.send.get(s, [])) for s in SOURCES}
        received = {s: [] for s in SINKS}
        offering = {s: w[0] for s, w in step.offer.items()}
        driving = {s: False for s in SOURCES}   # valid currently asserted
        sink_ready = {s: False for s in SINKS}
        cmd_pending, done_word, cycles = True, None, 0
        _sig(dut, "cmd", "payload").value = step.cmd_word
        _sig(dut, "cmd", "valid").value = 1
        for s, w in offering.items():
            _sig(dut, s, "payload").value = w & ((1 << len(_sig(dut, s, "payload"))) - 1)
            _sig(dut, s, "valid").value = 1
        while done_word is None:
            await FallingEdge(clk)
            cycles += 1
            # --- what happens at the next rising edge
            fired = {s: driving[s] and bool(_sig(dut, s, "ready").value) for s in SOURCES}
            for s in offering:
                if int(_sig(dut, s, "ready").value):
                    errors.append(offered_word_taken(n, step, s))
            for s in SINKS:
                if sink_ready[s] and int(_sig(dut, s, "valid").value):
                    received[s].append(received_word(CFG, s, int(_sig(dut, s, "payload").value)))
            cmd_fired = cmd_pending and bool(dut.cmd__ready.value)
            if not cmd_pending and int(dut.done__valid.value):
                done_word = int(dut.done__payload.value)
            if cycles > TIMEOUT_CYCLES:
                errors.append(f"{where(n, step)}: timeout")
                return errors
            await RisingEdge(clk)
            # --- drive the next cycle
            if cmd_fired:
                cmd_pending = False
                dut.cmd__valid.value = 0
                dut.done__ready.value = 1
            for s in SOURCES:
                if s in offering:
                    continue
                if fired[s]:
                    queues[s].pop(0)
                    driving[s] = False
                if not driving[s] and queues[s] and rng.random() >= IDLE:
                    _sig(dut, s, "payload").value = queues[s][0] & ((1 << len(_sig(dut, s, "payload"))) - 1)
                    driving[s] = True
                _sig(dut, s, "valid").value = int(driving[s])
            for s in SINKS:
                sink_ready[s] = rng.random() >= BACKPRESSURE
                _sig(dut, s, "ready").value = int(sink_ready[s])
        dut.done__ready.value = 0
        for s in offering:
            _sig(dut, s, "valid").value = 0
        await FallingEdge(clk)
        # --- compare with the golden model
        errors += compare(n, step, Observed(
            done=done_word, received=received, untaken={s: len(q) for s, q in queues.items()},
            state_overflow=bool(int(dut.state_overflow.value)),
            acc_overflow=bool(int(dut.acc_overflow.value)), busy=bool(int(dut.busy.value))))
        for s in SOURCES:
            _sig(dut, s, "valid").value = 0
        for s in SINKS:
            _sig(dut, s, "ready").value = 0
        await RisingEdge(clk)
    return errors


async def _run(dut, name: str) -> None:
    steps = build_scenario(name, CFG, SEED)
    errors = await run_steps(dut, steps, SEED)
    words = sum(len(v) for st in steps for v in st.expect.values())
    dut._log.info("%s: %d commands, %d expected words, %d mismatches", name, len(steps), words,
                  len(errors))
    assert not errors, "\n".join(errors[:30])


@cocotb.test()
async def protocol(dut):
    """Wrong-state and bad-argument commands, parameter round trip."""
    await _run(dut, "protocol")


@cocotb.test()
async def centred(dut):
    """Centred forward + echo, two samples accumulated."""
    await _run(dut, "centred")


@cocotb.test()
async def one_sided(dut):
    """One-sided forward (−G(0)) + echo."""
    await _run(dut, "one_sided")


@cocotb.test()
async def kick(dut):
    """Single-kick (HEB) echoes."""
    await _run(dut, "kick")


@cocotb.test()
async def selftest(dut):
    """Self-test longer than t_max."""
    await _run(dut, "selftest")


@cocotb.test()
async def overflow(dut):
    """State wrap and accumulator wrap raise the sticky flags exactly as the golden model."""
    await _run(dut, "overflow")
