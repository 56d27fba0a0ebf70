"""Tests for fedprune.schedules (one-shot, progressive, lottery ticket) and
fedprune.sensitivity.measure_sensitivity."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from fedprune.data import make_loader, make_synthetic
from fedprune.groups import ChannelGroups, discover_groups
from fedprune.importance import compute_importance
from fedprune.masks import StructuredMask
from fedprune.models import get_model
from fedprune.schedules import PruneSpec, lottery_ticket, one_shot, progressive, rewind, select_mask
from fedprune.sensitivity import measure_sensitivity
from fedprune.task import make_train_fn
from fedprune.training import TrainConfig, set_seed


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10),
    )


@pytest.fixture(scope="module")
def data():
    arrays = make_synthetic(64, seed=3)
    return make_loader(arrays, 32, train=True, seed=0), make_loader(arrays, 64, train=False)


def _train_fn(train_loader):
    return make_train_fn(train_loader, TrainConfig(epochs=1, lr=0.01, optimizer="sgd", momentum=0.9, weight_decay=5e-4, cosine=False))


def _group_tensors(model: nn.Module, groups: ChannelGroups, name: str):
    g = groups[name]
    for layer in g.producers + g.norms:
        module = model.get_submodule(layer)
        for attr in ("weight", "bias"):
            t = getattr(module, attr, None)
            if t is not None:
                yield f"{layer}.{attr}", t


def _assert_pruned_zero(model, groups, mask) -> None:
    for g in groups:
        pruned = torch.as_tensor(mask.pruned(g.name))
        kept = torch.as_tensor(mask.kept(g.name))
        for key, t in _group_tensors(model, groups, g.name):
            assert torch.all(t.detach()[pruned] == 0), key
            if key.endswith("weight"):  # the kept channels are not zeroed
                assert torch.any(t.detach()[kept] != 0), key


def _expected_rewound(rewind_state, groups, mask) -> dict:
    """rewind_state with the mask's pruned channels zeroed in producers and norms."""
    out = {k: v.clone() for k, v in rewind_state.items()}
    for g in groups:
        pruned = torch.as_tensor(mask.pruned(g.name), dtype=torch.long)
        for layer in g.producers + g.norms:
            for attr in ("weight", "bias"):
                key = f"{layer}.{attr}"
                if key in out:
                    out[key].index_fill_(0, pruned, 0.0)
    return out


def _assert_state_equal(model, expected) -> None:
    state = model.state_dict()
    assert set(state) == set(expected)
    for k, v in state.items():
        assert torch.equal(v, expected[k]), k


def test_one_shot_reaches_target_and_pruned_channels_stay_zero(data) -> None:
    train_loader, eval_loader = data
    set_seed(0)
    model = get_model("resnet20")  # residual-coupled groups
    groups = discover_groups(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluated = []
    spec = PruneSpec(criterion="l2", sparsity=0.5, allocation="uniform")
    stages = one_shot(model, groups, spec, _train_fn(train_loader), finetune_epochs=1,
                      evaluate_fn=lambda m: evaluated.append(1) or {"ok": 1.0})
    assert len(stages) == 1 and evaluated == [1]
    stage = stages[0]
    stage.mask.validate(groups)
    assert stage.sparsity == 0.5 and stage.before_finetune == {"ok": 1.0}
    assert abs(stage.mask.channel_sparsity - 0.5) <= len(groups) / groups.total_channels
    assert stage.train["steps"] == len(train_loader)
    _assert_pruned_zero(model, groups, stage.mask)
    # fine-tuning actually moved the kept weights
    w = model.get_submodule("layer1.0.conv1").weight
    assert not torch.equal(w, before["layer1.0.conv1.weight"])


def test_one_shot_with_data_criterion_and_round_to(data) -> None:
    train_loader, eval_loader = data
    set_seed(1)
    model = _tiny_cnn()
    groups = discover_groups(model)
    spec = PruneSpec(criterion="taylor", sparsity=0.6, allocation="global", num_batches=1, round_to=4)
    stage = one_shot(model, groups, spec, _train_fn(train_loader), 2, score_loader=eval_loader)[0]
    assert stage.scores.num_samples == 64
    for name, k in stage.mask.kept_counts.items():
        assert k % 4 == 0 or k == groups[name].size
    _assert_pruned_zero(model, groups, stage.mask)


def test_custom_train_loop_calling_after_step(data) -> None:
    """A hand-written train_fn: pruned channels stay zero only because after_step re-applies the mask."""
    train_loader, _ = data
    set_seed(2)
    model = _tiny_cnn()
    groups = discover_groups(model)
    calls = []

    def train_fn(m, epochs, after_step):
        opt = torch.optim.Adam(m.parameters(), lr=0.05)
        m.train()
        for _ in range(epochs):
            for x, y in train_loader:
                opt.zero_grad()
                nn.functional.cross_entropy(m(x), y).backward()
                opt.step()
                after_step(m)
                calls.append(1)
        return {"steps": len(calls)}

    stage = one_shot(model, groups, PruneSpec(sparsity=0.7), train_fn, finetune_epochs=2)[0]
    assert len(calls) == 2 * len(train_loader) == stage.train["steps"]
    _assert_pruned_zero(model, groups, stage.mask)


def test_progressive_masks_are_nested_and_reach_target(data) -> None:
    train_loader, eval_loader = data
    set_seed(3)
    model = _tiny_cnn()
    groups = discover_groups(model)
    spec = PruneSpec(criterion="activation", sparsity=0.6, allocation="global", num_batches=1)
    history = progressive(model, groups, spec, _train_fn(train_loader), finetune_epochs=3, stages=3, score_loader=eval_loader)
    assert [round(s.sparsity, 6) for s in history] == [0.2, 0.4, 0.6]
    for earlier, later in zip(history, history[1:]):
        assert later.mask.is_subset_of(earlier.mask)
        assert later.mask.channel_sparsity > earlier.mask.channel_sparsity
    for stage in history:
        assert abs(stage.mask.channel_sparsity - stage.sparsity) <= len(groups) / groups.total_channels
        assert stage.train["steps"] == len(train_loader)  # 3 epochs split over 3 stages
    _assert_pruned_zero(model, groups, history[-1].mask)
    with pytest.raises(ValueError, match="stages"):
        progressive(model, groups, spec, _train_fn(train_loader), 1, stages=0)


def test_rewind_restores_kept_weights_and_zeroes_pruned() -> None:
    set_seed(4)
    model = _tiny_cnn()
    groups = discover_groups(model)
    rewind_state = {k: v.clone() for k, v in _tiny_cnn().state_dict().items()}  # other init
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    rng = np.random.default_rng(0)
    mask = StructuredMask({g.name: rng.random(g.size) < 0.5 for g in groups})
    out = rewind(model, rewind_state, mask, groups)
    assert out is model
    _assert_state_equal(model, _expected_rewound(rewind_state, groups, mask))
    _assert_pruned_zero(model, groups, mask)


def test_lottery_without_training_keeps_rewind_weights(data) -> None:
    _, eval_loader = data
    set_seed(5)
    model = _tiny_cnn()
    groups = discover_groups(model)
    rewind_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # "training" moved the weights away from the rewind point
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    trained = copy.deepcopy(model)
    snapshots = []

    def train_fn(*_):
        raise AssertionError("epochs_per_round=0 must not train")

    spec = PruneSpec(criterion="l1", sparsity=0.75)
    history = lottery_ticket(model, groups, spec, train_fn, epochs_per_round=0, rounds=2, rewind_state=rewind_state,
                             evaluate_fn=lambda m: snapshots.append(copy.deepcopy(m.state_dict())) or {})
    assert len(history) == len(snapshots) == 2
    assert history[0].sparsity == pytest.approx(0.5)  # 1 - (1 - 0.75) ** (1/2)
    assert history[1].sparsity == pytest.approx(0.75)
    assert history[1].mask.is_subset_of(history[0].mask)
    assert abs(history[1].mask.channel_sparsity - 0.75) <= len(groups) / groups.total_channels
    for stage, snap in zip(history, snapshots):
        expected = _expected_rewound(rewind_state, groups, stage.mask)
        for k, v in snap.items():
            assert torch.equal(v, expected[k]), k
    _assert_state_equal(model, _expected_rewound(rewind_state, groups, history[-1].mask))
    # The first round scored the trained (perturbed) weights, not the rewind state.
    expected_scores = compute_importance("l1", trained, groups)
    for name in groups.names:
        np.testing.assert_array_equal(history[0].scores[name], expected_scores[name])


def test_lottery_default_rewind_state_is_entry_weights(data) -> None:
    train_loader, _ = data
    set_seed(6)
    model = _tiny_cnn()
    groups = discover_groups(model)
    entry = {k: v.clone() for k, v in model.state_dict().items()}
    history = lottery_ticket(model, groups, PruneSpec(sparsity=0.5), _train_fn(train_loader), epochs_per_round=0, rounds=1)
    _assert_state_equal(model, _expected_rewound(entry, groups, history[-1].mask))
    with pytest.raises(ValueError, match="rounds"):
        lottery_ticket(model, groups, PruneSpec(), _train_fn(train_loader), 0, rounds=0)


def test_measure_sensitivity_shapes_and_model_untouched(data) -> None:
    _, eval_loader = data
    set_seed(7)
    model = _tiny_cnn().train()
    groups = discover_groups(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = {g.name: np.random.default_rng(1).random(g.size) for g in groups}
    ratios = (0.25, 0.5, 0.9)
    sens = measure_sensitivity(model, groups, scores, eval_loader, ratios)
    assert model.training
    _assert_state_equal(model, before)
    assert sens.ratios == ratios and sens.num_samples == 64
    assert 0.0 <= sens.base_accuracy <= 1.0 and np.isfinite(sens.base_loss)
    assert set(sens.accuracy_drop) == set(sens.loss_increase) == set(groups.names)
    for name in groups.names:
        assert len(sens.accuracy_drop[name]) == len(sens.loss_increase[name]) == len(ratios)
        assert all(np.isfinite(v) for v in sens.loss_increase[name])
    score = sens.score()
    assert set(score) == set(groups.names) and all(v >= 0 for v in score.values())
    assert sens.to_dict()["ratios"] == list(ratios)
    for bad in ((0.0,), (1.0,), (0.5, 1.2)):
        with pytest.raises(ValueError, match="ratios"):
            measure_sensitivity(model, groups, scores, eval_loader, bad)


def test_sensitivity_allocation_in_select_mask(data) -> None:
    _, eval_loader = data
    set_seed(8)
    model = _tiny_cnn()
    groups = discover_groups(model)
    spec = PruneSpec(criterion="l2", sparsity=0.5, allocation="sensitivity", sensitivity_ratios=(0.5,))
    stage = select_mask(model, groups, spec, 0.5, sensitivity_loader=eval_loader)
    assert stage.sensitivity is not None
    assert abs(stage.mask.channel_sparsity - 0.5) <= len(groups) / groups.total_channels
    with pytest.raises(ValueError, match="sensitivity loader"):
        select_mask(model, groups, spec, 0.5)


def test_prune_command_writes_the_pruned_model_physically_smaller_with_the_same_outputs(tmp_path, capsys) -> None:
    """``fedprune prune --out`` saves the fine-tuned model twice: at full size with zeroed channels and extracted;
    the extracted twin, rebuilt from ``mask.npz``, gives the same outputs with fewer parameters."""
    import json

    from fedprune import cli
    from fedprune.config import load_config
    from fedprune.masks import extract_submodel

    tiny = ["data.dataset='synthetic'", "data.synthetic_train=160", "data.synthetic_test=64", "train.epochs=1",
            "pruning.finetune_epochs=1", "pruning.num_batches=1", "eval.latency=false", "train.threads=1", "pruning.sparsity=0.5"]
    defaults = tmp_path / "defaults.toml"
    defaults.write_text("")
    assert cli.main(["prune", "--config", str(defaults), "--out", str(tmp_path / "run"), "--set", *tiny]) == 0
    assert "50% channels pruned" in capsys.readouterr().out
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} == {"results.json", "mask.npz", "model_dense.pt", "model_masked.pt", "model_pruned.pt"}
    cfg = load_config(defaults, tiny)
    masked = get_model(cfg.model.name)
    masked.load_state_dict(torch.load(run / "model_masked.pt"))
    groups = discover_groups(masked)
    with np.load(run / "mask.npz") as arrays:
        mask = StructuredMask.from_arrays(dict(arrays), groups)
    pruned = extract_submodel(get_model(cfg.model.name), mask, groups)
    pruned.load_state_dict(torch.load(run / "model_pruned.pt"))
    x = torch.randn(4, 3, 32, 32)
    masked.eval(), pruned.eval()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked(x), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < 0.5 * sum(p.numel() for p in masked.parameters())
    assert json.loads((run / "results.json").read_text())["pruned"]["channel_sparsity"] == pytest.approx(0.5, abs=0.02)


def test_train_command_saves_the_dense_model_when_given_out(tmp_path, capsys) -> None:
    import json

    from fedprune import cli

    defaults = tmp_path / "defaults.toml"
    defaults.write_text("")
    tiny = ["data.dataset='synthetic'", "data.synthetic_train=160", "data.synthetic_test=64", "train.epochs=1", "train.threads=1"]
    assert cli.main(["train", "--config", str(defaults), "--out", str(tmp_path / "d"), "--set", *tiny]) == 0
    res = json.loads((tmp_path / "d" / "results.json").read_text())
    assert res["dense"]["epochs"] == 1 and 0.0 <= res["dense"]["accuracy"] <= 1.0
    model = get_model(res["config"]["model"]["name"])
    model.load_state_dict(torch.load(tmp_path / "d" / "model_dense.pt"))
    assert cli.main(["train", "--config", str(defaults), "--out", str(tmp_path / "d"), "--set", *tiny]) == 2  # a finished run stays
    assert "already holds a finished run" in capsys.readouterr().err
