"""Selective activation checkpointing, applied to a plain model's layers from outside, on the layers that
model.checkpoint does not recompute whole. It uses torch's composable checkpoint (forward hooks), so no
module is wrapped and every parameter keeps its name.

Policies (what a layer keeps for its backward; the rest is recomputed there):
- ATTENTION (InternEvo's `selective_checkpoint=True`): everything but the attention core. Each layer's
  InnerAttention (softmax(q k^T) v) runs again in the backward; the projections', norms' and MLP's outputs
  are kept.
- MATMULS: only the matmul outputs (torch's selective checkpoint policy: aten mm / addmm / bmm outputs are
  saved); norms, rotary embeddings, activations and attention are recomputed.
offload (InternEvo's `selective_checkpoint_offload`, ATTENTION only): what a layer keeps goes to pinned host
memory during the forward and comes back for the backward (torch.autograd.graph.save_on_cpu). On the CPU
there is nowhere to offload to: a no-op there.
"""

import enum
import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed._composable import checkpoint as checkpoint_module
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

import pytrain.kernels  # noqa: F401  (registers torch.ops.pytrain.*)
from pytrain.model.decoder import InnerAttention


class SelectivePolicy(enum.Enum):
    ATTENTION = "attention"
    MATMULS = "matmuls"


@dataclass(frozen=True)
class SelectiveCheckpoint:
    policy: SelectivePolicy = SelectivePolicy.ATTENTION
    offload: bool = False


# pytrain's linear on fp32 copies (16-bit on a CPU without 16-bit units) counts as one matmul: its 16-bit output is
# kept, not the fp32 product inside it.
_MATMULS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.pytrain.linear_in_fp32.default,
}


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _MATMULS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_selective_checkpoint(stage: nn.Module, selective: SelectiveCheckpoint, device: torch.device) -> None:
    """Checkpoints the layers of `stage` (a Decoder or a pipeline stage of one) that it does not recompute
    whole (its first `recompute_layers`), per `selective`."""
    for layer in list(stage.decoder_layers.values())[stage.recompute_layers :]:
        if selective.policy is SelectivePolicy.MATMULS:
            checkpoint_module(layer, context_fn=functools.partial(create_selective_checkpoint_contexts, _save_matmuls))
            continue
        for core in (m for m in layer.modules() if isinstance(m, InnerAttention)):
            checkpoint_module(core)
        if selective.offload and device.type != "cpu":
            layer.forward = _saving_on_host(layer.forward)


def _saving_on_host(forward):
    """`forward` with the tensors autograd saves in it moved to pinned host memory until the backward."""

    @functools.wraps(forward)
    def run(*args, **kwargs):
        with torch.autograd.graph.save_on_cpu(pin_memory=True):
            return forward(*args, **kwargs)

    return run
