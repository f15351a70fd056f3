"""What the report's observations cost: the demo recipe on the demo corpus with
per-stage timing, samples and score distributions on (``observe.ENABLED``) and
off, alternating in one process, plus the time to render report.html.

Prints the CPU seconds of each run (``time.process_time``; ``workers: 1``, so
the whole run is in this process), the median of each arm and their ratio,
and what the run itself attributes to ``(observe)``. CPU time, not wall time,
because this machine is shared and wall time counts waiting for a core.

    python benchmarks/bench_observe.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from gristmill.pipeline import observe
from gristmill.pipeline.demo import build_demo_corpus
from gristmill.pipeline.recipe import load_recipe
from gristmill.pipeline.report import write_report
from gristmill.pipeline.runner import run_recipe

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(__file__).resolve().parent / "_work" / "observe"


def one_run(recipe_path: Path, out: Path, enabled: bool) -> tuple[float, float, dict]:
    observe.ENABLED = enabled
    recipe = load_recipe(recipe_path, {"engine.workers": 1})
    recipe = recipe.model_copy(update={"output": recipe.output.model_copy(
        update={"path": str(out)})})
    c0, w0 = time.process_time(), time.perf_counter()
    manifest = run_recipe(recipe, fresh=True, progress=False, report=False)
    return time.process_time() - c0, time.perf_counter() - w0, manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    corpus = build_demo_corpus(WORK / "data" / "demo")
    recipe_src = ROOT / "gristmill" / "recipes" / "demo.yaml"
    if not recipe_src.exists():
        recipe_src = ROOT / "recipes" / "demo.yaml"
    recipe_path = WORK / "recipes" / "demo.yaml"
    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(recipe_src.read_text())
    print(f"corpus: {corpus}; recipe: {recipe_src} (workers 1)")
    one_run(recipe_path, WORK / "out-warmup", True)  # imports, the native kernel build, caches
    cpu = {True: [], False: []}
    for r in range(args.repeats):
        for enabled in (r % 2 == 0, r % 2 != 0):  # alternate which arm goes first
            c, w, m = one_run(recipe_path, WORK / f"out-{enabled}", enabled)
            cpu[enabled].append(c)
            own = next((t for t in m["timings"]["stages"] if t["stage"] == "(observe)"), None)
            print(f"  repeat {r} observe={'on ' if enabled else 'off'}  CPU {c:7.2f} s  "
                  f"wall {w:7.2f} s  kept {m['counts']['kept']:,}"
                  + (f"  (observe) CPU {own['cpu_s']:.2f} s" if own else ""))
    observe.ENABLED = True
    on, off = statistics.median(cpu[True]), statistics.median(cpu[False])
    print(f"median CPU s: observe on {on:.2f}, off {off:.2f}, on/off = {on / off:.3f}")
    ratios = sorted(a / b for a, b in zip(cpu[True], cpu[False], strict=True))
    print("paired on/off per repeat: " + ", ".join(f"{r:.3f}" for r in ratios)
          + f" (min {ratios[0]:.3f}, max {ratios[-1]:.3f})")
    out = WORK / "out-True"
    manifest = json.loads((out / "manifest.json").read_text())
    stats = json.loads((out / "stats.json").read_text())
    c0 = time.process_time()
    path = write_report(out, manifest, stats)
    print(f"report.html: rendered in {time.process_time() - c0:.2f} CPU s, "
          f"{path.stat().st_size / 1e3:,.0f} KB; stats.json {(out / 'stats.json').stat().st_size / 1e3:,.0f} KB")


if __name__ == "__main__":
    main()
