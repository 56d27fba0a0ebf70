"""Tests for fedprune.importance: every criterion on seed_cnn and resnet20."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedprune.data import make_loader, make_synthetic
from fedprune.groups import discover_groups
from fedprune.importance import CRITERIA, DATA_CRITERIA, compute_importance, get_importance
from fedprune.masks import StructuredMask, apply_soft_mask

MODELS = ("seed_cnn", "resnet20")
BATCH = 16


@pytest.fixture(scope="module")
def loader():
    # 40 images: batches of 16, 16, 8.
    return make_loader(make_synthetic(40, seed=5), BATCH, train=False)


@pytest.fixture(scope="module", params=MODELS)
def model_and_groups(request):
    from fedprune.models import get_model

    torch.manual_seed(0)
    model = get_model(request.param)
    # Non-trivial BN parameters and running stats (bn_gamma must not be all ones).
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
    return model, discover_groups(model)


def test_criteria_registry() -> None:
    assert set(DATA_CRITERIA) <= set(CRITERIA)
    for name in CRITERIA:
        imp = get_importance(name, num_batches=3)
        assert imp.name == name
        assert not imp.needs_data or imp.num_batches == 3  # every data-driven criterion gets pruning.num_batches


def test_the_names_a_config_accepts_are_the_implemented_ones() -> None:
    """fedprune.config lists names without importing torch; each list must match its implementation."""
    from fedprune import config
    from fedprune.aggregation import aggregate_importance
    from fedprune.models import MODEL_NAMES

    assert config.CRITERIA == tuple(CRITERIA)
    assert config.MODELS == MODEL_NAMES
    one = {"g": np.array([1.0, 2.0, 3.0])}
    for method in config.AGGREGATIONS:  # every name has its rule (AGGREGATORS is that tuple)
        assert aggregate_importance([one, one], [1, 1], method)["g"].shape == (3,)


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_scores_shape_dtype_and_samples(model_and_groups, loader, criterion) -> None:
    model, groups = model_and_groups
    was_training = model.training
    result = compute_importance(criterion, model, groups, loader, num_batches=2)
    assert result.criterion == criterion
    assert set(result.scores) == set(groups.names)
    for g in groups:
        s = result[g.name]
        assert isinstance(s, np.ndarray) and s.dtype == np.float64
        assert s.shape == (g.size,)
        assert np.all(np.isfinite(s)) and np.all(s >= 0)
        assert s.max() > 0, (criterion, g.name)
    assert result.num_samples == (2 * BATCH if criterion in DATA_CRITERIA else 0)
    assert model.training == was_training
    assert all(p.grad is None for p in model.parameters())  # no gradients left behind


@pytest.mark.parametrize("criterion", DATA_CRITERIA)
def test_data_criteria_sample_counts_and_loader_required(model_and_groups, loader, criterion) -> None:
    model, groups = model_and_groups
    assert compute_importance(criterion, model, groups, loader, num_batches=1).num_samples == BATCH
    assert compute_importance(criterion, model, groups, loader, num_batches=None).num_samples == 40  # all batches
    assert compute_importance(criterion, model, groups, loader, num_batches=50).num_samples == 40
    with pytest.raises(ValueError, match="needs data"):
        compute_importance(criterion, model, groups, None)
    with pytest.raises(ValueError, match="empty loader"):
        compute_importance(criterion, model, groups, [])
    with pytest.raises(ValueError, match="num_batches"):
        get_importance(criterion, num_batches=0)


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_criteria_are_deterministic(model_and_groups, loader, criterion) -> None:
    model, groups = model_and_groups
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = compute_importance(criterion, model, groups, loader, num_batches=2)
    second = compute_importance(criterion, model, groups, loader, num_batches=2)
    for name in groups.names:
        np.testing.assert_array_equal(first[name], second[name])
    # Scoring does not change the model (BN running stats included).
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_soft_masked_channels_score_zero(model_and_groups, loader, criterion) -> None:
    model, groups = model_and_groups
    rng = np.random.default_rng(7)
    mask = StructuredMask({g.name: rng.random(g.size) < 0.5 for g in groups})
    masked = apply_soft_mask(copy.deepcopy(model), mask, groups)
    result = compute_importance(criterion, masked, groups, loader, num_batches=1)
    for g in groups:
        pruned = mask.pruned(g.name)
        assert pruned.size > 0
        np.testing.assert_array_equal(result[g.name][pruned], 0.0, err_msg=f"{criterion} {g.name}")
        if criterion in ("l1", "l2", "bn_gamma"):
            assert np.all(result[g.name][mask.kept(g.name)] > 0)


def test_magnitude_scores_match_hand_computation(model_and_groups) -> None:
    model, groups = model_and_groups
    l1 = compute_importance("l1", model, groups)
    l2 = compute_importance("l2", model, groups)
    bn = compute_importance("bn_gamma", model, groups)
    for g in groups:
        ws = [model.get_submodule(p).weight.detach().double().reshape(g.size, -1) for p in g.producers]
        np.testing.assert_allclose(l1[g.name], sum(w.abs().sum(1) for w in ws).numpy(), rtol=1e-5)
        np.testing.assert_allclose(l2[g.name], sum(w.pow(2).sum(1).sqrt() for w in ws).numpy(), rtol=1e-5)
        gammas = [model.get_submodule(n).weight.detach().double().abs() for n in g.norms]
        np.testing.assert_allclose(bn[g.name], sum(gammas).numpy(), rtol=1e-5)


def test_get_importance_unknown_names_allowed() -> None:
    with pytest.raises(ValueError) as info:
        get_importance("nope")
    msg = str(info.value)
    assert "'nope'" in msg
    for name in CRITERIA:
        assert f"'{name}'" in msg
    with pytest.raises(ValueError, match="allowed"):
        compute_importance("nope", torch.nn.Linear(1, 1), None)


def test_normalized_scores() -> None:
    from fedprune.importance import ImportanceScores

    s = ImportanceScores({"a": np.array([1.0, 3.0]), "z": np.zeros(3)})
    np.testing.assert_allclose(s.normalized("mean")["a"], [0.5, 1.5])
    np.testing.assert_allclose(s.normalized("max")["a"], [1 / 3, 1.0])
    np.testing.assert_array_equal(s.normalized()["z"], np.ones(3))


def test_groups_know_their_consumers() -> None:
    from fedprune.groups import groups_for

    seed = groups_for("seed_cnn")
    assert [g.consumers for g in seed] == [("features.4",), ("features.8",), ("features.12",), ("classifier.1",)]
    stem = groups_for("resnet20")["conv1"]  # the residual stream of stage 1: every block reads it, and stage 2's shortcut
    assert {"layer1.0.conv1", "layer2.0.conv1", "layer2.0.shortcut.0"} <= set(stem.consumers)


def test_reconstruction_removes_a_duplicate_before_an_independent_channel() -> None:
    from fedprune.importance import greedy_removal_order

    # Channels 0 and 1 are the same signal, 2 an independent one of equal variance (a single-channel
    # score cannot tell them apart). Keeping {one copy, 2} preserves the sum 2a + b best (corr 0.95 vs 0.89),
    # and the last channel kept is the remaining copy (corr 0.89 vs 0.45).
    m = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(greedy_removal_order(m), [1 / 3, 1.0, 2 / 3])
    # A channel that carries nothing scores 0; the others keep their order.
    z = np.zeros((4, 4))
    z[:3, :3] = m
    np.testing.assert_allclose(greedy_removal_order(z), [2 / 4, 1.0, 3 / 4, 0.0])


def test_reconstruction_scores_are_an_order(model_and_groups, loader) -> None:
    model, groups = model_and_groups
    result = compute_importance("reconstruction", model, groups, loader, num_batches=2)
    for g in groups:
        s = result[g.name]
        ranked = s[s > 0]  # 0: channels dead on these images (zero variance at the consumers)
        assert len(np.unique(ranked)) == ranked.size and ranked.size >= g.size // 2
        np.testing.assert_allclose(ranked * g.size, np.round(ranked * g.size))  # places in the order: k / C
        assert s.max() == 1.0
        # Growing keep counts give nested masks (the greedy's sets).
        small = StructuredMask.from_scores({g.name: result[g.name]}, {g.name: g.size // 4})
        large = StructuredMask.from_scores({g.name: result[g.name]}, {g.name: g.size // 2})
        assert np.all(large.keep[g.name][small.keep[g.name]])
