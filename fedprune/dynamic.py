"""Dynamic per-input pruning at inference: FBS-style channel gates and adaptive width (early exit).

A :class:`GatedCNN` wraps a plain conv stack (``seed_cnn`` or a sub-network
extracted from it) and puts a :class:`ChannelGate` on its conv layers (by
default all but the last): a
saliency predictor (global average pool of the layer's input -> linear layer)
that scores the layer's output channels for each input. Only the top-k
channels of each layer are kept: ``k`` is the multiple of ``round_to`` (8 by
default: the CPU kernels' fast path) or the full width nearest to
``budget x channels`` (:func:`keep_count`).

Two ways to run it, with the same outputs:

* :meth:`GatedCNN.forward` -- masked computation for any batch size; it is
  differentiable (straight-through: the forward pass multiplies by the hard
  0/1 top-k mask, gradients flow through ``sigmoid(saliency)``), so gates
  can be trained, alone or jointly with the network. With ``budget = 1``
  no channel is dropped and the output is exactly the static network's.
* :meth:`GatedCNN.forward_sliced` -- batch-1 inference that really skips
  work: every conv is computed only for its kept output channels, from only
  the previous layer's kept channels (weights indexed per input, BatchNorm
  folded into the convs), and the classifier reads only the kept features.

:meth:`GatedCNN.forward_sliced` also counts the multiply-accumulates an
input actually executes, gate predictors included (:class:`GatedStats`).

Adaptive width per input is the second mechanism: a :class:`NestedWidthCNN`
shares one sub-network's weights among nested widths (the first ``w`` of
each conv layer's channels in a given order), :func:`train_widths` trains
them all at once (sandwich rule), and a :class:`WidthCascade` runs an input
at the narrowest width first and only goes wider when the answer is not
confident (early exit; how confidence is read: :func:`exit_confidence`).
Each width is extracted as a physically smaller network, so no per-input
gather is needed; :func:`cascade_outcome` and :func:`cascade_latency_ms`
measure accuracy, executed MACs and latency.
"""

from __future__ import annotations

import copy
import math
import re
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fedprune.config import EXIT_RULES
from fedprune.training import TrainConfig, recalibrate_bn, train

__all__ = ["ChannelGate", "GatedCNN", "GatedStats", "keep_count", "train_gates", "evaluate_gated", "gated_latency_ms",
           "NestedWidthCNN", "check_distinct_widths", "width_state", "widths_calibrated", "train_widths", "EXIT_RULES", "check_exit_rule", "exit_confidence", "ExitStage", "WidthCascade", "stage_logits", "cascade_outcome", "evaluate_cascade", "threshold_for_macs",
           "cascade_latency_ms"]


class ChannelGate(nn.Module):
    """Per-input saliency of a conv layer's output channels: ``Linear(GAP(input))``.

    The bias starts at the normalised L2 norm of each output channel's
    (BN-scaled) weights, so before training the gate prefers the statically
    important channels; the weights start small.
    """

    def __init__(self, in_channels: int, out_channels: int, prior: torch.Tensor | None = None):
        super().__init__()
        self.fc = nn.Linear(in_channels, out_channels)
        nn.init.normal_(self.fc.weight, std=0.01)
        with torch.no_grad():
            self.fc.bias.copy_(prior if prior is not None else torch.ones(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Saliency ``(B, out_channels)`` from the layer input ``(B, in_channels, H, W)``."""
        return self.fc(x.mean(dim=(2, 3)))


def keep_count(budget: float, channels: int, round_to: int = 1) -> int:
    """Channels kept of ``channels`` at a compute ``budget`` in (0, 1]: ``ceil(budget x channels)``, at least 1.

    With ``round_to > 1`` (and at least ``round_to`` channels) the count is
    instead the multiple of ``round_to`` -- or ``channels`` itself -- nearest to
    ``budget x channels`` (ties up, at least ``round_to``; budget 1 keeps
    every channel): CPU
    convolution kernels (oneDNN) run their fast path on multiples of 8
    channels, and a layer with 29 of 32 channels is *slower* than with all 32.
    """
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget!r}")
    if round_to < 1:
        raise ValueError(f"round_to must be >= 1, got {round_to!r}")
    target = budget * channels
    if round_to == 1 or channels < round_to:
        return max(1, min(channels, math.ceil(target - 1e-9)))
    low = max(round_to, round_to * math.floor(target / round_to + 1e-9))
    high = min(channels, low + round_to)  # the full width is a candidate even when it is not a multiple
    return high if high - target <= target - low + 1e-9 else low


def _topk_mask(saliency: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask of the ``k`` largest saliencies per row (ties as ``torch.topk`` breaks them, which is not by index;
    the sliced path calls ``torch.topk`` on the same saliencies, so both paths keep the same channels)."""
    idx = torch.topk(saliency, k, dim=1, sorted=False).indices
    return torch.zeros_like(saliency).scatter_(1, idx, 1.0)


@dataclass
class GatedStats:
    """What one sliced forward pass kept: channels per gated layer and MACs executed."""

    kept: list[int]
    macs: int


Block = tuple[nn.Conv2d, nn.BatchNorm2d, "nn.Module | None"]


def conv_blocks(model: nn.Module) -> list[Block]:
    """The ``(conv, bn, pool or None)`` blocks of a seed_cnn-like model, checked.

    ``model`` needs ``features`` made of Conv2d-BatchNorm2d-ReLU[-MaxPool2d]
    blocks, an ``AdaptiveAvgPool2d`` ``pool`` and a Flatten-Linear-ReLU[-Dropout]-Linear
    ``classifier`` (:class:`fedprune.models.SeedCNN` at any widths, e.g. an
    extracted sub-network); anything else is a ``NotImplementedError``.
    """
    if not all(isinstance(getattr(model, a, None), nn.Module) for a in ("features", "pool", "classifier")):
        raise NotImplementedError(f"needs Conv2d-BatchNorm2d-ReLU[-MaxPool2d] blocks in 'features' (seed_cnn), got {type(model).__name__}")
    layers = list(model.features)
    blocks: list[Block] = []
    i = 0
    while i < len(layers):
        conv, bn, act = (layers[i : i + 3] + [None, None])[:3]
        if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and isinstance(act, nn.ReLU)) or conv.groups != 1:
            raise NotImplementedError(
                f"needs Conv2d-BatchNorm2d-ReLU[-MaxPool2d] blocks (seed_cnn); found {type(layers[i]).__name__} at features.{i}"
            )
        i += 3
        pool = None
        if i < len(layers) and isinstance(layers[i], nn.MaxPool2d):
            pool, i = layers[i], i + 1
        blocks.append((conv, bn, pool))
    # the sliced path runs the classifier as flatten, fc1, ReLU, fc2 (dropout is off at inference)
    kinds = [type(m) for m in model.classifier if not isinstance(m, nn.Dropout)]
    if not isinstance(model.pool, nn.AdaptiveAvgPool2d) or kinds != [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear]:
        raise NotImplementedError("needs an AdaptiveAvgPool2d and a Flatten-Linear-ReLU[-Dropout]-Linear classifier (seed_cnn), "
                                  f"got {[k.__name__ for k in kinds]}")
    return blocks


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.classifier if isinstance(m, nn.Linear)]


def _pooled(model: nn.Module) -> int:
    """Spatial positions per channel after ``model.pool`` (the classifier reads channel-major features)."""
    side = model.pool.output_size
    return side * side if isinstance(side, int) else side[0] * side[1]


def channel_prior(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Static importance of each output channel: L2 norm of its BN-scaled weights, divided by the mean."""
    with torch.no_grad():
        w = conv.weight.flatten(1).norm(dim=1) * bn.weight.abs() / torch.sqrt(bn.running_var + bn.eps)
        return w / w.mean().clamp_min(1e-12)


class GatedCNN(nn.Module):
    """A conv stack (``features`` of Conv-BN-ReLU[-MaxPool] blocks, ``pool``, ``classifier``) with channel gates.

    ``model`` must look like :class:`fedprune.models.SeedCNN` (any widths,
    e.g. an extracted sub-network); its modules are shared, not copied.
    """

    def __init__(self, model: nn.Module, gated_layers: Sequence[int] | None = None, round_to: int = 8):
        super().__init__()
        if round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {round_to!r}")
        #: Kept counts go to multiples of this (see :func:`keep_count`).
        self.round_to = int(round_to)
        self.blocks = conv_blocks(model)
        self.features, self.pool, self.classifier = model.features, model.pool, model.classifier
        self.gates = nn.ModuleList(ChannelGate(c.in_channels, c.out_channels, channel_prior(c, b)) for c, b, _ in self.blocks)
        #: Indices of the conv blocks whose channels are gated; the others always compute every channel.
        #: By default every block but the last: at its small spatial size (4x4 in seed_cnn) indexing its
        #: weights and the classifier's per input costs more time than the skipped MACs save.
        self.gated_layers = tuple(range(len(self.blocks) - 1) if gated_layers is None else sorted(set(gated_layers)))
        bad = [i for i in self.gated_layers if not 0 <= i < len(self.blocks)]
        if bad:
            raise ValueError(f"gated_layers {bad} out of range: the model has conv blocks 0..{len(self.blocks) - 1}")
        self.pooled = _pooled(model)
        self._folded: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _keep(self, layer: int, budget: float, channels: int) -> int:
        return keep_count(budget, channels, self.round_to) if layer in self.gated_layers else channels

    # --------------------------------------------------------- masked path
    def forward(self, x: torch.Tensor, budget: float = 1.0) -> torch.Tensor:
        """Logits with per-input top-k channels per layer (masked, any batch size, trainable)."""
        for i, ((conv, bn, pool), gate) in enumerate(zip(self.blocks, self.gates)):
            y = bn(conv(x))
            k = self._keep(i, budget, conv.out_channels)
            if k < conv.out_channels:
                s = gate(x)
                soft = torch.sigmoid(s)
                y = y * (_topk_mask(s.detach(), k) + soft - soft.detach())[:, :, None, None]
            x = F.relu(y)
            if pool is not None:
                x = pool(x)
        return self.classifier(self.pool(x))

    # --------------------------------------------------------- sliced path
    def _fold(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        folded = []
        for conv, bn, _ in self.blocks:
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            folded.append(((conv.weight * scale[:, None, None, None]).detach(), ((bias - bn.running_mean) * scale + bn.bias).detach()))
        return folded

    def refresh(self) -> None:
        """Re-fold BatchNorm into the conv weights after the weights changed (the sliced path caches them)."""
        self._folded = None

    @torch.no_grad()
    def forward_sliced(self, x: torch.Tensor, budget: float = 1.0) -> tuple[torch.Tensor, GatedStats]:
        """Batch-1 inference computing only each layer's kept channels; returns logits and what was kept."""
        if x.shape[0] != 1:
            raise ValueError(f"forward_sliced runs one input at a time, got a batch of {x.shape[0]}")
        if self._folded is None:
            self._folded = self._fold()
        idx: torch.Tensor | None = None  # kept input channels of the current layer (None = all)
        x = x.contiguous(memory_format=torch.channels_last)  # oneDNN's fast path at batch 1, as deployment_form
        kept, macs = [], 0
        for i, ((conv, _, pool), gate, (w, b)) in enumerate(zip(self.blocks, self.gates, self._folded)):
            c_in = x.shape[1]
            k = self._keep(i, budget, conv.out_channels)
            if k < conv.out_channels:
                gw = gate.fc.weight if idx is None else gate.fc.weight.index_select(1, idx)
                s = F.linear(x.mean(dim=(2, 3)), gw, gate.fc.bias)[0]
                out = torch.topk(s, k, sorted=False).indices  # any order: the next layer gathers its inputs in the same order
                macs += c_in * conv.out_channels
                w, b = w.index_select(0, out), b.index_select(0, out)  # index_select: ~6x faster than w[out]
            else:
                out = None
            if idx is not None:
                w = w.index_select(1, idx)
            x = F.relu(F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation))
            macs += x.shape[2] * x.shape[3] * x.shape[1] * c_in * w.shape[2] * w.shape[3]
            if pool is not None:
                x = pool(x)
            idx = out
            kept.append(x.shape[1])
        x = self.pool(x).flatten(1)
        fc1, fc2 = _linears(self)
        w1 = fc1.weight
        if idx is not None:
            cols = (idx[:, None] * self.pooled + torch.arange(self.pooled)).flatten()
            w1 = w1.index_select(1, cols)
        h = F.relu(F.linear(x, w1, fc1.bias))
        macs += w1.shape[0] * w1.shape[1] + fc2.in_features * fc2.out_features
        return fc2(h), GatedStats(kept, macs)


# ------------------------------------------------------------------ training
def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """``T^2 x KL(softmax(teacher / T) || softmax(logits / T))`` per example (the teacher is detached)."""
    teacher = F.softmax(teacher_logits.detach() / temperature, dim=1)
    return temperature**2 * F.kl_div(F.log_softmax(logits / temperature, dim=1), teacher, reduction="batchmean")


def train_gates(
    gated: GatedCNN,
    loader,
    cfg: TrainConfig,
    budgets: Sequence[float],
    distill: float = 1.0,
    temperature: float = 2.0,
    joint: bool = False,
) -> dict[str, float | int]:
    """Train the gates (and with ``joint`` the network too) for ``cfg.epochs`` epochs.

    Each step uses the next budget of ``budgets`` in turn, so one set of
    gates serves all of them. The loss is cross-entropy plus ``distill`` x
    the KL divergence to the full-budget network's softened outputs (the
    static sub-network as teacher). With ``joint=False`` the static network
    is frozen and stays in eval mode (BatchNorm statistics unchanged). With
    ``joint=True`` every step also trains the full budget (cross-entropy on
    the ungated network: the "sandwich rule" of slimmable networks), whose
    detached outputs are the teacher, so the network keeps working ungated
    while it learns to work gated; BatchNorm statistics stay fixed (eval
    mode) in both modes, only weights and affine parameters train. The
    loop is :func:`fedprune.training.train` (optimizer, LR schedule and
    threads as ``cfg``). Returns ``{"loss": mean loss of the last epoch,
    "steps", "examples"}``.
    """
    if not budgets:
        raise ValueError("train_gates needs at least one budget")
    for b in budgets:
        keep_count(b, 1)
    frozen = [] if joint else [p for n, p in gated.named_parameters() if not n.startswith("gates.") and p.requires_grad]

    def loss_fn(model: GatedCNN, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        logits = model(x, budgets[step % len(budgets)])
        loss = F.cross_entropy(logits, y)
        with torch.set_grad_enabled(joint):  # the full budget trains only in joint mode
            full = model(x, 1.0) if joint or distill else None
        if joint:
            loss = loss + F.cross_entropy(full, y)
        if distill:
            loss = loss + distill * distillation_loss(logits, full, temperature)
        return loss

    for p in frozen:
        p.requires_grad_(False)
    try:
        # Eval mode in both modes: BatchNorm keeps the static network's statistics. Jointly trained
        # in train mode, the gated and the full pass of every step would mix their batch statistics
        # into running averages that fit neither (budget 1.0 fell 7 points below the static network).
        return train(gated, loader, cfg, loss_fn=loss_fn, train_mode=False)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        gated.refresh()


# ---------------------------------------------------------------- measuring
@torch.no_grad()
def evaluate_gated(gated: GatedCNN, loader, budgets: Sequence[float], mac_inputs: int = 16) -> list[dict[str, float]]:
    """Per budget: test ``accuracy`` (masked path), mean ``macs`` executed per input and kept ``channels`` per layer.

    MACs come from the sliced batch-1 path on the first ``mac_inputs`` inputs
    of ``loader`` (gate predictors included).
    """
    was_training = gated.training
    gated.eval()
    xs = []
    for x, _ in loader:
        xs.extend(x[i : i + 1] for i in range(len(x)))
        if len(xs) >= mac_inputs:
            break
    rows = []
    try:
        for b in budgets:
            correct = n = 0
            for x, y in loader:
                correct += int((gated(x, b).argmax(dim=1) == y).sum())
                n += len(y)
            stats = [gated.forward_sliced(x, b)[1] for x in xs[:mac_inputs]]
            rows.append({
                "budget": float(b),
                "accuracy": correct / max(n, 1),
                "macs": float(sum(s.macs for s in stats) / len(stats)),
                "channels": [float(sum(s.kept[i] for s in stats) / len(stats)) for i in range(len(stats[0].kept))],
            })
    finally:
        gated.train(was_training)
    return rows


@torch.no_grad()
def gated_latency_ms(gated: GatedCNN, budgets: Sequence[float], threads: int | None = 1, warmup: int = 5, repeats: int = 50) -> dict[str, float]:
    """Median batch-1 latency (ms) of the static network (deployment form) and of the sliced gated path per budget.

    All variants are timed side by side on the same random inputs, each in a
    row (:func:`_side_by_side_ms`), so their ratios are fair. Keys:
    ``"static"`` and ``"gated@<budget>"``.
    """
    from fedprune.metrics import deployment_form, timing_input

    gated.eval()
    static = deployment_form(nn.Sequential(gated.features, gated.pool, gated.classifier))
    runs: dict[str, Callable[[torch.Tensor], Any]] = {"static": static}
    for b in budgets:
        runs[f"gated@{b:g}"] = lambda x, b=b: gated.forward_sliced(x, b)
    xs = list(timing_input(8, 1, 3, 32, 32))
    times = _side_by_side_ms(runs, xs, math.ceil(repeats / len(xs)), warmup, threads)
    return {k: statistics.median(t for per_input in v for t in per_input) for k, v in times.items()}


@torch.no_grad()
def _side_by_side_ms(runs: dict[str, Callable[[torch.Tensor], Any]], inputs: Sequence[torch.Tensor], passes: int, warmup: int,
                     threads: int | None) -> dict[str, list[list[float]]]:
    """Times (ms) of every run on every input, ``passes`` times: ``times[name][input][pass]``.

    In each pass every run takes the inputs in a row, after ``warmup`` untimed
    passes over the first 8 of them, so it finds its own weights in the caches,
    as on a device that serves only this network (timing the runs input by
    input instead would let runs that share weights find them warm while the
    others find them cold). The runs' order is reversed on every other pass, so
    drifts of the machine hit all of them alike.
    """
    from fedprune.metrics import torch_threads

    times: dict[str, list[list[float]]] = {k: [[] for _ in inputs] for k in runs}
    names = list(runs)
    with torch_threads(threads):
        for p in range(passes):
            for name in names if p % 2 == 0 else names[::-1]:
                fn = runs[name]
                for _ in range(warmup):
                    for x in inputs[:8]:
                        fn(x)
                for j, x in enumerate(inputs):
                    t0 = time.perf_counter()
                    fn(x)
                    times[name][j].append((time.perf_counter() - t0) * 1e3)
    return times


# ==================================================================== #
# Adaptive width per input: an early-exit cascade over nested widths   #
# ==================================================================== #
#: Keys of a width's BatchNorm statistics in :meth:`NestedWidthCNN.dynamic_state`.
_BN_KEY = re.compile(r"^bn\[([^\]]+)\]\.(\d+)\.(mean|var)$")


def _check_width(width: float) -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0.0 < width <= 1.0:
        raise ValueError(f"width must be a number in (0, 1], got {width!r}")
    return float(width)


def check_distinct_widths(widths: Sequence[float], sizes: Sequence[int], round_to: int) -> list[float]:
    """``widths`` sorted; ValueError naming two widths that keep the same channel counts of conv blocks
    of ``sizes`` channels (after rounding to ``round_to``): they would be one cascade stage run twice."""
    seen: dict[tuple[int, ...], float] = {}
    out = sorted({_check_width(w) for w in widths})
    for w in out:
        counts = tuple(keep_count(w, n, round_to) for n in sizes)
        if counts in seen:
            raise ValueError(f"widths {seen[counts]:g} and {w:g} keep the same channels {list(counts)} of conv blocks "
                             f"{list(sizes)} (round_to {round_to}); choose widths further apart")
        seen[counts] = w
    return out


class NestedWidthCNN(nn.Module):
    """Nested sub-networks of one seed_cnn-like conv stack that share its weights (slimmable-network style).

    Each conv block has a channel order (``orders``: one index tensor per
    block, most important channel first; by default :func:`channel_prior`
    order, or e.g. the federated consensus ranking). Width ``w`` in (0, 1]
    keeps the first :func:`keep_count` ``(w, C, round_to)`` channels of every
    block's order, the last block too, and the classifier reads only the kept
    features; width 1 is ``model`` itself. Narrower widths are thus nested
    (each contains the next narrower one). Train with :func:`train_widths`
    so that every width works on its own.

    BatchNorm: in train mode a narrower width normalises with its batch
    statistics and leaves the running statistics (the full width's) alone.
    In eval mode it uses statistics of its own (:attr:`bn_stats`), measured
    by :meth:`calibrate_bn` (a narrower layer sums fewer inputs, so the full
    width's statistics do not fit it; this is the BN calibration of
    universally slimmable networks). :meth:`extract` gives a width as a
    plain, physically smaller network with the same outputs.
    """

    def __init__(self, model: nn.Module, orders: Sequence[torch.Tensor] | None = None, round_to: int = 8):
        super().__init__()
        if round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {round_to!r}")
        self.round_to = int(round_to)
        self.model = model
        self.blocks = conv_blocks(model)
        self.fc1, self.pooled = _linears(model)[0], _pooled(model)
        if orders is None:
            orders = [torch.argsort(channel_prior(conv, bn), descending=True, stable=True) for conv, bn, _ in self.blocks]
        orders = [torch.as_tensor(o, dtype=torch.long) for o in orders]
        sizes = [conv.out_channels for conv, _, _ in self.blocks]
        if len(orders) != len(sizes) or any(not torch.equal(o.cpu().sort().values, torch.arange(n)) for o, n in zip(orders, sizes)):
            raise ValueError(f"orders must hold one permutation of each conv block's channels {sizes}, "
                             f"got lengths {[len(o) for o in orders]}")
        for j, o in enumerate(orders):  # buffers (not saved in state_dict): they move with .to(device)
            self.register_buffer(f"order_{j}", o.to(conv_blocks(model)[j][0].weight.device), persistent=False)
        #: width -> per conv block ``(running_mean, running_var)`` of that width's kept channels (see :meth:`calibrate_bn`).
        self.bn_stats: dict[float, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._groups = None

    @property
    def orders(self) -> list[torch.Tensor]:
        """Per conv block, its channel indices, most important first."""
        return [getattr(self, f"order_{j}") for j in range(len(self.blocks))]

    def check_widths(self, widths: Sequence[float]) -> list[float]:
        """``widths`` sorted, each keeping other channel counts (:func:`check_distinct_widths`)."""
        return check_distinct_widths(widths, [conv.out_channels for conv, _, _ in self.blocks], self.round_to)

    def counts(self, width: float) -> list[int]:
        """Kept output channels of each conv block at ``width``."""
        width = _check_width(width)
        return [keep_count(width, conv.out_channels, self.round_to) for conv, _, _ in self.blocks]

    def kept(self, width: float) -> list[torch.Tensor]:
        """Kept channel indices of each conv block at ``width``, in the block's order."""
        return [o[:k] for o, k in zip(self.orders, self.counts(width))]

    def is_full(self, width: float) -> bool:
        """Whether ``width`` keeps every channel (it then is the model itself)."""
        return self.counts(width) == [conv.out_channels for conv, _, _ in self.blocks]

    def _stats(self, width: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        stats = self.bn_stats.get(float(width))
        if stats is None:
            raise RuntimeError(f"width {width:g} has no BatchNorm statistics of its own: call calibrate_bn(loader, [{width:g}]) "
                               f"after training (calibrated widths: {sorted(self.bn_stats)})")
        return stats

    def forward(self, x: torch.Tensor, width: float = 1.0) -> torch.Tensor:
        """Logits of the width-``width`` network (any batch size, trainable)."""
        if self.is_full(width):
            return self.model(x)
        stats = None if self.training else self._stats(width)
        prev = None  # kept input channels of the current block (None = all)
        for j, ((conv, bn, pool), idx) in enumerate(zip(self.blocks, self.kept(width))):
            w = conv.weight.index_select(0, idx)
            if prev is not None:
                w = w.index_select(1, prev)
            bias = None if conv.bias is None else conv.bias.index_select(0, idx)
            y = F.conv2d(x, w, bias, conv.stride, conv.padding, conv.dilation)
            mean, var = stats[j] if stats is not None else (None, None)
            y = F.batch_norm(y, mean, var, bn.weight.index_select(0, idx), bn.bias.index_select(0, idx), training=stats is None, eps=bn.eps)
            x = F.relu(y)
            if pool is not None:
                x = pool(x)
            prev = idx
        x = self.model.pool(x)
        cols = (prev[:, None] * self.pooled + torch.arange(self.pooled)).flatten()  # the classifier reads channel-major features
        for m in self.model.classifier:
            x = F.linear(x, m.weight.index_select(1, cols), m.bias) if m is self.fc1 else m(x)
        return x

    def _slice(self, width: float) -> tuple[nn.Module, list[torch.Tensor]]:
        """Physically smaller copy holding the width's channels (torch-pruning; kept channels in ascending index
        order, BatchNorm statistics as in ``model``) and, per block, where its channels sit in the block's order."""
        from fedprune.groups import discover_groups
        from fedprune.masks import StructuredMask, extract_submodel

        with torch.enable_grad():  # torch-pruning traces with autograd
            if self._groups is None:
                self._groups = discover_groups(self.model)
            names = {m: n for n, m in self.model.named_modules()}
            keep = {}
            for (conv, _, _), idx in zip(self.blocks, self.kept(width)):
                vec = np.zeros(conv.out_channels, dtype=bool)
                vec[idx.numpy()] = True
                keep[names[conv]] = vec
            sub = extract_submodel(self.model, StructuredMask({**StructuredMask.dense(self._groups).keep, **keep}), self._groups).eval()
        return sub, [idx.sort().indices for idx in self.kept(width)]

    def extract(self, width: float) -> nn.Module:
        """The width-``width`` network as a plain, physically smaller copy in eval mode (outputs equal ``self.eval()(x, width)``)."""
        if self.is_full(width):
            return copy.deepcopy(self.model).eval()
        stats = self._stats(width)
        sub, where = self._slice(width)
        with torch.no_grad():
            for (_, bn, _), (mean, var), pos in zip(conv_blocks(sub), stats, where):
                bn.running_mean.copy_(mean[pos])
                bn.running_var.copy_(var[pos])
        return sub

    # ------------------------------------------------ what a federated round carries
    def dynamic_state(self, widths: Sequence[float]) -> dict[str, torch.Tensor]:
        """Channel orders and the narrower widths' BatchNorm statistics as flat tensors (see :func:`width_state`)."""
        widths = sorted({_check_width(w) for w in widths if not self.is_full(w)})
        calibrated = all(w in self.bn_stats for w in widths)
        return width_state(self.orders, {w: self.bn_stats[w] if calibrated else [(torch.zeros(k), torch.ones(k)) for k in self.counts(w)]
                                         for w in widths}, calibrated)

    @classmethod
    def from_dynamic_state(cls, model: nn.Module, state: dict[str, torch.Tensor], round_to: int = 8) -> "NestedWidthCNN":
        """A :class:`NestedWidthCNN` around ``model`` with the orders of :func:`width_state` and, once
        calibrated, its BatchNorm statistics (before that, narrower widths cannot run in eval mode)."""
        blocks = len(conv_blocks(model))
        missing = [f"order.{j}" for j in range(blocks) if f"order.{j}" not in state]
        if missing:
            raise ValueError(f"dynamic state lacks the channel orders {missing}")
        net = cls(model, [state[f"order.{j}"] for j in range(blocks)], round_to)
        if float(state.get("calibrated", torch.tensor(0.0))) > 0:
            for key in sorted({m.group(1) for k in state if (m := _BN_KEY.match(k))}):
                net.bn_stats[float(key)] = [(state[f"bn[{key}].{j}.mean"], state[f"bn[{key}].{j}.var"]) for j in range(blocks)]
        return net

    @torch.no_grad()
    def calibrate_bn(self, loader, widths: Sequence[float], max_batches: int | None = None) -> None:
        """Measure each narrower width's own BatchNorm statistics over ``loader`` (exact averages, as
        :func:`fedprune.training.recalibrate_bn`; use a loader without augmentation)."""
        for w in sorted({_check_width(w) for w in widths}):
            if self.is_full(w):
                continue
            sub, where = self._slice(w)
            recalibrate_bn(sub, loader, max_batches)
            stats = []
            for (_, bn, _), pos in zip(conv_blocks(sub), where):
                mean, var = torch.empty_like(bn.running_mean), torch.empty_like(bn.running_var)
                mean[pos], var[pos] = bn.running_mean, bn.running_var  # back to the block's order
                stats.append((mean, var))
            self.bn_stats[w] = stats


def width_state(orders: Sequence[torch.Tensor], stats: dict[float, Sequence[tuple[torch.Tensor, torch.Tensor]]],
                calibrated: bool) -> dict[str, torch.Tensor]:
    """The flat tensors a federated round carries for a :class:`NestedWidthCNN` (the server keeps one per sub-network).

    Keys: ``order.<block>`` (int64, the block's channel order, most important
    first), ``bn[<width>].<block>.mean`` / ``.var`` (float, per narrower width,
    in the block's order; mean 0 and variance 1 before calibration; the width
    written as ``repr(float)``, so it reads back exactly) and ``calibrated``
    (1.0 once the statistics were measured, else 0.0). The server sends it
    with the fine-tuning message, averages the floats that clients return by
    samples and keeps its own orders.
    """
    state = {f"order.{j}": torch.as_tensor(o, dtype=torch.long).clone() for j, o in enumerate(orders)}
    for w, per_block in sorted(stats.items()):
        for j, (mean, var) in enumerate(per_block):
            state[f"bn[{float(w)!r}].{j}.mean"], state[f"bn[{float(w)!r}].{j}.var"] = mean.detach().clone(), var.detach().clone()
    state["calibrated"] = torch.tensor(1.0 if calibrated else 0.0)
    return state


def widths_calibrated(state: dict[str, torch.Tensor]) -> bool:
    """Whether a :func:`width_state` holds measured statistics of its narrower widths (some client trained them)."""
    return float(state["calibrated"]) > 0


def train_widths(
    net: NestedWidthCNN,
    loader,
    cfg: TrainConfig,
    widths: Sequence[float],
    distill: float = 0.0,
    temperature: float = 2.0,
    narrow_ce: float = 0.5,
) -> dict[str, float | int]:
    """Train the shared weights so that every width of ``widths`` works (the sandwich rule of slimmable networks).

    Each step: cross-entropy of the full width (its BatchNorm in train mode,
    updating the running statistics, exactly as plain fine-tuning does), plus
    for each narrower width ``narrow_ce`` x its cross-entropy and ``distill``
    x the distillation loss to the full width's detached outputs (in-place
    distillation; ``narrow_ce = 0`` is distillation alone, as in US-Nets).
    The defaults (half-weight cross-entropy, no distillation) protect the
    full width: in benchmarks/dynamic.md (3 epochs, 5 seeds) it ends 0.2
    points below plain fine-tuning; the earlier ``narrow_ce = distill = 1``
    left it 1.1 points below, with a narrow width no better.
    Calibrated statistics of narrower widths no longer fit the new weights
    and are dropped: call :meth:`NestedWidthCNN.calibrate_bn` afterwards.
    The loop is :func:`fedprune.training.train`. Returns ``{"loss": mean
    loss of the last epoch, "steps", "examples"}``.
    """
    if not widths:
        raise ValueError("train_widths needs at least one width")
    narrower = [w for w in net.check_widths(widths) if not net.is_full(w)]

    def loss_fn(model: NestedWidthCNN, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        full = model(x)
        loss = F.cross_entropy(full, y)
        for w in narrower:
            logits = model(x, w)
            if narrow_ce:
                loss = loss + narrow_ce * F.cross_entropy(logits, y)
            if distill:
                loss = loss + distill * distillation_loss(logits, full, temperature)
        return loss

    net.bn_stats.clear()
    return train(net, loader, cfg, loss_fn=loss_fn)


def check_exit_rule(rule: str) -> str:
    """``rule`` if it is one of :data:`EXIT_RULES`, else ``ValueError`` naming it and the allowed ones."""
    if rule not in EXIT_RULES:
        raise ValueError(f"exit rule must be one of {EXIT_RULES}, got {rule!r}")
    return rule


def exit_confidence(logits: torch.Tensor, rule: str = "margin") -> torch.Tensor:
    """Per input, a stage's confidence in its answer, in [0, 1], from logits ``(N, classes)``.

    ``"margin"``: the top softmax probability minus the second one (an input
    torn between two classes counts as unsure even when both are likely);
    ``"max_prob"``: the top softmax probability (the classic early-exit rule).
    On the CIFAR-10 subset (seed_cnn, 5 seeds) the margin left 0.3-0.4
    points fewer errors than the top probability at the same share of early
    exits, so it is the default.
    """
    check_exit_rule(rule)
    probs = torch.softmax(logits, dim=1)
    if rule == "max_prob" or probs.shape[1] < 2:
        return probs.amax(dim=1)
    top2 = probs.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


class ExitStage(nn.Module):
    """A cascade stage that returns ``(logits, exit_confidence(logits, rule))``, so a deployed stage
    (e.g. exported to ONNX) computes its exit decision's input in its own graph."""

    def __init__(self, stage: nn.Module, rule: str = "margin"):
        super().__init__()
        self.stage, self.rule = stage, check_exit_rule(rule)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.stage(x)
        return logits, exit_confidence(logits, self.rule)


class WidthCascade:
    """Per-input adaptive width: an early-exit cascade over static networks of growing width.

    An input runs the first (narrowest) stage; if its confidence
    (:func:`exit_confidence` by ``rule``) reaches ``threshold`` that answer
    stands, else the next stage runs, and the last stage always answers. Easy inputs thus stop at a
    fraction of the channels, hard ones get the whole sub-network. Each stage
    is a plain, physically smaller network (e.g. :meth:`NestedWidthCNN.extract`),
    so nothing is gathered per input and a stage runs as fast as any pruned
    network; an input's executed MACs are the sum of the stages it ran
    (:attr:`stage_macs`, batch-1 multiply-accumulates; the softmax is not counted).
    """

    def __init__(self, stages: Sequence[nn.Module], threshold: float, stage_macs: Sequence[int] | None = None, rule: str = "margin"):
        from fedprune.metrics import count_macs

        if not stages:
            raise ValueError("a cascade needs at least one stage")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold < 0:
            raise ValueError(f"threshold must be a finite number >= 0 (a confidence in [0, 1]; above 1 = always the last stage), got {threshold!r}")
        check_exit_rule(rule)
        if stage_macs is None and not all(isinstance(m, nn.Module) for m in stages):
            raise ValueError("stage_macs is needed when a stage is not a torch module (e.g. an ONNX Runtime session): its MACs cannot be counted")
        if any(isinstance(m, ExitStage) and m.rule != rule for m in stages):
            raise ValueError(f"a stage computes its confidence by another exit rule than the cascade's {rule!r}")
        self.stages = [m.eval() if isinstance(m, nn.Module) else m for m in stages]  # deployed stages may be ONNX Runtime sessions
        self.threshold = float(threshold)
        self.rule = rule
        self.stage_macs = [int(m) for m in stage_macs] if stage_macs is not None else [count_macs(m) for m in self.stages]

    def deployed(self, copies: dict | None = None, runtime: str = "torch", threads: int | None = 1) -> "WidthCascade":
        """The same cascade with every stage in deployment form (BN folded, channels_last), for timing.

        ``runtime`` (:data:`fedprune.metrics.LATENCY_RUNTIMES`) runs the stages in eager PyTorch
        or in ONNX Runtime (with ``threads`` threads). Every stage but the last also computes its
        exit confidence inside the deployed graph (:class:`ExitStage`), as a deployed cascade would.
        ``copies`` (key -> deployed stage) lets cascades that share stage networks, e.g. one per
        threshold, share their deployed copies too (new copies are added to it).
        """
        from fedprune.metrics import check_runtime, deployment_form, in_runtime

        check_runtime(runtime)
        if any(isinstance(m, ExitStage) or not isinstance(m, nn.Module) for m in self.stages):
            raise ValueError("this cascade is already deployed: deploy the cascade over the trained stage networks")
        copies = {} if copies is None else copies
        last = len(self.stages) - 1
        out = []
        for i, m in enumerate(self.stages):
            key = (id(m), runtime, threads, self.rule if i < last else None)
            if key not in copies:
                copies[key] = in_runtime(deployment_form(m) if i == last else ExitStage(deployment_form(m), self.rule), runtime, threads)
            out.append(copies[key])
        return WidthCascade(out, self.threshold, self.stage_macs, self.rule)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Logits for one input (batch 1) and the index of the stage that answered."""
        if x.shape[0] != 1:
            raise ValueError(f"a cascade runs one input at a time, got a batch of {x.shape[0]}")
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            out = stage(x)
            if i == last:
                return (out[0] if isinstance(out, tuple) else out), i
            logits, conf = out if isinstance(out, tuple) else (out, exit_confidence(out, self.rule))  # ExitStage: computed in the graph
            if float(conf) >= self.threshold:
                return logits, i
        raise AssertionError("unreachable")  # pragma: no cover


@torch.no_grad()
def stage_logits(stages: Sequence[nn.Module], loader) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every stage's logits ``(N, classes)`` on all of ``loader`` (batched, eval mode) and the labels ``(N,)``."""
    outs: list[list[torch.Tensor]] = [[] for _ in stages]
    labels = []
    for x, y in loader:
        for out, m in zip(outs, stages):
            out.append(m.eval()(x))
        labels.append(y)
    return [torch.cat(o) for o in outs], torch.cat(labels)


def _exit_stage(logits: Sequence[torch.Tensor], threshold: float, rule: str = "margin") -> torch.Tensor:
    """Per input, the stage that answers in a cascade with ``threshold`` and ``rule`` (see :class:`WidthCascade`)."""
    n, last = logits[0].shape[0], len(logits) - 1
    stage = torch.full((n,), last, dtype=torch.long)
    undecided = torch.ones(n, dtype=torch.bool)
    for i in range(last):
        # in float64, as WidthCascade compares float(conf): a float32 comparison rounds the threshold
        take = undecided & (exit_confidence(logits[i], rule).double() >= threshold)
        stage[take] = i
        undecided &= ~take
    return stage


def cascade_outcome(logits: Sequence[torch.Tensor], labels: torch.Tensor, stage_macs: Sequence[int], threshold: float,
                    rule: str = "margin") -> dict:
    """What a :class:`WidthCascade` with ``threshold`` and ``rule`` does on inputs whose per-stage logits are ``logits``.

    Returns ``threshold``, ``accuracy``, ``macs`` (mean executed per input) and
    ``exits`` (fraction of inputs answered by each stage). The decisions equal running the
    cascade input by input.
    """
    stage = _exit_stage(logits, threshold, rule)
    stacked = torch.stack([l.argmax(dim=1) for l in logits])  # (stages, N)
    pred = stacked.gather(0, stage[None]).squeeze(0)
    cost = torch.tensor(stage_macs, dtype=torch.float64).cumsum(0)[stage]
    return {
        "threshold": float(threshold),
        "accuracy": float((pred == labels).double().mean()),
        "macs": float(cost.mean()),
        "exits": [float((stage == i).double().mean()) for i in range(len(logits))],
    }


def evaluate_cascade(net: NestedWidthCNN, widths: Sequence[float], loader, thresholds: Sequence[float], rule: str = "margin") -> dict:
    """Each width of ``net`` extracted, run on ``loader``, and the cascade over them at each threshold (exit ``rule``).

    Returns ``widths``, ``stage_macs`` (per width, batch-1 MACs), ``width_accuracy``
    (each width alone), ``rows`` (:func:`cascade_outcome` per threshold) and
    ``stages`` (the extracted networks, e.g. for :func:`cascade_latency_ms`).
    """
    from fedprune.metrics import count_macs

    check_exit_rule(rule)
    net.check_widths(widths)
    stages = [net.extract(w) for w in widths]
    macs = [count_macs(m) for m in stages]
    logits, labels = stage_logits(stages, loader)
    return {
        "widths": [float(w) for w in widths],
        "stage_macs": macs,
        "width_accuracy": [float((lg.argmax(1) == labels).double().mean()) for lg in logits],
        "rows": [cascade_outcome(logits, labels, macs, t, rule) for t in thresholds],
        "stages": stages,
    }


def threshold_for_macs(logits: Sequence[torch.Tensor], stage_macs: Sequence[int], target_macs: float, rule: str = "margin") -> float:
    """A threshold whose mean executed MACs on these inputs stay within ``target_macs`` (MACs per input), sending as
    many inputs to wider stages as the target allows.

    A higher threshold sends more inputs to wider stages, so MACs never fall
    as it grows (accuracy usually rises, but need not). The result lies
    midway between two inputs' confidences, so float rounding in a deployed
    network does not flip an input across it. Raises ``ValueError`` when
    even stopping every input at the first stage costs more than ``target_macs``.
    """
    floor = float(stage_macs[0])
    if target_macs < floor:
        raise ValueError(f"target of {target_macs:.4g} MACs per input is below the first stage's {floor:.4g} MACs")
    if len(logits) < 2:
        return 0.0
    cum = torch.tensor(stage_macs, dtype=torch.float64).cumsum(0)
    macs = lambda t: float(cum[_exit_stage(logits, t, rule)].mean())  # noqa: E731
    conf = torch.unique(torch.cat([exit_confidence(lg, rule) for lg in logits[:-1]]).double()).tolist()
    candidates = [0.0] + conf + [1.0 + 1e-6]  # 0: every input stops at the first stage; above 1: none does
    lo, hi = 0, len(candidates) - 1  # invariant: macs(candidates[lo]) <= target < macs(candidates[hi])
    if macs(candidates[hi]) <= target_macs:
        return candidates[hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if macs(candidates[mid]) <= target_macs:
            lo = mid
        else:
            hi = mid
    return candidates[lo] if lo == 0 else (candidates[lo - 1] + candidates[lo]) / 2


@torch.no_grad()
def cascade_latency_ms(
    static: nn.Module,
    cascades: dict[str, WidthCascade],
    inputs: Sequence[torch.Tensor],
    threads: int | None = 1,
    passes: int = 5,
    warmup: int = 2,
    runtime: str = "torch",
) -> dict[str, float]:
    """Mean batch-1 latency (ms per input) over ``inputs`` of ``static`` (deployment form) and of each cascade (stages deployed).

    The inputs should be real images: a cascade's cost depends on where each
    one exits. Every input is timed on every variant ``passes`` times, each
    variant taking the inputs in a row, as a device that serves one network
    does (:func:`_side_by_side_ms`); per input the median pass counts, and the
    result is the mean over inputs. Cascades that share a stage network share
    its one deployed copy. ``runtime`` (:data:`fedprune.metrics.LATENCY_RUNTIMES`)
    runs the static network and every stage in eager PyTorch or in ONNX Runtime.
    Keys: ``"static"`` and the names of ``cascades``.
    """
    from fedprune.metrics import deployed

    copies: dict = {}
    runs: dict[str, Callable[[torch.Tensor], Any]] = {"static": deployed(static, runtime, threads)}
    runs.update({name: c.deployed(copies, runtime, threads) for name, c in cascades.items()})
    times = _side_by_side_ms(runs, inputs, passes, warmup, threads)
    return {k: float(statistics.fmean(statistics.median(t) for t in v)) for k, v in times.items()}
