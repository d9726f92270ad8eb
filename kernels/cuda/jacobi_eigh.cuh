// Batched symmetric eigensolver for n <= 128: parallel cyclic Jacobi, one thread block per
// matrix, in fp32 or fp64 (tsv_jacobi_eigh_f32 / _f64). Output follows torch.linalg.eigh: only
// the lower triangle of the input is read, eigenvalues come out ascending and eigenvectors as
// columns.
//
// Memory: A lives in dynamic shared memory, rows padded to an odd stride so column accesses
// are bank-conflict free. So does the eigenvector matrix (stored transposed, vt) where the
// device allows it: fp32 at n = 128 needs 129 KiB for both, above the 48 KiB default, so the
// launcher opts in (H100/H200 allow 227 KiB per block). fp64 past n = 118 does not fit: vt then
// lives in a global scratch array the caller provides, rows contiguous so every rotation reads
// and writes coalesced rows. csrc/launch_geometry.h sizes all of it.
//
// Ordering: round-robin (circle method). N = n rounded up to even; an odd n gets a dummy
// index N - 1 whose rows are zero and never rotate. A sweep is N - 1 rounds of N / 2
// disjoint pairs, so a round is applied at once: A <- J^T A J and V <- V J, J the product
// of the round's rotations. Each thread rewrites whole 2x2 blocks (rows of one pair, columns
// of another), which partition A, so a round needs two barriers (they order global memory
// within the block too).
//
// Precision: A and V are stored and rotated in the matrix's precision; the rotation angles,
// the new diagonal entries and the convergence sums are fp64. Sweeps stop once
// off(A) <= u ||A||_F (u: the unit roundoff of that precision): what is left moves
// eigenvalues by less than it can show.
#ifndef TSVMERGE_JACOBI_EIGH_CUH
#define TSVMERGE_JACOBI_EIGH_CUH

#include "common.cuh"

#define TSV_EIGH_MAX_SWEEPS 30

// Pair k of round r among N (even) indices: index N - 1 stays put, the others turn.
__device__ __forceinline__ void tsv_round_robin_pair(int r, int k, int N, int* p, int* q) {
  if (k == 0) {
    *p = r;
    *q = N - 1;
  } else {
    *p = (r + k) % (N - 1);
    *q = (r - k + N - 1) % (N - 1);
  }
}

// a_in [batch, n, n], w_out [batch, n], v_out [batch, n, n], contiguous; vt_scratch null (vt in
// shared memory) or [batch, N (N + 1)]; one block per matrix, any block size, N = n + n % 2.
template <typename Real>
__device__ void tsv_jacobi_eigh(const Real* __restrict__ a_in, Real* __restrict__ w_out, Real* __restrict__ v_out,
                                Real* vt_scratch, int n) {
  extern __shared__ double tsv_smem[];
  const int N = n + (n & 1), M = N / 2, ld = N + 1;
  const long long mat = blockIdx.x;
  double* partial = tsv_smem;                    // blockDim.x + 1: tsv_block_sum scratch
  double* rot_t = partial + blockDim.x + 1;      // M: tan of each pair's angle
  Real* rot_c = (Real*)(rot_t + M);              // M: cos
  Real* rot_s = rot_c + M;                       // M: sin
  Real* a = rot_s + M;                           // N x ld
  Real* vt = vt_scratch ? vt_scratch + mat * N * ld : a + N * ld;  // N x ld, vt[i * ld + row] = V[row][i]
  int* rot_p = (int*)(vt_scratch ? a + N * ld : vt + N * ld);     // M: the pair's indices
  int* rot_q = rot_p + M;
  int* rank = rot_q + M;                         // N: eigenvalue i goes to position rank[i]

  const Real* src = a_in + mat * n * n;
  double sum_sq = 0.0;
  for (int idx = threadIdx.x; idx < N * N; idx += blockDim.x) {
    const int i = idx / N, j = idx % N;
    Real x = 0;
    if (i < n && j < n) x = i >= j ? src[i * n + j] : src[j * n + i];
    a[i * ld + j] = x;
    vt[i * ld + j] = i == j ? 1 : 0;
    sum_sq += (double)x * x;
  }
  const double norm_sq = tsv_block_sum(sum_sq, partial);

  if (!(norm_sq <= TSV_DOUBLE_MAX)) {  // NaN or Inf in the input: answer NaN rather than iterate on it
    for (int i = threadIdx.x; i < n; i += blockDim.x) w_out[mat * n + i] = (Real)nan("");
    for (int i = threadIdx.x; i < n * n; i += blockDim.x) v_out[mat * n * n + i] = (Real)nan("");
    return;
  }

  const double off_tol_sq = norm_sq * tsv_unit_roundoff<Real>() * tsv_unit_roundoff<Real>();
  for (int sweep = 0; sweep < TSV_EIGH_MAX_SWEEPS; ++sweep) {
    double off_sq = 0.0;
    for (int idx = threadIdx.x; idx < N * N; idx += blockDim.x) {
      const int i = idx / N, j = idx % N;
      if (i != j) off_sq += (double)a[i * ld + j] * a[i * ld + j];
    }
    if (tsv_block_sum(off_sq, partial) <= off_tol_sq) break;  // same value in every thread

    for (int r = 0; r < N - 1; ++r) {
      // The round's rotations (Golub & Van Loan, symmetric Schur 2x2), from the current A.
      for (int k = threadIdx.x; k < M; k += blockDim.x) {
        int p, q;
        tsv_round_robin_pair(r, k, N, &p, &q);
        const double apq = a[p * ld + q];  // 0 for the dummy index: identity rotation
        double c = 1.0, s = 0.0, t = 0.0;
        if (apq != 0.0) {
          const double tau = (a[q * ld + q] - (double)a[p * ld + p]) / (2.0 * apq);
          t = (tau >= 0.0 ? 1.0 : -1.0) / (fabs(tau) + sqrt(1.0 + tau * tau));
          c = 1.0 / sqrt(1.0 + t * t);
          s = t * c;
        }
        rot_p[k] = p;
        rot_q[k] = q;
        rot_c[k] = (Real)c;
        rot_s[k] = (Real)s;
        rot_t[k] = t;
      }
      __syncthreads();

      // A <- J^T A J by 2x2 blocks (rows of pair P, columns of pair Q); P < Q also writes
      // the mirrored block, so A stays exactly symmetric.
      for (int b = threadIdx.x; b < M * M; b += blockDim.x) {
        const int P = b / M, Q = b % M;
        if (P > Q) continue;
        const int p1 = rot_p[P], q1 = rot_q[P];
        if (P == Q) {  // the pair's own block: closed form, off-diagonal exactly zero
          const double apq = a[p1 * ld + q1], t = rot_t[P];
          a[p1 * ld + p1] = (Real)(a[p1 * ld + p1] - t * apq);
          a[q1 * ld + q1] = (Real)(a[q1 * ld + q1] + t * apq);
          a[p1 * ld + q1] = 0;
          a[q1 * ld + p1] = 0;
          continue;
        }
        const int p2 = rot_p[Q], q2 = rot_q[Q];
        const Real c1 = rot_c[P], s1 = rot_s[P], c2 = rot_c[Q], s2 = rot_s[Q];
        const Real bpp = a[p1 * ld + p2], bpq = a[p1 * ld + q2];
        const Real bqp = a[q1 * ld + p2], bqq = a[q1 * ld + q2];
        const Real rpp = c1 * bpp - s1 * bqp, rpq = c1 * bpq - s1 * bqq;  // rows: J1^T B
        const Real rqp = s1 * bpp + c1 * bqp, rqq = s1 * bpq + c1 * bqq;
        const Real npp = c2 * rpp - s2 * rpq, npq = s2 * rpp + c2 * rpq;  // columns: (J1^T B) J2
        const Real nqp = c2 * rqp - s2 * rqq, nqq = s2 * rqp + c2 * rqq;
        a[p1 * ld + p2] = npp;
        a[p2 * ld + p1] = npp;
        a[p1 * ld + q2] = npq;
        a[q2 * ld + p1] = npq;
        a[q1 * ld + p2] = nqp;
        a[p2 * ld + q1] = nqp;
        a[q1 * ld + q2] = nqq;
        a[q2 * ld + q1] = nqq;
      }
      // V <- V J: columns p, q of V are rows p, q of vt (contiguous over i).
      for (int idx = threadIdx.x; idx < M * n; idx += blockDim.x) {
        const int k = idx / n, i = idx % n;
        const int p = rot_p[k], q = rot_q[k];
        const Real c = rot_c[k], s = rot_s[k];
        const Real vp = vt[p * ld + i], vq = vt[q * ld + i];
        vt[p * ld + i] = c * vp - s * vq;
        vt[q * ld + i] = s * vp + c * vq;
      }
      __syncthreads();
    }
  }

  // Ascending order: rank by (value, index), distinct for finite values.
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const Real wi = a[i * ld + i];
    int r = 0;
    for (int j = 0; j < n; ++j) {
      const Real wj = a[j * ld + j];
      r += (wj < wi) || (wj == wi && j < i);
    }
    rank[i] = r;
    w_out[mat * n + r] = wi;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < n * n; idx += blockDim.x) {
    const int row = idx / n, i = idx % n;
    v_out[mat * n * n + row * n + rank[i]] = vt[i * ld + row];
  }
}

extern "C" __global__ void tsv_jacobi_eigh_f32(const float* a_in, float* w_out, float* v_out, float* vt_scratch,
                                               int n) {
  tsv_jacobi_eigh<float>(a_in, w_out, v_out, vt_scratch, n);
}

extern "C" __global__ void tsv_jacobi_eigh_f64(const double* a_in, double* w_out, double* v_out,
                                               double* vt_scratch, int n) {
  tsv_jacobi_eigh<double>(a_in, w_out, v_out, vt_scratch, n);
}

#endif  // TSVMERGE_JACOBI_EIGH_CUH
