"""The training run: `python -m pytrain.train --config configs/tiny.py` (or under torchrun / srun).

The loop is InternLM's train.py: launch, build model / optimizer / data / trainer, then per step
zero_grad -> execute_schedule -> step, with one log line per step from the first rank.
"""

import contextlib
import os

import torch
import torch.distributed as dist

from pytrain.checkpoint import CheckpointError
from pytrain.config import Config, ConfigError, check_world_size
from pytrain.data import DataError
from pytrain.initialize import get_default_parser, initialize_distributed_env, initialize_trainer
from pytrain.model import DTYPES
from pytrain.model.moe import active_parameters
from pytrain.monitor import AlertLog, StepMonitor, attention_width, flops_per_token, matmul_params, peak_tflops
from pytrain.parallel import ParallelMesh, gpc
from pytrain.registry import MODEL_INITIALIZER
from pytrain.train import get_train_data_loader, get_validation_data_loader, initialize_model, initialize_optimizer
from pytrain.train.checkpointing import TrainingCheckpoints
from pytrain.train.validation import evaluate


def profiler(enabled: bool, folder):
    """--profiling: torch.profiler over steps 2-4, a Chrome trace per rank in <run>/profile/."""
    if not enabled:
        return contextlib.nullcontext(None)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=1, warmup=1, active=3),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(str(folder / "profile")),
    )


def train(args) -> list[dict]:
    """Runs the whole training job; returns the per-step metrics (every rank)."""
    initialize_distributed_env(
        config=args.config,
        launcher=args.launcher,
        master_port=args.port,
        seed=args.seed,
        backend=args.backend,
        host=args.host,
        overrides=args.overrides,
    )
    cfg = gpc.config
    model = initialize_model()
    optimizer, beta2_scheduler, lr_scheduler = initialize_optimizer(model=model)
    train_dl, dataset_types = get_train_data_loader(num_worker=0)
    valid_loaders = get_validation_data_loader(num_worker=0)
    trainer, train_dl, _, _ = initialize_trainer(
        model=model,
        optimizer=optimizer,
        train_dataloader=train_dl,
        lr_scheduler=lr_scheduler,
        beta2_scheduler=beta2_scheduler,
    )
    # before step 1: the save folder is checked and locked, and what auto_resume / load_ckpt_info name is loaded
    checkpoints = TrainingCheckpoints(cfg, model=model, optimizer=optimizer, trainer=trainer, loader=train_dl)
    try:
        start_step = checkpoints.resume()
        peak, peak_source = peak_tflops(gpc.device, DTYPES[cfg.model.dtype], cfg.monitor.peak_tflops)
        block_params, head_params, params = whole_model_sizes(model, gpc.mesh)
        monitor = step_monitor(cfg, gpc.mesh, block_params, head_params, peak, peak_source, dataset_types)
        report_start(cfg, gpc.mesh, model, optimizer, params, peak, peak_source)
        history = run_steps(cfg, trainer, train_dl, valid_loaders, checkpoints, monitor, start_step, args.profiling)
    except BaseException:
        checkpoints.close(wait=False)  # unlocks the save folder for the next run of this process (tests)
        raise
    checkpoints.close()
    optimizer.sync_params()  # the last step's parameter broadcasts, if overlapped, land before the end
    monitor.close()
    if gpc.is_main_rank:
        print(f"pytrain: done; metrics, TensorBoard logs and loss.svg in {gpc.run_folder}", flush=True)
    return history


def whole_model_sizes(model, mesh: ParallelMesh) -> tuple[int, int, int]:
    """(matmul parameters of the blocks, of the head, all parameters) of the whole model: this rank's part
    summed over the ranks holding the rest."""
    local_params = sum(p.numel() for p, info in model.infos() if info.counted_here(mesh.tensor_rank))
    counts = torch.tensor([*matmul_params(model), local_params], dtype=torch.int64, device=gpc.device)
    dist.all_reduce(counts, group=mesh.model_group)
    return tuple(counts.tolist())


def step_monitor(
    cfg: Config,
    mesh: ParallelMesh,
    block_params: int,
    head_params: int,
    peak: float,
    peak_source: str,
    dataset_types: list[str] | None = None,
) -> StepMonitor:
    """The per-step log: loss, tokens/s and, from the whole model's matmul parameters, TFLOPS and MFU."""
    data = cfg.data
    model_ranks = mesh.dims.tensor * mesh.dims.pipeline  # they share each micro-batch's work
    return StepMonitor(
        gpc.run_folder,
        total_steps=data.total_steps,
        tokens_per_step_per_rank=data.micro_num * data.micro_bsz * data.seq_len / model_ranks,
        flops_per_token=flops_per_token(
            block_params,
            head_params,
            cfg.model.num_layers,
            attention_width(cfg.model),
            data.seq_len,
            float(cfg.model.checkpoint),
        ),
        peak_tflops=peak,
        peak_source=peak_source,
        device=gpc.device,
        log_every=cfg.monitor.log_every,
        tensorboard=cfg.monitor.tensorboard.enable,
        is_main_rank=gpc.is_main_rank,
        group=mesh.data_group,
        alerts=AlertLog.from_config(cfg, gpc.rank),
        tensorboard_queue=cfg.monitor.tensorboard.queue_max_length,
        pipeline_group=mesh.pipeline_group,
        dataset_types=dataset_types,
    )


def report_start(cfg: Config, mesh: ParallelMesh, model, optimizer, params: int, peak: float, peak_source: str) -> None:
    """The start line, printed by the first rank: model, layout, step shape, optimizer state, peak, folder.
    Every rank takes part: the optimizer state (fp32 masters when separate, Adam moments) per parameter
    each rank holds is gathered from all of them."""
    state_bytes = [None] * mesh.dims.world_size
    dist.all_gather_object(state_bytes, optimizer.optimizer_state_bytes() / sum(p.numel() for p in model.parameters()))
    if not gpc.is_main_rank:
        return
    data = cfg.data
    offload_on_cpu = cfg.selective_checkpoint_offload and gpc.device.type == "cpu"
    layout = (
        f"data {mesh.dims.data} x tensor {mesh.dims.tensor} ({cfg.parallel.tensor.mode}) x "
        f"pipeline {mesh.dims.pipeline}"
        + (f" ({cfg.model.num_chunks} chunks per rank)" if cfg.model.num_chunks > 1 else "")
        + (f", FSDP over {mesh.dims.zero1} ranks" if mesh.dims.fsdp else "")
    )
    print(
        f"pytrain: {cfg.model_type} with {params / 1e6:.2f}M parameters, {mesh.dims.world_size} rank(s) on "
        f"{gpc.device.type} as {layout}, {data.total_steps} steps of {data.micro_num} x {data.micro_bsz} x "
        f"{data.seq_len} tokens per data-parallel rank; optimizer state "
        f"{min(state_bytes):.1f}-{max(state_bytes):.1f} bytes per parameter per rank; peak {peak:.2f} "
        f"TFLOPS per rank ({peak_source}); run folder {gpc.run_folder}"
        + (f"; ignored here: {', '.join(cfg.ignored_here)}" if cfg.ignored_here else "")
        + ("; selective_checkpoint_offload: a no-op on the CPU" if offload_on_cpu else "")
        + (
            "; hybrid_zero_optimizer's overlap_sync_*: FSDP overlaps its own gathers and reductions"
            if mesh.dims.fsdp
            else ""
        ),
        flush=True,
    )


def run_steps(
    cfg: Config, trainer, train_dl, valid_loaders: dict, checkpoints, monitor, start_step: int, profiling: bool
) -> list[dict]:
    """The loop: one step per batch, validation every data.valid_every steps, until the loader ends or a
    stop is asked for (checkpoints.after_step). Returns the per-step metrics."""
    optimizer = trainer.optimizer
    history = []
    trainer.train()
    checkpoints.watch_signals()  # start-up is over: a signal now finishes the step and saves
    monitor.start_step()
    with profiler(profiling, gpc.run_folder) as prof, monitor.watch():
        for step, batch in enumerate(train_dl, start=start_step + 1):
            trainer.zero_grad()
            _, loss = trainer.execute_schedule(batch, forward_only=False, return_loss=True)
            success, grad_norm = trainer.step()
            lr = optimizer.param_groups[0]["lr"]
            history.append(
                monitor.end_step(
                    step,
                    loss,
                    grad_norm,
                    lr,
                    success,
                    optimizer.loss_scale if optimizer.grad_scaler else None,
                    moe_loss=trainer.moe_loss(),
                    type_stats=trainer.type_stats(),
                )
            )
            if valid_loaders and cfg.data.valid_every > 0 and step % cfg.data.valid_every == 0:
                monitor.record_validation(step, evaluate(trainer, valid_loaders, gpc.mesh.data_group))
            if prof is not None:
                prof.step()
            if checkpoints.after_step(step):  # a stop file or SIGTERM/SIGINT: saved, stop here
                break
    return history


def dry_run(args) -> None:
    """--dry_run: validate the config and build the model on the meta device (no memory, no processes)."""
    cfg = Config.from_file(args.config, overrides=args.overrides)
    world_size = int(os.environ.get("WORLD_SIZE", args.world_size or 1))
    data_parallel = check_world_size(cfg, world_size, args.config)
    with torch.device("meta"):
        model = MODEL_INITIALIZER.get_module(cfg.model_type)(**cfg.model)
    params = sum(p.numel() for p in model.parameters())
    active = active_parameters(model)
    per_token = flops_per_token(
        *matmul_params(model),
        cfg.model.num_layers,
        attention_width(cfg.model),
        cfg.data.seq_len,
        float(cfg.model.checkpoint),
    )
    tokens = data_parallel * cfg.data.micro_num * cfg.data.micro_bsz * cfg.data.seq_len
    layout = f"data {data_parallel} x tensor {cfg.parallel.tensor.size} x pipeline {cfg.parallel.pipeline.size}"
    print(
        f"{args.config}: valid for {world_size} process(es) as {layout}; {cfg.model_type} with {params:,} parameters "
        f"({params / 1e9:.2f}B)"
        + (f", {active:,} active per token ({active / 1e9:.2f}B)" if active != params else "")
        + f"; {per_token / 1e9:.2f} GFLOPs per token; {tokens:,} tokens per step"
        + (f"; ignored here: {', '.join(cfg.ignored_here)}" if cfg.ignored_here else "")
    )


def run_plan(args) -> int:
    """--plan: every layout of --world_size ranks the run accepts, with its predicted memory per rank and step
    time, ranked (pytrain.plan); 0 when one fits --device_memory, 1 when none does."""
    from pytrain.plan import Target, parse_bytes, plan, write_json

    cfg = Config.from_file(args.config, overrides=args.overrides)
    if args.device_memory is None:
        raise ConfigError("--plan needs --device_memory, the memory of one device, e.g. --device_memory 80GiB")
    try:
        device_memory = parse_bytes(args.device_memory)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for flag in ("peak_tflops", "link_gbps"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag} {getattr(args, flag)}: must be > 0")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak, peak_source = peak_tflops(device, DTYPES[cfg.model.dtype], args.peak_tflops or cfg.monitor.peak_tflops)
    if args.peak_tflops is not None:
        peak_source = "--peak_tflops"
    target = Target(device_memory, peak, args.link_gbps)
    world_size = int(args.world_size or 1)
    result = plan(cfg, world_size, target, source=args.config)
    print(
        f"{args.config}: {len(result.layouts)} layouts of {world_size} ranks pass the run's validation, "
        f"{len(result.fitting)} fit {device_memory / 2**30:.1f} GiB per device; step times at {peak:.3g} TFLOPS per "
        f"rank ({peak_source}) and {args.link_gbps:g} GB/s links. Memory in GiB per rank (the worst rank): "
        f"parameters, gradients, optimizer state, activations (x micro-batches in flight), communication "
        f"buffers, peak; 'sent GB': bytes each rank sends per step"
    )
    print(result.table(args.plan_rows))
    if args.plan_json:
        write_json(result, args.plan_json)
        print(f"all {len(result.layouts)} layouts in {args.plan_json}")
    if not result.fitting:
        smallest = min(result.layouts, key=lambda p: p.memory.peak)
        print(
            f"pytrain: no layout fits {device_memory / 2**30:.1f} GiB per device; the smallest peak is "
            f"{smallest.memory.peak / 2**30:.1f} GiB ({smallest.description}): plan for more devices or more memory"
        )
        return 1
    return 0


def main(argv=None) -> int:
    parser = get_default_parser()
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="validate the config, build the model on the meta device, print its size, exit",
    )
    plan = parser.add_argument_group("layout planner (--plan)")
    plan.add_argument(
        "--plan",
        action="store_true",
        help="list every layout of --world_size ranks the run accepts with its predicted memory per rank and "
        "step time, ranked (fits first, then fastest), exit",
    )
    plan.add_argument("--device_memory", default=None, help="memory of one device, e.g. 80GiB")
    plan.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="dense peak TFLOPS of one device at the model's dtype (default: monitor.peak_tflops, else this "
        "machine's GPU datasheet or a matmul measured here)",
    )
    plan.add_argument("--link_gbps", type=float, default=50.0, help="each rank's link in GB/s (bytes; default 50)")
    plan.add_argument("--plan_json", default=None, help="write every layout's prediction to this JSON file")
    plan.add_argument("--plan_rows", type=int, default=20, help="layouts the table shows (default 20)")
    args = parser.parse_args(argv)
    if not args.config:
        parser.error("--config is required, e.g. --config configs/tiny.py")
    if args.plan:
        try:
            return run_plan(args)
        except ConfigError as err:  # PlanError too (a world size admitting no layout)
            print(f"pytrain: config error: {err}", flush=True)
            return 2
    if args.dry_run:
        try:
            dry_run(args)
        except ConfigError as err:
            print(f"pytrain: config error: {err}", flush=True)
            return 2
        return 0
    try:
        train(args)
        if dist.is_initialized():
            dist.barrier()  # gloo aborts a rank that tears down while its peer is still mid-exchange
    except ConfigError as err:
        print(f"pytrain: config error: {err}", flush=True)
        return 2
    except CheckpointError as err:
        print(f"pytrain: checkpoint error: {err}", flush=True)
        return 2
    except DataError as err:
        print(f"pytrain: data error: {err}", flush=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
