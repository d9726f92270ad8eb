"""GPU kernel sources: Triton kernels (triton/) and CUDA kernels (cuda/)."""
