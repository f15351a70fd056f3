"""The local, Dask and Beam engines run the same stages to the same output."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_text, write_jsonl

from gristmill.pipeline.recipe import RecipeError, parse_recipe
from gristmill.pipeline.runner import run_recipe

STAGES = [
    {"stage": "exact_dedup"},
    {"stage": "minhash_dedup", "threshold": 0.7, "ngram": 3},
    {"stage": "text_stats"},
    {"stage": "gopher", "min_words": 20},
    {"stage": "top_fraction", "column": "text_stats_words", "fraction": 0.8},
    {"stage": "sample", "fraction": 0.8},
]


@pytest.fixture(scope="module")
def dup_corpus(tmp_path_factory) -> Path:
    """6 files x 30 docs with exact duplicates and near duplicates across files."""
    rng = random.Random(11)
    folder = tmp_path_factory.mktemp("engines") / "corpus"
    exact = [make_text(rng, 120) for _ in range(4)]
    near = [make_text(rng, 150).split(" ") for _ in range(6)]
    for f in range(6):
        recs = []
        for i in range(30):
            u = rng.random()
            if u < 0.12:
                text = rng.choice(exact)
            elif u < 0.35:
                words = list(rng.choice(near))
                words[rng.randrange(len(words))] = "changed"
                text = " ".join(words)
            else:
                text = make_text(rng, rng.randint(10, 250))
            recs.append({"id": f"f{f}-{i:02d}", "text": text, "domain": "ab"[f % 2]})
        write_jsonl(folder / f"part-{f}.jsonl", recs)
    # bad input travels the rejects path on every engine: broken lines, a truncated file
    good = json.dumps({"id": "bad-ok", "text": make_text(rng, 60)})
    (folder / "part-bad.jsonl").write_text(good + "\n{not json\n" + '{"id": "x", "text": 5}\n')
    body = "".join(json.dumps({"id": f"gz-{i}", "text": make_text(rng, 60)}) + "\n"
                   for i in range(40)).encode()
    (folder / "part-cut.jsonl.gz").write_bytes(gzip.compress(body)[:-200])
    return folder


def _run(corpus: Path, out: Path, **engine) -> dict:
    body = {"name": "engines", "seed": 5, "sources": [{"path": str(corpus)}],
            "stages": STAGES,
            "output": {"path": str(out), "shard_size": "16KB", "write_dropped": True},
            "engine": {"batch_size": 16, **engine}}
    return run_recipe(parse_recipe(body), progress=False, report=False)


def _summary(out: Path, manifest: dict) -> dict:
    kept = pa.concat_tables([pq.read_table(out / s["path"]) for s in manifest["shards"]])
    rows = sorted(json.dumps(r, sort_keys=True, default=str) for r in kept.to_pylist())
    dropped = pa.concat_tables([pq.read_table(out / f) for f in manifest["dropped"]])
    return {
        "kept_ids": sorted(kept.column("id").to_pylist()),
        "content": hashlib.sha256("\n".join(rows).encode()).hexdigest(),
        "dropped": sorted(map(tuple, zip(*dropped.to_pydict().values(), strict=True))),
        "stages": manifest["counts"]["stages"],
        "shard_rows": [s["rows"] for s in manifest["shards"]],
        "files": manifest["files"],
        "rejects": [(out / f).read_text() for f in manifest["rejects"]],
        "reconciled": manifest["counts"]["reconciled"],
        # what the report shows: the same samples, distributions and clusters everywhere,
        # and a time for every stage
        "observed": {k: v for k, v in json.loads((out / "stats.json").read_text()).items()
                     if k in ("samples", "columns", "clusters")},
        "timed": sorted({s["stage"] for s in STAGES} & {t["stage"] for t in
                                                         manifest["timings"]["stages"]}),
    }


@pytest.fixture(scope="module")
def local_result(dup_corpus, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("local") / "out"
    return _summary(out, _run(dup_corpus, out, kind="local", workers=1, shuffle_partitions=1))


def test_local_run_removes_exact_and_near_duplicates(local_result):
    by = {s["stage"]: s for s in local_result["stages"]}
    assert by["exact_dedup"]["dropped_by_reason"]["exact_duplicate"] > 5
    assert by["minhash_dedup"]["dropped_by_reason"]["near_duplicate"] > 5
    reasons = {d[3] for d in local_result["dropped"]}
    assert {"exact_duplicate", "near_duplicate"} <= reasons
    assert len(local_result["rejects"]) == 2 and local_result["reconciled"]
    assert {f["status"] for f in local_result["files"]} == {"ok", "truncated"}
    assert local_result["timed"] == sorted(s["stage"] for s in STAGES)
    assert set(local_result["observed"]["clusters"]) == {"exact_dedup", "minhash_dedup"}


def test_dask_local_cluster_gives_the_local_engine_output(dup_corpus, tmp_path, local_result):
    out = tmp_path / "out"
    got = _summary(out, _run(dup_corpus, out, kind="dask", workers=2, shuffle_partitions=5))
    assert got == local_result


@pytest.fixture(scope="module")
def dask_scheduler():
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None, host="127.0.0.1") as cluster:
        yield cluster.scheduler_address


def test_dask_on_a_given_scheduler_gives_the_local_engine_output(dup_corpus, tmp_path,
                                                                local_result, dask_scheduler):
    out = tmp_path / "out"
    got = _summary(out, _run(dup_corpus, out, kind="dask", scheduler=dask_scheduler,
                             shuffle_partitions=3))
    assert got == local_result


def test_rerun_on_a_long_lived_dask_cluster_does_not_reuse_old_states(dup_corpus, tmp_path,
                                                                     dask_scheduler):
    # same output folder, other input: workers must not serve the first run's cached states
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for f in sorted(dup_corpus.glob("part-[0-3].jsonl")):
        (fewer / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "out"
    _run(dup_corpus, out, kind="dask", scheduler=dask_scheduler)
    body = {"name": "engines", "seed": 5, "sources": [{"path": str(fewer)}], "stages": STAGES,
            "output": {"path": str(out), "shard_size": "16KB", "write_dropped": True},
            "engine": {"batch_size": 16, "kind": "dask", "scheduler": dask_scheduler}}
    got = _summary(out, run_recipe(parse_recipe(body), fresh=True, progress=False, report=False))
    ref_out = tmp_path / "ref"
    want = _summary(ref_out, _run(fewer, ref_out, kind="local"))
    assert got == want


def test_beam_in_process_gives_the_local_engine_output(dup_corpus, tmp_path, local_result):
    out = tmp_path / "out"
    got = _summary(out, _run(dup_corpus, out, kind="beam", workers=1, shuffle_partitions=3))
    assert got == local_result


def test_beam_multiprocess_workers_give_the_local_engine_output(dup_corpus, tmp_path,
                                                               local_result):
    out = tmp_path / "out"
    got = _summary(out, _run(dup_corpus, out, kind="beam", workers=2, shuffle_partitions=2))
    assert got == local_result


def test_beam_bundle_based_runner_gives_the_local_engine_output(dup_corpus, tmp_path,
                                                               local_result):
    out = tmp_path / "out"
    got = _summary(out, _run(dup_corpus, out, kind="beam", runner="bundle_based",
                             shuffle_partitions=4))
    assert got == local_result


def test_beam_runner_that_downloads_a_binary_is_refused(dup_corpus, tmp_path):
    with pytest.raises(RecipeError, match="engine.runner"):
        _run(dup_corpus, tmp_path / "out", kind="beam", runner="DirectRunner")
