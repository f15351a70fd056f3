"""The batched token log-likelihood op: C++ (CPU), CUDA, and a pure-PyTorch fallback.

>>> from gristmill.ext import token_logprobs, token_logprobs_from_logits, backend

See ``docs/ext.md``.
"""

from gristmill.ext.logprob import backend, token_logprobs, token_logprobs_from_logits

__all__ = ["backend", "token_logprobs", "token_logprobs_from_logits"]
