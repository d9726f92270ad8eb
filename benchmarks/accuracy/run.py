"""Run the accuracy benchmark and record it as every benchmark does: its table and results.json,
with the run's facts, as benchmarks/results/accuracy-<device>-<commit>-<time>.{json,md}, and its
plots in the folder of that name.

    python benchmarks/accuracy/run.py [--rebuild] [--cache DIR] [--tasks N] [--quick] [--results DIR]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/: recording
from recording import RESULTS, Record  # noqa: E402

from tsvmerge.accuracy.__main__ import main  # noqa: E402


def run(argv) -> int:
    ap = argparse.ArgumentParser(add_help=False)  # --help: the benchmark's own
    ap.add_argument("--results", default=RESULTS)
    args, rest = ap.parse_known_args(argv)
    record = Record("accuracy", "cpu", args.results)
    plots = record.stem
    code = main(["--out", plots, *rest])
    if code:
        return code
    with open(os.path.join(plots, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(plots, "table.md")) as f:
        table = f.read()
    for name in ("results.json", "table.md"):  # they live in the pair now
        os.remove(os.path.join(plots, name))
    record.write({"results": results}, "Merge accuracy on real digit tasks",
                 [f"Plots: `{os.path.basename(plots)}/`.", "", table])
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
