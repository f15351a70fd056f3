"""GRAPE selector: argmax of the normalized likelihood, recorded index/source, reductions."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gristmill.pipeline.registry import stage_class
from gristmill.scorers.likelihood import score_responses
from gristmill.selectors.grape import Grape, best_responses
from gristmill.trainers.tiny import build_tiny_lm, build_tokenizer

torch.set_num_threads(1)

PROMPTS = ["add 2 and 3", "reverse abc", "spell cat"]
RESPONSES = [["5", "The answer is 5.", "Let me think. 2 plus 3 makes 5, so the answer is 5."],
             ["cba", "The answer is cba."],
             ["c a t", "The answer is c-a-t.", "cat", "C, A, T"]]
SOURCES = [["terse", "plain", "teacher"], ["terse", "plain"], ["spaced", "plain", "terse", "caps"]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("grape-lm")
    build_tokenizer([p + " " + r for p, rs in zip(PROMPTS, RESPONSES, strict=True) for r in rs] * 4,
                    vocab_size=300, path=d)
    build_tiny_lm(d, d, n_layer=1, n_embd=32, n_head=2, n_positions=64, seed=3)
    return d


def sft_batch() -> pa.Table:
    return pa.table({"id": ["a", "b", "c"], "prompt": PROMPTS, "responses": RESPONSES,
                     "response_sources": SOURCES})


def test_grape_keeps_argmax_of_length_normalized_score_with_index_and_source(model_dir):
    out = Grape({"model": str(model_dir)}).process(sft_batch())
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    s = score_responses(model, tok, PROMPTS, RESPONSES)
    expected = [int(np.argmax(lp / tk)) for lp, tk in zip(s.logprob, s.tokens, strict=True)]
    kept = out.kept
    assert out.num_dropped == 0
    assert kept.column("grape_index").to_pylist() == expected
    assert kept.column("grape_source").to_pylist() == [SOURCES[i][k] for i, k in enumerate(expected)]
    assert kept.column("response").to_pylist() == [RESPONSES[i][k] for i, k in enumerate(expected)]
    assert kept.column("grape_score").to_pylist() == pytest.approx(
        [s.logprob[i][k] / s.tokens[i][k] for i, k in enumerate(expected)], abs=1e-6)


def test_sum_reduction_changes_the_pick_on_a_constructed_case():
    # Candidate 0: one token at log p = -2 (mean -2, sum -2);
    # candidate 1: ten tokens at log p = -0.6 each (mean -0.6, sum -6).
    batch = pa.table({"id": ["q"], "prompt": ["p"], "responses": [["short", "long answer"]],
                      "response_sources": [["s", "l"]],
                      "lm_response_logprob": [[-2.0, -6.0]], "lm_response_tokens": [[1, 10]]})
    mean = Grape({"scores_from": "lm"}).process(batch).kept
    total = Grape({"scores_from": "lm", "reduction": "sum"}).process(batch).kept
    assert mean.column("grape_index").to_pylist() == [1]
    assert mean.column("grape_source").to_pylist() == ["l"]
    assert mean.column("grape_score").to_pylist() == [pytest.approx(-0.6)]
    assert total.column("grape_index").to_pylist() == [0]
    assert total.column("response").to_pylist() == ["short"]


def test_grape_reads_columns_of_a_preceding_lm_likelihood_stage(model_dir):
    scored = stage_class("lm_likelihood")({"model": str(model_dir)}, name="lik").process(
        sft_batch()).kept
    from_cols = Grape({"scores_from": "lik"}).process(scored).kept
    standalone = Grape({"model": str(model_dir)}).process(sft_batch()).kept
    assert from_cols.column("grape_index").to_pylist() == standalone.column("grape_index").to_pylist()


def test_rows_without_scorable_candidates_are_dropped_with_reason():
    batch = pa.table({"id": ["a", "b"], "prompt": ["p", "q"], "responses": [[], ["x"]],
                      "lm_response_logprob": [[], [-1.0]], "lm_response_tokens": [[], [1]]})
    out = Grape({"scores_from": "lm"}).process(batch)
    assert out.kept.column("id").to_pylist() == ["b"]
    assert out.dropped.column("reason").to_pylist() == ["no_scorable_response"]
    assert out.kept.column("grape_source").to_pylist() == [None]


def test_best_responses_breaks_ties_by_lowest_index_and_skips_empty():
    idx, score = best_responses([np.array([-1.0, -1.0]), np.array([0.0, -3.0])],
                                [np.array([2, 2]), np.array([0, 3])])
    assert idx.tolist() == [0, 1] and score.tolist() == [-0.5, -1.0]


def test_params_need_exactly_one_of_model_or_scores_from():
    with pytest.raises(ValueError, match="exactly one of model"):
        Grape({})
    with pytest.raises(ValueError, match="exactly one of model"):
        Grape({"model": "m", "scores_from": "lm"})
    with pytest.raises(ValueError, match="reduction"):
        Grape({"model": "m", "reduction": "max"})
