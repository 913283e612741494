"""Test corpora in InternLM's tokenized format, written with InternLM's own writer logic, and a slow
reference packer that builds the same batches token by token (the oracle for pytrain.data)."""

import json
from pathlib import Path

import numpy as np

IGNORE = -100


def write_bin(path: Path, samples: list[list[int]], meta_layout: str = "int32") -> None:
    """InternLM tools/tokenizer.py: one `json.dumps({"tokens": ...}) + "\\n"` per sample, then the meta:
    (offset, length) rows as int32 saved with np.save; "int64x3": InternEvo's (offset, length, row)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta, cur = [], 0
    with open(path, "wb") as f:
        for row, tokens in enumerate(samples):
            line = str.encode(json.dumps(dict(tokens=tokens)) + "\n")
            f.write(line)
            meta.append((cur, len(tokens)) if meta_layout == "int32" else (cur, len(tokens), row))
            cur += len(line)
    with open(str(path) + ".meta", "wb") as f:
        np.save(f, np.array(meta, dtype=np.int32 if meta_layout == "int32" else np.int64))


def random_samples(rng, count: int, max_len: int, vocab: int, negative_fraction: float = 0.1) -> list[list[int]]:
    samples = []
    for _ in range(count):
        tokens = rng.integers(0, vocab, int(rng.integers(1, max_len + 1))).tolist()
        samples.append([-t if t and rng.random() < negative_fraction else t for t in tokens])
    return samples


def write_corpus(root: Path, rng, *, seq_len: int, vocab: int = 500) -> dict[str, list[list[int]]]:
    """Two dataset types (code/, en/ with a nested folder), both meta layouts, samples from 1 token to
    3 x seq_len (longer than a row), some negative ids. Returns {relative path: samples}."""
    files = {
        "code/a.bin": random_samples(rng, 23, 3 * seq_len, vocab),
        "en/b.bin": random_samples(rng, 17, seq_len // 2, vocab),
        "en/deep/c.bin": random_samples(rng, 11, 2 * seq_len, vocab),
    }
    for i, (name, samples) in enumerate(files.items()):
        write_bin(root / name, samples, "int32" if i % 2 == 0 else "int64x3")
    return files


def stream_of(files: dict[str, list[list[int]]], min_length: int, seed: int) -> list[tuple[list[int], int]]:
    """The sample stream the loader packs: files in sorted walk order, samples of >= max(min_length, 1)
    tokens, permuted by numpy's default_rng(seed); each with its type id (sorted top-level folders)."""
    types = sorted({name.split("/")[0] for name in files})
    kept = [
        (s, types.index(name.split("/")[0]))
        for name in sorted(files, key=lambda n: Path(n).parent.parts + ("",) + (Path(n).name,))
        for s in files[name]
        if len(s) >= max(min_length, 1)
    ]
    order = np.random.default_rng(seed).permutation(len(kept))
    return [kept[i] for i in order]


def reference_packs(stream, seq_len: int, micro_bsz: int, into_one: bool) -> list[dict]:
    """Every pack of the stream, built one token at a time."""
    P = seq_len * micro_bsz
    flat = []  # (token, label, type, sample number)
    for number, (sample, type_id) in enumerate(stream):
        for j, t in enumerate(sample):
            label = sample[j + 1] if j + 1 < len(sample) else IGNORE
            flat.append((abs(t), label if label >= 0 else IGNORE, type_id, number))
    packs = []
    for k in range(len(flat) // P):
        window = flat[k * P : (k + 1) * P]
        tokens = [w[0] for w in window]
        labels = [w[1] for w in window]
        types = [w[2] for w in window]
        if into_one:
            labels[-1] = IGNORE
            positions = [q % seq_len for q in range(P)]
            packs.append(dict(input_ids=tokens, labels=labels, positions=positions, type_ids=types))
            continue
        positions, cu = [], []
        for q in range(P):
            new = q == 0 or window[q][3] != window[q - 1][3] or positions[-1] + 1 == seq_len
            if new:
                cu.append(q)
            positions.append(0 if new else positions[-1] + 1)
        packs.append(dict(input_ids=tokens, labels=labels, positions=positions, type_ids=types, cu_seqlens=cu + [P]))
    return packs


def reference_batches(packs, *, micro_num, dp, rank, total_steps, seed, micro_num_at=None, skip=()):
    """[(batch index, [packs of this rank])] as the loader's contract says: epoch e's pack order is
    default_rng((seed, e)).permutation(N); batch b reads the next micro_num_b * dp packs (a new epoch when
    fewer are left); rank r takes its contiguous slice; skipped batches are read and not returned."""
    epoch, offset, out = 0, 0, []
    order = np.random.default_rng((seed, 0)).permutation(len(packs))
    for b in range(total_steps):
        m = micro_num_at(b) if micro_num_at else micro_num
        if offset + m * dp > len(packs):
            epoch, offset = epoch + 1, 0
            order = np.random.default_rng((seed, epoch)).permutation(len(packs))
        ids = order[offset + rank * m : offset + (rank + 1) * m]
        offset += m * dp
        if b not in skip:
            out.append((b, [packs[i] for i in ids]))
    return out


def assert_batch_equals(batch, packs, seq_len):
    """A loader batch (tensors) against reference packs (lists), element for element."""
    n = len(packs)
    for key in ("input_ids", "labels", "positions", "type_ids"):
        got = batch[key]
        assert got.dtype.is_floating_point is False and got.shape == (n, len(packs[0][key]) // seq_len, seq_len), key
        assert got.reshape(n, -1).tolist() == [p[key] for p in packs], key
    if "cu_seqlens" in packs[0]:
        width = max(len(p["cu_seqlens"]) for p in packs)
        padded = [p["cu_seqlens"] + [p["cu_seqlens"][-1]] * (width - len(p["cu_seqlens"])) for p in packs]
        assert str(batch["cu_seqlens"].dtype) == "torch.int32" and batch["cu_seqlens"].tolist() == padded
        longest = [max(b - a for a, b in zip(p["cu_seqlens"], p["cu_seqlens"][1:])) for p in packs]
        assert batch["max_seqlen"].tolist() == longest
    else:
        assert "cu_seqlens" not in batch and "max_seqlen" not in batch
