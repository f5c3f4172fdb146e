"""The simulated board: Verilator + C++ harness + pty.

Most tests run the harness with :class:`hel_fpga.sim.board.UARTLoopback`, a stand-in top
level that echoes every byte, so the bridge is checked bit for bit without the
real design. ``test_real_top_*`` run the real ``hel_fpga.rtl.top.Top`` and are skipped
only while that module does not exist.

Builds go to the user's cache (``~/.cache/hel-fpga/sim-board``), so only the first
run compiles (~10 s for the loopback).
"""

import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

serial = pytest.importorskip("serial")

pytestmark = pytest.mark.verilator

from hel_fpga.sim import board  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def read_exact(port, n: int, timeout: float = 20.0) -> bytes:
    got = bytearray()
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += port.read(n - len(got))
    return bytes(got)


def echo_check(port, data: bytes) -> None:
    port.write(data)
    got = read_exact(port, len(data))
    assert len(got) == len(data), f"sent {len(data)} bytes, {len(got)} came back"
    if got != data:
        i = next(i for i, (a, b) in enumerate(zip(got, data)) if a != b)
        pytest.fail(f"byte {i} of {len(data)}: got {got[i]:#04x}, sent {data[i]:#04x}")


@pytest.fixture(scope="module")
def loopback_build():
    b = board.build(top=board.loopback_top, progress=print)
    print(f"loopback build: {'cached' if b.cached else 'compiled'} in {b.seconds:.1f} s")
    return b


@pytest.fixture(scope="module")
def loopback(loopback_build):
    with board.running(top=board.loopback_top) as sb:
        yield sb


def test_build_is_cached_outside_the_tree(loopback_build):
    again = board.build(top=board.loopback_top)
    print(f"second build: {again.seconds * 1000:.0f} ms (cached={again.cached})")
    assert again.cached
    assert again.binary == loopback_build.binary and again.binary.is_file()
    assert board.cache_root() in again.binary.parents
    assert ROOT not in again.binary.parents
    assert again.divisor == 4 and (again.directory / "top.v").is_file()


def test_start_returns_process_and_path(loopback):
    process, path = loopback
    assert process.poll() is None
    assert path.startswith("/dev/") and os.path.exists(path)
    assert loopback.divisor == 4


def test_loopback_random_bytes(loopback):
    rng = random.Random(1234)
    with serial.Serial(loopback.path, 115200, timeout=0.2) as port:
        for b in (0x00, 0xFF, 0x55, 0xAA, 0x01, 0x80):
            echo_check(port, bytes([b]))
        echo_check(port, bytes(range(256)))
        echo_check(port, bytes([0x00] * 64 + [0xFF] * 64))
        for _ in range(3):
            echo_check(port, rng.randbytes(4096))
        echo_check(port, rng.randbytes(20000))
    st = loopback.stats()
    print(f"loopback: {st['cycles_per_s']:,.0f} simulated cycles/s "
          f"({st['cycles']:,.0f} cycles in {st['seconds']:.2f} s)")
    assert st["framing_errors"] == 0


def test_clients_can_reopen(loopback):
    for i in range(3):
        with serial.Serial(loopback.path, 115200, timeout=0.2) as port:
            echo_check(port, bytes([i, 0, 0xFF, i]) * 16)
    assert loopback.process.poll() is None


def test_bytes_right_after_start_and_sigterm(loopback_build):
    """Bytes written before the model is out of reset arrive intact; SIGTERM stops it."""
    sb = board.start(top=board.loopback_top)
    try:
        with serial.Serial(sb.path, 115200, timeout=0.2) as port:
            echo_check(port, bytes([0xFF, 0x00, 0x5A]) + os.urandom(1000))
        sb.process.send_signal(signal.SIGTERM)
        assert sb.process.wait(10) == 0
    finally:
        sb.stop()
    st = sb.stats()
    assert st is not None and st["final"], sb.log()
    assert st["rx_bytes"] == st["tx_bytes"] == 1003
    print(f"exit stats: {st['cycles_per_s']:,.0f} cycles/s")


def test_context_manager_stops_board(loopback_build):
    with board.running(top=board.loopback_top) as sb:
        proc = sb.process
    assert proc.returncode == 0


def test_board_exits_when_its_owner_dies(loopback_build):
    code = ("import sys; from hel_fpga.sim import board; sb = board.start(top=board.loopback_top); "
            "print(sb.process.pid, flush=True); sys.stdin.read()")
    owner = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        pid = int(owner.stdout.readline())
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # A zombie is gone for our purposes: it is no longer the owner's child here,
        # so look at its state.
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return
        except OSError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("the board kept running after the process that started it died")


def test_wrong_divisor_is_refused():
    with pytest.raises(board.SimBoardError, match="does not match"):
        board.build(top=board.loopback_top, divisor=7)


def test_harness_rejects_bad_arguments(loopback_build):
    r = subprocess.run([str(loopback_build.binary), "--cpb", "2"], capture_output=True, text=True,
                       timeout=10)
    assert r.returncode == 2 and "--cpb" in r.stderr


def _first_line(proc, timeout=120.0) -> str:
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        r, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            pytest.fail("no first line from hel sim-board")
        chunk = os.read(proc.stdout.fileno(), 1024)
        if not chunk:
            pytest.fail(f"hel sim-board exited: {proc.wait()} {proc.stderr.read().decode()}")
        buf += chunk
    return buf.split(b"\n", 1)[0].decode()


def test_cli_runs_until_sigterm(loopback_build):
    """``hel sim-board`` mechanics (path first, SIGTERM → exit 0), with the stand-in top."""
    code = ("import sys, hel_fpga.sim.board as b; b.real_top = b.loopback_top; "
            "from hel_fpga.host.cli import main; sys.exit(main(['sim-board', '--stats']))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        path = _first_line(proc)
        assert path.startswith("/dev/")
        with serial.Serial(path, 115200, timeout=0.2) as port:
            echo_check(port, os.urandom(2048))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode()
    assert "sim-board: stats exit" in err, err


# ---- the real top level -------------------------------------------------------------------
def test_real_top_ident():
    from hel_fpga.host.registry import open_device

    t0 = time.monotonic()
    b = board.build(progress=print)
    print(f"real top build: {'cached' if b.cached else 'compiled'} in {b.seconds:.1f} s")
    with board.running() as sb:
        dev = open_device(sb.path, board.SIM_CONFIG, timeout=10)
        try:
            ident = dev.ident()
        finally:
            dev.close()
        assert ident.config == board.SIM_CONFIG
        assert ident.clock_hz == board.SIM_CLK_HZ
        assert ident.baud == board.SIM_BAUD
        st = sb.stats()
        print(f"real top: {st['cycles_per_s']:,.0f} simulated cycles/s "
              f"({time.monotonic() - t0:.1f} s in all)")


def test_sim_board_device_reads_its_cycle_counter_and_stops_the_board_on_close():
    """``--device sim-board``: the registry starts the board, the device reads its cycle
    counter, and closing the device stops the board."""
    from hel_fpga.host.registry import open_device

    dev = open_device("sim-board", board.SIM_CONFIG, timeout=10)
    sb = dev.board
    try:
        assert dev.ident().config == board.SIM_CONFIG
        before = dev.cycles()
        assert dev.selftest(100) is True
        after = dev.cycles()
    finally:
        dev.close()
    assert sb.process.poll() is not None
    # 2 × 100 steps of at least MACs/P cycles each happened between the two reads
    cfg = board.SIM_CONFIG
    assert after - before >= 200 * cfg.macs_forward_step // cfg.lanes


def test_slow_reader_loses_nothing(loopback_build):
    """A host that stops reading for a while: simulated time waits, no byte is lost."""
    data = os.urandom(200_000)
    with board.running(top=board.loopback_top) as sb, \
            serial.Serial(sb.path, 115200, timeout=0.2) as port:
        writer = threading.Thread(target=port.write, args=(data,))
        writer.start()
        time.sleep(1.0)
        got = read_exact(port, len(data), timeout=60)
        writer.join(10)
        st = sb.stats()
    print(f"slow reader: stalls={st['stalls']:.0f} dropped={st['dropped']:.0f}")
    assert got == data
    assert st["dropped"] == 0
