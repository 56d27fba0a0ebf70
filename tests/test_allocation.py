"""Tests for fedprune.allocation: kept-channel counts per group and nested masks."""

from __future__ import annotations

import numpy as np
import pytest

from fedprune.allocation import SPARSITY_ALLOCATIONS as ALLOCATIONS, allocate, check_sparsity, nested_masks, sensitivity_weights
from fedprune.groups import ChannelGroup, ChannelGroups, groups_for

SIZES = {"conv_a": 7, "conv_b": 16, "conv_c": 33, "conv_d": 64, "conv_e": 100, "conv_f": 128}
SPARSITIES = (0.0, 0.1, 0.3, 0.5, 0.7, 0.85)


def _groups(sizes=SIZES) -> ChannelGroups:
    return ChannelGroups(tuple(ChannelGroup(n, s, (n,), ()) for n, s in sizes.items()))


@pytest.fixture(scope="module")
def setup():
    groups = _groups()
    rng = np.random.default_rng(0)
    # Different score scales per group: global allocation must normalise them.
    scores = {g.name: rng.gamma(2.0, size=g.size) * (10.0 ** i) for i, g in enumerate(groups)}
    sensitivity = {g.name: float(v) for g, v in zip(groups, [0.5, 0.02, 0.2, 0.05, 0.01, 0.1])}
    return groups, scores, sensitivity


def _alloc(setup, sparsity, method, min_channels=1):
    groups, scores, sensitivity = setup
    return allocate(groups, sparsity, method, scores=scores, sensitivity=sensitivity, min_channels=min_channels)


@pytest.mark.parametrize("method", ALLOCATIONS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_meets_target_sparsity(setup, method, sparsity) -> None:
    groups = setup[0]
    counts = _alloc(setup, sparsity, method)
    assert set(counts) == set(groups.names)
    for g in groups:
        assert 1 <= counts[g.name] <= g.size
        assert isinstance(counts[g.name], int)
    kept = sum(counts.values())
    assert abs(kept - (1.0 - sparsity) * groups.total_channels) <= len(groups), (method, sparsity, counts)
    if sparsity == 0.0:
        assert counts == groups.sizes


@pytest.mark.parametrize("method", ALLOCATIONS)
def test_meets_target_on_resnet20_groups(method) -> None:
    groups = groups_for("resnet20")
    rng = np.random.default_rng(1)
    scores = {g.name: rng.random(g.size) for g in groups}
    sens = {g.name: float(rng.random()) for g in groups}
    for s in (0.25, 0.5, 0.75):
        counts = allocate(groups, s, method, scores=scores, sensitivity=sens)
        assert abs(sum(counts.values()) - (1 - s) * groups.total_channels) <= len(groups)


@pytest.mark.parametrize("method", ALLOCATIONS)
@pytest.mark.parametrize("min_channels", [4, 10, 200])
def test_honours_min_channels(setup, method, min_channels) -> None:
    groups = setup[0]
    for sparsity in (0.5, 0.9, 0.99):
        counts = _alloc(setup, sparsity, method, min_channels=min_channels)
        for g in groups:
            assert counts[g.name] >= min(min_channels, g.size), (method, sparsity, g.name)
            assert counts[g.name] <= g.size


@pytest.mark.parametrize("method", ALLOCATIONS)
def test_lower_sparsity_never_keeps_fewer(setup, method) -> None:
    grid = np.round(np.linspace(0.0, 0.95, 39), 4)
    previous = None
    for s in grid:  # increasing sparsity -> non-increasing counts in every group
        counts = _alloc(setup, float(s), method)
        if previous is not None:
            for name, c in counts.items():
                assert c <= previous[name], (method, s, name)
        previous = counts


@pytest.mark.parametrize("method", ALLOCATIONS)
@pytest.mark.parametrize("round_to", [None, 8])
def test_nested_masks_are_nested(setup, method, round_to) -> None:
    groups, scores, sensitivity = setup
    sparsities = [0.5, 0.8, 0.3]  # input order is kept in the output
    masks = nested_masks(groups, scores, sparsities, method=method, sensitivity=sensitivity, round_to=round_to)
    m50, m80, m30 = masks
    for m in masks:
        m.validate(groups)
    assert m80.is_subset_of(m50) and m50.is_subset_of(m30)
    assert m80.channel_sparsity > m50.channel_sparsity > m30.channel_sparsity
    if round_to:
        for m in masks:
            for name, k in m.kept_counts.items():
                assert k % round_to == 0 or k == groups[name].size
    else:
        for m, s in zip(masks, sparsities):
            assert abs(sum(m.kept_counts.values()) - (1 - s) * groups.total_channels) <= len(groups)
    # Kept channels are the best-scoring ones of each group.
    for name in groups.names:
        k = m50.kept_counts[name]
        assert scores[name][m50.kept(name)].min() >= np.sort(scores[name])[::-1][k - 1]


def test_sensitivity_keeps_more_channels_in_sensitive_groups() -> None:
    groups = _groups({"sensitive": 64, "robust": 64, "middle": 64})
    sens = {"sensitive": 1.0, "robust": 0.01, "middle": 0.1}
    for s in (0.2, 0.4, 0.6):
        counts = allocate(groups, s, "sensitivity", sensitivity=sens)
        assert counts["sensitive"] > counts["middle"] > counts["robust"], (s, counts)
    w = sensitivity_weights(sens)
    assert w["robust"] > w["middle"] > w["sensitive"]
    assert np.mean(list(w.values())) == pytest.approx(1.0)
    # Equal sensitivities behave like uniform allocation.
    flat = allocate(groups, 0.5, "sensitivity", sensitivity={k: 0.3 for k in sens})
    assert flat == allocate(groups, 0.5, "uniform")


def test_sensitivity_respects_max_group_sparsity() -> None:
    groups = _groups({"a": 100, "b": 100})
    counts = allocate(groups, 0.5, "sensitivity", sensitivity={"a": 0.0, "b": 10.0}, max_group_sparsity=0.7)
    assert counts["a"] == 30  # clamped at 70 % pruned
    assert counts["b"] == 70


def test_global_allocation_compares_normalised_scores() -> None:
    groups = _groups({"flat": 10, "peaky": 10})
    scores = {"flat": np.full(10, 1000.0), "peaky": np.array([10.0, 10.0] + [0.01] * 8)}
    counts = allocate(groups, 0.5, "global", scores=scores)
    # Raw scales differ by 100x; per-group normalisation keeps the peaky group's strong channels.
    assert sum(counts.values()) == 10
    assert counts["flat"] == 8 and counts["peaky"] == 2


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), "0.5", None])
@pytest.mark.parametrize("method", ALLOCATIONS)
def test_invalid_sparsity_raises(setup, method, bad) -> None:
    with pytest.raises(ValueError, match="sparsity"):
        _alloc(setup, bad, method)


def test_unknown_method_and_missing_inputs_raise(setup) -> None:
    groups, scores, sens = setup
    with pytest.raises(ValueError, match="unknown allocation 'greedy'"):
        allocate(groups, 0.5, "greedy", scores=scores)
    with pytest.raises(ValueError, match="scores"):
        allocate(groups, 0.5, "global")
    with pytest.raises(ValueError, match="sensitivit"):
        allocate(groups, 0.5, "sensitivity")
    partial = dict(sens)
    partial.pop("conv_c")
    with pytest.raises(ValueError, match="conv_c"):
        allocate(groups, 0.5, "sensitivity", sensitivity=partial)
    with pytest.raises(ValueError):
        nested_masks(groups, scores, [0.5, 1.0])
    assert check_sparsity(0) == 0.0
