"""pytrain's CPU attention kernels (pytrain/kernels/attention_cpu.py, csrc/cpu/attention.cpp), bf16 and fp32,
against the float64 reference, by test_flash_attn.py's rule: the kernel's max error at most 2x that of PyTorch's
plain attention computed in the same dtype, plus 1e-2 (bf16) or 2e-5 (fp32). Packed sequences of uneven lengths (empty, one token, and around the
kernels' 64-query blocks and 16-key tiles), GQA, odd and small head dims, strided q/k/v, the autograd and
torch.compile wiring, and the switch back to PyTorch's SDPA. Skipped where the CPU has no AVX512-BF16.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_flash_attn import assert_by_the_rule, assert_matches_reference, grads, packed_inputs

from pytrain.kernels import attention_cpu, flash_attn_func, flash_attn_varlen_func

pytestmark = pytest.mark.skipif(
    not attention_cpu.AVAILABLE, reason="the CPU has no AVX512-BF16 (pytrain's bf16 attention kernels need it)"
)
BF16 = torch.bfloat16


def assert_varlen_matches_reference(lengths, heads, kv_heads, head_dim, causal, scale=None, seed=0, dtype=BF16):
    q, k, v, dout, bounds = packed_inputs(lengths, heads, kv_heads, head_dim, dtype, "cpu", seed=seed)
    assert attention_cpu.applies(q, k, -1)
    scale = head_dim**-0.5 if scale is None else scale
    assert_matches_reference(
        lambda a, b, c: flash_attn_varlen_func(a, b, c, torch.tensor(bounds), causal=causal, softmax_scale=scale),
        q,
        k,
        v,
        dout,
        bounds,
        causal,
        scale,
    )


@pytest.mark.parametrize("dtype", [BF16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "lengths",
    [[1], [64], [65], [0, 17, 0, 130], [63, 1, 200], [257, 16, 15]],
    ids=lambda lengths: "-".join(map(str, lengths)),
)
def test_packed_lengths(lengths, causal, dtype):
    assert_varlen_matches_reference(lengths, 4, 2, 64, causal, seed=len(lengths), dtype=dtype)


@pytest.mark.parametrize("dtype", [BF16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("head_dim", [8, 33, 40, 80, 128, 256])
def test_head_dims(head_dim, dtype):
    assert_varlen_matches_reference([70, 9], 2, 1, head_dim, causal=True, seed=head_dim, dtype=dtype)


@pytest.mark.parametrize("heads, kv_heads", [(8, 1), (6, 3), (3, 3)])
def test_gqa(heads, kv_heads):
    assert_varlen_matches_reference([100, 31], heads, kv_heads, 64, causal=True, scale=0.2, seed=heads)


@pytest.mark.parametrize("causal", [False, True])
def test_batched_views_of_one_projection(causal):
    """flash_attn_func over q, k, v as strided views of one fused projection (batch, seq, 3 * heads, dim), as a
    model's attention hands them over: the kernels read the strides."""
    batch, seq, heads, dim = 3, 77, 4, 32
    fused = torch.randn(batch, seq, 3 * heads, dim, generator=torch.Generator().manual_seed(5)).to(BF16)
    q, k, v = fused.split(heads, dim=2)
    assert q.stride(1) == 3 * heads * dim and attention_cpu.applies(q, k, -1)
    dout = torch.randn(batch, seq, heads, dim, dtype=BF16)
    got = grads(lambda a, b, c: flash_attn_func(a, b, c, causal=causal), q, k, v, dout)
    assert all(g.shape == (batch, seq, heads, dim) for g in got)
    flat = [t.flatten(0, 1) for t in (q, k, v, dout)]
    bounds = list(range(0, (batch + 1) * seq, seq))
    assert_by_the_rule([g.flatten(0, 1) for g in got], *flat, bounds, causal, dim**-0.5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(0, 150), min_size=1, max_size=4).filter(any),
    kv_heads=st.integers(1, 3),
    share=st.integers(1, 3),
    head_dim=st.integers(1, 96),
    causal=st.booleans(),
    scale=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([BF16, torch.float32]),
)
def test_property_matches_reference(lengths, kv_heads, share, head_dim, causal, scale, seed, dtype):
    assert_varlen_matches_reference(
        lengths, kv_heads * share, kv_heads, head_dim, causal, scale=scale, seed=seed, dtype=dtype
    )


def test_ops_pass_opcheck_and_compile_fullgraph():
    q, k, v, _, bounds = packed_inputs([5, 70], 4, 2, 32, BF16, "cpu", seed=9)
    cu_seqlens = torch.tensor(bounds)
    torch.library.opcheck(
        torch.ops.pytrain.cpu_attention_forward,
        (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu_seqlens, True, 0.25),
    )
    flat = (q.detach(), k.detach(), v.detach())
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda a, b, c: torch.ops.pytrain.cpu_attention_forward(a, b, c, cu_seqlens, True, 0.25)[0],
        fullgraph=True,
        backend="aot_eager",
    )
    torch.testing.assert_close(
        compiled(*flat), flash_attn_varlen_func(*flat, cu_seqlens, causal=True, softmax_scale=0.25)
    )


@pytest.fixture
def sdpa_only():
    previous = attention_cpu.use_kernels(False)
    yield
    attention_cpu.use_kernels(previous)


def test_switch_back_to_sdpa(sdpa_only):
    """use_kernels(False): bf16 CPU attention runs PyTorch's SDPA again (no pytrain::cpu_attention op in the
    profile), and the results still match the reference."""
    q, k, v, dout, bounds = packed_inputs([40, 90], 4, 4, 64, BF16, "cpu", seed=11)
    assert not attention_cpu.applies(q, k, -1)
    with torch.profiler.profile() as profile:
        flash_attn_varlen_func(q, k, v, torch.tensor(bounds), causal=True)
    assert not [e.key for e in profile.key_averages() if "cpu_attention" in e.key]
    assert_matches_reference(
        lambda a, b, c: flash_attn_varlen_func(a, b, c, torch.tensor(bounds), causal=True),
        q,
        k,
        v,
        dout,
        bounds,
        True,
        0.125,
    )


def test_flash_attn_func_takes_the_kernels():
    """bf16 flash_attn_func on this CPU runs the kernels (their op shows in the profile)."""
    q, k, v, _, _ = packed_inputs([32, 32], 2, 2, 16, BF16, "cpu", seed=12)
    with torch.profiler.profile() as profile:
        flash_attn_func(*(t.view(2, 32, 2, 16) for t in (q, k, v)), causal=True)
    assert [e.key for e in profile.key_averages() if e.key == "pytrain::cpu_attention_forward"]


def test_other_calls_take_sdpa():
    """fp16, a sliding window, and token strides past the kernels' 2^26 limit stay on SDPA."""
    q, k, _, _, _ = packed_inputs([8], 2, 2, 8, BF16, "cpu")
    assert attention_cpu.applies(q, k, -1) and attention_cpu.applies(q.float(), k.float(), -1)
    assert not attention_cpu.applies(q.half(), k.half(), -1)
    assert not attention_cpu.applies(q, k, 4)
    wide = torch.empty_strided((2, 2, 8), (attention_cpu.MAX_TOKEN_STRIDE + 1, 8, 1), dtype=BF16)
    assert not attention_cpu.applies(wide, k[:2], -1)


def test_python_and_the_extension_agree_on_the_cpu():
    import pytrain._C

    assert pytrain._C.attention_supported() == attention_cpu.AVAILABLE


@pytest.mark.parametrize("dtype", [BF16, torch.float32], ids=["bf16", "fp32"])
def test_bitwise_the_same_on_any_thread_count(dtype):
    """Each work item is computed whole by one thread (dK/dV summed inside it), so the thread count and which
    thread draws which item change nothing: a run resumed with another thread count stays bit-exact."""
    q, k, v, dout, bounds = packed_inputs([200, 3, 77], 4, 2, 64, dtype, "cpu", seed=13)
    runs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(grads(lambda a, b, c: attention_cpu.attention(a, b, c, bounds, True, 0.125), q, k, v, dout))
    finally:
        torch.set_num_threads(before)
    for run in runs[1:]:
        for got, want in zip(run, runs[0]):
            assert torch.equal(got, want)
