"""The Trainer: InternLM's loop shape over a model, an optimizer, a schedule and the schedulers.

trainer.zero_grad()
_, loss = trainer.execute_schedule(batch, forward_only=False, return_loss=True)
success, grad_norm = trainer.step()
"""

import torch

from pytrain.kernels.cross_entropy import check_labels_in_range
from pytrain.parallel.schedule import HOST_KEYS, IGNORE_INDEX


class Trainer:
    def __init__(
        self,
        model,
        optimizer,
        schedule,
        criterion,
        device: torch.device,
        lr_scheduler=None,
        beta2_scheduler=None,
        label_vocab_size: int | None = None,
    ):
        """label_vocab_size: check each step's labels against it on the host, before they move to the
        device, so the loss need not read them back per micro-batch (see LMLoss's labels_checked)."""
        self.model, self.optimizer, self.schedule, self.criterion = model, optimizer, schedule, criterion
        self.device, self.label_vocab_size = device, label_vocab_size
        self.lr_scheduler, self.beta2_scheduler = lr_scheduler, beta2_scheduler
        self.steps_taken = 0

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def execute_schedule(
        self, batch: dict, forward_only: bool = False, return_loss: bool = True, return_output_label: bool = False
    ):
        """Forward (and backward) over the batch's micro-batches; returns (outputs and labels or None, loss)."""
        if self.label_vocab_size is not None:
            check_labels_in_range(batch["labels"], self.label_vocab_size, IGNORE_INDEX)
        batch = {
            key: value if key in HOST_KEYS else value.to(self.device, non_blocking=True) for key, value in batch.items()
        }
        return self.schedule.forward_backward_step(
            self.model,
            batch,
            self.criterion,
            self.optimizer,
            forward_only=forward_only,
            return_loss=return_loss,
            return_output_label=return_output_label,
        )

    def step(self) -> tuple[bool, float]:
        """The optimizer step; the schedulers advance only when it succeeded (no inf/NaN gradients)."""
        success, grad_norm = self.optimizer.step()
        if success:
            self.steps_taken += 1
            for scheduler in (self.lr_scheduler, self.beta2_scheduler):
                if scheduler is not None:
                    scheduler.step()
        return success, grad_norm
