"""The core works without any extra, and what needs a missing extra says which, in one line.

An extra's absence is simulated in a subprocess by a ``sys.meta_path`` finder
that refuses its modules, so ``import torch`` raises ``ModuleNotFoundError``
as it would in a core-only install (the installed libraries themselves are
not touched or imitated). The finder is installed by a ``sitecustomize``
module on ``PYTHONPATH``, so the local engine's spawned workers get it too. ``scripts/check_wheel.py`` does the same with a
real core-only venv built from the wheel.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from gristmill import recipes
from gristmill.extras import EXTRAS, MissingExtra, extra_providing, missing_modules, require
from gristmill.pipeline.demo import build_demo_corpus
from gristmill.pipeline.registry import STAGES

ROOT = Path(__file__).resolve().parents[1]
ALL_OPTIONAL = sorted({m for mods in EXTRAS.values() for m in mods})

BLOCKER = """
import sys

class _Absent:
    '''Refuses the modules of uninstalled extras, as a core-only install would.'''
    blocked = set({blocked!r})

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in cls.blocked:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _Absent)
"""


def run_without(blocked: list[str], code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (and its child processes) where ``blocked``
    modules cannot be imported."""
    site = cwd / ".absent"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER.format(blocked=sorted(blocked)))
    env = {**os.environ, "PYTHONPATH": str(site)}
    script = "import sys\nassert '_Absent' in repr(sys.meta_path)\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


def cli_without(blocked: list[str], args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_without(blocked, f"""
        from gristmill.cli.main import main
        sys.exit(main({args!r}))
    """, cwd)


def _requirement_name(req: str) -> str:
    return re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower().replace("_", "-")


def _distributions(req: str) -> set[str]:
    """The distribution ``req`` names, plus those its own extras pull (dask[distributed])."""
    name = _requirement_name(req)
    wanted = set(re.findall(r"\[([^\]]*)\]", req)[0].split(",")) if "[" in req else set()
    out = {name}
    for sub in importlib.metadata.requires(name) or []:
        if any(f'extra == "{w}"' in sub for w in wanted):
            out.add(_requirement_name(sub))
    return out


def test_every_extra_in_pyproject_provides_the_modules_the_code_checks_for() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert set(extras) - {"all", "dev"} == set(EXTRAS)
    (everything,) = extras["all"]
    in_all = set(everything.partition("[")[2].rstrip("]").split(","))
    assert in_all == set(EXTRAS) - {"s3", "gcs"}  # object-store backends: the one you use
    provided_by = importlib.metadata.packages_distributions()
    for extra, modules in EXTRAS.items():
        dists: set[str] = set()
        for req in extras[extra]:
            try:
                dists |= _distributions(req)
            except importlib.metadata.PackageNotFoundError:  # not installed here (s3fs, gcsfs)
                dists.add(_requirement_name(req))
        for module in modules:
            if module not in provided_by:  # not installed here (s3fs, gcsfs)
                continue
            assert {d.lower().replace("_", "-") for d in provided_by[module]} & dists, (extra, module)


def test_core_dependencies_are_none_of_the_heavy_ones() -> None:
    core = {_requirement_name(r) for r in
            tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    heavy = {"apache-beam", "dask", "distributed", "torch", "transformers", "fasttext-numpy2",
             "pot", "scikit-learn", "ninja"}
    assert not core & heavy
    assert not any("==" in r for r in
                   tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


def test_missing_extra_message_is_one_line_naming_the_pip_command() -> None:
    err = MissingExtra("beam", "engine.kind", ["apache_beam"])
    assert str(err) == ("engine.kind needs the 'beam' extra (apache_beam not installed): "
                        "pip install 'gristmill[beam]'")
    assert extra_providing("torch.nn.functional") == "torch"
    assert extra_providing("apache_beam.io") == "beam"
    assert extra_providing("numpy") is None
    with pytest.raises(KeyError, match="valid: dask, beam"):
        missing_modules("tensorflow")
    require("torch", "this test")  # installed in the test venv: no error


def test_core_modules_and_every_stage_module_import_without_any_extra(tmp_path: Path) -> None:
    modules = sorted({target.partition(":")[0] for target in STAGES.values()})
    result = run_without(ALL_OPTIONAL, f"""
        import importlib
        for name in {modules!r} + ["gristmill.pipeline.runner", "gristmill.pipeline.report",
                     "gristmill.pipeline.engines.dask", "gristmill.pipeline.engines.beam",
                     "gristmill.pipeline.demo", "gristmill.pipeline.examples", "gristmill.recipes"]:
            importlib.import_module(name)
        from gristmill.cli.main import build_parser
        build_parser()  # imports every command module
        blocked = set({ALL_OPTIONAL!r})
        leaked = sorted(m for m in sys.modules if m.partition(".")[0] in blocked)
        print("leaked", leaked)
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "leaked []" in result.stdout


def _recipe(folder: Path, stages: list[dict], engine: str = "local",
            source: str = "data.jsonl") -> Path:
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"d{i}", "text": f"document number {i} " * 20})
                            + "\n" for i in range(50)))
    model = folder / "model"
    model.mkdir(exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "needs-extra", "sources": [{"path": source}], "stages": stages,
        "output": {"path": "out"}, "engine": {"kind": engine}}))
    return path


@pytest.mark.parametrize(("stages", "engine", "blocked", "where", "extra", "source"), [
    ([{"stage": "lm_likelihood", "model": "model"}], "local", ["torch"],
     "stages[0] (lm_likelihood)", "torch", "data.jsonl"),
    ([{"stage": "length_filter"}, {"stage": "fasttext", "model": "model"}], "local",
     ["fasttext"], "stages[1] (fasttext)", "fasttext", "data.jsonl"),
    ([{"stage": "mix", "sampler": "temperature", "tokenizer": "model",
       "budget_tokens": 1000}], "local",
     ["transformers"], "stages[0] (mix)", "torch", "data.jsonl"),
    ([{"stage": "length_filter"}], "beam", ["apache_beam"], "engine.kind", "beam", "data.jsonl"),
    ([{"stage": "length_filter"}], "dask", ["distributed"], "engine.kind", "dask", "data.jsonl"),
    ([{"stage": "length_filter"}], "local", ["s3fs"], "sources[0].path", "s3",
     "s3://corpus/part-*.jsonl"),
])
def test_check_names_the_missing_extra_in_one_line(tmp_path: Path, stages: list[dict],
                                                   engine: str, blocked: list[str], where: str,
                                                   extra: str, source: str) -> None:
    recipe = _recipe(tmp_path, stages, engine, source)
    # `run` checks the same way before reading; one case of it is enough
    for command in ("check", "run") if engine == "dask" else ("check",):
        result = cli_without(blocked, [command, str(recipe)], tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.splitlines() == [
            f"gristmill: recipe error at {where}: needs the '{extra}' extra "
            f"({', '.join(blocked)} not installed): pip install 'gristmill[{extra}]'"]
    assert not (tmp_path / "out").exists()  # the run stopped before anything was read or written


def test_stage_extras_follow_their_parameters(tmp_path: Path) -> None:
    """minhash_dedup needs torch only for kernel: native; a mix without a tokenizer needs nothing."""
    recipe = _recipe(tmp_path, [{"stage": "minhash_dedup", "kernel": "native"}])
    result = cli_without(["torch"], ["check", str(recipe)], tmp_path)
    assert result.returncode == 2
    assert "stages[0] (minhash_dedup): needs the 'torch' extra" in result.stderr
    recipe = _recipe(tmp_path, [{"stage": "minhash_dedup"}, {"stage": "mix", "sampler": "unimax",
                                                             "budget_tokens": 1000}])
    result = cli_without(ALL_OPTIONAL, ["check", str(recipe)], tmp_path)
    assert result.returncode == 0, result.stderr


def test_core_recipe_runs_end_to_end_without_any_extra(tmp_path: Path, monkeypatch) -> None:
    recipe = _recipe(tmp_path, [{"stage": "length_filter", "min_chars": 10},
                                {"stage": "exact_dedup"}, {"stage": "minhash_dedup"},
                                {"stage": "text_stats"}, {"stage": "sample", "fraction": 0.5}])
    # an empty kernel cache: a kernel built earlier (make test builds one) loads without
    # torch, which is what a core install that never had torch does not have
    monkeypatch.setenv("GRISTMILL_EXT_CACHE", str(tmp_path / "ext-cache"))
    result = cli_without(ALL_OPTIONAL, ["run", str(recipe), "--quiet"], tmp_path)
    assert result.returncode == 0, result.stderr
    # the C++ MinHash kernel is built with torch: without it the numpy path runs, and says why
    assert "pip install 'gristmill[torch]'" in result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["read"] == 50 and manifest["counts"]["reconciled"]
    kept = sum(pq.read_metadata(tmp_path / "out" / s["path"]).num_rows
               for s in manifest["shards"])
    assert kept == manifest["counts"]["kept"] > 0


def test_commands_that_need_an_extra_say_which(tmp_path: Path) -> None:
    result = cli_without(["torch"], ["examples", "grape", "--out", str(tmp_path)], tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "gristmill: gristmill examples grape needs the 'torch' extra (torch not installed): "
        "pip install 'gristmill[torch]'"]
    assert not (tmp_path / "data").exists() and not (tmp_path / "recipes").exists()
    # a command importing torch lazily, deep inside: the CLI turns it into the same line
    (tmp_path / "lm.yaml").write_text("train: [x]\nout_dir: o\ntokenizer: t\n")
    result = cli_without(["torch"], ["train-lm", "lm.yaml"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "gristmill: gristmill train-lm needs the 'torch' extra (torch not installed): "
        "pip install 'gristmill[torch]'"]


def test_demo_runs_in_any_folder_from_the_shipped_recipe(tmp_path: Path) -> None:
    work = tmp_path / "elsewhere"
    build_demo_corpus(work / "data" / "demo", limit_files=30, shards_per_domain=1)
    result = cli_without(ALL_OPTIONAL, ["demo", "--out", str(work), "--workers", "1"], tmp_path)
    assert result.returncode == 0, result.stderr
    copy = work / "recipes" / "demo.yaml"
    assert copy.read_bytes() == recipes.path("demo").read_bytes()
    manifest = json.loads((work / "out" / "demo" / "manifest.json").read_text())
    assert manifest["counts"]["reconciled"] and manifest["counts"]["kept"] > 0
    assert (work / "out" / "demo" / "report.html").exists()
    assert f"Open the report: {work / 'out' / 'demo' / 'report.html'}" in result.stdout
    # an edited copy is the user's: kept, used, and said so (here a broken edit, which
    # stops at the recipe check in one line)
    copy.write_text(copy.read_text().replace("fraction: 0.9", "fraction: 7"))
    result = cli_without(ALL_OPTIONAL, ["demo", "--out", str(work)], tmp_path)
    assert result.returncode == 2
    assert f"using {copy}: it differs from the shipped demo recipe" in result.stdout
    assert result.stderr.startswith("gristmill: recipe error at stages[6].fraction")
    assert "fraction: 7" in copy.read_text()


def test_install_never_overwrites_and_unknown_names_list_the_valid_ones(tmp_path: Path) -> None:
    first = recipes.install(["grape", "mix_unimax"], tmp_path)
    assert [(i.path.name, i.status) for i in first] == [("grape.yaml", "written"),
                                                        ("mix_unimax.yaml", "written")]
    (tmp_path / "recipes" / "grape.yaml").write_text("mine\n")
    again = recipes.install(["grape", "mix_unimax"], tmp_path)
    assert [i.status for i in again] == ["edited", "same"]
    assert (tmp_path / "recipes" / "grape.yaml").read_text() == "mine\n"
    with pytest.raises(ValueError, match="valid: demo, distill_digits, grape"):
        recipes.install(["mix_unimax", "grapes"], tmp_path / "new")
    assert not (tmp_path / "new").exists()  # nothing written when a name is wrong
