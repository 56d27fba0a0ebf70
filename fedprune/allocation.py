"""How many channels each group keeps, and the masks that follow.

An *allocation* turns a target channel sparsity (fraction of all group
channels to remove) into per-group kept-channel counts:

* ``uniform``: every group drops the same fraction (layer-wise).
* ``global``: scores are normalised per group (divided by the group mean) so
  layers compare, then the lowest-ranked channels network-wide are removed.
* ``sensitivity``: sensitivity-adaptive; each group's sparsity is inversely
  proportional to its measured sensitivity, scaled so the channel-weighted
  sparsity meets the target, and clamped to ``[0, max_group_sparsity]``.

All honour ``min_channels`` per group and ``round_to``. For a fixed score
vector every method is monotone in the target sparsity, so masks for several
targets built from the same scores are nested (see :func:`nested_masks`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from fedprune.groups import ChannelGroups
from fedprune.masks import StructuredMask, round_keep_count

__all__ = ["ALLOCATIONS", "allocate", "nested_masks", "sensitivity_weights", "check_sparsity"]

ALLOCATIONS = ("uniform", "global", "sensitivity")


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    """Validate a channel sparsity in [0, 1)."""
    if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{what} must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _min_keep(size: int, min_channels: int) -> int:
    return max(1, min(min_channels, size))


def _uniform(groups: ChannelGroups, sparsity: float, min_channels: int) -> dict[str, int]:
    return {g.name: max(_min_keep(g.size, min_channels), int(round(g.size * (1.0 - sparsity)))) for g in groups}


def _global(groups: ChannelGroups, scores: Mapping[str, np.ndarray], sparsity: float, min_channels: int) -> dict[str, int]:
    total = groups.total_channels
    n_keep = int(round(total * (1.0 - sparsity)))
    counts = {g.name: _min_keep(g.size, min_channels) for g in groups}
    # Remaining budget goes to the best channels network-wide beyond each group's minimum.
    candidates = []
    for g in groups:
        s = np.asarray(scores[g.name], dtype=np.float64)
        ref = s.mean()
        norm = s / ref if ref > 0 else np.ones_like(s)
        ranked = np.sort(norm)[::-1][counts[g.name]:]
        candidates.extend((float(v), gi, g.name) for gi, v in enumerate(ranked))
    candidates.sort(key=lambda c: (-c[0], c[2], c[1]))
    budget = max(0, n_keep - sum(counts.values()))
    for _, _, name in candidates[:budget]:
        counts[name] += 1
    return counts


def sensitivity_weights(sensitivity: Mapping[str, float], eps: float = 1e-3) -> dict[str, float]:
    """Relative pruning weight per group: 1 / (sensitivity + eps), mean-normalised."""
    inv = {k: 1.0 / (max(float(v), 0.0) + eps) for k, v in sensitivity.items()}
    mean = float(np.mean(list(inv.values())))
    return {k: v / mean for k, v in inv.items()}


def _sensitivity(
    groups: ChannelGroups,
    sensitivity: Mapping[str, float],
    sparsity: float,
    min_channels: int,
    max_group_sparsity: float,
) -> dict[str, int]:
    missing = [g.name for g in groups if g.name not in sensitivity]
    if missing:
        raise ValueError(f"sensitivity-adaptive allocation needs a sensitivity for every group; missing {missing}")
    weights = sensitivity_weights({g.name: sensitivity[g.name] for g in groups})
    sizes = np.array([g.size for g in groups], dtype=np.float64)
    w = np.array([weights[g.name] for g in groups])
    target = sparsity * sizes.sum()

    def removed(lam: float) -> np.ndarray:
        return np.clip(lam * w, 0.0, max_group_sparsity) * sizes

    lo, hi = 0.0, 1.0
    while removed(hi).sum() < target and hi < 1e6:
        hi *= 2
    for _ in range(60):  # bisection on the scale factor
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if removed(mid).sum() < target else (lo, mid)
    frac = np.clip(hi * w, 0.0, max_group_sparsity)
    return {g.name: max(_min_keep(g.size, min_channels), int(round(g.size * (1.0 - f)))) for g, f in zip(groups, frac)}


def allocate(
    groups: ChannelGroups,
    sparsity: float,
    method: str = "uniform",
    scores: Mapping[str, np.ndarray] | None = None,
    sensitivity: Mapping[str, float] | None = None,
    min_channels: int = 1,
    max_group_sparsity: float = 0.95,
) -> dict[str, int]:
    """Kept channels per group for a target channel ``sparsity`` in [0, 1)."""
    check_sparsity(sparsity)
    if method not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {method!r}; allowed: {list(ALLOCATIONS)}")
    if method == "uniform":
        return _uniform(groups, sparsity, min_channels)
    if method == "global":
        if scores is None:
            raise ValueError("global allocation needs importance scores")
        return _global(groups, scores, sparsity, min_channels)
    if sensitivity is None:
        raise ValueError("sensitivity-adaptive allocation needs layer sensitivities")
    return _sensitivity(groups, sensitivity, sparsity, min_channels, max_group_sparsity)


def nested_masks(
    groups: ChannelGroups,
    scores: Mapping[str, np.ndarray],
    sparsities: Sequence[float],
    method: str = "uniform",
    sensitivity: Mapping[str, float] | None = None,
    min_channels: int = 1,
    round_to: int | None = None,
) -> list[StructuredMask]:
    """One mask per sparsity, all from the same ranking, so that masks are nested.

    A higher sparsity's mask is a subset of every lower sparsity's mask
    (e.g. microcontroller ⊆ mobile_cpu ⊆ edge_gpu). Returned in input order.
    """
    order = np.argsort(np.asarray(sparsities, dtype=np.float64), kind="stable")
    counts = [allocate(groups, sparsities[i], method, scores, sensitivity, min_channels) for i in order]
    # Enforce monotone counts (looser budget never keeps fewer channels), then round.
    for j in range(len(counts) - 2, -1, -1):
        for name in counts[j]:
            counts[j][name] = max(counts[j][name], counts[j + 1][name])
    rounded = [{n: round_keep_count(c, groups[n].size, round_to) for n, c in cs.items()} for cs in counts]
    masks_sorted = [StructuredMask.from_scores(scores, c) for c in rounded]
    out: list[StructuredMask] = [None] * len(sparsities)  # type: ignore[list-item]
    for pos, i in enumerate(order):
        out[i] = masks_sorted[pos]
    return out
