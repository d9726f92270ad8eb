// Helpers shared by the CUDA kernels. Like every .cuh here, NVRTC-compatible: no includes
// beyond sibling .cuh files, so CuPy can compile the same sources at run time.
#ifndef TSVMERGE_COMMON_CUH
#define TSVMERGE_COMMON_CUH

// fp32 unit roundoff, 2^-24.
#define TSV_EPS32 5.9604644775390625e-8
// Largest finite double: a sum of squares above it is Inf or NaN.
#define TSV_DOUBLE_MAX 1.7976931348623157e308

// Unit roundoff of the storage precision: 2^-24 (fp32), 2^-53 (fp64).
template <typename Real>
__device__ __forceinline__ double tsv_unit_roundoff();
template <>
__device__ __forceinline__ double tsv_unit_roundoff<float>() { return TSV_EPS32; }
template <>
__device__ __forceinline__ double tsv_unit_roundoff<double>() { return 1.1102230246251565e-16; }

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
