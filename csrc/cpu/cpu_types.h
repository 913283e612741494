// Host-side scalar conversions and a row-parallel loop for the CPU kernels.
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "dtype.h"

namespace pytrain::cpu {

// bfloat16 stored as raw bits; converted to float on load (fp32 accumulation everywhere).
struct bf16 {
  uint16_t bits;
};
// IEEE half: the compiler's _Float16 converts with F16C where the target clone allows it.
using fp16 = _Float16;

static inline float to_float(float v) { return v; }
static inline float to_float(fp16 v) { return static_cast<float>(v); }
static inline float to_float(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename T>
static inline T from_float(float v);
template <>
inline float from_float<float>(float v) { return v; }
template <>
inline fp16 from_float<fp16>(float v) { return static_cast<fp16>(v); }
template <>
inline bf16 from_float<bf16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  const uint32_t quiet_nan = (u >> 16) | 0x40;                       // NaN stays NaN
  // A select, not an early return: a branch in the loop body keeps `omp simd` loops from vectorizing.
  return bf16{static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded)};
}

// Runs fn(begin, end, worker) over [0, n) split into contiguous chunks on up to num_threads threads.
// Work below min_per_thread items per thread stays on fewer threads.
// Built with OpenMP, the threads are torch's own intra-op pool: the extension links libgomp by its soname,
// which resolves to the copy torch has already loaded. That matters on a CPU with as many threads as cores:
// after each of torch's parallel ops its pool spins for a while, and a thread of our own started then shared
// a core with a spinning one (RMSNorm right after a GEMM took 2.2x its time). Without OpenMP, std::threads
// (~10 us each to start).
template <typename Fn>
void parallel_for(int64_t n, int num_threads, int64_t min_per_thread, Fn fn) {
  int64_t threads = num_threads < 1 ? 1 : num_threads;
  if (min_per_thread > 0 && n / min_per_thread < threads) threads = n / min_per_thread > 1 ? n / min_per_thread : 1;
  if (threads <= 1) {
    fn(int64_t{0}, n, 0);
    return;
  }
  const int64_t chunk = (n + threads - 1) / threads;
#ifdef _OPENMP
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    const int64_t t = omp_get_thread_num(), begin = t * chunk, end = begin + chunk < n ? begin + chunk : n;
    if (begin < end) fn(begin, end, static_cast<int>(t));
  }
#else
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int64_t t = 1; t < threads; ++t) {
    int64_t begin = t * chunk, end = begin + chunk < n ? begin + chunk : n;
    if (begin >= end) break;
    pool.emplace_back([=] { fn(begin, end, static_cast<int>(t)); });
  }
  fn(0, chunk < n ? chunk : n, 0);
  for (auto& th : pool) th.join();
#endif
}

[[noreturn]] inline void bad_dtype(const char* op, int code) {
  throw std::invalid_argument(std::string(op) + ": unsupported dtype code " + std::to_string(code));
}

}  // namespace pytrain::cpu

// Hot loops are compiled for AVX-512, AVX2 and the baseline; the loader picks one at run time.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PYTRAIN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PYTRAIN_CLONES
#endif
