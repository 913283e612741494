"""The Trainer: InternLM's loop shape over a model, an optimizer, a schedule and the schedulers.

trainer.zero_grad()
_, loss = trainer.execute_schedule(batch, forward_only=False, return_loss=True)
success, grad_norm = trainer.step()

Mixture-of-experts models: before each schedule the Trainer sets every MoE layer's aux_loss_weight
(pytrain.model.moe) to moe_loss_coeff x the optimizer's loss scale / the step's micro-batches, so the
load-balancing loss enters the gradient as moe_loss_coeff x the mean over micro-batches (and, through the
optimizer's gradient average, over data-parallel ranks) of each micro-batch's sum over layers, under any
schedule; `moe_loss()` is that sum over this rank's layers, averaged over the step's micro-batches.
"""

import torch

from pytrain.data import DataError
from pytrain.kernels.cross_entropy import check_labels_in_range
from pytrain.model import LMLoss, TypeLosses
from pytrain.model.moe import moe_layers
from pytrain.parallel.fsdp import reshard_fsdp
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
        moe_loss_coeff: float | None = None,
        dataset_types: list[str] | None = None,
    ):
        """label_vocab_size: check each step's labels against it on the host, before they move to the
        device, so the loss need not read them back per micro-batch (see LMLoss's labels_checked).
        moe_loss_coeff: the MoE aux loss's weight (None: the launched run's loss.moe_loss_coeff, else
        InternEvo's default 1.0). dataset_types: the data's type names (batch["type_ids"] index them); with
        several and an LMLoss criterion, each training step also counts tokens and sums losses per type
        (type_stats())."""
        self.model, self.optimizer, self.schedule, self.criterion = model, optimizer, schedule, criterion
        self.moe_layers = moe_layers(model)
        if moe_loss_coeff is None:
            from pytrain.parallel import gpc

            moe_loss_coeff = gpc.config.loss.moe_loss_coeff if gpc.config is not None else 1.0
        self.moe_loss_coeff = float(moe_loss_coeff)
        self.device, self.label_vocab_size = device, label_vocab_size
        self.lr_scheduler, self.beta2_scheduler = lr_scheduler, beta2_scheduler
        self.steps_taken = 0
        per_type = dataset_types is not None and len(dataset_types) > 1 and isinstance(criterion, LMLoss)
        self.num_types = len(dataset_types) if per_type else 0
        self._type_stats: tuple[torch.Tensor, TypeLosses] | None = None

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
            try:
                check_labels_in_range(batch["labels"], self.label_vocab_size, IGNORE_INDEX)
            except ValueError as err:  # the data's vocabulary, not a bug: a message, not a traceback mid-run
                raise DataError(
                    f"a batch's {err}: the data holds token ids beyond model.vocab_size={self.label_vocab_size}; "
                    f"set model.vocab_size to the tokenizer's vocabulary size"
                ) from None
        options = {}
        self._type_stats = None
        if self.num_types and not forward_only:
            tokens = torch.bincount(batch["type_ids"].flatten(), minlength=self.num_types).to(torch.float32)
            options["type_losses"] = TypeLosses(self.num_types, self.device)
            self._type_stats = (tokens, options["type_losses"])
        batch = {
            key: value if key in HOST_KEYS else value.to(self.device, non_blocking=True) for key, value in batch.items()
        }
        if self.moe_layers:
            # the gradient of the aux loss is handed out by each layer's backward (pytrain.model.moe), after the
            # loss scale has been applied to the LM loss: so it carries the scale too
            weight = (
                self.moe_loss_coeff * float(getattr(self.optimizer, "loss_scale", 1.0)) / batch["input_ids"].shape[0]
            )
            for layer in self.moe_layers:
                layer.aux_loss_weight = weight
                layer.reset_aux_losses()
        result = self.schedule.forward_backward_step(
            self.model,
            batch,
            self.criterion,
            self.optimizer,
            forward_only=forward_only,
            return_loss=return_loss,
            return_output_label=return_output_label,
            **options,
        )
        if forward_only:  # FSDP units that keep their gathered parameters after forward wait for a backward
            reshard_fsdp(self.model)
        return result

    def type_stats(self) -> torch.Tensor | None:
        """The last training step's (3, dataset types) float32 on the device: this rank's tokens of each type,
        their loss sum and labelled-token count (the loss on the last pipeline stage only); None when the step
        did not count them (one type, or another criterion)."""
        if self._type_stats is None:
            return None
        tokens, losses = self._type_stats
        return torch.stack([tokens.to(self.device), losses.sums, losses.counts])

    def moe_loss(self) -> torch.Tensor | None:
        """The last schedule's MoE aux loss on this rank (sum over its layers, mean over the micro-batches;
        without moe_loss_coeff), or None for a dense model. Under pipeline parallelism each stage holds only
        its layers' share: the step monitor sums the stages'."""
        if not self.moe_layers:
            return None
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for layer in self.moe_layers:
            if layer.aux_loss_count:
                total = total + layer.aux_loss_sum.float() / layer.aux_loss_count
        return total

    def step(self) -> tuple[bool, float]:
        """The optimizer step; the schedulers advance only when it succeeded (no inf/NaN gradients)."""
        success, grad_norm = self.optimizer.step()
        if success:
            self.steps_taken += 1
            for scheduler in (self.lr_scheduler, self.beta2_scheduler):
                if scheduler is not None:
                    scheduler.step()
        return success, grad_norm
