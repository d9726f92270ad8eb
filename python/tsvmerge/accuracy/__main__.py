"""Accuracy benchmark: a small open_clip-named ViT, pretrained and fine-tuned on real digit tasks
(scikit-learn's handwritten digits), merged by every method; prints the paper-style table.

Checkpoints are cached, so only the first run trains (a few minutes on 2 CPU cores).
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
from .table import render
from .train import TrainConfig
from .checkpoints import load_or_build

FULL = (ViTConfig(), TrainConfig())
# The reduced run of the slow test: a tinier model, a few epochs, 3 tasks (sets of 2 and 3), a coarse grid.
QUICK = (ViTConfig(width=32, layers=2, heads=2, embed_dim=32), TrainConfig(pretrain_epochs=6, finetune_epochs=3))


def parse(argv):
    p = argparse.ArgumentParser(prog="tsvmerge demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=os.path.join("~", ".cache", "tsvmerge", "accuracy"),
                   help="where checkpoints are cached (default: %(default)s)")
    p.add_argument("--out", default="tsvmerge-accuracy", help="folder for the table, JSON and plots")
    p.add_argument("--tasks", type=int, default=len(TASKS), help=f"how many tasks, 2..{len(TASKS)} (first 8 form "
                   "the 8-task set)")
    p.add_argument("--quick", action="store_true", help="reduced run (tiny model, 3 tasks) for tests")
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


def main(argv=None) -> int:
    a = parse(argv)
    target = claim(a.out, folder=True, overwrite=made_here(a.out))      # before minutes of training
    start = time.perf_counter()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg, train_cfg = QUICK if a.quick else FULL
    tasks = list(TASKS[:3 if a.quick else a.tasks])
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    splits = load_splits()
    zoo = load_or_build(a.cache, tasks, cfg, train_cfg, splits, rebuild=a.rebuild, workers=a.workers,
                         log=log)
    log(("trained in" if zoo.built_s else "loaded cached checkpoints from") +
        (f" {zoo.built_s:.0f} s" if zoo.built_s else f" {zoo.folder}"))
    results = benchmark.run(zoo, tasks, splits, grid=(0.5, 1.0, 1.5) if a.quick else benchmark.ALPHA_GRID,
                            first=2 if a.quick else 8, log=log)
    results["config"] = {"model": cfg.to_dict(), "train": train_cfg.to_dict(),
                         "threads": a.threads, "workers": a.workers,
                         "split_sizes": {k: len(v.digits) for k, v in splits.items()},
                         "tasks": {t.name: t.description for t in tasks}}
    with publishing(target) as (folder,):
        figures = plots.write_all(results, zoo, folder)
        results["timing"] = {"train_s": round(zoo.built_s, 1), "merge_and_eval_s": round(results.pop("seconds"), 1),
                             "total_s": round(time.perf_counter() - start, 1)}
        table = render(results)
        write_json(os.path.join(folder, "results.json"), results)
        with open(os.path.join(folder, "table.md"), "w") as f:
            f.write(table)
    print(table)
    t = results["timing"]
    print(f"wrote {os.path.join(a.out, 'table.md')}, results.json and {len(figures)} plots; "
          f"{t['total_s']:.0f} s in all ({t['train_s']:.0f} s training, "
          f"{t['merge_and_eval_s']:.0f} s merging and scoring)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
