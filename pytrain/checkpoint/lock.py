"""One run per save folder: an exclusive lock on it, held for the run's life.

Two runs saving into one folder would take each other's saves apart (both write `.tmp-<step>/`, and each
deletes the other's as a crashed leftover), so the second run is refused before it reads or writes
anything there: the run's rank 0 takes `flock(LOCK_EX | LOCK_NB)` on `<save folder>/.pytrain.lock` and
holds it until the run ends. The kernel drops a flock when its process dies (SIGKILL and a lost node
included), so the lock of a dead run never blocks a new one; the file itself stays and means nothing
(deleting it would let two runs lock two different files of one name). It needs a filesystem whose locks
work across the machines that share it (local disks, NFSv4, Lustre mounted with `flock`).
"""

import fcntl
import os
import socket
import time
from pathlib import Path

from .storage import CheckpointError

LOCK_FILE = ".pytrain.lock"


class SaveFolderLock:
    """Holds the save folder's lock from construction to release() (or the process's end)."""

    def __init__(self, folder: Path):
        path = folder / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise CheckpointError(f"cannot create the save folder's lock file {path}: {err.strerror or err}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a run starting now"
            os.close(fd)
            raise CheckpointError(
                f"save folder {folder} is in use by another run ({holder}): two runs saving into one folder would "
                "overwrite each other's checkpoints; wait for that run to end, stop it, or give this run another "
                "ckpt.save_ckpt_folder"
            ) from None
        except OSError as err:
            os.close(fd)
            raise CheckpointError(
                f"cannot lock the save folder {folder} ({err.strerror or err}): its filesystem has no working file "
                "locks; save into a folder on one that has (a local disk, NFSv4)"
            ) from err
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%F %T')}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
