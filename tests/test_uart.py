"""The 8N1 UART against a bit-level model of the serial line.

The model lives in this file: :func:`drive_char` puts a character on the line
bit by bit (start, eight data bits LSB first, stop), and :func:`decode_line`
turns a per-cycle recording of a line back into bytes while checking that every
bit lasts exactly its nominal number of cycles. The gateware is only ever
compared with these two functions and with the random bytes the test chose.
"""

import random

import pytest

from hel_fpga.boards.table import BOARDS
from hel_fpga.rtl.uart import UART, UARTRx, UARTTx, divisor_for

from amaranth_sim import simulate as run  # noqa: E402

DIVISOR = 8

#: Every board's clocks per bit (boards/table.py: clk_hz / baud).
BOARD_DIVISORS = sorted({divisor_for(b.clk_hz, b.baud) for b in BOARDS.values()})


# --- bit-level reference -----------------------------------------------------------------------

def char_bits(byte, stop=1):
    """Line levels of one 8N1 character: start, data LSB first, stop."""
    return [0] + [(byte >> k) & 1 for k in range(8)] + [stop]


async def drive_char(ctx, line, byte, cycles_per_bit, *, stop=1):
    """Drive one character onto ``line``, each bit for ``cycles_per_bit`` clock cycles."""
    for level in char_bits(byte, stop):
        ctx.set(line, level)
        await ctx.tick().repeat(cycles_per_bit)
    ctx.set(line, 1)


async def drive_chars_at_rate(ctx, line, payload, cycles_per_bit):
    """Drive ``payload`` back to back at a non-integer ``cycles_per_bit``: bit ``j`` of
    the stream ends at cycle round((j + 1) · cycles_per_bit), as a sender whose clock
    differs from the receiver's would place it."""
    levels = [level for byte in payload for level in char_bits(byte)]
    now = 0
    for j, level in enumerate(levels):
        ctx.set(line, level)
        end = round((j + 1) * cycles_per_bit)
        await ctx.tick().repeat(end - now)
        now = end
    ctx.set(line, 1)


def decode_line(levels, cycles_per_bit):
    """Decode a per-cycle recording of an 8N1 line.

    Returns ``[(start_cycle, byte), ...]``. Asserts that every start, data and stop bit
    holds its level for exactly ``cycles_per_bit`` cycles and that the line idles high.
    """
    chars, i, d = [], 0, cycles_per_bit
    while True:
        try:
            i = levels.index(0, i)
        except ValueError:
            return chars
        if i + 10 * d > len(levels):
            raise AssertionError(f"character starting at cycle {i} is cut off by the recording")
        cells = [levels[i + k * d:i + (k + 1) * d] for k in range(10)]
        for k, cell in enumerate(cells):
            assert len(set(cell)) == 1, f"bit {k} of the character at cycle {i} is not stable: {cell}"
        bits = [cell[0] for cell in cells]
        assert bits[0] == 0 and bits[9] == 1, f"bad start/stop at cycle {i}: {bits}"
        chars.append((i, sum(b << k for k, b in enumerate(bits[1:9]))))
        i += 10 * d


# --- stream helpers ------------------------------------------------------------------------------

async def stream_put(ctx, stream, payload):
    ctx.set(stream.payload, payload)
    ctx.set(stream.valid, 1)
    await ctx.tick().until(stream.ready)
    ctx.set(stream.valid, 0)


def line_recorder(line, levels):
    async def record(ctx):
        async for _, _, level in ctx.tick().sample(line):
            levels.append(level)
    return record


def stream_collector(stream, items, *, ready_prob=1.0, rng=None):
    async def collect(ctx):
        ctx.set(stream.ready, 1)
        async for _, _, valid, ready, payload in ctx.tick().sample(
                stream.valid, stream.ready, stream.payload):
            if valid and ready:
                items.append(payload)
            if ready_prob < 1.0:
                ctx.set(stream.ready, rng.random() < ready_prob)
    return collect


def pulse_counter(signal, counts, key):
    async def count(ctx):
        async for _, _, value in ctx.tick().sample(signal):
            counts[key] = counts.get(key, 0) + value
    return count


# --- transmitter ---------------------------------------------------------------------------------

def test_tx_sends_random_bytes_with_exact_bit_timing_across_random_idle_gaps():
    rng = random.Random(1)
    payload = [rng.randrange(256) for _ in range(40)]
    dut = UARTTx(DIVISOR)
    levels = []

    async def producer(ctx):
        for byte in payload:
            await ctx.tick().repeat(rng.choice([1, 1, 2, 7, 3 * DIVISOR, 25 * DIVISOR]))
            await stream_put(ctx, dut.sink, byte)
        await ctx.tick().repeat(11 * DIVISOR)

    run(dut, producer, background=[line_recorder(dut.tx, levels)])
    assert levels[0] == 1                               # idle high from reset
    assert [b for _, b in decode_line(levels, DIVISOR)] == payload


@pytest.mark.parametrize("divisor", [4, 5, 13])
def test_tx_sends_back_to_back_bytes_at_full_line_rate(divisor):
    rng = random.Random(divisor)
    payload = [rng.randrange(256) for _ in range(16)]
    dut = UARTTx(divisor)
    levels = []

    async def producer(ctx):
        for byte in payload:
            await stream_put(ctx, dut.sink, byte)
        await ctx.tick().repeat(11 * divisor)

    run(dut, producer, background=[line_recorder(dut.tx, levels)])
    chars = decode_line(levels, divisor)
    assert [b for _, b in chars] == payload
    starts = [c for c, _ in chars]
    assert all(b - a == 10 * divisor for a, b in zip(starts, starts[1:])), starts


# --- receiver ------------------------------------------------------------------------------------

def rx_bench(dut, script, *, ready_prob=1.0, seed=0):
    """Run ``script(ctx)`` driving ``dut.rx``; return received bytes and error pulse counts."""
    got, counts = [], {}
    run(dut, script, background=[
        stream_collector(dut.source, got, ready_prob=ready_prob, rng=random.Random(seed)),
        pulse_counter(dut.error.framing, counts, "framing"),
        pulse_counter(dut.error.overrun, counts, "overrun"),
    ])
    return got, counts


def test_rx_receives_random_bytes_across_random_idle_gaps():
    rng = random.Random(2)
    payload = [rng.randrange(256) for _ in range(40)]
    dut = UARTRx(DIVISOR)

    async def line(ctx):
        await ctx.tick().repeat(5)
        for byte in payload:
            await drive_char(ctx, dut.rx, byte, DIVISOR)
            await ctx.tick().repeat(rng.choice([1, 2, DIVISOR // 2, 3 * DIVISOR, 20 * DIVISOR]))
        await ctx.tick().repeat(4 * DIVISOR)

    got, counts = rx_bench(dut, line, ready_prob=0.7, seed=2)
    assert got == payload
    assert counts == {"framing": 0, "overrun": 0}


@pytest.mark.parametrize("divisor", [4, 7, 16])
def test_rx_receives_back_to_back_bytes(divisor):
    rng = random.Random(divisor)
    payload = [rng.randrange(256) for _ in range(24)] + [0x00, 0xFF, 0x55, 0xAA]
    dut = UARTRx(divisor)

    async def line(ctx):
        for byte in payload:
            await drive_char(ctx, dut.rx, byte, divisor)
        await ctx.tick().repeat(4 * divisor)

    got, counts = rx_bench(dut, line)
    assert got == payload
    assert counts == {"framing": 0, "overrun": 0}


@pytest.mark.parametrize("sender_cycles_per_bit", [31, 33])
def test_rx_tolerates_a_three_percent_baud_mismatch(sender_cycles_per_bit):
    rng = random.Random(sender_cycles_per_bit)
    payload = [rng.randrange(256) for _ in range(8)]
    dut = UARTRx(32)

    async def line(ctx):
        for byte in payload:
            await drive_char(ctx, dut.rx, byte, sender_cycles_per_bit)
        await ctx.tick().repeat(64)

    got, counts = rx_bench(dut, line)
    assert got == payload
    assert counts == {"framing": 0, "overrun": 0}


@pytest.mark.parametrize("error", [-0.015, 0.015])
@pytest.mark.parametrize("divisor", BOARD_DIVISORS)
def test_rx_at_each_boards_divisor_takes_a_sender_off_by_the_error_budget(divisor, error):
    """A back-to-back stream from a sender 1.5 % fast or slow (the link's whole error
    budget, tests/test_boards.py) is received exactly at every board's divisor."""
    rng = random.Random(divisor)
    payload = [rng.randrange(256) for _ in range(24)] + [0x00, 0xFF, 0x55, 0xAA]
    dut = UARTRx(divisor)

    async def line(ctx):
        await ctx.tick().repeat(3)
        await drive_chars_at_rate(ctx, dut.rx, payload, divisor * (1 + error))
        await ctx.tick().repeat(4 * divisor)

    got, counts = rx_bench(dut, line)
    assert got == payload
    assert counts == {"framing": 0, "overrun": 0}


def test_rx_drops_byte_with_bad_stop_bit_and_resynchronises_after_a_break():
    dut = UARTRx(DIVISOR)
    before, after = [0x12, 0x00], [0xFE, 0x01, 0x80]

    async def line(ctx):
        for byte in before:
            await drive_char(ctx, dut.rx, byte, DIVISOR)
        await drive_char(ctx, dut.rx, 0x5A, DIVISOR, stop=0)   # framing error...
        ctx.set(dut.rx, 0)                                     # ...that turns into a break
        await ctx.tick().repeat(37 * DIVISOR)
        ctx.set(dut.rx, 1)
        await ctx.tick().repeat(DIVISOR)
        for byte in after:
            await drive_char(ctx, dut.rx, byte, DIVISOR)
        await ctx.tick().repeat(4 * DIVISOR)

    got, counts = rx_bench(dut, line)
    assert got == before + after
    assert counts == {"framing": 1, "overrun": 0}


@pytest.mark.parametrize("join_bit", [1, 3, 6, 8])
def test_rx_joining_a_busy_line_mid_character_is_in_step_after_the_first_idle(join_bit):
    """The line is already carrying back-to-back characters when the receiver starts
    listening; whatever it makes of them, the bytes after one idle character time
    are received exactly."""
    rng = random.Random(join_bit)
    busy = [rng.randrange(256) for _ in range(6)]
    after = [rng.randrange(256) for _ in range(6)]
    dut = UARTRx(DIVISOR)
    got, marker = [], []

    async def line(ctx):
        levels = [lvl for byte in busy for lvl in char_bits(byte)][join_bit:]
        for level in levels:
            ctx.set(dut.rx, level)
            await ctx.tick().repeat(DIVISOR)
        ctx.set(dut.rx, 1)
        await ctx.tick().repeat(10 * DIVISOR)              # one idle character time
        marker.append(len(got))
        for byte in after:
            await drive_char(ctx, dut.rx, byte, DIVISOR)
        await ctx.tick().repeat(4 * DIVISOR)

    run(dut, line, background=[stream_collector(dut.source, got)])
    assert got[marker[0]:] == after


def test_rx_ignores_a_glitch_shorter_than_half_a_bit():
    dut = UARTRx(16)

    async def line(ctx):
        ctx.set(dut.rx, 0)
        await ctx.tick().repeat(5)
        ctx.set(dut.rx, 1)
        await ctx.tick().repeat(40)
        await drive_char(ctx, dut.rx, 0xC3, 16)
        await ctx.tick().repeat(32)

    got, counts = rx_bench(dut, line)
    assert got == [0xC3]
    assert counts == {"framing": 0, "overrun": 0}


def test_rx_holds_unconsumed_byte_and_reports_overrun_for_the_next():
    dut = UARTRx(DIVISOR)
    got, counts = [], {}

    async def line(ctx):
        for byte in (0x31, 0x32, 0x33):
            await drive_char(ctx, dut.rx, byte, DIVISOR)
        await ctx.tick().repeat(2 * DIVISOR)
        # Only now consume: the first byte was held, the later two overran.
        ctx.set(dut.source.ready, 1)
        got.append((await ctx.tick().sample(dut.source.payload).until(dut.source.valid))[0])
        ctx.set(dut.source.ready, 0)
        await ctx.tick().repeat(4)
        assert not ctx.get(dut.source.valid)
        await drive_char(ctx, dut.rx, 0x34, DIVISOR)           # the receiver still works
        ctx.set(dut.source.ready, 1)
        got.append((await ctx.tick().sample(dut.source.payload).until(dut.source.valid))[0])

    run(dut, line, background=[pulse_counter(dut.error.overrun, counts, "overrun"),
                               pulse_counter(dut.error.framing, counts, "framing")])
    assert got == [0x31, 0x34]
    assert counts == {"framing": 0, "overrun": 2}


# --- both ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("divisor", sorted({5, *BOARD_DIVISORS}))
def test_uart_loopback_delivers_every_byte_of_a_saturating_stream(divisor):
    rng = random.Random(3)
    payload = [rng.randrange(256) for _ in range(32)]
    dut = UART(divisor)
    levels, got = [], []

    async def producer(ctx):
        for byte in payload:
            await stream_put(ctx, dut.sink, byte)
        await ctx.tick().repeat(12 * divisor)

    async def wire(ctx):                                      # tx → rx, one cycle of delay
        async for _, _, level in ctx.tick().sample(dut.tx):
            ctx.set(dut.rx, level)

    run(dut, producer, background=[wire, line_recorder(dut.tx, levels),
                                   stream_collector(dut.source, got)])
    assert [b for _, b in decode_line(levels, divisor)] == payload
    assert got == payload


def test_divisor_for_rounds_and_refuses_inaccurate_rates():
    assert divisor_for(12e6, 1e6) == 12
    assert divisor_for(25e6, 115200) == 217
    with pytest.raises(ValueError, match="misses"):
        divisor_for(12e6, 2.2e6)            # 5 or 6 cycles: 9 % off
    with pytest.raises(ValueError, match=">= 4"):
        divisor_for(12e6, 4e6)
