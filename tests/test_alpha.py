"""One update, many alphas: `--alpha 0.2,0.5,1.0` (the update computed once, OUT/alpha-A/ per
alpha), `tsvmerge.update` and `tsvmerge.apply`. Each output equals the merge with that alpha
alone; outputs are published all together or not at all."""
import errno
import json
import os
import signal

import pytest
import torch

import tsvmerge
from conftest import ODD_SHAPES, random_zoo
from test_faults import cli, digest, failing, merge_args, start_paused, wait_for
from tsvmerge.cli import main
from tsvmerge.io import InputError, OutputError
from tsvmerge.zoo import Arch, make_zoo

TINY = Arch("tiny", width=48, layers=2, patch=8, image=32, output_dim=24)
ALPHAS = ("0.2", "0.5", "1.0")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return make_zoo(str(tmp_path_factory.mktemp("zoo")), arch=TINY, tasks=3, seed=11, progress=False)


def files(folder) -> dict:
    """Every file of a merged folder but the report (it holds times), by name."""
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder)) if f != "tsvmerge_report.json"}


def report(folder) -> dict:
    return json.loads((folder / "tsvmerge_report.json").read_text())


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_each_alpha_is_byte_identical_to_its_own_merge(zoo, tmp_path, capsys, backend):
    """The torch backend's randomized SVD with one seed: the update computed once serves every
    alpha exactly as three runs would compute it three times."""
    common = ["--backend", backend, "--seed", "3", "--shard-size", "100KB", "--preset", "clip", "--no-progress"]
    argv = ["merge", zoo.base, *zoo.finetuned, "-o", str(tmp_path / "all"), "--alpha", ",".join(ALPHAS), *common]
    assert main(argv + ["--report", str(tmp_path / "all.json")]) == 0
    out = capsys.readouterr().out
    assert all(str(tmp_path / "all" / f"alpha-{a}") in out for a in ALPHAS), out
    assert sorted(os.listdir(tmp_path / "all")) == [f"alpha-{a}" for a in ALPHAS]
    joint = json.loads((tmp_path / "all.json").read_text())
    assert list(joint) == [f"alpha-{a}" for a in ALPHAS]
    for a in ALPHAS:
        single = tmp_path / f"single-{a}"
        assert main(["merge", zoo.base, *zoo.finetuned, "-o", str(single), "--alpha", a, *common]) == 0
        many = tmp_path / "all" / f"alpha-{a}"
        assert len([f for f in os.listdir(single) if f.endswith(".safetensors")]) > 1      # sharded
        assert files(many) == files(single)
        assert report(many)["alpha"] == report(single)["alpha"] == float(a) == joint[f"alpha-{a}"]["alpha"]
        assert report(many)["tensors"].keys() == report(single)["tensors"].keys()
        index = json.loads((many / "model.safetensors.index.json").read_text())
        assert json.loads(index["metadata"]["tsvmerge"])["alpha"] == float(a)


def test_state_dicts_for_several_alphas(seed):
    base, tasks = random_zoo(seed, 3, ODD_SHAPES)
    merged = tsvmerge.merge(base, tasks, alphas=[0.3, 1.5], backend="torch", seed=1)
    for a in (0.3, 1.5):
        single = tsvmerge.merge(base, tasks, alpha=a, backend="torch", seed=1)
        assert merged[a].keys() == single.keys()
        assert all(torch.equal(merged[a][n], single[n]) for n in single)


def merge_and_update(base, tasks, method, **kw):
    return (lambda alpha: tsvmerge.merge(base, tasks, method=method, alpha=alpha, **kw)), \
        tsvmerge.update(base, tasks, method=method, **kw)


@pytest.mark.parametrize("method", ["tsv", "task_arithmetic", "ties"])
@pytest.mark.parametrize("batch_bytes", [1 << 30, 1])      # many tensors a batch; one
def test_apply_equals_merge_exactly_in_fp64(seed, method, batch_bytes):
    base, tasks = random_zoo(seed, 3, ODD_SHAPES, dtype=torch.float64)
    merge, update = merge_and_update(base, tasks, method, backend="reference", compute_dtype="float64",
                                     batch_bytes=batch_bytes)
    for alpha in (0.3, 1.0, -0.7):
        expected, got = merge(alpha), tsvmerge.apply(base, update, alpha)
        assert got.keys() == expected.keys()
        for name in expected:
            assert got[name].dtype == expected[name].dtype
            assert torch.equal(got[name], expected[name]), name      # the same arithmetic, one tensor at a time


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_apply_equals_merge_in_fp32(seed, backend):
    base, tasks = random_zoo(seed, 4, ODD_SHAPES)
    merge, update = merge_and_update(base, tasks, "tsv", backend=backend, seed=2)
    for alpha in (0.4, 1.3):
        expected, got = merge(alpha), tsvmerge.apply(base, update, alpha)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-6 * float(expected[name].abs().max()),
                                       msg=name)


def test_update_holds_factors_not_dense_matrices(seed):
    base, tasks = random_zoo(seed, 3, ODD_SHAPES)
    update = tsvmerge.update(base, tasks, backend="reference")
    assert update.tensors.keys() == base.keys() and update.report["alpha"] is None
    for name, delta in update.tensors.items():
        if not base[name].is_floating_point():
            assert delta is None
        elif base[name].dim() == 2:
            u, s, v = delta
            m, n = base[name].shape
            assert u.shape[0] == m and v.shape[0] == n and s.shape[0] == u.shape[1] == v.shape[1] <= min(m, n)
        else:
            assert isinstance(delta, torch.Tensor) and delta.shape == base[name].shape


def test_apply_to_a_folder_is_published_like_a_merge(zoo, tmp_path):
    update = tsvmerge.update(zoo.base, zoo.finetuned, backend="reference", preset="clip")
    rep = tsvmerge.apply(zoo.base, update, 0.5, out=tmp_path / "applied", shard_size=100_000)
    assert rep["alpha"] == 0.5 and os.listdir(tmp_path) == ["applied"]
    assert main(merge_args(zoo, tmp_path / "merged", "--alpha", "0.5", "--preset", "clip", "--shard-size", "100KB")) == 0
    assert files(tmp_path / "applied") == files(tmp_path / "merged")
    assert report(tmp_path / "applied")["alpha"] == 0.5
    with pytest.raises(OutputError, match="already exists"):
        tsvmerge.apply(zoo.base, update, 1.0, out=tmp_path / "applied")
    with pytest.raises(OutputError, match="is an input"):
        tsvmerge.apply(zoo.base, update, 1.0, out=zoo.base, overwrite=True)


def test_apply_refuses_another_base(seed):
    base, tasks = random_zoo(seed, 2, ODD_SHAPES)
    update = tsvmerge.update(base, tasks, backend="reference")
    name = "blocks.0.attn.weight"
    with pytest.raises(InputError, match=f"'{name}'.*shape"):
        tsvmerge.apply({**base, name: torch.zeros(23, 37)}, update)
    with pytest.raises(InputError, match=f"'{name}'.*is not in the base"):
        tsvmerge.apply({k: v for k, v in base.items() if k != name}, update)
    with pytest.raises(ValueError, match="alpha.*finite"):
        tsvmerge.apply(base, update, float("nan"))


def test_existing_output_is_refused(zoo, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "alpha-0.5").mkdir(parents=True)
    (out / "alpha-0.5" / "mine.txt").write_text("mine")
    got, lines = cli(merge_args(zoo, out, "--alpha", "0.5,1.0"), capsys)
    assert got == 2 and lines == [f"tsvmerge merge: error: {out}: already exists: pass --overwrite to replace it, "
                                  "or choose another path"], lines
    assert os.listdir(out) == ["alpha-0.5"] and os.listdir(out / "alpha-0.5") == ["mine.txt"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_failed_write_in_the_second_alpha_publishes_none(zoo, tmp_path, capsys, monkeypatch, overwrite):
    """Disk full in the second alpha's shard, after the first alpha's shards hold tensors."""
    out = tmp_path / "out"
    if overwrite:
        out.mkdir()
        (out / "old.txt").write_text("old")
    before = digest(zoo)
    writes = []

    def second_alpha(args):
        if "alpha-0.5" in os.readlink(f"/proc/self/fd/{args[0]}"):
            writes.append(args)
        return len(writes) == 2

    monkeypatch.setattr(os, "pwrite", failing(os.pwrite, errno.ENOSPC, second_alpha))
    got, lines = cli(merge_args(zoo, out, "--alpha", "0.2,0.5,1.0", "--report", str(tmp_path / "r.json"),
                                *["--overwrite"] * overwrite), capsys)
    monkeypatch.undo()
    assert got == 2 and lines == [f"tsvmerge merge: error: {out}: cannot write: No space left on device; nothing was "
                                  "written"], lines
    assert sorted(os.listdir(tmp_path)) == (["out"] if overwrite else [])
    assert not overwrite or os.listdir(out) == ["old.txt"]
    assert digest(zoo) == before


def test_ctrl_c_leaves_nothing(zoo, tmp_path):
    proc, paused = start_paused(zoo, str(tmp_path / "run"), "--alpha", "0.2,0.5")
    wait_for(paused, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines() == [
        "tsvmerge merge: interrupted (SIGINT); nothing was written"], err
    assert os.listdir(tmp_path / "run") == []


@pytest.mark.parametrize("text, why", [("0.5,,x", "item 2 is empty"), ("0.5,x", "item 2 'x' is not a finite number"),
                                       ("0.5,nan", "item 2 'nan' is not a finite number"), (",", "item 1 is empty"),
                                       ("0.5,0.50", "0.5 is given twice")])
def test_a_bad_alpha_list_is_one_clear_error(zoo, tmp_path, capsys, text, why):
    with pytest.raises(SystemExit) as exited:       # argparse's way out, before any work
        main(merge_args(zoo, tmp_path / "out", f"--alpha={text}"))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("tsvmerge merge: error: argument --alpha: ") and why in lines[0], lines
    assert os.listdir(tmp_path) == []


def test_python_alphas_are_checked(seed):
    base, tasks = random_zoo(seed, 2, ODD_SHAPES)
    for alphas, why in (([], "empty"), ([0.5, float("inf")], "finite"), ([1.0, 1.0], "twice"), (0.5, "sequence")):
        with pytest.raises((ValueError, TypeError), match=why):
            tsvmerge.merge(base, tasks, alphas=alphas)
    with pytest.raises(ValueError, match="alpha or alphas"):
        tsvmerge.merge(base, tasks, alpha=0.5, alphas=[0.5, 1.0])
    with pytest.raises(ValueError, match="one alpha"):
        tsvmerge.merge(base, tasks, alphas=[0.5, 1.0], out="x", output_format="peft")
