"""The distill pipeline stage, the `gristmill distill` command and a recipe running the stage."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from sklearn.datasets import load_digits

from gristmill.cli.main import main as cli_main
from gristmill.pipeline.registry import stage_class
from gristmill.pipeline.runner import run_recipe
from gristmill.pipeline.stage import merge_all
from gristmill.selectors.distill_stage import Distill
from gristmill.trainers.distill_data import topic_sentences

TINY_PARAMS = {
    "width": 16, "depth": 1,
    "experts": {"num_experts": 1, "epochs": 4, "batch_size": 100},
    "distill": {"ipc": 2, "iterations": 2, "syn_steps": 4, "expert_epochs": 2,
                "max_start_epoch": 2},
}


def digits_rows(n: int = 200, json_features: bool = False) -> pa.Table:
    x, y = load_digits(return_X_y=True)
    feats = [json.dumps(r.tolist()) for r in x[:n]] if json_features else x[:n].tolist()
    return pa.table({"id": [f"d{i:04d}" for i in range(n)], "text": ["digit"] * n,
                     "features": feats, "label": y[:n].astype(np.int64)})


def test_stage_publishes_synthetic_set_and_keeps_every_row():
    stage = stage_class("distill")(TINY_PARAMS, name="distill", seed=3)
    rows = digits_rows()
    a, b = rows.slice(0, 120), rows.slice(120)
    state = stage.finalize(merge_all(stage, [stage.summarize(a), stage.summarize(b)]))
    files = stage.artifacts(state)
    assert set(files) == {"synthetic.parquet", "learned_lr.json", "report.png"}
    table = pq.read_table(io.BytesIO(files["synthetic.parquet"]))
    assert table.num_rows == 20 and table.schema.names == ["id", "features", "label"]
    record = json.loads(files["learned_lr.json"])
    assert record["learned_lr"] == pytest.approx(state.learned_lr)
    assert record["distill_config"]["seed"] == 3 and record["rows"] == 20
    assert files["report.png"].startswith(b"\x89PNG")
    out = stage.apply(a, state)
    assert out.kept.equals(a) and out.num_dropped == 0


def test_stage_result_does_not_depend_on_batch_order():
    stage = Distill(TINY_PARAMS, seed=0)
    rows = digits_rows(120)
    parts = [stage.summarize(rows.slice(i, 40)) for i in (0, 40, 80)]
    first = stage.artifacts(stage.finalize(merge_all(stage, parts)))
    second = stage.artifacts(stage.finalize(merge_all(stage, parts[::-1])))
    assert first["synthetic.parquet"] == second["synthetic.parquet"]


def test_stage_reads_json_array_strings_as_recipe_readers_pass_them():
    stage = Distill(TINY_PARAMS)
    summary = stage.summarize(digits_rows(10, json_features=True))
    assert summary.x.shape == (10, 64) and summary.x.dtype == np.float32
    assert summary.x[0, 2] == 5.0


@pytest.mark.parametrize("params, field", [
    ({"distill": {"ipc": 0}}, "ipc"),
    ({"experts": {"epochz": 3}}, "epochz"),
    ({"model": "convnet"}, "image_shape"),
    ({"model": "resnet"}, "model"),
])
def test_stage_params_errors_name_the_field(params, field):
    with pytest.raises(ValueError, match=field):
        Distill(params)


def test_stage_names_a_missing_column():
    with pytest.raises(ValueError, match="no column 'emb'"):
        Distill({"feature_column": "emb"}).summarize(digits_rows(5))


def test_topic_sentences_are_balanced_and_labelled():
    texts, labels = topic_sentences(n_per_topic=20, seed=1)
    assert len(texts) == 100
    assert sorted(set(labels)) == ["cooking", "finance", "music", "space", "sports"]
    assert all(6 <= len(t.split()) <= 12 for t in texts)


def test_cli_distills_the_topics_text_set(tmp_path, capsys):
    rc = cli_main(["distill", "--dataset", "topics", "--ipc", "1", "--iterations", "2",
                   "--syn-steps", "4", "--num-experts", "1", "--train-epochs", "4",
                   "--max-start-epoch", "2", "--quiet", "--evaluate", "--eval-seeds", "1",
                   "--output", str(tmp_path / "o")])
    assert rc == 0
    evaluation = json.loads((tmp_path / "o" / "evaluation.json").read_text())
    assert {arm: r["rows"] for arm, r in evaluation.items()} == {
        "distilled": 5, "random_real": 5, "full_data": 1200}
    assert all(0.0 <= r["mean"] <= 1.0 for r in evaluation.values())
    table = pq.read_table(tmp_path / "o" / "synthetic.parquet")
    assert table.num_rows == 5
    assert sorted(table.column("label").to_pylist()) == ["cooking", "finance", "music",
                                                         "space", "sports"]
    assert {len(v) for v in table.column("features").to_pylist()} == {256}
    assert (tmp_path / "o" / "experts.pt").exists()
    assert "learned step size" in capsys.readouterr().out


def test_cli_reports_a_missing_column(tmp_path, capsys):
    path = tmp_path / "rows.parquet"
    pq.write_table(digits_rows(20), path)
    rc = cli_main(["distill", "--input", str(path), "--feature-column", "emb", "--output",
                   str(tmp_path / "o")])
    assert rc == 2
    assert "no column 'emb'" in capsys.readouterr().err


def test_recipe_runs_the_distill_stage(tmp_path):
    data = tmp_path / "data"
    assert cli_main(["distill", "--dataset", "digits", "--write-dataset",
                     str(data / "digits.jsonl")]) == 0
    # keep 20 digits per class so the run stays short
    per_class: dict[int, int] = {}
    small = []
    for ln in (data / "digits.jsonl").read_text().splitlines():
        c = json.loads(ln)["label"]
        if per_class.get(c, 0) < 20:
            per_class[c] = per_class.get(c, 0) + 1
            small.append(ln)
    (data / "digits.jsonl").write_text("\n".join(small) + "\n")
    recipe = {
        "name": "distill_test", "seed": 0,
        "sources": [{"path": "data/digits.jsonl", "fields": {"id": "id", "text": "text"},
                     "columns": ["features", "label"]}],
        "stages": [{"stage": "distill", "image_shape": [1, 8, 8], **TINY_PARAMS}],
        "output": {"path": "out", "format": "parquet", "shard_size": "16MB"},
        "engine": {"kind": "local", "workers": 1},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_recipe(path)
    art = tmp_path / "out" / "artifacts" / "distill"
    table = pq.read_table(art / "synthetic.parquet")
    assert table.num_rows == 20
    assert np.asarray(table.column("image").to_pylist()).shape == (20, 1, 8, 8)
    assert (art / "report.png").exists() and (art / "learned_lr.json").exists()
    shards = pq.read_table(tmp_path / "out" / "shards")
    assert shards.num_rows == 200
