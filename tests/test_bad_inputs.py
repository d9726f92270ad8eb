"""Bad arguments, outputs, devices and misuse, each through the real command line (`main`), a
row a case: the exit code, one message line that names the file (or the argument), and
afterwards every input and every file that was there byte for byte as before, no output and
no debris. The strict readers have their own table (tests/test_readers_strict.py).
"""
import hashlib
import json
import os
import re
import shutil
import stat

import pytest
import torch

from tsvmerge.cli import main
from tsvmerge.io import load_file, save_file
from tsvmerge.zoo import Arch, make_zoo

TINY = Arch("tiny", width=16, layers=1, patch=8, image=16, output_dim=8)
NAME = "visual.transformer.resblocks.0.mlp.c_fc.weight"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs every row may use, in one folder whose bytes no row may change."""
    root = tmp_path_factory.mktemp("world")
    zoo = make_zoo(str(root / "zoo"), arch=TINY, tasks=3, seed=11, progress=False)
    p = {"root": str(root), "zoo": str(root / "zoo"), "base": zoo.base, "t1": zoo.finetuned[0],
         "t2": zoo.finetuned[1], "t3": zoo.finetuned[2]}
    os.mkdir(root / "hf")
    shutil.copy(p["t2"], root / "hf" / "model.safetensors")
    p["hf"] = str(root / "hf")
    for name, src in (("base_copy", "base"), ("t1_copy", "t1")):
        p[name] = str(root / f"{name}.safetensors")
        shutil.copy(p[src], p[name])
    os.symlink(p["base"], root / "base_link.safetensors")
    os.symlink(p["zoo"], root / "zoo_link")
    os.link(p["base"], root / "base_hardlink.safetensors")
    p.update(base_link=str(root / "base_link.safetensors"), zoo_link=str(root / "zoo_link"),
             base_hardlink=str(root / "base_hardlink.safetensors"))
    assert main(["compress", p["base"], p["t1"], "-o", str(root / "t1.tsvc.safetensors"), "--rank", "0.5",
                 "--no-progress"]) == 0
    p["tsvc"] = str(root / "t1.tsvc.safetensors")
    task = load_file(p["t1"])
    for name, change in (("nan", lambda t: t[NAME].view(-1).__setitem__(3, float("nan"))),
                         ("inf", lambda t: t[NAME].view(-1).__setitem__(5, float("inf"))),
                         ("missing", lambda t: t.pop(NAME)),
                         ("extra", lambda t: t.__setitem__("extra.weight", torch.ones(2))),
                         ("reshaped", lambda t: t.__setitem__(NAME, t[NAME].reshape(-1))),
                         ("int", lambda t: t.__setitem__(NAME, t[NAME].to(torch.int32)))):
        changed = {k: v.clone() for k, v in task.items()}
        change(changed)
        p[name] = str(root / f"{name}.safetensors")
        save_file(changed, p[name])
    p["file"] = str(root / "a_file.txt")
    (root / "a_file.txt").write_text("not a folder")
    return p


def snapshot(*roots) -> dict:
    """Every path under `roots`: its kind, and the bytes of a file or the target of a link."""
    seen = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = os.path.join(folder, name)
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    seen[path] = ("link", os.readlink(path))
                elif stat.S_ISREG(st.st_mode):
                    with open(path, "rb") as f:
                        seen[path] = ("file", hashlib.sha256(f.read()).hexdigest())
                else:
                    seen[path] = ("folder",)
    return seen


def cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:     # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# Setups of paths a row finds in its own folder ({tmp}).
def _folder_with_file(tmp, name="out"):
    os.makedirs(os.path.join(tmp, name))
    with open(os.path.join(tmp, name, "keep.txt"), "w") as f:
        f.write("mine")


def _file(tmp, name):
    with open(os.path.join(tmp, name), "w") as f:
        f.write("mine")


SETUPS = {
    "out_folder": lambda tmp, w: _folder_with_file(tmp),
    "out_file": lambda tmp, w: _file(tmp, "out"),
    "report_file": lambda tmp, w: _file(tmp, "r.json"),
    "report_folder": lambda tmp, w: _folder_with_file(tmp, "r.json"),
    "plot_file": lambda tmp, w: _file(tmp, "p.png"),
    "c_file": lambda tmp, w: _file(tmp, "c.safetensors"),
    "c_in_folder": lambda tmp, w: (os.mkdir(os.path.join(tmp, "d")), _file(tmp, "d/task_01.tsvc.safetensors")),
    "link_to_folder": lambda tmp, w: (_folder_with_file(tmp, "real"),
                                      os.symlink(os.path.join(tmp, "real"), os.path.join(tmp, "out"))),
    "dangling_link": lambda tmp, w: os.symlink(os.path.join(tmp, "nowhere"), os.path.join(tmp, "out")),
    "broken_report": lambda tmp, w: (_folder_with_file(tmp, "m"), _file(tmp, "m/tsvmerge_report.json"),
                                     shutil.copy(w["base"], os.path.join(tmp, "m", "model.safetensors"))),
}

MERGE = ["merge", "{base}", "{t1}", "{t2}", "--no-progress"]
COMPRESS = ["compress", "{base}", "{t1}", "--no-progress"]
STI = ["interference", "{base}", "{t1}", "{t2}", "--no-progress"]
CUDA = not torch.backends.cuda.is_built()


def row(id, argv, code, names, words="", setup=None, when=True):
    """`names`: what the one message line must contain (a path placeholder or an argument);
    `words`: a regular expression it must match."""
    marks = () if when else (pytest.mark.skip(reason="needs a CPU-only torch"),)
    return pytest.param(argv, code, names, words, setup, id=id, marks=marks)


ROWS = [
    # -- arguments ---------------------------------------------------------------------------
    row("alpha-nan", MERGE + ["-o", "{tmp}/out", "--alpha", "nan"], 2, "--alpha", "finite"),
    row("alpha-inf", MERGE + ["-o", "{tmp}/out", "--alpha", "inf"], 2, "--alpha", "finite"),
    row("alpha-minus-inf", MERGE + ["-o", "{tmp}/out", "--alpha=-inf"], 2, "--alpha", "finite"),
    row("alpha-text", MERGE + ["-o", "{tmp}/out", "--alpha", "big"], 2, "--alpha", "finite"),
    row("rank-inf", COMPRESS + ["-o", "{tmp}/c.safetensors", "--rank", "inf"], 2, "--rank", "not a rank"),
    row("rank-nan", COMPRESS + ["-o", "{tmp}/c.safetensors", "--rank", "nan"], 2, "--rank", "not a rank"),
    row("rank-zero", COMPRESS + ["-o", "{tmp}/c.safetensors", "--rank", "0"], 2, "--rank", "not a rank"),
    row("rank-negative", COMPRESS + ["-o", "{tmp}/c.safetensors", "--rank", "-1"], 2, "--rank", "not a rank"),
    row("rank-fraction-over-1", COMPRESS + ["-o", "{tmp}/c.safetensors", "--rank", "1.5"], 2, "--rank"),
    row("rank-huge-exponent", COMPRESS + ["-o", "{tmp}/c.safetensors", "--rank", "1e400"], 2, "--rank"),
    row("rank-text", COMPRESS + ["-o", "{tmp}/c.safetensors", "--rank", "half"], 2, "--rank"),
    row("shard-size-negative", MERGE + ["-o", "{tmp}/out", "--shard-size", "-5"], 2, "--shard-size", "not a size"),
    row("shard-size-zero", MERGE + ["-o", "{tmp}/out", "--shard-size", "0"], 2, "--shard-size", "not a size"),
    row("shard-size-below-a-byte", MERGE + ["-o", "{tmp}/out", "--shard-size", "0.5B"], 2, "--shard-size"),
    row("shard-size-two-dots", MERGE + ["-o", "{tmp}/out", "--shard-size", "1.2.3"], 2, "--shard-size"),
    row("shard-size-unit", MERGE + ["-o", "{tmp}/out", "--shard-size", "5XB"], 2, "--shard-size"),
    row("shard-size-inf", MERGE + ["-o", "{tmp}/out", "--shard-size", "inf"], 2, "--shard-size"),
    row("batch-memory-zero", MERGE + ["-o", "{tmp}/out", "--batch-memory", "0"], 2, "--batch-memory"),
    row("batch-memory-negative", MERGE + ["-o", "{tmp}/out", "--batch-memory=-1GB"], 2, "--batch-memory"),
    row("k-negative", MERGE + ["-o", "{tmp}/out", "--k", "-1"], 2, "option k=", "whole number"),
    row("k-zero", MERGE + ["-o", "{tmp}/out", "--k", "0"], 2, "option k=", "whole number"),
    row("k-fraction", MERGE + ["-o", "{tmp}/out", "--k", "1.5"], 2, "option k=", "whole number"),
    row("k-too-big", MERGE + ["-o", "{tmp}/out", "--k", "1000"], 2, "k=1000", "T\\*k"),
    row("density-zero", MERGE + ["-o", "{tmp}/out", "--method", "ties", "--density", "0"], 2, "density"),
    row("density-over-1", MERGE + ["-o", "{tmp}/out", "--method", "ties", "--density", "2"], 2, "density"),
    row("density-nan", MERGE + ["-o", "{tmp}/out", "--method", "ties", "--density", "nan"], 2, "density"),
    row("density-for-tsv", MERGE + ["-o", "{tmp}/out", "--density", "0.5"], 2, "density", "unknown option"),
    row("k-for-average", MERGE + ["-o", "{tmp}/out", "--method", "average", "--k", "2"], 2, "k", "unknown option"),
    row("method-unknown", MERGE + ["-o", "{tmp}/out", "--method", "nope"], 2, "nope", "unknown method"),
    row("orthogonalize-unknown", MERGE + ["-o", "{tmp}/out", "--orthogonalize", "qr"], 2, "--orthogonalize"),
    row("power-iters-negative", MERGE + ["-o", "{tmp}/out", "--backend", "torch", "--power-iters", "-1"], 2,
        "power_iters"),
    row("oversample-text", MERGE + ["-o", "{tmp}/out", "--backend", "torch", "--oversample", "many"], 2,
        "oversample"),
    row("seed-text", MERGE + ["-o", "{tmp}/out", "--seed", "x"], 2, "--seed"),
    row("dtype-int", MERGE + ["-o", "{tmp}/out", "--dtype", "int8"], 2, "int8", "floating dtype"),
    row("dtype-unknown", MERGE + ["-o", "{tmp}/out", "--dtype", "float13"], 2, "float13"),
    row("out-dtype-int", MERGE + ["-o", "{tmp}/out", "--out-dtype", "int8"], 2, "int8", "floating dtype"),
    row("out-dtype-unknown", MERGE + ["-o", "{tmp}/out", "--out-dtype", "double-ish"], 2, "double-ish"),
    row("preset-unknown", MERGE + ["-o", "{tmp}/out", "--preset", "llama"], 2, "--preset"),
    row("top-negative", STI + ["--top", "-1"], 2, "--top"),
    row("zoo-tasks-zero", ["zoo", "{tmp}/z", "--tasks", "0"], 2, "--tasks"),
    row("zoo-tasks-negative", ["zoo", "{tmp}/z", "--tasks", "-3"], 2, "--tasks"),
    row("zoo-layers-negative", ["zoo", "{tmp}/z", "--layers", "-1"], 2, "--layers"),
    row("zoo-arch-unknown", ["zoo", "{tmp}/z", "--arch", "ViT-Z-99"], 2, "ViT-Z-99"),
    row("zoo-spectrum-unknown", ["zoo", "{tmp}/z", "--spectrum", "flat"], 2, "--spectrum"),
    row("no-tasks", ["merge", "{base}", "-o", "{tmp}/out"], 2, "finetuned"),
    row("no-output", ["merge", "{base}", "{t1}"], 2, "-o"),
    row("unknown-command", ["mix", "{base}"], 2, "mix"),
    row("unknown-flag", MERGE + ["-o", "{tmp}/out", "--fast"], 2, "--fast"),
    row("compress-takes-no-alpha", COMPRESS + ["-o", "{tmp}/c.safetensors", "--alpha", "2"], 2, "--alpha"),
    row("missing-base", ["merge", "{tmp}/nope.safetensors", "{t1}", "-o", "{tmp}/out"], 2, "{tmp}/nope.safetensors",
        "no such file"),
    row("missing-task", ["merge", "{base}", "{t1}", "{tmp}/nope.pt", "-o", "{tmp}/out"], 2, "{tmp}/nope.pt",
        "no such file"),
    # -- device and backend (on this CPU-only torch) ----------------------------------------
    row("device-cuda", MERGE + ["-o", "{tmp}/out", "--device", "cuda"], 2, "cuda", "without CUDA.*--device cpu",
        when=CUDA),
    row("device-cuda-1", MERGE + ["-o", "{tmp}/out", "--device", "cuda:1"], 2, "cuda:1", "without CUDA", when=CUDA),
    row("device-cuda-reference", MERGE + ["-o", "{tmp}/out", "--device", "cuda", "--backend", "reference"], 2, "cuda",
        "without CUDA", when=CUDA),
    row("device-unknown", MERGE + ["-o", "{tmp}/out", "--device", "gpu0"], 2, "gpu0", "unknown device"),
    row("device-meta", MERGE + ["-o", "{tmp}/out", "--device", "meta"], 2, "meta", "cpu, cuda or mps"),
    row("device-mps", MERGE + ["-o", "{tmp}/out", "--device", "mps"], 2, "mps", "not available",
        when=not torch.backends.mps.is_available()),
    row("backend-triton-on-cpu", MERGE + ["-o", "{tmp}/out", "--backend", "triton"], 2, "triton", "--device cuda"),
    row("backend-cuda-on-cpu", MERGE + ["-o", "{tmp}/out", "--backend", "cuda"], 2, "cuda", "--device cuda"),
    row("backend-unknown", MERGE + ["-o", "{tmp}/out", "--backend", "jax"], 2, "--backend"),
    row("compress-device-cuda", COMPRESS + ["-o", "{tmp}/c.safetensors", "--device", "cuda"], 2, "cuda",
        "without CUDA", when=CUDA),
    row("interference-backend-cuda", STI + ["--backend", "cuda"], 2, "cuda", "--device cuda"),
    # -- outputs: nothing replaced without --overwrite, the kind must match --------------------
    row("out-exists", MERGE + ["-o", "{tmp}/out"], 2, "{tmp}/out", "already exists.*--overwrite", "out_folder"),
    row("out-is-a-file", MERGE + ["-o", "{tmp}/out"], 2, "{tmp}/out", "is a file", "out_file"),
    row("out-is-a-file-overwrite", MERGE + ["-o", "{tmp}/out", "--overwrite"], 2, "{tmp}/out", "is a file",
        "out_file"),
    row("out-link-to-folder", MERGE + ["-o", "{tmp}/out"], 2, "{tmp}/out", "already exists", "link_to_folder"),
    row("out-dangling-link", MERGE + ["-o", "{tmp}/out"], 2, "{tmp}/out", "already exists", "dangling_link"),
    row("out-under-a-file", MERGE + ["-o", "{file}/out"], 2, "{file}/out", "Not a directory"),
    row("out-root", MERGE + ["-o", "/"], 2, "/", "root folder"),
    row("report-exists", MERGE + ["-o", "{tmp}/out", "--report", "{tmp}/r.json"], 2, "{tmp}/r.json",
        "already exists", "report_file"),
    row("report-is-a-folder", MERGE + ["-o", "{tmp}/out", "--report", "{tmp}/r.json", "--overwrite"], 2,
        "{tmp}/r.json", "is a folder", "report_folder"),
    row("report-is-the-output", MERGE + ["-o", "{tmp}/out", "--report", "{tmp}/out"], 2, "{tmp}/out",
        "also an output"),
    row("report-inside-the-output", MERGE + ["-o", "{tmp}/out", "--report", "{tmp}/out/r.json"], 2,
        "{tmp}/out/r.json", "also an output"),
    row("compress-out-exists", COMPRESS + ["-o", "{tmp}/c.safetensors"], 2, "{tmp}/c.safetensors",
        "already exists", "c_file"),
    row("compress-into-folder-exists", COMPRESS + ["-o", "{tmp}/d/"], 2, "{tmp}/d/task_01.tsvc.safetensors",
        "already exists", "c_in_folder"),
    row("compress-into-existing-folder-exists", COMPRESS + ["-o", "{tmp}/d"], 2, "{tmp}/d/task_01.tsvc.safetensors",
        "already exists", "c_in_folder"),
    row("compress-under-a-file", COMPRESS + ["-o", "{file}/c.safetensors"], 2, "{file}/c.safetensors",
        "Not a directory"),
    row("decompress-out-exists", ["decompress", "{base}", "{tsvc}", "-o", "{tmp}/out"], 2, "{tmp}/out",
        "already exists", "out_folder"),
    row("decompress-out-is-a-file", ["decompress", "{base}", "{tsvc}", "-o", "{tmp}/out", "--overwrite"], 2,
        "{tmp}/out", "is a file", "out_file"),
    row("interference-report-exists", STI + ["--report", "{tmp}/r.json"], 2, "{tmp}/r.json", "already exists",
        "report_file"),
    row("interference-plot-exists", STI + ["--plot", "{tmp}/p.png"], 2, "{tmp}/p.png", "already exists",
        "plot_file"),
    row("interference-plot-is-the-report", STI + ["--plot", "{tmp}/r.png", "--report", "{tmp}/r.png"], 2,
        "{tmp}/r.png", "also an output"),
    row("interference-plot-format", STI + ["--plot", "{tmp}/p.docx"], 2, "{tmp}/p.docx", "cannot write a .docx"),
    row("inspect-broken-report", ["inspect", "{tmp}/m"], 2, "{tmp}/m/tsvmerge_report.json", "not a tsvmerge report",
        "broken_report"),
    row("zoo-exists", ["zoo", "{tmp}/out", "--arch", "ViT-B-32", "--layers", "0", "--tasks", "1"], 2, "{tmp}/out",
        "already exists", "out_folder"),
    row("zoo-is-a-file", ["zoo", "{tmp}/out", "--arch", "ViT-B-32", "--layers", "0", "--overwrite"], 2,
        "{tmp}/out", "is a file", "out_file"),
    # -- outputs that are, contain or lie inside an input: refused even with --overwrite -----
    row("out-is-the-base-file", MERGE + ["-o", "{base}"], 2, "{base}", "is an input"),
    row("out-is-the-base-file-overwrite", MERGE + ["-o", "{base}", "--overwrite"], 2, "{base}", "is an input"),
    row("out-is-the-zoo", MERGE + ["-o", "{zoo}"], 2, "{zoo}", "contains the input"),
    row("out-is-the-zoo-overwrite", MERGE + ["-o", "{zoo}", "--overwrite"], 2, "{zoo}", "contains the input"),
    row("out-contains-the-zoo-overwrite", MERGE + ["-o", "{root}", "--overwrite"], 2, "{root}", "contains the input"),
    row("out-is-an-input-folder", ["merge", "{base}", "{t1}", "{hf}", "-o", "{hf}", "--overwrite"], 2, "{hf}",
        "is an input"),
    row("out-inside-an-input-folder", ["merge", "{base}", "{t1}", "{hf}", "-o", "{hf}/merged"], 2, "{hf}/merged",
        "lies inside the input folder"),
    row("out-link-to-the-zoo-overwrite", MERGE + ["-o", "{zoo_link}", "--overwrite"], 2, "{zoo_link}",
        "contains the input"),
    row("out-is-the-tsvc-input", ["merge", "{base}", "{tsvc}", "{t2}", "-o", "{tsvc}", "--overwrite"], 2, "{tsvc}",
        "is an input"),
    row("report-is-the-base", MERGE + ["-o", "{tmp}/out", "--report", "{base}"], 2, "{base}", "is an input"),
    row("report-is-the-base-overwrite", MERGE + ["-o", "{tmp}/out", "--report", "{base}", "--overwrite"], 2, "{base}",
        "is an input"),
    row("report-is-a-task-overwrite", MERGE + ["-o", "{tmp}/out", "--report", "{t2}", "--overwrite"], 2, "{t2}",
        "is an input"),
    row("report-inside-an-input-folder", ["merge", "{base}", "{t1}", "{hf}", "-o", "{tmp}/out", "--report",
                                          "{hf}/r.json"], 2, "{hf}/r.json", "lies inside the input folder"),
    row("report-is-an-input-shard", ["merge", "{base}", "{t1}", "{hf}", "-o", "{tmp}/out", "--report",
                                     "{hf}/model.safetensors", "--overwrite"], 2, "{hf}/model.safetensors",
        "is an input"),
    row("report-link-to-the-base-overwrite", MERGE + ["-o", "{tmp}/out", "--report", "{base_link}", "--overwrite"],
        2, "{base_link}", "is an input"),
    row("report-hard-link-of-the-base-overwrite", MERGE + ["-o", "{tmp}/out", "--report", "{base_hardlink}",
                                                           "--overwrite"], 2, "{base_hardlink}", "is an input"),
    row("compress-onto-the-base", COMPRESS + ["-o", "{base}"], 2, "{base}", "is an input"),
    row("compress-onto-the-base-overwrite", COMPRESS + ["-o", "{base}", "--overwrite"], 2, "{base}", "is an input"),
    row("compress-onto-the-task-overwrite", COMPRESS + ["-o", "{t1}", "--overwrite"], 2, "{t1}", "is an input"),
    row("compress-into-an-input-folder", ["compress", "{base}", "{hf}", "-o", "{hf}/"], 2,
        "{hf}/hf.tsvc.safetensors", "lies inside the input folder"),
    row("decompress-onto-the-zoo-overwrite", ["decompress", "{base}", "{tsvc}", "-o", "{zoo}", "--overwrite"], 2,
        "{zoo}", "contains the input"),
    row("decompress-onto-the-tsvc-overwrite", ["decompress", "{base}", "{tsvc}", "-o", "{tsvc}", "--overwrite"], 2,
        "{tsvc}", "is an input"),
    row("interference-report-is-the-base-overwrite", STI + ["--report", "{base}", "--overwrite"], 2, "{base}",
        "is an input"),
    row("interference-plot-is-a-task-overwrite", STI + ["--plot", "{t1}", "--overwrite"], 2, "{t1}", "is an input"),
    row("convert-onto-its-input-overwrite", ["convert", "{base}", "{base}", "--overwrite"], 2, "{base}", "is an input"),
    row("convert-into-the-input-folder", ["convert", "{hf}", "{hf}/model2.safetensors"], 2, "{hf}/model2.safetensors",
        "lies inside the input folder"),
    row("convert-out-exists", ["convert", "{base}", "{tmp}/c.safetensors"], 2, "{tmp}/c.safetensors",
        "already exists", "c_file"),
    row("convert-out-is-a-folder", ["convert", "{base}", "{tmp}/out", "--overwrite"], 2, "{tmp}/out", "is a folder",
        "out_folder"),
    # -- TSV-C misuse -------------------------------------------------------------------------
    row("tsvc-as-the-base", ["merge", "{tsvc}", "{t1}", "{t2}", "-o", "{tmp}/out"], 2, "{tsvc}", "not a base"),
    row("tsvc-compressed-again", ["compress", "{base}", "{tsvc}", "-o", "{tmp}/c.safetensors"], 2, "{tsvc}",
        "already a TSV-C"),
    row("decompress-a-plain-checkpoint", ["decompress", "{base}", "{t1}", "-o", "{tmp}/out"], 2, "{t1}",
        "not a TSV-C"),
    row("decompress-against-another-base", ["decompress", "{t3}", "{tsvc}", "-o", "{tmp}/out"], 2, "{tsvc}",
        "different base"),
    row("decompress-tsvc-as-the-base", ["decompress", "{tsvc}", "{tsvc}", "-o", "{tmp}/out"], 2, "{tsvc}",
        "not a base"),
    row("merge-tsvc-against-another-base", ["merge", "{t3}", "{tsvc}", "{t2}", "-o", "{tmp}/out"], 2, "{tsvc}",
        "different base"),
    row("convert-a-tsvc-file", ["convert", "{tsvc}", "{tmp}/c.safetensors"], 2, "{tsvc}", "decompress"),
    row("interference-tsvc-as-the-base", ["interference", "{tsvc}", "{t1}", "{t2}"], 2, "{tsvc}", "not a base"),
    # -- inputs the planner or the engine refuses (after the output was begun: nothing left) --
    row("task-with-nan", ["merge", "{base}", "{t1}", "{nan}", "-o", "{tmp}/out", "--no-progress"], 2, "{nan}",
        "NaN or Inf"),
    row("task-with-inf", ["merge", "{base}", "{inf}", "{t2}", "-o", "{tmp}/out", "--no-progress"], 2, "{inf}",
        "NaN or Inf"),
    row("base-with-nan", ["merge", "{nan}", "{t1}", "{t2}", "-o", "{tmp}/out", "--no-progress"], 2, "{nan}",
        "NaN or Inf"),
    row("compress-task-with-nan", ["compress", "{base}", "{nan}", "-o", "{tmp}/c.safetensors", "--no-progress"], 2,
        "{nan}", "NaN or Inf"),
    row("task-missing-a-tensor", ["merge", "{base}", "{t1}", "{missing}", "-o", "{tmp}/out"], 2, "{missing}",
        "missing"),
    row("task-with-an-extra-tensor", ["merge", "{base}", "{extra}", "-o", "{tmp}/out"], 2, "{extra}",
        "not in the base"),
    row("task-with-another-shape", ["merge", "{base}", "{t1}", "{reshaped}", "-o", "{tmp}/out"], 2, "{reshaped}",
        "shape"),
    row("task-with-int-weights", ["merge", "{base}", "{int}", "-o", "{tmp}/out"], 2, "{int}", "not floating"),
    # -- overflow: the inputs' doing, named with the tensor and what to do --------------------
    row("fp16-output-overflow", MERGE + ["-o", "{tmp}/out", "--out-dtype", "float16", "--alpha", "1e8"], 2, "{base}",
        "tensor '.*'.*float16.*--out-dtype float32"),
    row("fp16-output-overflow-ties", MERGE + ["-o", "{tmp}/out", "--out-dtype", "float16", "--alpha", "1e8",
                                              "--method", "ties"], 2, "{base}", "float16"),
    row("fp16-output-overflow-task-arithmetic", MERGE + ["-o", "{tmp}/out", "--out-dtype", "fp16", "--alpha", "1e8",
                                                         "--method", "task_arithmetic"], 2, "{base}", "float16"),
    row("fp16-compute-overflow", MERGE + ["-o", "{tmp}/out", "--dtype", "float16", "--alpha", "1e7",
                                          "--method", "task_arithmetic"], 2, "{base}",
        "compute dtype float16.*--dtype"),
    row("fp32-overflow", MERGE + ["-o", "{tmp}/out", "--alpha", "1e300", "--method", "task_arithmetic"], 2, "{base}",
        "float32.*smaller alpha"),
    row("alpha-beyond-fp32", MERGE + ["-o", "{tmp}/out", "--alpha", "1e39", "--method", "task_arithmetic"], 2,
        "{base}", "alpha"),
]


@pytest.mark.parametrize("argv, code, names, words, setup", ROWS)
def test_bad_input(world, tmp_path, capsys, argv, code, names, words, setup):
    if setup:
        SETUPS[setup](str(tmp_path), world)
    paths = {**world, "tmp": str(tmp_path)}
    argv = [a.format(**paths) for a in argv]
    before = snapshot(world["root"], tmp_path)
    got, out, err = cli(argv, capsys)
    assert got == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert names.format(**paths) in lines[0] and re.search(words, lines[0]), lines[0]
    assert snapshot(world["root"], tmp_path) == before


WARNED = [
    pytest.param(["merge", "{base}", "{t1}"], ["only one fine-tuned model"], id="one-task"),
    pytest.param(["merge", "{base}", "{t1}", "{base_copy}"], ["task 2 .* is identical to the base"],
                 id="task-equal-to-the-base"),
    pytest.param(["merge", "{base}", "{t1}", "{base}"], ["task 2 .* is the base itself"], id="base-among-the-tasks"),
    pytest.param(["merge", "{base}", "{t1}", "{t1}", "{t2}"], ["task 2 .* same model as task 1"],
                 id="same-task-twice"),
    pytest.param(["merge", "{base}", "{t1}", "{t1_copy}"], ["task 2 .* same model as task 1"],
                 id="same-task-as-a-copy"),
    pytest.param(["merge", "{base}", "{base_link}", "{base_copy}"],
                 ["task 1 .* is the base itself", "task 2 .* is identical to the base", "task 2 .* same model"],
                 id="base-by-link-and-copy"),
]


@pytest.mark.parametrize("argv, expected", WARNED)
def test_warnings(world, tmp_path, capsys, argv, expected):
    """Warned, one line each, and listed in the report; the merge still runs."""
    paths = {**world, "tmp": str(tmp_path)}
    argv = [a.format(**paths) for a in argv] + ["-o", str(tmp_path / "out"), "--report", str(tmp_path / "r.json"),
                                                "--no-progress", "--backend", "reference"]
    before = snapshot(world["root"])
    code, out, err = cli(argv, capsys)
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == len(expected) and all(line.startswith("tsvmerge merge: warning: ") for line in lines), err
    for pattern, line in zip(expected, lines):
        assert re.search(pattern, line), line
    report = json.loads((tmp_path / "r.json").read_text())
    assert [f"tsvmerge merge: warning: {w}" for w in report["warnings"]] == lines
    assert snapshot(world["root"]) == before
    assert sorted(os.listdir(tmp_path)) == ["out", "r.json"]


def test_warnings_of_compress_and_interference(world, tmp_path, capsys):
    code, _, err = cli(["compress", world["base"], world["base_copy"], "-o", str(tmp_path / "c.safetensors"),
                        "--no-progress"], capsys)
    assert code == 0 and "identical to the base" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = cli(["interference", world["base"], world["t1"], world["t1"], "--report", str(tmp_path / "r.json"),
                        "--no-progress"], capsys)
    assert code == 0 and "same model as task 1" in err, err
    assert json.loads((tmp_path / "r.json").read_text())["warnings"] == [err.split("warning: ", 1)[1].strip()]
