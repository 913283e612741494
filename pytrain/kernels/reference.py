"""Plain-PyTorch references for every op in pytrain.kernels: the test oracle and the fallback.

They compute in fp32 (or in the input's precision when it is float64, for tests) and return the
input's dtype, as the fused kernels do.
"""
import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    xf = x.to(_compute_dtype(x.dtype))
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.to(xf.dtype)).to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, base: float = 10000.0):
    """cos and sin of shape (*positions.shape, head_dim // 2) in fp32."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotates x (..., seq, heads, head_dim) by cos/sin (seq, head_dim // 2).

    interleaved=False rotates the two halves of head_dim (LLaMA/NeoX); True rotates adjacent pairs (GPT-J).
    """
    xf = x.to(_compute_dtype(x.dtype))
    cos = cos[:, None, :].to(xf.dtype)
    sin = sin[:, None, :].to(xf.dtype)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


def cross_entropy(logits, labels, ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean"):
    """F.cross_entropy over fp32 logits, returning an fp32 loss."""
    return F.cross_entropy(logits.to(_compute_dtype(logits.dtype)), labels, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction)
