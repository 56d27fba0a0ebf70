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

Budget-constrained allocation (:func:`budget_allocate`,
:func:`nested_budget_masks`) instead removes channels greedily, cheapest
importance per unit of cost saved first, until hardware cost functions
(MACs, bytes, ms; see :mod:`fedprune.cost`) meet their budgets (importance
lost is measured as in :data:`BUDGET_OBJECTIVES`, optionally weighted per
group by layer sensitivity: :func:`importance_weights`);
:func:`budget_masks` also offers the smallest uniform sparsity that meets the
budgets, and that uniform allocation with the budget it leaves unused filled
greedily (``budget_fill``, :func:`_grow`); :func:`constant_cost_allocate` is
the baseline where every channel costs the same.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Mapping, Sequence

import numpy as np

from fedprune.config import BUDGET_ALLOCATIONS, BUDGET_OBJECTIVES, MAX_BUDGET_SENSITIVITY, SPARSITY_ALLOCATIONS
from fedprune.groups import ChannelGroups
from fedprune.masks import StructuredMask, descending_order, round_keep_count

__all__ = [
    "SPARSITY_ALLOCATIONS",
    "allocate",
    "nested_masks",
    "sensitivity_weights",
    "importance_weights",
    "check_sparsity",
    "InfeasibleBudgetError",
    "budget_allocate",
    "nested_budget_masks",
    "constant_cost_allocate",
    "BUDGET_ALLOCATIONS",
    "BUDGET_OBJECTIVES",
    "budget_masks",
    "check_feasible",
]


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    """Validate a channel sparsity in [0, 1)."""
    if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{what} must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def check_min_channels(groups: ChannelGroups, min_channels: int) -> None:
    """Raise :class:`~fedprune.config.ConfigError` when ``pruning.min_channels`` is at least every group's size:
    then no channel can be pruned and every profile would silently stay dense."""
    from fedprune.config import ConfigError

    largest = max(groups, key=lambda g: g.size, default=None)
    if largest is not None and min_channels >= largest.size:
        raise ConfigError(f"config key 'pruning.min_channels' = {min_channels} keeps every channel of every group (the largest, "
                          f"{largest.name!r}, has {largest.size}), so nothing can be pruned; allowed: below {largest.size}")


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


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def importance_weights(sensitivity: Mapping[str, float], power: float = 1.0, floor: float = 0.05) -> dict[str, float]:
    """Per group: how much its lost importance counts in the budget allocation, from layer sensitivity.

    ``sensitivity`` is one number per group (e.g. :meth:`fedprune.sensitivity.LayerSensitivity.score`,
    the mean loss increase when the group alone is pruned); negative values
    count as 0. The weight is ``(sensitivity / mean over groups) ** power``,
    at least ``floor`` (a group measured as insensitive still costs
    something to thin); all 1 when ``power`` is 0 or every sensitivity is 0.
    ``power`` is in [0, :data:`MAX_BUDGET_SENSITIVITY`], ``floor`` in (0, 1].
    Compare :func:`sensitivity_weights`, its inverse for the sparsity allocation.
    """
    bad = {k: v for k, v in sensitivity.items() if not _is_number(v)}
    if bad:
        raise ValueError(f"layer sensitivities must be finite numbers; got {bad}")
    if not (_is_number(power) and 0.0 <= power <= MAX_BUDGET_SENSITIVITY):
        raise ValueError(f"sensitivity power must be a number in [0, {MAX_BUDGET_SENSITIVITY:g}], got {power!r}")
    if not (_is_number(floor) and 0.0 < floor <= 1.0):
        raise ValueError(f"weight floor must be a number in (0, 1], got {floor!r}")
    values = {k: max(float(v), 0.0) for k, v in sensitivity.items()}
    mean = float(np.mean(list(values.values()))) if values else 0.0
    if mean <= 0.0 or power == 0.0:
        return {k: 1.0 for k in values}
    return {k: max((v / mean) ** power, floor) for k, v in values.items()}


def _check_group_weights(groups: ChannelGroups, weights: Mapping[str, float] | None) -> dict[str, float]:
    """``weights`` for exactly the groups of ``groups`` (all 1 when None); each a finite number > 0."""
    if weights is None:
        return {g.name: 1.0 for g in groups}
    missing = [g.name for g in groups if g.name not in weights]
    unknown = sorted(set(weights) - set(groups.names))
    if missing or unknown:
        raise ValueError(f"group weights must name every group once; missing {missing}, unknown {unknown}")
    bad = {k: v for k, v in weights.items() if not (_is_number(v) and v > 0)}
    if bad:
        raise ValueError(f"group weights must be finite numbers > 0; got {bad}")
    return {g.name: float(weights[g.name]) for g in groups}


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
    if method not in SPARSITY_ALLOCATIONS:
        raise ValueError(f"unknown allocation {method!r}; allowed: {list(SPARSITY_ALLOCATIONS)}")
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


# ------------------------------------------------------ budget allocation
#: ``kept counts -> cost`` (e.g. MACs, bytes, ms); must not grow when channels are removed
#: for the greedy search to be meaningful (it stays correct, only less effective, otherwise).
CostFn = Callable[[Mapping[str, int]], float]
Constraint = tuple[CostFn, float]

class InfeasibleBudgetError(ValueError):
    """Even the smallest allowed network exceeds a budget.

    ``problems``: ``(cost name, profile index or None, smallest achievable cost, budget)`` per budget
    missed (the message is then made from them); :meth:`naming` gives the same error with the profiles'
    names instead of their indices.
    """

    def __init__(self, message: str = "", problems: Sequence[tuple[str, int | None, float, float]] = (),
                 profile_names: Sequence[str] | None = None):
        self.problems = list(problems)
        if self.problems:
            message = "infeasible budget, even with every group at its minimum kept count: " + "; ".join(
                f"{cost}{'' if p is None else f' (profile {profile_names[p] if profile_names else p})'}: "
                f"smallest achievable cost {_fmt(smallest)} > budget {_fmt(budget)}" for cost, p, smallest, budget in self.problems)
        super().__init__(message)

    def naming(self, profile_names: Sequence[str]) -> "InfeasibleBudgetError":
        """This error with profile ``i`` called ``profile_names[i]`` (a problem of a one-profile check is the only
        profile's); unchanged when it lists no problems."""
        if not self.problems:
            return self
        if len(profile_names) == 1:
            return InfeasibleBudgetError(str(self), [(c, 0, s, b) for c, _, s, b in self.problems], profile_names)
        return InfeasibleBudgetError(str(self), self.problems, profile_names)

    def at_profile(self, index: int) -> "InfeasibleBudgetError":
        """This error, raised by a check of profile ``index`` alone, with that index on every problem."""
        return InfeasibleBudgetError(str(self), [(c, index, s, b) for c, _, s, b in self.problems])


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def _cost_name(fn: CostFn) -> str:
    return getattr(fn, "__name__", None) or repr(fn)


def _as_constraints(entry: Constraint | Sequence[Constraint]) -> list[Constraint]:
    """One profile's constraints: a ``(cost_fn, budget)`` pair or a sequence of them."""
    if isinstance(entry, tuple) and len(entry) == 2 and callable(entry[0]):
        entry = [entry]
    constraints = []
    for item in entry:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and callable(item[0])):
            raise TypeError(f"a budget constraint must be a (cost_fn, budget) pair, got {item!r}")
        constraints.append((item[0], float(item[1])))
    if not constraints:
        raise ValueError("a profile needs at least one (cost_fn, budget) constraint")
    return constraints


class _RemovalOrder:
    """Per group: channels in removal order (lowest normalised score first) and the allowed kept counts."""

    def __init__(
        self,
        groups: ChannelGroups,
        scores: Mapping[str, np.ndarray],
        min_channels: int,
        round_to: int | None,
        step_fraction: float,
        max_group_sparsity: float | None = None,
        objective: str = "log",
        group_weights: Mapping[str, float] | None = None,
    ):
        if objective not in BUDGET_OBJECTIVES:
            raise ValueError(f"unknown budget objective {objective!r}; allowed: {list(BUDGET_OBJECTIVES)}")
        self.objective = objective
        self.weights = _check_group_weights(groups, group_weights)
        self.names = groups.names
        self.sizes = groups.sizes
        self.round_to = round_to if round_to and round_to > 1 else 1
        self.floor: dict[str, int] = {}
        self.step: dict[str, int] = {}
        self._cum: dict[str, np.ndarray] = {}  # cumulative normalised score in removal order
        for g in groups:
            s = np.asarray(scores[g.name], dtype=np.float64)
            if s.shape != (g.size,):
                raise ValueError(f"scores for group {g.name!r} have shape {s.shape}, expected ({g.size},)")
            ref = s.mean()
            norm = s / ref if ref > 0 else np.ones_like(s)
            keep_order = descending_order(s)  # as StructuredMask.from_scores
            self._cum[g.name] = np.concatenate([[0.0], np.cumsum(norm[keep_order[::-1]])])
            least = _min_keep(g.size, min_channels)
            if max_group_sparsity is not None:
                least = max(least, int(math.ceil(g.size * (1.0 - max_group_sparsity) - 1e-9)))
            self.floor[g.name] = round_keep_count(least, g.size, round_to)
            self.step[g.name] = max(1, int(step_fraction * g.size))

    def next_count(self, name: str, count: int) -> int | None:
        """Kept count after the next removal step of ``name``, or None at the group's minimum."""
        floor = self.floor[name]
        if count <= floor:
            return None
        new = count - self.step[name]
        new = (new // self.round_to) * self.round_to
        return max(new, floor)

    def grow_count(self, name: str, count: int, cap: int) -> int | None:
        """Kept count after one step of adding channels back to ``name``, at most ``cap``, or None
        when the group is already at ``cap``. The step is ``round_to`` channels (to the next
        multiple of it), or one channel without ``round_to``: the smallest step that keeps
        counts rounded, so the left-over budget is filled as finely as counts allow."""
        if count >= cap:
            return None
        new = (count // self.round_to + 1) * self.round_to
        return min(new, cap)

    def importance(self, name: str, count: int, new: int) -> float:
        """Importance lost going from ``count`` to ``new`` kept channels in group ``name``.

        ``sum``: the summed normalised score of the removed channels.
        ``log``: the drop of log(normalised score kept in the group), i.e. the
        removed share of what the group still holds -- thinning an already thin
        layer costs more, since every layer is a bottleneck of the network.
        Either is multiplied by the group's weight (``group_weights``, e.g.
        :func:`importance_weights` from layer sensitivity; 1 by default), since
        normalised scores alone cannot tell how much one layer matters against another.
        """
        cum, size = self._cum[name], self.sizes[name]
        if self.objective == "sum":
            lost = float(cum[size - new] - cum[size - count])
        else:
            total = cum[-1]
            before, after = total - cum[size - count], total - cum[size - new]
            lost = math.log(max(before, 1e-12) / max(after, 1e-12))
        return self.weights[name] * lost


class _Objective:
    """What one greedy step reduces, fixed at the current kept counts.

    The unmet constraints' costs, each divided by its budget when several are
    unmet (one alone is used raw, so the removal sequence does not depend on
    the budget). A max-type cost function -- one with a ``parts(kept)``
    method whose maximum is the cost, e.g. peak activation = max over layers
    -- contributes the sum of the parts that attain the current maximum, so
    removing a channel from one of several tied layers still counts.
    """

    def __init__(self, constraints: Sequence[Constraint], kept: Mapping[str, int]):
        self.constraints = constraints
        self.costs: list[float] = []
        self.top: dict[int, np.ndarray] = {}
        for i, (fn, _) in enumerate(constraints):
            parts = getattr(fn, "parts", None)
            if parts is None:
                self.costs.append(float(fn(kept)))
                continue
            values = np.asarray(parts(kept), dtype=np.float64)
            peak = float(values.max())
            self.costs.append(peak)
            self.top[i] = np.flatnonzero(values >= peak)
        self.unmet = tuple(i for i, (c, (_, b)) in enumerate(zip(self.costs, constraints)) if c > b)
        self.current = self._combine({i: self._term(i, None) for i in self.unmet})

    def _term(self, i: int, kept: Mapping[str, int] | None) -> float:
        fn = self.constraints[i][0]
        if i in self.top:
            if kept is None:
                return self.costs[i] * self.top[i].size
            return float(np.asarray(fn.parts(kept), dtype=np.float64)[self.top[i]].sum())
        return self.costs[i] if kept is None else float(fn(kept))

    def _combine(self, terms: Mapping[int, float]) -> float:
        if len(terms) == 1:
            return next(iter(terms.values()))
        return sum(v / self.constraints[i][1] for i, v in terms.items())

    def saving(self, kept: Mapping[str, int]) -> float:
        """How much the objective drops from the current counts to ``kept``."""
        return self.current - self._combine({i: self._term(i, kept) for i in self.unmet})


class _GreedyRemoval:
    """One greedy channel-removal sequence, cheapest importance per unit of cost saved first.

    Each step removes the candidate step (one per group, see
    :class:`_RemovalOrder`) with the lowest importance / saving of the
    :class:`_Objective`. Savings are re-evaluated lazily: the best candidate
    by its last-known ratio is recomputed and accepted once it is still the
    best; all candidates are refreshed every ``len(groups)`` steps, when the
    set of unmet constraints changes, and before giving up on a step that
    saves nothing.
    """

    def __init__(self, order: _RemovalOrder):
        self.order = order
        self.counts = dict(order.sizes)
        self._unmet: tuple[int, ...] = ()
        self._ratio: dict[str, float] = {}
        self._fresh: set[str] = set()
        self._since_refresh = 0

    def _ratio_of(self, objective: _Objective, name: str) -> float:
        count = self.counts[name]
        new = self.order.next_count(name, count)
        if new is None:
            return math.inf
        saving = objective.saving({**self.counts, name: new})
        if saving <= 0:
            return math.inf
        return self.order.importance(name, count, new) / saving

    def _refresh(self, objective: _Objective) -> None:
        self._ratio = {n: self._ratio_of(objective, n) for n in self.order.names}
        self._fresh = set(self.order.names)
        self._since_refresh = 0

    def _pick(self, objective: _Objective) -> str | None:
        removable = [n for n in self.order.names if self.order.next_count(n, self.counts[n]) is not None]
        if not removable:
            return None
        while True:
            best = min(removable, key=lambda n: self._ratio[n])
            if best in self._fresh:
                break
            self._ratio[best] = self._ratio_of(objective, best)
            self._fresh.add(best)
        if math.isinf(self._ratio[best]):
            if len(self._fresh) < len(self.order.names):
                self._refresh(objective)
                return self._pick(objective)
            # No single step saves cost: fall back to the least important step.
            best = min(removable, key=lambda n: self.order.importance(n, self.counts[n], self.order.next_count(n, self.counts[n])))
        return best

    def run(self, profiles: Sequence[Sequence[Constraint]]) -> list[dict[str, int]]:
        """Kept counts when each profile's constraints (loosest first) are first all met."""
        results: list[dict[str, int]] = []
        for constraints in profiles:
            while True:
                objective = _Objective(constraints, self.counts)
                if not objective.unmet:
                    results.append(dict(self.counts))
                    break
                if objective.unmet != self._unmet or self._since_refresh >= len(self.order.names):
                    self._unmet = objective.unmet
                    self._refresh(objective)
                name = self._pick(objective)
                if name is None:  # pragma: no cover - excluded by the feasibility check
                    raise InfeasibleBudgetError("no channel left to remove but the budget is not met")
                self.counts[name] = self.order.next_count(name, self.counts[name])
                self._fresh.discard(name)
                self._since_refresh += 1
            self._unmet = ()  # the next profile's objective differs: refresh
        return results


def _grow(order: _RemovalOrder, counts: Mapping[str, int], cap: Mapping[str, int], constraints: Sequence[Constraint]) -> dict[str, int]:
    """``counts`` (which meet ``constraints``) with channels added back while every constraint still holds.

    Each step adds the candidate step (one per group, :meth:`_RemovalOrder.grow_count`,
    never above ``cap``) that holds the constraints and gains the most importance (as
    :meth:`_RemovalOrder.importance` measures its loss) per unit of cost added -- the
    costs' increases, each divided by its budget, summed; a step that adds no cost comes
    first, and among those the one that gains the most. Stops when no step fits.
    """
    counts = dict(counts)
    base = [float(fn(counts)) for fn, _ in constraints]
    while True:
        best, best_key, best_new, best_costs = None, (-math.inf, -math.inf), 0, base
        for name in order.names:
            new = order.grow_count(name, counts[name], cap[name])
            if new is None:
                continue
            trial = {**counts, name: new}
            costs = [float(fn(trial)) for fn, _ in constraints]
            if any(c > b for c, (_, b) in zip(costs, constraints)):
                continue
            added = sum(max(c - c0, 0.0) / b for c, c0, (_, b) in zip(costs, base, constraints))
            gain = order.importance(name, new, counts[name])
            key = (math.inf if added <= 0 else gain / added, gain)
            if key > best_key:
                best, best_key, best_new, best_costs = name, key, new, costs
        if best is None:
            return counts
        counts[best], base = best_new, best_costs


def _check_feasible(order: _RemovalOrder, profiles: Sequence[Sequence[Constraint]]) -> None:
    _check_feasible_counts(dict(order.floor), profiles)


def _greedy_counts(
    groups: ChannelGroups,
    scores: Mapping[str, np.ndarray],
    profiles: Sequence[Sequence[Constraint]],
    min_channels: int,
    round_to: int | None,
    step_fraction: float,
    max_group_sparsity: float | None = None,
    objective: str = "log",
    group_weights: Mapping[str, float] | None = None,
) -> list[dict[str, int]]:
    if not 0.0 <= step_fraction < 1.0:
        raise ValueError(f"step_fraction must be in [0, 1), got {step_fraction!r}")
    if max_group_sparsity is not None:
        check_sparsity(max_group_sparsity, "max_group_sparsity")
    order = _RemovalOrder(groups, scores, min_channels, round_to, step_fraction, max_group_sparsity, objective, group_weights)
    _check_feasible(order, profiles)
    return _GreedyRemoval(order).run(profiles)


def budget_allocate(
    groups: ChannelGroups,
    scores: Mapping[str, np.ndarray],
    cost_fn: CostFn,
    budget: float,
    min_channels: int = 1,
    round_to: int | None = None,
    step_fraction: float = 0.01,
    max_group_sparsity: float | None = None,
    objective: str = "log",
    group_weights: Mapping[str, float] | None = None,
) -> dict[str, int]:
    """Kept channels per group so that ``cost_fn(kept) <= budget`` (same units as ``cost_fn``).

    Greedy, starting dense: repeatedly remove the step with the lowest
    (importance lost / cost saved), where scores are divided by their group
    mean and each group loses its lowest-scoring channels first; stop as soon
    as the budget is met. The importance lost is, by ``objective`` (see
    :data:`BUDGET_OBJECTIVES`), the drop of log(share of the group's
    normalised importance still kept) -- ``log``, the default -- or the
    summed normalised score removed -- ``sum`` -- times the group's weight
    (``group_weights``: one number > 0 per group, all 1 by default; see
    :func:`importance_weights`). A step removes
    ``max(1, step_fraction x group size)`` channels (down to a multiple of
    ``round_to`` when given) and never goes below ``min_channels`` (rounded
    up to ``round_to``), nor below ``(1 - max_group_sparsity) x size``
    when that cap is given (importance per cost tends to empty groups that
    many layers share, e.g. residual bottlenecks). Raises
    :class:`InfeasibleBudgetError` when even that smallest network exceeds
    the budget.

    A cost function with a ``parts(kept)`` method is treated as max-type
    (cost = max of the parts, e.g.
    :meth:`fedprune.cost.AnalyticCostModel.peak_activation_cost_fn`): a
    step's saving is then measured on the parts at the current maximum.
    With one cost function the removal sequence does not depend on
    ``budget``, so a looser budget never keeps fewer channels in any group.
    """
    return _greedy_counts(groups, scores, [[(cost_fn, float(budget))]], min_channels, round_to, step_fraction, max_group_sparsity, objective,
                          group_weights)[0]


def nested_budget_masks(
    groups: ChannelGroups,
    scores: Mapping[str, np.ndarray],
    cost_fns_and_budgets: Sequence[Constraint | Sequence[Constraint]],
    min_channels: int = 1,
    round_to: int | None = None,
    step_fraction: float = 0.01,
    max_group_sparsity: float | None = None,
    objective: str = "log",
    group_weights: Mapping[str, float] | None = None,
) -> list[StructuredMask]:
    """One mask per profile from ONE greedy removal sequence, so masks are nested.

    ``cost_fns_and_budgets`` lists profiles from the loosest to the tightest;
    each is a ``(cost_fn, budget)`` pair or a list of them (all must hold,
    e.g. flash and SRAM for a microcontroller). Removal continues from one
    profile's counts to the next, so every mask is a subset of the previous
    one; a profile whose constraints already hold gets the previous mask.
    While several constraints are unmet, a step's saving is the sum of
    their savings, each divided by its budget. See :func:`budget_allocate`
    for the greedy step and the other arguments. Raises
    :class:`InfeasibleBudgetError` when a constraint cannot be met.
    """
    profiles = [_as_constraints(entry) for entry in cost_fns_and_budgets]
    counts = _greedy_counts(groups, scores, profiles, min_channels, round_to, step_fraction, max_group_sparsity, objective, group_weights)
    return [StructuredMask.from_scores(scores, c) for c in counts]


def total_channels(kept: Mapping[str, int]) -> float:
    """Kept channels summed over groups: the constant-cost model's cost (one unit per channel)."""
    return float(sum(kept.values()))


def constant_cost_allocate(
    groups: ChannelGroups,
    scores: Mapping[str, np.ndarray],
    budget_channels: int,
    min_channels: int = 1,
    round_to: int | None = None,
) -> dict[str, int]:
    """The notebook's "hardware-aware" baseline: every channel costs the same.

    The budget is a total kept-channel count; the globally top-scoring
    channels (scores normalised per group by the group mean) are kept, with
    ``min_channels`` per group and counts that are multiples of ``round_to``
    (or the full group), never exceeding ``budget_channels``.
    """
    return _greedy_counts(groups, scores, [[(total_channels, float(budget_channels))]], min_channels, round_to, 0.0, objective="sum")[0]


def _meets(constraints: Sequence[Constraint], kept: Mapping[str, int]) -> bool:
    return all(float(fn(kept)) <= budget for fn, budget in constraints)


def _uniform_sparsity_for(
    groups: ChannelGroups, constraints: Sequence[Constraint], min_channels: int, round_to: int | None, lo: float
) -> float:
    """Smallest uniform sparsity >= ``lo`` whose rounded kept counts meet ``constraints``, by bisection to 1e-9:
    finer than the distance between any two sparsities at which some group's kept count changes (>= 1 / (2 x size^2)),
    so the counts are those of the exact smallest sparsity (a stop at 1e-3 could leave a rounding step of budget
    unused). Two limits' bisections take the same steps until one falls between their thresholds, so a looser
    budget never ends at a higher sparsity."""
    def counts(s: float) -> dict[str, int]:
        return {n: round_keep_count(c, groups[n].size, round_to) for n, c in _uniform(groups, s, min_channels).items()}

    if _meets(constraints, counts(lo)):
        return lo
    hi = 1.0 - 0.5 / max(g.size for g in groups)  # every group at its minimum (0.999 kept 2 of 2048 channels)
    if not _meets(constraints, counts(hi)):
        _check_feasible_counts(counts(hi), [list(constraints)])
    while hi - lo > 1e-9:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if _meets(constraints, counts(mid)) else (mid, hi)
    return hi


def _check_feasible_counts(smallest: Mapping[str, int], profiles: Sequence[Sequence[Constraint]]) -> None:
    problems = []
    for p, constraints in enumerate(profiles):
        for fn, budget in constraints:
            cost = float(fn(smallest))
            if cost > budget:
                problems.append((_cost_name(fn), p if len(profiles) > 1 else None, cost, float(budget)))
    if problems:
        raise InfeasibleBudgetError(problems=problems)


def budget_masks(
    method: str,
    groups: ChannelGroups,
    scores: Mapping[str, np.ndarray],
    constraints: Sequence[Sequence[Constraint]],
    min_channels: int = 1,
    round_to: int | None = None,
    max_group_sparsity: float | None = None,
    objective: str = "log",
    group_weights: Mapping[str, float] | None = None,
) -> list[StructuredMask]:
    """Nested masks, one per profile (loosest first), that meet each profile's ``(cost_fn, limit)`` list.

    ``method`` is one of :data:`BUDGET_ALLOCATIONS`; ``objective`` (one of
    :data:`BUDGET_OBJECTIVES`) applies to ``budget`` and ``budget_fill``, ``group_weights``
    (see :func:`budget_allocate`) to ``budget`` only; giving weights to another method is
    an error. ``budget_fill`` starts from ``budget_uniform``'s widths and adds channels
    back while the budget holds (:func:`_grow`), so no group is ever narrower than under
    ``budget_uniform``. ``budget``, ``budget_uniform`` and ``budget_fill`` meet every
    budget by construction (as predicted by the cost functions); ``constant_cost`` does
    not look at the real cost beyond the dense value and may miss or overshoot -- it is
    the baseline.

    A looser budget (no limit lower) never keeps fewer channels in any group under
    ``budget_uniform`` and ``constant_cost`` (any number of budgets), nor under ``budget``
    with one budget per profile: their results are points of one sequence that does not
    depend on the limits. This needs costs that never grow when channels are removed
    (MACs, parameters, bytes, peak memory; a measured latency table need not be). ``budget`` with several budgets weighs each unmet cost by its
    limit and drops the met ones from its objective, and ``budget_fill`` grows from
    ``budget_uniform``'s widths, which jump with the limits: for both, a looser budget can
    keep a few channels fewer in some group (while meeting every budget).
    """
    if method not in BUDGET_ALLOCATIONS:
        raise ValueError(f"unknown budget allocation {method!r}; allowed: {list(BUDGET_ALLOCATIONS)}")
    if group_weights is not None and method != "budget":
        raise ValueError(f"group weights apply to budget allocation 'budget' only, not {method!r}")
    profiles = [_as_constraints(c) for c in constraints]
    if method == "budget":
        return nested_budget_masks(groups, scores, profiles, min_channels, round_to, max_group_sparsity=max_group_sparsity, objective=objective,
                                   group_weights=group_weights)
    if method in ("budget_uniform", "budget_fill"):
        sparsities, lo = [], 0.0
        for i, c in enumerate(profiles):
            try:
                lo = _uniform_sparsity_for(groups, c, min_channels, round_to, lo)
            except InfeasibleBudgetError as err:
                raise err.at_profile(i) if len(profiles) > 1 else err from None
            sparsities.append(lo)
        uniform = nested_masks(groups, scores, sparsities, "uniform", None, min_channels, round_to)
        if method == "budget_uniform":
            return uniform
        # Uniform widths as a floor, then the budget left over spent where it buys the most importance;
        # each profile grows within the previous (looser) one, so the masks stay nested.
        order = _RemovalOrder(groups, scores, min_channels, round_to, 0.01, objective=objective)
        prev, filled = dict(groups.sizes), []
        for mask, c in zip(uniform, profiles):  # uniform counts never exceed the looser profile's
            prev = _grow(order, mask.kept_counts, prev, c)
            filled.append(prev)
        return [StructuredMask.from_scores(scores, c) for c in filled]
    dense = groups.sizes
    total = groups.total_channels
    fractions = [min(1.0, min(budget / float(fn(dense)) for fn, budget in c)) for c in profiles]
    channels = [int(math.floor(total * f)) for f in np.minimum.accumulate(fractions)]
    floor = sum(round_keep_count(_min_keep(g.size, min_channels), g.size, round_to) for g in groups)
    channel_profiles = [[(total_channels, float(max(n, floor)))] for n in channels]
    counts = _greedy_counts(groups, scores, channel_profiles, min_channels, round_to, 0.0, objective="sum")
    return [StructuredMask.from_scores(scores, c) for c in counts]


def check_feasible(
    groups: ChannelGroups, constraints: Sequence[Sequence[Constraint]], min_channels: int = 1, round_to: int | None = None
) -> None:
    """Raise :class:`InfeasibleBudgetError` (naming the smallest achievable cost) when some
    profile's constraints fail even with every group at its minimum kept count."""
    smallest = {g.name: round_keep_count(_min_keep(g.size, min_channels), g.size, round_to) for g in groups}
    _check_feasible_counts(smallest, [_as_constraints(c) for c in constraints])
