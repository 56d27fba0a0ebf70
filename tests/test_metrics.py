"""Tests for fedprune.metrics: parameter/MAC counts, sparsity, latency."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from fedprune.metrics import (
    count_flops,
    count_macs,
    count_params,
    deployment_form,
    latency_side_by_side,
    measure_latency_ms,
    model_costs,
    param_sparsity,
    torch_threads,
)


def _tiny() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 3*8*9 + 8 = 224
        nn.BatchNorm2d(8),  # 16
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5, bias=False),  # 40
    )


def test_count_params_hand_built() -> None:
    assert count_params(_tiny()) == 224 + 16 + 40
    assert count_params(nn.Linear(10, 5)) == 55
    frozen = _tiny()
    for p in frozen.parameters():
        p.requires_grad_(False)
    assert count_params(frozen) == 280  # frozen parameters count too
    assert count_params(nn.ReLU()) == 0


def test_count_macs_conv_and_linear() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_macs(conv) == 3 * 8 * 9 * 32 * 32
    assert count_flops(conv) == 2 * 3 * 8 * 9 * 32 * 32
    assert count_macs(nn.Conv2d(3, 8, 3, padding=1, bias=False)) == 3 * 8 * 9 * 32 * 32
    assert count_macs(nn.Linear(10, 5), input_shape=(1, 10)) == 50
    assert count_macs(nn.Linear(10, 5), input_shape=(4, 10)) == 200
    # Strided conv: output 16x16; depthwise conv: in/groups = 1 input channel per output.
    assert count_macs(nn.Conv2d(3, 8, 3, stride=2, padding=1)) == 3 * 8 * 9 * 16 * 16
    assert count_macs(nn.Conv2d(3, 6, 3, padding=1, groups=3)) == 1 * 6 * 9 * 32 * 32
    # The sequence: conv MACs + linear MACs (BN, ReLU and pooling are not counted).
    assert count_macs(_tiny()) == 3 * 8 * 9 * 32 * 32 + 8 * 5


def test_count_macs_keeps_training_mode_and_state() -> None:
    model = _tiny().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_macs(model)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # no BN statistics updated


def test_param_sparsity() -> None:
    model = nn.Linear(4, 5)  # 20 weights + 5 biases
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(1.0)
        model.weight[:2].zero_()  # 8 zeros
        model.bias[0] = 0.0  # 1 zero
    assert param_sparsity(model) == pytest.approx(9 / 25)
    assert param_sparsity(model, reference_params=100) == pytest.approx(0.75)
    assert param_sparsity(nn.Linear(4, 5), reference_params=25) == 0.0
    assert param_sparsity(nn.ReLU()) == 0.0


def test_deployment_form_matches_eval_outputs() -> None:
    torch.manual_seed(0)
    model = _tiny()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
    model.train()
    x = torch.randn(2, 3, 32, 32)
    deployed = deployment_form(model)
    assert model.training  # original untouched
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model.eval()(x), atol=1e-5, rtol=1e-4)


def test_measure_latency_restores_thread_count() -> None:
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ms = measure_latency_ms(_tiny(), batch_size=1, threads=2, warmup=1, repeats=3)
        assert isinstance(ms, float) and ms > 0 and math.isfinite(ms)
        assert torch.get_num_threads() == 1
        ms = measure_latency_ms(_tiny(), batch_size=2, threads=None, warmup=1, repeats=2)
        assert ms > 0 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)


def test_torch_threads_restores_on_error() -> None:
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with pytest.raises(RuntimeError):
            with torch_threads(2):
                assert torch.get_num_threads() == 2
                raise RuntimeError("boom")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)


def test_latency_side_by_side_and_model_costs() -> None:
    out = latency_side_by_side({"a": _tiny(), "b": nn.Conv2d(3, 4, 1)}, warmup=1, repeats=2)
    assert set(out) == {"a", "b"} and all(v > 0 for v in out.values())
    costs = model_costs(_tiny())
    assert costs == {"params": 280, "macs": 3 * 8 * 9 * 32 * 32 + 40, "flops": 2 * (3 * 8 * 9 * 32 * 32 + 40)}
    costs = model_costs(_tiny(), latency=True, repeats=4)
    assert set(costs["latency_ms"]) == {"b1", "b64"} and all(v > 0 for v in costs["latency_ms"].values())


def test_relative_host_latency_takes_the_ratio_within_each_pass(monkeypatch) -> None:
    """The host changes speed from pass to pass (1x, 1.4x, 0.7x): each pass times both models in the same
    state, so their ratio is exact while either timing alone moves by 2x."""
    from fedprune import metrics

    small, big = torch.nn.Linear(2, 2), torch.nn.Linear(8, 8)
    speeds = iter([1.0, 1.0, 1.4, 1.4, 0.7, 0.7])
    cost_ms = {small: 1.0, big: 4.0}
    monkeypatch.setattr(metrics, "host_latency_ms", lambda m, b, t, r: next(speeds) * cost_ms[m])
    assert metrics.relative_host_latency(small, big, 1, passes=3) == pytest.approx(0.25)
