"""initialize_trainer: wraps model, optimizer, schedule and schedulers into a Trainer, as InternLM's."""

from pytrain.config import Config
from pytrain.model import DTYPES, LMLoss
from pytrain.parallel import gpc
from pytrain.parallel.model_part import ModelPart
from pytrain.parallel.pipeline import InterleavedPipelineScheduler, PipelineScheduler
from pytrain.parallel.schedule import NonPipelineScheduler
from pytrain.parallel.sequence import SequenceShardedLoss, SequenceSplit
from pytrain.parallel.zeropp import ZeroPPScheduler
from pytrain.train.trainer import Trainer


def initialize_trainer(
    model,
    optimizer,
    criterion=None,
    train_dataloader=None,
    test_dataloader=None,
    lr_scheduler=None,
    beta2_scheduler=None,
    config: Config | None = None,
):
    """Returns (trainer, train_dataloader, test_dataloader, lr_scheduler), as InternLM's.

    The schedule comes from the config: gradient accumulation over data.micro_num micro-batches without a
    pipeline, 1F1B with one, interleaved 1F1B with model.num_chunks > 1, ZeroPP's units with
    parallel.pipeline.use_zeropp. The default criterion is the
    vocab-parallel loss when the logits stay split over the tensor group (parallel_output).
    """
    cfg = gpc.require_config(config)
    isp = gpc.tensor_parallel_size > 1 and cfg.parallel.tensor.mode == "isp"
    if criterion is None:
        sharded_logits = gpc.tensor_parallel_size > 1 and cfg.model.parallel_output and not isp
        tensor = gpc.tensor_parallel_size
        criterion = LMLoss(
            label_smoothing=cfg.loss.label_smoothing,
            vocab_parallel_group=gpc.tensor_parallel_group if sharded_logits else None,
            labels_checked=True,  # the Trainer checks each step's labels on the host
            vocab_sizes=[cfg.model.vocab_size // tensor] * tensor if sharded_logits else None,
        )
    if isp:  # the logits are this rank's slice of the sequence
        if not isinstance(criterion, LMLoss):
            raise TypeError(
                "parallel.tensor.mode='isp' gives each rank the logits of its slice of the sequence: the criterion "
                f"must be a pytrain.model.LMLoss (which isp wraps to take the whole labels), got "
                f"{type(criterion).__name__}"
            )
        criterion = SequenceShardedLoss(criterion, SequenceSplit.of_mesh(gpc.mesh))
    if cfg.parallel.pipeline.size == 1:
        schedule = NonPipelineScheduler(data_parallel_group=gpc.data_parallel_group)
    else:
        _check_pipeline_stages(model, cfg.model.num_chunks)
        pipeline = dict(
            mesh=gpc.mesh,
            hidden_size=cfg.model.hidden_size,
            dtype=DTYPES[cfg.model.dtype],
            sequence_split=gpc.tensor_parallel_size if cfg.parallel.tensor.mode in ("msp", "isp") else 1,
        )
        if cfg.parallel.pipeline.use_zeropp:
            schedule = ZeroPPScheduler(
                **pipeline,
                num_chunks=cfg.model.num_chunks,
                unit_size=cfg.data.unit_schedule_size,
                overlap=cfg.parallel.pipeline.interleaved_overlap,
                decouple_grad=cfg.parallel.pipeline.decouple_grad,
            )
        elif cfg.model.num_chunks > 1:
            schedule = InterleavedPipelineScheduler(
                **pipeline, num_chunks=cfg.model.num_chunks, overlap=cfg.parallel.pipeline.interleaved_overlap
            )
        else:
            schedule = PipelineScheduler(**pipeline)
    trainer = Trainer(
        model,
        optimizer,
        schedule,
        criterion,
        device=gpc.device,
        lr_scheduler=lr_scheduler,
        beta2_scheduler=beta2_scheduler,
        label_vocab_size=cfg.model.vocab_size,
        dataset_types=getattr(train_dataloader, "dataset_types", None),
    )
    return trainer, train_dataloader, test_dataloader, lr_scheduler


def _check_pipeline_stages(model, num_chunks: int) -> None:
    """A pipelined model is this rank's ModelPart (initialize_model): num_chunks stages, each knowing
    whether it is the first or last."""
    stages = list(model.stages) if isinstance(model, ModelPart) else []
    if len(stages) != num_chunks or not all(hasattr(s, "first") and hasattr(s, "last") for s in stages):
        raise TypeError(
            f"parallel.pipeline.size > 1 needs this rank's pipeline stages as initialize_model() returns them (a "
            f"ModelPart of {num_chunks} stage(s), each with .first / .last and forward(input_ids=None, "
            f"hidden_states=None) as pytrain.model.Decoder); got {type(model).__name__}"
        )
