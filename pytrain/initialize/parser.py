"""The command line: InternLM's built-in arguments plus config overrides."""

import argparse
import os

import torch

# --rank / --local_rank replace what the launcher's environment says (torch.distributed.launch, for one,
# passes --local_rank without setting LOCAL_RANK).
RANK_VARIABLES = {"torch": ("RANK", "LOCAL_RANK"), "slurm": ("SLURM_PROCID", "SLURM_LOCALID")}


class DefaultParser(argparse.ArgumentParser):
    """After parsing, --rank / --local_rank (when given) become the launcher's environment variables, which
    launch_from_torch / launch_from_slurm read."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        rank_variable, local_rank_variable = RANK_VARIABLES[namespace.launcher]
        if namespace.rank is not None:
            os.environ[rank_variable] = str(namespace.rank)
        if namespace.local_rank is not None:
            os.environ[local_rank_variable] = str(namespace.local_rank)
        return namespace, extras


def get_default_parser() -> argparse.ArgumentParser:
    """InternLM's default parser; extend it with add_argument as InternLM's docs show:

    parser = pytrain.initialize.get_default_parser()
    parser.add_argument("--user_arg", type=int, default=-1, help="arguments add by user.")
    cmd_args = parser.parse_args()
    """
    parser = DefaultParser(description="pytrain: train a language model from a Python config file")
    parser.add_argument("--config", type=str, help="path to the config file")
    parser.add_argument(
        "--launcher",
        type=str,
        default="torch",
        choices=["torch", "slurm"],
        help="how processes were started: torchrun (torch) or srun (slurm)",
    )
    parser.add_argument("--host", type=str, help="master address (slurm; torchrun sets MASTER_ADDR)")
    parser.add_argument("--port", type=int, default=8888, help="master port (slurm; torchrun sets MASTER_PORT)")
    parser.add_argument("--world_size", type=int, help="number of processes (torchrun and slurm set it)")
    parser.add_argument(
        "--rank",
        type=int,
        help="rank of this process (torchrun and srun set it); given, it replaces RANK / SLURM_PROCID",
    )
    parser.add_argument(
        "--local_rank",
        type=int,
        help="rank of this process on its node; given, it replaces LOCAL_RANK / SLURM_LOCALID",
    )
    parser.add_argument(
        "--backend",
        type=str,
        default="nccl" if torch.cuda.is_available() else "gloo",
        help="torch.distributed backend (default: nccl with CUDA, else gloo)",
    )
    parser.add_argument("--seed", type=int, default=1024, help="random seed")
    parser.add_argument("--profiling", default=False, action="store_true", help="profile the run (torch.profiler)")
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override config fields, e.g. --set model.num_layers=2 data.micro_bsz=1",
    )
    return parser
