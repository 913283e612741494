"""The layout planner (pytrain.plan): what it lists is what the run accepts, and its memory predictions hold.

Honesty: the predicted peak bytes per rank against the peak of the bytes torch's CPU allocator held (AllocatorPeak,
from before the model is built through 3 training steps: the first creates Adam's state), per rank, within 15%,
for layouts of a dense and a mixture-of-experts model in 1 to 4 gloo processes built by the run's own construction
path. The README's "Fitting a model" lists the measured numbers.
"""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import CONFIGS
from rank_results import RankResults

from pytrain.config import Config
from pytrain.parallel.mesh import ParallelDims
from pytrain.plan import ModelShape, PlanError, Schedule, Target, plan, rank_memory
from pytrain.plan.measure import measure_layout
from pytrain.plan.memory import _loads
from pytrain.solver.optimizer import assign_owners
from pytrain.train.__main__ import main

TOLERANCE = 0.15
STEPS = 3


def layout_config(config: str, overrides: list[str], run_folder) -> Config:
    """The config file with the layout's overrides, on random tokens, without TensorBoard."""
    return Config.from_file(
        CONFIGS / config,
        overrides=[
            *overrides,
            "data.train_folder=None",
            f"monitor.run_folder={str(run_folder)!r}",
            "monitor.tensorboard.enable=False",
        ],
    )


def measured_peak(cfg: Config, rank: int, world: int) -> int:
    """The allocator's peak on this rank over building the model, optimizer and trainer and STEPS steps."""
    return measure_layout(cfg, rank, world, steps=STEPS)[0]


def predicted_peak(cfg: Config, world: int, rank: int) -> int:
    """The planner's peak for `rank`: its pipeline stage and its ZeRO-1 shares (the mesh's rank order)."""
    dims = ParallelDims.from_config(cfg, world)
    pipeline_rank = rank // (dims.data * dims.tensor)
    data_rank = rank // dims.tensor % dims.data
    schedule = Schedule.from_config(cfg, dims)
    return rank_memory(
        ModelShape.from_config(cfg),
        schedule,
        pipeline_rank,
        zero1_rank=data_rank % dims.zero1,
        expert_zero1_rank=data_rank // dims.expert % dims.expert_zero1,
    ).peak


def test_one_process_peak_is_predicted_within_tolerance(tmp_path, fresh_context, num_threads):
    num_threads(1)
    cfg = layout_config("tiny.py", ["data.micro_bsz=2", "data.micro_num=2", "model.num_layers=2"], tmp_path)
    measured = measured_peak(cfg, 0, 1)
    predicted = predicted_peak(cfg, 1, 0)
    assert abs(predicted / measured - 1) < TOLERANCE, (predicted, measured)


def sequence_2d(head: int, context: int) -> list[str]:
    """The overrides of isp's sequence_2D with `head` x `context` ranks."""
    return [
        "parallel.sequence_2D.enable=True",
        f"parallel.sequence_2D.head_size={head}",
        f"parallel.sequence_2D.context_size={context}",
    ]


# (config, world size, overrides): the README's "Fitting a model" table, measured per rank
HONESTY_LAYOUTS = [
    ("tiny.py", 2, ["parallel.zero1.size=2"]),
    ("tiny.py", 2, ["parallel.tensor.size=2"]),
    ("tiny.py", 2, ["parallel.tensor.size=2", "parallel.tensor.mode='msp'", "model.checkpoint=True"]),
    ("tiny.py", 2, ["parallel.pipeline.size=2", "data.micro_num=4"]),
    ("tiny.py", 4, ["parallel.pipeline.size=2", "data.micro_num=4", "model.num_chunks=2", "parallel.zero1.size=2"]),
    ("tiny.py", 1, ["selective_checkpoint=True", "selective_checkpoint_policy='matmuls'"]),
    ("tiny_moe.py", 1, []),
    ("tiny_moe.py", 2, ["parallel.expert.size=2"]),
    ("tiny_moe.py", 2, ["parallel.tensor.size=2", "model.checkpoint=0.5"]),
    ("tiny_moe.py", 4, ["parallel.expert.size=2", "parallel.pipeline.size=2", "data.micro_num=4"]),
    ("tiny.py", 2, ["parallel.zero1.fsdp=True"]),
    ("tiny.py", 2, ["parallel.zero1.fsdp=True", "parallel.zero1.reshard_after_forward=False"]),
    ("tiny.py", 4, ["parallel.zero1.fsdp=True", "parallel.tensor.size=2"]),
    ("tiny_moe.py", 2, ["parallel.zero1.fsdp=True", "parallel.expert.size=2"]),
    ("tiny.py", 2, ["parallel.tensor.size=2", "parallel.tensor.mode='isp'"]),
    ("tiny.py", 4, ["parallel.tensor.size=2", "parallel.tensor.mode='isp'", "parallel.weight.size=2"]),
    ("tiny.py", 2, ["parallel.tensor.size=2", "parallel.tensor.mode='isp'", *sequence_2d(head=1, context=2)]),
    ("tiny.py", 4, ["parallel.tensor.size=4", "parallel.tensor.mode='isp'", *sequence_2d(head=2, context=2)]),
]


def honesty_worker(rank, world, init_method, config, overrides, run_folder, results):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        results[rank] = measured_peak(layout_config(config, overrides, run_folder), rank, world)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("config, world, overrides", HONESTY_LAYOUTS, ids=lambda v: str(v))
def test_every_ranks_peak_is_predicted_within_tolerance(config, world, overrides, tmp_path, init_method):
    with RankResults() as results:
        args = (world, init_method, config, overrides, tmp_path, results)
        mp.spawn(honesty_worker, args=args, nprocs=world, join=True)
        measured = dict(results)
    cfg = layout_config(config, overrides, tmp_path)
    for rank in range(world):
        predicted = predicted_peak(cfg, world, rank)
        print(
            f"{config} {' '.join(overrides)} rank {rank}: measured {measured[rank] / 2**20:.1f} MiB, "
            f"predicted {predicted / 2**20:.1f} MiB ({predicted / measured[rank] - 1:+.1%})"
        )
        assert abs(predicted / measured[rank] - 1) < TOLERANCE, (rank, predicted, measured[rank])


@pytest.mark.parametrize("config, world", [("tiny.py", 4), ("tiny_moe.py", 4), ("7B.py", 8)])
def test_every_listed_layout_is_accepted_by_the_run(config, world):
    """Each listed layout, given as --set overrides to the config file, passes what a launch checks."""
    cfg = Config.from_file(CONFIGS / config)
    result = plan(cfg, world, Target(80 * 2**30, 989.0, 50.0))
    assert result.layouts
    for planned in result.layouts:
        laid_out = Config.from_file(CONFIGS / config, overrides=planned.layout.overrides())
        dims = ParallelDims.from_config(laid_out, world)
        assert (dims.tensor, dims.pipeline, dims.zero1, dims.fsdp, dims.weight, dims.context) == (
            planned.layout.tensor,
            planned.layout.pipeline,
            planned.layout.zero1,
            planned.layout.fsdp,
            planned.layout.weight,
            planned.layout.context,
        )
    tensor_sizes = {p.layout.tensor for p in result.layouts}
    assert tensor_sizes == ({1, 2, 4} if world == 4 else {1, 2, 4, 8}), tensor_sizes
    assert any(p.layout.fsdp for p in result.layouts) and not all(p.layout.fsdp for p in result.layouts)
    assert {p.layout.context for p in result.layouts} == tensor_sizes  # isp's sequence_2D rings of every size
    assert any(p.layout.weight > 1 for p in result.layouts)
    ranked = [(not p.fits, -p.step.tokens_per_s) for p in result.layouts]
    assert ranked == sorted(ranked)


def test_a_tensor_size_the_model_cannot_split_is_not_listed():
    cfg = Config.from_file(CONFIGS / "tiny.py")  # 8 heads: a tensor size of 3 cannot split them
    result = plan(cfg, 6, Target(2**30, 1.0, 1.0))
    assert {p.layout.tensor for p in result.layouts} == {1, 2}
    assert {p.layout.pipeline for p in result.layouts} == {1, 2, 3, 6}


def test_fsdp_layouts_are_listed_and_hold_a_shard_of_every_kind():
    cfg = Config.from_file(CONFIGS / "7B.py")  # bf16: ZeRO-1 keeps fp32 masters beside the Adam moments
    result = plan(cfg, 8, Target(80 * 2**30, 989.0, 50.0))
    by_name = {p.description: p for p in result.layouts}
    fsdp, zero = by_name["dp8 fsdp 8 recompute full"], by_name["dp8 zero1 8 recompute full"]
    assert fsdp.memory.parameters < zero.memory.parameters / 2
    assert fsdp.memory.gradients < zero.memory.gradients / 4
    # FSDP's fp32 shards are the masters: its optimizer state is the moments only, 8 of ZeRO-1's 12 bytes
    assert fsdp.memory.optimizer_state == pytest.approx(zero.memory.optimizer_state * 8 / 12, rel=0.05)
    assert fsdp.memory.peak < zero.memory.peak


def test_a_world_size_without_any_layout_names_the_field_and_sizes_that_work():
    cfg = Config.from_file(CONFIGS / "tiny_moe.py", overrides=["parallel.expert_zero1.size=3"])
    with pytest.raises(
        PlanError,
        match=r"no layout of 4 ranks.*parallel\.expert_zero1\.size=3.*world sizes that "
        r"admit one with this config: 3, 6",
    ):
        plan(cfg, 4, Target(2**30, 1.0, 1.0))


def test_zero1_shares_are_dealt_as_the_optimizer_deals_them():
    sizes = [4096, 4096, 1000, 700, 700, 64, 64, 64, 3, 1]
    for group in (1, 2, 3, 4):
        owners = assign_owners(sizes, group)
        assert _loads(sizes, group) == [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(group)]


def test_plan_command_prints_the_ranked_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = [
        "--config",
        str(CONFIGS / "7B.py"),
        "--plan",
        "--world_size",
        "8",
        "--device_memory",
        "80GiB",
        "--peak_tflops",
        "989",
        "--link_gbps",
        "50",
        "--plan_json",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "layouts of 8 ranks pass the run's validation" in printed and "989 TFLOPS" in printed
    layouts = json.loads(out.read_text())["layouts"]
    assert layouts[0]["fits"] and layouts[0]["layout"] in printed
    assert layouts[0]["memory_bytes_per_rank"]["peak"] <= 80 * 2**30
    assert {"parameters", "gradients", "optimizer_state", "activations", "communication_buffers"} <= set(
        layouts[0]["memory_bytes_per_rank"]
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device_memory", "lots"], "--device_memory 'lots': give a positive size"),
        ([], "--plan needs --device_memory"),
        (["--device_memory", "80GiB", "--link_gbps", "0"], "--link_gbps 0.0: must be > 0"),
    ],
)
def test_bad_plan_arguments_are_named(flags, message, capsys):
    assert main(["--config", str(CONFIGS / "tiny.py"), "--plan", "--world_size", "2", *flags]) == 2
    assert message in capsys.readouterr().out
