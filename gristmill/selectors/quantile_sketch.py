"""A weighted, mergeable KLL quantile sketch with seeded (deterministic) coins.

Karnin, Lang & Liberty, "Optimal Quantile Approximation in Streams" (FOCS
2016), section 3: a stack of *compactors*. Level ``h`` holds items of weight
``2**h``; when it holds more than its capacity ``k_h`` it is *compacted*: its
items are sorted, a fair coin picks the odd or the even positions, and those
go to level ``h + 1`` with twice the weight. Weighted items are inserted as in
Apache DataSketches' weighted KLL update: an item of integer weight ``w`` is
placed once at every level ``h`` whose bit is set in ``w``, so the sketch's
total weight is the input's, exactly (a compaction halves an even number of
items and doubles their weight).

Error. For a fixed point ``x``, let ``r`` be the items of a compacted buffer
at or before ``x``: if ``r`` is even the compaction changes nothing at
``x``; if odd, it adds ``+2**h`` or ``-2**h`` with equal probability. How many
compactions happen, and at which levels, depends on the item counts only,
never on the coins, so the estimated weight at or before ``x`` errs by a
martingale with bounded steps and (Azuma-Hoeffding)

    P(|W_hat(<= x) - W(<= x)| >= t) <= 2 exp(-t**2 / (2 V)),  V = sum over compactions of 4**h.

``V`` is counted as the sketch is built, so the bound reported,
``t = sqrt(2 V ln(4 / delta))``, is the one for the compactions that ran; it
holds at two fixed points with probability at least ``1 - delta`` (a union
bound), which is what a cut needs (``TopFraction``).

Capacities (the paper's ``k_h = k c**(H - h)`` with ``c = 2/3``), with the
height taken from the total weight ``W`` instead of the number of levels, so
heavy items inserted high up do not shrink the capacities below them: ``H``
is the least integer with ``k 2**H >= W`` and ``k_h = max(2, ceil(k (2/3)**(H
- 1 - h)))`` below ``H - 1``, ``k`` above. A level at or above ``H`` would need
more than ``W`` weight to overflow, so it is never compacted; a compaction at
level ``h`` moves at least ``k_h`` items that never come back to ``h``, so it
happens at most ``W / (k_h 2**h)`` times. Hence ``V < 4 W**2 / k**2`` and
``t < W sqrt(8 ln(4 / delta)) / k``: with ``k = ceil(sqrt(8 ln(4 / delta)) /
epsilon)`` the bound is below ``epsilon W`` on any input. The sketch retains
at most about ``3k`` items below ``H`` and ``k`` per level above, ``O(k + log
W)``: ``O((1/epsilon) sqrt(log(1/delta)) + log W)``, whatever the number of items.

Determinism. The coin of the ``j``-th compaction at level ``h`` is a bit of
``mix64`` of the sketch's salt, ``h`` and ``j``; a sketch built from a sorted
run gets its salt from the seed and an order-free digest of the run (the XOR
of the items' tie hashes), and a merge mixes the two salts. Built from the
same multiset and merged in the same order, a sketch is the same bit for bit
on any engine or machine (the capacities are integer arithmetic).

Examples
--------
>>> import numpy as np
>>> keys = np.arange(10_000, dtype=np.uint64)
>>> sk = WeightedKLL.from_sorted(keys, keys ^ np.uint64(7), np.ones(10_000, np.int64),
...                              k=200, seed=1)
>>> sk.total, sk.retained() < 1_000
(10000, True)
>>> cut, est = sk.cut(0.25)
>>> abs(int(cut["k"]) + 1 - 2_500) <= sk.error_bound(1e-6)
True
"""

from __future__ import annotations

import json
import math
from typing import Any, BinaryIO

import numpy as np

from gristmill.pipeline.hashing import mix64

#: one retained item: the sort key and the tie hash (``TopFraction``'s order)
ITEM_DTYPE = np.dtype([("k", "<u8"), ("t", "<u8")])
MAGIC = b"GMKLL001"
COIN_SALT = "gristmill:kll-coin"


def capacity_for(epsilon: float, delta: float) -> int:
    """The ``k`` whose worst-case bound ``W sqrt(8 ln(4/delta)) / k`` is ``epsilon W``."""
    return max(2, math.ceil(math.sqrt(8.0 * math.log(4.0 / delta)) / epsilon))


def _sorted_merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The sorted union of two arrays sorted by ``(k, t)``: each item of ``b`` goes
    after the items of ``a`` at or before it (searchsorted, linear-time placement;
    a sort only when many distinct keys are shared)."""
    if a.size == 0:
        return b
    if b.size == 0:
        return a
    lo = np.searchsorted(a["k"], b["k"], "left")
    hi = np.searchsorted(a["k"], b["k"], "right")
    # a score once in ``a`` (the same record at two levels, mostly): one comparison
    pos = lo + ((hi - lo == 1) & (a["t"][np.minimum(lo, a.size - 1)] <= b["t"]))
    shared = np.flatnonzero(hi - lo > 1)  # tied scores: order by the tie hash
    if shared.size:
        groups = np.unique(lo[shared])
        if groups.size > 64:
            m = np.concatenate([a, b])
            return m[np.lexsort((m["t"], m["k"]))]
        for g in groups:
            sel = shared[lo[shared] == g]
            pos[sel] = g + np.searchsorted(a["t"][g:hi[sel[0]]], b["t"][sel], "right")
    at_b = pos + np.arange(b.size)
    at_a = np.arange(a.size) + np.searchsorted(at_b - np.arange(b.size), np.arange(a.size),
                                               "right")
    out = np.empty(a.size + b.size, dtype=a.dtype)
    for f in ("k", "t"):  # field by field: a structured fancy assignment is slow
        col = np.empty(out.size, dtype=np.uint64)
        col[at_b], col[at_a] = b[f], a[f]
        out[f] = col
    return out


class WeightedKLL:
    """The sketch (module doc). Build with ``from_sorted``, combine with ``merge``
    (in a fixed order), query with ``cut``; ``write``/``read`` serialize it.

    Parameters
    ----------
    k : int
        Capacity of the top compactors (``capacity_for(epsilon, delta)``).
    salt : int
        64-bit salt of the coins.
    """

    def __init__(self, k: int, salt: int) -> None:
        if k < 2:
            raise ValueError(f"k must be at least 2, got {k}")
        self.k = int(k)
        self.salt = int(salt)
        self.levels: list[np.ndarray] = []
        self.counters: list[int] = []  # compactions so far, per level
        self.total = 0  # weight, exact
        self.rows = 0  # items seen, weightless ones included
        self.max_weight = 0  # the heaviest single item's weight
        self.first: tuple[int, int] | None = None  # the least item, weightless ones included
        self.variance = 0  # sum of 4**h over the compactions (exact integer)

    @classmethod
    def from_sorted(cls, keys: np.ndarray, ties: np.ndarray, weights: np.ndarray, k: int,
                    seed: int) -> WeightedKLL:
        """The sketch of one sorted run (ascending ``(keys, ties)``, integer weights
        >= 0). A function of the multiset only: the salt is ``seed`` mixed with
        the XOR of the tie hashes."""
        keys = np.asarray(keys, dtype=np.uint64)
        ties = np.asarray(ties, dtype=np.uint64)
        weights = np.asarray(weights, dtype=np.int64)
        if weights.size and weights.min() < 0:
            raise ValueError("weights must be >= 0")
        digest = np.bitwise_xor.reduce(ties) if ties.size else np.uint64(0)
        sk = cls(k, int(mix64(np.array([digest], dtype=np.uint64), seed, COIN_SALT)[0]))
        sk.rows = int(keys.size)
        if keys.size == 0:
            return sk
        sk.first = (int(keys[0]), int(ties[0]))
        sk.total = int(weights.sum())
        sk.max_weight = int(weights.max())
        items = np.empty(keys.size, dtype=ITEM_DTYPE)
        items["k"], items["t"] = keys, ties
        for h in range(sk.max_weight.bit_length()):
            sk._level(h)
            sk.levels[h] = items[((weights >> h) & 1).astype(bool)]
        sk.compress()
        return sk

    def _level(self, h: int) -> None:
        while len(self.levels) <= h:
            self.levels.append(np.empty(0, dtype=ITEM_DTYPE))
            self.counters.append(0)

    def height(self) -> int:
        """The least ``H`` with ``k 2**H >= total``."""
        h = 0
        while self.k << h < self.total:
            h += 1
        return h

    def capacity(self, h: int) -> int:
        """``k_h`` (module doc), in integer arithmetic."""
        depth = self.height() - 1 - h
        if depth <= 0:
            return self.k
        return max(2, -(-self.k * 2 ** depth // 3 ** depth))

    def compress(self) -> None:
        """Compact every level above its capacity, bottom up."""
        h = 0
        while h < len(self.levels):
            if self.levels[h].size > self.capacity(h):
                self._compact(h)
            h += 1

    def _compact(self, h: int) -> None:
        buf = self.levels[h]
        even = buf.size - buf.size % 2  # an odd last item stays, so weight is kept exactly
        z = mix64(np.array([self.counters[h]], dtype=np.uint64), self.salt ^ (h << 40), COIN_SALT)
        offset = int(z[0] >> np.uint64(63))
        self._level(h + 1)
        self.levels[h + 1] = _sorted_merge(self.levels[h + 1], buf[offset:even:2])
        self.levels[h] = buf[even:]
        self.counters[h] += 1
        self.variance += 4 ** h

    def merge(self, other: WeightedKLL) -> WeightedKLL:
        """``self`` and ``other`` combined (``self`` first); both are left unchanged.
        Not commutative in its coins: merge in a fixed order."""
        if other.k != self.k:
            raise ValueError(f"cannot merge sketches of k={self.k} and k={other.k}")
        salt = int(mix64(np.array([other.salt], dtype=np.uint64), self.salt, COIN_SALT)[0])
        out = WeightedKLL(self.k, salt)
        for h in range(max(len(self.levels), len(other.levels))):
            out._level(h)
            for part in (self, other):
                if h < len(part.levels):
                    out.levels[h] = _sorted_merge(out.levels[h], part.levels[h])
                    out.counters[h] += part.counters[h]
        out.total, out.rows = self.total + other.total, self.rows + other.rows
        out.max_weight = max(self.max_weight, other.max_weight)
        firsts = [f for f in (self.first, other.first) if f is not None]
        out.first = min(firsts) if firsts else None
        out.variance = self.variance + other.variance
        out.compress()
        return out

    def retained(self) -> int:
        """Items held (the sketch's memory is ``16`` bytes each, plus its levels)."""
        return int(sum(lv.size for lv in self.levels))

    def error_bound(self, delta: float) -> float:
        """``t = sqrt(2 V ln(4/delta))``: with probability at least ``1 - delta`` the
        estimated weight at or before each of two fixed points is within ``t``."""
        return math.sqrt(2.0 * self.variance * math.log(4.0 / delta))

    def cut(self, fraction: float) -> tuple[np.void, int]:
        """The first retained item whose estimated weight at or before it reaches
        ``fraction * total`` (the last if none does), and that estimate. With no
        weight at all, the least item seen."""
        if self.rows == 0:
            raise ValueError("an empty sketch has no cut")
        if self.total == 0:
            first = np.array([self.first], dtype=ITEM_DTYPE)[0]
            return first, 0
        items = np.concatenate(self.levels)
        w = np.concatenate([np.full(lv.size, 1 << h, dtype=np.int64)
                            for h, lv in enumerate(self.levels)])
        order = np.lexsort((items["t"], items["k"]))
        cum = np.cumsum(w[order])
        j = min(int(np.searchsorted(cum, fraction * self.total, side="left")), order.size - 1)
        return items[order[j]], int(cum[j])

    def write(self, sink: BinaryIO) -> None:
        """A JSON header (integers exact) then each level's items."""
        head = {"k": self.k, "salt": self.salt, "sizes": [int(lv.size) for lv in self.levels],
                "counters": self.counters, "total": self.total, "rows": self.rows,
                "max_weight": self.max_weight, "first": self.first, "variance": self.variance}
        raw = json.dumps(head).encode()
        sink.write(MAGIC + np.array([len(raw)], dtype="<i8").tobytes() + raw)
        for lv in self.levels:
            sink.write(lv.tobytes())

    @classmethod
    def read(cls, src: BinaryIO) -> WeightedKLL:
        if src.read(len(MAGIC)) != MAGIC:
            raise ValueError("not a gristmill KLL sketch (or written by another version)")
        n = int(np.frombuffer(src.read(8), dtype="<i8")[0])
        head: dict[str, Any] = json.loads(src.read(n))
        sk = cls(head["k"], head["salt"])
        for size in head["sizes"]:
            want = size * ITEM_DTYPE.itemsize
            raw = src.read(want)
            if len(raw) != want:
                raise ValueError("a spilled KLL sketch is truncated")
            sk.levels.append(np.frombuffer(raw, dtype=ITEM_DTYPE).copy())
        sk.counters = list(head["counters"])
        sk.total, sk.rows, sk.max_weight = head["total"], head["rows"], head["max_weight"]
        sk.first = tuple(head["first"]) if head["first"] is not None else None
        sk.variance = head["variance"]
        return sk
