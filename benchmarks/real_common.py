"""Shared pieces of the real-text experiments (``preselect_real.py``, ``grape_real.py``).

The corpus comes from ``gristmill.pipeline.real_corpus`` (Debian documentation
packages, split train/dev/test by whole source document). Statistics: every
arm runs with the same seeds, so arms are compared by their per-seed paired
difference ``d_s = m_arm(s) - m_ref(s)``; the 95% interval is Student's t
over seeds, ``mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n)``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ENGLISH_MANUALS = ("handbook", "reference", "perl", "postgres", "git")


def load_corpus(root: Path, quick: bool) -> tuple[list[dict], list[dict]]:
    """(documents, packages) of the real corpus under ``root``, built if missing."""
    from gristmill.pipeline.real_corpus import build_real_corpus

    kw = {"max_files": 40, "max_packages": 6000} if quick else {}
    paths = build_real_corpus(root, progress=True, **kw)
    docs = pq.read_table(paths["corpus"]).to_pylist()
    pkgs = pq.read_table(paths["packages"]).to_pylist()
    return docs, pkgs


def t_interval(d: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95% Student-t interval of paired differences over seeds."""
    from scipy import stats

    d = np.asarray(d, dtype=np.float64)
    m = float(d.mean())
    if d.size < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    return m, m - half, m + half


def cut_words(text: str, n: int) -> str:
    """The first ``n`` characters of ``text``, cut back to a word boundary."""
    text = " ".join(text.split())
    if len(text) <= n:
        return text
    cut = text.rfind(" ", 0, n)
    return text[: cut if cut > n // 2 else n]


def choice_questions(items: Sequence[tuple[str, str, str]], n_choices: int, rng: random.Random,
                     limit: int) -> list[dict]:
    """Multiple-choice questions ``{prompt, choices, answer, group}`` from (group, prompt, answer)
    items: the distractors are the answers of other items of the same group."""
    by_group: dict[str, list[int]] = {}
    for i, (g, _, _) in enumerate(items):
        by_group.setdefault(g, []).append(i)
    order = list(range(len(items)))
    rng.shuffle(order)
    out = []
    for i in order:
        g, prompt, answer = items[i]
        pool = [j for j in by_group[g] if items[j][2] != answer]
        if len(pool) < n_choices - 1:
            continue
        wrong = [items[j][2] for j in rng.sample(pool, n_choices - 1)]
        k = rng.randrange(n_choices)
        choices = wrong[:k] + [answer] + wrong[k:]
        out.append({"prompt": prompt, "choices": choices, "answer": k, "group": g})
        if len(out) >= limit:
            break
    return out


def choice_scores(model, tok, questions: Sequence[dict], batch_size: int = 64) -> list[np.ndarray]:
    """Per question, ``log p(choice | prompt) / characters(choice)`` of every choice
    (lm-evaluation-harness's ``acc_norm``, per character)."""
    from gristmill.scorers.likelihood import score_responses

    s = score_responses(model, tok, [q["prompt"] for q in questions],
                        [q["choices"] for q in questions], separator="", add_eos=False,
                        batch_size=batch_size)
    return [lp / np.array([max(len(c), 1) for c in q["choices"]])
            for lp, q in zip(s.logprob, questions, strict=True)]


def accuracy(scores: Sequence[np.ndarray], questions: Sequence[dict]) -> np.ndarray:
    """1.0 where the best-scored choice is the answer, per question."""
    return np.array([float(int(np.argmax(s)) == q["answer"])
                     for s, q in zip(scores, questions, strict=True)])


def bits_per_byte(model, tok, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """Bits per UTF-8 byte of each text under ``model``."""
    from gristmill.scorers.likelihood import score_texts

    return score_texts(model, tok, list(texts), batch_size=batch_size).bpb


def load(path: str | Path):
    """(model, tokenizer) from a saved folder, in eval mode on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path))
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def fmt_ci(m: float, lo: float, hi: float, scale: float = 1.0, digits: int = 2) -> str:
    return f"{m * scale:+.{digits}f} [{lo * scale:+.{digits}f}, {hi * scale:+.{digits}f}]"
