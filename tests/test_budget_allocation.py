"""Tests for budget-constrained allocation in fedprune.allocation (with fedprune.cost models)."""

from __future__ import annotations

import numpy as np
import pytest

from fedprune.allocation import (
    InfeasibleBudgetError,
    allocate,
    budget_allocate,
    budget_masks,
    constant_cost_allocate,
    importance_weights,
    nested_budget_masks,
)
from fedprune.cost import AnalyticCostModel, LatencyLUT, LatencyCalibration, LayerTable, budget_constraints, evaluate_budgets, measure_peak_activation_bytes
from fedprune.groups import discover_groups
from fedprune.masks import StructuredMask, extract_submodel
from fedprune.metrics import count_macs, count_params
from fedprune.models import get_model


def _setup(name: str, **kw):
    model = get_model(name, **kw).eval()
    groups = discover_groups(model)
    rng = np.random.default_rng(7)
    # Different score scales per group: allocation must normalise them.
    scores = {g.name: rng.gamma(2.0, size=g.size) * 10.0 ** (i % 4) for i, g in enumerate(groups)}
    return model, groups, AnalyticCostModel(model, groups), scores


@pytest.fixture(scope="module")
def seed():
    return _setup("seed_cnn")


@pytest.fixture(scope="module")
def resnet():
    return _setup("resnet20")


def _metrics(analytic: AnalyticCostModel) -> dict:
    return {
        "macs": analytic.macs,
        "flash_int8": lambda k: analytic.param_bytes(k, dtype_bytes=1),
        "peak_int8": analytic.peak_activation_cost_fn(1),
    }


def _fake_lut(analytic: AnalyticCostModel, ms_per_mac: float, batch: int) -> LatencyLUT:
    """A deterministic 'latency' table: each layer's MACs x ms_per_mac on a 5-point grid."""
    tables = {}
    for name, dims in analytic.layers.items():
        if not dims.prunable:
            continue
        points = tuple(tuple(sorted({max(1, round(f * analytic.groups[g].size)) for f in (0.125, 0.25, 0.5, 0.75, 1.0)})) for g in dims.axes)
        ms = np.zeros([len(p) for p in points])
        for idx in np.ndindex(*ms.shape):
            kept = {**analytic.dense, **{g: points[a][i] for a, (g, i) in enumerate(zip(dims.axes, idx))}}
            ms[idx] = dims.macs(kept) * ms_per_mac
        tables[name] = LayerTable(name, dims.axes, points, ms)
    return LatencyLUT({"batch_size": batch}, tables, LatencyCalibration(1.0, 0.05 * batch), dense_ms=0.0)


def _check_counts(groups, counts, min_channels=1, round_to=None) -> None:
    assert set(counts) == set(groups.names)
    for g in groups:
        c = counts[g.name]
        assert isinstance(c, int) and min(min_channels, g.size) <= c <= g.size
        if round_to:
            assert c % round_to == 0 or c == g.size


# -------------------------------------------------------------- feasibility
@pytest.mark.parametrize("metric", ["macs", "flash_int8", "peak_int8"])
@pytest.mark.parametrize("fraction", [0.7, 0.3])
def test_budget_met_on_extracted_model(seed, metric, fraction) -> None:
    model, groups, analytic, scores = seed
    cost_fn = _metrics(analytic)[metric]
    budget = fraction * cost_fn(groups.sizes)
    counts = budget_allocate(groups, scores, cost_fn, budget)
    _check_counts(groups, counts)
    assert cost_fn(counts) <= budget
    sub = extract_submodel(model, StructuredMask.from_scores(scores, counts), groups)
    measured = {"macs": count_macs(sub), "flash_int8": count_params(sub), "peak_int8": measure_peak_activation_bytes(sub, 1)}[metric]
    assert measured == cost_fn(counts) <= budget
    # Greedy stops as soon as the budget is met: not far below it.
    assert cost_fn(counts) > 0.8 * budget


def test_dense_budget_keeps_everything(seed) -> None:
    _, groups, analytic, scores = seed
    assert budget_allocate(groups, scores, analytic.macs, analytic.macs(groups.sizes)) == groups.sizes


def test_prefers_unimportant_channels(seed) -> None:
    """A group whose channels score ~0 is emptied before any other loses a channel."""
    _, groups, analytic, scores = seed
    scores = {**scores, "features.8": np.full(groups["features.8"].size, 1e-9)}
    scores["features.8"][0] = 1.0  # group mean > 0; the other channels are worthless
    budget = analytic.macs({**groups.sizes, "features.8": 1})
    counts = budget_allocate(groups, scores, analytic.macs, budget)
    assert counts["features.8"] == 1 and all(counts[n] == s for n, s in groups.sizes.items() if n != "features.8")


# ------------------------------------------------------------- monotonicity
@pytest.mark.parametrize("metric", ["macs", "flash_int8", "peak_int8"])
def test_looser_budget_never_keeps_fewer(resnet, metric) -> None:
    _, groups, analytic, scores = resnet
    cost_fn = _metrics(analytic)[metric]
    dense = cost_fn(groups.sizes)
    previous = None
    for fraction in (0.9, 0.7, 0.5, 0.35, 0.25):  # loosest first
        counts = budget_allocate(groups, scores, cost_fn, fraction * dense)
        if previous is not None:
            assert all(previous[n] >= counts[n] for n in groups.names), (metric, fraction)
        previous = counts


@pytest.mark.parametrize("method", ["budget_uniform", "constant_cost"])
def test_looser_budgets_never_keep_fewer_with_several_budgets(resnet, method) -> None:
    """With flash and MACs budgets together, loosening either never narrows any group (budget_masks's docstring says
    which allocations promise this)."""
    _, groups, analytic, scores = resnet
    dense = groups.sizes
    flash, macs = analytic.param_bytes(dense, 1), analytic.macs(dense)
    grid = [(f, m) for m in (0.3, 0.45, 0.6) for f in np.linspace(0.3, 0.9, 7)]
    counts = {(f, m): budget_masks(method, groups, scores, [budget_constraints({"flash_bytes_int8": f * flash, "macs": m * macs}, analytic)],
                                   round_to=8)[0].kept_counts for f, m in grid}
    for (f, m), kept in counts.items():
        for (f2, m2), looser in counts.items():
            if f2 >= f and m2 >= m:
                assert all(looser[n] >= kept[n] for n in groups.names), (method, (f, m), (f2, m2))


def test_uniform_widths_reach_the_smallest_network_of_wide_groups() -> None:
    """A budget equal to the smallest network's cost is feasible for budget_uniform even with groups of 1,792
    channels (a bisection that stopped at sparsity 0.999 kept 2 of them and called it infeasible)."""
    model, groups, analytic, scores = _setup("mobilenetv2", width_mult=1.4)
    assert max(g.size for g in groups) > 1500
    smallest = {g.name: 1 for g in groups}
    for method in ("budget_uniform", "budget_fill", "budget"):
        mask = budget_masks(method, groups, scores, [[(analytic.macs, analytic.macs(smallest))]])[0]
        assert analytic.macs(mask.kept_counts) <= analytic.macs(smallest), method


# ------------------------------------------------------------- nested masks
def test_nested_masks_mixed_metrics(resnet) -> None:
    model, groups, analytic, scores = resnet
    luts = {1: _fake_lut(analytic, 1e-6, 1), 64: _fake_lut(analytic, 2e-5, 64)}
    dense = groups.sizes
    profiles = {
        "edge_gpu": {"latency_ms_b64": 0.8 * luts[64].predict_ms(dense)},
        "mobile_cpu": {"latency_ms_b1": 0.5 * luts[1].predict_ms(dense), "params": 0.8 * analytic.params(dense)},
        "microcontroller": {"flash_bytes_int8": 0.3 * analytic.param_bytes(dense, 1), "peak_sram_bytes_int8": 0.6 * analytic.peak_activation_bytes(dense, 1)},
    }
    constraints = [budget_constraints(b, analytic, luts) for b in profiles.values()]
    masks = nested_budget_masks(groups, scores, constraints)
    assert len(masks) == 3
    for mask, budgets in zip(masks, profiles.values()):
        mask.validate(groups)
        report = evaluate_budgets(budgets, mask, analytic, luts)
        assert all(r["ok"] for r in report.values()), report
    assert masks[1].is_subset_of(masks[0]) and masks[2].is_subset_of(masks[1])
    assert masks[0] != masks[1] != masks[2]
    # Analytic budgets hold on the extracted microcontroller model too.
    sub = extract_submodel(model, masks[2], groups)
    assert count_params(sub) <= profiles["microcontroller"]["flash_bytes_int8"]
    assert measure_peak_activation_bytes(sub, 1) <= profiles["microcontroller"]["peak_sram_bytes_int8"]


def test_nested_masks_already_met_profile_repeats_previous(seed) -> None:
    _, groups, analytic, scores = seed
    dense_macs = analytic.macs(groups.sizes)
    masks = nested_budget_masks(
        groups,
        scores,
        [(analytic.macs, 0.5 * dense_macs), (analytic.macs, 0.9 * dense_macs), [(analytic.macs, 0.3 * dense_macs)]],
    )
    assert masks[1] == masks[0] and masks[2].is_subset_of(masks[1]) and masks[2] != masks[1]
    # The first mask is the single-budget allocation.
    assert masks[0].kept_counts == budget_allocate(groups, scores, analytic.macs, 0.5 * dense_macs)


def test_nested_masks_validate_constraints(seed) -> None:
    _, groups, analytic, scores = seed
    with pytest.raises(TypeError, match="cost_fn, budget"):
        nested_budget_masks(groups, scores, [[(analytic.macs,)]])
    with pytest.raises(ValueError, match="at least one"):
        nested_budget_masks(groups, scores, [[]])


# ------------------------------------------------------ min_channels, round_to
def test_min_channels_and_round_to(seed) -> None:
    model, groups, analytic, scores = seed
    budget = 0.05 * analytic.macs(groups.sizes)
    counts = budget_allocate(groups, scores, analytic.macs, budget, min_channels=12, round_to=8)
    _check_counts(groups, counts, min_channels=16, round_to=8)  # 12 rounded up to a multiple of 8
    assert analytic.macs(counts) <= budget
    masks = nested_budget_masks(groups, scores, [(analytic.macs, 0.5 * analytic.macs(groups.sizes)), (analytic.macs, budget)], min_channels=12, round_to=8)
    for mask in masks:
        _check_counts(groups, mask.kept_counts, min_channels=16, round_to=8)
    assert masks[1].is_subset_of(masks[0])


def test_max_group_sparsity(seed) -> None:
    _, groups, analytic, scores = seed
    budget = 0.2 * analytic.macs(groups.sizes)
    counts = budget_allocate(groups, scores, analytic.macs, budget, max_group_sparsity=0.75)
    assert all(counts[g.name] >= g.size // 4 for g in groups) and analytic.macs(counts) <= budget


# ------------------------------------------------------------- objectives
def test_log_objective_spreads_pruning_over_layers(seed) -> None:
    """Equal scores: 'sum' thins the layers with the dearest channels to almost nothing; 'log' thins every layer."""
    _, groups, analytic, _ = seed
    ones = {g.name: np.ones(g.size) for g in groups}
    budget = 0.2 * analytic.macs(groups.sizes)
    thinnest = {}
    for objective in ("sum", "log"):
        counts = budget_allocate(groups, ones, analytic.macs, budget, round_to=8, objective=objective)
        _check_counts(groups, counts, round_to=8)
        assert analytic.macs(counts) <= budget
        thinnest[objective] = min(counts[g.name] / g.size for g in groups)
    assert thinnest["log"] > 2 * thinnest["sum"]


@pytest.mark.parametrize("objective", ["sum", "log"])
def test_objectives_keep_budget_and_nesting(resnet, objective) -> None:
    _, groups, analytic, scores = resnet
    dense = analytic.macs(groups.sizes)
    masks = nested_budget_masks(groups, scores, [(analytic.macs, f * dense) for f in (0.7, 0.4, 0.2)], objective=objective)
    for f, mask in zip((0.7, 0.4, 0.2), masks):
        assert analytic.macs(mask.kept_counts) <= f * dense
    assert masks[1].is_subset_of(masks[0]) and masks[2].is_subset_of(masks[1])


def test_importance_weights_from_sensitivity() -> None:
    sens = {"a": 3.0, "b": 1.0, "c": 0.0, "d": -0.5}  # mean of the floored values: 1
    assert importance_weights(sens) == pytest.approx({"a": 3.0, "b": 1.0, "c": 0.05, "d": 0.05})
    assert importance_weights(sens, power=0.5) == pytest.approx({"a": 3.0 ** 0.5, "b": 1.0, "c": 0.05, "d": 0.05})
    assert importance_weights(sens, power=0.0) == {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}
    assert importance_weights({"a": 0.0, "b": 0.0}) == {"a": 1.0, "b": 1.0}
    with pytest.raises(ValueError, match=r"finite.*'a': nan"):
        importance_weights({"a": float("nan"), "b": 1.0})
    with pytest.raises(ValueError, match=r"power must be a number in \[0, 4\], got -1"):
        importance_weights(sens, power=-1)
    with pytest.raises(ValueError, match=r"floor must be a number in \(0, 1\], got 0"):
        importance_weights(sens, floor=0)


@pytest.mark.parametrize("objective", ["sum", "log"])
def test_group_weights_shift_pruning(seed, objective) -> None:
    """Equal weights change nothing; a heavily weighted group keeps more; the budget still holds."""
    _, groups, analytic, scores = seed
    budget = 0.4 * analytic.macs(groups.sizes)
    plain = budget_allocate(groups, scores, analytic.macs, budget, round_to=8, objective=objective)
    same = budget_allocate(groups, scores, analytic.macs, budget, round_to=8, objective=objective, group_weights={g.name: 2.5 for g in groups})
    assert same == plain
    pruned = [g.name for g in groups if plain[g.name] < g.size]
    heavy = pruned[0]
    weighted = budget_allocate(groups, scores, analytic.macs, budget, round_to=8, objective=objective,
                               group_weights={g.name: 20.0 if g.name == heavy else 1.0 for g in groups})
    _check_counts(groups, weighted, round_to=8)
    assert analytic.macs(weighted) <= budget
    assert weighted[heavy] > plain[heavy]


def test_group_weights_keep_masks_nested(resnet) -> None:
    _, groups, analytic, scores = resnet
    dense = analytic.macs(groups.sizes)
    rng = np.random.default_rng(3)
    weights = importance_weights({g.name: float(rng.gamma(1.0)) for g in groups})
    masks = nested_budget_masks(groups, scores, [(analytic.macs, f * dense) for f in (0.7, 0.4, 0.2)], group_weights=weights)
    for f, mask in zip((0.7, 0.4, 0.2), masks):
        assert analytic.macs(mask.kept_counts) <= f * dense
    assert masks[1].is_subset_of(masks[0]) and masks[2].is_subset_of(masks[1])


@pytest.mark.parametrize("change, message", [
    ({"features.4": None, "features.8": None, "features.12": None}, r"missing \['features.4', 'features.8', 'features.12'\], unknown \[\]"),
    ({"conv9": 1.0}, r"missing \[\], unknown \['conv9'\]"),
    ({"features.0": -1.0}, r"finite numbers > 0; got \{'features.0': -1.0\}"),
    ({"features.0": True}, r"finite numbers > 0; got \{'features.0': True\}"),
])
def test_bad_group_weights(seed, change, message) -> None:
    _, groups, analytic, scores = seed
    weights = {**{g.name: np.float32(1.5) for g in groups}, **change}  # numpy numbers are fine
    weights = {k: v for k, v in weights.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        budget_allocate(groups, scores, analytic.macs, analytic.macs(groups.sizes), group_weights=weights)


def test_group_weights_only_for_greedy_budget(seed) -> None:
    from fedprune.allocation import budget_masks

    _, groups, analytic, scores = seed
    with pytest.raises(ValueError, match=r"group weights apply to budget allocation 'budget' only, not 'budget_uniform'"):
        budget_masks("budget_uniform", groups, scores, [[(analytic.macs, analytic.macs(groups.sizes))]], group_weights={g.name: 1.0 for g in groups})


def test_unknown_objective(seed) -> None:
    _, groups, analytic, scores = seed
    with pytest.raises(ValueError, match=r"unknown budget objective 'max'; allowed: \['log', 'sum'\]"):
        budget_allocate(groups, scores, analytic.macs, analytic.macs(groups.sizes), objective="max")


# ----------------------------------------------------------------- errors
def test_infeasible_budget_message(seed) -> None:
    _, groups, analytic, scores = seed
    smallest = analytic.macs({n: 1 for n in groups.names})
    with pytest.raises(InfeasibleBudgetError) as err:
        budget_allocate(groups, scores, analytic.macs, smallest - 1)
    assert isinstance(err.value, ValueError)
    assert str(smallest) in str(err.value) and str(smallest - 1) in str(err.value)
    # With min_channels the smallest network is larger.
    smallest8 = analytic.macs({n: 8 for n in groups.names})
    with pytest.raises(InfeasibleBudgetError, match=f"smallest achievable cost {smallest8} "):
        budget_allocate(groups, scores, analytic.macs, smallest8 - 1, min_channels=8)
    assert analytic.macs(budget_allocate(groups, scores, analytic.macs, smallest8, min_channels=8)) == smallest8


def test_unknown_budget_key(seed) -> None:
    _, groups, analytic, scores = seed
    with pytest.raises(ValueError, match="unknown budget key 'flash_kb'.*flash_bytes_int8"):
        budget_constraints({"flash_kb": 100}, analytic)


# ------------------------------------------------------------ constant cost
def test_constant_cost_matches_global_allocation(resnet) -> None:
    _, groups, _, scores = resnet
    for keep in (400, 224, 100):
        counts = constant_cost_allocate(groups, scores, keep)
        assert sum(counts.values()) == keep
        assert counts == allocate(groups, 1 - keep / groups.total_channels, "global", scores=scores)
    counts = constant_cost_allocate(groups, scores, 200, min_channels=4, round_to=4)
    _check_counts(groups, counts, min_channels=4, round_to=4)
    assert sum(counts.values()) <= 200
    with pytest.raises(InfeasibleBudgetError, match="smallest achievable cost 48 "):
        constant_cost_allocate(groups, scores, 47, min_channels=4)


# ------------------------------------------------------------------ speed
def test_mobilenetv2_budgets_met() -> None:
    """A deep network with many groups (depthwise coupling): both cost types are met. (Speed: not a test.)"""
    model, groups, analytic, scores = _setup("mobilenetv2", width_mult=0.5)
    dense = groups.sizes
    counts = budget_allocate(groups, scores, analytic.macs, 0.3 * analytic.macs(dense))
    peak = analytic.peak_activation_cost_fn(1)
    counts_peak = budget_allocate(groups, scores, peak, 0.3 * peak(dense))
    _check_counts(groups, counts)
    _check_counts(groups, counts_peak)
    assert analytic.macs(counts) <= 0.3 * analytic.macs(dense) and peak(counts_peak) <= 0.3 * peak(dense)
