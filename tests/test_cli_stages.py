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
    assert "      name: str = required\n          name used in reasons" in out  # nested model
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


@pytest.mark.parametrize("argv, expected", [
    (["train-lm", "{missing}"], "gristmill: train-lm: no config file at"),
    (["train-lm", "{bad}", "--set", "max_steps=-3"], "max_steps: Input should be greater than"),
    (["sft", "--model", "{tmp}", "--data", "x", "--out", "y", "--steps", "0"],
     "gristmill: sft: steps: Input should be greater than or equal to 1"),
    (["distill", "--dataset", "digits", "--ipc", "0", "--output", "{tmp}/o"],
     "gristmill: distill: ipc: Input should be greater than or equal to 1"),
    (["tokenize", "--tokenizer", "{missing}", "--out", "x", "{tmp}"],
     "gristmill: tokenize: --tokenizer"),
])
def test_config_errors_of_commands_are_one_line_with_exit_code_2(argv, expected, tmp_path,
                                                                  capsys):
    bad = tmp_path / "lm.yaml"
    bad.write_text("train: [x]\nout_dir: o\n")
    argv = [a.format(missing=tmp_path / "none.yaml", bad=bad, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gristmill: ") and err.count("\n") == 1 and expected in err, err


def test_every_option_of_every_command_has_help():
    import argparse

    from gristmill.cli.main import build_parser

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                yield f"{path}: {action.option_strings or action.dest}"

    assert list(walk(build_parser(), "gristmill")) == []


def test_a_closed_pipe_ends_the_command_quietly():
    import subprocess
    import sys

    code = ("from gristmill.cli.main import _quiet_on_broken_pipe\n"
            "@_quiet_on_broken_pipe\n"
            "def main():\n"
            "    for i in range(1_000_000):\n"
            "        print(f'line {i} ' + 'x' * 60)\n"
            "raise SystemExit(main())\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"line 0")
    proc.stdout.close()  # what `| head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert err == "", err
