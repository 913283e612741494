"""Ring attention (pytrain.parallel.ring_attention) against plain attention over all ranks' tokens put together.

The oracle is written here: a float64 softmax over the explicit (queries, keys) mask. The ring runs three
ways: in one process (group None); on a ring of threads in one process (ThreadTransport: the same code, its
hops and all-gather carried by queues, cheap enough for hypothesis to try many layouts); and in real gloo
processes, 2 and 4, several cases per spawn.

Tolerances on the output and every gradient: float64 inputs (computed in float64: the algorithm itself),
1e-10; fp32 inputs at the default scale, rtol 1e-5 / atol 1e-6 (fp32 accumulation against float64), atol 1e-5
in the property test (head_dim up to 8 and up to 4 ranks' merges); fp16 and bf16 inputs, rtol = atol 1e-2 and
2e-2 (16-bit rounding of inputs, output and gradients; the Triton blocks' dot products in 16 bits too).

The pairs run in torch on the CPU and in the Triton block kernels on CUDA (tests: the CPU through Triton's
interpreter with PYTRAIN_TRITON_CPU=1, in gloo processes, against the torch pairs, rtol 1e-5 / atol 1e-6 in fp32).
"""

import itertools
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rank_results import RankResults

from pytrain.parallel import ring_attention as ring_module
from pytrain.parallel.ring_attention import (
    _OneRank,
    _Ring,
    _ring_attention,
    _TorchBlocks,
    _TritonBlocks,
    contiguous_token_index,
    document_ids,
    ring_attention,
    ring_schedule,
    zigzag_token_index,
)

TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
PROPERTY_TOLERANCES = {torch.float64: TOLERANCES[torch.float64], torch.float32: dict(rtol=1e-5, atol=1e-5)}
THREAD_TIMEOUT = 60  # seconds a simulated rank waits for a message before the test fails (a hang is a bug)


# ---------------------------------------------------------------------------------------------------
# The oracle and the cases


def reference_attention(q, k, v, token_index, document, causal, scale, sliding_window):
    """float64 softmax(q k^T * scale) v over the explicit mask; a row with no allowed key gets 0."""
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    allowed = document[:, None] == document[None, :]
    if causal:
        allowed &= token_index[None, :] <= token_index[:, None]
    if sliding_window is not None:
        allowed &= token_index[:, None] - token_index[None, :] < sliding_window
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    probs = scores.masked_fill(~allowed, torch.finfo(torch.float64).min).softmax(-1) * allowed
    return torch.einsum("hqk,khd->qhd", probs, v)


@dataclass(frozen=True)
class Case:
    ring: int = 2
    split: str = "contiguous"  # "contiguous", "zigzag" or "random" (any equal-sized subsets of the tokens)
    batch: int = 2
    seq_len: int = 8
    cu_seqlens: tuple[int, ...] | None = None  # packed documents over the flattened tokens; None: one per row
    heads: int = 2
    kv_heads: int = 2
    head_dim: int = 4
    causal: bool = True
    sliding_window: int | None = None
    window_size: int = 1
    softmax_scale: float | None = None
    dtype: torch.dtype = torch.float32
    seed: int = 0

    @property
    def options(self) -> dict:
        return dict(
            causal=self.causal,
            softmax_scale=self.softmax_scale,
            sliding_window=self.sliding_window,
            window_size=self.window_size,
        )

    def tensors(self):
        """q, k, v, dout over all tokens in the global order (input dtype), and every token's document."""
        generator = torch.Generator().manual_seed(self.seed)
        tokens = self.batch * self.seq_len
        shapes = [(tokens, self.heads), (tokens, self.kv_heads), (tokens, self.kv_heads), (tokens, self.heads)]
        q, k, v, dout = (torch.randn(*s, self.head_dim, generator=generator).to(self.dtype) for s in shapes)
        return q, k, v, dout, document_ids(self.cu_seqlens, self.batch, self.seq_len)

    def token_index(self, rank: int) -> torch.Tensor:
        if self.split == "contiguous":
            return contiguous_token_index(self.seq_len, self.batch, rank, self.ring)
        if self.split == "zigzag":
            return zigzag_token_index(self.seq_len, self.batch, rank, self.ring)
        order = torch.randperm(self.batch * self.seq_len, generator=torch.Generator().manual_seed(self.seed + 1))
        return order.chunk(self.ring)[rank]

    def expected(self):
        """The oracle's out, dq, dk, dv over all tokens (float64)."""
        q, k, v, dout, document = self.tensors()
        q, k, v = (t.double().requires_grad_() for t in (q, k, v))
        scale = self.head_dim**-0.5 if self.softmax_scale is None else self.softmax_scale
        index = torch.arange(q.shape[0])
        out = reference_attention(q, k, v, index, document, self.causal, scale, self.sliding_window)
        out.backward(dout.double())
        return out.detach(), q.grad, k.grad, v.grad


def run_rank(case: Case, rank: int, attend):
    """This rank's shard through `attend(q, k, v, token_index, document, **options)`, forward and backward:
    (out, dq, dk, dv) of its tokens."""
    q, k, v, dout, document = case.tensors()
    index = case.token_index(rank)
    shard = [t[index].requires_grad_() for t in (q, k, v)]
    out = attend(*shard, index, document[index], **case.options)
    out.backward(dout[index])
    return out.detach(), *(t.grad for t in shard)


def check_ranks(case: Case, results, tolerances=TOLERANCES) -> None:
    """results[rank] = (out, dq, dk, dv) of that rank's tokens: each equals the oracle's rows."""
    expected = case.expected()
    for rank, got in enumerate(results):
        index = case.token_index(rank)
        for name, value, want in zip(("out", "dq", "dk", "dv"), got, expected):
            assert value.dtype == case.dtype, f"{name} dtype"
            torch.testing.assert_close(
                value.double(), want[index], **tolerances[case.dtype], msg=lambda m: f"{case} rank {rank} {name}: {m}"
            )


# ---------------------------------------------------------------------------------------------------
# A ring of threads: the real code, the transport replaced by queues


class ThreadTransport:
    """What ring_attention needs of a process group (rank, size, all_gather, start_hop), between threads."""

    def __init__(self, rank: int, size: int, mailboxes):
        self.rank, self.size, self._mailboxes = rank, size, mailboxes

    def all_gather(self, tensor):
        for peer in range(self.size):
            self._mailboxes[self.rank, peer, "gather"].put(tensor.clone())
        return [self._mailboxes[peer, self.rank, "gather"].get(timeout=THREAD_TIMEOUT) for peer in range(self.size)]

    def start_hop(self, send_to, recv_from, messages):
        for tag, tensor, _ in messages:
            self._mailboxes[self.rank, send_to, tag].put(tensor.clone())

        def wait():
            for tag, _, buffer in messages:
                buffer.copy_(self._mailboxes[recv_from, self.rank, tag].get(timeout=THREAD_TIMEOUT))

        return wait


def run_threads(size: int, work):
    """[work(rank, transport) for each rank], the ranks running at once on threads."""
    tags = [ring_module._KV_TAG, ring_module._TOKENS_TAG, ring_module._GRAD_TAG, "gather"]
    mailboxes = {key: queue.Queue() for key in itertools.product(range(size), range(size), tags)}
    with ThreadPoolExecutor(size) as pool:
        futures = [pool.submit(work, rank, ThreadTransport(rank, size, mailboxes)) for rank in range(size)]
        return [future.result(timeout=4 * THREAD_TIMEOUT) for future in futures]


def run_thread_ring(case: Case):
    def work(rank, transport):
        return run_rank(case, rank, lambda *tensors, **options: _ring_attention(*tensors, transport, **options))

    return run_threads(case.ring, work)


# ---------------------------------------------------------------------------------------------------
# One process


@pytest.mark.parametrize(
    "case",
    [
        Case(ring=1),
        Case(ring=1, causal=False, heads=6, kv_heads=2, softmax_scale=0.3),
        Case(ring=1, batch=1, seq_len=24, cu_seqlens=(0, 5, 6, 17, 24), sliding_window=4),
        Case(ring=1, dtype=torch.bfloat16, heads=4, kv_heads=1, head_dim=16, seq_len=32),
    ],
    ids=["causal", "gqa non-causal scaled", "packed window", "bf16 mqa"],
)
def test_one_process_equals_reference(case):
    check_ranks(case, [run_rank(case, 0, lambda *tensors, **options: ring_attention(*tensors, None, **options))])


def test_chunked_query_rows_equal_one_chunk(monkeypatch):
    """A score budget of one row at a time (every pair computed row by row) changes nothing."""
    case = Case(ring=2, split="zigzag", batch=1, seq_len=16, cu_seqlens=(0, 3, 11, 16), heads=4, kv_heads=2)
    monkeypatch.setattr(ring_module, "SCORE_BYTES", 1)
    check_ranks(case, run_thread_ring(case))


def test_rows_without_keys_give_zero_and_no_nan():
    """The guards under every partial pair: a row whose mask is empty in a pair gets probabilities 0 and lse -inf,
    merging two empty partials keeps out 0 / lse -inf, and its gradients are 0."""
    q = torch.randn(1, 2, 3, 4)  # (kv_heads, group, rows, dim)
    k, v = torch.randn(1, 5, 4), torch.randn(1, 5, 4)
    allowed = torch.tensor([[True, False, True, False, False], [False] * 5, [True] * 5])
    out, lse = ring_module._pair_forward(q, k, v, lambda a, b: allowed[a:b].clone())
    assert torch.isinf(lse[:, :, 1]).all() and (out[:, :, 1] == 0).all() and torch.isfinite(out).all()
    merged_out, merged_lse = torch.zeros_like(out), torch.full_like(lse, float("-inf"))
    ring_module._merge_(merged_out, merged_lse, out.clone(), lse.clone())
    torch.testing.assert_close(merged_out, out)
    assert torch.isinf(merged_lse[:, :, 1]).all() and (merged_out[:, :, 1] == 0).all()
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    lse_or_zero = lse.masked_fill(lse == float("-inf"), 0.0)
    delta = (torch.randn_like(out) * out).sum(-1)
    ring_module._pair_backward(
        q, k, v, torch.randn_like(out), delta, lse_or_zero, lambda a, b: allowed[a:b].clone(), 1.0, dq, dk, dv
    )
    assert (dq[:, :, 1] == 0).all() and all(torch.isfinite(t).all() for t in (dq, dk, dv))


# ---------------------------------------------------------------------------------------------------
# The schedule and the skipping


@pytest.mark.parametrize(("size", "window_size"), [(1, 1), (4, 1), (4, 2), (4, 4), (6, 2), (6, 3), (8, 2), (8, 4)])
def test_schedule_visits_every_block_once_mostly_inside_windows(size, window_size):
    schedules = [ring_schedule(rank, size, window_size) for rank in range(size)]
    for rank, schedule in enumerate(schedules):
        assert schedule.owners[0] == rank and sorted(schedule.owners) == list(range(size))
        hops = list(zip(schedule.send_to[:-1], schedule.recv_from[:-1]))
        for step, (send_to, recv_from) in enumerate(hops):  # the block goes where it is computed next
            assert schedules[send_to].owners[step + 1] == schedule.owners[step]
            assert schedules[recv_from].send_to[step] == rank
        between_windows = sum(send_to // window_size != rank // window_size for send_to, _ in hops)
        assert between_windows == (size // window_size - 1 if size > 1 else 0)
        assert schedule.send_to[-1] == schedule.owners[-1]  # backward's return hop: to the owner
        assert schedules[schedule.recv_from[-1]].owners[-1] == rank


def test_hops_overlap_the_compute(monkeypatch):
    """Forward: each block's hop starts before the block is computed and is waited for after. Backward: the
    dK/dV hop of a block starts after its compute and is waited for after the next block's compute; the last
    one takes them home."""
    events = {}

    class RecordingTransport(ThreadTransport):
        def all_gather(self, tensor):
            events.setdefault(threading.get_ident(), []).append("gather")
            return super().all_gather(tensor)

        def start_hop(self, send_to, recv_from, messages):
            kind = "grad" if messages[0][0] == ring_module._GRAD_TAG else "kv"
            log = events.setdefault(threading.get_ident(), [])
            log.append(f"hop {kind}")
            wait = super().start_hop(send_to, recv_from, messages)
            return lambda: (log.append(f"wait {kind}"), wait())

    def recorded(function):
        def compute(*args):
            events[threading.get_ident()].append("compute")
            return function(*args)

        return compute

    monkeypatch.setattr(ring_module, "_pair_forward", recorded(ring_module._pair_forward))
    monkeypatch.setattr(ring_module, "_pair_backward", recorded(ring_module._pair_backward))
    case = Case(ring=2, batch=1, seq_len=16, causal=False)

    def work(rank, transport):
        recording = RecordingTransport(rank, transport.size, transport._mailboxes)
        run_rank(case, rank, lambda *tensors, **options: _ring_attention(*tensors, recording, **options))
        return [name for name, _ in itertools.groupby(events[threading.get_ident()])]  # one "compute" per block

    forward = ["gather", "hop kv", "compute", "wait kv", "compute"]
    backward = ["hop kv", "compute", "hop grad", "wait kv", "compute", "wait grad", "hop grad", "wait grad"]
    assert run_threads(2, work) == [forward + backward] * 2


def computed_area(case: Case) -> list[int]:
    """Per rank: query x key tokens of the pairs the ring computes (empty ones skipped)."""

    def work(rank, transport):
        q, k, _, _, document = case.tensors()
        index = case.token_index(rank)
        scale, window = case.head_dim**-0.5, case.sliding_window
        ring = _Ring(transport, q[index], k[index], index, document[index], case.causal, scale, window, 1)
        return sum(
            (queries.stop - queries.start) * (keys.stop - keys.start)
            for owner in range(case.ring)
            for queries, keys, _ in ring.pairs(owner)
        )

    return run_threads(case.ring, work)


def test_zigzag_balances_causal_work_and_skips_the_empty_half():
    ring, chunk = 4, 4
    zigzag = computed_area(Case(ring=ring, split="zigzag", batch=1, seq_len=2 * ring * chunk))
    contiguous = computed_area(Case(ring=ring, split="contiguous", batch=1, seq_len=2 * ring * chunk))
    # every rank: 2 (R - 1) full chunk pairs from the other blocks, 3 from its own (two of them masked triangles)
    assert zigzag == [(2 * ring + 1) * chunk**2] * ring
    # the plain split: rank r computes r whole blocks and 3 quarters of its own (its tokens cut in two halves)
    assert contiguous == [rank * (2 * chunk) ** 2 + 3 * chunk**2 for rank in range(ring)]
    # packed documents: pairs of parts whose documents differ are skipped too
    packed = computed_area(Case(ring=2, split="contiguous", batch=1, seq_len=16, cu_seqlens=(0, 8, 16), causal=False))
    assert packed == [64, 64]


# ---------------------------------------------------------------------------------------------------
# A ring of threads


THREAD_CASES = [
    Case(ring=2),
    Case(ring=4, split="zigzag", batch=2, seq_len=16),
    Case(ring=4, split="random", batch=3, seq_len=8, cu_seqlens=(0, 3, 4, 13, 24), causal=False),
    Case(ring=3, split="zigzag", batch=1, seq_len=30, cu_seqlens=(0, 7, 19, 30), heads=6, kv_heads=2),
    Case(ring=4, split="zigzag", batch=1, seq_len=32, sliding_window=5, window_size=2, heads=3, kv_heads=1),
    Case(ring=4, split="contiguous", batch=2, seq_len=16, dtype=torch.bfloat16, head_dim=8),
]


@pytest.mark.parametrize("case", THREAD_CASES, ids=str)
def test_thread_ring_equals_reference(case):
    check_ranks(case, run_thread_ring(case))


@pytest.mark.parametrize(("ring", "window_size"), [(4, 2), (6, 2), (6, 3)])
def test_double_ring_equals_single_ring(ring, window_size):
    """window_size changes where blocks travel and so the merge order, nothing else (fp32 rounding)."""
    case = Case(ring=ring, split="zigzag", batch=2, seq_len=4 * ring, cu_seqlens=(0, 5, 8 * ring), heads=4)
    single = run_thread_ring(case)
    double = run_thread_ring(replace(case, window_size=window_size))
    for rank, (a, b) in enumerate(zip(single, double)):
        for name, x, y in zip(("out", "dq", "dk", "dv"), a, b):
            torch.testing.assert_close(x, y, **TOLERANCES[torch.float32], msg=lambda m: f"rank {rank} {name}: {m}")
    check_ranks(replace(case, window_size=window_size), double)


@st.composite
def ring_cases(draw) -> Case:
    ring = draw(st.integers(1, 4))
    batch, seq_len = draw(st.integers(1, 3)), 2 * ring * draw(st.integers(1, 3))
    tokens = batch * seq_len
    cu_seqlens = None
    if draw(st.booleans()):  # packed documents over the flattened tokens, cut anywhere (across rows and ranks)
        cu_seqlens = (0, *sorted(draw(st.sets(st.integers(1, tokens - 1), max_size=5))), tokens)
    kv_heads = draw(st.integers(1, 2))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    return Case(
        ring=ring,
        split=draw(st.sampled_from(["contiguous", "zigzag", "random"])),
        batch=batch,
        seq_len=seq_len,
        cu_seqlens=cu_seqlens,
        heads=kv_heads * draw(st.integers(1, 3)),
        kv_heads=kv_heads,
        head_dim=draw(st.sampled_from([1, 4, 8])),
        causal=draw(st.booleans()),
        sliding_window=draw(st.none() | st.integers(1, seq_len)),
        window_size=draw(st.sampled_from([w for w in range(1, ring + 1) if ring % w == 0])),
        # float64: any scale, exact; fp32: the default scale (a sharper softmax rounds the scores more)
        softmax_scale=draw(st.none() | st.floats(0.05, 2.0)) if dtype == torch.float64 else None,
        dtype=dtype,
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=ring_cases())
def test_property_thread_ring_equals_reference(case):
    check_ranks(case, run_thread_ring(case), PROPERTY_TOLERANCES)


# ---------------------------------------------------------------------------------------------------
# Real processes (gloo)


PROCESS_CASES = {
    2: [
        Case(ring=2, split="contiguous", batch=2, seq_len=16),
        Case(ring=2, split="zigzag", batch=2, seq_len=16, heads=4, kv_heads=2),
        Case(ring=2, split="zigzag", batch=1, seq_len=24, cu_seqlens=(0, 5, 13, 14, 24), sliding_window=6),
        Case(ring=2, split="contiguous", batch=2, seq_len=16, dtype=torch.bfloat16, head_dim=8, causal=False),
    ],
    4: [
        Case(ring=4, split="contiguous", batch=1, seq_len=32, cu_seqlens=(0, 9, 20, 32)),
        Case(ring=4, split="zigzag", batch=2, seq_len=16, heads=6, kv_heads=2, sliding_window=5),
        Case(ring=4, split="zigzag", batch=2, seq_len=16, cu_seqlens=(0, 3, 21, 32), window_size=2),
        Case(ring=4, split="random", batch=1, seq_len=24, causal=False, window_size=2, dtype=torch.bfloat16),
    ],
}


def _process_worker(rank, world, init_method, results):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        group = dist.new_group(list(range(world)))  # a group of its own: global ranks go through get_global_rank
        for number, case in enumerate(PROCESS_CASES[world]):
            results[number, rank] = run_rank(
                case, rank, lambda *tensors, **options: ring_attention(*tensors, group, **options)
            )
    finally:
        dist.destroy_process_group()


def run_processes(world: int, init_method: str) -> dict:
    with RankResults() as results:
        mp.spawn(_process_worker, args=(world, init_method, results), nprocs=world, join=True)
        return dict(results)


# 2 processes: 4-7 s; 4 processes on this 2-core machine: 7 s idle, 25 s when shared, so slow (the thread ring covers
# 4-rank schedules in the fast suite)
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_gloo_processes_equal_reference(world, init_method):
    results = run_processes(world, init_method)
    for number, case in enumerate(PROCESS_CASES[world]):
        check_ranks(case, [results[number, rank] for rank in range(world)])


# ---------------------------------------------------------------------------------------------------
# The pairs on the Triton block kernels


def test_pairs_run_on_the_triton_kernels_where_flash_attention_does(triton_device, monkeypatch):
    """CUDA (or PYTRAIN_TRITON_CPU=1): the Triton block kernels for the dtypes, head dims and token indices they
    take; float64, head_dim > 256 and indices past int32 stay in torch, and so does the CPU by default."""

    def kind(dtype, head_dim=8, device=triton_device, first_index=0):
        q = torch.zeros(4, 2, head_dim, dtype=dtype, device=device)
        index = torch.arange(first_index, first_index + 4, device=device)
        return _Ring(_OneRank(), q, q, index, torch.zeros_like(index), True, 1.0, None, 1).block_kind

    assert kind(torch.float32) is kind(torch.float16) is kind(torch.bfloat16) is _TritonBlocks
    assert kind(torch.float64) is kind(torch.float32, head_dim=264) is _TorchBlocks
    assert kind(torch.float32, first_index=2**31 - 4) is _TritonBlocks  # the kernels compare indices in int32
    assert kind(torch.float32, first_index=2**31 - 3) is _TorchBlocks
    monkeypatch.delenv("PYTRAIN_TRITON_CPU", raising=False)
    assert kind(torch.float32, device="cpu") is _TorchBlocks


TRITON_CASES = {
    # zigzag: full, partial (the diagonal, masked by index) and empty pairs; documents straddling the ranks; GQA
    2: [
        Case(
            ring=2,
            split="zigzag",
            batch=1,
            seq_len=16,
            cu_seqlens=(0, 3, 11, 16),
            heads=2,
            kv_heads=1,
            sliding_window=6,
        )
    ],
    4: [
        Case(
            ring=4, split="zigzag", batch=1, seq_len=16, cu_seqlens=(0, 5, 16), heads=4, kv_heads=2, dtype=torch.float16
        ),
        Case(ring=4, split="random", batch=1, seq_len=16, causal=False, sliding_window=5, window_size=2),
    ],
}


def _triton_worker(rank, world, init_method, results):
    """Each case twice, the pairs on the Triton kernels (Triton's interpreter) and in torch."""
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        for number, case in enumerate(TRITON_CASES[world]):
            for blocks in ("triton", "torch"):
                os.environ["PYTRAIN_TRITON_CPU"] = "1" if blocks == "triton" else "0"
                results[number, blocks, rank] = run_rank(
                    case, rank, lambda *tensors, **options: ring_attention(*tensors, dist.group.WORLD, **options)
                )
    finally:
        dist.destroy_process_group()


# 2 processes, one case: 7 s; 4 processes: slow (the interpreter runs every pair's launch one program at a time)
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton's interpreter on CPU tensors (no GPU)")
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_gloo_processes_triton_pairs_equal_torch_pairs(world, init_method):
    """Gloo processes, the Triton block kernels forced on the CPU: the reference's result, and in fp32 the torch
    pairs' up to rounding."""
    with RankResults() as stored:
        mp.spawn(_triton_worker, args=(world, init_method, stored), nprocs=world, join=True)
        results = dict(stored)
    for number, case in enumerate(TRITON_CASES[world]):
        triton_results = [results[number, "triton", rank] for rank in range(world)]
        check_ranks(case, triton_results)
        if case.dtype == torch.float32:
            torch_results = [results[number, "torch", rank] for rank in range(world)]
            for rank, (got, want) in enumerate(zip(triton_results, torch_results)):
                for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
                    torch.testing.assert_close(
                        x, y, **TOLERANCES[torch.float32], msg=lambda m: f"{case} rank {rank} {name}: {m}"
                    )


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_thread_ring_triton_pairs_equal_reference(dtype, monkeypatch):
    """A ring of 2 threads on one GPU (the pairs on the Triton kernels), longer rows than the interpreter allows.
    The threads take turns at the kernels: Triton's autotuner keeps per-launch state on the kernel object."""
    from pytrain.triton import flash_attn_triton

    lock = threading.Lock()

    def one_at_a_time(function):
        def locked(*args, **kwargs):
            with lock:
                return function(*args, **kwargs)

        return locked

    for name in ("flash_attn_block_forward", "flash_attn_block_backward", "softmax_delta"):
        monkeypatch.setattr(flash_attn_triton, name, one_at_a_time(getattr(flash_attn_triton, name)))
    case = Case(
        ring=2,
        split="zigzag",
        batch=2,
        seq_len=512,
        cu_seqlens=(0, 100, 700, 1024),
        heads=8,
        kv_heads=2,
        head_dim=64,
        sliding_window=300,
        dtype=dtype,
    )

    def on_cuda(transport):
        def attend(*tensors, **options):
            return _ring_attention(*(t.cuda() for t in tensors), transport, **options).cpu()

        return attend

    check_ranks(case, run_threads(case.ring, lambda rank, transport: run_rank(case, rank, on_cuda(transport))))


# ---------------------------------------------------------------------------------------------------
# Bad arguments


def _args(tokens=4, heads=2, kv_heads=2, dim=4):
    q, k, v = torch.randn(tokens, heads, dim), torch.randn(tokens, kv_heads, dim), torch.randn(tokens, kv_heads, dim)
    return q, k, v, torch.arange(tokens), torch.zeros(tokens, dtype=torch.int64)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: (a[0][0], *a[1:]), ValueError, r"q must be a \(tokens, heads, head_dim\) tensor"),
        (lambda a: (a[0].long(), *a[1:]), TypeError, "q must be a floating-point tensor"),
        (lambda a: (a[0], a[1].double(), *a[2:]), TypeError, "q, k and v must share a dtype"),
        (lambda a: (a[0], a[1], a[2][:, :1], *a[3:]), ValueError, "k and v must have the same shape"),
        (lambda a: (a[0], a[1][:3], a[2][:3], *a[3:]), ValueError, "k holds 3 tokens and q 4"),
        (lambda a: (a[0][:, :, :2], *a[1:]), ValueError, "q has head_dim 2 and k/v 4"),
        (lambda a: (torch.randn(4, 3, 4), *a[1:]), ValueError, "q's 3 heads must be a multiple of k/v's 2 kv heads"),
        (lambda a: (*a[:3], a[3].int(), a[4]), TypeError, r"token_index must be an int64 tensor \(use \.long\(\)\)"),
        (lambda a: (*a[:3], a[3][:3], a[4]), ValueError, r"token_index must have shape \(4,\)"),
        (lambda a: (*a[:4], a[4][None]), ValueError, r"document must have shape \(4,\)"),
        (lambda a: (a[0][:0], a[1][:0], a[2][:0], a[3][:0], a[4][:0]), ValueError, "q holds no tokens"),
    ],
)
def test_bad_arguments_name_the_argument(change, error, match):
    with pytest.raises(error, match=match):
        ring_attention(*change(_args()), None)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (dict(sliding_window=0), ValueError, "sliding_window must be >= 1"),
        (dict(sliding_window=2.5), TypeError, "sliding_window must be an int or None"),
        (dict(window_size=0), ValueError, "window_size must be a positive int"),
    ],
)
def test_bad_options_name_the_option(options, error, match):
    with pytest.raises(error, match=match):
        ring_attention(*_args(), None, **options)


def test_window_size_must_divide_the_context_size():
    case = Case(ring=4, window_size=3)
    with pytest.raises(ValueError, match=r"window_size=3 does not divide the context size 4: use one of \[1, 2, 4\]"):
        run_thread_ring(case)


def test_ranks_with_different_token_counts_fail_on_every_rank():
    errors = []
    lock = threading.Lock()

    def work(rank, transport):
        q, k, v, index, document = _args(tokens=4 + rank)
        try:
            _ring_attention(
                q, k, v, index, document, transport, causal=True, softmax_scale=None, sliding_window=None, window_size=1
            )
        except ValueError as error:
            with lock:
                errors.append(str(error))

    run_threads(2, work)
    assert len(errors) == 2 and all("every rank of the context group must pass the same shapes" in e for e in errors)
    assert "q of 4 tokens" in errors[0] and "q of 5 tokens" in errors[0]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: zigzag_token_index(10, 1, 0, 2), "seq_len 10 .* cannot be cut into 4 equal chunks"),
        (lambda: contiguous_token_index(8, 1, 2, 2), "rank 2 is not a rank of a ring of 2"),
        (lambda: document_ids([0, 3, 7], 2, 4), "cu_seqlens ends at 7 tokens, but batch 2 x seq_len 4 is 8"),
    ],
)
def test_bad_split_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_token_index_helpers():
    assert zigzag_token_index(8, 2, 1, 2).tolist() == [2, 3, 4, 5, 10, 11, 12, 13]
    assert zigzag_token_index(8, 1, 0, 2).tolist() == [0, 1, 6, 7]
    assert contiguous_token_index(8, 2, 1, 2).tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    every = torch.cat([zigzag_token_index(12, 3, rank, 3) for rank in range(3)])
    assert sorted(every.tolist()) == list(range(36))
    assert document_ids(None, 2, 3).tolist() == [0, 0, 0, 1, 1, 1]
    assert document_ids([0, 2, 2, 5, 6], 2, 3).tolist() == [0, 0, 2, 2, 2, 3]
