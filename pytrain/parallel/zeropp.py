"""ZeroPP (arXiv 2402.03791; InternEvo's parallel.pipeline.use_zeropp): pipeline stages sharded over the data
ranks instead of split over tensor ranks, scheduled in units of micro-batches.

The sharding is the layout's own: parallel.weight (isp's weight parallelism, what InternEvo's
configs/7B_llama2_zeropp.py uses: tensor size 1, weight size 8) or parallel.zero1.fsdp, both torch's
fully_shard over each stage (pytrain.parallel.fsdp). What ZeroPP changes is the schedule, and when the
sharded parameters are gathered and their gradients reduce-scattered.

Schedule (ZeroPPScheduler): with data.unit_schedule_size = U, a step's micro-batches run in units of U, one
after the other (the pipeline drains between units). Within a unit the k-th forward runs chunk k // U on the
unit's micro-batch k % U (every micro-batch of the unit through chunk 0, then through chunk 1, ...:
interleaved GPipe), the backwards the same from the last chunk down. Rank r runs min(U C, 2 (P - r - 1) +
(C - 1) U) forwards first, then one forward and one backward at a time, then the remaining backwards
(unit_work): interleaved 1F1B's warm-up, steady state and cool-down with groups of U micro-batches instead of
P, as InternEvo's ZeroPPScheduler.

The messages are not interleaved 1F1B's (pytrain.parallel.pipeline._InterleavedOrder), whose receives are
fixed for groups of P: with U > P rank P-1's activations for rank 0's next chunk arrive at other points of
the steady state, and rank 0 would wait for a message not yet sent. unit_plan derives them instead, by
running every rank's order of work in lockstep rounds (pure Python, once per layout): in a round each rank
whose next piece of work has its input runs it, then all exchange with their neighbours, each sending what
it produced and receiving what they produced in that same round. Every message is thus sent and received in
the same round of both ranks: the exchanges pair whatever U is, in order, so blocking (NCCL) and deferred
sends are both deadlock-free; an activation or gradient received before its work waits for it. Any U works
(the orders above never wait on each other in a cycle: unit_plan would raise). U < P cannot fill the P
stages within a unit: allowed, the bubble is just larger.

Without units (unit_schedule_size None) the schedule is interleaved 1F1B over the whole step (InternEvo's
choice too).

Gathering: each chunk's work comes in runs (consecutive pieces of work on one chunk), and ZeroPP gathers a
chunk's parameters once per run instead of once per micro-batch: the chunk's FSDP units keep their gathered
parameters after each forward and backward while the chunk is the one working, and are resharded as soon as
work moves to another chunk (InternEvo caches each chunk's gathered weight-parallel weights until the
pipeline's virtual rank changes, internlm/utils/zeropp_manager.py). At most one chunk's parameters are
gathered at a time, plus one unit's (layer's) of the chunk being left.

Gradients (parallel.pipeline.decouple_grad): by default each backward reduce-scatters its chunk's gradients
(torch's fully_shard, in the post-backward hook) and the sharded gradient accumulates. With decouple_grad a
chunk's backwards come in runs of U micro-batches (P without units) in a rank's backward order, and the
chunk's gradients stay unsharded (gathered) over the run: FSDP accumulates them (set_requires_gradient_sync
False) and reduce-scatters the sum once, in the run's last backward; one reduce-scatter per chunk per unit
instead of one per micro-batch (the ZeroPP paper's unit-wise gradient reduction), at the cost of one chunk's
unsharded gradients (fp32) held through the run. The gradients are the same. InternEvo's decouple_grad is
something else: it defers the linears' weight-gradient computation into the schedule's bubbles (zero-bubble
style); pytrain computes input and weight gradients together in the backward.
"""

import functools
from dataclasses import dataclass

from torch import nn
from torch.distributed.fsdp import FSDPModule

from .pipeline import InterleavedPipelineScheduler, _PipelineStep

FORWARD, BACKWARD = "F", "B"


def unit_work(stages: int, chunks: int, unit: int, rank: int) -> list[tuple[str, int, int]]:
    """Rank `rank`'s order of work in one unit: (FORWARD or BACKWARD, chunk, micro-batch of the unit)."""
    total = unit * chunks
    warmup = min(total, 2 * (stages - rank - 1) + (chunks - 1) * unit)
    forwards = [(FORWARD, k // unit, k % unit) for k in range(total)]
    backwards = [(BACKWARD, chunks - 1 - k // unit, k % unit) for k in range(total)]
    order = forwards[:warmup]
    for forward, backward in zip(forwards[warmup:], backwards):
        order += [forward, backward]
    return order + backwards[total - warmup :]


@dataclass(frozen=True)
class Round:
    """A rank's part in one round of a unit: at most one piece of work, then one exchange with its neighbours
    (sends: the work's output goes on, a forward's to the next stage, a backward's to the previous; from_prev,
    from_next: the (chunk, micro-batch) whose activation, output gradient arrives, None: nothing)."""

    work: tuple[str, int, int] | None
    sends: bool
    from_prev: tuple[int, int] | None
    from_next: tuple[int, int] | None


@functools.cache
def unit_plan(stages: int, chunks: int, unit: int) -> tuple[tuple[Round, ...], ...]:
    """Every rank's rounds of one unit (those in which it works or receives), from running unit_work's orders
    in lockstep: a piece of work runs in the first round after its input arrived."""
    orders = [unit_work(stages, chunks, unit, rank) for rank in range(stages)]
    done = [0] * stages
    arrived = [set() for _ in range(stages)]  # per rank: (kind, chunk, micro) whose input it holds
    rounds = [[] for _ in range(stages)]
    while any(d < len(order) for d, order in zip(done, orders)):
        worked = [None] * stages  # per rank: (work, whether its output is sent on) of this round
        sent = {}  # (receiving rank, FORWARD or BACKWARD) -> the (chunk, micro) it is for
        for rank, order in enumerate(orders):
            if done[rank] == len(order):
                continue
            work = kind, chunk, micro = order[done[rank]]
            forward = kind == FORWARD
            first = rank == 0 and chunk == 0
            last = rank == stages - 1 and chunk == chunks - 1
            if not (first if forward else last) and work not in arrived[rank]:
                continue  # its input has not arrived
            done[rank] += 1
            sends = not last if forward else not first
            worked[rank] = work, sends
            if sends and forward:  # rank P-1's chunk c feeds rank 0's chunk c + 1
                sent[(rank + 1) % stages, FORWARD] = (chunk + (rank == stages - 1), micro)
            elif sends:
                sent[(rank - 1) % stages, BACKWARD] = (chunk - (rank == 0), micro)
        if not any(worked):  # a cycle of waits: unit_work's orders have none (the tests run many layouts)
            raise RuntimeError(f"ZeroPP: no order of work for {stages} stages x {chunks} chunks in units of {unit}")
        for rank in range(stages):
            from_prev, from_next = sent.get((rank, FORWARD)), sent.get((rank, BACKWARD))
            arrived[rank].update((kind, *at) for kind, at in ((FORWARD, from_prev), (BACKWARD, from_next)) if at)
            if worked[rank] or from_prev or from_next:
                work, sends = worked[rank] or (None, False)
                rounds[rank].append(Round(work, sends, from_prev, from_next))
    return tuple(map(tuple, rounds))


class _UnitRun:
    """One unit's work on this rank, round by round (unit_plan)."""

    def __init__(self, step: _PipelineStep, p2p, rounds: tuple[Round, ...], first_micro: int):
        self.step, self.p2p, self.rounds, self.first_micro = step, p2p, rounds, first_micro

    def run(self) -> None:
        inputs, grads = {}, {}  # (chunk, micro) -> received activation, received output gradient
        in_flight = {}  # (chunk, micro) -> (input activation, output) awaiting the backward
        for round_ in self.rounds:
            send_next = send_prev = None
            if round_.work is not None:
                kind, chunk, micro = round_.work
                if kind == FORWARD:
                    hidden = inputs.pop((chunk, micro), None)
                    output = self.step.forward(chunk, self.first_micro + micro, hidden)
                    in_flight[chunk, micro] = (hidden, output)
                    send_next = output if round_.sends else None
                else:
                    grad_in = self.step.backward(chunk, *in_flight.pop((chunk, micro)), grads.pop((chunk, micro), None))
                    send_prev = grad_in if round_.sends else None
            hidden, grad = self.p2p.exchange(
                send_next=send_next,
                send_prev=send_prev,
                recv_prev=round_.from_prev is not None,
                recv_next=round_.from_next is not None,
            )
            if round_.from_prev is not None:
                inputs[round_.from_prev] = hidden
            if round_.from_next is not None:
                grads[round_.from_next] = grad


class _ChunkResidency:
    """Keeps the FSDP-sharded parameters of the chunk at work gathered, and only its: entering a chunk
    reshards the one left. Without FSDP (nothing sharded) it does nothing."""

    def __init__(self, stages: list[nn.Module]):
        self.units = [[m for m in stage.modules() if isinstance(m, FSDPModule)] for stage in stages]
        for unit in (unit for units in self.units for unit in units):
            # a run of work on the chunk reuses its gathered parameters; leave() frees them
            unit.set_reshard_after_forward(False, recurse=False)
            unit.set_reshard_after_backward(False, recurse=False)
        self.current = None

    def enter(self, chunk: int) -> None:
        if chunk != self.current:
            self.leave()
            self.current = chunk

    def leave(self) -> None:
        if self.current is not None:
            for unit in self.units[self.current]:
                unit.reshard()
            self.current = None


class _ResidentStep(_PipelineStep):
    """A _PipelineStep that gathers each chunk once per run of work on it (_ChunkResidency) and, given
    grad_run (decouple_grad), reduce-scatters a chunk's gradients once per run of grad_run backwards of it."""

    def __init__(self, residency: _ChunkResidency, grad_run: int | None, *args):
        super().__init__(*args)
        self.residency, self.grad_run = residency, grad_run

    def forward(self, chunk: int, micro: int, hidden):
        self.residency.enter(chunk)
        return super().forward(chunk, micro, hidden)

    def backward(self, chunk: int, hidden_in, output, output_grad):
        self.residency.enter(chunk)
        if self.grad_run is not None:  # a chunk's backwards come in runs of grad_run micro-batches
            ends_run = (self.backwards_done[chunk] + 1) % self.grad_run == 0
            for unit in self.residency.units[chunk]:
                unit.set_requires_gradient_sync(ends_run, recurse=False)
        return super().backward(chunk, hidden_in, output, output_grad)


class ZeroPPScheduler(InterleavedPipelineScheduler):
    """ZeroPP: units of unit_size micro-batches, interleaved GPipe within each (None: interleaved 1F1B); each
    chunk's sharded parameters gathered once per run of work on it; decouple_grad: its gradients reduce-scattered
    once per unit."""

    def __init__(
        self,
        mesh,
        hidden_size: int,
        dtype,
        num_chunks: int,
        unit_size: int | None = None,
        sequence_split: int = 1,
        overlap: bool = True,
        decouple_grad: bool = False,
    ):
        super().__init__(mesh, hidden_size, dtype, num_chunks, sequence_split, overlap)
        if unit_size is not None and unit_size < 1:
            raise ValueError(f"ZeroPP's units hold at least one micro-batch, not {unit_size}")
        self.unit_size, self.decouple_grad = unit_size, decouple_grad

    def forward_backward_step(self, model, *args, **kwargs):
        self.residency = _ChunkResidency(model.stages)
        try:
            return super().forward_backward_step(model, *args, **kwargs)
        finally:
            self.residency.leave()  # the optimizer updates the shards: nothing may stay gathered

    def _step(self, stages, *args) -> _PipelineStep:
        grad_run = (self.unit_size or self.mesh.dims.pipeline) if self.decouple_grad else None
        return _ResidentStep(self.residency, grad_run, stages, *args)

    def _orders(self, step, p2p, micro_num: int, forward_only: bool) -> list:
        if self.unit_size is None or forward_only:  # validation: one run over the whole batch, as interleaved
            return super()._orders(step, p2p, micro_num, forward_only)
        if micro_num % self.unit_size:  # the config allows no such step (data.micro_num, rampup_batch_size)
            raise ValueError(f"ZeroPP runs whole units of {self.unit_size} micro-batches; this batch holds {micro_num}")
        rounds = unit_plan(self.mesh.dims.pipeline, self.num_chunks, self.unit_size)[self.mesh.pipeline_rank]
        return [_UnitRun(step, p2p, rounds, first) for first in range(0, micro_num, self.unit_size)]
