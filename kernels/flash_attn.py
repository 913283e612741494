"""Flash-attention in Triton: forward and backward, causal or not, packed variable-length sequences, GQA.

One layout serves every case: q (total_tokens, q_heads, head_dim) and k, v (total_tokens, kv_heads,
head_dim), packed back to back, with cu_seqlens (num_seqs + 1,) int32 marking where each sequence
starts; a (batch, seq) input is the packed case with equal lengths. No token attends across a sequence
boundary, and nothing quadratic in the packed length is ever built. q head h reads kv head
h // (q_heads // kv_heads). Any head_dim up to 256 works: loads are masked up to the next power of two.

Softmax runs in base 2 (exp2) on scores pre-multiplied by scale * log2(e); the saved logsumexp is in
natural-log units, shape (q_heads, total_tokens), fp32. The backward recomputes the probabilities from
it (FlashAttention-2): one kernel accumulates dk and dv per key block over the q heads of its group,
another accumulates dq per query block, so no atomics are needed.

On machines without a GPU the same kernels run under TRITON_INTERPRET=1 (tests only; see
pytrain/kernels/flash_attn.py).
"""

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _load_rows(ptr, tokens, head, stride_t, stride_h, token_ok, dims, head_dim):
    """A [tokens, BLOCK_D] tile of one head; zeros outside the sequence and past head_dim."""
    return tl.load(
        ptr + tokens[:, None] * stride_t + head * stride_h + dims[None, :],
        mask=token_ok[:, None] & (dims < head_dim)[None, :],
        other=0.0,
    )


@triton.jit
def _program_sequence(CuSeqlens, heads):
    """(head, first token, length) of this program's sequence: grid axis 1 enumerates sequence * heads + head."""
    seq = tl.program_id(1) // heads
    start = tl.load(CuSeqlens + seq)
    return tl.program_id(1) % heads, start, tl.load(CuSeqlens + seq + 1) - start


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    CuSeqlens,
    scale_log2,
    total_tokens,
    q_heads,
    group_size,
    head_dim,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    head, start, length = _program_sequence(CuSeqlens, q_heads)
    kv_head = head // group_size
    start_m = tl.program_id(0) * BLOCK_M
    if start_m < length:
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < length
        dims = tl.arange(0, BLOCK_D)
        q = _load_rows(Q, start + rows, head, stride_qt, stride_qh, row_ok, dims, head_dim)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        end_n = tl.minimum(length, start_m + BLOCK_M) if CAUSAL else length
        for start_n in range(0, end_n, BLOCK_N):
            keys = start_n + tl.arange(0, BLOCK_N)
            key_ok = keys < length
            k = _load_rows(K, start + keys, kv_head, stride_kt, stride_kh, key_ok, dims, head_dim)
            v = _load_rows(V, start + keys, kv_head, stride_vt, stride_vh, key_ok, dims, head_dim)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            keep = key_ok[None, :]
            if CAUSAL:
                keep = keep & (keys[None, :] <= rows[:, None])
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(
            Out + (start + rows)[:, None] * stride_ot + head * stride_oh + dims[None, :],
            acc.to(Out.dtype.element_ty),
            mask=row_ok[:, None] & (dims < head_dim)[None, :],
        )
        tl.store(Lse + head * total_tokens + start + rows, (m_i + tl.log2(l_i)) / 1.4426950408889634, mask=row_ok)


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
    tl.store(Delta + head * total_tokens + tokens, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=token_ok)


@triton.jit
def _recomputed_probabilities(
    q, k, lse, rows, keys, row_ok, key_ok, scale, CAUSAL: tl.constexpr, PRECISION: tl.constexpr
):
    """softmax probabilities of a [rows, keys] tile recomputed from the saved logsumexp (0 where masked)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (scale * 1.4426950408889634)
    keep = row_ok[:, None] & key_ok[None, :]
    if CAUSAL:
        keep = keep & (keys[None, :] <= rows[:, None])
    return tl.where(keep, tl.exp2(s - lse[:, None] * 1.4426950408889634), 0.0)


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
    scale,
    total_tokens,
    kv_heads,
    group_size,
    head_dim,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dk, dv for one key block of one kv head, summed over the q heads that read it (GQA)."""
    kv_head, start, length = _program_sequence(CuSeqlens, kv_heads)
    start_n = tl.program_id(0) * BLOCK_N
    if start_n < length:
        keys = start_n + tl.arange(0, BLOCK_N)
        key_ok = keys < length
        dims = tl.arange(0, BLOCK_D)
        k = _load_rows(K, start + keys, kv_head, stride_kt, stride_kh, key_ok, dims, head_dim)
        v = _load_rows(V, start + keys, kv_head, stride_vt, stride_vh, key_ok, dims, head_dim)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        first_m = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0  # causal: earlier queries never see these keys
        for head in range(kv_head * group_size, (kv_head + 1) * group_size):
            for start_m in range(first_m, length, BLOCK_M):
                rows = start_m + tl.arange(0, BLOCK_M)
                row_ok = rows < length
                q = _load_rows(Q, start + rows, head, stride_qt, stride_qh, row_ok, dims, head_dim)
                do = _load_rows(DOut, start + rows, head, stride_dot, stride_doh, row_ok, dims, head_dim)
                lse = tl.load(Lse + head * total_tokens + start + rows, mask=row_ok, other=0.0)
                delta = tl.load(Delta + head * total_tokens + start + rows, mask=row_ok, other=0.0)
                p = _recomputed_probabilities(q, k, lse, rows, keys, row_ok, key_ok, scale, CAUSAL, PRECISION)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        mask = key_ok[:, None] & (dims < head_dim)[None, :]
        tl.store(
            DK + (start + keys)[:, None] * stride_dkt + kv_head * stride_dkh + dims[None, :],
            (dk * scale).to(DK.dtype.element_ty),
            mask=mask,
        )
        tl.store(
            DV + (start + keys)[:, None] * stride_dvt + kv_head * stride_dvh + dims[None, :],
            dv.to(DV.dtype.element_ty),
            mask=mask,
        )


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
    scale,
    total_tokens,
    q_heads,
    group_size,
    head_dim,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dq for one query block of one q head."""
    head, start, length = _program_sequence(CuSeqlens, q_heads)
    kv_head = head // group_size
    start_m = tl.program_id(0) * BLOCK_M
    if start_m < length:
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < length
        dims = tl.arange(0, BLOCK_D)
        q = _load_rows(Q, start + rows, head, stride_qt, stride_qh, row_ok, dims, head_dim)
        do = _load_rows(DOut, start + rows, head, stride_dot, stride_doh, row_ok, dims, head_dim)
        lse = tl.load(Lse + head * total_tokens + start + rows, mask=row_ok, other=0.0)
        delta = tl.load(Delta + head * total_tokens + start + rows, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        end_n = tl.minimum(length, start_m + BLOCK_M) if CAUSAL else length
        for start_n in range(0, end_n, BLOCK_N):
            keys = start_n + tl.arange(0, BLOCK_N)
            key_ok = keys < length
            k = _load_rows(K, start + keys, kv_head, stride_kt, stride_kh, key_ok, dims, head_dim)
            v = _load_rows(V, start + keys, kv_head, stride_vt, stride_vh, key_ok, dims, head_dim)
            p = _recomputed_probabilities(q, k, lse, rows, keys, row_ok, key_ok, scale, CAUSAL, PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        tl.store(
            DQ + (start + rows)[:, None] * stride_dqt + head * stride_dqh + dims[None, :],
            (dq * scale).to(DQ.dtype.element_ty),
            mask=row_ok[:, None] & (dims < head_dim)[None, :],
        )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"  # read by triton at import: fixed for the process


def _config(head_dim: int, backward: bool) -> dict:
    """Tile sizes and warps: big tiles for the tensor cores, small ones under the (slow) interpreter."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if _interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, num_warps=1)
    if block_d <= 64:
        return dict(BLOCK_M=128 if not backward else 64, BLOCK_N=64, BLOCK_D=block_d, num_warps=4)
    if block_d <= 128:
        return dict(
            BLOCK_M=128 if not backward else 64,
            BLOCK_N=64 if not backward else 32,
            BLOCK_D=block_d,
            num_warps=8 if not backward else 4,
        )
    return dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=block_d, num_warps=8)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs stay exact; 16-bit use tensor cores anyway


def _launch_options(cfg: dict) -> dict:
    return {} if _interpreting() else {"num_warps": cfg["num_warps"], "num_stages": 2}


def flash_attn_forward(q, k, v, cu_seqlens, max_seqlen: int, causal: bool, scale: float):
    """q (T, Hq, D), k/v (T, Hk, D) -> (out (T, Hq, D), lse (Hq, T) fp32). Inputs are validated by the caller."""
    total, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(q_heads, total, device=q.device, dtype=torch.float32)
    cfg = _config(head_dim, backward=False)
    grid = (triton.cdiv(max_seqlen, cfg["BLOCK_M"]), (cu_seqlens.numel() - 1) * q_heads)
    _fwd_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens,
        scale * LOG2E,
        total,
        q_heads,
        q_heads // kv_heads,
        head_dim,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        CAUSAL=causal,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_D=cfg["BLOCK_D"],
        PRECISION=_precision(q.dtype),
        **_launch_options(cfg),
    )
    return out, lse


def flash_attn_backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen: int, causal: bool, scale: float):
    """Gradients (dq, dk, dv) of flash_attn_forward, in the inputs' dtypes."""
    total, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    num_seqs = cu_seqlens.numel() - 1
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    cfg = _config(head_dim, backward=True)
    block_d, precision, options = cfg["BLOCK_D"], _precision(q.dtype), _launch_options(cfg)
    _bwd_preprocess[(triton.cdiv(total, 64), q_heads)](
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
        BLOCK_D=block_d,
    )
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
    _bwd_dkdv_kernel[(triton.cdiv(max_seqlen, cfg["BLOCK_N"]), num_seqs * kv_heads)](
        q,
        k,
        v,
        dout,
        dk,
        dv,
        lse,
        delta,
        cu_seqlens,
        scale,
        total,
        kv_heads,
        q_heads // kv_heads,
        head_dim,
        *strides,
        dk.stride(0),
        dk.stride(1),
        dv.stride(0),
        dv.stride(1),
        CAUSAL=causal,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_D=block_d,
        PRECISION=precision,
        **options,
    )
    _bwd_dq_kernel[(triton.cdiv(max_seqlen, cfg["BLOCK_M"]), num_seqs * q_heads)](
        q,
        k,
        v,
        dout,
        dq,
        lse,
        delta,
        cu_seqlens,
        scale,
        total,
        q_heads,
        q_heads // kv_heads,
        head_dim,
        *strides,
        dq.stride(0),
        dq.stride(1),
        CAUSAL=causal,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_D=block_d,
        PRECISION=precision,
        **options,
    )
    return dq, dk, dv
