"""C4's line rules (row-local selector that also rewrites ``text``).

Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer", Section 2.2, as implemented in TensorFlow Datasets'
``c4_utils.py`` and in DataTrove's ``C4QualityFilter``, whose rule order and
names this follows. Every line (``str.splitlines``, stripped) is checked in
turn:

1. a word longer than ``max_word_length`` characters: the line goes;
2. Wikipedia citation marks (``[1]``, ``[edit]``, ``[citation needed]``) are
   removed (``remove_citations``);
3. no sentence-terminal ending (``. ? ! " '``), or ending in ``...``: the line goes;
4. fewer than ``min_words_per_line`` words: the line goes;
5. ``lorem ipsum`` anywhere: the **document** is dropped (``lorem_ipsum``);
6. ``javascript``: the line goes;
7. a curly bracket ``{``: the **document** is dropped (``curly_bracket``);
8. a policy phrase (``terms of use``, ``privacy policy``, ``cookie policy``,
   ``uses cookies``, ``use of cookies``, ``use cookies``): the line goes.

A document with fewer than ``min_num_sentences`` sentences in its kept lines
is dropped (``too_few_sentences``); otherwise its text becomes the kept lines
joined by newlines. Sentences are counted by ``text_units.count_sentences``
(DataTrove asks NLTK's Punkt, which knows abbreviations). With
``min_num_sentences: null`` a document whose every line went is dropped as
``no_lines_left`` (DataTrove keeps it with empty text).
"""

from __future__ import annotations

import re
from typing import ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field

from gristmill.pipeline.stage import RowStage, StageOutput, StageParams, split_batch
from gristmill.selectors.filters.text_units import count_sentences

CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
END_PUNCTUATION = (".", "?", "!", '"', "'")
POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies",
                  "use of cookies", "use cookies")


class C4LinesParams(StageParams):
    remove_citations: bool = Field(True, description="remove [1], [edit], [citation needed]")
    filter_no_terminal_punct: bool = Field(True, description="drop lines that do not end in "
                                           ". ? ! \" ' (or that end in ...)")
    min_num_sentences: int | None = Field(5, ge=1, description="drop documents with fewer "
                                          "sentences in their kept lines; null: no minimum")
    min_words_per_line: int | None = Field(3, ge=1, description="drop lines with fewer words")
    max_word_length: int | None = Field(1000, ge=1, description="drop lines with a longer word")
    filter_lorem_ipsum: bool = Field(True, description="drop documents containing lorem ipsum")
    filter_javascript: bool = Field(True, description="drop lines mentioning javascript")
    filter_curly_bracket: bool = Field(True, description="drop documents containing {")
    filter_policy: bool = Field(True, description="drop lines with a cookie/terms/privacy phrase")


LINE_RULES = ("too_long_word", "no_terminal_punct", "too_few_words", "javascript", "policy")


def c4_clean(text: str, p: C4LinesParams,
             removed: dict[str, int] | None = None) -> tuple[str | None, str | None]:
    """``(kept text, None)`` or ``(None, reason)`` for one document; ``removed``, when
    given, counts the lines each line rule took out (``LINE_RULES``)."""
    removed = removed if removed is not None else {}
    kept: list[str] = []
    sentences = 0

    def drop(rule: str) -> None:
        removed[rule] = removed.get(rule, 0) + 1

    for line in text.splitlines():
        line = line.strip()
        words = line.split()
        if p.max_word_length is not None and any(len(w) > p.max_word_length for w in words):
            drop("too_long_word")
            continue
        if p.remove_citations:
            line = CITATION.sub("", line)
        if p.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION)
                                           or line.endswith("...")):
            drop("no_terminal_punct")
            continue
        # as in C4 and DataTrove, the word count is taken before citations are removed
        if p.min_words_per_line is not None and len(words) < p.min_words_per_line:
            drop("too_few_words")
            continue
        lower = line.lower()
        if p.filter_lorem_ipsum and "lorem ipsum" in lower:
            return None, "lorem_ipsum"
        if p.filter_javascript and "javascript" in lower:
            drop("javascript")
            continue
        if p.filter_curly_bracket and "{" in line:
            return None, "curly_bracket"
        if p.filter_policy and any(phrase in lower for phrase in POLICY_PHRASES):
            drop("policy")
            continue
        if p.min_num_sentences is not None:
            sentences += count_sentences(line)
        kept.append(line)
    if p.min_num_sentences is not None and sentences < p.min_num_sentences:
        return None, "too_few_sentences"
    if not kept:
        return None, "no_lines_left"
    return "\n".join(kept).strip(), None


class C4Lines(RowStage):
    """C4's line rules: drop bad lines, rewrite ``text`` to the kept lines, drop
    documents with lorem ipsum, a curly bracket or too few sentences.

    Reasons: ``lorem_ipsum``, ``curly_bracket``, ``too_few_sentences``,
    ``no_lines_left``. Kept documents get ``<name>_lines_removed``, a struct
    of int32 with the lines each line rule took out (``too_long_word``,
    ``no_terminal_punct``, ``too_few_words``, ``javascript``, ``policy``).

    Parameters
    ----------
    remove_citations, filter_no_terminal_punct, filter_lorem_ipsum, filter_javascript,
    filter_curly_bracket, filter_policy : bool
        Turn each rule on or off (all on, as in C4).
    min_num_sentences : int or None
        Fewest sentences a kept document has (C4: 5).
    min_words_per_line : int or None
        Fewest words a kept line has (C4: 3).
    max_word_length : int or None
        Longest word a kept line may hold (C4: 1000 characters).

    Examples
    --------
    >>> import pyarrow as pa
    >>> page = "Home | About\\n" + "\\n".join(["The mill grinds grain. It runs on water."] * 3)
    >>> out = C4Lines().process(pa.table({"id": ["a"], "text": [page]}))
    >>> out.kept.column("text")[0].as_py().splitlines()[0]
    'The mill grinds grain. It runs on water.'
    >>> out.kept.column("c4_lines_lines_removed")[0].as_py()["no_terminal_punct"]
    1
    """

    type_name = "c4_lines"
    Params: ClassVar = C4LinesParams
    requires = ("text",)

    def output_columns(self) -> tuple[str, ...]:
        return (f"{self.name}_lines_removed",)

    def process(self, batch: pa.Table) -> StageOutput:
        texts = batch.column("text").to_pylist()
        keep = np.ones(len(texts), dtype=bool)
        reasons = np.empty(len(texts), dtype=object)
        new_texts: list[str] = []
        removed = {rule: [] for rule in LINE_RULES}
        for i, text in enumerate(texts):
            counts: dict[str, int] = {}
            cleaned, reason = c4_clean(text, self.params, counts)
            if cleaned is None:
                keep[i] = False
                reasons[i] = reason
                new_texts.append(text)
            else:
                new_texts.append(cleaned)
            for rule in LINE_RULES:
                removed[rule].append(counts.get(rule, 0))
        idx = batch.schema.get_field_index("text")
        field = batch.schema.field(idx)
        batch = batch.set_column(idx, field, pa.array(new_texts, field.type))
        struct = pa.StructArray.from_arrays([pa.array(removed[r], pa.int32()) for r in LINE_RULES],
                                            names=list(LINE_RULES))
        batch = batch.append_column(f"{self.name}_lines_removed", struct)
        return split_batch(batch, keep, self.name, reasons)
