"""Shared fixtures: small corpora written in the formats the readers accept."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

# one moto S3 server per session and one multi-process Dask cluster per module, on first use
from object_store_cluster import bucket, s3_dask_cluster, s3_server  # noqa: F401

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("river stone mill grain flour wheel water season harvest bread field farmer "
         "market barley oat rye storage sack wind sail tower valley morning evening").split()


def make_text(rng: random.Random, n_words: int) -> str:
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if len(line) >= rng.randint(6, 14):
            lines.append(" ".join(line) + ".")
            line = []
    if line:
        lines.append(" ".join(line) + ".")
    return "\n".join(lines)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """12 JSONL files x 40 docs, two domains, a few exact duplicates across files."""
    rng = random.Random(7)
    folder = tmp_path / "corpus"
    dup_pool = [make_text(rng, 80) for _ in range(5)]
    for f in range(12):
        recs = []
        for i in range(40):
            text = rng.choice(dup_pool) if rng.random() < 0.1 else make_text(rng, rng.randint(10, 300))
            recs.append({"id": f"f{f}-{i}", "text": text, "domain": "a" if f % 3 else "b"})
        write_jsonl(folder / f"part-{f:02d}.jsonl", recs)
    return folder


def write_recipe(path: Path, **body) -> Path:
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


@pytest.fixture
def recipe_factory(tmp_path: Path, corpus: Path):
    def make(stages: list[dict] | None = None, name: str = "r.yaml", out: str = "out",
             **extra) -> Path:
        body = {"name": "test", "seed": 3,
                "sources": [{"path": str(corpus), "fields": {"id": "id"}}],
                "stages": stages if stages is not None else [
                    {"stage": "text_stats"},
                    {"stage": "gopher", "min_words": 20},
                    {"stage": "top_fraction", "column": "text_stats_words", "fraction": 0.6},
                    {"stage": "sample", "fraction": 0.7},
                ],
                "output": {"path": str(tmp_path / out), "shard_size": "64KB",
                           "write_dropped": True},
                "engine": {"kind": "local", "workers": 1, "batch_size": 16}}
        body.update(extra)
        return write_recipe(tmp_path / name, **body)

    return make


def keyed(*batches: pa.Table) -> list[pa.Table]:
    """Give hand-built batches the pipeline's row key (as a reader would), numbered in
    the order of their ids, so "smallest id" and "smallest row key" agree in a test."""
    from gristmill.pipeline.stage import ROW_KEY

    ids = sorted({i for b in batches for i in b.column("id").to_pylist()})
    rank = {i: n for n, i in enumerate(ids)}
    return [b.append_column(ROW_KEY, pa.array([rank[i] for i in b.column("id").to_pylist()],
                                              pa.uint64())) for b in batches]


def state_by_id(state: pa.Table, batches: list[pa.Table]) -> pa.Table:
    """A dedup state (row keys) with the keys replaced by the records' ids."""
    from gristmill.pipeline.stage import ROW_KEY

    id_of = {k: i for b in batches for k, i in zip(b.column(ROW_KEY).to_pylist(),
                                                    b.column("id").to_pylist(), strict=True)}
    return pa.table({"id": [id_of[k] for k in state.column(ROW_KEY).to_pylist()],
                     "cluster": state.column("cluster"),
                     "survivor": [id_of[k] for k in state.column("survivor").to_pylist()]})
