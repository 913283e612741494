"""The mixture-of-experts kernels against plain-PyTorch references: moe_permute / moe_unpermute and grouped_mm.

Every backend runs: the C++ CPU kernels (pytrain._C), the "loop" and "torch" (torch._grouped_mm) GEMMs, the
Triton kernels (on the GPU, or under TRITON_INTERPRET=1 on the CPU, small shapes), and the plain-PyTorch
fallback used when pytrain._C is missing. The oracle is the reference in float64 on the very inputs the op sees.

Tolerances (|got - want| <= atol * scale + rtol * |want|; scale = max(1, the sum of |terms| behind an output)):
permute and its index are exact (a copy, a sort); sums and GEMMs accumulate in fp32 and round once to the
output dtype, so rtol is about 2 ulps of that dtype (fp32 1e-5, bf16 1e-2, fp16 2e-3) and atol absorbs fp32
accumulation (and, for bf16/fp16 gradients of x, the rounding of each copy's gradient before their sum).
"""

import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from markers import DEVICES

import pytrain.kernels as K
from pytrain.kernels import grouped_mm, moe_permute, moe_unpermute, reference

# The modules themselves (pytrain.kernels' attributes of these names are the functions).
moe_permute_module = importlib.import_module("pytrain.kernels.moe_permute")
grouped_mm_module = importlib.import_module("pytrain.kernels.grouped_mm")

TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-2, atol=4e-3),
    torch.float16: dict(rtol=2e-3, atol=5e-4),
}
DTYPES = list(TOLERANCES)
DTYPE_IDS = ["f32", "bf16", "f16"]


@pytest.fixture(autouse=True)
def one_gemm_tile(monkeypatch):
    """GPU: the Triton GEMM runs its first tile untimed (each candidate costs a compile, and bench/gpu/run.sh's test
    step has a fixed budget); the large-shape tests autotune. The interpreter has one tile anyway."""
    monkeypatch.setenv("PYTRAIN_MOE_AUTOTUNE", "0")


@pytest.fixture
def gemm_impl(monkeypatch):
    def use(name: str):
        monkeypatch.setenv("PYTRAIN_GROUPED_MM", name)

    return use


def assert_close(got, want, dtype, what, scale=None):
    """got: the op's result; want: the float64 reference; scale: the sum of |terms| per element (or None)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    tol = TOLERANCES[dtype]
    bound = 1.0 if scale is None or scale.numel() == 0 else max(1.0, scale.abs().max().item())
    torch.testing.assert_close(
        got.double().cpu(),
        want.cpu(),
        rtol=tol["rtol"],
        atol=tol["atol"] * bound,
        msg=lambda m: f"{what} ({dtype}): {m}",
    )


def routing(tokens, top_k, experts, device, seed=0, drop=0.2, distinct=True, empty_expert=None):
    """expert_ids (tokens, top_k): distinct experts per token (top-k routing) or any, a fraction dropped (-1)."""
    g = torch.Generator().manual_seed(seed)
    if distinct and top_k <= experts:
        ids = torch.rand(tokens, experts, generator=g).argsort(1)[:, :top_k]
    else:
        ids = torch.randint(0, experts, (tokens, top_k), generator=g)
    if empty_expert is not None:
        ids = torch.where(ids == empty_expert, -1, ids)
    ids = torch.where(torch.rand(tokens, top_k, generator=g) < drop, -1, ids)
    return ids.to(device)


def floats(shape, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def leaf(t):
    return t.detach().clone().requires_grad_()


def leaf64(t):
    return t.detach().double().requires_grad_()


# ---------------------------------------------------------------------------------------------------
# The compiled kernels are really there (otherwise the CPU comparisons below would test the fallback).


def test_cpu_extension_has_the_moe_kernels():
    ext = moe_permute_module._cpu_extension
    assert ext is not None and all(hasattr(ext, f) for f in ("moe_route", "moe_scatter", "moe_gather"))
    assert moe_permute_module._kernel_path(torch.device("cpu")) is moe_permute_module._KernelPath.CPP


def test_exported():
    assert K.moe_permute is moe_permute and K.moe_unpermute is moe_unpermute and K.grouped_mm is grouped_mm


# ---------------------------------------------------------------------------------------------------
# moe_permute / moe_unpermute against the reference, forward and backward.

# (tokens, top_k, experts, hidden, drop, empty_expert)
CASES = [
    (1, 1, 1, 1, 0.0, None),  # one token, one expert
    (1, 2, 4, 7, 0.0, None),  # T = 1, k = 2
    (37, 2, 5, 19, 0.2, 3),  # H not a multiple of 8, expert 3 gets no token
    (64, 4, 8, 33, 0.3, None),  # k = 4
    (50, 1, 3, 13, 0.0, 0),  # k = 1, expert 0 empty
    (20, 2, 4, 16, 1.0, None),  # every assignment dropped: N = 0
    (9, 3, 2, 8, 0.1, None),  # k > experts: a token sent twice to one expert
    (300, 2, 16, 1100, 0.1, None),  # H over one 1024-element accumulation chunk of the CPU kernel
    (0, 2, 4, 8, 0.0, None),  # no tokens
]
CASE_IDS = ["T1k1E1", "T1k2", "oddH-empty", "k4", "k1-empty0", "all-dropped", "k>E", "H1100", "T0"]


def permute_case(case, dtype, device, seed=0):
    tokens, top_k, experts, hidden, drop, empty = case
    ids = routing(tokens, top_k, experts, device, seed, drop, distinct=top_k <= experts, empty_expert=empty)
    x = floats((tokens, hidden), dtype, device, seed + 1)
    weights = torch.rand(tokens, top_k, generator=torch.Generator().manual_seed(seed + 2)).to(device)
    return x, ids, experts, weights


def check_permute(x, ids, experts, dtype, seed=0):
    """moe_permute's outputs exactly as the reference's; grad_x (the sum over copies) against float64."""
    xg = leaf(x)
    permuted, row_of, counts = moe_permute(xg, ids, experts)
    want_p, want_rows, want_counts = reference.moe_permute(x.double(), ids.cpu(), experts)
    assert permuted.dtype == x.dtype and row_of.dtype == torch.int64 and counts.dtype == torch.int64
    assert permuted.device == x.device and row_of.device == x.device and counts.device == x.device
    assert torch.equal(row_of.cpu(), want_rows) and torch.equal(counts.cpu(), want_counts)
    assert torch.equal(permuted.double().cpu(), want_p.cpu().double())
    grad = floats(permuted.shape, dtype, x.device, seed + 3)
    (grad_x,) = torch.autograd.grad(permuted, xg, grad) if permuted.numel() else (None,)
    x64 = leaf64(x.cpu())
    p64, _, _ = reference.moe_permute(x64, ids.cpu(), experts)
    if grad_x is not None:
        (want_grad_x,) = torch.autograd.grad(p64, x64, grad.double().cpu())
        assert_close(grad_x, want_grad_x, dtype, "grad_x", scale=want_grad_x.abs())
    return permuted, row_of, counts


def check_unpermute(expert_out, row_of, weights, dtype, seed=0):
    """y, grad_expert_out and grad_weights against float64."""
    eo, w = leaf(expert_out), leaf(weights)
    y = moe_unpermute(eo, row_of, w)
    assert y.dtype == expert_out.dtype and y.device == expert_out.device
    eo64, w64 = leaf64(expert_out.cpu()), leaf64(weights.cpu())
    y64 = reference.moe_unpermute(eo64, row_of.cpu(), w64)
    kept = (row_of >= 0).cpu()
    padded = torch.cat([eo64.detach(), eo64.new_zeros(1, eo64.shape[1])])  # row N: a zero row for dropped slots
    rows = padded[torch.where(kept, row_of.cpu(), eo64.shape[0])]
    terms = (rows.abs() * (w64.detach().abs() * kept)[..., None]).sum(1)  # sum_j |w| |row|
    assert_close(y, y64, dtype, "y", scale=terms)
    grad_y = floats(y.shape, dtype, y.device, seed + 4)
    got = torch.autograd.grad(y, (eo, w), grad_y)
    want = torch.autograd.grad(y64, (eo64, w64), grad_y.double().cpu())
    assert got[0].dtype == expert_out.dtype and got[1].dtype == weights.dtype
    assert_close(got[0], want[0], dtype, "grad_expert_out", scale=want[0].abs())
    dot_terms = (grad_y.double().cpu().abs()[:, None, :] * rows.abs()).sum(-1)  # sum_h |grad_y| |row|
    assert_close(got[1], want[1], torch.float32 if weights.dtype == torch.float32 else dtype, "grad_weights", dot_terms)
    assert torch.equal(got[1].cpu()[~kept], torch.zeros_like(got[1].cpu()[~kept]))  # dropped slots: no gradient


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_permute_unpermute_match_reference(case, dtype, device):
    x, ids, experts, weights = permute_case(case, dtype, device)
    permuted, row_of, _ = check_permute(x, ids, experts, dtype)
    expert_out = floats(permuted.shape, dtype, device, 5)
    check_unpermute(expert_out, row_of, weights, dtype)


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_expert_ids_int32_and_int64(ids_dtype):
    x, ids, experts, _ = permute_case(CASES[3], torch.float32, "cpu")
    check_permute(x, ids.to(ids_dtype), experts, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weights_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_unpermute_weights_of_any_float_dtype(weights_dtype, device):
    """Routing weights in another dtype: computed in fp32, their gradient comes back in their own dtype."""
    x, ids, experts, weights = permute_case(CASES[2], torch.bfloat16, device)
    _, row_of, _ = moe_permute(x, ids, experts)
    expert_out = floats((int((row_of >= 0).sum()), x.shape[1]), torch.bfloat16, device, 5)
    check_unpermute(expert_out, row_of, weights.to(weights_dtype), torch.bfloat16)


# Work enough for 3 threads (csrc/cpu/moe_permute.cpp: 2^18 assignments, 2^20 row elements per thread): of
# the counting sort (900k assignments of 1-element rows), of the row moves (30k tokens x 2 x 64 elements).
THREADED_CASES = {"sort": (300_000, 3, 8, 1, 0.1, None), "rows": (30_000, 2, 8, 64, 0.1, None)}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("work", list(THREADED_CASES))
def test_cpu_threads_split_tokens(dtype, threads, work, num_threads):
    """Enough work that the counting sort or the row moves split over threads (uneven with 3)."""
    num_threads(threads)
    x, ids, experts, weights = permute_case(THREADED_CASES[work], dtype, "cpu")
    permuted, row_of, _ = check_permute(x, ids, experts, dtype)
    check_unpermute(floats(permuted.shape, dtype, "cpu", 5), row_of, weights, dtype)


def test_unpermute_of_permute_with_normalized_weights_is_identity():
    """Weights summing to 1 over each token's kept slots bring every token with a kept slot back unchanged."""
    x, ids, experts, _ = permute_case((40, 3, 6, 24, 0.3, None), torch.float32, "cpu")
    permuted, row_of, _ = moe_permute(x, ids, experts)
    kept = (row_of >= 0).float()
    weights = kept / kept.sum(1, keepdim=True).clamp(min=1)
    y = moe_unpermute(permuted, row_of, weights)
    has_row = kept.sum(1) > 0
    torch.testing.assert_close(y[has_row], x[has_row], rtol=1e-6, atol=1e-6)
    assert torch.equal(y[~has_row], torch.zeros_like(y[~has_row]))


def test_grad_of_weights_only():
    """expert_out without requires_grad: only the weights' gradient is asked for (and the other way round)."""
    x, ids, experts, weights = permute_case(CASES[2], torch.float32, "cpu")
    permuted, row_of, _ = moe_permute(x, ids, experts)
    w = leaf(weights)
    (gw,) = torch.autograd.grad(moe_unpermute(permuted, row_of, w).sum(), w)
    w64 = leaf64(weights)
    (want,) = torch.autograd.grad(reference.moe_unpermute(permuted.double(), row_of, w64).sum(), w64)
    torch.testing.assert_close(gw.double(), want, rtol=1e-5, atol=1e-4)
    eo = leaf(permuted)
    (ge,) = torch.autograd.grad(moe_unpermute(eo, row_of, weights).sum(), eo)
    assert ge.shape == permuted.shape


# ---------------------------------------------------------------------------------------------------
# Properties: the index itself, independent of the reference.


def check_index_properties(ids, experts, x, permuted, row_of, counts):
    tokens, top_k = ids.shape
    flat_ids, flat_rows = ids.reshape(-1).long(), row_of.reshape(-1)
    kept = flat_ids >= 0
    assert torch.equal(flat_rows < 0, ~kept)
    n = int(kept.sum())
    assert permuted.shape == (n, x.shape[1])
    assert torch.equal(torch.sort(flat_rows[kept]).values, torch.arange(n))  # a bijection onto 0..N-1
    assert torch.equal(counts, torch.bincount(flat_ids[kept], minlength=experts))
    # Row r holds the expert whose block contains r (experts ascending) and the token it came from.
    expert_of_row = torch.repeat_interleave(torch.arange(experts), counts)
    assert torch.equal(expert_of_row[flat_rows[kept]], flat_ids[kept])
    token = torch.arange(tokens).repeat_interleave(top_k)
    assert torch.equal(permuted[flat_rows[kept]], x[token[kept]])
    # Stable: within an expert, rows follow the flat order t * k + j.
    order = torch.argsort(flat_rows[kept])
    flat_index = torch.arange(tokens * top_k)[kept][order]
    same_expert = expert_of_row[1:] == expert_of_row[:-1]
    assert bool((flat_index[1:] > flat_index[:-1])[same_expert].all())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tokens=st.integers(1, 70),
    top_k=st.integers(1, 4),
    experts=st.integers(1, 9),
    hidden=st.integers(1, 40),
    drop=st.floats(0.0, 1.0),
    distinct=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_index(tokens, top_k, experts, hidden, drop, distinct, seed):
    ids = routing(tokens, top_k, experts, "cpu", seed, drop, distinct)
    x = floats((tokens, hidden), torch.float32, "cpu", seed)
    permuted, row_of, counts = moe_permute(x, ids, experts)
    check_index_properties(ids, experts, x, permuted, row_of, counts)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tokens=st.integers(1, 50),
    top_k=st.integers(1, 4),
    experts=st.integers(1, 8),
    hidden=st.integers(1, 70),
    drop=st.floats(0.0, 1.0),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_property_against_reference(tokens, top_k, experts, hidden, drop, dtype, seed):
    x, ids, _, weights = permute_case((tokens, top_k, experts, hidden, drop, None), dtype, "cpu", seed)
    permuted, row_of, _ = check_permute(x, ids, experts, dtype, seed)
    check_unpermute(floats(permuted.shape, dtype, "cpu", seed + 7), row_of, weights, dtype, seed)


# ---------------------------------------------------------------------------------------------------
# grouped_mm against the reference: every implementation.

# (counts per expert, in_features K, out_features M)
GEMM_CASES = [
    ([1], 3, 5),  # one row, odd sizes
    ([5, 0, 10, 5], 24, 16),  # an expert without rows
    ([0, 0, 7], 8, 40),  # only the last expert has rows
    ([33, 1, 17, 2, 0, 9], 40, 24),  # several row tiles for one expert, tiny groups
    ([0, 0], 8, 8),  # N = 0
    ([3, 2], 0, 8),  # K = 0: zeros out, no kernel
]
GEMM_IDS = ["N1-odd", "empty-expert", "last-only", "six-experts", "N0", "K0"]


def aligned(case):
    """torch._grouped_mm needs 16-byte rows: K and M multiples of 8."""
    return case[1] % 8 == 0 and case[2] % 8 == 0


def check_grouped_mm(case, dtype, device, counts_device=None, seed=0):
    counts_list, in_features, out_features = case
    counts = torch.tensor(counts_list, device=counts_device or device)
    rows, experts = sum(counts_list), len(counts_list)
    x = floats((rows, in_features), dtype, device, seed, scale=0.5)
    weight = floats((experts, out_features, in_features), dtype, device, seed + 1, scale=0.5)
    xg, wg = leaf(x), leaf(weight)
    out = grouped_mm(xg, wg, counts)
    x64, w64 = leaf64(x.cpu()), leaf64(weight.cpu())
    want = reference.grouped_mm(x64, w64, counts.cpu())
    assert out.dtype == dtype and out.device == x.device
    assert_close(
        out, want, dtype, "out", scale=reference.grouped_mm(x64.detach().abs(), w64.detach().abs(), counts.cpu())
    )
    dy = floats(out.shape, dtype, device, seed + 2, scale=0.5)
    dx, dw = torch.autograd.grad(out, (xg, wg), dy)
    want_dx, want_dw = torch.autograd.grad(want, (x64, w64), dy.double().cpu())
    dy_abs = dy.double().cpu().abs()
    dx_scale = reference.grouped_mm(dy_abs, w64.detach().abs().transpose(1, 2), counts.cpu())
    assert_close(dx, want_dx, dtype, "dx", scale=dx_scale)
    dw_scale = torch.stack(
        [a.t() @ b for a, b in zip(dy_abs.split(counts_list), x64.detach().abs().split(counts_list))]
    )
    assert_close(dw, want_dw, dtype, "dweight", scale=dw_scale)
    for e, n in enumerate(counts_list):
        if n == 0:
            assert torch.equal(dw[e].cpu(), torch.zeros_like(dw[e].cpu())), f"expert {e} has no rows: zero gradient"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", GEMM_CASES, ids=GEMM_IDS)
@pytest.mark.parametrize("impl", ["auto", "loop", "torch"])
def test_grouped_mm_matches_reference(impl, case, dtype, gemm_impl):
    """The CPU implementations (CUDA: test_triton_grouped_mm and the cuda tests below)."""
    if impl == "torch" and not aligned(case):
        pytest.skip("torch._grouped_mm takes 16-byte aligned rows only")
    gemm_impl(impl)
    check_grouped_mm(case, dtype, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize(
    "case", [c for c in GEMM_CASES if aligned(c)], ids=[i for c, i in zip(GEMM_CASES, GEMM_IDS) if aligned(c)]
)
@pytest.mark.parametrize("impl", ["auto", "torch", "loop"])
def test_cuda_grouped_mm_bf16(impl, case, gemm_impl):
    """bfloat16 on CUDA: "auto" is torch._grouped_mm on sm90+ (else Triton)."""
    gemm_impl(impl)
    check_grouped_mm(case, torch.bfloat16, "cuda")


@pytest.mark.cuda
def test_grouped_mm_counts_on_the_host():
    """tokens_per_expert on the CPU for CUDA operands: copied to the device, same result."""
    check_grouped_mm(GEMM_CASES[3], torch.bfloat16, "cuda", counts_device="cpu")


def test_grouped_mm_int32_counts():
    case = GEMM_CASES[1]
    x = floats((20, 24), torch.float32, "cpu", 0)
    w = floats((4, 16, 24), torch.float32, "cpu", 1)
    counts = torch.tensor(case[0])
    torch.testing.assert_close(grouped_mm(x, w, counts.int()), grouped_mm(x, w, counts))


def test_grouped_mm_default_implementation():
    """The documented CPU defaults: torch._grouped_mm where its 16-byte row rule holds, else the loop."""
    x, w = torch.zeros(4, 8), torch.zeros(2, 8, 8)
    assert grouped_mm_module.implementation(x, w) == ("torch" if hasattr(torch, "_grouped_mm") else "loop")
    assert grouped_mm_module.implementation(x[:, :3].contiguous(), w[:, :, :3].contiguous()) == "loop"


@pytest.mark.cuda
def test_grouped_mm_default_implementation_cuda():
    x = torch.zeros(4, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.zeros(2, 64, 64, device="cuda", dtype=torch.bfloat16)
    fused = torch.cuda.get_device_capability() >= (9, 0)
    assert grouped_mm_module.implementation(x, w) == ("torch" if fused else "triton")
    assert grouped_mm_module.implementation(x.float(), w.float()) == "triton"
    assert grouped_mm_module.implementation(x[:, :60], w[:, :, :60]) == "triton"  # unaligned rows


# ---------------------------------------------------------------------------------------------------
# Triton kernels (the GPU, or the interpreter on the CPU: small shapes). bf16 tl.dot is wrong under Triton 3.9's
# interpreter (see test_flash_attn.py): bf16 GEMMs run on the GPU only; the permute kernels have no dot.

TRITON_GEMM_DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.cuda)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "case",
    [*(CASES[i] for i in (0, 2, 3, 5, 6)), (40, 2, 4, 1100, 0.1, None)],
    ids=[*(CASE_IDS[i] for i in (0, 2, 3, 5, 6)), "H1100"],  # H1100: two BLOCK_H chunks per row
)
def test_triton_permute_unpermute(triton_device, case, dtype):
    x, ids, experts, weights = permute_case(case, dtype, triton_device)
    assert moe_permute_module._kernel_path(x.device) is moe_permute_module._KernelPath.TRITON
    permuted, row_of, _ = check_permute(x, ids, experts, dtype)
    check_unpermute(floats(permuted.shape, dtype, triton_device, 5), row_of, weights, dtype)


@pytest.mark.parametrize("path", ["triton", "cpu"])
def test_permute_with_num_kept_reads_nothing_back(path, request, forbid_host_reads):
    """Given the count of kept assignments (num_kept), moe_permute sizes its rows without reading anything back (on a
    GPU a synchronization) and checks the count and the ids' range on the device instead: the same result."""
    device = request.getfixturevalue("triton_device") if path == "triton" else "cpu"
    x, ids, experts, _ = permute_case(CASES[3], torch.float32, device)
    want = moe_permute(x, ids, experts)
    kept = int((ids >= 0).sum())
    with forbid_host_reads():
        got = moe_permute(x, ids, experts, num_kept=kept)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    wrong_count = r"expert_ids must be in \[-1, 8\) with num_kept=" if path == "triton" else r"num_kept=\d+, but"
    with pytest.raises(ValueError, match=wrong_count):
        moe_permute(x, ids, experts, num_kept=kept - 1)
    with pytest.raises(ValueError, match=r"expert_ids must be in \[-1, 8\)"):
        moe_permute(x, torch.where(ids == 0, experts, ids), experts, num_kept=kept)


def test_triton_expert_ids_int32(triton_device):
    x, ids, experts, _ = permute_case(CASES[3], torch.float32, triton_device)
    check_permute(x, ids.to(torch.int32), experts, torch.float32)


@pytest.mark.parametrize("dtype", TRITON_GEMM_DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("case", GEMM_CASES, ids=GEMM_IDS)
def test_triton_grouped_mm(triton_device, case, dtype, gemm_impl):
    gemm_impl("triton")
    check_grouped_mm(case, dtype, triton_device)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_cuda_grouped_mm_large(impl, gemm_impl, monkeypatch):
    """Many row tiles per expert, uneven groups, an empty expert: the real tile sizes of the autotuner."""
    monkeypatch.setenv("PYTRAIN_MOE_AUTOTUNE", "1")
    gemm_impl(impl)
    check_grouped_mm(([700, 0, 1301, 64, 3, 980], 512, 768), torch.bfloat16, "cuda")


@pytest.mark.cuda
def test_cuda_permute_large():
    x, ids, experts, weights = permute_case((4096, 8, 64, 2048, 0.05, 5), torch.bfloat16, "cuda")
    permuted, row_of, _ = check_permute(x, ids, experts, torch.bfloat16)
    check_unpermute(floats(permuted.shape, torch.bfloat16, "cuda", 5), row_of, weights, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------
# Gradients of the references themselves (the oracle), in float64.


def test_gradcheck_references():
    x, ids, experts, weights = permute_case((6, 2, 3, 5, 0.2, None), torch.float64, "cpu")
    x64 = leaf(x)
    assert torch.autograd.gradcheck(lambda a: reference.moe_permute(a, ids, experts)[0], (x64,))
    _, row_of, _ = reference.moe_permute(x, ids, experts)
    eo = leaf(floats((int((row_of >= 0).sum()), 5), torch.float64, "cpu", 3))
    w = leaf(weights.double())
    assert torch.autograd.gradcheck(lambda a, b: reference.moe_unpermute(a, row_of, b), (eo, w))
    counts = torch.tensor([2, 0, 3])
    xs = leaf(floats((5, 4), torch.float64, "cpu", 4))
    ws = leaf(floats((3, 6, 4), torch.float64, "cpu", 5))
    assert torch.autograd.gradcheck(lambda a, b: reference.grouped_mm(a, b, counts), (xs, ws))


def test_reference_fallback_without_the_extension(monkeypatch):
    """Without pytrain._C the plain-PyTorch references run (and check the same values)."""
    x, ids, experts, weights = permute_case(CASES[2], torch.float32, "cpu")
    want_p, want_rows, want_counts = moe_permute(x, ids, experts)
    want_y = moe_unpermute(want_p, want_rows, weights)
    monkeypatch.setattr(moe_permute_module, "_cpu_extension", None)
    p, rows, counts = moe_permute(x, ids, experts)
    assert torch.equal(p, want_p) and torch.equal(rows, want_rows) and torch.equal(counts, want_counts)
    torch.testing.assert_close(moe_unpermute(p, rows, weights), want_y)
    with pytest.raises(ValueError, match="expert_ids must be in"):
        moe_permute(x, torch.full_like(ids, experts), experts)
    with pytest.raises(ValueError, match="exactly once"):
        moe_unpermute(p, torch.zeros_like(rows), weights)


# ---------------------------------------------------------------------------------------------------
# torch.library registration and torch.compile.


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, ids, experts, weights = permute_case(CASES[2], torch.float32, device)
    torch.library.opcheck(torch.ops.pytrain.moe_permute.default, (x.requires_grad_(), ids, experts))
    kept = int((ids >= 0).sum())  # given: the fake's row count is static
    torch.library.opcheck(torch.ops.pytrain.moe_permute.default, (x, ids, experts, kept))
    _, row_of, counts = moe_permute(x, ids, experts)
    eo = floats((int((row_of >= 0).sum()), x.shape[1]), torch.float32, device, 3)
    torch.library.opcheck(torch.ops.pytrain.moe_unpermute.default, (eo.requires_grad_(), row_of, weights, True))
    torch.library.opcheck(torch.ops.pytrain.moe_unpermute.default, (eo, row_of, None, False))
    grad_y = floats(x.shape, torch.float32, device, 4)
    for need in (True, False):
        torch.library.opcheck(
            torch.ops.pytrain.moe_unpermute_backward.default, (grad_y, eo.detach(), row_of, weights, need)
        )
    xg = floats((eo.shape[0], 8), torch.float32, device, 5).requires_grad_()
    wg = floats((experts, 16, 8), torch.float32, device, 6).requires_grad_()
    torch.library.opcheck(torch.ops.pytrain.grouped_mm.default, (xg, wg, counts))
    dy = floats((eo.shape[0], 16), torch.float32, device, 7)
    for need_dx, need_dw in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(
            torch.ops.pytrain.grouped_mm_backward.default, (dy, xg.detach(), wg.detach(), counts, need_dx, need_dw)
        )


def moe_layer(x, expert_ids, weights, w1, w3, w2, num_experts):
    """A SwiGLU mixture-of-experts layer through the three ops."""
    permuted, row_of, counts = moe_permute(x, expert_ids, num_experts)
    hidden = F.silu(grouped_mm(permuted, w1, counts)) * grouped_mm(permuted, w3, counts)
    return moe_unpermute(grouped_mm(hidden, w2, counts), row_of, weights)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    tokens, experts, hidden, ffn = 24, 4, 16, 32
    leaves = [
        floats((tokens, hidden), torch.float32, device, 0),
        None,
        torch.rand(tokens, 2, device=device),
        floats((experts, ffn, hidden), torch.float32, device, 1, 0.3),
        floats((experts, ffn, hidden), torch.float32, device, 2, 0.3),
        floats((experts, hidden, ffn), torch.float32, device, 3, 0.3),
    ]
    compiled = torch.compile(moe_layer, fullgraph=True)
    for seed in (0, 1):  # a second routing: another N, the same compiled graph (N is data-dependent)
        ids = routing(tokens, 2, experts, device, seed, drop=0.2)
        eager_in = [leaf(t) if t is not None else ids for t in leaves]
        compiled_in = [leaf(t) if t is not None else ids for t in leaves]
        want = moe_layer(*eager_in, experts)
        got = compiled(*compiled_in, experts)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        differentiable = [i for i, t in enumerate(leaves) if t is not None]
        grads = torch.autograd.grad(got.sum(), [compiled_in[i] for i in differentiable])
        want_grads = torch.autograd.grad(want.sum(), [eager_in[i] for i in differentiable])
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Bad input: an error naming the argument, never a crash.

X = torch.randn(6, 8)
IDS = torch.tensor([[0, 1], [1, 2], [2, -1], [0, 1], [1, 2], [-1, -1]])
W = torch.rand(6, 2)
P, ROWS, COUNTS = moe_permute(X, IDS, 3)


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((X.double(), IDS, 3), TypeError, "x has dtype"),
        ((X[0], IDS, 3), ValueError, "x must be"),
        ((X.t(), IDS, 3), ValueError, "x must be contiguous"),
        ((X, IDS.float(), 3), TypeError, "expert_ids has dtype"),
        ((X, IDS[:5], 3), ValueError, "expert_ids must have shape"),
        ((X, IDS[:, :0], 3), ValueError, "expert_ids must have shape"),
        ((X, IDS.reshape(-1), 3), ValueError, "expert_ids must have shape"),
        ((X, IDS.t().contiguous().t(), 3), ValueError, "expert_ids must be contiguous"),
        ((X, IDS, 2), ValueError, r"expert_ids must be in \[-1, 2\)"),
        ((X, IDS - 1, 3), ValueError, r"got values from -2"),
        ((X, IDS, 0), ValueError, "num_experts must be"),
        ((X, IDS, 3.0), ValueError, "num_experts must be"),
        ((X, IDS, True), ValueError, "num_experts must be"),
        (("x", IDS, 3), TypeError, "x must be a torch.Tensor"),
        ((X, IDS.to("meta"), 3), ValueError, "tensors must be on one device"),
        ((X, IDS, 3, -1), ValueError, r"num_kept must be None or an int in \[0, 12\]"),
        ((X, IDS, 3, 13), ValueError, r"num_kept must be None or an int in \[0, 12\]"),
        ((X, IDS, 3, 9.0), ValueError, "num_kept must be None or an int"),
        ((X, IDS, 3, 10), ValueError, "num_kept=10, but expert_ids holds 9 entries >= 0"),
    ],
)
def test_permute_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        moe_permute(*args)


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((P.double(), ROWS, W), TypeError, "expert_out has dtype"),
        ((P[0], ROWS, W), ValueError, "expert_out must be"),
        ((P, ROWS.int(), W), TypeError, "row_of has dtype"),
        ((P, ROWS, W.long()), TypeError, "weights has dtype"),
        ((P, ROWS, W[:5]), ValueError, "weights must have row_of's shape"),
        ((P, ROWS[:, :0], W[:, :0]), ValueError, "row_of must be"),
        ((P[:-1], ROWS, W), ValueError, r"row numbers of expert_out in \[0, 8\)"),
        ((P, torch.where(ROWS == 0, -2, ROWS), W), ValueError, "row_of must hold -1 or row numbers"),
        ((P, torch.where(ROWS == 0, 1, ROWS), W), ValueError, "exactly once"),
        ((P, torch.where(ROWS == 0, -1, ROWS), W), ValueError, "exactly once"),  # row 0 unnamed
        ((P, ROWS, "w"), TypeError, "weights must be a torch.Tensor"),
        ((P, ROWS, W.to("meta")), ValueError, "tensors must be on one device"),
        ((P, ROWS.to("meta"), W), ValueError, "tensors must be on one device"),
    ],
)
def test_unpermute_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        moe_unpermute(*args)


GX = torch.randn(9, 4)  # COUNTS sums to 9
GW = torch.randn(3, 5, 4)


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((GX.double(), GW, COUNTS), TypeError, "x has dtype"),
        ((GX[0], GW, COUNTS), ValueError, "x must be"),
        ((GX.t().contiguous().t(), GW, COUNTS), ValueError, "x must be contiguous"),
        ((GX, GW[0], COUNTS), ValueError, "weight must be"),
        ((GX, GW[:, :, :3], COUNTS), ValueError, "weight must be"),
        ((GX, GW.transpose(1, 2).contiguous().transpose(1, 2), COUNTS), ValueError, "weight must be contiguous"),
        ((GX, GW.half(), COUNTS), TypeError, "weight has dtype"),
        ((GX, GW, COUNTS.float()), TypeError, "tokens_per_expert has dtype"),
        ((GX, GW, COUNTS[:2]), ValueError, r"tokens_per_expert must have shape \(3,\)"),
        ((GX, GW, COUNTS + 1), ValueError, "sum to x's 9 rows"),
        ((GX, GW, torch.tensor([10, -1, 0])), ValueError, "non-negative"),
        ((GX, GW, [3, 3, 2]), TypeError, "tokens_per_expert must be a torch.Tensor"),
        ((GX, GW.to("meta"), COUNTS), ValueError, "tensors must be on one device"),
        ((GX, GW, COUNTS.to("meta")), ValueError, "on x's device"),
    ],
)
def test_grouped_mm_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        grouped_mm(*args)


def test_grouped_mm_bad_implementation_names(gemm_impl):
    gemm_impl("cublas")
    with pytest.raises(ValueError, match="PYTRAIN_GROUPED_MM='cublas' is not one of"):
        grouped_mm(GX, GW, COUNTS)
    gemm_impl("torch")
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        grouped_mm(torch.randn(9, 3), torch.randn(3, 5, 3), COUNTS)
    gemm_impl("triton")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="PYTRAIN_GROUPED_MM=triton needs a CUDA tensor"):
            grouped_mm(GX, GW, COUNTS)


@pytest.mark.cuda
def test_cuda_cpu_mix_is_rejected():
    with pytest.raises(ValueError, match="one device"):
        moe_permute(X.cuda(), IDS, 3)
    with pytest.raises(ValueError, match="one device"):
        moe_unpermute(P.cuda(), ROWS, W)
    with pytest.raises(ValueError, match="one device"):
        grouped_mm(GX.cuda(), GW, COUNTS)
    with pytest.raises(ValueError, match="on x's device"):
        grouped_mm(GX, GW, COUNTS.cuda())


@pytest.mark.cuda
def test_cuda_bad_values_fail_without_a_host_read():
    """On a GPU moe_unpermute's and grouped_mm's value checks are device-side assertions: run in a child
    process, since a failed assertion ruins the CUDA context."""
    import subprocess
    import sys

    code = (
        "import torch, pytrain.kernels as K\n"
        "x = torch.randn(8, 4, device='cuda'); w = torch.randn(3, 5, 4, device='cuda')\n"
        "K.grouped_mm(x, w, torch.tensor([1, 2, 3], device='cuda'))\n"
        "torch.cuda.synchronize()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0, done.stdout + done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs these tiles through the autotuner")
@pytest.mark.parametrize("tile", range(3))
def test_triton_gemm_gpu_tiles_under_the_interpreter(triton_device, tile):
    """Each GPU tile candidate of kernels/grouped_mm_triton.py (the interpreter otherwise runs 16 x 16 x 16 only), with
    groups smaller and larger than a tile and an empty one."""
    import triton

    from pytrain.triton import grouped_mm_triton as kernels

    block_m, block_n, block_k, _, _ = kernels._CONFIGS[tile]
    counts = [70, 0, 150, 3]
    rows, experts, in_features, out_features = sum(counts), len(counts), 72, 136
    x = floats((rows, in_features), torch.float32, "cpu", 0)
    weight = floats((experts, out_features, in_features), torch.float32, "cpu", 1)
    dy = floats((rows, out_features), torch.float32, "cpu", 2)
    offsets = torch.tensor(counts).cumsum(0).int()
    out = torch.empty(rows, out_features)
    grid = (triton.cdiv(rows, block_m) + experts, triton.cdiv(out_features, block_n))
    kernels._rows_kernel.fn[grid](
        x, weight, out, offsets, experts, in_features, out_features, 256, weight.stride(0), 1, in_features,
        E_POW2=4, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION="ieee",
    )  # fmt: skip
    dw = torch.empty_like(weight)
    grid = (experts, triton.cdiv(out_features, block_m), triton.cdiv(in_features, block_n))
    kernels._weight_grad_kernel.fn[grid](
        dy, x, dw, offsets, experts, out_features, in_features, 256,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION="ieee",
    )  # fmt: skip
    want = reference.grouped_mm(x.double(), weight.double(), torch.tensor(counts))
    want_dw = torch.stack([a.t() @ b for a, b in zip(dy.double().split(counts), x.double().split(counts))])
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dw.double(), want_dw, rtol=1e-5, atol=1e-4)
    assert torch.equal(dw[1], torch.zeros_like(dw[1]))


def test_gemm_autotuning_keys_separate_row_counts(monkeypatch):
    """A small test step's tuning is not reused for a large batch: the autotuner's key holds the power-of-two bucket
    of the row count (from 256 to 65536), for the row kernel (forward, dx) and the weight-gradient kernel."""
    from test_flash_attn import LaunchRecorder

    from pytrain.triton import grouped_mm_triton as kernels

    recorders = {name: LaunchRecorder(getattr(kernels, name)) for name in ("_rows_kernel", "_weight_grad_kernel")}
    for name, recorder in recorders.items():
        monkeypatch.setattr(kernels, name, recorder)
    weight = torch.zeros(4, 8, 16)
    row_counts = (100, 2000, 3000, 4096, 5000, 100_000)
    for rows in row_counts:
        x, dy = torch.zeros(rows, 16), torch.zeros(rows, 8)
        offsets = torch.tensor([rows // 4, rows // 2, rows // 2, rows], dtype=torch.int32)
        kernels.grouped_mm_forward(x, weight, offsets)
        kernels.grouped_mm_dweight(dy, x, offsets, 4)
    for name, recorder in recorders.items():
        assert "rows_bucket" in recorder.autotuner.keys, name
        keys = dict(zip(row_counts, recorder.keys()))
        assert keys[2000] != keys[3000] == keys[4096] != keys[5000], name  # buckets 2048, 4096, 8192
        bucket = recorder.autotuner.keys.index("rows_bucket")
        assert [key[bucket] for key in keys.values()] == [256, 2048, 4096, 4096, 8192, 65536], name


# Compiles every Triton kernel variant to sm_90 code on this machine (no GPU needed): the interpreter runs the
# kernels' logic but not Triton's compiler, whose type and layout rules only a real compile checks.
SM90_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pytrain.triton import grouped_mm_triton as G, moe_permute_triton as P

def build(fn, signature, constexprs, warps=4, stages=3):
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    assert kernel.asm["cubin"], fn

# Every tile in bf16; fp32 (exact "ieee" dots, the most registers) with the largest tile.
for dtype, precision, tiles in (("bf16", "tf32", G._CONFIGS), ("fp32", "ieee", G._CONFIGS[:1])):
    for m, n, k, warps, stages in tiles:
        tile = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "PRECISION": precision}
        build(G._rows_kernel.fn, {"A": "*" + dtype, "B": "*" + dtype, "C": "*" + dtype, "Offsets": "*i32",
              "num_groups": "i32", "inner": "i32", "out_cols": "i32", "rows_bucket": "i32", "stride_be": "i32",
              "stride_bk": "i32", "stride_bn": "i32", **{c: "constexpr" for c in ("E_POW2", *tile)}},
              {"E_POW2": 16, **tile}, warps, stages)
        build(G._weight_grad_kernel.fn, {"DY": "*" + dtype, "X": "*" + dtype, "DW": "*" + dtype, "Offsets": "*i32",
              "num_groups": "i32", "out_rows": "i32", "out_cols": "i32", "rows_bucket": "i32",
              **{c: "constexpr" for c in tile}}, tile, warps, stages)
for weights, dots in ((False, False), (True, True), (True, False)):
    flags = {"K_POW2": 8, "BLOCK_H": 512, "HAS_WEIGHTS": weights}
    build(P._scatter_kernel, {"TokensIn": "*bf16", "RowsIn": "*bf16", "RowsOut": "*bf16", "RowOf": "*i64",
          "Weights": "*fp32", "GradWeights": "*fp32", "top_k": "i32", "hidden": "i32",
          **{c: "constexpr" for c in (*flags, "DOTS")}}, {**flags, "DOTS": dots})
    build(P._gather_kernel, {"RowsIn": "*bf16", "TokensOut": "*bf16", "RowOf": "*i64", "Weights": "*fp32",
          "top_k": "i32", "hidden": "i32", **{c: "constexpr" for c in flags}}, flags)
print("compiled")
"""


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels compile for real in the tests above")
def test_triton_kernels_compile_for_sm90():
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia", reason="triton without its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTRAIN_TRITON_CPU")}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", SM90_COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stdout + done.stderr[-4000:]
