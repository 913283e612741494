"""nn.Modules over the functional ops of pytrain.kernels."""
import torch
from torch import nn

from .reference import rotary_cos_sin
from .rms_norm import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions 0..seq_len-1, cached and grown on demand (not saved in state_dict)."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.head_dim, self.base = head_dim, base
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None or self._cache[0].shape[0] < seq_len or self._cache[0].device != device:
            positions = torch.arange(max(seq_len, 1), device=device)
            self._cache = rotary_cos_sin(positions, self.head_dim, self.base)
        cos, sin = self._cache
        return cos[:seq_len], sin[:seq_len]
