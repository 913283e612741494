"""Fused SwiGLU activation: silu(gate) * up in one pass, forward and backward.

    out = swiglu(gate, up)       # gate = w1(x), up = w3(x) of a gated MLP; out feeds w2

Eager PyTorch runs silu, then the product (two passes and a silu-sized temporary kept for the backward),
and three ops in the backward. Here each direction is one pass in pytrain._C (CPU) or pytrain._C_cuda
(CUDA), fp32 math with one rounding per output, and only gate and up are kept for the backward. Both
directions are torch.library custom ops, so autograd and torch.compile (fullgraph) see one op each way.
"""

import torch

from . import reference
from ._backend import DTYPE_CODES, extension, launch_args, parallelism
from ._checks import check_same_device, check_tensor


@torch.library.custom_op("pytrain::swiglu_forward", mutates_args=())
def _forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(gate)
    extension(gate.device).swiglu_forward(
        gate.data_ptr(),
        up.data_ptr(),
        out.data_ptr(),
        gate.numel(),
        DTYPE_CODES[gate.dtype],
        parallelism(gate, gate.numel()),
        **launch_args(gate),
    )
    return out


@_forward.register_fake
def _(gate, up):
    return torch.empty_like(gate)


@torch.library.custom_op("pytrain::swiglu_backward", mutates_args=())
def _backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    extension(gate.device).swiglu_backward(
        gate.data_ptr(),
        up.data_ptr(),
        dout.data_ptr(),
        dgate.data_ptr(),
        dup.data_ptr(),
        gate.numel(),
        DTYPE_CODES[gate.dtype],
        parallelism(gate, gate.numel()),
        **launch_args(gate),
    )
    return dgate, dup


@_backward.register_fake
def _(dout, gate, up):
    return torch.empty_like(gate), torch.empty_like(up)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _autograd_backward(ctx, dout):
    gate, up = ctx.saved_tensors
    return _backward(dout.contiguous(), gate, up)


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def _check(gate, up):
    check_tensor("gate", gate, min_dim=0)
    check_tensor("up", up, min_dim=0)
    check_same_device(gate=gate, up=up)
    if up.shape != gate.shape or up.dtype != gate.dtype:
        raise ValueError(
            f"up must match gate: shape {tuple(gate.shape)} and dtype {gate.dtype}, "
            f"got {tuple(up.shape)} and {up.dtype}"
        )


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, fused (any shape; gate and up contiguous, of one shape and dtype)."""
    _check(gate, up)
    if extension(gate.device) is None:
        return reference.swiglu(gate, up)
    return _forward(gate, up)
