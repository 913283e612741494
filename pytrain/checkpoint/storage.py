"""Files on disk: folder schemes, durable (fsynced) writes, checksums, and the safetensors writer.

Every file of a checkpoint is written once, fsynced, and its sha256 recorded (on CPUs with SHA extensions
sha256 is hashlib's fastest digest, ahead of blake2b; bench/test_checkpoint_bench.py reports the save's GB/s).
Tensors are written in the safetensors format by a streaming writer that hashes while it writes, so a
rank's state is never copied into one big bytes object; the files are read back with safetensors itself.
"""

import hashlib
import json
import os
import re
from pathlib import Path

import torch

# Exit status of a save stopped by PYTRAIN_CKPT_TEST_DIE_AFTER_FILES (tests of a crash during a save).
TEST_DIE_STATUS = 86
TEST_DIE_ENV = "PYTRAIN_CKPT_TEST_DIE_AFTER_FILES"

FORMAT_NAME = "pytrain-checkpoint"
FORMAT_VERSION = 1  # raised when a change makes older readers misread a checkpoint
MANIFEST = "manifest.json"
GLOBAL_STATE = "state.json"
SNAPSHOT_DIR = "snapshot"
HASH_CHUNK = 16 << 20
REMOTE_SCHEMES = ("boto3", "oss", "oss2", "volc", "s3", "hdfs", "http", "https")

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def tensor_file(group: str, rank: int) -> str:
    return f"{group}-r{rank:05d}.safetensors"


def rank_state_file(rank: int) -> str:
    return f"rank-{rank:05d}.json"


def done_file(rank: int) -> str:
    return f"rank-{rank:05d}.done"


def failed_file(rank: int) -> str:
    return f"rank-{rank:05d}.failed"


def marker_file(step: int) -> str:
    """InternLM's completion marker, `<step>.step`, written last into the checkpoint's folder."""
    return f"{step}.step"


def temporary_folder(final: Path) -> Path:
    return final.parent / f".tmp-{final.name}"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the folder or file and the fix."""


class CheckpointVersionError(CheckpointError):
    """A checkpoint written by a newer pytrain checkpoint format than this one reads."""


def resolve_folder(folder: str) -> Path:
    """The local path of a save/load folder: "local:path" or a plain path; other schemes are refused."""
    if not folder:
        raise CheckpointError("the checkpoint folder is empty: set a path such as 'local:/data/ckpt' or '/data/ckpt'")
    match = re.match(r"^([A-Za-z][A-Za-z0-9+_-]*):(.*)$", folder)
    if match is None:
        return Path(folder)
    scheme, rest = match.groups()
    if scheme == "local":
        if not rest:
            raise CheckpointError(f"checkpoint folder {folder!r} names no path after 'local:'")
        return Path(rest)
    known = " (InternLM's remote storage)" if scheme in REMOTE_SCHEMES else ""
    raise CheckpointError(
        f"checkpoint storage {scheme!r}{known} in {folder!r} is not available in pytrain: only local folders are, "
        f"written 'local:/path' or '/path' (a local folder whose name contains ':' is written 'local:{folder}')"
    )


def inside(folder: Path, name: str, entry: str) -> Path:
    """`folder / name` when it stays inside `folder`: a relative name without `..` whose path, symlinks
    followed, is still under the folder's. Anything else is a CheckpointError naming `entry` (where the
    name was read), so a tampered folder cannot make pytrain read a file elsewhere."""
    relative = Path(name)
    if not name or relative.is_absolute() or ".." in relative.parts:
        raise CheckpointError(
            f"{entry} names {name!r}: only files inside {folder} are read (no absolute path, no '..')"
        )
    path = folder / relative
    if not path.resolve().is_relative_to(folder.resolve()):
        raise CheckpointError(
            f"{entry} names {name!r}, a link to {path.resolve()} outside {folder}: only files inside the folder "
            "are read"
        )
    return path


def check_writable(folder: str | os.PathLike) -> Path:
    """Creates `folder` if needed and proves a file can be written, fsynced and removed there.

    Call before the first training step, so a bad save folder fails at once instead of at the first save."""
    path = resolve_folder(str(folder))
    probe = path / f".pytrain-write-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"probe")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as err:
        raise CheckpointError(
            f"checkpoint folder {str(path)!r} cannot be written ({err.strerror or err}): "
            "choose a writable ckpt.save_ckpt_folder or fix its permissions"
        ) from err
    return path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileCounter:
    """Counts the durable writes (files and renames) of this process's saves, for the crash-test hook:
    with PYTRAIN_CKPT_TEST_DIE_AFTER_FILES=N the process exits (status 86) right after its N-th."""

    def __init__(self) -> None:
        value = os.environ.get(TEST_DIE_ENV)
        self.die_after = int(value) if value else None
        self.count = 0

    def done(self) -> None:
        self.count += 1
        if self.die_after is not None and self.count >= self.die_after:
            os._exit(TEST_DIE_STATUS)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_bytes(path: Path, data: bytes, counter: FileCounter) -> dict:
    """Writes and fsyncs one small file; returns its manifest entry."""
    _write_synced(path, data)
    counter.done()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_json_atomic(path: Path, value, counter: FileCounter) -> dict:
    """Writes a JSON file under a temporary name, then renames it: a reader never sees half of it."""
    data = json.dumps(value).encode()
    partial = path.with_name(f".{path.name}.partial")
    _write_synced(partial, data)
    os.replace(partial, path)
    fsync_dir(path.parent)
    counter.done()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def json_bytes(value, what: str) -> bytes:
    try:
        return json.dumps(value, sort_keys=True).encode()
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{what} is not JSON-able ({err}): pass only dicts, lists, str, int, float, bool, None"
        ) from err


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], counter: FileCounter) -> dict:
    """Writes CPU tensors as one safetensors file (8-byte header size, JSON header, data), hashing as it
    writes; fsynced. Returns its manifest entry."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, tensor in tensors.items():
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors aligns the data to 8 bytes
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (len(head).to_bytes(8, "little"), head, *(tensor_bytes(t) for t in tensors.values())):
            f.write(chunk)
            digest.update(chunk)
        f.flush()
        os.fsync(f.fileno())
    counter.done()
    return {"bytes": 8 + len(head) + offset, "sha256": digest.hexdigest()}


def file_sha256(path: Path) -> str:
    digest, buffer = hashlib.sha256(), memoryview(bytearray(HASH_CHUNK))
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(buffer):
            digest.update(buffer[:size])
    return digest.hexdigest()
