// Cholesky-QR building blocks for tall-skinny panels Y [batch, m, c], c <= 128 (launch geometry:
// csrc/launch_geometry.h):
//   tsv_cholesky_f32:     G = L L^T for the Gram matrices G = Y^T Y (the host forms G, in fp64),
//                         retried with a shift when a pivot is too small;
//   tsv_trsm_lower_t_f32: Q = Y R^-1 with R = L^T, by forward substitution row by row.
// One Cholesky-QR pass is gram -> cholesky -> trsm; the host runs two (CholQR2), or three
// with the first shifted (shifted CholQR3, Fukaya et al. 2020) where the plain one fails
// (one, or two where shifted, when a single pass is asked for).
#ifndef TSVMERGE_CHOLESKY_QR_CUH
#define TSVMERGE_CHOLESKY_QR_CUH

#include "common.cuh"

// Per-matrix result of tsv_cholesky_f32, ordered by severity so passes combine with max().
#define TSV_CHOL_OK 0
#define TSV_CHOL_SHIFTED 1
#define TSV_CHOL_FAILED 2

// Left-looking Cholesky of g (+ shift I) into l (lower, row stride ld), fp64 dot products.
// A pivot must keep more than c u of its diagonal entry: below that the column is, to fp32
// precision, in the span of the previous ones, cond(Y)^2 u approaches 1 and CholQR2 would
// not reach orthogonality. Returns the same verdict in every thread; holds barriers.
__device__ bool tsv_cholesky_attempt(const float* g, double shift, int c, float* l, int ld, double* column) {
  for (int idx = threadIdx.x; idx < c * c; idx += blockDim.x) {
    const int i = idx / c, j = idx % c;
    if (j <= i) l[i * ld + j] = (float)(g[idx] + (i == j ? shift : 0.0));
  }
  __syncthreads();
  const double pivot_tol = c * TSV_EPS32;
  for (int j = 0; j < c; ++j) {
    // Schur complements of column j; column[c] keeps the pivot's diagonal entry of G.
    for (int i = j + threadIdx.x; i < c; i += blockDim.x) {
      double s = l[i * ld + j];
      for (int k = 0; k < j; ++k) s -= (double)l[i * ld + k] * l[j * ld + k];
      column[i] = s;
    }
    if (threadIdx.x == 0) column[c] = l[j * ld + j];
    __syncthreads();
    const double pivot = column[j];
    if (!(pivot > pivot_tol * column[c] && pivot < 3.0e38)) return false;  // also NaN and Inf
    const double root = sqrt(pivot);
    for (int i = j + threadIdx.x; i < c; i += blockDim.x) l[i * ld + j] = (float)(column[i] / root);
    __syncthreads();
  }
  return true;
}

// g_in [batch, c, c] (lower triangle read), l_out [batch, c, c] (lower; upper zero),
// status [batch] int32 (TSV_CHOL_*), contiguous; one block per matrix, any block size.
// A failed factorization writes L = I so the following solve stays finite.
extern "C" __global__ void tsv_cholesky_f32(const float* __restrict__ g_in, float* __restrict__ l_out,
                                            int* __restrict__ status, int c, int allow_shift) {
  extern __shared__ double tsv_smem[];
  const int ld = c + 1;
  double* partial = tsv_smem;                // blockDim.x + 1: tsv_block_sum scratch
  double* column = partial + blockDim.x + 1;  // c + 1
  float* l = (float*)(column + c + 1);        // c x ld

  const long long mat = blockIdx.x;
  const float* g = g_in + mat * c * c;
  int route = TSV_CHOL_OK;
  bool ok = tsv_cholesky_attempt(g, 0.0, c, l, ld, column);
  if (!ok && allow_shift) {
    // Shift s = 2 c u ||Y||_F^2 (= trace G). Fukaya et al. (2020) take
    // s = 11 (m c + c (c + 1)) u ||Y||_2^2, a worst-case bound on the Gram's rounding; in fp32 at
    // the engine's shapes (m = 3072, c = 64) that is ~0.04 ||Y||^2 and leaves cond(Q) ~ 0.2
    // cond(Y): that route rescued nothing past cond 1e4 (CPU emulation), this one rescues up to
    // 1e6. It keeps every Schur complement (>= s in exact arithmetic) above the pivot test; a
    // Gram whose rounding exceeds it fails that test and goes to Householder, so a shift too
    // small costs speed, never accuracy.
    double diag = 0.0;
    for (int i = threadIdx.x; i < c; i += blockDim.x) diag += g[i * c + i];
    const double trace = tsv_block_sum(diag, partial);
    const double shift = 2.0 * c * TSV_EPS32 * trace;
    route = TSV_CHOL_SHIFTED;
    ok = tsv_cholesky_attempt(g, shift, c, l, ld, column);
  }
  if (!ok) route = TSV_CHOL_FAILED;

  float* out = l_out + mat * c * c;
  for (int idx = threadIdx.x; idx < c * c; idx += blockDim.x) {
    const int i = idx / c, j = idx % c;
    out[idx] = ok ? (j <= i ? l[i * ld + j] : 0.f) : (i == j ? 1.f : 0.f);
  }
  if (threadIdx.x == 0) status[mat] = route;
}

// y_in, q_out [batch, m, c], l_in [batch, c, c] (lower), contiguous; q_out may alias y_in.
// Row i of Q solves L q_i^T = y_i^T. Grid (batch, ceil(m / blockDim.x)): a block stages
// blockDim.x rows, transposed (stride blockDim.x + 1, bank-conflict free) next to L, and each
// thread substitutes one row. fp32 throughout: substitution is backward stable in working
// precision; the conditioning is handled by the Gram and the pivot test above.
extern "C" __global__ void tsv_trsm_lower_t_f32(const float* y_in, const float* __restrict__ l_in,
                                                float* q_out, int m, int c) {
  extern __shared__ double tsv_smem[];  // declared double for alignment; holds floats
  const int rows = blockDim.x, ldt = rows + 1, ldl = c + 1;
  float* l = (float*)tsv_smem;  // c x ldl
  float* tile = l + c * ldl;    // c x ldt: tile[k * ldt + r] = Y[row0 + r][k]

  const long long mat = blockIdx.x;
  const int row0 = blockIdx.y * rows;
  const int tile_rows = m - row0 < rows ? m - row0 : rows;
  const float* l_src = l_in + mat * c * c;
  for (int idx = threadIdx.x; idx < c * c; idx += blockDim.x) l[(idx / c) * ldl + idx % c] = l_src[idx];
  const float* y = y_in + (mat * m + row0) * c;
  for (int idx = threadIdx.x; idx < tile_rows * c; idx += blockDim.x)
    tile[(idx % c) * ldt + idx / c] = y[idx];
  __syncthreads();

  const int r = threadIdx.x;
  if (r < tile_rows) {
    for (int j = 0; j < c; ++j) {
      float s = tile[j * ldt + r];
      for (int k = 0; k < j; ++k) s -= l[j * ldl + k] * tile[k * ldt + r];
      tile[j * ldt + r] = s / l[j * ldl + j];
    }
  }
  __syncthreads();
  float* q = q_out + (mat * m + row0) * c;
  for (int idx = threadIdx.x; idx < tile_rows * c; idx += blockDim.x) q[idx] = tile[(idx % c) * ldt + idx / c];
}

#endif  // TSVMERGE_CHOLESKY_QR_CUH
