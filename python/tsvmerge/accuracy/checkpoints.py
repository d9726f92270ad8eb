"""Build the checkpoint zoo once and cache it as safetensors; later runs only read it.

Layout: <cache>/<fingerprint>/{pretrained.safetensors, heads/<task>.safetensors, finetuned/<task>.safetensors}.
The fingerprint covers everything that shapes the weights (model, recipe, split), so a changed
recipe never reads stale checkpoints, and quick and full runs live side by side.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from multiprocessing import get_context

import torch

from ..io.safetensors import load_file, save_file
from .data import SPLIT_FRACTIONS, SPLIT_SEED, TASKS, Split, Task
from .model import ViTConfig, encoder_from_state
from .train import PrototypeHead, TrainConfig, build_head, finetune, pretrain

RECIPE_VERSION = 1
PRETRAIN_TASK = Task("digits", "upright digits (pretraining)", lambda x: x, lambda y: y, 10)


@dataclass
class Zoo:
    cfg: ViTConfig
    pretrained: dict[str, torch.Tensor]
    finetuned: dict[str, dict[str, torch.Tensor]]  # task name -> encoder state dict
    heads: dict[str, PrototypeHead]
    folder: str
    built_s: float  # seconds spent training in this run (0 when everything was cached)


def fingerprint(cfg: ViTConfig, train_cfg: TrainConfig) -> str:
    key = {"model": cfg.to_dict(), "train": train_cfg.to_dict(), "split": [SPLIT_SEED, SPLIT_FRACTIONS],
           "recipe": RECIPE_VERSION}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _save(tensors: dict[str, torch.Tensor], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)  # an interrupted run never leaves a truncated checkpoint behind


def _train_job(job: str, cfg: ViTConfig, train_cfg: TrainConfig, train: Split, folder: str,
               task_name: str = "") -> None:
    """One training job in a worker process; single-threaded, since small ops gain little from threads and
    threads that must meet at every op stall badly on a busy machine. Results go straight to the cache."""
    torch.set_num_threads(1)
    if job == "pretrain":
        base = pretrain(cfg, train_cfg, PRETRAIN_TASK, train)
        _save(base.state_dict(), os.path.join(folder, "pretrained.safetensors"))
        return
    task = next(t for t in TASKS if t.name == task_name)
    base = encoder_from_state(cfg, load_file(os.path.join(folder, "pretrained.safetensors")))
    head = PrototypeHead(load_file(os.path.join(folder, "heads", f"{task.name}.safetensors"))["weight"])
    task_seed = 1 + [t.name for t in TASKS].index(task.name)  # independent of which tasks run
    model = finetune(base, head, task, train, train_cfg, task_seed)
    _save(model.state_dict(), os.path.join(folder, "finetuned", f"{task.name}.safetensors"))


def load_or_build(cache: str, tasks: list[Task], cfg: ViTConfig, train_cfg: TrainConfig, splits: dict[str, Split],
                  rebuild: bool = False, workers: int = 2, log=print) -> Zoo:
    """Load the zoo, training what is missing: pretraining first, then the fine-tunes `workers` at a time."""
    folder = os.path.join(os.path.expanduser(cache), fingerprint(cfg, train_cfg))
    if rebuild and os.path.isdir(folder):
        shutil.rmtree(folder)
    start = time.perf_counter()
    base_path = os.path.join(folder, "pretrained.safetensors")
    missing = [t for t in tasks if not os.path.exists(os.path.join(folder, "finetuned", f"{t.name}.safetensors"))]
    trained = not os.path.exists(base_path) or bool(missing)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) if trained else nullcontext() as pool:
        if not os.path.exists(base_path):
            log(f"pretraining the encoder on upright digits ({train_cfg.pretrain_epochs} epochs)...")
            pool.submit(_train_job, "pretrain", cfg, train_cfg, splits["train"], folder).result()
        base = encoder_from_state(cfg, load_file(base_path))
        heads = {}
        for task in tasks:
            head_path = os.path.join(folder, "heads", f"{task.name}.safetensors")
            if not os.path.exists(head_path):
                _save({"weight": build_head(base, task, splits["train"]).weight}, head_path)
            heads[task.name] = PrototypeHead(load_file(head_path)["weight"])
        if missing:
            log(f"fine-tuning {len(missing)} tasks, {workers} at a time ({train_cfg.finetune_epochs} epochs each): "
                + ", ".join(t.name for t in missing))
            for job in [pool.submit(_train_job, "finetune", cfg, train_cfg, splits["train"], folder, t.name)
                        for t in missing]:
                job.result()
    finetuned = {t.name: load_file(os.path.join(folder, "finetuned", f"{t.name}.safetensors")) for t in tasks}
    return Zoo(cfg, base.state_dict(), finetuned, heads, folder, time.perf_counter() - start if trained else 0.0)
