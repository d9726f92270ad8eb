"""A merged update written as a PEFT LoRA adapter folder (DESIGN section 8).

Each changed matrix Delta = U diag(s) V^T becomes a LoRA of Delta's exact rank c (an SVD from
thin QRs of the factors, `lowrank`; rank 0: not a target): for an nn.Linear weight [out, in],
B = U diag(s) and A = V^T; for Conv1D (fan_in_fan_out) and embedding weights, whose update is
(B A)^T, A = (U diag(s))^T and B = V. `lora_alpha` equals each module's rank (`alpha_pattern`
beside `rank_pattern`), so PEFT's scale is 1. Anything else that changes cannot be a LoRA and is
refused, naming the tensor; nothing is published then (`io.publish`).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from collections import Counter

import torch

from ..lowrank import rank_tolerance, svd_of_product
from .lora import CONFIG_NAME, PEFT_PREFIX, module_rank_alpha
from .publish import Output, publishing
from .safetensors import save_file

WEIGHTS_NAME = "adapter_model.safetensors"
NOT_A_LORA = "a LoRA adapter holds low-rank updates of module weights only; write a model instead (the default " \
             "output format)"


class AdapterWriter:
    """Collects each module's LoRA factors (small: rank x (m + n)) and writes the folder on close."""

    def __init__(self, folder: str, layouts: dict[str, str], base_model: str | None):
        self.folder, self.layouts, self.base_model = folder, layouts, base_model
        self.tensors, self.ranks, self.kinds, self.assumed = {}, {}, {}, []

    def write(self, name: str, update, dtype: torch.dtype) -> None:
        """`update` of one tensor: (u [m, K], s [K], v [n, K]) with Delta = u diag(s) v^T, a dense
        Delta, or None (a tensor that is copied)."""
        if update is None:
            return
        if isinstance(update, torch.Tensor):
            if bool(update.ne(0).any()):
                raise ValueError(f"output format peft: {name} changes, and it is not a matrix on the spectral path: "
                                 f"{NOT_A_LORA}")
            return
        u, s, v = (x.double() for x in update)
        u, s, v = svd_of_product(u, s, v)
        c = int((s > rank_tolerance(s, u.shape[0], v.shape[0])).sum())
        if c == 0:
            return
        if not name.endswith(".weight"):
            raise ValueError(f"output format peft: {name} changes, and it is not a module's weight: {NOT_A_LORA}")
        module, layout = name[:-len(".weight")], self.layouts.get(name)
        if layout is None:
            layout = "linear"
            self.assumed.append(module)
        us, vt = (u[:, :c] * s[:c]).to(dtype), v[:, :c].T.to(dtype)
        key = PEFT_PREFIX + module
        if layout == "embedding":
            self.tensors.update({key + ".lora_embedding_A": us.T.contiguous(), key + ".lora_embedding_B": vt.T.contiguous()})
        elif layout == "conv1d":
            self.tensors.update({key + ".lora_A.weight": us.T.contiguous(), key + ".lora_B.weight": vt.T.contiguous()})
        else:
            self.tensors.update({key + ".lora_A.weight": vt.contiguous(), key + ".lora_B.weight": us.contiguous()})
        self.ranks[module], self.kinds[module] = c, layout

    def summary(self) -> dict:
        """For the report: each module's rank, and the modules whose layer type no input adapter
        gave (written as nn.Linear, weight [out, in])."""
        return {"ranks": dict(self.ranks), **({"assumed_linear": self.assumed} if self.assumed else {})}

    def config(self) -> dict:
        """adapter_config.json: every module by its full name, the commonest rank as `r` and the
        others in `rank_pattern`, as keys anchored to the whole name where a plain one would also
        match another module under PEFT's rule (checked with `lora.module_rank_alpha`)."""
        r = Counter(self.ranks.values()).most_common(1)[0][0] if self.ranks else 1
        other = {m: c for m, c in self.ranks.items() if c != r}
        for keys in (other, {"^" + re.escape(m): c for m, c in other.items()}):
            config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": self.base_model,
                      "r": r, "lora_alpha": r, "rank_pattern": keys, "alpha_pattern": dict(keys),
                      "target_modules": sorted(self.ranks), "fan_in_fan_out": "conv1d" in self.kinds.values(),
                      "use_rslora": False, "use_dora": False, "bias": "none", "lora_dropout": 0.0,
                      "modules_to_save": None, "init_lora_weights": True, "inference_mode": True}
            if all(module_rank_alpha(config, m) == (c, c) for m, c in self.ranks.items()):
                return config
        raise AssertionError("anchored rank_pattern keys match only their own module")  # by construction

    def close(self) -> None:
        save_file(self.tensors, os.path.join(self.folder, WEIGHTS_NAME), {"format": "pt"})
        with open(os.path.join(self.folder, CONFIG_NAME), "w") as f:
            json.dump(self.config(), f, indent=2)


@contextlib.contextmanager
def adapter_writer(target: Output, layouts: dict[str, str], base_model: str | None = None,
                   also: tuple[Output | None, ...] = ()):
    """A PEFT adapter folder published at `target` when the block succeeds, together with the
    outputs `also` (a report file; their temporary paths in `writer.also`), all or none.
    `layouts` maps weight names to 'linear' (the default), 'conv1d' or 'embedding'."""
    with publishing(target, *also) as (folder, *others):
        writer = AdapterWriter(folder, layouts, base_model)
        writer.also = others
        yield writer
        writer.close()
