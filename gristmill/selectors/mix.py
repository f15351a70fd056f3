"""The ``mix`` stage: sample a token budget from domains by a mixture.

``summarize`` counts tokens per domain, ``finalize`` turns a sampler
(temperature, scalarization, UniMax, Cooldown or explicit weights; see
``gristmill.selectors.mixture``) and a token budget into a per-domain rate

    r_d = target_tokens_d / tokens_d ,

and ``apply`` keeps every record floor(r_d) times plus once more when
uniform(seed, row key) < theta_d, where theta_d is frac(r_d) rounded to the grid of
a per-domain histogram of uniform draws (``HIST_BINS`` bins) so that the
realized token count is known exactly from the summaries, without a second
pass. Every kept row gets ``mix_epoch`` (int32): 0 for a record's first
copy, k for its (k+1)-th. A copy keeps the record's columns unchanged, its
``id`` (user data) and its row key (``_key``, the input position) included,
so ``(_key, mix_epoch)`` is unique in the output. A stage after ``mix``
identifies records by ``_key`` as everywhere: it decides per input record and
its decision applies to every copy (``sample`` keeps or drops all copies of a
record, a dedup stage keeps or drops all copies of a duplicate).

All randomness is ``uniform(seed, row key)``, so every engine and every
partitioning keeps the same records the same number of times.

Tokens are counted by a Hugging Face tokenizer loaded from a local folder when
``tokenizer`` is given (no special tokens), else estimated as
ceil(UTF-8 bytes / ``bytes_per_token``) with 4 bytes per token by default
(about right for English with a BPE vocabulary of 32k-50k).
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from gristmill.pipeline.hashing import record_uniform
from gristmill.pipeline.model_cache import is_model_folder
from gristmill.pipeline.stage import GlobalStage, StageOutput, StageParams, split_batch
from gristmill.selectors.mixture import MixtureSchedule, token_shares, unimax_weights

HIST_BINS = 1024
NO_DOMAIN = "(none)"


class MixParams(StageParams):
    """Parameters of the ``mix`` stage.

    Attributes
    ----------
    budget_tokens : int
        Tokens in the output, all domains together.
    sampler : {"temperature", "scalarization", "unimax", "cooldown", "weights"}
        How the budget is split: p ∝ q^(1/T); natural q with loss weights
        p(T)/q in the schedule; UniMax with ``max_epochs``; the mean mixture of
        a Cooldown schedule from ``t_start`` to ``t_end``; or ``weights``.
    """

    budget_tokens: int = Field(gt=0)
    sampler: Literal["temperature", "scalarization", "unimax", "cooldown", "weights"] = "temperature"
    temperature: float = Field(1.0, gt=0)
    max_epochs: float = Field(4.0, gt=0)
    weights: dict[str, float] | None = None
    t_start: float = Field(5.0, gt=0)
    t_end: float = Field(1.0, gt=0)
    shape: Literal["step", "linear", "cosine"] = "cosine"
    switch: float = Field(0.5, ge=0, lt=1)
    tokens_per_step: int = Field(65536, gt=0)
    domain_column: str = "domain"
    text_column: str = "text"
    tokenizer: str | None = None
    bytes_per_token: float = Field(4.0, gt=0)

    @model_validator(mode="after")
    def _weights_match_sampler(self) -> MixParams:
        if self.sampler == "weights":
            if not self.weights:
                raise ValueError("sampler 'weights' needs weights: {domain: weight, ...}")
            if any(not (w >= 0 and math.isfinite(w)) for w in self.weights.values()) or \
                    sum(self.weights.values()) <= 0:
                raise ValueError("weights must be finite, >= 0 and not all zero")
        elif self.weights is not None:
            raise ValueError(f"weights is only used with sampler 'weights', not {self.sampler!r}")
        return self


class Mix(GlobalStage):
    """Sample ``budget_tokens`` tokens from the domains by a mixture (see module doc).

    Example
    -------
    >>> import pyarrow as pa
    >>> t = pa.table({"id": ["a", "b", "c", "d"], "text": ["x" * 40] * 4,
    ...               "domain": ["web", "web", "web", "code"]})
    >>> m = Mix({"budget_tokens": 60, "sampler": "temperature", "temperature": 1e9})
    >>> state = m.finalize(m.summarize(t))
    >>> round(state["domains"]["code"]["rate"], 2)
    3.0
    """

    type_name = "mix"
    path_fields = ("tokenizer",)
    Params = MixParams
    requires = ("text",)

    def required_extras(self) -> tuple[str, ...]:
        """A tokenizer is loaded with transformers; the bytes estimate needs nothing."""
        return ("torch",) if self.params.tokenizer is not None else ()

    def check(self, base_dir: str) -> None:
        tok = self.params.tokenizer
        if tok is not None:
            path = self.resolve_path(tok)
            if not is_model_folder(path):
                raise ValueError(f"mix.tokenizer: {path!r} is not a folder with a tokenizer")

    def setup(self) -> None:
        if self.params.tokenizer is not None and getattr(self, "_tokenizer", None) is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                self.local_path(self.params.tokenizer), local_files_only=True)

    def output_columns(self) -> tuple[str, ...]:
        return ("mix_epoch",)

    # helpers -----------------------------------------------------------

    def count_tokens(self, texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Tokens per text: the tokenizer's count, or ceil(bytes / bytes_per_token)."""
        if self.params.tokenizer is not None:
            self.setup()
            docs = ["" if t is None else t for t in texts.to_pylist()]
            enc = self._tokenizer(docs, add_special_tokens=False)["input_ids"]
            return np.fromiter((len(e) for e in enc), dtype=np.int64, count=len(enc))
        # A null text (readers reject them, but a stage may null one) counts 0 tokens.
        nbytes = pc.binary_length(texts).fill_null(0).to_numpy(zero_copy_only=False)
        nbytes = nbytes.astype(np.float64)
        return np.ceil(nbytes / self.params.bytes_per_token).astype(np.int64)

    def _columns(self, batch: pa.Table) -> tuple[list[str], np.ndarray, np.ndarray]:
        p = self.params
        for col in (p.text_column, p.domain_column, "id"):
            if col not in batch.column_names:
                raise ValueError(f"{self.name}: column {col!r} not in batch "
                                 f"(columns: {batch.column_names}); set domain_column/text_column")
        dom = batch.column(p.domain_column).combine_chunks().cast(pa.string()).fill_null(NO_DOMAIN)
        enc = dom.dictionary_encode()
        names = [str(s) for s in enc.dictionary.to_pylist()]
        u = record_uniform(batch, self.seed, self.name)
        return names, enc.indices.to_numpy(zero_copy_only=False), u

    # the global stage --------------------------------------------------

    def summarize(self, batch: pa.Table) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
        """Per domain: documents and tokens in each of HIST_BINS bins of uniform(seed, row key)."""
        if batch.num_rows == 0:
            return None
        names, codes, u = self._columns(batch)
        tokens = self.count_tokens(batch.column(self.params.text_column).combine_chunks())
        bins = np.minimum((u * HIST_BINS).astype(np.int64), HIST_BINS - 1)
        key = codes.astype(np.int64) * HIST_BINS + bins
        size = len(names) * HIST_BINS
        docs = np.bincount(key, minlength=size).reshape(len(names), HIST_BINS)
        toks = np.bincount(key, weights=tokens, minlength=size).reshape(len(names), HIST_BINS)
        return {n: (docs[i].astype(np.int64), np.rint(toks[i]).astype(np.int64))
                for i, n in enumerate(names)}

    def merge(self, a: dict | None, b: dict | None) -> dict | None:
        if a is None:
            return b
        if b is None:
            return a
        out = dict(a)
        for k, (d, t) in b.items():
            if k in out:
                out[k] = (out[k][0] + d, out[k][1] + t)
            else:
                out[k] = (d, t)
        return out

    def _target_weights(self, domains: list[str], tokens: np.ndarray) -> tuple[np.ndarray, MixtureSchedule]:
        p = self.params
        total_steps = max(1, math.ceil(p.budget_tokens / p.tokens_per_step))
        if p.sampler == "temperature":
            sched = MixtureSchedule.temperature(domains, tokens, p.temperature, total_steps)
        elif p.sampler == "scalarization":
            sched = MixtureSchedule.scalarization(domains, tokens, p.temperature, total_steps)
        elif p.sampler == "unimax":
            w = unimax_weights(tokens, p.budget_tokens, p.max_epochs)
            sched = MixtureSchedule.constant(domains, w, total_steps, meta={
                "method": "unimax", "max_epochs": p.max_epochs, "budget_tokens": p.budget_tokens,
                "tokens": tokens.tolist()})
        elif p.sampler == "cooldown":
            sched = MixtureSchedule.cooldown(domains, tokens, total_steps, p.t_start, p.t_end,
                                             p.shape, p.switch)
        else:
            unknown = sorted(set(p.weights) - set(domains))
            if unknown:
                raise ValueError(f"{self.name}.weights names domains not in the data: {unknown}; "
                                 f"domains seen: {domains}")
            w = np.array([p.weights.get(d, 0.0) for d in domains])
            sched = MixtureSchedule.constant(domains, w, total_steps,
                                             meta={"method": "weights", "tokens": tokens.tolist()})
        # The sample must hold what the whole schedule consumes: its mean mixture.
        return sched.mean_weights(), sched

    def finalize(self, summary: dict | None) -> dict[str, Any] | None:
        """Rates, thresholds and realized counts per domain, and the schedule."""
        if summary is None:
            return None
        domains = sorted(summary)
        tokens = np.array([summary[d][1].sum() for d in domains], dtype=np.float64)
        weights, sched = self._target_weights(domains, tokens)
        out: dict[str, Any] = {}
        for d, w, n in zip(domains, weights, tokens, strict=True):
            docs_h, tok_h = summary[d]
            target = w * self.params.budget_tokens
            rate = target / n if n > 0 else 0.0
            whole = int(math.floor(rate))
            rest = target - whole * n
            # theta_d: the histogram edge whose extra copies come closest to the remainder.
            cum = np.concatenate([[0], np.cumsum(tok_h)])
            k = int(np.argmin(np.abs(cum - rest)))
            tokens_after = int(whole * n + cum[k])
            docs_after = int(whole * docs_h.sum() + docs_h[:k].sum())
            out[d] = {
                "rate": float(rate), "whole": whole, "threshold": k / HIST_BINS,
                "weight": float(w), "target_tokens": float(target),
                "tokens_before": int(n), "tokens_after": tokens_after,
                "docs_before": int(docs_h.sum()), "docs_after": docs_after,
                "epochs": tokens_after / n if n > 0 else 0.0,
                "max_copies": whole + (1 if k > 0 else 0),
            }
        q = token_shares(tokens)
        sched.meta["realized_weights"] = [out[d]["tokens_after"] / max(1, sum(
            o["tokens_after"] for o in out.values())) for d in domains]
        return {"domains": out, "schedule": sched.to_json(), "natural": q.tolist(),
                "sampler": self.params.sampler, "budget_tokens": self.params.budget_tokens}

    def apply(self, batch: pa.Table, state: dict[str, Any] | None) -> StageOutput:
        if batch.num_rows == 0 or state is None:
            return split_batch(batch, np.ones(batch.num_rows, bool), self.name, "mix_downsample")
        names, codes, u = self._columns(batch)
        info = state["domains"]
        whole = np.array([info[n]["whole"] for n in names], dtype=np.int64)[codes]
        theta = np.array([info[n]["threshold"] for n in names])[codes]
        # Same binning as summarize, so the realized counts in the state are exact.
        bins = np.minimum((u * HIST_BINS).astype(np.int64), HIST_BINS - 1)
        copies = whole + (bins < np.rint(theta * HIST_BINS)).astype(np.int64)
        keep = copies > 0
        rates = np.array([info[n]["rate"] for n in names])[codes]
        details = [f"rate={r:.4g}" for r in rates]
        out = split_batch(batch, keep, self.name, "mix_downsample", details)
        kept_copies = copies[keep]
        kept = out.kept
        if kept.num_rows and kept_copies.max() > 1:
            idx = np.repeat(np.arange(kept.num_rows), kept_copies)
            # epoch k of a row: position of the copy within its run of repeats.
            starts = np.repeat(np.cumsum(kept_copies) - kept_copies, kept_copies)
            epoch = np.arange(idx.size) - starts
            # the user's id and the row key are the input record's, unchanged: a
            # copy is told apart by its epoch, (row key, mix_epoch) is unique
            kept = kept.take(pa.array(idx))
        else:
            epoch = np.zeros(kept.num_rows, dtype=np.int64)
        kept = kept.append_column("mix_epoch", pa.array(epoch, pa.int32()))
        return StageOutput(kept=kept, dropped=out.dropped)

    def artifacts(self, state: dict[str, Any] | None) -> dict[str, bytes]:
        """``mixture.json`` (per-domain tokens before/after, epochs) and ``schedule.json``."""
        if state is None:
            return {}
        realized = {k: v for k, v in state.items() if k != "schedule"}
        return {"mixture.json": json.dumps(realized, indent=1).encode(),
                "schedule.json": state["schedule"].encode()}
