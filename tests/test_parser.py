import os

import pytest
import torch

from pytrain.initialize import get_default_parser

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "SLURM_LOCALID")


@pytest.fixture(autouse=True)
def rank_environment(monkeypatch):
    """--rank / --local_rank write the launcher's environment: each test starts without it and leaves none."""
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    yield
    for name in RANK_VARIABLES:
        os.environ.pop(name, None)


def test_builtin_arguments_and_defaults():
    args = get_default_parser().parse_args([])
    assert args.config is None
    assert args.launcher == "torch"
    assert args.host is None and args.world_size is None and args.rank is None and args.local_rank is None
    assert args.port == 8888
    assert args.seed == 1024
    assert args.profiling is False
    assert args.backend == ("nccl" if torch.cuda.is_available() else "gloo")
    assert args.overrides == []


def test_builtin_arguments_parse():
    args = get_default_parser().parse_args(
        [
            "--config",
            "c.py",
            "--launcher",
            "slurm",
            "--host",
            "node1",
            "--port",
            "1234",
            "--world_size",
            "8",
            "--rank",
            "3",
            "--local_rank",
            "1",
            "--backend",
            "gloo",
            "--seed",
            "7",
            "--profiling",
        ]
    )
    assert (args.config, args.launcher, args.host, args.port) == ("c.py", "slurm", "node1", 1234)
    assert (args.world_size, args.rank, args.local_rank, args.backend, args.seed) == (8, 3, 1, "gloo", 7)
    assert args.profiling is True


def test_user_argument_as_internlm_docs_show():
    parser = get_default_parser()
    parser.add_argument("--user_arg", type=int, default=-1, help="arguments add by user.")
    assert parser.parse_args([]).user_arg == -1
    assert parser.parse_args(["--user_arg", "5", "--seed", "3"]).user_arg == 5


def test_set_overrides_collect_across_flags():
    args = get_default_parser().parse_args(["--set", "model.num_layers=2", "data.micro_bsz=1", "--set", "adam.lr=1e-3"])
    assert args.overrides == ["model.num_layers=2", "data.micro_bsz=1", "adam.lr=1e-3"]


def test_bad_launcher_rejected(capsys):
    with pytest.raises(SystemExit):
        get_default_parser().parse_args(["--launcher", "mpi"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    "launcher, rank_variable, local_variable",
    [("torch", "RANK", "LOCAL_RANK"), ("slurm", "SLURM_PROCID", "SLURM_LOCALID")],
)
def test_rank_arguments_replace_the_launchers_environment(monkeypatch, launcher, rank_variable, local_variable):
    monkeypatch.setenv(rank_variable, "0")
    args = get_default_parser().parse_args(["--launcher", launcher, "--rank", "3", "--local_rank", "1"])
    assert (args.rank, args.local_rank) == (3, 1)
    assert os.environ[rank_variable] == "3" and os.environ[local_variable] == "1"


def test_without_rank_arguments_the_environment_is_untouched(monkeypatch):
    monkeypatch.setenv("RANK", "5")
    get_default_parser().parse_args(["--local_rank", "2"])  # as torch.distributed.launch passes it
    assert os.environ["RANK"] == "5" and os.environ["LOCAL_RANK"] == "2" and "SLURM_PROCID" not in os.environ
