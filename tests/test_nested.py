"""Nested sub-network training (fedprune.nested): masked passes equal extracted networks; federated messages."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedprune.config import ConfigError, load_config
from fedprune.groups import groups_for
from fedprune.masks import MaskError, StructuredMask, extract_submodel
from fedprune.models import get_model
from fedprune.nested import inner_channel_masks, masked_channels, train_nested
from fedprune.training import TrainConfig

from conftest import TINY


def _nested_masks(groups, seed: int = 0) -> tuple[StructuredMask, StructuredMask]:
    """A random outer mask (about 70% of each group) and an inner one (about 40%) with inner ⊆ outer."""
    rng = np.random.default_rng(seed)
    scores = {g.name: rng.random(g.size) for g in groups}
    outer = StructuredMask.from_scores(scores, {g.name: max(1, int(0.7 * g.size)) for g in groups})
    inner = StructuredMask.from_scores(scores, {g.name: max(1, int(0.4 * g.size)) for g in groups})
    return outer, inner


@pytest.mark.parametrize("name", ["seed_cnn", "resnet20"])
def test_masked_pass_equals_extracted_inner_network(name) -> None:
    torch.manual_seed(0)
    dense = get_model(name).eval()
    for m in dense.modules():  # non-trivial BN statistics so that a wrong slice shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    groups = groups_for(name)
    outer, inner = _nested_masks(groups)
    sub = extract_submodel(dense, outer, groups)
    small = extract_submodel(dense, inner, groups)
    x = torch.randn(4, 3, 32, 32)
    local = inner_channel_masks(outer, inner, groups)
    twin = extract_submodel(dense, outer, groups)
    with torch.no_grad():
        with masked_channels(sub, groups, local):
            masked = sub(x)
        assert torch.allclose(masked, small(x), atol=1e-5)
        assert torch.allclose(sub(x), twin(x), atol=1e-6)  # the hooks are gone
        # train mode (batch statistics) too, where the model has no dropout
        if name == "resnet20":
            sub.train(), small.train()
            with masked_channels(sub, groups, local):
                masked = sub(x)
            assert torch.allclose(masked, small(x), atol=1e-4)


def test_inner_channel_masks_positions_and_errors() -> None:
    groups = groups_for("seed_cnn")
    outer, inner = _nested_masks(groups)
    local = inner_channel_masks(outer, inner, groups)
    for g in groups:
        assert local[g.name].numel() == len(outer.kept(g.name))
        assert outer.kept(g.name)[local[g.name].bool().numpy()].tolist() == inner.kept(g.name).tolist()
    with pytest.raises(MaskError, match="subset"):
        inner_channel_masks(inner, outer, groups)


def _loader(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)), batch_size=16)


def test_train_nested_without_inner_masks_is_plain_training() -> None:
    from fedprune.training import train

    cfg = TrainConfig(epochs=1, lr=1e-3, batch_size=16, threads=1)
    torch.manual_seed(0)
    a = get_model("seed_cnn")
    b = copy.deepcopy(a)
    torch.manual_seed(5)
    train_nested(a, groups_for("seed_cnn"), [], _loader(), cfg)
    torch.manual_seed(5)
    train(b, _loader(), cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_train_nested_trains_the_inner_network_and_checks_masks() -> None:
    groups = groups_for("seed_cnn")
    outer, inner = _nested_masks(groups)
    torch.manual_seed(0)
    sub = extract_submodel(get_model("seed_cnn"), outer, groups)
    before = copy.deepcopy(sub)
    local = inner_channel_masks(outer, inner, groups)
    out = train_nested(sub, groups, [local], _loader(), TrainConfig(epochs=1, lr=1e-3, batch_size=16, threads=1))
    assert out["steps"] == 2 and np.isfinite(out["loss"])
    assert not torch.equal(sub.features[0].weight, before.features[0].weight)
    bad = {k: v[:-1] for k, v in local.items()}
    with pytest.raises(MaskError, match="entries"):
        train_nested(sub, groups, [bad], _loader(), TrainConfig(epochs=1, threads=1))
    empty = {k: torch.zeros_like(v) for k, v in local.items()}
    with pytest.raises(MaskError, match="keeps no channel"):
        train_nested(sub, groups, [empty], _loader(), TrainConfig(epochs=1, threads=1))


def test_federated_nested_training_sends_inner_masks(tmp_path) -> None:
    """Each fine-tune message carries the narrower profiles' masks nested in the client's own; the client
    trains them (its reply and the merge are unchanged in form)."""
    from fedprune.federated import FederatedPruning, InProcessTransport

    cfg = load_config(None, TINY + ["federated.nested_training=true"])
    transport = InProcessTransport(cfg.federated.num_clients)
    sent: list = []
    exchange = transport.exchange

    def spy(requests):
        sent.extend(requests)
        return exchange(requests)

    transport.exchange = spy
    run = FederatedPruning(cfg, transport, tmp_path)
    res = run.run()
    masks = run.profile_masks
    finetune = [(n, c) for n, kind, c in sent if kind == "train" and "inner-mask.0" in c.keys()]
    inner_counts = {}
    for n, content in finetune:
        prof = run.nodes[n].profile
        inner_counts[prof] = sum(k.startswith("inner-mask.") for k in content.keys())
        from fedprune.records import record_to_mask

        first = record_to_mask(content["inner-mask.0"], run.groups)
        assert first.is_subset_of(masks[prof]) and first != masks[prof]
    assert inner_counts == {"edge_gpu": 2, "mobile_cpu": 1}  # the microcontroller has no narrower profile
    assert all(r["failures"] == 0 for r in res["rounds"])
    assert set(res["profiles"]) == {"edge_gpu", "mobile_cpu", "microcontroller"}


def test_nested_training_config() -> None:
    cfg = load_config(None, ["federated.nested_training=true", "federated.nested_distill=0.5"])
    assert cfg.federated.nested_training and cfg.federated.nested_distill == 0.5
    with pytest.raises(ConfigError, match="cannot be combined with dynamic.method = 'widths'"):
        load_config(None, ["federated.nested_training=true", "dynamic.enabled=true", "dynamic.method='widths'"])
    with pytest.raises(ConfigError, match="nested_distill"):
        load_config(None, ["federated.nested_distill=-1"])
