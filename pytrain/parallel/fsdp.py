"""Fully sharded data parallelism with torch's FSDP2 (`fully_shard`), applied to a ModelPart from outside.

`parallel.zero1 = dict(size=N, fsdp=True)`: what ZeRO-1 shards (optimizer state) plus the parameters and the
gradients, over the same zero1 group (the mesh's `fsdp`; replicated over the zero1 runs when there are
several, torch's HSDP). isp's weight parallelism (`parallel.weight.size`) is the same over the mesh's weight runs
(pytrain.parallel.mesh), with its own settings: units per layer or per linear, and prefetching.

Units, each gathered whole just before it runs and freed after: every decoder layer;
the experts of an MoE layer, over the expert weights' own group (the mesh's `expert_fsdp`); the embedding
and the head (kept with the stage's root when tied to each other); with fp32 norms each norm (its
parameters stay fp32 while the rest computes in 16 bits); the rest of the stage (final norm) in the root.

Mixed precision as ZeRO-1's: the sharded parameters are fp32 and are the optimizer's masters; a 16-bit run
gathers them in its dtype (param_dtype) and reduces gradients in fp32. Gradients are summed, not averaged
(divide factor 1): the optimizer divides by the data-parallel size as it does for ZeRO-1, so the expert
weights (reduced over fewer ranks) get the same divisor as ZeRO-1 gives them.

Each rank's piece of a parameter is torch.chunk(its tensor-parallel shard, zero1 size, dim 0)[zero1 rank]:
its ParamInfo's ShardSpec is narrowed accordingly (ShardSpec.chunk_rows), so checkpoints of FSDP layouts
load into ZeRO-1 layouts and back through the same full-name + shard-spec map.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from pytrain.kernels import RMSNorm
from pytrain.model.moe import GroupedExperts


@dataclass(frozen=True)
class FSDPSettings:
    reshard_after_forward: bool = True  # free each unit's gathered parameters after its forward
    # isp's weight parallelism (parallel.weight): forward_overlap_per="module" makes each linear of a layer a unit
    # of its own (gathered one at a time: less memory, more collectives); overlap=True starts the next unit's
    # gather before this one runs (forward) and the previous one's (backward)
    unit_per_linear: bool = False
    prefetch: bool = False


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """This rank's values of a parameter: an FSDP parameter's (DTensor) local shard, a view of its storage
    (writing it writes the parameter); any other tensor itself."""
    if isinstance(param, DTensor):
        with torch.no_grad():
            return param.to_local()
    return param


def apply_fsdp(stages: list[nn.Module], mesh, dtype: torch.dtype, fp32_norms: bool, settings: FSDPSettings) -> None:
    """Shards each stage (the ModelPart's, after initialisation) over the mesh's fsdp axes, in place: each
    becomes an FSDP root whose parameters are fp32 DTensors."""
    compute = None if dtype == torch.float32 else dtype
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32, cast_forward_inputs=False)
    own_dtype = MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False)  # fp32 norms
    shard = _sharder(mesh.fsdp, settings.reshard_after_forward)
    shard_experts = _sharder(mesh.expert_fsdp, settings.reshard_after_forward)
    for stage in stages:
        stage.float()  # the sharded parameters are the fp32 masters
        for module in stage.modules():
            if isinstance(module, GroupedExperts):
                shard_experts(module, policy)
            elif fp32_norms and compute is not None and isinstance(module, (RMSNorm, nn.LayerNorm)):
                shard(module, own_dtype)
        layers = list(stage.decoder_layers.values())
        for layer in layers:
            if settings.unit_per_linear:
                for linear in [m for m in layer.modules() if isinstance(m, nn.Linear)]:
                    shard(linear, policy)
            shard(layer, policy)
        if settings.prefetch:
            for earlier, later in itertools.pairwise(layers):
                earlier.set_modules_to_forward_prefetch([later])
                later.set_modules_to_backward_prefetch([earlier])
        tied = stage.first and stage.last and stage.lm_head.weight is stage.token_embedding.weight
        for end in () if tied else (stage.token_embedding, stage.lm_head):
            if end is not None:
                shard(end, policy)
        # the root (the final norm; a tied embedding and head) too: left gathered, a forward-only pass (validation)
        # would leave it unsharded
        shard(stage, policy)
        for module in stage.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)  # a plain sum: gloo has no pre-multiplied sum


def reshard_fsdp(model: nn.Module) -> None:
    """Frees the gathered parameters of every FSDP unit of `model` (none: nothing to do): a forward without
    backward leaves those with reshard_after_forward=False gathered, and their parameters unsharded."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _sharder(fsdp_mesh: DeviceMesh, reshard_after_forward: bool):
    def shard(module: nn.Module, policy: MixedPrecisionPolicy) -> None:
        fully_shard(module, mesh=fsdp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)

    return shard
