"""SwiGLU (silu(gate) * up) forward and forward+backward: pytrain vs PyTorch eager vs torch.compile.

Rows of one group (device, shape, dtype, direction) run side by side in the same process:
  pytrain    pytrain.kernels.swiglu (one pass each way; allocates its outputs, as the op always does)
  eager      F.silu(gate) * up, as the decoder's MLP computed it before the fused kernel
  compile    torch.compile of that eager expression (inductor, static shapes)

Bytes moved are what the op must move at least, the same for every row:
  forward:          read gate, up; write out
  forward+backward: forward + read gate, up, dout; write dgate, dup
The CPU shape is 4096 tokens of the 57.7M model's MLP width (1536) and of a 4096-wide layer's; GPUs get a
7B layer's (11008) over 16384 tokens.
"""

import pytest
import torch
import torch.nn.functional as F

from pytrain.kernels import swiglu

from .conftest import NEEDS_CUDA

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = [
    pytest.param("cpu", 4096, 1536, id="cpu-4096x1536"),
    pytest.param("cpu", 4096, 4096, id="cpu-4096x4096", marks=pytest.mark.slow),  # as a smoke test: the row above
    pytest.param("cuda", 16384, 11008, id="cuda-16384x11008", marks=NEEDS_CUDA),
]
IMPLS = ["pytrain", "eager", "compile"]


def eager(gate, up):
    return F.silu(gate) * up


def op_for(impl):
    if impl == "pytrain":
        return swiglu
    if impl == "eager":
        return eager
    torch._dynamo.reset()  # fresh caches: no recompile limit, no automatic-dynamic from earlier shapes
    return torch.compile(eager, dynamic=False)


def make(device, tokens, width, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(tokens, width, device=device, dtype=dtype, generator=g) for _ in range(3)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,tokens,width", CASES)
def test_forward(benchmark, bandwidth, device, tokens, width, dtype, impl):
    gate, up, _ = make(device, tokens, width, DTYPES[dtype])
    op = op_for(impl)
    with torch.no_grad():
        bandwidth(
            benchmark,
            lambda: op(gate, up),
            device=device,
            bytes_moved=3 * gate.nbytes,
            copy_like=gate,
            group=f"swiglu fwd {device} {tokens}x{width} {dtype}",
            impl=impl,
        )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,tokens,width", CASES)
def test_forward_backward(benchmark, bandwidth, device, tokens, width, dtype, impl):
    gate, up, dout = make(device, tokens, width, DTYPES[dtype])
    gate.requires_grad_(), up.requires_grad_()
    op = op_for(impl)

    def step():
        return torch.autograd.grad(op(gate, up), (gate, up), dout)  # no .grad accumulation: the op's own traffic

    bandwidth(
        benchmark,
        step,
        device=device,
        bytes_moved=8 * gate.nbytes,
        copy_like=gate,
        group=f"swiglu fwd+bwd {device} {tokens}x{width} {dtype}",
        impl=impl,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_results_agree(dtype):
    """Sanity: the rows above compute the same thing (loose: bf16 rounding; this is not the test suite)."""
    gate, up, _ = make("cpu", 64, 1536, DTYPES[dtype])
    torch.testing.assert_close(swiglu(gate, up).float(), eager(gate.float(), up.float()), rtol=2e-2, atol=2e-2)
