"""The core's schedule: cycles per step pinned to the README's speed table.

Bit-exact tests pass whatever the schedule's length; this one fails when a
forward or a centred echo step takes a different number of cycles, slower or
faster. It measures with ``hel bench core``'s own routine
(:func:`hel_fpga.host.commands.bench.measure_core`, Amaranth's simulator) on the
shapes ``hel bench core`` measures by default.
"""

from __future__ import annotations

import pytest

from hel_fpga.host.commands import bench
from hel_fpga.spec.formats import HelConfig

#: (N, M, K, P) → (cycles per forward step, cycles per centred echo step), the
#: README's "Speed" table. A deliberate schedule change updates both the README
#: and this table.
CYCLES = {
    (16, 16, 2, 1): (572, 1762),
    (16, 16, 2, 2): (293, 882),
    (16, 16, 2, 4): (163, 458),
    (16, 16, 2, 8): (85, 218),
    (32, 32, 2, 8): (279, 818),
    (32, 32, 2, 16): (157, 410),
}


def test_table_covers_the_default_bench_shapes():
    assert sorted(CYCLES) == sorted(bench.DEFAULT_CONFIGS)


#: the N = M = 32 shapes take longer to simulate than the four N = M = 16 ones together
SHAPES = [pytest.param(s, id="n{}m{}k{}p{}".format(*s),
                       marks=[pytest.mark.slow] if s[0] > 16 else []) for s in CYCLES]


@pytest.mark.parametrize("shape", SHAPES)
def test_cycles_per_step_equal_the_readme(shape):
    n, m, k, p = shape
    # the configuration `hel bench core` builds for a shape
    row = bench.measure_core(HelConfig(n=n, m=m, k=k, o=1, lanes=p, t_max=16))
    assert (row["cycles_forward_step"], row["cycles_echo_step"]) == CYCLES[shape]
