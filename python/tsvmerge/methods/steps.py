"""Steps on the task vectors that every method takes before it runs: DARE (`methods.dare`) and
per-task alpha. The engine applies them once per batch, in place (`engine.run_merge`), so a
method sees the task vectors already dropped and scaled, and a re-run of one tensor (the
non-finite check) sees them too."""
import math

import torch

from ..options import Option, optional
from .dare import dare_, dare_option


def task_alphas(x) -> tuple[float, ...]:
    """One finite number per task: a sequence, or a comma list on the command line."""
    items = x.split(",") if isinstance(x, str) else x
    if isinstance(items, (int, float)) or not len(items):
        raise ValueError("expected a list of numbers, one per task (0.3,0.5,...)")
    values = tuple(float(v) for v in items)
    if not all(math.isfinite(v) for v in values):
        raise ValueError("expected finite numbers")
    return values


TASK_ALPHA = Option("task_alpha", optional(task_alphas), None,
                    "one scale per task (0.3,0.5,...), applied to its task vector before the merge; the global "
                    "alpha then defaults to 1")
STEP_OPTIONS = (dare_option(0.0), TASK_ALPHA)


def check_task_alpha(task_alpha, T: int) -> None:
    if task_alpha is not None and len(task_alpha) != T:
        raise ValueError(f"task_alpha has {len(task_alpha)} values for {T} tasks: give one per task")


def apply_steps_(loaded, seed: int, options: dict) -> None:
    """DARE, then per-task alpha, on a loaded batch (`engine.Loaded`) in place. The dense task
    vectors are `loaded.tau`; stored factors (only when DARE is off: `engine.run_merge` reads
    every task dense then) scale their singular values by |alpha| and v by its sign."""
    factored = loaded.factored or {}
    T = len(factored) + (0 if loaded.tau is None else loaded.tau.shape[1])
    dense = [t for t in range(T) if t not in factored]
    if loaded.tau is not None and options["dare"]:
        dare_(loaded.tau, options["dare"], seed, loaded.batch.names, dense)
    alpha = options["task_alpha"]
    if alpha is None:
        return
    if loaded.tau is not None:
        a = torch.tensor([alpha[t] for t in dense], dtype=loaded.tau.dtype, device=loaded.tau.device)
        loaded.tau.mul_(a.view(1, -1, *[1] * (loaded.tau.dim() - 2)))
    for t, (u, s, v) in factored.items():
        factored[t] = (u, s * abs(alpha[t]), v * math.copysign(1.0, alpha[t]))
