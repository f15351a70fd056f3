"""LM likelihood scorer: per-document log-likelihood, bits per character and per byte.

For a causal language model ``p`` and a document tokenized as ``x_1 .. x_n``
(after a start token ``x_0``, the tokenizer's BOS, else its EOS, when it has one)
the scorer computes

    logprob = sum_{t=1..n} log p(x_t | x_<t)
    mean_logprob = logprob / n
    bpc = -logprob / (ln 2 * chars),    bpb = -logprob / (ln 2 * utf8_bytes)

bits per character is the normalized loss that PreSelect ("Predictive Data
Selection: The Data That Predicts Is the Data That Teaches", Shum et al. 2025)
compares across models with different tokenizers. Without a start token the
first token has no context and is not scored (``n - 1`` tokens).

Documents longer than the model's context are scored with a sliding window
(the strided evaluation of the Hugging Face perplexity guide): windows start
at ``0, s, 2s, ...`` (``s`` = ``stride``) and hold up to ``L`` tokens
(``L`` = ``max_length``); window ``[b, e)`` scores the targets ``t`` with
``prev_end <= t < e`` given the context ``x_b .. x_{t-1}``, where ``prev_end``
is the end of the previous window. Every token is scored exactly once, with at
least ``L - s`` tokens of left context once the first window is full.

Windows of all documents are sorted by length and packed into batches capped
by rows and by padded tokens (length bucketing keeps padding small); rows are
right-padded, which leaves positions of real tokens unchanged. The model body
runs without its LM head and ``gristmill.ext.token_logprobs`` computes
``log p(target)`` from the final hidden states and the head weight in
vocabulary tiles, so the ``tokens x vocabulary`` logits never exist. Which ext
backend ran (``cpp``, ``cuda`` or ``torch``) is reported.

For SFT records the scorer computes, per candidate response ``y`` of prompt
``x``, ``sum_t log p(y_t | x, y_<t)`` with the prompt tokens masked: the
tokenizer's chat template when it has one, else ``BOS + prompt + separator``
followed by ``response + EOS`` (see ``encode_sft``, shared with the SFT
trainer so that the scored and the trained sequences are the same).

Function API (used directly by PreSelect and GRAPE)::

    scores = score_texts(model, tokenizer, ["some text", ...])
    scores.bpc, scores.backend
    resp = score_responses(model, tokenizer, ["2+2?"], [["4", "four"]])
    resp.logprob[0], resp.tokens[0]
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from gristmill.pipeline.model_cache import is_model_folder
from gristmill.pipeline.stage import RowStage, StageOutput, StageParams, keep_all

log = logging.getLogger(__name__)

LN2 = math.log(2.0)
#: Config attributes that rescale or cap the logits after the LM head; a model
#: that sets one is scored from its full logits, since hidden @ W.T is not them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


# ----------------------------------------------------------------------------
# Encoding


def start_token_id(tokenizer: Any) -> int | None:
    """The token put before a document so its first token is scored: BOS, else EOS, else None."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return None


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_sft(
    tokenizer: Any,
    prompt: str | list[dict[str, str]],
    response: str,
    *,
    separator: str = "\n",
    add_eos: bool = True,
    chat_template: Literal["auto", "never"] = "auto",
) -> tuple[list[int], int]:
    """Token ids of (prompt, response) and the number of prompt tokens.

    With a chat template (``chat_template="auto"`` and the tokenizer has one)
    the prompt is the user turn rendered with the generation prompt and the
    response is everything the assistant turn adds after it (end-of-turn
    tokens included, as an SFT trainer would learn them). Otherwise the ids
    are ``[BOS] + tok(prompt + separator)`` then ``tok(response) + [EOS]``.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
    prompt : str or list of chat messages
        A list of ``{"role", "content"}`` messages needs a chat template.
    response : str
    separator : str
        Put between prompt and response when there is no chat template.
    add_eos : bool
        Append EOS to the response (no chat template), so stopping is scored.
    chat_template : {"auto", "never"}

    Returns
    -------
    ids : list of int
    n_prompt : int
        ``ids[:n_prompt]`` is the prompt; the response tokens are the rest.
    """
    if chat_template == "auto" and has_chat_template(tokenizer):
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        p_text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        f_text = tokenizer.apply_chat_template(
            msgs + [{"role": "assistant", "content": response}], tokenize=False)
        p_ids = tokenizer(p_text, add_special_tokens=False)["input_ids"]
        ids = tokenizer(f_text, add_special_tokens=False)["input_ids"]
        # Templates render the prompt as a prefix of the conversation; where
        # tokenization merges across the boundary the common prefix is the prompt.
        n = 0
        for a, b in zip(p_ids, ids, strict=False):
            if a != b:
                break
            n += 1
        return list(ids), n
    if not isinstance(prompt, str):
        raise ValueError("prompt given as chat messages but the tokenizer has no chat template; "
                         "pass the prompt as a string")
    start = start_token_id(tokenizer)
    p_ids = ([start] if start is not None else []) + tokenizer(
        prompt + separator, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        r_ids = r_ids + [int(tokenizer.eos_token_id)]
    return p_ids + r_ids, len(p_ids)


def encode_texts(tokenizer: Any, texts: Sequence[str], *, add_bos: bool = True) -> list[list[int]]:
    """Token ids of each text, with the start token (``start_token_id``) first when ``add_bos``."""
    enc = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if len(texts) else []
    start = start_token_id(tokenizer) if add_bos else None
    return [([start] if start is not None else []) + list(e) for e in enc]


# ----------------------------------------------------------------------------
# Core: sliding windows, bucketing, fused head


def sliding_windows(n: int, score_from: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(begin, end, first_target)`` that score targets ``max(1, score_from) .. n-1`` once.

    Window ``k`` covers tokens ``[k*stride, min(k*stride + max_length, n))`` and
    scores the targets from the end of window ``k-1`` (see module doc). Windows
    that would score nothing (all of their targets lie in a masked prompt) are
    left out; the context rule of the others is unchanged.
    """
    if not 1 <= stride < max_length:
        raise ValueError(f"stride must be in [1, max_length - 1] = [1, {max_length - 1}]; got {stride}")
    first = max(1, score_from)
    out: list[tuple[int, int, int]] = []
    prev_end = 0
    for begin in range(0, max(n, 1), stride):
        end = min(begin + max_length, n)
        t0 = max(prev_end, begin + 1, first)
        if t0 < end:
            out.append((begin, end, t0))
        prev_end = end
        if end >= n:
            break
    return out


def model_context(model: Any) -> int:
    """Longest sequence the model accepts, from its config (1024 when it does not say)."""
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 1:
            return v
    return 1024


def _uses_fused_head(model: Any) -> bool:
    cfg = model.config
    for attr in _LOGIT_TRANSFORMS:
        v = getattr(cfg, attr, None)
        if v is not None and v != 1 and v != 1.0:
            return False
    return model.get_output_embeddings() is not None


def _batches(lengths: np.ndarray, batch_size: int, max_batch_tokens: int) -> list[np.ndarray]:
    """Indices grouped into batches, longest first, capped by rows and padded tokens."""
    order = np.argsort(-lengths, kind="stable")
    out: list[np.ndarray] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        ln = int(lengths[i])
        width = max(cur_max, ln)
        if cur and (len(cur) >= batch_size or width * (len(cur) + 1) > max_batch_tokens):
            out.append(np.array(cur))
            cur, width = [], ln
        cur.append(int(i))
        cur_max = width
    if cur:
        out.append(np.array(cur))
    return out


def score_sequences(
    model: Any,
    sequences: Sequence[Sequence[int]],
    score_from: Sequence[int] | int = 1,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 16,
    max_batch_tokens: int = 16384,
    pad_id: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Summed log p of the tokens ``seq[score_from:]`` of each sequence, and their count.

    Parameters
    ----------
    model : PreTrainedModel
        A causal LM (``AutoModelForCausalLM``); runs on its own device and dtype.
    sequences : list of list of int
        Token ids.
    score_from : int or list of int
        First position whose token is scored (earlier ones are context only);
        position 0 is never scored (it has no context).
    max_length : int, optional
        Window length; default the model's context.
    stride : int, optional
        Window step, ``1 <= stride < max_length``; default ``max_length // 2``.
    batch_size, max_batch_tokens : int
        Caps on rows and on padded tokens per forward pass.
    pad_id : int
        Id written in padding (masked out; any valid id).
    progress : bool
        Show a tqdm bar over windows.

    Returns
    -------
    logprob : float64[n_seq]
    tokens : int64[n_seq]
    backend : str
        ``"<ext backend>"`` (fused hidden states + head) or ``"<ext backend>/logits"``.
    """
    import torch
    from tqdm.auto import tqdm

    from gristmill.ext import backend as ext_backend
    from gristmill.ext import token_logprobs, token_logprobs_from_logits

    n_seq = len(sequences)
    starts = [score_from] * n_seq if isinstance(score_from, int) else list(score_from)
    if len(starts) != n_seq:
        raise ValueError(f"score_from has {len(starts)} entries for {n_seq} sequences")
    max_length = max_length or model_context(model)
    stride = stride or max(1, max_length // 2)
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2; got {max_length}")
    windows = [(i, b, e, t0) for i, seq in enumerate(sequences)
               for b, e, t0 in sliding_windows(len(seq), starts[i], max_length, stride)]
    sums = np.zeros(n_seq, dtype=np.float64)
    counts = np.zeros(n_seq, dtype=np.int64)
    device = next(model.parameters()).device
    fused = _uses_fused_head(model)
    name = ext_backend(device) + ("" if fused else "/logits")
    if not windows:
        return sums, counts, name
    lengths = np.array([e - b for _, b, e, _ in windows])
    head = model.get_output_embeddings()
    body = model.base_model
    weight = bias = None
    bar = tqdm(total=len(windows), desc="lm likelihood", unit="win", disable=not progress)
    with torch.inference_mode():
        for idx in _batches(lengths, batch_size, max_batch_tokens):
            width = int(lengths[idx].max())
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            rows, cols, tgt, owner = [], [], [], []
            for r, w in enumerate(idx):
                i, b, e, t0 = windows[w]
                ids[r, : e - b] = torch.as_tensor(sequences[i][b:e], dtype=torch.long)
                mask[r, : e - b] = 1
                # hidden state at position j predicts token j + 1 of the window.
                pos = np.arange(t0 - b - 1, e - b - 1)
                rows.append(np.full(pos.size, r))
                cols.append(pos)
                tgt.append(np.asarray(sequences[i][t0:e], dtype=np.int64))
                owner.append(np.full(pos.size, i))
            ids, mask = ids.to(device), mask.to(device)
            r_t = torch.as_tensor(np.concatenate(rows), device=device)
            c_t = torch.as_tensor(np.concatenate(cols), device=device)
            targets = torch.as_tensor(np.concatenate(tgt), device=device)
            if fused:
                hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
                h = hidden[r_t, c_t]
                if weight is None:
                    # A head kept in another dtype than the body (mixed-precision
                    # checkpoints) is cast once, not per batch.
                    weight = head.weight.to(h.dtype)
                    bias = getattr(head, "bias", None)
                    bias = bias.to(h.dtype) if bias is not None else None
                lp = token_logprobs(h, weight, targets, bias)
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits
                lp = token_logprobs_from_logits(logits[r_t, c_t], targets)
            np.add.at(sums, np.concatenate(owner), lp.double().cpu().numpy())
            np.add.at(counts, np.concatenate(owner), 1)
            bar.update(len(idx))
    bar.close()
    return sums, counts, name


# ----------------------------------------------------------------------------
# Function API


@dataclass
class TextScores:
    """Per-text likelihood scores (arrays aligned with the input texts)."""

    logprob: np.ndarray
    tokens: np.ndarray
    mean_logprob: np.ndarray
    bpc: np.ndarray
    bpb: np.ndarray
    backend: str


@dataclass
class ResponseScores:
    """Per prompt, one array entry per candidate response."""

    logprob: list[np.ndarray]
    tokens: list[np.ndarray]
    backend: str

    @property
    def mean_logprob(self) -> list[np.ndarray]:
        """``logprob / tokens`` per response (NaN for an empty response)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return [np.where(t > 0, lp / np.maximum(t, 1), np.nan)
                    for lp, t in zip(self.logprob, self.tokens, strict=True)]


def score_texts(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    add_bos: bool = True,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 16,
    max_batch_tokens: int = 16384,
    progress: bool = False,
) -> TextScores:
    """Log-likelihood, tokens, mean log-probability, bits per character and per byte of texts.

    ``bpc = -logprob / (ln 2 * len(text))`` and ``bpb = -logprob / (ln 2 * utf8 bytes)``;
    NaN where the denominator is 0. See the module doc for windows and batching.

    Examples
    --------
    >>> import tempfile, torch
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from gristmill.trainers.tiny import build_tokenizer, build_tiny_lm
    >>> d = tempfile.mkdtemp()
    >>> _ = build_tokenizer(["hello world"] * 10, vocab_size=300, path=d)
    >>> _ = build_tiny_lm(d, d, n_layer=1, n_embd=32, n_head=2)
    >>> m, t = AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d)
    >>> s = score_texts(m, t, ["hello world", "hi"])
    >>> s.tokens.tolist(), bool((s.bpc > 0).all())
    ([2, 2], True)
    """
    seqs = encode_texts(tokenizer, texts, add_bos=add_bos)
    sums, counts, name = score_sequences(
        model, seqs, 1, max_length=max_length, stride=stride, batch_size=batch_size,
        max_batch_tokens=max_batch_tokens, pad_id=_pad_id(tokenizer), progress=progress)
    chars = np.array([len(t) for t in texts], dtype=np.float64)
    nbytes = np.array([len(t.encode("utf-8", "surrogatepass")) for t in texts], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        bpc = np.where(chars > 0, -sums / (LN2 * chars), np.nan)
        bpb = np.where(nbytes > 0, -sums / (LN2 * nbytes), np.nan)
    return TextScores(sums, counts, mean, bpc, bpb, name)


def score_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | list[dict[str, str]]],
    responses_lists: Sequence[Sequence[str]],
    *,
    separator: str = "\n",
    add_eos: bool = True,
    chat_template: Literal["auto", "never"] = "auto",
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 16,
    max_batch_tokens: int = 16384,
    progress: bool = False,
) -> ResponseScores:
    """``sum_t log p(y_t | x, y_<t)`` and ``|y|`` for every candidate response ``y`` of prompt ``x``.

    Prompt tokens are context only (masked); the sequence format is ``encode_sft``'s.

    Parameters
    ----------
    prompts : list of str (or chat messages)
    responses_lists : list of list of str
        Candidates per prompt (lists may differ in length).

    Returns
    -------
    ResponseScores
        ``logprob[i][j]`` and ``tokens[i][j]`` for response ``j`` of prompt ``i``.
    """
    if len(prompts) != len(responses_lists):
        raise ValueError(f"{len(prompts)} prompts but {len(responses_lists)} response lists")
    seqs, starts, sizes = [], [], []
    for prompt, responses in zip(prompts, responses_lists, strict=True):
        responses = list(responses or [])
        sizes.append(len(responses))
        for r in responses:
            ids, n_prompt = encode_sft(tokenizer, prompt, r, separator=separator,
                                       add_eos=add_eos, chat_template=chat_template)
            seqs.append(ids)
            starts.append(n_prompt)
    sums, counts, name = score_sequences(
        model, seqs, starts, max_length=max_length, stride=stride, batch_size=batch_size,
        max_batch_tokens=max_batch_tokens, pad_id=_pad_id(tokenizer), progress=progress)
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return ResponseScores([sums[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)],
                          [counts[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)],
                          name)


def _pad_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def load_model(path: str, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
    """``AutoModelForCausalLM`` and ``AutoTokenizer`` from a local folder, in eval mode.

    ``device="auto"`` picks CUDA when there is one; ``dtype="auto"`` picks
    bfloat16 on a GPU that supports it, else float32.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        use_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if use_bf16 else "float32"
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                 dtype=getattr(torch, dtype))
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


# ----------------------------------------------------------------------------
# The stage


class ScoringParams(StageParams):
    """How a stage runs a causal LM over text: windows, batches, device.

    Shared by every stage that scores with a model (``lm_likelihood``, ``grape``).
    """

    max_length: int | None = Field(None, ge=2)
    stride: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)
    max_batch_tokens: int = Field(16384, ge=2)
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    separator: str = "\n"
    add_eos: bool = True
    chat_template: Literal["auto", "never"] = "auto"
    progress: bool = False

    @model_validator(mode="after")
    def _stride_below_window(self) -> ScoringParams:
        if self.stride is not None and self.max_length is not None and self.stride >= self.max_length:
            raise ValueError(f"stride must be in [1, max_length - 1] = [1, {self.max_length - 1}]; "
                             f"got {self.stride}")
        return self


class LMLikelihoodParams(ScoringParams):
    """Parameters of the ``lm_likelihood`` stage.

    Attributes
    ----------
    model : str
        Folder with a causal LM and its tokenizer (``save_pretrained``), or its
        URL (``s3://...``, fetched once per machine into the model cache).
    target : {"auto", "text", "responses"}
        Score ``text`` (pretraining records) or each of ``responses`` given
        ``prompt`` (SFT records); ``auto`` picks by the batch's columns.
    max_length : int, optional
        Window length (>= 2); default the model's context.
    stride : int, optional
        Window step, 1 <= stride < max_length; default max_length // 2.
    """

    model: str
    target: Literal["auto", "text", "responses"] = "auto"
    text_column: str = "text"
    prompt_column: str = "prompt"
    responses_column: str = "responses"
    add_bos: bool = True


TEXT_SUFFIXES = ("logprob", "tokens", "mean_logprob", "bpc", "bpb")
RESPONSE_SUFFIXES = ("response_logprob", "response_tokens")


class LMLikelihood(RowStage):
    """Adds ``<name>_logprob/_tokens/_mean_logprob/_bpc/_bpb`` (texts) or
    ``<name>_response_logprob/_response_tokens`` (lists, SFT records).

    See the module doc for the formulas. ``backend`` holds the ext backend
    that ran (set by ``setup``).

    Example
    -------
    .. code-block:: yaml

        - stage: lm_likelihood
          model: ../models/tiny-lm
          max_length: 512
    """

    type_name = "lm_likelihood"
    path_fields = ("model",)
    Params = LMLikelihoodParams
    extras = ("torch",)

    def check(self, base_dir: str) -> None:
        path = self.resolve_path(self.params.model)
        if not is_model_folder(path):
            raise ValueError(f"{self.name}.model: {path!r} is not a folder with a model")

    def setup(self) -> None:
        if getattr(self, "_model", None) is not None:
            return
        self._model, self._tokenizer = load_model(self.local_path(self.params.model),
                                                  self.params.device, self.params.dtype)
        from gristmill.ext import backend

        fused = _uses_fused_head(self._model)
        self.backend = backend(next(self._model.parameters()).device) + ("" if fused else "/logits")
        log.info("%s: token_logprobs backend %s", self.name, self.backend)

    def input_columns(self) -> tuple[str, ...]:
        p = self.params
        if p.target == "text":
            return (p.text_column,)
        if p.target == "responses":
            return (p.prompt_column, p.responses_column)
        return ()

    def output_columns(self) -> tuple[str, ...]:
        # "auto" decides per batch, so either set may follow.
        t = self.params.target
        sufs = (TEXT_SUFFIXES if t != "responses" else ()) + (RESPONSE_SUFFIXES if t != "text" else ())
        return tuple(f"{self.name}_{s}" for s in sufs)

    def _target(self, batch: pa.Table) -> str:
        p = self.params
        if p.target != "auto":
            return p.target
        if p.text_column in batch.column_names:
            return "text"
        if p.prompt_column in batch.column_names and p.responses_column in batch.column_names:
            return "responses"
        raise ValueError(f"{self.name}: batch has neither {p.text_column!r} nor "
                         f"{p.prompt_column!r}+{p.responses_column!r} (columns: {batch.column_names})")

    def process(self, batch: pa.Table) -> StageOutput:
        self.setup()
        p = self.params
        kw = dict(max_length=p.max_length, stride=p.stride, batch_size=p.batch_size,
                  max_batch_tokens=p.max_batch_tokens, progress=p.progress)
        if self._target(batch) == "text":
            texts = [t or "" for t in batch.column(p.text_column).to_pylist()]
            s = score_texts(self._model, self._tokenizer, texts, add_bos=p.add_bos, **kw)
            cols = {"logprob": pa.array(s.logprob, pa.float64()),
                    "tokens": pa.array(s.tokens, pa.int64()),
                    "mean_logprob": _nullable(s.mean_logprob),
                    "bpc": _nullable(s.bpc), "bpb": _nullable(s.bpb)}
        else:
            prompts = batch.column(p.prompt_column).to_pylist()
            responses = [r or [] for r in batch.column(p.responses_column).to_pylist()]
            s = score_responses(self._model, self._tokenizer, prompts, responses,
                                separator=p.separator, add_eos=p.add_eos,
                                chat_template=p.chat_template, **kw)
            cols = {"response_logprob": pa.array([a.tolist() for a in s.logprob],
                                                 pa.list_(pa.float64())),
                    "response_tokens": pa.array([a.tolist() for a in s.tokens],
                                                pa.list_(pa.int64()))}
        self.backend = s.backend
        out = batch
        for suffix, arr in cols.items():
            col = f"{self.name}_{suffix}"
            if col in out.column_names:
                out = out.set_column(out.schema.get_field_index(col), col, arr)
            else:
                out = out.append_column(col, arr)
        return keep_all(out)


def _nullable(x: np.ndarray) -> pa.Array:
    return pa.array(x, pa.float64(), mask=np.isnan(x))
