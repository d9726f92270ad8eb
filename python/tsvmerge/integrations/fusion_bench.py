"""tsvmerge's TSV-M, TSV-C and STI as FusionBench algorithms.

    fusion_bench --config-dir $(tsvmerge config-dir fusion_bench) method=tsvmerge modelpool=... taskpool=...

The pool's fine-tuned models are never all in memory: each is read by tsvmerge from its
checkpoint when the pool names a local one that holds exactly the model's tensors, and
otherwise loaded by the pool, saved to a temporary file and dropped, one at a time. The
pretrained model is loaded once and is what `TSVMerge` returns, with the merged weights
copied in.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import tempfile

import torch
from fusion_bench import BaseAlgorithm

import tsvmerge
from tsvmerge.io import InputError, open_checkpoint

log = logging.getLogger(__name__)

# The batch budget when none is given (tsvmerge's own default is 1 GiB): the merge's peak
# memory is a few batch budgets, and a FusionBench run holds the pretrained model beside it.
# ViT-B/32 x 8 from disk (benchmarks/peers.py --parts pool): added peak RSS 0.44 GB, 3.4 GB at 1 GiB.
BATCH_BYTES = 64 << 20


def holds_tensors(path: str, reference: dict) -> bool:
    """Whether the checkpoint at `path` holds exactly `reference`'s names, shapes and dtypes."""
    try:
        infos = open_checkpoint(path).infos()
    except (InputError, OSError, ValueError):
        return False
    return set(infos) == set(reference) and all(
        tuple(infos[n].shape) == tuple(t.shape) and infos[n].dtype == t.dtype for n, t in reference.items())


def _local_path(modelpool, name: str) -> str | None:
    config = modelpool.get_model_config(name, return_copy=False)
    return config if isinstance(config, str) and os.path.exists(config) else None


def stage_models(modelpool, names, reference: dict, folder: str) -> list:
    """A checkpoint path per model: its own when it holds `reference`'s tensors, else the
    model as the pool loads it, saved into `folder` (one model in memory at a time)."""
    paths = []
    for i, name in enumerate(names):
        path = _local_path(modelpool, name)
        if path is None or not holds_tensors(path, reference):
            model = modelpool.load_model(name)
            path = os.path.join(folder, f"model_{i:03d}.pt")
            torch.save(model.state_dict(), path)
            del model
            log.info("tsvmerge: %s staged to %s", name, path)
        paths.append(path)
    return paths


class _PoolAlgorithm(BaseAlgorithm):
    """The options every tsvmerge algorithm takes, and the staging of a pool."""

    def __init__(self, exclude_keys=None, preset=None, backend: str = "auto", device=None,
                 compute_dtype: str = "float32", seed: int = 0, batch_bytes=None, svd=None, power_iters=None,
                 oversample=None, energy_target=None, max_passes=None, workdir=None, **kwargs):
        self.exclude_keys = list(exclude_keys or [])
        self.preset = preset
        self.backend = backend
        self.device = device
        self.compute_dtype = compute_dtype
        self.seed = seed
        self.batch_bytes = BATCH_BYTES if batch_bytes is None else batch_bytes
        self.svd, self.power_iters, self.oversample = svd, power_iters, oversample
        self.energy_target, self.max_passes = energy_target, max_passes
        self.workdir = workdir
        super().__init__(**kwargs)

    def engine_options(self) -> dict:
        """Keyword arguments for tsvmerge.merge / compress / interference."""
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        options = {"exclude": self.exclude_keys, "preset": self.preset, "backend": self.backend, "device": device,
                   "compute_dtype": self.compute_dtype, "seed": self.seed, "batch_bytes": self.batch_bytes,
                   "svd": self.svd, "power_iters": self.power_iters, "oversample": self.oversample,
                   "energy_target": self.energy_target, "max_passes": self.max_passes}
        return {k: v for k, v in options.items() if v is not None}

    @contextlib.contextmanager
    def staged(self, modelpool):
        """(pretrained model, its state dict, the base to merge from, fine-tuned checkpoint
        paths, a temporary folder). The base is the pretrained checkpoint's path when it holds
        exactly the model's tensors: read from the file, a batch at a time, the model's own
        (memory-mapped) weights are not paged in by the merge."""
        pretrained = modelpool.load_pretrained_model()
        reference = pretrained.state_dict()
        path = _local_path(modelpool, "_pretrained_")
        base = path if path is not None and holds_tensors(path, reference) else reference
        with tempfile.TemporaryDirectory(prefix="tsvmerge-", dir=self.workdir) as folder:
            tasks = stage_models(modelpool, modelpool.model_names, reference, folder)
            yield pretrained, reference, base, tasks, folder


class TSVMerge(_PoolAlgorithm):
    """TSV-M (`method="tsv"`): returns the pretrained model with the merged weights.

    `alpha` scales the merged update, or is a list with one weight per task that scales each task
    vector before the merge (as FusionBench's TSV-M); `k` the per-task rank (default floor(r/T));
    `orthogonalize` "procrustes" or "whiten"; `exclude_keys` tensor names or patterns kept
    off the spectral path (FusionBench's key); the rest as `tsvmerge.merge`.
    """

    def __init__(self, alpha: float = 1.0, k=None, orthogonalize: str = "procrustes", **kwargs):
        self.alpha = float(alpha) if isinstance(alpha, (int, float)) else [float(a) for a in alpha]
        self.k, self.orthogonalize = k, orthogonalize
        super().__init__(**kwargs)

    def run(self, modelpool):
        with self.staged(modelpool) as (pretrained, state, base, tasks, folder):
            options = {"k": self.k} if self.k is not None else {}
            merged_dir = os.path.join(folder, "merged")
            report = tsvmerge.merge(base, tasks, method="tsv", alpha=self.alpha, orthogonalize=self.orthogonalize,
                                    out=merged_dir, **options, **self.engine_options())
            merged = open_checkpoint(merged_dir)
            with torch.no_grad():
                for name, tensor in state.items():
                    tensor.copy_(merged.read(name))
        s = report["summary"]
        log.info("tsvmerge: merged %d tensors (%d spectral) on %s in %.2f s", s["tensors"], s["spectral"],
                 report["backend"]["backend"], s["wall_s"])
        return pretrained


class TSVCompress(_PoolAlgorithm):
    """TSV-C: each fine-tuned model rebuilt from its top-`rank` factors (a fraction of
    min(m, n), or an absolute rank). Returns {model name: rebuilt model}; with `out_dir`,
    also writes each compressed task there as NAME.tsvc.safetensors."""

    def __init__(self, rank=0.1, out_dir=None, backend: str = "reference", **kwargs):
        self.rank, self.out_dir = rank, out_dir
        super().__init__(backend=backend, **kwargs)

    def run(self, modelpool):
        models = {}
        with self.staged(modelpool) as (pretrained, _, base, tasks, folder):
            for name, task in zip(modelpool.model_names, tasks):
                out = os.path.join(self.out_dir or folder, f"{name}.tsvc.safetensors")
                if self.out_dir:
                    os.makedirs(self.out_dir, exist_ok=True)
                tsvmerge.compress(base, task, rank=self.rank, out=out, **self.engine_options())
                model = copy.deepcopy(pretrained)
                model.load_state_dict(tsvmerge.decompress(base, out))
                models[name] = model
        return models


class TSVInterference(_PoolAlgorithm):
    """STI per tensor and the task-pair overlaps, written to `output_dir` (default: the run's
    log folder) as tsvmerge_sti.json; returns the pretrained model, as FusionBench's analyses do."""

    def __init__(self, k=None, output_dir=None, **kwargs):
        self.k, self.output_dir = k, output_dir
        super().__init__(**kwargs)

    def run(self, modelpool):
        with self.staged(modelpool) as (pretrained, _, base, tasks, _):
            report = tsvmerge.interference(base, tasks, k=self.k, **self.engine_options())
        report["models"] = list(modelpool.model_names)
        folder = self.output_dir or getattr(self._program, "log_dir", None) or os.getcwd()
        path = os.path.join(folder, "tsvmerge_sti.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        top = sorted(report["tensors"].items(), key=lambda kv: -kv[1]["sti"])[:5]
        log.info("tsvmerge: STI -> %s; highest: %s", path, ", ".join(f"{n} {e['sti']:.4g}" for n, e in top))
        return pretrained
