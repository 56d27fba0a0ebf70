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
    """With ``--skip accuracy cost scale`` nothing runs; the data dir, seeds and rounds come from the saved runs."""
    shutil.copy(ROOT / "benchmarks" / "federated.json", tmp_path / "federated.json")
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    argv = ["--skip", "accuracy", "cost", "scale", "--out", str(tmp_path), "--data-dir", str(tmp_path / "no-data-here"),
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
