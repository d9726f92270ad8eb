"""pytest-benchmark runs (bench_primitives.py) record their statistics as every benchmark does:
a result pair results/<bench>-<device>-<commit>-<time>.{json,md} (recording.py)."""
import os
import shlex

import pytest
from recording import RESULTS, Record

COLUMNS = ("min", "median", "mean", "max", "stddev")
RECORD = pytest.StashKey[Record]()


def pytest_addoption(parser):
    parser.addoption("--results", default=RESULTS, help="folder for the benchmarks' result files")


def pytest_sessionstart(session):
    args = shlex.join(["pytest", *session.config.invocation_params.args])
    session.config.stash[RECORD] = Record("bench_primitives", "cpu", session.config.getoption("results"), command=args)


@pytest.hookimpl(wrapper=True)
def pytest_benchmark_group_stats(config, benchmarks, group_by):
    """Called once, after the runs, with every benchmark's statistics (in seconds)."""
    groups = yield
    rows = [{"name": b["name"], "rounds": b["rounds"], **{c: b[c] for c in COLUMNS}} for b in benchmarks]
    if rows:
        benches = sorted({os.path.splitext(os.path.basename(b["fullname"].split("::")[0]))[0] for b in benchmarks})
        record = config.stash[RECORD]
        record.meta["bench"] = "-".join(benches)
        lines = ["Seconds per call over pytest-benchmark's rounds.", "",
                 "| benchmark | rounds | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|",
                 *[f"| {r['name']} | {r['rounds']} | " + " | ".join(f"{r[c]:.4g}" for c in COLUMNS) + " |"
                   for r in rows]]
        record.write({"rows": rows}, "Engine primitives, pytest-benchmark", lines)
    return groups
