"""A small 8N1 UART with byte-stream ports.

amaranth-stdio (which has one) is not installable from PyPI, and the link only
needs the plainest UART: 8 data bits, no parity, one stop bit, LSB first, line
idle high, a bit rate fixed at elaboration time as ``divisor`` clock cycles per
bit. Everything here is synchronous to the ``sync`` domain.

* :class:`UARTTx` — byte stream in, serial line out.
* :class:`UARTRx` — serial line in, byte stream out, framing/overrun events.
* :class:`UART` — both, sharing one divisor.
* :func:`divisor_for` — pick the divisor for a clock and a baud rate.
"""

from amaranth import *
from amaranth.lib import data, stream, wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.wiring import In, Out

__all__ = ["RxError", "UART", "UARTRx", "UARTTx", "divisor_for"]

#: Smallest supported clocks-per-bit.
MIN_DIVISOR = 4


def _check_divisor(divisor):
    if not isinstance(divisor, int) or divisor < MIN_DIVISOR:
        raise ValueError(f"divisor must be an integer >= {MIN_DIVISOR}, not {divisor!r}")


def divisor_for(clk_freq: float, baudrate: float, *, tolerance: float = 0.015) -> int:
    """Clocks per bit for ``baudrate`` at ``clk_freq``.

    8N1 receivers tolerate roughly ±4 % total mismatch over a 10-bit character; this
    refuses a divisor whose own rounding error exceeds ``tolerance`` (1.5 % by default,
    leaving the rest to the other end's clock).

    Raises
    ------
    ValueError
        If the nearest divisor is below the minimum or misses the rate by more than
        ``tolerance``.
    """
    divisor = round(clk_freq / baudrate)
    _check_divisor(divisor)
    error = abs(clk_freq / divisor - baudrate) / baudrate
    if error > tolerance:
        raise ValueError(f"{clk_freq:g} Hz / {divisor} = {clk_freq / divisor:.0f} baud misses "
                         f"{baudrate:g} baud by {error:.1%} (> {tolerance:.1%})")
    return divisor


class _FixedRate(wiring.Component):
    """A component whose bit rate is fixed at elaboration: ``divisor`` clock cycles per bit."""

    def __init__(self, divisor):
        _check_divisor(divisor)
        self._divisor = divisor
        super().__init__()

    @property
    def divisor(self):
        """Clock cycles per bit."""
        return self._divisor


class UARTTx(_FixedRate):
    """UART transmitter, 8N1.

    A byte is accepted from ``sink`` whenever the transmitter is idle *or* in the last
    clock cycle of a stop bit, so a stream that stays valid is sent back to back with
    stop bits of exactly ``divisor`` cycles: the line runs at its full byte rate,
    ``clk / (10 · divisor)``.

    Parameters
    ----------
    divisor : int
        Clock cycles per bit (>= 4).

    Attributes
    ----------
    sink : In(stream.Signature(8))
        Bytes to send.
    tx : Out(1)
        Serial line (idle high; reset value 1, so the line is idle from power-on).
    """

    sink: In(stream.Signature(8))
    tx: Out(1, init=1)

    def elaborate(self, platform):
        m = Module()

        timer = Signal(range(self._divisor))   # cycles left in the current bit, minus one
        bits = Signal(range(10))               # bits still to send after the current one
        shreg = Signal(9)                      # those bits: data LSB first, then stop

        m.d.comb += self.sink.ready.eq((bits == 0) & (timer == 0))
        with m.If(self.sink.valid & self.sink.ready):
            m.d.sync += [
                self.tx.eq(0),                  # start bit
                shreg.eq(Cat(self.sink.payload, C(1, 1))),
                bits.eq(9),
                timer.eq(self._divisor - 1),
            ]
        with m.Elif(timer != 0):
            m.d.sync += timer.eq(timer - 1)
        with m.Elif(bits != 0):
            m.d.sync += [
                self.tx.eq(shreg[0]),
                shreg.eq(shreg >> 1),
                bits.eq(bits - 1),
                timer.eq(self._divisor - 1),
            ]

        return m


#: Receive error events, each a one-cycle pulse.
RxError = data.StructLayout({
    #: The stop bit was 0: the byte was dropped (and the receiver waits for the line
    #: to return high before it looks for the next start bit).
    "framing": 1,
    #: A byte was received while the previous one was still unconsumed: the new
    #: byte was dropped.
    "overrun": 1,
})


class UARTRx(_FixedRate):
    """UART receiver, 8N1, sampling each bit in its middle.

    The line passes a two-flip-flop synchroniser (it is asynchronous to the clock).
    In idle, the first low sample starts a character; the start bit is confirmed
    ``divisor // 2`` cycles later, mid-bit (a shorter low pulse is a glitch and is
    ignored), and the eight data bits and the stop bit are sampled at ``divisor``
    cycle intervals from there. After a good stop bit the receiver is idle again at
    the stop bit's middle, so a following start bit is never missed even if the
    sender's clock is slightly fast.

    A stop bit that reads 0 is a framing error: the byte is dropped, ``error.framing``
    pulses, and the receiver waits until the line is high before hunting for the next
    start bit, so a break (line held low) costs one error, not a stream of 0x00 bytes.
    A receiver that joins a busy line mid-character may take a data bit for a start
    bit and deliver wrong bytes until the line first idles for a character time; from
    then on it is in step. The frame layer's CRC discards such bytes.

    ``source`` holds one received byte until it is consumed; a byte completed while
    the previous one is still waiting is dropped and ``error.overrun`` pulses. A
    consumer that is always ready (like :class:`hel_fpga.rtl.framing.FrameDecoder`) never
    causes overruns.

    Parameters
    ----------
    divisor : int
        Clock cycles per bit (>= 4, so the mid-bit sample is at least two cycles
        from either edge of the bit).

    Attributes
    ----------
    rx : In(1)
        Serial line (idle high).
    source : Out(stream.Signature(8))
        Received bytes.
    error : Out(RxError)
        One-cycle pulses for a framing error and an overrun.
    """

    rx: In(1, init=1)
    source: Out(stream.Signature(8))
    error: Out(RxError)

    def elaborate(self, platform):
        m = Module()

        rx = Signal(init=1)
        m.submodules.rx_sync = FFSynchronizer(self.rx, rx, init=1)

        timer = Signal(range(self._divisor))   # cycles to the next sample
        bits = Signal(range(8))
        shreg = Signal(8)

        m.d.sync += self.error.eq(0)
        with m.If(self.source.ready):
            m.d.sync += self.source.valid.eq(0)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(~rx):
                    m.d.sync += timer.eq(self._divisor // 2 - 1)
                    m.next = "START"
            with m.State("START"):
                with m.If(timer != 0):
                    m.d.sync += timer.eq(timer - 1)
                with m.Elif(rx):
                    m.next = "IDLE"             # glitch, not a start bit
                with m.Else():
                    m.d.sync += [timer.eq(self._divisor - 1), bits.eq(0)]
                    m.next = "DATA"
            with m.State("DATA"):
                with m.If(timer != 0):
                    m.d.sync += timer.eq(timer - 1)
                with m.Else():
                    m.d.sync += [
                        shreg.eq(Cat(shreg[1:], rx)),
                        bits.eq(bits + 1),
                        timer.eq(self._divisor - 1),
                    ]
                    with m.If(bits == 7):
                        m.next = "STOP"
            with m.State("STOP"):
                with m.If(timer != 0):
                    m.d.sync += timer.eq(timer - 1)
                with m.Elif(~rx):
                    m.d.sync += self.error.framing.eq(1)
                    m.next = "BREAK"
                with m.Else():
                    with m.If(self.source.valid & ~self.source.ready):
                        m.d.sync += self.error.overrun.eq(1)
                    with m.Else():
                        m.d.sync += [self.source.payload.eq(shreg), self.source.valid.eq(1)]
                    m.next = "IDLE"
            with m.State("BREAK"):
                with m.If(rx):
                    m.next = "IDLE"

        return m


class UART(_FixedRate):
    """8N1 UART: a :class:`UARTTx` and a :class:`UARTRx` with one ``divisor``.

    Parameters
    ----------
    divisor : int
        Clock cycles per bit (>= 4); see :func:`divisor_for`.

    Attributes
    ----------
    sink : In(stream.Signature(8))
        Bytes to transmit.
    source : Out(stream.Signature(8))
        Bytes received.
    tx : Out(1)
        Transmit line (idle high).
    rx : In(1)
        Receive line (idle high).
    rx_error : Out(RxError)
        Receiver error pulses (see :class:`UARTRx`).
    """

    sink: In(stream.Signature(8))
    source: Out(stream.Signature(8))
    tx: Out(1, init=1)
    rx: In(1, init=1)
    rx_error: Out(RxError)

    def elaborate(self, platform):
        m = Module()
        m.submodules.tx = tx = UARTTx(self._divisor)
        m.submodules.rx = rx = UARTRx(self._divisor)
        wiring.connect(m, wiring.flipped(self.sink), tx.sink)
        wiring.connect(m, rx.source, wiring.flipped(self.source))
        m.d.comb += [
            self.tx.eq(tx.tx),
            rx.rx.eq(self.rx),
            self.rx_error.eq(rx.error),
        ]
        return m
