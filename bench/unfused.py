"""The training step as it was before the fused AdamW and SwiGLU kernels, for side-by-side rows in one run.

Inside `unfused(monkeypatch)`:
  - the decoder's MLP computes F.silu(gate) * up (two eager ops forward, three backward), and
  - HybridZeroOptimizer's update is torch.optim.AdamW's own sequence of ops per tensor (pytrain.kernels'
    reference), after an in-place pass that applies the clipping factor, then a cast of each 16-bit
    parameter from its master: the passes the previous optimizer made (clip, torch's AdamW, copy_).
"""

import contextlib

import torch
import torch.nn.functional as F

from pytrain.kernels import reference
from pytrain.model import decoder
from pytrain.solver import optimizer


def _eager_swiglu(gate, up):
    return F.silu(gate) * up


def _unfused_adamw_step_(
    params, grads, exp_avgs, exp_avg_sqs, *, step, lr, betas, eps, weight_decay, grad_scale, model_params
):
    if grad_scale != 1:
        torch._foreach_mul_(grads, grad_scale)
    reference.adamw_step_(params, grads, exp_avgs, exp_avg_sqs, [], step, lr, *betas, eps, weight_decay, 1.0)
    for model, master in zip(model_params or (), params):
        model.copy_(master)


@contextlib.contextmanager
def unfused(monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(decoder, "swiglu", _eager_swiglu)
        patch.setattr(optimizer, "adamw_step_", _unfused_adamw_step_)
        yield
