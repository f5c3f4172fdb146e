"""Block-RAM access: read ports without Yosys' read-during-write emulation, for the
core's and the link's memories (:func:`ram_read_port`); large memories as banks
(:class:`BankedMemory`) and prefetching read streams (:class:`Prefetch`) for the
training loop's memories; two-word register slices on streams (:func:`stream_slice`)."""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Shape, Signal, Value
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.memory import Memory
from amaranth.utils import ceil_log2

__all__ = ["NO_RW_CHECK", "ram_read_port", "BankedMemory", "Prefetch", "stream_slice"]

#: Memory attribute for Yosys: a read and a write of the same address in one cycle
#: need no defined result (see :func:`ram_read_port`).
NO_RW_CHECK = {"no_rw_check": 1}


class _ReadPort:
    def __init__(self, addr, en, data):
        self.addr, self.en, self.data = addr, en, data


def ram_read_port(m: Module, mem: Memory, name: str) -> _ReadPort:
    """A synchronous block-RAM read port without read-during-write emulation.

    Behaves like ``mem.read_port()`` (``addr``, ``en``, ``data`` one cycle later,
    the old word when the address is written in the same cycle), but is built
    as an asynchronous read port plus a register without reset, which Yosys'
    ``memory_dff`` folds into the RAM's read port. Only there does Yosys honour
    the memory's ``no_rw_check`` attribute (:data:`NO_RW_CHECK`): for a
    synchronous Amaranth port it keeps the read-old-data guarantee on RAMs
    without it (iCE40) by delaying every write a cycle and bypassing it to the
    reader — a register, a multiplexer and an address comparator per data bit
    and port. Use it only where the data of a read of a word written in the
    same cycle is never used (each caller says why, where the memory is made):
    on hardware the result of such a read may be anything.
    """
    port = mem.read_port(domain="comb")
    en = Signal(init=1, name=f"{name}_en")
    data = Signal(mem.shape, reset_less=True, name=f"{name}_data")
    with m.If(en):
        m.d.sync += data.eq(port.data)
    return _ReadPort(port.addr, en, data)


class BankedMemory:
    """One memory of ``depth`` words built as banks of at most ``bank_depth`` words.

    A 65 536-word store is 64 ECP5 block RAMs: as one memory, its read multiplexer
    and the routes from RAMs spread over the die to it make one path longer than a
    60 MHz period. As banks, each bank's RAMs and its small multiplexer end in a
    register placed beside them; the banks' multiplexer gets a cycle of its own
    (the bank number travels with the read). Writes go to the bank the address
    names.
    """

    def __init__(self, m: Module, name: str, shape, depth: int, bank_depth: int, attrs):
        self.shape, self.depth = shape, depth
        self.bank_bits = ceil_log2(bank_depth)
        n = -(-depth // (1 << self.bank_bits))
        self.mems = []
        for i in range(n):
            d = min(1 << self.bank_bits, depth - (i << self.bank_bits))
            mem = m.submodules[f"{name}_bank{i}"] = Memory(shape=shape, depth=d, init=[], attrs=attrs)
            self.mems.append(mem)
        self.ports = [mem.write_port() for mem in self.mems]

    def write(self, m: Module, addr, data, en) -> None:
        """Write ``data`` at ``addr`` when ``en``, one cycle later: the address, the
        word and each bank's enable are registered, so the write reaches RAMs spread
        over the die from registers (no read of the store follows a write that soon)."""
        lo, hi = addr[:self.bank_bits], addr[self.bank_bits:]
        lo_r = Signal(len(lo), reset_less=True, name="store_waddr")
        data_r = Signal(self.shape, reset_less=True, name="store_wdata")
        m.d.sync += [lo_r.eq(lo), data_r.eq(data)]
        for i, port in enumerate(self.ports):
            en_r = Signal(name=f"store_bank{i}_we")
            m.d.sync += en_r.eq(en & (hi == i))
            m.d.comb += [port.addr.eq(lo_r), port.data.eq(data_r), port.en.eq(en_r)]

    def read(self, m: Module, name: str, addr):
        """The word at ``addr`` two cycles later (RAM register, bank register), as a
        value for the caller's register after the banks' multiplexer."""
        lo, hi = addr[:self.bank_bits], addr[self.bank_bits:]
        bank = Signal(range(max(len(self.mems), 2)), name=f"{name}_bank", reset_less=True)
        bank_b = Signal.like(bank, name=f"{name}_bank_b", reset_less=True)
        m.d.sync += [bank.eq(hi), bank_b.eq(bank)]
        words = []
        for i, mem in enumerate(self.mems):
            port = ram_read_port(m, mem, f"{name}_bank{i}")
            m.d.comb += port.addr.eq(lo)
            word = Signal(self.shape, name=f"{name}_bank{i}_word", reset_less=True)
            m.d.sync += word.eq(port.data)
            words.append(word)
        out = Signal(self.shape, name=f"{name}_banked")
        with m.Switch(bank_b):
            for i, word in enumerate(words):
                with m.Case(i):
                    m.d.comb += out.eq(word)
        return out


class Prefetch:
    """A read stream from block RAM(s) sharing one address (module docstring).

    ``mems`` holds one entry per data word: a :class:`Memory`, or a :class:`BankedMemory`
    (one memory cut into banks, each bank's word registered beside its RAMs before
    the banks' multiplexer). The user drives ``issue`` (only while ``can_issue``),
    ``addr`` and ``tag`` in the same cycle; the words leave in order on
    ``valid``/``ready`` with ``data`` (one per entry) and ``tag``. ``can_issue`` is
    a function of registers only.
    """

    def __init__(self, m: Module, name: str, mems, tag_width: int = 1):
        depth_max = max(mem.depth for mem in mems)
        banked = any(isinstance(mem, BankedMemory) for mem in mems)
        self.issue = Signal(name=f"{name}_issue")
        self.addr = Signal(range(max(depth_max, 2)), name=f"{name}_addr")
        self.tag = Signal(tag_width, name=f"{name}_tag")
        self.can_issue = Signal(name=f"{name}_can_issue")
        self.ready = Signal(name=f"{name}_ready")
        self.valid = Signal(name=f"{name}_valid")
        widths = [Shape.cast(mem.shape).width for mem in mems]

        # stages: a (address), m (RAM read register), b (bank words; banked only),
        # d (after the output multiplexer), then the FIFO
        stages = "amd" if not banked else "ambd"
        a_addr = Signal.like(self.addr, name=f"{name}_a_addr", reset_less=True)
        valid = {st: Signal(name=f"{name}_{st}_valid") for st in stages}
        tag = {st: Signal(tag_width, name=f"{name}_{st}_tag", reset_less=True) for st in stages}
        d_data = [Signal(mem.shape, name=f"{name}_d_data{i}", reset_less=True)
                  for i, mem in enumerate(mems)]
        with m.If(self.issue):
            m.d.sync += [a_addr.eq(self.addr), tag["a"].eq(self.tag)]
        m.d.sync += valid["a"].eq(self.issue)
        for prev, st in zip(stages, stages[1:]):
            m.d.sync += [valid[st].eq(valid[prev]), tag[st].eq(tag[prev])]
        d_valid, d_tag = valid["d"], tag["d"]
        for i, (mem, d) in enumerate(zip(mems, d_data)):
            if isinstance(mem, BankedMemory):
                m.d.sync += d.eq(mem.read(m, f"{name}_rd{i}", a_addr))
                continue
            port = ram_read_port(m, mem, f"{name}_rd{i}")
            m.d.comb += port.addr.eq(a_addr)
            if banked:      # keep the entries' words aligned with the banked one
                late = Signal(mem.shape, name=f"{name}_b_data{i}", reset_less=True)
                m.d.sync += [late.eq(port.data), d.eq(late)]
            else:
                m.d.sync += d.eq(port.data)       # after the RAMs' output multiplexer
        # credits cover the words in flight from issue to the FIFO's output
        self.DEPTH = len(stages) + 2

        fifo = m.submodules[f"{name}_fifo"] = SyncFIFO(width=sum(widths) + tag_width,
                                                       depth=self.DEPTH)
        m.d.comb += [fifo.w_en.eq(d_valid), fifo.w_data.eq(Cat(*d_data, d_tag)),
                     self.valid.eq(fifo.r_rdy), fifo.r_en.eq(self.ready)]
        self.data, pos = [], 0
        for w, mem in zip(widths, mems):
            sig = Signal(mem.shape, name=f"{name}_data{len(self.data)}")
            m.d.comb += sig.eq(fifo.r_data[pos:pos + w])
            self.data.append(sig)
            pos += w
        self.tag_out = Signal(tag_width, name=f"{name}_tag_out")
        m.d.comb += self.tag_out.eq(fifo.r_data[pos:])

        used = Signal(range(self.DEPTH + 1), name=f"{name}_used")  # issued, not yet read
        m.d.sync += used.eq(used + self.issue - (fifo.r_rdy & fifo.r_en))
        m.d.comb += self.can_issue.eq(used < self.DEPTH)


def stream_slice(m: Module, name: str, sink, width: int, accept=1) -> SyncFIFO:
    """A two-word FIFO taking the stream ``sink`` (an ``In`` stream member) while
    ``accept`` is high; its read side is the caller's.

    ``sink.ready`` is the FIFO's level test (and ``accept``, which should be a
    register or a decode of one): the producer's handshake never waits on the
    consumer's logic, which may then sit anywhere on the die. Two words keep the
    full rate."""
    fifo = m.submodules[f"{name}_slice"] = SyncFIFO(width=width, depth=2)
    m.d.comb += [fifo.w_en.eq(sink.valid & accept), fifo.w_data.eq(Value.cast(sink.payload)),
                 sink.ready.eq(fifo.w_rdy & accept)]
    return fifo
