"""Text in a Hugging Face `datasets` layout, tokenized on the fly (`data.type="streaming"`, InternEvo's "hf").

data.train_folder is a folder of `.jsonl` / `.json` (JSON Lines) / `.txt` / `.parquet` / `.arrow` files, a
`save_to_disk` folder (its state.json lists the .arrow files; a DatasetDict's split is data.split), or a
Hugging Face Hub dataset name (its .jsonl/.parquet files, read remotely where the hub is reachable; offline, or
with no answer within HUB_TIMEOUT_S, an error saying to download it).
Each record's data.text_key field (a JSON string record, or a .txt line, is the text itself) is tokenized
with data.tokenizer_path in the loader's workers, with BOS/EOS per data.add_bos_eos (text_tokenizer.py).
Dataset types are the top-level subfolders, as for the tokenized folders.

Shards. The text is cut into chunks: byte ranges of the line files (a line belongs to the chunk where it
starts), row ranges of the .arrow files, row groups of the .parquet files. Chunk i belongs to shard
i % data.stream_shards (S), so each shard spans the whole corpus and no record is in two shards. A shard is
an endless stream of packs, pass after pass: each pass reads the shard's chunks in an order permuted by
(seed, type, shard, pass); records are shuffled in blocks of K = data.shuffle_buffer // S (the block's
order a permutation seeded by (seed, type, shard, pass, block)); the samples (>= max(min_length, 1)
tokens) are packed exactly as the tokenized folders pack (packing.assemble_pack), and the pass's last
partial pack is dropped. A shard that ends a pass starts the next at once, whatever the other shards do.

Where a shard is (ShardStream.state, a small dict saved with every checkpoint): its pass, the position of
its current block (chunk in the pass order, offset in the chunk: a byte or a row), the block's number,
the samples of the block already packed and the tokens of the next one already packed. Resuming re-reads
that block and continues with exactly the packs the uninterrupted shard would have made.

How shards become batches (and why the data-parallel size may change on resume) is mixture.py's.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .packing import assemble_pack
from .text_tokenizer import SampleEncoder, TokenizerError, load_tokenizer
from .tokenized import DataError, dataset_type_of, walk_files

LINE_SUFFIXES = (".jsonl", ".json", ".txt")
SUFFIXES = (*LINE_SUFFIXES, ".parquet", ".arrow")
MAX_CHUNK_BYTES = 1 << 20  # line files: chunks of at most 1 MiB ...
MAX_CHUNK_ROWS = 4096  # ... .arrow files: of at most 4096 rows
CHUNKS_PER_SHARD = 16  # ... but small enough that each shard gets about this many chunks of a small corpus
HUB_TIMEOUT_S = 10  # a hub name's first request: an unanswered one means no hub, not a slow one
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")  # any set: do not try the hub
ARROW_HINT = "streaming needs `pyarrow` for .parquet and .arrow files: pip install 'pytrain[data]'"


@dataclass(frozen=True)
class TextFile:
    path: str  # a local path, or a path in the hub's file system
    name: str  # the path under the dataset's root (what a resumed run's data must match)
    type_id: int
    format: str  # "lines" (jsonl/json/txt), "parquet", "arrow"
    size: int  # line files: bytes; others: rows
    row_groups: tuple = ()  # parquet: the rows of each row group


def _pyarrow():
    try:
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise DataError(ARROW_HINT) from None
    return pyarrow


def _arrow_table(path: str):
    """An .arrow file (IPC file or stream format, as `datasets` writes) as a memory-mapped table."""
    pa = _pyarrow()
    source = pa.memory_map(path)
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source).read_all()


# -- finding the files ------------------------------------------------------------------------------------------
class FileSystem:
    """Where the files are: the local disk, or a Hugging Face Hub dataset (huggingface_hub.HfFileSystem)."""

    def __init__(self, hub=None):
        self.hub = hub

    def open(self, path: str):
        return self.hub.open(path, "rb") if self.hub else open(path, "rb")

    def size(self, path: str) -> int:
        return self.hub.size(path) if self.hub else os.path.getsize(path)


def find_text_files(folder: str, what: str, subset: str | None, split: str) -> tuple[list[str], str, FileSystem]:
    """The data files in reading order, the root they are typed under, and their file system."""
    root = Path(folder).expanduser()
    if subset:
        root = root / subset
    if not root.exists():
        if Path(folder).expanduser().exists() or folder.startswith((".", "/", "~")):
            raise DataError(f"{what}={folder!r}: {root} does not exist (data.subset_name={subset!r})")
        return find_hub_files(folder, what, subset, split)
    if not root.is_dir():
        if root.suffix in SUFFIXES:
            return [str(root)], str(root.parent), FileSystem()
        raise DataError(f"{what}={folder!r} is neither a folder nor a {', '.join(SUFFIXES)} file")
    if (root / "dataset_dict.json").exists():  # a DatasetDict saved with save_to_disk: one folder per split
        splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise DataError(
                f"{what}={folder!r} is a saved DatasetDict without split {split!r}: set data.split to one of {splits}"
            )
        root = root / split
    if (root / "state.json").exists():  # a Dataset saved with save_to_disk
        files = [str(root / f["filename"]) for f in json.loads((root / "state.json").read_text())["_data_files"]]
        return files, str(root), FileSystem()
    files = [str(p) for p in walk_files(root, SUFFIXES)]
    if not files:
        raise DataError(
            f"{what}={folder!r} has no {', '.join(SUFFIXES)} files and is not a saved dataset (save_to_disk)"
        )
    return files, str(root), FileSystem()


def find_hub_files(name: str, what: str, subset: str | None, split: str) -> tuple[list[str], str, FileSystem]:
    """A hub dataset's .jsonl/.parquet files (under subset_name; those of the split when file names say).

    Offline settings are honoured before anything is tried, and the first request has a timeout: the file
    system's own requests have none, so an unreachable hub would hang the run instead of failing it."""
    download = (
        f"download it where the hub is reachable (hf download {name} --repo-type dataset --local-dir DIR) and set "
        f"{what} to DIR"
    )
    offline = [v for v in OFFLINE_VARIABLES if os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")]
    if offline:
        raise DataError(
            f"{what}={name!r} is not a local folder, and as a Hugging Face Hub dataset it cannot be read here "
            f"({offline[0]}={os.environ[offline[0]]}: offline): {download}"
        )
    try:
        from huggingface_hub import HfApi, HfFileSystem

        HfApi().dataset_info(name, timeout=HUB_TIMEOUT_S)
        hub = HfFileSystem()
        root = f"datasets/{name}" + (f"/{subset}" if subset else "")
        files = sorted(p for p in hub.glob(f"{root}/**") if p.endswith((".jsonl", ".parquet")))
    except Exception as error:  # no network, no such dataset, no huggingface_hub: all end the same way
        raise DataError(
            f"{what}={name!r} is not a local folder, and as a Hugging Face Hub dataset it cannot be read here "
            f"({type(error).__name__}: {str(error)[:200]}): {download}; where there is no network, "
            f"HF_DATASETS_OFFLINE=1 makes this error immediate"
        ) from None
    of_split = [p for p in files if split in Path(p).relative_to(root).parts[:-1] or Path(p).name.startswith(split)]
    files = of_split or files
    if not files:
        raise DataError(f"{what}={name!r}: the hub dataset has no .jsonl or .parquet files under {root}")
    return files, root, FileSystem(hub)


def describe_files(paths: list[str], root: str, fs: FileSystem, what: str) -> tuple[list[TextFile], list[str]]:
    """Each file's format and size (bytes or rows, from its metadata), with its dataset type; empty files are
    errors naming them."""
    names = sorted({dataset_type_of(Path(p), Path(root)) for p in paths})
    files = []
    for path in paths:
        type_id = names.index(dataset_type_of(Path(path), Path(root)))
        name = str(Path(path).relative_to(root))
        if path.endswith(LINE_SUFFIXES):
            text_file = TextFile(path, name, type_id, "lines", fs.size(path))
        elif path.endswith(".parquet"):
            with fs.open(path) as handle:
                metadata = _pyarrow().parquet.ParquetFile(handle).metadata
                groups = tuple(metadata.row_group(g).num_rows for g in range(metadata.num_row_groups))
            text_file = TextFile(path, name, type_id, "parquet", sum(groups), groups)
        else:
            text_file = TextFile(path, name, type_id, "arrow", _arrow_table(path).num_rows)
        if text_file.size == 0:
            raise DataError(
                f"{path} is empty (no {'bytes' if text_file.format == 'lines' else 'rows'}): remove it from {what}"
            )
        files.append(text_file)
    return files, names


# -- reading records ------------------------------------------------------------------------------------------
class RecordReader:
    """Reads the records of one chunk from a position in it; per process, it keeps the files it opened."""

    def __init__(self, files: list[TextFile], fs: FileSystem, text_key: str, chunk_bytes: int, chunk_rows: int):
        self.files, self.fs, self.text_key = files, fs, text_key
        self.chunk_bytes, self.chunk_rows = chunk_bytes, chunk_rows
        counts = [self._chunks_of(f) for f in files]
        self.first_chunk = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_chunks = int(self.first_chunk[-1])
        self._open: dict = {}
        self._pid = None

    def __getstate__(self):
        return {**self.__dict__, "_open": {}, "_pid": None}

    def _chunks_of(self, f: TextFile) -> int:
        if f.format == "parquet":
            return len(f.row_groups)
        unit = self.chunk_bytes if f.format == "lines" else self.chunk_rows
        return -(-f.size // unit)

    def _handle(self, file: int):
        if self._pid != os.getpid():
            self._open, self._pid = {}, os.getpid()
        if file not in self._open:
            f = self.files[file]
            if f.format == "lines":
                self._open[file] = self.fs.open(f.path)
            elif f.format == "parquet":
                self._open[file] = _pyarrow().parquet.ParquetFile(self.fs.open(f.path))
            else:
                self._open[file] = _arrow_table(f.path)
        return self._open[file]

    def locate(self, chunk: int) -> tuple[int, int]:
        """(file, chunk index within the file) of a global chunk."""
        file = int(np.searchsorted(self.first_chunk, chunk, side="right")) - 1
        return file, chunk - int(self.first_chunk[file])

    def records(self, chunk: int, offset: int | None):
        """(file, position, position after, text) of the chunk's records from `offset` (None: its start); a
        position is a byte (line files) or a row."""
        file, k = self.locate(chunk)
        f = self.files[file]
        if f.format == "lines":
            yield from self._lines(file, k * self.chunk_bytes, min((k + 1) * self.chunk_bytes, f.size), offset)
            return
        handle = self._handle(file)
        if f.format == "parquet":
            start = sum(f.row_groups[:k])
            self._check_column(file, handle.schema_arrow.names)
            column = handle.read_row_group(k, columns=[self.text_key]).column(0).to_pylist()
            end = start + f.row_groups[k]
        else:
            start, end = k * self.chunk_rows, min((k + 1) * self.chunk_rows, f.size)
            self._check_column(file, handle.column_names)
            column = handle.slice(start, end - start).column(self.text_key).to_pylist()
        first = start if offset is None else offset
        for row, text in zip(range(first, end), column[first - start :]):
            if not isinstance(text, str):
                raise DataError(f"{f.path} row {row} has no text in column {self.text_key!r} (it holds {text!r})")
            yield file, row, row + 1, text

    def _check_column(self, file: int, columns: list[str]) -> None:
        if self.text_key not in columns:
            raise DataError(
                f"{self.files[file].path} has no column {self.text_key!r} (it has: {', '.join(map(repr, columns))}): "
                f"set data.text_key"
            )

    def _lines(self, file: int, begin: int, end: int, offset: int | None):
        """The lines starting in [begin, end) (the chunk), from offset on."""
        handle = self._handle(file)
        if offset is None:
            offset = begin
            if begin > 0:  # a line that started before the chunk belongs to the previous one
                handle.seek(begin - 1)
                if handle.read(1) != b"\n":
                    handle.readline()
                offset = handle.tell()
        handle.seek(offset)
        plain = self.files[file].path.endswith(".txt")  # each line is a sample, as the tokenize command reads it
        while offset < end:
            line = handle.readline()
            if not line:
                return
            after = offset + len(line)
            if line.strip():
                yield (
                    file,
                    offset,
                    after,
                    (self._plain(line, file, offset) if plain else self._text(line, file, offset)),
                )
            offset = after

    def _plain(self, raw: bytes, file: int, offset: int) -> str:
        try:
            return raw.decode("utf-8").strip()
        except UnicodeDecodeError as error:
            raise self.error(file, offset, f"is not UTF-8 text ({error})") from None

    def _text(self, raw: bytes, file: int, offset: int) -> str:
        if offset == 0 and raw.lstrip().startswith(b"["):
            raise DataError(
                f"{self.files[file].path} holds one JSON array: streaming reads JSON Lines (one record per line); "
                f"write it as .jsonl, or pre-tokenize it (python -m pytrain.data.tokenize)"
            )
        try:
            record = json.loads(raw)
        except ValueError as error:
            raise self.error(file, offset, f"is not JSON ({error}): {raw[:80]!r}") from None
        if isinstance(record, str):
            return record
        if isinstance(record, dict) and isinstance(record.get(self.text_key), str):
            return record[self.text_key]
        keys = ", ".join(map(repr, record)) if isinstance(record, dict) else type(record).__name__
        raise self.error(file, offset, f"has no string field {self.text_key!r} (it has: {keys}): set data.text_key")

    def error(self, file: int, position: int, why: str) -> DataError:
        """A record's error, naming its file and line (line files: counted up to the byte) or row."""
        f = self.files[file]
        if f.format != "lines":
            return DataError(f"{f.path} row {position} {why}")
        line, left = 1, position
        with self.fs.open(f.path) as handle:
            while left > 0 and (block := handle.read(min(1 << 20, left))):
                line, left = line + block.count(b"\n"), left - len(block)
        return DataError(f"{f.path} line {line} {why}")


# -- a shard's packs ------------------------------------------------------------------------------------------
class ShardStream:
    """One shard's endless packs (module doc); state() after any pack resumes exactly there."""

    def __init__(self, text: "StreamedText", shard: int, state: dict | None = None):
        self.text, self.shard = text, shard
        state = state or dict(pass_=0, chunk=0, offset=None, block=0, taken=0, carry=0, packs=0, pass_packs=0)
        self.pass_, self.packs = state["pass_"], state["packs"]
        self._start_pass(self.pass_)
        self.made_in_pass = state["pass_packs"]
        self.chunk, self.offset, self.block = state["chunk"], state["offset"], state["block"]
        self.block_start = (self.chunk, self.offset)
        self.samples = self._read_block()  # the current block's samples (file, position, tokens), shuffled
        self.taken, self.carry = state["taken"], state["carry"]

    def state(self) -> dict:
        chunk, offset = self.block_start
        return dict(
            pass_=self.pass_,
            chunk=chunk,
            offset=offset,
            block=self.block,
            taken=self.taken,
            carry=self.carry,
            packs=self.packs,
            pass_packs=self.made_in_pass,
        )

    def _start_pass(self, pass_: int) -> None:
        text = self.text
        mine = np.arange(self.shard, text.reader.num_chunks, text.num_shards)
        self.order = np.random.default_rng((text.seed, text.stream_id, self.shard, pass_)).permutation(mine)
        self.pass_, self.chunk, self.offset, self.block = pass_, 0, None, 0
        self.made_in_pass = 0

    def _read_block(self) -> list:
        """The next K records from (chunk, offset), tokenized, filtered by min_length and permuted; advances
        (chunk, offset) past them. Empty at the end of the pass."""
        text = self.text
        records = []
        while len(records) < text.block_records and self.chunk < len(self.order):
            for file, position, after, body in text.reader.records(int(self.order[self.chunk]), self.offset):
                records.append((file, position, body))
                self.offset = after
                if len(records) == text.block_records:
                    break
            else:
                self.chunk, self.offset = self.chunk + 1, None
        tokens = text.encoder.encode_ids([body for _, _, body in records])
        samples = [(f, p, t) for (f, p, _), t in zip(records, tokens) if len(t) >= text.min_length]
        for f, p, t in samples:
            if t.max() >= text.vocab_size:
                raise text.reader.error(
                    f,
                    p,
                    f"tokenizes to id {int(t.max())}, not below model.vocab_size={text.vocab_size}: set "
                    f"model.vocab_size to the tokenizer's size ({text.encoder.vocab_size})",
                )
        seed = (text.seed, text.stream_id, self.shard, self.pass_, self.block)
        return [samples[i] for i in np.random.default_rng(seed).permutation(len(samples))]

    def next_pack(self) -> dict:
        """The shard's next pack (the pass's partial last one is dropped: the next pass's first comes)."""
        text = self.text
        while True:
            pieces, filled = [], 0
            while filled < text.pack_tokens:
                if self.taken == len(self.samples):
                    if self.chunk >= len(self.order):  # the pass is over
                        break
                    self.block += 1
                    self.block_start = (self.chunk, self.offset)
                    self.samples, self.taken = self._read_block(), 0
                    continue
                file, _, tokens = self.samples[self.taken]
                n = min(len(tokens) - self.carry, text.pack_tokens - filled)
                pieces.append((tokens, self.carry, self.carry + n, text.type_ids[file]))
                filled += n
                self.carry += n
                if self.carry == len(tokens):
                    self.taken, self.carry = self.taken + 1, 0
            if filled == text.pack_tokens:
                self.packs += 1
                self.made_in_pass += 1
                return assemble_pack(pieces, text.pack_tokens, text.seq_len, text.into_one)
            if self.made_in_pass == 0:
                raise DataError(
                    f"stream shard {self.shard} of {text.num_shards} ({text.description}) holds less than one pack "
                    f"of {text.pack_tokens} tokens: use more text, or lower data.stream_shards, data.seq_len or "
                    f"data.micro_bsz"
                )
            self._start_pass(self.pass_ + 1)
            self.block_start = (self.chunk, self.offset)
            self.samples, self.taken, self.carry = self._read_block(), 0, 0


class StreamedText:
    """A streamed dataset (or one type of it, in a mixture): S shards of packs. stream_id separates the shuffles
    of several streamed types."""

    stateful = True

    def __init__(
        self,
        files: list[TextFile],
        fs: FileSystem,
        *,
        encoder: SampleEncoder,
        text_key: str,
        seq_len: int,
        micro_bsz: int,
        pack_sample_into_one: bool,
        min_length: int,
        seed: int,
        num_shards: int,
        shuffle_buffer: int,
        vocab_size: int,
        stream_id: int = 0,
    ):
        self.encoder, self.seed, self.stream_id, self.num_shards = encoder, seed, stream_id, num_shards
        self.seq_len, self.pack_tokens, self.into_one = seq_len, seq_len * micro_bsz, pack_sample_into_one
        self.min_length, self.vocab_size = max(min_length, 1), vocab_size
        self.block_records = max(1, shuffle_buffer // num_shards)
        line_bytes = sum(f.size for f in files if f.format == "lines")
        arrow_rows = sum(f.size for f in files if f.format == "arrow")
        per_shard = num_shards * CHUNKS_PER_SHARD
        chunk_bytes = max(1, min(MAX_CHUNK_BYTES, line_bytes // per_shard))
        chunk_rows = max(1, min(MAX_CHUNK_ROWS, arrow_rows // per_shard))
        self.reader = RecordReader(files, fs, text_key, chunk_bytes, chunk_rows)
        self.type_ids = [f.type_id for f in files]
        self.description = f"{len(files)} text files, {self.reader.num_chunks} chunks"
        if self.reader.num_chunks < num_shards:
            raise DataError(
                f"the text ({self.description}) has fewer chunks than data.stream_shards={num_shards} (a .parquet "
                f"file's chunks are its row groups): lower data.stream_shards or write smaller row groups"
            )
        self.fingerprint = dict(
            kind="streaming",
            files=[[f.name, f.size] for f in files],
            tokenizer=[
                type(encoder.tokenizer).__name__,
                encoder.vocab_size,
                encoder.add,
                encoder.bos_id,
                encoder.eos_id,
            ],
            text_key=text_key,
            pack_tokens=self.pack_tokens,
            pack_sample_into_one=pack_sample_into_one,
            min_length=self.min_length,
            shards=num_shards,
            shuffle_buffer=shuffle_buffer,
            chunks=[chunk_bytes, chunk_rows],
            seed=seed,
        )

    def shard_stream(self, shard: int, state: dict | None) -> ShardStream:
        return ShardStream(self, shard, state)


def text_encoder(data_cfg, vocab_size: int | None = None, where: str = "data") -> SampleEncoder:
    """tokenizer_path with add_bos_eos / bos_id / eos_id; errors name the fields (of `where`: the data section,
    or a named source)."""
    spec = data_cfg.get("tokenizer_path")
    if spec is None:
        raise DataError(f"data.type='streaming' tokenizes text on the fly: set {where}.tokenizer_path")
    try:
        encoder = SampleEncoder(
            load_tokenizer(spec, f"{where}.tokenizer_path"),
            data_cfg.get("add_bos_eos") or "tokenizer",
            data_cfg.get("bos_id"),
            data_cfg.get("eos_id"),
            what=f"{where}.add_bos_eos",
        )
    except TokenizerError as error:
        raise DataError(str(error)) from None
    if vocab_size is not None and encoder.vocab_size > vocab_size:
        raise DataError(
            f"{where}.tokenizer_path={spec!r} has {encoder.vocab_size} tokens, more than model.vocab_size="
            f"{vocab_size}: set model.vocab_size to at least {encoder.vocab_size}"
        )
    return encoder


def open_text(data_cfg, folder: str, what: str = "data.train_folder"):
    """(files, dataset type names, file system) of a streamed folder (or hub name)."""
    paths, root, fs = find_text_files(folder, what, data_cfg.get("subset_name"), data_cfg.get("split") or "train")
    files, names = describe_files(paths, root, fs, what)
    return files, names, fs


# -- validation: small sets, tokenized once when opened ---------------------------------------------------------------
@dataclass(frozen=True)
class TokenizedTextFile:
    path: Path
    type_id: int
    lengths: np.ndarray


class TokenizedTextReader:
    """A validation set's samples, tokenized when the folder is opened (validation sets are small; their
    tokens stay in memory): read(file, sample) as tokenized.SampleReader."""

    def __init__(self, tokens: list[list[np.ndarray]]):
        self.tokens = tokens

    def read(self, file: int, sample: int) -> np.ndarray:
        return self.tokens[file][sample]

    def release_pages(self) -> None:
        """Nothing is mapped."""


def open_text_validation(data_cfg, folder: str, vocab_size: int):
    """(files, dataset type names, reader) of a streamed validation folder: every record tokenized now."""
    files, names, fs = open_text(data_cfg, folder, "data.valid_folder")
    encoder = text_encoder(data_cfg, vocab_size)
    reader = RecordReader(files, fs, data_cfg.get("text_key") or "text", MAX_CHUNK_BYTES, MAX_CHUNK_ROWS)
    tokens = [[] for _ in files]
    for chunk in range(reader.num_chunks):
        records = list(reader.records(chunk, None))
        if records:
            tokens[records[0][0]].extend(encoder.encode_ids([body for *_, body in records]))
    out = [
        TokenizedTextFile(Path(f.path), f.type_id, np.array([len(t) for t in ts], dtype=np.int64))
        for f, ts in zip(files, tokens)
    ]
    return out, names, TokenizedTextReader(tokens)
