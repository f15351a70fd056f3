"""Writers: size-capped Parquet (zstd) or JSONL shards, written atomically.

Every file is written under a temporary name in its final folder and renamed
when complete, so a reader (or a resumed run) never sees a partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


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
    the current one reaches ``shard_bytes``. ``close()`` returns the shards."""

    def __init__(self, folder: Path, fmt: str = "parquet", shard_bytes: int = 256 << 20,
                 prefix: str = "part") -> None:
        if fmt not in ("parquet", "jsonl"):
            raise ValueError(f"format must be parquet or jsonl, got {fmt!r}")
        self.folder = Path(folder)
        self.fmt = fmt
        self.shard_bytes = shard_bytes
        self.prefix = prefix
        self.shards: list[ShardInfo] = []
        self.schema: pa.Schema | None = None
        self._sink: Any = None
        self._writer: pq.ParquetWriter | None = None
        self._path: Path | None = None
        self._rows = 0

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        ext = "parquet" if self.fmt == "parquet" else "jsonl"
        self._path = self.folder / f"{self.prefix}-{len(self.shards):05d}.{ext}"
        tmp = tmp_name(self._path)
        self._rows = 0
        if self.fmt == "parquet":
            self._sink = pa.OSFile(str(tmp), "wb")
            self._writer = pq.ParquetWriter(self._sink, self.schema, compression="zstd",
                                            compression_level=3)
        else:
            self._sink = open(tmp, "wb")

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
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

            pl.from_arrow(table).write_ndjson(self._sink)
        self._rows += table.num_rows
        if self._sink.tell() >= self.shard_bytes:
            self._finish()

    def _finish(self) -> None:
        if self._sink is None:
            return
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if not self._sink.closed:
            self._sink.flush()
            os.fsync(self._sink.fileno())
        self._sink.close()
        tmp = tmp_name(self._path)
        os.replace(tmp, self._path)
        self.shards.append(ShardInfo(path=self._path.name, rows=self._rows,
                                     bytes=self._path.stat().st_size,
                                     sha256=sha256_file(self._path)))
        self._sink = None

    def close(self) -> list[ShardInfo]:
        self._finish()
        return self.shards
