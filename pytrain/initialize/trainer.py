"""initialize_trainer: wraps model, optimizer, schedule and schedulers into a Trainer, as InternLM's."""
from pytrain.config import Config
from pytrain.model import LMLoss
from pytrain.parallel import gpc
from pytrain.parallel.schedule import NonPipelineScheduler
from pytrain.train.trainer import Trainer


def initialize_trainer(model, optimizer, criterion=None, train_dataloader=None, test_dataloader=None,
                       lr_scheduler=None, beta2_scheduler=None, config: Config | None = None):
    """Returns (trainer, train_dataloader, test_dataloader, lr_scheduler), as InternLM's.

    The schedule comes from the config: gradient accumulation over data.micro_num micro-batches.
    """
    cfg = gpc.require_config(config)
    criterion = criterion if criterion is not None else LMLoss(label_smoothing=cfg.loss.label_smoothing)
    schedule = NonPipelineScheduler(micro_num=cfg.data.micro_num)
    trainer = Trainer(model, optimizer, schedule, criterion, device=gpc.device, lr_scheduler=lr_scheduler,
                      beta2_scheduler=beta2_scheduler)
    return trainer, train_dataloader, test_dataloader, lr_scheduler
