"""The `tsvmerge` command end to end on a small synthetic zoo."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tsvmerge.cli import main
from tsvmerge.io import open_checkpoint
from tsvmerge.zoo import Arch, make_zoo

TINY = Arch("tiny", width=48, layers=2, patch=8, image=32, output_dim=24)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return make_zoo(str(tmp_path_factory.mktemp("zoo")), arch=TINY, tasks=4, seed=7, progress=False)


def run_cli(*args):
    """The installed console script, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "tsvmerge.cli", *args], capture_output=True, text=True)


def test_merge_inspect_and_report(zoo, tmp_path):
    out, report = tmp_path / "merged", tmp_path / "report.json"
    r = run_cli("merge", zoo.base, *zoo.finetuned, "-o", str(out), "--preset", "clip", "--backend", "reference",
                "--report", str(report), "--shard-size", "100KB", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "merged" in r.stdout and "spectral" in r.stdout
    rep = json.loads(report.read_text())
    assert rep["method"] == "tsv" and rep["summary"]["spectral"] == 2 * 4 + 2  # 4 matrices a block, proj, positional_embedding
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
    r = run_cli("inspect", str(out))
    assert r.returncode == 0 and "merged by tsvmerge" in r.stdout


def test_cli_matches_api(zoo, tmp_path):
    import tsvmerge
    assert main(["merge", zoo.base, *zoo.finetuned, "-o", str(tmp_path / "m"), "--method", "ties",
                 "--alpha", "0.8", "--density", "0.3", "--no-progress"]) == 0
    expected = tsvmerge.merge(zoo.base, zoo.finetuned, method="ties", alpha=0.8, density=0.3)
    got = open_checkpoint(str(tmp_path / "m"))
    for name, t in expected.items():
        assert torch.equal(got.read(name), t), name


def test_compress_decompress_interference(zoo, tmp_path):
    c = tmp_path / "t1.tsvc.safetensors"
    r = run_cli("compress", zoo.base, zoo.finetuned[0], "-o", str(c), "--rank", "0.25", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "factored" in r.stdout and os.path.getsize(c) < os.path.getsize(zoo.finetuned[0])
    r = run_cli("inspect", str(c))
    assert "TSV-C" in r.stdout
    r = run_cli("decompress", zoo.base, str(c), "-o", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    r = run_cli("interference", zoo.base, *zoo.finetuned, "--report", str(tmp_path / "sti.json"), "--no-progress",
                "--plot", str(tmp_path / "sti.png"))
    assert r.returncode == 0, r.stderr
    assert "STI" in r.stdout and (tmp_path / "sti.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "sti.json").read_text())["tensors"]


def test_bad_input_exit_code_and_message(zoo, tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}     ")
    r = run_cli("merge", zoo.base, zoo.finetuned[0], str(bad), "-o", str(tmp_path / "out"))
    assert r.returncode == 2
    assert str(bad) in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    r = run_cli("merge", zoo.base, zoo.finetuned[0], "-o", str(tmp_path / "out"), "--method", "nope")
    assert r.returncode == 2 and "unknown method" in r.stderr


def test_compress_into_a_folder(zoo, tmp_path, capsys):
    """-o DIR/ (made if missing) or an existing folder: the file goes inside, named after the task."""
    for out, expected in ((tmp_path / "new", None), (tmp_path / "new", "exists")):
        arg = str(out) + ("/" if expected is None else "")
        code = main(["compress", zoo.base, zoo.finetuned[0], "-o", arg, "--rank", "0.25", "--no-progress"])
        if expected:
            assert code == 2 and "already exists" in capsys.readouterr().err
        else:
            assert code == 0 and f"-> {out / 'task_01.tsvc.safetensors'}:" in capsys.readouterr().out
    (tmp_path / "other").mkdir()
    assert main(["compress", zoo.base, zoo.finetuned[1], "-o", str(tmp_path / "other"), "--no-progress"]) == 0
    assert os.listdir(tmp_path / "other") == ["task_02.tsvc.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["new", "other"]
    assert os.listdir(tmp_path / "new") == ["task_01.tsvc.safetensors"]


def test_demo_reruns_replace_only_what_it_made(tmp_path, capsys):
    args = ["demo", "--workdir", str(tmp_path), "--zoo-tasks", "2", "--zoo-layers", "0", "--skip-accuracy"]
    assert main(args) == 0
    first = os.stat(tmp_path / "merged").st_ino
    assert main(args) == 0 and "using the cached synthetic zoo" in capsys.readouterr().out
    assert os.stat(tmp_path / "merged").st_ino != first and sorted(os.listdir(tmp_path)) == ["merged", "zoo-ViT-B-32-2"]
    for folder in ("merged", "zoo-ViT-B-32-2"):     # a folder of the user's own in the demo's place
        os.rename(tmp_path / folder, tmp_path / "aside")
        os.mkdir(tmp_path / folder)
        (tmp_path / folder / "mine.txt").write_text("mine")
        assert main(args) == 2
        assert str(tmp_path / folder) in capsys.readouterr().err
        assert os.listdir(tmp_path / folder) == ["mine.txt"]
        shutil.rmtree(tmp_path / folder)
        os.rename(tmp_path / "aside", tmp_path / folder)
