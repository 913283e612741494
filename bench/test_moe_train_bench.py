"""End-to-end training throughput of a small mixture of experts (configs/tiny_moe.py: 4 experts, top-2)
against the dense model with the same active parameters (one MLP as wide as the two experts a token
runs through), and under expert and tensor parallelism, on this machine (gloo on CPU).

Each row is a real `python -m pytrain.train` run (under torchrun for several processes) on random tokens,
the same global batch in every row, through test_parallel_bench's runner; the summary gives tokens/s
over all ranks from the median step, the ratio to the one-process MoE run, and the MFU the run logs
(against the matmul peak it measures at start). `--benchmark-disable` runs each row for 2 steps.
"""

import pytest

from .test_parallel_bench import run_layout, throughput_row

CONFIG, MICRO_BATCHES, STEPS, WARMUP = "configs/tiny_moe.py", 8, 12, 4
DENSE = ["model.num_experts=1", "model.top_k=1", "model.mlp_ratio=4"]  # 2 x the experts' 2.0

# name: (processes, overrides)
ROWS = {
    "1 process": (1, []),
    "dense, same active": (1, DENSE),
    "ep2": (2, ["parallel.expert.size=2"]),
    "tp2 (experts split)": (2, ["parallel.tensor.size=2"]),
    "dp2 (experts whole)": (2, []),
}


@pytest.mark.slow  # every row, as a smoke test (about 7 s each; tests/ checks the MoE layouts)
@pytest.mark.parametrize("row", ROWS)
def test_moe_training_throughput(benchmark, record_throughput, row, tmp_path):
    steps, warmup = (STEPS, WARMUP) if benchmark.enabled else (2, 0)
    processes, overrides = ROWS[row]
    rows = benchmark.pedantic(
        run_layout, args=(CONFIG, processes, overrides, MICRO_BATCHES, steps, tmp_path), rounds=1, iterations=1
    )
    assert len(rows) == steps and all(r["loss"] == r["loss"] for r in rows)
    if not benchmark.enabled:
        return
    result = throughput_row(rows, warmup, "tiny_moe", row, processes)
    benchmark.extra_info.update(result)
    record_throughput(result)
