"""The batched token log-likelihood op: C++ (CPU), CUDA, and a pure-PyTorch fallback.

>>> from gristmill.ext import token_logprobs, token_logprobs_from_logits, backend

See ``docs/ext.md``. The op needs the ``torch`` extra; it is imported on first
use of these names, so ``gristmill.ext.minhash_native`` (which falls back to
numpy without torch) can be imported in a core-only install.
"""

from __future__ import annotations

from typing import Any

__all__ = ["backend", "token_logprobs", "token_logprobs_from_logits"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from gristmill.ext import logprob

        return getattr(logprob, name)
    raise AttributeError(f"module 'gristmill.ext' has no attribute {name!r}")
