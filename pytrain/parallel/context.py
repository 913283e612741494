"""The process layout of a run and the global context `gpc`, as InternLM's `gpc` (config + ranks).

Ranks are laid out tensor-fastest, then data, then pipeline (Megatron's order): global rank =
pipeline_rank * (data * tensor) + data_rank * tensor + tensor_rank, so the ranks of one tensor group are
neighbours (one node, fastest links) and each pipeline stage is a contiguous block of ranks.

Expert parallelism (InternEvo's rule) cuts each data group into runs of `expert` consecutive data ranks:
an expert group shares one copy of the experts, each rank holding its part; the ranks at the same place
in each run of a data group (the expert-data group) hold the same experts and average their gradients.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Layout:
    """Which global ranks form each group of a tensor x data x pipeline layout (see the module docstring)."""

    world_size: int
    tensor: int
    pipeline: int
    expert: int = 1

    @property
    def data(self) -> int:
        return self.world_size // (self.tensor * self.pipeline)

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(pipeline, data, tensor) rank of a global rank."""
        return rank // (self.data * self.tensor), rank // self.tensor % self.data, rank % self.tensor

    def rank(self, pipeline: int, data: int, tensor: int) -> int:
        return (pipeline * self.data + data) * self.tensor + tensor

    def tensor_groups(self) -> list[list[int]]:
        return [
            [self.rank(p, d, t) for t in range(self.tensor)] for p in range(self.pipeline) for d in range(self.data)
        ]

    def data_groups(self) -> list[list[int]]:
        return [
            [self.rank(p, d, t) for d in range(self.data)] for p in range(self.pipeline) for t in range(self.tensor)
        ]

    def pipeline_groups(self) -> list[list[int]]:
        return [
            [self.rank(p, d, t) for p in range(self.pipeline)] for d in range(self.data) for t in range(self.tensor)
        ]

    def model_groups(self) -> list[list[int]]:
        return [
            [self.rank(p, d, t) for p in range(self.pipeline) for t in range(self.tensor)] for d in range(self.data)
        ]

    def expert_groups(self) -> list[list[int]]:
        """Each data group cut into runs of `expert` consecutive data-parallel ranks."""
        return [
            group[first : first + self.expert]
            for group in self.data_groups()
            for first in range(0, self.data, self.expert)
        ]

    def expert_data_groups(self) -> list[list[int]]:
        """The ranks at the same place of every expert group within a data group."""
        return [group[place :: self.expert] for group in self.data_groups() for place in range(self.expert)]

    def expert_zero1_groups(self, size: int) -> list[list[int]]:
        """Each expert-data group cut into runs of `size` (the expert weights' ZeRO-1 groups)."""
        return _runs(self.expert_data_groups(), size)

    def zero1_groups(self, size: int) -> list[list[int]]:
        """Each data group cut into runs of `size` consecutive data-parallel ranks."""
        return _runs(self.data_groups(), size)


def _runs(groups: list[list[int]], size: int) -> list[list[int]]:
    return [group[first : first + size] for group in groups for first in range(0, len(group), size)]


@dataclass
class ParallelContext:
    config: object = None  # pytrain.config.Config once launched
    rank: int = 0
    local_rank: int = 0
    layout: Layout = Layout(world_size=1, tensor=1, pipeline=1)
    data_parallel_group: object = None
    zero1_group: object = None  # the ranks sharing one copy of the optimizer state; None: not sharded
    tensor_parallel_group: object = None
    pipeline_parallel_group: object = None
    model_parallel_group: object = None  # the tensor x pipeline ranks holding one copy of the model
    embedding_group: object = None  # first and last pipeline stage, for tied embeddings; None: not on one
    expert_parallel_group: object = None  # the data ranks sharing one copy of the experts; None: expert size 1
    expert_data_parallel_group: object = None  # the ranks holding the same experts (the data group when size 1)
    expert_zero1_group: object = None  # the ranks sharing one copy of the expert weights' optimizer state
    device: torch.device = torch.device("cpu")  # noqa: RUF009 (immutable)
    run_folder: object = None  # pathlib.Path of this run's outputs
    seed: int = 1024

    world_size = property(lambda self: self.layout.world_size)
    data_parallel_size = property(lambda self: self.layout.data)
    tensor_parallel_size = property(lambda self: self.layout.tensor)
    pipeline_parallel_size = property(lambda self: self.layout.pipeline)
    pipeline_parallel_rank = property(lambda self: self.layout.coordinates(self.rank)[0])
    data_parallel_rank = property(lambda self: self.layout.coordinates(self.rank)[1])
    tensor_parallel_rank = property(lambda self: self.layout.coordinates(self.rank)[2])

    @property
    def is_initialized(self) -> bool:
        return self.config is not None and dist.is_initialized()

    @property
    def is_main_rank(self) -> bool:
        return self.rank == 0

    @property
    def is_first_stage(self) -> bool:
        return self.pipeline_parallel_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pipeline_parallel_rank == self.pipeline_parallel_size - 1

    def stage_rank(self, stage: int) -> int:
        """The global rank of pipeline stage `stage` (modulo the pipeline size) beside this rank."""
        return self.layout.rank(stage % self.pipeline_parallel_size, self.data_parallel_rank, self.tensor_parallel_rank)

    def require_config(self, config=None):
        """`config` if given, else the launched run's; an error that says how to launch when neither."""
        if config is not None:
            return config
        if self.config is None:
            raise RuntimeError(
                "no config: launch first (pytrain.initialize.launch_from_torch(config=...) or "
                "initialize_distributed_env(...)), or pass config="
            )
        return self.config


gpc = ParallelContext()
