// InternLM's tokenized-line formatter: `{"tokens": [1, 2, 3]}\n` per sample, as json.dumps writes it.
// Used by `python -m pytrain.data.tokenize`, where formatting the numbers in Python capped throughput.
#pragma once
#include <cstdint>

namespace pytrain::cpu {

// Bytes one line may need at most, per id and per line, so the caller (Python) can size `out`.
constexpr int64_t kLineOverheadBytes = 15;  // {"tokens": [ and ]}\n
constexpr int64_t kMaxIdBytes = 22;         // -9223372036854775808 and ", "

// Formats samples[s] = ids[offset_s : offset_s + counts[s]] (offset_s the sum of the earlier counts) into
// `out`, one line per sample; writes each line's byte length to line_bytes[s] and returns the total.
// `id_bytes` is 1 (uint8 ids: the byte tokenizer) or 8 (int64 ids).
int64_t format_token_lines(const void* ids, int id_bytes, const int64_t* counts, int64_t samples, char* out,
                           int64_t* line_bytes);

}  // namespace pytrain::cpu
