"""Scripted sweeps: the cross product of chosen config keys x seeds, one federated run per cell.

A grid file (TOML, see ``configs/sweeps/``) looks like::

    name = "noniid"                      # optional, default: the file name
    description = "Label skew"           # optional, one line for the report
    base = "../quick.toml"               # config file, relative to the grid file (optional)
    engine = "inprocess"                 # "ray" (Flower Simulation Engine) or "inprocess"
    mask_source = "consensus"            # optional (consensus, local, random, central, none)
    seeds = [0, 1, 2]

    [fixed]                              # overrides applied to every cell
    federated.num_clients = 10
    "eval.latency" = false               # quoted dotted keys work too

    [grid]                               # dotted config key -> list of values (cross product)
    "data.alpha" = [0.1, 0.5, 100.0]

    [labels]                             # optional readable names of a grid key's values
    "data.alpha" = ["0.1", "0.5", "100"]

Values replace the base config's value (a table such as ``federated.proportions``
is replaced as a whole, not merged). The grid file is validated on load, and
every cell's config is validated with the config loader before anything runs, so
a typo fails at once. Each cell runs :func:`fedprune.federated.simulate` into
``OUT/cells/<cell-id>/``; a cell is finished when its ``results.json`` exists
(the server writes it last) and was written with the same config, so a restarted
sweep skips it. A crashing cell is logged (``error.txt``) and the sweep goes on.
``OUT/summary.csv`` has one row per cell, ``OUT/summary.md`` the mean ± std
over seeds and the plots.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import re
import shutil
import time
import traceback
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from fedprune.config import PROFILE_NAMES, ConfigError, ExperimentConfig, config_from_dict, config_to_dict, read_toml
from fedprune.reporting import mean_se, mean_std, to_jsonable, write_csv, write_json, write_text

__all__ = [
    "SweepError", "Cell", "SweepGrid", "load_grid", "run_sweep", "summary_row", "summary_columns", "row_profiles",
    "aggregate", "render_summary", "plot_summary", "write_report", "read_summary", "MASK_SOURCES_SWEEP",
]

log = logging.getLogger("fedprune.sweep")

GRID_FILE_KEYS = ("name", "description", "base", "engine", "mask_source", "seeds", "fixed", "grid", "labels")
ENGINES = ("ray", "inprocess")
MASK_SOURCES_SWEEP = ("consensus", "local", "random", "central", "none")
#: Per-profile metrics of a summary row (``<profile>_<metric>``).
PROFILE_METRICS = ("accuracy", "local_val_accuracy", "flops", "macs", "params", "channel_sparsity", "clients")
#: Whole-run metrics of a summary row.
RUN_METRICS = ("dense_accuracy", "dense_flops", "dense_macs", "dense_params", "bytes_total", "wall_s")


class SweepError(ConfigError):
    """A grid file is malformed, or one of its cells has an invalid config."""


# ------------------------------------------------------------------ schema
def _is_table(parts: Sequence[str]) -> bool:
    """Whether the config path ``parts`` is a table of keys (a config section, ``profiles``
    or ``profiles.NAME``) rather than one value (which may itself be a table, e.g. proportions)."""
    if not parts:
        return True
    if parts[0] == "profiles":
        return len(parts) <= 2
    cls: Any = ExperimentConfig
    for p in parts:
        if not dataclasses.is_dataclass(cls):
            return False
        hints = typing.get_type_hints(cls)
        if p not in hints:
            return False  # unknown: a leaf, so that the config loader names it
        cls = hints[p]
    return dataclasses.is_dataclass(cls)


def _flatten(table: Mapping, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{"federated": {"num_clients": 10}}`` and ``{"federated.num_clients": 10}`` -> the latter.
    Only config sections are descended into, so table-valued keys stay whole."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        parts = prefix + tuple(str(k).split("."))
        if isinstance(v, Mapping) and _is_table(parts):
            out.update(_flatten(v, parts))
        else:
            out[".".join(parts)] = v
    return out


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``key = "a.b.c"`` (replacing, never merging)."""
    parts = key.split(".")
    node = raw
    for i, p in enumerate(parts[:-1]):
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise SweepError(f"config key '{key}' cannot be set: '{'.'.join(parts[: i + 1])}' is a value, not a table")
        node = child
    node[parts[-1]] = _copy(value)


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def value_label(value: Any) -> str:
    """Readable text of a grid value: ``0.1``, ``taylor``, ``edge_gpu=1``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Mapping):
        return ",".join(f"{k}={value_label(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "+".join(value_label(v) for v in value)
    return str(value)


def pretty_value(value: Any) -> str:
    """Grid value for people: tables as ``a 0.3, b 0.7``."""
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {value_label(v)}" for k, v in value.items())
    return value_label(value)


def _grid_values(grid: "SweepGrid", key: str) -> str:
    vals = grid.grid[key]
    if key in grid.labels:
        return "; ".join(f"{lab} ({pretty_value(v)})" for lab, v in zip(grid.labels[key], vals))
    return ", ".join(pretty_value(v) for v in vals)


def slug(text: str) -> str:
    """Characters safe in a directory name: letters, digits, ``_``, ``.``, ``+``, ``=``, ``,`` and ``-``."""
    return re.sub(r"[^A-Za-z0-9_.+=,-]+", "-", text).strip("-") or "x"


# ------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    """One run of a sweep: the grid values (dotted key -> value) and a seed."""

    index: int
    id: str
    group: str
    values: dict
    labels: dict
    seed: int

    def describe(self) -> str:
        """``alpha=0.1 seed=1`` (short key names)."""
        return " ".join([f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.labels.items()] + [f"seed={self.seed}"])


@dataclass
class SweepGrid:
    """A parsed, validated grid file (see the module docstring)."""

    path: Path
    name: str
    description: str = ""
    base: Path | None = None
    engine: str = "ray"
    mask_source: str = "consensus"
    seeds: list = field(default_factory=lambda: [0])
    fixed: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)

    def short_names(self) -> dict[str, str]:
        """Grid key -> its last dotted part, or the whole key where last parts collide."""
        last = [k.rsplit(".", 1)[-1] for k in self.grid]
        return {k: (s if last.count(s) == 1 else k) for k, s in zip(self.grid, last)}

    def cells(self) -> list[Cell]:
        """Seeds x the cross product of the grid values (in file order). The seed varies slowest,
        so a sweep cut short has every grid point for the first seeds."""
        keys = list(self.grid)
        short = self.short_names()
        out = []
        for seed in self.seeds:
            for combo in itertools.product(*(range(len(self.grid[k])) for k in keys)):
                values = {k: self.grid[k][i] for k, i in zip(keys, combo)}
                labels = {k: (self.labels[k][i] if k in self.labels else value_label(self.grid[k][i])) for k, i in zip(keys, combo)}
                group = "_".join(slug(f"{short[k]}-{labels[k]}") for k in keys) or "base"
                out.append(Cell(len(out), f"{group}_seed{seed}", group, values, labels, seed))
        return out

    def raw_config(self, cell: Cell, data_dir: str | Path | None = None) -> dict:
        """The cell's config as a nested dict: base file, then [fixed], then the cell's values and seed."""
        try:
            raw = read_toml(self.base, "base config") if self.base else {}
        except ConfigError as exc:
            raise SweepError(f"sweep grid '{self.path}': {exc}") from None
        for key, value in {**self.fixed, **cell.values}.items():
            _set_dotted(raw, key, value)
        raw["seed"] = cell.seed
        data = raw.setdefault("data", {})
        if data_dir and isinstance(data, dict) and data.get("dataset", "cifar10") == "cifar10" and not data.get("data_dir"):
            data["data_dir"] = str(Path(data_dir).resolve())
        return raw

    def config(self, cell: Cell, data_dir: str | Path | None = None) -> ExperimentConfig:
        """The validated config of ``cell`` (:class:`SweepError` naming the grid file and cell)."""
        try:
            return config_from_dict(self.raw_config(cell, data_dir), self.base.parent if self.base else self.path.parent)
        except ConfigError as exc:
            raise SweepError(f"sweep grid '{self.path}', cell {cell.id}: {exc}") from None

    def validate(self, data_dir: str | Path | None = None) -> list[tuple[Cell, ExperimentConfig]]:
        """Every cell with its validated config (fails on the first invalid one)."""
        return [(c, self.config(c, data_dir)) for c in self.cells()]


def _grid_error(path: Path, msg: str) -> SweepError:
    return SweepError(f"sweep grid '{path}': {msg}")


def load_grid(path: str | Path) -> SweepGrid:
    """Read and check a grid file: known top-level keys, non-empty value lists, labels that fit,
    distinct seeds and cell ids. Config keys and values are checked per cell by
    :meth:`SweepGrid.validate` (done by :func:`run_sweep` before anything runs)."""
    path = Path(path)
    try:
        raw = read_toml(path, "sweep grid file")
    except ConfigError as exc:
        raise SweepError(str(exc)) from None
    unknown = sorted(set(raw) - set(GRID_FILE_KEYS))
    if unknown:
        raise _grid_error(path, f"unknown key '{unknown[0]}'; allowed top-level keys: {list(GRID_FILE_KEYS)}")
    grid = SweepGrid(path=path, name=str(raw.get("name") or path.stem))
    for key in ("name", "description", "base", "engine", "mask_source"):
        if key in raw and not isinstance(raw[key], str):
            raise _grid_error(path, f"'{key}' = {raw[key]!r} must be a string")
    grid.description = raw.get("description", "")
    if slug(grid.name) != grid.name:
        raise _grid_error(path, f"name = {grid.name!r} may only hold letters, digits, '_', '.', '+', '=', ',' and '-'")
    if raw.get("base"):
        grid.base = (path.parent / raw["base"]).resolve()
        if not grid.base.is_file():
            raise _grid_error(path, f"base = {raw['base']!r}: config file '{grid.base}' does not exist (the path is relative to the grid file)")
    grid.engine = raw.get("engine", "ray")
    if grid.engine not in ENGINES:
        raise _grid_error(path, f"engine = {grid.engine!r} is not allowed; choose one of {list(ENGINES)}")
    grid.mask_source = raw.get("mask_source", "consensus")
    if grid.mask_source not in MASK_SOURCES_SWEEP:
        raise _grid_error(path, f"mask_source = {grid.mask_source!r} is not allowed; choose one of {list(MASK_SOURCES_SWEEP)}")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds:
        raise _grid_error(path, f"seeds = {seeds!r} must be a non-empty list of integers >= 0")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise _grid_error(path, f"seeds = {seeds!r} must be distinct integers >= 0")
    grid.seeds = list(seeds)
    for section in ("fixed", "grid", "labels"):
        if not isinstance(raw.get(section, {}), Mapping):
            raise _grid_error(path, f"'{section}' must be a table, got {raw[section]!r}")
    grid.fixed = _flatten(raw.get("fixed", {}))
    grid.grid = _flatten(raw.get("grid", {}))
    for key in ("seed",):
        if key in grid.fixed or key in grid.grid:
            raise _grid_error(path, "'seed' cannot be set in [fixed] or [grid]; list the seeds in the top-level 'seeds'")
    both = sorted(set(grid.fixed) & set(grid.grid))
    if both:
        raise _grid_error(path, f"key '{both[0]}' is both in [fixed] and in [grid]")
    for key, values in grid.grid.items():
        if not isinstance(values, list):
            raise _grid_error(path, f"[grid] '{key}' = {values!r} must be a list of values")
        if not values:
            raise _grid_error(path, f"[grid] '{key}' = [] is empty; give at least one value")
        if len({json.dumps(to_jsonable(v), sort_keys=True) for v in values}) != len(values):
            raise _grid_error(path, f"[grid] '{key}' = {values!r} repeats a value")
    grid.labels = _flatten(raw.get("labels", {}))
    for key, names in grid.labels.items():
        if key not in grid.grid:
            raise _grid_error(path, f"[labels] '{key}' is not a key of [grid] ({sorted(grid.grid)})")
        if not isinstance(names, list) or len(names) != len(grid.grid[key]) or not all(isinstance(n, str) and n for n in names):
            raise _grid_error(path, f"[labels] '{key}' = {names!r} must be a list of {len(grid.grid[key])} non-empty strings, one per value")
        if len(set(names)) != len(names):
            raise _grid_error(path, f"[labels] '{key}' = {names!r} repeats a label")
    ids = [c.id for c in grid.cells()]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise _grid_error(path, f"two cells get the id {dup[0]!r}; give readable names to the values in [labels]")
    return grid


# ------------------------------------------------------------- summary rows
def row_profiles(rows: Sequence[Mapping]) -> list[str]:
    """Profile names that have metrics in ``rows`` (``NAME_accuracy`` ...), most capable first: each row lists its
    run's profiles in that order (a cell may lack some), and the orders are merged; the three built-in profiles
    when no row has any yet."""
    tail = "_channel_sparsity"  # a profile metric that no whole-run metric and no other profile metric ends with
    orders = [[k[: -len(tail)] for k in r if k.endswith(tail)] for r in rows]
    names = list(dict.fromkeys(n for order in orders for n in order))
    merged: list[str] = []
    while len(merged) < len(names):
        left = [n for n in names if n not in merged]
        # the first name that no row puts after another name still left (else the first left)
        free = [n for n in left if not any(n in o and any(m in left for m in o[: o.index(n)]) for o in orders)]
        merged.append((free or left)[0])
    return merged or list(PROFILE_NAMES)


def summary_columns(grid_keys: Sequence[str], rows: Sequence[Mapping] = ()) -> list[str]:
    """Columns of ``summary.csv``: cell, grid keys, seed, status, run metrics, per-profile metrics (of every
    profile in ``rows``: :func:`row_profiles`), error."""
    return (["cell", *grid_keys, "seed", "status", *RUN_METRICS]
            + [f"{p}_{m}" for p in row_profiles(rows) for m in PROFILE_METRICS] + ["error"])


def summary_row(cell: Cell, results: Mapping | None, status: str, wall_s: float | None, error: str = "") -> dict:
    """One ``summary.csv`` row for a cell (``results`` None when it failed)."""
    row: dict[str, Any] = {"cell": cell.id, **cell.labels, "seed": cell.seed, "status": status, "wall_s": wall_s, "error": error}
    if results:
        d = results["dense"]
        row.update({"dense_accuracy": d.get("accuracy"), "dense_flops": d.get("flops"), "dense_macs": d.get("macs"),
                    "dense_params": d.get("params"),
                    "bytes_total": results["totals"]["bytes_up"] + results["totals"]["bytes_down"]})
        for p, e in results["profiles"].items():
            for m in PROFILE_METRICS:
                row[f"{p}_{m}"] = e.get(m)
    return row


def read_summary(path: str | Path, keys: Sequence[str] = ()) -> list[dict]:
    """Rows of a ``summary.csv``: numbers parsed, empty cells -> None; the grid ``keys`` stay text (labels)."""
    import csv

    def parse(v: str):
        if v == "":
            return None
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return v

    with open(path, newline="") as fh:
        text = {"cell", "status", "error", *keys}
        return [{k: (v if k in text else parse(v)) for k, v in r.items()} for r in csv.DictReader(fh)]


def _num(v) -> float | None:
    if v is None or v == "" or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def aggregate(rows: Sequence[Mapping], keys: Sequence[str]) -> list[dict]:
    """Group ``rows`` by the grid ``keys`` (first-seen order) and average finished cells over seeds.

    Returns one dict per group: ``keys`` (key -> label), ``n`` (finished cells), ``failed``,
    ``seeds`` and ``stats``: metric -> (mean, sample std, count) over the finished cells
    that have a value (std 0 for a single value).
    """
    groups: dict[tuple, dict] = {}
    for r in rows:
        gk = tuple(str(r.get(k)) for k in keys)
        g = groups.setdefault(gk, {"keys": {k: r.get(k) for k in keys}, "rows": []})
        g["rows"].append(r)
    metrics = list(RUN_METRICS) + [f"{p}_{m}" for p in row_profiles(rows) for m in PROFILE_METRICS]
    out = []
    for g in groups.values():
        done = [r for r in g["rows"] if r.get("status") == "done"]
        stats = {}
        for m in metrics:
            vals = [x for x in (_num(r.get(m)) for r in done) if x is not None]
            if vals:
                mu, sd = mean_std(vals)
                stats[m] = (mu, sd, len(vals))
        out.append({"keys": g["keys"], "n": len(done), "failed": sum(r.get("status") == "failed" for r in g["rows"]),
                    "missing": sum(r.get("status") not in ("done", "failed") for r in g["rows"]),
                    "seeds": [r.get("seed") for r in done], "stats": stats})
    return out


def fmt_stat(stat: tuple | None, scale: float = 100.0, digits: int = 1) -> str:
    """``"61.2 ± 0.8"`` from an :func:`aggregate` statistic; ``–`` when missing."""
    if not stat:
        return "–"
    mu, sd, _ = stat
    return f"{mu * scale:.{digits}f} ± {sd * scale:.{digits}f}"


def paired_differences(rows: Sequence[Mapping], keys: Sequence[str], metric: str) -> list[tuple[dict, list[float]]]:
    """``metric`` of each grid point after the first (in the order of ``rows``) minus the first grid point's,
    paired by seed (seeds finished in both with a value). Returns (grid point labels, per-seed differences)
    per grid point."""
    points: dict[tuple, dict] = {tuple(str(r.get(k)) for k in keys): {} for r in rows}
    for r in rows:
        if r.get("status") == "done" and _num(r.get(metric)) is not None:
            points[tuple(str(r.get(k)) for k in keys)][str(r.get("seed"))] = _num(r.get(metric))
    if len(points) < 2:
        return []
    (_, ref), *rest = points.items()
    return [(dict(zip(keys, point)), [vals[s] - ref[s] for s in vals if s in ref]) for point, vals in rest]


def _paired_lines(rows: Sequence[Mapping], keys: Sequence[str], short: Mapping[str, str], present: Sequence[str]) -> list[str]:
    """The summary's table of paired differences from the first grid point (accuracy in points, traffic in
    GB); empty with fewer than two grid points."""
    acc = {p: paired_differences(rows, keys, f"{p}_accuracy") for p in present}
    traffic = paired_differences(rows, keys, "bytes_total")
    if not rows or not traffic:
        return []
    first = ", ".join(f"{short[k]} = {rows[0].get(k)}" for k in keys)
    points = [pt for pt, _ in traffic]

    def cell(diffs: list[float], scale: float, digits: int) -> str:
        if not diffs:
            return "–"
        m, se = mean_se([scale * d for d in diffs])
        m = 0.0 if round(m, digits) == 0 else m  # no "-0.0"
        return f"{m:+.{digits}f}" + (" (1 seed)" if math.isnan(se) else f" ({se:.{digits}f})")

    lines = ["", f"Paired by seed, each grid point minus the first (`{first}`"
             + (", the first of the cross product" if len(keys) > 1 else "") + "): test accuracy in points and the run's "
             "traffic (every message, bytes up + down) in GB, mean (standard error) over the n seeds finished in both; "
             "per-seed values in the CSV.", "",
             "| " + " | ".join(short[k] for k in keys) + " | n | " + " | ".join(f"Δ {p}" for p in present) + " | Δ traffic (GB) |",
             "|" + "---|" * (len(keys) + 2 + len(present))]
    for pt in points:
        def of(pairs):
            return next((d for q, d in pairs if q == pt), [])
        n = min([len(of(acc[p])) for p in present if of(acc[p])] + [len(of(traffic))])
        lines.append("| " + " | ".join([pt[k] for k in keys] + [str(n)] + [cell(of(acc[p]), 100.0, 1) for p in present]
                                       + [cell(of(traffic), 1e-9, 3)]) + " |")
    return lines


# ----------------------------------------------------------------- running
def _same_config(results: Mapping, cfg: ExperimentConfig) -> bool:
    from fedprune.federated import acting_config, resolve_data_dir

    want = json.loads(json.dumps(to_jsonable(config_to_dict(resolve_data_dir(cfg)))))
    return acting_config(results.get("config") or {}) == acting_config(want)


def _finished(cell_dir: Path, cfg: ExperimentConfig, mask_source: str) -> dict | None:
    """The cell's results when it finished with this config and mask source, else None."""
    path = cell_dir / "results.json"
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if results.get("mask_source", "consensus") != mask_source or not _same_config(results, cfg):
        return None
    return results


def run_sweep(grid: SweepGrid, out: str | Path, data_dir: str | Path | None = None,
              runner: Callable | None = None, echo: Callable[[str], None] | None = None) -> list[dict]:
    """Run every unfinished cell of ``grid`` into ``out/cells/<id>/`` and write the summary.

    Every cell's config is validated first. ``runner(cfg, cell_dir, engine, mask_source)``
    defaults to :func:`fedprune.federated.simulate`. Returns the summary rows.
    """
    if runner is None:
        from fedprune.federated import simulate as runner  # noqa: N813
    echo = echo or log.info
    out = Path(out)
    cells = grid.validate(data_dir)  # every cell's config, before anything runs
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sweep.json", {"grid_file": str(grid.path), "grid": grid.path.read_text(), "engine": grid.engine,
                                    "mask_source": grid.mask_source, "cells": [c.id for c, _ in cells]})
    rows, t_start, ran = [], time.perf_counter(), 0
    keys = list(grid.grid)
    n = len(cells)
    for cell, cfg in cells:
        cdir = out / "cells" / cell.id
        what = f"[sweep] cell {cell.index + 1}/{n} {cell.describe()}"
        results = _finished(cdir, cfg, grid.mask_source)
        if results is not None:
            meta = _read_meta(cdir)
            rows.append(summary_row(cell, results, "done", meta.get("wall_s", results["totals"]["wall_s"])))
            echo(f"{what}: finished earlier, skipped")
            continue
        if (cdir / "results.json").is_file():
            echo(f"{what}: results.json was written with another config; running it again")
            (cdir / "results.json").unlink()
        echo(f"{what} ...")
        cdir.mkdir(parents=True, exist_ok=True)
        (cdir / "error.txt").unlink(missing_ok=True)
        handler = logging.FileHandler(cdir / "run.log", mode="w")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logging.getLogger().addHandler(handler)
        t0 = time.perf_counter()
        try:
            results = runner(cfg, cdir, engine=grid.engine, mask_source=grid.mask_source)
        except Exception as exc:  # a crashed cell is recorded and the sweep goes on
            wall = time.perf_counter() - t0
            err = f"{type(exc).__name__}: {exc}"
            write_text(cdir / "error.txt", traceback.format_exc())
            rows.append(summary_row(cell, None, "failed", wall, err.splitlines()[0][:300] if err else ""))
            echo(f"{what}: FAILED after {wall:.0f} s: {err.splitlines()[0][:300]} (see {cdir / 'error.txt'})")
        else:
            wall = time.perf_counter() - t0
            write_json(cdir / "cell.json", {"cell": cell.id, "wall_s": wall, "seed": cell.seed, "values": cell.values})
            rows.append(summary_row(cell, results, "done", wall))
            accs = ", ".join([f"dense {results['dense']['accuracy']:.3f}"]
                             + [f"{p} {e['accuracy']:.3f}" for p, e in results["profiles"].items()])
            echo(f"{what}: done in {wall:.0f} s; test acc {accs}")
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()
        ran += 1
        write_csv(out / "summary.csv", rows, summary_columns(keys, rows))  # progress so far
    write_csv(out / "summary.csv", rows, summary_columns(keys, rows))
    failed = sum(r["status"] != "done" for r in rows)
    echo(f"[sweep] {grid.name}: {n} cells, {ran} run now ({time.perf_counter() - t_start:.0f} s), {n - ran} finished earlier, {failed} failed")
    return rows


def _read_meta(cdir: Path) -> dict:
    try:
        return json.loads((cdir / "cell.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# ---------------------------------------------------------------- reporting
def _setting(grid: SweepGrid, cfg: ExperimentConfig, images: tuple[int, int] | None) -> str:
    """One paragraph stating the setting (keys that vary say so)."""
    varies = set(grid.grid)

    def v(key: str, text: str, what: str = "") -> str:
        """``text``, or "<what> varies" when the grid varies ``key``."""
        return f"{what or key.rsplit('.', 1)[-1]} varies (see the tables)" if key in varies else text

    fed, d = cfg.federated, cfg.data
    if d.dataset == "cifar10":
        data = f"CIFAR-10 subset ({images[0]:,} train / {images[1]:,} test images)" if images else "CIFAR-10"
    else:
        data = f"synthetic data ({images[0]:,} train / {images[1]:,} test images)" if images else "synthetic data"
    part = d.partition + ((" (alpha varies, see the tables)" if "data.alpha" in varies else f" (alpha {d.alpha:g})") if d.partition == "dirichlet" else "")
    profiles = ", ".join(f"{p} {100 * cfg.profiles[p].sparsity:.0f}% channels pruned, {cfg.profiles[p].local_epochs} local epoch(s), "
                         f"batch {cfg.profiles[p].batch_size}" for p in cfg.profiles)
    sampled = f", {fed.clients_per_round} sampled per round" if fed.clients_per_round else ", all every round"
    return (
        f"{cfg.model.name} on {data}; {v('federated.num_clients', f'{fed.num_clients} clients', 'number of clients')}{sampled}; "
        f"{v('federated.proportions', 'profile mix ' + pretty_value(fed.proportions), 'profile mix')}; "
        f"{v('data.partition', part + ' shards', 'partition')}, {100 * d.val_fraction:.0f}% of each kept for local validation; "
        f"{v('federated.warmup_rounds', f'{fed.warmup_rounds} dense warm-up', 'dense warm-up rounds')} + "
        f"{v('federated.finetune_rounds', f'{fed.finetune_rounds} fine-tune rounds', 'fine-tune rounds')} (the warm-up rounds train the dense model, "
        "every client with its profile's local epochs and batch size); "
        f"criterion {v('pruning.criterion', cfg.pruning.criterion)}, aggregation {v('federated.aggregation', fed.aggregation)}, "
        f"allocation {v('pruning.allocation', cfg.pruning.allocation)}; mask source {grid.mask_source}; engine {grid.engine}. "
        f"Profiles: {profiles}."
    )


def render_summary(grid: SweepGrid, rows: Sequence[Mapping], cfg: ExperimentConfig, images: tuple[int, int] | None = None,
                   plots: Sequence[tuple[str, str]] = (), wall_note: str = "") -> str:
    """``summary.md``: the setting, accuracy mean ± std over seeds per grid point, model cost per profile."""
    keys = list(grid.grid)
    short = grid.short_names()
    groups = aggregate(rows, keys)
    present = _present_profiles(rows, groups)
    n_test = images[1] if images else None
    cells_done = sum(r.get("status") == "done" for r in rows)
    lines = [
        f"# Sweep `{grid.name}`" + (f": {grid.description}" if grid.description else ""),
        "",
        f"Generated by `python simulation/sweep.py --grid {_rel(grid.path)}` (base config `{_rel(grid.base) if grid.base else 'defaults'}`).",
        "",
        _setting(grid, cfg, images),
        "",
        "Fixed overrides: " + (", ".join(f"`{k} = {json.dumps(to_jsonable(v))}`" for k, v in grid.fixed.items()) or "none") + ". "
        + "Grid: " + ("; ".join(f"`{k}` ∈ {{{_grid_values(grid, k)}}}" for k in grid.grid) or "none")
        + f"; seeds {grid.seeds} (a seed changes the shards, the profile assignment and the initial weights).",
        "",
        f"{len(rows)} cells: {cells_done} finished, {sum(r.get('status') == 'failed' for r in rows)} failed"
        + (f", {len(rows) - cells_done - sum(r.get('status') == 'failed' for r in rows)} not run" if any(r.get("status") not in ("done", "failed") for r in rows) else "")
        + f". {wall_note}".rstrip(),
        "",
        f"Test accuracy (%) of each profile's sub-network after fine-tuning{f' on {n_test:,} test images' if n_test else ''}, "
        "mean ± std over the seeds (n = finished seeds); dense = the global model at the end of the dense warm-up "
        "(so it has had fewer rounds of training than the sub-networks). "
        "– = no client of that profile.",
        "",
        "| " + " | ".join(short[k] for k in keys) + (" | " if keys else "") + "n | dense | " + " | ".join(present) + " |",
        "|" + "---|" * (len(keys) + 2 + len(present)),
    ]
    for g in groups:
        cells = [str(g["keys"][k]) for k in keys] + [str(g["n"]) + (f" ({g['failed']} failed)" if g["failed"] else "")
                                                      + (f" ({g['missing']} not run)" if g["missing"] else ""),
                                                      fmt_stat(g["stats"].get("dense_accuracy"))]
        cells += [fmt_stat(g["stats"].get(f"{p}_accuracy")) for p in present]
        lines.append("| " + " | ".join(cells) + " |")
    lines += _paired_lines(rows, keys, short, present)
    lines += ["", "Local validation accuracy (%) on the clients' own held-out data (mean over clients, then mean ± std over seeds):", "",
              "| " + " | ".join(short[k] for k in keys) + (" | " if keys else "") + " | ".join(present) + " |",
              "|" + "---|" * (len(keys) + len(present))]
    for g in groups:
        lines.append("| " + " | ".join([str(g["keys"][k]) for k in keys] + [fmt_stat(g["stats"].get(f"{p}_local_val_accuracy")) for p in present]) + " |")
    lines += ["", "Model cost per profile (mean over seeds; sub-network sizes follow the profile's channel sparsity):", "",
              "| " + " | ".join(short[k] for k in keys) + (" | " if keys else "") + "profile | clients | channels pruned | params | MFLOPs | MMACs | FLOPs ↓ vs dense |",
              "|" + "---|" * (len(keys) + 7)]
    for g in groups:
        s = g["stats"]
        dense_flops = s.get("dense_flops", (float("nan"),))[0]
        for p in present:
            if f"{p}_flops" not in s:
                continue
            fl = s[f"{p}_flops"][0]
            lines.append("| " + " | ".join([str(g["keys"][k]) for k in keys] + [
                p, f"{s[f'{p}_clients'][0]:.1f}" if f"{p}_clients" in s else "–",
                f"{100 * s[f'{p}_channel_sparsity'][0]:.0f}%", f"{s[f'{p}_params'][0]:,.0f}", f"{fl / 1e6:.2f}",
                f"{s[f'{p}_macs'][0] / 1e6:.2f}", f"{dense_flops / fl:.2f}x"]) + " |")
    walls = [x for x in (_num(r.get("wall_s")) for r in rows) if x is not None]
    if walls:
        lines += ["", f"Wall time per cell: mean {sum(walls) / len(walls):.0f} s, total {sum(walls) / 60:.1f} min (as measured when each cell ran)."]
    failed = [r for r in rows if r.get("status") == "failed"]
    if failed:
        lines += ["", "Failed cells:", ""] + [f"- `{r['cell']}`: {r.get('error') or 'see error.txt'}" for r in failed]
    for title, name in plots:
        lines += ["", f"![{title}]({name})"]
    return "\n".join(lines) + "\n"


def _rel(path: Path | None) -> str:
    if path is None:
        return ""
    from fedprune.config import REPO_ROOT

    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _numeric_keys(grid: SweepGrid) -> list[str]:
    return [k for k, vals in grid.grid.items() if len(vals) > 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)]


#: (matplotlib marker, the symbol that names it in an axis label) per profile, most capable first.
_MARKERS = (("^", "▲"), ("s", "■"), ("v", "▼"), ("D", "◆"), ("P", "✚"), ("X", "✖"), ("o", "●"), ("<", "◀"), (">", "▶"), ("h", "⬢"))


def _marker(j: int) -> tuple[str, str]:
    """The :data:`_MARKERS` entry of the ``j``-th profile (cycling)."""
    return _MARKERS[j % len(_MARKERS)]


def _present_profiles(rows: Sequence[Mapping], groups: Sequence[dict]) -> list[str]:
    """Profiles (most capable first) with an accuracy in some aggregated group of :func:`aggregate`."""
    return [p for p in row_profiles(rows) if any(f"{p}_accuracy" in g["stats"] for g in groups)]


def plot_summary(grid: SweepGrid, rows: Sequence[Mapping], out_dir: Path, prefix: str = "") -> list[tuple[str, str]]:
    """PNG plots into ``out_dir``: accuracy vs FLOPs per profile (one line per grid point) and,
    for each numeric grid key, accuracy vs that key (log x for wide ranges). Returns (title, file name)."""
    import matplotlib.pyplot as plt

    from fedprune.plots import finish, plain_log_ticks

    keys = list(grid.grid)
    short = grid.short_names()
    groups = aggregate(rows, keys)
    made = []
    if not any(g["n"] for g in groups):
        return made
    present = _present_profiles(rows, groups)

    def label(g) -> str:
        return ", ".join(f"{short[k]}={g['keys'][k]}" for k in keys) or grid.name

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, g in enumerate(groups):
        s = g["stats"]
        # (name, MFLOPs, (mean, std) accuracy, marker); the dense point is not on the profiles' line:
        # it is measured after the warm-up only.
        prof = [(p, s[f"{p}_flops"][0] / 1e6, s[f"{p}_accuracy"], _marker(j)[0]) for j, p in enumerate(present)
                if f"{p}_flops" in s and f"{p}_accuracy" in s]
        dense = [("dense", s["dense_flops"][0] / 1e6, s["dense_accuracy"], "*")] if "dense_flops" in s and "dense_accuracy" in s else []
        pts = sorted(prof + dense, key=lambda t: t[1])
        if not pts:
            continue
        line = ax.errorbar([x for _, x, _, _ in pts], [100 * a[0] for _, _, a, _ in pts], yerr=[100 * a[1] for _, _, a, _ in pts],
                           ls="none", capsize=3, label=f"{label(g)} (n={g['n']})")
        color = line[0].get_color()
        if len(prof) > 1:
            line_pts = sorted(prof, key=lambda t: t[1])
            ax.plot([x for _, x, _, _ in line_pts], [100 * a[0] for _, _, a, _ in line_pts], color=color)
        for name, x, a, marker in pts:
            ax.scatter([x], [100 * a[0]], marker=marker, s=160 if name == "dense" else 60, color=color, zorder=3)
    ax.set_xscale("log")
    plain_log_ticks(ax.xaxis)
    name = f"{prefix}accuracy_vs_flops.png"
    finish(fig, ax, out_dir / name, "MFLOPs per image (log): " + " · ".join([f"{p} {_marker(j)[1]}" for j, p in reversed(list(enumerate(present)))] + ["dense ★"]),
           "test accuracy (%)", f"Sweep {grid.name}: accuracy vs FLOPs per profile (mean ± std)", legend_size=7)
    made.append(("accuracy vs FLOPs per profile", name))
    for key in _numeric_keys(grid):
        others = [k for k in keys if k != key]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        series: dict[tuple, list] = {}
        x_of = {(grid.labels[key][i] if key in grid.labels else value_label(v)): float(v) for i, v in enumerate(grid.grid[key])}
        for g in groups:
            x = x_of[str(g["keys"][key])]
            rest = tuple(f"{short[k]}={g['keys'][k]}" for k in others)
            for p in ["dense", *present]:
                st = g["stats"].get(f"{p}_accuracy")
                if st:
                    series.setdefault(rest + (p,), []).append((x, st))
        for sk, pts in series.items():
            pts.sort(key=lambda t: t[0])
            ax.errorbar([x for x, _ in pts], [100 * s[0] for _, s in pts], yerr=[100 * s[1] for _, s in pts], marker="o", capsize=3,
                        ls="--" if sk[-1] == "dense" else "-", label=", ".join(sk))
        xs = [float(v) for v in grid.grid[key]]
        if min(xs) > 0 and max(xs) / min(xs) >= 50:
            ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{grid.labels[key][i]} ({value_label(v)})" if key in grid.labels else value_label(v)
                            for i, v in enumerate(grid.grid[key])])
        name = f"{prefix}accuracy_vs_{slug(short[key])}.png"
        finish(fig, ax, out_dir / name, f"{key}" + (" (log)" if ax.get_xscale() == "log" else ""), "test accuracy (%)",
               f"Sweep {grid.name}: accuracy vs {short[key]} (mean ± std over seeds)", legend_size=7)
        made.append((f"accuracy vs {short[key]}", name))
    return made


def write_report(grid: SweepGrid, rows: Sequence[Mapping], out: str | Path, data_dir: str | Path | None = None,
                 benchmarks: str | Path | None = None, bench_name: str | None = None, wall_note: str = "") -> Path:
    """``out/summary.csv``, ``summary.md`` and plots; with ``benchmarks`` also
    ``benchmarks/sweep_<name>.md``, ``.csv`` and the PNGs (prefixed ``sweep_<name>_``)."""
    from fedprune.task import load_data

    out = Path(out)
    keys = list(grid.grid)
    write_csv(out / "summary.csv", rows, summary_columns(keys, rows))
    cells = grid.validate(data_dir)
    cfg = cells[0][1]
    try:
        train, test = load_data(cfg)
        images = (len(train), len(test))
    except Exception:  # noqa: BLE001 - the report still works without the image counts
        images = None
    plots = plot_summary(grid, rows, out)
    write_text(out / "summary.md", render_summary(grid, rows, cfg, images, plots, wall_note))
    if benchmarks:
        bdir = Path(benchmarks)
        bdir.mkdir(parents=True, exist_ok=True)
        stem = f"sweep_{bench_name or grid.name}"
        bplots = []
        for title, name in plots:
            shutil.copyfile(out / name, bdir / f"{stem}_{name}")
            bplots.append((title, f"{stem}_{name}"))
        write_csv(bdir / f"{stem}.csv", rows, summary_columns(keys, rows))
        write_text(bdir / f"{stem}.md", render_summary(grid, rows, cfg, images, bplots, wall_note))
        return bdir / f"{stem}.md"
    return out / "summary.md"
