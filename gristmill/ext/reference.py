"""Pure-PyTorch token log-likelihood in vocabulary tiles: the reference and the fallback.

The same numbers as ``log_softmax(hidden @ weight.T + bias).gather(targets)`` without
materializing the ``N x V`` logits: the vocabulary is walked in tiles of ``vocab_tile``
columns and every token keeps a running maximum ``m`` and a running sum ``s`` of
``exp(z - m)`` (the online log-sum-exp of Milakov & Gimelshein, "Online normalizer
calculation for softmax", 2018), the method of Cut Cross-Entropy (Wijmans et al.,
"Cut Your Losses in Large-Vocabulary Language Models", 2024) and of Liger's fused
linear cross-entropy, here for inference only.
"""

from __future__ import annotations

import torch

#: Columns of the vocabulary processed at once by the torch implementation.
DEFAULT_VOCAB_TILE = 2048
#: Rows (tokens) processed at once; with ``DEFAULT_VOCAB_TILE`` a tile of fp32
#: logits is 8 MiB.
DEFAULT_TOKEN_TILE = 1024


def token_logprobs_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    *,
    token_tile: int = DEFAULT_TOKEN_TILE,
    vocab_tile: int = DEFAULT_VOCAB_TILE,
) -> torch.Tensor:
    """``log p(target)`` per token, tiled over tokens and vocabulary, in fp32.

    For token ``i`` with hidden state ``h_i`` and target ``y_i``::

        log p(y_i) = z_{i,y_i} - log sum_v exp(z_{i,v}),   z_{i,v} = h_i . w_v + b_v

    computed per tile of ``vocab_tile`` columns with the online log-sum-exp::

        m' = max(m, max_v z_v),   s' = s * exp(m - m') + sum_v exp(z_v - m')

    and ``log sum = m + log s`` at the end. Logits of a tile are computed in the
    input dtype's matmul with an fp32 result (bf16/fp16 inputs are upcast per tile),
    so memory beyond the inputs is one ``token_tile x vocab_tile`` fp32 tile.

    Parameters
    ----------
    hidden : Tensor[N, d]
    weight : Tensor[V, d]
    targets : LongTensor[N]
        Values in ``[0, V)`` or ``ignore_index``.
    bias : Tensor[V], optional
    ignore_index : int
        Targets equal to it get 0.0.
    token_tile, vocab_tile : int
        Tile sizes (>= 1).

    Returns
    -------
    Tensor[N] float32
    """
    n = hidden.shape[0]
    out = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return out
    vocab = weight.shape[0]
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    for t0 in range(0, n, token_tile):
        t1 = min(t0 + token_tile, n)
        h = hidden[t0:t1].float()
        tgt = safe_targets[t0:t1]
        m = torch.full((t1 - t0,), -float("inf"), dtype=torch.float32, device=hidden.device)
        s = torch.zeros(t1 - t0, dtype=torch.float32, device=hidden.device)
        z_target = torch.zeros(t1 - t0, dtype=torch.float32, device=hidden.device)
        for v0 in range(0, vocab, vocab_tile):
            v1 = min(v0 + vocab_tile, vocab)
            z = h @ weight[v0:v1].float().T
            if bias is not None:
                z += bias[v0:v1].float()
            m_new = torch.maximum(m, z.amax(dim=1))
            s = s * torch.exp(m - m_new) + torch.exp(z - m_new[:, None]).sum(dim=1)
            m = m_new
            inside = (tgt >= v0) & (tgt < v1)
            local = (tgt - v0).clamp(0, v1 - v0 - 1)
            picked = z.gather(1, local[:, None]).squeeze(1)
            z_target = torch.where(inside, picked, z_target)
        out[t0:t1] = torch.where(valid[t0:t1], z_target - (m + torch.log(s)), 0.0)
    return out


def token_logprobs_from_logits_torch(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    *,
    vocab_tile: int = DEFAULT_VOCAB_TILE,
) -> torch.Tensor:
    """``log_softmax(logits).gather(targets)`` in fp32, one vocabulary tile upcast at a time.

    Parameters
    ----------
    logits : Tensor[N, V]
    targets : LongTensor[N]
    ignore_index : int
    vocab_tile : int

    Returns
    -------
    Tensor[N] float32, 0.0 where ``targets == ignore_index``.
    """
    n, vocab = logits.shape
    out = torch.zeros(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return out
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    m = torch.full((n,), -float("inf"), dtype=torch.float32, device=logits.device)
    s = torch.zeros(n, dtype=torch.float32, device=logits.device)
    for v0 in range(0, vocab, vocab_tile):
        z = logits[:, v0 : v0 + vocab_tile].float()
        m_new = torch.maximum(m, z.amax(dim=1))
        s = s * torch.exp(m - m_new) + torch.exp(z - m_new[:, None]).sum(dim=1)
        m = m_new
    z_target = logits.gather(1, safe_targets[:, None]).squeeze(1).float()
    out = torch.where(valid, z_target - (m + torch.log(s)), out)
    return out
