"""PreSelect on real text (Debian documentation), against baselines that could win.

"Predictive Data Selection: The Data That Predicts Is the Data That Teaches"
(Shum et al., 2025, arXiv:2503.00808). Nothing here has a built-in answer:

1. Corpus: ``gristmill.pipeline.real_corpus`` (English manuals, every APT
   package description, manuals in seven other languages), split
   train/dev/test by whole source document. The pool is train documents,
   at most ``--per-source`` per source.
2. Benchmark, built from dev and test documents only (nothing in the pool
   is a benchmark item): 4-way multiple choice scored by likelihood per
   character (``acc_norm``): (a) ``Package: NAME`` -> its short description
   among those of three other held-out packages; (b) a manual section's
   title -> the first 160 characters of its text among the openings of
   three other held-out sections of the same manual. Dev questions drive
   every choice (family scores, the DCLM classifier, the best source);
   test questions are read once per arm.
3. Family: ``--family`` small Llamas (``trainers/lm.py``), equal tokens,
   each on a random Dirichlet(1) mixture of the 13 domains (6 English
   sources, 7 other languages); their benchmark score is dev accuracy, so
   their ranking comes from training, not from construction.
4. PreSelect: predictive strength S of ``--probe`` pool documents (bits per
   character under each family model, first ``--probe-chars`` characters),
   the paper's labels (S maximal vs as many lowest), fastText on them, the
   pool scored and the top ``--fraction`` of characters kept.
5. Baselines, same fraction of characters: ``random`` (a hash of (seed, id)
   per seed); ``dclm``: a fastText classifier (same hyperparameters) trained
   on target-like text, the dev benchmark items written out (prompt +
   correct answer), against as many random pool documents, as DCLM trains
   on instruction-like positives vs the pool; ``perplexity``: the lowest bits
   per character (first ``--probe-chars`` characters) under the best family model (CCNet-style filtering with
   the model that is best on the benchmark); ``best_source``: every English
   source's pool documents, one model each on seed 0, the best on dev
   accuracy kept (tuned on dev like the other arms).
6. A fresh LM per arm and seed on the same token budget; test accuracy
   (per task), bits per byte per source (the first 1,500 characters of
   ``--bpb-docs`` test documents of every source), paired
   differences against PreSelect per seed and a 95% t interval.

Usage::

    nice .venv/bin/python benchmarks/preselect_real.py            # full (about 40 min on a shared 2-core box)
    nice .venv/bin/python benchmarks/preselect_real.py --quick    # smoke (a few minutes)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_common import (  # noqa: E402
    ENGLISH_MANUALS,
    accuracy,
    bits_per_byte,
    choice_questions,
    choice_scores,
    cut_words,
    fmt_ci,
    load,
    load_corpus,
    t_interval,
)

ARMS = ("preselect", "random", "dclm", "perplexity", "best_source")


def domain_of(r: dict) -> str:
    return r["source"] if r["lang"] == "en" else f"lang-{r['lang']}"


def build_benchmark(docs: list[dict], pkgs: list[dict], split: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"{seed}:{split}")
    pk = [("pkg", f"Package: {p['package']}\nDescription:", " " + p["short"])
          for p in pkgs if p["split"] == split and p["short"]]
    sec = []
    for r in docs:
        if r["split"] != split or r["source"] not in ENGLISH_MANUALS or not r["title"]:
            continue
        head, _, body = r["text"].partition("\n\n")
        if head != r["title"] or len(body) < 200 or len(r["title"]) > 120:
            continue
        sec.append((r["source"], f"{r['title']}\n\n", cut_words(body, 160)))
    qs = choice_questions(pk, 4, rng, n // 2)
    qs += choice_questions(sec, 4, rng, n - len(qs))
    for q in qs:
        q["task"] = "pkg" if q["group"] == "pkg" else "section"
    return qs


def tokenize(texts: list[str], domains: list[str], tokenizer: str, prefix: Path) -> str:
    from gristmill.pipeline.tokenized import write_tokenized

    write_tokenized(texts, tokenizer, prefix, domains=domains, progress=False)
    return str(prefix)


def model_config(args, tok):
    from gristmill.trainers.tiny import tiny_lm_config

    return tiny_lm_config(len(tok), n_layer=args.layers, n_embd=args.width, n_head=4,
                          n_positions=args.seq_len + 1, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def train(train_prefix: str, out: Path, args, seed: int, schedule=None) -> str:
    from gristmill.trainers.lm import LMTrainConfig, train_lm

    if (out / "model" / "config.json").exists() and (out / "curves.json").exists():
        return str(out / "model")
    cfg = LMTrainConfig(train=[train_prefix], out_dir=str(out), seq_len=args.seq_len,
                        batch_size=args.batch_size, max_steps=args.steps, lr=args.lr,
                        warmup_steps=max(1, args.steps // 20), eval_every=10**9, seed=seed,
                        device=args.device, progress=False, tokenizer=args.tokenizer)
    res = train_lm(cfg, model_config=model_config(args, args.tok), schedule=schedule)
    return str(res.model_dir)


def evaluate(path: str, questions: list[dict], bpb_docs: dict[str, list[str]]) -> dict:
    model, tok = load(path)
    acc = accuracy(choice_scores(model, tok, questions), questions)
    tasks = sorted({q["task"] for q in questions})
    out = {"acc": float(acc.mean()), "per_question": acc.tolist(),
           **{f"acc_{t}": float(acc[[q["task"] == t for q in questions]].mean()) for t in tasks}}
    out["bpb"] = {s: float(np.mean(bits_per_byte(model, tok, texts)))
                  for s, texts in bpb_docs.items()}
    return out


def top_chars(records: list[dict], score: np.ndarray, fraction: float) -> list[dict]:
    """The highest-scored records until ``fraction`` of the characters (``top_fraction``'s rule)."""
    order = np.argsort(-score, kind="stable")
    chars = np.array([len(records[i]["text"]) for i in order])
    k = int(np.searchsorted(np.cumsum(chars), fraction * chars.sum())) + 1
    return [records[i] for i in order[:k]]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/_work/preselect_real")
    ap.add_argument("--corpus", default="benchmarks/_work/real/corpus")
    ap.add_argument("--quick", action="store_true", help="tiny slice: a smoke test, not figures")
    ap.add_argument("--per-source", type=int, default=1200, help="pool documents per source")
    ap.add_argument("--questions", type=int, default=1000, help="per split (half per task)")
    ap.add_argument("--family", type=int, default=6)
    ap.add_argument("--probe", type=int, default=2000)
    ap.add_argument("--probe-chars", type=int, default=1000)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps of every LM")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--bpb-docs", type=int, default=10, help="test documents per source for bpb")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.quick:
        args.per_source, args.questions, args.family, args.probe = 150, 200, 6, 400
        args.steps, args.width, args.vocab, args.bpb_docs = 40, 32, 1024, 4
        args.out = args.out + "_quick"
        args.corpus = args.corpus + "_quick"

    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from gristmill.pipeline.hashing import uniform
    from gristmill.scorers.fasttext import load_fasttext, predict_proba
    from gristmill.scorers.predictive import model_losses, predictive_strength, preselect_labels
    from gristmill.selectors.mixture import MixtureSchedule
    from gristmill.trainers.fasttext import train_fasttext
    from gristmill.trainers.tiny import build_tokenizer

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    # 1. corpus, pool, benchmark
    docs, pkgs = load_corpus(Path(args.corpus), args.quick)
    rng = np.random.default_rng(0)
    pool: list[dict] = []
    for src in sorted({r["source"] for r in docs}):
        cand = [r for r in docs if r["source"] == src and r["split"] == "train"]
        if len(cand) > args.per_source:
            cand = [cand[i] for i in sorted(rng.choice(len(cand), args.per_source, replace=False))]
        pool += cand
    for r in pool:
        r["domain"] = domain_of(r)
    domains = sorted({r["domain"] for r in pool})
    dev_q = build_benchmark(docs, pkgs, "dev", args.questions, 0)
    test_q = build_benchmark(docs, pkgs, "test", args.questions, 0)
    bpb_docs: dict[str, list[str]] = {}
    for src in sorted({r["source"] for r in docs}):
        t = [r["text"] for r in docs if r["source"] == src and r["split"] == "test"]
        if t:
            bpb_docs[src] = [x[:1500] for x in t[:: max(1, len(t) // args.bpb_docs)]
                             ][: args.bpb_docs]
    pool_chars = sum(len(r["text"]) for r in pool)
    print(f"pool: {len(pool)} documents, {pool_chars / 1e6:.1f}M chars, {len(domains)} domains; "
          f"benchmark dev {len(dev_q)} / test {len(test_q)} questions", flush=True)
    args.tokenizer = str(out / "tokenizer")
    if not (out / "tokenizer" / "tokenizer.json").exists():
        sample = [pool[i]["text"] for i in rng.choice(len(pool), min(4000, len(pool)), replace=False)]
        build_tokenizer(sample, vocab_size=args.vocab, path=args.tokenizer)
    args.tok = AutoTokenizer.from_pretrained(args.tokenizer)
    pool_tok = tokenize([r["text"] for r in pool], [r["domain"] for r in pool], args.tokenizer,
                        out / "tok" / "pool")
    timings["corpus"] = time.time() - t_start

    # 2. the family: equal tokens, random mixtures, scored on dev accuracy
    t0 = time.time()
    frng = np.random.default_rng(7)
    family = []
    for k in range(args.family):
        w = frng.dirichlet(np.ones(len(domains)))
        sched = MixtureSchedule.constant(domains, w, args.steps)
        path = train(pool_tok, out / "family" / f"m{k}", args, 100 + k, schedule=sched)
        model, tok = load(path)
        acc = accuracy(choice_scores(model, tok, dev_q), dev_q)
        test_acc = accuracy(choice_scores(model, tok, test_q), test_q)
        family.append({"path": path, "dev_acc": float(acc.mean()), "test_acc": float(test_acc.mean()),
                       "weights": dict(zip(domains, np.round(w, 3).tolist(), strict=True))})
        print(f"family m{k}: dev acc {acc.mean():.3f}  test acc {test_acc.mean():.3f}", flush=True)
    timings["family"] = time.time() - t0

    # 3. PreSelect: S on a probe sample, labels, fastText, select
    t0 = time.time()
    probe_idx = rng.choice(len(pool), min(args.probe, len(pool)), replace=False)
    probe = [pool[i] for i in probe_idx]
    texts = [r["text"][: args.probe_chars] for r in probe]
    bpc = model_losses([(m["path"], m["dev_acc"]) for m in family], texts, device=args.device,
                       batch_size=32)
    scores = [m["dev_acc"] for m in family]
    S = predictive_strength(bpc, scores)
    labels = preselect_labels(S, [r["id"] for r in probe], seed=0)
    keep = labels >= 0
    ft = train_fasttext([probe[i]["text"] for i in np.flatnonzero(keep)], labels[keep],
                        out / "preselect.bin", ids=[probe[i]["id"] for i in np.flatnonzero(keep)],
                        bucket=200_000, valid_fraction=0.2)
    ps_score = predict_proba(load_fasttext(out / "preselect.bin"), [r["text"] for r in pool])
    selections = {"preselect": top_chars(pool, ps_score, args.fraction)}
    timings["preselect"] = time.time() - t0

    # 4. baselines
    t0 = time.time()
    pos = [q["prompt"] + q["choices"][q["answer"]] for q in dev_q]
    neg_idx = rng.choice(len(pool), min(len(pos), len(pool)), replace=False)
    neg = [pool[i]["text"] for i in neg_idx]
    dclm = train_fasttext(pos + neg, [1] * len(pos) + [0] * len(neg), out / "dclm.bin",
                          ids=[f"p{i}" for i in range(len(pos))] + [pool[i]["id"] for i in neg_idx],
                          bucket=200_000, valid_fraction=0.2)
    selections["dclm"] = top_chars(pool, predict_proba(load_fasttext(out / "dclm.bin"),
                                                       [r["text"] for r in pool]), args.fraction)
    best = max(family, key=lambda m: m["dev_acc"])
    ppl = model_losses([(best["path"], 0.0)], [r["text"][: args.probe_chars] for r in pool],
                       device=args.device, batch_size=32)[:, 0]
    selections["perplexity"] = top_chars(pool, -ppl, args.fraction)
    timings["baselines"] = time.time() - t0

    t0 = time.time()
    source_dev = {}
    for src in [s for s in domains if s in ("handbook", "reference", "perl", "postgres", "git",
                                            "pkgdesc")]:
        recs = [r for r in pool if r["source"] == src]
        prefix = tokenize([r["text"] for r in recs], [src] * len(recs), args.tokenizer,
                          out / "tok" / f"source_{src}")
        path = train(prefix, out / "sources" / src, args, 0)
        model, tok = load(path)
        source_dev[src] = float(accuracy(choice_scores(model, tok, dev_q), dev_q).mean())
        print(f"single source {src}: dev acc {source_dev[src]:.3f}", flush=True)
    best_source = max(source_dev, key=source_dev.get)
    timings["best_source_tuning"] = time.time() - t0

    # 5. arms: fresh LMs at equal tokens, several seeds
    t0 = time.time()
    results: dict[str, list[dict]] = {a: [] for a in ARMS}
    share = {}
    for arm, recs in selections.items():
        share[arm] = {d: round(sum(len(r["text"]) for r in recs if r["domain"] == d) /
                               max(1, sum(len(r["text"]) for r in recs)), 3) for d in domains}
    for seed in range(args.seeds):
        u = uniform([r["id"] for r in pool], seed=seed, salt="random_arm")
        selections[f"random{seed}"] = top_chars(pool, u, args.fraction)
        for arm in ARMS:
            if arm == "random":
                recs = selections[f"random{seed}"]
            elif arm == "best_source":
                recs = [r for r in pool if r["source"] == best_source]
            else:
                recs = selections[arm]
            name = f"{arm}{seed}" if arm == "random" else arm
            prefix = out / "tok" / f"arm_{name}"
            if not Path(str(prefix) + ".idx").exists():
                tokenize([r["text"] for r in recs], ["all"] * len(recs), args.tokenizer, prefix)
            path = train(str(prefix), out / "arms" / f"{arm}_s{seed}", args, seed)
            res = evaluate(path, test_q, bpb_docs)
            res["seed"] = seed
            results[arm].append(res)
            print(f"seed {seed} {arm:12s} test acc {res['acc']:.3f} (pkg {res['acc_pkg']:.3f}, "
                  f"section {res['acc_section']:.3f})  mean bpb "
                  f"{np.mean(list(res['bpb'].values())):.3f}", flush=True)
    timings["arms"] = time.time() - t0
    share["random"] = {d: round(float(np.mean([
        sum(len(r["text"]) for r in selections[f"random{s}"] if r["domain"] == d) /
        sum(len(r["text"]) for r in selections[f"random{s}"]) for s in range(args.seeds)])), 3)
        for d in domains}
    share["best_source"] = {d: float(d == best_source) for d in domains}

    # 6. report
    (out / "results_raw.json").write_text(json.dumps({"results": results, "family": family,
                                                      "source_dev": source_dev}))
    summary = report(results, family, source_dev, best_source, share, ft, dclm, S, labels, args)
    summary["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    summary["total_s"] = round(time.time() - t_start, 1)
    summary["pool"] = {"documents": len(pool), "chars": pool_chars, "domains": domains}
    summary["benchmark"] = {"dev": len(dev_q), "test": len(test_q)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"total {summary['total_s']:.0f} s; wrote {out / 'summary.json'}")
    return summary


def report(results, family, source_dev, best_source, share, ft, dclm, S, labels, args) -> dict:
    from scipy import stats

    fam_dev = [m["dev_acc"] for m in family]
    fam_test = [m["test_acc"] for m in family]
    rho = float(stats.spearmanr(fam_dev, fam_test).statistic) if len(family) > 2 else float("nan")
    print(f"\nfamily dev acc {np.round(fam_dev, 3).tolist()}, test acc "
          f"{np.round(fam_test, 3).tolist()}; Spearman(dev, test) = {rho:.2f}")
    print(f"PreSelect labels: {int((labels == 1).sum())} positive, {int((labels == 0).sum())} "
          f"negative of {labels.size}; S mean {np.nanmean(S):.3f}; fastText AUC "
          f"{ft.auc if ft.auc is None else round(ft.auc, 3)}; DCLM AUC "
          f"{dclm.auc if dclm.auc is None else round(dclm.auc, 3)}")
    print(f"best single source on dev: {best_source} ({source_dev})")
    seeds = args.seeds
    sources = list(results["preselect"][0]["bpb"])
    print("\n| arm | test acc per seed (%) | mean | pkg | section | mean bpb |")
    print("|---|---|---|---|---|---|")
    table = {}
    for arm in ARMS:
        rs = results[arm]
        acc = [r["acc"] for r in rs]
        bpb = [float(np.mean(list(r["bpb"].values()))) for r in rs]
        table[arm] = {"acc": acc, "bpb_mean": bpb,
                      "acc_pkg": [r["acc_pkg"] for r in rs],
                      "acc_section": [r["acc_section"] for r in rs],
                      "bpb": {s: [r["bpb"][s] for r in rs] for s in sources}}
        print(f"| {arm} | {' / '.join(f'{100 * a:.1f}' for a in acc)} | {100 * np.mean(acc):.1f} | "
              f"{100 * np.mean(table[arm]['acc_pkg']):.1f} | "
              f"{100 * np.mean(table[arm]['acc_section']):.1f} | {np.mean(bpb):.3f} |")
    print("\npaired difference PreSelect - arm, per seed; mean and 95% t interval over "
          f"{seeds} seeds")
    print("| arm | d acc per seed (points) | d acc mean [95% CI] | d mean bpb [95% CI] |")
    print("|---|---|---|---|")
    diffs = {}
    for arm in ARMS[1:]:
        da = [p - a for p, a in zip(table["preselect"]["acc"], table[arm]["acc"], strict=True)]
        db = [p - a for p, a in zip(table["preselect"]["bpb_mean"], table[arm]["bpb_mean"],
                                    strict=True)]
        diffs[arm] = {"acc": da, "acc_ci": t_interval(da), "bpb": db, "bpb_ci": t_interval(db)}
        print(f"| {arm} | {' / '.join(f'{100 * d:+.1f}' for d in da)} | "
              f"{fmt_ci(*t_interval(da), scale=100, digits=1)} | {fmt_ci(*t_interval(db), digits=3)} |")
    print("\nbits per byte per source (mean over seeds)")
    print("| source | " + " | ".join(ARMS) + " |")
    print("|---|" + "---|" * len(ARMS))
    for s in sources:
        print(f"| {s} | " + " | ".join(f"{np.mean(table[a]['bpb'][s]):.3f}" for a in ARMS) + " |")
    print("\nshare of characters per domain in each selection")
    doms = list(share["preselect"])
    print("| domain | " + " | ".join(share) + " |")
    print("|---|" + "---|" * len(share))
    for d in doms:
        print(f"| {d} | " + " | ".join(f"{share[a][d]:.2f}" for a in share) + " |")
    return {"args": {k: v for k, v in vars(args).items() if k != "tok"},
            "family": family, "family_spearman_dev_test": rho, "source_dev_acc": source_dev,
            "best_source": best_source, "fasttext_auc": ft.auc, "dclm_auc": dclm.auc,
            "labels": {"positive": int((labels == 1).sum()), "negative": int((labels == 0).sum())},
            "arms": table, "paired_vs_preselect": diffs, "domain_share": share,
            "per_question": {a: [r["per_question"] for r in results[a]] for a in ARMS}}


if __name__ == "__main__":
    main()
