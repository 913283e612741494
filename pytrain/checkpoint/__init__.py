"""Checkpoints: sharded, reshardable, atomic and self-checking, saved in the background if asked.

A checkpoint is a folder `<save_ckpt_folder>/<step>/` (or a rolling slot `snapshot/0|1/`) of
safetensors files (tensors, keyed by full-model names and cut by ShardSpec, so any parallel layout reads
any other), JSON files (per-rank and global state, RNG states in base64), `manifest.json` (format
version, every file's size and sha256, where each tensor's shards are) and the completion marker
`<step>.step`, written last. Nothing is ever unpickled, and nothing is read from outside the folder; every
file is checked (pytrain.checkpoint.schema) before it is used. See writer.py for the order of a save.

The trainer's calls:
    check_writable(save_ckpt_folder)                     # before step 1
    lock = SaveFolderLock(root)                          # rank 0, for the run's life: one run per save folder
    ckpt = Checkpointer(save_ckpt_folder, keep=N, async_save=async_upload)
    ckpt.save(step, {key: (tensor, spec)}, rank_state={"rng": rng_state(), ...}, global_state={...},
              snapshot=False)
    ckpt.close()                                         # end of run: waits for the last save
    reader = find_latest(save_ckpt_folder) or CheckpointReader(load_ckpt_folder)
        # find_latest hashes every file of the candidates: on many ranks, call it on rank 0, broadcast
        # reader.path, and open CheckpointReader(path) elsewhere (it hashes only the files a rank reads)
    reader.check({key: spec}, strict_prefixes=("model/",)); reader.load_into({key: (tensor, spec)})
    restore_rng(reader.rank_state(rank)["rng"]); reader.global_state()
    StopFile(stop_file_path, start_step).should_stop(step); StopSignal().install().requested
"""

from .catalog import CheckpointInfo, delete_checkpoint, find_latest, list_checkpoints
from .lock import SaveFolderLock
from .reader import CheckpointReader
from .rng import restore_rng, rng_state
from .stop import StopFile, StopSignal
from .storage import (
    FORMAT_VERSION,
    TEST_DIE_ENV,
    TEST_DIE_STATUS,
    CheckpointError,
    CheckpointVersionError,
    check_writable,
    resolve_folder,
)
from .writer import Checkpointer

__all__ = [
    "FORMAT_VERSION",
    "TEST_DIE_ENV",
    "TEST_DIE_STATUS",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointReader",
    "CheckpointVersionError",
    "Checkpointer",
    "SaveFolderLock",
    "StopFile",
    "StopSignal",
    "check_writable",
    "delete_checkpoint",
    "find_latest",
    "list_checkpoints",
    "resolve_folder",
    "restore_rng",
    "rng_state",
]
