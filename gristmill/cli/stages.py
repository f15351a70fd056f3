"""``gristmill stages [NAME]``: the stages this installation can run.

Without a name: every stage (built-in and from plugins) with its kind and the
first line of its docstring. With a name (or ``module:Class``): its
parameters with types, defaults and help, from its ``Params`` model.
"""

from __future__ import annotations

import argparse
import sys
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined


def _summary(cls: type) -> str:
    doc = (cls.__doc__ or "").strip()
    first = doc.split("\n\n")[0].replace("\n", " ")
    return " ".join(first.split())


def _type_name(annotation: object) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation)
    import re

    text = text.replace("typing.", "").replace("NoneType", "None")
    return re.sub(r"\b(?:[a-z_][a-z0-9_]*\.)+([A-Za-z_]\w*)", r"\1", text)


def _nested_models(annotation: object) -> list[type[BaseModel]]:
    """Pydantic models inside an annotation (``Model``, ``list[Model]``, ``Model | None``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _nested_models(arg)]


def _fields(model: type[BaseModel], indent: str) -> list[str]:
    lines = []
    for field, info in model.model_fields.items():
        if info.default is not PydanticUndefined:
            default = repr(info.default)
        elif info.default_factory is not None:
            default = repr(info.default_factory())
        else:
            default = "required"
        lines.append(f"{indent}{field}: {_type_name(info.annotation)} = {default}")
        if info.description:
            lines.append(f"{indent}    {info.description}")
        for sub in _nested_models(info.annotation):
            lines += _fields(sub, indent + "    ")
    return lines


def describe_stage(name: str) -> str:
    """The parameter table of one stage."""
    from gristmill.pipeline.registry import all_stages, stage_class

    cls = stage_class(name)
    source = all_stages().get(name, name)
    lines = [f"{name}  ({cls.kind} stage, {source})", "", f"  {_summary(cls)}", ""]
    if not cls.Params.model_fields:
        lines.append("  no parameters")
    lines += _fields(cls.Params, "  ")
    needs = cls.requires
    if needs:
        lines += ["", f"  reads columns: {', '.join(needs)}"]
    return "\n".join(lines)


def list_stages() -> list[tuple[str, str, str]]:
    """(name, kind, summary) of every installed stage; a stage that cannot be
    imported (a missing optional dependency) shows why."""
    from gristmill.pipeline.registry import all_stages, stage_class

    rows = []
    for name in sorted(all_stages()):
        try:
            cls = stage_class(name)
            rows.append((name, cls.kind, _summary(cls)))
        except (ValueError, ImportError) as e:
            rows.append((name, "?", f"unavailable: {e}"))
    return rows


def _run(args: argparse.Namespace) -> int:
    if args.name:
        try:
            print(describe_stage(args.name))
        except ValueError as e:
            print(f"gristmill: {e}", file=sys.stderr)
            return 2
        return 0
    rows = list_stages()
    width = max(len(r[0]) for r in rows)
    for name, kind, summary in rows:
        print(f"{name:<{width}}  {kind:<7}  {summary[:100]}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stages", help="list the installed stages, or show one stage's parameters",
                       description="Without NAME: every stage a recipe can use (built-in and "
                       "plugins from the gristmill.stages entry-point group) with its kind. "
                       "With NAME: its parameters, types, defaults and help.")
    p.add_argument("name", nargs="?", help="a stage name or module:Class")
    p.set_defaults(func=_run)
