"""Federated consensus pruning: aggregation math, client work, and tiny end-to-end runs."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from fedprune.aggregation import aggregate_importance, mask_agreement, normalize_scores, screen_clients
import fedprune.federated as federated_mod
from fedprune.config import ConfigError, load_config
from fedprune.data import make_loader
from fedprune.federated import FederatedPruning, InProcessTransport, simulate
from fedprune.groups import discover_groups
from fedprune.importance import compute_importance
from fedprune.masks import StructuredMask, extract_submodel, extraction_index_map, slice_state
from fedprune.records import config_to_record, record_to_config, recorddict_nbytes, state_to_record
from fedprune.task import (CLIENT_SCORE_SUBSET, build_model, client_importance, client_register, client_seed, client_shard, client_train,
                           load_data, model_groups, submodel)
from fedprune.training import set_seed

from conftest import TINY


# ------------------------------------------------------------ aggregation
def test_aggregation_math_on_hand_made_vectors():
    a = {"g": np.array([1.0, 2.0, 3.0])}       # mean 2 -> [0.5, 1, 1.5]
    b = {"g": np.array([3.0, 3.0, 0.0])}       # mean 2 -> [1.5, 1.5, 0]
    c = {"g": np.array([0.0, 0.0, 30.0])}      # mean 10 -> [0, 0, 3]
    assert np.allclose(normalize_scores(a)["g"], [0.5, 1.0, 1.5])
    mean = aggregate_importance([a, b], weights=[1, 3], method="mean")["g"]
    assert np.allclose(mean, (np.array([0.5, 1, 1.5]) + 3 * np.array([1.5, 1.5, 0])) / 4)
    assert np.allclose(aggregate_importance([a, b, c], method="median")["g"], [0.5, 1.0, 1.5])
    # trim 1 of 3 at each end with fraction 0.34 -> the median
    assert np.allclose(aggregate_importance([a, b, c], method="trimmed_mean", trim_fraction=0.34)["g"], [0.5, 1.0, 1.5])
    # rank vote: ranks a=[0, .5, 1]; b=[.75, .75, 0] (channels 0 and 1 tie and share ranks 1 and 2 of 0..2)
    votes = aggregate_importance([a, a, b], method="rank_vote")["g"]
    assert np.allclose(votes, [0.25, 1.75 / 3, 2 / 3])
    with pytest.raises(ValueError, match="unknown aggregation 'avg'"):
        aggregate_importance([a], method="avg")


def test_clients_that_cannot_tell_channels_apart_cast_no_rank_vote():
    """A constant score vector ranks every channel 0.5: under rank_vote it cannot outvote the clients that do
    rank the channels; screening gives it agreement 0 and leaves it out of the reference, so it neither hides
    an adversary nor passes as honest."""
    honest = [{"g": np.array([1.0, 2.0, 3.0, 4.0, 5.0])}, {"g": np.array([1.5, 2.0, 2.5, 4.5, 5.0])}]
    blank = [{"g": np.zeros(5)} for _ in range(3)]
    votes = aggregate_importance(honest + blank, method="rank_vote")["g"]
    assert np.allclose(votes[[0, 4]], [(0 + 0 + 3 * 0.5) / 5, (1 + 1 + 3 * 0.5) / 5])
    assert np.argsort(votes).tolist() == [0, 1, 2, 3, 4]
    kept, agreement = screen_clients(honest + blank)
    assert kept == [0, 1, 2, 3, 4] and agreement[2:] == [0.0] * 3  # median agreement 0: nothing to screen against
    rng = np.random.default_rng(0)
    honest = [{"g": np.arange(8.0) + rng.normal(0, 0.5, 8)} for _ in range(4)]
    inverted = {"g": 7.0 - np.arange(8.0)}
    kept, agreement = screen_clients(honest + [inverted, {"g": np.zeros(8)}])
    assert kept == [0, 1, 2, 3] and agreement[4] < 0 and agreement[5] == 0.0


def test_robust_aggregators_resist_one_inverted_client():
    rng = np.random.default_rng(0)
    honest = [{"g": np.linspace(1, 2, 20) + rng.normal(0, 0.01, 20)} for _ in range(4)]
    poisoned = {"g": 1000.0 / np.linspace(1, 2, 20)}
    for method in ("median", "trimmed_mean", "rank_vote"):
        agg = aggregate_importance(honest + [poisoned], method=method, trim_fraction=0.2)["g"]
        assert np.argsort(agg)[-5:].tolist() == list(range(15, 20)), method


def test_mask_agreement_is_one_for_identical_clients():
    scores = {"g": np.arange(10.0)}
    mask = StructuredMask.from_scores(scores, {"g": 4})
    assert mask_agreement([scores, scores], mask) == [1.0, 1.0]


# ------------------------------------------------------------ client work
def test_config_travels_in_records(tiny_cfg):
    back = record_to_config(config_to_record(tiny_cfg))
    assert back == tiny_cfg


def test_client_that_does_not_train_returns_its_weights_unchanged(tiny_cfg):
    groups = model_groups(tiny_cfg)
    model = build_model(tiny_cfg)
    scores = {g.name: np.random.default_rng(1).random(g.size) for g in groups}
    mask = StructuredMask.from_scores(scores, {g.name: g.size // 2 for g in groups})
    sub = slice_state(model.state_dict(), extraction_index_map(model, mask, groups))
    state, metrics, _ = client_train(tiny_cfg, 0, 3, mask, sub, epochs=0, batch_size=32, round_num=1)
    assert metrics["num-examples"] == client_register(tiny_cfg, 0, 3)["num-train"]
    for k, v in sub.items():
        if not k.endswith(("running_mean", "running_var")):  # BN statistics are recomputed (static BN)
            assert torch.equal(state[k], v), k


def test_byte_accounting_matches_serialised_size(tiny_cfg):
    model = build_model(tiny_cfg)
    from flwr.app import RecordDict

    rd = RecordDict({"arrays": state_to_record(model.state_dict())})
    n_bytes = recorddict_nbytes(rd)
    payload = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert payload <= n_bytes <= payload * 1.01 + 4096


# ------------------------------------------------------------ end to end
def test_tiny_inprocess_run_schema_and_invariants(tiny_run, tiny_cfg):
    res, out = tiny_run
    for key in ("config", "dense", "profiles", "rounds", "consensus", "totals", "summary"):
        assert key in res
    assert set(res["profiles"]) == {"edge_gpu", "mobile_cpu", "microcontroller"}
    for name, p in res["profiles"].items():
        for key in ("channel_sparsity", "params", "flops", "accuracy", "clients", "kept_channels"):
            assert key in p, (name, key)
        assert abs(p["channel_sparsity"] - tiny_cfg.profiles[name].sparsity) < 0.02
        assert p["params"] < res["dense"]["params"] and p["flops"] < res["dense"]["flops"]
    phases = [r["phase"] for r in res["rounds"]]
    assert phases == ["warmup", "importance", "finetune", "bn_calibration"]  # static BN after the last round
    for r in res["rounds"]:
        for key in ("round", "phase", "wall_s", "bytes_up", "bytes_down", "clients", "failures"):
            assert key in r
    warm, imp = res["rounds"][0], res["rounds"][1]
    dense_round = warm["bytes_up"] + warm["bytes_down"]
    # the importance round counts the delivery of the dense model (an evaluate message the clients cache): about
    # half a dense round, which also sends the model back; the score messages alone are under 1% of one
    delivery = imp["model_delivery_bytes_down"] + imp["model_delivery_bytes_up"]
    assert 0.45 < delivery / dense_round < 0.55 and imp["bytes_down"] > imp["model_delivery_bytes_down"]
    assert imp["bytes_up"] + imp["bytes_down"] - delivery < 0.01 * dense_round
    totals = res["totals"]  # every message: the rounds', registration and the final evaluation
    for way in ("up", "down"):
        assert totals[f"final_evaluation_bytes_{way}"] > 0 and totals[f"registration_bytes_{way}"] > 0
        assert totals[f"bytes_{way}"] == (sum(r[f"bytes_{way}"] for r in res["rounds"]) + totals[f"registration_bytes_{way}"]
                                          + totals[f"final_evaluation_bytes_{way}"])
    assert res["consensus"]["nested"] and res["consensus"]["clients"] == 3
    # masks on disk are nested: microcontroller ⊆ mobile_cpu ⊆ edge_gpu
    z = np.load(out / "masks.npz")
    groups = model_groups(tiny_cfg).names
    masks = {p: StructuredMask({g: z[f"{p}/{g}"] for g in groups}) for p in res["profiles"]}
    assert masks["microcontroller"].is_subset_of(masks["mobile_cpu"])
    assert masks["mobile_cpu"].is_subset_of(masks["edge_gpu"])
    for f in ("results.json", "rounds.csv", "global_model.pt", "subnetworks.pt", "accuracy_per_round.png", "accuracy_vs_flops.png", "kept_channels.png"):
        assert (out / f).is_file(), f
    assert json.loads((out / "results.json").read_text())["summary"] == res["summary"]


def test_same_seed_same_numbers(tiny_run, tiny_cfg, tmp_path):
    res, _ = tiny_run
    again = simulate(tiny_cfg, tmp_path, engine="inprocess")
    assert again["profiles"] == res["profiles"]
    timings = ("wall_s", "simulated_round_s")
    strip = lambda rounds: [{k: v for k, v in r.items() if k not in timings} for r in rounds]  # noqa: E731
    assert strip(again["rounds"]) == strip(res["rounds"])


def test_local_and_random_mask_baselines_run(tiny_cfg, tmp_path):
    for source in ("local", "random"):
        run = FederatedPruning(tiny_cfg, InProcessTransport(3), tmp_path / source, mask_source=source)
        res = run.run()
        assert res["mask_source"] == source and set(res["profiles"]) == {"edge_gpu", "mobile_cpu", "microcontroller"}
        # per-round accuracy and the saved sub-networks are those the clients train: with local masks, each client's own
        named = {name: m for ms in run.evaluated_masks().values() for name, m in ms.items()}
        trained = {run._mask_for(n).key() for n in run.nodes}
        assert {m.key() for m in named.values()} == trained
        if source == "local":
            assert sorted(named) == sorted(f"{i.profile}/client-{i.partition_id}" for i in run.nodes.values())
        assert set(torch.load(tmp_path / source / "subnetworks.pt")) == set(named)
        assert set(res["rounds"][-2]["accuracy"]) == set(res["profiles"])  # the last fine-tune round was evaluated
    dense = FederatedPruning(tiny_cfg, InProcessTransport(3), None, mask_source="none").run()
    assert dense["profiles"] == {} or all(p["channel_sparsity"] == 0 for p in dense["profiles"].values())
    assert [r["phase"] for r in dense["rounds"]] == ["dense", "dense", "bn_calibration"]


def test_scoring_the_last_warmup_model_sends_no_model():
    """federated.score_model = "last_warmup": the clients keep the model of the last warm-up round's train message,
    and the importance round after it scores that model without sending it: configs and score vectors only."""
    l2 = TINY + ["pruning.criterion='l2'"]
    cfg = load_config(None, l2 + ["federated.warmup_rounds=2", "federated.score_model='last_warmup'"])
    fp = FederatedPruning(cfg, InProcessTransport(3), None)
    res = fp.run()
    last_warmup, imp = res["rounds"][1], res["rounds"][2]
    assert (last_warmup["phase"], imp["phase"]) == ("warmup", "importance")
    assert imp["model_delivery_bytes_down"] == 0 and imp["scored_model_version"] == 1  # the input of the 2nd warm-up round
    assert imp["bytes_down"] + imp["bytes_up"] < 0.01 * (last_warmup["bytes_down"] + last_warmup["bytes_up"])
    assert fp.warmup_input is None  # dropped once scored
    # With a weight-only criterion, the masks are those of a run whose warm-up ends a round earlier and scores its
    # current model; the server's own scoring (mask source "central") scores the same model.
    one_round = FederatedPruning(load_config(None, l2), InProcessTransport(3), None)
    one_round.run()
    assert one_round.rounds[1]["scored_model_version"] == 1
    central = FederatedPruning(cfg, InProcessTransport(3), None, mask_source="central")
    central.run()
    for p, m in fp.profile_masks.items():
        assert m == one_round.profile_masks[p] and m == central.profile_masks[p]
    # Sampled rounds: the importance round asks the clients that hold the model, so nobody needs it sent.
    sampled = load_config(None, l2 + ["federated.warmup_rounds=2", "federated.score_model='last_warmup'", "federated.clients_per_round=2"])
    imp = FederatedPruning(sampled, InProcessTransport(3), None).run()["rounds"][2]
    assert imp["clients"] == 2 and imp["bytes_down"] < 0.01 * last_warmup["bytes_down"]
    with pytest.raises(ConfigError, match=r"'federated.score_model' = 'last_warmup' needs a warm-up round.*warmup_rounds = 0"):
        load_config(None, TINY + ["federated.warmup_rounds=0", "federated.score_model='last_warmup'"])
    with pytest.raises(ConfigError, match=r"'federated.score_model' = 'latest' is not allowed; choose one of \['current', 'last_warmup'\]"):
        load_config(None, TINY + ["federated.score_model='latest'"])


def test_central_mask_source_scores_pooled_client_data(tiny_cfg):
    """Mask source "central" (the centralized-mask baseline): with a weight-only criterion every client's scores equal
    the pooled ones, so its masks and results equal the consensus run's; with Taylor the server's pooled scores are
    the same criterion on the union of the clients' scoring images, seeded."""
    from fedprune.task import central_importance, client_importance

    l2 = load_config(None, TINY + ["pruning.criterion='l2'"])
    runs = {src: FederatedPruning(l2, InProcessTransport(3), None, mask_source=src) for src in ("consensus", "central")}
    res = {src: fp.run() for src, fp in runs.items()}
    assert res["central"]["mask_source"] == "central" and res["central"]["consensus"]["nested"]
    assert all(runs["central"].profile_masks[p] == runs["consensus"].profile_masks[p] for p in runs["consensus"].profile_masks)
    assert res["central"]["profiles"] == res["consensus"]["profiles"]

    state = build_model(tiny_cfg).state_dict()
    rng = torch.get_rng_state()
    pooled, sens = central_importance(tiny_cfg, 3, state, False)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG stream does not move
    again, _ = central_importance(tiny_cfg, 3, state, False)
    local = client_importance(tiny_cfg, 0, 3, state, "taylor", 1, False, (0.5,))["scores"]
    assert sens is None and set(pooled) == set(model_groups(tiny_cfg).names)
    assert all(np.array_equal(pooled[g], again[g]) and pooled[g].shape == local[g].shape for g in pooled)
    assert any(not np.allclose(pooled[g], local[g]) for g in pooled)  # not one client's view
    _, sens = central_importance(tiny_cfg, 3, state, True)
    assert set(sens) == set(model_groups(tiny_cfg).names)


def test_reconstruction_consensus_averages_the_clients_orders():
    """Criterion "reconstruction": each client sends its places in the greedy order (a C-vector per group, as any
    criterion); the consensus ranks by their sample-weighted mean and the masks stay nested."""
    from fedprune.aggregation import aggregate_importance
    from fedprune.task import client_importance

    cfg = load_config(None, TINY + ["pruning.criterion='reconstruction'", "federated.aggregation='mean'"])
    fp = FederatedPruning(cfg, InProcessTransport(3), None)
    res = fp.run()
    assert res["consensus"]["criterion"] == "reconstruction" and res["consensus"]["nested"]
    groups = model_groups(cfg)
    sent = client_importance(cfg, 0, 3, build_model(cfg).state_dict(), "reconstruction", 1, False, (0.5,))["scores"]
    assert set(sent) == set(groups.names) and all(sent[g.name].shape == (g.size,) and sent[g.name].max() == 1.0 for g in groups)
    mean = aggregate_importance([sent, sent], [1, 3], "mean", 0.0)
    assert all(np.array_equal(np.argsort(-mean[g], kind="stable"), np.argsort(-sent[g], kind="stable")) for g in sent)


def test_progressive_federated_pruning_and_sensitivity_allocation():
    prog = load_config(None, TINY + ["federated.finetune_rounds=4", "federated.repeat_every=2", "federated.aggregation='rank_vote'"])
    res = FederatedPruning(prog, InProcessTransport(3)).run()
    assert [r["phase"] for r in res["rounds"]].count("importance") == 2
    assert [c["sparsity_scale"] for c in res["consensus_history"]] == [0.5, 1.0]
    for name, p in res["profiles"].items():
        assert abs(p["channel_sparsity"] - prog.profiles[name].sparsity) < 0.02
    sens = load_config(None, TINY + ["pruning.allocation='sensitivity'", "pruning.sensitivity_ratios=[0.5]"])
    res = FederatedPruning(sens, InProcessTransport(3)).run()
    assert res["consensus"]["allocation"] == "sensitivity" and res["consensus"]["nested"]
    kept = {p: sum(v["kept_channels"].values()) for p, v in res["profiles"].items()}
    assert kept["microcontroller"] < kept["mobile_cpu"] < kept["edge_gpu"]


@pytest.mark.parametrize("overrides, expected", [
    ([], [(2, 1.0)]),                                                       # one-shot
    (["federated.repeat_every=2"], [(2, 1 / 3), (4, 2 / 3), (6, 1.0)]),      # stages fill the fine-tuning
    (["federated.repeat_every=1", "federated.prune_stages=3"], [(2, 1 / 3), (3, 2 / 3), (4, 1.0)]),  # last masks train in rounds 3-6
    (["federated.repeat_every=2", "federated.prune_stages=2"], [(2, 0.5), (4, 1.0)]),
])
def test_progressive_plan_places_the_stages(overrides, expected):
    """Importance+consensus steps (round, share of the profiles' sparsity): one every repeat_every fine-tune
    rounds, as many as prune_stages (0: all that fit); the last masks train from the last stage's round on."""
    cfg = load_config(None, TINY + ["federated.warmup_rounds=1", "federated.finetune_rounds=6", *overrides])
    plan = FederatedPruning(cfg, InProcessTransport(3), None).plan()
    assert [(r, pytest.approx(s)) for kind, r, s in plan if kind == "importance"] == expected
    assert [r for kind, r, _ in plan if kind == "finetune"] == [2, 3, 4, 5, 6, 7]
    with pytest.raises(ConfigError, match=r"'federated.prune_stages' = 2 needs progressive pruning \(federated.repeat_every.*allowed 0 or 1"):
        load_config(None, TINY + ["federated.prune_stages=2"])
    with pytest.raises(ConfigError, match=r"'federated.prune_stages' = 4 does not fit.*at most 3 stage\(s\); allowed: 0 \(as many as fit\) to 3"):
        load_config(None, TINY + ["federated.finetune_rounds=6", "federated.repeat_every=2", "federated.prune_stages=4"])


def test_profiles_nest_in_file_order_and_profiles_without_clients_are_left_out(tmp_path):
    """A profile of one's own, listed in the profiles file between mobile_cpu and microcontroller, gets its own
    budget's width there (not cut within the microcontroller's, as an order by name did); a profile with no client
    gets no mask, no per-round accuracy and no budget check (its budget here is infeasible)."""
    budgets = {"edge_gpu": 1000, "mobile_cpu": 20e6, "wearable": 12e6, "microcontroller": 6e6}
    (tmp_path / "profiles.toml").write_text("".join(f"[{name}]\nsparsity = 0.5\nlocal_epochs = 1\n[{name}.budgets]\nmacs = {macs:.0f}\n"
                                                    for name, macs in budgets.items()))
    cfg = load_config(None, TINY + [f"federated.profiles_file='{tmp_path / 'profiles.toml'}'", "pruning.allocation='budget'",
                                    "federated.proportions={edge_gpu=0, mobile_cpu=0.34, wearable=0.33, microcontroller=0.33}"])
    server = FederatedPruning(cfg, InProcessTransport(3), None)
    assert server.profiles == ["mobile_cpu", "wearable", "microcontroller"]
    res = server.run()
    assert list(res["profiles"]) == ["mobile_cpu", "wearable", "microcontroller"]
    macs = {p: e["macs"] for p, e in res["profiles"].items()}
    assert macs["microcontroller"] <= 6e6 < macs["wearable"] <= 12e6 < macs["mobile_cpu"] <= 20e6
    masks = server.profile_masks
    assert set(masks) == {"mobile_cpu", "wearable", "microcontroller"}
    assert masks["microcontroller"].is_subset_of(masks["wearable"]) and masks["wearable"].is_subset_of(masks["mobile_cpu"])
    assert all(set(r["accuracy"]) == set(masks) for r in res["rounds"] if r["phase"] == "finetune")


def test_a_profile_listed_below_a_tighter_one_is_warned_about(tmp_path, caplog):
    """Listed after the microcontroller, a profile with a looser budget is cut within the microcontroller's
    sub-network (the file's order is the capability order); the log says so."""
    budgets = {"edge_gpu": 40e6, "mobile_cpu": 20e6, "microcontroller": 6e6, "wearable": 12e6}
    (tmp_path / "profiles.toml").write_text("".join(f"[{name}]\nsparsity = 0.5\nlocal_epochs = 1\n[{name}.budgets]\nmacs = {macs:.0f}\n"
                                                    for name, macs in budgets.items()))
    cfg = load_config(None, TINY + [f"federated.profiles_file='{tmp_path / 'profiles.toml'}'", "pruning.allocation='budget'",
                                    "federated.warmup_rounds=0", "federated.finetune_rounds=0",
                                    "federated.proportions={edge_gpu=0, mobile_cpu=0.34, wearable=0.33, microcontroller=0.33}"])
    server = FederatedPruning(cfg, InProcessTransport(3), None)
    with caplog.at_level("WARNING", logger="fedprune.server"):
        server.run()
    assert server.profile_masks["wearable"] == server.profile_masks["microcontroller"]
    assert "profile wearable gets the same sub-network as microcontroller, listed above it" in caplog.text


def test_dry_run_describes_the_run_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """simulate --dry-run: every client with its profile and shard (as the clients cut them), the steps by round; no
    round runs and nothing is written. The checks a run makes first still apply."""
    from fedprune import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(federated_mod, "simulate", lambda *a, **k: pytest.fail("a dry run runs nothing"))
    monkeypatch.setattr(FederatedPruning, "run", lambda *a, **k: pytest.fail("a dry run runs nothing"))
    argv = ["simulate", "--dry-run", "--set", *TINY, "federated.finetune_rounds=4", "federated.repeat_every=2"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    cfg = load_config(None, TINY + ["federated.finetune_rounds=4", "federated.repeat_every=2"])
    for pid in range(3):
        node = client_register(cfg, pid, 3)
        assert f"  {node['profile']}: 1 client(s) (partitions {pid}), {node['num-train']} train / {node['num-val']} validation" in text
    steps = text.split("steps:\n")[1].splitlines()
    assert steps[:5] == ["  round 1: dense FedAvg warm-up",
                         "  round 2: importance round + consensus masks (progressive stage: sparsity x 0.50)",
                         "  rounds 2-3: fine-tuning of the profiles' sub-networks",
                         "  round 4: importance round + consensus masks",
                         "  rounds 4-5: fine-tuning of the profiles' sub-networks"]
    assert "dry run: no round was run and no run directory was written" in text and list(tmp_path.iterdir()) == []
    assert cli.main(argv + ["--mask-source", "none"]) == 0
    assert "  rounds 1-5: dense FedAvg\n" in capsys.readouterr().out
    # a budget no sub-network meets fails here as it would before a run's first round
    assert cli.main(argv + ["pruning.allocation='budget'", "profiles.mobile_cpu.budgets={macs=1000}"]) == 2
    assert "macs (profile mobile_cpu): smallest achievable cost" in capsys.readouterr().err
    assert cli.main(["simulate", "--set", *TINY]) == 2  # without --dry-run, --out or --resume is needed
    assert "simulate needs --out DIR" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    # --out and --warm-start are checked as a run checks them, and nothing is removed
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "results.json").write_text("{}")
    assert cli.main(argv + ["--out", str(tmp_path / "done")]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert cli.main(argv + ["--out", str(tmp_path / "done"), "--overwrite"]) == 0
    assert (tmp_path / "done" / "results.json").read_text() == "{}"
    assert cli.main(argv + ["--warm-start", str(tmp_path / "missing")]) == 2
    assert "cannot warm-start: run directory" in capsys.readouterr().err


@pytest.mark.parametrize("mask_source", ["consensus", "local", "central"])
def test_progressive_stages_score_and_keep_the_network_still_held(mask_source):
    """A later stage of progressive pruning scores the union of the clients' sub-networks, delivered as that
    (smaller) sub-network, and its masks stay inside it: a channel no client trained does not come back."""
    cfg = load_config(None, TINY + ["federated.finetune_rounds=4", "federated.repeat_every=2", "data.synthetic_train=320",
                                    "pruning.allocation='sensitivity'", "pruning.sensitivity_ratios=[0.5]"])
    fp = FederatedPruning(cfg, InProcessTransport(3), mask_source=mask_source)
    stages, calls = [], []
    build, score = fp.build_masks, federated_mod.central_importance

    def spy(*args, **kwargs):
        stages.append((fp.scope(), dict(fp.node_masks)))
        build(*args, **kwargs)

    def central_spy(*args, **kwargs):
        calls.append(args[-1] if len(args) > 5 else kwargs.get("scope"))
        return score(*args, **kwargs)

    fp.build_masks = spy
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(federated_mod, "central_importance", central_spy)
        res = fp.run()
    assert len(stages) == 2 and stages[0][0] == StructuredMask.dense(fp.groups)  # stage 1 scores the dense model
    held = stages[1][0]
    assert held == functools.reduce(StructuredMask.union, stages[1][1].values()) and held.channel_sparsity > 0
    assert all(m.is_subset_of(held) for m in [*fp.profile_masks.values(), *fp.node_masks.values()])
    first, second = [r for r in res["rounds"] if r["phase"] == "importance"]
    assert 0 < second["model_delivery_bytes_down"] < first["model_delivery_bytes_down"]  # a smaller network travels
    assert [c["scored_channel_sparsity"] for c in res["consensus_history"]] == [0.0, pytest.approx(held.channel_sparsity)]
    assert all(c["nested"] for c in res["consensus_history"])
    # Only the sub-networks in use (and the dense model) keep BatchNorm statistics: stage 1's are gone.
    assert set(fp.bn_stats) <= {m.key() for m in fp.node_masks.values()} | {StructuredMask.dense(fp.groups).key()}
    for name, p in res["profiles"].items():  # each profile ends at its sparsity, though allocated inside what was left
        assert abs(p["channel_sparsity"] - cfg.profiles[name].sparsity) < 0.02, name
    if mask_source == "central":
        assert calls[0] is None or calls[0].channel_sparsity == 0.0
        assert calls[1] == held
    for p in res["profiles"].values():
        assert p["accuracy"] == p["accuracy"]  # the run finishes with every profile evaluated


def test_a_sub_network_is_scored_as_extracted_and_placed_in_the_original_index_space(tiny_cfg):
    """A client given a sub-network (progressive pruning) scores it physically extracted: its channels get the
    extracted network's scores, the others 0; sensitivity is the sub-network's."""
    groups = model_groups(tiny_cfg)
    torch.manual_seed(3)
    dense = build_model(tiny_cfg)
    rng = np.random.default_rng(1)
    scope = StructuredMask({g.name: rng.random(g.size) < 0.5 for g in groups})
    sub_state = {k: v for k, v in extract_submodel(dense, scope, groups).state_dict().items() if v.is_floating_point()}
    out = client_importance(tiny_cfg, 0, 3, sub_state, "taylor", 1, True, (0.5,), 5, scope)
    again = client_importance(tiny_cfg, 0, 3, sub_state, "taylor", 1, True, (0.5,), 5, scope)
    dense_out = client_importance(tiny_cfg, 0, 3, dense.state_dict(), "taylor", 1, True, (0.5,), 5)
    sub = submodel(tiny_cfg, scope, sub_state)
    train, _ = load_data(tiny_cfg)
    set_seed(client_seed(tiny_cfg, 0, 5))
    loader = make_loader(train.subset(client_shard(tiny_cfg, 0, 3).train_idx[:CLIENT_SCORE_SUBSET]), tiny_cfg.train.batch_size, train=False)
    direct = compute_importance("taylor", sub, discover_groups(sub), loader, 1)
    for g in groups:
        np.testing.assert_array_equal(out["scores"][g.name][scope.kept(g.name)], direct[g.name])
        np.testing.assert_array_equal(out["scores"][g.name][scope.pruned(g.name)], 0.0)
        np.testing.assert_array_equal(out["scores"][g.name], again["scores"][g.name])
    assert set(out["sensitivity"]) == set(groups.names) and out["sensitivity"] != dense_out["sensitivity"]


def test_acting_config_ignores_dynamic_settings_only_while_dynamic_pruning_is_off(tiny_cfg):
    """A run finished before a ``dynamic`` key was added (or its default changed) is still the same run when
    dynamic pruning is off, so restarts and benchmarks reuse it; with it on, every dynamic key counts."""
    from fedprune.config import config_to_dict
    from fedprune.federated import MASK_SOURCES, acting_config, without_final_eval
    from fedprune.sweep import MASK_SOURCES_SWEEP

    now = config_to_dict(tiny_cfg)
    old = json.loads(json.dumps(now))
    del old["dynamic"]["exit_rule"]
    old["dynamic"]["thresholds"] = [0.5, 0.7, 0.9]
    assert acting_config(old) == acting_config(now) and without_final_eval(old) == without_final_eval(now)
    assert old != now and now["dynamic"]["exit_rule"] == "margin"  # the input is not changed
    on = load_config(None, TINY + ["dynamic.enabled=true"])
    on_old = json.loads(json.dumps(config_to_dict(on)))
    on_old["dynamic"]["thresholds"] = [0.5, 0.7, 0.9]
    assert acting_config(on_old) != acting_config(config_to_dict(on))
    on_torch = json.loads(json.dumps(config_to_dict(on)))
    on_torch["dynamic"]["latency_runtime"] = "torch"  # where the final report times latency: not a different run
    assert without_final_eval(on_torch) == without_final_eval(config_to_dict(on))
    assert acting_config(now)["pruning"] == now["pruning"]
    assert MASK_SOURCES_SWEEP == MASK_SOURCES  # the sweep module lists them without importing Flower
