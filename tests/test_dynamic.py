"""Dynamic per-input channel gating: exactness at full budget, sliced == masked, MACs fall with the budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

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


# ------------------------------------------------ adaptive width (early-exit cascade)
@pytest.fixture(scope="module")
def nested(static):
    """A NestedWidthCNN over the static sub-network (prior channel order), trained one epoch and calibrated at 0.5."""
    import copy

    from fedprune.data import make_loader, make_synthetic
    from fedprune.dynamic import NestedWidthCNN, train_widths
    from fedprune.training import TrainConfig

    torch.manual_seed(0)
    net = NestedWidthCNN(copy.deepcopy(static))
    data = make_synthetic(128, seed=0)
    stats = train_widths(net, make_loader(data, 64, train=True, seed=0), TrainConfig(epochs=1, lr=1e-3, optimizer="adam"), [0.5, 1.0])
    assert stats["steps"] == 2 and np.isfinite(stats["loss"])
    net.calibrate_bn(make_loader(data, 64, train=False), [0.5, 1.0])
    return net.eval()


def test_nested_widths_follow_the_channel_order(static) -> None:
    from fedprune.dynamic import NestedWidthCNN, channel_prior, conv_blocks

    net = NestedWidthCNN(static)
    for (conv, bn, _), order in zip(conv_blocks(static), net.orders):
        prior = channel_prior(conv, bn)[order]
        assert torch.all(prior[:-1] >= prior[1:])  # default: most important channel first
    narrow, wide = net.kept(0.5), net.kept(0.75)
    assert [len(i) for i in narrow] == net.counts(0.5) == [16, 32, 64, 128]
    assert all(set(a.tolist()) <= set(b.tolist()) for a, b in zip(narrow, wide))  # nested
    custom = NestedWidthCNN(static, orders=[torch.arange(c.out_channels).flip(0) for c, _, _ in conv_blocks(static)])
    assert custom.kept(0.5)[0].tolist() == list(range(31, 15, -1))
    with pytest.raises(ValueError, match=r"orders must hold one permutation of each conv block's channels \[32, 64, 128, 256\]"):
        NestedWidthCNN(static, orders=[torch.zeros(32, dtype=torch.long)] * 4)


def test_nested_width_full_is_the_model_and_extract_equals_slice(nested) -> None:
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(nested(x, 1.0), nested.model(x))
        small = nested.extract(0.5)
        assert [c.out_channels for c, _, _ in __import__("fedprune.dynamic", fromlist=["conv_blocks"]).conv_blocks(small)] == nested.counts(0.5)
        assert torch.allclose(small(x), nested(x, 0.5), atol=1e-5)  # the physically smaller twin gives the same outputs
        assert count_macs(small) < 0.35 * count_macs(nested.model)


def test_nested_width_needs_calibrated_statistics(nested) -> None:
    with pytest.raises(RuntimeError, match=r"width 0.75 has no BatchNorm statistics of its own: call calibrate_bn\(loader, \[0.75\]\)"):
        nested(torch.randn(1, 3, 32, 32), 0.75)
    with pytest.raises(ValueError, match=r"width must be a number in \(0, 1\], got 1.5"):
        nested.counts(1.5)


def test_train_widths_leaves_narrow_passes_out_of_the_running_statistics(static) -> None:
    """Only the full width updates the BN running statistics (narrower widths use batch statistics)."""
    import copy

    from fedprune.dynamic import NestedWidthCNN

    net = NestedWidthCNN(copy.deepcopy(static)).train()
    before = net.model.features[1].running_mean.clone()
    net(torch.randn(8, 3, 32, 32), 0.5)
    assert torch.equal(net.model.features[1].running_mean, before)
    net(torch.randn(8, 3, 32, 32), 1.0)
    assert not torch.equal(net.model.features[1].running_mean, before)


def test_exit_confidence_on_hand_made_logits() -> None:
    from fedprune.dynamic import exit_confidence

    probs = torch.tensor([[0.7, 0.2, 0.1], [0.45, 0.45, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    logits = probs.log() + 5.0  # softmax is shift-invariant: these logits give exactly these probabilities
    assert exit_confidence(logits, "max_prob").tolist() == pytest.approx([0.7, 0.45, 1 / 3])
    assert exit_confidence(logits, "margin").tolist() == pytest.approx([0.5, 0.0, 0.0], abs=1e-6)  # a tie between two classes is unsure
    assert exit_confidence(torch.zeros(2, 1), "margin").tolist() == [1.0, 1.0]  # one class: always sure
    with pytest.raises(ValueError, match=r"exit rule must be one of \('margin', 'max_prob'\), got 'entropy'"):
        exit_confidence(logits, "entropy")


@pytest.mark.parametrize("rule", ["margin", "max_prob"])
def test_cascade_matches_batched_outcome_and_thresholds_order_macs(nested, rule) -> None:
    from fedprune.data import make_loader, make_synthetic
    from fedprune.dynamic import WidthCascade, cascade_outcome, stage_logits, threshold_for_macs

    stages = [nested.extract(0.5), nested.extract(1.0)]
    loader = make_loader(make_synthetic(48, seed=3), 16, train=False)
    logits, labels = stage_logits(stages, loader)
    macs = WidthCascade(stages, 0.5).stage_macs
    top2 = torch.softmax(logits[0], 1).topk(2, dim=1).values
    confidences = top2[:, 0] - top2[:, 1] if rule == "margin" else top2[:, 0]
    ranked = confidences.sort().values
    threshold = float(ranked[23] + ranked[24]) / 2  # between two inputs: batch-vs-single rounding cannot flip one
    out = cascade_outcome(logits, labels, macs, threshold, rule)
    cascade = WidthCascade(stages, threshold, rule=rule)
    xs = torch.cat([x for x, _ in loader])
    per_input = [cascade(x[None]) for x in xs]
    assert [s for _, s in per_input] == [int(c < threshold) for c in confidences]  # stage 0 answers when confident
    assert out["exits"][0] == pytest.approx(float((confidences >= threshold).double().mean()))
    assert out["macs"] == pytest.approx(np.mean([sum(macs[: s + 1]) for _, s in per_input]))
    assert out["accuracy"] == pytest.approx(np.mean([int(l.argmax()) == int(y) for (l, _), y in zip(per_input, labels)]))
    # threshold 0: every input stops at the narrow stage; above 1: every input runs both (the static network's answer)
    assert cascade_outcome(logits, labels, macs, 0.0)["macs"] == macs[0]
    full = cascade_outcome(logits, labels, macs, 1.01)
    assert full["macs"] == sum(macs) and full["accuracy"] == pytest.approx(float((logits[1].argmax(1) == labels).double().mean()))
    # MACs never fall as the threshold grows; the chosen threshold meets its target
    grid = [cascade_outcome(logits, labels, macs, t, rule)["macs"] for t in np.linspace(0, 1, 11)]
    assert all(a <= b for a, b in zip(grid, grid[1:]))
    for target in (macs[0], macs[0] + 0.3 * macs[1], sum(macs)):
        t = threshold_for_macs(logits, macs, target, rule)
        assert cascade_outcome(logits, labels, macs, t, rule)["macs"] <= target + 1e-6
    with pytest.raises(ValueError, match="below the first stage's"):
        threshold_for_macs(logits, macs, macs[0] - 1, rule)
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        WidthCascade(stages, -0.1)
    with pytest.raises(ValueError, match="exit rule must be one of"):
        WidthCascade(stages, 0.5, rule="entropy")
    with pytest.raises(ValueError, match="one input at a time"):
        cascade(xs[:2])


def test_cascade_latency_reports_every_variant(nested) -> None:
    from fedprune.dynamic import WidthCascade, cascade_latency_ms

    stages = [nested.extract(0.5), nested.extract(1.0)]
    xs = [torch.randn(1, 3, 32, 32) for _ in range(3)]
    cascades = {"t=0": WidthCascade(stages, 0.0), "t=1.01": WidthCascade(stages, 1.01)}
    lat = cascade_latency_ms(nested.model, cascades, xs, passes=3, warmup=1)
    assert set(lat) == {"static", "t=0", "t=1.01"} and all(v > 0 for v in lat.values())
    copies: dict = {}
    a, b = cascades["t=0"].deployed(copies), cascades["t=1.01"].deployed(copies)
    assert len(copies) == 2 and all(x is y for x, y in zip(a.stages, b.stages))  # one deployed copy per stage network
    x = xs[0]
    assert torch.allclose(a(x)[0], cascades["t=0"](x)[0], atol=1e-4) and b(x)[1] == 1


def test_cascade_in_onnxruntime_decides_as_in_torch(nested) -> None:
    """A cascade deployed to ONNX Runtime gives the eager cascade's logits and exit decisions, and its latency is timed
    beside a static network run in ONNX Runtime too; an unknown runtime is an error naming the allowed ones."""
    from fedprune.dynamic import ExitStage, WidthCascade, cascade_latency_ms, exit_confidence
    from fedprune.metrics import OnnxRuntimeModel, deployed

    stages = [nested.extract(0.5), nested.extract(1.0)]
    xs = [torch.randn(1, 3, 32, 32) for _ in range(6)]
    with torch.no_grad():
        ort_model = OnnxRuntimeModel(stages[1])
        assert torch.allclose(ort_model(xs[0]), stages[1].eval()(xs[0]), atol=1e-4)
        logits, conf = OnnxRuntimeModel(ExitStage(stages[0], "margin"))(xs[0])
        assert torch.allclose(conf, exit_confidence(stages[0](xs[0]), "margin"), atol=1e-5)
        confs = sorted(float(exit_confidence(stages[0](x))) for x in xs)
        t = (confs[2] + confs[3]) / 2  # half the inputs stop at width 0.5, none near the threshold
        eager, ort_cascade = WidthCascade(stages, t), WidthCascade(stages, t).deployed(runtime="onnxruntime")
        for x in xs:
            (a, i), (b, j) = eager(x), ort_cascade(x)
            assert i == j and torch.allclose(a, b, atol=1e-4)
    lat = cascade_latency_ms(nested.model, {"t": WidthCascade(stages, t)}, xs, passes=2, warmup=1, runtime="onnxruntime")
    assert set(lat) == {"static", "t"} and all(v > 0 for v in lat.values())
    with pytest.raises(ValueError, match=r"latency runtime must be one of \('torch', 'onnxruntime'\), got 'tflite'"):
        deployed(stages[1], "tflite")
    with pytest.raises(ValueError, match="latency runtime must be one of"):
        WidthCascade(stages, t).deployed(runtime="tflite")
    with pytest.raises(ValueError, match="already deployed"):
        ort_cascade.deployed()
    with pytest.raises(ValueError, match="stage_macs is needed"):
        WidthCascade(ort_cascade.stages, t)
    with pytest.raises(ValueError, match=r"threads must be an integer >= 1 or None \(its default\), got 0"):
        OnnxRuntimeModel(stages[1], threads=0)
    copies: dict = {}
    one, two = WidthCascade(stages, t).deployed(copies, "onnxruntime", 1), WidthCascade(stages, t).deployed(copies, "onnxruntime", 2)
    assert len(copies) == 4 and one.stages[0] is not two.stages[0]  # sessions with other thread counts are not shared


def test_federated_adaptive_width_round_trip(tmp_path) -> None:
    """Method 'widths': nested widths follow the consensus ranking, clients train them and measure their BN
    statistics, the server averages the statistics (keeps its orders) and reports the cascade per profile."""
    from fedprune.config import load_config
    from fedprune.dynamic import NestedWidthCNN
    from fedprune.federated import FederatedPruning, InProcessTransport

    from conftest import TINY

    cfg = load_config(None, TINY + ["dynamic.enabled=true", "dynamic.method='widths'", "dynamic.widths=[0.5, 1.0]",
                                    "dynamic.thresholds=[0.0, 0.6, 1.0]", "federated.finetune_rounds=2", "eval.latency=true",
                                    "eval.latency_repeats=1", "dynamic.latency_inputs=2"])
    run = FederatedPruning(cfg, InProcessTransport(cfg.federated.num_clients), tmp_path)
    res = run.run()
    assert len(run.gates) == 3
    for name, entry in res["profiles"].items():
        dyn = entry["dynamic"]
        assert dyn["method"] == "widths" and dyn["thresholds"] == [0.0, 0.6, 1.0] and dyn["exit_rule"] == "margin"
        small, full = dyn["stage_macs"]
        assert small < full and full == entry["macs"]
        assert dyn["macs"][0] == small and dyn["exits"][0][0] == 1.0  # threshold 0: every input stops at width 0.5
        assert dyn["macs"] == sorted(dyn["macs"])  # MACs never fall as the threshold grows
        assert dyn["accuracy"][2] == pytest.approx(entry["accuracy"]) == pytest.approx(dyn["width_accuracy"][1])  # 1.0: the sub-network
        assert set(dyn["latency_ms_b1"]) == {"runtime", "static", "cascade"} and len(dyn["latency_ms_b1"]["cascade"]) == 3
        assert dyn["latency_ms_b1"]["runtime"] == "onnxruntime"
    mask = run.profile_masks["mobile_cpu"]
    state = run.gates[mask.key()]
    consensus = run.consensus_log[-1]
    assert consensus["kept_channels"]["mobile_cpu"]["features.0"] == len(state["order.0"])
    assert not torch.equal(state["bn[0.5].0.var"], torch.ones_like(state["bn[0.5].0.var"]))  # measured by the clients
    net = NestedWidthCNN.from_dynamic_state(run.extracted(mask), state, cfg.dynamic.round_to)
    assert net.kept(0.5)[0].tolist() == state["order.0"][: net.counts(0.5)[0]].tolist()
    assert all(r["failures"] == 0 for r in res["rounds"] if r["phase"] == "finetune")


def test_dynamic_widths_config_errors() -> None:
    from fedprune.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"'dynamic.widths' = \[0.5, 0.75\] must be distinct widths in \(0, 1\], ascending, the last 1"):
        load_config(None, ["dynamic.widths=[0.5, 0.75]"])
    with pytest.raises(ConfigError, match=r"'dynamic.thresholds' = \[1.5\] must be a non-empty list of distinct confidences"):
        load_config(None, ["dynamic.thresholds=[1.5]"])
    with pytest.raises(ConfigError, match=r"dynamic.exit_rule.*'entropy'.*margin.*max_prob"):
        load_config(None, ["dynamic.exit_rule='entropy'"])
    with pytest.raises(ConfigError, match=r"dynamic.latency_runtime.*'tflite'.*torch.*onnxruntime"):
        load_config(None, ["dynamic.latency_runtime='tflite'"])
    with pytest.raises(ConfigError, match=r"dynamic.narrow_ce.*-0.5"):
        load_config(None, ["dynamic.narrow_ce=-0.5"])
    with pytest.raises(ConfigError, match=r"dynamic.method"):
        load_config(None, ["dynamic.method='early'"])


def test_width_state_round_trip_and_uncalibrated_state(nested, static) -> None:
    import copy

    from fedprune.dynamic import NestedWidthCNN

    state = nested.dynamic_state([0.5, 1.0])
    assert float(state["calibrated"]) == 1.0 and state["order.0"].dtype == torch.long
    back = NestedWidthCNN.from_dynamic_state(copy.deepcopy(nested.model), state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.eval()(x, 0.5), nested(x, 0.5))
    fresh = NestedWidthCNN(copy.deepcopy(static)).dynamic_state([0.5, 1.0])  # placeholders: mean 0, variance 1
    assert float(fresh["calibrated"]) == 0.0 and set(fresh) == set(state)
    with pytest.raises(RuntimeError, match="width 0.5 has no BatchNorm statistics"):
        NestedWidthCNN.from_dynamic_state(copy.deepcopy(static), fresh).eval()(x, 0.5)
    odd = NestedWidthCNN(copy.deepcopy(static), round_to=1)
    odd.bn_stats[1 / 3] = [(torch.zeros(k), torch.ones(k)) for k in odd.counts(1 / 3)]
    assert 1 / 3 in NestedWidthCNN.from_dynamic_state(copy.deepcopy(static), odd.dynamic_state([1 / 3, 1.0]), round_to=1).bn_stats


def test_train_widths_by_distillation_alone(static) -> None:
    """narrow_ce = 0: narrower widths learn from the full width's outputs only (US-Nets' in-place distillation)."""
    import copy

    from fedprune.data import make_loader, make_synthetic
    from fedprune.dynamic import NestedWidthCNN, train_widths
    from fedprune.training import TrainConfig

    net = NestedWidthCNN(copy.deepcopy(static))
    before = net.model.features[0].weight.detach().clone()
    stats = train_widths(net, make_loader(make_synthetic(64, seed=0), 32, train=True, seed=0), TrainConfig(epochs=1, lr=1e-3, optimizer="adam"),
                         [0.5, 1.0], distill=1.0, narrow_ce=0.0)
    assert stats["steps"] == 2 and np.isfinite(stats["loss"])
    assert not torch.equal(net.model.features[0].weight, before)


def test_widths_that_round_to_the_same_channels_are_rejected(static) -> None:
    import copy

    from fedprune.dynamic import NestedWidthCNN, check_distinct_widths, train_widths
    from fedprune.training import TrainConfig

    net = NestedWidthCNN(copy.deepcopy(static), round_to=8)
    assert net.check_widths([1.0, 0.5]) == [0.5, 1.0]
    with pytest.raises(ValueError, match=r"widths 0.5 and 0.51 keep the same channels"):
        net.check_widths([0.5, 0.51, 1.0])
    with pytest.raises(ValueError, match="choose widths further apart"):
        train_widths(net, [], TrainConfig(epochs=1, threads=1), [0.5, 0.51, 1.0])
    with pytest.raises(ValueError, match="keep the same channels"):
        check_distinct_widths([0.9, 1.0], [8, 8], 8)


def test_channel_orders_are_buffers_outside_the_state_dict(static) -> None:
    import copy

    from fedprune.dynamic import NestedWidthCNN

    net = NestedWidthCNN(copy.deepcopy(static))
    buffers = dict(net.named_buffers())
    assert all(torch.equal(buffers[f"order_{j}"], o) for j, o in enumerate(net.orders))
    assert not any(k.startswith("order_") for k in net.state_dict())


def test_batched_exits_compare_as_a_cascade_does_input_by_input() -> None:
    """_exit_stage (the batched outcome) compares in float64 like WidthCascade's float(conf): a threshold just above a
    float32 confidence, which rounds down onto it in float32, must not let that input exit."""
    import numpy as np

    from fedprune.dynamic import _exit_stage, exit_confidence

    logits = [torch.randn(8, 10, generator=torch.Generator().manual_seed(0)), torch.zeros(8, 10)]
    conf = exit_confidence(logits[0])
    c = float(conf[0])
    threshold = c + float(np.spacing(np.float32(c))) / 4  # above c, but float32(threshold) == c
    assert np.float32(threshold) == np.float32(c) and c < threshold
    stages = _exit_stage(logits, threshold)
    assert stages.tolist() == [0 if float(v) >= threshold else 1 for v in conf]
    assert stages[0] == 1


def test_gates_refuse_a_classifier_the_sliced_path_would_run_differently() -> None:
    """The sliced path applies ReLU between the two Linear layers: a classifier without it is refused, not run wrong."""
    from fedprune.dynamic import conv_blocks

    model = get_model("seed_cnn")
    assert len(conv_blocks(model)) == 4
    model.classifier = nn.Sequential(*[m for m in model.classifier if not isinstance(m, nn.ReLU)])
    with pytest.raises(NotImplementedError, match="Flatten-Linear-ReLU"):
        conv_blocks(model)
