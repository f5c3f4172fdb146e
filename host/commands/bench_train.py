"""``hel bench train``: training throughput on chip, host-driven and on the CPU, side by side.

For each *workload* (a task at a model size: ``oscillators`` is the task's default
N = M = 16, ``oscillators@32`` the same data at N = M = 32) one run produces these
rows (:func:`run_train`):

* **on chip** (mode ``on-chip``), for every board of :data:`hel_fpga.boards.table.BOARDS`
  whose core has a training store, and for the simulated board: the board's
  configuration with N, M, K, O set to the workload's (K and O differ only on the
  ``n64`` entry), ``t_max``, P, formats and clock kept, and the store sized to the
  training set (:func:`onchip_config`). That core runs in the Verilator-simulated
  board (:mod:`hel_fpga.sim.board`, built and cached per configuration) over the
  real protocol; :func:`measure_onchip` writes the set, the setup and the master
  weights, then times one TRAIN epoch in simulated cycles. Samples/s = clock ÷
  cycles per sample. A board without a store (the iCEBreaker) gets a row marked
  unavailable.
* **host-driven** (modes ``host-driven-1ms`` and ``host-driven-16ms``), for every
  board: the training loop of ``hel train --algorithm hel`` (per sample LOAD,
  FORWARD, host loss, ECHO; per batch STATUS, READ_ACC, CLEAR_ACC, Adam, WRITE_PARAMS)
  runs against the protocol model (``--device model``) with the board's formats,
  and :func:`measure_host_traffic` counts the bytes both ways and the turnarounds
  per sample. :func:`project_samples_per_s` turns them into samples/s at the
  board's baud with 1 ms or 16 ms per turnaround: a projection, not a measurement.
* **CPU** (mode ``float-bptt``): the float64 BPTT training loop of ``hel train
  --algorithm bptt`` (:class:`~hel_fpga.host.train.engines.FloatEngine` and Adam at
  the task's batch size), timed over whole epochs on this machine
  (:func:`measure_cpu_bptt`). ``torch-bptt`` is measured only when PyTorch is
  importable (:func:`measure_torch_bptt`); otherwise its row says it was skipped.

Every row has the keys of :data:`ROW_KEYS`; ``source`` says how its figure was
obtained (:data:`SOURCES`, followed by the details).

Timing an epoch exactly enough
------------------------------
The simulated board reports its cycle counter on SIGUSR1 at its next pty service
(every 512 cycles; :class:`CycleMarks`). The host marks
once before TRAIN (M0), once before every METRICS poll (the first of which, after
TRAIN's reply, is M0'), and once after the poll that reports the pass over (U); it
polls without pause. A mark is the cycle of a service no later than the bytes sent after it
start to arrive, so the pass lies inside [M0, U], and it started no later than
M0' and ended after L, the mark before the last poll that still saw it running.
The reported cycles are U − M0 (an upper bound: samples/s is a lower bound);
``(U − M0) − (L − M0')`` bounds the over-count (:attr:`OnChipResult.bracket`),
about two METRICS round trips (a few thousand cycles) against millions per epoch.
METRICS only latches the training core's counters, so polling does not slow the
pass.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass

import numpy as np

#: The JSON keys of every row, in order.
ROW_KEYS = ("target", "mode", "task", "n", "m", "k", "o", "t", "c", "p", "cycles_per_sample",
            "clock_hz", "samples_per_s", "source")
#: How each kind of figure is obtained (the start of a row's ``source``).
SOURCES = {
    "sim": "measured: RTL simulation cycles × clock",
    "projection": "projection: protocol-model bytes at baud + latency",
    "cpu": "measured: wall time on this CPU",
    "unavailable": "unavailable",
    "skipped": "skipped",
}
#: Turnaround latencies of the host-driven projections: mode name → seconds.
LATENCIES = {"host-driven-1ms": 1e-3, "host-driven-16ms": 16e-3}
#: Bits on the line per byte (8N1).
BITS_PER_BYTE = 10
#: Workloads measured by default.
DEFAULT_TASKS = "oscillators,oscillators@32"
#: The issue's target (issue 15 item 3) for the ULX3S-85F on chip, on ``oscillators``.
TARGET_BOARD = "ulx3s-85f"
TARGET_SAMPLES_PER_S = 10_000
TARGET_VS_CPU = 10.0
#: Energy per sample: no figure is given.
ENERGY_NOTE = ("energy per sample: not given: no measured or datasheet-derived figure "
               "(no power measurement and no vendor power estimate is available here)")

#: Samples on chip, batches host-driven, epochs on the CPU: (full, --quick).
ONCHIP_SAMPLES = (None, 16)       # None: the whole training set
HOST_BATCHES = (4, 1)
CPU_EPOCHS = (10, 1)

Progress = "Callable[[str], None]"


# ---------------------------------------------------------------------------- workloads
@dataclass(frozen=True)
class Workload:
    """A task at a model size: ``spec`` is ``TASK`` or ``TASK@N`` (N = M = N)."""

    spec: str
    task_name: str
    size: int | None      # None: the task's default size

    @classmethod
    def parse(cls, spec: str) -> "Workload":
        from hel_fpga.host.errors import UsageError
        spec = spec.strip()
        if "@" not in spec:
            return cls(spec, spec, None)
        name, _, size = spec.rpartition("@")
        try:
            n = int(size)
        except ValueError:
            raise UsageError(f"--tasks wants TASK or TASK@N (N = M = N), got {spec!r}") from None
        if n < 1:
            raise UsageError(f"--tasks: the model size must be ≥ 1, got {spec!r}")
        return cls(spec, name, n)

    def load(self):
        """(task, n, m): the task and the model size."""
        from hel_fpga.host.errors import UsageError
        from hel_fpga.host.train.tasks import TaskError, load_task
        try:
            task = load_task(self.task_name)
        except TaskError as e:
            raise UsageError(str(e)) from None
        n = self.size or task.defaults["oscillators"]
        m = self.size or task.defaults["hidden"]
        return task, n, m


def parse_tasks(spec: str) -> list[Workload]:
    from hel_fpga.host.errors import UsageError
    out = [Workload.parse(s) for s in spec.split(",") if s.strip()]
    if not out:
        raise UsageError("--tasks wants at least one workload")
    return out


def workload_config(base, task, n: int, m: int):
    """``base`` with the workload's N, M, K, O and δ (everything else kept), t_max ≥ T."""
    t_max = base.t_max
    while t_max < task.t:
        t_max *= 2
    return base.replace(n=n, m=m, k=task.k, o=task.o, t_max=t_max,
                        dt_log2=int(round(-math.log2(task.dt))),
                        lanes=min(base.lanes, max(n, m)))


def onchip_config(base, task, n: int, m: int, count: int, engines: int | None = None):
    """The configuration simulated on chip: :func:`workload_config` with the store sized
    to ``count`` training samples (a power of two, at least 1024 words) and, if given,
    ``engines`` sample engines (set with the store: a base without one, such as the
    simulated board's, allows only one engine)."""
    from hel_fpga.host.train.onchip import store_words_for
    cfg = workload_config(base, task, n, m)
    store = store_words_for(task, np.arange(count), [], cfg)
    return cfg.replace(store_words=store, engines=base.engines if engines is None else engines)


def describe_config(cfg) -> str:
    return (f"n={cfg.n} m={cfg.m} k={cfg.k} o={cfg.o} t_max={cfg.t_max} P={cfg.lanes} "
            f"C={cfg.engines} "
            f"store_words={cfg.store_words} operand={cfg.operand_width}b state={cfg.state_width}b "
            f"acc={cfg.acc_width}b")


# ---------------------------------------------------------------------------- on chip
@dataclass
class OnChipResult:
    """One TRAIN epoch timed in simulated cycles (see the module docstring)."""

    samples: int
    cycles: int          #: U − M0: the upper bound, reported
    lower: int           #: L − M0': the lower bound
    polls: int
    wall_s: float
    config: object

    @property
    def bracket(self) -> float:
        """The bound on the over-count as a fraction of :attr:`cycles`."""
        return (self.cycles - self.lower) / self.cycles if self.cycles else float("nan")

    @property
    def cycles_per_sample(self) -> float:
        return self.cycles / self.samples


def onchip_setup(task, cfg, count: int, seed: int = 0):
    """(store, TrainConfig, TrainState) of an on-chip epoch on the first ``count``
    training samples, with ``hel train --on-chip``'s default settings."""
    from hel_fpga.host.train.onchip import (initial_state, resolve_onchip_settings, task_store,
                                            train_config_for)
    from hel_fpga.host.train.optim import init_params
    from hel_fpga.spec.names import PARAM_NAMES
    store = task_store(task, task.train_idx[:count], cfg)
    s = resolve_onchip_settings({"seed": seed, "oscillators": cfg.n, "hidden": cfg.m}, task)
    tc = train_config_for(s, task)
    params = init_params(np.random.default_rng(seed), cfg.n, cfg.m, cfg.k)
    clip = cfg.param.max_value
    params = {k: np.clip(params[k], -clip, clip) for k in PARAM_NAMES}
    return store, tc, initial_state(params, cfg)


def measure_onchip(cfg, store, tc, state, *, epoch: int = 0, progress=None) -> OnChipResult:
    """Time one TRAIN epoch of ``store`` on a simulated board built for ``cfg``.

    Starts (building if needed) :func:`hel_fpga.sim.board.start` ``(cfg)``, writes the
    set, the setup and ``state`` through :class:`~hel_fpga.host.train.onchip.ProtocolOnChipDevice`,
    then sends TRAIN and polls METRICS until the pass is over, bracketing it with
    cycle marks. Raises :class:`~hel_fpga.host.device.DeviceError` if the pass does not
    train every sample.
    """
    import serial

    from hel_fpga.host.device import DeviceError
    from hel_fpga.host.link import SerialDevice
    from hel_fpga.host.train.onchip import ProtocolOnChipDevice
    from hel_fpga.sim import board as sim_board
    from hel_fpga.spec.protocol import Command, Pass

    say = progress or (lambda line: None)
    board = sim_board.start(cfg, progress=say)
    try:
        port = serial.Serial(board.path, baudrate=sim_board.SIM_BAUD, timeout=0.05)
        dev = SerialDevice(port, timeout=10.0, expect=cfg, board=board)
        od = ProtocolOnChipDevice(dev)
        say(f"bench train: writing {store.count} samples, the setup and the master weights")
        od.write_train_config(tc)
        od.write_set("train", store)
        od.write_state(state)
        marks = CycleMarks(board)
        first = marks.count()
        say(f"bench train: one TRAIN epoch of {store.count} samples in simulation")
        w0 = time.monotonic()
        marks.mark()                                    # M0
        dev.start_pass(Command.TRAIN, epoch)
        # The first poll's mark doubles as M0' (two marks with no exchange between them
        # would fall into one service of the board and give one line).
        running, last_change, done = [], time.monotonic(), 0
        while True:
            marks.mark()                                # before each poll
            f = dev.metrics()
            running.append(f["running"] != Pass.NONE)
            if f["samples"] > done:
                done, last_change = f["samples"], time.monotonic()
            if not running[-1]:
                break
            if time.monotonic() - last_change > 120:
                raise DeviceError(f"the TRAIN pass made no progress for 120 s (at sample {done})")
        marks.mark()                                    # U
        wall = time.monotonic() - w0
        want = 2 + len(running)
        lines = marks.collect(first, want, timeout=10.0)
        if len(lines) != want:
            raise DeviceError(f"expected {want} cycle marks from the simulated board, got {len(lines)}")
        if f["samples"] != store.count:
            raise DeviceError(f"the TRAIN pass ended after {f['samples']} of {store.count} samples")
        c = [ln["cycles"] for ln in lines]
        m0, polls, u = c[0], c[1:-1], c[-1]
        # M0' = the first poll's mark; L = the mark before the last poll that still saw
        # the pass running (none: the pass was over at the first poll).
        still = [p for p, r in zip(polls, running) if r]
        lower = max(0, still[-1] - polls[0]) if still else 0
        dev.close()
    finally:
        board.stop()
    return OnChipResult(samples=store.count, cycles=u - m0, lower=lower, polls=len(running),
                        wall_s=wall, config=cfg)


class CycleMarks:
    """Read a simulated board's cycle counter at chosen moments, without waiting.

    :meth:`mark` sends the harness SIGUSR1; it writes a stats line (cycles since
    start, its own monotonic seconds) at its next pty service, at most 512
    simulated cycles later. :meth:`collect` waits for the lines. Marking right
    before a request and right after its last reply brackets the operation in
    simulated cycles to within the harness's service interval plus the host's
    reaction time (a fraction of a millisecond); waiting for the lines happens
    outside the bracket.
    """

    def __init__(self, board):
        import signal
        self.board = board
        self._signal = signal.SIGUSR1

    def count(self) -> int:
        return len(self.lines())

    def lines(self) -> list[dict]:
        out = []
        text = self.board.log()
        # The board may be writing a line while we read: only complete lines count.
        for line in text[:text.rfind("\n") + 1].splitlines():
            if line.startswith("sim-board: stats "):
                fields = dict(kv.split("=", 1) for kv in line.split()[3:] if "=" in kv)
                if "cycles" not in fields or "seconds" not in fields:
                    continue
                out.append({"cycles": int(fields["cycles"]), "seconds": float(fields["seconds"])})
        return out

    def mark(self) -> None:
        self.board.process.send_signal(self._signal)

    def collect(self, first: int, n: int, timeout: float = 5.0) -> list[dict]:
        """Stats lines ``first .. first+n-1`` (fewer if two marks fell into one service)."""
        import time
        deadline = time.monotonic() + timeout
        while True:
            lines = self.lines()
            if len(lines) >= first + n or time.monotonic() >= deadline:
                return lines[first:first + n]
            time.sleep(0.002)


# ---------------------------------------------------------------------------- host-driven
class CountingPort:
    """A pyserial port that counts the bytes written and read: the bytes on the wire.

    Wraps the port of a :class:`hel_fpga.host.link.SerialDevice` (``dev.port =
    CountingPort(dev.port)``); ``tx`` counts host → device bytes, ``rx`` device →
    host bytes, including any the host discards when it flushes its input.
    """

    def __init__(self, port):
        self.port = port
        self.tx = 0
        self.rx = 0

    @property
    def timeout(self):
        return self.port.timeout

    @timeout.setter
    def timeout(self, value):
        self.port.timeout = value

    @property
    def in_waiting(self):
        return self.port.in_waiting

    def write(self, data):
        self.tx += len(data)
        return self.port.write(data)

    def read(self, n=1):
        data = self.port.read(n)
        self.rx += len(data)
        return data

    def reset_input_buffer(self):
        n = self.port.in_waiting
        if n:
            self.rx += len(self.port.read(n))

    def flush(self):
        flush = getattr(self.port, "flush", None)
        if flush is not None:
            flush()

    def close(self):
        self.port.close()


class TrafficPort(CountingPort):
    """A port wrapper that counts bytes both ways and turnarounds.

    A *turnaround* is a change from the host sending to the host receiving: the host
    has written bytes and now gets the device's first byte back, i.e. one wait for
    the device per request/reply exchange (what a USB serial adapter's latency is
    paid for). Acks read during a transfer count too.
    """

    def __init__(self, port):
        super().__init__(port)
        self.turnarounds = 0
        self._sending = False

    def write(self, data):
        if data:
            self._sending = True
        return super().write(data)

    def read(self, n=1):
        data = super().read(n)
        if data and self._sending:
            self.turnarounds += 1
            self._sending = False
        return data

    def reset_input_buffer(self):
        n = self.port.in_waiting
        if n:
            self.read(n)


@dataclass
class Traffic:
    """Bytes and turnarounds of host-driven training, per training sample."""

    samples: int
    tx: int
    rx: int
    turnarounds: int

    @property
    def bytes_per_sample(self) -> float:
        return (self.tx + self.rx) / self.samples

    @property
    def turnarounds_per_sample(self) -> float:
        return self.turnarounds / self.samples


def measure_host_traffic(cfg, task, batches: int, *, seed: int = 0) -> Traffic:
    """Host-driven HEL training over the protocol model with ``cfg``: ``batches`` whole
    batches of the task's batch size, each sample LOAD/FORWARD/loss/ECHO, each batch
    STATUS/READ_ACC/CLEAR_ACC, an Adam step and WRITE_PARAMS (the loop of ``hel
    train --algorithm hel``). Counts the traffic from the first sample to the last
    batch's WRITE_PARAMS (the initial parameter write and evaluations excluded)."""
    from hel_fpga.host.link import SerialDevice
    from hel_fpga.host.train.engines import DeviceEngine, default_eps_for
    from hel_fpga.host.train.optim import Adam, init_params
    from hel_fpga.sim.protocol_model import ModelPort, ProtocolModel
    from hel_fpga.spec.names import PARAM_NAMES

    dev = SerialDevice(ModelPort(ProtocolModel(cfg)), timeout=2.0, expect=cfg)
    try:
        engine = DeviceEngine(task, dev, default_eps_for(task, "centred"), "centred")
        rng = np.random.default_rng(seed)
        params = init_params(rng, cfg.n, cfg.m, task.k)
        clip = cfg.param.max_value
        for k in PARAM_NAMES:
            params[k] = np.clip(params[k], -clip, clip)
        opt = Adam(params, clip=clip)
        engine.write(params)
        engine.start()
        port = dev.port = TrafficPort(dev.port)
        bsz = task.defaults["batch"]
        perm = rng.permutation(task.train_idx)
        samples = 0
        for b in range(batches):
            idx = perm[b * bsz:(b + 1) * bsz]
            res = engine.train_batch(idx)
            if not res.overflow:
                opt.step(res.grads, task.defaults["lr"])
            engine.write(params)
            samples += len(idx)
        return Traffic(samples, port.tx, port.rx, port.turnarounds)
    finally:
        dev.close()


def project_samples_per_s(bytes_per_sample: float, turnarounds_per_sample: float, baud: int,
                          latency_s: float) -> float:
    """Samples/s when every byte (both directions, not overlapped) takes
    ``BITS_PER_BYTE / baud`` s and every turnaround ``latency_s``; the device's own
    compute time is not counted (so it is an upper bound for that link)."""
    seconds = bytes_per_sample * BITS_PER_BYTE / baud + turnarounds_per_sample * latency_s
    return 1.0 / seconds


# ---------------------------------------------------------------------------- CPU
def measure_cpu_bptt(task, n: int, m: int, epochs: int, *, seed: int = 0) -> dict:
    """The float BPTT loop of ``hel train --algorithm bptt`` (FloatEngine + Adam, the
    task's batch and lr), ``epochs`` epochs over the training set; wall time of the
    batches only (no evaluation). Returns samples, seconds, samples_per_s."""
    from hel_fpga.host.train.engines import FloatEngine, default_eps_for
    from hel_fpga.host.train.optim import Adam, init_params
    from hel_fpga.spec.formats import HelConfig
    from hel_fpga.spec.names import PARAM_NAMES

    engine = FloatEngine(task, "bptt", default_eps_for(task, "centred"), "centred")
    rng = np.random.default_rng(seed)
    params = init_params(rng, n, m, task.k)
    clip = HelConfig().param.max_value
    for k in PARAM_NAMES:
        params[k] = np.clip(params[k], -clip, clip)
    opt = Adam(params, clip=clip)
    engine.write(params)
    bsz, lr = task.defaults["batch"], task.defaults["lr"]
    samples, seconds = 0, 0.0
    for _ in range(epochs):
        perm = rng.permutation(task.train_idx)
        t0 = time.perf_counter()
        for b in range(math.ceil(len(perm) / bsz)):
            idx = perm[b * bsz:(b + 1) * bsz]
            res = engine.train_batch(idx)
            opt.step(res.grads, lr)
            engine.write(params)
            samples += len(idx)
        seconds += time.perf_counter() - t0
    return {"samples": samples, "seconds": seconds, "samples_per_s": samples / seconds}


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def measure_torch_bptt(task, n: int, m: int, epochs: int, *, seed: int = 0) -> dict:
    """PyTorch autograd through the same leapfrog (float64, CPU), Adam, the task's batch;
    wall time of the batches. Only called when :func:`torch_available`."""
    import torch
    torch.set_default_dtype(torch.float64)
    from hel_fpga.host.train.optim import init_params
    rng = np.random.default_rng(seed)
    p0 = init_params(rng, n, m, task.k)
    ps = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
    opt = torch.optim.Adam(ps.values(), lr=task.defaults["lr"])
    u_all = torch.tensor(np.asarray(task.u, dtype=np.float64))
    y_all = torch.tensor(np.asarray(task.y, dtype=np.float64)) if task.y is not None else None
    dt, o = task.dt, task.o
    bsz = task.defaults["batch"]
    samples, seconds = 0, 0.0
    for _ in range(epochs):
        perm = rng.permutation(task.train_idx)
        t0 = time.perf_counter()
        for b in range(math.ceil(len(perm) / bsz)):
            idx = torch.tensor(perm[b * bsz:(b + 1) * bsz])
            u = u_all[idx]
            q = torch.zeros(len(idx), n)
            p = torch.zeros(len(idx), n)
            outs = []
            for t in range(u.shape[1]):
                qh = q + 0.5 * dt * p
                a = torch.tanh(qh @ ps["W"].T + u[:, t] @ ps["B"].T + ps["b"])
                p = p - dt * (ps["alpha"] * qh + a @ ps["W"])
                q = qh + 0.5 * dt * p
                outs.append(q[:, n - o:])
            yh = torch.stack(outs, 1)
            loss = ((yh - y_all[idx]) ** 2).mean() if y_all is not None else yh.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            samples += len(idx)
        seconds += time.perf_counter() - t0
    return {"samples": samples, "seconds": seconds, "samples_per_s": samples / seconds}


# ---------------------------------------------------------------------------- rows
def row(target, mode, task, cfg_or_shape, *, c, p, cycles_per_sample, clock_hz, samples_per_s,
        source) -> dict:
    """One row of :data:`ROW_KEYS`; ``c`` is the samples in flight at once (the sample
    engines on chip, 1 host-driven, None on the CPU)."""
    n, m, k, o = cfg_or_shape
    return {"target": target, "mode": mode, "task": task.name, "n": n, "m": m, "k": k, "o": o,
            "t": task.t, "c": c, "p": p,
            "cycles_per_sample": None if cycles_per_sample is None else round(cycles_per_sample, 1),
            "clock_hz": clock_hz,
            "samples_per_s": None if samples_per_s is None else round(samples_per_s, 2),
            "source": source}


MODES = ("on-chip", "host-driven", "cpu")


def collect(workloads, *, modes=MODES, quick: bool = False, seed: int = 0, progress=None,
            notes: list | None = None, engines: int | None = None) -> list[dict]:
    """Every row for ``workloads`` (see the module docstring); ``notes`` gets one line
    per measurement detail (simulated configurations, brackets, traffic). ``engines``:
    simulate the on-chip rows with that many sample engines instead of each board's
    own (their ``source`` says that this is not the board's bitstream)."""
    from hel_fpga.boards.table import BOARDS
    from hel_fpga.sim.board import SIM_CLK_HZ, SIM_CONFIG

    say = progress or (lambda line: None)
    notes = notes if notes is not None else []
    q = 1 if quick else 0
    rows: list[dict] = []
    onchip_cache: dict = {}
    traffic_cache: dict = {}
    for w in workloads:
        task, n, m = w.load()
        shape = (n, m, task.k, task.o)
        label = f"{task.name} N=M={n}"
        count = len(task.train_idx) if ONCHIP_SAMPLES[q] is None else \
            min(ONCHIP_SAMPLES[q], len(task.train_idx))
        # (name, configuration, clock, baud, has on-chip training); the simulated
        # board gets a store sized to the set whatever its default configuration says.
        targets = [(b.name, b.config, b.clk_hz, b.baud, b.config.store_words > 0)
                   for b in BOARDS.values()]
        targets.append(("sim-board", SIM_CONFIG, SIM_CLK_HZ, None, True))
        for name, base, clk, baud, trains in targets:
            if "on-chip" in modes:
                if not trains:
                    rows.append(row(name, "on-chip", task, shape, c=base.engines, p=base.lanes,
                                    cycles_per_sample=None, clock_hz=clk, samples_per_s=None,
                                    source=f"{SOURCES['unavailable']}: the board's core has no "
                                           "training store (store_words = 0; the UP5K has no room "
                                           "for the training core beside the HEL core)"))
                else:
                    # The store holds the whole training set (also with --quick, which
                    # trains fewer of its samples: one build serves both).
                    what_if = engines is not None and engines != base.engines
                    cfg = onchip_config(base, task, n, m, len(task.train_idx), engines)
                    key = (cfg, task.name, count)
                    if key not in onchip_cache:
                        say(f"bench train: {label}, on chip, simulating {describe_config(cfg)}")
                        store, tc, state = onchip_setup(task, cfg, count, seed)
                        r = measure_onchip(cfg, store, tc, state, progress=say)
                        say(f"bench train:   {r.cycles:,} cycles for {r.samples} samples "
                            f"({r.cycles_per_sample:,.0f}/sample; bracket {r.bracket:.2%}; "
                            f"{r.polls} polls; {r.wall_s:.1f} s of simulation)")
                        onchip_cache[key] = r
                    r = onchip_cache[key]
                    detail = (("not the board's bitstream: its configuration with "
                               f"{cfg.engines} sample engines; " if what_if else "")
                              + f"{describe_config(cfg)}; one TRAIN epoch of {r.samples} samples "
                              f"(batch {2 ** tc_batch_log2(task)}): {r.cycles:,} cycles, "
                              f"over-count ≤ {r.bracket:.2%}")
                    notes.append(f"{name} / {label} on chip: simulated {detail}")
                    rows.append(row(name, "on-chip", task, shape, c=cfg.engines, p=cfg.lanes,
                                    cycles_per_sample=r.cycles_per_sample, clock_hz=clk,
                                    samples_per_s=clk / r.cycles_per_sample,
                                    source=f"{SOURCES['sim']}; {detail}"))
            if "host-driven" in modes and baud is not None:
                cfg = workload_config(base, task, n, m)
                key = (cfg, task.name)
                if key not in traffic_cache:
                    say(f"bench train: {label}, host-driven on the protocol model "
                        f"({cfg.operand_width}-bit operands), {HOST_BATCHES[q]} batch(es)")
                    traffic_cache[key] = measure_host_traffic(cfg, task, HOST_BATCHES[q], seed=seed)
                tr = traffic_cache[key]
                notes.append(f"{name} / {label} host-driven: {tr.bytes_per_sample:,.1f} bytes "
                             f"({tr.tx / tr.samples:,.1f} sent, {tr.rx / tr.samples:,.1f} received) "
                             f"and {tr.turnarounds_per_sample:.3f} turnarounds per sample "
                             f"({tr.samples} samples) at {baud:,} baud")
                for mode, lat in LATENCIES.items():
                    sps = project_samples_per_s(tr.bytes_per_sample, tr.turnarounds_per_sample,
                                                baud, lat)
                    rows.append(row(name, mode, task, shape, c=1, p=cfg.lanes,
                                    cycles_per_sample=None,
                                    clock_hz=clk, samples_per_s=sps,
                                    source=f"{SOURCES['projection']}; {tr.bytes_per_sample:.1f} "
                                           f"B and {tr.turnarounds_per_sample:.3f} turnarounds "
                                           f"per sample at {baud} baud, {lat * 1e3:g} ms each"))
        if "cpu" in modes:
            epochs = CPU_EPOCHS[q]
            say(f"bench train: {label}, float BPTT on the CPU, {epochs} epoch(s)")
            r = measure_cpu_bptt(task, n, m, epochs, seed=seed)
            rows.append(row("cpu", "float-bptt", task, shape, c=None, p=None,
                            cycles_per_sample=None,
                            clock_hz=None, samples_per_s=r["samples_per_s"],
                            source=f"{SOURCES['cpu']}; float64 NumPy BPTT + Adam, batch "
                                   f"{task.defaults['batch']}, {r['samples']} samples in "
                                   f"{r['seconds']:.3f} s"))
            if torch_available():
                say(f"bench train: {label}, PyTorch BPTT on the CPU, {epochs} epoch(s)")
                r = measure_torch_bptt(task, n, m, epochs, seed=seed)
                rows.append(row("cpu", "torch-bptt", task, shape, c=None, p=None, cycles_per_sample=None,
                                clock_hz=None, samples_per_s=r["samples_per_s"],
                                source=f"{SOURCES['cpu']}; PyTorch float64 autograd + Adam, batch "
                                       f"{task.defaults['batch']}, {r['samples']} samples in "
                                       f"{r['seconds']:.3f} s"))
            else:
                rows.append(row("cpu", "torch-bptt", task, shape, c=None, p=None, cycles_per_sample=None,
                                clock_hz=None, samples_per_s=None,
                                source=f"{SOURCES['skipped']}: PyTorch is not installed "
                                       "(import torch failed)"))
    return rows


def tc_batch_log2(task) -> int:
    return int(round(math.log2(task.defaults["batch"])))


def target_verdict(rows: list[dict]) -> str | None:
    """The issue's target on the first ``oscillators`` workload at N = M = 16, or None."""
    on = [r for r in rows if r["target"] == TARGET_BOARD and r["mode"] == "on-chip"
          and r["task"] == "oscillators" and r["n"] == 16 and r["samples_per_s"]]
    cpu = [r for r in rows if r["target"] == "cpu" and r["mode"] == "float-bptt"
           and r["task"] == "oscillators" and r["n"] == 16]
    if not on:
        return None
    sps = on[0]["samples_per_s"]
    text = (f"target ({TARGET_BOARD} on chip, oscillators N=M=16: ≥ {TARGET_SAMPLES_PER_S:,} "
            f"samples/s and ≥ {TARGET_VS_CPU:g}× the CPU float-BPTT row): {sps:,.0f} samples/s "
            f"({'met' if sps >= TARGET_SAMPLES_PER_S else 'NOT met'})")
    if cpu:
        ratio = sps / cpu[0]["samples_per_s"]
        text += (f", {ratio:.2f}× the CPU's {cpu[0]['samples_per_s']:,.0f} samples/s "
                 f"({'met' if ratio >= TARGET_VS_CPU else 'NOT met'})")
    return text


def format_rows(rows: list[dict]) -> list[str]:
    head = ["target", "mode", "task", "N=M", "K", "O", "T", "C", "P", "cycles/sample",
            "clock", "samples/s", "how"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * 9 + "---|"]
    for r in rows:
        sps = r["samples_per_s"]
        how = r["source"].split(";")[0].split(":")[0]
        cells = [r["target"], r["mode"], r["task"], r["n"] if r["n"] == r["m"] else f"{r['n']}/{r['m']}",
                 r["k"], r["o"], r["t"], "-" if r["c"] is None else r["c"],
                 "-" if r["p"] is None else r["p"],
                 "-" if r["cycles_per_sample"] is None else f"{r['cycles_per_sample']:,.0f}",
                 "-" if r["clock_hz"] is None else f"{r['clock_hz'] / 1e6:g} MHz",
                 ("-" if sps is None else f"{sps:,.0f}" if sps >= 100 else f"{sps:,.1f}"),
                 how]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def run_train(args) -> int:
    from hel_fpga.host.errors import UsageError

    def progress(line):
        print(line, file=sys.stderr, flush=True)

    workloads = parse_tasks(args.tasks)
    modes = tuple(x.strip() for x in args.modes.split(",") if x.strip())
    bad = [x for x in modes if x not in MODES]
    if bad or not modes:
        raise UsageError(f"--modes wants a comma-separated subset of {', '.join(MODES)}, got {args.modes!r}")
    notes: list[str] = []
    try:
        if args.engines is not None:
            from hel_fpga.spec.formats import ENGINES_MAX
            if not 1 <= args.engines <= ENGINES_MAX:
                raise UsageError(f"--engines wants 1 … {ENGINES_MAX}, got {args.engines}")
        rows = collect(workloads, modes=modes, quick=args.quick, seed=args.seed, progress=progress,
                       notes=notes, engines=args.engines)
    except Exception as e:
        from hel_fpga.host.device import DeviceError
        from hel_fpga.sim.board import SimBoardError
        if isinstance(e, (DeviceError, SimBoardError)):
            raise UsageError(str(e).splitlines()[0]) from None
        raise
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("\n".join(format_rows(rows)))
    print()
    print("how: sim = measured, RTL simulation cycles × the board's clock (one TRAIN epoch over the "
          "protocol, cycles/sample an upper bound); projection = protocol-model bytes at the baud "
          "+ a latency per turnaround (the device's compute not counted); cpu = measured wall time "
          "on this machine. C = samples per weight read.")
    for r in rows:
        if r["source"].startswith((SOURCES["unavailable"], SOURCES["skipped"])):
            print(f"{r['target']} {r['mode']} ({r['task']} N=M={r['n']}): {r['source']}")
    for line in notes:
        print(line)
    verdict = target_verdict(rows)
    if verdict:
        print(verdict)
    print(ENERGY_NOTE)
    return 0
