"""Line and paragraph dedup: the counting Bloom filter, brute-force agreement, engines."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import keyed, make_text, write_jsonl
from pydantic import ValidationError

from gristmill.pipeline.recipe import parse_recipe
from gristmill.pipeline.runner import run_recipe
from gristmill.selectors.bloom import CountingBloom, bloom_size, false_positive_rate
from gristmill.selectors.unit_dedup import LineDedup, ParagraphDedup


def test_bloom_false_positive_rate_is_within_its_bound():
    n, p = 20_000, 0.01
    m, k = bloom_size(n, p)
    rng = np.random.default_rng(0)
    items = rng.integers(0, 2**63, n, dtype=np.uint64)
    bloom = CountingBloom.of(items, np.zeros(n, np.uint32), m, k).dense()
    absent = rng.integers(0, 2**63, 100_000, dtype=np.uint64)
    rate = (bloom.query(absent)[0] > 0).mean()
    bound = false_positive_rate(m, k, n)
    assert bound <= p * 1.05
    # three binomial standard deviations over the bound
    assert rate <= bound + 3 * np.sqrt(bound * (1 - bound) / absent.size), (rate, bound)
    assert (bloom.query(items)[0] >= 1).all()  # no false negatives
    report = bloom.report(n, p)
    assert abs(report["estimated_distinct_items"] - n) < 0.05 * n
    assert not report["over_capacity"]


def test_bloom_merge_is_the_same_in_any_order_and_never_undercounts():
    m, k = bloom_size(5000, 0.01)
    rng = np.random.default_rng(1)
    items = rng.integers(0, 300, 4000).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    holders = rng.integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32)
    parts = np.array_split(np.arange(4000), 7)
    blooms = [CountingBloom.of(items[i], holders[i], m, k) for i in parts]
    acc1 = blooms[0]
    for b in blooms[1:]:
        acc1 = acc1.merge(b)
    order = rng.permutation(7)
    acc2 = blooms[order[0]].dense()
    for j in order[1:]:
        acc2 = blooms[j].merge(acc2)
    acc1, acc2 = acc1.dense(), acc2.dense()
    assert np.array_equal(acc1.counts, acc2.counts) and np.array_equal(acc1.holders,
                                                                       acc2.holders)
    count, first = acc1.query(np.unique(items))
    truth = Counter(items.tolist())
    true_first = {}
    for it, h in zip(items.tolist(), holders.tolist(), strict=True):
        true_first[it] = min(h, true_first.get(it, 2**32))
    for it, c, f in zip(np.unique(items).tolist(), count, first, strict=True):
        assert c >= min(truth[it], 255) and f <= true_first[it]


def _brute_force_lines(texts: list[str], fps: list[int], max_count: int, min_chars: int):
    """Exact counting: a normalized line seen more than max_count times stays only at its
    first occurrence in the record with the smallest fingerprint."""
    norm = [[" ".join(line.split()).lower() for line in t.split("\n")] for t in texts]
    counts = Counter(u for ls in norm for u in ls if len(u) >= min_chars)
    holder: dict[str, int] = {}
    for r, ls in enumerate(norm):
        for u in ls:
            if counts.get(u, 0) > max_count and (u not in holder or fps[r] < fps[holder[u]]):
                holder[u] = r
    out = []
    for r, (t, ls) in enumerate(zip(texts, norm, strict=True)):
        kept, seen = [], set()
        for line, u in zip(t.split("\n"), ls, strict=True):
            if counts.get(u, 0) > max_count and (holder[u] != r or u in seen):
                continue
            seen.add(u)
            kept.append(line)
        out.append("\n".join(kept))
    return out


@pytest.mark.parametrize("max_count", [1, 3])
def test_line_dedup_equals_exact_counting_however_the_batches_fall(max_count):
    rng = random.Random(max_count)
    boiler = [f"Boilerplate line number {i} of the site" for i in range(6)]
    texts = []
    for _ in range(120):
        lines = [make_text(rng, rng.randint(5, 15)).replace("\n", " ") for _ in range(4)]
        lines += rng.sample(boiler, rng.randint(0, 3))
        if rng.random() < 0.2:
            lines.append(lines[0].upper())  # repeated inside one record, other case
        rng.shuffle(lines)
        texts.append("\n".join(lines))
    (batch,) = keyed(pa.table({"id": [f"r{i:03d}" for i in range(120)], "text": texts}))
    st = LineDedup({"max_count": max_count, "expected_units": 5000, "fp_rate": 1e-6})
    splits = [batch.slice(0, 37), batch.slice(37, 50), batch.slice(87)]
    state = st.finalize(st.merge(st.merge(st.summarize(splits[2]), st.summarize(splits[0])),
                                 st.summarize(splits[1])))
    got = [t for s in splits for t in st.apply(s, state).kept.column("text").to_pylist()]
    expected = _brute_force_lines(texts, st.holders(batch).tolist(), max_count, 10)
    assert got == expected
    assert sum(g != t for g, t in zip(got, texts, strict=True)) > 20  # it did remove lines


def test_a_record_left_with_too_little_is_dropped_with_the_unit_reason():
    texts = ["Same repeated paragraph here.\n\nunique words in doc one",
             "Same repeated paragraph here.\n\n\nunique words in doc two",
             "Same repeated paragraph here."]
    (batch,) = keyed(pa.table({"id": ["a", "b", "c"], "text": texts}))
    st = ParagraphDedup({"expected_units": 100, "min_remaining_chars": 5})
    out = st.apply(batch, st.finalize(st.summarize(batch)))
    holder = ["a", "b", "c"][int(np.argmin(st.holders(batch)))]
    kept = dict(zip(out.kept.column("id").to_pylist(), out.kept.column("text").to_pylist(),
                    strict=True))
    # the holder keeps the paragraph, the others lose it; c without it is empty: dropped
    assert [i for i, t in kept.items() if "Same repeated" in t] == [holder]
    assert out.kept.num_rows + out.dropped.num_rows == 3
    for rid, rest in (("a", "unique words in doc one"), ("b", "unique words in doc two")):
        assert kept[rid] == (texts["ab".index(rid)] if rid == holder else rest)
    if holder == "c":
        assert out.dropped.num_rows == 0
    else:
        assert out.dropped.column("id").to_pylist() == ["c"]
        assert out.dropped.column("reason").to_pylist() == ["mostly_repeated_paragraphs"]
        assert out.dropped.column("detail")[0].as_py() == "removed_paragraphs=1 remaining_chars=0"


def test_parameters_are_validated_naming_the_field():
    with pytest.raises(ValidationError, match="max_count"):
        LineDedup({"max_count": 0})
    with pytest.raises(ValidationError, match="fp_rate"):
        ParagraphDedup({"fp_rate": 0.9})
    with pytest.raises(ValidationError, match="min_remaining_fraction"):
        LineDedup({"min_remaining_fraction": 1.5})


def _engine_run(corpus: Path, out: Path, **engine) -> tuple[str, dict, list]:
    body = {"name": "unit-dedup", "seed": 2, "sources": [{"path": str(corpus)}],
            "stages": [{"stage": "substring_dedup", "min_tokens": 12},
                       {"stage": "paragraph_dedup", "expected_units": 2000,
                        "min_remaining_fraction": 0.3},
                       {"stage": "line_dedup", "expected_units": 5000}],
            "output": {"path": str(out), "shard_size": "16KB", "write_dropped": True},
            "engine": {"batch_size": 8, **engine}}
    m = run_recipe(parse_recipe(body), progress=False, report=False)
    kept = pa.concat_tables([pq.read_table(out / s["path"]) for s in m["shards"]])
    rows = sorted(json.dumps(r, sort_keys=True, default=str) for r in kept.to_pylist())
    bloom = json.loads((out / "artifacts" / "line_dedup" / "bloom.json").read_text())
    return (hashlib.sha256("\n".join(rows).encode()).hexdigest(), m["counts"]["stages"],
            [bloom["cells"], bloom["cells_filled"], m["counts"]["reconciled"]])


def test_local_dask_and_beam_keep_the_same_text(tmp_path):
    rng = random.Random(3)
    boiler = ["Navigation: Home | About | Contact us today", "All rights reserved, Example"]
    shared = [make_text(rng, 40) for _ in range(3)]
    for f in range(3):
        recs = []
        for i in range(20):
            paras = [make_text(rng, rng.randint(20, 60)) for _ in range(2)]
            if rng.random() < 0.5:
                paras.append(rng.choice(shared))
            text = "\n\n".join(paras) + "\n" + "\n".join(rng.sample(boiler, rng.randint(0, 2)))
            recs.append({"id": f"f{f}-{i}", "text": text})
        write_jsonl(tmp_path / "corpus" / f"part-{f}.jsonl", recs)
    local = _engine_run(tmp_path / "corpus", tmp_path / "local", kind="local", workers=1)
    by = {s["stage"]: s for s in local[1]}
    assert local[2][2] and by["substring_dedup"]["in"] == 60
    assert by["substring_dedup"]["dropped"] + by["substring_dedup"]["kept"] == 60
    dask = _engine_run(tmp_path / "corpus", tmp_path / "dask", kind="dask", workers=2)
    beam = _engine_run(tmp_path / "corpus", tmp_path / "beam", kind="beam", workers=1)
    assert local == dask == beam


def _brute_force_substrings(texts: list[str], k: int, keep: str) -> list[list[str]]:
    """Every k-gram of words inside one record, counted by brute force; the windows of
    repeated ones removed (all occurrences, or all but the first)."""
    words = [t.split() for t in texts]
    occ: dict[tuple, list[tuple[int, int]]] = {}
    for r, w in enumerate(words):
        for p in range(len(w) - k + 1):
            occ.setdefault(tuple(w[p:p + k]), []).append((r, p))
    gone = [np.zeros(len(w), bool) for w in words]
    for places in occ.values():
        if len(places) < 2:
            continue
        for r, p in (places[1:] if keep == "first" else places):
            gone[r][p:p + k] = True
    return [[x for x, g in zip(w, m, strict=True) if not g] for w, m in zip(words, gone,
                                                                           strict=True)]


@pytest.mark.parametrize("keep", ["first", "none"])
@pytest.mark.parametrize("seed", range(3))
def test_substring_dedup_equals_a_brute_force_search(keep, seed):
    from gristmill.selectors.substring_dedup import SubstringDedup

    rng = random.Random(seed)
    vocab = [f"v{i}" for i in range(12)]  # a small vocabulary: many chance repeats
    passages = [" ".join(rng.choice(vocab) for _ in range(rng.randint(6, 12)))
                for _ in range(4)]
    texts = []
    for _ in range(40):
        parts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 8)))
                 for _ in range(3)]
        if rng.random() < 0.6:
            parts.insert(rng.randrange(4), rng.choice(passages))
        texts.append("  ".join(p for p in parts if p) or "v0")
    (batch,) = keyed(pa.table({"id": [f"r{i:03d}" for i in range(40)], "text": texts}))
    k = 5
    st = SubstringDedup({"min_tokens": k, "keep": keep, "min_remaining_chars": 0})
    splits = [batch.slice(0, 13), batch.slice(13, 20), batch.slice(33)]
    state = st.finalize(st.merge(st.summarize(splits[2]),
                                 st.merge(st.summarize(splits[0]), st.summarize(splits[1]))))
    got = [t.split() for s in splits for t in st.apply(s, state).kept.column("text").to_pylist()]
    assert got == _brute_force_substrings(texts, k, keep)
    assert sum(len(g) for g in got) < sum(len(t.split()) for t in texts)


def test_substring_dedup_drops_a_record_left_too_short():
    from gristmill.selectors.substring_dedup import SubstringDedup

    shared = " ".join(f"w{i}" for i in range(60))
    (batch,) = keyed(pa.table({"id": ["a", "b"], "text": [shared + " tail words", shared]}))
    st = SubstringDedup({"min_tokens": 50, "keep": "none", "min_remaining_fraction": 0.5})
    out = st.apply(batch, st.finalize(st.summarize(batch)))
    assert out.dropped.column("id").to_pylist() == ["a", "b"]
    assert out.dropped.column("detail").to_pylist() == [
        "removed_tokens=60 remaining_chars=10", "removed_tokens=60 remaining_chars=0"]
    first = SubstringDedup({"min_tokens": 50, "min_remaining_fraction": 0.5})
    out = first.apply(batch, first.finalize(first.summarize(batch)))
    assert out.kept.column("text").to_pylist() == [shared + " tail words"]
    assert out.dropped.column("reason").to_pylist() == ["mostly_repeated_substrings"]
