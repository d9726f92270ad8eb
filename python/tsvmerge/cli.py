"""The `tsvmerge` command line."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

from . import __version__
from .backends import BACKENDS

EXIT_OK, EXIT_FAILED, EXIT_INPUT = 0, 1, 2
_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 2GB, 500MB, 1GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_rank(text: str):
    value = float(text)
    return int(value) if value >= 1 and value == int(value) and "." not in text else value


def _common(p, *, task_list=True):
    p.add_argument("base", help="base checkpoint: .safetensors, .pt/.bin, or a model folder")
    if task_list:
        p.add_argument("finetuned", nargs="+", help="fine-tuned checkpoints (or TSV-C files)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="keep matching 2-D tensors off the spectral path (substring, or glob with * ? [); repeatable")
    p.add_argument("--preset", choices=["clip"], help="clip: the paper's semantics (exclude 'text_projection')")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", help="compute dtype (float32, bfloat16, float64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD")
    p.add_argument("--svd", choices=["randomized", "exact"], help="SVD on the fast backends")
    p.add_argument("--power-iters", type=int, help="power iterations of the randomized SVD")
    p.add_argument("--oversample", type=int, help="oversampling of the randomized SVD")
    p.add_argument("--batch-size", type=parse_size, default=None, metavar="BYTES",
                   help="memory budget of one batch of layers x tasks (default 1GiB)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _engine_kwargs(a) -> dict:
    kw = {"exclude": a.exclude, "preset": a.preset, "backend": a.backend, "device": a.device,
          "compute_dtype": a.dtype, "seed": a.seed, "progress": False if a.no_progress else True}
    for key in ("svd", "power_iters", "oversample"):
        if getattr(a, key) is not None:
            kw[key] = getattr(a, key)
    if a.batch_size:
        kw["batch_bytes"] = a.batch_size
    return kw


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsvmerge", description="Merge, compress and analyse fine-tuned "
                                     "checkpoints with Task Singular Vectors.")
    parser.add_argument("--version", action="version", version=f"tsvmerge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("merge", help="merge fine-tuned checkpoints into the base")
    _common(p)
    p.add_argument("-o", "--out", required=True, help="output model folder (written atomically)")
    p.add_argument("--method", default="tsv", help="tsv, task_arithmetic, average, ties")
    p.add_argument("--alpha", type=float, default=1.0, help="scale of the update (default 1.0)")
    p.add_argument("--orthogonalize", choices=["procrustes", "whiten"], help="tsv: how to orthogonalise")
    p.add_argument("--k", type=int, help="tsv: per-task rank (default floor(r/T))")
    p.add_argument("--density", type=float, help="ties: fraction of entries kept per task")
    p.add_argument("--out-dtype", help="dtype of the merged floating tensors (default: the base's)")
    p.add_argument("--shard-size", type=parse_size, default=parse_size("5GB"), help="max shard size (default 5GB)")
    p.add_argument("--report", help="also write the JSON report here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    p = sub.add_parser("compress", help="TSV-C: store a task vector as low-rank factors")
    _common(p, task_list=False)
    p.add_argument("finetuned", help="the fine-tuned checkpoint to compress")
    p.add_argument("-o", "--out", required=True, help="output .safetensors file")
    p.add_argument("--rank", type=parse_rank, default=0.1,
                   help="kept rank: a fraction of min(m, n) like 0.1, or an absolute rank like 32")

    p = sub.add_parser("decompress", help="rebuild a fine-tuned model from a TSV-C file")
    p.add_argument("base")
    p.add_argument("compressed")
    p.add_argument("-o", "--out", required=True, help="output model folder")
    p.add_argument("--out-dtype")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("interference", help="Singular Task Interference per tensor and task-pair overlaps")
    _common(p)
    p.add_argument("--k", type=int, help="per-task rank (default floor(r/T))")
    p.add_argument("--report", help="write the full JSON (with T x T overlaps) here")
    p.add_argument("--plot", help="write a PNG: STI per tensor and the mean task-pair overlap")
    p.add_argument("--top", type=int, default=10, help="rows to print")

    p = sub.add_parser("inspect", help="summarise a checkpoint, TSV-C file or merged folder")
    p.add_argument("path")

    p = sub.add_parser("zoo", help="write a synthetic zoo (base + fine-tunes with ViT shapes)")
    p.add_argument("out", help="folder to write")
    p.add_argument("--arch", default="ViT-B-32", help="ViT-B-32, ViT-B-16 or ViT-L-14")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--layers", type=int, help="override the number of transformer blocks")
    p.add_argument("--spectrum", default="powerlaw", choices=["powerlaw", "gapped"])
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("config-dir", help="print the folder of configs shipped for another tool")
    p.add_argument("tool", choices=["fusion_bench"], help="fusion_bench: its Hydra --config-dir")

    # listed for --help; `main` hands everything after `demo` to tsvmerge.demo
    sub.add_parser("demo", help="the built-in example: synthetic zoo merge, then the accuracy benchmark")
    return parser


def _print_merge(rep: dict, out: str) -> None:
    s = rep["summary"]
    print(f"merged {s['tensors']} tensors with {rep['method']} on backend {rep['backend']['backend']} "
          f"({rep['backend']['device']}) in {s['wall_s']:.2f} s -> {out}")
    print(f"  spectral {s['spectral']}, mean {s['mean']}, copied {s['copy']}")
    if s.get("min_energy") is not None:
        print(f"  captured energy, an estimate that errs low (min over spectral tensors): {s['min_energy']:.4f}")
    for name in s["fallbacks"]:
        print(f"  note: {name}: {rep['tensors'][name]['note']}")


def _cmd_merge(a) -> int:
    from . import merge
    kw = _engine_kwargs(a)
    for key in ("orthogonalize", "k", "density"):
        if getattr(a, key) is not None:
            kw[key] = getattr(a, key)
    rep = merge(a.base, a.finetuned, method=a.method, alpha=a.alpha, out=a.out, out_dtype=a.out_dtype,
                shard_size=a.shard_size, report=a.report, overwrite=a.overwrite, **kw)
    _print_merge(rep, a.out)
    return EXIT_OK


def _cmd_compress(a) -> int:
    from . import compress
    rep = compress(a.base, a.finetuned, rank=a.rank, out=a.out, **_engine_kwargs(a))
    s = rep["summary"]
    print(f"compressed {a.finetuned} -> {a.out}: {s['factored']} tensors factored, "
          f"{s['stored_numbers']:,} of {s['dense_numbers']:,} numbers ({100 * s['ratio']:.1f}%)")
    return EXIT_OK


def _cmd_decompress(a) -> int:
    from . import decompress
    rep = decompress(a.base, a.compressed, out=a.out, out_dtype=a.out_dtype, overwrite=a.overwrite)
    print(f"decompressed {rep['tensors']} tensors -> {rep['out']}")
    return EXIT_OK


def _cmd_interference(a) -> int:
    from . import interference
    kw = _engine_kwargs(a)
    if a.k is not None:
        kw["k"] = a.k
    rep = interference(a.base, a.finetuned, report=a.report, **kw)
    rows = sorted(rep["tensors"].items(), key=lambda kv: -kv[1]["sti"])
    print(f"{'tensor':60s} {'k':>5s} {'STI':>12s} {'after':>10s}")
    for name, e in rows[: a.top]:
        print(f"{name[-60:]:60s} {e['k']:5d} {e['sti']:12.4g} {e['sti_orthogonalized']:10.2g}")
    if a.plot:
        from .report import plot_interference
        plot_interference(rep, a.plot)
        print(f"plot -> {a.plot}")
    return EXIT_OK


def _cmd_inspect(a) -> int:
    from .io import CompressedTask, open_checkpoint
    ckpt = open_checkpoint(a.path)
    infos = ckpt.infos()
    total = sum(i.numel for i in infos.values())
    dtypes = sorted({str(i.dtype).replace("torch.", "") for i in infos.values()})
    print(f"{ckpt.source}: {len(infos)} tensors, {total:,} numbers, dtypes {', '.join(dtypes)}")
    by_shape: dict = {}
    for info in infos.values():
        by_shape[info.shape] = by_shape.get(info.shape, 0) + 1
    for shape, count in sorted(by_shape.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {count:4d} x {list(shape)}")
    if isinstance(ckpt, CompressedTask):
        ranks = {n: ckpt.stored_rank(n) for n in ckpt.shapes}
        print(f"  TSV-C: {len(ranks)} factored tensors, ranks {min(ranks.values())}..{max(ranks.values())}"
              if ranks else "  TSV-C: no factored tensors")
    report = os.path.join(a.path, "tsvmerge_report.json") if os.path.isdir(a.path) else None
    if report and os.path.exists(report):
        with open(report) as f:
            rep = json.load(f)
        print(f"  merged by tsvmerge {rep['tsvmerge_version']}: method {rep['method']}, alpha {rep['alpha']}, "
              f"backend {rep['backend']['backend']}, {rep['summary']}")
    return EXIT_OK


def _cmd_zoo(a) -> int:
    from .zoo import make_zoo
    zoo = make_zoo(a.out, arch=a.arch, tasks=a.tasks, layers=a.layers, seed=a.seed, spectrum=a.spectrum)
    print(f"zoo: base {zoo.base}, {len(zoo.finetuned)} fine-tunes in {a.out}")
    return EXIT_OK


def _cmd_config_dir(a) -> int:
    from .integrations import config_dir
    print(config_dir(a.tool))
    return EXIT_OK


COMMANDS = {"config-dir": _cmd_config_dir, "merge": _cmd_merge, "compress": _cmd_compress, "decompress": _cmd_decompress,
            "interference": _cmd_interference, "inspect": _cmd_inspect, "zoo": _cmd_zoo}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:
        from .demo import main as demo_main
        return demo_main(argv[1:])
    args = build_parser().parse_args(argv)
    from .io import InputError
    try:
        return COMMANDS[args.command](args)
    except (InputError, FileExistsError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"tsvmerge {args.command}: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except (RuntimeError, FloatingPointError) as e:
        print(f"tsvmerge {args.command}: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"tsvmerge {args.command}: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
