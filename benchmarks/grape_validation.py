"""SMOKE TEST ONLY, answer built in: GRAPE on synthetic styles (retired as evidence).

Retired by issue 12: the base model is pretrained on the ``plain`` style and
the candidates differ only in format, so GRAPE must pick ``plain``. It checks
that the machinery runs; it proves nothing about real data. The evidence is
``benchmarks/grape_real.py`` (real package descriptions, responses that
differ in content and quality).

GRAPE validation: does SFT on the responses that fit the base model beat the alternatives?

"The Best Instruction-Tuning Data are Those That Fit" (Zhang et al., 2025) picks,
per instruction, the candidate response with the highest length-normalized
log-likelihood under the base model, (1/|y|) sum_t log p(y_t | x, y_<t).

Set-up (all generated here, nothing downloaded):

1. A tiny Llama is pretrained from scratch on question/answer text written in
   one response style ("The answer is X."): word-picking and echo questions.
2. SFT instructions are checkable tasks (repeat a word once or twice, its
   first or last letter, add one to a digit). Each has four equally correct responses in
   different styles: ``plain`` ("The answer is X."), ``terse`` ("X"),
   ``bracket`` ("Result => [X]") and ``teacher``, the longer explanation a
   strong teacher model would write ("Let me think step by step. ... the final
   answer is X. Hope this helps!").
3. Arms, each fine-tuned from the same base model for the same steps and batch
   size: ``grape`` (the ``grape`` stage with the base model), ``teacher``
   (always the teacher style), ``random`` (a uniform(seed, id) pick) and
   ``all`` (every candidate as its own pair).
4. Held-out instructions: exact match of the answer extracted from a greedy
   decode (any of the four styles counts), and held-out loss = mean over
   instructions of -log sum_k p(y_k | x) over the four correct responses
   (nats per instruction: the probability mass the model puts on a correct
   response in any style; per-token averages would favour the long teacher
   boilerplate).

Everything is repeated for ``--seeds`` seeds (data, pretraining, SFT), and the
mean and standard deviation are printed, written to JSON and plotted (PNG).

    nice -n 10 .venv/bin/python benchmarks/grape_validation.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gristmill.pipeline.examples import grape_instruction
from gristmill.pipeline.hashing import uniform
from gristmill.scorers.likelihood import score_responses
from gristmill.selectors.grape import Grape
from gristmill.trainers.sft import (
    SFTConfig,
    greedy_responses,
    lm_examples,
    pad_token_id,
    sft_examples,
    train_examples,
)
from gristmill.trainers.tiny import build_tiny_lm, build_tokenizer

LETTERS = "bdfhkmpt"
STYLES = {
    "plain": ("The answer is {a}.", r"The answer is (.+)\."),
    "terse": ("{a}", r"(\S+)"),
    "bracket": ("Result => [{a}]", r"Result => \[(.+)\]"),
    "teacher": ("Let me think step by step. Checking each part, the final answer is {a}. "
                "Hope this helps!",
                r".*the final answer is (.+?)\. Hope this helps!"),
}
ARMS = ("grape", "teacher", "random", "all")


def word(rng: random.Random, n: int | None = None) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(n or rng.choice((3, 4))))


def pretraining_texts(rng: random.Random, n: int) -> list[str]:
    """Q/A documents in the ``plain`` style only: pick a word from a list, or echo one."""
    out = []
    for _ in range(n):
        ws = [word(rng) for _ in range(3)]
        kind = rng.randrange(6)
        if kind == 0:
            q, a = f"Which word comes first in: {' '.join(ws)}?", ws[0]
        elif kind == 1:
            q, a = f"Which word comes last in: {' '.join(ws)}?", ws[2]
        elif kind in (2, 3, 4):
            q, a = f"Say {ws[0]}.", ws[0]
        else:
            d = rng.randrange(10)
            q, a = f"Which number is {d}?", str(d)
        out.append(f"Q: {q}\n" + STYLES["plain"][0].format(a=a))
    return out


def extract_answer(text: str) -> str:
    """The answer inside a response of any style (the whole text when none matches)."""
    text = text.strip()
    for _, pattern in (STYLES["plain"], STYLES["bracket"], STYLES["teacher"], STYLES["terse"]):
        m = re.fullmatch(pattern, text, flags=re.S)
        if m:
            return m.group(1).strip()
    return text


def make_tasks(rng: random.Random, n: int) -> list[dict]:
    seen, tasks = set(), []
    while len(tasks) < n:
        prompt, answer = grape_instruction(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        tasks.append({"id": f"t{len(tasks)}", "prompt": prompt, "answer": answer,
                      "responses": [STYLES[s][0].format(a=answer) for s in STYLES],
                      "response_sources": list(STYLES)})
    return tasks


def arm_pairs(arm: str, tasks: list[dict], base_dir: Path, seed: int) -> tuple[list, dict]:
    """(prompt, response) pairs of an arm and the share of each style among them."""
    if arm == "grape":
        table = pa.Table.from_pylist([{k: t[k] for k in ("id", "prompt", "responses",
                                                         "response_sources")} for t in tasks])
        kept = Grape({"model": str(base_dir), "device": "cpu", "batch_size": 64}).process(table).kept
        pairs = list(zip(kept.column("prompt").to_pylist(), kept.column("response").to_pylist(),
                         strict=True))
        chosen = kept.column("grape_source").to_pylist()
    elif arm == "teacher":
        pairs = [(t["prompt"], t["responses"][3]) for t in tasks]
        chosen = ["teacher"] * len(tasks)
    elif arm == "random":
        u = uniform([t["id"] for t in tasks], seed=seed, salt="random_arm")
        picks = (u * len(STYLES)).astype(int)
        pairs = [(t["prompt"], t["responses"][k]) for t, k in zip(tasks, picks, strict=True)]
        chosen = [list(STYLES)[k] for k in picks]
    else:
        pairs = [(t["prompt"], r) for t in tasks for r in t["responses"]]
        chosen = [s for _ in tasks for s in STYLES]
    share = {s: chosen.count(s) / len(chosen) for s in STYLES}
    return pairs, share


def heldout_metrics(model, tok, tasks: list[dict]) -> dict:
    # Room for the longest correct response of any style (+ EOS), so no style is cut off.
    max_new_tokens = 2 + max(len(tok(r, add_special_tokens=False)["input_ids"])
                             for t in tasks for r in t["responses"])
    outs = greedy_responses(model, tok, [t["prompt"] for t in tasks], max_new_tokens=max_new_tokens)
    em = float(np.mean([extract_answer(o) == t["answer"] for o, t in zip(outs, tasks, strict=True)]))
    s = score_responses(model, tok, [t["prompt"] for t in tasks], [t["responses"] for t in tasks],
                        batch_size=64)
    nll = [float(-np.logaddexp.reduce(lp)) for lp in s.logprob]
    return {"exact_match": em, "heldout_loss": float(np.mean(nll)), "samples": outs[:6]}


def run_seed(seed: int, args: argparse.Namespace, work: Path) -> dict:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    pre = pretraining_texts(rng, args.pretrain_docs)
    tasks = make_tasks(rng, args.n_train + args.n_heldout)
    train, held = tasks[: args.n_train], tasks[args.n_train :]
    base_dir = work / f"seed{seed}" / "base"
    tok_texts = pre + [f"{t['prompt']}\n{r}" for t in tasks for r in t["responses"]]
    build_tokenizer(tok_texts, vocab_size=args.vocab, path=base_dir)
    build_tiny_lm(base_dir, base_dir, n_layer=args.n_layer, n_embd=args.n_embd, n_head=4,
                  n_positions=256, seed=seed)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    t0 = time.perf_counter()
    pcfg = SFTConfig(steps=args.pretrain_steps, batch_size=32, lr=3e-3, min_lr=3e-4, warmup=20,
                     seed=seed, device="cpu", progress=args.progress)
    pcurve = train_examples(model, lm_examples(tok, pre, max_length=128), pcfg,
                            pad_id=pad_token_id(tok))
    model.save_pretrained(base_dir)
    print(f"seed {seed}: pretrained {args.pretrain_steps} steps in {time.perf_counter() - t0:.0f}s, "
          f"final loss {np.mean(pcurve.train_loss[-20:]):.3f}", flush=True)
    result = {"pretrain_loss": pcurve.train_loss, "arms": {}}
    base_metrics = heldout_metrics(model, tok, held)
    result["base"] = base_metrics
    for arm in ARMS:
        t0 = time.perf_counter()
        pairs, share = arm_pairs(arm, train, base_dir, seed)
        sft = AutoModelForCausalLM.from_pretrained(base_dir)
        cfg = SFTConfig(steps=args.sft_steps, batch_size=args.batch_size, lr=args.lr,
                        min_lr=args.lr / 10, warmup=10, seed=seed, device="cpu",
                        progress=args.progress)
        curve = train_examples(sft, sft_examples(tok, pairs), cfg, pad_id=pad_token_id(tok))
        m = heldout_metrics(sft, tok, held)
        m.update(style_share=share, train_loss=curve.train_loss, pairs=len(pairs),
                 seconds=time.perf_counter() - t0)
        result["arms"][arm] = m
        print(f"seed {seed} {arm:8s} EM {m['exact_match']:.3f}  held-out loss "
              f"{m['heldout_loss']:.3f}  ({len(pairs)} pairs, {m['seconds']:.0f}s)  "
              f"styles {', '.join(f'{k}={v:.2f}' for k, v in share.items() if v)}", flush=True)
    return result


def summarize(results: dict[int, dict]) -> dict:
    out = {}
    for arm in ARMS:
        em = np.array([r["arms"][arm]["exact_match"] for r in results.values()])
        loss = np.array([r["arms"][arm]["heldout_loss"] for r in results.values()])
        out[arm] = {"exact_match_mean": float(em.mean()), "exact_match_std": float(em.std(ddof=0)),
                    "heldout_loss_mean": float(loss.mean()),
                    "heldout_loss_std": float(loss.std(ddof=0)),
                    "exact_match": em.tolist(), "heldout_loss": loss.tolist()}
    return out


def plot(results: dict[int, dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    x = np.arange(len(ARMS))
    for i, (key, label) in enumerate((("exact_match", "held-out exact match"),
                                      ("heldout_loss", "held-out NLL of a correct response"))):
        means = [summary[a][f"{key}_mean"] for a in ARMS]
        stds = [summary[a][f"{key}_std"] for a in ARMS]
        ax[i].bar(x, means, yerr=stds, capsize=4, color=["C2", "C3", "C0", "C7"])
        for a_i, a in enumerate(ARMS):
            ax[i].scatter([a_i] * len(summary[a][key]), summary[a][key], color="k", s=10, zorder=3)
        ax[i].set_xticks(x, ARMS)
        ax[i].set_title(f"{label}\n(mean ± std over {len(results)} seeds)")
    first = results[min(results)]
    for arm, color in zip(ARMS, ["C2", "C3", "C0", "C7"], strict=True):
        tl = np.array(first["arms"][arm]["train_loss"])
        k = max(1, len(tl) // 30)
        ax[2].plot(np.convolve(tl, np.ones(k) / k, mode="valid"), label=arm, color=color)
    ax[2].set_yscale("log")
    ax[2].set_xlabel("SFT step")
    ax[2].set_title(f"SFT train loss on own targets (seed {min(results)})")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--pretrain-docs", type=int, default=4000)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-heldout", type=int, default=100)
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--vocab", type=int, default=320)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", default="benchmarks/_work/grape_validation")
    ap.add_argument("--png", default="benchmarks/grape_validation.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = {s: run_seed(s, args, work) for s in args.seeds}
    summary = summarize(results)
    print(f"\n{'arm':8s} {'exact match':>18s} {'held-out loss':>18s}")
    for arm in ARMS:
        s = summary[arm]
        print(f"{arm:8s} {s['exact_match_mean']:>10.3f} ± {s['exact_match_std']:.3f}"
              f" {s['heldout_loss_mean']:>10.3f} ± {s['heldout_loss_std']:.3f}")
    base_em = np.mean([r["base"]["exact_match"] for r in results.values()])
    print(f"base model (no SFT) exact match {base_em:.3f}; total {time.perf_counter() - t0:.0f}s")
    (work / "results.json").write_text(json.dumps({"args": vars(args), "summary": summary,
                                                   "seeds": results}, indent=1))
    plot(results, summary, Path(args.png))
    print(f"wrote {work / 'results.json'} and {args.png}")


if __name__ == "__main__":
    main()
