"""What the strict readers cost: header parsing and small-tensor reads, side by side with
the readers of another git revision (default main), in one process on one file.

    python benchmarks/bench_readers.py [--against main] [--tensors 2000]

Results go to benchmarks/results/bench_readers-<device>-<commit>-<time>.{json,md}.

Small tensors (1 KiB) make the per-read overhead (stat, open, checks) visible; a real
merge reads tensors of MBs, where it vanishes.
"""
import argparse
import importlib
import os
import subprocess
import sys
import tempfile

import torch

from recording import RESULTS, Record, least, timed

from tsvmerge.io import safetensors as ours


def load_revision(rev: str, folder: str):
    """The safetensors module of tsvmerge as it is at `rev`, importable beside this tree's (as
    `old_tsvmerge.io.safetensors`): the package's modules at `rev`, with empty `__init__.py`
    files, so only safetensors.py and what it imports load."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True).stdout.strip()
    files = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "python/tsvmerge/"], cwd=root,
                           capture_output=True, text=True, check=True).stdout.split()
    for path in [p for p in files if p.endswith(".py")]:
        target = os.path.join(folder, "old_tsvmerge", os.path.relpath(path, "python/tsvmerge"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        text = "" if path.endswith("__init__.py") else subprocess.run(
            ["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True, check=True).stdout
        with open(target, "w") as f:
            f.write(text)
    sys.path.insert(0, folder)
    return importlib.import_module("old_tsvmerge.io.safetensors")


def best_of_both(fn_a, fn_b, repeats=30):
    """The least wall time of `repeats` alternating runs of each: on a loaded machine the least is
    the run that nothing interrupted, and alternating shares any drift in the load."""
    times = ([], [])
    for _ in range(repeats):
        for fn, out in zip((fn_a, fn_b), times):
            out.append(timed(fn)[1])
    return least(times[0]).wall_s, least(times[1]).wall_s


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", default="main")
    ap.add_argument("--tensors", type=int, default=2000)
    ap.add_argument("--results", default=RESULTS)
    a = ap.parse_args()
    record = Record("bench_readers", "cpu", a.results)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        old = load_revision(a.against, folder)
        path = os.path.join(folder, "x.safetensors")
        g = torch.Generator().manual_seed(0)
        ours.save_file({f"blocks.{i}.weight": torch.randn(256, generator=g) for i in range(a.tensors)}, path)
        header = os.path.getsize(path) - a.tensors * 1024
        print(f"{a.tensors} tensors of 1 KiB, header {header} bytes; load average {os.getloadavg()[0]:.1f}")
        entries = list(ours.read_header(path)[0].values())
        for label, fn in (("read_header", lambda m: m.read_header(path)),
                          ("read every tensor", lambda m: [m.read_tensor(path, i, o) for i, o in entries])):
            t_old, t_new = best_of_both(lambda: fn(old), lambda: fn(ours))
            rows.append({"step": label, "against_ms": t_old * 1e3, "this_tree_ms": t_new * 1e3, "ratio": t_new / t_old})
            print(f"{label:18s} {a.against}: {t_old * 1e3:8.2f} ms   this tree: {t_new * 1e3:8.2f} ms   "
                  f"ratio {t_new / t_old:.2f}")
    lines = [f"One file of {a.tensors} tensors of 1 KiB (header {header} bytes); the least of 30 alternating runs each.",
             "", f"| step | {a.against} ms | this tree ms | ratio |", "|---|---|---|---|",
             *[f"| {r['step']} | {r['against_ms']:.2f} | {r['this_tree_ms']:.2f} | {r['ratio']:.2f} |" for r in rows]]
    record.write({"against": a.against, "tensors": a.tensors, "rows": rows},
                 f"Strict safetensors readers against {a.against}", lines)


if __name__ == "__main__":
    main()
