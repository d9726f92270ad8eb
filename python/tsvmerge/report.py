"""Reading a merge or interference report: a text table and pictures."""
from __future__ import annotations

import os
from collections import defaultdict


def format_merge_report(rep: dict) -> str:
    """One row per (path, shape) group: tensors, k, captured energy (the bound's minimum), the
    most passes over a task matrix, STI, time."""
    groups = defaultdict(list)
    for name, e in rep["tensors"].items():
        groups[(e["path"], tuple(e["shape"]))].append(e)
    lines = [f"{'path':9s} {'shape':>14s} {'tensors':>7s} {'k':>5s} {'energy >=':>10s} {'passes':>6s} "
             f"{'STI mean':>10s} {'time s':>8s}"]
    for (path, shape), es in sorted(groups.items(), key=lambda kv: (kv[0][0], -len(kv[1]))):
        energy = [e["energy"] for e in es if "energy" in e]
        sti = [e["sti"] for e in es if "sti" in e]
        passes = max((e["passes"] for e in es if "passes" in e), default="")
        lines.append(f"{path:9s} {'x'.join(map(str, shape)) or 'scalar':>14s} {len(es):7d} "
                     f"{es[0].get('k', 0) or '':>5} {min(energy) if energy else float('nan'):10.4f} {passes:>6} "
                     f"{sum(sti) / len(sti) if sti else float('nan'):10.4g} {sum(e['time_s'] for e in es):8.3f}")
    s = rep["summary"]
    lines.append(f"{s['tensors']} tensors: {s['spectral']} spectral, {s['dense']} dense, {s['copy']} copied; "
                 f"backend {rep['backend']['backend']} on {rep['backend']['device']}; {s['wall_s']:.2f} s")
    for name, bound in s.get("capped", {}).items():
        lines.append(f"capped: {name} stopped at max_passes with captured energy >= {bound:.4f}")
    for name in s["fallbacks"]:
        lines.append(f"note: {name}: {rep['tensors'][name]['note']}")
    for primitive, reasons in rep["backend"].get("fallbacks", {}).items():
        for why, calls in reasons.items():
            lines.append(f"note: {rep['backend']['backend']} kernel declined {primitive} ({why}) {calls}x: ran in torch")
    return "\n".join(lines)


def picture_format(path: str) -> str:
    """The picture format a path asks for (its extension; png without one), checked before any
    work: matplotlib installed and able to write it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ValueError("writing a plot needs matplotlib: pip install 'tsvmerge[demo]'") from None
    ext = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if ext not in formats:
        raise ValueError(f"{path}: cannot write a .{ext} picture; use one of .{', .'.join(sorted(formats))}")
    return ext


def plot_interference(rep: dict, path: str, format: str | None = None) -> None:
    """STI per tensor (before and after orthogonalisation) and the mean task-pair overlap."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(rep["tensors"])
    before = [rep["tensors"][n]["sti"] for n in names]
    after = [max(rep["tensors"][n]["sti_orthogonalized"], 1e-30) for n in names]
    overlap = np.mean([np.array(rep["tensors"][n]["overlap_u"]) for n in names], axis=0)
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2.2, 1]})
    x = np.arange(len(names))
    a.semilogy(x, before, ".-", label="before (concatenated TSVs)")
    a.semilogy(x, after, ".-", label="after orthogonalisation")
    a.set_xlabel("spectral tensor (model order)")
    a.set_ylabel("STI")
    a.set_title("Singular Task Interference per tensor")
    a.legend()
    im = b.imshow(overlap, vmin=0, vmax=1, cmap="viridis")
    ticks = np.arange(len(overlap))
    b.set_xticks(ticks, [str(t + 1) for t in ticks])
    b.set_yticks(ticks, [str(t + 1) for t in ticks])
    b.set_title("task-pair overlap of U (mean over tensors)", fontsize=10)
    b.set_xlabel("task")
    b.set_ylabel("task")
    fig.colorbar(im, ax=b)
    fig.tight_layout()
    fig.savefig(path, dpi=90, format=format)
    plt.close(fig)
