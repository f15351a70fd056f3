"""Writers: size-capped Parquet (zstd) or JSONL shards, written atomically.

Every file is written under a temporary name in its final folder and renamed
when complete (on an object store: see ``storage.AtomicFile``), so a reader
(or a resumed run) never sees a partial file.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from gristmill.pipeline import storage
from gristmill.pipeline.storage import AtomicFile, as_path, tmp_name

__all__ = ["AtomicFile", "ShardInfo", "ShardWriter", "atomic_write_bytes", "atomic_write_json",
           "sha256_file", "tmp_name"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    storage.write_bytes(path, data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with storage.open_read(path) as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


class _HashingSink:
    """A write-only file that hashes what passes through it (no reading back)."""

    def __init__(self, sink: AtomicFile) -> None:
        self._sink = sink
        self.sha256 = hashlib.sha256()
        self.closed = False

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self._sink.file.write(data)
        return len(data)

    def tell(self) -> int:
        return self._sink.tell()

    def flush(self) -> None:
        self._sink.file.flush()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


@dataclass
class ShardInfo:
    path: str  # relative to the output folder once committed
    rows: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ShardWriter:
    """Writes tables into ``folder/part-NNNNN.<ext>``, starting a new shard once
    the current one reaches ``shard_bytes``. ``close()`` returns the shards;
    ``seconds`` holds the wall and CPU seconds the writing took.

    Parquet: zstd level 3, a row group per table written; only the columns that
    repeat (``source``, ``domain``) are dictionary-encoded (a dictionary tried
    on a free-text column is hashed and then thrown away), and min/max
    statistics are kept for every column but the text (``text``, ``prompt``,
    ``responses``, ``response_sources``): nobody filters on them, and they are
    as long as a record.
    """

    DICTIONARY_COLUMNS = ("source", "domain")
    NO_STATISTICS = frozenset({"text", "prompt", "responses", "response_sources"})

    def __init__(self, folder: Path, fmt: str = "parquet", shard_bytes: int = 256 << 20,
                 prefix: str = "part") -> None:
        if fmt not in ("parquet", "jsonl"):
            raise ValueError(f"format must be parquet or jsonl, got {fmt!r}")
        self.folder = as_path(folder)
        self.fmt = fmt
        self.shard_bytes = shard_bytes
        self.prefix = prefix
        self.shards: list[ShardInfo] = []
        self.schema: pa.Schema | None = None
        self.seconds = [0.0, 0.0]  # wall, CPU
        self._sink: AtomicFile | None = None
        self._out: _HashingSink | None = None
        self._writer: pq.ParquetWriter | None = None
        self._path: Path | None = None
        self._rows = 0

    def _open(self) -> None:
        storage.mkdirs(self.folder)
        ext = "parquet" if self.fmt == "parquet" else "jsonl"
        self._path = self.folder / f"{self.prefix}-{len(self.shards):05d}.{ext}"
        self._rows = 0
        self._sink = AtomicFile(self._path)
        self._out = _HashingSink(self._sink)
        if self.fmt == "parquet":
            names = self.schema.names
            self._writer = pq.ParquetWriter(
                self._out, self.schema, compression="zstd", compression_level=3,
                use_dictionary=[c for c in self.DICTIONARY_COLUMNS if c in names],
                write_statistics=[c for c in names if c not in self.NO_STATISTICS])

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        w, c = time.perf_counter(), time.process_time()
        try:
            self._write(table)
        finally:
            self.seconds[0] += time.perf_counter() - w
            self.seconds[1] += time.process_time() - c

    def _write(self, table: pa.Table) -> None:
        if self.schema is None:
            self.schema = table.schema
        elif table.schema != self.schema:
            table = table.select(self.schema.names).cast(self.schema)
        if self._sink is None:
            self._open()
        if self.fmt == "parquet":
            self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
        else:
            import polars as pl  # only JSONL output needs it; keep startup light

            pl.from_arrow(table).write_ndjson(self._out)
        self._rows += table.num_rows
        if self._sink.tell() >= self.shard_bytes:
            self._finish()

    def _finish(self) -> None:
        if self._sink is None:
            return
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        n_bytes = self._sink.tell()
        self._sink.commit()
        self.shards.append(ShardInfo(path=self._path.name, rows=self._rows, bytes=n_bytes,
                                     sha256=self._out.sha256.hexdigest()))
        self._sink = self._out = None

    def close(self) -> list[ShardInfo]:
        w, c = time.perf_counter(), time.process_time()
        self._finish()
        self.seconds[0] += time.perf_counter() - w
        self.seconds[1] += time.process_time() - c
        return self.shards
