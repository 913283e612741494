"""The checkpoints of a save folder: listing, finding the newest good one (auto_resume), deleting.

A save folder holds `<step>/` checkpoints, the rolling snapshot slots `snapshot/0/` and `snapshot/1/`,
and `.tmp-*` folders of saves in progress (or cut off by a crash). Only a folder with its completion
marker counts as a checkpoint.
"""

import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .reader import CheckpointReader, read_marker
from .storage import MANIFEST, SNAPSHOT_DIR, CheckpointError, CheckpointVersionError, fsync_dir, resolve_folder


@dataclass(frozen=True)
class CheckpointInfo:
    step: int  # -1 when an incomplete folder says nothing readable about its step
    path: Path
    snapshot: bool
    complete: bool


def _manifest_step(folder: Path) -> int:
    try:
        return int(json.loads((folder / MANIFEST).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def _info(folder: Path, snapshot: bool) -> CheckpointInfo:
    marker = read_marker(folder)
    if marker is not None and (snapshot or marker["step"] == int(folder.name)):
        return CheckpointInfo(marker["step"], folder, snapshot, True)
    step = int(folder.name) if not snapshot and folder.name.isdigit() else _manifest_step(folder)
    return CheckpointInfo(step, folder, snapshot, False)


def list_checkpoints(folder: str | Path) -> list[CheckpointInfo]:
    """Every checkpoint folder under a save folder, complete or not, oldest first."""
    root = resolve_folder(str(folder))
    infos = []
    for parent, snapshot in ((root, False), (root / SNAPSHOT_DIR, True)):
        if not parent.is_dir():
            continue
        for path in parent.iterdir():
            if not path.is_dir():
                continue
            name = path.name.removeprefix(".tmp-")
            if name in ("0", "1") if snapshot else name.isdigit():
                if path.name.startswith(".tmp-"):
                    infos.append(CheckpointInfo(int(name) if not snapshot else -1, path, snapshot, False))
                else:
                    infos.append(_info(path, snapshot))
    return sorted(infos, key=lambda info: (info.step, info.snapshot, str(info.path)))


def find_latest(folder: str | Path, check: Callable[[CheckpointReader], None] | None = None) -> CheckpointReader | None:
    """The newest complete checkpoint whose files all match their checksums (auto_resume), or None.

    Newer folders that are incomplete or corrupt (a damaged file, a manifest of the wrong schema, or a
    CheckpointError from `check`: the caller's own check of what it will read, e.g. state.json's schema)
    are skipped, each with a warning naming it. A checkpoint of a newer format version is an error, not
    skipped: resuming an older one instead would lose steps."""
    for info in reversed(list_checkpoints(folder)):
        if not info.complete:
            warnings.warn(f"skipping incomplete checkpoint {info.path} (a save that did not finish)", stacklevel=2)
            continue
        try:
            reader = CheckpointReader(info.path)
            reader.verify()
            if check is not None:
                check(reader)
        except CheckpointVersionError:
            raise
        except CheckpointError as err:
            warnings.warn(f"skipping corrupt checkpoint {info.path}: {err}", stacklevel=2)
            continue
        return reader
    return None


def delete_checkpoint(path: Path) -> None:
    """Removes a checkpoint folder, its marker first: a crash midway leaves it incomplete, never whole."""
    for marker in path.glob("*.step"):
        marker.unlink()
    if path.is_dir():
        fsync_dir(path)
    shutil.rmtree(path, ignore_errors=False)
    fsync_dir(path.parent)


def retire_old(folder: Path, newest_step: int, keep: int) -> list[Path]:
    """After step `newest_step` is complete: deletes the complete `<step>/` checkpoints beyond the newest
    `keep` (keep 0: none) and the leftovers of older saves that never completed. Snapshots are untouched."""
    regular = [info for info in list_checkpoints(folder) if not info.snapshot and info.step < newest_step]
    older = [info for info in regular if info.complete]
    doomed = older[: max(0, len(older) - (keep - 1))] if keep > 0 else []
    doomed += [info for info in regular if not info.complete]
    for info in doomed:
        delete_checkpoint(info.path)
    return [info.path for info in doomed]
