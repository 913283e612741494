"""Reading a checkpoint: the manifest, checksums, JSON states, and tensors cut for any layout.

The manifest is checked against the sha256 its completion marker holds, then against its schema
(pytrain.checkpoint.schema) and for consistency (every shard's file listed, its pieces inside the tensor)
before anything in it is used. Each file it names must lie inside the checkpoint folder (no absolute path,
no `..`, no symlink leading out) and is checked against the manifest (size, then sha256) before it is
used, once per reader; a safetensors file's header is checked against the file and against the manifest
(each shard's dtype and shape) before safetensors opens it. Tensors are read with safetensors' safe_open,
slice by slice: a rank reads only the parts of the saved shards that overlap the shards it asks for.
Nothing is unpickled, and nothing is converted behind the manifest's back.
"""

import contextlib
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from pytrain.parallel.shard_spec import ShardSpec

from . import schema
from .layout import check_spec, overlaps, spec_from_json
from .storage import (
    FORMAT_NAME,
    FORMAT_VERSION,
    GLOBAL_STATE,
    MANIFEST,
    CheckpointError,
    CheckpointVersionError,
    file_sha256,
    inside,
    rank_state_file,
    resolve_folder,
)


def read_marker(folder: Path) -> dict | None:
    """The completion marker's content ({"step", "manifest_sha256"}), or None when there is none."""
    markers = list(folder.glob("*.step"))
    if len(markers) != 1:
        return None
    try:
        marker = schema.load_json(markers[0].read_bytes(), str(markers[0]))
    except (OSError, CheckpointError):
        return None
    if schema.MARKER.problem(marker, "") is not None or markers[0].name != f"{marker['step']}.step":
        return None
    return marker


class CheckpointReader:
    """One checkpoint folder (`<save_ckpt_folder>/<step>` or a snapshot slot), "local:path" or a path."""

    def __init__(self, path: str | Path):
        self.path = resolve_folder(str(path))
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint folder {str(self.path)!r} does not exist")
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            steps = sorted(p.name for p in self.path.iterdir() if p.is_dir() and p.name.isdigit())
            hint = f" (it holds checkpoints {', '.join(steps)}: name one of them)" if steps else ""
            raise CheckpointError(f"{str(self.path)!r} is not a pytrain checkpoint: no {MANIFEST}{hint}")
        data = inside(self.path, MANIFEST, f"checkpoint {self.path}").read_bytes()
        marker = read_marker(self.path)
        self.complete = marker is not None
        if marker is not None and marker["manifest_sha256"] != hashlib.sha256(data).hexdigest():
            raise CheckpointError(f"{manifest_path} is corrupt: its sha256 differs from the one its marker recorded")
        manifest = schema.load_json(data, str(manifest_path))
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise CheckpointError(f"{manifest_path} is not a {FORMAT_NAME} manifest")
        schema.check(manifest, schema.Record({"format_version": schema.Int()}), str(manifest_path))
        version = manifest["format_version"]
        if version > FORMAT_VERSION:  # before the schema: a newer format may have another one
            raise CheckpointVersionError(
                f"checkpoint {self.path} was written in checkpoint format version {version}; this pytrain reads "
                f"versions up to {FORMAT_VERSION}: load it with a newer pytrain"
            )
        schema.check(manifest, schema.MANIFEST, str(manifest_path))
        self.manifest = manifest
        self.step: int = manifest["step"]
        self.world_size: int = manifest["world_size"]
        self._check_shards()
        self._verified: set[str] = set()
        self._headers: dict[str, dict[str, schema.TensorHeader]] = {}

    def _check_shards(self) -> None:
        """Every shard's file is one the manifest lists, and its pieces lie inside its tensor."""
        where = self.path / MANIFEST
        for key, entry in self.manifest["tensors"].items():
            for shard in entry["shards"]:
                if shard["file"] not in self.manifest["files"]:
                    raise CheckpointError(f"{where} is not valid: a shard of {key} is in {shard['file']!r}, not listed")
                try:
                    check_spec(key, spec_from_json(entry["shape"], shard))
                except CheckpointError as err:
                    raise CheckpointError(f"{where} is not valid: {err}") from None

    def shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Every saved key's full shape and dtype name."""
        return {key: (tuple(t["shape"]), t["dtype"]) for key, t in self.manifest["tensors"].items()}

    def verify(self, names=None) -> None:
        """Checks files (default: all) against the manifest's sizes and sha256; raises naming the file.
        Files are hashed in parallel threads (hashlib releases the GIL)."""
        files = self.manifest["files"]
        todo = [name for name in (files if names is None else names) if name not in self._verified]
        for name in todo:
            path, expected = inside(self.path, name, f"{self.path / MANIFEST} (files)"), files[name]
            if not path.is_file():
                raise CheckpointError(f"checkpoint file {path} is missing")
            size = path.stat().st_size
            if size != expected["bytes"]:
                raise CheckpointError(
                    f"checkpoint file {path} is truncated or damaged: {size} bytes, expected {expected['bytes']}"
                )
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, max(1, len(todo)))) as pool:
            digests = pool.map(file_sha256, [self.path / name for name in todo])
            for name, digest in zip(todo, digests):
                if digest != files[name]["sha256"]:
                    raise CheckpointError(
                        f"checkpoint file {self.path / name} is corrupt: its sha256 differs from the manifest's"
                    )
                self._verified.add(name)

    def _json(self, name: str, expected) -> dict:
        if name not in self.manifest["files"]:
            raise CheckpointError(f"checkpoint {self.path} is incomplete: its manifest lists no {name}")
        self.verify([name])
        return schema.load_json((self.path / name).read_bytes(), str(self.path / name), expected)

    def global_state(self, expected=schema.JSON_OBJECT) -> dict:
        """The JSON state rank 0 saved for the whole run (step counters, schedulers, config text...),
        checked against `expected` (a schema: what the caller is about to use)."""
        return self._json(GLOBAL_STATE, expected)

    def rank_state(self, rank: int, expected=schema.JSON_OBJECT) -> dict:
        """The JSON state rank `rank` saved (its RNG, its data position...), checked against `expected`."""
        if not 0 <= rank < self.world_size:
            raise CheckpointError(f"checkpoint {self.path} was saved by {self.world_size} ranks: it has no rank {rank}")
        return self._json(rank_state_file(rank), expected)

    def _header(self, name: str) -> dict[str, schema.TensorHeader]:
        if name not in self._headers:
            self._headers[name] = schema.read_safetensors_header(self.path / name)
        return self._headers[name]

    def _open(self, name: str):
        """safetensors' handle of a shard file, its header checked once per reader (_header)."""
        self._header(name)
        return schema.open_checked_safetensors(self.path / name)

    def _check_saved_as_listed(self, key: str) -> None:
        """Each shard of `key` is in its file with the manifest's dtype and the shape its spec gives."""
        entry = self.manifest["tensors"][key]
        for shard in entry["shards"]:
            found = self._header(shard["file"]).get(key)
            listed = (getattr(torch, entry["dtype"]), spec_from_json(entry["shape"], shard).local_shape)
            if found is None or (found.dtype, found.shape) != listed:
                what = (
                    "not there" if found is None else f"{str(found.dtype).removeprefix('torch.')} {list(found.shape)}"
                )
                raise CheckpointError(
                    f"checkpoint file {self.path / shard['file']} does not hold {key} as its manifest says: "
                    f"{entry['dtype']} {list(listed[1])} listed, {what} in the file (it was edited after the save)"
                )

    def check(self, wanted: dict[str, ShardSpec], strict_prefixes: tuple[str, ...] = ()) -> None:
        """Raises, listing names and shapes, when a wanted key is missing or has another full shape, or
        (for keys starting with one of `strict_prefixes`) when the checkpoint holds keys not wanted."""
        saved = self.shapes()
        missing = [f"{key} {list(spec.full_shape)}" for key, spec in wanted.items() if key not in saved]
        differ = [
            f"{key}: checkpoint {list(saved[key][0])}, wanted {list(spec.full_shape)}"
            for key, spec in wanted.items()
            if key in saved and saved[key][0] != spec.full_shape
        ]
        extra = [
            f"{key} {list(shape)}"
            for key, (shape, _) in saved.items()
            if key not in wanted and key.startswith(strict_prefixes) and strict_prefixes
        ]
        if missing or differ or extra:
            parts = [
                f"{title} ({len(items)}):\n    " + "\n    ".join(items)
                for title, items in (
                    ("missing from the checkpoint", missing),
                    ("shape differs", differ),
                    ("in the checkpoint but not in this model", extra),
                )
                if items
            ]
            raise CheckpointError(f"checkpoint {self.path} does not match what is loaded:\n  " + "\n  ".join(parts))

    def read(self, wanted: dict[str, ShardSpec]) -> dict[str, torch.Tensor]:
        """Each wanted key's local tensor (CPU, saved dtype), cut by its spec from the saved shards. A shard
        saved exactly as wanted comes back as safetensors maps it (copy-on-write pages, no copy)."""
        return self._load({key: (None, spec) for key, spec in wanted.items()})

    def load_into(self, targets: dict[str, tuple[torch.Tensor, ShardSpec]]) -> None:
        """Copies each key's cut into the given tensor (any device and dtype) in place, straight from the
        files; every key is checked before anything is copied."""
        wrong = [
            f"{key}: tensor {list(t.shape)}, spec's local shape {list(spec.local_shape)}"
            for key, (t, spec) in targets.items()
            if tuple(t.shape) != spec.local_shape
        ]
        if wrong:
            raise CheckpointError("load_into: tensors do not have their spec's local shape:\n  " + "\n  ".join(wrong))
        with torch.no_grad():
            self._load(targets)

    def _load(self, targets: dict[str, tuple[torch.Tensor | None, ShardSpec]]) -> dict[str, torch.Tensor]:
        """Fills each target (None: a new CPU tensor) from the overlapping saved pieces."""
        self.check({key: spec for key, (_, spec) in targets.items()})
        tensors = self.manifest["tensors"]
        files = sorted({shard["file"] for key in targets for shard in tensors[key]["shards"]})
        self.verify(files)
        for key in targets:
            self._check_saved_as_listed(key)
        out = {}
        with contextlib.ExitStack() as stack:
            handles = {name: stack.enter_context(self._open(name)) for name in files}
            for key, (local, spec) in targets.items():
                entry = tensors[key]
                shards = [(spec_from_json(entry["shape"], shard), handles[shard["file"]]) for shard in entry["shards"]]
                if local is None and len(shards) == 1 and shards[0][0] == spec:
                    out[key] = shards[0][1].get_tensor(key)
                    continue
                if local is None:
                    local = torch.empty(spec.local_shape, dtype=getattr(torch, entry["dtype"]))
                filled = 0
                for saved, handle in shards:
                    for source, target, count in overlaps(saved, spec):
                        whole = all(s.start == 0 and s.stop == n for s, n in zip(source, saved.local_shape))
                        local[target].copy_(handle.get_tensor(key) if whole else handle.get_slice(key)[source])
                        filled += count
                if filled != local.numel():
                    raise CheckpointError(
                        f"{self.path / MANIFEST} is inconsistent: the saved shards of {key} fill {filled} of the "
                        f"{local.numel()} elements asked for"
                    )
                out[key] = local
        return out
