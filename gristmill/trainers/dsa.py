"""Differentiable Siamese Augmentation (DSA) for image batches.

Zhao and Bilen, "Dataset Condensation with Differentiable Siamese
Augmentation" (ICML 2021); the augmentation MTT and AST apply to the
synthetic images in the student's inner loop and to the real images when
training experts. Every transform is differentiable in the pixels, so the
matching loss reaches the synthetic set through it.

Families (the papers' ``color_crop_cutout_flip_scale_rotate``), each with the
parameters of their code (``ParamDiffAug``):

* ``color``: brightness ``x + (b - 1/2) * 1.0``, saturation
  ``(x - mean_c x) * 2 s + mean_c x``, contrast
  ``(x - mean x) * (c + 0.5) + mean x``, with b, s, c ~ U(0, 1);
* ``crop``: shift by up to 12.5% of the side (integer pixels), zero padding;
* ``cutout``: zero a square of half the side at a random centre;
* ``flip``: horizontal flip with probability 1/2;
* ``scale``: x and y scaled by U(1/1.2, 1.2) (``affine_grid`` + bilinear
  ``grid_sample``);
* ``rotate``: rotation by U(-15, 15) degrees.

As in the papers' code (``aug_mode = 'S'``), one family is drawn per call.
*Siamese*: the random choices come from a generator seeded with ``seed``;
``siamese=True`` also shares one draw across the whole batch, so two batches
augmented with the same seed (say, a real and a synthetic one, as in DSA's
gradient matching) get the very same transform. ``siamese=False`` draws per
image (what MTT and AST do in the inner loop, seed -1 in their code).

Example
-------
>>> import torch
>>> x = torch.rand(4, 1, 8, 8)
>>> real, syn = dsa_augment(x, seed=3), dsa_augment(x.clone(), seed=3)
>>> bool(torch.equal(real, syn))
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

STRATEGY = "color_crop_cutout_flip_scale_rotate"
FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass(frozen=True)
class DSAParams:
    """Strength of each transform (the values of the papers' ``ParamDiffAug``)."""

    flip: float = 0.5
    scale: float = 1.2
    rotate: float = 15.0
    crop: float = 0.125
    cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


def _uniform(n: int, gen: torch.Generator, siamese: bool, dtype: torch.dtype) -> torch.Tensor:
    u = torch.rand(1 if siamese else n, generator=gen, dtype=dtype)
    return u.expand(n) if siamese else u


def _randint(low: int, high: int, n: int, gen: torch.Generator, siamese: bool) -> torch.Tensor:
    r = torch.randint(low, high, (1 if siamese else n,), generator=gen)
    return r.expand(n) if siamese else r


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _color(x, gen, siamese, p):
    n = len(x)
    b = _uniform(n, gen, siamese, x.dtype).view(n, 1, 1, 1)
    x = x + (b - 0.5) * p.brightness
    s = _uniform(n, gen, siamese, x.dtype).view(n, 1, 1, 1)
    mean_c = x.mean(dim=1, keepdim=True)
    x = (x - mean_c) * (s * p.saturation) + mean_c
    c = _uniform(n, gen, siamese, x.dtype).view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (c + p.contrast) + mean


def shift(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Move image i by (dx_i, dy_i) whole pixels (rows, columns), filling with zeros."""
    n, _, h, w = x.shape
    rows = torch.arange(h).view(1, h, 1) - dx.view(n, 1, 1)
    cols = torch.arange(w).view(1, 1, w) - dy.view(n, 1, 1)
    inside = ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)).to(x.dtype)
    idx = rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)
    flat = x.reshape(n, x.shape[1], h * w)
    out = torch.gather(flat, 2, idx.reshape(n, 1, h * w).expand(n, x.shape[1], h * w))
    return out.view_as(x) * inside.unsqueeze(1)


def _crop(x, gen, siamese, p):
    n, _, h, w = x.shape
    sx, sy = int(h * p.crop + 0.5), int(w * p.crop + 0.5)
    return shift(x, _randint(-sx, sx + 1, n, gen, siamese), _randint(-sy, sy + 1, n, gen, siamese))


def _cutout(x, gen, siamese, p):
    n, _, h, w = x.shape
    ch, cw = int(h * p.cutout + 0.5), int(w * p.cutout + 0.5)
    cx = _randint(0, h + (1 - ch % 2), n, gen, siamese).view(n, 1, 1)
    cy = _randint(0, w + (1 - cw % 2), n, gen, siamese).view(n, 1, 1)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    hole = ((rows >= cx - ch // 2) & (rows < cx - ch // 2 + ch)
            & (cols >= cy - cw // 2) & (cols < cy - cw // 2 + cw))
    return x * (~hole).to(x.dtype).unsqueeze(1)


def _flip(x, gen, siamese, p):
    n = len(x)
    u = _uniform(n, gen, siamese, x.dtype).view(n, 1, 1, 1)
    return torch.where(u < p.flip, x.flip(3), x)


def _scale(x, gen, siamese, p):
    n = len(x)
    lo = 1.0 / p.scale
    sx = _uniform(n, gen, siamese, x.dtype) * (p.scale - lo) + lo
    sy = _uniform(n, gen, siamese, x.dtype) * (p.scale - lo) + lo
    zero = torch.zeros(n, dtype=x.dtype)
    theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)
    return _affine(x, theta)


def _rotate(x, gen, siamese, p):
    n = len(x)
    a = (_uniform(n, gen, siamese, x.dtype) - 0.5) * 2 * p.rotate / 180 * math.pi
    zero = torch.zeros(n, dtype=x.dtype)
    theta = torch.stack([torch.stack([a.cos(), -a.sin(), zero], 1),
                         torch.stack([a.sin(), a.cos(), zero], 1)], 1)
    return _affine(x, theta)


_FNS = {"color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _scale,
        "rotate": _rotate}


def check_strategy(strategy: str) -> list[str]:
    """The families of ``strategy`` ("a_b_c"); raises ValueError naming an unknown one."""
    families = [f for f in strategy.split("_") if f]
    bad = [f for f in families if f not in _FNS]
    if bad or not families:
        raise ValueError(f"DSA strategy {strategy!r}: unknown families {bad}; use {'_'.join(FAMILIES)}")
    return families


def dsa_augment(x: torch.Tensor, seed: int, strategy: str = STRATEGY, siamese: bool = True,
                params: DSAParams | None = None) -> torch.Tensor:
    """One DSA transform of the image batch ``x`` (N, C, H, W), drawn from ``seed``.

    Parameters
    ----------
    x : torch.Tensor
        Images; gradients flow through to ``x``.
    seed : int
        Seeds every random choice (the family and its parameters): the same
        seed gives the same transform.
    strategy : str
        Families joined by ``_``; one is drawn per call.
    siamese : bool
        One draw for the whole batch (True) or one per image (False).
    params : DSAParams, optional
        Strengths; default the papers'.
    """
    if x.ndim != 4:
        raise ValueError(f"DSA needs image batches (N, C, H, W), got shape {tuple(x.shape)}")
    families = check_strategy(strategy)
    gen = torch.Generator().manual_seed(int(seed))
    family = families[int(torch.randint(len(families), (1,), generator=gen))]
    return _FNS[family](x, gen, siamese, params or DSAParams())
