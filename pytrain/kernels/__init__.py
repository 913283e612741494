"""pytrain's kernels, usable alone: ``import pytrain.kernels`` pulls in nothing of the trainer.

Ops dispatch by device: CPU tensors to pytrain._C, CUDA tensors to pytrain._C_cuda; where a compiled
kernel is missing (not built, or not written yet) the plain-PyTorch reference in `reference` runs.

Fused today: rms_norm. Rotary embeddings and cross-entropy run their references until their kernels land.
"""
from . import reference
from .modules import RMSNorm, RotaryEmbedding
from .reference import apply_rotary, cross_entropy, rotary_cos_sin
from .rms_norm import rms_norm

__all__ = ["rms_norm", "apply_rotary", "rotary_cos_sin", "cross_entropy", "RMSNorm", "RotaryEmbedding", "reference"]
