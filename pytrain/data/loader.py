"""The training and validation loaders the trainer consumes, with an exactly resumable position.

Batch. Each item is one step's batch for this rank, a dict of tensors with leading dims
(micro_num_this_step, micro_bsz, seq_len): "input_ids", "labels" (-100: no loss), "positions" (restarting
at 0 in every segment), "type_ids" (int64, index into dataset_types); and, when rows hold several
documents (a tokenized folder with pack_sample_into_one=False), "cu_seqlens" int32 (micro_num_this_step,
width): per micro-batch the segment boundaries over its micro_bsz*seq_len flattened tokens, from 0 to
micro_bsz*seq_len, padded by repeating the last one, and "max_seqlen" int64 (micro_num_this_step,). Without
cu_seqlens every row of seq_len tokens is one sequence.

Order. The packs of a source (see packing.py) are permuted per epoch by a generator seeded with
(seed, epoch), so the order of any epoch is a pure function of the two and never depends on what was read
before. Batch b takes the next G = micro_num_b * data_parallel_size packs of the epoch (a new epoch starts
when fewer than G are left; the tail is not read); rank r takes packs [r*micro_num_b, (r+1)*micro_num_b) of
those G, so the union over ranks is the same global batch whatever the data-parallel size. Planned sources
(streamed text, weighted mixtures: mixture.py) are endless, unpermuted, and give rank r the batch's packs
r, r + dp, ... instead, built one by one; their position also holds the plan's place and the streamed
shards' states.

Position. (epoch, packs read in the epoch, batch count) fixes where the stream is; state_dict() holds it
with the consumed counters and the seed. It is advanced in the main process when a batch is handed to the
trainer, never when a worker prefetches one, so a loader rebuilt from the state taken after batch k yields
exactly batches k+1.. of the uninterrupted run, across epoch boundaries too, and with any data-parallel size
(the position counts global packs).

Schedule (InternLM's fields). rampup_batch_size "start incr every": batch b has
min(start + (b // every) * incr, micro_num) micro-batches per rank. skip_batches "a-b,c": those batch
indices (inclusive ranges, 0-based like InternLM's batch_count) are consumed, not built and not yielded;
`loader.skipped_batches` lists them and `loader.batch_index` is the index of the batch last yielded.
total_steps bounds the batch count, skipped batches included, as in InternLM.
"""

import bisect
import math
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from .megatron import MegatronReader, open_megatron
from .mixture import IndexedComponent, PlannedPacks
from .packing import IGNORE, PackSource, TokenizedPacks, dummy_packs, stack_packs, window_packs
from .stdlib_corpus import load_stdlib_corpus
from .streaming import StreamedText, open_text, open_text_validation, text_encoder
from .tokenized import DataError, SampleReader, open_folder

BUILTIN_CORPUS = "builtin:stdlib"
STATE_VERSION = 1
PREFETCH_FACTOR = 4  # batches in flight per worker


def parse_rampup(text: str, micro_num: int) -> tuple[int, int, int] | None:
    if not text:
        return None
    try:
        start, increment, every = (int(x) for x in text.split())
    except ValueError:
        start = increment = every = 0
    if start <= 0 or increment < 0 or every <= 0 or start > micro_num:
        raise DataError(
            f"data.rampup_batch_size={text!r} must be 'start increment every' (integers, start in 1..micro_num="
            f"{micro_num}, increment >= 0, every > 0): micro-batches per rank at batch b are "
            f"min(start + (b // every) * increment, micro_num)"
        )
    return start, increment, every


def parse_skip_batches(text: str) -> list[tuple[int, int]]:
    """'a-b,c' -> [(a, b), (c, c)], inclusive, ascending."""
    ranges = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            low, _, high = part.partition("-")
            low, high = int(low), int(high or low)
        except ValueError:
            low, high = -1, -1
        if low < 0 or high < low or (ranges and low <= ranges[-1][1]):
            raise DataError(
                f"data.skip_batches={text!r}: {part!r} is not a batch range; write ascending, non-overlapping "
                f"0-based ranges like '100-200,350'"
            )
        ranges.append((low, high))
    return ranges


@dataclass(frozen=True)
class Position:
    epoch: int = 0
    offset: int = 0  # global packs read in this epoch
    batch: int = 0  # batches consumed (InternLM's batch_count), skipped ones included
    consumed_samples: int = 0  # global packs read, skipped batches included
    consumed_tokens: int = 0  # global tokens of the batches yielded for training


class TrainLoader:
    """This rank's stream of step batches; see the module doc. Iterating continues from the current position
    (a second `for` over it resumes where the first stopped)."""

    def __init__(
        self,
        source: PackSource,
        *,
        micro_num: int,
        total_steps: int,
        data_parallel_size: int,
        data_parallel_rank: int,
        seed: int,
        rampup_batch_size: str = "",
        skip_batches: str = "",
        num_workers: int = 0,
        pin_memory: bool = False,
        dataset_types: list[str] | None = None,
    ):
        self.source, self.micro_num, self.total_steps = source, micro_num, total_steps
        self.dp, self.rank, self.seed = data_parallel_size, data_parallel_rank, seed
        self.rampup_text, self.rampup = rampup_batch_size, parse_rampup(rampup_batch_size, micro_num)
        self.skip_ranges = parse_skip_batches(skip_batches)
        self.skipped_batches = tuple(
            b for low, high in self.skip_ranges for b in range(low, min(high, total_steps - 1) + 1)
        )
        self._skip_starts = [low for low, _ in self.skip_ranges]
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.dataset_types = dataset_types or []
        self.position = Position()
        self.batch_index = -1
        self._order_cache: tuple[int, np.ndarray] | None = None
        self.planned = getattr(source, "planned", False)  # built pack by pack along a plan (mixture.py)
        if self.planned:
            source.check_layout(data_parallel_size)
            self.anchor = source.start()  # the plan at the position
            self.shard_states: dict[str, dict] = {}  # the streamed shards this rank has read, after the position
        global_batch = micro_num * data_parallel_size
        if source.num_packs < global_batch:
            raise DataError(
                f"the training data holds {source.num_packs} packs of data.micro_bsz x data.seq_len = "
                f"{source.pack_tokens} tokens ({source.description}), fewer than one global batch of "
                f"{global_batch} (data.micro_num {micro_num} x data-parallel size {data_parallel_size}): "
                f"use more data, a smaller batch or a shorter seq_len"
            )

    # -- the schedule ------------------------------------------------------------------------------------
    def micro_num_at(self, batch: int) -> int:
        if self.rampup is None:
            return self.micro_num
        start, increment, every = self.rampup
        return min(start + (batch // every) * increment, self.micro_num)

    def is_skipped(self, batch: int) -> bool:
        i = bisect.bisect_right(self._skip_starts, batch) - 1
        return i >= 0 and batch <= self.skip_ranges[i][1]

    def _steps(self, start: Position):
        """(position before, micro_num, skipped, position after) for every batch from start to total_steps."""
        position = start
        while position.batch < self.total_steps:
            micro_num = self.micro_num_at(position.batch)
            global_packs = micro_num * self.dp
            if position.offset + global_packs > self.source.num_packs:
                position = replace(position, epoch=position.epoch + 1, offset=0)
            skipped = self.is_skipped(position.batch)
            after = replace(
                position,
                offset=position.offset + global_packs,
                batch=position.batch + 1,
                consumed_samples=position.consumed_samples + global_packs,
                consumed_tokens=position.consumed_tokens + (0 if skipped else global_packs * self.source.pack_tokens),
            )
            yield position, micro_num, skipped, after
            position = after

    def _pack_ids(self, epoch: int, offset: int, micro_num: int) -> np.ndarray:
        first = offset + self.rank * micro_num
        if not self.source.shuffle:
            return np.arange(first, first + micro_num, dtype=np.int64)
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = np.random.default_rng((self.seed, epoch)).permutation(self.source.num_packs)
            self._order_cache = (epoch, order)
        return self._order_cache[1][first : first + micro_num]

    def _plan(self, start: Position):
        """What the workers build: one item per batch yielded, skipped batches left out."""
        for before, micro_num, skipped, after in self._steps(start):
            if not skipped:
                yield before.batch, self._pack_ids(before.epoch, before.offset, micro_num), astuple_ints(after)

    # -- iteration ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches still to be yielded."""
        remaining = self.total_steps - self.position.batch
        return remaining - sum(1 for b in self.skipped_batches if b >= self.position.batch)

    def __iter__(self):
        if self.planned:
            yield from self._iter_planned()
            return
        builder = StepBuilder(self.source)
        loader = DataLoader(
            builder,
            sampler=_Plan(self, self.position),
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=PREFETCH_FACTOR if self.num_workers else None,
        )
        for item in loader:
            if isinstance(item, str):  # a DataError in a worker: re-raised here with its own message
                raise DataError(item)
            batch_index, after, flat, layout = item
            self.position, self.batch_index = Position(*after), batch_index
            yield unflat_batch(flat, layout)
        for *_, after in self._steps(self.position):  # trailing skipped batches are consumed too
            self.position = after

    def _iter_planned(self):
        """A planned source's batches: its packs come one by one, rank r's q-th pack being position q * dp + r
        (mixture.py), built by worker q mod W (W dividing this rank's shards, so each shard has one worker)."""
        start = self.position
        steps = list(self._steps(start))
        count = sum(micro_num for _, micro_num, _, _ in steps)
        workers = self.num_workers
        if workers and self.source.block > 1:
            workers = math.gcd(workers, self.source.block // self.dp)
        packs = PlannedPackStream(
            self.source, self.dp, self.rank, start.offset // self.dp, count, self.anchor, dict(self.shard_states)
        )
        loader = DataLoader(
            packs,
            batch_size=None,
            num_workers=workers,
            pin_memory=False,
            prefetch_factor=PREFETCH_FACTOR * self.micro_num if workers else None,
        )
        items = iter(loader)
        for before, micro_num, skipped, after in steps:
            built = [next(items) for _ in range(micro_num)]
            for item in built:
                if isinstance(item, str):  # a DataError in a worker: re-raised here with its own message
                    raise DataError(item)
            updates = dict(update for _, update in built if update is not None)
            if skipped:
                self.shard_states.update(updates)
                self.position, self.anchor = after, self.source.anchor_at(after.offset, self.anchor)
                continue
            flat, layout = flat_batch(
                stack_packs([pack for pack, _ in built], self.source.into_one), self.source.seq_len
            )
            self.shard_states.update(updates)
            self.position, self.anchor = after, self.source.anchor_at(after.offset, self.anchor)
            self.batch_index = before.batch
            yield unflat_batch(flat.pin_memory() if self.pin_memory else flat, layout)

    # -- resume ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The position. For a planned source with streamed shards, collective when torch.distributed is
        initialized: every rank calls it, and each gets every rank's shard states."""
        state = self._state()
        if self.planned:
            shards = dict(self.shard_states)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                every = [None] * dist.get_world_size()
                dist.all_gather_object(every, shards)
                for part in every:
                    shards.update(part)
            state["plan"] = {"block": self.anchor[0], "counts": list(self.anchor[1]), "shards": shards}
        return state

    def _state(self) -> dict:
        p = self.position
        return {
            "version": STATE_VERSION,
            "epoch": p.epoch,
            "step": p.batch,
            "packs_read_in_epoch": p.offset,
            "consumed_samples": p.consumed_samples,
            "consumed_tokens": p.consumed_tokens,
            # The permutation of epoch e is numpy's PCG64 seeded with (seed, e): these two are its whole state.
            "rng": {"generator": "numpy.random.default_rng((seed, epoch)).permutation", "seed": self.seed},
            "stream": dict(self.source.fingerprint),
            "data_parallel_size": self.dp,
            "micro_num": self.micro_num,
            "rampup_batch_size": self.rampup_text,
        }

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"the data-loader state has version {state.get('version')!r}, not {STATE_VERSION}")
        saved_seed = state["rng"]["seed"]
        if saved_seed != self.seed:
            raise DataError(
                f"the checkpoint's data stream was shuffled with seed {saved_seed}, this run's seed is "
                f"{self.seed}: run with seed {saved_seed} to continue the same stream"
            )
        saved, here = dict(state["stream"]), dict(self.source.fingerprint)
        if saved != here:
            changed = ", ".join(
                f"{k}: {saved.get(k)!r} -> {here.get(k)!r}"
                for k in sorted(saved.keys() | here.keys())
                if saved.get(k) != here.get(k)
            )
            raise DataError(
                f"the training data differs from the checkpoint's ({changed}): the saved position cannot be "
                f"continued; restore the data and data.seq_len / micro_bsz / pack_sample_into_one / "
                f"min_length of that run, or resume without the sampler state"
            )
        self.position = Position(
            epoch=int(state["epoch"]),
            offset=int(state["packs_read_in_epoch"]),
            batch=int(state["step"]),
            consumed_samples=int(state["consumed_samples"]),
            consumed_tokens=int(state["consumed_tokens"]),
        )
        self.batch_index = self.position.batch - 1
        if self.planned:
            plan = state["plan"]
            self.anchor = (int(plan["block"]), [int(c) for c in plan["counts"]])
            self.shard_states = dict(plan["shards"])


class PlannedPackStream(IterableDataset):
    """The packs of this rank's positions from a planned source, each with its shard's state after it; in
    worker w of W, those of the positions q with (q - first) mod W == w (the DataLoader takes the workers'
    items in turn, so the items stay in order)."""

    def __init__(self, source, dp: int, rank: int, first: int, count: int, anchor, shard_states: dict):
        self.source, self.dp, self.rank, self.first, self.count = source, dp, rank, first, count
        self.anchor, self.shard_states = anchor, shard_states

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        builder = self.source.builder(self.shard_states)
        positions = ((self.first + i) * self.dp + self.rank for i in range(self.count))
        for i, (component, j) in enumerate(self.source.lanes(positions, self.anchor)):
            if i % workers != worker:
                continue
            try:
                yield builder.build(component, j)
            except DataError as error:
                yield str(error)
                return


def astuple_ints(position: Position) -> tuple:
    return tuple(asdict(position).values())


class _Plan:
    """The DataLoader's sampler: iterable, one item per yielded batch (it runs ahead of the trainer)."""

    def __init__(self, loader: TrainLoader, start: Position):
        self.loader, self.start = loader, start

    def __iter__(self):
        return self.loader._plan(self.start)


class StepBuilder(Dataset):
    """Builds one step's batch (in a worker when num_workers > 0) from (batch index, pack ids, position)."""

    def __init__(self, source: PackSource):
        self.source = source

    def __getitem__(self, item):
        batch_index, pack_ids, after = item
        try:
            packs = self.source.build_packs(pack_ids)
        except DataError as error:
            return str(error)
        return batch_index, after, *flat_batch(packs, self.source.seq_len)


INT_KEYS = ("input_ids", "labels", "positions", "type_ids")


def flat_batch(packs: dict, seq_len: int) -> tuple[torch.Tensor, tuple]:
    """Numpy packs -> one int64 tensor holding the whole batch, and its layout. One tensor because each
    tensor a worker hands over costs a shared-memory segment: one per batch instead of six triples the
    rate of a 2-worker loader on small batches."""
    n, pack_tokens = packs["input_ids"].shape
    parts = [np.ascontiguousarray(packs[key], dtype=np.int64).ravel() for key in INT_KEYS]
    width = 0
    if "cu_seqlens" in packs:
        bounds = packs["cu_seqlens"]
        width = max(len(b) for b in bounds)
        cu = np.full((n, width), pack_tokens, dtype=np.int64)  # padded by repeating the last boundary
        for i, b in enumerate(bounds):
            cu[i, : len(b)] = b
        parts += [cu.ravel(), np.diff(cu, axis=1).max(axis=1)]
    return torch.from_numpy(np.concatenate(parts)), (n, pack_tokens // seq_len, seq_len, width)


def unflat_batch(flat: torch.Tensor, layout: tuple) -> dict:
    """The batch dict of (micro_num, micro_bsz, seq_len) views into flat; cu_seqlens int32, max_seqlen int64."""
    n, rows, seq_len, width = layout
    size = n * rows * seq_len
    batch = {key: flat[i * size : (i + 1) * size].view(n, rows, seq_len) for i, key in enumerate(INT_KEYS)}
    if width:
        at = len(INT_KEYS) * size
        batch["cu_seqlens"] = flat[at : at + n * width].view(n, width).to(torch.int32)
        batch["max_seqlen"] = flat[at + n * width :]
    return batch


def _get(cfg: Mapping, key: str, default):
    value = cfg.get(key, default)
    return default if value is None and default is not None else value


DATA_TYPES = {"tokenized": "tokenized", "megatron": "megatron", "streaming": "streaming", "hf": "streaming"}


def folder_source(data_cfg: Mapping, folder: str, *, vocab_size: int, seed: int) -> tuple[PackSource, list[str]]:
    """The packs of data.train_folder in data.type's format, weighted by data.dataset_weights when given."""
    kind = data_kind(data_cfg)
    packing = packing_fields(data_cfg, seed)
    weights = data_cfg.get("dataset_weights")
    if kind == "streaming":
        files, names, fs = open_text(data_cfg, folder)
        streaming = streaming_fields(data_cfg, vocab_size)
        if weights is None:
            return PlannedPacks([StreamedText(files, fs, **streaming, **packing)], [1.0], names), names
        parts = [
            StreamedText([f for f in files if f.type_id == t], fs, **streaming, **packing, stream_id=t)
            for t, _, _ in mixture_parts(weights, names)
        ]
    else:
        files, names = open_documents(kind, folder)
        if weights is None:
            return TokenizedPacks(files, document_reader(kind, files, vocab_size), kind=kind, **packing), names
        parts = [
            indexed_component(kind, [f for f in files if f.type_id == t], vocab_size, packing, t, name)
            for t, name, _ in mixture_parts(weights, names)
        ]
    chosen = mixture_parts(weights, names)
    return PlannedPacks(parts, [w for *_, w in chosen], [name for _, name, _ in chosen]), names


def named_sources(data_cfg: Mapping, *, vocab_size: int, seed: int) -> tuple[PlannedPacks, list[str]]:
    """data.sources mixed by data.dataset_weights: each source is one dataset type (the sorted names number
    them), read from its own folder in its own format (its fields over the data section's) and packed as that
    format packs alone. Its shuffles are seeded by its name (source_seed), so it gives the same packs, in the
    same order, alone or mixed with any others."""
    sources = data_cfg["sources"]
    names = sorted(sources)
    packing = packing_fields(data_cfg, seed)
    chosen = mixture_parts(data_cfg.get("dataset_weights") or {}, names, "source", "the sources")
    parts = []
    for t, name, _ in chosen:
        spec = {**data_cfg, **sources[name]}
        kind, folder, where = data_kind(spec), spec.get("train_folder"), f"data.sources[{name!r}]"
        if folder is None:
            raise DataError(f"{where}.train_folder is missing: set it to the source's folder")
        if kind == "streaming":
            files, _, fs = open_text(spec, folder, f"{where}.train_folder")
            mine = [replace(f, type_id=t) for f in files]
            streaming = streaming_fields(spec, vocab_size, where)
            parts.append(StreamedText(mine, fs, **streaming, **packing, stream_id=source_seed(name)))
        else:
            files, _ = open_documents(kind, folder, f"{where}.train_folder")
            mine = [replace(f, type_id=t) for f in files]
            parts.append(indexed_component(kind, mine, vocab_size, packing, source_seed(name), name))
    return PlannedPacks(parts, [w for *_, w in chosen], [name for _, name, _ in chosen]), names


def source_seed(name: str) -> int:
    """A named source's number in the seeds of its shuffles: from its name (CRC-32, the same in every process
    and run, unlike hash()), not from its place among the others."""
    return zlib.crc32(name.encode())


def packing_fields(data_cfg: Mapping, seed: int) -> dict:
    """How every source packs (the data section's fields): a mixture's parts fill the same rows."""
    return dict(
        seq_len=data_cfg["seq_len"],
        micro_bsz=data_cfg["micro_bsz"],
        pack_sample_into_one=bool(_get(data_cfg, "pack_sample_into_one", False)),
        min_length=int(_get(data_cfg, "min_length", 0)),
        seed=seed,
    )


def streaming_fields(data_cfg: Mapping, vocab_size: int, where: str = "data") -> dict:
    """How streamed text is read and tokenized (StreamedText's settings); errors name the fields of `where`."""
    return dict(
        encoder=text_encoder(data_cfg, vocab_size, where),
        text_key=_get(data_cfg, "text_key", "text"),
        num_shards=int(_get(data_cfg, "stream_shards", 8)),
        shuffle_buffer=int(_get(data_cfg, "shuffle_buffer", 8192)),
        vocab_size=vocab_size,
    )


def indexed_component(kind: str, files: list, vocab_size: int, packing: dict, index: int, name: str):
    """A mixture's part of already tokenized documents (InternLM's or Megatron's files)."""
    packs = TokenizedPacks(files, document_reader(kind, files, vocab_size), kind=kind, **packing)
    return IndexedComponent(packs, index, packing["seed"], name)


def mixture_parts(
    weights: Mapping,
    names: list[str],
    of: str = "dataset type of the data",
    listing: str = "the types (top-level subfolders)",
) -> list[tuple[int, str, float]]:
    """(type id, name, weight) of the types data.dataset_weights mixes (weight > 0); it must weigh every type."""
    unknown = sorted(set(weights) - set(names))
    missing = sorted(set(names) - set(weights))
    if unknown or missing:
        raise DataError(
            f"data.dataset_weights={dict(weights)!r} "
            + (f"names {', '.join(map(repr, unknown))}, not a {of}; " if unknown else "")
            + (f"has no weight for {', '.join(map(repr, missing))}; " if missing else "")
            + f"{listing} are {', '.join(map(repr, names))}: give each a weight (0: left out)"
        )
    return [(names.index(name), name, float(weight)) for name, weight in weights.items() if weight > 0]


def data_kind(data_cfg: Mapping) -> str:
    given = _get(data_cfg, "type", "tokenized")
    if given not in DATA_TYPES:
        raise DataError(f"data.type={given!r} is not a data format; give one of {', '.join(map(repr, DATA_TYPES))}")
    return DATA_TYPES[given]


def open_documents(kind: str, folder, what: str = "data.train_folder"):
    """(files, dataset type names) of a folder of already tokenized documents."""
    return open_megatron(folder, what) if kind == "megatron" else open_folder(folder, what)


def document_reader(kind: str, files: list, vocab_size: int | None):
    """Reads document (index in files, index in the file) of open_documents' files."""
    return MegatronReader(files, vocab_size) if kind == "megatron" else SampleReader(files, vocab_size)


def build_train_loader(
    data_cfg: Mapping,
    *,
    vocab_size: int,
    data_parallel_size: int = 1,
    data_parallel_rank: int = 0,
    seed: int = 1024,
    device_type: str = "cpu",
    num_workers: int = 0,
) -> tuple[TrainLoader, list[str]]:
    """This rank's training loader and the dataset type names (type_ids index them).

    data_cfg: InternLM's `data` section (seq_len, micro_num, micro_bsz, total_steps, train_folder,
    pack_sample_into_one, min_length, skip_batches, rampup_batch_size, cache_folder; the formats' fields).
    train_folder None: random tokens; "builtin:stdlib": the bundled byte-level corpus; else a folder in
    data.type's format. data.sources instead: named sources (named_sources).
    """
    seq_len, micro_bsz, micro_num = data_cfg["seq_len"], data_cfg["micro_bsz"], data_cfg["micro_num"]
    folder = data_cfg.get("train_folder")
    if data_cfg.get("sources") is not None:
        source, dataset_types = named_sources(data_cfg, vocab_size=vocab_size, seed=seed)
    elif folder is None:
        source = dummy_packs(micro_bsz=micro_bsz, seq_len=seq_len, vocab_size=vocab_size, seed=seed)
        dataset_types = ["dummy"]
    elif folder == BUILTIN_CORPUS:
        tokens = load_stdlib_corpus(
            _get(data_cfg, "cache_folder", "~/.cache/pytrain"), show_progress=data_parallel_rank == 0
        )
        source = window_packs(tokens, micro_bsz=micro_bsz, seq_len=seq_len, vocab_size=vocab_size, seed=seed)
        dataset_types = ["stdlib"]
    else:
        source, dataset_types = folder_source(data_cfg, folder, vocab_size=vocab_size, seed=seed)
    loader = TrainLoader(
        source,
        micro_num=micro_num,
        total_steps=data_cfg["total_steps"],
        data_parallel_size=data_parallel_size,
        data_parallel_rank=data_parallel_rank,
        seed=seed,
        rampup_batch_size=_get(data_cfg, "rampup_batch_size", ""),
        skip_batches=_get(data_cfg, "skip_batches", ""),
        num_workers=num_workers,
        pin_memory=device_type == "cuda" and torch.cuda.is_available(),
        dataset_types=dataset_types,
    )
    return loader, dataset_types


# -- validation ---------------------------------------------------------------------------------------------
class ValidLoader:
    """One validation set, padded, not packed: each sample is one row, its first seq_len tokens (labels: the
    next token, -100 past the sample's end and on padding; pad input 0). Rows in file order, unshuffled.
    Each item is one validation step of valid_micro_num micro-batches of micro_bsz rows per rank; rank r
    takes its slice of the step's global rows. The last step is completed with all-padding rows (labels
    -100) instead of dropping samples, so every rank runs the same number of micro-batches and every sample
    counts exactly once whatever the data-parallel size. Iterable any number of times, always from the start.
    """

    def __init__(
        self,
        name,
        reader,
        samples,
        *,
        seq_len,
        micro_bsz,
        valid_micro_num,
        dp,
        rank,
        num_workers,
        pin_memory,
        dataset_types,
    ):
        self.name, self.reader, self.samples = name, reader, samples  # samples: (file, line, type_id) rows
        self.seq_len, self.micro_bsz, self.valid_micro_num = seq_len, micro_bsz, valid_micro_num
        self.rows_per_rank = valid_micro_num * micro_bsz
        self.rank, self.dp = rank, dp
        self.num_workers, self.pin_memory, self.dataset_types = num_workers, pin_memory, dataset_types
        self.num_samples = len(samples)

    def __len__(self) -> int:
        global_rows = self.rows_per_rank * self.dp
        return -(-self.num_samples // global_rows)

    def __iter__(self):
        loader = DataLoader(
            _ValidBuilder(self),
            sampler=range(len(self)),
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=PREFETCH_FACTOR if self.num_workers else None,
        )
        for item in loader:
            if isinstance(item, str):
                raise DataError(item)
            yield item

    def build_step(self, step: int) -> dict:
        L, rows = self.seq_len, self.rows_per_rank
        input_ids = np.zeros((rows, L), dtype=np.int64)
        labels = np.full((rows, L), IGNORE, dtype=np.int64)
        type_ids = np.zeros((rows, L), dtype=np.int64)
        first = step * rows * self.dp + self.rank * rows
        for row, sample in enumerate(range(first, min(first + rows, self.num_samples))):
            file, line, type_id = (int(x) for x in self.samples[sample])
            raw = self.reader.read(file, line)[: L + 1]
            n = min(len(raw), L)
            input_ids[row, :n] = np.abs(raw[:n])
            following = raw[1 : L + 1]
            labels[row, : len(following)] = np.where(following < 0, IGNORE, following)
            type_ids[row, :n] = type_id
        self.reader.release_pages()
        shape = (self.valid_micro_num, self.micro_bsz, L)
        positions = np.broadcast_to(np.arange(L, dtype=np.int64), (rows, L))
        return {
            "input_ids": torch.from_numpy(input_ids).view(shape),
            "labels": torch.from_numpy(labels).view(shape),
            "positions": torch.from_numpy(np.ascontiguousarray(positions)).view(shape),
            "type_ids": torch.from_numpy(type_ids).view(shape),
        }


class _ValidBuilder(Dataset):
    def __init__(self, valid: ValidLoader):
        self.valid = valid

    def __getitem__(self, step):
        try:
            return self.valid.build_step(step)
        except DataError as error:
            return str(error)


def build_valid_loaders(
    data_cfg: Mapping,
    *,
    vocab_size: int,
    data_parallel_size: int = 1,
    data_parallel_rank: int = 0,
    device_type: str = "cpu",
    num_workers: int = 0,
) -> dict[str, ValidLoader]:
    """{set name: loader} for data.valid_folder (empty without one). As InternEvo, every folder under it
    holding .bin files is one set, named by the folder's basename; type_ids index `loader.dataset_types`
    (valid_folder's top-level subfolders, numbered as for training)."""
    folder = data_cfg.get("valid_folder")
    if folder is None:
        return {}
    kind = data_kind(data_cfg)
    if kind == "streaming":
        files, dataset_types, reader = open_text_validation(data_cfg, folder, vocab_size)
    else:
        files, dataset_types = open_documents(kind, folder, "data.valid_folder")
        reader = document_reader(kind, files, vocab_size)
    min_length = max(int(_get(data_cfg, "min_length", 0)), 1)
    by_set: dict[Path, list] = {}
    for index, f in enumerate(files):
        keep = np.nonzero(f.lengths >= min_length)[0]
        rows = np.stack([np.full(len(keep), index), keep, np.full(len(keep), f.type_id)], axis=1)
        by_set.setdefault(f.path.parent, []).append(rows)
    names: dict[str, Path] = {}
    for directory in by_set:
        name = directory.resolve().name
        if name in names:
            raise DataError(
                f"data.valid_folder={str(folder)!r}: {names[name]} and {directory} are both validation sets named "
                f"{name!r} (sets are named by their folder's basename): rename one"
            )
        names[name] = directory
    loaders = {}
    for name, directory in names.items():
        samples = np.concatenate(by_set[directory])
        if not len(samples):
            raise DataError(
                f"validation set {name!r} ({directory}) has no sample of at least {min_length} tokens (data.min_length)"
            )
        loaders[name] = ValidLoader(
            name,
            reader,
            samples,
            seq_len=data_cfg["seq_len"],
            micro_bsz=data_cfg["micro_bsz"],
            valid_micro_num=_get(data_cfg, "valid_micro_num", data_cfg["micro_num"]),
            dp=data_parallel_size,
            rank=data_parallel_rank,
            num_workers=num_workers,
            pin_memory=device_type == "cuda" and torch.cuda.is_available(),
            dataset_types=dataset_types,
        )
    return loaders
