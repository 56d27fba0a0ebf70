"""Scripted sweeps: grid parsing and validation, cells, restart, summary and aggregation."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fedprune.config import REPO_ROOT
from fedprune.sweep import (
    Cell,
    SweepError,
    aggregate,
    load_grid,
    paired_differences,
    read_summary,
    render_summary,
    row_profiles,
    run_sweep,
    summary_columns,
    write_report,
)

TINY_FIXED = """
[fixed]
"data.dataset" = "synthetic"
"data.synthetic_train" = 120
"data.synthetic_test" = 40
federated.num_clients = 3
federated.warmup_rounds = 1
federated.finetune_rounds = 1
federated.proportions = { edge_gpu = 0.34, mobile_cpu = 0.33, microcontroller = 0.33 }
"pruning.criterion" = "l2"
"train.threads" = 1
"eval.latency" = false
"profiles.edge_gpu.local_epochs" = 1
"""


def write_grid(tmp_path: Path, text: str, name: str = "g.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def tiny_grid(tmp_path: Path) -> Path:
    """Two cells (criterion l2, l1), one seed, 3 synthetic clients, 1 + 1 rounds, in-process."""
    fixed = TINY_FIXED.replace('"pruning.criterion" = "l2"\n', "")
    return write_grid(tmp_path, 'engine = "inprocess"\nseeds = [0]\n' + fixed + '\n[grid]\n"pruning.criterion" = ["l2", "l1"]\n')


# ------------------------------------------------------------------ parsing
def test_summary_columns_follow_the_profiles_of_the_runs():
    """A profile of one's own (here listed between mobile_cpu and microcontroller) gets its columns, in the runs'
    order; before any run finished, the built-in three."""
    rows = [{"cell": "a", "mobile_cpu_channel_sparsity": 0.5, "wearable_channel_sparsity": 0.6, "wearable_local_val_accuracy": 0.3,
             "microcontroller_channel_sparsity": 0.8, "dense_accuracy": 0.4}]
    assert row_profiles(rows) == ["mobile_cpu", "wearable", "microcontroller"]
    assert row_profiles([]) == ["edge_gpu", "mobile_cpu", "microcontroller"]
    # a first cell without edge_gpu clients does not move edge_gpu to the end
    two = [{"mobile_cpu_channel_sparsity": 0.5, "microcontroller_channel_sparsity": 0.8},
           {"edge_gpu_channel_sparsity": 0.3, "mobile_cpu_channel_sparsity": 0.5, "microcontroller_channel_sparsity": 0.8}]
    assert row_profiles(two) == ["edge_gpu", "mobile_cpu", "microcontroller"]
    columns = summary_columns(["k"], rows)
    assert "wearable_accuracy" in columns and "edge_gpu_accuracy" not in columns
    assert columns.index("mobile_cpu_clients") < columns.index("wearable_accuracy") < columns.index("microcontroller_accuracy")


def test_grid_parsing_cells_and_slugs(tmp_path):
    (tmp_path / "base.toml").write_text("[federated]\nnum_clients = 6\n")
    path = write_grid(tmp_path, """
name = "mix"
base = "base.toml"
engine = "inprocess"
seeds = [0, 1, 2]
[fixed]
federated.warmup_rounds = 1
"eval.latency" = false
[grid]
"data.alpha" = [0.1, 0.5, 100.0]
federated.proportions = [{ microcontroller = 1.0 }, { edge_gpu = 0.5, microcontroller = 0.5 }]
[labels]
federated.proportions = ["all-MCU", "half"]
""")
    grid = load_grid(path)
    assert grid.name == "mix" and grid.engine == "inprocess" and grid.base == (tmp_path / "base.toml").resolve()
    assert grid.fixed == {"federated.warmup_rounds": 1, "eval.latency": False}
    assert list(grid.grid) == ["data.alpha", "federated.proportions"]  # nested and quoted dotted keys alike
    cells = grid.cells()
    assert len(cells) == 3 * 2 * 3  # product of the value lists x seeds
    ids = [c.id for c in cells]
    assert len(set(ids)) == len(ids)
    assert ids[0] == "alpha-0.1_proportions-all-MCU_seed0" and ids[-1] == "alpha-100_proportions-half_seed2"
    assert ids[1] == "alpha-0.1_proportions-half_seed0" and ids[6] == "alpha-0.1_proportions-all-MCU_seed1"  # the seed varies slowest
    assert cells[7].describe() == "alpha=0.1 proportions=half seed=1"
    # a table value replaces the base's table instead of merging into it; the base file's values stay
    cfg = grid.config(cells[0])
    assert cfg.federated.proportions == {"microcontroller": 1.0}
    assert cfg.federated.num_clients == 6 and cfg.federated.warmup_rounds == 1 and cfg.data.alpha == 0.1 and cfg.seed == 0
    assert grid.config(cells[-1]).seed == 2
    assert len(grid.validate()) == 18


def test_grid_without_grid_table_runs_the_seeds(tmp_path):
    grid = load_grid(write_grid(tmp_path, "seeds = [3, 4]\n[fixed]\n'eval.latency' = false\n"))
    assert [c.id for c in grid.cells()] == ["base_seed3", "base_seed4"]


@pytest.mark.parametrize("text, message", [
    ("bogus = 1\n", "unknown key 'bogus'; allowed top-level keys"),
    ("[grid]\n'data.alpha' = []\n", "'data.alpha' = [] is empty"),
    ("[grid]\n'data.alpha' = 0.5\n", "must be a list of values"),
    ("[grid]\n'data.alpha' = [0.5, 0.5]\n", "repeats a value"),
    ("seeds = []\n", "seeds = [] must be a non-empty list"),
    ("seeds = [1, 1]\n", "must be distinct integers"),
    ("engine = 'dask'\n", "engine = 'dask' is not allowed; choose one of ['ray', 'inprocess']"),
    ("mask_source = 'oracle'\n", "mask_source = 'oracle' is not allowed"),
    ("base = 'missing.toml'\n", "config file"),
    ("[fixed]\nseed = 3\n", "'seed' cannot be set"),
    ("[fixed]\n'data.alpha' = 1.0\n[grid]\n'data.alpha' = [0.5]\n", "both in [fixed] and in [grid]"),
    ("[grid]\n'data.alpha' = [0.5, 1.0]\n[labels]\n'data.alpha' = ['a']\n", "must be a list of 2 non-empty strings"),
    ("[grid]\n'data.alpha' = [0.5]\n[labels]\n'data.partition' = ['a']\n", "is not a key of [grid]"),
    ("[grid]\n'pruning.criterion' = ['a b', 'a-b']\n", "two cells get the id"),
    ("grid = 3\n", "'grid' must be a table"),
    ("name = 'a/b'\n", "may only hold"),
    ("[grid\n", "not valid TOML"),
])
def test_grid_file_errors_are_clear(tmp_path, text, message):
    with pytest.raises(SweepError) as err:
        load_grid(write_grid(tmp_path, text))
    assert message in str(err.value) and "g.toml" in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("[grid]\n'federated.num_clientz' = [10]\n", "unknown config key 'federated.num_clientz'"),
    ("[fixed]\n'fedrated.num_clients' = 10\n", "unknown config key 'fedrated'"),
    ("[grid]\n'data.alpha' = [0.5, -1.0]\n", "'data.alpha' = -1.0 is out of range"),
    ("[grid]\n'pruning.criterion' = ['taylor', 'tailor']\n", "'pruning.criterion' = 'tailor' is not allowed"),
    ("[grid]\n'federated.proportions' = [{ edge_gpu = 0.5 }]\n", "sums to 0.5"),
])
def test_every_cell_config_is_validated_before_running(tmp_path, text, message):
    grid = load_grid(write_grid(tmp_path, "seeds = [0, 1]\n" + text))
    calls = []
    with pytest.raises(SweepError) as err:
        run_sweep(grid, tmp_path / "out", runner=lambda *a, **k: calls.append(a))
    assert message in str(err.value) and "cell " in str(err.value)
    assert calls == [] and not (tmp_path / "out").exists()  # nothing ran


def test_cli_reports_grid_errors_with_exit_code_2(tmp_path):
    path = write_grid(tmp_path, "[grid]\n'pruning.criterion' = ['tailor']\n")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "simulation" / "sweep.py"), "--grid", str(path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("sweep: error: sweep grid") and "'tailor' is not allowed" in proc.stderr


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO_ROOT / "configs" / "sweeps").glob("*.toml")))
def test_shipped_sweeps_are_valid(name):
    grid = load_grid(REPO_ROOT / "configs" / "sweeps" / f"{name}.toml")
    cells = grid.validate()
    assert len(cells) == math.prod(len(v) for v in grid.grid.values()) * len(grid.seeds) >= 3
    assert all(not cfg.eval.latency for _, cfg in cells)


# ------------------------------------------------------------------ running
def test_tiny_sweep_runs_and_restart_skips_finished_cells(tmp_path):
    grid = load_grid(tiny_grid(tmp_path))
    out = tmp_path / "out"
    lines: list[str] = []
    rows = run_sweep(grid, out, echo=lines.append)
    assert [r["status"] for r in rows] == ["done", "done"]
    assert (out / "cells" / "criterion-l2_seed0" / "results.json").is_file()
    assert any(l.startswith("[sweep] cell 1/2 criterion=l2 seed=0") for l in lines)
    with open(out / "summary.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert header == summary_columns(["pruning.criterion"])
    for col in ("cell", "pruning.criterion", "seed", "status", "wall_s", "dense_accuracy", "edge_gpu_accuracy", "edge_gpu_flops",
                "edge_gpu_macs", "edge_gpu_channel_sparsity", "microcontroller_accuracy"):
        assert col in header
    table = read_summary(out / "summary.csv", ["pruning.criterion"])
    assert table[0]["pruning.criterion"] == "l2" and 0 <= table[0]["edge_gpu_accuracy"] <= 1 and table[0]["edge_gpu_flops"] > 0

    # Restart: both cells are finished, nothing runs again.
    def must_not_run(*a, **k):
        raise AssertionError("a finished cell ran again")

    lines.clear()
    again = run_sweep(grid, out, runner=must_not_run, echo=lines.append)
    assert [r["status"] for r in again] == ["done", "done"] and sum("skipped" in l for l in lines) == 2
    assert again[0]["edge_gpu_accuracy"] == rows[0]["edge_gpu_accuracy"]

    # A cell without results.json (interrupted) runs again; a changed [fixed] value re-runs every cell.
    (out / "cells" / "criterion-l1_seed0" / "results.json").unlink()
    seen = []
    run_sweep(grid, out, runner=lambda cfg, d, **k: seen.append(Path(d).name) or json.loads((out / "cells" / "criterion-l2_seed0" / "results.json").read_text()),
              echo=lines.append)
    assert seen == ["criterion-l1_seed0"]
    changed = load_grid(tiny_grid(tmp_path))
    changed.fixed["federated.warmup_rounds"] = 2
    seen.clear()
    run_sweep(changed, out, runner=lambda cfg, d, **k: seen.append(Path(d).name) or (_ for _ in ()).throw(RuntimeError("boom")), echo=lines.append)
    assert seen == ["criterion-l2_seed0", "criterion-l1_seed0"]


def test_crashed_cell_is_recorded_and_the_sweep_goes_on(tmp_path):
    grid = load_grid(tiny_grid(tmp_path))
    out = tmp_path / "out"
    ok = {"dense": {"accuracy": 0.5, "flops": 100, "macs": 50, "params": 10}, "totals": {"bytes_up": 1, "bytes_down": 2, "wall_s": 1.0},
          "profiles": {"edge_gpu": {"accuracy": 0.4, "flops": 50, "macs": 25, "params": 5, "channel_sparsity": 0.3, "clients": 1}}}

    def runner(cfg, cell_dir, engine, mask_source):
        if cfg.pruning.criterion == "l2":
            raise RuntimeError("client exploded")
        return ok

    lines: list[str] = []
    rows = run_sweep(grid, out, runner=runner, echo=lines.append)
    assert [r["status"] for r in rows] == ["failed", "done"]
    assert rows[0]["error"] == "RuntimeError: client exploded"
    assert "client exploded" in (out / "cells" / "criterion-l2_seed0" / "error.txt").read_text()
    assert any("FAILED" in l for l in lines)
    md = write_report(grid, rows, out).read_text()
    assert "Failed cells" in md and "1 failed" in md


# ---------------------------------------------------------------- summaries
def _row(alpha, seed, acc, status="done", **extra):
    return {"cell": f"alpha-{alpha}_seed{seed}", "data.alpha": alpha, "seed": seed, "status": status, "dense_accuracy": None if acc is None else acc + 0.1,
            "edge_gpu_accuracy": acc, "edge_gpu_flops": 2e6, "edge_gpu_macs": 1e6, "edge_gpu_params": 1000, "edge_gpu_channel_sparsity": 0.3,
            "edge_gpu_clients": 3, "dense_flops": 4e6, "wall_s": 10.0, **extra}


def test_mean_std_aggregation_on_hand_made_rows():
    rows = [_row("0.1", 0, 0.5), _row("0.1", 1, 0.6), _row("0.1", 2, 0.7), _row("100", 0, 0.8),
            _row("100", 1, None, status="failed")]
    groups = aggregate(rows, ["data.alpha"])
    assert [g["keys"] for g in groups] == [{"data.alpha": "0.1"}, {"data.alpha": "100"}]
    g0, g1 = groups
    assert g0["n"] == 3 and g0["failed"] == 0 and g0["seeds"] == [0, 1, 2]
    mu, sd, n = g0["stats"]["edge_gpu_accuracy"]
    assert mu == pytest.approx(0.6) and sd == pytest.approx(0.1) and n == 3  # sample std (ddof = 1)
    assert g1["n"] == 1 and g1["failed"] == 1 and g1["stats"]["edge_gpu_accuracy"] == (0.8, 0.0, 1)
    assert "mobile_cpu_accuracy" not in g0["stats"]


def test_paired_differences_pair_cells_by_seed_on_hand_made_rows(tmp_path):
    rows = [_row("0.1", 0, 0.5, bytes_total=1e9), _row("0.1", 1, 0.6, bytes_total=1e9), _row("0.1", 2, 0.7, bytes_total=1e9),
            _row("100", 0, 0.8, bytes_total=1.5e9), _row("100", 1, None, status="failed"), _row("100", 2, 0.6, bytes_total=1.5e9)]
    (point, diffs), = paired_differences(rows, ["data.alpha"], "edge_gpu_accuracy")
    assert point == {"data.alpha": "100"} and diffs == pytest.approx([0.3, -0.1])  # seed 1 failed: not paired
    assert paired_differences(rows[:3], ["data.alpha"], "edge_gpu_accuracy") == []  # one grid point: nothing to pair
    grid = load_grid(write_grid(tmp_path, "seeds = [0, 1, 2]\n[grid]\n'data.alpha' = [0.1, 100.0]\n"))
    md = render_summary(grid, rows, grid.config(Cell(0, "x", "x", {"data.alpha": 0.1}, {"data.alpha": "0.1"}, 0)))
    # mean of (+30, -10) points = +10.0, standard error = sd / sqrt(2) = 20.0; traffic +0.5 GB on both seeds
    assert "each grid point minus the first (`alpha = 0.1`)" in md and "| 100 | 2 | +10.0 (20.0) | +0.500 (0.000) |" in md


def test_summary_markdown_states_setting_and_mean_std(tmp_path):
    grid = load_grid(write_grid(tmp_path, "seeds = [0, 1, 2]\n[fixed]\n'data.partition' = 'dirichlet'\n'eval.latency' = false\n"
                                          "[grid]\n'data.alpha' = [0.1, 100.0]\n"))
    rows = [_row("0.1", 0, 0.5), _row("0.1", 1, 0.6), _row("0.1", 2, 0.7), _row("100", 0, 0.8), _row("100", 1, 0.8), _row("100", 2, 0.8)]
    cfg = grid.config(Cell(0, "x", "x", {"data.alpha": 0.1}, {"data.alpha": "0.1"}, 0))
    md = render_summary(grid, rows, cfg, (4068, 1017))
    assert "4,068 train / 1,017 test images" in md and "10 clients" in md and "alpha varies" in md and "∈ {0.1, 100}" in md
    assert "| 0.1 | 3 | 70.0 ± 10.0 | 60.0 ± 10.0 |" in md
    assert "| 100 | 3 | 90.0 ± 0.0 | 80.0 ± 0.0 |" in md
    assert "| 0.1 | edge_gpu | 3.0 | 30% | 1,000 | 2.00 | 1.00 | 2.00x |" in md
    # plots: accuracy vs FLOPs and accuracy vs alpha (log x)
    from fedprune.sweep import plot_summary

    made = plot_summary(grid, rows, tmp_path)
    assert [n for _, n in made] == ["accuracy_vs_flops.png", "accuracy_vs_alpha.png"]
    assert all((tmp_path / n).stat().st_size > 1000 for _, n in made)
