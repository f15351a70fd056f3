"""The LM trainer on a CUDA device (skipped without one)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from test_lm import config, corpus  # noqa: F401  (the shared tiny corpus fixture)

from gristmill.trainers.lm import train_lm
from gristmill.trainers.tiny import tiny_lm_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_fp32_matches_cpu_at_initialisation_and_after_training(corpus, tmp_path):  # noqa: F811
    runs = {dev: train_lm(config(corpus, tmp_path / dev, max_steps=5, eval_every=5, device=dev),
                          model_config=corpus["model"]) for dev in ("cpu", "cuda")}
    cpu, gpu = (runs[d].curves["eval"] for d in ("cpu", "cuda"))
    for a, b in zip(cpu, gpu, strict=True):
        assert b["target"] == pytest.approx(a["target"], rel=1e-3)


def test_bf16_on_cuda_lowers_held_out_loss(corpus, tmp_path):  # noqa: F811
    result = train_lm(config(corpus, tmp_path, max_steps=40, bf16=True, device="cuda"),
                      model_config=corpus["model"])
    evals = result.curves["eval"]
    assert evals[-1]["target"] < evals[0]["target"] - 1.5


def test_bf16_throughput_of_a_small_llama_on_cuda(corpus, tmp_path):  # noqa: F811
    model = tiny_lm_config(len(corpus["tok"]), n_layer=8, n_embd=512, n_head=8, n_positions=256)
    cfg = config(corpus, tmp_path, seq_len=64, batch_size=64, max_steps=60, bf16=True, device="cuda",
                 eval={}, log_every=10)
    t0 = time.time()
    result = train_lm(cfg, model_config=model)
    seconds = time.time() - t0
    losses = [r["loss"] for r in result.curves["train"]]
    print(f"\n8x512 llama, bf16, {result.tokens} tokens in {seconds:.1f} s "
          f"(loop {result.curves['seconds']:.1f} s): {result.tokens / result.curves['seconds']:.0f} tokens/s; "
          f"train loss {losses[0]:.2f} -> {losses[-1]:.2f} on {torch.cuda.get_device_name()}")
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
