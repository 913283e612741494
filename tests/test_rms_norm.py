"""Correctness of pytrain.kernels.rms_norm / RMSNorm against a float64 reference.

The oracle is `pytrain.kernels.reference.rms_norm` evaluated on float64 copies of the very inputs the
kernel sees (so input rounding is not counted as kernel error); gradients come from autograd of that
reference. Tolerances are per dtype, below, and scale with the size of the expected values.
CUDA tests are the same comparisons on "cuda" and are skipped on machines without a GPU.
"""

import math
import re
import shutil
import subprocess
import types
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from markers import DEVICES

import pytrain.kernels as K
from pytrain.kernels import RMSNorm, _backend, reference, rms_norm

# Error allowed against the float64 reference: |got - want| <= atol * scale + rtol * |want|, where scale is
# max(1, max|want|) (for dx also the size of the terms that cancel, see dx_scale). The kernels accumulate
# in fp32 and round once to the output dtype, so rtol is ~2-3 ulps of the output dtype (bf16 ulp 2^-8,
# fp16 ulp 2^-11) and atol only absorbs fp32 rounding. Measured: errors are <= ~1/3 of these bounds.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-3),
    torch.float16: dict(rtol=2e-3, atol=2e-4),
}
# (x dtype, weight dtype) pairs the op accepts.
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
]
PAIR_IDS = ["f32", "bf16", "f16", "bf16-wf32", "f16-wf32"]


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str, scale: float = 0.0):
    """got: the kernel's result; want: the float64 reference; dtype: whose tolerance applies.

    atol scales with max|want|, or with `scale` when larger: the size of the terms that cancel.
    """
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    # Where the exact value is beyond the dtype's range, rounding gives +-inf (or +-max).
    big = want.abs() > torch.finfo(dtype).max
    if big.any():
        overflowed = (got[big].double().abs() >= torch.finfo(dtype).max).all()
        assert overflowed and torch.equal(got[big].sign().double(), want[big].sign()), (
            f"{what}: {got[big]} where the exact values {want[big]} overflow {dtype}"
        )
        got, want = got[~big], want[~big]
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    tol = TOLERANCES[dtype]
    scale = max(1.0, scale, want.abs().max().item() if want.numel() else 0.0)
    torch.testing.assert_close(
        got.double(), want, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=lambda m: f"{what} ({dtype}): {m}"
    )


def make_inputs(shape, dtype, weight_dtype, device, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    weight = (1 + 0.5 * torch.randn(shape[-1], generator=g, dtype=torch.float64)).to(weight_dtype).to(device)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    return x, weight, dy


def reference_with_grads(x, weight, dy, eps):
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    y64 = reference.rms_norm(x64, w64, eps)
    y64.backward(dy.double())
    return y64.detach(), x64.grad, w64.grad


def kernel_with_grads(fn, x, weight, dy, eps):
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    y = fn(x, weight, eps)
    y.backward(dy)
    return y.detach(), x.grad, weight.grad


def check_against_reference(shape, dtype, weight_dtype, device, eps=1e-5, seed=0, scale=1.0, fn=rms_norm):
    x, weight, dy = make_inputs(shape, dtype, weight_dtype, device, seed, scale)
    y, dx, dw = kernel_with_grads(fn, x, weight, dy, eps)
    y_ref, dx_ref, dw_ref = reference_with_grads(x, weight, dy, eps)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == weight_dtype
    assert y.device == x.device and dx.device == x.device and dw.device == x.device
    assert_close(y.cpu(), y_ref.cpu(), dtype, "y")
    assert_close(dx.cpu(), dx_ref.cpu(), dtype, "dx", scale=dx_scale(x, weight, dy, eps))
    assert_close(dw.cpu(), dw_ref.cpu(), weight_dtype, "dweight")


def dx_scale(x, weight, dy, eps) -> float:
    """dx = rstd * (dy*w - x_hat * mean(dy*w*x_hat)) cancels, fully so when hidden == 1 and eps << x^2
    (dx -> 0): fp32 rounding is relative to rstd * |dy*w|, not to dx."""
    if x.numel() == 0:
        return 0.0
    x64, w64, dy64 = x.double(), weight.double(), dy.double()
    rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    return (rstd * (dy64 * w64).abs()).max().item()


# ---------------------------------------------------------------------------------------------------
# The compiled modules are really there (otherwise every comparison below would test the reference).


def test_cpu_extension_is_built():
    assert _backend.extension(torch.device("cpu")) is not None, (
        "pytrain._C is missing: `pip install --no-build-isolation -e .` builds it"
    )


@pytest.mark.cuda
def test_cuda_extension_is_built():
    ext = _backend.extension(torch.device("cuda"))
    assert ext is not None, "pytrain._C_cuda is missing: reinstall with PYTRAIN_CUDA=1"
    assert ext.device_count() == torch.cuda.device_count()


# ---------------------------------------------------------------------------------------------------
# Forward, dx and dweight against float64.

SHAPES = [
    (1, 1),  # hidden 1: y = sign(x) * w (almost)
    (1, 3),  # one row
    (5, 37),  # hidden not a power of two, not a multiple of any vector width
    (2, 3, 4097),  # several leading dims, hidden one past a power of two
    (2, 2, 3, 64),  # three leading dims
    (0, 128),  # zero rows
    (3, 0, 16),  # zero rows in a middle dim
    (7, 513),  # CUDA: hidden just over one block of threads
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,weight_dtype", DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(shape, dtype, weight_dtype, device):
    check_against_reference(shape, dtype, weight_dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,weight_dtype", DTYPE_PAIRS, ids=PAIR_IDS)
def test_large_hidden(dtype, weight_dtype, device):
    check_against_reference((3, 65536), dtype, weight_dtype, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cpu_large_output_streams_past_the_cache(dtype):
    """An output of at least stream_min_bytes is written with streaming stores (rows of an odd hidden,
    4097, start unaligned); at over 32 MiB the allocating path may also ask for huge pages. Only the stores
    differ: the result equals, bit for bit, that of row blocks small enough for regular stores."""
    hidden = 4097
    rows = 2 * _backend.extension(torch.device("cpu")).stream_min_bytes // (hidden * dtype.itemsize) + 1
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(rows, hidden, generator=g).to(dtype), torch.rand(hidden, generator=g).to(dtype)
    with torch.no_grad():
        want = torch.cat([rms_norm(block, weight) for block in x.split(rows // 8)])
        assert torch.equal(rms_norm(x, weight), want)
        assert torch.equal(rms_norm(x, weight, out=torch.full_like(x, float("nan"))), want)


def fake_virtio_device(devices, name, kind, features):
    (devices / name).mkdir(parents=True)
    (devices / name / "device").write_text(kind + "\n")
    (devices / name / "features").write_text(features.ljust(64, "0") + "\n")


def test_host_that_reclaims_free_pages_is_recognised(tmp_path):
    """A virtio balloon (device 0x0005) with feature bit 5 (free page reporting) set, and nothing else."""
    detect = _backend.host_reclaims_free_pages.__wrapped__  # uncached
    fake_virtio_device(tmp_path / "net", "virtio0", "0x0001", "111111")  # bit 5 of another device
    fake_virtio_device(tmp_path / "plain", "virtio0", "0x0005", "011000")  # a balloon, no reporting
    fake_virtio_device(tmp_path / "reports", "virtio0", "0x0001", "0")
    fake_virtio_device(tmp_path / "reports", "virtio1", "0x0005", "011001010")
    (tmp_path / "reports" / "virtio2").mkdir()  # unreadable: skipped
    assert [detect(tmp_path / case) for case in ("net", "plain", "reports", "missing")] == [False, False, True, False]


@pytest.mark.parametrize("host_reclaims", [False, True])
def test_large_outputs_ask_for_huge_pages_unless_the_host_reclaims_free_pages(monkeypatch, host_reclaims):
    """There a huge page is built from a block the host dropped and faults in from it: measured 10x slower."""
    advised = []
    fake = types.SimpleNamespace(advise_huge_pages=lambda address, nbytes: advised.append(nbytes))
    monkeypatch.setattr(_backend, "extension", lambda device: fake)
    monkeypatch.setattr(_backend, "host_reclaims_free_pages", lambda: host_reclaims)
    small, large = torch.empty(1 << 20, dtype=torch.uint8), torch.empty(64 << 20, dtype=torch.uint8)
    for tensor in (small, large):
        assert _backend.empty_output_like(tensor).shape == tensor.shape
    assert advised == ([] if host_reclaims else [64 << 20])


@pytest.mark.parametrize("dtype,weight_dtype", DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_threads_split_rows(dtype, weight_dtype, threads, num_threads):
    """Enough rows that the CPU kernel splits them over threads (uneven chunks with 3), each thread
    with its own dweight partial."""
    num_threads(threads)
    check_against_reference((2001, 64), dtype, weight_dtype, "cpu")


def exactly_equal(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("hidden", [1, 15, 16, 17, 33, 100, 4097])
@pytest.mark.parametrize("dtype,weight_dtype", DTYPE_PAIRS, ids=PAIR_IDS)
def test_cpu_output_is_the_scalar_formula(dtype, weight_dtype, hidden, residual, cpu_loops):
    """Given the row's rstd, each output is exactly round(float(x) * rstd * float(w)) in x's dtype, and the
    residual sum exactly round(float(x) + float(residual)): in the vector loops and their tails (hidden
    sizes around the vector widths), on rows that start unaligned, in rows with an inf or a NaN."""
    g = torch.Generator().manual_seed(hidden)
    rows = 5

    def unaligned(t):  # a contiguous view starting one element into its storage
        return torch.cat([t.new_zeros(1), t.flatten()])[1:].view(t.shape)

    x = unaligned(torch.randn(rows, hidden, generator=g).to(dtype))
    x[1, hidden // 2] = float("inf")
    x[2, -1] = float("nan")
    x[3] *= 1e3
    weight = (1 + 0.5 * torch.randn(hidden, generator=g)).to(weight_dtype)
    with torch.no_grad():
        if residual:
            r = unaligned(torch.randn(rows, hidden, generator=g).to(dtype))
            y, total, rstd = torch.ops.pytrain.rms_norm_residual_forward(x, r, weight, 1e-5)
            exactly_equal(total, (x.float() + r.float()).to(dtype))
        else:
            y, rstd = torch.ops.pytrain.rms_norm_forward(x, weight, 1e-5)
            total = x
    nan = torch.isnan(y)
    # rstd is 0 in the row with an inf (inf * 0 is NaN, the rest 0) and NaN in the row with a NaN
    assert nan[1, hidden // 2] and nan[2].all() and not nan[[0, 3, 4]].any()
    exactly_equal(y, (total.float() * rstd[:, None] * weight.float()).to(dtype))


def test_cpu_bf16_rounds_to_nearest_even_and_keeps_nan_payloads(cpu_loops):
    """With x all ones rstd is exactly 1 (eps below fp32's resolution at 1), so y is the fp32 weight
    rounded to bf16: to nearest even (ties both ways, overflow to inf, subnormals), and a NaN keeps its
    sign and the top of its payload, made quiet. 37 weights: two blocks of 16 and a tail."""
    patterns = {  # fp32 bits -> bf16 bits
        0x3F808000: 0x3F80,  # tie, even below
        0x3F818000: 0x3F82,  # tie, even above
        0x3F808001: 0x3F81,  # just above the tie
        0x3F807FFF: 0x3F80,  # just below it
        0xBF818000: 0xBF82,  # negative tie
        0x7F7FFFFF: 0x7F80,  # the largest float rounds to inf
        0xFF800000: 0xFF80,  # -inf
        0x7F800001: 0x7FC0,  # signaling NaN: made quiet, not rounded to inf
        0xFF80FFFF: 0xFFC0,  # negative signaling NaN whose payload would round up
        0x7FC12345: 0x7FC1,  # quiet NaN: the payload's top bits kept
        0x00008000: 0x0000,  # subnormal tie to even (zero)
        0x00018000: 0x0002,  # subnormal tie to even (up)
        0x80000000: 0x8000,  # -0
    }
    fp32_bits, bf16_bits = zip(*[list(patterns.items())[i % len(patterns)] for i in range(37)])

    def as_int32(values):  # unsigned 32-bit patterns as int32 two's complement
        return torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in values], dtype=torch.int32)

    weight = as_int32(fp32_bits).view(torch.float32)
    x = torch.ones(2, 37, dtype=torch.bfloat16)
    with torch.no_grad():
        y = rms_norm(x, weight, eps=1e-10)
    got = y.view(torch.int16).to(torch.int32) & 0xFFFF
    assert got.tolist() == [list(bf16_bits)] * 2


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,weight_dtype", DTYPE_PAIRS, ids=PAIR_IDS)
def test_cuda_many_rows(dtype, weight_dtype):
    """More rows than backward blocks (2 x SMs): the grid-stride loop and the per-block dweight partials."""
    check_against_reference((3000, 96), dtype, weight_dtype, "cuda")
    check_against_reference((4, 1024, 2048), dtype, weight_dtype, "cuda")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1e-3, 1e3])
@pytest.mark.parametrize("dtype,weight_dtype", DTYPE_PAIRS, ids=PAIR_IDS)
def test_input_scale(scale, dtype, weight_dtype, device):
    """Small and large inputs: squares accumulate in fp32, so fp16/bf16 inputs do not overflow."""
    check_against_reference((4, 300), dtype, weight_dtype, device, scale=scale, eps=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_rows_give_zero_dweight(device):
    x = torch.empty(0, 8, device=device, requires_grad=True)
    weight = torch.randn(8, device=device, requires_grad=True)
    y = rms_norm(x, weight)
    y.sum().backward()
    assert y.shape == (0, 8)
    assert x.grad.shape == (0, 8)
    assert torch.equal(weight.grad, torch.zeros(8, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_row_vector_is_finite(device):
    """A row of zeros normalizes to zeros (eps keeps rstd finite), and its gradient is finite."""
    x = torch.zeros(2, 16, device=device)
    x[1] = 1.0
    y, dx, dw = kernel_with_grads(rms_norm, x, torch.ones(16, device=device), torch.ones(2, 16, device=device), 1e-5)
    assert torch.equal(y[0], torch.zeros(16, device=device))
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all()


@pytest.mark.parametrize("device", DEVICES)
def test_grad_of_one_input_only(device):
    x, weight, dy = make_inputs((4, 33), torch.float32, torch.float32, device)
    _y_ref, dx_ref, dw_ref = reference_with_grads(x, weight, dy, 1e-5)

    xg = x.clone().requires_grad_()
    rms_norm(xg, weight).backward(dy)
    assert_close(xg.grad.cpu(), dx_ref.cpu(), torch.float32, "dx (weight frozen)")

    wg = weight.clone().requires_grad_()
    rms_norm(x, wg).backward(dy)
    assert_close(wg.grad.cpu(), dw_ref.cpu(), torch.float32, "dweight (x frozen)")


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_upstream_grad(device):
    """The backward makes dy contiguous: y.t() in the graph hands it a transposed gradient."""
    x, weight, dy = make_inputs((6, 10), torch.float32, torch.float32, device)
    _, dx_ref, dw_ref = reference_with_grads(x, weight, dy, 1e-5)
    xg, wg = x.clone().requires_grad_(), weight.clone().requires_grad_()
    rms_norm(xg, wg).t().backward(dy.t())
    assert_close(xg.grad.cpu(), dx_ref.cpu(), torch.float32, "dx")
    assert_close(wg.grad.cpu(), dw_ref.cpu(), torch.float32, "dweight")


@pytest.mark.parametrize("device", DEVICES)
def test_contiguous_view_with_offset(device):
    """A contiguous slice starts at a storage offset: data_ptr() must include it."""
    base = torch.randn(5, 24, device=device)
    x = base[2:]
    weight = torch.rand(24, device=device) + 0.5
    want = reference.rms_norm(x.double(), weight.double())
    assert_close(rms_norm(x, weight).cpu(), want.cpu(), torch.float32, "y")


@pytest.mark.parametrize("device", DEVICES)
def test_inference_mode(device):
    x, weight, _ = make_inputs((3, 40), torch.bfloat16, torch.bfloat16, device)
    with torch.inference_mode():
        y = rms_norm(x, weight)
    assert_close(y.cpu(), reference.rms_norm(x.double(), weight.double()).cpu(), torch.bfloat16, "y")


# ---------------------------------------------------------------------------------------------------
# Property tests.

DTYPES = st.sampled_from(list(zip(DTYPE_PAIRS, PAIR_IDS)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    leading=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    hidden=st.integers(1, 300),
    pair=DTYPES,
    eps=st.floats(1e-8, 1e-1),
    scale=st.sampled_from([1e-2, 1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_property_cpu(leading, hidden, pair, eps, scale, seed):
    (dtype, weight_dtype), _ = pair
    check_against_reference((*leading, hidden), dtype, weight_dtype, "cpu", eps=eps, seed=seed, scale=scale)


@pytest.mark.cuda
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    leading=st.lists(st.integers(0, 600), min_size=1, max_size=2),
    hidden=st.integers(1, 5000),
    pair=DTYPES,
    eps=st.floats(1e-8, 1e-1),
    seed=st.integers(0, 2**16),
)
def test_property_cuda(leading, hidden, pair, eps, seed):
    (dtype, weight_dtype), _ = pair
    if math.prod(leading) * hidden > 2**20:  # keep each example small: the f64 oracle and checks run on the host
        leading = [min(leading[0], 4)]
    check_against_reference((*leading, hidden), dtype, weight_dtype, "cuda", eps=eps, seed=seed)


@settings(max_examples=40, deadline=None)
@given(hidden=st.integers(1, 64), eps=st.floats(1e-6, 1.0), seed=st.integers(0, 2**16))
def test_property_eps_is_used(hidden, eps, seed):
    """A large eps visibly shrinks the output: eps really reaches the kernel (as a float)."""
    x, weight, _ = make_inputs((3, hidden), torch.float32, torch.float32, "cpu", seed, scale=0.1)
    want = reference.rms_norm(x.double(), weight.double(), eps)
    assert_close(rms_norm(x, weight, eps), want, torch.float32, "y")


# ---------------------------------------------------------------------------------------------------
# RMSNorm module.


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_module(dtype, device):
    norm = RMSNorm(48, eps=1e-6, device=device, dtype=dtype)
    assert norm.weight.dtype == dtype and norm.weight.shape == (48,)
    assert torch.equal(norm.weight.detach().float().cpu(), torch.ones(48))
    assert "48, eps=1e-06" in repr(norm)
    with torch.no_grad():
        norm.weight.copy_((torch.rand(48) + 0.5).to(dtype))

    x, _, dy = make_inputs((2, 5, 48), dtype, dtype, device)
    x.requires_grad_()
    y = norm(x)
    y.backward(dy)
    y_ref, dx_ref, dw_ref = reference_with_grads(x, norm.weight, dy, 1e-6)
    assert_close(y.detach().cpu(), y_ref.cpu(), dtype, "y")
    assert_close(x.grad.cpu(), dx_ref.cpu(), dtype, "dx")
    assert_close(norm.weight.grad.cpu(), dw_ref.cpu(), dtype, "dweight")


def test_module_float32_weight_bf16_input():
    """Mixed precision as the trainer uses it: fp32 master weight, bf16 activations."""
    norm = RMSNorm(64)
    x = torch.randn(4, 64).bfloat16().requires_grad_()
    y = norm(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert norm.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------
# Bad arguments: a TypeError / ValueError that names the argument, never a crash.


@pytest.mark.parametrize(
    "x,weight,eps,error,match",
    [
        ([[1.0, 2.0]], torch.ones(2), 1e-5, TypeError, r"^x must be a torch\.Tensor"),
        (torch.ones(2, 2), None, 1e-5, TypeError, r"^weight must be a torch\.Tensor"),
        (torch.ones(2, 2, dtype=torch.float64), torch.ones(2), 1e-5, TypeError, r"^x has dtype torch\.float64"),
        (torch.ones(2, 2, dtype=torch.int32), torch.ones(2), 1e-5, TypeError, r"^x has dtype torch\.int32"),
        (torch.ones(2, 2), torch.ones(2, dtype=torch.float64), 1e-5, TypeError, r"^weight has dtype torch\.float64"),
        (torch.ones(2, 2), torch.ones(2, dtype=torch.bfloat16), 1e-5, TypeError, r"^weight has dtype torch\.bfloat16"),
        (
            torch.ones(2, 2, dtype=torch.bfloat16),
            torch.ones(2, dtype=torch.float16),
            1e-5,
            TypeError,
            r"^weight has dtype torch\.float16",
        ),
        (torch.ones(2, 3), torch.ones(2), 1e-5, ValueError, r"^weight must have shape \(3,\)"),
        (torch.ones(2, 3), torch.ones(1, 3), 1e-5, ValueError, r"^weight must have shape \(3,\)"),
        (torch.ones(3, 4).t(), torch.ones(3), 1e-5, ValueError, r"^x must be contiguous"),
        (torch.ones(2, 3), torch.ones(6)[::2], 1e-5, ValueError, r"^weight must be contiguous"),
        (torch.tensor(1.0), torch.ones(1), 1e-5, ValueError, r"^x must have at least 1 dimension"),
        (torch.ones(2, 0), torch.ones(0), 1e-5, ValueError, r"hidden\) must be at least 1"),
        (torch.ones(2, 3), torch.ones(3), 0.0, ValueError, r"^eps must be positive"),
        (torch.ones(2, 3), torch.ones(3), -1e-5, ValueError, r"^eps must be positive"),
        (torch.ones(2, 3), torch.ones(3), float("nan"), ValueError, r"^eps must be positive"),
        (
            torch.ones(2, 3),
            torch.ones(3, device="meta"),
            1e-5,
            ValueError,
            r"^tensors must be on one device: x on cpu, weight on meta",
        ),
    ],
    ids=[
        "x-list",
        "weight-none",
        "x-float64",
        "x-int",
        "weight-float64",
        "weight-bf16-for-f32-x",
        "weight-f16-for-bf16-x",
        "weight-length",
        "weight-2d",
        "x-transposed",
        "weight-strided",
        "x-0d",
        "hidden-0",
        "eps-0",
        "eps-negative",
        "eps-nan",
        "devices",
    ],
)
def test_bad_arguments(x, weight, eps, error, match):
    with pytest.raises(error, match=match):
        rms_norm(x, weight, eps)


def test_meta_device_shapes():
    """Meta tensors have no kernel and take the reference path: shapes and dtypes only."""
    y = rms_norm(torch.empty(3, 7, device="meta", dtype=torch.bfloat16), torch.empty(7, device="meta"))
    assert y.device.type == "meta" and y.shape == (3, 7) and y.dtype == torch.bfloat16


@pytest.mark.cuda
def test_cuda_cpu_mix_is_rejected():
    with pytest.raises(ValueError, match=r"^tensors must be on one device: x on cuda:0, weight on cpu"):
        rms_norm(torch.ones(2, 3, device="cuda"), torch.ones(3))


# ---------------------------------------------------------------------------------------------------
# torch.library registration and torch.compile.


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,weight_dtype", [DTYPE_PAIRS[0], DTYPE_PAIRS[3]], ids=[PAIR_IDS[0], PAIR_IDS[3]])
def test_opcheck(dtype, weight_dtype, device):
    """torch.library's own checks: schema, fake (meta) impl, autograd registration, AOT dispatch."""
    x, weight, dy = make_inputs((4, 19), dtype, weight_dtype, device)
    torch.library.opcheck(torch.ops.pytrain.rms_norm_forward.default, (x.requires_grad_(), weight, 1e-5))
    _, rstd = torch.ops.pytrain.rms_norm_forward(x.detach(), weight, 1e-5)
    torch.library.opcheck(torch.ops.pytrain.rms_norm_backward.default, (dy, x.detach(), weight, rstd))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_matches_eager(device):
    """One graph with no breaks, forward and backward equal to eager (bitwise: same kernels)."""
    torch._dynamo.reset()
    x, weight, dy = make_inputs((3, 5, 96), torch.float32, torch.float32, device)

    def f(x, weight):
        return rms_norm(x, weight, 1e-6) * 2.0

    compiled = torch.compile(f, fullgraph=True)
    eager = kernel_with_grads(lambda a, b, e: f(a, b), x, weight, dy, 1e-6)
    got = kernel_with_grads(lambda a, b, e: compiled(a, b), x, weight, dy, 1e-6)
    for name, e, g in zip(("y", "dx", "dweight"), eager, got):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_torch_compile_dynamic_shapes_and_bf16():
    """fullgraph with dynamic shapes (the fake impl must be shape-generic), bf16 x with fp32 weight."""
    torch._dynamo.reset()
    compiled = torch.compile(rms_norm, fullgraph=True, dynamic=True, backend="aot_eager")
    for shape in [(4, 32), (2, 7, 32)]:
        x, weight, dy = make_inputs(shape, torch.bfloat16, torch.float32, "cpu")
        eager = kernel_with_grads(rms_norm, x, weight, dy, 1e-5)
        got = kernel_with_grads(compiled, x, weight, dy, 1e-5)
        for name, e, g in zip(("y", "dx", "dweight"), eager, got):
            torch.testing.assert_close(g, e, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------
# The plain-PyTorch fallback when a compiled module is missing.


@pytest.mark.parametrize("dtype,weight_dtype", DTYPE_PAIRS, ids=PAIR_IDS)
def test_fallback_matches_kernel(dtype, weight_dtype, monkeypatch):
    x, weight, dy = make_inputs((3, 4, 50), dtype, weight_dtype, "cpu")
    with_kernel = kernel_with_grads(rms_norm, x, weight, dy, 1e-5)
    monkeypatch.setattr(_backend, "_loaded", {})
    monkeypatch.setitem(_backend._MODULE_FOR_DEVICE, "cpu", "pytrain._C_not_built")
    with pytest.warns(RuntimeWarning, match="falls back to plain-PyTorch references"):
        fallback = kernel_with_grads(rms_norm, x, weight, dy, 1e-5)
    y_ref, dx_ref, dw_ref = reference_with_grads(x, weight, dy, 1e-5)
    for name, k, f, want, dt in zip(
        ("y", "dx", "dweight"), with_kernel, fallback, (y_ref, dx_ref, dw_ref), (dtype, dtype, weight_dtype)
    ):
        assert f.dtype == k.dtype
        assert_close(f, want, dt, f"fallback {name}")
        # Kernel and fallback both compute in fp32: at most a rounding apart in the output dtype.
        assert_close(k, f.double(), dt, f"kernel vs fallback {name}")


def test_fallback_module_and_compile(extension_missing):
    torch._dynamo.reset()
    norm = RMSNorm(16)
    x = torch.randn(2, 16)
    want = reference.rms_norm(x.double(), norm.weight.double())
    assert_close(norm(x).detach(), want, torch.float32, "module y")
    compiled = torch.compile(rms_norm, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x, norm.weight).detach(), want, torch.float32, "compiled y")


def test_package_exports():
    assert K.rms_norm is rms_norm and K.RMSNorm is RMSNorm


# ---------------------------------------------------------------------------------------------------
# The fused residual add (pre-norm decoders) and out= (writing into a preallocated output).


def residual_reference_with_grads(x, residual, weight, dy, dtotal, eps):
    x64, r64, w64 = (t.detach().double().requires_grad_() for t in (x, residual, weight))
    total = x64 + r64
    y = reference.rms_norm(total, w64, eps)
    torch.autograd.backward([y, total], [dy.double(), dtotal.double()])
    return y.detach(), total.detach(), x64.grad, r64.grad, w64.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,weight_dtype", DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (2, 5, 513), (64, 4097)], ids=lambda s: "x".join(map(str, s)))
def test_residual_matches_float64_reference(shape, dtype, weight_dtype, device):
    x, weight, dy = make_inputs(shape, dtype, weight_dtype, device, seed=1)
    residual, _, dtotal = make_inputs(shape, dtype, weight_dtype, device, seed=2)
    leaves = [t.detach().clone().requires_grad_() for t in (x, residual, weight)]
    y, total = rms_norm(leaves[0], leaves[2], 1e-5, residual=leaves[1])
    torch.autograd.backward([y, total], [dy, dtotal])
    # The kernel normalizes the sum rounded to `dtype` (as eager `x + residual` would): the oracle is the
    # reference on that rounded sum, whose gradient reaches x and residual alike, plus the sum's own.
    rounded = (x.double() + residual.double()).to(dtype)
    assert torch.equal(total, rounded)
    y_ref, dnorm_ref, dw_ref = reference_with_grads(rounded, weight, dy, 1e-5)
    dx_ref = dnorm_ref + dtotal.double()
    assert_close(y.detach().cpu(), y_ref.cpu(), dtype, "y")
    y_exact = residual_reference_with_grads(x, residual, weight, dy, dtotal, 1e-5)[0]
    assert_close(y.detach().cpu(), y_exact.cpu(), dtype, "y vs exact sum")
    scale = dx_scale(rounded, weight, dy, 1e-5) + dtotal.double().abs().max().item()
    assert_close(leaves[0].grad.cpu(), dx_ref.cpu(), dtype, "dx", scale=scale)
    assert_close(leaves[1].grad.cpu(), dx_ref.cpu(), dtype, "dresidual", scale=scale)
    assert_close(leaves[2].grad.cpu(), dw_ref.cpu(), weight_dtype, "dweight")


def test_residual_gradient_through_y_only():
    x, weight, dy = make_inputs((4, 40), torch.float32, torch.float32, "cpu", seed=3)
    residual = torch.randn(4, 40, requires_grad=True)
    x.requires_grad_()
    y, _ = rms_norm(x, weight, residual=residual)
    y.backward(dy)
    _, _, dx_ref, _, _ = residual_reference_with_grads(x, residual, weight, dy, torch.zeros_like(dy), 1e-5)
    assert_close(x.grad, dx_ref, torch.float32, "dx")
    torch.testing.assert_close(x.grad, residual.grad, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_residual_compiles_fullgraph_and_passes_opcheck(device):
    torch._dynamo.reset()
    x, weight, _dy = make_inputs((3, 8, 64), torch.float32, torch.float32, device, seed=4)
    residual = torch.randn_like(x)
    torch.library.opcheck(torch.ops.pytrain.rms_norm_residual_forward, (x, residual, weight.requires_grad_(), 1e-5))
    compiled = torch.compile(lambda a, r, w: rms_norm(a, w, residual=r), fullgraph=True)
    got, want = compiled(x, residual, weight), rms_norm(x, weight, residual=residual)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,weight_dtype", DTYPE_PAIRS, ids=PAIR_IDS)
def test_out_writes_into_the_given_tensor(dtype, weight_dtype, device):
    x, weight, _ = make_inputs((5, 3, 129), dtype, weight_dtype, device, seed=5)
    out = torch.full_like(x, float("nan"))
    with torch.no_grad():
        result = rms_norm(x, weight, out=out)
    assert result is out
    torch.testing.assert_close(out, rms_norm(x, weight), rtol=0, atol=0)
    torch.library.opcheck(torch.ops.pytrain.rms_norm_forward_out, (x, weight, 1e-5, torch.empty_like(x)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(residual=torch.randn(2, 7)), r"residual must match x: shape \(2, 8\)"),
        (dict(residual=torch.randn(2, 8, dtype=torch.bfloat16)), r"residual must match x: .* dtype torch.float32"),
        (dict(residual=torch.randn(8, 2).t()), r"residual must be contiguous"),
        (dict(out=torch.empty(2, 9)), r"out must match x"),
        (dict(out=torch.empty(2, 8), residual=torch.randn(2, 8)), r"out= is not supported together with residual="),
    ],
)
def test_residual_and_out_bad_arguments(kwargs, match):
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        rms_norm(torch.randn(2, 8), torch.ones(8), **kwargs)


def test_out_is_refused_under_autograd_and_when_aliasing():
    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(ValueError, match="out= cannot be used when x or weight requires grad"):
        rms_norm(x, torch.ones(8), out=torch.empty(2, 8))
    with torch.no_grad(), pytest.raises(ValueError, match="out must not alias x"):
        rms_norm(x, torch.ones(8), out=x)


def test_fallback_residual_and_out(extension_missing):
    x, weight, _ = make_inputs((3, 16), torch.float32, torch.float32, "cpu", seed=6)
    residual = torch.randn_like(x)
    y, total = rms_norm(x, weight, residual=residual)
    torch.testing.assert_close(total, x + residual)
    assert_close(y, reference.rms_norm((x + residual).double(), weight.double()), torch.float32, "y")
    out = torch.empty_like(x)
    with torch.no_grad():
        assert rms_norm(x, weight, out=out) is out
    assert_close(out, reference.rms_norm(x.double(), weight.double()), torch.float32, "out")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (compiles the kernel, runs nothing)")
def test_fused_residual_reads_back_its_sum_through_a_coherent_load(tmp_path):
    """The fused-residual forward writes x + residual to residual_out and reads it back. Through a __restrict__
    pointer the compiler may use the read-only, non-coherent path (ld.global.nc) for that read, which is undefined
    for memory the kernel itself wrote: every forward instantiation must read it with a plain ld.global."""
    ptx = tmp_path / "rms_norm.ptx"
    source = Path(__file__).resolve().parent.parent / "csrc"
    subprocess.run(
        ["nvcc", "-arch=sm_90", f"-I{source}", "-ptx", "-o", str(ptx), str(source / "cuda" / "rms_norm.cu")],
        check=True,
        timeout=300,
    )
    entries = re.findall(r"\.entry (\S*forward_kernel\S*)\((.*?\n\})", ptx.read_text(), re.S)
    assert len(entries) == 5  # fp32, bf16 and fp16 inputs; 16-bit with a 16-bit or fp32 weight
    for name, body in entries:
        assert re.search(r"ld\.global\.(?!nc)", body), f"{name}: every load is non-coherent"
