// Launch code for the kernels in kernels/cuda, with the geometry of launch_geometry.h. Tensors
// cross as device pointers (Python ints), sizes and a cudaStream_t (a Python int, e.g.
// torch.cuda.current_stream().cuda_stream): no libtorch link. Every array must be contiguous
// fp32 (jacobi_eigh: fp32 or fp64; status: int32); the wrappers in tsvmerge.cuda_ops guarantee
// that, and the checks here catch what a pointer can show (null, misaligned, not device
// memory, devices that differ).
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>

#include "cholesky_qr.cuh"
#include "jacobi_eigh.cuh"
#include "launch_geometry.h"

namespace py = pybind11;

namespace {

constexpr size_t kDefaultSmemBytes = 48 * 1024;  // more needs the opt-in attribute

void check_cuda(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess) throw std::runtime_error(what + ": " + cudaGetErrorString(err));
}

void require(bool ok, const std::string& message) {
  if (!ok) throw py::value_error(message);
}

using NamedPointer = std::pair<const char*, std::uintptr_t>;

// The device all pointers live on, after checking each one (aligned to `align` bytes).
int device_of(const std::string& fn, std::initializer_list<NamedPointer> pointers, size_t align = alignof(float)) {
  int device = -1;
  for (const auto& [name, ptr] : pointers) {
    const std::string arg = fn + ": " + name;
    require(ptr != 0, arg + " is a null pointer");
    require(ptr % align == 0, arg + " is not " + std::to_string(align) + "-byte aligned");
    cudaPointerAttributes attr{};
    const cudaError_t err = cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr));
    if (err != cudaSuccess) {
      cudaGetLastError();  // not sticky: clear it so later launch checks do not report it
      check_cuda(err, arg + ": cannot inspect the pointer");
    }
    require(attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged,
            arg + " is not CUDA device memory");
    require(device < 0 || attr.device == device, fn + ": arrays are on different devices");
    device = attr.device;
  }
  return device;
}

// Makes `device` current for a launch and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    switched_ = device != previous_;
    if (switched_) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

// Lets `kernel` use `smem` bytes of dynamic shared memory, or says why it cannot.
void allow_smem(const void* kernel, size_t smem, int device, const std::string& fn) {
  if (smem <= kDefaultSmemBytes) return;
  int optin = 0;
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), fn);
  require(smem <= static_cast<size_t>(optin), fn + ": needs " + std::to_string(smem) +
                                                   " bytes of shared memory per block, device allows " +
                                                   std::to_string(optin));
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)), fn);
}

void check_sizes(const std::string& fn, int64_t batch, const char* size_name, int64_t size, int64_t max_size) {
  require(batch >= 0 && batch <= INT32_MAX, fn + ": batch must be in [0, 2^31), got " + std::to_string(batch));
  require(size >= 1 && size <= max_size, fn + ": " + size_name + " must be in [1, " + std::to_string(max_size) +
                                             "], got " + std::to_string(size));
}

cudaStream_t as_stream(std::uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

int max_smem(int device) {
  int optin = 0;
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "max shared memory");
  return optin;
}

void jacobi_eigh(std::uintptr_t a, std::uintptr_t w, std::uintptr_t v, std::uintptr_t v_scratch, int64_t batch,
                 int64_t n, bool fp64, std::uintptr_t stream) {
  const std::string fn = "jacobi_eigh";
  check_sizes(fn, batch, "n", n, tsvmerge::kEighMaxN);
  if (batch == 0) return;
  const size_t element = fp64 ? sizeof(double) : sizeof(float);
  const int device = device_of(fn, {{"a", a}, {"w", w}, {"v", v}}, element);
  DeviceGuard guard(device);
  const tsvmerge::Launch launch = tsvmerge::eigh_launch(static_cast<int>(n), static_cast<int>(element),
                                                        max_smem(device));
  if (launch.scratch) device_of(fn, {{"v_scratch", v_scratch}}, element);
  const std::uintptr_t scratch = launch.scratch ? v_scratch : 0;  // null: V in shared memory
  const void* kernel = fp64 ? reinterpret_cast<const void*>(tsv_jacobi_eigh_f64)
                            : reinterpret_cast<const void*>(tsv_jacobi_eigh_f32);
  allow_smem(kernel, launch.smem, device, fn);
  const auto grid = static_cast<unsigned>(batch);
  if (fp64) {
    tsv_jacobi_eigh_f64<<<grid, launch.threads, launch.smem, as_stream(stream)>>>(
        reinterpret_cast<const double*>(a), reinterpret_cast<double*>(w), reinterpret_cast<double*>(v),
        reinterpret_cast<double*>(scratch), static_cast<int>(n));
  } else {
    tsv_jacobi_eigh_f32<<<grid, launch.threads, launch.smem, as_stream(stream)>>>(
        reinterpret_cast<const float*>(a), reinterpret_cast<float*>(w), reinterpret_cast<float*>(v),
        reinterpret_cast<float*>(scratch), static_cast<int>(n));
  }
  check_cuda(cudaGetLastError(), fn + " launch");
}

void cholesky(std::uintptr_t g, std::uintptr_t l, std::uintptr_t status, int64_t batch, int64_t c,
              bool allow_shift, std::uintptr_t stream) {
  const std::string fn = "cholesky";
  check_sizes(fn, batch, "c", c, tsvmerge::kCholqrMaxC);
  if (batch == 0) return;
  const int device = device_of(fn, {{"g", g}, {"l", l}, {"status", status}});
  DeviceGuard guard(device);
  const tsvmerge::Launch launch = tsvmerge::cholesky_launch(static_cast<int>(c));
  allow_smem(reinterpret_cast<const void*>(tsv_cholesky_f32), launch.smem, device, fn);
  tsv_cholesky_f32<<<static_cast<unsigned>(batch), launch.threads, launch.smem, as_stream(stream)>>>(
      reinterpret_cast<const float*>(g), reinterpret_cast<float*>(l), reinterpret_cast<int*>(status),
      static_cast<int>(c), allow_shift ? 1 : 0);
  check_cuda(cudaGetLastError(), fn + " launch");
}

void trsm_lower_t(std::uintptr_t y, std::uintptr_t l, std::uintptr_t q, int64_t batch, int64_t m, int64_t c,
                  std::uintptr_t stream) {
  const std::string fn = "trsm_lower_t";
  check_sizes(fn, batch, "c", c, tsvmerge::kCholqrMaxC);
  const tsvmerge::Launch launch = tsvmerge::trsm_launch(static_cast<int>(c));
  const int64_t row_blocks = (m + launch.threads - 1) / launch.threads;
  require(m >= 1 && row_blocks <= 65535, fn + ": m must be in [1, " + std::to_string(65535 * launch.threads) +
                                             "], got " + std::to_string(m));
  if (batch == 0) return;
  const int device = device_of(fn, {{"y", y}, {"l", l}, {"q", q}});
  DeviceGuard guard(device);
  allow_smem(reinterpret_cast<const void*>(tsv_trsm_lower_t_f32), launch.smem, device, fn);
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(row_blocks));
  tsv_trsm_lower_t_f32<<<grid, launch.threads, launch.smem, as_stream(stream)>>>(
      reinterpret_cast<const float*>(y), reinterpret_cast<const float*>(l), reinterpret_cast<float*>(q),
      static_cast<int>(m), static_cast<int>(c));
  check_cuda(cudaGetLastError(), fn + " launch");
}

}  // namespace

void register_cuda_ops(py::module_& m) {
  m.def("jacobi_eigh", &jacobi_eigh, py::arg("a"), py::arg("w"), py::arg("v"), py::arg("v_scratch"),
        py::arg("batch"), py::arg("n"), py::arg("fp64"), py::arg("stream") = 0,
        "Eigenpairs of `batch` symmetric n x n fp32 (fp64) matrices (n <= 128; lower triangle read): a [batch, n, n] "
        "-> w [batch, n] ascending, v [batch, n, n] eigenvectors as columns; v_scratch [batch, eigh_launch(...)[2]] "
        "where the geometry puts V in global memory (else ignored). Pointers and stream as ints.");
  m.def("cholesky", &cholesky, py::arg("g"), py::arg("l"), py::arg("status"), py::arg("batch"), py::arg("c"),
        py::arg("allow_shift"), py::arg("stream") = 0,
        "G = L L^T for `batch` c x c fp32 Gram matrices (c <= 128): g -> l (lower), status int32 per matrix: "
        "0 plain, 1 shifted (allow_shift), 2 failed (l = I).");
  m.def("trsm_lower_t", &trsm_lower_t, py::arg("y"), py::arg("l"), py::arg("q"), py::arg("batch"), py::arg("m"),
        py::arg("c"), py::arg("stream") = 0,
        "Q = Y L^-T for fp32 panels y, q [batch, m, c] and lower l [batch, c, c]; q may alias y.");
}
