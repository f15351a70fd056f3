"""Supervised fine-tuning of a causal LM on SFT shards (prompt, response), loss on responses only.

A training example is the sequence ``encode_sft(prompt, response)`` (the
format the ``lm_likelihood`` scorer and GRAPE score, so what GRAPE picked is
what is trained on) with labels ``-100`` on the prompt tokens:

    L = - (1 / #response tokens) * sum_{response tokens t} log p(x_t | x_<t)

One loop (``train_examples``), nanoGPT style: AdamW, linear warmup then cosine
decay to ``min_lr``, gradient clipping, gradient accumulation, periodic
held-out loss. ``bf16`` runs the forward under ``torch.autocast``; started by
``torchrun`` (``WORLD_SIZE > 1``) it wraps the model in
DistributedDataParallel, each rank takes every ``world_size``-th example of
the shared shuffled order, and rank 0 logs and saves::

    gristmill sft --model base/ --data out/shards --out sft-model --steps 1000
    torchrun --nproc_per_node 8 -m gristmill.cli sft --model base/ \\
        --data out/shards --out sft-model --bf16

The same loop pretrains when every label equals its token (``lm_examples``).
"""

from __future__ import annotations

import glob
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from gristmill.scorers.likelihood import encode_sft, start_token_id

# torch is imported inside the functions that use it, so that building the
# `gristmill` command line (which imports this module for `gristmill sft`) stays fast.

if TYPE_CHECKING:
    import torch

IGNORE = -100


class SFTConfig(BaseModel):
    """Training settings; unknown keys are errors.

    Attributes
    ----------
    steps : int
        Optimizer steps.
    batch_size : int
        Sequences per micro-batch (per rank).
    grad_accum : int
        Micro-batches per optimizer step.
    lr, min_lr : float
        Peak and final learning rate (cosine decay after ``warmup``).
    max_length : int
        Sequences are cut to this many tokens (examples left with no
        response token are skipped).
    eval_every : int
        Steps between held-out evaluations (0: only at the end).
    bf16 : bool
        Autocast the forward to bfloat16 (GPUs with bf16 support).
    """

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    warmup: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    max_length: int = Field(1024, ge=2)
    eval_every: int = Field(50, ge=0)
    seed: int = 0
    bf16: bool = False
    device: str = "auto"
    separator: str = "\n"
    add_eos: bool = True
    chat_template: Literal["auto", "never"] = "auto"
    progress: bool = True


@dataclass
class Curves:
    """What a run logged: optimizer steps with train loss and learning rate, and held-out loss."""

    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ----------------------------------------------------------------------------
# Data


def read_sft_pairs(paths: str | Sequence[str], prompt_column: str = "prompt",
                   response_column: str = "response") -> list[tuple[str, str]]:
    """(prompt, response) pairs from parquet files, folders of them or globs (sorted)."""
    if isinstance(paths, (str, Path)):
        paths = [str(paths)]
    files: list[str] = []
    for p in paths:
        p = str(p)
        if os.path.isdir(p):
            files += sorted(glob.glob(os.path.join(p, "**", "*.parquet"), recursive=True))
        else:
            files += sorted(glob.glob(p)) or [p]
    if not files:
        raise FileNotFoundError(f"no parquet files in {list(paths)}")
    pairs: list[tuple[str, str]] = []
    for f in files:
        t = pq.read_table(f, columns=[prompt_column, response_column])
        pairs += list(zip(t.column(prompt_column).to_pylist(), t.column(response_column).to_pylist(),
                          strict=True))
    return pairs


def sft_examples(tokenizer: Any, pairs: Sequence[tuple[str, str]], *, max_length: int = 1024,
                 separator: str = "\n", add_eos: bool = True,
                 chat_template: Literal["auto", "never"] = "auto") -> list[tuple[list[int], list[int]]]:
    """``(ids, labels)`` per pair, labels ``-100`` on the prompt; pairs with no response token
    within ``max_length`` are skipped."""
    out = []
    for prompt, response in pairs:
        ids, n_prompt = encode_sft(tokenizer, prompt, response, separator=separator,
                                   add_eos=add_eos, chat_template=chat_template)
        ids = ids[:max_length]
        labels = [IGNORE] * min(n_prompt, len(ids)) + ids[n_prompt:]
        if any(x != IGNORE for x in labels[1:]):
            out.append((ids, labels))
    return out


def lm_examples(tokenizer: Any, texts: Sequence[str], *, max_length: int = 1024
                ) -> list[tuple[list[int], list[int]]]:
    """Pretraining examples: ``[start] + tok(text) + [EOS]``, every token a label, cut to ``max_length``."""
    start = start_token_id(tokenizer)
    eos = tokenizer.eos_token_id
    out = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        seq = ([start] if start is not None else []) + list(ids) + ([eos] if eos is not None else [])
        seq = seq[:max_length]
        out.append((seq, list(seq)))
    return out


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``labels`` (-100 in padding) and ``attention_mask``."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for r, (x, y) in enumerate(examples):
        ids[r, : len(x)] = torch.as_tensor(x)
        labels[r, : len(y)] = torch.as_tensor(y)
        mask[r, : len(x)] = 1
    return ids, labels, mask


# ----------------------------------------------------------------------------
# Loop


def _lr_at(step: int, cfg: SFTConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, frac))) * (cfg.lr - cfg.min_lr)


def _device(name: str) -> torch.device:
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def _autocast(device: torch.device, bf16: bool):
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _sum_loss(model: Any, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
              device: torch.device, bf16: bool) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over labelled positions, and their count."""
    import torch

    with _autocast(device, bf16):
        logits = model(input_ids=ids, attention_mask=mask).logits
    tgt = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
        ignore_index=IGNORE, reduction="sum")
    return loss, int((tgt != IGNORE).sum())


def evaluate_loss(model: Any, examples: Sequence[tuple[list[int], list[int]]], *, pad_id: int,
                  batch_size: int = 32, bf16: bool = False) -> float:
    """Mean NLL per labelled token over ``examples`` (response tokens for SFT examples)."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            ids, labels, mask = (t.to(device) for t in collate(examples[i : i + batch_size], pad_id))
            s, n = _sum_loss(model, ids, labels, mask, device, bf16)
            total, count = total + float(s), count + n
    model.train(was_training)
    return total / max(1, count)


def train_examples(
    model: Any,
    train: Sequence[tuple[list[int], list[int]]],
    cfg: SFTConfig,
    *,
    pad_id: int,
    eval_set: Sequence[tuple[list[int], list[int]]] | None = None,
) -> Curves:
    """Train ``model`` in place on ``(ids, labels)`` examples for ``cfg.steps`` optimizer steps.

    The loss of a micro-batch is the mean NLL over its labelled tokens. Examples
    are drawn in a shuffled order (seeded by ``cfg.seed``), reshuffled each epoch.
    """
    import torch

    if not train:
        raise ValueError("no training examples (every example had no response token?)")
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = _device(cfg.device)
    model.to(device).train()
    net = model
    owns_group = False
    if world > 1:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            owns_group = True
        if device.type == "cuda":
            torch.cuda.set_device(device)
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                      else None)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    curves = Curves()
    t_start = time.perf_counter()

    def next_batch() -> list[tuple[list[int], list[int]]]:
        nonlocal order
        batch = []
        while len(batch) < cfg.batch_size:
            if not order:
                perm = torch.randperm(len(train), generator=gen).tolist()
                order = perm[rank::world] or perm  # every rank needs at least one example
            batch.append(train[order.pop(0)])
        return batch

    bar = tqdm(range(cfg.steps), desc="sft", disable=not cfg.progress or rank != 0)
    for step in bar:
        lr = _lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            ids, labels, mask = (t.to(device) for t in collate(next_batch(), pad_id))
            s, n = _sum_loss(net, ids, labels, mask, device, cfg.bf16)
            loss = s / max(1, n) / cfg.grad_accum
            loss.backward()
            step_loss += float(loss.detach())
            curves.tokens += n
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        curves.step.append(step)
        curves.train_loss.append(step_loss)
        curves.lr.append(lr)
        bar.set_postfix(loss=f"{step_loss:.3f}")
        last = step == cfg.steps - 1
        if eval_set and rank == 0 and (last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            curves.eval_step.append(step + 1)
            curves.eval_loss.append(evaluate_loss(model, eval_set, pad_id=pad_id, bf16=cfg.bf16))
    curves.seconds = time.perf_counter() - t_start
    if world > 1:
        # Free the DDP wrapper (its reducer holds the process group) and wait for
        # every rank before tearing the group down: destroying the group first and
        # letting the wrapper be collected later could hang rank 0 on exit.
        del net
        dist.barrier()
        if owns_group:
            dist.destroy_process_group()
    model.eval()
    return curves


def pad_token_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def train_sft(
    model_path: str | Path,
    train: str | Sequence[str] | Sequence[tuple[str, str]],
    out_dir: str | Path | None,
    config: SFTConfig | dict | None = None,
    *,
    eval_pairs: Sequence[tuple[str, str]] | None = None,
) -> Curves:
    """Fine-tune the causal LM at ``model_path`` on SFT pairs and save it to ``out_dir``.

    Parameters
    ----------
    model_path : str or Path
        Folder with the base model and its tokenizer.
    train : parquet path(s) or list of (prompt, response)
        SFT shards (columns ``prompt``, ``response``, as GRAPE writes them) or pairs.
    out_dir : str or Path, optional
        Where the model, tokenizer and ``curves.json`` are saved (rank 0); None saves nothing.
    config : SFTConfig or dict
    eval_pairs : list of (prompt, response), optional
        Held-out pairs for the eval loss curve.

    Returns
    -------
    Curves
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = config if isinstance(config, SFTConfig) else SFTConfig(**(config or {}))
    torch.manual_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_path), local_files_only=True)
    if isinstance(train, (str, Path)) or (train and isinstance(train[0], (str, Path))):
        pairs = read_sft_pairs(train)
    else:
        pairs = list(train)
    kw = dict(max_length=cfg.max_length, separator=cfg.separator, add_eos=cfg.add_eos,
              chat_template=cfg.chat_template)
    examples = sft_examples(tok, pairs, **kw)
    held = sft_examples(tok, eval_pairs, **kw) if eval_pairs else None
    curves = train_examples(model, examples, cfg, pad_id=pad_token_id(tok), eval_set=held)
    if out_dir is not None and int(os.environ.get("RANK", 0)) == 0:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out))
        tok.save_pretrained(str(out))
        (out / "curves.json").write_text(json.dumps(curves.to_dict(), indent=1))
    return curves


def greedy_responses(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 32,
                     batch_size: int = 64, separator: str = "\n",
                     chat_template: Literal["auto", "never"] = "auto") -> list[str]:
    """Greedy decoding of a response to each prompt (stops at EOS), in the ``encode_sft`` format."""
    import torch

    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    eos = tokenizer.eos_token_id
    out: list[str] = []
    model.eval()
    for i in range(0, len(prompts), batch_size):
        chunk = [encode_sft(tokenizer, p, "", separator=separator, add_eos=False,
                            chat_template=chat_template) for p in prompts[i : i + batch_size]]
        ctx = [ids[:n] for ids, n in chunk]
        width = max(len(c) for c in ctx)
        # Left padding so every row's next token is at the last position.
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in ctx], device=device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in ctx], device=device)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=pad)
        for row in gen[:, width:].tolist():
            if eos in row:
                row = row[: row.index(eos)]
            out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out
