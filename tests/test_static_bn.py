"""Static BN (HeteroFL) after the last round: pooled BatchNorm statistics of the final sub-networks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedprune.aggregation import pool_bn_stats
from fedprune.checkpoint import load_checkpoint
from fedprune.config import load_config
from fedprune.federated import FederatedPruning, InProcessTransport, simulate
from fedprune.masks import StructuredMask, extract_submodel
from fedprune.task import build_model, client_bn_stats, model_groups
from fedprune.training import evaluate
from fedprune.validation import InvalidReply, parse_bn_stats_reply, state_spec
from fedprune.records import state_to_record

from conftest import TINY

FLOAT = dict(dtype=torch.float64)


def test_pooled_statistics_follow_the_law_of_total_variance():
    a = {"bn.running_mean": torch.tensor([0.0, 1.0], **FLOAT), "bn.running_var": torch.tensor([1.0, 2.0], **FLOAT)}
    b = {"bn.running_mean": torch.tensor([2.0, 1.0], **FLOAT), "bn.running_var": torch.tensor([1.0, 4.0], **FLOAT)}
    out = pool_bn_stats([a, b], [1, 1])
    # Channel 0: means 0 and 2 -> 1; E[x^2] = ((1 + 0) + (1 + 4)) / 2 = 3 -> variance 3 - 1 = 2.
    # Channel 1: equal means -> the mean of the variances.
    assert torch.allclose(out["bn.running_mean"], torch.tensor([1.0, 1.0], **FLOAT))
    assert torch.allclose(out["bn.running_var"], torch.tensor([2.0, 3.0], **FLOAT))
    w = pool_bn_stats([a, b], [3, 1])  # weights are examples
    assert torch.allclose(w["bn.running_mean"], torch.tensor([0.5, 1.0], **FLOAT))
    assert torch.allclose(w["bn.running_var"], torch.tensor([(3 * 1 + 1 * 5) / 4 - 0.25, (3 * 2 + 4) / 4], **FLOAT))


def test_pooling_equals_one_pass_over_the_union():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(500, 3, generator=g, **FLOAT), 2 + 3 * torch.randn(300, 3, generator=g, **FLOAT)
    stats = [{"l.running_mean": x.mean(0), "l.running_var": x.var(0, unbiased=False)} for x in (x1, x2)]
    out = pool_bn_stats(stats, [500, 300])
    union = torch.cat([x1, x2])
    assert torch.allclose(out["l.running_mean"], union.mean(0))
    assert torch.allclose(out["l.running_var"], union.var(0, unbiased=False))


def test_pooling_refuses_bad_input():
    s = {"bn.running_mean": torch.zeros(2), "bn.running_var": torch.ones(2)}
    with pytest.raises(ValueError, match="one weight per"):
        pool_bn_stats([s, s], [1])
    with pytest.raises(ValueError, match="positive"):
        pool_bn_stats([s], [0])
    with pytest.raises(ValueError, match="mean/variance pairs"):
        pool_bn_stats([{"bn.running_mean": torch.zeros(2)}], [1])


def test_a_reply_with_negative_variances_or_too_many_examples_is_invalid():
    sent = {"bn.running_mean": torch.zeros(2), "bn.running_var": torch.ones(2)}
    spec = state_spec(sent)
    good = {"arrays": state_to_record(sent), "metrics": {"num-examples": 10}}
    stats, widths, n = parse_bn_stats_reply(good, spec, num_train=10)
    assert widths is None
    assert n == 10 and torch.equal(stats["bn.running_var"], sent["bn.running_var"])
    with pytest.raises(InvalidReply, match="num-examples"):
        parse_bn_stats_reply(good, spec, num_train=9)
    bad = {"arrays": state_to_record({**sent, "bn.running_var": torch.tensor([1.0, -1.0])}), "metrics": {"num-examples": 10}}
    with pytest.raises(InvalidReply, match="negative"):
        parse_bn_stats_reply(bad, spec, num_train=10)


def _expected_accuracy(cfg, ckpt, profile: str, server: FederatedPruning) -> float:
    """What static BN must give: every client holding the profile's mask measures the final
    sub-network's statistics (client_bn_stats), pooled by examples, evaluated on the test split."""
    groups = model_groups(cfg)
    mask = StructuredMask.from_arrays(ckpt["profile_masks"][profile], groups)
    model = build_model(cfg)
    model.load_state_dict(ckpt["state"])
    sub = extract_submodel(model, mask, groups)
    sub.load_state_dict({**sub.state_dict(), **ckpt["bn_stats"][mask.key()]})
    sub_state = sub.state_dict()
    pids = [pid for pid, p in ckpt["partition_profiles"].items() if p == profile]
    measured = [client_bn_stats(cfg, pid, cfg.federated.num_clients, mask, sub_state) for pid in pids]
    pooled = pool_bn_stats([s for s, _, _ in measured], [n for *_, n in measured])
    sub.load_state_dict({**sub_state, **pooled})
    return float(evaluate(sub, server.test_loader)["accuracy"])


def test_static_bn_pools_the_clients_statistics_of_the_final_subnetworks(tmp_path):
    """A finished run without static BN, resumed with it, evaluates every profile's final sub-network
    with the examples-weighted pool of its clients' statistics, one message per client."""
    cfg = load_config(None, [*TINY, "eval.static_bn=false"])
    plain = simulate(cfg, tmp_path, engine="inprocess")
    assert all(r["phase"] != "bn_calibration" for r in plain["rounds"])
    ckpt = load_checkpoint(tmp_path)
    on = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, static_bn=True))
    server = FederatedPruning(on, InProcessTransport(3), tmp_path)
    res = server.run(resume=True)  # only the final evaluation differs: the finished run is re-evaluated
    cal = res["rounds"][-1]
    assert cal["phase"] == "bn_calibration" and cal["round"] == 2
    assert cal["clients"] == 3 and cal["valid_replies"] == 3 and cal["failures"] == 0
    assert cal["calibrated_subnetworks"] == 3 and cal["uncalibrated_subnetworks"] == 0
    assert cal["bytes_down"] > 0 and 0 < cal["bytes_up"] < cal["bytes_down"] / 10  # statistics only come back
    # The resumed process registers the clients again, and the totals count both registrations.
    assert res["totals"]["registration_bytes_up"] == 2 * plain["totals"]["registration_bytes_up"]
    assert res["totals"]["bytes_up"] == plain["totals"]["bytes_up"] + plain["totals"]["registration_bytes_up"] + cal["bytes_up"]
    assert res["rounds"][:-1] == [{**r, "wall_s": r2["wall_s"]} for r, r2 in zip(plain["rounds"], res["rounds"])]
    for p in ("edge_gpu", "mobile_cpu", "microcontroller"):
        assert res["profiles"][p]["accuracy"] == pytest.approx(_expected_accuracy(cfg, ckpt, p, server), abs=1e-12)
    # The pooled statistics replaced those averaged in the last round, and the saved sub-networks are the evaluated ones.
    saved = torch.load(tmp_path / "subnetworks.pt")
    assert set(saved) == {"edge_gpu", "mobile_cpu", "microcontroller"}
    for p, mask in server.profile_masks.items():
        before, after = ckpt["bn_stats"][mask.key()], server.bn_stats[mask.key()]
        assert before.keys() == after.keys() and not all(torch.equal(before[k], after[k]) for k in before)
        evaluated = server.extracted(mask).state_dict()
        assert saved[p].keys() == evaluated.keys() and all(torch.equal(saved[p][k], evaluated[k]) for k in evaluated)


def test_dense_run_reports_the_calibrated_dense_model(tmp_path):
    cfg = load_config(None, TINY)
    res = simulate(cfg, tmp_path, engine="inprocess", mask_source="none")
    assert res["rounds"][-1]["phase"] == "bn_calibration" and res["rounds"][-1]["calibrated_subnetworks"] == 1
    assert "static BN" in res["dense"]["note"]
    # Every client holds the dense model: its profile entries are the same calibrated model.
    assert {e["accuracy"] for e in res["profiles"].values()} == {res["dense"]["accuracy"]}


def test_resume_still_refuses_a_config_that_changes_the_steps(tmp_path):
    from fedprune.checkpoint import CheckpointError

    cfg = load_config(None, TINY)
    simulate(cfg, tmp_path, engine="inprocess")
    other = load_config(None, [*TINY, "train.lr=0.01"])
    with pytest.raises(CheckpointError, match="different config"):
        FederatedPruning(other, InProcessTransport(3), tmp_path).run(resume=True)


def test_static_bn_also_pools_the_statistics_of_adaptive_widths(tmp_path):
    """Dynamic method 'widths': the narrower widths' BatchNorm statistics are measured on the final
    sub-network and pooled like the sub-network's own."""
    cfg = load_config(None, [*TINY, "eval.static_bn=false", "dynamic.enabled=true", "dynamic.method='widths'",
                             "dynamic.widths=[0.5, 1.0]", "dynamic.thresholds=[0.6]"])
    simulate(cfg, tmp_path, engine="inprocess")
    ckpt = load_checkpoint(tmp_path)
    on = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, static_bn=True))
    server = FederatedPruning(on, InProcessTransport(3), tmp_path)
    res = server.run(resume=True)
    assert res["rounds"][-1]["calibrated_subnetworks"] == 3
    groups = model_groups(cfg)
    for profile, pid in ((p, pid) for pid, p in ckpt["partition_profiles"].items()):  # one client per profile
        mask = StructuredMask.from_arrays(ckpt["profile_masks"][profile], groups)
        before = ckpt["gates"][mask.key()]
        model = build_model(cfg)
        model.load_state_dict(ckpt["state"])
        sub = extract_submodel(model, mask, groups)
        sub.load_state_dict({**sub.state_dict(), **ckpt["bn_stats"][mask.key()]})
        _, widths, _ = client_bn_stats(cfg, pid, 3, mask, sub.state_dict(), before)
        after = server.gates[mask.key()]
        assert widths and set(widths) < set(after)
        for k, v in widths.items():
            assert torch.allclose(after[k], v) and not torch.equal(after[k], before[k]), k
        assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("order."))
    assert "dynamic" in res["profiles"]["mobile_cpu"]


def test_pruned_accuracy_gives_a_subnetwork_the_statistics_static_bn_gives(tmp_path):
    """pruned_accuracy (the benchmark's before-fine-tuning diagnostic): with ``bn_partitions`` it equals what the
    run's static BN reports for the same weights; without, it keeps the dense model's statistics."""
    import numpy as np

    from fedprune.data import make_loader
    from fedprune.task import load_data, pruned_accuracy

    cfg = load_config(None, TINY)
    res = simulate(cfg, tmp_path, engine="inprocess", mask_source="none")
    state = torch.load(tmp_path / "global_model.pt")
    kept = {k: v.clone() for k, v in state.items()}
    groups = model_groups(cfg)
    assert pruned_accuracy(cfg, state, StructuredMask.dense(groups), bn_partitions=cfg.federated.num_clients) == pytest.approx(
        res["dense"]["accuracy"], abs=1e-12)
    half = StructuredMask.from_scores({g.name: -np.arange(g.size, dtype=float) for g in groups}, {g.name: g.size // 2 for g in groups})
    model = build_model(cfg)
    model.load_state_dict(state)
    sub = extract_submodel(model, half, groups)
    test_loader = make_loader(load_data(cfg)[1], 256, train=False)
    assert pruned_accuracy(cfg, state, half) == evaluate(sub, test_loader)["accuracy"]
    measured = [client_bn_stats(cfg, pid, cfg.federated.num_clients, half, sub.state_dict()) for pid in range(cfg.federated.num_clients)]
    sub.load_state_dict({**sub.state_dict(), **pool_bn_stats([s for s, _, _ in measured], [n for *_, n in measured])})
    assert pruned_accuracy(cfg, state, half, bn_partitions=cfg.federated.num_clients) == evaluate(sub, test_loader)["accuracy"]
    assert all(torch.equal(state[k], kept[k]) for k in kept)  # the dense state is left as it was
