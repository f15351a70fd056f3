"""Bounded work at scale (issue 11): summaries of a global stage merge as a tree."""

from __future__ import annotations

import numpy as np
import pytest

from gristmill.pipeline.stage import GlobalStage, merge_all


class _Concat(GlobalStage):
    """A summary that is a list: merge concatenates, so the order shows."""

    type_name = "concat_for_test"

    def __init__(self) -> None:
        super().__init__()
        self.merges: list[tuple[int, int]] = []

    def merge(self, a, b):
        self.merges.append((len(a), len(b)))
        return a + b


@pytest.mark.parametrize("k", [0, 1, 2, 3, 7, 8, 9, 33, 400])
def test_tree_merge_equals_the_left_fold_in_order(k):
    parts = [[i, i] for i in range(k)]
    stage = _Concat()
    got = merge_all(stage, iter(parts))  # a lazy iterable, as the barrier passes it
    assert got == ([x for p in parts for x in p] if k else None)
    assert len(stage.merges) == max(k - 1, 0)


def test_tree_merge_copies_each_record_about_log2_k_times():
    k = 400
    stage = _Concat()
    merge_all(stage, [[0] * 10 for _ in range(k)])
    copied = sum(a + b for a, b in stage.merges)
    assert copied <= 10 * k * (np.log2(k) + 1)
    fold = sum(10 * (i + 1) for i in range(1, k))  # what the left fold copies
    assert fold > 10 * copied


def test_none_summaries_are_skipped():
    stage = _Concat()
    assert merge_all(stage, [None, [1], None, [2], [3], None]) == [1, 2, 3]
    assert merge_all(stage, [None, None]) is None


def test_an_input_is_hashed_from_the_bytes_read_not_read_twice(tmp_path, monkeypatch):
    import gzip
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    from gristmill.pipeline import inputs
    from gristmill.pipeline.readers import FileReport, InputTask
    from gristmill.pipeline.recipe import SourceSpec

    body = "".join(json.dumps({"text": f"doc {i} " * (i % 40 + 1)}) + "\n"
                   for i in range(5000)).encode()
    files = {"a.jsonl": b"\xef\xbb\xbf" + body, "b.jsonl.gz": gzip.compress(body),
             "c.jsonl.zst": zstandard.ZstdCompressor().compress(body),
             "cut.jsonl.gz": gzip.compress(body)[:-3000]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    pq.write_table(pa.table({"text": ["x"] * 10}), tmp_path / "p.parquet")
    expected = {name: inputs.hash_file(tmp_path / name) for name in [*files, "p.parquet"]}
    rereads = []
    real_hash_file = inputs.hash_file
    monkeypatch.setattr(inputs, "hash_file",
                        lambda p: rereads.append(str(p)) or real_hash_file(p))
    for i, name in enumerate(expected):
        task = InputTask(index=i, source_index=0, path=str(tmp_path / name), label="x",
                         format="parquet" if name.endswith(".parquet") else "jsonl")
        reader = inputs.InputReader(task, SourceSpec(path=str(tmp_path)),
                                    FileReport(path=task.path), 1000, None)
        assert sum(b.num_rows for b in reader) > 0
        assert reader.fingerprint["xxh3_128"] == expected[name], name
    # only the Parquet file (read by ranges, not in order) is read a second time; a cut
    # archive is read to its end before the reader finds it cut, so its tap is whole
    assert rereads == [str(tmp_path / "p.parquet")]
