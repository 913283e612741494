"""Data-parallel AdamW with fp32 master weights, gradient clipping, inf/NaN skipping and fp16 loss scaling.

The model's gradients are gathered into one flat fp32 buffer, averaged over the data-parallel group in
buckets of reduce_bucket_size elements, unscaled, and checked: a step whose global gradient norm is inf
or NaN is skipped on every rank (the norm is computed after the reduce, so all ranks agree). Otherwise
the norm is clipped and AdamW updates the fp32 master weights, which are copied back into the model.
For an fp32 model the master weights are the model's parameters (no copy).

Sharding the master weights and Adam state over the zero1 group is the parallel issue's
HybridZeroOptimizer; this class is its unsharded base.
"""
import math

import torch
import torch.distributed as dist
from torch import nn

from .grad_scaler import DynamicGradScaler


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms and biases (1-D parameters) are not decayed."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class DataParallelOptimizer:
    def __init__(self, model: nn.Module, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 clip_grad_norm: float = 0.0, grad_scaler: DynamicGradScaler | None = None, group=None,
                 reduce_bucket_size: int = 512 * 1024 * 1024):
        self.clip_grad_norm = clip_grad_norm
        self.grad_scaler = grad_scaler
        self.group = group
        self.reduce_bucket_size = reduce_bucket_size
        groups = param_groups(model, weight_decay)
        self.model_params = [p for g in groups for p in g["params"]]
        self.needs_master = any(p.dtype != torch.float32 for p in self.model_params)
        if self.needs_master:
            self.master_params = [p.detach().float().requires_grad_() for p in self.model_params]
            by_id = dict(zip(map(id, self.model_params), self.master_params))
            groups = [{**g, "params": [by_id[id(p)] for p in g["params"]]} for g in groups]
        else:
            self.master_params = self.model_params
        numel = sum(p.numel() for p in self.model_params)
        self.flat_grad = torch.zeros(numel, dtype=torch.float32, device=self.model_params[0].device)
        self.grad_views, offset = [], 0  # master grads are views into the flat, reduced buffer
        for master in self.master_params:
            self.grad_views.append(self.flat_grad[offset:offset + master.numel()].view_as(master))
            offset += master.numel()
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def loss_scale(self) -> float:
        return self.grad_scaler.scale if self.grad_scaler else 1.0

    def zero_grad(self) -> None:
        for param in self.model_params:
            param.grad = None

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.loss_scale).backward()

    @torch.no_grad()
    def step(self) -> tuple[bool, float]:
        """Reduce, unscale, check, clip, update. Returns (success, global gradient norm before clipping)."""
        self._gather_and_reduce_grads()
        for master, view in zip(self.master_params, self.grad_views):
            master.grad = view
        norm = torch.linalg.vector_norm(self.flat_grad).item()
        if not math.isfinite(norm):
            if self.grad_scaler:
                self.grad_scaler.update(overflow=True)
            return False, norm
        if self.grad_scaler:
            self.grad_scaler.update(overflow=False)
        if self.clip_grad_norm > 0 and norm > self.clip_grad_norm:
            self.flat_grad.mul_(self.clip_grad_norm / (norm + 1e-6))
        self.optimizer.step()
        if self.needs_master:
            for param, master in zip(self.model_params, self.master_params):
                param.copy_(master)
        return True, norm

    def _gather_and_reduce_grads(self) -> None:
        for param, view in zip(self.model_params, self.grad_views):
            if param.grad is None:  # unused in this step's forward
                view.zero_()
            elif param.grad is not view:
                view.copy_(param.grad)
        world = dist.get_world_size(self.group) if dist.is_initialized() else 1
        if world > 1:
            for start in range(0, self.flat_grad.numel(), self.reduce_bucket_size):
                dist.all_reduce(self.flat_grad[start:start + self.reduce_bucket_size], group=self.group)
        scale = world * self.loss_scale
        if scale != 1:
            self.flat_grad.div_(scale)
