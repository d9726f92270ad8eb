"""Build the checkpoint zoo once and cache it as safetensors; later runs only read it.

Layout: <cache>/<base fingerprint>/{pretrained.safetensors, heads/<task>.safetensors,
finetuned-<recipe fingerprint>/<task>.safetensors}. The base fingerprint covers what shapes the
pretrained encoder (model, pretraining recipe, split), the recipe fingerprint what shapes the fine-tunes,
so a changed recipe never reads stale checkpoints, and recipes that share a pretraining share it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context

import torch
from tqdm.auto import tqdm

from ..io.safetensors import load_file, save_file
from .data import SPLIT_FRACTIONS, SPLIT_SEED, TASKS, Split, Task
from .model import ViTConfig, encoder_from_state
from .train import PrototypeHead, TrainConfig, build_head, finetune, pretrain

RECIPE_VERSION = 2
PRETRAIN_TASK = Task("digits", "upright digits (pretraining)", lambda x: x, lambda y: y, 10)
PRETRAIN_FIELDS = ("pretrain_epochs", "pretrain_lr", "pretrain_augment", "batch_size", "seed")


@dataclass
class Zoo:
    cfg: ViTConfig
    pretrained: dict[str, torch.Tensor]
    finetuned: dict[str, dict[str, torch.Tensor]]  # task name -> encoder state dict
    heads: dict[str, PrototypeHead]
    folder: str  # the fine-tunes' folder
    built_s: float  # seconds spent training in this run (0 when everything was cached)


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def folders(cache: str, cfg: ViTConfig, train_cfg: TrainConfig) -> tuple[str, str]:
    """(the pretrained encoder's folder, the fine-tunes' folder inside it)."""
    recipe = train_cfg.to_dict()
    pre = {k: recipe[k] for k in PRETRAIN_FIELDS}
    base = os.path.join(os.path.expanduser(cache), _digest({"model": cfg.to_dict(), "pretrain": pre,
                                                             "split": [SPLIT_SEED, SPLIT_FRACTIONS],
                                                             "recipe": RECIPE_VERSION}))
    return base, os.path.join(base, "finetuned-" + _digest({"train": recipe, "recipe": RECIPE_VERSION}))


def _save(tensors: dict[str, torch.Tensor], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)  # an interrupted run never leaves a truncated checkpoint behind


def _finetune_job(cfg: ViTConfig, train_cfg: TrainConfig, train: Split, base: str, out: str, task_name: str) -> None:
    """One fine-tune in a worker process; single-threaded, since small ops gain little from threads and
    threads that must meet at every op stall badly on a busy machine. The result goes straight to the cache."""
    torch.set_num_threads(1)
    task = next(t for t in TASKS if t.name == task_name)
    encoder = encoder_from_state(cfg, load_file(os.path.join(base, "pretrained.safetensors")))
    head = PrototypeHead(load_file(os.path.join(base, "heads", f"{task.name}.safetensors"))["weight"])
    task_seed = 1 + [t.name for t in TASKS].index(task.name)  # independent of which tasks run
    model = finetune(encoder, head, task, train, train_cfg, task_seed)
    _save(model.state_dict(), os.path.join(out, f"{task.name}.safetensors"))


def load_or_build(cache: str, tasks: list[Task], cfg: ViTConfig, train_cfg: TrainConfig, splits: dict[str, Split],
                  rebuild: bool = False, workers: int = 2, log=print, progress: bool | None = None) -> Zoo:
    """Load the zoo, training what is missing: pretraining here, then the fine-tunes `workers` at a time.
    `progress`: bars (None: only on a terminal)."""
    base, folder = folders(cache, cfg, train_cfg)
    if rebuild and os.path.isdir(base):
        shutil.rmtree(base)
    start = time.perf_counter()
    base_path = os.path.join(base, "pretrained.safetensors")
    trained = not os.path.exists(base_path)
    bar = dict(disable=None if progress is None else not progress, dynamic_ncols=True)
    if trained:
        log(f"pretraining the encoder on upright digits ({train_cfg.pretrain_epochs} epochs, "
            f"{train_cfg.pretrain_augment} augmentation)")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the workers: small ops gain little from threads
        with tqdm(total=train_cfg.pretrain_epochs, desc="pretraining", unit="epoch", **bar) as b:
            _save(pretrain(cfg, train_cfg, PRETRAIN_TASK, splits["train"], on_epoch=b.update).state_dict(),
                  base_path)
        torch.set_num_threads(threads)
    encoder = encoder_from_state(cfg, load_file(base_path))
    heads = {}
    for task in tasks:
        head_path = os.path.join(base, "heads", f"{task.name}.safetensors")
        if not os.path.exists(head_path):
            _save({"weight": build_head(encoder, task, splits["train"]).weight}, head_path)
        heads[task.name] = PrototypeHead(load_file(head_path)["weight"])
    missing = [t for t in tasks if not os.path.exists(os.path.join(folder, f"{t.name}.safetensors"))]
    if missing:
        trained = True
        log(f"fine-tuning {len(missing)} tasks, {workers} at a time ({train_cfg.finetune_epochs} epochs each, "
            f"lr {train_cfg.finetune_lr:g}, weights: {train_cfg.finetune_scope})")
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool, \
                tqdm(total=len(missing), desc="fine-tuning", unit="task", **bar) as b:
            for job in as_completed([pool.submit(_finetune_job, cfg, train_cfg, splits["train"], base, folder,
                                                 t.name) for t in missing]):
                job.result()
                b.update()
    finetuned = {t.name: load_file(os.path.join(folder, f"{t.name}.safetensors")) for t in tasks}
    return Zoo(cfg, encoder.state_dict(), finetuned, heads, folder, time.perf_counter() - start if trained else 0.0)
