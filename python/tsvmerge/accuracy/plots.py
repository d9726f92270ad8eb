"""The benchmark's figures (PNG, Agg backend, small files)."""
from __future__ import annotations

import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402
import torch  # noqa: E402

from .table import label  # noqa: E402

DPI = 90
MATRICES = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def accuracy_by_method(task_set: dict, path: str) -> None:
    """Grouped bars: one group per task, one bar per method."""
    names, rows = task_set["tasks"], task_set["rows"]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(names)) + 3, 4.5))
    width = 0.8 / len(rows)
    cmap = plt.get_cmap("tab10")
    for i, r in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [100 * r["test"][n] for n in names], width, label=label(r), color=cmap(i % 10))
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Per-task accuracy by method ({len(names)} tasks)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _block(name: str) -> int | None:
    m = re.search(r"resblocks\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def sti_per_layer(sti: dict, path: str) -> None:
    """STI of each task matrix type per block, before (solid) and after (dashed) orthogonalisation."""
    tensors = sti["tensors"]
    fig, ax = plt.subplots(figsize=(7, 4))
    cmap = plt.get_cmap("tab10")
    for i, kind in enumerate(MATRICES):
        picked = sorted((_block(n), e) for n, e in tensors.items() if n.endswith(kind) and _block(n) is not None)
        blocks = [b for b, _ in picked]
        ax.plot(blocks, [e["sti"] for _, e in picked], "o-", color=cmap(i), label=f"{kind} before")
        # after orthogonalisation STI is ~0 (rounding): floor it so the log axis can show it
        ax.plot(blocks, [max(e["sti_orthogonalized"], 1e-12) for _, e in picked], "x--", color=cmap(i),
                label=f"{kind} after")
    ax.set_yscale("log")
    ax.set_xlabel("transformer block")
    ax.set_ylabel("STI  ‖(UᵀU−I) Σ (VᵀV−I)‖₁")
    ax.set_title(f"Singular task interference per layer ({len(sti['tasks'])} tasks)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def spectra(pretrained: dict, finetuned: dict[str, dict], names: list[str], task_counts: list[int],
            path: str) -> None:
    """Singular values of each task matrix in the first and last block; dotted lines mark k = r // T."""
    blocks = sorted({_block(n) for n in pretrained if _block(n) is not None})
    chosen = [blocks[0], blocks[-1]] if len(blocks) > 1 else blocks
    fig, axes = plt.subplots(len(chosen), len(MATRICES), figsize=(3.2 * len(MATRICES), 2.6 * len(chosen)),
                             squeeze=False)
    cmap = plt.get_cmap("tab20")
    for row, block in zip(axes, chosen):
        for ax, kind in zip(row, MATRICES):
            name = f"visual.transformer.resblocks.{block}.{kind}"
            for i, task in enumerate(names):
                s = torch.linalg.svdvals(finetuned[task][name].double() - pretrained[name].double())
                ax.semilogy(range(1, len(s) + 1), s.numpy(), color=cmap(i % 20), lw=1, label=task)
            r = min(pretrained[name].shape)
            for T, style in zip(task_counts, (":", "--")):
                ax.axvline(r // T, color="k", ls=style, lw=1, label=f"kept rank k={r // T} (T={T})")
            ax.set_title(f"block {block} {kind}", fontsize=8)
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("singular value")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def write_all(results: dict, zoo, out: str, prefix: str) -> list[str]:
    """One zoo's figures, named `prefix`_*.png."""
    os.makedirs(out, exist_ok=True)
    path = lambda name: os.path.join(out, f"{prefix}_{name}.png")  # noqa: E731
    paths = []
    for name, task_set in results["sets"].items():
        paths.append(path(f"accuracy_{name.replace(' ', '_')}"))
        accuracy_by_method(task_set, paths[-1])
    paths.append(path("sti_per_layer"))
    sti_per_layer(results["interference"], paths[-1])
    names = list(results["sets"].values())[-1]["tasks"]
    counts = sorted({len(s["tasks"]) for s in results["sets"].values()})
    paths.append(path("task_matrix_spectra"))
    spectra(zoo.pretrained, zoo.finetuned, names, counts, paths[-1])
    return paths
