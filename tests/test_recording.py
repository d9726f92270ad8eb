"""benchmarks/recording.py: the timer and the result pair every benchmark writes."""
import json
import os
import re
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "benchmarks"))
import recording  # noqa: E402


def test_timer_counts_wall_and_cpu():
    with recording.timer() as idle:
        time.sleep(0.05)
    with recording.timer() as busy:
        sum(i * i for i in range(300_000))
    assert idle.wall_s >= 0.05 and idle.cpu_s < 0.04
    assert busy.cpu_s > 0 and busy.wall_s > 0


def test_least_and_median():
    runs = [recording.Timing(3.0, 1.0), recording.Timing(1.0, 2.0), recording.Timing(2.0, 3.0)]
    assert recording.least(runs) == recording.Timing(1.0, 1.0)
    assert recording.median(runs) == recording.Timing(2.0, 2.0)
    calls = []
    timings = recording.repeated(lambda: calls.append(1), 3, warmup=2)
    assert len(timings) == 3 and len(calls) == 5


def test_run_child_reports_its_own_peak_rss_and_exit_code():
    grow = "x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096]); print('done')"
    run = recording.run_child([sys.executable, "-c", grow], capture=True)
    assert run["returncode"] == 0 and run["stdout"] == "done\n"
    assert 0.3 < run["peak_rss_gb"] < 2 and run["cpu_s"] > 0 and run["wall_s"] > 0
    assert recording.run_child([sys.executable, "-c", "raise SystemExit(3)"])["returncode"] == 3


def test_run_child_peak_rss_leaves_out_the_parents():
    """Linux folds the parent's high-water mark into a child's ru_maxrss at exec."""
    held = bytearray(600 * 2**20)
    held[::4096] = b"1" * len(held[::4096])
    run = recording.run_child([sys.executable, "-c", "print('small')"], capture=True)
    assert run["stdout"] == "small\n" and run["peak_rss_gb"] < 0.3, run["peak_rss_gb"]
    del held


def test_result_pair_names_and_facts(tmp_path):
    record = recording.Record("demo", "cpu", str(tmp_path))
    stem = record.write({"rows": [1, 2]}, "A title", ["| a |", "|---|"])
    name = os.path.basename(stem)
    assert re.fullmatch(rf"demo-cpu{os.cpu_count()}-[0-9a-f]{{4,}}(-dirty)?-\d{{8}}T\d{{6}}", name), name
    with open(stem + ".json") as f:
        saved = json.load(f)
    assert saved["rows"] == [1, 2]
    meta = saved["meta"]
    assert meta["commit"] in name and meta["started"] in name and len(meta["loadavg_end"]) == 3
    with open(stem + ".md") as f:
        md = f.read().splitlines()
    assert md[0] == "# A title" and meta["command"] in md[2] and str(meta["loadavg_start"]) in md[2]
    assert md[-2:] == ["| a |", "|---|"]
    with pytest.raises(FileExistsError):  # a second write in the same second never replaces the first
        record.write({}, "again", [])
