"""Expert trajectories: networks trained on the real data, parameters saved every epoch.

Trajectory matching distils a data set by making a student trained on the
synthetic set land where an expert trained on the real set landed. The
experts are trained once, here, and their parameters after every epoch are
stored as flat vectors ``theta*_0 .. theta*_E``.

Two recipes:

``ExpertConfig.mtt()``
    Cazenavette et al., "Dataset Distillation by Matching Training
    Trajectories", CVPR 2022 (``buffer.py`` of GeorgeCazenavette/mtt-distillation):
    plain SGD, no momentum, no weight decay, constant learning rate.

``ExpertConfig.ast()``
    Shen et al., "Efficient Dataset Distillation through Alignment with Smooth
    and High-Quality Expert Trajectories" (AST, arXiv:2310.10541;
    ``buffer.py``/``utils.py`` of shenjiyuan123/AST-Alignment-with-Smooth-Expert):
    SGD with momentum 0.9 and weight decay 1e-3, and two smoothing terms.

    *Clipping loss*: the loss of epoch ``e`` is scaled by
    ``lambda_e = 0.5 + 0.05 e`` for ``e < 10`` and 1 afterwards, so the early,
    steepest epochs move the parameters less (``loss_decay`` list in the code).

    *Gradient penalty* on input gradients, the WGAN-GP form
    (Gulrajani et al., 2017) the code uses::

        L = lambda_e * CE(f(x), y) + lambda_gp * mean_i (||d sum_k f_k(x_i) / d x_i||_2 - 1)^2

    with ``lambda_gp = 2``. The code takes the norm over ``dim=1`` of the input
    gradient, which for images is the channel axis (one norm per pixel); we take
    it over all input dimensions of a sample, as WGAN-GP does, which is the
    same thing for feature vectors. As in the code the penalty is not scaled
    by ``lambda_e``, and the learning rate is multiplied by 0.6 after epoch
    ``E // 2 + 1``.

Data augmentation (DSA in both papers) is not applied: the inputs here are
feature vectors and 8x8 images for which the papers' augmentations do not
carry over.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from gristmill.trainers.distill_models import FlatParams
from gristmill.trainers.dsa import dsa_augment

CLIP_EPOCHS = 10


class ExpertConfig(BaseModel):
    """How experts are trained. Build the papers' recipes with ``mtt()`` or ``ast()``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_experts: int = Field(5, ge=1, le=10_000, description="number of expert trajectories")
    epochs: int = Field(20, ge=1, le=10_000, description="epochs per expert (E)")
    lr: float = Field(0.01, gt=0, le=10, description="SGD learning rate")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0, le=1, description="SGD weight decay")
    batch_size: int = Field(64, ge=1, description="mini-batch size")
    lr_decay: float = Field(1.0, gt=0, le=1,
                            description="learning-rate factor applied after epoch E//2+1 (1 = constant)")
    clip_loss: bool = Field(False, description="AST clipping-loss schedule on the first 10 epochs")
    gradient_penalty: float = Field(0.0, ge=0, le=1000,
                                    description="weight of the input-gradient penalty (0 = off)")
    dsa: bool = Field(False, description="DSA augmentation of the real images (image inputs only)")

    @classmethod
    def mtt(cls, **overrides: object) -> ExpertConfig:
        """MTT experts: SGD without momentum or weight decay, constant learning rate."""
        return cls(**{"momentum": 0.0, "weight_decay": 0.0, "lr_decay": 1.0, "clip_loss": False,
                      "gradient_penalty": 0.0, **overrides})

    @classmethod
    def ast(cls, **overrides: object) -> ExpertConfig:
        """AST smooth experts: momentum 0.9, weight decay 1e-3, clipping loss, gradient penalty 2."""
        return cls(**{"momentum": 0.9, "weight_decay": 1e-3, "lr_decay": 0.6, "clip_loss": True,
                      "gradient_penalty": 2.0, **overrides})


def clip_loss_factor(epoch: int, enabled: bool = True) -> float:
    """AST clipping-loss factor ``lambda_e``: ``0.5 + 0.05 e`` for ``e < 10``, else 1."""
    if not enabled or epoch >= CLIP_EPOCHS:
        return 1.0
    return 0.5 + 0.05 * epoch


def input_gradient_penalty(logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``mean_i (||d sum_k f_k(x_i) / d x_i||_2 - 1)^2`` (WGAN-GP form used by AST).

    ``inputs`` must require grad and ``logits`` must depend on it; the graph is
    kept so the penalty can be minimised.
    """
    grads = torch.autograd.grad(logits.sum(), inputs, create_graph=True)[0]
    norms = grads.flatten(1).norm(dim=1)
    return ((norms - 1.0) ** 2).mean()


@dataclass
class ExpertTrajectories:
    """Flat parameters of every expert after every epoch.

    Attributes
    ----------
    params : torch.Tensor
        Shape ``(num_experts, epochs + 1, num_params)``; ``params[k, e]`` is
        expert ``k`` after ``e`` epochs (``e = 0`` is its initialisation).
    test_accuracy : list[float]
        Final accuracy of each expert on the evaluation data, when given.
    """

    params: torch.Tensor
    test_accuracy: list[float]

    @property
    def num_experts(self) -> int:
        return int(self.params.shape[0])

    @property
    def epochs(self) -> int:
        return int(self.params.shape[1]) - 1

    def save(self, path: str | Path) -> None:
        """Write to a ``.pt`` file (atomically: temporary name, then rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"params": self.params, "test_accuracy": self.test_accuracy}, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> ExpertTrajectories:
        data = torch.load(path, weights_only=True)
        return cls(params=data["params"], test_accuracy=list(data["test_accuracy"]))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train_expert(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: ExpertConfig,
                 seed: int = 0) -> torch.Tensor:
    """Train ``model`` in place on ``(x, y)``; its flat parameters after every epoch.

    Returns a ``(config.epochs + 1, num_params)`` tensor, row 0 the initialisation.
    """
    flat = FlatParams(model)
    generator = torch.Generator().manual_seed(seed)
    lr = config.lr
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    snapshots = [flat.flatten()]
    decay_after = config.epochs // 2 + 1
    model.train()
    for epoch in range(config.epochs):
        scale = clip_loss_factor(epoch, config.clip_loss)
        order = torch.randperm(len(x), generator=generator)
        for batch in torch.split(order, config.batch_size):
            inputs = x[batch]
            if config.dsa and inputs.ndim == 4:
                inputs = dsa_augment(inputs, int(torch.randint(2**62, (1,), generator=generator)),
                                     siamese=False)
            if config.gradient_penalty > 0:
                inputs = inputs.clone().requires_grad_(True)
            logits = model(inputs)
            loss = F.cross_entropy(logits, y[batch]) * scale
            if config.gradient_penalty > 0:
                loss = loss + config.gradient_penalty * input_gradient_penalty(logits, inputs)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        snapshots.append(flat.flatten())
        if epoch == decay_after and config.lr_decay < 1.0:
            # Both codes rebuild the optimizer here, which also resets momentum.
            lr *= config.lr_decay
            optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum,
                                        weight_decay=config.weight_decay)
    return torch.stack(snapshots)


def train_experts(model_factory: Callable[[int], nn.Module], x: torch.Tensor, y: torch.Tensor,
                  config: ExpertConfig, *, seed: int = 0, x_test: torch.Tensor | None = None,
                  y_test: torch.Tensor | None = None, progress: bool = True) -> ExpertTrajectories:
    """Train ``config.num_experts`` experts from fresh initialisations.

    Parameters
    ----------
    model_factory : callable
        ``model_factory(seed)`` returns a freshly initialised network.
    x, y : torch.Tensor
        Real training inputs and integer labels.
    config : ExpertConfig
        The recipe (``ExpertConfig.mtt()`` or ``ExpertConfig.ast()``).
    seed : int
        Expert ``k`` uses seed ``seed + k`` for its initialisation and batch order.
    x_test, y_test : torch.Tensor, optional
        Held-out data to report each expert's final accuracy on.

    Examples
    --------
    >>> import torch
    >>> from gristmill.trainers.distill_models import build_model
    >>> x, y = torch.randn(40, 4), torch.arange(40) % 2
    >>> t = train_experts(lambda s: build_model("mlp", (4,), 2, width=8, seed=s), x, y,
    ...                   ExpertConfig.mtt(num_experts=2, epochs=3), progress=False)
    >>> tuple(t.params.shape[:2])
    (2, 4)
    """
    runs = []
    accs = []
    for k in tqdm(range(config.num_experts), desc="experts", disable=not progress):
        model = model_factory(seed + k)
        runs.append(train_expert(model, x, y, config, seed=seed + k))
        if x_test is not None and y_test is not None:
            accs.append(accuracy(model, x_test, y_test))
    return ExpertTrajectories(params=torch.stack(runs), test_accuracy=accs)


def mean_epoch_step(trajectories: ExpertTrajectories) -> np.ndarray:
    """Mean ``||theta*_{e+1} - theta*_e||`` per epoch: how smooth the experts are."""
    steps = (trajectories.params[:, 1:] - trajectories.params[:, :-1]).norm(dim=2)
    return steps.mean(0).numpy()
