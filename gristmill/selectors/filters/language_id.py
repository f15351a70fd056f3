"""Language identification: a language and a confidence per record, and a
keep-list (row-local scorer and selector).

The classifier is langid.py (Lui & Baldwin 2012, "langid.py: An Off-the-shelf
Language Identification Tool", ACL demos): a multinomial naive Bayes over
byte n-grams (1-4) selected by information gain across domains, 97
languages, its model shipped inside the wheel (5 MB). The confidence is the
posterior ``P(l | d) = exp(s_l) / sum_k exp(s_k)`` of the naive-Bayes scores
``s_l = log P(l) + sum_f n_f(d) log P(f | l)``, as langid's ``norm_probs``.

Chosen over lingua (``lingua-language-detector``) on 9,211 paragraphs of the
Debian Reference in eight languages (``benchmarks/bench_stages.py
--compare-langid --peers``, RESULTS.md): langid 97.8% accuracy with all 97
languages (98.5% restricted to the eight) at 4,200 paragraphs per
CPU-second (6,200 restricted), lingua 97.0% with its 75 languages at 530,
from a 96 MB wheel that takes 12 s to load its models. The speed is this
stage's: langid's own ``classify`` multiplies the dense feature vector by the
whole model in float64 (about 6 ms a document); here the same sum runs over
the non-zero features only (identical scores, tested).

Output columns ``<name>_lang`` (ISO 639-1 code; null for text without any
letter) and ``<name>_confidence`` (float64). ``<name>_lang`` can be the
``domain_column`` of a later ``mix`` stage.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field

from gristmill.pipeline.stage import RowStage, StageOutput, StageParams, split_batch


@functools.lru_cache(maxsize=1)
def _full_identifier():
    from langid.langid import LanguageIdentifier, model

    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


def langid_languages() -> tuple[str, ...]:
    """The 97 language codes langid's model knows."""
    return tuple(_full_identifier().nb_classes)


def load_identifier(languages: list[str] | None):
    """A langid identifier, restricted to ``languages`` when given (faster and,
    when the corpus holds only those, more accurate). The model is decoded
    once per process and shared (read-only) by every identifier."""
    from langid.langid import LanguageIdentifier

    full = _full_identifier()
    ident = LanguageIdentifier(full.nb_ptc, full.nb_pc, full.nb_numfeats, full.nb_classes,
                               full.tk_nextmove, full.tk_output, norm_probs=True)
    if languages:
        ident.set_languages(list(languages))
    return ident


class LanguageIdParams(StageParams):
    keep: list[str] | None = Field(None, description="ISO 639-1 codes to keep; null keeps every "
                                   "language (the stage then only adds its columns)")
    min_confidence: float = Field(0.0, ge=0, le=1, description="drop records whose language "
                                  "confidence is lower")
    languages: list[str] | None = Field(None, description="restrict the classifier to these "
                                        "codes (default: all 97 of langid)")
    max_chars: int = Field(2000, ge=1, description="classify the first max_chars characters")


class LanguageId(RowStage):
    """Add ``<name>_lang`` and ``<name>_confidence``; drop records whose language
    is not in ``keep`` (reason ``language_<code>``, or ``no_language`` for text
    without letters) or whose confidence is below ``min_confidence``
    (``low_confidence``).

    Parameters
    ----------
    keep : list of str or None
        Languages to keep (ISO 639-1, as langid names them: ``en``, ``de``, ``zh``).
    min_confidence : float
        Smallest confidence kept.
    languages : list of str or None
        Candidate languages of the classifier (all 97 by default).
    max_chars : int
        Only the first ``max_chars`` characters are classified (langid's cost
        grows with the length; a page's language is clear long before its end).

    Examples
    --------
    >>> import pyarrow as pa
    >>> st = LanguageId({"keep": ["de"]})
    >>> st.setup()
    >>> out = st.process(pa.table({"id": ["a", "b"], "text": [
    ...     "Die Mühle mahlt das Korn zu Mehl, wenn der Wind weht.",
    ...     "The mill grinds the grain into flour when the wind blows."]}))
    >>> out.kept.column("language_id_lang").to_pylist(), out.dropped.column("reason").to_pylist()
    (['de'], ['language_en'])
    """

    type_name = "language_id"
    Params: ClassVar = LanguageIdParams
    requires = ("text",)

    def output_columns(self) -> tuple[str, ...]:
        return (f"{self.name}_lang", f"{self.name}_confidence")

    def check(self, base_dir: str) -> None:
        known = set(langid_languages())
        for field in ("keep", "languages"):
            unknown = sorted(set(getattr(self.params, field) or ()) - known)
            if unknown:
                raise ValueError(f"{field}: {unknown} are not languages langid knows; "
                                 f"valid: {', '.join(sorted(known))}")
        if self.params.keep and self.params.languages:
            never = sorted(set(self.params.keep) - set(self.params.languages))
            if never:
                raise ValueError(f"keep: {never} can never be found, they are not in languages")

    def setup(self) -> None:
        self._ident = load_identifier(self.params.languages)
        # langid's nb_classprobs multiplies the dense uint32 feature vector by the
        # float32 matrix, which numpy upcasts to float64 on every call (~6 ms a
        # document); the same float64 sum over the non-zero features only is ~0.1 ms
        self._ptc64 = np.asarray(self._ident.nb_ptc, dtype=np.float64)

    def classify(self, texts: list[str]) -> tuple[list[str | None], np.ndarray]:
        """Language and confidence of every text (None and 0.0 without letters)."""
        langs: list[str | None] = []
        conf = np.zeros(len(texts), dtype=np.float64)
        for i, text in enumerate(texts):
            head = text[: self.params.max_chars]
            if not any(ch.isalpha() for ch in head):
                langs.append(None)
                continue
            fv = self._ident.instance2fv(head)
            nz = np.flatnonzero(fv)
            scores = fv[nz].astype(np.float64) @ self._ptc64[nz] + self._ident.nb_pc
            probs = self._ident.norm_probs(scores)
            best = int(np.argmax(probs))
            langs.append(str(self._ident.nb_classes[best]))
            conf[i] = float(probs[best])
        return langs, conf

    def process(self, batch: pa.Table) -> StageOutput:
        langs, conf = self.classify(batch.column("text").to_pylist())
        keep = np.ones(batch.num_rows, dtype=bool)
        reasons = np.empty(batch.num_rows, dtype=object)
        details = np.empty(batch.num_rows, dtype=object)
        allowed = set(self.params.keep) if self.params.keep else None
        for i, lang in enumerate(langs):
            if allowed is not None and lang not in allowed:
                keep[i] = False
                reasons[i] = "no_language" if lang is None else f"language_{lang}"
            elif conf[i] < self.params.min_confidence:
                keep[i] = False
                reasons[i] = "low_confidence"
            details[i] = f"{lang}:{conf[i]:.4f}"
        batch = batch.append_column(f"{self.name}_lang", pa.array(langs, pa.string()))
        batch = batch.append_column(f"{self.name}_confidence", pa.array(conf, pa.float64()))
        return split_batch(batch, keep, self.name, reasons, details)
