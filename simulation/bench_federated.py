"""Federated benchmark: consensus pruning vs baselines, traffic, and the framework's cost.

    python simulation/bench_federated.py --data-dir ../shared/data/cifar10-subset

On the same shards, seeds and round budget (R1 dense warm-up + R2 fine-tune rounds; per seed one
warm-up run that every other run continues from, see ``FederatedPruning.warm_start``):

* dense FedAvg for R1 + R2 rounds (the fair dense reference);
* federated consensus pruning with magnitude (L2), Taylor, Fisher, BN-scale (network slimming's |gamma|) and
  reconstruction (greedy order that keeps the next layers' input best correlated, see fedprune.importance) importance,
  and Taylor and reconstruction with sensitivity-adaptive per-layer widths (``pruning.allocation = "sensitivity"``;
  every other row keeps the config's allocation);
* local-only masks (each client its own top-k, no consensus) and random masks, also at each sensitivity-adaptive
  row's widths (its random twin: every consensus row is compared with random masks of the same per-layer widths,
  right after pruning, after k fine-tune rounds and at the end);
* a centralized mask with federated fine-tuning: the same run, but the masks come from Taylor importance
  computed at the server on every client's scoring images pooled (mask source "central", a simulation-only
  baseline); it isolates what computing the importance federatedly costs;
* centralized pruning with the same budget (R1 dense epochs, prune, R2 epochs), everything on the pooled data.

``--extra-seeds 3 4 5`` runs one consensus row and its random twin (``--extra-rows``; default the reconstruction
row with sensitivity-adaptive widths) for more seeds, each with its own warm-up, and reports the pair over all seeds,
paired by seed, with a 95% confidence interval ("More seeds for selected pairs"); with ``--skip accuracy cost scale traffic``
only those runs happen.

The "traffic" part runs consensus Taylor with ``federated.score_model = "last_warmup"`` (the importance round scores
the model the clients received for the last warm-up round, so it sends no model) for the table's seeds, each with its
own warm-up, against the table's consensus Taylor, which scores the model after the warm-up, delivered to the clients.

All federated runs use Flower's Simulation Engine with the Ray backend (two
clients at a time on 2 cores). The framework's cost is measured as wall time of configs/quick.toml
under Flower + Ray vs the plain in-process loop, and peak RSS of the whole
process tree (driver, Ray, workers) with 10, 50 and 100 registered clients.
Writes benchmarks/federated.md, .json and plots.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedprune.centralized import DenseRun, prune_experiment, train_dense  # noqa: E402
from fedprune.config import config_to_dict, load_config  # noqa: E402
from fedprune.metrics import process_tree_rss  # noqa: E402
from fedprune.checkpoint import CHECKPOINT_FILE, load_checkpoint  # noqa: E402
from fedprune.federated import acting_config, resolve_data_dir, simulate, without_final_eval  # noqa: E402
from fedprune.plots import plain_log_ticks, save  # noqa: E402
from fedprune.reporting import ci95, fmt_mean_std, mean_se, mean_std, nonnegative_int, t95, write_json, write_text  # noqa: E402
from fedprune.masks import StructuredMask  # noqa: E402
from fedprune.task import load_data, model_groups, pruned_accuracy  # noqa: E402

log = logging.getLogger("bench_federated")
PROFILES = ("edge_gpu", "mobile_cpu", "microcontroller")

#: The row that isolates where the importance is computed: the same federated run, but the masks come from
#: Taylor importance on every client's scoring images pooled at the server (mask source "central").
CENTRAL_MASK = "centralized mask (Taylor on pooled data), federated fine-tuning"
#: (label, mask source, criterion, other pruning settings)
FEDERATED = [
    ("consensus magnitude", "consensus", "l2", {}),
    ("consensus Taylor", "consensus", "taylor", {}),
    ("consensus Fisher", "consensus", "fisher", {}),
    ("consensus BN scale", "consensus", "bn_gamma", {}),
    ("consensus reconstruction", "consensus", "reconstruction", {}),
    ("consensus Taylor, sensitivity-adaptive widths", "consensus", "taylor", {"allocation": "sensitivity"}),
    ("local-only masks", "local", "taylor", {}),
    ("random masks", "random", "taylor", {}),
    ("random masks, consensus Taylor's sensitivity-adaptive widths", "random", "taylor", {"allocation": "sensitivity"}),
    ("consensus reconstruction, sensitivity-adaptive widths", "consensus", "reconstruction", {"allocation": "sensitivity"}),
    ("random masks, consensus reconstruction's sensitivity-adaptive widths", "random", "reconstruction", {"allocation": "sensitivity"}),
    (CENTRAL_MASK, "central", "taylor", {}),
]


def baseline(source: str, label: str) -> str:
    """The ``source`` row ("local" or "random") to compare row ``label`` with: the one with the same criterion and
    other pruning settings (so the same per-layer widths: sensitivity-adaptive widths come from the criterion's
    sensitivity), else the one with the same other settings, else the plain one."""
    _, _, criterion, overrides = next(row for row in FEDERATED if row[0] == label)
    same = [lab for lab, src, c, o in FEDERATED if src == source and o == overrides and c == criterion]
    same += [lab for lab, src, _, o in FEDERATED if src == source and o == overrides]
    return same[0] if same else {"local": "local-only masks", "random": "random masks"}[source]


#: The consensus row ``--extra-seeds`` runs by default (with its random twin): the one that leads its twin at every
#: profile on the mean of the first three seeds, by about one standard error (over ten seeds it no longer does at
#: microcontroller; see benchmarks/federated.md).
EXTRA_ROWS = ["consensus reconstruction, sensitivity-adaptive widths"]


def extra_pairs(labels: list[str]) -> list[str]:
    """The rows ``--extra-seeds`` runs: each consensus row in ``labels`` and its random twin (:func:`baseline`).
    Raises ValueError naming a label that is not a consensus row, and the allowed ones."""
    consensus = [lab for lab, src, *_ in FEDERATED if src == "consensus"]
    bad = [lab for lab in labels if lab not in consensus]
    if bad:
        raise ValueError(f"--extra-rows {bad}: not a consensus row; allowed: {consensus}")
    return [lab for label in labels for lab in (label, baseline("random", label))]


# ----------------------------------------------------------- process memory
class PeakRSS:
    """Samples the RSS of this process tree every ``interval`` seconds; ``.peak`` in bytes."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, process_tree_rss(os.getpid())[1])
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, process_tree_rss(os.getpid())[1])


# ---------------------------------------------------------------- the runs
def _plain(obj):
    return json.loads(json.dumps(obj))


def finished(run_dir: Path, cfg, mask_source: str) -> str | None:
    """How a restarted benchmark treats the run in ``run_dir``: "same" -- finished with this config and
    mask source, reuse its results; "resume" -- its checkpoint comes from a run with this config, except
    perhaps how finished runs are evaluated (:data:`~fedprune.federated.FINAL_EVAL_KEYS`, e.g. static BN):
    resuming it runs the steps it lacks (none when it finished) and the final evaluation; None -- run it."""
    want = _plain(config_to_dict(resolve_data_dir(cfg)))
    path = run_dir / "results.json"
    if path.is_file():
        res = json.loads(path.read_text())
        if acting_config(res.get("config", {})) == acting_config(want) and res.get("mask_source") == mask_source:
            return "same"
    if (run_dir / CHECKPOINT_FILE).is_file():
        ckpt = load_checkpoint(run_dir)
        if ckpt["mask_source"] == mask_source and without_final_eval(_plain(ckpt["config"])) == without_final_eval(want):
            return "resume"
    return None


def run_or_reuse(cfg, run_dir: Path, mask_source: str, what: str, **kw) -> dict:
    state = finished(run_dir, cfg, mask_source)
    if state == "same":
        log.info("%s: finished before with the same config, reusing %s", what, run_dir)
        return json.loads((run_dir / "results.json").read_text())
    if state == "resume":
        log.info("%s: resuming %s (its checkpoint is from this config; a finished run is only evaluated again)", what, run_dir)
        return simulate(cfg, run_dir, engine="ray", mask_source=mask_source, resume=True)
    log.info("%s", what)
    return simulate(cfg, run_dir, engine="ray", mask_source=mask_source, **kw)


def run_tag(label: str) -> str:
    """The run-directory name of a FEDERATED row (``<tag>_s<seed>``)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")


def federated_runs(cfg, seeds, out: Path, labels: list[str] | None = None, dense: bool = True) -> dict:
    """Per seed: one dense warm-up of R1 rounds, then every method (and dense FedAvg's remaining R2
    rounds) continues from it (``warm_start``): the same results as separate runs, R1 rounds cheaper each.
    Runs that finished before with the same config are reused (:func:`finished`). ``labels``: only these
    FEDERATED rows (default all); ``dense``: also dense FedAvg."""
    rows: dict[str, list[dict]] = {}
    for seed in seeds:
        c = copy.deepcopy(cfg)
        c.seed = seed
        warm = copy.deepcopy(c)
        warm.federated = dataclasses.replace(warm.federated, finetune_rounds=0)
        warm.eval.latency = False
        warm_dir = out / f"warmup_s{seed}"
        run_or_reuse(warm, warm_dir, "none", f"seed {seed}: shared dense warm-up, {c.federated.warmup_rounds} rounds")
        if dense:
            total = c.federated.warmup_rounds + c.federated.finetune_rounds
            rows.setdefault("dense FedAvg", []).append(
                run_or_reuse(c, out / f"dense_s{seed}", "none", f"seed {seed}: dense FedAvg, {total} rounds", warm_start=warm_dir))
        for label, source, criterion, overrides in FEDERATED:
            if labels is not None and label not in labels:
                continue
            c2 = copy.deepcopy(c)
            c2.pruning = dataclasses.replace(c2.pruning, criterion=criterion, **overrides)
            rows.setdefault(label, []).append(run_or_reuse(c2, out / f"{run_tag(label)}_s{seed}", source, f"seed {seed}: {label}",
                                                           warm_start=warm_dir))
    return rows


def _cached(path: Path, key: dict, normalise=lambda config: config) -> dict | None:
    """The ``accuracy`` kept in ``path`` when it was computed with config ``key`` (both compared after
    ``normalise``), else None."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved["accuracy"] if normalise(saved.get("config", {})) == normalise(key) else None


def centralized_runs(cfg, seeds, runs: Path) -> list[dict]:
    """Centralized pruning with the same budget: R1 dense epochs, prune per profile (Taylor), R2 fine-tune epochs.
    Each seed's accuracies are kept in ``runs/central_s<seed>.json`` with the config and reused by a restart."""
    out = []
    data = load_data(cfg)
    for seed in seeds:
        c = copy.deepcopy(cfg)
        c.seed = seed
        c.eval.latency = False
        c.train.threads = 2
        cache = runs / f"central_s{seed}.json"
        key = _plain(config_to_dict(c))
        # Keys of the federated final evaluation (static BN...) do not act here.
        hit = _cached(cache, key, without_final_eval)
        if hit is not None:
            out.append(hit)
            log.info("seed %d centralized: finished before with the same config, reusing %s", seed, cache)
            continue
        dense = train_dense(c, epochs=c.federated.warmup_rounds, data=data)
        accs = {}
        for p in PROFILES:
            c.pruning = dataclasses.replace(c.pruning, criterion="taylor", sparsity=c.profiles[p].sparsity, schedule="one_shot",
                                            finetune_epochs=c.federated.finetune_rounds)
            res = prune_experiment(c, DenseRun(dense.model, dense.init_state, dense.rewind_state, dense.metrics, dense.epochs), data)
            accs[p] = res["pruned"]["accuracy"]
        out.append(accs)
        write_json(cache, {"config": key, "accuracy": accs})
        log.info("seed %d centralized: %s", seed, accs)
    return out


#: Rows whose clients of one profile share one mask (local-only masks differ per client).
ONE_SHOT_ROWS = [label for label, source, *_ in FEDERATED if source != "local"]


def one_shot_runs(cfg, seeds, runs: Path) -> dict[str, list[dict]]:
    """Each row's masks cut from its seed's warm-up model, right after pruning (no fine-tuning): test accuracy
    with the warm-up model's BatchNorm statistics ("warmup_bn") and with statistics recomputed on the clients'
    shards pooled ("static_bn", :func:`fedprune.task.pruned_accuracy`). Reads ``runs/warmup_s<seed>/global_model.pt``
    and each row's ``masks.npz`` (the masks its importance round made from that model); each seed's accuracies are
    kept in ``runs/one_shot_s<seed>.json`` with the config; a restart computes only the rows it lacks."""
    out: dict[str, list[dict]] = {}
    groups = model_groups(cfg)
    for seed in seeds:
        c = copy.deepcopy(cfg)
        c.seed = seed
        cache, key = runs / f"one_shot_s{seed}.json", _plain(config_to_dict(c))
        accs = _cached(cache, key) or {}
        missing = [label for label in ["dense", *ONE_SHOT_ROWS] if label not in accs]
        if missing:
            log.info("seed %d: masks of %s on the warm-up model, before fine-tuning", seed, ", ".join(missing))
            state = torch.load(runs / f"warmup_s{seed}" / "global_model.pt")
            n = c.federated.num_clients

            def both(mask):
                return {"warmup_bn": pruned_accuracy(c, state, mask), "static_bn": pruned_accuracy(c, state, mask, bn_partitions=n)}

            for label in missing:
                if label == "dense":
                    accs[label] = both(StructuredMask.dense(groups))
                    continue
                arrays = np.load(runs / f"{run_tag(label)}_s{seed}" / "masks.npz")
                accs[label] = {p: both(StructuredMask({g.name: arrays[f"{p}/{g.name}"] for g in groups})) for p in PROFILES}
            write_json(cache, {"config": key, "accuracy": accs})
        for label, acc in accs.items():
            out.setdefault(label, []).append(acc)
    return out


#: The row of the "traffic" part: consensus Taylor scoring the model its clients received for the last warm-up
#: round (``federated.score_model = "last_warmup"``), so the importance round sends no model; compared with the
#: table's "consensus Taylor", which scores the model after the warm-up, delivered to the clients.
NO_DELIVERY = "consensus Taylor, scoring the last warm-up round's model"


def no_delivery_runs(cfg, seeds, runs: Path) -> list[dict]:
    """The :data:`NO_DELIVERY` row per seed, each with its own warm-up (a shared warm-up does not keep the model its
    last round sent, and restarted clients would need it sent again); reused when finished with the same config."""
    out = []
    for seed in seeds:
        c = copy.deepcopy(cfg)
        c.seed = seed
        c.pruning = dataclasses.replace(c.pruning, criterion="taylor")
        c.federated = dataclasses.replace(c.federated, score_model="last_warmup")
        out.append(run_or_reuse(c, runs / f"{run_tag(NO_DELIVERY)}_s{seed}", "consensus", f"seed {seed}: {NO_DELIVERY} (own warm-up)"))
    return out


def framework_cost(quick_cfg, out: Path) -> dict:
    """configs/quick.toml under Flower + Ray vs the same ClientApp in a plain in-process loop."""
    res = {}
    for engine in ("inprocess", "ray"):
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            r = simulate(quick_cfg, out / f"quick_{engine}", engine=engine)
        res[engine] = {"wall_s": time.perf_counter() - t0, "peak_rss_gb": mem.peak / 2**30, "summary": r["summary"]}
        log.info("quick config, %s: %.1f s, peak RSS %.2f GiB", engine, res[engine]["wall_s"], res[engine]["peak_rss_gb"])
    return res


def scale_runs(cfg, client_counts, out: Path) -> dict:
    """Peak RSS of the process tree with N registered clients, 10 sampled per round, under Ray."""
    res = {}
    for n in client_counts:
        c = copy.deepcopy(cfg)
        c.federated = dataclasses.replace(c.federated, num_clients=n, clients_per_round=min(10, n), warmup_rounds=1, finetune_rounds=1)
        c.eval.latency = False
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            simulate(c, out / f"scale_{n}", engine="ray")
        res[n] = {"wall_s": time.perf_counter() - t0, "peak_rss_gb": mem.peak / 2**30}
        log.info("%d clients: %.1f s, peak RSS %.2f GiB", n, res[n]["wall_s"], res[n]["peak_rss_gb"])
    return res


# ---------------------------------------------------------------- reporting
def _acc(runs: list[dict], profile: str) -> list[float]:
    return [r["profiles"][profile]["accuracy"] for r in runs]


def _gap(rows, label: str, other: str, profile: str) -> float:
    """Mean accuracy of row ``label`` minus row ``other`` at ``profile``, in points."""
    return 100 * (mean_std(_acc(rows[label], profile))[0] - mean_std(_acc(rows[other], profile))[0])


def _gaps(rows, label: str, other: str) -> str:
    """:func:`_gap` per profile: ``"+0.3 / +0.1 / -0.1"``."""
    return " / ".join(f"{_gap(rows, label, other, p):+.1f}" for p in PROFILES)


def _paired(rows, label: str, other: str, profile: str) -> list[float]:
    """Accuracy of row ``label`` minus row ``other`` at ``profile`` per seed (runs paired by seed), in points."""
    return [100 * (a - b) for a, b in zip(_acc(rows[label], profile), _acc(rows[other], profile))]


def paired_stats(rows, label: str) -> dict[str, tuple[list[float], float, float]]:
    """Row ``label`` minus its random twin (:func:`baseline`) per profile, paired by seed, in points:
    ``{profile: (per-seed differences, mean, standard error)}`` (s.e. is NaN with one seed)."""
    twin = baseline("random", label)
    stats = {}
    for p in PROFILES:
        d = _paired(rows, label, twin, p)
        stats[p] = (d, *mean_se(d))
    return stats


def ahead_every_profile(stats: dict) -> int:
    """How many seeds of :func:`paired_stats` lead at every profile."""
    return sum(all(x > 0 for x in col) for col in zip(*(d for d, _, _ in stats.values())))


def paired_lead(rows, label: str) -> str:
    """Row ``label`` minus its random twin (:func:`baseline`) per profile, paired by seed: mean, standard error
    and the per-seed differences, in points, and how many seeds lead at every profile."""
    stats = paired_stats(rows, label)
    return (f"{label} over {baseline('random', label)} ({' / '.join(PROFILES)}): "
            + " / ".join(f"{m:+.1f} (s.e. {se:.1f}; per seed " + ", ".join(f"{x:+.1f}" for x in d) + ")" for d, m, se in stats.values())
            + f", ahead at every profile in {ahead_every_profile(stats)} of {len(rows[label])} seeds")


def importance_traffic(rec: dict) -> tuple[tuple[int, int], tuple[int, int]]:
    """An importance round record's bytes as ``((score messages down, up), (model delivery down, up))``. Runs
    before 2026-11-28 kept the model's delivery out of ``bytes_*`` and listed it as ``evaluation_bytes_*``; later
    runs count it in ``bytes_*`` and list it as ``model_delivery_bytes_*``."""
    if "model_delivery_bytes_down" in rec:
        deliv = (rec["model_delivery_bytes_down"], rec["model_delivery_bytes_up"])
        return (rec["bytes_down"] - deliv[0], rec["bytes_up"] - deliv[1]), deliv
    return (rec["bytes_down"], rec["bytes_up"]), (rec.get("evaluation_bytes_down", 0), rec.get("evaluation_bytes_up", 0))


def not_ahead(stats: dict) -> dict[str, float]:
    """From :func:`paired_stats`: the profiles where the mean lead is not above zero, with that mean, in points
    (a mean of zero, an exact tie in images, is no lead; as a float it is ~1e-15)."""
    return {p: m for p, (_, m, _) in stats.items() if m <= 1e-9}


def seeds_verdict(stats: dict) -> str:
    """From :func:`paired_stats`: whether the row leads its random twin on the mean at every profile over all
    seeds (:func:`not_ahead`), and where the 95% CI of the paired lead lies above zero."""
    n = len(next(iter(stats.values()))[0])
    behind = [f"{p} ({m:+.1f})" for p, m in not_ahead(stats).items()]
    above = [p for p, (_, m, se) in stats.items() if ci95(m, se, n)[0] > 0]
    return (f"over all {n} seeds the target is " + (f"NOT met on the mean at {', '.join(behind)}" if behind
                                                    else "met on the mean at every profile")
            + "; the 95% CI lies above zero at " + (", ".join(above) if above else "no profile"))


def with_extra(rows, extra: dict | None) -> dict:
    """``rows`` with each row's ``--extra-seeds`` runs appended (the rows that have them), for paired comparisons."""
    return {lab: runs + (extra or {}).get(lab, []) for lab, runs in rows.items()}


def more_seeds_section(rows, extra: dict, seeds, extra_seeds, ran: str | None = None) -> list[str]:
    """Markdown lines: each consensus row that ``--extra-seeds`` ran against its random twin over every seed
    (the table's seeds plus the extra ones), paired by seed, with a 95% confidence interval of the mean difference."""
    merged = with_extra(rows, extra)
    everything = [*seeds, *extra_seeds]
    n = len(everything)
    t = t95(n)
    lines = ["", "## More seeds for selected pairs", "",
             f"The pairs below also ran for seeds {list(extra_seeds)}, each with its own warm-up (only these rows, not the "
             f"others{'; ' + ran if ran else ''}). Over all {n} seeds {everything}, paired by seed, in points: s.e. = sd of the "
             f"per-seed differences / √{n}; 95% CI = mean ± {t:.2f} s.e. (Student's t, {n - 1} degrees of freedom; per profile, "
             "not corrected for looking at three profiles)."]
    for label in [lab for lab, src, *_ in FEDERATED if src == "consensus" and lab in extra]:
        twin = baseline("random", label)
        stats = paired_stats(merged, label)
        lines += ["", f"{label} minus {twin}:", "",
                  "| profile | consensus (mean ± std) | twin (mean ± std) | paired difference | s.e. | 95% CI | per seed | seeds ahead |",
                  "|---|---|---|---|---|---|---|---|"]
        for p, (d, m, se) in stats.items():
            lo, hi = ci95(m, se, n)
            lines.append(f"| {p} | {fmt_mean_std(_acc(merged[label], p))} | {fmt_mean_std(_acc(merged[twin], p))} | {m:+.1f} | {se:.1f} | "
                         f"[{lo:+.1f}, {hi:+.1f}] | " + ", ".join(f"{x:+.1f}" for x in d) + f" | {sum(x > 0 for x in d)} of {n} |")
        lines += ["", f"Ahead at every profile in {ahead_every_profile(stats)} of {n} seeds; {seeds_verdict(stats)}."]
    return lines


def other_widths(overrides: dict, cfg) -> bool:
    """Whether a row's pruning settings give other per-layer widths than the config's allocation."""
    return overrides.get("allocation", cfg.pruning.allocation) != cfg.pruning.allocation


def criterion_row(label: str, rows, central) -> str:
    mob = "mobile_cpu"
    runs, dense = rows[label], rows["dense FedAvg"]
    pairs = [100 * (r["profiles"][mob]["accuracy"] - d["dense"]["accuracy"]) for r, d in zip(runs, dense)]
    vs_central = [100 * (r["profiles"][mob]["accuracy"] - c[mob]) for r, c in zip(runs, central)]
    vs_mask = _paired(rows, label, CENTRAL_MASK, mob)
    margins = []
    for p in PROFILES:
        best = max(mean_std(_acc(rows[baseline("local", label)], p))[0], mean_std(_acc(rows[baseline("random", label)], p))[0])
        margins.append(100 * (mean_std(_acc(runs, p))[0] - best))
    return (f"| {label} | {sum(pairs) / len(pairs):+.1f} [{', '.join(f'{x:+.1f}' for x in pairs)}] | "
            f"{sum(vs_central) / len(vs_central):+.1f} [{', '.join(f'{x:+.1f}' for x in vs_central)}] | "
            f"{sum(vs_mask) / len(vs_mask):+.1f} [{', '.join(f'{x:+.1f}' for x in vs_mask)}] | "
            + " / ".join(f"{m:+.1f}" for m in margins) + " |")


def one_shot_section(one_shot: dict, rows, fed, ran: str | None = None) -> list[str]:
    """Markdown lines of :func:`one_shot_runs`' table and what it says about consensus vs random masks."""
    def cell(accs, bn):
        return fmt_mean_std(a[bn] for a in accs)

    def gap(label, other, bn, p):
        return 100 * (mean_std(a[p][bn] for a in one_shot[label])[0] - mean_std(a[p][bn] for a in one_shot[other])[0])

    lines = ["", "## Right after pruning, before fine-tuning", "",
             f"Each row's masks cut from its seed's {fed.warmup_rounds}-round warm-up model (the model its importance round scored), "
             "test accuracy with no fine-tuning. First number: the warm-up model's BatchNorm statistics; second: statistics recomputed "
             "on the clients' training shards pooled, as the final evaluation's static BN does (computed by the benchmark from the saved "
             f"warm-up model and masks{', ' + ran if ran else ''}). The dense warm-up model: {cell(one_shot['dense'], 'warmup_bn')} / {cell(one_shot['dense'], 'static_bn')}.",
             "", "| method | " + " | ".join(PROFILES) + " |", "|---|" + "---|" * len(PROFILES)]
    for label in ONE_SHOT_ROWS:
        if label in one_shot:
            lines.append(f"| {label} | " + " | ".join(f"{cell([a[p] for a in one_shot[label]], 'warmup_bn')} / "
                                                     f"{cell([a[p] for a in one_shot[label]], 'static_bn')}" for p in PROFILES) + " |")
    lines += ["", f"Each consensus row minus random masks with the same per-layer widths ({' / '.join(PROFILES)}, points, mean over seeds):",
              "", "| consensus row (random twin) | right after pruning, warm-up BN | right after pruning, recomputed BN | "
              f"after {fed.finetune_rounds} fine-tune rounds |", "|---|---|---|---|"]
    for label in [lab for lab, src, *_ in FEDERATED if src == "consensus" and lab in one_shot]:
        r = baseline("random", label)
        cols = [[gap(label, r, "warmup_bn", p) for p in PROFILES], [gap(label, r, "static_bn", p) for p in PROFILES],
                [_gap(rows, label, r, p) for p in PROFILES]]
        lines.append(f"| {label} ({r}) | " + " | ".join(" / ".join(f"{x:+.1f}" for x in col) for col in cols) + " |")
    t, r = "consensus Taylor", "random masks"
    if all(gap(t, r, "static_bn", p) < 0 for p in PROFILES):
        lines += ["", "Once the statistics match the pruned network, random channels keep more of the warm-up model's accuracy "
                  "than the highest-scoring (Taylor) ones at every profile: a consensus of single-channel scores does not start "
                  "ahead of random masks."]
    return lines


#: Fine-tune rounds after which :func:`budget_section` compares each consensus row with its random-mask twin.
FINETUNE_CHECKPOINTS = (1, 2, 5, 10, 20)


def finetune_curve(run: dict, profile: str) -> list[float | None]:
    """Test accuracy (fraction) of ``profile`` after each fine-tune round of one run, from its per-round evaluation
    (None after a round that was not evaluated, ``eval.eval_every``)."""
    return [(r.get("accuracy") or {}).get(profile) for r in run["rounds"] if r["phase"] == "finetune"]


def budget_section(rows, fed) -> list[str]:
    """Markdown lines: each consensus row minus its random-mask twin (:func:`baseline`) after k fine-tune rounds.

    Read from every run's per-round evaluation, whose BatchNorm statistics are those FedAvg averaged from the
    clients' models (not the static BN of the final numbers): it answers whether a consensus mask leads when the
    fine-tuning budget is short, where the choice of channels has had less time to be trained away."""
    def evaluated(k):  # every run of a consensus row or its twin evaluated after fine-tune round k
        return all(k <= len(c) and c[k - 1] is not None
                   for lab, *_ in FEDERATED for run in rows[lab] for c in [finetune_curve(run, p) for p in PROFILES])

    ks = [k for k in FINETUNE_CHECKPOINTS if k <= fed.finetune_rounds and evaluated(k)]
    if not ks:
        return []

    def diffs(label, k, p):  # per seed, points
        return [100 * (finetune_curve(a, p)[k - 1] - finetune_curve(b, p)[k - 1]) for a, b in zip(rows[label], rows[baseline("random", label)])]

    consensus = [lab for lab, src, *_ in FEDERATED if src == "consensus"]
    lines = ["", "## After a short fine-tuning budget", "",
             f"Consensus minus random masks with the same per-layer widths, after k of the {fed.finetune_rounds} fine-tune rounds "
             f"(points, mean over seeds; {' / '.join(PROFILES)}). Read from each run's per-round evaluation, whose BatchNorm "
             "statistics are the ones FedAvg averaged from the clients' models, not the final numbers' static BN; one "
             "round's accuracy moves by 1-2 points from the next, so single cells are noisy. Bold: ahead at every profile.", "",
             "| consensus row (random twin) | " + " | ".join(f"k = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    leads = []
    for lab in consensus:
        cells = []
        for k in ks:
            means = [float(np.mean(diffs(lab, k, p))) for p in PROFILES]
            text = " / ".join(f"{m:+.1f}" for m in means)
            if all(m > 0 for m in means):
                leads.append((lab, k, min(means)))
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {lab} ({baseline('random', lab)}) | " + " | ".join(cells) + " |")

    n = len(rows["random masks"])
    sd = float(np.mean([np.std(diffs(lab, k, p), ddof=1) for lab in consensus for k in ks for p in PROFILES])) if n > 1 else float("nan")
    se = sd / np.sqrt(n)
    text = f"Seed-to-seed sd of one cell's difference, averaged over cells: {sd:.1f} points (s.e. of a mean of {n} seeds ≈ {se:.1f})."
    if not leads:
        text += " No consensus row is ahead of its random twin at every profile after any of these budgets."
    else:
        text += " Ahead at every profile: " + "; ".join(f"{lab} after {k} round(s)" for lab, k, _ in leads) + "."
        if all(m < se for *_, m in leads):
            text += " In each of them the smallest lead is below the s.e."
    return lines + ["", text]


def no_delivery_lines(no_delivery: list[dict], rows, warm_b: int, ran: str | None) -> tuple[list[str], float]:
    """Traffic bullet of the :data:`NO_DELIVERY` runs against "consensus Taylor" (paired by seed), and their
    importance round's bytes as a fraction of a dense round's."""
    imp = [r for r in no_delivery[0]["rounds"] if r["phase"] == "importance"][0]
    (down, up), (deliv_down, deliv_up) = importance_traffic(imp)
    frac = (down + up + deliv_down + deliv_up) / warm_b
    base = rows["consensus Taylor"]
    same_warmup = all(a["dense"]["accuracy"] == b["dense"]["accuracy"] for a, b in zip(no_delivery, base))
    diffs = {p: _paired({NO_DELIVERY: no_delivery, "consensus Taylor": base}, NO_DELIVERY, "consensus Taylor", p) for p in PROFILES}
    line = (f"- Scoring the model the clients received for the last warm-up round instead (`federated.score_model = \"last_warmup\"`: "
            f"they keep it in `context.state` before training; row \"{NO_DELIVERY}\", seeds as above, each with its own warm-up"
            + (f", {ran}" if ran else "") + f"): the importance round moves {down / 1e3:.1f} kB down + {up / 1e3:.1f} kB up"
            + (f" + {(deliv_down + deliv_up) / 1e6:.1f} MB of model delivery" if deliv_down + deliv_up else ", no model")
            + f" = **{100 * frac:.3f}% of a dense round**. The model it scores is one round older than the one pruned. "
            f"Accuracy after fine-tuning ({' / '.join(PROFILES)}): "
            + " / ".join(fmt_mean_std(_acc(no_delivery, p)) for p in PROFILES)
            + ", minus consensus Taylor's, paired by seed: "
            + " / ".join(f"{np.mean(d):+.1f} (per seed " + ", ".join(f"{x:+.1f}" for x in d) + ")" for d in diffs.values())
            + ". Its warm-up " + ("is the shared one's: the dense model's accuracy is identical in every seed."
                                  if same_warmup else "differs from the shared one's (dense accuracy differs): compare with care."))
    return [line], frac


def render(rows, central, cost, scale, args, cfg, ran: dict | None = None, one_shot: dict | None = None,
           extra: dict | None = None, no_delivery: list[dict] | None = None) -> str:
    ran = ran or {}

    def when(part: str) -> str:
        return f"Run {ran[part]}." if part in ran else "From an earlier run of this script (not timed in this one)."

    largest = max(scale, key=int)
    fed = cfg.federated
    dense_runs = rows["dense FedAvg"]
    dense_m, _ = mean_std(r["dense"]["accuracy"] for r in dense_runs)
    n_test = cfg.data.test_samples or 1017
    lines = [
        "# Federated consensus pruning benchmark",
        "",
        f"seed_cnn, CIFAR-10 subset ({args.data_dir}), {fed.num_clients} clients ({fed.proportions}), "
        f"{cfg.data.partition} shards, {fed.warmup_rounds} dense warm-up + {fed.finetune_rounds} fine-tune rounds "
        f"(one warm-up per seed, shared by every row), aggregation `{fed.aggregation}`, allocation `{cfg.pruning.allocation}`, "
        + ("nested training of the profiles' sub-networks in fine-tuning (`federated.nested_training`; local-only masks are not nested, so those "
           "clients train alone)" if fed.nested_training else "HeteroFL fine-tuning (each client trains its own sub-network only)")
        + (". Every final model, dense FedAvg included, is evaluated with static BN (`eval.static_bn`: after the last round the clients "
           "measure its BatchNorm statistics on their shards and the server pools them)" if cfg.eval.static_bn else
           ". BatchNorm statistics as averaged from the clients' local models of the last round (`eval.static_bn = false`)")
        + f". Test accuracy (%) on {n_test} images "
        f"(one point ≈ {n_test / 100:.0f} images), mean ± std over seeds {args.seeds}. {when('accuracy')} Profiles: "
        + ", ".join(f"{p} {100 * cfg.profiles[p].sparsity:.0f}% channels pruned, {cfg.profiles[p].local_epochs} local epoch(s)" for p in PROFILES)
        + ".",
        "",
        "| method | " + " | ".join(PROFILES) + " |",
        "|---|" + "---|" * len(PROFILES),
        f"| dense FedAvg, {fed.warmup_rounds + fed.finetune_rounds} rounds (unpruned, same rounds) | "
        + " | ".join(fmt_mean_std(r["dense"]["accuracy"] for r in dense_runs) for _ in PROFILES) + " |",
    ]
    for label, *_ in FEDERATED:
        lines.append(f"| {label} | " + " | ".join(fmt_mean_std(_acc(rows[label], p)) for p in PROFILES) + " |")
    lines.append("| centralized pruning, same budget (Taylor) | " + " | ".join(fmt_mean_std(c[p] for c in central) for p in PROFILES) + " |")
    flops = lambda label, p: float(np.mean([r["profiles"][p]["flops"] for r in rows[label]])) / 1e6  # noqa: E731
    other = [lab for lab, _, _, o in FEDERATED if other_widths(o, cfg)]
    if other:
        lines += ["", "Every row keeps the same number of channels per profile. Rows with other per-layer widths than the "
                  f"`{cfg.pruning.allocation}` allocation put them elsewhere, so their MFLOPs per image (mean over seeds, "
                  + " / ".join(PROFILES) + ") differ: consensus Taylor " + " / ".join(f"{flops('consensus Taylor', p):.1f}" for p in PROFILES)
                  + "; " + "; ".join(f"{lab} " + " / ".join(f"{flops(lab, p):.1f}" for p in PROFILES) for lab in other) + "."]
    first = rows["consensus Taylor"][0]
    lines += ["", "Model size per profile (consensus masks):", "",
              "| profile | channels kept | params | MFLOPs | FLOPs ↓ | latency b1 (ms) | latency b64 (ms) |", "|---|---|---|---|---|---|---|"]
    d = first["dense"]
    lines.append(f"| dense | 100% | {d['params']:,} | {d['flops'] / 1e6:.1f} | 1.00x | {d.get('latency_ms', {}).get('b1', float('nan')):.2f} | {d.get('latency_ms', {}).get('b64', float('nan')):.1f} |")
    for p in PROFILES:
        e = first["profiles"][p]
        lines.append(f"| {p} | {100 * (1 - e['channel_sparsity']):.0f}% | {e['params']:,} | {e['flops'] / 1e6:.1f} | {d['flops'] / e['flops']:.2f}x | "
                     f"{e.get('latency_ms', {}).get('b1', float('nan')):.2f} | {e.get('latency_ms', {}).get('b64', float('nan')):.1f} |")
    if one_shot:
        lines += one_shot_section(one_shot, rows, fed, ran.get("one_shot"))
    lines += budget_section(rows, fed)
    if extra:
        lines += more_seeds_section(rows, extra, args.seeds, args.extra_seeds, ran.get("extra"))
    # traffic
    imp = [r for r in first["rounds"] if r["phase"] == "importance"][0]
    warm = [r for r in first["rounds"] if r["phase"] == "warmup"][0]
    (score_down, score_up), (deliv_down, deliv_up) = importance_traffic(imp)
    imp_b, deliv_b, warm_b = score_down + score_up, deliv_down + deliv_up, warm["bytes_up"] + warm["bytes_down"]
    nd_lines, nd_frac = no_delivery_lines(no_delivery, rows, warm_b, ran.get("no_delivery")) if no_delivery else ([], None)
    agreement = {lab: mean_std(r["consensus"]["agreement_mean"] for r in rows[lab])[0] for lab, src, *_ in FEDERATED if src == "consensus"}
    mob = "mobile_cpu"
    mob_cons, _ = mean_std(_acc(rows["consensus Taylor"], mob))
    mob_central, _ = mean_std(c[mob] for c in central)
    mob_mask, _ = mean_std(_acc(rows[CENTRAL_MASK], mob))
    within = lambda other: abs(mob_cons - other) <= 0.01 or mob_cons > other  # noqa: E731
    def beats(label):  # ahead of its local-only and random-mask rows (the same per-layer widths where one has them), at every profile
        return all(mean_std(_acc(rows[label], p))[0] > max(mean_std(_acc(rows[baseline(src, label)], p))[0] for src in ("local", "random"))
                   for p in PROFILES)

    winners = [lab for lab, src, *_ in FEDERATED if src == "consensus" and beats(lab)]
    all_seeds = with_extra(rows, extra)
    # a row that also ran --extra-seeds keeps the target only if it leads on the mean over all its seeds
    held = [lab for lab in winners if lab not in (extra or {}) or not not_ahead(paired_stats(all_seeds, lab))]

    def lead_on_table_seeds(lab):
        if lab not in (extra or {}):
            return f"met on the mean by {paired_lead(rows, lab)}"
        return (f"on seeds {list(args.seeds)} alone met on the mean by {paired_lead(rows, lab)}; over all "
                f"{len(all_seeds[lab])} seeds {'still met' if lab in held else 'NOT met'} (next bullet)")
    ratio = cost["ray"]["wall_s"] / cost["inprocess"]["wall_s"]
    lines += [
        "",
        "## Traffic",
        "",
        f"- Importance round, {imp['clients']} clients: **{100 * (imp_b + deliv_b) / warm_b:.1f}% of a dense round's bytes** "
        f"({warm_b / 1e6:.1f} MB). Almost all of it is the delivery of the dense global model to the clients that score it "
        f"({deliv_down / 1e6:.1f} MB down, {deliv_up / 1e3:.1f} kB up: an evaluate message whose model the clients cache in Flower's "
        f"`context.state`; nothing is sent back but the evaluation's metrics, so it is about half a dense round). The importance "
        f"messages themselves, config down and one score vector per channel group up, are {score_down / 1e3:.1f} kB down + "
        f"{score_up / 1e3:.1f} kB up = {100 * imp_b / warm_b:.3f}% of a dense round.",
    ] + nd_lines + [
        f"- A fine-tune round moves {[r for r in first['rounds'] if r['phase'] == 'finetune'][0]['bytes_down'] / 1e6:.1f} MB down "
        f"vs {warm['bytes_down'] / 1e6:.1f} MB for a dense round: sub-networks are physically smaller.",
        "- Agreement of clients' own top-k sets with the consensus (mean Jaccard over profiles): "
        + ", ".join(f"{k}: {v:.2f}" for k, v in agreement.items())
        + " (weight-only scores, magnitude and BN scale, are identical on every client, hence 1.00).",
        "",
        "## Framework cost",
        "",
        f"{when('cost')} Scale rows: {when('scale')[0].lower()}{when('scale')[1:]}",
        "",
        f"- configs/quick.toml: Flower + Ray {cost['ray']['wall_s']:.0f} s vs plain in-process loop {cost['inprocess']['wall_s']:.0f} s "
        f"= **{ratio:.2f}x** (peak RSS of the process tree {cost['ray']['peak_rss_gb']:.2f} vs {cost['inprocess']['peak_rss_gb']:.2f} GiB).",
        "",
        "| registered clients (10 sampled per round, Ray) | wall time, 1 warm-up + importance + 1 fine-tune round (s) | peak RSS, whole process tree (GiB) |",
        "|---|---|---|",
    ] + [f"| {n} | {v['wall_s']:.0f} | {v['peak_rss_gb']:.2f} |" for n, v in scale.items()] + [
        "",
        "The first row includes the first Ray start-up and cold caches of the run; the others reuse them.",
        "",
        "## Targets",
        "",
        f"- mobile_cpu ({100 * cfg.profiles[mob].sparsity:.0f}% channels) after fine-tuning vs dense FedAvg with the same rounds: "
        f"{100 * (mob_cons - dense_m):+.1f} points (target ≥ -1.0: {'met' if mob_cons - dense_m >= -0.01 else 'NOT met'}); "
        f"vs centralized pruning with the same budget, read two ways (target within 1.0): (a) everything centralized, "
        f"{fed.warmup_rounds} dense epochs on the pooled data, prune, {fed.finetune_rounds} fine-tune epochs: "
        f"{100 * (mob_cons - mob_central):+.1f} points ({'met' if within(mob_central) else 'NOT met'}; even the unpruned dense FedAvg "
        f"model is {100 * (dense_m - mob_central):+.1f} points from it, so this gap is federated training's, not the mask's); "
        f"(b) the mask computed centrally (Taylor on every client's "
        f"scoring images pooled at the server) and the same federated fine-tuning: {100 * (mob_cons - mob_mask):+.1f} points "
        f"({'met' if within(mob_mask) else 'NOT met'}).",
        "- Consensus beats local-only and random masks at every profile (random masks with the same per-layer widths): "
        + ("met" if held else "NOT met")
        + (f"; {'; '.join(lead_on_table_seeds(lab) for lab in winners)}" if winners else "")
        + "; consensus Taylor: " + ("met" if beats("consensus Taylor") else "NOT met")
        + ". Per criterion in the last column of the table below.",
    ] + [
        f"- With seeds {list(args.extra_seeds)} added for this pair: {paired_lead(all_seeds, lab)}; "
        f"{seeds_verdict(paired_stats(all_seeds, lab))} (see \"More seeds for selected pairs\")." for lab, src, *_ in FEDERATED if src == "consensus" and lab in (extra or {})
    ] + [
        f"- {lab} vs {baseline('random', lab)}: {_gaps(rows, lab, baseline('random', lab))} points ({' / '.join(PROFILES)}); "
        f"vs random masks with the `{cfg.pruning.allocation}` widths: {_gaps(rows, lab, 'random masks')} points, at the MFLOPs above."
        for lab, src, _, o in FEDERATED if src == "consensus" and other_widths(o, cfg)
    ] + [
        f"- Importance round ≤ 1% of a dense round's bytes: {'met' if imp_b + deliv_b <= 0.01 * warm_b else 'NOT met'} "
        f"with the default `score_model = \"current\"` ({100 * (imp_b + deliv_b) / warm_b:.1f}% with the delivery of the dense model, "
        f"which scoring the current global model needs; the score messages alone {100 * imp_b / warm_b:.3f}%)"
        + (f"; {'met' if nd_frac <= 0.01 else 'NOT met'} with `score_model = \"last_warmup\"` ({100 * nd_frac:.3f}%; accuracy in the "
           f"Traffic section)." if no_delivery else "."),
        f"- Flower + Ray wall time ≤ 1.3x the plain loop on the quick config: {'met' if ratio <= 1.3 else 'NOT met'} ({ratio:.2f}x; "
        "Ray's start-up of ~10-20 s is included; Ray runs two clients at a time on the 2 cores, the plain loop one after "
        "another with train.threads = 1 as quick.toml sets it).",
        f"- {largest} clients ran; peak RSS {scale[largest]['peak_rss_gb']:.2f} GiB (it depends on the clients running at once, not on those registered).",
        "",
        "Every consensus criterion against the same targets (points, mean over seeds; per-seed pairs in brackets, "
        "each run against dense FedAvg of its own seed):",
        "",
        "| consensus criterion | mobile_cpu vs dense FedAvg | mobile_cpu vs centralized (a) | mobile_cpu vs centralized mask (b) | "
        "vs best of local-only / random: " + " / ".join(PROFILES) + " |",
        "|---|---|---|---|---|",
    ] + [criterion_row(lab, rows, central) for lab, src, *_ in FEDERATED if src == "consensus"] + [
        "",
        "![accuracy vs FLOPs](federated_accuracy_vs_flops.png)",
        "",
    ]
    return "\n".join(lines)


def plot(rows, central, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    first = rows["consensus Taylor"][0]
    flops = {p: first["profiles"][p]["flops"] / 1e6 for p in PROFILES}
    dm, ds = mean_std(r["dense"]["accuracy"] for r in rows["dense FedAvg"])
    ax.errorbar([first["dense"]["flops"] / 1e6], [100 * dm], yerr=[100 * ds], marker="*", ms=14, color="black", ls="none", label="dense FedAvg")
    for label, *_ in FEDERATED:
        ms = [mean_std(_acc(rows[label], p)) for p in PROFILES]
        ax.errorbar([flops[p] for p in PROFILES], [100 * m for m, _ in ms], yerr=[100 * s for _, s in ms], marker="o", capsize=3, label=label)
    ms = [mean_std(c[p] for c in central) for p in PROFILES]
    ax.errorbar([flops[p] for p in PROFILES], [100 * m for m, _ in ms], yerr=[100 * s for _, s in ms], marker="s", ls="--", capsize=3, label="centralized, same budget")
    ax.set_xscale("log")
    plain_log_ticks(ax.xaxis)
    ax.set_xlabel("MFLOPs per image (log): microcontroller · mobile_cpu · edge_gpu · dense")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    save(fig, path)


def _span(mtimes) -> str:
    """``"<earliest> to <latest>"`` of file modification times (seconds since the epoch), local time to the minute."""
    times = list(mtimes)
    return " to ".join(time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) for t in (min(times), max(times)))


#: Options that set the accuracy runs; ``--skip accuracy`` takes them from the saved results instead.
ACCURACY_ARGS = ("data_dir", "seeds", "warmup_rounds", "finetune_rounds", "no_nested")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared/data/cifar10-subset"))
    parser.add_argument("--config", default=str(ROOT / "configs/quick.toml"))
    parser.add_argument("--seeds", type=nonnegative_int, nargs="+", default=[0, 1])
    parser.add_argument("--warmup-rounds", type=nonnegative_int, default=30)
    parser.add_argument("--finetune-rounds", type=nonnegative_int, default=20)
    parser.add_argument("--no-nested", action="store_true", help="HeteroFL fine-tuning without nested training of the narrower profiles")
    parser.add_argument("--extra-seeds", type=nonnegative_int, nargs="*", default=None, metavar="SEED",
                        help="more seeds, each with its own warm-up, for the --extra-rows pairs only (about 30 min per seed on 2 cores), "
                             "reported as paired differences over all seeds in 'More seeds for selected pairs'; not given: the saved pairs are "
                             "kept when they ran with the same accuracy options; given with no seed: they are dropped; to add seeds, "
                             "list the earlier ones too (their finished runs are reused; only the seeds listed are reported)")
    parser.add_argument("--extra-rows", nargs="+", default=EXTRA_ROWS, metavar="LABEL",
                        help=f"consensus rows that --extra-seeds runs, each with its random twin (default: {EXTRA_ROWS})")
    parser.add_argument("--scale-clients", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--skip", nargs="*", default=[], choices=["accuracy", "cost", "scale", "traffic"],
                        help="parts to take from the saved federated.json instead of running them ('traffic': the importance round "
                             "without model delivery, federated.score_model = 'last_warmup'); with all four the tables are only "
                             "written again (with 'accuracy', the data dir, seeds and rounds are the saved runs')")
    parser.add_argument("--runs-dir", default=str(ROOT / "runs/bench_federated"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    state_path = out / "federated.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if "accuracy" in args.skip and "args" in state:  # the report describes the accuracy runs it shows, not this call's defaults
        for key in ACCURACY_ARGS:
            setattr(args, key, state["args"][key])
    if "accuracy" not in args.skip or "args" not in state:
        # cached results are keyed by their config, which holds the data dir: a relative path must give the same key
        args.data_dir = str(Path(args.data_dir).resolve())
    try:
        pairs = extra_pairs(args.extra_rows)
    except ValueError as e:
        parser.error(str(e))
    run_extra = args.extra_seeds is not None
    if not run_extra:  # keep the saved pairs if they continue these accuracy runs
        saved = state.get("args", {})
        same = "extra" in state and all(saved.get(key) == getattr(args, key) for key in ACCURACY_ARGS)
        args.extra_seeds, args.extra_rows = (saved["extra_seeds"], saved["extra_rows"]) if same else ([], args.extra_rows)
    if set(args.extra_seeds) & set(args.seeds):
        parser.error(f"--extra-seeds {sorted(set(args.extra_seeds) & set(args.seeds))} are in --seeds {args.seeds}: extra seeds must be new ones")
    data = {"data": {"data_dir": args.data_dir}}
    quick = load_config(args.config, data)
    cfg = load_config(args.config, {**data, "federated": {"warmup_rounds": args.warmup_rounds, "finetune_rounds": args.finetune_rounds,
                                                          "nested_training": not args.no_nested}})
    runs = Path(args.runs_dir)
    ran = state.setdefault("ran", {})
    stamp = lambda: time.strftime("%Y-%m-%d %H:%M")  # noqa: E731
    if "accuracy" not in args.skip:
        state["rows"] = federated_runs(cfg, args.seeds, runs)
        state["central"] = centralized_runs(cfg, args.seeds, runs)
        state["one_shot"] = one_shot_runs(cfg, args.seeds, runs)
        ran["one_shot"] = _span((runs / f"one_shot_s{seed}.json").stat().st_mtime for seed in (args.seeds[0], args.seeds[-1]))
        ran["accuracy"] = _span(p.stat().st_mtime for seed in args.seeds
                                for p in [*runs.glob(f"*_s{seed}/results.json"), runs / f"central_s{seed}.json"]) + " (runs finished)"
    if run_extra and args.extra_seeds:
        state["extra"] = federated_runs(cfg, args.extra_seeds, runs, labels=pairs, dense=False)
        ran["extra"] = "run " + _span((runs / f"{run_tag(lab)}_s{seed}" / "results.json").stat().st_mtime
                                      for seed in args.extra_seeds for lab in pairs)
    elif not args.extra_seeds:  # dropped, or not kept because they ran with other accuracy options
        state.pop("extra", None)
        ran.pop("extra", None)
    if "traffic" not in args.skip:
        state["no_delivery"] = no_delivery_runs(cfg, args.seeds, runs)
        ran["no_delivery"] = _span((runs / f"{run_tag(NO_DELIVERY)}_s{seed}" / "results.json").stat().st_mtime
                                   for seed in (args.seeds[0], args.seeds[-1])) + " (runs finished)"
    if "cost" not in args.skip:
        start = stamp()
        state["cost"] = framework_cost(quick, runs)
        ran["cost"] = f"{start} to {stamp()}"
    if "scale" not in args.skip:
        start = stamp()
        state["scale"] = {str(k): v for k, v in scale_runs(quick, args.scale_clients, runs).items()}
        ran["scale"] = f"{start} to {stamp()}"
    missing = [label for label, *_ in FEDERATED if label not in state.get("rows", {})]
    if missing:
        parser.error(f"{state_path} has no results for {missing}: run without --skip accuracy (finished runs are reused)")
    state["args"] = vars(args)
    write_json(state_path, state)
    plot(state["rows"], state["central"], out / "federated_accuracy_vs_flops.png")
    write_text(out / "federated.md", render(state["rows"], state["central"], state["cost"], state["scale"], args, cfg, ran,
                                            state.get("one_shot"), state.get("extra"), state.get("no_delivery")))
    print((out / "federated.md").read_text())
    return 0


if __name__ == "__main__":
    from fedprune.cli import run_reporting_errors  # noqa: E402

    sys.exit(run_reporting_errors(main, "bench_federated.py"))
