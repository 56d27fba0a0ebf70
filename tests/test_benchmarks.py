"""The committed benchmark tables can be written again from their JSON (``--render-only``): the report code
still reads what the runs wrote, and the tables say what the JSON holds. Nothing is trained or timed."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "simulation" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script, table", [("bench_dynamic", "dynamic"), ("bench_hardware", "hardware")])
def test_render_only_rewrites_the_committed_table(script: str, table: str, tmp_path, monkeypatch) -> None:
    shutil.copy(ROOT / "benchmarks" / f"{table}.json", tmp_path / f"{table}.json")
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    assert _script(script).main(["--render-only", "--out", str(tmp_path), "--data-dir", str(tmp_path / "no-data-here")]) == 0
    assert (tmp_path / f"{table}.md").read_text() == (ROOT / "benchmarks" / f"{table}.md").read_text()


def test_bench_federated_skipping_every_part_rewrites_the_committed_table(tmp_path, monkeypatch) -> None:
    """With ``--skip accuracy cost scale traffic`` nothing runs; the data dir, seeds and rounds come from the saved runs."""
    shutil.copy(ROOT / "benchmarks" / "federated.json", tmp_path / "federated.json")
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    argv = ["--skip", "accuracy", "cost", "scale", "traffic", "--out", str(tmp_path), "--data-dir", str(tmp_path / "no-data-here"),
            "--seeds", "7", "--runs-dir", str(tmp_path / "no-runs-here")]
    assert _script("bench_federated").main(argv) == 0
    assert (tmp_path / "federated.md").read_text() == (ROOT / "benchmarks" / "federated.md").read_text()
    assert not (tmp_path / "no-runs-here").exists()


def test_bench_hardware_seeds_per_section() -> None:
    """``--seeds`` run the default budgets, ``--scaled-seeds`` the scaled latency budgets; an empty
    ``--scaled-seeds`` (or a JSON written before the option existed) means the same seeds for both."""
    from types import SimpleNamespace

    bench = _script("bench_hardware")
    args = SimpleNamespace(seeds=[0, 1, 2, 3], scaled_seeds=[0, 1])
    assert bench.section_seeds(args, 1.0) == [0, 1, 2, 3]
    assert bench.section_seeds(args, 0.5) == [0, 1]
    assert "Seeds 2, 3 ran at the default budgets only" in bench._added_seeds(args)
    for same in (SimpleNamespace(seeds=[0, 1], scaled_seeds=[]), SimpleNamespace(seeds=[0, 1])):
        assert bench.section_seeds(same, 0.5) == [0, 1]
        assert bench._added_seeds(same) == ""


def test_bench_hardware_caches_each_allocation(tmp_path, monkeypatch) -> None:
    """A seed cached before an allocation was added runs only that allocation (on the dense model trained
    again); if the dense model trained again differs from the cached one, every allocation runs again."""
    from types import SimpleNamespace

    from fedprune.config import load_config

    bench = _script("bench_hardware")
    import torch

    dense_acc, pruned = [0.5], []

    def train_dense(c, data):
        model = torch.nn.Linear(2, 1)
        torch.nn.init.constant_(model.weight, dense_acc[0])
        torch.nn.init.zeros_(model.bias)
        return SimpleNamespace(model=model, metrics={"accuracy": dense_acc[0]}, epochs=8)

    monkeypatch.setattr(bench, "train_dense", train_dense)
    monkeypatch.setattr(bench, "make_train_fn", lambda *a: (lambda model, epochs: None))
    monkeypatch.setattr(bench, "make_loader", lambda *a, **k: None)
    monkeypatch.setattr(bench, "evaluate", lambda model, loader: {"accuracy": 0.6})

    def prune(c, dense, data):
        pruned.append((c.pruning.budget_profile, c.pruning.allocation, c.pruning.budget_sensitivity))
        return {"pruned": {"accuracy": dense.metrics["accuracy"], "accuracy_before_finetune": 0.1, "channel_sparsity": 0.5, "macs": 1,
                           "params": 1, "budgets": {}, "kept_channels": {}, "latency_ms": {}, "total_epochs": 12}}

    monkeypatch.setattr(bench, "prune_experiment", prune)
    cfg = load_config(None, [])
    all_methods = dict(bench.METHODS)
    monkeypatch.setattr(bench, "METHODS", {k: v for k, v in all_methods.items() if k != "budget_fill"})
    (first,) = bench.budget_runs(cfg, [3], ["mobile_cpu"], (None, None), tmp_path)
    assert len(pruned) == len(all_methods) - 1 and "mobile_cpu/budget_fill" not in first
    pruned.clear()
    monkeypatch.setattr(bench, "METHODS", all_methods)
    (second,) = bench.budget_runs(cfg, [3], ["mobile_cpu"], (None, None), tmp_path)
    assert pruned == [("mobile_cpu", "budget_fill", 0.0)]  # only the allocation added
    assert {k: v for k, v in second.items() if k != "mobile_cpu/budget_fill"} == first
    pruned.clear()
    assert bench.budget_runs(cfg, [3], ["mobile_cpu"], (None, None), tmp_path) == [second] and not pruned  # all cached
    (rerun,) = bench.budget_runs(cfg, [3], ["mobile_cpu"], (None, None), tmp_path, rerun=("budget_uniform", "budget_fill"), ran="now")
    assert pruned == [("mobile_cpu", "budget_fill", 0.0), ("mobile_cpu", "budget_uniform", 0.0)]  # in METHODS' order
    assert [m for m in all_methods if rerun[f"mobile_cpu/{m}"].get("ran") == "now"] == ["budget_fill", "budget_uniform"]
    assert bench.budget_runs(cfg, [3], ["mobile_cpu"], (None, None), tmp_path) == [rerun]  # the stamp is cached with the rows
    pruned.clear()
    # budget_fill's overrides changed, and the dense model trained again has other weights: the whole seed again
    monkeypatch.setitem(all_methods, "budget_fill", {**all_methods["budget_fill"], "budget_objective": "sum"})
    dense_acc[0] = 0.55
    (third,) = bench.budget_runs(cfg, [3], ["mobile_cpu"], (None, None), tmp_path)
    assert len(pruned) == len(all_methods) and third["dense"]["accuracy"] == 0.55
    assert all(third[f"mobile_cpu/{m}"]["accuracy"] == 0.55 for m in all_methods)
    assert third["dense"]["state_sha256"] != first["dense"]["state_sha256"]
    # an allocation no longer run is dropped from the rows, cached or not
    monkeypatch.delitem(all_methods, "constant_cost")
    pruned.clear()
    (fourth,) = bench.budget_runs(cfg, [3], ["mobile_cpu"], (None, None), tmp_path)
    assert not pruned and "mobile_cpu/constant_cost" not in fourth and fourth["dense"] == third["dense"]


def test_bench_hardware_fill_floor_and_provenance() -> None:
    """The report counts the seed x profile pairs where budget_fill kept at least the uniform row's channels in every
    layer, and says which run (by its start) each allocation's rows on which seeds come from."""
    bench = _script("bench_hardware")
    rows = [{"p/budget_fill": {"kept_channels": {"a": 16, "b": 40}}, "p/budget_uniform": {"kept_channels": {"a": 16, "b": 32}}},
            {"p/budget_fill": {"kept_channels": {"a": 8, "b": 40}}, "p/budget_uniform": {"kept_channels": {"a": 16, "b": 32}}}]
    line = bench._fill_floor(rows, ["p"])
    assert "in every layer in 1/2 seed × profile pairs" in line and "+8.3% channels kept" in line and "+0.0% to +16.7%" in line

    def row(ran=None):
        return {"accuracy": 0.5, **({"ran": ran} if ran else {})}

    methods = ["budget", "budget_fill", "budget_uniform"]
    per_seed = [{"dense": {}, "p/budget": row(), "p/budget_fill": row("2026-12-05 21:47"), "p/budget_uniform": row("2026-12-05 21:47")},
                {"dense": {}, "p/budget": row(), "p/budget_fill": row("2026-12-05 21:47"), "p/budget_uniform": row("2026-12-05 21:47")},
                {"dense": {}, **{f"p/{m}": row("2026-12-06 00:30") for m in methods}}]
    note = bench._provenance(per_seed, [0, 1, 3], methods, this_run="2026-12-06 00:30")
    assert note.index("an earlier run: `budget` on seeds 0-1") < note.index("2026-12-05 21:47: `budget_fill`, `budget_uniform` on seeds 0-1")
    assert "2026-12-06 00:30 (this run): all allocations on seeds 3." in note
    one_run = [{f"p/{m}": row("2026-12-06 00:30") for m in methods}]
    assert bench._provenance(one_run, [0], methods) == bench._provenance([{"p/budget": row()}], [0], ["budget"]) == ""
    assert bench._seed_span([5, 0, 1, 2, 7, 8]) == "0-2, 5, 7-8"


def test_bench_hardware_retime_times_the_dense_model_alongside(monkeypatch) -> None:
    """The end-of-run re-time stores each latency-budgeted row's device ms and returns the dense model's host ms from the
    same passes; the report compares that with the dense model's timing at the start of the run."""
    from types import SimpleNamespace

    from fedprune.config import load_config

    bench = _script("bench_hardware")
    timed = []

    def fake_median(models, batch, threads, repeats, passes):
        timed.append((batch, sorted(models)))
        return {name: (4.0 if name == "dense" else 2.0) for name in models}

    monkeypatch.setattr(bench, "median_host_latency_ms", fake_median)
    cfg = load_config(None, [])
    groups = bench.discover_groups(bench.get_model(cfg.model.name))
    row = {"budgets": {"latency_ms_b1": {"limit": 2.5, "measured": 2.0, "ok": True}}, "kept_channels": {g.name: g.size // 2 for g in groups}}
    sections = {1.0: [{"dense": {"accuracy": 0.5}, "mobile_cpu/budget": row}]}
    dense = bench.retime_latency_budgets(sections, cfg, SimpleNamespace(threads=1, latency_repeats=3))
    assert dense == {"b1": 4.0} and timed == [(1, ["dense", "x1/0/mobile_cpu/budget"])]  # no row has a batch-64 budget
    speed = cfg.profiles["mobile_cpu"].compute_speed
    assert row["budgets"]["latency_ms_b1"]["retimed"] == pytest.approx(2.0 * bench.device_factor("latency_ms_b1", speed))
    lut = {"rows": {"uniform 100%": {"b1": {"measured_ms": [3.0, 3.2, 3.4]}}}}
    note = bench._retime_note(dense, lut)
    assert "took 4.00 ms at batch 1 (+25% against 3.20 ms at the start of the run)" in note
    assert "took 4.00 ms at batch 1:" in bench._retime_note(dense, None) and bench._retime_note(None, lut) == ""


def test_bench_federated_compares_each_consensus_row_with_its_random_twin() -> None:
    """Sensitivity-adaptive widths come from the criterion's sensitivity, so a consensus row with them is compared
    with the random-mask row of the same criterion and allocation; rows with the config's widths with plain random
    masks; and the short-budget section reads the per-round evaluation of both."""
    from types import SimpleNamespace

    bench = _script("bench_federated")
    assert bench.baseline("random", "consensus Taylor") == "random masks"
    assert bench.baseline("random", "consensus reconstruction, sensitivity-adaptive widths") == \
        "random masks, consensus reconstruction's sensitivity-adaptive widths"
    assert bench.baseline("random", "consensus Taylor, sensitivity-adaptive widths") == \
        "random masks, consensus Taylor's sensitivity-adaptive widths"
    assert bench.baseline("local", "consensus Taylor, sensitivity-adaptive widths") == "local-only masks"

    def run(curve):  # one run whose fine-tune rounds score ``curve`` at every profile
        rounds = [{"phase": "warmup", "accuracy": {"dense": 0.1}}, {"phase": "importance"}]
        rounds += [{"phase": "finetune", "accuracy": {p: a for p in bench.PROFILES}} for a in curve]
        return {"rounds": rounds}

    rows = {lab: [run([0.50, 0.50]), run([0.50, 0.52])] for lab, *_ in bench.FEDERATED}
    rows["consensus Taylor"] = [run([0.53, 0.50]), run([0.51, 0.52])]  # +2 points after 1 round, 0 after 2
    assert bench.finetune_curve(rows["consensus Taylor"][0], "mobile_cpu") == [0.53, 0.50]
    lines = bench.budget_section(rows, SimpleNamespace(finetune_rounds=2))
    taylor = next(line for line in lines if line.startswith("| consensus Taylor (random masks) |"))
    assert taylor == "| consensus Taylor (random masks) | **+2.0 / +2.0 / +2.0** | +0.0 / +0.0 / +0.0 |"
    assert "Ahead at every profile: consensus Taylor after 1 round(s)." in lines[-1]
    assert bench.budget_section(rows, SimpleNamespace(finetune_rounds=0)) == []
    rows["random masks"][1]["rounds"][2].pop("accuracy")  # round 1 not evaluated in one run: only k = 2 is compared
    assert bench.finetune_curve(rows["random masks"][1], "edge_gpu") == [None, 0.52]
    assert "| consensus Taylor (random masks) | +0.0 / +0.0 / +0.0 |" in bench.budget_section(rows, SimpleNamespace(finetune_rounds=2))


PAIR = ["consensus reconstruction, sensitivity-adaptive widths", "random masks, consensus reconstruction's sensitivity-adaptive widths"]


def test_bench_federated_extra_seeds_run_only_the_pair(tmp_path, monkeypatch) -> None:
    """``--extra-seeds`` runs a consensus row and its random twin after their seed's own warm-up, nothing else;
    a label that is not a consensus row, or an extra seed the table already has, is an error before anything runs."""
    bench = _script("bench_federated")
    assert bench.extra_pairs(PAIR[:1]) == PAIR
    with pytest.raises(ValueError, match=r"--extra-rows \['random masks'\]: not a consensus row; allowed: \['consensus magnitude'"):
        bench.extra_pairs(["random masks"])

    calls = []
    monkeypatch.setattr(bench, "run_or_reuse", lambda cfg, run_dir, source, what, **kw: calls.append((run_dir.name, source, cfg.seed,
                                                                                                      cfg.pruning.criterion)) or {"seed": cfg.seed})
    cfg = bench.load_config(ROOT / "configs" / "quick.toml")
    rows = bench.federated_runs(cfg, [3, 4], tmp_path, labels=PAIR, dense=False)
    assert list(rows) == PAIR and rows[PAIR[1]] == [{"seed": 3}, {"seed": 4}]
    assert calls[:3] == [("warmup_s3", "none", 3, cfg.pruning.criterion),
                         ("consensus_reconstruction_sensitivity_adaptive_widths_s3", "consensus", 3, "reconstruction"),
                         ("random_masks_consensus_reconstruction_s_sensitivity_adaptive_widths_s3", "random", 3, "reconstruction")]
    assert len(calls) == 6

    shutil.copy(ROOT / "benchmarks" / "federated.json", tmp_path / "federated.json")
    monkeypatch.setattr(bench, "federated_runs", lambda *a, **kw: pytest.fail("nothing may run"))
    for extra, allowed in [(["--extra-seeds", "2"], "are in --seeds"), (["--extra-seeds", "9", "--extra-rows", "dense"], "not a consensus row")]:
        with pytest.raises(SystemExit):
            bench.main(["--skip", "accuracy", "cost", "scale", "traffic", "--out", str(tmp_path), "--runs-dir", str(tmp_path / "no-runs"), *extra])
    assert (tmp_path / "federated.json").read_bytes() == (ROOT / "benchmarks" / "federated.json").read_bytes()


def test_bench_federated_reports_the_pair_over_every_seed(tmp_path, monkeypatch) -> None:
    """The extra seeds' runs are paired with the table's by seed: differences, s.e. and a Student-t 95% CI over
    all seeds; re-rendering keeps them, ``--extra-seeds`` with no seed drops them."""
    import json

    bench = _script("bench_federated")
    state = json.loads((ROOT / "benchmarks" / "federated.json").read_text())
    seeds, state_extra_seeds = state["args"]["seeds"], state["args"]["extra_seeds"]
    base = {lab: state["rows"][lab] for lab in PAIR}
    extra = json.loads(json.dumps(base))  # copies of the table's seeds, the twin shifted down one point at every profile
    for run in extra[PAIR[1]]:
        for p in bench.PROFILES:
            run["profiles"][p]["accuracy"] -= 0.01
    state["extra"], state["args"]["extra_seeds"], state["args"]["extra_rows"] = extra, [7, 8, 9][:len(seeds)], PAIR[:1]
    (tmp_path / "federated.json").write_text(json.dumps(state))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    argv = ["--skip", "accuracy", "cost", "scale", "traffic", "--out", str(tmp_path), "--runs-dir", str(tmp_path / "no-runs-here")]
    assert bench.main(argv) == 0
    text = (tmp_path / "federated.md").read_text()
    n = 2 * len(seeds)
    assert f"Over all {n} seeds" in text and f"{n - 1} degrees of freedom" in text

    import numpy as np
    d = [100 * (a["profiles"]["edge_gpu"]["accuracy"] - b["profiles"]["edge_gpu"]["accuracy"])
         for a, b in zip(base[PAIR[0]] + extra[PAIR[0]], base[PAIR[1]] + extra[PAIR[1]])]
    se = np.std(d, ddof=1) / np.sqrt(n)
    t95 = bench.t95(n)
    section = text.split("## More seeds for selected pairs")[1]
    row = next(line for line in section.splitlines() if line.startswith("| edge_gpu | "))
    assert f"| {np.mean(d):+.1f} | {se:.1f} | [{np.mean(d) - t95 * se:+.1f}, {np.mean(d) + t95 * se:+.1f}] |" in row
    assert row.endswith(f"| {sum(x > 0 for x in d)} of {n} |")
    assert f"- With seeds {[7, 8, 9][:len(seeds)]} added for this pair: {PAIR[0]} over {PAIR[1]}" in text
    # the target's verdict is the one over all seeds: here the pair leads on every extra seed, so it holds
    target = "- Consensus beats local-only and random masks at every profile (random masks with the same per-layer widths): "
    assert f"{target}met; on seeds {seeds} alone met on the mean by {PAIR[0]}" in text
    assert f"over all {n} seeds still met (next bullet)" in text
    # the committed runs: led on the mean over seeds 0-2 only; over all 10 seeds microcontroller ties
    committed = (ROOT / "benchmarks" / "federated.md").read_text()
    assert f"{target}NOT met; on seeds {seeds} alone met on the mean by {PAIR[0]}" in committed
    assert f"over all {len(seeds) + len(state_extra_seeds)} seeds NOT met (next bullet)" in committed

    assert bench.main(argv) == 0  # a re-render keeps the pair
    assert (tmp_path / "federated.md").read_text() == text
    assert bench.main([*argv, "--extra-seeds"]) == 0
    assert "More seeds for selected pairs" not in (tmp_path / "federated.md").read_text()
    assert "extra" not in json.loads((tmp_path / "federated.json").read_text())


def test_bench_federated_seeds_verdict_names_the_profiles_that_do_not_lead() -> None:
    """Hand-made pairs over four seeds: a profile whose mean lead is zero is NOT met (with its mean), and the
    95% CI lies above zero only where mean - t(3 df) * s.e. > 0."""
    bench = _script("bench_federated")
    leads = {"edge_gpu": [1.0, 1.2, 0.8, 1.0], "mobile_cpu": [0.5, -0.5, 0.4, -0.4], "microcontroller": [2.0, -1.0, 2.0, 1.0]}

    def runs(shift):
        return [{"profiles": {p: {"accuracy": 0.5 + shift * d[i] / 100} for p, d in leads.items()}} for i in range(4)]

    rows = {PAIR[0]: runs(1), PAIR[1]: runs(0)}
    stats = bench.paired_stats(rows, PAIR[0])
    assert stats["edge_gpu"][1] == pytest.approx(1.0) and stats["mobile_cpu"][1] == pytest.approx(0.0, abs=1e-9)
    assert bench.ahead_every_profile(stats) == 2  # seeds 0 and 2
    # microcontroller: mean 1.0, sd 1.41, s.e. 1.41 / 2 = 0.71, 1.0 - 3.18 * 0.71 < 0
    verdict = bench.seeds_verdict(stats)
    assert verdict.startswith("over all 4 seeds the target is NOT met on the mean at mobile_cpu (")
    assert "microcontroller (" not in verdict and verdict.endswith("the 95% CI lies above zero at edge_gpu")
    leads["mobile_cpu"] = [0.5, 0.5, 0.5, 0.6]
    rows = {PAIR[0]: runs(1), PAIR[1]: runs(0)}
    assert bench.seeds_verdict(bench.paired_stats(rows, PAIR[0])) == ("over all 4 seeds the target is met on the mean at every profile; "
                                                  "the 95% CI lies above zero at edge_gpu, mobile_cpu")


def test_bench_federated_reports_the_importance_round_without_model_delivery(tmp_path, monkeypatch) -> None:
    """The "traffic" part: runs with federated.score_model = "last_warmup" are reported beside consensus Taylor,
    their importance round's bytes against the target and their accuracy paired by seed; the default's importance
    round counts the model's delivery, whichever way its record counted it."""
    import json

    bench = _script("bench_federated")
    state = json.loads((ROOT / "benchmarks" / "federated.json").read_text())
    runs = json.loads(json.dumps(state["rows"]["consensus Taylor"]))
    for run in runs:  # no delivery, and one point more at every profile
        imp = next(r for r in run["rounds"] if r["phase"] == "importance")
        imp.pop("evaluation_bytes_down"), imp.pop("evaluation_bytes_up")
        imp["model_delivery_bytes_down"] = imp["model_delivery_bytes_up"] = 0
        for p in bench.PROFILES:
            run["profiles"][p]["accuracy"] += 0.01
    old = next(r for r in state["rows"]["consensus Taylor"][0]["rounds"] if r["phase"] == "importance")
    new = {**old, "bytes_down": old["bytes_down"] + old["evaluation_bytes_down"], "bytes_up": old["bytes_up"] + old["evaluation_bytes_up"],
           "model_delivery_bytes_down": old["evaluation_bytes_down"], "model_delivery_bytes_up": old["evaluation_bytes_up"]}
    assert bench.importance_traffic(old) == bench.importance_traffic(new)
    state["no_delivery"] = runs
    (tmp_path / "federated.json").write_text(json.dumps(state))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    argv = ["--skip", "accuracy", "cost", "scale", "traffic", "--out", str(tmp_path), "--runs-dir", str(tmp_path / "no-runs-here")]
    assert bench.main(argv) == 0
    text = (tmp_path / "federated.md").read_text()
    frac = 100 * (old["bytes_down"] + old["bytes_up"]) / next(r["bytes_down"] + r["bytes_up"] for r in runs[0]["rounds"] if r["phase"] == "warmup")
    assert f", no model = **{frac:.3f}% of a dense round**" in text
    assert "minus consensus Taylor's, paired by seed: +1.0 (per seed +1.0, +1.0, +1.0) / +1.0" in text
    assert "Its warm-up is the shared one's" in text
    assert "- Importance round ≤ 1% of a dense round's bytes: NOT met with the default" in text
    assert f"; met with `score_model = \"last_warmup\"` ({frac:.3f}%;" in text
