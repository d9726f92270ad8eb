"""One merge on 1 process against the same merge on N processes under torchrun, side by side in
one run, from disk, each process on `--threads` threads.

    python benchmarks/distributed.py [--arch ViT-B-32] [--tasks 8] [--layers 12] [--nprocs 1,2] [--threads 1]
                                     [--rounds 2]

The zoo (tsvmerge.zoo, power-law task spectra) is written once to a scratch folder. Each round
runs, in alternating order, `python -m tsvmerge merge` (1 process) and `torchrun --standalone
--nproc-per-node N -m tsvmerge merge` for each N > 1, each with OMP_NUM_THREADS=--threads, from
disk (the inputs evicted from the page cache first), into a new output folder. The table gives
each one's least wall time over the rounds (the whole command: torchrun's start counts), the
merge's own wall time (its report), each rank's share, wall time and peak RSS (the single
process's from `recording.run_child`), and checks that
every output's tensors are byte-identical to the 1-process merge's.
Results go to benchmarks/results/distributed-<device>-<commit>-<time>.{json,md}.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile

from recording import RESULTS, Record, evict, loadavg, run_child


def tensor_digest(folder: str) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (the shard layout
    of a distributed merge may differ; its tensors may not)."""
    from tsvmerge.io import open_checkpoint
    ckpt, h = open_checkpoint(folder), hashlib.sha256()
    infos = ckpt.infos()
    for name in sorted(infos):
        t = ckpt.read(name)
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.contiguous().reshape(-1).view(-1).numpy().tobytes() if t.dim() else t.reshape(1).numpy().tobytes())
    return h.hexdigest()


def run(nprocs: int, threads: int, inputs: list, out: str, backend: str) -> dict:
    merge = ["-m", "tsvmerge", "merge", *inputs, "-o", out, "--backend", backend, "--no-progress"]
    argv = ([sys.executable, *merge] if nprocs == 1 else
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nprocs}", *merge])
    evict(inputs)
    load = loadavg()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    child = run_child(argv, capture=True)
    if child["returncode"] != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({child['returncode']})")
    with open(os.path.join(out, "tsvmerge_report.json")) as f:
        rep = json.load(f)
    one = {"rank": 0, "wall_s": rep["summary"]["wall_s"], "share": 1.0, "tensors": rep["summary"]["tensors"],
           "peak_rss_bytes": child["peak_rss_gb"] * 1e9}
    return {"wall_s": child["wall_s"], "merge_wall_s": rep["summary"]["wall_s"], "load": load,
            "ranks": rep.get("ranks") or [one], "digest": tensor_digest(out)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--layers", type=int, default=None, help="transformer blocks of the zoo (default: the arch's)")
    ap.add_argument("--nprocs", default="1,2", help="process counts, comma-separated (1 is the single process)")
    ap.add_argument("--threads", type=int, default=1, help="threads per process (OMP_NUM_THREADS)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--scratch", default=None, help="folder for the zoo and the outputs (default: the system's)")
    ap.add_argument("--results", default=RESULTS)
    a = ap.parse_args(argv)
    record = Record("distributed", results=a.results)
    from tsvmerge.zoo import make_zoo

    counts = [int(x) for x in a.nprocs.split(",")]
    work = tempfile.mkdtemp(prefix="tsvmerge-distributed-", dir=a.scratch)
    runs: dict = {}
    try:
        zoo = make_zoo(os.path.join(work, "zoo"), arch=a.arch, tasks=a.tasks, layers=a.layers, progress=False)
        inputs = [zoo.base, *zoo.finetuned]
        for r in range(a.rounds):
            for n in (counts if r % 2 == 0 else counts[::-1]):
                out = os.path.join(work, "out")
                runs.setdefault(n, []).append(run(n, a.threads, inputs, out, a.backend))
                shutil.rmtree(out)
                print(f"round {r + 1}: {n} process(es): {runs[n][-1]['wall_s']:.2f} s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    best = {n: min(rs, key=lambda x: x["wall_s"]) for n, rs in runs.items()}
    one = best[min(counts)]
    digests = {rr["digest"] for rs in runs.values() for rr in rs}
    layers = "all" if a.layers is None else a.layers
    lines = [f"{a.arch} x {a.tasks} tasks, {layers} blocks, from disk (inputs evicted before each run), backend "
             f"{a.backend}, {a.threads} thread(s) per process; least wall time of {a.rounds} rounds (alternating "
             "order).", "",
             "| processes | wall, whole command (s) | merge wall (s) | speed-up | per rank: share, tensors, wall (s), "
             "peak RSS (GB) | load at start |", "|---|---|---|---|---|---|"]
    for n, b in sorted(best.items()):
        per_rank = "; ".join(f"r{x['rank']}: {x['share']:.3f}, {x['tensors']}, {x['wall_s']:.1f}, "
                             + (f"{x['peak_rss_bytes'] / 1e9:.2f}" if x.get("peak_rss_bytes") else "-")
                             for x in b["ranks"])
        lines.append(f"| {n} | {b['wall_s']:.2f} | {b['merge_wall_s']:.2f} | {one['wall_s'] / b['wall_s']:.2f}x | "
                     f"{per_rank} | {b['load']} |")
    lines += ["", f"Every output's tensors byte-identical to the others': {'yes' if len(digests) == 1 else 'NO'} "
              f"({len(digests)} distinct digest(s) over {sum(len(rs) for rs in runs.values())} runs)."]
    record.write({"config": vars(a), "runs": {str(n): rs for n, rs in runs.items()}}, "Merges across processes",
                 lines)
    print("\n".join(lines))
    return 0 if len(digests) == 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
