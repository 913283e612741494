"""AdamW on the step profile's model (Llama, 8 layers, hidden 512, vocabulary 32000: 60M parameters), fp32
and bf16 (fp32 masters), side by side in one run.

Group "adamw update": the update alone, over the same fp32 masters, gradients and moments, then (bf16) the
bf16 model weights set from the masters:
  pytrain         pytrain.kernels.adamw_step_: one pass, the bf16 weights written in the same pass
  torch_forloop   torch.optim.AdamW's default on the CPU (an op per term per tensor), then a cast per tensor:
                  the update today's optimizer made before the fused kernel
  torch_foreach   torch.optim.AdamW(foreach=True), then the casts
  torch_fused     torch.optim.AdamW(fused=True), then the casts
Group "optimizer step": HybridZeroOptimizer.step() as a whole (gradients gathered into the flat fp32 buffer,
the norm, clipping at 1.0, the update):
  pytrain         with the fused kernel
  before          as before it (bench/unfused.py: a clip pass, torch's AdamW ops, a cast pass)

Bytes moved are the update's minimum in every row: read param, grad and both moments, write param and both
moments (28 bytes per element), plus the bf16 weight written (2 more). `--benchmark-disable` runs each row
once on the step profile's 2-layer smoke-test model.
"""

import pytest
import torch

from pytrain.kernels import adamw_step_

from .conftest import NEEDS_CUDA
from .test_step_profile import FULL, SMOKE, pytrain_step
from .unfused import unfused

DTYPES = {"fp32": "torch.float32", "bf16": "torch.bfloat16"}
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]
HYPER = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def model_and_optimizer(benchmark, dtype: str, device: str):
    """The step profile's model (its smoke-test model under --benchmark-disable), gradients random."""
    model, optimizer = pytrain_step(FULL if benchmark.enabled else SMOKE, dtype, device)
    g = torch.Generator(device=device).manual_seed(0)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=g, device=device).to(param.dtype)
    return model, optimizer


def bytes_moved(optimizer) -> int:
    copy_bytes = sum(p.numel() * p.element_size() for p, _, _ in optimizer.owned if p.dtype != torch.float32)
    return sum(m.numel() for _, m, _ in optimizer.owned) * 28 + copy_bytes


def update_fn(impl, optimizer):
    """The update over the optimizer's own masters, gradients and (pytrain) moments."""
    owned = optimizer.owned
    masters, grads = [m for _, m, _ in owned], [optimizer.grad_views[index] for _, _, index in owned]
    copies = [(p, m) for p, m, _ in owned if p.dtype != torch.float32]
    if impl == "pytrain":
        exp_avgs = [optimizer.exp_avgs[id(m)] for m in masters]
        exp_avg_sqs = [optimizer.exp_avg_sqs[id(m)] for m in masters]
        models = [p for p, _ in copies] if copies else None
        step = iter(range(1, 1 << 30))
        return lambda: adamw_step_(
            masters, grads, exp_avgs, exp_avg_sqs, step=next(step), model_params=models, grad_scale=1.0, **HYPER
        )
    options = {
        "torch_forloop": dict(foreach=False),
        "torch_foreach": dict(foreach=True),
        "torch_fused": dict(fused=True),
    }
    for master, grad in zip(masters, grads):
        master.grad = grad
    torch_adamw = torch.optim.AdamW(masters, **HYPER, **options[impl])

    @torch.no_grad()
    def update():
        torch_adamw.step()
        for param, master in copies:
            param.copy_(master)

    return update


@pytest.mark.parametrize("impl", ["pytrain", "torch_forloop", "torch_foreach", "torch_fused"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_update(benchmark, bandwidth, device, dtype, impl):
    _, optimizer = model_and_optimizer(benchmark, DTYPES[dtype], device)
    bandwidth(
        benchmark,
        update_fn(impl, optimizer),
        device=device,
        bytes_moved=bytes_moved(optimizer),
        copy_like=optimizer.flat_grad,
        group=f"adamw update {device} 60M {dtype}",
        impl=impl,
    )


@pytest.mark.parametrize("impl", ["pytrain", "before"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_optimizer_step(benchmark, bandwidth, monkeypatch, device, dtype, impl):
    _, optimizer = model_and_optimizer(benchmark, DTYPES[dtype], device)

    def measure():
        bandwidth(
            benchmark,
            optimizer.step,
            device=device,
            bytes_moved=bytes_moved(optimizer),
            copy_like=optimizer.flat_grad,
            group=f"optimizer step {device} 60M {dtype}",
            impl=impl,
        )

    if impl == "before":
        with unfused(monkeypatch):
            measure()
    else:
        measure()
