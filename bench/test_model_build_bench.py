"""Building the model: the whole 7B on the meta device (shapes only), and configs/1B.py materialized for
real in one process and as each rank of tp2 and pp2 (gloo), where a rank must hold only its part.

Reported: seconds to build, and each process's peak resident memory above what it held before building,
against the bytes of the parameters it keeps (this rank's shards in the model's dtype). With
--benchmark-disable the 1B rows use a 4-layer, 512-wide variant of it, so the smoke run stays small.
"""

import resource
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rank_results import RankResults

from pytrain.config import Config
from pytrain.registry import MODEL_INITIALIZER

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_7b_on_the_meta_device(benchmark):
    cfg = Config.from_file(ROOT / "configs" / "7B.py")
    builder = MODEL_INITIALIZER.get_module(cfg.model_type)

    def build():
        with torch.device("meta"):
            return builder(**cfg.model)

    before = peak_rss_bytes()
    model = benchmark.pedantic(build, rounds=3, iterations=1)
    count = sum(p.numel() for p in model.parameters())
    assert count == 7_321_948_160 and all(p.is_meta for p in model.parameters())
    benchmark.extra_info.update(parameters=count, peak_rss_growth_mib=(peak_rss_bytes() - before) / 2**20)


LAYOUTS = {"one process": (1, {}), "tp2": (2, dict(tensor=2)), "pp2": (2, dict(pipeline=2))}


def build_part(rank, world, init_method, parallel, small, results):
    from pytrain.initialize.launch import launch
    from pytrain.train import initialize_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    overrides = ["model.num_layers=4", "model.hidden_size=512", "model.num_attention_heads=8"] if small else []
    cfg = Config.from_file(ROOT / "configs" / "1B.py", overrides=overrides)
    cfg.parallel.tensor.size = parallel.get("tensor", 1)
    cfg.parallel.pipeline.size = parallel.get("pipeline", 1)
    cfg.monitor.run_folder = "/tmp/pytrain-bench-build"
    launch(cfg, rank=rank, world_size=world, local_rank=0, init_method=None, backend="gloo", seed=1)
    before = peak_rss_bytes()
    start = time.perf_counter()
    part = initialize_model()
    seconds = time.perf_counter() - start
    kept = sum(p.numel() * p.element_size() for p in part.parameters())
    results[rank] = dict(seconds=seconds, growth=peak_rss_bytes() - before, kept=kept)
    dist.destroy_process_group()


@pytest.mark.slow  # every row, as a smoke test (about 6 s each; tests/ checks the layouts)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_1b_materialized_per_rank(benchmark, layout, tmp_path):
    world, parallel = LAYOUTS[layout]
    small = not benchmark.enabled

    def run():
        with RankResults() as results:
            init = f"file://{tmp_path / f'rdzv-{time.monotonic_ns()}'}"
            mp.spawn(build_part, args=(world, init, parallel, small, results), nprocs=world, join=True)
            return dict(results)

    results = benchmark.pedantic(run, rounds=1, iterations=1)
    for rank, r in results.items():
        # A rank holds its part, plus at most one block of rows being drawn (ROWS_PER_DRAW) and allocator slack.
        assert r["growth"] < r["kept"] + (256 << 20), (rank, r)
        benchmark.extra_info[f"rank{rank}"] = {
            "seconds": round(r["seconds"], 2),
            "peak_growth_mib": round(r["growth"] / 2**20),
            "kept_mib": round(r["kept"] / 2**20),
        }
