"""TSV-M as mergekit's merge method `tsv`, and `tsvmerge-mergekit`, mergekit's YAML runner with it.

mergekit has no plugin discovery: a method exists once something registers it in the
process. `register()` does so for mergekit 0.1.5 (methods are built, then registered) and
0.1.4 (a `MergeMethod` in `REGISTERED_MERGE_METHODS`). Each call of the method runs
`tsvmerge.merge` on the weights it is given: one weight at a time under `mergekit-yaml`,
same-shaped weights stacked across layers under `merge_state_dicts`.
"""
from __future__ import annotations

import inspect
import sys
from typing import Any, Literal, Optional

import torch
from typing_extensions import Annotated

import tsvmerge

try:  # mergekit >= 0.1.5
    from mergekit.merge_methods import (BasePolicy, BatchParameter, InputContract, ParameterScope, TensorBatch,
                                        merge_method, register as _register, registered_methods)
except ImportError:  # mergekit 0.1.4
    _register = None

NAME = "tsv"
PRETTY_NAME = "TSV-M (tsvmerge)"
REFERENCE_URL = "https://arxiv.org/abs/2412.00081"


def merge_stack(base: torch.Tensor, finetuned: list, weight: torch.Tensor | None = None, *, alpha: float = 1.0,
                spectral: bool = True, **options) -> torch.Tensor:
    """TSV-M of L same-shaped weights: base [L, *shape], finetuned T tensors [L, *shape].

    `weight` [L, T] scales each task vector first (mergekit's per-model `weight`);
    `spectral=False` keeps the weights off the spectral path (the mean of the task vectors).
    Other options go to `tsvmerge.merge`. Returns [L, *shape] in the base's dtype.
    """
    names = [f"layer{l}" for l in range(base.shape[0])]
    tasks = []
    for t, ft in enumerate(finetuned):
        if weight is not None and not bool((weight[:, t] == 1).all()):
            w = weight[:, t].to(base.device, torch.float64).reshape(-1, *[1] * (base.dim() - 1))
            ft = (base.double() + w * (ft.double() - base.double())).float()   # theta_0 + w tau, kept in fp32
        tasks.append(dict(zip(names, ft.unbind(0))))
    merged = tsvmerge.merge(dict(zip(names, base.unbind(0))), tasks, method="tsv", alpha=alpha,
                            exclude=() if spectral else ("*",), device=str(base.device), progress=False,
                            **{k: v for k, v in options.items() if v is not None})
    return torch.stack([merged[n] for n in names])


def tsv(batch: TensorBatch,
        weight: Annotated[torch.Tensor, BatchParameter(float, ParameterScope.NON_BASE)] = 1.0,
        alpha: float = 1.0,
        spectral: bool = True,
        k: Optional[int] = None,
        orthogonalize: Literal["procrustes", "whiten"] = "procrustes",
        backend: str = "auto",
        svd: Optional[Literal["randomized", "exact"]] = None,
        power_iters: Optional[int] = None,
        oversample: Optional[int] = None,
        energy_target: Optional[float] = None,
        max_passes: Optional[int] = None,
        seed: int = 0,
        compute_dtype: str = "float32") -> torch.Tensor:
    """mergekit's batch kernel: the base and the fine-tunes, each [L, *shape]."""
    base = batch.tensors[batch.base_index]
    finetuned = [t for i, t in enumerate(batch.tensors) if i != batch.base_index]
    weight = weight if isinstance(weight, torch.Tensor) else None
    return merge_stack(base, finetuned, weight, alpha=alpha, spectral=spectral, k=k, orthogonalize=orthogonalize,
                       backend=backend, svd=svd, power_iters=power_iters, oversample=oversample,
                       energy_target=energy_target, max_passes=max_passes, seed=seed,
                       compute_dtype=compute_dtype)


# The YAML's `parameters:` of `merge_method: tsv` and their defaults: tsv's keyword arguments.
OPTIONS = {n: p.default for n, p in inspect.signature(tsv).parameters.items() if n not in ("batch", "weight")}


def _method_015():
    return merge_method(tsv, name=NAME, pretty_name=PRETTY_NAME, reference_url=REFERENCE_URL,
                        contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1))


def _method_014():
    """mergekit 0.1.4's interface: a MergeMethod that makes one graph Task per weight."""
    from mergekit.common import ImmutableMap, ModelReference
    from mergekit.graph import Task
    from mergekit.merge_methods.base import ConfigParameterDef, MergeMethod, MergeTensorInput

    class TSVTask(Task[torch.Tensor]):
        gather_tensors: MergeTensorInput
        base_model: ModelReference
        parameters: ImmutableMap[str, Any]
        tensor_parameters: ImmutableMap[ModelReference, ImmutableMap[str, Any]]

        def arguments(self):
            return {"tensors": self.gather_tensors}

        def uses_accelerator(self):
            return True

        def group_label(self):
            return self.gather_tensors.group_label()

        def execute(self, tensors, **_):
            base = tensors[self.base_model]
            refs = [r for r in tensors if r != self.base_model]
            if not base.is_floating_point():
                return base
            weight = torch.tensor([[float(self.tensor_parameters[r]["weight"]) for r in refs]])
            return merge_stack(base[None], [tensors[r][None] for r in refs], weight, **_typed(self.parameters))[0]

    def _typed(parameters) -> dict:
        """0.1.4's config holds every parameter as a float: restore the ints and the bool."""
        out = dict(parameters.items())
        for name in ("k", "power_iters", "oversample", "max_passes", "seed"):
            out[name] = None if out[name] is None else int(out[name])
        out["spectral"] = bool(out["spectral"])
        return out

    class TSVMethod(MergeMethod):
        def name(self):
            return NAME

        def pretty_name(self):
            return PRETTY_NAME

        def reference_url(self):
            return REFERENCE_URL

        def parameters(self):
            return [ConfigParameterDef(name=n, default_value=d) for n, d in OPTIONS.items()]

        def tensor_parameters(self):
            return [ConfigParameterDef(name="weight", default_value=1.0)]

        def make_task(self, *, tensors, parameters, tensor_parameters, base_model, **_):
            return TSVTask(gather_tensors=tensors, base_model=base_model, parameters=parameters,
                           tensor_parameters=tensor_parameters)

    return TSVMethod()


def register() -> None:
    """Make `merge_method: tsv` available to mergekit in this process (calling it again is harmless)."""
    if _register is not None:
        if all(m.spec.name != NAME for m in registered_methods()):
            _register(_method_015())
        return
    from mergekit.merge_methods.registry import REGISTERED_MERGE_METHODS
    if NAME not in REGISTERED_MERGE_METHODS:
        REGISTERED_MERGE_METHODS[NAME] = _method_014()


def main(argv=None) -> int:
    """`tsvmerge-mergekit CONFIG.yml OUT [mergekit-yaml options]`: mergekit-yaml, with `tsv` registered."""
    from mergekit.scripts.run_yaml import main as mergekit_yaml
    register()
    return mergekit_yaml.main(args=sys.argv[1:] if argv is None else list(argv), prog_name="tsvmerge-mergekit")


if __name__ == "__main__":
    sys.exit(main())
