"""Correctness of pytrain.kernels.cross_entropy / CrossEntropyLoss / vocab_parallel_cross_entropy.

The oracle is `pytrain.kernels.reference.cross_entropy` (F.cross_entropy plus z-loss) evaluated in float64
on the very logits the kernel sees; gradients come from autograd of that reference. Tolerances are per
dtype, below. CUDA tests are the same comparisons on "cuda", skipped on machines without a GPU.
The vocab-parallel loss runs in 2 gloo processes and must equal the unsharded loss and gradient.
"""

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from markers import DEVICES
from rank_results import RankResults

import pytrain.kernels as K
from pytrain.kernels import CrossEntropyLoss, _backend, cross_entropy, reference, vocab_parallel_cross_entropy
from pytrain.kernels.cross_entropy import _shard_gradient, _shard_statistics

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f32", "bf16", "f16"]

# |got - want| <= atol * max(1, max|want|) + rtol * |want| against float64 on the same logits.
# The loss is fp32 accumulated over the vocab (fp32 rounding of the sum of exponentials, ~1e-6 relative),
# whatever the logits' dtype. The gradient is computed in fp32 and rounded once to the logits' dtype
# (bf16 ulp 2^-8, fp16 2^-11); reduction="none" rounds once more when scaled by grad_output in that dtype.
# atol is relative to the largest gradient entry (tiny softmax entries round relative to it).
LOSS_TOLERANCE = dict(rtol=2e-5, atol=2e-5)
GRAD_TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=4e-3),
    torch.float16: dict(rtol=2e-3, atol=5e-4),
}


def assert_close(got, want, tol, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(
        got.double().cpu(),
        want.cpu(),
        rtol=tol["rtol"],
        atol=tol["atol"] * scale,
        equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


def make_inputs(rows, vocab, dtype, device, seed=0, scale=2.0, ignored=0.2):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[torch.rand(rows, generator=g) < ignored] = -100
    return logits.to(device), labels.to(device)


def upstream_grad(reduction, rows, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((rows,) if reduction == "none" else (), generator=g, dtype=torch.float64) + 0.5


def reference_with_grad(logits, labels, grad_out, **options):
    x64 = logits.detach().double().cpu().requires_grad_()
    loss = reference.cross_entropy(x64, labels.cpu(), **options)
    loss.backward(grad_out)
    return loss.detach(), x64.grad


def kernel_with_grad(fn, logits, labels, grad_out, **options):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, labels, **options)
    loss.backward(grad_out.to(device=loss.device, dtype=loss.dtype))
    return loss.detach(), x.grad


def check_against_reference(rows, vocab, dtype, device, fn=cross_entropy, seed=0, scale=2.0, ignored=0.2, **options):
    logits, labels = make_inputs(rows, vocab, dtype, device, seed, scale, ignored)
    grad_out = upstream_grad(options.get("reduction", "mean"), rows, seed)
    loss, grad = kernel_with_grad(fn, logits, labels, grad_out, **options)
    loss_ref, grad_ref = reference_with_grad(logits, labels, grad_out, **options)
    assert loss.dtype == torch.float32 and grad.dtype == dtype and grad.device == logits.device
    assert_close(loss, loss_ref, LOSS_TOLERANCE, f"loss ({dtype})")
    assert_close(grad, grad_ref, GRAD_TOLERANCES[dtype], f"grad ({dtype})")


# ---------------------------------------------------------------------------------------------------
# Loss and gradient against float64.

SHAPES = [(1, 1), (1, 7), (5, 1001), (0, 10)]
OPTIONS = [
    dict(),
    dict(label_smoothing=0.1),
    dict(z_loss=1e-3),
    dict(label_smoothing=0.3, z_loss=1e-2),
]
OPTION_IDS = ["plain", "smoothing", "z-loss", "both"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows,vocab", SHAPES, ids=lambda s: str(s))
def test_matches_float64_reference(rows, vocab, dtype, options, reduction, device):
    check_against_reference(rows, vocab, dtype, device, reduction=reduction, **options)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_llm_vocab(dtype, reduction, device):
    check_against_reference(16, 32000, dtype, device, reduction=reduction, label_smoothing=0.1, z_loss=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_vocab_256k_few_rows(dtype, device):
    check_against_reference(3, 262144 + 3, dtype, device, ignored=0.0, label_smoothing=0.1, z_loss=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_threads_split_rows(dtype, threads, num_threads):
    num_threads(threads)
    check_against_reference(301, 257, dtype, "cpu", label_smoothing=0.1, reduction="none")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1e-3, 30.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_logit_scale(scale, dtype, device):
    """Near-uniform and very peaked softmaxes (exp of large negative differences underflows to 0)."""
    check_against_reference(16, 3000, dtype, device, scale=scale, z_loss=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_logits(device):
    """-inf logits (masked classes) take no probability and give a zero gradient."""
    logits, labels = make_inputs(4, 50, torch.float32, device, ignored=0.0)
    logits[:, 10:] = -float("inf")
    labels = labels % 10
    loss, grad = kernel_with_grad(cross_entropy, logits, labels, torch.tensor(1.0, dtype=torch.float64))
    want, grad_ref = reference_with_grad(logits, labels, torch.tensor(1.0, dtype=torch.float64))
    assert_close(loss, want, LOSS_TOLERANCE, "loss")
    assert_close(grad, grad_ref, GRAD_TOLERANCES[torch.float32], "grad")
    assert torch.equal(grad[:, 10:].cpu(), torch.zeros(4, 40))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_every_label_ignored(dtype, device):
    """mean is NaN (0 / 0, as F.cross_entropy); sum is 0; none is all zeros; every gradient is 0."""
    logits = torch.randn(6, 33, device=device).to(dtype)
    labels = torch.full((6,), -100, device=device)
    for reduction, want in (("mean", float("nan")), ("sum", 0.0)):
        loss, grad = kernel_with_grad(cross_entropy, logits, labels, torch.tensor(1.0), reduction=reduction)
        assert torch.equal(loss.cpu(), torch.tensor(want)) or (loss.isnan().item() and want != want)
        assert torch.equal(grad.cpu(), torch.zeros(6, 33, dtype=dtype))
        assert reference.cross_entropy(logits, labels, reduction=reduction).cpu().isnan().item() == (want != want)
    loss, grad = kernel_with_grad(cross_entropy, logits, labels, torch.ones(6), reduction="none")
    assert torch.equal(loss.cpu(), torch.zeros(6)) and torch.equal(grad.cpu(), torch.zeros(6, 33, dtype=dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_custom_ignore_index_and_int32_labels(device):
    logits, labels = make_inputs(9, 40, torch.float32, device, ignored=0.0)
    labels[::3] = 7  # 7 is now the ignored class
    grad_out = torch.tensor(1.0, dtype=torch.float64)
    want = reference_with_grad(logits, labels, grad_out, ignore_index=7)
    for given_labels in (labels, labels.int()):
        got = kernel_with_grad(cross_entropy, logits, given_labels, grad_out, ignore_index=7)
        assert_close(got[0], want[0], LOSS_TOLERANCE, "loss")
        assert_close(got[1], want[1], GRAD_TOLERANCES[torch.float32], "grad")


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims(device):
    """logits (batch, seq, vocab) with labels (batch, seq): reduction="none" keeps labels' shape."""
    logits, labels = make_inputs(12, 30, torch.float32, device)
    loss = cross_entropy(logits.view(3, 4, 30), labels.view(3, 4), reduction="none")
    assert loss.shape == (3, 4)
    assert_close(
        loss, reference.cross_entropy(logits.double(), labels, reduction="none").view(3, 4), LOSS_TOLERANCE, "loss"
    )


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_and_inference_mode(device):
    logits, labels = make_inputs(8, 100, torch.bfloat16, device)
    want = reference.cross_entropy(logits.double(), labels, label_smoothing=0.1)
    with torch.inference_mode():
        assert_close(cross_entropy(logits, labels, label_smoothing=0.1), want, LOSS_TOLERANCE, "inference loss")
    with torch.no_grad():
        loss = cross_entropy(logits.requires_grad_(), labels, label_smoothing=0.1)
    assert not loss.requires_grad
    assert_close(loss, want, LOSS_TOLERANCE, "no_grad loss")


def test_second_backward_is_refused():
    """The backward scales the saved gradient in place: a second backward must fail, not be wrong."""
    logits, labels = make_inputs(4, 10, torch.float32, "cpu")
    x = logits.requires_grad_()
    loss = cross_entropy(x, labels) * 2.0
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_agrees_with_torch_cross_entropy():
    """reference.cross_entropy (the oracle) is F.cross_entropy when z_loss is 0."""
    logits, labels = make_inputs(20, 17, torch.float64, "cpu")
    for reduction in ("mean", "sum", "none"):
        want = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.2, reduction=reduction)
        torch.testing.assert_close(
            reference.cross_entropy(logits, labels, label_smoothing=0.2, reduction=reduction), want
        )


def test_z_loss_reference_formula():
    logits, labels = make_inputs(5, 9, torch.float64, "cpu", ignored=0.0)
    plain = reference.cross_entropy(logits, labels, reduction="none")
    with_z = reference.cross_entropy(logits, labels, reduction="none", z_loss=0.5)
    torch.testing.assert_close(with_z - plain, 0.5 * logits.logsumexp(-1) ** 2)


# ---------------------------------------------------------------------------------------------------
# Property tests.


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(0, 40),
    vocab=st.integers(1, 5000),
    dtype=st.sampled_from(DTYPES),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    label_smoothing=st.sampled_from([0.0, 0.05, 0.5]),
    z_loss=st.sampled_from([0.0, 1e-4, 0.1]),
    ignored=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_property_cpu(rows, vocab, dtype, reduction, label_smoothing, z_loss, ignored, seed):
    check_against_reference(
        rows,
        vocab,
        dtype,
        "cpu",
        seed=seed,
        ignored=ignored,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
    )


@pytest.mark.cuda
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(0, 300),
    vocab=st.integers(1, 70000),
    dtype=st.sampled_from(DTYPES),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    label_smoothing=st.sampled_from([0.0, 0.1]),
    z_loss=st.sampled_from([0.0, 1e-3]),
    seed=st.integers(0, 2**16),
)
def test_property_cuda(rows, vocab, dtype, reduction, label_smoothing, z_loss, seed):
    rows = min(rows, max(1, 2**21 // vocab))
    check_against_reference(
        rows, vocab, dtype, "cuda", seed=seed, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss
    )


# ---------------------------------------------------------------------------------------------------
# Module, model loss, exports.


@pytest.mark.parametrize("device", DEVICES)
def test_module(device):
    loss_fn = CrossEntropyLoss(ignore_index=-1, label_smoothing=0.1, reduction="sum", z_loss=1e-3)
    assert "label_smoothing=0.1" in repr(loss_fn) and "reduction='sum'" in repr(loss_fn)
    logits, labels = make_inputs(7, 64, torch.bfloat16, device, ignored=0.0)
    labels[0] = -1
    options = dict(ignore_index=-1, label_smoothing=0.1, reduction="sum", z_loss=1e-3)
    grad_out = torch.tensor(1.0, dtype=torch.float64)
    got = kernel_with_grad(lambda x, y: loss_fn(x, y), logits, labels, grad_out)
    want = reference_with_grad(logits, labels, grad_out, **options)
    assert_close(got[0], want[0], LOSS_TOLERANCE, "loss")
    assert_close(got[1], want[1], GRAD_TOLERANCES[torch.bfloat16], "grad")


def test_lm_loss_uses_the_kernel():
    from pytrain.model import LMLoss

    logits, labels = make_inputs(2 * 5, 40, torch.bfloat16, "cpu")
    got = LMLoss(label_smoothing=0.1)(logits.view(2, 5, 40), labels.view(2, 5))
    assert_close(got, reference.cross_entropy(logits.double(), labels, label_smoothing=0.1), LOSS_TOLERANCE, "loss")


def test_package_exports():
    assert K.cross_entropy is cross_entropy and K.CrossEntropyLoss is CrossEntropyLoss
    assert K.vocab_parallel_cross_entropy is vocab_parallel_cross_entropy


# ---------------------------------------------------------------------------------------------------
# Bad arguments: a TypeError / ValueError that names the argument, never a crash.


@pytest.mark.parametrize(
    "logits,labels,kwargs,error,match",
    [
        ([[1.0]], torch.zeros(1, dtype=torch.long), {}, TypeError, r"^logits must be a torch\.Tensor"),
        (torch.ones(2, 3), [0, 1], {}, TypeError, r"^labels must be a torch\.Tensor"),
        (
            torch.ones(2, 3, dtype=torch.float64),
            torch.zeros(2, dtype=torch.long),
            {},
            TypeError,
            r"^logits has dtype torch\.float64",
        ),
        (torch.ones(2, 3), torch.zeros(2), {}, TypeError, r"^labels has dtype torch\.float32"),
        (torch.ones(2, 3), torch.zeros(2, dtype=torch.int16), {}, TypeError, r"^labels has dtype torch\.int16"),
        (torch.ones(2, 3), torch.zeros(3, dtype=torch.long), {}, ValueError, r"^labels must have shape \(2,\)"),
        (torch.ones(2, 3), torch.zeros(2, 1, dtype=torch.long), {}, ValueError, r"^labels must have shape \(2,\)"),
        (torch.ones(3, 2).t(), torch.zeros(2, dtype=torch.long), {}, ValueError, r"^logits must be contiguous"),
        (torch.ones(2, 3), torch.zeros(4, dtype=torch.long)[::2], {}, ValueError, r"^labels must be contiguous"),
        (torch.ones(2, 0), torch.zeros(2, dtype=torch.long), {}, ValueError, r"vocab\) must be at least 1"),
        (torch.tensor(1.0), torch.zeros((), dtype=torch.long), {}, ValueError, r"^logits must have at least 1"),
        (torch.ones(2, 3), torch.tensor([0, 3]), {}, ValueError, r"^labels must be in \[0, 3\) .* found 3"),
        (torch.ones(2, 3), torch.tensor([-5, 1]), {}, ValueError, r"^labels must be in \[0, 3\) .* found -5"),
        (torch.ones(2, 3), torch.tensor([-100, 1]), {"ignore_index": 0}, ValueError, r"found -100"),
        (torch.ones(2, 3), torch.tensor([0, 1]), {"label_smoothing": 1.0}, ValueError, r"^label_smoothing must be"),
        (torch.ones(2, 3), torch.tensor([0, 1]), {"label_smoothing": -0.1}, ValueError, r"^label_smoothing must"),
        (torch.ones(2, 3), torch.tensor([0, 1]), {"z_loss": -1.0}, ValueError, r"^z_loss must be"),
        (torch.ones(2, 3), torch.tensor([0, 1]), {"z_loss": float("nan")}, ValueError, r"^z_loss must be"),
        (torch.ones(2, 3), torch.tensor([0, 1]), {"reduction": "avg"}, ValueError, r"^reduction must be one of"),
        (torch.ones(2, 3), torch.tensor([0, 1]), {"ignore_index": 1.5}, TypeError, r"^ignore_index must be an int"),
        (
            torch.ones(2, 3),
            torch.tensor([0, 1], device="meta"),
            {},
            ValueError,
            r"^tensors must be on one device: logits on cpu, labels on meta",
        ),
    ],
    ids=[
        "logits-list",
        "labels-list",
        "logits-f64",
        "labels-float",
        "labels-int16",
        "labels-length",
        "labels-2d",
        "logits-transposed",
        "labels-strided",
        "vocab-0",
        "logits-0d",
        "label-too-big",
        "label-negative",
        "ignore-index-moved",
        "smoothing-1",
        "smoothing-negative",
        "z-negative",
        "z-nan",
        "reduction",
        "ignore-index-float",
        "devices",
    ],
)
def test_bad_arguments(logits, labels, kwargs, error, match):
    with pytest.raises(error, match=match):
        cross_entropy(logits, labels, **kwargs)


@pytest.mark.cuda
def test_cuda_out_of_range_label_is_an_error_not_a_fault():
    with pytest.raises(ValueError, match=r"found 10"):
        cross_entropy(torch.ones(2, 10, device="cuda"), torch.tensor([1, 10], device="cuda"))
    torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------
# torch.library registration and torch.compile.


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction,labels_checked", [("mean", False), ("none", False), ("mean", True)])
def test_opcheck(reduction, labels_checked, device):
    """torch.library's own checks. With a gradient, AOT dispatch is left to the torch.compile tests below:
    the op's second output is the gradient its own backward scales in place, which AOT's partitioner
    rejects when that output is also a graph output (the public op never returns it)."""
    logits, labels = make_inputs(6, 21, torch.float32, device)
    torch.library.opcheck(
        torch.ops.pytrain.cross_entropy_forward.default,
        (logits.requires_grad_(), labels, -100, 0.1, 1e-3, reduction, True, False),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    torch.library.opcheck(
        torch.ops.pytrain.cross_entropy_forward.default,
        (logits.detach(), labels, -100, 0.0, 0.0, reduction, False, labels_checked),
    )
    grad = torch.randn(6, 21, device=device)
    torch.library.opcheck(torch.ops.pytrain.scale_saved_grad_.default, (grad, torch.rand(6, device=device)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph_matches_eager(reduction, device):
    torch._dynamo.reset()
    logits, labels = make_inputs(10, 300, torch.float32, device)

    def f(x, y):
        return cross_entropy(x, y, label_smoothing=0.1, z_loss=1e-3, reduction=reduction) * 3.0

    grad_out = upstream_grad(reduction, 10)
    eager = kernel_with_grad(f, logits, labels, grad_out)
    got = kernel_with_grad(torch.compile(f, fullgraph=True), logits, labels, grad_out)
    for name, e, g in zip(("loss", "grad"), eager, got):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_torch_compile_dynamic_bf16():
    torch._dynamo.reset()
    compiled = torch.compile(cross_entropy, fullgraph=True, dynamic=True, backend="aot_eager")
    for rows in (4, 9):
        logits, labels = make_inputs(rows, 64, torch.bfloat16, "cpu")
        grad_out = torch.tensor(1.0, dtype=torch.float64)
        for name, e, g in zip(
            ("loss", "grad"),
            kernel_with_grad(cross_entropy, logits, labels, grad_out),
            kernel_with_grad(compiled, logits, labels, grad_out),
        ):
            torch.testing.assert_close(g, e, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------
# The plain-PyTorch fallback when the compiled module is missing.


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fallback_matches_reference(dtype, monkeypatch):
    """As if pytrain._C had not been built: one warning, then the reference computes loss and gradient."""
    monkeypatch.setattr(_backend, "_loaded", {})
    monkeypatch.setitem(_backend._MODULE_FOR_DEVICE, "cpu", "pytrain._C_not_built")
    logits, labels = make_inputs(7, 90, dtype, "cpu")
    grad_out = upstream_grad("none", 7)
    options = dict(label_smoothing=0.1, z_loss=1e-3, reduction="none")
    with pytest.warns(RuntimeWarning, match=r"pytrain\._C_not_built is not built"):
        fallback = kernel_with_grad(cross_entropy, logits, labels, grad_out, **options)
    want = reference_with_grad(logits, labels, grad_out, **options)
    assert fallback[0].dtype == torch.float32 and fallback[1].dtype == dtype
    assert_close(fallback[0], want[0], LOSS_TOLERANCE, "fallback loss")
    assert_close(fallback[1], want[1], GRAD_TOLERANCES[dtype], "fallback grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("vocab_start", [0, 5, 40])
def test_shard_kernels_match_their_references(dtype, vocab_start, monkeypatch):
    """The vocab-parallel building blocks (per-row statistics of a shard, gradient of a shard given the
    group's logsumexp), kernel vs the reference used when the kernel is missing."""
    logits, labels = make_inputs(11, 30, dtype, "cpu", ignored=0.3)
    labels = torch.where(labels >= 0, labels + 20, labels)  # some labels land in the shard, some do not
    got = _shard_statistics(logits, labels, vocab_start, -100, 0.1)
    want = reference.cross_entropy_shard_statistics(logits.double(), labels, vocab_start)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6)
    lse = torch.randn(11) + 5
    grad = _shard_gradient(logits, labels, lse, 0.5, vocab_start, 70, -100, 0.1, 1e-2)
    want = reference.cross_entropy_shard_gradient(
        logits.double(), labels, lse.double(), 0.5, vocab_start, 70, -100, 0.1, 1e-2
    )
    assert_close(grad, want, GRAD_TOLERANCES[dtype], "shard gradient")


@pytest.mark.parametrize("vocab", [32001, 32000], ids=["unaligned-rows", "aligned-rows"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_large_gradient_streams_past_the_cache(dtype, vocab, cpu_loops):
    """A gradient of at least stream_min_bytes is written with streaming stores (the target's entry
    fixed up after its row; rows of an odd vocab start unaligned, those of 32000 16-bit logits aligned,
    which the AVX2 loops stream straight from the registers), by the forward and by the vocab-parallel
    shard gradient. Only the stores differ: the gradient equals, bit for bit, that of row blocks small
    enough for regular stores."""
    rows = _backend.extension(torch.device("cpu")).stream_min_bytes // (vocab * dtype.itemsize) + 1
    logits, labels = make_inputs(rows, vocab, dtype, "cpu")
    blocks = list(zip(logits.split(rows // 4), labels.split(rows // 4)))

    def forward_grad(x, y):
        x = x.clone().requires_grad_()
        cross_entropy(x, y, reduction="sum", label_smoothing=0.1).backward()
        return x.grad

    assert torch.equal(forward_grad(logits, labels), torch.cat([forward_grad(x, y) for x, y in blocks]))

    def shard_grad(x, y):
        return _shard_gradient(x, y, torch.logsumexp(x.float(), 1), 0.5, 0, vocab, -100, 0.1, 1e-2)

    assert torch.equal(shard_grad(logits, labels), torch.cat([shard_grad(x, y) for x, y in blocks]))


ROW_EDGE_VOCABS = [1, 15, 16, 17, 31, 32, 33, 100, 1001]  # around the AVX2 loops' blocks of 16 (and 32: max)


@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[3]], ids=[OPTION_IDS[0], OPTION_IDS[3]])
@pytest.mark.parametrize("vocab", ROW_EDGE_VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_loops_match_reference(dtype, vocab, options, cpu_loops):
    """Both CPU loops (AVX2 for 16-bit logits, generic) against float64, with vocab sizes in and around
    whole blocks (the tail takes the generic loop; rows of odd vocabs start unaligned), every label
    position of a block and the tail (labels = row % vocab), forward and vocab-parallel shard gradient."""
    rows = max(vocab, 3)
    logits, _ = make_inputs(rows, vocab, dtype, "cpu")
    labels = torch.arange(rows) % vocab
    grad_out = upstream_grad("none", rows)
    loss, grad = kernel_with_grad(cross_entropy, logits, labels, grad_out, reduction="none", **options)
    loss_ref, grad_ref = reference_with_grad(logits, labels, grad_out, reduction="none", **options)
    assert_close(loss, loss_ref, LOSS_TOLERANCE, f"loss ({dtype})")
    assert_close(grad, grad_ref, GRAD_TOLERANCES[dtype], f"grad ({dtype})")
    lse = torch.logsumexp(logits.double(), 1)
    shard = _shard_gradient(logits, labels, lse.float(), 0.5, 0, vocab, -100, 0.1, 1e-2)
    want = reference.cross_entropy_shard_gradient(logits.double(), labels, lse, 0.5, 0, vocab, -100, 0.1, 1e-2)
    assert_close(shard, want, GRAD_TOLERANCES[dtype], "shard gradient")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_cpu_avx2_loops_agree_with_generic_on_special_values(dtype):
    """Rows holding +inf, -inf, NaN, an all -inf row, huge and tiny logits: the AVX2 loops give the same
    losses (fp32 exp, to a few ulp) and the same gradients (to one ulp of the dtype) as the generic ones,
    NaN where they give NaN. The max pass skips NaN and the exp clamps at -87 and 88 alike."""
    ext = _backend.extension(torch.device("cpu"))
    if not ext.use_avx2(True):
        pytest.skip("this CPU has no AVX2")
    vocab = 50
    logits, labels = make_inputs(9, vocab, dtype, "cpu", ignored=0.0)
    logits[0, 3], logits[1, 20], logits[2, 40] = float("inf"), -float("inf"), float("nan")
    logits[3] = -float("inf")
    logits[4, 17] = 3e4 if dtype == torch.float16 else 1e30  # every other exponential underflows
    logits[5] *= 1e-30 if dtype == torch.bfloat16 else 1e-4
    logits[6, :16] = float("nan")  # a whole block
    logits[7, 48:] = float("inf")  # the tail
    results = {}
    try:
        for avx2 in (True, False):
            ext.use_avx2(avx2)
            results[avx2] = kernel_with_grad(cross_entropy, logits, labels, upstream_grad("none", 9), reduction="none")
    finally:
        ext.use_avx2(True)
    (loss_a, grad_a), (loss_g, grad_g) = results[True], results[False]
    torch.testing.assert_close(loss_a, loss_g, rtol=4e-6, atol=1e-6, equal_nan=True)
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(grad_a.double(), grad_g.double(), rtol=ulp, atol=1e-30, equal_nan=True)
    assert loss_a[2].isnan() and loss_a[6].isnan() and grad_a[2].isnan().all()


# ---------------------------------------------------------------------------------------------------
# Vocab-parallel cross-entropy in 2 gloo processes.

VOCAB_PARALLEL_CASES = [  # (dtype, vocab split over the 2 ranks, options, use the reference fallback)
    (torch.float32, (500, 501), dict(), False),
    (torch.float32, (40, 57), dict(reduction="mean", label_smoothing=0.1, host_checked=True), False),
    (torch.float32, (64, 64), dict(label_smoothing=0.1, z_loss=1e-3, reduction="sum"), False),
    (torch.bfloat16, (300, 77), dict(label_smoothing=0.2, reduction="none"), False),
    (torch.float32, (10, 13), dict(reduction="mean", z_loss=1e-2), True),
]


def _vocab_parallel_worker(rank, world, init_method, results):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        for case, (dtype, split, options, fallback) in enumerate(VOCAB_PARALLEL_CASES):
            if fallback:
                _backend._MODULE_FOR_DEVICE["cpu"] = "pytrain._C_not_built"
                _backend._loaded.clear()
                warnings.simplefilter("ignore", RuntimeWarning)
            logits, labels = make_inputs(23, sum(split), dtype, "cpu", seed=case)
            start = sum(split[:rank])
            shard = logits[:, start : start + split[rank]].contiguous().requires_grad_()
            options = dict(options)
            if options.pop("host_checked", False):  # labels checked and shard sizes known: no host read-back
                options.update(labels_checked=True, vocab_sizes=list(split))
            loss = vocab_parallel_cross_entropy(shard, labels, **options)
            grad_out = upstream_grad(options.get("reduction", "mean"), 23, seed=case)
            loss.backward(grad_out.float())
            results[(case, rank)] = (loss.detach(), shard.grad)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # about 8 s: test_parallel.py's tp2 layouts train through the vocab-parallel loss in the fast suite
def test_vocab_parallel_two_gloo_processes_equal_unsharded(init_method):
    with RankResults() as results:
        mp.spawn(_vocab_parallel_worker, args=(2, init_method, results), nprocs=2, join=True)
        results = dict(results)
    for case, (dtype, split, options, _) in enumerate(VOCAB_PARALLEL_CASES):
        options = {k: v for k, v in options.items() if k != "host_checked"}
        logits, labels = make_inputs(23, sum(split), dtype, "cpu", seed=case)
        grad_out = upstream_grad(options.get("reduction", "mean"), 23, seed=case)
        want_loss, want_grad = reference_with_grad(logits, labels, grad_out, **options)
        unsharded_loss, _ = kernel_with_grad(cross_entropy, logits, labels, grad_out, **options)
        for rank in range(2):
            loss, grad = results[(case, rank)]
            start = sum(split[:rank])
            assert_close(loss, want_loss, LOSS_TOLERANCE, f"case {case} rank {rank} loss")
            torch.testing.assert_close(loss, unsharded_loss, rtol=1e-5, atol=1e-5)
            assert_close(
                grad, want_grad[:, start : start + split[rank]], GRAD_TOLERANCES[dtype], f"case {case} rank {rank} grad"
            )


def test_vocab_parallel_needs_a_process_group():
    with pytest.raises(ValueError, match=r"initialized torch\.distributed process group"):
        vocab_parallel_cross_entropy(torch.ones(2, 3), torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------------------
# CUDA-only extras (skipped without a GPU).


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_unaligned_rows_take_the_scalar_path(dtype):
    """A vocab that is not a multiple of the 16-byte vector, and a storage offset: element loads."""
    check_against_reference(33, 32003, dtype, "cuda", label_smoothing=0.1)
    base, labels = make_inputs(9, 64, dtype, "cuda")
    logits = base.flatten()[3 : 3 + 8 * 64].view(8, 64)
    grad_out = torch.tensor(1.0, dtype=torch.float64)
    got = kernel_with_grad(cross_entropy, logits, labels[:8], grad_out)
    want = reference_with_grad(logits, labels[:8], grad_out)
    assert_close(got[0], want[0], LOSS_TOLERANCE, "loss")
    assert_close(got[1], want[1], GRAD_TOLERANCES[dtype], "grad")


@pytest.mark.cuda
def test_cuda_many_rows():
    check_against_reference(4096, 32000, torch.bfloat16, "cuda", reduction="sum", z_loss=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_labels_checked_reads_nothing_back(device, reduction, forbid_host_reads):
    """labels_checked=True: the same loss and gradient with no host read-back in the forward ("mean" divides by
    a device count). The backward is run outside the guard: on the CPU it reads grad_output to skip a multiply by
    1, which costs nothing there; on CUDA it never reads it."""
    logits, labels = make_inputs(17, 33, torch.float32, device, seed=4)
    grad_out = upstream_grad(reduction, 17, seed=4)
    want = kernel_with_grad(cross_entropy, logits, labels, grad_out, reduction=reduction, label_smoothing=0.1)
    x = logits.detach().clone().requires_grad_()
    with forbid_host_reads():
        loss = cross_entropy(x, labels, reduction=reduction, label_smoothing=0.1, labels_checked=True)
    loss.backward(grad_out.to(device=loss.device, dtype=loss.dtype))
    torch.testing.assert_close(loss.detach(), want[0])
    torch.testing.assert_close(x.grad, want[1])
    with forbid_host_reads():
        all_ignored = cross_entropy(x, torch.full_like(labels, -100), labels_checked=True)
    assert torch.isnan(all_ignored)  # as F.cross_entropy's mean over no token


def test_vocab_sizes_must_match_the_group(init_method):
    dist.init_process_group("gloo", init_method=init_method, rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match=r"vocab_sizes \[4, 5\] must list each of the group's 1 ranks"):
            vocab_parallel_cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), vocab_sizes=[4, 5])
    finally:
        dist.destroy_process_group()
