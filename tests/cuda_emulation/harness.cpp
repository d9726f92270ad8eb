// Runs the kernels of kernels/cuda on the CPU so their logic is tested where no GPU is.
// Each CUDA thread of a block is a std::thread, __syncthreads is a std::barrier and blocks run
// one after another; that models everything the kernels use (block barriers and dynamic
// shared memory, no warp intrinsics). Shared memory is poisoned with NaN before every block,
// and the bytes past the launch's declared size must come back untouched.
#include <barrier>
#include <cmath>
#include <cstring>
#include <math.h>
#include <thread>
#include <vector>

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
static int launch(unsigned grid_x, unsigned grid_y, unsigned threads, size_t smem_bytes, Kernel kernel) {
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

extern "C" int emu_jacobi_eigh(const float* a, float* w, float* v, int batch, int n, int threads, size_t smem) {
  return launch(batch, 1, threads, smem, [=] { tsv_jacobi_eigh_f32(a, w, v, n); });
}

extern "C" int emu_cholesky(const float* g, float* l, int* status, int batch, int c, int allow_shift, int threads,
                            size_t smem) {
  return launch(batch, 1, threads, smem, [=] { tsv_cholesky_f32(g, l, status, c, allow_shift); });
}

extern "C" int emu_trsm(const float* y, const float* l, float* q, int batch, int m, int c, int rows, size_t smem) {
  return launch(batch, (m + rows - 1) / rows, rows, smem, [=] { tsv_trsm_lower_t_f32(y, l, q, m, c); });
}
