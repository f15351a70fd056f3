"""GRAPE end to end: a recipe with lm_likelihood + grape writes SFT shards the SFT trainer reads."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from gristmill.pipeline.runner import run_recipe
from gristmill.trainers.sft import SFTConfig, read_sft_pairs, train_sft
from gristmill.trainers.tiny import build_tiny_lm, build_tokenizer

torch.set_num_threads(1)

RECORDS = [
    {"id": "r1", "prompt": "Q: Repeat kmt.", "responses": ["kmt", "The answer is kmt."],
     "response_sources": ["terse", "plain"]},
    {"id": "r2", "prompt": "Q: Last letter of dbf?", "responses": ["f", "The answer is f.", "F!"],
     "response_sources": ["terse", "plain", "caps"]},
    {"id": "r3", "prompt": "Q: What is 2 plus 1?", "responses": ["The answer is 3."],
     "response_sources": ["plain"]},
]


def test_recipe_writes_grape_sft_shards_that_train(tmp_path):
    model = tmp_path / "base"
    build_tokenizer([r["prompt"] + "\n" + x for r in RECORDS for x in r["responses"]] * 5,
                    vocab_size=300, path=model)
    build_tiny_lm(model, model, n_layer=1, n_embd=32, n_head=2, n_positions=64)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    recipe = tmp_path / "grape.yaml"
    recipe.write_text(f"""
name: grape-test
seed: 0
sources:
  - path: {data}
    kind: sft
    fields: {{id: id}}
stages:
  - stage: lm_likelihood
    name: base_lm
    model: {model}
  - stage: grape
    scores_from: base_lm
output:
  path: {tmp_path / "out"}
engine:
  kind: local
  workers: 1
""")
    manifest = run_recipe(recipe, progress=False, report=False)
    assert manifest["counts"]["kept"] == 3 and manifest["counts"]["reconciled"]
    table = pq.read_table(tmp_path / "out" / "shards")
    rows = {r["id"]: r for r in table.to_pylist()}
    for rec in RECORDS:
        row = rows[rec["id"]]
        lp, tk = row["base_lm_response_logprob"], row["base_lm_response_tokens"]
        best = max(range(len(lp)), key=lambda k: lp[k] / tk[k])
        assert row["grape_index"] == best
        assert row["response"] == rec["responses"][best]
        assert row["grape_source"] == rec["response_sources"][best]
        assert row["grape_score"] == pytest.approx(lp[best] / tk[best])
    pairs = read_sft_pairs(str(tmp_path / "out" / "shards"))
    assert sorted(pairs) == sorted((r["prompt"], r["response"]) for r in rows.values())
    curves = train_sft(model, str(tmp_path / "out" / "shards"), None,
                       SFTConfig(steps=3, batch_size=3, progress=False))
    assert len(curves.train_loss) == 3
