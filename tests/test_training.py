"""Tests for fedprune.training: config validation, train/evaluate loops, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedprune.data import make_loader
from fedprune.training import TrainConfig, evaluate, predict_logits, set_seed, train


def _small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Dropout(0.2), nn.Linear(16, 10),
    )


@pytest.mark.parametrize(
    "field,value",
    [
        ("epochs", 0),
        ("lr", 0.0),
        ("optimizer", "rmsprop"),
        ("momentum", 1.0),
        ("weight_decay", -1e-4),
        ("batch_size", 0),
        ("threads", 0),
    ],
)
def test_train_config_validation(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field) as info:
        TrainConfig(**{field: value})
    assert repr(value) in str(info.value)


def test_train_reduces_loss_and_counts(synthetic_data) -> None:
    train_data, _ = synthetic_data
    set_seed(0)
    model = _small_net()
    eval_loader = make_loader(train_data, 200, train=False)
    before = evaluate(model, eval_loader)["loss"]
    calls: list[int] = []
    cfg = TrainConfig(epochs=3, lr=0.05, batch_size=32, threads=1)
    loader = make_loader(train_data, cfg.batch_size, train=True, seed=0)
    result = train(model, loader, cfg, after_step=lambda m: calls.append(1))
    assert result["steps"] == 3 * len(loader) == len(calls)
    assert result["examples"] == 3 * len(train_data)
    assert evaluate(model, eval_loader)["loss"] < before
    assert math.isfinite(result["loss"])


def test_train_adam_frozen_params_and_progress(synthetic_data) -> None:
    train_data, _ = synthetic_data
    model = _small_net()
    frozen = model[0].weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    cfg = TrainConfig(optimizer="adam", lr=1e-3, cosine=False)
    result = train(model, make_loader(train_data.subset(range(64)), 32, True), cfg, progress="test")
    assert result["steps"] == 2
    assert torch.equal(frozen, before)


def test_evaluate_range_and_mode(synthetic_data) -> None:
    _, test_data = synthetic_data
    model = _small_net().train()
    metrics = evaluate(model, make_loader(test_data, 64, train=False))
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["num_examples"] == len(test_data)
    assert model.training
    model.eval()
    evaluate(model, make_loader(test_data, 64, train=False))
    assert not model.training


def test_evaluate_and_predict_empty_loader(synthetic_data) -> None:
    _, test_data = synthetic_data
    empty = make_loader(test_data.subset([]), 8, train=False)
    metrics = evaluate(_small_net(), empty)
    assert metrics["num_examples"] == 0
    assert math.isnan(metrics["loss"]) and math.isnan(metrics["accuracy"])
    assert predict_logits(_small_net(), empty).numel() == 0


def test_predict_logits(synthetic_data) -> None:
    _, test_data = synthetic_data
    model = _small_net().train()
    logits = predict_logits(model, make_loader(test_data, 64, train=False))
    assert logits.shape == (len(test_data), 10) and model.training


def _trained_state(train_data) -> dict[str, torch.Tensor]:
    set_seed(0)
    model = _small_net()
    cfg = TrainConfig(epochs=1, lr=0.05, batch_size=32)
    train(model, make_loader(train_data.subset(range(256)), 32, True, seed=0), cfg)
    return model.state_dict()


def test_training_is_deterministic(synthetic_data) -> None:
    first, second = _trained_state(synthetic_data[0]), _trained_state(synthetic_data[0])
    assert all(torch.equal(first[k], second[k]) for k in first)
