"""ZeroPP (arXiv 2402.03791; InternEvo's parallel.pipeline.use_zeropp): pipeline stages sharded over the data
ranks instead of split over tensor ranks, scheduled in units of micro-batches.

The sharding is the layout's own: parallel.weight (isp's weight parallelism, what InternEvo's
configs/7B_llama2_zeropp.py uses: tensor size 1, weight size 8) or parallel.zero1.fsdp, both torch's
fully_shard over each stage (pytrain.parallel.fsdp). What ZeroPP changes is the schedule, and when the
sharded parameters are gathered.

Schedule (ZeroPPScheduler), as InternEvo's ZeroPPScheduler (internlm/core/scheduler/pipeline_scheduler.py):
with data.unit_schedule_size = U, a step's micro-batches run in units of U, one after the other; within a
unit the k-th forward runs chunk k // U on the unit's micro-batch k % U (every micro-batch of the unit
through chunk 0, then through chunk 1, ...: interleaved GPipe), the backwards the same from the last chunk
down. Rank r runs min(U C, 2 (P - r - 1) + (C - 1) U) forwards first (rank 0, and any rank when U is
small, all of them), then one forward and one backward at a time, then the remaining backwards: the same
warm-up, steady state and cool-down as interleaved 1F1B (pytrain.parallel.pipeline._InterleavedOrder)
with groups of U micro-batches instead of P. Units are of U = P micro-batches here (the config's check): with larger
units rank P-1's activations for rank 0's next chunk arrive at other points of the steady state than the
message order derived for groups of P expects (InternEvo uses the same order; its 7B_llama2_zeropp.py has
U = P = 4), and that order is not derived yet. Without units (unit_schedule_size
None) the schedule is interleaved 1F1B over the whole step (InternEvo's choice too).

Gathering: each chunk's work comes in runs (U forwards of one chunk in a row, U backwards), and ZeroPP
gathers a chunk's parameters once per run instead of once per micro-batch: the chunk's FSDP units keep
their gathered parameters after each forward and backward while the chunk is the one working, and are
resharded as soon as work moves to another chunk (InternEvo caches each chunk's gathered weight-parallel
weights until the pipeline's virtual rank changes, internlm/utils/zeropp_manager.py). At most one chunk's
parameters are gathered at a time, plus one unit's (layer's) of the chunk being left. Gradients are still
reduce-scattered after each backward of a unit: the sharded gradient is what accumulates.

InternEvo's parallel.pipeline.decouple_grad (the linears' weight gradients computed after the input
gradients, in the bubbles, zero-bubble style) is not done: see pytrain.config_vocabulary.
"""

from torch import nn
from torch.distributed.fsdp import FSDPModule

from .pipeline import InterleavedPipelineScheduler, _InterleavedOrder, _PipelineStep


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
    """A _PipelineStep that gathers each chunk once per run of work on it (_ChunkResidency)."""

    def __init__(self, residency: _ChunkResidency, *args):
        super().__init__(*args)
        self.residency = residency

    def forward(self, chunk: int, micro: int, hidden):
        self.residency.enter(chunk)
        return super().forward(chunk, micro, hidden)

    def backward(self, chunk: int, hidden_in, output, output_grad):
        self.residency.enter(chunk)
        return super().backward(chunk, hidden_in, output, output_grad)


class ZeroPPScheduler(InterleavedPipelineScheduler):
    """ZeroPP: units of unit_size micro-batches, interleaved GPipe within each (None: interleaved 1F1B); each
    chunk's sharded parameters gathered once per run of work on it."""

    def __init__(
        self,
        mesh,
        hidden_size: int,
        dtype,
        num_chunks: int,
        unit_size: int | None = None,
        sequence_split: int = 1,
        overlap: bool = True,
    ):
        super().__init__(mesh, hidden_size, dtype, num_chunks, sequence_split, overlap)
        stages = mesh.dims.pipeline
        if unit_size not in (None, stages):
            raise ValueError(f"ZeroPP's units are of the pipeline size {stages} micro-batches, not {unit_size}")
        self.unit_size = unit_size

    def forward_backward_step(self, model, *args, **kwargs):
        self.residency = _ChunkResidency(model.stages)
        try:
            return super().forward_backward_step(model, *args, **kwargs)
        finally:
            self.residency.leave()  # the optimizer updates the shards: nothing may stay gathered

    def _step(self, stages, *args) -> _PipelineStep:
        return _ResidentStep(self.residency, stages, *args)

    def _orders(self, step, p2p, micro_num: int, forward_only: bool) -> list[_InterleavedOrder]:
        if self.unit_size is None or forward_only:  # validation: one run over the whole batch, as interleaved
            return super()._orders(step, p2p, micro_num, forward_only)
        if micro_num % self.unit_size:  # the config allows no such step (data.micro_num, rampup_batch_size)
            raise ValueError(f"ZeroPP runs whole units of {self.unit_size} micro-batches; this batch holds {micro_num}")
        unit = self.unit_size
        return [
            _InterleavedOrder(step, p2p, self.mesh, self.num_chunks, unit, False, group=unit, first_micro=first)
            for first in range(0, micro_num, unit)
        ]
