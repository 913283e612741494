"""Argument checks shared by the ops: each error names the argument and what to do about it."""

import torch

from ._backend import SUPPORTED_DTYPES


def check_tensor(name: str, value, *, dtypes=SUPPORTED_DTYPES, min_dim: int = 1, contiguous: bool = True):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        names = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} has dtype {value.dtype}; supported: {names}")
    if value.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(value.shape)}")
    if contiguous and not value.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() on it first)")


def check_same_device(**tensors: torch.Tensor):
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"tensors must be on one device: {listed}")
