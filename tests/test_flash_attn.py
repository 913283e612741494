"""Flash-attention against a float64 reference: the Triton kernels (on CUDA, or under TRITON_INTERPRET=1
on the CPU, small shapes) and the CPU path (SDPA per document), outputs and dq/dk/dv.

Tolerance rule (flash-attention's own): the kernel's max error against the float64 reference is at most
2x the error of PyTorch's plain attention computed in the same dtype, plus a small absolute floor
(FLOOR, for fp32 where both errors are rounding noise).
"""

import itertools
import math
import os

import pytest
import torch

from pytrain.kernels import flash_attn_func, flash_attn_varlen_func, reference

FLOOR = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
CUDA = torch.cuda.is_available()


@pytest.fixture
def triton_device(monkeypatch):
    """Where the Triton kernels run: the GPU, or the CPU through Triton's interpreter."""
    if CUDA:
        return "cuda"
    assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets it before triton is imported"
    monkeypatch.setenv("PYTRAIN_TRITON_CPU", "1")
    return "cpu"


def reference_attention(q, k, v, bounds, causal, scale):
    """Plain attention per packed sequence computed in q's own dtype: float64 gives the oracle, and 16-bit
    gives "PyTorch's same-dtype error" of the tolerance rule (reference.attention would upcast to fp32)."""
    outs = []
    for start, end in itertools.pairwise(bounds):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        group = qs.shape[0] // ks.shape[0]
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        scores = (qs @ ks.transpose(-1, -2)) * scale
        if causal:
            n = end - start
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outs)


def packed_inputs(lengths, q_heads, kv_heads, head_dim, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v, dout = (
        torch.randn(total, h, head_dim, generator=g).to(dtype).to(device)
        for h in (q_heads, kv_heads, kv_heads, q_heads)
    )
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return q, k, v, dout, bounds


def grads(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))


def assert_matches_reference(fn, q, k, v, dout, bounds, causal, scale):
    got = grads(fn, q, k, v, dout)
    want = grads(
        lambda a, b, c: reference_attention(a, b, c, bounds, causal, scale),
        *(t.double() for t in (q, k, v)),
        dout.double(),
    )
    same_dtype = grads(lambda a, b, c: reference_attention(a, b, c, bounds, causal, scale), q, k, v, dout)
    for name, g, w, p in zip(("out", "dq", "dk", "dv"), got, want, same_dtype):
        assert g.dtype == q.dtype and g.shape == w.shape, name
        error = (g.double() - w).abs().max().item()
        torch_error = (p.double() - w).abs().max().item()
        assert error <= 2 * torch_error + FLOOR[q.dtype], f"{name}: error {error:.3g} vs PyTorch's {torch_error:.3g}"


UNEVEN = [1, 17, 5, 33, 2]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [32, 64, 128, 40])
def test_triton_varlen_head_dims(triton_device, causal, head_dim):
    q, k, v, dout, bounds = packed_inputs(UNEVEN, 2, 2, head_dim, torch.float32, triton_device)
    scale = head_dim**-0.5
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=triton_device)
    assert_matches_reference(
        lambda a, b, c: flash_attn_varlen_func(a, b, c, cu_seqlens, max(UNEVEN), causal=causal),
        q,
        k,
        v,
        dout,
        bounds,
        causal,
        scale,
    )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("ratio", [4, 8])
def test_triton_varlen_gqa(triton_device, causal, ratio):
    q, k, v, dout, bounds = packed_inputs([9, 1, 20], ratio, 1, 64, torch.float32, triton_device, seed=ratio)
    cu_seqlens = torch.tensor(bounds, device=triton_device)
    assert_matches_reference(
        lambda a, b, c: flash_attn_varlen_func(a, b, c, cu_seqlens, 20, causal=causal, softmax_scale=0.3),
        q,
        k,
        v,
        dout,
        bounds,
        causal,
        0.3,
    )


@pytest.mark.parametrize("causal", [False, True])
def test_triton_batched_layout(triton_device, causal):
    batch, seq, heads, head_dim = 2, 19, 4, 32
    q, k, v, dout, bounds = packed_inputs([seq] * batch, heads, 2, head_dim, torch.float32, triton_device, seed=3)
    shaped = [t.view(batch, seq, *t.shape[1:]) for t in (q, k, v, dout)]
    got = grads(lambda a, b, c: flash_attn_func(a, b, c, causal=causal), *shaped)
    want = grads(
        lambda a, b, c: reference_attention(a, b, c, bounds, causal, head_dim**-0.5),
        *(t.double() for t in (q, k, v)),
        dout.double(),
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g.reshape(w.shape).double(), w, rtol=1e-4, atol=FLOOR[torch.float32])


@pytest.mark.skipif(not CUDA, reason="16-bit Triton attention runs on the GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim,ratio", [(64, 1), (128, 4), (96, 8)])
def test_triton_16bit_on_gpu(dtype, causal, head_dim, ratio):
    lengths = [1, 300, 77, 1024, 129]
    q, k, v, dout, bounds = packed_inputs(lengths, 8, 8 // ratio, head_dim, dtype, "cuda")
    cu_seqlens = torch.tensor(bounds, device="cuda")
    assert_matches_reference(
        lambda a, b, c: flash_attn_varlen_func(a, b, c, cu_seqlens, max(lengths), causal=causal),
        q,
        k,
        v,
        dout,
        bounds,
        causal,
        head_dim**-0.5,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_path_varlen_and_gqa(dtype, causal):
    lengths = [1, 130, 64, 257]
    q, k, v, dout, bounds = packed_inputs(lengths, 8, 2, 64, dtype, "cpu", seed=7)
    cu_seqlens = torch.tensor(bounds)
    assert_matches_reference(
        lambda a, b, c: flash_attn_varlen_func(a, b, c, cu_seqlens, max(lengths), causal=causal),
        q,
        k,
        v,
        dout,
        bounds,
        causal,
        64**-0.5,
    )


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_path_batched(causal):
    q, k, v, dout, bounds = packed_inputs([96] * 2, 4, 4, 128, torch.float32, "cpu", seed=8)
    shaped = [t.view(2, 96, *t.shape[1:]) for t in (q, k, v, dout)]
    got = grads(lambda a, b, c: flash_attn_func(a, b, c, causal=causal), *shaped)
    want = grads(
        lambda a, b, c: reference_attention(a, b, c, bounds, causal, 128**-0.5),
        *(t.double() for t in (q, k, v)),
        dout.double(),
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g.reshape(w.shape).double(), w, rtol=1e-4, atol=FLOOR[torch.float32])


def test_triton_op_compiles_fullgraph_and_passes_opcheck(triton_device):
    q, k, v, _, bounds = packed_inputs([5, 11], 2, 1, 32, torch.float32, triton_device, seed=9)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=triton_device)
    torch.library.opcheck(
        torch.ops.pytrain.flash_attn_varlen_forward,
        (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu_seqlens, 11, True, 0.25),
    )
    torch._dynamo.reset()
    flat = (q.detach(), k.detach(), v.detach())
    compiled = torch.compile(
        lambda a, b, c: torch.ops.pytrain.flash_attn_varlen_forward(a, b, c, cu_seqlens, 11, True, 0.25)[0],
        fullgraph=True,
        backend="aot_eager",
    )
    torch.testing.assert_close(compiled(*flat), flash_attn_varlen_func(*flat, cu_seqlens, 11, True, 0.25))


def test_cpu_varlen_isolates_documents():
    q, k, v, _, bounds = packed_inputs([6, 6], 2, 2, 16, torch.float32, "cpu", seed=10)
    out = flash_attn_varlen_func(q, k, v, torch.tensor(bounds), 6)
    changed_k = k.clone()
    changed_k[6:] += 1  # the second document's keys: the first document must not notice
    torch.testing.assert_close(flash_attn_varlen_func(q, changed_k, v, torch.tensor(bounds), 6)[:6], out[:6])


@pytest.mark.parametrize(
    "args, error, match",
    [
        (dict(q=torch.randn(4, 3, 8)), ValueError, r"q heads \(3\) must be a multiple of k/v heads \(2\)"),
        (dict(q=torch.randn(4, 2, 8, dtype=torch.float64)), TypeError, "q has dtype torch.float64"),
        (dict(k=torch.randn(4, 2, 8).half()), TypeError, "q, k and v must share a dtype"),
        (dict(v=torch.randn(4, 1, 8)), ValueError, "k and v must have the same shape"),
        (dict(q=torch.randn(5, 2, 8)), ValueError, r"must agree on every dimension but heads"),
        (dict(q=torch.randn(4, 2, 8, 1)), ValueError, r"q must be \(total_tokens, heads, head_dim\)"),
        (dict(cu_seqlens=torch.tensor([0, 3, 2, 4])), ValueError, "cu_seqlens must be non-decreasing"),
        (dict(cu_seqlens=torch.tensor([0, 3])), ValueError, "end at the token count 4"),
        (dict(cu_seqlens=torch.tensor([0.0, 4.0])), TypeError, "cu_seqlens must be an int32 or int64 tensor"),
        (dict(cu_seqlens=torch.tensor([[0, 4]])), ValueError, "cu_seqlens must be 1-D"),
        (dict(max_seqlen=2), ValueError, r"max_seqlen \(2\) must be an int >= the longest sequence \(3\)"),
        (dict(softmax_scale=0.0), ValueError, "softmax_scale must be positive"),
        (
            dict(q=torch.randn(4, 2, 300), k=torch.randn(4, 2, 300), v=torch.randn(4, 2, 300)),
            ValueError,
            "head_dim must be within 1..256",
        ),
    ],
)
def test_bad_arguments(args, error, match):
    call = dict(
        q=torch.randn(4, 2, 8),
        k=torch.randn(4, 2, 8),
        v=torch.randn(4, 2, 8),
        cu_seqlens=torch.tensor([0, 1, 4], dtype=torch.int32),
        max_seqlen=3,
    )
    call.update(args)
    with pytest.raises(error, match=match):
        flash_attn_varlen_func(**call)


def test_batched_bad_layout():
    with pytest.raises(ValueError, match=r"q must be \(batch, seq, heads, head_dim\)"):
        flash_attn_func(torch.randn(4, 2, 8), torch.randn(4, 2, 8), torch.randn(4, 2, 8))
    x = torch.randn(1, 4, 2, 8).transpose(-1, -2)
    with pytest.raises(ValueError, match="q must have a contiguous last dimension"):
        flash_attn_func(x, x, x)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v, _, bounds = packed_inputs([7], 2, 2, 36, torch.float32, "cpu", seed=11)
    cu = torch.tensor(bounds)
    torch.testing.assert_close(
        flash_attn_varlen_func(q, k, v, cu, 7), flash_attn_varlen_func(q, k, v, cu, 7, softmax_scale=1 / math.sqrt(36))
    )


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("PYTRAIN_TRITON_CPU", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 too"):
        flash_attn_func(q, q, q)


@pytest.mark.parametrize("causal", [False, True])
def test_kernels_reference_attention_matches_the_oracle(causal):
    """pytrain.kernels.reference.attention (the model's use_flash_attn=False path) is the same math."""
    q, k, v, _, bounds = packed_inputs([3, 8], 4, 2, 16, torch.float64, "cpu", seed=12)
    torch.testing.assert_close(
        reference.attention(q, k, v, causal, 0.2, cu_seqlens=torch.tensor(bounds)),
        reference_attention(q, k, v, bounds, causal, 0.2),
    )
