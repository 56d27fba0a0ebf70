"""Tests for fedprune.cost: analytic costs, latency lookup tables and budget specs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedprune.cost import (
    BUDGET_KEYS,
    DEFAULT_LUT_GRID,
    AnalyticCostModel,
    CostSpec,
    LatencyLUT,
    LayerTable,
    LatencyCalibration,
    calibration_widths,
    budget_constraints,
    evaluate_budgets,
    layer_channels,
    lut_cache_dir,
    measure_peak_activation_bytes,
    parse_budgets,
)
from fedprune.groups import discover_groups
from fedprune.masks import StructuredMask, extract_submodel
from fedprune.metrics import count_macs, count_params
from fedprune.models import get_model

MODEL_KWARGS = {"seed_cnn": {}, "resnet20": {}, "mobilenetv2": {"width_mult": 0.5}}


@pytest.fixture(scope="module")
def built():
    """``{model name: (model, groups, analytic)}`` for the three architectures."""
    out = {}
    for name, kw in MODEL_KWARGS.items():
        model = get_model(name, **kw).eval()
        groups = discover_groups(model)
        out[name] = (model, groups, AnalyticCostModel(model, groups))
    return out


def _random_mask(groups, seed: int) -> StructuredMask:
    rng = np.random.default_rng(seed)
    keep = {}
    for g in groups:
        vec = np.zeros(g.size, dtype=bool)
        vec[rng.choice(g.size, size=int(rng.integers(1, g.size + 1)), replace=False)] = True
        keep[g.name] = vec
    return StructuredMask(keep)


# ------------------------------------------------------------------ layers
def test_layer_channels_seed_cnn(built) -> None:
    model, groups, _ = built["seed_cnn"]
    dims = layer_channels(model, groups)
    assert list(dims) == ["features.0", "features.4", "features.8", "features.12", "classifier.1", "classifier.4"]
    assert (dims["features.0"].in_group, dims["features.0"].out_group) == (None, "features.0")
    assert (dims["features.4"].in_group, dims["features.4"].out_group) == ("features.0", "features.4")
    fc = dims["classifier.1"]
    assert (fc.in_group, fc.out_group, fc.in_mult, fc.kind) == ("features.12", None, 4, "linear")
    assert not dims["classifier.4"].prunable
    assert dims["features.0"].out_hw == 32 * 32 and dims["features.12"].out_hw == 4 * 4
    assert dims["features.4"].kernel_elems == 9 and dims["features.4"].in_shape == (64, 16, 16)


def test_layer_channels_residual_and_depthwise(built) -> None:
    model, groups, _ = built["resnet20"]
    dims = layer_channels(model, groups)
    # Stage-1 convs that write the residual stream all belong to the stem's group.
    assert dims["layer1.0.conv2"].out_group == "conv1" and dims["layer1.2.conv2"].out_group == "conv1"
    assert dims["layer2.0.shortcut.0"].in_group == "conv1"
    assert dims["fc"].in_group == "layer3.0.conv2" and dims["fc"].out_group is None
    model, groups, _ = built["mobilenetv2"]
    dw = [d for d in layer_channels(model, groups).values() if d.depthwise]
    assert dw and all(d.in_group == d.out_group is not None and d.axes == (d.out_group,) for d in dw)


# ---------------------------------------------------------------- analytic
@pytest.mark.parametrize("name", list(MODEL_KWARGS))
def test_analytic_matches_extracted_model(built, name) -> None:
    model, groups, analytic = built[name]
    assert analytic.macs(groups.sizes) == count_macs(model)
    assert analytic.params(groups.sizes) == count_params(model)
    assert analytic.peak_activation_bytes(groups.sizes, 4) == measure_peak_activation_bytes(model, 4)
    for seed in range(2):
        mask = _random_mask(groups, seed)
        sub = extract_submodel(model, mask, groups)
        assert analytic.macs(mask) == count_macs(sub)
        assert analytic.params(mask) == count_params(sub)
        assert analytic.param_bytes(mask) == 4 * count_params(sub)
        assert analytic.param_bytes(mask.kept_counts, dtype_bytes=1) == count_params(sub)
        assert analytic.peak_activation_bytes(mask) == measure_peak_activation_bytes(sub, dtype_bytes=1)


def test_peak_activation_by_hand(built) -> None:
    model, groups, analytic = built["seed_cnn"]
    # Largest pair: features.1 (BN) on the 64x32x32 map, input + output.
    assert measure_peak_activation_bytes(model, 1) == 2 * 64 * 32 * 32
    kept = {**groups.sizes, "features.0": 16}
    # Candidates: conv0 (3x32x32 + 16x32x32), BN/ReLU on 16x32x32, conv1 (16x16x16 + 128x16x16),
    # BN/ReLU on 128x16x16 (the largest: 65536).
    expected = max(3 * 1024 + 16 * 1024, 2 * 16 * 1024, 16 * 256 + 128 * 256, 2 * 128 * 256)
    assert expected == 65536 and analytic.peak_activation_bytes(kept) == expected
    assert analytic.activation_footprints_bytes(kept, 2)[0] == 2 * (3 * 1024 + 16 * 1024)


def test_analytic_rejects_missing_groups(built) -> None:
    _, groups, analytic = built["seed_cnn"]
    with pytest.raises(KeyError, match="features.12"):
        analytic.macs({n: 1 for n in groups.names[:-1]})


# ----------------------------------------------------------- latency table
def _table(points_a=(8, 16, 32), points_b=(4, 8)) -> LayerTable:
    # ms(a, b) = 1 + 0.1 a + 0.2 b + 0.01 a b is bilinear: interpolation reproduces it exactly.
    ms = np.array([[1 + 0.1 * a + 0.2 * b + 0.01 * a * b for b in points_b] for a in points_a])
    return LayerTable("conv", ("ga", "gb"), (tuple(points_a), tuple(points_b)), ms)


def test_lut_interpolation_exact_at_grid_points_and_bilinear() -> None:
    table = _table()
    for i, a in enumerate(table.points[0]):
        for j, b in enumerate(table.points[1]):
            assert table.predict_ms({"ga": a, "gb": b}) == pytest.approx(table.ms[i, j], abs=1e-12)
    for a, b in [(12, 5), (20, 7), (9, 6)]:
        assert table.predict_ms({"ga": a, "gb": b}) == pytest.approx(1 + 0.1 * a + 0.2 * b + 0.01 * a * b)
    # Outside the measured range: clamped to the nearest grid value.
    assert table.predict_ms({"ga": 1, "gb": 1}) == pytest.approx(table.ms[0, 0])
    assert table.predict_ms({"ga": 64, "gb": 8}) == pytest.approx(table.ms[-1, -1])


def test_lut_interpolation_between_neighbours_and_monotone() -> None:
    rng = np.random.default_rng(3)
    points = (2, 4, 8, 16, 24, 32)
    ms = np.cumsum(rng.random(len(points)))  # increasing, non-linear
    table = LayerTable("dw", ("g",), (points,), ms)
    values = [table.predict_ms({"g": k}) for k in range(2, 33)]
    assert all(np.diff(values) >= 0)
    for (lo, hi), (v_lo, v_hi) in zip(zip(points, points[1:]), zip(ms, ms[1:])):
        for k in range(lo, hi + 1):
            assert v_lo - 1e-12 <= table.predict_ms({"g": k}) <= v_hi + 1e-12


def test_lut_predict_sums_layers_and_rest() -> None:
    t1, t2 = _table(), LayerTable("fc", ("gb",), ((4, 8),), np.array([0.5, 1.0]))
    lut = LatencyLUT({"batch_size": 1}, {"conv": t1, "fc": t2}, LatencyCalibration(0.8, 0.25, 0.01, 10, {"ga": 1}), dense_ms=0.0)
    kept = {"ga": 16, "gb": 6}
    rest = 0.25 + 0.01 * (10 + 16)
    assert lut.predict_ms(kept) == pytest.approx(0.8 * (t1.predict_ms(kept) + 0.75) + rest)
    again = LatencyLUT.from_json(json.loads(json.dumps(lut.to_json())))
    assert again.predict_ms(kept) == pytest.approx(lut.predict_ms(kept))
    assert LatencyLUT({}, {"fc": t2}, 0.5, 1.0).predict_ms({"gb": 8}) == pytest.approx(1.5)  # a constant rest


def test_latency_calibration_fit() -> None:
    elements = (100, {"g": 10})  # elements = 100 + 10 k
    truth = LatencyCalibration(0.9, 0.1, 0.001, *elements)
    layers = {4: 0.2, 10: 0.5, 20: 1.1, 40: 2.3}  # kept -> summed layer ms
    points = [({"g": k}, ms, truth.predict_ms(ms, {"g": k})) for k, ms in layers.items()]
    fit = LatencyCalibration.fit(elements, points)
    assert (fit.layer_scale, fit.fixed_ms, fit.ms_per_element) == pytest.approx((0.9, 0.1, 0.001))
    assert fit.predict_ms(0.8, {"g": 15}) == pytest.approx(truth.predict_ms(0.8, {"g": 15}))
    # Latency that falls as the layers grow cannot be fitted with non-negative terms: the
    # element and constant terms drop out, the layer term stays (never a negative term).
    noisy = LatencyCalibration.fit(elements, [({"g": 40}, 2.0, 1.0), ({"g": 10}, 0.5, 2.0)])
    assert noisy.layer_scale > 0 and noisy.ms_per_element == 0.0 and noisy.fixed_ms == 0.0
    with pytest.raises(ValueError, match="positive measured"):
        LatencyCalibration.fit(elements, [({"g": 40}, 2.0, 0.0)])


def test_calibration_widths_cover_the_range() -> None:
    groups = discover_groups(get_model("seed_cnn"))
    widths = calibration_widths(groups)
    assert widths["dense"] == groups.sizes and len(widths) == 8
    assert calibration_widths(groups) == widths  # seeded
    for kept in widths.values():
        assert all(1 <= kept[g.name] <= g.size for g in groups)
    assert all(k % 8 == 0 for n, w in widths.items() if n.startswith("random") for k in w.values())


class _FakeMeasure:
    """Stands in for LatencyLUT.measure: counts calls, returns a tiny table."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model, groups=None, batch_size=1, threads=1, grid=(), repeats=1, warmup=1, key=None, calibrate=True):
        self.calls += 1
        table = LayerTable("features.0", ("features.0",), ((8, 64),), np.array([0.1, 0.4]))
        return LatencyLUT(key, {"features.0": table}, LatencyCalibration(1.0, 0.5), dense_ms=0.9)


def test_lut_cache_reuse_and_rebuild(tmp_path, monkeypatch) -> None:
    fake = _FakeMeasure()
    monkeypatch.setattr(LatencyLUT, "measure", fake)
    args = dict(model_kwargs={}, batch_size=1, threads=1, grid=(0.125, 1.0), cache_dir=tmp_path)
    first = LatencyLUT.build("seed_cnn", **args)
    files = list(tmp_path.glob("*.json"))
    assert fake.calls == 1 and len(files) == 1 and not first.from_cache
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file
    second = LatencyLUT.build("seed_cnn", **args)
    assert fake.calls == 1 and second.from_cache
    assert second.key == first.key and second.predict_ms({"features.0": 36}) == pytest.approx(first.predict_ms({"features.0": 36}))
    # A different key (batch size) is a different table.
    LatencyLUT.build("seed_cnn", **{**args, "batch_size": 64})
    assert fake.calls == 2 and len(list(tmp_path.glob("*.json"))) == 2
    # A cached file whose stored key differs (e.g. copied from another host) is rebuilt.
    data = json.loads(files[0].read_text())
    data["key"]["host"] = "elsewhere"
    files[0].write_text(json.dumps(data))
    rebuilt = LatencyLUT.build("seed_cnn", **args)
    assert fake.calls == 3 and not rebuilt.from_cache
    assert json.loads(files[0].read_text())["key"] == rebuilt.key
    # Unreadable cache: rebuilt too.
    files[0].write_text("{not json")
    LatencyLUT.build("seed_cnn", **args)
    assert fake.calls == 4


def test_building_and_timing_leave_the_global_rng_alone(tmp_path, monkeypatch) -> None:
    """A seeded run draws the same stream after a latency table is built (cache miss or hit) or a model is
    timed: whether the cache was warm, or how often a budget refit timed a sub-network, cannot change its numbers."""
    from fedprune.metrics import measure_latency_ms
    from fedprune.models import get_model

    model = get_model("seed_cnn").train()
    measure = lambda: LatencyLUT.measure(model, grid=(1.0,), repeats=1, warmup=0, calibrate=False)  # noqa: E731
    torch.manual_seed(5)
    measure()
    assert torch.equal(torch.rand(4), torch.manual_seed(5) and torch.rand(4)) and model.training  # mode restored too
    monkeypatch.setattr(LatencyLUT, "measure", _FakeMeasure())
    args = dict(model_kwargs={}, batch_size=1, threads=1, grid=(0.125, 1.0), cache_dir=tmp_path)
    for step in (lambda: LatencyLUT.build("seed_cnn", **args), lambda: LatencyLUT.build("seed_cnn", **args),
                 lambda: measure_latency_ms(model, repeats=2, warmup=1)):
        torch.manual_seed(5)
        step()
        assert torch.equal(torch.rand(4), torch.manual_seed(5) and torch.rand(4))


def test_lut_cache_dir_env(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDPRUNE_CACHE_DIR", str(tmp_path))
    assert lut_cache_dir() == tmp_path / "lut"
    assert lut_cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("FEDPRUNE_CACHE_DIR")
    assert lut_cache_dir().parts[-3:] == (".cache", "fedprune", "lut")


def test_lut_predictions_are_consistent_seed_cnn(tmp_path) -> None:
    """A real (small) table: positive, calibrated terms, and a narrower network is predicted faster.
    Accuracy against measurements is a benchmark (simulation/bench_hardware.py), not a test:
    timings on a shared machine are noisy."""
    lut = LatencyLUT.build("seed_cnn", {}, batch_size=1, threads=1, grid=(0.25, 0.5, 1.0), repeats=5, warmup=2, cache_dir=tmp_path)
    model = get_model("seed_cnn")
    groups = discover_groups(model)
    assert set(lut.tables) == {"features.0", "features.4", "features.8", "features.12", "classifier.1"}
    cal = lut.calibration
    assert min(cal.layer_scale, cal.fixed_ms, cal.ms_per_element) >= 0 and lut.dense_ms > 0
    assert lut.predict_ms(groups.sizes) > 0
    scores = {g.name: np.random.default_rng(0).random(g.size) for g in groups}
    half = StructuredMask.from_scores(scores, {n: s // 2 for n, s in groups.sizes.items()})
    quarter = StructuredMask.from_scores(scores, {n: s // 4 for n, s in groups.sizes.items()})
    assert 0 < lut.predict_ms(quarter) < lut.dense_ms and 0 < lut.predict_ms(half) < lut.dense_ms
    assert DEFAULT_LUT_GRID == (0.125, 0.25, 0.5, 0.75, 1.0)


# ------------------------------------------------------------ budget specs
def _fake_luts() -> dict[int, LatencyLUT]:
    table = LayerTable("features.4", ("features.4",), ((16, 128),), np.array([1.0, 8.0]))
    return {b: LatencyLUT({"batch_size": b}, {"features.4": table}, LatencyCalibration(1.0, 0.5 * b), 0.0) for b in (1, 64)}


def test_cost_spec_keys_and_validation() -> None:
    assert set(BUDGET_KEYS) == {"flash_bytes_int8", "peak_sram_bytes_int8", "macs", "params", "latency_ms_b1", "latency_ms_b64"}
    with pytest.raises(ValueError, match="flash_kb") as err:
        CostSpec("flash_kb", 10)
    assert "peak_sram_bytes_int8" in str(err.value)
    with pytest.raises(ValueError, match="positive"):
        CostSpec("macs", 0)
    with pytest.raises(ValueError, match="positive"):
        CostSpec("macs", True)
    assert [s.key for s in parse_budgets({"macs": 1e6, "latency_ms_b64": 3.0})] == ["macs", "latency_ms_b64"]
    assert CostSpec("latency_ms_b64", 1.0).batch_size == 64 and CostSpec("macs", 1).batch_size is None


def test_evaluate_budgets(built) -> None:
    model, groups, analytic = built["seed_cnn"]
    kept = {**groups.sizes, "features.4": 64}
    luts = _fake_luts()
    budgets = {
        "flash_bytes_int8": 10**9,
        "peak_sram_bytes_int8": 1000,
        "macs": analytic.macs(kept),
        "params": analytic.params(kept) - 1,
        "latency_ms_b1": 10.0,
        "latency_ms_b64": 10.0,
    }
    out = evaluate_budgets(budgets, kept, analytic, luts)
    assert out["flash_bytes_int8"] == {"limit": 10**9, "predicted": analytic.params(kept), "ok": True}
    assert out["peak_sram_bytes_int8"]["predicted"] == analytic.peak_activation_bytes(kept, 1) and not out["peak_sram_bytes_int8"]["ok"]
    assert out["macs"]["ok"] and not out["params"]["ok"]
    lat1 = 1.0 + 7.0 * (64 - 16) / (128 - 16) + 0.5
    assert out["latency_ms_b1"]["predicted"] == pytest.approx(lat1) and out["latency_ms_b1"]["ok"]
    assert out["latency_ms_b64"]["predicted"] == pytest.approx(lat1 - 0.5 + 32.0) and not out["latency_ms_b64"]["ok"]
    assert evaluate_budgets({"macs": 1}, StructuredMask.dense(groups), analytic)["macs"]["predicted"] == count_macs(model)
    with pytest.raises(ValueError, match="batch size 64"):
        evaluate_budgets({"latency_ms_b64": 1.0}, kept, analytic, {1: luts[1]})
    with pytest.raises(ValueError, match="unknown budget key 'sram'"):
        evaluate_budgets({"sram": 1}, kept, analytic)
    fns = budget_constraints({"macs": 5, "peak_sram_bytes_int8": 7}, analytic)
    assert [limit for _, limit in fns] == [5.0, 7.0]
    assert fns[0][0](kept) == analytic.macs(kept) and hasattr(fns[1][0], "parts")
