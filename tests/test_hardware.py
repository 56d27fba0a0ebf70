"""Profile budgets end to end: config validation, budget allocations, reports, federated and centralized runs."""

from __future__ import annotations

import numpy as np
import pytest

from fedprune.allocation import InfeasibleBudgetError, budget_masks, check_feasible, total_channels
from fedprune.cli import main as cli_main
from fedprune.config import ConfigError, load_config
from fedprune.cost import HardwareModel, device_factor
from fedprune.federated import simulate
from fedprune.groups import discover_groups
from fedprune.masks import StructuredMask, extract_submodel
from fedprune.models import get_model

from conftest import TINY

DENSE_MACS = 58_919_424  # seed_cnn, batch 1
DENSE_PARAMS = 2_080_010

#: Analytic budgets only (no latency table needed): edge_gpu 60% of dense MACs,
#: mobile_cpu 30%, microcontroller 1 MB flash at int8, 320 KB SRAM and 8% MACs.
BUDGETS = [
    f"profiles.edge_gpu.budgets={{macs={int(0.6 * DENSE_MACS)}}}",
    f"profiles.mobile_cpu.budgets={{macs={int(0.3 * DENSE_MACS)}}}",
    f"profiles.microcontroller.budgets={{flash_bytes_int8=1000000, peak_sram_bytes_int8=327680, macs={int(0.08 * DENSE_MACS)}}}",
]


@pytest.fixture(scope="module")
def seed_hw():
    model = get_model("seed_cnn").eval()
    groups = discover_groups(model)
    hw = HardwareModel("seed_cnn", None, model, groups, threads=1)
    rng = np.random.default_rng(3)
    scores = {g.name: rng.gamma(2.0, size=g.size) for g in groups}
    return model, groups, hw, scores


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("override, fragments", [
    ("profiles.mobile_cpu.budgets={latency_ms=3}", ["profiles.mobile_cpu.budgets.latency_ms", "latency_ms_b1"]),
    ("profiles.microcontroller.budgets={macs=-5}", ["profiles.microcontroller.budgets.macs", "-5", "positive"]),
    ("profiles.microcontroller.budgets={macs='many'}", ["'many'", "positive"]),
    ("pruning.budget_profile='tpu'", ["pruning.budget_profile", "'tpu'", "microcontroller"]),
    ("pruning.latency_margin=0.7", ["pruning.latency_margin", "0.7"]),
    ("pruning.allocation='knapsack'", ["pruning.allocation", "'knapsack'", "budget_uniform"]),
    ("pruning.budget_objective='max'", ["pruning.budget_objective", "'max'", "'log', 'sum'"]),
    ("pruning.budget_sensitivity=5", ["pruning.budget_sensitivity", "5"]),
])
def test_bad_budget_configs(override, fragments) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for f in fragments:
        assert f in str(err.value)


def test_budget_allocation_needs_budgets_for_every_profile_in_use() -> None:
    with pytest.raises(ConfigError, match=r"needs budgets for every profile in use; profiles without budgets: \['edge_gpu'\]"):
        load_config(None, ["pruning.allocation='budget'", "profiles.edge_gpu.budgets={}"])
    # a profile with no clients needs none
    load_config(None, ["pruning.allocation='budget'", "profiles.edge_gpu.budgets={}",
                       "federated.proportions={edge_gpu=0.0, mobile_cpu=0.5, microcontroller=0.5}"])


def test_sensitivity_weighted_budget_allocation_measures_sensitivity(seed_hw) -> None:
    """pruning.budget_sensitivity > 0 weights the budget allocation by layer sensitivity: clients must measure it."""
    from fedprune.task import budget_group_weights, profile_budget_masks

    assert load_config(None, BUDGETS + ["pruning.allocation='budget'"]).federated.sensitivity is False  # off by default
    cfg = load_config(None, BUDGETS + ["pruning.allocation='budget'", "pruning.budget_sensitivity=1"])
    assert cfg.pruning.budget_weighted and cfg.federated.sensitivity is True
    with pytest.raises(ConfigError, match=r"'pruning.budget_sensitivity' = 1 applies to pruning.allocation = 'budget' only, not 'budget_uniform'"):
        load_config(None, BUDGETS + ["pruning.allocation='budget_uniform'", "pruning.budget_sensitivity=1"])
    with pytest.raises(ValueError, match=r"pruning.budget_sensitivity = 1 weights .* none was measured"):
        budget_group_weights(cfg, None)
    _, groups, hw, scores = seed_hw
    sens = {g.name: float(i + 1) for i, g in enumerate(groups)}
    weights = budget_group_weights(cfg, sens)
    assert weights == pytest.approx({g.name: (i + 1) / 2.5 for i, g in enumerate(groups)})
    plain = load_config(None, BUDGETS + ["pruning.allocation='budget'"])
    assert budget_group_weights(plain, sens) is None
    (weighted,) = profile_budget_masks(cfg, hw, scores, ["mobile_cpu"], group_weights=weights)
    (unweighted,) = profile_budget_masks(plain, hw, scores, ["mobile_cpu"])
    assert weighted.kept_counts != unweighted.kept_counts
    first, last = groups.names[0], groups.names[-1]  # the least / most sensitive group
    assert weighted.kept_counts[last] >= unweighted.kept_counts[last] and weighted.kept_counts[first] <= unweighted.kept_counts[first]


def test_default_profiles_carry_budgets_and_overrides_replace_them() -> None:
    cfg = load_config(None)
    assert cfg.profiles["microcontroller"].budgets == {"flash_bytes_int8": 1_000_000, "peak_sram_bytes_int8": 327_680, "macs": 6_000_000}
    assert set(cfg.profiles["mobile_cpu"].budgets) == {"latency_ms_b1"}
    assert set(cfg.profiles["edge_gpu"].budgets) == {"latency_ms_b64"}
    cfg = load_config(None, ["profiles.mobile_cpu.budgets={macs=1000}"])
    assert cfg.profiles["mobile_cpu"].budgets == {"macs": 1000}


# -------------------------------------------------------------- allocation
def test_device_factor() -> None:
    assert device_factor("latency_ms_b1", 0.5) == 2.0
    assert device_factor("latency_ms_b64", 4.0) == 0.25
    assert device_factor("macs", 0.05) == 1.0


@pytest.mark.parametrize("method", ["budget", "budget_uniform", "budget_fill", "constant_cost"])
def test_budget_masks_are_nested(seed_hw, method) -> None:
    _, groups, hw, scores = seed_hw
    constraints = [hw.constraints({"macs": f * DENSE_MACS}) for f in (0.6, 0.3, 0.08)]
    masks = budget_masks(method, groups, scores, constraints)
    assert masks[2].is_subset_of(masks[1]) and masks[1].is_subset_of(masks[0])
    macs = [hw.analytic.macs(m) for m in masks]
    if method != "constant_cost":  # the baseline ignores the real cost, the others meet it
        assert all(m <= f * DENSE_MACS for m, f in zip(macs, (0.6, 0.3, 0.08)))


def test_budget_uniform_is_the_smallest_uniform_sparsity(seed_hw) -> None:
    _, groups, hw, scores = seed_hw
    (mask,) = budget_masks("budget_uniform", groups, scores, [hw.constraints({"macs": 0.25 * DENSE_MACS})])
    kept = mask.kept_counts
    assert hw.analytic.macs(kept) <= 0.25 * DENSE_MACS
    fractions = [kept[g.name] / g.size for g in groups]
    assert max(fractions) - min(fractions) < 0.02  # uniform
    one_more = {g.name: min(g.size, kept[g.name] + max(1, g.size // 100)) for g in groups}
    assert hw.analytic.macs(one_more) > 0.25 * DENSE_MACS * 0.97  # not much slack left


def test_budget_fill_is_never_narrower_than_uniform_and_spends_the_slack(seed_hw) -> None:
    """budget_fill starts from budget_uniform's widths (a floor in every group) and adds channels back while
    every constraint of the profile holds: more channels, still within budget, still nested."""
    _, groups, hw, scores = seed_hw
    constraints = [hw.constraints({"macs": 0.6 * DENSE_MACS}),
                   [*hw.constraints({"flash_bytes_int8": 1_000_000, "peak_sram_bytes_int8": 327_680}), *hw.constraints({"macs": 0.08 * DENSE_MACS})]]
    uniform = budget_masks("budget_uniform", groups, scores, constraints, round_to=8)
    filled = budget_masks("budget_fill", groups, scores, constraints, round_to=8)
    for u, f, cs in zip(uniform, filled, constraints):
        assert u.is_subset_of(f)  # the same ranking: wider groups keep the uniform channels
        assert all(fn(f.kept_counts) <= limit for fn, limit in cs)
        assert all(k % 8 == 0 or k == groups[n].size for n, k in f.kept_counts.items())
        # no single further step of any group fits the budget
        for g in groups:
            more = dict(f.kept_counts, **{g.name: min(g.size, f.kept_counts[g.name] + 8)})
            assert more == f.kept_counts or any(fn(more) > limit for fn, limit in cs)
    assert total_channels(filled[1].kept_counts) > total_channels(uniform[1].kept_counts)
    assert filled[1].is_subset_of(filled[0])


def test_constant_cost_keeps_the_channel_fraction_of_the_budget(seed_hw) -> None:
    _, groups, hw, scores = seed_hw
    (mask,) = budget_masks("constant_cost", groups, scores, [hw.constraints({"macs": 0.5 * DENSE_MACS})])
    assert total_channels(mask.kept_counts) == int(0.5 * groups.total_channels)
    assert hw.analytic.macs(mask) < 0.5 * DENSE_MACS  # cost is super-linear in channels: it over-prunes


def test_infeasible_budget_names_the_smallest_cost(seed_hw) -> None:
    _, groups, hw, _ = seed_hw
    with pytest.raises(InfeasibleBudgetError, match=r"macs: smallest achievable cost \d+ > budget 10"):
        check_feasible(groups, [hw.constraints({"macs": 10})])


def test_latency_constraints_apply_device_factor_and_margin(seed_hw) -> None:
    _, groups, hw, _ = seed_hw

    class FakeLUT:
        def predict_ms(self, kept):
            return total_channels(kept) / 100.0  # host ms

    hw._luts[1] = FakeLUT()
    ((fn, limit),) = hw.constraints({"latency_ms_b1": 4.0}, compute_speed=0.5)
    assert limit == pytest.approx(4.0 * (1 - hw.latency_margin))
    assert fn(groups.sizes) == pytest.approx(2 * groups.total_channels / 100.0)
    ((_, stage_limit),) = hw.constraints({"latency_ms_b1": 4.0}, compute_speed=0.5, scale=0.5)
    assert limit < stage_limit < fn(groups.sizes)
    del hw._luts[1]


def patch_relative_timing(monkeypatch, timed) -> None:
    """Time every network by ``timed(model, batch_size, threads, repeats)`` (host ms) in the refit's relative measurement."""
    from fedprune import cost

    monkeypatch.setattr(cost, "relative_host_latency", lambda m, ref, b, t=1, r=20, passes=1: timed(m, b, t, r) / timed(ref, b, t, r))


def test_refit_latency_closes_the_loop_on_measurement(seed_hw, monkeypatch) -> None:
    """The table says the sub-network fits; timing it says 30% slower: the next allocation aims lower and fits."""
    from fedprune.allocation import nested_budget_masks

    model, groups, hw, scores = seed_hw

    class FakeLUT:
        def predict_ms(self, kept):
            return total_channels(kept) / 100.0  # host ms

    def timed(sub, batch_size, threads, repeats):  # the "real" host latency: 1.3x the table for sub-networks
        channels = total_channels({g.name: g.size for g in discover_groups(sub)})
        return (1.0 if channels == groups.total_channels else 1.3) * channels / 100.0

    patch_relative_timing(monkeypatch, timed)
    monkeypatch.setitem(hw._luts, 1, FakeLUT())
    monkeypatch.setattr(hw, "latency_corrections", {})
    budgets, speed = {"latency_ms_b1": 5.0}, 0.5  # device ms = 2 x host ms

    def allocate():
        return nested_budget_masks(groups, scores, [hw.constraints(budgets, speed)], round_to=8)[0]

    def measured(mask):
        return 2 * timed(extract_submodel(model, mask, groups), 1, 1, 1)

    first = allocate()
    assert hw.predict("latency_ms_b1", first, speed) <= 5.0 * (1 - hw.latency_margin) < measured(first)
    assert hw.refit_latency(budgets, first, speed) == "slow"
    assert hw.latency_corrections[("latency_ms_b1", 5.0, speed)] == pytest.approx(1.3)
    second = allocate()
    assert second.is_subset_of(first) and 5.0 * (1 - 2 * hw.latency_margin) <= measured(second) <= 5.0 * (1 - hw.latency_margin) + 1e-9
    assert hw.refit_latency(budgets, second, speed) == "ok"  # fits as measured: nothing changes
    assert hw.refit_latency({"macs": 1.0}, second, speed) == "ok"  # analytic budgets are never timed


def test_refit_latency_uses_an_unused_budget(seed_hw, monkeypatch) -> None:
    """The table is 2x too pessimistic for sub-networks (right for the dense model): the refit lets the next
    allocation keep more channels, within the band."""
    from fedprune.allocation import nested_budget_masks

    model, groups, hw, scores = seed_hw

    class FakeLUT:
        def predict_ms(self, kept):
            return total_channels(kept) / 100.0

    def timed(sub, batch_size, threads, repeats):
        channels = total_channels({g.name: g.size for g in discover_groups(sub)})
        return (1.0 if channels == groups.total_channels else 0.5) * channels / 100.0

    patch_relative_timing(monkeypatch, timed)
    monkeypatch.setitem(hw._luts, 1, FakeLUT())
    monkeypatch.setattr(hw, "latency_corrections", {})
    budgets = {"latency_ms_b1": 4.0}
    first = nested_budget_masks(groups, scores, [hw.constraints(budgets)], round_to=8)[0]
    assert hw.refit_latency(budgets, first) == "fast"
    second = nested_budget_masks(groups, scores, [hw.constraints(budgets)], round_to=8)[0]
    assert first.is_subset_of(second) and second.channel_sparsity < first.channel_sparsity
    assert hw.refit_latency(budgets, second) == "ok"


@pytest.mark.parametrize("speed_now", [0.6, 1.0, 1.4])
def test_refit_latency_ignores_the_host_speed_of_the_moment(seed_hw, monkeypatch, speed_now) -> None:
    """The table is right, but the host runs every network 0.6x (or 1.4x) as long as usual while the refit
    times it: the dense model, timed in the same passes, shows it, so the allocation is left as it is (keeping
    more channels after a fast moment would miss the budget once the host is back to its usual speed)."""
    from fedprune.allocation import nested_budget_masks

    model, groups, hw, scores = seed_hw

    class FakeLUT:
        def predict_ms(self, kept):
            return total_channels(kept) / 100.0

    def timed(sub, batch_size, threads, repeats):
        return speed_now * total_channels({g.name: g.size for g in discover_groups(sub)}) / 100.0

    patch_relative_timing(monkeypatch, timed)
    monkeypatch.setitem(hw._luts, 1, FakeLUT())
    monkeypatch.setattr(hw, "latency_corrections", {})
    budgets = {"latency_ms_b1": 4.0}
    first = nested_budget_masks(groups, scores, [hw.constraints(budgets)], round_to=8)[0]
    assert hw.refit_latency(budgets, first) == "ok" and hw.latency_corrections == {}


def test_a_refit_that_finds_the_budget_infeasible_keeps_the_last_allocation(seed_hw, monkeypatch) -> None:
    """One timing far too slow corrects the table so much that even the smallest network looks over budget:
    the refits stop with the last allocation instead of failing a run that was found feasible."""
    from fedprune.task import profile_budget_masks

    model, groups, hw, scores = seed_hw

    class FakeLUT:
        def predict_ms(self, kept):
            return total_channels(kept) / 100.0

    dense_ms = groups.total_channels / 100.0  # the dense model as the table has it
    patch_relative_timing(monkeypatch, lambda m, *_: dense_ms if m is model else 50.0)  # 50 host ms
    monkeypatch.setitem(hw._luts, 1, FakeLUT())
    monkeypatch.setattr(hw, "latency_corrections", {})
    for allocation in ("budget", "budget_uniform", "budget_fill"):
        cfg = load_config(None, [f"pruning.allocation='{allocation}'", "profiles.mobile_cpu.budgets={latency_ms_b1=4.0}",
                                 "profiles.edge_gpu.budgets={macs=1e12}", "profiles.microcontroller.budgets={macs=1e12}"])
        hw.latency_corrections.clear()
        (mask,) = profile_budget_masks(cfg, hw, scores, ["mobile_cpu"])  # no InfeasibleBudgetError
        assert hw.predict("latency_ms_b1", mask, 0.5) <= 4.0  # the allocation made before the timing, uncorrected
        assert hw.latency_corrections  # the timing was taken into account
    # corrections left by an earlier call that rule out every network are dropped, not an error
    stale = load_config(None, ["pruning.allocation='budget'", "profiles.mobile_cpu.budgets={latency_ms_b1=4.0}"])
    hw.latency_corrections.clear()
    hw.latency_corrections[("latency_ms_b1", 4.0, 0.5)] = 1e6
    patch_relative_timing(monkeypatch, lambda m, *_: dense_ms if m is model else 1.75)  # 3.5 device ms: within the band
    (mask,) = profile_budget_masks(stale, hw, scores, ["mobile_cpu"])
    assert hw.predict("latency_ms_b1", mask, 0.5) <= 4.0 and not hw.latency_corrections
    hw.latency_corrections.clear()
    with pytest.raises(InfeasibleBudgetError, match="smallest achievable cost"):  # infeasible before any timing: still an error
        profile_budget_masks(load_config(None, ["pruning.allocation='budget'", "profiles.mobile_cpu.budgets={latency_ms_b1=0.001}"]),
                             hw, scores, ["mobile_cpu"])


def test_report_measures_the_extracted_model(seed_hw) -> None:
    model, groups, hw, scores = seed_hw
    budgets = {"macs": 0.3 * DENSE_MACS, "flash_bytes_int8": 400_000, "peak_sram_bytes_int8": 327_680, "params": 10}
    (mask,) = budget_masks("budget", groups, scores, [hw.constraints({k: v for k, v in budgets.items() if k != "params"})])
    sub = extract_submodel(model, mask, groups)
    rep = hw.report(budgets, mask, sub)
    for key in ("macs", "flash_bytes_int8", "peak_sram_bytes_int8"):
        assert rep[key]["measured"] == rep[key]["predicted"]
        assert rep[key]["ok"] is True
    assert rep["params"]["ok"] is False and rep["params"]["measured"] == rep["flash_bytes_int8"]["measured"]
    lat = hw.report({"latency_ms_b1": 5.0}, mask, sub, compute_speed=0.5, host_latency_ms={1: 2.0}, predict_latency=False)
    assert lat["latency_ms_b1"] == {**lat["latency_ms_b1"], "measured": 4.0, "ok": True, "predicted": None}
    assert "measured_relative" not in lat["latency_ms_b1"]  # no table, so nothing to measure against


def test_report_measures_latency_relative_to_the_dense_model(seed_hw, monkeypatch) -> None:
    """A slow moment (the host 1.5x slower) makes the timing miss the budget; relative to the dense model timed
    alongside, the width meets it as the table has the host (the dense model at the table's prediction)."""
    model, groups, hw, scores = seed_hw

    class FakeLUT:
        def predict_ms(self, kept):
            return total_channels(kept) / 100.0

    monkeypatch.setitem(hw._luts, 1, FakeLUT())
    patch_relative_timing(monkeypatch, lambda m, *_: 1.5 * total_channels({g.name: g.size for g in discover_groups(m)}) / 100.0)
    mask = StructuredMask.from_scores(scores, {g.name: g.size // 2 for g in groups})
    sub = extract_submodel(model, mask, groups)
    table_ms = 2 * total_channels(mask.kept_counts) / 100.0  # device ms at compute_speed 0.5
    rep = hw.report({"latency_ms_b1": 1.2 * table_ms}, mask, sub, compute_speed=0.5, host_latency_ms={1: 1.5 * table_ms / 2})
    b = rep["latency_ms_b1"]
    assert b["measured"] == pytest.approx(1.5 * table_ms) and b["ok"] is False
    assert b["measured_relative"] == pytest.approx(table_ms) and b["ok_relative"] is True


# ---------------------------------------------------------------- runs
@pytest.mark.parametrize("power", [0, 1])
def test_federated_budget_run_meets_every_budget(tmp_path, power) -> None:
    cfg = load_config(None, TINY + BUDGETS + ["pruning.allocation='budget'", f"pruning.budget_sensitivity={power}"])
    res = simulate(cfg, tmp_path, engine="inprocess")
    assert res["consensus"]["nested"] is True
    assert res["consensus"]["allocation"] == "budget"
    sens, weights = res["consensus"]["layer_sensitivity"], res["consensus"]["budget_group_weights"]
    if power:  # clients measured layer sensitivity; the allocation weighted each group's importance by it
        assert set(sens) == set(weights) == set(res["consensus"]["kept_channels"]["edge_gpu"])
        assert all(w > 0 for w in weights.values())
    else:
        assert sens is None and weights is None
    for name, entry in res["profiles"].items():
        assert entry["budgets_ok"] is True, (name, entry["budgets"])
        for b in entry["budgets"].values():
            assert b["measured"] <= b["limit"]
    mcu = res["profiles"]["microcontroller"]["budgets"]
    assert set(mcu) == {"flash_bytes_int8", "peak_sram_bytes_int8", "macs"}
    lines = (tmp_path / "budgets.csv").read_text().splitlines()
    assert lines[0] == "profile,budget,limit,predicted,measured,ok,unit" and len(lines) == 1 + 5


@pytest.mark.parametrize("method", ["budget", "budget_uniform", "budget_fill"])
def test_progressive_federated_budget_run_allocates_inside_what_is_left(tmp_path, method) -> None:
    """Progressive pruning with budgets: the later stage allocates on the channels still held (its masks inside
    them), and the final masks meet every budget."""
    cfg = load_config(None, TINY + BUDGETS + [f"pruning.allocation='{method}'", "federated.finetune_rounds=2", "federated.repeat_every=1"])
    res = simulate(cfg, tmp_path, engine="inprocess")
    first, last = res["consensus_history"]
    assert first["scored_channel_sparsity"] == 0.0 < last["scored_channel_sparsity"]
    for name, counts in last["kept_channels"].items():
        assert all(counts[g] <= first["kept_channels"]["edge_gpu"][g] for g in counts)  # inside the stage-1 union
    assert last["nested"] and all(e["budgets_ok"] is True for e in res["profiles"].values())


def test_uniform_run_still_reports_budgets(tmp_path) -> None:
    cfg = load_config(None, TINY + BUDGETS + ["profiles.edge_gpu.sparsity=0.0"])
    res = simulate(cfg, tmp_path, engine="inprocess")
    assert res["profiles"]["edge_gpu"]["budgets"]["macs"]["ok"] is False  # dense edge_gpu misses 60% MACs
    assert res["profiles"]["edge_gpu"]["budgets_ok"] is False


def test_infeasible_budget_fails_before_training(tmp_path, capsys) -> None:
    args = ["simulate", "--engine", "inprocess", "--out", str(tmp_path / "run"), "--set",
            *TINY, *BUDGETS, "pruning.allocation='budget'", "profiles.microcontroller.budgets={macs=1000}"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "macs (profile microcontroller): smallest achievable cost" in err[0] and "budget 1000" in err[0]
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("power", [0, 1])
def test_centralized_budget_prune(tmp_path, power) -> None:
    from fedprune.centralized import prune_experiment, train_dense

    cfg = load_config(None, ["data.dataset='synthetic'", "data.synthetic_train=200", "data.synthetic_test=64", "train.epochs=1",
                             "pruning.finetune_epochs=1", "pruning.num_batches=1", "eval.latency=false", "train.threads=1",
                             "pruning.allocation='budget'", "pruning.budget_profile='microcontroller'", "pruning.schedule='progressive'",
                             "pruning.stages=2", f"pruning.budget_sensitivity={power}", BUDGETS[2]])
    res = prune_experiment(cfg, train_dense(cfg))["pruned"]
    assert res["budget_profile"] == "microcontroller"
    assert all(b["ok"] for b in res["budgets"].values())
    assert res["stages"][0]["channel_sparsity"] < res["stages"][1]["channel_sparsity"]
    with pytest.raises(ConfigError, match="needs pruning.budget_profile"):
        cfg.pruning.budget_profile = ""
        prune_experiment(cfg, train_dense(cfg))
