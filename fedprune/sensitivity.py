"""Layer sensitivity: how much accuracy and loss suffer when one group alone is pruned."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch.nn as nn

from fedprune.groups import ChannelGroups
from fedprune.masks import StructuredMask, apply_soft_mask
from fedprune.training import evaluate

__all__ = ["LayerSensitivity", "measure_sensitivity", "DEFAULT_RATIOS"]

#: Pruning ratios (fraction of a group's channels removed) probed by default.
DEFAULT_RATIOS = (0.2, 0.5, 0.8)


@dataclass
class LayerSensitivity:
    """Accuracy/loss drops per group and ratio, relative to the unpruned model.

    ``accuracy_drop[group][i]`` is the drop (fraction, 0..1) in accuracy when
    only ``group`` is pruned at ``ratios[i]``; ``loss_increase`` likewise.
    """

    ratios: tuple[float, ...]
    base_accuracy: float
    base_loss: float
    accuracy_drop: dict[str, list[float]] = field(default_factory=dict)
    loss_increase: dict[str, list[float]] = field(default_factory=dict)
    num_samples: int = 0

    def score(self) -> dict[str, float]:
        """One number per group: mean loss increase over ratios (smoother than accuracy), floored at 0."""
        return {k: max(0.0, float(np.mean(v))) for k, v in self.loss_increase.items()}

    def to_dict(self) -> dict:
        return {
            "ratios": list(self.ratios),
            "base_accuracy": self.base_accuracy,
            "base_loss": self.base_loss,
            "accuracy_drop": self.accuracy_drop,
            "loss_increase": self.loss_increase,
            "num_samples": self.num_samples,
        }


def measure_sensitivity(
    model: nn.Module,
    groups: ChannelGroups,
    scores: Mapping[str, np.ndarray],
    loader: Iterable,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    base: StructuredMask | None = None,
) -> LayerSensitivity:
    """Prune each group alone (lowest ``scores`` first) at each ratio and evaluate on ``loader``.

    ``base`` is an already-applied mask (e.g. a profile's) kept everywhere;
    ratios then apply to the channels it keeps. ``model`` is not modified.
    """
    for r in ratios:
        if not 0.0 < r < 1.0:
            raise ValueError(f"sensitivity ratios must be in (0, 1), got {r}")
    base = base or StructuredMask.dense(groups)
    ref = evaluate(apply_soft_mask(copy.deepcopy(model), base, groups), loader)
    result = LayerSensitivity(tuple(float(r) for r in ratios), ref["accuracy"], ref["loss"], num_samples=ref["num_examples"])
    probe = copy.deepcopy(model)
    state = {k: v.clone() for k, v in probe.state_dict().items()}
    for g in groups:
        acc_drops, loss_incs = [], []
        kept = base.kept(g.name)
        for r in ratios:
            keep = dict(base.keep)
            n_keep = max(1, int(round(kept.size * (1.0 - r))))
            order = kept[np.lexsort((kept, -np.asarray(scores[g.name])[kept]))]
            vec = np.zeros(g.size, dtype=bool)
            vec[order[:n_keep]] = True
            keep[g.name] = vec
            probe.load_state_dict(state)
            metrics = evaluate(apply_soft_mask(probe, StructuredMask(keep), groups), loader)
            acc_drops.append(ref["accuracy"] - metrics["accuracy"])
            loss_incs.append(metrics["loss"] - ref["loss"])
        result.accuracy_drop[g.name] = acc_drops
        result.loss_increase[g.name] = loss_incs
    return result
