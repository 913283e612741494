"""Where a rank's piece of a parameter sits in the whole parameter.

A tensor-parallel weight is split along one dim; a fused weight made of parts (Wqkv: q, k and v heads)
splits each part evenly, so a rank's shard is the concatenation along that dim of one slice per part.
`ShardSpec` records exactly that, with the full shape, which is all that is needed to cut a shard out of
a full tensor (initialisation, loading a checkpoint of another layout, Hugging Face import) or to place it
back (saving, export).
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShardSpec:
    """The local tensor is, along `dim`, the concatenation of full[start:start + length] for each
    (start, length) in `pieces` (other dims whole); dim None: the local tensor is the whole tensor."""

    full_shape: tuple[int, ...]
    dim: int | None = None
    pieces: tuple[tuple[int, int], ...] = ()

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

    @property
    def is_whole(self) -> bool:
        return self.dim is None

    @property
    def local_shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.full_shape
        shape = list(self.full_shape)
        shape[self.dim] = sum(length for _, length in self.pieces)
        return tuple(shape)

    def cut(self, full: torch.Tensor) -> torch.Tensor:
        """This shard of the full tensor."""
        if tuple(full.shape) != self.full_shape:
            raise ValueError(f"expected a tensor of shape {self.full_shape}, got {tuple(full.shape)}")
        if self.dim is None:
            return full
        return torch.cat([full.narrow(self.dim, start, length) for start, length in self.pieces], dim=self.dim)

    def place(self, local: torch.Tensor, full: torch.Tensor) -> None:
        """Writes this shard into its place in `full` (the inverse of cut)."""
        if self.dim is None:
            full.copy_(local)
            return
        offset = 0
        for start, length in self.pieces:
            full.narrow(self.dim, start, length).copy_(local.narrow(self.dim, offset, length))
            offset += length
