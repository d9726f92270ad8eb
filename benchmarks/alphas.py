"""One merge at several alphas (the update computed once) against one merge per alpha, side by
side in one run, from disk.

    python benchmarks/alphas.py [--arch ViT-B-32] [--tasks 8] [--layers 2] [--alphas 0.2,0.5,1.0] [--rounds 2]

The zoo (tsvmerge.zoo, power-law task spectra) is written once to a scratch folder. Each round
runs `merge(alphas=...)` (what `tsvmerge merge --alpha 0.2,0.5,1.0` runs) and one
`merge(alpha=a)` per alpha, in alternating order, each from disk (the inputs evicted from the page
cache first) into a new output folder; the table gives each one's least wall time over the rounds.
Results go to benchmarks/results/alphas-<device>-<commit>-<time>.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from recording import RESULTS, Record, evict, least, timer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2, help="transformer blocks of the zoo (default 2)")
    ap.add_argument("--alphas", default="0.2,0.5,1.0")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--scratch", default=None, help="folder for the zoo and the outputs (default: the system's)")
    ap.add_argument("--results", default=RESULTS)
    a = ap.parse_args(argv)
    record = Record("alphas", results=a.results)

    import tsvmerge
    from tsvmerge.zoo import Arch, make_zoo, make_zoo_dicts

    alphas = [float(x) for x in a.alphas.split(",")]
    args = dict(backend=a.backend, progress=False)
    tsvmerge.merge(*make_zoo_dicts(Arch("warmup", width=64, layers=1, patch=16, image=64, output_dim=32), 2), **args)
    work = tempfile.mkdtemp(prefix="tsvmerge-alphas-", dir=a.scratch)
    try:
        zoo = make_zoo(os.path.join(work, "zoo"), arch=a.arch, tasks=a.tasks, layers=a.layers, progress=False)
        inputs = [zoo.base, *zoo.finetuned]

        def run(label, **kw):
            out = os.path.join(work, "out")
            evict(inputs)
            with timer() as t:
                tsvmerge.merge(zoo.base, zoo.finetuned, out=out, **args, **kw)
            shutil.rmtree(out)
            times.setdefault(label, []).append(t)

        times = {}
        for r in range(a.rounds):
            runs = [("all alphas", {"alphas": alphas})] + [(f"alpha {x:g}", {"alpha": x}) for x in alphas]
            for label, kw in (runs if r % 2 == 0 else runs[::-1]):
                run(label, **kw)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {label: least(ts) for label, ts in times.items()}
    several = best["all alphas"].wall_s
    singles = sum(t.wall_s for label, t in best.items() if label != "all alphas")
    lines = [f"{a.arch} x {a.tasks} tasks, {a.layers} blocks, from disk, backend {a.backend}; least of {a.rounds} "
             "rounds.", "", "| run | wall (s) | CPU (s) |", "|---|---|---|"]
    lines += [f"| {label} | {t.wall_s:.2f} | {t.cpu_s:.2f} |" for label, t in best.items()]
    lines += ["", f"`--alpha {a.alphas}`: {several:.2f} s; {len(alphas)} single merges: {singles:.2f} s "
              f"({singles / several:.2f}x)."]
    record.write({"config": vars(a), "times": {k: [vars(t) for t in ts] for k, ts in times.items()},
                  "several_s": several, "singles_s": singles}, "Several alphas from one update", lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
