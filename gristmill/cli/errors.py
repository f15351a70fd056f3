"""Errors a command reports as one ``gristmill: ...`` line with exit code 2."""

from __future__ import annotations

from pydantic import ValidationError


class CommandError(Exception):
    """A configuration or usage error found before any work starts."""


def config_error(command: str, err: ValidationError, prefix: str = "") -> CommandError:
    """A ``CommandError`` naming every invalid field of a pydantic config, on one line."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        got = e.get("input")
        got_s = "" if isinstance(got, dict) or e["type"] == "missing" else f" (got {got!r})"
        parts.append(f"{prefix}{loc}: {msg}{got_s}")
    return CommandError(f"{command}: " + "; ".join(parts))
