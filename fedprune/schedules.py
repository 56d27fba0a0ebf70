"""Pruning schedules: one-shot, progressive, and lottery ticket (structured).

Each schedule works on a dense model with soft masks (so every intermediate
model lives in the original index space) and takes a ``train_fn(model,
epochs, after_step)`` callable for fine-tuning, so the same code serves
centralized experiments and federated clients.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np
import torch.nn as nn

from fedprune.allocation import BUDGET_ALLOCATIONS, allocate, check_sparsity
from fedprune.groups import ChannelGroups
from fedprune.importance import ImportanceScores, compute_importance
from fedprune.masks import SoftMaskHook, StructuredMask, apply_soft_mask, round_keep_count
from fedprune.sensitivity import DEFAULT_RATIOS, LayerSensitivity, measure_sensitivity

__all__ = ["PruneSpec", "PruneStage", "select_mask", "one_shot", "progressive", "lottery_ticket", "rewind", "SCHEDULES", "TrainFn"]

#: ``train_fn(model, epochs, after_step)`` fine-tunes ``model`` in place.
TrainFn = Callable[[nn.Module, int, Callable[[nn.Module], None]], dict]
#: ``evaluate_fn(model) -> metrics``, run after each mask is applied and before fine-tuning.
EvalFn = Callable[[nn.Module], dict]

SCHEDULES = ("one_shot", "progressive", "lottery")


@dataclass(frozen=True)
class PruneSpec:
    """What to prune: criterion, target channel sparsity and allocation."""

    criterion: str = "l2"
    sparsity: float = 0.5
    allocation: str = "uniform"
    num_batches: int | None = 8
    min_channels: int = 1
    round_to: int | None = None
    sensitivity_ratios: tuple[float, ...] = DEFAULT_RATIOS
    #: For the budget allocations (``budget``, ``budget_uniform``, ``budget_fill``, ``constant_cost``):
    #: ``(scale, scores, sensitivity) -> StructuredMask``, the mask of a stage that goes
    #: ``scale`` (in (0, 1]) of the way from dense to the budget (e.g. a partial of
    #: :func:`fedprune.task.profile_budget_masks`); ``sensitivity`` is one number per
    #: group (:meth:`LayerSensitivity.score`) when ``budget_needs_sensitivity``, else None.
    #: ``sparsity`` then only sets the stage fractions (stage sparsity / ``sparsity``).
    budget: Callable[[float, Mapping[str, np.ndarray], Mapping[str, float] | None], StructuredMask] | None = None
    #: Measure layer sensitivity for ``budget`` (e.g. ``pruning.budget_sensitivity`` > 0).
    budget_needs_sensitivity: bool = False

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)


@dataclass
class PruneStage:
    """One pruning step: the mask chosen, its sparsity, and the evidence used."""

    mask: StructuredMask
    sparsity: float
    scores: ImportanceScores
    sensitivity: LayerSensitivity | None = None
    train: dict = field(default_factory=dict)
    before_finetune: dict = field(default_factory=dict)


def select_mask(
    model: nn.Module,
    groups: ChannelGroups,
    spec: PruneSpec,
    sparsity: float,
    score_loader: Iterable | None = None,
    sensitivity_loader: Iterable | None = None,
    within: StructuredMask | None = None,
) -> PruneStage:
    """Score channels, allocate kept counts for ``sparsity``, and build the mask.

    ``within`` restricts the result to a subset of an existing mask (channels
    pruned earlier stay pruned), which keeps progressive masks nested.
    """
    scores = compute_importance(spec.criterion, model, groups, score_loader, spec.num_batches)
    ranked = {k: v.copy() for k, v in scores.scores.items()}
    if within is not None:
        for k in ranked:
            ranked[k][~within.keep[k]] = -np.inf
    sens = None
    if spec.allocation == "sensitivity" or (spec.allocation in BUDGET_ALLOCATIONS and spec.budget_needs_sensitivity):
        if sensitivity_loader is None:
            raise ValueError(f"allocation {spec.allocation!r} with layer sensitivity needs a sensitivity loader")
        sens = measure_sensitivity(model, groups, scores.scores, sensitivity_loader, spec.sensitivity_ratios, within)
    if spec.allocation in BUDGET_ALLOCATIONS:
        if spec.budget is None:
            raise ValueError(f"allocation {spec.allocation!r} needs budget constraints (PruneSpec.budget)")
        scale = sparsity / spec.sparsity if spec.sparsity > 0 else 1.0
        counts = spec.budget(scale, scores.scores, sens.score() if sens else None).kept_counts
    else:
        counts = allocate(groups, sparsity, spec.allocation, scores.scores, sens.score() if sens else None, spec.min_channels)
    if within is not None:
        counts = {k: min(c, int(within.keep[k].sum())) for k, c in counts.items()}
    counts = {k: round_keep_count(c, groups[k].size, spec.round_to) for k, c in counts.items()}
    mask = StructuredMask.from_scores(ranked, counts)
    return PruneStage(mask, sparsity, scores, sens)


def one_shot(
    model: nn.Module,
    groups: ChannelGroups,
    spec: PruneSpec,
    train_fn: TrainFn,
    finetune_epochs: int,
    score_loader: Iterable | None = None,
    sensitivity_loader: Iterable | None = None,
    evaluate_fn: EvalFn | None = None,
) -> list[PruneStage]:
    """Prune once to ``spec.sparsity``, then fine-tune with the mask held fixed."""
    stage = select_mask(model, groups, spec, spec.sparsity, score_loader, sensitivity_loader)
    _finish_stage(model, groups, stage, train_fn, finetune_epochs, evaluate_fn)
    return [stage]


def _finish_stage(model, groups, stage: PruneStage, train_fn: TrainFn, epochs: int, evaluate_fn: EvalFn | None) -> None:
    apply_soft_mask(model, stage.mask, groups)
    if evaluate_fn is not None:
        stage.before_finetune = evaluate_fn(model)
    if epochs > 0:
        stage.train = train_fn(model, epochs, SoftMaskHook(stage.mask, groups))


def _split_epochs(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def progressive(
    model: nn.Module,
    groups: ChannelGroups,
    spec: PruneSpec,
    train_fn: TrainFn,
    finetune_epochs: int,
    stages: int = 3,
    score_loader: Iterable | None = None,
    sensitivity_loader: Iterable | None = None,
    evaluate_fn: EvalFn | None = None,
) -> list[PruneStage]:
    """``stages`` pruning steps to sparsity ``spec.sparsity * i / stages`` with fine-tuning between.

    The total fine-tuning budget ``finetune_epochs`` is split over the stages,
    so a progressive run costs the same epochs as a one-shot run.
    """
    if stages < 1:
        raise ValueError(f"progressive pruning needs stages >= 1, got {stages}")
    history: list[PruneStage] = []
    current = StructuredMask.dense(groups)
    for i, epochs in enumerate(_split_epochs(finetune_epochs, stages), start=1):
        stage = select_mask(model, groups, spec, spec.sparsity * i / stages, score_loader, sensitivity_loader, current)
        current = stage.mask
        _finish_stage(model, groups, stage, train_fn, epochs, evaluate_fn)
        history.append(stage)
    return history


def rewind(model: nn.Module, rewind_state: Mapping, mask: StructuredMask, groups: ChannelGroups) -> nn.Module:
    """Reset every weight to ``rewind_state`` and zero the pruned channels (lottery-ticket rewind)."""
    model.load_state_dict(rewind_state)
    return apply_soft_mask(model, mask, groups)


def lottery_ticket(
    model: nn.Module,
    groups: ChannelGroups,
    spec: PruneSpec,
    train_fn: TrainFn,
    epochs_per_round: int,
    rounds: int = 3,
    rewind_state: Mapping | None = None,
    score_loader: Iterable | None = None,
    sensitivity_loader: Iterable | None = None,
    evaluate_fn: EvalFn | None = None,
) -> list[PruneStage]:
    """Iterative structured lottery ticket: prune, rewind kept weights, retrain.

    ``model`` is assumed trained. Round ``i`` prunes to
    ``1 - (1 - sparsity) ** (i / rounds)`` (the same fraction of the remaining
    channels each round), rewinds the surviving weights to ``rewind_state``
    (initial or early-epoch weights; default: the model's weights on entry)
    and retrains for ``epochs_per_round`` epochs.
    """
    if rounds < 1:
        raise ValueError(f"lottery ticket needs rounds >= 1, got {rounds}")
    rewind_state = copy.deepcopy(dict(rewind_state if rewind_state is not None else model.state_dict()))
    history: list[PruneStage] = []
    current = StructuredMask.dense(groups)
    for i in range(1, rounds + 1):
        target = 1.0 - (1.0 - spec.sparsity) ** (i / rounds)
        stage = select_mask(model, groups, spec, target, score_loader, sensitivity_loader, current)
        current = stage.mask
        model.load_state_dict(rewind_state)
        _finish_stage(model, groups, stage, train_fn, epochs_per_round, evaluate_fn)
        history.append(stage)
    return history
