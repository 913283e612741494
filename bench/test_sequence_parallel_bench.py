"""Long sequences split over ranks: peak memory per rank against the sequence length, and what isp's
communication costs against Megatron's tensor modes.

Memory rows: the tiny model's layer shape (hidden 256, 8 heads) cut to 2 layers, one sequence per step, fp32,
trained by the run's construction path in gloo processes; the peak of the CPU allocator's live bytes per rank
over building it and one step (pytrain.plan.AllocatorPeak), the largest over the ranks, beside the one-process
peak divided by the ranks (the ideal). Layouts: one process, isp over 2 and 4 ranks, sequence_2D 2 heads x 2 context
(ring) ranks.

Communication rows (2 ranks, 4k tokens): one step's bytes each rank sends into collectives, counted by wrapping
torch.distributed's collectives (all-reduce, all-gather, reduce-scatter, all-to-all, broadcast, point-to-point)
for the step, and the step time, for mtp, msp and isp at the same world size.

GPU rows (bench/gpu/run.sh): one step of isp and of msp over every visible GPU (NCCL, bf16, 32k tokens), bytes
sent and time; they need 2 GPUs or more.

`--benchmark-disable` runs the isp2 memory row at 256 tokens as a smoke test.
"""

import functools
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rank_results import RankResults

from pytrain.config import Config
from pytrain.plan.measure import measure_layout

ROOT = Path(__file__).resolve().parent.parent
SHAPE = ["model.num_layers=2", "data.micro_num=1", "data.micro_bsz=1", "model.checkpoint=False"]
ISP = "parallel.tensor.mode='isp'"
# name: (processes, overrides)
MEMORY_LAYOUTS = {
    "one process": (1, []),
    "isp2": (2, ["parallel.tensor.size=2", ISP]),
    "isp4": (4, ["parallel.tensor.size=4", ISP]),
    "sequence_2D 2x2": (
        4,
        ["parallel.tensor.size=4", ISP, "parallel.sequence_2D.enable=True", "parallel.sequence_2D.head_size=2"]
        + ["parallel.sequence_2D.context_size=2"],
    ),
}
MEMORY_LENGTHS = [4096, 16384, 32768]
MODES = ("mtp", "msp", "isp")
# the collectives a step of any layout calls, and the argument holding the bytes a rank sends
COLLECTIVES = {
    "all_reduce": 0,
    "all_gather_into_tensor": 1,
    "all_gather": 1,
    "reduce_scatter_tensor": 1,
    "all_to_all_single": 1,
    "broadcast": 0,
    "isend": 0,
    "send": 0,
}
if hasattr(dist, "reduce_scatter_single"):
    COLLECTIVES["reduce_scatter_single"] = 1


def layout_config(overrides: list[str], run_folder) -> Config:
    return Config.from_file(
        ROOT / "configs" / "tiny.py",
        overrides=[*SHAPE, *overrides, "data.train_folder=None", f"monitor.run_folder={str(run_folder)!r}"],
    )


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(_nbytes(v) for v in value)
    return 0


class CountedCollectives:
    """While entered, torch.distributed's collectives add the bytes they send from this rank to `bytes`."""

    def __init__(self):
        self.bytes, self._saved = 0, {}

    def __enter__(self):
        for name, argument in COLLECTIVES.items():
            original = self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._counting(original, argument))
        return self

    def _counting(self, original, argument):
        @functools.wraps(original)
        def run(*args, **kwargs):
            self.bytes += _nbytes(args[argument] if len(args) > argument else next(iter(kwargs.values()), None))
            return original(*args, **kwargs)

        return run

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)


def memory_worker(rank, world, init_method, overrides, run_folder, results):
    if world > 1:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    torch.set_num_threads(max(1, 2 // world))
    try:
        results[rank] = measure_layout(layout_config(overrides, run_folder), rank, world, steps=1)[0]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def comm_worker(rank, world, init_method, overrides, run_folder, results, backend="gloo"):
    """One warm-up step, then one step with its collectives counted and timed (nccl: one GPU per rank)."""
    from pytrain.initialize import initialize_trainer
    from pytrain.initialize.launch import launch
    from pytrain.train import initialize_model, initialize_optimizer

    local_rank = rank if backend == "nccl" else 0
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        cfg = layout_config(overrides, run_folder)
        launch(cfg, rank=rank, world_size=world, local_rank=local_rank, init_method=None, backend=backend, seed=3)
        model = initialize_model()
        optimizer, beta2, lr = initialize_optimizer(model)
        trainer, *_ = initialize_trainer(model, optimizer, lr_scheduler=lr, beta2_scheduler=beta2)
        tokens = torch.randint(0, cfg.model.vocab_size, (1, 1, cfg.data.seq_len))
        for counted in (False, True):
            dist.barrier()
            start = time.perf_counter()
            with CountedCollectives() as comm:
                trainer.zero_grad()
                trainer.execute_schedule({"input_ids": tokens, "labels": tokens})
                trainer.step()
                if backend == "nccl":
                    torch.cuda.synchronize()
            results[rank] = (comm.bytes, time.perf_counter() - start) if counted else None
    finally:
        dist.destroy_process_group()


def spawn(worker, world, overrides, tmp_path, *extra) -> dict:
    with RankResults() as results:
        args = (world, f"file://{tmp_path}/rendezvous", overrides, tmp_path, results, *extra)
        mp.spawn(worker, args=args, nprocs=world, join=True)
        return dict(results)


def memory_rows(length: int, tmp_path) -> dict:
    row = {}
    for name, (world, layout) in MEMORY_LAYOUTS.items():
        overrides = [f"data.seq_len={length}", *layout]
        folder = tmp_path / name.replace(" ", "-")
        folder.mkdir()
        peaks = spawn(memory_worker, world, overrides, folder)
        row[name] = max(peaks.values()) / 2**20
    return row


@pytest.mark.slow
@pytest.mark.parametrize("length", MEMORY_LENGTHS)
def test_peak_memory_per_rank_against_sequence_length(benchmark, length, tmp_path):
    if not benchmark.enabled:
        if length != MEMORY_LENGTHS[0]:
            pytest.skip("one smoke row without benchmarks")
        length = 256
    row = benchmark.pedantic(memory_rows, args=(length, tmp_path), rounds=1, iterations=1)
    benchmark.extra_info.update(row, length=length)
    one = row["one process"]
    cells = " | ".join(
        f"{name} {mib:.0f} MiB ({mib / one:.2f}; ideal {1 / w:.2f})"
        for (name, (w, _)), mib in zip(MEMORY_LAYOUTS.items(), row.values())
    )
    print(f"\n{length} tokens | {cells}")
    assert all(mib > 0 for mib in row.values())


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_communication_per_step_by_tensor_mode(benchmark, mode, tmp_path):
    if not benchmark.enabled:
        pytest.skip("benchmark only")
    overrides = ["data.seq_len=4096", "parallel.tensor.size=2", f"parallel.tensor.mode={mode!r}"]
    results = benchmark.pedantic(spawn, args=(comm_worker, 2, overrides, tmp_path), rounds=1, iterations=1)
    sent, seconds = max(b for b, _ in results.values()), max(t for _, t in results.values())
    benchmark.extra_info.update(mode=mode, sent_mib=sent / 2**20, step_s=seconds)
    print(f"\n{mode} | sent per rank {sent / 2**20:.1f} MiB | step {seconds:.2f} s")
    assert sent > 0


# The GPU rows (bench/gpu/run.sh): one isp / msp step of the 2-layer tiny shape over every visible GPU, bf16,
# 32k tokens, NCCL. They need 2 GPUs or more: the lent GPU machine has one, where they are skipped.
@pytest.mark.parametrize("mode", ("isp", "msp"))
def test_tensor_mode_step_cuda(benchmark, mode, tmp_path):
    gpus = torch.cuda.device_count()
    if gpus < 2:
        pytest.skip(f"needs 2 CUDA GPUs or more (one rank per GPU); {gpus} visible")
    overrides = ["data.seq_len=32768", f"parallel.tensor.size={gpus}", f"parallel.tensor.mode={mode!r}"]
    overrides.append("model.dtype='torch.bfloat16'")
    results = benchmark.pedantic(spawn, args=(comm_worker, gpus, overrides, tmp_path, "nccl"), rounds=1, iterations=1)
    sent, seconds = max(b for b, _ in results.values()), max(t for _, t in results.values())
    benchmark.extra_info.update(mode=mode, gpus=gpus, sent_mib=sent / 2**20, step_s=seconds)
    print(f"\ncuda {gpus} GPUs {mode} 32k tokens | sent per rank {sent / 2**20:.1f} MiB | step {seconds:.3f} s")
    assert sent > 0
