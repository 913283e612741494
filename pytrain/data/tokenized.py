"""InternLM's tokenized folders: `*.bin` files of JSON lines `{"tokens": [...]}`, each with a `*.bin.meta`.

A `.bin.meta` is a numpy array (np.save) with one row per line: int32 `(byte_offset, num_tokens)` as
InternLM's tools/tokenizer.py writes it, or int64 `(byte_offset, num_tokens, row_index)` as newer InternEvo
tools do; column 1 is the length in both. The `.bin` files are memory-mapped and a sample is parsed only
when a batch needs it. What is cheap is checked when the folder is opened (every meta against its bin:
offsets, line ends, file size, token counts that can fit in their lines, so no buffer is sized from a
made-up count); what is not (the JSON of a line, its exact token count, ids against the vocabulary) is
checked when the line is read, and the error names the file and the line.

Dataset types: the sorted top-level subfolders of the folder (e.g. `code/`, `en/`) that hold `.bin` files
(InternEvo's numbering); `.bin` files directly in the folder form one type named after the folder.
"""

import json
import mmap
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOKENIZE_HINT = "make it with `python -m pytrain.data.tokenize --text_input_path IN --bin_output_path OUT.bin`"
JSON_PREFIX = b'{"tokens": ['  # the exact line InternLM's writer produces: json.dumps({"tokens": ids})
JSON_SUFFIX = b"]}"


class DataError(ValueError):
    """Bad training or validation data: the message names the file (and line) and the fix."""


@dataclass(frozen=True)
class BinFile:
    path: Path
    type_id: int
    offsets: np.ndarray  # int64, byte offset of each line
    lengths: np.ndarray  # int64, tokens of each line


def walk_files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Every file under root ending in one of suffixes, in os.walk order with sorted dirs and files (as InternLM)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        files.extend(Path(dirpath) / name for name in sorted(filenames) if name.endswith(suffixes))
    return files


def check_folder(folder: str | os.PathLike, what: str, holds: str) -> Path:
    root = Path(folder).expanduser()
    if not root.exists():
        raise DataError(f"{what}={str(folder)!r} does not exist: point it at a folder of {holds}")
    if not root.is_dir():
        raise DataError(f"{what}={str(folder)!r} is not a folder: point it at the folder that holds the {holds}")
    return root


def find_bin_files(folder: str | os.PathLike, what: str = "data.train_folder") -> tuple[list[Path], Path]:
    """Every .bin under folder (walk_files' order); checks the folder."""
    root = check_folder(folder, what, "tokenized .bin files")
    files = walk_files(root, (".bin",))
    if not files:
        raise DataError(f"{what}={str(folder)!r} has no .bin files (InternLM's tokenized format); {TOKENIZE_HINT}")
    return files, root


def dataset_type_of(path: Path, root: Path) -> str:
    relative = path.relative_to(root)
    return relative.parts[0] if len(relative.parts) > 1 else root.resolve().name


def read_meta(bin_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, lengths) of one .bin, checked against the .bin itself: a truncated or edited file is an error."""
    meta_path = bin_path.with_name(bin_path.name + ".meta")
    if not meta_path.exists():
        raise DataError(f"{bin_path} has no {meta_path.name} beside it: re-tokenize the file ({TOKENIZE_HINT})")
    try:
        meta = np.load(meta_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:  # EOFError: an empty or cut file
        raise DataError(f"{meta_path} is not a numpy .npy array ({error}): re-tokenize {bin_path.name}") from None
    if meta.size == 0 and meta.dtype.kind in "iu":  # InternLM's writer saves an empty file's meta as shape (0,)
        meta = meta.reshape(0, 2)
    if meta.ndim != 2 or meta.shape[1] not in (2, 3) or meta.dtype.kind not in "iu":
        raise DataError(
            f"{meta_path} has shape {meta.shape} and dtype {meta.dtype}; expected integer rows "
            f"(byte_offset, num_tokens) or (byte_offset, num_tokens, row): re-tokenize {bin_path.name}"
        )
    offsets, lengths = meta[:, 0].astype(np.int64), meta[:, 1].astype(np.int64)
    size = bin_path.stat().st_size

    def disagree(row: int, why: str):
        return DataError(
            f"{meta_path} disagrees with {bin_path.name} at line {row + 1}: {why} (the .bin was truncated or "
            f"edited after its .meta was written): re-tokenize the file"
        )

    if len(offsets) == 0:
        if size:
            raise disagree(0, f"the .meta lists no lines but the .bin has {size} bytes")
        return offsets, lengths
    if offsets[0] != 0:
        raise disagree(0, f"the first offset is {offsets[0]}, not 0")
    (bad,) = np.nonzero(np.diff(offsets) <= 0)
    if len(bad):
        raise disagree(int(bad[0]) + 1, "offsets do not increase")
    if offsets[-1] >= size:
        raise disagree(len(offsets) - 1, f"offset {offsets[-1]} is past the end of the {size}-byte .bin")
    (bad,) = np.nonzero(lengths < 0)
    if len(bad):
        raise disagree(int(bad[0]), f"negative token count {lengths[bad[0]]}")
    # a token takes a digit and all but the last a comma: a count beyond that would size buffers from nothing
    line_bytes = np.append(offsets[1:], size) - offsets
    (bad,) = np.nonzero(lengths > (line_bytes + 1) // 2)
    if len(bad):
        row = int(bad[0])
        room = (line_bytes[row] + 1) // 2
        raise disagree(
            row, f"it claims {lengths[row]} tokens, but the line's {line_bytes[row]} bytes hold at most {room}"
        )
    with open(bin_path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        data = np.frombuffer(mapped, dtype=np.uint8)
        line_ends = np.append(offsets[1:], size) - 1  # every line, the last included, ends in "\n"
        (bad,) = np.nonzero(data[line_ends] != ord("\n"))
        del data
        mapped.madvise(mmap.MADV_DONTNEED)  # the check touched a page per line: keep them out of this process
    if len(bad):
        raise disagree(int(bad[0]), f"the line at byte {offsets[bad[0]]} does not end where the next begins")
    return offsets, lengths


def open_folder(folder, what: str = "data.train_folder") -> tuple[list[BinFile], list[str]]:
    """The folder's checked .bin files and its dataset type names (type_id indexes the names)."""
    paths, root = find_bin_files(folder, what)
    names = sorted({dataset_type_of(p, root) for p in paths})
    files = []
    for path in paths:
        offsets, lengths = read_meta(path)
        if len(offsets):  # empty files are skipped, as InternLM
            files.append(BinFile(path, names.index(dataset_type_of(path, root)), offsets, lengths))
    if not files:
        raise DataError(f"{what}={str(folder)!r}: every .bin file is empty; {TOKENIZE_HINT}")
    return files, names


class MappedFiles:
    """Files memory-mapped on first use, per process: picklable (each DataLoader worker maps them itself)."""

    def __init__(self, paths: list):
        self.paths = paths
        self._maps: dict[int, mmap.mmap] = {}
        self._pid = None

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}, "_pid": None}

    def _map(self, file: int) -> mmap.mmap:
        if self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        mapped = self._maps.get(file)
        if mapped is None:
            with open(self.paths[file], "rb") as handle:
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[file] = mapped
        return mapped

    def release_pages(self) -> None:
        """Drops this process's mapped pages (the page cache keeps them): the loader's memory stays flat
        however much of the corpus it has read."""
        for mapped in self._maps.values():
            mapped.madvise(mmap.MADV_DONTNEED)


class SampleReader(MappedFiles):
    """Reads sample (file, line) as raw token ids (int64, negatives kept) from memory-mapped .bin files."""

    def __init__(self, files: list[BinFile], vocab_size: int | None):
        super().__init__([f.path for f in files])
        self.offsets = [f.offsets for f in files]
        self.lengths = [f.lengths for f in files]
        self.vocab_size = vocab_size

    def read(self, file: int, line: int) -> np.ndarray:
        start = int(self.offsets[file][line])
        expected = int(self.lengths[file][line])
        mapped = self._map(file)
        end = mapped.find(b"\n", start)
        raw = mapped[start:end]
        tokens = None
        if raw.startswith(JSON_PREFIX) and raw.endswith(JSON_SUFFIX):
            with warnings.catch_warnings():
                warnings.simplefilter("error", DeprecationWarning)  # numpy warns where it stops early
                try:
                    tokens = np.fromstring(raw[len(JSON_PREFIX) : -len(JSON_SUFFIX)], dtype=np.int64, sep=",")
                except (ValueError, DeprecationWarning):
                    tokens = None
        if tokens is None or len(tokens) != expected:
            tokens = self._parse_json(raw, file, line)
        if len(tokens) != expected:
            raise self._error(file, line, f"has {len(tokens)} tokens but the .meta says {expected}; re-tokenize")
        if self.vocab_size is not None and len(tokens):
            largest = int(np.abs(tokens).max())
            if largest >= self.vocab_size:
                raise self._error(
                    file,
                    line,
                    f"has token id {largest}, not below model.vocab_size={self.vocab_size}: the data was "
                    f"tokenized for a larger vocabulary; set model.vocab_size to the tokenizer's size",
                )
        return tokens

    def _parse_json(self, raw: bytes, file: int, line: int) -> np.ndarray:
        try:
            record = json.loads(raw)
        except ValueError as error:
            raise self._error(file, line, f"is not JSON ({error}): {raw[:80]!r}") from None
        if not isinstance(record, dict) or "tokens" not in record:
            raise self._error(file, line, f'has no "tokens" list: {raw[:80]!r}')
        tokens = record["tokens"]
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
            raise self._error(file, line, f'has "tokens" that are not a list of integers: {raw[:80]!r}')
        return np.array(tokens, dtype=np.int64)

    def _error(self, file: int, line: int, why: str) -> DataError:
        return DataError(f"{self.paths[file]} line {line + 1} {why}")
