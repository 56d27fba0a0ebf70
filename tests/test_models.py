"""Tests for fedprune.models: shapes, parameter counts, registry and torch-pruning."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

from fedprune.models import MODEL_NAMES, get_model


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("num_classes", [10, 7])
def test_forward_shape(name: str, num_classes: int) -> None:
    model = get_model(name, num_classes=num_classes).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, num_classes)


def test_seed_cnn_parameter_count() -> None:
    assert _num_params(get_model("seed_cnn")) == 2_080_010


def test_resnet20_parameter_count() -> None:
    assert 260_000 < _num_params(get_model("resnet20")) < 280_000


def test_mobilenetv2_width_mult() -> None:
    half = _num_params(get_model("mobilenetv2", width_mult=0.5))
    full = _num_params(get_model("mobilenetv2", width_mult=1.0))
    assert half < full
    model = get_model("mobilenetv2", width_mult=0.5).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_mobilenetv2_depthwise_convs() -> None:
    depthwise = [
        m for m in get_model("mobilenetv2").modules()
        if isinstance(m, nn.Conv2d) and m.groups > 1
    ]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)


def test_unknown_model_and_option() -> None:
    with pytest.raises(ValueError, match="'vgg16'.*seed_cnn"):
        get_model("vgg16")
    with pytest.raises(TypeError, match="width_mult"):
        get_model("resnet20", width_mult=0.5)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_dependency_graph_prune_first_conv(name: str) -> None:
    model = get_model(name).eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32))
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    channels = first_conv.out_channels
    group = graph.get_pruning_group(first_conv, tp.prune_conv_out_channels, idxs=[0, 1])
    group.prune()
    assert first_conv.out_channels == channels - 2
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
