import torch

from pytrain.initialize import get_default_parser


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
    import pytest

    with pytest.raises(SystemExit):
        get_default_parser().parse_args(["--launcher", "mpi"])
    assert "invalid choice" in capsys.readouterr().err
