"""Adaptive rank budgets for TSV-M (k="energy:F"): each task's rank per tensor from its own
spectrum, against a plain fp64 implementation of the rule."""
import json

import pytest
import torch

import tsvmerge
from tsvmerge.methods.tsv import energy_ranks
from tsvmerge.plan import EnergyBudget, rank_budget

from conftest import ODD_SHAPES, random_zoo


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def polar(x):
    p, s, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def paper_ranks(spectra, share, r):
    """Per task the smallest k with sum_{j<=k} s_j^2 >= share * sum_j s_j^2; where the ranks add
    up to more than r, k_t r / sum rounded down and the ranks left over to the largest remainders
    (the earlier task first on a tie)."""
    ranks = []
    for s in spectra:
        energy = [float(x) ** 2 for x in s]
        total, k, kept = sum(energy), 0, 0.0
        while kept < share * total and k < len(energy):
            kept += energy[k]
            k += 1
        ranks.append(max(k, 1))
    total = sum(ranks)
    if total <= r:
        return ranks
    quota = [k * r / total for k in ranks]
    out = [int(q) for q in quota]
    for t in sorted(range(len(ranks)), key=lambda t: (-(quota[t] - out[t]), t))[:r - sum(out)]:
        out[t] += 1
    return out


def paper_energy_tsv(taus, share):
    """TSV-M with each task's own rank: concatenate its top k_t triplets, polar factors, rebuild."""
    svds = [torch.linalg.svd(t, full_matrices=False) for t in taus]
    ranks = paper_ranks([s for _, s, _ in svds], share, min(taus[0].shape))
    u = torch.cat([u[:, :k] for (u, _, _), k in zip(svds, ranks)], 1)
    s = torch.cat([s[:k] for (_, s, _), k in zip(svds, ranks)])
    v = torch.cat([vh[:k].T for (_, _, vh), k in zip(svds, ranks)], 1)
    return polar(u) * s @ polar(v).T, ranks


def decaying_zoo(seed, T, shapes, dtype=torch.float64):
    """Task vectors whose spectra decay at different rates per task: the energy ranks differ."""
    base, tasks = random_zoo(seed, T, shapes, dtype)
    g = torch.Generator().manual_seed(seed)
    for t, task in enumerate(tasks):
        for name, shape in shapes.items():
            if len(shape) == 2:
                u, _, vh = torch.linalg.svd(torch.randn(shape, generator=g, dtype=torch.float64), full_matrices=False)
                s = torch.arange(1, min(shape) + 1, dtype=torch.float64) ** -(0.5 + 0.6 * t)
                task[name] = (base[name].double() + 0.1 * u * s @ vh).to(dtype)
    return base, tasks


@pytest.mark.parametrize("share", [0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("T", [1, 2, 3, 5])
def test_reference_matches_paper(seed, tmp_path, share, T):
    base, tasks = decaying_zoo(seed, T, ODD_SHAPES)
    report = tmp_path / "r.json"
    ours = tsvmerge.merge(base, tasks, backend="reference", compute_dtype="float64", preset="clip",
                          k=f"energy:{share}", report=str(report))
    rep = json.loads(report.read_text())
    assert rep["options"]["k"] == f"energy:{share:g}"
    for name in base:
        taus = [t[name].double() - base[name].double() for t in tasks]
        if not base[name].is_floating_point():
            assert torch.equal(ours[name], base[name])
        elif base[name].dim() != 2 or "text_projection" in name or min(base[name].shape) < T:
            assert rel(ours[name] - base[name], sum(taus) / T) <= 1e-12, name
        else:
            update, ranks = paper_energy_tsv(taus, share)
            assert rel(ours[name] - base[name], update) <= 1e-10, name
            assert rep["tensors"][name]["ranks"] == ranks, name
            assert sum(ranks) <= min(base[name].shape)


def test_ranks_differ_and_shrink(seed):
    """The decaying zoo gives each task its own rank; at share 1 each needs all r and they are
    shrunk to sum to r."""
    base, tasks = decaying_zoo(seed, 3, {"w": (64, 48)})
    taus = torch.stack([t["w"] - base["w"] for t in tasks]).unsqueeze(0)
    s = torch.linalg.svdvals(taus)
    ranks = energy_ranks(s, 0.9, 48)[0].tolist()
    assert len(set(ranks)) == 3 and ranks == paper_ranks(s[0], 0.9, 48)
    assert energy_ranks(s, 1.0, 48)[0].tolist() == [16, 16, 16]
    assert energy_ranks(s, 1.0, 47)[0].tolist() == [16, 16, 15]      # remainders tie: the earlier tasks


def test_energy_one_over_r_matches_fixed_rank(seed):
    """At share 1 with r divisible by T, every task keeps r / T: the default TSV-M merge."""
    base, tasks = random_zoo(seed, 4, {"w": (40, 32)}, torch.float64)
    a = tsvmerge.merge(base, tasks, backend="reference", compute_dtype="float64", k="energy:1")["w"]
    b = tsvmerge.merge(base, tasks, backend="reference", compute_dtype="float64")["w"]
    assert rel(a - base["w"], b - base["w"]) < 1e-12


def test_torch_backend_agrees(seed):
    """With an energy budget the torch backend loads all r triplets: its SVD is exact (k = r), so
    the merges agree to fp32 level (measured 6.7e-6 at worst over 6 seeds)."""
    base, tasks = decaying_zoo(seed, 3, ODD_SHAPES, torch.float32)
    ref = tsvmerge.merge(base, tasks, backend="reference", compute_dtype="float64", preset="clip", k="energy:0.9")
    fast = tsvmerge.merge(base, tasks, backend="torch", preset="clip", k="energy:0.9")
    for name in ("blocks.0.attn.weight", "blocks.1.mlp.weight"):
        assert rel(fast[name] - base[name], ref[name] - base[name]) <= 1e-4, name


@pytest.mark.parametrize("given,parsed", [(3, 3), ("3", 3), ("energy:0.95", EnergyBudget(0.95)),
                                          (" Energy:1 ", EnergyBudget(1.0))])
def test_parser(given, parsed):
    assert rank_budget(given) == parsed


@pytest.mark.parametrize("bad", ["energy:0", "energy:1.5", "energy:", "energy:x", "0", "2.5", "x", "inf", True])
def test_bad_budget_is_one_clear_error(bad):
    base, tasks = random_zoo(1, 2, {"w": (8, 6)})
    with pytest.raises(ValueError, match=r"option k=.*expected a whole number >= 1 or 'energy:F'"):
        tsvmerge.merge(base, tasks, k=bad)


def test_cli(tmp_path):
    from tsvmerge.cli import main
    from safetensors.torch import save_file
    base, tasks = decaying_zoo(3, 2, {"w": (24, 16), "b": (16,)}, torch.float32)
    paths = []
    for i, sd in enumerate([base, *tasks]):
        paths.append(str(tmp_path / f"{i}.safetensors"))
        save_file(sd, paths[-1])
    assert main(["merge", *paths, "-o", str(tmp_path / "out"), "--k", "energy:0.8", "--no-progress",
                 "--report", str(tmp_path / "r.json")]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    taus = [(t["w"] - base["w"]).double() for t in tasks]
    assert rep["tensors"]["w"]["ranks"] == paper_energy_tsv(taus, 0.8)[1]
    assert main(["merge", *paths, "-o", str(tmp_path / "bad"), "--k", "energy:2"]) == 2
    assert not (tmp_path / "bad").exists()
