"""Small networks for dataset distillation, and their flat-parameter view.

Trajectory matching (Cazenavette et al., 2022) stores an expert's parameters
as one flat vector per epoch and unrolls a student as a chain of flat vectors
``theta_{i+1} = theta_i - alpha * g_i``. ``FlatParams`` maps such a vector back
onto a module's named parameters so that ``torch.func.functional_call`` runs
the network with it, keeping the graph from the synthetic data through every
student step.

Two architectures, after the MTT/AST code's ``MLP`` and ``ConvNet``, sized for
a CPU: an MLP for feature vectors and a ConvNet (conv 3x3, instance norm,
ReLU, 2x2 average pooling per block; instance norm as ``GroupNorm`` with one
group per channel, as in the papers' default ``instancenorm``) for small
images such as scikit-learn's 8x8 digits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call

MODEL_KINDS = ("mlp", "convnet")


class MLP(nn.Module):
    """Fully connected ReLU network on flattened input.

    Parameters
    ----------
    in_features : int
        Input size (an image is flattened first).
    num_classes : int
        Number of output logits.
    width : int
        Hidden units per layer.
    depth : int
        Number of hidden layers.
    """

    def __init__(self, in_features: int, num_classes: int, width: int = 128, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size = in_features
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.ReLU()]
            size = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x.flatten(1)))


class ConvNet(nn.Module):
    """The MTT ConvNet: ``depth`` blocks of conv3x3 - instance norm - ReLU - avgpool2.

    Parameters
    ----------
    image_shape : (channels, height, width)
        Input image shape; height and width must stay >= 1 after ``depth`` poolings.
    num_classes : int
        Number of output logits.
    width : int
        Channels of every conv layer.
    depth : int
        Number of blocks.
    """

    def __init__(self, image_shape: Sequence[int], num_classes: int, width: int = 32,
                 depth: int = 2) -> None:
        super().__init__()
        channels, height, wide = (int(v) for v in image_shape)
        if height >> depth < 1 or wide >> depth < 1:
            raise ValueError(f"depth={depth} pools a {height}x{wide} image below 1x1; "
                             f"use depth <= {min(height, wide).bit_length() - 1}")
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, 3, padding=1),
                       nn.GroupNorm(width, width, affine=True), nn.ReLU(), nn.AvgPool2d(2)]
            channels = width
            height, wide = height // 2, wide // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * height * wide, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def build_model(kind: str, input_shape: Sequence[int], num_classes: int, *, width: int | None = None,
                depth: int = 2, seed: int | None = None) -> nn.Module:
    """A freshly initialised network for inputs of ``input_shape`` (without batch dim).

    ``kind`` is ``"mlp"`` (any shape, flattened) or ``"convnet"`` (``(C, H, W)``).
    ``seed`` fixes the initialisation.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"model must be one of {MODEL_KINDS}, got {kind!r}")
    if seed is not None:
        torch.manual_seed(seed)
    if kind == "mlp":
        in_features = 1
        for v in input_shape:
            in_features *= int(v)
        return MLP(in_features, num_classes, width=width or 128, depth=depth)
    if len(input_shape) != 3:
        raise ValueError(f"model 'convnet' needs image input (C, H, W), got shape {tuple(input_shape)}")
    return ConvNet(input_shape, num_classes, width=width or 32, depth=depth)


class FlatParams:
    """One flat vector <-> the named parameters of ``module`` (in ``named_parameters`` order).

    Parameters
    ----------
    module : nn.Module
        The network whose architecture the vectors parametrize; its own
        parameter values are not used by ``forward``.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        named = list(module.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.size = sum(self.numels)

    def flatten(self, module: nn.Module | None = None) -> torch.Tensor:
        """The current parameters of ``module`` (default: the wrapped one) as one detached vector."""
        module = module or self.module
        return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat`` shaped like each named parameter."""
        if flat.shape != (self.size,):
            raise ValueError(f"flat parameters have shape {tuple(flat.shape)}, expected ({self.size},)")
        return {name: chunk.view(shape) for name, chunk, shape in
                zip(self.names, torch.split(flat, self.numels), self.shapes, strict=True)}

    def load(self, flat: torch.Tensor, module: nn.Module | None = None) -> None:
        """Copy ``flat`` into the parameters of ``module`` (default: the wrapped one)."""
        module = module or self.module
        with torch.no_grad():
            for p, v in zip(module.parameters(), self.unflatten(flat).values(), strict=True):
                p.copy_(v)

    def forward(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits of the network with parameters ``flat``; differentiable in both."""
        return functional_call(self.module, self.unflatten(flat), (x,))

    def weight_slices(self) -> list[tuple[slice, tuple[int, ...]]]:
        """(slice into the flat vector, shape) of every weight matrix or kernel (ndim >= 2)."""
        out = []
        start = 0
        for shape, n in zip(self.shapes, self.numels, strict=True):
            if len(shape) >= 2:
                out.append((slice(start, start + n), shape))
            start += n
        return out

