// Sixteen fp32 lanes loaded from and stored to the CPU kernels' element types with AVX2 intrinsics, for hot
// loops that GCC's auto-vectorizer handles poorly: it widens and rounds bf16 through long shuffle chains,
// which left the bf16 RMSNorm compute-bound at half the fp32 element rate. The conversions are exactly
// to_float / from_float of cpu_types.h, lane by lane (bf16: round to nearest even, a NaN stays a quiet
// NaN; fp16: F16C, which rounds and widens alike, except that it widens a signaling NaN to a quiet one).
// Everything here is compiled for AVX2+FMA+F16C: call it only from a PYTRAIN_AVX2 function, and call that
// only where avx2::enabled().
#pragma once
#include <immintrin.h>

#include <atomic>
#include <type_traits>

#include "cpu/cpu_types.h"
#include "cpu/fast_exp.h"

#define PYTRAIN_AVX2 __attribute__((target("avx2,fma,f16c")))
#define PYTRAIN_AVX2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) inline

namespace pytrain::cpu::avx2 {

inline bool supported() {
  __builtin_cpu_init();  // use_avx2's initializer may run before libgcc's own constructor has done this
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

// Whether the kernels take their AVX2 loops: where supported(), unless switched off with enable(false) so
// that tests and timings can run the generic loops (those of CPUs without AVX2) on this one.
inline std::atomic<bool> use_avx2{supported()};
inline bool enabled() { return use_avx2.load(std::memory_order_relaxed); }
// Returns the previous setting; true means supported().
inline bool enable(bool on) { return use_avx2.exchange(on && supported()); }

// Sixteen fp32 lanes in two registers. Which element sits in which lane depends on the element type:
// for bf16, a holds the even elements and b the odd ones (one load splits into them with a shift and a
// mask, and a store joins them back as cheaply); otherwise a holds the first eight and b the last eight.
// A store puts every lane back where its load took it from, so elementwise arithmetic on values loaded
// from the same type needs no care; another operand must be laid out alike (lane_source).
struct F32x16 {
  __m256 a, b;
};

// Whether load16<T> keeps the elements in order.
template <typename T>
constexpr bool kInOrder = !std::is_same_v<T, bf16>;

// The element (of 16 consecutive ones) that load16<T> puts in lane k (a's lanes are 0-7, b's 8-15).
template <typename T>
constexpr int lane_source(int k) {
  return kInOrder<T> ? k : (k < 8 ? 2 * k : 2 * (k - 8) + 1);
}

// The lane load16<T> puts element j (of 16 consecutive ones) in: the inverse of lane_source.
template <typename T>
constexpr int lane_of(int j) {
  return kInOrder<T> ? j : (j % 2 == 0 ? j / 2 : 8 + j / 2);
}

PYTRAIN_AVX2_INLINE F32x16 load16(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
PYTRAIN_AVX2_INLINE F32x16 load16(const fp16* p) {
  const __m128i* q = reinterpret_cast<const __m128i*>(p);
  return {_mm256_cvtph_ps(_mm_loadu_si128(q)), _mm256_cvtph_ps(_mm_loadu_si128(q + 1))};
}
// bf16 is the top half of an fp32: in each 32-bit pair, the even element shifted up and the odd one
// with the even masked off are fp32 already.
PYTRAIN_AVX2_INLINE F32x16 load16(const bf16* p) {
  const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)),
          _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(int32_t(0xffff0000u))))};
}

// One register to memory: a regular store, or (kStream) a non-temporal one (see stream_store.h), which needs
// a 32-byte aligned p for the 256-bit registers and a 16-byte aligned one for the 128-bit ones.
template <bool kStream>
PYTRAIN_AVX2_INLINE void put(float* p, __m256 v) {
  kStream ? _mm256_stream_ps(p, v) : _mm256_storeu_ps(p, v);
}
template <bool kStream>
PYTRAIN_AVX2_INLINE void put(void* p, __m256i v) {
  kStream ? _mm256_stream_si256(static_cast<__m256i*>(p), v) : _mm256_storeu_si256(static_cast<__m256i*>(p), v);
}
template <bool kStream>
PYTRAIN_AVX2_INLINE void put(void* p, __m128i v) {
  kStream ? _mm_stream_si128(static_cast<__m128i*>(p), v) : _mm_storeu_si128(static_cast<__m128i*>(p), v);
}

// from_float<bf16> with the result in the top 16 bits: u + 0x7fff + ((u >> 16) & 1) rounds to nearest
// even; a NaN (the unordered compare is the same test as its |u| > 0x7f800000) gets the quiet bit,
// u | 0x400000, whose top half is (u >> 16) | 0x40.
PYTRAIN_AVX2_INLINE __m256i round_to_bf16_high(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(u, lsb), _mm256_set1_epi32(0x7fff));
  const __m256i quiet_nan = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
  const __m256 is_nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(quiet_nan), is_nan));
}

// The 16 lanes back to where load16 took them from; kStream: with non-temporal stores, to an aligned p.
template <bool kStream = false>
PYTRAIN_AVX2_INLINE void store16(float* p, F32x16 v) {
  put<kStream>(p, v.a);
  put<kStream>(p + 8, v.b);
}
template <bool kStream = false>
PYTRAIN_AVX2_INLINE void store16(fp16* p, F32x16 v) {
  put<kStream>(p, _mm256_cvtps_ph(v.a, _MM_FROUND_TO_NEAREST_INT));
  put<kStream>(p + 8, _mm256_cvtps_ph(v.b, _MM_FROUND_TO_NEAREST_INT));
}
template <bool kStream = false>
PYTRAIN_AVX2_INLINE void store16(bf16* p, F32x16 v) {
  const __m256i even = _mm256_srli_epi32(round_to_bf16_high(v.a), 16);
  const __m256i odd = _mm256_and_si256(round_to_bf16_high(v.b), _mm256_set1_epi32(int32_t(0xffff0000u)));
  put<kStream>(p, _mm256_or_si256(even, odd));
}

// fast_exp (fast_exp.h) over 8 lanes, with its clamps: below -87 0, above 88 exp(88), NaN stays NaN (max and
// min return their second operand when either is NaN).
PYTRAIN_AVX2_INLINE __m256 exp8(__m256 x) {
  using namespace exp_constants;
  const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_set1_ps(88.f), _mm256_max_ps(_mm256_set1_ps(-87.f), x));
  const __m256 n =
      _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2High), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Low), r);
  __m256 p = _mm256_set1_ps(kPoly[0]);
  for (int k = 1; k < 6; ++k) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kPoly[k]));
  const __m256 e = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  // 2^n built in the exponent field: n is in [-126, 127] after the clamps
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(e, _mm256_castsi256_ps(two_n)));
}

// Horizontal max of the 8 lanes, none of them NaN (a running max keeps NaN out: _mm256_max_ps(v, m) returns m
// for a NaN v, as the scalar `v > m ? v : m` does).
PYTRAIN_AVX2_INLINE float max8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
  m = _mm_max_ps(_mm_movehl_ps(m, m), m);
  m = _mm_max_ps(_mm_movehdup_ps(m), m);
  return _mm_cvtss_f32(m);
}

// Horizontal sum of the 8 lanes.
PYTRAIN_AVX2_INLINE float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace pytrain::cpu::avx2
