"""The torch backend's CPU scheduling (tsvmerge.backends.lapack) and its fast route to the
polar factor (tsvmerge.backends.fast_polar) against the references in tsvmerge.primitives."""
import pytest
import torch

from tsvmerge import primitives as P
from tsvmerge.backends import fast_polar, get_backend, lapack


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _with_singular_values(g, m, sv):
    """x [m, len(sv)] with the given singular values and random singular vectors."""
    p = torch.linalg.qr(torch.randn(m, len(sv), generator=g, dtype=torch.float64))[0]
    q = torch.linalg.qr(torch.randn(len(sv), len(sv), generator=g, dtype=torch.float64))[0]
    return ((p * sv) @ q.mT).float()


def test_polar_root_routes_each_matrix_by_its_conditioning(seed, monkeypatch):
    """fp32 where cond(x^T x) <= FP32_GRAM_COND, fp64 elsewhere, per matrix of a batch; the
    fp32 route within 2e-5 of the fp64 one."""
    g = torch.Generator().manual_seed(seed)
    m, K = 300, 40
    well = _with_singular_values(g, m, torch.linspace(1.0, 0.2, K, dtype=torch.float64))      # cond(G) 25
    ill = _with_singular_values(g, m, torch.logspace(0, -4, K, dtype=torch.float64))           # cond(G) 1e8
    # cond(G) = 2000 that the Cholesky pivots understate 4x (G = I but G[0,1] = 1 - 1e-3):
    # only the fp32 eigenvalues show it
    hidden = torch.eye(m, K, dtype=torch.float64)
    hidden[:2, 1] = torch.tensor([1 - 1e-3, (1 - (1 - 1e-3) ** 2) ** 0.5])
    hidden = (torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0] @ hidden).float()
    x = torch.stack([well, ill, hidden])
    fp64_batches = []
    inv_sqrt_psd = P.inv_sqrt_psd
    monkeypatch.setattr(P, "inv_sqrt_psd", lambda gram, *a, **kw: fp64_batches.append(gram.shape[0]) or inv_sqrt_psd(gram, *a, **kw))
    root = fast_polar.polar_root(x, fast_polar.gram_sym(x))
    assert fp64_batches == [2] and root.dtype == torch.float32
    want = inv_sqrt_psd(P.gram(x.double()), range_only=True, data_dtype=torch.float32)
    for i, tol in enumerate((2e-5, 1e-6, 1e-6)):
        assert rel(root[i], want[i]) < tol, i


@pytest.mark.parametrize("K, block", [(37, 128), (300, 128), (300, 64), (96, 96)])
def test_gram_sym_matches_gram(seed, K, block):
    x = torch.randn(2, 3, 301, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = fast_polar.gram_sym(x, block)
    assert (got - P.gram(x)).abs().max() < 1e-10 * x.shape[-2]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("batch", [(1,), (3,), (2, 3)])
def test_sym_eigh_threaded_batches_match_torch(seed, batch, dtype, tol):
    a = torch.randn(*batch, 131, 131,
                    generator=torch.Generator().manual_seed(seed), dtype=dtype)
    a = a + a.mT
    openblas = lapack._numpy_openblas()
    threads = [lib["num_threads"] for lib in openblas.info()] if openblas is not None else None
    w, q = lapack.sym_eigh(a)
    w_ref, q_ref = P.sym_eigh(a)
    assert w.shape == w_ref.shape and q.shape == q_ref.shape and w.dtype == q.dtype == dtype
    assert (w - w_ref).abs().max() < tol * w_ref.abs().max()
    assert ((q * w.unsqueeze(-2)) @ q.mT - a).abs().max() < tol * a.abs().max()
    if openblas is not None:                       # numpy's OpenBLAS gets its threads back
        assert [lib["num_threads"] for lib in openblas.info()] == threads


def test_serial_lapack_restores_threads_and_keeps_the_numbers(seed):
    """The torch backend's orthonormalize is the reference's, with its small steps on one thread."""
    y = torch.randn(4, 300, 37, generator=torch.Generator().manual_seed(seed)) * torch.logspace(0, -3, 37)
    threads = torch.get_num_threads()
    got = get_backend("torch").orthonormalize(y)
    assert torch.get_num_threads() == threads
    assert rel(got, P.orthonormalize(y)) < 1e-6
