"""Linear layers and GEMMs whose 16-bit operands run at the CPU's fp32 speed where the CPU has no 16-bit units.

PyTorch multiplies bf16 or fp16 matrices on the CPU with oneDNN only where the CPU has dot-product instructions
for them (AVX512-BF16 or AMX for bf16, AMX-FP16 for fp16); elsewhere (every AVX2 machine: AMD Zen 1-3, most
laptops) it falls back to a scalar loop, about 1 GFLOP/s on this project's 2-core EPYC against 120-160 GFLOP/s
for fp32, so a bf16 training step took minutes. There, `linear` and `mm` multiply fp32 copies of the operands
instead: a 16-bit value converts to fp32 exactly and the product of two fits fp32's mantissa, so the result is
what a 16-bit GEMM accumulating in fp32 computes (up to the order of the sums), rounded once to the 16-bit
output. The copies are temporaries of one GEMM; only the 16-bit tensors are kept for the backward, so the
activation memory is the 16-bit model's. CUDA tensors, fp32 and CPUs with the units take PyTorch's own kernels.
"""

import functools

import torch
import torch.nn.functional as F

HALF_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def _cpu_has_units(dtype: torch.dtype) -> bool:
    if dtype == torch.bfloat16:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.cpu._is_amx_fp16_supported()


def multiplies_in_fp32(tensor: torch.Tensor) -> bool:
    """Whether a GEMM over this 16-bit CPU tensor runs on fp32 copies (the module docstring)."""
    return tensor.device.type == "cpu" and tensor.dtype in HALF_DTYPES and not _cpu_has_units(tensor.dtype)


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """torch.mm(a, b, out=out) (out: of a's dtype), on fp32 copies where `multiplies_in_fp32(a)`."""
    if not multiplies_in_fp32(a):
        return torch.mm(a, b, out=out)
    product = torch.mm(a.float(), b.float())
    return product.to(a.dtype) if out is None else out.copy_(product)


class _LinearInFp32(torch.autograd.Function):
    """F.linear over 16-bit CPU tensors on fp32 copies; saves the 16-bit input and weight only."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1]).float()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad, weight.float()).to(x.dtype).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.mm(grad.t(), x.reshape(-1, x.shape[-1]).float()).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0).to(weight.dtype)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias): y = x weight^T + bias, on fp32 copies where `multiplies_in_fp32(x)`."""
    if not multiplies_in_fp32(x):
        return F.linear(x, weight, bias)
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        dtypes = f"{x.dtype}, {weight.dtype}, {getattr(bias, 'dtype', None)}"
        raise TypeError(f"linear: x, weight and bias must share a dtype, got {dtypes}")
    return _LinearInFp32.apply(x, weight, bias)
