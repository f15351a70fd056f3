"""Batched token log-likelihood: argument checks and dispatch to a backend.

Backends, chosen per call from the device of the inputs:

- ``"cpp"``: the C++ kernel (``csrc/logprob_cpu.cpp``) for CPU tensors;
- ``"cuda"``: the CUDA kernels (``csrc/logprob_cuda.cpp`` + ``csrc/logprob_kernels.cu``)
  for CUDA tensors;
- ``"torch"``: the tiled pure-PyTorch implementation (``reference.py``) for any
  device, used when the extension could not be built or when forced.

``GRISTMILL_EXT=torch`` in the environment, or ``impl="torch"`` on a call, forces the
torch implementation; ``GRISTMILL_EXT=native`` (or ``impl="native"``) requires the
compiled one and raises instead of falling back.
"""

from __future__ import annotations

import os

import torch

from gristmill.ext import build
from gristmill.ext.reference import token_logprobs_from_logits_torch, token_logprobs_torch

_IMPLS = ("auto", "torch", "native")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _requested_impl(impl: str | None) -> str:
    chosen = impl if impl is not None else os.environ.get("GRISTMILL_EXT", "auto")
    if chosen not in _IMPLS:
        source = "impl" if impl is not None else "GRISTMILL_EXT"
        raise ValueError(f"{source} must be one of {', '.join(_IMPLS)}; got {chosen!r}")
    return chosen


def backend(device: str | torch.device = "cpu", impl: str | None = None) -> str:
    """Which implementation runs for tensors on ``device``: ``"cpp"``, ``"cuda"`` or ``"torch"``.

    Builds (or loads from the cache) the compiled extension for that device on first
    use; a failed build warns once and answers ``"torch"``.

    Parameters
    ----------
    device : str or torch.device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
    impl : {"auto", "torch", "native"}, optional
        Overrides the ``GRISTMILL_EXT`` environment variable (default ``"auto"``).

    Examples
    --------
    >>> from gristmill.ext import backend
    >>> backend("cpu") in ("cpp", "torch")
    True
    """
    chosen = _requested_impl(impl)
    device_type = torch.device(device).type
    if chosen == "torch" or device_type not in ("cpu", "cuda"):
        if chosen == "native":
            raise RuntimeError(f"no compiled token_logprobs for device type {device_type!r}")
        return "torch"
    module = build.extension(device_type, required=chosen == "native")
    if module is None:
        return "torch"
    return "cpp" if device_type == "cpu" else "cuda"


def _check_targets(targets: torch.Tensor, n: int, vocab: int, ignore_index: int) -> torch.Tensor:
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(f"targets must have shape [{n}]; got {list(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32; got {targets.dtype}")
    targets = targets.long()
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if n and bool(bad.any()):
        first = int(targets[bad][0])
        raise ValueError(
            f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}; got {first}"
        )
    return targets.contiguous()


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """Log-probability of each target token under ``softmax(hidden @ weight.T + bias)``.

    For token ``i``::

        log p(y_i) = h_i . w_{y_i} + b_{y_i} - log sum_v exp(h_i . w_v + b_v)

    computed over vocabulary tiles with a running maximum and running sum per token
    (online log-sum-exp; Cut Cross-Entropy, Wijmans et al. 2024), accumulated in
    fp32, so the ``N x V`` logits never exist. Inference only: no gradient.

    Parameters
    ----------
    hidden : Tensor[N, d]
        Final hidden states, float32, bfloat16 or float16.
    weight : Tensor[V, d]
        LM head (unembedding), same dtype and device as ``hidden``.
    targets : LongTensor[N]
        Target token ids in ``[0, V)``, or ``ignore_index``.
    bias : Tensor[V], optional
        LM head bias, same dtype and device.
    ignore_index : int
        Positions whose target equals it get 0.0.
    impl : {"auto", "torch", "native"}, optional
        Force an implementation; default from ``GRISTMILL_EXT`` or ``"auto"``.

    Returns
    -------
    Tensor[N] float32

    Examples
    --------
    >>> import torch
    >>> from gristmill.ext import token_logprobs
    >>> h, w = torch.randn(5, 8), torch.randn(11, 8)
    >>> y = torch.tensor([0, 3, -100, 10, 2])
    >>> ref = torch.log_softmax(h @ w.T, -1).gather(1, y.clamp(min=0)[:, None])[:, 0]
    >>> got = token_logprobs(h, w, y)
    >>> bool(torch.allclose(got[[0, 1, 3, 4]], ref[[0, 1, 3, 4]], atol=1e-5)), float(got[2])
    (True, 0.0)
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [N, d] and weight [V, d] with the same d; got "
            f"{list(hidden.shape)} and {list(weight.shape)}"
        )
    if hidden.dtype not in _FLOAT_DTYPES or weight.dtype != hidden.dtype:
        raise ValueError(
            f"hidden and weight must share one dtype of float32, bfloat16, float16; got "
            f"{hidden.dtype} and {weight.dtype}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row (V >= 1)")
    devices = {hidden.device, weight.device, targets.device}
    if bias is not None:
        if bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype:
            raise ValueError(
                f"bias must be [{weight.shape[0]}] of dtype {hidden.dtype}; got "
                f"{list(bias.shape)} of {bias.dtype}"
            )
        devices.add(bias.device)
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device; got {sorted(map(str, devices))}")
    targets = _check_targets(targets, hidden.shape[0], weight.shape[0], ignore_index)
    with torch.no_grad():
        if backend(hidden.device, impl) == "torch":
            return token_logprobs_torch(hidden, weight, targets, bias, ignore_index)
        module = build.extension(hidden.device.type)
        return module.token_logprobs(
            hidden.contiguous(),
            weight.contiguous(),
            targets,
            bias.contiguous() if bias is not None else None,
            ignore_index,
        )


def token_logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """``log_softmax(logits, -1).gather(targets)`` in fp32 without an fp32 copy of the logits.

    Parameters
    ----------
    logits : Tensor[N, V]
        float32, bfloat16 or float16.
    targets : LongTensor[N]
    ignore_index : int
    impl : {"auto", "torch", "native"}, optional

    Returns
    -------
    Tensor[N] float32, 0.0 where ``targets == ignore_index``.
    """
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [N, V] with V >= 1; got {list(logits.shape)}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"logits must be float32, bfloat16 or float16; got {logits.dtype}")
    if targets.device != logits.device:
        raise ValueError(f"targets on {targets.device} but logits on {logits.device}")
    targets = _check_targets(targets, logits.shape[0], logits.shape[1], ignore_index)
    with torch.no_grad():
        if backend(logits.device, impl) == "torch":
            return token_logprobs_from_logits_torch(logits, targets, ignore_index)
        module = build.extension(logits.device.type)
        return module.token_logprobs_from_logits(logits.contiguous(), targets, ignore_index)
