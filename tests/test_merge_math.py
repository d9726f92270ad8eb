"""TSV-M against the paper's algorithm, and the math contract of DESIGN section 2."""
import pytest
import torch

import tsvmerge
from tsvmerge import primitives as P
from tsvmerge.methods.tsv import sti

from conftest import ODD_SHAPES, random_zoo
from paper_tsv import paper_tsv_merge


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


@pytest.mark.parametrize("T", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_reference_matches_paper(seed, T, dtype, tol):
    base, tasks = random_zoo(seed, T, ODD_SHAPES, dtype)
    ours = tsvmerge.merge(base, tasks, backend="reference", compute_dtype=dtype, preset="clip")
    paper = paper_tsv_merge(base, tasks, dtype=torch.float64)
    for name in base:
        if base[name].is_floating_point():
            # compare the updates: theta0 is large, so the weights alone would hide errors
            bound = max(tol, 8 * torch.finfo(dtype).eps / truncation_gap(base, tasks, name))
            assert rel(ours[name] - base[name], paper[name] - base[name]) <= bound, name
        else:
            assert torch.equal(ours[name], base[name])


def assert_is_paper_tsv(out, base, tasks, names, alpha=1.0):
    """A float64 merge `out` is the paper's TSV-M of `tasks` (paper_tsv) on `names`, its update
    within the rounding the truncation gap allows."""
    ref = paper_tsv_merge(base, tasks, alpha=alpha)
    for n in names:
        bound = max(1e-10, 8 * torch.finfo(torch.float64).eps / truncation_gap(base, tasks, n))
        assert rel(out[n] - base[n], ref[n] - base[n]) <= bound, n


def truncation_gap(base, tasks, name):
    """min over tasks of (s_k - s_k+1) / s_1 at k = r/T: the top-k factors are determined
    only to about eps / gap, and random inputs sometimes have tiny gaps (seen: 1.8e-4,
    giving 5.7e-4 in fp32)."""
    shape = base[name].shape
    k = min(shape) // len(tasks) if len(shape) == 2 else 0
    if not 0 < k < min(shape):
        return 1.0
    gaps = []
    for t in tasks:
        s = torch.linalg.svdvals((t[name] - base[name]).double())
        gaps.append(float((s[k - 1] - s[k]) / s[0]))
    return max(min(gaps), 1e-300)


def test_alpha_scales_both_paths(seed):
    base, tasks = random_zoo(seed, 3, ODD_SHAPES, torch.float64)
    one = tsvmerge.merge(base, tasks, backend="reference", compute_dtype="float64")
    half = tsvmerge.merge(base, tasks, backend="reference", compute_dtype="float64", alpha=0.5)
    for name in ("blocks.0.mlp.weight", "norm.weight"):
        assert rel(half[name] - base[name], 0.5 * (one[name] - base[name])) < 1e-12


def test_single_task_returns_its_own_vector(seed):
    base, tasks = random_zoo(seed, 1, ODD_SHAPES, torch.float64)
    out = tsvmerge.merge(base, tasks, backend="reference", compute_dtype="float64")
    for name in base:
        if base[name].is_floating_point():
            assert rel(out[name], tasks[0][name]) < 1e-12


def _rank1_pair(u1, u2, v1, v2, s1=3.0, s2=2.0):
    base = {"w": torch.zeros(len(u1), len(v1), dtype=torch.float64) + 0.5}
    tasks = [{"w": base["w"] + s1 * torch.outer(u1, v1)}, {"w": base["w"] + s2 * torch.outer(u2, v2)}]
    out = tsvmerge.merge(base, tasks, backend="reference", compute_dtype="float64", k=1)
    return out["w"] - base["w"], tasks[0]["w"] - base["w"], tasks[1]["w"] - base["w"]


def _unit(x):
    return x / x.norm()


def test_paper_rank1_orthogonal(seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(9, 2, generator=g, dtype=torch.float64))
    p, _ = torch.linalg.qr(torch.randn(7, 2, generator=g, dtype=torch.float64))
    delta, t1, t2 = _rank1_pair(q[:, 0], q[:, 1], p[:, 0], p[:, 1])
    assert rel(delta, t1 + t2) < 1e-12          # no interference: Task Arithmetic exactly


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_paper_rank1_collinear(seed, sign):
    g = torch.Generator().manual_seed(seed)
    u, v = _unit(torch.randn(9, generator=g, dtype=torch.float64)), _unit(torch.randn(7, generator=g, dtype=torch.float64))
    delta, t1, t2 = _rank1_pair(u, sign * u, v, v)
    # polar([u, +-u]) = [u, +-u] / sqrt(2): neither double scaling nor full cancellation
    assert rel(delta, (t1 + t2) / 2) < 1e-12
    assert torch.isfinite(delta).all()


def test_paper_rank1_partially_collinear(seed):
    g = torch.Generator().manual_seed(seed)
    u1, u2 = _unit(torch.randn(9, generator=g, dtype=torch.float64)), _unit(torch.randn(9, generator=g, dtype=torch.float64))
    v1, v2 = _unit(torch.randn(7, generator=g, dtype=torch.float64)), _unit(torch.randn(7, generator=g, dtype=torch.float64))
    delta, t1, t2 = _rank1_pair(u1, u2, v1, v2)
    # closed form by whitening: X (X^T X)^(-1/2) with the 2x2 Gram [[1, c], [c, 1]]
    def white(a, b):
        x = torch.stack([a, b], 1)
        w, q = torch.linalg.eigh(x.T @ x)
        return x @ q @ torch.diag(w.rsqrt()) @ q.T
    expected = white(u1, u2) @ torch.diag(torch.tensor([3.0, 2.0], dtype=torch.float64)) @ white(v1, v2).T
    assert rel(delta, expected) < 1e-10
    # orthonormal factors keep the energy: ||Delta||^2 = s1^2 + s2^2, unlike t1 + t2
    assert abs(float(delta.norm() ** 2) - 13.0) < 1e-9
    assert abs(float((t1 + t2).norm() ** 2) - 13.0) > 1e-3


@pytest.mark.parametrize("dtype,k,tol", [(torch.float64, None, 1e-7), (torch.float32, 3, 1e-5)])
def test_whitening_agrees_with_procrustes(seed, dtype, k, tol):
    # Whitening works on the Gram matrix, so its rounding error grows with cond(U)^2; the
    # default budget k = r/T makes U nearly square (cond ~ r), so fp32 is checked at a
    # smaller k where U is well conditioned, and the default budget in fp64.
    base, tasks = random_zoo(seed, 4, {"a": (37, 23), "b": (64, 48)}, dtype)
    opts = {} if k is None else {"k": k}
    a = tsvmerge.merge(base, tasks, backend="reference", compute_dtype=dtype, orthogonalize="procrustes", **opts)
    b = tsvmerge.merge(base, tasks, backend="reference", compute_dtype=dtype, orthogonalize="whiten", **opts)
    for name in base:
        assert rel(a[name] - base[name], b[name] - base[name]) < tol


def test_zero_padding_changes_nothing(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 40, 12, generator=g, dtype=torch.float64)
    padded = torch.cat([x, torch.zeros(2, 40, 8, dtype=torch.float64)], -1)
    s = torch.rand(2, 12, generator=g, dtype=torch.float64)
    y = torch.randn(2, 30, 12, generator=g, dtype=torch.float64)
    plain = P.polar(x) @ torch.diag_embed(s) @ P.polar(y).transpose(-1, -2)
    s_pad = torch.cat([s, torch.zeros(2, 8, dtype=torch.float64)], -1)
    y_pad = torch.cat([y, torch.zeros(2, 30, 8, dtype=torch.float64)], -1)
    assert rel(P.polar(padded) @ torch.diag_embed(s_pad) @ P.polar(y_pad).transpose(-1, -2), plain) < 1e-12


def test_k0_falls_back_to_mean_and_says_so(seed, tmp_path):
    shapes = {"narrow": (2, 50), "wide": (40, 30)}
    base, tasks = random_zoo(seed, 3, shapes, torch.float64)
    report = tmp_path / "r.json"
    out = tsvmerge.merge(base, tasks, backend="reference", compute_dtype="float64", report=str(report))
    mean = sum(t["narrow"] - base["narrow"] for t in tasks) / 3
    assert rel(out["narrow"] - base["narrow"], mean) < 1e-12
    import json
    rep = json.loads(report.read_text())
    assert rep["tensors"]["narrow"]["path"] == "dense" and "k=0" in rep["tensors"]["narrow"]["note"]
    assert rep["summary"]["fallbacks"] == ["narrow"]


@pytest.mark.parametrize("how", ["procrustes", "whiten"])
def test_duplicate_tasks_stay_finite(seed, how):
    base, tasks = random_zoo(seed, 1, {"w": (30, 24), "b": (30,)}, torch.float32)
    dup = [tasks[0]] * 3
    out = tsvmerge.merge(base, dup, backend="reference", orthogonalize=how)
    assert all(torch.isfinite(v).all() for v in out.values())
    if how == "procrustes":
        # T copies of one task give its rank-k truncation, k = r / T
        tau = (tasks[0]["w"] - base["w"]).double()
        u, s, vh = torch.linalg.svd(tau)
        trunc = u[:, :8] @ torch.diag(s[:8]) @ vh[:8]
        assert rel(out["w"] - base["w"], trunc) < 1e-4


def test_sti_vanishes_after_orthogonalisation(seed):
    base, tasks = random_zoo(seed, 4, {"w": (48, 40)}, torch.float64)
    rep = tsvmerge.interference(base, tasks, backend="reference", compute_dtype="float64")
    e = rep["tensors"]["w"]
    assert e["sti"] > 1e-2 and e["sti_orthogonalized"] < 1e-9
    assert len(e["overlap_u"]) == 4 and abs(e["overlap_u"][2][2] - 1.0) < 1e-9
    # STI by its definition, computed here independently
    k = 10
    blocks = [torch.linalg.svd(t["w"] - base["w"]) for t in tasks]
    U = torch.cat([b[0][:, :k] for b in blocks], 1)
    S = torch.cat([b[1][:k] for b in blocks])
    V = torch.cat([b[2][:k].T for b in blocks], 1)
    eye = torch.eye(4 * k, dtype=torch.float64)
    expected = ((U.T @ U - eye) @ torch.diag(S) @ (V.T @ V - eye)).abs().sum()
    assert abs(e["sti"] - float(expected)) < 1e-8 * float(expected)
    assert abs(float(sti((U.T @ U)[None], S[None], (V.T @ V)[None])[0]) - float(expected)) < 1e-8 * float(expected)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_half_precision_inputs(seed, dtype, tol):
    base, tasks = random_zoo(seed, 3, ODD_SHAPES, dtype)
    out = tsvmerge.merge(base, tasks, backend="reference")
    upcast = tsvmerge.merge({k: v.float() if v.is_floating_point() else v for k, v in base.items()},
                            [{k: v.float() if v.is_floating_point() else v for k, v in t.items()} for t in tasks],
                            backend="reference")
    for name, v in out.items():
        assert v.dtype == base[name].dtype
        if v.is_floating_point():
            # the output is rounded to the input dtype: compare the weights a user gets
            assert rel(v.float(), upcast[name]) < tol, name


@pytest.mark.parametrize("method", ["task_arithmetic", "average", "ties"])
def test_baselines(seed, method):
    base, tasks = random_zoo(seed, 3, {"w": (20, 16), "b": (20,)}, torch.float64)
    out = tsvmerge.merge(base, tasks, method=method, alpha=0.7, compute_dtype="float64")
    taus = torch.stack([t["w"] - base["w"] for t in tasks])
    if method == "task_arithmetic":
        expected = 0.7 * taus.sum(0)
    elif method == "average":
        expected = 0.7 * taus.mean(0)
    else:  # TIES by hand: top 20% per task, elect sign by sum, disjoint mean
        flat = taus.flatten(1)
        keep = round(0.2 * flat.shape[1])
        trimmed = torch.zeros_like(flat)
        for i in range(3):
            idx = flat[i].abs().topk(keep).indices
            trimmed[i, idx] = flat[i, idx]
        sign = trimmed.sum(0).sign()
        agree = (trimmed.sign() == sign) & (trimmed != 0)
        expected = 0.7 * ((trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)).reshape(20, 16)
    assert rel(out["w"] - base["w"], expected) < 1e-12


def test_unknown_options_are_refused(seed):
    base, tasks = random_zoo(seed, 2, {"w": (8, 6)})
    with pytest.raises(TypeError, match="unknown option"):
        tsvmerge.merge(base, tasks, orthogonalise="whiten")
    with pytest.raises(ValueError, match="unknown method"):
        tsvmerge.merge(base, tasks, method="magic")


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "average", "tsv"])
def test_scalar_tensors_merge(seed, method):
    """0-d tensors (a logit scale, a temperature) take the dense path like any other."""
    base, tasks = random_zoo(seed, 3, {"logit_scale": (), "w": (8, 6)})
    out = tsvmerge.merge(base, tasks, method=method, backend="reference")
    taus = torch.stack([t["logit_scale"] - base["logit_scale"] for t in tasks])
    if method == "task_arithmetic":
        assert torch.allclose(out["logit_scale"], base["logit_scale"] + taus.sum(), atol=1e-6)
    assert out["logit_scale"].shape == () and torch.isfinite(out["logit_scale"])


# -- DESIGN section 2, "Null directions never enter" ---------------------------------------------
def _rank_deficient_zoo(seed, eps=0.0):
    """A 64 x 48 tensor (k = 16 for T = 3): tasks of rank 3 and 10, and a full-rank one with a
    clear gap after its 16th singular value (so that its top-16 factors are well conditioned);
    the first moved by a perturbation of relative size eps. fp64, base ~N(0, 1), tasks of norm ~10."""
    g = torch.Generator().manual_seed(seed)
    m, n = 64, 48
    base = {"w": torch.randn(m, n, generator=g, dtype=torch.float64)}
    taus = [torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g, dtype=torch.float64)
            for r in (3, 10)]
    u, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.cat([torch.linspace(10, 5, 16, dtype=torch.float64), torch.full((32,), 1e-2, dtype=torch.float64)])
    taus = [10 * t / t.norm() for t in taus + [u @ torch.diag(s) @ v.T]]
    e = torch.randn(m, n, generator=g, dtype=torch.float64)
    taus[0] = taus[0] + eps * taus[0].norm() * e / e.norm()
    return base, [{"w": base["w"] + t} for t in taus], taus


def _kept_merge(taus, k):
    """TSV-M by hand, each task keeping min(k, rank) triplets (rank from the construction)."""
    us, ss, vs = [], [], []
    for tau, r in zip(taus, (3, 10, 48)):
        u, s, vh = torch.linalg.svd(tau)
        keep = min(k, r)
        us.append(u[:, :keep]), ss.append(s[:keep]), vs.append(vh[:keep].T)
    return P.polar(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ P.polar(torch.cat(vs, 1)).T


BACKENDS_ROUTES = [("reference", "procrustes"), ("reference", "whiten"), ("torch", "procrustes"), ("torch", "whiten")]


@pytest.mark.parametrize("backend,how", BACKENDS_ROUTES)
def test_rank_deficient_task_keeps_its_rank(seed, backend, how):
    base, tasks, taus = _rank_deficient_zoo(seed)
    exact = {"svd": "exact"} if backend == "torch" else {}  # the polar routes are under test here
    out = tsvmerge.merge(base, tasks, backend=backend, compute_dtype="float64", orthogonalize=how, **exact)
    assert rel(out["w"] - base["w"], _kept_merge(taus, 16)) < 1e-9


@pytest.mark.parametrize("backend,how", BACKENDS_ROUTES)
def test_perturbation_below_rounding_does_not_move_the_merge(seed, backend, how):
    """1e-15 relative is below the fp64 rank tolerance (max(m, n) eps = 1.4e-14): the task's rank
    stays 3. Without the rule its 13 null columns, an arbitrary completion, move the merge by
    ~40% (the paper's algorithm shows it)."""
    base, tasks, _ = _rank_deficient_zoo(seed)
    _, moved, _ = _rank_deficient_zoo(seed, eps=1e-15)
    a, b = (tsvmerge.merge(base, t, backend=backend, compute_dtype="float64", orthogonalize=how) for t in (tasks, moved))
    assert rel(b["w"] - base["w"], a["w"] - base["w"]) < 1e-12
    pa, pb = paper_tsv_merge(base, tasks), paper_tsv_merge(base, moved)
    assert rel(pb["w"] - base["w"], pa["w"] - base["w"]) > 1e-2


@pytest.mark.parametrize("backend,how", BACKENDS_ROUTES)
def test_rank_deficient_fp32_agrees_with_fp64(seed, backend, how):
    """fp32 rounding of the inputs is a perturbation too (relative ~1e-7, below fp32's tolerance)."""
    base, tasks, _ = _rank_deficient_zoo(seed)
    a, b = (tsvmerge.merge(base, tasks, backend=backend, compute_dtype=d, orthogonalize=how)
            for d in ("float64", "float32"))
    assert rel(b["w"] - base["w"], a["w"] - base["w"]) < 1e-4


def test_drop_null_directions_keeps_min_k_rank(seed):
    from tsvmerge.backends import TaskSVD
    from tsvmerge.lowrank import drop_null_directions
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(2, 3, 40, 6, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(2, 3, 30, 6, generator=g, dtype=torch.float64))[0]
    s = torch.rand(2, 3, 6, generator=g, dtype=torch.float64).sort(-1, descending=True).values + 1
    full = TaskSVD(u, s, v, torch.ones(2, 3, dtype=torch.float64))
    assert drop_null_directions(full) is full                        # full rank: the same tensors
    s = s.clone()
    s[0, 0, 2:] = 1e-15 * s[0, 0, 0]                                 # rank 2: rounding-level rest
    s[:, 1:, 4:] = 0                                                 # rank 4: zero padding
    s[1, 2, :] = 0                                                   # a zero task vector
    out = drop_null_directions(TaskSVD(u, s, v, full.energy))
    assert out.s.shape[-1] == 6                                      # task (1, 0) keeps all six
    kept = (out.s != 0).sum(-1)
    assert kept.tolist() == [[2, 4, 4], [6, 4, 0]]
    assert torch.equal((out.u.norm(dim=-2) != 0).sum(-1), kept) and torch.equal((out.v.norm(dim=-2) != 0).sum(-1), kept)
    s[1, 0, 3:] = 0
    narrow = drop_null_directions(TaskSVD(u, s, v, full.energy))
    assert narrow.s.shape[-1] == 4 and torch.equal(narrow.u[0, 1], u[0, 1, :, :4])
