"""top_fraction's two methods at scale: the exact spilled merge vs the KLL sketch (issue 11).

Per-task summaries of ``--rows`` records (normal scores, lognormal character
weights, a few heavy records) are built in ``--tasks`` tasks by a pool of
``--workers`` processes and spilled through ``TopFraction.spill_summary``, as
an engine does: the exact method writes every record (24 bytes), sorted; the
sketch writes one ``WeightedKLL`` per task. Then ``finalize_spilled``, the
driver's part, runs in a fresh Python process per method, which reports its
wall time and peak RSS (``ru_maxrss``) and the RSS it had before finalizing
(imports). Last, the weight each method's threshold actually keeps is counted
over all records (``apply``'s rule) and compared with ``fraction * W``.

Printed per method: spill (worker) CPU seconds and bytes on disk, driver wall
and peak RSS, kept-weight fraction, its error against the target and the
sketch's reported bound; then the ratios sketch / exact. The load average is
printed at the start and the end (the machine is shared).

    .venv/bin/python benchmarks/bench_top_fraction.py [--rows 20000000] [--tasks 200]
        [--epsilon 0.001] [--fraction 0.3] [--workers 2] [--fan-in F] [--methods exact]

``--fan-in`` sets how many files the exact merge takes at once (``FAN_IN``,
64): ``--fan-in 100000`` is the single-pass merge, to compare with the
multi-pass one at many tasks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

WORK = Path(__file__).resolve().parent / "_work" / "bench_top_fraction"


def task_records(task: int, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One task's (score, weight, tie hash), reproducible from (seed, task)."""
    rng = np.random.default_rng([seed, task])
    s = rng.normal(size=rows)
    w = np.minimum(rng.lognormal(6.5, 1.2, rows), 2e6).astype(np.int64)
    w[rng.random(rows) < 2e-6] = 2_000_000  # a few very long documents
    s[rng.random(rows) < 1e-3] = np.nan  # missing scores rank last, as _keys makes them
    s = np.where(np.isnan(s), -np.inf, s)
    tie = rng.integers(0, 2**64 - 1, rows, dtype=np.uint64, endpoint=True)
    return s, w, tie


def _stage(method: str, fraction: float, epsilon: float):
    from gristmill.selectors.top_fraction import TopFraction

    params = {"column": "s", "fraction": fraction, "method": method}
    if method == "sketch":
        params["epsilon"] = epsilon
    return TopFraction(params, seed=1)


def spill_task(args: tuple) -> tuple[float, int]:
    method, task, rows, seed, fraction, epsilon, folder = args
    summary = task_records(task, rows, seed)
    stage = _stage(method, fraction, epsilon)
    c0 = time.process_time()
    path = Path(folder) / f"task-{task:05d}.spill"
    with open(path, "wb") as sink:
        stage.spill_summary(summary, sink)
    return time.process_time() - c0, path.stat().st_size


def driver(method: str, folder: str, tasks: int, fraction: float, epsilon: float,
           fan_in: int | None) -> None:
    """The engine's barrier: finalize_spilled over the task files, in task order."""
    import gristmill.selectors.top_fraction as tf

    if fan_in:
        tf.FAN_IN = fan_in
    stage = _stage(method, fraction, epsilon)
    paths = [Path(folder) / f"task-{t:05d}.spill" for t in range(tasks)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    state = stage.finalize_spilled([lambda p=p: open(p, "rb") for p in paths])
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"wall": wall, "rss_before_kb": before, "rss_peak_kb": peak,
                      "state": {k: (v if not isinstance(v, float) or np.isfinite(v) else str(v))
                                for k, v in state.items()}}))


def kept_weight(args: tuple) -> int:
    task, rows, seed, score, tie = args
    s, w, t = task_records(task, rows, seed)
    keep = (s > score) | ((s == score) & (t <= np.uint64(tie)))
    return int(w[keep].sum())


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000_000)
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--epsilon", type=float, default=0.001)
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fan-in", type=int, default=None,
                    help="files the exact merge takes at once (default: top_fraction.FAN_IN)")
    ap.add_argument("--methods", nargs="+", default=["exact", "sketch"])
    ap.add_argument("--driver-timeout", type=float, default=None,
                    help="give up on a driver after this many seconds (and say so)")
    ap.add_argument("--driver", nargs=2, metavar=("METHOD", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.driver:
        driver(args.driver[0], args.driver[1], args.tasks, args.fraction, args.epsilon,
               args.fan_in)
        return
    per = args.rows // args.tasks
    print(f"bench_top_fraction: {per * args.tasks:,} records in {args.tasks} tasks, "
          f"fraction {args.fraction}, epsilon {args.epsilon}; cpus {os.cpu_count()}, "
          f"load average {loadavg()}", flush=True)
    shutil.rmtree(WORK, ignore_errors=True)
    results = {}
    with Pool(args.workers) as pool:
        for method in args.methods:
            folder = WORK / method
            folder.mkdir(parents=True)
            t0 = time.perf_counter()
            spilled = pool.map(spill_task, [(method, t, per, args.seed, args.fraction,
                                             args.epsilon, str(folder))
                                            for t in range(args.tasks)])
            spill_wall = time.perf_counter() - t0
            try:
                out = subprocess.run([sys.executable, __file__, "--tasks", str(args.tasks),
                                      "--fraction", str(args.fraction), "--epsilon",
                                      str(args.epsilon), "--driver", method, str(folder)]
                                     + (["--fan-in", str(args.fan_in)] if args.fan_in else []),
                                     capture_output=True, text=True, check=True,
                                     timeout=args.driver_timeout)
            except subprocess.TimeoutExpired:
                print(f"{method:>6}: driver did not finish in {args.driver_timeout:.0f} s "
                      f"(stopped); load {loadavg()}", flush=True)
                shutil.rmtree(folder)
                continue
            d = json.loads(out.stdout)
            st = d["state"]
            kept = sum(pool.map(kept_weight, [(t, per, args.seed, float(st["score"]), st["tie"])
                                               for t in range(args.tasks)]))
            total = st["total_weight"]
            results[method] = r = {
                "spill_cpu": sum(c for c, _ in spilled), "spill_wall": spill_wall,
                "bytes": sum(b for _, b in spilled), "wall": d["wall"],
                "rss_before": d["rss_before_kb"] / 1024, "rss_peak": d["rss_peak_kb"] / 1024,
                "kept_fraction": kept / total,
                "error": kept / total - args.fraction,
                "bound": st.get("error_bound_fraction", 0.0),
                "retained": st.get("retained_items", per * args.tasks)}
            print(f"{method:>6}: spill {r['spill_cpu']:.1f} CPU s ({r['spill_wall']:.1f} s wall), "
                  f"{r['bytes'] / 2**20:,.1f} MiB on disk; driver {r['wall']:.2f} s, peak RSS "
                  f"{r['rss_peak']:.0f} MB ({r['rss_before']:.0f} MB after imports); kept "
                  f"{r['kept_fraction']:.6f} of the weight, error {r['error']:+.2e} "
                  f"(reported bound {r['bound']:.2e}); records held {r['retained']:,}; "
                  f"load {loadavg()}", flush=True)
            shutil.rmtree(folder)
    if set(results) != {"exact", "sketch"}:
        return
    e, s = results["exact"], results["sketch"]
    print(f"sketch / exact: driver wall {s['wall'] / e['wall']:.3f}x, driver peak RSS "
          f"{s['rss_peak'] / e['rss_peak']:.3f}x (above imports: "
          f"{(s['rss_peak'] - s['rss_before']) / max(e['rss_peak'] - e['rss_before'], 1e-9):.3f}x), "
          f"spill CPU {s['spill_cpu'] / e['spill_cpu']:.3f}x, bytes "
          f"{s['bytes'] / e['bytes']:.5f}x; |error| sketch {abs(s['error']):.2e} "
          f"(bound {s['bound']:.2e}) vs exact {abs(e['error']):.2e}, sketch - exact kept "
          f"{s['kept_fraction'] - e['kept_fraction']:+.2e} of the weight; "
          f"load average {loadavg()}")


if __name__ == "__main__":
    main()
