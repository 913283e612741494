"""Flash-attention: (batch, seq, heads, dim) and packed variable-length (tokens, heads, dim) inputs, GQA/MQA.

CUDA tensors run pytrain's Triton kernels (kernels/flash_attn_triton.py) as torch.library custom ops (autograd
and torch.compile see one op each way). bf16 and fp32 CPU tensors on a CPU with AVX512-BF16 run pytrain's own
kernels (attention_cpu.py: 2-3x PyTorch's there). Other CPU tensors run PyTorch's SDPA (its CPU flash kernel), one
document at a time for packed input, so no mask quadratic in the packed length is ever built; 16-bit inputs on a
CPU without 16-bit units run it on fp32 copies (pytrain.kernels.linear says why).

Sliding-window attention takes flash-attn's window_size=(left, right), causal only: query i sees keys i - left .. i
(transformers' sliding_window=W is window_size=(W - 1, 0)). On the CPU, SDPA then runs over blocks of queries, each
with the keys its window reaches and a (block, block + left) mask, so the work and memory stay linear in the
sequence length.

PYTRAIN_TRITON_CPU=1 runs the Triton kernels on CPU tensors through Triton's interpreter instead (tests
only: it is slow); that needs TRITON_INTERPRET=1 set before triton is first imported.
"""

import itertools
import math

import torch
import torch.nn.functional as F

from . import attention_cpu
from ._backend import runs_triton
from ._checks import check_same_device, check_tensor
from .linear import multiplies_in_fp32
from .packed import PackedSequences

ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


@torch.library.custom_op("pytrain::flash_attn_varlen_forward", mutates_args=())
def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool,
    scale: float,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    from pytrain.triton.flash_attn_triton import flash_attn_forward

    return flash_attn_forward(q, k, v, cu_seqlens, max_seqlen, causal, scale, window)


@_forward.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, causal, scale, window):
    return attention_cpu.empty_output_and_lse(q)


@torch.library.custom_op("pytrain::flash_attn_varlen_backward", mutates_args=())
def _backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool,
    scale: float,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from pytrain.triton.flash_attn_triton import flash_attn_backward

    return flash_attn_backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, scale, window)


@_backward.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, scale, window):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, causal, scale, window = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.causal, ctx.scale, ctx.window = max_seqlen, causal, scale, window


def _autograd_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()  # the kernels take strided tokens and heads
    dq, dk, dv = _backward(dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.causal, ctx.scale, ctx.window)
    return dq, dk, dv, None, None, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def _check_qkv(q, k, v, dims: int, layout: str):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dtypes=ATTENTION_DTYPES, contiguous=False)
        if t.dim() != dims:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension (call .contiguous() on it first)")
    check_same_device(q=q, k=k, v=v)
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on every dimension but heads")
    q_heads, kv_heads, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q heads ({q_heads}) must be a multiple of k/v heads ({kv_heads})")
    if not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be within 1..{MAX_HEAD_DIM}, got {head_dim}")


def _scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be positive, got {softmax_scale}")
    return float(softmax_scale)


def _window(window_size, causal: bool) -> int:
    """flash-attn's window_size (left, right) as the left window (-1: none); only causal windows run here."""
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}")
    left, right = window_size
    for name, side in (("left", left), ("right", right)):
        if isinstance(side, bool) or not isinstance(side, int) or side < -1:
            raise ValueError(f"window_size's {name} must be an int >= -1 (-1: unbounded), got {side!r}")
    if left >= 0 and not causal:
        raise ValueError(f"window_size={tuple(window_size)} needs causal=True: only causal sliding windows run here")
    if right > 0 or (right == 0 and not causal):
        raise ValueError(
            f"window_size's right must be -1, or 0 with causal=True (only causal windows run), got {right}"
        )
    return left


def _sdpa(q, k, v, causal: bool, scale: float, window: int = -1):
    """SDPA on (..., seq, heads, dim) tensors; window >= 0: each query sees itself and the window keys before it,
    computed over blocks of queries (the module docstring)."""
    seq = q.shape[-3]
    if 0 <= window < seq - 1:
        return _sdpa_windowed(q, k, v, scale, window)
    out = _cpu_sdpa(q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2), causal, scale)
    return out.transpose(-3, -2)


def _cpu_sdpa(q, k, v, causal: bool, scale: float, mask=None):
    """SDPA's CPU flash kernel over (batch, heads, seq, dim) tensors (k, v may have fewer heads), a boolean mask
    of the keys each query sees; on fp32 copies where the CPU has no 16-bit units (_AttentionInFp32)."""
    if multiplies_in_fp32(q):
        additive = None if mask is None else torch.zeros(mask.shape, device=q.device).masked_fill_(~mask, -math.inf)
        return _AttentionInFp32.apply(q, k, v, causal, scale, additive)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=k.shape[-3] != q.shape[-3]
    )


class _AttentionInFp32(torch.autograd.Function):
    """The CPU flash kernel on fp32 copies of 16-bit q, k, v: its own 16-bit backward multiplies in 16 bits,
    6x its fp32 time on an AVX2 CPU (pytrain.kernels.linear says why). Keeps the 16-bit q, k, v and output and
    the fp32 log-sum-exp for the backward, as the 16-bit kernel would; mask: additive fp32 or None."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, mask):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.float(), k.float(), v.float(), 0.0, causal, attn_mask=mask, scale=scale
        )
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, mask = ctx.saved_tensors
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *(t.float() for t in (grad_out, q, k, v, out)), lse, 0.0, ctx.causal, attn_mask=mask, scale=ctx.scale
        )
        return (*(grad.to(q.dtype) for grad in grads), None, None, None)


_WINDOW_BLOCK = 256  # queries per SDPA call in a sliding window (at least the window itself)


def _sdpa_windowed(q, k, v, scale: float, window: int):
    seq, block = q.shape[-3], max(window + 1, _WINDOW_BLOCK)
    outs = []
    for first in range(0, seq, block):
        last = min(first + block, seq)
        reach = max(0, first - window)  # the first key the block's first query sees
        rows = torch.arange(first, last, device=q.device)[:, None]
        keys = torch.arange(reach, last, device=q.device)[None, :]
        mask = (keys <= rows) & (keys >= rows - window)
        out = _cpu_sdpa(
            q[..., first:last, :, :].transpose(-3, -2),
            k[..., reach:last, :, :].transpose(-3, -2),
            v[..., reach:last, :, :].transpose(-3, -2),
            False,
            scale,
            mask,
        )
        outs.append(out.transpose(-3, -2))
    return torch.cat(outs, dim=-3)


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
) -> torch.Tensor:
    """softmax(q k^T * scale) v over (batch, seq, heads, head_dim) inputs; k/v may have fewer heads (GQA).
    window_size=(left, 0) with causal: each query sees only itself and the `left` keys before it."""
    _check_qkv(q, k, v, 4, "(batch, seq, heads, head_dim)")
    scale = _scale(softmax_scale, q.shape[-1])
    window = _window(window_size, causal)
    batch, seq = q.shape[:2]
    triton = runs_triton(q.device)
    if not triton and not attention_cpu.applies(q, k, window):
        return _sdpa(q, k, v, causal, scale, window)
    # A view whenever (batch, seq) merge (q, k, v as slices of one fused qkv do): the kernels take strided tokens.
    flat = [t.reshape(batch * seq, *t.shape[2:]) for t in (q, k, v)]
    if not triton:
        return attention_cpu.attention(*flat, list(range(0, (batch + 1) * seq, seq)), causal, scale).view(q.shape)
    cu_seqlens = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=q.device)
    return _forward(*flat, cu_seqlens, seq, causal, scale, window)[0].view(q.shape)


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: "torch.Tensor | PackedSequences",
    max_seqlen: int | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
) -> torch.Tensor:
    """Attention within each packed sequence: tokens cu_seqlens[i]:cu_seqlens[i+1] see only each other (and with
    window_size=(left, 0), causal, only the `left` tokens of their sequence before them).

    q (total_tokens, heads, head_dim), k/v (total_tokens, kv_heads, head_dim); tokens and heads may be strided
    (views of a fused qkv projection), the last dimension must be contiguous.
    cu_seqlens: a PackedSequences (checked once per micro-batch: no host synchronization here), or an int32/int64
    tensor (num_seqs + 1,) from 0 up to total_tokens, non-decreasing, which this call checks by reading it back
    to the host. max_seqlen: >= the longest sequence; None: the longest sequence.
    """
    _check_qkv(q, k, v, 3, "(total_tokens, heads, head_dim)")
    scale = _scale(softmax_scale, q.shape[-1])
    window = _window(window_size, causal)
    packed = cu_seqlens if isinstance(cu_seqlens, PackedSequences) else None
    if packed is not None:
        packed.check_tokens("q", q, q.shape[0])
        bounds, longest, device_bounds = packed.bounds, packed.max_seqlen, packed.cu_seqlens
    else:
        bounds = _check_cu_seqlens(cu_seqlens, q)
        longest, device_bounds = max(b - a for a, b in itertools.pairwise(bounds)), cu_seqlens.to(torch.int32)
    if max_seqlen is None:
        max_seqlen = longest
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < longest:
        raise ValueError(f"max_seqlen ({max_seqlen}) must be an int >= the longest sequence ({longest})")
    if not runs_triton(q.device):
        if attention_cpu.applies(q, k, window):
            return attention_cpu.attention(q, k, v, bounds, causal, scale)
        # One document at a time, each as a batch of one: SDPA's CPU flash kernel takes 4-D input only
        # (3-D input falls back to its slower math path, which materializes the scores).
        return torch.cat(
            [
                _sdpa(q[None, s:e], k[None, s:e], v[None, s:e], causal, scale, window)[0]
                for s, e in itertools.pairwise(bounds)
                if e > s
            ]
            or [q[:0]]
        )
    return _forward(q, k, v, device_bounds, max_seqlen, causal, scale, window)[0]


def _check_cu_seqlens(cu_seqlens, q) -> list[int]:
    """Checks a cu_seqlens tensor's boundaries (one host sync) and returns them as a list."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError("cu_seqlens must be a PackedSequences or an int32 or int64 tensor")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    check_same_device(q=q, cu_seqlens=cu_seqlens)
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[0]:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at the token count {q.shape[0]}, got {bounds[0]}..{bounds[-1]}"
        )
    if min(b - a for a, b in itertools.pairwise(bounds)) < 0:
        raise ValueError("cu_seqlens must be non-decreasing")
    return bounds
