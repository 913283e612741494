"""Optimizer, learning-rate and beta2 schedules, loss scaling."""

from .grad_scaler import DynamicGradScaler
from .optimizer import HybridZeroOptimizer, param_groups
from .schedulers import Beta2Scheduler, WarmupCosineLR

__all__ = ["Beta2Scheduler", "DynamicGradScaler", "HybridZeroOptimizer", "WarmupCosineLR", "param_groups"]
