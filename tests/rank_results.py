"""What spawned ranks hand back to the test that spawned them: torch.save files in a temporary folder, per entry
its value and its key.

Not a multiprocessing Manager's dict: its server process is forked from the test process (torch's thread pools
already started) and receives tensors as shared-memory handles passed between processes; in CI it crashed now and
then (a segfault in the server, an EOFError in the rank storing its result). Files have no server to lose.

    with RankResults() as results:
        mp.spawn(worker, args=(..., results), nprocs=world, join=True)
        results = dict(results)  # {key: value} as the ranks stored them
"""

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch


class RankResults(Mapping):
    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="pytrain-rank-results-"))

    def __enter__(self) -> "RankResults":
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _stem(self, key) -> Path:
        return self.folder / hashlib.sha1(repr(key).encode()).hexdigest()

    def __setitem__(self, key, value) -> None:
        # the value, then the key beside it: a key file marks a whole entry, and iterating reads keys alone;
        # clone() keeps a view from saving the whole storage it is cut from
        value = torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), value)
        stem = self._stem(key)
        for suffix, content in ((".pt", value), (".key", key)):
            partial = stem.with_suffix(f".{os.getpid()}.partial")
            torch.save(content, partial)
            os.replace(partial, stem.with_suffix(suffix))

    @staticmethod
    def _load(path: Path):
        # written by this test's own ranks, and results hold pytrain's own types (ShardSpec, ...)
        return torch.load(path, weights_only=False)

    def __getitem__(self, key):
        stem = self._stem(key)
        if not stem.with_suffix(".key").exists():
            raise KeyError(key)
        return self._load(stem.with_suffix(".pt"))

    def __iter__(self) -> Iterator:
        return (self._load(path) for path in sorted(self.folder.glob("*.key")))

    def __len__(self) -> int:
        return len(list(self.folder.glob("*.key")))
