"""Communication per step and a step time, from the FLOPs, a stated device peak and a stated link bandwidth.

Compute: the training FLOPs per token of pytrain.monitor.flops (Megatron's count, whole-layer recompute
included; selective checkpointing adds one more attention forward per layer it covers) times the tokens this
rank's stage works on, at the stated peak; a pipeline adds its bubble, (pipeline - 1) / (chunks x micro_num) of
that. Communication, as bytes each rank sends per step over ring collectives ((g-1)/g of the data per pass; an
all-reduce is two passes) at the stated link bandwidth:
- tensor: per layer and micro-batch two all-reduces forward and two backward of the (tokens, hidden) activation
  (sequence parallelism: all-gathers and reduce-scatters, the same bytes), two more forward per recomputed layer;
  on the critical path;
- sequence (isp): per layer and micro-batch the all-to-alls around attention (q, k, v and the output, forward and
  backward, one more forward per recomputed layer) of this rank's tokens over the head ranks; on the critical
  path. isp's gradient reduction counts every (data, tensor) rank as a data rank, weight parallelism as FSDP over
  its runs;
- ring (isp's sequence_2D): per layer and micro-batch the K/V blocks passed round the context ranks forward and
  backward, and the fp32 dK/dV one hop behind them; overlapped with the blocks' compute as far as it lasts;
- pipeline: each micro-batch's activation forward and its gradient back, per chunk; on the critical path;
- expert: per mixture-of-experts layer and micro-batch four all-to-alls of the routed rows (two forward, two
  backward); on the critical path;
- data: the fp32 gradient all-reduce (over the expert-data group for expert weights); with overlap_sync_grad
  hidden behind the last micro-batch's backward as far as it lasts;
- zero1: the updated parameters' broadcast (hidden behind the next forward with overlap_sync_param);
  FSDP instead: the parameters' all-gather per micro-batch (again in the backward with reshard_after_forward)
  and the fp32 gradients' reduce-scatter per step, prefetched behind the compute as far as it lasts.
The step time is the compute with its bubble plus the communication not hidden: an estimate for ranking
layouts, whose kernel efficiency (model FLOPs over peak) is taken as 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from pytrain.monitor.flops import flops_per_token
from pytrain.parallel.model_part import partition_layers

from .memory import FP32, Schedule
from .shape import ModelShape


@dataclass(frozen=True)
class StepEstimate:
    flops_per_rank: float
    compute_s: float
    bubble_s: float
    exposed_communication_s: float
    step_s: float
    tokens_per_s: float  # the whole world's
    communication_bytes: dict  # bytes each rank sends per step, by kind


def _ring(group: int) -> float:
    return (group - 1) / group


def step_estimate(shape: ModelShape, s: Schedule, peak_tflops: float, link_gbps: float) -> StepEstimate:
    """link_gbps: each rank's link, in GB/s (10^9 bytes per second)."""
    e = shape.dtype_bytes
    layers = shape.layers
    block_params = sum(layer.matmul_params for layer in layers)
    head_params = shape.vocab * shape.hidden
    stages = partition_layers(shape.num_layers, s.pipeline * s.chunks)
    recomputed = sum(int(len(stage) * s.recompute.fraction) for stage in stages)  # each stage's first ones
    width = max(layer.attention_width for layer in layers)
    per_token = flops_per_token(
        block_params, head_params, shape.num_layers, width, s.seq_len, recomputed / shape.num_layers
    )
    if s.recompute.selective:  # one more attention forward in every layer not recomputed whole
        per_token += 4 * (shape.num_layers - recomputed) * width * s.seq_len
    tokens = s.micro_num * s.micro_bsz * s.seq_len  # per data-parallel rank, shared by its model ranks
    flops = per_token * tokens / (s.tensor * s.pipeline * s.sequence)
    compute = flops / (peak_tflops * 1e12)
    bubble = compute * (s.pipeline - 1) / (s.chunks * s.micro_num)

    micro_tokens = s.micro_bsz * s.seq_len // s.sequence  # this rank's
    activation = micro_tokens * shape.hidden * e
    local_layers = shape.num_layers / s.pipeline
    local_recomputed = recomputed / s.pipeline
    sent = {}
    sent["tensor"] = (
        s.micro_num * (8 * local_layers + 4 * local_recomputed) * _ring(s.tensor) * activation if s.tensor > 1 else 0
    )
    # isp: around each attention core q, k, v (kv heads repeated up to the ranks) one way, the output back, over
    # the head ranks (sequence_2D: the sequence ranks / the ring's)
    head_ranks = s.sequence // s.context
    kv = max((min(layer.kv_width * head_ranks, layer.attention_width) for layer in layers), default=0)
    sequence_bytes = micro_tokens * (2 * width + 2 * kv) * e
    passes = s.micro_num * (2 * local_layers + local_recomputed)
    sent["sequence"] = passes * _ring(head_ranks) * sequence_bytes if head_ranks > 1 else 0
    # sequence_2D's ring, per attention forward: context - 1 hops of this rank's K and V block (its tokens x head
    # ranks, the kv heads of its head share); per backward the K/V hops again and context hops of their fp32 dK/dV
    block = micro_tokens * kv  # elements of K (or V) a rank holds after the all-to-all
    forwards = s.micro_num * (local_layers + local_recomputed)
    sent["ring"] = (
        forwards * (s.context - 1) * 2 * block * e
        + s.micro_num * local_layers * ((s.context - 1) * 2 * block * e + s.context * 2 * block * FP32)
        if s.context > 1
        else 0
    )
    split = s.tensor if s.sequence_parallel else 1
    sent["pipeline"] = 2 * s.micro_num * s.chunks * activation / split if s.pipeline > 1 else 0
    moe_layers = sum(layer.moe for layer in layers) / s.pipeline
    routed = micro_tokens * max((layer.top_k for layer in layers), default=0) / s.tensor * shape.hidden * e
    sent["expert"] = 4 * s.micro_num * moe_layers * _ring(s.expert) * routed if s.expert > 1 else 0
    dense, experts = _local_params(shape, s)
    if s.fsdp:
        gathers = s.micro_num * (2 if s.reshard_after_forward else 1)
        sent["fsdp"] = _ring(s.zero1) * ((dense + experts) * e * gathers + (dense + experts) * FP32)
        replicas = s.data // s.zero1
        sent["data"] = 2 * _ring(replicas) * FP32 * (dense + experts) / s.zero1 if replicas > 1 else 0
        sent["zero1"] = 0
    else:
        sent["fsdp"] = 0
        expert_data = s.data // s.expert
        sent["data"] = 2 * FP32 * (_ring(s.data) * dense + _ring(expert_data) * experts)
        sent["zero1"] = _ring(s.zero1) * dense * e + _ring(s.expert_zero1) * experts * e
    seconds = {kind: volume / (link_gbps * 1e9) for kind, volume in sent.items()}
    micro_batch = compute / s.micro_num
    exposed = seconds["tensor"] + seconds["sequence"] + seconds["pipeline"] + seconds["expert"]
    exposed += max(0.0, seconds["data"] - 2 / 3 * micro_batch)  # behind the last backward (overlap_sync_grad)
    exposed += max(0.0, seconds["zero1"] - (micro_batch / 3 if s.overlap_sync_param else 0.0))
    exposed += max(0.0, seconds["fsdp"] - compute)
    exposed += max(0.0, seconds["ring"] - compute)  # each hop overlaps a block's compute
    step = compute + bubble + exposed
    return StepEstimate(
        flops_per_rank=flops,
        compute_s=compute,
        bubble_s=bubble,
        exposed_communication_s=exposed,
        step_s=step,
        tokens_per_s=tokens * s.data / s.sequence / step,
        communication_bytes={kind: int(volume) for kind, volume in sent.items()},
    )


def _local_params(shape: ModelShape, s: Schedule) -> tuple[int, int]:
    """(dense, expert) parameter elements of the heaviest pipeline rank, on average over its tensor ranks."""
    dense = sum(sum(layer.params.dense_local(s.tensor)) for layer in shape.layers) / s.pipeline
    experts = sum(sum(layer.params.expert_local(s.tensor, s.expert)) for layer in shape.layers) / s.pipeline
    ends = sum(shape.embedding.dense_local(s.tensor)) + sum(shape.head.dense_local(s.tensor))
    return int(dense + (ends if s.pipeline == 1 else ends / 2)), int(experts)
