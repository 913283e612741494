"""Text -> InternLM's tokenized format (`.bin` of `{"tokens": [...]}` lines + `.bin.meta`).

    python -m pytrain.data.tokenize --text_input_path IN --bin_output_path OUT.bin --tokenizer T

IN is a .txt (each non-empty line, stripped, is one sample, as InternLM's tools/tokenizer.py), a .json (a
list of records) or a .jsonl (one record per line); a record is a string or an object whose --text_key
field (default "text") is the sample. A folder IN is mirrored: every .txt/.json/.jsonl under it becomes
OUT/<same relative path>.bin, tokenized in parallel processes (--workers) with a progress bar.

--tokenizer: `byte` (UTF-8 bytes, ids 0..255, no dependency), a Hugging Face `tokenizers` JSON file, a
local transformers tokenizer folder (its tokenizer.json), or a sentencepiece `.model` file (the last
three need `pip install 'pytrain[data]'`). --add_bos_eos: what goes around each sample's ids; by default
nothing. `both` writes the tokenizer's BOS and EOS around every sample, as InternLM's tools/tokenizer.py
does with its sentencepiece model (pytrain.data.text_tokenizer has the other choices).

Each output is written to a temporary name and renamed, the .meta after the .bin, so an interrupted run
never leaves a .bin/.meta pair that looks complete. The meta is InternLM's: int32 (byte_offset, num_tokens).
"""

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .text_tokenizer import ADD_BOS_EOS, SampleEncoder, TokenizerError, load_tokenizer

try:
    from pytrain import _C
except ImportError:  # not built: json_lines formats in Python, slower (bench/test_data_bench.py)
    _C = None

INPUT_SUFFIXES = (".txt", ".json", ".jsonl")
ENCODE_CHUNK = 4096  # texts per encode_batch call


class TokenizeError(ValueError):
    """Bad tokenize input; the message names the file (and line) and the fix."""


# -- the InternLM line ----------------------------------------------------------------------------------------
def json_line(ids) -> bytes:
    """Exactly `(json.dumps({"tokens": ids}) + "\\n").encode()`."""
    text, _ = json_lines([ids])
    return bytes(text)


def json_lines(samples: list) -> tuple[memoryview, np.ndarray]:
    """InternLM's lines for samples (id arrays, or bytes: the byte tokenizer's ids), concatenated, and each
    line's byte length: `json.dumps({"tokens": ids}) + "\\n"` byte for byte. The numbers are formatted by
    pytrain._C (csrc/cpu/token_lines.cpp): str(int) per token in Python would bound the command's speed."""
    counts = np.fromiter(map(len, samples), dtype=np.int64, count=len(samples))
    if all(isinstance(s, bytes) for s in samples):
        ids = np.frombuffer(b"".join(samples), dtype=np.uint8)
    else:
        ids = np.concatenate([np.asarray(s, dtype=np.int64).ravel() for s in samples] + [np.zeros(0, np.int64)])
    if _C is None:  # not built: the slow, obviously right formatter
        ends = np.cumsum(counts)
        lines = [(json.dumps({"tokens": ids[e - n : e].tolist()}) + "\n").encode() for n, e in zip(counts, ends)]
        return memoryview(b"".join(lines)), np.array([len(line) for line in lines], dtype=np.int64)
    line_overhead, max_id_bytes = _C.token_line_bytes
    out = np.empty(len(samples) * line_overhead + len(ids) * (max_id_bytes if ids.itemsize == 8 else 5), np.uint8)
    line_bytes = np.empty(len(samples), dtype=np.int64)
    total = _C.format_token_lines(
        ids.ctypes.data, ids.itemsize, counts.ctypes.data, len(samples), out.ctypes.data, line_bytes.ctypes.data
    )
    return memoryview(out)[:total], line_bytes


# -- reading input ------------------------------------------------------------------------------------------
def read_texts(path: Path, text_key: str):
    """The samples of one input file, in order."""
    try:
        with open(path, encoding="utf-8") as handle:
            if path.suffix == ".txt":
                for line in handle:
                    stripped = line.strip()
                    if stripped:
                        yield stripped
            elif path.suffix == ".jsonl":
                for number, line in enumerate(handle, start=1):
                    if line.strip():
                        yield record_text(_json(line, path, number), text_key, path, number)
            else:
                records = _json(handle.read(), path, None)
                if not isinstance(records, list):
                    raise TokenizeError(
                        f"{path}: a .json input must hold a list of records, not {type(records).__name__}"
                    )
                for number, record in enumerate(records, start=1):
                    yield record_text(record, text_key, path, number, "record")
    except UnicodeDecodeError as error:
        raise TokenizeError(f"{path} is not UTF-8 text ({error}): convert it first (e.g. iconv -t UTF-8)") from None


def _json(text: str, path: Path, line: int | None):
    try:
        return json.loads(text)
    except ValueError as error:
        where = f"{path} line {line}" if line else str(path)
        raise TokenizeError(f"{where} is not JSON ({error})") from None


def record_text(record, text_key: str, path: Path, number: int, what: str = "line") -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict) and isinstance(record.get(text_key), str):
        return record[text_key]
    keys = ", ".join(map(repr, record)) if isinstance(record, dict) else type(record).__name__
    raise TokenizeError(
        f"{path} {what} {number} has no string field {text_key!r} (it has: {keys}): pass --text_key NAME"
    )


# -- one file -----------------------------------------------------------------------------------------------
_ENCODER = None


def _init_worker(encoder: SampleEncoder) -> None:
    global _ENCODER
    _ENCODER = encoder


def tokenize_file(source: Path, target: Path, text_key: str, tokenizer=None) -> tuple[int, int, int]:
    """Writes target (.bin) and target.meta atomically; returns (samples, tokens, input bytes). tokenizer:
    a SampleEncoder, or a bare tokenizer (nothing added)."""
    tokenizer = tokenizer or _ENCODER
    target.parent.mkdir(parents=True, exist_ok=True)
    meta_target = target.with_name(target.name + ".meta")
    temp_bin = target.with_name(f".{target.name}.{os.getpid()}.partial")
    temp_meta = meta_target.with_name(f".{meta_target.name}.{os.getpid()}.partial")
    offsets, lengths, offset = [], [], 0
    try:
        with open(temp_bin, "wb") as out:
            texts = read_texts(source, text_key)
            while chunk := [t for _, t in zip(range(ENCODE_CHUNK), texts)]:
                encoded = tokenizer.encode_batch(chunk)
                text, line_bytes = json_lines(encoded)
                out.write(text)
                offsets.append(offset + np.cumsum(line_bytes) - line_bytes)
                lengths.append(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))
                offset += len(text)
        offsets = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)
        lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        if len(offsets) and offsets[-1] > np.iinfo(np.int32).max:
            raise TokenizeError(
                f"{source} makes a {offset}-byte .bin, too large for InternLM's int32 .meta offsets: split the input"
            )
        with open(temp_meta, "wb") as out:
            np.save(out, np.stack([offsets, lengths], axis=1).astype(np.int32).reshape(-1, 2))
        os.replace(temp_bin, target)  # the bin first: a meta never describes a bin that is not there
        os.replace(temp_meta, meta_target)
    finally:
        for temp in (temp_bin, temp_meta):
            temp.unlink(missing_ok=True)
    return len(lengths), int(lengths.sum()), source.stat().st_size


def _tokenize_job(job) -> tuple[int, int, int]:
    return tokenize_file(*job)


# -- the command ---------------------------------------------------------------------------------------------
def plan_jobs(source: Path, target: Path) -> list[tuple[Path, Path]]:
    if not source.exists():
        raise TokenizeError(f"--text_input_path {source} does not exist")
    if source.is_file():
        if source.suffix not in INPUT_SUFFIXES:
            raise TokenizeError(f"{source}: the input must be .txt, .json or .jsonl")
        if target.suffix != ".bin":
            raise TokenizeError(f"--bin_output_path {target} must end in .bin for a file input")
        return [(source, target)]
    inputs = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix in INPUT_SUFFIXES)
    if not inputs:
        raise TokenizeError(f"--text_input_path {source} has no .txt, .json or .jsonl files")
    if target.suffix == ".bin":
        raise TokenizeError(f"--bin_output_path {target}: a folder input needs an output folder, not a .bin file")
    return [(p, target / p.relative_to(source).with_suffix(".bin")) for p in inputs]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pytrain.data.tokenize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--text_input_path", required=True, help=".txt/.json/.jsonl file, or a folder of them")
    parser.add_argument("--bin_output_path", required=True, help="OUT.bin for a file, an output folder for a folder")
    parser.add_argument("--tokenizer", default="byte", help="byte | tokenizers .json | transformers folder | .model")
    parser.add_argument("--text_key", default="text", help="the text field of .json/.jsonl records")
    parser.add_argument(
        "--add_bos_eos",
        choices=ADD_BOS_EOS,
        default="none",
        help="ids around each sample (default none: the text's ids only); both: the tokenizer's BOS and EOS around "
        "every sample, as InternLM's tools/tokenizer.py; bos / eos: one of them; tokenizer: what the tokenizer's "
        "own settings add (a tokenizers JSON's post-processor)",
    )
    parser.add_argument("--bos_id", type=int, default=None, help="the BOS id (default: the tokenizer's)")
    parser.add_argument("--eos_id", type=int, default=None, help="the EOS id (default: the tokenizer's)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (folder input)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        tokenizer = SampleEncoder(load_tokenizer(args.tokenizer), args.add_bos_eos, args.bos_id, args.eos_id)
        jobs = plan_jobs(Path(args.text_input_path).expanduser(), Path(args.bin_output_path).expanduser())
        jobs = [(src, dst, args.text_key) for src, dst in jobs]
        total_bytes = sum(src.stat().st_size for src, _, _ in jobs)
        workers = max(1, min(args.workers, len(jobs)))
        start = time.perf_counter()
        samples = tokens = 0
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr) as bar:
            if workers == 1:
                results = (tokenize_file(*job, tokenizer=tokenizer) for job in jobs)
                pool = None
            else:
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # parallel over files instead
                pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(tokenizer,))
                results = pool.map(_tokenize_job, jobs)
            try:
                for n_samples, n_tokens, n_bytes in results:
                    samples, tokens = samples + n_samples, tokens + n_tokens
                    bar.update(n_bytes)
            finally:
                if pool is not None:
                    pool.shutdown(cancel_futures=True)
        seconds = time.perf_counter() - start
    except (TokenizeError, TokenizerError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"{len(jobs)} file(s), {samples} samples, {tokens} tokens (vocabulary {tokenizer.vocab_size}) -> "
        f"{args.bin_output_path} in {seconds:.1f} s ({total_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
