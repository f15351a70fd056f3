"""``gristmill tokenize`` / ``gristmill train-lm``, and the trainer under torchrun (gloo, 2 ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from gristmill.cli.main import main
from gristmill.pipeline.tokenized import IndexedTokens
from gristmill.trainers.tiny import build_tokenizer, tiny_lm_config

torch.set_num_threads(1)

TEXTS = [f"def g(x): return x * {i}" if i % 2 else f"the sun rose over hill {i}" for i in range(80)]
DOMAINS = ["code" if i % 2 else "web" for i in range(80)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A pipeline-like output folder, its tokenizer and a tiny model config."""
    root = tmp_path_factory.mktemp("cli")
    shards = root / "out" / "shards"
    shards.mkdir(parents=True)
    for k in range(2):
        rows = slice(40 * k, 40 * (k + 1))
        pq.write_table(pa.table({"id": [str(i) for i in range(80)][rows], "text": TEXTS[rows],
                                 "domain": DOMAINS[rows]}), shards / f"part-{k:05d}.parquet")
    tok = build_tokenizer(TEXTS, vocab_size=300, path=root / "tok")
    tiny_lm_config(len(tok), n_layer=1, n_embd=32, n_head=2, n_positions=64).save_pretrained(root / "arch")
    return root


def test_tokenize_command_reads_a_run_output_folder(run_dir):
    assert main(["tokenize", "--tokenizer", str(run_dir / "tok"), "--out", str(run_dir / "tokens"),
                 str(run_dir / "out")]) == 0
    ds = IndexedTokens(run_dir / "tokens")
    assert len(ds) == 80
    assert ds.domain_names == ["web", "code"]
    assert ds.tokenizer_path == str(run_dir / "tok")


@pytest.fixture(scope="module")
def tokens(run_dir):
    from gristmill.pipeline.tokenized import tokenize_shards

    return tokenize_shards(sorted((run_dir / "out" / "shards").iterdir()), run_dir / "tok",
                           run_dir / "train_tokens", progress=False)


def _write_config(run_dir, tokens, out, **kw):
    cfg = dict(train=[str(tokens)], eval={"heldout": str(tokens)},
               out_dir=str(out), model=str(run_dir / "arch"), seq_len=16, batch_size=4,
               max_steps=4, eval_every=2, eval_sequences=4, progress=False)
    cfg.update(kw)
    path = out.parent / f"{out.name}.json"
    path.write_text(json.dumps(cfg))
    return path


def test_train_lm_command_trains_from_a_config_file_with_overrides(run_dir, tokens, tmp_path, capsys):
    cfg = _write_config(run_dir, tokens, tmp_path / "run")
    assert main(["train-lm", str(cfg), "--set", "max_steps=3", "--set", "seed=5"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 3 and set(printed["final_eval"]) >= {"heldout", "heldout/code"}
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["seed"] == 5


def test_two_rank_torchrun_matches_one_rank_with_the_same_global_batch(run_dir, tokens, tmp_path):
    # CPU and gloo even where a GPU is present: two ranks need not have two GPUs.
    one = _write_config(run_dir, tokens, tmp_path / "one", batch_size=4, grad_clip=0.0, device="cpu")
    two = _write_config(run_dir, tokens, tmp_path / "two", batch_size=2, grad_clip=0.0, device="cpu")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert main(["train-lm", str(one)]) == 0
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "-m", "gristmill.cli", "train-lm", str(two)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a = json.loads((tmp_path / "one" / "curves.json").read_text())
    b = json.loads((tmp_path / "two" / "curves.json").read_text())
    assert b["world_size"] == 2 and b["tokens_per_step"] == a["tokens_per_step"]
    # Two ranks of 2 sequences see the same 4 sequences as one rank of 4, so
    # the averaged gradients, losses and weights agree up to float rounding.
    for ra, rb in zip(a["train"], b["train"], strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4)
    ma = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "model")
    mb = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "model")
    for pa_, pb_ in zip(ma.parameters(), mb.parameters(), strict=True):
        torch.testing.assert_close(pa_, pb_, rtol=1e-4, atol=1e-5)
