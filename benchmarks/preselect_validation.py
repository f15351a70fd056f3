"""SMOKE TEST ONLY, answer built in: PreSelect on a synthetic corpus (retired as evidence).

Retired by issue 12: the family differs only in its share of the ``arith``
domain and the benchmark is ``arith`` loss, so S = 1 exactly for ``arith``
documents and the selection is 100% ``arith`` by construction. It checks that
the machinery runs; it proves nothing about real data. The evidence is
``benchmarks/preselect_real.py`` (real text, DCLM-style and other baselines).

PreSelect end to end on a synthetic multi-domain corpus, validated by training fresh LMs.

Steps (each through gristmill's own pieces):

1. Corpus. A pool of documents from six generators: ``arith`` (number-word
   arithmetic statements, the domain that teaches the target), ``story``
   (a sparse first-order Markov chain), ``code`` (nested brackets and
   identifiers), ``boiler`` (a few fixed boilerplate sentences),
   ``facts`` (templated attribute sentences) and ``noise`` (uniform random
   words). The target task is held-out ``arith`` documents (drawn with
   another seed, never in the pool): the stand-in for a benchmark whose
   domain is one slice of the corpus.
2. Model family. ``K`` tiny Llama models (``trainers/lm.py``), the same size
   and steps, trained on the pool with different domain mixtures: model
   ``k`` gives ``arith`` an increasing share and the other domains random
   (Dirichlet) shares, so their capability on the target increases with
   ``k`` while their ranking on the other domains is unrelated to it. Their
   benchmark score is minus their target loss.
3. Probe: ``predictive_strength`` + ``preselect_label`` on a sample of the
   pool (``gristmill preselect probe``'s recipe). 4. fastText on the labels.
5. Select the top 10 % of characters of the pool by the classifier
   (``fasttext`` + ``top_fraction``), against a random 10 % (``sample``) and
   a perplexity filter (``lm_likelihood`` of the best family model, the 10 %
   of characters with the lowest bits per character).
6. Fresh LMs trained on each selection, same token budget, several seeds;
   held-out target loss per arm, with curves (PNG).

The design makes a known answer possible (the ``arith`` share of each
selection says what a good selection is), so the run checks that the
pipeline finds it; it does not show that PreSelect beats the baselines on
real web data.

Usage::

    nice -n 10 .venv/bin/python benchmarks/preselect_validation.py --out benchmarks/_work/preselect
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

NUM = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
       "fifteen sixteen seventeen eighteen nineteen twenty twentyone twentytwo twentythree "
       "twentyfour twentyfive twentysix twentyseven twentyeight twentynine thirty").split()
DOMAINS = ("arith", "story", "code", "boiler", "facts", "noise")


def _arith(rng: np.random.Generator) -> str:
    out = []
    for _ in range(int(rng.integers(4, 9))):
        a, b = (int(x) for x in rng.integers(0, 16, 2))
        op = rng.choice(["plus", "minus"]) if a >= b else "plus"
        c = a + b if op == "plus" else a - b
        verb = rng.choice(["makes", "is", "gives", "equals"])
        out.append(f"{NUM[a]} {op} {NUM[b]} {verb} {NUM[c]} .")
    return " ".join(out)


class Generators:
    """The six domain generators; their tables are fixed by ``seed``."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.story_vocab = [f"{a}{b}" for a in ("ka", "lo", "mi", "su", "te", "ra", "no", "vi")
                            for b in ("ran", "del", "mos", "tik", "pel", "gor", "sa", "lun",
                                      "bre", "doz")]
        n = len(self.story_vocab)
        self.story_next = rng.integers(0, n, size=(n, 3))
        self.idents = [f"{a}_{b}" for a in ("get", "set", "run", "make", "load", "fix")
                       for b in ("item", "node", "key", "list", "map", "tree", "path")]
        self.boiler = [
            "click here to subscribe to our newsletter .",
            "all rights reserved . terms of use apply .",
            "share this page with your friends .",
            "cookies help us deliver our services .",
            "sign in to read more stories like this .",
        ]
        self.things = ["river", "tower", "garden", "market", "valley", "harbor", "bridge", "forest"]
        self.attrs = ["old", "tall", "quiet", "busy", "green", "narrow", "wide", "dark"]
        self.thing_attr = {t: self.attrs[int(rng.integers(0, len(self.attrs)))] for t in self.things}
        self.noise_vocab = [f"z{a}{b}{c}" for a in "bcdfg" for b in "aeiou" for c in "klmnprst"]

    def doc(self, domain: str, rng: np.random.Generator) -> str:
        if domain == "arith":
            return _arith(rng)
        if domain == "story":
            w = int(rng.integers(0, len(self.story_vocab)))
            out = []
            for _ in range(int(rng.integers(30, 70))):
                out.append(self.story_vocab[w])
                w = int(self.story_next[w, int(rng.integers(0, 3))])
            return " ".join(out)
        if domain == "code":
            out = []
            for _ in range(int(rng.integers(3, 7))):
                f, g = rng.choice(self.idents, 2)
                out.append(f"def {f} ( x ) : return {g} ( [ x , {{ x }} ] ) ;")
            return " ".join(out)
        if domain == "boiler":
            return " ".join(rng.choice(self.boiler, int(rng.integers(3, 8))))
        if domain == "facts":
            out = []
            for _ in range(int(rng.integers(4, 9))):
                t = str(rng.choice(self.things))
                out.append(f"the {t} is {self.thing_attr[t]} .")
            return " ".join(out)
        return " ".join(rng.choice(self.noise_vocab, int(rng.integers(30, 70))))


def build_pool(n_docs: int, shares: dict[str, float], seed: int) -> list[dict]:
    gen = Generators(seed)
    rng = np.random.default_rng(seed + 1)
    names = list(shares)
    p = np.array([shares[d] for d in names])
    doms = rng.choice(names, size=n_docs, p=p / p.sum())
    return [{"id": f"doc{i:06d}", "text": gen.doc(str(d), rng), "domain": str(d)}
            for i, d in enumerate(doms)]


def _tokenize(records: list[dict], tokenizer: str, prefix: Path) -> str:
    from gristmill.pipeline.tokenized import write_tokenized

    write_tokenized([r["text"] for r in records], tokenizer, prefix,
                    domains=[r["domain"] for r in records], progress=False)
    return str(prefix)


def _read_shards(out: Path) -> list[dict]:
    files = sorted((out / "shards").glob("*.parquet"))
    return pa.concat_tables(pq.read_table(f) for f in files).to_pylist() if files else []


def _run(body: dict, path: Path) -> dict:
    from gristmill.pipeline.runner import run_recipe

    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return run_recipe(path, fresh=True, progress=False, report=False)


def _train(train: str, target: str, out: Path, steps: int, seed: int, args, schedule=None) -> dict:
    from gristmill.trainers.lm import LMTrainConfig, train_lm
    from gristmill.trainers.tiny import tiny_lm_config

    cfg = LMTrainConfig(train=[train], eval={"target": target}, out_dir=str(out),
                        seq_len=args.seq_len, batch_size=args.batch_size, max_steps=steps,
                        lr=3e-3, warmup_steps=10, eval_every=max(1, steps // 6),
                        eval_sequences=24, seed=seed, device="cpu", progress=False)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    mc = tiny_lm_config(len(tok), n_layer=2, n_embd=args.width, n_head=4,
                        n_positions=args.seq_len + 1, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    res = train_lm(cfg, model_config=mc, schedule=schedule)
    return {"model": str(res.model_dir), "target": res.final_eval["target"],
            "curve": [(e["tokens"], e["target"]) for e in res.curves["eval"]]}


def _share(records: list[dict], domain: str) -> float:
    total = sum(len(r["text"]) for r in records)
    return sum(len(r["text"]) for r in records if r["domain"] == domain) / max(total, 1)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/_work/preselect")
    ap.add_argument("--pool", type=int, default=12000, help="documents in the pool")
    ap.add_argument("--probe", type=float, default=0.5, help="fraction of the pool probed")
    ap.add_argument("--family", type=int, default=5)
    ap.add_argument("--family-steps", type=int, default=150)
    ap.add_argument("--arm-steps", type=int, default=120)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from tqdm.auto import tqdm

    from gristmill.selectors.mixture import MixtureSchedule
    from gristmill.trainers.fasttext import read_labelled, train_fasttext
    from gristmill.trainers.tiny import build_tokenizer

    t_start = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    bar = tqdm(total=6, desc="preselect validation", unit="step")

    # 1. corpus, target, tokenizer
    shares = {"arith": 0.12, "story": 0.2, "code": 0.15, "boiler": 0.15, "facts": 0.18,
              "noise": 0.2}
    pool = build_pool(args.pool, shares, seed=0)
    pq.write_table(pa.Table.from_pylist(pool), out / "pool.parquet")
    rng = np.random.default_rng(99)
    target = [{"id": f"t{i}", "text": _arith(rng), "domain": "target"} for i in range(300)]
    args.tokenizer = str(out / "tokenizer")
    build_tokenizer([r["text"] for r in pool[:3000]] + [r["text"] for r in target[:50]],
                    vocab_size=700, path=args.tokenizer)
    pool_tok = _tokenize(pool, args.tokenizer, out / "tok" / "pool")
    target_tok = _tokenize(target, args.tokenizer, out / "tok" / "target")
    timings["corpus"] = time.time() - t_start
    bar.update(1)

    # 2. the model family: arith share increasing with k, other shares random
    t0 = time.time()
    frng = np.random.default_rng(7)
    family = []
    others = [d for d in DOMAINS if d != "arith"]
    # geometric shares: the target loss keeps improving over the whole range
    arith_shares = np.geomspace(0.01, 0.2, args.family)
    for k in range(args.family):
        arith = float(arith_shares[k])
        rest = frng.dirichlet(np.ones(len(others))) * (1 - arith)
        weights = dict(zip(others, rest.tolist(), strict=True), arith=arith)
        domains = sorted(weights)
        sched = MixtureSchedule.constant(domains, [weights[d] for d in domains], args.family_steps)
        res = _train(pool_tok, target_tok, out / "family" / f"m{k}", args.family_steps, 100 + k,
                     args, schedule=sched)
        family.append({"path": res["model"], "score": -res["target"], "weights": weights})
    timings["family"] = time.time() - t0
    bar.update(1)

    # 3. probe: predictive strength and labels on a sample of the pool
    t0 = time.time()
    models = [{"path": m["path"], "score": m["score"]} for m in family]
    # Two runs so that the strength of every probed document can be reported;
    # `gristmill preselect probe` runs the three stages in one.
    _run({"name": "strength", "seed": 0, "sources": [{"path": str(out / "pool.parquet")}],
          "stages": [{"stage": "sample", "fraction": args.probe},
                     {"stage": "predictive_strength", "models": models, "device": "cpu",
                      "batch_size": 32}],
          "output": {"path": str(out / "strength")},
          "engine": {"kind": "local", "workers": 1, "batch_size": 512}}, out / "strength.yaml")
    probed = _read_shards(out / "strength")
    _run({"name": "probe", "seed": 0,
          "sources": [{"path": str(out / "strength" / "shards"), "columns": [
              "predictive_strength", "predictive_strength_concordant"]}],
          "stages": [{"stage": "preselect_label"}],
          "output": {"path": str(out / "probe")},
          "engine": {"kind": "local", "workers": 1, "batch_size": 4096}}, out / "probe.yaml")
    labelled = _read_shards(out / "probe")
    label_info = json.loads((out / "probe" / "artifacts" / "preselect_label" /
                             "labels.json").read_text())
    timings["probe"] = time.time() - t0
    bar.update(1)

    # 4. fastText on the labels
    t0 = time.time()
    texts, labels, ids = read_labelled(out / "probe")
    ft = train_fasttext(texts, labels, out / "preselect.bin", ids=ids, bucket=200_000,
                        valid_fraction=0.2)
    timings["fasttext"] = time.time() - t0
    bar.update(1)

    # 5. selections: PreSelect, random, perplexity filter (lowest bpc under the best model)
    t0 = time.time()
    best = max(family, key=lambda m: m["score"])["path"]
    src = [{"path": str(out / "pool.parquet")}]
    eng = {"kind": "local", "workers": 1, "batch_size": 2048}
    arms_sel = {
        "preselect": [{"stage": "fasttext", "name": "preselect", "model": str(out / "preselect.bin")},
                      {"stage": "top_fraction", "column": "preselect", "fraction": args.fraction}],
        "perplexity": [{"stage": "lm_likelihood", "name": "ppl", "model": best, "device": "cpu",
                        "target": "text", "batch_size": 32},
                       {"stage": "top_fraction", "column": "ppl_bpc", "fraction": args.fraction,
                        "order": "min"}],
    }
    selections: dict[str, list[dict]] = {}
    for arm, stages in arms_sel.items():
        _run({"name": arm, "seed": 0, "sources": src, "stages": stages,
              "output": {"path": str(out / "sel" / arm)}, "engine": eng}, out / f"{arm}.yaml")
        selections[arm] = _read_shards(out / "sel" / arm)
    timings["select"] = time.time() - t0
    bar.update(1)

    # 6. fresh LMs on each selection, same token budget, several seeds
    t0 = time.time()
    results: dict[str, list[dict]] = {"preselect": [], "random": [], "perplexity": []}
    for seed in range(args.seeds):
        _run({"name": "random", "seed": seed, "sources": src,
              "stages": [{"stage": "sample", "fraction": args.fraction}],
              "output": {"path": str(out / "sel" / f"random{seed}")}, "engine": eng},
             out / "random.yaml")
        selections[f"random{seed}"] = _read_shards(out / "sel" / f"random{seed}")
        for arm in results:
            recs = selections[f"random{seed}" if arm == "random" else arm]
            prefix = _tokenize(recs, args.tokenizer, out / "tok" / f"{arm}{seed}")
            results[arm].append(_train(prefix, target_tok, out / "arms" / f"{arm}{seed}",
                                       args.arm_steps, seed, args))
    timings["arms"] = time.time() - t0
    bar.update(1)
    bar.close()

    # report
    strength_by_domain = {}
    for d in DOMAINS:
        sd = np.array([r["predictive_strength"] for r in probed if r["domain"] == d], dtype=float)
        if sd.size:
            strength_by_domain[d] = {"mean": round(float(np.nanmean(sd)), 3),
                                     "share_S1": round(float(np.mean(sd >= 1 - 1e-9)), 4),
                                     "docs": int(sd.size)}
    label_by_domain = {d: {"pos": sum(1 for r in labelled if r["domain"] == d and r["preselect_label"] == 1),
                           "neg": sum(1 for r in labelled if r["domain"] == d and r["preselect_label"] == 0)}
                       for d in DOMAINS}
    summary = {
        "family": [{"target_loss": -m["score"], "arith_share": round(m["weights"]["arith"], 3)}
                   for m in family],
        "labels": label_info, "label_domains": label_by_domain,
        "strength_by_domain": strength_by_domain,
        "fasttext_auc": ft.auc,
        "arith_char_share": {"pool": _share(pool, "arith"),
                             **{a: _share(selections[a], "arith") for a in arms_sel},
                             "random": float(np.mean([_share(selections[f"random{k}"], "arith")
                                                      for k in range(args.seeds)]))},
        "target_loss": {a: {"mean": float(np.mean([r["target"] for r in rs])),
                            "std": float(np.std([r["target"] for r in rs], ddof=1)) if len(rs) > 1 else 0.0,
                            "runs": [round(r["target"], 4) for r in rs]}
                        for a, rs in results.items()},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "total_s": round(time.time() - t_start, 1),
    }
    _plot(results, out / "preselect_validation.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


def _plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, runs in results.items():
        tokens = np.array([t for t, _ in runs[0]["curve"]])
        losses = np.array([[v for _, v in r["curve"]] for r in runs])
        m, sd = losses.mean(0), losses.std(0)
        ax.plot(tokens, m, label=f"{arm} ({m[-1]:.3f})")
        ax.fill_between(tokens, m - sd, m + sd, alpha=0.2)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out target loss (nats/token)")
    ax.set_title("fresh LMs on 10% selections (mean ± sd over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
