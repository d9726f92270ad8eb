// Runs the kernels of kernels/cuda on the CPU so their logic is tested where no GPU is, with
// the launch geometry the GPU launchers use (csrc/launch_geometry.h).
// Each CUDA thread of a block is a std::thread, __syncthreads is a std::barrier and blocks run
// one after another; that models everything the kernels use (block barriers, dynamic shared
// memory, global memory within a block; no warp intrinsics). Shared memory and the eigh
// scratch are poisoned with NaN before every launch, and the shared bytes past the launch's
// declared size must come back untouched.
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <thread>
#include <vector>

#include "launch_geometry.h"

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};
thread_local Dim3 threadIdx;
Dim3 blockIdx, blockDim;
static std::barrier<>* block_barrier = nullptr;

constexpr size_t kSmemBytes = 512 * 1024;
extern "C" {
alignas(16) double tsv_smem[kSmemBytes / sizeof(double)];  // the kernels' `extern __shared__` array
}

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__
static void __syncthreads() { block_barrier->arrive_and_wait(); }

#include "cholesky_qr.cuh"
#include "jacobi_eigh.cuh"

// Runs kernel() as grid_x * grid_y blocks of `threads`; returns 0, or 1 if a block wrote past
// smem_bytes of shared memory.
template <class Kernel>
static int launch_blocks(unsigned grid_x, unsigned grid_y, unsigned threads, size_t smem_bytes, Kernel kernel) {
  const unsigned char* smem = reinterpret_cast<const unsigned char*>(tsv_smem);
  blockDim = {threads, 1, 1};
  for (unsigned by = 0; by < grid_y; ++by) {
    for (unsigned bx = 0; bx < grid_x; ++bx) {
      for (double& x : tsv_smem) x = NAN;
      blockIdx = {bx, by, 1};
      std::barrier<> barrier(threads);
      block_barrier = &barrier;
      std::vector<std::thread> pool;
      for (unsigned t = 0; t < threads; ++t)
        pool.emplace_back([&kernel, t] {
          threadIdx = {t, 0, 0};
          kernel();
        });
      for (auto& th : pool) th.join();
      const double untouched = NAN;
      for (size_t at = (smem_bytes + 7) / 8 * 8; at < kSmemBytes; at += sizeof(double))
        if (std::memcmp(smem + at, &untouched, sizeof(double)) != 0) return 1;
    }
  }
  return 0;
}

// The geometry of jacobi_eigh for a device allowing max_smem bytes: {threads, smem, scratch}.
extern "C" void emu_eigh_launch(int n, int element_size, size_t max_smem, int64_t* out) {
  const tsvmerge::Launch launch = tsvmerge::eigh_launch(n, element_size, max_smem);
  out[0] = launch.threads, out[1] = static_cast<int64_t>(launch.smem), out[2] = launch.scratch;
}

template <class Real>
static int jacobi_eigh(const Real* a, Real* w, Real* v, Real* v_scratch, int batch, int n, size_t max_smem,
                       int threads) {
  tsvmerge::Launch launch = tsvmerge::eigh_launch(n, sizeof(Real), max_smem);
  if (threads) {  // fewer OS threads for big sizes; the shared memory follows the block size
    launch.threads = threads;
    launch.smem = tsvmerge::eigh_smem(n, sizeof(Real), threads, launch.scratch == 0);
  }
  Real* vt = launch.scratch ? v_scratch : nullptr;
  return launch_blocks(batch, 1, launch.threads, launch.smem, [=] {
    if constexpr (sizeof(Real) == 8) tsv_jacobi_eigh_f64(a, w, v, vt, n);
    else tsv_jacobi_eigh_f32(a, w, v, vt, n);
  });
}

// jacobi_eigh of batch n x n fp32 (fp64) matrices with its geometry for a device allowing
// max_smem bytes (threads: the geometry's when 0); v_scratch as the GPU launchers take it.
// Returns 0, or 1 if a block wrote past its shared memory.
extern "C" int emu_jacobi_eigh(const void* a, void* w, void* v, void* v_scratch, int batch, int n, int fp64,
                               size_t max_smem, int threads) {
  if (fp64)
    return jacobi_eigh(static_cast<const double*>(a), static_cast<double*>(w), static_cast<double*>(v),
                       static_cast<double*>(v_scratch), batch, n, max_smem, threads);
  return jacobi_eigh(static_cast<const float*>(a), static_cast<float*>(w), static_cast<float*>(v),
                     static_cast<float*>(v_scratch), batch, n, max_smem, threads);
}

extern "C" int emu_cholesky(const float* g, float* l, int* status, int batch, int c, int allow_shift) {
  const tsvmerge::Launch launch = tsvmerge::cholesky_launch(c);
  return launch_blocks(batch, 1, launch.threads, launch.smem, [=] { tsv_cholesky_f32(g, l, status, c, allow_shift); });
}

extern "C" int emu_trsm(const float* y, const float* l, float* q, int batch, int m, int c) {
  const tsvmerge::Launch launch = tsvmerge::trsm_launch(c);
  return launch_blocks(batch, (m + launch.threads - 1) / launch.threads, launch.threads, launch.smem,
                       [=] { tsv_trsm_lower_t_f32(y, l, q, m, c); });
}
