"""bf16 and fp32 attention on CPUs with bf16 dot-product units (AVX512-BF16): pytrain._C's kernels
(csrc/cpu/attention.cpp).

    out = attention(q, k, v, bounds, causal, scale)   # q (tokens, heads, dim), k/v (tokens, kv_heads, dim)

PyTorch's CPU flash kernel multiplies bf16 through a generic loop wherever oneDNN's packed micro-kernels are
unavailable (CPUs without AMX, such as AMD Zen 4): about 70 GFLOP/s forward on two Zen 4 cores against
430 for a bf16 GEMM. These kernels run every product on one register-tiled micro-kernel (VDPBF16PS: bf16 pairs
summed into fp32; FMA for fp32), keep the softmax in fp32 and, like flash-attention, save only the output and
the log-sum-exp for a backward that recomputes the probabilities. fp32 takes them too on such a CPU (SDPA's
fp32 kernel is faster than its bf16 one but 1.3-1.8x slower than these). flash_attn.py routes CPU attention
here where `applies` (bf16 or fp32, no sliding window; everything else: GQA, causal or not, packed sequences,
strided tokens and heads); the forward and backward are torch.library custom ops.
"""

import importlib.util

import torch

from ._backend import DTYPE_CODES, extension, parallelism

# The kernels gather 16 tokens at a time with 32-bit byte offsets: token strides stay below 2^26 elements.
MAX_TOKEN_STRIDE = (1 << 26) - 1

# Read once at import, so that torch.compile traces `applies` as a constant: whether the CPU has the
# instructions (pytrain._C's own check agrees; the kernels refuse to run without them) and _C is built.
AVAILABLE = torch.cpu._is_avx512_bf16_supported() and importlib.util.find_spec("pytrain._C") is not None
_switch = {"on": AVAILABLE}


def use_kernels(on: bool) -> bool:
    """Whether bf16 and fp32 CPU attention take these kernels (where AVAILABLE) or PyTorch's SDPA; returns the
    previous setting. For tests and timings."""
    previous, _switch["on"] = _switch["on"], bool(on) and AVAILABLE
    return previous


def applies(q: torch.Tensor, k: torch.Tensor, window: int) -> bool:
    """Whether these kernels serve this (already checked) attention call; v's strides do not matter."""
    return (
        _switch["on"]
        and q.device.type == "cpu"
        and q.dtype in (torch.bfloat16, torch.float32)
        and window < 0
        and max(q.stride(-3), k.stride(-3)) <= MAX_TOKEN_STRIDE
    )


def _problem(q, k, v, cu_seqlens, causal: bool, scale: float) -> dict:
    """The arguments pytrain._C's forward and backward share: the inputs, their layout and the options."""
    return dict(
        q=q.data_ptr(),
        k=k.data_ptr(),
        v=v.data_ptr(),
        strides=(q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1)),
        cu_seqlens=cu_seqlens.data_ptr(),
        num_seqs=cu_seqlens.numel() - 1,
        heads=q.shape[1],
        kv_heads=k.shape[1],
        head_dim=q.shape[2],
        causal=causal,
        scale=scale,
        dtype=DTYPE_CODES[q.dtype],
        parallelism=parallelism(q, q.shape[0] * q.shape[1]),
    )


def empty_output_and_lse(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The buffers an attention forward over packed q (tokens, heads, dim) returns: the output, like q, and the
    fp32 log-sum-exp per (head, token). Shared by these kernels and the Triton ones' fake (flash_attn.py)."""
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("pytrain::cpu_attention_forward", mutates_args=())
def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = empty_output_and_lse(q)
    extension(q.device).attention_forward(
        out=out.data_ptr(), lse=lse.data_ptr(), **_problem(q, k, v, cu_seqlens, causal, scale)
    )
    return out, lse


@_forward.register_fake
def _(q, k, v, cu_seqlens, causal, scale):
    return empty_output_and_lse(q)


@torch.library.custom_op("pytrain::cpu_attention_backward", mutates_args=())
def _backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq = torch.empty(q.shape, dtype=q.dtype)
    dk, dv = torch.empty(k.shape, dtype=k.dtype), torch.empty(v.shape, dtype=v.dtype)
    extension(q.device).attention_backward(
        out=out.data_ptr(),
        lse=lse.data_ptr(),
        dout=dout.data_ptr(),
        dq=dq.data_ptr(),
        dk=dk.data_ptr(),
        dv=dv.data_ptr(),
        **_problem(q, k, v, cu_seqlens, causal, scale),
    )
    return dq, dk, dv


@_backward.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.causal, ctx.scale = causal, scale


def _autograd_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _backward(dout.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def attention(q, k, v, bounds: list[int], causal: bool, scale: float) -> torch.Tensor:
    """Attention within each sequence bounds[i]:bounds[i+1] of packed (tokens, heads, dim) q, k, v, checked by
    the caller (flash_attn.py) and served where `applies`."""
    return _forward(q, k, v, torch.tensor(bounds, dtype=torch.int64), causal, scale)[0]
