"""Model cost metrics: parameters, MACs/FLOPs, sparsity and measured CPU latency.

Units: parameters are counts; MACs are multiply-accumulates of one forward
pass at batch 1 (FLOPs = 2 x MACs), counted by ``torch.utils.flop_counter``
(convolutions and matrix products; BN/ReLU/pooling are not counted); latency
is milliseconds of wall time per forward pass of the model's *deployment
form* (:func:`deployment_form`: eval mode, BatchNorm folded into the preceding
convolutions, channels_last memory format), the same for dense, soft-masked
and pruned models. Batch-1 latency can also be taken in ONNX Runtime
(:class:`OnnxRuntimeModel`, one of :data:`LATENCY_RUNTIMES`): eager PyTorch
spends ~20 us of fixed overhead per operator, which at batch 1 is a large
share of a small network's time and hides what fewer channels save.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from fedprune.config import LATENCY_RUNTIMES
from fedprune.groups import EXAMPLE_INPUT_SHAPE

log = logging.getLogger(__name__)

__all__ = ["LATENCY_PASSES", "LATENCY_RUNTIMES", "check_runtime", "OnnxRuntimeModel", "in_runtime", "deployed", "deployment_form", "count_params", "count_macs", "count_flops", "param_sparsity", "measure_latency_ms", "host_latency_ms", "median_host_latency_ms", "latency_side_by_side", "model_costs", "torch_threads", "process_tree_rss"]


class _ChannelsLast(nn.Module):
    """Runs the wrapped model on channels_last input (NHWC), as CPU inference runtimes do."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


def deployment_form(model: nn.Module) -> nn.Module:
    """An inference copy of ``model``: eval mode, BN folded into convs, channels_last.

    Outputs equal the original's in eval mode (up to float rounding). If the
    model cannot be traced by torch.fx, BN is left unfolded.
    """
    from torch.fx.experimental.optimization import fuse

    model = copy.deepcopy(model).eval()
    try:
        model = fuse(model)
    except Exception as exc:  # pragma: no cover - depends on the architecture
        log.debug("BN folding skipped: %s", exc)
    return _ChannelsLast(model).eval()


def check_runtime(runtime: str) -> str:
    """``runtime`` if it is one of :data:`LATENCY_RUNTIMES` (``"torch"``: eager PyTorch on :func:`deployment_form`;
    ``"onnxruntime"``: that form in :class:`OnnxRuntimeModel`), else ``ValueError`` naming it and the allowed ones."""
    if runtime not in LATENCY_RUNTIMES:
        raise ValueError(f"latency runtime must be one of {LATENCY_RUNTIMES}, got {runtime!r}")
    return runtime


class OnnxRuntimeModel:
    """``model`` exported to ONNX (in memory) and run by ONNX Runtime on the CPU: a deployment runtime.

    Called like the module on a torch tensor of exactly ``input_shape`` (default: one CIFAR image; the
    export has a fixed batch size) and returns torch tensors (one, or a tuple when the module returns
    several). ONNX Runtime plans the whole graph once, so each call costs a few microseconds of
    overhead instead of eager PyTorch's ~20 us per operator. ``threads``: its intra-op threads (>= 1;
    ``None`` = ONNX Runtime's default, one per physical core); idle worker threads do not spin, so
    sessions that take turns (a cascade's stages) do not slow each other down. Outputs equal the
    module's up to float rounding (``tests/test_dynamic.py``).
    """

    def __init__(self, model: nn.Module, threads: int | None = 1, input_shape: tuple[int, ...] = EXAMPLE_INPUT_SHAPE):
        import io
        import warnings

        import onnxruntime as ort

        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"ONNX Runtime threads must be an integer >= 1 or None (its default), got {threads!r}")
        buf = io.BytesIO()
        with warnings.catch_warnings():  # the TorchScript-based exporter warns that it is deprecated
            warnings.simplefilter("ignore")
            torch.onnx.export(copy.deepcopy(model).eval(), (torch.zeros(input_shape),), buf, dynamo=False, opset_version=17)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor):
        outs = [torch.from_numpy(o) for o in self.session.run(None, {self.input_name: x.detach().contiguous().numpy()})]
        return outs[0] if len(outs) == 1 else tuple(outs)


def in_runtime(form: nn.Module, runtime: str = "torch", threads: int | None = 1):
    """A module already in deployment form, run by ``runtime`` (:data:`LATENCY_RUNTIMES`): itself for eager
    PyTorch (whose threads the timer sets), else an :class:`OnnxRuntimeModel` with ``threads`` threads."""
    return form if check_runtime(runtime) == "torch" else OnnxRuntimeModel(form, threads)


def deployed(model: nn.Module, runtime: str = "torch", threads: int | None = 1):
    """``model`` ready to time in ``runtime`` (:data:`LATENCY_RUNTIMES`): its :func:`deployment_form`, run by
    eager PyTorch or by ONNX Runtime with ``threads`` threads (:func:`in_runtime`)."""
    return in_runtime(deployment_form(model), check_runtime(runtime), threads)


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


def measure_latency_ms(model: nn.Module, batch_size: int = 1, threads: int | None = 1, warmup: int = 5, repeats: int = 20) -> float:
    """Median wall time (ms) of one forward pass of ``deployment_form(model)`` on random CIFAR-sized input.

    ``threads`` fixes torch's thread count for the measurement (restored after).
    """
    return latency_side_by_side({"model": model}, batch_size, threads, warmup, repeats)["model"]


def host_latency_ms(model: nn.Module, batch_size: int, threads: int | None = 1, repeats: int = 20) -> float:
    """Latency (ms on this host) as every run reports it: batch 1 timed ``repeats`` times after 5
    warm-up passes, larger batches ``max(5, repeats // 4)`` times after 2 (see :func:`measure_latency_ms`)."""
    if batch_size == 1:
        return measure_latency_ms(model, 1, threads, repeats=repeats)
    return measure_latency_ms(model, batch_size, threads, warmup=2, repeats=max(5, repeats // 4))


def median_host_latency_ms(models: dict[str, nn.Module], batch_size: int, threads: int | None = 1, repeats: int = 20, passes: int = 3) -> dict[str, float]:
    """``{name: ms}``: each model timed alone by :func:`host_latency_ms`, ``passes`` times over all of them, median."""
    runs = [{n: host_latency_ms(m, batch_size, threads, repeats) for n, m in models.items()} for _ in range(passes)]
    return {n: statistics.median(r[n] for r in runs) for n in models}


#: Timing passes whose median a run reports as a sub-network's latency (:func:`model_costs`).
LATENCY_PASSES = 5


def relative_host_latency(model: nn.Module, reference: nn.Module, batch_size: int, threads: int | None = 1, repeats: int = 20,
                          passes: int = LATENCY_PASSES) -> float:
    """``model``'s latency over ``reference``'s (a ratio), both timed by :func:`host_latency_ms` in each of
    ``passes`` passes, one right after the other; the median over passes of the per-pass ratio.

    On a shared host whose speed changes from one second to the next, both see the same state within a
    pass. On the 2-core benchmark VM the dense seed_cnn timed at 1.7 or 2.3 ms at batch 1, flipping within
    seconds in a quiet process, while a 75%-width sub-network over the dense model stayed at 0.64-0.67.
    """
    ratios = []
    for _ in range(max(1, passes)):
        own = host_latency_ms(model, batch_size, threads, repeats)
        ratios.append(own / host_latency_ms(reference, batch_size, threads, repeats))
    return statistics.median(ratios)


def model_costs(model: nn.Module, latency: bool = False, threads: int | None = 1, repeats: int = 20, passes: int = LATENCY_PASSES) -> dict:
    """Params, MACs, FLOPs and (optionally) batch-1 / batch-64 latency in ms.

    Latency is the median of ``passes`` passes of :func:`host_latency_ms`,
    batch 1 and batch 64 alternating, so the batch-1 passes lie about half a
    second apart: on a shared host a slow second or two moves one or two
    passes, not the reported value (on the 2-core benchmark VM single timings
    of one model varied by +-12%, at times by 35%; with 3 passes, one
    batch-64 sub-network still timed 21% slower than the same architecture
    a few minutes earlier).
    """
    out = {"params": count_params(model), "macs": count_macs(model)}
    out["flops"] = 2 * out["macs"]
    if latency:
        runs = [{f"b{b}": host_latency_ms(model, b, threads, repeats) for b in (1, 64)} for _ in range(max(1, passes))]
        out["latency_ms"] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return out


def timing_input(*shape: int) -> torch.Tensor:
    """A random input of ``shape`` for latency measurements, drawn from a generator of its own (seed 0): timing
    leaves torch's global RNG, and so whatever a seeded run draws after it, untouched."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def latency_side_by_side(
    models: dict[str, nn.Module],
    batch_size: int = 1,
    threads: int | None = 1,
    warmup: int = 3,
    repeats: int = 15,
) -> dict[str, float]:
    """Median forward latency (ms) of several models' deployment forms, measured round-robin.

    Interleaving makes the ratios robust to other load on the machine: every
    model sees the same conditions. Returns ``{name: median ms}``.
    """
    x = timing_input(batch_size, *EXAMPLE_INPUT_SHAPE[1:])
    models = {n: deployment_form(m) for n, m in models.items()}
    times: dict[str, list[float]] = {n: [] for n in models}
    with torch_threads(threads):
        for _ in range(warmup):
            for m in models.values():
                m(x)
        for _ in range(repeats):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(x)
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {n: statistics.median(t) for n, t in times.items()}


def process_tree_rss(root: int) -> tuple[int, int, int]:
    """Resident memory from Linux ``/proc``: (RSS of ``root`` in bytes, RSS of ``root`` and all its
    descendants in bytes, number of processes in the tree). Ray workers and Flower client
    processes are children of the driver, so the tree is what a simulation really uses."""
    import os

    page = os.sysconf("SC_PAGE_SIZE")
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/statm") as fh:
                rss[int(entry)] = int(fh.read().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, count, stack = 0, 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        count += 1
        stack.extend(children.get(pid, []))
    return rss.get(root, 0), total, count
