"""I/O benchmark: JSONL.zst -> Parquet shards through the local engine with no
stages, against a plain pyarrow read/write loop over the same files, in the
same run. Prints MB/s (of uncompressed JSONL) for both, the ratio, and the peak
RSS of each (each arm runs in its own child process, so peaks do not mix).

    python benchmarks/bench_io.py --gb 1.0
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import zstandard

WORK = Path(__file__).parent / "_work" / "io"
VOCAB = [("".join(random.Random(i).choice("abcdefghijklmnopqrstuvwxyz")
                  for _ in range(random.Random(i + 7).randint(2, 10)))) for i in range(5000)]


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
                lines = []
                for _ in range(1000):
                    text = " ".join(rng.choices(VOCAB, k=rng.randint(50, 700)))
                    lines.append(json.dumps({"id": f"{f}-{i}", "text": text,
                                             "domain": f"d{i % 7}"}))
                    i += 1
                blob = ("\n".join(lines) + "\n").encode()
                w.write(blob)
                written += len(blob)
            raw += written
    marker.write_text(str(raw))
    return raw


PLAIN = r"""
import sys, pyarrow as pa, pyarrow.json as pj, pyarrow.parquet as pq
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("domain", pa.string())])
for i, f in enumerate(sorted(src.glob("*.jsonl.zst"))):
    with pa.input_stream(str(f), compression="zstd") as stream:
        t = pj.read_json(stream, parse_options=pj.ParseOptions(explicit_schema=schema))
    pq.write_table(t, dst / f"part-{i:05d}.parquet", compression="zstd", compression_level=3)
import resource
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

OURS = r"""
import sys
from gristmill.pipeline.runner import run_recipe
run_recipe(sys.argv[1], fresh=True, progress=False, report=False)
import resource
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def run_child(code: str, *args: str) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of a child python process (it prints its own peak)."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True,
                         text=True)
    dt = time.perf_counter() - t0
    return dt, int(res.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gb", type=float, default=1.0, help="uncompressed JSONL size")
    ap.add_argument("--files", type=int, default=8)
    args = ap.parse_args()
    src = WORK / "corpus"
    raw = generate(src, int(args.gb * 1e9), args.files)
    comp = sum(p.stat().st_size for p in src.glob("*.zst"))
    print(f"corpus: {args.files} files, {raw / 1e6:,.0f} MB JSONL ({comp / 1e6:,.0f} MB zstd)")
    recipe = WORK / "recipe.yaml"
    recipe.write_text(f"name: bench-io\nsources: [{{path: {src}}}]\n"
                      f"output: {{path: {WORK / 'ours'}, shard_size: 256MB}}\n"
                      f"engine: {{kind: local, workers: 1}}\n")
    # both orders, best time of each: neither arm profits from a warm page cache alone
    results: dict[str, list[float]] = {"plain": [], "ours": []}
    peaks: dict[str, float] = {}
    for order in (("plain", "ours"), ("ours", "plain")):
        for arm in order:
            shutil.rmtree(WORK / arm, ignore_errors=True)
            if arm == "plain":
                dt, peak = run_child(PLAIN, str(src), str(WORK / "plain"))
            else:
                dt, peak = run_child(OURS, str(recipe))
            results[arm].append(dt)
            peaks[arm] = max(peaks.get(arm, 0.0), peak)
    plain, ours = min(results["plain"]), min(results["ours"])
    print(f"plain pyarrow loop : {raw / 1e6 / plain:8.1f} MB/s  ({plain:.1f} s)")
    print(f"gristmill local    : {raw / 1e6 / ours:8.1f} MB/s  ({ours:.1f} s)")
    print(f"ratio gristmill/plain throughput: {plain / ours:.2f}x")
    print(f"peak RSS: plain {peaks['plain']:.0f} MB, gristmill {peaks['ours']:.0f} MB")


if __name__ == "__main__":
    main()
