"""Where a rank's piece of a parameter sits in the whole parameter.

A tensor-parallel weight is split along one dim; a fused weight made of parts (Wqkv: q, k and v heads)
splits each part evenly, so a rank's shard is the concatenation along that dim of one slice per part.
`ShardSpec` records exactly that, with the full shape, which is all that is needed to cut a shard out of
a full tensor (initialisation, loading a checkpoint of another layout, Hugging Face import) or to place it
back (saving, export).

FSDP cuts a further block of rows out of a rank's tensor (torch.chunk along dim 0 over its sharding group). Along
the same dim that only narrows the pieces; across another (a row-parallel weight, split along dim 1) the shard
is a block: `rows` along dim 0 of the pieces along `dim`.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShardSpec:
    """The local tensor is, along `dim`, the concatenation of full[start:start + length] for each
    (start, length) in `pieces` (other dims whole); dim None: the local tensor is the whole tensor.
    rows (start, length): only those rows along dim 0 (with a `dim` other than 0; FSDP's cut)."""

    full_shape: tuple[int, ...]
    dim: int | None = None
    pieces: tuple[tuple[int, int], ...] = ()
    rows: tuple[int, int] | None = None

    @staticmethod
    def whole(shape) -> "ShardSpec":
        return ShardSpec(tuple(shape))

    @staticmethod
    def split(full_shape, dim: int, rank: int, world: int, segments=None) -> "ShardSpec":
        """Rank `rank` of `world`'s shard along `dim`: each segment (sizes along dim, default one whole
        segment) cut into `world` equal slices, this rank's slice of each."""
        segments = list(segments or [full_shape[dim]])
        pieces, offset = [], 0
        for size in segments:
            if size % world:
                raise ValueError(f"a segment of {size} along dim {dim} cannot be split over {world} ranks")
            local = size // world
            pieces.append((offset + rank * local, local))
            offset += size
        if offset != full_shape[dim]:
            raise ValueError(f"segments {segments} do not add up to {full_shape[dim]} (dim {dim} of {full_shape})")
        return ShardSpec(tuple(full_shape), dim, tuple(pieces))

    def chunk_rows(self, rank: int, world: int) -> "ShardSpec":
        """The spec of torch.chunk(local, world, dim=0)[rank] of this shard's local tensor (FSDP's cut: chunks
        of ceil(rows / world) rows, the last ones shorter or empty)."""
        if self.rows is not None:
            raise ValueError(f"{self} is already cut into rows")
        rows = self.local_shape[0]
        size = -(-rows // world)
        first = min(rank * size, rows)
        last = min(first + size, rows)
        if self.dim is None:
            return ShardSpec(self.full_shape, 0, ((first, last - first),))
        if self.dim != 0:
            return ShardSpec(self.full_shape, self.dim, self.pieces, (first, last - first))
        pieces, offset = [], 0
        for start, length in self.pieces:  # the local rows [first, last) mapped through the pieces
            lo, hi = max(first, offset), min(last, offset + length)
            if lo < hi:
                pieces.append((start + lo - offset, hi - lo))
            offset += length
        return ShardSpec(self.full_shape, 0, tuple(pieces) or ((0, 0),))

    @property
    def is_whole(self) -> bool:
        return self.dim is None

    @property
    def local_shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.full_shape
        shape = list(self.full_shape)
        shape[self.dim] = sum(length for _, length in self.pieces)
        if self.rows is not None:
            shape[0] = self.rows[1]
        return tuple(shape)

    def cut(self, full: torch.Tensor) -> torch.Tensor:
        """This shard of the full tensor."""
        if tuple(full.shape) != self.full_shape:
            raise ValueError(f"expected a tensor of shape {self.full_shape}, got {tuple(full.shape)}")
        if self.dim is None:
            return full
        if self.rows is not None:
            full = full.narrow(0, *self.rows)
        return torch.cat([full.narrow(self.dim, start, length) for start, length in self.pieces], dim=self.dim)

    def place(self, local: torch.Tensor, full: torch.Tensor) -> None:
        """Writes this shard into its place in `full` (the inverse of cut)."""
        if self.dim is None:
            full.copy_(local)
            return
        if self.rows is not None:
            full = full.narrow(0, *self.rows)
        offset = 0
        for start, length in self.pieces:
            full.narrow(self.dim, start, length).copy_(local.narrow(self.dim, offset, length))
            offset += length
