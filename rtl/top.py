"""The top level: UART pins → frame decoder → command unit ↔ HEL core → frame encoder → UART.

:class:`Top` is what every board (and the Verilator-simulated board) builds: two
pins, ``rx`` and ``tx``, everything in the default ``sync`` domain, no
``platform.request`` (board wrappers in ``boards/`` connect pins and clocks)::

    rx ─► UART ─► FrameDecoder ─► CommandUnit ◄─► ResetInserter(HELCore)
    tx ◄─ UART ◄─ FrameEncoder ◄─ 2-byte queue ◄─┘

On a configuration with on-chip training (``store_words > 0``) the command unit's
core is a :class:`hel_fpga.rtl.training.TrainingCore`: the HEL core with the
training controller and its memories around it, behind the same interface.

:class:`Device` is the same without the UART (byte streams in and out), for
tests and for anything that brings its own byte transport.
"""


from amaranth.hdl import Cat, Module, ResetInserter
from amaranth.lib import fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from hel_fpga.rtl.command import CommandUnit
from hel_fpga.rtl.core import HELCore
from hel_fpga.spec.formats import HelConfig
from hel_fpga.spec.protocol import RX_RING_BYTES
from hel_fpga.rtl.framing import FrameDecoder, FrameEncoder
from hel_fpga.rtl.uart import UART, divisor_for

__all__ = ["Device", "Top"]


class Device(wiring.Component):
    """Frame codec, command unit and core between two byte streams.

    Parameters
    ----------
    cfg, clk_hz, baud, name :
        As for :class:`Top` (``clk_hz``/``baud`` are only reported by IDENT here).
    rx_depth : int
        The decoder's receive ring in bytes (:data:`hel_fpga.spec.protocol.RX_RING_BYTES`:
        one maximal frame plus one unread chunk, the capacity the protocol states).

    Attributes
    ----------
    sink : In(stream.Signature(8, always_ready=True))
        Bytes from the line (never back-pressured, like a UART receiver).
    source : Out(stream.Signature(8))
        Bytes for the line.
    training : Out(1)
        A TRAIN or EVAL pass runs (always 0 without on-chip training): for an LED,
        and for tests that wait for a pass.
    """

    def __init__(self, cfg: HelConfig, clk_hz: int, baud: int, name: str = "hel-fpga", *,
                 rx_depth: int = RX_RING_BYTES):
        self.cfg = cfg
        self.clk_hz, self.baud, self.name = clk_hz, baud, name
        self.rx_depth = rx_depth
        super().__init__({
            "sink": In(stream.Signature(8, always_ready=True)),
            "source": Out(stream.Signature(8)),
            "training": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.decoder = decoder = FrameDecoder(depth=self.rx_depth)
        m.submodules.encoder = encoder = FrameEncoder()
        if self.cfg.store_words:
            from hel_fpga.rtl.training import TrainingCore
            core = TrainingCore(self.cfg)
        else:
            core = HELCore(self.cfg)
        m.submodules.command = cu = CommandUnit(self.cfg, clk_hz=self.clk_hz, baud=self.baud,
                                                name=self.name, core_signature=core.signature)
        if self.cfg.store_words:        # resets itself from ``reset`` (its docstring)
            m.submodules.core = core
        else:
            m.submodules.core = ResetInserter({"sync": cu.core_rst})(core)
        wiring.connect(m, wiring.flipped(self.sink), decoder.sink)
        wiring.connect(m, decoder.source, cu.rx)
        wiring.connect(m, decoder.error, cu.rx_error)
        wiring.connect(m, cu.core, core)
        if self.cfg.store_words:
            m.d.comb += self.training.eq(core.training)
        # Two reply bytes between the command unit and the encoder: registered valid and
        # ready on both sides cut the combinational path from the command unit's reply
        # multiplexers into the encoder's block logic, which does not fit the iCEBreaker's
        # clock period in one cycle. ``length`` is not stored: the encoder ignores it.
        m.submodules.replies = replies = fifo.SyncFIFO(width=10, depth=2)
        tx, enc = cu.tx, encoder.sink
        m.d.comb += [
            replies.w_data.eq(Cat(tx.payload.data, tx.payload.first, tx.payload.last)),
            replies.w_en.eq(tx.valid),
            tx.ready.eq(replies.w_rdy),
            Cat(enc.payload.data, enc.payload.first, enc.payload.last).eq(replies.r_data),
            enc.valid.eq(replies.r_rdy),
            replies.r_en.eq(enc.ready),
        ]
        wiring.connect(m, encoder.source, wiring.flipped(self.source))
        return m


class Top(wiring.Component):
    """The whole device behind two UART pins.

    Parameters
    ----------
    cfg : HelConfig
        The core's configuration.
    clk_hz : int
        Frequency of the ``sync`` clock.
    baud : int
        UART bit rate; the divisor is :func:`hel_fpga.rtl.uart.divisor_for` ``(clk_hz, baud)``
        (at least 4 clocks per bit, within 1.5 %). IDENT reports ``clk_hz`` and ``baud``.
    name : str
        Board name reported by IDENT.

    Attributes
    ----------
    rx : In(1)
        UART receive line (idle high).
    tx : Out(1)
        UART transmit line (idle high).
    """

    rx: In(1, init=1)
    tx: Out(1, init=1)

    def __init__(self, cfg: HelConfig, clk_hz: int, baud: int, name: str = "hel-fpga"):
        self.cfg = cfg
        self.clk_hz, self.baud, self.name = clk_hz, baud, name
        self.divisor = divisor_for(clk_hz, baud)
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        m.submodules.uart = uart = UART(self.divisor)
        m.submodules.device = device = Device(self.cfg, self.clk_hz, self.baud, self.name)
        wiring.connect(m, uart.source, device.sink)
        wiring.connect(m, device.source, uart.sink)
        m.d.comb += [uart.rx.eq(self.rx), self.tx.eq(uart.tx)]
        return m
