"""Flash-attention in Triton: forward and backward, causal or not, packed variable-length sequences, GQA.

One layout serves every case: q (total_tokens, q_heads, head_dim) and k, v (total_tokens, kv_heads,
head_dim), packed back to back, with cu_seqlens (num_seqs + 1,) int32 marking where each sequence
starts; a (batch, seq) input is the packed case with equal lengths. No token attends across a sequence
boundary, and nothing quadratic in the packed length is ever built. q head h reads kv head
h // (q_heads // kv_heads). Any head_dim up to 256 works: loads are masked up to the next power of two.
Tokens and heads may be strided (q, k, v as views of one fused projection; stride(-1) must be 1): every tile
address is computed in int64. Programs: grid axis 0 = sequences x heads, axis 1 = blocks within a sequence.

A sliding window (SLIDING, `window` >= 0: flash-attn's window_size=(window, 0), causal only) lets query row r see
keys r - window .. r of its sequence; the loops start (forward, dq) or stop (dK/dV) at the window's edge, so the
work is linear in the sequence length for a fixed window.

Blocks (TOKENS; flash_attn_block_forward / flash_attn_block_backward, ring attention's blocks): q and k hold
different tokens, every query against every key, the mask given per token (TokenMask): a global index and a
document id for each query and each key, CAUSAL and SLIDING applied to the indices, and a query sees a key only of
its own document. The indices need not be consecutive nor sorted (zigzag or random splits), so the loops cover
every tile and skip a tile's dot products when its mask is empty (a causal block against itself computes its
triangle). A query row no key reaches gets out 0 and lse -inf. The backward takes the caller's lse and
delta = rowsum(dout * out) (ring attention's merged ones) and returns this block's dq, dk, dv.

Softmax runs in base 2 (exp2) on scores pre-multiplied by scale * log2(e); the saved logsumexp is in
natural-log units, shape (q_heads, total_tokens), fp32. The backward recomputes the probabilities from
it (FlashAttention-2): one kernel accumulates dk and dv per key block over the q heads of its group,
another accumulates dq per query block, so no atomics are needed.

On machines without a GPU the same kernels run under TRITON_INTERPRET=1 (tests only; see
pytrain/kernels/flash_attn.py).
"""

# kernels/ imported as a top-level package (Python started in the repository root): see pytrain/triton/__init__.py
if not __name__.startswith("pytrain.triton."):
    raise ImportError(f"{__name__}: kernels/ is the package pytrain.triton; import pytrain.triton{__name__[7:]}")

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"  # read by triton at import: fixed for the process


MAX_GRID_Y = 65535  # CUDA's limit on grid axes 1 and 2 (axis 0 takes 2**31 - 1); Triton's launcher does not check

# Candidate tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) per input precision, kernel and BLOCK_D (the head_dim
# rounded up to a power of two). The autotuner times a launch's candidates once per (head_dim, sequence-length
# bucket, causal, dtypes) and keeps the fastest, in memory and in Triton's cache folder (cache_results), so later
# processes do not time them. Spills below: ptxas for sm_90 as Triton 3.6 and 3.9 run it (bytes of spill stores per
# thread; tests/test_flash_attn.py compiles every 16-bit dK/dV tile and checks that none spills).
_TILES = {
    "16bit": {
        "fwd": {
            64: [(128, 64, 4, 2), (128, 64, 4, 3), (64, 64, 4, 3)],
            128: [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)],
            256: [(64, 32, 8, 2), (64, 32, 4, 3)],
        },
        # dK/dV keeps two fp32 (BLOCK_N, head_dim) accumulators in registers across its query loop, and pipelining
        # that loop (2 stages) costs more: head_dim 96..128 spills with 4 warps at 64 x 32 and 32 x 64 (50-200 bytes
        # at 255 registers), and so does 64 x 32 with 8 warps and 2 stages under Triton 3.9 (64 bytes; 200 registers
        # under 3.6); with one stage it takes 160-183 under both, 32 x 64 with two 216-224. Head_dim 256's 32 x 32
        # spilled 30-60 bytes with 2 stages; 162 registers with one. The sliding window's bounds pushed head_dim 64's
        # 64 x 64 with 4 warps and 2 stages to 4-12 bytes of spill (Triton 3.9): 8 warps there.
        "dkdv": {64: [(64, 64, 8, 2), (32, 64, 4, 2)], 128: [(64, 32, 8, 1), (32, 64, 8, 2)], 256: [(32, 32, 8, 1)]},
        "dq": {64: [(64, 64, 4, 2), (64, 32, 4, 2)], 128: [(64, 32, 4, 2), (64, 64, 8, 2)], 256: [(64, 32, 8, 2)]},
    },
    # fp32 runs exact ("ieee") dots without tensor cores: the 16-bit tiles spilled 6-32 KB per thread there and were
    # slow to compile; these spill 0-0.6 KB. One candidate each: nothing to time.
    "fp32": {
        "fwd": {64: [(32, 32, 4, 2)], 128: [(32, 32, 8, 2)], 256: [(16, 32, 8, 2)]},
        "dkdv": {64: [(32, 32, 8, 2)], 128: [(32, 16, 8, 2)], 256: [(16, 16, 8, 2)]},
        "dq": {64: [(32, 32, 4, 2)], 128: [(32, 32, 4, 2)], 256: [(16, 32, 8, 2)]},
    },
}
_TILE_INTERPRETER = (16, 16, 1, 1)  # the interpreter runs one program at a time: small tiles, one candidate


def tiles(kernel: str, dtype, block_d: int) -> list[tuple[int, int, int, int]]:
    """The candidate tiles of `kernel` ("fwd", "dkdv", "dq") for inputs of `dtype` (a torch or Triton dtype)."""
    if _interpreting():
        return [_TILE_INTERPRETER]
    table = _TILES["fp32" if str(dtype) in ("torch.float32", "fp32") else "16bit"][kernel]
    return table[min(b for b in table if b >= block_d)]


def seqlen_bucket_of(max_seqlen: int) -> int:
    """The autotuner's sequence-length key: the tiles that win on short sequences (a test step's) need not win on
    long ones, so each power of two tunes apart; 128 and shorter share one, as do 16384 and longer."""
    return min(max(triton.next_power_of_2(max_seqlen), 128), 16384)


def _tile_of(config: triton.Config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _autotuned(kernel: str):
    """triton.autotune over every tile `kernel` may use; each launch keeps only its dtype's and head_dim's."""
    if _interpreting():
        candidates = [_TILE_INTERPRETER]  # one config: the autotuner times nothing
    else:
        candidates = sorted({t for by_dtype in _TILES.values() for bucket in by_dtype[kernel].values() for t in bucket})

    def prune(configs, named_args, **kwargs):
        wanted = tiles(kernel, named_args["Q"].dtype, kwargs["BLOCK_D"])
        return [c for c in configs if _tile_of(c) in wanted]

    return triton.autotune(
        configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in candidates],
        # the autotuner adds every tensor argument's dtype to the key; TOKENS' blocks visit every tile (some skipped)
        key=["head_dim", "seqlen_bucket", "CAUSAL", "TOKENS"],
        prune_configs_by={"early_config_prune": prune},
        cache_results=True,
    )


@triton.jit
def _tile_offsets(tokens, head, stride_t, stride_h, dims):
    """Element offsets of a [tokens, BLOCK_D] tile of one head, in int64: tokens * stride_t passes 2**31
    (e.g. 524,288 tokens x 32 heads x 128) where int32 would wrap to a negative address."""
    return tokens.to(tl.int64)[:, None] * stride_t + tl.cast(head, tl.int64) * stride_h + dims[None, :]


@triton.jit
def _lse_offsets(head, total_tokens, tokens):
    """Offsets into a (heads, total_tokens) fp32 row-statistics buffer (lse, delta), in int64."""
    return tl.cast(head, tl.int64) * total_tokens + tokens


@triton.jit
def _load_rows(ptr, tokens, head, stride_t, stride_h, token_ok, dims, head_dim):
    """A [tokens, BLOCK_D] tile of one head; zeros outside the sequence and past head_dim."""
    return tl.load(
        ptr + _tile_offsets(tokens, head, stride_t, stride_h, dims),
        mask=token_ok[:, None] & (dims < head_dim)[None, :],
        other=0.0,
    )


@triton.jit
def _token_places(Index, Document, places, token_ok, TOKENS: tl.constexpr):
    """(positions, documents) the mask compares for the tokens at `places` in the program's sequence: the places
    themselves (documents unused), or with TOKENS (the sequence is the whole tensor) their global indices and
    document ids, loaded as int32 (below 2**31, TokenMask's rule: int64 [rows, keys] compares cost the dK/dV
    kernel 60 registers at head_dim 128, and a spill)."""
    positions = places
    documents = places
    if TOKENS:
        positions = tl.load(Index + places, mask=token_ok, other=0).to(tl.int32)
        documents = tl.load(Document + places, mask=token_ok, other=0).to(tl.int32)
    return positions, documents


@triton.jit
def _visible(
    keep,
    rows,
    keys,
    row_documents,
    key_documents,
    window,
    CAUSAL: tl.constexpr,
    SLIDING: tl.constexpr,
    TOKENS: tl.constexpr,
):
    """keep [rows, keys], narrowed to the keys each row sees: with TOKENS those of its document, with CAUSAL the
    row's and earlier ones, with SLIDING only the last window + 1 of those (rows, keys: their positions)."""
    if TOKENS:
        keep = keep & (row_documents[:, None] == key_documents[None, :])
    if CAUSAL:
        keep = keep & (keys[None, :] <= rows[:, None])
    if SLIDING:
        keep = keep & (keys[None, :] >= rows[:, None] - window)
    return keep


@triton.jit
def _key_range(
    start_m,
    key_count,
    window,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    SLIDING: tl.constexpr,
    TOKENS: tl.constexpr,
):
    """(first, end) of the keys a query block starting at start_m may see: causal stops at its last row, a window
    starts at its first row's window's block. With TOKENS every key: the indices say nothing about the places."""
    first = 0
    end = key_count
    if not TOKENS:
        if CAUSAL:
            end = tl.minimum(key_count, start_m + BLOCK_M)
        if SLIDING:
            first = (tl.maximum(start_m - window, 0) // BLOCK_N) * BLOCK_N
    return first, end


@triton.jit
def _query_range(
    start_n,
    query_count,
    window,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    SLIDING: tl.constexpr,
    TOKENS: tl.constexpr,
):
    """(first, end) of the queries that may see a key block starting at start_n: causal starts at its block,
    a window stops past its last key's window. With TOKENS every query."""
    first = 0
    end = query_count
    if not TOKENS:
        if CAUSAL:  # earlier queries never see these keys
            first = (start_n // BLOCK_M) * BLOCK_M
        if SLIDING:  # queries past the window of the block's last key never see it
            end = tl.minimum(query_count, start_n + BLOCK_N + window)
    return first, end


@triton.jit
def _program_sequence(CuSeqlens, heads, total_tokens, total_keys, ONE_BLOCK: tl.constexpr):
    """(head, first token, query count, key count) of this program's sequence. Grid axis 0 enumerates
    sequence * heads + head (CUDA allows 2**31 - 1 programs there, but only 65,535 on axes 1 and 2); axis 1 is the
    block in the sequence. ONE_BLOCK: no cu_seqlens, every query (total_tokens) against every key (total_keys)."""
    head = tl.program_id(0) % heads
    if ONE_BLOCK:
        start = 0
        query_count = total_tokens
        key_count = total_keys
    else:
        seq = tl.program_id(0) // heads
        start = tl.load(CuSeqlens + seq)
        query_count = tl.load(CuSeqlens + seq + 1) - start
        key_count = query_count
    return head, start, query_count, key_count


@_autotuned("fwd")
@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    CuSeqlens,
    QIndex,
    QDocument,
    KIndex,
    KDocument,
    scale_log2,
    window,
    total_tokens,
    total_keys,
    q_heads,
    group_size,
    head_dim,
    seqlen_bucket,  # read by the autotuner only (its key)
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    CAUSAL: tl.constexpr,
    SLIDING: tl.constexpr,
    TOKENS: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    head, start, query_count, key_count = _program_sequence(CuSeqlens, q_heads, total_tokens, total_keys, ONE_BLOCK)
    kv_head = head // group_size
    start_m = tl.program_id(1) * BLOCK_M
    if start_m < query_count:
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < query_count
        dims = tl.arange(0, BLOCK_D)
        q = _load_rows(Q, start + rows, head, stride_qt, stride_qh, row_ok, dims, head_dim)
        row_places, row_documents = _token_places(QIndex, QDocument, rows, row_ok, TOKENS)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        first_n, end_n = _key_range(start_m, key_count, window, BLOCK_M, BLOCK_N, CAUSAL, SLIDING, TOKENS)
        for start_n in range(first_n, end_n, BLOCK_N):
            keys = start_n + tl.arange(0, BLOCK_N)
            key_ok = keys < key_count
            key_places, key_documents = _token_places(KIndex, KDocument, keys, key_ok, TOKENS)
            keep = _visible(
                key_ok[None, :], row_places, key_places, row_documents, key_documents, window, CAUSAL, SLIDING, TOKENS
            )
            needed = True
            if TOKENS:  # no loop bound skips a tile whose mask is empty: skip its dot products here
                needed = tl.max(keep.to(tl.int32)) > 0
            if needed:
                k = _load_rows(K, start + keys, kv_head, stride_kt, stride_kh, key_ok, dims, head_dim)
                v = _load_rows(V, start + keys, kv_head, stride_vt, stride_vh, key_ok, dims, head_dim)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
                s = tl.where(keep, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_ref = m_new
                if SLIDING or TOKENS:  # a row may see none of the block's keys (yet): nothing to rescale
                    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_ref)
                p = tl.exp2(s - m_ref[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
                m_i = m_new
        if SLIDING or TOKENS:  # a row may see no key at all (past the sequence's end, or masked): out 0, lse -inf
            l_i = tl.where(l_i == 0.0, 1.0, l_i)
        acc = acc / l_i[:, None]
        tl.store(
            Out + _tile_offsets(start + rows, head, stride_ot, stride_oh, dims),
            acc.to(Out.dtype.element_ty),
            mask=row_ok[:, None] & (dims < head_dim)[None, :],
        )
        tl.store(
            Lse + _lse_offsets(head, total_tokens, start + rows), (m_i + tl.log2(l_i)) / 1.4426950408889634, mask=row_ok
        )


@triton.jit
def _bwd_preprocess(
    Out,
    DOut,
    Delta,
    total_tokens,
    head_dim,
    stride_ot,
    stride_oh,
    stride_dt,
    stride_dh,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O), the softmax backward's correction term, per (head, token)."""
    tokens = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1)
    token_ok = tokens < total_tokens
    dims = tl.arange(0, BLOCK_D)
    o = _load_rows(Out, tokens, head, stride_ot, stride_oh, token_ok, dims, head_dim)
    do = _load_rows(DOut, tokens, head, stride_dt, stride_dh, token_ok, dims, head_dim)
    tl.store(
        Delta + _lse_offsets(head, total_tokens, tokens), tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=token_ok
    )


@triton.jit
def _recomputed_probabilities(q, k, lse, keep, scale, PRECISION: tl.constexpr):
    """softmax probabilities of a [rows, keys] tile recomputed from the saved logsumexp (0 where not kept)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (scale * 1.4426950408889634)
    return tl.where(keep, tl.exp2(s - lse[:, None] * 1.4426950408889634), 0.0)


@_autotuned("dkdv")
@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DOut,
    DK,
    DV,
    Lse,
    Delta,
    CuSeqlens,
    QIndex,
    QDocument,
    KIndex,
    KDocument,
    scale,
    window,
    total_tokens,
    total_keys,
    kv_heads,
    group_size,
    head_dim,
    seqlen_bucket,  # read by the autotuner only (its key)
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_dkt,
    stride_dkh,
    stride_dvt,
    stride_dvh,
    CAUSAL: tl.constexpr,
    SLIDING: tl.constexpr,
    TOKENS: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dk, dv for one key block of one kv head, summed over the q heads that read it (GQA)."""
    kv_head, start, query_count, key_count = _program_sequence(CuSeqlens, kv_heads, total_tokens, total_keys, ONE_BLOCK)
    start_n = tl.program_id(1) * BLOCK_N
    if start_n < key_count:
        keys = start_n + tl.arange(0, BLOCK_N)
        key_ok = keys < key_count
        dims = tl.arange(0, BLOCK_D)
        k = _load_rows(K, start + keys, kv_head, stride_kt, stride_kh, key_ok, dims, head_dim)
        v = _load_rows(V, start + keys, kv_head, stride_vt, stride_vh, key_ok, dims, head_dim)
        key_places, key_documents = _token_places(KIndex, KDocument, keys, key_ok, TOKENS)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        first_m, end_m = _query_range(start_n, query_count, window, BLOCK_M, BLOCK_N, CAUSAL, SLIDING, TOKENS)
        for head in range(kv_head * group_size, (kv_head + 1) * group_size):
            for start_m in range(first_m, end_m, BLOCK_M):
                rows = start_m + tl.arange(0, BLOCK_M)
                row_ok = rows < query_count
                row_places, row_documents = _token_places(QIndex, QDocument, rows, row_ok, TOKENS)
                keep = _visible(
                    row_ok[:, None] & key_ok[None, :],
                    row_places,
                    key_places,
                    row_documents,
                    key_documents,
                    window,
                    CAUSAL,
                    SLIDING,
                    TOKENS,
                )
                needed = True
                if TOKENS:  # as in the forward: skip a tile whose mask is empty
                    needed = tl.max(keep.to(tl.int32)) > 0
                if needed:
                    q = _load_rows(Q, start + rows, head, stride_qt, stride_qh, row_ok, dims, head_dim)
                    do = _load_rows(DOut, start + rows, head, stride_dot, stride_doh, row_ok, dims, head_dim)
                    lse = tl.load(Lse + _lse_offsets(head, total_tokens, start + rows), mask=row_ok, other=0.0)
                    delta = tl.load(Delta + _lse_offsets(head, total_tokens, start + rows), mask=row_ok, other=0.0)
                    p = _recomputed_probabilities(q, k, lse, keep, scale, PRECISION)
                    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
                    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                    ds = p * (dp - delta[:, None])
                    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        mask = key_ok[:, None] & (dims < head_dim)[None, :]
        tl.store(
            DK + _tile_offsets(start + keys, kv_head, stride_dkt, stride_dkh, dims),
            (dk * scale).to(DK.dtype.element_ty),
            mask=mask,
        )
        tl.store(
            DV + _tile_offsets(start + keys, kv_head, stride_dvt, stride_dvh, dims),
            dv.to(DV.dtype.element_ty),
            mask=mask,
        )


@_autotuned("dq")
@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DOut,
    DQ,
    Lse,
    Delta,
    CuSeqlens,
    QIndex,
    QDocument,
    KIndex,
    KDocument,
    scale,
    window,
    total_tokens,
    total_keys,
    q_heads,
    group_size,
    head_dim,
    seqlen_bucket,  # read by the autotuner only (its key)
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_dqt,
    stride_dqh,
    CAUSAL: tl.constexpr,
    SLIDING: tl.constexpr,
    TOKENS: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dq for one query block of one q head."""
    head, start, query_count, key_count = _program_sequence(CuSeqlens, q_heads, total_tokens, total_keys, ONE_BLOCK)
    kv_head = head // group_size
    start_m = tl.program_id(1) * BLOCK_M
    if start_m < query_count:
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < query_count
        dims = tl.arange(0, BLOCK_D)
        q = _load_rows(Q, start + rows, head, stride_qt, stride_qh, row_ok, dims, head_dim)
        do = _load_rows(DOut, start + rows, head, stride_dot, stride_doh, row_ok, dims, head_dim)
        lse = tl.load(Lse + _lse_offsets(head, total_tokens, start + rows), mask=row_ok, other=0.0)
        delta = tl.load(Delta + _lse_offsets(head, total_tokens, start + rows), mask=row_ok, other=0.0)
        row_places, row_documents = _token_places(QIndex, QDocument, rows, row_ok, TOKENS)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        first_n, end_n = _key_range(start_m, key_count, window, BLOCK_M, BLOCK_N, CAUSAL, SLIDING, TOKENS)
        for start_n in range(first_n, end_n, BLOCK_N):
            keys = start_n + tl.arange(0, BLOCK_N)
            key_ok = keys < key_count
            key_places, key_documents = _token_places(KIndex, KDocument, keys, key_ok, TOKENS)
            keep = _visible(
                row_ok[:, None] & key_ok[None, :],
                row_places,
                key_places,
                row_documents,
                key_documents,
                window,
                CAUSAL,
                SLIDING,
                TOKENS,
            )
            needed = True
            if TOKENS:  # as in the forward: skip a tile whose mask is empty
                needed = tl.max(keep.to(tl.int32)) > 0
            if needed:
                k = _load_rows(K, start + keys, kv_head, stride_kt, stride_kh, key_ok, dims, head_dim)
                v = _load_rows(V, start + keys, kv_head, stride_vt, stride_vh, key_ok, dims, head_dim)
                p = _recomputed_probabilities(q, k, lse, keep, scale, PRECISION)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                ds = p * (dp - delta[:, None])
                dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        tl.store(
            DQ + _tile_offsets(start + rows, head, stride_dqt, stride_dqh, dims),
            (dq * scale).to(DQ.dtype.element_ty),
            mask=row_ok[:, None] & (dims < head_dim)[None, :],
        )


def grid(sequence_heads: int, max_seqlen: int, block: int) -> tuple[int, int]:
    """(sequences x heads, blocks per sequence): the large product on axis 0, which CUDA lets reach 2**31 - 1."""
    blocks = triton.cdiv(max_seqlen, block)
    if blocks > MAX_GRID_Y:
        raise ValueError(
            f"max_seqlen {max_seqlen} needs {blocks} blocks of {block} tokens, above CUDA's {MAX_GRID_Y} on a grid "
            "axis: split the sequence"
        )
    return sequence_heads, blocks


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs stay exact; 16-bit use tensor cores anyway


class TokenMask(NamedTuple):
    """Which keys each query of a block sees (a ring attention block: q and k hold different tokens): query i sees
    key j iff q_document[i] == k_document[j], with causal k_index[j] <= q_index[i], and with window >= 0
    q_index[i] - k_index[j] <= window (-1: no window). Indices and documents: 1-D int32 or int64 tensors, contiguous,
    one entry per token, on q's device, every value within int32's range (the kernels compare them in int32)."""

    q_index: torch.Tensor
    q_document: torch.Tensor
    k_index: torch.Tensor
    k_document: torch.Tensor
    causal: bool
    window: int = -1


class _Launch(NamedTuple):
    """What the three kernels share of one call: the sequences (cu_seqlens, or None: one block, every query of q
    against every key of k, which are different tokens), the longest query and key runs, the mask options (tokens:
    the per-token mask, one block only)."""

    cu_seqlens: torch.Tensor | None
    sequences: int
    max_queries: int
    max_keys: int
    causal: bool
    scale: float
    window: int
    tokens: TokenMask | None

    def token_pointers(self) -> tuple:
        return (None,) * 4 if self.tokens is None else tuple(self.tokens[:4])

    def options(self, q: torch.Tensor) -> dict:
        return dict(
            CAUSAL=self.causal,
            SLIDING=self.window >= 0,
            TOKENS=self.tokens is not None,
            ONE_BLOCK=self.cu_seqlens is None,
            BLOCK_D=max(16, triton.next_power_of_2(q.shape[2])),
            PRECISION=_precision(q.dtype),
        )

    def seqlen_bucket(self) -> int:
        return seqlen_bucket_of(max(self.max_queries, self.max_keys))


def _forward(q, k, v, out, lse, launch: _Launch) -> None:
    total, q_heads, head_dim = q.shape
    _fwd_kernel[lambda meta: grid(launch.sequences * q_heads, launch.max_queries, meta["BLOCK_M"])](
        q,
        k,
        v,
        out,
        lse,
        launch.cu_seqlens,
        *launch.token_pointers(),
        launch.scale * LOG2E,
        max(launch.window, 0),
        total,
        k.shape[0],
        q_heads,
        q_heads // k.shape[1],
        head_dim,
        launch.seqlen_bucket(),
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        **launch.options(q),
    )


def _backward(dout, q, k, v, dq, dk, dv, lse, delta, launch: _Launch) -> None:
    """dq, dk, dv (written, not accumulated) from lse and delta = rowsum(dout * out), both (q_heads, q tokens)."""
    total, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    strides = (
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        dout.stride(0),
        dout.stride(1),
    )
    shared = (launch.cu_seqlens, *launch.token_pointers(), launch.scale, max(launch.window, 0), total, k.shape[0])
    _bwd_dkdv_kernel[lambda meta: grid(launch.sequences * kv_heads, launch.max_keys, meta["BLOCK_N"])](
        q,
        k,
        v,
        dout,
        dk,
        dv,
        lse,
        delta,
        *shared,
        kv_heads,
        q_heads // kv_heads,
        head_dim,
        launch.seqlen_bucket(),
        *strides,
        dk.stride(0),
        dk.stride(1),
        dv.stride(0),
        dv.stride(1),
        **launch.options(q),
    )
    _bwd_dq_kernel[lambda meta: grid(launch.sequences * q_heads, launch.max_queries, meta["BLOCK_M"])](
        q,
        k,
        v,
        dout,
        dq,
        lse,
        delta,
        *shared,
        q_heads,
        q_heads // kv_heads,
        head_dim,
        launch.seqlen_bucket(),
        *strides,
        dq.stride(0),
        dq.stride(1),
        **launch.options(q),
    )


def softmax_delta(out, dout) -> torch.Tensor:
    """delta = rowsum(dout * out) of (tokens, heads, D) tensors: (heads, tokens) fp32, the backward's correction."""
    total, heads, head_dim = out.shape
    delta = torch.empty(heads, total, device=out.device, dtype=torch.float32)
    _bwd_preprocess[(triton.cdiv(total, 64), heads)](
        out,
        dout,
        delta,
        total,
        head_dim,
        out.stride(0),
        out.stride(1),
        dout.stride(0),
        dout.stride(1),
        BLOCK_M=64,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
    )
    return delta


def flash_attn_forward(q, k, v, cu_seqlens, max_seqlen: int, causal: bool, scale: float, window: int = -1):
    """q (T, Hq, D), k/v (T, Hk, D) -> (out (T, Hq, D), lse (Hq, T) fp32). Inputs are validated by the caller;
    tokens may be strided (stride(-1) must be 1). window >= 0 (causal only): each query sees the window keys
    before it and itself; -1: no window."""
    total, q_heads, head_dim = q.shape
    out = torch.empty((total, q_heads, head_dim), device=q.device, dtype=q.dtype)
    lse = torch.empty(q_heads, total, device=q.device, dtype=torch.float32)
    launch = _Launch(cu_seqlens, cu_seqlens.numel() - 1, max_seqlen, max_seqlen, causal, scale, window, None)
    _forward(q, k, v, out, lse, launch)
    return out, lse


def flash_attn_backward(
    dout, q, k, v, out, lse, cu_seqlens, max_seqlen: int, causal: bool, scale: float, window: int = -1
):
    """Gradients (dq, dk, dv) of flash_attn_forward, in the inputs' dtypes, contiguous."""
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk, dv = (torch.empty(k.shape, device=q.device, dtype=q.dtype) for _ in range(2))
    launch = _Launch(cu_seqlens, cu_seqlens.numel() - 1, max_seqlen, max_seqlen, causal, scale, window, None)
    _backward(dout, q, k, v, dq, dk, dv, lse, softmax_delta(out, dout), launch)
    return dq, dk, dv


def _block_launch(q, k, scale: float, mask: TokenMask | None) -> _Launch:
    causal, window = (False, -1) if mask is None else (mask.causal, mask.window)
    return _Launch(None, 1, q.shape[0], k.shape[0], causal, scale, window, mask)


def flash_attn_block_forward(q, k, v, scale: float, mask: TokenMask | None = None, out_dtype=torch.float32):
    """One block: every query of q (M, Hq, D) against every key of k, v (N, Hk, D), different tokens; mask None:
    every query sees every key. Returns out (M, Hq, D) in out_dtype and lse (Hq, M) fp32; a query no key reaches
    gets out 0 and lse -inf. Validated by the caller; tokens may be strided (stride(-1) must be 1)."""
    out = torch.empty(q.shape, device=q.device, dtype=out_dtype)
    lse = torch.empty(q.shape[1], q.shape[0], device=q.device, dtype=torch.float32)
    _forward(q, k, v, out, lse, _block_launch(q, k, scale, mask))
    return out, lse


def flash_attn_block_backward(dout, q, k, v, lse, delta, scale: float, mask: TokenMask | None = None, grad_dtype=None):
    """This block's (dq, dk, dv) in grad_dtype (None: q's) given the whole attention's lse and delta = rowsum(dout *
    out) over all its blocks (softmax_delta; both (Hq, M) fp32, lse -inf where no key was reached): ring
    attention's merged ones, so that the blocks' gradients add up to the whole attention's."""
    grad_dtype = q.dtype if grad_dtype is None else grad_dtype
    dq = torch.empty(q.shape, device=q.device, dtype=grad_dtype)
    dk, dv = (torch.empty(k.shape, device=q.device, dtype=grad_dtype) for _ in range(2))
    _backward(dout, q, k, v, dq, dk, dv, lse, delta, _block_launch(q, k, scale, mask))
    return dq, dk, dv
