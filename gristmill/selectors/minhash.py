"""MinHash near-duplicate removal: shingles, signatures, LSH bands as a shuffle.

For a record with shingle set ``A`` and ``k`` hash functions ``h_i``, the
signature is ``sig_i(A) = min_{x in A} h_i(x)``; for two records
``P[sig_i(A) = sig_i(B)] = J(A, B) = |A n B| / |A u B|`` (Broder, 1997). The
signature is cut into ``b`` bands of ``r`` rows; two records are candidates
when all rows of some band agree, which happens with probability
``1 - (1 - J^r)^b`` (Leskovec, Rajaraman & Ullman, *Mining of Massive
Datasets*, ch. 3). ``b`` and ``r`` are chosen for a Jaccard threshold ``t`` by
minimizing ``w_fp * FP + w_fn * FN`` with::

    FP(b, r) = int_0^t 1 - (1 - s^r)^b ds      FN(b, r) = int_t^1 (1 - s^r)^b ds

as datasketch's ``MinHashLSH`` does. Each band's rows hash to one uint64 key;
the engine groups keys (its shuffle).

By default (``verify: true``) a candidate pair is a duplicate only when its
full signatures agree: with ``k = num_perm`` values compared, ``m`` equal,
the estimate ``J^ = m / k`` must reach ``t + margin * se`` (``se`` its
standard error at ``t``, ``sqrt(t (1 - t) / k)``; ``margin`` 0.5 by default),
and records are dropped only for a kept survivor they are verified against
(the verified policy of :mod:`gristmill.selectors.dedup`; chains never drop).
The shuffle carries a ``sketch_bits``-bit sketch of every value (b-bit
minwise hashing, Li & König, "b-Bit Minwise Hashing", WWW 2010): equal low
bits happen with probability ``P_b = J + (1 - J) c``, ``c = 2^-b``, so
``J^ = (m / k - c) / (1 - c)``. A pair is then reported with probability
``P(s) = P_band(s) P_ver(s)``, where ``P_band(s) = 1 - (1 - s^r)^b`` and
``P_ver(s) = P[Bin(k, P_b(s)) >= m_t]`` (``m_t`` the fewest agreements that
pass), and ``b, r`` minimize ``w_fp * FP + w_fn * FN`` for that ``P``::

    FP(b, r) = int_0^t P(s) ds      FN(b, r) = int_t^1 1 - P(s) ds

Verification removes most of banding's false positives, so the optimum is a
more permissive banding than datasketch's (17 x 7 instead of 9 x 13 at
t = 0.8, k = 128): recall from the bands, precision from the check. The
margin is not from the integrals, which weigh every similarity alike: real
corpora hold many more pairs just below a threshold than just above it, so a
cut at exactly ``t`` drops more false pairs than it misses true ones
(``docs/dedup.md`` has the measurements that set it). With
``verify: false`` the bands are datasketch's and candidates are joined
transitively, as datasketch users usually do.

Signatures are datasketch-compatible (``scheme: affine32``, datasketch 2.x's
default, or ``scheme: legacy``, the mersenne-prime permutations of datasketch
before 2.0): the same ``a, b`` drawn from ``np.random.RandomState(hash_seed)``,
the same arithmetic, so ``LeanMinHash(seed=hash_seed, hashvalues=sig,
scheme=...)`` is what ``MinHash.update`` over the same 32-bit shingle hashes
gives. ``hash: sha1`` uses datasketch's own ``sha1_hash32`` of the shingle
bytes (one Python call per shingle, slow); the default ``hash: fast`` hashes
all shingles of a batch with numpy. ``scheme: one_permutation`` hashes each
shingle once into one of ``num_perm`` bins (Li, Owen & Zhang, "One Permutation
Hashing", NeurIPS 2012) with optimal densification of empty bins
(Shrivastava, ICML 2017): the fastest, not datasketch-compatible.

``kernel`` picks who computes: ``"native"`` is the C++ kernel of
:mod:`gristmill.ext.minhash_native` (word shingles with ``hash: fast``, every
scheme's signatures, band keys), ``"numpy"`` the code below, ``"auto"`` the C++
kernel when it builds, else numpy. Both give bit-identical results: words with
non-ASCII bytes are still normalized by pyarrow (Unicode case and punctuation)
and hashed by numpy, between the kernel's two passes.
"""

from __future__ import annotations

import functools
import hashlib
import math
import struct
from types import ModuleType
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from gristmill.selectors.dedup import ClusterDedup, ClusterDedupParams

U32_MAX = np.uint32(0xFFFFFFFF)
MERSENNE = np.uint64((1 << 61) - 1)
LEGACY_MAX = np.uint64((1 << 32) - 1)
# records per sub-batch: bounds the shingle and signature arrays (fastest here)
SUB_BATCH = 2048
# shingles per chunk of the (shingles x num_perm) permutation matrix (fits L2)
PERM_CHUNK = 2048
# candidate pairs compared per chunk in verify_pairs
VERIFY_CHUNK = 8192
SKETCH_DTYPES = {4: np.uint8, 8: np.uint8, 16: np.uint16, 32: np.uint32}

_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
# fixed odd multipliers, one per byte position (mod 64) and one per n-gram slot
_MULT = (np.random.RandomState(0x6D696C6C).randint(0, 1 << 62, 128, dtype=np.uint64)
         * np.uint64(2) + np.uint64(1))


Kernel = Literal["auto", "native", "numpy"]


def native_kernel(kernel: str = "auto") -> ModuleType | None:
    """The compiled kernel that ``kernel`` asks for, or None for the numpy path.

    ``"auto"`` builds it on first use and answers None (after one warning) when
    the build fails; ``"native"`` raises RuntimeError instead; ``"numpy"`` is None.
    """
    if kernel not in ("auto", "native", "numpy"):
        raise ValueError(f"kernel must be one of auto, native, numpy; got {kernel!r}")
    if kernel == "numpy":
        return None
    from gristmill.ext import minhash_native

    return minhash_native.module(required=kernel == "native")


def fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer: an avalanching bijection of uint64 (wraps)."""
    x = x ^ (x >> np.uint64(33))
    x = x * _M1
    x = x ^ (x >> np.uint64(33))
    x = x * _M2
    return x ^ (x >> np.uint64(33))


def fmix32(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (datasketch's pre-mix of the affine32 scheme)."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> np.uint32(16))


# ---------------------------------------------------------------------------
# LSH parameters

def _gauss_legendre(lo: float, hi: float, n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(n)
    return 0.5 * (hi - lo) * x + 0.5 * (hi + lo), 0.5 * (hi - lo) * w


def _band_probability(s: np.ndarray, b: np.ndarray, r: np.ndarray) -> np.ndarray:
    return 1.0 - (1.0 - s[None, :] ** r) ** b


def _binom_sf(need: int, n: int, p: np.ndarray) -> np.ndarray:
    """``P[Bin(n, p) >= need]`` for each ``p``: the sum of the pmf over ``need..n`` in
    logs (what ``scipy.stats.binom.sf(need - 1, n, p)`` gives, without importing
    scipy.stats, which costs every worker process ~70 MB)."""
    k = np.arange(max(need, 0), n + 1, dtype=np.float64)[None, :]
    p = np.asarray(p, dtype=np.float64)[:, None]
    log_choose = (math.lgamma(n + 1) - np.vectorize(math.lgamma)(k + 1)
                  - np.vectorize(math.lgamma)(n - k + 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        # 0 * log(0) = 0 at the ends p = 0 (k = 0) and p = 1 (k = n)
        a = np.where(k == 0, 0.0, k * np.log(p))
        b = np.where(k == n, 0.0, (n - k) * np.log1p(-p))
    return np.exp(log_choose + a + b).sum(axis=1)


def agreements_needed(threshold: float, num_perm: int, bits: int = 32,
                      margin: float = 0.0) -> int:
    """The fewest equal sketch values ``m`` out of ``k = num_perm`` whose Jaccard
    estimate ``(m / k - c) / (1 - c)``, ``c = 2^-bits``, reaches
    ``threshold + margin * se``, where ``se = sqrt(p (1 - p) / k) / (1 - c)`` is the
    estimate's standard error at the threshold (``p = t + (1 - t) c``)."""
    c = 0.0 if bits >= 32 else 2.0 ** -bits
    p = threshold + (1.0 - threshold) * c
    cut = min(1.0, threshold + margin * np.sqrt(p * (1.0 - p) / num_perm) / (1.0 - c))
    return int(np.ceil(num_perm * (cut * (1.0 - c) + c) - 1e-9))


def verified_bands(threshold: float, num_perm: int, fp_weight: float = 0.5,
                   fn_weight: float = 0.5, bits: int = 8,
                   margin: float = 0.5) -> tuple[int, int]:
    """Bands ``b`` and rows ``r`` for the verified scheme (module doc): minimize
    ``fp_weight * FP + fn_weight * FN`` of ``P(s) = P_band(s) * P_ver(s)``.

    ``P_ver(s)`` is the probability that ``num_perm`` ``bits``-bit sketch values
    agree in at least ``agreements_needed(threshold, num_perm, bits, margin)``
    positions at true Jaccard ``s``.

    Examples
    --------
    >>> verified_bands(0.8, 128)
    (17, 7)
    """
    pairs = np.array([(b, r) for b in range(1, num_perm + 1)
                      for r in range(1, num_perm // b + 1)], dtype=np.float64)
    b, r = pairs[:, :1], pairs[:, 1:]
    c = 0.0 if bits >= 32 else 2.0 ** -bits
    need = agreements_needed(threshold, num_perm, bits, margin)
    s0, w0 = _gauss_legendre(0.0, threshold, 128)
    s1, w1 = _gauss_legendre(threshold, 1.0, 128)
    ver0 = _binom_sf(need, num_perm, s0 + (1.0 - s0) * c)
    ver1 = _binom_sf(need, num_perm, s1 + (1.0 - s1) * c)
    fp = (_band_probability(s0, b, r) * ver0 * w0).sum(axis=1)
    fn = ((1.0 - _band_probability(s1, b, r) * ver1) * w1).sum(axis=1)
    best = int(np.argmin(fp * fp_weight + fn * fn_weight))
    return int(pairs[best, 0]), int(pairs[best, 1])


def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5,
                  fn_weight: float = 0.5) -> tuple[int, int]:
    """Bands ``b`` and rows ``r`` (``b * r <= num_perm``) minimizing
    ``fp_weight * FP + fn_weight * FN`` at Jaccard ``threshold`` (see module doc).

    The integrals are evaluated by Gauss-Legendre quadrature for every (b, r)
    at once; ties go to the first pair in (b, r) order, as in datasketch.

    Examples
    --------
    >>> optimal_bands(0.8, 128)
    (9, 13)
    """
    pairs = np.array([(b, r) for b in range(1, num_perm + 1)
                      for r in range(1, num_perm // b + 1)], dtype=np.float64)
    b, r = pairs[:, :1], pairs[:, 1:]
    s0, w0 = _gauss_legendre(0.0, threshold)
    s1, w1 = _gauss_legendre(threshold, 1.0)
    fp = ((1.0 - (1.0 - s0[None, :] ** r) ** b) * w0).sum(axis=1)
    fn = (((1.0 - s1[None, :] ** r) ** b) * w1).sum(axis=1)
    best = int(np.argmin(fp * fp_weight + fn * fn_weight))
    return int(pairs[best, 0]), int(pairs[best, 1])


# ---------------------------------------------------------------------------
# shingles

_PUNCT = r"[^\p{L}\p{M}\p{N}\p{Z}_\s]+"


def _normalize(texts: pa.Array, normalize: bool) -> pa.Array:
    texts = pc.fill_null(texts, "")
    if normalize:
        # RE2's \w and \s are ASCII-only: name the Unicode classes (letters, marks,
        # numbers, separators) so accented and non-Latin words survive
        texts = pc.replace_substring_regex(pc.utf8_lower(texts), _PUNCT, "")
    return texts


def _string_parts(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, data bytes) of a string array, offsets rebased to start at 0."""
    width = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=width)[arr.offset: arr.offset + len(arr) + 1]
    offsets = offsets.astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return offsets - offsets[0], data[offsets[0]: offsets[-1]]


def _hash_tokens(words: pa.Array) -> np.ndarray:
    """A 64-bit hash per (non-empty) string, vectorized over all their bytes:
    ``fmix64(sum_i (byte_i + 1) * M[i mod 64] + (i >> 6) * M[64] ^ len * M[65])``."""
    offsets, data = _string_parts(words)
    lens = np.diff(offsets)
    if lens.size == 0:
        return np.zeros(0, np.uint64)
    starts = offsets[:-1]
    pos = np.arange(data.size, dtype=np.int64) - np.repeat(starts, lens)
    v = (data.astype(np.uint64) + np.uint64(1)) * _MULT[pos & 63]
    v += (pos >> 6).astype(np.uint64) * _MULT[64]
    acc = np.zeros(lens.size, np.uint64)
    nonempty = lens > 0
    if nonempty.any():
        # empty strings own no bytes: the non-empty starts delimit every word's bytes
        acc[nonempty] = np.add.reduceat(v, starts[nonempty])
    return fmix64(acc ^ (lens.astype(np.uint64) * _MULT[65]))


def _ngrams(tok: np.ndarray, counts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the n-grams of each record's token hashes (records with
    fewer than ``n`` tokens give one shingle of all of them) and their record index."""
    docs = np.repeat(np.arange(counts.size), counts)
    total = tok.size
    out_h, out_d = [], []
    if total >= n:
        m = total - n + 1
        acc = np.zeros(m, dtype=np.uint64)
        for t in range(n):
            acc += tok[t: t + m] * _MULT[66 + t % 60]
        valid = docs[:m] == docs[n - 1:]
        out_h.append(acc[valid])
        out_d.append(docs[:m][valid])
    short = np.flatnonzero((counts > 0) & (counts < n))
    if short.size:
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        idx = np.concatenate([np.arange(starts[d], starts[d] + counts[d]) for d in short])
        pos = idx - np.repeat(starts[short], counts[short])
        acc = np.add.reduceat(tok[idx] * _MULT[66 + pos % 60], np.concatenate(
            [[0], np.cumsum(counts[short])[:-1]]))
        out_h.append(acc)
        out_d.append(short)
    if not out_h:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    return fmix64(np.concatenate(out_h)), np.concatenate(out_d).astype(np.int64)


def _word_tokens(texts: pa.Array, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Hash of every word and words per text. Words are split first and each
    distinct word of the batch is normalized and hashed once (text repeats words
    a lot); words that normalize to nothing (punctuation) are dropped, which
    gives the words of normalize-then-split."""
    lists = pc.utf8_split_whitespace(pc.fill_null(texts, ""))
    counts = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    codes = pc.dictionary_encode(pc.list_flatten(lists))
    vocab = _normalize(codes.dictionary, normalize)
    idx = codes.indices.to_numpy(zero_copy_only=False)
    empty = (pc.utf8_length(vocab).to_numpy(zero_copy_only=False) == 0)
    if empty.any():
        keep = ~empty[idx]
        docs = np.repeat(np.arange(counts.size), counts)
        counts = np.bincount(docs[keep], minlength=counts.size).astype(np.int64)
        idx = idx[keep]
    return _hash_tokens(vocab)[idx], counts


@functools.lru_cache(maxsize=2)
def _ascii_word_table(normalize: bool) -> np.ndarray:
    """What pyarrow does to each ASCII byte of a word, for the C++ shingler: -1
    splits words (``utf8_split_whitespace``), -2 is removed by ``_normalize``,
    otherwise the byte it becomes. Asked of pyarrow itself, one byte at a time."""
    chars = [chr(c) for c in range(128)]
    words = pc.utf8_split_whitespace(pa.array([f"a{c}b" for c in chars]))
    splits = pc.list_value_length(words).to_numpy(zero_copy_only=False) != 1
    table = np.full(128, -2, dtype=np.int16)
    for c, out in enumerate(_normalize(pa.array(chars), normalize).to_pylist()):
        if splits[c]:
            table[c] = -1
        elif out:
            if len(out.encode()) != 1:
                raise RuntimeError(f"pyarrow normalizes byte {c} to {out!r}, not one byte")
            table[c] = ord(out)
    return table


@functools.lru_cache(maxsize=1)
def _unicode_spaces() -> np.ndarray:
    """The non-ASCII code points pyarrow's ``utf8_split_whitespace`` splits at, sorted:
    of those Python calls whitespace, the ones pyarrow agrees on (a test checks
    that pyarrow splits at no other code point)."""
    cands = [c for c in range(128, 0x110000) if chr(c).isspace()]
    words = pc.utf8_split_whitespace(pa.array([f"a{chr(c)}b" for c in cands]))
    splits = pc.list_value_length(words).to_numpy(zero_copy_only=False) != 1
    return np.array(cands, dtype=np.uint32)[splits]


def _native_word_shingles(native: ModuleType, texts: pa.Array, ngram: int,
                          normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """shingle_hashes(word, fast) by the C++ kernel; the words with non-ASCII
    bytes are normalized by pyarrow and hashed by numpy in between."""
    if texts.null_count:
        texts = pc.fill_null(texts, "")
    offsets, data = _string_parts(texts)
    tok, foreign, counts, f_offsets, f_bytes = native.word_tokens(
        offsets, data, _ascii_word_table(normalize), _MULT, _unicode_spaces())
    words = pa.LargeStringArray.from_buffers(len(f_offsets) - 1, pa.py_buffer(f_offsets),
                                             pa.py_buffer(f_bytes))
    codes = pc.dictionary_encode(words)
    vocab = _normalize(codes.dictionary, normalize)
    idx = codes.indices.to_numpy(zero_copy_only=False)
    keep = pc.utf8_length(vocab).to_numpy(zero_copy_only=False)[idx] > 0
    return native.word_ngrams(tok, foreign, counts, _hash_tokens(vocab)[idx], keep, _MULT,
                              ngram)


def shingle_hashes(texts: pa.Array, shingle: str = "word", ngram: int = 5,
                   normalize: bool = True, hash: str = "fast",
                   kernel: Kernel = "auto") -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every shingle of every text, and the text index of each.

    ``shingle="word"``: n-grams of whitespace-separated words; ``"char"``:
    n-grams of characters (whitespace collapsed to one space). With
    ``normalize``, texts are lower-cased and punctuation is removed first.
    ``hash="fast"`` hashes with numpy over the whole batch (the upper 32 bits
    of a 64-bit hash); ``hash="sha1"`` is datasketch's ``sha1_hash32`` of the
    UTF-8 shingle (words joined by one space), one Python call per shingle.
    Records without shingles (empty text) get none. ``kernel``: who computes
    (module doc); the result is the same.
    """
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    native = native_kernel(kernel) if shingle == "word" and hash == "fast" else None
    if native is not None and (pa.types.is_string(texts.type)
                               or pa.types.is_large_string(texts.type)):
        return _native_word_shingles(native, texts, ngram, normalize)
    if shingle == "word" and hash == "fast":
        tok, counts = _word_tokens(texts, normalize)
    else:
        norm = _normalize(texts, normalize)
        if shingle == "char":
            norm = pc.replace_substring_regex(pc.utf8_trim_whitespace(norm), r"\s+", " ")
        if hash == "sha1":
            return _sha1_shingles(norm, shingle, ngram)
        counts = pc.utf8_length(norm).to_numpy(zero_copy_only=False).astype(np.int64)
        joined = "".join(norm.to_pylist())  # one string: a single utf-32 decode for all
        cps = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        tok = fmix64(cps * _MULT[127] + np.uint64(1))
    h, d = _ngrams(tok, counts, ngram)
    return (h >> np.uint64(32)).astype(np.uint32), d


def _sha1_shingles(norm: pa.Array, shingle: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    hs: list[int] = []
    ds: list[int] = []
    items = norm.to_pylist()
    for d, item in enumerate(items):
        if shingle == "word":
            item = item.split()
        if not item:
            continue
        if shingle == "word":
            grams = [" ".join(item[i: i + n]) for i in range(max(len(item) - n + 1, 1))]
        else:
            grams = [item[i: i + n] for i in range(max(len(item) - n + 1, 1))]
        for g in grams:
            hs.append(struct.unpack("<I", hashlib.sha1(g.encode("utf-8")).digest()[:4])[0])
        ds.extend([d] * len(grams))
    return np.array(hs, dtype=np.uint32), np.array(ds, dtype=np.int64)


# ---------------------------------------------------------------------------
# signatures

def permutations(num_perm: int, seed: int, scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's ``a, b`` for ``scheme`` ("affine32" or "legacy"), drawn in
    the same order from ``np.random.RandomState(seed)``."""
    gen = np.random.RandomState(seed)
    if scheme == "legacy":
        ab = np.array([(gen.randint(1, MERSENNE, dtype=np.uint64),
                        gen.randint(0, MERSENNE, dtype=np.uint64)) for _ in range(num_perm)],
                      dtype=np.uint64).T
        return ab[0], ab[1]
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def signatures(h: np.ndarray, docs: np.ndarray, n_docs: int, num_perm: int = 128,
               seed: int = 1, scheme: str = "affine32", kernel: Kernel = "auto") -> np.ndarray:
    """MinHash signatures ``(n_docs, num_perm)`` from shingle hashes and their record index.

    ``affine32``: ``min_x (a * fmix32(x) + b) mod 2^32``; ``legacy``:
    ``min_x ((a * x + b) mod 2^64 mod (2^61 - 1)) & (2^32 - 1)``, both exactly as
    datasketch computes them (uint32 for affine32, uint64 for legacy). Records
    without shingles keep the empty value (the maximum), as in datasketch.
    ``one_permutation``: one hash per shingle, binned, densified (module doc).
    ``kernel``: who computes (module doc); the result is the same.
    """
    native = native_kernel(kernel)
    if native is not None:
        h = np.ascontiguousarray(h, dtype=np.uint32)
        docs = np.ascontiguousarray(docs, dtype=np.int64)
        if scheme == "one_permutation":
            seed_mult = (seed * int(_MULT[126])) & 0xFFFFFFFFFFFFFFFF
            return native.one_permutation_signatures(h, docs, n_docs, num_perm, seed_mult,
                                                     int(_MULT[125]))
        a, b = permutations(num_perm, seed, scheme)
        if scheme == "legacy":
            return native.legacy_signatures(h, docs, n_docs, a, b)
        return native.affine32_signatures(h, docs, n_docs, a, b)
    if scheme == "one_permutation":
        # one hash per shingle and a scattered minimum: order and repeats do not matter
        return _one_permutation(h, docs.astype(np.int64), n_docs, num_perm, seed)
    # sorted by record for the segmented minimum below; a record's repeated
    # shingles change nothing, so they are dropped before the num_perm products
    packed = np.sort((docs.astype(np.uint64) << np.uint64(32)) | h.astype(np.uint64))
    packed = packed[np.r_[True, packed[1:] != packed[:-1]]]
    docs = (packed >> np.uint64(32)).astype(np.int64)
    h = (packed & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    a, b = permutations(num_perm, seed, scheme)
    if scheme == "legacy":
        sig = np.full((n_docs, num_perm), LEGACY_MAX, dtype=np.uint64)
        x_all = h.astype(np.uint64)
    else:
        sig = np.full((n_docs, num_perm), U32_MAX, dtype=np.uint32)
        x_all = fmix32(h)
    a, b = a[:, None], b[:, None]
    # (num_perm x shingles) so each record's shingles are a contiguous run to reduce
    for s in range(0, h.size, PERM_CHUNK):
        x = x_all[None, s: s + PERM_CHUNK]
        d = docs[s: s + PERM_CHUNK]
        if scheme == "legacy":
            y = x * a + b  # wraps mod 2^64, as datasketch's uint64 arithmetic does
            y = (y & MERSENNE) + (y >> np.uint64(61))  # mod 2^61-1 without a division
            y -= MERSENNE * (y >= MERSENNE)
            y &= LEGACY_MAX
        else:
            y = x * a
            y += b
        first = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
        part = np.minimum.reduceat(y, first, axis=1).T
        rows = d[first]
        sig[rows] = np.minimum(sig[rows], part)
    return sig


def _one_permutation(h: np.ndarray, docs: np.ndarray, n_docs: int, k: int,
                     seed: int) -> np.ndarray:
    g = fmix64(h.astype(np.uint64) ^ (np.uint64(seed) * _MULT[126]))
    bins = ((g >> np.uint64(32)) % np.uint64(k)).astype(np.int64)
    sig = np.full(n_docs * k, U32_MAX, dtype=np.uint32)
    np.minimum.at(sig, docs * k + bins, (g & np.uint64(0xFFFFFFFF)).astype(np.uint32))
    sig = sig.reshape(n_docs, k)
    filled = sig != U32_MAX
    has = np.zeros(n_docs, dtype=bool)
    has[docs] = True
    rows, cols = np.nonzero(~filled & has[:, None])
    # optimal densification: an empty bin copies the bin a hash of (bin, attempt)
    # points at, retried until that bin was filled by a shingle
    for attempt in range(1, 64 * k):
        if rows.size == 0:
            break
        src = (fmix64(cols.astype(np.uint64) * _MULT[125] + np.uint64(attempt))
               % np.uint64(k)).astype(np.int64)
        ok = filled[rows, src]
        sig[rows[ok], cols[ok]] = sig[rows[ok], src[ok]]
        rows, cols = rows[~ok], cols[~ok]
    return sig


def band_keys(sig: np.ndarray, bands: int, rows: int, kernel: Kernel = "auto") -> np.ndarray:
    """One uint64 key per (record, band): a hash of the band's ``rows`` values
    and the band index, so equal values in different bands never share a key."""
    # one odd multiplier per row position, however many rows a band has
    mult = fmix64(np.arange(1, rows + 1, dtype=np.uint64) * _MULT[123]) | np.uint64(1)
    native = native_kernel(kernel)
    if native is not None:
        return native.band_keys(sig, bands, rows, mult, int(_MULT[124]))
    x = sig[:, : bands * rows].astype(np.uint64).reshape(sig.shape[0], bands, rows)
    acc = ((x + np.uint64(1)) * mult).sum(axis=2, dtype=np.uint64)
    acc += np.arange(bands, dtype=np.uint64) * _MULT[124]
    return fmix64(acc)


# ---------------------------------------------------------------------------
# b-bit sketches for verification

def sketch(sig: np.ndarray, bits: int) -> np.ndarray:
    """The low ``bits`` bits of every signature value, as bytes ``(rows, k * bits / 8)``
    (4 bits: two values per byte, an odd ``k`` padded with a zero value)."""
    low = sig.astype(SKETCH_DTYPES[bits])  # astype keeps the low bits
    if bits == 4:
        low &= np.uint8(0xF)
        if low.shape[1] % 2:
            low = np.concatenate([low, np.zeros((low.shape[0], 1), np.uint8)], axis=1)
        low = low[:, 0::2] | (low[:, 1::2] << np.uint8(4))
    return np.ascontiguousarray(low).view(np.uint8).reshape(sig.shape[0], -1)


def sketch_agreements(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    """Equal values of two stacks of sketches (rows of ``sketch``), per row; with
    4 bits the padding value of an odd ``k`` agrees and is counted (subtract it)."""
    if bits == 4:
        x = a ^ b
        return ((x & np.uint8(0xF)) == 0).sum(axis=1) + ((x >> np.uint8(4)) == 0).sum(axis=1)
    dt = SKETCH_DTYPES[bits]
    return (a.view(dt) == b.view(dt)).sum(axis=1)


# ---------------------------------------------------------------------------
# the stage

class MinHashDedupParams(ClusterDedupParams):
    threshold: float = Field(0.8, gt=0, lt=1, description="Jaccard similarity above which "
                             "records are near duplicates")
    num_perm: int = Field(128, ge=2, le=1024, description="signature length")
    shingle: Literal["word", "char"] = "word"
    ngram: int = Field(5, ge=1, le=60, description="words or characters per shingle")
    normalize: bool = Field(True, description="lower-case and strip punctuation first")
    hash: Literal["fast", "sha1"] = Field("fast", description="shingle hash: numpy over the "
                                          "batch, or datasketch's sha1_hash32 (slow)")
    scheme: Literal["affine32", "legacy", "one_permutation"] = "affine32"
    hash_seed: int = Field(1, ge=0, lt=2**32, description="datasketch's MinHash seed")
    fp_weight: float = Field(0.5, ge=0, le=1, description="weight of false positives in "
                             "choosing bands and rows")
    fn_weight: float = Field(0.5, ge=0, le=1, description="weight of false negatives")
    verify: bool = Field(True, description="a candidate pair is a duplicate only when its "
                         "full signatures estimate a Jaccard of at least `threshold`, and a "
                         "record is dropped only for a kept survivor it was verified against "
                         "(false: datasketch's bands, candidates joined transitively)")
    sketch_bits: Literal[4, 8, 16, 32] = Field(8, description="bits of each signature value the "
                                            "shuffle carries for verify (b-bit minwise "
                                            "hashing): num_perm * sketch_bits / 8 bytes per band")
    margin: float = Field(0.5, ge=-3, le=3, description="verify accepts an estimated Jaccard "
                          "of at least threshold + margin standard errors of the estimate")
    bands: int | None = Field(None, ge=1, description="override the chosen bands (with rows)")
    rows: int | None = Field(None, ge=1, description="override the chosen rows (with bands)")
    kernel: Kernel = Field("auto", description="native: the C++ kernel (an error if it does "
                           "not build); numpy; auto: native when it builds, else numpy. "
                           "Same signatures either way")

    @model_validator(mode="after")
    def _check(self) -> MinHashDedupParams:
        if (self.bands is None) != (self.rows is None):
            raise ValueError("bands and rows are given together or not at all")
        if self.bands is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands * rows must be at most num_perm={self.num_perm}, got "
                             f"{self.bands} * {self.rows} = {self.bands * self.rows}")
        if self.fp_weight + self.fn_weight <= 0:
            raise ValueError("fp_weight + fn_weight must be positive")
        if self.scheme == "one_permutation" and self.hash == "sha1":
            raise ValueError("scheme one_permutation is not datasketch-compatible; use it with "
                             "hash: fast, or scheme affine32/legacy with hash: sha1")
        return self


class MinHashDedup(ClusterDedup):
    """Near-duplicate removal with MinHash LSH (see the module docstring).

    Candidates (records sharing a band) are verified on their signatures;
    records are visited best first by ``keep`` (default: the longest text,
    then the smallest row key) and one is dropped, with reason
    ``near_duplicate`` and detail ``cluster=<c> survivor=<file>:<line>``, only
    when its estimated Jaccard to a kept survivor is at least ``threshold``.
    With ``verify: false``, candidates are joined transitively and each
    cluster keeps its best member (faster, and less precise: module doc).

    Parameters
    ----------
    threshold : float
        Jaccard similarity of the shingle sets from which two records are near
        duplicates, in (0, 1).
    num_perm : int
        Signature length ``k`` (2 to 1024).
    shingle, ngram, normalize : str, int, bool
        Word or character n-grams of ``ngram`` units, after lower-casing and
        removing punctuation when ``normalize``.
    hash, scheme, hash_seed : str, str, int
        Shingle hash, signature scheme and permutation seed (module doc;
        datasketch-compatible except ``one_permutation``).
    fp_weight, fn_weight : float
        Weights of the FP and FN integrals that choose bands and rows.
    verify : bool
        Verified policy (default) or transitive LSH clusters.
    sketch_bits : int
        4, 8, 16 or 32 bits of each signature value carried for verification.
    margin : float
        Verification cut in standard errors of the estimate above ``threshold``
        (0.5: the estimate must reach about 0.82 at t = 0.8, k = 128; why:
        docs/dedup.md).
    bands, rows : int, optional
        Override the chosen banding (both or neither).
    kernel : str
        ``native``, ``numpy`` or ``auto`` (module doc).
    keep : KeepSpec
        Survivor criterion.

    Examples
    --------
    >>> import pyarrow as pa
    >>> words = [f"w{i}" for i in range(200)]
    >>> near = words[:150] + ["x"] + words[151:]
    >>> st = MinHashDedup({"threshold": 0.7})
    >>> batch = pa.table({"_key": pa.array([1, 2, 3], pa.uint64()), "id": ["a", "b", "c"],
    ...                   "text": [" ".join(words), " ".join(near), "something else"]})
    >>> state = st.resolve(st.reduce(st.keys(batch)))
    >>> st.apply(batch, state).kept.column("id").to_pylist()
    ['a', 'c']
    """

    type_name = "minhash_dedup"
    Params: ClassVar = MinHashDedupParams
    reason = "near_duplicate"

    def required_extras(self) -> tuple[str, ...]:
        """``kernel: native`` is built with torch's C++ extension tooling; ``auto`` falls
        back to numpy without it."""
        return ("torch",) if self.params.kernel == "native" else ()

    def __init__(self, params: MinHashDedupParams | dict | None = None, *,
                 name: str | None = None, seed: int = 0) -> None:
        super().__init__(params, name=name, seed=seed)
        p = self.params
        if p.bands is not None:
            self.bands, self.rows = p.bands, p.rows
        elif p.verify:
            self.bands, self.rows = verified_bands(p.threshold, p.num_perm, p.fp_weight,
                                                   p.fn_weight, p.sketch_bits, p.margin)
        else:
            self.bands, self.rows = optimal_bands(p.threshold, p.num_perm, p.fp_weight,
                                                  p.fn_weight)
        self.agreements = agreements_needed(p.threshold, p.num_perm, p.sketch_bits, p.margin)

    @property
    def pairwise(self) -> bool:
        return self.params.verify

    def setup(self) -> None:
        """Build or load the C++ kernel once per worker (the ``kernel`` parameter)."""
        self._backend = "numpy" if native_kernel(self.params.kernel) is None else "native"

    @property
    def backend(self) -> Literal["native", "numpy"]:
        """Which kernel computes shingles, signatures and band keys."""
        if not hasattr(self, "_backend"):
            self.setup()
        return self._backend

    def signatures(self, batch: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """(signatures ``(rows, num_perm)``, mask of rows that have shingles)."""
        p = self.params
        kernel = self.backend
        h, d = shingle_hashes(batch.column(self.text_column), p.shingle, p.ngram, p.normalize,
                              p.hash, kernel)
        has = np.zeros(batch.num_rows, dtype=bool)
        has[d] = True
        return signatures(h, d, batch.num_rows, p.num_perm, p.hash_seed, p.scheme, kernel), has

    def record_keys(self, batch: pa.Table) -> tuple[np.ndarray, np.ndarray, dict[str, pa.Array]]:
        keys, rows, sketches = [], [], []
        for start in range(0, batch.num_rows, SUB_BATCH):
            sub = batch.slice(start, SUB_BATCH)
            sig, has = self.signatures(sub)
            idx = np.flatnonzero(has)
            keys.append(band_keys(sig[idx], self.bands, self.rows, self.backend).ravel())
            rows.append(np.repeat(idx + start, self.bands))
            if self.params.verify:
                sketches.append(sketch(sig[idx], self.params.sketch_bits))
        keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        extra = {}
        if self.params.verify:
            width = sketch(np.zeros((1, self.params.num_perm), np.uint32),
                           self.params.sketch_bits).shape[1]
            sk = np.concatenate(sketches) if sketches else np.zeros((0, width), np.uint8)
            # one copy per band row, written once; the Arrow array wraps it without copying
            sk = np.repeat(sk, self.bands, axis=0)
            extra["sketch"] = pa.Array.from_buffers(pa.binary(width), sk.shape[0],
                                                    [None, pa.py_buffer(sk)])
        return keys, rows, extra

    def verify_pairs(self, group: pa.Table, better: np.ndarray,
                     member: np.ndarray) -> np.ndarray:
        """Pairs whose sketches agree in at least ``agreements`` of ``num_perm``
        values (estimated Jaccard >= threshold, module doc)."""
        col = group.column("sketch").combine_chunks()
        width = col.type.byte_width
        flat = np.frombuffer(col.buffers()[1], dtype=np.uint8)
        sk = flat[col.offset * width: (col.offset + len(col)) * width].reshape(len(col), width)
        bits = self.params.sketch_bits
        pad = int(bits == 4 and self.params.num_perm % 2)
        ok = np.empty(member.size, dtype=bool)
        for s in range(0, member.size, VERIFY_CHUNK):
            agree = sketch_agreements(sk[better[s: s + VERIFY_CHUNK]],
                                      sk[member[s: s + VERIFY_CHUNK]], bits) - pad
            ok[s: s + VERIFY_CHUNK] = agree >= self.agreements
        return ok
