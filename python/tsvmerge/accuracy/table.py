"""Paper-style tables (markdown) from the benchmark's results.

Normalized accuracy (TSV paper, eq. 9): the mean over tasks of merged accuracy divided by the
task's own fine-tuned accuracy, each on the test split.
"""
from __future__ import annotations

FINETUNED = "Fine-tuned (individual)"


def label(row: dict) -> str:
    if row["alpha"] is None or row["method"] == "Weight averaging":
        return row["method"]
    return f"{row['method']} (α={row['alpha']:g}{', val' if row['tuned'] else ''})"


def absolute(row: dict, names: list[str]) -> float:
    return sum(row["test"][n] for n in names) / len(names)


def normalized(row: dict, finetuned: dict[str, float], names: list[str]) -> float:
    return sum(row["test"][n] / finetuned[n] for n in names) / len(names)


def _finetuned(task_set: dict) -> dict[str, float]:
    return next(r["test"] for r in task_set["rows"] if r["method"] == FINETUNED)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _columns(results: dict) -> list[tuple[str, str, dict]]:
    """(zoo, task-set name, task set) for every table column."""
    return [(zoo, name, task_set) for zoo, r in results["zoos"].items() for name, task_set in r["sets"].items()]


def summary_table(results: dict) -> str:
    """One line per method, absolute / normalized mean accuracy per zoo and task set (as the paper's Table 1);
    alpha = 1 unless the row says it was chosen on validation."""
    columns = _columns(results)
    lines = ["| Method (α = 1 unless marked) | " + " | ".join(f"{zoo} zoo, {name}: abs. / norm." for zoo, name, _ in columns)
             + " |", "|" + "---|" * (1 + len(columns))]
    for i, row in enumerate(columns[0][2]["rows"]):
        cells = []
        for _, _, task_set in columns:
            r, names = task_set["rows"][i], task_set["tasks"]
            cells.append(f"{_pct(absolute(r, names))} / {_pct(normalized(r, _finetuned(task_set), names))}"
                         + (f" (α {r['alpha']:g})" if r["tuned"] else ""))
        lines.append(f"| {row['method']}{' (α on validation)' if row['tuned'] else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def premise_table(results: dict) -> str:
    """Each zoo against the paper's premise (small, low-rank task vectors), measured before merging."""
    lines = ["| zoo | fine-tuned | zero-shot | ‖τ‖/‖θ₀‖ (mean / max) | energy in top k = r/T | TSV-C 10% keeps |",
             "|---|---|---|---|---|---|"]
    for zoo, r in results["zoos"].items():
        p = r["premise"]
        lines.append(f"| {zoo} | {_pct(p['finetuned'])} | {_pct(p['zero_shot'])} | {_pct(p['relative_norm'])}% / "
                     f"{_pct(p['relative_norm_max'])}% | {_pct(p['energy_top_k'])}% | {_pct(p['tsvc_retention'])}% |")
    return "\n".join(lines) + f"\n\n(validation split, first {p['tasks']} tasks, T = {p['tasks']})"


def per_task_table(task_set: dict, kind: str) -> str:
    """Per-task accuracy, `kind` 'abs' (test accuracy) or 'norm' (over the task's fine-tuned accuracy)."""
    names, ft = task_set["tasks"], _finetuned(task_set)
    lines = ["| Method | " + " | ".join(names) + " | Avg. |", "|" + "---|" * (len(names) + 2)]
    for r in task_set["rows"]:
        per = [r["test"][n] / (ft[n] if kind == "norm" else 1.0) for n in names]
        lines.append(f"| {label(r)} | " + " | ".join(_pct(x) for x in per) + f" | {_pct(sum(per) / len(per))} |")
    return "\n".join(lines)


def render(results: dict) -> str:
    parts = ["## Mean accuracy (%), test split: absolute / normalized\n", summary_table(results),
             "\n## The premise\n", premise_table(results)]
    for zoo, name, task_set in _columns(results):
        parts += [f"\n### {zoo} zoo, {name}: absolute accuracy (%)\n", per_task_table(task_set, "abs"),
                  f"\n### {zoo} zoo, {name}: normalized accuracy (%)\n", per_task_table(task_set, "norm")]
    return "\n".join(parts) + "\n"


# Why a merge loses accuracy, by row label prefix: said of the lowest merge of a table.
LOSSES = {
    "Weight averaging": "it scales every task vector by 1/T, so each task keeps a fraction of its fine-tuning",
    "Task arithmetic": "at α = 1 it adds T whole task vectors, and where they share directions they interfere",
    "TIES": "it keeps the top 20% of each task vector's entries and drops the rest of what fine-tuning learnt",
    "TSV-M": "it keeps k = r/T singular directions per task, too few where a task's energy is spread",
}
MERGED = tuple(LOSSES)


def story(results: dict) -> list[str]:
    """What the table shows, in a few lines: per zoo, the ranking of the merges at α = 1 (largest task set),
    the premise, who loses and why, and how far the randomized and bf16 routes moved."""
    lines = []
    for zoo, r in results["zoos"].items():
        name, task_set = list(r["sets"].items())[-1]
        ft, names = _finetuned(task_set), task_set["tasks"]
        norm = {row["method"]: normalized(row, ft, names) for row in task_set["rows"] if not row["tuned"]}
        merges = sorted((m for m in norm if m.startswith(MERGED) and "," not in m), key=norm.get, reverse=True)
        zero = norm["Zero-shot (pretrained encoder)"]
        p = r["premise"]
        regime = "in" if p["tsvc_retention"] >= 0.98 else "outside"
        lines.append(f"{zoo} zoo, {name}, normalized accuracy at α = 1: "
                     + " > ".join(f"{m} {_pct(norm[m])}" for m in merges) + f" (zero-shot {_pct(zero)}).")
        lines.append(f"  premise: task vectors are {_pct(p['relative_norm'])}% of the weights' norm, "
                     f"{_pct(p['energy_top_k'])}% of their energy lies in the top k = r/T, TSV-C at 10% rank keeps "
                     f"{_pct(p['tsvc_retention'])}%: {regime} the paper's regime.")
        worst = merges[-1]
        why = next(v for k, v in LOSSES.items() if worst.startswith(k))
        below = [m for m in merges if norm[m] < zero]
        lines.append(f"  {worst} loses most: {why}"
                     + (f"; below zero-shot: {', '.join(below)}." if below else "."))
        if merges[0] == "Weight averaging":
            steps = {row["method"]: row["step"] for row in task_set["rows"]
                     if row["method"] in merges[1:] and not row["tuned"]}
            lines.append(f"  averaging wins: the other merges add up the {len(names)} tasks' vectors (or their top "
                         "parts), so at α = 1 they move the weights " + ", ".join(f"{m} {s:.1f}×" for m, s in steps.items())
                         + " as far, and overshoot here.")
        exact = norm["TSV-M"]
        moved = max(abs(norm[m] - exact) for m in norm if m.startswith("TSV-M,"))
        lines.append(f"  randomized SVD and bf16 compute move TSV-M by at most {100 * moved:.1f} points.")
    return lines
