"""A Parquet object split into pieces is read once by range: each piece fetches the
footer and the column chunks of its own row groups, nothing of the other pieces', and
the whole-object hash is computed once, by the planning pass (issue 11). Bytes are
counted as the S3 server sends them (moto's server on loopback, through s3fs: every
GetObject response's length, from botocore's event hook)."""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from gristmill.pipeline import storage  # noqa: E402
from gristmill.pipeline.inputs import InputReader, hash_file  # noqa: E402
from gristmill.pipeline.readers import FileReport, InputTask  # noqa: E402
from gristmill.pipeline.recipe import SourceSpec  # noqa: E402
from gristmill.pipeline.splits import plan_splits, split_tasks  # noqa: E402

FOOTER_READ = 64 << 10  # pyarrow's first read of a footer: the last 64 KiB of the file


def test_each_piece_of_a_split_parquet_object_downloads_only_its_row_groups(tmp_path, bucket):
    rng = random.Random(4)
    n = 3000
    texts = [" ".join(rng.choice("abcdefghij") * rng.randint(1, 8) for _ in range(150))
             for _ in range(n)]
    local = tmp_path / "p.parquet"
    # uncompressed, so the row groups are big next to the footer read; `unread` is a
    # column the recipe does not read, whose bytes no piece fetches
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "text": texts,
                             "unread": [rng.random() for _ in range(n)]}),
                   local, row_group_size=500, compression="none")
    url = f"s3://{bucket}/p.parquet"
    storage.write_bytes(storage.as_path(url), local.read_bytes())
    size = storage.size(url)

    fetched: list[int] = []
    fs, _ = storage._fs(storage.as_path(url))
    count = lambda parsed, **_: fetched.append(int(parsed.get("ContentLength", 0)))  # noqa: E731
    fs.s3.meta.events.register("after-call.s3.GetObject", count)
    try:
        task = InputTask(index=0, source_index=0, path=url, format="parquet", label="p",
                         size=size)
        plans = plan_splits([task], size // 3)
        # the planning pass: the footer, then the whole object once (its xxh3_128)
        assert size <= sum(fetched) <= size + FOOTER_READ
        assert plans[url]["xxh3_128"] == hash_file(local)
        pieces = split_tasks([task], plans)
        assert len(pieces) >= 3
        md = pq.ParquetFile(local).metadata
        read_cols = [j for j in range(md.num_columns)
                     if md.schema.column(j).name in ("id", "text")]
        spec = SourceSpec(path=url)
        rows, per_piece = [], []
        for p in pieces:
            fetched.clear()
            reader = InputReader(p, spec, FileReport(path=url), 100, None)
            rows += [r for batch in reader for r in batch.to_pylist()]
            assert reader.fingerprint["xxh3_128"] == plans[url]["xxh3_128"]  # not hashed again
            own = sum(md.row_group(g).column(j).total_compressed_size
                      for g in p.row_groups for j in read_cols)
            per_piece.append(sum(fetched))
            assert own <= sum(fetched) <= own + FOOTER_READ, (p.row_groups, own, fetched)
        # all pieces together: about the object once more, not once per piece
        assert sum(per_piece) <= size + len(pieces) * FOOTER_READ
    finally:
        fs.s3.meta.events.unregister("after-call.s3.GetObject", count)
    whole = pq.read_table(local, columns=["id", "text"]).to_pylist()
    assert [{"id": r["id"], "text": r["text"]} for r in rows] == whole
