"""Optional dependency groups ("extras") and the one line that names a missing one.

``pip install gristmill`` installs the core: the local engine and the stages
that need only pyarrow, numpy and scipy (filters, exact and MinHash dedup,
text statistics, sampling, top fraction, mixtures). The rest is an extra,
``pip install 'gristmill[torch]'`` and so on; ``pyproject.toml`` lists the
distributions, :data:`EXTRAS` the modules they provide.

Nothing here imports an optional module: presence is looked up with
:func:`importlib.util.find_spec`, so checking a recipe stays fast and reads
no data. Who needs an extra says so: a stage through ``Stage.required_extras``
(checked by ``check_recipe``), an engine through :data:`ENGINE_EXTRAS`, an
object-store path through :data:`PROTOCOL_EXTRAS`, a command by calling
:func:`require` before it starts.

Example
-------
>>> from gristmill.extras import EXTRAS, install_hint
>>> install_hint("beam")
"pip install 'gristmill[beam]'"
>>> "torch" in EXTRAS["torch"]
True
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

#: extra -> the top-level modules its distributions provide (pyproject.toml)
EXTRAS: dict[str, tuple[str, ...]] = {
    "dask": ("dask", "distributed"),
    "beam": ("apache_beam",),
    "s3": ("s3fs", "upath"),
    "gcs": ("gcsfs", "upath"),
    "torch": ("torch", "transformers"),
    "fasttext": ("fasttext", "sklearn"),
    "ot": ("ot", "torch", "sklearn"),
    "distill": ("torch", "sklearn", "matplotlib"),
    "corpus": ("lxml",),
    "substring": ("pydivsufsort",),
}

#: engine kind -> the extra it needs (the local engine is core)
ENGINE_EXTRAS: dict[str, str] = {"dask": "dask", "beam": "beam"}

#: URL protocol of a source or output path -> the extra with its fsspec backend
PROTOCOL_EXTRAS: dict[str, str] = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


class MissingExtra(ImportError):
    """An extra that something needs is not installed; ``str()`` is the one-line fix.

    Parameters
    ----------
    extra : str
        A key of :data:`EXTRAS`.
    needed_by : str
        What needs it, as the user named it (``"stages[2] (lm_likelihood)"``,
        ``"engine.kind: beam"``, ``"gristmill sft"``).
    modules : list of str
        The modules of the extra that are missing.
    """

    def __init__(self, extra: str, needed_by: str, modules: list[str]) -> None:
        self.extra = extra
        self.needed_by = needed_by
        self.modules = modules
        #: the message without ``needed_by``: "needs the 'x' extra (...): pip install ..."
        self.reason = (f"needs the '{extra}' extra ({', '.join(modules)} not installed): "
                       f"{install_hint(extra)}")
        super().__init__(f"{needed_by} {self.reason}")


def install_hint(extra: str) -> str:
    """The pip command that installs ``extra``."""
    return f"pip install 'gristmill[{extra}]'"


def _present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder refused it, or a broken half-import
        return False


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (empty when it is installed).

    Parameters
    ----------
    extra : str
        A key of :data:`EXTRAS`; KeyError names the valid ones.

    Returns
    -------
    list of str
    """
    if extra not in EXTRAS:
        raise KeyError(f"unknown extra {extra!r}; valid: {', '.join(EXTRAS)}")
    return [m for m in EXTRAS[extra] if not _present(m)]


def require(extra: str, needed_by: str) -> None:
    """Raise :class:`MissingExtra` unless every module of ``extra`` is importable.

    Parameters
    ----------
    extra : str
        A key of :data:`EXTRAS`.
    needed_by : str
        What needs it, for the message.
    """
    missing = missing_modules(extra)
    if missing:
        raise MissingExtra(extra, needed_by, missing)


def require_all(extras: Iterable[str], needed_by: str) -> None:
    """:func:`require` each of ``extras``, in order."""
    for extra in extras:
        require(extra, needed_by)


def extra_providing(module: str) -> str | None:
    """The first extra whose distributions provide top-level ``module`` (``torch.nn`` -> torch).

    For turning a ``ModuleNotFoundError`` raised deep inside a command into
    the install line; None for a module that no extra provides.
    """
    top = module.partition(".")[0]
    return next((extra for extra, mods in EXTRAS.items() if top in mods), None)
