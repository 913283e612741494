"""Fused LM head + cross-entropy: cross_entropy(hidden @ weight.T, labels) without the (tokens, vocab) logits.

Tokens are processed in chunks: each chunk's logits are computed into one reused buffer, the fused
cross-entropy kernel turns them in place into their gradient, and grad_hidden (that chunk) and
grad_weight are accumulated right away — all in the forward, so the backward only scales the stored
gradients by grad_output. grad_weight sums over every chunk in fp32 and is rounded to weight's dtype once at
the end: summed in bf16, each chunk's small contribution to a large running sum would be rounded off (a
few hundred chunks lose most of them). For 16-bit weights each chunk's product is computed in weight's dtype, a
block of vocabulary rows at a time into one reused buffer, and added to the fp32 sum. Peak extra memory: the
(chunk, vocab) logits buffer, the product block, grad_hidden, and grad_weight in fp32 (twice a 16-bit weight).
reduction="none" cannot be pre-scaled: its forward only computes the loss and the backward recomputes the chunks
with grad_output as per-row scale.
"""

import torch

from . import reference
from ._backend import extension
from ._checks import check_same_device, check_tensor
from .cross_entropy import (
    check_labels_in_range,
    check_loss_args,
    grad_scale_for,
    mean_count,
    reduce_rows,
    run_kernel,
    scale_saved_grad_,
    scaled_by_count,
)
from .linear import mm, multiplies_in_fp32

CHUNK_BYTES = 128 * 2**20  # logits buffer per chunk: large enough for efficient matmuls (measured in bench/)
MIN_CHUNK = 256


def default_chunk_size(tokens: int, vocab: int, dtype: torch.dtype) -> int:
    """The largest power of two whose chunk of logits fits CHUNK_BYTES, at least MIN_CHUNK rows."""
    rows = max(1, CHUNK_BYTES // (vocab * torch.empty((), dtype=dtype).element_size()))
    return max(1, min(tokens, max(MIN_CHUNK, 1 << (rows.bit_length() - 1))))


class _WeightGradSum:
    """grad_weight summed over the chunks in fp32: add(grad_logits, hidden) adds grad_logits.T @ hidden."""

    def __init__(self, weight: torch.Tensor):
        self.sum = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        # 16-bit weights multiplied natively: one block of vocabulary rows of a chunk's product, reused (on fp32
        # copies the product goes straight into the fp32 sum)
        self.product = None
        if weight.dtype != torch.float32 and not multiplies_in_fp32(weight):
            rows = max(1, min(weight.shape[0], CHUNK_BYTES // max(1, weight.shape[1] * weight.element_size())))
            self.product = torch.empty(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)

    def add(self, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
        if self.product is None:  # an fp32 GEMM: straight into the fp32 sum
            self.sum.addmm_(grad_logits.t().float(), hidden.float())
            return
        rows = self.product.shape[0]
        for start in range(0, self.sum.shape[0], rows):
            block = self.sum[start : start + rows]
            product = self.product[: block.shape[0]]
            torch.mm(grad_logits[:, start : start + rows].t(), hidden, out=product)
            block += product

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        return self.sum.to(dtype)  # the one rounding


def _chunked(
    hidden, weight, labels, row_scale, ignore_index, label_smoothing, z_loss, grad_scale, chunk_size, with_grad
):
    """Per-token losses, and (with_grad) grad_hidden and grad_weight scaled by grad_scale (and row_scale)."""
    tokens, vocab = hidden.shape[0], weight.shape[0]
    loss_rows = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(loss_rows)
    grad_hidden = torch.empty_like(hidden) if with_grad else None
    grad_weight = _WeightGradSum(weight) if with_grad else None
    logits = torch.empty(min(chunk_size, tokens), vocab, dtype=hidden.dtype, device=hidden.device)
    for start in range(0, tokens, chunk_size):
        end = min(start + chunk_size, tokens)
        chunk_logits = logits[: end - start]
        mm(hidden[start:end], weight.t(), out=chunk_logits)
        run_kernel(
            "cross_entropy_forward",
            chunk_logits,
            labels[start:end],
            loss=loss_rows[start:end],
            lse=lse[start:end],
            grad=chunk_logits if with_grad else None,
            row_scale=None if row_scale is None else row_scale[start:end],
            grad_scale=grad_scale,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
        )
        if with_grad:  # chunk_logits now holds d loss / d logits
            mm(chunk_logits, weight, out=grad_hidden[start:end])
            grad_weight.add(chunk_logits, hidden[start:end])
    return loss_rows, grad_hidden, grad_weight.result(weight.dtype) if with_grad else None


@torch.library.custom_op("pytrain::linear_cross_entropy_forward", mutates_args=())
def _forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    reduction: str,
    chunk_size: int,
    with_grad: bool,
    labels_checked: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if labels_checked:  # no host read-back; "mean" divides the gradients in the backward (mean_count)
        count, grad_scale = (labels != ignore_index).sum(), 1.0
    else:
        count = check_labels_in_range(labels, weight.shape[0], ignore_index)
        grad_scale = grad_scale_for(reduction, count)
    with_grad = with_grad and reduction != "none"  # "none": the backward recomputes with per-row scales
    loss_rows, grad_hidden, grad_weight = _chunked(
        hidden,
        weight,
        labels,
        None,
        ignore_index,
        label_smoothing,
        z_loss,
        grad_scale,
        chunk_size,
        with_grad,
    )
    if not with_grad:
        grad_hidden, grad_weight = hidden.new_empty(0), weight.new_empty(0)
    return reduce_rows(loss_rows, reduction, count), grad_hidden, grad_weight


@_forward.register_fake
def _(hidden, weight, labels, ignore_index, label_smoothing, z_loss, reduction, chunk_size, with_grad, labels_checked):
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=torch.float32)
    if with_grad and reduction != "none":
        return loss, torch.empty_like(hidden), torch.empty_like(weight)
    return loss, hidden.new_empty(0), weight.new_empty(0)


@torch.library.custom_op("pytrain::linear_cross_entropy_backward", mutates_args=())
def _backward(
    grad_loss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """reduction="none": recompute each chunk with grad_loss (one value per token) as the row scale."""
    _, grad_hidden, grad_weight = _chunked(
        hidden,
        weight,
        labels,
        grad_loss.float().contiguous(),
        ignore_index,
        label_smoothing,
        z_loss,
        1.0,
        chunk_size,
        True,
    )
    return grad_hidden, grad_weight


@_backward.register_fake
def _(grad_loss, hidden, weight, labels, ignore_index, label_smoothing, z_loss, chunk_size):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, ignore_index, label_smoothing, z_loss, reduction, chunk_size, _, labels_checked = inputs
    ctx.recompute = reduction == "none"
    ctx.count = mean_count(labels, ignore_index, reduction, labels_checked)
    ctx.options = (ignore_index, label_smoothing, z_loss, chunk_size)
    if ctx.recompute:
        ctx.save_for_backward(hidden, weight, labels)
    else:
        ctx.save_for_backward(output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the unused outputs


def _autograd_backward(ctx, grad_loss, _grad_of_grad_hidden, _grad_of_grad_weight):
    if ctx.recompute:
        hidden, weight, labels = ctx.saved_tensors
        grad_hidden, grad_weight = _backward(grad_loss, hidden, weight, labels, *ctx.options)
    else:  # consumed in place: a second backward fails torch's saved-tensor version check
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_loss = scaled_by_count(grad_loss, ctx.count)
        scale_saved_grad_(grad_hidden, grad_loss)
        scale_saved_grad_(grad_weight, grad_loss)
    return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    z_loss: float = 0.0,
    chunk_size: int | None = None,
    *,
    labels_checked: bool = False,
) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, labels, ...) with hidden (..., hidden_size), weight (vocab, hidden_size)
    as nn.Linear holds it (same dtype as hidden) and labels (...); the loss is fp32. chunk_size: tokens per
    chunk (default: a (chunk, vocab) logits buffer of about 128 MiB, at least 256 tokens). labels_checked: as in
    cross_entropy (the caller checked the labels on the host: no read-back here)."""
    labels = check_loss_args(labels, ignore_index, label_smoothing, reduction, z_loss)
    check_tensor("hidden", hidden)
    check_tensor("weight", weight, min_dim=2)
    check_same_device(hidden=hidden, weight=weight, labels=labels)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape (vocab, {hidden.shape[-1]}) to match hidden's last dimension, "
            f"got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight has dtype {weight.dtype}; use hidden's dtype ({hidden.dtype})")
    if weight.shape[0] == 0:
        raise ValueError("weight's first dimension (vocab) must be at least 1")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels must have shape {tuple(hidden.shape[:-1])} (hidden's shape without its last "
            f"dimension), got {tuple(labels.shape)}"
        )
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if extension(hidden.device) is None:
        return reference.linear_cross_entropy(hidden, weight, labels, ignore_index, label_smoothing, reduction, z_loss)
    tokens = labels.numel()
    chunk = chunk_size or default_chunk_size(tokens, weight.shape[0], hidden.dtype)
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss, _, _ = _forward(
        hidden.reshape(tokens, hidden.shape[-1]),
        weight,
        labels.reshape(-1),
        ignore_index,
        float(label_smoothing),
        float(z_loss),
        reduction,
        max(1, chunk),
        with_grad,
        bool(labels_checked),
    )
    return loss.reshape(labels.shape) if reduction == "none" else loss
