"""DARE (Yu et al. 2024, "Language Models are Super Mario"): drop and rescale, a step on the
task vectors that any method can take before it runs (option `dare`, see `methods.steps`).

Each task vector keeps an entry with probability 1 - p and is rescaled by 1 / (1 - p), so its
expectation is unchanged. The draws come from a generator seeded by (seed, tensor name, task
index) (`primitives.named_generator`), on the CPU in fp32 whatever the device and compute
dtype: the same seed gives the same bytes however the tensors are batched.
"""
import torch

from ..options import Option
from ..primitives import named_generator

HELP = ("DARE: drop this fraction of each task vector's entries at random and rescale the rest by 1/(1-p) "
        "before the merge (default 0, off; 0.9 in dare_ties and dare_task_arithmetic)")


def drop_rate(x) -> float:
    """A number in [0, 1)."""
    value = float(x)
    if not 0.0 <= value < 1.0:
        raise ValueError("expected a drop rate in [0, 1)")
    return value


def dare_option(default: float) -> Option:
    """The `dare` option with a method's default (the command line shows one flag for all)."""
    return Option("dare", drop_rate, default, HELP)


def keep_mask(shape, p: float, seed: int, name: str, task: int) -> torch.Tensor:
    """Which entries of task `task`'s vector of tensor `name` DARE keeps (each with prob. 1 - p)."""
    return torch.rand(shape, generator=named_generator(seed, name, f"dare/task{task}")) >= p


def dare_(tau: torch.Tensor, p: float, seed: int, names: list, tasks: list) -> torch.Tensor:
    """Drop and rescale tau [L, T, *shape] in place: layer l is tensor names[l], slot i task tasks[i]."""
    scale = 1.0 / (1.0 - p)
    for l, name in enumerate(names):
        for i, task in enumerate(tasks):
            keep = keep_mask(tau.shape[2:], p, seed, name, task).to(tau.device)
            tau[l, i].mul_(keep.to(tau.dtype) * scale)     # a kept entry times 1/(1-p); a dropped one 0
    return tau
