"""Hardware-aware pruning benchmark: latency-table accuracy, budget compliance and accuracy at equal budgets.

    python simulation/bench_hardware.py --data-dir ../shared/data/cifar10-subset

1. Latency lookup table (seed_cnn, batch 1 and 64, fixed threads): predicted
   vs directly measured latency of extracted sub-networks (uniform, random
   per-layer and budget-allocated widths); the table is built 3 times, each
   build followed by its own timing of every width.
2. For each budgeted profile of configs/profiles.toml and each allocation --
   ``budget`` (greedy importance per cost), ``budget_fill`` (``budget_uniform``'s
   widths, then the budget left over filled greedily, most importance per cost
   added first), ``budget_sensitivity`` (``budget``
   with each layer's lost importance weighted by its sensitivity), ``budget_uniform`` (the smallest
   uniform sparsity that meets the budget) and ``constant_cost`` (the
   notebook's hardware-aware method: every channel costs the same) -- prune
   the same dense model (Taylor importance), fine-tune for F epochs, and
   report test accuracy (mean ± std over seeds) and budget compliance
   measured on the extracted model (latency timed on this host, bytes and
   MACs counted). The dense model trained for E + F epochs is the fair reference.
3. The same comparison with tighter latency budgets (``--latency-scales``:
   each profile's latency budgets times the scale; profiles with a latency
   budget only), where the choice of per-layer widths matters more. These run on
   ``--seeds`` (default 0-9) too, unless ``--scaled-seeds`` names others.

Writes benchmarks/hardware.md, .json and a PNG.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedprune.centralized import centralized_config, prune_experiment, train_dense  # noqa: E402
from fedprune.config import config_to_dict, load_config  # noqa: E402
from fedprune.cost import HardwareModel, LatencyLUT, calibration_widths, device_factor, latency_batch  # noqa: E402
from fedprune.data import make_loader  # noqa: E402
from fedprune.groups import discover_groups  # noqa: E402
from fedprune.masks import StructuredMask, extract_submodel  # noqa: E402
from fedprune.metrics import median_host_latency_ms  # noqa: E402
from fedprune.models import get_model  # noqa: E402
from fedprune.plots import finish  # noqa: E402
from fedprune.reporting import benchmark_parser, ci95, fmt_mean_std, mean_se, mean_std, nonnegative_int, read_saved_json, to_jsonable, write_json, write_text  # noqa: E402
from fedprune.task import load_data, make_train_fn, profile_budget_masks, train_config  # noqa: E402
from fedprune.training import evaluate, set_seed  # noqa: E402

log = logging.getLogger("bench_hardware")
#: Passes over all widths when timing them for the latency-table comparison (median taken).
#: How much batch-1 host timings (about 1 ms per image) move on this 2-core VM from one minute to the next
#: (the build-to-build ranges of the latency table, the misses of the end-of-run re-timing).
TIMING_DRIFT = "batch-1 timings of about 1 ms on this 2-core VM move by up to a third from one minute to the next"
LUT_PASSES = 3
#: Independent table builds (each with its own timing of every width) in the latency-table comparison.
LUT_BUILDS = 3
#: Passes over all chosen sub-networks when they are timed again at the end (median taken).
RETIME_PASSES = 5
#: row key -> pruning config overrides
METHODS = {"budget": {"allocation": "budget", "budget_objective": "log", "budget_sensitivity": 0.0},
           "budget_fill": {"allocation": "budget_fill", "budget_objective": "log", "budget_sensitivity": 0.0},
           "budget_sensitivity": {"allocation": "budget", "budget_objective": "log", "budget_sensitivity": 1.0},
           "budget_uniform": {"allocation": "budget_uniform", "budget_sensitivity": 0.0},
           "constant_cost": {"allocation": "constant_cost", "budget_sensitivity": 0.0}}
LABELS = {"budget": "budget-aware (greedy, log importance kept / cost)",
          "budget_fill": "budget-aware fill: uniform widths, then the budget left filled greedily",
          "budget_sensitivity": "budget-aware, layers weighted by sensitivity (option)",
          "budget_uniform": "uniform sparsity meeting the budget", "constant_cost": "constant cost per channel (notebook)"}

#: The budget-aware allocations whose targets are checked (compliance, accuracy vs uniform sparsity).
AWARE = ("budget", "budget_fill", "budget_sensitivity")

# ------------------------------------------------------------ latency table
def lut_accuracy(cfg, threads: int, repeats: int, lut_dir: Path) -> dict:
    """Predicted vs measured latency (ms, host) of extracted seed_cnn sub-networks at batch 1 and 64."""
    shutil.rmtree(lut_dir, ignore_errors=True)  # measure fresh tables in this run
    torch.manual_seed(0)
    model = get_model(cfg.model.name).eval()
    groups = discover_groups(model)
    rng = np.random.default_rng(0)
    widths: dict[str, dict[str, int]] = {}
    for f in (1.0, 0.9, 0.75, 0.6, 0.5, 0.35, 0.2):
        widths[f"uniform {f:.0%}"] = {g.name: max(1, round(f * g.size)) for g in groups}
    for i in range(6):  # random per-group widths, multiples of 8 as the budget allocations keep
        widths[f"random {i}"] = {g.name: 8 * int(rng.integers(max(1, g.size // 80), g.size // 8 + 1)) for g in groups}
    for i in range(2):  # any count: off the kernels' 8-channel fast path
        widths[f"random, any count {i}"] = {g.name: int(rng.integers(max(1, g.size // 10), g.size + 1)) for g in groups}
    out: dict = {"threads": threads, "builds": LUT_BUILDS, "rows": {}}
    hw = HardwareModel(cfg.model.name, None, model, groups, threads=threads, latency_margin=cfg.pruning.latency_margin, cache_dir=lut_dir)
    scores = {g.name: np.asarray(rng.gamma(2.0, size=g.size)) for g in groups}
    for name in ("mobile_cpu", "edge_gpu"):  # widths the budget allocator picks (with a preliminary table build)
        if cfg.profiles[name].budgets:
            c = copy.deepcopy(cfg)
            c.pruning = dataclasses.replace(c.pruning, allocation="budget", budget_sensitivity=0.0)  # random scores: no sensitivity
            (mask,) = profile_budget_masks(c, hw, scores, [name])
            widths[f"budget {name}"] = mask.kept_counts
    models = {label: extract_submodel(model, StructuredMask.from_scores(scores, kept), groups) for label, kept in widths.items()}
    fitted_on = list(calibration_widths(groups).values())
    for label, kept in widths.items():  # widths the table was calibrated on are reported, not counted as held out
        out["rows"][label] = {"kept_fraction": sum(kept.values()) / groups.total_channels, "calibration": kept in fitted_on}
    for build in range(LUT_BUILDS):
        for batch in (1, 64):
            for stale in lut_dir.glob(f"*-b{batch}-t*.json"):  # every build measures its table afresh
                stale.unlink()
            t0 = time.perf_counter()
            lut = LatencyLUT.build(cfg.model.name, None, batch, threads, cache_dir=lut_dir)
            out.setdefault(f"build_s_b{batch}", []).append(time.perf_counter() - t0)
            # Each width timed alone right after the table, exactly as runs measure a sub-network for the
            # budget check (host_latency_ms: warm caches, as on a device running one model); median of 3 passes.
            measured = median_host_latency_ms(models, batch, threads, repeats, LUT_PASSES)
            for label, kept in widths.items():
                pred = lut.predict_ms(kept)
                r = out["rows"][label].setdefault(f"b{batch}", {"predicted_ms": [], "measured_ms": [], "error": []})
                r["predicted_ms"].append(pred)
                r["measured_ms"].append(measured[label])
                r["error"].append(pred / measured[label] - 1.0)
            log.info("[lut] build %d/%d batch %d: %d widths timed (table built in %.1f s)", build + 1, LUT_BUILDS, batch, len(widths),
                     out[f"build_s_b{batch}"][-1])
    return out


# ------------------------------------------------------- budgets and accuracy
def scaled_latency_budgets(cfg, scale: float):
    """Copy of ``cfg`` whose profiles' latency budgets (ms) are multiplied by ``scale``; other budgets unchanged."""
    if not scale > 0:
        raise ValueError(f"a latency budget scale must be > 0, got {scale!r}")
    c = copy.deepcopy(cfg)
    for prof in c.profiles.values():
        prof.budgets = {k: v * scale if latency_batch(k) is not None else v for k, v in prof.budgets.items()}
    return c


def latency_profiles(cfg, profiles) -> list[str]:
    """The profiles among ``profiles`` that have a latency budget."""
    return [p for p in profiles if any(latency_batch(k) is not None for k in cfg.profiles[p].budgets)]


def _run_key(key: dict) -> dict:
    """The part of a cache key that shapes a centralized pruning run: the config without the
    sections and keys centralized runs never read (:data:`fedprune.centralized.NOT_CENTRALIZED_KEYS`),
    data_dir resolved."""
    key = json.loads(json.dumps(to_jsonable(key)))
    key["config"] = centralized_config(key["config"])
    key.pop("methods", None)  # cached per allocation: see budget_runs
    return key


def _cached_rows(cache: Path | None, key: dict) -> tuple[dict, dict]:
    """Rows and allocation overrides of a seed saved under ``cache`` with the same run key (else empty)."""
    if cache is None or not cache.is_file():
        return {}, {}
    saved = json.loads(cache.read_text())
    if _run_key(saved["key"]) != _run_key(key):
        return {}, {}
    return saved["rows"], saved["key"].get("methods", {})


def _method_rows(rows: dict, profiles) -> dict:
    """A seed's rows: the dense references, then per profile the allocations of :data:`METHODS` in their order."""
    return {**{k: v for k, v in rows.items() if "/" not in k}, **{f"{p}/{m}": rows[f"{p}/{m}"] for p in profiles for m in METHODS}}


def state_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state (names and tensor bytes): whether two trainings gave the same weights."""
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _same_dense(cached: dict, dense) -> bool:
    """Whether the dense model trained again is the cached seed's: the same weights (by :func:`state_digest`),
    or, for a seed cached before digests were saved, the same test accuracy."""
    if "state_sha256" in cached:
        return cached["state_sha256"] == state_digest(dense.model)
    return cached["accuracy"] == dense.metrics["accuracy"]


def budget_runs(cfg, seeds, profiles, data, cache_dir: Path | None = None, tag: str = "", rerun: tuple[str, ...] = (),
                ran: str = "") -> list[dict]:
    """Per seed: dense references and, per profile and allocation, the pruned result.

    Each finished seed is saved under ``cache_dir`` (``seed<N><tag>.json``) with the config it
    ran with; a rerun with the same config reuses it (an interrupted benchmark resumes by seed).
    Allocations are cached one by one: an allocation added to :data:`METHODS` (or whose
    overrides changed) runs alone on a seed that has the others, after the dense model is
    trained again -- and if that model differs from the cached one (:func:`_same_dense`), the
    whole seed runs again. Rows of allocations no longer in :data:`METHODS` are dropped. An
    allocation added later runs in another session than the cached ones: with its own latency
    tables and timings, so its latency-budgeted widths were sized on other measurements;
    ``rerun`` names allocations to run again on every cached seed (e.g. beside an added one).
    Each row that runs here carries ``ran`` (when this benchmark started), so the report can say
    which rows came from which run (:func:`_provenance`).
    """
    per_seed = []
    for i, seed in enumerate(seeds):
        c = copy.deepcopy(cfg)
        c.seed = seed
        cache = cache_dir / f"seed{seed}{tag}.json" if cache_dir else None
        key = {"config": config_to_dict(c), "profiles": list(profiles)}
        rows, done = _cached_rows(cache, key)
        todo = [m for m, o in METHODS.items() if m in rerun or to_jsonable(o) != done.get(m) or any(f"{p}/{m}" not in rows for p in profiles)]
        if rows and not todo:
            log.info("[seed %d %d/%d] reusing %s", seed, i + 1, len(seeds), cache)
            per_seed.append(_method_rows(rows, profiles))
            continue
        t0 = time.perf_counter()
        log.info("[seed %d %d/%d%s] dense training, %d epochs%s", seed, i + 1, len(seeds), tag, c.train.epochs,
                 f" (cached seed; allocations to add: {', '.join(todo)})" if rows else "")
        dense = train_dense(c, data=data)
        if rows and not _same_dense(rows["dense"], dense):
            log.warning("[seed %d] the dense model trained again (accuracy %.4f) is not the cached one (%.4f): running every "
                        "allocation again", seed, dense.metrics["accuracy"], rows["dense"]["accuracy"])
            rows, todo = {}, list(METHODS)
        if not rows:
            same = copy.deepcopy(dense.model)
            set_seed(seed + 2)
            make_train_fn(make_loader(data[0], c.train.batch_size, train=True, seed=seed + 2), train_config(c))(same, c.pruning.finetune_epochs)
            rows = {"dense": {"accuracy": dense.metrics["accuracy"], "epochs": dense.epochs, "state_sha256": state_digest(dense.model)},
                    "dense same budget": {"accuracy": evaluate(same, make_loader(data[1], 256, train=False))["accuracy"],
                                          "epochs": dense.epochs + c.pruning.finetune_epochs}}
        for prof in profiles:
            for method, overrides in ((m, METHODS[m]) for m in todo):
                c2 = copy.deepcopy(c)
                c2.pruning = dataclasses.replace(c2.pruning, budget_profile=prof, **overrides)
                res = prune_experiment(c2, dense, data)["pruned"]
                rows[f"{prof}/{method}"] = {k: res[k] for k in ("accuracy", "accuracy_before_finetune", "channel_sparsity", "macs", "params",
                                                                "budgets", "kept_channels", "latency_ms", "total_epochs")}
                if ran:
                    rows[f"{prof}/{method}"]["ran"] = ran
                b = res["budgets"]
                log.info("[seed %d] %s %s: acc %.3f, %.0f%% channels pruned, budgets %s (%.0f s so far)", seed, prof, method, res["accuracy"],
                         100 * res["channel_sparsity"], ", ".join(f"{k} {v['measured']:.4g}/{v['limit']:.4g} {'ok' if v['ok'] else 'MISSED'}"
                                   + (f" (relative to dense {v['measured_relative']:.4g})" if "measured_relative" in v else "") for k, v in b.items()),
                         time.perf_counter() - t0)
        rows = _method_rows(rows, profiles)
        per_seed.append(rows)
        if cache:
            write_json(cache, {"key": {**key, "methods": METHODS}, "rows": rows})
    return per_seed


def retime_latency_budgets(sections: dict[float, list[dict]], cfg, args) -> dict[str, float]:
    """Time every chosen sub-network with a latency budget again, all in one session at the end
    (each alone, :data:`RETIME_PASSES` passes over all of them, median), and store the device ms
    as ``budgets[key]["retimed"]`` of its row: whether a missed budget was the width or the minute
    it was timed in. Latency depends on the widths only, so the widths are rebuilt with any weights.
    The dense model is timed in the same passes; returns its host ms per batch (``{"b1": ms, "b64": ms}``),
    how fast the host ran during the re-time (:func:`_retime_note`)."""
    torch.manual_seed(0)
    model = get_model(cfg.model.name).eval()
    groups = discover_groups(model)
    ones = {g.name: np.ones(g.size) for g in groups}
    dense_ms: dict[str, float] = {}
    for batch in (1, 64):
        todo: dict[str, tuple[dict, float]] = {}
        models = {}
        for scale, per_seed in sections.items():
            c = scaled_latency_budgets(cfg, scale)
            for i, rows in enumerate(per_seed):
                for key, row in rows.items():
                    if "/" not in key or f"latency_ms_b{batch}" not in row["budgets"]:
                        continue
                    name = f"x{scale:g}/{i}/{key}"
                    todo[name] = (row["budgets"][f"latency_ms_b{batch}"], c.profiles[key.split("/")[0]].compute_speed)
                    models[name] = extract_submodel(model, StructuredMask.from_scores(ones, row["kept_channels"]), groups)
        if not models:
            continue
        models["dense"] = extract_submodel(model, StructuredMask.from_scores(ones, {g.name: g.size for g in groups}), groups)
        t0 = time.perf_counter()
        host = median_host_latency_ms(models, batch, args.threads, args.latency_repeats, RETIME_PASSES)
        for name, (budget, speed) in todo.items():
            budget["retimed"] = host[name] * device_factor(f"latency_ms_b{batch}", speed)
        dense_ms[f"b{batch}"] = host["dense"]
        log.info("[re-time] batch %d: %d sub-networks timed again with the dense model, %d passes (%.0f s; dense %.3g ms)", batch,
                 len(models) - 1, RETIME_PASSES, time.perf_counter() - t0, host["dense"])
    return dense_ms


# ----------------------------------------------------------------- report
def _fmt_value(key: str, v: float | None) -> str:
    if v is None:
        return "–"
    if latency_batch(key) is not None:
        return f"{v:.2f} ms"
    if "bytes" in key:
        return f"{v / 1e3:.0f} KB"
    return f"{v / 1e6:.2f} M"


def _host(args) -> str:
    return f"torch {torch.__version__}, {platform.machine()}, {args.threads} threads for latency"


def render(lut: dict | None, sections: dict[float, list[dict]] | None, cfg, args, n_test: int | None,
           retime_dense: dict[str, float] | None = None) -> str:
    """benchmarks/hardware.md: the latency-table section, then one equal-budget section per latency-budget scale."""
    lines = ["# Hardware-aware pruning: cost models and budgets", ""]
    host = _host(args)
    if lut:
        lines += [
            "## Latency lookup table: prediction vs measurement",
            "",
            f"seed_cnn sub-networks, extracted and in deployment form (BN folded, channels_last); {host}. The table is measured "
            "per layer on a grid of kept in/out fractions (0.125-1) and interpolated; a scale on the layer sum and the rest "
            "(activations, pooling, overhead) are fitted to whole-model timings of 8 calibration widths (dense, uniform "
            "75/50/25%, 4 random widths from a random stream of their own; `fedprune.cost.LatencyCalibration`); rows marked "
            "'calibration width' are among them and left out of the error summary. Budget allocations keep multiples of 8 "
            "channels (off that, oneDNN kernels are ~10% slower even with fewer channels, which the table does not model: "
            "see the 'any count' rows). Measured: each width timed alone as every run times a sub-network "
            f"for its budget check (`fedprune.metrics.host_latency_ms`, warm caches), median of {LUT_PASSES} passes over all widths; "
            f"error = predicted / measured - 1. The table is built {lut['builds']} times from scratch, each build followed by its own "
            "timing of every width; the table below shows the median over builds (error range in brackets) and the lines under "
            f"it each build alone, which is what one run gets. {TIMING_DRIFT[0].upper() + TIMING_DRIFT[1:]}, "
            "so budgets are not left to the table: every chosen sub-network with a latency budget is timed and "
            "re-allocated if needed (`HardwareModel.refit_latency`).",
            "",
            "| width | channels kept | b1 predicted | b1 measured | b1 error [range] | b64 predicted | b64 measured | b64 error [range] |",
            "|---|---|---|---|---|---|---|---|",
        ]

        def cell(r: dict, digits: int) -> str:
            e = r["error"]
            return (f"{np.median(r['predicted_ms']):.{digits}f} | {np.median(r['measured_ms']):.{digits}f} | "
                    f"{100 * np.median(e):+.1f}% [{100 * min(e):+.0f}, {100 * max(e):+.0f}]")

        for label, r in lut["rows"].items():
            tag = " (calibration width)" if r.get("calibration") else ""
            lines.append(f"| {label}{tag} | {100 * r['kept_fraction']:.0f}% | {cell(r['b1'], 3)} | {cell(r['b64'], 2)} |")
        held_out = [r for r in lut["rows"].values() if not r.get("calibration")]
        lines += ["", f"Over the {len(held_out)} held-out widths (calibration widths excluded):", ""]
        for b in ("b1", "b64"):
            errs = np.array([r[b]["error"] for r in held_out])  # widths x builds
            med = np.abs(np.median(errs, axis=1))
            per_build = "; ".join(f"build {i + 1}: {100 * np.abs(col).mean():.1f}%, {int((np.abs(col) <= 0.15).sum())}/{col.size}"
                                  for i, col in enumerate(errs.T))
            lines.append(f"- batch {b[1:]}: each build alone, mean |error| and widths within the 15% target: {per_build}. "
                         f"Median over builds: mean |error| {100 * med.mean():.1f}%, max {100 * med.max():.1f}%, "
                         f"{int((med <= 0.15).sum())}/{med.size} within 15%. A table takes "
                         f"{np.median(lut[f'build_s_{b}']):.1f} s to measure (cached on disk afterwards).")
        lines.append("")
    retime_note = _retime_note(retime_dense, lut)
    for scale, per_seed in (sections or {}).items():
        lines += budget_section(per_seed, scaled_latency_budgets(cfg, scale), args, n_test, scale, retime_note)
    return "\n".join(lines)


def _retime_note(retime_dense: dict[str, float] | None, lut: dict | None) -> str:
    """A sentence on how fast the host ran during the re-time: the dense model's host ms in those passes, against its
    timings when the latency tables were checked at the start of the run (median over builds)."""
    if not retime_dense:
        return ""
    parts = []
    for b, ms in retime_dense.items():
        start = np.median(lut["rows"]["uniform 100%"][b]["measured_ms"]) if lut and "uniform 100%" in lut.get("rows", {}) else None
        parts.append(f"{ms:.2f} ms at batch {b[1:]}" + (f" ({100 * (ms / start - 1):+.0f}% against {start:.2f} ms at the start of the run)"
                                                        if start else ""))
    return (" In the re-time the dense model, timed in the same passes, took " + " and ".join(parts)
            + ": how fast the host ran while the re-timed values were taken.")


def _measured_met(rows: list[dict]) -> list[bool]:
    """Per budget of each row, whether it held as measured in the run."""
    return [b["ok"] for r in rows for b in r["budgets"].values()]


def _relative_met(rows: list[dict]) -> str:
    """Budgets met relative to the dense model timed alongside (latency: ``ok_relative``) or as counted (bytes, MACs)."""
    checks = [b.get("ok_relative", b["ok"]) for r in rows for b in r["budgets"].values()]
    return f"{sum(checks)}/{len(checks)}"


def _retimed_met(rows: list[dict]) -> str:
    """Budgets met when re-timed at the end (latency) or as counted (bytes, MACs), and the missed re-timed values."""
    checks, missed = [], []
    for r in rows:
        for k, b in r["budgets"].items():
            if "retimed" in b:
                checks.append(b["retimed"] <= b["limit"])
                if not checks[-1]:
                    missed.append(f"{b['retimed']:.3f}")
            else:
                checks.append(b["ok"])
    return f"{sum(checks)}/{len(checks)}" + (f" (missed: {', '.join(missed)} ms)" if missed else "")


def _seed_span(seeds) -> str:
    """Seeds as ranges: ``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    spans: list[list[int]] = []
    for s in sorted(seeds):
        if spans and s == spans[-1][-1] + 1:
            spans[-1].append(s)
        else:
            spans.append([s])
    return ", ".join(f"{sp[0]}-{sp[-1]}" if len(sp) > 1 else f"{sp[0]}" for sp in spans)


def _provenance(per_seed: list[dict], seeds, methods, this_run: str | None = None) -> str:
    """A sentence saying which benchmark run each allocation's rows come from (each row's ``ran``: when the run that
    pruned it started; rows cached before rows carried it are 'an earlier run'); empty when all come from one run."""
    runs: dict[str, dict[str, list[int]]] = {}
    for seed, r in zip(seeds, per_seed):
        for m in methods:
            for stamp in sorted({row.get("ran", "an earlier run") for k, row in r.items() if k.endswith(f"/{m}")}):
                runs.setdefault(stamp, {}).setdefault(m, []).append(seed)
    if len(runs) <= 1:
        return ""
    parts = []
    for stamp in sorted(runs, key=lambda s: (s != "an earlier run", s)):
        by_seeds: dict[tuple, list[str]] = {}
        for m, ss in runs[stamp].items():
            by_seeds.setdefault(tuple(ss), []).append(m)
        what = "; ".join(f"{'all allocations' if len(ms) == len(methods) else ', '.join(f'`{m}`' for m in ms)} on seeds {_seed_span(ss)}"
                         for ss, ms in by_seeds.items())
        parts.append(f"{stamp}{' (this run)' if stamp == this_run else ''}: {what}")
    return (" The rows come from several runs of the same config, cached per seed (each pruning the same dense model, with latency "
            "tables and timings of its own; allocations of one run ran one after the other on each seed), by the time of the run: "
            + "; ".join(parts) + ".")


def _fill_floor(per_seed: list[dict], profiles) -> str:
    """How often ``budget_fill`` kept at least ``budget_uniform``'s channels in every group (each run refits its own latency
    corrections, so its uniform floor can differ from the uniform row's)."""
    pairs = [(r[f"{p}/budget_fill"]["kept_channels"], r[f"{p}/budget_uniform"]["kept_channels"]) for r in per_seed for p in profiles]
    wider = sum(all(f[g] >= u[g] for g in u) for f, u in pairs)
    more = [100 * (sum(f.values()) / sum(u.values()) - 1) for f, u in pairs]
    return (f"- {LABELS['budget_fill']}: at least the uniform row's channels in every layer in {wider}/{len(pairs)} seed × profile "
            f"pairs; {np.mean(more):+.1f}% channels kept vs the uniform row on average (range {min(more):+.1f}% to {max(more):+.1f}%). "
            "Each row is timed and refit on its own, so the uniform widths under the fill can differ from the uniform row's.")


def section_seeds(args, scale: float) -> list[int]:
    """Seeds of one equal-budget comparison: ``--seeds`` at the default budgets, ``--scaled-seeds``
    (if given) at the scaled latency budgets."""
    return args.seeds if scale == 1.0 or not getattr(args, "scaled_seeds", None) else args.scaled_seeds


def _added_seeds(args) -> str:
    """A sentence naming the seeds that ran at the default budgets only (empty when every section ran the same seeds)."""
    scaled = section_seeds(args, 0.5)
    extra = [s for s in args.seeds if s not in scaled]
    if not extra:
        return ""
    return (f" Seeds {', '.join(map(str, extra))} ran at the default budgets only (`--seeds`); "
            f"the tighter budgets keep seeds {', '.join(map(str, scaled))} (`--scaled-seeds`).")


def ran_methods(per_seed: list[dict]) -> list[str]:
    """The allocations of :data:`METHODS` that every seed ran (a table from before one was added lacks it)."""
    return [m for m in METHODS if all(any(k.endswith(f"/{m}") for k in r) for r in per_seed)]


def budget_section(per_seed: list[dict], cfg, args, n_test: int | None, scale: float, retime_note: str = "") -> list[str]:
    """Markdown lines of one equal-budget comparison (``cfg`` carries the budgets it ran with)."""
    relative = any("ok_relative" in b for r in per_seed for k, row in r.items() if "/" in k for b in row["budgets"].values())
    lines: list[str] = []
    seeds = section_seeds(args, scale)
    first = per_seed[0]
    profiles = list(dict.fromkeys(k.split("/")[0] for k in first if "/" in k))
    methods = ran_methods(per_seed)
    aware = [m for m in AWARE if m in methods]
    ref_m, _ = mean_std(r["dense same budget"]["accuracy"] for r in per_seed)
    host = _host(args)
    if scale == 1.0:
        lines += ["## Equal budgets: accuracy after fine-tuning and compliance", ""]
    else:
        lines += [f"## Tighter latency budgets (x{scale:g}): accuracy after fine-tuning and compliance", "",
                  f"As above, with every latency budget of configs/profiles.toml times {scale:g} (profiles with a latency budget "
                  f"only; the dense references are retrained with the same seeds{'' if seeds == args.seeds else ': ' + ', '.join(map(str, seeds))}). "
                  "At the default budgets the allocations prune less than half of these profiles' channels "
                  "and end within a point of each other; a tighter budget forces each allocation "
                  "to choose which layers to thin." + _provenance(per_seed, seeds, methods, getattr(args, "started", None)), ""]
    if scale == 1.0:  # the method, once; later sections say "as above"
        lines += [
        f"{cfg.model.name} on the CIFAR-10 subset ({n_test} test images; one accuracy point = {n_test / 100:.1f} images); "
        f"{cfg.train.epochs} dense epochs, {cfg.pruning.criterion} importance, one-shot pruning to each profile's budgets "
        f"(configs/profiles.toml; 'layers weighted by sensitivity': each layer's lost log-share of importance times "
        f"(its sensitivity / the mean over layers) ** {METHODS['budget_sensitivity']['budget_sensitivity']:g}, at least 0.05, where "
        f"sensitivity is the mean loss increase when the layer alone is pruned "
        f"{'/'.join(f'{100 * r:.0f}' for r in cfg.pruning.sensitivity_ratios)}% (no fine-tuning) on the scoring images), {cfg.pruning.finetune_epochs} fine-tuning epochs ({cfg.train.optimizer}, "
        f"{'cosine LR from ' if cfg.train.cosine else 'constant LR '}{cfg.train.lr:g} in each phase); accuracy mean ± std over seeds "
        f"{', '.join(str(s) for s in seeds)}. Budgets are device estimates: latency = host ms / compute_speed; "
        f"the allocators aim latency at {100 * (1 - cfg.pruning.latency_margin):.0f}% of the budget (margin for the table's error). "
        f"Measured: latency timed on this host ({host}) on the extracted model, bytes and MACs counted on it. "
        f"'met' counts seeds × budgets that hold as measured; 'met, re-timed at the end': every chosen sub-network with a "
        f"latency budget timed again after all runs, all in one session ({RETIME_PASSES} passes over all of them, median; bytes and MACs as "
        f"counted), with the re-timed values of those that miss: {TIMING_DRIFT}, so a miss in 'met' alone may be the minute, "
        "not the width."
        + (" 'met, relative to the dense model': each latency timed against the dense model in the same passes, right after the "
           "run's own timing (their ratio, median over passes, times the latency table's prediction for the dense model: "
           "`HardwareModel.relative_latency`); a host that is faster or slower for a while moves both timings, not their ratio."
           if relative else "")
        + retime_note + _added_seeds(args) + _provenance(per_seed, seeds, methods, getattr(args, "started", None)), ""]
    lines += [
        f"Dense references: {fmt_mean_std(r['dense']['accuracy'] for r in per_seed)} after {first['dense']['epochs']} epochs, "
        f"{fmt_mean_std(r['dense same budget']['accuracy'] for r in per_seed)} after {first['dense same budget']['epochs']} epochs (same total budget).",
        "",
        "| profile | budgets | allocation | channels pruned | accuracy after FT | Δ vs dense same budget | measured cost (seed " f"{seeds[0]})" " | met | "
        + ("met, relative to the dense model | " if relative else "") + "met, re-timed at the end |",
        "|---|---|---|---|---|---|---|---|" + ("---|" if relative else "") + "---|",
    ]
    for prof in profiles:
        budgets = cfg.profiles[prof].budgets
        btxt = ", ".join(f"{k} ≤ {_fmt_value(k, v)}" for k, v in budgets.items())
        for method in methods:
            rows = [r[f"{prof}/{method}"] for r in per_seed]
            m, _ = mean_std(r["accuracy"] for r in rows)
            checks = _measured_met(rows)
            cost = ", ".join(f"{k} {_fmt_value(k, b['measured'])}" for k, b in rows[0]["budgets"].items())
            lines.append(f"| {prof} | {btxt} | {LABELS[method]} | {100 * np.mean([r['channel_sparsity'] for r in rows]):.0f}% | "
                         f"{fmt_mean_std(r['accuracy'] for r in rows)} | {100 * (m - ref_m):+.1f} | {cost} | {sum(checks)}/{len(checks)} | "
                         + (f"{_relative_met(rows)} | " if relative else "") + f"{_retimed_met(rows)} |")
    lines += ["", "### Targets", ""]
    for method in aware:
        rows = [v for r in per_seed for k, v in r.items() if k.endswith(f"/{method}")]
        met, retimed = _measured_met(rows), _retimed_met(rows)
        lines.append(f"- {LABELS[method]}: meets {sum(met)}/{len(met)} budgets as measured after extraction "
                     f"(target 100%: {'met' if all(met) else 'NOT met'}); "
                     + (f"relative to the dense model timed alongside: {_relative_met(rows)}; " if relative else "")
                     + f"re-timed together at the end: {retimed}.")
    if {"budget_fill", "budget_uniform"} <= set(methods):
        lines.append(_fill_floor(per_seed, profiles))
    for method in aware:
        for prof in profiles:
            a, _ = mean_std(r[f"{prof}/{method}"]["accuracy"] for r in per_seed)
            u, _ = mean_std(r[f"{prof}/budget_uniform"]["accuracy"] for r in per_seed)
            diffs = [100 * (r[f"{prof}/{method}"]["accuracy"] - r[f"{prof}/budget_uniform"]["accuracy"]) for r in per_seed]
            (_, d_s), (d_m, se) = mean_std(diffs), mean_se(diffs)
            ci = tie = ""
            if len(diffs) > 1:  # one seed has no spread: no standard error, no interval
                lo, hi = ci95(d_m, se, len(diffs))
                ci = f"standard error of the mean {se:.2f}, 95% CI of the mean difference {lo:+.2f} to {hi:+.2f}, "
                tie = "" if a >= u else (", a tie: the 95% CI includes 0" if hi >= 0 else ", the 95% CI is below 0")
            lines.append(f"- {prof}, {LABELS[method]}: {100 * a:.1f}% vs uniform sparsity {100 * u:.1f}% at the same budget "
                         f"({d_m:+.2f} ± {d_s:.2f} points, {ci}"
                         f"paired per seed: {', '.join(f'{d:+.1f}' for d in diffs)}; "
                         f"target ≥ 0: {'met' if a >= u else 'NOT met'}{tie}).")
    lines.append("")
    return lines


def plot(per_seed: list[dict], path: Path, title: str = "Equal hardware budgets") -> None:
    import matplotlib.pyplot as plt

    first = per_seed[0]
    profiles = list(dict.fromkeys(k.split("/")[0] for k in first if "/" in k))
    methods = ran_methods(per_seed)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        ms = [mean_std(r[f"{p}/{method}"]["accuracy"] for r in per_seed) for p in profiles]
        ax.bar(np.arange(len(profiles)) + (j - (len(methods) - 1) / 2) * width, [100 * m for m, _ in ms], width, yerr=[100 * s for _, s in ms], capsize=3, label=LABELS[method])
    m, _ = mean_std(r["dense same budget"]["accuracy"] for r in per_seed)
    ax.axhline(100 * m, color="black", ls="--", label="dense, same epochs")
    ax.set_xticks(np.arange(len(profiles)), profiles)
    finish(fig, ax, path, None, "test accuracy after fine-tuning (%)", f"{title}: allocation methods", "y", 7, loc="lower left")


def main(argv=None) -> int:
    # Ten seeds: at the default budgets the allocations end within a point of each other (README: why 5-9 were added).
    parser = benchmark_parser(__doc__, seeds=tuple(range(10)))
    parser.add_argument("--criterion", default="taylor")
    parser.add_argument("--profiles", nargs="+", default=["edge_gpu", "mobile_cpu", "microcontroller"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads for latency tables and measurements (eval.latency_threads)")
    parser.add_argument("--train-threads", type=int, default=2)
    parser.add_argument("--latency-repeats", type=int, default=30)
    parser.add_argument("--latency-scales", type=float, nargs="+", default=[1.0, 0.5],
                        help="equal-budget comparisons to run: each profile's latency budgets times each scale (1 = configs/profiles.toml; "
                             "other scales run the profiles with a latency budget only)")
    parser.add_argument("--scaled-seeds", type=nonnegative_int, nargs="*", default=[],
                        help="seeds of the comparisons at scaled latency budgets (default, or an empty list: the same as --seeds)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["lut", "budgets"])
    parser.add_argument("--rerun", nargs="*", default=[], choices=list(METHODS),
                        help="allocations to run again on every cached seed, e.g. beside an added allocation so that the two are "
                             "compared within one session (the same latency tables and host)")
    parser.add_argument("--render-only", action="store_true", help="write OUT/hardware.md again from OUT/hardware.json (same numbers)")
    parser.add_argument("--runs-dir", default=str(ROOT / "runs/bench_hardware"))
    args = parser.parse_args(argv)
    for scale in args.latency_scales:
        if not scale > 0:
            parser.error(f"--latency-scales: every scale must be > 0, got {scale:g}")
    from fedprune.config import PROFILE_NAMES

    unknown = [p for p in args.profiles if p not in PROFILE_NAMES]
    if unknown:
        parser.error(f"--profiles {unknown[0]!r} is not a profile; allowed: {list(PROFILE_NAMES)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = load_config(ROOT / "configs/centralized.toml", {
        "data": {"data_dir": "" if args.render_only else args.data_dir},  # rendering reads no data
        # Cosine LR for dense training and for fine-tuning: every method ends at a small LR, so
        # the comparison is not decided by where the last Adam steps happened to land.
        "train": {"epochs": args.epochs, "threads": args.train_threads, "cosine": True},
        "pruning": {"finetune_epochs": args.finetune_epochs, "criterion": args.criterion},
        "eval": {"latency_threads": args.threads, "latency_repeats": args.latency_repeats},
    })
    out = Path(args.out)
    if args.render_only:  # the tables again from the last run's JSON: nothing is trained or timed
        saved = read_saved_json(out / "hardware.json", "--render-only")
        sections = {float(k): v for k, v in {"1": saved["seeds"], **saved["scaled"]}.items() if v}
        args.seeds, args.threads = saved["args"]["seeds"], saved["args"]["threads"]  # as the run had them
        args.scaled_seeds = saved["args"].get("scaled_seeds")
        args.started = saved["args"].get("started")
        write_text(out / "hardware.md", render(saved["lut"], sections, cfg, args, saved["n_test"], saved.get("retime_dense_ms")))
        print((out / "hardware.md").read_text())
        return 0
    args.started = time.strftime("%Y-%m-%d %H:%M")  # stamped on every row this run prunes (the report's provenance)
    os.environ["FEDPRUNE_CACHE_DIR"] = args.runs_dir  # every latency table of this run lives (fresh) under RUNS_DIR/lut
    lut = None if "lut" in args.skip else lut_accuracy(cfg, args.threads, args.latency_repeats, Path(args.runs_dir) / "lut")
    sections, n_test = {}, None
    if "budgets" not in args.skip:
        data = load_data(cfg)
        n_test = len(data[1])
        for scale in args.latency_scales:
            c = scaled_latency_budgets(cfg, scale)
            profiles = args.profiles if scale == 1.0 else latency_profiles(c, args.profiles)
            if not profiles:
                log.warning("latency budget scale %g: none of the profiles %s has a latency budget; skipped", scale, args.profiles)
                continue
            tag = "" if scale == 1.0 else f"-latency{scale:g}"
            log.info("[budgets%s] profiles %s", tag, ", ".join(profiles))
            sections[scale] = budget_runs(c, section_seeds(args, scale), profiles, data, Path(args.runs_dir) / "seeds", tag, tuple(args.rerun),
                                          args.started)
            plot(sections[scale], out / f"hardware_accuracy{tag}.png",
                 "Equal hardware budgets" + ("" if scale == 1.0 else f" (latency budgets x{scale:g})"))
    retime_dense = retime_latency_budgets(sections, cfg, args) if sections else None
    write_json(out / "hardware.json", {"args": vars(args), "lut": lut, "seeds": sections.get(1.0),
                                        "scaled": {f"{k:g}": v for k, v in sections.items() if k != 1.0}, "n_test": n_test,
                                        "retime_dense_ms": retime_dense})
    write_text(out / "hardware.md", render(lut, sections, cfg, args, n_test, retime_dense))
    print((out / "hardware.md").read_text())
    return 0


if __name__ == "__main__":
    from fedprune.cli import run_reporting_errors  # noqa: E402

    sys.exit(run_reporting_errors(main, "bench_hardware.py"))
