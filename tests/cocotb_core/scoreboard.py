"""The scoreboard of both HEL core testbenches (cocotb on Verilator, Amaranth's simulator).

A testbench runs one :class:`~cocotb_core.scenario.Step` on the core, records
what it saw in an :class:`Observed`, and :func:`compare` lists every difference
from the golden model's step: the ``done`` result and self-test bit, every word
on every output stream (bit for bit, in order), input words the core did not
take, both sticky flags, and ``busy`` after ``done``. No simulator import here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hel_fpga.spec.formats import HelConfig

from .scenario import SINKS, SOURCES, Step, to_signed, unpack_done


def sink_widths(cfg: HelConfig) -> dict[str, int]:
    """Word width of each output stream, to sign-extend its payloads."""
    return {"params_out": cfg.operand_width, "outputs": cfg.state_width,
            "acc_out": cfg.acc_width, "state_out": cfg.state_width}


def received_word(cfg: HelConfig, sink: str, payload: int) -> int:
    """A sink's payload as the signed word the golden model predicts."""
    return to_signed(payload, sink_widths(cfg)[sink])


@dataclass
class Observed:
    """What the core did in one command."""
    done: int                                   # the ``done`` payload
    state_overflow: bool
    acc_overflow: bool
    busy: bool                                  # sampled after ``done``
    received: dict[str, list[int]] = field(default_factory=dict)   # signed words per sink
    untaken: dict[str, int] = field(default_factory=dict)          # source words left over


def where(n: int, step: Step) -> str:
    return f"step {n} ({step.name})"


def offered_word_taken(n: int, step: Step, source: str) -> str:
    """The error for a source word a command must leave alone but was accepted."""
    return f"{where(n, step)}: {source} ready while the command must not take it"


def compare(n: int, step: Step, seen: Observed) -> list[str]:
    """Differences between ``seen`` and the golden model's ``step`` (empty: equal)."""
    at = where(n, step)
    errors: list[str] = []
    result, st_pass = unpack_done(seen.done)
    if result != step.result.value:
        errors.append(f"{at}: result {result}, expected {step.result.value}")
    if step.selftest_pass is not None and st_pass != step.selftest_pass:
        errors.append(f"{at}: selftest_pass {st_pass}, expected {step.selftest_pass}")
    for s in SINKS:
        got, exp = seen.received.get(s, []), step.expect.get(s, [])
        if got != exp:
            bad = [i for i, (a, b) in enumerate(zip(got, exp)) if a != b]
            errors.append(f"{at}: {s}: {len(got)} words (expected {len(exp)}), "
                          f"mismatches at {bad[:8]}")
    for s in SOURCES:
        if seen.untaken.get(s):
            errors.append(f"{at}: {seen.untaken[s]} {s} words not taken")
    flags, exp_flags = (seen.state_overflow, seen.acc_overflow), (step.state_overflow,
                                                                  step.acc_overflow)
    if flags != exp_flags:
        errors.append(f"{at}: flags (state, acc) {flags}, expected {exp_flags}")
    if seen.busy:
        errors.append(f"{at}: busy after done")
    return errors
