"""``hel build``: a bitstream, a report and a summary for one board.

Runs :func:`hel_fpga.boards.build.build` for ``--board`` (the table in
:mod:`hel_fpga.boards.table`) and prints a short summary. nextpnr tries the
placement seeds of ``--seeds`` (default: the family's list in
:data:`hel_fpga.boards.build.DEFAULT_SEEDS`) in order and stops at the first that
meets the clock. Exit status: 0 when timing is met, 1 when no seed meets it
(the fastest seed's bitstream and report are still written) or a tool fails,
2 for user errors (unknown board, bad seed list, missing toolchain, no top
level).
"""

from __future__ import annotations

import importlib
import json
import sys

from hel_fpga.host.errors import UsageError


def add_arguments(p):
    from hel_fpga.boards.table import BOARDS
    p.add_argument("--board", choices=list(BOARDS), metavar="NAME",
                   help=f"target board: {', '.join(BOARDS)}")
    p.add_argument("--out", metavar="DIR", help="output directory (default: build/NAME)")
    p.add_argument("--toolchain", choices=("yowasp", "system"), default=None,
                   help="yowasp (PyPI, default) or system tools (YOSYS, NEXTPNR_*, ICEPACK/ECPPACK "
                        "or PATH); default from HEL_TOOLCHAIN")
    p.add_argument("--no-cache", action="store_true", help="run the tools even if a cached build matches")
    from hel_fpga.boards.build import DEFAULT_SEEDS
    defaults = "; ".join(f"{fam} {','.join(map(str, s))}" for fam, s in DEFAULT_SEEDS.items())
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", metavar="LIST", default=None,
                       help="nextpnr placement seeds to try in order until one meets the clock, "
                            f"e.g. 1,2,3 or 1-4 (default: {defaults})")
    seeds.add_argument("--seed", type=int, default=None, metavar="N",
                       help="one placement seed (same as --seeds N)")
    p.add_argument("--design", metavar="MODULE:FACTORY", default=None,
                   help="build another design: a callable taking the board entry and returning an "
                        "Elaboratable (default: hel_fpga.rtl.top.Top with the board's configuration)")
    p.add_argument("--config", metavar="KEY=VALUE,...", default=None,
                   help="build the board with its core configuration changed, e.g. n=64,m=64 "
                        "(fields of HelConfig; for exploring what fits: docs/boards.md)")
    p.add_argument("--quiet", action="store_true", help="no progress indication")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the summary")
    p.add_argument("--list", action="store_true", help="list the boards and their configurations")


def _factory(spec: str):
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise UsageError(f"--design must be MODULE:FACTORY, got {spec!r}")
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"--design {spec}: {e}") from None
    return obj


def parse_config_overrides(text: str, base) -> object:
    """``base`` (a :class:`~hel_fpga.spec.formats.HelConfig`) with the ``KEY=VALUE,...`` of
    ``--config`` applied; :class:`UsageError` names an unknown field or a bad value."""
    from dataclasses import fields

    from hel_fpga.spec.formats import ConfigError
    names = {f.name for f in fields(base)}
    changes = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in names:
            raise UsageError(f"--config: {item!r} is not KEY=VALUE with KEY one of {', '.join(sorted(names))}")
        try:
            changes[key] = int(value)
        except ValueError:
            raise UsageError(f"--config: {key} must be an integer, got {value.strip()!r}") from None
    try:
        return base.replace(**changes)
    except ConfigError as e:
        raise UsageError(f"--config: {e}") from None


def run(args) -> int:
    from hel_fpga.boards.table import BOARDS
    if args.list:
        width = max(len(name) for name in BOARDS)
        for b in BOARDS.values():
            c = b.config
            print(f"{b.name:<{width}} {b.device:<18} {b.target_mhz:g} MHz  N={c.n} M={c.m} P={c.lanes} "
                  f"{c.operand_width}-bit T_max={c.t_max}  {b.baud} baud  {b.title}")
        return 0
    if not args.board:
        raise UsageError(f"--board is required (one of: {', '.join(BOARDS)})")
    from hel_fpga.boards import build as B
    board = BOARDS[args.board]
    if args.config:
        import dataclasses
        board = dataclasses.replace(board, config=parse_config_overrides(args.config, board.config))
    factory = _factory(args.design) if args.design else B.real_top
    seeds = None
    if args.seeds is not None:
        try:
            seeds = B.parse_seeds(args.seeds)
        except ValueError as e:
            raise UsageError(f"--seeds: {e}") from None
    elif args.seed is not None:
        if args.seed < 0:
            raise UsageError(f"--seed: placement seeds are non-negative, got {args.seed}")
        seeds = (args.seed,)
    try:
        out = args.out
        if out is None and args.config:
            import re
            out = f"build/{board.name}+{re.sub(r'[^A-Za-z0-9]+', '-', args.config).strip('-')}"
        result = B.build(board, out, design_factory=factory, toolchain=args.toolchain,
                         cache=not args.no_cache, seeds=seeds, progress=not args.quiet)
    except B.ToolchainError as e:
        raise UsageError(str(e)) from None
    except B.BuildError as e:
        print(f"hel build: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.report, indent=2))
    else:
        print(B.format_summary(result.report, result.out_dir))
    return 0 if result.timing_met else 1
