"""Fused cross-entropy (softmax + NLL, optional label smoothing and z-loss) and its vocab-parallel form.

The forward computes each row's logsumexp in one streaming pass and, when the logits need a gradient,
writes that gradient (already scaled for the reduction) into one buffer of the logits' dtype; the
backward only multiplies it by grad_output, in place. Peak extra memory: that one logits-sized buffer.
No second vocab-sized fp32 tensor is ever made. Kernels: pytrain._C (CPU), pytrain._C_cuda (CUDA).

`mean` averages over tokens whose label is not ignore_index; when every label is ignored it is NaN,
as in F.cross_entropy (and its gradient is zero).

Labels are range-checked on every call, which reads three numbers back to the host (on a GPU: a
synchronization). labels_checked=True skips it for labels the caller checked where they were made (the data
loader's host tensors: `check_labels_in_range`); an out-of-range label then gives a wrong loss for its row,
never an out-of-bounds read (the kernels read the target logit only for labels inside the logits' vocab).
"""

from collections.abc import Sequence

import torch
import torch.distributed as dist

from . import reference
from ._backend import DTYPE_CODES, empty_output_like, extension, launch_args, parallelism
from ._checks import check_same_device, check_tensor

REDUCTIONS = ("mean", "sum", "none")


def check_loss_args(labels, ignore_index, label_smoothing, reduction, z_loss):
    """Validates the arguments every cross-entropy op shares; returns labels as int64."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels has dtype {labels.dtype}; supported: torch.int64, torch.int32")
    if not labels.is_contiguous():
        raise ValueError("labels must be contiguous (call .contiguous() on it first)")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if not z_loss >= 0.0 or z_loss == float("inf"):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    return labels.long()


def check_labels_in_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> int:
    """Raises ValueError for labels outside [0, vocab) other than ignore_index; returns the count of
    non-ignored labels. One small reduction and one host sync: the kernels must never index out of range."""
    if labels.numel() == 0:
        return 0
    valid = labels != ignore_index
    masked = torch.where(valid, labels, 0)
    low, high, count = torch.stack((masked.min(), masked.max(), valid.sum())).tolist()
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index ({ignore_index}); found {bad}")
    return int(count)


def reduce_rows(loss_rows: torch.Tensor, reduction: str, count: int) -> torch.Tensor:
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total if reduction == "sum" else total / count  # 0 / 0 = NaN when every label is ignored; count may
    # be a device tensor (labels_checked): no host read


def grad_scale_for(reduction: str, count: int) -> float:
    return 1.0 / count if reduction == "mean" and count > 0 else 1.0


def run_kernel(
    name: str,
    logits,
    labels,
    *,
    loss=None,
    lse=None,
    partial_stats=None,
    grad=None,
    row_scale=None,
    grad_scale=1.0,
    vocab_start=0,
    total_vocab=None,
    ignore_index=-100,
    label_smoothing=0.0,
    z_loss=0.0,
):
    """Calls pytrain._C(_cuda).cross_entropy_{forward,gradient} on contiguous (rows, vocab) logits."""
    rows, vocab = logits.shape
    workers = parallelism(logits, rows)
    # The CPU forward keeps each row's exponentials in an fp32 row per thread (a few MB at most).
    needs_workspace = grad is not None and logits.device.type == "cpu" and name == "cross_entropy_forward"
    workspace = torch.empty(workers, vocab, dtype=torch.float32) if needs_workspace else None
    address = lambda t: 0 if t is None else t.data_ptr()
    getattr(extension(logits.device), name)(
        address(logits),
        address(labels),
        address(loss),
        address(lse),
        address(partial_stats),
        address(grad),
        address(row_scale),
        address(workspace),
        grad_scale,
        rows,
        vocab,
        vocab_start,
        total_vocab or vocab,
        ignore_index,
        label_smoothing,
        z_loss,
        DTYPE_CODES[logits.dtype],
        workers,
        **launch_args(logits),
    )


# ---------------------------------------------------------------------------------------------------
# The unsharded op.


@torch.library.custom_op("pytrain::cross_entropy_forward", mutates_args=())
def _forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    reduction: str,
    with_grad: bool,
    labels_checked: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, vocab = logits.shape
    if labels_checked:  # the count stays on the device; "mean" divides the gradient in the backward (mean_count)
        count, grad_scale = (labels != ignore_index).sum(), 1.0
    else:
        count = check_labels_in_range(labels, vocab, ignore_index)
        grad_scale = grad_scale_for(reduction, count)
    loss_rows = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(loss_rows)
    grad = empty_output_like(logits) if with_grad else logits.new_empty(0)
    run_kernel(
        "cross_entropy_forward",
        logits,
        labels,
        loss=loss_rows,
        lse=lse,
        grad=grad if with_grad else None,
        grad_scale=grad_scale,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
    )
    return reduce_rows(loss_rows, reduction, count), grad


@_forward.register_fake
def _(logits, labels, ignore_index, label_smoothing, z_loss, reduction, with_grad, labels_checked):
    loss_shape = (logits.shape[0],) if reduction == "none" else ()
    grad = torch.empty_like(logits) if with_grad else logits.new_empty(0)
    return logits.new_empty(loss_shape, dtype=torch.float32), grad


@torch.library.custom_op("pytrain::scale_saved_grad_", mutates_args=("grad",))
def scale_saved_grad_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad *= grad_output in place (a scalar, or one value per row of grad). Skipped on the CPU when
    grad_output is 1, the usual `loss.backward()`; on CUDA reading it would cost a sync."""
    if grad_output.dim() == 0:
        if grad.device.type == "cpu" and grad_output.item() == 1.0:
            return
        grad.mul_(grad_output.to(grad.dtype))
    else:
        grad.mul_(grad_output.reshape(grad_output.shape[0], *([1] * (grad.dim() - 1))).to(grad.dtype))


@scale_saved_grad_.register_fake
def _(grad, grad_output):
    return None


def mean_count(labels, ignore_index: int, reduction: str, labels_checked: bool):
    """The device count "mean" divides the gradient by in the backward when the forward left it unscaled."""
    return (labels != ignore_index).sum().clamp_min(1) if labels_checked and reduction == "mean" else None


def scaled_by_count(grad_loss, count):
    return grad_loss.contiguous() if count is None else (grad_loss / count).contiguous()


def _setup_context(ctx, inputs, output):
    _, labels, ignore_index, _, _, reduction, _, labels_checked = inputs
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled logits-sized gradient for the unused output
    ctx.count = mean_count(labels, ignore_index, reduction, labels_checked)


def _autograd_backward(ctx, grad_loss, _grad_of_grad):
    # The saved gradient is consumed: a second backward through the same graph fails torch's
    # saved-tensor version check instead of returning a wrong gradient.
    if grad_loss is None:  # the loss itself was not used
        return None, None, None, None, None, None, None, None
    (grad,) = ctx.saved_tensors
    scale_saved_grad_(grad, scaled_by_count(grad_loss, ctx.count))
    return grad, None, None, None, None, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def _check_logits(name: str, logits, labels):
    check_tensor(name, logits)
    check_same_device(**{name: logits, "labels": labels})
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have shape {tuple(logits.shape[:-1])} (the {name}' shape without its last "
            f"dimension), got {tuple(labels.shape)}"
        )
    if logits.shape[-1] == 0:
        raise ValueError(f"{name}' last dimension (vocab) must be at least 1")


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    z_loss: float = 0.0,
    *,
    labels_checked: bool = False,
) -> torch.Tensor:
    """F.cross_entropy over the last dimension of logits (..., vocab) with labels (...), in fp32.

    z_loss adds z_loss * logsumexp(logits)^2 per token (PaLM). Returns a float32 scalar, or the
    per-token losses shaped like labels for reduction="none" (0 where ignored). labels_checked: see the module's
    docstring (no host read-back).
    """
    labels = check_loss_args(labels, ignore_index, label_smoothing, reduction, z_loss)
    _check_logits("logits", logits, labels)
    if extension(logits.device) is None:
        return reference.cross_entropy(logits, labels, ignore_index, label_smoothing, reduction, z_loss)
    vocab = logits.shape[-1]
    with_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _ = _forward(
        logits.reshape(-1, vocab),
        labels.reshape(-1),
        ignore_index,
        float(label_smoothing),
        float(z_loss),
        reduction,
        with_grad,
        bool(labels_checked),
    )
    return loss.reshape(labels.shape) if reduction == "none" else loss


# ---------------------------------------------------------------------------------------------------
# Vocab-parallel: each rank of `group` holds a contiguous vocab slice of the logits.


def _shard_statistics(logits, labels, vocab_start, ignore_index, label_smoothing):
    """(rows, 4) per-row max, sum exp(x - max), target logit (0 off-shard), sum of logits."""
    if extension(logits.device) is None:
        return reference.cross_entropy_shard_statistics(logits, labels, vocab_start, ignore_index)
    stats = torch.empty(logits.shape[0], 4, dtype=torch.float32, device=logits.device)
    run_kernel(
        "cross_entropy_forward",
        logits,
        labels,
        partial_stats=stats,
        vocab_start=vocab_start,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )
    return stats


def _shard_gradient(logits, labels, lse, grad_scale, vocab_start, total_vocab, ignore_index, label_smoothing, z_loss):
    if extension(logits.device) is None:
        return reference.cross_entropy_shard_gradient(
            logits, labels, lse, grad_scale, vocab_start, total_vocab, ignore_index, label_smoothing, z_loss
        )
    grad = empty_output_like(logits)
    run_kernel(
        "cross_entropy_gradient",
        logits,
        labels,
        lse=lse,
        grad=grad,
        grad_scale=grad_scale,
        vocab_start=vocab_start,
        total_vocab=total_vocab,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
    )
    return grad


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group, ignore_index, label_smoothing, reduction, z_loss, labels_checked, sizes):
        _rows, shard_vocab = logits.shape
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if sizes is None:
            shard_sizes = torch.zeros(world, dtype=torch.int64, device=logits.device)  # shards may differ in size
            shard_sizes[rank] = shard_vocab
            dist.all_reduce(shard_sizes, group=group)
            sizes = shard_sizes.tolist()
        elif len(sizes) != world or sizes[rank] != shard_vocab:
            raise ValueError(
                f"vocab_sizes {list(sizes)} must list each of the group's {world} ranks' shard sizes; this rank "
                f"(rank {rank}) holds {shard_vocab}"
            )
        vocab_start, total_vocab = sum(sizes[:rank]), sum(sizes)
        if labels_checked:
            count, grad_scale = (labels != ignore_index).sum(), 1.0
        else:
            count = check_labels_in_range(labels, total_vocab, ignore_index)
            grad_scale = grad_scale_for(reduction, count)
        ctx.count = mean_count(labels, ignore_index, reduction, labels_checked)

        stats = _shard_statistics(logits, labels, vocab_start, ignore_index, label_smoothing)
        global_max = stats[:, 0].clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        sums = stats[:, 1:].clone()
        sums[:, 0] *= torch.exp(stats[:, 0] - global_max).nan_to_num_(0.0)  # rescale to the group's max
        dist.all_reduce(sums, group=group)  # sum exp, target logit (one rank has it), sum of logits
        lse = global_max + sums[:, 0].log()
        valid = labels != ignore_index
        loss_rows = (
            lse - (1 - label_smoothing) * sums[:, 1] - label_smoothing / total_vocab * sums[:, 2] + z_loss * lse * lse
        )
        loss_rows = torch.where(valid, loss_rows, 0.0)

        ctx.reduction = reduction
        if logits.requires_grad:
            grad = _shard_gradient(
                logits,
                labels,
                torch.where(valid, lse, 0.0).contiguous(),
                grad_scale,
                vocab_start,
                total_vocab,
                ignore_index,
                label_smoothing,
                z_loss,
            )
            ctx.save_for_backward(grad)
        return reduce_rows(loss_rows, reduction, count)

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        scale_saved_grad_(grad, scaled_by_count(grad_loss, ctx.count))
        return grad, None, None, None, None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits_shard: torch.Tensor,
    labels: torch.Tensor,
    group=None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    z_loss: float = 0.0,
    *,
    labels_checked: bool = False,
    vocab_sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """cross_entropy of logits split over the vocab across the ranks of `group` (torch.distributed).

    logits_shard (..., shard_vocab) is this rank's contiguous slice, ranks in order (rank 0 holds the
    first classes); labels (...) are global class ids, the same on every rank. Returns the same loss on
    every rank, equal to cross_entropy of the concatenated logits; the gradient is w.r.t. the local shard.
    Small all-reduces per call: shard sizes, the row max, then sum-exp / target logit / sum of logits together.
    vocab_sizes: every rank's shard size, in rank order (the model knows its split): no shard-size all-reduce and
    read-back. labels_checked: as in cross_entropy. With both, the call reads nothing back to the host.
    """
    labels = check_loss_args(labels, ignore_index, label_smoothing, reduction, z_loss)
    _check_logits("logits_shard", logits_shard, labels)
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("vocab_parallel_cross_entropy needs an initialized torch.distributed process group")
    vocab = logits_shard.shape[-1]
    loss = _VocabParallelCrossEntropy.apply(
        logits_shard.reshape(-1, vocab),
        labels.reshape(-1),
        group,
        ignore_index,
        float(label_smoothing),
        reduction,
        float(z_loss),
        bool(labels_checked),
        None if vocab_sizes is None else [int(n) for n in vocab_sizes],
    )
    return loss.reshape(labels.shape) if reduction == "none" else loss
