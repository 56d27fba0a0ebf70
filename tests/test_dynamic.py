"""Dynamic per-input channel gating: exactness at full budget, sliced == masked, MACs fall with the budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedprune.dynamic import GatedCNN, keep_count
from fedprune.groups import discover_groups
from fedprune.masks import StructuredMask, extract_submodel
from fedprune.metrics import count_macs
from fedprune.models import get_model


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Random but non-trivial BN statistics, eval mode."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def static():
    """A mobile_cpu-like static sub-network of seed_cnn (50% channels)."""
    torch.manual_seed(0)
    model = _trained_like(get_model("seed_cnn"))
    groups = discover_groups(model)
    mask = StructuredMask({g.name: np.arange(g.size) < g.size // 2 for g in groups})
    return _trained_like(extract_submodel(model, mask, groups))


def test_keep_count() -> None:
    assert keep_count(1.0, 64) == 64 and keep_count(0.5, 64) == 32 and keep_count(0.01, 64) == 1
    # Nearest multiple of round_to (ties up), at least round_to; layers narrower than round_to as without it.
    assert [keep_count(b, 32, 8) for b in (1.0, 0.9, 0.875, 0.8, 0.5, 0.1)] == [32, 32, 32, 24, 16, 8]
    assert keep_count(0.5, 6, 8) == 3
    assert [keep_count(b, 90, 8) for b in (1.0, 0.97, 0.5, 0.05)] == [90, 88, 48, 8]  # full width off the multiples too
    with pytest.raises(ValueError, match="budget must be in"):
        keep_count(0.0, 64)
    with pytest.raises(ValueError, match="round_to must be >= 1"):
        keep_count(0.5, 64, 0)


def test_full_budget_equals_static(static) -> None:
    gated = GatedCNN(static).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(gated(x, 1.0), static(x))
        logits, stats = gated.forward_sliced(x[:1], 1.0)
    assert torch.allclose(logits, static(x[:1]), atol=1e-4)
    assert stats.macs == count_macs(static)


@pytest.mark.parametrize("budget", [0.9, 0.6, 0.3])
def test_sliced_equals_masked(static, budget) -> None:
    gated = GatedCNN(static).eval()
    torch.manual_seed(2)
    for gate in gated.gates:  # input-dependent saliencies
        torch.nn.init.normal_(gate.fc.weight, std=1.0)
    for i in range(3):
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            masked = gated(x, budget)
        sliced, stats = gated.forward_sliced(x, budget)
        assert torch.allclose(masked, sliced, atol=1e-4), (budget, (masked - sliced).abs().max())
        assert stats.kept == [keep_count(budget, c.out_channels, 8) if i < 3 else c.out_channels for i, (c, _, _) in enumerate(gated.blocks)]
    every = GatedCNN(static, gated_layers=range(4), round_to=1).eval()  # any count, every block
    every.gates.load_state_dict(gated.gates.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        masked = every(x, budget)
    sliced, stats = every.forward_sliced(x, budget)
    assert torch.allclose(masked, sliced, atol=1e-4)
    assert stats.kept == [keep_count(budget, c.out_channels) for c, _, _ in every.blocks]


def test_executed_macs_fall_with_budget(static) -> None:
    gated = GatedCNN(static).eval()
    x = torch.randn(1, 3, 32, 32)
    macs = [gated.forward_sliced(x, b)[1].macs for b in (1.0, 0.8, 0.6, 0.4, 0.2)]
    assert all(a > b for a, b in zip(macs, macs[1:])), macs
    assert macs[2] < 0.5 * macs[0]


def test_gates_get_gradients(static) -> None:
    gated = GatedCNN(static).train()
    loss = gated(torch.randn(8, 3, 32, 32), 0.5).logsumexp(dim=1).mean()
    loss.backward()
    assert all(gated.gates[i].fc.weight.grad.abs().sum() > 0 for i in gated.gated_layers)
    assert gated.gated_layers == (0, 1, 2) and gated.gates[3].fc.weight.grad is None  # the last block is not gated
    with pytest.raises(ValueError, match="gated_layers \\[7\\] out of range"):
        GatedCNN(static, gated_layers=[7])


def test_rejects_other_architectures() -> None:
    with pytest.raises(NotImplementedError, match="Conv2d-BatchNorm2d-ReLU"):
        GatedCNN(get_model("resnet20"))


def test_train_gates_keeps_static_frozen_and_learns(static) -> None:
    from fedprune.data import make_loader, make_synthetic
    from fedprune.dynamic import evaluate_gated, train_gates
    from fedprune.training import TrainConfig

    train, test = make_synthetic(256, seed=0), make_synthetic(64, seed=1)
    gated = GatedCNN(static).eval()
    before = {k: v.clone() for k, v in static.state_dict().items()}
    gates_before = [g.fc.weight.detach().clone() for g in gated.gates]
    stats = train_gates(gated, make_loader(train, 64, train=True, seed=0), TrainConfig(epochs=1, lr=1e-2, optimizer="adam"), [0.5, 0.75])
    assert stats["steps"] == 4
    assert all(torch.equal(v, static.state_dict()[k]) for k, v in before.items())
    assert any(not torch.equal(a, g.fc.weight) for a, g in zip(gates_before, gated.gates))
    rows = evaluate_gated(gated, make_loader(test, 32, train=False), [1.0, 0.5], mac_inputs=4)
    assert [r["budget"] for r in rows] == [1.0, 0.5]
    assert rows[1]["macs"] < rows[0]["macs"] and 0.0 <= rows[1]["accuracy"] <= 1.0


def test_joint_training_trains_network_and_gates(static) -> None:
    """Joint mode (sandwich rule) updates the network and the gates; budget 1.0 stays the ungated network."""
    import copy

    from fedprune.data import make_loader, make_synthetic
    from fedprune.dynamic import train_gates
    from fedprune.training import TrainConfig

    net = copy.deepcopy(static)
    gated = GatedCNN(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    gates_before = [g.fc.weight.detach().clone() for g in gated.gates]
    stats = train_gates(gated, make_loader(make_synthetic(128, seed=0), 64, train=True, seed=0),
                        TrainConfig(epochs=1, lr=1e-2, optimizer="adam"), [0.5], joint=True)
    assert stats["steps"] == 2 and np.isfinite(stats["loss"])
    assert any(not torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert any(not torch.equal(a, g.fc.weight) for a, g in zip(gates_before, gated.gates))
    gated.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(gated(x, 1.0), net(x))


def test_federated_gates_round_trip(tmp_path) -> None:
    """Clients train gates in the fine-tune rounds; the server averages them and reports dynamic inference."""
    from fedprune.config import load_config
    from fedprune.federated import FederatedPruning, InProcessTransport

    from conftest import TINY

    cfg = load_config(None, TINY + ["dynamic.enabled=true", "dynamic.eval_budgets=[1.0, 0.6]", "federated.finetune_rounds=2"])
    run = FederatedPruning(cfg, InProcessTransport(cfg.federated.num_clients), tmp_path)
    res = run.run()
    assert len(run.gates) == 3  # one gate set per profile sub-network
    for name, entry in res["profiles"].items():
        dyn = entry["dynamic"]
        assert dyn["budgets"] == [1.0, 0.6]
        assert dyn["macs"][1] < dyn["macs"][0]
        assert dyn["accuracy"][0] == pytest.approx(entry["accuracy"])  # budget 1 = the static sub-network
    # the gates the server holds differ from their initialisation: clients trained them
    mask = run.profile_masks["mobile_cpu"]
    trained = run.gates[mask.key()]
    del run.gates[mask.key()]
    fresh = run.gates_for(mask)
    assert any(not torch.equal(trained[k], fresh[k]) for k in trained)
    fin = [r for r in res["rounds"] if r["phase"] == "finetune"]
    assert all(r["failures"] == 0 for r in fin)


def test_gate_parameters_survive_the_record_round_trip(static) -> None:
    from fedprune.records import record_to_state, state_to_record
    from fedprune.task import gate_state

    gated = GatedCNN(static)
    gates = gate_state(gated)
    assert set(gates) == {f"gates.{i}.fc.{p}" for i in range(4) for p in ("weight", "bias")}
    back = record_to_state(state_to_record(gates))
    assert all(torch.equal(back[k], v) for k, v in gates.items())
    other = GatedCNN(static)
    other.load_state_dict(back, strict=False)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(other.forward_sliced(x, 0.5)[0], gated.forward_sliced(x, 0.5)[0])
