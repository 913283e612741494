"""Sources built pack by pack along a fixed plan: streamed text, and weighted mixtures of dataset types or of
named sources (data.sources: each source one component, in its own format).

Positions. The loader numbers the run's packs g = 0, 1, 2, ... (batch b takes the next micro_num_b x dp);
for these sources rank r takes the batch's positions g = r (mod dp) (strided; the indexed sources give each
rank a contiguous slice), so rank r's q-th pack is position q * dp + r, whatever the batch sizes.

Plan. Positions go in blocks of B (B = data.stream_shards when a component is streamed, else 1), each
block whole to one component: the one furthest behind its weight, argmax_t (w_t (k + 1) - n_t(k)), where
n_t(k) counts the blocks component t had before block k (ties: the first). Position g = k B + i is then
pack j = n_t(k) B + i of component t. Every pack holds pack_tokens tokens, so a component's share of the
tokens of any window of packs is its weight within 2 B packs (tests/test_data_mixture.py checks this over
random weights), and the plan does not depend on the data-parallel size.

Components. An indexed one (InternLM or Megatron packs of one type) is endless: pack j is pack
perm_e[j mod N] of its pass e = j // N, with perm_e seeded by (seed, index, e), so a type that runs out
starts its next pass, reshuffled, while the others go on. A streamed one (streaming.StreamedText): pack j is
pack j // S of its shard j mod S, its shuffles seeded by (seed, stream_id, ...). The index / stream_id is a
type's id, or a named source's number from its name (loader.source_seed), so that such a source's packs are
the same alone as in any mixture. With B = S and S a multiple of dp, that shard is i = g mod S = r (mod dp):
each rank reads its own shards only, and a rank's loader worker w (of W dividing S / dp) its own among them.
A shard's state is held by one rank, saved with the checkpoint, and after a change of dp (to another divisor
of S) handed to its new rank: the batches continue exactly as the uninterrupted run's.

State: the block the position is in and every component's block count there, and every shard's state.
"""

import numpy as np

from .packing import TokenizedPacks
from .tokenized import DataError

ENDLESS = 2**62  # the packs of a planned source: its components start new passes by themselves


class IndexedComponent:
    """One dataset type's packs of already tokenized documents, endlessly, reshuffled each pass."""

    stateful = False

    def __init__(self, packs: TokenizedPacks, index: int, seed: int, name: str):
        if packs.num_packs == 0:
            raise DataError(
                f"dataset type {name!r} ({packs.description}) holds less than one pack of {packs.pack_tokens} tokens: "
                f"use more data for it, give it weight 0, or lower data.seq_len / micro_bsz"
            )
        self.packs, self.index, self.seed = packs, index, seed
        self.fingerprint, self.description = packs.fingerprint, packs.description
        self.pack_tokens, self.seq_len, self.into_one = packs.pack_tokens, packs.seq_len, packs.into_one
        self._order: tuple[int, np.ndarray] | None = None

    def build(self, j: int) -> dict:
        n = self.packs.num_packs
        epoch = j // n
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng((self.seed, self.index, epoch)).permutation(n))
        pack = self.packs.pack(int(self._order[1][j % n]))
        self.packs.reader.release_pages()
        return pack


class PlannedPacks:
    """A PackSource built pack by pack along the plan (module doc): the loader asks it for lanes, not pack ids."""

    shuffle = False
    planned = True
    num_packs = ENDLESS

    def __init__(self, components: list, weights: list[float], names: list[str]):
        self.components, self.names = components, names
        total = float(sum(weights))
        self.weights = np.array([w / total for w in weights], dtype=np.float64)
        streamed = [c for c in components if c.stateful]
        self.block = streamed[0].num_shards if streamed else 1
        first = components[0]
        self.pack_tokens, self.seq_len, self.into_one = first.pack_tokens, first.seq_len, first.into_one
        self.fingerprint = dict(
            kind="planned",
            weights=dict(zip(names, self.weights.tolist())),
            block=self.block,
            components=[c.fingerprint for c in components],
        )
        parts = ", ".join(f"{n} ({w:.3f}): {c.description}" for n, w, c in zip(names, self.weights, components))
        self.description = parts if len(components) > 1 else components[0].description

    def check_layout(self, data_parallel_size: int) -> None:
        if any(c.stateful for c in self.components) and self.block % data_parallel_size:
            raise DataError(
                f"data.stream_shards={self.block} is not a multiple of the data-parallel size {data_parallel_size}: "
                f"set it to a multiple of every data-parallel size this run will use (e.g. {data_parallel_size * 8})"
            )

    def start(self) -> tuple[int, list[int]]:
        """The plan's anchor at position 0: (block, every component's block count before it)."""
        return 0, [0] * len(self.components)

    def _blocks(self, anchor):
        """(block k, its component, that component's block count before k) from the anchor on."""
        k, counts = anchor[0], np.array(anchor[1], dtype=np.int64)
        while True:
            t = int(np.argmax(self.weights * (k + 1) - counts))
            yield k, t, int(counts[t])
            counts[t] += 1
            k += 1

    def anchor_at(self, position: int, anchor) -> tuple[int, list[int]]:
        """The anchor of the block holding `position` (>= the given anchor's block)."""
        counts = list(anchor[1])
        for block, t, _ in self._blocks(anchor):
            if block == position // self.block:
                return block, counts
            counts[t] += 1
        raise AssertionError("unreachable: _blocks is endless")

    def lanes(self, positions, anchor):
        """(component, its pack index) of each position (increasing, from the anchor's block on)."""
        blocks = self._blocks(anchor)
        k, t, before = next(blocks)
        for g in positions:
            while k < g // self.block:
                k, t, before = next(blocks)
            yield t, before * self.block + g % self.block

    def builder(self, shard_states: dict):
        return PackBuilder(self, shard_states)


class PackBuilder:
    """Builds packs of a PlannedPacks in one process, holding the streamed shards it has opened."""

    def __init__(self, source: PlannedPacks, shard_states: dict):
        self.source, self.states, self.streams = source, shard_states, {}

    def build(self, component: int, j: int) -> tuple[dict, tuple | None]:
        """The pack, and (shard key, its state after it) for a streamed component."""
        part = self.source.components[component]
        if not part.stateful:
            return part.build(j), None
        shard, index = j % part.num_shards, j // part.num_shards
        key = f"{component}/{shard}"
        stream = self.streams.get(key)
        if stream is None:
            stream = self.streams[key] = part.shard_stream(shard, self.states.get(key))
        if stream.packs != index:
            raise AssertionError(f"shard {key} is at pack {stream.packs}, the plan asks for {index}")
        return stream.next_pack(), (key, stream.state())
