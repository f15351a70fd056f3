"""Driver memory of the repeated-id count at commit (issue 11): does it grow with
the number of id ledgers?

Writes ``--files`` id ledgers of ``--ids`` ids each (ids ``"<file>-<n>"``, as
bench_scale's corpus numbers its records, written by the reader's own
``write_id_ledger``), then counts repeated ids with ``inputs.repeated_ids`` in a
fresh process and prints that process's peak RSS before and after the count,
twice: with gristmill's ledger reads (``inputs.LEDGER_READ``: one thread, no
pre-buffering) and, as the baseline, with Arrow's defaults (reader threads,
pre-buffering), with the ratio of the growths. Run two sizes to see the growth:

    .venv/bin/python benchmarks/ledger_memory.py --files 4 --ids 35000
    .venv/bin/python benchmarks/ledger_memory.py --files 32 --ids 35000

(bench_scale's 200 MB corpus has 4 files of ~35k records at 1x, 32 at 8x.)
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "_work" / "ledgers"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make(folder: Path, files: int, ids: int) -> None:
    import numpy as np
    import pyarrow as pa

    from gristmill.pipeline.inputs import write_id_ledger

    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        table = pa.table({"id": pa.array([f"{f}-{i}" for i in range(ids)]),
                          "_key": pa.array((np.uint64(f) << np.uint64(40))
                                           + np.arange(1, ids + 1, dtype=np.uint64))})
        write_id_ledger(folder / f"task-{f:05d}.parquet", [table])
    (folder / "DONE").write_text("ok")


def count(folder: Path, files: int, arm: str) -> None:
    import gristmill.pipeline.runner  # noqa: F401  (the driver's imports, before the baseline)
    from gristmill.pipeline import inputs
    from gristmill.pipeline.inputs import repeated_ids

    if arm == "arrow-defaults":
        inputs.LEDGER_READ = {"pre_buffer": True, "use_threads": True}

    paths = sorted(folder.glob("task-*.parquet"))
    before = _peak_mb()
    t0 = time.perf_counter()
    got = repeated_ids(paths, {i: f"part-{i:04d}.jsonl" for i in range(files)})
    grew = _peak_mb() - before
    print(f"{arm:>14}: {files} ledgers, {got['distinct_ids']:,} ids: driver peak RSS "
          f"{before:.0f} -> {_peak_mb():.0f} MB (+{grew:.0f} MB) in "
          f"{time.perf_counter() - t0:.1f} s")
    print(f"GROWTH {grew}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--ids", type=int, default=35_000)
    ap.add_argument("--step", choices=["make", "gristmill", "arrow-defaults"],
                    help=argparse.SUPPRESS)
    a = ap.parse_args()
    folder = ROOT / f"{a.files}x{a.ids}"
    if a.step == "make":
        make(folder, a.files, a.ids)
    elif a.step:
        count(folder, a.files, a.step)
    else:
        # each step in a fresh process started from this small one: Linux carries a
        # process's peak RSS across fork + exec, so a parent that wrote the ledgers
        # would set the counting process's starting peak
        grew = {}
        for step in (["make"] if not (folder / "DONE").exists() else []) + [
                "arrow-defaults", "gristmill"]:
            out = subprocess.run([sys.executable, __file__, "--files", str(a.files), "--ids",
                                  str(a.ids), "--step", step], check=True, capture_output=True,
                                 text=True).stdout
            for line in out.splitlines():
                if line.startswith("GROWTH "):
                    grew[step] = float(line.split()[1])
                else:
                    print(line)
        print(f"growth of the count: gristmill {grew['gristmill']:.0f} MB / Arrow defaults "
              f"{grew['arrow-defaults']:.0f} MB = {grew['gristmill'] / grew['arrow-defaults']:.2f}x")


if __name__ == "__main__":
    main()
