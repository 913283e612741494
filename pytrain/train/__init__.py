"""InternLM's training-construction functions: build the model, the optimizer and the data loader.

Each reads the launched run's config (pytrain.parallel.gpc.config) unless one is passed explicitly.
"""

import torch
import torch.distributed as dist
from torch import nn

from pytrain.config import Config, ConfigError
from pytrain.data import BUILTIN_CORPUS, build_train_loader, build_valid_loaders
from pytrain.parallel import gpc
from pytrain.parallel.fsdp import FSDPSettings
from pytrain.parallel.model_part import ModelPart, parallelize
from pytrain.parallel.recompute import SelectiveCheckpoint, SelectivePolicy
from pytrain.registry import MODEL_INITIALIZER
from pytrain.solver import Beta2Scheduler, DynamicGradScaler, HybridZeroOptimizer, WarmupCosineLR

from .trainer import Trainer

__all__ = ["Trainer", "get_train_data_loader", "initialize_model", "initialize_optimizer"]


def fsdp_settings(cfg: Config) -> FSDPSettings | None:
    """How torch's fully_shard shards the model: FSDP over zero1 (parallel.zero1.fsdp), isp's weight parallelism
    (parallel.weight: always regathered for the backward, as InternEvo), or None (not sharded)."""
    weight = cfg.parallel.weight
    if weight.size > 1:
        return FSDPSettings(
            reshard_after_forward=True, unit_per_linear=weight.forward_overlap_per == "module", prefetch=weight.overlap
        )
    return FSDPSettings(cfg.parallel.zero1.reshard_after_forward) if cfg.parallel.zero1.fsdp else None


def initialize_model(config: Config | None = None) -> nn.Module:
    """MODEL_INITIALIZER[config.model_type](**config.model), as this rank's part under the run's layout.

    A built-in family is built whole on the meta device (no memory), then cut into this rank's pipeline
    stage(s), split over its tensor group and materialized holding only its shards (pytrain.parallel.
    parallelize): a ModelPart. A user-registered model without a tensor-parallel plan is built on the
    device and runs whole (data parallelism only)."""
    cfg = gpc.require_config(config)
    builder = MODEL_INITIALIZER.get_module(cfg.model_type)
    if cfg.model.get("dtype") == "torch.tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    with torch.device("meta"):
        whole = builder(**cfg.model)
    if hasattr(whole, "tensor_parallel_plan"):
        return parallelize(
            whole,
            gpc.mesh,
            device=gpc.device,
            sequence_parallel=gpc.tensor_parallel_size > 1 and cfg.parallel.tensor.mode == "msp",
            num_chunks=cfg.model.get("num_chunks", 1),
            fp32_norms=cfg.use_fp32_norm,
            seed=gpc.seed,
            selective=selective_checkpoint(cfg),
            fsdp=fsdp_settings(cfg),
        )
    if cfg.parallel.zero1.fsdp:
        raise ConfigError(
            f"parallel.zero1.fsdp=True: model_type {cfg.model_type!r}'s builder returned a {type(whole).__name__} "
            f"without tensor_parallel_plan(), whose layers FSDP cannot find; build it from pytrain.model.decoder."
            f"Decoder, or use fsdp=False (ZeRO-1)"
        )
    if gpc.tensor_parallel_size > 1 or gpc.pipeline_parallel_size > 1:
        raise ConfigError(
            f"model_type {cfg.model_type!r}: its builder returned a {type(whole).__name__} without "
            f"tensor_parallel_plan(), so it cannot be split over parallel.tensor / parallel.pipeline; build it "
            f"from pytrain.model.decoder.Decoder, or use tensor.size=1 and pipeline.size=1"
        )
    torch.manual_seed(gpc.seed)  # every data-parallel replica draws the same initial weights
    with torch.device(gpc.device):
        model = builder(**cfg.model)
    return ModelPart([model])


def selective_checkpoint(cfg: Config) -> SelectiveCheckpoint | None:
    """The config's selective activation checkpointing (selective_checkpoint*), None when off."""
    if not cfg.selective_checkpoint:
        return None
    policy = SelectivePolicy(cfg.selective_checkpoint_policy)
    return SelectiveCheckpoint(policy, offload=cfg.selective_checkpoint_offload)


def initialize_optimizer(model: nn.Module, config: Config | None = None):
    """AdamW (adam section) with clipping, loss scaling for fp16, and the schedulers.

    Returns (optimizer, beta2_scheduler, lr_scheduler), as InternLM's.
    """
    cfg = gpc.require_config(config)
    adam, scaler_cfg = cfg.adam, cfg.grad_scaler
    grad_scaler = None
    if cfg.model.dtype in ("torch.float16", "torch.half"):
        grad_scaler = DynamicGradScaler(
            initial_scale=scaler_cfg.fp16.initial_scale,
            min_scale=scaler_cfg.fp16.min_scale,
            growth_interval=scaler_cfg.fp16.growth_interval,
            growth_factor=scaler_cfg.growth_factor,
            backoff_factor=scaler_cfg.backoff_factor,
            hysteresis=scaler_cfg.hysteresis,
            max_scale=scaler_cfg.max_scale,
        )
    optimizer = HybridZeroOptimizer(
        model,
        lr=adam.lr,
        betas=(adam.adam_beta1, adam.adam_beta2),
        eps=adam.adam_eps,
        weight_decay=adam.weight_decay,
        clip_grad_norm=cfg.hybrid_zero_optimizer.clip_grad_norm,
        grad_scaler=grad_scaler,
        mesh=gpc.mesh,
        reduce_bucket_size=cfg.hybrid_zero_optimizer.reduce_bucket_size,
        overlap_sync_grad=cfg.hybrid_zero_optimizer.overlap_sync_grad,
        overlap_sync_param=cfg.hybrid_zero_optimizer.overlap_sync_param,
    )
    beta2_scheduler = Beta2Scheduler(optimizer, **cfg.beta2_scheduler)
    lr_scheduler = WarmupCosineLR(optimizer, **cfg.lr_scheduler)
    return optimizer, beta2_scheduler, lr_scheduler


def get_train_data_loader(num_worker: int = 0, config: Config | None = None):
    """This rank's loader: each item is one step's batch of (micro_num, micro_bsz, seq_len) tensors
    ("input_ids", "labels", "positions", "type_ids"; packed rows also "cu_seqlens" and "max_seqlen", see
    pytrain.data.loader). Returns (loader, dataset_types), as InternLM's."""
    cfg = gpc.require_config(config)
    first = not dist.is_initialized() or gpc.rank == 0
    builtin = cfg.data.train_folder == BUILTIN_CORPUS
    if builtin and not first:
        dist.barrier()  # rank 0 tokenizes and caches the bundled corpus first
    loader, dataset_types = build_train_loader(
        cfg.data,
        vocab_size=cfg.model.vocab_size,
        data_parallel_size=gpc.data_parallel_size,
        data_parallel_rank=gpc.data_parallel_rank,
        seed=gpc.seed,
        device_type=gpc.device.type,
        num_workers=num_worker,
    )
    if builtin and first and dist.is_initialized():
        dist.barrier()
    return loader, dataset_types


def get_validation_data_loader(num_worker: int = 0, config: Config | None = None) -> dict:
    """{validation set name: loader} for data.valid_folder ({} without one), as InternLM's."""
    cfg = gpc.require_config(config)
    return build_valid_loaders(
        cfg.data,
        vocab_size=cfg.model.vocab_size,
        data_parallel_size=gpc.data_parallel_size,
        data_parallel_rank=gpc.data_parallel_rank,
        device_type=gpc.device.type,
        num_workers=num_worker,
    )
