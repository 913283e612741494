"""Bytes per rank of one layout: what pytrain's training step allocates, by kind, and its peak.

What each kind is, as the run holds it (pytrain.solver.optimizer, pytrain.parallel):
- parameters: this rank's shards in the model's dtype (FSDP: a 1/zero1 shard, plus the full parameters of the
  layers being computed: two decoder layers in flight, or, without reshard_after_forward, the whole stage's
  from its forward to its backward);
- gradients: ZeRO-1 keeps every local parameter's gradient once, in the optimizer's flat fp32 buffer (for the whole
  run), where a hook adds each .grad (the model's dtype) as soon as autograd has made it and frees it: one
  parameter's at most beside the buffer; FSDP keeps a 1/zero1 fp32 shard, plus one layer's full gradient before
  its reduce-scatter;
- optimizer state: the parameters this rank owns (ZeRO-1: whole parameters dealt largest first to the least
  loaded rank of the zero1 group, the optimizer's own rule; FSDP: 1/zero1 of every one) x (Adam's two fp32 moments,
  plus an fp32 master when the model is 16-bit);
- activations: what the forward keeps per micro-batch (pytrain.plan.shape; isp: for its slice of the sequence,
  the attention core's q, k, v after the all-to-all being as many bytes), times the micro-batches the
  schedule holds at once on this rank (one without a pipeline; 1F1B: pipeline - rank; interleaved 1F1B: its
  warm-up forwards + 1, each one chunk's), plus the last stage's logits and the cross-entropy's saved gradient
  and a pipeline stage's output held for its backward;
- communication buffers torch allocates: the pipeline's receive buffers, ZeRO-1's flat copy of the parameters an
  owner broadcasts after the update (one owner's at a time; all at once with overlap_sync_param).

The peak is the largest of these moments: the backward's start with the most micro-batches in flight (parameters,
the flat gradient buffer, optimizer state, the gradients already accumulated when an earlier backward ran, the
activations, the widest gradient a layer makes); the backward of a recomputed layer (the layers after it done,
their activations freed and their gradients made, its own activations rematerialized); the optimizer step
(parameters, the flat gradient buffer, optimizer state, and Adam's temporaries: two fp32 copies of the largest
parameter on the CPU, where torch's AdamW runs tensor by tensor, one fp32 copy of the owned state on a GPU, where
it runs foreach; then the broadcast's flat copy).
Not counted: the CUDA context, NCCL's own buffers, the caching allocator's slack (leave headroom for them on a GPU:
what is predicted is torch.cuda.max_memory_allocated, not max_memory_reserved), the data loader's pinned batches.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from pytrain.parallel.model_part import partition_layers
from pytrain.parallel.ring_attention import SCORE_BYTES

from .shape import LayerShape, ModelShape, Params

FP32 = 4


@dataclass(frozen=True)
class Recompute:
    """Activation recompute: `fraction` of each stage's layers recomputed whole (model.checkpoint), the others
    selectively checkpointed with `selective` ('attention' | 'matmuls'; None: not)."""

    fraction: float = 0.0
    selective: str | None = None

    @property
    def name(self) -> str:
        if self.fraction == 0 and self.selective is None:
            return "none"
        parts = [] if self.fraction == 0 else ["full" if self.fraction == 1 else f"full {self.fraction:g}"]
        return "+".join(parts + ([f"selective {self.selective}"] if self.selective else []))


@dataclass(frozen=True)
class Schedule:
    """What the memory of a layout depends on besides the model: sizes (a ParallelDims' and the config's)."""

    world_size: int
    data: int
    tensor: int
    sequence_parallel: bool
    pipeline: int
    chunks: int
    zero1: int
    expert: int
    expert_zero1: int
    fsdp: bool
    reshard_after_forward: bool
    recompute: Recompute
    micro_num: int
    micro_bsz: int
    seq_len: int
    overlap_sync_param: bool = False
    # isp: the ranks a micro-batch's sequence is split over (each holds seq_len / sequence of its tokens, every
    # weight whole: tensor is then 1, and data counts every (data, tensor) rank, which all reduce the gradients)
    sequence: int = 1
    # sequence_2D: the sequence ranks as (sequence / context) head ranks x context ranks of an attention ring
    context: int = 1

    @classmethod
    def from_config(cls, cfg, dims) -> Schedule:
        """The schedule of a validated config laid out as `dims` (a pytrain.parallel.ParallelDims)."""
        zero1 = cfg.parallel.zero1
        sequence = dims.tensor if dims.isp else 1
        return cls(
            world_size=dims.world_size,
            data=dims.data * sequence,
            tensor=dims.tensor // sequence,
            sequence_parallel=dims.tensor > 1 and cfg.parallel.tensor.mode == "msp",
            pipeline=dims.pipeline,
            chunks=cfg.model.get("num_chunks", 1),
            zero1=dims.weight if dims.weight > 1 else dims.zero1,  # weight parallelism: FSDP over its runs
            expert=dims.expert,
            expert_zero1=dims.expert_zero1,
            fsdp=dims.shards_parameters,
            reshard_after_forward=dims.weight > 1 or bool(zero1.get("reshard_after_forward", True)),
            recompute=Recompute(
                float(cfg.model.get("checkpoint", False)),
                cfg.selective_checkpoint_policy if cfg.selective_checkpoint else None,
            ),
            micro_num=cfg.data.micro_num,
            micro_bsz=cfg.data.micro_bsz,
            seq_len=cfg.data.seq_len,
            overlap_sync_param=cfg.hybrid_zero_optimizer.overlap_sync_param,
            sequence=sequence,
            context=dims.context if dims.isp else 1,
        )


@dataclass(frozen=True)
class MemoryEstimate:
    """One rank's bytes by kind, and its peak (module docstring); in_flight: micro-batches (chunk passes)
    whose activations are held at once; peak_at: 'backward' or 'optimizer step'."""

    pipeline_rank: int
    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    activations_per_micro_batch: int
    in_flight: int
    communication_buffers: int
    peak: int
    peak_at: str


def rank_memory(
    shape: ModelShape,
    schedule: Schedule,
    pipeline_rank: int,
    zero1_rank: int | None = None,
    expert_zero1_rank: int | None = None,
) -> MemoryEstimate:
    """The bytes of the rank at `pipeline_rank` whose ZeRO-1 share is that of `zero1_rank` / `expert_zero1_rank`
    (None: the largest share, the worst rank)."""
    s = schedule
    e = shape.dtype_bytes
    chunks = _stage_layers(shape, s, pipeline_rank)
    first = pipeline_rank == 0
    last = pipeline_rank == s.pipeline - 1
    held = Params()
    for layers in chunks:
        for layer in layers:
            held = held + layer.params
    if first:
        held = held + shape.embedding
    if last:
        held = held + shape.final_norm
        if not (shape.tied and s.pipeline == 1):  # a tied head on the embedding's rank is the embedding
            held = held + shape.head
    dense = held.dense_local(s.tensor)
    experts = held.expert_local(s.tensor, s.expert)
    local = sum(dense) + sum(experts)

    if s.fsdp:
        # pytrain.parallel.fsdp's units: each layer, the embedding, the head (one unit with a tied embedding)
        units = [
            sum(layer.params.dense_local(s.tensor)) + sum(layer.params.expert_local(s.tensor, s.expert))
            for layers in chunks
            for layer in layers
        ]
        if first:
            units.append(sum(shape.embedding.dense_local(s.tensor)))
        if last and not (shape.tied and s.pipeline == 1):
            units.append(sum(shape.head.dense_local(s.tensor)))
        units.sort(reverse=True)
        largest_unit = units[0] if units else 0
        # the unit running and the next one prefetched; without reshard_after_forward the whole stage
        gathered = local if not s.reshard_after_forward else sum(units[:2])
        owned = -(-sum(dense) // s.zero1) + -(-sum(experts) // s.expert_zero1)
        # the fp32 shards are the masters (no separate copy), gathered in the model's dtype
        parameters = owned * FP32 + gathered * e
        # a unit's whole gradient (model dtype), and for a 16-bit model its fp32 copy that is reduce-scattered;
        # the fp32 gradient shards exist once a unit's first backward of the step has run (zero_grad frees them)
        unit_gradient = largest_unit * (e + (FP32 if e != FP32 else 0))
        gradients = owned * FP32 + unit_gradient
        grads_during_backward = unit_gradient
    else:
        owned = _owned(dense, s.zero1, zero1_rank) + _owned(experts, s.expert_zero1, expert_zero1_rank)
        parameters = local * e
        # the flat buffer, and the one .grad its hook has not yet added there
        gradients = grads_during_backward = local * FP32 + max(dense + experts, default=0) * e
    optimizer_state = owned * (2 * FP32 + (FP32 if shape.needs_master and not s.fsdp else 0))

    tokens = s.micro_bsz * s.seq_len // s.sequence
    per_chunk = [_chunk_activations(shape, s, layers, tokens) for layers in chunks]
    grads_of_a_backward = gradients - grads_during_backward
    in_flight_chunks, backwards_run = _held_passes(s, pipeline_rank, per_chunk, grads_of_a_backward)
    activations = sum(per_chunk[c] for c in in_flight_chunks)
    hidden_bytes = tokens * shape.hidden * e // (s.tensor if s.sequence_parallel else 1)
    if not last:
        activations += len(in_flight_chunks) * hidden_bytes  # the stage's output, held for its backward
    widest, recomputing = _backward_transients(shape, s, chunks, tokens)
    transient = max(widest, _ring_backward(shape, s, tokens))
    if last:
        logits = tokens * shape.vocab // s.tensor * e
        if s.pipeline == 1:  # the schedule holds the last micro-batch's logits through its backward
            activations += logits
        else:  # alive while the loss is taken, beside the cross-entropy's gradient
            transient = max(transient, logits)
    receive_buffers = 2 * hidden_bytes if s.pipeline > 1 else 0
    backward_done = backwards_run > 0
    held = parameters + optimizer_state + receive_buffers
    at_backward = held + (gradients if backward_done else grads_during_backward) + activations + transient
    largest = max(per_chunk[c] for c in in_flight_chunks)
    for kept, layers_done in recomputing:  # a recomputed layer's backward (see _backward_transients)
        grads = gradients if backward_done else grads_during_backward + int(grads_of_a_backward * layers_done)
        at_backward = max(at_backward, held + grads + activations - largest + kept)

    # the update (pytrain.kernels.adamw_step_) runs in place, on every device: no temporaries of its own
    broadcast = 0
    if not s.fsdp and s.zero1 > 1:
        broadcast = (local - owned) * e if s.overlap_sync_param else _owned(dense, s.zero1, None) * e
    if s.fsdp:  # every unit resharded, its gradient reduce-scattered: the shards only
        at_step = owned * FP32 * 2 + optimizer_state
    else:
        at_step = parameters + optimizer_state + gradients + broadcast
    peak = max(at_backward, at_step)
    return MemoryEstimate(
        pipeline_rank=pipeline_rank,
        parameters=parameters,
        gradients=gradients,
        optimizer_state=optimizer_state,
        activations=activations,
        activations_per_micro_batch=max(per_chunk) * s.chunks if per_chunk else 0,
        in_flight=len(in_flight_chunks),
        communication_buffers=max(receive_buffers, broadcast),
        peak=peak,
        peak_at="backward" if at_backward >= at_step else "optimizer step",
    )


def layout_memory(shape: ModelShape, schedule: Schedule) -> MemoryEstimate:
    """The worst rank's bytes: the first and the last pipeline stage bound the others (the most micro-batches in
    flight, the embedding; the head, the logits), each at its largest ZeRO-1 share."""
    ranks = {0, schedule.pipeline - 1}
    return max((rank_memory(shape, schedule, r) for r in ranks), key=lambda m: m.peak)


def _stage_layers(shape: ModelShape, s: Schedule, pipeline_rank: int) -> list[list[LayerShape]]:
    """The layers of each chunk this pipeline rank holds (chunk c is stage c * pipeline + rank)."""
    parts = partition_layers(shape.num_layers, s.pipeline * s.chunks)
    return [[shape.layers[i] for i in parts[c * s.pipeline + pipeline_rank]] for c in range(s.chunks)]


def _held_passes(s: Schedule, rank: int, per_chunk: list[int], grads: int) -> tuple[list[int], int]:
    """The chunks of the micro-batch passes whose activations this rank holds at its fullest moment, and how many
    backwards had run by then (once one has, the parameters' gradients, `grads` bytes, are there too).
    pytrain.parallel.pipeline's order: `warmup` forwards, then one forward and one backward at a time (1F1B:
    warmup = pipeline - rank - 1; interleaved: its own warm-up, the forwards taking groups of `pipeline`
    micro-batches through chunk 0, 1, ... and the backwards through the chunks in reverse); without a pipeline,
    each micro-batch's forward then its backward."""
    total = s.micro_num * s.chunks
    if s.pipeline == 1:
        warmup = 0
    elif s.chunks == 1:
        warmup = min(s.pipeline - rank - 1, s.micro_num)
    elif s.micro_num == s.pipeline:
        warmup = total
    else:
        warmup = min(total, (s.pipeline - rank - 1) * 2 + (s.chunks - 1) * s.pipeline)

    def chunk_of(k: int, forward: bool) -> int:
        chunk = k % (s.pipeline * s.chunks) // s.pipeline
        return chunk if forward else s.chunks - 1 - chunk

    best, best_bytes = ([], 0), -1
    for last_forward in range(total):  # the moment after each forward, before the backward it pairs with
        backwards = max(0, last_forward - warmup)
        held = [chunk_of(k, True) for k in range(last_forward + 1)]
        for k in range(backwards):
            held.remove(chunk_of(k, False))
        held_bytes = sum(per_chunk[c] for c in held) + (grads if backwards else 0)
        if held_bytes >= best_bytes:  # a later moment holds as much and more gradients
            best, best_bytes = (held, backwards), held_bytes
    return best


def _layer_activations(layer: LayerShape, s: Schedule, tokens: int, e: int, mode: str) -> int:
    """Bytes one layer keeps per micro-batch: mode 'none' | 'full' | 'attention' | 'matmuls'."""
    split = s.tensor if s.sequence_parallel else 1
    if mode == "full":  # the layer's two inputs
        return tokens * layer.residual * e // split
    if mode == "matmuls":
        kept = layer.matmuls_residual / split + layer.matmuls_gathered + layer.matmuls_sharded / s.tensor
        return int(tokens * (kept * e + layer.matmuls_fp32 * FP32))
    kept = layer.residual / split + layer.gathered + layer.sharded / s.tensor
    fp32 = layer.fp32_residual / split + (0 if mode == "attention" else layer.fp32_sharded / s.tensor)
    routed_rows = tokens * layer.top_k / s.tensor
    return int(tokens * (kept * e + (fp32 + layer.router_fp32) * FP32) + routed_rows * layer.routed * e)


def _modes(s: Schedule, layers: list[LayerShape]) -> list[str]:
    """Each layer's recompute mode in a stage (its first `fraction` recomputed whole, pytrain.model.decoder)."""
    whole = int(len(layers) * s.recompute.fraction)
    rest = s.recompute.selective or "none"
    return ["full"] * whole + [rest] * (len(layers) - whole)


def _chunk_activations(shape: ModelShape, s: Schedule, layers: list[LayerShape], tokens: int) -> int:
    e = shape.dtype_bytes
    split = s.tensor if s.sequence_parallel else 1
    kept = sum(_layer_activations(layer, s, tokens, e, mode) for layer, mode in zip(layers, _modes(s, layers)))
    if layers and layers[-1] is shape.layers[-1]:  # the final norm's input and rstd, the head's input
        kept += tokens * (shape.hidden * e // split + shape.hidden * e + FP32 // split)
        kept += tokens * shape.vocab // s.tensor * e  # the cross-entropy's saved gradient
    return kept


def _backward_transients(shape: ModelShape, s: Schedule, chunks: list[list[LayerShape]], tokens: int):
    """(the widest gradient a layer's backward makes, [(what a chunk holds while the backward of one of its
    recomputed layers runs: what the layers up to it keep, its activations rematerialized and that gradient, the
    fraction of the chunk's layers whose backward is done by then)]). A chunk's layers run backward last first."""
    e = shape.dtype_bytes
    widest, recomputing = 0, []
    for layers in chunks:
        kept = 0
        for index, (layer, mode) in enumerate(zip(layers, _modes(s, layers))):
            gradient = tokens * layer.largest_transient_sharded * e // s.tensor
            widest = max(widest, gradient)
            kept += _layer_activations(layer, s, tokens, e, mode)
            if mode != "none":
                rematerialized = _layer_activations(layer, s, tokens, e, "none") - _layer_activations(
                    layer, s, tokens, e, mode
                )
                recomputing.append((kept + rematerialized + gradient, (len(layers) - index - 1) / len(layers)))
    return widest, recomputing


def _ring_backward(shape: ModelShape, s: Schedule, tokens: int) -> int:
    """sequence_2D: the most bytes ring attention's backward (pytrain.parallel.ring_attention) holds beside the
    layer's activations. After the head all-to-all a rank holds `tokens` x head ranks tokens of 1 / head ranks of
    the heads (kv heads repeated up to the head ranks); in fp32, its queries' scaled copy, the output gradient's
    head-major copy and the dQ being accumulated (3 q-sized), and of k/v-sized blocks: the block computed and the
    one arriving (2 x 2), the dK/dV being accumulated, sent and arriving (3 x 2) and the returned dk, dv (2);
    plus the two score-shaped tensors of one pair of parts (zigzag chunks of seq_len / 2 context tokens; at
    most SCORE_BYTES, the ring's chunking)."""
    if s.context == 1:
        return 0
    head_ranks = s.sequence // s.context
    q = max(layer.attention_width for layer in shape.layers)
    kv = max(min(layer.kv_width * head_ranks, layer.attention_width) for layer in shape.layers)
    part = s.seq_len // (2 * s.context)
    scores = min(SCORE_BYTES, 2 * part * part * shape.heads // head_ranks * FP32)
    return tokens * (3 * q + 12 * kv) * FP32 + scores


def _owned(sizes: list[int], group: int, rank: int | None) -> int:
    """Elements the ZeRO-1 rank `rank` (None: the most loaded) owns of parameters `sizes` dealt over `group` ranks,
    largest first to the least loaded (lowest rank on ties): pytrain.solver.optimizer.assign_owners' rule."""
    loads = _loads(sizes, group)
    return max(loads) if rank is None else loads[rank]


def _loads(sizes: list[int], group: int) -> list[int]:
    if group == 1:
        return [sum(sizes)]
    heap = [(0, rank) for rank in range(group)]
    loads = [0] * group
    for size in sorted(sizes, reverse=True):
        load, rank = heapq.heappop(heap)
        loads[rank] = load + size
        heapq.heappush(heap, (load + size, rank))
    return loads
