"""FusionBench's own TSV-M against tsvmerge, side by side in one run.

    python benchmarks/peers.py                        # both parts below
    python benchmarks/peers.py --layers 2 --l14-layers 1   # a shorter run: 2 of ViT-B-32's 12 blocks

memory: one in-memory zoo (tsvmerge.zoo: open_clip names, power-law task spectra) goes to
  FusionBench's `compute_and_sum_svd_mem_reduction` (the function its TaskSingularVectorMerging
  runs, given task vectors as that class forms them) and to `tsvmerge.merge` on the
  `reference` and `torch` backends: ViT-B-32 x 8 (--layers of its 12 blocks), and ViT-L-14 x 20
  cut to --l14-layers blocks (the whole zoo, 24 GB, does not fit this machine's memory).
pool: a FusionBench CLIPVisionModelPool of Hugging Face CLIPVisionModel checkpoints on disk
  (the ViT-B/32 vision tower, the same power-law task vectors), merged as FusionBench runs an
  algorithm: its TaskSingularVectorMerging against tsvmerge's TSVMerge. The inputs are evicted
  from the page cache before each run.

Each run is a child process (`--one`), so its peak RSS is its own, taken when the merge returns
(before the child forms and saves its update, which holds more than the merge); it saves its merged update
Delta = theta - theta_0, and the parent reports each Delta's distance from FusionBench's,
||Delta - Delta_fb|| / ||Delta_fb|| per tensor (max and median), and the energy ratio
||Delta||^2 / ||Delta_fb||^2 summed over tensors. Results go to
benchmarks/results/peers[-PART]-<device>-<commit>-<time>.{json,md} (PART when only one runs).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

from peak_child import vm_hwm_bytes
from recording import RESULTS, Record, evict, spawn, timer

IMPLS = ("fusion_bench", "reference", "torch")


# -- one run, in a child process ----------------------------------------------------
def rss_gb() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 1e9


def peak_rss_gb() -> float:
    """This process's peak RSS so far (VmHWM; see peak_child.py for why not ru_maxrss)."""
    return vm_hwm_bytes() / 1e9


def merge_memory(cfg: dict, impl: str):
    import tsvmerge
    from tsvmerge.zoo import make_zoo_dicts
    base, finetuned = make_zoo_dicts(cfg["arch"], cfg["tasks"], cfg["layers"])
    rss = rss_gb()
    with timer() as t:
        if impl == "fusion_bench":
            from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
            task_vectors = []
            for i in range(len(finetuned)):      # as TaskSingularVectorMerging: keep the task vector, drop the model
                task_vectors.append({k: finetuned[i][k] - base[k] for k in base})
                finetuned[i] = None
            update = compute_and_sum_svd_mem_reduction(task_vectors, accelerator="cpu")
            merged = {k: base[k] + update[k] for k in base}
        else:
            merged = tsvmerge.merge(base, finetuned, backend=impl, progress=False)
    return merged, base, rss, peak_rss_gb(), t


def merge_pool(cfg: dict, impl: str):
    import torch
    from fusion_bench.method import TaskSingularVectorMerging
    from fusion_bench.modelpool import CLIPVisionModelPool
    from omegaconf import DictConfig

    from tsvmerge.integrations.fusion_bench import TSVMerge
    paths = cfg["pool"]
    evict([os.path.join(p, "model.safetensors") for p in paths.values()])
    pool = CLIPVisionModelPool(DictConfig(paths))
    rss = rss_gb()
    with timer() as t:
        algorithm = TaskSingularVectorMerging(alpha=1.0) if impl == "fusion_bench" else TSVMerge(backend=impl)
        merged = algorithm.run(pool).state_dict()
    peak = peak_rss_gb()       # before the pretrained model is loaded again to form the update
    with torch.no_grad():
        base = pool.load_pretrained_model().state_dict()
    return merged, base, rss, peak, t


def run_one(cfg: dict) -> dict:
    from safetensors.torch import save_file
    impl = cfg["impl"]
    merged, base, rss, peak, t = (merge_memory if cfg["part"] == "memory" else merge_pool)(cfg, impl)
    save_file({k: (merged[k].float() - base[k].float()).contiguous() for k in base if base[k].is_floating_point()},
              cfg["update_file"])
    return {"wall_s": t.wall_s, "cpu_s": t.cpu_s, "rss_before_merge_gb": rss, "merge_peak_rss_gb": peak}


# -- the parent ----------------------------------------------------------------------
def write_pool(folder: str, tasks: int, layers: int, seed: int = 0) -> dict:
    """A base CLIPVisionModel (ViT-B/32 vision tower) and `tasks` fine-tunes, with tsvmerge.zoo's
    power-law task vectors on every tensor (by the tensor's own name and shape)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from tsvmerge.zoo import _task_deltas
    torch.manual_seed(seed)
    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=layers,
                                             num_attention_heads=12, image_size=224, patch_size=32))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    paths = {"_pretrained_": os.path.join(folder, "base")}
    model.save_pretrained(paths["_pretrained_"])
    deltas = {k: list(_task_deltas(k, tuple(v.shape), tasks, seed, "powerlaw")) for k, v in base.items()}
    for t in range(tasks):
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(base[k] + deltas[k][t])
        paths[f"task{t:02d}"] = os.path.join(folder, f"task{t:02d}")
        model.save_pretrained(paths[f"task{t:02d}"])
    return paths


def agreement(update_file: str, reference_file: str) -> dict:
    import torch
    from safetensors.torch import load_file
    mine, ref = load_file(update_file), load_file(reference_file)
    errors = [float((mine[k] - ref[k]).norm() / ref[k].norm()) for k in ref if ref[k].norm() > 0]
    energy = sum(float(mine[k].double().pow(2).sum()) for k in ref) / sum(float(ref[k].double().pow(2).sum()) for k in ref)
    return {"max_rel_diff": max(errors), "median_rel_diff": float(torch.tensor(errors).median()), "energy_ratio": energy}


def run_zoo(name: str, base_cfg: dict, impls, scratch: str) -> list:
    rows = []
    stem = os.path.join(scratch, "".join(c if c.isalnum() else "_" for c in name))   # names hold "/"
    for impl in impls:
        cfg = {**base_cfg, "impl": impl, "update_file": f"{stem}-{impl}.safetensors"}
        print(f"{name}: {impl} ...", flush=True)
        row = {"zoo": name, "impl": impl, "part": cfg["part"], **spawn(__file__, cfg)}
        if "error" not in row:
            ref = f"{stem}-fusion_bench.safetensors"
            row.update(agreement(cfg["update_file"], ref) if os.path.exists(ref) else {})
        print(f"  {json.dumps(row)}", flush=True)
        rows.append(row)
    return rows


def table(rows: list) -> list:
    lines = ["| zoo | implementation | wall (s) | CPU (s) | vs FusionBench, wall / CPU | peak RSS of the merge (GB) "
             "| RSS added by the merge (GB) | max / median rel. diff from FusionBench | energy ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    fb = {r["zoo"]: r for r in rows if r["impl"] == "fusion_bench" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['zoo']} | {r['impl']} | {r['error']} | | | | | | |")
            continue
        ref = fb.get(r["zoo"])
        speed = f"{ref['wall_s'] / r['wall_s']:.2f}x / {ref['cpu_s'] / r['cpu_s']:.2f}x" if ref else ""
        peak = r["merge_peak_rss_gb"]     # the child's peak when the merge returned, before its update is saved
        added = peak - r["rss_before_merge_gb"]
        diff = f"{r['max_rel_diff']:.2e} / {r['median_rel_diff']:.2e}" if "max_rel_diff" in r else ""
        energy = f"{r['energy_ratio']:.5f}" if "energy_ratio" in r else ""
        lines.append(f"| {r['zoo']} | {r['impl']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {speed} | {peak:.2f} "
                     f"| {added:.2f} | {diff} | {energy} |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["memory", "pool"], choices=["memory", "pool"])
    p.add_argument("--layers", type=int, default=12, help="blocks of the ViT-B-32 x 8 zoo and of the pool (of 12)")
    p.add_argument("--l14-layers", type=int, default=2, help="blocks of the ViT-L-14 x 20 zoo (0: skip it)")
    p.add_argument("--scratch", default=None, help="folder for the on-disk pool and the saved updates")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS,
                   help="implementations to run (FusionBench's takes about 17 min for the pool here)")
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    record = Record("peers" if len(args.parts) == 2 else f"peers-{args.parts[0]}", "cpu", args.results)
    scratch = tempfile.mkdtemp(prefix="tsvmerge-peers-", dir=args.scratch)
    rows = []
    try:
        if "memory" in args.parts:
            rows += run_zoo(f"ViT-B-32 x 8 ({args.layers} blocks), in memory",
                            {"part": "memory", "arch": "ViT-B-32", "tasks": 8, "layers": args.layers}, args.impls, scratch)
            if args.l14_layers:
                rows += run_zoo(f"ViT-L-14 x 20 ({args.l14_layers} blocks), in memory",
                                {"part": "memory", "arch": "ViT-L-14", "tasks": 20, "layers": args.l14_layers}, args.impls, scratch)
        if "pool" in args.parts:
            print("writing the CLIPVisionModel pool ...", flush=True)
            paths = write_pool(os.path.join(scratch, "pool"), 8, args.layers)
            rows += run_zoo(f"CLIPVisionModel ViT-B/32 x 8 ({args.layers} blocks) from disk, through FusionBench",
                            {"part": "pool", "pool": paths},
                            [i for i in ("fusion_bench", "torch") if i in args.impls], scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lines = table(rows)
    record.write({"rows": rows}, "FusionBench's TSV-M against tsvmerge", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
