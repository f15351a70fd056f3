"""lm_likelihood scorer (ours) vs a plain transformers forward + log_softmax + gather loop.

Both score the same records with the same small causal LM (a Llama built from a
config: ``--layers`` x ``--dim``, vocabulary ``--vocab``) and must agree on the
summed log-probabilities. Ours: length-bucketed batches, the model body only,
``gristmill.ext.token_logprobs`` on the final hidden states and the head weight
(no ``tokens x vocab`` logits). Baseline: the same batch size in input order,
``model(...).logits`` then ``log_softmax(-1).gather`` and a padding mask; and
``baseline_sorted``, the same loop on records sorted by length, which separates
what length bucketing gains from what the fused head gains.

Time: one process alternates the two (``--repeats`` rounds after a warm-up round)
and reports each one's median and the ratio, so load from other jobs falls on both
alike. Memory: each method runs once more in a fresh child process, which reports
the peak resident set size during scoring minus the resident size just before
(``VmHWM`` after a reset through ``/proc/self/clear_refs``).

    nice -n 10 .venv/bin/python benchmarks/bench_likelihood_scorer.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("data model token score corpus filter shard train select mixture window batch "
         "likelihood response prompt teacher student vocabulary sample").split()


def make_records(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 300))) for _ in range(n)]


def build_model(path: Path, args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    from gristmill.trainers.tiny import build_tokenizer, tiny_lm_config

    tok = build_tokenizer(make_records(200, seed=1), vocab_size=600, path=path)
    cfg = tiny_lm_config(args.vocab, n_layer=args.layers, n_embd=args.dim, n_head=4,
                         n_positions=1024, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)


def baseline(model, tok, texts: list[str], batch_size: int) -> np.ndarray:
    """The plain loop: padded batches in input order, full logits, log_softmax, gather."""
    from gristmill.scorers.likelihood import encode_texts

    seqs = encode_texts(tok, texts)
    out = np.zeros(len(seqs))
    with torch.inference_mode():
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i : i + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, s in enumerate(chunk):
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            lp = torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None])[..., 0]
            out[i : i + len(chunk)] = (lp * mask[:, 1:]).sum(1).double().numpy()
    return out


def baseline_sorted(model, tok, texts: list[str], batch_size: int) -> np.ndarray:
    """The plain loop on records sorted by length: how much of the gap is bucketing alone."""
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out = np.empty(len(texts))
    out[order] = baseline(model, tok, [texts[i] for i in order], batch_size)
    return out


def ours(model, tok, texts: list[str], batch_size: int) -> np.ndarray:
    from gristmill.scorers.likelihood import score_texts

    return score_texts(model, tok, texts, batch_size=batch_size).logprob


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def load(path: Path, threads: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def child_memory(method: str, path: Path, args: argparse.Namespace) -> dict:
    model, tok = load(path, args.threads)
    texts = make_records(args.records)
    fn = {"ours": ours, "baseline": baseline, "baseline_sorted": baseline_sorted}[method]
    fn(model, tok, texts[:2], args.batch_size)  # one-time costs (thread pool, ext load)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_bytes("VmRSS")
    fn(model, tok, texts, args.batch_size)
    return {"extra_bytes": _status_bytes("VmHWM") - before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--child", choices=["ours", "baseline", "baseline_sorted"], default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child_memory(args.child, Path(args.model_dir), args)))
        return
    from gristmill.ext import backend

    tmp = tempfile.TemporaryDirectory()
    path = Path(tmp.name)
    build_model(path, args)
    model, tok = load(path, args.threads)
    texts = make_records(args.records)
    n_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    methods = {"ours": ours, "baseline": baseline, "baseline_sorted": baseline_sorted}
    times: dict[str, list[float]] = {name: [] for name in methods}
    results = {}
    for round_ in range(args.repeats + 1):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            results[name] = fn(model, tok, texts, args.batch_size)
            if round_:
                times[name].append(time.perf_counter() - t0)
    err = max(float(np.max(np.abs(results["ours"] - results[b])))
              for b in ("baseline", "baseline_sorted"))
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {}
    for name in methods:
        cmd = [sys.executable, __file__, "--child", name, "--model-dir", str(path)] + [
            f"--{k.replace('_', '-')}={getattr(args, k)}"
            for k in ("records", "batch_size", "vocab", "dim", "layers", "threads")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        mem[name] = json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"]
    print(f"{args.records} records, {n_tokens:,} tokens; Llama {args.layers}x{args.dim}, "
          f"vocab {args.vocab:,}; batch {args.batch_size}; {args.threads} thread(s); "
          f"ext backend {backend('cpu')}")
    for name in methods:
        print(f"  {name:15s} {n_tokens / med[name]:>10,.0f} tokens/s  (median {med[name]:.2f}s "
              f"of {args.repeats})  extra peak RSS {mem[name] / 2**20:,.0f} MiB")
    print(f"  speed ratio ours/baseline {med['baseline'] / med['ours']:.2f}x "
          f"(ours/baseline_sorted {med['baseline_sorted'] / med['ours']:.2f}x); peak memory ratio "
          f"baseline/ours {mem['baseline'] / max(mem['ours'], 1):.1f}x; "
          f"max |difference| of summed log-prob {err:.2e}")


if __name__ == "__main__":
    main()
