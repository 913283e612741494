"""Checkpoint save and load of configs/100M.py's training state: seconds, bytes, and the async stall.

The state is what a one-process run of configs/100M.py saves: every parameter of the model (built on the
meta device, as `--dry_run` does, for its real names and shapes) in fp32, and AdamW's two moments for
each, as random tensors (~110M parameters: 3 x 440 MB). Reported, side by side in one run:
- sync save (write + fsync + sha256 of every file, rename, marker), and GB/s;
- async save: the stall the caller sees (the host copy into reused buffers) against a plain copy of the
  same tensors into preallocated buffers (the floor), and against the 100M step time;
- load: the sha256 check of every file, then copying every tensor into allocated ones (from the page
  cache: just written), and loading tensor rank 0's half of every matrix (another layout);
- bytes on disk / bytes of the state (goal <= 1.05).
`--benchmark-disable` runs the same path once on a 1-layer, 64-wide version of the config.
"""

import itertools
import shutil
import time
from pathlib import Path

import pytest
import torch

from pytrain.checkpoint import Checkpointer, CheckpointReader
from pytrain.config import Config
from pytrain.parallel.shard_spec import ShardSpec
from pytrain.registry import MODEL_INITIALIZER

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "100M.py"
SMOKE = ["model.num_layers=1", "model.hidden_size=64", "model.num_attention_heads=4", "model.vocab_size=256"]
ROUNDS = 3


def training_state(overrides) -> dict[str, torch.Tensor]:
    """Model weights and AdamW moments, fp32, keyed as the trainer saves them."""
    cfg = Config.from_file(CONFIG, overrides=overrides)
    with torch.device("meta"):
        model = MODEL_INITIALIZER.get_module(cfg.model_type)(**cfg.model)
    gen = torch.Generator().manual_seed(0)
    state = {"optim/step": torch.tensor(100, dtype=torch.int64)}
    for name, param in model.named_parameters():
        for prefix in ("model", "optim/exp_avg", "optim/exp_avg_sq"):
            state[f"{prefix}/{name}"] = torch.randn(param.shape, generator=gen, dtype=torch.float32)
    return state


def tp2_rank0(tensor: torch.Tensor) -> ShardSpec:
    """Tensor rank 0's shard of a 2-layout split (rows of matrices; vectors and scalars whole)."""
    if tensor.dim() == 2 and tensor.shape[0] % 2 == 0:
        return ShardSpec.split(tensor.shape, 0, 0, 2)
    return ShardSpec.whole(tensor.shape)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_checkpoint_save_load_100m(benchmark, tmp_path):
    full = training_state([] if benchmark.enabled else SMOKE)
    nbytes = sum(t.numel() * t.element_size() for t in full.values())
    free = shutil.disk_usage(tmp_path).free
    if free < 4 * nbytes:
        pytest.skip(f"needs {4 * nbytes / 1e9:.1f} GB free in {tmp_path}, has {free / 1e9:.1f} GB")
    state = {key: (t, ShardSpec.whole(t.shape)) for key, t in full.items()}
    rounds = ROUNDS if benchmark.enabled else 1

    sync = Checkpointer(tmp_path / "sync", keep=1)
    steps, sync_times = itertools.count(1), []
    benchmark.group = "checkpoint 100M"
    benchmark.pedantic(lambda: sync_times.append(seconds(lambda: sync.save(next(steps), state))), rounds=rounds)
    saved = next(tmp_path.joinpath("sync").glob("[0-9]*"))
    on_disk = sum(p.stat().st_size for p in saved.iterdir())

    background = Checkpointer(tmp_path / "async", keep=1, async_save=True)
    stalls, totals = [], []
    for step in range(1, rounds + 1):
        start = time.perf_counter()
        background.save(step, state)
        stalls.append(time.perf_counter() - start)
        background.wait()
        totals.append(time.perf_counter() - start)
    background.close()
    buffers = {key: torch.empty_like(t) for key, t in full.items()}
    for _ in range(2):  # the second pass: buffers already touched, as the async stager's are after a save
        copy = seconds(lambda: [buffers[key].copy_(t) for key, t in full.items()])

    reader = CheckpointReader(saved)
    verify = seconds(reader.verify)
    load = seconds(lambda: reader.load_into({key: (buffers[key], spec) for key, (_, spec) in state.items()}))
    halves = {key: tp2_rank0(t) for key, t in full.items()}  # another layout: reads only the slices it needs
    targets = {key: (torch.zeros(spec.local_shape), spec) for key, spec in halves.items()}
    reshard = seconds(lambda: reader.load_into(targets))
    assert all(torch.equal(targets[key][0], spec.cut(full[key]).float()) for key, spec in halves.items())
    sync_s = min(sync_times)

    rows = {
        "state": f"{len(full)} tensors, {nbytes / 1e9:.3f} GB",
        "sync save": f"{sync_s:.2f} s ({nbytes / sync_s / 1e9:.2f} GB/s)",
        "async stall (first save)": f"{stalls[0]:.3f} s",
        "async stall (later)": f"{min(stalls[1:] or stalls):.3f} s",
        "host copy floor": f"{copy:.3f} s",
        "async save total": f"{min(totals):.2f} s",
        "load: sha256 check": f"{verify:.2f} s ({on_disk / verify / 1e9:.2f} GB/s)",
        "load: into the model": f"{load:.2f} s (copies into allocated tensors)",
        "load: as tp2 rank 0": f"{reshard:.2f} s (half of each matrix, by slices)",
        "bytes on disk / state": f"{on_disk / nbytes:.5f}",
    }
    print("\n" + "\n".join(f"  {name:<26} {value}" for name, value in rows.items()))
    benchmark.extra_info.update(
        state_bytes=nbytes,
        disk_bytes=on_disk,
        sync_save_s=round(sync_s, 4),
        async_stall_first_s=round(stalls[0], 4),
        async_stall_s=round(min(stalls[1:] or stalls), 4),
        host_copy_s=round(copy, 4),
        async_total_s=round(min(totals), 4),
        verify_s=round(verify, 4),
        load_s=round(load, 4),
        load_tp2_half_s=round(reshard, 4),
    )
    assert on_disk >= nbytes  # every byte of the state is there (the ratio is reported, not asserted)


TRAIN_STEPS, SAVE_EVERY = 6, 3
TRAINER_BATCH = ["data.micro_num=1", "data.micro_bsz=1", "monitor.tensorboard.enable=False"]


def train_with_checkpoints(overrides, folder: Path, async_save: bool):
    """configs/100M.py trained in this process for TRAIN_STEPS steps through pytrain.train.checkpointing,
    saving every SAVE_EVERY steps; returns (seconds of each step including its save, the saved steps)."""
    import torch.distributed as dist

    from pytrain.data import build_train_loader
    from pytrain.initialize import initialize_trainer
    from pytrain.initialize.launch import launch
    from pytrain.parallel import gpc
    from pytrain.train import initialize_model, initialize_optimizer
    from pytrain.train.checkpointing import TrainingCheckpoints

    ckpt = [
        "ckpt.enable_save_ckpt=True",
        f"ckpt.save_ckpt_folder='{folder}'",
        f"ckpt.checkpoint_every={SAVE_EVERY}",
        "ckpt.keep_last=1",
        f"ckpt.async_upload={async_save}",
        f"data.total_steps={TRAIN_STEPS}",
        f"monitor.run_folder='{folder / 'runs'}'",
    ]
    cfg = Config.from_file(CONFIG, overrides=[*overrides, *TRAINER_BATCH, *ckpt])
    gpc.config = None
    launch(cfg, rank=0, world_size=1, local_rank=0, init_method=None, backend="gloo", seed=1)
    try:
        model = initialize_model()
        optimizer, beta2, lr = initialize_optimizer(model)
        loader, _ = build_train_loader(cfg.data, vocab_size=cfg.model.vocab_size, seed=1)
        trainer, *_ = initialize_trainer(model, optimizer, lr_scheduler=lr, beta2_scheduler=beta2)
        checkpoints = TrainingCheckpoints(cfg, model=model, optimizer=optimizer, trainer=trainer, loader=loader)
        resume_s = seconds(checkpoints.resume)
        times = []
        for step, batch in enumerate(loader, start=1):
            start = time.perf_counter()
            trainer.zero_grad()
            trainer.execute_schedule(batch)
            trainer.step()
            checkpoints.after_step(step)
            times.append(time.perf_counter() - start)
        close_s = seconds(checkpoints.close)
        return times, resume_s, close_s
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        gpc.config = None


def test_trainer_checkpoint_stall_100m(benchmark, tmp_path):
    """The step loop's view: a step's time with its save (sync / async) against a step without one, and
    the time a new run takes to resume (find the newest, check every file, load model + optimizer)."""
    overrides = [] if benchmark.enabled else SMOKE
    benchmark.group = "checkpoint 100M trainer"
    results = {}

    def both():
        for name in ("sync", "async"):
            shutil.rmtree(tmp_path / name, ignore_errors=True)
            results[name] = train_with_checkpoints(overrides, tmp_path / name, name == "async")

    benchmark.pedantic(both, rounds=1)
    _, resume_s, _ = train_with_checkpoints(overrides, tmp_path / "sync", False)  # everything saved: 0 steps
    rows = {}
    for name, (times, _, close_s) in results.items():
        saving = [times[s - 1] for s in range(SAVE_EVERY, TRAIN_STEPS, SAVE_EVERY)]  # not the last step's
        plain = sorted(t for s, t in enumerate(times, start=1) if s % SAVE_EVERY and s > 1)
        step_s = plain[len(plain) // 2]
        rows[f"{name}: step without save"] = f"{step_s:.3f} s"
        rows[f"{name}: step with save"] = f"{max(saving):.3f} s (stall {max(saving) - step_s:+.3f} s)"
        rows[f"{name}: close (last save)"] = f"{close_s:.3f} s"
        benchmark.extra_info[f"{name}_step_s"] = round(step_s, 4)
        benchmark.extra_info[f"{name}_stall_s"] = round(max(saving) - step_s, 4)
    rows["resume (auto_resume, all)"] = f"{resume_s:.2f} s"
    benchmark.extra_info["resume_s"] = round(resume_s, 4)
    print("\n" + "\n".join(f"  {name:<28} {value}" for name, value in rows.items()))
