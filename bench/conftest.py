"""Shared helpers for pytrain's kernel benchmarks (pytest-benchmark).

Memory-bound kernels are reported as achieved bandwidth (bytes the op must move / mean time) and as a
fraction of the machine's copy bandwidth, measured in the same run: `copy_gbps` times `dst.copy_(src)`
of a same-size tensor into a preallocated one. Speed targets are reported here, never asserted.

A kernel bench needs only:

    def test_x(benchmark, bandwidth, device):   # `device`: "cpu", and "cuda" when there is a GPU
        x = ...
        bandwidth(benchmark, lambda: op(x), device=device, bytes_moved=..., copy_like=x,
                  group="op fwd cpu 4096x4096 bf16", impl="pytrain")

Rows of one `group` are printed side by side at the end of the run (with the ratio to the
`torch.compile` row when there is one). `pytest bench --benchmark-disable` runs each bench once.
On CUDA each timed call runs the op CUDA_INNER times and synchronizes once; per-op numbers are
derived from that (extra_info["ops_per_call"]).
"""

import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).parent
CUDA_AVAILABLE = torch.cuda.is_available()
NEEDS_CUDA = pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs a CUDA GPU")  # the one definition for bench/
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]
CUDA_INNER = 10  # ops per timed call on CUDA: amortizes the synchronize

WIDTHS = (18, 10, 9, 9, 9, 10, 11)  # columns of the summary table
_RESULTS: list[dict] = []
_COPY_CACHE: dict[tuple, dict] = {}
_ALLOCATOR = {"mode": "glibc's default (every allocation over 32 MiB faults its pages in)"}  # --keep-freed-memory


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def copy_gbps(like: torch.Tensor, min_time: float = 0.3, max_reps: int = 200) -> dict:
    """Bandwidth of copying a tensor shaped like `like` into a preallocated one (2 * nbytes moved).

    Cached per (device, dtype, shape) for the session. Returns {"mean": GB/s from the mean time,
    "best": GB/s from the fastest run}.
    """
    device = like.device
    key = (str(device), like.dtype, tuple(like.shape))
    if key not in _COPY_CACHE:
        src = torch.ones_like(like, memory_format=torch.contiguous_format)
        dst = torch.empty_like(src)
        nbytes = src.nbytes
        inner = CUDA_INNER if device.type == "cuda" else 1
        for _ in range(3):
            dst.copy_(src)
        sync(device)
        times = []
        start = time.perf_counter()
        while len(times) < max_reps and (len(times) < 5 or time.perf_counter() - start < min_time):
            t0 = time.perf_counter()
            for _ in range(inner):
                dst.copy_(src)
            sync(device)
            times.append((time.perf_counter() - t0) / inner)
        moved = 2 * nbytes
        _COPY_CACHE[key] = {"mean": moved / (sum(times) / len(times)) / 1e9, "best": moved / min(times) / 1e9}
    return _COPY_CACHE[key]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Every bench that takes `device` runs on the CPU and, where there is one, on the GPU."""
    return request.param


def _timed(fn, device):
    """The callable pytest-benchmark times: CPU runs fn once; CUDA runs it CUDA_INNER times, then syncs."""
    if torch.device(device).type != "cuda":
        return fn, 1

    def run():
        for _ in range(CUDA_INNER):
            fn()
        torch.cuda.synchronize(device)

    return run, CUDA_INNER


@pytest.fixture
def bandwidth():
    """Benchmarks fn and records achieved GB/s and the fraction of copy bandwidth in extra_info."""

    def measure(
        benchmark, fn, *, device, bytes_moved: int, copy_like: torch.Tensor, group: str, impl: str, warmup: int = 2
    ):
        """copy_like: the tensor whose copy sets the bar (the op's main input, usually)."""
        benchmark.group = group
        benchmark.extra_info.update(impl=impl, bytes_moved=int(bytes_moved), device=str(device))
        benchmark.extra_info["cpu_allocator"] = _ALLOCATOR["mode"]
        if benchmark.enabled:
            for _ in range(warmup):  # compiles (torch.compile), first-touch allocations, autotuning
                fn()
            sync(device)
        timed, ops = _timed(fn, device)
        benchmark(timed)
        if benchmark.stats is None:  # --benchmark-disable: ran once, nothing to report
            return
        stats = benchmark.stats.stats
        mean, best = stats.mean / ops, stats.min / ops
        copy = copy_gbps(copy_like)
        row = dict(
            group=group,
            impl=impl,
            ms=mean * 1e3,
            gbps=bytes_moved / mean / 1e9,
            gbps_best=bytes_moved / best / 1e9,
            copy_gbps=copy["mean"],
            ops_per_call=ops,
        )
        row["fraction_of_copy"] = row["gbps"] / row["copy_gbps"]
        row["best_fraction_of_copy"] = row["gbps_best"] / copy["best"]
        benchmark.extra_info.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
        _RESULTS.append(row)

    return measure


_COMPUTE_RESULTS: list[dict] = []
_MATMUL_CACHE: dict[tuple, float] = {}


def matmul_tflops(device, dtype, size: int = 2048) -> float:
    """The machine's compute limit for `dtype` on `device`: the best of a few square matmuls (cached)."""
    key = (str(device), dtype)
    if key not in _MATMUL_CACHE:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        run, ops = _timed(lambda: a @ b, device)
        run()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            run()
            best = min(best, (time.perf_counter() - t0) / ops)
        _MATMUL_CACHE[key] = 2 * size**3 / best / 1e12
    return _MATMUL_CACHE[key]


@pytest.fixture
def compute():
    """Benchmarks fn and records TFLOP/s and the fraction of the matmul peak measured in the same run."""

    def measure(benchmark, fn, *, device, flops: float, dtype, group: str, impl: str, warmup: int = 1):
        benchmark.group = group
        benchmark.extra_info.update(impl=impl, flops=float(flops), device=str(device))
        if benchmark.enabled:
            for _ in range(warmup):
                fn()
            sync(device)
        timed, ops = _timed(fn, device)
        benchmark(timed)
        if benchmark.stats is None:
            return
        mean = benchmark.stats.stats.mean / ops
        row = dict(group=group, impl=impl, ms=mean * 1e3, tflops=flops / mean / 1e12, peak=matmul_tflops(device, dtype))
        benchmark.extra_info.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
        _COMPUTE_RESULTS.append(row)

    return measure


def _by_group(rows: list[dict]) -> dict[str, list[dict]]:
    groups = defaultdict(list)
    for row in rows:
        groups[row["group"]].append(row)
    return groups


def _compute_summary(tr) -> None:
    groups = _by_group(_COMPUTE_RESULTS)
    tr.section("compute: model FLOPs / time; 'of peak': vs a square matmul in the same dtype, same run")
    for group, rows in groups.items():
        sdpa = next((r for r in rows if r["impl"] == "sdpa"), None)
        tr.write_line(f"{group}   [matmul peak {rows[0]['peak']:.2f} TFLOP/s]")
        for r in rows:
            ratio = f"{sdpa['ms'] / r['ms']:.2f}x sdpa" if sdpa else ""
            tr.write_line(
                f"  {r['impl']:<16}{r['ms']:>10.3f} ms{r['tflops']:>9.3f} TFLOP/s"
                f"{r['tflops'] / r['peak']:>7.2f} of peak  {ratio}"
            )


_THROUGHPUT_RESULTS: list[dict] = []


@pytest.fixture
def record_throughput():
    """Records one training run's row {config, layout, processes, step_time, tokens_per_s, mfu}."""
    return _THROUGHPUT_RESULTS.append


def _throughput_summary(tr) -> None:
    for config, rows in _by_group([dict(r, group=r["config"]) for r in _THROUGHPUT_RESULTS]).items():
        one = next((r for r in rows if r["processes"] == 1 and "(baseline)" not in r["layout"]), None)
        tr.section(f"training throughput, {config}: tokens/s over all ranks (median step) vs one process")
        for r in rows:
            ratio = f"{r['tokens_per_s'] / one['tokens_per_s']:.2f}x" if one else "-"
            tr.write_line(
                f"  {r['layout']:<18}{r['processes']:>3} proc{r['step_time'] * 1e3:>10.0f} ms/step"
                f"{r['tokens_per_s']:>10.0f} tok/s{ratio:>8}   mfu/rank {r['mfu']:.0%}"
            )


def pytest_addoption(parser):
    parser.addoption(
        "--keep-freed-memory",
        action="store_true",
        help="measure under a CPU training run's allocator (pytrain.initialize.launch.keep_freed_memory): glibc "
        "keeps freed blocks, so a row that allocates reuses pages already touched instead of faulting fresh ones in",
    )


def pytest_configure(config):
    """`slow` rows are slow as smoke tests (--benchmark-disable: each bench once, as the README's test command
    runs them); a real benchmark run measures every row, so pyproject's default `-m 'not slow'` is lifted.
    --keep-freed-memory applies a training run's allocator setting before any row runs (it is process-wide)."""
    benchmarking = not (config.getoption("benchmark_disable") or config.getoption("benchmark_skip"))
    if benchmarking and config.option.markexpr == "not slow":
        config.option.markexpr = ""
    if config.getoption("keep_freed_memory"):
        from pytrain.initialize.launch import keep_freed_memory

        if not keep_freed_memory():
            raise pytest.UsageError(
                "--keep-freed-memory: glibc's mallopt is not available here, or MALLOC_MMAP_THRESHOLD_ is set "
                "(then that setting rules): unset it, or leave the option out"
            )
        _ALLOCATOR["mode"] = "a training run's (launch.keep_freed_memory: freed blocks are kept for reuse)"


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by marker
def pytest_collection_modifyitems(items):
    """The torch.compile rows of the kernel benchmarks are `slow` as smoke tests: each compiles its graph from
    scratch (1-7 s on the 2-core machine) and runs the same harness as the eager row beside it, which stays in
    the fast set. The benchmark run proper measures them (pytest_configure) and CI's slow run smoke-tests them."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("impl") == "compile" and BENCH_DIR in item.path.parents:
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter):
    if _THROUGHPUT_RESULTS:
        _throughput_summary(terminalreporter)
    if _COMPUTE_RESULTS:
        _compute_summary(terminalreporter)
    if not _RESULTS:
        return
    groups = _by_group(_RESULTS)
    tr = terminalreporter
    tr.section("bandwidth: bytes the op must move / time; 'of copy': vs copy_ of x into a preallocated tensor")
    tr.write_line(f"CPU allocator: {_ALLOCATOR['mode']}")
    header = ("impl", "mean ms", "GB/s", "GB/s@min", "of copy", "min/min", "vs compile")
    tr.write_line("".join(f"{h:>{w}}" if i else f"{h:<{w}}" for i, (h, w) in enumerate(zip(header, WIDTHS))))
    for group, rows in groups.items():
        compiled = next((r for r in rows if r["impl"] == "compile"), None)
        tr.write_line(f"{group}   [copy {rows[0]['copy_gbps']:.1f} GB/s]")
        for r in rows:
            speedup = f"{compiled['ms'] / r['ms']:.2f}x" if compiled else "-"
            tr.write_line(
                f"  {r['impl']:<16}{r['ms']:>10.3f}{r['gbps']:>9.1f}{r['gbps_best']:>9.1f}"
                f"{r['fraction_of_copy']:>9.2f}{r['best_fraction_of_copy']:>10.2f}{speedup:>11}"
            )
