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


def summary_table(results: dict) -> str:
    """One line per method, absolute and normalized mean accuracy per task set (as the paper's Table 1)."""
    sets = results["sets"]
    head = "| Method | " + " | ".join(f"{s}: Abs. | {s}: Norm. | {s}: α" for s in sets) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(sets))]
    for i, row in enumerate(next(iter(sets.values()))["rows"]):
        cells = []
        for task_set in sets.values():
            r, names = task_set["rows"][i], task_set["tasks"]
            alpha = "" if r["alpha"] is None else f"{r['alpha']:g}" + (" (val)" if r["tuned"] else "")
            cells += [_pct(absolute(r, names)), _pct(normalized(r, _finetuned(task_set), names)), alpha]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_task_table(task_set: dict, kind: str) -> str:
    """Per-task accuracy, `kind` 'abs' (test accuracy) or 'norm' (over the task's fine-tuned accuracy)."""
    names, ft = task_set["tasks"], _finetuned(task_set)
    lines = ["| Method | " + " | ".join(names) + " | Avg. |", "|" + "---|" * (len(names) + 2)]
    for r in task_set["rows"]:
        per = [r["test"][n] / (ft[n] if kind == "norm" else 1.0) for n in names]
        lines.append(f"| {label(r)} | " + " | ".join(_pct(x) for x in per) + f" | {_pct(sum(per) / len(per))} |")
    return "\n".join(lines)


def render(results: dict) -> str:
    parts = ["## Mean accuracy (%), test split\n", summary_table(results)]
    for name, task_set in results["sets"].items():
        parts += [f"\n### {name}: absolute accuracy (%)\n", per_task_table(task_set, "abs"),
                  f"\n### {name}: normalized accuracy (%)\n", per_task_table(task_set, "norm")]
    return "\n".join(parts) + "\n"
