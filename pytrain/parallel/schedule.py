"""Schedules run one optimizer step's forward and backward passes over its micro-batches."""

import torch


class NonPipelineScheduler:
    """Gradient accumulation without a pipeline: micro-batch by micro-batch, forward then backward.

    Each micro-batch's loss is divided by micro_num, so the accumulated gradient is that of the mean loss.
    """

    def __init__(self, micro_num: int):
        self.micro_num = micro_num

    def forward_backward_step(
        self,
        model,
        batch: dict,
        criterion,
        optimizer,
        forward_only: bool = False,
        return_loss: bool = True,
        return_output_label: bool = False,
    ):
        micro_num = batch["input_ids"].shape[0]
        if micro_num != self.micro_num:
            raise ValueError(f"the batch holds {micro_num} micro-batches; data.micro_num is {self.micro_num}")
        total_loss = torch.zeros((), dtype=torch.float32, device=batch["input_ids"].device)
        outputs, labels = [], []
        for index in range(micro_num):
            input_ids, label = batch["input_ids"][index], batch["labels"][index]
            with torch.set_grad_enabled(not forward_only):
                output = model(input_ids)
                loss = criterion(output, label) / micro_num
            if not forward_only:
                optimizer.backward(loss, last=index == micro_num - 1)
            total_loss += loss.detach().float()
            if return_output_label:
                outputs.append(output.detach())
                labels.append(label)
        return (outputs, labels) if return_output_label else None, total_loss if return_loss else None
