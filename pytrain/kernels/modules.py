"""nn.Modules over the functional ops of pytrain.kernels."""

import torch
from torch import nn

from .cross_entropy import cross_entropy
from .flash_attn import flash_attn_func, flash_attn_varlen_func
from .linear import linear
from .linear_cross_entropy import linear_cross_entropy
from .packed import PackedSequences
from .rms_norm import rms_norm
from .rope_scaling import NO_SCALING, RopeScaling
from .rotary import CheckedPositions, apply_rotary


class Linear(nn.Linear):
    """nn.Linear through `linear`: the same parameters and names, 16-bit GEMMs at fp32 speed on CPUs without
    16-bit units."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """unit_offset: y scaled by (1 + weight) in fp32, the weight starting at 0 (Gemma's RMSNorm)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, device=None, dtype=None, unit_offset: bool = False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.full((hidden_size,), 0.0 if unit_offset else 1.0, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """y, or with `residual` (y, x + residual): the pre-norm decoder's add fused into the norm."""
        weight = self.weight.float() + 1.0 if self.unit_offset else self.weight
        return rms_norm(x, weight, self.eps, residual=residual)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (", unit_offset=True" if self.unit_offset else "")


class RotaryEmbedding(nn.Module):
    """apply_rotary with a fixed head_dim, base, convention and long-context scaling: forward(q, k, positions=None,
    inplace=False).

    Holds no tensors: the op caches its cos/sin table per (device, head_dim, base, scaling).
    """

    def __init__(
        self, head_dim: int, base: float = 10000.0, interleaved: bool = False, scaling: RopeScaling | None = None
    ):
        super().__init__()
        if head_dim <= 0 or head_dim % 2:
            raise ValueError(f"rotary embeddings need a positive even head_dim, got {head_dim}")
        self.head_dim, self.base, self.interleaved = head_dim, base, interleaved
        self.scaling = NO_SCALING if scaling is None else scaling

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        positions: torch.Tensor | CheckedPositions | PackedSequences | None = None,
        inplace: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(q, torch.Tensor) and q.shape[-1] != self.head_dim:
            raise ValueError(f"q's head_dim {q.shape[-1]} does not match this RotaryEmbedding's {self.head_dim}")
        return apply_rotary(q, k, positions, self.base, self.interleaved, inplace, self.scaling)

    def extra_repr(self) -> str:
        scaling = "" if self.scaling == NO_SCALING else f", scaling={self.scaling}"
        return f"{self.head_dim}, base={self.base}, interleaved={self.interleaved}{scaling}"


class CrossEntropyLoss(nn.Module):
    """cross_entropy with fixed options: forward(logits (..., vocab), labels (...)) -> fp32 loss."""

    def __init__(
        self, ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean", z_loss: float = 0.0
    ):
        super().__init__()
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing
        self.reduction, self.z_loss = reduction, z_loss

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, labels, self.ignore_index, self.label_smoothing, self.reduction, self.z_loss)

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
            f"reduction={self.reduction!r}, z_loss={self.z_loss}"
        )


class LinearCrossEntropyLoss(CrossEntropyLoss):
    """linear_cross_entropy with fixed options: forward(hidden (..., hidden_size), weight (vocab, hidden_size),
    labels (...)); the LM head's weight stays owned by the model (it may be tied to the embedding)."""

    def __init__(
        self,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        z_loss: float = 0.0,
        chunk_size: int | None = None,
    ):
        super().__init__(ignore_index, label_smoothing, reduction, z_loss)
        self.chunk_size = chunk_size

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(
            hidden,
            weight,
            labels,
            self.ignore_index,
            self.label_smoothing,
            self.reduction,
            self.z_loss,
            self.chunk_size,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}"


class FlashAttention(nn.Module):
    """Attention over q, k, v: (batch, seq, heads, head_dim), or packed (tokens, heads, head_dim) with
    cu_seqlens and max_seqlen. k/v may have fewer heads than q (GQA/MQA)."""

    def __init__(self, causal: bool = False, softmax_scale: float | None = None):
        super().__init__()
        self.causal, self.softmax_scale = causal, softmax_scale

    def forward(self, q, k, v, cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None):
        if cu_seqlens is None:
            return flash_attn_func(q, k, v, causal=self.causal, softmax_scale=self.softmax_scale)
        return flash_attn_varlen_func(
            q, k, v, cu_seqlens, max_seqlen, causal=self.causal, softmax_scale=self.softmax_scale
        )

    def extra_repr(self) -> str:
        return f"causal={self.causal}, softmax_scale={self.softmax_scale}"
