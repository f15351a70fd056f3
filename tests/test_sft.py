"""SFT trainer: response-only labels, loss matches the scorer, training lowers held-out loss."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gristmill.scorers.likelihood import encode_sft, score_responses
from gristmill.trainers.sft import (
    IGNORE,
    SFTConfig,
    evaluate_loss,
    greedy_responses,
    sft_examples,
    train_sft,
)
from gristmill.trainers.tiny import build_tiny_lm, build_tokenizer

torch.set_num_threads(1)

PAIRS = [(f"copy {w}", f"the word is {w}.") for w in ["cat", "dog", "sun", "map", "pen", "owl", "fig", "cup"]]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft-base")
    build_tokenizer([p + "\n" + r for p, r in PAIRS] * 5, vocab_size=300, path=d)
    build_tiny_lm(d, d, n_layer=1, n_embd=32, n_head=2, n_positions=64, seed=0)
    return d


def test_prompt_tokens_are_labelled_ignore_and_response_tokens_kept(base):
    tok = AutoTokenizer.from_pretrained(base)
    (ids, labels), = sft_examples(tok, PAIRS[:1])
    _, n_prompt = encode_sft(tok, *PAIRS[0])
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id and n_prompt < len(ids)


def test_sft_loss_is_the_mean_response_nll_the_scorer_computes(base):
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    loss = evaluate_loss(model, sft_examples(tok, PAIRS), pad_id=tok.pad_token_id, batch_size=3)
    s = score_responses(model, tok, [p for p, _ in PAIRS], [[r] for _, r in PAIRS])
    total = sum(float(x[0]) for x in s.logprob)
    count = sum(int(x[0]) for x in s.tokens)
    assert loss == pytest.approx(-total / count, abs=1e-4)


def test_training_lowers_held_out_loss_and_saves_a_loadable_model(base, tmp_path):
    shard = tmp_path / "shards" / "part-00000.parquet"
    shard.parent.mkdir()
    pq.write_table(pa.table({"prompt": [p for p, _ in PAIRS[:6]],
                             "response": [r for _, r in PAIRS[:6]]}), shard)
    cfg = SFTConfig(steps=40, batch_size=6, lr=3e-3, min_lr=3e-4, warmup=2, eval_every=20,
                    progress=False)
    curves = train_sft(base, str(shard.parent), tmp_path / "out", cfg, eval_pairs=PAIRS[6:])
    assert curves.eval_step == [20, 40]
    assert curves.train_loss[-1] < 0.5 * curves.train_loss[0]
    tok = AutoTokenizer.from_pretrained(base)
    before = evaluate_loss(AutoModelForCausalLM.from_pretrained(base), sft_examples(tok, PAIRS[6:]),
                           pad_id=tok.pad_token_id)
    assert curves.eval_loss[-1] < before
    saved = json.loads((tmp_path / "out" / "curves.json").read_text())
    assert saved["train_loss"] == pytest.approx(curves.train_loss)
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_greedy_decoding_reproduces_a_memorized_response(base, tmp_path):
    pairs = [("say hi", "hi there")]
    train_sft(base, pairs, tmp_path / "m", SFTConfig(steps=60, batch_size=2, lr=5e-3, min_lr=5e-3,
                                                     warmup=0, progress=False))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert greedy_responses(model, tok, ["say hi"], max_new_tokens=8) == ["hi there"]


def test_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ValueError, match="steps"):
        SFTConfig(steps=0)
    with pytest.raises(ValueError, match="learning_rate"):
        SFTConfig(learning_rate=1e-3)


@pytest.mark.slow
def test_torchrun_two_ranks_train_with_ddp_and_rank_zero_saves(base, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    shard = tmp_path / "train.parquet"
    pq.write_table(pa.table({"prompt": [p for p, _ in PAIRS], "response": [r for _, r in PAIRS]}),
                   shard)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "gristmill.cli", "sft", "--model", str(base), "--data", str(shard),
         "--out", str(tmp_path / "out"), "--steps", "3", "--batch-size", "2", "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("sft: 3 steps") == 1  # only rank 0 reports and saves
    curves = json.loads((tmp_path / "out" / "curves.json").read_text())
    assert len(curves["train_loss"]) == 3
