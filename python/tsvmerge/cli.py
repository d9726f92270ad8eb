"""The `tsvmerge` command line."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import signal
import sys
import traceback
import warnings

from . import __version__
from .api import alpha_folder, alpha_list
from .backends import BACKENDS, importable_options
from .distributed import PeerLost, Stopped, env_rank, launched
from .methods import METHODS
from .methods.steps import STEP_OPTIONS
from .io import InputError, OutputError
from .warn import TsvmergeWarning
from .options import add_flags, finite_float, given_flags
from .signals import handled
from .zoo import SPECTRA

EXIT_OK, EXIT_FAILED, EXIT_INPUT = 0, 1, 2
_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (the usage is in --help), exit 2."""

    def error(self, message):
        self.exit(EXIT_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) * _UNITS[m.group(2).upper()] < 1:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 2GB, 500MB, 1GiB; at least 1 byte)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_rank(text: str):
    """0.1 is a fraction of min(m, n), 32 an absolute rank."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a rank: {text!r} (a fraction like 0.1 or a whole number like 32)")
    if "." not in text and "e" not in text.lower() and value == int(value):
        value = int(value)
    if not (0 < value <= 1 or (isinstance(value, int) and value >= 1)):
        raise argparse.ArgumentTypeError(f"not a rank: {text!r} (a fraction in (0, 1] or a whole number >= 1)")
    return value


def parse_alphas(text: str) -> tuple[float, ...]:
    """One alpha, or several as a comma list (0.2,0.5,1.0)."""
    items, values = text.split(","), []
    for i, item in enumerate(items):
        try:
            values.append(finite_float(item))
        except ValueError:
            what = "is empty" if not item.strip() else f"{item.strip()!r} is not a finite number"
            where = f"item {i + 1} " if len(items) > 1 else ""
            raise argparse.ArgumentTypeError(f"not a finite number or a comma list of them: {text!r} ({where}{what})") \
                from None
    try:
        return alpha_list(values)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def whole_number(low: int):
    """A whole number >= `low`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"not a whole number >= {low}: {text!r}")
        return value
    return parse


def _declared(kind: str, declarations: dict) -> tuple[list, dict]:
    """Options that several methods (or backends) declare, once each (the same declaration, up
    to the default: where defaults differ the flag shows none, its help says them), and who
    declares each, for the help text."""
    options, owners = {}, {}
    for owner, declared in declarations.items():
        for o in declared:
            first = options.setdefault(o.name, o)
            if dataclasses.replace(first, default=None) != dataclasses.replace(o, default=None):
                raise RuntimeError(f"option {o.name} is declared twice, differently")  # a programming error
            if first.default != o.default:
                options[o.name] = dataclasses.replace(o, default=None)
            owners.setdefault(o.name, []).append(owner)
    return list(options.values()), {name: f"{kind} {'/'.join(who)}" if len(who) < len(declarations) else f"every {kind}"
                                    for name, who in owners.items()}


BACKEND_FLAGS = _declared("backend", importable_options())
METHOD_FLAGS = _declared("method", {m.name: m.options for m in METHODS.values()})
TSV_OWN = tuple(o for o in METHODS["tsv"].options if o not in STEP_OPTIONS)   # interference's: no merge steps


TRUST_HELP = ("unpickle .pt/.bin files that hold whole pickled modules (as the TSV paper's checkpoints do) and "
              "take their state_dict(); this can run code from the file: use it only for files you trust")


PEFT_HELP = ("model: a model folder (default); peft: the merged update as a PEFT LoRA adapter folder that "
             "PeftModel.from_pretrained(base, folder) loads (method tsv; only matrices on the spectral path may change)")


def _common(p, *, task_list=True):
    p.add_argument("base", help="base checkpoint: .safetensors, .pt/.bin, or a model folder")
    if task_list:
        p.add_argument("finetuned", nargs="+", help="fine-tuned checkpoints (or TSV-C files, or PEFT LoRA adapter folders)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="keep matching 2-D tensors off the spectral path (substring, or glob with * ? [); repeatable")
    p.add_argument("--preset", choices=["clip"], help="clip: the paper's semantics (exclude 'text_projection')")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", help="compute dtype (float32, bfloat16, float64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD")
    p.add_argument("--batch-memory", type=parse_size, default=None, metavar="SIZE",
                   help="memory budget of one batch of layers x tasks (default 1GiB)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_HELP)
    add_flags(p, *BACKEND_FLAGS)


def _engine_kwargs(a) -> dict:
    kw = {"exclude": a.exclude, "preset": a.preset, "backend": a.backend, "device": a.device,
          "compute_dtype": a.dtype, "seed": a.seed, "progress": False if a.no_progress else True,
          "trust_pickle": a.trust_pickle, "distributed": launched(),
          **given_flags(a, BACKEND_FLAGS[0])}
    if a.batch_memory:
        kw["batch_bytes"] = a.batch_memory
    return kw


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tsvmerge", description="Merge, compress and analyse fine-tuned "
                     "checkpoints with Task Singular Vectors.")
    parser.add_argument("--version", action="version", version=f"tsvmerge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("merge", help="merge fine-tuned checkpoints into the base")
    _common(p)
    p.add_argument("-o", "--out", required=True, help="output model folder (published whole at the end)")
    p.add_argument("--method", default="tsv", help=", ".join(METHODS))
    p.add_argument("--alpha", type=parse_alphas, default=(1.0,),
                   help="scale of the update (default 1.0); several as a comma list (0.2,0.5,1.0): the update is "
                        "computed once and each merge written to OUT/alpha-A/")
    add_flags(p, *METHOD_FLAGS)
    p.add_argument("--out-dtype", help="dtype of the merged floating tensors (default: the base's)")
    p.add_argument("--shard-size", type=parse_size, default=parse_size("5GB"), help="max shard size (default 5GB)")
    p.add_argument("--report", help="also write the JSON report here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder and report")
    p.add_argument("--output-format", choices=["model", "peft"], default="model", help=PEFT_HELP)

    p = sub.add_parser("compress", help="TSV-C: store a task vector as low-rank factors")
    _common(p, task_list=False)
    p.add_argument("finetuned", help="the fine-tuned checkpoint to compress")
    p.add_argument("-o", "--out", required=True,
                   help="output .safetensors file, or a folder (existing, or ending in /) to write "
                   "NAME.tsvc.safetensors in")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--rank", type=parse_rank, default=0.1,
                   help="kept rank: a fraction of min(m, n) like 0.1, or an absolute rank like 32")

    p = sub.add_parser("decompress", help="rebuild a fine-tuned model from a TSV-C file")
    p.add_argument("base")
    p.add_argument("compressed")
    p.add_argument("-o", "--out", required=True, help="output model folder")
    p.add_argument("--out-dtype")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_HELP)
    p.add_argument("--output-format", choices=["model", "peft"], default="model",
                   help="model: the rebuilt fine-tune (default); peft: its factored tensors as a PEFT LoRA adapter "
                        "folder (only those may differ from the base)")

    p = sub.add_parser("convert", help="write a checkpoint once as a .safetensors file (no unpickling later)")
    p.add_argument("checkpoint", help=".pt/.bin file, .safetensors file or model folder")
    p.add_argument("out", help="output .safetensors file")
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    p = sub.add_parser("interference", help="Singular Task Interference per tensor and task-pair overlaps")
    _common(p)
    add_flags(p, TSV_OWN, {o.name: "as in method tsv" for o in TSV_OWN})
    p.add_argument("--report", help="write the full JSON (with T x T overlaps) here")
    p.add_argument("--plot", help="write a picture (png, pdf, svg): STI per tensor and the mean task-pair overlap")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report or plot")
    p.add_argument("--top", type=whole_number(0), default=10, help="rows to print")

    p = sub.add_parser("inspect", help="summarise a checkpoint, TSV-C file or merged folder")
    p.add_argument("path")
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_HELP)

    p = sub.add_parser("zoo", help="write a synthetic zoo (base + fine-tunes with ViT shapes)")
    p.add_argument("out", help="folder to write")
    p.add_argument("--arch", default="ViT-B-32", help="ViT-B-32, ViT-B-16 or ViT-L-14")
    p.add_argument("--tasks", type=whole_number(1), default=8)
    p.add_argument("--layers", type=whole_number(0), help="override the number of transformer blocks")
    p.add_argument("--spectrum", default="powerlaw", choices=SPECTRA)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")

    p = sub.add_parser("config-dir", help="print the folder of configs shipped for another tool")
    p.add_argument("tool", choices=["fusion_bench"], help="fusion_bench: its Hydra --config-dir")

    # listed for --help; `main` hands everything after `demo` to tsvmerge.demo
    sub.add_parser("demo", help="the built-in example: synthetic zoo merge, then the accuracy benchmark")
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    return parser


def _print_notes(inputs: list) -> None:
    for entry in inputs:
        for note in entry.get("notes", ()):
            print(f"  note: {entry['source']}: {note}")


def _print_adapter(adapter) -> None:
    if adapter is None:
        return
    ranks = adapter["ranks"]
    print(f"  written as a PEFT LoRA adapter: {len(ranks)} modules, rank "
          f"{min(ranks.values(), default=0)}..{max(ranks.values(), default=0)}")
    if adapter.get("assumed_linear"):
        print(f"  note: no input adapter gave the layer type of {len(adapter['assumed_linear'])} modules: written as "
              "nn.Linear weights [out, in]")


def _print_carried(carried) -> None:
    if carried:
        print(f"  carried from the base folder: {', '.join(carried)}")


def _print_merge(rep: dict, out: str) -> None:
    s = rep["summary"]
    print(f"merged {s['tensors']} tensors with {rep['method']} on backend {rep['backend']['backend']} "
          f"({rep['backend']['device']}) in {s['wall_s']:.2f} s -> {out}")
    print(f"  spectral {s['spectral']}, dense {s['dense']}, copied {s['copy']}")
    if s.get("min_energy") is not None:
        print(f"  captured energy, a bound that errs low (min over spectral tensors): {s['min_energy']:.4f}")
    for name, bound in s.get("capped", {}).items():
        print(f"  capped: {name} stopped at --max-passes with captured energy >= {bound:.4f}")
    for name in s["fallbacks"]:
        print(f"  note: {name}: {rep['tensors'][name]['note']}")
    _print_notes(rep["inputs"])
    _print_carried(rep.get("carried"))


def _cmd_merge(a) -> int:
    from . import merge
    kw = {**_engine_kwargs(a), **given_flags(a, METHOD_FLAGS[0])}
    alpha = {"alpha": a.alpha[0]} if len(a.alpha) == 1 else {"alphas": a.alpha}
    rep = merge(a.base, a.finetuned, method=a.method, out=a.out, out_dtype=a.out_dtype, shard_size=a.shard_size,
                report=a.report, overwrite=a.overwrite, output_format=a.output_format, **alpha, **kw)
    if env_rank() != 0:         # rank 0 speaks for a distributed run
        return EXIT_OK
    if len(a.alpha) == 1:
        _print_merge(rep, a.out)
        _print_adapter(rep.get("adapter"))
    else:       # one update, several outputs: the same report but for alpha
        _print_merge(rep[a.alpha[0]], ", ".join(os.path.join(a.out, alpha_folder(x)) for x in a.alpha))
    return EXIT_OK


def _cmd_compress(a) -> int:
    from . import compress
    rep = compress(a.base, a.finetuned, rank=a.rank, out=a.out, overwrite=a.overwrite, **_engine_kwargs(a))
    if env_rank() != 0:
        return EXIT_OK
    s = rep["summary"]
    print(f"compressed {a.finetuned} -> {rep['out']}: {s['factored']} tensors factored, "
          f"{s['stored_numbers']:,} of {s['dense_numbers']:,} numbers ({100 * s['ratio']:.1f}%)")
    return EXIT_OK


def _cmd_decompress(a) -> int:
    from . import decompress
    rep = decompress(a.base, a.compressed, out=a.out, out_dtype=a.out_dtype, overwrite=a.overwrite,
                     trust_pickle=a.trust_pickle, output_format=a.output_format)
    print(f"decompressed {rep['tensors']} tensors -> {rep['out']}")
    _print_carried(rep.get("carried"))
    _print_adapter(rep.get("adapter"))
    return EXIT_OK


def _cmd_convert(a) -> int:
    from . import convert
    rep = convert(a.checkpoint, a.out, trust_pickle=a.trust_pickle, overwrite=a.overwrite)
    print(f"converted {rep['tensors']} tensors: {rep['source']} -> {rep['out']}")
    _print_notes([rep])
    return EXIT_OK


def _cmd_interference(a) -> int:
    from . import interference
    kw = {**_engine_kwargs(a), **given_flags(a, TSV_OWN)}
    rep = interference(a.base, a.finetuned, report=a.report, plot=a.plot, overwrite=a.overwrite, **kw)
    if env_rank() != 0:
        return EXIT_OK
    rows = sorted(rep["tensors"].items(), key=lambda kv: -kv[1]["sti"])
    print(f"{'tensor':60s} {'k':>5s} {'STI':>12s} {'after':>10s}")
    for name, e in rows[: a.top]:
        print(f"{name[-60:]:60s} {e['k']:5d} {e['sti']:12.4g} {e['sti_orthogonalized']:10.2g}")
    if a.plot:
        print(f"plot -> {a.plot}")
    return EXIT_OK


def _cmd_inspect(a) -> int:
    from .io import CompressedTask, open_checkpoint
    ckpt = open_checkpoint(a.path, a.trust_pickle)
    infos = ckpt.infos()
    total = sum(i.numel for i in infos.values())
    dtypes = sorted({str(i.dtype).replace("torch.", "") for i in infos.values()})
    print(f"{ckpt.source}: {len(infos)} tensors, {total:,} numbers, dtypes {', '.join(dtypes)}")
    for note in ckpt.notes:
        print(f"  note: {note}")
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
        try:
            with open(report) as f:
                rep = json.load(f)
            print(f"  merged by tsvmerge {rep['tsvmerge_version']}: method {rep['method']}, alpha {rep['alpha']}, "
                  f"backend {rep['backend']['backend']}, {rep['summary']}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(report, None, f"is not a tsvmerge report ({type(e).__name__}: {e})") from None
    return EXIT_OK


def _cmd_zoo(a) -> int:
    from .zoo import make_zoo
    zoo = make_zoo(a.out, arch=a.arch, tasks=a.tasks, layers=a.layers, seed=a.seed, spectrum=a.spectrum,
                   overwrite=a.overwrite)
    print(f"zoo: base {zoo.base}, {len(zoo.finetuned)} fine-tunes in {a.out}")
    return EXIT_OK


def _cmd_config_dir(a) -> int:
    from .integrations import config_dir
    print(config_dir(a.tool))
    return EXIT_OK


COMMANDS = {"merge": _cmd_merge, "compress": _cmd_compress, "decompress": _cmd_decompress, "convert": _cmd_convert,
            "interference": _cmd_interference, "inspect": _cmd_inspect, "zoo": _cmd_zoo, "config-dir": _cmd_config_dir}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:
        from .demo import main as demo_main
        rest = [x for x in argv[1:] if x != "--debug"]
        return _run("tsvmerge demo", lambda: demo_main(rest), "--debug" in argv)
    args = build_parser().parse_args(argv)
    return _run(f"tsvmerge {args.command}", lambda: COMMANDS[args.command](args), args.debug)


def exit_code(e: BaseException) -> int:
    """The exit code of a command that raised `e`."""
    if isinstance(e, KeyboardInterrupt):
        return 128 + getattr(e, "signum", 2)
    if isinstance(e, Stopped):
        return e.exit_code
    if isinstance(e, (InputError, OutputError, ValueError, TypeError)) or (isinstance(e, OSError) and e.filename):
        return EXIT_INPUT
    return EXIT_FAILED


def _run(prog: str, command, debug: bool) -> int:
    """Run a command: warnings as one line each, stopping signals as Ctrl-C, every error as
    one line (the traceback only with --debug) and its exit code. Under torchrun, warnings
    come from rank 0 only, an error from the rank that found it, and the other ranks stop
    with its exit code, silently (`distributed.Stopped`)."""
    ignore_after = ()
    if launched():      # decided: torchrun's SIGTERM to the ranks still running must not change the exit code
        prog, ignore_after = f"{prog} [rank {env_rank()}]", (signal.SIGTERM,)

    def error(message: str, e: BaseException) -> int:
        if debug:
            traceback.print_exc()
        one_line = re.sub(r"\s*\n\s*", " ", message.strip())
        print(f"{prog}: {one_line}", file=sys.stderr)
        return exit_code(e)

    with warnings.catch_warnings(), handled(prog, ignore_after):
        warnings.simplefilter("always" if env_rank() == 0 else "ignore", TsvmergeWarning)
        show = warnings.showwarning
        warnings.showwarning = lambda message, category, *rest: (
            print(f"{prog}: warning: {message}", file=sys.stderr) if category is TsvmergeWarning
            else show(message, category, *rest))
        try:
            return command()
        except KeyboardInterrupt as e:
            name = e.args[0] if e.args else "SIGINT"
            done = " after the output was published: it is complete" if getattr(e, "published", False) \
                else "; nothing was written"
            return error(f"interrupted ({name}){done}", e)
        except Stopped as e:
            return e.exit_code
        except (InputError, OutputError, ValueError, TypeError, PeerLost) as e:
            return error(f"error: {e}", e)
        except OSError as e:
            if e.filename is None:
                return error(f"internal error: {e} (please report this; --debug shows where)", e)
            return error(f"error: {e.filename}: {e.strerror or e}", e)
        except Exception as e:  # noqa: BLE001 - the last line of defence: one line, exit 1
            return error(f"internal error: {type(e).__name__}: {e} (please report this; --debug shows where)", e)


if __name__ == "__main__":
    sys.exit(main())
