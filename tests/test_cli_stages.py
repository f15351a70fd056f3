"""The command line: gristmill stages [NAME], --version, no abbreviations, did you mean."""

from __future__ import annotations

import pytest

from gristmill import __version__
from gristmill.cli.main import main


def test_stages_lists_every_stage_with_its_kind(capsys):
    assert main(["stages"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()}
    assert rows["pii"] == "row" and rows["top_fraction"] == "global"
    assert rows["exact_dedup"] == "shuffle" and "decontaminate" in rows


def test_stages_name_prints_parameters_with_types_defaults_and_help(capsys):
    assert main(["stages", "decontaminate"]) == 0
    out = capsys.readouterr().out
    assert "n: int = 13" in out and "n-gram length in words" in out
    assert "eval_sets: list[EvalSet] = required" in out
    assert main(["stages", "gopehr"]) == 2
    assert "did you mean 'gopher'" in capsys.readouterr().err


def test_version_and_no_abbreviated_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"gristmill {__version__}"
    with pytest.raises(SystemExit) as e:
        main(["run", "recipe.yaml", "--worker", "2"])
    assert e.value.code == 2 and "--worker" in capsys.readouterr().err


def test_mistyped_subcommand_suggests_the_closest(capsys):
    with pytest.raises(SystemExit) as e:
        main(["rnu", "x.yaml"])
    assert e.value.code == 2 and "did you mean run" in capsys.readouterr().err
