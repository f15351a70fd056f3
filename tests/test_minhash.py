"""MinHash near dedup: datasketch compatibility, LSH parameters, accuracy vs brute force."""

from __future__ import annotations

import itertools
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pytest
from conftest import keyed, state_by_id
from datasketch import LeanMinHash, MinHash, MinHashLSH
from datasketch.lsh import _optimal_param
from pydantic import ValidationError
from scipy.sparse import csr_matrix

from gristmill.pipeline.execution import partition_keys
from gristmill.selectors.dedup import best_first_survivors
from gristmill.selectors.minhash import (
    MinHashDedup,
    _normalize,
    agreements_needed,
    optimal_bands,
    shingle_hashes,
    signatures,
    sketch,
    sketch_agreements,
    verified_bands,
)

RNG_TEXTS = np.random.RandomState(5)
TEXTS = [" ".join(f"w{RNG_TEXTS.randint(0, 3000)}" for _ in range(RNG_TEXTS.randint(0, 40)))
         for _ in range(25)] + ["a b", "Hello, World! hello world, again and AGAIN.", "", "x"]


def _datasketch_shingles(text: str, shingle: str, n: int) -> list[bytes]:
    words = _normalize(pa.array([text]), True)[0].as_py().split()
    s = " ".join(words)
    if shingle == "word":
        return [" ".join(words[i:i + n]).encode() for i in range(max(len(words) - n + 1, 1))
                if words]
    return [s[i:i + n].encode() for i in range(max(len(s) - n + 1, 1)) if s]


@pytest.mark.parametrize("scheme", ["affine32", "legacy"])
@pytest.mark.parametrize("shingle", ["word", "char"])
def test_sha1_signatures_equal_datasketch_minhash_update(scheme, shingle):
    h, d = shingle_hashes(pa.array(TEXTS), shingle, 5, True, "sha1")
    sig = signatures(h, d, len(TEXTS), 64, seed=7, scheme=scheme)
    for i, text in enumerate(TEXTS):
        m = MinHash(num_perm=64, seed=7, scheme=scheme)
        for g in _datasketch_shingles(text, shingle, 5):
            m.update(g)
        assert np.array_equal(m.hashvalues.astype(np.uint64), sig[i].astype(np.uint64)), i


@pytest.mark.parametrize("scheme", ["affine32", "legacy"])
def test_fast_hash_signatures_equal_datasketch_fed_the_same_shingle_hashes(scheme):
    h, d = shingle_hashes(pa.array(TEXTS), "word", 3, True, "fast")
    sig = signatures(h, d, len(TEXTS), 32, seed=3, scheme=scheme)
    for i in range(len(TEXTS)):
        m = MinHash(num_perm=32, seed=3, scheme=scheme, hashfunc=int)
        for v in h[d == i]:
            m.update(int(v))
        assert np.array_equal(m.hashvalues.astype(np.uint64), sig[i].astype(np.uint64)), i


def test_fast_and_sha1_hashes_shingle_the_same_words_and_skip_empty_texts():
    texts = pa.array(TEXTS + [None, "... !!", " - "])
    for shingle in ("word", "char"):
        _, fast_docs = shingle_hashes(texts, shingle, 3, True, "fast")
        _, sha1_docs = shingle_hashes(texts, shingle, 3, True, "sha1")
        fast_n = np.bincount(fast_docs, minlength=len(texts))
        assert np.array_equal(fast_n, np.bincount(sha1_docs, minlength=len(texts)))
        assert fast_n[len(TEXTS) - 2] == 0 and fast_n[-3:].sum() == 0  # "", None, punctuation


def test_normalization_keeps_accented_and_non_latin_words():
    text = "Café naïve 東京 Tower, ok!\u00a0done"
    words = _normalize(pa.array([text]), True)[0].as_py().split()
    assert words == ["café", "naïve", "東京", "tower", "ok", "done"]
    h, d = shingle_hashes(pa.array([text, "caf nave tower ok done"]), "word", 1)
    assert set(h[d == 0]) != set(h[d == 1])


def test_signatures_load_into_datasketch_lsh_and_find_the_near_duplicate():
    base = [f"tok{i}" for i in range(300)]
    near = base[:100] + ["changed"] + base[101:]
    texts = [" ".join(base), " ".join(near), " ".join(f"other{i}" for i in range(300))]
    h, d = shingle_hashes(pa.array(texts), "word", 5, True, "sha1")
    sig = signatures(h, d, 3, 128, seed=1, scheme="affine32")
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    for i in range(3):
        lsh.insert(str(i), LeanMinHash(seed=1, hashvalues=sig[i], scheme="affine32"))
    query = MinHash(num_perm=128)
    for g in _datasketch_shingles(texts[1], "word", 5):
        query.update(g)
    assert sorted(lsh.query(query)) == ["0", "1"]


def test_optimal_bands_match_datasketch_optimal_param():
    for threshold in (0.5, 0.7, 0.8, 0.9):
        for num_perm in (64, 128, 256):
            for w in ((0.5, 0.5), (0.3, 0.7)):
                assert optimal_bands(threshold, num_perm, *w) == _optimal_param(
                    threshold, num_perm, *w)


def test_one_permutation_agreement_estimates_jaccard():
    rng = np.random.RandomState(0)
    base = rng.randint(0, 10**6, 3000)
    other = base.copy()
    other[:1000] = rng.randint(0, 10**6, 1000)
    texts = [" ".join(map(str, base)), " ".join(map(str, other))]
    h, d = shingle_hashes(pa.array(texts), "word", 1)
    a, b = set(h[d == 0]), set(h[d == 1])
    jaccard = len(a & b) / len(a | b)
    sig = signatures(h, d, 2, 512, scheme="one_permutation")
    assert abs((sig[0] == sig[1]).mean() - jaccard) < 0.06


def test_bad_parameters_are_rejected_naming_the_field():
    with pytest.raises(ValidationError, match="bands and rows"):
        MinHashDedup({"bands": 4})
    with pytest.raises(ValidationError, match="num_perm=64"):
        MinHashDedup({"num_perm": 64, "bands": 10, "rows": 10})
    with pytest.raises(ValidationError, match="threshold"):
        MinHashDedup({"threshold": 1.5})
    with pytest.raises(ValidationError, match="one_permutation"):
        MinHashDedup({"scheme": "one_permutation", "hash": "sha1"})


def _planted_corpus(families: int = 300, seed: int = 0) -> tuple[list[str], list[str]]:
    """Each family: a 200-word base and 1-2 variants with a random 0.3-8% of words
    replaced, which puts 5-gram Jaccard similarities between about 0.5 and 0.98."""
    rng = np.random.RandomState(seed)
    ids, texts = [], []
    for f in range(families):
        base = rng.randint(0, 10**6, 200)
        ids.append(f"f{f}-0")
        texts.append(" ".join(f"t{w}" for w in base))
        for v in range(rng.randint(1, 3)):
            var = base.copy()
            m = rng.rand(200) < rng.uniform(0.003, 0.08)
            var[m] = rng.randint(0, 10**6, m.sum())
            ids.append(f"f{f}-{v + 1}")
            texts.append(" ".join(f"t{w}" for w in var))
    return ids, texts


def _exact_jaccard_of_all_pairs(texts: list[str], n: int = 5) -> dict[tuple[int, int], float]:
    """Brute force: shingle sets, all pairwise intersections as a sparse product."""
    vocab: dict[str, int] = {}
    rows, cols, sizes = [], [], []
    for i, t in enumerate(texts):
        w = t.split()
        grams = {" ".join(w[j:j + n]) for j in range(len(w) - n + 1)}
        sizes.append(len(grams))
        for g in grams:
            rows.append(i)
            cols.append(vocab.setdefault(g, len(vocab)))
    x = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(texts), len(vocab)))
    inter = (x @ x.T).tocoo()
    keep = inter.row < inter.col
    return {(int(a), int(b)): c / (sizes[a] + sizes[b] - c)
            for a, b, c in zip(inter.row[keep], inter.col[keep], inter.data[keep], strict=True)}


@pytest.mark.parametrize("scheme", ["affine32", "one_permutation"])
def test_near_duplicate_clusters_match_brute_force_jaccard(scheme):
    threshold = 0.8
    ids, texts = _planted_corpus()
    jac = _exact_jaccard_of_all_pairs(texts)
    values = np.array(list(jac.values()))
    assert ((values > 0.5) & (values < 0.98)).sum() > 300  # the planted range is covered
    st = MinHashDedup({"threshold": threshold, "num_perm": 256, "fp_weight": 0.3,
                       "fn_weight": 0.7, "verify": True, "scheme": scheme})
    (batch,) = keyed(pa.table({"id": ids, "text": texts}))
    halves = [batch.slice(0, 300), batch.slice(300)]
    keys = pa.concat_tables([st.keys(b) for b in halves])
    raw_state = st.resolve(pa.concat_tables([st.reduce(p) for p in partition_keys(keys, 4)]))
    state = state_by_id(raw_state, [batch])
    index = {i: n for n, i in enumerate(ids)}
    members = defaultdict(list)
    for dropped, survivor in zip(state.column("id").to_pylist(),
                                 state.column("survivor").to_pylist(), strict=True):
        members[index[survivor]].append(index[dropped])
    found = set()
    for survivor, dropped in members.items():
        found.update(itertools.combinations(sorted([survivor, *dropped]), 2))
    truth = [p for p, j in jac.items() if j >= threshold + 0.05]
    recall = sum(p in found for p in truth) / len(truth)
    precision = sum(jac.get(p, 0.0) >= threshold for p in found) / len(found)
    assert recall >= 0.95, recall
    assert precision >= 0.9, precision
    # every record is kept or dropped in favour of a kept survivor
    outs = [st.apply(b, raw_state) for b in halves]
    kept = {i for o in outs for i in o.kept.column("id").to_pylist()}
    assert kept.isdisjoint(state.column("id").to_pylist())
    assert set(state.column("survivor").to_pylist()) <= kept
    assert {r for o in outs for r in o.dropped.column("reason").to_pylist()} == {"near_duplicate"}


def test_bands_with_many_rows_key_and_find_identical_texts():
    # a high threshold chooses few bands of many rows (more rows than 128)
    st = MinHashDedup({"threshold": 0.99, "num_perm": 512, "verify": False})
    assert st.rows > 128
    text = " ".join(f"w{i}" for i in range(300))
    (batch,) = keyed(pa.table({"id": ["a", "b", "c"],
                               "text": [text, text + " x", "other words here"]}))
    state = state_by_id(st.resolve(st.reduce(st.keys(batch))), [batch])
    assert state.column("id").to_pylist() == ["a"]


def test_survivor_is_the_longest_member_then_the_smallest_id():
    words = [f"w{i}" for i in range(100)]
    texts = [" ".join(words), " ".join(words) + " tail", " ".join(words) + " end!"]
    st = MinHashDedup({"threshold": 0.5})
    (batch,) = keyed(pa.table({"id": ["c", "b", "a"], "text": texts}))
    state = state_by_id(st.resolve(st.reduce(st.keys(batch))), [batch])
    # "b" and "a" tie on length (105 characters), the smaller id wins
    assert state.column("id").to_pylist() == ["b", "c"]
    assert set(state.column("survivor").to_pylist()) == {"a"}


def _shingle_jaccard(a: str, b: str, n: int = 5) -> float:
    def grams(t: str) -> set[str]:
        w = t.split()
        return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}
    x, y = grams(a), grams(b)
    return len(x & y) / len(x | y)


def _run(st: MinHashDedup, batch: pa.Table, partitions: int = 3) -> pa.Table:
    keys = st.keys(batch)
    return st.resolve(pa.concat_tables([st.reduce(p) for p in partition_keys(keys, partitions)]))


def test_verified_policy_never_drops_through_a_chain_that_transitive_clusters_do():
    # A ~ B (J = 0.77) and B ~ C (0.77), but J(A, C) = 0.59: below the threshold
    words = [f"w{i}" for i in range(300)]
    texts = [" ".join(words[s: s + 200]) for s in (0, 25, 50)]
    assert _shingle_jaccard(texts[0], texts[1]) > 0.75 > 0.6 > _shingle_jaccard(texts[0],
                                                                                 texts[2])
    (batch,) = keyed(pa.table({"id": ["a", "b", "c"], "text": texts, "q": [3.0, 2.0, 1.0]}))
    params = {"threshold": 0.7, "num_perm": 512, "keep": {"column": "q"}}
    state = state_by_id(_run(MinHashDedup(params), batch), [batch])
    assert state.column("id").to_pylist() == ["b"]
    assert state.column("survivor").to_pylist() == ["a"]
    # the transitive policy (verify: false), with bands that surely pair a-b and b-c,
    # drops c for a through b
    old = state_by_id(_run(MinHashDedup({**params, "verify": False, "bands": 64, "rows": 8}),
                           batch), [batch])
    assert old.column("id").to_pylist() == ["b", "c"]
    assert set(old.column("survivor").to_pylist()) == {"a"}


def test_every_dropped_record_is_verified_against_a_kept_survivor_on_long_chains():
    # 40 windows of one word stream, 10 words apart: neighbours J = 0.90, five apart 0.59
    threshold, k = 0.7, 512
    words = [f"w{i}" for i in range(700)]
    texts = [" ".join(words[10 * i: 10 * i + 200]) for i in range(40)]
    rng = np.random.RandomState(1)
    ids = [f"d{i:02d}" for i in range(40)]
    (batch,) = keyed(pa.table({"id": ids, "text": texts, "q": rng.permutation(40).astype(float)}))
    st = MinHashDedup({"threshold": threshold, "num_perm": k, "keep": {"column": "q"}})
    state = state_by_id(_run(st, batch), [batch])
    dropped = state.column("id").to_pylist()
    survivors = state.column("survivor").to_pylist()
    kept = set(ids) - set(dropped)
    assert 0 < len(dropped) < 40 and set(survivors) <= kept
    h, d = shingle_hashes(pa.array(texts), "word", 5)
    sig = signatures(h, d, len(texts), k, 1, "affine32")
    for a, b in zip(dropped, survivors, strict=True):
        i, j = ids.index(a), ids.index(b)
        assert (sig[i].astype(np.uint8) == sig[j].astype(np.uint8)).sum() >= st.agreements
        assert _shingle_jaccard(texts[i], texts[j]) >= threshold - 0.05
    # greedy best first: no two kept records are verified duplicates of each other
    kept_idx = sorted(ids.index(i) for i in kept)
    for i, j in itertools.combinations(kept_idx, 2):
        assert _shingle_jaccard(texts[i], texts[j]) < threshold + 0.05


def _sequential_survivors(score, better, worse):
    n = len(score)
    order = sorted(range(n), key=lambda i: (-score[i], i))
    nbrs = defaultdict(set)
    for u, v in zip(better, worse, strict=True):
        nbrs[u].add(v)
        nbrs[v].add(u)
    rank = {v: r for r, v in enumerate(order)}
    survivor = list(range(n))
    kept = set()
    for v in order:
        up = sorted((u for u in nbrs[v] if rank[u] < rank[v] and u in kept), key=rank.get)
        if up:
            survivor[v] = up[0]
        else:
            kept.add(v)
    return survivor


@pytest.mark.parametrize("seed", range(4))
def test_best_first_survivors_equal_a_sequential_visit(seed):
    rng = np.random.RandomState(seed)
    n = 300 if seed < 3 else 200
    score = rng.randint(0, 20, n).astype(float)
    if seed < 3:
        better, worse = rng.randint(0, n, 900), rng.randint(0, n, 900)
        keep = better != worse
        better, worse = better[keep], worse[keep]
    else:  # one path in rank order: 200 rounds, past MAX_ROUNDS, ends in the loop
        score = np.arange(n, 0, -1).astype(float)
        better, worse = np.arange(n - 1), np.arange(1, n)
    got = best_first_survivors(score, better, worse)
    assert got.tolist() == _sequential_survivors(score, better.tolist(), worse.tolist())


def test_verified_bands_are_more_permissive_than_datasketch_and_minimize_the_objective():
    assert verified_bands(0.8, 128) == (17, 7)
    for t in (0.5, 0.7, 0.8, 0.9):
        vb, vr = verified_bands(t, 128)
        db, dr = optimal_bands(t, 128)
        assert 1 - (1 - t ** vr) ** vb > 1 - (1 - t ** dr) ** db  # catches more at t
    assert agreements_needed(0.8, 128, 32) == 103  # ceil(0.8 * 128) = 103
    assert agreements_needed(0.8, 128, 8) == 103  # 0.8 + 0.2 / 256: still 103 of 128
    # half a standard error (0.0177) above: ceil(128 * 0.8177) = 105
    assert agreements_needed(0.8, 128, 32, margin=0.5) == 105
    # 4 bits: c = 1/16 inflates the error; ceil(128 * 0.8359) = 107
    assert agreements_needed(0.8, 128, 4, margin=0.5) == 107


@pytest.mark.parametrize("bits", [4, 8, 16, 32])
@pytest.mark.parametrize("k", [127, 128])
def test_sketch_agreements_count_equal_low_bits(bits, k):
    rng = np.random.RandomState(bits + k)
    a = rng.randint(0, 2**32, (50, k), dtype=np.uint64).astype(np.uint32)
    b = a.copy()
    b[rng.rand(50, k) < 0.3] ^= np.uint32(1 << (bits - 1))  # flips a kept bit
    b[rng.rand(50, k) < 0.3] ^= np.uint32(1 << 31) if bits < 32 else np.uint32(0)  # a dropped one
    mask = np.uint64((1 << bits) - 1)
    expected = ((a.astype(np.uint64) & mask) == (b.astype(np.uint64) & mask)).sum(axis=1)
    pad = int(bits == 4 and k % 2)
    got = sketch_agreements(sketch(a, bits), sketch(b, bits), bits) - pad
    assert sketch(a, bits).shape[1] == -(-k * bits // 8)
    assert np.array_equal(got, expected)
