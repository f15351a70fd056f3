"""Peak memory and CPU of gopher + MinHash dedup: gristmill against DataTrove, same run.

The job: ``--docs`` real documents (a seeded sample of the English documents of the
corpus of ``dedup_quality.py``: Debian manuals and package descriptions), written as 2
JSONL files; the gopher quality filter (defaults), then MinHash dedup of the
kept documents with 5-word shingles and 128 permutations.

- gristmill: ``gristmill run`` of a recipe ``gopher`` + ``minhash_dedup``
  (threshold 0.8, num_perm 128, defaults otherwise) on the local engine with
  ``--workers`` processes.
- DataTrove 0.10.1 (``peer_minhash.py``, in its own virtualenv under
  ``benchmarks/_work/peers-venv``, made here if missing): its four MinHash
  steps, each a ``LocalPipelineExecutor`` with 2 tasks and ``--workers``
  workers (buckets: 16 tasks); 16 buckets x 8 hashes = 128 hashes. DataTrove
  has no threshold parameter: its banding is its own (no verification).
  Its gopher filter runs without ``max_non_alpha_words_ratio``: it counts
  spaCy's punctuation tokens as words and dropped 1,246 of the 3,000 (gristmill
  splits on whitespace); without it DataTrove keeps 2,515 for dedup,
  gristmill 2,392, the closest the two filters come.

Each arm is a child process; the resident sets of the child and all its
descendants are summed from ``/proc`` every 20 ms, the largest sum is the
tree's peak. CPU is user + system of the child and every descendant it reaped
(``RUSAGE_CHILDREN`` before and after), or, where larger, the sum of the
last sampled user + system time of every process seen in the tree (DataTrove's
pool workers are not all reaped by their parent). Arms alternate, ``--repeats`` times.

    .venv/bin/python benchmarks/dedup_memory_vs_datatrove.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from dedup_memory import tree_rss  # noqa: E402

PEERS_VENV = HERE / "_work" / "peers-venv"
# xxhash 4 refuses str, which DataTrove 0.10.1's MinHash hashes; tokenizers and
# orjson are imported by its dedup package and JSONL reader
PEER_PACKAGES = ["datatrove==0.10.1", "xxhash==3.5.0", "tokenizers", "orjson", "spacy>=3.7"]


def ensure_peers() -> Path:
    """The peers' python, with DataTrove installed (never into gristmill's venv)."""
    py = PEERS_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    probe = subprocess.run([str(py), "-c", "import datatrove, tokenizers, orjson, xxhash; "
                            "xxhash.xxh64_intdigest('a')"], capture_output=True)
    if probe.returncode != 0:
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return py


def tree_cpu(pid: int, seen: dict[int, float]) -> None:
    """Record in ``seen`` the user + system seconds of ``pid`` and each descendant."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    todo = [pid]
    while todo:
        p = todo.pop()
        if p in cpu:
            seen[p] = max(seen.get(p, 0.0), cpu[p])
        todo.extend(children.get(p, []))


def measure(cmd: list[str]) -> dict:
    """Run ``cmd``; its tree's peak RSS (MB), CPU seconds, wall seconds and output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, seen = 0, {}
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        tree_cpu(proc.pid, seen)
        time.sleep(0.02)
    out = proc.stdout.read()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    # a pool worker nobody waits for is missing from RUSAGE_CHILDREN: the sum of
    # the last sample of every process seen is the other bound (misses < 20 ms each)
    cpu = max(cpu, sum(seen.values()))
    if proc.returncode:
        sys.exit(f"{cmd[:3]} failed ({proc.returncode}):\n{out[-3000:]}")
    return {"peak_mb": peak / 2**20, "cpu_s": cpu, "wall_s": wall, "out": out}


def main() -> None:
    from dedup_quality import load_corpus

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=HERE / "_work" / "dedup_memory_vs_datatrove")
    ap.add_argument("--engine", default="{}", help="extra engine keys for gristmill (JSON)")
    args = ap.parse_args()
    peers = ensure_peers()
    table = load_corpus(HERE / "_work" / "dedup_quality", 5000)
    # English only: DataTrove's gopher counts English stop words, gristmill's does not
    table = table.filter(pc.equal(table.column("lang"), "en"))
    pick = np.sort(np.random.default_rng(args.seed).choice(table.num_rows, args.docs,
                                                           replace=False))
    rows = table.take(pick).select(["id", "text"]).to_pylist()
    shutil.rmtree(args.work, ignore_errors=True)
    corpus = args.work / "corpus"
    corpus.mkdir(parents=True)
    half = len(rows) // 2
    for f, part in enumerate((rows[:half], rows[half:])):
        with open(corpus / f"part-{f}.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in part)
    chars = sum(len(r["text"]) for r in rows)
    print(f"corpus: {len(rows)} documents, {chars / 1e6:.1f}M characters, 2 JSONL files; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    recipe = args.work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "dedup-vs-datatrove", "sources": [{"path": str(corpus)}],
        "stages": [{"stage": "gopher"},
                   {"stage": "minhash_dedup", "threshold": 0.8, "num_perm": 128}],
        "output": {"path": str(args.work / "out-gristmill")},
        "engine": {"kind": "local", "workers": args.workers, **json.loads(args.engine)}}))
    gristmill = Path(sys.executable).with_name("gristmill")
    arms = {
        "gristmill": lambda: [str(gristmill), "run", str(recipe), "--fresh", "--quiet"],
        "datatrove": lambda: [str(peers), str(HERE / "peer_minhash.py"), str(corpus),
                              str(args.work / "dt"), "--tasks", "2", "--alpha-ratio", "0",
                              "--workers", str(args.workers)],
    }
    res: dict[str, list[dict]] = {a: [] for a in arms}
    for rep in range(args.repeats):
        for arm, cmd in arms.items():
            shutil.rmtree(args.work / "dt", ignore_errors=True)
            r = measure(cmd())
            res[arm].append(r)
            tail = r["out"].strip().splitlines()
            extra = tail[-1] if arm == "datatrove" else \
                next((x.strip() for x in tail if "minhash_dedup" in x), "")
            print(f"  rep {rep} {arm:<10} peak tree RSS {r['peak_mb']:7.1f} MB  "
                  f"CPU {r['cpu_s']:6.1f} s  wall {r['wall_s']:6.1f} s  {extra}", flush=True)
    g = statistics.median(r["peak_mb"] for r in res["gristmill"])
    d = statistics.median(r["peak_mb"] for r in res["datatrove"])
    gc = statistics.median(r["cpu_s"] for r in res["gristmill"])
    dc = statistics.median(r["cpu_s"] for r in res["datatrove"])
    print(f"median peak tree RSS: gristmill {g:.1f} MB, DataTrove {d:.1f} MB, ratio {g / d:.2f}")
    print(f"median CPU: gristmill {gc:.1f} s, DataTrove {dc:.1f} s, ratio {gc / dc:.2f}")


if __name__ == "__main__":
    main()
