"""The shard writer and the per-batch statistics of a task: the cheaper ways they
work now (dictionary encoding only for the repeating columns, no statistics of
the text, text lengths from offsets, an unchanged batch counted without being
measured again) give valid shards that read back as written, and the same
figures as the plain ways."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gristmill.pipeline.execution import TaskStats, text_lengths
from gristmill.pipeline.inputs import repeated_ids, write_id_ledger
from gristmill.pipeline.stage import ROW_KEY
from gristmill.pipeline.writers import ShardWriter, sha256_file


def _batches(n_batches: int = 12, rows: int = 300) -> list[pa.Table]:
    rng = np.random.default_rng(7)
    words = ["alpha", "beta", "gamma", "délta", "日本語", "x" * 40]
    out = []
    for b in range(n_batches):
        texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 60)))) for _ in range(rows)]
        out.append(pa.Table.from_arrays([
            pa.array([f"id-{b}-{i}" for i in range(rows)]),
            pa.array(texts),
            pa.array([None if i % 11 == 0 else f"d{i % 3}" for i in range(rows)], pa.string()),
            pa.array(["corpus/a.jsonl"] * rows),
            pa.array([(b << 40) | i for i in range(rows)], pa.uint64()),
        ], names=["id", "text", "domain", "source", ROW_KEY]))
    return out


def _write(folder: Path, batches: list[pa.Table]) -> list[dict]:
    w = ShardWriter(folder, "parquet", shard_bytes=40_000)
    for b in batches:
        w.write(b)
    shards = [s.to_dict() for s in w.close()]
    assert w.seconds[0] > 0 and w.seconds[1] >= 0
    return shards


def test_shards_are_valid_and_read_back_as_written_by_pyarrow_and_polars(tmp_path):
    batches = _batches()
    shards = _write(tmp_path, batches)
    assert len(shards) > 2  # several shards under the size cap
    assert sum(s["rows"] for s in shards) == sum(b.num_rows for b in batches)
    for s in shards:
        p = tmp_path / s["path"]
        assert sha256_file(p) == s["sha256"] and p.stat().st_size == s["bytes"]
    back = pa.concat_tables([pq.read_table(tmp_path / s["path"]) for s in shards])
    back.validate(full=True)
    assert back.schema == batches[0].schema  # plain string columns, not dictionaries
    assert back.equals(pa.concat_tables(batches))
    frame = pl.concat([pl.read_parquet(tmp_path / s["path"]) for s in shards])
    assert frame["source"].dtype == pl.String and frame["domain"].dtype == pl.String
    assert frame["domain"].to_list() == back.column("domain").to_pylist()
    assert frame["source"].to_list() == back.column("source").to_pylist()
    # the same tables in a second writer give the same bytes (no state leaks between shards)
    again = _write(tmp_path / "again", batches)
    assert again == shards


def test_constant_columns_are_dictionary_encoded_and_text_has_no_statistics(tmp_path):
    shards = _write(tmp_path, _batches(2))
    meta = pq.read_metadata(tmp_path / shards[0]["path"])
    names = meta.schema.to_arrow_schema().names
    group = meta.row_group(0)
    col = {n: group.column(i) for i, n in enumerate(names)}
    assert any("DICTIONARY" in e for e in col["source"].encodings)
    assert any("DICTIONARY" in e for e in col["domain"].encodings)
    assert not any("DICTIONARY" in e for e in col["text"].encodings)
    assert not col["text"].is_stats_set
    assert col[ROW_KEY].is_stats_set and col[ROW_KEY].statistics.min == 0
    assert col["id"].compression == "ZSTD"


def test_text_lengths_count_characters_whether_ascii_or_not():
    texts = ["plain ascii", "", "é", "日本語のテキスト", "mixed é and ascii", "😀" * 3, "a" * 500]
    for typ in (pa.string(), pa.large_string()):
        arr = pa.array(texts * 5, typ)
        chunked = pa.chunked_array([arr.slice(0, 3), arr.slice(3, 10), arr.slice(13)])
        for col in (pa.chunked_array([arr]), chunked,
                    pa.chunked_array([pa.array(["ascii only", "here"] * 4, typ).slice(2)])):
            t = pa.table({"text": col})
            expect = pc.utf8_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
            assert text_lengths(t).tolist() == expect.tolist()
    prompts = pa.table({"prompt": pa.array(["ab", "日本"])})
    assert text_lengths(prompts).tolist() == [2, 2]


def test_an_unchanged_batch_is_counted_at_the_output_like_any_other():
    batches = _batches(3, 200)
    reused, fresh = TaskStats(), TaskStats()
    for b in batches:
        reused.observe(b, "in")
        reused.observe(b, "out")  # the same object: figures taken from the input's
        fresh.observe(b, "in")
        fresh.observe(pa.concat_tables([b.slice(0, 50), b.slice(50)]), "out")  # a copy
    assert reused.to_json() == fresh.to_json()
    assert reused.to_json()["length_hist_in"] == reused.to_json()["length_hist_out"]
    all_rows = pa.concat_tables(batches)
    lengths = pc.utf8_length(all_rows.column("text")).to_numpy()
    doms = pc.fill_null(all_rows.column("domain"), "(none)").to_pylist()
    expect = {d: [doms.count(d), int(sum(n for n, e in zip(lengths, doms, strict=True) if e == d))]
              for d in set(doms)}
    assert reused.domains_in == expect and reused.domains_out == expect


def test_repeated_ids_name_the_three_first_places_of_each_example(tmp_path):
    ids = ["a", "b", "a", "c", "a", "b", "a", "d"]
    ledgers = []
    for f in range(2):
        t = pa.table({"id": ids, ROW_KEY: pa.array([(f << 40) | (i + 1) for i in range(8)],
                                                    pa.uint64())})
        write_id_ledger(tmp_path / f"task-{f:05d}.parquet", [t.slice(0, 5), t.slice(5)])
        ledgers.append(tmp_path / f"task-{f:05d}.parquet")
    got = repeated_ids(ledgers, {0: "x.jsonl", 1: "y.jsonl"})
    assert got["distinct_ids"] == 4 and got["repeated_ids"] == 4
    assert got["records_with_repeated_id"] == 16
    first = {e["id"]: e for e in got["examples"]}
    assert first["a"]["count"] == 8 and first["a"]["at"] == ["x.jsonl:1", "x.jsonl:3",
                                                            "x.jsonl:5"]
    assert first["d"]["at"] == ["x.jsonl:8", "y.jsonl:8"]
    assert [e["id"] for e in got["examples"]] == ["a", "b", "c", "d"]  # by first place
