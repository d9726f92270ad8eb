"""The experiment: merge the zoo with every method at alpha = 1, score on test; optionally choose alpha on
validation too.

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
from tqdm.auto import tqdm

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
# (row label, method, options): every merge of a task set, at alpha = 1.
# torch has no bf16 SVD on CPU, so bf16 compute runs on the randomized route and is compared with it.
MERGES = [("Weight averaging", "average", {}),
          ("Task arithmetic", "task_arithmetic", {}),
          (f"TIES (density {TIES_DENSITY:g})", "ties", {"density": TIES_DENSITY}),
          ("TSV-M", "tsv", EXACT),
          ("TSV-M, randomized SVD", "tsv", RANDOMIZED),
          ("TSV-M, randomized SVD, bf16 compute", "tsv", {**RANDOMIZED, "compute_dtype": "bfloat16"})]
# the methods that followed TSV, and DARE and consensus masks (`followers=False` leaves them out: the demo)
FOLLOWERS = [("Iso-C", "iso_c", EXACT),
             ("Iso-CTS", "iso_cts", EXACT),
             ("DARE-TIES (p 0.9)", "dare_ties", {"density": TIES_DENSITY}),
             ("Consensus TA", "consensus_ta", {}),
             ("Consensus TSV-M", "consensus_tsv", EXACT)]
# the merges whose alpha is chosen on validation too (averaging's alpha is 1 by definition; the
# randomized and bf16 rows measure the SVD route, not the method)
TUNED = ("Task arithmetic", f"TIES (density {TIES_DENSITY:g})", "TSV-M", "Iso-C", "Iso-CTS", "DARE-TIES (p 0.9)",
         "Consensus TA", "Consensus TSV-M")


@dataclass
class Row:
    method: str
    test: dict[str, float]  # task -> test accuracy
    alpha: float | None = None  # None: not a merge
    tuned: bool = False  # alpha chosen on validation
    step: float | None = None  # ||Delta|| over weight averaging's ||Delta||: how far the merge moves the weights
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


def tuned_row(scorer: Scorer, names: list[str], label: str, method: str, grid, **options) -> Row:
    """The method's update computed once (`tsvmerge.update`) and applied at every alpha of `grid` on
    validation (`tsvmerge.apply`; normalized accuracy, ties go to the smaller alpha); the chosen alpha
    scored on test."""
    zoo = scorer.zoo
    delta = update(zoo.pretrained, [zoo.finetuned[n] for n in names], method=method, preset="clip", progress=False,
                   **options)
    curve = {a: scorer.val_normalized(apply(zoo.pretrained, delta, a), names) for a in grid}
    best = max(grid, key=lambda a: (curve[a], -a))
    return Row(label, scorer.score(apply(zoo.pretrained, delta, best), names), best, True, curve)


def run_set(scorer: Scorer, names: list[str], grid, individual: list[Row], tune: bool, merges: list, bar) -> dict:
    """All merge rows for one task set at alpha = 1 (the paper's default; then, with `tune`, alpha chosen on
    validation), plus the exact-vs-randomized and fp32-vs-bf16 agreement."""
    zoo = scorer.zoo
    rows = [Row(r.method, {n: r.test[n] for n in names}) for r in individual]
    at_one, moved = {}, {}
    for label, method, options in merges:
        bar.set_postfix_str(f"{len(names)} tasks: {label}")
        at_one[label] = _merge(zoo, names, method, **options)
        moved[label] = relative_difference(at_one[label], zoo.pretrained)
        rows.append(Row(label, scorer.score(at_one[label], names), 1.0, step=moved[label] / moved[MERGES[0][0]]))
        bar.update()
    exact, randomized, bf16 = (at_one[label] for label, _, _ in MERGES[3:6])
    agreement = {"randomized_vs_exact": relative_difference(_delta(zoo, randomized), _delta(zoo, exact)),
                 "bf16_vs_fp32_randomized": relative_difference(_delta(zoo, bf16), _delta(zoo, randomized))}
    if tune:  # alpha chosen on validation: one row per method whose alpha matters
        for label, method, options in (m for m in merges if m[0] in TUNED):
            bar.set_postfix_str(f"{len(names)} tasks: {label}, alpha on validation")
            rows.append(tuned_row(scorer, names, label, method, grid, **options))
            bar.update()
    return {"tasks": names, "rows": [asdict(r) for r in rows], "agreement": agreement}


def _tsvc(zoo: Zoo, name: str) -> tuple[dict[str, torch.Tensor], float]:
    """Task `name` compressed by TSV-C at TSVC_RANK and expanded again, and the fraction of numbers stored."""
    packed = compress(zoo.pretrained, zoo.finetuned[name], rank=TSVC_RANK, preset="clip", progress=False)
    return decompress(zoo.pretrained, packed, progress=False), packed.report["summary"]["ratio"]


def individual_rows(scorer: Scorer, names: list[str], tsvc: dict) -> tuple[list[Row], dict]:
    """Rows that need no merge: the pretrained encoder, each fine-tune alone, each TSV-C task alone
    (`tsvc`: task -> `_tsvc`'s answer)."""
    scores = {}
    for n in names:
        scores.update(scorer.score(tsvc[n][0], [n]))
    rows = [Row("Zero-shot (pretrained encoder)", scorer.score(scorer.zoo.pretrained, names)),
            Row("Fine-tuned (individual)", dict(scorer.finetuned["test"])),
            Row(f"TSV-C (individual, rank {TSVC_RANK:.0%})", scores)]
    return rows, {"rank": TSVC_RANK, "stored_fraction": sum(tsvc[n][1] for n in names) / len(names)}


def premise(scorer: Scorer, names: list[str], split: str = "val", tsvc: dict | None = None) -> dict:
    """How far the zoo is in the paper's regime, measured without merging (on `split`):
    fine-tuned and zero-shot mean accuracy; each task vector's norm over the pretrained weights' (all
    tensors); the share of a task matrix's energy (sum of squared singular values) in its top
    k = r // T, T = len(names), over every 2-D tensor fine-tuning moved; TSV-C's mean normalized accuracy."""
    zoo, T = scorer.zoo, len(names)
    ft = scorer.finetuned[split]
    zero = scorer.score(zoo.pretrained, names, split)
    norms, shares, kept = [], [], []
    for n in names:
        norms.append(relative_difference(zoo.finetuned[n], zoo.pretrained))
        for key, base in zoo.pretrained.items():
            delta = zoo.finetuned[n][key].double() - base.double()
            if delta.dim() == 2 and bool(delta.any()):
                s2 = torch.linalg.svdvals(delta).pow(2)
                shares.append(float(s2[:min(delta.shape) // T].sum() / s2.sum()))
        state = tsvc[n][0] if tsvc else _tsvc(zoo, n)[0]
        kept.append(scorer.score(state, [n], split)[n] / ft[n])
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"split": split, "tasks": T, "finetuned": mean([ft[n] for n in names]), "zero_shot": mean(list(zero.values())),
            "relative_norm": mean(norms), "relative_norm_max": max(norms), "energy_top_k": mean(shares),
            "tsvc_retention": mean(kept)}


def run(zoo: Zoo, tasks: list[Task], splits: dict[str, Split], grid=ALPHA_GRID, first: int = 8, tune: bool = False,
        followers: bool = True, log=print, progress: bool | None = None) -> dict:
    """Task sets: the first `first` tasks and all of them (one set when they coincide). `followers`: the
    FOLLOWERS rows too (the paper's table has MERGES only).
    `progress`: a bar over the merges (None: only on a terminal)."""
    start = time.perf_counter()
    scorer = Scorer(zoo, tasks, splits)
    names = [t.name for t in tasks]
    log("measuring the premise: task-vector norms, top-k energy, TSV-C retention")
    compressed = {n: _tsvc(zoo, n) for n in names}
    facts = premise(scorer, names[:first], tsvc=compressed)
    individual, tsvc = individual_rows(scorer, names, compressed)
    subsets = [names[:first], names] if len(names) > first else [names]
    log(f"merging {' and '.join(str(len(s)) for s in subsets)} tasks with every method")
    merges = MERGES + FOLLOWERS if followers else MERGES
    tuned = sum(m[0] in TUNED for m in merges) * tune
    with tqdm(total=len(subsets) * (len(merges) + tuned), desc="merging", unit="merge", dynamic_ncols=True,
              disable=None if progress is None else not progress) as bar:
        sets = {f"{len(s)} tasks": run_set(scorer, s, grid, individual, tune, merges, bar) for s in subsets}
    log("measuring singular task interference")
    sti = interference(zoo.pretrained, [zoo.finetuned[n] for n in names], preset="clip", progress=False, **EXACT)
    return {"sets": sets, "premise": facts, "finetuned_val": scorer.finetuned["val"], "tsvc": tsvc,
            "interference": sti, "grid": list(grid) if tune else [], "seconds": time.perf_counter() - start}
