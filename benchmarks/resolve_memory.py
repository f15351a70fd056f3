"""Peak memory of dedup's ``resolve`` per distinct duplicate pair (issue 11).

Builds the reduced edges a dedup barrier's partitions hand to
``resolve_parts``, shaped like bench_scale's corpus: clusters of 2-3 records
(5% exact and 5% near duplicates), MinHash-style copies of every verified pair
(``--copies``, 5.7 on bench_scale's corpus: a pair is verified once per
partition where it shares a band) spread over ``--partitions`` partitions; exact
dedup's edges are stars, one per member. Each policy resolves in a fresh
process, reading the partitions one at a time as the engines do, and the
script prints the peak RSS growth and bytes per distinct pair.

    .venv/bin/python benchmarks/resolve_memory.py --pairs 7000 56000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

CHILD = r"""
import json, resource, sys
import numpy as np, pyarrow as pa
from gristmill.selectors.dedup import EDGES_SCHEMA, ExactDedup
from gristmill.selectors.minhash import MinHashDedup
policy, pairs, copies, partitions = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
# survivors and members with distinct row keys; scores: survivors longer
surv = rng.choice(2**40, size=pairs, replace=False).astype(np.uint64) * np.uint64(2)
member = surv + np.uint64(1)
n_copies = np.ones(pairs, np.int64)
if policy == "minhash":
    extra = copies - 1
    n_copies += rng.poisson(extra, pairs)
w = np.repeat(member, n_copies); b = np.repeat(surv, n_copies)
part = rng.integers(0, partitions, w.size)
stage = ExactDedup() if policy == "exact" else MinHashDedup()
def tables():
    for p in range(partitions):
        m = part == p
        yield pa.Table.from_arrays([pa.array(w[m]), pa.array(np.full(m.sum(), 1.0)),
                                    pa.array(b[m]), pa.array(np.full(m.sum(), 2.0))],
                                   schema=EDGES_SCHEMA)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
state = stage.resolve_parts(tables())
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(json.dumps({"edges": int(w.size), "dropped": state.num_rows, "grew": grew}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, nargs="+", default=[7_000, 56_000])
    ap.add_argument("--copies", type=float, default=5.7)
    ap.add_argument("--partitions", type=int, default=50)
    a = ap.parse_args()
    print(f"peak RSS ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB "
          "in this parent (each resolve runs in a fresh child)")
    for policy in ("exact", "minhash"):
        for n in a.pairs:
            out = subprocess.run([sys.executable, "-c", CHILD, policy, str(n), str(a.copies),
                                  str(a.partitions)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{policy:8s} {n:>9,} distinct pairs, {r['edges']:>10,} edges in "
                  f"{a.partitions} partitions: resolve peak +{r['grew'] / 2**20:.1f} MB = "
                  f"{r['grew'] / n:.0f} bytes a distinct pair")


if __name__ == "__main__":
    main()
