"""The recipes that ship with gristmill: the demo and the examples.

They are package data, so an installed wheel has them in any folder. A
recipe resolves relative paths against its own folder, and these read
``../data/...`` and write ``../out/...``: they are meant to sit in
``ROOT/recipes/`` of a working folder. ``gristmill demo`` and ``gristmill
examples`` copy the ones they need there (:func:`install`), so the user has a
file to read, edit and run again with ``gristmill run recipes/NAME.yaml``.

Example
-------
>>> from gristmill import recipes
>>> "demo" in recipes.names()
True
>>> recipes.path("demo").name
'demo.yaml'
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

FOLDER = Path(__file__).parent


def names() -> list[str]:
    """Names of the shipped recipes (file names without ``.yaml``), sorted."""
    return sorted(p.stem for p in FOLDER.glob("*.yaml"))


def path(name: str) -> Path:
    """The shipped recipe ``name``; ValueError lists the valid names.

    Parameters
    ----------
    name : str
        A recipe name such as ``"demo"`` (``"demo.yaml"`` is accepted too).

    Returns
    -------
    Path
        The file inside the installed package. Run it from a copy in a
        working folder (:func:`install`): its relative paths point next to it.
    """
    stem = name.removesuffix(".yaml")
    found = FOLDER / f"{stem}.yaml"
    if not found.is_file():
        raise ValueError(f"no shipped recipe {name!r}; valid: {', '.join(names())}")
    return found


@dataclass(frozen=True)
class Installed:
    """Where :func:`install` put a recipe, and whether that file is the shipped one.

    Attributes
    ----------
    path : Path
        ``ROOT/recipes/NAME.yaml``.
    status : {"written", "same", "edited"}
        ``written``: copied now; ``same``: already there, identical to the
        shipped one; ``edited``: already there and different (the user's copy
        is kept and used).
    """

    path: Path
    status: str


def install(recipe_names: list[str], root: str | Path = ".") -> list[Installed]:
    """Copy shipped recipes into ``root/recipes/``; an existing file is never overwritten.

    Parameters
    ----------
    recipe_names : list of str
        Names from :func:`names`.
    root : str or Path
        The working folder: recipes go to ``root/recipes``, and their relative
        paths then read ``root/data`` and write ``root/out``.

    Returns
    -------
    list of Installed
        One per name, in order.
    """
    sources = [path(n) for n in recipe_names]  # every name checked before anything is written
    folder = Path(root) / "recipes"
    out = []
    for src in sources:
        dest = folder / src.name
        if dest.exists():
            same = dest.read_bytes() == src.read_bytes()
            out.append(Installed(dest, "same" if same else "edited"))
            continue
        folder.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(src, tmp)
        tmp.replace(dest)
        out.append(Installed(dest, "written"))
    return out
