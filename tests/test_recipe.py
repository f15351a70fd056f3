"""Recipe validation: every error names its field and stops before data is read."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gristmill.pipeline.recipe import (
    RecipeError,
    check_recipe,
    load_recipe,
    parse_recipe,
    parse_size,
)


def _base(tmp_path, **kw):
    (tmp_path / "in.jsonl").write_text('{"text": "x"}\n')
    body = {"sources": [{"path": "in.jsonl"}], "output": {"path": "out"}}
    body.update(kw)
    return body


def test_unknown_stage_names_field_and_lists_valid(tmp_path):
    with pytest.raises(RecipeError) as e:
        parse_recipe(_base(tmp_path, stages=[{"stage": "gopher"}, {"stage": "nope"}]), tmp_path)
    msg = str(e.value)
    assert "stages[1].stage" in msg and "'nope'" in msg and "top_fraction" in msg


def test_bad_stage_parameter_names_field_value_and_range(tmp_path):
    with pytest.raises(RecipeError) as e:
        parse_recipe(_base(tmp_path, stages=[{"stage": "gopher", "min_words": -3}]), tmp_path)
    msg = str(e.value)
    assert "stages[0].min_words" in msg and "-3" in msg and "greater than or equal to 0" in msg


def test_unknown_output_field_is_an_error(tmp_path):
    body = _base(tmp_path)
    body["output"]["shardsize"] = "1MB"
    with pytest.raises(RecipeError, match=r"output\.shardsize: unknown field"):
        parse_recipe(body, tmp_path)


def test_bad_engine_kind_lists_valid_kinds(tmp_path):
    with pytest.raises(RecipeError, match=r"engine\.kind: must be one of 'local', 'dask' or 'beam'"):
        parse_recipe(_base(tmp_path, engine={"kind": "spark"}), tmp_path)


def test_missing_input_names_source_path(tmp_path):
    r = parse_recipe({"sources": [{"path": "missing/*.jsonl"}], "output": {"path": "o"}}, tmp_path)
    with pytest.raises(RecipeError, match=r"sources\[0\]\.path: 'missing/\*\.jsonl' matches no files"):
        check_recipe(r)


def test_column_not_produced_by_earlier_stage_is_caught(tmp_path):
    r = parse_recipe(_base(tmp_path, stages=[{"stage": "top_fraction", "column": "score",
                                              "fraction": 0.5}]), tmp_path)
    with pytest.raises(RecipeError, match=r"stages\[0\] \(top_fraction\): needs column\(s\) \['score'\]"):
        check_recipe(r)
    ok = parse_recipe(_base(tmp_path, stages=[{"stage": "text_stats"}, {
        "stage": "top_fraction", "column": "text_stats_words", "fraction": 0.5}]), tmp_path)
    assert any("top_fraction" in line for line in check_recipe(ok))


def test_duplicate_stage_names_rejected(tmp_path):
    with pytest.raises(RecipeError, match=r"stages\[1\]\.name"):
        parse_recipe(_base(tmp_path, stages=[{"stage": "sample", "fraction": 0.5},
                                             {"stage": "sample", "fraction": 0.5}]), tmp_path)


def test_shard_size_parsing():
    assert parse_size("256MB") == 256 << 20
    assert parse_size("1.5 GiB") == int(1.5 * (1 << 30))
    assert parse_size(4096) == 4096
    with pytest.raises(ValueError):
        parse_size("lots")


def test_relative_paths_resolve_against_recipe_folder(tmp_path):
    sub = tmp_path / "recipes"
    sub.mkdir()
    (tmp_path / "data.jsonl").write_text('{"text": "x"}\n')
    (sub / "r.yaml").write_text("sources: [{path: ../data.jsonl}]\noutput: {path: ../out}\n")
    r = load_recipe(sub / "r.yaml")
    assert r.source_files(0)[0][0].resolve() == (tmp_path / "data.jsonl").resolve()
    assert r.output_dir.resolve() == (tmp_path / "out").resolve()


def test_cli_check_exits_2_and_reads_no_data(tmp_path):
    # the input is not JSON at all: check must not read it, so it passes
    (tmp_path / "in.jsonl").write_bytes(b"\xff\xfe garbage")
    (tmp_path / "good.yaml").write_text("sources: [{path: in.jsonl}]\noutput: {path: out}\n")
    (tmp_path / "bad.yaml").write_text(
        "sources: [{path: in.jsonl}]\nstages: [{stage: sample, fraction: 2}]\noutput: {path: out}\n")
    ok = subprocess.run([sys.executable, "-m", "gristmill.cli", "check",
                         str(tmp_path / "good.yaml")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "gristmill.cli", "check",
                          str(tmp_path / "bad.yaml")], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "stages[0].fraction" in bad.stderr and "less than or equal to 1" in bad.stderr
    assert not (tmp_path / "out").exists()


def test_stages_resolve_relative_paths_against_the_recipe_folder(tmp_path, monkeypatch):
    sub = tmp_path / "recipes"
    sub.mkdir()
    (tmp_path / "in.jsonl").write_text('{"text": "x"}\n')
    (sub / "r.yaml").write_text("sources: [{path: ../in.jsonl}]\n"
                                "stages: [{stage: sample, fraction: 0.5}]\noutput: {path: ../o}\n")
    monkeypatch.chdir("/")
    stage = load_recipe(sub / "r.yaml").build_stages()[0]
    assert stage.resolve_path("../models/m") == str(tmp_path / "models" / "m")
    assert stage.resolve_path("/abs/m") == "/abs/m"
