"""The C++ MinHash kernel (``csrc/minhash.cpp``): just-in-time build and loading.

Built like the token log-likelihood op (:mod:`gristmill.ext.build`): compiled by
``torch.utils.cpp_extension.load`` with ninja into the same cache folder
(``$GRISTMILL_EXT_CACHE``, default ``~/.cache/gristmill/ext``), one subfolder per
torch version, so later processes only load the library. Only ``-O3``, no
``-march``: the signature loops are compiled three times (baseline x86-64, SSE4.1,
AVX2) and the widest copy the CPU has runs (``pick_isa()`` says which), so one
library serves any x86-64. The kernel uses pybind11 and numpy, no torch symbol:
it is linked ``--as-needed`` (no libtorch dependency), and a process that finds
it built for the current source and flags (in a folder named by their hash,
with ``gristmill_minhash_cpu.stamp`` written after the build) loads it directly, without importing torch: torch costs
each spawned worker ~220 MB of resident memory and a compiler version probe
(``benchmarks/dedup_memory_vs_datatrove.py``). A failed build warns once and
:mod:`gristmill.selectors.minhash` keeps its numpy path; the two give
bit-identical results.

The functions take and return numpy arrays; see ``csrc/minhash.cpp`` for what
each computes and :func:`gristmill.selectors.minhash.signatures` for the maths.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import warnings
from pathlib import Path
from types import ModuleType

CSRC = Path(__file__).parent / "csrc"
NAME = "gristmill_minhash_cpu"

CFLAGS = ("-O3",)
# drop torch's -lc10 -ltorch_cpu ...: nothing in the kernel uses them (libstdc++ first:
# else the C++ runtime symbols that libc10 also exports keep it needed)
LDFLAGS = ("-Wl,--as-needed", "-lstdc++")

_state: dict[str, ModuleType | str | None] = {}


def _build_dir() -> Path:
    """The build folder, found without importing torch (``gristmill.ext.build`` does)."""
    root = os.environ.get("GRISTMILL_EXT_CACHE") or Path.home() / ".cache" / "gristmill" / "ext"
    # the torch version is in the path because an extension is ABI-bound to it
    tag = importlib.metadata.version("torch").replace("+", "_")
    # one folder per source and flags: a change builds afresh (ninja keeps no log here,
    # so it would not relink an existing library for new flags)
    return Path(root) / tag / NAME / _fingerprint()[:16]


def _fingerprint() -> str:
    """What the library was built from: the source and the flags."""
    h = hashlib.sha256((CSRC / "minhash.cpp").read_bytes())
    h.update(repr((CFLAGS, LDFLAGS)).encode())
    return h.hexdigest()


def _load_built() -> ModuleType | None:
    """The library built for the current source and flags, loaded without torch; None
    when there is none (or it does not load: then the build path rebuilds it)."""
    try:
        build_dir = _build_dir()
        so, stamp = build_dir / f"{NAME}.so", build_dir / f"{NAME}.stamp"
        if not (so.is_file() and stamp.is_file() and stamp.read_text() == _fingerprint()):
            return None
        spec = importlib.util.spec_from_file_location(NAME, so)
        if spec is None or spec.loader is None:
            return None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    except (ImportError, OSError):
        return None


def _build() -> ModuleType:
    mod = _load_built()
    if mod is not None:
        return mod
    from torch.utils import cpp_extension

    from gristmill.ext.build import ninja_on_path

    ninja_on_path()
    build_dir, fingerprint = _build_dir(), _fingerprint()
    build_dir.mkdir(parents=True, exist_ok=True)
    mod = cpp_extension.load(
        name=NAME,
        sources=[str(CSRC / "minhash.cpp")],
        extra_cflags=list(CFLAGS),  # copies: load() appends torch's flags in place
        extra_ldflags=list(LDFLAGS),
        build_directory=str(build_dir),
        verbose=False,
    )
    # written after the build: a later process loads the library without torch
    tmp = build_dir / f"{NAME}.stamp.{os.getpid()}"
    tmp.write_text(fingerprint)
    tmp.replace(build_dir / f"{NAME}.stamp")
    return mod


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
