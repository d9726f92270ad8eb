// Helpers shared by the CUDA kernels. Like every .cuh here, NVRTC-compatible: no includes
// beyond sibling .cuh files, so CuPy can compile the same sources at run time.
#ifndef TSVMERGE_COMMON_CUH
#define TSVMERGE_COMMON_CUH

// fp32 unit roundoff, 2^-24.
#define TSV_EPS32 5.9604644775390625e-8

// Sum of one value per thread over the block; every thread gets the total. `partial` holds
// blockDim.x + 1 doubles of shared memory. Call from all threads (it holds two barriers).
// A second call may follow at once: its total lands only after a barrier every thread
// reaches after reading this one's.
__device__ __forceinline__ double tsv_block_sum(double value, double* partial) {
  partial[threadIdx.x] = value;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (unsigned t = 0; t < blockDim.x; ++t) total += partial[t];
    partial[blockDim.x] = total;
  }
  __syncthreads();
  return partial[blockDim.x];
}

#endif  // TSVMERGE_COMMON_CUH
