// pybind11 module tsvmerge._C. Never links libtorch: tensors cross as raw device
// pointers, shapes and a CUDA stream handle, so the module survives torch upgrades.
#include <pybind11/pybind11.h>

#include <string>

#include "launch_geometry.h"

namespace py = pybind11;

#ifdef TSVMERGE_WITH_CUDA
void register_cuda_ops(py::module_& m);  // csrc/cuda_ops.cu
#endif

static py::dict build_info() {
  py::dict info;
#ifdef TSVMERGE_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["compiler"] = std::string(
#if defined(__clang__)
      "clang " __clang_version__
#elif defined(__GNUC__)
      "gcc " __VERSION__
#else
      "unknown"
#endif
  );
  return info;
}

static py::tuple as_tuple(const tsvmerge::Launch& launch) {
  return py::make_tuple(launch.threads, launch.smem, launch.scratch);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "tsvmerge host extension (no libtorch link)";
  m.def("build_info", &build_info, "How this module was built: CUDA kernels or host only.");
  // Launch geometry, in every build: the NVRTC launcher (tsvmerge.cuda_ops) uses these numbers.
  m.attr("EIGH_MAX_N") = tsvmerge::kEighMaxN;
  m.attr("CHOLQR_MAX_C") = tsvmerge::kCholqrMaxC;
  m.def("eigh_launch", [](int n, int element_size, size_t max_smem) {
    return as_tuple(tsvmerge::eigh_launch(n, element_size, max_smem));
  }, py::arg("n"), py::arg("element_size"), py::arg("max_smem"),
        "(threads, shared bytes, global scratch elements per matrix) of jacobi_eigh for n x n matrices.");
  m.def("cholesky_launch", [](int c) { return as_tuple(tsvmerge::cholesky_launch(c)); }, py::arg("c"),
        "(threads, shared bytes, 0) of cholesky for c x c Grams.");
  m.def("trsm_launch", [](int c) { return as_tuple(tsvmerge::trsm_launch(c)); }, py::arg("c"),
        "(rows = threads per block, shared bytes, 0) of trsm_lower_t for c columns.");
#ifdef TSVMERGE_WITH_CUDA
  register_cuda_ops(m);
#endif
}
