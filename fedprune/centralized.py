"""Centralized pruning experiment: train dense, prune with a schedule, fine-tune, measure.

This is the notebook's experiment done for real: the pruned model is
physically extracted and measured (params, MACs, CPU latency) next to the
dense and the soft-masked models, and the extracted model is checked to give
the soft-masked model's outputs.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from fedprune.allocation import InfeasibleBudgetError, check_feasible, check_min_channels
from fedprune.config import BUDGET_ALLOCATIONS, ConfigError, ExperimentConfig, config_to_dict, config_without
from fedprune.data import ImageArrays, make_loader
from fedprune.masks import extract_submodel
from fedprune.metrics import model_costs, param_sparsity
from fedprune.reporting import write_json
from fedprune.schedules import PruneSpec, lottery_ticket, one_shot, progressive
from fedprune.task import (budget_group_weights, budget_round_to, build_model, hardware_model, load_data, make_train_fn, model_groups, profile_budget_masks,
                           profile_constraints, train_config)
from fedprune.training import evaluate, set_seed

log = logging.getLogger(__name__)

__all__ = ["DenseRun", "train_dense", "prune_experiment", "run_centralized", "compare_outputs", "centralized_config"]

#: Images used to estimate data-driven importance and sensitivity (eval transform).
SCORE_SUBSET = 1024
#: Config sections (None: the whole section) and keys that centralized runs never read:
#: federated rounds, dynamic pruning, federated static BN.
NOT_CENTRALIZED_KEYS: dict[str, tuple[str, ...] | None] = {"federated": None, "dynamic": None, "eval": ("static_bn",)}


def centralized_config(config: dict) -> dict:
    """The part of a config dict (:func:`~fedprune.config.config_to_dict`) that shapes a
    centralized run (:data:`NOT_CENTRALIZED_KEYS` dropped, ``data.data_dir`` resolved), so a
    cached result stays valid when only federated or dynamic settings changed."""
    out = config_without(config, NOT_CENTRALIZED_KEYS)
    data = out.get("data", {})
    if data.get("data_dir"):
        data["data_dir"] = str(Path(data["data_dir"]).resolve())
    return out


@dataclass
class DenseRun:
    """A trained dense model plus what is needed to reuse it (initial weights for lottery rewinds)."""

    model: nn.Module
    init_state: dict
    rewind_state: dict
    metrics: dict
    epochs: int


def _loaders(cfg: ExperimentConfig, train_arrays: ImageArrays, test_arrays: ImageArrays):
    bs = cfg.train.batch_size
    score_arrays = train_arrays.subset(list(range(min(SCORE_SUBSET, len(train_arrays)))))
    return (
        make_loader(train_arrays, bs, train=True, seed=cfg.seed),
        make_loader(score_arrays, bs, train=False),
        make_loader(test_arrays, 256, train=False),
    )


def train_dense(cfg: ExperimentConfig, epochs: int | None = None, data=None) -> DenseRun:
    """Train the configured model densely for ``epochs`` (default ``train.epochs``)."""
    set_seed(cfg.seed)
    train_arrays, test_arrays = data or load_data(cfg)
    train_loader, _, test_loader = _loaders(cfg, train_arrays, test_arrays)
    model = build_model(cfg)
    init_state = copy.deepcopy(model.state_dict())
    epochs = cfg.train.epochs if epochs is None else epochs
    rewind_state = init_state
    fn = make_train_fn(train_loader, train_config(cfg), progress="dense")
    rewind_at = min(cfg.pruning.rewind_epoch, epochs)
    if rewind_at > 0:
        fn(model, rewind_at)
        rewind_state = copy.deepcopy(model.state_dict())
    if epochs - rewind_at > 0:
        fn(model, epochs - rewind_at)
    metrics = evaluate(model, test_loader)
    log.info("dense: %d epochs, test accuracy %.4f", epochs, metrics["accuracy"])
    return DenseRun(model, init_state, rewind_state, metrics, epochs)


@torch.no_grad()
def compare_outputs(a: nn.Module, b: nn.Module, loader) -> float:
    """Largest absolute logit difference of two models on one batch (eval mode)."""
    x, _ = next(iter(loader))
    a.eval(), b.eval()
    return float((a(x) - b(x)).abs().max())


def check_pruning_config(cfg: ExperimentConfig, model: nn.Module | None = None):
    """Raise a clear error when pruning cannot work as configured (``pruning.min_channels`` keeps every channel;
    for a budget allocation: ``pruning.budget_profile`` missing or its budgets infeasible), and return the cost
    model (:func:`~fedprune.task.hardware_model`) of a budget allocation, else None. Costs depend on the layer
    shapes only, so ``model`` may be untrained (default: a fresh one): call it before training to fail early."""
    p = cfg.pruning
    check_min_channels(model_groups(cfg), p.min_channels)
    if p.allocation not in BUDGET_ALLOCATIONS:
        return None
    if not p.budget_profile:
        raise ConfigError(
            f"config key 'pruning.allocation' = {p.allocation!r} in a centralized run needs pruning.budget_profile "
            f"(one of {sorted(n for n, pr in cfg.profiles.items() if pr.budgets)})"
        )
    hardware = hardware_model(cfg, model if model is not None else build_model(cfg))
    try:
        check_feasible(model_groups(cfg), profile_constraints(cfg, hardware, [p.budget_profile]), p.min_channels, budget_round_to(cfg))
    except InfeasibleBudgetError as err:
        raise err.naming([p.budget_profile]) from None
    return hardware


def prune_experiment(cfg: ExperimentConfig, dense: DenseRun, data=None) -> dict:
    """Prune a copy of ``dense.model`` as configured and report accuracy and costs."""
    set_seed(cfg.seed + 1)
    train_arrays, test_arrays = data or load_data(cfg)
    train_loader, score_loader, test_loader = _loaders(cfg, train_arrays, test_arrays)
    groups = model_groups(cfg)
    p = cfg.pruning
    budget = None
    hardware = check_pruning_config(cfg, dense.model)  # before any fine-tuning
    if hardware is not None:
        budget = lambda scale, scores, sens: profile_budget_masks(  # noqa: E731
            cfg, hardware, scores, [p.budget_profile], scale, budget_group_weights(cfg, sens))[0]
    round_to = budget_round_to(cfg) if budget is not None else p.round_to or None
    spec = PruneSpec(p.criterion, p.sparsity, p.allocation, p.num_batches, p.min_channels, round_to, tuple(p.sensitivity_ratios), budget,
                     budget_needs_sensitivity=p.budget_weighted)
    model = copy.deepcopy(dense.model)
    train_fn = make_train_fn(train_loader, train_config(cfg), progress=f"{p.schedule}:{p.criterion}")
    evaluate_fn = lambda m: evaluate(m, test_loader)  # noqa: E731
    start = time.perf_counter()
    common = dict(score_loader=score_loader, sensitivity_loader=score_loader, evaluate_fn=evaluate_fn)
    if p.schedule == "one_shot":
        stages = one_shot(model, groups, spec, train_fn, p.finetune_epochs, **common)
        extra_epochs = p.finetune_epochs
    elif p.schedule == "progressive":
        stages = progressive(model, groups, spec, train_fn, p.finetune_epochs, p.stages, **common)
        extra_epochs = p.finetune_epochs
    else:
        stages = lottery_ticket(model, groups, spec, train_fn, p.finetune_epochs, p.stages, dense.rewind_state, **common)
        extra_epochs = p.finetune_epochs * p.stages
    mask = stages[-1].mask
    final = evaluate(model, test_loader)
    pruned = extract_submodel(model, mask, groups)
    extracted = evaluate(pruned, test_loader)
    latency = cfg.eval.latency
    t, r = cfg.eval.latency_threads, cfg.eval.latency_repeats
    dense_cost = model_costs(dense.model, latency, t, r)
    masked_cost = model_costs(model, latency, t, r)
    pruned_cost = model_costs(pruned, latency, t, r)
    result = {
        "schedule": p.schedule,
        "criterion": p.criterion,
        "allocation": p.allocation,
        "target_sparsity": p.sparsity,
        "channel_sparsity": mask.channel_sparsity,
        "param_sparsity": param_sparsity(pruned, dense_cost["params"]),
        "kept_channels": mask.kept_counts,
        "accuracy_before_finetune": stages[0].before_finetune.get("accuracy"),
        "accuracy": final["accuracy"],
        "loss": final["loss"],
        "extracted_accuracy": extracted["accuracy"],
        "max_output_diff_soft_vs_extracted": compare_outputs(model, pruned, test_loader),
        "total_epochs": dense.epochs + extra_epochs,
        "importance_samples": stages[0].scores.num_samples,
        "params": pruned_cost["params"],
        "macs": pruned_cost["macs"],
        "flops": pruned_cost["flops"],
        "flops_reduction": dense_cost["flops"] / pruned_cost["flops"],
        "wall_s": time.perf_counter() - start,
        "stages": [
            {"sparsity": s.sparsity, "channel_sparsity": s.mask.channel_sparsity, "before_finetune": s.before_finetune, "train": s.train}
            for s in stages
        ],
    }
    if hardware is not None:
        prof = cfg.profiles[p.budget_profile]
        host_ms = {1: pruned_cost["latency_ms"]["b1"], 64: pruned_cost["latency_ms"]["b64"]} if latency else None
        result["budget_profile"] = p.budget_profile
        result["budgets"] = hardware.report(prof.budgets, mask, pruned, prof.compute_speed, host_ms, repeats=r)
    if latency:
        result["latency_ms"] = {"dense": dense_cost["latency_ms"], "masked": masked_cost["latency_ms"], "pruned": pruned_cost["latency_ms"]}
        result["speedup"] = {
            kind: {b: dense_cost["latency_ms"][b] / cost["latency_ms"][b] for b in ("b1", "b64")}
            for kind, cost in (("masked", masked_cost), ("pruned", pruned_cost))
        }
    log.info(
        "%s %s %.0f%%: accuracy %.4f -> %.4f after fine-tuning; MACs %.2fx fewer",
        p.schedule, p.criterion, 100 * p.sparsity, result["accuracy_before_finetune"] or float("nan"), final["accuracy"], result["flops_reduction"],
    )
    return {"pruned": result, "mask": mask, "model": model, "extracted": pruned, "dense_costs": dense_cost}


def run_centralized(cfg: ExperimentConfig, out_dir: str | Path | None = None) -> dict:
    """Train dense, prune, fine-tune; write to ``out_dir``: ``mask.npz`` (the mask, original channel indices),
    ``model_dense.pt``, ``model_masked.pt`` (the fine-tuned model at full size, pruned channels zeroed),
    ``model_pruned.pt`` (its physically smaller twin, :func:`fedprune.masks.extract_submodel`; the same outputs) as
    state_dicts, and ``results.json`` last."""
    with torch.random.fork_rng(devices=[]):
        check_pruning_config(cfg)  # a bad budget or min_channels fails before the dense training, not after
    data = load_data(cfg)
    dense = train_dense(cfg, data=data)
    run = prune_experiment(cfg, dense, data)
    results = {
        "config": config_to_dict(cfg),
        "dense": {**{k: dense.metrics[k] for k in ("accuracy", "loss")}, "epochs": dense.epochs, **run["dense_costs"]},
        "pruned": run["pruned"],
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / "mask.npz", **run["mask"].to_arrays())
        torch.save(run["model"].state_dict(), out / "model_masked.pt")
        torch.save(run["extracted"].state_dict(), out / "model_pruned.pt")
        torch.save(dense.model.state_dict(), out / "model_dense.pt")
        write_json(out / "results.json", results)  # last: a run with results.json is complete
    return results
