"""What every benchmark shares: the timer, the machine and commit it ran on, and its result files.

A run's result is a pair `results/<bench>-<device>-<commit>-<YYYYMMDDTHHMMSS>.{json,md}` (UTC):
the JSON holds `meta` (command, machine, torch, commit, start, load average at start and end)
beside the benchmark's own data; the Markdown opens with the same facts, then the benchmark's tables.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")


# -- timing -------------------------------------------------------------------------------------
@dataclass
class Timing:
    wall_s: float = 0.0
    cpu_s: float = 0.0  # process CPU time, all threads: on a shared machine steadier than wall time


class timer:
    """`with timer(device) as t:` times the block into t.wall_s and t.cpu_s. On a CUDA device the
    wall time comes from CUDA events, after a synchronize, so the kernels the block queued count."""

    def __init__(self, device="cpu"):
        self.device = str(device)
        self.timing = Timing()

    def __enter__(self) -> Timing:
        if self.device.startswith("cuda"):
            import torch
            torch.cuda.synchronize(self.device)
            self.events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            self.events[0].record()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self.timing

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            self.events[1].record()
            self.events[1].synchronize()
            self.timing.wall_s = self.events[0].elapsed_time(self.events[1]) / 1e3
        else:
            self.timing.wall_s = time.perf_counter() - self.wall
        self.timing.cpu_s = time.process_time() - self.cpu


def timed(fn, *args, device="cpu"):
    """(fn(*args), its Timing)."""
    with timer(device) as t:
        out = fn(*args)
    return out, t


def repeated(fn, times: int, device="cpu", warmup: int = 0) -> list[Timing]:
    """Timings of `times` calls of fn(), after `warmup` untimed ones (compilation, autotuning)."""
    for _ in range(warmup):
        fn()
    return [timed(fn, device=device)[1] for _ in range(times)]


def least(timings: list[Timing]) -> Timing:
    """The least wall and CPU time: on a loaded machine, the runs nothing interrupted."""
    return Timing(min(t.wall_s for t in timings), min(t.cpu_s for t in timings))


def median(timings: list[Timing]) -> Timing:
    return Timing(statistics.median(t.wall_s for t in timings), statistics.median(t.cpu_s for t in timings))


def run_child(argv: list, capture: bool = False) -> dict:
    """Run argv in a child process: its exit code, its stdout if `capture`, the wall time, the
    CPU time of that child alone (os.wait4), and its own peak RSS where argv runs Python
    (sys.executable ...: through peak_child.py, see there; None if the child died before it
    could say), else wait4's ru_maxrss, which includes this process's own peak."""
    python = argv[0] == sys.executable
    with tempfile.TemporaryDirectory() as scratch:
        peak_file = os.path.join(scratch, "peak")
        if python:
            argv = [sys.executable, os.path.join(HERE, "peak_child.py"), *argv[1:]]
        start = time.perf_counter()
        child = subprocess.Popen(argv, stdout=subprocess.PIPE if capture else None, text=True,
                                 env={**os.environ, "RECORDING_PEAK_FILE": peak_file})
        stdout = child.stdout.read() if capture else None
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        if capture:
            child.stdout.close()
        if not python:
            peak = usage.ru_maxrss * 1024 / 1e9               # Linux: KiB
        elif os.path.exists(peak_file):
            with open(peak_file) as f:
                peak = int(f.read()) / 1e9
        else:
            peak = None
    return {"returncode": child.returncode, "stdout": stdout, "wall_s": wall,
            "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_gb": peak}


def spawn(script: str, cfg: dict) -> dict:
    """Run `script --one CFG` in a child: the JSON of its last stdout line, with the child's peak RSS."""
    run = run_child([sys.executable, os.path.abspath(script), "--one", json.dumps(cfg)], capture=True)
    if run["returncode"] != 0:
        return {"error": f"child exited with {run['returncode']}"}
    return {**json.loads(run["stdout"].strip().splitlines()[-1]), "peak_rss_gb": run["peak_rss_gb"]}


def evict(paths) -> None:
    """Drop these files' pages from the page cache, so a from-disk run reads the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- where and when -----------------------------------------------------------------------------
def loadavg() -> list:
    return [round(x, 1) for x in os.getloadavg()]


def device_label(device="cpu") -> str:
    """`cpu<cores>`, or the GPU's name with every run of other characters as one '-' (NVIDIA-H200)."""
    if str(device).startswith("cuda"):
        import torch
        return re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(torch.device(device))).strip("-")
    return f"cpu{os.cpu_count()}"


def git_commit() -> str:
    """HEAD's short hash, `-dirty` when tracked files differ from it."""
    run = lambda *a: subprocess.run(["git", "-C", REPO, *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    commit = run("rev-parse", "--short", "HEAD") or "nogit"
    return commit + ("-dirty" if run("status", "--porcelain", "--untracked-files=no") else "")


def utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime())


class Record:
    """One benchmark run: the facts at its start, and `write` for its result pair at the end."""

    def __init__(self, bench: str, device="cpu", results: str = RESULTS, command: str | None = None):
        import torch
        script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO)
        self.results = results
        self.meta = {"bench": bench, "command": command or shlex.join(["python", script, *sys.argv[1:]]),
                     "device_label": device_label(device), "commit": git_commit(), "started": utc_stamp(),
                     "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                     "torch": torch.__version__, "loadavg_start": loadavg()}

    @property
    def stem(self) -> str:
        m = self.meta
        return os.path.join(self.results, f"{m['bench']}-{m['device_label']}-{m['commit']}-{m['started']}")

    def write(self, data: dict, title: str, lines: list) -> str:
        """Write stem.json ({"meta", **data}) and stem.md (title, the run's facts, lines); never
        replacing a file. Returns the stem."""
        m = self.meta
        m["loadavg_end"] = loadavg()
        os.makedirs(self.results, exist_ok=True)
        with open(self.stem + ".json", "x") as f:
            json.dump({"meta": m, **data}, f, indent=1)
        facts = (f"`{m['command']}` at commit {m['commit']}, {m['started']} UTC; {m['device_label']} ({m['machine']}); "
                 f"torch {m['torch']}; load average {m['loadavg_start']} at the start, {m['loadavg_end']} at the end.")
        with open(self.stem + ".md", "x") as f:
            f.write("\n".join([f"# {title}", "", facts, "", *lines]) + "\n")
        print(f"wrote {self.stem}.json and .md", file=sys.stderr)
        return self.stem
