"""PNG plots a person can read: accuracy per round, accuracy vs FLOPs, kept channels per layer."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plain_log_ticks", "run_colors", "plot_run", "plot_accuracy_per_round", "plot_accuracy_vs_flops", "plot_kept_channels", "save", "label", "finish"]


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def label(ax, xlabel: str | None, ylabel: str, title: str, grid_axis: str = "both", legend_size: int = 8, **legend_kw) -> None:
    """Label, grid and legend ``ax`` (one panel of a figure)."""
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis=grid_axis, alpha=0.3)
    ax.legend(fontsize=legend_size, **legend_kw)


def finish(fig, ax, path: Path, xlabel: str | None, ylabel: str, title: str, grid_axis: str = "both", legend_size: int = 8, **legend_kw) -> Path:
    """Label, grid and legend ``ax`` (:func:`label`), then save ``fig`` as a PNG at ``path``."""
    label(ax, xlabel, ylabel, title, grid_axis, legend_size, **legend_kw)
    return save(fig, path)


def plain_log_ticks(axis) -> None:
    """Tick labels of a log axis as plain numbers (20, 30, 100), not powers of ten (2 x 10^1)."""
    from matplotlib.ticker import LogLocator, ScalarFormatter

    axis.set_major_formatter(ScalarFormatter())
    axis.set_minor_formatter(ScalarFormatter())
    axis.set_minor_locator(LogLocator(subs=(2.0, 3.0, 5.0)))


def run_colors(results: dict) -> dict[str, str]:
    """One colour per series of a run, the same in every plot: the dense model black, the profiles the
    colour cycle in their order in ``results["profiles"]`` (most capable first), then any other series."""
    names = list(results.get("profiles", {}))
    for rec in results.get("rounds", []):
        names += [n for n in (rec.get("accuracy") or {}) if n != "dense" and n not in names]
    return {"dense": "black", **{n: f"C{i % 10}" for i, n in enumerate(names)}}


def plot_accuracy_per_round(results: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    series: dict[str, list[tuple[int, float]]] = {}
    for rec in results["rounds"]:
        for name, acc in (rec.get("accuracy") or {}).items():
            series.setdefault(name, []).append((rec["round"], acc))
    colors = run_colors(results)
    for name, pts in series.items():
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=name, color=colors[name])
    warm = [r["round"] for r in results["rounds"] if r["phase"] == "warmup"]
    if warm:
        ax.axvspan(0.5, max(warm) + 0.5, color="grey", alpha=0.12, label="dense warm-up")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy per round (global model / profile sub-networks)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, path)


def plot_accuracy_vs_flops(results: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    d = results["dense"]
    ax.scatter([d["flops"] / 1e6], [100 * d["accuracy"]], marker="*", s=180, color="black", label="dense", zorder=3)
    colors = run_colors(results)
    for name, p in results["profiles"].items():
        ax.scatter([p["flops"] / 1e6], [100 * p["accuracy"]], s=70, label=f"{name} ({100 * p['channel_sparsity']:.0f}% ch. pruned)",
                   zorder=3, color=colors[name])
    ax.set_xscale("log")
    plain_log_ticks(ax.xaxis)
    ax.set_xlabel("MFLOPs per image (log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs FLOPs per profile")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_kept_channels(results: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(next(iter(results["profiles"].values()))["kept_channels"])), 4))
    profiles = results["profiles"]
    layers = list(next(iter(profiles.values()))["kept_channels"])
    width = 0.8 / max(len(profiles), 1)
    colors = run_colors(results)
    for i, (name, p) in enumerate(profiles.items()):
        xs = [j + i * width for j in range(len(layers))]
        ax.bar(xs, [p["kept_channels"][g] for g in layers], width=width, label=name, color=colors[name])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))])
    ax.set_xticklabels(layers, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("kept channels")
    ax.set_title("Kept channels per layer and profile")
    ax.legend()
    return save(fig, path)


def plot_run(results: dict, out_dir: Path) -> list[Path]:
    """All plots of one federated run into ``out_dir``."""
    out = [plot_accuracy_per_round(results, out_dir / "accuracy_per_round.png")]
    if results["profiles"]:
        out.append(plot_accuracy_vs_flops(results, out_dir / "accuracy_vs_flops.png"))
        out.append(plot_kept_channels(results, out_dir / "kept_channels.png"))
    return out
