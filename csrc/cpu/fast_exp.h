// A vectorizable exp for the CPU kernels.
#pragma once
#include <cstdint>

namespace pytrain::cpu {

// Cephes expf's constants, shared by fast_exp, avx2::exp8 (vec_avx2.h) and the AVX-512 exp of attention.cpp:
// log2(e), ln2 in two parts (Cody-Waite: n * kLn2High is exact) and the polynomial's coefficients, highest
// degree first.
namespace exp_constants {
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;
constexpr float kPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
}  // namespace exp_constants

// exp(x) for x in [-87, 88] (Cephes expf: x = n ln2 + r, |r| <= ln2/2, degree-5 polynomial, ~1 ulp): unlike
// std::exp it vectorizes under `omp simd` without -ffast-math or libmvec. Below -87 (denormal results) it
// returns 0, above 88 exp(88); NaN stays NaN.
__attribute__((always_inline)) static inline float fast_exp(float x) {
  const bool underflow = x < -87.f;
  x = underflow ? -87.f : x;
  x = x > 88.f ? 88.f : x;
  using namespace exp_constants;
  const float n = (x * kLog2e + 12582912.f) - 12582912.f;  // round by 1.5 * 2^23 (floorf is a call)
  const float r = (x - n * kLn2High) - n * kLn2Low;
  float p = kPoly[0];
  for (int k = 1; k < 6; ++k) p = p * r + kPoly[k];
  const float e = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  const float scaled = e * __builtin_bit_cast(float, bits);  // unconditionally: a select, not a branch, on AVX2
  return underflow ? 0.f : scaled;
}

}  // namespace pytrain::cpu
