"""Run a recipe: check, lock, resume, execute on an engine, commit, report.

The output folder::

    OUTPUT/
      shards/part-NNNNN.parquet   kept records (zstd, size-capped)
      manifest.json               shards with rows/bytes/sha256, schema, recipe, counts
      stats.json, report.html     funnel, histograms, domain shares
      rejects/                    unparseable input, with file, line and reason
      dropped/                    id, stage and reason of every drop (write_dropped)
      artifacts/<stage>/          files a global stage published (schedules, ...)
      tokenized/                  Megatron .bin/.idx token shards (output.tokenize)
      _work/                      in-progress state; removed when the run completes

A run killed at any point and started again skips completed tasks and ends
with the same output as an uninterrupted run.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import gristmill
from gristmill.pipeline import carried_schema, storage
from gristmill.pipeline.engines.local import EngineResult, LocalEngine
from gristmill.pipeline.execution import (
    LENGTH_BINS,
    TaskStats,
    reason_totals,
    shuffle_partitions_for,
)
from gristmill.pipeline.inputs import (
    id_ledger_path,
    input_changes,
    listing,
    refuse_changed_inputs,
    repeated_ids,
)
from gristmill.pipeline.model_cache import pin_changes, plan_pins, refuse_changed_models
from gristmill.pipeline.observe import barrier_times, merge_timings, stage_timings
from gristmill.pipeline.readers import InputTask
from gristmill.pipeline.recipe import Recipe, RecipeError, check_recipe, load_recipe
from gristmill.pipeline.splits import empty_reject, merge_files, plan_splits, split_tasks
from gristmill.pipeline.writers import atomic_write_bytes, atomic_write_json

OUTPUT_ENTRIES = ("shards", "rejects", "dropped", "artifacts", "tokenized", "_work",
                  "manifest.json", "stats.json", "report.html")


class OutputLocked(RuntimeError):
    """Another live run holds the output folder."""


class OutputLock:
    """An exclusive ``flock`` on a lock file in the output folder.

    The kernel releases the lock when its holder dies (even by ``kill -9``), so a
    stale lock is never "taken over" by reading and deleting it, which two runs
    could both do at once. The file holds the holder's pid and host for the
    message a second run prints. Release unlinks the file while still holding the
    lock; a run that opened the old file sees that its inode is gone and retries.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".gristmill.lock"
        self.held = False
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(100):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    other = json.loads(os.read(fd, 4096) or b"{}")
                except (OSError, json.JSONDecodeError):
                    other = {}
                os.close(fd)
                raise OutputLocked(
                    f"output folder {self.path.parent} is in use by another gristmill run "
                    f"(pid {other.get('pid', '?')} on {other.get('host', '?')}); wait for it "
                    f"to finish") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder unlinked it after we opened it
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(me).encode())
            self._fd = fd
            self.held = True
            return
        raise OutputLocked(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
            self.held = False

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def check(self) -> None:
        """The kernel lock cannot be lost while held."""


def output_lock(folder: Path):
    """``OutputLock`` for a local folder, ``object_lock.ObjectLock`` on an object store."""
    if storage.is_remote(folder):
        from gristmill.pipeline.object_lock import ObjectLock

        return ObjectLock(folder, OutputLocked)
    return OutputLock(folder)


def list_tasks(recipe: Recipe) -> list[InputTask]:
    tasks = []
    for i in range(len(recipe.sources)):
        for path, fmt in recipe.source_files(i):
            tasks.append(InputTask(index=len(tasks), source_index=i, path=str(path), format=fmt,
                                   label=recipe.source_label(i, path),
                                   size=storage.size(path),
                                   file_label=recipe.file_label(path)))
    return tasks


def make_engine(recipe: Recipe, progress: bool):
    kind = recipe.engine.kind
    if kind == "local":
        return LocalEngine(recipe, progress=progress)
    if kind == "dask":
        from gristmill.pipeline.engines.dask import DaskEngine

        return DaskEngine(recipe, progress=progress)
    if kind == "beam":
        from gristmill.pipeline.engines.beam import BeamEngine

        return BeamEngine(recipe, progress=progress)
    raise RecipeError(f"recipe error at engine.kind: {kind!r}; valid: local, dask, beam")


def _clear_output(out: Path) -> None:
    for name in OUTPUT_ENTRIES:
        p = out / name
        if storage.is_dir(p):
            storage.remove_tree(p)
        elif p.exists():
            storage.remove(p)


def _move(src: Path, dst: Path) -> None:
    """Idempotent commit move: done when the source is gone and the target is there.
    On an object store this is the publish step (copy to the final key, delete the
    temporary one); the manifest, written after every move, is the commit point."""
    if src.exists():
        storage.replace(src, dst)
    elif not dst.exists():
        raise RuntimeError(f"lost output: neither {src} nor {dst} exists")


def run_recipe(recipe: Recipe | str | Path, *, fresh: bool = False, engine: str | None = None,
               workers: int | None = None, progress: bool = True,
               report: bool = True) -> dict[str, Any]:
    """Run a recipe to completion and return its manifest.

    Parameters
    ----------
    recipe : Recipe or path to a YAML recipe
    fresh : delete any earlier output or partial run in the output folder first
    engine, workers : override ``engine.kind`` / ``engine.workers``
    progress : show progress bars
    report : write ``report.html`` (plots) beside ``stats.json``
    """
    overrides: dict[str, Any] = {}
    if engine is not None:
        overrides["engine.kind"] = engine
    if workers is not None:
        overrides["engine.workers"] = workers
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        eng = recipe.engine.model_copy(update={k.split(".")[1]: v for k, v in overrides.items()})
        recipe = recipe.model_copy(update={"engine": eng})
    check_recipe(recipe)  # everything checkable before any data is read
    out = recipe.output_dir
    fingerprint = recipe.fingerprint()
    t0 = time.time()
    with output_lock(out) as lock:
        if fresh:
            _clear_output(out)
        manifest_path = out / "manifest.json"
        work = out / "_work"
        run_info = work / "run.json"
        if manifest_path.exists():
            old = json.loads(manifest_path.read_text())
            if old.get("fingerprint") != fingerprint:
                raise RecipeError(
                    f"{out} holds the output of a different recipe (fingerprint "
                    f"{old.get('fingerprint', '?')[:12]} vs {fingerprint[:12]}); use --fresh to "
                    f"replace it or choose another output.path")
            if not work.exists():
                if "models" in old:  # an output made before models were pinned has none
                    refuse_changed_models(pin_changes(old["models"], recipe), out, "output")
                recorded = [{**f, "path": str(recipe.resolve(f["path"]))}
                            for f in old.get("files", [])]
                refuse_changed_inputs(input_changes(recorded, list_tasks(recipe),
                                                    check_hash=True), out, "output")
                return old  # complete already, on the same inputs
        files = list_tasks(recipe)
        if run_info.exists():
            prev = json.loads(run_info.read_text())
            if prev.get("fingerprint") != fingerprint:
                raise RecipeError(
                    f"{out} holds a partial run of a different recipe; use --fresh to start over")
            pins = prev.get("models")
            if pins is None:  # a run started before models were pinned
                pins = plan_pins(recipe)
            refuse_changed_models(pin_changes(pins, recipe), out, "partial run")
            refuse_changed_inputs(input_changes(prev.get("inputs", []), files), out,
                                  "partial run")
            plans = prev.get("splits", {})  # the plan of the run it resumes, not a new pass
        else:
            pins = plan_pins(recipe)  # every model's version, before any data is read
            # one planning task per big file on the engine's workers; each records its
            # plan in _work/plans, so a pass killed half-way is not redone for those files
            # (the engine is made only when a file is to be planned: a Dask engine
            # would start its cluster for nothing)
            plans = plan_splits(files, recipe.engine.split_size,
                                lambda fn, args: make_engine(recipe, progress).map_files(fn, args),
                                work / "plans")
            atomic_write_json(run_info, {"fingerprint": fingerprint, "inputs": listing(files),
                                         "splits": plans, "models": pins})
        recipe = recipe.with_pins(pins)  # workers load exactly these versions
        tasks = split_tasks(files, plans)
        if recipe.engine.shuffle_partitions is None:  # from the input size, never the workers
            parts = shuffle_partitions_for(sum(t.size for t in tasks))
            recipe = recipe.model_copy(update={"engine": recipe.engine.model_copy(
                update={"shuffle_partitions": parts})})
        carried_schema.prepare(recipe, tasks, work)  # one type per carried column
        result = make_engine(recipe, progress).execute(tasks, work)
        lock.check()  # an object-store lock taken over by another run: publish nothing
        manifest = _commit(recipe, out, tasks, result, fingerprint, t0)
        if report:
            from gristmill.pipeline.report import write_report

            write_report(out, manifest, json.loads((out / "stats.json").read_text()))
        storage.remove_tree(work)
        return manifest


def _publish_rejects(out: Path, tasks: list[InputTask], result: EngineResult,
                     files: list[dict[str, Any]]) -> list[str]:
    """Publish one rejects file per input file, ``rejects/part-<file index>.jsonl``:
    a file's task's file moved, or a split file's pieces' files concatenated in
    order (plus the ``empty`` line when no piece found a record). Idempotent: a
    published file is not written again, and its pieces are removed after it."""
    status = {f["index"]: f.get("status") for f in files}
    by_file: dict[int, list[Any]] = {}
    for tr in result.tasks:
        by_file.setdefault(tasks[tr.index].file_index, []).append(tr)
    published = []
    for index, trs in by_file.items():
        dst = out / "rejects" / f"part-{index:05d}.jsonl"
        srcs = [storage.as_path(tr.rejects_file) for tr in trs if tr.rejects_file]
        first = tasks[trs[0].index]
        if not first.is_piece:
            if srcs:
                _move(srcs[0], dst)
                published.append(str(dst.relative_to(out)))
            continue
        empty = status.get(index) == "empty"
        if not srcs and not empty:
            continue
        if not dst.exists():
            with storage.AtomicFile(dst) as sink:
                for src in srcs:
                    with storage.open_read(src) as f:
                        shutil.copyfileobj(f, sink.file, 8 << 20)
                if empty:
                    line = json.dumps(empty_reject(first), ensure_ascii=False) + "\n"
                    sink.file.write(line.encode())
        for src in srcs:
            storage.remove(src)
        published.append(str(dst.relative_to(out)))
    return published


def _selections(artifacts: dict[str, dict[str, bytes]],
                counts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per stage that published a ``threshold.json`` (``top_fraction``): its content
    (threshold, method, error bound) and the weight its ``apply`` kept, counted."""
    out = {}
    for name, files in sorted(artifacts.items()):
        if "threshold.json" in files:
            sel = json.loads(files["threshold.json"])
            c = counts.get(name, {})
            if "weight_in" in c:
                sel["selected_weight"] = c["weight_kept"]
                sel["selected_weight_fraction"] = (c["weight_kept"] / c["weight_in"]
                                                   if c["weight_in"] else 0.0)
            out[name] = sel
    return out


def _commit(recipe: Recipe, out: Path, tasks: list[InputTask], result: EngineResult,
            fingerprint: str, t0: float) -> dict[str, Any]:
    shards: list[dict[str, Any]] = []
    ext = "parquet" if recipe.output.format == "parquet" else "jsonl"
    for tr in result.tasks:
        for sh in tr.shards:
            name = f"part-{len(shards):05d}.{ext}"
            src = result.final_dir / f"task-{tr.index:05d}" / "shards" / sh["path"]
            _move(src, out / "shards" / name)
            shards.append({**sh, "path": f"shards/{name}"})
    # one entry and one rejects file per input file, whatever its number of tasks
    per_file = merge_files([tasks[tr.index] for tr in result.tasks],
                           [tr.file for tr in result.tasks])
    rejects_files, dropped_files = _publish_rejects(out, tasks, result, per_file), []
    for tr in result.tasks:
        for f in tr.dropped_files:
            seg = storage.as_path(f).parent.parent.name
            dst = out / "dropped" / f"{seg}-task-{tr.index:05d}.parquet"
            _move(storage.as_path(f), dst)
            dropped_files.append(str(dst.relative_to(out)))
    artifacts = []
    for stage, files in result.artifacts.items():
        for name, data in files.items():
            dst = out / "artifacts" / stage / name
            atomic_write_bytes(dst, data)
            artifacts.append(str(dst.relative_to(out)))
    stats = result.stats if result.stats is not None else TaskStats()
    for tr in result.tasks:
        stats.merge(tr.stats)
    merge_timings(stats.timings, barrier_times(result.final_dir.parent))
    files = per_file
    read = sum(f.get("records", 0) for f in files)
    rejected = sum(f.get("rejected", 0) for f in files)
    written = sum(s["rows"] for s in shards)
    dropped = sum(reason_totals(stats.counts).values())
    stage_counts = []
    for spec_stage in recipe.build_stages():
        c = stats.counts.get(spec_stage.name, {"in": 0, "kept": 0, "added": 0, "dropped": {}})
        stage_counts.append({"stage": spec_stage.name, "type": spec_stage.type_name,
                             "in": c["in"], "kept": c["kept"], "added": c.get("added", 0),
                             "dropped": sum(c["dropped"].values()),
                             "dropped_by_reason": dict(sorted(c["dropped"].items())),
                             **{k: c[k] for k in ("weight_in", "weight_kept") if k in c}})
    schema = carried_schema.manifest_schema(out, shards) \
        if recipe.output.format == "parquet" else []
    plan = carried_schema.load_plan(result.final_dir.parent)
    added = sum(c["added"] for c in stage_counts)
    counts = {"read": read, "rejected": rejected, "dropped": dropped, "added": added,
              "kept": written, "reconciled": read + added == written + dropped + rejected,
              "stages": stage_counts}
    manifest = {
        "gristmill_version": gristmill.__version__,
        "name": recipe.name,
        "fingerprint": fingerprint,
        "recipe": recipe.model_dump(mode="json", exclude={"base_dir"}),
        "shards": shards,
        "schema": schema,
        "schema_conflicts": plan.conflicts if plan is not None else [],
        "counts": counts,
        "ids": repeated_ids([id_ledger_path(result.final_dir.parent, t.index) for t in tasks],
                            {t.file_index: t.file_label for t in tasks}),
        "files": files,
        "models": recipe.pins,  # the version of every model, tokenizer and list used
        "rejects": rejects_files,
        "dropped": dropped_files,
        "artifacts": sorted(artifacts),
        "selections": _selections(result.artifacts, stats.counts),
        "timings": {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "seconds": round(time.time() - t0, 3), "engine": recipe.engine.kind,
                    "workers": recipe.engine.workers,
                    "stages": stage_timings(stats.timings, stage_counts, read, written)},
    }
    if recipe.output.tokenize is not None:  # before the manifest, which lists its files
        manifest["tokenized"] = _tokenize(recipe, out, shards)
    stats_json = {**stats.to_json(), "counts": counts, "length_bins": LENGTH_BINS.tolist()}
    atomic_write_json(out / "stats.json", stats_json)
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


TOKENIZED_EXTS = (".bin", ".dom.npy", ".domains.json", ".idx")  # .idx last: it completes


def _tokenize(recipe: Recipe, out: Path, shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Write ``tokenized/tokens.{bin,idx,dom.npy,domains.json}`` from the published
    shards and return the manifest's ``tokenized`` entry.

    The tokenizer may be a URL (fetched into the model cache), the version the
    run pinned. On an object store the four files are written in a local
    temporary folder, then uploaded one object each (``.idx`` last; see
    ``tokenized.tokenize_shards``); the manifest, written after this returns, is
    the commit point. ``tokenized/DONE`` lets a resumed run skip the work.
    """
    from gristmill.pipeline.model_cache import localize
    from gristmill.pipeline.tokenized import tokenize_shards

    spec = recipe.output.tokenize
    folder = out / "tokenized"
    tok = str(recipe.resolve(spec.tokenizer))
    if not (folder / "DONE").exists():
        pin = next((p for p in recipe.pins if p["field"] == "output.tokenize.tokenizer"), None)
        tokenize_shards([out / s["path"] for s in shards], localize(tok, pin=pin),
                        folder / "tokens", text_column=spec.text_column,
                        append_eos=spec.append_eos, progress=False, tokenizer_label=tok)
        atomic_write_bytes(folder / "DONE", b"")
    sidecar = json.loads((folder / "tokens.domains.json").read_text())
    return {"prefix": "tokenized/tokens", "tokenizer": tok,
            "num_documents": sidecar["num_documents"], "num_tokens": sidecar["num_tokens"],
            "files": [{"path": f"tokenized/tokens{ext}",
                       "bytes": storage.size(folder / f"tokens{ext}")} for ext in TOKENIZED_EXTS]}
