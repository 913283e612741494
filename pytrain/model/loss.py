"""The language-model loss: next-token cross-entropy in fp32 over the kernels' fused op."""
import torch
from torch import nn

from pytrain.kernels import cross_entropy


class LMLoss(nn.Module):
    """Mean cross-entropy over tokens whose label is not ignore_index (-100: padding, prompt, sample ends).

    A micro-batch whose every label is ignored contributes 0 (F.cross_entropy's mean would be NaN, and a
    NaN loss would make the optimizer skip the whole step).
    """

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = -100):
        super().__init__()
        self.label_smoothing, self.ignore_index = label_smoothing, ignore_index

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.reshape(-1)
        total = cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, ignore_index=self.ignore_index,
                              label_smoothing=self.label_smoothing, reduction="sum")
        return total / (labels != self.ignore_index).sum().clamp_min(1)
