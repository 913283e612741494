"""The layout of a run in one object: `ParallelDims` (the sizes, resolved from the config and checked once) and
`ParallelMesh` (the process groups, each one named axis of a torch DeviceMesh).

The world is a (pipeline, data, tensor) mesh, tensor fastest (Megatron's order): the ranks of one tensor group
are neighbours (one node, the fastest links) and each pipeline stage is a contiguous block of ranks. Other
groups are views of that mesh, never rank arithmetic:
- model: pipeline x tensor flattened, the ranks that together hold one copy of the model;
- zero1: the data axis cut into runs of `zero1` consecutive ranks (the ranks sharing one copy of the optimizer
  state);
- expert (InternEvo's rule): the data axis unflattened into (expert-data, expert), expert fastest: an expert
  group is a run of `expert` consecutive data ranks sharing one copy of the experts; the expert-data group,
  the ranks at the same place of each run, holds the same experts and averages their gradients; its runs of
  `expert_zero1` ranks share the expert weights' optimizer state.
- embedding: the first and last pipeline stage of each (data, tensor) place, for a tied embedding.
- fsdp (with `fsdp`): the mesh torch's fully_shard shards over: the zero1 runs, replicated across the runs (HSDP)
  when there are several; expert_fsdp likewise for the expert weights over the expert-zero1 runs.
- head, context (InternEvo's sequence_2D, with isp): the tensor axis unflattened into (context, head), head
  fastest (head_first: a head group's ranks are neighbours) or (head, context): the all-to-all around attention
  runs over the head group, ring attention over the context group.
- weight (InternEvo's weight parallelism, with isp): the (data, tensor) face of a stage flattened, tensor fastest,
  and cut into runs of `weight` consecutive ranks; fully_shard shards every weight over a run (the fsdp mesh
  then), replicated across the runs; the expert weights over runs of `expert_weight` of the ranks holding the
  same experts (expert_fsdp). Under isp the tensor ranks hold the same weights (each sees its slice of
  the sequence), so a run may span tensor and data ranks: its gradient reduction sums over both, and the
  optimizer's norm then counts each run's shards once per pipeline stage (norm_group, gradient_tensor_group).

A new parallelism is one more axis here (a size in ParallelDims, a view in ParallelMesh) plus the code that
uses its group.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class ParallelDims:
    """The sizes of a layout. data = world / (tensor x pipeline); zero1 and expert_zero1 are resolved sizes
    (1: not sharded); expert is 1 for a dense model."""

    world_size: int
    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    zero1: int = 1
    expert_zero1: int = 1
    fsdp: bool = False  # zero1 shards the parameters and gradients as well (torch's fully_shard)
    isp: bool = False  # the tensor group splits the sequence (pytrain.parallel.sequence), not the weights
    weight: int = 1  # isp's weight parallelism: weights sharded over runs of this many (data, tensor) ranks
    expert_weight: int = 1  # ... and the expert weights over runs of this many of the ranks holding the same experts
    context: int = 1  # sequence_2D: the tensor group as head (tensor / context) x context (ring) ranks
    head_first: bool = True  # sequence_2D: a head group's ranks are neighbours (else a context group's)
    ring_window: int = 1  # sequence_2D's window_size: the context ranks of one inner ring

    def __post_init__(self):
        data = self.world_size // (self.tensor * self.pipeline)
        if data * self.tensor * self.pipeline != self.world_size:
            raise ValueError(f"tensor {self.tensor} x pipeline {self.pipeline} does not divide world {self.world_size}")
        for name, size, whole in (
            ("zero1", self.zero1, data),
            ("expert", self.expert, data),
            ("expert_zero1", self.expert_zero1, data // self.expert),
        ):
            if size < 1 or whole % size:
                raise ValueError(f"{name} size {size} does not divide {whole} ({self})")
        if self.context > 1 and (not self.isp or self.tensor % self.context or self.context % self.ring_window):
            raise ValueError(
                f"context size {self.context} needs isp, must divide tensor, window must divide it ({self})"
            )
        if self.weight > 1 and (not self.isp or (data * self.tensor) % self.weight):
            raise ValueError(f"weight size {self.weight} needs isp and must divide data x tensor ({self})")
        if self.expert_weight > 1 and (self.weight == 1 or (data // self.expert * self.tensor) % self.expert_weight):
            raise ValueError(
                f"expert_weight size {self.expert_weight} needs weight parallelism and must divide ({self})"
            )

    @property
    def shards_parameters(self) -> bool:
        """torch's fully_shard shards the parameters: FSDP over zero1, or isp's weight parallelism."""
        return self.fsdp or self.weight > 1

    @property
    def data(self) -> int:
        return self.world_size // (self.tensor * self.pipeline)

    @property
    def expert_data(self) -> int:
        """The data ranks holding the same experts."""
        return self.data // self.expert

    @classmethod
    def from_config(cls, cfg, world_size: int, source: str = "config") -> ParallelDims:
        """The layout `cfg.parallel` asks for on `world_size` ranks; a ConfigError naming the field when it
        cannot be laid out."""
        from pytrain.config import check_world_size, expert_parallel_size, expert_zero1_size

        data = check_world_size(cfg, world_size, source)
        expert = expert_parallel_size(cfg, data, source)
        zero1 = cfg.parallel.zero1.size
        return cls(
            world_size=world_size,
            tensor=cfg.parallel.tensor.size,
            pipeline=cfg.parallel.pipeline.size,
            expert=expert,
            zero1=data if zero1 <= 0 else zero1,
            expert_zero1=expert_zero1_size(cfg, data, expert, source),
            fsdp=cfg.parallel.zero1.fsdp,
            isp=cfg.parallel.tensor.mode == "isp",
            weight=cfg.parallel.weight.size,
            expert_weight=cfg.parallel.expert_weight.size,
            **_sequence_2d_sizes(cfg),
        )


def _sequence_2d_sizes(cfg) -> dict:
    """ParallelDims' sequence_2D fields (none: no ring), the config checked (head x context = tensor)."""
    two = cfg.parallel.sequence_2D
    if not two.enable:
        return {}
    if two.head_size * two.context_size != cfg.parallel.tensor.size:  # (a config changed after its checks)
        raise ValueError(f"sequence_2D: head_size x context_size must equal parallel.tensor.size ({two})")
    placement = two.device_placement_strategy or {}
    return dict(
        context=two.context_size,
        head_first=placement.get("head_first", True),
        ring_window=two.window_size,
    )


class ParallelMesh:
    """The process groups of a ParallelDims layout, from a DeviceMesh with named axes (see the module docstring).

    Every rank builds it, collectively. A group a layout does not use is None (zero1 / expert_zero1 of size 1,
    expert of size 1, embedding without a pipeline); the expert-data group is the data group for a dense model.
    Every group waits `timeout` at most for a peer.
    """

    def __init__(self, dims: ParallelDims, device_type: str, timeout: datetime.timedelta):
        self.dims = dims
        override = _timeout_options(timeout)
        self.world = init_device_mesh(
            device_type,
            (dims.pipeline, dims.data, dims.tensor),
            mesh_dim_names=("pp", "dp", "tp"),
            backend_override=_for_axes(override, "pp", "dp", "tp"),
        )
        self.pipeline_rank, self.data_rank, self.tensor_rank = self.world.get_coordinate()
        self.tensor_group = self.world.get_group("tp")
        self.head_group, self.context_group = self.tensor_group, None
        if dims.context > 1:
            self._head_and_context_groups(override)
        self.data_group = self.world.get_group("dp")
        self.pipeline_group = self.world.get_group("pp")
        self.model_group = self.world["pp", "tp"]._flatten("model", backend_override=override).get_group()
        data = self.world["dp"]
        self.zero1_group, self.fsdp = _runs_of(data, dims.zero1, "zero1", override, dims.fsdp)
        if dims.expert > 1:
            expert = data._unflatten(
                0,
                (dims.expert_data // dims.expert_zero1, dims.expert_zero1, dims.expert),
                ("edp_replicate", "edp_zero1", "ep"),
                backend_override=_for_axes(override, "edp_replicate", "edp_zero1", "ep"),
            )
            self.expert_group = expert.get_group("ep")
            edp = expert["edp_replicate", "edp_zero1"]._flatten("edp", backend_override=override)
            self.expert_data_group = edp.get_group()
            whole = dims.expert_zero1 == dims.expert_data
            self.expert_zero1_group = self.expert_data_group if whole else _group_or_none(expert, "edp_zero1")
            self.expert_fsdp = edp if whole else expert["edp_replicate", "edp_zero1"]
        else:
            self.expert_group, self.expert_data_group = None, self.data_group
            self.expert_zero1_group, self.expert_fsdp = _runs_of(
                data, dims.expert_zero1, "expert_zero1", override, dims.fsdp
            )
        if not dims.fsdp:
            self.fsdp = self.expert_fsdp = None
        # the group a whole parameter is held on redundantly, or partial, after its gradient's data reduction;
        # the group the norm's counted squares are summed over
        self.gradient_tensor_group, self.norm_group = self.tensor_group, self.model_group
        if dims.weight > 1:
            self._weight_runs(override)
        self.embedding_group = self._ends_of_pipeline(timeout) if dims.pipeline > 1 else None

    def _head_and_context_groups(self, override) -> None:
        """sequence_2D: the tensor axis as a (head, context) grid, the head axis fastest with head_first."""
        dims = self.dims
        heads = dims.tensor // dims.context
        names = ("context", "head") if dims.head_first else ("head", "context")
        sizes = (dims.context, heads) if dims.head_first else (heads, dims.context)
        grid = self.world["tp"]._unflatten(0, sizes, names, backend_override=_for_axes(override, *names))
        self.head_group = grid.get_group("head") if heads > 1 else None
        self.context_group = grid.get_group("context")

    def _weight_runs(self, override) -> None:
        """Weight parallelism (module docstring): fsdp is the runs of `weight` ranks of the (data, tensor) face,
        zero1 the run (the ranks sharing one copy of the optimizer state, a shard each); expert_fsdp and
        expert_zero1 likewise for the expert weights, runs of `expert_weight` of the ranks holding the same
        experts (the expert-data x tensor ranks)."""
        dims = self.dims
        face = self.world["dp", "tp"]._flatten("dp_tp", backend_override=override)
        self.fsdp = _runs(face, dims.weight, "weight", override)
        self.zero1_group = self.fsdp.get_group(self.fsdp.ndim - 1)
        same_experts = face
        if dims.expert > 1:  # a data rank is (expert-data rank) x expert + expert rank, tensor fastest
            names = ("weight_edp", "weight_ep", "weight_tp")
            grid = face._unflatten(
                0, (dims.expert_data, dims.expert, dims.tensor), names, backend_override=_for_axes(override, *names)
            )
            same_experts = grid["weight_edp", "weight_tp"]._flatten("same_experts", backend_override=override)
        self.expert_fsdp = _runs(same_experts, dims.expert_weight, "expert_weight", override)
        self.expert_zero1_group = (
            self.expert_fsdp.get_group(self.expert_fsdp.ndim - 1) if dims.expert_weight > 1 else None
        )
        self.gradient_tensor_group, self.norm_group = None, self.pipeline_group

    @property
    def is_first_stage(self) -> bool:
        return self.pipeline_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pipeline_rank == self.dims.pipeline - 1

    def stage_rank(self, stage: int) -> int:
        """The global rank of pipeline stage `stage` (modulo the pipeline size) at this rank's (data, tensor)."""
        return int(self.world.mesh[stage % self.dims.pipeline, self.data_rank, self.tensor_rank])

    def _ends_of_pipeline(self, timeout: datetime.timedelta):
        """The first and last stage of each (data, tensor) place: not an axis, a pair of mesh faces."""
        first, last = self.world.mesh[0].flatten().tolist(), self.world.mesh[-1].flatten().tolist()
        mine = None
        for pair in zip(first, last):
            group = dist.new_group(ranks=list(pair), timeout=timeout)  # every rank creates every group
            if dist.get_rank() in pair:
                mine = group
        return mine


def _runs(ranks: DeviceMesh, size: int, name: str, override) -> DeviceMesh:
    """A 1-D mesh's ranks as runs of `size` consecutive ones, for fully_shard: the whole mesh when one run, else
    2-D (replicate, shard) (size 1: every rank its own run, a replica of every other)."""
    if size == ranks.size():
        return ranks
    names = (f"{name}_replicate", name)
    return ranks._unflatten(0, (ranks.size() // size, size), names, backend_override=_for_axes(override, *names))


def _group_or_none(mesh: DeviceMesh, axis: str):
    return mesh.get_group(axis) if mesh.size(mesh.mesh_dim_names.index(axis)) > 1 else None


def _runs_of(data: DeviceMesh, size: int, name: str, override, fsdp: bool):
    """(The group of `size` consecutive ranks of the data axis holding this rank, None for size 1; with fsdp,
    the mesh sharding over those runs: 1-D for one run, 2-D (replicate, shard) for several, else None)."""
    if size == 1:
        if not fsdp or data.size() == 1:
            return None, data if fsdp else None
        return None, data._unflatten(
            0,
            (data.size(), 1),
            (f"{name}_replicate", name),
            backend_override=_for_axes(override, f"{name}_replicate", name),
        )
    if size == data.size():  # a group of its own: ZeRO-1's collectives stay apart from the gradient all-reduce
        whole = data._flatten(name, backend_override=override)
        return whole.get_group(), whole
    runs = data._unflatten(
        0,
        (data.size() // size, size),
        (f"{name}_replicate", name),
        backend_override=_for_axes(override, f"{name}_replicate", name),
    )
    return runs.get_group(name), runs


def _for_axes(options, *axes: str) -> dict | None:
    return None if options is None else dict.fromkeys(axes, options)


def _timeout_options(timeout: datetime.timedelta):
    """Backend options carrying `timeout`, the way DeviceMesh passes a timeout to the groups it creates (None
    for a backend other than NCCL and gloo: its groups keep torch's default)."""
    backend = dist.get_backend()
    if backend not in ("nccl", "gloo"):
        return None
    options = dist.ProcessGroupNCCL.Options() if backend == "nccl" else dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    return options
