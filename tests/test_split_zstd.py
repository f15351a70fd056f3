"""A multi-frame zstd JSONL file split at frame boundaries gives exactly the records,
row keys, rejects and counts of the unsplit read (gristmill.pipeline.splits.plan_zstd);
a single-frame zstd file, and gzip, stay one task."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import zstandard
from conftest import make_text
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_split_inputs import (
    LINES,
    _content,
    _messy_lines,
    _run,
    assert_a_killed_split_run_resumes,
    assert_pieces_report_as_the_file,
)

from gristmill.pipeline.decompress import zstd_data_frames
from gristmill.pipeline.inputs import InputChangedDuringRun, InputReader
from gristmill.pipeline.readers import FileReport, InputTask
from gristmill.pipeline.recipe import SourceSpec
from gristmill.pipeline.splits import plan_splits, plan_zstd, split_tasks
from gristmill.pipeline.stage import KEY_POS_BITS, ROW_KEY

CCTX = zstandard.ZstdCompressor(level=1)
SKIPPABLE = struct.pack("<II", 0x184D2A5A, 4) + b"seek"  # a skippable frame (4 bytes of payload)


def frames_at(data: bytes, cuts: list[int], extra: dict[int, bytes] | None = None) -> bytes:
    """``data`` as independent zstd frames cut at byte positions ``cuts`` (anywhere: in a
    line, in a multi-byte character, between CR and LF); ``extra[i]`` goes before frame i
    (or after the last one)."""
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    extra = extra or {}
    frames = [extra.get(i, b"") + CCTX.compress(data[a:b])
              for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False))]
    return b"".join(frames) + extra.get(len(frames), b"")


def _task(path: Path, index: int = 2) -> InputTask:
    return InputTask(index=index, source_index=0, path=str(path), format="jsonl", label="z",
                     size=path.stat().st_size)


def _read(task: InputTask, spec: SourceSpec) -> tuple[list[dict], FileReport, dict]:
    """Rows, report and fingerprint of one task, read as the engines read it (the piece's
    size, mtime and range hash are checked against the plan)."""
    report = FileReport(path=task.path)
    reader = InputReader(task, spec, report, 7, None)
    rows = [r for batch in reader for r in batch.to_pylist()]
    return rows, report, reader.fingerprint


def _pieces_read_like_the_whole(path: Path, split: int) -> list[InputTask]:
    spec = SourceSpec(path=str(path))
    whole = _task(path)
    want, want_report, want_print = _read(whole, spec)
    plan = plan_zstd(str(path), split)
    pieces = split_tasks([whole], {str(path): plan} if len(plan["ranges"]) > 1 else {})
    rows, reports = [], []
    for p in pieces:
        got, report, fingerprint = _read(p, spec)
        assert fingerprint == want_print  # the file's size, mtime and xxh3_128, from the plan
        rows += got
        reports.append(report)
    assert rows == want
    assert_pieces_report_as_the_file(pieces, reports, want_report)
    assert sum(p.size for p in pieces) == whole.size
    return pieces


EXTRA = st.sampled_from([SKIPPABLE, CCTX.compress(b"")])  # a skippable or an empty frame


@settings(derandomize=True, database=None, deadline=None, max_examples=100,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.tuples(LINES, st.sampled_from([b"\n", b"\r\n"])), min_size=2,
                      max_size=25),
       trailing=st.booleans(), bom=st.booleans(),
       cuts=st.lists(st.floats(0, 1), min_size=1, max_size=16),
       extra=st.dictionaries(st.integers(0, 16), EXTRA, max_size=4),
       split=st.one_of(st.integers(1, 40), st.integers(41, 300)))
def test_any_frames_and_split_size_read_like_the_whole_file(tmp_path, lines, trailing, bom, cuts,
                                                            extra, split):
    data = (b"\xef\xbb\xbf" if bom else b"") + b"".join(a + b for a, b in lines)
    if not trailing:
        data = data.rstrip(b"\r\n")
    path = tmp_path / "f.jsonl.zst"
    path.write_bytes(frames_at(data, [int(c * len(data)) for c in cuts], extra))
    pieces = _pieces_read_like_the_whole(path, split)
    event("split" if len(pieces) > 1 else "one task")
    if len(pieces) == 1:
        return
    starts = [p.start for p in pieces]
    assert starts == sorted(set(starts)) and pieces[-1].end == len(data)
    for p in pieces[1:]:
        assert data[p.start - 1:p.start] == b"\n"  # a piece starts at a line start
        assert p.first_line == 1 + data[:p.start].count(b"\n")
        assert p.frame_base <= p.start


def test_every_byte_its_own_frame_cuts_inside_characters_and_crlf(tmp_path):
    """Frames of one byte each: every cut point there is (inside é and 😀, between CR and
    LF, inside invalid UTF-8), split into as many pieces as there are lines."""
    data = ('{"text": "é 😀 ünï"}\r\n'.encode() + b'{"text": "caf\xc3"}\n\n'  # invalid UTF-8
            b'{"id": "x", "text": "two"}\r\n{"text": "no newline"}')
    path = tmp_path / "bytes.jsonl.zst"
    path.write_bytes(frames_at(data, list(range(len(data)))))
    assert zstd_data_frames(str(path), stop_at=10**6) == len(data)
    pieces = _pieces_read_like_the_whole(path, 1)
    assert [p.first_line for p in pieces] == [1, 2, 3, 4, 5]  # one piece per line
    assert [p.frame_offset > 0 for p in pieces] == [False, True, True, True, True]


def test_single_frame_and_skippable_frames_only_stay_one_task(tmp_path):
    body = "".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(500)).encode()
    one = tmp_path / "one.jsonl.zst"
    one.write_bytes(SKIPPABLE + CCTX.compress(body) + SKIPPABLE)
    empty = tmp_path / "skip.jsonl.zst"
    empty.write_bytes(SKIPPABLE * 3)
    # a truncated multi-frame file: one task, and the reader reports the fault as before
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(frames_at(body, [1000, 3000])[:-5])
    tasks = [_task(p, i) for i, p in enumerate([one, empty, cut])]
    assert zstd_data_frames(str(one), 2) == 1 and zstd_data_frames(str(empty), 2) == 0
    assert zstd_data_frames(str(cut), 5) == -1
    assert plan_splits(tasks, 16) == {}
    assert [t.parts for t in split_tasks(tasks, {})] == [1, 1, 1]
    _, report, _ = _read(tasks[2], SourceSpec(path=str(cut)))
    assert report.status == "truncated"


def test_a_zstd_file_changed_after_planning_is_refused(tmp_path):
    lines = [json.dumps({"id": f"{i:03d}", "text": f"line {i:03d}"}).encode() + b"\n"
             for i in range(40)]
    path = tmp_path / "f.jsonl.zst"
    path.write_bytes(b"".join(CCTX.compress(line) for line in lines))
    pieces = split_tasks([_task(path)], plan_splits([_task(path)], 200))
    assert len(pieces) > 3
    spec = SourceSpec(path=str(path))
    _read(pieces[2], spec)  # unchanged: reads
    # same size and mtime, another line in one frame (frames of equal length): the
    # piece's hash of its decompressed bytes tells
    swapped = lines[:]
    swapped[20] = lines[20].replace(b"line 020", b"line 999")
    st0 = path.stat()
    path.write_bytes(b"".join(CCTX.compress(line) for line in swapped))
    assert path.stat().st_size == st0.st_size
    os.utime(path, ns=(st0.st_atime_ns, st0.st_mtime_ns))
    at = sum(map(len, lines[:20]))
    hit = next(p for p in pieces if p.start <= at < p.end)
    with pytest.raises(InputChangedDuringRun, match="differ from the planned ones"):
        _read(hit, spec)
    path.write_bytes(path.read_bytes() + CCTX.compress(b"more\n"))  # grown
    with pytest.raises(InputChangedDuringRun, match="changed after the run split it"):
        _read(pieces[0], spec)


@pytest.mark.skipif(shutil.which("pzstd") is None or shutil.which("zstd") is None,
                    reason="the zstd command-line tools are not installed")
def test_pzstd_writes_frames_and_zstd_one_frame(tmp_path):
    """What docs/engines.md says about the command-line tools: `pzstd` output splits, and
    `zstd` (even `-T0 -B1MiB`) writes one frame."""
    rng = random.Random(3)
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": make_text(rng, 60)}) + "\n" for _ in range(15000)))
    subprocess.run(["pzstd", "-q", "-1", "-p", "2", str(src), "-o", str(tmp_path / "p.zst")],
                   check=True)
    subprocess.run(["zstd", "-q", "-T0", "-B1MiB", str(src), "-o", str(tmp_path / "z.zst")],
                   check=True)
    assert zstd_data_frames(str(tmp_path / "z.zst"), 10) == 1
    frames = zstd_data_frames(str(tmp_path / "p.zst"), 100)
    assert frames == -(-src.stat().st_size // (2 << 20))  # 2 MiB of input per frame at -1
    p = tmp_path / "p.jsonl.zst"
    (tmp_path / "p.zst").rename(p)
    assert len(_pieces_read_like_the_whole(p, p.stat().st_size // 3)) == 3


# -- whole runs: the split zstd file against the unsplit run, on every engine ----------------

SPLIT_Z = 6000  # the 29 KB file of 61 frames in 5 pieces

@pytest.fixture(scope="module")
def zstd_corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("zsplit") / "in"
    folder.mkdir()
    rng = random.Random(8)
    (folder / "a-small.jsonl").write_text("".join(
        json.dumps({"id": f"s{i}", "text": make_text(rng, 30)}) + "\n" for i in range(20)))
    data = _messy_lines(rng, 400)
    cuts = sorted(rng.sample(range(1, len(data)), 60))
    (folder / "b-big.jsonl.zst").write_bytes(frames_at(data, cuts, {7: SKIPPABLE, 30: SKIPPABLE}))
    return folder


@pytest.fixture(scope="module")
def zstd_runs(zstd_corpus, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("zruns")
    ref = _run(zstd_corpus, root / "unsplit", None)
    got = _run(zstd_corpus, root / "split", SPLIT_Z, workers=1)
    return {"unsplit": _content(root / "unsplit", ref), "split": _content(root / "split", got),
            "shards": [(s["rows"], s["sha256"]) for s in got["shards"]], "ref": ref}


def test_split_zstd_run_gives_the_unsplit_records_keys_rejects_and_counts(zstd_corpus, zstd_runs):
    assert zstd_runs["split"] == zstd_runs["unsplit"]
    assert len(zstd_runs["shards"]) > len(zstd_runs["ref"]["shards"])  # it was split
    c = zstd_runs["unsplit"]
    assert c["counts"]["reconciled"] and c["counts"]["rejected"] > 20
    keys = {r["id"]: r[ROW_KEY] for r in c["kept"] + c["dropped"]}
    assert keys["last"] == (1 << KEY_POS_BITS) | 401
    big = zstd_corpus / "b-big.jsonl.zst"
    plan = plan_splits([_task(big)], SPLIT_Z)[str(big)]
    assert len(plan["ranges"]) == 5


@pytest.mark.parametrize("engine", [{"kind": "local", "workers": 2},
                                    {"kind": "dask", "workers": 2},
                                    {"kind": "beam", "workers": 2}],
                         ids=["local-2", "dask", "beam"])
def test_every_engine_writes_the_local_bytes_when_zstd_is_split(zstd_corpus, zstd_runs, tmp_path,
                                                                engine):
    m = _run(zstd_corpus, tmp_path / "out", SPLIT_Z, **engine)
    assert [(s["rows"], s["sha256"]) for s in m["shards"]] == zstd_runs["shards"]
    assert _content(tmp_path / "out", m) == zstd_runs["split"]


def test_pieces_of_a_zstd_file_keep_the_line_numbers_as_keys(tmp_path):
    data = b"".join(json.dumps({"text": f"t{i}"}).encode() + b"\n" for i in range(30))
    path = tmp_path / "k.jsonl.zst"
    path.write_bytes(frames_at(data, list(range(7, len(data), 37))))
    spec = SourceSpec(path=str(path))
    pieces = split_tasks([_task(path, 5)], plan_splits([_task(path, 5)], 60))
    keys = [r[ROW_KEY] for p in pieces for r in _read(p, spec)[0]]
    assert len(pieces) > 5 and keys == [(5 << KEY_POS_BITS) | i for i in range(1, 31)]


def test_resume_after_kill_of_a_split_zstd_run_uses_the_saved_plan(zstd_corpus, tmp_path,
                                                                  monkeypatch):
    assert_a_killed_split_run_resumes(zstd_corpus, "b-big.jsonl.zst", tmp_path, monkeypatch)


def test_a_first_frame_longer_than_the_walk_limit_keeps_the_file_one_task(tmp_path, monkeypatch):
    """The frame walk looks for a second frame no further than max(split_size, ZSTD_WALK)
    compressed bytes (on an object store that bounds what a single-frame file costs)."""
    from gristmill.pipeline import splits

    rng = random.Random(1)
    body = "".join(json.dumps({"text": make_text(rng, 20)}) + "\n" for _ in range(300)).encode()
    path = tmp_path / "two.jsonl.zst"
    path.write_bytes(frames_at(body, [len(body) // 2]))
    first = len(CCTX.compress(body[:len(body) // 2]))
    assert zstd_data_frames(str(path), 2) == 2
    assert zstd_data_frames(str(path), 2, limit=first - 1) == 1
    monkeypatch.setattr(splits, "ZSTD_WALK", first - 1)
    assert plan_splits([_task(path)], 64) == {}
    monkeypatch.setattr(splits, "ZSTD_WALK", first)
    assert len(plan_splits([_task(path)], 64)[str(path)]["ranges"]) == 2


def test_pieces_of_a_zstd_object_on_s3_read_like_the_local_file(tmp_path, bucket):
    """A split .zst object: planned and read through ranged reads (moto's S3 server),
    the rows and fingerprint of the local file read whole."""
    from gristmill.pipeline import storage

    rng = random.Random(6)
    data = _messy_lines(rng, 150)
    local = tmp_path / "s.jsonl.zst"
    local.write_bytes(frames_at(data, sorted(rng.sample(range(1, len(data)), 25))))
    url = f"s3://{bucket}/s.jsonl.zst"
    storage.write_bytes(storage.as_path(url), local.read_bytes())
    want, _, want_print = _read(_task(local), SourceSpec(path=str(local)))
    remote = replace(_task(local), path=url)
    pieces = split_tasks([remote], plan_splits([remote], local.stat().st_size // 4))
    assert len(pieces) >= 4
    spec = SourceSpec(path=url)
    rows = []
    for p in pieces:
        got, _, fingerprint = _read(p, spec)
        assert fingerprint["xxh3_128"] == want_print["xxh3_128"]
        rows += got
    assert rows == want
