"""Dataset distillation: expert trajectories, trajectory matching and AST's additions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits
from torch import nn

from gristmill.trainers.distill import (
    DistillConfig,
    balanced_loss_weight,
    distill,
    distill_dataset,
    intermediate_targets,
    matching_loss,
    perturb_weights,
    representative_indices,
    train_and_evaluate,
    unroll_student,
)
from gristmill.trainers.distill_models import FlatParams, build_model
from gristmill.trainers.distill_output import synthetic_table
from gristmill.trainers.experts import (
    ExpertConfig,
    ExpertTrajectories,
    clip_loss_factor,
    input_gradient_penalty,
    train_experts,
)

torch.set_num_threads(1)

TINY = {"iterations": 3, "syn_steps": 4, "expert_epochs": 2, "max_start_epoch": 2}


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    keep = np.concatenate([np.flatnonzero(y == c)[:30] for c in range(10)])
    x = (x[keep] - x.mean()) / x.std()
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y[keep])


@pytest.fixture(scope="module")
def experts(digits) -> tuple[ExpertTrajectories, FlatParams]:
    x, y = digits
    factory = lambda s: build_model("mlp", (64,), 10, width=16, depth=1, seed=s)  # noqa: E731
    traj = train_experts(factory, x, y, ExpertConfig.ast(num_experts=2, epochs=5, batch_size=50),
                         progress=False)
    return traj, FlatParams(factory(0))


def test_matching_loss_is_squared_distance_over_expert_distance():
    student = torch.tensor([1.0, 1.0])
    start = torch.tensor([0.0, 0.0])
    target = torch.tensor([2.0, 0.0])
    # ||(1,1)-(2,0)||^2 = 2, ||(0,0)-(2,0)||^2 = 4
    assert matching_loss(student, start, target).item() == pytest.approx(0.5)


def test_balanced_loss_weight_follows_ast_start_epoch_schedule():
    # T+ = 10, h = 5: log_5(t - 5 + 8) from the middle on, 1/log_5(5 - t + 8) before
    assert balanced_loss_weight(5, 10) == pytest.approx(math.log(8, 5))
    assert balanced_loss_weight(9, 10) == pytest.approx(math.log(12, 5))
    assert balanced_loss_weight(0, 10) == pytest.approx(1 / math.log(13, 5))
    assert balanced_loss_weight(0, 10) < 1 < balanced_loss_weight(9, 10)


def test_clip_loss_schedule_ramps_from_half_to_one_over_ten_epochs():
    values = [clip_loss_factor(e) for e in range(12)]
    assert values == pytest.approx([0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1, 1])
    assert clip_loss_factor(0, enabled=False) == 1.0


def test_gradient_penalty_of_a_linear_map_is_hand_computable():
    layer = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 2.0]]))
    x = torch.randn(4, 3, requires_grad=True)
    # d sum_k f_k / dx = W^T 1 = (1, 3, 2) for every sample, norm sqrt(14)
    expected = (math.sqrt(14) - 1) ** 2
    assert input_gradient_penalty(layer(x), x).item() == pytest.approx(expected, rel=1e-6)


def test_intermediate_targets_split_the_student_steps_evenly():
    assert intermediate_targets(20, 2) == {10: 1}
    assert intermediate_targets(21, 3) == {7: 1, 14: 2}
    assert intermediate_targets(20, 1) == {}


def test_representative_init_picks_the_real_sample_nearest_each_kmeans_centre():
    rng = np.random.default_rng(0)
    feats = np.concatenate([rng.normal(0, 1, (40, 2)) + [10 * c, 0] for c in range(2)])
    labels = np.repeat([0, 1], 40)
    idx = representative_indices(feats, labels, ipc=3, seed=0)
    assert len(idx) == 6 and len(set(idx.tolist())) == 6
    for c in range(2):
        members = np.flatnonzero(labels == c)
        centres = KMeans(n_clusters=3, random_state=0, n_init=10).fit(feats[members])
        nearest = {int(members[np.argmin(((feats[members] - ctr) ** 2).sum(1))])
                   for ctr in centres.cluster_centers_}
        assert set(idx[3 * c:3 * c + 3].tolist()) == nearest
        assert all(labels[i] == c for i in idx[3 * c:3 * c + 3])


def test_ast_weight_perturbation_matches_hand_computed_example():
    # One 1x1x2x2 conv kernel, a bias, a linear layer: the AST code's W + a (D/||D||_F) * W
    # on the kernel only, with D the generator's first draw of the kernel's shape.
    model = nn.Sequential(nn.Conv2d(1, 1, 2), nn.Flatten(), nn.Linear(1, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[[[1.0, -2.0], [0.5, 4.0]]]]))
    flat = FlatParams(model)
    params = flat.flatten()
    d = torch.randn((1, 1, 2, 2), generator=torch.Generator().manual_seed(7), dtype=params.dtype)
    w = torch.tensor([1.0, -2.0, 0.5, 4.0])
    expect = w + 0.5 * d.reshape(-1) / d.norm() * w
    moved = perturb_weights(params, flat, 0.5, torch.Generator().manual_seed(7), mode="ast")
    assert torch.allclose(moved[:4], expect.to(params.dtype))
    # by hand: element k moved by 0.5 * w_k * d_k / ||d||
    for k in range(4):
        assert float(moved[k] - params[k]) == pytest.approx(0.5 * float(w[k] * d.reshape(-1)[k] / d.norm()))
    assert torch.equal(moved[4:], params[4:])  # bias and linear layer untouched


def test_ast_weight_perturbation_leaves_an_mlp_unchanged_and_filter_mode_moves_it():
    flat = FlatParams(build_model("mlp", (64,), 10, width=16, depth=1, seed=0))
    params = flat.flatten()
    assert torch.equal(perturb_weights(params, flat, 1.0, torch.Generator().manual_seed(0)), params)
    assert not torch.equal(perturb_weights(params, flat, 0.01, torch.Generator().manual_seed(0), "filter"),
                           params)


def test_filter_weight_perturbation_moves_each_filter_by_the_set_fraction():
    model = build_model("convnet", (1, 8, 8), 10, width=4, depth=1, seed=0)
    flat = FlatParams(model)
    params = flat.flatten()
    moved = perturb_weights(params, flat, 0.05, torch.Generator().manual_seed(1), mode="filter")
    weights = set()
    for where, shape in flat.weight_slices():
        before = params[where].view(shape[0], -1)
        delta = (moved[where] - params[where]).view(shape[0], -1)
        assert torch.allclose(delta.norm(dim=1), 0.05 * before.norm(dim=1), rtol=1e-4)
        weights.update(range(where.start, where.stop))
    others = [i for i in range(flat.size) if i not in weights]
    assert torch.equal(moved[others], params[others])  # biases and norm parameters untouched


def test_expert_trajectories_store_parameters_after_every_epoch(experts, tmp_path):
    traj, flat = experts
    assert tuple(traj.params.shape) == (2, 6, flat.size)
    init = FlatParams(build_model("mlp", (64,), 10, width=16, depth=1, seed=0)).flatten()
    assert torch.equal(traj.params[0, 0], init)
    steps = (traj.params[:, 1:] - traj.params[:, :-1]).norm(dim=2)
    assert (steps > 0).all()
    traj.save(tmp_path / "experts.pt")
    loaded = type(traj).load(tmp_path / "experts.pt")
    assert torch.equal(loaded.params, traj.params)


def test_clipping_loss_shrinks_the_first_expert_epoch(digits):
    x, y = digits
    factory = lambda s: build_model("mlp", (64,), 10, width=16, depth=1, seed=s)  # noqa: E731
    steps = {}
    for clip in (False, True):
        cfg = ExpertConfig.mtt(num_experts=1, epochs=2, clip_loss=clip, batch_size=300)
        p = train_experts(factory, x, y, cfg, progress=False).params[0]
        steps[clip] = (p[1] - p[0]).norm().item()
    # One full batch per epoch and plain SGD: the clipped step is exactly half.
    assert steps[True] == pytest.approx(0.5 * steps[False], rel=1e-5)


def test_learnable_step_size_and_synthetic_data_receive_gradients(digits, experts):
    x, y = digits
    traj, flat = experts
    cfg = DistillConfig.ast(ipc=2, lr_lr=1e-2, **TINY)
    res = distill(x, y, traj, flat, cfg, progress=False)
    assert res.lr != cfg.lr_init
    assert res.lr_history[0] != cfg.lr_init
    start = x[torch.as_tensor(res.init_indices)]
    assert not torch.allclose(res.x_syn, start)
    assert torch.equal(res.y_syn, torch.arange(10).repeat_interleave(2))
    assert len(res.losses) == 3 and all(np.isfinite(res.losses))


def test_intermediate_matching_adds_a_term_to_the_matching_loss(digits, experts):
    x, y = digits
    traj, flat = experts
    base = {"ipc": 1, "lr_lr": 0.0, "weight_perturb": False, **TINY, "iterations": 1}
    off = distill(x, y, traj, flat, DistillConfig.ast(intermediate_matching=False, **base),
                  progress=False)
    on = distill(x, y, traj, flat, DistillConfig.ast(intermediate_matching=True, **base),
                 progress=False)
    assert on.losses[0] > off.losses[0]


def test_synthetic_shard_has_classes_times_ipc_rows():
    x, y = load_digits(return_X_y=True)
    x, y = x[:400], y[:400]
    cfg = DistillConfig.ast(ipc=3, **TINY)
    ex = ExpertConfig.ast(num_experts=1, epochs=4, batch_size=100)
    flat_out = distill_dataset(x, y, experts=ex, config=cfg, width=16, depth=1, progress=False)
    table = synthetic_table(flat_out)
    assert table.num_rows == 30
    assert table.schema.names == ["id", "features", "label"]
    assert str(table.schema.field("features").type) == "list<item: float>"
    assert table.column("label").to_pylist() == [c for c in range(10) for _ in range(3)]
    assert {len(v) for v in table.column("features").to_pylist()} == {64}

    img_out = distill_dataset(x, y.astype(str), model="convnet", image_shape=(1, 8, 8),
                              experts=ex, config=cfg.model_copy(update={"ipc": 1}), width=4,
                              depth=1, progress=False)
    table = synthetic_table(img_out)
    assert table.num_rows == 10 and table.schema.names == ["id", "image", "label"]
    assert np.asarray(table.column("image").to_pylist()).shape == (10, 1, 8, 8)
    assert table.column("label").to_pylist() == [str(c) for c in range(10)]


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="ipc"):
        DistillConfig(ipc=0)
    with pytest.raises(ValueError, match="syn_steps"):
        DistillConfig(syn_steps=1, expert_epochs=3)
    with pytest.raises(ValueError, match="momentum"):
        ExpertConfig(momentum=1.5)


def test_start_epochs_beyond_the_trajectories_are_refused(digits, experts):
    x, y = digits
    traj, flat = experts
    with pytest.raises(ValueError, match="exceeds the 5 epochs"):
        distill(x, y, traj, flat, DistillConfig(max_start_epoch=4, expert_epochs=2),
                progress=False)


def test_distilled_digits_beat_the_real_examples_they_started_from():
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    test, train = order[:540], order[540:]
    cfg = DistillConfig.ast(ipc=1, iterations=60, init="real", max_start_epoch=5, syn_steps=10)
    out = distill_dataset(x[train], y[train], experts=ExpertConfig.ast(num_experts=2, epochs=8),
                          config=cfg, width=64, progress=False)
    norm = out.normalizer
    x_test = torch.from_numpy(norm.transform(x[test].astype(np.float32)))
    y_test = torch.from_numpy(y[test])
    start = x[train][out.result.init_indices].astype(np.float32)

    def accuracy_after_training(xs: np.ndarray) -> float:
        # Same networks, same step size: only the ten training examples differ.
        return np.mean([train_and_evaluate(
            build_model("mlp", (64,), 10, width=64, seed=s), torch.from_numpy(norm.transform(xs)),
            torch.from_numpy(out.y_syn.astype(np.int64)), x_test, y_test, lr=out.lr, epochs=100,
            seed=s) for s in range(2)])

    distilled, real = accuracy_after_training(out.x_syn), accuracy_after_training(start)
    assert distilled > real + 0.15, (distilled, real)


def test_student_momentum_accumulates_gradients_across_steps():
    model = build_model("mlp", (3,), 2, depth=0, seed=0)  # one linear layer
    flat = FlatParams(model)
    start = flat.flatten()
    x = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])
    y = torch.tensor([0, 1])
    batches = [torch.tensor([0]), torch.tensor([1])]

    def grad_at(theta: torch.Tensor, i: int, weight: float = 1.0) -> torch.Tensor:
        theta = theta.detach().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(flat.forward(theta, x[i:i + 1]), y[i:i + 1])
        return torch.autograd.grad(loss * weight, theta)[0]

    path = unroll_student(flat, start, x, y, 0.5, batches, momentum=0.9, loss_weight=1.3)
    g0 = grad_at(start, 0, 1.3)
    theta1 = start - 0.5 * g0
    g1 = grad_at(theta1, 1, 1.3)
    assert torch.allclose(path[1], theta1, atol=1e-6)
    assert torch.allclose(path[2], theta1 - 0.5 * (0.9 * g0 + g1), atol=1e-6)
    plain = unroll_student(flat, start, x, y, 0.5, batches)  # MTT: no momentum, weight 1
    sgd1 = start - 0.5 * grad_at(start, 0)
    assert torch.allclose(plain[2], sgd1 - 0.5 * grad_at(sgd1, 1), atol=1e-6)
