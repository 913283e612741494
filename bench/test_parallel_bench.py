"""Training throughput of each parallel layout, relative to one process, on this machine (gloo on CPU).

Each row is a real run, `python -m pytrain.train` (under torchrun for several processes), on random tokens
with the same global batch in every layout (micro-batches split over the data-parallel ranks). Reported:
tokens/s over all ranks from the median step time (the first steps, warm-up, dropped), the ratio to one
process, and the per-rank MFU the run itself logs (against the matmul peak it measures at start: the
machine's limit, measured in the same run). One process uses every core; torchrun gives each of its
processes one thread, so layouts with more processes than cores are oversubscribed; that is what they
cost on this machine.

Configs: tiny (configs/tiny.py, 5M parameters) and 100M (configs/100M.py). `--benchmark-disable` runs the
tiny rows for 2 steps of 4 micro-batches only (each layout starts and trains from the command line) and skips
the 100M ones.

PYTRAIN_BASELINE_TREE=<a checkout of another commit, with its built extension> adds the same rows run by
that code (side by side in one run, e.g. before and after a refactor): `git worktree add /tmp/before REV`,
copy pytrain/_C*.so into it, and run `PYTRAIN_BASELINE_TREE=/tmp/before pytest bench/test_parallel_bench.py`.
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BASELINE = os.environ.get("PYTRAIN_BASELINE_TREE")
CODES = ["current", "baseline"] if BASELINE else ["current"]

# name: (processes, overrides)
LAYOUTS = {
    "1 process": (1, []),
    "dp2 zero1": (2, []),
    "dp2 fsdp": (2, ["parallel.zero1.fsdp=True"]),
    "dp2 fsdp, gathered forward to backward": (
        2,
        ["parallel.zero1.fsdp=True", "parallel.zero1.reshard_after_forward=False"],
    ),
    "tp2": (2, ["parallel.tensor.size=2"]),
    "tp2 msp": (2, ["parallel.tensor.size=2", "parallel.tensor.mode='msp'"]),
    "pp2 1F1B": (2, ["parallel.pipeline.size=2"]),
    "pp2 interleaved": (2, ["parallel.pipeline.size=2", "model.num_chunks=2"]),
    "dp4 zero1": (4, []),
    "dp2 x tp2": (4, ["parallel.tensor.size=2"]),
    "tp2 x pp2": (4, ["parallel.tensor.size=2", "parallel.pipeline.size=2"]),
    "fsdp2 x tp2": (4, ["parallel.zero1.fsdp=True", "parallel.tensor.size=2"]),
}
# config: (file, global micro-batches per step, steps when measuring, warm-up steps dropped)
CONFIGS = {
    "tiny": ("configs/tiny.py", 8, 8, 3),
    "100M": ("configs/100M.py", 8, 5, 2),
}


def layout_sizes(overrides: list[str]) -> tuple[int, int]:
    sizes = {"tensor": 1, "pipeline": 1}
    for item in overrides:
        for name in sizes:
            if item.startswith(f"parallel.{name}.size="):
                sizes[name] = int(item.split("=")[1])
    return sizes["tensor"], sizes["pipeline"]


def run_layout(
    config: str, processes: int, overrides: list[str], micro_batches: int, steps: int, folder: Path, code="current"
):
    tensor, pipeline = layout_sizes(overrides)
    data_parallel = processes // (tensor * pipeline)
    settings = [
        "data.train_folder=None",
        f"data.total_steps={steps}",
        f"data.micro_num={micro_batches // data_parallel}",
        "monitor.log_every=1",
        "monitor.tensorboard.enable=False",
        f"monitor.run_folder={folder}",
        *overrides,
    ]
    launcher = (
        [sys.executable, "-m", "pytrain.train"]
        if processes == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            "-m",
            "pytrain.train",
        ]
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count())) if processes == 1 else dict(os.environ)
    if code == "baseline":  # that tree's pytrain first on the path (before the editable install's finder)
        env["PYTHONPATH"] = BASELINE
    done = subprocess.run(
        [*launcher, "--config", str(ROOT / config), "--backend", "gloo", "--set", *settings],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (metrics,) = folder.glob("*/*/metrics.jsonl")
    return [json.loads(line) for line in metrics.read_text().splitlines()]


# `slow` as a smoke test, every row (tests/ checks every layout; bench/test_moe_train_bench.py's fast row runs
# this file's runner)
@pytest.mark.slow
@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_throughput(benchmark, record_throughput, config_name, layout, code, tmp_path):
    config, micro_batches, steps, warmup = CONFIGS[config_name]
    if not benchmark.enabled:
        if config_name != "tiny":
            pytest.skip("the 100M rows run only with benchmarks enabled")
        micro_batches, steps, warmup = 4, 2, 0  # a smoke test: that the row runs (4: every layout's dp divides it)
    processes, overrides = LAYOUTS[layout]
    rows = benchmark.pedantic(
        run_layout, args=(config, processes, overrides, micro_batches, steps, tmp_path, code), rounds=1, iterations=1
    )
    assert len(rows) == steps and all(r["loss"] == r["loss"] for r in rows)
    if not benchmark.enabled:
        return
    row = throughput_row(rows, warmup, config_name, layout if code == "current" else f"{layout} ({code})", processes)
    benchmark.extra_info.update(row)
    record_throughput(row)


def throughput_row(rows: list[dict], warmup: int, config: str, layout: str, processes: int) -> dict:
    """A run's metrics.jsonl rows -> the summary's row: median step time (warm-up dropped), tokens/s over
    all ranks, median MFU per rank."""
    measured = rows[warmup:]
    step_time = statistics.median(r["step_time"] for r in measured)
    tokens_per_step = rows[0]["tgs"] * rows[0]["step_time"] * processes  # per rank x ranks = the global batch
    return dict(
        config=config,
        layout=layout,
        processes=processes,
        step_time=step_time,
        tokens_per_s=tokens_per_step / step_time,
        mfu=statistics.median(r["mfu"] for r in measured),
    )
