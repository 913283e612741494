"""The language-model loss: next-token cross-entropy in fp32 over the kernels' fused op."""

import torch
from torch import nn

from pytrain.kernels import cross_entropy, vocab_parallel_cross_entropy


class LMLoss(nn.Module):
    """Mean cross-entropy over tokens whose label is not ignore_index (-100: padding, prompt, sample ends).

    A micro-batch whose every label is ignored contributes 0 (F.cross_entropy's mean would be NaN, and a
    NaN loss would make the optimizer skip the whole step).
    """

    def __init__(
        self,
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        vocab_parallel_group=None,
        labels_checked: bool = False,
        vocab_sizes=None,
    ):
        """vocab_parallel_group: the logits are this rank's vocabulary shard of that group's (tensor
        parallelism with parallel_output), of vocab_sizes (every rank's shard size) when given; None: whole
        logits. labels_checked: the caller has checked every label against the vocabulary on the host (the
        Trainer does, once per step), so the kernels never read labels back (a device sync per call)."""
        super().__init__()
        self.label_smoothing, self.ignore_index = label_smoothing, ignore_index
        self.vocab_parallel_group, self.labels_checked, self.vocab_sizes = (
            vocab_parallel_group,
            labels_checked,
            vocab_sizes,
        )

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        type_ids: torch.Tensor | None = None,
        type_losses: "TypeLosses | None" = None,
        tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mean loss; with type_losses, also adds each token's loss to its dataset type's sum there
        (type_ids: the tokens' types, shaped as labels). tokens: the count the loss sum is divided by, when these
        logits are only part of what the mean is over (a sequence-parallel rank's slice); None: labels' own."""
        labels = labels.reshape(-1)
        options = dict(
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction="sum" if type_losses is None else "none",
            labels_checked=self.labels_checked,
        )
        logits = logits.reshape(-1, logits.shape[-1])
        if self.vocab_parallel_group is not None:
            loss = vocab_parallel_cross_entropy(
                logits, labels, self.vocab_parallel_group, vocab_sizes=self.vocab_sizes, **options
            )
        else:
            loss = cross_entropy(logits, labels, **options)
        if type_losses is not None:
            type_losses.add(loss.detach(), labels != self.ignore_index, type_ids.reshape(-1))
            loss = loss.sum()
        if tokens is None:
            tokens = (labels != self.ignore_index).sum()
        return loss / tokens.clamp_min(1)


class TypeLosses:
    """Per dataset type (data.dataset_types), the sum of the token losses and the count of labelled tokens
    of one step, on the device, added without a host synchronization."""

    def __init__(self, num_types: int, device):
        self.sums = torch.zeros(num_types, dtype=torch.float32, device=device)
        self.counts = torch.zeros(num_types, dtype=torch.float32, device=device)

    def add(self, token_losses: torch.Tensor, labelled: torch.Tensor, type_ids: torch.Tensor) -> None:
        weight = labelled.to(torch.float32)
        self.sums.index_add_(0, type_ids, token_losses.float() * weight)
        self.counts.index_add_(0, type_ids, weight)
