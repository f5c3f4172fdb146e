"""``hel program``: load a bitstream into a board with openFPGALoader.

``--dry-run`` prints the exact command and runs nothing. Without a board
attached (or without the programmer) it fails with a message and exit 1; a
bad option or a missing bitstream is a user error (exit 2).
"""

from __future__ import annotations

import sys

from hel_fpga.host.errors import UsageError


def add_arguments(p):
    from hel_fpga.boards.table import BOARDS
    p.add_argument("--board", required=True, choices=list(BOARDS), metavar="NAME",
                   help=f"target board: {', '.join(BOARDS)}")
    p.add_argument("--bitstream", metavar="FILE",
                   help="bitstream to load (default: build/NAME/top.bin or top.bit)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--flash", dest="mode", action="store_const", const="flash",
                      help="write the configuration flash (survives power-off)")
    mode.add_argument("--sram", dest="mode", action="store_const", const="sram",
                      help="load the FPGA's configuration memory only")
    p.add_argument("--dry-run", action="store_true", help="print the command without running it")


def run(args) -> int:
    from hel_fpga.boards.program import BadRequest, ProgramError, default_bitstream, program
    from hel_fpga.boards.table import BOARDS
    board = BOARDS[args.board]
    bitstream = args.bitstream or str(default_bitstream(board))
    try:
        return program(board, bitstream, mode=args.mode, dry_run=args.dry_run)
    except BadRequest as e:
        raise UsageError(str(e)) from None
    except ProgramError as e:   # no board, no programmer, programmer failed
        print(f"hel program: error: {e}", file=sys.stderr)
        return 1
