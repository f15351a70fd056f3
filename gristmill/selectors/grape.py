"""GRAPE: keep, for each instruction, the candidate response the target model fits best.

"The Best Instruction-Tuning Data are Those That Fit" (Zhang et al., 2025).
For an instruction ``x`` with candidate responses ``y^(1) .. y^(K)`` (from
different teachers or samplings) GRAPE scores each candidate by its
length-normalized log-likelihood under the target (base) model ``p``

    s(y) = (1 / |y|) * sum_{t=1..|y|} log p(y_t | x, y_<t)

and keeps ``argmax_k s(y^(k))``: the response closest to the model's own
distribution, which the paper finds gives better SFT than always taking the
strongest teacher. ``reduction: sum`` scores by the unnormalized sum instead
(which favours short responses).

The stage either computes the likelihoods itself (``model: PATH``; the
sequence format of ``gristmill.scorers.likelihood.encode_sft``, chat template
when the tokenizer has one) or reads them from a preceding ``lm_likelihood``
stage (``scores_from: <its name>``: columns ``<name>_response_logprob`` and
``<name>_response_tokens``).

Kept rows get ``<name>_index`` (which candidate won, 0-based),
``<name>_source`` (its ``response_sources`` entry, null when none),
``<name>_score``, ``<name>_margin`` (``s`` of the winner minus ``s`` of the
runner-up, null with fewer than two scorable candidates: how clear the choice
was) and ``response`` (the winning text), so the written shards
are SFT pairs (prompt, response). Ties go to the lowest index. Rows with no
candidate (or none with at least one token under ``mean``) are dropped with
reason ``no_scorable_response``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import model_validator

from gristmill.pipeline.model_cache import is_model_folder
from gristmill.pipeline.stage import RowStage, StageOutput, split_batch
from gristmill.scorers.likelihood import ScoringParams, load_model, score_responses


def best_responses(
    logprob: Sequence[np.ndarray],
    tokens: Sequence[np.ndarray],
    reduction: Literal["mean", "sum"] = "mean",
) -> tuple[np.ndarray, np.ndarray]:
    """Winning candidate and its score per instruction.

    Parameters
    ----------
    logprob : list of float arrays
        ``sum_t log p(y_t | x, y_<t)`` per candidate, one array per instruction.
    tokens : list of int arrays
        ``|y|`` per candidate.
    reduction : {"mean", "sum"}
        ``mean``: ``logprob / |y|`` (GRAPE); ``sum``: ``logprob``.

    Returns
    -------
    index : int64 array
        Argmax per instruction (lowest index on ties), -1 where no candidate
        can be scored (no candidates, or only empty ones under ``mean``).
    score : float64 array
        The winning score (NaN where ``index`` is -1).

    Examples
    --------
    >>> idx, s = best_responses([np.array([-2.0, -6.0])], [np.array([1, 10])], "mean")
    >>> int(idx[0]), float(s[0])
    (1, -0.6)
    >>> int(best_responses([np.array([-2.0, -6.0])], [np.array([1, 10])], "sum")[0][0])
    0
    """
    n = len(logprob)
    index = np.full(n, -1, dtype=np.int64)
    score = np.full(n, np.nan)
    for i, (lp, tk) in enumerate(zip(logprob, tokens, strict=True)):
        lp = np.asarray(lp, dtype=np.float64)
        tk = np.asarray(tk, dtype=np.float64)
        if lp.size == 0:
            continue
        if reduction == "mean":
            s = np.where(tk > 0, lp / np.maximum(tk, 1), -np.inf)
        else:
            s = lp.copy()
        s[np.isnan(s)] = -np.inf
        k = int(np.argmax(s))
        if np.isfinite(s[k]):
            index[i], score[i] = k, s[k]
    return index, score


def score_margins(logprob: Sequence[np.ndarray], tokens: Sequence[np.ndarray],
                  reduction: Literal["mean", "sum"] = "mean") -> np.ndarray:
    """Best minus second-best candidate score per instruction (NaN when fewer
    than two candidates can be scored); scores as in ``best_responses``.

    Examples
    --------
    >>> float(score_margins([np.array([-2.0, -6.0, -1.0])], [np.array([1, 10, 1])])[0])
    0.4
    """
    out = np.full(len(logprob), np.nan)
    for i, (lp, tk) in enumerate(zip(logprob, tokens, strict=True)):
        lp = np.asarray(lp, dtype=np.float64)
        tk = np.asarray(tk, dtype=np.float64)
        s = np.where(tk > 0, lp / np.maximum(tk, 1), -np.inf) if reduction == "mean" else lp
        s = np.sort(s[np.isfinite(s)])
        if s.size >= 2:
            out[i] = s[-1] - s[-2]
    return out


class GrapeParams(ScoringParams):
    """Parameters of the ``grape`` stage.

    Attributes
    ----------
    model : str, optional
        Folder (or URL) of the target model (and tokenizer); the stage scores the
        candidates itself. Exactly one of ``model`` and ``scores_from``.
    scores_from : str, optional
        Name of a preceding ``lm_likelihood`` stage whose response columns to use.
    reduction : {"mean", "sum"}
        Length-normalized (GRAPE) or summed log-likelihood.
    """

    model: str | None = None
    scores_from: str | None = None
    reduction: Literal["mean", "sum"] = "mean"
    prompt_column: str = "prompt"
    responses_column: str = "responses"
    sources_column: str = "response_sources"

    @model_validator(mode="after")
    def _one_score_source(self) -> GrapeParams:
        if (self.model is None) == (self.scores_from is None):
            raise ValueError("grape needs exactly one of model (a model folder to score with) or "
                             "scores_from (the name of a preceding lm_likelihood stage)")
        return self


class Grape(RowStage):
    """Best response per instruction by the target model's likelihood (see module doc).

    Example
    -------
    .. code-block:: yaml

        - stage: grape
          model: ../models/base-lm
          reduction: mean
    """

    type_name = "grape"
    path_fields = ("model",)
    Params = GrapeParams
    extras = ("torch",)

    def check(self, base_dir: str) -> None:
        m = self.params.model
        if m is not None:
            path = self.resolve_path(m)
            if not is_model_folder(path):
                raise ValueError(f"{self.name}.model: {path!r} is not a folder with a model")

    def setup(self) -> None:
        if self.params.model is not None and getattr(self, "_model", None) is None:
            self._model, self._tokenizer = load_model(self.local_path(self.params.model),
                                                      self.params.device, self.params.dtype)

    def input_columns(self) -> tuple[str, ...]:
        p = self.params
        cols = (p.prompt_column, p.responses_column)
        if p.scores_from is not None:
            cols += (f"{p.scores_from}_response_logprob", f"{p.scores_from}_response_tokens")
        return cols

    def output_columns(self) -> tuple[str, ...]:
        return (f"{self.name}_index", f"{self.name}_source", f"{self.name}_score",
                f"{self.name}_margin", "response")

    def _scores(self, batch: pa.Table, responses: list[list[str]]
                ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        p = self.params
        if p.scores_from is not None:
            lp = batch.column(f"{p.scores_from}_response_logprob").to_pylist()
            tk = batch.column(f"{p.scores_from}_response_tokens").to_pylist()
            return ([np.asarray(x or [], dtype=np.float64) for x in lp],
                    [np.asarray(x or [], dtype=np.int64) for x in tk])
        self.setup()
        s = score_responses(self._model, self._tokenizer, batch.column(p.prompt_column).to_pylist(),
                            responses, separator=p.separator, add_eos=p.add_eos,
                            chat_template=p.chat_template, max_length=p.max_length,
                            stride=p.stride, batch_size=p.batch_size,
                            max_batch_tokens=p.max_batch_tokens, progress=p.progress)
        self.backend = s.backend
        return s.logprob, s.tokens

    def process(self, batch: pa.Table) -> StageOutput:
        p = self.params
        responses = [r or [] for r in batch.column(p.responses_column).to_pylist()]
        lp, tk = self._scores(batch, responses)
        index, score = best_responses(lp, tk, p.reduction)
        margin = score_margins(lp, tk, p.reduction)
        sources = (batch.column(p.sources_column).to_pylist()
                   if p.sources_column in batch.column_names else [None] * batch.num_rows)
        chosen = [r[k] if k >= 0 else None for r, k in zip(responses, index, strict=True)]
        source = [s[k] if k >= 0 and s is not None and k < len(s) else None
                  for s, k in zip(sources, index, strict=True)]
        out = batch
        for col, arr in ((f"{self.name}_index", pa.array(index, pa.int32())),
                         (f"{self.name}_source", pa.array(source, pa.string())),
                         (f"{self.name}_score", pa.array(score, pa.float64(), mask=index < 0)),
                         (f"{self.name}_margin", pa.array(margin, pa.float64(),
                                                          mask=np.isnan(margin))),
                         ("response", pa.array(chosen, pa.string()))):
            if col in out.column_names:
                out = out.set_column(out.schema.get_field_index(col), col, arr)
            else:
                out = out.append_column(col, arr)
        details = [f"{len(r)} candidate(s)" for r in responses]
        return split_batch(out, index >= 0, self.name, "no_scorable_response", details)
