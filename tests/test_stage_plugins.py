"""Plugin stages (an entry point and ``module:Class``) and the web filters run
on the local, Dask and Beam engines and write the same output."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gristmill.pipeline.recipe import RecipeError, parse_recipe
from gristmill.pipeline.registry import plugin_stages, stage_class
from gristmill.pipeline.runner import run_recipe

DEBIAN = Path("/usr/share/debian-reference")

PLUGIN = '''
"""A third-party stage package, as a user would write it."""
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from gristmill.pipeline.stage import GlobalStage, RowStage, StageParams, keep_all, split_batch


class MarkParams(StageParams):
    word: str = Field(description="documents containing it are dropped")


class DropWord(RowStage):
    """Drop documents that contain ``word``; add ``<name>_chars``."""

    type_name = "drop_word"
    Params: ClassVar = MarkParams
    requires = ("text",)

    def output_columns(self):
        return (f"{self.name}_chars",)

    def process(self, batch):
        text = batch.column("text")
        hit = pc.match_substring(text, self.params.word).to_numpy(zero_copy_only=False)
        batch = batch.append_column(f"{self.name}_chars", pc.utf8_length(text))
        return split_batch(batch, ~hit, self.name, "has_word")


class LongerThanMean(GlobalStage):
    """Keep documents at least as long as the mean length (a two-phase stage)."""

    type_name = "longer_than_mean"
    requires = ("text",)

    def summarize(self, batch):
        n = pc.utf8_length(batch.column("text")).to_numpy(zero_copy_only=False)
        return (int(n.sum()), int(n.size))

    def merge(self, a, b):
        return (a[0] + b[0], a[1] + b[1])

    def finalize(self, s):
        return s[0] / max(s[1], 1)

    def apply(self, batch, mean):
        n = pc.utf8_length(batch.column("text")).to_numpy(zero_copy_only=False)
        return split_batch(batch, n >= mean, self.name, "shorter_than_mean")
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """A tiny plugin package and its dist-info (with the entry point) in a folder that
    goes on sys.path and PYTHONPATH, as ``pip install --target`` would leave it."""
    root = tmp_path_factory.mktemp("plugin")
    pkg = root / "mill_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "stages.py").write_text(textwrap.dedent(PLUGIN))
    info = root / "mill_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mill-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[gristmill.stages]\ndrop_word = mill_plugin.stages:DropWord\n"
        "gopher = mill_plugin.stages:DropWord\n")
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(root))
    old = [p for p in (sys.modules.get("os").environ.get("PYTHONPATH", ""),) if p]
    mp.setenv("PYTHONPATH", ":".join([str(root), *old]))
    yield root
    mp.undo()


def test_entry_point_and_module_class_resolve(plugin_path):
    assert plugin_stages()["drop_word"] == "mill_plugin.stages:DropWord"
    # a plugin cannot shadow a built-in name
    assert "gopher" not in plugin_stages()
    assert stage_class("drop_word").__name__ == "DropWord"
    assert stage_class("mill_plugin.stages:LongerThanMean").kind == "global"


def test_bad_plugin_names_are_recipe_errors(plugin_path, tmp_path):
    def recipe(stage: str) -> dict:
        return {"sources": [{"path": str(tmp_path)}], "stages": [{"stage": stage}],
                "output": {"path": str(tmp_path / "out")}}

    with pytest.raises(RecipeError, match="did you mean 'drop_word'"):
        parse_recipe(recipe("drop_wrod"))
    with pytest.raises(RecipeError, match="cannot import module 'mill_plugin.nope'"):
        parse_recipe(recipe("mill_plugin.nope:X"))
    with pytest.raises(RecipeError, match="not a gristmill Stage"):
        parse_recipe(recipe("mill_plugin.stages:Field"))


def _paragraphs(lang: str) -> list[str]:
    path = DEBIAN / f"debian-reference.{lang}.txt.gz"
    if not path.is_file():
        pytest.skip(f"apt-get install debian-reference-{lang}")
    text = gzip.decompress(path.read_bytes()).decode()
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)
            if "|" not in p and len(p) > 150]


@pytest.fixture(scope="module")
def web_corpus(tmp_path_factory) -> Path:
    """Documents of 4-8 Debian Reference paragraphs (en, de, fr) with URLs, PII,
    repeated lines, a leaked evaluation item and menus."""
    folder = tmp_path_factory.mktemp("web")
    paras = {lang: _paragraphs(lang)[300:500] for lang in ("en", "de", "fr")}
    (folder / "eval.jsonl").write_text(json.dumps({"text": paras["en"][7]}) + "\n")
    docs = []
    for i in range(60):
        lang = ("en", "de", "fr")[i % 3]
        body = paras[lang][(i * 5) % 190:(i * 5) % 190 + 4 + i % 5]
        if i % 7 == 0:
            body = body + [body[0]] * 3
        if i % 11 == 0:
            body.append("Contact ada.lovelace@mill.example.org or +44 20 7946 0958.")
        if i % 13 == 0:
            body = ["Home", "News", "Shop", "Contact"] * 3 + body[:1]
        if i == 3:
            body.append("Quote: " + paras["en"][7])
        if i == 6:
            body.append("Never use apt-key add for new keys, the tool is deprecated.")
        host = ("debian.org", "spam.example", "mill.example.org")[i % 3 if i % 4 else 0]
        docs.append({"id": f"w{i}", "text": "\n".join(body), "url": f"https://{host}/page/{i}"})
    for part in range(3):
        with open(folder / f"part-{part}.jsonl", "w") as f:
            for d in docs[part::3]:
                f.write(json.dumps(d) + "\n")
    return folder


STAGES = [
    {"stage": "url_filter", "block_domains": ["spam.example"]},
    {"stage": "language_id", "keep": ["en", "de"], "languages": ["en", "de", "fr", "es"]},
    {"stage": "pii"},
    {"stage": "decontaminate", "eval_sets": [{"name": "qa", "path": "eval.jsonl"}],
     "cache_dir": "cache"},
    {"stage": "gopher_repetition"},
    {"stage": "fineweb_lines", "line_punct_thr": 0.1},
    {"stage": "c4_lines", "min_num_sentences": 2},
    {"stage": "drop_word", "name": "no_apt_key", "word": "apt-key"},
    {"stage": "mill_plugin.stages:LongerThanMean", "name": "long"},
    {"stage": "filter", "expr": "no_apt_key_chars > 200 and language_id_confidence >= 0.5"},
]


def _run(corpus: Path, out: Path, report: bool = False, **engine) -> dict:
    body = {"name": "web", "seed": 1,
            "sources": [{"path": str(corpus / "part-*.jsonl"), "columns": ["url"]}],
            "stages": STAGES,
            "output": {"path": str(out), "shard_size": "16KB", "write_dropped": True},
            "engine": {"batch_size": 7, **engine}}
    recipe = parse_recipe(body, base_dir=corpus)
    manifest = run_recipe(recipe, progress=False, report=report)
    kept = pa.concat_tables([pq.read_table(out / s["path"]) for s in manifest["shards"]])
    rows = sorted(json.dumps(r, sort_keys=True, default=str) for r in kept.to_pylist())
    dropped = pa.concat_tables([pq.read_table(out / f) for f in manifest["dropped"]])
    return {"kept": sorted(kept.column("id").to_pylist()),
            "content": hashlib.sha256("\n".join(rows).encode()).hexdigest(),
            "dropped": sorted((r["id"], r["stage"], r["reason"]) for r in dropped.to_pylist()),
            "stages": manifest["counts"]["stages"], "reconciled": manifest["counts"]["reconciled"],
            "text": kept.column("text").to_pylist(), "out": out}


@pytest.fixture(scope="module")
def local_result(plugin_path, web_corpus, tmp_path_factory) -> dict:
    return _run(web_corpus, tmp_path_factory.mktemp("local") / "out", report=True, kind="local",
                workers=1)


def test_web_recipe_with_plugins_on_the_local_engine(local_result):
    r = local_result
    assert r["reconciled"]
    reasons = {(stage, reason) for _, stage, reason in r["dropped"]}
    for expected in [("url_filter", "blocked_domain"), ("language_id", "language_fr"),
                     ("decontaminate", "contaminated_qa"), ("no_apt_key", "has_word"),
                     ("long", "shorter_than_mean")]:
        assert expected in reasons, (expected, reasons)
    assert any(stage == "gopher_repetition" or stage == "fineweb_lines"
               for _, stage, _ in r["dropped"])
    assert r["kept"], "something survives"
    joined = "\n".join(r["text"])
    assert "ada.lovelace@" not in joined and "7946" not in joined
    # nothing under the output folder (shards, dropped/, manifest, report) holds an original
    assert (Path(r["out"]) / "report.html").is_file()
    for f in Path(r["out"]).rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert b"ada.lovelace" not in data and b"7946 0958" not in data, f


def _same(a: dict, b: dict) -> None:
    for key in ("kept", "content", "dropped", "stages", "reconciled"):
        assert a[key] == b[key], key


def test_dask_workers_import_the_plugin(local_result, web_corpus, tmp_path):
    _same(_run(web_corpus, tmp_path / "out", kind="dask", workers=1, shuffle_partitions=2),
          local_result)


def test_beam_multiprocess_workers_import_the_plugin(local_result, web_corpus, tmp_path):
    _same(_run(web_corpus, tmp_path / "out", kind="beam", workers=2, shuffle_partitions=2),
          local_result)
