"""Pipeline schedules: 1F1B (PipelineScheduler) and interleaved 1F1B (InterleavedPipelineScheduler).

Stage r holds a consecutive range of layers; the first stage embeds, the last computes the loss. Between
stages, each micro-batch's activation goes forward and its gradient backward point-to-point
(torch.distributed isend/irecv; NCCL on GPUs, gloo on CPU), always as one (micro_bsz, seq_len, hidden)
tensor of the model's dtype (seq_len / tensor size under sequence parallelism).

1F1B: stage r runs P - r - 1 warm-up forwards, then alternates one forward and one backward, then drains
the remaining backwards, so at most P - r micro-batches' activations are alive on it (GPipe keeps all M).

Interleaved: each rank holds num_chunks (C) stages, stage c * P + r on rank r, so the pipeline is C times
deeper with the same ranks and the bubble C times smaller. Micro-batches run in groups of P per chunk; the
activation leaving rank P-1's chunk c enters rank 0's chunk c + 1, a ring. With interleaved_overlap the
sends are not waited for: compute goes on while they travel, and they are waited for at the step's end.
The order of work and of messages follows Megatron-LM's schedules, which are known to be deadlock-free
with blocking exchanges; the order of ops inside one exchange is fixed (forward direction first) so that
on a two-stage ring, where a rank's previous and next stage are the same rank, messages pair correctly.
"""

import torch
import torch.distributed as dist

from .mesh import ParallelMesh
from .schedule import IGNORE_INDEX, micro_batch_inputs, micro_batch_loss, micro_batch_weights

FORWARD_TAG, BACKWARD_TAG = 1, 2


class P2P:
    """Exchanges with the neighbouring stages (ring order: stage 0's previous stage is the last)."""

    def __init__(
        self, mesh: ParallelMesh, shape: tuple, dtype: torch.dtype, device: torch.device, defer_sends: bool = False
    ):
        self.shape, self.dtype, self.device, self.defer_sends = shape, dtype, device, defer_sends
        stage = mesh.pipeline_rank
        self.next_rank, self.prev_rank = mesh.stage_rank(stage + 1), mesh.stage_rank(stage - 1)
        self.pending = []  # (work, tensor) of sends not yet waited for

    def _check(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        if tensor.shape != self.shape or tensor.dtype != self.dtype:
            raise RuntimeError(
                f"pipeline: the {what} is {tuple(tensor.shape)} {tensor.dtype}, but stages exchange "
                f"{tuple(self.shape)} {self.dtype} tensors; a model's stage must return its hidden "
                f"states in the model's dtype"
            )
        return tensor.contiguous()

    def exchange(self, send_next=None, send_prev=None, recv_prev=False, recv_next=False):
        """Sends activations forward / gradients backward and receives them; returns (from prev, from next)."""
        ops, received = [], []
        # forward direction first, then backward: with two stages prev == next, and pairs match in order
        for send, send_to, receive, receive_from, tag, what in (
            (send_next, self.next_rank, recv_prev, self.prev_rank, FORWARD_TAG, "activation sent forward"),
            (send_prev, self.prev_rank, recv_next, self.next_rank, BACKWARD_TAG, "gradient sent backward"),
        ):
            if send is not None:
                ops.append(dist.P2POp(dist.isend, self._check(send, what), send_to, tag=tag))
            received.append(torch.empty(self.shape, dtype=self.dtype, device=self.device) if receive else None)
            if receive:
                ops.append(dist.P2POp(dist.irecv, received[-1], receive_from, tag=tag))
        if ops:
            works = dist.batch_isend_irecv(ops)
            if len(works) == len(ops):  # one work per op (gloo)
                entries = [(work, op.op is dist.isend) for op, work in zip(ops, works)]
            else:  # coalesced (NCCL): one work that completes with the receives as well
                entries = [(work, all(op.op is dist.isend for op in ops)) for work in works]
            for work, sends_only in entries:
                if sends_only and self.defer_sends:
                    self.pending.append((work, ops))  # keeps the sent tensors alive until it completes
                else:
                    work.wait()
        if received[0] is not None:
            received[0].requires_grad_()
        return received[0], received[1]

    def finish(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


class _PipelineStep:
    """One optimizer step's forward and backward passes of one rank's stage(s), shared by both schedules."""

    def __init__(
        self, models, batch, criterion, optimizer, forward_only, return_output_label, data_parallel_group, type_losses
    ):
        self.models, self.batch, self.criterion, self.optimizer = models, batch, criterion, optimizer
        self.type_losses = type_losses
        self.weights = micro_batch_weights(batch["labels"], data_parallel_group)
        self.inputs = {}  # micro-batch -> its packed-document arguments (PackedSequences or positions)
        self.forward_only, self.return_output_label = forward_only, return_output_label
        self.micro_num = batch["input_ids"].shape[0]
        self.backwards_done = [0] * len(models)  # per chunk
        self.loss = torch.zeros((), dtype=torch.float32, device=batch["input_ids"].device)
        self.outputs, self.labels = [], []

    def forward(self, chunk: int, micro: int, hidden):
        """Runs stage `chunk` on micro-batch `micro`; the last stage returns its weighted loss."""
        model = self.models[chunk]
        with torch.set_grad_enabled(not self.forward_only):
            if micro not in self.inputs:  # built once per micro-batch, shared by this rank's chunks
                self.inputs[micro] = micro_batch_inputs(self.batch, micro)
            inputs = self.inputs[micro]
            if model.first:
                output = model(input_ids=self.batch["input_ids"][micro], **inputs)
            else:
                output = model(hidden_states=hidden, **inputs)
            if not model.last:
                return output
            label = self.batch["labels"][micro]
            loss = micro_batch_loss(self.criterion, output, self.batch, micro, self.type_losses) * self.weights[micro]
        self.loss += loss.detach().float()
        if self.return_output_label:
            self.outputs.append(output.detach())
            self.labels.append(label)
        return loss

    def backward(self, chunk: int, hidden_in, output, output_grad):
        """Backward through stage `chunk` from its output's gradient (None: output is the loss); returns
        the gradient of its input activation (None for the first stage). The chunk's last micro-batch
        lets the optimizer start reducing that chunk's gradients (overlap_sync_grad)."""
        self.backwards_done[chunk] += 1
        last = self.backwards_done[chunk] == self.micro_num
        params = list(self.models[chunk].parameters()) if last else None
        if output_grad is None:
            self.optimizer.backward(output, last=last, params=params)
        else:
            self.optimizer.backward_by_grad(output, output_grad, last=last, params=params)
        return None if hidden_in is None else hidden_in.grad


class _PipelineScheduler:
    def __init__(self, mesh: ParallelMesh, hidden_size: int, dtype: torch.dtype, sequence_split: int = 1):
        """mesh: the run's layout (this rank's stage, its neighbours, the pipeline and data groups);
        sequence_split: the tensor size under sequence parallelism (stages send their slice of the
        sequence), else 1."""
        self.mesh, self.hidden_size, self.dtype = mesh, hidden_size, dtype
        self.sequence_split = sequence_split

    def _p2p(self, batch, defer_sends=False) -> P2P:
        _, micro_bsz, seq_len = batch["input_ids"].shape
        shape = (micro_bsz, seq_len // self.sequence_split, self.hidden_size)
        return P2P(self.mesh, shape, self.dtype, batch["input_ids"].device, defer_sends)

    def _finish(self, step: _PipelineStep, p2p: P2P, return_loss: bool):
        """Every stage reports the loss, which only the last stage computed (the main rank logs it)."""
        p2p.finish()
        loss = step.loss
        mesh = self.mesh
        if mesh.dims.pipeline > 1:
            dist.broadcast(loss, src=mesh.stage_rank(mesh.dims.pipeline - 1), group=mesh.pipeline_group)
        outputs = (step.outputs, step.labels) if step.return_output_label else None
        return outputs, loss if return_loss else None


class PipelineScheduler(_PipelineScheduler):
    """1F1B over the micro-batches, one stage per rank."""

    def forward_backward_step(
        self,
        model,
        batch: dict,
        criterion,
        optimizer,
        forward_only: bool = False,
        return_loss: bool = True,
        return_output_label: bool = False,
        type_losses=None,
    ):
        micro_num = batch["input_ids"].shape[0]
        mesh = self.mesh
        p2p = self._p2p(batch)
        first, last = mesh.is_first_stage, mesh.is_last_stage
        step = _PipelineStep(
            model.stages, batch, criterion, optimizer, forward_only, return_output_label, mesh.data_group, type_losses
        )
        warmup = micro_num if forward_only else min(mesh.dims.pipeline - mesh.pipeline_rank - 1, micro_num)
        in_flight = []  # (input activation, output) of micro-batches awaiting their backward

        def run_forward(micro, hidden):
            output = step.forward(0, micro, hidden)
            if not forward_only:
                in_flight.append((hidden, output))
            return None if last else output

        for micro in range(warmup):
            hidden, _ = p2p.exchange(recv_prev=not first)
            p2p.exchange(send_next=run_forward(micro, hidden))
        steady = micro_num - warmup
        hidden = p2p.exchange(recv_prev=not first)[0] if steady else None
        for index in range(steady):
            output = run_forward(warmup + index, hidden)
            _, grad = p2p.exchange(send_next=output, recv_next=not last)
            grad_in = step.backward(0, *in_flight.pop(0), grad)
            final = index == steady - 1
            hidden, _ = p2p.exchange(send_prev=None if first else grad_in, recv_prev=not first and not final)
        if not forward_only:
            for _ in range(warmup):
                _, grad = p2p.exchange(recv_next=not last)
                grad_in = step.backward(0, *in_flight.pop(0), grad)
                p2p.exchange(send_prev=None if first else grad_in)
        return self._finish(step, p2p, return_loss)


def pad_micro_batches(batch: dict, multiple: int) -> dict:
    """The batch with copies of its last micro-batch appended, up to a multiple of `multiple` micro-batches,
    their labels all ignored: a forward-only pass (validation's valid_micro_num) in whole groups of stages,
    to which the copies add no loss (their weight, from their label count, is 0)."""
    micro_num = batch["input_ids"].shape[0]
    missing = (-micro_num) % multiple
    padded = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == micro_num:
            copies = value[-1:].expand(missing, *value.shape[1:])
            if key == "labels":
                copies = torch.full_like(copies, IGNORE_INDEX)
            value = torch.cat([value, copies])
        padded[key] = value
    return padded


class _InterleavedOrder:
    """One interleaved run's order of work on this rank, and its queues between work and messages.

    The k-th forward (backward) runs chunk chunk_of(k) on micro-batch micro_of(k): groups of P (the pipeline
    size) micro-batches pass through chunk 0, 1, ... C-1 (backwards: C-1, ..., 0). Per chunk, received
    activations, outputs awaiting their backward and received output gradients queue in micro-batch order."""

    def __init__(
        self,
        step: _PipelineStep,
        p2p: P2P,
        mesh: ParallelMesh,
        chunks: int,
        micro_num: int,
        forward_only: bool,
    ):
        self.step, self.p2p, self.chunks, self.forward_only = step, p2p, chunks, forward_only
        self.stages, rank = mesh.dims.pipeline, mesh.pipeline_rank
        self.first_rank, self.last_rank = mesh.is_first_stage, mesh.is_last_stage
        self.total = micro_num * chunks
        if forward_only or micro_num == self.stages:
            self.warmup = self.total
        else:
            self.warmup = min(self.total, (self.stages - rank - 1) * 2 + (chunks - 1) * self.stages)
        self.steady = self.total - self.warmup
        self.inputs = [[] for _ in range(chunks)]
        self.outputs = [[] for _ in range(chunks)]
        self.grads = [[] for _ in range(chunks)]

    def chunk_of(self, k: int, forward: bool) -> int:
        chunk = k % (self.stages * self.chunks) // self.stages
        return chunk if forward else self.chunks - 1 - chunk

    def micro_of(self, k: int) -> int:
        return k // (self.stages * self.chunks) * self.stages + k % self.stages

    def run_forward(self, k: int):
        """The k-th forward; returns the activation to send on (None: the loss of the model's last stage)."""
        chunk = self.chunk_of(k, True)
        inputs, outputs = self.inputs[chunk], self.outputs[chunk]
        hidden = inputs[len(outputs)] if inputs else None
        output = self.step.forward(chunk, self.micro_of(k), hidden)
        outputs.append(output)
        return None if (self.last_rank and chunk == self.chunks - 1) else output

    def run_backward(self, k: int):
        """The k-th backward; returns the gradient to send back (None from the model's first stage)."""
        chunk = self.chunk_of(k, False)
        hidden = self.inputs[chunk].pop(0) if self.inputs[chunk] else None
        output = self.outputs[chunk].pop(0)
        grad = self.grads[chunk].pop(0) if self.grads[chunk] else None
        grad_in = self.step.backward(chunk, hidden, output, grad)
        return None if (self.first_rank and chunk == 0) else grad_in

    def run(self) -> None:
        self.warm_up(then_backward=not self.forward_only and self.steady > 0)
        self.steady_state()
        if not self.forward_only:
            self.cool_down()

    def warm_up(self, then_backward: bool) -> None:
        """Forwards only; the last one also receives the first gradient when backwards follow."""
        hidden, _ = self.p2p.exchange(recv_prev=not self.first_rank)
        if hidden is not None:
            self.inputs[0].append(hidden)
        for k in range(self.warmup):
            output = self.run_forward(k)
            next_chunk = self.chunk_of(k + 1, True)
            recv_prev = not (self.first_rank and next_chunk == 0) and k != self.total - 1
            if k == self.warmup - 1 and then_backward:
                hidden, grad = self.p2p.exchange(send_next=output, recv_prev=recv_prev, recv_next=not self.last_rank)
                if grad is not None:
                    self.grads[self.chunks - 1].append(grad)
            else:
                hidden, _ = self.p2p.exchange(send_next=output, recv_prev=recv_prev)
            if hidden is not None:
                self.inputs[next_chunk].append(hidden)

    def steady_state(self) -> None:
        """One forward and one backward at a time, their messages in one exchange."""
        for index in range(self.steady):
            forward_k, backward_k = index + self.warmup, index
            output = self.run_forward(forward_k)
            grad_in = self.run_backward(backward_k)
            recv_prev, next_forward_chunk = self._next_input(forward_k)
            recv_next, next_backward_chunk = self._next_grad(backward_k)
            if index == self.steady - 1:
                recv_prev = False
            hidden, grad = self.p2p.exchange(
                send_next=output, send_prev=grad_in, recv_prev=recv_prev, recv_next=recv_next
            )
            if recv_prev:
                self.inputs[next_forward_chunk].append(hidden)
            if recv_next:
                self.grads[next_backward_chunk].append(grad)

    def _next_input(self, forward_k: int) -> tuple[bool, int]:
        """Whether an activation arrives with forward k's exchange, and for which chunk."""
        if self.first_rank:  # what rank P-1 sends now is for the chunk after its own
            source_chunk = self.chunk_of(forward_k - (self.stages - 1), True)
            return source_chunk != self.chunks - 1, source_chunk + 1
        return True, self.chunk_of(forward_k + 1, True)

    def _next_grad(self, backward_k: int) -> tuple[bool, int]:
        """Whether an output gradient arrives with backward k's exchange, and for which chunk."""
        if self.last_rank:  # what rank 0 sends now is for the chunk before its own
            source_chunk = self.chunk_of(backward_k - (self.stages - 1), False)
            return source_chunk != 0, source_chunk - 1
        return True, self.chunk_of(backward_k + 1, False)

    def cool_down(self) -> None:
        """The remaining backwards."""
        if self.steady == 0:  # everything was warm-up: the first gradient is still to come
            _, grad = self.p2p.exchange(recv_next=not self.last_rank)
            if grad is not None:
                self.grads[self.chunks - 1].append(grad)
        for k in range(self.steady, self.total):
            grad_in = self.run_backward(k)
            next_chunk = self.chunk_of(k + 1, False)
            recv_next = not (self.last_rank and next_chunk == self.chunks - 1) and k != self.total - 1
            _, grad = self.p2p.exchange(send_prev=grad_in, recv_next=recv_next)
            if grad is not None:
                self.grads[next_chunk].append(grad)


class InterleavedPipelineScheduler(_PipelineScheduler):
    """Interleaved 1F1B: num_chunks stages per rank; micro_num must be a multiple of the pipeline size."""

    def __init__(
        self,
        mesh: ParallelMesh,
        hidden_size: int,
        dtype: torch.dtype,
        num_chunks: int,
        sequence_split: int = 1,
        overlap: bool = True,
    ):
        super().__init__(mesh, hidden_size, dtype, sequence_split)
        self.num_chunks, self.overlap = num_chunks, overlap

    def _step(self, stages, *args) -> _PipelineStep:
        """The step's bookkeeping (ZeroPP's also gathers each chunk once per run of work on it)."""
        return _PipelineStep(stages, *args)

    def _orders(self, step: _PipelineStep, p2p: P2P, micro_num: int, forward_only: bool) -> list:
        """The runs of work a step makes, one after the other (each has a run() method): here one over all its
        micro-batches."""
        return [_InterleavedOrder(step, p2p, self.mesh, self.num_chunks, micro_num, forward_only)]

    def forward_backward_step(
        self,
        model,
        batch: dict,
        criterion,
        optimizer,
        forward_only: bool = False,
        return_loss: bool = True,
        return_output_label: bool = False,
        type_losses=None,
    ):
        mesh = self.mesh
        stages = mesh.dims.pipeline
        micro_num = given = batch["input_ids"].shape[0]
        if micro_num % stages:
            if not forward_only:  # the config allows no such training step (data.micro_num, rampup_batch_size)
                raise ValueError(
                    f"the interleaved schedule trains micro-batches in groups of the pipeline size {stages}; "
                    f"this batch holds {micro_num}"
                )
            batch, micro_num = pad_micro_batches(batch, stages), micro_num + (-micro_num) % stages
        p2p = self._p2p(batch, defer_sends=self.overlap)
        step = self._step(
            model.stages, batch, criterion, optimizer, forward_only, return_output_label, mesh.data_group, type_losses
        )
        for order in self._orders(step, p2p, micro_num, forward_only):
            order.run()
        outputs, loss = self._finish(step, p2p, return_loss)
        if outputs is not None:  # without the padding's copies (the last micro-batches)
            outputs = (outputs[0][:given], outputs[1][:given])
        return outputs, loss
