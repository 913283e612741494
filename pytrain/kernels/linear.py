"""Linear layers and GEMMs whose 16-bit operands run at the CPU's fp32 speed where the CPU has no 16-bit units.

PyTorch multiplies bf16 or fp16 matrices on the CPU with oneDNN only where the CPU has dot-product instructions
for them (AVX512-BF16 or AMX for bf16, AMX-FP16 for fp16); elsewhere (every AVX2 machine: AMD Zen 1-3, most
laptops) it falls back to a scalar loop, about 1 GFLOP/s on this project's 2-core EPYC against 120-160 GFLOP/s
for fp32, so a bf16 training step took minutes. There, `linear` and `mm` multiply fp32 copies of the operands
instead: a 16-bit value converts to fp32 exactly and the product of two fits fp32's mantissa, so the result is
what a 16-bit GEMM accumulating in fp32 computes (up to the order of the sums), rounded once to the 16-bit
output. The copies are temporaries of one GEMM; only the 16-bit tensors are kept for the backward, so the
activation memory is the 16-bit model's. CUDA tensors, fp32 and CPUs with the units take PyTorch's own kernels.

A linear layer converts its weight, and makes its fp32 product, a block of output features at a time
(_FP32_BLOCK_BYTES): an LM head's whole fp32 weight and logits (32000 x 512 and 2048 x 32000 here: 62 and 250
MiB) would otherwise be temporaries several times the 16-bit model's activations, in the forward and again in
the backward.
"""

import torch
import torch.nn.functional as F

HALF_DTYPES = (torch.bfloat16, torch.float16)

# The fp32 temporaries of one block of a linear's output features: the weight's rows, and the tokens' outputs
# or output gradients for them. Blocks stay at least _MIN_BLOCK_ROWS wide, where the GEMMs run at full speed.
_FP32_BLOCK_BYTES = 16 << 20
_MIN_BLOCK_ROWS = 256


# Read once at import: a constant torch.compile can trace through.
_CPU_HAS_UNITS = {
    torch.bfloat16: torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported(),
    torch.float16: torch.cpu._is_amx_fp16_supported(),
}


def multiplies_in_fp32(tensor: torch.Tensor) -> bool:
    """Whether a GEMM over this 16-bit CPU tensor runs on fp32 copies (the module docstring)."""
    return tensor.device.type == "cpu" and tensor.dtype in HALF_DTYPES and not _CPU_HAS_UNITS[tensor.dtype]


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """torch.mm(a, b, out=out) (out: of a's dtype), on fp32 copies where `multiplies_in_fp32(a)`."""
    if not multiplies_in_fp32(a):
        return torch.mm(a, b, out=out)
    product = torch.mm(a.float(), b.float())
    return product.to(a.dtype) if out is None else out.copy_(product)


def _output_blocks(tokens: int, weight: torch.Tensor) -> list[slice]:
    """The blocks of output features (weight rows) whose fp32 temporaries fit _FP32_BLOCK_BYTES; at least one,
    so a weight without rows still gives its (zero) input gradient."""
    rows = max(_MIN_BLOCK_ROWS, _FP32_BLOCK_BYTES // (4 * max(tokens, weight.shape[1], 1)))
    return [slice(start, start + rows) for start in range(0, max(weight.shape[0], 1), rows)]


@torch.library.custom_op("pytrain::linear_in_fp32", mutates_args=())
def _linear_in_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear over 16-bit CPU tensors on fp32 copies, rounded once (one op: autograd, torch.compile and the
    selective checkpoint policy see the linear, not its casts)."""
    rows = x.reshape(-1, x.shape[-1]).float()
    out = x.new_empty(rows.shape[0], weight.shape[0])
    for block in _output_blocks(rows.shape[0], weight):
        block_bias = None if bias is None else bias[block].float()
        out[:, block] = F.linear(rows, weight[block].float(), block_bias)  # rounds to out's dtype
    return out.view(*x.shape[:-1], weight.shape[0])


@_linear_in_fp32.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("pytrain::linear_in_fp32_backward", mutates_args=())
def _linear_in_fp32_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_x: bool, need_weight: bool, need_bias: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias) of _linear_in_fp32, each on fp32 copies, a block of output features at a
    time (grad_x sums the blocks' products in fp32, rounded once); an empty tensor where not needed."""
    grad = grad.reshape(-1, grad.shape[-1])
    rows = x.reshape(-1, x.shape[-1]).float() if need_weight else None
    grad_x32 = None
    grad_weight = weight.new_empty(weight.shape) if need_weight else x.new_empty(0)
    grad_bias = weight.new_empty(weight.shape[0]) if need_bias else x.new_empty(0)
    for block in _output_blocks(grad.shape[0], weight):
        block_grad = grad[:, block].float()
        if need_x:
            block_weight = weight[block].float()
            grad_x32 = (
                torch.mm(block_grad, block_weight) if grad_x32 is None else grad_x32.addmm_(block_grad, block_weight)
            )
        if need_weight:
            grad_weight[block] = torch.mm(block_grad.t(), rows)
        if need_bias:
            grad_bias[block] = block_grad.sum(0)
    grad_x = grad_x32.to(x.dtype).view(x.shape) if need_x else x.new_empty(0)
    return grad_x, grad_weight, grad_bias


@_linear_in_fp32_backward.register_fake
def _(grad, x, weight, need_x, need_weight, need_bias):
    return (
        x.new_empty(x.shape if need_x else 0),
        weight.new_empty(weight.shape if need_weight else 0),
        weight.new_empty(weight.shape[0] if need_bias else 0),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)  # the 16-bit tensors only: the fp32 copies were temporaries
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_bias = ctx.has_bias and ctx.needs_input_grad[2]
    grads = _linear_in_fp32_backward(grad, x, weight, need_x, need_weight, need_bias)
    return tuple(g if need else None for g, need in zip(grads, (need_x, need_weight, need_bias)))


_linear_in_fp32.register_autograd(_backward, setup_context=_setup_context)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias): y = x weight^T + bias, on fp32 copies where `multiplies_in_fp32(x)`."""
    if not multiplies_in_fp32(x):
        return F.linear(x, weight, bias)
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        dtypes = f"{x.dtype}, {weight.dtype}, {getattr(bias, 'dtype', None)}"
        raise TypeError(f"linear: x, weight and bias must share a dtype, got {dtypes}")
    return _linear_in_fp32(x, weight, bias)
