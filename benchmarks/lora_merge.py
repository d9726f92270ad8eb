"""TSV-M of PEFT LoRA adapters from their factors, against densifying them and merging densely.

    python benchmarks/lora_merge.py                                      # the target (issue 13)
    python benchmarks/lora_merge.py --hidden 512 --intermediate 1376 --layers 2   # a quick check

Writes a synthetic Llama-shaped bf16 base (q/k/v/o hidden x hidden, gate/up intermediate x
hidden, down hidden x intermediate, two RMSNorm vectors per layer) and `--adapters` PEFT LoRA
adapter folders of rank `--rank` on all seven matrices of every layer, under `--scratch`; then,
each in a child process whose peak RSS is its own (`os.wait4`), with the inputs evicted from the
page cache first:
- lora: `tsvmerge merge BASE ADAPTER... -o OUT` (the command line: adapters read as factors);
- dense: the same merge of the adapters densified, theta_i = base + s B A in fp32 (what
  `merge_and_unload` gives, at the precision where its rank stays r: the dense path's most
  favourable input), made as the engine reads each tensor, so no densified model touches the disk.
Results go to benchmarks/results/lora_merge-<device>-<commit>-<time>.{json,md}; the scratch
folder is removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import torch

from recording import RESULTS, Record, evict, loadavg, run_child, timer

MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def shapes(hidden: int, intermediate: int, layers: int) -> dict:
    out = {}
    for l in range(layers):
        p = f"model.layers.{l}."
        for m in MODULES:
            out[p + m + ".weight"] = ((intermediate, hidden) if m in ("mlp.gate_proj", "mlp.up_proj") else
                                      (hidden, intermediate) if m == "mlp.down_proj" else (hidden, hidden))
        out[p + "input_layernorm.weight"] = (hidden,)
        out[p + "post_attention_layernorm.weight"] = (hidden,)
    out["model.norm.weight"] = (hidden,)
    return out


def write_base(folder: str, model: dict, seed: int) -> None:
    """bf16 weights ~N(0, 0.02), norms ~1, streamed tensor by tensor."""
    from tsvmerge.io import SafetensorsWriter, TensorInfo
    os.makedirs(folder)
    writer = SafetensorsWriter(os.path.join(folder, "model.safetensors"),
                               {n: TensorInfo(s, torch.bfloat16) for n, s in model.items()}, {"format": "pt"})
    gen = torch.Generator().manual_seed(seed)
    for name, shape in model.items():
        x = torch.randn(shape, generator=gen)
        writer.write(name, (0.02 * x if len(shape) == 2 else 1 + 0.1 * x).to(torch.bfloat16))
    writer.close()


def write_adapter(folder: str, model: dict, rank: int, alpha: int, seed: int) -> None:
    """A PEFT LoRA adapter folder on every matrix: A ~N(0, 1/in), B ~N(0, sigma), sigma such that
    ||s B A||_F is about 1% of the weight's norm, as after fine-tuning; bf16, as PEFT saves it."""
    from tsvmerge.io import save_file
    os.makedirs(folder)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in model.items():
        if len(shape) != 2:
            continue
        out_f, in_f = shape
        sigma = 0.01 * 0.02 * (in_f ** 0.5) / (alpha / rank) / (rank ** 0.5)
        key = "base_model.model." + name.removesuffix(".weight")
        tensors[key + ".lora_A.weight"] = (torch.randn(rank, in_f, generator=gen) / in_f ** 0.5).to(torch.bfloat16)
        tensors[key + ".lora_B.weight"] = (sigma * torch.randn(out_f, rank, generator=gen)).to(torch.bfloat16)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), {"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": [m.split(".")[1] for m in MODULES],
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "bias": "none", "task_type": "CAUSAL_LM"}
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


# -- the dense baseline's input ---------------------------------------------------------------
def densified(adapter_folder: str, base_folder: str):
    """The adapter as a fine-tuned model theta = base + s B A (fp32), formed tensor by tensor."""
    from tsvmerge.io import open_checkpoint
    from tsvmerge.io.checkpoint import Checkpoint
    from tsvmerge.io.lora import LoraAdapter

    class Densified(Checkpoint):
        def __init__(self):
            self.base = open_checkpoint(base_folder)
            self.adapter = LoraAdapter(adapter_folder, self.base)
            self.source = adapter_folder + " (densified)"

        def infos(self):
            return self.base.infos()

        def read(self, name):
            theta = self.base.read(name).float()
            m = self.adapter.modules.get(name)
            if m is not None:
                left, right = m.factors(self.adapter.store, torch.float32)
                theta.addmm_(left, right.T, alpha=m.scale)
            return theta

        def release(self):
            self.base.release()
            self.adapter.release()

        def fingerprint(self):
            return self.adapter.fingerprint()

    return Densified()


def dense_child(cfg: dict) -> None:
    import tsvmerge
    tsvmerge.merge(cfg["base"], [densified(a, cfg["base"]) for a in cfg["adapters"]], out=cfg["out"], progress=False)


# -- measuring ----------------------------------------------------------------------------------
def measure(argv: list, inputs: list) -> dict:
    """Run argv in a child; wall time, its own CPU time and peak RSS, and the load average around it."""
    evict(inputs)
    start = loadavg()
    run = run_child(argv)
    if run["returncode"] != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed with exit code {run['returncode']}")
    return {"wall_s": round(run["wall_s"], 2), "peak_rss_gb": round(run["peak_rss_gb"], 3),
            "cpu_s": round(run["cpu_s"], 1), "loadavg_start": start, "loadavg_end": loadavg()}


def max_relative_difference(a: str, b: str, names: list) -> float:
    """Between two merged folders, max over `names` of ||a - b|| / ||b|| (weights as written)."""
    from tsvmerge.io import open_checkpoint
    x, y = open_checkpoint(a), open_checkpoint(b)
    return max(float((x.read(n).double() - y.read(n).double()).norm() / y.read(n).double().norm()) for n in names)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--scratch", default=tempfile.gettempdir())
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--skip-dense", action="store_true", help="measure the LoRA merge only")
    p.add_argument("--dense-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.dense_child:
        return dense_child(json.loads(args.dense_child))

    model = shapes(args.hidden, args.intermediate, args.layers)
    base_bytes = sum(2 * torch.Size(s).numel() for s in model.values())
    largest = max(2 * torch.Size(s).numel() for s in model.values())
    need = 2 * base_bytes + args.adapters * base_bytes // 50 + (2 << 30)   # base, one merged output, margin
    free = shutil.disk_usage(args.scratch).free
    print(f"scratch {args.scratch}: {free / 1e9:.1f} GB free, {need / 1e9:.1f} GB needed")
    if free < need:
        raise SystemExit("not enough free disk: pass --scratch on a larger file system")
    work = tempfile.mkdtemp(prefix="tsvmerge-lora-bench-", dir=args.scratch)
    record = Record("lora_merge", "cpu", args.results)
    summary = {"base_gb": round(base_bytes / 1e9, 3), "largest_base_tensor_gb": round(largest / 1e9, 4)}
    try:
        base = os.path.join(work, "base")
        with timer() as t:
            write_base(base, model, seed=0)
            adapters = [os.path.join(work, f"adapter{i}") for i in range(args.adapters)]
            for i, folder in enumerate(adapters):
                write_adapter(folder, model, args.rank, args.alpha, seed=i + 1)
        summary["write_inputs_s"] = round(t.wall_s, 1)
        inputs = [os.path.join(base, "model.safetensors")] + [os.path.join(a, "adapter_model.safetensors") for a in adapters]
        out_lora, out_dense = os.path.join(work, "merged-lora"), os.path.join(work, "merged-dense")
        rows = {"lora": measure([sys.executable, "-m", "tsvmerge.cli", "merge", base, *adapters, "-o", out_lora,
                                 "--no-progress"], inputs)}
        with open(os.path.join(out_lora, "tsvmerge_report.json")) as f:
            rows["lora"]["summary"] = json.load(f)["summary"]
        if not args.skip_dense:
            cfg = {"base": base, "adapters": adapters, "out": out_dense}
            rows["dense"] = measure([sys.executable, os.path.abspath(__file__), "--dense-child", json.dumps(cfg)], inputs)
            names = [n for n in model if len(model[n]) == 2][:7]
            summary["max_relative_weight_difference"] = max_relative_difference(out_lora, out_dense, names)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_results(record, summary, rows, args)


def write_results(record: Record, summary: dict, rows: dict, args) -> None:
    lines = [f"bf16 base of {summary['base_gb']} GB, largest tensor {summary['largest_base_tensor_gb']} GB.",
             "", "| run | wall s | CPU s | peak RSS GB | load average at start, end |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['wall_s']} | {r['cpu_s']} | {r['peak_rss_gb']} | {r['loadavg_start']}, "
                     f"{r['loadavg_end']} |")
    lora = rows["lora"]
    lines += ["", f"- LoRA merge peak RSS over the largest base tensor: "
              f"{lora['peak_rss_gb'] - summary['largest_base_tensor_gb']:.2f} GB (target <= 2 GB)."]
    if "dense" in rows:
        lines.append(f"- Densify-and-merge over LoRA merge, wall: {rows['dense']['wall_s'] / lora['wall_s']:.1f}x "
                     f"(target >= 20x); CPU: {rows['dense']['cpu_s'] / lora['cpu_s']:.1f}x.")
        lines.append(f"- The two merged models differ by at most {summary['max_relative_weight_difference']:.2e} "
                     "(relative, bf16 weights as written, first layer's matrices).")
    record.write({"summary": summary, "rows": rows}, f"LoRA merge: {args.adapters} adapters of rank {args.rank}, hidden "
                 f"{args.hidden}, intermediate {args.intermediate}, {args.layers} layers", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
