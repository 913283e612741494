"""Fused RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight over the last dimension.

With `residual`, the pre-norm decoder's add is fused in: s = x + residual is normalized and returned
too, as the next residual stream. Forward and backward run in pytrain._C (CPU) or pytrain._C_cuda
(CUDA); both are torch.library custom ops, so autograd and torch.compile (fullgraph) see one op each way.
"""

import torch

from . import reference
from ._backend import DTYPE_CODES, empty_output_like, extension, launch_args, parallelism
from ._checks import check_same_device, check_tensor


def _launch_forward(x, weight, eps, y, rstd, residual=None, residual_out=None) -> None:
    hidden = x.shape[-1]
    rows = x.numel() // hidden
    extension(x.device).rms_norm_forward(
        x.data_ptr(),
        weight.data_ptr(),
        y.data_ptr(),
        rstd.data_ptr() if rstd is not None else 0,
        rows,
        hidden,
        eps,
        DTYPE_CODES[x.dtype],
        DTYPE_CODES[weight.dtype],
        parallelism(x, rows),
        **launch_args(x),
        residual=residual.data_ptr() if residual is not None else 0,
        residual_out=residual_out.data_ptr() if residual_out is not None else 0,
    )


def _rstd_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)


@torch.library.custom_op("pytrain::rms_norm_forward", mutates_args=())
def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    y, rstd = empty_output_like(x), _rstd_like(x)
    _launch_forward(x, weight, eps, y, rstd)
    return y, rstd


@_forward.register_fake
def _(x, weight, eps):
    return torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("pytrain::rms_norm_residual_forward", mutates_args=())
def _residual_forward(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, total, rstd = empty_output_like(x), empty_output_like(x), _rstd_like(x)
    _launch_forward(x, weight, eps, y, rstd, residual=residual, residual_out=total)
    return y, total, rstd


@_residual_forward.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("pytrain::rms_norm_forward_out", mutates_args=("out",))
def _forward_out(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    _launch_forward(x, weight, eps, out, None)


@_forward_out.register_fake
def _(x, weight, eps, out):
    return None


@torch.library.custom_op("pytrain::rms_norm_backward", mutates_args=())
def _backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dresidual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: the normalized input (the sum, with a residual); dresidual_out: the sum's own gradient."""
    hidden = x.shape[-1]
    rows = x.numel() // hidden
    dx = torch.empty_like(x)
    workers = parallelism(x, rows)
    dweight_partial = torch.zeros(workers, hidden, dtype=torch.float32, device=x.device)
    extension(x.device).rms_norm_backward(
        dy.data_ptr(),
        x.data_ptr(),
        weight.data_ptr(),
        rstd.data_ptr(),
        dx.data_ptr(),
        dweight_partial.data_ptr(),
        rows,
        hidden,
        DTYPE_CODES[x.dtype],
        DTYPE_CODES[weight.dtype],
        workers,
        **launch_args(x),
        dresidual_out=dresidual_out.data_ptr() if dresidual_out is not None else 0,
    )
    return dx, dweight_partial.sum(0).to(weight.dtype)


@_backward.register_fake
def _(dy, x, weight, rstd, dresidual_out=None):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _autograd_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = _backward(dy.contiguous(), x, weight, rstd)
    return dx, dweight, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def _residual_setup_context(ctx, inputs, output):
    _, _, weight, _ = inputs
    _, total, rstd = output
    ctx.save_for_backward(total, weight, rstd)


def _residual_autograd_backward(ctx, dy, dtotal, _drstd):
    total, weight, rstd = ctx.saved_tensors
    dtotal = dtotal.contiguous() if dtotal is not None else None
    dx, dweight = _backward(dy.contiguous(), total, weight, rstd, dtotal)
    return dx, dx, dweight, None  # the sum's gradient reaches x and residual alike


_residual_forward.register_autograd(_residual_autograd_backward, setup_context=_residual_setup_context)


def _check(x, weight, eps, residual, out):
    check_tensor("x", x)
    check_tensor("weight", weight)
    check_same_device(x=x, weight=weight)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"weight must have shape ({x.shape[-1]},) to match x's last dimension, got {tuple(weight.shape)}"
        )
    if weight.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"weight has dtype {weight.dtype}; use x's dtype ({x.dtype}) or torch.float32")
    if x.shape[-1] == 0:
        raise ValueError("x's last dimension (hidden) must be at least 1")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    for name, other in (("residual", residual), ("out", out)):
        if other is None:
            continue
        check_tensor(name, other)
        check_same_device(x=x, **{name: other})
        if other.shape != x.shape or other.dtype != x.dtype:
            raise ValueError(
                f"{name} must match x: shape {tuple(x.shape)} and dtype {x.dtype}, got "
                f"{tuple(other.shape)} and {other.dtype}"
            )
    if out is not None:
        if residual is not None:
            raise ValueError("out= is not supported together with residual=")
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            raise ValueError(
                "out= cannot be used when x or weight requires grad (autograd keeps its own output): "
                "call under torch.no_grad() or drop out="
            )
        if out.data_ptr() == x.data_ptr():
            raise ValueError("out must not alias x")


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
):
    """RMSNorm over the last dimension of x (any leading dims); weight has x's dtype or float32.

    residual: normalize x + residual and return (y, x + residual), the sum rounded to x's dtype.
    out: write y into this preallocated tensor (no autograd) and return it: skips a fresh allocation,
    whose page faults cost more than the kernel itself for large CPU tensors.
    """
    _check(x, weight, eps, residual, out)
    eps = float(eps)
    if extension(x.device) is None:
        total = x + residual if residual is not None else x
        y = reference.rms_norm(total, weight, eps)
        if out is not None:
            return out.copy_(y)
        return (y, total) if residual is not None else y
    if residual is not None:
        y, total, _ = _residual_forward(x, residual, weight, eps)
        return y, total
    if out is not None:
        _forward_out(x, weight, eps, out)
        return out
    return _forward(x, weight, eps)[0]
