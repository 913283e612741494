import itertools
import math

import pytest
import torch
from torch import nn

from pytrain.solver import Beta2Scheduler, DynamicGradScaler, HybridZeroOptimizer, WarmupCosineLR, param_groups


def small_model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8, dtype=dtype), nn.LayerNorm(8, dtype=dtype), nn.Linear(8, 2, dtype=dtype))


def test_no_weight_decay_on_norms_and_biases():
    groups = param_groups(small_model(), 0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 4  # 2 biases, LN weight and bias


def test_warmup_then_cosine():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(opt, total_steps=100, warmup_ratio=0.1, eta_min=0.1)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(100):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup over 10 steps
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))


def internlm_lr(step, base, total_steps, init_steps, warmup_ratio, eta_min):
    """InternLM's FineTuneCosineAnnealingWarmupLR at `step`, written from its definition: 0 before init_steps,
    (t + 1 - init_steps) / warmup_steps * base during the warmup, then torch's CosineAnnealingLR over
    total_steps - (init_steps + warmup_steps) steps."""
    warmup_steps = int(total_steps * warmup_ratio)
    decay_start = init_steps + warmup_steps
    if step < init_steps:
        return 0.0
    if step < decay_start:
        return (step + 1 - init_steps) / warmup_steps * base
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps - decay_start, eta_min=eta_min)
    for _ in range(step - decay_start):
        opt.step()  # (no gradients: changes nothing; torch wants it before the scheduler's step)
        cosine.step()
    return opt.param_groups[0]["lr"]


@pytest.mark.parametrize("init_steps, warmup_ratio", [(0, 0.1), (5, 0.1), (7, 0.0), (30, 0.25)])
def test_lr_schedule_matches_internlm(init_steps, warmup_ratio):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = WarmupCosineLR(opt, total_steps=100, init_steps=init_steps, warmup_ratio=warmup_ratio, eta_min=0.1)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(100):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    expected = [internlm_lr(t, 2.0, 100, init_steps, warmup_ratio, 0.1) for t in range(101)]
    assert lrs == pytest.approx(expected, abs=1e-9)
    assert all(lr == 0.0 for lr in lrs[:init_steps])  # init_steps: lr 0 before the warmup starts


def test_beta2_schedule():
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], betas=(0.9, 0.95))
    constant = Beta2Scheduler(opt, init_beta2=0.95, c=0)
    for _ in range(5):
        constant.step()
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    growing = Beta2Scheduler(opt, init_beta2=0.9, c=0.8)
    for _ in range(1000):
        growing.step()
    assert opt.param_groups[0]["betas"][1] == pytest.approx(1 - 1000**-0.8)


def test_grad_scaler_hysteresis_backoff_and_growth():
    scaler = DynamicGradScaler(
        initial_scale=16,
        min_scale=2,
        growth_factor=2,
        backoff_factor=0.5,
        growth_interval=3,
        hysteresis=2,
        max_scale=64,
    )
    scaler.update(overflow=True)
    assert scaler.scale == 16  # first overflow absorbed by hysteresis
    scaler.update(overflow=True)
    assert scaler.scale == 8
    scaler.update(overflow=True)
    assert scaler.scale == 4
    for _ in range(3):
        scaler.update(overflow=False)
    assert scaler.scale == 8  # grew after growth_interval clean steps
    scaler.update(overflow=True)
    assert scaler.scale == 8  # hysteresis restored by the growth
    for _ in range(30):
        scaler.update(overflow=False)
    assert scaler.scale == 64  # capped
    for _ in range(30):
        scaler.update(overflow=True)
    assert scaler.scale == 2  # floored


def run_steps(optimizer, model, inputs, steps=3):
    for _ in range(steps):
        optimizer.zero_grad()
        optimizer.backward(model(inputs).float().pow(2).mean())
        success, norm = optimizer.step()
    return success, norm


def test_fp32_step_matches_torch_adamw_with_clipping():
    inputs = torch.randn(16, 4)
    model, reference = small_model(), small_model()
    ours = HybridZeroOptimizer(model, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, clip_grad_norm=0.05)
    theirs = torch.optim.AdamW(param_groups(reference, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(3):
        ours.zero_grad()
        ours.backward(model(inputs).pow(2).mean())
        success, norm = ours.step()
        theirs.zero_grad()
        reference(inputs).pow(2).mean().backward()
        expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05).item()
        theirs.step()
        assert success and norm == pytest.approx(expected_norm, rel=1e-5)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


def test_bf16_model_keeps_fp32_master_weights():
    model = small_model(torch.bfloat16)
    optimizer = HybridZeroOptimizer(model, lr=1e-3)
    assert optimizer.needs_master and all(m.dtype == torch.float32 for _, m, _ in optimizer.owned)
    assert len(optimizer.owned) == len(list(model.parameters()))  # unsharded: this rank owns everything
    before = [m.clone() for _, m, _ in optimizer.owned]
    success, _ = run_steps(optimizer, model, torch.randn(16, 4, dtype=torch.bfloat16), steps=1)
    assert success
    for (param, master, _), old in zip(optimizer.owned, before):
        assert not torch.equal(master, old)  # updates smaller than bf16's resolution still accumulate
        torch.testing.assert_close(param, master.to(torch.bfloat16), rtol=0, atol=0)


def test_bf16_step_matches_torch_adamw_on_fp32_masters_with_clipping():
    """The fused update of a bf16 model: its fp32 masters as torch.optim.AdamW moves fp32 copies given the same
    (clipped) gradients, and the model's weights are the masters rounded to bf16."""
    inputs = torch.randn(16, 4, dtype=torch.bfloat16)
    model = small_model(torch.bfloat16)
    ours = HybridZeroOptimizer(model, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, clip_grad_norm=0.05)
    copies = [nn.Parameter(p.detach().float()) for p in model.parameters()]
    decay = [c for c in copies if c.dim() >= 2]
    no_decay = [c for c in copies if c.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    theirs = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    grad_of = dict(zip(map(id, ours.model_params), ours.grad_views))  # each parameter's fp32 gradient
    for _ in range(3):
        ours.zero_grad()
        ours.backward(model(inputs).float().pow(2).mean())
        for copy, param in zip(copies, model.parameters()):
            copy.grad = grad_of[id(param)].clone()
        success, norm = ours.step()
        assert success and norm > 0.05  # clipped
        for copy in copies:
            copy.grad.mul_(0.05 / (norm + 1e-6))
        theirs.step()
    masters = {id(p): m for p, m, _ in ours.owned}
    for param, copy in zip(model.parameters(), copies):
        torch.testing.assert_close(masters[id(param)], copy.detach())
        assert torch.equal(param, masters[id(param)].to(torch.bfloat16))


def test_nan_gradient_skips_the_step_and_backs_off_the_scale():
    model = small_model(torch.float16)
    scaler = DynamicGradScaler(initial_scale=1024, hysteresis=1)
    optimizer = HybridZeroOptimizer(model, lr=1e-3, grad_scaler=scaler)
    before = [p.clone() for p in model.parameters()]
    optimizer.zero_grad()
    optimizer.backward(model(torch.randn(4, 4, dtype=torch.float16)).float().sum() * float("nan"))
    success, norm = optimizer.step()
    assert not success and math.isnan(norm)
    assert scaler.scale == 512
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    success, norm = run_steps(optimizer, model, torch.randn(4, 4, dtype=torch.float16), steps=1)
    assert success and math.isfinite(norm)


def test_loss_scale_is_divided_out():
    inputs = torch.randn(16, 4)
    norms = []
    for scale in (1.0, 1024.0):
        model = small_model()
        scaler = DynamicGradScaler(initial_scale=scale)
        optimizer = HybridZeroOptimizer(model, lr=1e-3, grad_scaler=scaler)
        norms.append(run_steps(optimizer, model, inputs, steps=1)[1])
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)
