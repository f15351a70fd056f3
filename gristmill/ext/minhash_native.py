"""The C++ MinHash kernel (``csrc/minhash.cpp``): just-in-time build and loading.

Built like the token log-likelihood op (:mod:`gristmill.ext.build`): compiled by
``torch.utils.cpp_extension.load`` with ninja into the same cache folder
(``$GRISTMILL_EXT_CACHE``, default ``~/.cache/gristmill/ext``), one subfolder per
torch version, so later processes only load the library. Only ``-O3``, no
``-march``: the signature loops are compiled three times (baseline x86-64, SSE4.1,
AVX2) and the widest copy the CPU has runs (``pick_isa()`` says which), so one
library serves any x86-64. A failed build warns once and
:mod:`gristmill.selectors.minhash` keeps its numpy path; the two give
bit-identical results.

The functions take and return numpy arrays; see ``csrc/minhash.cpp`` for what
each computes and :func:`gristmill.selectors.minhash.signatures` for the maths.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import ModuleType

CSRC = Path(__file__).parent / "csrc"
NAME = "gristmill_minhash_cpu"

_state: dict[str, ModuleType | str | None] = {}


def _build() -> ModuleType:
    import torch
    from torch.utils import cpp_extension

    from gristmill.ext.build import cache_dir, ninja_on_path

    ninja_on_path()
    # the torch version is in the path because an extension is ABI-bound to it
    build_dir = cache_dir() / torch.__version__.replace("+", "_") / NAME
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=NAME,
        sources=[str(CSRC / "minhash.cpp")],
        extra_cflags=["-O3"],
        build_directory=str(build_dir),
        verbose=False,
    )


def _cause(exc: Exception) -> str:
    """Why the build failed, in one line; a missing torch names the extra that brings it."""
    from gristmill.extras import extra_providing, install_hint

    if isinstance(exc, ModuleNotFoundError) and extra_providing(exc.name or "") == "torch":
        return (f"{exc.name} is not installed; the kernel is built with torch's C++ extension "
                f"tooling ({install_hint('torch')})")
    return f"{type(exc).__name__}: {exc}"


def module(required: bool = False) -> ModuleType | None:
    """The compiled kernel, built on first use; None when the build failed.

    Parameters
    ----------
    required : bool
        Raise RuntimeError with the build error instead of returning None.
    """
    if "module" not in _state:
        try:
            _state["module"] = _build()
        except Exception as exc:  # any compiler, linker or loader failure means: fall back
            _state["module"] = None
            _state["error"] = _cause(exc)
            warnings.warn(
                "gristmill.ext: building the C++ MinHash kernel failed, using the numpy code "
                "instead (set `kernel: numpy` on minhash_dedup to silence). "
                f"Cause: {_state['error'][:2000]}",
                RuntimeWarning,
                stacklevel=3,
            )
    mod = _state["module"]
    if mod is None and required:
        raise RuntimeError(
            f"the C++ MinHash kernel is required (kernel: native) but its build failed: "
            f"{_state['error']}"
        )
    return mod  # type: ignore[return-value]


def build_error() -> str | None:
    """The error of a failed build, or None if it built or was not tried."""
    err = _state.get("error")
    return err if isinstance(err, str) else None
