"""Accuracy benchmark: a small open_clip-named ViT, pretrained and fine-tuned on real digit tasks
(scikit-learn's handwritten digits), merged by every method; prints the paper-style table.

Checkpoints are cached, so only the first run trains (about a minute per zoo on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from ..io import claim, publishing, write_json
from . import benchmark, plots
from .data import TASKS, load_splits
from .model import ViTConfig
from .table import render, story, summary_table
from .train import TrainConfig
from .checkpoints import load_or_build

# The zoos, by name. "paper": in the TSV paper's regime (small, low-rank task vectors: TSV-C keeps >= 98%),
# the cheapest recipe of benchmarks/accuracy/sweep.py that meets it; "hard": the first zoo, full fine-tuning at
# lr 1e-3 for 20 epochs (large task vectors, no spectral gap at k); "quick": the slow test's tiny run.
ZOOS = {
    "paper": (ViTConfig(width=128), TrainConfig(pretrain_epochs=15, finetune_lr=3e-4, finetune_epochs=5)),
    "hard": (ViTConfig(), TrainConfig()),
    "quick": (ViTConfig(width=32, layers=2, heads=2, embed_dim=32), TrainConfig(pretrain_epochs=6, finetune_epochs=3)),
}


def parse(argv):
    p = argparse.ArgumentParser(prog="tsvmerge demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=os.path.join("~", ".cache", "tsvmerge", "accuracy"),
                   help="where checkpoints are cached (default: %(default)s)")
    p.add_argument("--out", default="tsvmerge-accuracy", help="folder for the table, JSON and plots")
    p.add_argument("--tasks", type=int, default=len(TASKS), help=f"how many tasks, 2..{len(TASKS)} (first 8 form "
                   "the 8-task set; the quick zoo takes 3)")
    p.add_argument("--zoo", nargs="+", choices=sorted(ZOOS), default=["paper"],
                   help="which zoos: paper (the paper's regime, default), hard (large task vectors), quick (tiny, "
                   "3 tasks, for tests); one table column per zoo")
    p.add_argument("--tune-alpha", action="store_true", help="add rows with alpha chosen on validation")
    p.add_argument("--paper-methods", action="store_true",
                   help="only the paper's table's methods (averaging, task arithmetic, TIES, TSV-M): not Iso-C, "
                   "Iso-CTS, DARE-TIES and the consensus merges")
    p.add_argument("--rebuild", action="store_true", help="retrain even if cached checkpoints exist")
    p.add_argument("--workers", type=int, default=2, help="training processes, one thread each (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for merging and scoring (default: %(default)s; on a busy 2-core machine "
                   "two threads made small SVDs ~80x slower)")
    a = p.parse_args(argv)
    if not 2 <= a.tasks <= len(TASKS):
        p.error(f"--tasks must be between 2 and {len(TASKS)}")
    return a


def made_here(folder: str) -> bool:
    """A results folder this benchmark wrote (its files, and its results.json): a re-run may
    replace it, and nothing else."""
    try:
        files = os.listdir(folder)
        with open(os.path.join(folder, "results.json")) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return False
    ours = all(f in ("results.json", "table.md") or f.endswith(".png") for f in files)
    return ours and isinstance(results, dict) and {"config", "timing"} <= set(results)


def _zoo_results(name: str, a, splits, log) -> tuple[dict, object]:
    cfg, train_cfg = ZOOS[name]
    tasks = list(TASKS[:3 if name == "quick" else a.tasks])
    zoo = load_or_build(a.cache, tasks, cfg, train_cfg, splits, rebuild=a.rebuild, workers=a.workers, log=log)
    log(f"{name} zoo: " + (f"trained in {zoo.built_s:.0f} s" if zoo.built_s else f"cached checkpoints in {zoo.folder}"))
    quick = name == "quick"
    results = benchmark.run(zoo, tasks, splits, grid=(0.5, 1.0, 1.5) if quick else benchmark.ALPHA_GRID,
                            first=2 if quick else 8, tune=a.tune_alpha,
                            followers=not a.paper_methods, log=log)
    results["config"] = {"model": cfg.to_dict(), "train": train_cfg.to_dict(),
                         "tasks": {t.name: t.description for t in tasks}}
    results["timing"] = {"train_s": round(zoo.built_s, 1), "merge_and_eval_s": round(results.pop("seconds"), 1)}
    return results, zoo


def main(argv=None) -> int:
    a = parse(argv)
    target = claim(a.out, folder=True, overwrite=made_here(a.out))      # before minutes of training
    start = time.perf_counter()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    splits = load_splits()
    zoos, built = {}, {}
    for name in dict.fromkeys(a.zoo):
        zoos[name], built[name] = _zoo_results(name, a, splits, log)
    results = {"zoos": zoos, "config": {"threads": a.threads, "workers": a.workers,
                                        "split_sizes": {k: len(v.digits) for k, v in splits.items()}}}
    with publishing(target) as (folder,):
        plot_start = time.perf_counter()
        figures = [f for name in zoos for f in plots.write_all(zoos[name], built[name], folder, prefix=name)]
        results["timing"] = {"train_s": round(sum(z["timing"]["train_s"] for z in zoos.values()), 1),
                             "merge_and_eval_s": round(sum(z["timing"]["merge_and_eval_s"] for z in zoos.values()), 1),
                             "plots_s": round(time.perf_counter() - plot_start, 1),
                             "total_s": round(time.perf_counter() - start, 1)}
        table = render(results)
        write_json(os.path.join(folder, "results.json"), results)
        with open(os.path.join(folder, "table.md"), "w") as f:
            f.write(table)
    print("\n" + summary_table(results) + "\n")
    print("\n".join(story(results)))
    t = results["timing"]
    print(f"files: {os.path.join(a.out, 'table.md')} (per-task tables), results.json and {len(figures)} plots "
          f"({', '.join(os.path.basename(f) for f in figures[:3])}, ...) in {a.out}")
    print(f"time: {t['total_s']:.0f} s ({t['train_s']:.0f} s training, {t['merge_and_eval_s']:.0f} s merging and "
          f"scoring, {t['plots_s']:.0f} s plots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
