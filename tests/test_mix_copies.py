"""Copies made by ``mix`` keep the user's id; stages after it decide per input record."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gristmill.pipeline.runner import run_recipe
from gristmill.pipeline.stage import ROW_KEY

MIX = {"stage": "mix", "sampler": "temperature", "temperature": 4.0, "budget_tokens": 150_000}


def _rows(out: Path, manifest: dict) -> pa.Table:
    return pa.concat_tables(pq.read_table(out / s["path"]) for s in manifest["shards"])


def test_copies_keep_the_users_id_and_a_stage_after_mix_decides_per_input_record(
        recipe_factory, tmp_path):
    mixed = run_recipe(recipe_factory([MIX], out="mix"), progress=False, report=False)
    rows = _rows(tmp_path / "mix", mixed)
    assert mixed["counts"]["added"] > 0
    copies = Counter(rows.column(ROW_KEY).to_pylist())
    assert max(copies.values()) > 1
    pairs = list(zip(rows.column(ROW_KEY).to_pylist(), rows.column("mix_epoch").to_pylist(),
                     strict=True))
    assert len(set(pairs)) == len(pairs)  # (row key, mix_epoch) is unique
    assert not any("#e" in i for i in rows.column("id").to_pylist())
    by_key = dict(zip(rows.column(ROW_KEY).to_pylist(), rows.column("id").to_pylist(),
                      strict=True))
    assert all(i.startswith("f") and "-" in i for i in by_key.values())  # the input's ids

    sampled = run_recipe(recipe_factory([MIX, {"stage": "sample", "fraction": 0.5}],
                                        out="mix_sample"), progress=False, report=False)
    after = Counter(_rows(tmp_path / "mix_sample", sampled).column(ROW_KEY).to_pylist())
    assert 0 < len(after) < len(copies)
    assert all(after[k] == copies[k] for k in after)  # all copies of a record, or none
    assert sampled["counts"]["reconciled"]

    deduped = run_recipe(recipe_factory([MIX, {"stage": "exact_dedup"}], out="mix_dedup"),
                         progress=False, report=False)
    left = Counter(_rows(tmp_path / "mix_dedup", deduped).column(ROW_KEY).to_pylist())
    # copies of one record are not duplicates of each other: each kept record keeps
    # all its copies; only records whose text another input record has are dropped
    assert all(left[k] == copies[k] for k in left) and len(left) < len(copies)
    assert deduped["counts"]["reconciled"]
