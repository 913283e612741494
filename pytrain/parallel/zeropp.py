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

Gradients: by default each backward reduce-scatters its chunk's gradients (torch's fully_shard, in the
post-backward hook) and the sharded gradient accumulates.

parallel.pipeline.decouple_grad (InternEvo's meaning, zero-bubble style): each backward computes only the gradient
of the chunk's input, the one the previous stage waits for, and sends it at once; the chunk's weight gradients are
computed later from the same autograd graph, without recomputing it: torch.distributed.pipelining's
stage_backward_input computes the input gradient and keeps the gradients reaching the nodes where the paths to the
weights leave it, and weight_backward runs one autograd pass from those nodes to the weights. The model's first
stage has no input gradient to send: its whole backward is deferred. The queued weight gradients need their chunk's
gathered parameters, so they run while the chunk is resident: one in each round of a unit in which the rank works
on nothing and waits for a message (unit_plan's rounds; the bubbles), the rest of the chunk's before work moves to
another chunk, and the unit's last ones at its end, as the pipeline drains (without units: at chunk switches and
the step's end, before the optimizer). The input gradients' backward leaves the gradients unsharded (FSDP without
gradient sync) and does not let FSDP regather a unit lazily: the chunk's units are all gathered before it, as the
split finds the weights among the chunk's parameters, which are the graph's (the gathered ones) only while
gathered. Each weight-gradient computation then does what FSDP's post-backward does after a backward (accumulate,
and in the last of a run of U of the chunk's backwards, P without units, reduce-scatter; FSDP's private
post_backward and root final callback, as torch's own pipelining schedules call them): one reduce-scatter per chunk
and unit instead of one per micro-batch (the ZeroPP paper's unit-wise reduction), one chunk's unsharded fp32
gradients held through the run. The gradients are the same as one process's. Activation recompute
(model.checkpoint) composes: the checkpointed layers are recomputed once more, in the weights' pass (torch's
stage_backward_weight, one pass per group of weights, would recompute them once per group: 7 times for a decoder
layer).
"""

import collections
import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining._backward import stage_backward_input

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


def weight_backward(params: list[nn.Parameter], param_groups: list[dict]) -> None:
    """The weight gradients of a backward whose input gradient torch's stage_backward_input computed (retaining the
    graph): param_groups holds the nodes at which the paths to the weights leave the input gradient's and the
    gradients they received. One autograd pass from all of them (torch's stage_backward_weight makes one per
    group, and each pass recomputes the checkpointed layers again), each node fed exactly what it received then:
    a gradient reaching it from another of them is already part of that."""
    edges, grads, handles = [], [], []
    try:
        for group in param_groups:
            for node, received in zip(group["intermediates"], group.get("grads") or ()):
                handles.append(node.register_prehook(lambda _, received=received: received))
                edges += [GradientEdge(node, i) for i, grad in enumerate(received) if grad is not None]
                grads += [grad for grad in received if grad is not None]
        reached = {node for group in param_groups for node in group["params"]}
        params = [p for p in params if get_gradient_edge(p).node in reached]
        if not edges or not params:
            return
        weight_grads = torch.autograd.grad(edges, [get_gradient_edge(p) for p in params], grads, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    for param, grad in zip(params, weight_grads):
        if grad is not None:
            param.grad = grad if param.grad is None else param.grad + grad


class _UnitRun:
    """One unit's work on this rank, round by round (unit_plan)."""

    def __init__(self, step: _PipelineStep, p2p, rounds: tuple[Round, ...], first_micro: int):
        self.step, self.p2p, self.rounds, self.first_micro = step, p2p, rounds, first_micro

    def run(self) -> None:
        inputs, grads = {}, {}  # (chunk, micro) -> received activation, received output gradient
        in_flight = {}  # (chunk, micro) -> (input activation, output) awaiting the backward
        for round_ in self.rounds:
            send_next = send_prev = None
            if round_.work is None:  # the rank waits for a message: a queued weight gradient fills the wait
                self.step.run_deferred(1)
            else:
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
        self.step.run_deferred()  # the pipeline drains between units


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
    """A _PipelineStep that gathers each chunk once per run of work on it (_ChunkResidency) and, given grad_run
    (decouple_grad), splits each backward: backward_input computes the input gradient only, the one sent on; the
    chunk's weight gradients wait in a queue for backward_weight, which computes them from the same autograd graph
    (weight_backward) and reduce-scatters the chunk's gradients once per run of grad_run of them. Queued weight
    gradients run while their chunk is gathered: in rounds where the rank waits for a message (_UnitRun), and all
    before work moves to another chunk."""

    def __init__(self, residency: _ChunkResidency, grad_run: int | None, *args):
        super().__init__(*args)
        self.residency, self.grad_run = residency, grad_run
        self.deferred = collections.deque()  # (chunk, its weight-gradient computation), oldest first
        self.weights_done = [0] * len(self.models)  # per chunk

    def _enter(self, chunk: int) -> None:
        if chunk != self.residency.current:
            self.run_deferred()  # the queued weight gradients need their chunk's gathered parameters
        self.residency.enter(chunk)

    def forward(self, chunk: int, micro: int, hidden):
        self._enter(chunk)
        return super().forward(chunk, micro, hidden)

    def backward(self, chunk: int, hidden_in, output, output_grad):
        self._enter(chunk)
        if self.grad_run is None:
            return super().backward(chunk, hidden_in, output, output_grad)
        return self.backward_input(chunk, hidden_in, output, output_grad)

    def backward_input(self, chunk: int, hidden_in, output, output_grad):
        """The input gradient of stage `chunk` (None for the model's first stage), its weight gradients queued.
        FSDP's post-backward hooks, which run in it, only keep the gradients unsharded (no sync)."""
        for unit in self.residency.units[chunk]:
            unit.set_requires_gradient_sync(False, recurse=False)
        if output_grad is None:  # the loss, scaled as the optimizer's backward scales it
            output_grad = torch.full_like(output, self.optimizer.loss_scale)
        if hidden_in is None:  # the model's first stage: nothing to send, the whole backward waits
            self.deferred.append((chunk, functools.partial(torch.autograd.backward, output, output_grad)))
            return None
        for unit in self.residency.units[chunk]:  # FSDP gathers a unit when the backward reaches it; the weight
            unit.unshard()  # gradients are split off by parameter before, so all must be the gathered ones now
        params = list(self.models[chunk].parameters())
        (grad_in,), param_groups = stage_backward_input([output], [output_grad], [hidden_in], params)
        self.deferred.append((chunk, functools.partial(weight_backward, params, param_groups)))
        return grad_in

    def run_deferred(self, count: int | None = None) -> None:
        """Runs the oldest `count` queued weight-gradient computations (None: all)."""
        for _ in range(len(self.deferred) if count is None else min(count, len(self.deferred))):
            self.backward_weight(*self.deferred.popleft())

    def backward_weight(self, chunk: int, compute) -> None:
        """One micro-batch's weight gradients of stage `chunk`, then what FSDP's post-backward hooks do after a
        backward (they ran in backward_input, before these gradients existed): accumulate them unsharded, and
        after the run's last one reduce-scatter the sum."""
        units = self.residency.units[chunk]
        for unit in units:  # the first stage's deferred whole backward runs FSDP's hooks: no reduction in them
            unit.set_requires_gradient_sync(False, recurse=False)
        compute()
        self.weights_done[chunk] += 1
        ends_run = self.weights_done[chunk] % self.grad_run == 0
        for unit in units:
            unit.set_requires_gradient_sync(ends_run, recurse=False)
        for unit in reversed(units):  # the backward's order: the last layers' first
            group = unit._get_fsdp_state()._fsdp_param_group
            if group is not None:
                group.post_backward()
        if units:  # the chunk's root: waits for the reduce-scatters and resets FSDP's per-backward state
            self.models[chunk]._get_fsdp_state()._root_post_backward_final_callback()


def _check_fsdp_post_backward(units: list[list[FSDPModule]]) -> None:
    """decouple_grad calls fully_shard's private post-backward, as torch.distributed.pipelining does (torch 2.13's;
    a torch without it gets this error rather than a failure in the middle of a step)."""
    for unit in (unit for chunk in units for unit in chunk):
        state = unit._get_fsdp_state()
        if not (hasattr(state, "_root_post_backward_final_callback") and hasattr(state, "_fsdp_param_group")):
            raise RuntimeError(
                f"parallel.pipeline.decouple_grad: torch {torch.__version__}'s fully_shard lacks the private "
                "post-backward it calls (FSDPState._fsdp_param_group, _root_post_backward_final_callback): use "
                "decouple_grad=False"
            )


class ZeroPPScheduler(InterleavedPipelineScheduler):
    """ZeroPP: units of unit_size micro-batches, interleaved GPipe within each (None: interleaved 1F1B); each
    chunk's sharded parameters gathered once per run of work on it; decouple_grad: each backward's weight
    gradients deferred into the rank's waits (_ResidentStep), and reduce-scattered once per unit."""

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
        if grad_run is not None:
            _check_fsdp_post_backward(self.residency.units)
        return _ResidentStep(self.residency, grad_run, stages, *args)

    def _finish(self, step: _ResidentStep, p2p, return_loss: bool):
        step.run_deferred()  # the cool-down's last weight gradients, before the optimizer
        return super()._finish(step, p2p, return_loss)

    def _orders(self, step, p2p, micro_num: int, forward_only: bool) -> list:
        if self.unit_size is None or forward_only:  # validation: one run over the whole batch, as interleaved
            return super()._orders(step, p2p, micro_num, forward_only)
        if micro_num % self.unit_size:  # the config allows no such step (data.micro_num, rampup_batch_size)
            raise ValueError(f"ZeroPP runs whole units of {self.unit_size} micro-batches; this batch holds {micro_num}")
        rounds = unit_plan(self.mesh.dims.pipeline, self.num_chunks, self.unit_size)[self.mesh.pipeline_rank]
        return [_UnitRun(step, p2p, rounds, first) for first in range(0, micro_num, self.unit_size)]
