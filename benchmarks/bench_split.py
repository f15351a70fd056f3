"""One big JSONL file on ``workers: 1`` and ``workers: 2``: does splitting it into
tasks (``engine.split_size``) put both cores to work?

Builds one uncompressed JSONL file of about ``--gb`` GB (records generated as
``bench_io.py`` does), then runs the same light recipe (``text_stats``, output
Parquet shards) three times, each in its own child process, in one run:

- ``unsplit w1``: ``split_size: null``, ``workers: 1`` (one task, as before splitting);
- ``split w1``: ``split_size`` (default 256MB), ``workers: 1``;
- ``split w2``: the same with ``workers: 2``.

For each it prints wall time, CPU time (user + system of the child and all its
workers), CPU utilisation (CPU s / wall s: 2.0 means two cores busy all the
time), docs/s and MB/s, the speedup of ``split w2`` over both ``w1`` arms, and
whether ``split w1`` and ``split w2`` wrote the same shard bytes. "Tasks in
flight" is the tasks' stage wall time summed over tasks, over the run's wall
time: 2 means two tasks ran at once all along (busy or waiting for a CPU). The
planning pass (one read of the file: newlines and hashes) is timed on its own
too. The box is shared, so the load average before and after is printed beside
them, and whether the kernel shares CPU time out per session (autogroup).

    python benchmarks/bench_split.py --gb 1.0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from bench_io import jsonl_block  # same records as the I/O benchmark's

WORK = Path(__file__).parent / "_work" / "split"


def generate(path: Path, total_bytes: int) -> tuple[int, int]:
    """One JSONL file of about ``total_bytes``; returns (bytes, records)."""
    marker = path.with_name(f".done-{total_bytes}")
    if marker.exists():
        size, docs = map(int, marker.read_text().split())
        return size, docs
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    written = docs = 0
    with open(path, "wb") as fh:
        while written < total_bytes:
            blob = jsonl_block(rng, "d", docs)
            docs += 1000
            fh.write(blob)
            written += len(blob)
    marker.write_text(f"{written} {docs}")
    return written, docs


def run_arm(name: str, data: Path, split: int | None, workers: int) -> dict:
    out = WORK / f"out-{name.replace(' ', '-')}"
    shutil.rmtree(out, ignore_errors=True)
    recipe = WORK / f"{name.replace(' ', '-')}.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "bench_split", "sources": [{"path": str(data)}],
        "stages": [{"stage": "text_stats"}],
        "output": {"path": str(out), "shard_size": "128MB"},
        "engine": {"kind": "local", "workers": workers, "split_size": split},
    }))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gristmill.cli", "run", str(recipe), "--quiet"],
                   check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    manifest = json.loads((out / "manifest.json").read_text())
    # wall time of every task's stages, summed over tasks, over the run's wall time: how
    # many tasks were in flight on average (each task's time counts, busy or waiting)
    task_wall = sum(st["wall_s"] for st in manifest["timings"]["stages"])
    return {"name": name, "wall": wall, "cpu": cpu, "docs": manifest["counts"]["read"],
            "in_flight": task_wall / manifest["timings"]["seconds"],
            "shards": [(s["rows"], s["sha256"]) for s in manifest["shards"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="size of the JSONL file")
    ap.add_argument("--split", default="256MB", help="engine.split_size of the split arms")
    args = ap.parse_args()
    from gristmill.pipeline.recipe import parse_size
    from gristmill.pipeline.splits import plan_jsonl

    split = parse_size(args.split)
    data = WORK / "big.jsonl"
    size, docs = generate(data, int(args.gb * 1e9))
    print(f"input: {data} ({size / 1e6:,.0f} MB, {docs:,} records); {os.cpu_count()} CPUs; "
          f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    t0, c0 = time.perf_counter(), time.process_time()
    plan = plan_jsonl(str(data), split)
    pw, pc = time.perf_counter() - t0, time.process_time() - c0
    print(f"planning pass: {len(plan['ranges'])} ranges of <= {args.split}, {pw:.2f} s wall, "
          f"{pc:.2f} s CPU ({size / pw / 1e9:.2f} GB/s)")
    arms = [run_arm("unsplit w1", data, None, 1), run_arm("split w1", data, split, 1),
            run_arm("split w2", data, split, 2)]
    print("\n| arm | wall s | CPU s | CPU/wall | tasks in flight | docs/s | MB/s |\n"
          "|---|---|---|---|---|---|---|")
    for a in arms:
        print(f"| {a['name']} | {a['wall']:.1f} | {a['cpu']:.1f} | {a['cpu'] / a['wall']:.2f} | "
              f"{a['in_flight']:.2f} | {a['docs'] / a['wall']:,.0f} | "
              f"{size / a['wall'] / 1e6:.1f} |")
    w2 = arms[2]["wall"]
    print(f"\nspeedup of split w2: {arms[0]['wall'] / w2:.2f}x over unsplit w1, "
          f"{arms[1]['wall'] / w2:.2f}x over split w1")
    print(f"split w1 and split w2 wrote the same shards: {arms[1]['shards'] == arms[2]['shards']}"
          f" ({len(arms[2]['shards'])} shards); every arm read {arms[0]['docs']:,} records: "
          f"{len({a['docs'] for a in arms}) == 1}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled")
    if autogroup.exists():
        print(f"kernel.sched_autogroup_enabled = {autogroup.read_text().strip()} (1: CPU time is "
              f"shared out per session, so a session's share does not grow with its processes)")


if __name__ == "__main__":
    main()
