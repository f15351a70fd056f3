"""Row-local selectors: each Gopher rule's reason, sample determinism, top_fraction cut."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from gristmill.pipeline.stage import merge_all
from gristmill.selectors.filters import GopherFilter, LengthFilter
from gristmill.selectors.sample import Sample
from gristmill.selectors.top_fraction import TopFraction

GOOD = "\n".join(f"the farmer carries grain to the mill on day {i} of the season" for i in range(8))

CASES = {
    "word_count": "too few words here",
    "mean_word_length": " ".join(["a"] * 60),
    "symbol_word_ratio": " ".join(["#tag word"] * 40),
    "ellipsis_lines": "\n".join(f"line number {i} trails off with many more words to say ..."
                                 for i in range(20)),
    "duplicate_lines": "\n".join(["the same line of text repeated again"] * 20),
    "alpha_words": " ".join(["1234 5678 9012 word"] * 20),
}


@pytest.mark.parametrize("rule", list(CASES))
def test_each_gopher_rule_drops_with_its_name(rule):
    f = GopherFilter({"min_words": 50})
    batch = pa.table({"id": ["good", "bad"], "text": [GOOD, CASES[rule]]})
    out = f.process(batch)
    assert out.kept.column("id").to_pylist() == ["good"]
    assert out.dropped.column("reason").to_pylist() == [rule]
    assert out.dropped.column("stage").to_pylist() == ["gopher"]
    assert out.dropped.column("detail").to_pylist()[0].startswith(f"{rule}=")


def test_gopher_parameters_are_validated_with_their_names():
    with pytest.raises(ValidationError, match="min_words"):
        GopherFilter({"min_words": 100, "max_words": 10})
    with pytest.raises(ValidationError, match="max_ellipsis_line_fraction"):
        GopherFilter({"max_ellipsis_line_fraction": 1.5})


def test_length_filter_reasons():
    out = LengthFilter({"min_chars": 3, "max_chars": 5}).process(
        pa.table({"id": ["a", "b", "c"], "text": ["x", "abcd", "abcdefgh"]}))
    assert out.kept.column("id").to_pylist() == ["b"]
    assert out.dropped.column("reason").to_pylist() == ["too_short", "too_long"]


def test_sample_depends_on_seed_and_id_not_on_batching():
    ids = [f"doc-{i}" for i in range(4000)]
    s = Sample({"fraction": 0.25}, seed=11)
    whole = s.process(pa.table({"id": ids})).kept.column("id").to_pylist()
    parts = []
    for chunk in (ids[:1234], ids[1234:3000], ids[3000:]):
        parts += s.process(pa.table({"id": chunk})).kept.column("id").to_pylist()
    assert whole == parts
    assert abs(len(whole) / 4000 - 0.25) < 0.03
    other = Sample({"fraction": 0.25}, seed=12).process(pa.table({"id": ids}))
    assert other.kept.column("id").to_pylist() != whole


def test_top_fraction_matches_brute_force_and_is_order_independent():
    rng = np.random.default_rng(0)
    n = 500
    texts = ["x" * int(k) for k in rng.integers(1, 200, n)]
    scores = rng.normal(size=n).round(1)  # many ties
    batch = pa.table({"id": [f"d{i}" for i in range(n)], "text": texts, "s": scores})
    st = TopFraction({"column": "s", "fraction": 0.4}, seed=5)
    halves = [batch.slice(0, 200), batch.slice(200)]
    a = st.finalize(merge_all(st, [st.summarize(h) for h in halves]))
    b = st.finalize(merge_all(st, [st.summarize(h) for h in halves[::-1]]))
    assert a == b
    kept = pa.concat_tables([st.apply(h, a).kept for h in halves])
    chars = [len(t) for t in kept.column("text").to_pylist()]
    total = sum(len(t) for t in texts)
    # the kept set is a score-ordered prefix that reaches 40% of the characters...
    assert sum(chars) >= 0.4 * total
    kept_ids = set(kept.column("id").to_pylist())
    kept_scores = kept.column("s").to_pylist()
    dropped_scores = [s for i, s in enumerate(scores) if f"d{i}" not in kept_ids]
    assert min(kept_scores) >= max(dropped_scores)
    # ...and the shortest one: without its last (lowest-scored) record it falls short
    lowest = [c for c, s in zip(chars, kept_scores, strict=True) if s == min(kept_scores)]
    assert any(sum(chars) - c < 0.4 * total for c in lowest)


def test_top_fraction_min_order_keeps_lowest():
    batch = pa.table({"id": ["a", "b", "c", "d"], "text": ["xx"] * 4, "s": [4.0, 1.0, 3.0, 2.0]})
    st = TopFraction({"column": "s", "fraction": 0.5, "order": "min"})
    out = st.apply(batch, st.finalize(st.summarize(batch)))
    assert sorted(out.kept.column("id").to_pylist()) == ["b", "d"]
