"""End-to-end runs of `python -m pytrain.train`, in-process and under torchrun with 2 gloo processes."""

import json
import os
import subprocess

import pytest
import torch
from conftest import CONFIGS, ROOT, SMALL, python

from pytrain.parallel import gpc


def metrics(run_folder):
    return [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]


def only_run(folder):
    (run,) = [p for p in folder.glob("*/*") if p.is_dir()]
    return run


def test_tiny_run_loss_falls(fresh_context, tmp_path, capsys):
    from pytrain.train.__main__ import main

    code = main(
        [
            "--config",
            str(CONFIGS / "tiny.py"),
            "--set",
            *SMALL,
            "data.total_steps=30",
            "adam.lr=3e-3",
            f"monitor.run_folder={tmp_path}",
            "monitor.tensorboard.enable=True",
        ]
    )
    assert code == 0
    run = gpc.run_folder
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 31))
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
    assert first > 4.5 and last < 0.7 * first, (first, last)  # ln(256) = 5.5 at the start
    out = capsys.readouterr().out
    for column in ("step 30/30", "loss", "lr", "grad_norm", "tgs", "tflops", "mfu", "mem"):
        assert column in out
    assert (run / "config.py").exists() and (run / "loss.svg").read_text().startswith("<svg")
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert all(r["tflops"] > 0 and r["mfu"] > 0 and r["memory_mib"] > 0 for r in rows)


def test_config_error_exits_cleanly(fresh_context, capsys):
    from pytrain.train.__main__ import main

    assert main(["--config", str(CONFIGS / "tiny.py"), "--set", "model.num_layer=2"]) == 2
    assert "did you mean 'num_layers'" in capsys.readouterr().out


TWO_PROCESS_RUN = [
    "--config",
    str(CONFIGS / "tiny.py"),
    "--backend",
    "gloo",
    "--set",
    *SMALL,
    "data.total_steps=6",
    "adam.lr=3e-3",
    "model.num_layers=4",
]


@pytest.fixture(scope="module")
def one_process_metrics(tmp_path_factory):
    """The single-process run every two-process layout is compared with (the same global batch of 4 micro-batches)."""
    folder = tmp_path_factory.mktemp("one")
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun sets it: same matmul blocking
    one = subprocess.run(
        [python(), "-m", "pytrain.train", *TWO_PROCESS_RUN, "data.micro_num=4", f"monitor.run_folder={folder}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=one_thread,
    )
    assert one.returncode == 0, one.stdout + one.stderr
    return metrics(only_run(folder))


@pytest.mark.parametrize(
    "layout, micro_num",
    [
        # slow: test_parallel.py's dp2 / ZeRO-1 layouts check the same against one process in the fast suite
        pytest.param(["parallel.zero1.size=-1"], 2, marks=pytest.mark.slow),
        pytest.param(["parallel.pipeline.size=2", "model.num_chunks=2"], 4, marks=pytest.mark.slow),
    ],
    ids=["dp2-zero1-sharded", "pp2-interleaved"],
)
def test_two_gloo_processes_equal_one_process(tmp_path, layout, micro_num, one_process_metrics):
    """`python -m pytrain.train` under torchrun with 2 gloo processes against 1 process with the same global
    batch: the same logged losses and gradient norms, with the real loader splitting the data over the
    data-parallel ranks, and logged by rank 0 also when the loss is computed on the last pipeline stage.
    (Every layout's equality with one process is tests/test_parallel.py's, in-process.)"""
    two = subprocess.run(
        [
            python(),
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "pytrain.train",
            *TWO_PROCESS_RUN,
            *layout,
            f"data.micro_num={micro_num}",
            f"monitor.run_folder={tmp_path / 'two'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stdout + two.stderr
    assert "2 rank(s)" in two.stdout
    a, b = one_process_metrics, metrics(only_run(tmp_path / "two"))
    assert len(a) == len(b) == 6
    # fp32: the only difference is the order of floating-point sums (all-reduce, split matmuls, threads)
    torch.testing.assert_close([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close([r["grad_norm"] for r in b], [r["grad_norm"] for r in a], rtol=1e-4, atol=1e-6)


def test_internlm_training_construction_api(fresh_context, tmp_path, monkeypatch):
    """The names of InternLM's training-construction page, used as that page shows, with a NEW_MODEL."""
    import pytrain
    from pytrain.initialize import get_default_parser, initialize_distributed_env, initialize_trainer
    from pytrain.model.families import build_internlm
    from pytrain.registry import MODEL_INITIALIZER
    from pytrain.train import get_train_data_loader, initialize_model, initialize_optimizer

    MODEL_INITIALIZER.names()  # the built-in families register at the first lookup: into the dict, not the copy
    monkeypatch.setattr(MODEL_INITIALIZER, "_modules", dict(MODEL_INITIALIZER._modules))
    built = {}
    MODEL_TYPE = "NEW_MODEL"

    @MODEL_INITIALIZER.register_module(module_name=MODEL_TYPE)
    def build_new_model_with_cfg(*args, **kwargs):
        built.update(kwargs)
        return build_internlm(**kwargs)

    parser = pytrain.initialize.get_default_parser()
    assert parser is not None and get_default_parser is pytrain.initialize.get_default_parser
    parser.add_argument("--user_arg", type=int, default=-1, help="arguments add by user.")
    args = parser.parse_args(
        [
            "--config",
            str(CONFIGS / "tiny.py"),
            "--user_arg",
            "3",
            "--set",
            *SMALL,
            "model_type=NEW_MODEL",
            "data.total_steps=3",
            "data.train_folder=None",
            f"monitor.run_folder={tmp_path}",
        ]
    )
    initialize_distributed_env(
        config=args.config, launcher=args.launcher, master_port=args.port, seed=args.seed, overrides=args.overrides
    )
    model = initialize_model()
    assert built["hidden_size"] == 64 and built["num_layers"] == 2
    optimizer, beta2_scheduler, lr_scheduler = initialize_optimizer(model=model)
    train_dl, dataset_types = get_train_data_loader(num_worker=0)
    assert dataset_types == ["dummy"]
    trainer, train_dl, _, _ = initialize_trainer(
        model=model,
        optimizer=optimizer,
        train_dataloader=train_dl,
        lr_scheduler=lr_scheduler,
        beta2_scheduler=beta2_scheduler,
    )
    steps = 0
    for batch in train_dl:
        assert batch["input_ids"].shape == (1, 2, 32)
        trainer.zero_grad()
        _, loss = trainer.execute_schedule(batch, forward_only=False, return_loss=True)
        success, grad_norm = trainer.step()
        assert success and grad_norm > 0 and torch.isfinite(loss)
        steps += 1
    assert steps == 3 and trainer.steps_taken == 3
    assert lr_scheduler.last_epoch == 3


def test_unknown_model_type_lists_registered(fresh_context, tmp_path):
    from pytrain.config import ConfigError
    from pytrain.initialize import launch_from_torch

    with pytest.raises(ConfigError, match=r"model_type = 'NOPE': no model is registered .*; registered: .*INTERNLM"):
        launch_from_torch(str(CONFIGS / "tiny.py"), overrides=["model_type=NOPE", f"monitor.run_folder={tmp_path}"])


@pytest.mark.parametrize("dtype", ["torch.bfloat16", "torch.float16"])
def test_16bit_training_steps(fresh_context, tmp_path, dtype):
    from pytrain.train.__main__ import main

    assert (
        main(
            [
                "--config",
                str(CONFIGS / "tiny.py"),
                "--set",
                *SMALL,
                "data.total_steps=4",
                f"model.dtype={dtype}",
                "use_fp32_norm=True",
                f"monitor.run_folder={tmp_path}",
            ]
        )
        == 0
    )
    rows = metrics(gpc.run_folder)
    assert len(rows) == 4 and all(r["loss"] == r["loss"] for r in rows)
    assert ("loss_scale" in rows[0]) == (dtype == "torch.float16")


def test_7b_dry_run_reports_parameters_without_memory(capsys):
    from pytrain.train.__main__ import main

    assert main(["--config", str(CONFIGS / "7B.py"), "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "7,321,948,160 parameters (7.32B)" in out and "44.61 GFLOPs per token" in out
    assert (
        main(["--config", str(CONFIGS / "7B.py"), "--dry_run", "--world_size", "8", "--set", "parallel.zero1.size=3"])
        == 2
    )
    assert "parallel.zero1.size=3 does not divide the data-parallel size 8" in capsys.readouterr().out


def test_labels_beyond_the_vocabulary_are_a_data_error_naming_the_field():
    from pytrain.data import DataError
    from pytrain.train import Trainer

    trainer = Trainer(
        torch.nn.Linear(2, 2), None, None, None, torch.device("cpu"), label_vocab_size=10, moe_loss_coeff=1
    )
    batch = {"input_ids": torch.zeros(1, 1, 4, dtype=torch.long), "labels": torch.tensor([[[1, -100, 12, 3]]])}
    with pytest.raises(DataError, match=r"found 12: the data holds token ids beyond model.vocab_size=10"):
        trainer.execute_schedule(batch)
