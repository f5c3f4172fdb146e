"""The ``hel`` console command: one entry point for the whole flow.

Each subcommand lives in its own module under :mod:`hel_fpga.host.commands` and provides
``add_arguments(parser)`` and ``run(args) -> int``; its one-line help is in
:data:`COMMANDS`. Modules are imported only when their command runs, so
``hel --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hel_fpga.host.errors import UsageError

#: name → (module under hel_fpga.host.commands, help line). The help lines live
#: here so that ``hel --help`` does not import NumPy, Amaranth or the toolchain.
COMMANDS: dict[str, tuple[str, str]] = {
    "compare": ("compare", "compare HEL gradients (float RHEL, golden integer model, device) with float BPTT"),
    "glep": ("glep", "GLEP variants (boundary conditions) vs their exact gradients: HEL as the special case"),
    "train": ("train", "train an oscillator network with HEL on a device (or float BPTT/RHEL baselines)"),
    "build": ("build", "build a board's bitstream with the YoWASP (or system) FPGA toolchain; report resources and Fmax"),
    "program": ("program", "program a board with openFPGALoader (--dry-run prints the command)"),
    "sim-board": ("sim_board", "build (if needed) and run the Verilator-simulated board; prints its serial device path first"),
    "selftest": ("selftest", "run the device's SELFTEST (forward, flip, echo back to zero) and print pass/fail"),
    "archive": ("archive", "time-series archive benchmark: model selection on a validation split, then the results table"),
    "bench": ("bench", "benchmarks: core (cycles per step vs MACs/P), link (payload efficiency, simulated cycles/s) "
                       "and train (samples/s on chip, host-driven and on the CPU)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hel",
        description="Hamiltonian Echo Learning on open FPGAs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_line) in COMMANDS.items():
        p = sub.add_parser(name, help=help_line, description=help_line)
        p.set_defaults(_module=module)
        # Arguments are added lazily (see main) to keep --help cheap.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Load the selected command's arguments before the full parse.
    if argv and argv[0] in COMMANDS:
        mod = importlib.import_module(f"hel_fpga.host.commands.{COMMANDS[argv[0]][0]}")
        sub = parser._subparsers._group_actions[0].choices[argv[0]]  # noqa: SLF001
        mod.add_arguments(sub)
    args = parser.parse_args(argv)
    mod = importlib.import_module(f"hel_fpga.host.commands.{args._module}")
    try:
        return int(mod.run(args) or 0)
    except UsageError as e:
        print(f"hel {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hel {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
