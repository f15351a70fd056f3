"""End to end through the local engine: counts, manifest, workers, resume, lock, report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gristmill.pipeline.recipe import RecipeError
from gristmill.pipeline.runner import OutputLock, OutputLocked, run_recipe
from gristmill.pipeline.writers import sha256_file


def _kept_ids(out: Path) -> list[str]:
    tables = [pq.read_table(p) for p in sorted((out / "shards").glob("*.parquet"))]
    return pa.concat_tables(tables).column("id").to_pylist()


def _shard_digests(manifest: dict) -> list[tuple[str, int, str]]:
    return [(s["path"], s["rows"], s["sha256"]) for s in manifest["shards"]]


def test_counts_reconcile_and_manifest_describes_shards(recipe_factory, tmp_path):
    m = run_recipe(recipe_factory(), progress=False)
    out = tmp_path / "out"
    c = m["counts"]
    assert c["read"] == 480 and c["rejected"] == 0
    assert c["read"] == c["kept"] + c["dropped"] + c["rejected"] and c["reconciled"]
    by_stage = {s["stage"]: s for s in c["stages"]}
    assert by_stage["text_stats"]["dropped"] == 0
    assert by_stage["gopher"]["in"] == 480
    assert set(by_stage["gopher"]["dropped_by_reason"]) <= {"word_count", "duplicate_lines"}
    assert by_stage["top_fraction"]["in"] == by_stage["gopher"]["kept"]
    assert by_stage["sample"]["kept"] == c["kept"]
    # each stage's input is the previous stage's output
    stages = c["stages"]
    for a, b in zip(stages, stages[1:], strict=False):
        assert b["in"] == a["kept"]
    assert len(m["shards"]) > 1  # 64KB cap forces several shards
    for s in m["shards"]:
        p = out / s["path"]
        assert p.stat().st_size == s["bytes"] and sha256_file(p) == s["sha256"]
        assert pq.read_metadata(p).num_rows == s["rows"]
        assert pq.read_metadata(p).row_group(0).column(0).compression == "ZSTD"
    assert sum(s["rows"] for s in m["shards"]) == c["kept"]
    names = [f["name"] for f in m["schema"]]
    assert names[:4] == ["id", "text", "domain", "source"] and "text_stats_words" in names
    assert m["recipe"]["stages"][1]["stage"] == "gopher" and len(m["fingerprint"]) == 64
    # the dropped audit has one row per drop, with stage and reason
    dropped = pa.concat_tables([pq.read_table(out / f) for f in m["dropped"]])
    assert dropped.num_rows == c["dropped"]
    assert set(dropped.column("stage").to_pylist()) == {"gopher", "top_fraction", "sample"}
    assert not set(dropped.column("id").to_pylist()) & set(_kept_ids(out))
    assert not (out / "_work").exists() and not (out / ".gristmill.lock").exists()


def test_top_fraction_keeps_the_exact_character_prefix(recipe_factory, tmp_path):
    m = run_recipe(recipe_factory([{"stage": "text_stats"},
                                   {"stage": "top_fraction", "column": "text_stats_words",
                                    "fraction": 0.3}]), progress=False)
    out = tmp_path / "out"
    kept = pa.concat_tables([pq.read_table(out / s["path"]) for s in m["shards"]])
    dropped = pa.concat_tables([pq.read_table(out / f) for f in m["dropped"]])
    assert kept.num_rows + dropped.num_rows == 480
    assert set(dropped.column("reason").to_pylist()) == {"below_threshold"}
    chars = sum(len(t) for t in kept.column("text").to_pylist())
    thr = json.loads((out / "artifacts/top_fraction/threshold.json").read_text())
    assert thr["kept_weight"] == chars
    # the cut is the first point where cumulative characters reach 30%
    assert chars >= 0.3 * thr["total_weight"]
    assert min(kept.column("text_stats_words").to_pylist()) >= thr["threshold"]


def test_workers_one_and_many_write_identical_output(recipe_factory):
    one = run_recipe(recipe_factory(out="o1"), progress=False)
    many = run_recipe(recipe_factory(out="o3", name="r3.yaml",
                                     engine={"kind": "local", "workers": 3, "batch_size": 16}),
                      progress=False)
    assert _shard_digests(one) == _shard_digests(many)
    assert one["counts"] == many["counts"]


def test_rejects_are_written_and_counted(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "fine text here"}\n{"text": \n{"text": null}\n\xff\n')
    (tmp_path / "r.yaml").write_text(f"sources: [{{path: {src}}}]\noutput: {{path: {tmp_path}/out}}\n")
    m = run_recipe(tmp_path / "r.yaml", progress=False)
    assert m["counts"]["read"] == 4 and m["counts"]["rejected"] == 3 and m["counts"]["kept"] == 1
    rejects = [json.loads(line) for f in m["rejects"]
               for line in (tmp_path / "out" / f).read_text().splitlines()]
    assert sorted(r["line"] for r in rejects) == [2, 3, 4]
    assert {r["source"] for r in rejects} == {str(src)}


def test_second_run_into_a_locked_output_refuses(recipe_factory, tmp_path):
    recipe = recipe_factory()
    with OutputLock(tmp_path / "out"):
        with pytest.raises(OutputLocked, match="in use by another gristmill run"):
            run_recipe(recipe, progress=False)
    assert not (tmp_path / "out" / "shards").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(recipe_factory, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "out" / ".gristmill.lock"
    lock.parent.mkdir(parents=True)
    import socket

    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    m = run_recipe(recipe_factory(), progress=False)
    assert m["counts"]["reconciled"] and not lock.exists()


def test_changed_recipe_into_same_output_refuses_without_fresh(recipe_factory):
    run_recipe(recipe_factory(), progress=False)
    changed = recipe_factory([{"stage": "sample", "fraction": 0.5}], name="r2.yaml")
    with pytest.raises(RecipeError, match="--fresh"):
        run_recipe(changed, progress=False)
    m = run_recipe(changed, fresh=True, progress=False)
    assert m["recipe"]["stages"][0]["stage"] == "sample"


def test_report_and_stats_are_written(recipe_factory, tmp_path):
    run_recipe(recipe_factory(), progress=False)
    out = tmp_path / "out"
    html = (out / "report.html").read_text()
    for section in ("funnel", "lengths", "domains"):  # inline SVG charts, no images
        assert f'<section id="{section}">' in html
    assert html.count("<svg ") >= 3 and "<img" not in html
    stats = json.loads((out / "stats.json").read_text())
    assert sum(stats["length_hist_in"]) == 480
    assert sum(v[0] for v in stats["domains_out"].values()) == stats["counts"]["kept"]
    assert set(stats["domains_in"]) == {"a", "b"}


def test_jsonl_output_format(recipe_factory, tmp_path):
    m = run_recipe(recipe_factory(output={"path": str(tmp_path / "oj"), "format": "jsonl"}),
                   progress=False)
    rows = [json.loads(line) for s in m["shards"]
            for line in (tmp_path / "oj" / s["path"]).read_text().splitlines()]
    assert len(rows) == m["counts"]["kept"] and {"id", "text"} <= set(rows[0])


def _wait_for(pred, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("kill_in_segment", [0, 1])
def test_resume_after_kill_gives_same_output(recipe_factory, tmp_path, kill_in_segment):
    reference = run_recipe(recipe_factory(out="ref"), progress=False)
    recipe = recipe_factory(out="killed", name="k.yaml")
    work = tmp_path / "killed" / "_work" / f"seg{kill_in_segment:02d}"
    proc = subprocess.Popen([sys.executable, "-m", "gristmill.cli", "run", str(recipe),
                             "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # kill once some, but not all, tasks of the segment are done
    assert _wait_for(lambda: len(list(work.glob("task-*/done.json"))) >= 3 or proc.poll() is not None)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    assert not (tmp_path / "killed" / "manifest.json").exists()
    resumed = run_recipe(recipe, progress=False)
    assert _shard_digests(resumed) == _shard_digests(reference)
    strip = ("timings", "fingerprint")  # the two recipes differ only in output.path
    assert {k: v for k, v in resumed.items() if k not in strip and k != "recipe"} == \
        {k: v for k, v in reference.items() if k not in strip and k != "recipe"}
    # and running it again is a no-op that returns the same manifest
    again = run_recipe(recipe, progress=False)
    assert again["timings"] == resumed["timings"]


def test_output_tokenize_writes_megatron_shards_matching_kept_rows(recipe_factory, tmp_path,
                                                                   corpus):
    from gristmill.pipeline.tokenized import IndexedTokens
    from gristmill.trainers.tiny import build_tokenizer

    texts = [json.loads(line)["text"] for f in sorted(corpus.glob("*.jsonl"))
             for line in f.read_text().splitlines()]
    tok = build_tokenizer(texts[:200], vocab_size=300, path=tmp_path / "tok")
    recipe = recipe_factory([{"stage": "sample", "fraction": 0.5}],
                            output={"path": str(tmp_path / "ot"),
                                    "tokenize": {"tokenizer": str(tmp_path / "tok")}})
    m = run_recipe(recipe, progress=False)
    ds = IndexedTokens(tmp_path / "ot" / "tokenized" / "tokens")
    assert len(ds) == m["counts"]["kept"]
    first = pq.read_table(tmp_path / "ot" / m["shards"][0]["path"]).column("text")[0].as_py()
    assert list(ds[0]) == tok(first)["input_ids"] + [tok.eos_token_id]


def test_counts_reconcile_when_a_mixture_repeats_rows(recipe_factory):
    m = run_recipe(recipe_factory([{"stage": "mix", "sampler": "temperature",
                                    "temperature": 1.0, "budget_tokens": 200_000}]),
                   progress=False)
    c = m["counts"]
    assert c["added"] > 0 and c["stages"][0]["added"] == c["added"]
    assert c["read"] + c["added"] == c["kept"] + c["dropped"] + c["rejected"]
    assert c["reconciled"]


def test_fresh_rerun_in_one_process_uses_the_new_inputs(tmp_path):
    src = tmp_path / "in.jsonl"
    rec = tmp_path / "r.yaml"
    rec.write_text(f"sources: [{{path: {src}}}]\nstages: [{{stage: exact_dedup}}]\n"
                   f"output: {{path: {tmp_path}/out}}\n")
    src.write_text("".join(json.dumps({"id": f"a{i}", "text": "same"}) + "\n" for i in range(4)))
    assert run_recipe(rec, progress=False)["counts"]["kept"] == 1
    src.write_text("".join(json.dumps({"id": f"a{i}", "text": f"t{i % 2}"}) + "\n"
                           for i in range(4)))
    m = run_recipe(rec, fresh=True, progress=False)
    assert m["counts"]["kept"] == 2 and m["counts"]["dropped"] == 2
