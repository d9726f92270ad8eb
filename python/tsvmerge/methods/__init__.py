"""Merge methods: small functions behind a registry.

A method maps one batch -- base [L, *shape] and task vectors tau [L, T, *shape] in the
compute dtype -- to the update Delta: a dense tensor [L, *shape] or a `LowRank` factorisation.
The engine adds alpha * Delta to the base. Methods never know which backend runs. Each method
declares its options once (`tsvmerge.options.Option`); `merge()` and the command line derive
theirs from the declarations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..options import Option


@dataclass
class LowRank:
    """Delta = u diag(s) v^T with u [L, m, K], s [L, K], v [L, n, K]."""
    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor


@dataclass
class Method:
    name: str
    fn: Callable
    spectral: bool          # 2-D tensors take the spectral path
    options: tuple          # Option declarations
    doc: str
    rank: Callable | None = None    # spectral: (shape, T, k) -> (per-task width loaded, note); None: merge_rank


METHODS: dict[str, Method] = {}


def register(name: str, *, spectral: bool = False, options: tuple[Option, ...] = (), rank: Callable | None = None):
    def wrap(fn):
        METHODS[name] = Method(name, fn, spectral, options, (fn.__doc__ or "").strip().splitlines()[0], rank)
        return fn
    return wrap


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


from . import average, iso, task_arithmetic, ties, tsv  # noqa: E402,F401  (registers the methods)
