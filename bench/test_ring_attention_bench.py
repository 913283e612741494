"""Ring attention (pytrain.parallel.ring_attention) forward + backward: 2 gloo processes vs one process, on the CPU.

Rows of one group run side by side on the same tokens (one row of N tokens, causal, 4 query heads over 2 kv
heads of 64, fp32):
  sdpa                   F.scaled_dot_product_attention (is_causal, enable_gqa) in this process, every core
  ring_attention 1 proc  ring_attention(group=None) over all N tokens in this process, every core
  ring_attention 2 proc  the ring over 2 processes (this one and a helper), zigzag split, one thread each
FLOPs counted as bench/test_flash_attn_bench.py does: 4 * heads * head_dim * (attended pairs) forward, 2.5x that
backward. The peak-memory rows record, per rank, the most bytes of CPU tensor storage alive at once during one
forward + backward (pytrain.plan.measure.AllocatorPeak: inputs' copies, K/V blocks in flight, scores, gradients),
beside what plain attention would hold for the scores alone (N^2 x heads x 4 bytes).

`--benchmark-disable` runs the 1024-token rows once (a smoke test); 4096 and 16384 tokens only when measuring.
"""

import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pytrain.parallel.ring_attention import ring_attention, zigzag_token_index
from pytrain.plan.measure import AllocatorPeak

from .conftest import NEEDS_CUDA

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 64
TOKENS = [1024, pytest.param(4096, marks=pytest.mark.slow), pytest.param(16384, marks=pytest.mark.slow)]
RING = 2
EVERY_CORE = torch.get_num_threads()  # torch's default: the one-process rows use the whole machine
_STOP, _TIME, _MEASURE = 0, 1, 2  # commands the helper rank follows


def inputs(tokens: int):
    generator = torch.Generator().manual_seed(tokens)
    shapes = [(tokens, HEADS), (tokens, KV_HEADS), (tokens, KV_HEADS), (tokens, HEADS)]
    return [torch.randn(*shape, HEAD_DIM, generator=generator) for shape in shapes]


def attention_flops(tokens: int) -> float:
    return 4 * HEADS * HEAD_DIM * tokens * (tokens + 1) / 2 * 3.5


def ring_step(tokens: int, rank: int, group):
    """One forward + backward of this rank's zigzag shard of the `tokens`-token row."""
    q, k, v, dout = inputs(tokens)
    index = zigzag_token_index(tokens, 1, rank, RING)
    shard = [t[index].requires_grad_() for t in (q, k, v)]
    document = torch.zeros_like(index)

    def step():
        out = ring_attention(*shard, index, document, group)
        out.backward(dout[index])

    return step


def peak_bytes(step) -> int:
    with AllocatorPeak() as peak:
        step()
    return peak.bytes


def _helper(rank: int, init_method: str) -> None:
    """The ring's other rank: follows the commands rank 0 broadcasts, (command, tokens)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=RING)
    steps = {}
    try:
        while True:
            command = torch.zeros(2, dtype=torch.int64)
            dist.broadcast(command, 0)
            what, tokens = command.tolist()
            if what == _STOP:
                return
            step = steps.setdefault(tokens, ring_step(tokens, rank, dist.group.WORLD))
            if what == _TIME:
                step()
            else:
                dist.gather_object(peak_bytes(step), None, 0)
    finally:
        dist.destroy_process_group()


class Ring:
    """This process as rank 0 of a 2-process gloo ring, the helper as rank 1."""

    def __init__(self):
        self._folder = tempfile.TemporaryDirectory()
        init_method = f"file://{self._folder.name}/rendezvous"
        self._helper = mp.get_context("spawn").Process(target=_helper, args=(1, init_method))
        self._helper.start()
        dist.init_process_group("gloo", init_method=init_method, rank=0, world_size=RING)
        self._steps = {}

    def _command(self, what: int, tokens: int):
        dist.broadcast(torch.tensor([what, tokens]), 0)
        return self._steps.setdefault(tokens, ring_step(tokens, 0, dist.group.WORLD))

    def step(self, tokens: int) -> None:
        self._command(_TIME, tokens)()

    def peak_bytes(self, tokens: int) -> list[int]:
        mine = peak_bytes(self._command(_MEASURE, tokens))
        every = [None] * RING
        dist.gather_object(mine, every, 0)
        return every

    def close(self) -> None:
        dist.broadcast(torch.tensor([_STOP, 0]), 0)
        dist.destroy_process_group()
        self._helper.join(timeout=60)
        self._folder.cleanup()


class PeakTable:
    """The memory rows, printed in the session's summary (a plugin registered by the first memory row)."""

    def __init__(self):
        self.lines: list[str] = []

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.section("ring attention, 2 processes: peak CPU tensor bytes per rank, one forward + backward")
        for line in self.lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def peak_table(request) -> PeakTable:
    table = PeakTable()
    request.config.pluginmanager.register(table)
    return table


@pytest.fixture(scope="module")
def ring():
    started = Ring()
    try:
        yield started
    finally:
        started.close()
        torch.set_num_threads(EVERY_CORE)


def one_process(impl: str, tokens: int):
    q, k, v, dout = (t.requires_grad_(i < 3) for i, t in enumerate(inputs(tokens)))
    if impl == "sdpa":
        run = lambda: F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
        ).transpose(0, 1)
    else:
        index = torch.arange(tokens)
        run = lambda: ring_attention(q, k, v, index, torch.zeros_like(index), None)
    return lambda: run().backward(dout)


@pytest.mark.parametrize("impl", ["sdpa", "ring_attention 1 proc", "ring_attention 2 proc"])
@pytest.mark.parametrize("tokens", TOKENS)
def test_ring_attention_forward_backward(benchmark, compute, ring, impl, tokens):
    if impl.endswith("2 proc"):
        torch.set_num_threads(1)
        fn = lambda: ring.step(tokens)
    else:
        torch.set_num_threads(EVERY_CORE)
        fn = one_process(impl, tokens)
    group = f"ring attention fwd+bwd cpu {tokens} tokens, {HEADS} heads ({KV_HEADS} kv) x {HEAD_DIM}, causal fp32"
    compute(benchmark, fn, device="cpu", flops=attention_flops(tokens), dtype=torch.float32, group=group, impl=impl)


@pytest.mark.parametrize("tokens", TOKENS)
def test_ring_attention_peak_memory(benchmark, ring, peak_table, tokens):
    """Per-rank peak bytes of one forward + backward, 2 processes, beside plain attention's scores alone."""
    torch.set_num_threads(1)
    per_rank = benchmark.pedantic(ring.peak_bytes, args=(tokens,), rounds=1, iterations=1)
    plain_scores = tokens * tokens * HEADS * 4
    benchmark.extra_info.update(peak_bytes_per_rank=per_rank, plain_attention_score_bytes=plain_scores)
    assert all(b > 0 for b in per_rank)
    peak_table.lines.append(
        f"  {tokens:>6} tokens: {', '.join(f'{b / 2**20:.1f}' for b in per_rank)} MiB per rank"
        f"   (plain attention's scores alone: {plain_scores / 2**20:.0f} MiB)"
    )


CUDA_TOKENS = 32768  # the long-context row a lent GPU measures (bench/gpu/run.sh)


@NEEDS_CUDA
@pytest.mark.parametrize("impl", ["sdpa_flash", "pytrain_ring"])
def test_ring_attention_cuda(benchmark, compute, impl):
    """One GPU, bf16, 32k tokens: the ring's block computation (one rank: every pair of the row, on the Triton
    flash-attention block kernels, the two causal diagonal pairs with the per-token mask) beside SDPA's flash backend
    on the same tokens; a multi-GPU machine would add the hops."""
    q, k, v, dout = (t.to("cuda", torch.bfloat16).requires_grad_(i < 3) for i, t in enumerate(inputs(CUDA_TOKENS)))
    if impl == "sdpa_flash":
        heads = [
            t.transpose(0, 1)[None]
            for t in (q, k.repeat_interleave(HEADS // KV_HEADS, 1), v.repeat_interleave(HEADS // KV_HEADS, 1))
        ]

        def run():
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(*heads, is_causal=True)[0].transpose(0, 1)
    else:
        index = torch.arange(CUDA_TOKENS, device="cuda")

        def run():
            return ring_attention(q, k, v, index, torch.zeros_like(index), None)

    group = f"ring attention fwd+bwd cuda {CUDA_TOKENS} tokens, {HEADS} heads ({KV_HEADS} kv) x {HEAD_DIM}, causal bf16"
    compute(
        benchmark,
        lambda: run().backward(dout),
        device="cuda",
        flops=attention_flops(CUDA_TOKENS),
        dtype=torch.bfloat16,
        group=group,
        impl=impl,
    )
