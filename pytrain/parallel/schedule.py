"""Schedules run one optimizer step's forward and backward passes over its micro-batches.

The step's loss is the mean over every non-ignored label of the global batch (all micro-batches of all
data-parallel ranks), not a mean of per-micro-batch means, so micro-batches with many ignored labels
(padding, prompts, document ends) weigh by the tokens they really have. Micro-batch m's loss enters as
criterion_mean_m * tokens_m * data_parallel_size / global_tokens: summed over micro-batches, and averaged
over data-parallel ranks by the optimizer, that is the global token mean.

A schedule takes the micro-batch count from each batch, not from the config: training steps have
data.micro_num (fewer while rampup_batch_size ramps up), validation steps data.valid_micro_num.
"""

import torch
import torch.distributed as dist

from pytrain.kernels import CheckedPositions, PackedSequences

IGNORE_INDEX = -100
# Checked on the host (PackedSequences, CheckedPositions) and moved to the device by micro_batch_inputs: the
# Trainer leaves them where the loader made them.
HOST_KEYS = ("cu_seqlens", "max_seqlen", "positions")


def micro_batch_weights(labels: torch.Tensor, data_parallel_group) -> torch.Tensor:
    """(micro_num,) factors turning each micro-batch's mean loss into its share of the global token mean."""
    tokens = (labels != IGNORE_INDEX).flatten(1).sum(1).to(torch.float32)
    total = tokens.sum()
    world = 1
    if data_parallel_group is not None and dist.get_world_size(data_parallel_group) > 1:
        dist.all_reduce(total, group=data_parallel_group)  # on the labels' device: the backend's
        world = dist.get_world_size(data_parallel_group)
    return tokens * world / total.clamp_min(1)


def micro_batch_loss(criterion, output, batch: dict, micro: int, type_losses):
    """The criterion on micro-batch `micro`; with type_losses (pytrain.model.TypeLosses), it also adds its token
    losses there by dataset type."""
    label = batch["labels"][micro]
    if type_losses is None:
        return criterion(output, label)
    return criterion(output, label, type_ids=batch["type_ids"][micro], type_losses=type_losses)


def micro_batch_inputs(batch: dict, micro: int) -> dict:
    """The model's position arguments for micro-batch `micro`, checked once on the host and moved to the device
    without a synchronization: packed rows' boundaries (PackedSequences, which also gives the positions), or
    unpacked rows' positions (CheckedPositions)."""
    device = batch["input_ids"].device
    if "cu_seqlens" in batch:
        return {"cu_seqlens": PackedSequences(batch["cu_seqlens"][micro].tolist(), device=device)}
    return {"positions": CheckedPositions(batch["positions"][micro], device=device)} if "positions" in batch else {}


class NonPipelineScheduler:
    """Gradient accumulation without a pipeline: micro-batch by micro-batch, forward then backward."""

    def __init__(self, data_parallel_group=None):
        self.data_parallel_group = data_parallel_group

    def forward_backward_step(
        self,
        model,
        batch: dict,
        criterion,
        optimizer,
        forward_only: bool = False,
        return_loss: bool = True,
        return_output_label: bool = False,
        type_losses=None,
    ):
        """type_losses: pytrain.model.TypeLosses to add the token losses to, by dataset type (or None)."""
        micro_num = batch["input_ids"].shape[0]
        weights = micro_batch_weights(batch["labels"], self.data_parallel_group)
        total_loss = torch.zeros((), dtype=torch.float32, device=batch["input_ids"].device)
        outputs, labels = [], []
        for index in range(micro_num):
            input_ids, label = batch["input_ids"][index], batch["labels"][index]
            with torch.set_grad_enabled(not forward_only):
                output = model(input_ids, **micro_batch_inputs(batch, index))
                loss = micro_batch_loss(criterion, output, batch, index, type_losses) * weights[index]
            if not forward_only:
                optimizer.backward(loss, last=index == micro_num - 1)
            total_loss += loss.detach().float()
            if return_output_label:
                outputs.append(output.detach())
                labels.append(label)
        return (outputs, labels) if return_output_label else None, total_loss if return_loss else None
