"""Intern sequence parallelism (InternEvo's isp, `parallel.tensor = dict(size=T, mode="isp")`), applied to a plain
model's stage from outside.

The sequence of every micro-batch is cut into T contiguous slices, one per rank of the tensor group, and each rank
runs the whole layer on its slice: embedding, norms, projections, MLP (or MoE) and the LM head see only its
tokens, with every weight whole (or gathered just in time by weight parallelism: fsdp.py over mesh.py's runs). Only
attention needs the other tokens: around each attention core one all-to-all turns the sequence split into a head
split (each rank gets every token of T-th of the heads) and one turns it back (DeepSpeed-Ulysses), so the
attention call itself runs unchanged on whole sequences, packed documents and sliding windows included. The
rotary embedding is applied before the first all-to-all, at each local token's position in its document.

Grouped-query attention with fewer kv heads than ranks: each kv head is repeated until there are T of them
before the all-to-all, so a rank receives the one kv head its query heads use; the k/v all-to-all then moves T /
kv_heads times the bytes it would with enough kv heads (the repeat's backward sums the copies' gradients).

2D sequence parallelism (InternEvo's `parallel.sequence_2D`, head_size x context_size = T): the tensor group
is a (head, context) grid; the all-to-all runs over the head group, and the attention core over the context
group is ring attention (pytrain.parallel.ring_attention), K/V blocks passed around the ring, so a sequence
longer than the heads can split still spreads over every rank. Each context rank's share of a row is its two
zigzag chunks (causal work balanced over the ring), cut among its head group (SequenceSplit).

Every weight sees only its rank's tokens, so every gradient is partial over the tensor group and summed there
(as a sequence-parallel norm's under msp). The loss of a micro-batch is the sum over its ranks' slices:
each rank divides its slice's token losses by the micro-batch's labelled tokens (all of them: each rank holds
the whole micro-batch's labels), and the step reports the sum over the tensor group (SequenceShardedLoss).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from pytrain.kernels import CheckedPositions, PackedSequences
from pytrain.model.decoder import Attention, InnerAttention
from pytrain.model.loss import LMLoss, TypeLosses
from pytrain.model.moe import MoELayer

from .ring_attention import document_ids, ring_attention, zigzag_token_index
from .shard_spec import ShardSpec
from .tensor import group_rank, group_size

SEQUENCE_DIM = 1  # (batch, seq, ...) activations, labels and positions


class SequenceSplit:
    """Which tokens of every row this rank of the tensor group `group` holds.

    isp: a contiguous T-th, and the head all-to-all runs over the whole group. sequence_2D (context_group of C
    > 1 ranks, head_group of H = T / C): each row cut into 2C chunks, context rank c's share being chunks c and
    2C - 1 - c (zigzag: every rank of the ring has the same causal work), cut into H equal pieces over its head
    group; after the head all-to-all a rank holds its context share whole."""

    def __init__(self, group, head_group=None, context_group=None):
        self.group, self.size, self.rank = group, group_size(group), group_rank(group)
        self.head_group = group if context_group is None else head_group
        self.context_group = context_group
        self.heads, self.contexts = group_size(self.head_group), group_size(context_group)

    @classmethod
    def of_mesh(cls, mesh) -> SequenceSplit:
        """The split of an isp run's ParallelMesh (its tensor group; sequence_2D's head and context groups)."""
        return cls(mesh.tensor_group, mesh.head_group, mesh.context_group)

    def share_positions(self, seq_len: int, device=None) -> torch.Tensor:
        """The positions (in a row) of the tokens this rank holds after the head all-to-all."""
        if self.contexts == 1:
            return torch.arange(seq_len, device=device)
        return zigzag_token_index(seq_len, 1, group_rank(self.context_group), self.contexts, device=device)

    def positions(self, seq_len: int, device=None) -> torch.Tensor:
        """The positions (in a row) of this rank's tokens."""
        return self.share_positions(seq_len, device).chunk(self.heads)[group_rank(self.head_group)]

    def local(self, x: torch.Tensor, dim: int = SEQUENCE_DIM) -> torch.Tensor:
        """This rank's tokens of a whole-sequence tensor along `dim`."""
        length = x.shape[dim]
        pieces = self.size * (2 if self.contexts > 1 else 1)
        if length % pieces:
            raise ValueError(
                f"the sequence is split over {self.size} ranks (parallel.tensor.size), but it holds {length} "
                f"tokens: make data.seq_len a multiple of {pieces}"
            )
        if self.contexts == 1:
            return x.narrow(dim, self.rank * (length // self.size), length // self.size)
        return x.index_select(dim, self.positions(length, x.device))


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Chunk i of dim 0 goes to rank i; chunk i of the result came from rank i."""
    x = x.contiguous()
    out = torch.empty_like(x)  # (of x's layout: contiguous, as the collective writes it)
    dist.all_to_all_single(out, x, group=group)
    return out


def _sequence_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """(batch, seq / T, heads, d) this rank's tokens -> (batch, seq, heads / T, d) this rank's heads."""
    world = group_size(group)
    batch, local, heads, dim = x.shape
    parts = x.reshape(batch, local, world, heads // world, dim).permute(2, 0, 1, 3, 4)  # by destination rank
    received = _all_to_all(parts, group)  # (source rank = sequence slice, batch, local, heads / T, d)
    return received.permute(1, 0, 2, 3, 4).reshape(batch, world * local, heads // world, dim)


def _heads_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """(batch, seq, heads / T, d) this rank's heads -> (batch, seq / T, heads, d) this rank's tokens."""
    world = group_size(group)
    batch, seq, heads, dim = x.shape
    parts = x.reshape(batch, world, seq // world, heads, dim).transpose(0, 1)  # by destination (sequence slice)
    received = _all_to_all(parts, group)  # (source rank = head group, batch, seq / T, heads / T, d)
    return received.permute(1, 2, 0, 3, 4).reshape(batch, seq // world, world * heads, dim)


class _Redistribute(torch.autograd.Function):
    """to_heads: _sequence_to_heads forward, _heads_to_sequence backward; else the other way round."""

    @staticmethod
    def forward(ctx, x, group, to_heads: bool):
        ctx.group, ctx.to_heads = group, to_heads
        return (_sequence_to_heads if to_heads else _heads_to_sequence)(x, group)

    @staticmethod
    def backward(ctx, grad):
        return (_heads_to_sequence if ctx.to_heads else _sequence_to_heads)(grad, ctx.group), None, None


class _MeanOverGroup(torch.autograd.Function):
    """The mean over the group of every rank's x; the gradient of each rank's x is the mean of every rank's
    gradient of the result (each rank uses the result in its own loss)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out / group_size(group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad / group_size(ctx.group), None


def _mean_over(group):
    return lambda x: _MeanOverGroup.apply(x, group)


class UlyssesAttention(nn.Module):
    """The attention core on whole sequences (sequence_2D: context shares) of this rank's heads, for q, k, v of
    this rank's tokens (module docstring). kv_repeat: copies of each kv head made before the all-to-all (fewer
    kv heads than ranks)."""

    def __init__(self, inner: InnerAttention, group, kv_repeat: int):
        super().__init__()
        self.inner, self.group, self.kv_repeat = inner, group, kv_repeat

    def forward(self, q, k, v, packed: PackedSequences | None = None):
        if self.kv_repeat > 1:
            k, v = (t.repeat_interleave(self.kv_repeat, dim=2) for t in (k, v))
        q, k, v = (_Redistribute.apply(t, self.group, True) for t in (q, k, v))
        return _Redistribute.apply(self.inner(q, k, v, packed), self.group, False)


class RingInnerAttention(InnerAttention):
    """sequence_2D's attention core over the context group: q, k, v of this rank's context share (batch,
    share, heads, head_dim) attend to every share of the ring (pytrain.parallel.ring_attention), K/V passed
    around it; window_size: InternEvo's double ring."""

    def __init__(self, inner: InnerAttention, split: SequenceSplit, window_size: int):
        super().__init__(inner.use_flash_attn, inner.causal, inner.softmax_scale, inner.sliding_window)
        self.split, self.ring_window = split, window_size

    def forward(self, q, k, v, packed: PackedSequences | None = None):
        batch, share = q.shape[:2]
        seq = share * self.split.contexts
        positions = self.split.share_positions(seq, q.device)
        token_index = (torch.arange(batch, device=q.device)[:, None] * seq + positions).flatten()
        document = document_ids(packed, batch, seq, device=q.device)[token_index]
        out = ring_attention(
            *(t.flatten(0, 1) for t in (q, k, v)),
            token_index,
            document,
            self.split.context_group,
            causal=self.causal,
            softmax_scale=self.softmax_scale,
            sliding_window=self.sliding_window,
            window_size=self.ring_window,
        )
        return out.view(batch, share, *out.shape[1:])


def _kv_repeat(attention: Attention, world: int) -> int:
    heads, kv_heads = attention.shape.num_heads, attention.shape.num_kv_heads
    if heads % world or (kv_heads % world and world % kv_heads):
        raise ValueError(
            f"the head all-to-all over {world} ranks needs num_attention_heads ({heads}) divisible by {world} and "
            f"num_kv_attention_heads ({kv_heads}) a multiple or a divisor of it"
        )
    return 1 if kv_heads % world == 0 else world // kv_heads


def apply_sequence_parallel(stage: nn.Module, split: SequenceSplit, window_size: int = 1) -> dict:
    """Splits `stage` (a Decoder or a pipeline stage of one) over the sequence (module docstring), in place:
    the heads over split's head group around every attention core, which (sequence_2D) is a ring over its
    context group. Returns {parameter name: (ShardSpec, partial gradient)} facts as tensor parallelism's: every
    parameter whole, its gradient partial over the tensor group."""
    for module in list(stage.modules()):
        if isinstance(module, Attention):
            core = module.inner_attention
            if split.contexts > 1:
                core = RingInnerAttention(core, split, window_size)
            if split.heads > 1:
                core = UlyssesAttention(core, split.head_group, _kv_repeat(module, split.heads))
            module.inner_attention = core
        if isinstance(module, MoELayer):  # every rank's aux loss is the whole micro-batch's: 1/T of it each
            module.average_over_tokens = _mean_over(split.group)
            module.aux_loss_share = 1.0 / split.size
    stage.register_forward_pre_hook(_LocalInputs(split), with_kwargs=True)
    return {name: (ShardSpec.whole(p.shape), True) for name, p in stage.named_parameters()}


class _LocalInputs:
    """A stage's forward pre-hook: the first stage embeds only this rank's tokens, and every layer's rotary
    embedding gets their positions (the whole sequence's boundaries stay for the attention core)."""

    def __init__(self, split: SequenceSplit):
        self.split = split

    def __call__(self, stage, args, kwargs):
        if args:  # model(input_ids, ...), as the non-pipeline schedule calls it
            kwargs = {"input_ids": args[0], **kwargs}
        input_ids, hidden = kwargs.get("input_ids"), kwargs.get("hidden_states")
        if input_ids is not None:
            (batch, seq), device = input_ids.shape, input_ids.device
            kwargs["input_ids"] = self.split.local(input_ids)
        else:
            batch, seq, device = hidden.shape[0], hidden.shape[1] * self.split.size, hidden.device
        positions = self._local_positions(kwargs.get("positions"), kwargs.get("cu_seqlens"), batch, seq, device)
        kwargs["positions"] = positions
        return (), kwargs

    def _local_positions(self, positions, cu_seqlens, batch: int, seq: int, device) -> CheckedPositions:
        """This rank's tokens' positions; `rows` (the whole call's largest position + 1) kept, so that every rank
        scales a dynamic-NTK rotary embedding for the whole sequence."""
        if cu_seqlens is not None:
            packed = cu_seqlens if isinstance(cu_seqlens, PackedSequences) else PackedSequences(cu_seqlens)
            whole, rows = packed.positions.view(batch, seq), max(packed.max_seqlen, 1)
        elif positions is not None:
            checked = positions if isinstance(positions, CheckedPositions) else CheckedPositions(positions)
            whole, rows = checked.positions, checked.rows
        else:
            whole, rows = torch.arange(seq, device=device), seq
        return CheckedPositions(self.split.local(whole, dim=whole.dim() - 1), device=whole.device, rows=rows)


class SequenceShardedLoss(nn.Module):
    """The LM loss of logits for this rank's slice of the sequence, given the whole micro-batch's labels: its
    tokens' share of the micro-batch's token mean (summed over the tensor group by the gradients' sum there);
    the value returned is the whole micro-batch's loss, the gradient this rank's share's."""

    def __init__(self, criterion: LMLoss, split: SequenceSplit):
        super().__init__()
        self.criterion, self.split = criterion, split

    def forward(self, logits, labels, type_ids=None, type_losses: TypeLosses | None = None):
        labelled = (labels != self.criterion.ignore_index).sum()
        mine = None
        if type_losses is not None:  # this rank's tokens' sums, added to the step's after the sum over ranks
            mine = TypeLosses(type_losses.sums.numel(), type_losses.sums.device)
            type_ids = self.split.local(type_ids)
        share = self.criterion(logits, self.split.local(labels), type_ids, mine, tokens=labelled)
        total = share.detach().clone()
        dist.all_reduce(total, group=self.split.group)
        if mine is not None:
            sums = torch.stack([mine.sums, mine.counts])
            dist.all_reduce(sums, group=self.split.group)
            type_losses.sums += sums[0]
            type_losses.counts += sums[1]
        return share + (total - share.detach())
