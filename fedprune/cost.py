"""Hardware cost models of pruned sub-networks, computed without extracting them.

A sub-network is described by its *kept counts*: ``{group name: kept channels}``
(or a :class:`~fedprune.masks.StructuredMask`). From the dense model and its
channel groups this module predicts, for any kept counts:

* :class:`AnalyticCostModel` -- exact closed-form counts:
  MACs (multiply-accumulates of one batch-1 forward pass, conv + linear only,
  as :func:`fedprune.metrics.count_macs`), parameters (count, all of them incl.
  BatchNorm, as :func:`fedprune.metrics.count_params`), parameter storage in
  **bytes** at a given bytes-per-parameter, and peak activation memory in
  **bytes** of a batch-1 forward pass (see :func:`measure_peak_activation_bytes`).
* :class:`LatencyLUT` -- measured CPU latency in **milliseconds** per forward
  pass at a batch size, from a per-layer lookup table interpolated bilinearly.
* :class:`CostSpec` / :func:`evaluate_budgets` -- profile budgets
  (``configs/profiles.toml`` ``budgets``) as ``metric <= limit`` constraints.

Which layer dimension follows which channel group (:func:`layer_channels`) is
read off torch-pruning's DependencyGraph, the same graph that
:func:`fedprune.masks.extract_submodel` prunes with, so the formulas match
the extracted models exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from fedprune.config import BUDGET_KEYS
from fedprune.groups import EXAMPLE_INPUT_SHAPE, ChannelGroups, build_dependency_graph, discover_groups, root_handler
from fedprune.masks import StructuredMask, extract_submodel
from fedprune.metrics import median_host_latency_ms, relative_host_latency, timing_input, torch_threads
from fedprune.reporting import atomic_write_bytes

log = logging.getLogger(__name__)

__all__ = [
    "LayerDims",
    "layer_channels",
    "AnalyticCostModel",
    "measure_peak_activation_bytes",
    "LayerTable",
    "LatencyLUT",
    "LatencyCalibration",
    "calibration_widths",
    "DEFAULT_LUT_GRID",
    "lut_cache_dir",
    "CostSpec",
    "BUDGET_KEYS",
    "parse_budgets",
    "evaluate_budgets",
    "budget_constraints",
    "device_factor",
    "latency_batch",
    "HardwareModel",
]

Kept = Mapping[str, int]

_OUT = "prune_out_channels"
_IN = "prune_in_channels"


def kept_counts(kept: Kept | StructuredMask) -> Kept:
    """``{group: kept channels}`` from counts or a :class:`StructuredMask`."""
    return kept.kept_counts if isinstance(kept, StructuredMask) else kept


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def _example_input(model: nn.Module, batch_size: int = 1) -> torch.Tensor:
    param = next(model.parameters())
    return torch.zeros((batch_size, *EXAMPLE_INPUT_SHAPE[1:]), dtype=param.dtype, device=param.device)


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Tensors in ``obj`` (a tensor or nested tuples/lists/dicts), in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, Mapping):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


# ===================================================================== layers
@dataclass(frozen=True)
class LayerDims:
    """How one Conv2d/Linear layer's size depends on the kept channel counts.

    Attributes:
        name: module name.
        kind: ``"conv"`` or ``"linear"``.
        in_group: channel group that the layer's input channels follow, or
            None when the input dimension is not prunable (the image input).
        out_group: channel group of the output channels, or None (classifier).
        in_dense: dense ``in_channels`` / ``in_features``.
        out_dense: dense ``out_channels`` / ``out_features``.
        in_mult: input units per kept channel of ``in_group`` (4 for a Linear
            after flattening a C x 2 x 2 map; 1 otherwise).
        kernel_elems: kernel height x width (1 for Linear).
        out_hw: output positions per sample (H x W of a conv's output; 1 for
            a Linear on ``(B, F)`` input), from a traced dense forward pass.
        groups_conv: the dense conv's ``groups`` (1 for Linear).
        depthwise: depthwise conv: in = out = groups, all following ``out_group``.
        bias: whether the layer has a bias.
        in_shape: dense per-sample input shape (no batch dim), for latency tables.
    """

    name: str
    kind: str
    in_group: str | None
    out_group: str | None
    in_dense: int
    out_dense: int
    in_mult: int
    kernel_elems: int
    out_hw: int
    groups_conv: int
    depthwise: bool
    bias: bool
    in_shape: tuple[int, ...]

    @property
    def prunable(self) -> bool:
        """True when at least one dimension follows a channel group."""
        return self.in_group is not None or self.out_group is not None

    @property
    def axes(self) -> tuple[str, ...]:
        """Distinct channel groups the layer's size depends on (0, 1 or 2)."""
        return tuple(dict.fromkeys(g for g in (self.in_group, self.out_group) if g is not None))

    def channels(self, kept: Kept) -> tuple[int, int]:
        """``(in, out)`` channels (or features) under ``kept``."""
        c_in = kept[self.in_group] * self.in_mult if self.in_group is not None else self.in_dense
        c_out = kept[self.out_group] if self.out_group is not None else self.out_dense
        return c_in, c_out

    def _in_per_group(self, c_in: int) -> int:
        return 1 if self.depthwise else c_in // self.groups_conv

    def macs(self, kept: Kept) -> int:
        """Multiply-accumulates of one batch-1 forward pass (bias adds not counted)."""
        c_in, c_out = self.channels(kept)
        return self.out_hw * c_out * self._in_per_group(c_in) * self.kernel_elems

    def params(self, kept: Kept) -> int:
        """Number of parameters (weight + bias)."""
        c_in, c_out = self.channels(kept)
        return c_out * self._in_per_group(c_in) * self.kernel_elems + (c_out if self.bias else 0)


def _dense_layer_shapes(model: nn.Module) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """``{layer: (input shape, output shape)}`` of every Conv2d/Linear, one batch-1 forward pass (hooks)."""
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            def hook(mod, inputs, output, name=name):
                shapes.setdefault(name, (tuple(inputs[0].shape), tuple(output.shape)))
            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(_example_input(model))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes


def _group_dims(model: nn.Module, groups: ChannelGroups) -> tuple[dict[str, str], dict[str, tuple[str, int]], dict[str, str]]:
    """From the DependencyGraph: layer -> out group, layer -> (in group, idx multiplier), other module -> group."""
    names = {m: n for n, m in model.named_modules()}
    graph = build_dependency_graph(model)
    out_of: dict[str, str] = {}
    in_of: dict[str, tuple[str, int]] = {}
    other_of: dict[str, str] = {}

    def claim(table: dict, key: str, value, what: str) -> None:
        if key in table and table[key] != value:
            raise ValueError(f"{what} of {key!r} belongs to two channel groups: {table[key]} and {value}")
        table[key] = value

    for g in groups:
        root = model.get_submodule(g.name)
        group = graph.get_pruning_group(root, root_handler(root), idxs=[0])
        for item in group.items:
            module = item.dep.target.module
            name = names.get(module)
            handler = getattr(item.dep.handler, "__name__", "")
            if name is None or handler not in (_OUT, _IN):
                continue
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                if handler == _OUT or _is_depthwise(module):
                    claim(out_of, name, g.name, "output channels")
                if handler == _IN or _is_depthwise(module):
                    claim(in_of, name, (g.name, len(item.idxs)), "input channels")
            elif handler == _OUT and any(True for _ in module.parameters(recurse=False)):
                claim(other_of, name, g.name, "channels")
    return out_of, in_of, other_of


def layer_channels(model: nn.Module, groups: ChannelGroups) -> dict[str, LayerDims]:
    """Every Conv2d/Linear layer of ``model`` (in module order) with its :class:`LayerDims`.

    Group membership comes from torch-pruning's DependencyGraph: for each
    group, the pruning group of one root channel lists the layers whose
    output channels (``prune_out_channels``) or input channels
    (``prune_in_channels``) it removes; depthwise convs follow the group in
    both dimensions. Spatial sizes come from one batch-1 dense forward pass.
    """
    return _layer_channels(model, groups, _group_dims(model, groups))


def _layer_channels(model: nn.Module, groups: ChannelGroups, group_dims: tuple[dict, dict, dict]) -> dict[str, LayerDims]:
    out_of, in_of, _ = group_dims
    shapes = _dense_layer_shapes(model)
    layers: dict[str, LayerDims] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or name not in shapes:
            continue  # never called in forward: no cost
        in_shape, out_shape = shapes[name]
        conv = isinstance(module, nn.Conv2d)
        in_dense = module.in_channels if conv else module.in_features
        out_dense = module.out_channels if conv else module.out_features
        in_group, idx_mult = in_of.get(name, (None, 1))
        out_group = out_of.get(name)
        in_mult = 1
        if in_group is not None:
            size = groups[in_group].size
            in_mult = in_dense // size
            if in_mult * size != in_dense or (not _is_depthwise(module) and in_mult != idx_mult):
                raise NotImplementedError(
                    f"layer {name!r}: input of {in_dense} is not a whole multiple of group {in_group!r} ({size} channels); "
                    "partial couplings (e.g. concatenation) are not supported"
                )
        depthwise = _is_depthwise(module)
        groups_conv = module.groups if conv else 1
        if depthwise and module.out_channels != module.in_channels:
            raise NotImplementedError(f"layer {name!r}: depthwise conv with a channel multiplier is not supported")
        if conv and groups_conv > 1 and not depthwise and (in_group or out_group):
            raise NotImplementedError(f"layer {name!r}: pruning grouped (non-depthwise) convs is not supported")
        out_hw = math.prod(out_shape) // (out_shape[0] * out_dense) if conv else math.prod(out_shape[1:-1])
        layers[name] = LayerDims(
            name=name,
            kind="conv" if conv else "linear",
            in_group=in_group,
            out_group=out_group,
            in_dense=in_dense,
            out_dense=out_dense,
            in_mult=in_mult,
            kernel_elems=math.prod(module.kernel_size) if conv else 1,
            out_hw=out_hw,
            groups_conv=groups_conv,
            depthwise=depthwise,
            bias=module.bias is not None,
            in_shape=tuple(in_shape[1:]),
        )
    return layers


# ============================================================ activations
def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


@torch.no_grad()
def measure_peak_activation_bytes(model: nn.Module, dtype_bytes: int = 1, input_shape: tuple[int, ...] = EXAMPLE_INPUT_SHAPE) -> int:
    """Peak activation memory (bytes) of one forward pass, measured with hooks.

    Every leaf module (one without children) is hooked; a call's footprint is
    the number of elements of its positional tensor inputs plus its tensor
    outputs. The result is the largest footprint x ``dtype_bytes`` (1 for
    int8): the largest live input+output pair of any layer, the MCUNet-style
    SRAM estimate. Operations outside modules (residual additions) are not
    counted separately. ``input_shape`` includes the batch size (default 1).
    BatchNorm and activation modules count as layers, so a deployment that fuses
    them into the conv needs less; a residual block's skip tensor, live across
    the block, is not counted, so a residual network needs more (README).
    """
    peak = 0
    handles = []

    def hook(module, inputs, output) -> None:
        nonlocal peak
        peak = max(peak, sum(t.numel() for t in _tensors(inputs)) + sum(t.numel() for t in _tensors(output)))

    for module in model.modules():
        if _is_leaf(module):
            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        model(torch.zeros(input_shape, dtype=param.dtype, device=param.device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return peak * dtype_bytes


class _LeafTracer(fx.Tracer):
    """fx tracer whose leaves are exactly the modules without children (what the hooks see)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _is_leaf(m)


@dataclass(frozen=True)
class _Footprint:
    """Elements of one leaf call's inputs + outputs: ``const + sum(unit * kept[group])``."""

    module: str
    const: int
    per_group: tuple[tuple[str, int], ...]

    def elements(self, kept: Kept) -> int:
        return self.const + sum(unit * kept[g] for g, unit in self.per_group)


class _ChannelTagger(fx.Interpreter):
    """Runs the dense model once, tagging every tensor with the channel group of its dim 1.

    Conv/Linear outputs take their layer's ``out_group`` (from the
    DependencyGraph); every other module or operation preserves its inputs'
    group (BN, activations, pooling, flatten, residual add). A tagged
    tensor's element count is proportional to its group's kept count.
    """

    def __init__(self, gm: fx.GraphModule, layers: Mapping[str, LayerDims], sizes: Mapping[str, int]):
        super().__init__(gm)
        self.layers, self.sizes = layers, sizes
        self.tags: dict[fx.Node, str | None] = {}
        self.footprints: list[_Footprint] = []

    def _input_tag(self, node: fx.Node) -> str | None:
        tags = {self.tags.get(n) for n in node.all_input_nodes if isinstance(self.env.get(n), torch.Tensor)} - {None}
        if len(tags) > 1:
            raise NotImplementedError(f"operation {node.format_node()} combines channel groups {sorted(tags)}")
        return next(iter(tags), None)

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        tag = self._input_tag(n) if n.op in ("call_module", "call_function", "call_method") else None
        if n.op == "call_module":
            dims = self.layers.get(n.target)
            if dims is not None:
                if tag != dims.in_group:
                    raise RuntimeError(f"layer {n.target!r}: traced input group {tag!r} != DependencyGraph input group {dims.in_group!r}")
                tag = dims.out_group
            in_nodes: list[fx.Node] = []
            fx.node.map_arg(n.args, in_nodes.append)
            terms = [(self.tags.get(a), self.env[a]) for a in in_nodes]
            terms = [(g, t.numel()) for g, v in terms for t in _tensors(v)]
            terms += [(tag, t.numel()) for t in _tensors(result)]
            self.footprints.append(self._footprint(n.target, terms))
        self.tags[n] = tag
        return result

    def _footprint(self, where: str, terms: Iterable[tuple[str | None, int]]) -> _Footprint:
        const, per_group = 0, {}
        for g, numel in terms:
            if g is None:
                const += numel
                continue
            unit, rest = divmod(numel, self.sizes[g])
            if rest:
                raise NotImplementedError(f"{where!r}: a tensor of {numel} elements is not proportional to group {g!r}")
            per_group[g] = per_group.get(g, 0) + unit
        return _Footprint(where, const, tuple(per_group.items()))


def _activation_footprints(model: nn.Module, groups: ChannelGroups, layers: Mapping[str, LayerDims]) -> list[_Footprint]:
    tracer = _LeafTracer()
    try:
        gm = fx.GraphModule(model, tracer.trace(model))
    except Exception as exc:  # pragma: no cover - depends on the architecture
        raise NotImplementedError(f"peak activation needs a torch.fx-traceable model: {exc}") from exc
    tagger = _ChannelTagger(gm, layers, groups.sizes)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            tagger.run(_example_input(model))
    finally:
        model.train(was_training)
    return tagger.footprints


# ================================================================ analytic
class AnalyticCostModel:
    """Closed-form MACs, parameters, parameter bytes and peak activation bytes of sub-networks.

    Built once from the dense ``model`` and its ``groups``; every method takes
    kept counts ``{group: channels}`` (or a StructuredMask) and never extracts
    a model. Results equal :func:`fedprune.metrics.count_macs` /
    :func:`~fedprune.metrics.count_params` / :func:`measure_peak_activation_bytes`
    of ``extract_submodel(model, mask, groups)``.
    """

    def __init__(self, model: nn.Module, groups: ChannelGroups):
        self.groups = groups
        group_dims = _group_dims(model, groups)
        self.layers = _layer_channels(model, groups, group_dims)
        other_of = group_dims[2]
        self._fixed_params = 0
        self._channel_params: dict[str, int] = {}  # group -> params per kept channel (BN etc.)
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                continue
            numel = sum(p.numel() for p in module.parameters(recurse=False))
            if not numel:
                continue
            g = other_of.get(name)
            if g is None:
                self._fixed_params += numel
            else:
                unit, rest = divmod(numel, groups[g].size)
                if rest:
                    raise NotImplementedError(f"module {name!r}: {numel} parameters are not per-channel for group {g!r}")
                self._channel_params[g] = self._channel_params.get(g, 0) + unit
        self._layer_list = list(self.layers.values())
        self._trace_error: Exception | None = None
        self._footprint_list: list[_Footprint] = []
        try:
            self._footprint_list = _activation_footprints(model, groups, self.layers)
        except NotImplementedError as exc:  # MACs and params still work
            self._trace_error = exc

    @property
    def _footprints(self) -> list[_Footprint]:
        if self._trace_error is not None:
            raise self._trace_error
        return self._footprint_list

    def _kept(self, kept: Kept | StructuredMask) -> Kept:
        kept = kept_counts(kept)
        missing = [n for n in self.groups.names if n not in kept]
        if missing:
            raise KeyError(f"kept counts miss groups {missing}")
        return {n: int(c) for n, c in kept.items()}  # Python ints: numpy int32 counts would overflow in MACs

    @property
    def dense(self) -> dict[str, int]:
        """Kept counts of the dense model."""
        return self.groups.sizes

    def macs(self, kept: Kept | StructuredMask) -> int:
        """Multiply-accumulates (count) of one batch-1 forward pass: conv + linear layers only."""
        kept = self._kept(kept)
        return sum(layer.macs(kept) for layer in self._layer_list)

    def params(self, kept: Kept | StructuredMask) -> int:
        """Number of parameters (count), BatchNorm affine parameters included."""
        kept = self._kept(kept)
        total = self._fixed_params + sum(layer.params(kept) for layer in self._layer_list)
        return total + sum(unit * kept[g] for g, unit in self._channel_params.items())

    def param_bytes(self, kept: Kept | StructuredMask, dtype_bytes: int = 4) -> int:
        """Parameter storage in bytes: ``params x dtype_bytes`` (4 = fp32, 1 = int8 flash)."""
        return self.params(kept) * dtype_bytes

    def peak_activation_bytes(self, kept: Kept | StructuredMask, dtype_bytes: int = 1) -> int:
        """Peak activation memory in bytes of a batch-1 forward pass (1 byte per element = int8).

        Largest (input + output elements) of any leaf-module call x
        ``dtype_bytes``; same definition as :func:`measure_peak_activation_bytes`.
        """
        return max(self.activation_footprints_bytes(kept, dtype_bytes))

    def activation_footprints_bytes(self, kept: Kept | StructuredMask, dtype_bytes: int = 1) -> list[int]:
        """(input + output elements) x ``dtype_bytes`` of every leaf-module call, in execution order (bytes)."""
        kept = self._kept(kept)
        return [f.elements(kept) * dtype_bytes for f in self._footprints]

    def non_layer_elements(self) -> tuple[int, dict[str, int]]:
        """Summed (input + output) elements of every leaf call that is not a Conv2d/Linear
        (BN, activations, pooling, ...), as the linear form ``(const, {group: per kept channel})``."""
        const, per_group = 0, {}
        for f in self._footprints:
            if f.module in self.layers:
                continue
            const += f.const
            for g, unit in f.per_group:
                per_group[g] = per_group.get(g, 0) + unit
        return const, per_group

    def peak_activation_cost_fn(self, dtype_bytes: int = 1) -> CostFn:
        """:meth:`peak_activation_bytes` as a max-type cost function for the budget allocator.

        It also exposes ``parts(kept)`` (the per-call footprints), which lets
        :func:`fedprune.allocation.budget_allocate` see that shrinking any of
        several tied largest layers helps.
        """
        return _MetricFn(
            f"peak_activation_bytes(dtype_bytes={dtype_bytes})",
            lambda k: self.peak_activation_bytes(k, dtype_bytes),
            parts=lambda k: self.activation_footprints_bytes(k, dtype_bytes),
        )


# ================================================================= latency
#: Kept fractions of each prunable layer dimension measured by :class:`LatencyLUT`.
DEFAULT_LUT_GRID: tuple[float, ...] = (0.125, 0.25, 0.5, 0.75, 1.0)

_LUT_FORMAT = 3


def lut_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of cached latency tables: ``cache_dir`` if given, else
    ``$FEDPRUNE_CACHE_DIR/lut``, else ``~/.cache/fedprune/lut``."""
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("FEDPRUNE_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "fedprune") / "lut"


def host_id() -> str:
    """Identifies the machine a latency table was measured on."""
    return f"{platform.node()}|{platform.processor()}|{os.cpu_count()}"


def _grid_counts(size: int, grid: Sequence[float]) -> tuple[int, ...]:
    """Distinct kept counts for the grid fractions of a ``size``-channel group (ascending, >= 1)."""
    return tuple(sorted({max(1, min(size, int(round(f * size)))) for f in grid}))


def _interp_weights(axis: Sequence[int], value: float) -> list[tuple[int, float]]:
    """Linear interpolation weights on a sorted axis; clamps outside the measured range."""
    if len(axis) == 1 or value <= axis[0]:
        return [(0, 1.0)]
    if value >= axis[-1]:
        return [(len(axis) - 1, 1.0)]
    hi = int(np.searchsorted(axis, value, side="right"))
    lo = hi - 1
    t = (value - axis[lo]) / (axis[hi] - axis[lo])
    return [(lo, 1.0 - t), (hi, t)]


@dataclass(frozen=True)
class LayerTable:
    """Measured latency (ms) of one layer on a grid of kept counts.

    ``axes`` are the channel groups the layer depends on (1 or 2),
    ``points[i]`` the kept counts measured along axis ``i`` (ascending) and
    ``ms`` an array of shape ``[len(p) for p in points]``.
    """

    name: str
    axes: tuple[str, ...]
    points: tuple[tuple[int, ...], ...]
    ms: np.ndarray

    def predict_ms(self, kept: Kept) -> float:
        """(Bi)linear interpolation in kept counts; constant beyond the measured range."""
        value = 0.0
        weights = [_interp_weights(p, kept[g]) for g, p in zip(self.axes, self.points)]
        for combo in np.ndindex(*(len(w) for w in weights)):
            idx = tuple(weights[a][c][0] for a, c in enumerate(combo))
            w = math.prod(weights[a][c][1] for a, c in enumerate(combo))
            value += w * float(self.ms[idx])
        return value

    def to_json(self) -> dict:
        return {"name": self.name, "axes": list(self.axes), "points": [list(p) for p in self.points], "ms": np.asarray(self.ms).tolist()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "LayerTable":
        return cls(d["name"], tuple(d["axes"]), tuple(tuple(int(v) for v in p) for p in d["points"]), np.asarray(d["ms"], dtype=np.float64))


def _standalone_layer(module: nn.Module, dims: LayerDims, kept: Kept, batch_size: int) -> tuple[nn.Module, torch.Tensor]:
    """The layer at ``kept`` in deployment form (eval, bias as after BN folding, channels_last) and an input."""
    c_in, c_out = dims.channels(kept)
    if dims.kind == "conv":
        layer: nn.Module = nn.Conv2d(
            c_in, c_out, module.kernel_size, module.stride, module.padding, module.dilation,
            groups=c_in if dims.depthwise else dims.groups_conv, bias=True, padding_mode=module.padding_mode,
        )
        x = timing_input(batch_size, c_in, *dims.in_shape[1:]).contiguous(memory_format=torch.channels_last)
        layer = layer.to(memory_format=torch.channels_last)
    else:
        layer = nn.Linear(c_in, c_out, bias=True)
        x = timing_input(batch_size, *dims.in_shape[:-1], c_in)
    return layer.eval(), x


@torch.no_grad()
def _measure_layer(module: nn.Module, dims: LayerDims, points: Sequence[Sequence[int]], batch_size: int, warmup: int, repeats: int) -> np.ndarray:
    """Median ms per forward of the layer at every grid point, measured round-robin."""
    combos = list(np.ndindex(*(len(p) for p in points)))
    cases = []
    for combo in combos:
        kept = {g: points[a][c] for a, (g, c) in enumerate(zip(dims.axes, combo))}
        cases.append(_standalone_layer(module, dims, kept, batch_size))
    for _ in range(warmup):
        for layer, x in cases:
            layer(x)
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(repeats):
        for i, (layer, x) in enumerate(cases):
            t0 = time.perf_counter()
            layer(x)
            times[i].append((time.perf_counter() - t0) * 1e3)
    ms = np.zeros([len(p) for p in points])
    for combo, t in zip(combos, times):
        ms[combo] = statistics.median(t)
    return ms


#: Uniform kept fractions of the whole-model measurements that calibrate a table (with the dense model).
CALIBRATION_FRACTIONS: tuple[float, ...] = (0.75, 0.5, 0.25)
#: Random per-group widths (multiples of 8, seeded) measured as well to calibrate a table.
CALIBRATION_RANDOM_WIDTHS = 4
#: Timed runs of each whole-model measurement of a table (at least), per pass.
WHOLE_MODEL_REPEATS = 30
#: Layer timings at batch sizes below 8 repeat this many times more (their calls are short and noisy).
SMALL_BATCH_REPEAT_FACTOR = 5


def calibration_widths(groups: ChannelGroups, seed: int = 0) -> dict[str, dict[str, int]]:
    """The sub-networks a table is calibrated on: dense, uniform :data:`CALIBRATION_FRACTIONS`
    and :data:`CALIBRATION_RANDOM_WIDTHS` random widths (multiples of 8 as budget allocations keep)."""
    widths = {"dense": dict(groups.sizes)}
    for f in CALIBRATION_FRACTIONS:
        widths[f"uniform {f:g}"] = {g.name: max(1, int(round(f * g.size))) for g in groups}
    rng = np.random.default_rng([0xCA11B, seed])  # a stream of its own: benchmarks draw test widths from seed 0
    for i in range(CALIBRATION_RANDOM_WIDTHS):
        widths[f"random {i}"] = {g.name: min(g.size, 8 * math.ceil(int(rng.integers(1, g.size + 1)) / 8)) for g in groups}
    return widths


@dataclass(frozen=True)
class LatencyCalibration:
    """Maps a table's summed layer latencies to a whole sub-network's latency (ms).

        ms = layer_scale x layers_ms + fixed_ms + ms_per_element x elements(kept)

    ``layers_ms`` is the sum of the interpolated standalone layer timings;
    ``layer_scale`` absorbs what standalone timing misses (cache state and
    call overhead inside the whole model, and drift between the layer and
    whole-model timings); ``elements(kept)`` is the summed input + output
    element count of every non-Conv/Linear leaf call (activations, pooling,
    BN, ...; :meth:`AnalyticCostModel.non_layer_elements`),
    ``elements_const + sum(elements_per_group[g] x kept[g])``; ``fixed_ms``
    is framework overhead. :meth:`fit` keeps every term non-negative.
    """

    layer_scale: float = 1.0
    fixed_ms: float = 0.0
    ms_per_element: float = 0.0
    elements_const: int = 0
    elements_per_group: Mapping[str, int] = None  # type: ignore[assignment]

    def elements(self, kept: Kept) -> int:
        return self.elements_const + sum(u * kept[g] for g, u in (self.elements_per_group or {}).items())

    def predict_ms(self, layers_ms: float, kept: Kept) -> float:
        return self.layer_scale * layers_ms + self.fixed_ms + self.ms_per_element * self.elements(kept)

    @classmethod
    def fit(cls, elements: tuple[int, Mapping[str, int]], points: Sequence[tuple[Kept, float, float]]) -> "LatencyCalibration":
        """Least-squares fit in relative error to ``[(kept, layers_ms, measured_ms), ...]``, all terms >= 0.

        The layer term is always in the model (the tables must keep shaping
        the prediction); every subset of the other two terms is added to it,
        solved unconstrained, and the best fit whose coefficients are all
        non-negative wins (the exact non-negative least-squares solution
        over those models).
        """
        const, per_group = elements
        base = cls(0.0, 0.0, 0.0, int(const), dict(per_group))
        if not points or any(m <= 0 for _, _, m in points):
            raise ValueError(f"calibration needs positive measured latencies, got {[m for _, _, m in points]}")
        y = np.array([m for _, _, m in points], dtype=np.float64)
        x = np.array([[layers, base.elements(kept), 1.0] for kept, layers, _ in points], dtype=np.float64) / y[:, None]
        norms = np.linalg.norm(x, axis=0)
        norms[norms == 0] = 1.0
        x = x / norms  # comparable column scales (elements are ~1e5 x larger than ms)
        best: tuple[float, np.ndarray] | None = None
        for cols in ((0,), (0, 1), (0, 2), (0, 1, 2)):
            coef = np.linalg.lstsq(x[:, cols], np.ones(len(y)), rcond=None)[0]
            if (coef < 0).any():
                continue
            residual = float(((x[:, cols] @ coef - 1.0) ** 2).sum())
            if best is None or residual < best[0] - 1e-15:
                full = np.zeros(3)
                full[list(cols)] = coef
                best = (residual, full)
        # The layer term alone always fits with a coefficient >= 0 (positive data).
        scale, per_element, fixed = (float(v) for v in best[1] / norms)  # type: ignore[index]
        return cls(scale, fixed, per_element, int(const), dict(per_group))

    def to_json(self) -> dict:
        return {"layer_scale": self.layer_scale, "fixed_ms": self.fixed_ms, "ms_per_element": self.ms_per_element,
                "elements_const": self.elements_const, "elements_per_group": dict(self.elements_per_group or {})}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "LatencyCalibration":
        return cls(float(d["layer_scale"]), float(d["fixed_ms"]), float(d["ms_per_element"]), int(d["elements_const"]),
                   {k: int(v) for k, v in d["elements_per_group"].items()})


class LatencyLUT:
    """Per-layer latency lookup table predicting a sub-network's CPU latency (ms per forward pass).

    Each prunable Conv2d/Linear layer is measured alone in deployment form
    (eval, biased as after BN folding, channels_last input) at batch size
    ``batch_size`` with ``threads`` torch threads, on a grid of kept
    fractions of each prunable dimension (a 1-D grid for layers depending on
    one group, e.g. depthwise convs). A prediction is

        calibration(sum over prunable layers of the (bi)linearly interpolated layer ms, kept)

    (:class:`LatencyCalibration`): a scale on the layer sum plus the *rest*,
    everything the tables leave out (activations, pooling, framework
    overhead), part fixed and part proportional to the non-layer activation
    elements, which shrink with the channels. By default (``calibrate=True``)
    it is fitted (relative least squares, non-negative terms) to whole-model
    timings of the sub-networks of :func:`calibration_widths` (dense, uniform
    75/50/25% and four random widths), each timed alone as runs time a sub-network
    (:func:`fedprune.metrics.host_latency_ms`; median of 3 passes, where runs report 5). Fitting
    to several whole models right after the layers were timed keeps the
    table honest when the host's speed drifts between the layer and the
    whole-model timings: on the 2-core benchmark VM a table calibrated on
    the dense model and one pruned model alone over-predicted every pruned
    width by 20-30% in two of three builds at batch 64. With
    ``calibrate=False`` the layer sum is used as is plus the constant
    ``dense_ms - layers_ms(dense)``. ``dense_ms`` is
    the dense model's measured latency. Kept counts below the smallest grid
    point use the smallest point's measurement (a conservative over-estimate).
    """

    def __init__(self, key: Mapping[str, Any], tables: Mapping[str, LayerTable], calibration: LatencyCalibration | float, dense_ms: float):
        self.key = dict(key)
        self.tables = dict(tables)
        self.calibration = calibration if isinstance(calibration, LatencyCalibration) else LatencyCalibration(1.0, float(calibration))
        self.dense_ms = float(dense_ms)
        self.from_cache = False

    @property
    def batch_size(self) -> int | None:
        return self.key.get("batch_size")

    def layers_ms(self, kept: Kept | StructuredMask) -> float:
        """Sum of the interpolated standalone layer latencies (ms), before calibration."""
        kept = kept_counts(kept)
        return sum(t.predict_ms(kept) for t in self.tables.values())

    def predict_ms(self, kept: Kept | StructuredMask) -> float:
        """Predicted latency in ms per forward pass for ``kept`` channel counts."""
        kept = kept_counts(kept)
        return self.calibration.predict_ms(self.layers_ms(kept), kept)

    # ------------------------------------------------------------ building
    @classmethod
    def measure(
        cls,
        model: nn.Module,
        groups: ChannelGroups | None = None,
        batch_size: int = 1,
        threads: int | None = 1,
        grid: Sequence[float] = DEFAULT_LUT_GRID,
        repeats: int = 10,
        warmup: int = 3,
        key: Mapping[str, Any] | None = None,
        calibrate: bool = True,
    ) -> "LatencyLUT":
        """Measure a table for ``model`` now (no cache); ``model`` itself is left as it was (it is timed in eval mode)."""
        if not grid or any(not 0.0 < f <= 1.0 for f in grid):
            raise ValueError(f"grid fractions must be in (0, 1], got {list(grid)}")
        was_training = model.training
        try:
            with torch.random.fork_rng(devices=[]):  # the stand-alone layers it times are initialised from the RNG
                return cls._measure(model.eval(), groups, batch_size, threads, grid, repeats, warmup, key, calibrate)
        finally:
            model.train(was_training)

    @classmethod
    def _measure(cls, model, groups, batch_size, threads, grid, repeats, warmup, key, calibrate) -> "LatencyLUT":
        groups = groups if groups is not None else discover_groups(model)
        analytic = AnalyticCostModel(model, groups)
        tables: dict[str, LayerTable] = {}
        # Batch-1 layer calls take tens of microseconds: time them more often than large batches.
        layer_repeats = repeats * (SMALL_BATCH_REPEAT_FACTOR if batch_size < 8 else 1)
        with torch_threads(threads):
            for name, dims in analytic.layers.items():
                if not dims.prunable:
                    continue
                points = tuple(_grid_counts(groups[g].size, grid) for g in dims.axes)
                ms = _measure_layer(model.get_submodule(name), dims, points, batch_size, warmup, layer_repeats)
                tables[name] = LayerTable(name, dims.axes, points, ms)
        key = dict(key) if key is not None else {"batch_size": batch_size, "threads": threads}
        lut = cls(key, tables, 0.0, 0.0)
        widths = calibration_widths(groups) if calibrate else {"dense": dict(groups.sizes)}
        first_k = {n: StructuredMask.prefix(groups, kept) for n, kept in widths.items()}
        models = {n: model if n == "dense" else extract_submodel(model, mask, groups) for n, mask in first_k.items()}
        # Whole models are timed alone as runs time a sub-network (host_latency_ms), median of 3 passes.
        measured = median_host_latency_ms(models, batch_size, threads, max(repeats, WHOLE_MODEL_REPEATS))
        if calibrate:
            points = [(kept, lut.layers_ms(kept), measured[n]) for n, kept in widths.items()]
            lut.calibration = LatencyCalibration.fit(analytic.non_layer_elements(), points)
        else:
            lut.calibration = LatencyCalibration(1.0, measured["dense"] - lut.layers_ms(groups.sizes))
        lut.dense_ms = measured["dense"]
        return lut

    @staticmethod
    def cache_key(
        model_name: str,
        model_kwargs: Mapping[str, Any] | None,
        batch_size: int,
        threads: int | None,
        grid: Sequence[float],
        calibrate: bool = True,
    ) -> dict[str, Any]:
        """Everything a cached table must match to be reused."""
        return {
            "format": _LUT_FORMAT,
            "model": model_name,
            "model_kwargs": {k: (model_kwargs or {})[k] for k in sorted(model_kwargs or {})},
            "host": host_id(),
            "torch": torch.__version__,
            "batch_size": int(batch_size),
            "threads": threads,
            "grid": [float(f) for f in grid],
            "calibrate": bool(calibrate),
        }

    @staticmethod
    def cache_path(key: Mapping[str, Any], cache_dir: str | os.PathLike | None = None) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return lut_cache_dir(cache_dir) / f"{key['model']}-b{key['batch_size']}-t{key['threads']}-{digest}.json"

    @classmethod
    def build(
        cls,
        model_name: str,
        model_kwargs: Mapping[str, Any] | None = None,
        batch_size: int = 1,
        threads: int | None = 1,
        grid: Sequence[float] = DEFAULT_LUT_GRID,
        repeats: int = 10,
        warmup: int = 3,
        cache_dir: str | os.PathLike | None = None,
        calibrate: bool = True,
    ) -> "LatencyLUT":
        """Load the cached table for this key or measure and cache it (JSON, written atomically).

        The key is model name + kwargs, host, torch version, batch size,
        threads, grid and ``calibrate`` (:meth:`cache_key`); a cached
        file whose stored key differs, or that cannot be read, is rebuilt and
        overwritten. Without ``cache_dir``: ``$FEDPRUNE_CACHE_DIR/lut`` or
        ``~/.cache/fedprune/lut``. The model is built with ``torch.manual_seed(0)``
        (latency does not depend on the weights).
        """
        from fedprune.models import get_model

        key = cls.cache_key(model_name, model_kwargs, batch_size, threads, grid, calibrate)
        path = cls.cache_path(key, cache_dir)
        cached = cls.load(path)
        if cached is not None and cached.key == key:
            cached.from_cache = True
            return cached
        if cached is not None:
            log.info("latency table %s has a different key; rebuilding", path)
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream stays as it was
            torch.manual_seed(0)
            model = get_model(model_name, **dict(model_kwargs or {}))
        lut = cls.measure(model, discover_groups(model), batch_size, threads, grid, repeats, warmup, key=key, calibrate=calibrate)
        lut.save(path)
        return lut

    # ------------------------------------------------------------- storage
    def to_json(self) -> dict:
        return {"key": self.key, "dense_ms": self.dense_ms, "calibration": self.calibration.to_json(), "tables": [t.to_json() for t in self.tables.values()]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "LatencyLUT":
        tables = [LayerTable.from_json(t) for t in d["tables"]]
        return cls(d["key"], {t.name: t for t in tables}, LatencyCalibration.from_json(d["calibration"]), d["dense_ms"])

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_bytes(path, (json.dumps(self.to_json(), indent=1) + "\n").encode())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyLUT | None":
        """The table stored at ``path``, or None when missing or unreadable."""
        path = Path(path)
        if not path.is_file():
            return None
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable latency table %s: %s", path, exc)
            return None


# ================================================================= budgets
CostFn = Callable[[Kept], float]


class _MetricFn:
    """A named cost function ``kept -> value`` (readable in error messages).

    With ``parts``, the cost is max-type (``max(parts(kept))``) and the
    budget allocator uses the parts (see :mod:`fedprune.allocation`).
    """

    def __init__(self, name: str, fn: CostFn, parts: Callable[[Kept], Sequence[float]] | None = None):
        self.__name__ = name
        self._fn = fn
        if parts is not None:
            self.parts = parts

    def __call__(self, kept: Kept) -> float:
        return self._fn(kept)

    def __repr__(self) -> str:
        return self.__name__


@dataclass(frozen=True)
class CostSpec:
    """One budget: ``metric(kept) <= limit`` (units in :data:`BUDGET_KEYS`)."""

    key: str
    limit: float

    def __post_init__(self) -> None:
        if self.key not in BUDGET_KEYS:
            raise ValueError(f"unknown budget key {self.key!r}; allowed: {sorted(BUDGET_KEYS)}")
        if isinstance(self.limit, bool) or not isinstance(self.limit, (int, float)) or not self.limit > 0:
            raise ValueError(f"budget {self.key!r} must be a positive number, got {self.limit!r}")

    @property
    def unit(self) -> str:
        return BUDGET_KEYS[self.key]

    @property
    def batch_size(self) -> int | None:
        """Batch size of a latency budget (None for the others)."""
        return latency_batch(self.key)

    def cost_fn(self, analytic: AnalyticCostModel, luts: Mapping[int, LatencyLUT] | None = None) -> CostFn:
        """``kept -> predicted value`` of this budget's metric."""
        if self.key == "flash_bytes_int8":
            fn: CostFn = lambda k: analytic.param_bytes(k, dtype_bytes=1)  # noqa: E731
        elif self.key == "peak_sram_bytes_int8":
            peak = analytic.peak_activation_cost_fn(dtype_bytes=1)
            return _MetricFn(self.key, peak, parts=peak.parts)
        elif self.key == "macs":
            fn = analytic.macs
        elif self.key == "params":
            fn = analytic.params
        else:
            batch = self.batch_size
            lut = (luts or {}).get(batch)
            if lut is None:
                raise ValueError(f"budget {self.key!r} needs a latency table for batch size {batch}; have {sorted(luts or {})}")
            fn = lut.predict_ms
        return _MetricFn(self.key, fn)

    def evaluate(self, kept: Kept | StructuredMask, analytic: AnalyticCostModel, luts: Mapping[int, LatencyLUT] | None = None) -> dict[str, Any]:
        """``{"limit", "predicted", "ok"}`` for ``kept``."""
        predicted = self.cost_fn(analytic, luts)(kept_counts(kept))
        return {"limit": self.limit, "predicted": predicted, "ok": bool(predicted <= self.limit)}


def parse_budgets(budgets: Mapping[str, float]) -> list[CostSpec]:
    """Validate a profile's ``budgets`` table into :class:`CostSpec` s (ValueError on unknown keys)."""
    return [CostSpec(k, v) for k, v in budgets.items()]


def evaluate_budgets(
    budgets: Mapping[str, float],
    kept: Kept | StructuredMask,
    analytic: AnalyticCostModel,
    luts: Mapping[int, LatencyLUT] | None = None,
) -> dict[str, dict[str, Any]]:
    """Each budget's ``{"limit", "predicted", "ok"}`` for ``kept``; ``luts`` maps batch size -> table."""
    return {spec.key: spec.evaluate(kept, analytic, luts) for spec in parse_budgets(budgets)}


def budget_constraints(
    budgets: Mapping[str, float],
    analytic: AnalyticCostModel,
    luts: Mapping[int, LatencyLUT] | None = None,
) -> list[tuple[CostFn, float]]:
    """A profile's budgets as ``(cost_fn, limit)`` pairs for :func:`fedprune.allocation.nested_budget_masks`."""
    return [(spec.cost_fn(analytic, luts), float(spec.limit)) for spec in parse_budgets(budgets)]


# ====================================================== host -> device, report
def latency_batch(key: str) -> int | None:
    """The batch size of latency budget key ``key`` (``latency_ms_b<N>``), or None for the other budget keys."""
    return int(key.rsplit("_b", 1)[1]) if key.startswith("latency_ms_b") else None


def device_factor(key: str, compute_speed: float) -> float:
    """Factor from a host value of budget metric ``key`` to the device's estimate.

    Latencies are measured on this host and divided by the profile's
    ``compute_speed`` (the device's speed relative to the host: 0.5 = twice
    as slow, so 1 host ms = 2 device ms); counts and bytes (MACs, params,
    flash, SRAM) do not depend on the device, factor 1.
    """
    return 1.0 / compute_speed if latency_batch(key) is not None else 1.0


def _measured_value(key: str, model: nn.Module, host_latency_ms: Mapping[int, float] | None) -> float | None:
    """``key`` measured on an extracted model (host units); latency from ``host_latency_ms`` or None."""
    from fedprune.metrics import count_macs, count_params

    if key == "flash_bytes_int8":
        return float(count_params(model))  # one byte per int8 parameter
    if key == "params":
        return float(count_params(model))
    if key == "macs":
        return float(count_macs(model))
    if key == "peak_sram_bytes_int8":
        return float(measure_peak_activation_bytes(model, dtype_bytes=1))
    batch = int(key.rsplit("_b", 1)[1])
    return None if host_latency_ms is None or batch not in host_latency_ms else float(host_latency_ms[batch])


def _correction_key(spec: CostSpec, compute_speed: float) -> tuple[str, float, float]:
    return (spec.key, float(spec.limit), float(compute_speed))


class HardwareModel:
    """Cost models of one architecture for profile budgets: analytic counts + latency tables.

    ``analytic`` is an :class:`AnalyticCostModel`; latency tables
    (:class:`LatencyLUT`, one per batch size a budget needs) are built on
    first use and cached on disk. Budgets are stated in device units (ms on
    the device, bytes, MACs); latency predictions and measurements are host
    ms scaled by :func:`device_factor`.

    Args:
        model_name, model_kwargs: the registered architecture (LUT cache key).
        model, groups: the dense model and its channel groups.
        threads: torch threads of latency tables and measurements.
        latency_margin: the allocator aims latency budgets at
            ``limit x (1 - latency_margin)`` to absorb the tables' prediction
            error and timing noise; analytic budgets are exact (no margin).
            :meth:`refit_latency` closes the loop: it times the chosen
            sub-network and, where it is too slow or leaves the budget unused,
            corrects later predictions.
        lut_repeats: timed runs per LUT grid point.
        cache_dir: LUT cache (default :func:`lut_cache_dir`).
    """

    def __init__(
        self,
        model_name: str,
        model_kwargs: Mapping[str, Any] | None,
        model: nn.Module,
        groups: ChannelGroups,
        threads: int | None = 1,
        latency_margin: float = 0.1,
        lut_repeats: int = 10,
        cache_dir: str | os.PathLike | None = None,
    ):
        self.model_name, self.model_kwargs = model_name, dict(model_kwargs or {})
        self.groups = groups
        self.analytic = AnalyticCostModel(model, groups)
        self.threads, self.latency_margin, self.lut_repeats, self.cache_dir = threads, latency_margin, lut_repeats, cache_dir
        self.model = model
        self._luts: dict[int, LatencyLUT] = {}
        #: (budget key, limit, compute_speed) -> measured / predicted latency of the last refit (>= 1)
        self.latency_corrections: dict[tuple[str, float, float], float] = {}

    def luts(self, budgets: Iterable[Mapping[str, float]]) -> dict[int, LatencyLUT]:
        """Latency tables for every batch size named by a latency key in ``budgets`` (built or loaded)."""
        for b in budgets:
            for spec in parse_budgets(b):
                batch = spec.batch_size
                if batch is not None and batch not in self._luts:
                    log.info("[hardware] latency table for %s at batch %d (cached after the first build)", self.model_name, batch)
                    self._luts[batch] = LatencyLUT.build(
                        self.model_name, self.model_kwargs, batch, self.threads, repeats=self.lut_repeats, cache_dir=self.cache_dir
                    )
        return {b: lut for b, lut in self._luts.items()}

    @property
    def table_batches(self) -> list[int]:
        """Batch sizes whose latency tables were built or loaded so far."""
        return sorted(self._luts)

    def predict(self, key: str, kept: Kept | StructuredMask, compute_speed: float = 1.0) -> float:
        """Predicted device value of budget metric ``key`` (units in :data:`BUDGET_KEYS`)."""
        spec = CostSpec(key, 1.0)
        return float(spec.cost_fn(self.analytic, self.luts([{key: 1.0}]))(kept_counts(kept))) * device_factor(key, compute_speed)

    def constraints(self, budgets: Mapping[str, float], compute_speed: float = 1.0, scale: float = 1.0) -> list[tuple[CostFn, float]]:
        """``(cost_fn, limit)`` pairs in device units for :func:`fedprune.allocation.nested_budget_masks`.

        Latency limits are tightened by ``latency_margin`` and divided by the
        correction :meth:`refit_latency` recorded for that budget, if any. With ``scale`` < 1
        (a progressive stage) each limit is moved from the dense cost towards
        the budget: ``dense - scale x (dense - limit)``.
        """
        luts = self.luts([budgets])
        dense = self.groups.sizes
        out = []
        for spec in parse_budgets(budgets):
            host_fn = spec.cost_fn(self.analytic, luts)
            factor = device_factor(spec.key, compute_speed)
            fn = _MetricFn(spec.key, lambda k, f=host_fn, a=factor: f(k) * a,
                           parts=(lambda k, f=host_fn, a=factor: [v * a for v in f.parts(k)]) if hasattr(host_fn, "parts") else None)
            limit = float(spec.limit)
            if spec.batch_size is not None:
                limit *= (1.0 - self.latency_margin) / self.latency_corrections.get(_correction_key(spec, compute_speed), 1.0)
            if scale < 1.0:
                full = fn(dense)
                limit = max(limit, full - scale * (full - limit))
            out.append((fn, limit))
        return out

    def relative_latency(self, key: str, extracted: nn.Module, compute_speed: float = 1.0, repeats: int = 20) -> float:
        """Device ms of latency budget ``key`` for ``extracted``, measured relative to the dense model: its
        time over the dense model's, both timed in the same passes
        (:func:`fedprune.metrics.relative_host_latency`), times the table's prediction for the dense model
        (a calibration width of :class:`LatencyLUT`). A shared host that runs faster or slower for a while
        moves both timings, not the ratio, so this measures the width against the table's host speed."""
        ratio = relative_host_latency(extracted, self.model, latency_batch(key), self.threads, repeats)
        return ratio * self.predict(key, self.groups.sizes, compute_speed)

    def refit_latency(self, budgets: Mapping[str, float], mask: StructuredMask, compute_speed: float = 1.0, repeats: int = 20) -> str:
        """Time the sub-network ``mask`` for each latency budget and correct the table where it is off.

        The extracted sub-network is measured relative to the dense model
        (:meth:`relative_latency`): the refit corrects the table's error for
        this width, not the host's speed of the moment (on the 2-core benchmark
        VM a refit on timings alone once took a fast second for unused budget,
        and the wider network it chose timed at 1.19 x its 2.5 ms budget a
        minute later). The allocator aims at ``limit x (1 - m)`` (``m`` =
        ``latency_margin``); an estimate within ``[1 - 2m, 1 - m/2] x limit``
        is accepted (half the margin is left for timing noise). Above that band
        the sub-network would risk the budget; below it, the budget is left
        unused. Either way the budget's correction becomes estimate /
        predicted (when too slow, at least 2% above the previous one), so the
        next :meth:`constraints` aim right. Returns ``"ok"`` (nothing to
        correct), ``"slow"`` (some budget above the band) or ``"fast"`` (some
        below it, none above).
        """
        status, sub = "ok", None
        m = self.latency_margin
        for spec in parse_budgets(budgets):
            if spec.batch_size is None:
                continue
            sub = sub if sub is not None else extract_submodel(self.model, mask, self.groups)
            estimate = self.relative_latency(spec.key, sub, compute_speed, repeats)
            slow, fast = estimate > spec.limit * (1.0 - m / 2), estimate < spec.limit * (1.0 - 2 * m)
            if not (slow or fast):
                continue
            key = _correction_key(spec, compute_speed)
            ratio = estimate / self.predict(spec.key, mask, compute_speed)
            self.latency_corrections[key] = max(ratio, 1.02 * self.latency_corrections.get(key, 1.0)) if slow else ratio
            log.info("[hardware] %s: sub-network measured %.3g ms relative to the dense model, %.0f%% of the %.3g ms budget "
                     "(aim %.0f%%); predictions x %.3f from now on", spec.key, estimate, 100 * estimate / spec.limit, spec.limit,
                     100 * (1 - m), self.latency_corrections[key])
            status = "slow" if slow or status == "slow" else "fast"
        return status

    def report(
        self,
        budgets: Mapping[str, float],
        kept: Kept | StructuredMask,
        extracted: nn.Module,
        compute_speed: float = 1.0,
        host_latency_ms: Mapping[int, float] | None = None,
        predict_latency: bool = True,
        repeats: int = 20,
    ) -> dict[str, dict[str, Any]]:
        """Per budget key: ``limit``, ``predicted`` (cost model), ``measured`` (on ``extracted``), ``ok``, ``unit``.

        ``measured`` counts MACs / parameters / peak activation on the
        extracted model itself; latency is ``host_latency_ms[batch]`` (ms on
        this host, e.g. from :func:`fedprune.metrics.model_costs`) scaled to the
        device, or None when not measured. ``ok`` is ``measured <= limit``
        (None when not measured). A measured latency budget also gets
        ``measured_relative`` and ``ok_relative``: ``extracted`` timed against
        the dense model (:meth:`relative_latency`), which a host whose speed
        changes from one second to the next does not move. With
        ``predict_latency=False`` latency budgets get no prediction (no latency
        table is built) and no relative measurement.
        """
        out = {}
        for spec in parse_budgets(budgets):
            latency = spec.batch_size is not None
            measured = _measured_value(spec.key, extracted, host_latency_ms)
            factor = device_factor(spec.key, compute_speed)
            measured = None if measured is None else measured * factor
            out[spec.key] = {
                "limit": float(spec.limit),
                "predicted": self.predict(spec.key, kept, compute_speed) if predict_latency or not latency else None,
                "measured": measured,
                "ok": None if measured is None else bool(measured <= spec.limit),
                "unit": spec.unit + (f" (device estimate: host / compute_speed {compute_speed:g})" if factor != 1.0 else ""),
            }
            if latency and measured is not None and predict_latency:
                relative = self.relative_latency(spec.key, extracted, compute_speed, repeats)
                out[spec.key].update(measured_relative=relative, ok_relative=bool(relative <= spec.limit))
        return out
