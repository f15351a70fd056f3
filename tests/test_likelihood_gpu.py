"""LM likelihood scorer and SFT trainer on a CUDA device (skipped without one)."""

from __future__ import annotations

import os

import pytest
import torch

from gristmill.scorers.likelihood import load_model, score_texts
from gristmill.trainers.sft import SFTConfig, train_sft
from gristmill.trainers.tiny import build_tiny_lm, build_tokenizer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TEXTS = ["the quick brown fox jumps over the lazy dog " * k for k in (1, 3, 9)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu-lm")
    build_tokenizer(TEXTS * 10, vocab_size=300, path=d)
    build_tiny_lm(d, d, n_layer=2, n_embd=64, n_head=4, n_positions=64)
    return d


def test_cuda_bf16_scores_match_cpu_float32_and_report_the_cuda_backend(model_dir):
    cpu_model, tok = load_model(str(model_dir), device="cpu", dtype="float32")
    gpu_model, _ = load_model(str(model_dir), device="cuda", dtype="bfloat16")
    ref = score_texts(cpu_model, tok, TEXTS, max_length=32, stride=16)
    got = score_texts(gpu_model, tok, TEXTS, max_length=32, stride=16)
    # On a CUDA device the compiled op must run: a failed CUDA build (which
    # falls back to "torch" with a warning) fails here, unless the torch
    # reference was asked for explicitly.
    expected = "torch" if os.environ.get("GRISTMILL_EXT") == "torch" else "cuda"
    assert got.backend == expected
    assert got.tokens.tolist() == ref.tokens.tolist()
    # bf16 weights and activations: a few per mille of the per-token log-prob.
    assert got.mean_logprob == pytest.approx(ref.mean_logprob, rel=3e-2)
    print("backend", got.backend, "max rel diff",
          float(abs(got.mean_logprob / ref.mean_logprob - 1).max()))


def test_sft_bf16_on_cuda_lowers_the_loss(model_dir, tmp_path):
    pairs = [(f"copy {w}", f"the word is {w}.") for w in ["cat", "dog", "sun", "map"]]
    curves = train_sft(model_dir, pairs, tmp_path / "out",
                       SFTConfig(steps=30, batch_size=4, lr=3e-3, warmup=2, bf16=True,
                                 device="cuda", progress=False))
    assert curves.train_loss[-1] < 0.5 * curves.train_loss[0]
