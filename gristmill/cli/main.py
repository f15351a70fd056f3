"""The ``gristmill`` command line: one parser, a subcommand per module.

Every module in ``COMMAND_MODULES`` (all in ``gristmill.cli``) defines
``add_parser(subparsers)``, which registers its subcommand and sets ``func``.
Algorithm modules hold no argument parsing. A command reports a configuration
error by raising ``CommandError`` (``gristmill.cli.errors``): one
``gristmill: ...`` line on stderr and exit code 2, like recipe errors.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gristmill.cli.errors import CommandError
from gristmill.extras import MissingExtra, extra_providing, missing_modules

COMMAND_MODULES: list[str] = [
    "gristmill.cli.pipeline",
    "gristmill.cli.sft",
    "gristmill.cli.distill",
    "gristmill.cli.preselect",
    "gristmill.cli.lm",
    "gristmill.cli.examples",
    "gristmill.cli.real_corpus",
    "gristmill.cli.stages",
    "gristmill.cli.cache",
]


class _Parser(argparse.ArgumentParser):
    """No abbreviated options (``--worker 2`` is an error, not ``--workers``), and
    "did you mean" for a mistyped subcommand."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        if "invalid choice:" in message:
            import difflib
            import re

            m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
            if m:
                choices = re.findall(r"'([^']*)'", m.group(2)) or m.group(2).split(", ")
                close = difflib.get_close_matches(m.group(1), choices, n=3, cutoff=0.5)
                if close:
                    message += f"; did you mean {' or '.join(close)}?"
        super().error(message)


def _quiet_on_broken_pipe(main):
    """``gristmill inspect out | head`` ends quietly when ``head`` closes the pipe."""
    import functools
    import os

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except BrokenPipeError:
            # Python flushes stdout at exit; point it at devnull so that flush cannot fail
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 1

    return wrapper


def build_parser() -> argparse.ArgumentParser:
    from gristmill import __version__

    parser = _Parser(
        prog="gristmill",
        description="Data selection and curation for LLM pretraining and fine-tuning.",
    )
    parser.add_argument("--version", action="version", version=f"gristmill {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    return parser


@_quiet_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CommandError as e:
        print(f"gristmill: {e}", file=sys.stderr)
        return 2
    except MissingExtra as e:
        print(f"gristmill: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        # a command that imports an optional dependency lazily: name the extra to install,
        # when that extra is in fact incomplete (not for a broken install of a present one)
        extra = extra_providing(e.name or "")
        if extra is None or not missing_modules(extra):
            raise
        print(f"gristmill: gristmill {args.command} "
              f"{MissingExtra(extra, '', missing_modules(extra)).reason}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
