"""Fused RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight over the last dimension.

Forward and backward run in pytrain._C (CPU) or pytrain._C_cuda (CUDA); both are torch.library custom
ops, so autograd and torch.compile (fullgraph) see one op each way.
"""
import torch

from . import reference
from ._backend import DTYPE_CODES, extension, launch_args, parallelism
from ._checks import check_same_device, check_tensor


@torch.library.custom_op("pytrain::rms_norm_forward", mutates_args=())
def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = x.shape[-1]
    rows = x.numel() // hidden
    y = torch.empty_like(x)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    extension(x.device).rms_norm_forward(
        x.data_ptr(), weight.data_ptr(), y.data_ptr(), rstd.data_ptr(), rows, hidden, eps,
        DTYPE_CODES[x.dtype], DTYPE_CODES[weight.dtype], parallelism(x, rows), **launch_args(x))
    return y, rstd


@_forward.register_fake
def _(x, weight, eps):
    return torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("pytrain::rms_norm_backward", mutates_args=())
def _backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = x.shape[-1]
    rows = x.numel() // hidden
    dx = torch.empty_like(x)
    workers = parallelism(x, rows)
    dweight_partial = torch.zeros(workers, hidden, dtype=torch.float32, device=x.device)
    extension(x.device).rms_norm_backward(
        dy.data_ptr(), x.data_ptr(), weight.data_ptr(), rstd.data_ptr(), dx.data_ptr(), dweight_partial.data_ptr(),
        rows, hidden, DTYPE_CODES[x.dtype], DTYPE_CODES[weight.dtype], workers, **launch_args(x))
    return dx, dweight_partial.sum(0).to(weight.dtype)


@_backward.register_fake
def _(dy, x, weight, rstd):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _autograd_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = _backward(dy.contiguous(), x, weight, rstd)
    return dx, dweight, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dimension of x (any leading dims); weight has x's dtype or float32."""
    check_tensor("x", x)
    check_tensor("weight", weight)
    check_same_device(x=x, weight=weight)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must have shape ({x.shape[-1]},) to match x's last dimension, got {tuple(weight.shape)}")
    if weight.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"weight has dtype {weight.dtype}; use x's dtype ({x.dtype}) or torch.float32")
    if x.shape[-1] == 0:
        raise ValueError("x's last dimension (hidden) must be at least 1")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if extension(x.device) is None:
        return reference.rms_norm(x, weight, eps)
    return _forward(x, weight, float(eps))[0]
