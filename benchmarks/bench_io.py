"""I/O benchmark: JSONL.zst -> Parquet shards through the local engine with no
stages, against a plain pyarrow read/write loop over the same files, in the
same run. Prints MB/s (of uncompressed JSONL) for both, the ratio, the CPU
seconds of each (user + system of the child: on a shared, loaded box the wall
ratio moves with the neighbours, the CPU ratio much less) and the peak RSS of
each (each arm runs in its own child process, so peaks do not mix).

gristmill's readers validate as they read (UTF-8 of every block, one row per
line). Two plain arms: one that validates nothing, one that runs
``Table.validate(full=True)`` (UTF-8 of every string) on each file it read.

The recipe runs twice: ``workers: 1`` (one process; pyarrow parses each block
in parallel chunks, everything else runs on one core) and ``workers: 2`` (two
processes over the 8 files). The plain loop's
``read_json`` parses a whole file with all cores, so on an otherwise idle
machine the fair wall comparison is against the recipe that may use all cores
too; the CPU seconds compare the work done whatever the cores. ``--rounds``
repeats both orders of the arms (best of each is printed). The load average
before and after is printed: on a shared box the wall ratio moves with it.

    python benchmarks/bench_io.py --gb 1.0

``--readers-against FILE`` times only the readers (``read_task`` over the same
corpus, nothing written), the current ones against another version of
``readers.py``, e.g. the one before issue 10:

    git show 6e84e64:gristmill/pipeline/readers.py > /tmp/readers_6e84e64.py
    python benchmarks/bench_io.py --readers-against /tmp/readers_6e84e64.py
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

import zstandard

WORK = Path(__file__).parent / "_work" / "io"
VOCAB = [("".join(random.Random(i).choice("abcdefghijklmnopqrstuvwxyz")
                  for _ in range(random.Random(i + 7).randint(2, 10)))) for i in range(5000)]


def jsonl_block(rng: random.Random, prefix: str, start: int, n: int = 1000) -> bytes:
    """``n`` JSONL records of 50-700 vocabulary words, ids ``prefix + number`` from
    ``start``, domain ``d{number % 7}`` (also used by ``bench_split.py``)."""
    lines = []
    for i in range(start, start + n):
        text = " ".join(rng.choices(VOCAB, k=rng.randint(50, 700)))
        lines.append(json.dumps({"id": f"{prefix}{i}", "text": text, "domain": f"d{i % 7}"}))
    return ("\n".join(lines) + "\n").encode()


def generate(folder: Path, total_bytes: int, files: int) -> int:
    """Write ``files`` JSONL.zst files, ~``total_bytes`` of JSON in all; returns raw bytes."""
    marker = folder / f".done-{total_bytes}-{files}"
    if marker.exists():
        return int(marker.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = random.Random(0)
    raw = 0
    per_file = total_bytes // files
    for f in range(files):
        cctx = zstandard.ZstdCompressor(level=3)
        with open(folder / f"part-{f:03d}.jsonl.zst", "wb") as fh, cctx.stream_writer(fh) as w:
            written = 0
            i = 0
            while written < per_file:
                blob = jsonl_block(rng, f"{f}-", i)
                i += 1000
                w.write(blob)
                written += len(blob)
            raw += written
    marker.write_text(str(raw))
    return raw


PLAIN = r"""
import sys, pyarrow as pa, pyarrow.json as pj, pyarrow.parquet as pq
from pathlib import Path
src, dst, VALIDATE = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
dst.mkdir(parents=True, exist_ok=True)
schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("domain", pa.string())])
for i, f in enumerate(sorted(src.glob("*.jsonl.zst"))):
    with pa.input_stream(str(f), compression="zstd") as stream:
        t = pj.read_json(stream, parse_options=pj.ParseOptions(explicit_schema=schema))
    if VALIDATE:
        t.validate(full=True)  # UTF-8 of every string, as gristmill checks it
    pq.write_table(t, dst / f"part-{i:05d}.parquet", compression="zstd", compression_level=3)
import resource
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

READERS = r"""
import importlib.util, resource, sys
from pathlib import Path
if sys.argv[2] == "-":
    from gristmill.pipeline import readers
else:
    spec = importlib.util.spec_from_file_location("readers_under_test", sys.argv[2])
    readers = sys.modules["readers_under_test"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(readers)
from gristmill.pipeline.recipe import SourceSpec
rows = 0
for i, f in enumerate(sorted(Path(sys.argv[1]).glob("*.jsonl.zst"))):
    task = readers.InputTask(index=i, source_index=0, path=str(f), format="jsonl", label="x")
    for t in readers.read_task(task, SourceSpec(path=str(f)), readers.FileReport(path=str(f)),
                               10_000):
        rows += t.num_rows
print(rows, file=sys.stderr)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

OURS = r"""
import sys
from gristmill.pipeline.runner import run_recipe
run_recipe(sys.argv[1], fresh=True, progress=False, report=False)
import resource
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def run_child(code: str, *args: str) -> tuple[float, float, float]:
    """(seconds, CPU seconds, peak RSS in MB) of a child python process (it prints its peak)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True,
                         text=True)
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return dt, cpu, int(res.stdout.strip().splitlines()[-1]) / 1024


def compare_readers(src: Path, raw: int, other: Path) -> None:
    """Current readers vs ``other`` over the corpus: both orders, three rounds, best of each."""
    arms = {"current readers": "-", f"readers from {other.name}": str(other.resolve())}
    wall: dict[str, list[float]] = {a: [] for a in arms}
    cpu: dict[str, list[float]] = {a: [] for a in arms}
    for rnd in range(3):
        for arm in (list(arms) if rnd % 2 == 0 else list(arms)[::-1]):
            dt, c, _ = run_child(READERS, str(src), arms[arm])
            wall[arm].append(dt)
            cpu[arm].append(c)
    for arm in arms:
        print(f"{arm:<32}: {raw / 1e6 / min(wall[arm]):8.1f} MB/s  ({min(wall[arm]):.1f} s, "
              f"{min(cpu[arm]):.1f} CPU s)")
    cur, old = list(arms)
    print(f"ratio current/other readers throughput: {min(wall[old]) / min(wall[cur]):.2f}x wall, "
          f"{min(cpu[old]) / min(cpu[cur]):.2f}x CPU")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gb", type=float, default=1.0, help="uncompressed JSONL size")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--readers-against", type=Path, default=None,
                    help="time only the readers, against this readers.py")
    ap.add_argument("--rounds", type=int, default=1,
                    help="rounds of both arm orders (best of each arm is printed)")
    args = ap.parse_args()
    src = WORK / "corpus"
    raw = generate(src, int(args.gb * 1e9), args.files)
    comp = sum(p.stat().st_size for p in src.glob("*.zst"))
    print(f"corpus: {args.files} files, {raw / 1e6:,.0f} MB JSONL ({comp / 1e6:,.0f} MB zstd)")
    if args.readers_against is not None:
        compare_readers(src, raw, args.readers_against)
        return
    recipes = {}
    for workers in (1, 2):
        recipes[workers] = WORK / f"recipe-w{workers}.yaml"
        recipes[workers].write_text(
            f"name: bench-io\nsources: [{{path: {src}}}]\n"
            f"output: {{path: {WORK / f'ours-w{workers}'}, shard_size: 256MB}}\n"
            f"engine: {{kind: local, workers: {workers}}}\n")
    load_before = os.getloadavg()
    # both orders, best time of each: neither arm profits from a warm page cache alone
    arms = ("plain", "plain_validated", "ours", "ours_w2")
    results: dict[str, list[float]] = {arm: [] for arm in arms}
    cpus: dict[str, list[float]] = {arm: [] for arm in arms}
    peaks: dict[str, float] = {}
    for _ in range(args.rounds):
        for order in (arms, arms[::-1]):
            for arm in order:
                shutil.rmtree(WORK / arm, ignore_errors=True)
                if arm.startswith("ours"):
                    dt, cpu, peak = run_child(OURS, str(recipes[2 if arm == "ours_w2" else 1]))
                else:
                    dt, cpu, peak = run_child(PLAIN, str(src), str(WORK / arm),
                                              "1" if arm == "plain_validated" else "0")
                results[arm].append(dt)
                cpus[arm].append(cpu)
                peaks[arm] = max(peaks.get(arm, 0.0), peak)
    load_after = os.getloadavg()
    wall = {arm: min(v) for arm, v in results.items()}
    cpu = {arm: min(v) for arm, v in cpus.items()}
    names = {"plain": "plain pyarrow loop", "plain_validated": "plain loop + validate",
             "ours": "gristmill, workers: 1", "ours_w2": "gristmill, workers: 2"}
    for arm in arms:
        print(f"{names[arm]:<22}: {raw / 1e6 / wall[arm]:8.1f} MB/s  ({wall[arm]:.1f} s, "
              f"{cpu[arm]:.1f} CPU s)")
    for ours in ("ours", "ours_w2"):
        for base in ("plain", "plain_validated"):
            print(f"ratio {names[ours]} / {names[base]}: {wall[base] / wall[ours]:.2f}x wall, "
                  f"{cpu[base] / cpu[ours]:.2f}x CPU")
    print(f"peak RSS: plain {peaks['plain']:.0f} MB, plain + validate "
          f"{peaks['plain_validated']:.0f} MB, gristmill {peaks['ours']:.0f} MB "
          f"(workers: 2: the engine process alone, {peaks['ours_w2']:.0f} MB)")
    print(f"load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; "
          f"after: {', '.join(f'{x:.2f}' for x in load_after)}; CPUs: {os.cpu_count()}")


if __name__ == "__main__":
    main()
