"""The bundled default corpus: the Python standard library's own .py sources, byte-level tokenized.

Nothing is downloaded: the sources of the running interpreter are read once (files in a fixed, sorted
order; site-packages left out), joined with a 0 byte between files, and cached as a uint8 .npy file.
Token ids are byte values 0..255, so any model.vocab_size >= 256 fits.
"""

import fcntl
import hashlib
import os
import sysconfig
from pathlib import Path

import numpy as np
from tqdm import tqdm

SEPARATOR = 0  # never occurs in source text


def stdlib_sources() -> list[Path]:
    """The stdlib's .py files, sorted. The walk never enters site-packages (under the stdlib folder, and most of
    its files when torch is installed): every run lists these to fingerprint its cache."""
    files = []
    for folder, subfolders, names in os.walk(sysconfig.get_paths()["stdlib"]):
        subfolders[:] = [name for name in subfolders if name not in ("site-packages", "dist-packages")]
        files.extend(Path(folder, name) for name in names if name.endswith(".py"))
    return sorted(files)


def load_stdlib_corpus(cache_folder: str | os.PathLike, show_progress: bool = True) -> np.ndarray:
    """The corpus as a read-only uint8 array, built on the first call and memory-mapped after that."""
    files = stdlib_sources()
    if not files:
        raise RuntimeError(
            f"no .py files under {sysconfig.get_paths()['stdlib']}: this Python has no stdlib "
            f"sources; set data.train_folder=None to train on dummy data"
        )
    fingerprint = hashlib.sha1("\n".join(f"{p}:{p.stat().st_size}" for p in files).encode()).hexdigest()[:12]
    cache = Path(cache_folder).expanduser() / f"stdlib-corpus-{fingerprint}.npy"
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(cache.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # ranks on one machine: one builds, the others wait, then read it
            if not cache.exists():
                chunks = []
                for path in tqdm(files, desc="tokenizing the stdlib corpus", unit="file", disable=not show_progress):
                    chunks.append(np.frombuffer(path.read_bytes(), dtype=np.uint8))
                    chunks.append(np.array([SEPARATOR], dtype=np.uint8))
                partial = cache.with_name(f"{cache.stem}.{os.getpid()}.partial.npy")  # renamed last: never half
                np.save(partial, np.concatenate(chunks))
                os.replace(partial, cache)
    return np.load(cache, mmap_mode="r")
