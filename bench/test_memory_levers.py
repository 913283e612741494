"""What each memory lever saves, measured, beside the layout planner's prediction (pytrain.plan).

Each row builds the run (the construction path `python -m pytrain.train` takes) in 2 gloo processes (4 for
FSDP x tp2) on random tokens: the peak of the CPU allocator's live bytes per rank over building it and 2
steps (pytrain.plan.AllocatorPeak: every tensor, from the parameters to the temporaries; the first step creates
Adam's state, the second's backward runs beside it), the largest over the ranks, then the time of one more
step; and the planner's peak for the same layout (its worst rank).

Levers: ZeRO-1 vs FSDP (its gathered parameters freed after each unit's forward, or kept until its backward)
vs FSDP x tensor parallel; no recompute vs whole layers (model.checkpoint=True) vs selective (the attention
core; the matmul outputs only) vs selective + offload (a no-op on the CPU: listed as such). Models:
configs/100M.py, and configs/1B.py's layer shape (hidden 2048, vocabulary 32000) cut to 2 layers, fp32 and
256 tokens so that its ZeRO-1 row fits this machine's memory twice over.

`--benchmark-disable` (CI's slow run) runs one small row, the tiny config under FSDP, as a smoke test.
"""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rank_results import RankResults

from pytrain.config import Config
from pytrain.parallel.mesh import ParallelDims
from pytrain.plan import ModelShape, Schedule, rank_memory
from pytrain.plan.measure import measure_layout

ROOT = Path(__file__).resolve().parent.parent
MEASURED_STEPS, TIMED_STEPS = 2, 1
MODELS = {  # name: (config file, overrides)
    "100M": ("100M.py", ["data.micro_num=2", "data.micro_bsz=1"]),
    "1B shape, 2 layers": (
        "1B.py",
        [
            "model.num_layers=2",
            "model.dtype='torch.float32'",
            "data.seq_len=256",
            "data.micro_num=2",
            "data.micro_bsz=1",
        ],
    ),
}
FSDP = "parallel.zero1.fsdp=True"
# name: (processes, overrides)
LEVERS = {
    "ZeRO-1": (2, []),
    "FSDP": (2, [FSDP]),
    "FSDP, kept from forward to backward": (2, [FSDP, "parallel.zero1.reshard_after_forward=False"]),
    "FSDP x tp2": (4, [FSDP, "parallel.tensor.size=2"]),
    "ZeRO-1, whole layers recomputed": (2, ["model.checkpoint=True"]),
    "ZeRO-1, selective (attention)": (2, ["selective_checkpoint=True"]),
    "ZeRO-1, selective (matmuls kept)": (2, ["selective_checkpoint=True", "selective_checkpoint_policy='matmuls'"]),
    "ZeRO-1, selective + offload (no-op on CPU)": (
        2,
        ["selective_checkpoint=True", "selective_checkpoint_offload=True"],
    ),
    "FSDP, whole layers recomputed": (2, [FSDP, "model.checkpoint=True"]),
}
LAYOUT_LEVERS = ("ZeRO-1", "FSDP", "FSDP, kept from forward to backward", "FSDP x tp2")  # the 1B shape's rows
ROWS = [(model, lever) for model in MODELS for lever in LEVERS if model == "100M" or lever in LAYOUT_LEVERS]


def layout_config(config: str, overrides: list[str], run_folder) -> Config:
    return Config.from_file(
        ROOT / "configs" / config,
        overrides=[*overrides, "data.train_folder=None", f"monitor.run_folder={str(run_folder)!r}"],
    )


def worker(rank, world, init_method, config, overrides, run_folder, steps, timed, results):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        results[rank] = measure_layout(layout_config(config, overrides, run_folder), rank, world, steps, timed)
    finally:
        dist.destroy_process_group()


def predicted_peak(cfg: Config, world: int) -> int:
    """The planner's peak of the worst rank (every pipeline stage, every data rank's ZeRO-1 share)."""
    dims = ParallelDims.from_config(cfg, world)
    schedule, shape = Schedule.from_config(cfg, dims), ModelShape.from_config(cfg)
    return max(
        rank_memory(shape, schedule, stage, zero1_rank=data % dims.zero1).peak
        for stage in range(dims.pipeline)
        for data in range(dims.data)
    )


def measure(config, overrides, processes, tmp_path, init_method, steps, timed) -> dict:
    with RankResults() as results:
        args = (processes, init_method, config, overrides, tmp_path, steps, timed, results)
        mp.spawn(worker, args=args, nprocs=processes, join=True)
        results = dict(results)
    measured = max(peak for peak, _ in results.values())
    predicted = predicted_peak(layout_config(config, overrides, tmp_path), processes)
    return dict(
        measured_mib=measured / 2**20,
        predicted_mib=predicted / 2**20,
        predicted_over_measured=predicted / measured,
        step_s=max(t for _, t in results.values()) if timed else None,
    )


@pytest.mark.slow
@pytest.mark.parametrize("model, lever", ROWS, ids=[f"{m}-{lever}" for m, lever in ROWS])
def test_memory_lever(benchmark, model, lever, tmp_path):
    processes, overrides = LEVERS[lever]
    config, model_overrides = MODELS[model]
    steps, timed = MEASURED_STEPS, TIMED_STEPS
    if not benchmark.enabled:
        if (model, lever) != ROWS[1]:
            pytest.skip("one smoke row without benchmarks")
        config, model_overrides, steps, timed = "tiny.py", [], 1, 0
    row = benchmark.pedantic(
        measure,
        args=(
            config,
            [*model_overrides, *overrides],
            processes,
            tmp_path,
            f"file://{tmp_path}/rendezvous",
            steps,
            timed,
        ),
        rounds=1,
        iterations=1,
    )
    benchmark.extra_info.update(row, model=model, lever=lever)
    print(
        f"\n{model} | {lever} | {processes} | measured {row['measured_mib']:.0f} MiB | predicted "
        f"{row['predicted_mib']:.0f} MiB ({row['predicted_over_measured'] - 1:+.1%}) | step {row['step_s']} s"
    )
    assert row["measured_mib"] > 0
