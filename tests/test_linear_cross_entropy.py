"""Correctness of pytrain.kernels.linear_cross_entropy / LinearCrossEntropyLoss against a float64 reference.

The oracle is `pytrain.kernels.reference.linear_cross_entropy` (hidden @ weight.T, then F.cross_entropy
plus z-loss) evaluated in float64 on the very inputs the op sees; gradients come from autograd of it.
The op's logits are rounded to the inputs' dtype before the loss (as eager's matmul output is), and its
grad_weight rounds each chunk's product to weight's dtype (summed in fp32): the tolerances below include both.
"""

import contextlib
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from markers import DEVICES

import pytrain.kernels as K
from pytrain.kernels import LinearCrossEntropyLoss, _backend, linear_cross_entropy, reference
from pytrain.kernels.linear_cross_entropy import MIN_CHUNK, default_chunk_size

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f32", "bf16", "f16"]

# |got - want| <= atol * max(1, max|want|) + rtol * |want|. Loss: fp32 accumulation, but bf16/fp16 logits
# carry one rounding of the dtype each (relative 2^-9 / 2^-12 of |logit| ~ 3 here). Gradients: one rounding
# of d loss / d logits to the dtype, then matmuls in the dtype (fp32 accumulation), then for grad_weight
# one rounding per chunk's product and one of the fp32 sum over chunks.
TOLERANCES = {
    torch.float32: dict(loss=(1e-5, 1e-5), grad=(1e-4, 1e-5)),
    torch.bfloat16: dict(loss=(1e-2, 1e-2), grad=(3e-2, 1.5e-2)),
    torch.float16: dict(loss=(2e-3, 2e-3), grad=(5e-3, 2e-3)),
}


def assert_close(got, want, dtype, kind, what):
    rtol, atol = TOLERANCES[dtype][kind]
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(
        got.double().cpu(),
        want.cpu(),
        rtol=rtol,
        atol=atol * scale,
        equal_nan=True,
        msg=lambda m: f"{what} ({dtype}): {m}",
    )


def make_inputs(tokens, hidden_size, vocab, dtype, device, seed=0, ignored=0.2):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64) / hidden_size**0.5 * 2).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[torch.rand(tokens, generator=g) < ignored] = -100
    return hidden.to(device), weight.to(device), labels.to(device)


def upstream_grad(reduction, tokens, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((tokens,) if reduction == "none" else (), generator=g, dtype=torch.float64) + 0.5


def with_grads(fn, hidden, weight, labels, grad_out, **options):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = fn(hidden, weight, labels, **options)
    loss.backward(grad_out.to(device=loss.device, dtype=loss.dtype))
    return loss.detach(), hidden.grad, weight.grad


def check_against_reference(
    tokens, hidden_size, vocab, dtype, device, fn=linear_cross_entropy, seed=0, ignored=0.2, **options
):
    hidden, weight, labels = make_inputs(tokens, hidden_size, vocab, dtype, device, seed, ignored)
    grad_out = upstream_grad(options.get("reduction", "mean"), tokens, seed)
    loss, grad_hidden, grad_weight = with_grads(fn, hidden, weight, labels, grad_out, **options)
    reference_options = {k: v for k, v in options.items() if k != "chunk_size"}
    want = with_grads(
        reference.linear_cross_entropy,
        hidden.double().cpu(),
        weight.double().cpu(),
        labels.cpu(),
        grad_out,
        **reference_options,
    )
    assert loss.dtype == torch.float32 and grad_hidden.dtype == dtype and grad_weight.dtype == dtype
    assert_close(loss, want[0], dtype, "loss", "loss")
    assert_close(grad_hidden, want[1], dtype, "grad", "grad_hidden")
    assert_close(grad_weight, want[2], dtype, "grad", "grad_weight")


# ---------------------------------------------------------------------------------------------------
# Against float64.


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("chunk_size", [1, 7, 64, None])
def test_matches_float64_reference(chunk_size, dtype, reduction, device):
    """Chunks of one token, uneven chunks (last one short), one chunk for everything, the default."""
    check_against_reference(
        45, 24, 301, dtype, device, chunk_size=chunk_size, reduction=reduction, label_smoothing=0.1, z_loss=1e-3
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "options", [dict(), dict(label_smoothing=0.2), dict(z_loss=1e-2)], ids=["plain", "smoothing", "z-loss"]
)
def test_options(options, device):
    check_against_reference(20, 16, 97, torch.float32, device, chunk_size=8, **options)


@pytest.mark.parametrize("device", DEVICES)
def test_one_token_and_leading_dims(device):
    check_against_reference(1, 8, 5, torch.float32, device, ignored=0.0)
    hidden, weight, labels = make_inputs(12, 8, 33, torch.float32, device)
    loss = linear_cross_entropy(hidden.view(3, 4, 8), weight, labels.view(3, 4), reduction="none", chunk_size=5)
    assert loss.shape == (3, 4)
    want = reference.linear_cross_entropy(hidden.double(), weight.double(), labels, reduction="none")
    assert_close(loss, want.view(3, 4), torch.float32, "loss", "loss")


@pytest.mark.parametrize("device", DEVICES)
def test_every_label_ignored(device):
    """mean is NaN (as F.cross_entropy), gradients are zero."""
    hidden, weight, labels = make_inputs(6, 8, 20, torch.float32, device, ignored=1.0)
    loss, grad_hidden, grad_weight = with_grads(linear_cross_entropy, hidden, weight, labels, torch.tensor(1.0))
    assert loss.isnan().item()
    assert torch.equal(grad_hidden.cpu(), torch.zeros(6, 8)) and torch.equal(grad_weight.cpu(), torch.zeros(20, 8))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_tokens(device):
    hidden, weight, labels = make_inputs(0, 8, 20, torch.float32, device)
    loss, grad_hidden, grad_weight = with_grads(
        linear_cross_entropy, hidden, weight, labels, torch.tensor(1.0), reduction="sum"
    )
    assert loss.item() == 0.0 and grad_hidden.shape == (0, 8) and torch.equal(grad_weight.cpu(), torch.zeros(20, 8))


@pytest.mark.parametrize("device", DEVICES)
def test_grad_of_one_input_and_no_grad(device):
    hidden, weight, labels = make_inputs(10, 8, 40, torch.float32, device)
    grad_out = torch.tensor(1.0, dtype=torch.float64)
    want = with_grads(reference.linear_cross_entropy, hidden.double(), weight.double(), labels, grad_out)
    h = hidden.clone().requires_grad_()
    linear_cross_entropy(h, weight, labels, chunk_size=3).backward()
    assert_close(h.grad, want[1], torch.float32, "grad", "grad_hidden (weight frozen)")
    with torch.no_grad():
        loss = linear_cross_entropy(h, weight, labels)
    assert not loss.requires_grad
    assert_close(loss, want[0], torch.float32, "loss", "no_grad loss")


def test_default_chunk_size():
    assert default_chunk_size(4096, 128256, torch.bfloat16) == 512  # 512 x 128256 x 2 B = 125 MiB
    assert default_chunk_size(4096, 128256, torch.float32) == MIN_CHUNK
    assert default_chunk_size(100, 32000, torch.bfloat16) == 100  # never more than the tokens
    assert default_chunk_size(0, 32000, torch.bfloat16) == 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tokens=st.integers(0, 70),
    hidden_size=st.integers(1, 40),
    vocab=st.integers(1, 400),
    dtype=st.sampled_from(DTYPES),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    label_smoothing=st.sampled_from([0.0, 0.1]),
    z_loss=st.sampled_from([0.0, 1e-3]),
    chunk_size=st.sampled_from([1, 16, None]),
    seed=st.integers(0, 2**16),
)
def test_property_cpu(tokens, hidden_size, vocab, dtype, reduction, label_smoothing, z_loss, chunk_size, seed):
    check_against_reference(
        tokens,
        hidden_size,
        vocab,
        dtype,
        "cpu",
        seed=seed,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        chunk_size=chunk_size,
    )


# ---------------------------------------------------------------------------------------------------
# Module, exports.


@pytest.mark.parametrize("device", DEVICES)
def test_module(device):
    loss_fn = LinearCrossEntropyLoss(label_smoothing=0.1, reduction="sum", chunk_size=4)
    assert "chunk_size=4" in repr(loss_fn) and "reduction='sum'" in repr(loss_fn)
    hidden, weight, labels = make_inputs(9, 16, 50, torch.float32, device)
    grad_out = torch.tensor(1.0, dtype=torch.float64)
    got = with_grads(lambda h, w, y: loss_fn(h, w, y), hidden, weight, labels, grad_out)
    want = with_grads(
        reference.linear_cross_entropy,
        hidden.double(),
        weight.double(),
        labels,
        grad_out,
        label_smoothing=0.1,
        reduction="sum",
    )
    for name, kind, g, w in zip(("loss", "grad_hidden", "grad_weight"), ("loss", "grad", "grad"), got, want):
        assert_close(g, w, torch.float32, kind, name)


def test_package_exports():
    assert K.linear_cross_entropy is linear_cross_entropy and K.LinearCrossEntropyLoss is LinearCrossEntropyLoss


# ---------------------------------------------------------------------------------------------------
# Bad arguments.

H, W, Y = torch.ones(3, 4), torch.ones(10, 4), torch.tensor([0, 1, 2])


@pytest.mark.parametrize(
    "hidden,weight,labels,kwargs,error,match",
    [
        ([[1.0]], W, Y, {}, TypeError, r"^hidden must be a torch\.Tensor"),
        (H, None, Y, {}, TypeError, r"^weight must be a torch\.Tensor"),
        (H, W, [0, 1, 2], {}, TypeError, r"^labels must be a torch\.Tensor"),
        (H.double(), W.double(), Y, {}, TypeError, r"^hidden has dtype torch\.float64"),
        (H, W.bfloat16(), Y, {}, TypeError, r"^weight has dtype torch\.bfloat16; use hidden's dtype"),
        (H, torch.ones(10, 5), Y, {}, ValueError, r"^weight must have shape \(vocab, 4\)"),
        (H, torch.ones(10), Y, {}, ValueError, r"^weight must have at least 2"),
        (H, torch.ones(0, 4), Y, {}, ValueError, r"^weight's first dimension \(vocab\) must be at least 1"),
        (H, W, Y[:2], {}, ValueError, r"^labels must have shape \(3,\)"),
        (torch.ones(4, 3).t(), W, Y, {}, ValueError, r"^hidden must be contiguous"),
        (H, torch.ones(4, 10).t(), Y, {}, ValueError, r"^weight must be contiguous"),
        (H, W, torch.tensor([0, 1, 10]), {}, ValueError, r"^labels must be in \[0, 10\) .* found 10"),
        (H, W, Y.float(), {}, TypeError, r"^labels has dtype torch\.float32"),
        (H, W, Y, {"chunk_size": 0}, ValueError, r"^chunk_size must be a positive int"),
        (H, W, Y, {"chunk_size": 2.5}, ValueError, r"^chunk_size must be a positive int"),
        (H, W, Y, {"reduction": "mean "}, ValueError, r"^reduction must be one of"),
        (H, W, Y, {"label_smoothing": 1.5}, ValueError, r"^label_smoothing must be in \[0, 1\)"),
        (H, W.to("meta"), Y, {}, ValueError, r"^tensors must be on one device: hidden on cpu, weight on meta"),
    ],
    ids=[
        "hidden-list",
        "weight-none",
        "labels-list",
        "hidden-f64",
        "weight-dtype",
        "weight-width",
        "weight-1d",
        "vocab-0",
        "labels-length",
        "hidden-transposed",
        "weight-transposed",
        "label-too-big",
        "labels-float",
        "chunk-0",
        "chunk-float",
        "reduction",
        "smoothing",
        "devices",
    ],
)
def test_bad_arguments(hidden, weight, labels, kwargs, error, match):
    with pytest.raises(error, match=match):
        linear_cross_entropy(hidden, weight, labels, **kwargs)


# ---------------------------------------------------------------------------------------------------
# torch.library registration, torch.compile, the fallback.


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    """With a gradient, AOT dispatch is covered by the torch.compile test (see test_cross_entropy.test_opcheck)."""
    hidden, weight, labels = make_inputs(9, 8, 30, torch.float32, device)
    torch.library.opcheck(
        torch.ops.pytrain.linear_cross_entropy_forward.default,
        (hidden.requires_grad_(), weight.requires_grad_(), labels, -100, 0.1, 1e-3, "mean", 4, True, False),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    torch.library.opcheck(
        torch.ops.pytrain.linear_cross_entropy_forward.default,
        (hidden.detach(), weight.detach(), labels, -100, 0.1, 1e-3, "none", 4, False, False),
    )
    torch.library.opcheck(
        torch.ops.pytrain.linear_cross_entropy_forward.default,
        (hidden.detach(), weight.detach(), labels, -100, 0.1, 1e-3, "mean", 4, False, True),
    )
    torch.library.opcheck(
        torch.ops.pytrain.linear_cross_entropy_backward.default,
        (torch.rand(9, device=device), hidden.detach(), weight.detach(), labels, -100, 0.0, 0.0, 4),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph_matches_eager(reduction, device):
    torch._dynamo.reset()
    hidden, weight, labels = make_inputs(20, 16, 70, torch.float32, device)

    def f(h, w, y):
        return linear_cross_entropy(h, w, y, label_smoothing=0.1, reduction=reduction, chunk_size=8) * 2.0

    grad_out = upstream_grad(reduction, 20)
    eager = with_grads(f, hidden, weight, labels, grad_out)
    got = with_grads(torch.compile(f, fullgraph=True), hidden, weight, labels, grad_out)
    for name, e, g in zip(("loss", "grad_hidden", "grad_weight"), eager, got):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_fallback_matches_reference(monkeypatch):
    monkeypatch.setattr(_backend, "_loaded", {})
    monkeypatch.setitem(_backend._MODULE_FOR_DEVICE, "cpu", "pytrain._C_not_built")
    hidden, weight, labels = make_inputs(10, 8, 40, torch.bfloat16, "cpu")
    grad_out = torch.tensor(1.0, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="falls back to plain-PyTorch references"):
        got = with_grads(linear_cross_entropy, hidden, weight, labels, grad_out, z_loss=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = with_grads(
            reference.linear_cross_entropy, hidden.double(), weight.double(), labels, grad_out, z_loss=1e-3
        )
    for name, kind, g, w in zip(("loss", "grad_hidden", "grad_weight"), ("loss", "grad", "grad"), got, want):
        assert_close(g, w, torch.bfloat16, kind, f"fallback {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_llm_like_shape(dtype):
    check_against_reference(1000, 256, 32003, dtype, "cuda", chunk_size=256, label_smoothing=0.1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_labels_checked_reads_nothing_back(device, reduction, forbid_host_reads):
    """labels_checked=True: the same loss and gradients with no host read-back in the forward (the backward runs
    outside the guard: on the CPU it reads grad_output to skip a multiply by 1; on CUDA it never reads it)."""
    hidden, weight, labels = make_inputs(21, 8, 30, torch.float32, device, seed=5)
    grad_out = torch.rand((21,) if reduction == "none" else (), device=device) + 0.5
    results = []
    for checked in (False, True):
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        with forbid_host_reads() if checked else contextlib.nullcontext():
            loss = linear_cross_entropy(h, w, labels, reduction=reduction, chunk_size=8, labels_checked=checked)
        loss.backward(grad_out)
        results.append((loss.detach(), h.grad, w.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_weight_grad_sums_many_chunks_in_fp32(device):
    """512 chunks of one token, each adding a same-signed ~1/vocab to every grad_weight entry: summed in bf16 the
    running sum outgrows them and rounds most of them off (6.4% off the float64 gradient, measured); summed in fp32
    and rounded once, 0.18%."""
    g = torch.Generator().manual_seed(0)
    tokens, hidden_size, vocab = 512, 16, 32
    hidden = (torch.rand(tokens, hidden_size, generator=g) + 0.5).bfloat16()  # positive: same-signed contributions
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.1).bfloat16()
    labels, one = torch.zeros(tokens, dtype=torch.long), torch.tensor(1.0)
    args = (hidden.to(device), weight.to(device), labels.to(device), one)
    _, _, got = with_grads(linear_cross_entropy, *args, reduction="sum", chunk_size=1)
    _, _, want = with_grads(
        reference.linear_cross_entropy, hidden.double(), weight.double(), labels, one, reduction="sum"
    )
    assert got.dtype == torch.bfloat16
    error = (got.cpu().double() - want).abs().max() / want.abs().max()
    assert error < 5e-3, f"grad_weight off by {error:.2%} of its largest entry"
