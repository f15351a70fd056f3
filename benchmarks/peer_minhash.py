"""DataTrove's gopher quality filter + MinHash dedup over a folder of JSONL files;
runs in the peers' own virtualenv, never in gristmill's.

Usage (``dedup_memory_vs_datatrove.py`` calls it and samples this process tree)::

    PEERS/bin/python benchmarks/peer_minhash.py CORPUS_DIR WORK_DIR --tasks 2 --workers 2

DataTrove's four MinHash steps, each a ``LocalPipelineExecutor`` with ``--workers``
processes: (1) read, ``GopherQualityFilter``, write the kept documents and
``MinhashDedupSignature``; (2) ``MinhashDedupBuckets``; (3) ``MinhashDedupCluster``;
(4) read the kept documents, ``MinhashDedupFilter``, write. Prints one JSON line:
documents read, kept by gopher, kept after dedup.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (  # not .dedup: it needs tokenizers
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import GopherQualityFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    ap = argparse.ArgumentParser()
    ap.add_argument("corpus", type=Path)
    ap.add_argument("work", type=Path)
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--buckets", type=int, default=16)
    ap.add_argument("--per-bucket", type=int, default=8)
    ap.add_argument("--alpha-ratio", type=float, default=0.8,
                    help="GopherQualityFilter max_non_alpha_words_ratio (0: off)")
    a = ap.parse_args()
    w = a.work
    cfg = MinhashConfig(n_grams=5, num_buckets=a.buckets, hashes_per_bucket=a.per_bucket)
    LocalPipelineExecutor(pipeline=[
        JsonlReader(str(a.corpus)),
        GopherQualityFilter(max_non_alpha_words_ratio=a.alpha_ratio or None),
        JsonlWriter(str(w / "kept"), compression=None),
        MinhashDedupSignature(output_folder=str(w / "sigs"), config=cfg),
    ], tasks=a.tasks, workers=a.workers, logging_dir=str(w / "logs1"),
        skip_completed=False).run()
    LocalPipelineExecutor(pipeline=[
        MinhashDedupBuckets(input_folder=str(w / "sigs"), output_folder=str(w / "buckets"),
                            config=cfg),
    ], tasks=cfg.num_buckets, workers=a.workers, logging_dir=str(w / "logs2"),
        skip_completed=False).run()
    LocalPipelineExecutor(pipeline=[
        MinhashDedupCluster(input_folder=str(w / "buckets"), output_folder=str(w / "remove"),
                            config=cfg),
    ], tasks=1, workers=1, logging_dir=str(w / "logs3"), skip_completed=False).run()
    LocalPipelineExecutor(pipeline=[
        JsonlReader(str(w / "kept")),
        MinhashDedupFilter(input_folder=str(w / "remove")),
        JsonlWriter(str(w / "out"), compression=None),
    ], tasks=a.tasks, workers=a.workers, logging_dir=str(w / "logs4"),
        skip_completed=False).run()

    def lines(folder: Path) -> int:
        return sum(len(p.read_text().splitlines()) for p in folder.glob("*.jsonl"))

    print(json.dumps({"read": lines(a.corpus), "kept_gopher": lines(w / "kept"),
                      "kept": lines(w / "out")}))


if __name__ == "__main__":
    main()
