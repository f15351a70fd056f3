"""Memory of a file of bad lines: rejects held until the end vs streamed in batches.

Writes a JSONL file of ``--lines`` lines, nine in ten of them rejects (malformed
JSON, a missing field, invalid UTF-8...), reads it twice in this process with
the real reader (``readers.read_task``): once holding every reject in
``FileReport.rejects`` (the engines did this before issue 10's leftovers), once
streaming them to a rejects file (``rejects.RejectsWriter``, as every engine does
now). Prints the peak of Python allocations (``tracemalloc``) during each read,
the most rejects held at once, and checks that both give the same rejects bytes.

    .venv/bin/python benchmarks/bench_rejects_memory.py --lines 1000000
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

from gristmill.pipeline.readers import FileReport, InputTask, read_task
from gristmill.pipeline.recipe import SourceSpec
from gristmill.pipeline.rejects import RejectsWriter, encode_rejects

KINDS = [b'{"text": "good line %d"}', b'{"text": 1%d}', b"not json at all %d",
         b'{"txt": "a field of another name %d"}', b'{"text": "\xff\xfe bad bytes %d"}',
         b'{"text": "unclosed %d', b"[%d, 2, 3]", b'{"text": null, "n": %d}',
         b'{"text": ["a", "list"], "n": %d}', b'{"text": {"an": "object"}, "n": %d}']


def _write(path: Path, n: int) -> None:
    with open(path, "wb") as f:
        for i in range(n):
            f.write(KINDS[i % len(KINDS)] % i + b"\n")


def _arm(path: Path, out: Path, stream: bool, traced: bool) -> tuple[float, FileReport, int]:
    """Read ``path`` and write its rejects file; (peak MB or seconds, report, kept)."""
    task = InputTask(index=0, source_index=0, path=str(path), format="jsonl", label="s")
    spec = SourceSpec(path=str(path))
    sink = RejectsWriter(out) if stream else None
    report = FileReport(path=str(path), sink=sink)
    if traced:
        tracemalloc.start()
    t0 = time.perf_counter()
    kept = sum(t.num_rows for t in read_task(task, spec, report, batch_size=8192))
    if stream:
        report.flush_rejects()
        sink.close()
    else:  # what the engines did before: encode every reject held, write once
        out.write_bytes(encode_rejects(report.rejects))
    seconds = time.perf_counter() - t0
    if traced:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak / 1e6, report, kept
    return seconds, report, kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, a, b = Path(tmp) / "bad.jsonl", Path(tmp) / "held.jsonl", Path(tmp) / "stream.jsonl"
        _write(src, args.lines)
        s_held, held, kept = _arm(src, a, stream=False, traced=False)
        s_stream, _, kept2 = _arm(src, b, stream=True, traced=False)
        mb_held, held, _ = _arm(src, a, stream=False, traced=True)
        n_rejects = len(held.rejects)
        del held
        mb_stream, streamed, _ = _arm(src, b, stream=True, traced=True)
        same = a.read_bytes() == b.read_bytes()
        print(f"{args.lines:,} lines ({src.stat().st_size / 1e6:.0f} MB), {kept:,} kept, "
              f"{n_rejects:,} rejects ({a.stat().st_size / 1e6:.0f} MB of rejects JSONL)")
        print(f"held until the end: peak {mb_held:,.0f} MB of Python allocations, "
              f"{n_rejects:,} rejects held, {s_held:.1f} s (untraced run)")
        print(f"streamed:           peak {mb_stream:,.0f} MB, at most {streamed.held_peak:,} "
              f"held, {s_stream:.1f} s (untraced run)")
        print(f"peak ratio streamed/held: {mb_stream / mb_held:.3f}; time ratio "
              f"{s_stream / s_held:.2f}; same rejects bytes: {same}; same kept: {kept == kept2}")

if __name__ == "__main__":
    main()
