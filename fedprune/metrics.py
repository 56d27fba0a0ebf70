"""Model cost metrics: parameters, MACs/FLOPs, sparsity and measured CPU latency.

Units: parameters are counts; MACs are multiply-accumulates of one forward
pass at batch 1 (FLOPs = 2 x MACs), counted by ``torch.utils.flop_counter``
(convolutions and matrix products; BN/ReLU/pooling are not counted); latency
is milliseconds of wall time per forward pass.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from fedprune.groups import EXAMPLE_INPUT_SHAPE

__all__ = ["count_params", "count_macs", "count_flops", "param_sparsity", "measure_latency_ms", "model_costs", "torch_threads"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (all, trainable or not)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: tuple[int, ...] = EXAMPLE_INPUT_SHAPE) -> int:
    """FLOPs of one forward pass (2 per multiply-accumulate) at ``input_shape``."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros(input_shape, dtype=param.dtype, device=param.device)
        counter = FlopCounterMode(display=False)
        with counter:
            model(x)
        return int(counter.get_total_flops())
    finally:
        model.train(was_training)


def count_macs(model: nn.Module, input_shape: tuple[int, ...] = EXAMPLE_INPUT_SHAPE) -> int:
    """Multiply-accumulates of one forward pass at ``input_shape``."""
    return count_flops(model, input_shape) // 2


def param_sparsity(model: nn.Module, reference_params: int | None = None) -> float:
    """Fraction of parameters removed vs ``reference_params`` (extracted model),
    or, without a reference, the fraction of exactly-zero parameters (soft-masked model)."""
    if reference_params:
        return 1.0 - count_params(model) / reference_params
    total = count_params(model)
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    return zeros / total if total else 0.0


@contextmanager
def torch_threads(n: int | None):
    """Temporarily fix torch's intra-op thread count."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.no_grad()
def measure_latency_ms(
    model: nn.Module,
    batch_size: int = 1,
    threads: int | None = 1,
    warmup: int = 5,
    repeats: int = 20,
    min_seconds: float = 0.0,
) -> float:
    """Median wall time (ms) of one eval-mode forward pass on random CIFAR-sized input.

    ``threads`` fixes torch's thread count for the measurement (restored after).
    At least ``repeats`` runs after ``warmup``; more until ``min_seconds`` pass.
    """
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, *EXAMPLE_INPUT_SHAPE[1:])
    times: list[float] = []
    try:
        with torch_threads(threads):
            for _ in range(warmup):
                model(x)
            start = time.perf_counter()
            while len(times) < repeats or time.perf_counter() - start < min_seconds:
                t0 = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        model.train(was_training)
    return statistics.median(times)


def model_costs(model: nn.Module, latency: bool = False, threads: int | None = 1, repeats: int = 20) -> dict:
    """Params, MACs, FLOPs and (optionally) batch-1 / batch-64 latency in ms."""
    out = {"params": count_params(model), "macs": count_macs(model)}
    out["flops"] = 2 * out["macs"]
    if latency:
        out["latency_ms"] = {
            "b1": measure_latency_ms(model, 1, threads, repeats=repeats),
            "b64": measure_latency_ms(model, 64, threads, warmup=2, repeats=max(5, repeats // 4)),
        }
    return out
