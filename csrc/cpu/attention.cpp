// Attention on CPUs with AVX512-BF16 (attention.h): bf16 products summed in fp32 by VDPBF16PS, fp32 ones by
// FMA, the softmax in fp32.
//
// Why not PyTorch's CPU flash kernel: where oneDNN's packed micro-kernels are unavailable (CPUs without
// AMX, e.g. AMD Zen 4) its products run through a generic loop, about 70 GFLOP/s forward on two Zen 4 cores
// against 430 for a bf16 GEMM, and its backward is slower still. Here every product is one register-tiled
// micro-kernel (`tile`) over operands laid out for it first:
//   A: rows, the reduced index contiguous; one 32-bit word (two bf16 neighbours, or one fp32) is broadcast;
//   B: "pair" layout, words of two bf16 neighbours along the reduced index (fp32: one element), 16 output
//      columns per vector.
// Below, "pairs" count those words: for fp32 a pair is one element.
// Each query block holds its whole rows of scores (block x keys, fp32), so the forward's softmax is a plain
// one: no running maximum or rescaling. The backward works in the transposed orientation (keys as rows,
// queries as columns) so that the probabilities and their gradient come out in the layouts the dV and dK
// products read as A and the dQ product reads dS^T as A's transpose, with no transpose pass anywhere.
// The threads are torch's OpenMP pool (parallel_for); work items are handed out largest first.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "attention.h"
#include "cpu/cpu_types.h"
#include "cpu/fast_exp.h"

#define PYTRAIN_BF16_UNITS __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#define PYTRAIN_BF16_UNITS_INLINE \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma"), always_inline)) inline

namespace pytrain::cpu {
namespace {

using u16 = uint16_t;  // bf16 bits
using u32 = uint32_t;  // a word: two bf16 neighbours or one fp32

bool units() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16");
}

constexpr int64_t kBlock = 64;   // queries per block: a block's scores (64 x keys fp32) stay in L2
constexpr int kTileRows = 6;     // the micro-kernel's register tile: 6 rows x 4 vectors = 24 accumulators
constexpr int kTileVectors = 4;  // (of 32 registers; the rest hold B's four vectors and A's broadcast)

int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

template <typename T>
std::unique_ptr<T[]> uninitialized(int64_t n) {
  return std::unique_ptr<T[]>(new T[n > 0 ? n : 1]);
}

// The two element types, as the kernels below are written once for both.
struct Bf16 {
  using Element = u16;  // bits
  static constexpr int kPerWord = 2;
};
struct F32 {
  using Element = float;
  static constexpr int kPerWord = 1;
};

// ---------------------------------------------------------------------------------------------------------
// The product: C[m x n] (= or +=) A[m x pairs words] B[pairs words x n]; n a multiple of 16. A's word p of row i
// is a[i * A.row + p * A.pair]: rows (A.row = the row length in words, A.pair = 1), or the pairs layout of A's
// transpose (A.row = 1, A.pair = its row length in words).

using aliased_u32 = u32 __attribute__((may_alias));  // the words of bf16 and fp32 buffers

struct Operand {
  const aliased_u32* words;
  int64_t row, pair;
};

template <typename T, int MR, int NV, bool kAdd>
PYTRAIN_BF16_UNITS void tile(int64_t pairs, Operand a, const u32* b, int64_t ldb, float* c, int64_t ldc) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = kAdd ? _mm512_loadu_ps(c + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_si512(b + p * ldb + 16 * v);
    for (int r = 0; r < MR; ++r) {
      const __m512i av = _mm512_set1_epi32(static_cast<int>(a.words[r * a.row + p * a.pair]));
      for (int v = 0; v < NV; ++v) {
        if constexpr (std::is_same_v<T, Bf16>)
          acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)av, (__m512bh)bv[v]);
        else
          acc[r][v] = _mm512_fmadd_ps(_mm512_castsi512_ps(av), _mm512_castsi512_ps(bv[v]), acc[r][v]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
}

template <typename T, int MR, bool kAdd>
PYTRAIN_BF16_UNITS void tile_of_width(int vectors, int64_t pairs, Operand a, const u32* b, int64_t ldb, float* c,
                                      int64_t ldc) {
  switch (vectors) {
    case 1: return tile<T, MR, 1, kAdd>(pairs, a, b, ldb, c, ldc);
    case 2: return tile<T, MR, 2, kAdd>(pairs, a, b, ldb, c, ldc);
    case 3: return tile<T, MR, 3, kAdd>(pairs, a, b, ldb, c, ldc);
    default: return tile<T, MR, 4, kAdd>(pairs, a, b, ldb, c, ldc);
  }
}

template <typename T, bool kAdd>
PYTRAIN_BF16_UNITS void gemm(int64_t m, int64_t n, int64_t pairs, Operand a, const u32* b, int64_t ldb, float* c,
                             int64_t ldc) {
  // Column panels outside: a panel of B (pairs x 64 words) is reused by every row tile while in L1/L2.
  for (int64_t j = 0; j < n; j += 16 * kTileVectors) {
    const int vectors = static_cast<int>(std::min<int64_t>(kTileVectors, (n - j) / 16));
    for (int64_t i = 0; i < m; i += kTileRows) {
      const Operand ai{a.words + i * a.row, a.row, a.pair};
      const u32* bj = b + j;
      float* cij = c + i * ldc + j;
      switch (std::min<int64_t>(kTileRows, m - i)) {
        case 1: tile_of_width<T, 1, kAdd>(vectors, pairs, ai, bj, ldb, cij, ldc); break;
        case 2: tile_of_width<T, 2, kAdd>(vectors, pairs, ai, bj, ldb, cij, ldc); break;
        case 3: tile_of_width<T, 3, kAdd>(vectors, pairs, ai, bj, ldb, cij, ldc); break;
        case 4: tile_of_width<T, 4, kAdd>(vectors, pairs, ai, bj, ldb, cij, ldc); break;
        case 5: tile_of_width<T, 5, kAdd>(vectors, pairs, ai, bj, ldb, cij, ldc); break;
        default: tile_of_width<T, 6, kAdd>(vectors, pairs, ai, bj, ldb, cij, ldc); break;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Vector helpers.

// exp over 16 lanes: fast_exp's polynomial (fast_exp.h), 2^n applied by VSCALEFPS. Below -87: 0; NaN stays NaN.
PYTRAIN_BF16_UNITS_INLINE __m512 exp16(__m512 x) {
  using namespace exp_constants;
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_LT_OQ);
  x = _mm512_min_ps(x, _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2High), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Low), r);
  __m512 p = _mm512_set1_ps(kPoly[0]);
  for (int k = 1; k < 6; ++k) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kPoly[k]));
  const __m512 e = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~underflow), _mm512_scalef_ps(e, n));
}

// 16 fp32 to 16 bf16 (round to nearest even, NaN stays NaN), in the low 256 bits.
PYTRAIN_BF16_UNITS_INLINE __m256i to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

PYTRAIN_BF16_UNITS_INLINE __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << std::max<int64_t>(count, 0)) - 1);
}

// The lanes of `mask` of 16 elements at p, as fp32 (zeros elsewhere), and back.
template <typename T>
PYTRAIN_BF16_UNITS_INLINE __m512 load16(const typename T::Element* p, __mmask16 mask) {
  if constexpr (std::is_same_v<T, Bf16>)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
  else
    return _mm512_maskz_loadu_ps(mask, p);
}
template <typename T>
PYTRAIN_BF16_UNITS_INLINE void store16(typename T::Element* p, __m512 x, __mmask16 mask) {
  if constexpr (std::is_same_v<T, Bf16>)
    _mm256_mask_storeu_epi16(p, mask, to_bf16(x));
  else
    _mm512_mask_storeu_ps(p, mask, x);
}

// ---------------------------------------------------------------------------------------------------------
// Layouts. `rows` rows of `d` elements each, `stride` elements apart, in; zeros fill every padding.

// Operand A as rows: dst[r * width + c] = src[r][c], width = d rounded up to whole words.
template <typename T>
void copy_rows(const typename T::Element* src, int64_t stride, int64_t rows, int64_t d, int64_t width,
               typename T::Element* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + r * width, src + r * stride, d * sizeof(*src));
    std::fill(dst + r * width + d, dst + (r + 1) * width, typename T::Element{0});
  }
}

template <typename T>
Operand rows_of(const typename T::Element* buffer, int64_t row_length) {
  return {reinterpret_cast<const aliased_u32*>(buffer), row_length / T::kPerWord, 1};
}

// Operand B = src^T, pairs across each row: dst[p * ld + r] = word p of row r, for r < ld (a multiple of 16),
// zero for r >= rows. Sixteen rows' word p at a time, gathered.
template <typename T>
PYTRAIN_BF16_UNITS void pack_pairs_across(const typename T::Element* src, int64_t stride, int64_t rows, int64_t d,
                                          int64_t ld, u32* dst) {
  const int64_t whole = d / T::kPerWord;  // words inside the row (odd bf16 d: the last one's high half is padding)
  const __m512i offsets = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int>(stride * sizeof(*src))));  // bytes; stride < 2^26 (the caller checks)
  for (int64_t r0 = 0; r0 < ld; r0 += 16) {
    const __mmask16 live = first_lanes(rows - r0);
    const auto* base = src + std::min(r0, rows) * stride;
    for (int64_t p = 0; p < whole; ++p)
      _mm512_storeu_si512(dst + p * ld + r0, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, offsets,
                                                                         base + T::kPerWord * p, 1));
    if constexpr (std::is_same_v<T, Bf16>)
      if (whole * 2 < d)
        for (int64_t r = r0; r < r0 + 16; ++r) dst[whole * ld + r] = r < rows ? src[r * stride + d - 1] : 0;
  }
}

// Operand B = src, pairs down the rows: dst[p * ld + c] = (src[2p][c], src[2p+1][c]) for bf16, src[p][c] for
// fp32, over the rows up to `padded` and the columns up to ld (a multiple of 16); rows >= `rows` and columns
// >= d are zero.
template <typename T>
PYTRAIN_BF16_UNITS void pack_pairs_along(const typename T::Element* src, int64_t stride, int64_t rows, int64_t d,
                                         int64_t padded, int64_t ld, u32* dst) {
  for (int64_t p = 0; p < padded / T::kPerWord; ++p)
    for (int64_t c = 0; c < ld; c += 16) {
      const __mmask16 lanes = first_lanes(d - c);
      if constexpr (std::is_same_v<T, Bf16>) {
        const __m256i low = _mm256_maskz_loadu_epi16(2 * p < rows ? lanes : 0, src + 2 * p * stride + c);
        const __m256i high = _mm256_maskz_loadu_epi16(2 * p + 1 < rows ? lanes : 0, src + (2 * p + 1) * stride + c);
        _mm512_storeu_si512(dst + p * ld + c, _mm512_or_si512(_mm512_cvtepu16_epi32(low),
                                                              _mm512_slli_epi32(_mm512_cvtepu16_epi32(high), 16)));
      } else {
        _mm512_storeu_ps(dst + p * ld + c, _mm512_maskz_loadu_ps(p < rows ? lanes : 0, src + p * stride + c));
      }
    }
}

// Runs worker(take, scratch) on up to `threads` threads, each with a Scratch of its own made by make() first,
// in the calling thread (an allocation that fails throws to Python there, not inside a parallel region, where
// it would abort the process); take() hands out the items 0..items-1 one at a time (-1: none left), so threads
// that draw short items take more of them.
template <typename Scratch, typename Make, typename Worker>
void run_workers(int64_t items, int threads, Make make, Worker worker) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, items));
  std::vector<Scratch> scratch;
  scratch.reserve(workers);
  for (int64_t w = 0; w < workers; ++w) scratch.push_back(make());
  std::atomic<int64_t> next{0};
  auto take = [&] {
    const int64_t item = next.fetch_add(1, std::memory_order_relaxed);
    return item < items ? item : int64_t{-1};
  };
  // One chunk of one index per thread: `first` is the worker's index.
  parallel_for(workers, static_cast<int>(workers), 1, [&](int64_t first, int64_t, int) {
    worker(take, scratch[first]);
  });
}

struct NoScratch {};

// The work items in decreasing cost, so the longest start first.
std::vector<int64_t> by_cost(const std::vector<int64_t>& cost) {
  std::vector<int64_t> order(cost.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return cost[x] > cost[y]; });
  return order;
}

template <typename T>
struct Shape {
  explicit Shape(const AttentionArgs& a)
      : d(a.head_dim),
        pairs((a.head_dim + T::kPerWord - 1) / T::kPerWord),
        width(T::kPerWord * pairs),
        columns(round_up(a.head_dim, 16)),
        group(a.heads / a.kv_heads),
        tokens(a.cu_seqlens[a.num_seqs]) {
    for (int64_t s = 0; s < a.num_seqs; ++s) longest = std::max(longest, a.cu_seqlens[s + 1] - a.cu_seqlens[s]);
  }
  int64_t d, pairs, width, columns, group, tokens, longest = 0;
};

// ---------------------------------------------------------------------------------------------------------
// Forward.

// Row r of a block's scores (its query sees keys 0..visible-1) to probabilities (zeros up to `padded`) and the
// row's log-sum-exp (of the scaled scores).
template <typename T>
PYTRAIN_BF16_UNITS float softmax_row(float* s, int64_t visible, int64_t padded, float scale,
                                     typename T::Element* p) {
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < visible; j += 16)
    top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, first_lanes(visible - j), s + j));
  const float most = _mm512_reduce_max_ps(top) * scale;  // scale > 0
  const float shift = std::isfinite(most) ? most : 0.f;
  const __m512 shifts = _mm512_set1_ps(shift), factor = _mm512_set1_ps(scale);
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < visible; j += 16) {
    const __mmask16 lanes = first_lanes(visible - j);
    const __m512 e = exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(lanes, s + j), factor, shifts));
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(lanes, e));
    _mm512_mask_storeu_ps(s + j, lanes, e);
  }
  const float sum = _mm512_reduce_add_ps(total);
  const __m512 inverse = _mm512_set1_ps(1.f / sum);
  for (int64_t j = 0; j < padded; j += 16)
    store16<T>(p + j, _mm512_mul_ps(_mm512_maskz_loadu_ps(first_lanes(visible - j), s + j), inverse), 0xffff);
  return shift + std::log(sum);
}

template <typename T>
struct ForwardScratch {
  using E = typename T::Element;
  ForwardScratch(const Shape<T>& shape, int64_t most_keys)
      : query(uninitialized<E>(kBlock * shape.width)),
        scores(uninitialized<float>(kBlock * most_keys)),
        probs(uninitialized<E>(kBlock * most_keys)),
        result(uninitialized<float>(kBlock * shape.columns)) {}
  std::unique_ptr<E[]> query;
  std::unique_ptr<float[]> scores;
  std::unique_ptr<E[]> probs;
  std::unique_ptr<float[]> result;
};

// Queries first..first+63 of sequence s, head h, against its keys (B^T, pairs across) and values (B).
template <typename T>
PYTRAIN_BF16_UNITS void forward_block(const AttentionArgs& a, const Shape<T>& shape, ForwardScratch<T>& w,
                                      int64_t s, int64_t h, int64_t first, const u32* keys, const u32* values) {
  using E = typename T::Element;
  const int64_t* cu = a.cu_seqlens;
  const int64_t len = cu[s + 1] - cu[s], rows = std::min(kBlock, len - first), token = cu[s] + first;
  const int64_t seen = a.causal ? first + rows : len, padded = round_up(seen, 16);
  const E* q = static_cast<const E*>(a.q) + token * a.q_token_stride + h * a.q_head_stride;
  copy_rows<T>(q, a.q_token_stride, rows, shape.d, shape.width, w.query.get());
  gemm<T, false>(rows, padded, shape.pairs, rows_of<T>(w.query.get(), shape.width), keys, round_up(len, 16),
                 w.scores.get(), padded);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t visible = a.causal ? first + r + 1 : len;
    a.lse[h * shape.tokens + token + r] =
        softmax_row<T>(w.scores.get() + r * padded, visible, padded, a.scale, w.probs.get() + r * padded);
  }
  gemm<T, false>(rows, shape.columns, padded / T::kPerWord, rows_of<T>(w.probs.get(), padded), values, shape.columns,
                 w.result.get(), shape.columns);
  for (int64_t r = 0; r < rows; ++r) {
    E* o = static_cast<E*>(a.out) + ((token + r) * a.heads + h) * shape.d;
    for (int64_t c = 0; c < shape.d; c += 16)
      store16<T>(o + c, _mm512_loadu_ps(w.result.get() + r * shape.columns + c), first_lanes(shape.d - c));
  }
}

template <typename T>
void forward(const AttentionArgs& a) {
  using E = typename T::Element;
  const Shape<T> shape(a);
  const int64_t* cu = a.cu_seqlens;

  // Every sequence's keys as B^T (pairs across) and values as B (pairs along), per kv head, once.
  std::vector<int64_t> key_at(a.num_seqs * a.kv_heads), value_at(a.num_seqs * a.kv_heads);
  int64_t key_words = 0, value_words = 0;
  for (int64_t s = 0; s < a.num_seqs; ++s)
    for (int64_t h = 0; h < a.kv_heads; ++h) {
      const int64_t padded = round_up(cu[s + 1] - cu[s], 16);
      key_at[s * a.kv_heads + h] = key_words, key_words += shape.pairs * padded;
      value_at[s * a.kv_heads + h] = value_words, value_words += padded / T::kPerWord * shape.columns;
    }
  auto keys = uninitialized<u32>(key_words), values = uninitialized<u32>(value_words);
  auto none = [] { return NoScratch{}; };
  run_workers<NoScratch>(a.num_seqs * a.kv_heads, a.parallelism, none, [&](auto take, NoScratch&) {
    for (int64_t item; (item = take()) >= 0;) {
      const int64_t s = item / a.kv_heads, h = item % a.kv_heads, len = cu[s + 1] - cu[s];
      const E* k = static_cast<const E*>(a.k) + cu[s] * a.k_token_stride + h * a.k_head_stride;
      const E* v = static_cast<const E*>(a.v) + cu[s] * a.v_token_stride + h * a.v_head_stride;
      pack_pairs_across<T>(k, a.k_token_stride, len, shape.d, round_up(len, 16), keys.get() + key_at[item]);
      pack_pairs_along<T>(v, a.v_token_stride, len, shape.d, round_up(len, 16), shape.columns,
                          values.get() + value_at[item]);
    }
  });

  // Items: (sequence, head, block of queries).
  std::vector<int64_t> item_seq, item_head, item_first, cost;
  for (int64_t s = 0; s < a.num_seqs; ++s) {
    const int64_t len = cu[s + 1] - cu[s];
    for (int64_t h = 0; h < a.heads; ++h)
      for (int64_t first = 0; first < len; first += kBlock) {
        item_seq.push_back(s), item_head.push_back(h), item_first.push_back(first);
        cost.push_back(a.causal ? std::min(first + kBlock, len) : len);
      }
  }
  const std::vector<int64_t> order = by_cost(cost);
  auto make = [&] { return ForwardScratch<T>(shape, round_up(shape.longest, 16)); };
  run_workers<ForwardScratch<T>>(static_cast<int64_t>(order.size()), a.parallelism, make, [&](auto take, auto& w) {
    for (int64_t next; (next = take()) >= 0;) {
      const int64_t item = order[next], s = item_seq[item], h = item_head[item];
      const int64_t kv = s * a.kv_heads + h / shape.group;
      forward_block<T>(a, shape, w, s, h, item_first[item], keys.get() + key_at[kv], values.get() + value_at[kv]);
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// Backward, per (sequence, kv head): the dK and dV of its keys accumulate over its query heads and blocks.

template <typename T>
struct BackwardScratch {
  using E = typename T::Element;
  BackwardScratch(const Shape<T>& shape, int64_t most_keys)
      : key_rows(uninitialized<E>(most_keys * shape.width)),
        value_rows(uninitialized<E>(most_keys * shape.width)),
        key_pairs(uninitialized<u32>(most_keys / T::kPerWord * shape.columns)),
        dk(uninitialized<float>(most_keys * shape.columns)),
        dv(uninitialized<float>(most_keys * shape.columns)),
        query_across(uninitialized<u32>(shape.pairs * kBlock)),
        dout_across(uninitialized<u32>(shape.pairs * kBlock)),
        query_along(uninitialized<u32>(kBlock / T::kPerWord * shape.columns)),
        dout_along(uninitialized<u32>(kBlock / T::kPerWord * shape.columns)),
        scores(uninitialized<float>(most_keys * kBlock)),
        dprobs(uninitialized<float>(most_keys * kBlock)),
        probs(uninitialized<E>(most_keys * kBlock)),
        dscores(uninitialized<E>(most_keys * kBlock)),
        dscores_along(uninitialized<u32>(std::is_same_v<T, Bf16> ? most_keys / 2 * kBlock : 0)),
        dq(uninitialized<float>(kBlock * shape.columns)) {}
  std::unique_ptr<E[]> key_rows, value_rows;
  std::unique_ptr<u32[]> key_pairs;  // operand B = the keys, pairs down the rows
  std::unique_ptr<float[]> dk, dv;
  std::unique_ptr<u32[]> query_across, dout_across, query_along, dout_along;
  std::unique_ptr<float[]> scores, dprobs;  // (keys, block): transposed
  std::unique_ptr<E[]> probs, dscores;      // the same in the element type
  std::unique_ptr<u32[]> dscores_along;     // bf16: dscores in pairs of keys (fp32: dscores itself)
  std::unique_ptr<float[]> dq;
  float lse[kBlock], delta[kBlock];

  // Operand A = dS (queries, keys), row r's key pair p at word p * kBlock + r.
  Operand dscores_by_query() const {
    if constexpr (std::is_same_v<T, Bf16>) return {dscores_along.get(), 1, kBlock};
    return {reinterpret_cast<const aliased_u32*>(dscores.get()), 1, kBlock};
  }
};

// Lanes 16c.. of key `key`'s row (probabilities_transposed, below): stores the probability and dS (returned) in
// the element type.
template <typename T>
PYTRAIN_BF16_UNITS_INLINE __m512 probability_and_gradient(BackwardScratch<T>& w, int64_t key, int64_t c,
                                                          int64_t first, bool causal, __m512 factor) {
  // Causal: query first + column sees this key from column key - first on.
  const __mmask16 lanes = causal ? static_cast<__mmask16>(~first_lanes(key - first - 16 * c)) : __mmask16{0xffff};
  const int64_t at = key * kBlock + 16 * c;
  const __m512 p = _mm512_maskz_mov_ps(
      lanes, exp16(_mm512_fmsub_ps(_mm512_loadu_ps(w.scores.get() + at), factor, _mm512_loadu_ps(w.lse + 16 * c))));
  const __m512 ds = _mm512_mul_ps(
      _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(w.dprobs.get() + at), _mm512_loadu_ps(w.delta + 16 * c))), factor);
  store16<T>(w.probs.get() + at, p, 0xffff);
  store16<T>(w.dscores.get() + at, ds, 0xffff);
  return ds;
}

// Keys 0..seen-1 against one block's queries (columns; padding ones have an lse of +inf): the probabilities and
// their scores' gradient, from the transposed scores and dP, as A operands (rows of keys), and for bf16 dS as
// pairs of keys too (zero-padded to `padded_keys`).
template <typename T>
PYTRAIN_BF16_UNITS void probabilities_transposed(BackwardScratch<T>& w, int64_t seen, int64_t padded_keys,
                                                 int64_t first, bool causal, float scale) {
  const __m512 factor = _mm512_set1_ps(scale);
  if constexpr (!std::is_same_v<T, Bf16>) {
    for (int64_t key = 0; key < seen; ++key)
      for (int64_t c = 0; c < kBlock / 16; ++c) probability_and_gradient<T>(w, key, c, first, causal, factor);
    std::fill(w.dscores.get() + seen * kBlock, w.dscores.get() + padded_keys * kBlock, 0.f);
  } else {
    for (int64_t j = 0; j < padded_keys; j += 2)
      for (int64_t c = 0; c < kBlock / 16; ++c) {
        __m512 ds[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t half = 0; half < 2; ++half)
          if (j + half < seen) ds[half] = probability_and_gradient<T>(w, j + half, c, first, causal, factor);
        const __m512i even = _mm512_cvtepu16_epi32(to_bf16(ds[0])), odd = _mm512_cvtepu16_epi32(to_bf16(ds[1]));
        _mm512_storeu_si512(w.dscores_along.get() + j / 2 * kBlock + 16 * c,
                            _mm512_or_si512(even, _mm512_slli_epi32(odd, 16)));
      }
  }
}

// delta[r] = sum_c dout[r][c] * out[r][c] (fp32): the softmax backward's correction, per query.
template <typename T>
PYTRAIN_BF16_UNITS void row_dots(const typename T::Element* dout, const typename T::Element* out, int64_t stride,
                                 int64_t rows, int64_t d, float* delta) {
  for (int64_t r = 0; r < kBlock; ++r) {
    __m512 total = _mm512_setzero_ps();
    for (int64_t c = 0; r < rows && c < d; c += 16) {
      const __mmask16 lanes = first_lanes(d - c);
      total = _mm512_fmadd_ps(load16<T>(dout + r * stride + c, lanes), load16<T>(out + r * stride + c, lanes), total);
    }
    delta[r] = _mm512_reduce_add_ps(total);
  }
}

// One block of queries (first.., head h) against keys 0..seen-1 of the sequence starting at `start`.
template <typename T>
PYTRAIN_BF16_UNITS void backward_block(const AttentionArgs& a, const Shape<T>& shape, BackwardScratch<T>& w,
                                       int64_t start, int64_t len, int64_t h, int64_t first) {
  using E = typename T::Element;
  const int64_t row_stride = a.heads * shape.d;  // out, dout, dq
  const int64_t rows = std::min(kBlock, len - first), token = start + first;
  const int64_t seen = a.causal ? first + rows : len, padded_keys = round_up(seen, 16);
  const E* q = static_cast<const E*>(a.q) + token * a.q_token_stride + h * a.q_head_stride;
  const E* dout = static_cast<const E*>(a.dout) + token * row_stride + h * shape.d;
  pack_pairs_across<T>(q, a.q_token_stride, rows, shape.d, kBlock, w.query_across.get());
  pack_pairs_across<T>(dout, row_stride, rows, shape.d, kBlock, w.dout_across.get());
  pack_pairs_along<T>(q, a.q_token_stride, rows, shape.d, kBlock, shape.columns, w.query_along.get());
  pack_pairs_along<T>(dout, row_stride, rows, shape.d, kBlock, shape.columns, w.dout_along.get());
  row_dots<T>(dout, static_cast<const E*>(a.out) + token * row_stride + h * shape.d, row_stride, rows, shape.d,
              w.delta);
  for (int64_t r = 0; r < kBlock; ++r)  // padding columns: an lse of +inf makes their probabilities 0
    w.lse[r] = r < rows ? a.lse[h * shape.tokens + token + r] : std::numeric_limits<float>::infinity();
  // Transposed scores and dP: (keys, queries).
  gemm<T, false>(seen, kBlock, shape.pairs, rows_of<T>(w.key_rows.get(), shape.width), w.query_across.get(), kBlock,
                 w.scores.get(), kBlock);
  gemm<T, false>(seen, kBlock, shape.pairs, rows_of<T>(w.value_rows.get(), shape.width), w.dout_across.get(), kBlock,
                 w.dprobs.get(), kBlock);
  probabilities_transposed<T>(w, seen, padded_keys, first, a.causal, a.scale);
  constexpr int64_t kQueryPairs = kBlock / T::kPerWord;
  gemm<T, true>(seen, shape.columns, kQueryPairs, rows_of<T>(w.probs.get(), kBlock), w.dout_along.get(),
                shape.columns, w.dv.get(), shape.columns);
  gemm<T, true>(seen, shape.columns, kQueryPairs, rows_of<T>(w.dscores.get(), kBlock), w.query_along.get(),
                shape.columns, w.dk.get(), shape.columns);
  gemm<T, false>(rows, shape.columns, padded_keys / T::kPerWord, w.dscores_by_query(), w.key_pairs.get(),
                 shape.columns, w.dq.get(), shape.columns);
  E* dq = static_cast<E*>(a.dq) + token * row_stride + h * shape.d;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < shape.d; c += 16)
      store16<T>(dq + r * row_stride + c, _mm512_loadu_ps(w.dq.get() + r * shape.columns + c),
                 first_lanes(shape.d - c));
}

// Sequence s, kv head kvh: its keys' dK and dV, summed over the query heads that share them.
template <typename T>
PYTRAIN_BF16_UNITS void backward_item(const AttentionArgs& a, const Shape<T>& shape, BackwardScratch<T>& w, int64_t s,
                                      int64_t kvh) {
  using E = typename T::Element;
  const int64_t start = a.cu_seqlens[s], len = a.cu_seqlens[s + 1] - start;
  const E* k = static_cast<const E*>(a.k) + start * a.k_token_stride + kvh * a.k_head_stride;
  const E* v = static_cast<const E*>(a.v) + start * a.v_token_stride + kvh * a.v_head_stride;
  copy_rows<T>(k, a.k_token_stride, len, shape.d, shape.width, w.key_rows.get());
  copy_rows<T>(v, a.v_token_stride, len, shape.d, shape.width, w.value_rows.get());
  pack_pairs_along<T>(k, a.k_token_stride, len, shape.d, round_up(len, 16), shape.columns, w.key_pairs.get());
  std::fill(w.dk.get(), w.dk.get() + len * shape.columns, 0.f);
  std::fill(w.dv.get(), w.dv.get() + len * shape.columns, 0.f);
  for (int64_t h = kvh * shape.group; h < (kvh + 1) * shape.group; ++h)
    for (int64_t first = 0; first < len; first += kBlock) backward_block<T>(a, shape, w, start, len, h, first);
  const int64_t kv_row_stride = a.kv_heads * shape.d;
  E* dk = static_cast<E*>(a.dk) + start * kv_row_stride + kvh * shape.d;
  E* dv = static_cast<E*>(a.dv) + start * kv_row_stride + kvh * shape.d;
  for (int64_t j = 0; j < len; ++j)
    for (int64_t c = 0; c < shape.d; c += 16) {
      const __mmask16 lanes = first_lanes(shape.d - c);
      store16<T>(dk + j * kv_row_stride + c, _mm512_loadu_ps(w.dk.get() + j * shape.columns + c), lanes);
      store16<T>(dv + j * kv_row_stride + c, _mm512_loadu_ps(w.dv.get() + j * shape.columns + c), lanes);
    }
}

template <typename T>
void backward(const AttentionArgs& a) {
  const Shape<T> shape(a);
  std::vector<int64_t> cost(a.num_seqs * a.kv_heads);
  for (size_t item = 0; item < cost.size(); ++item) {
    const int64_t s = static_cast<int64_t>(item) / a.kv_heads, len = a.cu_seqlens[s + 1] - a.cu_seqlens[s];
    cost[item] = len * len;
  }
  const std::vector<int64_t> order = by_cost(cost);
  auto make = [&] { return BackwardScratch<T>(shape, round_up(shape.longest, 16)); };
  run_workers<BackwardScratch<T>>(static_cast<int64_t>(order.size()), a.parallelism, make, [&](auto take, auto& w) {
    for (int64_t next; (next = take()) >= 0;) {
      const int64_t item = order[next];
      backward_item<T>(a, shape, w, item / a.kv_heads, item % a.kv_heads);
    }
  });
}

}  // namespace

bool attention_supported() {
  static const bool supported = units();
  return supported;
}

namespace {
// Runs op's instance for args' dtype, where the CPU has the instructions.
void run_for_dtype(const AttentionArgs& args, const char* op, void (*bf16)(const AttentionArgs&),
                   void (*f32)(const AttentionArgs&)) {
  if (!attention_supported()) throw std::runtime_error(std::string(op) + ": this CPU has no AVX512-BF16");
  switch (args.dtype) {
    case kBFloat16: return bf16(args);
    case kFloat32: return f32(args);
  }
  bad_dtype(op, args.dtype);
}
}  // namespace

void attention_forward(const AttentionArgs& args) {
  run_for_dtype(args, "attention_forward", forward<Bf16>, forward<F32>);
}

void attention_backward(const AttentionArgs& args) {
  run_for_dtype(args, "attention_backward", backward<Bf16>, backward<F32>);
}

}  // namespace pytrain::cpu
