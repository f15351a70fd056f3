"""Deterministic hashing: the only source of randomness in a pipeline.

Randomness is a hash of (seed, record key), never a sequential RNG, so a
record's fate does not depend on how the corpus is partitioned or which
engine runs it.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable

import numpy as np
import pyarrow as pa


def _as_list(values: Iterable[str] | pa.Array | pa.ChunkedArray) -> list:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.to_pylist()
    return list(values)


def hash64(values: Iterable[str] | pa.Array | pa.ChunkedArray, seed: int = 0,
           salt: str = "") -> np.ndarray:
    """64-bit BLAKE2b of ``f"{seed}:{salt}:"`` + value, as uint64 (little endian).

    Stable across processes, machines and Python versions (unlike ``hash()``).
    """
    prefix = f"{seed}:{salt}:".encode()
    out = np.empty(0, dtype=np.uint64)
    items = _as_list(values)
    buf = bytearray()
    for v in items:
        h = hashlib.blake2b(prefix, digest_size=8)
        h.update(v.encode("utf-8", "surrogatepass") if isinstance(v, str) else bytes(v))
        buf += h.digest()
    if items:
        out = np.frombuffer(bytes(buf), dtype="<u8").astype(np.uint64)
    return out


def uniform(ids: Iterable[str] | pa.Array | pa.ChunkedArray, seed: int, salt: str = "") -> np.ndarray:
    """A uniform number in [0, 1) per id, from ``hash64`` (53 bits of mantissa)."""
    h = hash64(ids, seed=seed, salt=salt)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _salt64(seed: int, salt: str) -> np.uint64:
    h = hashlib.blake2b(f"{seed}:{salt}:".encode(), digest_size=8).digest()
    return np.frombuffer(h, dtype="<u8").astype(np.uint64)[0]


def mix64(keys: np.ndarray, seed: int = 0, salt: str = "") -> np.ndarray:
    """A 64-bit hash of integer keys under ``(seed, salt)``: SplitMix64's finalizer
    (Steele, Lea & Flood 2014) of ``key XOR blake2b(seed, salt)``. Vectorized,
    stable across processes and machines."""
    z = np.asarray(keys, dtype=np.uint64) ^ _salt64(seed, salt)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def record_hash(batch: pa.Table, seed: int, salt: str = "") -> np.ndarray:
    """The random draw of every record: ``mix64(row key, seed, salt)``.

    Records are identified by the pipeline's row key (``stage.ROW_KEY``), never
    by the user's ``id``, which may repeat. A table built by hand without row
    keys (a docstring example, a unit test) falls back to ``hash64(id)``.
    """
    from gristmill.pipeline.stage import ROW_KEY

    if ROW_KEY in batch.column_names:
        return mix64(batch.column(ROW_KEY).to_numpy(zero_copy_only=False), seed, salt)
    return hash64(batch.column("id"), seed=seed, salt=salt)


def record_uniform(batch: pa.Table, seed: int, salt: str = "") -> np.ndarray:
    """A uniform number in [0, 1) per record, from ``record_hash``."""
    h = record_hash(batch, seed, salt)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


_WS = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)


def normalize_text(text: str) -> str:
    """Normalization for exact dedup: NFKC, lower case, punctuation removed,
    whitespace collapsed (as in common exact-substring / CCNet-style dedup)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _PUNCT.sub("", text)
    return _WS.sub(" ", text).strip()
