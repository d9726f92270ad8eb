"""Readers, writers, and what bad inputs do: a clear error before compute, no output."""
import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file as st_load, save_file as st_save

import tsvmerge
from tsvmerge.engine import _all_finite
from tsvmerge.io import InputError, OutputError, open_checkpoint, save_file
from tsvmerge.io.output import plan_shards

from conftest import ODD_SHAPES, random_zoo


def write_zoo(folder, base, tasks):
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, sd in enumerate([base] + tasks):
        path = os.path.join(folder, f"m{i}.safetensors")
        save_file(sd, path)
        paths.append(path)
    return paths[0], paths[1:]


def digest(paths):
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def test_writer_output_reads_back_with_the_safetensors_package(seed, tmp_path):
    base, tasks = random_zoo(seed, 2, ODD_SHAPES)
    b, ts = write_zoo(tmp_path / "zoo", base, tasks)
    rep = tsvmerge.merge(b, ts, backend="reference", out=str(tmp_path / "out"), shard_size=3000)
    expected = tsvmerge.merge(base, tasks, backend="reference")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and rep["summary"]["tensors"] == len(base)
    got = {}
    for shard in shards:
        got.update(st_load(str(tmp_path / "out" / shard)))
    assert set(got) == set(expected)
    for k in got:
        assert torch.equal(got[k], expected[k]), k
    # and the folder reads back through our own reader (sharded, index json)
    ours = open_checkpoint(str(tmp_path / "out"))
    assert torch.equal(ours.read("blocks.0.mlp.weight"), expected["blocks.0.mlp.weight"])


def test_reads_what_the_safetensors_package_writes(seed, tmp_path):
    base, _ = random_zoo(seed, 1, ODD_SHAPES, torch.bfloat16)
    st_save(base, str(tmp_path / "x.safetensors"))
    ck = open_checkpoint(str(tmp_path / "x.safetensors"))
    for k, v in base.items():
        assert torch.equal(ck.read(k), v)


def test_torch_state_dicts_and_hf_bin_folder(seed, tmp_path):
    base, tasks = random_zoo(seed, 2, ODD_SHAPES)
    torch.save(base, tmp_path / "base.pt")
    torch.save({"state_dict": tasks[0]}, tmp_path / "t0.pt")
    os.makedirs(tmp_path / "hf")
    torch.save(tasks[1], tmp_path / "hf" / "pytorch_model.bin")
    out = tsvmerge.merge(str(tmp_path / "base.pt"), [str(tmp_path / "t0.pt"), str(tmp_path / "hf")], backend="reference")
    expected = tsvmerge.merge(base, tasks, backend="reference")
    for k in expected:
        assert torch.equal(out[k], expected[k])


def test_shard_plan_respects_size():
    from tsvmerge.io import TensorInfo
    infos = {f"t{i}": TensorInfo((100,), torch.float32) for i in range(10)}
    shards = plan_shards(infos, 1000)
    assert [len(s) for s in shards] == [2] * 5
    assert plan_shards({"big": TensorInfo((1000,), torch.float32)}, 10) == [["big"]]


def _corrupt_truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)


def _corrupt_header(path):
    with open(path, "r+b") as f:
        f.seek(10)
        f.write(b"\xff\xfe garbage")


BAD_CASES = {
    "missing tensor": (lambda t: t.pop("norm.weight"), "norm.weight", "missing"),
    "extra tensor": (lambda t: t.__setitem__("extra.weight", torch.ones(3)), "extra.weight", "not in the base"),
    "shape mismatch": (lambda t: t.__setitem__("blocks.0.mlp.weight", torch.ones(64, 47)), "blocks.0.mlp.weight", "shape"),
    "nan values": (lambda t: t["blocks.1.attn.weight"].__setitem__((3, 4), float("nan")), "blocks.1.attn.weight", "NaN"),
    "inf values": (lambda t: t["blocks.0.mlp.weight"].__setitem__((1, 2), -float("inf")), "blocks.0.mlp.weight", "Inf"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_check_is_exact(seed, dtype):
    """The one-read check (a finite sum) must neither miss a NaN/Inf nor reject large finite values."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(300, 257, generator=g).to(dtype)
    assert _all_finite(t)
    big = torch.full((1000,), torch.finfo(dtype).max, dtype=dtype)      # the sum overflows; values are finite
    assert _all_finite(big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = t.clone()
        x[7, 11] = bad
        assert not _all_finite(x)
    both = t.clone()
    both[0, 0], both[1, 1] = float("inf"), -float("inf")                # the sum is NaN, not Inf
    assert not _all_finite(both)
    assert _all_finite(torch.arange(5))                                 # integer buffers pass


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_task_gives_named_error_and_no_output(seed, tmp_path, case):
    base, tasks = random_zoo(seed, 3, ODD_SHAPES)
    mutate, tensor, words = BAD_CASES[case]
    mutate(tasks[1])
    b, ts = write_zoo(tmp_path / "zoo", base, tasks)
    before = digest([b] + ts)
    with pytest.raises(InputError) as err:
        tsvmerge.merge(b, ts, backend="reference", out=str(tmp_path / "out"))
    msg = str(err.value)
    assert ts[1] in msg and tensor in msg and words in msg
    assert not (tmp_path / "out").exists()
    assert [p for p in os.listdir(tmp_path) if p != "zoo"] == []      # no temp folders left
    assert digest([b] + ts) == before                                  # inputs untouched


@pytest.mark.parametrize("corrupt,words", [(_corrupt_truncate, "truncated"), (_corrupt_header, "corrupted")])
def test_corrupted_files(seed, tmp_path, corrupt, words):
    base, tasks = random_zoo(seed, 2, ODD_SHAPES)
    b, ts = write_zoo(tmp_path / "zoo", base, tasks)
    corrupt(ts[0])
    with pytest.raises(InputError, match=words) as err:
        tsvmerge.merge(b, ts, out=str(tmp_path / "out"))
    assert ts[0] in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("make,words", [
    (lambda p: p.write_bytes(b"not a checkpoint at all"), "cannot load"),
    (lambda p: torch.save({"w": torch.ones(2), "step": 3}, p), "not a tensor"),
    (lambda p: torch.save([torch.ones(2)], p), "state dict"),
])
def test_unreadable_torch_files(seed, tmp_path, make, words):
    base, tasks = random_zoo(seed, 1, {"w": (2,)})
    bad = tmp_path / "bad.pt"
    make(bad)
    with pytest.raises(InputError, match=words) as err:
        tsvmerge.merge(base, [str(bad)], out=str(tmp_path / "out"))
    assert str(bad) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_empty_and_missing_inputs(tmp_path):
    base = {"w": torch.ones(3, 3)}
    with pytest.raises(InputError, match="no fine-tuned"):
        tsvmerge.merge(base, [])
    with pytest.raises(InputError, match="no such file"):
        tsvmerge.merge(base, [str(tmp_path / "nope.safetensors")])
    with pytest.raises(TypeError, match="sequence"):
        tsvmerge.merge(base, str(tmp_path / "one.safetensors"))


def test_existing_output_is_kept_unless_overwrite(seed, tmp_path):
    base, tasks = random_zoo(seed, 2, {"w": (6, 5)})
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="already exists"):
        tsvmerge.merge(base, tasks, out=str(out))
    assert (out / "keep.txt").read_text() == "mine"
    tsvmerge.merge(base, tasks, out=str(out), overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_failure_mid_merge_leaves_nothing(seed, tmp_path, monkeypatch):
    base, tasks = random_zoo(seed, 2, ODD_SHAPES)
    from tsvmerge.methods import tsv as tsv_module
    calls = {"n": 0}
    real = tsv_module.concat_tasks

    def boom(x):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(x)

    monkeypatch.setattr(tsv_module, "concat_tasks", boom)
    with pytest.raises(KeyboardInterrupt):
        tsvmerge.merge(base, tasks, out=str(tmp_path / "out"), backend="reference")
    assert os.listdir(tmp_path) == []
