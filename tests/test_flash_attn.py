"""Flash-attention against a float64 reference: the Triton kernels (on CUDA, or under TRITON_INTERPRET=1
on the CPU, small shapes) and the CPU path (SDPA per document), outputs and dq/dk/dv.

Tolerance rule (flash-attention's own): the kernel's max error against the float64 reference is at most
2x the error of PyTorch's plain attention computed in the same dtype, plus a small absolute floor
(FLOOR, for fp32 where both errors are rounding noise). dq and dk also get the error the flash-attention
backward has by design: it takes D = rowsum(dO * O) from the output as rounded to the dtype, where plain
attention's autograd sums P * dP. In bf16 that alone can reach 0.05 on unit-variance inputs, while PyTorch's own
error happens to be far smaller when P is nearly one-hot (dP's rounding then cancels): hypothesis found such a
case (two tokens, head_dim 84). `output_rounding_error` computes that term exactly, in float64.
"""

import functools
import itertools
import json
import math
import os

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytrain.triton.flash_attn_triton import _lse_offsets, _tile_offsets

from pytrain.kernels import PackedSequences, flash_attn_func, flash_attn_varlen_func, reference

FLOOR = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


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
    assert_by_the_rule(grads(fn, q, k, v, dout), q, k, v, dout, bounds, causal, scale)


def output_rounding_error(attend, q, k, v, dout, out, dtype, scale):
    """Max error of (out, dq, dk, dv) that comes from the backward's D = rowsum(dO * O) reading O rounded to
    dtype (attend: the reference attention of these sequences; q, k, v, dout and out, the exact output, in
    float64). With delta = dO . (O - rounded O) per row, that D is off by delta, so dS = P * (dP - D) is off by
    P * delta: dq by scale * delta * (P @ k), which is attention with k as the values, and dk by
    scale * P^T @ (delta * q), which is attention's dv for the output gradient delta * q."""
    delta = (dout * (out - out.to(dtype).double())).sum(-1, keepdim=True)
    dq = scale * delta * attend(q, k, k)
    dk = scale * grads(attend, q, k, v, delta * q)[3]
    return 0.0, dq.abs().max().item(), dk.abs().max().item(), 0.0


def assert_by_the_rule(got, q, k, v, dout, bounds, causal, scale):
    """got: (out, dq, dk, dv) of packed q, k, v (tokens, heads, dim), by the module docstring's rule."""
    attend = functools.partial(reference_attention, bounds=bounds, causal=causal, scale=scale)
    exact = [t.double() for t in (q, k, v, dout)]
    want = grads(attend, *exact)
    same_dtype = grads(attend, q, k, v, dout)
    by_design = output_rounding_error(attend, *exact, want[0], q.dtype, scale)
    for name, g, w, p, d in zip(("out", "dq", "dk", "dv"), got, want, same_dtype, by_design):
        assert g.dtype == q.dtype and g.shape == w.shape, name
        error = (g.double() - w).abs().max().item()
        torch_error = (p.double() - w).abs().max().item()
        allowed = 2 * torch_error + d + FLOOR[q.dtype]
        assert error <= allowed, f"{name}: error {error:.3g} vs PyTorch's {torch_error:.3g} (+ {d:.3g} by design)"


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


# bf16 cannot be checked under Triton 3.9's interpreter (its bf16 tl.dot is wrong by orders of magnitude): fp16
# runs there, in CI, on short documents; bf16 runs on the GPU only (bench/gpu/run.sh), with the long documents.
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.cuda)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "head_dim,ratio",
    [(64, 1), pytest.param(128, 4, marks=pytest.mark.slow), pytest.param(96, 8, marks=pytest.mark.slow)],
)
def test_triton_16bit(triton_device, dtype, causal, head_dim, ratio):
    lengths = [1, 300, 77, 1024, 129] if triton_device == "cuda" else [1, 17, 20]
    q, k, v, dout, bounds = packed_inputs(lengths, 8, 8 // ratio, head_dim, dtype, triton_device)
    cu_seqlens = torch.tensor(bounds, device=triton_device)
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
        (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu_seqlens, 11, True, 0.25, 3),  # a window of 3
    )
    torch._dynamo.reset()
    flat = (q.detach(), k.detach(), v.detach())
    compiled = torch.compile(
        lambda a, b, c: torch.ops.pytrain.flash_attn_varlen_forward(a, b, c, cu_seqlens, 11, True, 0.25, -1)[0],
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
        (dict(cu_seqlens=torch.tensor([0.0, 4.0])), TypeError, "cu_seqlens must be a PackedSequences or an int32"),
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
    want = reference_attention(q, k, v, bounds, causal, 0.2)
    torch.testing.assert_close(reference.attention(q, k, v, causal, 0.2, cu_seqlens=torch.tensor(bounds)), want)
    torch.testing.assert_close(reference.attention(q, k, v, causal, 0.2, cu_seqlens=PackedSequences(bounds)), want)


class GridRecorder:
    """Stands in for a Triton kernel: records the grid of each launch instead of running it."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.grids.append(grid)


def test_grid_keeps_sequences_times_heads_on_axis_0(monkeypatch):
    """4,096 packed documents x 16 heads: 65,536 programs per block row, one more than CUDA allows on grid axes
    1 and 2 (Triton's launcher does not check; the GPU refuses with "invalid argument"). Every candidate tile of
    every kernel must put that product on axis 0."""
    from pytrain.triton import flash_attn_triton as fa

    kernels = {
        name: GridRecorder() for name in ("_fwd_kernel", "_bwd_preprocess", "_bwd_dkdv_kernel", "_bwd_dq_kernel")
    }
    for name, recorder in kernels.items():
        monkeypatch.setattr(fa, name, recorder)
    docs, heads, head_dim, max_seqlen = 4096, 16, 64, 3
    q = torch.zeros(docs, heads, head_dim)
    cu_seqlens = torch.arange(docs + 1, dtype=torch.int32)
    out, lse = fa.flash_attn_forward(q, q, q, cu_seqlens, max_seqlen, True, 0.125)
    fa.flash_attn_backward(q, q, q, q, out, lse, cu_seqlens, max_seqlen, True, 0.125)
    for name, kind in (("_fwd_kernel", "fwd"), ("_bwd_dkdv_kernel", "dkdv"), ("_bwd_dq_kernel", "dq")):
        (launch,) = kernels[name].grids
        for by_dtype in fa._TILES.values():
            for block_m, block_n, _, _ in (t for bucket in by_dtype[kind].values() for t in bucket):
                axis0, *rest = launch({"BLOCK_M": block_m, "BLOCK_N": block_n})
                assert axis0 == docs * heads and all(n <= fa.MAX_GRID_Y for n in rest), (name, block_m, block_n)
    (preprocess,) = kernels["_bwd_preprocess"].grids
    assert all(n <= fa.MAX_GRID_Y for n in preprocess[1:])


def test_grid_refuses_a_sequence_longer_than_cuda_allows():
    from pytrain.triton import flash_attn_triton as fa

    assert fa.grid(7, 65535 * 16, 16) == (7, 65535)
    with pytest.raises(ValueError, match="65536 blocks of 16 tokens, above CUDA's 65535 on a grid axis"):
        fa.grid(7, 65535 * 16 + 1, 16)


@triton.jit
def _offsets_kernel(Out, LseOut, first_token, stride_t, stride_h, head, total_tokens, BLOCK: tl.constexpr):
    """Writes the kernels' address arithmetic for a tile of BLOCK tokens from first_token."""
    tokens = first_token + tl.arange(0, BLOCK)
    dims = tl.arange(0, BLOCK)
    tl.store(
        Out + tl.arange(0, BLOCK)[:, None] * BLOCK + dims[None, :],
        _tile_offsets(tokens, head, stride_t, stride_h, dims),
    )
    tl.store(LseOut + dims, _lse_offsets(head, total_tokens, tokens))


def test_tile_offsets_are_int64_past_two_to_the_31(triton_device):
    """Past 524,288 tokens at 32 heads x 128 head_dim the offsets pass 2**31, where int32 wraps negative."""
    block, heads, head_dim = 16, 32, 128
    total = 524_288 + block
    got = torch.zeros(block, block, dtype=torch.int64, device=triton_device)
    got_lse = torch.zeros(block, dtype=torch.int64, device=triton_device)
    first, head = total - block, heads - 1
    _offsets_kernel[(1,)](got, got_lse, first, heads * head_dim, head_dim, head, 2**31 - 1, BLOCK=block)
    tokens = torch.arange(first, total, dtype=torch.int64)[:, None]
    want = tokens * heads * head_dim + head * head_dim + torch.arange(block)[None, :]
    assert want.min() >= 2**31
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)
    torch.testing.assert_close(got_lse.cpu(), head * (2**31 - 1) + tokens[:, 0], rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_triton_strided_tokens_past_two_to_the_31_elements(triton_device, causal):
    """q, k, v as views of one fused qkv buffer whose token stride (2**29 elements) puts the last token past
    2**31 elements: the kernels read them in place (no copy) and address them in int64. The buffer is 5 GiB of
    virtual memory, untouched except for the 5 tokens."""
    tokens, heads, head_dim, stride = 5, 2, 16, 1 << 29
    storage = torch.empty((tokens - 1) * stride + 3 * heads * head_dim, dtype=torch.float16, device=triton_device)
    qkv = storage.as_strided((tokens, 3 * heads, head_dim), (stride, head_dim, 1))
    qkv.copy_(torch.randn(tokens, 3 * heads, head_dim, generator=torch.Generator().manual_seed(13)).half())
    q, k, v = qkv.split([heads, heads, heads], dim=1)
    cu_seqlens = torch.tensor([0, 2, 5], dtype=torch.int32, device=triton_device)
    dout = torch.randn(tokens, heads, head_dim, generator=torch.Generator().manual_seed(14)).half().to(triton_device)
    got = grads(lambda a, b, c: flash_attn_varlen_func(a, b, c, cu_seqlens, 3, causal=causal), q, k, v, dout)
    want = grads(
        lambda a, b, c: flash_attn_varlen_func(a, b, c, cu_seqlens, 3, causal=causal),
        *(t.contiguous() for t in (q, k, v)),
        dout,
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_autotuning_candidates_per_dtype_and_head_dim():
    """What the GPU autotuner may pick (the interpreter always runs one small tile)."""
    from pytrain.triton import flash_attn_triton as fa

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fa, "_interpreting", lambda: False)
        assert all(m * n <= 32 * 32 for m, n, _, _ in fa.tiles("fwd", torch.float32, 128))
        assert {w for _, _, w, _ in fa.tiles("dkdv", torch.bfloat16, 128)} == {8}  # 4 warps spilled at d >= 96
        assert {s for _, _, _, s in fa.tiles("fwd", torch.float16, 64)} == {2, 3}
        assert fa.tiles("dq", torch.bfloat16, 256) == fa._TILES["16bit"]["dq"][256]
    assert fa.tiles("fwd", torch.bfloat16, 128) == [fa._TILE_INTERPRETER]


class LaunchRecorder:
    """Stands in for an autotuned Triton kernel: records each launch's arguments by name instead of running it."""

    def __init__(self, autotuner):
        self.autotuner, self.launches = autotuner, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append({**dict(zip(self.autotuner.arg_names, args)), **kwargs})

    def keys(self) -> list[tuple]:
        """Each launch's autotuning key, as triton.runtime.Autotuner.run makes it: the `key` arguments' values, then
        every tensor argument's dtype."""
        return [
            (
                *(launch[name] for name in self.autotuner.keys),
                *(str(v.dtype) for n, v in launch.items() if n in self.autotuner.arg_names and hasattr(v, "dtype")),
            )
            for launch in self.launches
        ]


def test_autotuning_keys_separate_sequence_lengths(monkeypatch):
    """A short test step's tuning is not reused for long sequences: the autotuner's key holds the power-of-two
    bucket of max_seqlen (from 128 to 16384), for the forward and both backward kernels."""
    from pytrain.triton import flash_attn_triton as fa

    kernels = {
        name: LaunchRecorder(getattr(fa, name)) for name in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel")
    }
    for name, recorder in kernels.items():
        monkeypatch.setattr(fa, name, recorder)
    monkeypatch.setattr(fa, "_bwd_preprocess", GridRecorder())
    q = torch.zeros(8, 4, 64, dtype=torch.bfloat16)
    cu_seqlens = torch.tensor([0, 8], dtype=torch.int32)
    lengths = (100, 2000, 3000, 4096, 5000, 100_000)
    for max_seqlen in lengths:
        out, lse = fa.flash_attn_forward(q, q, q, cu_seqlens, max_seqlen, True, 0.125)
        fa.flash_attn_backward(q, q, q, q, out, lse, cu_seqlens, max_seqlen, True, 0.125)
    for name, recorder in kernels.items():
        assert "seqlen_bucket" in recorder.autotuner.keys, name
        keys = dict(zip(lengths, recorder.keys()))
        assert keys[2000] != keys[3000] == keys[4096] != keys[5000], name  # buckets 2048, 4096, 8192
        bucket = recorder.autotuner.keys.index("seqlen_bucket")
        assert [key[bucket] for key in keys.values()] == [128, 2048, 4096, 4096, 8192, 16384], name


# The dK/dV kernel's 16-bit tiles compiled for sm_90 as a GQA training launch specializes them (pointers, strides,
# head_dim and the autotuning bucket divisible by 16; the head counts and token count not): ptxas's own report of
# registers and spills (Triton prints it with TRITON_DUMP_PTXAS_LOG=1; no GPU needed).
DKDV_SPILLS = """
import contextlib, io, json, re
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pytrain.triton import flash_attn_triton as fa

fn = fa._bwd_dkdv_kernel.fn
constexprs = ("CAUSAL", "TOKENS", "ONE_BLOCK", "BLOCK_M", "BLOCK_N", "BLOCK_D", "PRECISION")
token_pointers = ("QIndex", "QDocument", "KIndex", "KDocument")
for tokens in (False, True):  # cu_seqlens' sequences; ring attention's blocks with per-token masks
    signature = {}
    for name in fn.arg_names:
        if name in constexprs or (name in token_pointers and not tokens):
            signature[name] = "constexpr"
        elif name in ("Q", "K", "V", "DOut", "DK", "DV"):
            signature[name] = "*bf16"
        elif name in ("Lse", "Delta"):
            signature[name] = "*fp32"
        elif name in token_pointers:
            signature[name] = "*i64"
        else:
            signature[name] = {"CuSeqlens": "*i32", "scale": "fp32"}.get(name, "i32")
    aligned = [i for i, name in enumerate(fn.arg_names) if signature[name].startswith("*")
               or name.startswith("stride") or name in ("head_dim", "seqlen_bucket")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    for block_d, block_m, block_n, warps, stages in TILES:
        for causal in (False, True):
            values = {"CAUSAL": causal, "TOKENS": tokens, "ONE_BLOCK": tokens, "BLOCK_M": block_m,
                      "BLOCK_N": block_n, "BLOCK_D": block_d, "PRECISION": "tf32"}
            values.update({name: None for name in token_pointers if not tokens})
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                triton.compile(ASTSource(fn=fn, signature=signature, constexprs=values, attrs=attrs),
                               target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
            registers = int(re.search(r"Used (\\d+) registers", log.getvalue())[1])
            spills = int(re.search(r"(\\d+) bytes spill stores", log.getvalue())[1])
            print(json.dumps([block_d, block_m, block_n, warps, stages, causal, tokens, registers, spills]))
"""


@pytest.mark.slow
def test_dkdv_16bit_tiles_do_not_spill(tmp_path):
    """Every 16-bit dK/dV tile the autotuner may pick fits in registers, with and without the per-token masks (a
    spill goes to local memory on every iteration of the query loop). At head_dim 128, 64 x 32 with 8 warps and 2 stages spilled 64 bytes at 255
    registers with Triton 3.9 (not with 3.6); at 256, 32 x 32 with 2 stages spilled with both."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia", reason="triton without its NVIDIA backend")
    tiles = [(d, *tile) for d in (64, 128, 256) for tile in fa_tiles("dkdv", torch.bfloat16, d)]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTRAIN_TRITON_CPU")}
    env.update(TRITON_DEFAULT_FP_FUSION="1", TRITON_DUMP_PTXAS_LOG="1", TRITON_CACHE_DIR=str(tmp_path))  # ptxas runs
    script = f"TILES = {tiles!r}\n{DKDV_SPILLS}"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    compiled = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("[")]
    assert len(compiled) == 4 * len(tiles), done.stdout
    spilled = [c for c in compiled if c[-1]]
    assert not spilled, f"(BLOCK_D, BLOCK_M, BLOCK_N, warps, stages, causal, tokens, registers, spill bytes): {spilled}"


def fa_tiles(kernel, dtype, block_d):
    """The GPU's candidate tiles (this process runs the interpreter, which has its own)."""
    from pytrain.triton import flash_attn_triton as fa

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fa, "_interpreting", lambda: False)
        return fa.tiles(kernel, dtype, block_d)


@pytest.mark.parametrize("path", ["triton", "cpu"])
def test_packed_sequences_attention_without_host_reads(path, request, forbid_host_reads):
    """flash_attn_varlen_func(q, k, v, PackedSequences) equals the cu_seqlens tensor form, forward and backward,
    and reads nothing back to the host: the boundaries were checked once, when the PackedSequences was built."""
    device = request.getfixturevalue("triton_device") if path == "triton" else "cpu"
    q, k, v, dout, bounds = packed_inputs([6, 1, 13], 4, 2, 32, torch.float32, device, seed=15)
    packed = PackedSequences(bounds, device=device)
    want = grads(lambda a, b, c: flash_attn_varlen_func(a, b, c, torch.tensor(bounds, device=device)), q, k, v, dout)
    with forbid_host_reads():
        got = grads(lambda a, b, c: flash_attn_varlen_func(a, b, c, packed, causal=False), q, k, v, dout)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    with pytest.raises(ValueError, match="q holds 19 tokens, the PackedSequences 20"):
        flash_attn_varlen_func(q[:19], k[:19], v[:19], packed)
    with pytest.raises(ValueError, match=r"max_seqlen \(12\) must be an int >= the longest sequence \(13\)"):
        flash_attn_varlen_func(q, k, v, packed, 12)


def test_packed_sequences_checks_and_positions():
    packed = PackedSequences(torch.tensor([0, 3, 3, 7]))
    assert (packed.bounds, packed.max_seqlen, packed.total_tokens) == ((0, 3, 3, 7), 4, 7)
    assert packed.cu_seqlens.dtype == torch.int32 and packed.positions.tolist() == [0, 1, 2, 0, 1, 2, 3]
    for bad, error, match in [
        ([1, 4], ValueError, "must start at 0"),
        ([0], ValueError, "at least 2 entries"),
        ([0, 4, 2], ValueError, "non-decreasing"),
        ([0, 2.0], TypeError, "a list of ints or an int tensor"),
        (torch.tensor([0.0, 2.0]), TypeError, "1-D int32 or int64 tensor"),
    ]:
        with pytest.raises(error, match=match):
            PackedSequences(bad)


# ---------------------------------------------------------------------------------------------------
# One block with per-token masks (ring attention's blocks): q and k hold different tokens, each with a global index
# and a document id. Same tolerance rule as above (2x PyTorch's same-dtype error + FLOOR) against float64.


def block_mask(q_index, q_document, k_index, k_document, causal, window):
    """(queries, keys) bool: TokenMask's rule written out."""
    allowed = q_document[:, None] == k_document[None, :]
    if causal:
        allowed &= k_index[None, :] <= q_index[:, None]
    if window >= 0:
        allowed &= q_index[:, None] - k_index[None, :] <= window
    return allowed


def masked_block_attention(q, k, v, allowed, scale):
    """(out, lse (heads, queries)) of every query over the keys `allowed` lets it see, in q's dtype; a row seeing
    no key: out 0, lse -inf."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = scores.logsumexp(-1)
    probs = (scores - lse.masked_fill(lse == float("-inf"), 0.0)[..., None]).exp()
    return torch.einsum("hqk,khd->qhd", probs, v), lse


def block_inputs(queries, keys, q_heads, kv_heads, head_dim, dtype, device, seed, documents=3, index_dtype=torch.int64):
    """q, k, v, dout and a TokenMask's tensors: queries and keys get distinct random global indices among twice
    their count (an arbitrary split, as zigzag or random ones give), cut into `documents` packed documents."""
    from pytrain.triton.flash_attn_triton import TokenMask

    g = torch.Generator().manual_seed(seed)
    span = 2 * (queries + keys)
    chosen = torch.randperm(span, generator=g)[: queries + keys]
    q_index, k_index = chosen[:queries], chosen[queries:]
    bounds = torch.sort(torch.randperm(span - 1, generator=g)[: documents - 1] + 1).values
    q_document, k_document = torch.bucketize(q_index, bounds, right=True), torch.bucketize(k_index, bounds, right=True)
    q, k, v, dout = (
        torch.randn(n, h, head_dim, generator=g).to(dtype).to(device)
        for n, h in ((queries, q_heads), (keys, kv_heads), (keys, kv_heads), (queries, q_heads))
    )
    tokens = [t.to(device, index_dtype) for t in (q_index, q_document, k_index, k_document)]
    return q, k, v, dout, lambda causal, window: TokenMask(*tokens, causal, window)


def assert_block_matches_reference(q, k, v, dout, mask, scale):
    """flash_attn_block_forward / _backward (with the block's own lse and delta: the block is the whole attention)
    against float64, by the tolerance rule; out, lse and gradients finite, rows seeing no key out 0 and lse -inf."""
    from pytrain.triton.flash_attn_triton import flash_attn_block_backward, flash_attn_block_forward, softmax_delta

    if mask is None:
        allowed = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool)
    else:
        allowed = block_mask(*(t.cpu() for t in mask[:4]), mask.causal, mask.window)
    out, lse = flash_attn_block_forward(q, k, v, scale, mask, out_dtype=q.dtype)
    dq, dk, dv = flash_attn_block_backward(dout, q, k, v, lse, softmax_delta(out, dout), scale, mask)
    got = (out, dq, dk, dv)
    assert all(torch.isfinite(t).all() for t in got) and not lse.isnan().any()

    def reference(dtype):
        inputs = [t.detach().cpu().to(dtype).requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = masked_block_attention(*inputs, allowed, scale)
        grads = torch.autograd.grad(ref_out, inputs, dout.cpu().to(dtype))
        return (ref_out.detach(), *grads), ref_lse.detach()

    want, want_lse = reference(torch.float64)
    same_dtype, _ = reference(q.dtype)
    empty = ~allowed.any(1)
    assert (lse.cpu()[:, empty] == float("-inf")).all() and (out.cpu()[empty] == 0).all()
    torch.testing.assert_close(lse.cpu()[:, ~empty].double(), want_lse[:, ~empty], rtol=0, atol=1e-4)
    for name, g, w, p in zip(("out", "dq", "dk", "dv"), got, want, same_dtype):
        assert g.dtype == q.dtype and g.shape == w.shape, name
        error = (g.cpu().double() - w).abs().max().item()
        torch_error = (p.double() - w).abs().max().item()
        assert error <= 2 * torch_error + FLOOR[q.dtype], f"{name}: error {error:.3g} vs PyTorch's {torch_error:.3g}"
    return empty


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2")  # the interpreter's numpy, at lse -inf
@pytest.mark.parametrize(
    "dtype, causal, window",
    [
        (torch.float32, True, 6),
        (torch.float32, False, -1),
        (torch.float16, True, -1),
        pytest.param(torch.bfloat16, True, 6, marks=pytest.mark.cuda),  # the interpreter's bf16 dot: see above
    ],
)
def test_triton_block_token_masks(triton_device, dtype, causal, window):
    """Uneven query and key counts (not tile multiples), GQA 2:1, head_dim 24; random global indices and packed
    documents (5): with causal some rows see no key of the block."""
    q, k, v, dout, mask = block_inputs(21, 13, 2, 1, 24, dtype, triton_device, seed=16, documents=5)
    empty = assert_block_matches_reference(q, k, v, dout, mask(causal, window), 0.3)
    assert not empty.all() and (empty.any() or not causal)


def test_triton_block_without_mask(triton_device):
    """mask None: every query sees every key (ring attention's full pairs)."""
    q, k, v, dout, _ = block_inputs(20, 9, 2, 1, 16, torch.float32, triton_device, seed=17)
    assert not assert_block_matches_reference(q, k, v, dout, None, 0.25).any()


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2")
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    queries=st.integers(1, 24),
    keys=st.integers(1, 24),
    kv_heads=st.integers(1, 2),
    group=st.integers(1, 2),
    head_dim=st.sampled_from([8, 16, 40]),
    documents=st.integers(1, 4),
    causal=st.booleans(),
    window=st.integers(-1, 10),
    index_dtype=st.sampled_from([torch.int32, torch.int64]),
    seed=st.integers(0, 2**16),
)
def test_property_triton_block_token_masks(
    triton_device, queries, keys, kv_heads, group, head_dim, documents, causal, window, index_dtype, seed
):
    """Random shapes (1..24 queries and keys), heads, documents, masks and index dtypes; fp32. Few examples: the
    interpreter takes about a second each."""
    q, k, v, dout, mask = block_inputs(
        queries, keys, kv_heads * group, kv_heads, head_dim, torch.float32, triton_device, seed, documents, index_dtype
    )
    assert_block_matches_reference(q, k, v, dout, mask(causal, window), head_dim**-0.5)
