"""substring_dedup: time and peak memory at 100 MB and 1 GB of text.

Text: the real Debian documentation corpus of ``dedup_quality.py`` (every
manual in every language installed plus all APT package descriptions, about
70 MB), extended to the target size with copies of its documents in which
each word is replaced with probability ``--replace`` (default 0.05) by a
random word of the corpus: the copies are near duplicates that share many
long passages with their originals, as mirrored or versioned pages do, so
the suffix array meets realistic repeats rather than whole identical copies.

The corpus of each size is generated once by a child process and kept as
Parquet under ``--work``; each size then runs in a fresh child process that
reads it with pyarrow (so the peak RSS is the stage's, not the generator's
Python strings): ``summarize`` on 8,192-record batches,
``merge``, ``finalize`` (suffix array, LCP, ranges) and ``apply`` on every
batch, as the local engine calls them in one worker; it prints wall and CPU
seconds per phase, the peak RSS of the child (``ru_maxrss``), words, and the
share of words removed.

    .venv/bin/python benchmarks/bench_substring.py --mb 100 1000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent


def corpus_of(mb: float, work: Path, replace: float, seed: int = 0) -> pa.Table:
    from gristmill.pipeline.real_corpus import SOURCES, build_real_corpus

    base = pq.read_table(build_real_corpus(work / "corpus", sources=list(SOURCES))["corpus"],
                         columns=["text"])
    texts = base.column("text").to_pylist()
    target = mb * 1e6
    size = sum(len(t.encode()) for t in texts)
    rng = np.random.default_rng(seed)
    vocab = np.array(pc.list_flatten(pc.utf8_split_whitespace(
        base.column("text").combine_chunks().slice(0, 2000))).to_pylist(), dtype=object)
    out = list(texts)
    while size < target:
        for t in texts:
            words = np.array(t.split(), dtype=object)
            m = rng.random(words.size) < replace
            words[m] = vocab[rng.integers(0, vocab.size, int(m.sum()))]
            s = " ".join(words)
            out.append(s)
            size += len(s.encode())
            if size >= target:
                break
    n = len(out)
    return pa.table({"_key": pa.array(np.arange(n, dtype=np.uint64)), "text": out})


def write_corpus(mb: float, work: Path, replace: float) -> Path:
    """Generate the corpus once (in its own process: Python strings cost far more
    memory than the stage) and keep it as Parquet."""
    path = work / f"substring_{mb:g}mb_{replace:g}.parquet"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        pq.write_table(corpus_of(mb, work, replace), tmp, compression="zstd")
        tmp.replace(path)
    return path


def child(mb: float, work: Path, replace: float, min_tokens: int) -> None:
    from gristmill.selectors.substring_dedup import SubstringDedup

    table = pq.read_table(work / f"substring_{mb:g}mb_{replace:g}.parquet")
    text_mb = pc.sum(pc.binary_length(table.column("text"))).as_py() / 1e6
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    st = SubstringDedup({"min_tokens": min_tokens})
    res = {"target_mb": mb, "text_mb": text_mb, "records": table.num_rows,
           "rss_after_loading_text_mb": rss0}
    batches = [table.slice(s, 8192) for s in range(0, table.num_rows, 8192)]
    for phase in ("summarize", "finalize", "apply"):
        t0, c0 = time.perf_counter(), time.process_time()
        if phase == "summarize":
            summary = None
            for b in batches:
                s = st.summarize(b)
                summary = s if summary is None else st.merge(summary, s)
        elif phase == "finalize":
            state = st.finalize(summary)
            del summary
        else:
            kept = removed_chars = 0
            for b in batches:
                out = st.apply(b, state)
                kept += out.kept.num_rows
                removed_chars += (pc.sum(pc.utf8_length(b.column("text"))).as_py()
                                  - (pc.sum(pc.utf8_length(out.kept.column("text"))).as_py()
                                     or 0))
            res["records_kept"] = kept
            res["chars_removed_share"] = removed_chars / pc.sum(
                pc.utf8_length(table.column("text"))).as_py()
        res[f"{phase}_wall_s"] = time.perf_counter() - t0
        res[f"{phase}_cpu_s"] = time.process_time() - c0
    res["words"] = state.corpus_tokens
    res["words_removed_share"] = float((state.ends - state.starts).sum()) / state.corpus_tokens
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, nargs="+", default=[100, 1000])
    ap.add_argument("--replace", type=float, default=0.05)
    ap.add_argument("--min-tokens", type=int, default=50)
    ap.add_argument("--work", type=Path, default=HERE / "_work" / "dedup_quality")
    ap.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--generate", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate is not None:
        write_corpus(args.generate, args.work, args.replace)
        return
    if args.child is not None:
        child(args.child, args.work, args.replace, args.min_tokens)
        return
    for mb in args.mb:
        gen = [sys.executable, __file__, "--generate", str(mb), "--replace", str(args.replace),
               "--work", str(args.work)]
        subprocess.run(gen, check=True)
        cmd = [sys.executable, __file__, "--child", str(mb), "--replace", str(args.replace),
               "--min-tokens", str(args.min_tokens), "--work", str(args.work)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        print(r.stdout.strip() or r.stderr[-2000:], flush=True)


if __name__ == "__main__":
    main()
