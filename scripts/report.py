"""Compare finished runs: a Markdown table and figures from each RUN_DIR/results.json.

    python scripts/report.py runs/seq runs/replay25 runs/replay50 [--out report]

Prints the table (run, method, replay rate, params, training FLOPs, learned, retained,
final over all domains, forgetting, BWT, FWT, mean loss over the run; definitions in
cpt_jax/eval/metrics.py) and writes into --out: report.md (runs named by their directory
names, no local paths), report.json, loss_curves.png (one panel per domain, one line per
run), loss_matrices.png (each run's loss matrix as a heatmap), retained_vs_flops.png and
retained_vs_learned.png (one point per run, lower-left is better). A RUN_DIR without
results.json is an error that names it; nothing is written then.
"""

from __future__ import annotations

import argparse
import sys


from cpt_jax.eval.report import write_report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="report.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                    help="--workdir of a finished scripts/train.py run")
    ap.add_argument("--out", default="report", help="output directory (default: ./report)")
    args = ap.parse_args(argv)
    try:
        rep = write_report(args.run_dirs, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"report.py: error: {e}", file=sys.stderr)
        return 2
    print(rep["markdown"])
    print()
    for path in rep["files"].values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
