"""``gristmill examples``: the example recipes and, built offline, the inputs they read.

The recipes ship inside the package (:mod:`gristmill.recipes`); ``gristmill
examples`` copies each example's recipes to ``ROOT/recipes/`` (an existing copy
is kept) and builds its inputs, so it works from an installed wheel in any folder.

Everything is generated here or ships with a package; nothing is downloaded.
Each example lands under ``ROOT/data/`` and is skipped when already complete
(a ``.complete`` marker is written last, so an interrupted build starts over):

- ``grape`` (``recipes/grape.yaml``): ``data/grape/candidates.jsonl``, SFT
  instructions with checkable answers, each with four equally correct
  responses in different styles, and ``data/models/base-lm``, a tiny Llama
  pretrained by ``trainers/lm.py`` on question/answer text written in one of
  those styles ("The answer is X."), so GRAPE has a style to find.
- ``preselect`` (``recipes/preselect_probe.yaml``, ``preselect_select.yaml``):
  a synthetic four-domain corpus (``data/preselect/corpus``), a sample of the
  same distribution to probe (``data/preselect/sample``), held-out target text
  (``data/preselect/target.jsonl``, the "benchmark"), a family of five tiny
  Llamas (``data/models/family/m0..m4``) pretrained with an increasing share
  of the target domain and scored by minus their held-out target loss
  (``data/models/family/family.yaml``), and a fastText classifier
  (``data/models/preselect.bin``) trained on PreSelect's labels of the sample
  under that family, so the select recipe runs without the probe first.
- ``distill`` (``recipes/distill_digits.yaml``): scikit-learn's bundled 8x8
  digits as ``data/digits/digits.jsonl`` (id, text, features, label).
- ``mix`` (``recipes/mix_unimax.yaml``, ``mix_cooldown.yaml``,
  ``mix_scalarization.yaml``): the demo corpus (``data/demo``, as ``gristmill
  demo`` builds it).

Example
-------
>>> built = build_examples(["distill"], root=".")  # doctest: +SKIP
>>> built["distill"]  # doctest: +SKIP
[PosixPath('data/digits/digits.jsonl')]
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import yaml

EXAMPLES = ("grape", "preselect", "distill", "mix")
# the shipped recipes (gristmill/recipes/) each example's inputs are for
NEXT = {
    "grape": ["grape"],
    "preselect": ["preselect_probe", "preselect_select"],
    "distill": ["distill_digits"],
    "mix": ["mix_unimax", "mix_cooldown", "mix_scalarization"],
}
# the extras (gristmill/extras.py) each builder needs: tiny LMs, fastText, the digits
EXTRAS_NEEDED = {"grape": ("torch",), "preselect": ("torch", "fasttext"),
                 "distill": ("distill",), "mix": ()}
MARKER = ".complete"
SEQ_LEN = 64  # training window of the tiny example models (their context is one more)

# ---------------------------------------------------------------- grape

LETTERS = "bdfhkmpt"
# Four equally correct response styles; the base LM is pretrained on "plain" only.
STYLES = {
    "plain": "The answer is {a}.",
    "terse": "{a}",
    "bracket": "Result => [{a}]",
    "teacher": "Let me think step by step. Checking each part, the final answer is {a}. "
               "Hope this helps!",
}


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.choice((3, 4))))


def grape_instruction(rng: random.Random) -> tuple[str, str]:
    """A checkable instruction and its answer (repeat a word, a letter of it, add one).

    Parameters
    ----------
    rng : random.Random

    Returns
    -------
    tuple of str
        ``(prompt, answer)``.
    """
    kind, w = rng.randrange(5), _word(rng)
    if kind == 0:
        return f"Q: Repeat {w}.", w
    if kind == 1:
        return f"Q: Repeat {w} twice.", f"{w} {w}"
    if kind == 2:
        return f"Q: First letter of {w}?", w[0]
    if kind == 3:
        return f"Q: Last letter of {w}?", w[-1]
    a = rng.randrange(9)
    return f"Q: What is {a} plus 1?", str(a + 1)


def grape_candidates(n: int, seed: int = 0) -> list[dict]:
    """``n`` distinct SFT records: id, prompt, answer, responses (one per style), response_sources.

    Parameters
    ----------
    n : int
        Number of instructions; at most the number of distinct prompts (about 9,000).
    seed : int

    Returns
    -------
    list of dict
    """
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        prompt, answer = grape_instruction(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append({"id": f"q{len(out):05d}", "prompt": prompt, "answer": answer,
                    "responses": [s.format(a=answer) for s in STYLES.values()],
                    "response_sources": list(STYLES)})
    return out


def grape_pretraining_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` question/answer documents in the ``plain`` style only.

    Parameters
    ----------
    n : int
    seed : int
        Offset from the candidates' seed, so the texts are other draws.

    Returns
    -------
    list of str
    """
    rng = random.Random(seed + 1000)
    return [f"{p}\n" + STYLES["plain"].format(a=a)
            for p, a in (grape_instruction(rng) for _ in range(n))]


# ---------------------------------------------------------------- preselect

NUM = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
       "fifteen sixteen seventeen eighteen").split()
PRESELECT_DOMAINS = ("arith", "story", "boiler", "noise")
STORY = [a + b for a in ("ka", "lo", "mi", "su", "te", "ra") for b in ("ran", "del", "mos", "tik",
                                                                       "pel", "gor")]
BOILER = ["click here to subscribe to our newsletter .", "all rights reserved .",
          "share this page with your friends .", "cookies help us deliver our services ."]
NOISE = [f"z{a}{b}{c}" for a in "bcdfg" for b in "aeiou" for c in "klmnprst"]


def preselect_document(domain: str, rng: np.random.Generator) -> str:
    """One synthetic document of ``domain``; ``arith`` is the domain the target tests.

    Parameters
    ----------
    domain : {"arith", "story", "boiler", "noise"}
    rng : numpy.random.Generator

    Returns
    -------
    str
    """
    if domain == "arith":
        out = []
        for _ in range(int(rng.integers(4, 9))):
            a, b = (int(x) for x in rng.integers(0, 10, 2))
            out.append(f"{NUM[a]} plus {NUM[b]} makes {NUM[a + b]} .")
        return " ".join(out)
    if domain == "story":
        # a sparse Markov chain: each word has three successors
        w, out = int(rng.integers(len(STORY))), []
        for _ in range(int(rng.integers(30, 60))):
            out.append(STORY[w])
            w = (w * 7 + int(rng.integers(1, 4))) % len(STORY)
        return " ".join(out)
    if domain == "boiler":
        return " ".join(rng.choice(BOILER, int(rng.integers(3, 8))))
    return " ".join(rng.choice(NOISE, int(rng.integers(30, 60))))


def preselect_corpus(n: int, seed: int, prefix: str) -> list[dict]:
    """``n`` records (id, text, domain), domains drawn at shares 0.15/0.35/0.2/0.3.

    Parameters
    ----------
    n : int
    seed : int
    prefix : str
        Of every id (``prefix`` + five-digit row number).

    Returns
    -------
    list of dict
    """
    rng = np.random.default_rng(seed)
    doms = rng.choice(PRESELECT_DOMAINS, size=n, p=[0.15, 0.35, 0.2, 0.3])
    return [{"id": f"{prefix}{i:05d}", "text": preselect_document(str(d), rng), "domain": str(d)}
            for i, d in enumerate(doms)]


# ---------------------------------------------------------------- helpers


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)
    return path


def _pretrain(train: Path, tokenizer: Path, dest: Path, work: Path, *, steps: int, width: int,
              seed: int, weights: dict[str, float] | None = None,
              target: Path | None = None) -> float | None:
    """Pretrain a tiny Llama with ``trainers/lm.py`` on tokenized ``train``; move it to ``dest``.

    Returns the mean token loss on the tokenized ``target`` after training
    (None without one). ``weights`` fixes the domain mixture for every step.
    """
    from transformers import AutoTokenizer

    from gristmill.trainers.lm import LMTrainConfig, train_lm
    from gristmill.trainers.tiny import tiny_lm_config

    schedule = None
    if weights is not None:
        from gristmill.selectors.mixture import MixtureSchedule

        names = sorted(weights)
        schedule = MixtureSchedule.constant(names, [weights[d] for d in names], steps)
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    mc = tiny_lm_config(len(tok), n_layer=2, n_embd=width, n_head=4, n_positions=SEQ_LEN + 1,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    cfg = LMTrainConfig(train=[str(train)], eval={"target": str(target)} if target else {},
                        out_dir=str(work / dest.name), tokenizer=str(tokenizer), seq_len=SEQ_LEN,
                        batch_size=16, max_steps=steps, lr=3e-3, warmup_steps=10,
                        eval_every=steps, eval_sequences=32, seed=seed, device="cpu",
                        progress=False)
    result = train_lm(cfg, model_config=mc, schedule=schedule)
    shutil.copy(result.out_dir / "curves.json", result.model_dir / "curves.json")
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(result.model_dir, dest)
    return result.final_eval.get("target")


@contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one thread: for models this small, syncing threads costs more than it saves."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _done(folder: Path) -> list[Path] | None:
    """What a finished build of ``folder`` made (paths under ``data``), None when unfinished."""
    marker = folder / MARKER
    if not marker.exists():
        return None
    return [folder.parent / p for p in json.loads(marker.read_text())["built"]]


def _mark(folder: Path, built: list[Path]) -> list[Path]:
    """Write the marker last, with the built paths relative to ``data``, so the tree can move."""
    rel = [Path(os.path.relpath(p, folder.parent)).as_posix() for p in built]
    (folder / MARKER).write_text(json.dumps({"built": rel}) + "\n")
    return built


# ---------------------------------------------------------------- builders


def build_grape(data: Path, n_instructions: int = 240, seed: int = 0) -> list[Path]:
    """SFT candidates and a base LM pretrained on the ``plain`` style, under ``data``.

    Parameters
    ----------
    data : Path
        The ``data/`` folder; writes ``grape/candidates.jsonl`` and ``models/base-lm``.
    n_instructions : int
        Instructions in the candidates file (four responses each).
    seed : int

    Returns
    -------
    list of Path
        What was built (the recorded list when it was already complete).
    """
    from gristmill.pipeline.tokenized import write_tokenized
    from gristmill.trainers.tiny import build_tokenizer

    folder = data / "grape"
    if (built := _done(folder)) is not None:
        return built
    records = grape_candidates(n_instructions, seed)
    candidates = _write_jsonl(folder / "candidates.jsonl", records)
    pretrain = grape_pretraining_texts(3000, seed)
    model = data / "models" / "base-lm"
    with tempfile.TemporaryDirectory(prefix=".build-", dir=folder) as tmp, _one_thread():
        work = Path(tmp)
        build_tokenizer(pretrain + [r for rec in records[:50] for r in rec["responses"]],
                        vocab_size=400, path=work / "tokenizer")
        train = write_tokenized(pretrain, work / "tokenizer", work / "train", progress=False)
        _pretrain(train, work / "tokenizer", model, work, steps=150, width=64, seed=seed)
    return _mark(folder, [candidates, model])


def build_preselect(data: Path, n_corpus: int = 2000, n_sample: int = 600, family: int = 5,
                    seed: int = 0) -> list[Path]:
    """Corpus, probe sample, target text, a scored model family and a fastText classifier.

    Parameters
    ----------
    data : Path
        The ``data/`` folder; writes ``preselect/{corpus,sample,target.jsonl}``,
        ``models/family/m0..`` with ``family.yaml``, and ``models/preselect.bin``.
    n_corpus, n_sample : int
        Documents in the corpus and in the probe sample.
    family : int
        Models in the family (>= 2).
    seed : int

    Returns
    -------
    list of Path
    """
    from gristmill.pipeline.tokenized import write_tokenized
    from gristmill.scorers.predictive import model_losses, predictive_strength, preselect_labels
    from gristmill.trainers.fasttext import train_fasttext
    from gristmill.trainers.tiny import build_tokenizer

    folder = data / "preselect"
    if (built := _done(folder)) is not None:
        return built
    corpus = preselect_corpus(n_corpus, seed, "doc")
    corpus_dir = folder / "corpus"
    half = n_corpus // 2
    _write_jsonl(corpus_dir / "part-00000.jsonl", corpus[:half])
    _write_jsonl(corpus_dir / "part-00001.jsonl", corpus[half:])
    sample = preselect_corpus(n_sample, seed + 1, "sample")
    sample_file = _write_jsonl(folder / "sample" / "sample.jsonl", sample)
    trng = np.random.default_rng(seed + 2)
    target = [preselect_document("arith", trng) for _ in range(200)]
    target_file = _write_jsonl(folder / "target.jsonl",
                               [{"id": f"target{i:04d}", "text": t} for i, t in enumerate(target)])

    # The family: same size and steps, the target domain's share rising with k and
    # the other shares random, so only target-like text ranks them as the target does.
    frng = np.random.default_rng(seed + 3)
    others = [d for d in PRESELECT_DOMAINS if d != "arith"]
    models = []
    with tempfile.TemporaryDirectory(prefix=".build-", dir=folder) as tmp, _one_thread():
        work = Path(tmp)
        tok = work / "tokenizer"
        build_tokenizer([r["text"] for r in corpus[:1000]], vocab_size=400, path=tok)
        train = write_tokenized([r["text"] for r in corpus], tok, work / "train",
                                domains=[r["domain"] for r in corpus], progress=False)
        heldout = write_tokenized(target, tok, work / "target", progress=False)
        for k, share in enumerate(np.geomspace(0.01, 0.5, family)):
            rest = frng.dirichlet(np.ones(len(others))) * (1 - share)
            weights = {"arith": float(share), **dict(zip(others, rest.tolist(), strict=True))}
            loss = _pretrain(train, tok, data / "models" / "family" / f"m{k}", work, steps=60,
                             width=32, seed=100 + k, weights=weights, target=heldout)
            models.append({"path": f"m{k}", "score": round(-float(loss), 4),
                           "arith_share": round(float(share), 4)})
    family_file = data / "models" / "family" / "family.yaml"
    family_file.write_text("# score: minus the model's mean token loss on data/preselect/"
                           "target.jsonl (higher is better)\n"
                           + yaml.safe_dump({"models": models}, sort_keys=False))

    # PreSelect's labels of the sample under the family, then the classifier.
    texts = [r["text"] for r in sample]
    paths = [(str(data / "models" / "family" / m["path"]), m["score"]) for m in models]
    with _one_thread():
        bpc = model_losses(paths, texts, batch_size=32, device="cpu")
    labels = preselect_labels(predictive_strength(bpc, [m["score"] for m in models]),
                              [r["id"] for r in sample], seed=seed)
    keep = labels >= 0
    classifier = data / "models" / "preselect.bin"
    train_fasttext([t for t, k in zip(texts, keep, strict=True) if k], labels[keep].tolist(),
                   classifier, ids=[r["id"] for r, k in zip(sample, keep, strict=True) if k],
                   bucket=100_000, valid_fraction=0.2, seed=seed)
    return _mark(folder, [corpus_dir, sample_file, target_file, family_file, classifier])


def build_distill(data: Path) -> list[Path]:
    """scikit-learn's 8x8 digits (1,797 rows) as ``data/digits/digits.jsonl``.

    Parameters
    ----------
    data : Path

    Returns
    -------
    list of Path
    """
    from gristmill.trainers.distill_data import builtin_dataset, write_dataset_jsonl

    path = data / "digits" / "digits.jsonl"
    if not path.exists():  # written under a temporary name and renamed
        x, y, texts, _ = builtin_dataset("digits")
        write_dataset_jsonl(path, x, y, texts, "digits")
    return [path]


def build_mix(data: Path) -> list[Path]:
    """The demo corpus (``data/demo``) that the mixture recipes read.

    Parameters
    ----------
    data : Path

    Returns
    -------
    list of Path
    """
    from gristmill.pipeline.demo import build_demo_corpus

    return [build_demo_corpus(data / "demo")]


BUILDERS: dict[str, Callable[[Path], list[Path]]] = {
    "grape": build_grape, "preselect": build_preselect, "distill": build_distill,
    "mix": build_mix}


def example_built(name: str, root: str | Path = ".") -> bool:
    """Whether example ``name``'s inputs are complete under ``root/data``."""
    data = Path(root) / "data"
    if name == "distill":
        return (data / "digits" / "digits.jsonl").exists()
    if name == "mix":
        return (data / "demo" / ".complete").exists()
    return (data / name / MARKER).exists()


def build_examples(names: list[str], root: str | Path = ".") -> dict[str, list[Path]]:
    """Build the named examples' inputs under ``root/data``; idempotent.

    Parameters
    ----------
    names : list of str
        Some of ``EXAMPLES``.
    root : str or Path
        The folder holding ``recipes/``; data goes to ``root/data``.

    Returns
    -------
    dict
        Example name -> the paths it built (or had built before).
    """
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise ValueError(f"unknown example(s) {unknown}; valid: {', '.join(EXAMPLES)}, all")
    data = Path(root) / "data"
    return {name: BUILDERS[name](data) for name in names}
