"""Mixture strategies on real, imbalanced multilingual text, validated by training a tiny LM.

After "Upsample or Upweight? Balanced Training on Heavily Imbalanced
Datasets" (Li et al. 2024) and UniMax (Chung et al. 2023).

Corpus: Debian's documentation (debian-reference, debian-handbook,
maint-guide, developers-reference, the aptitude manual; see
``debian_docs.py`` for the ``apt-get`` line), one domain per language. A
document is one section of a page; train and held-out text are split by
whole document. The six languages are subsampled to a geometric span of
training bytes (en > de > fr > es > ja > ru, 150x from largest to smallest
by default); held-out text is the same size for every language. Latin-script
languages share words and subwords with each other; Japanese and Russian
share little with the rest, so for them there is little transfer to lean on.
One byte-level BPE (1,024 tokens) is trained on the training text of all
languages, equal bytes each.

Arms, all on the same token budget and the same tiny Llama (2 layers, 64
wide) trained by ``gristmill.trainers.lm``:

- ``T=1``, ``T=3.33``, ``T=5``: temperature sampling p ∝ q^(1/T)
- ``scal T=5``: sample q, weight losses by p(5)/q (scalarization)
- ``cooldown step``, ``cooldown cos``: T 5 -> 1, switching (step) or decaying
  (cosine) from half-way
- ``unimax N=1``, ``unimax N=4``: UniMax, at most N epochs per language

Measured per arm and seed: held-out bits per byte of every language (token
loss in nats x tokens per byte of that language's held-out text / ln 2), the
worst and mean language, the train - held-out gap of the two smallest
languages (held-out minus training-window bits per byte), and, at the T=1
arm's final model, the variance of minibatch gradients under temperature
sampling T=5 (unweighted) vs scalarization T=5 (q with loss weights),
E ||g - E g||^2 over 24 minibatches. Seeds change the model initialisation
and the batches; the data split is fixed (``--data-seed``). Paired
differences (arm - T=1, per seed) are reported with a 95% t-interval.

Run (about 20-25 minutes on one busy CPU core; ``--quick`` in about 2):

    nice -n 10 .venv/bin/python benchmarks/mixture_validation.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from debian_docs import language_documents, require, take_bytes  # noqa: E402

from gristmill.pipeline.tokenized import IndexedTokens, write_tokenized  # noqa: E402
from gristmill.selectors.mixture import MixtureSchedule, unimax_weights  # noqa: E402
from gristmill.trainers.lm import (  # noqa: E402
    LMTrainConfig,
    MixtureSampler,
    domain_pools,
    train_lm,
    weighted_lm_loss,
)
from gristmill.trainers.tiny import build_tiny_lm, build_tokenizer  # noqa: E402

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "mixture_validation"
LANGS = ["en", "de", "fr", "es", "ja", "ru"]
LN2 = math.log(2)


def build_data(work: Path, largest: int, span: float, heldout_bytes: int, seed: int) -> dict:
    """Tokenized train / held-out corpora, one domain per language."""
    rng = np.random.default_rng(seed)
    sizes = np.geomspace(largest, largest / span, len(LANGS)).round().astype(int)
    docs = {lang: language_documents(lang) for lang in LANGS}
    require(docs, {lang: int(n) + heldout_bytes for lang, n in zip(LANGS, sizes, strict=True)})
    train, held = {}, {}
    for lang, n in zip(LANGS, sizes, strict=True):
        held[lang], rest = take_bytes(docs[lang], heldout_bytes, rng)
        train[lang], _ = take_bytes(rest, int(n), rng)
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = work / "tokenizer"
    per_lang = int(min(sizes.min(), 40_000))
    tok_texts = [d for lang in LANGS for d in take_bytes(train[lang], per_lang, rng)[0]]
    build_tokenizer(tok_texts, vocab_size=1024, path=tok_dir)
    for name, split in (("train", train), ("heldout", held)):
        write_tokenized([d for lang in LANGS for d in split[lang]], str(tok_dir), work / name,
                        domains=[lang for lang in LANGS for _ in split[lang]], progress=False)
    corpus = {name: IndexedTokens(str(work / name)) for name in ("train", "heldout")}
    # Tokens per byte of each language, to turn nats/token into bits/byte.
    tpb = {name: {lang: corpus[name].tokens_per_domain()[lang]
                  / sum(len(d.encode()) + 1 for d in split[lang]) for lang in LANGS}
           for name, split in (("train", train), ("heldout", held))}
    return {"tokenizer": str(tok_dir), "train": str(work / "train"), "heldout": str(work / "heldout"),
            "bytes": {lang: sum(len(d.encode()) for d in train[lang]) for lang in LANGS},
            "docs": {lang: len(train[lang]) for lang in LANGS},
            "heldout_docs": {lang: len(held[lang]) for lang in LANGS}, "tokens_per_byte": tpb}


def schedules(domains: list[str], tokens: np.ndarray, steps: int, budget: int) -> dict[str, MixtureSchedule]:
    return {
        "T=1": MixtureSchedule.temperature(domains, tokens, 1.0, steps),
        "T=3.33": MixtureSchedule.temperature(domains, tokens, 10 / 3, steps),
        "T=5": MixtureSchedule.temperature(domains, tokens, 5.0, steps),
        "scal T=5": MixtureSchedule.scalarization(domains, tokens, 5.0, steps),
        "cooldown step": MixtureSchedule.cooldown(domains, tokens, steps, 5.0, 1.0, "step", 0.5),
        "cooldown cos": MixtureSchedule.cooldown(domains, tokens, steps, 5.0, 1.0, "cosine", 0.5),
        "unimax N=1": MixtureSchedule.constant(domains, unimax_weights(tokens, budget, 1.0), steps,
                                               meta={"method": "unimax", "max_epochs": 1.0}),
        "unimax N=4": MixtureSchedule.constant(domains, unimax_weights(tokens, budget, 4.0), steps,
                                               meta={"method": "unimax", "max_epochs": 4.0}),
    }


def grad_variance(model_dir: Path, train: str, sched: MixtureSchedule, seq_len: int, batch: int,
                  draws: int, seed: int) -> float:
    """E ||g - mean g||^2 of minibatch gradients drawn by ``sched`` (with its loss weights)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    pools = domain_pools([IndexedTokens(train)], seq_len)
    sampler = MixtureSampler(pools, sched, seed=seed)
    lw = sched.loss_weights or {}
    w_dom = torch.tensor([lw.get(d, 1.0) for d in sampler.domains])
    grads = []
    for i in range(draws):
        doms, wins = sampler.draw(i, batch)
        x = torch.from_numpy(sampler.tokens(doms, wins))
        model.zero_grad()
        loss = weighted_lm_loss(model(input_ids=x[:, :-1]).logits, x[:, 1:], w_dom[torch.from_numpy(doms)])
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    G = torch.stack(grads)
    return float(((G - G.mean(0)) ** 2).sum(1).mean())


def interval(x: list[float] | np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% t-interval of ``x``."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def main() -> None:
    ap = argparse.ArgumentParser(description="mixture strategies on real multilingual text")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--largest", type=int, default=600_000, help="training bytes of en")
    ap.add_argument("--span", type=float, default=150.0, help="largest / smallest training bytes")
    ap.add_argument("--heldout-bytes", type=int, default=12_000)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a 2-minute smoke run")
    ap.add_argument("--from-json", help="print the tables of a saved run (benchmarks/_work/"
                                        "mixture_validation.json) instead of training")
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        results, variances = saved["runs"], {k: v["per_seed"] for k, v in saved["summary"]["grad_variance"].items()
                                             if k != "ratio_scal_over_sampling"}
        domains = list(results["T=1"][0]["heldout_bpb"])
        small = list(results["T=1"][0]["gap"])
        print(table(summarize(results, variances, domains, small), results, domains, small))
        print(f"wall time of that run: {saved['summary']['seconds'] / 60:.1f} min")
        return
    if args.quick:
        args.steps, args.seeds, args.largest, args.span = 30, [0], 60_000, 100.0
    torch.set_num_threads(1)
    t0 = time.time()
    if WORK.exists():
        shutil.rmtree(WORK)
    data = build_data(WORK, args.largest, args.span, args.heldout_bytes, args.data_seed)
    train = IndexedTokens(data["train"])
    tok_per_dom = train.tokens_per_domain()
    domains = list(LANGS)
    tokens = np.array([tok_per_dom[d] for d in domains], dtype=np.float64)
    budget = args.steps * args.batch * args.seq_len
    print("training bytes:", data["bytes"], "documents:", data["docs"], "held-out documents:",
          data["heldout_docs"])
    print("tokens:", dict(zip(domains, tokens.astype(int).tolist(), strict=True)),
          f"(largest/smallest {tokens.max() / tokens.min():.0f}x); budget {budget} tokens; "
          f"held-out tokens/byte {({k: round(v, 3) for k, v in data['tokens_per_byte']['heldout'].items()})}")
    arms = schedules(domains, tokens, args.steps, budget)
    for name, s in arms.items():
        print(f"  {name:<14} mean mixture {np.round(s.mean_weights(), 3).tolist()}  loss weights "
              f"{None if s.loss_weights is None else {k: round(v, 2) for k, v in s.loss_weights.items()}}")
    small = [domains[i] for i in np.argsort(tokens)[:2]]
    tpb = data["tokens_per_byte"]
    results: dict[str, list[dict]] = {name: [] for name in arms}
    variances: dict[str, list[float]] = {"sampling T=5": [], "scalarization T=5": []}
    for seed in args.seeds:
        model_dir = build_tiny_lm(data["tokenizer"], WORK / f"init{seed}", n_layer=2, n_embd=64,
                                  n_head=4, n_positions=args.seq_len + 1, seed=seed)
        for name, sched in arms.items():
            out = WORK / f"run-{name.replace(' ', '_').replace('=', '')}-{seed}"
            cfg = LMTrainConfig(train=[data["train"]], eval={"heldout": data["heldout"], "train": data["train"]},
                                out_dir=str(out), model=str(model_dir), seq_len=args.seq_len,
                                batch_size=args.batch, max_steps=args.steps, lr=3e-3, warmup_steps=20,
                                eval_every=args.steps, eval_sequences=12, seed=seed,
                                device="cpu", progress=False)
            t_arm = time.time()
            res = train_lm(cfg, schedule=sched)
            fin = res.final_eval
            held = {d: fin[f"heldout/{d}"] * tpb["heldout"][d] / LN2 for d in domains}
            trn = {d: fin[f"train/{d}"] * tpb["train"][d] / LN2 for d in domains}
            results[name].append({
                "seed": seed, "heldout_bpb": held, "train_bpb": trn, "worst": max(held.values()),
                "mean": float(np.mean(list(held.values()))),
                "gap": {d: held[d] - trn[d] for d in small}, "epochs": res.curves["domain_epochs"],
                "seconds": time.time() - t_arm})
            r = results[name][-1]
            print(f"seed {seed} {name:<14} worst {r['worst']:.3f} mean {r['mean']:.3f} bpb  gap "
                  f"{ {d: round(v, 3) for d, v in r['gap'].items()} }  [{time.time() - t0:.0f}s]", flush=True)
            if name == "T=1":
                final_model = res.model_dir
        for key, arm in (("sampling T=5", "T=5"), ("scalarization T=5", "scal T=5")):
            variances[key].append(grad_variance(final_model, data["train"], arms[arm], args.seq_len,
                                                args.batch, 24, seed))
        print(f"seed {seed} grad variance: sampling {variances['sampling T=5'][-1]:.4f} "
              f"scalarization {variances['scalarization T=5'][-1]:.4f}", flush=True)
    summary = summarize(results, variances, domains, small)
    summary.update(seconds=time.time() - t0, tokens_per_domain=dict(zip(domains, tokens.astype(int).tolist(),
                                                                        strict=True)),
                   training_bytes=data["bytes"], budget_tokens=budget, args=vars(args))
    print(json.dumps(summary, indent=1))
    print(table(summary, results, domains, small))
    (HERE / "_work").mkdir(exist_ok=True)
    with open(HERE / "_work" / "mixture_validation.json", "w") as f:
        json.dump({"summary": summary, "runs": results}, f)


def summarize(results, variances, domains, small) -> dict:
    out: dict = {"arms": {}, "paired_vs_T1": {}, "paired_vs_T5": {}}
    for name, runs in results.items():
        out["arms"][name] = {
            "heldout_bpb_mean_per_language": {d: float(np.mean([r["heldout_bpb"][d] for r in runs]))
                                              for d in domains},
            "worst_per_seed": [r["worst"] for r in runs], "mean_per_seed": [r["mean"] for r in runs],
            "gap_per_seed": {d: [r["gap"][d] for r in runs] for d in small},
            "epochs_smallest": float(np.mean([r["epochs"][small[0]] for r in runs])),
        }
        for ref, key_out in (("T=1", "paired_vs_T1"), ("T=5", "paired_vs_T5")):
            if name != ref:
                out[key_out][name] = {
                    key: interval([r[key] - b[key] for r, b in zip(runs, results[ref], strict=True)])
                    for key in ("worst", "mean")}
    out["grad_variance"] = {k: {"per_seed": v, "mean_ci": interval(v)} for k, v in variances.items()}
    ratio = np.asarray(variances["scalarization T=5"]) / np.asarray(variances["sampling T=5"])
    out["grad_variance"]["ratio_scal_over_sampling"] = {"per_seed": ratio.tolist(), "mean_ci": interval(ratio)}
    return out


def _ci(paired: dict | None, key: str) -> str:
    if not paired:
        return ""
    m, lo, hi = paired[key]
    return f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def table(summary, results, domains, small) -> str:
    """The Markdown table recorded in RESULTS.md."""
    lines = ["| arm | " + " | ".join(domains) + " | worst (per seed) | mean (per seed) | worst − T=1 [95% CI] "
             "| mean − T=1 [95% CI] | gap " + " / ".join(small) + " | epochs " + small[0] + " |",
             "|---" * (len(domains) + 7) + "|"]
    for name, arm in summary["arms"].items():
        per = arm["heldout_bpb_mean_per_language"]
        paired = summary["paired_vs_T1"].get(name)
        gaps = " / ".join(f"{np.mean(arm['gap_per_seed'][d]):.2f}" for d in small)
        lines.append(f"| {name} | " + " | ".join(f"{per[d]:.3f}" for d in domains)
                     + f" | {np.mean(arm['worst_per_seed']):.3f} ({', '.join(f'{v:.3f}' for v in arm['worst_per_seed'])})"
                     + f" | {np.mean(arm['mean_per_seed']):.3f} ({', '.join(f'{v:.3f}' for v in arm['mean_per_seed'])})"
                     + f" | {_ci(paired, 'worst')} | {_ci(paired, 'mean')} | {gaps} | {arm['epochs_smallest']:.1f} |")
    lines += ["", "| arm | worst − T=5 [95% CI] | mean − T=5 [95% CI] |", "|---|---|---|"]
    for name, paired in summary["paired_vs_T5"].items():
        lines.append(f"| {name} | {_ci(paired, 'worst')} | {_ci(paired, 'mean')} |")
    gv = summary["grad_variance"]
    lines.append("")
    lines.append("gradient variance E||g - Eg||^2 at the T=1 model, per seed: sampling T=5 "
                 + ", ".join(f"{v:.3f}" for v in gv["sampling T=5"]["per_seed"]) + "; scalarization T=5 "
                 + ", ".join(f"{v:.3f}" for v in gv["scalarization T=5"]["per_seed"])
                 + "; ratio {:.1f} [{:.1f}, {:.1f}]".format(*gv["ratio_scal_over_sampling"]["mean_ci"]))
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
