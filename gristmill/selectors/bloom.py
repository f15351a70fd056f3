"""A counting Bloom filter that merges: occurrences of 64-bit item hashes.

``m`` cells of two arrays: a saturating 8-bit count and the smallest 32-bit
*holder* fingerprint seen (the record an occurrence came from). An item sets
``k`` cells by double hashing, ``g_i = (h1 + i * h2) mod m`` (Kirsch &
Mitzenmacher, "Less Hashing, Same Performance", ESA 2006). Its count is
estimated as the minimum over its cells (never below the truth), and its
first holder as the maximum of the cells' minimum fingerprints (never above
the truth's). Sized for ``n`` distinct items at false-positive rate ``p``
(Bloom 1970)::

    m = ceil(-n ln p / (ln 2)^2)        k = max(1, round(m / n * ln 2))

so an item never added looks present (every cell non-zero) with probability
about ``(1 - e^{-k n / m})^k <= p`` while at most ``n`` distinct items were
added. Adding is a saturating sum and a minimum, both associative and
commutative: any merge order of any partition of the input gives the same
filter, which is what makes a global stage identical on every engine.

A summary stays *sparse* (sorted cells with their values) while it touches
few cells, so a batch's summary costs what the batch holds, and turns dense
(the two arrays) when it fills an eighth of the cells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gristmill.selectors.minhash import fmix64

COUNT_MAX = 255
FP_NONE = np.uint32(0xFFFFFFFF)
_SALT = np.uint64(0x9E3779B97F4A7C15)


def bloom_size(expected: int, fp_rate: float) -> tuple[int, int]:
    """Cells ``m`` and hash functions ``k`` for ``expected`` items at ``fp_rate``.

    Examples
    --------
    >>> bloom_size(1_000_000, 0.001)
    (14377588, 10)
    """
    if expected < 1:
        raise ValueError(f"expected must be at least 1, got {expected}")
    if not 0 < fp_rate < 1:
        raise ValueError(f"fp_rate must be in (0, 1), got {fp_rate}")
    m = math.ceil(-expected * math.log(fp_rate) / math.log(2) ** 2)
    return m, max(1, round(m / expected * math.log(2)))


def false_positive_rate(m: int, k: int, n: float) -> float:
    """``(1 - e^{-k n / m})^k``: the chance an absent item looks present."""
    return (1.0 - math.exp(-k * n / m)) ** k


def cells_of(h: np.ndarray, m: int, k: int) -> np.ndarray:
    """The ``k`` cells of every item hash, shape ``(len(h), k)``."""
    h = np.asarray(h, dtype=np.uint64)
    h1 = h % np.uint64(m)
    h2 = fmix64(h ^ _SALT) % np.uint64(m - 1 if m > 1 else 1) + np.uint64(1)
    i = np.arange(k, dtype=np.uint64)
    # (h1 + i h2) mod m without overflow: both terms are below m < 2^63
    return ((h1[:, None] + (i[None, :] * h2[:, None]) % np.uint64(m)) % np.uint64(m)).astype(
        np.int64)


@dataclass
class CountingBloom:
    """Counts and smallest holders per cell; ``cells`` is None when dense."""

    m: int
    k: int
    counts: np.ndarray
    holders: np.ndarray
    cells: np.ndarray | None = None
    added: int = 0

    @classmethod
    def of(cls, h: np.ndarray, holder: np.ndarray, m: int, k: int) -> CountingBloom:
        """A sparse filter of items ``h`` (64-bit hashes), each seen in ``holder``
        (a 32-bit fingerprint of its record)."""
        cells = cells_of(h, m, k).ravel()
        hold = np.repeat(np.asarray(holder, dtype=np.uint32), k)
        # one cell once per item: an item whose k cells collide counts once there
        per_item = np.repeat(np.arange(len(h)), k)
        key = np.unique(per_item.astype(np.int64) * m + cells, return_index=True)[1]
        cells, hold = cells[key], hold[key]
        order = np.lexsort((hold, cells))
        cells, hold = cells[order], hold[order]
        first = np.r_[True, cells[1:] != cells[:-1]] if cells.size else np.zeros(0, bool)
        starts = np.flatnonzero(first)
        counts = np.diff(np.r_[starts, cells.size]).clip(max=COUNT_MAX).astype(np.uint8)
        return cls(m, k, counts, hold[starts], cells[starts], len(h))

    def dense(self) -> CountingBloom:
        if self.cells is None:
            return self
        counts = np.zeros(self.m, np.uint8)
        holders = np.full(self.m, FP_NONE, np.uint32)
        counts[self.cells] = self.counts
        holders[self.cells] = self.holders
        return CountingBloom(self.m, self.k, counts, holders, None, self.added)

    def merge(self, other: CountingBloom) -> CountingBloom:
        """Saturating sum of counts and minimum of holders (associative, commutative)."""
        if (self.m, self.k) != (other.m, other.k):
            raise ValueError(f"cannot merge filters of (m, k) = {(self.m, self.k)} and "
                             f"{(other.m, other.k)}")
        added = self.added + other.added
        if self.cells is not None and other.cells is not None \
                and self.cells.size + other.cells.size < self.m // 8:
            cells = np.concatenate([self.cells, other.cells])
            counts = np.concatenate([self.counts, other.counts]).astype(np.int64)
            hold = np.concatenate([self.holders, other.holders])
            order = np.lexsort((hold, cells))
            cells, counts, hold = cells[order], counts[order], hold[order]
            starts = np.flatnonzero(np.r_[True, cells[1:] != cells[:-1]])
            total = np.add.reduceat(counts, starts).clip(max=COUNT_MAX).astype(np.uint8)
            return CountingBloom(self.m, self.k, total, hold[starts], cells[starts], added)
        a, b = self.dense(), other.dense()
        counts = (a.counts.astype(np.uint16) + b.counts).clip(max=COUNT_MAX).astype(np.uint8)
        return CountingBloom(self.m, self.k, counts, np.minimum(a.holders, b.holders), None,
                             added)

    def query(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(estimated count, estimated first holder) of every item hash."""
        d = self.dense()
        cells = cells_of(h, self.m, self.k)
        return d.counts[cells].min(axis=1), d.holders[cells].max(axis=1)

    def report(self, expected: int, fp_rate: float) -> dict:
        """Sizing and fill: the distinct items estimated from the fill (Swamidass &
        Baldi 2007, ``n^ = -m / k ln(1 - X / m)``) and the false-positive rate at it."""
        d = self.dense()
        filled = int(np.count_nonzero(d.counts))
        frac = filled / self.m
        n_hat = -self.m / self.k * math.log(1.0 - frac) if frac < 1 else float("inf")
        return {"cells": self.m, "hashes": self.k, "bytes": self.m * 5,
                "expected_items": expected, "target_fp_rate": fp_rate,
                "items_added": self.added, "cells_filled": filled,
                "estimated_distinct_items": n_hat,
                "estimated_fp_rate": false_positive_rate(self.m, self.k, n_hat)
                if math.isfinite(n_hat) else 1.0,
                "over_capacity": bool(n_hat > expected)}
