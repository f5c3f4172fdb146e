"""The package's layers, read from the source: spec at the bottom with no Amaranth,
no import cycle between modules, and no layer that imports one above it.

docs/design.md §5 states the rules; this test holds the code to them. Imports are
read with :mod:`ast` (function-local ones included), so nothing is executed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("spec", "rtl", "sim", "boards", "host")

#: What each layer may import from the project (besides itself). The simulated
#: board (sim/board.py) compiles the real top level, so sim may use rtl.
ALLOWED = {
    "spec": set(),
    "rtl": {"spec"},
    "sim": {"spec", "rtl"},
    "boards": {"spec", "rtl"},
    "host": {"spec", "rtl", "sim", "boards"},
}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods["hel_fpga." + ".".join(parts)] = path
    return mods


MODULES = _modules()


def _imports(module: str, path: Path) -> set[str]:
    """Every module name ``module`` imports (absolute names; relative ones resolved)."""
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names.add(base)
            # `from hel_fpga.spec import protocol` imports a module, not a name
            names.update(f"{base}.{alias.name}" for alias in node.names
                         if f"{base}.{alias.name}" in MODULES)
    return names


def _project_edges() -> dict[str, set[str]]:
    edges = {}
    for mod, path in MODULES.items():
        edges[mod] = {name for name in _imports(mod, path) if name in MODULES and name != mod}
    return edges


def _layer(module: str) -> str:
    return module.split(".")[1]


def test_the_layout_is_found():
    """The walk sees every layer's modules (guards the other tests against vacuity)."""
    for pkg in PACKAGES:
        assert any(_layer(m) == pkg for m in MODULES), f"no modules found in {pkg}/"
    assert "hel_fpga.spec.formats" in MODULES and "hel_fpga.rtl.core" in MODULES


def test_spec_layer_has_no_amaranth_and_no_upward_import():
    for mod, path in MODULES.items():
        if _layer(mod) != "spec":
            continue
        imported = _imports(mod, path)
        assert not any(n == "amaranth" or n.startswith("amaranth.") for n in imported), \
            f"{mod} imports Amaranth: the spec layer must stay plain Python"


@pytest.mark.parametrize("layer", PACKAGES)
def test_layer_imports_only_layers_below_it(layer):
    edges = _project_edges()
    bad = sorted(f"{mod} -> {dep}" for mod, deps in edges.items() if _layer(mod) == layer
                 for dep in deps if _layer(dep) != layer and _layer(dep) not in ALLOWED[layer])
    assert not bad, f"{layer} may import only {sorted(ALLOWED[layer])}:\n" + "\n".join(bad)


def test_no_import_cycle_between_modules():
    edges = _project_edges()
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(mod):
        state[mod] = 1
        stack.append(mod)
        for dep in sorted(edges[mod]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[mod] = 2

    for mod in sorted(edges):
        if mod not in state:
            visit(mod)


def test_checkout_folders_are_not_importable_on_their_own():
    """The installed package is hel_fpga only: `rtl`, `sim`, … do not leak onto sys.path."""
    import importlib.util
    import subprocess
    import sys
    code = ("import importlib.util, sys; "
            "print([n for n in ('spec', 'rtl', 'sim', 'host', 'boards') "
            "if importlib.util.find_spec(n) is not None]); "
            "import hel_fpga.host.cli")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout
    assert importlib.util.find_spec("hel_fpga.spec.formats") is not None
