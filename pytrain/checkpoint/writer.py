"""Saving: every rank writes the shards it is the writer of; rank 0 assembles the manifest and completes.

One save, in order:
1. (caller's thread, all ranks) rank 0 prepares `.tmp-<name>/` next to the final folder; every rank's
   keys, specs and problems are gathered (all_gather_object); all ranks compute the same write plan
   (layout.plan_writes: one writer per distinct shard) or all raise the same error.
2. (async: the caller's thread only copies this rank's shards into reusable host buffers, pinned on CUDA,
   and returns) each rank writes `<group>-r<rank>.safetensors` per key group and `rank-<rank>.json`
   (rank 0 also `state.json`), each fsynced, then `rank-<rank>.done` listing their sizes and sha256.
3. rank 0 waits for every rank's done file (a failing rank writes `rank-<rank>.failed` instead), writes
   `manifest.json`, renames `.tmp-<name>` to `<step>/` (or `snapshot/<slot>/`), and writes `<step>.step`
   (holding the manifest's sha256) last; then applies the keep-N retention.
The background thread needs no collective: ranks meet through files, so a crash at any point leaves at
worst a `.tmp-*` folder or a folder without its marker, neither of which counts as a checkpoint.
A shared filesystem is assumed (rank 0 sees every rank's files), as for any multi-rank local save.
"""

import contextlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pytrain.parallel.shard_spec import ShardSpec

from .catalog import delete_checkpoint, list_checkpoints, retire_old
from .layout import Entry, check_spec, plan_writes, spec_to_json
from .reader import read_marker
from .storage import (
    FORMAT_NAME,
    FORMAT_VERSION,
    GLOBAL_STATE,
    MANIFEST,
    SNAPSHOT_DIR,
    CheckpointError,
    FileCounter,
    check_writable,
    done_file,
    failed_file,
    fsync_dir,
    json_bytes,
    marker_file,
    rank_state_file,
    temporary_folder,
    tensor_file,
    write_bytes,
    write_json_atomic,
    write_safetensors,
)

POLL_S = 0.02


def key_group(key: str) -> str:
    """The file group of a key: its first path component ("model/layers.0..." -> "model")."""
    group = key.split("/", 1)[0] if "/" in key else "tensors"
    if not group or not all(c.isalnum() or c in "_.-" for c in group):
        raise CheckpointError(
            f"key {key!r}: its group {group!r} must be a plain file-name part (letters, digits, _ . -)"
        )
    return group


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Checkpointer:
    """Writes checkpoints of a run into `save_folder` ("local:path" or a path), sync or in the background.

    keep: how many complete `<step>/` checkpoints to keep (0: all); older ones are deleted only after a
    newer one is complete. async_save: save() returns after the host copy; the files are written by a
    background thread; the next save(), wait() or close() waits for it and raises its failure, if any.
    group: the process group of the ranks saving together (default: all). finalize_timeout_s: how long
    rank 0 waits for the other ranks' files before declaring the save failed."""

    def __init__(
        self,
        save_folder: str,
        *,
        keep: int = 0,
        async_save: bool = False,
        group=None,
        finalize_timeout_s: float = 1800.0,
    ):
        if keep < 0:
            raise CheckpointError(f"keep must be >= 0 (0 keeps every checkpoint), got {keep}")
        self.root = check_writable(save_folder)
        self.keep = keep
        self.async_save = async_save
        self.group = group
        self.finalize_timeout_s = finalize_timeout_s
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._pending: str | None = None  # what the running background save writes, for error messages
        self._buffers: dict[str, torch.Tensor] = {}

    # -- caller's thread -------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        tensors: dict[str, tuple[torch.Tensor, ShardSpec]],
        *,
        rank_state: dict | None = None,
        global_state: dict | None = None,
        snapshot: bool = False,
    ) -> Path:
        """Saves step `step` (collective: every rank of the group calls it). `tensors` maps full-model
        keys ("model/<param>", "optim/exp_avg/<param>") to this rank's local tensor and its ShardSpec;
        ranks holding the same (key, spec) write it once. rank_state: this rank's JSON-able state (its
        RNG: rng_state(), its data position); global_state: the run's (used from rank 0). snapshot: write
        the rolling slot snapshot/0 or /1 (the one not holding the newest snapshot) instead of `<step>/`.
        Returns the checkpoint's final folder (complete once wait() returns, or now when sync)."""
        self.wait()
        rank, world = self._rank_world()
        counter = FileCounter()
        entries, problems, staged_from = [], [], {}
        for key, (tensor, spec) in tensors.items():
            try:
                key_group(key)
                check_spec(key, spec)
                if tuple(tensor.shape) != spec.local_shape:
                    raise CheckpointError(f"{key}: tensor {list(tensor.shape)}, its spec says {list(spec.local_shape)}")
            except CheckpointError as err:
                problems.append(str(err))
                continue
            entries.append(Entry(key, dtype_name(tensor.dtype), spec))
            staged_from[key] = tensor
        rank_bytes = global_bytes = b""
        try:
            rank_bytes = json_bytes(rank_state or {}, f"rank {rank}'s rank_state")
            global_bytes = json_bytes(global_state or {}, "global_state") if rank == 0 else b""
        except CheckpointError as err:
            problems.append(str(err))
        final = temporary = None
        if rank == 0:
            try:
                final = self._prepare(step, snapshot)
                temporary = temporary_folder(final)
            except (CheckpointError, OSError) as err:
                problems.append(str(err))
        gathered = self._gather((entries, problems, final, temporary), world)
        final, temporary = gathered[0][2], gathered[0][3]
        try:
            reported = [f"rank {r}: {p}" for r, (_, ps, _, _) in enumerate(gathered) for p in ps]
            if reported:
                raise CheckpointError(f"cannot save step {step}:\n  " + "\n  ".join(reported))
            plan = plan_writes([g[0] for g in gathered])
        except CheckpointError:
            if rank == 0 and temporary is not None:
                shutil.rmtree(temporary)
            raise
        mine: dict[str, dict[str, torch.Tensor]] = {}
        for key, shards in plan.items():
            if any(writer == rank for writer, _ in shards):
                mine.setdefault(key_group(key), {})[key] = staged_from[key]
        if self.async_save:
            mine = {group: {key: self._stage(key, t) for key, t in items.items()} for group, items in mine.items()}
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        else:
            mine = {group: {key: t.detach().cpu() for key, t in items.items()} for group, items in mine.items()}

        def job():
            self._write(rank, world, step, plan, mine, rank_bytes, global_bytes, temporary, final, snapshot, counter)

        self._pending = f"step {step} ({final})"
        if self.async_save:
            self._thread = threading.Thread(target=self._run, args=(job,), name=f"pytrain-ckpt-{step}")
            self._thread.start()
        else:
            self._run(job)
            self.wait()
        return final

    def wait(self) -> None:
        """Waits for the background save, if any; raises its failure (once)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        failure, self._failure = self._failure, None
        if failure is not None:
            raise CheckpointError(f"saving checkpoint {self._pending} failed: {failure}") from failure

    def close(self) -> None:
        """Waits for the last save and releases the host buffers."""
        try:
            self.wait()
        finally:
            self._buffers = {}

    def _rank_world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(self.group), dist.get_world_size(self.group)
        return 0, 1

    def _gather(self, value, world: int) -> list:
        if world == 1:
            return [value]
        out = [None] * world
        dist.all_gather_object(out, value, group=self.group)
        return out

    def _prepare(self, step: int, snapshot: bool) -> Path:
        """(rank 0) The final folder of this save, and a fresh temporary folder for it."""
        if snapshot:
            slots = {info.path.name: info for info in list_checkpoints(self.root) if info.snapshot and info.complete}
            newest = max(slots.values(), key=lambda info: info.step).path.name if slots else "1"
            final = self.root / SNAPSHOT_DIR / ("1" if newest == "0" else "0")
        else:
            final = self.root / str(step)
            if final.is_dir() and read_marker(final) is not None:
                raise CheckpointError(
                    f"checkpoint {final} already exists and is complete; nothing was overwritten: resume from it "
                    "(auto_resume) or save into another save_ckpt_folder"
                )
        temporary = temporary_folder(final)
        if temporary.exists():
            shutil.rmtree(temporary)  # left by a save that crashed
        temporary.mkdir(parents=True)
        fsync_dir(temporary.parent)
        return final

    def _stage(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of `tensor` in a buffer reused from save to save (pinned when CUDA is present)."""
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=torch.cuda.is_available())
            self._buffers[key] = buffer
        buffer.copy_(tensor.detach(), non_blocking=tensor.device.type == "cuda")
        return buffer

    # -- writing (background thread when async) -----------------------------------------------------------

    def _run(self, job) -> None:
        try:
            job()
        except BaseException as err:  # kept for wait(): a failure in the background is never lost
            self._failure = err

    def _write(self, rank, world, step, plan, mine, rank_bytes, global_bytes, temporary, final, snapshot, counter):
        try:
            files = {}
            for group, items in sorted(mine.items()):
                name = tensor_file(group, rank)
                files[name] = write_safetensors(temporary / name, items, counter)
            files[rank_state_file(rank)] = write_bytes(temporary / rank_state_file(rank), rank_bytes, counter)
            if rank == 0:
                files[GLOBAL_STATE] = write_bytes(temporary / GLOBAL_STATE, global_bytes, counter)
            write_json_atomic(temporary / done_file(rank), files, counter)
        except BaseException as err:
            with contextlib.suppress(OSError):  # best effort: rank 0 then fails at once instead of timing out
                write_json_atomic(temporary / failed_file(rank), f"{type(err).__name__}: {err}", FileCounter())
            raise
        if rank == 0:
            self._finalize(step, world, plan, temporary, final, snapshot, counter)

    def _finalize(self, step, world, plan, temporary, final, snapshot, counter) -> None:
        """(rank 0) Once every rank's files are there: manifest, rename, marker, retention."""
        deadline = time.monotonic() + self.finalize_timeout_s
        files: dict[str, dict] = {}
        for rank in range(world):
            while not (temporary / done_file(rank)).is_file():
                if (temporary / failed_file(rank)).is_file():
                    raise CheckpointError(f"rank {rank} failed: {(temporary / failed_file(rank)).read_text()}")
                if time.monotonic() > deadline:
                    raise CheckpointError(
                        f"rank {rank} did not finish writing {temporary} within {self.finalize_timeout_s:.0f} s"
                    )
                time.sleep(POLL_S)
            files.update(json.loads((temporary / done_file(rank)).read_text()))
        tensors = {}
        for key, shards in plan.items():
            first = shards[0][1]
            tensors[key] = {
                "shape": list(first.spec.full_shape),
                "dtype": first.dtype,
                "shards": [
                    dict(file=tensor_file(key_group(key), writer), **spec_to_json(e.spec)) for writer, e in shards
                ],
            }
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": world,
            "saved_at": time.time(),
            "files": files,
            "tensors": tensors,
        }
        manifest_entry = write_bytes(temporary / MANIFEST, json_bytes(manifest, "the manifest"), counter)
        for rank in range(world):
            (temporary / done_file(rank)).unlink()
        fsync_dir(temporary)
        if final.exists():
            delete_checkpoint(final)  # an incomplete leftover of this step, or the older snapshot slot
        os.rename(temporary, final)
        fsync_dir(final.parent)
        counter.done()
        write_json_atomic(
            final / marker_file(step), {"step": step, "manifest_sha256": manifest_entry["sha256"]}, counter
        )
        if not snapshot:
            retire_old(self.root, step, self.keep)
