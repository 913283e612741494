"""Launching a run: the command line, the process group and the trainer."""

from .build_trainer import initialize_trainer
from .launch import initialize_distributed_env, launch, launch_from_slurm, launch_from_torch
from .parser import get_default_parser

__all__ = [
    "get_default_parser",
    "initialize_distributed_env",
    "initialize_trainer",
    "launch",
    "launch_from_slurm",
    "launch_from_torch",
]
