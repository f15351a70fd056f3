"""LM likelihood scorer: values against a direct transformers forward, windows, masks, stage."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gristmill.scorers.likelihood import (
    LMLikelihood,
    encode_sft,
    score_responses,
    score_texts,
    sliding_windows,
)
from gristmill.trainers.tiny import build_tiny_lm, build_tokenizer

torch.set_num_threads(1)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine, said the tailor",
    "héllo wörld: naïve café déjà vu",
    "numbers 12 345 6789 and symbols !? ;)",
] * 5
TEXTS = ["the fox", "a stitch in time saves nine and then some more words follow here",
         "héllo", "x", "numbers 12 and the lazy dog jumps over the quick brown fox again"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"lm-{request.param}")
    build_tokenizer(CORPUS, vocab_size=300, path=d)
    build_tiny_lm(d, d, n_layer=1, n_embd=32, n_head=2, n_positions=64, family=request.param,
                  seed=1)
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    return model, AutoTokenizer.from_pretrained(d)


def direct_logprobs(model, ids: list[int]) -> np.ndarray:
    """log p(ids[t] | ids[:t]) for t >= 1 from a plain forward + log_softmax + gather."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return lp.numpy()


def test_text_scores_equal_direct_forward_log_softmax(lm):
    model, tok = lm
    s = score_texts(model, tok, TEXTS)
    for i, text in enumerate(TEXTS):
        ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
        ref = direct_logprobs(model, ids)
        assert s.tokens[i] == len(ids) - 1
        assert s.logprob[i] == pytest.approx(ref.sum(), abs=1e-4)
        assert s.mean_logprob[i] == pytest.approx(ref.mean(), abs=1e-5)
    assert s.backend in ("cpp", "torch", "cuda")


def test_mixed_length_batch_equals_scoring_one_by_one(lm):
    model, tok = lm
    together = score_texts(model, tok, TEXTS, batch_size=3, max_batch_tokens=64)
    for i, text in enumerate(TEXTS):
        alone = score_texts(model, tok, [text])
        assert together.logprob[i] == pytest.approx(alone.logprob[0], abs=1e-4)
        assert together.tokens[i] == alone.tokens[0]


def test_sliding_windows_score_every_target_once():
    for n, length, stride, start in [(1, 4, 2, 1), (10, 4, 3, 1), (57, 16, 5, 1), (57, 16, 15, 30),
                                     (16, 16, 8, 1), (100, 7, 1, 3)]:
        seen = []
        for b, e, t0 in sliding_windows(n, start, length, stride):
            assert e - b <= length and b < t0 < e + 1
            seen.extend(range(t0, e))
        assert seen == list(range(max(1, start), n))


def test_sliding_window_matches_hand_computed_context(lm):
    model, tok = lm
    text = " ".join(CORPUS[:4])
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    n, length, stride = len(ids), 16, 5
    assert n > 3 * length
    s = score_texts(model, tok, [text], max_length=length, stride=stride)
    # Target t is scored in the first window [k*stride, k*stride + length) that
    # ends after it, with context ids[k*stride : t].
    expected = 0.0
    for t in range(1, n):
        k = 0 if t < length else (t - length) // stride + 1
        b = k * stride
        expected += direct_logprobs(model, ids[b : t + 1])[-1]
    full = direct_logprobs(model, ids[:64]).sum() if n <= 64 else None
    assert s.tokens[0] == n - 1
    assert s.logprob[0] == pytest.approx(expected, abs=1e-4)
    if full is not None:
        assert abs(s.logprob[0] - full) > 1e-3


def test_document_longer_than_model_context_is_scored(lm):
    model, tok = lm
    text = " ".join(CORPUS)  # far more than n_positions=64 tokens
    s = score_texts(model, tok, [text])
    n = 1 + len(tok(text, add_special_tokens=False)["input_ids"])
    assert n > 64
    assert s.tokens[0] == n - 1 and np.isfinite(s.logprob[0])


def test_bpc_and_bpb_follow_from_logprob_chars_and_bytes(lm):
    model, tok = lm
    text = "héllo wörld"
    s = score_texts(model, tok, [text, ""])
    assert len(text) == 11 and len(text.encode()) == 13
    assert s.bpc[0] == pytest.approx(-s.logprob[0] / (math.log(2) * 11), rel=1e-12)
    assert s.bpb[0] == pytest.approx(-s.logprob[0] / (math.log(2) * 13), rel=1e-12)
    assert s.bpb[0] / s.bpc[0] == pytest.approx(11 / 13)
    assert s.tokens[1] == 0 and np.isnan(s.bpc[1]) and np.isnan(s.mean_logprob[1])


def test_response_logprobs_mask_the_prompt(lm):
    model, tok = lm
    responses = ["the lazy dog", "nine"]
    a = score_responses(model, tok, ["what jumps?"], [responses])
    b = score_responses(model, tok, ["a stitch in time saves what, said the tailor?"], [responses])
    for j, r in enumerate(responses):
        n_resp = len(tok(r, add_special_tokens=False)["input_ids"]) + 1  # + EOS
        assert a.tokens[0][j] == b.tokens[0][j] == n_resp
        ids, n_prompt = encode_sft(tok, "what jumps?", r)
        assert len(ids) - n_prompt == n_resp
        ref = direct_logprobs(model, ids)[n_prompt - 1 :]
        assert a.logprob[0][j] == pytest.approx(ref.sum(), abs=1e-4)
    assert not np.allclose(a.logprob[0], b.logprob[0], atol=1e-4)
    assert a.mean_logprob[0] == pytest.approx(a.logprob[0] / a.tokens[0])


def test_chat_template_masks_the_rendered_user_turn(lm):
    model, tok = lm
    tok.chat_template = ("{% for m in messages %}<|bos|>{{ m['role'] }}:\n{{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}<|bos|>assistant:\n{% endif %}")
    try:
        ids, n_prompt = encode_sft(tok, "what jumps?", "the dog")
        prompt_ids = tok("<|bos|>user:\nwhat jumps?\n<|bos|>assistant:\n",
                         add_special_tokens=False)["input_ids"]
        assert ids[:n_prompt] == prompt_ids
        assert tok.decode(ids[n_prompt:]) == "the dog\n"
        s = score_responses(model, tok, ["what jumps?"], [["the dog"]])
        assert s.tokens[0][0] == len(ids) - n_prompt
        assert s.logprob[0][0] == pytest.approx(direct_logprobs(model, ids)[n_prompt - 1 :].sum(),
                                                abs=1e-4)
    finally:
        tok.chat_template = None


def test_stage_adds_text_and_response_columns(lm, tmp_path):
    model, tok = lm
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    stage = LMLikelihood({"model": str(tmp_path), "max_length": 32, "stride": 8}, name="lm")
    out = stage.process(pa.table({"id": ["a", "b"], "text": TEXTS[:2]})).kept
    direct = score_texts(model, tok, TEXTS[:2], max_length=32, stride=8)
    assert out.column("lm_logprob").to_pylist() == pytest.approx(direct.logprob.tolist(), abs=1e-5)
    assert out.column("lm_bpc").to_pylist() == pytest.approx(direct.bpc.tolist(), abs=1e-6)
    assert stage.backend in ("cpp", "torch")
    sft = pa.table({"id": ["q"], "prompt": ["what jumps?"],
                    "responses": [["the dog", "the lazy dog"]]})
    out = stage.process(sft).kept
    assert out.column("lm_response_tokens").to_pylist()[0] == [
        len(tok(r, add_special_tokens=False)["input_ids"]) + 1 for r in ["the dog", "the lazy dog"]]
    assert len(out.column("lm_response_logprob").to_pylist()[0]) == 2


def test_stride_not_below_max_length_is_rejected_naming_the_field():
    with pytest.raises(ValueError, match="stride"):
        LMLikelihood({"model": "m", "max_length": 8, "stride": 8})
    with pytest.raises(ValueError, match="batch_size"):
        LMLikelihood({"model": "m", "batch_size": 0})
