"""Merge methods: small functions behind a registry.

A method maps one batch -- base [L, *shape] and task vectors tau [L, T, *shape] in the
compute dtype -- to the update Delta: a dense tensor [L, *shape] or a `LowRank` factorisation.
The engine adds alpha * Delta to the base. Methods never know which backend runs. Each method
declares its options once (`tsvmerge.options.Option`); `merge()` and the command line derive
theirs from the declarations. Every method also takes the steps on the task vectors that run
before it (`methods.steps`: DARE, per-task alpha), unless it declares its own default for one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..options import Option
from .steps import STEP_OPTIONS


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
    dense: bool = False     # masks entries across tasks: stored factors (TSV-C, LoRA) are read dense
    rank: Callable | None = None    # spectral: (shape, T, k) -> (per-task width loaded, note); None: merge_rank


METHODS: dict[str, Method] = {}


def register(name: str, *, spectral: bool = False, dense: bool = False, options: tuple[Option, ...] = (),
             rank: Callable | None = None):
    own = {o.name for o in options}
    options = tuple(options) + tuple(o for o in STEP_OPTIONS if o.name not in own)

    def wrap(fn):
        METHODS[name] = Method(name, fn, spectral, options, (fn.__doc__ or "").strip().splitlines()[0], dense, rank)
        return fn
    return wrap


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


from . import average, consensus, iso, task_arithmetic, ties, tsv  # noqa: E402,F401  (registers the methods)
