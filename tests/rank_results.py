"""What spawned ranks hand back to the test that spawned them: one torch.save file per entry in a temporary folder.

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

    def _file(self, key) -> Path:
        return self.folder / f"{hashlib.sha1(repr(key).encode()).hexdigest()}.pt"

    def __setitem__(self, key, value) -> None:
        # written whole, then renamed: the reader never sees half a file; clone() keeps a view from saving the
        # whole storage it is cut from
        value = torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), value)
        path = self._file(key)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        torch.save((key, value), partial)
        os.replace(partial, path)

    def _load(self, path: Path):
        # written by this test's own ranks, and results hold pytrain's own types (ShardSpec, ...)
        return torch.load(path, weights_only=False)

    def __getitem__(self, key):
        path = self._file(key)
        if not path.exists():
            raise KeyError(key)
        return self._load(path)[1]

    def __iter__(self) -> Iterator:
        return (self._load(path)[0] for path in sorted(self.folder.glob("*.pt")))

    def __len__(self) -> int:
        return len(list(self.folder.glob("*.pt")))
