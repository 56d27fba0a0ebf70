"""Dynamic per-input channel pruning at inference, in the style of Feature Boosting and Suppression.

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

:meth:`GatedCNN.executed_macs` counts the multiply-accumulates an input
actually executes, gate predictors included.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedprune.training import TrainConfig, train

__all__ = ["ChannelGate", "GatedCNN", "GatedStats", "keep_count", "train_gates", "evaluate_gated", "gated_latency_ms"]


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
    """0/1 mask of the ``k`` largest saliencies per row (ties broken by lower index)."""
    idx = torch.topk(saliency, k, dim=1, sorted=False).indices
    return torch.zeros_like(saliency).scatter_(1, idx, 1.0)


@dataclass
class GatedStats:
    """What one sliced forward pass kept: channels per gated layer and MACs executed."""

    kept: list[int]
    macs: int


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
        if not all(isinstance(getattr(model, a, None), nn.Module) for a in ("features", "pool", "classifier")):
            raise NotImplementedError(f"GatedCNN needs Conv2d-BatchNorm2d-ReLU[-MaxPool2d] blocks in 'features' (seed_cnn), got {type(model).__name__}")
        layers = list(model.features)
        self.blocks: list[tuple[nn.Conv2d, nn.BatchNorm2d, nn.Module | None]] = []
        i = 0
        while i < len(layers):
            conv, bn, act = layers[i : i + 3]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and isinstance(act, nn.ReLU)) or conv.groups != 1:
                raise NotImplementedError(
                    f"GatedCNN needs Conv2d-BatchNorm2d-ReLU[-MaxPool2d] blocks (seed_cnn); found {type(conv).__name__} at features.{i}"
                )
            i += 3
            pool = None
            if i < len(layers) and isinstance(layers[i], nn.MaxPool2d):
                pool, i = layers[i], i + 1
            self.blocks.append((conv, bn, pool))
        fcs = [m for m in model.classifier if isinstance(m, nn.Linear)]
        if not isinstance(model.pool, nn.AdaptiveAvgPool2d) or len(fcs) != 2:
            raise NotImplementedError("GatedCNN needs an AdaptiveAvgPool2d and a two-layer Linear classifier (seed_cnn)")
        self.features, self.pool, self.classifier = model.features, model.pool, model.classifier
        self.gates = nn.ModuleList(ChannelGate(c.in_channels, c.out_channels, self._prior(c, b)) for c, b, _ in self.blocks)
        #: Indices of the conv blocks whose channels are gated; the others always compute every channel.
        #: By default every block but the last: at its small spatial size (4x4 in seed_cnn) indexing its
        #: weights and the classifier's per input costs more time than the skipped MACs save.
        self.gated_layers = tuple(range(len(self.blocks) - 1) if gated_layers is None else sorted(set(gated_layers)))
        bad = [i for i in self.gated_layers if not 0 <= i < len(self.blocks)]
        if bad:
            raise ValueError(f"gated_layers {bad} out of range: the model has conv blocks 0..{len(self.blocks) - 1}")
        side = model.pool.output_size
        self.pooled = side * side if isinstance(side, int) else side[0] * side[1]
        self._folded: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _keep(self, layer: int, budget: float, channels: int) -> int:
        return keep_count(budget, channels, self.round_to) if layer in self.gated_layers else channels

    @staticmethod
    def _prior(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
        with torch.no_grad():
            w = conv.weight.flatten(1).norm(dim=1) * bn.weight.abs() / torch.sqrt(bn.running_var + bn.eps)
            return w / w.mean().clamp_min(1e-12)

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
        fc1, fc2 = [m for m in self.classifier if isinstance(m, nn.Linear)]
        w1 = fc1.weight
        if idx is not None:
            cols = (idx[:, None] * self.pooled + torch.arange(self.pooled)).flatten()
            w1 = w1.index_select(1, cols)
        h = F.relu(F.linear(x, w1, fc1.bias))
        macs += w1.shape[0] * w1.shape[1] + fc2.in_features * fc2.out_features
        return fc2(h), GatedStats(kept, macs)


# ------------------------------------------------------------------ training
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
            teacher = F.softmax(full.detach() / temperature, dim=1)
            loss = loss + distill * temperature**2 * F.kl_div(F.log_softmax(logits / temperature, dim=1), teacher, reduction="batchmean")
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

    All variants are timed round-robin on the same random inputs, so their
    ratios are fair. Keys: ``"static"`` and ``"gated@<budget>"``.
    """
    from fedprune.metrics import deployment_form, torch_threads

    gated.eval()
    static = deployment_form(nn.Sequential(gated.features, gated.pool, gated.classifier))
    runs: dict[str, Callable[[torch.Tensor], Any]] = {"static": static}
    for b in budgets:
        runs[f"gated@{b:g}"] = lambda x, b=b: gated.forward_sliced(x, b)
    xs = [torch.randn(1, 3, 32, 32) for _ in range(8)]
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch_threads(threads):
        for i in range(warmup):
            for fn in runs.values():
                fn(xs[i % len(xs)])
        for i in range(repeats):
            x = xs[i % len(xs)]
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn(x)
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}
