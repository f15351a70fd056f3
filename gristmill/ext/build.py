"""Just-in-time build of the C++ and CUDA extensions, cached on disk.

``torch.utils.cpp_extension.load`` compiles ``csrc/`` with ninja into a cache folder
(``$GRISTMILL_EXT_CACHE``, default ``~/.cache/gristmill/ext``), one subfolder per
torch version and device kind, so a process after the first only loads the built
library (ninja finds nothing to do; torch's file lock serializes parallel builds).
A build that fails warns once, with the compiler's message, and the caller falls back
to the pure-PyTorch implementation.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).parent / "csrc"

_SOURCES = {
    "cpu": ["logprob_cpu.cpp"],
    "cuda": ["logprob_cuda.cpp", "logprob_kernels.cu"],
}
_modules: dict[str, ModuleType | None] = {}
_errors: dict[str, str] = {}


def cache_dir() -> Path:
    """Where built extensions live: ``$GRISTMILL_EXT_CACHE`` or ``~/.cache/gristmill/ext``."""
    root = os.environ.get("GRISTMILL_EXT_CACHE") or Path.home() / ".cache" / "gristmill" / "ext"
    return Path(root)


def ninja_on_path() -> None:
    """Put the ninja wheel's binary on ``PATH`` when it is not there already.

    torch's extension builder runs ``ninja`` from ``PATH``; the ``ninja`` wheel
    (the ``torch`` extra) installs it into the environment's ``bin`` folder,
    which is not on ``PATH`` when a venv's ``gristmill`` is run without
    activating the venv.
    """
    if shutil.which("ninja"):
        return
    folders = [Path(sys.executable).parent]
    try:
        import ninja

        folders.insert(0, Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    for folder in folders:
        if (folder / "ninja").is_file():
            os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
            return


def _cpu_arch_flags() -> list[str]:
    """AVX2/FMA flags when this CPU has them: the tile reductions are written to vectorize."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if "avx2" in flags and "fma" in flags else []


def _build(device_type: str) -> ModuleType:
    from torch.utils import cpp_extension

    ninja_on_path()
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("torch.cuda.is_available() is False")
    # The torch version is in the path because an extension is ABI-bound to it.
    tag = torch.__version__.replace("+", "_")
    name = f"gristmill_logprob_{device_type}"
    build_dir = cache_dir() / tag / name
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(CSRC / s) for s in _SOURCES[device_type]]
    cflags = ["-O3", *_cpu_arch_flags()]
    cuda_flags = ["-O3", "--use_fast_math"] if device_type == "cuda" else None
    return cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=cflags,
        extra_cuda_cflags=cuda_flags,
        build_directory=str(build_dir),
        verbose=False,
    )


def extension(device_type: str, required: bool = False) -> ModuleType | None:
    """The compiled module for ``"cpu"`` or ``"cuda"``, built on first use; None if it failed.

    Parameters
    ----------
    device_type : {"cpu", "cuda"}
    required : bool
        Raise RuntimeError with the build error instead of returning None.
    """
    if device_type not in _modules:
        try:
            _modules[device_type] = _build(device_type)
        except Exception as exc:  # any compiler, linker or loader failure means: fall back
            _modules[device_type] = None
            _errors[device_type] = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"gristmill.ext: building the {device_type} extension failed, using the "
                f"pure-PyTorch token_logprobs instead (set GRISTMILL_EXT=torch to silence). "
                f"Cause: {_errors[device_type][:2000]}",
                RuntimeWarning,
                stacklevel=3,
            )
    module = _modules[device_type]
    if module is None and required:
        raise RuntimeError(
            f"the compiled {device_type} token_logprobs is required (GRISTMILL_EXT=native) "
            f"but its build failed: {_errors[device_type]}"
        )
    return module


def build_error(device_type: str) -> str | None:
    """The error of a failed build for ``device_type``, or None if it built or was not tried."""
    return _errors.get(device_type)
