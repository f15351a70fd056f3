"""Mixture strategies on an imbalanced corpus, validated by training a tiny LM.

After "Upsample or Upweight? Balanced Training on Heavily Imbalanced
Datasets" (Li et al. 2024) and UniMax (Chung et al. 2023).

Corpus: six synthetic domains (``d0`` largest ... ``d5`` smallest; token
counts span about 200x). Each domain is its own "language": a vocabulary of
pseudo-words from domain-specific syllables and a sparse random bigram chain
over them, so domains share no words and a small domain is only learnt from
its own data. Held-out text comes from the same chains.

Arms, all on the same token budget and the same tiny Llama (2 layers, 64
wide) trained by ``gristmill.trainers.lm``:

- ``T=1``        natural mixture p = q
- ``T=5``        temperature sampling p ∝ q^(1/5)
- ``scal T=5``   sample q, loss weights p(5)/q (scalarization)
- ``cooldown``   temperature 5 -> 1, cosine from half-way
- ``unimax``     UniMax, at most 4 epochs per domain

Measured per arm over 3 seeds: per-domain held-out loss, the worst domain's
loss, the smallest domain's train-validation gap (held-out loss minus loss
on its training windows; positive = overfitting), and,
at the T=1 arm's final model, the variance of minibatch gradients under
temperature sampling (T=5, unweighted) vs scalarization (q with weights):
E ||g - E g||^2 over 24 minibatches. Plots: ``mixture_validation.png``.

Run: ``nice -n 10 .venv/bin/python benchmarks/mixture_validation.py``
(about 10-20 minutes on 2 shared CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

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
# Characters of training text per domain: 240x from largest to smallest.
DOMAIN_CHARS = [480_000, 160_000, 50_000, 16_000, 5_000, 2_000]
HELDOUT_CHARS = 4_000
SYLLABLES = ["ka", "lo", "mi", "nu", "pe", "ri", "sa", "to", "ve", "zu", "ba", "de", "fi", "go",
             "hu", "ja", "ke", "li", "mo", "ne", "po", "qu", "ru", "si", "ta", "wi", "xo", "yu"]


def domain_generator(d: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Words, start distribution and bigram matrix of domain ``d``'s language."""
    rng = np.random.default_rng(100 + d)
    syl = rng.choice(SYLLABLES, size=8, replace=False)
    words = sorted({"".join(rng.choice(syl, size=rng.integers(1, 4))) for _ in range(200)})[:48]
    k = len(words)
    trans = rng.dirichlet(np.full(k, 0.08), size=k)  # sparse rows: predictable continuations
    return words, np.full(k, 1 / k), trans


def generate(d: int, chars: int, seed: int) -> list[str]:
    words, start, trans = domain_generator(d)
    rng = np.random.default_rng([seed, d])
    docs, total = [], 0
    while total < chars:
        w = rng.choice(len(words), p=start)
        out = [words[w]]
        for _ in range(rng.integers(20, 60)):
            w = rng.choice(len(words), p=trans[w])
            out.append(words[w])
        doc = " ".join(out) + "."
        docs.append(doc)
        total += len(doc)
    return docs


def build_data(work: Path) -> dict[str, str]:
    work.mkdir(parents=True, exist_ok=True)
    train = [(f"d{d}", t) for d, c in enumerate(DOMAIN_CHARS) for t in generate(d, c, seed=1)]
    held = [(f"d{d}", t) for d in range(len(DOMAIN_CHARS)) for t in generate(d, HELDOUT_CHARS, seed=2)]
    tok_dir = work / "tokenizer"
    # Balanced tokenizer training text so no domain's words are left unmerged.
    tok_texts = [t for d in range(len(DOMAIN_CHARS)) for t in generate(d, 2_000, seed=3)]
    build_tokenizer(tok_texts, vocab_size=512, path=tok_dir)
    write_tokenized([t for _, t in train], str(tok_dir), work / "train",
                    domains=[d for d, _ in train], progress=False)
    write_tokenized([t for _, t in held], str(tok_dir), work / "heldout",
                    domains=[d for d, _ in held], progress=False)
    return {"tokenizer": str(tok_dir), "train": str(work / "train"), "heldout": str(work / "heldout")}


def schedules(domains: list[str], tokens: np.ndarray, steps: int, budget: int) -> dict[str, MixtureSchedule]:
    return {
        "T=1": MixtureSchedule.temperature(domains, tokens, 1.0, steps),
        "T=5": MixtureSchedule.temperature(domains, tokens, 5.0, steps),
        "scal T=5": MixtureSchedule.scalarization(domains, tokens, 5.0, steps),
        "cooldown 5->1": MixtureSchedule.cooldown(domains, tokens, steps, 5.0, 1.0, "cosine", 0.5),
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


def main() -> None:
    ap = argparse.ArgumentParser(description="mixture strategies on an imbalanced corpus")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    if WORK.exists():
        shutil.rmtree(WORK)
    data = build_data(WORK)
    train = IndexedTokens(data["train"])
    tok_per_dom = train.tokens_per_domain()
    domains = sorted(tok_per_dom)
    tokens = np.array([tok_per_dom[d] for d in domains], dtype=np.float64)
    budget = args.steps * args.batch * args.seq_len
    print("tokens per domain:", dict(zip(domains, tokens.astype(int).tolist(), strict=True)),
          f"(largest/smallest {tokens.max() / tokens.min():.0f}x); budget {budget} tokens")
    arms = schedules(domains, tokens, args.steps, budget)
    for name, s in arms.items():
        print(f"  {name:<14} mean mixture {np.round(s.mean_weights(), 3).tolist()}  "
              f"loss weights {None if s.loss_weights is None else {k: round(v, 2) for k, v in s.loss_weights.items()}}")
    smallest = domains[int(np.argmin(tokens))]
    results: dict[str, list[dict]] = {name: [] for name in arms}
    variances: dict[str, list[float]] = {"sampling T=5": [], "scalarization T=5": []}
    for seed in args.seeds:
        model_dir = build_tiny_lm(data["tokenizer"], WORK / f"init{seed}", n_layer=2, n_embd=64,
                                  n_head=4, n_positions=args.seq_len + 1, seed=seed)
        for name, sched in arms.items():
            out = WORK / f"run-{name.replace(' ', '_').replace('>', '')}-{seed}"
            cfg = LMTrainConfig(train=[data["train"]], eval={"heldout": data["heldout"], "train": data["train"]},
                                out_dir=str(out), model=str(model_dir), seq_len=args.seq_len,
                                batch_size=args.batch, max_steps=args.steps, lr=3e-3, warmup_steps=20,
                                eval_every=max(1, args.steps // 6), eval_sequences=12, seed=seed,
                                device="cpu", progress=False)
            res = train_lm(cfg, schedule=sched)
            fin = res.final_eval
            held = {d: fin[f"heldout/{d}"] for d in domains}
            results[name].append({
                "heldout": held, "worst": max(held.values()), "mean": float(np.mean(list(held.values()))),
                "gap_smallest": fin[f"heldout/{smallest}"] - fin[f"train/{smallest}"],
                "curve_smallest": [(e["step"], e[f"heldout/{smallest}"], e[f"train/{smallest}"])
                                   for e in res.curves["eval"]],
                "epochs": res.curves["domain_epochs"],
            })
            print(f"seed {seed} {name:<14} worst {results[name][-1]['worst']:.3f} mean "
                  f"{results[name][-1]['mean']:.3f} gap({smallest}) {results[name][-1]['gap_smallest']:.3f} "
                  f"[{time.time() - t0:.0f}s]", flush=True)
            if name == "T=1":
                final_model = res.model_dir
        variances["sampling T=5"].append(grad_variance(final_model, data["train"], arms["T=5"],
                                                       args.seq_len, args.batch, 24, seed))
        variances["scalarization T=5"].append(grad_variance(final_model, data["train"], arms["scal T=5"],
                                                            args.seq_len, args.batch, 24, seed))
        print(f"seed {seed} grad variance: sampling {variances['sampling T=5'][-1]:.4f} "
              f"scalarization {variances['scalarization T=5'][-1]:.4f}", flush=True)
    summary = summarize(results, variances, domains, smallest)
    summary["seconds"] = time.time() - t0
    summary["tokens_per_domain"] = dict(zip(domains, tokens.astype(int).tolist(), strict=True))
    summary["budget_tokens"] = budget
    print(json.dumps(summary, indent=1))
    (HERE / "_work").mkdir(exist_ok=True)
    with open(HERE / "_work" / "mixture_validation.json", "w") as f:
        json.dump({"summary": summary, "runs": results}, f)
    plot(results, variances, domains, smallest)


def summarize(results, variances, domains, smallest) -> dict:
    out: dict = {"arms": {}}
    for name, runs in results.items():
        held = np.array([[r["heldout"][d] for d in domains] for r in runs])
        out["arms"][name] = {
            "heldout_mean_per_domain": dict(zip(domains, held.mean(0).round(4).tolist(), strict=True)),
            "worst_domain_loss": [float(np.mean([r["worst"] for r in runs])),
                                  float(np.std([r["worst"] for r in runs]))],
            "mean_domain_loss": [float(np.mean([r["mean"] for r in runs])),
                                 float(np.std([r["mean"] for r in runs]))],
            f"gap_{smallest}": [float(np.mean([r["gap_smallest"] for r in runs])),
                                float(np.std([r["gap_smallest"] for r in runs]))],
            f"epochs_{smallest}": float(np.mean([r["epochs"][smallest] for r in runs])),
        }
    out["grad_variance"] = {k: [float(np.mean(v)), float(np.std(v))] for k, v in variances.items()}
    return out


def plot(results, variances, domains, smallest) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = list(results)
    x = np.arange(len(domains))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        held = np.array([[r["heldout"][d] for d in domains] for r in results[name]])
        axes[0].bar(x + i * width, held.mean(0), width, yerr=held.std(0), label=name)
    axes[0].set_xticks(x + 0.4 - width / 2, domains)
    axes[0].set(ylabel="held-out loss (nats/token)", title="per-domain held-out loss (d0 largest)")
    axes[0].legend(fontsize=8)
    for name in names:
        curves = np.array([[c[1] for c in r["curve_smallest"]] for r in results[name]])
        train_c = np.array([[c[2] for c in r["curve_smallest"]] for r in results[name]])
        steps = [c[0] for c in results[name][0]["curve_smallest"]]
        line = axes[1].plot(steps, curves.mean(0), label=f"{name} held-out")[0]
        axes[1].plot(steps, train_c.mean(0), "--", color=line.get_color(), lw=1)
    axes[1].set(xlabel="step", ylabel="loss", title=f"smallest domain {smallest}: held-out (-) vs train (--)")
    axes[1].legend(fontsize=7)
    keys = list(variances)
    axes[2].bar(keys, [np.mean(variances[k]) for k in keys], yerr=[np.std(variances[k]) for k in keys])
    axes[2].set(ylabel="E||g - Eg||^2", title="minibatch gradient variance (T=1 model)")
    fig.tight_layout()
    fig.savefig(HERE / "mixture_validation.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
