"""pytrain.kernels.adamw_step_ (the fused multi-tensor AdamW update) against torch.optim.AdamW.

The oracle is torch.optim.AdamW itself (single-tensor implementation, amsgrad and maximize off) run on copies
of the same tensors. Tolerance: torch.testing.assert_close's fp32 default (rtol 1.3e-6, atol 1e-5), the one
tests/test_solver.py compares the optimizer with; the kernel differs from torch's op-by-op sequence only by
fused multiply-adds (measured: a few fp32 ulps after 5 steps). The model copies must equal the updated master
rounded to their dtype exactly, and the plain-PyTorch fallback must equal torch.optim.AdamW bit for bit
(it is torch's sequence of ops). CUDA tests are the same comparisons on "cuda", skipped without a GPU.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from markers import DEVICES

from pytrain.kernels import _backend, adamw_step_

# odd sizes: empty, one element, not a multiple of any vector width, several dims
SHAPES = [(0,), (1,), (37,), (5, 129), (3, 4, 5), (2, 0, 3)]
HYPER = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def make_state(shapes, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(device) for s in shapes]
    grads = [[torch.randn(s, generator=g).to(device) for s in shapes] for _ in range(5)]  # one list per step
    return params, grads


def torch_adamw(params, grads_per_step, grad_scale=1.0, **hyper):
    """torch.optim.AdamW on copies: the updated params and its exp_avg / exp_avg_sq per param."""
    params = [p.clone().requires_grad_() for p in params]
    optimizer = torch.optim.AdamW(params, foreach=False, **hyper)
    for grads in grads_per_step:
        for p, grad in zip(params, grads):
            p.grad = grad * grad_scale if grad_scale != 1 else grad.clone()
        optimizer.step()
    state = [optimizer.state[p] for p in params]
    return [p.detach() for p in params], [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state]


def fused_adamw(params, grads_per_step, grad_scale=1.0, model_dtype=None, **hyper):
    params = [p.clone() for p in params]
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    models = [torch.empty_like(p, dtype=model_dtype) for p in params] if model_dtype else None
    for step, grads in enumerate(grads_per_step, start=1):
        adamw_step_(
            params, grads, exp_avgs, exp_avg_sqs, step=step, grad_scale=grad_scale, model_params=models, **hyper
        )
    return params, exp_avgs, exp_avg_sqs, models


def assert_all_close(got, want, what, **tolerance):
    for index, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g.cpu(), w.cpu(), msg=lambda m: f"{what}[{index}]: {m}", **tolerance)


def test_cpu_extension_has_the_kernel():
    assert hasattr(_backend.extension(torch.device("cpu")), "adamw_step")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_scale", [1.0, 0.37])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_torch_adamw(weight_decay, grad_scale, device):
    params, grads = make_state(SHAPES, device)
    hyper = {**HYPER, "weight_decay": weight_decay}
    got = fused_adamw(params, grads, grad_scale, **hyper)[:3]
    want = torch_adamw(params, grads, grad_scale, **hyper)
    for what, g, w in zip(("param", "exp_avg", "exp_avg_sq"), got, want):
        assert_all_close(g, w, what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_model_copies_are_the_rounded_masters(model_dtype, device):
    params, grads = make_state(SHAPES, device)
    masters, _, _, models = fused_adamw(params, grads, model_dtype=model_dtype, **HYPER)
    for master, model in zip(masters, models):
        assert model.dtype == model_dtype
        assert torch.equal(model, master.to(model_dtype))


def test_cpu_threads_split_elements_without_changing_a_bit(num_threads):
    """Thread ranges cut through tensors (sizes chosen so both threads get pieces of several)."""
    params, grads = make_state([(70001,), (3,), (65537,), (129, 5)], "cpu", seed=1)
    results = []
    for threads in (1, 2):
        num_threads(threads)
        results.append(fused_adamw(params, grads[:2], model_dtype=torch.bfloat16, **HYPER))
    for one, two in zip(*results):
        assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_fallback_is_torch_adamw_bit_for_bit(extension_missing):
    params, grads = make_state(SHAPES, "cpu")
    got = fused_adamw(params, grads, model_dtype=torch.bfloat16, **HYPER)
    want = torch_adamw(params, grads, **HYPER)
    for what, g, w in zip(("param", "exp_avg", "exp_avg_sq"), got, want):
        assert_all_close(g, w, what, rtol=0, atol=0)
    assert all(torch.equal(m, p.bfloat16()) for m, p in zip(got[3], got[0]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=6),
    lr=st.floats(1e-5, 1.0),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.5, 0.9999),
    eps=st.floats(1e-10, 1e-3),
    weight_decay=st.floats(0.0, 0.5),
    grad_scale=st.sampled_from([1.0, 0.5, 1e-3]),
    steps=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_property_matches_torch_adamw(sizes, lr, beta1, beta2, eps, weight_decay, grad_scale, steps, seed):
    params, grads = make_state([(n,) for n in sizes], "cpu", seed)
    hyper = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
    got = fused_adamw(params, grads[:steps], grad_scale, **hyper)[:3]
    want = torch_adamw(params, grads[:steps], grad_scale, **hyper)
    for what, g, w in zip(("param", "exp_avg", "exp_avg_sq"), got, want):
        assert_all_close(g, w, what)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    params, grads = make_state([(4, 3), (7,)], device)
    models = [p.to(torch.bfloat16) for p in params]
    moments = [[torch.rand_like(p) for p in params] for _ in range(2)]
    args = (params, grads[0], *moments, models, 2, 1e-3, 0.9, 0.95, 1e-8, 0.1, 1.0)
    torch.library.opcheck(torch.ops.pytrain.adamw_step_.default, args)


def _lists(n=2, **replace):
    lists = {name: [torch.zeros(3) for _ in range(n)] for name in ("params", "grads", "exp_avgs", "exp_avg_sqs")}
    lists.update(replace)
    return lists


@pytest.mark.parametrize(
    "lists, kwargs, error, match",
    [
        (_lists(grads=torch.zeros(3)), {}, TypeError, "grads must be a list of tensors"),
        (_lists(exp_avgs=[torch.zeros(3)]), {}, ValueError, "exp_avgs holds 1 tensors and params 2"),
        (_lists(grads=[torch.zeros(3), "x"]), {}, TypeError, r"grads\[1\] must be a torch.Tensor"),
        (_lists(params=[torch.zeros(3, dtype=torch.bfloat16)] * 2), {}, TypeError, r"params\[0\] has dtype"),
        (_lists(exp_avg_sqs=[torch.zeros(3), torch.zeros(4)]), {}, ValueError, r"exp_avg_sqs\[1\] has shape \(4,\)"),
        (_lists(grads=[torch.zeros(6)[::2]] * 2), {}, ValueError, r"grads\[0\] must be contiguous"),
        (
            _lists(),
            {"model_params": [torch.zeros(3, dtype=torch.int32)] * 2},
            TypeError,
            r"model_params\[0\] has dtype",
        ),
        (_lists(), {"step": 0}, ValueError, "step must be an int >= 1"),
        (_lists(), {"step": 1.0}, ValueError, "step must be an int >= 1"),
        (_lists(), {"betas": (0.9, 1.0)}, ValueError, "betas must be two numbers in"),
        (_lists(), {"betas": 0.9}, ValueError, "betas must be two numbers in"),
        (_lists(), {"eps": 0.0}, ValueError, "eps must be a finite number > 0"),
        (_lists(), {"lr": -1.0}, ValueError, "lr must be a finite number >= 0"),
        (_lists(), {"weight_decay": math.nan}, ValueError, "weight_decay must be a finite number"),
        (_lists(), {"grad_scale": math.inf}, ValueError, "grad_scale must be a finite number"),
    ],
)
def test_bad_arguments(lists, kwargs, error, match):
    with pytest.raises(error, match=match):
        adamw_step_(**lists, **{"step": 1, "lr": 1e-3, **kwargs})


def test_tensors_on_two_devices_are_refused():
    lists = _lists(grads=[torch.zeros(3), torch.zeros(3, device="meta")])
    with pytest.raises(ValueError, match=r"grads\[1\] is on meta and params\[0\] on cpu"):
        adamw_step_(**lists, step=1, lr=1e-3)
