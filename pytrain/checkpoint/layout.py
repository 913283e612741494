"""Shards as boxes of the full tensor: who writes which entry once, and how another cut is read back.

A ShardSpec's pieces are boxes of the full tensor (whole on every dim but `dim`, and dim 0 when it has
`rows`). Saving gathers every rank's (key, spec) and keeps one writer per distinct spec (the lowest rank
holding it: replicas over data or tensor ranks are written once); the distinct specs of a key must tile the
full tensor exactly. Loading intersects each wanted piece with each saved piece and copies the overlaps, so
any layout reads any other.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise

from pytrain.parallel.shard_spec import ShardSpec

from .storage import CheckpointError

Box = tuple[tuple[int, int], ...]  # (start, stop) per dim, in full-tensor coordinates


@dataclass(frozen=True)
class Entry:
    """One rank's piece of one key, as gathered from every rank before a save."""

    key: str
    dtype: str
    spec: ShardSpec


def spec_to_json(spec: ShardSpec) -> dict:
    value = {"dim": spec.dim, "pieces": [list(piece) for piece in spec.pieces]}
    if spec.rows is not None:
        value["rows"] = list(spec.rows)
    return value


def spec_from_json(full_shape, value: dict) -> ShardSpec:
    rows = tuple(value["rows"]) if "rows" in value else None
    return ShardSpec(tuple(full_shape), value["dim"], tuple(tuple(piece) for piece in value["pieces"]), rows)


def check_spec(key: str, spec: ShardSpec) -> None:
    """A spec whose pieces lie inside the full tensor and do not overlap each other."""
    if spec.dim is None:
        return
    if not 0 <= spec.dim < len(spec.full_shape):
        raise CheckpointError(f"{key}: shard dim {spec.dim} is outside a tensor of shape {spec.full_shape}")
    size, covered = spec.full_shape[spec.dim], []
    for start, length in spec.pieces:
        if start < 0 or length < 0 or start + length > size:
            raise CheckpointError(f"{key}: piece ({start}, {length}) lies outside dim {spec.dim} of {spec.full_shape}")
        covered.append((start, start + length))
    covered.sort()
    if any(prev[1] > nxt[0] for prev, nxt in pairwise(covered)):
        raise CheckpointError(f"{key}: the pieces {spec.pieces} of one shard overlap")
    if spec.rows is not None:
        start, length = spec.rows
        if spec.dim == 0 or start < 0 or length < 0 or start + length > spec.full_shape[0]:
            raise CheckpointError(
                f"{key}: rows {spec.rows} do not fit dim 0 of {spec.full_shape} (shard dim {spec.dim})"
            )


def piece_boxes(spec: ShardSpec) -> list[tuple[Box, int]]:
    """Each piece's box and where it starts along `dim` in the local tensor."""
    whole = tuple((0, n) for n in spec.full_shape)
    if spec.dim is None:
        return [(whole, 0)]
    if spec.rows is not None:
        whole = ((spec.rows[0], spec.rows[0] + spec.rows[1]), *whole[1:])
    out, offset = [], 0
    for start, length in spec.pieces:
        box = tuple((start, start + length) if d == spec.dim else extent for d, extent in enumerate(whole))
        out.append((box, offset))
        offset += length
    return out


def volume(box: Box) -> int:
    total = 1
    for start, stop in box:
        total *= max(0, stop - start)
    return total


def intersect(a: Box, b: Box) -> Box | None:
    box = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return box if all(start < stop for start, stop in box) else None


def local_slices(spec: ShardSpec, piece: Box, offset: int, region: Box) -> tuple[slice, ...]:
    """The slices of the local tensor of `spec` that hold `region` (a part of one of its pieces): along `dim`
    from the piece's place in the local tensor, along the other dims from the box's start (0 where whole)."""
    return tuple(
        slice(
            start - piece[d][0] + (offset if d == spec.dim else 0),
            stop - piece[d][0] + (offset if d == spec.dim else 0),
        )
        for d, (start, stop) in enumerate(region)
    )


def overlaps(saved: ShardSpec, wanted: ShardSpec) -> Iterator[tuple[tuple[slice, ...], tuple[slice, ...], int]]:
    """(slices of the saved local tensor, slices of the wanted local tensor, elements) for each overlap."""
    for saved_box, saved_offset in piece_boxes(saved):
        for wanted_box, wanted_offset in piece_boxes(wanted):
            region = intersect(saved_box, wanted_box)
            if region is not None:
                yield (
                    local_slices(saved, saved_box, saved_offset, region),
                    local_slices(wanted, wanted_box, wanted_offset, region),
                    volume(region),
                )


def plan_writes(per_rank: list[list[Entry]]) -> dict[str, list[tuple[int, Entry]]]:
    """For each key, its distinct shards and the rank writing each (the lowest holding it).

    Every rank computes the same plan from the same gathered entries, so an error is raised on all ranks."""
    holders: dict[str, dict[ShardSpec, tuple[int, Entry]]] = {}
    problems = []
    for rank, entries in enumerate(per_rank):
        for entry in entries:
            shards = holders.setdefault(entry.key, {})
            first = next(iter(shards.values()), None)
            if first is not None and (first[1].spec.full_shape, first[1].dtype) != (entry.spec.full_shape, entry.dtype):
                problems.append(
                    f"{entry.key}: rank {first[0]} has {first[1].dtype}{list(first[1].spec.full_shape)}, "
                    f"rank {rank} has {entry.dtype}{list(entry.spec.full_shape)}"
                )
                continue
            shards.setdefault(entry.spec, (rank, entry))
    plan = {}
    for key, shards in holders.items():
        boxes = [box for spec in shards for box, _ in piece_boxes(spec)]
        full_shape = next(iter(shards)).full_shape
        numel = volume(tuple((0, n) for n in full_shape))
        if any(intersect(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :]):
            layouts = "; ".join(f"rank {rank}: {spec_to_json(spec)}" for spec, (rank, _) in shards.items())
            problems.append(f"{key}: shards of different layouts overlap ({layouts})")
        elif sum(volume(box) for box in boxes) != numel:
            covered = sum(volume(box) for box in boxes)
            problems.append(f"{key}: the ranks' shards cover {covered} of its {numel} elements {list(full_shape)}")
        plan[key] = sorted(shards.values(), key=lambda item: item[0])
    if problems:
        raise CheckpointError("cannot save: the ranks' shards do not form whole tensors:\n  " + "\n  ".join(problems))
    return plan
