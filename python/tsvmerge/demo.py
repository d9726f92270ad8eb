"""`tsvmerge demo`: the built-in example, end to end on this machine.

1. Generate a synthetic zoo (ViT-B-32 shapes, 2 of its 12 blocks, 8 tasks) unless it is cached,
   merge it with TSV-M from disk, and print the report.
2. Run the accuracy benchmark on its paper zoo (a small ViT fine-tuned on 8 real digit tasks,
   merged by the paper's methods: averaging, task arithmetic, TIES, TSV-M; --tasks 12 for all
   of them; `python -m tsvmerge.accuracy` adds Iso-C, Iso-CTS, DARE and consensus merges) and print its table, what it shows, where
   its files went and how long it took.

A re-run reuses the zoo and replaces the merge and the results it made itself (recognised by
their contents); anything else in its folders' places is left alone, with an error.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from . import merge
from .api import REPORT_NAME
from .io import InputError, OutputError
from .io.safetensors import read_header
from .report import format_merge_report
from .zoo import make_zoo


def synthetic_merge(workdir: str, arch: str, tasks: int, layers, backend: str, device: str) -> dict:
    zoo_dir = os.path.join(workdir, f"zoo-{arch}-{tasks}" + (f"-{layers}l" if layers else ""))
    names = ["base.safetensors"] + [f"task_{t + 1:02d}.safetensors" for t in range(tasks)]
    start = time.perf_counter()
    if not os.path.lexists(zoo_dir):
        print(f"[1/2] generating a synthetic zoo: {arch}" + (f" ({layers} blocks)" if layers else "")
              + f", {tasks} tasks -> {zoo_dir}", flush=True)
        make_zoo(zoo_dir, arch=arch, tasks=tasks, layers=layers)
    elif _is_demo_zoo(zoo_dir, names, arch, tasks, layers):
        print(f"[1/2] using the cached synthetic zoo in {zoo_dir}")
    else:
        raise OutputError(zoo_dir, "exists but is not a zoo that tsvmerge demo made: remove it or pass another "
                                   "--workdir")
    generated = time.perf_counter() - start
    base, *finetuned = (os.path.join(zoo_dir, n) for n in names)
    out = os.path.join(workdir, "merged")
    start = time.perf_counter()
    rep = merge(base, finetuned, method="tsv", backend=backend, device=device, preset="clip", out=out,
                overwrite=_is_demo_merge(out, workdir))
    merged = time.perf_counter() - start
    print(format_merge_report(rep))
    print(f"merged model -> {out} ({merged:.1f} s from disk, report in {os.path.join(out, REPORT_NAME)})", flush=True)
    return {"synthetic zoo": generated, "synthetic merge": merged}


def _is_demo_zoo(folder: str, names: list, arch: str, tasks: int, layers) -> bool:
    """A zoo `make_zoo` wrote with these settings (it publishes only complete zoos)."""
    try:
        _, meta, _ = read_header(os.path.join(folder, names[0]))
    except InputError:
        return False
    expected = {"generator": "tsvmerge.zoo", "arch": arch, "tasks": str(tasks)}
    return (all(meta.get(k) == v for k, v in expected.items()) and (layers is None or meta.get("layers") == str(layers))
            and all(os.path.isfile(os.path.join(folder, n)) for n in names))


def _is_demo_merge(out: str, workdir: str) -> bool:
    """A model folder this demo merged (a model and its report, the inputs in one of the demo's
    zoos): the demo may replace it, and nothing else."""
    try:
        files = os.listdir(out)
        with open(os.path.join(out, REPORT_NAME)) as f:
            sources = [i["source"] for i in json.load(f)["inputs"]]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    ours = all(f == REPORT_NAME or f.startswith("model") for f in files)
    return ours and all(os.path.realpath(os.path.dirname(os.path.dirname(s))) == os.path.realpath(workdir)
                        and os.path.basename(os.path.dirname(s)).startswith("zoo-") for s in sources)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tsvmerge demo", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="tsvmerge-demo", help="where zoos, merges and results go")
    p.add_argument("--zoo-arch", default="ViT-B-32", help="synthetic zoo: ViT-B-32, ViT-B-16 or ViT-L-14")
    p.add_argument("--zoo-tasks", type=int, default=8, help="synthetic zoo: number of fine-tunes")
    p.add_argument("--zoo-layers", type=int, default=2,
                   help="synthetic zoo: transformer blocks (default: %(default)s of ViT-B-32's 12, for a quick run)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    # everything else (--tasks, --zoo, --cache, --rebuild, ...) goes to the accuracy benchmark
    a, rest = p.parse_known_args(argv)
    os.makedirs(a.workdir, exist_ok=True)
    start, times, code = time.perf_counter(), {}, 0
    if not a.skip_synthetic:
        times.update(synthetic_merge(a.workdir, a.zoo_arch, a.zoo_tasks, a.zoo_layers, a.backend, a.device))
    if not a.skip_accuracy:
        from .accuracy.__main__ import main as accuracy_main
        print("\n[2/2] accuracy benchmark: a small ViT fine-tuned on real digit tasks, merged by the paper's methods",
              flush=True)
        begun = time.perf_counter()
        tasks = [] if any(r.startswith("--tasks") for r in rest) else ["--tasks", "8"]  # the 8-task set: quicker
        code = accuracy_main(["--out", os.path.join(a.workdir, "accuracy"), "--paper-methods", *tasks, *rest])
        times["accuracy benchmark"] = time.perf_counter() - begun
    print(f"\ndemo: {time.perf_counter() - start:.0f} s in all (" + ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
          + f"); everything is in {a.workdir}")
    return code
