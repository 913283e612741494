"""The process layout of a run and the global context `gpc`, as InternLM's `gpc` (config + ranks)."""
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelContext:
    config: object = None  # pytrain.config.Config once launched
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    data_parallel_size: int = 1
    data_parallel_rank: int = 0
    data_parallel_group: object = None
    zero1_group: object = None  # the ranks sharing one copy of the optimizer state; None: not sharded
    device: torch.device = torch.device("cpu")
    run_folder: object = None  # pathlib.Path of this run's outputs
    seed: int = 1024

    @property
    def is_initialized(self) -> bool:
        return self.config is not None and dist.is_initialized()

    @property
    def is_main_rank(self) -> bool:
        return self.rank == 0

    def require_config(self, config=None):
        """`config` if given, else the launched run's; an error that says how to launch when neither."""
        if config is not None:
            return config
        if self.config is None:
            raise RuntimeError("no config: launch first (pytrain.initialize.launch_from_torch(config=...) or "
                               "initialize_distributed_env(...)), or pass config=")
        return self.config


gpc = ParallelContext()
