"""One big JSONL file on ``workers: 1`` and ``workers: 2``: does splitting it into
tasks (``engine.split_size``) put both cores to work?

Builds one uncompressed JSONL file of about ``--gb`` GB (records generated as
``bench_io.py`` does), then runs the same light recipe (``text_stats``, output
Parquet shards) three times, each in its own child process, in one run:

- ``unsplit w1``: ``split_size: null``, ``workers: 1`` (one task, as before splitting);
- ``split w1``: ``split_size`` (default 256MB), ``workers: 1``;
- ``split w2``: the same with ``workers: 2``.

With ``--zstd`` the input is the same ``--gb`` GB of JSONL written as one
multi-frame ``.jsonl.zst`` (a frame per ``--frame-mib`` MiB of JSONL, cut at that
byte whatever it falls on, so records span frames; zstd level 3), split at frame
boundaries; ``split_size`` then counts compressed bytes, and by default is a
quarter of the compressed file (4 tasks, as the 1 GB JSONL file gets at 256MB).
``--no-split-w1`` leaves out the middle arm.

For each it prints wall time, CPU time (user + system of the child and all its
workers), CPU utilisation (CPU s / wall s: 2.0 means two cores busy all the
time), docs/s and MB/s (of JSONL), the speedup of ``split w2`` over the ``w1``
arms, and whether ``split w1`` and ``split w2`` wrote the same shard bytes.
"Tasks in flight" is the tasks' stage wall time summed over tasks, over the run's
wall time: 2 means two tasks ran at once all along (busy or waiting for a CPU).
The planning pass (JSONL: one read of the file, newlines and hashes; zstd: the
frame-header walk, then one read and decompression of the whole file) is timed on
its own too. The box is shared, so the load average before and after is printed
beside them, and whether the kernel shares CPU time out per session (autogroup).

    python benchmarks/bench_split.py --gb 1.0
    python benchmarks/bench_split.py --zstd --gb 4.0 --no-split-w1   # ~1 GB .jsonl.zst

``--planning`` times the planning pass alone over ``--files`` files of ``--file-mb``
MB of JSONL (``--zstd``: multi-frame ``.jsonl.zst`` files), serial on the driver
against one planning task per file in the local engine's pool of ``--workers``
processes (as ``run`` plans now), from the page cache, and checks the plans are equal:

    python benchmarks/bench_split.py --planning --files 4 --file-mb 250 [--zstd]
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
import zstandard
from bench_io import jsonl_block  # same records as the I/O benchmark's

WORK = Path(__file__).parent / "_work" / "split"


def generate(path: Path, total_bytes: int) -> tuple[int, int]:
    """One JSONL file of about ``total_bytes``; returns (bytes, records)."""
    marker = path.with_name(f".done-{total_bytes}")
    if marker.exists():
        size, docs = map(int, marker.read_text().split())
        return size, docs
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(".done-[0-9]*"):  # another size's file is overwritten
        stale.unlink()
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


def generate_zstd(path: Path, total_bytes: int, frame_bytes: int) -> tuple[int, int, int]:
    """The records of ``generate`` (same generator and seed), ~``total_bytes`` of JSONL,
    as independent zstd frames of ``frame_bytes`` of JSONL each; returns (JSONL bytes,
    records, frames)."""
    marker = path.with_name(f".done-{path.name}-{total_bytes}-{frame_bytes}")
    if marker.exists():
        return tuple(map(int, marker.read_text().split()))  # type: ignore[return-value]
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".done-{path.name}-*"):  # another size's file
        stale.unlink()
    rng = random.Random(0)
    cctx = zstandard.ZstdCompressor(level=3)
    written = docs = frames = 0
    pending = bytearray()
    with open(path, "wb") as fh:
        while written < total_bytes:
            blob = jsonl_block(rng, "d", docs)
            docs += 1000
            written += len(blob)
            pending += blob
            while len(pending) >= frame_bytes:
                fh.write(cctx.compress(bytes(pending[:frame_bytes])))
                del pending[:frame_bytes]
                frames += 1
        if pending:
            fh.write(cctx.compress(bytes(pending)))
            frames += 1
    marker.write_text(f"{written} {docs} {frames}")
    return written, docs, frames


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


def planning(args: argparse.Namespace) -> None:
    """``--planning``: the planning pass over ``--files`` files of ``--file-mb`` MB of
    JSONL each (``--zstd``: each as a multi-frame ``.jsonl.zst``), serial on the driver
    (``plan_splits`` with no map) against one task per file in the local engine's pool
    (``LocalEngine.map_files``, ``--workers``, the pool's start included), alternated
    ``--repeats`` times; the plans must be equal."""
    from gristmill.pipeline.engines.local import LocalEngine
    from gristmill.pipeline.readers import InputTask
    from gristmill.pipeline.recipe import parse_recipe, parse_size
    from gristmill.pipeline.splits import plan_splits

    folder = WORK / "planning"
    one = folder / ("one.jsonl.zst" if args.zstd else "one.jsonl")
    total = int(args.file_mb * 1e6)
    if args.zstd:
        jsonl, docs, frames = generate_zstd(one, total, args.frame_mib << 20)
        what = f"{jsonl / 1e6:,.0f} MB of JSONL in {frames} zstd frames"
    else:
        jsonl, docs = generate(one, total)
        what = f"{jsonl / 1e6:,.0f} MB of JSONL"
    paths = []
    for i in range(args.files):  # copies: each file is its own in the page cache
        p = folder / f"f{i}-{one.name}"
        if not p.exists() or p.stat().st_size != one.stat().st_size:
            shutil.copyfile(one, p)
        paths.append(p)
    on_disk = one.stat().st_size
    split = parse_size(args.split) if args.split else -(-on_disk // 4)
    files = [InputTask(index=i, source_index=0, path=str(p), format="jsonl", label=p.name,
                       size=on_disk) for i, p in enumerate(paths)]
    for p in paths:  # warm the page cache: both arms read from memory
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass
    recipe = parse_recipe({"name": "bench_planning", "sources": [{"path": str(one)}],
                           "output": {"path": str(folder / "out")},
                           "engine": {"workers": args.workers, "split_size": split}})
    pool = LocalEngine(recipe, progress=False).map_files
    print(f"input: {args.files} files of {on_disk / 1e6:,.0f} MB on disk each ({what}, "
          f"{docs:,} records each); split_size {split / 1e6:,.1f} MB; {os.cpu_count()} CPUs; "
          f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    start_only = f"pool w{args.workers} start (no-op tasks)"
    times: dict[str, list[tuple[float, float]]] = {"serial": [], f"pool w{args.workers}": [],
                                                   start_only: []}
    plans = {}
    for _ in range(args.repeats):
        for name, map_fn in (("serial", None), (f"pool w{args.workers}", pool),
                             (start_only, None)):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0, c0 = time.perf_counter(), time.process_time()
            if name == start_only:  # what the pool costs before any file is read
                pool(abs, [(0,)] * args.files)
            else:
                plans[name] = plan_splits(files, split, map_fn)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu += (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            times[name].append((wall, cpu))
    print("\n| arm | wall s (each repeat) | median wall s | CPU s (median) | CPU/wall | "
          "GB/s of JSONL |\n|---|---|---|---|---|---|")
    med = {}
    for name, runs in times.items():
        walls = sorted(w for w, _ in runs)
        cpus = sorted(c for _, c in runs)
        med[name] = walls[len(walls) // 2]
        cpu = cpus[len(cpus) // 2]
        print(f"| {name} | {', '.join(f'{w:.2f}' for w, _ in runs)} | {med[name]:.2f} | "
              f"{cpu:.2f} | {cpu / med[name]:.2f} | "
              f"{'' if name == start_only else f'{args.files * jsonl / med[name] / 1e9:.2f}'} |")
    serial, pooled = plans["serial"], plans[f"pool w{args.workers}"]
    print(f"\nserial / pool w{args.workers} (median wall): "
          f"{med['serial'] / med[f'pool w{args.workers}']:.2f}x; without the pool's start: "
          f"{med['serial'] / max(med[f'pool w{args.workers}'] - med[start_only], 1e-9):.2f}x; "
          f"same plans: "
          f"{json.dumps(serial, sort_keys=True) == json.dumps(pooled, sort_keys=True)} "
          f"({sum(len(p['ranges']) for p in serial.values())} ranges in {len(serial)} files)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="size of the JSONL (uncompressed)")
    ap.add_argument("--split", default=None,
                    help="engine.split_size of the split arms (default: 256MB; --zstd: a "
                         "quarter of the compressed file)")
    ap.add_argument("--zstd", action="store_true", help="one multi-frame .jsonl.zst file")
    ap.add_argument("--frame-mib", type=int, default=16, help="MiB of JSONL per zstd frame")
    ap.add_argument("--no-split-w1", action="store_true", help="leave out the split w1 arm")
    ap.add_argument("--planning", action="store_true",
                    help="time the planning pass only: serial vs one task per file in a pool")
    ap.add_argument("--files", type=int, default=4, help="--planning: number of files")
    ap.add_argument("--file-mb", type=float, default=250.0,
                    help="--planning: MB of JSONL per file")
    ap.add_argument("--workers", type=int, default=2, help="--planning: pool processes")
    ap.add_argument("--repeats", type=int, default=3, help="--planning: alternated repeats")
    args = ap.parse_args()
    if args.planning:
        planning(args)
        return
    from gristmill.pipeline.recipe import parse_size
    from gristmill.pipeline.splits import plan_jsonl, plan_zstd

    if args.zstd:
        data = WORK / "big.jsonl.zst"
        size, docs, frames = generate_zstd(data, int(args.gb * 1e9), args.frame_mib << 20)
        what = (f"{size / 1e6:,.0f} MB of JSONL as {data.stat().st_size / 1e6:,.0f} MB of zstd "
                f"in {frames} frames")
    else:
        data = WORK / "big.jsonl"
        size, docs = generate(data, int(args.gb * 1e9))
        what = f"{size / 1e6:,.0f} MB"
    on_disk = data.stat().st_size
    load_before = os.getloadavg()
    split = parse_size(args.split) if args.split else \
        (-(-on_disk // 4) if args.zstd else parse_size("256MB"))
    print(f"input: {data} ({what}, {docs:,} records); {os.cpu_count()} CPUs; "
          f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}")
    t0, c0 = time.perf_counter(), time.process_time()
    plan = (plan_zstd if args.zstd else plan_jsonl)(str(data), split)
    pw, pc = time.perf_counter() - t0, time.process_time() - c0
    print(f"planning pass: {len(plan['ranges'])} ranges of <= {split / 1e6:,.1f} MB on disk, "
          f"{pw:.2f} s wall, {pc:.2f} s CPU ({on_disk / pw / 1e9:.2f} GB/s of the file, "
          f"{size / pw / 1e9:.2f} GB/s of JSONL)")
    arms = [run_arm("unsplit w1", data, None, 1)]
    if not args.no_split_w1:
        arms.append(run_arm("split w1", data, split, 1))
    arms.append(run_arm("split w2", data, split, 2))
    print("\n| arm | wall s | CPU s | CPU/wall | tasks in flight | docs/s | MB/s |\n"
          "|---|---|---|---|---|---|---|")
    for a in arms:
        print(f"| {a['name']} | {a['wall']:.1f} | {a['cpu']:.1f} | {a['cpu'] / a['wall']:.2f} | "
              f"{a['in_flight']:.2f} | {a['docs'] / a['wall']:,.0f} | "
              f"{size / a['wall'] / 1e6:.1f} |")
    w2 = arms[-1]["wall"]
    print("\nspeedup of split w2: " + ", ".join(
        f"{a['wall'] / w2:.2f}x over {a['name']}" for a in arms[:-1]))
    if not args.no_split_w1:
        print(f"split w1 and split w2 wrote the same shards: "
              f"{arms[1]['shards'] == arms[2]['shards']} ({len(arms[2]['shards'])} shards)")
    print(f"every arm read {arms[0]['docs']:,} records: {len({a['docs'] for a in arms}) == 1}; "
          f"split w2 wrote {len(arms[-1]['shards'])} shards, unsplit w1 "
          f"{len(arms[0]['shards'])}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled")
    if autogroup.exists():
        print(f"kernel.sched_autogroup_enabled = {autogroup.read_text().strip()} (1: CPU time is "
              f"shared out per session, so a session's share does not grow with its processes)")


if __name__ == "__main__":
    main()
