// pybind11 module tsvmerge._C. Never links libtorch: tensors cross as raw device
// pointers, shapes and a CUDA stream handle, so the module survives torch upgrades.
#include <pybind11/pybind11.h>

#include <string>

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

PYBIND11_MODULE(_C, m) {
  m.doc() = "tsvmerge host extension (no libtorch link)";
  m.def("build_info", &build_info, "How this module was built: CUDA kernels or host only.");
#ifdef TSVMERGE_WITH_CUDA
  register_cuda_ops(m);
#endif
}
