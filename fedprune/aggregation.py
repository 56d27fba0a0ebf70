"""Server-side aggregation: consensus channel importance and HeteroFL-style weight merging.

Consensus: every client's per-group importance vector is first normalised
(divided by its group mean, so clients with different gradient scales or
shard sizes compare), then combined per channel by

* ``mean``          sample-weighted mean
* ``median``        element-wise median (robust to a minority of outliers)
* ``trimmed_mean``  element-wise mean after dropping ``trim_fraction`` of the
                    values at each end
* ``rank_vote``     sample-weighted mean of each client's normalised channel
                    ranks (Borda count; ignores score scale entirely)

Optional client screening (:func:`screen_clients`, ``federated.screen_clients``)
drops, before any of these, the clients whose channel ranking disagrees with
the element-wise median ranking of all clients (poisoned importance, see
:mod:`fedprune.adversarial`).

Weights: :func:`merge_substates` averages every dense entry over the clients
whose sub-model holds it (weighted by training examples); entries held by
nobody keep their value. Dense FedAvg is the special case where every client
holds every entry.

BatchNorm statistics: :func:`pool_bn_stats` pools per-client running means and
variances of one sub-network into the statistics of all their data together
(law of total variance), for HeteroFL's static BN after the last round.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from fedprune.config import AGGREGATIONS
from fedprune.masks import StructuredMask

__all__ = ["AGGREGATORS", "normalize_scores", "aggregate_importance", "screen_clients", "mask_agreement", "merge_substates", "pool_bn_stats"]

#: Aggregation rules of :func:`aggregate_importance`: the names ``federated.aggregation`` accepts
#: (:data:`fedprune.config.AGGREGATIONS`, kept there so that configs load without torch).
AGGREGATORS = AGGREGATIONS


def normalize_scores(scores: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Divide each group's vector by its mean (all-zero groups become all ones)."""
    out = {}
    for name, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        m = s.mean() if s.size else 0.0
        out[name] = s / m if m > 0 else np.ones_like(s)
    return out


def _ranks(v: np.ndarray) -> np.ndarray:
    """Normalised ranks in [0, 1]: 1 = most important. Tied scores share the mean of their ranks, so a
    constant vector (a client that cannot tell the channels apart) ranks every channel 0.5 and casts no vote."""
    v = np.asarray(v, dtype=np.float64)
    order = np.argsort(v, kind="stable")
    _, start, count = np.unique(v[order], return_index=True, return_counts=True)
    r = np.empty(v.size, dtype=np.float64)
    r[order] = np.repeat(start + (count - 1) / 2, count)
    return r / max(v.size - 1, 1)


def _trimmed_mean(stack: np.ndarray, fraction: float) -> np.ndarray:
    n = stack.shape[0]
    k = int(np.floor(n * fraction))
    if n - 2 * k < 1:
        k = (n - 1) // 2
    s = np.sort(stack, axis=0)
    return s[k : n - k].mean(axis=0)


def aggregate_importance(
    client_scores: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float] | None = None,
    method: str = "mean",
    trim_fraction: float = 0.2,
) -> dict[str, np.ndarray]:
    """Combine per-client importance into one consensus vector per group (higher = keep).

    Each client's vector is first divided by its mean (:func:`normalize_scores`). ``mean`` and ``rank_vote``
    weight the clients by ``weights`` (their sample counts); ``median`` and ``trimmed_mean`` count every client
    once, as robust statistics do (a weight would let one large client outvote the rest). ``trimmed_mean``
    drops floor(n x ``trim_fraction``) clients at each end per channel, so with fewer than 1 / trim_fraction
    clients it trims nothing."""
    if method not in AGGREGATORS:
        raise ValueError(f"unknown aggregation {method!r}; allowed: {list(AGGREGATORS)}")
    if not client_scores:
        raise ValueError("aggregate_importance needs at least one client's scores")
    w = np.asarray(weights if weights is not None else [1.0] * len(client_scores), dtype=np.float64)
    if w.shape != (len(client_scores),) or (w <= 0).any():
        raise ValueError(f"weights must be positive, one per client; got {w.tolist()}")
    normed = [normalize_scores(s) for s in client_scores]
    out = {}
    for name in normed[0]:
        stack = np.stack([n[name] for n in normed])
        if method == "mean":
            out[name] = (w[:, None] * stack).sum(axis=0) / w.sum()
        elif method == "median":
            out[name] = np.median(stack, axis=0)
        elif method == "trimmed_mean":
            out[name] = _trimmed_mean(stack, trim_fraction)
        elif method == "rank_vote":
            ranks = np.stack([_ranks(v) for v in stack])
            out[name] = (w[:, None] * ranks).sum(axis=0) / w.sum()
        else:  # a name in fedprune.config.AGGREGATIONS without its branch here
            raise NotImplementedError(f"aggregation {method!r} is allowed by fedprune.config.AGGREGATIONS but has no rule in "
                                      "fedprune.aggregation.aggregate_importance")
    return out


#: :func:`screen_clients` drops a client whose agreement is below this fraction of the median agreement.
SCREEN_RATIO = 0.5


def screen_clients(client_scores: Sequence[Mapping[str, np.ndarray]], ratio: float = SCREEN_RATIO) -> tuple[list[int], list[float]]:
    """Which clients to aggregate: ``(kept indices, agreement per client)``.

    A client's *agreement* is the Pearson correlation between its channel ranks
    and the element-wise median of all clients' ranks (a Spearman correlation
    with a robust reference ranking), averaged over groups weighted by group
    size. Groups of one channel are left out, and so is a client's constant
    rank vector in a group (scores that cannot tell the channels apart): it
    takes no part in that group's reference and gets no agreement there, and a
    client with no such group at all has agreement 0, since it agrees with
    nothing. A client is dropped when its agreement is below ``ratio`` times
    the median agreement: inverted or scaled-inverted importance correlates
    negatively, random importance about zero, honest clients (even on non-IID
    shards) clearly positively. The reference and the threshold use medians,
    so they hold while fewer than half of the clients are adversarial. With
    fewer than 3 clients, or a median agreement <= 0 (no consensus to screen
    against), every client is kept.
    """
    n = len(client_scores)
    if n < 3:
        return list(range(n)), [1.0] * n
    names = list(client_scores[0])
    ranks = {g: np.stack([_ranks(np.asarray(s[g], dtype=np.float64)) for s in client_scores]) for g in names}
    num, den = np.zeros(n), np.zeros(n)
    for g in names:
        r = ranks[g]
        if r.shape[1] < 2:
            continue
        dev = r - r.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(dev, axis=1)
        informative = norm > 1e-12
        if not informative.any():
            continue
        ref = np.median(r[informative], axis=0)
        ref = ref - ref.mean()
        if np.linalg.norm(ref) <= 1e-12:
            continue
        corr = (dev[informative] @ ref) / (norm[informative] * np.linalg.norm(ref))
        num[informative] += r.shape[1] * corr
        den[informative] += r.shape[1]
    if not den.any():
        agreement = np.ones(n)
    else:
        agreement = np.divide(num, den, out=np.zeros(n), where=den > 0)
    med = float(np.median(agreement))
    if med <= 0:
        return list(range(n)), agreement.tolist()
    return [i for i in range(n) if agreement[i] >= ratio * med], agreement.tolist()


def mask_agreement(client_scores: Sequence[Mapping[str, np.ndarray]], consensus: StructuredMask) -> list[float]:
    """Jaccard overlap of each client's own top-k mask (k = consensus kept counts) with the consensus mask."""
    counts = consensus.kept_counts
    return [StructuredMask.from_scores(s, counts).jaccard(consensus) for s in client_scores]


def merge_substates(
    dense_state: Mapping[str, torch.Tensor],
    updates: Iterable[tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], float]],
) -> dict[str, torch.Tensor]:
    """HeteroFL-style merge of sub-model states into the dense state.

    ``updates`` yields ``(sub_state, index_map, weight)`` where ``index_map``
    comes from :func:`fedprune.masks.extraction_index_map` and ``weight`` is
    usually the client's number of training examples. Every dense entry
    becomes the weighted mean over the updates that hold it; entries held by
    nobody keep their current value. Non-float entries
    (``num_batches_tracked``) keep the dense value.
    """
    num = {k: torch.zeros(v.numel(), dtype=torch.float64) for k, v in dense_state.items() if v.is_floating_point()}
    den = {k: torch.zeros_like(n) for k, n in num.items()}
    for sub_state, index_map, weight in updates:
        if not weight > 0:
            raise ValueError(f"merge weight must be positive, got {weight}")
        for k, idx in index_map.items():
            flat_idx = idx.reshape(-1)
            num[k].index_add_(0, flat_idx, sub_state[k].detach().reshape(-1).double() * float(weight))
            den[k].index_add_(0, flat_idx, torch.full((flat_idx.numel(),), float(weight), dtype=torch.float64))
    merged = {}
    for k, v in dense_state.items():
        if k not in num:
            merged[k] = v.clone()
            continue
        held = den[k] > 0
        flat = v.detach().reshape(-1).double().clone()
        flat[held] = num[k][held] / den[k][held]
        merged[k] = flat.to(v.dtype).reshape(v.shape)
    return merged


#: Name endings of BatchNorm statistics pairs: a layer's running statistics, and the per-width
#: statistics of :func:`fedprune.dynamic.width_state` (``bn[<width>].<block>.mean`` / ``.var``).
BN_STAT_SUFFIXES = (("running_mean", "running_var"), (".mean", ".var"))


def pool_bn_stats(stats: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Pool BatchNorm statistics measured by several clients on the same (sub-)network.

    ``stats`` are per-client ``{"<layer>.running_mean": m_i, "<layer>.running_var": v_i}``
    (or any pair of :data:`BN_STAT_SUFFIXES`; same names and shapes for every client),
    ``weights`` the examples each client used. The result is the mean and variance of all
    clients' activations together: ``m = sum w_i m_i / W`` and
    ``v = sum w_i (v_i + m_i**2) / W - m**2`` (law of total variance; clamped at 0 against
    rounding), so shards whose means differ widen the variance as they would in one pass over
    their union. Averaging the variances alone would miss that between-client part.
    """
    if not stats or len(stats) != len(weights):
        raise ValueError(f"pool_bn_stats needs one weight per client's statistics, got {len(stats)} statistics and {len(weights)} weights")
    if any(not w > 0 for w in weights):
        raise ValueError(f"pool_bn_stats weights must be positive, got {list(weights)}")
    names = set(stats[0])
    pairs = [(k, k[: -len(m)] + v) for k in sorted(names) for m, v in BN_STAT_SUFFIXES if k.endswith(m)]
    if names != {n for pair in pairs for n in pair}:
        raise ValueError(f"pool_bn_stats expects mean/variance pairs {list(BN_STAT_SUFFIXES)}, got {sorted(names)}")
    w = torch.as_tensor([float(x) for x in weights], dtype=torch.float64)
    w = w / w.sum()
    out = {}
    for mean_key, var_key in pairs:
        means = torch.stack([s[mean_key].double() for s in stats])
        var = torch.stack([s[var_key].double() for s in stats])
        shape = (-1,) + (1,) * (means.dim() - 1)
        mean = (w.view(shape) * means).sum(0)
        second = (w.view(shape) * (var + means**2)).sum(0)
        out[mean_key] = mean.to(stats[0][mean_key].dtype)
        out[var_key] = (second - mean**2).clamp_min(0).to(stats[0][var_key].dtype)
    return out
