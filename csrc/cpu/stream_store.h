// Row writers for the CPU kernels: regular stores for outputs that the next op can still find in the cache,
// non-temporal (streaming) stores for outputs far larger than the last-level cache, which skip the
// read-for-ownership a regular store pays on each line (a third of the traffic of a copy), as glibc's
// memcpy does above its own threshold.
#pragma once
#include <emmintrin.h>
#include <sys/mman.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace pytrain::cpu {

// An output of at least this many bytes is written with streaming stores: half the 32 MiB L3 of the
// target EPYC, which the op's input shares with it.
constexpr int64_t kStreamMinBytes = int64_t{16} << 20;

// Copies `bytes` from src (just written, in L1) to dst with 16-byte streaming stores; dst may have any
// alignment (its unaligned head and tail use regular stores). SSE2 only: legal in every target clone.
__attribute__((always_inline)) inline void stream_copy(void* dst, const void* src, int64_t bytes) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  int64_t head = static_cast<int64_t>((16 - (reinterpret_cast<uintptr_t>(d) & 15)) & 15);
  head = head < bytes ? head : bytes;
  std::memcpy(d, s, head);
  d += head, s += head, bytes -= head;
  for (; bytes >= 16; d += 16, s += 16, bytes -= 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(d), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
  }
  std::memcpy(d, s, bytes);
}

// Writes out[0, n) through fill(dst, begin, len), which computes out[begin, begin + len) into dst[0, len):
// straight into out, or, streaming, block by block into an L1 buffer that is then streamed out (the fill
// loop stays a plain vectorized loop); the closing sfence orders the streamed row before any later store,
// such as a caller's fix-up of one element.
template <typename T, typename Fill>
__attribute__((always_inline)) inline void store_row_blocks(T* out, int64_t n, bool stream, Fill fill) {
  if (!stream) {
    fill(out, int64_t{0}, n);
    return;
  }
  constexpr int64_t kBlock = 4096 / sizeof(T);
  alignas(64) T block[kBlock];
  for (int64_t begin = 0; begin < n; begin += kBlock) {
    const int64_t len = n - begin < kBlock ? n - begin : kBlock;
    fill(block, begin, len);
    stream_copy(out + begin, block, len * static_cast<int64_t>(sizeof(T)));
  }
  _mm_sfence();
}

// store_row_blocks for loops with streaming stores of their own (kDirect: the AVX2 loops of vec_avx2.h, whose
// 256-bit streaming stores need a 32-byte aligned row): such a row streams straight from the registers,
// skipping the L1 block's second pass. write(streamed, dst, first, len) writes out[first, first + len) into
// dst, with non-temporal stores where `streamed` (a std::bool_constant) is true; the blocks start at multiples
// of 4096 bytes' worth of elements, so a loop's blocks of 16 stay where they are in the row.
template <bool kDirect, typename T, typename Write>
__attribute__((always_inline)) inline void store_row_direct_or_blocks(T* out, int64_t n, bool stream, Write write) {
  if constexpr (kDirect) {
    if (stream && reinterpret_cast<uintptr_t>(out) % 32 == 0) {
      write(std::true_type{}, out, int64_t{0}, n);
      _mm_sfence();  // as store_row_blocks: the streamed row is ordered before any later store
      return;
    }
  }
  store_row_blocks(out, n, stream,
                   [&](T* dst, int64_t first, int64_t len) { write(std::false_type{}, dst, first, len); });
}

// out[i] = value(i) for i in [0, n), streaming or not as store_row_blocks.
template <typename T, typename Value>
__attribute__((always_inline)) inline void store_row(T* out, int64_t n, bool stream, Value value) {
  store_row_blocks(out, n, stream, [&](T* dst, int64_t begin, int64_t len) __attribute__((always_inline)) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) dst[i] = value(begin + i);
  });
}

// Asks for transparent huge pages on a fresh output of `bytes` before its first write (THP in `madvise`
// mode): a 64 MiB output then faults 32 times instead of 16384. Only the 2 MiB-aligned interior is
// advised; failure (no THP) leaves ordinary pages, so it is ignored.
inline void advise_huge_pages(void* p, int64_t bytes) {
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
#ifdef MADV_HUGEPAGE
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

}  // namespace pytrain::cpu
