"""Models pinned per run (issue 11, item 1): every model, tokenizer and list path a
recipe loads is fingerprinted before any data is read, recorded in ``_work/run.json``
and the manifest, and workers load exactly that version. Real fastText models trained
here, a local path and an ``s3://`` object on moto's S3 server (loopback); a real
SIGKILL between a run and its resume."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import xxhash
from conftest import make_text, write_jsonl, write_recipe
from pydantic import Field

from gristmill.cli.main import main
from gristmill.pipeline import model_cache, runner
from gristmill.pipeline.model_cache import ModelChangedDuringRun, ModelsChanged
from gristmill.pipeline.runner import run_recipe
from gristmill.pipeline.stage import KEY_POS_BITS, ROW_KEY, RowStage, StageParams, keep_all

pytest.importorskip("fasttext")
pytest.importorskip("s3fs")
pytest.importorskip("moto")
TESTS = Path(__file__).parent
PLAIN = "river stone mill grain flour wheel water".split()
TARGET = "theorem proof lemma integral matrix vector".split()


class KillParams(StageParams):
    file: int = Field(ge=0)


class KillAtFile(RowStage):
    """Passes every record; with ``PINNING_KILL`` set, the process SIGKILLs itself when
    it reaches input file ``file`` (the files before it are complete): a deterministic
    kill of a real run."""

    type_name = "kill_at_file"
    Params = KillParams

    def process(self, batch: pa.Table) -> object:
        keys = batch.column(ROW_KEY).to_numpy()
        if os.environ.get("PINNING_KILL") and int(keys.max()) >> KEY_POS_BITS >= self.params.file:
            os.kill(os.getpid(), signal.SIGKILL)
        return keep_all(batch)


def _put(data: bytes, url: str) -> None:
    import fsspec

    with fsspec.open(url, "wb") as f:
        f.write(data)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """Two fastText classifiers trained here on different labellings (A and B), and
    a corpus of 6 JSONL files."""
    from gristmill.trainers.fasttext import train_fasttext

    rng = random.Random(5)
    root = tmp_path_factory.mktemp("pinning")
    texts, labels = [], []
    for i in range(120):
        words = TARGET if i % 2 else PLAIN
        texts.append(" ".join(rng.choice(words) for _ in range(20)) + " " + make_text(rng, 10))
        labels.append(i % 2)
    train_fasttext(texts, labels, root / "A.bin", epoch=3, dim=8, bucket=5000, seed=1)
    train_fasttext(texts, [1 - v for v in labels], root / "B.bin", epoch=3, dim=8, bucket=5000,
                   seed=1)
    assert (root / "A.bin").read_bytes() != (root / "B.bin").read_bytes()
    for f in range(6):
        write_jsonl(root / "corpus" / f"part-{f}.jsonl",
                    [{"id": f"{f}-{i}", "text": t} for i, t in enumerate(texts[f::6])])
    return root


def _recipe(root: Path, tmp: Path, out: str, local_model: Path, s3_model: str,
            name: str = "r.yaml") -> Path:
    return write_recipe(
        tmp / name, name="pinning", seed=2, sources=[{"path": str(root / "corpus")}],
        stages=[{"stage": "test_model_pinning:KillAtFile", "name": "kill", "file": 3},
                {"stage": "fasttext", "name": "local_clf", "model": str(local_model),
                 "label": "__label__1"},
                {"stage": "fasttext", "name": "s3_clf", "model": s3_model,
                 "label": "__label__1"},
                {"stage": "top_fraction", "column": "local_clf", "fraction": 0.5}],
        output={"path": str(tmp / out), "shard_size": "4KB"},
        engine={"kind": "local", "workers": 1, "batch_size": 8})


def _state(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


def _shards(m: dict) -> list[tuple[str, str]]:
    return [(s["path"], s["sha256"]) for s in m["shards"]]


def test_a_resume_after_a_kill_is_refused_when_a_model_changed_and_resumes_when_restored(
        models, tmp_path, bucket, monkeypatch, capsys):
    monkeypatch.setenv("GRISTMILL_CACHE", str(tmp_path / "cache"))
    local = tmp_path / "clf.bin"
    shutil.copy(models / "A.bin", local)
    url = f"s3://{bucket}/models/clf.bin"
    _put((models / "A.bin").read_bytes(), url)
    ref = run_recipe(_recipe(models, tmp_path, "ref", local, url, "ref.yaml"), progress=False,
                     report=False)

    # the manifest says which version of every model selected the release
    pins = {p["stage"]: p for p in ref["models"]}
    assert set(pins) == {"local_clf", "s3_clf"}
    assert pins["local_clf"]["field"] == "stages[1].model"
    assert pins["local_clf"]["path"] == str(local)
    size = local.stat().st_size
    assert pins["local_clf"]["files"] == [
        ["", size, f"xxh3_128={xxhash.xxh3_128(local.read_bytes()).hexdigest()}"]]
    assert pins["s3_clf"]["field"] == "stages[2].model" and pins["s3_clf"]["path"] == url
    [(name, s3_size, version)] = pins["s3_clf"]["files"]
    assert name == "" and s3_size == size and version.startswith("ETag=")
    assert pins["s3_clf"]["fingerprint"] == model_cache.cache_key(url, pins["s3_clf"]["files"])
    # and `gristmill inspect` prints them
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "ref")]) == 0
    shown = [line for line in capsys.readouterr().out.splitlines() if "model:" in line]
    assert shown == [
        f"  model: stages[1].model (stage 'local_clf'): {local} ({size:,} bytes, "
        f"{pins['local_clf']['files'][0][2]}; fingerprint {pins['local_clf']['fingerprint'][:16]})",
        f"  model: stages[2].model (stage 's3_clf'): {url} ({size:,} bytes, {version}; "
        f"fingerprint {pins['s3_clf']['fingerprint'][:16]})"]

    recipe = _recipe(models, tmp_path, "killed", local, url)
    env = {**os.environ, "PINNING_KILL": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", "from gristmill.pipeline.runner import "
                           f"run_recipe; run_recipe({str(recipe)!r}, progress=False)"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    out = tmp_path / "killed"
    run_json = json.loads((out / "_work" / "run.json").read_text())
    assert run_json["models"] == ref["models"]
    assert not (out / "manifest.json").exists()
    done = sorted(p.parent.name for p in (out / "_work").glob("seg00/task-*/done.json"))
    assert len(done) == 3  # files 0, 1 and 2 were complete when file 3 killed it

    # a changed local model: refused before any data is read, naming stage, field, path
    shutil.copy(models / "B.bin", local)
    before = _state(out / "_work")
    assert main(["run", str(recipe), "--quiet"]) == 2
    msg = capsys.readouterr().err
    assert msg.startswith(f"gristmill: models changed since the partial run in {out}")
    assert "stages[1].model (stage 'local_clf')" in msg and str(local) in msg
    assert "--fresh" in msg and "s3_clf" not in msg
    assert _state(out / "_work") == before  # nothing read, nothing written

    # restored bytes (a new mtime, same content) are the pinned version; a changed
    # S3 object is refused in turn
    shutil.copy(models / "A.bin", local)
    _put((models / "B.bin").read_bytes(), url)
    with pytest.raises(ModelsChanged, match=r"stages\[2\]\.model \(stage 's3_clf'\)") as err:
        run_recipe(recipe, progress=False, report=False)
    assert url in str(err.value) and "local_clf" not in str(err.value)

    _put((models / "A.bin").read_bytes(), url)  # same bytes: the same ETag
    resumed = run_recipe(recipe, progress=False, report=False)
    assert _shards(resumed) == _shards(ref) and resumed["counts"] == ref["counts"]
    assert resumed["models"] == ref["models"]

    # a finished output whose model changed is refused too (and --fresh takes the new one)
    shutil.copy(models / "B.bin", local)
    with pytest.raises(ModelsChanged, match="since the output"):
        run_recipe(recipe, progress=False, report=False)
    fresh = run_recipe(recipe, fresh=True, progress=False, report=False)
    new = {p["stage"]: p for p in fresh["models"]}
    assert new["local_clf"]["fingerprint"] != pins["local_clf"]["fingerprint"]
    assert new["s3_clf"] == pins["s3_clf"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_model_changed_after_planning_stops_the_run_before_it_is_loaded(
        models, tmp_path, bucket, monkeypatch, capsys, where):
    """The model changes after the run pinned it and before a worker loads it: a clear
    error naming the stage, the field and the path, and nothing is committed."""
    monkeypatch.setenv("GRISTMILL_CACHE", str(tmp_path / "cache"))  # nothing cached yet
    local = tmp_path / "clf.bin"
    shutil.copy(models / "A.bin", local)
    url = f"s3://{bucket}/models/clf.bin"
    _put((models / "A.bin").read_bytes(), url)
    recipe = _recipe(models, tmp_path, "out", local, url)

    make_engine = runner.make_engine

    def change_then_start(rec, progress):
        assert json.loads((tmp_path / "out" / "_work" / "run.json").read_text())["models"]
        if where == "local":
            shutil.copy(models / "B.bin", local)
        else:
            _put((models / "B.bin").read_bytes(), url)
        return make_engine(rec, progress)

    monkeypatch.setattr(runner, "make_engine", change_then_start)
    assert main(["run", str(recipe), "--quiet"]) == 1  # a fault of the run, one line
    msg = capsys.readouterr().err
    assert msg.startswith("gristmill: ") and msg.count("\n") == 1
    field, stage, path = (("stages[1].model", "local_clf", str(local)) if where == "local"
                          else ("stages[2].model", "s3_clf", url))
    assert f"{field} (stage {stage!r}): {path} changed after the run pinned it" in msg
    assert "--fresh" in msg
    out = tmp_path / "out"
    assert not (out / "manifest.json").exists() and not (out / "shards").exists()
    assert not list(out.glob("_work/seg00/task-*/done.json"))
    if where == "s3":  # the changed version was not downloaded either
        assert not [p for p in (tmp_path / "cache" / "models").iterdir() if p.is_dir()]
    # the partial run is pinned to the old version: its resume is refused too
    monkeypatch.setattr(runner, "make_engine", make_engine)
    with pytest.raises(ModelsChanged, match="--fresh"):
        run_recipe(recipe, progress=False, report=False)
    if where == "local":
        # --fresh pins and loads the new version; in this process the stages were
        # set up with the old model before, and must not be reused for the new one
        fresh = run_recipe(recipe, fresh=True, progress=False, report=False)
        shutil.copy(local, tmp_path / "B-copy.bin")
        direct = run_recipe(_recipe(models, tmp_path, "direct", tmp_path / "B-copy.bin", url,
                                    "direct.yaml"), progress=False, report=False)
        assert _shards(fresh) == _shards(direct)


def test_a_cached_copy_of_the_pinned_version_is_loaded_after_the_store_changed(
        tmp_path, bucket, monkeypatch):
    monkeypatch.setenv("GRISTMILL_CACHE", str(tmp_path / "cache"))
    url = f"s3://{bucket}/m/weights.bin"
    _put(b"version one", url)
    pin = model_cache.pin_path(url, "clf", "stages[0].model")
    first = model_cache.localize(url, pin)
    _put(b"version two!", url)
    # the pinned version is in this machine's cache: loaded without asking the store
    assert model_cache.localize(url, pin) == first
    assert Path(first).read_bytes() == b"version one"
    # another machine (an empty cache) cannot get the pinned version: refused
    monkeypatch.setenv("GRISTMILL_CACHE", str(tmp_path / "other"))
    with pytest.raises(ModelChangedDuringRun, match=r"stages\[0\]\.model \(stage 'clf'\)"):
        model_cache.localize(url, pin)
    # unpinned, it is the current version
    assert Path(model_cache.localize(url)).read_bytes() == b"version two!"


def test_local_folder_and_glob_pins_notice_content_not_mtime(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "vocab.json").write_text('{"a": 0}')
    (folder / "sub").mkdir()
    (folder / "sub" / "merges.txt").write_text("a b\n")
    pin = model_cache.pin_path(str(folder), "mix", "stages[3].tokenizer")
    assert [f[:2] for f in pin["files"]] == [["sub/merges.txt", 4], ["vocab.json", 8]]
    assert model_cache.pin_change(str(folder), pin) is None
    os.utime(folder / "vocab.json", ns=(1, 1))  # touched: hashed again, the same
    assert model_cache.pin_change(str(folder), pin) is None
    (folder / "vocab.json").write_text('{"b": 0}')  # same size, other bytes
    assert "vocab.json: same size, different content" in model_cache.pin_change(str(folder), pin)
    (folder / "vocab.json").write_text('{"a": 0}')
    (folder / "extra.txt").write_text("x")
    assert model_cache.pin_change(str(folder), pin) == "extra.txt was added"

    (tmp_path / "evals").mkdir()
    for i in range(2):
        (tmp_path / "evals" / f"e{i}.jsonl").write_text(f'{{"text": "q{i}"}}\n')
    pattern = str(tmp_path / "evals" / "*.jsonl")
    gpin = model_cache.pin_path(pattern, "decon", "stages[0].eval_sets[0].path")
    assert len(gpin["files"]) == 2
    (tmp_path / "evals" / "e1.jsonl").unlink()
    assert "was removed" in model_cache.pin_change(pattern, gpin)
    with pytest.raises(ModelChangedDuringRun, match=r"eval_sets\[0\]\.path"):
        model_cache.localize(pattern, gpin)


def test_every_model_tokenizer_and_list_field_is_pinned_and_checked_on_setup(tmp_path):
    from gristmill.pipeline.recipe import parse_recipe

    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "spam.txt").write_text("spam.example\n")
    (tmp_path / "lists" / "urls.txt").write_text("https://mill.org/a\n")
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "qa.jsonl").write_text('{"text": "which river turns the wheel"}\n')
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "x", "url": "https://a.b/"}])
    recipe = parse_recipe({
        "sources": [{"path": "in.jsonl", "columns": ["url"]}],
        "stages": [{"stage": "url_filter", "block_domains_files": ["lists/spam.txt"],
                    "block_urls_files": ["lists/spam.txt", "lists/urls.txt"]},
                   {"stage": "decontaminate", "name": "decon",
                    "eval_sets": [{"name": "qa", "path": ["evals/*.jsonl"]}],
                    "cache_dir": str(tmp_path / "ngrams")}],
        "output": {"path": "out", "tokenize": {"tokenizer": "tok"}}}, base_dir=tmp_path)
    pins = model_cache.plan_pins(recipe)
    assert [(p["stage"], p["field"]) for p in pins] == [
        ("url_filter", "stages[0].block_domains_files[0]"),
        ("url_filter", "stages[0].block_urls_files[0]"),
        ("url_filter", "stages[0].block_urls_files[1]"),
        ("decon", "stages[1].eval_sets[0].path[0]"),
        (None, "output.tokenize.tokenizer")]
    assert pins[3]["path"] == str(tmp_path / "evals" / "*.jsonl")
    assert model_cache.pin_changes(pins, recipe) == []

    (tmp_path / "tok" / "tokenizer.json").write_text('{"v": 2}')
    (tmp_path / "lists" / "urls.txt").write_text("https://mill.org/b\n")
    changes = model_cache.pin_changes(pins, recipe)
    assert [c.split(" (stage")[0] for c in changes] == [
        "changed: output.tokenize.tokenizer " + str(tmp_path / "tok") + " (tokenizer.json: size 2 -> 8 bytes)",
        "changed: stages[0].block_urls_files[1]"]
    url_filter, decon = recipe.with_pins(pins).build_stages()
    with pytest.raises(ModelChangedDuringRun, match=r"stages\[0\]\.block_urls_files\[1\] "
                                                    r"\(stage 'url_filter'\)"):
        url_filter.setup()
    decon.setup()  # its eval set did not change
    (tmp_path / "evals" / "more.jsonl").write_text('{"text": "a new question"}\n')
    with pytest.raises(ModelChangedDuringRun, match=r"more\.jsonl was added"):
        decon.setup()
