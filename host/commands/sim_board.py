"""``hel sim-board``: build (if needed) and run the Verilator-simulated board.

The first line on stdout is the board's serial device path (a pty); build
progress and the harness's statistics go to stderr. Open the path with pyserial
(or pass it as ``--device``) as you would ``/dev/ttyUSB1``. Runs until Ctrl-C or
SIGTERM, then stops the board and exits 0.

    $ hel sim-board &
    /dev/pts/3
    $ hel selftest --device /dev/pts/3
"""

import signal
import sys

from hel_fpga.host.errors import UsageError


class _Stop(Exception):
    pass


def add_arguments(p):
    p.add_argument("--rebuild", action="store_true",
                   help="ignore the build cache and compile the board again")
    p.add_argument("--config", metavar="FILE.json",
                   help="core configuration as JSON (default: the simulated board's small core, "
                        "n=16 m=16 k=2 o=1 t_max=256 lanes=4)")
    p.add_argument("--stats", action="store_true",
                   help="print simulated clock cycles per second to stderr every second")


def _raise_stop(signum, frame):
    raise _Stop(signum)


def run(args) -> int:
    from hel_fpga.spec.formats import ConfigError, HelConfig
    from hel_fpga.sim import board

    cfg = None
    if args.config:
        try:
            cfg = HelConfig.load(args.config)
        except OSError as e:
            raise UsageError(f"cannot read {args.config}: {e.strerror}") from None
        except ConfigError as e:
            raise UsageError(f"{args.config}: {e}") from None

    def progress(line):
        print(line, file=sys.stderr, flush=True)

    old = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    sb = None
    try:
        sb = board.start(cfg, rebuild=args.rebuild, progress=progress, stats=args.stats,
                         stderr=sys.stderr)
        print(sb.path, flush=True)
        progress(f"sim-board: running ({sb.build.cfg.n} oscillators, {sb.divisor} clocks per bit, "
                 f"pid {sb.process.pid}); Ctrl-C or SIGTERM stops it")
        rc = sb.process.wait()
        if rc == 0:     # it was signalled directly (e.g. Ctrl-C reaches the whole process group)
            return 0
        print(f"hel sim-board: error: the simulated board exited unexpectedly (code {rc})",
              file=sys.stderr)
        return 1
    except (_Stop, KeyboardInterrupt):
        return 0
    except board.SimBoardError as e:
        print(f"hel sim-board: error: {e}", file=sys.stderr)
        return 1
    finally:
        if sb is not None:
            sb.stop()
        for s, h in old.items():
            signal.signal(s, h)
