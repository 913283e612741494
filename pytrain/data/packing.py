"""Pack sources: what the loader reads. A pack is one micro-batch, micro_bsz * seq_len tokens.

Every source (PackSource) numbers its packs 0..num_packs-1 and builds any list of them into numpy arrays of
shape (packs, micro_bsz * seq_len): input_ids, labels (-100 = no loss), positions, type_ids, and for rows
that hold several documents the per-pack segment boundaries (cu_seqlens).

TokenizedPacks (InternLM's tokenized folders, Megatron's indexed datasets) follows InternLM's PackedDataset:
the samples (after min_length) are shuffled once with the seed and concatenated into one token stream; pack
k is the window [kP, (k+1)P) of it (P = micro_bsz * seq_len; the tail shorter than P is dropped), so a
sample crossing a window continues in the next pack and nothing is cut away. Labels are the next token of
the same sample, -100 at every sample's end; a negative id t is the input |t| whose prediction carries no
loss (its label is -100).
- pack_sample_into_one=False: each fragment of a sample in a pack is cut into runs of at most seq_len
  tokens, each run one segment (a cu_seqlens boundary; positions restart at 0); no -100 at those cuts.
- pack_sample_into_one=True: segments are the micro_bsz rows of seq_len whatever the samples (positions
  0..seq_len-1 in each row), and, as InternLM, the pack's last label is -100 too.
Unlike InternLM, the samples of all files are shuffled into one stream (InternLM packs each file alone and
drops each file's tail), and token id 0 keeps its label (InternLM also masks labels equal to 0, which is a
real token in most vocabularies). Streamed text (streaming.py) is packed by the same assemble_pack.
"""

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from .datasets import DummyDataset, TokenWindowDataset
from .tokenized import DataError

IGNORE = -100


@runtime_checkable
class PackSource(Protocol):
    """What the training loader reads (pytrain.data.loader). TokenizedPacks and RowPacks are the built-in
    sources; a new data format is a class with these members."""

    num_packs: int  # the packs are numbered 0..num_packs-1
    pack_tokens: int  # tokens in a pack: micro_bsz * seq_len
    seq_len: int  # tokens in a row of a pack
    shuffle: bool  # the loader permutes the packs per epoch (False: in pack order)
    fingerprint: dict  # JSON values naming the stream: a saved loader position resumes only on an equal one
    description: str  # what the source holds, for error messages

    def build_packs(self, pack_ids: Sequence[int]) -> dict:
        """The packs as numpy arrays of shape (len(pack_ids), pack_tokens): input_ids, labels, positions,
        type_ids; and cu_seqlens, one array of segment boundaries per pack, when rows hold several
        documents. Runs in the loader's workers; bad data raises DataError."""
        ...


class TokenizedPacks:
    """Packs of already tokenized documents: InternLM's tokenized folders (tokenized.SampleReader) or
    Megatron's indexed datasets (megatron.MegatronReader). files: each with .lengths (tokens per document)
    and .type_id; reader.read(file, document) -> its token ids; kind names the format in the fingerprint."""

    shuffle = True

    def __init__(
        self,
        files,
        reader,
        *,
        seq_len: int,
        micro_bsz: int,
        pack_sample_into_one: bool,
        min_length: int,
        seed: int,
        kind: str = "tokenized",
    ):
        self.reader = reader
        self.seq_len, self.pack_tokens, self.into_one = seq_len, seq_len * micro_bsz, pack_sample_into_one
        keep = [np.nonzero(f.lengths >= max(min_length, 1))[0] for f in files]
        self.file_of = np.concatenate([np.full(len(k), i, dtype=np.int32) for i, k in enumerate(keep)])
        self.line_of = np.concatenate(keep).astype(np.int64)
        self.length_of = np.concatenate([f.lengths[k] for f, k in zip(files, keep)])
        self.type_of = np.array([f.type_id for f in files], dtype=np.int64)[self.file_of]
        order = np.random.default_rng(seed).permutation(len(self.line_of))
        self.file_of, self.line_of = self.file_of[order], self.line_of[order]
        self.length_of, self.type_of = self.length_of[order], self.type_of[order]
        self.ends = np.cumsum(self.length_of)  # stream position where each sample ends
        total = int(self.ends[-1]) if len(self.ends) else 0
        self.num_packs = total // self.pack_tokens
        self.fingerprint = dict(
            kind=kind,
            samples=len(self.line_of),
            tokens=total,
            pack_tokens=self.pack_tokens,
            pack_sample_into_one=pack_sample_into_one,
            seed=seed,
        )
        what = "Megatron .bin/.idx pairs" if kind == "megatron" else ".bin files"
        self.description = (
            f"{len(self.line_of)} samples of at least {max(min_length, 1)} tokens ({total} tokens) "
            f"in {len(files)} {what}"
        )

    def build_packs(self, pack_ids) -> dict:
        packs = [self.pack(int(k)) for k in pack_ids]
        self.reader.release_pages()
        return stack_packs(packs, self.into_one)

    def pack(self, k: int) -> dict:
        """Pack k as assemble_pack's arrays."""
        P = self.pack_tokens
        lo, hi = k * P, (k + 1) * P
        pieces = []
        i = int(np.searchsorted(self.ends, lo, side="right"))
        at = lo  # stream position
        while at < hi:
            length = int(self.length_of[i])
            sample_start = int(self.ends[i]) - length
            a, b = at - sample_start, min(length, hi - sample_start)  # the fragment [a, b) of the sample
            raw = self.reader.read(int(self.file_of[i]), int(self.line_of[i]))
            pieces.append((raw, a, b, int(self.type_of[i])))
            at, i = sample_start + b, i + 1
        return assemble_pack(pieces, P, self.seq_len, self.into_one)


PACK_KEYS = ("input_ids", "labels", "positions", "type_ids")


def stack_packs(packs: list[dict], into_one: bool) -> dict:
    """assemble_pack's packs as the (packs, pack_tokens) arrays of PackSource.build_packs."""
    out = {key: np.stack([p[key] for p in packs]) for key in PACK_KEYS}
    if not into_one:
        out["cu_seqlens"] = [p["cu_seqlens"] for p in packs]
    return out


def assemble_pack(pieces, pack_tokens: int, seq_len: int, into_one: bool) -> dict:
    """One pack from its pieces, in stream order: (raw token ids of a sample, a, b, type id) is the fragment
    [a, b) of that sample; the fragments' lengths sum to pack_tokens. Labels are the sample's next tokens
    (raw[b] too when the fragment stops inside the sample), -100 at its end and for negative ids."""
    P, L = pack_tokens, seq_len
    tokens = np.empty(P, dtype=np.int64)
    labels = np.empty(P, dtype=np.int64)
    type_ids = np.empty(P, dtype=np.int64)
    bounds = [0]
    out = 0
    for raw, a, b, type_id in pieces:
        n = b - a
        tokens[out : out + n] = np.abs(raw[a:b])
        following = raw[a + 1 : b + 1]
        labels[out : out + len(following)] = np.where(following < 0, IGNORE, following)
        labels[out + len(following) : out + n] = IGNORE  # the sample's end
        type_ids[out : out + n] = type_id
        if not into_one:
            bounds.extend(range(out + L, out + n, L))
            bounds.append(out + n)
        out += n
    if into_one:
        labels[-1] = IGNORE
        positions = np.tile(np.arange(L, dtype=np.int64), P // L)
        return dict(input_ids=tokens, labels=labels, positions=positions, type_ids=type_ids)
    cu = np.array(bounds, dtype=np.int64)
    positions = np.arange(P, dtype=np.int64) - np.repeat(cu[:-1], np.diff(cu))
    return dict(input_ids=tokens, labels=labels, positions=positions, type_ids=type_ids, cu_seqlens=cu)


class RowPacks:
    """Packs of micro_bsz independent rows of seq_len tokens from a row dataset (each row one sequence, so no
    cu_seqlens): pack k holds rows order[k*micro_bsz : (k+1)*micro_bsz] of a seeded row order."""

    def __init__(self, rows, *, micro_bsz: int, seq_len: int, shuffle: bool, seed: int, fingerprint: dict):
        self.rows, self.micro_bsz, self.seq_len, self.shuffle = rows, micro_bsz, seq_len, shuffle
        self.num_packs = len(rows) // micro_bsz
        self.pack_tokens = micro_bsz * seq_len
        self.row_order = np.random.default_rng(seed).permutation(len(rows)) if shuffle else None
        self.fingerprint = dict(fingerprint, rows=len(rows), pack_tokens=self.pack_tokens, seed=seed)
        self.description = f"{len(rows)} rows of {seq_len} tokens"

    def build_packs(self, pack_ids) -> dict:
        row_ids = (np.asarray(pack_ids, dtype=np.int64)[:, None] * self.micro_bsz + np.arange(self.micro_bsz)).ravel()
        if self.row_order is not None:
            row_ids = self.row_order[row_ids]
        rows = [self.rows[int(r)] for r in row_ids]
        shape = (len(pack_ids), self.pack_tokens)
        input_ids = np.stack([r["input_ids"].numpy() for r in rows]).reshape(shape)
        labels = np.stack([r["labels"].numpy() for r in rows]).reshape(shape)
        positions = np.broadcast_to(np.tile(np.arange(self.seq_len, dtype=np.int64), self.micro_bsz), shape)
        return dict(input_ids=input_ids, labels=labels, positions=positions, type_ids=np.zeros(shape, np.int64))


DUMMY_PACKS = 2**40  # endless for any run: random rows are made on demand, so no epoch ever ends


def dummy_packs(*, micro_bsz: int, seq_len: int, vocab_size: int, seed: int) -> RowPacks:
    """Random tokens (data.train_folder=None), in stream order: pack k holds DummyDataset rows
    k*micro_bsz.. (DummyDataset's row i is the same on every rank and run with the same seed)."""
    rows = DummyDataset(DUMMY_PACKS * micro_bsz, seq_len, vocab_size, seed=seed)
    return RowPacks(rows, micro_bsz=micro_bsz, seq_len=seq_len, shuffle=False, seed=seed, fingerprint={"kind": "dummy"})


def window_packs(tokens: np.ndarray, *, micro_bsz: int, seq_len: int, vocab_size: int, seed: int) -> RowPacks:
    """The bundled byte-level corpus as non-overlapping windows of seq_len (labels: the next byte)."""
    if vocab_size < 256:
        raise DataError(f"the bundled corpus is byte-level (ids 0..255): model.vocab_size={vocab_size} is below 256")
    rows = TokenWindowDataset(tokens, seq_len)
    return RowPacks(rows, micro_bsz=micro_bsz, seq_len=seq_len, shuffle=True, seed=seed, fingerprint={"kind": "stdlib"})
