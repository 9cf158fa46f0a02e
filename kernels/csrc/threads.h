// How many threads the library's parallel loops use. The library links the system's OpenMP runtime,
// not the copy torch bundles, so torch.set_num_threads (BATCHLLM_NUM_THREADS) does not reach it: the
// Python side passes torch's intra-op thread count through set_num_threads (kernels/cpu_decode.py)
// before a kernel runs. Shared by every translation unit of the library (inline, external linkage).
#pragma once

#include <omp.h>

#include <atomic>

inline std::atomic<int>& requested_threads() {
  static std::atomic<int> n{0};  // 0: not set, OpenMP's default
  return n;
}

inline int library_threads() {
  const int n = requested_threads().load(std::memory_order_relaxed);
  return n > 0 ? n : omp_get_max_threads();
}
