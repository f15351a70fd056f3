"""Core subcommands: run, check, inspect, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from gristmill.pipeline.recipe import RecipeError, check_recipe, load_recipe


def _run(args: argparse.Namespace) -> int:
    from gristmill.pipeline.runner import OutputLocked, run_recipe

    try:
        manifest = run_recipe(args.recipe, fresh=args.fresh, engine=args.engine,
                              workers=args.workers, progress=not args.quiet)
    except (RecipeError, OutputLocked) as e:
        print(f"gristmill: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - faults of the machine end in one line
        line = fault_line(e)
        if line is None:
            raise
        print(f"gristmill: {line}", file=sys.stderr)
        return 1
    _print_summary(manifest, Path(load_recipe(args.recipe).output_dir))
    return 0


def fault_line(exc: BaseException) -> str | None:
    """One line for a fault of the machine (disk full, permission denied, a vanished
    or changing input), found anywhere in the exception's chain, also when a pool
    worker, a Dask worker or a Beam runner raised it; None for a bug (re-raised)."""
    from gristmill.pipeline.inputs import InputChangedDuringRun

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, InputChangedDuringRun):
            return str(e)
        if isinstance(e, OSError) and e.errno is not None:
            cause = os.strerror(e.errno) if e.errno > 0 else (e.strerror or str(e))
            where = e.filename or "(a file of the output)"
            return (f"{cause}: {where}. What was completed is kept; fix the cause and run "
                    f"the same command again to resume")
        e = e.__cause__ or e.__context__
    return None


def _check(args: argparse.Namespace) -> int:
    try:
        recipe = load_recipe(args.recipe)
        lines = check_recipe(recipe)
    except RecipeError as e:
        print(f"gristmill: {e}", file=sys.stderr)
        return 2
    print(f"{args.recipe}: OK")
    for line in lines:
        print(f"  {line}")
    return 0


def _print_summary(manifest: dict, out: Path) -> None:
    from gristmill.pipeline.model_cache import describe

    c = manifest["counts"]
    added = f"  repeated {c['added']:,}" if c.get("added") else ""
    print(f"{manifest['name']}: read {c['read']:,}  kept {c['kept']:,}  dropped {c['dropped']:,}  "
          f"rejected {c['rejected']:,}{added}  "
          f"({'reconciled' if c['reconciled'] else 'NOT RECONCILED'})")
    width = max([len(s["stage"]) for s in c["stages"]] + [5])
    for s in c["stages"]:
        reasons = ", ".join(f"{r}={n:,}" for r, n in s["dropped_by_reason"].items())
        rep = f"  repeated {s['added']:,}" if s.get("added") else ""
        print(f"  {s['stage']:<{width}}  in {s['in']:>10,}  kept {s['kept']:>10,}"
              f"  dropped {s['dropped']:>9,}{rep}  {reasons}")
    total = sum(sh["bytes"] for sh in manifest["shards"])
    print(f"  shards: {len(manifest['shards'])} ({total / 1e6:,.1f} MB) in {out / 'shards'}")
    if manifest.get("rejects"):
        print(f"  rejects: {c['rejected']:,} records in {out / 'rejects'}")
    ids = manifest.get("ids") or {}
    if ids.get("repeated_ids"):
        first = ids["examples"][0] if ids.get("examples") else None
        where = f"; e.g. {first['id']!r} at {', '.join(first['at'])}" if first else ""
        print(f"  ids: {ids['repeated_ids']:,} ids repeat over "
              f"{ids['records_with_repeated_id']:,} records (counted, never used to drop: "
              f"records are tracked by file and line){where}")
    for pin in manifest.get("models") or []:
        # the version of every model, tokenizer and list the run loaded (pinned at plan time)
        size = sum(int(f[1]) for f in pin["files"])
        what = pin["files"][0][2] if len(pin["files"]) == 1 else f"{len(pin['files'])} files"
        print(f"  model: {describe(pin.get('stage'), pin['field'])}: {pin['path']} "
              f"({size:,} bytes, {what}; fingerprint {pin['fingerprint'][:16]})")
    for conflict in manifest.get("schema_conflicts") or []:
        from gristmill.pipeline.carried_schema import describe_conflict

        print(f"  schema: {describe_conflict(conflict)}")
    bad = [f for f in manifest["files"] if f.get("status") not in (None, "ok")]
    for f in bad:
        print(f"  file {f['path']}: {f['status']} ({f.get('error')})")
    if (out / "report.html").exists():
        print(f"  report: {out / 'report.html'}")


def _inspect(args: argparse.Namespace) -> int:
    from gristmill.pipeline import inspection

    out = Path(args.output)
    try:
        manifest, stats = inspection.load_output(out)
        samples = None
        if args.sample is not None:
            samples = inspection.sample_records(manifest, stats, args.sample, args.stage,
                                                args.reason)
        elif args.stage or args.reason:
            raise inspection.OutputError("--stage and --reason select samples: add --sample N")
    except inspection.OutputError as e:
        print(f"gristmill: {e}", file=sys.stderr)
        return 2
    if args.json:
        body = {"name": manifest["name"], "counts": manifest["counts"],
                "timings": manifest.get("timings", {})}
        if samples is not None:
            body["samples"] = samples
        print(json.dumps(body, indent=2, ensure_ascii=False))
        return 0
    if samples is not None:
        print("\n".join(inspection.format_samples(samples, args.sample)))
        return 0
    _print_summary(manifest, out)
    for line in inspection.timing_lines(manifest):
        print(line)
    return 0


def _diff(args: argparse.Namespace) -> int:
    from gristmill.pipeline import inspection

    try:
        d = inspection.diff_outputs(args.a, args.b, examples=args.examples)
    except inspection.OutputError as e:
        print(f"gristmill: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(d, indent=2, ensure_ascii=False))
    else:
        print("\n".join(inspection.format_diff(d)))
    return 0


def run_demo(root: Path, engine: str | None = None, workers: int | None = None) -> int:
    """Build the corpus under ``root/data/demo`` and run ``root/recipes/demo.yaml``.

    The recipe is copied there from the package first (:mod:`gristmill.recipes`),
    unless the folder has one already: an edited copy is used, and said so.
    The output lands in ``root/out/demo``.
    """
    from gristmill import recipes
    from gristmill.pipeline.demo import build_demo_corpus
    from gristmill.pipeline.recipe import load_recipe
    from gristmill.pipeline.runner import run_recipe

    installed = recipes.install(["demo"], root)[0]
    recipe_path = installed.path
    if installed.status == "edited":
        print(f"using {recipe_path}: it differs from the shipped demo recipe "
              f"(delete it to get the shipped one back)")
    data = build_demo_corpus(Path(root) / "data" / "demo")
    print(f"demo corpus: {data} ({len(list(data.glob('*.json*')))} files)")
    recipe = load_recipe(recipe_path)
    out = recipe.output_dir
    old = out / "manifest.json"
    # the demo is disposable: an output of an edited recipe is replaced, not refused
    fresh = old.exists() and json.loads(old.read_text()).get("fingerprint") != recipe.fingerprint()
    manifest = run_recipe(recipe_path, engine=engine, workers=workers, fresh=fresh)
    _print_summary(manifest, out)
    print(f"\nThe recipe: {recipe_path}  (edit it and `gristmill run` it again)")
    print(f"Open the report: {out / 'report.html'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gristmill.pipeline.runner import OutputLocked

    try:
        return run_demo(Path(args.root), engine=args.engine, workers=args.workers)
    except (RecipeError, OutputLocked) as e:  # an edited copy of the recipe, a busy output
        print(f"gristmill: {e}", file=sys.stderr)
        return 2


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a recipe (resumes an interrupted run by default)",
                       description="Run a recipe end to end. An interrupted run in the same "
                       "output folder is resumed; --fresh starts over.")
    p.add_argument("recipe", help="path to a YAML recipe")
    p.add_argument("--engine", choices=["local", "dask", "beam"], help="override engine.kind")
    p.add_argument("--workers", type=int, help="override engine.workers")
    p.add_argument("--fresh", action="store_true", help="delete earlier output and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)

    p = sub.add_parser("check", help="validate a recipe and its inputs without reading data",
                       description="Validate the recipe (fields, stage parameters, columns) and "
                       "that every input exists. Reads no data. Exit 2 on an error.")
    p.add_argument("recipe", help="path to a YAML recipe")
    p.set_defaults(func=_check)

    p = sub.add_parser("inspect", help="counts, time and sample records of a finished output",
                       description="Summarize an output folder from its manifest: counts per "
                       "stage with drop reasons, time per stage, shards, bytes, rejects; with "
                       "--sample, records each stage kept and dropped.")
    p.add_argument("output", help="the output folder of a run")
    p.add_argument("--sample", type=int, metavar="N",
                   help="print up to N sample records per stage and fate (kept, each reason)")
    p.add_argument("--stage", help="with --sample: only this stage")
    p.add_argument("--reason", help="with --sample: only this drop reason ('kept' for kept)")
    p.add_argument("--json", action="store_true",
                   help="print counts, timings (and samples) as JSON")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("diff", help="records one run kept and another did not",
                       description="Compare two finished outputs record by record (matched by "
                       "input file and line): which records each kept that the other did not, "
                       "grouped by the stage and reason that dropped them in the other run "
                       "(known where that run wrote dropped/).")
    p.add_argument("a", help="output folder A")
    p.add_argument("b", help="output folder B")
    p.add_argument("--examples", type=int, default=3, help="examples per group (default 3)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.set_defaults(func=_diff)

    p = sub.add_parser("demo", help="build the demo corpus and run recipes/demo.yaml",
                       description="Build a small multi-domain corpus from the Python standard "
                       "library (no network) and run the demo recipe on it. Works in any "
                       "folder: the shipped recipe is copied to OUT/recipes/demo.yaml (an "
                       "existing copy is used), the corpus goes to OUT/data/demo, the output "
                       "to OUT/out/demo.")
    p.add_argument("--out", "--root", dest="root", default=".",
                   help="working folder for recipes/, data/ and out/ (default: the current one)")
    p.add_argument("--engine", choices=["local", "dask", "beam"], help="override engine.kind")
    p.add_argument("--workers", type=int, help="override engine.workers")
    p.set_defaults(func=_demo)
