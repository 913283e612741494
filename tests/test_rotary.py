"""Correctness of pytrain.kernels.apply_rotary / RotaryEmbedding against a float64 reference.

The oracle is `pytrain.kernels.reference.apply_rotary` on float64 copies of the very inputs the kernel
sees, with float64 angles; dq and dk come from autograd of that reference. Tolerances are per dtype,
below, and scale with the size of the expected values. CUDA tests are the same comparisons on "cuda",
skipped on machines without a GPU.
"""

import pytest
import torch
from host_syncs import count_host_reads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from markers import DEVICES

import pytrain.kernels
from pytrain.kernels import RopeScaling, RotaryEmbedding, _backend, apply_rotary, reference
from pytrain.kernels import rotary as rotary_module

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Error allowed against the float64 reference: |got - want| <= atol * scale + rtol * |want|, scale =
# max(1, max|want|): a rotated element is a difference of products as large as the pair's norm, so its
# rounding error is relative to that norm, not to the element. The kernels compute in fp32 from cos/sin
# rounded once to fp32 and round once to the output dtype: rtol ~1-2 ulps of the output dtype (bf16 2^-8,
# fp16 2^-11), atol absorbs the fp32 products. Measured: errors are <= ~1/2 of these bounds.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=1e-2, atol=4e-3),
    torch.float16: dict(rtol=2e-3, atol=5e-4),
}


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    tol = TOLERANCES[dtype]
    scale = max(1.0, want.abs().max().item() if want.numel() else 0.0)
    torch.testing.assert_close(
        got.detach().cpu().double(),
        want.detach().cpu().double(),
        rtol=tol["rtol"],
        atol=tol["atol"] * scale,
        msg=lambda m: f"{what} ({dtype}): {m}",
    )


def make_inputs(q_shape, k_shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, dq, dk = (
        torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)
        for shape in (q_shape, k_shape, q_shape, k_shape)
    )
    return q, k, dq, dk


def with_grads(fn, q, k, dq_out, dk_out, **kwargs):
    """fn(q, k, **kwargs) on leaf copies of q and k: (q_out, k_out, dq, dk)."""
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    q_out, k_out = fn(q, k, **kwargs)
    torch.autograd.backward((q_out, k_out), (dq_out, dk_out))
    return q_out.detach(), k_out.detach(), q.grad, k.grad


def reference_with_grads(q, k, dq_out, dk_out, positions=None, base=10000.0, interleaved=False):
    return with_grads(
        reference.apply_rotary,
        q.double(),
        k.double(),
        dq_out.double(),
        dk_out.double(),
        positions=positions,
        base=base,
        interleaved=interleaved,
    )


def check_against_reference(q_shape, k_shape, dtype, device, positions=None, base=10000.0, interleaved=False, seed=0):
    q, k, dq_out, dk_out = make_inputs(q_shape, k_shape, dtype, device, seed)
    got = with_grads(apply_rotary, q, k, dq_out, dk_out, positions=positions, base=base, interleaved=interleaved)
    want = reference_with_grads(q, k, dq_out, dk_out, positions, base, interleaved)
    for name, g, w in zip(("q_out", "k_out", "dq", "dk"), got, want):
        assert g.dtype == dtype and g.device == q.device, f"{name}: {g.dtype} on {g.device}"
        assert_close(g, w, dtype, name)
    return got


def packed_positions(doc_lengths, device="cpu"):
    """What a packed data loader gives: positions restart at 0 for every document."""
    return torch.cat([torch.arange(n) for n in doc_lengths]).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_extension_has_the_kernel(device):
    """Otherwise every comparison below would test the reference against itself."""
    ext = _backend.extension(torch.device(device))
    assert ext is not None and hasattr(ext, "rotary"), f"the {device} module lacks rotary: rebuild (pip install -e .)"


# ---------------------------------------------------------------------------------------------------
# Outputs, dq and dk against float64.

# (batch, seq, q_heads, k_heads, head_dim)
SHAPES = [
    (1, 1, 1, 1, 2),  # one token, one pair
    (2, 7, 8, 2, 64),  # GQA 4:1
    (3, 37, 8, 1, 96),  # multi-query, seq not a multiple of anything, head_dim not a power of two
    (1, 45, 4, 4, 80),  # head_dim 80: 40 pairs, not a multiple of a vector width
    (2, 5, 3, 2, 32),
    (1, 9, 2, 2, 128),
    (2, 0, 4, 2, 16),  # no tokens
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(shape, dtype, interleaved, device):
    batch, seq, q_heads, k_heads, head_dim = shape
    check_against_reference(
        (batch, seq, q_heads, head_dim), (batch, seq, k_heads, head_dim), dtype, device, interleaved=interleaved
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("k_heads", [2, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_with_restarting_positions(dtype, k_heads, interleaved, device):
    """Packed (tokens, heads, head_dim): each document rotates exactly as if it were alone in a batch."""
    docs = [5, 1, 17, 9]
    positions = packed_positions(docs, device)
    q_out, k_out, _, _ = check_against_reference(
        (sum(docs), 8, 64), (sum(docs), k_heads, 64), dtype, device, positions=positions, interleaved=interleaved
    )
    q, k, _, _ = make_inputs((sum(docs), 8, 64), (sum(docs), k_heads, 64), dtype, device)
    start = docs[0] + docs[1]
    alone_q, alone_k = apply_rotary(
        q[None, start : start + docs[2]], k[None, start : start + docs[2]], interleaved=interleaved
    )
    assert torch.equal(q_out[start : start + docs[2]], alone_q[0]) and torch.equal(
        k_out[start : start + docs[2]], alone_k[0]
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("positions_shape", ["seq", "batch-seq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_explicit_positions_4d(dtype, positions_shape, device):
    g = torch.Generator().manual_seed(3)
    shape = (11,) if positions_shape == "seq" else (3, 11)
    positions = torch.randint(0, 3000, shape, generator=g).to(device)
    check_against_reference((3, 11, 4, 64), (3, 11, 2, 64), dtype, device, positions=positions)


@pytest.mark.parametrize("device", DEVICES)
def test_int32_positions_equal_int64(device):
    q, k, _, _ = make_inputs((10, 4, 32), (10, 2, 32), torch.float32, device)
    positions = packed_positions([4, 6], device)
    got32 = apply_rotary(q, k, positions.int())
    got64 = apply_rotary(q, k, positions)
    assert all(torch.equal(a, b) for a, b in zip(got32, got64))


@pytest.mark.parametrize("device", DEVICES)
def test_large_positions_grow_the_table_and_keep_precision(device):
    """The table grows on demand; angles are float64 before rounding, so position ~1e6 is still exact to
    fp32 tolerance (fp32 angles would be off by ~0.06 rad there)."""
    positions = torch.tensor([0, 7, 5000, 70000, 1_000_003, (1 << 21) - 1], device=device)
    check_against_reference((6, 2, 8), (6, 1, 8), torch.float32, device, positions=positions)
    key = (positions.device, 8, 10000.0, RopeScaling(), None)  # no scaling, no length dependence
    table = rotary_module._tables.pop(key)  # 64 MB: not kept for later tests
    assert table.shape == (1 << 21, 8) and table.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("base", [500.0, 1e6, 10000])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_base(base, interleaved, device):
    got = check_against_reference(
        (2, 13, 4, 64), (2, 13, 4, 64), torch.float32, device, base=base, interleaved=interleaved
    )
    q, k, _, _ = make_inputs((2, 13, 4, 64), (2, 13, 4, 64), torch.float32, device)
    assert not torch.allclose(got[0], apply_rotary(q, k, base=base * 2, interleaved=interleaved)[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_threads_split_tokens(dtype, threads, num_threads):
    """Enough tokens that the CPU kernel splits them over threads (uneven chunks with 3)."""
    num_threads(threads)
    check_against_reference(
        (2, 301, 4, 64),
        (2, 301, 2, 64),
        dtype,
        "cpu",
        positions=torch.randint(0, 999, (2, 301), generator=torch.Generator().manual_seed(1)),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_strided_views_of_fused_qkv(interleaved, device):
    """q and k as split views of one qkv projection (as the model has them): no copy, same result, and
    gradients land in the right slices of qkv."""
    batch, seq, q_heads, kv_heads, head_dim = 2, 9, 4, 2, 32
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(batch, seq, q_heads + 2 * kv_heads, head_dim, generator=g).to(device).requires_grad_()
    q, k, v = qkv.split([q_heads, kv_heads, kv_heads], dim=2)
    assert not q.is_contiguous()
    dq_out, dk_out = torch.randn(q.shape, generator=g).to(device), torch.randn(k.shape, generator=g).to(device)
    q_out, k_out = apply_rotary(q, k, interleaved=interleaved)
    torch.autograd.backward((q_out, k_out), (dq_out, dk_out))
    want = reference_with_grads(
        q.detach().contiguous(), k.detach().contiguous(), dq_out, dk_out, interleaved=interleaved
    )
    for name, got, w in zip(
        ("q_out", "k_out", "dq", "dk"),
        (q_out, k_out, qkv.grad[:, :, :q_heads], qkv.grad[:, :, q_heads : q_heads + kv_heads]),
        want,
    ):
        assert_close(got, w, torch.float32, name)
    assert torch.equal(qkv.grad[:, :, q_heads + kv_heads :], torch.zeros_like(v))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_upstream_grads(device):
    """Gradients arriving expanded (from .sum()) or transposed are made dense before the backward."""
    q, k, _, _ = make_inputs((2, 6, 4, 16), (2, 6, 2, 16), torch.float32, device)
    dq_out = torch.ones_like(q)
    dk_out = torch.randn(2, 2, 6, 16, device=device).transpose(1, 2)
    want = reference_with_grads(q, k, dq_out, dk_out.contiguous())
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    q_out, k_out = apply_rotary(qg, kg)
    (q_out.sum() + (k_out * dk_out).sum()).backward()
    assert_close(qg.grad, want[2], torch.float32, "dq")
    assert_close(kg.grad, want[3], torch.float32, "dk")


@pytest.mark.parametrize("device", DEVICES)
def test_grad_of_one_input_only(device):
    q, k, dq_out, dk_out = make_inputs((1, 5, 4, 16), (1, 5, 1, 16), torch.float32, device)
    want = reference_with_grads(q, k, dq_out, dk_out)
    qg = q.clone().requires_grad_()
    q_out, k_out = apply_rotary(qg, k)
    torch.autograd.backward((q_out, k_out), (dq_out, dk_out))
    assert k.grad is None
    assert_close(qg.grad, want[2], torch.float32, "dq (k frozen)")


# ---------------------------------------------------------------------------------------------------
# In place.


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["4d", "packed"])
def test_inplace_modifies_inputs_and_equals_out_of_place(packed, dtype, device):
    shape_q, shape_k = ((20, 8, 64), (20, 2, 64)) if packed else ((2, 10, 8, 64), (2, 10, 2, 64))
    positions = packed_positions([12, 8], device) if packed else None
    q, k, _, _ = make_inputs(shape_q, shape_k, dtype, device)
    want_q, want_k = apply_rotary(q, k, positions, interleaved=True)
    q_in, k_in = q.clone(), k.clone()
    got_q, got_k = apply_rotary(q_in, k_in, positions, interleaved=True, inplace=True)
    assert got_q is q_in and got_k is k_in
    assert torch.equal(q_in, want_q) and torch.equal(k_in, want_k)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_on_qkv_views_leaves_v_alone(device):
    qkv = torch.randn(2, 5, 8, 16, device=device)
    before = qkv.clone()
    q, k, _v = qkv.split([4, 2, 2], dim=2)
    want_q, want_k = apply_rotary(q, k)
    apply_rotary(q, k, inplace=True)
    assert torch.equal(qkv[:, :, :4], want_q) and torch.equal(qkv[:, :, 4:6], want_k)
    assert torch.equal(qkv[:, :, 6:], before[:, :, 6:])


def test_inplace_refused_under_autograd_allowed_under_no_grad():
    q = torch.randn(1, 3, 2, 8, requires_grad=True)
    k = torch.randn(1, 3, 2, 8)
    with pytest.raises(ValueError, match=r"^inplace=True is refused while q or k requires grad"):
        apply_rotary(q, k, inplace=True)
    with pytest.raises(ValueError, match=r"^inplace=True is refused while q or k requires grad"):
        apply_rotary(k, q, inplace=True)
    with torch.no_grad():
        want = apply_rotary(q, k)
        got = apply_rotary(q, k, inplace=True)
    assert torch.equal(got[0], want[0]) and torch.equal(q.detach(), want[0])


def test_inplace_same_tensor_twice_is_refused():
    q = torch.randn(1, 3, 2, 8)
    with pytest.raises(ValueError, match=r"^inplace=True needs q and k in separate memory"):
        apply_rotary(q, q, inplace=True)


def test_backward_is_rotation_by_minus_angle():
    """Rotating forward and then by the backward (the inverse op) gives the input back."""
    q, k, _, _ = make_inputs((2, 33, 4, 64), (2, 33, 2, 64), torch.float32, "cpu")
    q_out, k_out = apply_rotary(q, k)
    back_q, back_k = torch.ops.pytrain.rotary(q_out, k_out, None, 10000.0, False, True, 0, *RopeScaling().op_args())
    torch.testing.assert_close(back_q, q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back_k, k, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Property tests.


@st.composite
def rotary_cases(draw, max_tokens=40, max_heads=6):
    packed = draw(st.booleans())
    head_dim = 2 * draw(st.integers(1, 80))
    q_heads = draw(st.integers(1, max_heads))
    k_heads = draw(st.sampled_from(sorted({1, q_heads, max(1, q_heads // 2)})))
    if packed:
        docs = draw(st.lists(st.integers(1, max_tokens // 4), min_size=1, max_size=4))
        tokens = (sum(docs),)
        positions = packed_positions(docs)
    else:
        tokens = (draw(st.integers(1, 3)), draw(st.integers(1, max_tokens // 3)))
        positions = draw(st.sampled_from([None, "seq", "batch-seq"]))
        if positions is not None:
            shape = tokens[1:] if positions == "seq" else tokens
            positions = torch.randint(0, 5000, shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    return dict(
        q_shape=(*tokens, q_heads, head_dim),
        k_shape=(*tokens, k_heads, head_dim),
        positions=positions,
        dtype=draw(st.sampled_from(DTYPES)),
        interleaved=draw(st.booleans()),
        base=draw(st.sampled_from([10000.0, 500.0, 1e6])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=rotary_cases())
def test_property_cpu(case):
    check_against_reference(device="cpu", **case)


@pytest.mark.cuda
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=rotary_cases(max_tokens=1200, max_heads=16))
def test_property_cuda(case):
    positions = case.pop("positions")
    check_against_reference(device="cuda", positions=None if positions is None else positions.cuda(), **case)


# ---------------------------------------------------------------------------------------------------
# RotaryEmbedding module and the model's use.


@pytest.mark.parametrize("device", DEVICES)
def test_module_equals_functional(device):
    rotary = RotaryEmbedding(32, base=500.0, interleaved=True)
    assert "32, base=500.0, interleaved=True" in repr(rotary)
    assert list(rotary.state_dict()) == []
    q, k, _, _ = make_inputs((6, 4, 32), (6, 2, 32), torch.bfloat16, device)
    positions = packed_positions([2, 4], device)
    got = rotary(q, k, positions)
    want = apply_rotary(q, k, positions, base=500.0, interleaved=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_module_rejects_odd_or_mismatched_head_dim():
    with pytest.raises(ValueError, match="positive even head_dim, got 7"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match=r"^q's head_dim 16 does not match this RotaryEmbedding's 32"):
        RotaryEmbedding(32)(torch.ones(1, 2, 1, 16), torch.ones(1, 2, 1, 16))


def test_model_packed_positions_equal_separate_documents():
    """The decoder's forward(ids, positions): two documents packed in one row give each document's own logits."""
    from pytrain.model.families import build_internlm

    torch.manual_seed(0)
    model = build_internlm(
        num_layers=1,
        hidden_size=64,
        num_attention_heads=4,
        num_kv_attention_heads=2,
        vocab_size=50,
        use_flash_attn=False,
    )
    ids = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        alone = model(ids[:, :5])
        packed = model(ids, positions=packed_positions([5, 7])[None])
        torch.testing.assert_close(packed[:, :5], alone)  # causal: the first document sees only itself
        assert not torch.allclose(packed[:, 5:], model(ids)[:, 5:])  # the second one starts again at 0


# ---------------------------------------------------------------------------------------------------
# Bad arguments: a TypeError / ValueError that names the argument, never a crash.

Q = torch.ones(2, 3, 4, 8)
K = torch.ones(2, 3, 2, 8)
P = torch.ones(6, 4, 8)  # packed q


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        (([1.0], K), {}, TypeError, r"^q must be a torch\.Tensor"),
        ((Q, None), {}, TypeError, r"^k must be a torch\.Tensor"),
        ((Q.double(), K.double()), {}, TypeError, r"^q has dtype torch\.float64"),
        ((Q.int(), K), {}, TypeError, r"^q has dtype torch\.int32"),
        ((Q, K.bfloat16()), {}, TypeError, r"^k has dtype torch\.bfloat16; it must match q's dtype"),
        ((torch.ones(3, 8), K), {}, ValueError, r"^q must be \(batch, seq, heads, head_dim\) or packed"),
        ((Q, torch.ones(1, 2, 3, 2, 8)), {}, ValueError, r"^k must be \(batch, seq, heads, head_dim\)"),
        (
            (torch.ones(2, 3, 4, 7), torch.ones(2, 3, 2, 7)),
            {},
            ValueError,
            r"^head_dim \(q\.shape\[-1\]\) must be even",
        ),
        ((torch.ones(2, 3, 4, 0), torch.ones(2, 3, 2, 0)), {}, ValueError, r"^head_dim .* got 0"),
        ((Q, torch.ones(2, 4, 2, 8)), {}, ValueError, r"^k's \(batch, seq\) \(2, 4\) must match q's \(2, 3\)"),
        ((Q, torch.ones(1, 3, 2, 8)), {}, ValueError, r"^k's \(batch, seq\) \(1, 3\) must match q's \(2, 3\)"),
        ((P, torch.ones(5, 2, 8)), {"positions": torch.arange(6)}, ValueError, r"^k's \(tokens,\) \(5,\) must match"),
        ((Q, torch.ones(2, 3, 2, 16)), {}, ValueError, r"^k's head_dim 16 must match q's head_dim 8"),
        ((Q, torch.ones(6, 2, 8)), {}, ValueError, r"^q and k must use the same layout"),
        (
            (torch.ones(2, 4, 3, 8).transpose(1, 2), K),
            {},
            ValueError,
            r"^q must be contiguous over \(heads, head_dim\)",
        ),
        (
            (Q, torch.ones(2, 3, 16)[..., ::2].reshape(2, 3, 1, 8).expand(2, 3, 2, 8)),
            {},
            ValueError,
            r"^k must be contiguous over \(heads, head_dim\)",
        ),
        ((Q, torch.ones(2, 3, 2, 16)[..., ::2]), {}, ValueError, r"^k must be contiguous over \(heads, head_dim\)"),
        ((P, torch.ones(6, 2, 8)), {}, ValueError, r"^positions is required for the packed layout"),
        (
            (Q, K),
            {"positions": [0, 1, 2]},
            TypeError,
            r"^positions must be a torch\.Tensor, a PackedSequences or None, got list",
        ),
        ((Q, K), {"positions": torch.arange(3.0)}, TypeError, r"^positions has dtype torch\.float32"),
        ((Q, K), {"positions": torch.arange(4)}, ValueError, r"^positions must have shape \(seq,\) or \(batch, seq\)"),
        ((Q, K), {"positions": torch.zeros(3, 2, dtype=torch.long)}, ValueError, r"^positions must have shape"),
        (
            (P, torch.ones(6, 2, 8)),
            {"positions": torch.zeros(2, 3, dtype=torch.long)},
            ValueError,
            r"^positions must have shape \(tokens,\) = \(6,\), got \(2, 3\)",
        ),
        (
            (Q, K),
            {"positions": torch.tensor([0, -1, 2])},
            ValueError,
            r"^positions must lie in \[0, 2097152\), got .*-1",
        ),
        ((Q, K), {"positions": torch.tensor([0, 1, 1 << 21])}, ValueError, r"^positions must lie in \[0, 2097152\)"),
        ((Q, K), {"base": 0.0}, ValueError, r"^base must be a positive finite number, got 0\.0"),
        ((Q, K), {"base": -1.0}, ValueError, r"^base must be a positive finite number"),
        ((Q, K), {"base": float("inf")}, ValueError, r"^base must be a positive finite number"),
        ((Q, K), {"base": None}, ValueError, r"^base must be a positive finite number, got None"),
        ((Q, K.to("meta")), {}, ValueError, r"^tensors must be on one device: q on cpu, k on meta"),
        (
            (Q, K),
            {"positions": torch.arange(3, device="meta")},
            ValueError,
            r"^tensors must be on one device: q on cpu, positions on meta",
        ),
    ],
    ids=[
        "q-list",
        "k-none",
        "float64",
        "q-int",
        "k-dtype",
        "q-2d",
        "k-5d",
        "head_dim-odd",
        "head_dim-0",
        "seq-mismatch",
        "batch-mismatch",
        "tokens-mismatch",
        "head_dim-mismatch",
        "layout-mismatch",
        "q-transposed",
        "k-expanded-heads",
        "k-strided-head_dim",
        "packed-no-positions",
        "positions-list",
        "positions-float",
        "positions-length",
        "positions-2d-wrong",
        "positions-packed-2d",
        "positions-negative",
        "positions-too-large",
        "base-0",
        "base-negative",
        "base-inf",
        "base-none",
        "devices",
        "positions-device",
    ],
)
def test_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        apply_rotary(*args, **kwargs)


def test_meta_device_shapes():
    """Meta tensors have no kernel and take the reference path: shapes and dtypes only."""
    q, k = (
        torch.empty(2, 5, 4, 8, device="meta", dtype=torch.bfloat16),
        torch.empty(2, 5, 2, 8, device="meta", dtype=torch.bfloat16),
    )
    q_out, k_out = apply_rotary(q, k)
    assert q_out.device.type == "meta" and q_out.shape == q.shape and k_out.shape == k.shape
    assert q_out.dtype == torch.bfloat16


@pytest.mark.cuda
def test_cuda_cpu_mix_is_rejected():
    with pytest.raises(ValueError, match=r"^tensors must be on one device: q on cuda:0, k on cpu"):
        apply_rotary(torch.ones(1, 2, 2, 8, device="cuda"), torch.ones(1, 2, 2, 8))
    with pytest.raises(ValueError, match=r"^tensors must be on one device: q on cuda:0, positions on cpu"):
        apply_rotary(torch.ones(4, 2, 8, device="cuda"), torch.ones(4, 2, 8, device="cuda"), torch.arange(4))


# ---------------------------------------------------------------------------------------------------
# torch.library registration and torch.compile.


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_positions", [False, True], ids=["no-positions", "positions"])
def test_opcheck(with_positions, device):
    """torch.library's own checks: schema, fake (meta) impl, autograd registration, AOT dispatch."""
    q, k, _, _ = make_inputs((2, 5, 4, 16), (2, 5, 2, 16), torch.float32, device)
    positions = torch.randint(0, 50, (2, 5), device=device) if with_positions else None
    plain, dynamic = RopeScaling().op_args(), RopeScaling("dynamic", 2.0, max_position_embeddings=8).op_args()
    torch.library.opcheck(
        torch.ops.pytrain.rotary.default,
        (q.requires_grad_(), k.requires_grad_(), positions, 500.0, True, False, 0, *plain),
    )
    torch.library.opcheck(  # rows known on the host (a PackedSequences' max_seqlen): no range check in the op
        torch.ops.pytrain.rotary.default, (q, k, positions, 500.0, True, False, 50, *dynamic)
    )
    torch.library.opcheck(
        torch.ops.pytrain.rotary_.default,
        (q.detach().clone(), k.detach().clone(), positions, 500.0, False, False, 0, *plain),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_matches_eager(device):
    """One graph with no breaks (packed positions included), forward and backward equal to eager."""
    torch._dynamo.reset()
    q, k, dq_out, dk_out = make_inputs((14, 4, 32), (14, 2, 32), torch.float32, device)
    positions = packed_positions([6, 8], device)

    def f(q, k, positions):
        q_out, k_out = apply_rotary(q * 1.0, k, positions, base=500.0)
        return q_out * 2.0, k_out

    compiled = torch.compile(f, fullgraph=True)
    eager = with_grads(f, q, k, dq_out, dk_out, positions=positions)
    got = with_grads(compiled, q, k, dq_out, dk_out, positions=positions)
    for name, e, g in zip(("q_out", "k_out", "dq", "dk"), eager, got):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_torch_compile_inplace_and_dynamic_shapes():
    """fullgraph with dynamic shapes (the fake impls must be shape-generic) and the mutating op."""
    torch._dynamo.reset()

    def rotate_in_place(q, k):
        return apply_rotary(q, k, inplace=True)

    compiled = torch.compile(rotate_in_place, fullgraph=True, dynamic=True, backend="aot_eager")
    for seq in (3, 8):
        q, k, _, _ = make_inputs((2, seq, 4, 16), (2, seq, 1, 16), torch.bfloat16, "cpu")
        want = apply_rotary(q, k)
        with torch.no_grad():
            compiled(q, k)
        assert torch.equal(q, want[0]) and torch.equal(k, want[1])


# ---------------------------------------------------------------------------------------------------
# The plain-PyTorch fallback when a compiled module is missing.


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_fallback_matches_kernel(dtype, interleaved, extension_missing):
    positions = packed_positions([3, 9])
    q, k, dq_out, dk_out = make_inputs((12, 4, 48), (12, 2, 48), dtype, "cpu")
    fallback = with_grads(apply_rotary, q, k, dq_out, dk_out, positions=positions, interleaved=interleaved)
    want = reference_with_grads(q, k, dq_out, dk_out, positions, interleaved=interleaved)
    for name, f, w in zip(("q_out", "k_out", "dq", "dk"), fallback, want):
        assert f.dtype == dtype
        assert_close(f, w, dtype, f"fallback {name}")
    with torch.no_grad():
        q_in, k_in = q.clone(), k.clone()
        apply_rotary(q_in, k_in, positions, interleaved=interleaved, inplace=True)
    assert torch.equal(q_in, fallback[0]) and torch.equal(k_in, fallback[1])


def test_fallback_compile(extension_missing):
    torch._dynamo.reset()
    q, k, _, _ = make_inputs((1, 6, 2, 16), (1, 6, 1, 16), torch.float32, "cpu")
    compiled = torch.compile(apply_rotary, fullgraph=True, backend="aot_eager")
    got = compiled(q, k)
    want = reference.apply_rotary(q.double(), k.double())
    assert_close(got[0], want[0], torch.float32, "compiled q_out")
    assert_close(got[1], want[1], torch.float32, "compiled k_out")


def test_package_exports():
    assert pytrain.kernels.apply_rotary is apply_rotary and pytrain.kernels.RotaryEmbedding is RotaryEmbedding


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["packed", "batched"])
def test_packed_sequences_give_positions_without_host_reads(device, layout, forbid_host_reads):
    """apply_rotary(q, k, PackedSequences) equals the positions tensor it stands for, forward and backward, and
    reads nothing back to the host (a tensor of positions is range-checked with one read-back per call)."""
    lengths = [5, 1, 10]
    packed = pytrain.kernels.PackedSequences([0, 5, 6, 16], device=device)
    shape = (16, 4, 32) if layout == "packed" else (2, 8, 4, 32)
    q, k = (torch.randn(*shape[:-2], h, 32, device=device).requires_grad_() for h in (4, 2))
    want = apply_rotary(q, k, packed_positions(lengths, device).view(shape[:-2]))
    dq_want, dk_want = torch.autograd.grad(want, (q, k), (torch.ones_like(want[0]), torch.ones_like(want[1])))
    with forbid_host_reads():
        got = apply_rotary(q, k, packed)
        dq, dk = torch.autograd.grad(got, (q, k), (torch.ones_like(got[0]), torch.ones_like(got[1])))
    for g, w in zip((*got, dq, dk), (*want, dq_want, dk_want)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    short = (slice(0, 14),) if layout == "packed" else (slice(None), slice(0, 7))
    with pytest.raises(ValueError, match="q holds 14 tokens, the PackedSequences 16"):
        apply_rotary(q.detach()[short], k.detach()[short], packed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(8,), (2, 8)], ids=["seq", "batch-seq"])
def test_checked_positions_read_back_once_not_per_call(device, shape, forbid_host_reads):
    """apply_rotary(q, k, CheckedPositions) equals the positions tensor it checked, forward and backward, and reads
    nothing back to the host: the range check (the cos/sin table's size) was made once, when it was built."""
    positions = torch.randint(0, 3000, shape, generator=torch.Generator().manual_seed(3)).to(device)
    q, k = (torch.randn(2, 8, h, 32, device=device).requires_grad_() for h in (4, 2))
    want = apply_rotary(q, k, positions)
    dq_want, dk_want = torch.autograd.grad(want, (q, k), (torch.ones_like(want[0]), torch.ones_like(want[1])))
    checked = pytrain.kernels.CheckedPositions(positions.int().cpu(), device=device)  # from the host's tensor
    assert checked.rows == int(positions.max()) + 1 and checked.positions.dtype == torch.int64
    assert checked.positions.device == q.device
    with forbid_host_reads():
        got = apply_rotary(q, k, checked)
        dq, dk = torch.autograd.grad(got, (q, k), (torch.ones_like(got[0]), torch.ones_like(got[1])))
    for g, w in zip((*got, dq, dk), (*want, dq_want, dk_want)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"positions must have shape \(seq,\) or \(batch, seq\)"):
        apply_rotary(q.detach()[:, :7], k.detach()[:, :7], checked)


def test_checked_positions_checks_its_tensor():
    with pytest.raises(ValueError, match=r"^positions must lie in \[0, 2097152\), got values in \[-1, 2\]"):
        pytrain.kernels.CheckedPositions(torch.tensor([0, 2, -1]))
    with pytest.raises(TypeError, match=r"positions has dtype torch\.float32"):
        pytrain.kernels.CheckedPositions(torch.zeros(3))
    with pytest.raises(ValueError, match=r"positions must be \(seq,\) or \(batch, seq\)"):
        pytrain.kernels.CheckedPositions(torch.zeros(1, 2, 3, dtype=torch.long))
    empty = pytrain.kernels.CheckedPositions(torch.zeros(0, dtype=torch.int32))
    assert empty.rows == 1 and repr(empty) == "CheckedPositions(shape=(0,), rows=1, device=cpu)"


@pytest.mark.parametrize("num_layers", [1, 3])
def test_model_checks_unpacked_positions_once_per_forward(num_layers):
    """A (batch, seq) positions tensor costs the decoder's forward and backward one read-back in all, whatever the
    number of layers (it was two per layer: each rotary call range-checked it, forward and backward); a
    CheckedPositions built from the host's tensor costs none."""
    from pytrain.model.families import build_internlm

    torch.manual_seed(0)
    model = build_internlm(
        num_layers=num_layers, hidden_size=64, num_attention_heads=4, vocab_size=50, use_flash_attn=False
    )
    ids = torch.randint(0, 50, (2, 12))
    positions = torch.arange(12).repeat(2, 1) + torch.tensor([[0], [7]])
    want = model(ids, positions=positions)
    want.sum().backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    checked = pytrain.kernels.CheckedPositions(positions)
    with count_host_reads() as reads:
        model(ids, positions=positions).sum().backward()
    assert reads == ["tolist"]
    with count_host_reads() as reads:
        got = model(ids, positions=checked)
        got.sum().backward()
    assert reads == []
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, w in zip((p.grad for p in model.parameters()), want_grads):
        torch.testing.assert_close(g, 2 * w)
