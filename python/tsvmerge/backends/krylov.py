"""The torch backend's randomized range finders: batched block Krylov (Halko-Martinsson-Tropp;
Musco & Musco 2015) over one shape group of L layers x T task matrices, through the backend's
hooks (`sketch`, `delta_matmul`, `delta_matmul_t`, `orthonormalize`, `sym_eigh`, `gram`), so the
fast backends' kernels run inside them.

- `adaptive_svd` (the default): Krylov blocks per task matrix until a bound on its captured
  energy reaches `energy_target`; matrices that get there stop costing passes.
- `fixed_svd`: the fixed schedule (`power_iters` blocks, or subspace iterations without
  `krylov`), with a cheap estimate of the captured energy for the report.

A is tau, or tau^T when m > n, so the basis lives on the short side.
"""
from __future__ import annotations

import functools
import itertools

import torch

from .. import primitives as P
from . import lapack
from .base import TaskSVD
from .reference import exact_task_svd

# Columns of the random probe that estimates the residual's norm; it rides along the products.
PROBE_COLUMNS = 8
# The probe's estimate is a Ritz value, so it reads low; the bound uses it times a margin:
# the first for the first stage (the probe has made one power step), the second after it.
# Measured (the estimate is 0.5-0.95 of the norm; the bound's worst case over the unseen part
# covers the rest): with 4 columns and 1.3 the bound read up to 6e-5 above the truth on
# ViT-L-14 x 20 power-law matrices; with 8 columns, by no more than rounding (2e-6) on every
# zoo of benchmarks/tune_randomized.py and on 160-wide zoos of 10 seeds x 4 spectra.
RHO_MARGIN = (2.0, 1.3)


# -- the fixed schedule ------------------------------------------------------------------------
def fixed_svd(be, finetuned, base, k, c):
    """The fixed schedule: `power_iters` blocks (or power iterations), then B = Q^T A."""
    m, n = finetuned.shape[-2:]
    # The range finder works on tau^T when m > n, so its basis lives on the short side:
    # orthonormalising it costs (side) x c^2 per step, the products cost the same.
    transposed = m > n
    fwd, bwd = functools.partial(be.delta_matmul, finetuned, base), functools.partial(be.delta_matmul_t, finetuned, base)
    if transposed:
        fwd, bwd = bwd, fwd
    probe = _energy_probe(be, finetuned.shape[:2], m if transposed else n) if be.energy_estimate else None
    range_finder = _krylov_range if be.krylov else _power_range
    qs, bts, residual = range_finder(be, be.sketch(finetuned, base, c, transposed), fwd, bwd, probe)
    # Small SVD of B through eigh of B B^T (w x w, fp64: Krylov bases carry zero
    # columns, and fp32 syevd may fail on such a spread), eigenvalues ascending.
    lam, w = be.sym_eigh(_block_gram(be, bts).double())
    lam, w = lam.flip(-1)[..., :k].clamp_min(0).to(bts[0].dtype), w.flip(-1)[..., :k].to(bts[0].dtype)
    s = lam.sqrt()
    ws = w.split([b.shape[-1] for b in bts], dim=-2)
    u, v = _blocks_times(qs, ws), _blocks_times(bts, ws)
    v /= s.clamp_min(torch.finfo(s.dtype).tiny).unsqueeze(-2)
    energy = None if probe is None else _captured_energy(be, s, k, residual)
    passes = torch.full(finetuned.shape[:2], 2 * be.power_iters + 2)
    return TaskSVD(v, s, u, energy, passes) if transposed else TaskSVD(u, s, v, energy, passes)


def _block_gram(be, blocks):
    """[b_1 ... b_j]^T [b_1 ... b_j] from the blocks, without concatenating them."""
    rows = [[be.gram(bi) if i == j else bi.mT @ bj for j, bj in enumerate(blocks)] for i, bi in enumerate(blocks)]
    return torch.cat([torch.cat(row, -1) for row in rows], -2)


# The range finders get the sketch Y = A Omega and the products x -> A x, y -> A^T y,
# where A is tau or tau^T, and return the blocks of Q and of B^T = A^T Q.
def _power_range(be, y, fwd, bwd, probe=None):
    """Subspace iteration: Q = orth((A A^T)^q A Omega); 2q + 2 products."""
    # Intermediate bases need only be well conditioned (one Cholesky-QR pass); the
    # final one is orthonormal to working precision.
    q = be.orthonormalize(y, passes=1 if be.power_iters else 2)
    tx = fwd(probe) if probe is not None and be.power_iters == 0 else None
    for i in range(be.power_iters):
        last = i == be.power_iters - 1
        z = be.orthonormalize(bwd(q), passes=1)
        y, tx = _forward_with_probe(fwd, z, probe if last else None)
        q = be.orthonormalize(y, passes=2 if last else 1)
    bt, residual = _backward_with_residual(bwd, q, [q], tx)
    return [q], [bt], residual


def _krylov_range(be, y, fwd, bwd, probe=None):
    """Block Krylov (Musco & Musco 2015): Q spans [A Omega, (A A^T) A Omega, ...];
    2q + 2 products, and A^T Q is assembled from the products already made. Q and
    A^T Q stay as lists of blocks: concatenating them costs more than it saves."""
    q = be.orthonormalize(y)
    tx = fwd(probe) if probe is not None and be.power_iters == 0 else None
    bt, residual = _backward_with_residual(bwd, q, [q], tx)
    qs, bts = [q], [bt]
    for i in range(be.power_iters):
        y, tx = _forward_with_probe(fwd, bts[-1], probe if i == be.power_iters - 1 else None)
        z = _project_out(_project_out(y, qs), qs)                      # block Gram-Schmidt, twice
        q = _basis(be, z, scale=y)                                     # converged -> zero columns
        qs.append(q)
        bt, residual = _backward_with_residual(bwd, q, qs, tx)
        bts.append(bt)
    return qs, bts, residual


# -- the captured-energy estimate, carried by the range finder's last two products --
def _energy_probe(be, batch_shape, dim, block=4):
    """Orthonormal random X [L, T, dim, block] for one power step on R^T R."""
    gen = torch.Generator(device="cpu").manual_seed(be.seed + 1)
    x = torch.randn(*batch_shape, dim, block, generator=gen)
    return be.orthonormalize(x.to(be.device, be.compute_dtype))


def _captured_energy(be, s, k, residual):
    """An estimate of kept sum s^2 / exact top-k sum s^2, without the exact SVD.

    By Weyl, sigma_i(A)^2 <= sigma_i(QQ^T A)^2 + ||(I - QQ^T) A||_2^2, so the exact
    top-k energy is at most kept + k ||R||_2^2: a lower bound on the ratio, given
    ||R||_2. ||R||_2^2 is estimated from below, from Z = R X and W = R^T R X (random
    orthonormal X), as the larger of ||W||_2 and max ||W x||^2 / ||Z x||^2 over the
    directions x where Z stands clear of rounding. The second is exact when X meets R's
    top right singular vector, whatever the overlap, which scales the first down (it
    matters when X lives on the long side). The bound is then approximate, and in
    practice loose on the safe side.
    """
    rx, rtr, floor = residual
    kept = (s.double() ** 2).sum(-1)
    w = be.gram(rtr).double()
    r2 = be.sym_eigh(w)[0][..., -1].clamp_min(0).sqrt()
    lam, vec = be.sym_eigh(be.gram(rx).double())
    scale = torch.where(lam > floor.unsqueeze(-1), lam.clamp_min(torch.finfo(lam.dtype).tiny).rsqrt(), torch.zeros_like(lam))
    whiten = vec * scale.unsqueeze(-2)
    r2 = torch.maximum(r2, be.sym_eigh(whiten.mT @ w @ whiten)[0][..., -1])
    return (kept / (kept + k * r2).clamp_min(1e-300)).clamp(max=1.0).cpu()


def _forward_with_probe(fwd, z, probe):
    """(A z, A X): the energy probe X rides along a product the range finder makes anyway."""
    if probe is None:
        return fwd(z), None
    y = fwd(torch.cat([z, probe], -1))
    return y[..., :z.shape[-1]], y[..., z.shape[-1]:]


def _backward_with_residual(bwd, q, basis, tx):
    """(A^T q, (R X, R^T R X, floor)): with R X = (I - Q Q^T) A X (Q = the blocks of
    `basis`, complete), R^T R X = A^T R X, so it rides along the last product A^T q.
    `floor`: a squared norm of R X below which it may be rounding (1000x the projection's)."""
    if tx is None:
        return bwd(q), None
    rx = _project_out(tx, basis)
    out = bwd(torch.cat([q, rx], -1))
    floor = torch.linalg.vector_norm(tx, dim=(-2, -1)).double() ** 2 * (tx.shape[-2] * (1e3 * torch.finfo(tx.dtype).eps) ** 2)
    return out[..., :q.shape[-1]], (rx, out[..., q.shape[-1]:], floor)


def _project_out(y, blocks):
    """(I - sum_b b b^T) y for orthonormal blocks b [..., m, c] of one basis, y [..., m, w];
    the subtraction fused into the GEMM (baddbmm)."""
    flat = y.reshape(-1, *y.shape[-2:])
    for b in blocks:
        b = b.reshape(-1, *b.shape[-2:])
        flat = torch.baddbmm(flat, b, b.mT @ flat, alpha=-1)
    return flat.reshape(y.shape)


def _blocks_times(blocks, ws):
    """[b_1 ... b_j] @ [w_1; ...; w_j] = sum_i b_i w_i, without concatenating the blocks."""
    out = blocks[0] @ ws[0]
    for b, w in zip(blocks[1:], ws[1:]):
        flat = out.reshape(-1, *out.shape[-2:])
        flat.baddbmm_(b.reshape(-1, *b.shape[-2:]), w.reshape(-1, *w.shape[-2:]))
    return out


# -- the adaptive range finder ---------------------------------------------------------------
def adaptive_svd(be, finetuned, base, k, c):
    """Block Krylov per task matrix until its captured-energy bound reaches the target.

    A is tau, or tau^T when m > n, so the basis Q lives on the short side d. Stage j
    adds the block Q_j: B_j^T = A^T Q_j (a pass), then Y = A B_j^T (a pass), whose part
    outside span(Q) is the frontier Z = Q_z S. The factors are the SVD of A P with
    P = span(B^T): A P lies in span(Q, Q_z) and is known, so it costs no pass (stage j
    makes 2j + 3 passes in all). Matrices whose bound reaches the target, or whose next
    stage would pass `max_passes`, are finished and leave the batch; one whose short
    side has no room for another block gets the exact SVD if its bound falls short.
    """
    L, T, m, n = finetuned.shape
    transposed = m > n
    d = min(m, n)
    hooks = (be.delta_matmul_t, be.delta_matmul) if transposed else (be.delta_matmul, be.delta_matmul_t)
    mats = _ActiveMatrices(finetuned, base, *hooks)
    rows = torch.arange(L * T, device=finetuned.device)
    # a rank-revealing first block: directions of a rank-deficient task at rounding level
    # become zero columns (Cholesky-QR would make them unit columns that the right form's
    # L^-T then scales up into the factors, above the null-direction rule's tolerance)
    q = _basis(be, be.sketch(finetuned, base, c, transposed).flatten(0, 1))
    kr = _Krylov(q, _short_probe(be, L * T, d, q.dtype))
    parts = []
    for stage in itertools.count():
        _krylov_stage(be, mats, rows, kr)
        passes = 2 * stage + 3
        room = kr.width + 2 * c <= d
        last = passes + 2 > be.max_passes or not room
        fit = _right_form(be, kr, k)
        bound = fit.kept / _energy_ceiling(be, kr, fit, k, d, last).clamp_min(torch.finfo(torch.float64).tiny)
        bound = bound.clamp(max=1.0)
        kr.bound = bound
        done = (bound >= be.energy_target) | last
        if bool(done.any()):
            parts.append(_finish(be, mats, rows, kr, fit, done, bound, passes, room, k, transposed))
        if bool(done.all()):
            break
        rows = rows[~done]
        kr.keep(~done)
        kr.qs.append(kr.qz)
    return _assemble(parts, L, T, transposed)


def _short_probe(be, batch, dim, dtype):
    """Seeded Gaussian [batch, dim, PROBE_COLUMNS] on the short side, one for every matrix,
    in the basis's dtype (the products' accumulation dtype, fp32 for bf16 compute)."""
    gen = torch.Generator(device="cpu").manual_seed(be.seed + 1)
    x = torch.randn(dim, PROBE_COLUMNS, generator=gen).to(be.device, dtype)
    return x.expand(batch, -1, -1)


def _krylov_stage(be, mats, rows, kr):
    """B_j^T = A^T Q_j, then Y = A B_j^T and the frontier Z = (I - Q Q^T) Y = Q_z S. The
    probe rides along both passes: a block of (A A^T)-power steps on the residual."""
    c = kr.qs[-1].shape[-1]
    back = mats.bwd(rows, torch.cat([kr.qs[-1], _project_out(kr.probe, kr.qs)], -1))     # [B^T_j, X]
    # contiguous parts: views would make every later product with them copy them first
    bt, x = (t.contiguous() for t in back.split(c, -1))
    kr.add_right(bt, be.gram)
    y, ax = (t.contiguous() for t in mats.fwd(rows, back).split(c, -1))
    del back
    kr.xs.append(x)
    kr.axs.append(ax)
    kr.probe = ax
    z = _project_out(_project_out(y, kr.qs), kr.qs)
    kr.qz = _basis(be, z, scale=y)
    kr.s = (kr.qz.mT @ z).double()


def _basis(be, y, scale=None):
    """Orthonormal columns for y's directions above rounding, zero columns for the rest.
    Rounding noise left after a projection is ~ eps sqrt(m) of the block's size (`scale`: the
    block before its projection, or y); 10x that (in norm) is the floor, or noise directions
    above it become basis vectors that are not orthogonal to Q (seen on 1 in 150 T = 1 zoos)."""
    scale = y if scale is None else scale
    floor = torch.linalg.vector_norm(scale, dim=(-2, -1)).double() ** 2 * (scale.shape[-2] * (10 * torch.finfo(scale.dtype).eps) ** 2)
    return P.range_basis(P.range_basis(y, floor, eigh=be.sym_eigh), eigh=be.sym_eigh)


def _right_form(be, kr, k):
    """The SVD of A P with P = B^T L^-T (Theta = B B^T = L L^T). In the coordinates of
    [Q, Q_z], A B^T = [Theta; 0 .. 0 S], so A P = G = [L; 0 .. 0 X] with X = S L_ll^-T
    (L_ll: L's last diagonal block). G^T G's eigenvectors cost twice its eigenvalues:
    here only for matrices whose previous bound was near the target (`_finish` makes
    them for any other matrix that finishes)."""
    c = kr.s.shape[-1]
    with lapack.serial_lapack(kr.theta):     # small matrices: LAPACK's threads cost more than they save
        chol, live = _cholesky_with_zero_columns(kr.theta)
        x = torch.linalg.solve_triangular(chol[..., -c:, -c:].mT, kr.s, upper=True, left=False)   # X L_ll^T = S
    fit = _Fit(chol, live, x)
    gtg = fit.gtg()
    near = kr.bound >= 1 - 10 * (1 - be.energy_target)
    sig2 = gtg.new_empty(gtg.shape[:-1])
    if bool(near.any()):
        values, vec = be.sym_eigh(gtg[near])
        sig2[near] = values
        fit.vec = gtg.new_zeros(*gtg.shape[:-1], k)
        fit.vec[near] = vec.flip(-1)[..., :k]
        fit.has_vec = near
    if not bool(near.all()):
        sig2[~near] = lapack.sym_eigvalsh(gtg[~near])
    fit.sig2 = sig2.flip(-1).clamp_min(0)
    fit.kept = fit.sig2[..., :k].sum(-1)
    return fit


def _energy_ceiling(be, kr, fit, k, d, last):
    """An upper bound on the exact top-k energy of A (see _energy_ceiling_of). Where the
    free slots alone already put the ratio below the target (G G^T's eigenvalues with
    rho repeated: a lower value of the same bound), that value stands in for it on a
    matrix that goes on anyway (not at its `last` stage): the (w + c)-wide eigensolve
    is spared."""
    rho = RHO_MARGIN[len(kr.qs) > 1] * _residual_norm(be, kr, fit)
    free = (d - kr.rank() - kr.s.shape[-1]).clamp(0, k)
    ceiling = _top_k_with_slots(fit.sig2, rho, free, k)
    # Ky Fan: adding rho J (rank c) raises a top-k sum by at most min(k, c) rho, so this
    # looser ceiling holds too; where it already meets the target, no eigensolve is needed
    loose = ceiling + min(k, kr.s.shape[-1]) * rho
    enough = fit.kept >= be.energy_target * loose
    near = ((fit.kept >= be.energy_target * ceiling) | last) & ~enough
    ceiling[enough] = loose[enough]
    if bool(near.any()):
        ceiling[near] = _energy_ceiling_of(kr.theta[near], kr.s[near], fit.x[near], rho[near], free[near], k)
    return ceiling


def _residual_norm(be, kr, fit):
    """An estimate of ||A (I - P P^T)||_2^2 from below: the largest Ritz value of
    (I - PP^T) A^T A (I - PP^T) on the probe's blocks X_i. They came from power steps on
    the residual, and A X_i rode along the forward passes, so it costs no pass."""
    x, ax = torch.cat(kr.xs, -1), torch.cat(kr.axs, -1)
    bx = torch.cat([q.mT @ ax for q in kr.qs], -2).double()                  # B X = Q^T A X
    with lapack.serial_lapack(bx):
        pbx = torch.linalg.solve_triangular(fit.chol, bx, upper=False)       # P^T X
    gram = be.gram(x).double() - pbx.mT @ pbx                              # of (I - PP^T) X
    basis = kr.qs + [kr.qz]
    coef = fit.times_g(pbx).to(ax.dtype).split([b.shape[-1] for b in basis], -2)
    av = (ax - _blocks_times(basis, coef)).double()                          # A (I - PP^T) X
    with lapack.serial_lapack(gram):
        lam, vec = torch.linalg.eigh(gram)
        keep = lam > lam[..., -1:] * 1e-8
        white = vec * torch.where(keep, lam.clamp_min(torch.finfo(lam.dtype).tiny).rsqrt(), torch.zeros_like(lam)).unsqueeze(-2)
        return torch.linalg.eigvalsh(white.mT @ (av.mT @ av) @ white)[..., -1].clamp_min(0)


def _finish(be, mats, rows, kr, fit, done, bound, passes, room, k, transposed):
    """Factors of the finished matrices: G = W diag(s) Y^T gives U = [Q, Q_z] G Y / s and
    V = P Y = B^T L^-T Y. A matrix out of room below the target gets the exact SVD."""
    idx = done.nonzero().squeeze(-1)
    sub = fit.take(idx)
    vec = sub.vec if sub.vec is not None else sub.gtg().new_zeros(*sub.sig2.shape, k)
    missing = ~sub.has_vec
    if bool(missing.any()):
        vec[missing] = be.sym_eigh(sub.gtg()[missing])[1].flip(-1)[..., :k]
    s = sub.sig2[..., :k].sqrt()
    with lapack.serial_lapack(vec):
        cv = torch.linalg.solve_triangular(sub.chol.mT, vec, upper=True)
    dtype = kr.qs[0].dtype
    cu = (sub.times_g(vec) / s.clamp_min(torch.finfo(s.dtype).tiny).unsqueeze(-2)).to(dtype)
    widths = [q.shape[-1] for q in kr.qs]
    u = _blocks_times([q[idx] for q in kr.qs] + [kr.qz[idx]], cu.split(widths + [kr.qz.shape[-1]], -2))
    v = _blocks_times([b[idx] for b in kr.bts], cv.to(dtype).split(widths, -2))
    part = _Part(rows[idx], u, s.to(dtype), v, bound[idx],
                 torch.full_like(idx, passes), (bound[idx] < be.energy_target) & room)
    short = (bound[idx] < be.energy_target) & (not room)
    if bool(short.any()):
        part.replace_exact(short, mats, k, be, transposed)
    return part


# -- the adaptive range finder's state and its bound ----------------------------------------
class _ActiveMatrices:
    """A = tau (or tau^T) for the rows (l * T + t) of a batch still being refined. Products go
    through the backend's hooks on views of the task matrices, run by run, never on copies."""

    def __init__(self, finetuned, base, fwd, bwd):
        self.finetuned, self.base, self._fwd, self._bwd = finetuned, base, fwd, bwd

    def fwd(self, rows, x):
        """A x: x [rows, long side, c] -> [rows, short side, c]."""
        return self._apply(self._fwd, rows, x)

    def bwd(self, rows, y):
        """A^T y: y [rows, short side, c] -> [rows, long side, c]."""
        return self._apply(self._bwd, rows, y)

    def runs(self, rows):
        """(layer, first task, end task, offset in rows) for each run of consecutive rows within a layer."""
        T = self.finetuned.shape[1]
        out, flat = [], rows.tolist()
        for key, group in itertools.groupby(enumerate(flat), lambda it: (it[1] // T, it[1] - it[0])):
            group = list(group)
            out.append((key[0], group[0][1] % T, group[-1][1] % T + 1, group[0][0]))
        return out

    def view(self, l, t0, t1):
        return self.finetuned[l:l + 1, t0:t1], None if self.base is None else self.base[l:l + 1]

    def _apply(self, hook, rows, x):
        L, T = self.finetuned.shape[:2]
        if rows.numel() == L * T:
            return hook(self.finetuned, self.base, x.reshape(L, T, *x.shape[-2:])).flatten(0, 1)
        return torch.cat([hook(*self.view(l, t0, t1), x[i:i + t1 - t0].unsqueeze(0))[0]
                          for l, t0, t1, i in self.runs(rows)])


class _Krylov:
    """Per matrix: the blocks Q_i (short side), B_i^T = A^T Q_i, Theta = B B^T (fp64), the probe's
    blocks X_i (long side) and A X_i, and after each forward pass the frontier Z = Q_z S."""

    def __init__(self, q, probe):
        self.qs, self.bts, self.xs, self.axs = [q], [], [], []
        self.theta, self.probe, self.qz, self.s = None, probe, None, None
        self.bound = torch.zeros(q.shape[0], dtype=torch.float64, device=q.device)   # the last stage's

    @property
    def width(self) -> int:
        return sum(q.shape[-1] for q in self.qs)

    def rank(self):
        """Nonzero columns of the basis (range_basis leaves zero columns for converged directions)."""
        return sum((q.abs().amax(-2) > 0).sum(-1) for q in self.qs)

    def add_right(self, bt, gram):
        column = torch.cat([(b.mT @ bt).double() for b in self.bts] + [gram(bt).double()], -2)
        w = column.shape[-2] - bt.shape[-1]
        if self.theta is None:
            self.theta = column
        else:
            self.theta = torch.cat([torch.cat([self.theta, column[..., :w, :]], -1), column.mT], -2)
        self.bts.append(bt)

    def keep(self, mask):
        for name in ("qs", "bts", "xs", "axs"):
            setattr(self, name, [t[mask] for t in getattr(self, name)])
        self.theta, self.probe, self.qz, self.s = self.theta[mask], self.probe[mask], self.qz[mask], self.s[mask]
        self.bound = self.bound[mask]


class _Fit:
    """A P = G = [L; 0 .. 0 X] in the coordinates of [Q, Q_z] (zero columns of the basis masked
    out of L), with Theta = L L^T and X = S L_ll^-T; sig2 and kept: G^T G's eigenvalues
    (descending) and the top-k sum of them; vec: its top-k eigenvectors."""

    def __init__(self, chol, live, x):
        self.chol, self.x = chol, x
        self.l = chol * live.unsqueeze(-2)
        self.sig2 = self.kept = self.vec = None   # vec: the top-k eigenvectors of G^T G, where has_vec
        self.has_vec = torch.zeros(chol.shape[:-2], dtype=torch.bool, device=chol.device)

    def take(self, idx):
        fit = _Fit.__new__(_Fit)
        fit.chol, fit.x, fit.l, fit.sig2 = self.chol[idx], self.x[idx], self.l[idx], self.sig2[idx]
        fit.kept, fit.vec, fit.has_vec = self.kept[idx], None if self.vec is None else self.vec[idx], self.has_vec[idx]
        return fit

    def gtg(self):
        """G^T G = L^T L + [0; X^T][0, X]."""
        c = self.x.shape[-1]
        out = self.l.mT @ self.l
        out[..., -c:, -c:] += self.x.mT @ self.x
        return out

    def times_g(self, y):
        """G y for y [..., w, n]: [L y; X y_last]."""
        c = self.x.shape[-1]
        return torch.cat([self.l @ y, self.x @ y[..., -c:, :]], -2)


class _Part:
    """Finished matrices of one stage: their rows, factors (A's orientation), bound, passes, capped."""

    def __init__(self, rows, u, s, v, energy, passes, capped):
        self.rows, self.u, self.s, self.v, self.energy, self.passes, self.capped = rows, u, s, v, energy, passes, capped

    def replace_exact(self, which, mats, k, be, transposed):
        """The exact SVD for the rows in `which` (a matrix whose short side is nearly spanned)."""
        sub = self.rows[which]
        us, ss, vs = [], [], []
        for l, t0, t1, _ in mats.runs(sub):
            svd = _exact_svd(be, *mats.view(l, t0, t1), k)
            us.append(svd.u[0]), ss.append(svd.s[0]), vs.append(svd.v[0])
        u, s, v = torch.cat(us), torch.cat(ss), torch.cat(vs)
        if transposed:
            u, v = v, u
        self.u[which], self.s[which], self.v[which] = u.to(self.u.dtype), s.to(self.s.dtype), v.to(self.v.dtype)
        self.energy[which] = 1.0


def _exact_svd(be, finetuned, base, k) -> TaskSVD:
    """The exact top-k SVD, through the short side's Gram in fp64 where the compute dtype is
    fp32 or lower: tau tau^T = W diag(s^2) W^T (an eigh as wide as the short side), the other
    factor tau^T W / s. LAPACK's SVD of the whole matrix costs several times more (768 x 3072),
    and the fp64 Gram keeps s to ~1e-8 of s_1, far below fp32's null-direction tolerance
    (~1e-4). fp64 compute keeps LAPACK's SVD, whose tolerance the Gram's rounding would not meet."""
    if be.compute_dtype == torch.float64:
        return exact_task_svd(finetuned, base, k, be.compute_dtype)
    tau = P.upcast(finetuned) if base is None else P.upcast(finetuned) - P.upcast(base).unsqueeze(1)
    wide = tau.shape[-2] <= tau.shape[-1]
    t64 = tau.double()
    lam, w = be.sym_eigh((t64 @ t64.mT) if wide else (t64.mT @ t64))
    s = lam.flip(-1)[..., :k].clamp_min(0).sqrt()
    w = w.flip(-1)[..., :k].to(tau.dtype)
    other = (tau.mT @ w if wide else tau @ w) / s.clamp_min(torch.finfo(s.dtype).tiny).to(tau.dtype).unsqueeze(-2)
    u, v = (w, other) if wide else (other, w)
    return TaskSVD(u, s.to(tau.dtype), v, torch.ones(s.shape[:-1], dtype=torch.float64))


def _assemble(parts, L, T, transposed) -> TaskSVD:
    first = parts[0]
    u = first.u.new_empty(L * T, *first.u.shape[1:])
    v = first.v.new_empty(L * T, *first.v.shape[1:])
    s = first.s.new_empty(L * T, first.s.shape[-1])
    energy = torch.empty(L * T, dtype=torch.float64, device=first.energy.device)
    passes = torch.empty(L * T, dtype=torch.long, device=first.rows.device)
    capped = torch.empty(L * T, dtype=torch.bool, device=first.rows.device)
    for p in parts:
        u[p.rows], v[p.rows], s[p.rows] = p.u, p.v, p.s
        energy[p.rows], passes[p.rows], capped[p.rows] = p.energy, p.passes, p.capped
    u, v = u.unflatten(0, (L, T)), v.unflatten(0, (L, T))
    if transposed:
        u, v = v, u
    return TaskSVD(u, s.unflatten(0, (L, T)), v, energy.unflatten(0, (L, T)).cpu(),
                   passes.unflatten(0, (L, T)).cpu(), capped.unflatten(0, (L, T)).cpu())


def _cholesky_with_zero_columns(theta):
    """(L, live): the lower Cholesky factor of the Gram Theta [..., w, w] (fp64) and which of
    its columns are not zero. Zero columns (converged Krylov directions, zero in the basis)
    get a unit pivot, so that P = B^T L^-T has zero columns there, and `_Fit` masks them out
    of G; every pivot gets a relative jitter far below the fp32 data's rounding."""
    diag = theta.diagonal(dim1=-2, dim2=-1)
    live = diag > 0
    scale = diag.amax(-1, keepdim=True).clamp_min(torch.finfo(theta.dtype).tiny)
    for jitter in (1e-12, 1e-8, 1e-4):
        chol, info = torch.linalg.cholesky_ex(theta + torch.diag_embed(torch.where(live, jitter * scale, scale)))
        if not bool((info != 0).any()):
            return chol, live
    raise FloatingPointError("the Krylov basis's Gram matrix is not positive definite even with a 1e-4 jitter")


def _energy_ceiling_of(theta, s, x, rho, free, k):
    """An upper bound on the exact top-k energy of A, E_k = the top-k sum of eig(A A^T).

    In the coordinates of [Q, Q_z, rest], A A^T = G G^T + U with U = A (I - PP^T) A^T: U is PSD,
    vanishes on span(Q) (Q^T A lies in span(P)), and ||U|| = rho. So A A^T <= G G^T + rho J
    (J: the identity off span(Q)), and by Ky Fan E_k is at most the top-k sum of the
    eigenvalues of G G^T + rho [0 0; 0 I_c] = [Theta, [0; S^T]; [0, S], X X^T + rho I]
    together with rho repeated over the rest (`free` of them count). The bound is exact where
    the unseen part is rho times an identity, and rigorous whenever rho >= ||A (I - PP^T)||_2^2.
    """
    w, c = theta.shape[-1], s.shape[-1]
    m = theta.new_zeros(*theta.shape[:-2], w + c, w + c)
    m[..., :w, :w] = theta
    m[..., w:, w - c:w] = s
    m[..., w - c:w, w:] = s.mT
    m[..., w:, w:] = x @ x.mT + torch.diag_embed(rho.unsqueeze(-1).expand(*rho.shape, c))
    return _top_k_with_slots(lapack.sym_eigvalsh(m), rho, free, k)


def _top_k_with_slots(ev, rho, free, k):
    """The top-k sum of the eigenvalues `ev` [..., n] together with `free` [...] copies of rho [...]."""
    slots = torch.where(torch.arange(k, device=rho.device) < free.unsqueeze(-1), rho.unsqueeze(-1),
                        torch.zeros((), dtype=rho.dtype, device=rho.device))
    return torch.cat([ev, slots], -1).topk(k, -1).values.sum(-1)
