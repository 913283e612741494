"""pytrain.kernels.linear: 16-bit GEMMs on fp32 copies where the CPU has no 16-bit units, PyTorch's elsewhere.

Both CPU paths run on any machine: `units` pretends the CPU has (or lacks) 16-bit dot-product units. Tolerance
rule (as for the other kernels): against a float64 reference, at most twice PyTorch's own same-dtype error plus
a floor of one 16-bit rounding of the result's scale.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pytrain.kernels import Linear, flash_attn_func, grouped_mm, linear, linear_cross_entropy, reference
from pytrain.kernels.linear import mm, multiplies_in_fp32

linear_module = importlib.import_module("pytrain.kernels.linear")  # the package's `linear` is the function
HALF = [torch.bfloat16, torch.float16]
FLOOR = {torch.bfloat16: 1e-2, torch.float16: 1e-3}


def pretend(patch, has_units: bool) -> None:
    """Makes pytrain.kernels.linear take the CPU path of a CPU with (or without) 16-bit dot-product units."""
    patch.setattr(linear_module, "_CPU_HAS_UNITS", dict.fromkeys(HALF, has_units))


@pytest.fixture(params=["fp32 copies", "native"])
def units(request, monkeypatch):
    """Which CPU path 16-bit tensors take: "fp32 copies" (no 16-bit units, this project's AVX2 CPU) or "native"."""
    pretend(monkeypatch, request.param == "native")
    return request.param


def linear_grads(x, weight, bias, grad, fn=linear):
    x, weight = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    inputs = [x, weight]
    if bias is not None:
        bias = bias.detach().clone().requires_grad_()
        inputs.append(bias)
    out = fn(x, weight, bias)
    return (out.detach(), *torch.autograd.grad(out, inputs, grad))


def assert_close_by_the_rule(got, x, weight, bias, grad):
    want = linear_grads(*(None if t is None else t.double() for t in (x, weight, bias, grad)), fn=F.linear)
    same_dtype = linear_grads(x, weight, bias, grad, fn=F.linear)  # PyTorch's own 16-bit kernel
    for name, g, w, p in zip(("out", "dx", "dweight", "dbias"), got, want, same_dtype):
        assert g.dtype == x.dtype and g.shape == w.shape, name
        scale = w.abs().max().item() if w.numel() else 0.0
        error = (g.double() - w).abs().max().item() if w.numel() else 0.0
        torch_error = (p.double() - w).abs().max().item() if w.numel() else 0.0
        assert error <= 2 * torch_error + FLOOR[x.dtype] * max(scale, 1.0), f"{name}: {error:.3g} vs {torch_error:.3g}"


def inputs(lead: tuple, in_features: int, out_features: int, dtype, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_features, generator=g).to(dtype)
    weight = (torch.randn(out_features, in_features, generator=g) / in_features**0.5).to(dtype)
    b = torch.randn(out_features, generator=g).to(dtype) if bias else None
    grad = torch.randn(*lead, out_features, generator=g).to(dtype)
    return x, weight, b, grad


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(37,), (3, 29), (), (0,)], ids=["2-D", "3-D", "1-D", "no rows"])
def test_linear_matches_float64(units, dtype, bias, lead):
    x, weight, b, grad = inputs(lead, 67, 45, dtype, bias)
    assert_close_by_the_rule(linear_grads(x, weight, b, grad), x, weight, b, grad)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 40),
    in_features=st.integers(1, 70),
    out_features=st.integers(1, 70),
    dtype=st.sampled_from(HALF),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_linear_on_fp32_copies(rows, in_features, out_features, dtype, bias, seed):
    x, weight, b, grad = inputs((rows,), in_features, out_features, dtype, bias, seed)
    assert multiplies_in_fp32(x) == (not linear_module._CPU_HAS_UNITS[dtype])
    with pytest.MonkeyPatch.context() as patch:
        pretend(patch, False)
        got = linear_grads(x, weight, b, grad)
    assert_close_by_the_rule(got, x, weight, b, grad)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("bias", [False, True])
def test_blocks_of_output_features_match_float64(monkeypatch, dtype, bias):
    """A linear split into blocks of output features (8 rows here, the last one short) gives what one GEMM does."""
    pretend(monkeypatch, False)
    monkeypatch.setattr(linear_module, "_MIN_BLOCK_ROWS", 8)
    monkeypatch.setattr(linear_module, "_FP32_BLOCK_BYTES", 1)
    x, weight, b, grad = inputs((3, 29), 67, 45, dtype, bias)
    assert len(linear_module._output_blocks(87, weight)) == 6
    assert_close_by_the_rule(linear_grads(x, weight, b, grad), x, weight, b, grad)


def largest_allocation(fn) -> int:
    """The most bytes any one op allocated (net) while fn ran, as the profiler sees the CPU allocator."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(event.cpu_memory_usage for event in prof.events())


@pytest.mark.parametrize("block_bytes, largest_mib", [(1 << 20, 4), (1 << 30, 8)], ids=["blocks", "one block"])
def test_fp32_temporaries_stay_within_a_block(monkeypatch, block_bytes, largest_mib):
    """A 4096-feature head over 512 tokens: its fp32 weight (4 MiB) and fp32 logits or logit gradients (8 MiB) are
    made a 512-feature block at a time, so no op allocates more than the 16-bit logits themselves (4 MiB). With one
    block (the control) the fp32 logits show: the probe sees what it should."""
    pretend(monkeypatch, False)
    monkeypatch.setattr(linear_module, "_FP32_BLOCK_BYTES", block_bytes)
    x = torch.randn(512, 256, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(4096, 256, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(512, 4096, dtype=torch.bfloat16)
    assert largest_allocation(lambda: linear(x, weight).backward(grad)) == largest_mib << 20


def test_fp32_copies_are_what_a_16bit_gemm_accumulating_in_fp32_gives(monkeypatch):
    """Exact products, fp32 sums, one rounding: equal to float64's result rounded once to bf16, up to the fp32
    sum's own error (far below a bf16 step)."""
    pretend(monkeypatch, False)
    x, weight, _, _ = inputs((64,), 256, 32, torch.bfloat16, False, seed=3)
    exact = (x.double() @ weight.double().t()).to(torch.bfloat16)
    got = linear(x, weight)
    assert (got != exact).float().mean().item() < 0.02  # a sum landing within fp32 error of a bf16 tie
    torch.testing.assert_close(got, exact, rtol=8e-3, atol=0)


def test_only_16bit_tensors_are_kept_for_the_backward(monkeypatch):
    """The fp32 copies are temporaries: what autograd keeps is the 16-bit model's activation memory."""
    pretend(monkeypatch, False)
    x, weight, b, _ = inputs((16,), 32, 8, torch.bfloat16, True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.dtype) or t, lambda t: t):
        linear(x.requires_grad_(), weight.requires_grad_(), b.requires_grad_())
    assert kept and set(kept) == {torch.bfloat16}


def test_frozen_weight_and_input_without_grad(units):
    x, weight, b, grad = inputs((9,), 12, 5, torch.bfloat16, True)
    weight.requires_grad_()
    out = linear(x, weight, b)  # x and bias need no gradient
    (dweight,) = torch.autograd.grad(out, weight, grad)
    torch.testing.assert_close(dweight.float(), (grad.float().t() @ x.float()), rtol=1e-2, atol=1e-2)


def test_which_tensors_take_fp32_copies(monkeypatch):
    pretend(monkeypatch, False)
    assert multiplies_in_fp32(torch.zeros(2, dtype=torch.bfloat16))
    assert multiplies_in_fp32(torch.zeros(2, dtype=torch.float16))
    assert not multiplies_in_fp32(torch.zeros(2, dtype=torch.float32))
    assert not multiplies_in_fp32(torch.zeros(2, dtype=torch.float64))
    assert not multiplies_in_fp32(torch.zeros(2, dtype=torch.bfloat16, device="meta"))
    pretend(monkeypatch, True)
    assert not multiplies_in_fp32(torch.zeros(2, dtype=torch.bfloat16))


def test_linear_refuses_mixed_dtypes(monkeypatch):
    pretend(monkeypatch, False)
    x = torch.zeros(2, 3, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="must share a dtype"):
        linear(x, torch.zeros(4, 3))
    with pytest.raises(TypeError, match="must share a dtype"):
        linear(x, torch.zeros(4, 3, dtype=torch.bfloat16), torch.zeros(4))


@pytest.mark.parametrize("dtype", HALF + [torch.float32])
def test_mm_into_out(units, dtype):
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(33, 20, generator=g).to(dtype), torch.randn(20, 11, generator=g).to(dtype)
    want = a.double() @ b.double()
    for out in (None, torch.empty(33, 11, dtype=dtype)):
        got = mm(a, b, out=out)
        assert got.dtype == dtype and (out is None or got is out)
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=2e-2)


def test_linear_module_is_an_nn_linear(units):
    layer = Linear(10, 4, bias=True).to(torch.bfloat16)
    assert isinstance(layer, torch.nn.Linear) and set(dict(layer.named_parameters())) == {"weight", "bias"}
    x = torch.randn(3, 10).to(torch.bfloat16)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("window", [(-1, -1), (40, 0)], ids=["causal", "window"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_attention_on_fp32_copies(units, window, kv_heads):
    """The CPU attention of 16-bit inputs (its fp32-copies path when `units` says none), against float64."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 150, 4, 32, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(2, 150, kv_heads, 32, generator=g).to(torch.bfloat16) for _ in range(2))
    dout = torch.randn(2, 150, 4, 32, generator=g).to(torch.bfloat16)

    def attention_grads(fn, *tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*leaves)
        return (out, *torch.autograd.grad(out, leaves, dout.to(out.dtype)))

    got = attention_grads(lambda a, b, c: flash_attn_func(a, b, c, causal=True, window_size=window), q, k, v)
    want = attention_grads(
        lambda a, b, c: reference.attention(a, b, c, causal=True, window_size=window),
        q.double(),
        k.double(),
        v.double(),
    )
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == torch.bfloat16 and a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=2e-2, msg=name)


def test_grouped_mm_and_linear_cross_entropy_on_fp32_copies(monkeypatch):
    pretend(monkeypatch, False)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 16, generator=g).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(3, 8, 16, generator=g).to(torch.bfloat16).requires_grad_()
    counts = torch.tensor([4, 0, 6])
    out = grouped_mm(x, weight, counts)
    want = reference.grouped_mm(x.double(), weight.double(), counts)
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)
    hidden = torch.randn(12, 16, generator=g).to(torch.bfloat16).requires_grad_()
    head = torch.randn(40, 16, generator=g).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 40, (12,), generator=g)
    loss = linear_cross_entropy(hidden, head, labels)
    grads = torch.autograd.grad(loss, (hidden, head))
    hidden64, head64 = (t.detach().double().requires_grad_() for t in (hidden, head))
    want_loss = F.cross_entropy(hidden64 @ head64.t(), labels)
    want_grads = torch.autograd.grad(want_loss, (hidden64, head64))
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-2, atol=1e-2)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=2e-3)


def test_bf16_training_on_fp32_copies_follows_the_native_kernels(monkeypatch):
    """A bf16 model (fp32 masters) trained 3 steps on each path: the same losses up to bf16 rounding."""
    from pytrain.model.families import LLAMA2
    from pytrain.model.loss import LMLoss
    from pytrain.parallel.model_part import parallelize
    from pytrain.solver import HybridZeroOptimizer

    ids = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(0))
    losses = {}
    for path in ("fp32 copies", "native"):
        pretend(monkeypatch, path == "native")
        torch.manual_seed(0)
        with torch.device("meta"):
            whole = LLAMA2.build(
                num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, dtype="torch.bfloat16"
            )
        model = parallelize(whole, device=torch.device("cpu"))
        optimizer = HybridZeroOptimizer(model, lr=1e-2, weight_decay=0.1, clip_grad_norm=1.0)
        losses[path] = []
        for _ in range(3):
            optimizer.zero_grad()
            loss = LMLoss()(model(input_ids=ids[:, :-1]), ids[:, 1:])
            optimizer.backward(loss)
            optimizer.step()
            losses[path].append(loss.item())
    assert losses["fp32 copies"][-1] < losses["fp32 copies"][0]
    torch.testing.assert_close(losses["fp32 copies"], losses["native"], rtol=2e-2, atol=0)


def test_linear_op_passes_opcheck_and_compiles_fullgraph(units):
    x, weight, b, _ = inputs((5, 7), 24, 10, torch.bfloat16, True)
    if units == "fp32 copies":
        torch.library.opcheck(linear_module._linear_in_fp32, (x, weight, b))
        torch.library.opcheck(
            linear_module._linear_in_fp32_backward, (torch.randn(5, 7, 10).to(x.dtype), x, weight, True, True, True)
        )
    leaves = [t.clone().requires_grad_() for t in (x, weight, b)]
    compiled = torch.compile(linear, fullgraph=True, backend="aot_eager")(*leaves)
    torch.testing.assert_close(compiled, linear(x, weight, b), rtol=0, atol=0)
    compiled.sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in leaves)


def test_selective_matmul_checkpointing_keeps_the_16bit_linear_output(monkeypatch):
    """Under the MATMULS policy the linear on fp32 copies is one matmul: its bf16 output is kept, no fp32 product."""
    from torch.utils.checkpoint import CheckpointPolicy

    from pytrain.parallel.recompute import _save_matmuls

    pretend(monkeypatch, False)
    assert _save_matmuls(None, torch.ops.pytrain.linear_in_fp32.default) is CheckpointPolicy.MUST_SAVE
    assert _save_matmuls(None, torch.ops.aten._to_copy.default) is CheckpointPolicy.PREFER_RECOMPUTE


def test_cpu_attention_compiles_fullgraph(units):
    q, k, v = (
        torch.randn(1, 64, 2, 16, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16) for i in range(3)
    )
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    attention = torch.compile(
        lambda a, b, c: flash_attn_func(a, b, c, causal=True), fullgraph=True, backend="aot_eager"
    )
    out = attention(*leaves)
    torch.testing.assert_close(out, flash_attn_func(q, k, v, causal=True), rtol=0, atol=0)
    out.sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in leaves)
