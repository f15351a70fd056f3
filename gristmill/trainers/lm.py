"""Pretrain a causal LM from a transformers config on tokenized shards.

This is the validation trainer: selected, random and full data are compared
by training the same model on the same token budget and reading held-out
loss on target sets. It is written in the spirit of nanoGPT's ``train.py``:
one loop you can read top to bottom.

Data. Every domain of the training corpora (``IndexedTokens`` prefixes) is a
*pool*: its documents concatenated (each ends with ``eos``) and cut into
fixed windows of ``seq_len + 1`` tokens, input and shifted target, as
Megatron's GPT dataset packs them. Each optimizer step draws the domain of
every sequence from the mixture at that step,

    d_i ~ Categorical(p(step)),   p(step) = schedule.weights_at(step),

then the next window of a per-domain shuffled order (reshuffled when a
domain is used up, which counts an epoch of that domain). Without a schedule
``p`` is the natural mixture (windows per domain / all windows), which is
uniform sampling over the corpus. One global batch of ``batch_size *
world_size`` sequences is drawn from one generator and each rank takes its
slice, so the data seen does not depend on the number of ranks.

Loss. With scalarization weights ``w_d`` ("Upsample or Upweight? Balanced
Training on Heavily Imbalanced Datasets", Li et al., NAACL 2025) the loss of a batch of ``B`` sequences of ``T`` tokens is

    L = 1/(B T) sum_i w_{d_i} sum_t CE(x_{i,t+1} | x_{i,<=t}),

so a domain's gradient is scaled by exactly its weight; ``w = 1`` everywhere
is the usual mean cross-entropy. Domains a weight dict leaves out weigh 1.

Optimizer. AdamW (weight decay on matrices only, as nanoGPT), linear warmup
then cosine decay to ``min_lr`` (nanoGPT's ``get_lr``), gradient clipping.

Evaluation. Every ``eval_every`` steps, and after the last, the mean token
loss on each target set and on each domain of it: keys ``<target>`` and
``<target>/<domain>`` in ``curves["eval"]``. Windows are fixed at the start
(``eval_sequences`` per domain, evenly spread over the domain's pool).

Scale. CPU by default; ``bf16`` autocasts the forward pass; under
``torchrun`` (``WORLD_SIZE`` > 1) it wraps the model in
DistributedDataParallel with NCCL on GPUs and gloo on CPUs. Only rank 0
evaluates and writes.

Example
-------
>>> cfg = LMTrainConfig(train=["out/tokens/train"], eval={"target": "out/tokens/target"},
...                     out_dir="runs/lm", model="runs/tiny", max_steps=200)  # doctest: +SKIP
>>> result = train_lm(cfg)  # doctest: +SKIP
>>> result.final_eval["target"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from gristmill.pipeline.tokenized import IndexedTokens

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from gristmill.selectors.mixture import MixtureSchedule


class LMTrainConfig(BaseModel):
    """What to train on, for how long, and how.

    Exactly one of ``max_steps`` and ``token_budget`` sets the length; a
    budget becomes ``ceil(token_budget / (batch_size * seq_len * grad_accum *
    world_size))`` steps.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    train: list[str] = Field(min_length=1, description="tokenized prefixes to train on")
    eval: dict[str, str] = Field(default_factory=dict, description="target name -> tokenized prefix")
    out_dir: str
    model: str | None = Field(None, description="folder or config.json of a transformers config")
    tokenizer: str | None = Field(None, description="saved with the model; default: the corpus's")
    seq_len: int = Field(128, ge=2)
    batch_size: int = Field(8, ge=1, description="sequences per rank per micro-step")
    grad_accum: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    token_budget: int | None = Field(None, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr: float | None = Field(None, ge=0, description="default lr / 10")
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    eval_every: int = Field(50, ge=1)
    eval_sequences: int = Field(16, ge=1, description="windows per domain of each target")
    log_every: int = Field(1, ge=1)
    seed: int = 0
    bf16: bool = False
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    schedule: str | None = Field(None, description="MixtureSchedule JSON file")
    loss_weights: dict[str, float] | None = Field(None, description="domain -> loss weight")
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> LMTrainConfig:
        if (self.max_steps is None) == (self.token_budget is None):
            raise ValueError("set exactly one of max_steps (>= 1) and token_budget (>= 1)")
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.loss_weights is not None:
            bad = {d: w for d, w in self.loss_weights.items() if not (w >= 0 and math.isfinite(w))}
            if bad:
                raise ValueError(f"loss_weights must be finite and >= 0, got {bad}")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        return self


@dataclass
class LMTrainResult:
    """What ``train_lm`` returns (and writes to ``out_dir``)."""

    out_dir: Path
    model_dir: Path
    steps: int
    tokens: int
    curves: dict[str, Any]
    final_eval: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- data


class DomainPool:
    """Fixed windows of ``seq_len + 1`` tokens over one domain's documents.

    The documents (from one or more corpora) are concatenated in order;
    window ``k`` holds tokens ``[k * seq_len, (k + 1) * seq_len]`` of that
    stream, so consecutive windows share one token (target of the last
    position = input of the next window's first), as in Megatron.
    Tokens stay memory-mapped; only the window's documents are read.
    """

    def __init__(self, docs: list[tuple[IndexedTokens, np.ndarray]], seq_len: int) -> None:
        self.seq_len = seq_len
        self._corpora = [c for c, _ in docs]
        empty = [np.zeros(0, np.int64)]
        self._corpus_of = np.concatenate([np.full(len(i), k, np.int64) for k, (_, i) in enumerate(docs)] + empty)
        self._doc_of = np.concatenate([i for _, i in docs] + empty).astype(np.int64)
        sizes = np.concatenate([c.sizes[i].astype(np.int64) for c, i in docs] + empty)
        self._ends = np.cumsum(sizes)
        self.num_tokens = int(self._ends[-1]) if sizes.size else 0

    def __len__(self) -> int:
        return max(0, (self.num_tokens - 1) // self.seq_len)

    def window(self, k: int) -> np.ndarray:
        start, stop = k * self.seq_len, (k + 1) * self.seq_len + 1
        j = int(np.searchsorted(self._ends, start, side="right"))
        parts, pos = [], start
        while pos < stop:
            doc_start = int(self._ends[j - 1]) if j else 0
            tokens = self._corpora[self._corpus_of[j]][int(self._doc_of[j])]
            parts.append(tokens[pos - doc_start:stop - doc_start])
            pos = int(self._ends[j])
            j += 1
        return np.concatenate(parts).astype(np.int64)


def domain_pools(corpora: list[IndexedTokens], seq_len: int) -> dict[str, DomainPool]:
    """One pool per domain name found in ``corpora`` (names sorted)."""
    names = sorted({n for c in corpora for n in c.domain_names})
    pools = {}
    for name in names:
        docs = [(c, c.documents_in(name)) for c in corpora]
        docs = [(c, i) for c, i in docs if i.size]
        pools[name] = DomainPool(docs, seq_len)
    return pools


class MixtureSampler:
    """Draws each step's sequences: domain from the mixture, then the next window.

    Parameters
    ----------
    pools : dict
        Domain name -> ``DomainPool``.
    schedule : MixtureSchedule, optional
        Anything with ``domains`` and ``weights_at(step)``; None samples the
        natural mixture. Pool domains the schedule does not name are never drawn.
    seed : int
        Seeds the generator of domains and window orders.
    """

    def __init__(self, pools: dict[str, DomainPool], schedule: MixtureSchedule | None = None,
                 seed: int = 0) -> None:
        self.pools = pools
        self.domains = list(pools)
        self.schedule = schedule
        if schedule is not None:
            unknown = [d for d in schedule.domains if d not in pools]
            if unknown:
                raise ValueError(f"schedule domains {unknown} are not in the training data; "
                                 f"its domains are {self.domains}")
            self._columns = np.array([self.domains.index(d) for d in schedule.domains])
        sizes = np.array([len(p) for p in pools.values()], dtype=np.float64)
        if sizes.sum() == 0:
            raise ValueError(f"no domain has a full window of seq_len + 1 tokens; domains {self.domains}")
        self._natural = sizes / sizes.sum()
        self.rng = np.random.default_rng(seed)
        self._order = [np.zeros(0, np.int64) for _ in pools]
        self._cursor = [0] * len(pools)
        self.epochs = [0] * len(pools)
        self.drawn = np.zeros(len(pools), dtype=np.int64)

    def weights_at(self, step: int) -> np.ndarray:
        """Probabilities over ``self.domains`` at ``step``."""
        if self.schedule is None:
            return self._natural
        p = np.zeros(len(self.domains))
        p[self._columns] = np.asarray(self.schedule.weights_at(step), dtype=np.float64)
        empty = [d for d, w in zip(self.domains, p, strict=True) if w > 0 and len(self.pools[d]) == 0]
        if empty:
            raise ValueError(f"step {step}: the schedule gives weight to domains {empty} "
                             "that have no full window of seq_len + 1 tokens")
        return p / p.sum()

    def _next_window(self, d: int) -> int:
        if self._cursor[d] >= self._order[d].size:
            if self._order[d].size:
                self.epochs[d] += 1
            self._order[d] = self.rng.permutation(len(self.pools[self.domains[d]]))
            self._cursor[d] = 0
        self._cursor[d] += 1
        return int(self._order[d][self._cursor[d] - 1])

    def draw(self, step: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Domain ids and window ids of ``n`` sequences for ``step``."""
        doms = self.rng.choice(len(self.domains), size=n, p=self.weights_at(step))
        windows = np.array([self._next_window(d) for d in doms], dtype=np.int64)
        self.drawn += np.bincount(doms, minlength=len(self.domains))
        return doms, windows

    def tokens(self, doms: np.ndarray, windows: np.ndarray) -> np.ndarray:
        """``(n, seq_len + 1)`` token windows for drawn (domain, window) pairs."""
        return np.stack([self.pools[self.domains[d]].window(w) for d, w in zip(doms, windows, strict=True)])


# ---------------------------------------------------------------- loss, lr


def weighted_lm_loss(logits: torch.Tensor, targets: torch.Tensor,
                     seq_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``1/(B T) sum_i w_i sum_t CE_it``: token cross-entropy, each sequence scaled by its weight.

    Parameters
    ----------
    logits : Tensor (B, T, V)
    targets : Tensor (B, T)
    seq_weights : Tensor (B,), optional
        Loss weight of every sequence (its domain's); None means 1.
    """
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    ce = ce.view(targets.shape)
    if seq_weights is not None:
        ce = ce * seq_weights.to(ce.dtype)[:, None]
    return ce.mean()


def cosine_lr(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at ``total_steps`` (nanoGPT)."""
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if step >= total_steps or total_steps <= warmup_steps:
        return min_lr
    ratio = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


# ---------------------------------------------------------------- eval


def eval_windows(corpus: IndexedTokens, seq_len: int, per_domain: int) -> dict[str, torch.Tensor]:
    """Up to ``per_domain`` windows per domain, evenly spread over the domain's pool."""
    out = {}
    for name, pool in domain_pools([corpus], seq_len).items():
        if len(pool) == 0:
            continue
        ks = np.unique(np.linspace(0, len(pool) - 1, min(per_domain, len(pool))).round().astype(np.int64))
        out[name] = torch.from_numpy(np.stack([pool.window(int(k)) for k in ks]))
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, targets: dict[str, dict[str, torch.Tensor]], batch_size: int,
             device: torch.device, autocast: Any = nullcontext) -> dict[str, float]:
    """Mean token loss per target (``name``) and per domain of it (``name/domain``).

    ``autocast`` is a callable returning the context to run the forward pass in.
    """
    model.eval()
    out: dict[str, float] = {}
    for name, by_domain in targets.items():
        total, count = 0.0, 0
        for domain, windows in by_domain.items():
            dom_total = 0.0
            for chunk in windows.split(batch_size):
                chunk = chunk.to(device)
                with autocast():
                    logits = model(input_ids=chunk[:, :-1]).logits
                dom_total += weighted_lm_loss(logits, chunk[:, 1:]).item() * chunk[:, 1:].numel()
            n = windows[:, 1:].numel()
            out[f"{name}/{domain}"] = dom_total / n
            total, count = total + dom_total, count + n
        out[name] = total / count
    model.train()
    return out


# ---------------------------------------------------------------- train


def _distributed() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


def _load_model_config(config: LMTrainConfig, model_config: PretrainedConfig | None) -> PretrainedConfig:
    from transformers import AutoConfig, PretrainedConfig

    if model_config is not None:
        return model_config
    if config.model is None:
        raise ValueError("model: give a transformers config folder or config.json "
                         "(or pass model_config=) to say what to train")
    path = Path(config.model)
    if path.is_file():
        cfg_dict, _ = PretrainedConfig.get_config_dict(str(path))
        return AutoConfig.for_model(**cfg_dict)
    return AutoConfig.from_pretrained(str(path))


def train_lm(config: LMTrainConfig, *, model_config: PretrainedConfig | None = None,
             schedule: MixtureSchedule | None = None) -> LMTrainResult:
    """Train a causal LM from scratch on ``config.train``; see the module docstring.

    Parameters
    ----------
    config : LMTrainConfig
    model_config : transformers.PretrainedConfig, optional
        Architecture to initialise; default ``config.model``.
    schedule : MixtureSchedule, optional
        Per-step domain mixture; default ``config.schedule`` (a JSON file) or
        the natural mixture. Its ``loss_weights`` apply unless
        ``config.loss_weights`` is given.

    Returns
    -------
    LMTrainResult
        Curves (``train``: step, loss, lr, tokens; ``eval``: step, tokens and
        one key per target and per target/domain), also written to
        ``out_dir/curves.json``, and the model saved to ``out_dir/model``.
    """
    rank, local_rank, world = _distributed()
    ddp = world > 1
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available()
                          else "cpu" if config.device == "auto" else config.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)   # one GPU per torchrun process
    if ddp:
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    master = rank == 0
    out_dir = Path(config.out_dir)

    # Check the model against the data before reading any tokens.
    mc = _load_model_config(config, model_config)
    max_pos = getattr(mc, "max_position_embeddings", None) or getattr(mc, "n_positions", None)
    if max_pos is not None and config.seq_len > max_pos:
        raise ValueError(f"seq_len must be <= the model's {max_pos} positions, got {config.seq_len}")
    corpora = [IndexedTokens(p) for p in config.train]
    # The sidecar knows the vocabulary; a bare Megatron corpus is scanned once.
    vocab = max(int(c.meta["vocab_size"]) if "vocab_size" in c.meta else int(c.tokens.max(initial=0)) + 1
                for c in corpora)
    if mc.vocab_size < vocab:
        raise ValueError(f"model vocab_size {mc.vocab_size} is smaller than the corpus vocabulary {vocab}")

    # data
    pools = domain_pools(corpora, config.seq_len)
    if schedule is None and config.schedule is not None:
        from gristmill.selectors.mixture import MixtureSchedule

        schedule = MixtureSchedule.load(config.schedule)
    sampler = MixtureSampler(pools, schedule, seed=config.seed)
    loss_weights = config.loss_weights
    if loss_weights is None and schedule is not None:
        loss_weights = getattr(schedule, "loss_weights", None)
    unknown = sorted(set(loss_weights or {}) - set(pools))
    if unknown:
        raise ValueError(f"loss_weights names domains {unknown} not in the training data; "
                         f"its domains are {sampler.domains}")
    domain_weight = torch.tensor([(loss_weights or {}).get(d, 1.0) for d in sampler.domains])
    targets = {name: eval_windows(IndexedTokens(p), config.seq_len, config.eval_sequences)
               for name, p in config.eval.items()}

    tokens_per_step = config.batch_size * config.seq_len * config.grad_accum * world
    steps = config.max_steps or math.ceil(config.token_budget / tokens_per_step)
    if schedule is not None and getattr(schedule, "total_steps", steps) != steps:
        warnings.warn(f"the schedule was made for {schedule.total_steps} steps, training runs "
                      f"{steps}; steps past its end keep its last mixture", stacklevel=2)
    min_lr = config.lr / 10 if config.min_lr is None else config.min_lr

    # model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_config(mc).to(device)
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(config.beta1, config.beta2), fused=device.type == "cuda")
    raw_model = model
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16) if config.bf16 else nullcontext()

    curves: dict[str, Any] = {"train": [], "eval": [], "domains": sampler.domains,
                              "tokens_per_step": tokens_per_step, "world_size": world}
    bar = tqdm(total=steps, desc="train-lm", unit="step", disable=not (config.progress and master))
    running, running_n, t0 = 0.0, 0, time.time()
    for step in range(steps + 1):
        if master and targets and (step % config.eval_every == 0 or step == steps):
            curves["eval"].append({"step": step, "tokens": step * tokens_per_step,
                                   **evaluate(raw_model, targets, config.batch_size, device, autocast)})
        if step == steps:
            break
        lr = cosine_lr(step, lr=config.lr, min_lr=min_lr, warmup_steps=config.warmup_steps,
                       total_steps=steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        step_loss = torch.zeros((), device=device)
        for micro in range(config.grad_accum):
            # One global batch for all ranks; this rank trains on its slice.
            doms, windows = sampler.draw(step, config.batch_size * world)
            mine = slice(rank * config.batch_size, (rank + 1) * config.batch_size)
            batch = torch.from_numpy(sampler.tokens(doms[mine], windows[mine])).to(device, non_blocking=True)
            weights = domain_weight[torch.from_numpy(doms[mine])].to(device)
            # DDP averages gradients only on the last micro-step.
            sync = not ddp or micro == config.grad_accum - 1
            with nullcontext() if sync else model.no_sync():
                with autocast():
                    logits = model(input_ids=batch[:, :-1]).logits
                loss = weighted_lm_loss(logits, batch[:, 1:], weights) / config.grad_accum
                loss.backward()
            step_loss += loss.detach()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        if ddp:
            torch.distributed.all_reduce(step_loss, op=torch.distributed.ReduceOp.AVG)
        running, running_n = running + step_loss.item(), running_n + 1
        if (step + 1) % config.log_every == 0 or step + 1 == steps:
            curves["train"].append({"step": step + 1, "loss": running / running_n, "lr": lr,
                                    "tokens": (step + 1) * tokens_per_step})
            bar.set_postfix(loss=f"{running / running_n:.3f}", lr=f"{lr:.2e}")
            running, running_n = 0.0, 0
        bar.update(1)
    bar.close()

    curves["domain_sequences"] = dict(zip(sampler.domains, sampler.drawn.tolist(), strict=True))
    curves["domain_epochs"] = dict(zip(sampler.domains, sampler.epochs, strict=True))
    curves["loss_weights"] = dict(zip(sampler.domains, domain_weight.tolist(), strict=True))
    curves["seconds"] = time.time() - t0
    final = {k: v for k, v in curves["eval"][-1].items() if k not in ("step", "tokens")} \
        if curves["eval"] else {}
    model_dir = out_dir / "model"
    if master:
        _save(raw_model, config, corpora, curves, out_dir, model_dir)
    if ddp:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return LMTrainResult(out_dir=out_dir, model_dir=model_dir, steps=steps,
                         tokens=steps * tokens_per_step, curves=curves, final_eval=final)


def _save(model: torch.nn.Module, config: LMTrainConfig, corpora: list[IndexedTokens],
          curves: dict[str, Any], out_dir: Path, model_dir: Path) -> None:
    from gristmill.pipeline.writers import atomic_write_json

    model.save_pretrained(str(model_dir))
    tokenizer = config.tokenizer or corpora[0].tokenizer_path
    if tokenizer and Path(tokenizer).is_dir():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(str(model_dir))
    atomic_write_json(out_dir / "train_config.json", json.loads(config.model_dump_json()))
    atomic_write_json(out_dir / "curves.json", curves)
