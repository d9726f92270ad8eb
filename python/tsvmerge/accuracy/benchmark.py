"""The experiment: merge the zoo with every method, choose alpha on validation, score on test.

Every merged model is encoder(theta_0 + alpha * Delta) with each task's own frozen head. Delta is
computed once per method (`tsvmerge.update`) and applied at each alpha of the grid
(`tsvmerge.apply`, one pass, exactly the merge with that alpha); the alpha chosen on validation
and alpha = 1 are scored on test.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from .. import apply, compress, decompress, interference, merge, update
from .data import Split, Task
from .evaluate import TaskInputs, accuracies
from .checkpoints import Zoo

# Denser where task arithmetic's optimum lies (alpha ~ 1/T); alpha = 0 is the zero-shot row. Seven points keep
# the cached run within a minute on 2 cores.
ALPHA_GRID = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.3)
TIES_DENSITY = 0.2  # TIES paper default: keep the top 20% of each task vector
TSVC_RANK = 0.1  # TSV-C keeps 10% of each task matrix's rank
# The engine's defaults: Krylov blocks per task matrix until the captured-energy bound reaches 0.995.
RANDOMIZED = {"backend": "torch", "svd": "randomized"}
EXACT = {"backend": "reference"}


@dataclass
class Row:
    method: str
    test: dict[str, float]  # task -> test accuracy
    alpha: float | None = None  # None: not a merge
    tuned: bool = False  # alpha chosen on validation
    val_curve: dict[float, float] | None = None  # alpha -> mean normalized validation accuracy


class Scorer:
    def __init__(self, zoo: Zoo, tasks: list[Task], splits: dict[str, Split]):
        self.zoo = zoo
        self.inputs = {name: TaskInputs(tasks, splits[name]) for name in ("val", "test")}
        self.finetuned = {split: {t.name: self.score(zoo.finetuned[t.name], [t.name], split)[t.name] for t in tasks}
                          for split in ("val", "test")}

    def score(self, state: dict[str, torch.Tensor], names: list[str], split: str = "test") -> dict[str, float]:
        return accuracies(self.zoo.cfg, state, self.zoo.heads, self.inputs[split].subset(names))

    def val_normalized(self, state: dict[str, torch.Tensor], names: list[str]) -> float:
        acc = self.score(state, names, "val")
        return sum(acc[n] / self.finetuned["val"][n] for n in names) / len(names)


def _merge(zoo: Zoo, names: list[str], method: str, **options) -> dict[str, torch.Tensor]:
    return merge(zoo.pretrained, [zoo.finetuned[n] for n in names], method=method, preset="clip",
                 progress=False, **options)


def _delta(zoo: Zoo, merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: merged[k].float() - v.float() for k, v in zoo.pretrained.items()}


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all tensors together (Frobenius)."""
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in b)
    den = sum(float(b[k].double().pow(2).sum()) for k in b)
    return math.sqrt(num / den)


def tuned_rows(scorer: Scorer, names: list[str], label: str, method: str, grid, **options):
    """The method's update computed once, applied at every alpha of `grid` on validation (normalized
    accuracy; ties go to the smaller alpha): its rows at alpha = 1 and at the chosen alpha, scored on
    test, and its merge at alpha = 1."""
    zoo = scorer.zoo
    delta = update(zoo.pretrained, [zoo.finetuned[n] for n in names], method=method, preset="clip", progress=False,
                   **options)
    curve = {a: scorer.val_normalized(apply(zoo.pretrained, delta, a), names) for a in grid}
    best = max(grid, key=lambda a: (curve[a], -a))
    at_one = apply(zoo.pretrained, delta, 1.0)
    rows = [Row(label, scorer.score(at_one, names), 1.0),
            Row(label, scorer.score(apply(zoo.pretrained, delta, best), names), best, True, curve)]
    return rows, at_one


def run_set(scorer: Scorer, names: list[str], grid, individual: list[Row]) -> dict:
    """All merge rows for one task set, plus the exact-vs-randomized and fp32-vs-bf16 agreement."""
    zoo = scorer.zoo
    rows = [Row(r.method, {n: r.test[n] for n in names}) for r in individual]
    rows.append(Row("Weight averaging", scorer.score(_merge(zoo, names, "average"), names), 1.0))
    rows += tuned_rows(scorer, names, "Task arithmetic", "task_arithmetic", grid)[0]
    rows += tuned_rows(scorer, names, f"TIES (density {TIES_DENSITY:g})", "ties", grid, density=TIES_DENSITY)[0]
    tsv, exact = tuned_rows(scorer, names, "TSV-M", "tsv", grid, **EXACT)
    rows += tsv
    randomized = _merge(zoo, names, "tsv", **RANDOMIZED)
    rows.append(Row("TSV-M, randomized SVD", scorer.score(randomized, names), 1.0))
    # torch has no bf16 SVD on CPU, so bf16 compute runs on the randomized route and is compared with it
    bf16 = _merge(zoo, names, "tsv", **RANDOMIZED, compute_dtype="bfloat16")
    rows.append(Row("TSV-M, randomized SVD, bf16 compute", scorer.score(bf16, names), 1.0))
    agreement = {"randomized_vs_exact": relative_difference(_delta(zoo, randomized), _delta(zoo, exact)),
                 "bf16_vs_fp32_randomized": relative_difference(_delta(zoo, bf16), _delta(zoo, randomized))}
    return {"tasks": names, "rows": [asdict(r) for r in rows], "agreement": agreement}


def individual_rows(scorer: Scorer, names: list[str]) -> tuple[list[Row], dict]:
    """Rows that need no merge: the pretrained encoder, each fine-tune alone, each TSV-C task alone."""
    zoo = scorer.zoo
    tsvc, ratios = {}, []
    for n in names:
        packed = compress(zoo.pretrained, zoo.finetuned[n], rank=TSVC_RANK, preset="clip", progress=False)
        ratios.append(packed.report["summary"]["ratio"])
        tsvc.update(scorer.score(decompress(zoo.pretrained, packed, progress=False), [n]))
    rows = [Row("Zero-shot (pretrained encoder)", scorer.score(zoo.pretrained, names)),
            Row("Fine-tuned (individual)", dict(scorer.finetuned["test"])),
            Row(f"TSV-C (individual, rank {TSVC_RANK:.0%})", tsvc)]
    return rows, {"rank": TSVC_RANK, "stored_fraction": sum(ratios) / len(ratios)}


def run(zoo: Zoo, tasks: list[Task], splits: dict[str, Split], grid=ALPHA_GRID, first: int = 8, log=print) -> dict:
    """Task sets: the first `first` tasks and all of them (one set when they coincide)."""
    start = time.perf_counter()
    scorer = Scorer(zoo, tasks, splits)
    names = [t.name for t in tasks]
    individual, tsvc = individual_rows(scorer, names)
    sets = {}
    for subset in ([names[:first], names] if len(names) > first else [names]):
        log(f"merging {len(subset)} tasks with every method...")
        sets[f"{len(subset)} tasks"] = run_set(scorer, subset, grid, individual)
    log("measuring singular task interference...")
    sti = interference(zoo.pretrained, [zoo.finetuned[n] for n in names], preset="clip", progress=False, **EXACT)
    return {"sets": sets, "finetuned_val": scorer.finetuned["val"], "tsvc": tsvc, "interference": sti,
            "grid": list(grid), "seconds": time.perf_counter() - start}
