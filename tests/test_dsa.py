"""Differentiable Siamese Augmentation: shared seeds, hand-checked transforms, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from gristmill.trainers.distill import DistillConfig, distill_dataset
from gristmill.trainers.dsa import FAMILIES, DSAParams, dsa_augment, shift
from gristmill.trainers.experts import ExpertConfig


@pytest.fixture
def images():
    return torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_same_seed_gives_the_same_transform_to_real_and_synthetic_batches(images):
    other = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for seed in range(12):
        a = dsa_augment(images, seed)
        b = dsa_augment(images.clone(), seed)
        assert torch.equal(a, b)
        # Siamese: one draw for the batch, so identical images stay identical ...
        same = dsa_augment(images[:1].expand(4, -1, -1, -1).contiguous(), seed)
        assert torch.allclose(same, same[:1].expand_as(same))
        # ... and a different batch gets the very same transform (here: the same flip/shift/...).
        both = dsa_augment(torch.cat([images, other]), seed)
        assert torch.allclose(both[:6], a)
    outs = [dsa_augment(images, s) for s in range(12)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_per_image_draws_differ_across_the_batch(images):
    batch = images[:1].expand(16, -1, -1, -1).contiguous()
    differ = [not torch.allclose(o, o[:1].expand_as(o))
              for o in (dsa_augment(batch, s, siamese=False) for s in range(8))]
    assert any(differ)


def test_flip_shift_and_cutout_by_hand(images):
    flipped = dsa_augment(images, 0, "flip", params=DSAParams(flip=1.0))
    assert torch.equal(flipped, images.flip(3))
    moved = shift(images, torch.full((6,), 2), torch.full((6,), -1))
    assert torch.equal(moved[:, :, 2:, :7], images[:, :, :6, 1:])
    assert torch.all(moved[:, :, :2, :] == 0) and torch.all(moved[:, :, :, 7] == 0)
    ones = torch.ones(2, 1, 8, 8)
    for seed in range(10):
        cut = dsa_augment(ones, seed, "cutout")
        zeros = int((cut[0] == 0).sum())
        assert 0 < zeros <= 16  # a 4 x 4 hole, clipped at the border
        assert set(torch.unique(cut).tolist()) <= {0.0, 1.0}


def test_zero_strength_scale_and_rotate_are_the_identity(images):
    p = DSAParams(scale=1.0, rotate=0.0)
    for fam in ("scale", "rotate"):
        assert torch.allclose(dsa_augment(images, 5, fam, params=p), images, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_differentiable_in_the_pixels(images, family):
    x = images.clone().requires_grad_(True)
    (dsa_augment(x, 3, family) ** 2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_unknown_family_is_a_config_error():
    with pytest.raises(ValueError, match="unknown families"):
        dsa_augment(torch.zeros(1, 1, 4, 4), 0, "color_blur")
    with pytest.raises(ValueError, match="blur"):
        DistillConfig(dsa=True, dsa_strategy="blur")


def test_distillation_with_dsa_on_images_runs_and_differs_from_without():
    x, y = load_digits(return_X_y=True)
    x, y = x[:200], y[:200]
    common = {"ipc": 1, "iterations": 3, "syn_steps": 4, "expert_epochs": 2, "max_start_epoch": 2,
              "lr_lr": 0.0}
    experts = ExpertConfig.mtt(num_experts=1, epochs=4, dsa=True)
    outs = [distill_dataset(x, y, model="convnet", image_shape=(1, 8, 8), experts=experts,
                            config=DistillConfig.mtt(dsa=dsa, **common), progress=False)
            for dsa in (False, True)]
    assert all(np.isfinite(o.x_syn).all() for o in outs)
    assert not np.allclose(outs[0].x_syn, outs[1].x_syn)
