"""Attention forward and forward+backward TFLOP/s: pytrain vs PyTorch SDPA vs the plain matmul-softmax.

Rows of one group run side by side on the same inputs:
  pytrain         pytrain.kernels.flash_attn_func / flash_attn_varlen_func (Triton on CUDA; on a CPU with
                  AVX512-BF16, bf16 and fp32: pytrain's kernels (kernels/attention_cpu.py); otherwise SDPA per
                  document)
  sdpa            F.scaled_dot_product_attention (default backend choice); for packed rows, with a block-diagonal mask
  sdpa_flash, sdpa_cudnn   (CUDA) SDPA forced to its flash / cuDNN backend
  reference       softmax(q k^T) v with plain matmuls (materializes the scores)
FLOPs counted: 4 * heads * head_dim * (attended query-key pairs) forward; 2.5x that backward (FlashAttention's
accounting), so causal counts half the pairs. Packed rows count only the pairs inside each document.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pytrain.kernels import attention_cpu, flash_attn_func, flash_attn_varlen_func, reference

from .conftest import NEEDS_CUDA

# bf16 on the CPU only where pytrain's kernels serve it: elsewhere PyTorch's bf16 products crawl (pytrain.kernels.
# linear says why) and the reference row alone would take many seconds.
NEEDS_BF16_KERNELS = pytest.mark.skipif(not attention_cpu.AVAILABLE, reason="the CPU has no AVX512-BF16")
CPU_CASES = [
    pytest.param("cpu", torch.float32, seq, d, id=f"cpu-fp32-seq{seq}-d{d}") for seq in (1024, 2048) for d in (64, 128)
] + [
    pytest.param("cpu", torch.bfloat16, seq, d, id=f"cpu-bf16-seq{seq}-d{d}", marks=NEEDS_BF16_KERNELS)
    for seq in (512, 2048)
    for d in (64, 128)
]
CUDA_CASES = [
    pytest.param("cuda", torch.bfloat16, seq, d, id=f"cuda-bf16-seq{seq}-d{d}", marks=NEEDS_CUDA)
    for seq in (1024, 4096, 8192)
    for d in (64, 128)
]
HEADS = 8
# A packed row of 4096 tokens with document lengths as a pretraining loader produces them.
DOCUMENTS = [1503, 87, 640, 12, 911, 233, 1, 402, 307]


def pairs(lengths, causal: bool) -> int:
    return sum(n * (n + 1) // 2 if causal else n * n for n in lengths)


def attention_flops(lengths, head_dim: int, causal: bool, backward: bool) -> float:
    forward = 4 * HEADS * head_dim * pairs(lengths, causal)
    return forward * (3.5 if backward else 1.0)


def sdpa(q, k, v, causal, mask=None):
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal and mask is None
    ).transpose(1, 2)


def runner(fn, inputs, dout, backward):
    if not backward:
        return lambda: fn(*inputs)
    leaves = [t.detach().requires_grad_() for t in inputs]
    return lambda: torch.autograd.grad(fn(*leaves), leaves, dout)


def impls(device):
    rows = {
        "pytrain": lambda q, k, v, c: flash_attn_func(q, k, v, causal=c),
        "sdpa": sdpa,
        "reference": lambda q, k, v, c: reference.attention(q, k, v, causal=c),
    }
    if device == "cuda":

        def forced(backend):
            def run(q, k, v, c):
                with sdpa_kernel(backend):
                    return sdpa(q, k, v, c)

            return run

        rows.update(sdpa_flash=forced(SDPBackend.FLASH_ATTENTION), sdpa_cudnn=forced(SDPBackend.CUDNN_ATTENTION))
    return rows


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("device,dtype,seq,head_dim", CPU_CASES + CUDA_CASES)
@pytest.mark.parametrize("impl", ["pytrain", "sdpa", "sdpa_flash", "sdpa_cudnn", "reference"])
def test_attention(benchmark, compute, impl, device, dtype, seq, head_dim, causal, backward):
    fns = impls(device)
    if impl not in fns:
        pytest.skip(f"{impl} is a CUDA backend")
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (torch.randn(1, seq, HEADS, head_dim, device=device, dtype=dtype, generator=g) for _ in range(4))
    fn = fns[impl]
    compute(
        benchmark,
        runner(lambda a, b, c: fn(a, b, c, causal), (q, k, v), dout, backward),
        device=device,
        flops=attention_flops([seq], head_dim, causal, backward),
        dtype=dtype,
        impl=impl,
        group=f"attention {'fwd+bwd' if backward else 'fwd'} {'causal' if causal else 'full'} {device} "
        f"{str(dtype)[6:]} seq {seq} d {head_dim}",
    )


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize(
    "device,dtype",
    [
        ("cpu", torch.float32),
        pytest.param("cpu", torch.bfloat16, marks=NEEDS_BF16_KERNELS),
        pytest.param("cuda", torch.bfloat16, marks=NEEDS_CUDA),
    ],
)
@pytest.mark.parametrize("impl", ["pytrain", "sdpa"])
def test_packed_documents(benchmark, compute, impl, device, dtype, backward):
    """One packed row of several documents, causal: varlen vs SDPA with a block-diagonal causal mask."""
    head_dim, total = 64, sum(DOCUMENTS)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (torch.randn(total, HEADS, head_dim, device=device, dtype=dtype, generator=g) for _ in range(4))
    bounds = torch.tensor([0] + DOCUMENTS, device=device).cumsum(0)
    if impl == "pytrain":

        def fn(a, b, c):
            return flash_attn_varlen_func(a, b, c, bounds, max(DOCUMENTS), causal=True)
    else:
        doc = torch.repeat_interleave(
            torch.arange(len(DOCUMENTS), device=device), torch.tensor(DOCUMENTS, device=device)
        )
        mask = (doc[:, None] == doc[None, :]) & torch.ones(total, total, dtype=torch.bool, device=device).tril()

        def fn(a, b, c):
            return sdpa(a[None], b[None], c[None], True, mask)[0]

    compute(
        benchmark,
        runner(fn, (q, k, v), dout, backward),
        device=device,
        flops=attention_flops(DOCUMENTS, head_dim, True, backward),
        dtype=dtype,
        impl=impl,
        group=f"attention packed {len(DOCUMENTS)} docs in {total} tokens {'fwd+bwd' if backward else 'fwd'} "
        f"causal {device} {str(dtype)[6:]} d {head_dim}",
    )
