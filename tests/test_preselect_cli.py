"""``gristmill preselect probe|train|select`` end to end on tiny real models."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from gristmill.cli.main import main


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny models are faster on one thread of a shared machine
    yield
    torch.set_num_threads(n)

MATH = "theorem proof lemma integral derivative equation matrix vector prime".split()
WEB = "sale discount click buy cheap offer deal subscribe free coupon".split()
SHARED = "the a of and to in is for with on".split()


def _corpus(path, n=40):
    rng = random.Random(0)
    recs = []
    for i in range(n):
        own = MATH if i % 2 else WEB
        words = [rng.choice(own) if rng.random() < 0.4 else rng.choice(SHARED)
                 for _ in range(rng.randint(8, 40))]
        recs.append({"id": f"d{i}", "text": " ".join(words)})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from gristmill.trainers.tiny import build_tiny_lm, build_tokenizer

    root = tmp_path_factory.mktemp("family")
    build_tokenizer([" ".join(MATH + WEB + SHARED)] * 30, vocab_size=300, path=root / "tok")
    return [str(build_tiny_lm(root / "tok", root / f"m{k}", n_layer=1, n_embd=16 * (k + 1),
                              n_head=2, n_positions=64, seed=k)) for k in range(3)]


def test_probe_train_select_end_to_end(family, tmp_path, capsys):
    recs = _corpus(tmp_path / "docs.jsonl")
    models = [f"--model={p}={s}" for p, s in zip(family, (20.0, 30.0, 40.0), strict=True)]
    assert main(["preselect", "probe", str(tmp_path / "docs.jsonl"), "--out",
                 str(tmp_path / "probe"), "--max-length", "32", "--device", "cpu", "--quiet",
                 "--no-report", *models]) == 0
    labelled = pa.concat_tables(pq.read_table(f) for f in sorted((tmp_path / "probe" / "shards")
                                                                 .glob("*.parquet")))
    labels = labelled.column("preselect_label").to_pylist()
    assert labels.count(1) == labels.count(0) > 0
    s = labelled.column("predictive_strength").to_pylist()
    assert min(v for v, y in zip(s, labels, strict=True) if y == 1) > max(
        v for v, y in zip(s, labels, strict=True) if y == 0)
    assert "probe:" in capsys.readouterr().out

    assert main(["preselect", "train", str(tmp_path / "probe"), "--out",
                 str(tmp_path / "clf.bin"), "--bucket", "1000", "--valid-fraction", "0"]) == 0
    side = json.loads((tmp_path / "clf.json").read_text())
    assert side["counts"]["train_positive"] == labels.count(1)

    assert main(["preselect", "select", str(tmp_path / "docs.jsonl"), "--out",
                 str(tmp_path / "sel"), "--classifier", str(tmp_path / "clf.bin"),
                 "--fraction", "0.25", "--quiet", "--no-report"]) == 0
    kept = pa.concat_tables(pq.read_table(f) for f in sorted((tmp_path / "sel" / "shards")
                                                             .glob("*.parquet")))
    total = sum(len(r["text"]) for r in recs)
    chars = sum(len(t) for t in kept.column("text").to_pylist())
    assert 0.25 * total <= chars < 0.25 * total + max(len(r["text"]) for r in recs)
    scores = kept.column("preselect").to_pylist()
    threshold = json.loads((tmp_path / "sel" / "artifacts" / "top_fraction" /
                            "threshold.json").read_text())["threshold"]
    assert min(scores) >= threshold


def test_print_recipe_gives_a_runnable_select_recipe(tmp_path, capsys):
    (tmp_path / "clf.bin").write_bytes(b"")
    assert main(["preselect", "select", "docs.jsonl", "--out", "sel", "--classifier",
                 str(tmp_path / "clf.bin"), "--label", "hq", "--print-recipe"]) == 0
    body = yaml.safe_load(capsys.readouterr().out)
    assert [s["stage"] for s in body["stages"]] == ["fasttext", "top_fraction"]
    assert body["stages"][0]["label"] == "hq"
    assert body["stages"][1] == {"stage": "top_fraction", "column": "preselect",
                                 "fraction": 0.1, "by": "chars"}


def test_model_argument_needs_a_score(capsys):
    with pytest.raises(SystemExit):
        main(["preselect", "probe", "x.jsonl", "--out", "o", "--model", "models/a"])
    assert "PATH=SCORE" in capsys.readouterr().err


def test_train_on_missing_file_exits_2(tmp_path, capsys):
    assert main(["preselect", "train", str(tmp_path / "none.parquet"), "--out",
                 str(tmp_path / "m.bin")]) == 2
    assert "no parquet file" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["preselect_probe.yaml", "preselect_select.yaml"])
def test_shipped_recipes_validate(name):
    from gristmill import recipes
    from gristmill.pipeline.recipe import load_recipe

    recipe = load_recipe(recipes.path(name))
    types = [s.type_name for s in recipe.build_stages()]
    assert types[-1] in ("preselect_label", "top_fraction")
