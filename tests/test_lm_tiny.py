"""Tiny tokenizers and models built from a config, loadable by path."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gristmill.trainers.tiny import build_tiny_lm, build_tokenizer, tiny_lm_config

torch.set_num_threads(1)

TEXTS = [f"the quick brown fox {i} jumps over the lazy dog" for i in range(50)]


def test_tokenizer_round_trips_text_and_has_special_tokens(tmp_path):
    tok = build_tokenizer(TEXTS, vocab_size=300, path=tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    ids = again("the quick brown fox", add_special_tokens=False)["input_ids"]
    assert again.decode(ids) == "the quick brown fox"
    assert (again.bos_token, again.eos_token, again.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert len(again) == len(tok) == 300
    assert tok.name_or_path == str(tmp_path)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tiny_lm_loads_by_path_with_its_tokenizer(tmp_path, family):
    build_tokenizer(TEXTS, vocab_size=300, path=tmp_path / "tok")
    path = build_tiny_lm(tmp_path / "tok", tmp_path / "lm", n_layer=1, n_embd=32, n_head=2, family=family)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([tok("the lazy dog")["input_ids"]])
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], 300)
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.model_type == family
    assert torch.isfinite(out.loss)


def test_same_seed_builds_the_same_weights(tmp_path):
    build_tokenizer(TEXTS, vocab_size=300, path=tmp_path)
    a, b = (AutoModelForCausalLM.from_pretrained(build_tiny_lm(tmp_path, tmp_path / n, n_layer=1, n_embd=32,
                                                               n_head=2, seed=3)) for n in "ab")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_invalid_sizes_name_the_parameter(tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be >= 259"):
        build_tokenizer(TEXTS, vocab_size=100, path=tmp_path)
    with pytest.raises(ValueError, match=r"n_embd \(30\) must be divisible by n_head \(4\)"):
        tiny_lm_config(300, n_embd=30)
    with pytest.raises(ValueError, match="family must be one of"):
        tiny_lm_config(300, family="bert")
