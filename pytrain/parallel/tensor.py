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

The model is written plain (pytrain.model.decoder); `apply_tensor_parallel` swaps its modules by name,
following the model's `tensor_parallel_plan()`, for the parallel layers below, which keep the plain
modules' names and call signatures. It returns where each parameter's shard sits in the full parameter
(a ShardSpec), which is how weights are initialised identically in every layout and how checkpoints and
Hugging Face weights are cut for (or gathered from) any layout.
"""

import re

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pytrain.kernels import linear
from pytrain.model.decoder import Colwise, EmbeddingSplit, Replicated, Rowwise, VocabHead

from .shard_spec import ShardSpec


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


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output features split over the group; the output stays split
    (gather_output: all features on every rank, the LM head without parallel_output; normalized_rows: each
    row of W L2-normalised at use, a normalised LM head, whose rows a rank holds whole)."""

    def __init__(
        self,
        weight_shape,
        bias: bool,
        group,
        sequence_parallel: bool,
        gather_output: bool = False,
        normalized_rows: bool = False,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(weight_shape))
        self.bias = nn.Parameter(torch.empty(weight_shape[0])) if bias else None
        self.group, self.sequence_parallel, self.gather_output = group, sequence_parallel, gather_output
        self.normalized_rows = normalized_rows

    def forward(self, x):
        weight = F.normalize(self.weight, dim=-1) if self.normalized_rows else self.weight
        y = linear(enter_parallel_region(x, self.group, self.sequence_parallel), weight, self.bias)
        return gather_last_dim(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input features split over the group: takes split input, returns the full sum
    (sequence parallel: this rank's tokens of it); the bias is whole and added once, after the sum."""

    def __init__(self, weight_shape, bias: bool, group, sequence_parallel: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(weight_shape))
        self.bias = nn.Parameter(torch.empty(weight_shape[0])) if bias else None
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, x):
        y = leave_parallel_region(linear(x, self.weight), self.group, self.sequence_parallel)
        return y if self.bias is None else y + self.bias


class ParallelEmbedding(nn.Module):
    """Token embedding split over the group along hidden (split_hidden: each rank looks up its columns,
    then all-gather) or along the vocabulary (each rank looks up the ids it holds, zeros elsewhere, then
    all-reduce). With sequence parallelism each rank keeps its tokens only."""

    def __init__(self, weight_shape, group, split_hidden: bool, sequence_parallel: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(weight_shape))
        self.group, self.split_hidden, self.sequence_parallel = group, split_hidden, sequence_parallel

    def forward(self, input_ids):
        group = self.group
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


def plan_pattern(plan_key: str) -> re.Pattern:
    """'layers.*.attention.wq' -> matches 'layers.12.attention.wq' ('*' is one name component)."""
    return re.compile("^" + r"[^.]+".join(re.escape(part) for part in plan_key.split("*")) + "$")


def apply_tensor_parallel(model: nn.Module, group, sequence_parallel: bool) -> dict[str, tuple[ShardSpec, bool]]:
    """Swaps the modules named in model.tensor_parallel_plan() for tensor-parallel ones over `group` (on
    whatever device the model is, e.g. meta). Returns, per parameter name of the model, (where its shard
    sits in the full parameter, whether its gradient is partial over the group and must be summed: the
    parameters that see only this rank's tokens under sequence parallelism). Parameters not listed are
    whole and complete on every rank."""
    world, rank = group_size(group), group_rank(group)
    plan = [(plan_pattern(key), how) for key, how in model.tensor_parallel_plan().items()]
    facts = {}
    for name, module in list(model.named_modules()):
        how = next((how for pattern, how in plan if pattern.match(name)), None)
        if how is None or module is model:
            continue
        swapped, specs = _parallel_module(module, how, group, rank, world, sequence_parallel)
        if swapped is not module:
            model.set_submodule(name, swapped)
        for param_name, (spec, partial) in specs.items():
            facts[f"{name}.{param_name}"] = (spec, partial)
    if getattr(model, "tie_word_embeddings", False) and model.first and model.last:
        model.lm_head.weight = model.token_embedding.weight  # one parameter again, after both were swapped
    return facts


def _parallel_module(module, how, group, rank: int, world: int, sequence_parallel: bool):
    """(the module to use instead, {its parameter: (ShardSpec, partial gradient)})."""
    if isinstance(how, Replicated):  # a norm: whole; under sequence parallelism it sees this rank's tokens
        partial = sequence_parallel or how.over_heads  # (a q/k norm sees this rank's heads only)
        return module, {n: (ShardSpec.whole(p.shape), partial) for n, p in module.named_parameters()}
    if isinstance(how, EmbeddingSplit):
        full = tuple(module.weight.shape)
        spec = ShardSpec.split(full, 1 if how.split_hidden else 0, rank, world)
        return ParallelEmbedding(spec.local_shape, group, how.split_hidden, sequence_parallel), {
            "weight": (spec, False)
        }
    full = tuple(module.weight.shape)
    bias = module.bias is not None
    if isinstance(how, Rowwise):
        spec = ShardSpec.split(full, 1, rank, world)
        swapped = RowParallelLinear(spec.local_shape, bias, group, sequence_parallel)
        specs = {"weight": (spec, False)}
        if bias:  # added after the sum: whole on every rank, partial under sequence parallelism
            specs["bias"] = (ShardSpec.whole((full[0],)), sequence_parallel)
        return swapped, specs
    segments = how.segments if isinstance(how, Colwise) else None
    spec = ShardSpec.split(full, 0, rank, world, segments)
    head = isinstance(how, VocabHead)
    swapped = ColumnParallelLinear(
        spec.local_shape, bias, group, sequence_parallel, head and how.gather_output, head and how.normalized
    )
    specs = {"weight": (spec, False)}
    if bias:
        specs["bias"] = (ShardSpec.split((full[0],), 0, rank, world, segments), False)
    return swapped, specs
