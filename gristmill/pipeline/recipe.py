"""The recipe: sources, stages, output and engine, validated before any data is read.

A recipe is YAML. Relative paths are resolved against the recipe file's folder.

.. code-block:: yaml

    name: demo
    seed: 0
    sources:
      - path: ../data/demo/docs-*.jsonl.zst   # a file, a folder or a glob (or a list)
        domain: docs                           # label for every record of this source
        fields: {text: body, id: doc_id}       # where the canonical fields live
    stages:
      - stage: exact_dedup
      - stage: gopher
        min_words: 20
      - stage: top_fraction
        column: text_stats_alpha_fraction
        fraction: 0.5
    output:
      path: ../out/demo
      format: parquet
      shard_size: 128MB
    engine:
      kind: local
      workers: 2

Errors name the field, the bad value and what is valid::

    recipe error at stages[1].min_words: Input should be greater than or equal to 0 (got -3)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from gristmill.extras import ENGINE_EXTRAS, PROTOCOL_EXTRAS, MissingExtra, require
from gristmill.pipeline import storage
from gristmill.pipeline.registry import stage_class
from gristmill.pipeline.stage import Stage

FORMATS = ("jsonl", "parquet")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz",
                  ".jsonl.zst", ".json.zst", ".ndjson.zst")
PARQUET_SUFFIXES = (".parquet", ".pq")


class RecipeError(ValueError):
    """A recipe that cannot run; raised before any data is read."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FieldMap(_Model):
    """Where the canonical fields live in the input records."""

    id: str | None = Field("id", description="id field; where absent or null (or when set to "
                           "null) ids are derived as `<file>:<line>`")
    text: str = "text"
    domain: str | None = "domain"
    prompt: str = "prompt"
    responses: str = "responses"
    response_sources: str | None = "response_sources"


class SourceSpec(_Model):
    path: str | list[str]
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    kind: Literal["pretrain", "sft"] = "pretrain"
    domain: str | None = Field(None, description="domain label for every record of this source")
    name: str | None = Field(None, description="value of the `source` column (default: the path)")
    fields: FieldMap = FieldMap()
    columns: list[str] = Field(default_factory=list,
                               description="extra input columns kept as they are")

    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*$")


def parse_size(value: int | str) -> int:
    """``"256MB"`` -> bytes (powers of 1024, as shard sizes usually are)."""
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a size; use bytes or a number with KB, MB or GB")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


class TokenizeSpec(_Model):
    tokenizer: str = Field(description="folder (or URL) of a transformers tokenizer")
    text_column: str = "text"
    append_eos: bool = True


class OutputSpec(_Model):
    path: str
    format: Literal["parquet", "jsonl"] = "parquet"
    shard_size: int | str = Field("256MB", validate_default=True)
    write_dropped: bool = Field(False, description="write id, stage and reason of every drop")
    tokenize: TokenizeSpec | None = None

    @field_validator("shard_size")
    @classmethod
    def _size(cls, v: int | str) -> int:
        n = parse_size(v)
        if n < 1024:
            raise ValueError(f"shard_size must be at least 1KB, got {v!r}")
        return n


class EngineSpec(_Model):
    kind: Literal["local", "dask", "beam"] = "local"
    workers: int = Field(1, ge=1, le=1024)
    batch_size: int = Field(8192, ge=1, le=1_000_000)
    shuffle_partitions: int | None = Field(
        None, ge=1, le=65536, description="key partitions of a shuffle stage (each holds whole "
        "key groups; a process holds one); default: one per 32 MiB of input, so a partition "
        "stays the same size whatever the corpus size")
    scheduler: str | None = Field(None, description="dask: address of an existing scheduler")
    runner: str | None = Field(None, description="beam: runner name (default: a local runner)")
    beam_options: dict[str, Any] = Field(default_factory=dict)
    split_size: int | str | None = Field(
        "256MB", validate_default=True,
        description="a JSONL file (uncompressed, or .zst of several frames) or a Parquet "
                    "file larger than this is read by several tasks (line-aligned byte "
                    "ranges, starting in a frame of their own for zstd; runs of row "
                    "groups); .gz never; null or 0: one task per file (see "
                    "gristmill.pipeline.splits)")

    @field_validator("split_size")
    @classmethod
    def _split(cls, v: int | str | None) -> int | None:
        if v is None:
            return None
        n = parse_size(v)
        if n < 0:
            raise ValueError("split_size must be a size >= 0 (0 or null: never split)")
        return n or None


_STAGE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class StageSpec(_Model):
    """One stage: ``stage`` names the type, ``name`` optionally renames it, the
    remaining keys are the stage's own parameters (validated by its class)."""

    model_config = ConfigDict(extra="allow")
    stage: str
    name: str | None = None

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Recipe(_Model):
    name: str = "gristmill"
    seed: int = 0
    sources: list[SourceSpec] = Field(min_length=1)
    stages: list[StageSpec] = Field(default_factory=list)
    output: OutputSpec
    engine: EngineSpec = EngineSpec()
    base_dir: str = Field(".", description="folder that relative paths resolve against")
    # the run's pins of every model, tokenizer and list (``model_cache.plan_pins``): set
    # by the runner, never by a recipe file; not part of the fingerprint (the manifest
    # lists them as ``models``), part of the stage cache key
    _pins: list[dict[str, Any]] = PrivateAttr(default_factory=list)

    @property
    def pins(self) -> list[dict[str, Any]]:
        return self._pins

    def with_pins(self, pins: list[dict[str, Any]]) -> Recipe:
        """A copy whose stages load exactly the pinned versions (``Stage.local_path``)."""
        copy = self.model_copy()
        copy._pins = list(pins)
        return copy

    # ---- paths -----------------------------------------------------------
    def resolve(self, path: str) -> Path:
        """A recipe path made absolute against the recipe folder; a URL
        (``s3://bucket/key``) stays as it is (see ``storage``)."""
        if storage.is_remote(path):
            return storage.as_path(path)
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else Path(os.path.normpath(Path(self.base_dir) / p))

    @property
    def output_dir(self) -> Path:
        return self.resolve(self.output.path)

    def source_files(self, index: int) -> list[tuple[Path, str]]:
        """Files of source ``index`` as (path, format), sorted; RecipeError if none."""
        src = self.sources[index]
        found: list[Path] = []
        for pattern in src.paths():
            p = self.resolve(pattern)
            if any(ch in pattern for ch in "*?[") and not storage.is_dir(p):
                found += storage.glob_files(p)
            elif storage.is_dir(p):
                found += [q for q in storage.find_files(p) if _format_of(q)]
            elif storage.is_file(p):
                found.append(p)
            else:
                raise RecipeError(f"recipe error at sources[{index}].path: {pattern!r} does not "
                                  f"exist (resolved to {p})")
        if not found:
            raise RecipeError(f"recipe error at sources[{index}].path: {src.path!r} matches no "
                              f"files; expected {', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}")
        out = []
        for f in found:
            fmt = src.format if src.format != "auto" else _format_of(f)
            if fmt is None:
                raise RecipeError(
                    f"recipe error at sources[{index}].format: cannot tell the format of {f} from "
                    f"its extension; set format to one of {', '.join(FORMATS)}")
            out.append((f, fmt))
        return out

    def file_label(self, path: Path) -> str:
        """A stable name for an input file: its path relative to the recipe folder
        (an object's full URL)."""
        if storage.is_remote(path):
            return str(path)
        try:
            rel = os.path.relpath(path, self.base_dir)
        except ValueError:
            rel = str(path)
        return Path(rel).as_posix()

    def source_label(self, index: int, path: Path) -> str:
        """The ``source`` column of a file's records: the source's name, else the file."""
        return self.sources[index].name or self.file_label(path)

    # ---- stages ----------------------------------------------------------
    def build_stages(self) -> list[Stage]:
        """Instantiate the stages; RecipeError names the stage field on bad parameters."""
        stages: list[Stage] = []
        names: set[str] = set()
        for i, spec in enumerate(self.stages):
            try:
                cls = stage_class(spec.stage)
            except ValueError as e:
                raise RecipeError(f"recipe error at stages[{i}].stage: {e}") from None
            try:
                params = cls.Params(**spec.params())
            except ValidationError as e:
                raise RecipeError(_format_validation(e, prefix=f"stages[{i}]")) from None
            stage = cls(params, name=spec.name or spec.stage, seed=self.seed)
            stage.base_dir = self.base_dir
            stage.pins = {p["path"]: p for p in self._pins if p["stage"] == stage.name}
            if spec.name is not None:
                stage.name = spec.name
            if not _STAGE_NAME.fullmatch(stage.name) or stage.name in (".", ".."):
                field = "name" if spec.name is not None else "stage"
                raise RecipeError(
                    f"recipe error at stages[{i}].{field}: stage name {stage.name!r} is not "
                    f"valid; a stage name becomes a column prefix and a folder name, so it may "
                    f"hold only letters, digits, '_', '.' and '-' (not '.' or '..')")
            if stage.name in names:
                raise RecipeError(f"recipe error at stages[{i}].name: {stage.name!r} is used by an "
                                  f"earlier stage; give this one a distinct `name`")
            names.add(stage.name)
            stages.append(stage)
        return stages

    def stage_cache_key(self) -> str:
        """Key of a worker's cache of built and set-up stages: everything that changes
        what a stage does, the recipe folder included (relative model paths resolve
        against it), but not the engine."""
        body = self.model_dump(mode="json", exclude={"engine"})
        if self._pins:  # a model changed between two runs in one worker: set up again
            body["pins"] = [p["fingerprint"] for p in self._pins]
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def fingerprint(self) -> str:
        """sha256 of what determines the output (not the engine or worker count)."""
        body = self.model_dump(mode="json", exclude={"engine", "base_dir"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _format_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def _format_validation(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = prefix
        for part in e["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "literal_error":
            msg = msg.replace("Input should be", "must be one of")
        lines.append(f"recipe error at {loc or 'recipe'}: {msg}{got_s}")
    return "\n".join(lines)


def parse_recipe(data: dict[str, Any], base_dir: str | Path = ".") -> Recipe:
    """Validate a recipe mapping; RecipeError with every problem, each naming its field."""
    if not isinstance(data, dict):
        raise RecipeError("recipe error: the recipe must be a mapping with sources, stages, output")
    data = {**data, "base_dir": str(base_dir)}
    try:
        recipe = Recipe(**data)
    except ValidationError as e:
        raise RecipeError(_format_validation(e)) from None
    recipe.build_stages()
    return recipe


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read and validate a YAML recipe. ``overrides`` are dotted keys, e.g.
    ``{"engine.workers": 4}``."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe error: no recipe file at {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe error: {path} is not valid YAML: {e}") from None
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return parse_recipe(data, base_dir=path.resolve().parent)


def _real(path: Path) -> Path:
    return path if storage.is_remote(path) else Path(os.path.realpath(path))


def _inside(inner: Path, outer: Path) -> bool:
    if storage.is_remote(inner) or storage.is_remote(outer):
        a, b = str(inner).rstrip("/"), str(outer).rstrip("/")
        return a == b or a.startswith(b + "/")
    return inner == outer or outer in inner.parents


def _check_output_overlap(recipe: Recipe) -> None:
    """The output folder may not be, hold, or sit inside any input: ``--fresh``
    would delete the input and a plain run would overwrite it."""
    out = _real(recipe.output_dir)
    for i, src in enumerate(recipe.sources):
        roots = []
        for pattern in src.paths():
            p = recipe.resolve(pattern)
            if any(ch in pattern for ch in "*?["):
                # the folder part of a glob: everything it can match lies below it
                parts = str(p).split("/") if storage.is_remote(p) else p.parts
                cut = next(k for k, part in enumerate(parts) if any(c in part for c in "*?["))
                roots.append(storage.as_path("/".join(parts[:cut])) if storage.is_remote(p)
                             else Path(*parts[:cut]))
            else:
                roots.append(p)
        for root in roots:
            r = _real(root)
            if _inside(r, out) or (_inside(out, r) and not storage.is_file(r)):
                raise RecipeError(
                    f"recipe error at output.path: the output folder {out} overlaps the input "
                    f"sources[{i}].path ({r}); a run (or --fresh) would overwrite or delete its "
                    f"own input. Choose an output folder outside every input")


def _check_extras(recipe: Recipe) -> None:
    """Every optional dependency group the recipe needs is installed; else one line naming it."""
    needs: list[tuple[str, str]] = []
    if recipe.engine.kind in ENGINE_EXTRAS:
        needs.append((ENGINE_EXTRAS[recipe.engine.kind], "engine.kind"))
    paths = [(f"sources[{i}].path", p) for i, src in enumerate(recipe.sources) for p in src.paths()]
    for where, path in paths + [("output.path", recipe.output.path)]:
        if storage.protocol_of(path) in PROTOCOL_EXTRAS:  # s3://, gs://: an fsspec backend
            needs.append((PROTOCOL_EXTRAS[storage.protocol_of(path)], where))
    for i, stage in enumerate(recipe.build_stages()):
        needs += [(extra, f"stages[{i}] ({stage.name})") for extra in stage.required_extras()]
    if recipe.output.tokenize is not None:
        needs.append(("torch", "output.tokenize"))  # a transformers tokenizer
    for extra, where in needs:
        try:
            require(extra, where)
        except MissingExtra as e:
            raise RecipeError(f"recipe error at {where}: {e.reason}") from None


def check_recipe(recipe: Recipe) -> list[str]:
    """Everything that can be checked without reading data; returns a summary.

    Raises RecipeError on the first problem: a missing extra (optional
    dependencies a stage or the engine needs), missing inputs, stage parameters
    (files a stage needs), columns a stage reads that no source or earlier
    stage provides.
    """
    _check_extras(recipe)
    summary = []
    _check_output_overlap(recipe)
    for i, src in enumerate(recipe.sources):
        files = recipe.source_files(i)
        summary.append(f"sources[{i}]: {len(files)} file(s), {src.kind}, "
                       f"domain={src.domain or '(from records)'}")
    stages = recipe.build_stages()
    kinds = {s.kind for s in recipe.sources}
    if len(kinds) > 1:
        raise RecipeError("recipe error at sources: pretraining and SFT sources cannot be mixed "
                          "in one recipe")
    kind = kinds.pop()
    cols = {"id", "domain", "source"} | ({"text"} if kind == "pretrain" else
                                          {"prompt", "responses", "response_sources"})
    for src in recipe.sources:
        cols |= set(src.columns)
    for i, stage in enumerate(stages):
        try:
            stage.check(recipe.base_dir)
        except (ValueError, FileNotFoundError) as e:
            raise RecipeError(f"recipe error at stages[{i}] ({stage.name}): {e}") from None
        missing = [c for c in stage.input_columns() if c not in cols]
        if missing:
            raise RecipeError(
                f"recipe error at stages[{i}] ({stage.name}): needs column(s) {missing} that no "
                f"source or earlier stage provides; available: {sorted(cols)}")
        cols |= set(stage.output_columns())
        summary.append(f"stages[{i}]: {stage.name} ({stage.type_name}, {stage.kind})")
    if recipe.output.tokenize is not None:
        tok = recipe.resolve(recipe.output.tokenize.tokenizer)
        if not (storage.is_dir(tok) if storage.is_remote(tok) else tok.exists()):
            raise RecipeError(f"recipe error at output.tokenize.tokenizer: {tok} does not exist")
    summary.append(f"output: {recipe.output_dir} ({recipe.output.format})")
    summary.append(f"engine: {recipe.engine.kind}, workers={recipe.engine.workers}")
    return summary
