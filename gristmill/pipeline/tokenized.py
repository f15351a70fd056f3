"""Tokenized shards in Megatron-LM's indexed-dataset layout, with a domain sidecar.

A tokenized corpus is a *prefix* naming four files:

``<prefix>.bin``
    All token ids, document after document, in one little-endian array
    (``uint16`` when the vocabulary has fewer than 65500 entries, else
    ``int32``, Megatron's ``DType.optimal_dtype``).
``<prefix>.idx``
    The index of Megatron-LM's ``MMapIndexedDataset`` / ``IndexedDataset``
    (``megatron/core/datasets/indexed_dataset.py``), little endian::

        b"MMIDIDX\\x00\\x00"            9 bytes, magic
        version                      uint64, 1
        dtype code                   uint8 (uint16 = 8, int32 = 4, ...)
        sequence count  S            uint64
        document count  D + 1        uint64
        sequence lengths             int32[S]   tokens per sequence
        sequence pointers            int64[S]   byte offset of each sequence in .bin
        document indices             int64[D+1] [0, ..., S]: sequences of document d
                                                are doc_idx[d]:doc_idx[d+1]

    We write one sequence per document, so ``doc_idx = [0, 1, ..., S]``;
    Megatron's ``IndexedDataset(prefix)`` and its GPT datasets read the files
    unchanged.
``<prefix>.dom.npy``
    ``uint16[S]``: the domain id of every document.
``<prefix>.domains.json``
    Domain names (``names[id]``), the tokenizer path, ``eos_token_id``,
    whether ``eos`` was appended to each document, and totals.

The writer streams: tokens are appended to ``.bin`` batch by batch, so memory
holds one batch of text plus 13 bytes of index per document, never the
corpus. All four files are written under temporary names and renamed when
complete (the ``.idx`` last), so a reader never sees a partial corpus.

Example
-------
>>> import tempfile, os
>>> from gristmill.trainers.tiny import build_tokenizer
>>> d = tempfile.mkdtemp()
>>> tok = build_tokenizer(["a cat", "a dog"] * 20, 300, d)
>>> _ = write_tokenized(["a cat", "a dog"], tok, os.path.join(d, "c"), domains=["x", "y"])
>>> ds = IndexedTokens(os.path.join(d, "c"))
>>> len(ds), ds.domain_names, int(ds[0][-1]) == tok.eos_token_id
(2, ['x', 'y'], True)
"""

from __future__ import annotations

import io
import json
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# Megatron-LM's DType enum (megatron/core/datasets/indexed_dataset.py).
DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
    5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
SIDECAR_FORMAT = "gristmill.tokenized/1"
# Documents whose shard has no domain column, or a null domain, go here.
DEFAULT_DOMAIN = "default"
MAX_DOMAINS = np.iinfo(np.uint16).max + 1


def optimal_dtype(vocab_size: int) -> type[np.generic]:
    """``uint16`` below 65500 token ids, else ``int32`` (as Megatron chooses)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def _code_of(dtype: Any) -> int:
    dtype = np.dtype(dtype)
    for code, t in DTYPE_CODES.items():
        if np.dtype(t) == dtype:
            return code
    raise ValueError(f"dtype {dtype} has no Megatron code; valid: "
                     f"{sorted(np.dtype(t).name for t in DTYPE_CODES.values())}")


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


class IndexedTokensWriter:
    """Append documents to ``<prefix>.bin`` as they come; write the index on close.

    Parameters
    ----------
    prefix : str or Path
        Output prefix (``.bin``, ``.idx``, ``.dom.npy``, ``.domains.json``
        are appended).
    vocab_size : int
        Number of token ids; chooses the ``.bin`` dtype (``optimal_dtype``).
    meta : dict, optional
        Extra keys for the sidecar (tokenizer path, eos id).

    Use as a context manager; leaving the block by an exception removes the
    temporary files and publishes nothing.
    """

    def __init__(self, prefix: str | Path, vocab_size: int, meta: dict[str, Any] | None = None) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(optimal_dtype(vocab_size))
        self.vocab_size = vocab_size
        self.meta = dict(meta or {})
        self._paths = {ext: Path(f"{self.prefix}{ext}") for ext in (".bin", ".idx", ".dom.npy", ".domains.json")}
        # Unbuffered: each batch is one write, so the tokens leave memory
        # as soon as a batch is tokenized.
        self._bin = open(_tmp(self._paths[".bin"]), "wb", buffering=0)
        # Index entries per document: 4 + 8 + 2 bytes, kept as compact arrays.
        self._sizes: list[np.ndarray] = []
        self._domain_ids: list[np.ndarray] = []
        self._domain_index: dict[str, int] = {}
        self.num_tokens = 0

    def domain_id(self, name: str | None) -> int:
        """The id of domain ``name`` (assigned in order of first appearance)."""
        name = DEFAULT_DOMAIN if name is None else str(name)
        if name not in self._domain_index:
            if len(self._domain_index) >= MAX_DOMAINS:
                raise ValueError(f"at most {MAX_DOMAINS} domains fit the uint16 domain ids")
            self._domain_index[name] = len(self._domain_index)
        return self._domain_index[name]

    def add_documents(self, docs: Sequence[Sequence[int]], domains: Sequence[str | None] | None = None) -> None:
        """Append a batch of tokenized documents (and their domains) to ``.bin``."""
        if domains is not None and len(domains) != len(docs):
            raise ValueError(f"domains has {len(domains)} entries for {len(docs)} documents")
        sizes = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        if sizes.size == 0:
            return
        flat = np.fromiter(chain.from_iterable(docs), dtype=np.int64, count=int(sizes.sum()))
        if flat.size and (flat.min() < 0 or flat.max() >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got "
                             f"[{flat.min()}, {flat.max()}]")
        self._bin.write(flat.astype(self.dtype).tobytes(order="C"))
        self._sizes.append(sizes.astype(np.int32))
        names = [None] * len(docs) if domains is None else domains
        self._domain_ids.append(np.fromiter((self.domain_id(n) for n in names), dtype=np.uint16,
                                            count=len(docs)))
        self.num_tokens += int(sizes.sum())

    def close(self) -> Path:
        """Write ``.idx`` and the sidecar and publish all four files; returns the prefix."""
        os.fsync(self._bin.fileno())
        self._bin.close()
        sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0, np.int32)
        domain_ids = np.concatenate(self._domain_ids) if self._domain_ids else np.zeros(0, np.uint16)
        pointers = np.zeros(sizes.size, dtype=np.int64)
        np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.arange(sizes.size + 1, dtype=np.int64)
        with open(_tmp(self._paths[".idx"]), "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", INDEX_VERSION))
            f.write(struct.pack("<B", _code_of(self.dtype)))
            f.write(struct.pack("<Q", sizes.size))
            f.write(struct.pack("<Q", doc_idx.size))
            f.write(sizes.astype("<i4").tobytes(order="C"))
            f.write(pointers.astype("<i8").tobytes(order="C"))
            f.write(doc_idx.astype("<i8").tobytes(order="C"))
        with open(_tmp(self._paths[".dom.npy"]), "wb") as f:
            np.save(f, domain_ids)
        names = sorted(self._domain_index, key=self._domain_index.__getitem__)
        sidecar = {"format": SIDECAR_FORMAT, "domains": names, "num_documents": int(sizes.size),
                   "num_tokens": self.num_tokens, "dtype": self.dtype.name,
                   "vocab_size": self.vocab_size, **self.meta}
        _tmp(self._paths[".domains.json"]).write_text(json.dumps(sidecar, indent=1) + "\n")
        # .idx last: its presence means the corpus is complete.
        for ext in (".bin", ".dom.npy", ".domains.json", ".idx"):
            os.replace(_tmp(self._paths[ext]), self._paths[ext])
        return self.prefix

    def abort(self) -> None:
        """Close and remove the temporary files; nothing is published."""
        if not self._bin.closed:
            self._bin.close()
        for path in self._paths.values():
            _tmp(path).unlink(missing_ok=True)

    def __enter__(self) -> IndexedTokensWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _load_tokenizer(tokenizer: Any) -> tuple[Any, str | None]:
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer)), str(tokenizer)
    return tokenizer, getattr(tokenizer, "name_or_path", None) or None


def _batches(texts: Iterable[str], domains: Iterable[str | None] | None,
             batch_size: int) -> Iterator[tuple[list[str], list[str | None] | None]]:
    texts = iter(texts)
    domains = iter(domains) if domains is not None else None
    while True:
        batch = list(islice(texts, batch_size))
        if not batch:
            if domains is not None and next(domains, None) is not None:
                raise ValueError("domains has more entries than texts")
            return
        doms = None
        if domains is not None:
            doms = list(islice(domains, len(batch)))
            if len(doms) != len(batch):
                raise ValueError("domains has fewer entries than texts")
        yield batch, doms


def write_tokenized(
    texts: Iterable[str],
    tokenizer: Any,
    prefix: str | Path,
    domains: Iterable[str | None] | None = None,
    append_eos: bool = True,
    batch_size: int = 1024,
    progress: bool = True,
) -> Path:
    """Tokenize ``texts`` and write them as a Megatron indexed corpus at ``prefix``.

    Parameters
    ----------
    texts : iterable of str
        Documents, streamed: only ``batch_size`` of them are in memory at once.
    tokenizer : PreTrainedTokenizerBase or str or Path
        A Hugging Face tokenizer or the folder to load one from. Special tokens
        are not added by the tokenizer; ``eos`` is appended when ``append_eos``.
    prefix : str or Path
        Output prefix (see the module docstring for the four files).
    domains : iterable of str, optional
        Domain of each document, in step with ``texts``; None entries and a
        missing iterable mean ``DEFAULT_DOMAIN``.
    append_eos : bool
        Append ``tokenizer.eos_token_id`` to every document, so packed
        sequences see document boundaries.
    batch_size : int
        Documents tokenized (and written) per batch; >= 1.
    progress : bool
        Show a tqdm bar counting documents.

    Returns
    -------
    Path
        ``prefix``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return _write_batches(_batches(texts, domains, batch_size), tokenizer, prefix, append_eos, progress)


def _write_batches(batches: Iterable[tuple[list[str], list[str | None] | None]], tokenizer: Any,
                   prefix: str | Path, append_eos: bool, progress: bool,
                   tokenizer_label: str | None = None) -> Path:
    tok, tok_path = _load_tokenizer(tokenizer)
    tok_path = tokenizer_label or tok_path
    eos = tok.eos_token_id
    if append_eos and eos is None:
        raise ValueError("append_eos=True needs a tokenizer with an eos_token; set append_eos=False")
    meta = {"tokenizer": tok_path, "eos_token_id": eos, "append_eos": append_eos}
    with IndexedTokensWriter(prefix, len(tok), meta) as writer, \
            tqdm(desc=f"tokenize {Path(prefix).name}", unit="doc", disable=not progress) as bar:
        for texts, doms in batches:
            ids = tok(texts, add_special_tokens=False)["input_ids"]
            if append_eos:
                ids = [[*d, eos] for d in ids]
            writer.add_documents(ids, doms)
            bar.update(len(texts))
    return Path(prefix)


def _read_shard(path: Path, text_column: str, domain_column: str | None,
                batch_size: int) -> Iterator[tuple[list[str], list[str | None]]]:
    """(texts, domains) batches of a parquet or JSONL shard (a local path or a URL), streamed."""
    from gristmill.pipeline import storage

    name = path.name
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(storage.open_read(path) if storage.is_remote(path) else path)
        columns = pf.schema_arrow.names
        if text_column not in columns:
            raise ValueError(f"{path}: text_column {text_column!r} not found; columns: {columns}")
        has_domain = domain_column is not None and domain_column in columns
        wanted = [text_column] + ([domain_column] if has_domain else [])
        for rb in pf.iter_batches(batch_size=batch_size, columns=wanted):
            texts = rb.column(text_column).to_pylist()
            doms = rb.column(domain_column).to_pylist() if has_domain else [None] * len(texts)
            yield texts, doms
    elif name.endswith((".jsonl", ".json", ".ndjson")):
        with io.TextIOWrapper(storage.open_read(path), encoding="utf-8") as f:
            texts: list[str] = []
            doms: list[str | None] = []
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not JSON ({e.msg})") from None
                if text_column not in obj:
                    raise ValueError(f"{path}:{line_no}: text_column {text_column!r} not found; "
                                     f"keys: {sorted(obj)}")
                texts.append(obj[text_column])
                doms.append(obj.get(domain_column) if domain_column else None)
                if len(texts) == batch_size:
                    yield texts, doms
                    texts, doms = [], []
            if texts:
                yield texts, doms
    else:
        raise ValueError(f"{path}: shard format not supported; use .parquet or .jsonl")


def tokenize_shards(
    shard_paths: Sequence[str | Path],
    tokenizer_path: str | Path,
    out_prefix: str | Path,
    text_column: str = "text",
    domain_column: str | None = "domain",
    append_eos: bool = True,
    batch_size: int = 1024,
    progress: bool = True,
    tokenizer_label: str | None = None,
) -> Path:
    """Tokenize the pipeline's output shards (parquet or JSONL) into one corpus.

    Documents keep the order of ``shard_paths`` and of the rows within each
    shard. A shard without ``domain_column`` puts its documents in
    ``DEFAULT_DOMAIN``.

    Parameters
    ----------
    shard_paths : sequence of path
        ``shards/part-NNNNN.parquet`` (or ``.jsonl``) files, local or URLs
        (``s3://...``, read through ``gristmill.pipeline.storage``).
    tokenizer_path : str or Path
        Folder of a Hugging Face tokenizer; recorded in the sidecar.
    out_prefix : str or Path
        Output prefix.
    text_column, domain_column : str
        Columns to read; ``domain_column=None`` ignores domains.
    append_eos, batch_size, progress
        As in ``write_tokenized``.
    tokenizer_label : str, optional
        What the sidecar records as the tokenizer (default ``tokenizer_path``;
        the runner passes the recipe's URL when it loads a cached copy).

    Returns
    -------
    Path
        ``out_prefix`` (a ``UPath`` for a URL). On an object store
        (``s3://bucket/tokens/train``) the four files are written in a local
        temporary folder and then uploaded one object each, ``.idx`` last
        (``publish_tokenized``).
    """
    from gristmill.pipeline import storage

    paths = [storage.as_path(p) for p in shard_paths]
    if not paths:
        raise ValueError("shard_paths is empty; pass at least one .parquet or .jsonl shard")
    for p in paths:
        if not p.is_file():
            raise ValueError(f"shard_paths: {p} does not exist")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = (b for p in paths for b in _read_shard(p, text_column, domain_column, batch_size))
    if not storage.is_remote(out_prefix):
        return _write_batches(batches, tokenizer_path, out_prefix, append_eos, progress,
                              tokenizer_label)
    import tempfile

    out = storage.as_path(out_prefix)
    with tempfile.TemporaryDirectory(prefix="gristmill-tokenized-") as tmp:
        local = Path(tmp) / out.name
        _write_batches(batches, tokenizer_path, local, append_eos, progress, tokenizer_label)
        publish_tokenized(local, out)
    return out


#: the files of a tokenized prefix in the order they are published: ``.idx`` completes it
FILE_EXTS = (".bin", ".dom.npy", ".domains.json", ".idx")


def publish_tokenized(local_prefix: str | Path, out_prefix: str | Path) -> None:
    """Copy the four files of a local tokenized prefix to ``out_prefix`` (a local path
    or a URL), each written whole or not at all (``storage.AtomicFile``), ``.idx``
    last, so a reader that finds the ``.idx`` finds the whole corpus."""
    import shutil

    from gristmill.pipeline import storage

    out = storage.as_path(out_prefix)
    storage.mkdirs(out.parent)
    for ext in FILE_EXTS:
        with open(f"{local_prefix}{ext}", "rb") as src, \
                storage.AtomicFile(out.with_name(out.name + ext)) as dst:
            shutil.copyfileobj(src, dst.file, 8 << 20)


def describe_tokenized(prefix: str | Path) -> str:
    """One line about a tokenized prefix: ``IndexedTokens``'s for a local one, the
    sidecar's totals for a URL (read without downloading the tokens)."""
    from gristmill.pipeline import storage

    if not storage.is_remote(prefix):
        return repr(IndexedTokens(prefix))
    p = storage.as_path(prefix)
    side = json.loads(p.with_name(p.name + ".domains.json").read_text())
    return (f"IndexedTokens({str(p)!r}, documents={side['num_documents']}, "
            f"tokens={side['num_tokens']}, domains={side['domains']})")


class IndexedTokens:
    """Read a tokenized corpus written by ``write_tokenized`` (or by Megatron-LM).

    Tokens stay on disk (``np.memmap``); indexing returns one document's
    tokens without reading the others.

    Parameters
    ----------
    prefix : str or Path
        The prefix the files were written under.

    Attributes
    ----------
    sizes : numpy.ndarray of int32
        Tokens per document (per sequence, for a Megatron file with several
        sequences per document; item ``i`` is always sequence ``i``).
    pointers : numpy.ndarray of int64
        Byte offset of every sequence in ``.bin``.
    doc_idx : numpy.ndarray of int64
        Megatron's document index, ``[0, ..., len(self)]`` for our files.
    domains : numpy.ndarray of uint16
        Domain id per document; names in ``domain_names``. A Megatron corpus
        without a sidecar is all ``DEFAULT_DOMAIN``.
    meta : dict
        The sidecar (tokenizer path, ``eos_token_id``, ...); empty without one.
    """

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p} not found; is {prefix!s} a tokenized prefix?")
        with open(idx_path, "rb") as f:
            magic = f.read(len(INDEX_HEADER))
            if magic != INDEX_HEADER:
                raise ValueError(f"{idx_path}: not a Megatron index (magic {magic!r}, expected {INDEX_HEADER!r})")
            (version,) = struct.unpack("<Q", f.read(8))
            if version != INDEX_VERSION:
                raise ValueError(f"{idx_path}: index version {version}, only {INDEX_VERSION} is supported")
            (code,) = struct.unpack("<B", f.read(1))
            if code not in DTYPE_CODES:
                raise ValueError(f"{idx_path}: unknown dtype code {code}; valid: {sorted(DTYPE_CODES)}")
            self.dtype = np.dtype(DTYPE_CODES[code])
            (n_seq,) = struct.unpack("<Q", f.read(8))
            (n_doc,) = struct.unpack("<Q", f.read(8))
            offset = f.tell()
        buf = np.memmap(idx_path, mode="r", dtype=np.uint8)
        self.sizes = np.frombuffer(buf, dtype="<i4", count=n_seq, offset=offset)
        offset += self.sizes.nbytes
        self.pointers = np.frombuffer(buf, dtype="<i8", count=n_seq, offset=offset)
        offset += self.pointers.nbytes
        self.doc_idx = np.frombuffer(buf, dtype="<i8", count=n_doc, offset=offset)
        self._bin = np.memmap(bin_path, mode="r", dtype=self.dtype) if bin_path.stat().st_size else \
            np.zeros(0, self.dtype)
        expected = int(self.sizes.astype(np.int64).sum())
        if self._bin.size != expected:
            raise ValueError(f"{bin_path}: holds {self._bin.size} tokens, the index says {expected}")

        side = Path(f"{prefix}.domains.json")
        self.meta: dict[str, Any] = json.loads(side.read_text()) if side.is_file() else {}
        dom = Path(f"{prefix}.dom.npy")
        if self.meta and dom.is_file():
            self.domain_names: list[str] = list(self.meta["domains"])
            self.domains = np.load(dom, mmap_mode="r")
            if self.domains.shape != (n_seq,):
                raise ValueError(f"{dom}: {self.domains.shape[0]} domain ids for {n_seq} documents")
        else:
            self.domain_names = [DEFAULT_DOMAIN]
            self.domains = np.zeros(n_seq, dtype=np.uint16)

    def __len__(self) -> int:
        return int(self.sizes.size)

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for {n} documents")
        i %= n
        start = int(self.pointers[i]) // self.dtype.itemsize
        return np.asarray(self._bin[start:start + int(self.sizes[i])])

    @property
    def num_tokens(self) -> int:
        """Tokens in the corpus."""
        return int(self._bin.size)

    @property
    def tokens(self) -> np.ndarray:
        """All tokens, documents concatenated (a read-only memmap)."""
        return self._bin

    @property
    def eos_token_id(self) -> int | None:
        return self.meta.get("eos_token_id")

    @property
    def tokenizer_path(self) -> str | None:
        return self.meta.get("tokenizer")

    def documents_in(self, domain: str) -> np.ndarray:
        """Indices of the documents of ``domain`` (empty if it has none)."""
        if domain not in self.domain_names:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self.domains == self.domain_names.index(domain))

    def tokens_per_domain(self) -> dict[str, int]:
        """Token count of every domain (what a mixture is computed from)."""
        counts = np.bincount(self.domains, weights=self.sizes, minlength=len(self.domain_names))
        return {name: int(c) for name, c in zip(self.domain_names, counts, strict=True)}

    def __repr__(self) -> str:
        return (f"IndexedTokens({str(self.prefix)!r}, documents={len(self)}, "
                f"tokens={self.num_tokens}, domains={self.domain_names})")
