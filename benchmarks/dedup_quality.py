"""Near-duplicate quality on real text: gristmill's minhash_dedup and datasketch's
MinHashLSH against exact Jaccard, in one run.

Corpus: Debian's documentation packages (``gristmill.pipeline.real_corpus``):
every manual in every language it ships (handbook, reference, maint-guide,
developers-reference, aptitude, git, PostgreSQL, perl) cut into documents at
section boundaries, plus a contiguous run of APT package descriptions (package
families such as ``libfoo1`` / ``libfoo-dev`` / ``libfoo-doc`` stay together).
Translations, versions of one page and generated pages hold genuine near
duplicates. It needs (as root; the script stops and says so if missing)::

    apt-get update && apt-get install -y debian-handbook debian-reference \
        maint-guide-es maint-guide-fr maint-guide-it maint-guide-ja \
        developers-reference-de developers-reference-fr aptitude-doc-es \
        aptitude-doc-fr aptitude-doc-ja git-doc postgresql-doc perl-doc
    apt-get update -o Acquire::Languages=en    # package descriptions

Every method sees the same shingle sets: gristmill's word 5-grams of the
normalized text (lower case, punctuation removed) as 32-bit hashes; datasketch
gets those hashes (``MinHash(hashfunc=int)``, i.e. gristmill's signatures
loaded as ``LeanMinHash``, which a test checks are the same).

Truth: exact Jaccard of every pair (a sparse product of the doc x shingle
matrix). Two truths from the pairs with ``J >= t``:

- *greedy* (the policy gristmill implements): records visited longest first
  (then smallest index); a record is dropped when it has ``J >= t`` to a
  record already kept;
- *components* (the issue's table): connected components of the ``J >= t``
  graph, the longest member kept, every other dropped, however far from it.

Measures per method: ``dropped``; drop precision and drop recall against each
truth's dropped set; pair precision: the share of dropped records whose exact
Jaccard to the survivor the method names is ``>= t``; pair recall: the share
of pairs with ``J >= t`` of which the output keeps at most one. Speed:
gristmill's ``keys``, shuffle partitioning, ``reduce`` and ``resolve`` in this
process (one core), documents per CPU-second. Every method runs for each
``--seeds`` value (the MinHash permutation seed); the table gives the mean and
a 95% t-interval over seeds, and the paired difference default - datasketch.

    .venv/bin/python benchmarks/dedup_quality.py                # ~20k documents, 3 seeds
    .venv/bin/python benchmarks/dedup_quality.py --docs 5000 --seeds 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from gristmill.pipeline.execution import partition_keys
from gristmill.pipeline.real_corpus import SOURCES, MissingPackagesError, build_real_corpus
from gristmill.pipeline.stage import ROW_KEY
from gristmill.selectors.dedup import best_first_survivors
from gristmill.selectors.minhash import MinHashDedup, shingle_hashes, signatures

HERE = Path(__file__).resolve().parent
THRESHOLD = 0.8
NUM_PERM = 128

#: the arms: gristmill's defaults and each option, at THRESHOLD and NUM_PERM unless named
ARMS: dict[str, dict] = {
    "gristmill defaults": {},
    "gristmill margin: 0": {"margin": 0.0},
    "gristmill margin: 1": {"margin": 1.0},
    "gristmill verify: false": {"verify": False},
    "gristmill sketch_bits: 4": {"sketch_bits": 4},
    "gristmill sketch_bits: 32": {"sketch_bits": 32},
    "gristmill num_perm: 256": {"num_perm": 256},
    "gristmill one_permutation": {"scheme": "one_permutation"},
}


def load_corpus(work: Path, pkgdesc: int, corpus: Path | None = None) -> pa.Table:
    """Every documentation source plus ``pkgdesc`` consecutive package descriptions,
    from ``corpus`` (a built ``corpus.parquet``) or built under ``work``."""
    if corpus is None:
        try:
            corpus = build_real_corpus(work / "corpus", sources=list(SOURCES),
                                       progress=True)["corpus"]
        except MissingPackagesError as e:
            sys.exit(str(e))
    t = pq.read_table(corpus, columns=["id", "text", "source", "lang"])
    is_pkg = pc.equal(t.column("source"), "pkgdesc")
    docs = t.filter(pc.invert(is_pkg))
    pkgs = t.filter(is_pkg)
    start = max(0, pkgs.num_rows // 3)  # a run from the middle of the alphabet
    return pa.concat_tables([docs, pkgs.slice(start, pkgdesc)])


def shingle_sets(texts: pa.Array) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Binary doc x shingle matrix of the distinct 32-bit shingle hashes, and set sizes."""
    h, d = shingle_hashes(texts, "word", 5, True, "fast")
    packed = np.unique((d.astype(np.uint64) << np.uint64(32)) | h.astype(np.uint64))
    docs = (packed >> np.uint64(32)).astype(np.int64)
    _, col = np.unique(packed & np.uint64(0xFFFFFFFF), return_inverse=True)
    x = sparse.csr_matrix((np.ones(docs.size, np.float32), (docs, col)),
                          shape=(len(texts), int(col.max()) + 1 if col.size else 0))
    return x, np.diff(x.indptr)


def exact_pairs(x: sparse.csr_matrix, sizes: np.ndarray, floor: float,
                chunk: int = 2000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair i < j with Jaccard >= ``floor``: (i, j, J), by row blocks of X X^T."""
    xt = x.T.tocsc()
    out_i, out_j, out_v = [], [], []
    for s in range(0, x.shape[0], chunk):
        inter = (x[s: s + chunk] @ xt).tocoo()
        i = inter.row.astype(np.int64) + s
        j = inter.col.astype(np.int64)
        keep = i < j
        i, j, c = i[keep], j[keep], inter.data[keep].astype(np.float64)
        jac = c / (sizes[i] + sizes[j] - c)
        ok = jac >= floor
        out_i.append(i[ok])
        out_j.append(j[ok])
        out_v.append(jac[ok])
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_v)


def jaccard_of(x: sparse.csr_matrix, sizes: np.ndarray, a: np.ndarray,
               b: np.ndarray) -> np.ndarray:
    """Exact Jaccard of the given pairs."""
    if a.size == 0:
        return np.zeros(0)
    inter = np.asarray(x[a].multiply(x[b]).sum(axis=1)).ravel()
    return inter / (sizes[a] + sizes[b] - inter)


def greedy_truth(score: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Survivor of every document under the greedy policy on the exact graph."""
    nodes, inv = np.unique(np.concatenate([i, j]), return_inverse=True)
    surv_local = best_first_survivors(score[nodes], inv[: i.size], inv[i.size:])
    survivor = np.arange(score.size)
    survivor[nodes] = nodes[surv_local]
    return survivor


def component_survivors(score: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Survivor of every document: the best member of its connected component."""
    n = score.size
    g = sparse.coo_matrix((np.ones(i.size, np.int8), (i, j)), shape=(n, n))
    _, comp = connected_components(g, directed=False)
    order = np.lexsort((np.arange(n), -score, comp))
    first = np.r_[True, comp[order][1:] != comp[order][:-1]]
    best = np.empty(comp.max() + 1, np.int64)
    best[comp[order][first]] = order[first]
    return best[comp]


def run_gristmill(table: pa.Table, params: dict, seed: int) -> tuple[np.ndarray, dict]:
    """Survivor per document (index) from the stage run as an engine runs it."""
    st = MinHashDedup({"threshold": THRESHOLD, "num_perm": NUM_PERM, "hash_seed": seed,
                       **params})
    st.setup()
    c0, t0 = time.process_time(), time.perf_counter()
    keys = pa.concat_tables([st.keys(table.slice(s, 8192))
                             for s in range(0, table.num_rows, 8192)])
    reduced = [st.reduce(p) for p in partition_keys(keys, 8)]
    state = st.resolve(pa.concat_tables(reduced))
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    survivor = np.arange(table.num_rows)
    survivor[state.column(ROW_KEY).to_numpy().astype(np.int64)] = \
        state.column("survivor").to_numpy().astype(np.int64)
    return survivor, {"bands_rows": [st.bands, st.rows], "cpu_s": cpu, "wall_s": wall,
                      "docs_per_cpu_s": table.num_rows / cpu,
                      "shuffle_bytes_per_doc": keys.nbytes / table.num_rows}


def run_datasketch(table: pa.Table, score: np.ndarray, seed: int) -> tuple[np.ndarray, dict]:
    """MinHashLSH at the same threshold and permutations, as its users run it: insert
    every document, query each, join the answers (union-find), keep the longest."""
    from datasketch import LeanMinHash, MinHashLSH

    h, d = shingle_hashes(table.column("text"), "word", 5, True, "fast")
    sig = signatures(h, d, table.num_rows, NUM_PERM, seed, "affine32")
    has = np.zeros(table.num_rows, bool)
    has[d] = True
    c0 = time.process_time()
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    sketches = {}
    for k in np.flatnonzero(has):
        m = LeanMinHash(seed=seed, hashvalues=sig[k], scheme="affine32")
        lsh.insert(int(k), m, check_duplication=False)
        sketches[int(k)] = m
    a, b = [], []
    for k, m in sketches.items():
        for other in lsh.query(m):
            if other != k:
                a.append(k)
                b.append(other)
    cpu = time.process_time() - c0
    return component_survivors(score, np.array(a, np.int64), np.array(b, np.int64)), \
        {"bands_rows": list(lsh.b_r) if hasattr(lsh, "b_r") else [lsh.b, lsh.r],
         "cpu_s_lsh_only": cpu}


def measure(survivor: np.ndarray, truth: dict[str, np.ndarray], x: sparse.csr_matrix,
            sizes: np.ndarray, pairs: tuple[np.ndarray, np.ndarray]) -> dict:
    n = survivor.size
    dropped = np.flatnonzero(survivor != np.arange(n))
    out: dict = {"dropped": int(dropped.size)}
    for name, t_surv in truth.items():
        t_drop = t_surv != np.arange(n)
        hit = int(t_drop[dropped].sum())
        out[f"drop_precision_{name}"] = hit / dropped.size if dropped.size else 1.0
        out[f"drop_recall_{name}"] = hit / int(t_drop.sum()) if t_drop.any() else 1.0
    jac = jaccard_of(x, sizes, dropped, survivor[dropped])
    out["pair_precision"] = float((jac >= THRESHOLD).mean()) if dropped.size else 1.0
    out["min_jaccard_to_survivor"] = float(jac.min()) if dropped.size else None
    kept = survivor == np.arange(n)
    i, j = pairs
    out["pair_recall"] = float(1.0 - (kept[i] & kept[j]).mean()) if i.size else 1.0
    return out


def interval(v: list[float]) -> tuple[float, float, float]:
    from scipy import stats

    a = np.asarray(v, dtype=np.float64)
    if a.size < 2:
        return float(a.mean()), float("nan"), float("nan")
    half = stats.t.ppf(0.975, a.size - 1) * a.std(ddof=1) / np.sqrt(a.size)
    return float(a.mean()), float(a.mean() - half), float(a.mean() + half)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=0,
                    help="use the first N documents of the corpus (0: all)")
    ap.add_argument("--pkgdesc", type=int, default=5000,
                    help="consecutive package descriptions added to the manuals")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--skip-datasketch", action="store_true")
    ap.add_argument("--work", type=Path, default=HERE / "_work" / "dedup_quality")
    ap.add_argument("--corpus", type=Path, default=None,
                    help="a corpus.parquet built by `gristmill real-corpus` (all sources); "
                         "default: build it under --work")
    args = ap.parse_args()

    table = load_corpus(args.work, args.pkgdesc, args.corpus)
    if args.docs:
        table = table.slice(0, args.docs)
    n = table.num_rows
    table = table.append_column(ROW_KEY, pa.array(np.arange(n, dtype=np.uint64)))
    score = pc.utf8_length(table.column("text")).to_numpy().astype(np.float64)
    print(f"corpus: {n} documents, {int(score.sum()) / 1e6:.1f}M characters, "
          f"{len(set(table.column('source').to_pylist()))} sources", flush=True)

    t0 = time.perf_counter()
    x, sizes = shingle_sets(table.column("text").combine_chunks())
    i, j, jac = exact_pairs(x, sizes, floor=0.5)
    at = jac >= THRESHOLD
    ti, tj = i[at], j[at]
    truth = {"greedy": greedy_truth(score, ti, tj),
             "components": component_survivors(score, ti, tj)}
    hist = np.histogram(jac, bins=[0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0001])[0]
    res: dict = {"docs": n, "threshold": THRESHOLD, "num_perm": NUM_PERM,
                 "pairs_J>=0.5_by_bin": dict(zip(
                     ["0.5", "0.6", "0.7", "0.75", "0.8", "0.85", "0.9", "0.95"],
                     hist.tolist(), strict=True)),
                 "truth_pairs": int(at.sum()), "truth_seconds": time.perf_counter() - t0,
                 "rows": {}}
    print(f"truth: {at.sum()} pairs with J >= {THRESHOLD} in {res['truth_seconds']:.0f}s; "
          f"pairs by J: {res['pairs_J>=0.5_by_bin']}", flush=True)
    for name, surv in truth.items():
        res["rows"][f"exact truth ({name})"] = {"1": measure(surv, truth, x, sizes, (ti, tj))}

    arms = dict(ARMS)
    if not args.skip_datasketch:
        arms["datasketch MinHashLSH"] = None
    for arm, params in arms.items():
        per_seed = {}
        for seed in args.seeds:
            if params is None:
                surv, info = run_datasketch(table, score, seed)
            else:
                surv, info = run_gristmill(table, params, seed)
            per_seed[str(seed)] = {**measure(surv, truth, x, sizes, (ti, tj)), **info}
            print(arm, seed, json.dumps(per_seed[str(seed)]), flush=True)
        res["rows"][arm] = per_seed

    cols = ["dropped", "drop_precision_greedy", "drop_recall_greedy",
            "drop_precision_components", "drop_recall_components", "pair_precision",
            "pair_recall", "docs_per_cpu_s"]
    print(f"\n{n} documents, threshold {THRESHOLD}, {NUM_PERM} permutations; "
          f"mean [95% interval] over seeds {args.seeds}")
    print("| arm | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for arm, per_seed in res["rows"].items():
        cells = []
        for c in cols:
            vals = [r[c] for r in per_seed.values() if r.get(c) is not None]
            if not vals:
                cells.append("")
                continue
            m, lo, hi = interval(vals)
            if c == "dropped":
                cells.append(f"{m:.0f}" + ("" if np.isnan(lo) else f" [{lo:.0f}, {hi:.0f}]"))
            elif c == "docs_per_cpu_s":
                cells.append(f"{m / 1e3:.1f}k")
            else:
                cells.append(f"{m:.3f}" + ("" if np.isnan(lo) else f" [{lo:.3f}, {hi:.3f}]"))
        print(f"| {arm} | " + " | ".join(cells) + " |")
    if "datasketch MinHashLSH" in res["rows"]:
        print("\npaired differences, gristmill defaults - datasketch (mean [95% interval]):")
        for c in cols[1:-1]:
            diff = [res["rows"]["gristmill defaults"][s][c]
                    - res["rows"]["datasketch MinHashLSH"][s][c] for s in map(str, args.seeds)]
            m, lo, hi = interval(diff)
            print(f"  {c}: {m:+.3f} [{lo:+.3f}, {hi:+.3f}]  per seed {np.round(diff, 3).tolist()}")
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "results.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
