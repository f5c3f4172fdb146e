"""``hel glep``: HEL as a special case of GLEP, measured on the float model.

Runs every GLEP variant of :mod:`hel_fpga.sim.glep` (constant initial value with and
without the boundary residual, fixed endpoints, periodic, and the pinned final
state: centred/one-sided RHEL and HEB) and prints, per variant, the structural
claims (boundary conditions, forward-only, local, needs sensitivities, passes),
the peak array bytes of one gradient computation at two sequence lengths, and
the cosine and relative error against the exact gradient of the variant's own
model at two ε (showing the order of the bias, or its absence).
"""

from __future__ import annotations

import json


def add_arguments(p):
    p.add_argument("--json", action="store_true",
                   help="print a list of rows (variant, boundary_conditions, forward_only, local, "
                        "needs_sensitivities, passes, memory_bytes, results)")


def _yes(b: bool) -> str:
    return "yes" if b else "no"


def format_table(rows: list[dict]) -> list[str]:
    """The rows as a Markdown table (also what the README shows)."""
    lengths = list(rows[0]["memory_bytes"])
    eps = [r["eps"] for r in rows[0]["results"]]
    head = (["variant", "boundary conditions", "forward-only", "local", "sensitivities", "passes",
             "peak bytes T=" + " → T=".join(str(t) for t in lengths)]
            + [f"ε={e:g}: cos / rel. err" for e in eps])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mem = " → ".join(f"{r['memory_bytes'][t]:,}" for t in lengths)
        res = [f"{x['cos']:.6f} / {x['rel_err']:.2e}" for x in r["results"]]
        cells = [f"`{r['variant']}`", r["boundary_conditions"], _yes(r["forward_only"]), _yes(r["local"]),
                 _yes(r["needs_sensitivities"]), str(r["passes"]), mem] + res
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def run(args) -> int:
    from hel_fpga.sim import glep

    rows = glep.glep_table()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for line in format_table(rows):
        print(line)
    size = glep.SIZE
    pr = glep._seq_problem(glep.DEFAULT_SEED, glep.DEFAULT_T)
    dx, drel = glep.pinned_vs_echo(pr, glep.DEFAULT_EPS[0])
    bm = glep.bptt_memory()
    print()
    print(f"N = M = {size['n']}, K = {size['k']}, O = {size['o']}, δ = 1/8, T = {glep.DEFAULT_T}, "
          f"seed {glep.DEFAULT_SEED}; centred differences at ±ε except hel_one_sided.")
    print(f"Pinned final state solved as one EL system vs the echo (ε = {glep.DEFAULT_EPS[0]:g}): "
          f"max |Δx| = {dx:.1e}, gradient rel. difference = {drel:.1e}.")
    print("BPTT (stores the trajectory) for comparison: "
          + " → ".join(f"{v:,}" for v in bm.values()) + " bytes.")
    print("How each phase is computed:")
    for v in glep.VARIANTS:
        print(f"  {v.id}: {v.solver}")
    return 0
