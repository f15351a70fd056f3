"""The ``mix`` stage: token counting, rates, deterministic draws and epochs."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from gristmill.pipeline.registry import stage_class
from gristmill.pipeline.stage import ROW_KEY, make_keys
from gristmill.selectors.mix import Mix
from gristmill.selectors.mixture import MixtureSchedule, temperature_weights


def _corpus() -> pa.Table:
    # Three domains of 1200, 300 and 30 documents; text lengths vary per doc.
    rows = []
    for dom, n in (("web", 1200), ("books", 300), ("math", 30)):
        for i in range(n):
            rows.append((f"{dom}-{i}", "w" * (8 + 4 * (i % 7)), dom))
    ids, texts, doms = zip(*rows, strict=True)
    return pa.table({"id": list(ids), "text": list(texts), "domain": list(doms),
                     ROW_KEY: make_keys(0, np.arange(1, len(ids) + 1))})


def _run(stage: Mix, batches: list[pa.Table], order: list[int]):
    sums = [stage.summarize(b) for b in batches]
    acc = None
    for i in order:
        acc = stage.merge(acc, sums[i])
    state = stage.finalize(acc)
    outs = [stage.apply(b, state) for b in batches]
    kept = pa.concat_tables([o.kept for o in outs])
    dropped = pa.concat_tables([o.dropped for o in outs])
    return state, kept, dropped


def _tokens(table: pa.Table) -> np.ndarray:
    return np.ceil(np.array([len(t.encode()) for t in table.column("text").to_pylist()]) / 4)


def test_mix_is_registered_under_its_type_name():
    assert stage_class("mix") is Mix


def test_merge_order_and_batching_give_identical_output():
    table = _corpus().take(pa.array(np.random.default_rng(0).permutation(1530)))
    stage = Mix({"budget_tokens": 12_000, "sampler": "temperature", "temperature": 5.0}, seed=7)
    a, b = table.slice(0, 700), table.slice(700)
    s1, k1, d1 = _run(stage, [a, b], [0, 1])
    s2, k2, d2 = _run(stage, [a, b], [1, 0])
    s3, k3, _ = _run(stage, [table], [0])
    assert json.dumps(s1, sort_keys=True) == json.dumps(s2, sort_keys=True)
    assert k1.equals(k2) and d1.equals(d2)
    assert sorted(k1.column("id").to_pylist()) == sorted(k3.column("id").to_pylist())


def test_upsampled_copies_keep_the_users_id_and_differ_by_epoch():
    table = _corpus()
    stage = Mix({"budget_tokens": 12_000, "sampler": "temperature", "temperature": 5.0}, seed=1)
    state, kept, dropped = _run(stage, [table.slice(0, 800), table.slice(800)], [0, 1])
    math_info = state["domains"]["math"]
    assert math_info["rate"] > 2  # math is upsampled past its size
    ids = kept.column("id").to_pylist()
    keys = kept.column(ROW_KEY).to_pylist()
    epochs = np.array(kept.column("mix_epoch").to_pylist())
    # a copy is its input record, unchanged: the user's id is never rewritten
    id_of = dict(zip(table.column(ROW_KEY).to_pylist(), table.column("id").to_pylist(),
                     strict=True))
    assert all(id_of[k] == i for k, i in zip(keys, ids, strict=True))
    assert len(set(zip(keys, epochs.tolist(), strict=True))) == kept.num_rows
    assert len(set(ids)) < len(ids)
    copies: dict[int, list[int]] = {}
    for k, e in zip(keys, epochs.tolist(), strict=True):
        copies.setdefault(k, []).append(e)
    assert all(sorted(es) == list(range(len(es))) for es in copies.values())
    math_rows = np.array([i.startswith("math-") for i in ids])
    assert epochs[math_rows].max() == math_info["max_copies"] - 1
    # web is downsampled: no repeats, drops recorded with the stage name.
    assert epochs[np.array([i.startswith("web-") for i in ids])].max() == 0
    assert set(dropped.column("stage").to_pylist()) == {"mix"}
    assert set(dropped.column("reason").to_pylist()) == {"mix_downsample"}


def test_realized_tokens_in_state_match_output_and_budget():
    table = _corpus()
    budget = 12_000
    stage = Mix({"budget_tokens": budget, "sampler": "temperature", "temperature": 5.0}, seed=3)
    state, kept, _ = _run(stage, [table], [0])
    toks = _tokens(kept)
    doms = np.array(kept.column("domain").to_pylist())
    for d, info in state["domains"].items():
        assert toks[doms == d].sum() == info["tokens_after"]
        assert info["tokens_after"] == pytest.approx(info["target_tokens"], rel=0.02)
        assert info["epochs"] == pytest.approx(info["tokens_after"] / info["tokens_before"])
    assert toks.sum() == pytest.approx(budget, rel=0.01)
    before = np.array([state["domains"][d]["tokens_before"] for d in ("books", "math", "web")])
    weights = np.array([state["domains"][d]["weight"] for d in ("books", "math", "web")])
    np.testing.assert_allclose(weights, temperature_weights(before, 5.0))


def test_unimax_respects_epoch_cap():
    stage = Mix({"budget_tokens": 12_000, "sampler": "unimax", "max_epochs": 2.0}, seed=0)
    state, kept, _ = _run(stage, [_corpus()], [0])
    assert state["domains"]["math"]["epochs"] <= 2.0 + 1e-9
    assert np.array(kept.column("mix_epoch").to_pylist()).max() <= 1


def test_explicit_weights_and_artifacts_hold_mixture_and_schedule():
    stage = Mix({"budget_tokens": 4_000, "sampler": "weights",
                 "weights": {"web": 1.0, "books": 1.0, "math": 0.0}, "tokens_per_step": 1000})
    state, kept, _ = _run(stage, [_corpus()], [0])
    assert "math" not in set(kept.column("domain").to_pylist())
    files = stage.artifacts(state)
    mixture = json.loads(files["mixture.json"])
    assert mixture["domains"]["books"]["tokens_after"] == state["domains"]["books"]["tokens_after"]
    sched = MixtureSchedule.from_json(files["schedule.json"].decode())
    assert sched.total_steps == 4
    np.testing.assert_allclose(sched.weights_dict_at(0)["math"], 0.0)


def test_cooldown_sampler_writes_decaying_schedule():
    stage = Mix({"budget_tokens": 8_000, "sampler": "cooldown", "t_start": 5, "t_end": 1,
                 "shape": "linear", "switch": 0.5, "tokens_per_step": 100})
    state, _, _ = _run(stage, [_corpus()], [0])
    sched = MixtureSchedule.from_json(state["schedule"])
    i = sched.domains.index("math")
    assert sched.weights_at(0)[i] > sched.weights_at(79)[i]


def test_params_name_the_bad_field():
    with pytest.raises(ValidationError, match="budget_tokens"):
        Mix({"budget_tokens": 0})
    with pytest.raises(ValidationError, match="needs weights"):
        Mix({"budget_tokens": 10, "sampler": "weights"})
    with pytest.raises(ValidationError, match="extra"):
        Mix({"budget_tokens": 10, "temprature": 2})


def test_missing_domain_column_is_reported():
    stage = Mix({"budget_tokens": 100})
    with pytest.raises(ValueError, match="column 'domain' not in batch"):
        stage.summarize(pa.table({"id": ["a"], "text": ["x"]}))


def test_tokenizer_from_local_folder_counts_tokens(tmp_path):
    from transformers import AutoTokenizer

    from gristmill.trainers.tiny import build_tokenizer

    table = _corpus()
    build_tokenizer(table.column("text").to_pylist()[:200], vocab_size=300, path=tmp_path / "tok")
    stage = Mix({"budget_tokens": 5_000, "tokenizer": str(tmp_path / "tok")})
    stage.check(str(tmp_path))
    counts = stage.count_tokens(table.column("text").slice(0, 50))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    expected = [len(tok(t, add_special_tokens=False)["input_ids"])
                for t in table.column("text").to_pylist()[:50]]
    assert counts.tolist() == expected
    state = stage.finalize(stage.summarize(table))
    assert sum(d["tokens_before"] for d in state["domains"].values()) == sum(
        len(tok(t, add_special_tokens=False)["input_ids"]) for t in table.column("text").to_pylist())


def test_check_rejects_missing_tokenizer_folder(tmp_path):
    with pytest.raises(ValueError, match="mix.tokenizer"):
        Mix({"budget_tokens": 10, "tokenizer": "no/such/folder"}).check(str(tmp_path))
