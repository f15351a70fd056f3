"""Drop or flag records that share long n-grams with evaluation sets
(row-local selector).

The n-gram overlap test of GPT-3 (Brown et al. 2020, "Language Models are
Few-Shot Learners", Appendix C) and of the Llama papers' contamination
analysis: text is normalised (Unicode NFKC, lower case, punctuation and
symbols removed, whitespace collapsed, so line breaks do not cut n-grams),
split into words (``text_units.split_words``: every CJK character is a
word), and a training record is contaminated by an evaluation set when they
share at least ``min_matches`` word n-grams of length ``n`` (13 by default,
GPT-3's choice). An evaluation text shorter than ``n`` words but at least
``min_words`` long contributes its whole word sequence as one shorter n-gram
(GPT-3 App. C does the same for short items); shorter ones are ignored.

Memory: an n-gram is a 64-bit hash (BLAKE2b of each word, a polynomial
rolling hash over the n words, SplitMix64's finalizer), so a set costs 16
bytes per distinct n-gram (the hash and a bit mask of the evaluation sets
that hold it), whatever the text length. The table is built in ``setup``
streaming the evaluation files in chunks of ``chunk_rows`` records (sorted
and deduplicated per chunk, merged into the table whenever the pending
chunks outgrow it, so building needs about twice the table's size), written to
``cache_dir/<fingerprint>/*.npy`` and memory-mapped, so the workers of one
machine share one copy in the page cache and a rerun skips the build. 100 M
distinct evaluation n-grams take 1.6 GB on disk. Lookups are a binary search
(``numpy.searchsorted``) per document n-gram.

With ``mode: drop`` the reason is ``contaminated_<set>`` for the first
evaluation set (in recipe order) the record matches, so the funnel counts
records per evaluation set; the detail lists every matched set and the
number of shared n-grams (never the text). With ``mode: flag`` records are
kept and get ``<name>_sets`` (list of matched set names) and
``<name>_ngrams`` (shared n-grams).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import unicodedata
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gristmill.pipeline.hashing import mix64
from gristmill.pipeline.stage import RowStage, StageOutput, StageParams, split_batch
from gristmill.pipeline.storage import is_remote
from gristmill.selectors.filters.text_units import split_words

_NOT_WORD = re.compile(r"[^\w\s]|_", re.UNICODE)
_POLY = np.uint64(0x100000001B3)  # FNV-1a's 64-bit prime: odd, so multiplication is invertible


def normalize_for_overlap(text: str) -> list[str]:
    """Words of ``text`` after NFKC, lower-casing and removing punctuation.

    >>> normalize_for_overlap("The Mill's\\nwheel -- turned!")
    ['the', 'mill', 's', 'wheel', 'turned']
    """
    text = unicodedata.normalize("NFKC", text).lower()
    return split_words(_NOT_WORD.sub(" ", text))


class WordHasher:
    """64-bit hashes of words (BLAKE2b, cached) and of word n-grams."""

    def __init__(self) -> None:
        self._cache: dict[str, int] = {}

    def words(self, words: list[str]) -> np.ndarray:
        cache = self._cache
        out = np.empty(len(words), dtype=np.uint64)
        for i, w in enumerate(words):
            h = cache.get(w)
            if h is None:
                h = int.from_bytes(hashlib.blake2b(w.encode("utf-8", "surrogatepass"),
                                                   digest_size=8).digest(), "little")
                if len(cache) < 2_000_000:
                    cache[w] = h
            out[i] = h
        return out

    @staticmethod
    def ngrams(word_hashes: np.ndarray, n: int) -> np.ndarray:
        """Hash of every n consecutive words: ``mix64(sum_j w[i+j] P^(n-1-j) mod 2^64, salt=n)``."""
        m = word_hashes.size - n + 1
        if m <= 0:
            return np.empty(0, dtype=np.uint64)
        acc = np.zeros(m, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(n):
                acc = acc * _POLY + word_hashes[j:j + m]
        return mix64(acc, seed=n, salt="ngram")


class EvalSet(BaseModel):
    """One evaluation set: files and the fields whose text is checked."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="name used in reasons")
    path: str | list[str] = Field(description="JSONL or Parquet files, globs or folders")
    fields: list[str] = Field(default_factory=lambda: ["text"], description="fields holding "
                              "evaluation text (strings or lists of strings); each is an item")


class DecontaminateParams(StageParams):
    eval_sets: list[EvalSet] = Field(min_length=1, max_length=64,
                                     description="evaluation sets: name, path, fields (1 to 64)")
    n: int = Field(13, ge=3, le=64, description="n-gram length in words")
    min_words: int = Field(8, ge=1, description="shortest evaluation item that is used")
    min_matches: int = Field(1, ge=1, description="shared n-grams that make a record contaminated")
    mode: Literal["drop", "flag"] = Field("drop", description="drop contaminated records, or "
                                          "keep them and add <name>_sets, <name>_ngrams")
    cache_dir: str = Field(".gristmill-cache/decontaminate", description="where the n-gram "
                           "table is written and memory-mapped (relative to the recipe)")
    chunk_rows: int = Field(50_000, ge=1, description="evaluation records hashed per chunk")

    @model_validator(mode="after")
    def _lengths(self) -> DecontaminateParams:
        if self.min_words > self.n:
            raise ValueError(f"min_words ({self.min_words}) must be <= n ({self.n})")
        names = [s.name for s in self.eval_sets]
        if len(set(names)) != len(names):
            raise ValueError(f"eval_sets: names must be distinct, got {names}")
        return self


def _expand(path: str | list[str], resolve, local) -> list[Path]:
    """Files of an eval set's path(s): ``resolve`` makes a pattern absolute, ``local``
    (``Stage.local_path``) fetches an object or prefix once into the model cache and
    checks a pinned path against the run's pin."""
    files: list[Path] = []
    for pattern in [path] if isinstance(path, str) else path:
        if is_remote(resolve(pattern)) and any(c in pattern for c in "*?["):
            raise ValueError(f"{pattern}: globs are not expanded on object stores; name "
                             "an object or a prefix (its files are all read)")
        p = Path(local(pattern))
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.is_file()
                            and q.name.endswith((".jsonl", ".json", ".parquet")))
        elif any(c in pattern for c in "*?["):
            files += sorted(Path(q) for q in glob.glob(str(p), recursive=True))
        else:
            files.append(p)
    return files


def _items(path: Path, fields: list[str], chunk_rows: int):
    """Chunks of evaluation strings from one JSONL or Parquet file."""

    def strings(rec: dict[str, Any]) -> list[str]:
        out = []
        for f in fields:
            v = rec.get(f)
            if isinstance(v, str):
                out.append(v)
            elif isinstance(v, list):
                out += [x for x in v if isinstance(x, str)]
        return out

    if path.name.endswith(".parquet"):
        pf = pq.ParquetFile(path)
        present = [f for f in fields if f in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=present):
            yield [s for rec in batch.to_pylist() for s in strings(rec)]
        return
    chunk: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno} is not JSON: {e}") from None
            chunk += strings(rec) if isinstance(rec, dict) else []
            if len(chunk) >= chunk_rows:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


class Decontaminate(RowStage):
    """Drop (or flag) records sharing word n-grams with evaluation sets.

    Parameters
    ----------
    eval_sets : list of {name, path, fields}
        Evaluation sets (JSONL/Parquet files, globs or folders) and the fields
        whose text is checked; up to 64.
    n : int
        N-gram length in words (13, as GPT-3).
    min_words : int
        Evaluation items shorter than ``n`` but at least this long count as one n-gram.
    min_matches : int
        Shared n-grams needed to call a record contaminated.
    mode : {"drop", "flag"}
        Drop with reason ``contaminated_<set>``, or keep and add ``<name>_sets``,
        ``<name>_ngrams``.
    cache_dir : str
        Folder of the memory-mapped n-gram table.
    chunk_rows : int
        Evaluation records hashed at a time while building the table.

    Examples
    --------
    >>> import json, tempfile, pathlib, pyarrow as pa
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> q = "which river turns the wheel of the old stone mill in the valley every spring"
    >>> _ = (d / "qa.jsonl").write_text(json.dumps({"text": q}) + "\\n")
    >>> st = Decontaminate({"eval_sets": [{"name": "qa", "path": str(d / "qa.jsonl")}],
    ...                     "cache_dir": str(d / "cache")})
    >>> st.setup()
    >>> doc = "Quiz: Which river turns the wheel of the old\\nstone mill in the valley?"
    >>> st.process(pa.table({"id": ["a"], "text": [doc]})).dropped.column("reason").to_pylist()
    ['contaminated_qa']
    """

    type_name = "decontaminate"
    path_fields = ("eval_sets[].path",)
    Params: ClassVar = DecontaminateParams
    requires = ("text",)

    def output_columns(self) -> tuple[str, ...]:
        if self.params.mode == "flag":
            return (f"{self.name}_sets", f"{self.name}_ngrams")
        return ()

    def _files(self) -> list[list[Path]]:
        return [_expand(s.path, self.resolve_path, self.local_path) for s in self.params.eval_sets]

    def check(self, base_dir: str) -> None:
        for i, (spec, files) in enumerate(zip(self.params.eval_sets, self._files(), strict=True)):
            if not files:
                raise ValueError(f"eval_sets[{i}].path: {spec.path!r} matches no files")
            for f in files:
                if not f.is_file():
                    raise ValueError(f"eval_sets[{i}].path: {f} does not exist")
                if not f.name.endswith((".jsonl", ".json", ".parquet")):
                    raise ValueError(f"eval_sets[{i}].path: {f} is neither .jsonl nor .parquet")

    def _fingerprint(self, files: list[list[Path]]) -> str:
        p = self.params
        h = hashlib.sha256(json.dumps([p.n, p.min_words, [s.model_dump() for s in p.eval_sets]],
                                      sort_keys=True).encode())
        for group in files:
            for f in group:
                st = f.stat()
                h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:24]

    def build_table(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Sorted distinct n-gram hashes, a bit mask of their sets, and the short lengths used.

        Chunks are merged into the table as they come, whenever the pending
        hashes outgrow the table, so memory stays within about twice the
        distinct n-grams (16 bytes each) however many duplicates the sets hold.
        """
        p = self.params
        hasher = WordHasher()
        table = (np.empty(0, np.uint64), np.empty(0, np.uint64))
        pending: list[tuple[np.ndarray, np.ndarray]] = []
        pending_size = 0
        lengths: set[int] = set()
        for bit, (spec, files) in enumerate(zip(p.eval_sets, self._files(), strict=True)):
            for f in files:
                for chunk in _items(f, spec.fields, p.chunk_rows):
                    parts = []
                    for text in chunk:
                        words = normalize_for_overlap(text)
                        if len(words) < p.min_words:
                            continue
                        k = min(len(words), p.n)
                        lengths.add(k)
                        parts.append(WordHasher.ngrams(hasher.words(words), k))
                    if parts:
                        u = np.unique(np.concatenate(parts))
                        pending.append((u, np.full(u.size, np.uint64(1) << np.uint64(bit))))
                        pending_size += u.size
                    if pending_size > max(1 << 20, table[0].size):
                        table = _merge([table, *pending])
                        pending, pending_size = [], 0
        table = _merge([table, *pending])
        return table[0], table[1], sorted(lengths)

    def setup(self) -> None:
        files = self._files()
        cache = Path(self.resolve_path(self.params.cache_dir))
        folder = cache / self._fingerprint(files)
        if not (folder / "lengths.npy").is_file():
            h, m, lengths = self.build_table()
            tmp = cache / f".{folder.name}.{os.getpid()}.tmp"
            tmp.mkdir(parents=True, exist_ok=True)
            np.save(tmp / "hashes.npy", h)
            np.save(tmp / "masks.npy", m)
            np.save(tmp / "lengths.npy", np.asarray(lengths, dtype=np.int64))
            try:
                os.replace(tmp, folder)
            except OSError:  # another worker published the same table first
                shutil.rmtree(tmp, ignore_errors=True)
        self._lengths = [int(k) for k in np.load(folder / "lengths.npy")]
        mode = "r" if self._lengths else None  # numpy cannot map an empty array
        self._hashes = np.load(folder / "hashes.npy", mmap_mode=mode)
        self._masks = np.load(folder / "masks.npy", mmap_mode=mode)

    def matches(self, text: str, hasher: WordHasher) -> tuple[int, int]:
        """(bit mask of matched sets, number of shared n-grams) of one text."""
        words = normalize_for_overlap(text)
        if not words or self._hashes.size == 0:
            return 0, 0
        wh = hasher.words(words)
        mask = 0
        count = 0
        for k in self._lengths:
            grams = WordHasher.ngrams(wh, k)
            if grams.size == 0:
                continue
            pos = np.searchsorted(self._hashes, grams)
            pos[pos == self._hashes.size] = 0
            hit = self._hashes[pos] == grams
            if hit.any():
                count += int(hit.sum())
                mask |= int(np.bitwise_or.reduce(self._masks[pos[hit]]))
        return mask, count

    def process(self, batch: pa.Table) -> StageOutput:
        if not hasattr(self, "_hashes"):
            self.setup()
        names = [s.name for s in self.params.eval_sets]
        hasher = WordHasher()
        texts = batch.column("text").to_pylist()
        keep = np.ones(len(texts), dtype=bool)
        reasons = np.empty(len(texts), dtype=object)
        details = np.empty(len(texts), dtype=object)
        sets_col: list[list[str]] = []
        counts = np.zeros(len(texts), dtype=np.int32)
        for i, text in enumerate(texts):
            mask, count = self.matches(text, hasher)
            matched = [n for b, n in enumerate(names) if mask >> b & 1] \
                if count >= self.params.min_matches else []
            sets_col.append(matched)
            counts[i] = count
            if matched and self.params.mode == "drop":
                keep[i] = False
                reasons[i] = f"contaminated_{matched[0]}"
                details[i] = f"sets={','.join(matched)} ngrams={count}"
        if self.params.mode == "flag":
            batch = batch.append_column(f"{self.name}_sets", pa.array(sets_col, pa.list_(pa.string())))
            batch = batch.append_column(f"{self.name}_ngrams", pa.array(counts, pa.int32()))
        return split_batch(batch, keep, self.name, reasons, details)


def _merge(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct hashes of all parts, their set masks OR-ed together."""
    h = np.concatenate([a for a, _ in parts])
    m = np.concatenate([b for _, b in parts])
    if h.size == 0:
        return h, m
    order = np.argsort(h, kind="stable")
    h, m = h[order], m[order]
    starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
    return h[starts], np.bitwise_or.reduceat(m, starts)
