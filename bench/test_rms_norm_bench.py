"""RMSNorm forward and forward+backward: pytrain vs PyTorch eager vs torch.compile vs copy bandwidth.

Rows of one group (device, shape, dtype, direction) run side by side in the same process:
  pytrain           pytrain.kernels.rms_norm (allocates y and rstd, as the op always does)
  pytrain_out       forward only: rms_norm(..., out=y) writing into a preallocated y (no allocation)
  eager             pytrain.kernels.reference.rms_norm, the plain-PyTorch formula
  compile           torch.compile of that reference (inductor, static shapes)
  copy / clone      forward only: y.copy_(x) into a preallocated y / x.clone() (an allocating copy)

Bytes moved are what the op must move at least, the same for every row:
  forward:          read x, write y, read weight
  forward+backward: forward + read dy, read x, write dx, read weight, write dweight   (rstd ignored: < 0.1%)
  residual add + norm, forward+backward: read x, residual; write sum, y; then read dy, dsum, sum; write dx
CPU shapes stay at 4096 tokens x 4096 hidden so the CPU run is bearable; GPUs get LLM-sized shapes.

On the CPU the allocating rows (pytrain, compile, clone) are dominated by first-touch page faults:
glibc serves allocations over 32 MB with a fresh mmap, so every call faults in (and the kernel zeroes)
each 4 KiB page of its output. pytrain_out vs pytrain shows the kernel vs that cost. pytrain asks for
transparent huge pages on its own large outputs (pytrain.kernels._backend.empty_output_like), which
shrinks it; THP_MEM_ALLOC_ENABLE=1 (PyTorch's CPU allocator then asks for them) does so for every row.
"""

import pytest
import torch

from pytrain.kernels import reference, rms_norm

from .conftest import NEEDS_CUDA

EPS = 1e-5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

CASES = [pytest.param("cpu", 4096, 4096, id="cpu-4096x4096")] + [
    pytest.param("cuda", tokens, hidden, id=f"cuda-{tokens}x{hidden}", marks=NEEDS_CUDA)
    for tokens, hidden in [(16384, 4096), (4096, 8192)]
]
FORWARD_IMPLS = ["pytrain", "pytrain_out", "eager", "compile", "copy", "clone"]
TRAIN_IMPLS = ["pytrain", "eager", "compile"]


def make(device, tokens, hidden, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=g)
    weight = (1 + 0.1 * torch.randn(hidden, device=device, generator=g)).to(dtype)
    dy = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=g)
    return x, weight, dy


def compiled_reference():
    torch._dynamo.reset()  # fresh caches: no recompile limit, no automatic-dynamic from earlier shapes
    return torch.compile(reference.rms_norm, dynamic=False)


def forward_fn(impl, x, weight):
    if impl == "pytrain":
        return lambda: rms_norm(x, weight, EPS)
    if impl == "pytrain_out":
        y = torch.empty_like(x)
        return lambda: rms_norm(x, weight, EPS, out=y)
    if impl == "eager":
        return lambda: reference.rms_norm(x, weight, EPS)
    if impl == "compile":
        fn = compiled_reference()
        return lambda: fn(x, weight, EPS)
    if impl == "copy":
        y = torch.empty_like(x)
        return lambda: y.copy_(x)
    if impl == "clone":
        return lambda: x.clone()
    raise ValueError(impl)


def train_fn(impl, x, weight, dy):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    op = {"pytrain": rms_norm, "eager": reference.rms_norm}.get(impl) or compiled_reference()

    def step():
        y = op(x, weight, EPS)
        return torch.autograd.grad(y, (x, weight), dy)  # no .grad accumulation: only the op's own traffic

    return step


@pytest.mark.parametrize("impl", FORWARD_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,tokens,hidden", CASES)
def test_forward(benchmark, bandwidth, device, tokens, hidden, dtype, impl):
    x, weight, _ = make(device, tokens, hidden, DTYPES[dtype])
    with torch.no_grad():
        bandwidth(
            benchmark,
            forward_fn(impl, x, weight),
            device=device,
            bytes_moved=2 * x.nbytes + weight.nbytes,
            copy_like=x,
            group=f"rms_norm fwd {device} {tokens}x{hidden} {dtype}",
            impl=impl,
        )


@pytest.mark.parametrize("impl", TRAIN_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,tokens,hidden", CASES)
def test_forward_backward(benchmark, bandwidth, device, tokens, hidden, dtype, impl):
    x, weight, dy = make(device, tokens, hidden, DTYPES[dtype])
    bandwidth(
        benchmark,
        train_fn(impl, x, weight, dy),
        device=device,
        bytes_moved=5 * x.nbytes + 3 * weight.nbytes,
        copy_like=x,
        group=f"rms_norm fwd+bwd {device} {tokens}x{hidden} {dtype}",
        impl=impl,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,tokens,hidden", CASES)
def test_results_agree(device, tokens, hidden, dtype):
    """Sanity: the rows above compute the same thing (loose: bf16 rounding; this is not the test suite)."""
    x, weight, _ = make(device, tokens // 8, hidden, DTYPES[dtype])
    want = reference.rms_norm(x.float(), weight.float(), EPS)
    for impl in ("pytrain", "pytrain_out", "eager"):
        got = forward_fn(impl, x, weight)()
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2, msg=lambda m: f"{impl}: {m}")


def residual_add_norm_eager(x, residual, weight, eps):
    total = x + residual
    return reference.rms_norm(total, weight, eps), total


def residual_fn(impl, x, residual, weight, dy):
    leaves = [t.detach().requires_grad_() for t in (x, residual, weight)]
    if impl == "pytrain":

        def op(a, r, w, eps):
            return rms_norm(a, w, eps, residual=r)
    elif impl == "eager":
        op = residual_add_norm_eager
    else:
        torch._dynamo.reset()
        op = torch.compile(residual_add_norm_eager, dynamic=False)

    def step():
        y, total = op(*leaves, EPS)
        return torch.autograd.grad((y, total), leaves, (dy, dy))

    return step


@pytest.mark.parametrize("impl", TRAIN_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,tokens,hidden", CASES)
def test_residual_add_norm_forward_backward(benchmark, bandwidth, device, tokens, hidden, dtype, impl):
    """The pre-norm decoder's `h = x + residual; y = norm(h)` with both outputs used, fused vs not."""
    x, weight, dy = make(device, tokens, hidden, DTYPES[dtype])
    residual = torch.randn_like(x)
    bandwidth(
        benchmark,
        residual_fn(impl, x, residual, weight, dy),
        device=device,
        bytes_moved=9 * x.nbytes + 3 * weight.nbytes,
        copy_like=x,
        group=f"rms_norm+residual fwd+bwd {device} {tokens}x{hidden} {dtype}",
        impl=impl,
    )
