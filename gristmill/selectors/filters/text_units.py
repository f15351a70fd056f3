"""Lines, paragraphs, words and sentences as the heuristic filters count them.

One definition for every filter, so that a rule means the same thing in each:

- *words*: whitespace-separated tokens, except that every CJK ideograph, kana
  and Hangul-less East Asian character is a word of its own (Chinese and
  Japanese are written without spaces; otherwise a Chinese page would be a
  handful of "words"). For text without CJK this is exactly ``str.split()``.
  DataTrove splits English with spaCy's tokenizer, which also makes tokens of
  punctuation (``"end."`` is ``["end", "."]``) and clitics (``"don't"`` is
  ``["do", "n't"]``); on text whose words carry no punctuation the two agree.
- *sentence-terminal characters*: Unicode's ``Sentence_Terminal`` property
  (``. ! ? 。 ！ ？ ؟ ।`` ...), read from the ``regex`` module's Unicode tables.
  DataTrove's ``TERMINAL_PUNCTUATION`` is the same property from an older
  Unicode version plus three Khmer signs (``៖ ៙ ៚``), which are added here too.
"""

from __future__ import annotations

import re
import sys
from functools import lru_cache

import regex

_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f])")


def split_words(text: str) -> list[str]:
    """Words of ``text``: whitespace tokens, each CJK character a word of its own.

    >>> split_words("grain mill 水车磨坊")
    ['grain', 'mill', '水', '车', '磨', '坊']
    """
    if _CJK.search(text):
        text = _CJK.sub(r" \1 ", text)
    return text.split()


@lru_cache(maxsize=1)
def terminal_punctuation() -> tuple[str, ...]:
    """Every character with Unicode's ``Sentence_Terminal`` property, plus ``៖ ៙ ៚``."""
    prop = regex.compile(r"\p{Sentence_Terminal}")
    chars = {chr(c) for c in range(sys.maxunicode + 1) if prop.match(chr(c))}
    return tuple(sorted(chars | {"\u17d6", "\u17d9", "\u17da"}))


_SENTENCE_END = None


def count_sentences(line: str) -> int:
    """Sentences in one line: runs of text that end in sentence-terminal characters
    followed by whitespace or the end (a trailing fragment counts as one).

    DataTrove asks NLTK's Punkt (English) for sentences; Punkt also knows that
    ``"Dr. Smith"`` does not end a sentence, this count does not.

    >>> count_sentences("One. Two! Three? and a tail")
    4
    """
    global _SENTENCE_END
    if _SENTENCE_END is None:
        ends = "".join(re.escape(c) for c in terminal_punctuation())
        _SENTENCE_END = re.compile(f"[{ends}]+(?:\\s+|$)")
    parts = [p for p in _SENTENCE_END.split(line.strip()) if p.strip()]
    return len(parts)


def find_duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items equal to an earlier item, their characters): Gopher's
    duplicate-line and duplicate-paragraph measures (Rae et al. 2021, Table A1)."""
    seen: set[str] = set()
    n_dup = chars = 0
    for item in items:
        if item in seen:
            n_dup += 1
            chars += len(item)
        else:
            seen.add(item)
    return n_dup, chars
