"""Reference model of the device side of the serial protocol (bytes in, bytes out).

:class:`ProtocolModel` is a whole HEL device in pure Python: raw UART bytes go
in through :meth:`ProtocolModel.feed`, the reply bytes come out. Inside it runs

* a streaming frame decoder that mirrors :class:`hel_fpga.rtl.framing.FrameDecoder`
  decision for decision (on-the-fly COBS, decoded length counter saturating at
  ``MAX_BODY_LEN + 1``, best-effort ``seq`` = the second decoded byte, verdict
  precedence BAD_LENGTH > BAD_CRC, empty frames ignored), and
* the command unit of ``docs/protocol.md`` (rules: :mod:`hel_fpga.spec.protocol`) around
  ``cfg.engines`` :class:`hel_fpga.sim.golden.GoldenCore` engines (the host's commands
  see engine 0, :class:`ProtocolModel` lists which act on all).

It is the byte-for-byte reference for the gateware's command unit and a fast
device for host tests (:class:`ModelPort` makes it look like a pyserial port,
:class:`PtyServer` puts it behind a real pseudo-terminal).

Deliberate simplifications (not observable through the protocol except as noted):
the model answers every frame as soon as its delimiter arrives, so it never runs out
of room by itself; which frames a real device cannot take in depends on its timing,
and ``feed(data, overrun=True)`` answers the frames of ``data`` as such a device does
(ERROR OVERRUN, seq :data:`hel_fpga.spec.protocol.OVERRUN_SEQ`, nothing else changes).
The model applies a transfer's words when its last chunk arrives; STATUS's overflow bits during an
open ECHO transfer therefore lag the gateware's (the protocol leaves them
unspecified until the transfer completes).
"""

from __future__ import annotations

import os
import select
import threading
import time
import tty

import numpy as np

from hel_fpga.spec.framing import encode_frame
from hel_fpga.spec.wire import join_chunks, split_chunks
from hel_fpga.spec import protocol as P
from hel_fpga.spec.formats import FormatError, HelConfig
from hel_fpga.spec.names import BANKS, ESTIMATORS, PARAM_NAMES
from hel_fpga.spec.protocol import Command, ErrorCode, StatusFlag
from hel_fpga.sim.golden import GoldenCore, StateError
from hel_fpga.sim.onchip import TrainingUnit
from hel_fpga.spec.training import SETUP_WORDS

__all__ = ["ProtocolModel", "ModelPort", "PtyServer", "StreamDecoder"]


class _Reject(Exception):
    def __init__(self, code: ErrorCode, arg: int = 0):
        self.code, self.arg = code, arg


class StreamDecoder:
    """Byte-at-a-time frame decoder with the gateware decoder's exact verdicts.

    :meth:`push` returns ``None`` or, at a delimiter ending a non-empty frame,
    ``("frame", cmd, seq, payload)`` or ``("error", code, seq)``.
    """

    def __init__(self, max_body: int = P.MAX_BODY_LEN):
        self.max_body = max_body
        self.cobs_left = 0
        self.cobs_zero = False
        self.in_frame = False
        self.body = bytearray()
        self.n = 0

    def _emit(self, b: int) -> None:
        if self.n < self.max_body:
            self.body.append(b)
        if self.n <= self.max_body:
            self.n += 1

    def push(self, byte: int):
        if byte == P.DELIMITER:
            result = None
            if self.in_frame:
                body, n = bytes(self.body), self.n
                seq = body[1] if n >= 2 else 0
                if n < P.MIN_BODY_LEN or n > self.max_body or self.cobs_left != 0:
                    result = ("error", ErrorCode.BAD_LENGTH, seq)
                elif P.crc32(body[:-P.CRC_LEN]) != int.from_bytes(body[-P.CRC_LEN:], "little"):
                    result = ("error", ErrorCode.BAD_CRC, seq)
                else:
                    result = ("frame", body[0], body[1], body[P.HEADER_LEN:-P.CRC_LEN])
            self.cobs_left, self.in_frame, self.n = 0, False, 0
            self.body.clear()
            return result
        if self.cobs_left == 0:            # a code byte: completes the previous block's zero
            if self.in_frame and self.cobs_zero:
                self._emit(0)
            self.cobs_left = byte - 1
            self.cobs_zero = byte != 0xFF
            self.in_frame = True
        else:
            self._emit(byte)
            self.cobs_left -= 1
        return None


class ProtocolModel:
    """The device: frame decoder + command unit + :class:`GoldenCore` engines.

    The device has ``cfg.engines`` = C cores (``cores``; the on-chip training
    loop's sample engines, :class:`~hel_fpga.sim.onchip.TrainingUnit`); ``core``
    is engine 0. LOAD, FORWARD, ECHO, READ_ACC, READ_STATE, SELFTEST and
    READ_PARAMS act on engine 0; WRITE_PARAMS, CLEAR_ACC, CLEAR_FLAGS, RESET and
    WRITE_MASTER's master weights act on every engine; the overflow flags STATUS
    reports are the OR over the engines.

    Parameters
    ----------
    cfg : HelConfig
        The configuration the "bitstream" was built for (reported by IDENT).
    clock_hz, baud, name :
        Reported by IDENT.
    """

    def __init__(self, cfg: HelConfig, *, clock_hz: int = 0, baud: int = 0,
                 name: str = "protocol model"):
        self.cfg = cfg
        self.ident = P.pack_ident(cfg, clock_hz, baud, name)      # the IDENT reply payload
        self.decoder = StreamDecoder()
        self.frames_in = 0
        self.errors_out = 0
        self.cores = [GoldenCore(cfg) for _ in range(cfg.engines)]
        self.core = self.cores[0]
        # on-chip training: its memories outlive RESET (only the setup and metrics go)
        self.trainer = TrainingUnit(cfg, self.cores) if cfg.store_words else None
        self._reset()

    # ---- state -----------------------------------------------------------------------
    def _reset(self) -> None:
        self.cores = [GoldenCore(self.cfg) for _ in range(self.cfg.engines)]
        self.core = self.cores[0]
        if self.trainer is not None:
            self.trainer.reset()
            self.trainer.attach(self.cores)
        self.xfer: dict | None = None       # the open transfer
        self.xfer_cmd = 0                   # cmd of the open / last completed transfer
        self.xfer_done = 0                  # chunks applied in it
        self.last: tuple[int, int] | None = None   # (cmd, seq) of the last good, executed frame

    @property
    def loaded(self) -> int:
        return len(self.core.inputs)

    @property
    def forwarded(self) -> str | None:
        return self.core._forwarded  # noqa: SLF001 (the model is the core's state machine)

    # ---- bytes in, bytes out -------------------------------------------------------------
    def feed(self, data: bytes, *, overrun: bool = False) -> bytes:
        """Consume raw line bytes; return every reply byte they cause, in order.

        With ``overrun``, every frame that ends in ``data`` is one the device could not
        take in: whatever it holds, it is answered with :meth:`overrun_reply` and
        changes nothing else (the decoder still reads its bytes to stay in step).
        """
        out = bytearray()
        for b in bytes(data):
            r = self.decoder.push(b)
            if r is None:
                continue
            if overrun:
                out += self.overrun_reply()
            elif r[0] == "error":
                out += self._error(r[2], r[1], 0)
            else:
                self.frames_in += 1
                out += self.handle(r[1], r[2], r[3])
        return bytes(out)

    def overrun_reply(self) -> bytes:
        """The answer to a frame the device could not take in: ERROR OVERRUN with seq
        :data:`~hel_fpga.spec.protocol.OVERRUN_SEQ`, cmd 0, arg 0."""
        return self._error(P.OVERRUN_SEQ, ErrorCode.OVERRUN, 0)

    def _error(self, seq: int, code: ErrorCode, cmd: int, arg: int = 0) -> bytes:
        self.errors_out += 1
        payload = P.pack_fields(P.ERROR_LAYOUT, {"code": code, "cmd": cmd, "arg": arg})
        return encode_frame(P.ERROR_REPLY, seq, payload)

    def _reply(self, cmd: int, seq: int, payload: bytes = b"") -> bytes:
        return encode_frame(cmd | P.REPLY_BIT, seq, payload)

    def _data_replies(self, cmd: Command, seq: int, words) -> bytes:
        return b"".join(self._reply(cmd, seq, i.to_bytes(2, "little") + chunk)
                        for i, chunk in enumerate(split_chunks(words, P.word_width(self.cfg, cmd))))

    # ---- the command unit ------------------------------------------------------------------
    def handle(self, cmd: int, seq: int, payload: bytes) -> bytes:
        """Execute one good frame; return its reply frames (wire bytes)."""
        duplicate = self.last == (cmd, seq)
        try:
            out = self._execute(cmd, seq, bytes(payload), duplicate)
        except _Reject as e:
            self.last = None
            return self._error(seq, e.code, cmd, e.arg)
        except StateError:
            self.last = None
            return self._error(seq, ErrorCode.WRONG_STATE, cmd)
        except (FormatError, ValueError):
            self.last = None
            return self._error(seq, ErrorCode.OUT_OF_RANGE, cmd)
        self.last = (cmd, seq)
        return out

    def _execute(self, cmd: int, seq: int, payload: bytes, duplicate: bool) -> bytes:
        c = self.cfg
        try:
            cmd = Command(cmd)
        except ValueError:
            raise _Reject(ErrorCode.UNKNOWN_COMMAND) from None
        if cmd in P.TRAINING_COMMANDS and self.trainer is None:
            raise _Reject(ErrorCode.UNKNOWN_COMMAND)
        if self.xfer is not None and cmd not in P.DURING_TRANSFER:
            if duplicate and cmd == self.xfer["cmd"] and self.xfer["next"] == 0:
                return self._reply(cmd, seq)        # retransmitted opening: ack again
            raise _Reject(ErrorCode.BUSY)
        # (a transfer open during a pass is a STREAM's: DURING_TRANSFER's rule applies)
        if (self.xfer is None and self.trainer is not None and self.trainer.running
                and cmd not in P.DURING_PASS
                and not (cmd == Command.STREAM and self.trainer.streaming)):
            raise _Reject(ErrorCode.BUSY)
        if not P.request_len_ok(cmd, len(payload)):
            raise _Reject(ErrorCode.OUT_OF_RANGE)
        if cmd == Command.DATA:
            return self._data(seq, payload)
        u8 = payload[0] if payload else 0
        u32 = int.from_bytes(payload[:4], "little")

        if cmd == Command.IDENT:
            return self._reply(cmd, seq, self.ident)
        if cmd == Command.STATUS:
            return self._reply(cmd, seq, P.pack_fields(P.STATUS_LAYOUT, self.status_fields()))
        if cmd == Command.CLEAR_FLAGS:
            for core in self.cores:
                core.clear_flags()
            return self._reply(cmd, seq)
        if cmd == Command.RESET:
            self._reset()
            return self._reply(cmd, seq)
        if cmd == Command.CLEAR_ACC:
            for core in self.cores:
                core.clear_accumulators()
            return self._reply(cmd, seq)
        if cmd == Command.READ_ACC:
            acc = self.core.read_accumulators()
            words = np.concatenate([acc[k].ravel() for k in PARAM_NAMES])
            return self._data_replies(cmd, seq, words)
        if cmd == Command.READ_PARAMS:
            names = self._mask(u8)
            params = self.core.read_params()
            words = np.concatenate([params[k].ravel() for k in names])
            return self._data_replies(cmd, seq, words)
        if cmd == Command.READ_STATE:
            if u8 >= len(BANKS):
                raise _Reject(ErrorCode.OUT_OF_RANGE)
            bank = self.core.read_state(BANKS[u8])
            return self._data_replies(cmd, seq, np.concatenate([bank.q, bank.w]))
        if cmd == Command.SELFTEST:
            steps, seed = u32, int.from_bytes(payload[4:8], "little")
            if steps < 1:
                raise _Reject(ErrorCode.OUT_OF_RANGE)
            ok = self.core.selftest(steps, seed)
            return self._reply(cmd, seq, bytes([int(ok)]))
        if cmd == Command.FORWARD:
            if self.loaded == 0:
                raise _Reject(ErrorCode.WRONG_STATE)
            if u8 >= len(ESTIMATORS):
                raise _Reject(ErrorCode.OUT_OF_RANGE)
            estimator = ESTIMATORS[u8]
            if duplicate:    # retransmission: same outputs, no second −G(0)
                acc, flag = self.core.read_accumulators(), self.core.acc_overflow
                y = self.core.forward(estimator)
                self.core.acc, self.core.acc_overflow = acc, flag
            else:
                y = self.core.forward(estimator)
            return self._data_replies(cmd, seq, y.ravel())
        if cmd == Command.WRITE_PARAMS:
            names = self._mask(u8)
            shapes = c.param_shapes()
            total = sum(int(np.prod(shapes[k])) for k in names)
            return self._open(cmd, seq, total, names=names)
        if cmd == Command.LOAD:
            if not 1 <= u32 <= c.t_max:
                raise _Reject(ErrorCode.OUT_OF_RANGE)
            reply = self._open(cmd, seq, u32 * c.k, t=u32)
            # An accepted LOAD invalidates the loaded sequence (and any FORWARD).
            self.core.inputs = np.zeros((0, c.k), dtype=np.int64)
            self.core._forwarded = None  # noqa: SLF001
            return reply
        if cmd == Command.ECHO:
            if self.forwarded is None:
                raise _Reject(ErrorCode.WRONG_STATE)
            if u32 not in (1, self.loaded):
                raise _Reject(ErrorCode.OUT_OF_RANGE)
            return self._open(cmd, seq, u32 * c.o, rows=u32)
        return self._training(cmd, seq, payload)

    def _training(self, cmd: Command, seq: int, payload: bytes) -> bytes:
        """The on-chip training commands. A resident pass (TRAIN, EVAL) runs to its
        end before the reply, so METRICS never finds one running; a device answers at
        once and BUSY until the pass ends. A streamed pass runs as STREAM delivers its
        records (each transfer's words are applied at its end) and is BUSY to all but
        :data:`~hel_fpga.spec.protocol.DURING_PASS` and STREAM until its last sample.
        A pass leaves nothing loaded."""
        c, tu = self.cfg, self.trainer
        u8 = payload[0] if payload else 0
        u32 = int.from_bytes(payload[:4], "little")
        n_params = sum(int(np.prod(s)) for s in c.param_shapes().values())
        if cmd == Command.TRAIN_SETUP:
            return self._open(cmd, seq, SETUP_WORDS)
        if cmd == Command.STORE:
            start = int.from_bytes(payload[4:8], "little")
            if u32 == 0 or start + u32 > c.store_words:
                raise _Reject(ErrorCode.OUT_OF_RANGE)
            return self._open(cmd, seq, u32, start=start)
        if cmd in (Command.WRITE_MASTER, Command.READ_MASTER):
            if u8 > 1:
                raise _Reject(ErrorCode.OUT_OF_RANGE)
            if cmd == Command.WRITE_MASTER:
                return self._open(cmd, seq, n_params, which=u8)
            return self._data_replies(cmd, seq, tu.read_master(u8))
        if cmd == Command.STREAM:
            if not tu.streaming:
                raise _Reject(ErrorCode.WRONG_STATE)
            if u32 == 0 or u32 > c.store_words:
                raise _Reject(ErrorCode.OUT_OF_RANGE)
            return self._open(cmd, seq, u32)
        if cmd == Command.METRICS:
            samples, loss, correct, skipped = tu.metrics
            return self._reply(cmd, seq, P.pack_fields(P.METRICS_LAYOUT, {
                "running": tu.running, "samples": samples, "loss_sum": loss,
                "correct": correct, "skipped": skipped}))
        if tu.setup is None:
            raise _Reject(ErrorCode.WRONG_STATE)
        if cmd == Command.EVAL and u8 > 1:
            raise _Reject(ErrorCode.OUT_OF_RANGE)
        if cmd == Command.TRAIN:
            tu.train(u32)
        else:
            tu.evaluate(bool(u8))
        self._pass_over()
        return self._reply(cmd, seq)

    def _pass_over(self) -> None:
        """What a pass leaves in the engines: nothing loaded, nothing to echo."""
        for core in self.cores:
            core.inputs = np.zeros((0, self.cfg.k), dtype=np.int64)
            core._forwarded = None  # noqa: SLF001

    def _mask(self, mask: int) -> list[str]:
        if not 1 <= mask <= P.PARAM_MASK_ALL:
            raise _Reject(ErrorCode.OUT_OF_RANGE)
        return [name for i, name in enumerate(PARAM_NAMES) if mask >> i & 1]

    def status_fields(self) -> dict[str, int]:
        flags = StatusFlag(0)
        if any(core.state_overflow for core in self.cores):
            flags |= StatusFlag.STATE_OVERFLOW
        if any(core.acc_overflow for core in self.cores):
            flags |= StatusFlag.ACC_OVERFLOW
        if self.loaded:
            flags |= StatusFlag.LOADED
        if self.forwarded is not None:
            flags |= StatusFlag.FORWARDED
            if self.forwarded == "one-sided":
                flags |= StatusFlag.ONE_SIDED
        if self.xfer is not None:
            flags |= StatusFlag.XFER_OPEN
        return {"flags": int(flags), "xfer_cmd": self.xfer_cmd, "xfer_done": self.xfer_done,
                "t_loaded": self.loaded}

    # ---- transfers ---------------------------------------------------------------------------
    def _open(self, cmd: Command, seq: int, total: int, **info) -> bytes:
        width = P.word_width(self.cfg, cmd)
        try:
            chunks = P.block_chunks(total, width)
        except ValueError:
            raise _Reject(ErrorCode.OUT_OF_RANGE) from None
        self.xfer = {"cmd": cmd, "total": total, "width": width, "chunks": chunks,
                     "next": 0, "data": [], **info}
        self.xfer_cmd, self.xfer_done = int(cmd), 0
        return self._reply(cmd, seq)

    def _data(self, seq: int, payload: bytes) -> bytes:
        x = self.xfer
        if x is None:
            raise _Reject(ErrorCode.WRONG_STATE)
        index = int.from_bytes(payload[:2], "little")
        data = payload[2:]
        if index < x["next"]:          # retransmitted chunk: ack, do not apply
            return self._reply(Command.DATA, seq, x["next"].to_bytes(2, "little"))
        if index > x["next"]:
            raise _Reject(ErrorCode.SEQUENCE, x["next"])
        if len(data) != P.chunk_bytes(x["total"], x["width"], index):
            raise _Reject(ErrorCode.OUT_OF_RANGE)
        x["data"].append(data)
        x["next"] += 1
        self.xfer_done = x["next"]
        if x["next"] == x["chunks"]:
            self.xfer = None
            self._complete(x)
        return self._reply(Command.DATA, seq, x["next"].to_bytes(2, "little"))

    def _complete(self, x: dict) -> None:
        c = self.cfg
        words = join_chunks(x["data"], x["total"], x["width"])
        if x["cmd"] == Command.WRITE_PARAMS:
            shapes, arrays, pos = c.param_shapes(), {}, 0
            for name in x["names"]:
                size = int(np.prod(shapes[name]))
                arrays[name] = words[pos:pos + size].reshape(shapes[name])
                pos += size
            for core in self.cores:
                core.write_params(**arrays)
        elif x["cmd"] == Command.LOAD:
            self.core.load(words.reshape(x["t"], c.k))
        elif x["cmd"] == Command.ECHO:
            self.core.echo(words.reshape(x["rows"], c.o))
        elif x["cmd"] == Command.TRAIN_SETUP:
            self.trainer.write_setup(words)
        elif x["cmd"] == Command.STORE:
            self.trainer.write_store(x["start"], words)
        elif x["cmd"] == Command.STREAM:
            self.trainer.write_stream(words)
            self._pass_over()           # the pass's samples leave nothing loaded, as at its end
        elif x["cmd"] == Command.WRITE_MASTER:
            self.trainer.write_master(x["which"], words)


class ModelPort:
    """A pyserial-like port whose other end is a :class:`ProtocolModel` (in-process).

    ``write`` runs the model synchronously; ``read`` returns what it answered.
    ``tx_filter``/``rx_filter`` (callables ``bytes → bytes``) may corrupt the
    traffic in each direction for fault tests.
    """

    def __init__(self, model: ProtocolModel, *, timeout: float = 0.01):
        self.model = model
        self.timeout = timeout
        self._rx = bytearray()
        self.tx_filter = None
        self.rx_filter = None
        self.is_open = True
        self.bytes_written = 0

    def write(self, data: bytes) -> int:
        data = bytes(data)
        self.bytes_written += len(data)
        if self.tx_filter is not None:
            data = self.tx_filter(data)
        out = self.model.feed(data)
        if self.rx_filter is not None:
            out = self.rx_filter(out)
        self._rx += out
        return len(data)

    def flush(self) -> None:
        pass

    @property
    def in_waiting(self) -> int:
        return len(self._rx)

    def read(self, size: int = 1) -> bytes:
        if not self._rx and self.timeout:
            time.sleep(min(self.timeout, 0.01))
        out = bytes(self._rx[:size])
        del self._rx[:size]
        return out

    def reset_input_buffer(self) -> None:
        self._rx.clear()

    def close(self) -> None:
        self.is_open = False


class PtyServer:
    """Serve a :class:`ProtocolModel` on a pseudo-terminal; ``path`` is the serial device.

    A background thread moves bytes between the pty master and the model. Use as
    a context manager or call :meth:`close`.
    """

    def __init__(self, model: ProtocolModel):
        self.model = model
        self.master, slave = os.openpty()
        tty.setraw(slave)
        self.path = os.ttyname(slave)
        self._slave = slave
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hel-pty-model", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            r, _, _ = select.select([self.master], [], [], 0.05)
            if not r:
                continue
            try:
                data = os.read(self.master, 4096)
            except OSError:
                return
            out = self.model.feed(data)
            while out:
                out = out[os.write(self.master, out):]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)
        for fd in (self.master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
