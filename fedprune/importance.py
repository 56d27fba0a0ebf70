"""Channel importance criteria, one small class each (Torch-Pruning style).

Every criterion maps ``(model, groups[, loader])`` to an :class:`ImportanceScores`:
a non-negative float64 vector per channel group (higher = more important)
plus the number of samples the scores were computed from (0 for criteria that
only read weights). Scores are computed on the dense index space of ``model``
(which may be soft-masked; pruned channels then score 0).

Criteria:

=============  ==============================================================
``l1``         sum of |w| of the channel's producer weights
``l2``         L2 norm of the channel's producer weights
``variance``   variance of the channel's producer weights
``bn_gamma``   |gamma| of the BatchNorm(s) of the channel (network slimming)
``gradient``   mean |dL/dw| over the channel's weights, accumulated over batches
``taylor``     |sum_w w * dL/dw| per channel, accumulated over batches
               (first-order Taylor estimate of the loss change on removal)
``fisher``     empirical Fisher of a channel gate: mean over samples of
               (sum_hw a * dL/da)^2 / 2 at the BN outputs (Theis et al. 2018)
``activation`` mean |a| of the channel's BN outputs over samples and positions
``reconstruction``  order of a greedy removal that keeps the consumers' input
               best correlated with the dense one (BatchNorm re-estimation
               absorbs scale and shift; ThiNet-style, Luo et al. 2017): the
               score is a channel's position in that order, 1/C (removed
               first) to 1 (kept last), so every top-k is the greedy's set
=============  ==============================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fedprune.groups import ChannelGroup, ChannelGroups

__all__ = [
    "ImportanceScores",
    "Importance",
    "CRITERIA",
    "DATA_CRITERIA",
    "get_importance",
    "compute_importance",
]


@dataclass
class ImportanceScores:
    """Per-group channel scores (float64, >= 0) and the samples used to compute them."""

    scores: dict[str, np.ndarray]
    num_samples: int = 0
    criterion: str = ""

    def __getitem__(self, name: str) -> np.ndarray:
        return self.scores[name]

    def normalized(self, method: str = "mean") -> dict[str, np.ndarray]:
        """Scores divided per group by their mean (or ``max``/``sum``), so groups compare."""
        out = {}
        for name, s in self.scores.items():
            ref = {"mean": s.mean(), "max": s.max(), "sum": s.sum()}[method]
            out[name] = s / ref if ref > 0 else np.ones_like(s)
        return out


# ----------------------------------------------------------------- helpers
def _producer_weights(model: nn.Module, group: ChannelGroup) -> list[torch.Tensor]:
    """Each producer's weight viewed as (channels, -1)."""
    return [model.get_submodule(p).weight.reshape(group.size, -1) for p in group.producers]


def _channel_params(model: nn.Module, group: ChannelGroup) -> list[torch.Tensor]:
    """All parameters whose dim 0 indexes the group's channels (weights, biases, BN affine)."""
    out = []
    for name in group.producers + group.norms:
        module = model.get_submodule(name)
        for attr in ("weight", "bias"):
            t = getattr(module, attr, None)
            if isinstance(t, torch.Tensor):
                out.append(t)
    return out


def _batches(loader: Iterable, num_batches: int | None):
    for i, batch in enumerate(loader):
        if num_batches is not None and i >= num_batches:
            break
        yield batch


class Importance:
    """Base class: ``__call__(model, groups, loader=None) -> ImportanceScores``, one score >= 0 per channel of
    every group, in the group's channel order; a higher score means keep it. A channel whose weights are
    zeroed (soft-masked, i.e. pruned already) must score 0, so that it ranks last when a soft-masked model is scored;
    ``needs_data`` says whether ``loader`` is read (then at most ``num_batches`` batches)."""

    name: str = ""
    needs_data: bool = False

    def __call__(self, model: nn.Module, groups: ChannelGroups, loader: Iterable | None = None) -> ImportanceScores:
        raise NotImplementedError


class WeightImportance(Importance):
    """Criteria that only read weights."""

    @torch.no_grad()
    def __call__(self, model, groups, loader=None):
        scores = {g.name: self.score_group(model, g).double().cpu().numpy() for g in groups}
        return ImportanceScores(scores, 0, self.name)

    def score_group(self, model: nn.Module, group: ChannelGroup) -> torch.Tensor:
        raise NotImplementedError


class MagnitudeImportance(WeightImportance):
    """L1 (``p=1``: sum |w|) or L2 (``p=2``: sqrt(sum w^2)) norm of each channel's producer weights."""

    def __init__(self, p: int = 2):
        if p not in (1, 2):
            raise ValueError(f"magnitude norm p must be 1 or 2, got {p}")
        self.p, self.name = p, f"l{p}"

    def score_group(self, model, group):
        return sum(w.norm(p=self.p, dim=1) for w in _producer_weights(model, group))


class WeightVarianceImportance(WeightImportance):
    """Variance of each channel's producer weights (summed over coupled producers)."""

    name = "variance"

    def score_group(self, model, group):
        return sum(w.var(dim=1, unbiased=False) if w.shape[1] > 1 else w.abs()[:, 0] for w in _producer_weights(model, group))


class BNScaleImportance(WeightImportance):
    """|gamma| of the BatchNorm layers of each channel (summed over coupled norms)."""

    name = "bn_gamma"

    def score_group(self, model, group):
        if not group.norms:
            raise ValueError(f"criterion 'bn_gamma' needs BatchNorm, but group {group.name!r} has none")
        return sum(model.get_submodule(n).weight.abs() for n in group.norms)


class DataImportance(Importance):
    """Criteria that need a loader: run ``num_batches`` batches (all if None)."""

    needs_data = True

    def __init__(self, num_batches: int | None = 8):
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"num_batches must be >= 1 or None, got {num_batches}")
        self.num_batches = num_batches

    def __call__(self, model, groups, loader=None):
        if loader is None:
            raise ValueError(f"criterion {self.name!r} needs data: pass a loader")
        was_training = model.training
        model.eval()  # deterministic: BN uses running stats, dropout off
        try:
            acc = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in groups}
            n = self.accumulate(model, groups, _batches(loader, self.num_batches), acc)
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
        if n == 0:
            raise ValueError(f"criterion {self.name!r} got an empty loader")
        return ImportanceScores({k: self.finalize(v, n).numpy() for k, v in acc.items()}, n, self.name)

    def accumulate(self, model, groups, batches, acc) -> int:
        raise NotImplementedError

    def finalize(self, total: torch.Tensor, num_samples: int) -> torch.Tensor:
        return total / num_samples


class _GradientBased(DataImportance):
    """Back-propagates the mean cross-entropy of each batch; subclasses read .grad."""

    def accumulate(self, model, groups, batches, acc):
        n = 0
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            with torch.no_grad():
                for g in groups:
                    acc[g.name] += self.batch_score(model, g).double() * len(y)
            n += len(y)
        return n

    def batch_score(self, model, group) -> torch.Tensor:
        raise NotImplementedError


class GradientImportance(_GradientBased):
    """Mean |dL/dw| over each channel's producer weights, averaged over samples."""

    name = "gradient"

    def batch_score(self, model, group):
        return sum(model.get_submodule(p).weight.grad.reshape(group.size, -1).abs().mean(dim=1) for p in group.producers)


class TaylorImportance(_GradientBased):
    """First-order Taylor: |sum over the channel's parameters of w * dL/dw| per batch, averaged."""

    name = "taylor"

    def batch_score(self, model, group):
        total = torch.zeros(group.size, dtype=torch.float64)
        for t in _channel_params(model, group):
            if t.grad is not None:
                total += (t * t.grad).reshape(group.size, -1).sum(dim=1).double()
        return total.abs()


class _ActivationHooks:
    """Captures the output of each group's norms (or producers if it has none)."""

    def __init__(self, model: nn.Module, groups: ChannelGroups, retain_grad: bool):
        self.outputs: dict[str, list[torch.Tensor]] = {g.name: [] for g in groups}
        self.handles = []
        for g in groups:
            for layer in g.norms or g.producers:
                self.handles.append(model.get_submodule(layer).register_forward_hook(self._hook(g.name, retain_grad)))

    def _hook(self, name: str, retain_grad: bool) -> Callable:
        def hook(_module, _inp, out):
            if retain_grad:
                out.retain_grad()
            self.outputs[name].append(out)

        return hook

    def clear(self) -> None:
        for v in self.outputs.values():
            v.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _HookedImportance(DataImportance):
    """Criteria that read the activations of each group's BN outputs through forward hooks."""

    retain_grad = False

    def accumulate(self, model, groups, batches, acc):
        hooks = _ActivationHooks(model, groups, retain_grad=self.retain_grad)
        n = 0
        try:
            for x, y in batches:
                hooks.clear()
                self.update(model, groups, x, y, hooks.outputs, acc)
                n += len(y)
        finally:
            hooks.remove()
        return n

    def update(self, model, groups, x, y, outputs: dict[str, list[torch.Tensor]], acc) -> None:
        raise NotImplementedError


class FisherImportance(_HookedImportance):
    """Empirical Fisher of a per-channel gate, from per-sample gradients at BN outputs.

    For sample n and channel c, d loss_n / d gate_c = sum over coupled layers
    and positions of a * dL/da (exact per sample because the loss is summed).
    Score = mean_n (that)^2 / 2.
    """

    name = "fisher"
    retain_grad = True

    def update(self, model, groups, x, y, outputs, acc):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y, reduction="sum").backward()
        with torch.no_grad():
            for g in groups:
                delta = sum(_per_sample_channel_sum(a * a.grad) for a in outputs[g.name])
                acc[g.name] += 0.5 * delta.double().pow(2).sum(dim=0)


class ActivationImportance(_HookedImportance):
    """Mean |activation| of each channel's BN outputs, over samples and positions."""

    name = "activation"

    @torch.no_grad()
    def update(self, model, groups, x, y, outputs, acc):
        model(x)
        for g in groups:
            acc[g.name] += sum(_per_sample_channel_mean(a.abs()) for a in outputs[g.name]).double().sum(dim=0)


class ReconstructionImportance(DataImportance):
    """Channels ranked by how well the kept ones reproduce the input of the next layers, up to scale.

    Per group, with ``a`` the group's channels as its consumers read them (each consumer's
    input; a Linear's ``in_features`` viewed as channels x positions) and ``W`` a consumer's
    weight, the contribution of channel ``c`` is ``W[:, c] * a_c``. Treating the activation as
    constant over a kernel window, the covariance of two contributions summed over the
    consumer's outputs is ``M[c, d] = (sum_o <W[o, c], W[o, d]>) * Cov(a_c, a_d)`` (summed over
    consumers; covariance over samples and positions, so the mean, which the consumer's
    BatchNorm re-estimates, does not count). For a kept set ``K`` the consumer input changes by
    the removed channels' share; after BatchNorm re-estimation what matters is the correlation
    ``corr(K) = 1' M 1_K / sqrt(1' M 1 * 1_K' M 1_K)`` (BatchNorm rescales by a positive
    factor, so the sign counts). Greedily removing, one at a time, the channel whose removal
    keeps ``corr`` highest orders every channel; a channel's score is its place in that order. Ranking by single-channel scores (Taylor, magnitude) ignores that
    the kept channels must still add up to the same signal: on seed_cnn, once BatchNorm
    statistics are re-estimated, a random subset of channels preserves accuracy better than
    the highest-scoring one (benchmarks/federated.md, "Right after pruning").

    Memory: one ``C x C`` float64 moment matrix per group and consumer (C = group size).
    """

    name = "reconstruction"

    def accumulate(self, model, groups, batches, acc):
        consumers = {(g.name, c) for g in groups for c in g.consumers}
        if not consumers:
            raise ValueError("criterion 'reconstruction' needs the groups' consumers (traced by fedprune.groups.discover_groups)")
        sums: dict[tuple[str, str], list] = {}
        sizes = {g.name: g.size for g in groups}

        def hook(key):
            def f(_module, inp, _out):
                a = inp[0].detach().double()
                c = sizes[key[0]]
                a = a.reshape(a.shape[0], c, -1)  # conv (N, C, H, W) or linear (N, C x positions)
                x = a.transpose(1, 2).reshape(-1, c)  # (samples x positions, channels)
                s = sums.setdefault(key, [torch.zeros(c, c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64), 0])
                s[0] += x.T @ x
                s[1] += x.sum(dim=0)
                s[2] += x.shape[0]
            return f

        handles = [model.get_submodule(cons).register_forward_hook(hook((g, cons))) for g, cons in sorted(consumers)]
        n = 0
        try:
            with torch.no_grad():
                for x, y in batches:
                    model(x)
                    n += len(y)
        finally:
            for h in handles:
                h.remove()
        if n == 0:
            return 0
        for g in groups:
            m = torch.zeros(g.size, g.size, dtype=torch.float64)
            for cons in g.consumers:
                xx, xs, count = sums[(g.name, cons)]
                mean = xs / count
                cov = xx / count - torch.outer(mean, mean)
                w = model.get_submodule(cons).weight.detach().double()
                w = w.reshape(w.shape[0], g.size, -1)  # (outputs, channels, kernel positions or features per channel)
                m += torch.einsum("ock,odk->cd", w, w) * cov
            acc[g.name][:] = torch.from_numpy(greedy_removal_order(m.numpy()))
        return n

    def finalize(self, total, num_samples):
        return total  # already the order's scores


def greedy_removal_order(m: np.ndarray) -> np.ndarray:
    """Scores from the greedy of :class:`ReconstructionImportance` on the ``C x C`` matrix ``m``:
    ``(k + 1) / C`` for the channel removed at step ``k`` (the last one kept scores 1), 0 for a
    channel whose contribution has no variance. Ties go to the lower channel index, so the order
    is deterministic."""
    m = np.asarray(m, dtype=np.float64)
    size = m.shape[0]
    keep = np.ones(size, dtype=bool)
    row = m.sum(axis=1)  # M 1
    v = row.copy()  # M 1_K
    var_k = cov_k = row.sum()  # 1_K' M 1_K and 1' M 1_K
    diag = np.diag(m)
    scores = np.ones(size, dtype=np.float64)
    for step in range(size - 1):
        cand = np.flatnonzero(keep)
        var2 = var_k - 2 * v[cand] + diag[cand]
        cov2 = cov_k - row[cand]
        # corr(K) is proportional to 1' M 1_K / sqrt(1_K' M 1_K); a set whose variance vanishes carries no signal
        quality = np.where(var2 > 1e-12 * max(abs(var_k), 1e-300), cov2 / np.sqrt(np.maximum(var2, 1e-300)), -np.inf)
        j = cand[int(np.argmax(quality))]
        keep[j] = False
        scores[j] = (step + 1) / size
        var_k, cov_k = var_k - 2 * v[j] + diag[j], cov_k - row[j]
        v -= m[:, j]
    scores[diag <= 0] = 0.0  # channels that carry nothing (e.g. soft-masked ones) score 0, as with every criterion
    return scores


def _per_sample_channel_sum(t: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) -> (N, C) summed over positions."""
    return t.reshape(t.shape[0], t.shape[1], -1).sum(dim=2)


def _per_sample_channel_mean(t: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) -> (N, C) averaged over positions."""
    return t.reshape(t.shape[0], t.shape[1], -1).mean(dim=2)


#: Criterion name -> factory (keyword ``num_batches``). A new criterion goes here and its name into
#: :data:`fedprune.config.CRITERIA` (the names a config accepts, importable without torch; a test checks both match).
CRITERIA: dict[str, Callable[..., Importance]] = {
    "l1": lambda **kw: MagnitudeImportance(p=1),
    "l2": lambda **kw: MagnitudeImportance(p=2),
    "variance": lambda **kw: WeightVarianceImportance(),
    "bn_gamma": lambda **kw: BNScaleImportance(),
    "gradient": lambda **kw: GradientImportance(**kw),
    "taylor": lambda **kw: TaylorImportance(**kw),
    "fisher": lambda **kw: FisherImportance(**kw),
    "activation": lambda **kw: ActivationImportance(**kw),
    "reconstruction": lambda **kw: ReconstructionImportance(**kw),
}

#: Criteria that need a data loader (their class sets ``needs_data``).
DATA_CRITERIA = tuple(name for name, factory in CRITERIA.items() if factory().needs_data)


def get_importance(name: str, num_batches: int | None = 8) -> Importance:
    """Look up a criterion by name (see the module docstring). Every factory gets ``num_batches`` (criteria that
    read no data ignore it), so a new data-driven criterion honours ``pruning.num_batches`` without more wiring."""
    if name not in CRITERIA:
        raise ValueError(f"unknown importance criterion {name!r}; allowed: {sorted(CRITERIA)}")
    return CRITERIA[name](num_batches=num_batches)


def compute_importance(
    name: str,
    model: nn.Module,
    groups: ChannelGroups,
    loader: Iterable | None = None,
    num_batches: int | None = 8,
) -> ImportanceScores:
    """One-call helper: ``get_importance(name, num_batches)(model, groups, loader)``."""
    return get_importance(name, num_batches)(model, groups, loader)
