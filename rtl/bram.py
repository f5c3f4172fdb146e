"""Block-RAM read ports without Yosys' read-during-write emulation, for the core's
and the link's memories (see :func:`ram_read_port`)."""

from __future__ import annotations

from amaranth.hdl import Module, Signal
from amaranth.lib.memory import Memory

__all__ = ["NO_RW_CHECK", "ram_read_port"]

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
