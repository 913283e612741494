"""Rotary embeddings (q and k in one call) forward and forward+backward: pytrain vs eager vs torch.compile.

Rows of one group (device, shape, dtype, direction) run side by side in the same process:
  pytrain          pytrain.kernels.apply_rotary (allocates q_out and k_out, as the op does out of place)
  pytrain_inplace  forward only: apply_rotary(..., inplace=True) (no allocation; what inference can use)
  eager            pytrain.kernels.reference.rotate on q and k with precomputed fp32 cos/sin (seq, head_dim/2),
                   as a model caches them: the plain-PyTorch formula, table construction not timed
  compile          torch.compile of that (inductor, static shapes; cos/sin are inputs, so inductor cannot
                   fold their computation into every element)
  copy             forward only: q and k copied into preallocated tensors (the bandwidth floor's shape)

Bytes moved are what the op must move at least, the same for every row (the cos/sin table is ignored:
one row per token, shared by all heads, < 1%):
  forward:          read q, k; write q_out, k_out
  forward+backward: forward + read dq_out, dk_out; write dq, dk
Shapes: one LLaMA-style GQA layer, q heads 32, k heads 8, head_dim 128; CPU seq 4096, GPUs batch 4.

On the CPU the allocating rows pay first-touch page faults on their fresh outputs (see the RMSNorm bench's
notes): pytrain_inplace vs pytrain shows the kernel vs that cost.
"""

import pytest
import torch

from pytrain.kernels import apply_rotary, reference

from .conftest import NEEDS_CUDA

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
Q_HEADS, K_HEADS, HEAD_DIM = 32, 8, 128

CASES = [pytest.param("cpu", 1, 4096, id="cpu-1x4096")] + [
    pytest.param("cuda", batch, seq, id=f"cuda-{batch}x{seq}", marks=NEEDS_CUDA)
    for batch, seq in [(4, 4096), (1, 16384)]
]
FORWARD_IMPLS = ["pytrain", "pytrain_inplace", "eager", "compile", "copy"]
TRAIN_IMPLS = ["pytrain", "eager", "compile"]


def make(device, batch, seq, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, seq, Q_HEADS, HEAD_DIM, device=device, dtype=dtype, generator=g)
    k = torch.randn(batch, seq, K_HEADS, HEAD_DIM, device=device, dtype=dtype, generator=g)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    return q, k, dq, dk


def reference_rotary(q, k, cos, sin):
    return reference.rotate(q, cos, sin), reference.rotate(k, cos, sin)


def cached_cos_sin(q):
    cos, sin = reference.rotary_cos_sin(torch.arange(q.shape[1], device=q.device), q.shape[-1])
    return cos.float(), sin.float()


def compiled_reference():
    torch._dynamo.reset()  # fresh caches: no recompile limit, no automatic-dynamic from earlier shapes
    return torch.compile(reference_rotary, dynamic=False)


def forward_fn(impl, q, k):
    if impl == "pytrain":
        return lambda: apply_rotary(q, k)
    if impl == "pytrain_inplace":
        return lambda: apply_rotary(q, k, inplace=True)  # rotates q, k further each call: norms stay the same
    if impl in ("eager", "compile"):
        fn, (cos, sin) = reference_rotary if impl == "eager" else compiled_reference(), cached_cos_sin(q)
        return lambda: fn(q, k, cos, sin)
    if impl == "copy":
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        return lambda: (q_out.copy_(q), k_out.copy_(k))
    raise ValueError(impl)


def train_fn(impl, q, k, dq, dk):
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    cos, sin = cached_cos_sin(q)
    if impl == "pytrain":
        op = apply_rotary
    else:
        rotate = reference_rotary if impl == "eager" else compiled_reference()
        op = lambda q, k: rotate(q, k, cos, sin)

    def step():
        q_out, k_out = op(q, k)
        return torch.autograd.grad((q_out, k_out), (q, k), (dq, dk))  # no .grad accumulation: the op's traffic only

    return step


@pytest.mark.parametrize("impl", FORWARD_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,batch,seq", CASES)
def test_forward(benchmark, bandwidth, device, batch, seq, dtype, impl):
    q, k, _, _ = make(device, batch, seq, DTYPES[dtype])
    with torch.no_grad():
        bandwidth(
            benchmark,
            forward_fn(impl, q, k),
            device=device,
            bytes_moved=2 * (q.nbytes + k.nbytes),
            copy_like=q,
            group=f"rotary fwd {device} {batch}x{seq} {dtype}",
            impl=impl,
        )


@pytest.mark.parametrize("impl", TRAIN_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,batch,seq", CASES)
def test_forward_backward(benchmark, bandwidth, device, batch, seq, dtype, impl):
    q, k, dq, dk = make(device, batch, seq, DTYPES[dtype])
    bandwidth(
        benchmark,
        train_fn(impl, q, k, dq, dk),
        device=device,
        bytes_moved=4 * (q.nbytes + k.nbytes),
        copy_like=q,
        group=f"rotary fwd+bwd {device} {batch}x{seq} {dtype}",
        impl=impl,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,batch,seq", CASES)
def test_results_agree(device, batch, seq, dtype):
    """Sanity: the rows above compute the same thing (loose: bf16 rounding; this is not the test suite)."""
    q, k, _, _ = make(device, batch, seq // 8, DTYPES[dtype])
    want_q, want_k = reference.apply_rotary(q.double(), k.double())
    for impl in ("pytrain", "eager", "compile"):
        got_q, got_k = forward_fn(impl, q, k)()
        for got, want in ((got_q, want_q), (got_k, want_k)):
            torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2, msg=lambda m: f"{impl}: {m}")
