"""Fused multi-tensor AdamW: torch.optim.AdamW's update over a list of fp32 tensors in one pass.

    adamw_step_(params, grads, exp_avgs, exp_avg_sqs, step=t, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                weight_decay=0.01, grad_scale=1.0, model_params=None)

params (the fp32 master weights), exp_avgs and exp_avg_sqs are updated in place; grads are read. Decoupled
weight decay and bias correction as torch.optim.AdamW (amsgrad and maximize off), for step t (1 on the
first update). grad_scale multiplies every gradient on the way in (gradient clipping's factor), so the
gradients need no pass of their own. model_params: the bf16 / fp16 (or fp32) model copies, each written
with its updated param rounded to its dtype in the same pass: no separate cast afterwards.

Eager AdamW streams each tensor through memory about a dozen times (an op per term); here each element
of param, grad and both moments is read once and written once, in pytrain._C (CPU, threads over element
ranges spanning tensors) or pytrain._C_cuda (CUDA, one launch for the whole list). A torch.library custom
op; without a compiled module the plain-PyTorch reference (torch's own sequence of ops) runs.
"""

import itertools
import math

import torch

from . import reference
from ._backend import DTYPE_CODES, SUPPORTED_DTYPES, extension, launch_args, parallelism
from ._checks import check_tensor

_MASTER_DTYPES = (torch.float32,)


def _table(params, grads, exp_avgs, exp_avg_sqs, model_params) -> tuple[torch.Tensor, int]:
    """The kernel's int64 table (csrc/adamw.h: a row per field, a column per non-empty tensor) on the
    tensors' device, and the number of elements over all of them. model_params: [] for none."""
    keep = [i for i, p in enumerate(params) if p.numel()]
    numels = [params[i].numel() for i in keep]
    starts = list(itertools.accumulate(numels, initial=0))[:-1]
    rows = [[tensors[i].data_ptr() for i in keep] for tensors in (params, grads, exp_avgs, exp_avg_sqs)]
    if model_params:
        rows += [[model_params[i].data_ptr() for i in keep], [DTYPE_CODES[model_params[i].dtype] for i in keep]]
    else:
        rows += [[0] * len(keep), [0] * len(keep)]
    rows += [starts, numels]
    return torch.tensor(rows, dtype=torch.int64).to(params[0].device), sum(numels)


@torch.library.custom_op("pytrain::adamw_step_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "model_params"))
def _step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    model_params: list[torch.Tensor],
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: float,
) -> None:
    table, total = _table(params, grads, exp_avgs, exp_avg_sqs, model_params)
    if total == 0:
        return
    # The scalars as torch computes them: in double, rounded to fp32 once where a tensor op takes them.
    extension(params[0].device).adamw_step(
        table.data_ptr(),
        table.shape[1],
        total,
        grad_scale=grad_scale,
        param_scale=1 - lr * weight_decay,
        one_minus_beta1=1 - beta1,
        beta2=beta2,
        one_minus_beta2=1 - beta2,
        neg_step_size=-lr / (1 - beta1**step),
        bias_correction2_sqrt=(1 - beta2**step) ** 0.5,
        eps=eps,
        parallelism=parallelism(params[0], total),
        **launch_args(params[0]),
    )


@_step.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, model_params, step, lr, beta1, beta2, eps, weight_decay, grad_scale):
    return None


def _check_lists(params, grads, exp_avgs, exp_avg_sqs, model_params) -> None:
    lists = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if model_params is not None:
        lists["model_params"] = model_params
    for name, tensors in lists.items():
        if not isinstance(tensors, (list, tuple)):
            raise TypeError(f"{name} must be a list of tensors, got {type(tensors).__name__}")
        if len(tensors) != len(params):
            raise ValueError(f"{name} holds {len(tensors)} tensors and params {len(params)}: one per parameter")
    for index, param in enumerate(params):
        for name, tensors in lists.items():
            tensor = tensors[index]
            dtypes = SUPPORTED_DTYPES if name == "model_params" else _MASTER_DTYPES
            check_tensor(f"{name}[{index}]", tensor, dtypes=dtypes, min_dim=0)
            if tensor.device != params[0].device:
                raise ValueError(
                    f"{name}[{index}] is on {tensor.device} and params[0] on {params[0].device}: use one device"
                )
            if tensor.shape != param.shape:
                raise ValueError(
                    f"{name}[{index}] has shape {tuple(tensor.shape)}; "
                    f"it must match params[{index}]'s {tuple(param.shape)}"
                )


def _check_scalars(step, lr, betas, eps, weight_decay, grad_scale) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1 (1 on the first update), got {step!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"betas must be two numbers in [0, 1), e.g. (0.9, 0.999); got {betas!r}")
    for name, value, low in (("lr", lr, 0.0), ("weight_decay", weight_decay, 0.0), ("grad_scale", grad_scale, 0.0)):
        if not (math.isfinite(value) and value >= low):
            raise ValueError(f"{name} must be a finite number >= {low}, got {value!r}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, e.g. 1e-8; got {eps!r}")


def adamw_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    *,
    step: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    grad_scale: float = 1.0,
    model_params: list[torch.Tensor] | None = None,
) -> None:
    """One AdamW update of every tensor in the lists, in place (see the module docstring). All fp32 and
    contiguous, one device, grads[i] / exp_avgs[i] / exp_avg_sqs[i] (and model_params[i]) shaped as params[i]."""
    _check_lists(params, grads, exp_avgs, exp_avg_sqs, model_params)
    _check_scalars(step, lr, betas, eps, weight_decay, grad_scale)
    if not params:
        return
    args = (step, float(lr), float(betas[0]), float(betas[1]), float(eps), float(weight_decay), float(grad_scale))
    lists = [list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(model_params or ())]
    if extension(params[0].device) is None:
        reference.adamw_step_(*lists, *args)
        return
    _step(*lists, *args)
