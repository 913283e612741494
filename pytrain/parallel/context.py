"""The global context `gpc`, InternLM's face of a launched run: its config, this rank, and the layout's sizes,
ranks and process groups as InternLM names them, all read from the run's ParallelMesh (pytrain.parallel.mesh).
pytrain's own code receives the mesh (or the groups it needs) explicitly; gpc is for user code written
against InternLM."""

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .mesh import ParallelDims, ParallelMesh


def _from_mesh(attribute: str, unlaunched):
    """A property reading the mesh's `attribute`; `unlaunched` before a run is launched (a world of one)."""
    return property(lambda self: unlaunched if self.mesh is None else getattr(self.mesh, attribute))


@dataclass
class ParallelContext:
    config: object = None  # pytrain.config.Config once launched
    rank: int = 0
    local_rank: int = 0
    mesh: ParallelMesh | None = None  # the launched run's layout and process groups
    device: torch.device = torch.device("cpu")  # noqa: RUF009 (immutable)
    run_folder: object = None  # pathlib.Path of this run's outputs
    seed: int = 1024

    dims = _from_mesh("dims", ParallelDims(world_size=1))
    world_size = property(lambda self: self.dims.world_size)
    data_parallel_size = property(lambda self: self.dims.data)
    tensor_parallel_size = property(lambda self: self.dims.tensor)
    pipeline_parallel_size = property(lambda self: self.dims.pipeline)
    pipeline_parallel_rank = _from_mesh("pipeline_rank", 0)
    data_parallel_rank = _from_mesh("data_rank", 0)
    tensor_parallel_rank = _from_mesh("tensor_rank", 0)
    is_first_stage = _from_mesh("is_first_stage", True)
    is_last_stage = _from_mesh("is_last_stage", True)
    data_parallel_group = _from_mesh("data_group", None)
    zero1_group = _from_mesh("zero1_group", None)  # the ranks sharing one copy of the optimizer state
    tensor_parallel_group = _from_mesh("tensor_group", None)
    pipeline_parallel_group = _from_mesh("pipeline_group", None)
    model_parallel_group = _from_mesh("model_group", None)  # the tensor x pipeline ranks holding one model copy
    embedding_group = _from_mesh("embedding_group", None)  # first and last pipeline stage, for tied embeddings
    expert_parallel_group = _from_mesh("expert_group", None)  # the data ranks sharing one copy of the experts
    expert_data_parallel_group = _from_mesh("expert_data_group", None)  # the ranks holding the same experts
    expert_zero1_group = _from_mesh("expert_zero1_group", None)  # ... sharing the expert weights' optimizer state

    @property
    def is_initialized(self) -> bool:
        return self.config is not None and dist.is_initialized()

    @property
    def is_main_rank(self) -> bool:
        return self.rank == 0

    def stage_rank(self, stage: int) -> int:
        """The global rank of pipeline stage `stage` (modulo the pipeline size) beside this rank."""
        return 0 if self.mesh is None else self.mesh.stage_rank(stage)

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
