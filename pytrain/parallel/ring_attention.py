"""Ring attention (context parallelism): exact attention over tokens spread across a process group.

    index = zigzag_token_index(seq_len, batch, rank, ring_size)         # which global tokens this rank holds
    document = document_ids(cu_seqlens, batch, seq_len)[index]            # or None: one document per row
    out = ring_attention(q, k, v, index, document, context_group)         # (tokens, heads, head_dim)

Layout-agnostic: each rank passes its tokens' q, k, v flattened to (tokens, heads, head_dim), every token's
index in the global flattened (batch * seq) order and its document id. Token i attends to token j iff they
share a document, j <= i (causal) and i - j < sliding_window (when set); the result is exactly attention over
all ranks' tokens put together, whatever split the caller chose (the same token count on every rank).

Algorithm (forward). Each rank holds its own K/V block; the blocks travel the ring of R ranks in R - 1 hops,
point to point (batch_isend_irecv). At every step the next hop is started before this step's block is
computed and waited for after it, so the transfer hides behind the compute. A block's partial result
(out_b, lse_b) is folded into the running one with its log-sum-exp in fp32 (the online softmax merge:
lse = logaddexp(lse, lse_b), out = exp(lse_old - lse) out + exp(lse_b - lse) out_b). Backward is a
torch.autograd.Function that recomputes each block's probabilities from the saved q, k, v, the final out and
lse (flash-attention's backward: D = rowsum(dout * out), dS = P * (dP - D)); dQ accumulates locally, while
each block's dK/dV accumulate on whichever rank holds it and travel the ring with it, one hop behind the K/V,
and a last hop returns them to their owner.

What computes a block's pairs (a query part against a key part, below). On CUDA (or on the CPU with
PYTRAIN_TRITON_CPU=1, through Triton's interpreter: tests), for fp16/bf16/fp32 and head_dim <= 256: pytrain's Triton
flash-attention kernels in their block mode (kernels/flash_attn_triton.py: flash_attn_block_forward/_backward),
on the inputs' dtype, returning the pair's out and lse in fp32 for the merge; a full pair runs without a mask, a
partial one with its tokens' global indices and documents (TokenMask), tiles whose mask is empty skipped; the
backward takes the ring's merged lse and delta. Otherwise (the CPU by default, float64, larger heads): torch, in
fp32 for 16-bit inputs (float64 stays float64), query rows in chunks so that no more than SCORE_BYTES (64 MiB) of
score-shaped tensors exist at once.

Skipping. Before the ring starts, each rank cuts its tokens into parts (runs of consecutive global indices
within one document, at most half the tokens long, merged down to at most MAX_PARTS), and one small
all-gather shares every part's index and document ranges, plus the shapes (a rank with a different token
count is an error on every rank). From those ranges the host knows, for every pair of parts, whether the mask
is empty (skipped: no compute), full (no mask built) or partial. That costs one read-back of the local
token_index/document and one all-gather per forward; backward reuses them.

Why zigzag. Under a causal mask a plain contiguous split gives rank r's queries r + 1 non-empty blocks out of
R: the last rank does R times the first one's work and the ring waits for it. zigzag_token_index cuts each
row into 2R chunks and gives rank r chunks r and 2R - 1 - r: every rank then does the same work, 2R + 1
chunk-by-chunk products, because the part-level skipping drops the empty half of every visiting block (no
zigzag block is wholly empty: skipping whole blocks only would compute all 4R).

Double ring (window_size w, InternEvo's sequence_2D). The C context ranks form C / w windows of w consecutive
ranks. A block first goes round its window (inner ring, w - 1 hops, e.g. within a node), then every rank
passes the block it holds to the same position of the next window (outer ring, one hop), and so on: C - 1
hops as before, only C / w - 1 of them between windows. The result is the plain ring's, up to the fp32
rounding of a different merge order.

Per rank, with L local tokens, H query heads, K kv heads, head dim d, element size e: forward keeps the fp32
out and lse (L H (d + 1) 4 bytes), the K/V block being computed and the one arriving (2 x 2 L K d e; 16-bit
inputs add the computed block's fp32 copy in torch) and the scores (torch: <= SCORE_BYTES; the Triton kernels
build none, a pair's fp32 out and lse instead, and its fp32 dq, dk, dv in the backward); it sends R - 1 blocks of
2 L K d e + 16 L bytes. Backward sends the same K/V hops plus R hops of the fp32 dK/dV (2 L K d 4 bytes each)
and holds up to three dK/dV blocks (sent, accumulating, arriving) and the fp32 dQ. Measured (bench, CPU, fp32,
H 4, K 2, d 64, 2 ranks): 55 MiB per rank for 4096 tokens, 178 MiB for 16384, every tensor included.
"""

from __future__ import annotations

import bisect
import enum
import functools
import itertools
from typing import NamedTuple

import torch
import torch.distributed as dist

from pytrain.kernels._backend import runs_triton
from pytrain.kernels.flash_attn import ATTENTION_DTYPES, MAX_HEAD_DIM
from pytrain.kernels.packed import PackedSequences

SCORE_BYTES = 64 * 2**20  # the most bytes of score-shaped tensors a block computation holds at once
MAX_PARTS = 8  # parts per rank whose pairs are checked for an empty mask (the host's work is R * MAX_PARTS^2)

# message tags: gloo matches each tag's messages in posting order, which every rank shares (NCCL ignores tags;
# its stream order is the same on every rank too)
_KV_TAG, _TOKENS_TAG, _GRAD_TAG = 0, 1, 2


# ---------------------------------------------------------------------------------------------------
# Which tokens a rank holds


def contiguous_token_index(seq_len: int, batch: int, rank: int, ring_size: int, device=None) -> torch.Tensor:
    """The global flattened indices rank `rank` of `ring_size` holds under the plain split: chunk `rank` of the
    ring_size equal chunks of every row, rows in order: (batch * seq_len / ring_size,) int64."""
    _check_split(seq_len, batch, rank, ring_size, ring_size, "contiguous_token_index")
    chunk = seq_len // ring_size
    positions = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    return _rows(positions, seq_len, batch)


def zigzag_token_index(seq_len: int, batch: int, rank: int, ring_size: int, device=None) -> torch.Tensor:
    """The global flattened indices rank `rank` of `ring_size` holds under the causal load-balanced split:
    every row cut into 2 * ring_size chunks, the rank holding chunks rank and 2 * ring_size - 1 - rank of each
    row, rows in order: (batch * seq_len / ring_size,) int64."""
    _check_split(seq_len, batch, rank, ring_size, 2 * ring_size, "zigzag_token_index")
    chunk = seq_len // (2 * ring_size)
    mirror = 2 * ring_size - 1 - rank
    positions = torch.cat(
        (
            torch.arange(rank * chunk, (rank + 1) * chunk, device=device),
            torch.arange(mirror * chunk, (mirror + 1) * chunk, device=device),
        )
    )
    return _rows(positions, seq_len, batch)


def _check_split(seq_len: int, batch: int, rank: int, ring_size: int, chunks: int, name: str) -> None:
    if ring_size < 1 or not 0 <= rank < ring_size:
        raise ValueError(f"{name}: rank {rank} is not a rank of a ring of {ring_size}")
    if seq_len < 1 or batch < 1 or seq_len % chunks:
        raise ValueError(
            f"{name}: seq_len {seq_len} (batch {batch}) cannot be cut into {chunks} equal chunks per row for a ring "
            f"of {ring_size}: use a seq_len that is a positive multiple of {chunks}"
        )


def _rows(positions: torch.Tensor, seq_len: int, batch: int) -> torch.Tensor:
    row_starts = torch.arange(batch, device=positions.device)[:, None] * seq_len
    return (row_starts + positions[None, :]).flatten()


def document_ids(cu_seqlens, batch: int, seq_len: int, device=None) -> torch.Tensor:
    """Every flattened token's document id: (batch * seq_len,) int64. cu_seqlens None: one document per row
    (the row id); else the packed documents' boundaries over the flattened tokens (a list of ints, an int
    tensor or a PackedSequences, from 0 to batch * seq_len)."""
    total = batch * seq_len
    if cu_seqlens is None:
        return torch.arange(total, device=device) // seq_len
    packed = cu_seqlens if isinstance(cu_seqlens, PackedSequences) else PackedSequences(cu_seqlens)
    if packed.total_tokens != total:
        raise ValueError(
            f"cu_seqlens ends at {packed.total_tokens} tokens, but batch {batch} x seq_len {seq_len} is {total}: "
            "pass the boundaries over the flattened batch"
        )
    lengths = torch.tensor([b - a for a, b in itertools.pairwise(packed.bounds)], device=device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths, output_size=total)


# ---------------------------------------------------------------------------------------------------
# The schedule: which block a rank holds at each step, and where it goes next


class RingSchedule(NamedTuple):
    """One rank's schedule over a context group of `size` ranks.

    owners[t]: the rank whose K/V block this rank computes at step t (owners[0] is itself). After step t the
    block goes to send_to[t] and the one for step t + 1 comes from recv_from[t]; the last entries
    (t = size - 1) are backward's return hop: the dK/dV of the block held last go to its owner, and this
    rank's own arrive from the rank that held it last.
    """

    owners: tuple[int, ...]
    send_to: tuple[int, ...]
    recv_from: tuple[int, ...]


def ring_schedule(rank: int, size: int, window_size: int = 1) -> RingSchedule:
    table = _owner_table(size, window_size)
    holder = [{owner: r for r, owner in enumerate(row)} for row in table]
    owners = tuple(row[rank] for row in table)
    send_to = tuple(holder[t + 1][owners[t]] for t in range(size - 1)) + (owners[-1],)
    recv_from = tuple(holder[t][table[t + 1][rank]] for t in range(size - 1)) + (holder[-1][rank],)
    return RingSchedule(owners, send_to, recv_from)


@functools.cache
def _owner_table(size: int, window_size: int) -> tuple[tuple[int, ...], ...]:
    """[step][rank]: whose block that rank holds. Within outer round o, inner step i, rank (window a, position p)
    holds the block of window a - o at position p + o - i: each inner hop comes from position p - 1 of the same
    window, each outer hop from position p of the previous window."""
    windows = size // window_size
    table = []
    for step in range(size):
        outer, inner = divmod(step, window_size)
        row = []
        for rank in range(size):
            window, position = divmod(rank, window_size)
            row.append(((window - outer) % windows) * window_size + (position + outer - inner) % window_size)
        table.append(tuple(row))
    return tuple(table)


# ---------------------------------------------------------------------------------------------------
# Parts of a rank's tokens and the mask between two parts


class _Part(NamedTuple):
    """A range start:stop of a rank's local tokens with the ranges of their global indices and documents."""

    start: int
    stop: int
    first_index: int
    last_index: int
    first_document: int
    last_document: int


class _Coverage(enum.Enum):
    EMPTY = "no query may see any key"
    PARTIAL = "a mask is needed"
    FULL = "every query sees every key"


def _coverage(queries: _Part, keys: _Part, causal: bool, sliding_window: int | None) -> _Coverage:
    """From the parts' ranges alone (conservative: EMPTY and FULL are certain, PARTIAL may be either)."""
    if (
        queries.last_document < keys.first_document
        or keys.last_document < queries.first_document
        or (causal and queries.last_index < keys.first_index)
        or (sliding_window is not None and queries.first_index - keys.last_index >= sliding_window)
    ):
        return _Coverage.EMPTY
    one_document = queries.first_document == queries.last_document == keys.first_document == keys.last_document
    if (
        one_document
        and (not causal or keys.last_index <= queries.first_index)
        and (sliding_window is None or queries.last_index - keys.first_index < sliding_window)
    ):
        return _Coverage.FULL
    return _Coverage.PARTIAL


def _local_parts(token_index: torch.Tensor, document: torch.Tensor) -> list[_Part]:
    """Runs of consecutive global indices within one document, none longer than half the tokens (so a causal
    block against itself skips its empty quarter, and zigzag's middle rank, whose two chunks touch, is cut as
    the others are), merged down to at most MAX_PARTS of near-equal token counts; computed on the host."""
    index, doc = torch.stack((token_index, document)).cpu()
    count = index.numel()
    breaks = ((index[1:] - index[:-1] != 1) | (doc[1:] != doc[:-1])).nonzero().flatten() + 1
    longest = -(-count // 2)
    starts = [
        cut for start, stop in itertools.pairwise([0, *breaks.tolist(), count]) for cut in range(start, stop, longest)
    ]
    if len(starts) > MAX_PARTS:
        picked = {bisect.bisect_left(starts, -(-part * count // MAX_PARTS)) for part in range(MAX_PARTS)}
        starts = [starts[i] for i in sorted(picked) if i < len(starts)]
    parts = []
    for start, stop in itertools.pairwise([*starts, count]):
        first_index, last_index = index[start:stop].aminmax()
        first_document, last_document = doc[start:stop].aminmax()
        parts.append(_Part(start, stop, int(first_index), int(last_index), int(first_document), int(last_document)))
    return parts


_HEADER = ("tokens", "heads", "kv_heads", "head_dim", "parts")


def _encode(shape: tuple[int, int, int, int], parts: list[_Part]) -> torch.Tensor:
    fields = [*shape, len(parts)]
    for part in parts:
        fields.extend(part)
    fields.extend([0] * (len(_Part._fields) * (MAX_PARTS - len(parts))))
    return torch.tensor(fields, dtype=torch.int64)


def _decode(row: list[int]) -> tuple[tuple[int, ...], list[_Part]]:
    shape, count = tuple(row[:4]), row[4]
    width = len(_Part._fields)
    parts = [_Part(*row[len(_HEADER) + i * width : len(_HEADER) + (i + 1) * width]) for i in range(count)]
    return shape, parts


# ---------------------------------------------------------------------------------------------------
# Block computation in torch: one pair of parts, query rows in chunks (layout: head-major (kv_heads, group, tokens,
# dim)); _TorchBlocks and _TritonBlocks below hold what either way needs of one forward or backward


def _rows_per_chunk(heads: int, keys: int, element_size: int, live: int) -> int:
    """Query rows per chunk so that `live` score-shaped tensors (rows, heads, keys) fit SCORE_BYTES."""
    return max(1, SCORE_BYTES // (live * heads * max(keys, 1) * element_size))


def _allowed(q_index, q_document, k_index, k_document, causal: bool, sliding_window: int | None) -> torch.Tensor:
    """(queries, keys) bool: query i may see key j."""
    allowed = q_document[:, None] == k_document[None, :]
    if causal:
        allowed &= k_index[None, :] <= q_index[:, None]
    if sliding_window is not None:
        allowed &= k_index[None, :] > (q_index - sliding_window)[:, None]
    return allowed


def _softmax_(scores: torch.Tensor) -> torch.Tensor:
    """Turns scores (..., keys) into probabilities in place; returns their log-sum-exp (...). A row whose
    scores are all -inf gets probabilities 0 and lse -inf (no NaN)."""
    row_max = scores.amax(-1, keepdim=True)
    row_max.masked_fill_(row_max == float("-inf"), 0.0)
    total = scores.sub_(row_max).exp_().sum(-1, keepdim=True)
    scores.div_(total.clamp_min(1.0))  # a row with any finite score has total >= 1 (its max gives exp(0))
    return (row_max + total.log()).squeeze(-1)


def _pair_forward(q, k, v, mask):
    """q (K, G, m, d) already scaled, k and v (K, n, d); mask(a, b): the (b - a, n) allowed mask of query rows
    a:b, or None (all allowed). Returns out (K, G, m, d) and lse (K, G, m)."""
    kv_heads, group, rows, dim = q.shape
    keys = k.shape[1]
    out, lse = q.new_empty(q.shape), q.new_empty(q.shape[:-1])
    chunk = _rows_per_chunk(kv_heads * group, keys, q.element_size(), live=1)
    for a in range(0, rows, chunk):
        b = min(a + chunk, rows)
        scores = torch.bmm(q[:, :, a:b].reshape(kv_heads, -1, dim), k.transpose(1, 2)).view(kv_heads, group, -1, keys)
        if mask is not None:
            scores.masked_fill_(mask(a, b).logical_not_(), float("-inf"))
        lse[:, :, a:b] = _softmax_(scores)
        out[:, :, a:b] = torch.bmm(scores.view(kv_heads, -1, keys), v).view(kv_heads, group, -1, dim)
    return out, lse


def _pair_backward(q, k, v, dout, delta, lse, mask, scale: float, dq, dk, dv) -> None:
    """Accumulates one pair's gradients: dq (K, G, m, d) += ..., dk and dv (K, n, d) += .... q is scaled;
    delta = rowsum(dout * out) and lse (-inf replaced by 0) are the whole ring's, (K, G, m)."""
    kv_heads, group, rows, dim = q.shape
    keys = k.shape[1]
    chunk = _rows_per_chunk(kv_heads * group, keys, q.element_size(), live=2)
    for a in range(0, rows, chunk):
        b = min(a + chunk, rows)
        q_rows = q[:, :, a:b].reshape(kv_heads, -1, dim)
        dout_rows = dout[:, :, a:b].reshape(kv_heads, -1, dim)
        probs = torch.bmm(q_rows, k.transpose(1, 2)).view(kv_heads, group, -1, keys)
        if mask is not None:
            probs.masked_fill_(mask(a, b).logical_not_(), float("-inf"))
        probs.sub_(lse[:, :, a:b, None]).exp_()
        dv.baddbmm_(probs.view(kv_heads, -1, keys).transpose(1, 2), dout_rows)
        dscores = torch.bmm(dout_rows, v.transpose(1, 2)).view(kv_heads, group, -1, keys)
        dscores.sub_(delta[:, :, a:b, None]).mul_(probs)
        dscores = dscores.view(kv_heads, -1, keys)
        dq[:, :, a:b].add_(torch.bmm(dscores, k).view(kv_heads, group, -1, dim), alpha=scale)
        dk.baddbmm_(dscores.transpose(1, 2), q_rows)


def _merge_(out, lse, part_out, part_lse) -> None:
    """Folds a partial result into the running one (views of the accumulators), in place."""
    merged = torch.logaddexp(lse, part_lse)
    shift = merged.masked_fill(merged == float("-inf"), 0.0)  # rows no key reached yet stay out 0, lse -inf
    out.mul_((lse - shift).exp_().unsqueeze(-1)).add_(part_out.mul_((part_lse - shift).exp_().unsqueeze(-1)))
    lse.copy_(merged)


def _head_major(x: torch.Tensor, kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """(tokens, heads, d) -> a new contiguous (kv_heads, heads // kv_heads, tokens, d) in dtype."""
    grouped = x.unflatten(1, (kv_heads, x.shape[1] // kv_heads)).permute(1, 2, 0, 3)
    return torch.empty(grouped.shape, dtype=dtype, device=x.device).copy_(grouped)


def _token_major(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(kv_heads, group, tokens, d) -> (tokens, kv_heads * group, d) in like's dtype."""
    kv_heads, group, tokens, dim = x.shape
    out = torch.empty((tokens, kv_heads, group, dim), dtype=like.dtype, device=like.device)
    return out.copy_(x.permute(2, 0, 1, 3)).flatten(1, 2)


class _TorchBlocks:
    """Pairs computed in torch (_pair_forward, _pair_backward): q scaled and head-major in the compute dtype."""

    def __init__(self, ring: _Ring, q, q_tokens):
        self.ring, self.q_tokens = ring, q_tokens
        self.q = _head_major(q, ring.kv_heads, ring.compute_dtype).mul_(ring.scale)

    def _mask(self, pair, k_tokens):
        tokens = self.ring.pair_tokens(*pair, self.q_tokens, k_tokens)
        if tokens is None:
            return None
        q_index, q_document, k_index, k_document = tokens
        causal, window = self.ring.causal, self.ring.sliding_window
        return lambda a, b: _allowed(q_index[a:b], q_document[a:b], k_index, k_document, causal, window)

    def forward(self, pair, kv, k_tokens):
        queries, keys, _ = pair
        cols = slice(keys.start, keys.stop)
        return _pair_forward(
            self.q[:, :, queries.start : queries.stop], kv[0, :, cols], kv[1, :, cols], self._mask(pair, k_tokens)
        )

    def prepare_backward(self, dout, out, lse):
        dtype, kv_heads = self.ring.compute_dtype, self.ring.kv_heads
        self.dout = _head_major(dout, kv_heads, dtype)
        self.delta = (dout.to(dtype) * out.to(dtype)).sum(-1).unflatten(1, (kv_heads, -1)).permute(1, 2, 0)
        self.lse = lse.masked_fill(lse == float("-inf"), 0.0)  # rows no key reached: every probability is 0

    def backward(self, pair, kv, k_tokens, dq, dkv):
        queries, keys, _ = pair
        rows, cols = slice(queries.start, queries.stop), slice(keys.start, keys.stop)
        _pair_backward(
            self.q[:, :, rows],
            kv[0, :, cols],
            kv[1, :, cols],
            self.dout[:, :, rows],
            self.delta[:, :, rows],
            self.lse[:, :, rows],
            self._mask(pair, k_tokens),
            self.ring.scale,
            dq[:, :, rows],
            dkv[0, :, cols],
            dkv[1, :, cols],
        )


class _TritonBlocks:
    """Pairs computed by the Triton flash-attention block kernels (kernels/flash_attn_triton.py) on the inputs'
    dtype, out, lse and gradients in fp32: a full pair without a mask, a partial one with its tokens' indices and
    documents (TokenMask)."""

    def __init__(self, ring: _Ring, q, q_tokens):
        from pytrain.triton import flash_attn_triton  # imported on use: triton reads TRITON_INTERPRET at import

        self.kernels, self.ring, self.q_tokens = flash_attn_triton, ring, q_tokens
        self.q = q if q.stride(-1) == 1 else q.contiguous()

    def _mask(self, pair, k_tokens):
        tokens = self.ring.pair_tokens(*pair, self.q_tokens, k_tokens)
        if tokens is None:
            return None
        window = self.ring.sliding_window
        # the kernels' window counts the keys before the query: i - j < sliding_window is i - j <= sliding_window - 1
        return self.kernels.TokenMask(*tokens, self.ring.causal, -1 if window is None else window - 1)

    @staticmethod
    def _keys(kv, keys):
        """k and v of a key part as (n, kv_heads, d) views of the (2, kv_heads, n, d) block."""
        cols = slice(keys.start, keys.stop)
        return kv[0, :, cols].transpose(0, 1), kv[1, :, cols].transpose(0, 1)

    def _head_major(self, x):
        """(tokens, heads, d) or (heads, tokens) -> a (kv_heads, group, tokens[, d]) view."""
        if x.dim() == 2:
            return x.unflatten(0, (self.ring.kv_heads, -1))
        return x.unflatten(1, (self.ring.kv_heads, -1)).permute(1, 2, 0, 3)

    def forward(self, pair, kv, k_tokens):
        queries, keys, _ = pair
        out, lse = self.kernels.flash_attn_block_forward(
            self.q[queries.start : queries.stop], *self._keys(kv, keys), self.ring.scale, self._mask(pair, k_tokens)
        )
        return self._head_major(out), self._head_major(lse)

    def prepare_backward(self, dout, out, lse):
        self.dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        self.delta = self.kernels.softmax_delta(out, self.dout)
        # (heads, tokens); rows no key reached: 0 for -inf as in torch (every probability is 0 either way)
        self.lse = lse.masked_fill(lse == float("-inf"), 0.0).flatten(0, 1)

    def backward(self, pair, kv, k_tokens, dq, dkv):
        queries, keys, _ = pair
        rows, cols = slice(queries.start, queries.stop), slice(keys.start, keys.stop)
        dq_part, dk_part, dv_part = self.kernels.flash_attn_block_backward(
            self.dout[rows],
            self.q[rows],
            *self._keys(kv, keys),
            self.lse[:, rows].contiguous(),
            self.delta[:, rows].contiguous(),
            self.ring.scale,
            self._mask(pair, k_tokens),
            grad_dtype=dq.dtype,
        )
        dq[:, :, rows] += self._head_major(dq_part)
        dkv[0, :, cols] += dk_part.transpose(0, 1)
        dkv[1, :, cols] += dv_part.transpose(0, 1)


def _runs_triton_blocks(q: torch.Tensor, parts: list[list[_Part]]) -> bool:
    """Whether the Triton block kernels compute the pairs: on CUDA (or the CPU with PYTRAIN_TRITON_CPU=1), for the
    dtypes and head dims they take and token indices and documents within int32 (the kernels compare them in
    int32); float64, larger heads and larger indices stay in torch."""
    int32 = range(-(2**31), 2**31)
    return (
        q.dtype in ATTENTION_DTYPES
        and q.shape[-1] <= MAX_HEAD_DIM
        and all(
            value in int32
            for rank_parts in parts
            for part in rank_parts
            for value in (part.first_index, part.last_index, part.first_document, part.last_document)
        )
        and runs_triton(q.device)
    )


# ---------------------------------------------------------------------------------------------------
# Transport: point-to-point hops and one all-gather over the context group


class _ProcessGroupTransport:
    """Hops and the all-gather over a torch.distributed group; peers are ranks within the group."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self._global_ranks = [dist.get_global_rank(group, r) for r in range(self.size)]

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        gathered = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(gathered, tensor, group=self.group)
        return gathered

    def start_hop(self, send_to: int, recv_from: int, messages):
        """messages: (tag, tensor to send, buffer to receive into). Returns a callable that waits for all."""
        ops = [dist.P2POp(dist.isend, sent, self._global_ranks[send_to], self.group, tag) for tag, sent, _ in messages]
        ops += [
            dist.P2POp(dist.irecv, buffer, self._global_ranks[recv_from], self.group, tag)
            for tag, _, buffer in messages
        ]
        works = dist.batch_isend_irecv(ops)
        return functools.partial(_wait_all, works, messages)


def _wait_all(works, messages) -> None:
    """Waits for the hop's works; `messages` rides along so the tensors in flight stay alive until then (the
    caller drops its own reference to a sent dK/dV block at once)."""
    for work in works:
        work.wait()


class _OneRank:
    """A context group of one: no hops; the all-gather is the tensor itself."""

    rank, size = 0, 1

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor]


# ---------------------------------------------------------------------------------------------------
# The ring


class _Ring:
    """One ring_attention call's fixed facts, shared by its forward and backward: the transport, this rank's
    schedule, every rank's parts and the options."""

    def __init__(self, transport, q, k, token_index, document, causal, scale, sliding_window, window_size):
        self.transport, self.causal, self.scale, self.sliding_window = transport, causal, scale, sliding_window
        self.kv_heads = k.shape[1]
        self.compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.schedule = ring_schedule(transport.rank, transport.size, window_size)
        shape = (q.shape[0], q.shape[1], k.shape[1], q.shape[2])
        local = _encode(shape, _local_parts(token_index, document)).to(q.device)
        rows = [_decode(row) for row in torch.stack(transport.all_gather(local)).tolist()]
        for rank, (other_shape, _) in enumerate(rows):
            if other_shape != shape:
                raise ValueError(
                    f"every rank of the context group must pass the same shapes: this rank (rank {transport.rank}) "
                    f"has {_describe(shape)}, rank {rank} has {_describe(other_shape)}; split the tokens evenly"
                )
        self.parts = [parts for _, parts in rows]
        self.block_kind = _TritonBlocks if _runs_triton_blocks(q, self.parts) else _TorchBlocks
        self.kv_dtype = q.dtype if self.block_kind is _TritonBlocks else self.compute_dtype  # the blocks' K/V

    def pairs(self, owner: int):
        """(query part, key part, coverage) of this rank's queries against owner's block, empty pairs left out."""
        for queries in self.parts[self.transport.rank]:
            for keys in self.parts[owner]:
                coverage = _coverage(queries, keys, self.causal, self.sliding_window)
                if coverage is not _Coverage.EMPTY:
                    yield queries, keys, coverage

    def pair_tokens(self, queries: _Part, keys: _Part, coverage: _Coverage, q_tokens, k_tokens):
        """(q_index, q_document, k_index, k_document) of a partial pair's tokens, or None when every key is allowed."""
        if coverage is _Coverage.FULL:
            return None
        q_index, q_document = q_tokens[:, queries.start : queries.stop]
        k_index, k_document = k_tokens[:, keys.start : keys.stop]
        return q_index, q_document, k_index, k_document

    def _hop(self, step: int, tagged: list[tuple[int, torch.Tensor]]):
        """Starts step's hop (sending after step, receiving for step + 1); returns (wait, received buffers)."""
        received = [torch.empty_like(tensor) for _, tensor in tagged]
        messages = [(tag, tensor, buffer) for (tag, tensor), buffer in zip(tagged, received)]
        wait = self.transport.start_hop(self.schedule.send_to[step], self.schedule.recv_from[step], messages)
        return wait, received

    def blocks(self, k, v, token_index, document):
        """Yields (step, owner, kv (2, K, n, d) in kv_dtype, tokens (2, n)) around the ring, the next
        block's hop started before the caller computes this one and waited for after."""
        kv = torch.stack((k.transpose(0, 1), v.transpose(0, 1)))
        tokens = torch.stack((token_index, document))
        for step, owner in enumerate(self.schedule.owners):
            last = step == len(self.schedule.owners) - 1
            if not last:
                wait, (next_kv, next_tokens) = self._hop(step, [(_KV_TAG, kv), (_TOKENS_TAG, tokens)])
            yield step, owner, kv.to(self.kv_dtype), tokens
            if not last:
                wait()
                kv, tokens = next_kv, next_tokens

    def forward(self, q, k, v, token_index, document):
        """Returns out (tokens, heads, d) in q's dtype and lse (K, G, tokens) in the compute dtype."""
        q_tokens = torch.stack((token_index, document))
        blocks = self.block_kind(self, q, q_tokens)
        shape = (self.kv_heads, q.shape[1] // self.kv_heads, q.shape[0], q.shape[2])
        out = torch.zeros(shape, dtype=self.compute_dtype, device=q.device)
        lse = torch.full(shape[:-1], float("-inf"), dtype=self.compute_dtype, device=q.device)
        for _, owner, kv, k_tokens in self.blocks(k, v, token_index, document):
            for pair in self.pairs(owner):
                rows = slice(pair[0].start, pair[0].stop)
                part_out, part_lse = blocks.forward(pair, kv, k_tokens)
                _merge_(out[:, :, rows], lse[:, :, rows], part_out, part_lse)
        return _token_major(out, q), lse

    def backward(self, dout, q, k, v, token_index, document, out, lse):
        blocks = self.block_kind(self, q, torch.stack((token_index, document)))
        blocks.prepare_backward(dout, out, lse)
        dq = torch.zeros(lse.shape + q.shape[-1:], dtype=self.compute_dtype, device=q.device)
        grad_hop = None  # (wait, [buffer]): the dK/dV of the block arriving next, accumulated by its holders
        for step, owner, kv, k_tokens in self.blocks(k, v, token_index, document):
            dkv = torch.zeros(kv.shape, dtype=self.compute_dtype, device=kv.device)  # fp32 (float64) for any kv_dtype
            for pair in self.pairs(owner):
                blocks.backward(pair, kv, k_tokens, dq, dkv)
            if grad_hop is not None:
                dkv += _arrived(grad_hop)
            if self.transport.size > 1:  # on along the ring, one hop behind the K/V; the last hop returns it home
                grad_hop = self._hop(step, [(_GRAD_TAG, dkv)])
        if grad_hop is not None:
            dkv = _arrived(grad_hop)  # this rank's own block's, from the rank that held it last
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device).copy_(dkv[0].transpose(0, 1))
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device).copy_(dkv[1].transpose(0, 1))
        return _token_major(dq, q), dk, dv


def _arrived(hop) -> torch.Tensor:
    wait, (received,) = hop
    wait()
    return received


def _describe(shape) -> str:
    tokens, heads, kv_heads, head_dim = shape
    return f"q of {tokens} tokens x {heads} heads x head_dim {head_dim}, k/v with {kv_heads} kv heads"


class _RingAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, token_index, document, ring: _Ring):
        out, lse = ring.forward(q, k, v, token_index, document)
        ctx.save_for_backward(q, k, v, token_index, document, out, lse)
        ctx.ring = ring
        return out

    @staticmethod
    def backward(ctx, dout):
        dq, dk, dv = ctx.ring.backward(dout, *ctx.saved_tensors)
        return dq, dk, dv, None, None, None


# ---------------------------------------------------------------------------------------------------
# Entry points


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    token_index: torch.Tensor,
    document: torch.Tensor,
    group,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    sliding_window: int | None = None,
    window_size: int = 1,
) -> torch.Tensor:
    """Attention of this rank's queries over every rank's keys of the context-parallel `group`.

    q (L, heads, d), k and v (L, kv_heads, d): this rank's tokens, flattened over (batch, seq); heads a multiple
    of kv_heads (query head h uses kv head h // (heads // kv_heads)). token_index (L,) int64: each token's index
    in the global flattened token order; document (L,) int64: its document id. group None or of size 1: plain
    local attention. Token i attends to token j iff document[i] == document[j], token_index[j] <=
    token_index[i] (causal) and token_index[i] - token_index[j] < sliding_window (when not None). softmax_scale:
    default d ** -0.5. window_size: the double ring's window (InternEvo's sequence_2D), a divisor of the group
    size. A query with no allowed key gets output 0 and gradient 0. Returns (L, heads, d) in q's dtype.
    """
    _check_arguments(q, k, v, token_index, document, sliding_window, window_size)
    transport = _OneRank() if group is None or dist.get_world_size(group) == 1 else _ProcessGroupTransport(group)
    return _ring_attention(
        q,
        k,
        v,
        token_index,
        document,
        transport,
        causal=causal,
        softmax_scale=softmax_scale,
        sliding_window=sliding_window,
        window_size=window_size,
    )


def _ring_attention(
    q, k, v, token_index, document, transport, *, causal, softmax_scale, sliding_window, window_size
) -> torch.Tensor:
    """ring_attention over any transport (rank, size, all_gather, start_hop): the tests run it on a ring of
    threads in one process."""
    if transport.size % window_size:
        divisors = [w for w in range(1, transport.size + 1) if transport.size % w == 0]
        raise ValueError(
            f"window_size={window_size} does not divide the context size {transport.size}: use one of {divisors}"
        )
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    ring = _Ring(transport, q, k, token_index, document, causal, scale, sliding_window, window_size)
    return _RingAttentionFunction.apply(q, k, v, token_index, document, ring)


def _check_arguments(q, k, v, token_index, document, sliding_window, window_size) -> None:
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must be a (tokens, heads, head_dim) tensor, got {got}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[0] == 0:
        raise ValueError("q holds no tokens: every rank of the context group needs at least one")
    if k.shape[0] != q.shape[0]:
        raise ValueError(
            f"k holds {k.shape[0]} tokens and q {q.shape[0]}: k and v must be the same tokens as q on each rank"
        )
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"q has head_dim {q.shape[2]} and k/v {k.shape[2]}: they must be equal")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q's {q.shape[1]} heads must be a multiple of k/v's {k.shape[1]} kv heads (GQA)")
    for name, tensor in (("token_index", token_index), ("document", document)):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int64:
            got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise TypeError(f"{name} must be an int64 tensor (use .long()), got {got}")
        if tensor.shape != (q.shape[0],):
            raise ValueError(
                f"{name} must have shape ({q.shape[0]},), one entry per q token, got {tuple(tensor.shape)}"
            )
    for name, tensor in (("k", k), ("v", v), ("token_index", token_index), ("document", document)):
        if tensor.device != q.device:
            raise ValueError(f"{name} is on {tensor.device} and q on {q.device}: put them on one device")
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)):
        raise TypeError(f"sliding_window must be an int or None, got {sliding_window!r}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 (a token sees itself), got {sliding_window}")
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
        raise ValueError(f"window_size must be a positive int (1: the plain ring), got {window_size!r}")
