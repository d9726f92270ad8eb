"""PEFT LoRA adapters as tasks, never densified on the spectral path (DESIGN section 8).

An adapter folder (`adapter_config.json` and `adapter_model.safetensors` or `.bin`, as
`PeftModel.save_pretrained` writes it) reads as a task vector under the base's names, following
PEFT's own rules (peft/tuners/lora/layer.py, `get_delta_weight`):
- nn.Linear: tau = s B A, with A = `lora_A.weight` [r, in] and B = `lora_B.weight` [out, r];
- Conv1D (GPT-2, `fan_in_fan_out`): tau = s (B A)^T;
- nn.Embedding: tau = s (B A)^T, with `lora_embedding_A` [r, num] and `lora_embedding_B` [dim, r];
- s = lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`; r and alpha per module from
  `rank_pattern` / `alpha_pattern` (PEFT's `get_pattern_key`: the first key that matches the
  module's name as `(.*\\.)?KEY$`);
- tensors stored whole (`modules_to_save`, biases trained with `bias="all"`, an embedding's
  `base_layer` copy that differs from the base) are the fine-tune's values: tau = saved - base;
- every other tensor of the base is a zero task vector.
`factors` gives the exact SVD of a LoRA update from thin QRs of its factors (`lowrank`); only
tensors off the spectral path are ever formed dense (`read`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re

import torch

from ..lowrank import svd_of_product
from .checkpoint import Checkpoint, SafetensorsFile, TorchFile
from .errors import InputError
from .names import prefix_renaming

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
FACTOR_KEYS = {".lora_A.weight": ("linear", "A"), ".lora_B.weight": ("linear", "B"),
               ".lora_embedding_A": ("embedding", "A"), ".lora_embedding_B": ("embedding", "B")}
# LoRA variants whose update is not s B A (or that change the model itself), refused with why.
REFUSED = {
    "use_dora": "DoRA rescales every column of the updated weight by a learned magnitude: its update is not "
                "low-rank",
    "lora_bias": "it trains a bias on lora_B as well",
    "target_parameters": "it adapts parameters (target_parameters), not modules",
    "trainable_token_indices": "it trains single token embeddings beside the LoRA",
    "alora_invocation_tokens": "an activated LoRA acts only after its invocation tokens: it is not a weight update",
    "layer_replication": "it replicates layers of the base model",
    "use_bdlora": "block-diagonal LoRA", "use_qalora": "QA-LoRA", "velora_config": "VeLoRA",
    "kasa_config": "KaSA", "arrow_config": "Arrow routing", "monteclora_config": "MonteCLoRA",
    "megatron_config": "Megatron-parallel layers",
}
MERGE_FIRST = ("merge it into the model first (PeftModel.merge_and_unload, then save_pretrained) and pass the "
               "merged model as a fine-tune")


def is_adapter(src) -> bool:
    return isinstance(src, (str, os.PathLike)) and os.path.isfile(os.path.join(src, CONFIG_NAME))


def pattern_key(keys, module: str) -> str | None:
    """PEFT's `get_pattern_key`: the first key that matches the module's name, or None."""
    return next((k for k in keys if re.match(rf"(.*\.)?({k})$", module)), None)


def module_rank_alpha(config: dict, module: str) -> tuple[int, float]:
    """The rank and lora_alpha PEFT gives `module` (its name in the model PEFT wrapped)."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r_key, a_key = pattern_key(ranks, module), pattern_key(alphas, module)
    return (ranks[r_key] if r_key is not None else config["r"],
            alphas[a_key] if a_key is not None else config["lora_alpha"])


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_NAME)
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(path, None, f"not a readable adapter config ({e})") from None
    if not isinstance(config, dict):
        raise InputError(path, None, "not a JSON object")
    if config.get("peft_type") != "LORA":
        raise InputError(folder, None, f"is a PEFT {config.get('peft_type')} adapter: tsvmerge reads LoRA adapters")
    for field, why in REFUSED.items():
        if config.get(field):
            raise InputError(folder, None, f"is a LoRA adapter with {field}={config[field]!r}: {why}, which "
                             f"tsvmerge does not read; {MERGE_FIRST}")
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), (int, float)) or config[field] <= 0:
            raise InputError(path, None, f"{field} must be a positive number, got {config.get(field)!r}")
    return config


def _open_weights(folder: str, trust_pickle: bool) -> Checkpoint:
    for name in WEIGHT_NAMES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return SafetensorsFile(path) if name.endswith(".safetensors") else TorchFile(path, trust_pickle)
    raise InputError(folder, None, f"has {CONFIG_NAME} but no {' or '.join(WEIGHT_NAMES)}")


class LoraModule:
    """One adapted module: tau = scale * left @ right^T, in the base's layout of the weight."""

    def __init__(self, name: str, kind: str, a_key: str, b_key: str, rank: int, scale: float, transposed: bool):
        self.name, self.kind, self.a_key, self.b_key = name, kind, a_key, b_key
        self.rank, self.scale, self.transposed = rank, scale, transposed

    @property
    def layout(self) -> str:
        """PEFT's layer type: 'linear', 'conv1d' (weight [in, out]) or 'embedding'."""
        return "embedding" if self.kind == "embedding" else "conv1d" if self.transposed else "linear"

    def factors(self, store: Checkpoint, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(left [m, r], right [n, r]) with tau = scale * left @ right^T."""
        a, b = store.read(self.a_key).to(dtype), store.read(self.b_key).to(dtype)
        return (a.T, b) if self.transposed else (b, a.T)


class LoraAdapter(Checkpoint):
    """A PEFT LoRA adapter folder read as a task vector of `base` (see the module's docstring)."""

    is_delta = True

    def __init__(self, folder: str, base: Checkpoint, trust_pickle: bool = False):
        self.source, self.base = os.fspath(folder), base
        self.config = _read_config(self.source)
        self.store = _open_weights(self.source, trust_pickle)
        self._base_infos = base.infos()
        modules, whole = self._parse(self.store.infos())
        whole = self._rename(modules, whole)
        self.modules = {m.name: m for m in modules}
        self.whole = {name: key for name, key in whole.items() if not self._is_base_copy(name, key)}
        self.notes = self._describe()
        self.store.release()

    # -- reading the file ------------------------------------------------------------------
    def _parse(self, stored: dict) -> tuple[list, dict]:
        """The LoRA modules (module key -> A and B keys, kind) and the tensors stored whole."""
        pairs, whole = {}, {}
        for key in stored:
            bare = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            suffix = next((s for s in FACTOR_KEYS if bare.endswith(s)), None)
            if suffix is not None:
                kind, side = FACTOR_KEYS[suffix]
                pairs.setdefault(bare[:-len(suffix)], {"kind": kind})[side] = key
            elif ".lora_" in bare or "token_adapter" in bare:
                raise InputError(self.source, key, f"a tensor of a LoRA variant tsvmerge does not read; {MERGE_FIRST}")
            else:  # modules_to_save, trained biases, a copy of an embedding's base layer
                whole[bare.replace(".base_layer.", ".")] = key
        modules = []
        for module, p in pairs.items():
            for side in "AB":
                if side not in p:
                    raise InputError(self.source, p["B" if side == "A" else "A"], f"its lora_{side} is missing")
            modules.append(self._module(module, p["kind"], p["A"], p["B"], stored))
        return modules, whole

    def _module(self, module: str, kind: str, a_key: str, b_key: str, stored: dict) -> LoraModule:
        a, b = stored[a_key].shape, stored[b_key].shape
        if len(a) != 2 or len(b) != 2:
            raise InputError(self.source, a_key, f"a LoRA of a convolution (factors {list(a)} and {list(b)}): "
                             f"tsvmerge reads LoRA on linear and embedding layers; {MERGE_FIRST}")
        if a[0] != b[1]:
            raise InputError(self.source, a_key, f"lora_A {list(a)} and lora_B {list(b)} do not share a rank")
        r, alpha = module_rank_alpha(self.config, module)
        if a[0] != r:
            raise InputError(self.source, a_key, f"has rank {a[0]} but {CONFIG_NAME} gives module {module} rank {r}")
        scale = alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r
        # An embedding's update is (B A)^T; a Conv1D's too (fan_in_fan_out): its weight is [in, out].
        transposed = kind == "embedding" or bool(self.config.get("fan_in_fan_out"))
        return LoraModule(module + ".weight", kind, a_key, b_key, r, scale, transposed)

    def _rename(self, modules: list, whole: dict) -> dict:
        """Read names as PEFT maps them onto the model; under the base's where wrapper prefixes
        differ (`names.prefix_renaming`): the modules renamed in place, `whole` returned renamed.
        Each module's layout is checked against the base's shape."""
        ours = set(self._base_infos)
        theirs = [m.name for m in modules] + list(whole)
        renaming = None if set(theirs) <= ours else prefix_renaming(theirs, ours)
        if renaming is not None:
            to_base = {old: new for new, old in renaming[0].items()}
            for m in modules:
                m.name = to_base[m.name]
            whole = {to_base[name]: key for name, key in whole.items()}
            self.notes = [f"names read under the base's: {renaming[1]}"]
        for name, key in [(m.name, m.a_key) for m in modules] + [(n, k) for n, k in whole.items()]:
            if name not in ours:
                raise InputError(self.source, key, f"adapts {name}, which the base {self.base.source} does not have")
        stored = self.store.infos()
        for m in modules:
            self._check_layout(m, stored)
        return whole

    def _check_layout(self, m: LoraModule, stored: dict) -> None:
        a, b = stored[m.a_key].shape, stored[m.b_key].shape
        want = self._base_infos[m.name].shape
        if len(want) != 2:
            raise InputError(self.source, m.a_key, f"adapts {m.name} of shape {list(want)}, not a matrix")
        shape = lambda transposed: (a[1], b[0]) if transposed else (b[0], a[1])  # noqa: E731
        if shape(m.transposed) != want:
            if m.kind == "linear" and shape(not m.transposed) == want:
                m.transposed = not m.transposed   # PEFT sets fan_in_fan_out by the module's type
            else:
                raise InputError(self.source, m.a_key, f"lora_A {list(a)} and lora_B {list(b)} do not make an "
                                 f"update of {m.name}'s shape {list(want)}")

    def _is_base_copy(self, name: str, key: str) -> bool:
        """PEFT saves an adapted embedding's whole base layer beside its LoRA: a copy of the base's,
        unless the vocabulary was resized. A copy carries no task vector."""
        return ".base_layer." in key and torch.equal(self.store.read(key), self.base.read(name))

    def _describe(self) -> list[str]:
        ranks = sorted({m.rank for m in self.modules.values()})
        scales = sorted({round(m.scale, 6) for m in self.modules.values()})
        notes = list(self.notes)
        notes.append(f"a PEFT LoRA adapter{' (rsLoRA)' if self.config.get('use_rslora') else ''}, "
                     f"rank {'/'.join(map(str, ranks)) or '-'}, scale {'/'.join(map(str, scales)) or '-'}, on "
                     f"{len(self.modules)} tensors: {summarize(self.modules) or 'none'}; every other tensor is a zero "
                     "task vector")
        if self.whole:
            notes.append(f"{len(self.whole)} tensors stored whole (modules_to_save, trained biases), read as the "
                         f"fine-tune's: {summarize(self.whole)}")
        return notes

    @property
    def touches(self) -> list[str]:
        """The base tensors this adapter changes."""
        return sorted(set(self.modules) | set(self.whole))

    # -- the Checkpoint interface --------------------------------------------------------------
    def infos(self):
        return self._base_infos

    def factors(self, name):
        """The exact SVD (u [m, c], s [c], v [n, c]) in fp64 of the tensor's task vector where it
        is low-rank: the LoRA's (c = its rank), or rank 0 where the adapter leaves a matrix alone;
        None where it is stored whole or is not a floating matrix."""
        info = self._base_infos[name]
        if name in self.whole or len(info.shape) != 2 or not info.dtype.is_floating_point:
            return None
        m = self.modules.get(name)
        if m is None:
            rows, cols = info.shape
            return torch.zeros(rows, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), \
                torch.zeros(cols, 0, dtype=torch.float64)
        left, right = m.factors(self.store, torch.float64)
        return svd_of_product(left, torch.full((m.rank,), m.scale, dtype=torch.float64), right)

    def read(self, name):
        """The task vector, dense (the tensors off the spectral path), in fp64: a stored whole
        tensor minus the base's is then exact, whatever the compute dtype."""
        info = self._base_infos[name]
        if not info.dtype.is_floating_point:
            return torch.zeros(info.shape, dtype=info.dtype)
        tau = torch.zeros(info.shape, dtype=torch.float64)
        if name in self.whole:
            tau = self.store.read(self.whole[name]).double() - self.base.read(name).double()
        m = self.modules.get(name)
        if m is not None:
            left, right = m.factors(self.store, torch.float64)
            tau += m.scale * (left @ right.T)
        return tau

    def release(self):
        self.store.release()

    def fingerprint(self) -> str:
        """The config and the stored tensors' fingerprint: never the dense task vectors."""
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
            h.update(self.store.fingerprint().encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


def lora_layouts(tasks) -> dict[str, str]:
    """Weight name -> PEFT layer type ('linear', 'conv1d', 'embedding'), as the LoRA adapters
    among `tasks` adapt them (the first that does)."""
    out = {}
    for task in tasks:
        if isinstance(task, LoraAdapter):
            for m in task.modules.values():
                out.setdefault(m.name, m.layout)
    return out


def summarize(names) -> str:
    """Names with their layer numbers folded: 'model.layers.*.self_attn.q_proj.weight (8), ...'."""
    counts: dict = {}
    for name in names:
        pattern = re.sub(r"\.\d+\.", ".*.", name)
        counts[pattern] = counts.get(pattern, 0) + 1
    return ", ".join(f"{p} ({n})" if n > 1 else p for p, n in counts.items())
