"""Every shipped recipe (gristmill/recipes/) runs as shipped once `gristmill examples` (and the demo corpus) built its inputs."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from gristmill import recipes
from gristmill.cli.main import main
from gristmill.pipeline.demo import build_demo_corpus
from gristmill.pipeline.examples import EXAMPLES, build_examples
from gristmill.pipeline.recipe import check_recipe, load_recipe
from gristmill.pipeline.runner import run_recipe


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped recipes copied to root/recipes, every example built beside them (the demo
    corpus kept small)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("examples")
    recipes.install(recipes.names(), root)
    build_demo_corpus(root / "data" / "demo", limit_files=40, shards_per_domain=1)
    build_examples(list(EXAMPLES), root)
    return root


def _shards(out: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(f) for f in sorted((out / "shards").glob("*.parquet")))


@pytest.mark.parametrize("name", recipes.names())
def test_every_shipped_recipe_passes_check_with_example_data(root: Path, name: str) -> None:
    lines = check_recipe(load_recipe(root / "recipes" / f"{name}.yaml"))
    assert lines[0].startswith("sources[0]: ")
    assert int(lines[0].split()[1]) >= 1  # files found under root/data
    assert any(line.startswith(f"output: {root / 'out'}") for line in lines)


def test_grape_example_picks_the_style_the_base_model_was_pretrained_on(root: Path) -> None:
    manifest = run_recipe(root / "recipes" / "grape.yaml", progress=False, report=False)
    assert manifest["counts"]["read"] == 240
    assert manifest["counts"]["kept"] == 240
    table = _shards(root / "out" / "grape")
    assert {"prompt", "response", "grape_index", "grape_source", "grape_score"} <= set(
        table.column_names)
    rows = table.to_pylist()
    assert all(r["response"] == r["responses"][r["grape_index"]] for r in rows)
    plain = sum(r["grape_source"] == "plain" for r in rows)
    assert plain >= 0.9 * len(rows)


def test_distill_example_runs_end_to_end_with_a_short_schedule(root: Path) -> None:
    path = root / "recipes" / "distill_digits.yaml"
    body = yaml.safe_load(path.read_text())
    stage = body["stages"][0]
    # the shipped schedule takes ~40 s on 2 cores; the data and stage are the same
    stage["experts"] = {"num_experts": 1, "epochs": 4}
    stage["distill"] = {"ipc": 2, "iterations": 3, "syn_steps": 4, "expert_epochs": 2,
                        "max_start_epoch": 2}
    short = root / "recipes" / "distill_short.yaml"
    short.write_text(yaml.safe_dump(body, sort_keys=False))
    try:
        manifest = run_recipe(short, progress=False, report=False)
    finally:
        short.unlink()
    assert manifest["counts"]["read"] == 1797
    assert manifest["counts"]["kept"] == 1797
    table = _shards(root / "out" / "distill_digits")
    assert {"id", "text", "features", "label"} <= set(table.column_names)
    synthetic = pq.read_table(root / "out" / "distill_digits" / "artifacts" / "distill" /
                              "synthetic.parquet")
    assert synthetic.num_rows == 10 * 2


def test_preselect_example_family_is_scored_in_order_and_classifier_exists(root: Path) -> None:
    family = yaml.safe_load((root / "data" / "models" / "family" / "family.yaml").read_text())
    scores = [m["score"] for m in family["models"]]
    assert len(scores) == 5
    assert scores == sorted(scores)  # more target-domain text, lower target loss
    probe = yaml.safe_load((root / "recipes" / "preselect_probe.yaml").read_text())
    shipped = [m["score"] for m in probe["stages"][1]["models"]]
    assert shipped == sorted(shipped)  # the recipe ranks the family the same way
    assert (root / "data" / "models" / "preselect.bin").stat().st_size > 0


def test_building_again_changes_nothing(root: Path) -> None:
    marker = root / "data" / "grape" / ".complete"
    before = marker.stat().st_mtime_ns
    model = root / "data" / "models" / "base-lm" / "model.safetensors"
    model_before = model.stat().st_mtime_ns
    again = build_examples(list(EXAMPLES), root)
    assert again["distill"] == [root / "data" / "digits" / "digits.jsonl"]
    assert again["grape"] == [root / "data" / "grape" / "candidates.jsonl",
                              root / "data" / "models" / "base-lm"]
    assert marker.stat().st_mtime_ns == before
    assert model.stat().st_mtime_ns == model_before


def test_cli_prints_what_it_built_and_the_next_command(root: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    assert main(["examples", "distill", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert str(root / "data" / "digits" / "digits.jsonl") in out
    assert f"gristmill run {root / 'recipes' / 'distill_digits.yaml'}" in out


def test_unknown_example_is_refused_with_the_valid_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="valid: grape, preselect, distill, mix, all"):
        build_examples(["grapes"], tmp_path)
