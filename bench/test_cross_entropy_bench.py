"""Cross-entropy and linear + cross-entropy: pytrain vs PyTorch eager vs torch.compile, time and peak memory.

Rows of one group (op, device, shape, dtype, direction) run side by side in the same process:
  pytrain   pytrain.kernels.cross_entropy / linear_cross_entropy
  eager     pytrain.kernels.reference.cross_entropy (F.cross_entropy on fp32 logits) / hidden @ weight.T + that
  compile   torch.compile of the eager function (inductor, static shapes)
  copy      cross-entropy forward only: logits.copy_() into a preallocated tensor (the bar for bandwidth)

Bytes moved (the least the op must move, the same for every row):
  cross-entropy forward:          read the logits
  cross-entropy forward+backward: read the logits, write their gradient
  linear + cross-entropy:         read hidden and weight, write grad_hidden and grad_weight (it is matmul-
                                  bound: compare the times, not the GB/s)
Peak memory is the growth over the inputs during one forward+backward, printed in its own table:
CPU: the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the RSS before the call;
glibc returns large (> 32 MB) blocks to the OS on free, so this is what the op held at its peak. CUDA:
torch.cuda.max_memory_allocated minus memory_allocated before. With --benchmark-disable (the CI smoke run)
every case runs once on 64 tokens, torch.compile with the aot_eager backend.

Known gap (measured on the 2-core AMD EPYCs): the CPU kernel is bound by its vectorized exp, not by memory
(2-3 Gelem/s per core in cache). 16-bit logits take explicit AVX2 loops (the target clones converted fp16
element by element and widened bf16 slowly); on the Zen 4 bf16 then runs at about fp32's element rate in
cache, fp32 on its AVX-512 clone a little faster. --keep-freed-memory (conftest) measures the rows under a
training run's allocator, where the gradient's pages are reused instead of faulted in anew each call.
"""

import gc
import re

import pytest
import torch

from pytrain.kernels import cross_entropy, linear_cross_entropy, reference

from .conftest import DEVICES, NEEDS_CUDA

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SMOKE_TOKENS = 64

CE_CASES = [pytest.param("cpu", 4096, vocab, id=f"cpu-4096x{vocab}") for vocab in (32000, 128256)] + [
    pytest.param("cuda", tokens, vocab, id=f"cuda-{tokens}x{vocab}", marks=NEEDS_CUDA)
    for tokens, vocab in [(16384, 32000), (8192, 128256)]
]
# The CPU does ~0.35 TFLOP/s in bf16 and ~0.1 in fp32: hidden 512 keeps one eager step to seconds while
# the logits (tokens x vocab) still dwarf the weight, as they do in LLM training at hidden 2048-8192.
LINEAR_CASES = [
    pytest.param("cpu", 4096, 512, 128256, "bf16", id="cpu-4096x512x128256-bf16", marks=pytest.mark.slow),
    pytest.param("cpu", 2048, 256, 128256, "fp32", id="cpu-2048x256x128256-fp32"),
] + [
    pytest.param("cuda", 16384, 4096, 128256, dtype, id=f"cuda-16384x4096x128256-{dtype}", marks=NEEDS_CUDA)
    for dtype in DTYPES
]
IMPLS = ["pytrain", "eager", "compile"]
_MEMORY_ROWS: list[tuple[str, str, float, float]] = []


def _rss_field(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def peak_memory_growth(fn, device) -> int:
    """Bytes the call held at its peak beyond what was allocated before it (see the module docstring)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _rss_field("VmRSS")
    fn()
    return _rss_field("VmHWM") - before


@pytest.fixture(scope="module", autouse=True)
def memory_table(request):
    yield
    if not _MEMORY_ROWS:
        return
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
        tr.section("peak memory of one forward+backward beyond the inputs (MB), and as a multiple of the logits")
        for group, impl, peak, logits in _MEMORY_ROWS:
            tr.write_line(f"  {group:<44}{impl:<10}{peak / 2**20:>10.0f} MB{peak / logits:>8.2f}x logits")


def record_memory(benchmark, group, impl, fn, device, logits_bytes):
    if not benchmark.enabled:
        return
    fn()  # warm: compile, first allocations
    peak = peak_memory_growth(fn, device)
    benchmark.extra_info.update(peak_memory_bytes=peak, peak_over_logits=round(peak / logits_bytes, 3))
    _MEMORY_ROWS.append((group, impl, peak, logits_bytes))


def compiled(fn, benchmark):
    """inductor when timing; the smoke run (--benchmark-disable) traces with aot_eager, which compiles in
    a fraction of the time, to keep `pytest bench --benchmark-disable` short."""
    torch._dynamo.reset()  # fresh caches: no recompile limit, no automatic-dynamic from earlier shapes
    return torch.compile(fn, dynamic=False, backend="inductor" if benchmark.enabled else "aot_eager")


# ---------------------------------------------------------------------------------------------------
# Cross-entropy.


def make_ce(device, tokens, vocab, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(tokens, vocab, device=device, dtype=dtype, generator=g) * 2
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=g)
    labels[::17] = -100
    return logits, labels


def ce_op(impl, benchmark):
    op = {"pytrain": cross_entropy, "eager": reference.cross_entropy}.get(impl)
    return op or compiled(reference.cross_entropy, benchmark)


@pytest.mark.parametrize("impl", IMPLS + ["copy"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,tokens,vocab", CE_CASES)
def test_cross_entropy_forward(benchmark, bandwidth, device, tokens, vocab, dtype, impl):
    tokens = tokens if benchmark.enabled else SMOKE_TOKENS
    logits, labels = make_ce(device, tokens, vocab, DTYPES[dtype])
    if impl == "copy":
        out = torch.empty_like(logits)
        fn = lambda: out.copy_(logits)
    else:
        op = ce_op(impl, benchmark)
        fn = lambda: op(logits, labels)
    with torch.no_grad():
        bandwidth(
            benchmark,
            fn,
            device=device,
            bytes_moved=logits.nbytes,
            copy_like=logits,
            group=f"cross_entropy fwd {device} {tokens}x{vocab} {dtype}",
            impl=impl,
        )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,tokens,vocab", CE_CASES)
def test_cross_entropy_forward_backward(benchmark, bandwidth, device, tokens, vocab, dtype, impl):
    tokens = tokens if benchmark.enabled else SMOKE_TOKENS
    logits, labels = make_ce(device, tokens, vocab, DTYPES[dtype])
    logits.requires_grad_()
    op = ce_op(impl, benchmark)

    def step():
        return torch.autograd.grad(op(logits, labels), logits)  # no .grad accumulation: only the op's traffic

    group = f"cross_entropy fwd+bwd {device} {tokens}x{vocab} {dtype}"
    bandwidth(benchmark, step, device=device, bytes_moved=2 * logits.nbytes, copy_like=logits, group=group, impl=impl)
    record_memory(benchmark, group, impl, step, device, logits.nbytes)


# ---------------------------------------------------------------------------------------------------
# Linear + cross-entropy.


def eager_linear_cross_entropy(hidden, weight, labels):
    return reference.cross_entropy(hidden @ weight.t(), labels)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device,tokens,hidden_size,vocab,dtype", LINEAR_CASES)
def test_linear_cross_entropy_forward_backward(benchmark, bandwidth, device, tokens, hidden_size, vocab, dtype, impl):
    tokens = tokens if benchmark.enabled else SMOKE_TOKENS
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, device=device, generator=g).to(DTYPES[dtype]).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device=device, generator=g) / hidden_size**0.5).to(DTYPES[dtype])
    weight.requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=g)
    op = {"pytrain": linear_cross_entropy, "eager": eager_linear_cross_entropy}.get(impl)
    op = op or compiled(eager_linear_cross_entropy, benchmark)

    def step():
        return torch.autograd.grad(op(hidden, weight, labels), (hidden, weight))

    group = f"linear_ce fwd+bwd {device} {tokens}x{hidden_size}x{vocab} {dtype}"
    bytes_moved = 2 * (hidden.nbytes + weight.nbytes)
    bandwidth(
        benchmark, step, device=device, bytes_moved=bytes_moved, copy_like=weight, group=group, impl=impl, warmup=1
    )
    logits_bytes = tokens * vocab * hidden.element_size()
    record_memory(benchmark, group, impl, step, device, logits_bytes)


@pytest.mark.parametrize("device", DEVICES)
def test_results_agree(device):
    """Sanity: the rows above compute the same thing (loose: this is not the test suite)."""
    logits, labels = make_ce(device, 64, 1000, torch.bfloat16)
    want = reference.cross_entropy(logits, labels)
    torch.testing.assert_close(cross_entropy(logits, labels), want, rtol=1e-4, atol=1e-4)
    hidden = torch.randn(64, 32, device=device)
    weight = torch.randn(1000, 32, device=device) / 6
    torch.testing.assert_close(
        linear_cross_entropy(hidden, weight, labels, chunk_size=16),
        eager_linear_cross_entropy(hidden, weight, labels),
        rtol=1e-4,
        atol=1e-4,
    )
