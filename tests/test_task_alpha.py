"""Per-task alpha: `merge(..., alpha=[a_1, ..., a_T])` (or `task_alpha=[...]` beside a global
`alpha`), `--task-alpha a_1,...,a_T`. Each task vector is scaled by its alpha before the merge,
as FusionBench's TSV-M does with a list of alphas; the global alpha is then 1 unless given."""
import json
import os

import pytest
import torch

import tsvmerge
from tsvmerge.cli import main
from tsvmerge.io import open_checkpoint, save_file

from conftest import ODD_SHAPES, cli_zoo, random_zoo
from test_dare import ties_by_hand
from test_merge_math import assert_is_paper_tsv, rel

FLOATS = [n for n in ODD_SHAPES if not n.endswith("num_batches_tracked")]


def scaled(base, tasks, alphas):
    """The fine-tunes whose task vectors are scaled by their alphas."""
    return [{n: base[n] + a * (ft[n] - base[n]) if base[n].is_floating_point() else ft[n] for n in base}
            for a, ft in zip(alphas, tasks)]


@pytest.mark.parametrize("alphas", [[0.3, 1.7], [0.5, -0.4, 1.0], [1.2, 0.05, 0.7, 0.25]])
def test_tsv_is_tsv_of_the_scaled_task_vectors(seed, alphas):
    base, tasks = random_zoo(seed, len(alphas), ODD_SHAPES, torch.float64)
    run = lambda **kw: tsvmerge.merge(base, tasks, backend="reference", compute_dtype="float64", preset="clip", **kw)
    ref_tasks = scaled(base, tasks, alphas)
    for out, alpha in ((run(alpha=alphas), 1.0), (run(task_alpha=alphas, alpha=0.6), 0.6)):
        assert_is_paper_tsv(out, base, ref_tasks, FLOATS, alpha=alpha)


def test_alpha_0_is_a_zero_task_vector(seed):
    """A task with alpha 0 counts in k = r/T with nothing in it (its null directions never enter:
    DESIGN section 2), as a task equal to the base does; the paper's code would mix in its
    arbitrary singular vectors."""
    base, tasks = random_zoo(seed, 3, ODD_SHAPES, torch.float64)
    run = lambda ts, alphas: tsvmerge.merge(base, ts, alpha=alphas, backend="reference", compute_dtype="float64")
    zero = run(tasks, [0.6, 0.0, 1.1])
    with pytest.warns(UserWarning, match="its task vector is zero"):
        as_base = run([tasks[0], dict(base), tasks[2]], [0.6, 1.0, 1.1])
    for n in FLOATS:
        assert rel(zero[n] - base[n], as_base[n] - base[n]) <= 1e-12, n


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_task_arithmetic_and_ties(seed, method):
    alphas = [0.8, -0.3, 1.4]
    base, tasks = random_zoo(seed, 3, ODD_SHAPES, torch.float64)
    out = tsvmerge.merge(base, tasks, method=method, task_alpha=alphas, alpha=0.9, backend="reference",
                         compute_dtype="float64")
    for n in FLOATS:
        taus = torch.stack([a * (ft[n] - base[n]) for a, ft in zip(alphas, tasks)])
        expected = 0.9 * (taus.sum(0) if method == "task_arithmetic" else ties_by_hand(taus, 0.2))
        assert rel(out[n] - base[n], expected) <= 1e-10, n


def test_alpha_list_is_task_alpha_with_global_1(seed):
    base, tasks = random_zoo(seed, 3, ODD_SHAPES)
    a = tsvmerge.merge(base, tasks, alpha=[0.2, 0.5, 0.9], backend="torch")
    b = tsvmerge.merge(base, tasks, task_alpha=(0.2, 0.5, 0.9), alpha=1.0, backend="torch")
    assert all(torch.equal(a[n], b[n]) for n in base)


@pytest.mark.parametrize("method,options,tol", [
    ("task_arithmetic", {}, 0.0),
    ("tsv", {"svd": "exact"}, 1e-10),       # measured 1.2e-13..1.8e-12 over 5 seeds (fp64)
])
def test_torch_backend_agrees(seed, method, options, tol):
    base, tasks = random_zoo(seed, 3, ODD_SHAPES, torch.float64)
    run = lambda backend, **kw: tsvmerge.merge(base, tasks, method=method, alpha=[0.4, 1.1, -0.6], backend=backend,
                                               compute_dtype="float64", **kw)
    ref, fast = run("reference"), run("torch", **options)
    for n in FLOATS:
        assert rel(fast[n] - base[n], ref[n] - base[n]) <= tol, n


@pytest.mark.parametrize("method,options", [
    ("tsv", {"task_alpha": [0.7, -1.3]}),    # the stored factors scaled: |alpha| into s, its sign into v
    ("tsv", {"dare": 0.5}),                  # DARE reads every task dense
    ("consensus_tsv", {}),                   # so do the masks
])
def test_compressed_tasks_take_the_steps(seed, method, options):
    """TSV-C tasks (stored rank 26 >= the merge's k = 24) merge as their dense reconstructions."""
    base, tasks = random_zoo(seed, 2, {"w": (64, 48), "b": (64,)}, torch.float64)
    compressed = [tsvmerge.compress(base, ft, rank=26, compute_dtype="float64") for ft in tasks]
    dense = [tsvmerge.decompress(base, c) for c in compressed]
    run = lambda ts: tsvmerge.merge(base, ts, method=method, backend="reference", compute_dtype="float64", **options)
    ours, ref = run(compressed), run(dense)
    for n in base:
        assert rel(ours[n] - base[n], ref[n] - base[n]) <= 1e-10, n


def test_wrong_count_is_one_clear_error(seed, tmp_path, capsys):
    base, tasks = random_zoo(seed, 3, {"w": (8, 6)})
    with pytest.raises(ValueError, match="task_alpha has 2 values for 3 tasks: give one per task"):
        tsvmerge.merge(base, tasks, alpha=[0.5, 0.5])
    with pytest.raises(ValueError, match="give the per-task alphas once"):
        tsvmerge.merge(base, tasks, alpha=[0.5, 0.5, 1], task_alpha=[1, 1, 1])
    for bad in ([], "0.3,x", [0.1, float("nan"), 1]):
        with pytest.raises(ValueError, match="option task_alpha="):
            tsvmerge.merge(base, tasks, task_alpha=bad)
    paths = []
    for i, sd in enumerate([base] + tasks):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_file(sd, paths[-1])
    assert main(["merge", *paths, "-o", str(tmp_path / "out"), "--task-alpha", "0.3,0.5", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "task_alpha has 2 values for 3 tasks" in err
    assert not os.path.exists(tmp_path / "out")


def test_cli_task_alpha_end_to_end(seed, tmp_path, capsys):
    base, tasks = cli_zoo(tmp_path / "zoo", seed)
    out = tmp_path / "merged"
    assert main(["merge", base, *tasks, "-o", str(out), "--task-alpha", "0.3,0.5,1.2", "--alpha", "0.8",
                 "--backend", "torch", "--no-progress"]) == 0
    assert "with tsv" in capsys.readouterr().out
    rep = json.load(open(out / "tsvmerge_report.json"))
    assert rep["options"]["task_alpha"] == [0.3, 0.5, 1.2] and rep["alpha"] == 0.8
    api = tsvmerge.merge(base, tasks, task_alpha=[0.3, 0.5, 1.2], alpha=0.8, backend="torch")
    merged = open_checkpoint(str(out))
    assert all(torch.equal(merged.read(n), api[n]) for n in api)


def test_fusion_bench_tsvm_with_a_list_of_alphas(tmp_path):
    """FusionBench 0.2.33's TSV-M with alpha=[...] scales each task vector before the merge;
    tsvmerge's FusionBench algorithm with the same list agrees within fp32 rounding."""
    pytest.importorskip("fusion_bench", reason="install tsvmerge[fusionbench] (the [test] extra includes it)")
    transformers = pytest.importorskip("transformers")
    from omegaconf import DictConfig
    from fusion_bench.method import TaskSingularVectorMerging
    from fusion_bench.modelpool import CLIPVisionModelPool
    from tsvmerge.integrations.fusion_bench import TSVMerge
    from tiny_models import relative_update_error, save_family

    config = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                           num_attention_heads=4, image_size=16, patch_size=8)
    base, tasks = save_family(transformers.CLIPVisionModel, config, str(tmp_path), 3, 7)
    pool = lambda: CLIPVisionModelPool(DictConfig({"_pretrained_": base, **{f"t{i}": p for i, p in enumerate(tasks)}}))
    alphas = [0.4, 1.3, 0.8]
    theirs = TaskSingularVectorMerging(alpha=alphas).run(pool()).state_dict()
    ours = TSVMerge(alpha=alphas, backend="reference").run(pool()).state_dict()
    plain = TSVMerge(backend="reference").run(pool()).state_dict()
    start = transformers.CLIPVisionModel.from_pretrained(base).state_dict()
    assert relative_update_error(ours, theirs, start) <= 1e-5
    assert relative_update_error(plain, theirs, start) > 0.1      # the alphas changed the merge
