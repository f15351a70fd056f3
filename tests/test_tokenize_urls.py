"""``gristmill tokenize`` with shards and ``--out`` on an object store (issue 11): the
same Megatron files as from and to local paths, against moto's S3 server on loopback;
the ``.idx`` that completes a prefix is uploaded last."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gristmill.cli.main import main
from gristmill.pipeline import storage
from gristmill.pipeline.tokenized import FILE_EXTS, IndexedTokens

pytest.importorskip("s3fs")
pytest.importorskip("moto")
pytest.importorskip("transformers")

TEXTS = ["river stone mill", "mill wheel water and grain", "flour from the mill",
         "the farmer brings barley", "wind turns the sail"]


def test_tokenize_reads_shards_from_s3_and_writes_its_prefix_to_s3(tmp_path, bucket, capsys):
    import fsspec

    from gristmill.trainers.tiny import build_tokenizer

    build_tokenizer(TEXTS * 8, vocab_size=300, path=tmp_path / "tok")
    out = tmp_path / "run"
    (out / "shards").mkdir(parents=True)
    pq.write_table(pa.table({"text": TEXTS[:3], "domain": ["a", "b", "a"]}),
                   out / "shards" / "part-00000.parquet")
    pq.write_table(pa.table({"text": TEXTS[3:], "domain": ["b", "c"]}),
                   out / "shards" / "part-00001.parquet")
    fs = fsspec.filesystem("s3")
    for f in sorted((out / "shards").iterdir()):
        fs.put_file(str(f), f"{bucket}/run/shards/{f.name}")
    tok = str(tmp_path / "tok")

    assert main(["tokenize", "--tokenizer", tok, "--out", str(tmp_path / "local"),
                 str(out)]) == 0
    capsys.readouterr()
    # a run output folder on S3, and an S3 prefix to write
    remote = f"s3://{bucket}/tokens/train"
    assert main(["tokenize", "--tokenizer", tok, "--out", remote, f"s3://{bucket}/run"]) == 0
    printed = capsys.readouterr().out
    assert f"IndexedTokens('{remote}', documents=5," in printed
    for ext in FILE_EXTS:
        assert storage.read_bytes(storage.as_path(remote + ext)) == \
            (tmp_path / f"local{ext}").read_bytes(), ext
    assert set(fs.ls(f"{bucket}/tokens")) == {f"{bucket}/tokens/train{e}" for e in FILE_EXTS}
    assert len(IndexedTokens(tmp_path / "local")) == 5

    # shard files named one by one (one local, one on S3), into a local prefix
    assert main(["tokenize", "--tokenizer", tok, "--out", str(tmp_path / "mixed"),
                 str(out / "shards" / "part-00000.parquet"),
                 f"s3://{bucket}/run/shards/part-00001.parquet"]) == 0
    for ext in (".bin", ".idx", ".dom.npy"):
        assert (tmp_path / f"mixed{ext}").read_bytes() == (tmp_path / f"local{ext}").read_bytes()

    # a missing shard object and an empty S3 folder are errors that name them
    assert main(["tokenize", "--tokenizer", tok, "--out", remote + "2",
                 f"s3://{bucket}/run/shards/part-00009.parquet"]) == 2
    assert f"no such shard file(s): s3://{bucket}/run/shards/part-00009.parquet" in \
        capsys.readouterr().err
    fs.put_file(str(out / "shards" / "part-00000.parquet"), f"{bucket}/other/x.parquet")
    assert main(["tokenize", "--tokenizer", tok, "--out", remote + "2",
                 f"s3://{bucket}/other"]) == 2
    assert f"no part-*.parquet or part-*.jsonl in s3://{bucket}/other" in capsys.readouterr().err
    assert not fs.exists(f"{bucket}/tokens/train2.idx")
