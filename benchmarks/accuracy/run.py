"""Run the accuracy benchmark and record its table, JSON and plots in benchmarks/results/accuracy/.

    python benchmarks/accuracy/run.py [--rebuild] [--cache DIR] [--tasks N]
"""
import os
import sys

from tsvmerge.accuracy.__main__ import main

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "results", "accuracy")

if __name__ == "__main__":
    sys.exit(main(["--out", os.path.normpath(RESULTS), *sys.argv[1:]]))
