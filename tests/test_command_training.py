"""The on-chip training commands of the gateware against the reference device, byte
for byte (as ``test_command.py`` for the core's commands).

:class:`hel_fpga.rtl.top.Device` with a training store (``store_words > 0``: its
command unit drives a :class:`hel_fpga.rtl.training.TrainingCore`) and
:class:`hel_fpga.sim.protocol_model.ProtocolModel` get the same request bytes; the
gateware's replies must equal the model's. The model runs a pass before it
answers, the gateware after: sessions wait for the pass's end (``WAIT_PASS``)
before the next request. What only the gateware can show (BUSY while a pass runs)
is checked against replies built from the protocol's definitions. A streamed pass
runs in both as STREAM delivers its records, and ends (in both) with the final ack
of the transfer that completes it, so no wait is needed there.
"""

import numpy as np
import pytest

from hel_fpga.rtl.top import Device
from hel_fpga.sim.onchip import SampleStore
from hel_fpga.spec import protocol as P
from hel_fpga.spec.framing import encode_frame
from hel_fpga.spec.formats import HelConfig
from hel_fpga.spec.protocol import Command, ErrorCode
from hel_fpga.spec.training import (LOSS_KINDS, OPTIMIZERS, SETUP_FIELDS, TrainConfig,
                                    TrainFormats, pack_setup, record_words)

from test_command import BAUD, CLK_HZ, NAME, WAIT_PASS, Session, check, run

#: 16-bit operands, two lanes, O = 2 (both losses), a store of 512 words.
SMALL = HelConfig(n=4, m=3, k=2, o=2, t_max=8, lanes=2, acc_width=48, store_words=512)
#: 18-bit operands, a 40-bit state, one lane, O = 3.
WIDE = HelConfig(n=5, m=4, k=1, o=3, t_max=8, lanes=1, state_width=40, state_frac=30,
                 operand_width=18, operand_frac=15, act_frac=16, param_frac=14, z_frac=14,
                 acc_width=60, store_words=300)


class TrainingSession(Session):
    """A :class:`Session` with the training commands."""

    def n_params(self):
        return sum(int(np.prod(s)) for s in self.cfg.param_shapes().values())

    def write_master(self, which, words):
        self.transfer(Command.WRITE_MASTER, bytes([which]), words, self.cfg.acc_width)

    def store(self, start, words):
        payload = len(words).to_bytes(4, "little") + start.to_bytes(4, "little")
        self.transfer(Command.STORE, payload, words, self.cfg.operand_width)

    def setup(self, words):
        ow = self.cfg.operand_width
        words = [w - (1 << ow) if w >> (ow - 1) & 1 else w for w in words]
        self.transfer(Command.TRAIN_SETUP, b"", words, ow)

    def run_pass(self, cmd, payload):
        self.req(cmd, payload)
        self.raw(WAIT_PASS, b"")
        self.req(Command.METRICS)

    def observe(self):
        self.req(Command.STATUS)
        self.req(Command.METRICS)
        self.req(Command.READ_MASTER, b"\0")
        self.req(Command.READ_MASTER, b"\1")
        self.req(Command.READ_PARAMS, bytes([P.PARAM_MASK_ALL]))


def random_sets(cfg, kind, rng, s_train, s_test, t, k=None, o=None):
    """The store image of random sets of ``k`` inputs and ``o`` outputs (default: the
    core's)."""
    k = cfg.k if k is None else k
    o = cfg.o if o is None else o
    u = rng.integers(-6000, 6000, (s_train + s_test, t, k))
    if kind == "mse":
        y = rng.integers(-6000, 6000, (s_train + s_test, t, o))
        mask = rng.integers(0, 2, (s_train + s_test, t))
        st = SampleStore.regression(cfg, u, y, mask)
        return st.image(cfg)
    labels = rng.integers(0, o, s_train + s_test)
    return SampleStore.classification(cfg, u, labels, classes=o).image(cfg)


@pytest.mark.parametrize("cfg, kind, optimizer, k, o", [
    (SMALL, "mse", "lion", None, None), (WIDE, "onehot", "sgdm", None, None),
    (SMALL, "onehot", "lion", None, None), (SMALL, "mse", "sgdm", 1, 1),
    (WIDE, "onehot", "lion", 1, 2), (SMALL.replace(engines=3), "mse", "lion", None, None),
    (WIDE.replace(engines=2), "onehot", "sgdm", 1, 2)],
    ids=["small-mse-lion", "wide-onehot-sgdm", "small-onehot-lion", "small-mse-k1-o1",
         "wide-onehot-o2", "small-mse-3-engines", "wide-onehot-2-engines"])
def test_training_epochs_and_evals_equal_the_model(cfg, kind, optimizer, k, o):
    """Both losses and optimisers, on data as wide as the core and narrower, on one
    sample engine and on several."""
    s = TrainingSession(cfg, seed=len(kind) + len(optimizer) + (o or 0))
    rng, fm = s.rng, TrainFormats(cfg)
    t, s_train, s_test = 5, 7, 3
    n = s.n_params()
    s.req(Command.METRICS)
    s.req(Command.TRAIN, bytes(4))                       # no setup yet: WRONG_STATE
    mr = fm.master.max_int >> 4
    s.write_master(0, rng.integers(-mr, mr, n))
    s.write_master(1, rng.integers(-(1 << 20), 1 << 20, n))
    s.store(0, random_sets(cfg, kind, rng, s_train, s_test, t, k, o))
    tc = TrainConfig(loss=kind, optimizer=optimizer, batch_log2=1, eps_log2=3 if kind == "mse" else 2,
                     lr_log2=6 if optimizer == "lion" else 1, epochs=2, seed=11)
    s.setup(pack_setup(cfg, tc, t, s_train, s_test, k=k, o=o))
    s.observe()
    for epoch in range(2):
        s.run_pass(Command.TRAIN, epoch.to_bytes(4, "little"))
        s.observe()
        s.run_pass(Command.EVAL, b"\1")
        s.run_pass(Command.EVAL, b"\0")
    s.req(Command.FORWARD, b"\0")                     # a pass leaves nothing loaded
    s.req(Command.RESET)
    s.req(Command.EVAL, b"\0")                        # RESET forgot the setup
    s.observe()
    check(s, ready_prob=0.7, max_cycles=2_000_000)


def test_training_command_errors_equal_the_model():
    cfg = SMALL
    s = TrainingSession(cfg, seed=3)
    n = s.n_params()
    for count, start in ((0, 0), (1, cfg.store_words), (cfg.store_words, 1), (3, 2 ** 32 - 1)):
        s.req(Command.STORE, count.to_bytes(4, "little") + start.to_bytes(4, "little"))
    s.req(Command.STORE, bytes(7))                       # wrong request length
    s.req(Command.WRITE_MASTER, b"\2")
    s.req(Command.READ_MASTER, b"\2")
    s.req(Command.EVAL, b"\0")                          # no setup: WRONG_STATE before the value
    good = pack_setup(cfg, TrainConfig(), 4, 3, 0)
    for field, value in (("steps", cfg.t_max + 1), ("train_count", 0), ("loss", 2),
                         ("optimizer", 2), ("eps_log2", 17), ("train_count", 200)):
        bad = list(good)
        bad[SETUP_FIELDS.index(field)] = value
        s.setup(bad)
        s.req(Command.TRAIN, bytes(4))                   # refused setup: WRONG_STATE
    s.setup(good)
    s.req(Command.EVAL, b"\2")                          # set > 1
    s.req(Command.EVAL, b"\1")                          # an empty test set
    s.raw(WAIT_PASS, b"")
    s.req(Command.METRICS)
    s.store(cfg.store_words - 5, s.rng.integers(-100, 100, 5))
    s.write_master(1, np.zeros(n, dtype=np.int64))
    check(s)


class _Replies:
    """A stand-in for the model that answers with replies built here."""

    def __init__(self, replies):
        self.replies = iter(replies)

    def feed(self, wire):
        return next(self.replies)


def test_only_status_ident_metrics_and_reset_are_taken_while_a_pass_runs():
    """A resident pass: BUSY for the rest, STREAM included (it needs a streamed pass)."""
    cfg = SMALL
    s = TrainingSession(cfg, seed=5)
    t, s_train = 8, 12
    s.store(0, random_sets(cfg, "mse", s.rng, s_train, 0, t))
    s.setup(pack_setup(cfg, TrainConfig(batch_log2=2, epochs=1), t, s_train, 0))
    prefix = len(s.items)
    seq = s.req(Command.TRAIN, bytes(4))
    busy = [(s.req(c, p), c) for c, p in ((Command.LOAD, (1).to_bytes(4, "little")),
                                          (Command.READ_MASTER, b"\0"), (Command.TRAIN_SETUP, b""),
                                          (Command.STREAM, (4).to_bytes(4, "little")))]
    stat = s.req(Command.STATUS)
    from hel_fpga.sim.protocol_model import ProtocolModel
    model = ProtocolModel(cfg, clock_hz=CLK_HZ, baud=BAUD, name=NAME)
    expect = [model.feed(wire) for _, wire in s.items[:prefix]]
    status = P.pack_fields(P.STATUS_LAYOUT, {"flags": 0, "xfer_cmd": Command.TRAIN_SETUP,
                                             "xfer_done": 1, "t_loaded": 0})
    expect += [encode_frame(Command.TRAIN | P.REPLY_BIT, seq, b"")]
    expect += [encode_frame(P.ERROR_REPLY, q, P.pack_fields(P.ERROR_LAYOUT, {
        "code": ErrorCode.BUSY, "cmd": c, "arg": 0})) for q, c in busy]
    expect += [encode_frame(Command.STATUS | P.REPLY_BIT, stat, status)]
    dut = Device(cfg, CLK_HZ, BAUD, NAME)
    problems = run(s, model=_Replies(expect), dut=dut, max_cycles=20_000)
    assert not problems, "\n".join(problems)


#: A store of 2048 words: STREAM transfers of up to 2048 words, several chunks each.
STREAMED = HelConfig(n=4, m=3, k=2, o=3, t_max=8, lanes=2, acc_width=48, store_words=2048)


def test_a_streamed_train_and_eval_equal_the_model():
    """A streamed setup (a ring of 3 records of k = 1 inputs, o = 2 outputs): STREAM
    outside a pass is WRONG_STATE; TRAIN starts the pass, other commands are BUSY and
    STREAM's count is checked; the epoch's 80 records (in a shuffled order) come in
    one STREAM of three chunks, which the ring holds back; after its last ack the pass
    is over and METRICS, the master weights, moments and parameters equal the model's.
    Then an EVAL of the test set streamed in two transfers split inside a record, the
    second with surplus words; a resident EVAL of the store reads the ring as the
    streams left it."""
    cfg = STREAMED
    s = TrainingSession(cfg, seed=21)
    rng, ow = s.rng, cfg.operand_width
    k, o, t, slots, s_train, s_test = 1, 2, 4, 3, 80, 5
    n = s.n_params()
    s.write_master(0, rng.integers(-(1 << 20), 1 << 20, n))
    s.write_master(1, rng.integers(-(1 << 18), 1 << 18, n))
    image = random_sets(cfg, "mse", rng, s_train, s_test, t, k, o)
    rec = record_words(cfg, "mse", t, k, o)
    recs = [image[i * rec:(i + 1) * rec] for i in range(s_train + s_test)]
    tc = TrainConfig(loss="mse", optimizer="lion", batch_log2=3, eps_log2=3, lr_log2=6,
                     epochs=2, seed=4)
    s.setup(pack_setup(cfg, tc, t, s_train, s_test, k=k, o=o, slots=slots))
    s.req(Command.STREAM, (5).to_bytes(4, "little"))            # no pass: WRONG_STATE
    s.req(Command.STREAM, (0).to_bytes(4, "little"))            # … before the count's check
    s.req(Command.TRAIN, (1).to_bytes(4, "little"))
    s.req(Command.LOAD, (1).to_bytes(4, "little"))              # BUSY
    s.req(Command.STORE, (1).to_bytes(4, "little") + bytes(4))  # BUSY
    s.req(Command.STREAM, (0).to_bytes(4, "little"))            # OUT_OF_RANGE
    s.req(Command.STREAM, (cfg.store_words + 1).to_bytes(4, "little"))
    s.req(Command.STREAM, bytes(3))                             # request length
    s.req(Command.STATUS)
    words = np.concatenate([recs[i] for i in rng.permutation(s_train)])
    assert len(words) > 2 * P.chunk_words(ow)
    s.transfer(Command.STREAM, len(words).to_bytes(4, "little"), words, ow)
    s.req(Command.METRICS)
    s.observe()
    s.req(Command.STREAM, (1).to_bytes(4, "little"))            # the pass is over
    s.req(Command.EVAL, b"\1")
    test = np.concatenate([recs[s_train + i] for i in (4, 0, 2, 2, 1)])
    s.transfer(Command.STREAM, (rec + 3).to_bytes(4, "little"), test[:rec + 3], ow)
    # (no STATUS or METRICS here: mid-pass they show how far the pass has got)
    rest = np.concatenate([test[rec + 3:], rng.integers(-50, 50, 7)])
    s.transfer(Command.STREAM, len(rest).to_bytes(4, "little"), rest, ow)
    s.req(Command.METRICS)
    s.setup(pack_setup(cfg, tc, t, slots, 0, k=k, o=o))         # the ring, resident
    s.run_pass(Command.EVAL, b"\0")
    s.observe()
    check(s, ready_prob=0.8, max_cycles=2_000_000)


def test_host_commands_on_three_engines_equal_the_model():
    """Host commands on a device of three sample engines: WRITE_PARAMS reaches every
    engine (the TRAIN after it trains from those parameters on all three), LOAD,
    FORWARD, ECHO and READ_ACC act on engine 0, CLEAR_ACC and CLEAR_FLAGS on every
    engine; a narrow state makes the flags rise (at the host's ECHO on engine 0, then
    on every engine in an EVAL with large parameters), and STATUS reports them."""
    cfg = SMALL.replace(engines=3, state_width=20, state_frac=16, dt_log2=1)
    s = TrainingSession(cfg, seed=21)
    rng = s.rng
    t, s_train = 5, 7
    s.store(0, random_sets(cfg, "mse", rng, s_train, 0, t))
    tc = TrainConfig(loss="mse", optimizer="lion", batch_log2=2, eps_log2=3, lr_log2=6,
                     epochs=2, seed=4)
    s.setup(pack_setup(cfg, tc, t, s_train, 0))
    n = s.n_params()
    s.write_master(0, rng.integers(-(1 << 20), 1 << 20, n))
    s.write_params(s.params(scale=1 << 13))          # after the master: the engines train from these
    s.load(s.inputs(t, scale=1 << 14))
    s.req(Command.FORWARD, b"\x00")
    s.echo(s.nudges(t, scale=1 << 18))
    s.reads()
    s.run_pass(Command.TRAIN, bytes(4))
    s.observe()
    s.write_params(s.params(scale=1 << 15))          # large: EVAL's forwards wrap the state
    s.run_pass(Command.EVAL, b"\0")
    s.reads()
    s.req(Command.CLEAR_FLAGS)
    s.req(Command.CLEAR_ACC)
    s.reads()
    check(s, ready_prob=0.7, max_cycles=2_000_000)
