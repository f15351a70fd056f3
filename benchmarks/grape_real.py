"""GRAPE on real text: does SFT on the responses that fit the base model beat the alternatives?

"The Best Instruction-Tuning Data are Those That Fit" (Zhang et al., 2025):
per instruction keep the candidate with the highest length-normalized
log-likelihood under the base model, ``(1/|y|) sum_t log p(y_t | x, y_<t)``
(``gristmill.selectors.grape``). Nothing here has a built-in answer:

1. Instructions from the APT package descriptions of
   ``gristmill.pipeline.real_corpus`` (human writing, tens of thousands):
   "What does the Debian package NAME do?" (packages whose long description
   has 120-600 characters), each with five real candidate
   responses that differ in content and quality: ``short`` (its one-line
   description), ``long`` (its long description), ``first_sentence`` (the
   long description's first sentence), ``truncated`` (the long description
   cut mid-sentence at 40%) and ``wrong`` (the long description of another
   package).
2. Base model A: a small Llama pretrained from scratch (``trainers/lm.py``)
   on the English manuals and the descriptions of *other* packages (the SFT
   and held-out packages are left out). Base model B, for "GRAPE under a
   different base model": the same size pretrained on the manuals only
   (English and seven other languages), without any package description.
3. Arms, each fine-tuned from A for the same steps and batch size
   (``trainers/sft.py``): ``grape`` (responses picked by A), ``grape_B``
   (picked by B, trained on A), each fixed source, ``random`` (one source
   per instruction, a hash of (seed, id)) and ``all`` (every candidate as
   its own pair).
4. Held-out packages (test split, never seen): multiple-choice accuracy by
   likelihood, 4 choices, in the ``short``, ``first_sentence`` and ``long``
   styles (the correct package's response vs three other held-out packages'
   responses in the same style, per-character normalized), and the bits per
   byte of the correct ``short`` and ``long`` responses.

Seeds change the SFT run (initial order, random arm); the two base models
are pretrained once (seed 0). Paired differences GRAPE - arm per seed with a
95% t interval.

    nice .venv/bin/python benchmarks/grape_real.py            # full
    nice .venv/bin/python benchmarks/grape_real.py --quick    # smoke
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_common import (  # noqa: E402
    ENGLISH_MANUALS,
    accuracy,
    choice_questions,
    choice_scores,
    fmt_ci,
    load,
    load_corpus,
    t_interval,
)

SOURCES = ("short", "long", "first_sentence", "truncated", "wrong")
ARMS = ("grape", "grape_B", *SOURCES, "random", "all")
MC_STYLES = ("short", "first_sentence", "long")
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def prompt_of(name: str) -> str:
    return f"Question: What does the Debian package {name} do?\nAnswer:"


def candidates(p: dict, other: dict) -> dict[str, str]:
    long = p["long"]
    first = _SENT.split(long, maxsplit=1)[0]
    cut = long[: max(20, int(0.4 * len(long)))]
    cut = cut[: cut.rfind(" ")] if " " in cut else cut
    return {"short": p["short"], "long": long, "first_sentence": first, "truncated": cut,
            "wrong": other["long"]}


def usable(p: dict) -> bool:
    return bool(p["short"]) and 120 <= len(p["long"]) <= 600


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/_work/grape_real")
    ap.add_argument("--corpus", default="benchmarks/_work/real/corpus")
    ap.add_argument("--quick", action="store_true", help="tiny slice: a smoke test, not figures")
    ap.add_argument("--n-train", type=int, default=1500, help="SFT instructions")
    ap.add_argument("--n-heldout", type=int, default=150, help="held-out packages")
    ap.add_argument("--pretrain-docs", type=int, default=12000)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--sft-steps", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16, help="SFT sequences per step")
    ap.add_argument("--pretrain-batch", type=int, default=8, help="pretraining windows per step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--sft-lr", type=float, default=1e-3)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.quick:
        args.n_train, args.n_heldout, args.pretrain_docs = 120, 60, 1500
        args.pretrain_steps, args.sft_steps, args.width, args.vocab = 40, 15, 32, 1024
        args.out, args.corpus = args.out + "_quick", args.corpus + "_quick"

    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from gristmill.pipeline.hashing import uniform
    from gristmill.pipeline.tokenized import write_tokenized
    from gristmill.selectors.grape import Grape
    from gristmill.trainers.lm import LMTrainConfig, train_lm
    from gristmill.trainers.sft import SFTConfig, pad_token_id, sft_examples, train_examples
    from gristmill.trainers.tiny import build_tokenizer, tiny_lm_config

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    # 1. instructions and candidates
    docs, pkgs = load_corpus(Path(args.corpus), args.quick)
    rng = random.Random(0)
    train_pk = [p for p in pkgs if p["split"] == "train" and usable(p)]
    test_pk = [p for p in pkgs if p["split"] == "test" and usable(p)]
    rng.shuffle(train_pk)
    rng.shuffle(test_pk)
    sft_pk, held = train_pk[: args.n_train], test_pk[: args.n_heldout]
    sft_names = {p["package"] for p in sft_pk}
    tasks = []
    for i, p in enumerate(sft_pk):
        other = sft_pk[(i + 1 + rng.randrange(len(sft_pk) - 1)) % len(sft_pk)]
        c = candidates(p, other)
        tasks.append({"id": p["package"], "prompt": prompt_of(p["package"]),
                      "responses": [c[s] for s in SOURCES], "response_sources": list(SOURCES)})
    held_items = {s: [("all", prompt_of(p["package"]), candidates(p, p)[s]) for p in held]
                  for s in MC_STYLES}
    mc = {s: choice_questions(held_items[s], 4, random.Random(f"mc{s}"), len(held))
          for s in MC_STYLES}
    nll_pairs = {s: [(prompt_of(p["package"]), candidates(p, p)[s]) for p in held]
                 for s in ("short", "long")}

    # 2. base models A (manuals + other packages' descriptions) and B (manuals only)
    t0 = time.time()
    manuals = [r for r in docs if r["split"] == "train" and r["source"] in ENGLISH_MANUALS]
    foreign = [r for r in docs if r["split"] == "train" and r["lang"] != "en"]
    descs = [r for r in docs if r["split"] == "train" and r["source"] == "pkgdesc"
             and r["title"] not in sft_names]
    half = args.pretrain_docs // 2
    prng = np.random.default_rng(0)

    def sample(rs: list[dict], n: int) -> list[dict]:
        return [rs[i] for i in sorted(prng.choice(len(rs), min(n, len(rs)), replace=False))]

    corpus_a = sample(manuals, half) + sample(descs, half)
    corpus_b = sample(manuals, half) + sample(foreign, half)
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        build_tokenizer([r["text"] for r in corpus_a[::2] + corpus_b[::2]]
                        + [t["prompt"] for t in tasks[:200]], vocab_size=args.vocab, path=tok_dir)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    bases = {}
    for name, corpus in (("A", corpus_a), ("B", corpus_b)):
        base_out = out / f"base_{name}"
        if not (base_out / "model" / "config.json").exists():
            prefix = write_tokenized([r["text"] for r in corpus], tok, out / "tok" / name,
                                     progress=False)
            mc_cfg = tiny_lm_config(len(tok), n_layer=args.layers, n_embd=args.width, n_head=4,
                                    n_positions=args.seq_len + 1, bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            cfg = LMTrainConfig(train=[str(prefix)], out_dir=str(base_out), seq_len=args.seq_len,
                                batch_size=args.pretrain_batch, max_steps=args.pretrain_steps,
                                lr=args.lr, warmup_steps=max(1, args.pretrain_steps // 20),
                                eval_every=10**9, seed=0, device=args.device, progress=False,
                                tokenizer=str(tok_dir))
            train_lm(cfg, model_config=mc_cfg)
        bases[name] = str(base_out / "model")
    timings["pretrain"] = time.time() - t0

    # 3. selections
    t0 = time.time()
    import pyarrow as pa

    table = pa.Table.from_pylist(tasks)
    picks = {}
    for name in ("A", "B"):
        kept = Grape({"model": bases[name], "device": args.device, "batch_size": 32}
                     ).process(table).kept
        picks["grape" if name == "A" else "grape_B"] = kept.column("grape_source").to_pylist()
    share = {a: {s: round(picks[a].count(s) / len(picks[a]), 3) for s in SOURCES} for a in picks}
    print(f"GRAPE picks (base A): {share['grape']}\nGRAPE picks (base B): {share['grape_B']}",
          flush=True)
    timings["grape"] = time.time() - t0

    def pairs_of(arm: str, seed: int) -> list[tuple[str, str]]:
        if arm in picks:
            return [(t["prompt"], t["responses"][SOURCES.index(s)])
                    for t, s in zip(tasks, picks[arm], strict=True)]
        if arm == "random":
            u = uniform([t["id"] for t in tasks], seed=seed, salt="random_arm")
            return [(t["prompt"], t["responses"][int(x * len(SOURCES))])
                    for t, x in zip(tasks, u, strict=True)]
        if arm == "all":
            return [(t["prompt"], r) for t in tasks for r in t["responses"]]
        return [(t["prompt"], t["responses"][SOURCES.index(arm)]) for t in tasks]

    # 4. SFT arms from base A, equal steps, several seeds
    t0 = time.time()
    results: dict[str, list[dict]] = {a: [] for a in ["base", *ARMS]}
    base_model, _ = load(bases["A"])
    results["base"].append(heldout(base_model, tok, mc, nll_pairs))
    for seed in range(args.seeds):
        for arm in ARMS:
            model, _ = load(bases["A"])
            cfg = SFTConfig(steps=args.sft_steps, batch_size=args.batch_size, lr=args.sft_lr,
                            min_lr=args.sft_lr / 10, warmup=10, seed=seed, device=args.device,
                            progress=False, max_length=args.seq_len)
            curve = train_examples(model, sft_examples(tok, pairs_of(arm, seed),
                                                       max_length=args.seq_len),
                                   cfg, pad_id=pad_token_id(tok))
            m = heldout(model, tok, mc, nll_pairs)
            m.update(seed=seed, seconds=curve.seconds)
            results[arm].append(m)
            per_style = ", ".join(f"{s} {m['acc_' + s]:.3f}" for s in MC_STYLES)
            print(f"seed {seed} {arm:15s} MC acc {m['acc']:.3f} ({per_style})  "
                  f"bpb short {m['bpb_short']:.3f} long {m['bpb_long']:.3f}", flush=True)
    timings["sft"] = time.time() - t0
    (out / "results_raw.json").write_text(json.dumps({"results": results, "share": share}))
    summary = report(results, share, args)
    summary["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    summary["total_s"] = round(time.time() - t_start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"total {summary['total_s']:.0f} s; wrote {out / 'summary.json'}")
    return summary


def heldout(model, tok, mc: dict, nll_pairs: dict) -> dict:
    from gristmill.scorers.likelihood import score_responses

    out = {}
    accs = []
    for s, qs in mc.items():
        a = accuracy(choice_scores(model, tok, qs), qs)
        out[f"acc_{s}"] = float(a.mean())
        accs.append(a)
    out["acc"] = float(np.mean([a.mean() for a in accs]))
    for s, pairs in nll_pairs.items():
        sc = score_responses(model, tok, [p for p, _ in pairs], [[r] for _, r in pairs],
                             batch_size=32)
        nbytes = np.array([len(r.encode()) + 1 for _, r in pairs], dtype=np.float64)
        lp = np.array([x[0] for x in sc.logprob])
        out[f"bpb_{s}"] = float(np.mean(-lp / (np.log(2) * nbytes)))
    return out


def report(results: dict, share: dict, args) -> dict:
    base = results["base"][0]
    print(f"\nbase A, no SFT: MC acc {base['acc']:.3f}, bpb short {base['bpb_short']:.3f} "
          f"long {base['bpb_long']:.3f}")
    print("\n| arm | MC acc per seed (%) | mean | short | first_sentence | long | bpb short | "
          "bpb long |")
    print("|---|---|---|---|---|---|---|---|")
    table = {}
    for arm in ARMS:
        rs = results[arm]
        table[arm] = {k: [r[k] for r in rs] for k in rs[0] if k != "seed"}
        t = table[arm]
        print(f"| {arm} | {' / '.join(f'{100 * a:.1f}' for a in t['acc'])} | "
              f"{100 * np.mean(t['acc']):.1f} | "
              + " | ".join(f"{100 * np.mean(t[f'acc_{s}']):.1f}" for s in MC_STYLES)
              + f" | {np.mean(t['bpb_short']):.3f} | {np.mean(t['bpb_long']):.3f} |")
    print(f"\npaired difference GRAPE - arm per seed; mean and 95% t interval over {args.seeds} "
          "seeds")
    print("| arm | d acc per seed (points) | d acc [95% CI] | d bpb short [95% CI] | "
          "d bpb long [95% CI] |")
    print("|---|---|---|---|---|")
    diffs = {}
    for arm in ARMS[1:]:
        d = {k: [g - a for g, a in zip(table["grape"][k], table[arm][k], strict=True)]
             for k in ("acc", "bpb_short", "bpb_long")}
        diffs[arm] = {k: {"per_seed": v, "ci": t_interval(v)} for k, v in d.items()}
        print(f"| {arm} | {' / '.join(f'{100 * x:+.1f}' for x in d['acc'])} | "
              f"{fmt_ci(*t_interval(d['acc']), scale=100, digits=1)} | "
              f"{fmt_ci(*t_interval(d['bpb_short']), digits=3)} | "
              f"{fmt_ci(*t_interval(d['bpb_long']), digits=3)} |")
    return {"args": vars(args), "grape_share": share, "base": base, "arms": table,
            "paired_vs_grape": diffs}


if __name__ == "__main__":
    main()
