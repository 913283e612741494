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
// IEEE half stored as raw bits, converted with integer operations and selects (below) that vectorize in every
// target clone, as bf16's do. GCC 12 compiled _Float16 conversions to one scalar instruction per element even in
// the AVX-512 clone (and to libgcc calls in the baseline one): the fp16 cross-entropy ran at 0.2 Gelem/s, the
// fp16 SwiGLU backward at an eighth of bf16's rate.
struct fp16 {
  uint16_t bits;
};

static inline float to_float(float v) { return v; }
// Exact. Normal: the exponent rebiased (127 - 15 = 112); inf and NaN: the all-ones exponent, the mantissa (NaN
// payload and quiet bit) kept; subnormal and zero: mantissa * 2^-24, an exact fp32 product (no fp32 subnormal
// arithmetic, so flush-to-zero modes do not change it).
static inline float to_float(fp16 v) {
  const uint32_t magnitude = v.bits & 0x7fffu, sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t normal = (magnitude << 13) + (uint32_t{112} << 23);
  const uint32_t special = (magnitude << 13) | 0x7f800000u;
  const uint32_t tiny = __builtin_bit_cast(uint32_t, static_cast<float>(static_cast<int32_t>(magnitude)) * 0x1p-24f);
  const uint32_t bits = magnitude >= 0x7c00u ? special : magnitude >= 0x0400u ? normal : tiny;
  return __builtin_bit_cast(float, bits | sign);
}
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
// Round to nearest even, as F16C's vcvtps2ph: NaN stays NaN (quiet, the top of its payload kept); from 65520 up,
// inf. A normal half is rebiased and rounded in the integer (a carry into the exponent is the right result);
// below 2^-14, adding 0.5 (whose ulp is 2^-24, the smallest half subnormal) rounds the value to whole units of
// 2^-24, which are the half's bits (1024 units: the smallest normal, 0x0400).
template <>
inline fp16 from_float<fp16>(float v) {
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  const uint32_t a = u & 0x7fffffffu, sign = (u >> 16) & 0x8000u;
  const uint32_t normal = (a - (uint32_t{112} << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  const uint32_t tiny = __builtin_bit_cast(uint32_t, __builtin_bit_cast(float, a) + 0.5f) - 0x3f000000u;
  const uint32_t bits = a > 0x7f800000u  ? (a >> 13) | 0x200u
                        : a >= 0x477ff000u ? 0x7c00u
                        : a >= 0x38800000u ? normal
                                           : tiny;
  return fp16{static_cast<uint16_t>(bits | sign)};
}
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

// fn(T{}) for the element type of a dtype code.
template <typename Fn>
void with_element_type(const char* op, int dtype, Fn fn) {
  switch (dtype) {
    case kFloat32: return fn(float{});
    case kBFloat16: return fn(bf16{});
    case kFloat16: return fn(fp16{});
  }
  bad_dtype(op, dtype);
}

// dst[i] = from_float(to_float(src[i])) between any two of the kernels' dtypes: the conversions every kernel
// uses, for their tests (pytrain._C.convert).
inline void convert(const void* src, int src_dtype, void* dst, int dst_dtype, int64_t n) {
  with_element_type("convert", src_dtype, [&](auto s) {
    with_element_type("convert", dst_dtype, [&](auto d) {
      using S = decltype(s);
      using D = decltype(d);
      for (int64_t i = 0; i < n; ++i) static_cast<D*>(dst)[i] = from_float<D>(to_float(static_cast<const S*>(src)[i]));
    });
  });
}

}  // namespace pytrain::cpu

// Hot loops are compiled for AVX-512, AVX2 and the baseline; the loader picks one at run time.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PYTRAIN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PYTRAIN_CLONES
#endif
