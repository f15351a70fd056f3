"""PreSelect's score-and-select step (fastText + top_fraction by characters)
writes the same shards on the local, Dask and Beam engines."""

from __future__ import annotations

import random

import pytest
from conftest import make_text, write_jsonl

from gristmill.pipeline.recipe import parse_recipe
from gristmill.pipeline.runner import run_recipe
from gristmill.trainers.fasttext import train_fasttext

PLAIN = "river stone mill grain flour wheel water".split()
TARGET = "theorem proof lemma integral matrix vector".split()


@pytest.fixture(scope="module")
def scored_corpus(tmp_path_factory):
    rng = random.Random(3)
    root = tmp_path_factory.mktemp("preselect_engines")
    texts, labels = [], []
    for i in range(400):
        label = i % 2
        words = TARGET if label else PLAIN
        texts.append(" ".join(rng.choice(words) for _ in range(40)) + " " + make_text(rng, 20))
        labels.append(label)
    model = root / "clf.bin"
    train_fasttext(texts, labels, model, epoch=5)
    for f in range(4):
        write_jsonl(root / "corpus" / f"part-{f}.jsonl",
                    [{"id": f"{f}-{i}", "text": t} for i, t in enumerate(texts[f::4])])
    return root, model


def _select(root, model, out, **engine) -> dict:
    body = {"name": "select", "seed": 1, "sources": [{"path": str(root / "corpus")}],
            "stages": [{"stage": "fasttext", "name": "preselect", "model": str(model),
                        "label": "__label__1"},
                       {"stage": "top_fraction", "column": "preselect", "fraction": 0.3}],
            "output": {"path": str(out), "shard_size": "8KB"}, "engine": engine}
    return run_recipe(parse_recipe(body), progress=False, report=False)


def test_fasttext_selection_is_identical_on_local_dask_and_beam(scored_corpus, tmp_path):
    root, model = scored_corpus
    runs = {kind: _select(root, model, tmp_path / kind, kind=kind, workers=2)
            for kind in ("local", "dask", "beam")}
    digests = {k: [(s["rows"], s["sha256"]) for s in m["shards"]] for k, m in runs.items()}
    assert digests["local"] == digests["dask"] == digests["beam"]
    c = runs["local"]["counts"]
    assert c["read"] == 400 and c["reconciled"]
    # the classifier separates the domains, so the top 30% of characters is target text
    import pyarrow.parquet as pq

    kept = [t for s in runs["local"]["shards"]
            for t in pq.read_table(tmp_path / "local" / s["path"]).column("text").to_pylist()]
    assert sum(any(w in t for w in TARGET) for t in kept) == len(kept)
