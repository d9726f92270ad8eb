"""The TSV-C file layout, defined once: `tsvc.compress` writes it, `CompressedTask` reads it.

A TSV-C file is a safetensors file holding one task vector tau = theta_i - theta_0:
- a factored tensor NAME (m x n) as NAME.tsvc_u [m, k], NAME.tsvc_s [k], NAME.tsvc_v [n, k],
  tau ~= u diag(s) v^T, one floating dtype;
- every other floating tensor as NAME, its task vector, dense;
- every non-floating tensor (int buffers) as NAME, the fine-tune's own value;
- metadata: format, tsvmerge_version, rank (as asked), spectral (JSON: factored name -> [m, n])
  and base_fingerprint (the base it was made against; required: merging or decompressing
  against another base would be silently wrong).
"""
from __future__ import annotations

import json
import re

import torch

from .. import primitives as P
from .checkpoint import Checkpoint
from .errors import InputError
from .safetensors import TensorInfo

FORMAT = "tsvmerge.tsvc"
FACTOR_SUFFIXES = (".tsvc_u", ".tsvc_s", ".tsvc_v")
_FINGERPRINT = re.compile(r"[0-9a-f]{16}")


def factor_names(name: str) -> tuple[str, str, str]:
    return tuple(name + suffix for suffix in FACTOR_SUFFIXES)


def factor_infos(shape: tuple, k: int, dtype: torch.dtype) -> tuple[TensorInfo, TensorInfo, TensorInfo]:
    m, n = shape
    return TensorInfo((m, k), dtype), TensorInfo((k,), dtype), TensorInfo((n, k), dtype)


def layout(tensors: dict[str, tuple[TensorInfo, int]]) -> dict[str, TensorInfo]:
    """What the file stores for {name: (the task's info, kept rank; 0 = dense)}."""
    out = {}
    for name, (info, k) in tensors.items():
        if k:
            out.update(zip(factor_names(name), factor_infos(info.shape, k, info.dtype)))
        else:
            out[name] = info
    return out


def metadata(version: str, rank, factored: dict[str, tuple], base_fingerprint: str) -> dict[str, str]:
    return {"format": FORMAT, "tsvmerge_version": version, "rank": str(rank),
            "spectral": json.dumps({n: list(shape) for n, shape in factored.items()}),
            "base_fingerprint": base_fingerprint}


class CompressedTask(Checkpoint):
    """A TSV-C task read lazily from `store` (the file, or a dict in memory), checked whole
    when opened: every factored tensor has its three factors, of consistent shapes and one
    floating dtype; nothing is stored twice or left over."""

    is_delta = True

    def __init__(self, store: Checkpoint, meta: dict):
        self.store, self.metadata, self.source = store, meta, store.source
        fingerprint = meta.get("base_fingerprint")
        if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
            raise InputError(self.source, None, "TSV-C file without a valid base fingerprint: cannot check which "
                             "base it was made from; compress the task again with tsvmerge compress")
        self.base_fingerprint = fingerprint
        self.shapes = self._factored_shapes(meta.get("spectral"))
        self._infos = self._check_layout(store.infos())

    def _factored_shapes(self, spectral) -> dict[str, tuple]:
        try:
            shapes = json.loads(spectral)
            ok = isinstance(shapes, dict) and all(
                isinstance(s, list) and len(s) == 2 and all(type(d) is int and d > 0 for d in s) for s in shapes.values())
        except (TypeError, ValueError, RecursionError):
            ok = False
        if not ok:
            raise InputError(self.source, None, "TSV-C file without a valid 'spectral' metadata entry "
                             "(a JSON map from tensor names to [m, n])")
        return {name: tuple(shape) for name, shape in shapes.items()}

    def _check_layout(self, stored: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
        infos = {}
        factor_of = {f: name for name in self.shapes for f in factor_names(name)}
        for name, info in stored.items():
            if name in factor_of:
                continue
            if name.endswith(FACTOR_SUFFIXES):
                raise InputError(self.source, name, "a TSV-C factor of a tensor the file's metadata does not list")
            if name in self.shapes:
                raise InputError(self.source, name, "stored both dense and as TSV-C factors")
            infos[name] = info
        for name, shape in self.shapes.items():
            missing = [f for f in factor_names(name) if f not in stored]
            if missing:
                raise InputError(self.source, name, f"TSV-C factor {missing[0]} is missing")
            u, s, v = (stored[f] for f in factor_names(name))
            k = s.shape[0] if len(s.shape) == 1 else -1
            if not 1 <= k <= min(shape) or (u.shape, v.shape) != ((shape[0], k), (shape[1], k)):
                raise InputError(self.source, name, f"TSV-C factors of shapes u {list(u.shape)}, s {list(s.shape)}, "
                                 f"v {list(v.shape)} do not make a rank-k factorisation of {list(shape)}")
            if not (u.dtype == s.dtype == v.dtype) or not u.dtype.is_floating_point:
                raise InputError(self.source, name, f"TSV-C factors must share one floating dtype, got "
                                 f"{u.dtype}, {s.dtype}, {v.dtype}")
            infos[name] = TensorInfo(shape, u.dtype)
        return infos

    def infos(self):
        return self._infos

    @property
    def reads_files(self):
        return self.store.reads_files

    def head(self, name):
        """From the stored tensors: rebuilding a factored one would be a full product."""
        return self.store.head(factor_names(name)[0] if name in self.shapes else name)

    def base_mismatch(self, base: Checkpoint) -> str | None:
        """Why this task cannot be used with `base` (it was made against another), or None."""
        got = base.fingerprint()
        if self.base_fingerprint != got:
            return (f"was compressed against a different base (fingerprint {self.base_fingerprint}; {base.source} "
                    f"has {got}): pass the base it was made from")
        return None

    def stored_rank(self, name: str) -> int:
        return self.store.infos()[factor_names(name)[1]].shape[0]

    def factors(self, name):
        if name not in self.shapes:
            return None
        return tuple(self.store.read(f) for f in factor_names(name))

    def read(self, name):
        """The task vector (dense), rebuilt from its factors where stored factored."""
        f = self.factors(name)
        if f is None:
            return self.store.read(name)
        return P.lowrank_product(*f).to(f[0].dtype)

    def release(self):
        self.store.release()
