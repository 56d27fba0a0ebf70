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
