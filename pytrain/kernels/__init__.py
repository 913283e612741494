"""pytrain's kernels, usable alone: ``import pytrain.kernels`` pulls in nothing of the trainer.

Ops dispatch by device: CPU tensors to pytrain._C, CUDA tensors to pytrain._C_cuda; where a compiled
kernel is missing (not built) the plain-PyTorch reference in `reference` runs. Attention runs Triton on
CUDA and PyTorch's SDPA (per document for packed input) on the CPU.

Fused: rms_norm, apply_rotary, swiglu, cross_entropy (and vocab_parallel_cross_entropy),
linear_cross_entropy, flash_attn_func / flash_attn_varlen_func; adamw_step_ (a multi-tensor AdamW update).
linear (and the Linear module; pytrain.kernels.linear.mm for torch.mm): F.linear whose 16-bit GEMMs run at fp32
speed on CPUs without 16-bit units.
Mixture of experts: moe_permute / moe_unpermute (tokens to expert-grouped rows and back, weighted by the
routing weights) and grouped_mm (one GEMM per expert over those rows).
RopeScaling: a long-context rotary scaling (linear, dynamic NTK, Llama 3.1's) for apply_rotary / RotaryEmbedding.
PackedSequences: a packed micro-batch's sequence boundaries, checked once and passed to every layer's
attention and rotary call (no host synchronization per call); CheckedPositions: the same for unpacked rows'
positions (rotary).
"""

from . import reference
from .adamw import adamw_step_
from .cross_entropy import cross_entropy, vocab_parallel_cross_entropy
from .flash_attn import flash_attn_func, flash_attn_varlen_func
from .grouped_mm import grouped_mm
from .linear import linear
from .linear_cross_entropy import linear_cross_entropy
from .modules import CrossEntropyLoss, FlashAttention, Linear, LinearCrossEntropyLoss, RMSNorm, RotaryEmbedding
from .moe_permute import moe_permute, moe_unpermute
from .packed import PackedSequences
from .rms_norm import rms_norm
from .rope_scaling import RopeScaling
from .rotary import CheckedPositions, apply_rotary
from .swiglu import swiglu

__all__ = [
    "CheckedPositions",
    "CrossEntropyLoss",
    "FlashAttention",
    "Linear",
    "LinearCrossEntropyLoss",
    "PackedSequences",
    "RMSNorm",
    "RopeScaling",
    "RotaryEmbedding",
    "adamw_step_",
    "apply_rotary",
    "cross_entropy",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "grouped_mm",
    "linear",
    "linear_cross_entropy",
    "moe_permute",
    "moe_unpermute",
    "reference",
    "rms_norm",
    "swiglu",
    "vocab_parallel_cross_entropy",
]
