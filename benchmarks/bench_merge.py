"""Merging per-task summaries of a global stage: left fold vs the tree merge (issue 11).

``top_fraction`` keeps (score, characters, tie hash) per record, 24 bytes, and
its ``merge`` concatenates. The engines used to fold the task summaries left
to right, ``merge(merge(s1, s2), s3)...``, which copies everything merged so
far at every step (quadratic in the number of tasks); ``stage.merge_all`` now
merges neighbours of equal size (a binary counter), copying each record
``log2 k`` times. Both are run here on the same summaries, with one
``np.concatenate`` of everything as the floor, and the two results are checked
equal.

    .venv/bin/python benchmarks/bench_merge.py [--tasks 400] [--records 10000000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from gristmill.pipeline.stage import merge_all
from gristmill.selectors.top_fraction import TopFraction


def left_fold(stage, summaries):
    """The merge the engines did before: one fold, in task order."""
    acc = None
    for s in summaries:
        acc = s if acc is None else stage.merge(acc, s)
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=400)
    ap.add_argument("--records", type=int, default=10_000_000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    per = args.records // args.tasks
    stage = TopFraction({"column": "score", "fraction": 0.5})
    summaries = [(rng.random(per), rng.integers(1, 5000, per, dtype=np.int64),
                  rng.integers(0, 2**63, per, dtype=np.uint64)) for _ in range(args.tasks)]
    mb = sum(sum(a.nbytes for a in s) for s in summaries) / 1e6
    print(f"{args.tasks} task summaries, {per * args.tasks:,} records, {mb:,.0f} MB")

    t = time.perf_counter()
    floor = tuple(np.concatenate([s[i] for s in summaries]) for i in range(3))
    t_floor = time.perf_counter() - t
    del floor
    t = time.perf_counter()
    tree = merge_all(stage, summaries)
    t_tree = time.perf_counter() - t
    t = time.perf_counter()
    fold = left_fold(stage, summaries)
    t_fold = time.perf_counter() - t
    assert all(np.array_equal(a, b) for a, b in zip(tree, fold, strict=True))
    print(f"one concatenate (floor)  {t_floor:8.2f} s")
    print(f"left fold (before)       {t_fold:8.2f} s")
    print(f"tree merge (merge_all)   {t_tree:8.2f} s")
    print(f"speedup fold / tree      {t_fold / t_tree:8.1f}x; results identical")


if __name__ == "__main__":
    main()
