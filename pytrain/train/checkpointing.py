"""The training state in checkpoints: what a checkpoint of a run holds, saving it during the step loop, and
resuming or starting from one (the `ckpt` config section). Storage itself is pytrain.checkpoint.

A checkpoint holds, keyed by full-model parameter names with each shard's ShardSpec (so any layout loads
any other): "model/<name>" (the weights), "optim/master/<name>" (fp32 masters when the model is 16-bit),
"optim/exp_avg/<name>", "optim/exp_avg_sq/<name>" (Adam's moments, each ZeRO-1 owner its parameters');
and as JSON: the step, Adam's step count, the lr and beta2 schedulers, the loss scaler, the data
position, the trainer's counters and the effective config text (global), every RNG (per rank).

The step loop (pytrain.train.__main__):
    checkpoints = TrainingCheckpoints(cfg, model=..., optimizer=..., trainer=..., loader=...)  # locks the save folder
    start = checkpoints.resume()            # before step 1: loads what the config asks, checks everything
    checkpoints.watch_signals()             # from here SIGTERM/SIGINT finish the step and save
    for step, batch in enumerate(loader, start=start + 1):
        ...train one step...
        if checkpoints.after_step(step):    # saves when due; True: a stop file or SIGTERM/SIGINT asked
            break
    checkpoints.close()                     # waits for a background save, unlocks the save folder

Which checkpoint a run starts from: with auto_resume, the newest complete, uncorrupted one in
save_ckpt_folder (everything in it); else load_ckpt_info (its `content`; ckpt_type "internlm" is pytrain's
own format, "hf" a Hugging Face folder, model only); else load_ckpt_folder (older configs: everything).
state.json is checked against what the content to load reads from it (state_schema) before it is used; under
auto_resume a checkpoint whose state.json does not fit is skipped like a corrupt one.

One run per save folder: rank 0 holds the folder's lock (pytrain.checkpoint.lock) from construction to
close(); a second run saving there stops before step 1 with an error. Before the step loop SIGTERM and
SIGINT keep their default action (a run that has taken no step has nothing to save, and the default stops
it whatever start-up is doing: hashing a checkpoint, waiting for another rank); from watch_signals() on
they make the run finish its step, save and stop.
"""

import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from pytrain.checkpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointReader,
    SaveFolderLock,
    StopFile,
    StopSignal,
    find_latest,
    list_checkpoints,
    resolve_folder,
    restore_rng,
    rng_state,
)
from pytrain.checkpoint.schema import JSON_OBJECT, Int, Nullable, Record
from pytrain.config import Config, ConfigError
from pytrain.parallel.fsdp import local_tensor

CONTENTS = ("model", "sampler", "optimizer", "scheduler")
# what loading each content reads from state.json (required, optional fields)
STATE_FIELDS = {
    "model": ({}, {}),
    "optimizer": ({"optimizer": JSON_OBJECT}, {"grad_scaler": Nullable(JSON_OBJECT)}),
    "scheduler": ({}, {"lr_scheduler": Nullable(JSON_OBJECT), "beta2_scheduler": Nullable(JSON_OBJECT)}),
    "sampler": ({"step": Int(), "trainer_steps": Int(), "data": JSON_OBJECT}, {}),
}
RANK_STATE = Record({"rng": JSON_OBJECT})
CKPT_TYPES = ("internlm", "internevo", "hf")  # internlm / internevo: pytrain's own checkpoints
MODEL, OPTIM = "model/", "optim/"


def load_request(ckpt) -> tuple[str, frozenset[str], str] | None:
    """(path, content, ckpt_type) that load_ckpt_info or load_ckpt_folder asks for, checked; None: nothing."""
    info = ckpt.load_ckpt_info
    if info is None:
        if ckpt.load_ckpt_folder is None:
            return None
        return ckpt.load_ckpt_folder, frozenset(CONTENTS), "internlm"
    unknown = set(info) - {"path", "content", "ckpt_type"}
    if unknown or "path" not in info:
        raise ConfigError(
            f"ckpt.load_ckpt_info = {info!r}: write dict(path=..., content=('model', 'sampler', 'optimizer', "
            f"'scheduler') or ('all',), ckpt_type='internlm' or 'hf')"
            + (f"; unknown key(s) {sorted(unknown)}" if unknown else "; 'path' is missing")
        )
    content = info.get("content", ("model",))
    content = (content,) if isinstance(content, str) else tuple(content)
    wrong = [c for c in content if c not in (*CONTENTS, "all")]
    if wrong or not content:
        raise ConfigError(
            f"ckpt.load_ckpt_info content {content!r}: each item must be one of {', '.join(CONTENTS)} or 'all'"
        )
    content = frozenset(CONTENTS) if "all" in content else frozenset(content)
    ckpt_type = info.get("ckpt_type", "internlm")
    if ckpt_type not in CKPT_TYPES:
        raise ConfigError(
            f"ckpt.load_ckpt_info ckpt_type {ckpt_type!r} is not available: 'internlm' or 'internevo' (pytrain's "
            f"checkpoints) or 'hf' (a Hugging Face safetensors folder)"
        )
    if ckpt_type == "hf" and content != {"model"}:
        raise ConfigError(
            f"ckpt.load_ckpt_info: a Hugging Face folder holds weights only: content=('model',), not {sorted(content)}"
        )
    return str(info["path"]), content, ckpt_type


def state_schema(content: frozenset[str]) -> Record:
    """state.json's schema for loading `content`: the fields it reads, and world_size (to restore RNGs)."""
    required, optional = {}, {"world_size": Int(1)}
    for part in content:
        required.update(STATE_FIELDS[part][0])
        optional.update(STATE_FIELDS[part][1])
    return Record(required, optional)


def open_checkpoint(path: str) -> CheckpointReader | Path:
    """A pytrain checkpoint folder's reader, or the Path of a folder InternLM/InternEvo wrote
    (model_tp{t}_pp{p}.pt files: tensors only, read with weights_only=True, see pytrain/checkpoint/internlm.py)."""
    folder = resolve_folder(path)
    if not folder.exists():
        raise CheckpointError(f"checkpoint {path!r} does not exist ({folder.resolve()}): fix ckpt.load_ckpt_info.path")
    if folder.is_dir() and any(folder.glob("model_tp*_pp*.pt")):
        return folder
    return CheckpointReader(folder)


class TrainingCheckpoints:
    """Saving and loading a run's whole training state per its `ckpt` config section (module doc)."""

    def __init__(self, cfg: Config, *, model, optimizer, trainer, loader, whole_model=None):
        """model: this rank's ModelPart; trainer: holds the schedulers and the step counter; loader: the
        TrainLoader (state_dict / load_state_dict); whole_model: the whole model on the meta device (for
        Hugging Face loading; built from the config when needed and not given)."""
        self.cfg, self.ckpt = cfg, cfg.ckpt
        self.model, self.optimizer, self.trainer, self.loader = model, optimizer, trainer, loader
        self.whole_model = whole_model
        self.device = next(model.parameters()).device  # where the collectives' tensors go (NCCL: CUDA only)
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.request = load_request(self.ckpt)  # bad load_ckpt_info: an error before anything runs
        self.total_steps = cfg.data.total_steps
        self.saver = None
        self.lock = None
        self.signal = None
        if self.ckpt.enable_save_ckpt:
            if not self.ckpt.save_ckpt_folder:
                raise ConfigError("ckpt.enable_save_ckpt=True needs ckpt.save_ckpt_folder (e.g. 'local:ckpts/run1')")
            self.saver = self._agree(self._open_save_folder, "open the save folder")
        self.stop_file = StopFile(self.ckpt.stop_file_path)
        self.last_saved = None
        self.loaded_from: Path | None = None

    def _open_save_folder(self) -> Checkpointer:
        saver = Checkpointer(self.ckpt.save_ckpt_folder, keep=self.ckpt.keep_last, async_save=self.ckpt.async_upload)
        if self.rank == 0:
            self.lock = SaveFolderLock(saver.root)
        return saver

    def watch_signals(self) -> None:
        """From now on (the step loop), SIGTERM/SIGINT make the run finish its step, save and stop."""
        if self.saver is not None and self.signal is None:
            self.signal = StopSignal().install()

    # -- what a checkpoint holds --------------------------------------------------------------------------
    def _tensors(self, duplicates: bool) -> list[tuple[str, torch.Tensor, object]]:
        """(key, tensor, spec) of this rank's state; duplicates: also the tied copies (to load them)."""
        out = [
            (MODEL + info.name, local_tensor(p), info.spec)
            for p, info in self.model.infos()
            if duplicates or not info.duplicate
        ]
        out += [(OPTIM + k, t, s) for k, t, s, dup in self.optimizer.state_targets() if duplicates or not dup]
        return out

    def _global_state(self, step: int, data_state: dict) -> dict:
        opt, trainer = self.optimizer, self.trainer
        return {
            "step": step,
            "trainer_steps": trainer.steps_taken,
            "optimizer": opt.state_dict(),
            "grad_scaler": opt.grad_scaler.state_dict() if opt.grad_scaler else None,
            "lr_scheduler": trainer.lr_scheduler.state_dict() if trainer.lr_scheduler else None,
            "beta2_scheduler": trainer.beta2_scheduler.state_dict() if trainer.beta2_scheduler else None,
            "data": data_state,
            "world_size": self.world,
            "config": self.cfg.dump(),
        }

    def save(self, step: int, snapshot: bool = False) -> Path:
        """Saves the state after step `step` (collective)."""
        self.optimizer.sync_params()  # overlapped parameter broadcasts land first
        tensors = {key: (t, spec) for key, t, spec in self._tensors(duplicates=False)}
        data_state = self.loader.state_dict()  # on every rank: a streamed source gathers every rank's shards
        path = self.saver.save(
            step,
            tensors,
            rank_state={"rng": rng_state()},
            global_state=self._global_state(step, data_state) if self.rank == 0 else None,
            snapshot=snapshot,
        )
        self.last_saved = step
        return path

    # -- resuming -----------------------------------------------------------------------------------------
    def resume(self) -> int:
        """Loads what the config asks for, on every rank, before step 1; returns the step to continue
        after (0: a fresh start). Any rank's failure stops every rank with an error."""
        try:
            start = self._agree(self._resume)
        except BaseException:
            self.close(wait=False)
            raise
        self.stop_file.start_step = start
        return start

    def _resume(self) -> int:
        source = None
        if self.ckpt.auto_resume and self.ckpt.save_ckpt_folder:
            source = self._newest()
        if source is not None:
            return self._load(CheckpointReader(source), frozenset(CONTENTS))
        if self.request is None:
            return 0
        path, content, ckpt_type = self.request
        if ckpt_type == "hf":
            from pytrain.checkpoint.convert import load_hf_into

            load_hf_into(self.model, self._whole_model(), path)
            self.optimizer.masters_from_model()
            return 0
        opened = open_checkpoint(path)
        if isinstance(opened, Path):
            return self._load_internlm(opened, content)
        return self._load(opened, content)

    def _load_internlm(self, folder: Path, content: frozenset[str]) -> int:
        """The model weights of an InternLM/InternEvo folder, merged from its layout's shards into the whole
        model, then cut for this rank; its optimizer / sampler / scheduler files are pickles of InternLM's
        own objects, which are not read."""
        from pytrain.checkpoint.internlm import load_internlm_folder

        if content != frozenset({"model"}):
            raise CheckpointError(
                f"{folder} is an InternLM/InternEvo checkpoint: only its model weights can be loaded (its optimizer, "
                f"sampler and scheduler files are pickled objects); use content=('model',)"
            )
        self.model.load_full_state(load_internlm_folder(folder, self._whole_model()))
        self.optimizer.masters_from_model()
        if self.rank == 0:
            print(f"pytrain: loaded the model from InternLM checkpoint {folder}", flush=True)
        return 0

    def _newest(self) -> Path | None:
        """The newest good checkpoint of save_ckpt_folder: found on rank 0 (it hashes every file), shared."""
        found = [None]
        if self.rank == 0:
            folder = resolve_folder(self.ckpt.save_ckpt_folder)
            everything = state_schema(frozenset(CONTENTS))
            reader = (
                find_latest(folder, check=lambda found: found.global_state(everything)) if folder.is_dir() else None
            )
            found = [str(reader.path) if reader else None]
            self._move_aside_newer(folder, reader.step if reader else -1)
        if self.distributed:
            dist.broadcast_object_list(found, src=0)
        return Path(found[0]) if found[0] else None

    @staticmethod
    def _move_aside_newer(folder: Path, step: int) -> None:
        """Complete checkpoints newer than the one resumed from were skipped as corrupt: the run will save
        those steps again, so they are renamed to `corrupt-<step>` (kept for inspection, never loaded)."""
        for info in list_checkpoints(folder) if folder.is_dir() else []:
            if info.complete and not info.snapshot and info.step > step:
                target = folder / f"corrupt-{info.path.name}"
                suffix = 0
                while target.exists():
                    suffix += 1
                    target = folder / f"corrupt-{info.path.name}.{suffix}"
                info.path.rename(target)
                warnings.warn(
                    f"corrupt checkpoint {info.path} moved to {target}: this run saves that step again", stacklevel=3
                )

    def _load(self, reader: CheckpointReader, content: frozenset[str]) -> int:
        saved = reader.shapes()
        model = [(k, t, s) for k, t, s in self._tensors(duplicates=True) if k.startswith(MODEL)]
        reader.check({k: s for k, _, s in model}, strict_prefixes=(MODEL,))
        state = reader.global_state(state_schema(content))
        tensors = self._tensors(duplicates=True)
        if "model" in content:
            # each from the most precise copy saved: a 16-bit run's fp32 masters when this run keeps none
            # (its weights are fp32), an fp32 run's weights when this run needs masters of its own
            def best(name: str, from_master: bool) -> str:
                master = f"{OPTIM}master/{name}"
                return master if from_master and master in saved else MODEL + name

            plain = not self.optimizer.needs_master
            self._load_unique(reader, [(best(k.removeprefix(MODEL), plain), t, s) for k, t, s in model])
            masters = [(k, t, s) for k, t, s in tensors if k.startswith(OPTIM + "master/")]
            self._load_unique(reader, [(best(k.split("/", 2)[2], True), t, s) for k, t, s in masters])
        if "optimizer" in content:
            moments = [(k, t, s) for k, t, s in tensors if k.startswith(OPTIM) and not k.startswith(OPTIM + "master/")]
            reader.check({k: s for k, _, s in moments})
            self._load_unique(reader, moments)
            self.optimizer.load_state_dict(state["optimizer"])
            if self.optimizer.grad_scaler and state.get("grad_scaler"):
                self.optimizer.grad_scaler.load_state_dict(state["grad_scaler"])
        if "scheduler" in content:
            for name in ("lr_scheduler", "beta2_scheduler"):
                scheduler = getattr(self.trainer, name)
                if scheduler is not None and state.get(name) is not None:
                    scheduler.load_state_dict(state[name])
        start = 0
        if "sampler" in content:
            self.loader.load_state_dict(state["data"])
            self.trainer.steps_taken = state["trainer_steps"]
            start = state["step"]
        if content == frozenset(CONTENTS):
            if state.get("world_size") == self.world:
                restore_rng(reader.rank_state(self.rank, RANK_STATE)["rng"])
            elif self.rank == 0:
                warnings.warn(
                    f"checkpoint {reader.path} was saved by {state.get('world_size')} ranks, this run has "
                    f"{self.world}: random generators start afresh (weights, optimizer and data continue)",
                    stacklevel=3,
                )
        self.loaded_from = reader.path
        if self.rank == 0:
            print(
                f"pytrain: loaded {', '.join(sorted(content))} from checkpoint {reader.path} (step {reader.step})"
                + (f"; continuing after step {start}" if start else ""),
                flush=True,
            )
        return start

    @staticmethod
    def _load_unique(reader: CheckpointReader, targets) -> None:
        """load_into for targets some of which share a key (a tied embedding's two copies)."""
        while targets:
            batch, rest, seen = {}, [], set()
            for key, tensor, spec in targets:
                if key in seen:
                    rest.append((key, tensor, spec))
                else:
                    seen.add(key)
                    batch[key] = (tensor, spec)
            reader.load_into(batch)
            targets = rest

    def _whole_model(self):
        if self.whole_model is None:
            from pytrain.registry import MODEL_INITIALIZER

            with torch.device("meta"):
                self.whole_model = MODEL_INITIALIZER.get_module(self.cfg.model_type)(**self.cfg.model)
        return self.whole_model

    def _agree(self, work, what: str = "load the checkpoint"):
        """Runs work on every rank; when any rank fails, every rank raises (none goes on to step 1 alone)."""
        error = None
        try:
            result = work()
        except (CheckpointError, ConfigError, ValueError, KeyError, FileNotFoundError, OSError) as err:
            error = err
        if self.distributed:
            failed = torch.tensor([0 if error is None else self.rank + 1], dtype=torch.int64, device=self.device)
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
            if error is None and failed.item():
                raise CheckpointError(f"rank {failed.item() - 1} could not {what} (its error is in its log)")
        if error is not None:
            raise error
        return result

    # -- the step loop ------------------------------------------------------------------------------------
    def after_step(self, step: int) -> bool:
        """Saves when due (every checkpoint_every steps, at the last step, a snapshot every oss_snapshot_freq
        steps); returns True when the run must stop now (stop file or signal: saved first)."""
        stop = self.stop_file.should_stop(step) or (self.signal is not None and self.signal.requested)
        if self.distributed and (self.signal is not None or self.stop_file.path is not None):
            flag = torch.tensor([int(stop)], dtype=torch.int64, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank decides alike before a collective save
            stop = bool(flag.item())
        if self.saver is None:
            if stop and self.rank == 0:
                print(f"pytrain: stopping after step {step} (no checkpoint: ckpt.enable_save_ckpt=False)", flush=True)
            return stop
        every, snapshot_every = self.ckpt.checkpoint_every, self.ckpt.oss_snapshot_freq
        if stop or step % every == 0 or step == self.total_steps:
            path = self.save(step)
            if self.rank == 0:
                print(f"pytrain: checkpoint of step {step} -> {path}", flush=True)
        elif snapshot_every and step % snapshot_every == 0:
            self.save(step, snapshot=True)
        if stop and self.rank == 0:
            print(f"pytrain: stopping after step {step} as asked; resume with auto_resume", flush=True)
        return stop

    def close(self, wait: bool = True) -> None:
        """Waits for a background save (raising its failure), restores the signal handlers and unlocks the
        save folder."""
        try:
            if self.saver is not None and wait:
                self.saver.close()
        finally:
            if self.signal is not None:
                self.signal.uninstall()
                self.signal = None
            if self.lock is not None:
                self.lock.release()
                self.lock = None


__all__ = ["TrainingCheckpoints", "load_request", "open_checkpoint", "state_schema"]
