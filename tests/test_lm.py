"""The LM trainer: packing, mixture sampling, loss weights, evaluation, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer

from gristmill.pipeline.tokenized import IndexedTokens, write_tokenized
from gristmill.selectors.mixture import MixtureSchedule
from gristmill.trainers.lm import (
    LMTrainConfig,
    MixtureSampler,
    cosine_lr,
    domain_pools,
    train_lm,
    weighted_lm_loss,
)
from gristmill.trainers.tiny import build_tokenizer, tiny_lm_config

torch.set_num_threads(1)

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]


def code_doc(i: int) -> str:
    return f"def f{i % 7}(x):\n    return x + {i % 5}\n"


def web_doc(i: int) -> str:
    w = WORDS[i % len(WORDS)]
    return f"The {w} river runs past the {WORDS[(i + 2) % len(WORDS)]} hill every day."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    texts = [code_doc(i) if i % 2 else web_doc(i) for i in range(120)]
    domains = ["code" if i % 2 else "web" for i in range(120)]
    tok = build_tokenizer(texts, vocab_size=300, path=root / "tok")
    write_tokenized(texts[:100], tok, root / "train", domains=domains[:100], progress=False)
    write_tokenized(texts[100:], tok, root / "target", domains=domains[100:], progress=False)
    return {"root": root, "tok": tok, "train": str(root / "train"), "target": str(root / "target"),
            "model": tiny_lm_config(len(tok), n_layer=1, n_embd=32, n_head=2, n_positions=64)}


def config(corpus, tmp_path, **kw) -> LMTrainConfig:
    base = dict(train=[corpus["train"]], eval={"target": corpus["target"]}, out_dir=str(tmp_path),
                seq_len=32, batch_size=8, max_steps=30, lr=3e-3, warmup_steps=3, eval_every=10,
                eval_sequences=8, progress=False)
    return LMTrainConfig(**{**base, **kw})


def test_pool_windows_cut_the_domain_stream_every_seq_len_with_one_token_overlap(corpus):
    ds = IndexedTokens(corpus["train"])
    pools = domain_pools([ds], seq_len=16)
    stream = np.concatenate([ds[i] for i in ds.documents_in("code")])
    pool = pools["code"]
    assert len(pool) == (stream.size - 1) // 16
    for k in (0, 1, len(pool) // 2, len(pool) - 1):
        assert pool.window(k).tolist() == stream[16 * k:16 * k + 17].tolist()
    assert set(pools) == {"code", "web"}


def test_loss_decreases_on_a_tiny_corpus(corpus, tmp_path):
    result = train_lm(config(corpus, tmp_path, max_steps=40), model_config=corpus["model"])
    evals = result.curves["eval"]
    assert [e["step"] for e in evals] == [0, 10, 20, 30, 40]
    assert evals[-1]["target"] < evals[0]["target"] - 1.5
    train = result.curves["train"]
    assert np.mean([r["loss"] for r in train[-5:]]) < np.mean([r["loss"] for r in train[:5]]) - 1.5


def test_schedule_sampling_follows_the_weights_of_each_step(corpus):
    pools = domain_pools([IndexedTokens(corpus["train"])], seq_len=16)
    schedule = MixtureSchedule(["web", "code"], total_steps=200, starts=[0, 100],
                               weights=np.array([[0.8, 0.2], [0.1, 0.9]]))
    sampler = MixtureSampler(pools, schedule, seed=3)
    counts = np.zeros((2, 2))
    for step in range(200):
        doms, _ = sampler.draw(step, 16)
        counts[step // 100] += np.bincount(doms, minlength=2)
    web, code = sampler.domains.index("web"), sampler.domains.index("code")
    share = counts / counts.sum(axis=1, keepdims=True)
    # 1600 draws per segment: standard error of a share is at most 0.0125.
    assert share[0, web] == pytest.approx(0.8, abs=0.04)
    assert share[1, code] == pytest.approx(0.9, abs=0.04)
    assert sampler.drawn.sum() == 3200


def test_sampler_without_schedule_draws_the_natural_mixture(corpus):
    pools = domain_pools([IndexedTokens(corpus["train"])], seq_len=16)
    sampler = MixtureSampler(pools, None, seed=0)
    expected = np.array([len(p) for p in pools.values()]) / sum(len(p) for p in pools.values())
    for step in range(200):
        sampler.draw(step, 16)
    np.testing.assert_allclose(sampler.drawn / sampler.drawn.sum(), expected, atol=0.04)


def test_sampler_visits_every_window_once_per_epoch(corpus):
    pools = domain_pools([IndexedTokens(corpus["train"])], seq_len=16)
    schedule = MixtureSchedule.constant(["code"], [1.0], total_steps=10)
    sampler = MixtureSampler(pools, schedule, seed=0)
    n = len(pools["code"])
    _, windows = sampler.draw(0, n)
    assert sorted(windows.tolist()) == list(range(n)) and sampler.epochs == [0, 0]
    sampler.draw(1, 1)
    assert sampler.epochs[sampler.domains.index("code")] == 1
    assert sampler.drawn[sampler.domains.index("web")] == 0


def test_schedule_naming_a_domain_missing_from_the_data_is_rejected(corpus):
    pools = domain_pools([IndexedTokens(corpus["train"])], seq_len=16)
    schedule = MixtureSchedule.constant(["code", "math"], [0.5, 0.5], total_steps=10)
    with pytest.raises(ValueError, match=r"schedule domains \['math'\] are not in the training data"):
        MixtureSampler(pools, schedule)


def test_loss_weight_scales_the_gradient_of_its_domains_sequences(corpus):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(corpus["model"])
    pools = domain_pools([IndexedTokens(corpus["train"])], seq_len=16)
    batch = torch.from_numpy(np.stack([pools["code"].window(0), pools["web"].window(0)]))

    def grad(w):
        model.zero_grad()
        logits = model(input_ids=batch[:, :-1]).logits
        weighted_lm_loss(logits, batch[:, 1:], torch.tensor(w)).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    g_code, g_web = grad([1.0, 0.0]), grad([0.0, 1.0])
    torch.testing.assert_close(grad([3.0, 0.0]), 3 * g_code)
    torch.testing.assert_close(grad([2.0, 0.5]), 2 * g_code + 0.5 * g_web, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad([1.0, 1.0]), g_code + g_web, rtol=1e-4, atol=1e-6)


def test_trainer_applies_loss_weights_to_the_training_loss(corpus, tmp_path):
    plain = train_lm(config(corpus, tmp_path / "a", max_steps=1, eval={}), model_config=corpus["model"])
    weighted = train_lm(config(corpus, tmp_path / "b", max_steps=1, eval={},
                               loss_weights={"code": 2.0, "web": 2.0}), model_config=corpus["model"])
    assert weighted.curves["train"][0]["loss"] == pytest.approx(2 * plain.curves["train"][0]["loss"], rel=1e-5)
    assert weighted.curves["loss_weights"] == {"code": 2.0, "web": 2.0}


def test_scalarization_schedule_loss_weights_are_used(corpus, tmp_path):
    schedule = MixtureSchedule.constant(["code", "web"], [0.5, 0.5], total_steps=1,
                                        loss_weights={"code": 0.25, "web": 4.0})
    schedule.save(tmp_path / "schedule.json")
    result = train_lm(config(corpus, tmp_path, max_steps=1, eval={}, schedule=str(tmp_path / "schedule.json")),
                      model_config=corpus["model"])
    assert result.curves["loss_weights"] == {"code": 0.25, "web": 4.0}


def test_eval_logs_held_out_loss_per_target_and_per_domain(corpus, tmp_path):
    cfg = config(corpus, tmp_path, max_steps=5, eval_every=2,
                 eval={"target": corpus["target"], "train_code": corpus["train"]})
    result = train_lm(cfg, model_config=corpus["model"])
    first = result.curves["eval"][0]
    assert [e["step"] for e in result.curves["eval"]] == [0, 2, 4, 5]
    assert {"target", "target/code", "target/web", "train_code", "train_code/code",
            "train_code/web"} <= set(first)
    # The target loss is the token-weighted mean of its domains (same windows per domain here).
    assert min(first["target/code"], first["target/web"]) <= first["target"] <= \
        max(first["target/code"], first["target/web"])
    assert result.final_eval == {k: v for k, v in result.curves["eval"][-1].items()
                                 if k not in ("step", "tokens")}


def test_same_seed_gives_identical_curves_and_weights(corpus, tmp_path):
    runs = [train_lm(config(corpus, tmp_path / str(i), max_steps=6, eval_every=3, seed=s),
                     model_config=corpus["model"]) for i, s in enumerate([7, 7, 8])]
    assert runs[0].curves["train"] == runs[1].curves["train"]
    assert runs[0].curves["eval"] == runs[1].curves["eval"]
    assert runs[0].curves["train"] != runs[2].curves["train"]
    a, b = (AutoModelForCausalLM.from_pretrained(r.model_dir) for r in runs[:2])
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_outputs_are_a_loadable_model_and_tokenizer_and_curves_json(corpus, tmp_path):
    result = train_lm(config(corpus, tmp_path, max_steps=2), model_config=corpus["model"])
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    tok = AutoTokenizer.from_pretrained(result.model_dir)
    assert tok.eos_token_id == corpus["tok"].eos_token_id
    assert model.config.vocab_size == len(tok)
    saved = json.loads((tmp_path / "curves.json").read_text())
    assert saved["train"] == result.curves["train"]
    assert json.loads((tmp_path / "train_config.json").read_text())["max_steps"] == 2


def test_token_budget_sets_the_number_of_steps(corpus, tmp_path):
    cfg = config(corpus, tmp_path, max_steps=None, token_budget=1000, eval={})
    result = train_lm(cfg, model_config=corpus["model"])
    assert result.steps == 4 and result.tokens == 4 * 8 * 32   # ceil(1000 / 256)


def test_bf16_autocast_trains_on_cpu(corpus, tmp_path):
    result = train_lm(config(corpus, tmp_path, max_steps=3, bf16=True, eval_every=3),
                      model_config=corpus["model"])
    assert all(np.isfinite(e["target"]) for e in result.curves["eval"])


def test_config_requires_exactly_one_of_steps_and_budget(corpus, tmp_path):
    with pytest.raises(ValidationError, match="exactly one of max_steps"):
        config(corpus, tmp_path, max_steps=10, token_budget=100)
    with pytest.raises(ValidationError, match="seq_len"):
        config(corpus, tmp_path, seq_len=1)


def test_seq_len_longer_than_the_model_positions_is_rejected(corpus, tmp_path):
    with pytest.raises(ValueError, match="seq_len must be <= the model's 64 positions"):
        train_lm(config(corpus, tmp_path, seq_len=128), model_config=corpus["model"])


def test_cosine_lr_warms_up_then_decays_to_min_lr():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=104)
    assert cosine_lr(0, **kw) == pytest.approx(0.2)
    assert cosine_lr(3, **kw) == pytest.approx(0.8)
    assert cosine_lr(4, **kw) == pytest.approx(1.0)
    assert cosine_lr(54, **kw) == pytest.approx(0.55)
    assert cosine_lr(104, **kw) == pytest.approx(0.1)


def test_model_vocabulary_smaller_than_the_corpus_is_rejected(corpus, tmp_path):
    small = tiny_lm_config(100, n_layer=1, n_embd=32, n_head=2, n_positions=64)
    with pytest.raises(ValueError, match="model vocab_size 100 is smaller than the corpus vocabulary 300"):
        train_lm(config(corpus, tmp_path), model_config=small)
