// Launch geometry of the kernels in kernels/cuda: threads per block and dynamic shared memory.
// The one home of these numbers. Plain C++ (no CUDA): the compiled launchers (cuda_ops.cu),
// tsvmerge._C in every build (bindings.cpp, so the NVRTC path in cuda_ops.py launches with
// them) and the CPU emulation harness (tests/cuda_emulation) all include this header.
#ifndef TSVMERGE_LAUNCH_GEOMETRY_H
#define TSVMERGE_LAUNCH_GEOMETRY_H

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace tsvmerge {

constexpr int kEighMaxN = 128;    // batched_eigh: n x n matrices, n <= this
constexpr int kCholqrMaxC = 128;  // cholesky / trsm: c x c Grams, c <= this
constexpr int kTrsmRows = 128;    // trsm: rows (= threads) per block

struct Launch {
  int threads;            // per block
  size_t smem;            // dynamic shared memory bytes
  int64_t scratch = 0;    // jacobi_eigh: elements of global scratch per matrix (0: V in shared memory)
};

// tsv_jacobi_eigh_{f32,f64} (kernels/cuda/jacobi_eigh.cuh) for n x n matrices of `element_size`
// bytes, with N = n + n % 2, M = N / 2, rows of N + 1. Shared memory holds, in this order:
// fp64 block-sum scratch (threads + 1) and tangents (M); cosines and sines (2 M); A (N rows);
// V^T (N rows) where the device allows it, else V^T goes to global scratch; the pairs and
// ranks as ints (2 M + N).
inline size_t eigh_smem(int n, int element_size, int threads, bool v_in_shared) {
  const size_t N = n + n % 2, M = N / 2, es = element_size, rows = v_in_shared ? 2 : 1;
  return 8 * (threads + 1 + M) + es * (2 * M + rows * N * (N + 1)) + 4 * (2 * M + N);
}

inline Launch eigh_launch(int n, int element_size, size_t max_smem) {
  const int M = (n + n % 2) / 2;
  const int threads = std::min(256, 32 * ((M * M + 31) / 32));
  const size_t with_v = eigh_smem(n, element_size, threads, true);
  if (with_v <= max_smem) return {threads, with_v, 0};
  const int64_t N = n + n % 2;
  return {threads, eigh_smem(n, element_size, threads, false), N * (N + 1)};
}

// tsv_cholesky_f32 (kernels/cuda/cholesky_qr.cuh) for c x c Grams: block-sum scratch and a
// column (fp64), then L (c rows of c + 1 floats).
inline Launch cholesky_launch(int c) {
  const int threads = 32 * ((c + 31) / 32);
  return {threads, 8 * static_cast<size_t>(threads + c + 2) + 4 * static_cast<size_t>(c) * (c + 1)};
}

// tsv_trsm_lower_t_f32: L (c rows of c + 1 floats) and a transposed tile of kTrsmRows rows.
inline Launch trsm_launch(int c) {
  return {kTrsmRows, 4 * static_cast<size_t>(c * (c + 1) + c * (kTrsmRows + 1))};
}

}  // namespace tsvmerge

#endif  // TSVMERGE_LAUNCH_GEOMETRY_H
