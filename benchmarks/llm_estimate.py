"""What a 70B-parameter LLM over 8 tasks would cost on 8 ranks, from per-tensor costs measured here.

    python benchmarks/llm_estimate.py [--scale 4] [--tasks 8] [--ranks 8]

A LLaMA-2-70B-shaped model is too large to merge on this machine in a benchmark's time, so one
decoder layer at 1/scale of its widths (hidden 8192 / scale, MLP 28672 / scale, grouped K/V
1024 / scale) is merged for real, over --tasks power-law task vectors, in memory, on one thread
(backend torch, the default energy target). Each tensor's measured time (the report's time_s)
against the cost model that splits merges across ranks (`plan.tensor_cost`) gives the model's
error per shape and a calibration factor; the calibrated model then prices the full 70B model
(80 layers, embeddings, head), split over --ranks by `plan.split_by_cost`: the expected wall
time is the costliest rank's share. Bytes are priced at the model's read rate (1 GB/s per rank).
Results go to benchmarks/results/llm_estimate-<device>-<commit>-<time>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from recording import RESULTS, Record

LLAMA_70B = {"hidden": 8192, "mlp": 28672, "kv": 1024, "layers": 80, "vocab": 32000}
# A GPU rank, assumed (none was lent): sustained fp32 GEMM (an H100/H200's peak is ~60 Tflop/s)
# and the rate it reads its share from a shared file system.
GPU_FLOPS = 40e12
GPU_READ = 2e9


def layer_shapes(hidden: int, mlp: int, kv: int) -> dict:
    return {"self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv, hidden),
            "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, hidden),
            "mlp.gate_proj.weight": (mlp, hidden), "mlp.up_proj.weight": (mlp, hidden),
            "mlp.down_proj.weight": (hidden, mlp), "input_layernorm.weight": (hidden,),
            "post_attention_layernorm.weight": (hidden,)}


def model_shapes(c: dict) -> dict:
    shapes = {"model.embed_tokens.weight": (c["vocab"], c["hidden"]), "model.norm.weight": (c["hidden"],),
              "lm_head.weight": (c["vocab"], c["hidden"])}
    for i in range(c["layers"]):
        shapes.update({f"model.layers.{i}.{n}": s for n, s in layer_shapes(c["hidden"], c["mlp"], c["kv"]).items()})
    return shapes


def power_law_task(shape, gen) -> torch.Tensor:
    """A task vector with singular values falling about as i^-1 over its rank (a fine-tune's
    shape: Gaussian factors, nearly orthogonal at these sizes, so no QR), 1% of the weights'
    scale."""
    if len(shape) == 1:
        return 1e-3 * torch.randn(shape, generator=gen)
    m, n = shape
    r = min(m, n)
    s = torch.arange(1, r + 1, dtype=torch.float32).pow(-1.0)
    tau = (torch.randn(m, r, generator=gen) * s) @ torch.randn(n, r, generator=gen).T
    return tau * (1e-2 * (m * n) ** 0.5 * 0.02 / tau.norm())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--results", default=RESULTS)
    a = ap.parse_args(argv)
    record = Record("llm_estimate", results=a.results)
    torch.set_num_threads(1)
    import tsvmerge
    from tsvmerge.io import TensorInfo
    from tsvmerge.plan import (BYTES_PER_S, FLOPS_PER_S, SPECTRAL, Batch, MergePlan, TensorPlan, merge_rank,
                               split_by_cost, tensor_cost, tensor_work)

    c = {k: v // a.scale for k, v in LLAMA_70B.items() if k != "layers"}
    shapes = layer_shapes(c["hidden"], c["mlp"], c["kv"])
    gen = torch.Generator().manual_seed(0)
    base = {n: 0.02 * torch.randn(s, generator=gen) for n, s in shapes.items()}
    tasks = [{n: base[n] + power_law_task(s, gen) for n, s in shapes.items()} for _ in range(a.tasks)]
    with tempfile.TemporaryDirectory() as scratch:
        report = os.path.join(scratch, "report.json")
        tsvmerge.merge(base, tasks, backend="torch", progress=False, report=report, batch_bytes=1)
        with open(report) as f:
            rep = json.load(f)

    def plan_of(name, shape, T):
        info = TensorInfo(tuple(shape), torch.float32)
        if len(shape) != 2:
            return TensorPlan(name, info, "dense")
        k, _ = merge_rank(shape, T)
        return TensorPlan(name, info, SPECTRAL, k=k)

    rows, factors = [], []
    for name, e in rep["tensors"].items():
        predicted = tensor_cost(plan_of(name, e["shape"], a.tasks), a.tasks)
        rows.append((name, e["shape"], e["time_s"], predicted))
        if e["path"] == SPECTRAL:
            factors.append(e["time_s"] / predicted)
    calibration = sum(factors) / len(factors)

    full = {n: plan_of(n, s, a.tasks) for n, s in model_shapes(LLAMA_70B).items()}
    cost = {n: tensor_cost(tp, a.tasks) * calibration for n, tp in full.items()}
    plan = MergePlan(None, [None] * a.tasks, full, [Batch(tp.path, tp.info.shape, [n], tp.k) for n, tp in full.items()])
    shares = [[n for b in share for n in b.names] for share in split_by_cost(plan, plan.batches, a.ranks)]
    per_rank = [sum(cost[n] for n in share) for share in shares]
    work = [[sum(tensor_work(full[n], a.tasks)[i] for n in share) for i in (0, 1)] for share in shares]
    gpu = max(b / GPU_READ + f * calibration / GPU_FLOPS for b, f in work)
    total = sum(cost.values())
    params = sum(tp.info.numel for tp in full.values())
    read_tb = params * (a.tasks + 1) * 2 / 1e12
    lines = [f"One LLaMA-2-70B decoder layer at 1/{a.scale} width (hidden {c['hidden']}, MLP {c['mlp']}, K/V "
             f"{c['kv']}) over {a.tasks} power-law task vectors, in memory, backend torch on 1 thread:", "",
             "| tensor | shape | measured (s) | cost model (s) | measured / model |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {'x'.join(map(str, s))} | {t:.3f} | {p:.3f} | {t / p:.2f} |" for n, s, t, p in rows]
    lines += ["", f"Calibration (mean measured / model over the spectral tensors): {calibration:.2f} "
              f"(model: {BYTES_PER_S:.0e} B/s, {FLOPS_PER_S:.0e} flop/s).", "",
              f"LLaMA-2-70B ({params / 1e9:.1f} B parameters, {len(full)} tensors) over {a.tasks} tasks, calibrated: "
              f"{total / 3600:.1f} h on one such thread; split over {a.ranks} ranks by cost: the costliest rank "
              f"{max(per_rank) / 3600:.2f} h, the cheapest {min(per_rank) / 3600:.2f} h "
              f"(balance {min(per_rank) / max(per_rank):.3f}). Reading the inputs in bf16: {read_tb:.2f} TB in all, "
              f"{read_tb / a.ranks * 1e3:.0f} GB per rank.", "",
              f"On 8 GPUs, assumed, not measured: the costliest rank's {max(f for _, f in work) / 1e15:.0f} Pflop "
              f"(times the calibration) at {GPU_FLOPS / 1e12:.0f} Tflop/s and its fp32 bytes at "
              f"{GPU_READ / 1e9:.0f} GB/s: {gpu / 60:.1f} min."]
    record.write({"config": vars(a), "rows": rows, "calibration": calibration, "per_rank_s": per_rank,
                  "per_rank_bytes_flops": work, "gpu_estimate_s": gpu,
                  "total_s": total, "params": params}, "A 70B LLM over 8 tasks on 8 ranks: the estimate", lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
