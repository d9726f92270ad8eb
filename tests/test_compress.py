"""TSV-C: storage accounting, reconstruction error, and merging straight from compressed files."""
import os

import pytest
import torch

import tsvmerge
from tsvmerge.tsvc import compression_rank, saves_space

from conftest import ODD_SHAPES, random_zoo


def test_storage_accounting_and_tail_energy(seed):
    base, (task,) = random_zoo(seed, 1, ODD_SHAPES, torch.float64)
    c = tsvmerge.compress(base, task, rank=0.3, compute_dtype="float64")
    rep = c.report
    for name, e in rep["tensors"].items():
        if e["path"] != "factored":
            continue
        m, n = base[name].shape
        k = compression_rank((m, n), 0.3)
        assert e["k"] == k and e["numbers"] == k * (m + n + 1) and e["dense_numbers"] == m * n
        tau = task[name] - base[name]
        rebuilt = tsvmerge.decompress(base, c)[name] - base[name]
        # the squared reconstruction error is exactly the energy beyond rank k
        err = float((tau - rebuilt).norm() ** 2 / tau.norm() ** 2)
        s = torch.linalg.svdvals(tau)
        assert abs(err - float((s[k:] ** 2).sum() / (s ** 2).sum())) < 1e-10
        assert abs(err - e["tail_energy"]) < 1e-10
    assert rep["summary"]["stored_numbers"] == sum(e.get("numbers", 0) for e in rep["tensors"].values())


def test_saves_space_rule():
    assert saves_space((100, 100), 49) and not saves_space((100, 100), 50)   # 100*100/201 = 49.75
    assert compression_rank((64, 48), 0.1) == 5 and compression_rank((64, 48), 200) == 48


def test_no_gain_tensors_stay_dense(seed):
    base, (task,) = random_zoo(seed, 1, {"w": (8, 8)})
    c = tsvmerge.compress(base, task, rank=1.0)
    assert c.report["tensors"]["w"]["path"] == "dense" and "not save space" in c.report["tensors"]["w"]["note"]


@pytest.mark.parametrize("stored_rank,exact", [(0.5, True), (0.05, False)])
def test_merge_from_compressed_files(seed, tmp_path, stored_rank, exact):
    base, tasks = random_zoo(seed, 3, ODD_SHAPES)
    paths = []
    for i, t in enumerate(tasks):
        paths.append(str(tmp_path / f"t{i}.safetensors"))
        tsvmerge.compress(base, t, rank=stored_rank, out=paths[-1], preset="clip")
    assert os.path.getsize(paths[0]) < sum(v.numel() * 4 for v in base.values()) or not exact
    dense = tsvmerge.merge(base, tasks, backend="reference", preset="clip")
    from_c = tsvmerge.merge(base, paths, backend="reference", preset="clip")
    d = (from_c["blocks.0.mlp.weight"] - dense["blocks.0.mlp.weight"]).norm()
    scale = (dense["blocks.0.mlp.weight"] - base["blocks.0.mlp.weight"]).norm()
    # stored rank >= the merge's k (r/T): exact; below it, the merge sees less
    assert (d / scale < 1e-5) == exact
    for name in ("norm.weight", "conv.weight", "bn.num_batches_tracked"):
        assert torch.allclose(from_c[name].float(), dense[name].float(), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fingerprint_tells_apart_same_shape_checkpoints(seed, tmp_path, dtype):
    from tsvmerge.io import open_checkpoint, save_file
    base, (a, b) = random_zoo(seed, 2, ODD_SHAPES, dtype)
    path = str(tmp_path / "a.safetensors")
    save_file(a, path)
    fps = [open_checkpoint(x).fingerprint() for x in (base, a, b, path)]
    assert len(set(fps[:3])) == 3          # same shapes, different weights
    assert fps[3] == fps[1]                # a file and the state dict it holds agree


def test_tsvc_against_another_base_is_refused(seed, tmp_path):
    from tsvmerge.io import InputError
    base, (task,) = random_zoo(seed, 1, ODD_SHAPES)
    other, _ = random_zoo(seed + 1, 1, ODD_SHAPES)
    c = str(tmp_path / "t.tsvc.safetensors")
    tsvmerge.compress(base, task, rank=0.3, out=c)
    tsvmerge.decompress(base, c)                          # the right base is fine
    for call in (lambda: tsvmerge.decompress(other, c, out=str(tmp_path / "d")),
                 lambda: tsvmerge.merge(other, [c, c], out=str(tmp_path / "m"))):
        with pytest.raises(InputError, match="different base") as err:
            call()
        assert c in str(err.value)
    assert sorted(os.listdir(tmp_path)) == ["t.tsvc.safetensors"]   # nothing written


def _tsvc_file(tmp_path, seed):
    from tsvmerge.io import load_file
    base, (task,) = random_zoo(seed, 1, ODD_SHAPES)
    path = str(tmp_path / "t.tsvc.safetensors")
    tsvmerge.compress(base, task, rank=0.3, out=path)
    from tsvmerge.io.safetensors import read_header
    return base, task, path, load_file(path), read_header(path)[1]


@pytest.mark.parametrize("tamper,match", [
    (lambda t, m: m.pop("base_fingerprint"), "base fingerprint"),
    (lambda t, m: m.update(base_fingerprint="not hex"), "base fingerprint"),
    (lambda t, m: m.update(spectral="[1, 2]"), "spectral"),
    (lambda t, m: m.update(spectral='{"blocks.0.mlp.weight": [64, "48"]}'), "spectral"),
    (lambda t, m: t.pop("blocks.0.mlp.weight.tsvc_v"), "tsvc_v is missing"),
    (lambda t, m: t.update({"blocks.0.mlp.weight.tsvc_s": t["blocks.0.mlp.weight.tsvc_s"][:-1]}), "rank-k"),
    (lambda t, m: t.update({"blocks.0.mlp.weight.tsvc_u": t["blocks.0.mlp.weight.tsvc_u"].double()}), "one floating dtype"),
    (lambda t, m: t.update({"blocks.0.mlp.weight": torch.zeros(64, 48)}), "both dense and"),
    (lambda t, m: t.update({"stray.tsvc_u": torch.zeros(3, 1)}), "does not list"),
    (lambda t, m: m.update(spectral=m["spectral"].replace("[64, 48]", "[48, 64]")), "rank-k"),
])
def test_tampered_tsvc_files_are_refused(seed, tmp_path, tamper, match):
    from tsvmerge.io import InputError, save_file
    base, task, path, tensors, meta = _tsvc_file(tmp_path, seed)
    tamper(tensors, meta)
    bad = str(tmp_path / "bad.tsvc.safetensors")
    save_file(tensors, bad, meta)
    for call in (lambda: tsvmerge.decompress(base, bad), lambda: tsvmerge.merge(base, [bad, path])):
        with pytest.raises(InputError, match=match) as err:
            call()
        assert bad in str(err.value)


def test_tsvc_is_not_a_base_and_not_compressed_again(seed, tmp_path):
    from tsvmerge.io import InputError
    base, task, path, _, _ = _tsvc_file(tmp_path, seed)
    with pytest.raises(InputError, match="not a base model"):
        tsvmerge.merge(path, [task, task])
    with pytest.raises(InputError, match="already a TSV-C file"):
        tsvmerge.compress(base, path)


def test_int_tensors_come_from_the_finetune_whatever_the_metadata_says(seed, tmp_path):
    """Non-floating tensors are stored as the fine-tune has them; a tampered 'raw' list
    (older files carried one) cannot make decompress add a task vector to the base."""
    from tsvmerge.io import save_file
    base, task, path, tensors, meta = _tsvc_file(tmp_path, seed)
    task["bn.num_batches_tracked"] = base["bn.num_batches_tracked"] + 5
    tsvmerge.compress(base, task, rank=0.3, out=str(tmp_path / "c.safetensors"))
    meta["raw"] = '["norm.weight"]'
    save_file(tensors, str(tmp_path / "raw.safetensors"), meta)
    theta = tsvmerge.decompress(base, str(tmp_path / "raw.safetensors"))
    assert torch.allclose(theta["norm.weight"], task["norm.weight"], atol=1e-6)
    assert int(tsvmerge.decompress(base, str(tmp_path / "c.safetensors"))["bn.num_batches_tracked"]) == \
        int(task["bn.num_batches_tracked"])


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_low_rank_tsvc_merges_as_its_reconstruction(seed, backend):
    """A TSV-C task stored below the merge's k contributes its r triplets, whether read as factors
    or rebuilt dense (the dense path finds the same rank); beside a dense fine-tune too."""
    base, tasks = random_zoo(seed, 3, ODD_SHAPES, torch.float64)
    compressed = [tsvmerge.compress(base, t, rank=0.05, compute_dtype="float64", preset="clip") for t in tasks[:2]]
    rebuilt = [tsvmerge.decompress(base, c) for c in compressed]
    opts = dict(backend=backend, compute_dtype="float64", preset="clip")
    got = tsvmerge.merge(base, compressed + tasks[2:], **opts)
    want = tsvmerge.merge(base, rebuilt + tasks[2:], **opts)
    for name in ("blocks.0.mlp.weight", "blocks.1.attn.weight"):
        d = (got[name] - want[name]).norm() / (want[name] - base[name]).norm()
        assert d < 1e-10, name
