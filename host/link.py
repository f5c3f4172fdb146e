"""The device API over a serial port: :class:`SerialDevice` speaks :mod:`hel_fpga.spec.protocol`.

Works over anything with pyserial's ``read``/``write``/``timeout`` interface:
a real board (``/dev/ttyUSB1``), the Verilator-simulated board's pty, a
pyserial URL, or :class:`hel_fpga.sim.protocol_model.ModelPort` (the reference model
in-process).

Reliability (see docs/protocol.md, "Flow control and retries"):

* every wait has a deadline; a device that stays silent raises
  :class:`~hel_fpga.host.device.DeviceError` saying which command, how long, how often;
* a request whose reply is lost, corrupted (bad CRC) or answered with a link
  error is retransmitted with the *same* seq, up to ``retries`` times: reads
  and other idempotent commands repeat harmlessly, a retransmitted FORWARD is
  recognised by the device (same cmd and seq) and not accumulated twice;
* transfers (WRITE_PARAMS, LOAD, ECHO) run go-back-N with a window of
  :data:`hel_fpga.spec.protocol.WINDOW` chunks and a window of one after each go-back,
  resolving a lost final ack through STATUS;
* the device's command errors become exceptions: WRONG_STATE →
  :class:`RemoteStateError` (also a :class:`hel_fpga.sim.golden.StateError`),
  OUT_OF_RANGE → :class:`RemoteRangeError` (also a
  :class:`hel_fpga.spec.formats.FormatError`), others :class:`RemoteError`; all are
  :class:`~hel_fpga.host.device.DeviceError`.
"""

from __future__ import annotations

import time

import numpy as np

from hel_fpga.host.device import Device, DeviceError, Ident, Status
from hel_fpga.spec.framing import Frame, FrameError, FrameReader, encode_frame
from hel_fpga.spec.wire import join_chunks, split_chunks
from hel_fpga.spec import protocol as P
from hel_fpga.spec.formats import ConfigError, FormatError, HelConfig
from hel_fpga.spec.names import PARAM_NAMES
from hel_fpga.spec.protocol import Command, ErrorCode, StatusFlag
from hel_fpga.sim.golden import StateError
from hel_fpga.spec.names import BANKS, ESTIMATORS
from hel_fpga.spec.training import SETUP_WORD_MAX, SETUP_WORDS

__all__ = ["SerialDevice", "RemoteError", "RemoteStateError", "RemoteRangeError", "check_config"]

_LINK_CODES = {ErrorCode.BAD_CRC, ErrorCode.BAD_LENGTH, ErrorCode.OVERRUN}


class RemoteError(DeviceError):
    """The device answered a request with an ERROR reply."""

    def __init__(self, code: int, cmd: int, seq: int, arg: int = 0, what: str = ""):
        self.code, self.cmd, self.seq, self.arg = code, cmd, seq, arg
        try:
            name = ErrorCode(code).name
        except ValueError:
            name = f"error 0x{code:02X}"
        try:
            cname = Command(cmd).name
        except ValueError:
            cname = f"0x{cmd:02X}"
        super().__init__(f"device rejected {cname} (seq {seq}) with {name}"
                         + (f" (arg {arg})" if arg else "") + (f": {what}" if what else ""))


class RemoteStateError(RemoteError, StateError):
    """WRONG_STATE: the operation is not allowed now (e.g. ECHO before FORWARD)."""


class RemoteRangeError(RemoteError, FormatError):
    """OUT_OF_RANGE: a value or length outside what the device's configuration allows."""


def _remote_error(code, cmd, seq, arg=0) -> RemoteError:
    cls = {ErrorCode.WRONG_STATE: RemoteStateError,
           ErrorCode.OUT_OF_RANGE: RemoteRangeError}.get(code, RemoteError)
    return cls(code, cmd, seq, arg)


class _Retry(Exception):
    """A recoverable failure of one attempt (timeout, corrupt reply, link error)."""


class SerialDevice(Device):
    """A HEL device behind a serial port.

    Parameters
    ----------
    port :
        A pyserial ``Serial`` (or anything with ``write``, ``read``, ``timeout``).
    timeout : float
        Seconds to wait for a reply beyond the estimated compute time.
    retries : int
        Retransmissions of a request (or go-backs of a transfer) before giving up.
    expect : HelConfig, optional
        Raise :class:`DeviceError` (naming the fields) if the device's IDENT differs.
    board : hel_fpga.sim.board.SimBoard, optional
        The simulated board behind ``port``: :meth:`cycles` reads its clock
        counter and :meth:`close` stops it.
    """

    def __init__(self, port, *, timeout: float = 2.0, retries: int = 4,
                 expect: HelConfig | None = None, board=None):
        self.port = port
        self.timeout = timeout
        self.retries = retries
        self.board = board
        self._reader = FrameReader()
        self._pending: list = []
        self._seq = 0
        self._t: int | None = None     # length of the sequence this host loaded
        self.stats = {"retries": 0, "go_backs": 0, "stale": 0}
        try:
            if getattr(port, "timeout", None) is None or port.timeout > 0.05:
                port.timeout = 0.05
        except Exception:  # noqa: BLE001 - a port without a settable timeout
            pass
        self._ident = None
        self._ident = self.ident()
        if expect is not None:
            check_config(self._ident.config, expect)

    # ---- Device API ----------------------------------------------------------------------
    @property
    def config(self) -> HelConfig:
        return self._ident.config

    def ident(self) -> Ident:
        payload = self._request(Command.IDENT)
        try:
            record = P.unpack_ident(payload)
        except ValueError as e:
            raise DeviceError(f"malformed IDENT reply: {e}") from None
        if record.protocol_version != P.PROTOCOL_VERSION:
            raise DeviceError(f"device speaks protocol version {record.protocol_version}, "
                              f"this host speaks {P.PROTOCOL_VERSION}")
        try:
            cfg = HelConfig.from_dict(record.config)
        except ConfigError as e:
            raise DeviceError(f"device reports an invalid configuration: {e}") from None
        return Ident(record.protocol_version, cfg, record.clock_hz, record.baud, record.name)

    def write_params(self, params) -> None:
        cfg, shapes = self.config, self.config.param_shapes()
        checked = {}
        for name, arr in params.items():
            if name not in shapes:
                raise FormatError(f"unknown parameter {name!r}")
            a = cfg.param.check_int(arr, f"parameter {name}")
            if a.shape != shapes[name]:
                raise FormatError(f"parameter {name} has shape {a.shape}, expected {shapes[name]}")
            checked[name] = a
        names = [n for n in PARAM_NAMES if n in checked]
        if not names:
            return
        mask = sum(1 << PARAM_NAMES.index(n) for n in names)
        words = np.concatenate([checked[n].ravel() for n in names])
        self._transfer(Command.WRITE_PARAMS, bytes([mask]), words)

    def read_params(self) -> dict[str, np.ndarray]:
        shapes = self.config.param_shapes()
        total = sum(int(np.prod(s)) for s in shapes.values())
        words = self._read_block(Command.READ_PARAMS, bytes([P.PARAM_MASK_ALL]), total)
        return _split(words, shapes)

    def load(self, u) -> None:
        cfg = self.config
        arr = np.asarray(u)
        if arr.ndim != 2 or arr.shape[1] != cfg.k:
            raise FormatError(f"inputs must have shape (T, {cfg.k}), got {arr.shape}")
        arr = cfg.operand.check_int(arr, "inputs")
        t = arr.shape[0]
        if t > 0xFFFFFFFF:
            raise FormatError(f"sequence length {t} does not fit the protocol")
        self._transfer(Command.LOAD, t.to_bytes(4, "little"), arr,
                       on_open=lambda: setattr(self, "_t", None))
        self._t = t

    def forward(self, estimator: str = "centred") -> np.ndarray:
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        cfg = self.config
        t = self._t if self._t is not None else self.status_fields()["t_loaded"]
        cycles = max(t, 1) * cfg.macs_forward_step * 2 // cfg.lanes
        words = self._read_block(Command.FORWARD, bytes([ESTIMATORS.index(estimator)]),
                                 t * cfg.o, cycles=cycles)
        return words.reshape(t, cfg.o)

    def echo(self, nudges) -> None:
        cfg = self.config
        nu = np.asarray(nudges)
        if nu.ndim != 2 or nu.shape[1] != cfg.o:
            raise FormatError(f"nudges must have shape (rows, {cfg.o}), got {nu.shape}")
        nu = cfg.state.check_int(nu, "nudges")
        t = self._t if self._t is not None else len(nu)
        cycles = t * cfg.macs_echo_step // cfg.lanes
        self._transfer(Command.ECHO, len(nu).to_bytes(4, "little"), nu, cycles=cycles)

    def read_accumulators(self) -> dict[str, np.ndarray]:
        shapes = self.config.param_shapes()
        total = sum(int(np.prod(s)) for s in shapes.values())
        words = self._read_block(Command.READ_ACC, b"", total)
        return _split(words, shapes)

    def clear_accumulators(self) -> None:
        self._request(Command.CLEAR_ACC)

    def read_state(self, bank: str = "fwd"):
        if bank not in BANKS:
            raise ValueError(f"bank must be one of {BANKS}, got {bank!r}")
        n = self.config.n
        words = self._read_block(Command.READ_STATE, bytes([BANKS.index(bank)]), 2 * n)
        return words[:n].copy(), words[n:].copy()

    def status_fields(self) -> dict[str, int]:
        """The raw STATUS reply (flags, xfer_cmd, xfer_done, t_loaded)."""
        payload = self._request(Command.STATUS)
        try:
            fields, _ = P.unpack_fields(P.STATUS_LAYOUT, payload)
        except ValueError as e:
            raise DeviceError(f"malformed STATUS reply: {e}") from None
        return fields

    def status(self) -> Status:
        flags = StatusFlag(self.status_fields()["flags"])
        return Status(bool(flags & StatusFlag.STATE_OVERFLOW), bool(flags & StatusFlag.ACC_OVERFLOW))

    def clear_flags(self) -> None:
        self._request(Command.CLEAR_FLAGS)

    def selftest(self, steps: int, seed: int = 1) -> bool:
        if not 0 <= steps <= 0xFFFFFFFF:
            raise FormatError(f"selftest steps must fit 32 bits, got {steps}")
        cfg = self.config
        cycles = 2 * steps * cfg.macs_forward_step // cfg.lanes
        payload = self._request(Command.SELFTEST, steps.to_bytes(4, "little")
                                + (seed & 0xFFFFFFFF).to_bytes(4, "little"), cycles=cycles)
        if len(payload) != 1:
            raise DeviceError(f"malformed SELFTEST reply of {len(payload)} bytes")
        return payload[0] == 1

    def reset(self) -> None:
        """RESET: abort any transfer; parameters, accumulators, state, flags to zero."""
        self._request(Command.RESET)
        self._t = None

    # ---- on-chip training (docs/protocol.md "On-chip training") ----------------------------
    def train_setup(self, words) -> None:
        """TRAIN_SETUP: the SETUP_WORDS words of :func:`hel_fpga.spec.training.pack_setup`."""
        words = np.asarray(words, dtype=np.int64)
        if words.shape != (SETUP_WORDS,) or words.min() < 0 or words.max() > SETUP_WORD_MAX:
            raise FormatError(f"a training setup is {SETUP_WORDS} words of 0..{SETUP_WORD_MAX}")
        # an operand word carries the setup word's 16 bits (two's complement when narrower)
        ow = self.config.operand_width
        signed = np.where(words >> (ow - 1) & 1, words - (1 << ow), words)
        self._transfer(Command.TRAIN_SETUP, b"", signed)

    def store(self, start: int, words) -> None:
        """STORE: operand words into the training store from address ``start``."""
        cfg = self.config
        words = cfg.operand.check_int(np.asarray(words).ravel(), "store words")
        if len(words) == 0:
            return
        if not 0 <= start or start + len(words) > cfg.store_words:
            raise FormatError(f"store words {start}..{start + len(words) - 1} do not fit the "
                              f"device's store of {cfg.store_words} words")
        payload = len(words).to_bytes(4, "little") + start.to_bytes(4, "little")
        self._transfer(Command.STORE, payload, words)

    def stream(self, words, *, wait_cycles: int = 0) -> None:
        """STREAM: records for the running streamed pass (docs/onchip.md), at most
        ``store_words`` words. The device takes them as its ring frees slots, so a
        chunk's ack may wait for samples to finish: ``wait_cycles`` is the device work
        one chunk may wait for, added to the transfer's reply timeout."""
        cfg = self.config
        words = cfg.operand.check_int(np.asarray(words).ravel(), "stream words")
        if not 1 <= len(words) <= cfg.store_words:
            raise FormatError(f"a STREAM transfer carries 1..{cfg.store_words} words "
                              f"(the device's store), got {len(words)}")
        self._transfer(Command.STREAM, len(words).to_bytes(4, "little"), words, cycles=wait_cycles)

    def write_master(self, which: int, words) -> None:
        """WRITE_MASTER: master weights (``which`` 0; the parameters follow) or moments (1)."""
        self._transfer(Command.WRITE_MASTER, bytes([which]), np.asarray(words, dtype=np.int64),
                       cycles=2 * self._n_params())

    def read_master(self, which: int) -> np.ndarray:
        """READ_MASTER: the master weights (0) or the moments (1), PARAM_NAMES order."""
        return self._read_block(Command.READ_MASTER, bytes([which]), self._n_params())

    def start_pass(self, cmd: Command, arg: int) -> None:
        """TRAIN (``arg`` = epoch) or EVAL (``arg`` = set): the pass then runs in the device."""
        if cmd == Command.TRAIN:
            self._request(cmd, (arg & 0xFFFFFFFF).to_bytes(4, "little"))
        elif cmd == Command.EVAL:
            self._request(cmd, bytes([arg]))
        else:
            raise ValueError(f"{cmd!r} does not start a pass")

    def metrics(self) -> dict[str, int]:
        """METRICS: the running or last pass's counters (:data:`~hel_fpga.spec.protocol.METRICS_LAYOUT`)."""
        payload = self._request(Command.METRICS)
        try:
            fields, rest = P.unpack_fields(P.METRICS_LAYOUT, payload)
        except ValueError as e:
            raise DeviceError(f"malformed METRICS reply: {e}") from None
        if rest:
            raise DeviceError(f"malformed METRICS reply: {len(rest)} bytes too many")
        return fields

    def _n_params(self) -> int:
        return sum(int(np.prod(s)) for s in self.config.param_shapes().values())

    def cycles(self) -> int | None:
        return None if self.board is None else self.board.cycles()

    def close(self) -> None:
        try:
            self.port.close()
        finally:
            if self.board is not None:
                self.board.stop()

    # ---- link machinery --------------------------------------------------------------------
    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFF
        return self._seq

    def _send(self, cmd: int, seq: int, payload: bytes = b"") -> None:
        self.port.write(encode_frame(int(cmd), seq, payload))
        flush = getattr(self.port, "flush", None)
        if flush is not None:
            flush()

    def _allowance(self, cycles: int) -> float:
        """Seconds to allow for ``cycles`` of device work (≥ 1 M cycles/s assumed)."""
        clock = self._ident.clock_hz if self._ident is not None else 0
        rate = min(clock, 1e6) if clock else 1e6
        return 4.0 * cycles / rate

    def _next_item(self, deadline: float):
        """The next received Frame or FrameError, or None at the deadline."""
        while not self._pending:
            if time.monotonic() >= deadline:
                return None
            n = getattr(self.port, "in_waiting", 0) or 1
            data = self.port.read(n)
            if data:
                self._pending.extend(self._reader.feed(data))
        return self._pending.pop(0)

    def _flush_input(self) -> None:
        self._pending.clear()
        self._reader.reset()
        reset = getattr(self.port, "reset_input_buffer", None)
        if reset is not None:
            reset()

    def _attempts(self, cmd: int, seq: int, payload: bytes, collect):
        """Send a request and run ``collect`` on its replies; retransmit on _Retry."""
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats["retries"] += 1
            self._send(cmd, seq, payload)
            try:
                return collect()
            except _Retry as e:
                last = e
        raise DeviceError(f"{Command(cmd).name}: no valid reply after {self.retries + 1} "
                          f"attempts ({last}); is the device connected, powered and running "
                          f"the hel bitstream at the right baud rate?")

    def _check_error(self, item: Frame, cmd: int, seq: int) -> None:
        """Raise for an ERROR reply that concerns request (cmd, seq)."""
        if len(item.payload) < 4:
            raise _Retry("malformed ERROR reply")
        f, _ = P.unpack_fields(P.ERROR_LAYOUT, item.payload)
        if f["code"] in _LINK_CODES:
            raise _Retry(f"device reported {ErrorCode(f['code']).name} for our frame")
        if item.seq == seq and f["cmd"] == cmd:
            raise _remote_error(f["code"], f["cmd"], item.seq, f["arg"])
        self.stats["stale"] += 1

    def _request(self, cmd: Command, payload: bytes = b"", *, cycles: int = 0) -> bytes:
        """A request with one reply frame; return the reply payload."""
        self._flush_input()
        seq = self._next_seq()
        wait = self.timeout + self._allowance(cycles)

        def collect():
            deadline = time.monotonic() + wait
            while True:
                item = self._next_item(deadline)
                if item is None:
                    raise _Retry(f"no reply within {wait:.2f} s")
                if isinstance(item, FrameError):
                    raise _Retry(f"corrupt reply ({item})")
                if item.cmd == P.ERROR_REPLY:
                    self._check_error(item, cmd, seq)
                elif item.seq == seq and item.cmd == cmd | P.REPLY_BIT:
                    return item.payload
                else:
                    self.stats["stale"] += 1

        return self._attempts(cmd, seq, payload, collect)

    def _read_block(self, cmd: Command, payload: bytes, total: int, *,
                    cycles: int = 0) -> np.ndarray:
        """A request answered by data replies carrying ``total`` words (of the width
        :data:`hel_fpga.spec.protocol.WORD_WIDTH` gives ``cmd``)."""
        width = P.word_width(self.config, cmd)
        self._flush_input()
        seq = self._next_seq()
        n = P.chunk_count(total, width)
        got: dict[int, bytes] = {}
        wait = self.timeout + self._allowance(cycles)

        def collect():
            deadline = time.monotonic() + wait
            while len(got) < n:
                item = self._next_item(deadline)
                if item is None:
                    raise _Retry(f"{len(got)} of {n} reply frames within {wait:.2f} s")
                if isinstance(item, FrameError):
                    raise _Retry(f"corrupt reply ({item})")
                if item.cmd == P.ERROR_REPLY:
                    self._check_error(item, cmd, seq)
                    continue
                if item.seq != seq or item.cmd != cmd | P.REPLY_BIT or len(item.payload) < 2:
                    self.stats["stale"] += 1
                    continue
                index = int.from_bytes(item.payload[:2], "little")
                data = item.payload[2:]
                if index >= n or len(data) != P.chunk_bytes(total, width, index):
                    raise DeviceError(f"{cmd.name}: reply chunk {index} of {len(data)} bytes "
                                      f"does not fit {total} words of {width} bits")
                got[index] = data
                deadline = time.monotonic() + wait
            return join_chunks([got[i] for i in range(n)], total, width)

        return self._attempts(cmd, seq, payload, collect)

    def _transfer(self, cmd: Command, payload: bytes, words, *, cycles: int = 0,
                  on_open=None) -> None:
        """Open a transfer with ``cmd`` and send ``words`` as DATA chunks (go-back-N) of
        the width :data:`hel_fpga.spec.protocol.WORD_WIDTH` gives ``cmd``."""
        width = P.word_width(self.config, cmd)
        chunks = split_chunks(np.asarray(words).ravel(), width)
        n = len(chunks)
        self._request(cmd, payload)
        if on_open is not None:
            on_open()
        wait = self.timeout + self._allowance(cycles)
        base = nxt = 0
        window = P.WINDOW
        live: dict[int, int] = {}          # seq → chunk index, frames since the last go-back
        sent_seqs: set[int] = set()
        failures = 0
        deadline = time.monotonic() + wait

        def go_back(reason: str):
            nonlocal nxt, window, failures
            failures += 1
            self.stats["go_backs"] += 1
            if failures > self.retries:
                raise DeviceError(f"{cmd.name}: transfer failed at chunk {base} of {n} "
                                  f"after {failures} go-backs ({reason})")
            nxt, window = base, 1
            live.clear()

        while base < n:
            while nxt < n and nxt - base < window:
                s = self._next_seq()
                self._send(Command.DATA, s, nxt.to_bytes(2, "little") + chunks[nxt])
                live[s] = nxt
                sent_seqs.add(s)
                nxt += 1
            item = self._next_item(deadline)
            if item is None or (isinstance(item, Frame) and item.cmd == P.ERROR_REPLY
                                and item.seq in live and len(item.payload) >= 4
                                and item.payload[0] == ErrorCode.WRONG_STATE):
                # Silence, or the transfer is closed already: ask the device where it is.
                self._flush_input()
                st = self.status_fields()
                open_ = bool(st["flags"] & StatusFlag.XFER_OPEN)
                if st["xfer_cmd"] == cmd and not open_ and st["xfer_done"] == n:
                    return
                if st["xfer_cmd"] != cmd or not open_:
                    raise DeviceError(f"{cmd.name}: the device lost the transfer "
                                      f"(STATUS: {st})")
                base = max(base, st["xfer_done"])
                go_back("no ack within %.2f s" % wait if item is None else "transfer closed")
                deadline = time.monotonic() + wait
                continue
            if isinstance(item, FrameError):
                go_back(f"corrupt reply ({item})")
                continue
            if item.cmd == Command.DATA | P.REPLY_BIT and item.seq in sent_seqs \
                    and len(item.payload) == 2:
                e = int.from_bytes(item.payload, "little")
                if e > base:
                    base, failures, window = min(e, n), 0, P.WINDOW
                    deadline = time.monotonic() + wait
                continue
            if item.cmd == P.ERROR_REPLY and len(item.payload) >= 4:
                f, _ = P.unpack_fields(P.ERROR_LAYOUT, item.payload)
                if f["code"] in _LINK_CODES:
                    go_back(f"device reported {ErrorCode(f['code']).name}")
                elif item.seq in live and f["code"] == ErrorCode.SEQUENCE:
                    base = max(base, f["arg"])
                    go_back("chunk out of sequence")
                elif item.seq in live:
                    raise _remote_error(f["code"], f["cmd"], item.seq, f["arg"])
                else:
                    self.stats["stale"] += 1
                continue
            self.stats["stale"] += 1


def _split(words: np.ndarray, shapes) -> dict[str, np.ndarray]:
    out, pos = {}, 0
    for name in PARAM_NAMES:
        size = int(np.prod(shapes[name]))
        out[name] = words[pos:pos + size].reshape(shapes[name]).copy()
        pos += size
    return out


def check_config(actual: HelConfig, expect: HelConfig) -> None:
    """Raise DeviceError naming every field where the device differs from ``expect``.

    ``lanes`` is exempt: the number of MAC lanes changes the speed, never a bit of
    the results.
    """
    a, e = actual.to_dict(), expect.to_dict()
    diff = [f"{k}: device {a[k]}, expected {e[k]}" for k in e if a.get(k) != e[k] and k != "lanes"]
    if diff:
        raise DeviceError("the device's configuration differs from the expected one ("
                          + "; ".join(diff) + "); rebuild the bitstream or use its configuration")
