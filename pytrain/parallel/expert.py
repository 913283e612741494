"""Expert and tensor parallelism for mixture-of-experts blocks, applied from outside.

A model's MoE blocks (pytrain.model.moe.MoE) are written plain: every expert stacked along dim 0 of three
weights, and a dispatcher that groups one process's token assignments by expert. `apply_expert_parallel`
splits them over the expert group (parallel.expert.size data ranks) and the tensor group:

- The experts, by expert index: the rank at expert rank p and tensor rank t holds block p * tensor + t
  of the num_experts / (expert x tensor) experts each. A dim-0 ShardSpec, so checkpoints reshard
  between layouts like any other shard.
- The dispatcher becomes an ExpertParallelDispatcher. Of its tokens' assignments, this rank takes those
  whose expert sits at its tensor rank (on any expert rank), sends each to its expert's rank with one
  all-to-all over the expert group, runs its experts on what it receives, and sends the results back.
  The all-to-all's split sizes are read back to the host once per layer (on a GPU its one synchronization,
  which also gives moe_permute its row count); everything else stays on the device.
- Under tensor parallelism the block sees the whole sequence on every tensor rank (entered as a
  column-parallel layer is: a copy, or an all-gather under sequence parallelism), and its output is the
  sum over the tensor ranks (an all-reduce, or a reduce-scatter), as a row-parallel layer's is. Each tensor
  rank contributes its experts and its slice of the dense shared/residual MLP, split as the dense MLP is
  but without collectives of its own. The router and the mixing gates are whole on every rank; their
  gradients are partial and summed over the tensor group, so each rank's aux loss counts 1/tensor.

Why split experts by index over the tensor ranks, not each expert's columns: one all-to-all and one reduce
per block at any tensor size, and every expert's GEMM stays whole. The price: num_experts must be a
multiple of expert size x tensor size (pytrain.config checks it).

Expert weights are replicated over the expert-data group (the data ranks holding the same experts), so
their gradients are averaged there instead of over the whole data group (ParamInfo.replicas); even left
whole (expert and tensor size 1) they are named as expert weights, for their own ZeRO-1 group
(parallel.expert_zero1).
"""

import torch
import torch.distributed as dist
from torch import nn

from pytrain.kernels import Linear, moe_permute
from pytrain.model.moe import LocalDispatcher, MoE, count_per_expert

from .shard_spec import ShardSpec
from .tensor import enter_parallel_region, group_rank, group_size, leave_parallel_region


class _AllToAll(torch.autograd.Function):
    """Rows exchanged over the group: in_splits[r] rows go to rank r, out_splits[r] come from it; the
    backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.group), None, None, None


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class ExpertParallelDispatcher(LocalDispatcher):
    """Assignments to experts held elsewhere in the expert group go there and back (module docstring).

    dispatch returns this rank's experts' rows only (experts_per_rank groups); combine gives, per token,
    the weighted sum over the assignments this rank took: the other tensor ranks' experts add theirs in
    the block's tensor reduce."""

    def __init__(self, num_experts: int, expert_group, tensor_size: int, tensor_rank: int):
        super().__init__(num_experts)
        self.group = expert_group
        self.expert_size = group_size(expert_group)
        self.tensor_size, self.tensor_rank = tensor_size, tensor_rank
        self.experts_per_rank = num_experts // (self.expert_size * tensor_size)

    def runs_dropped(self, device: torch.device) -> bool:
        return False  # a dropped assignment (-1) is sent nowhere: the split sizes are read back anyway

    def dispatch(self, x: torch.Tensor, expert_ids: torch.Tensor, num_kept: int | None = None):
        """num_kept: unused; this rank takes only some of the assignments, and counts them itself."""
        per_rank, ranks = self.experts_per_rank, self.expert_size
        block = expert_ids.div(per_rank, rounding_mode="floor")
        taken = (expert_ids >= 0) & (block % self.tensor_size == self.tensor_rank)
        # numbered by (destination expert rank, its local expert): moe_permute groups the rows that way
        slot = torch.where(taken, block // self.tensor_size * per_rank + expert_ids - block * per_rank, -1)
        if ranks == 1:  # tensor parallelism alone: nothing to exchange; moe_permute reads its row count (the one read)
            rows, row_of, counts = moe_permute(x, slot, per_rank)
            return rows, counts, (row_of, None)
        counts = count_per_expert(slot, ranks * per_rank)
        received_counts = torch.empty_like(counts)
        dist.all_to_all_single(received_counts, counts, group=self.group)
        # the one host read: rows sent per (destination rank, its expert), received per (source rank, my expert)
        sent, received = torch.stack((counts, received_counts)).view(2, ranks, per_rank).tolist()
        send_splits, receive_splits = [sum(r) for r in sent], [sum(r) for r in received]
        rows, row_of, _ = moe_permute(x, slot, ranks * per_rank, num_kept=sum(send_splits))
        arrived = _AllToAll.apply(rows, receive_splits, send_splits, self.group)  # by source, then expert
        # regrouped by expert (then source, each source's rows in order: a stable sort): the groups GroupedExperts runs
        total = sum(receive_splits)
        expert_of_row = torch.arange(ranks * per_rank, device=x.device) % per_rank
        expert_of_row = expert_of_row.repeat_interleave(received_counts, output_size=total)
        regroup = torch.sort(expert_of_row, stable=True).indices
        ungroup = torch.empty_like(regroup)
        ungroup[regroup] = torch.arange(total, device=x.device)
        tokens_per_expert = received_counts.view(ranks, per_rank).sum(0)
        return arrived.index_select(0, regroup), tokens_per_expert, (row_of, (send_splits, receive_splits, ungroup))

    def combine(self, y_sorted: torch.Tensor, weights: torch.Tensor, state) -> torch.Tensor:
        row_of, exchange = state
        if exchange is not None:
            send_splits, receive_splits, ungroup = exchange
            y_sorted = _AllToAll.apply(y_sorted.index_select(0, ungroup), send_splits, receive_splits, self.group)
        return super().combine(y_sorted, weights, row_of)


def _shard(param: nn.Parameter, spec: ShardSpec) -> nn.Parameter:
    return nn.Parameter(torch.empty(spec.local_shape, dtype=param.dtype, device=param.device))


def _split_linear(linear: nn.Linear, dim: int, rank: int, world: int) -> tuple[nn.Linear, dict]:
    """A slice of a dense linear inside the block (no collective of its own): output features (dim 0) or
    input features (dim 1)."""
    full = tuple(linear.weight.shape)
    spec = ShardSpec.split(full, dim, rank, world)
    local = Linear(spec.local_shape[1], spec.local_shape[0], bias=linear.bias is not None, device=linear.weight.device)
    specs = {"weight": (spec, False)}
    if linear.bias is not None:
        if dim == 1:
            raise ValueError("a shared expert's down projection with a bias cannot be split over tensor ranks")
        specs["bias"] = (ShardSpec.split((full[0],), 0, rank, world), False)
    return local.to(linear.weight.dtype), specs


def apply_expert_parallel(stage: nn.Module, tensor_group, expert_group, sequence_parallel: bool) -> tuple[dict, set]:
    """Splits every MoE block of `stage` (see the module docstring). Returns ({parameter name: (ShardSpec,
    partial gradient over the tensor group)}, the names of the expert weights: replicated over the
    expert-data group only)."""
    tensor_size, tensor_rank = group_size(tensor_group), group_rank(tensor_group)
    expert_size, expert_rank = group_size(expert_group), group_rank(expert_group)
    facts, experts = {}, set()
    for name, block in list(stage.named_modules()):
        if not isinstance(block, MoE):
            continue
        layer = block.moe_layer
        # expert weights even when left whole: their own ZeRO-1 domain (parallel.expert_zero1)
        experts.update(f"{name}.moe_layer.experts.{weight}" for weight, _ in layer.experts.named_parameters())
        if tensor_size == expert_size == 1:
            continue
        num_experts = layer.experts.w1.shape[0]
        if num_experts % (expert_size * tensor_size):
            raise ValueError(
                f"{name}: {num_experts} experts cannot be split over expert size {expert_size} x tensor size "
                f"{tensor_size}"
            )
        owner = expert_rank * tensor_size + tensor_rank
        for weight_name, param in list(layer.experts.named_parameters(recurse=False)):
            spec = ShardSpec.split(tuple(param.shape), 0, owner, expert_size * tensor_size)
            setattr(layer.experts, weight_name, _shard(param, spec))
            facts[f"{name}.moe_layer.experts.{weight_name}"] = (spec, False)
        layer.dispatcher = ExpertParallelDispatcher(num_experts, expert_group, tensor_size, tensor_rank)
        if tensor_size == 1:
            continue
        layer.aux_loss_share = 1.0 / tensor_size
        for part, module in list(block.named_modules()):
            if part.startswith("moe_layer.experts") or part == "" or not isinstance(module, nn.Linear):
                continue
            mlp, _, linear = part.rpartition(".")
            if mlp == "residual_mlp":  # the dense MLP beside the experts: w1, w3 by output, w2 by input
                local, specs = _split_linear(module, 1 if linear == "w2" else 0, tensor_rank, tensor_size)
                block.set_submodule(part, local)
            else:  # the router and the mixing gates: whole, gradient partial
                specs = {n: (ShardSpec.whole(p.shape), True) for n, p in module.named_parameters()}
            facts.update({f"{name}.{part}.{n}": fact for n, fact in specs.items()})
        block.register_forward_pre_hook(
            lambda _, args: (enter_parallel_region(args[0], tensor_group, sequence_parallel), *args[1:])
        )
        block.register_forward_hook(lambda *hook: leave_parallel_region(hook[2], tensor_group, sequence_parallel))
    return facts, experts
