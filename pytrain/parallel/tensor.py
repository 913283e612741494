"""Tensor parallelism, Megatron style (parallel.tensor.mode "mtp"), with sequence parallelism ("msp").

A column-parallel linear holds a slice of the output features, a row-parallel linear a slice of the input
features: attention's Wqkv (by heads) and the MLP's w1/w3 are column-parallel, out_proj and w2 row-parallel,
so each layer's two matmuls need one all-reduce forward and one backward. The embedding is split along
the vocabulary or along hidden (embed_split_hidden); the LM head is column-parallel over the vocabulary and,
with parallel_output, its logits stay sharded for the vocab-parallel cross-entropy.

With sequence parallelism the residual stream between the matmuls (norms, residual adds, what a pipeline
stage sends) is split along the sequence instead of replicated: the all-reduce after a row-parallel
linear becomes a reduce-scatter over the sequence and the copy before a column-parallel linear an
all-gather, the same bytes on the wire for 1/tensor-size of the activation memory. Norm weights then see
only their rank's tokens, so their gradients are summed over the tensor group (`sequence_parallel` mark).

Every layer here is also the plain layer when the group is None (one tensor rank): no communication.
Each sharded weight knows how to cut its shard out of the full tensor (`shard`), which is how weights are
initialised identically in every layout and how a full state dict is loaded into one.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    return x.chunk(group_size(group), dim=dim)[group_rank(group)].contiguous()


# torch >= 2.13 renames reduce_scatter_tensor (NCCL, and gloo since torch 2.2) to reduce_scatter_single.
_reduce_scatter_into = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum over the group, each rank keeping its slice along `dim`."""
    stacked = x.movedim(dim, 0).contiguous()  # the slices along dim 0, as the collective wants them
    out = stacked.new_empty((stacked.shape[0] // group_size(group), *stacked.shape[1:]))
    _reduce_scatter_into(out, stacked, group=group)
    return out.movedim(0, dim).contiguous()


class _CopyToGroup(torch.autograd.Function):
    """Forward: identity (the input is replicated); backward: sum the gradients of every rank."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """Forward: sum the partial results of every rank; backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Gather(torch.autograd.Function):
    """Forward: concatenate every rank's slice along `dim`; backward: keep this rank's slice of the gradient.
    reduce_grad: the gathered tensor is used differently on each rank (sequence parallel), so the slice's
    gradient is the sum over ranks (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, dim, group, reduce_grad):
        ctx.dim, ctx.group, ctx.reduce_grad = dim, group, reduce_grad
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        split = _reduce_scatter if ctx.reduce_grad else _split
        return split(grad, ctx.dim, ctx.group), None, None, None


class _Scatter(torch.autograd.Function):
    """Forward: this rank's slice along `dim` (of a tensor replicated, or to be summed with reduce=True);
    backward: the gathered gradient."""

    @staticmethod
    def forward(ctx, x, dim, group, reduce):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group) if reduce else _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None, None


SEQUENCE_DIM = 1  # activations are (batch, seq, hidden)


def enter_parallel_region(x, group, sequence_parallel: bool):
    """Before a column-parallel matmul: the full input on every rank."""
    if group is None:
        return x
    if sequence_parallel:
        return _Gather.apply(x, SEQUENCE_DIM, group, True)
    return _CopyToGroup.apply(x, group)


def leave_parallel_region(x, group, sequence_parallel: bool):
    """After a row-parallel matmul: partial sums -> the sum (sequence parallel: this rank's tokens of it)."""
    if group is None:
        return x
    if sequence_parallel:
        return _Scatter.apply(x, SEQUENCE_DIM, group, True)
    return _ReduceFromGroup.apply(x, group)


def gather_last_dim(x, group):
    """Sharded features -> all features on every rank (the logits without parallel_output)."""
    return x if group is None else _Gather.apply(x, x.dim() - 1, group, False)


def scatter_sequence(x, group):
    """A replicated (batch, seq, ...) tensor -> this rank's slice of the sequence (sequence parallel)."""
    return x if group is None else _Scatter.apply(x, SEQUENCE_DIM, group, False)


def gather_sequence(x, group):
    """This rank's tokens -> the whole sequence, e.g. the final hidden states before the head."""
    return x if group is None else _Gather.apply(x, SEQUENCE_DIM, group, True)


class ShardedWeight:
    """A weight split along `split_dim` over the tensor group. `segments`: sizes along split_dim of the
    parts the full weight is made of (Wqkv: q, k and v heads), each split evenly, so every rank holds
    whole heads of each."""

    def _setup_sharding(self, group, split_dim: int, segments: list[int]):
        self.group, self.split_dim, self.segments = group, split_dim, segments
        self.weight.is_tensor_parallel = group_size(group) > 1

    @property
    def full_shape(self) -> torch.Size:
        shape = list(self.weight.shape)
        shape[self.split_dim] = sum(self.segments)
        return torch.Size(shape)

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full weight."""
        world, rank = group_size(self.group), group_rank(self.group)
        pieces = full.split(self.segments, dim=self.split_dim)
        return torch.cat([p.chunk(world, dim=self.split_dim)[rank] for p in pieces], dim=self.split_dim)


def counted_here(param: torch.Tensor, tensor_rank: int) -> bool:
    """Whether this rank counts `param` in a model-wide sum over the model-parallel group (parameter count,
    gradient norm): shards everywhere, a weight replicated over the tensor group (norms) on its first rank
    only, the last stage's copy of a tied embedding nowhere."""
    if getattr(param, "shared_copy", False):
        return False
    return tensor_rank == 0 or getattr(param, "is_tensor_parallel", False)


def _local(size: int, group, what: str) -> int:
    world = group_size(group)
    if size % world:
        raise ValueError(f"{what} {size} cannot be split over {world} tensor-parallel ranks")
    return size // world


class ColumnParallelLinear(nn.Linear, ShardedWeight):
    """y = x W^T with W's output features split over the group; the output stays split.
    segments: the output features' parts (each split evenly); default one part."""

    def __init__(self, in_features, out_features, group=None, sequence_parallel=False, segments=None, dtype=None):
        segments = segments or [out_features]
        local = sum(_local(s, group, "output features") for s in segments)
        super().__init__(in_features, local, bias=False, dtype=dtype)
        self._setup_sharding(group, 0, segments)
        self.sequence_parallel = sequence_parallel

    def forward(self, x):
        return F.linear(enter_parallel_region(x, self.group, self.sequence_parallel), self.weight)


class RowParallelLinear(nn.Linear, ShardedWeight):
    """y = x W^T with W's input features split over the group: takes split input, returns the full sum
    (sequence parallel: this rank's tokens of it)."""

    def __init__(self, in_features, out_features, group=None, sequence_parallel=False, dtype=None):
        super().__init__(_local(in_features, group, "input features"), out_features, bias=False, dtype=dtype)
        self._setup_sharding(group, 1, [in_features])
        self.sequence_parallel = sequence_parallel

    def forward(self, x):
        return leave_parallel_region(F.linear(x, self.weight), self.group, self.sequence_parallel)


class ParallelEmbedding(nn.Module, ShardedWeight):
    """Token embedding split over the group along hidden (split_hidden=True, InternLM's default: each rank
    looks up its columns, then all-gather) or along the vocabulary (each rank looks up the ids it holds,
    zeros elsewhere, then all-reduce). With sequence parallelism each rank keeps its tokens only."""

    def __init__(self, vocab_size, hidden_size, group=None, split_hidden=True, sequence_parallel=False, dtype=None):
        super().__init__()
        self.split_hidden, self.sequence_parallel = split_hidden, sequence_parallel
        shape = (
            (vocab_size, _local(hidden_size, group, "hidden size"))
            if split_hidden
            else (_local(vocab_size, group, "vocabulary size"), hidden_size)
        )
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype))
        self._setup_sharding(group, 1 if split_hidden else 0, [hidden_size if split_hidden else vocab_size])

    def forward(self, input_ids):
        group = self.group
        if group is None:
            return F.embedding(input_ids, self.weight)
        if self.split_hidden:
            out = gather_last_dim(F.embedding(input_ids, self.weight), group)
            return scatter_sequence(out, group) if self.sequence_parallel else out
        start = group_rank(group) * self.weight.shape[0]
        local_ids = input_ids - start
        outside = (local_ids < 0) | (local_ids >= self.weight.shape[0])
        out = F.embedding(local_ids.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return _Scatter.apply(out, SEQUENCE_DIM, group, True)
        return _ReduceFromGroup.apply(out, group)
