"""Groups of 64-bit hashes within a Hamming distance, found without comparing all pairs.

``HashIndex`` is multi-index hashing (Norouzi, Punjani and Fleet, "Fast search in Hamming
space with multi-index hashing", CVPR 2012): the 64 bits are cut into three bands (21, 21
and 22 bits). If two hashes are at most ``d`` bits apart, with ``d = 3 r + a``
(``0 <= a < 3``), then one of the first ``a + 1`` bands differs in at most ``r`` bits, or
one of the others in at most ``r - 1`` (were it not so, the bands would differ in
``(a + 1) (r + 1) + (2 - a) r = d + 1`` bits or more). So a query looks up, in each band's
table, its band value with every flip of at most that many bits (718 lookups at d = 8),
and checks only the hashes found there: about 340 at a million random hashes, instead of
a million.

Why three bands: with ~2 million values per band, a band's bucket holds half a hash at a
million, so candidates stay few; four bands of 16 bits need fewer lookups (188) but check
~2,800 candidates at a million (a first version built that way took 15.5 s to group 200,000
random hashes here, this one 7.8 s, and the gap widens with the count). A band's table is
a hash-chained array: ``head[value]`` is the last position stored with that band value and
``chain[position]`` the one before it, so adding hashes is a few vectorised writes (no
rebuild) and a lookup is one array read per link. The tables cost 32 MiB whatever the
count, so they are built only once more than ``BRUTE_FORCE_LIMIT`` hashes are stored;
below that, every stored hash is compared (at most 4,096 XORs per query: a bulk of 500
costs about what the tables would; at 10,000 stored it already cost 5x more).

``Components`` keeps the connected components ("within the distance of any member") of
the items added so far, each labelled by its smallest item id, and says which labels
change as items are added. Everything is numpy over whole arrays; Python loops only run
over the few labels a step touches.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = ["MAX_DISTANCE", "Change", "Components", "HashIndex"]

Int64s = npt.NDArray[np.int64]
UInt64s = npt.NDArray[np.uint64]
Positions = npt.NDArray[np.intp]

#: Bits of each band, most significant first.
BAND_BITS: Final = (21, 21, 22)
#: The largest distance offered: at 10 a query makes 3,378 lookups (5x those at 8); real
#: near-copies are within 8 (README).
MAX_DISTANCE: Final = 10
#: Up to this many stored hashes, a query compares them all instead of using the tables.
BRUTE_FORCE_LIMIT: Final = 4096
#: Queries looked up together: bounds the temporary arrays (718 probe keys each at d = 8).
_QUERY_BLOCK: Final = 1024
#: Cells of the brute-force block (queries x stored hashes) at once.
_BRUTE_CELLS: Final = 1 << 22
_NONE: Final = -1


def _flips(bits: int, radius: int) -> Positions:
    """Every mask of ``bits`` bits with at most ``radius`` set (none when ``radius`` < 0)."""
    masks = [0] if radius >= 0 else []
    for weight in range(1, radius + 1):
        for chosen in itertools.combinations(range(bits), weight):
            masks.append(sum(1 << b for b in chosen))
    return np.array(masks, dtype=np.intp)


def _reserved(buffer: npt.NDArray[Any], used: int, size: int) -> npt.NDArray[Any]:
    """``buffer`` (its first ``used`` entries kept) with room for ``size``: doubled when
    full, so adding a bulk costs the bulk, not a copy of everything stored."""
    if size <= len(buffer):
        return buffer
    grown = np.empty(max(size, 2 * len(buffer), 1024), dtype=buffer.dtype)
    grown[:used] = buffer[:used]
    return grown


def _appended(buffer: npt.NDArray[Any], used: int, values: npt.NDArray[Any]) -> npt.NDArray[Any]:
    buffer = _reserved(buffer, used, used + len(values))
    buffer[used : used + len(values)] = values
    return buffer


def _empty() -> tuple[Positions, Positions]:
    return np.empty(0, dtype=np.intp), np.empty(0, dtype=np.intp)


class HashIndex:
    """The positions of stored 64-bit hashes, searchable by Hamming distance."""

    def __init__(self, max_distance: int) -> None:
        if not 0 <= max_distance <= MAX_DISTANCE:
            raise ValueError(f"the distance must be between 0 and {MAX_DISTANCE}")
        self.max_distance = max_distance
        radius, extra = divmod(max_distance, len(BAND_BITS))
        self._flips = [
            _flips(bits, radius if band <= extra else radius - 1)
            for band, bits in enumerate(BAND_BITS)
        ]
        shifts = np.cumsum((0, *BAND_BITS))[:-1]
        self._shifts = [
            np.uint64(64 - shift - bits) for shift, bits in zip(shifts, BAND_BITS, strict=True)
        ]
        self._masks = [np.uint64((1 << bits) - 1) for bits in BAND_BITS]
        self._hashes: UInt64s = np.empty(0, dtype=np.uint64)
        self._count = 0
        self._heads: list[npt.NDArray[np.int32]] = []
        self._chains: list[npt.NDArray[np.int32]] = []

    def __len__(self) -> int:
        return self._count

    @property
    def hashes(self) -> UInt64s:
        return self._hashes[: self._count]

    def _band(self, hashes: UInt64s, band: int) -> Positions:
        return ((hashes >> self._shifts[band]) & self._masks[band]).astype(np.intp)

    def add(self, hashes: UInt64s) -> None:
        """Store ``hashes`` at the next positions."""
        start = self._count
        self._hashes = _appended(self._hashes, start, hashes.astype(np.uint64, copy=False))
        self._count += len(hashes)
        if self._heads:
            self._link(np.arange(start, len(self.hashes), dtype=np.intp))
        elif len(self.hashes) > BRUTE_FORCE_LIMIT:
            self._heads = [np.full(1 << bits, _NONE, dtype=np.int32) for bits in BAND_BITS]
            self._chains = [np.empty(0, dtype=np.int32) for _ in BAND_BITS]
            self._link(np.arange(len(self.hashes), dtype=np.intp))

    def _link(self, positions: Positions) -> None:
        """Put ``positions`` (the last ones stored) at the head of their bands' chains."""
        for band, head in enumerate(self._heads):
            values = self._band(self.hashes[positions], band)
            order = np.argsort(values, kind="stable")
            values, ordered = values[order], positions[order]
            first = np.ones(len(values), dtype=bool)
            first[1:] = values[1:] != values[:-1]
            last = np.ones(len(values), dtype=bool)
            last[:-1] = first[1:]
            before = np.empty(len(values), dtype=np.int32)
            before[1:] = ordered[:-1]
            before[first] = head[values[first]]
            chain = _reserved(self._chains[band], int(positions.min()), self._count)
            chain[ordered] = before
            self._chains[band] = chain
            head[values[last]] = ordered[last]

    def pairs(self, queries: Positions) -> tuple[Positions, Positions]:
        """Every (query, match) of stored positions within the distance, a query's own
        position excepted, each pair once."""
        found: list[tuple[Positions, Positions]] = []
        search = self._tables if self._heads else self._all
        for begin in range(0, len(queries), _QUERY_BLOCK):
            q, m = search(queries[begin : begin + _QUERY_BLOCK])
            own = q != m
            found.append((q[own], m[own]))
        if not found:
            return _empty()
        q = np.concatenate([f[0] for f in found])
        m = np.concatenate([f[1] for f in found])
        # A pair may be found in several bands.
        size = len(self.hashes)
        unique = np.unique(q.astype(np.int64) * size + m)
        return (unique // size).astype(np.intp), (unique % size).astype(np.intp)

    def _tables(self, queries: Positions) -> tuple[Positions, Positions]:
        wanted = self.hashes[queries]
        found_q, found_m = [], []
        for band, flips in enumerate(self._flips):
            if not len(flips):
                continue
            keys = (self._band(wanted, band)[:, None] ^ flips[None, :]).ravel()
            at = self._heads[band][keys]
            live = at != _NONE
            owners, at = np.repeat(queries, len(flips))[live], at[live].astype(np.intp)
            chain = self._chains[band]
            while len(at):
                near = np.bitwise_count(self.hashes[owners] ^ self.hashes[at]) <= self.max_distance
                found_q.append(owners[near])
                found_m.append(at[near])
                at = chain[at].astype(np.intp)
                live = at != _NONE
                owners, at = owners[live], at[live]
        if not found_q:
            return _empty()
        return np.concatenate(found_q), np.concatenate(found_m)

    def _all(self, queries: Positions) -> tuple[Positions, Positions]:
        found_q, found_m = [], []
        step = max(1, _BRUTE_CELLS // max(1, len(self.hashes)))
        for begin in range(0, len(queries), step):
            block = queries[begin : begin + step]
            distance = np.bitwise_count(self.hashes[block][:, None] ^ self.hashes[None, :])
            rows, cols = np.nonzero(distance <= self.max_distance)
            found_q.append(block[rows])
            found_m.append(cols.astype(np.intp))
        if not found_q:
            return _empty()
        return np.concatenate(found_q), np.concatenate(found_m)


@dataclass(frozen=True, slots=True)
class Change:
    """What one ``Components.add`` changed: the items whose label is new (all the added
    items, and members of groups that merged into a group with a smaller first item),
    the groups of two or more items whose size is new, and the labels that are no
    longer groups of two or more."""

    item_ids: Int64s
    labels: Int64s
    sizes: dict[int, int] = field(default_factory=dict)
    gone: list[int] = field(default_factory=list)


class Components:
    """The connected components of items under "hashes within ``max_distance``", each
    labelled by its smallest item id."""

    def __init__(self, max_distance: int) -> None:
        self.index = HashIndex(max_distance)
        self._ids: Int64s = np.empty(0, dtype=np.int64)
        self._labels: Int64s = np.empty(0, dtype=np.int64)
        self._count = 0
        #: Label -> size, for components of two or more items.
        self.sizes: dict[int, int] = {}

    def __len__(self) -> int:
        return self._count

    @property
    def ids(self) -> Int64s:
        return self._ids[: self._count]

    @property
    def labels(self) -> Int64s:
        """Each item's label, in the order added (a view: relabelling writes through)."""
        return self._labels[: self._count]

    def _append(self, ids: Int64s, labels: Int64s) -> None:
        self._ids = _appended(self._ids, self._count, ids)
        self._labels = _appended(self._labels, self._count, labels)
        self._count += len(ids)

    def load(self, ids: Int64s, hashes: UInt64s, labels: Int64s) -> None:
        """Items already labelled (read back from the ledger): nothing is searched."""
        self._append(ids, labels)
        self.index.add(hashes)
        values, counts = np.unique(self.labels, return_counts=True)
        multi = counts > 1
        self.sizes = dict(zip(values[multi].tolist(), counts[multi].tolist(), strict=True))

    def add(self, ids: Int64s, hashes: UInt64s) -> Change:
        """Add items (not added before) and label them with their components."""
        start = self._count
        self._append(ids, ids)
        self.index.add(hashes)
        q, m = self.index.pairs(np.arange(start, len(self.ids), dtype=np.intp))
        if not len(q):
            return Change(ids.copy(), ids.copy())
        # A graph of the labels the pairs join: the old groups they touch and the new items.
        ends = np.concatenate([self.labels[q], self.labels[m]])
        nodes, at = np.unique(ends, return_inverse=True)
        left, right = at[: len(q)], at[len(q) :]
        root = _smallest_connected(len(nodes), left, right)
        merged = root != np.arange(len(nodes))
        # New items are labelled by their own ids, which no older item has: the other
        # nodes are the labels of older groups (or of older single items).
        older = ~np.isin(nodes, ids)
        labels = nodes.tolist()
        were_groups = {label for label in labels if label in self.sizes}
        sizes: dict[int, int] = {}
        for label, into in zip(labels, nodes[root].tolist(), strict=True):
            sizes[into] = sizes.get(into, 0) + self.sizes.pop(label, 1)
        self.sizes.update(sizes)
        relabel_from, relabel_to = nodes[merged], nodes[root[merged]]
        changed_old = np.empty(0, dtype=np.intp)
        if (merged & older).any():
            changed_old = np.nonzero(np.isin(self.labels[:start], nodes[merged & older]))[0]
        added = np.arange(start, len(self.ids), dtype=np.intp)
        for rows in (changed_old, added):
            self._relabel(rows, relabel_from, relabel_to)
        rows = np.concatenate([changed_old, added])
        gone = sorted(were_groups - set(sizes))
        return Change(self.ids[rows], self.labels[rows], sizes, gone)

    def _relabel(self, rows: npt.NDArray[np.intp], old: Int64s, new: Int64s) -> None:
        if not len(rows) or not len(old):
            return
        current = self.labels[rows]
        at = np.searchsorted(old, current).clip(max=len(old) - 1)
        hit = old[at] == current
        self.labels[rows[hit]] = new[at[hit]]


def _smallest_connected(
    count: int, left: npt.NDArray[np.intp], right: npt.NDArray[np.intp]
) -> npt.NDArray[np.intp]:
    """For each of ``count`` nodes (numbered in increasing label order), the smallest node
    connected to it by the edges ``left``-``right``: the minimum spread along edges, with
    pointer jumping, until nothing moves (a few rounds for groups of near-copies)."""
    root = np.arange(count, dtype=np.intp)
    while True:
        low = np.minimum(root[left], root[right])
        moved = root.copy()
        np.minimum.at(moved, left, low)
        np.minimum.at(moved, right, low)
        moved = moved[moved]
        if np.array_equal(moved, root):
            return root
        root = moved
