"""`tsvmerge demo`: the built-in example, end to end on this machine.

1. Generate a synthetic zoo (ViT-B-32 shapes, 8 tasks) unless it is cached, merge it with
   TSV-M from disk, and print the report.
2. Run the accuracy benchmark (a small ViT fine-tuned on real digit tasks, merged by every
   method) and print its table.
"""
from __future__ import annotations

import argparse
import os
import time

from . import merge
from .report import format_merge_report
from .zoo import make_zoo


def synthetic_merge(workdir: str, arch: str, tasks: int, layers, backend: str, device: str) -> dict:
    zoo_dir = os.path.join(workdir, f"zoo-{arch}-{tasks}" + (f"-{layers}l" if layers else ""))
    marker = os.path.join(zoo_dir, "complete")
    if not os.path.exists(marker):
        print(f"[1/2] generating a synthetic zoo: {arch}, {tasks} tasks -> {zoo_dir}")
        make_zoo(zoo_dir, arch=arch, tasks=tasks, layers=layers)
        open(marker, "w").close()
    else:
        print(f"[1/2] using the cached synthetic zoo in {zoo_dir}")
    base = os.path.join(zoo_dir, "base.safetensors")
    finetuned = sorted(os.path.join(zoo_dir, f) for f in os.listdir(zoo_dir) if f.startswith("task_"))
    out = os.path.join(workdir, "merged")
    start = time.perf_counter()
    rep = merge(base, finetuned, method="tsv", backend=backend, device=device, preset="clip", out=out,
                overwrite=True)
    print(format_merge_report(rep))
    print(f"merged model -> {out} ({time.perf_counter() - start:.1f} s from disk, report in "
          f"{os.path.join(out, 'tsvmerge_report.json')})")
    return rep


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tsvmerge demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="tsvmerge-demo", help="where zoos, merges and results go")
    p.add_argument("--zoo-arch", default="ViT-B-32", help="synthetic zoo: ViT-B-32, ViT-B-16 or ViT-L-14")
    p.add_argument("--zoo-tasks", type=int, default=8, help="synthetic zoo: number of fine-tunes")
    p.add_argument("--zoo-layers", type=int, help="synthetic zoo: fewer transformer blocks, for a quicker run")
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    # everything else (--tasks, --quick, --cache, --rebuild, ...) goes to the accuracy benchmark
    a, rest = p.parse_known_args(argv)
    os.makedirs(a.workdir, exist_ok=True)
    if not a.skip_synthetic:
        synthetic_merge(a.workdir, a.zoo_arch, a.zoo_tasks, a.zoo_layers, a.backend, a.device)
    if not a.skip_accuracy:
        from .accuracy.demo import main as accuracy_main
        print("[2/2] accuracy benchmark: a small ViT fine-tuned on real digit tasks")
        return accuracy_main(["--out", os.path.join(a.workdir, "accuracy"), *rest])
    return 0
