"""Driver memory by phase of the bench_scale recipe (issue 11): where the driver's
peak RSS grows with the corpus.

Runs the recipe of ``bench_scale.py`` on its corpus ``--base-mb`` x ``--size``
(written by ``bench_scale.py`` under ``benchmarks/_work/scale``) in this process
(the driver; ``workers: 2`` below it) and prints the driver's peak and current
RSS before and after every barrier (``finish_barrier``), the commit and the
repeated-id count, so two sizes show which phase grows.

    .venv/bin/python benchmarks/driver_memory_phases.py 200 1
    .venv/bin/python benchmarks/driver_memory_phases.py 200 4
"""
import resource
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import bench_scale as b  # noqa: E402

import gristmill.pipeline.engines.local as local  # noqa: E402
import gristmill.pipeline.runner as runner  # noqa: E402
from gristmill.pipeline.recipe import parse_recipe  # noqa: E402


def rss(tag: str) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cur = int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    print(f"{time.strftime('%H:%M:%S')} {tag}: peak {peak:.0f} MB, now {cur:.0f} MB", flush=True)



def wrap(mod, name: str) -> None:
    orig = getattr(mod, name)
    def f(*a, **k):
        rss(f"before {name} {getattr(a[4], 'name', '') if name == 'finish_barrier' else ''}")
        out = orig(*a, **k)
        rss(f"after {name}")
        return out
    setattr(mod, name, f)



def main() -> None:
    base_mb, size = float(sys.argv[1]), int(sys.argv[2])
    corpus = b.ROOT / f"corpus-{base_mb:g}mb-x{size}"
    docs = int((corpus / "DONE").read_text())
    body = b.recipe(corpus, b.ROOT / f"prof-{base_mb:g}-x{size}", docs, 2)
    wrap(local, "finish_barrier")
    wrap(runner, "_commit")
    wrap(runner, "repeated_ids")
    runner.run_recipe(parse_recipe(body), fresh=True, progress=False, report=False)
    rss("end")


if __name__ == "__main__":
    main()
