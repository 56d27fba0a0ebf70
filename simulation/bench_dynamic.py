"""Dynamic per-input pruning benchmark: accuracy vs executed MACs and batch-1 latency of gated inference.

    python simulation/bench_dynamic.py --data-dir ../shared/data/cifar10-subset

For each seed: train seed_cnn densely (E epochs), prune it one-shot to the
mobile_cpu profile's channel sparsity (Taylor importance), fine-tune F
epochs: that is the static sub-network. Then train FBS-style channel gates
for G epochs jointly with the sub-network (sandwich rule: every step trains
the full budget and one gated budget, distilled from the full one; with
``--frozen`` the sub-network stays fixed) (fedprune.dynamic). The fair
static reference is the same sub-network fine-tuned for F + G epochs.
Cosine LR in every phase.

Second mechanism, adaptive width per input (an early-exit cascade): the
static sub-network's channels are ordered by importance and trained for the
same G epochs so that every channel prefix of the listed widths works on its
own (sandwich rule: the narrower widths' cross-entropy at half weight;
fedprune.dynamic.train_widths). At inference an input runs the narrowest
width first and stops there when its confidence (by default the margin
between its two most probable classes) reaches a threshold, else it runs
the next width; each width is a physically smaller static network, so
nothing is gathered per input.

Reported per budget (gates) or threshold (cascade): test accuracy (mean ± std
over seeds), MACs executed per input (gates: sliced batch-1 path, gate
predictors included; cascade: the stages each input ran) and batch-1 CPU
latency against the static sub-network in deployment form (BN folded,
channels_last), timed side by side in one process, each variant taking its
inputs in a row as a device serving one network does (gates: random inputs;
cascade: the mean over real test images, since the cost depends on where
each exits; the cascade and its static network in eager PyTorch and in ONNX
Runtime, --runtimes, since eager PyTorch's per-operator overhead hides what
fewer channels save at batch 1). Each seed's results, and the first seed's networks, are kept in
--runs-dir: a restart, or a run that changes only how latency is measured,
trains nothing again (the table says when each seed trained). Writes
benchmarks/dynamic.md, .json and a PNG.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedprune.centralized import prune_experiment, train_dense  # noqa: E402
from fedprune.config import EXIT_RULES, LATENCY_RUNTIMES, load_config  # noqa: E402
from fedprune.data import make_loader  # noqa: E402
from fedprune.dynamic import (GatedCNN, NestedWidthCNN, WidthCascade, cascade_latency_ms, evaluate_cascade, evaluate_gated,  # noqa: E402
                              gated_latency_ms, train_gates, train_widths)
from fedprune.masks import SoftMaskHook  # noqa: E402
from fedprune.metrics import count_macs  # noqa: E402
from fedprune.plots import finish, label  # noqa: E402
from fedprune.reporting import benchmark_parser, fmt_mean_std, mean_std, nonnegative_int, read_saved_json, write_json, write_text  # noqa: E402
from fedprune.task import load_data, make_train_fn, model_groups, train_config  # noqa: E402
from fedprune.training import evaluate, set_seed  # noqa: E402

log = logging.getLogger("bench_dynamic")
#: Cascade thresholds reported by default, per exit rule (a fixed grid: nothing is tuned on the test images).
DEFAULT_THRESHOLDS = {"margin": [0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5], "max_prob": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]}
RULE_WORDS = {"margin": "margin of confidence (top-1 minus top-2 softmax probability)", "max_prob": "top softmax probability"}


#: Arguments that change neither a seed's networks nor its accuracies (only the timing and where files go).
NOT_TRAINING_ARGS = ("seeds", "out", "runs_dir", "threads", "latency_repeats", "latency_inputs", "latency_passes", "runtimes", "render_only")
#: How the report names each latency runtime.
RUNTIME_WORDS = {"torch": "eager PyTorch", "onnxruntime": "ONNX Runtime"}
#: The issue's targets: at most this many accuracy points lost, at least these fractions of MACs and batch-1 latency saved.
MAX_LOSS_POINTS, MIN_MACS_CUT, MIN_LATENCY_CUT = 1.0, 0.30, 0.15


def training_args(args) -> dict:
    """The arguments a seed's results depend on (the data folder resolved)."""
    out = {k: v for k, v in vars(args).items() if k not in NOT_TRAINING_ARGS}
    out["data_dir"] = str(Path(out["data_dir"]).resolve())
    return out


def seed_results(cfg, seed: int, data, args, keep_networks: bool) -> dict:
    """:func:`run_seed`, or its results from ``<runs-dir>/seed<k>.json`` when it finished before with the same
    :func:`training_args` (and, with ``keep_networks``, its networks from ``seed<k>_networks.pt``, for the latency
    section). A restart, or a run that changes only how latency is measured, therefore trains nothing again. The
    result's ``trained`` says when the seed trained."""
    runs = Path(args.runs_dir)
    path, nets = runs / f"seed{seed}.json", runs / f"seed{seed}_networks.pt"
    want = json.loads(json.dumps(training_args(args)))
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("args") == want and (not keep_networks or nets.is_file()):
        res = saved["result"]
        if keep_networks:
            networks = torch.load(nets, weights_only=False)
            res.update(_gated=networks["gated"], _stages=networks["stages"])
        log.info("seed %d: finished before with the same arguments, reusing %s", seed, path)
        return res
    start = time.strftime("%Y-%m-%d %H:%M")
    res = run_seed(cfg, seed, data, args)
    res["trained"] = f"{start} to {time.strftime('%H:%M')}"
    runs.mkdir(parents=True, exist_ok=True)
    if keep_networks:
        torch.save({"gated": res["_gated"], "stages": res["_stages"]}, nets)
    write_json(path, {"args": want, "result": {k: v for k, v in res.items() if not k.startswith("_")}})
    return res


def run_seed(cfg, seed: int, data, args) -> dict:
    c = copy.deepcopy(cfg)
    c.seed = seed
    t0 = time.perf_counter()
    dense = train_dense(c, data=data)
    res = prune_experiment(c, dense, data)
    static = res["extracted"].eval()
    test_loader = make_loader(data[1], 256, train=False)
    train_loader = make_loader(data[0], c.train.batch_size, train=True, seed=seed + 5)
    # Fair static reference: the pruned network fine-tuned for the gates' extra epochs too.
    longer = copy.deepcopy(res["model"])
    set_seed(seed + 5)
    make_train_fn(train_loader, train_config(c))(longer, args.gate_epochs, SoftMaskHook(res["mask"], model_groups(c)))
    static_same_budget = evaluate(longer, test_loader)["accuracy"]
    set_seed(seed + 6)
    gated = GatedCNN(copy.deepcopy(static), args.gated_layers, args.round_to).eval()  # joint training changes its network
    stats = train_gates(gated, train_loader, train_config(c, epochs=args.gate_epochs, lr=args.gate_lr), args.train_budgets, args.distill,
                        joint=not args.frozen)
    rows = evaluate_gated(gated, test_loader, args.budgets, mac_inputs=64)
    log.info("seed %d: static %.3f (F+G epochs %.3f); gated %s (%.0f s)", seed, res["pruned"]["accuracy"], static_same_budget,
             ", ".join(f"{r['budget']:g}: {r['accuracy']:.3f} @ {r['macs'] / 1e6:.2f}M" for r in rows), time.perf_counter() - t0)
    cascade = width_cascade(c, seed, static, train_loader, make_loader(data[0], 256, train=False), test_loader, args)
    log.info("seed %d: widths %s alone %s; cascade %s (%.0f s)", seed, args.widths, ", ".join(f"{a:.3f}" for a in cascade["width_accuracy"]),
             ", ".join(f"t={r['threshold']:g}: {r['accuracy']:.3f} @ {r['macs'] / 1e6:.2f}M" for r in cascade["rows"]), time.perf_counter() - t0)
    return {
        "dense_accuracy": dense.metrics["accuracy"],
        "static_accuracy": res["pruned"]["accuracy"],
        "static_same_budget_accuracy": static_same_budget,
        "static_macs": count_macs(static),
        "channel_sparsity": res["pruned"]["channel_sparsity"],
        "gate_train": stats,
        "gated": rows,
        "cascade": {k: v for k, v in cascade.items() if not k.startswith("_")},
        "_gated": gated,
        "_stages": cascade["_stages"],
    }


def width_cascade(c, seed: int, static, train_loader, calib_loader, test_loader, args) -> dict:
    """Adaptive width: order the static sub-network's channels, train its widths G epochs, then run the cascade per threshold."""
    set_seed(seed + 7)
    net = NestedWidthCNN(copy.deepcopy(static), round_to=args.round_to)
    stats = train_widths(net, train_loader, train_config(c, epochs=args.gate_epochs), args.widths, args.width_distill, narrow_ce=args.narrow_ce)
    net.calibrate_bn(calib_loader, args.widths)  # each narrower width's own BatchNorm statistics, on the training images
    out = evaluate_cascade(net, args.widths, test_loader, args.thresholds, args.exit_rule)
    return {**{k: v for k, v in out.items() if k != "stages"}, "train": stats, "_stages": out["stages"]}


def environment() -> dict:
    """What the latency was timed with: torch and ONNX Runtime versions and the machine (kept in dynamic.json)."""
    import onnxruntime

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "machine": platform.machine()}


def runtime_words(runtime: str, env: dict) -> str:
    """A runtime's name with the version it was timed with, for the report."""
    return f"{RUNTIME_WORDS[runtime]} {env[runtime]}"


def render(per_seed: list[dict], lat: dict, args, cfg, n_test: int) -> str:
    first = per_seed[0]
    runtimes = list(lat["cascade"])
    env = lat.get("environment") or environment()  # runs timed before it was kept: this machine's
    static_ref = [r["static_same_budget_accuracy"] for r in per_seed]
    ref_m, _ = mean_std(static_ref)
    static_macs = first["static_macs"]
    lines = [
        "# Dynamic per-input pruning (FBS-style channel gates)",
        "",
        f"seed_cnn on the CIFAR-10 subset ({n_test} test images; one accuracy point = {n_test / 100:.1f} images). "
        f"Static sub-network: {cfg.train.epochs} dense epochs, one-shot Taylor pruning to the mobile_cpu sparsity "
        f"({100 * first['channel_sparsity']:.0f}% channels), {cfg.pruning.finetune_epochs} fine-tuning epochs. Gates: "
        + (f"{args.gate_epochs} epochs on top of the frozen sub-network (budgets {args.train_budgets} cycled" if args.frozen else
           f"{args.gate_epochs} epochs trained jointly with the sub-network (sandwich rule: every step the full budget plus the next of "
           f"{args.train_budgets}")
        + f", distillation from the full budget, weight {args.distill}; kept channels per gated layer rounded to multiples of "
        f"{args.round_to}). Cosine LR in every phase, from {cfg.train.lr:g} (gates: {args.gate_lr:g}). Reference: the static sub-network fine-tuned {args.gate_epochs} epochs more "
        f"(same total budget). Accuracy mean ± std over seeds {', '.join(str(s) for s in args.seeds)}. MACs: executed per "
        f"input by the sliced batch-1 path, gate predictors included. Latency: median batch-1 ms, {args.threads} thread(s), "
        f"in eager PyTorch (the sliced path picks its channels per input in Python, so it cannot be exported to a deployment runtime), "
        f"static sub-network in deployment form vs the sliced gated path, side by side on the same random inputs (each variant in a row, "
        f"the order alternating between passes), torch {env['torch']}, "
        f"{env['machine']} (seed {args.seeds[0]}'s gates). Seeds trained: "
        + "; ".join(f"{s} {r.get('trained', 'in this run')}" for s, r in zip(args.seeds, per_seed))
        + f"; latency timed {lat['timed']}.",
        "",
        f"Static sub-network: {fmt_mean_std(r['static_accuracy'] for r in per_seed)} after {cfg.pruning.finetune_epochs} epochs, "
        f"{fmt_mean_std(static_ref)} after {cfg.pruning.finetune_epochs + args.gate_epochs} epochs; "
        f"{static_macs / 1e6:.2f} M MACs; {lat['static']:.3f} ms at batch 1 (eager PyTorch, random inputs).",
        "",
        "| budget (channels per layer) | accuracy | Δ vs static (same budget) | MACs per input (M) | MACs vs static | b1 latency (ms) | latency vs static |",
        "|---|---|---|---|---|---|---|",
    ]
    def misses(acc_mean: float, macs: float, ms: float, static_ms: float) -> tuple[list[str], float]:
        """The targets a variant misses, each with its value (empty: it meets all three), and by how much
        in all (the sum of each miss relative to its target: 0.1 = 10% short)."""
        loss, macs_cut, ms_cut = 100 * (ref_m - acc_mean), 1 - macs / static_macs, 1 - ms / static_ms
        missed = [(f"accuracy {-loss:+.2f} points (at most {MAX_LOSS_POINTS:.1f} allowed)", loss / MAX_LOSS_POINTS - 1) if loss > MAX_LOSS_POINTS else None,
                  (f"MACs {-100 * macs_cut:+.1f}% (at least {-100 * MIN_MACS_CUT:.0f}% needed)", 1 - macs_cut / MIN_MACS_CUT) if macs_cut < MIN_MACS_CUT else None,
                  (f"latency {-100 * ms_cut:+.1f}% (at least {-100 * MIN_LATENCY_CUT:.0f}% needed)", 1 - ms_cut / MIN_LATENCY_CUT)
                  if ms_cut < MIN_LATENCY_CUT else None]
        missed = [m for m in missed if m]
        return [text for text, _ in missed], sum(short for _, short in missed)

    def meets(acc_mean: float, macs: float, ms: float, static_ms: float) -> bool:
        return not misses(acc_mean, macs, ms, static_ms)[0]

    best = None
    for i, b in enumerate(args.budgets):
        accs = [r["gated"][i]["accuracy"] for r in per_seed]
        m, _ = mean_std(accs)
        macs = float(np.mean([r["gated"][i]["macs"] for r in per_seed]))
        ms = lat[f"gated@{b:g}"]
        lines.append(f"| {b:g} | {fmt_mean_std(accs)} | {100 * (m - ref_m):+.1f} | {macs / 1e6:.2f} | {100 * (macs / static_macs - 1):+.0f}% | "
                     f"{ms:.3f} | {100 * (ms / lat['static'] - 1):+.0f}% |")
        if meets(m, macs, ms, lat["static"]):
            best = best or b
    cas = first["cascade"]
    widths = cas["widths"]
    lines += [
        "",
        "## Adaptive width per input (early-exit cascade)",
        "",
        f"The static sub-network's channels ranked per layer by BN-scaled weight norm, then trained {args.gate_epochs} epochs so that the top "
        f"{', '.join(f'{100 * w:g}%' for w in widths)} of every conv layer's channels work on their own (sandwich rule: every step the full "
        f"width with cross-entropy plus each narrower width with cross-entropy (weight {args.narrow_ce:g}) and distillation from the full width "
        f"(weight {args.width_distill:g}); "
        f"narrower widths normalise with batch statistics in training and with their own BatchNorm statistics, measured on the training "
        f"images, at inference). An input runs width {widths[0]:g} first and stops when its {RULE_WORDS[args.exit_rule]} reaches the threshold "
        f"(thresholds a fixed grid, the same for every seed); "
        f"otherwise it runs the next width from the start (no reuse), so its MACs are the sum of the widths it ran "
        f"({', '.join(f'{m / 1e6:.2f} M' for m in cas['stage_macs'])}). Latency: mean batch-1 ms per test image over "
        f"{args.latency_inputs} test images (median of {args.latency_passes} passes each), the cascade's stages and the static sub-network in "
        f"deployment form (BN folded; seed {args.seeds[0]}'s networks, every threshold's cascade on the same stage networks), each variant taking the "
        f"images in a row as a device that serves one network does, the variants' order alternating between passes, {args.threads} thread(s), "
        f"in {' and in '.join(runtime_words(rt, env) for rt in runtimes)}. "
        + ("Eager PyTorch spends ~20 us of fixed overhead per operator, so at batch 1 a narrower network saves much less time than MACs; "
           "ONNX Runtime runs the same graph (every stage but the last also computes its exit confidence in its graph, "
           "fedprune.dynamic.ExitStage) without that overhead, as a deployment runtime on a device would. " if len(runtimes) > 1 else "")
        + "The static sub-network took " + ", ".join(f"{lat['cascade'][rt]['static']:.3f} ms per image in {RUNTIME_WORDS[rt]}" for rt in runtimes) + ".",
        "",
        "Each width alone: " + "; ".join(f"{w:g}: {fmt_mean_std(r['cascade']['width_accuracy'][i] for r in per_seed)}" for i, w in enumerate(widths))
        + f" (static reference {fmt_mean_std(static_ref)}).",
        "",
        f"| threshold | accuracy | Δ vs static (same budget) | MACs per input (M) | MACs vs static | answered at width {widths[0]:g} | "
        + " | ".join(f"b1 latency, {RUNTIME_WORDS[rt]} (ms per image) | vs static" for rt in runtimes) + " |",
        "|---|---|---|---|---|---|" + "---|---|" * len(runtimes),
    ]
    met_t: dict[str, list[float]] = {rt: [] for rt in runtimes}  # every threshold that meets all targets
    closest: dict[str, tuple[float, list[str], float] | None] = {rt: None for rt in runtimes}  # fewest targets missed, by least
    for i, t in enumerate(args.thresholds):
        accs = [r["cascade"]["rows"][i]["accuracy"] for r in per_seed]
        m, _ = mean_std(accs)
        macs = float(np.mean([r["cascade"]["rows"][i]["macs"] for r in per_seed]))
        early = float(np.mean([r["cascade"]["rows"][i]["exits"][0] for r in per_seed]))
        cells = []
        for rt in runtimes:
            ms, static_ms = lat["cascade"][rt][f"cascade@{t:g}"], lat["cascade"][rt]["static"]
            cells.append(f"{ms:.3f} | {100 * (ms / static_ms - 1):+.0f}%")
            missed, short = misses(m, macs, ms, static_ms)
            if not missed:
                met_t[rt].append(t)
            if closest[rt] is None or (len(missed), short) < (len(closest[rt][1]), closest[rt][2]):
                closest[rt] = (t, missed, short)
        lines.append(f"| {t:g} | {fmt_mean_std(accs)} | {100 * (m - ref_m):+.1f} | {macs / 1e6:.2f} | {100 * (macs / static_macs - 1):+.0f}% | "
                     f"{100 * early:.0f}% | " + " | ".join(cells) + " |")
    lines += ["", "### Targets", ""]
    goal = (f"At least {100 * MIN_MACS_CUT:.0f}% fewer MACs than the static sub-network, at most {MAX_LOSS_POINTS:.1f} point accuracy loss against the "
            f"static reference, and at least {100 * MIN_LATENCY_CUT:.0f}% lower batch-1 latency")
    lines.append(f"- {goal}, FBS gates at one budget: " + (f"met at budget {best:g}." if best else "NOT met at any budget."))
    for rt in runtimes:
        lines.append(f"- {goal}, adaptive width at one threshold, latency in {RUNTIME_WORDS[rt]}: "
                     + (f"met at threshold{'s' * (len(met_t[rt]) > 1)} {', '.join(f'{t:g}' for t in met_t[rt])}." if met_t[rt] else
                        f"NOT met at any threshold (closest: threshold {closest[rt][0]:g}, which misses only {'; '.join(closest[rt][1])})."
                        if closest[rt] and len(closest[rt][1]) == 1 else "NOT met at any threshold."))
    lines.append("")
    return "\n".join(lines)


def plot(per_seed: list[dict], lat: dict, args, path: Path) -> None:
    """Left: accuracy vs executed MACs (gates and cascade). Right: accuracy vs batch-1 latency relative to the static
    sub-network, the gates in eager PyTorch and the cascade in each runtime it was timed in."""
    import matplotlib.pyplot as plt

    static_macs = per_seed[0]["static_macs"]
    fig, (ax, ax_ms) = plt.subplots(1, 2, figsize=(11, 4))
    gated = [mean_std(r["gated"][i]["accuracy"] for r in per_seed) for i in range(len(args.budgets))]
    cascade = [mean_std(r["cascade"]["rows"][i]["accuracy"] for r in per_seed) for i in range(len(args.thresholds))]
    static = mean_std(r["static_same_budget_accuracy"] for r in per_seed)

    def curve(axis, xs, points, labels, label, marker, offset):
        axis.errorbar(xs, [100 * m for m, _ in points], yerr=[100 * s for _, s in points], marker=marker, capsize=3, label=label)
        for text, x, (m, _) in zip(labels, xs, points):
            axis.annotate(text, (x, 100 * m), textcoords="offset points", xytext=(4, offset), fontsize=7)

    macs = [np.mean([r["gated"][i]["macs"] for r in per_seed]) / 1e6 for i in range(len(args.budgets))]
    curve(ax, macs, gated, [f"{b:g}" for b in args.budgets], "gated (per-input top-k)", "o", 4)
    cmacs = [np.mean([r["cascade"]["rows"][i]["macs"] for r in per_seed]) / 1e6 for i in range(len(args.thresholds))]
    curve(ax, cmacs, cascade, [f"t={t:g}" for t in args.thresholds], "adaptive width (early exit)", "^", -10)
    ax.errorbar([static_macs / 1e6], [100 * static[0]], yerr=[100 * static[1]], marker="s", color="black", capsize=3, ls="none", label="static sub-network")
    label(ax, "MACs executed per input (M)", "test accuracy (%)", "Accuracy vs MACs")
    rel = lambda ms, static_ms: 100 * (ms / static_ms - 1)  # noqa: E731
    curve(ax_ms, [rel(lat[f"gated@{b:g}"], lat["static"]) for b in args.budgets], gated, [f"{b:g}" for b in args.budgets],
          "gated, eager PyTorch", "o", 4)
    for k, (rt, times) in enumerate(lat["cascade"].items()):  # thresholds named on the last runtime's curve only (same order on each)
        curve(ax_ms, [rel(times[f"cascade@{t:g}"], times["static"]) for t in args.thresholds], cascade,
              [f"t={t:g}" if k == len(lat["cascade"]) - 1 else "" for t in args.thresholds], f"adaptive width, {RUNTIME_WORDS[rt]}", "^", -10)
    ax_ms.errorbar([0], [100 * static[0]], yerr=[100 * static[1]], marker="s", color="black", capsize=3, ls="none", label="static sub-network")
    ax_ms.axvline(-100 * MIN_LATENCY_CUT, color="grey", ls=":", lw=1, label=f"latency target ({-100 * MIN_LATENCY_CUT:.0f}%)")
    finish(fig, ax_ms, path, "batch-1 latency vs static sub-network in the same runtime (%)", "test accuracy (%)", "Accuracy vs latency")


def main(argv=None) -> int:
    parser = benchmark_parser(__doc__, seeds=tuple(range(10)))
    parser.add_argument("--gate-epochs", type=nonnegative_int, default=3)
    parser.add_argument("--gate-lr", type=float, default=1e-3)
    parser.add_argument("--distill", type=float, default=1.0, help="gates: weight of distillation from the full budget")
    parser.add_argument("--frozen", action="store_true", help="train only the gates on the frozen sub-network (default: joint, sandwich rule)")
    parser.add_argument("--train-budgets", type=float, nargs="+", default=[0.5, 0.625, 0.75, 0.875])
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.875, 0.75, 0.625, 0.5])
    parser.add_argument("--round-to", type=int, default=8, help="kept channels per gated layer go to multiples of this")
    parser.add_argument("--gated-layers", type=int, nargs="*", default=None, help="conv blocks to gate (default: all but the last)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for latency")
    parser.add_argument("--train-threads", type=int, default=2)
    parser.add_argument("--latency-repeats", type=int, default=100)
    parser.add_argument("--widths", type=float, nargs="+", default=[0.5, 1.0], help="cascade widths, narrowest first, the last 1")
    parser.add_argument("--thresholds", type=float, nargs="+", default=None,
                        help="cascade exit thresholds (default: 0.05-0.5 for --exit-rule margin, 0.2-0.9 for max_prob)")
    parser.add_argument("--exit-rule", choices=EXIT_RULES, default="margin", help="confidence an input must reach to stop at a narrower width")
    parser.add_argument("--narrow-ce", type=float, default=0.5, help="weight of the narrower widths' cross-entropy (0: distillation alone)")
    parser.add_argument("--width-distill", type=float, default=0.0, help="weight of the narrower widths' distillation from the full width")
    parser.add_argument("--latency-inputs", type=int, default=200, help="test images timed per variant for the cascade latency")
    parser.add_argument("--latency-passes", type=int, default=5)
    parser.add_argument("--runtimes", nargs="+", choices=LATENCY_RUNTIMES, default=list(LATENCY_RUNTIMES),
                        help="where the cascade and the static sub-network are timed (the gates' sliced path runs in eager PyTorch only)")
    parser.add_argument("--runs-dir", default=str(ROOT / "runs/bench_dynamic"),
                        help="per-seed results (and the first seed's networks) kept for restarts")
    parser.add_argument("--render-only", action="store_true", help="write OUT/dynamic.md and its plot again from OUT/dynamic.json (same numbers)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.render_only:  # the tables again from the last run's JSON: nothing is trained or timed
        saved = read_saved_json(out / "dynamic.json", "--render-only")
        args = argparse.Namespace(**{**saved["args"], "out": args.out, "render_only": True})  # as the run had them
    for flag, values in (("--budgets", args.budgets), ("--train-budgets", args.train_budgets)):
        if any(not 0 < b <= 1 for b in values):
            parser.error(f"{flag} {values}: every budget must be in (0, 1]")
    if args.round_to < 1:
        parser.error(f"--round-to {args.round_to}: must be >= 1")
    if sorted(args.widths) != args.widths or args.widths[-1] != 1.0 or args.widths[0] <= 0:
        parser.error(f"--widths {args.widths} must ascend in (0, 1] and end with 1")
    if args.thresholds is None:
        args.thresholds = DEFAULT_THRESHOLDS[args.exit_rule]
    if any(not 0 <= t <= 1 for t in args.thresholds):
        parser.error(f"--thresholds {args.thresholds}: every threshold is a confidence in [0, 1]")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    profiles = load_config(None).profiles
    cfg = load_config(ROOT / "configs/centralized.toml", {
        "data": {"data_dir": "" if args.render_only else args.data_dir},  # rendering reads no data
        "train": {"epochs": args.epochs, "threads": args.train_threads, "cosine": True},
        "pruning": {"finetune_epochs": args.finetune_epochs, "criterion": "taylor", "sparsity": profiles["mobile_cpu"].sparsity},
        "eval": {"latency": False},
    })
    if args.render_only:
        plot(saved["seeds"], saved["latency_ms_b1"], args, out / "dynamic_accuracy_vs_macs.png")
        write_text(out / "dynamic.md", render(saved["seeds"], saved["latency_ms_b1"], args, cfg, saved["n_test"]))
        print((out / "dynamic.md").read_text())
        return 0
    data = load_data(cfg)
    per_seed = []
    for i, seed in enumerate(args.seeds):
        log.info("seed %d (%d/%d)", seed, i + 1, len(args.seeds))
        per_seed.append(seed_results(cfg, seed, data, args, keep_networks=i == 0))
    start = time.strftime("%Y-%m-%d %H:%M")
    lat = gated_latency_ms(per_seed[0]["_gated"], args.budgets, args.threads, repeats=args.latency_repeats)
    images = [x[None] for x in torch.cat([x for x, _ in make_loader(data[1], 256, train=False)])[: args.latency_inputs]]
    stages = per_seed[0]["_stages"]
    lat["cascade"] = {rt: cascade_latency_ms(stages[-1], {f"cascade@{t:g}": WidthCascade(stages, t, rule=args.exit_rule) for t in args.thresholds},
                                             images, args.threads, args.latency_passes, runtime=rt) for rt in args.runtimes}
    lat["timed"] = f"{start} to {time.strftime('%H:%M')}"
    lat["environment"] = environment()
    for r in per_seed:
        r.pop("_gated", None)
        r.pop("_stages", None)
    write_json(out / "dynamic.json", {"args": vars(args), "seeds": per_seed, "latency_ms_b1": lat, "n_test": len(data[1])})
    plot(per_seed, lat, args, out / "dynamic_accuracy_vs_macs.png")
    write_text(out / "dynamic.md", render(per_seed, lat, args, cfg, len(data[1])))
    print((out / "dynamic.md").read_text())
    return 0


if __name__ == "__main__":
    from fedprune.cli import run_reporting_errors  # noqa: E402

    sys.exit(run_reporting_errors(main, "bench_dynamic.py"))
