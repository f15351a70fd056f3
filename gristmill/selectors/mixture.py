"""Domain mixture weights on token counts, and per-step mixture schedules.

All weights here are computed from *token* counts per domain, never document
counts: a domain of few long documents weighs what its tokens weigh.

Methods
-------
Temperature sampling ("Upsample or Upweight? Balanced Training on Heavily
Imbalanced Datasets", Li, Xu, Tan, Murray and Khashabi, NAACL 2025; arXiv
2410.04579, and earlier multilingual work). With
q_i = n_i / sum_j n_j the natural token share of domain i,

    p_i(T) = q_i^(1/T) / sum_j q_j^(1/T)

T = 1 gives the natural mixture, T -> inf the uniform one.

Scalarization ("Upsample or Upweight?"): sample with the natural
mixture q and weight each example's loss by

    w_i = p_i(T) / q_i ,

so the *expected* loss equals the loss under p(T). Since sum_i q_i w_i = 1 the
average weight of a sampled token is 1.

Cooldown ("Upsample or Upweight?", the method it proposes): sample with a high temperature
early and decay it to a low one late in training. ``cooldown_temperature``
gives T(step) for a step, linear or cosine decay that starts at a configurable
fraction of training.

UniMax (Chung et al. 2023, "UniMax: Fairer and More Effective Language
Sampling for Large-Scale Multilingual Pretraining", Algorithm 1): given a
total token budget C and at most N epochs per domain, visit domains from the
smallest to the largest; with B the budget left and k the domains left, give
domain i

    U_i = min(B / k, N * n_i),   B <- B - U_i ,

then p_i = U_i / sum_j U_j. Small domains are capped at N epochs, the rest of
the budget is spread as uniformly as possible over the larger ones.

Example
-------
>>> import numpy as np
>>> temperature_weights(np.array([0.9, 0.1]), 1.0).round(2).tolist()
[0.9, 0.1]
>>> s = MixtureSchedule.constant(["web", "code"], [0.75, 0.25], total_steps=100)
>>> s.weights_at(10).tolist()
[0.75, 0.25]
"""

from __future__ import annotations

import bisect
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

SCHEDULE_FORMAT = "gristmill.mixture_schedule/1"

CooldownShape = Literal["step", "linear", "cosine"]


def token_shares(tokens: Sequence[float] | np.ndarray) -> np.ndarray:
    """Natural token shares q_i = n_i / sum_j n_j (float64, sums to 1)."""
    n = np.asarray(tokens, dtype=np.float64)
    if n.ndim != 1 or n.size == 0:
        raise ValueError("tokens must be a non-empty 1-d sequence of per-domain token counts")
    if np.any(n < 0) or not np.all(np.isfinite(n)):
        raise ValueError("tokens must be finite and >= 0 for every domain")
    total = n.sum()
    if total <= 0:
        raise ValueError("tokens must not all be zero")
    return n / total


def temperature_weights(shares: Sequence[float] | np.ndarray, temperature: float) -> np.ndarray:
    """Temperature-scaled mixture p_i = q_i^(1/T) / sum_j q_j^(1/T).

    Parameters
    ----------
    shares : array of shape (k,)
        Token counts or shares (normalized here) per domain.
    temperature : float
        T >= 1 flattens the mixture, T = inf gives the uniform mixture over
        domains with q_i > 0. Must be > 0.

    Returns
    -------
    numpy.ndarray
        Probabilities over domains; a domain with no tokens gets 0.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (inf for uniform), got {temperature}")
    q = token_shares(shares)
    present = q > 0
    p = np.zeros_like(q)
    if math.isinf(temperature):
        p[present] = 1.0
    else:
        # log-space keeps q^(1/T) finite for tiny shares and small T.
        logp = np.log(q[present]) / temperature
        p[present] = np.exp(logp - logp.max())
    return p / p.sum()


def scalarization_weights(shares: Sequence[float] | np.ndarray,
                          target: Sequence[float] | np.ndarray) -> np.ndarray:
    """Loss weights w_i = p_i / q_i that make sampling from q weigh like p.

    ``shares`` is q (token counts or shares), ``target`` the mixture p to
    emulate, e.g. ``temperature_weights(q, 5)``. Domains with q_i = 0 get 0.
    """
    q = token_shares(shares)
    p = np.asarray(target, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"target has {p.shape[0] if p.ndim else 0} domains, shares have {q.shape[0]}")
    p = p / p.sum()
    w = np.zeros_like(q)
    np.divide(p, q, out=w, where=q > 0)
    return w


def unimax_budget(tokens: Sequence[float] | np.ndarray, budget: float,
                  max_epochs: float) -> np.ndarray:
    """Tokens to draw from each domain under UniMax (Chung et al. 2023, Alg. 1).

    Parameters
    ----------
    tokens : array of shape (k,)
        Token count n_i of every domain.
    budget : float
        Total token budget C.
    max_epochs : float
        N: no domain is drawn more than N times its size.

    Returns
    -------
    numpy.ndarray
        U_i, tokens drawn per domain; sums to C (up to rounding).

    Raises
    ------
    ValueError
        When C > N * sum_i n_i: the budget cannot be met within N epochs.
    """
    n = np.asarray(tokens, dtype=np.float64)
    token_shares(n)  # validates
    if not budget > 0:
        raise ValueError(f"budget must be > 0 tokens, got {budget}")
    if not max_epochs > 0:
        raise ValueError(f"max_epochs must be > 0, got {max_epochs}")
    capacity = max_epochs * n.sum()
    if budget > capacity * (1 + 1e-12):
        raise ValueError(
            f"budget {budget:.0f} tokens exceeds max_epochs * total tokens = {capacity:.0f}; "
            "raise max_epochs or lower the budget")
    order = np.argsort(n, kind="stable")
    alloc = np.zeros_like(n)
    remaining = float(budget)
    for i, d in enumerate(order):
        share = remaining / (n.size - i)
        alloc[d] = min(share, max_epochs * n[d])
        remaining -= alloc[d]
    return alloc


def unimax_weights(tokens: Sequence[float] | np.ndarray, budget: float,
                   max_epochs: float) -> np.ndarray:
    """UniMax sampling distribution p_i = U_i / sum_j U_j (see ``unimax_budget``)."""
    alloc = unimax_budget(tokens, budget, max_epochs)
    return alloc / alloc.sum()


def cooldown_temperature(step: int | np.ndarray, total_steps: int, t_start: float,
                         t_end: float, shape: CooldownShape = "cosine", switch: float = 0.5,
                         end: float = 1.0) -> np.ndarray:
    """Temperature at ``step`` of a Cooldown schedule.

    With progress u = step / total_steps and decay progress
    v = clip((u - switch) / (end - switch), 0, 1):

    - ``step``:   T = t_start if u < switch else t_end
    - ``linear``: T = t_start + (t_end - t_start) * v
    - ``cosine``: T = t_end + (t_start - t_end) * (1 + cos(pi * v)) / 2

    Parameters
    ----------
    switch : float
        Fraction of training in [0, 1) at which the decay starts.
    end : float
        Fraction of training in (switch, 1] at which T reaches t_end (linear
        and cosine; the step shape switches at ``switch``).
    """
    _check_cooldown(total_steps, t_start, t_end, shape, switch, end)
    u = np.asarray(step, dtype=np.float64) / total_steps
    if shape == "step":
        return np.where(u < switch, t_start, t_end).astype(np.float64)
    v = np.clip((u - switch) / (end - switch), 0.0, 1.0)
    if shape == "linear":
        return t_start + (t_end - t_start) * v
    return t_end + (t_start - t_end) * 0.5 * (1.0 + np.cos(np.pi * v))


def _check_cooldown(total_steps: int, t_start: float, t_end: float, shape: str,
                    switch: float, end: float) -> None:
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not (t_start > 0 and t_end > 0):
        raise ValueError(f"t_start and t_end must be > 0, got {t_start}, {t_end}")
    if shape not in ("step", "linear", "cosine"):
        raise ValueError(f"shape must be one of step, linear, cosine; got {shape!r}")
    if not 0.0 <= switch < 1.0:
        raise ValueError(f"switch must be in [0, 1), got {switch}")
    if not switch < end <= 1.0:
        raise ValueError(f"end must be in (switch={switch}, 1], got {end}")


@dataclass
class MixtureSchedule:
    """Domain probabilities for every training step, stored as JSON.

    The schedule is piecewise constant: segment k holds ``weights[k]`` from
    step ``starts[k]`` up to the next start. A constant mixture is one
    segment; a Cooldown schedule has one segment per temperature change.

    Attributes
    ----------
    domains : list of str
        Domain names, in the order of every weight vector.
    total_steps : int
        Training steps the schedule was made for; steps past it keep the last
        segment's weights.
    starts : list of int
        First step of every segment (strictly increasing, starts[0] = 0).
    weights : numpy.ndarray of shape (segments, domains)
        Probabilities per segment (rows sum to 1).
    loss_weights : dict or None
        Per-domain loss weights (scalarization), None when losses are unweighted.
    meta : dict
        How the schedule was made (method, temperatures, token counts).
    """

    domains: list[str]
    total_steps: int
    starts: list[int]
    weights: np.ndarray
    loss_weights: dict[str, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.domains = [str(d) for d in self.domains]
        if len(set(self.domains)) != len(self.domains) or not self.domains:
            raise ValueError(f"domains must be a non-empty list of distinct names, got {self.domains}")
        if int(self.total_steps) < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        self.total_steps = int(self.total_steps)
        w = np.atleast_2d(np.asarray(self.weights, dtype=np.float64))
        if w.shape != (len(self.starts), len(self.domains)):
            raise ValueError(
                f"weights has shape {w.shape}, expected (segments={len(self.starts)}, "
                f"domains={len(self.domains)})")
        if np.any(w < 0) or not np.all(np.isfinite(w)) or np.any(w.sum(axis=1) <= 0):
            raise ValueError("weights must be finite, >= 0 and not all zero in any segment")
        self.weights = w / w.sum(axis=1, keepdims=True)
        self.starts = [int(s) for s in self.starts]
        if self.starts[0] != 0 or any(b <= a for a, b in zip(self.starts, self.starts[1:], strict=False)):
            raise ValueError(f"starts must begin at 0 and increase strictly, got {self.starts[:5]}...")
        if self.loss_weights is not None:
            missing = set(self.domains) - set(self.loss_weights)
            if missing:
                raise ValueError(f"loss_weights lacks domains {sorted(missing)}")
            self.loss_weights = {d: float(self.loss_weights[d]) for d in self.domains}

    # constructors -------------------------------------------------------

    @classmethod
    def constant(cls, domains: Sequence[str], weights: Sequence[float] | np.ndarray,
                 total_steps: int, loss_weights: Mapping[str, float] | None = None,
                 meta: dict[str, Any] | None = None) -> MixtureSchedule:
        """One mixture for the whole run (temperature, UniMax, explicit weights)."""
        return cls(list(domains), total_steps, [0], np.asarray(weights, dtype=np.float64)[None, :],
                   dict(loss_weights) if loss_weights is not None else None,
                   dict(meta or {"method": "constant"}))

    @classmethod
    def temperature(cls, domains: Sequence[str], tokens: Sequence[float] | np.ndarray,
                    temperature: float, total_steps: int) -> MixtureSchedule:
        """Constant temperature sampling p ∝ q^(1/T) over token counts ``tokens``."""
        p = temperature_weights(tokens, temperature)
        return cls.constant(domains, p, total_steps, meta={
            "method": "temperature", "temperature": temperature,
            "tokens": [float(t) for t in tokens]})

    @classmethod
    def scalarization(cls, domains: Sequence[str], tokens: Sequence[float] | np.ndarray,
                      temperature: float, total_steps: int) -> MixtureSchedule:
        """Sample the natural mixture q, weight losses by p_i(T) / q_i."""
        q = token_shares(tokens)
        w = scalarization_weights(q, temperature_weights(q, temperature))
        return cls.constant(domains, q, total_steps,
                            loss_weights=dict(zip(domains, w.tolist(), strict=True)),
                            meta={"method": "scalarization", "temperature": temperature,
                                  "tokens": [float(t) for t in tokens]})

    @classmethod
    def cooldown(cls, domains: Sequence[str], tokens: Sequence[float] | np.ndarray,
                 total_steps: int, t_start: float = 5.0, t_end: float = 1.0,
                 shape: CooldownShape = "cosine", switch: float = 0.5, end: float = 1.0,
                 update_every: int = 1) -> MixtureSchedule:
        """Cooldown: temperature from ``t_start`` to ``t_end`` (``cooldown_temperature``).

        ``update_every`` > 1 changes the mixture only every that many steps,
        which keeps the file small for very long runs.
        """
        _check_cooldown(total_steps, t_start, t_end, shape, switch, end)
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        steps = np.arange(0, total_steps, update_every)
        temps = cooldown_temperature(steps, total_steps, t_start, t_end, shape, switch, end)
        keep = np.ones(steps.size, dtype=bool)
        keep[1:] = temps[1:] != temps[:-1]
        weights = np.stack([temperature_weights(tokens, t) for t in temps[keep]])
        return cls(list(domains), total_steps, steps[keep].tolist(), weights, None, {
            "method": "cooldown", "t_start": t_start, "t_end": t_end, "shape": shape,
            "switch": switch, "end": end, "update_every": update_every,
            "temperatures": temps[keep].tolist(), "tokens": [float(t) for t in tokens]})

    # queries ------------------------------------------------------------

    def weights_at(self, step: int) -> np.ndarray:
        """Probabilities over ``domains`` at training step ``step`` (>= 0)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        k = bisect.bisect_right(self.starts, int(step)) - 1
        return self.weights[k].copy()

    def weights_dict_at(self, step: int) -> dict[str, float]:
        """``weights_at`` as {domain: probability}."""
        return dict(zip(self.domains, self.weights_at(step).tolist(), strict=True))

    def mean_weights(self) -> np.ndarray:
        """Average mixture over the ``total_steps`` steps (what a run consumes)."""
        ends = [*self.starts[1:], self.total_steps]
        lengths = np.clip(np.asarray(ends) - np.asarray(self.starts), 0, None).astype(np.float64)
        if lengths.sum() == 0:
            return self.weights[0].copy()
        return (lengths[:, None] * self.weights).sum(axis=0) / lengths.sum()

    # storage ------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps({
            "format": SCHEDULE_FORMAT,
            "domains": self.domains,
            "total_steps": self.total_steps,
            "segments": [{"start_step": s, "weights": w.tolist()}
                         for s, w in zip(self.starts, self.weights, strict=True)],
            "loss_weights": self.loss_weights,
            "meta": self.meta,
        }, indent=1)

    @classmethod
    def from_json(cls, text: str) -> MixtureSchedule:
        obj = json.loads(text)
        if obj.get("format") != SCHEDULE_FORMAT:
            raise ValueError(f"not a mixture schedule: format is {obj.get('format')!r}, "
                             f"expected {SCHEDULE_FORMAT!r}")
        segs = obj["segments"]
        return cls(obj["domains"], obj["total_steps"], [s["start_step"] for s in segs],
                   np.asarray([s["weights"] for s in segs], dtype=np.float64),
                   obj.get("loss_weights"), obj.get("meta") or {})

    def save(self, path: str | os.PathLike) -> None:
        """Write the schedule as JSON, atomically (temporary file, then rename)."""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".schedule-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.to_json())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> MixtureSchedule:
        with open(path) as f:
            return cls.from_json(f.read())
