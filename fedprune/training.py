"""Local training and evaluation loops shared by clients, server and baselines.

Loaders yield ``(x, y)`` batches with ``x`` float32 ``(B, 3, 32, 32)`` and ``y``
int64 ``(B,)`` (see :func:`fedprune.data.make_loader`).  Batches are moved to
the device of the model's first parameter.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")


def set_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainConfig:
    """Hyper-parameters of one local training run.

    Attributes:
        epochs: passes over the loader (>= 1).
        lr: initial learning rate (> 0).
        optimizer: ``"sgd"`` (with momentum) or ``"adam"``.
        momentum: SGD momentum in ``[0, 1)`` (ignored by Adam).
        weight_decay: L2 penalty (>= 0).
        batch_size: examples per batch (>= 1); used by callers building loaders.
        cosine: anneal the LR to 0 with a cosine schedule over all steps.
        threads: if set (>= 1), ``torch.set_num_threads(threads)`` before training.
    """

    epochs: int = 1
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    cosine: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        _check(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "a finite float > 0")
        _check(self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, f"one of {OPTIMIZERS}")
        _check(0 <= self.momentum < 1, "momentum", self.momentum, "a float in [0, 1)")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a float >= 0")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _check(
            self.threads is None or self.threads >= 1,
            "threads",
            self.threads,
            "None or an integer >= 1",
        )


def _check(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"TrainConfig.{field} must be {allowed}, got {value!r}")


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay) or Adam (weight decay) over ``params``."""
    params = list(params)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


def _device_of(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _batches(loader: DataLoader, epochs: int, progress: str | None) -> Iterator[tuple[int, Any]]:
    """Yield ``(epoch, batch)`` over all epochs, with an optional tqdm bar."""
    bar = None
    if progress:
        bar = tqdm(total=epochs * len(loader), desc=progress, disable=None, leave=False)
    try:
        for epoch in range(epochs):
            for batch in loader:
                yield epoch, batch
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def train(
    model: nn.Module,
    loader: DataLoader,
    cfg: TrainConfig,
    after_step: Callable[[nn.Module], None] | None = None,
    progress: str | None = None,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None,
    train_mode: bool = True,
) -> dict[str, float | int]:
    """Train ``model`` in place for ``cfg.epochs`` epochs.

    Only parameters with ``requires_grad`` are optimised.  ``after_step(model)``
    runs after every optimizer step (e.g. to re-apply pruning masks).
    ``loss_fn(model, x, y, step)`` gives a batch's loss (default: cross-entropy
    of ``model(x)``).  The model runs in train mode (``train_mode=False``: eval
    mode, e.g. to keep frozen BatchNorm statistics) and its mode is restored
    afterwards.

    Returns:
        ``{"loss": mean per-example loss of the last epoch (nan if no batches),
        "steps": optimizer steps taken, "examples": examples seen over all epochs}``.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    total_steps = cfg.epochs * len(loader)
    if total_steps == 0:
        return {"loss": float("nan"), "steps": 0, "examples": 0}

    device = _device_of(model)
    optimizer = make_optimizer((p for p in model.parameters() if p.requires_grad), cfg)
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
        if cfg.cosine
        else None
    )
    if loss_fn is None:
        criterion = nn.CrossEntropyLoss()
        loss_fn = lambda m, x, y, step: criterion(m(x), y)  # noqa: E731
    was_training = model.training
    model.train(train_mode)
    steps = examples = 0
    epoch_loss, epoch_examples, current_epoch = 0.0, 0, 0
    try:
        for epoch, (x, y) in _batches(loader, cfg.epochs, progress):
            if epoch != current_epoch:
                epoch_loss, epoch_examples, current_epoch = 0.0, 0, epoch
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, x, y, steps)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(model)
            if scheduler is not None:
                scheduler.step()
            steps += 1
            examples += len(y)
            epoch_loss += float(loss.detach()) * len(y)
            epoch_examples += len(y)
    finally:
        model.train(was_training)
    return {"loss": epoch_loss / epoch_examples, "steps": steps, "examples": examples}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> dict[str, float | int]:
    """Cross-entropy loss and top-1 accuracy of ``model`` on ``loader``.

    Runs in eval mode without gradients and restores the previous mode.

    Returns:
        ``{"loss": mean per-example loss, "accuracy": fraction in [0, 1],
        "num_examples": int}``; loss and accuracy are nan for an empty loader.
    """
    device = _device_of(model)
    was_training = model.training
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            total_loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
            n += len(y)
    finally:
        model.train(was_training)
    if n == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "num_examples": 0}
    return {"loss": total_loss / n, "accuracy": correct / n, "num_examples": n}


@torch.no_grad()
def predict_logits(model: nn.Module, loader: DataLoader) -> torch.Tensor:
    """Logits for every example of ``loader`` in order: float32 CPU ``(N, num_classes)``.

    Runs in eval mode and restores the previous mode.  An empty loader gives
    a ``(0, 0)`` tensor.
    """
    device = _device_of(model)
    was_training = model.training
    model.eval()
    outputs: list[torch.Tensor] = []
    try:
        for batch in loader:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            outputs.append(model(x.to(device)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty((0, 0))


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, max_batches: int | None = None) -> int:
    """Recompute BatchNorm running statistics over ``loader`` (PyTorch's cumulative average, ``momentum=None``).

    One forward pass in train mode without gradients; other parameters are
    untouched and the model's train/eval mode is restored. This is the
    "static BN" of HeteroFL: statistics that match the final weights and the
    sub-network's width, instead of momentum averages that lag behind.
    As in ``torch.optim.swa_utils.update_bn``, the mean and variance are the
    average of each batch's (every batch weighs the same, a short last batch
    too, and the spread between batch means is not added to the variance), so
    they are close to, not exactly, the statistics of the whole loader; with
    batches of 256 and shards of a few hundred images the variance is within
    a few percent. Returns the number of examples used (0 if the model has no
    BatchNorm).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    saved = [(m, m.momentum) for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    device = _device_of(model)
    seen = 0
    try:
        for i, (x, _) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            model(x.to(device))
            seen += len(x)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return seen
