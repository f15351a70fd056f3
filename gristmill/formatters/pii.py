"""Find and redact personal data and secrets in ``text`` (row-local formatter).

Every match is replaced by a typed placeholder (``<EMAIL>``, ``<IP_ADDRESS>``,
``<PHONE>``, ``<CREDIT_CARD>``, ``<IBAN>``, ``<SECRET>`` by default) and
counted per type in ``<name>_counts`` (a struct of int32, one field per
type). The stage never records what it found: drop details and counts hold
numbers only, so an original value cannot reach ``dropped/``, the manifest or
the report; redacted text is all that travels on.

Detectors (all on by default; ``types`` picks a subset):

- ``email``: ``local@domain.tld``, internationalized domains too (also inside
  URLs and ``mailto:``; a ``user:password@host`` in a URL is redacted as one);
- ``ip_address``: IPv4 (four 0-255 octets, not part of a longer dotted
  number such as a version ``1.2.3.4.5``) and IPv6 (checked by ``ipaddress``;
  at least three groups, so ``std::vector`` and times stay);
- ``phone``: 9 to 15 digits, in groups separated by spaces, dots, dashes or
  parentheses, starting with ``+`` or an area code in parentheses, or written
  as at least three groups (not after ``ISBN``);
- ``credit_card``: 13 to 19 digits (optionally grouped by spaces or dashes)
  that pass the Luhn check (ISO/IEC 7812-1 Annex B);
- ``iban``: a country code, two check digits and 11 to 30 letters or digits
  (optionally in groups of four) whose ISO 13616 mod-97 check gives 1;
- ``secret``: common key shapes: AWS access key ids (``AKIA``/``ASIA`` + 16),
  GitHub tokens (``ghp_``, ``gho_``, ``ghu_``, ``ghs_``, ``ghr_``,
  ``github_pat_``), Slack tokens (``xox[abprs]-``), Stripe keys
  (``sk_live_``/``rk_live_``), Google API keys (``AIza`` + 35), OpenAI-style
  ``sk-`` keys, JSON web tokens, PEM private-key blocks, and the value of
  ``password=``, ``api_key:``, ``secret=``, ``token=`` assignments.

Where matches overlap, the earlier detector in the order ``secret``,
``email``, ``iban``, ``credit_card``, ``ip_address``, ``phone`` wins. Phone
numbers are the loosest rule: a digit table with three groups of three or
more digits can match; turn ``phone`` off for numeric corpora.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from gristmill.pipeline.stage import RowStage, StageOutput, StageParams, split_batch

PiiType = Literal["secret", "email", "iban", "credit_card", "ip_address", "phone"]
ORDER: tuple[str, ...] = ("secret", "email", "iban", "credit_card", "ip_address", "phone")

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]{1,64}@(?:[\w-]{1,63}\.)+[^\W\d_]{2,24}(?![\w-])")
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
                   r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|"
                   r"(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,5}\)[ .-]?)?\d{1,5}"
                    r"(?:[ .-]\d{1,8}){1,5}(?![\w])")
# each secret shape with the literal it must contain: a substring test (C speed)
# decides whether its regex runs at all, which most documents never need
_SECRET_SHAPES: tuple[tuple[tuple[str, ...], re.Pattern], ...] = tuple(
    (literals, re.compile(pattern)) for literals, pattern in [
        (("AKIA", "ASIA"), r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
        (("ghp_", "gho_", "ghu_", "ghs_", "ghr_"), r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,255}\b"),
        (("github_pat_",), r"\bgithub_pat_[A-Za-z0-9_]{22,255}\b"),
        (("xox",), r"\bxox[abprs]-[A-Za-z0-9-]{10,250}\b"),
        (("k_live_",), r"\b[rs]k_live_[A-Za-z0-9]{16,247}\b"),
        (("AIza",), r"\bAIza[0-9A-Za-z_-]{35}\b"),
        (("sk-",), r"\bsk-(?:proj-)?[A-Za-z0-9_-]{20,200}\b"),
        (("eyJ",), r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\b"),
        (("PRIVATE KEY-----",),
         r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z]+ )?PRIVATE KEY-----"),
    ])
_ASSIGNED = re.compile(r"(?i)\b(?:password|passwd|pwd|api[_-]?key|secret(?:[_-]?key)?|"
                       r"access[_-]?token|auth[_-]?token|token)\b(\s*[:=]\s*[\"']?)"
                       r"([^\s\"',;]{6,200})")


def luhn_ok(digits: str) -> bool:
    """The Luhn check digit test (ISO/IEC 7812-1): doubling every second digit
    from the right, the digit sum is a multiple of 10.

    >>> luhn_ok("4111111111111111"), luhn_ok("4111111111111112")
    (True, False)
    """
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """ISO 13616 check: move the first four characters to the end, letters to
    10..35, the number mod 97 is 1.

    >>> iban_ok("DE89 3704 0044 0532 0130 00"), iban_ok("DE88 3704 0044 0532 0130 00")
    (True, False)
    """
    s = iban.replace(" ", "")
    s = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in s)) % 97 == 1


Span = tuple[int, int]


def _spans(pattern: re.Pattern, text: str, ok: Callable[[str], bool] | None = None,
           group: int = 0) -> list[Span]:
    out = []
    for m in pattern.finditer(text):
        if ok is None or ok(m.group(group)):
            out.append(m.span(group))
    return out


def _secrets(text: str) -> list[Span]:
    spans = []
    for literals, pattern in _SECRET_SHAPES:
        if any(lit in text for lit in literals):
            spans += _spans(pattern, text)
    lower = text.lower()
    if any(k in lower for k in ("pass", "pwd", "key", "secret", "token")):
        spans += _spans(_ASSIGNED, text, group=2)
    return spans


def _card(s: str) -> bool:
    digits = re.sub(r"[ -]", "", s)
    return 13 <= len(digits) <= 19 and luhn_ok(digits) and len(set(digits)) > 1


def _ipv6(s: str) -> bool:
    if s.count(":") < 2 or len(s) < 6:
        return False
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return sum(1 for g in s.split(":") if g) >= 3


def _phone(s: str) -> bool:
    digits = sum(ch.isdigit() for ch in s)
    if not 9 <= digits <= 15:
        return False
    groups = len(re.findall(r"\d+", s))
    return s.startswith("+") or "(" in s or groups >= 3


DETECTORS: dict[str, Callable[[str], list[Span]]] = {
    "secret": _secrets,
    "email": lambda t: _spans(_EMAIL, t) if "@" in t else [],
    "iban": lambda t: _spans(_IBAN, t, iban_ok),
    "credit_card": lambda t: _spans(_CARD, t, _card),
    "ip_address": lambda t: ((_spans(_IPV4, t) if "." in t else [])
                             + (_spans(_IPV6, t, _ipv6) if ":" in t else [])),
    "phone": lambda t: [(s, e) for s, e in _spans(_PHONE, t, _phone)
                        if "ISBN" not in t[max(0, s - 8):s].upper()],
}


def redact(text: str, types: tuple[str, ...], placeholders: dict[str, str]) -> tuple[str, dict[str, int]]:
    """``text`` with every match replaced by its type's placeholder, and the
    number of replacements per type.

    >>> redact("mail ada@mill.org from 10.0.0.7", ("email", "ip_address"),
    ...        {"email": "<EMAIL>", "ip_address": "<IP_ADDRESS>"})
    ('mail <EMAIL> from <IP_ADDRESS>', {'email': 1, 'ip_address': 1})
    """
    counts = dict.fromkeys(types, 0)
    taken: list[tuple[int, int, str]] = []
    for kind in types:
        for start, end in DETECTORS[kind](text):
            if all(end <= s or start >= e for s, e, _ in taken):
                taken.append((start, end, kind))
                counts[kind] += 1
    if not taken:
        return text, counts
    taken.sort()
    parts, pos = [], 0
    for start, end, kind in taken:
        parts.append(text[pos:start])
        parts.append(placeholders[kind])
        pos = end
    parts.append(text[pos:])
    return "".join(parts), counts


class PiiParams(StageParams):
    types: list[PiiType] = Field(default_factory=lambda: list(ORDER),
                                 description="which detectors run")
    placeholder: str = Field("<{TYPE}>", description="replacement; {TYPE} is the upper-case "
                             "type name (EMAIL, IP_ADDRESS, ...), {type} the lower-case one")
    max_redactions: int | None = Field(None, ge=0, description="drop records with more "
                                       "redactions than this (reason too_much_pii); null: keep all")


class Pii(RowStage):
    """Redact personal data and secrets with typed placeholders; count them per type.

    Parameters
    ----------
    types : list of str
        Detectors to run, from ``secret``, ``email``, ``iban``, ``credit_card``,
        ``ip_address``, ``phone`` (all by default; see the module docstring).
    placeholder : str
        The replacement text, with ``{TYPE}`` or ``{type}`` for the type.
    max_redactions : int or None
        Drop a record with more redactions than this (reason ``too_much_pii``,
        detail: the counts per type, never the values).

    Examples
    --------
    >>> import pyarrow as pa
    >>> st = Pii()
    >>> out = st.process(pa.table({"id": ["a"], "text": [
    ...     "Write to miller@example.org or call +44 20 7946 0958. Card 4111 1111 1111 1111."]}))
    >>> out.kept.column("text")[0].as_py()
    'Write to <EMAIL> or call <PHONE>. Card <CREDIT_CARD>.'
    >>> out.kept.column("pii_counts")[0].as_py()["credit_card"]
    1
    """

    type_name = "pii"
    Params: ClassVar = PiiParams
    requires = ("text",)

    def output_columns(self) -> tuple[str, ...]:
        return (f"{self.name}_counts",)

    def _types(self) -> tuple[str, ...]:
        chosen = set(self.params.types)
        return tuple(t for t in ORDER if t in chosen)

    def process(self, batch: pa.Table) -> StageOutput:
        types = self._types()
        holders = {t: self.params.placeholder.replace("{TYPE}", t.upper()).replace("{type}", t)
                   for t in types}
        texts = batch.column("text").to_pylist()
        new_texts, counts = [], {t: [] for t in types}
        keep = np.ones(len(texts), dtype=bool)
        details = np.empty(len(texts), dtype=object)
        limit = self.params.max_redactions
        for i, text in enumerate(texts):
            red, c = redact(text, types, holders)
            new_texts.append(red)
            for t in types:
                counts[t].append(c[t])
            if limit is not None and sum(c.values()) > limit:
                keep[i] = False
                details[i] = " ".join(f"{t}={n}" for t, n in c.items() if n)
        idx = batch.schema.get_field_index("text")
        field = batch.schema.field(idx)
        batch = batch.set_column(idx, field, pa.array(new_texts, field.type))
        struct = pa.StructArray.from_arrays([pa.array(counts[t], pa.int32()) for t in types],
                                            names=list(types))
        batch = batch.append_column(f"{self.name}_counts", struct)
        return split_batch(batch, keep, self.name, "too_much_pii", details)
