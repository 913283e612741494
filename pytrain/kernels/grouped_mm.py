"""Grouped GEMM over experts: out = grouped_mm(x, weight, tokens_per_expert).

x (N, K) float32/bfloat16/float16, contiguous, its rows grouped by expert (moe_permute's `permuted`);
weight (E, M, K) in x's dtype, contiguous: nn.Linear's (out_features, in_features) per expert, stacked;
tokens_per_expert (E,) int32/int64, on x's device or on the CPU, non-negative, summing to N: group e is rows
sum(tokens_per_expert[:e]) up to the next group. out (N, M) in x's dtype: out[rows of e] = x[rows of e] @ weight[e].T,
accumulated in fp32. Gradients reach x (dx[rows of e] = dy[rows of e] @ weight[e]) and weight
(dweight[e] = dy[rows of e].T @ x[rows of e]; zeros for an expert without rows).

Implementations (PYTRAIN_GROUPED_MM picks one; default "auto"):
  loop    one torch.mm per expert into slices of one output (reads tokens_per_expert on the host: on a GPU, a
          synchronization). Plain torch: it needs no compiled module.
  torch   torch._grouped_mm (one call; int32 cumulative offsets on x's device, no host read). Needs rows of
          16 bytes' multiples (K and M; x and weight 16-byte aligned).
  triton  kernels/grouped_mm_triton.py (int32 cumulative offsets on the device, no host read): CUDA, and the CPU
          under PYTRAIN_TRITON_CPU=1 (Triton's interpreter; tests only).
"auto": on the CPU torch where its layout rule holds (one call instead of one per expert;
bench/test_moe_kernels_bench.py times both), else loop; on CUDA torch for bfloat16 on compute capability
>= 9.0 (its fused CUTLASS kernel) where the layout rule holds, else triton. The CUDA choice is a default
not yet measured: bench/gpu/run.sh times torch, triton and loop side by side on the GPU machine.

tokens_per_expert's values are checked on every call: on the host a ValueError; for a tensor on a GPU a
device-side assertion (no synchronization; a bad value fails the next synchronizing call). Pass
moe_permute's tokens_per_expert (on x's device) for the GPU paths without a host read; a CPU tensor there costs
one small host-to-device copy. A torch.library custom op each way: torch.compile(fullgraph=True) sees one op.
"""

import os

import torch

from ._backend import SUPPORTED_DTYPES, runs_triton
from ._checks import check_same_device, check_tensor
from .linear import mm
from .moe_permute import INDEX_DTYPES, require

IMPLEMENTATIONS = ("auto", "loop", "torch", "triton")


def implementation(x: torch.Tensor, weight: torch.Tensor) -> str:
    """The implementation this call runs: PYTRAIN_GROUPED_MM, or for "auto" the documented default."""
    choice = os.environ.get("PYTRAIN_GROUPED_MM", "auto").strip().lower() or "auto"
    if choice not in IMPLEMENTATIONS:
        raise ValueError(f"PYTRAIN_GROUPED_MM={choice!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    if choice == "torch" and not hasattr(torch, "_grouped_mm"):
        raise ValueError(f"PYTRAIN_GROUPED_MM=torch needs torch._grouped_mm, which torch {torch.__version__} lacks")
    if choice == "torch" and not _torch_layout_ok(x, weight):
        raise ValueError(
            "PYTRAIN_GROUPED_MM=torch: torch._grouped_mm needs in_features and out_features whose rows are a multiple "
            f"of 16 bytes, got {x.shape[1]} and {weight.shape[1]} of {x.dtype}"
        )
    if choice == "triton" and not runs_triton(x.device):
        raise ValueError(
            "PYTRAIN_GROUPED_MM=triton needs a CUDA tensor (or PYTRAIN_TRITON_CPU=1 with TRITON_INTERPRET=1)"
        )
    if choice != "auto":
        return choice
    if x.device.type == "cuda":
        return "torch" if _torch_grouped_mm_fits(x, weight) else "triton"
    if runs_triton(x.device):
        return "triton"
    return "torch" if hasattr(torch, "_grouped_mm") and _torch_layout_ok(x, weight) else "loop"


def _torch_layout_ok(x, weight) -> bool:
    """torch._grouped_mm's rule: every operand's row stride and base a multiple of 16 bytes."""
    size = x.element_size()
    return all(v % 16 == 0 for v in (x.shape[1] * size, weight.shape[1] * size, x.data_ptr(), weight.data_ptr()))


def _torch_grouped_mm_fits(x, weight) -> bool:
    """Where torch._grouped_mm runs its fused (CUTLASS) kernel: bf16 on sm90+, 16-byte aligned rows."""
    return (
        hasattr(torch, "_grouped_mm")
        and x.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device) >= (9, 0)
        and _torch_layout_ok(x, weight)
    )


def _check_counts(tokens_per_expert: torch.Tensor, rows: int) -> None:
    counts = tokens_per_expert
    require(
        (counts >= 0).all() & (counts.sum() == rows),
        f"tokens_per_expert must be non-negative and sum to x's {rows} rows",
    )


def _offsets(tokens_per_expert: torch.Tensor, device: torch.device) -> torch.Tensor:
    """int32 cumulative row counts on `device` (what torch._grouped_mm and the Triton kernels take)."""
    return tokens_per_expert.cumsum(0, dtype=torch.int32).to(device, non_blocking=True)


def _loop(fn, counts: list[int]):
    """fn(e, start, stop) for each expert with rows."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            fn(e, start, start + n)
        start += n


def _forward_impl(x, weight, tokens_per_expert, impl: str) -> torch.Tensor:
    rows, out_cols = x.shape[0], weight.shape[1]
    if impl == "loop":
        out = x.new_empty(rows, out_cols)
        _loop(lambda e, a, b: mm(x[a:b], weight[e].t(), out=out[a:b]), tokens_per_expert.tolist())
        return out
    offsets = _offsets(tokens_per_expert, x.device)
    if impl == "torch":
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    from pytrain.triton.grouped_mm_triton import grouped_mm_forward

    return grouped_mm_forward(x, weight, offsets)


def _backward_impl(dy, x, weight, tokens_per_expert, impl: str, need_dx: bool, need_dweight: bool):
    dx = dweight = None
    if impl == "loop":
        counts = tokens_per_expert.tolist()
        if need_dx:
            dx = torch.empty_like(x)
            _loop(lambda e, a, b: mm(dy[a:b], weight[e], out=dx[a:b]), counts)
        if need_dweight:
            dweight = torch.zeros_like(weight)  # zeros: an expert without rows keeps them
            _loop(lambda e, a, b: mm(dy[a:b].t(), x[a:b], out=dweight[e]), counts)
        return dx, dweight
    offsets = _offsets(tokens_per_expert, x.device)
    if impl == "torch":
        if need_dx:
            dx = torch._grouped_mm(dy, weight, offs=offsets)
        if need_dweight:
            dweight = torch._grouped_mm(dy.t(), x, offs=offsets)
        return dx, dweight
    from pytrain.triton.grouped_mm_triton import grouped_mm_dweight, grouped_mm_dx

    if need_dx:
        dx = grouped_mm_dx(dy, weight, offsets)
    if need_dweight:
        dweight = grouped_mm_dweight(dy, x, offsets, weight.shape[0])
    return dx, dweight


@torch.library.custom_op("pytrain::grouped_mm", mutates_args=())
def _grouped_mm(x: torch.Tensor, weight: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    _check_counts(tokens_per_expert, x.shape[0])
    if min(x.shape[0], x.shape[1], weight.shape[1]) == 0:  # nothing to multiply: no kernel takes empty operands
        return x.new_zeros(x.shape[0], weight.shape[1])
    return _forward_impl(x, weight, tokens_per_expert, implementation(x, weight))


@_grouped_mm.register_fake
def _(x, weight, tokens_per_expert):
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("pytrain::grouped_mm_backward", mutates_args=())
def _grouped_mm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    need_dx: bool,
    need_dweight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight); a gradient not needed comes back as an empty (0,) tensor."""
    if min(x.shape[0], x.shape[1], weight.shape[1]) == 0:
        dx, dweight = torch.zeros_like(x), torch.zeros_like(weight)
    else:
        dx, dweight = _backward_impl(dy, x, weight, tokens_per_expert, implementation(x, weight), need_dx, need_dweight)
    return (dx if need_dx else x.new_empty(0)), (dweight if need_dweight else weight.new_empty(0))


@_grouped_mm_backward.register_fake
def _(dy, x, weight, tokens_per_expert, need_dx, need_dweight):
    return (torch.empty_like(x) if need_dx else x.new_empty(0)), (
        torch.empty_like(weight) if need_dweight else weight.new_empty(0)
    )


def _setup_context(ctx, inputs, output):
    x, weight, tokens_per_expert = inputs
    ctx.save_for_backward(x, weight, tokens_per_expert)


def _autograd_backward(ctx, dy):
    x, weight, tokens_per_expert = ctx.saved_tensors
    need_dx, need_dweight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dweight = _grouped_mm_backward(dy.contiguous(), x, weight, tokens_per_expert, need_dx, need_dweight)
    return (dx if need_dx else None), (dweight if need_dweight else None), None


_grouped_mm.register_autograd(_autograd_backward, setup_context=_setup_context)


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Per-expert x[rows of e] @ weight[e].T over expert-grouped rows -> (N, M); see the module docstring."""
    check_tensor("x", x, dtypes=SUPPORTED_DTYPES)
    if x.dim() != 2:
        raise ValueError(f"x must be (rows, in_features), got shape {tuple(x.shape)}")
    check_tensor("weight", weight, dtypes=SUPPORTED_DTYPES)
    check_same_device(x=x, weight=weight)
    if weight.dim() != 3 or weight.shape[2] != x.shape[1]:
        raise ValueError(
            f"weight must be (experts, out_features, {x.shape[1]}) to match x's {x.shape[1]} in_features, "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {weight.dtype}; use x's dtype ({x.dtype})")
    check_tensor("tokens_per_expert", tokens_per_expert, dtypes=INDEX_DTYPES, min_dim=0)
    if tokens_per_expert.shape != (weight.shape[0],):
        raise ValueError(
            f"tokens_per_expert must have shape ({weight.shape[0]},), one count per expert of weight, "
            f"got {tuple(tokens_per_expert.shape)}"
        )
    if tokens_per_expert.device not in (x.device, torch.device("cpu")):
        raise ValueError(
            f"tokens_per_expert must be on x's device ({x.device}) or the CPU, got {tokens_per_expert.device}"
        )
    return _grouped_mm(x, weight, tokens_per_expert)
