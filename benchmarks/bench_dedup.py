"""MinHash near dedup end to end: gristmill vs datasketch, then the engines.

End to end means shingle, hash, band and cluster: for gristmill the stage's
``keys`` on batches, the partitioning, ``reduce`` and ``resolve`` in one
process (one core); for datasketch a ``MinHash.update`` loop per document (its
documented usage), ``MinHashLSH.insert``, then a ``query`` per document and a
union-find over the answers. Both use word 5-grams of the same normalized text,
128 permutations and threshold 0.8. datasketch runs on a sample of the corpus
(``--datasketch-docs``) because it is slow; its docs/s is a rate, comparable.
Each gristmill scheme runs twice, with the numpy kernel and with the C++ one
(``kernel: numpy`` / ``kernel: native``, built before the clock starts); both
must drop the same records.

Then the same recipe (exact + near dedup) runs on the local, dask and beam
engines over the corpus written as JSONL files.

    .venv/bin/python benchmarks/bench_dedup.py              # 50k docs
    .venv/bin/python benchmarks/bench_dedup.py --docs 5000  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from gristmill.pipeline.execution import partition_keys
from gristmill.selectors.minhash import MinHashDedup, _normalize

HERE = Path(__file__).resolve().parent


def make_corpus(n_docs: int, words: int = 400, near_fraction: float = 0.1,
                seed: int = 0) -> pa.Table:
    """Zipf-distributed words over a 50k vocabulary; ``near_fraction`` of the docs
    are copies of another doc with 1-5% of their words replaced."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(50_000)], dtype=object)
    ranks = np.minimum(rng.zipf(1.2, size=(n_docs, words)) - 1, len(vocab) - 1)
    n_near = int(n_docs * near_fraction)
    src = rng.integers(0, n_docs - n_near, n_near)
    for k, s in enumerate(src):
        row = ranks[s].copy()
        m = rng.random(words) < rng.uniform(0.01, 0.05)
        row[m] = rng.integers(0, len(vocab), m.sum())
        ranks[n_docs - n_near + k] = row
    texts = [" ".join(vocab[r]) for r in ranks]
    perm = rng.permutation(n_docs)
    return pa.table({"id": [f"d{i:07d}" for i in range(n_docs)],
                     "text": pa.array([texts[i] for i in perm])})


def run_gristmill(table: pa.Table, params: dict, batch: int = 8192,
                  partitions: int = 8) -> dict:
    stage = MinHashDedup(params)
    stage.setup()  # builds or loads the C++ kernel outside the timing
    t0 = time.perf_counter()
    c0 = time.process_time()
    keys = []
    for start in tqdm(range(0, table.num_rows, batch), desc=f"gristmill {params}", leave=False):
        keys.append(stage.keys(table.slice(start, batch)))
    t_keys = time.perf_counter() - t0
    all_keys = pa.concat_tables(keys)
    reduced = [stage.reduce(p) for p in partition_keys(all_keys, partitions)]
    state = stage.resolve(pa.concat_tables(reduced))
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return {"kernel": stage.backend, "docs": table.num_rows, "seconds": dt,
            "docs_per_s": table.num_rows / dt,
            "cpu_seconds": cpu, "docs_per_cpu_s": table.num_rows / cpu,
            "keys_seconds": t_keys, "dropped": state.num_rows,
            "bands_rows": [stage.bands, stage.rows],
            "shuffled_bytes_per_doc": all_keys.nbytes / table.num_rows,
            "signature_bytes_per_doc": 4 * stage.params.num_perm}


def run_datasketch(table: pa.Table, threshold: float, num_perm: int, batch_update: bool) -> dict:
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    c0 = time.process_time()
    ids = table.column("id").to_pylist()
    words = pc.utf8_split_whitespace(_normalize(table.column("text").combine_chunks(), True))
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    sketches = []
    for doc_id, ws in tqdm(zip(ids, words.to_pylist(), strict=True), total=len(ids),
                           desc="datasketch", leave=False, mininterval=2):
        m = MinHash(num_perm=num_perm)
        grams = [" ".join(ws[i:i + 5]).encode() for i in range(max(len(ws) - 4, 1))]
        if batch_update:
            m.update_batch(grams)
        else:
            for g in grams:
                m.update(g)
        lsh.insert(doc_id, m)
        sketches.append(m)
    parent = {i: i for i in ids}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for doc_id, m in zip(ids, sketches, strict=True):
        for other in lsh.query(m):
            a, b = find(doc_id), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    dropped = sum(1 for i in ids if find(i) != i)
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return {"docs": len(ids), "seconds": dt, "docs_per_s": len(ids) / dt,
            "cpu_seconds": cpu, "docs_per_cpu_s": len(ids) / cpu, "dropped": dropped,
            "signature_bytes_per_doc": sketches[0].hashvalues.nbytes if sketches else 0}


def run_engines(table: pa.Table, work: Path, workers: int) -> dict:
    from gristmill.pipeline.recipe import parse_recipe
    from gristmill.pipeline.runner import run_recipe

    corpus = work / "corpus"
    shutil.rmtree(work, ignore_errors=True)
    corpus.mkdir(parents=True)
    n_files = 8
    for f in range(n_files):
        part = table.slice(f * table.num_rows // n_files,
                           (f + 1) * table.num_rows // n_files - f * table.num_rows // n_files)
        with open(corpus / f"part-{f:02d}.jsonl", "w") as fh:
            for r in part.to_pylist():
                fh.write(json.dumps(r) + "\n")
    results = {}
    digests = {}
    for kind in ("local", "dask", "beam"):
        body = {"name": "bench-dedup", "sources": [{"path": str(corpus)}],
                "stages": [{"stage": "exact_dedup"}, {"stage": "minhash_dedup"}],
                "output": {"path": str(work / f"out-{kind}")},
                "engine": {"kind": kind, "workers": workers, "batch_size": 8192,
                           "shuffle_partitions": 8}}
        t0 = time.perf_counter()
        m = run_recipe(parse_recipe(body), fresh=True, progress=False, report=False)
        dt = time.perf_counter() - t0
        results[kind] = {"seconds": dt, "docs_per_s": table.num_rows / dt, "workers": workers,
                         "kept": m["counts"]["kept"]}
        digests[kind] = sorted(s["sha256"] for s in m["shards"])
    results["same_shards"] = len({tuple(d) for d in digests.values()}) == 1
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=50_000)
    ap.add_argument("--datasketch-docs", type=int, default=2_000)
    ap.add_argument("--workers", type=int, default=2, help="engine workers")
    ap.add_argument("--skip-engines", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "_work" / "dedup")
    args = ap.parse_args()
    t = time.perf_counter()
    table = make_corpus(args.docs)
    print(f"corpus: {args.docs} docs x 400 words in {time.perf_counter() - t:.1f}s", flush=True)
    res: dict = {"docs": args.docs, "cpu_count": os.cpu_count()}
    schemes = {"affine32": {}, "one_permutation": {"scheme": "one_permutation"},
               "legacy": {"scheme": "legacy"}}
    for name, params in schemes.items():
        for kernel in ("numpy", "native"):
            key = f"gristmill_{name}" + ("_numpy" if kernel == "numpy" else "")
            res[key] = run_gristmill(table, {**params, "kernel": kernel})
            print(name, kernel, json.dumps(res[key]), flush=True)
        res[f"native_over_numpy_cpu_{name}"] = (res[f"gristmill_{name}"]["docs_per_cpu_s"]
                                                / res[f"gristmill_{name}_numpy"]["docs_per_cpu_s"])
        res[f"same_dropped_{name}"] = (res[f"gristmill_{name}"]["dropped"]
                                       == res[f"gristmill_{name}_numpy"]["dropped"])
    sample = table.slice(0, min(args.datasketch_docs, table.num_rows))
    res["gristmill_sha1_sample"] = run_gristmill(sample, {"hash": "sha1"})
    print("sha1", json.dumps(res["gristmill_sha1_sample"]), flush=True)
    res["datasketch_update"] = run_datasketch(sample, 0.8, 128, batch_update=False)
    print("datasketch update", json.dumps(res["datasketch_update"]), flush=True)
    res["datasketch_update_batch"] = run_datasketch(sample, 0.8, 128, batch_update=True)
    print("datasketch update_batch", json.dumps(res["datasketch_update_batch"]), flush=True)
    base = res["datasketch_update"]["docs_per_s"]
    for name in ("affine32", "one_permutation", "affine32_numpy", "one_permutation_numpy"):
        res[f"speedup_{name}"] = res[f"gristmill_{name}"]["docs_per_s"] / base
        res[f"speedup_cpu_{name}"] = (res[f"gristmill_{name}"]["docs_per_cpu_s"]
                                      / res["datasketch_update"]["docs_per_cpu_s"])
        res[f"speedup_cpu_{name}_vs_update_batch"] = (
            res[f"gristmill_{name}"]["docs_per_cpu_s"]
            / res["datasketch_update_batch"]["docs_per_cpu_s"])
    if not args.skip_engines:
        res["engines"] = run_engines(table, args.out, args.workers)
        print("engines", json.dumps(res["engines"]), flush=True)
    print(json.dumps(res, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
