"""Peak memory of a minhash_dedup run: the whole process tree, per setting.

The real-text corpus of ``dedup_quality.py`` (20,734 documents) is written as
8 JSONL files; the recipe is one ``minhash_dedup`` stage on the local engine
(``workers`` processes, ``shuffle_partitions: 8``, batches of 8,192). Each
arm runs ``gristmill run`` as a child process; the sum of the resident sets
of the child and all its descendants is sampled from ``/proc`` every 50 ms,
and the largest sum is the tree's peak. Arms: the defaults (verified, 8-bit
sketches), ``sketch_bits: 4`` and ``verify: false`` (the old default).

    .venv/bin/python benchmarks/dedup_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

ARMS = {"defaults": {}, "sketch_bits: 4": {"sketch_bits": 4}, "verify: false": {"verify": False}}


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and every descendant (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ppid, pages = int(fields[1]), int(fields[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = pages * page
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total


def main() -> None:
    from dedup_quality import load_corpus

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=HERE / "_work" / "dedup_memory")
    args = ap.parse_args()
    table = load_corpus(HERE / "_work" / "dedup_quality", 5000)
    corpus = args.work / "corpus"
    shutil.rmtree(args.work, ignore_errors=True)
    corpus.mkdir(parents=True)
    n = table.num_rows
    for f in range(8):
        part = table.slice(f * n // 8, (f + 1) * n // 8 - f * n // 8)
        with open(corpus / f"part-{f}.jsonl", "w") as fh:
            for r in part.select(["id", "text"]).to_pylist():
                fh.write(json.dumps(r) + "\n")
    chars = pc.sum(pc.utf8_length(table.column("text"))).as_py()
    print(f"corpus: {n} documents, {chars / 1e6:.1f}M characters, 8 JSONL files", flush=True)
    gristmill = Path(sys.executable).with_name("gristmill")
    for arm, params in ARMS.items():
        recipe = args.work / f"{arm.replace(':', '').replace(' ', '_')}.yaml"
        recipe.write_text(yaml.safe_dump({
            "name": "dedup-memory", "sources": [{"path": str(corpus)}],
            "stages": [{"stage": "minhash_dedup", **params}],
            "output": {"path": str(args.work / f"out-{recipe.stem}")},
            "engine": {"kind": "local", "workers": args.workers, "batch_size": 8192,
                       "shuffle_partitions": 8}}))
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(gristmill), "run", str(recipe), "--fresh", "--quiet"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.05)
        out = proc.stdout.read()
        wall = time.perf_counter() - t0
        kept = [line for line in out.splitlines() if "minhash_dedup" in line]
        print(json.dumps({"arm": arm, "rc": proc.returncode, "peak_tree_rss_mb": peak / 2**20,
                          "wall_s": wall, "funnel": kept[:1]}), flush=True)
        if proc.returncode:
            print(out[-2000:])


if __name__ == "__main__":
    main()
