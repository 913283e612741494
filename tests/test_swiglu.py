"""pytrain.kernels.swiglu (silu(gate) * up, fused) against a float64 reference.

The oracle is `pytrain.kernels.reference.swiglu` evaluated on float64 copies of the very inputs the kernel sees
(input rounding is not counted as kernel error); gradients come from autograd of that reference. Tolerances
per dtype, below: the kernel computes in fp32 (its exp is ~1 ulp) and rounds once to the output dtype, so rtol
is ~2 ulps of the output dtype (bf16 2^-8, fp16 2^-11) and atol, relative to the largest expected value,
absorbs the fp32 rounding of terms that cancel in the gradient (1 + g (1 - sigmoid g)).
CUDA tests are the same comparisons on "cuda", skipped on machines without a GPU.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from markers import DEVICES

import pytrain.kernels as K
from pytrain.kernels import _backend, reference, swiglu

TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-3),
    torch.float16: dict(rtol=1e-3, atol=1e-4),
}
DTYPES = list(TOLERANCES)
SHAPES = [(1,), (37,), (5, 129), (2, 3, 1001), (0, 8), (4, 0)]


def make_inputs(shape, dtype, device, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    gate, up, dout = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    return (gate * scale).to(dtype).to(device), up.to(dtype).to(device), dout.to(dtype).to(device)


def with_grads(fn, gate, up, dout):
    gate, up = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    out = fn(gate, up)
    out.backward(dout)
    return out.detach(), gate.grad, up.grad


def assert_close(got, want, dtype, what):
    tol = TOLERANCES[dtype]
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(
        got.double().cpu(), want.cpu(), rtol=tol["rtol"], atol=tol["atol"] * scale, msg=lambda m: f"{what}: {m}"
    )


def check_against_reference(shape, dtype, device, seed=0, scale=3.0):
    gate, up, dout = make_inputs(shape, dtype, device, seed, scale)
    got = with_grads(swiglu, gate, up, dout)
    want = with_grads(reference.swiglu, gate.double(), up.double(), dout.double())
    for name, g, w in zip(("out", "dgate", "dup"), got, want):
        assert g.dtype == dtype and g.device == gate.device and g.shape == gate.shape
        assert_close(g, w, dtype, f"{name} ({dtype})")


def test_cpu_extension_has_the_kernels():
    ext = _backend.extension(torch.device("cpu"))
    assert hasattr(ext, "swiglu_forward") and hasattr(ext, "swiglu_backward")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(shape, dtype, device):
    check_against_reference(shape, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_gates(dtype, device):
    """Gates far out on both sides (silu -> 0 and silu -> x), and near 0 where sigmoid's slope matters."""
    gate = torch.tensor([-100.0, -30.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 30.0, 60.0], dtype=torch.float64)
    up, dout = torch.linspace(-2, 2, gate.numel(), dtype=torch.float64), torch.ones_like(gate)
    gate, up, dout = (t.to(dtype).to(device) for t in (gate, up, dout))
    got = with_grads(swiglu, gate, up, dout)
    want = with_grads(reference.swiglu, gate.double(), up.double(), dout.double())
    for name, g, w in zip(("out", "dgate", "dup"), got, want):
        assert_close(g, w, dtype, f"{name} ({dtype})")


def test_cpu_threads_split_elements_without_changing_a_bit(num_threads):
    gate, up, dout = make_inputs((3, 40001), torch.bfloat16, "cpu", seed=2)
    results = []
    for threads in (1, 2):
        num_threads(threads)
        results.append(with_grads(swiglu, gate, up, dout))
    assert all(torch.equal(a, b) for a, b in zip(*results))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(0, 40), min_size=1, max_size=3).map(tuple),
    dtype=st.sampled_from(DTYPES),
    scale=st.floats(0.01, 20.0),
    seed=st.integers(0, 2**16),
)
def test_property_cpu(shape, dtype, scale, seed):
    check_against_reference(shape, dtype, "cpu", seed, scale)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_of_one_input_only_and_non_contiguous_upstream_grad(device):
    gate, up, dout = make_inputs((6, 10), torch.float32, device)
    gate.requires_grad_()
    out = swiglu(gate, up)
    out.backward(dout.t().contiguous().t())  # a transposed view: not contiguous
    want = with_grads(reference.swiglu, gate.detach().double(), up.double(), dout.double())
    assert_close(gate.grad, want[1], torch.float32, "dgate")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    gate, up, dout = make_inputs((4, 19), torch.float32, device)
    torch.library.opcheck(torch.ops.pytrain.swiglu_forward.default, (gate.requires_grad_(), up))
    torch.library.opcheck(torch.ops.pytrain.swiglu_backward.default, (dout, gate.detach(), up))


def test_torch_compile_fullgraph_matches_eager():
    """One graph with no breaks, forward and backward equal to eager (bitwise: same kernels)."""
    torch._dynamo.reset()
    gate, up, dout = make_inputs((3, 5, 96), torch.float32, "cpu")

    def f(gate, up):
        return swiglu(gate, up) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for name, e, g in zip(("out", "dgate", "dup"), with_grads(f, gate, up, dout), with_grads(compiled, gate, up, dout)):
        torch.testing.assert_close(g, e, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fallback_matches_reference(dtype, extension_missing):
    gate, up, dout = make_inputs((3, 50), dtype, "cpu")
    got = with_grads(swiglu, gate, up, dout)
    want = with_grads(reference.swiglu, gate.double(), up.double(), dout.double())
    for name, g, w in zip(("out", "dgate", "dup"), got, want):
        assert g.dtype == dtype
        assert_close(g, w, dtype, f"fallback {name}")


def test_package_exports():
    assert K.swiglu is swiglu and "swiglu" in K.__all__ and "adamw_step_" in K.__all__


@pytest.mark.parametrize(
    "gate, up, error, match",
    [
        ([1.0], torch.zeros(1), TypeError, "gate must be a torch.Tensor"),
        (torch.zeros(2), torch.zeros(2, dtype=torch.int64), TypeError, "up has dtype torch.int64"),
        (torch.zeros(2, 3), torch.zeros(3, 2), ValueError, r"up must match gate: shape \(2, 3\)"),
        (torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16), ValueError, "up must match gate"),
        (torch.zeros(4, 3).t(), torch.zeros(3, 4), ValueError, "gate must be contiguous"),
        (torch.zeros(2), torch.zeros(2, device="meta"), ValueError, "tensors must be on one device"),
    ],
)
def test_bad_arguments(gate, up, error, match):
    with pytest.raises(error, match=match):
        swiglu(gate, up)


def test_meta_device_shapes():
    out = swiglu(
        torch.empty(2, 7, device="meta", dtype=torch.bfloat16), torch.empty(2, 7, device="meta", dtype=torch.bfloat16)
    )
    assert out.shape == (2, 7) and out.dtype == torch.bfloat16 and out.device.type == "meta"
