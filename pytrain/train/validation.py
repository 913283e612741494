"""Validation passes (data.valid_folder, valid_every, valid_micro_num): forward only, under the run's layout.

Each step's loss from the schedule is this rank's share of the step's global token mean (see
pytrain.parallel.schedule), so its sum over the data-parallel ranks / their count is the step's mean over
all its non-ignored labels; steps are then weighed by those label counts, so every validation token
counts once whatever the layout. Reported per validation set (a folder of .bin files, named by its
basename: en/, code/, ... are InternLM's dataset types) and over all sets: loss and perplexity.
"""

import math

import torch
import torch.distributed as dist

from pytrain.parallel.schedule import IGNORE_INDEX


@torch.no_grad()
def evaluate(trainer, loaders: dict, data_parallel_group) -> dict[str, float]:
    """{"val/<set>_loss", "val/<set>_ppl", ..., "val/loss", "val/ppl"}, the same on every rank."""
    world = dist.get_world_size(data_parallel_group) if data_parallel_group is not None else 1
    metrics, total_loss, total_tokens = {}, 0.0, 0.0
    trainer.eval()
    try:
        for name, loader in loaders.items():
            loss_sum, tokens = 0.0, 0.0
            for batch in loader:
                _, loss = trainer.execute_schedule(batch, forward_only=True, return_loss=True)
                count = (batch["labels"] != IGNORE_INDEX).sum().to(loss.device, torch.float32)
                both = torch.stack([loss.float(), count])
                if world > 1:
                    dist.all_reduce(both, group=data_parallel_group)
                mean, step_tokens = both[0].item() / world, both[1].item()
                loss_sum += mean * step_tokens
                tokens += step_tokens
            metrics[f"val/{name}_loss"] = loss_sum / max(tokens, 1.0)
            metrics[f"val/{name}_ppl"] = math.exp(min(metrics[f"val/{name}_loss"], 700.0))
            total_loss, total_tokens = total_loss + loss_sum, total_tokens + tokens
    finally:
        trainer.train()
    metrics["val/loss"] = total_loss / max(total_tokens, 1.0)
    metrics["val/ppl"] = math.exp(min(metrics["val/loss"], 700.0))
    return metrics
