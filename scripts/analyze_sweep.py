"""Analyse a sweep: does replay beat a larger model at the same training FLOPs?

    python scripts/analyze_sweep.py sweeps/NAME [--out DIR] [--metric retained_loss]

Reads sweeps/NAME/index.json and every finished point's results.json (unfinished points
are left out and named), and writes into --out (default sweeps/NAME/analysis):
analysis.md (cells with mean ± standard error over seeds, the Pareto frontier of retained
vs learned loss, power-law fits L(C) = a (C / C0)^-b + c per replay rate and per model
size, the replay-vs-model-size comparison at matched FLOPs and the answer in words),
analysis.json, scaling.png (the metric against FLOPs, fits dotted) and pareto.png.
Definitions: cpt_jax/eval/scaling.py and cpt_jax/eval/metrics.py.
"""

from __future__ import annotations

import argparse
import sys

from cpt_jax.eval.scaling import METRICS
from cpt_jax.eval.sweep_report import write_analysis


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="analyze_sweep.py", description=__doc__.split("\n")[0],
                                 epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir", help="the --workdir of scripts/sweep.py")
    ap.add_argument("--out", default=None, help="output directory (default SWEEP/analysis)")
    ap.add_argument("--metric", default="retained_loss", choices=METRICS,
                    help="the loss the fits and the answer use (default retained_loss)")
    args = ap.parse_args(argv)
    try:
        analysis = write_analysis(args.sweep_dir, args.out, args.metric)
    except (FileNotFoundError, ValueError) as e:
        print(f"analyze_sweep.py: error: {e}", file=sys.stderr)
        return 2
    print(analysis["markdown"])
    for path in analysis["files"].values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
