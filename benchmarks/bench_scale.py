"""Scaling of a demo-style recipe with corpus size (issue 11).

The recipe is the demo's shape: length filter, exact and MinHash dedup,
text_stats, gopher, top_fraction, sample and a temperature mixture. The
corpus is ``--base-mb`` of synthetic documents (words drawn from a
20,000-word Zipf vocabulary led by English stop words, three domains) with 5%
exact and 5% near duplicates at every size, written as JSONL files of a
quarter of the base size (so every size runs the process pool, 4 files at
1x); size ``s`` has ``s`` times the documents (independent draws, so the
duplicate rate stays the same). Each size runs in a fresh process
(``engine.workers`` processes below it) and prints: wall time, documents per
second, time per document relative to the first size, peak RSS of the driver
and the largest peak RSS of any worker (``getrusage`` of the process and of
its children), and the load average of the machine before and after the size
ran (the box is shared: wall times are only comparable at similar load). The goals of issue 11 are time per document at 8x within
1.25x of 1x and peak RSS at 8x within 1.2x of 1x.

    .venv/bin/python benchmarks/bench_scale.py --base-mb 200 --sizes 1 2 4 8 --workers 2

Corpora are written under ``benchmarks/_work/scale`` and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent / "_work" / "scale"
DOMAINS = ("web", "books", "code")
STOP_WORDS = ["the", "of", "and", "to", "that", "with", "be", "have"]


def _vocabulary(rng: np.random.Generator, n: int = 20_000) -> np.ndarray:
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    p = 1.0 / np.arange(1, 27)
    p /= p.sum()
    lengths = rng.integers(2, 11, n)
    words = ["".join(rng.choice(letters, k, p=p)) for k in lengths]
    # English stop words as the most frequent ranks, so gopher's stop-word rule passes
    return np.array(STOP_WORDS + words[: n - len(STOP_WORDS)])


def write_corpus(folder: Path, n_bytes: int, seed: int, file_bytes: int) -> int:
    """Write ``n_bytes`` of JSONL documents; returns the number of documents."""
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "DONE"
    if done.exists():
        return int(done.read_text())
    rng = np.random.default_rng(seed)
    vocab = _vocabulary(np.random.default_rng(0))
    zipf = 1.0 / np.arange(1, len(vocab) + 1) ** 1.05
    zipf /= zipf.sum()
    written = docs = part = 0
    recent: list[str] = []
    f = None
    while written < n_bytes:
        if f is None or f.tell() >= file_bytes:
            if f is not None:
                f.close()
            f = open(folder / f"part-{part:04d}.jsonl", "w", encoding="utf-8")  # noqa: SIM115
            part += 1
        r = rng.random()
        if r < 0.05 and recent:
            text = recent[int(rng.integers(len(recent)))]  # exact duplicate
        elif r < 0.10 and recent:
            words = recent[int(rng.integers(len(recent)))].split(" ")
            i = int(rng.integers(len(words)))
            words[i] = str(vocab[int(rng.integers(len(vocab)))])  # one word changed
            text = " ".join(words)
        else:
            n = int(rng.lognormal(5.3, 0.6))
            text = " ".join(rng.choice(vocab, n, p=zipf))
            recent = (recent + [text])[-200:]
        line = json.dumps({"id": f"{seed}-{docs}", "text": text,
                           "domain": DOMAINS[int(rng.integers(3))]}) + "\n"
        f.write(line)
        written += len(line.encode())
        docs += 1
    f.close()
    done.write_text(str(docs))
    return docs


def recipe(corpus: Path, out: Path, docs: int, workers: int) -> dict:
    return {
        "name": "scale", "seed": 0,
        "sources": [{"path": str(corpus), "fields": {"id": "id", "domain": "domain"}}],
        "stages": [
            {"stage": "length_filter", "min_chars": 80},
            {"stage": "exact_dedup"},
            {"stage": "minhash_dedup", "threshold": 0.8},
            {"stage": "text_stats"},
            {"stage": "gopher", "min_words": 20},
            {"stage": "top_fraction", "column": "text_stats_alpha_fraction", "fraction": 0.8},
            {"stage": "sample", "fraction": 0.9},
            {"stage": "mix", "sampler": "temperature", "temperature": 3.0,
             "budget_tokens": max(docs * 100, 1000)},
        ],
        "output": {"path": str(out), "shard_size": "64MB"},
        "engine": {"kind": "local", "workers": workers},
    }


CHILD = r"""
import json, resource, sys, time
from gristmill.pipeline.recipe import parse_recipe
from gristmill.pipeline.runner import run_recipe
body = json.loads(sys.argv[1])
t = time.perf_counter()
m = run_recipe(parse_recipe(body), fresh=True, progress=False, report=False)
wall = time.perf_counter() - t
print(json.dumps({"wall": wall, "read": m["counts"]["read"], "kept": m["counts"]["kept"],
                  "driver_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "worker_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-mb", type=float, default=200)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    base = int(args.base_mb * (1 << 20))
    rows = []
    print(f"base {args.base_mb:g} MB, workers {args.workers}, cpu count {os.cpu_count()}")
    for s in args.sizes:
        corpus = ROOT / f"corpus-{args.base_mb:g}mb-x{s}"
        docs = write_corpus(corpus, base * s, seed=s, file_bytes=base // 4)
        out = ROOT / f"out-{args.base_mb:g}mb-x{s}"
        body = recipe(corpus, out, docs, args.workers)
        load_before = os.getloadavg()
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(body)],
                              capture_output=True, text=True)
        load_after = os.getloadavg()
        if proc.returncode:
            sys.exit(proc.stderr)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append((s, r))
        per_doc = r["wall"] / r["read"]
        rel = per_doc / (rows[0][1]["wall"] / rows[0][1]["read"])
        print(f"{s}x: {r['read']:,} docs, kept {r['kept']:,}, wall {r['wall']:.1f} s, "
              f"{r['read'] / r['wall']:,.0f} docs/s, time/doc {rel:.2f}x of {args.sizes[0]}x, "
              f"peak RSS driver {r['driver_kb'] / 1024:.0f} MB, largest worker "
              f"{r['worker_kb'] / 1024:.0f} MB, load average {load_before[0]:.1f} before, "
              f"{load_after[0]:.1f} / {load_after[1]:.1f} / {load_after[2]:.1f} after", flush=True)
    first, last = rows[0][1], rows[-1][1]
    print(f"{rows[-1][0]}x vs {rows[0][0]}x: time/doc "
          f"{(last['wall'] / last['read']) / (first['wall'] / first['read']):.2f}x (goal <= 1.25), "
          f"driver RSS {last['driver_kb'] / first['driver_kb']:.2f}x, worker RSS "
          f"{last['worker_kb'] / max(first['worker_kb'], 1):.2f}x (goal <= 1.2)")


if __name__ == "__main__":
    main()
