"""DARE (Yu et al. 2024): drop each task-vector entry with probability p, rescale the rest by
1/(1-p); as a step any method takes (`dare=p`) and in dare_task_arithmetic / dare_ties.

The reference here is the paper's equation, tau' = m * tau / (1 - p) with m ~ Bernoulli(1 - p),
and the draw is the contract tsvmerge documents: m = rand(shape) >= p from a CPU generator
seeded by blake2b("{seed}/{name}/dare/task{t}"), rebuilt here without tsvmerge's code.
"""
import hashlib
import json
import os

import pytest
import torch

import tsvmerge
from tsvmerge.cli import main
from tsvmerge.io import save_file

from conftest import ODD_SHAPES, cli_zoo, random_zoo
from test_merge_math import assert_is_paper_tsv, rel


def keep(seed: int, name: str, task: int, shape, p: float) -> torch.Tensor:
    digest = hashlib.blake2b(f"{seed}/{name}/dare/task{task}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    return torch.rand(shape, generator=gen) >= p


def dared(base, tasks, p, seed=0):
    """Every task's fine-tune with its task vector dropped and rescaled (floating tensors)."""
    return [{n: base[n] + keep(seed, n, t, base[n].shape, p) * (ft[n] - base[n]) / (1 - p)
             if base[n].is_floating_point() else ft[n] for n in base} for t, ft in enumerate(tasks)]


def ties_by_hand(taus: torch.Tensor, density: float) -> torch.Tensor:
    """TIES on [T, *shape]: top `density` per task, elect the sign by sum, disjoint mean."""
    flat = taus.flatten(1)
    k = max(1, round(density * flat.shape[1]))
    trimmed = torch.zeros_like(flat)
    for i in range(flat.shape[0]):
        idx = flat[i].abs().topk(k).indices
        trimmed[i, idx] = flat[i, idx]
    agree = (trimmed.sign() == trimmed.sum(0).sign()) & (trimmed != 0)
    return ((trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)).reshape(taus.shape[1:])


FLOATS = [n for n in ODD_SHAPES if not n.endswith("num_batches_tracked")]


@pytest.mark.parametrize("T", [1, 2, 4])
@pytest.mark.parametrize("p", [0.3, 0.9])
def test_dare_task_arithmetic_is_the_paper(seed, T, p):
    base, tasks = random_zoo(seed, T, ODD_SHAPES, torch.float64)
    out = tsvmerge.merge(base, tasks, method="dare_task_arithmetic", dare=p, alpha=0.7, seed=seed,
                         backend="reference", compute_dtype="float64")
    ref = dared(base, tasks, p, seed)
    for n in FLOATS:
        expected = 0.7 * sum(ft[n] - base[n] for ft in ref)
        assert rel(out[n] - base[n], expected) <= 1e-10, n
    assert torch.equal(out["bn.num_batches_tracked"], base["bn.num_batches_tracked"])


def test_dare_ties_is_dare_then_ties(seed):
    base, tasks = random_zoo(seed, 3, ODD_SHAPES, torch.float64)
    out = tsvmerge.merge(base, tasks, method="dare_ties", dare=0.5, density=0.4, seed=seed,
                         backend="reference", compute_dtype="float64")
    ref = dared(base, tasks, 0.5, seed)
    for n in FLOATS:
        expected = ties_by_hand(torch.stack([ft[n] - base[n] for ft in ref]), 0.4)
        assert rel(out[n] - base[n], expected) <= 1e-10, n


def test_dare_defaults(seed):
    """dare_ties and dare_task_arithmetic drop 0.9 by default; every other method 0 (off)."""
    base, tasks = random_zoo(seed, 2, {"w": (30, 20)}, torch.float64)
    run = lambda **kw: tsvmerge.merge(base, tasks, backend="reference", compute_dtype="float64", **kw)["w"]
    assert torch.equal(run(method="dare_task_arithmetic"), run(method="task_arithmetic", dare=0.9))
    assert torch.equal(run(method="dare_ties"), run(method="ties", dare=0.9))
    assert torch.equal(run(method="task_arithmetic", dare=0), run(method="task_arithmetic"))
    assert {o.name: o.default for o in tsvmerge.METHODS["tsv"].options}["dare"] == 0.0


@pytest.mark.parametrize("T", [1, 3])
def test_dare_then_tsv_is_the_paper(seed, T):
    """`dare` on tsv: TSV-M of the dropped and rescaled task vectors (the paper's TSV-M, paper_tsv)."""
    base, tasks = random_zoo(seed, T, ODD_SHAPES, torch.float64)
    out = tsvmerge.merge(base, tasks, method="tsv", dare=0.5, seed=seed, backend="reference",
                         compute_dtype="float64", preset="clip")
    assert_is_paper_tsv(out, base, dared(base, tasks, 0.5, seed), FLOATS)


@pytest.mark.parametrize("method,options,tol", [
    ("dare_task_arithmetic", {}, 0.0),                 # no SVD: the same operations, the same bytes
    ("dare_ties", {"density": 0.5}, 0.0),
    ("tsv", {"dare": 0.5, "svd": "exact"}, 1e-10),     # measured 4e-14..6e-12 over 5 seeds
])
def test_torch_backend_agrees(seed, method, options, tol):
    base, tasks = random_zoo(seed, 3, ODD_SHAPES, torch.float64)
    run = lambda backend, **kw: tsvmerge.merge(base, tasks, method=method, backend=backend, seed=seed,
                                               compute_dtype="float64", **kw)
    ref = run("reference", **{k: v for k, v in options.items() if k != "svd"})
    fast = run("torch", **options)
    for n in FLOATS:
        assert rel(fast[n] - base[n], ref[n] - base[n]) <= tol, n


def test_same_seed_same_bytes_whatever_the_batching(seed, tmp_path):
    """The draw depends on (seed, tensor name, task) only: not on how tensors are batched, nor
    on whether the inputs are files or in memory; another seed draws another mask."""
    shapes = {f"blocks.{i}.w": (24, 16) for i in range(4)} | {f"blocks.{i}.b": (24,) for i in range(4)}
    base, tasks = random_zoo(seed, 3, shapes)
    run = lambda b, t, **kw: tsvmerge.merge(b, t, method="dare_ties", backend="torch", **kw)
    one = run(base, tasks, seed=5)
    paths = []
    for i, sd in enumerate([base] + tasks):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_file(sd, paths[-1])
    for other in (run(base, tasks, seed=5), run(base, tasks, seed=5, batch_bytes=1),
                  run(paths[0], paths[1:], seed=5, batch_bytes=3000)):
        assert all(torch.equal(one[n], other[n]) for n in base)
    reseeded = run(base, tasks, seed=6)
    assert not any(torch.equal(one[n], reseeded[n]) for n in shapes)


def test_keep_rate_and_rescale(seed):
    """Over 10^6 entries the kept fraction is 1 - p within 5 sigma, and each kept entry is the
    task vector's times 1/(1 - p)."""
    p, shape = 0.9, (1000, 1000)
    base, tasks = random_zoo(seed, 1, {"w": shape}, torch.float64)
    tau = tasks[0]["w"] - base["w"]
    out = tsvmerge.merge(base, tasks, method="dare_task_arithmetic", dare=p, backend="reference",
                         compute_dtype="float64")["w"] - base["w"]
    kept = out != 0
    n = kept.numel()
    assert abs(kept.double().mean() - (1 - p)) <= 5 * ((p * (1 - p) / n) ** 0.5)
    assert torch.allclose(out[kept], tau[kept] / (1 - p), rtol=1e-12, atol=1e-14)   # out went through base + update


def test_fusion_bench_dare_has_the_same_distribution(seed):
    """FusionBench 0.2.33's DARE (`fusion_bench.method.dare`) draws from torch's global RNG
    without a seed, so its masks cannot be ours: its keep rate and rescale must be. Run through
    its DareTaskArithmetic on one task (the merged update is then that task's DARE'd vector)."""
    pytest.importorskip("fusion_bench", reason="install tsvmerge[fusionbench] (the [test] extra includes it)")
    from fusion_bench.method.dare import DareTaskArithmetic
    from fusion_bench.modelpool import BaseModelPool

    p, dim = 0.7, 700
    torch.manual_seed(seed)
    models = [torch.nn.Linear(dim, dim).double() for _ in range(2)]
    base, task = ({k: v.detach().clone() for k, v in m.state_dict().items()} for m in models)
    theirs = DareTaskArithmetic(scaling_factor=1.0, sparsity_ratio=p, only_on_linear_weights=False).run(
        BaseModelPool({"_pretrained_": models[0], "task": models[1]})).state_dict()   # (in place: copied first)
    ours = tsvmerge.merge(base, [task], method="dare_task_arithmetic", dare=p, seed=seed,
                          backend="reference", compute_dtype="float64")
    tau = task["weight"] - base["weight"]
    n = tau.numel()
    rates = []
    for merged in (theirs, ours):
        update = merged["weight"] - base["weight"]
        kept = update != 0
        rates.append(float(kept.double().mean()))
        assert abs(rates[-1] - (1 - p)) <= 5 * (p * (1 - p) / n) ** 0.5
        assert torch.allclose(update[kept], tau[kept] / (1 - p), rtol=1e-12, atol=1e-14)
    assert abs(rates[0] - rates[1]) <= 5 * (2 * p * (1 - p) / n) ** 0.5


def test_bad_drop_rates_are_one_clear_error(seed, tmp_path, capsys):
    base, tasks = random_zoo(seed, 2, {"w": (8, 6)})
    for bad, why in ((1.0, r"drop rate in \[0, 1\)"), (-0.1, r"drop rate in \[0, 1\)"), ("x", "convert")):
        with pytest.raises(ValueError, match=f"option dare=.*{why}"):
            tsvmerge.merge(base, tasks, method="ties", dare=bad)
    paths = []
    for i, sd in enumerate([base] + tasks):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_file(sd, paths[-1])
    assert main(["merge", *paths, "-o", str(tmp_path / "out"), "--dare", "1", "--no-progress"]) == 2
    assert "option dare='1'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_cli_dare_ties_end_to_end(seed, tmp_path, capsys):
    """`tsvmerge merge --method dare_ties` on a tiny zoo written by `tsvmerge zoo`: the same
    bytes as the Python API, the options in the report."""
    base, tasks = cli_zoo(tmp_path / "zoo", seed)
    out = tmp_path / "merged"
    assert main(["merge", base, *tasks, "-o", str(out), "--method", "dare_ties", "--dare", "0.8", "--density", "0.5",
                 "--seed", "3", "--backend", "torch", "--no-progress"]) == 0
    assert "with dare_ties" in capsys.readouterr().out
    rep = json.load(open(out / "tsvmerge_report.json"))
    assert rep["options"]["dare"] == 0.8 and rep["options"]["density"] == 0.5
    api = tsvmerge.merge(base, tasks, method="dare_ties", dare=0.8, density=0.5, seed=3, backend="torch")
    from tsvmerge.io import open_checkpoint
    merged = open_checkpoint(str(out))
    assert all(torch.equal(merged.read(n), api[n]) for n in api)
