"""Megatron-LM's indexed datasets (`data.type="megatron"`): `.bin/.idx` pairs, read without Megatron installed.

The `.idx` (megatron.core.datasets.indexed_dataset's _IndexWriter), little-endian:
    b"MMIDIDX\\x00\\x00"          9 bytes, the magic
    version                      uint64, 1
    dtype code                   uint8: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16 (6 float64 and
                                 7 float32 exist in the enum but hold no token ids)
    sequence_count               uint64
    document_count               uint64 (the length of document_indices: documents + 1)
    sequence_lengths             int32[sequence_count], tokens per sequence
    sequence_pointers            int64[sequence_count], byte offset of each sequence in the .bin
    document_indices             int64[document_count], 0, then the sequence index ending each document
    sequence_modes               int8[sequence_count], only in multimodal datasets (ignored here)
The `.bin` is the sequences' token ids back to back in that dtype.

A sample to pack is a Megatron *document*: the sequences document_indices[d] .. document_indices[d+1] (one
per document unless Megatron's preprocessing split sentences), which are contiguous in the .bin. Both
files are memory-mapped; what the index claims is checked against the .bin when the folder is opened, so
a bad magic, version or dtype, a cut .idx or a truncated .bin is an error naming the file.

Folders: every `X.idx` with its `X.bin` under data.train_folder (os.walk order, as the tokenized folders),
typed by top-level subfolder; or data.train_folder is one Megatron path prefix (`/data/corpus_text_document`
for corpus_text_document.bin/.idx), typed by the prefix's name.
"""

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .tokenized import DataError, MappedFiles, check_folder, dataset_type_of, walk_files

MAGIC = b"MMIDIDX\x00\x00"
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
FLOAT_CODES = {6: "float64", 7: "float32"}
HINT = "re-run Megatron's tools/preprocess_data.py (or megatron.core's IndexedDatasetBuilder) for it"


@dataclass(frozen=True)
class IndexedFile:
    path: Path  # the .bin
    type_id: int
    dtype: np.dtype
    starts: np.ndarray  # int64, byte offset of each document in the .bin
    lengths: np.ndarray  # int64, tokens of each document


def read_index(bin_path: Path) -> tuple[np.dtype, np.ndarray, np.ndarray]:
    """(token dtype, document byte offsets, document token counts) of one .bin/.idx pair, checked."""
    idx_path = bin_path.with_suffix(".idx")

    def bad(why: str) -> DataError:
        return DataError(f"{idx_path}: {why}; {HINT}")

    if not bin_path.exists():
        raise DataError(f"{idx_path} has no {bin_path.name} beside it: {HINT}")
    size = idx_path.stat().st_size
    with open(idx_path, "rb") as handle:
        head = handle.read(HEADER.size)
    if len(head) < HEADER.size or not head.startswith(MAGIC):
        raise bad(f"not a Megatron index (it does not start with {MAGIC!r})")
    _, version, code, sequences, documents = HEADER.unpack(head)
    if version != 1:
        raise bad(f"index version {version}; only version 1 (megatron.core's) is known")
    if code in FLOAT_CODES:
        raise bad(f"dtype code {code} ({FLOAT_CODES[code]}) holds no token ids")
    if code not in DTYPES:
        raise bad(f"unknown dtype code {code} (known: {', '.join(f'{c} {t.__name__}' for c, t in DTYPES.items())})")
    dtype = np.dtype(DTYPES[code])
    arrays = HEADER.size + 12 * sequences + 8 * documents
    if size not in (arrays, arrays + sequences):  # + sequence_modes in a multimodal index
        raise bad(
            f"it has {size} bytes, but its header ({sequences} sequences, {documents} document indices) needs {arrays}"
        )
    with open(idx_path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        lengths = np.frombuffer(mapped, np.int32, sequences, HEADER.size).astype(np.int64)
        pointers = np.frombuffer(mapped, np.int64, sequences, HEADER.size + 4 * sequences).copy()
        bounds = np.frombuffer(mapped, np.int64, documents, HEADER.size + 12 * sequences).copy()
    if documents == 0 or bounds[0] != 0 or bounds[-1] != sequences or np.any(np.diff(bounds) < 0):
        raise bad(f"its document indices do not run from 0 up to the sequence count {sequences}")
    if np.any(lengths < 0):
        raise bad(f"sequence {int(np.argmax(lengths < 0))} has a negative length")
    expected = np.concatenate([[0], np.cumsum(lengths * dtype.itemsize)])
    if not np.array_equal(pointers, expected[:-1]):
        raise bad(
            f"sequence {int(np.argmax(pointers != expected[:-1]))}'s pointer does not follow the lengths before it"
        )
    bin_size = bin_path.stat().st_size
    if bin_size != expected[-1]:
        raise DataError(
            f"{bin_path} has {bin_size} bytes, but {idx_path.name} describes {int(expected[-1])} ({sequences} "
            f"sequences of {dtype.name}): the .bin was truncated or does not belong to this .idx; {HINT}"
        )
    token_ends = np.concatenate([[0], np.cumsum(lengths)])
    return dtype, expected[bounds[:-1]], np.diff(token_ends[bounds])


def find_pairs(folder: str | os.PathLike, what: str) -> tuple[list[Path], Path, list[str] | None]:
    """The .bin paths of the folder's pairs and the folder, or of one path prefix (with its type name)."""
    prefix = Path(folder).expanduser()
    if prefix.with_name(prefix.name + ".idx").is_file():
        return [prefix.with_name(prefix.name + ".bin")], prefix.parent, [prefix.name]
    root = check_folder(folder, what, "Megatron .bin/.idx pairs (or give one pair's path prefix)")
    files = [p.with_suffix(".bin") for p in walk_files(root, (".idx",))]
    if not files:
        raise DataError(f"{what}={str(folder)!r} has no .idx files (Megatron's indexed format); {HINT}")
    return files, root, None


def open_megatron(folder, what: str = "data.train_folder") -> tuple[list[IndexedFile], list[str]]:
    """The folder's checked pairs and its dataset type names (type_id indexes the names)."""
    paths, root, names = find_pairs(folder, what)
    names = names or sorted({dataset_type_of(p, root) for p in paths})
    files = []
    for path in paths:
        dtype, starts, lengths = read_index(path)
        if len(lengths):
            type_id = 0 if len(names) == 1 else names.index(dataset_type_of(path, root))
            files.append(IndexedFile(path, type_id, dtype, starts, lengths))
    if not files:
        raise DataError(f"{what}={str(folder)!r}: every .idx lists no documents; {HINT}")
    return files, names


class MegatronReader(MappedFiles):
    """Reads document (file, index) as int64 token ids from memory-mapped .bin files."""

    def __init__(self, files: list[IndexedFile], vocab_size: int | None):
        super().__init__([f.path for f in files])
        self.dtypes = [f.dtype for f in files]
        self.starts = [f.starts for f in files]
        self.lengths = [f.lengths for f in files]
        self.vocab_size = vocab_size

    def read(self, file: int, document: int) -> np.ndarray:
        count = int(self.lengths[file][document])
        tokens = np.frombuffer(self._map(file), self.dtypes[file], count, int(self.starts[file][document]))
        tokens = tokens.astype(np.int64)
        if self.vocab_size is not None and count and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            bad = int(tokens.min()) if tokens.min() < 0 else int(tokens.max())
            raise DataError(
                f"{self.paths[file]} document {document} has token id {bad}, outside 0..model.vocab_size-1="
                f"{self.vocab_size - 1}: the data was tokenized for another vocabulary; set model.vocab_size to the "
                f"tokenizer's size"
            )
        return tokens
