"""Dataset distillation by matching training trajectories, with AST's additions.

A synthetic set ``D_syn`` (``ipc`` examples per class) and a learnable step
size ``alpha`` are optimised so that a student trained on ``D_syn`` follows
the experts trained on the real data (Cazenavette et al., "Dataset
Distillation by Matching Training Trajectories", CVPR 2022, Eq. 1-2):

1. pick an expert and a start epoch ``t ~ U{0, ..., T+ - 1}``;
2. start the student at ``theta_0 = theta*_t``;
3. take ``N`` steps on mini-batches of ``D_syn``,
   ``theta_{n+1} = theta_n - alpha * grad l(D_syn; theta_n)``;
4. minimise the normalised distance to the expert ``M`` epochs later::

       L = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2

   through all ``N`` unrolled steps, with respect to ``D_syn`` and ``alpha``.

``alpha`` is learned directly (not log-parametrised), initialised at
``lr_init`` and updated by SGD with momentum 0.5, as in both papers' code;
``D_syn`` is updated by SGD with momentum 0.5. Unlike the papers, ``alpha`` is
projected onto ``alpha >= 1e-6`` after each update, and an iteration whose
loss or gradient is not finite is skipped (counted in ``DistillResult.skipped``).

The additions of AST (Shen et al., "Efficient Dataset Distillation through
Alignment with Smooth and High-Quality Expert Trajectories",
arXiv:2310.10541), each switchable in ``DistillConfig``:

``init="representative"`` (representative initialisation)
    Per class, k-means with ``k = ipc`` on the expert's outputs (logits of the
    last-epoch expert, as the code uses) and the real sample nearest each
    centre. The AST code clusters into 10 centres and takes the ``ipc // 10``
    nearest samples of each (which selects nothing below 10 per class); we
    follow the text, ``k = ipc`` and one sample per centre.
``balanced_loss`` (balanced inner-loop loss)
    The inner cross-entropy is scaled by the start epoch, with
    ``h = T+ // 2`` (AST code)::

        w(t) = log_5(t - h + 8)        if t >= h
        w(t) = 1 / log_5(h - t + 8)    otherwise

    so late starts (small gradients) are not drowned by early ones.
``intermediate_matching`` (intermediate matching loss)
    For ``i = 1 .. M-1`` the student after ``n_i = (N // M) * i`` steps is
    matched to ``theta*_{t+i}`` with the same normalised loss and the terms
    are added to ``L`` with weight 1 (the code's ``agg_middle_loss``).
``weight_perturb`` (weight perturbation of the start point)
    ``perturb_mode="ast"`` (default) follows the AST code
    (github.com/shenjiyuan123/AST-Alignment-with-Smooth-Expert, ``distill.py``,
    ``weightPerturb``): for every convolution kernel ``W`` (4-D) of the start
    point, with ``D ~ N(0, I)`` of W's shape::

        W <- W + alpha * (D / ||D||_F) * W          (elementwise product)

    and every other parameter (biases, norm parameters, linear layers) left
    as it is, so **an MLP is not perturbed at all**; ``alpha`` =
    ``perturb_scale`` (default 1, the code's value). Each element moves by
    ``|W_ij| |D_ij| / ||D||_F``, about ``|W_ij| / sqrt(numel(W))``. The paper's
    text describes the perturbation only in words; we follow the code.
    ``perturb_mode="filter"`` is the filter-normalised Gaussian direction of
    Li et al., "Visualizing the Loss Landscape of Neural Nets" (2018): for
    every weight matrix or kernel and every output filter ``j``,
    ``d_j <- d_j / ||d_j|| * ||theta_j||`` and ``theta_j <- theta_j +
    perturb_scale * d_j`` (default scale 0.01), which does move an MLP.
``dsa`` (differentiable siamese augmentation, both papers)
    Each inner step's synthetic batch goes through one DSA transform
    (``gristmill.trainers.dsa``: color, crop, cutout, flip, scale or rotate,
    differentiable in the pixels), drawn per image as both codes do; image
    inputs only (a flat feature vector is left as it is). Off by default.
``student_momentum`` (momentum in the student's inner loop)
    ``b_0 = g_0``, ``b_n = mu * b_{n-1} + g_n``, ``theta_{n+1} = theta_n - alpha * b_n``
    (AST code, no Nesterov); ``mu = 0`` is MTT's plain SGD.

Example
-------
>>> import numpy as np
>>> from sklearn.datasets import load_digits
>>> from gristmill.trainers.experts import ExpertConfig
>>> x, y = load_digits(return_X_y=True)
>>> out = distill_dataset(x[:300], y[:300], experts=ExpertConfig.mtt(num_experts=1, epochs=4),
...                       config=DistillConfig(ipc=1, iterations=2, syn_steps=4,
...                                            expert_epochs=2, max_start_epoch=2),
...                       progress=False)
>>> out.x_syn.shape
(10, 64)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sklearn.cluster import KMeans
from torch import nn
from tqdm.auto import tqdm

from gristmill.trainers.distill_models import MODEL_KINDS, FlatParams, build_model
from gristmill.trainers.dsa import STRATEGY, check_strategy, dsa_augment
from gristmill.trainers.experts import ExpertConfig, ExpertTrajectories, train_experts

MIN_LR = 1e-6

InitKind = Literal["representative", "real", "noise"]
PerturbMode = Literal["ast", "filter"]
PERTURB_SCALE = {"ast": 1.0, "filter": 0.01}


class DistillConfig(BaseModel):
    """Trajectory-matching settings; ``mtt()`` and ``ast()`` give the papers' switches."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ipc: int = Field(10, ge=1, le=10_000, description="synthetic examples per class")
    iterations: int = Field(300, ge=1, le=1_000_000, description="outer distillation steps")
    syn_steps: int = Field(20, ge=1, le=10_000, description="student steps per iteration (N)")
    expert_epochs: int = Field(2, ge=1, le=10_000, description="expert epochs to match (M)")
    max_start_epoch: int = Field(10, ge=1, le=10_000,
                                 description="start epoch drawn from 0 .. T+-1 (T+)")
    lr_images: float = Field(10.0, gt=0, description="SGD learning rate of the synthetic data")
    lr_lr: float = Field(1e-5, ge=0, description="SGD learning rate of the learnable step size")
    lr_init: float = Field(0.01, gt=0, description="initial student step size alpha")
    batch_syn: int | None = Field(None, ge=1, description="synthetic mini-batch (None: all)")
    init: InitKind = Field("representative", description="how the synthetic set starts")
    balanced_loss: bool = Field(True, description="AST balanced inner-loop loss")
    intermediate_matching: bool = Field(True, description="AST intermediate matching loss")
    weight_perturb: bool = Field(True, description="AST weight perturbation of the start point")
    perturb_mode: PerturbMode = Field("ast", description="ast: the AST code's W + a (D/||D||_F) W on "
                                      "conv kernels only; filter: Li et al.'s filter-normalised noise")
    perturb_scale: float | None = Field(None, ge=0, le=10,
                                        description="alpha of the perturbation (default: 1 for ast, "
                                                    "0.01 for filter)")
    student_momentum: float = Field(0.9, ge=0, lt=1, description="student momentum mu (0 = off)")
    dsa: bool = Field(False, description="DSA augmentation of the synthetic images in the inner loop "
                                         "(image inputs only; Zhao & Bilen 2021)")
    dsa_strategy: str = Field(STRATEGY, description="DSA families joined by _")
    seed: int = Field(0, description="seed of every random choice of the distillation")

    @model_validator(mode="after")
    def _steps_cover_epochs(self) -> DistillConfig:
        check_strategy(self.dsa_strategy)
        if self.intermediate_matching and self.syn_steps < self.expert_epochs:
            raise ValueError(f"syn_steps={self.syn_steps} must be >= expert_epochs="
                             f"{self.expert_epochs} for intermediate_matching")
        return self

    @classmethod
    def mtt(cls, **overrides: object) -> DistillConfig:
        """Plain MTT: real-sample init, no AST additions, SGD student."""
        return cls(**{"init": "real", "balanced_loss": False, "intermediate_matching": False,
                      "weight_perturb": False, "student_momentum": 0.0, **overrides})

    @classmethod
    def ast(cls, **overrides: object) -> DistillConfig:
        """AST: every addition on."""
        return cls(**{"init": "representative", "balanced_loss": True,
                      "intermediate_matching": True, "weight_perturb": True,
                      "student_momentum": 0.9, **overrides})


def matching_loss(student: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||student - target||^2 / ||start - target||^2`` (MTT Eq. 2)."""
    denom = (start - target).pow(2).sum().clamp_min(1e-12)
    return (student - target).pow(2).sum() / denom


def balanced_loss_weight(start_epoch: int, max_start_epoch: int) -> float:
    """AST balanced inner-loop loss factor ``w(t)`` (see the module docstring)."""
    half = max_start_epoch // 2
    if start_epoch >= half:
        return math.log(start_epoch - half + 8, 5)
    return 1.0 / math.log(half - start_epoch + 8, 5)


def intermediate_targets(syn_steps: int, expert_epochs: int) -> dict[int, int]:
    """Student step count -> expert epoch offset matched there (``n_i = (N // M) i``, i < M)."""
    every = syn_steps // expert_epochs
    return {every * i: i for i in range(1, expert_epochs) if 0 < every * i < syn_steps}


def perturb_weights(params: torch.Tensor, flat: FlatParams, scale: float,
                    generator: torch.Generator, mode: PerturbMode = "ast") -> torch.Tensor:
    """Perturb the start point ``params`` (module docstring, ``weight_perturb``).

    ``mode="ast"``: every conv kernel W (4-D) becomes W + scale (D / ||D||_F) ⊙ W,
    D ~ N(0, I), as the AST code does; all other parameters are unchanged (an
    MLP is returned as it is). ``mode="filter"``: every output filter j of every
    weight matrix or kernel moves by exactly ``scale * ||theta_j||`` in a
    Gaussian direction (Li et al. 2018); biases and norm parameters unchanged.
    """
    if mode not in ("ast", "filter"):
        raise ValueError(f"mode must be ast or filter, got {mode!r}")
    out = params.clone()
    for where, shape in flat.weight_slices():
        if mode == "ast":
            if len(shape) != 4:
                continue
            weights = params[where]
            direction = torch.randn(weights.shape, generator=generator, dtype=weights.dtype)
            direction = direction / direction.norm().clamp_min(1e-12)
            out[where] = weights + scale * direction * weights
            continue
        weights = params[where].view(shape[0], -1)
        direction = torch.randn(weights.shape, generator=generator, dtype=weights.dtype)
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
        direction = direction * weights.norm(dim=1, keepdim=True)
        out[where] = (weights + scale * direction).reshape(-1)
    return out


def representative_indices(features: np.ndarray, labels: np.ndarray, ipc: int,
                           seed: int = 0) -> np.ndarray:
    """Per class, the real sample nearest each of ``ipc`` k-means centres (AST init).

    Parameters
    ----------
    features : (n, d) array
        What k-means clusters (the expert's logits in AST).
    labels : (n,) int array
        Classes ``0 .. C-1``; the result is grouped by class in that order.
    ipc : int
        Centres (and samples) per class; a class with fewer samples gives all of them.

    Returns
    -------
    numpy.ndarray
        Row indices into ``features``, ``ipc`` per class, distinct within a class.
    """
    chosen: list[int] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = min(ipc, members.size)
        feats = features[members]
        centres = KMeans(n_clusters=k, random_state=seed, n_init=10).fit(feats).cluster_centers_
        dist = ((centres[:, None, :] - feats[None, :, :]) ** 2).sum(-1)
        taken: set[int] = set()
        for row in dist:
            # Two centres can share a nearest sample; the later one takes its next nearest.
            for j in np.argsort(row, kind="stable"):
                if j not in taken:
                    taken.add(int(j))
                    chosen.append(int(members[j]))
                    break
    return np.asarray(chosen, dtype=np.int64)


def _augment_step(x: torch.Tensor, step: int, *, base: int, strategy: str) -> torch.Tensor:
    # One fresh draw per image and step, as MTT and AST do (their seed -1).
    return dsa_augment(x, base + step, strategy, siamese=False)


def unroll_student(flat: FlatParams, start: torch.Tensor, x_syn: torch.Tensor,
                   y_syn: torch.Tensor, lr: torch.Tensor | float, batches: list[torch.Tensor],
                   *, momentum: float = 0.0, loss_weight: float = 1.0,
                   augment: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The student's parameters ``theta_0 .. theta_N``, one step per index batch.

    ``g_n = grad_theta (w * CE(f(x_syn[b_n]; theta_n), y_syn[b_n]))``,
    ``b_0 = g_0``, ``b_n = mu * b_{n-1} + g_n`` and
    ``theta_{n+1} = theta_n - lr * b_n`` (``mu = 0``: plain SGD). The graph is
    kept (``create_graph``) so a loss on any ``theta_n`` reaches ``x_syn`` and ``lr``.
    ``augment(x, n)``, when given, transforms step n's batch (DSA) before the forward pass.
    """
    theta = start.clone().requires_grad_(True)
    path = [theta]
    velocity = None
    for n, idx in enumerate(batches):
        x = x_syn[idx] if augment is None else augment(x_syn[idx], n)
        inner = F.cross_entropy(flat.forward(theta, x), y_syn[idx]) * loss_weight
        grad = torch.autograd.grad(inner, theta, create_graph=True)[0]
        velocity = grad if velocity is None or momentum == 0 else momentum * velocity + grad
        theta = theta - lr * velocity
        path.append(theta)
    return path


@dataclass
class DistillResult:
    """The synthetic set and what the distillation learned.

    ``x_syn``/``y_syn`` are grouped by class; ``lr`` is the learned step size;
    ``losses`` the matching loss per iteration; ``init_indices`` the real rows
    the synthetic set started from (None for noise).
    """

    x_syn: torch.Tensor
    y_syn: torch.Tensor
    lr: float
    losses: list[float] = field(default_factory=list)
    lr_history: list[float] = field(default_factory=list)
    init_indices: np.ndarray | None = None
    skipped: int = 0


def initial_synthetic(x: torch.Tensor, y: torch.Tensor, num_classes: int, config: DistillConfig,
                      flat: FlatParams, trajectories: ExpertTrajectories,
                      rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray | None]:
    """The starting synthetic set (``ipc`` per class, grouped by class) and its real rows."""
    labels = y.numpy()
    if config.init == "noise":
        gen = torch.Generator().manual_seed(config.seed)
        return torch.randn((num_classes * config.ipc, *x.shape[1:]), generator=gen), None
    if config.init == "representative":
        expert = trajectories.params[int(rng.integers(trajectories.num_experts)), -1]
        with torch.no_grad():
            logits = flat.forward(expert, x).numpy()
        idx = representative_indices(logits, labels, config.ipc, seed=config.seed)
    else:
        idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:config.ipc]
                              for c in range(num_classes)])
    if idx.size != num_classes * config.ipc:
        raise ValueError(f"ipc={config.ipc} exceeds the examples of some class "
                         f"(smallest class has {np.bincount(labels).min()})")
    return x[torch.as_tensor(idx)].clone(), idx


def distill(x: torch.Tensor, y: torch.Tensor, trajectories: ExpertTrajectories, flat: FlatParams,
            config: DistillConfig, *, num_classes: int | None = None,
            progress: bool = True) -> DistillResult:
    """Distil ``(x, y)`` into ``config.ipc`` examples per class by trajectory matching.

    Parameters
    ----------
    x, y : torch.Tensor
        Real inputs (already normalised) and integer labels ``0 .. C-1``.
    trajectories : ExpertTrajectories
        Experts of the architecture ``flat`` describes, trained on ``(x, y)``.
    flat : FlatParams
        The student architecture.
    config : DistillConfig
        Which additions are on and the step sizes.
    num_classes : int, optional
        Number of classes (default: ``max(y) + 1``).

    Returns
    -------
    DistillResult
        ``config.ipc`` synthetic examples per class (normalised units), the
        learned step size, and the loss and step size per iteration.
    """
    num_classes = int(num_classes or int(y.max()) + 1)
    if config.max_start_epoch + config.expert_epochs > trajectories.epochs:
        raise ValueError(f"max_start_epoch + expert_epochs = "
                         f"{config.max_start_epoch + config.expert_epochs} exceeds the "
                         f"{trajectories.epochs} epochs of the expert trajectories")
    rng = np.random.default_rng(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    x_init, init_idx = initial_synthetic(x, y, num_classes, config, flat, trajectories, rng)
    x_syn = x_init.requires_grad_(True)
    y_syn = torch.arange(num_classes).repeat_interleave(config.ipc)
    syn_lr = torch.tensor(float(config.lr_init), requires_grad=True)
    opt_x = torch.optim.SGD([x_syn], lr=config.lr_images, momentum=0.5)
    opt_lr = torch.optim.SGD([syn_lr], lr=config.lr_lr, momentum=0.5)
    batch = config.batch_syn or len(y_syn)
    middle = intermediate_targets(config.syn_steps, config.expert_epochs) \
        if config.intermediate_matching else {}
    result = DistillResult(x_syn=x_syn, y_syn=y_syn, lr=config.lr_init, init_indices=init_idx)

    for _ in tqdm(range(config.iterations), desc="distill", disable=not progress):
        trajectory = trajectories.params[int(rng.integers(trajectories.num_experts))]
        start_epoch = int(rng.integers(config.max_start_epoch))
        start = trajectory[start_epoch]
        if config.weight_perturb:
            scale = config.perturb_scale if config.perturb_scale is not None \
                else PERTURB_SCALE[config.perturb_mode]
            start = perturb_weights(start, flat, scale, gen, config.perturb_mode)
        target = trajectory[start_epoch + config.expert_epochs]
        weight = (balanced_loss_weight(start_epoch, config.max_start_epoch)
                  if config.balanced_loss else 1.0)

        batches = []
        while len(batches) < config.syn_steps:
            batches += list(torch.split(torch.randperm(len(y_syn), generator=gen), batch))
        augment = None
        if config.dsa and x_syn.ndim == 4:
            augment = partial(_augment_step, base=int(rng.integers(2**62)), strategy=config.dsa_strategy)
        path = unroll_student(flat, start, x_syn, y_syn, syn_lr, batches[:config.syn_steps],
                              momentum=config.student_momentum, loss_weight=weight, augment=augment)
        theta = path[-1]
        extra = [matching_loss(path[step], start, trajectory[start_epoch + offset])
                 for step, offset in middle.items()]
        loss = matching_loss(theta, start, target) + sum(extra)

        opt_x.zero_grad()
        opt_lr.zero_grad()
        loss.backward()
        if not torch.isfinite(loss) or not torch.isfinite(x_syn.grad).all():
            # A diverged unroll says nothing about the data; skip its update.
            result.skipped += 1
            continue
        opt_x.step()
        opt_lr.step()
        with torch.no_grad():
            # Guard, not in the papers: a negative step size would make the student ascend.
            syn_lr.clamp_(min=MIN_LR)
        result.losses.append(loss.item())
        result.lr_history.append(syn_lr.item())

    result.x_syn = x_syn.detach()
    result.lr = float(syn_lr.detach())
    return result


def train_and_evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor,
                       y_test: torch.Tensor, *, lr: float, epochs: int = 300, batch_size: int = 256,
                       seed: int = 0) -> float:
    """Train ``model`` on ``(x, y)`` and return its test accuracy.

    MTT's evaluation protocol (``evaluate_synset``): SGD, momentum 0.9, weight
    decay 5e-4, learning rate ``lr`` divided by 10 after epoch ``epochs // 2 + 1``.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    for epoch in range(epochs):
        for idx in torch.split(torch.randperm(len(y), generator=gen), batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch == epochs // 2 + 1:
            for group in opt.param_groups:
                group["lr"] = lr * 0.1
    model.eval()
    with torch.no_grad():
        return float((model(x_test).argmax(1) == y_test).float().mean())


@dataclass
class Normalizer:
    """Per-feature (vectors) or per-channel (images) standardisation fitted on the real data."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, image: bool) -> Normalizer:
        axes = (0, 2, 3) if image else (0,)
        mean = x.mean(axis=axes, keepdims=True)
        std = x.std(axis=axes, keepdims=True)
        # Near-constant features (the border pixels of digits) would blow up.
        std = np.maximum(std, 0.1 * float(std.mean()) + 1e-8)
        return cls(mean=mean[0].astype(np.float32), std=std[0].astype(np.float32))

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)

    def inverse(self, x: np.ndarray) -> np.ndarray:
        return (x * self.std + self.mean).astype(np.float32)


@dataclass
class DistillOutcome:
    """``distill_dataset``'s answer, in the caller's units and labels."""

    x_syn: np.ndarray
    y_syn: np.ndarray
    lr: float
    result: DistillResult
    trajectories: ExpertTrajectories
    normalizer: Normalizer
    classes: np.ndarray
    expert_config: ExpertConfig
    config: DistillConfig


def model_factory(kind: str, input_shape: Sequence[int], num_classes: int, *,
                  width: int | None = None, depth: int = 2) -> Callable[[int], nn.Module]:
    """``seed -> fresh network`` for ``build_model(kind, ...)``."""
    return lambda seed: build_model(kind, input_shape, num_classes, width=width, depth=depth,
                                    seed=seed)


def distill_dataset(x: np.ndarray, y: Sequence | np.ndarray, *, model: str = "mlp",
                    image_shape: Sequence[int] | None = None,
                    experts: ExpertConfig | None = None, config: DistillConfig | None = None,
                    trajectories: ExpertTrajectories | None = None, width: int | None = None,
                    depth: int = 2, threads: int | None = 1,
                    progress: bool = True) -> DistillOutcome:
    """Train experts on ``(x, y)`` and distil it; the whole job in one call.

    Parameters
    ----------
    x : array, (n, d) or (n, C, H, W)
        Real features or images, in any units: they are standardised for
        training and the synthetic set is mapped back to the same units.
    y : array of labels
        Any hashable labels; ``DistillOutcome.y_syn`` uses the same values.
    model : {"mlp", "convnet"}
        Expert and student architecture.
    image_shape : (C, H, W), optional
        Reshape flat rows of ``x`` into images (for ``convnet``).
    experts, config : ExpertConfig, DistillConfig
        Recipes; default AST's.
    trajectories : ExpertTrajectories, optional
        Reuse experts trained before (on the same data and architecture).
    threads : int or None
        torch CPU threads for the job (restored afterwards); these networks are
        too small to gain from more, and on a shared machine extra threads spin.
        None leaves torch's setting alone.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _distill_dataset(x, y, model=model, image_shape=image_shape, experts=experts,
                                config=config, trajectories=trajectories, width=width,
                                depth=depth, progress=progress)
    finally:
        torch.set_num_threads(previous)


def _distill_dataset(x: np.ndarray, y: Sequence | np.ndarray, *, model: str,
                     image_shape: Sequence[int] | None, experts: ExpertConfig | None,
                     config: DistillConfig | None, trajectories: ExpertTrajectories | None,
                     width: int | None, depth: int, progress: bool) -> DistillOutcome:
    if model not in MODEL_KINDS:
        raise ValueError(f"model must be one of {MODEL_KINDS}, got {model!r}")
    experts = experts or ExpertConfig.ast()
    config = config or DistillConfig.ast()
    x = np.asarray(x, dtype=np.float32)
    if image_shape is not None:
        x = x.reshape(len(x), *image_shape)
    if model == "convnet" and x.ndim != 4:
        raise ValueError("model 'convnet' needs images: give image_shape=(C, H, W) or 4-d input")
    classes, labels = np.unique(np.asarray(y), return_inverse=True)
    if classes.size < 2:
        raise ValueError(f"need at least 2 classes to distil, got {classes.size}")
    norm = Normalizer.fit(x, image=x.ndim == 4)
    xt = torch.from_numpy(norm.transform(x))
    yt = torch.from_numpy(labels.astype(np.int64))
    factory = model_factory(model, xt.shape[1:], classes.size, width=width, depth=depth)
    torch.manual_seed(config.seed)
    if trajectories is None:
        trajectories = train_experts(factory, xt, yt, experts, seed=config.seed,
                                     progress=progress)
    flat = FlatParams(factory(config.seed))
    result = distill(xt, yt, trajectories, flat, config, num_classes=classes.size,
                     progress=progress)
    return DistillOutcome(x_syn=norm.inverse(result.x_syn.numpy()),
                          y_syn=classes[result.y_syn.numpy()], lr=result.lr, result=result,
                          trajectories=trajectories, normalizer=norm, classes=classes,
                          expert_config=experts, config=config)
