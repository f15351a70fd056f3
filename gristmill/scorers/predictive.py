"""PreSelect predictive strength: does a document's loss rank models like a benchmark does?

"Predictive Data Selection: The Data That Predicts Is the Data That Teaches"
(Shum et al., 2025, arXiv:2503.00808). Take ``K`` models with benchmark
scores ``s_1 .. s_K`` and the normalized loss ``C_k(d)`` of document ``d``
under model ``k`` (bits per character, so models with different tokenizers
compare). The predictive strength of ``d`` is (the paper's definition)

    S(d) = 1/Z * sum_{1 <= i, j <= K} 1[s_i > s_j] * 1[C_i(d) < C_j(d)],
    Z = K (K - 1) / 2,

the fraction of model pairs that ``d`` orders as the benchmark does (the
better model compresses ``d`` better): the concordant pairs of a Kendall-tau
comparison between the benchmark ranking and the inverse loss ranking.
``S = 1`` when the loss ranking matches the benchmark ranking exactly.
Pairs tied on the benchmark or on the loss count as not concordant, so with
tied benchmark scores the largest attainable ``S`` is below 1.

Official code (``hkust-nlp/PreSelect``, ``data_processing/fasttext/
train_fasttext.py``) counts the same concordant pairs without dividing by
``Z``, and compares each document's *summed* loss rather than bits per
character; for one document the character count is the same under every
model, so the two give the same pairs. We follow it in labelling: positives
are the documents with the maximal count (the code keeps count 15 of 15 for
its six models), negatives an equal number with the lowest counts. Ties
among the lowest are broken by a hash of (seed, id) here (the code's order
is its file order), so the labels do not depend on partitioning.

Function API::

    bpc = model_losses([("models/a", 40.1), ...], texts)        # (n, K) bits/char
    S = predictive_strength(bpc, scores)                          # in [0, 1]
    label = preselect_labels(S, ids, seed=0)                      # 1, 0 or -1

Stages: ``predictive_strength`` (row) adds ``<name>`` (S), ``<name>_concordant``
(the count) and ``<name>_bpc`` (one value per model, in the order given);
``preselect_label`` (global) keeps the positives and negatives and adds
``<name>`` = 1 or 0.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gristmill.pipeline.hashing import hash64, record_hash
from gristmill.pipeline.model_cache import is_model_folder
from gristmill.pipeline.stage import (
    GlobalStage,
    RowStage,
    StageOutput,
    StageParams,
    keep_all,
    split_batch,
)

# Two values of S closer than this are the same value (S is a count over Z).
_S_TOL = 1e-9


# ----------------------------------------------------------------------------
# Function API


def _pairs(k: int) -> tuple[np.ndarray, np.ndarray]:
    i, j = np.triu_indices(k, 1)
    return i, j


def concordant_pairs(losses: np.ndarray, scores: Sequence[float]) -> np.ndarray:
    """Number of model pairs a document orders as the benchmark does.

    ``sum_{i<j} 1[sign(s_i - s_j) = -sign(C_i - C_j) != 0]``: the better-scored
    model of the pair has the strictly lower loss.

    Parameters
    ----------
    losses : array of shape (n_docs, K)
        Normalized loss ``C_k(d)`` (bits per character) of each document under
        each model; a NaN anywhere in a row gives -1 for that row.
    scores : array of shape (K,)
        Benchmark score ``s_k`` of each model (higher is better).

    Returns
    -------
    int64 array of shape (n_docs,)

    Examples
    --------
    >>> concordant_pairs(np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]]), [10, 20, 30]).tolist()
    [3, 0]
    """
    losses = np.asarray(losses, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if losses.ndim != 2 or losses.shape[1] != scores.shape[0]:
        raise ValueError(f"losses must have shape (n_docs, K={scores.shape[0]}); got {losses.shape}")
    if scores.shape[0] < 2:
        raise ValueError(f"predictive strength needs at least 2 models; got {scores.shape[0]}")
    i, j = _pairs(scores.shape[0])
    ds = np.sign(scores[i] - scores[j])
    dl = np.sign(losses[:, i] - losses[:, j])
    count = (ds * dl == -1).sum(axis=1).astype(np.int64)
    count[np.isnan(losses).any(axis=1)] = -1
    return count


def max_concordant_pairs(scores: Sequence[float]) -> int:
    """The largest attainable count: pairs with distinct benchmark scores."""
    s = np.asarray(scores, dtype=np.float64)
    i, j = _pairs(s.shape[0])
    return int((s[i] != s[j]).sum())


def predictive_strength(losses: np.ndarray, scores: Sequence[float]) -> np.ndarray:
    """``S(d) = concordant_pairs / (K (K - 1) / 2)`` per document (NaN where a loss is NaN).

    Parameters
    ----------
    losses : array of shape (n_docs, K)
        Bits per character of each document under each model.
    scores : array of shape (K,)
        Benchmark scores of the models.

    Returns
    -------
    float64 array of shape (n_docs,), in [0, 1]

    Examples
    --------
    >>> predictive_strength(np.array([[3.0, 1.0, 2.0]]), [10, 20, 30]).round(4).tolist()
    [0.6667]
    """
    count = concordant_pairs(losses, scores)
    k = len(scores)
    s = count / (k * (k - 1) / 2)
    return np.where(count < 0, np.nan, s)


def preselect_labels(strength: np.ndarray, ids: Sequence[str] | pa.Array, *, seed: int = 0,
                     salt: str = "preselect_label") -> np.ndarray:
    """PreSelect classifier labels: 1 for maximal S, 0 for as many with the lowest S, else -1.

    Positives are the documents whose ``S`` equals the largest ``S`` present
    (``S = 1`` once any document ranks the models exactly as the benchmark).
    Negatives are the documents with the lowest ``S``, as many as there are
    positives, ties broken by ``hash64(id, seed, salt)``; when the rest of the
    documents are fewer than the positives, positives are cut to match them
    (lowest hash first), so the classes stay balanced. NaN strengths get -1.

    Raises
    ------
    ValueError
        When every document has the same strength (nothing to contrast).
    """
    s = np.asarray(strength, dtype=np.float64)
    tie = hash64(ids, seed=seed, salt=salt)
    state = label_cut(s, tie)
    return assign_labels(s, tie, state)


def label_cut(s: np.ndarray, tie: np.ndarray) -> dict[str, float | int]:
    """The thresholds of ``preselect_labels`` from every document's (S, hash)."""
    ok = ~np.isnan(s)
    s, tie = s[ok], tie[ok]
    if s.size == 0:
        raise ValueError("no document has a predictive strength (all NaN or none)")
    top = float(s.max())
    pos = s >= top - _S_TOL
    n_pos, n_rest = int(pos.sum()), int((~pos).sum())
    if n_rest == 0:
        raise ValueError(f"all {s.size} documents have the same predictive strength {top:.4g}; "
                         "there are no negatives to contrast (use more or more varied documents)")
    n = min(n_pos, n_rest)
    pos_tie = np.sort(tie[pos])[n - 1]
    rest_s, rest_tie = s[~pos], tie[~pos]
    order = np.lexsort((rest_tie, rest_s))[:n]
    last = order[-1]
    return {"positive_strength": top, "positive_tie": int(pos_tie),
            "negative_strength": float(rest_s[last]), "negative_tie": int(rest_tie[last]),
            "per_class": n, "documents": int(s.size), "maximal": n_pos}


def assign_labels(s: np.ndarray, tie: np.ndarray, state: dict[str, Any]) -> np.ndarray:
    """Labels 1 / 0 / -1 from the thresholds of ``label_cut``."""
    top = state["positive_strength"]
    pos = (s >= top - _S_TOL) & (tie <= np.uint64(state["positive_tie"]))
    neg_s = state["negative_strength"]
    below = s < top - _S_TOL
    neg = below & ((s < neg_s - _S_TOL) |
                   ((np.abs(s - neg_s) <= _S_TOL) & (tie <= np.uint64(state["negative_tie"]))))
    out = np.full(s.shape, -1, dtype=np.int8)
    out[pos] = 1
    out[neg] = 0
    return out


def model_losses(models: Sequence[tuple[str, float]] | Sequence[Any], texts: Sequence[str], *,
                 max_length: int | None = None, stride: int | None = None, batch_size: int = 16,
                 device: str = "auto", dtype: str = "auto", progress: bool = False,
                 loaded: Sequence[tuple[Any, Any]] | None = None) -> np.ndarray:
    """Bits per character of every text under every model, shape (n_texts, K).

    ``bpc = -sum_t log p(x_t | x_<t) / (ln 2 * characters)``, from
    ``gristmill.scorers.likelihood.score_texts`` (sliding windows past the
    model's context). ``models`` are ``(path, score)`` pairs or objects with
    ``path``; ``loaded`` passes already loaded ``(model, tokenizer)`` pairs
    instead of loading from the paths.
    """
    from gristmill.scorers.likelihood import load_model, score_texts

    if loaded is None:
        loaded = [load_model(_path_of(m), device, dtype) for m in models]
    out = np.empty((len(texts), len(loaded)), dtype=np.float64)
    for k, (model, tokenizer) in enumerate(loaded):
        out[:, k] = score_texts(model, tokenizer, texts, max_length=max_length, stride=stride,
                                batch_size=batch_size, progress=progress).bpc
    return out


def _path_of(m: Any) -> str:
    return m[0] if isinstance(m, (tuple, list)) else m.path


# ----------------------------------------------------------------------------
# Stages


class ModelSpec(BaseModel):
    """One model of the family: a local transformers folder and its benchmark score."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str = Field(description="folder (or URL) with a causal LM and its tokenizer")
    score: float = Field(description="benchmark score; higher is better")


class PredictiveStrengthParams(StageParams):
    """Parameters of the ``predictive_strength`` stage.

    Attributes
    ----------
    models : list of {path, score}
        At least 2 models; their scores must not all be equal.
    text_column : str
    max_length, stride, batch_size : int, optional
        Passed to the likelihood scorer (window, window step, rows per pass).
    device, dtype : str
        Where and in what precision the models run (``auto``: CUDA and
        bfloat16 when there is a GPU).
    """

    models: list[ModelSpec] = Field(min_length=2)
    text_column: str = "text"
    max_length: int | None = Field(None, ge=2)
    stride: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    progress: bool = False

    @field_validator("models")
    @classmethod
    def _scores_differ(cls, v: list[ModelSpec]) -> list[ModelSpec]:
        if len({m.score for m in v}) < 2:
            raise ValueError("models: the benchmark scores are all equal, so no pair ranks; "
                             "give models with different scores")
        return v


class PredictiveStrength(RowStage):
    """Adds ``<name>`` (S), ``<name>_concordant`` and ``<name>_bpc`` (list, one per model).

    See the module doc for the formula. Every model is loaded once per
    worker in ``setup``.

    Example
    -------
    .. code-block:: yaml

        - stage: predictive_strength
          models:
            - {path: ../models/small, score: 31.5}
            - {path: ../models/large, score: 44.0}
    """

    type_name = "predictive_strength"
    path_fields = ("models[].path",)
    Params: ClassVar = PredictiveStrengthParams
    extras = ("torch",)

    def input_columns(self) -> tuple[str, ...]:
        return (self.params.text_column,)

    def output_columns(self) -> tuple[str, ...]:
        return (self.name, f"{self.name}_concordant", f"{self.name}_bpc")

    def check(self, base_dir: str) -> None:
        for i, m in enumerate(self.params.models):
            path = self.resolve_path(m.path)
            if not is_model_folder(path):
                raise ValueError(f"{self.name}.models[{i}].path: {path!r} is not a folder "
                                 "with a model")

    def setup(self) -> None:
        if getattr(self, "_loaded", None) is not None:
            return
        from gristmill.scorers.likelihood import load_model

        self._loaded = [load_model(self.local_path(m.path), self.params.device,
                                   self.params.dtype) for m in self.params.models]

    def process(self, batch: pa.Table) -> StageOutput:
        self.setup()
        p = self.params
        col = batch.column(p.text_column)
        texts = [t or "" for t in col.to_pylist()]
        bpc = model_losses(p.models, texts, max_length=p.max_length, stride=p.stride,
                           batch_size=p.batch_size, progress=p.progress, loaded=self._loaded)
        scores = [m.score for m in p.models]
        count = concordant_pairs(bpc, scores)
        strength = predictive_strength(bpc, scores)
        valid = count >= 0
        batch = batch.append_column(self.name, pa.array(strength, pa.float64(), mask=~valid))
        batch = batch.append_column(f"{self.name}_concordant",
                                    pa.array(count, pa.int64(), mask=~valid))
        flat = pa.array(bpc.ravel(), pa.float64(), mask=np.isnan(bpc.ravel()))
        offsets = pa.array(np.arange(0, bpc.size + 1, bpc.shape[1], dtype=np.int32))
        batch = batch.append_column(f"{self.name}_bpc", pa.ListArray.from_arrays(offsets, flat))
        return keep_all(batch)


class PreSelectLabelParams(StageParams):
    """Parameters of the ``preselect_label`` stage.

    Attributes
    ----------
    column : str
        The predictive strength column (a ``predictive_strength`` stage's name).
    """

    column: str = "predictive_strength"


class PreSelectLabel(GlobalStage):
    """Keep PreSelect's positives (maximal S) and as many lowest-S negatives; adds ``<name>``.

    Global: the summary is (S, tie hash) per record, 16 bytes each, which is
    small for the probe sample PreSelect labels (thousands to a few hundred
    thousand documents). Rows that are neither are dropped with reason
    ``unlabelled``. ``artifacts`` publishes the thresholds and class sizes.
    """

    type_name = "preselect_label"
    Params: ClassVar = PreSelectLabelParams

    def input_columns(self) -> tuple[str, ...]:
        return (self.params.column,)

    def output_columns(self) -> tuple[str, ...]:
        return (self.name,)

    def _keys(self, batch: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        s = pc.fill_null(batch.column(self.params.column).cast(pa.float64()), float("nan"))
        return (s.to_numpy(zero_copy_only=False).astype(np.float64),
                record_hash(batch, self.seed, self.name))

    def summarize(self, batch: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        return self._keys(batch)

    def merge(self, a, b):
        return tuple(np.concatenate([x, y]) for x, y in zip(a, b, strict=True))

    def finalize(self, summary) -> dict[str, Any]:
        if summary is None:
            raise ValueError(f"{self.name}: no records reached this stage; nothing to label")
        return label_cut(*summary)

    def apply(self, batch: pa.Table, state: dict[str, Any]) -> StageOutput:
        s, tie = self._keys(batch)
        labels = assign_labels(s, tie, state)
        keep = labels >= 0
        out = split_batch(batch, keep, self.name, "unlabelled",
                          np.array([f"strength={v:.4g}" for v in s], dtype=object))
        out.kept = out.kept.append_column(self.name, pa.array(labels[keep], pa.int8()))
        return out

    def artifacts(self, state: dict[str, Any]) -> dict[str, bytes]:
        return {"labels.json": json.dumps(state, indent=2).encode()}
