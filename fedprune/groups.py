"""Prunable channel groups, discovered with torch-pruning's DependencyGraph.

A *channel group* is a set of output channels that must be removed together:
a conv's out-channels, its BatchNorm, the next layer's in-channels, and, for
residual or depthwise couplings, every other layer tied to the same channels.
Torch-Pruning traces these couplings; this module only names the groups and
remembers which layers in each group *produce* the channels (those are what
importance criteria score and what soft masks zero).

Group names are the module name of the group's root conv (e.g.
``features.0``), so they are stable across processes and between the server
and clients.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch_pruning as tp

__all__ = ["ChannelGroup", "ChannelGroups", "discover_groups", "build_dependency_graph", "EXAMPLE_INPUT_SHAPE"]

#: Shape of the example input used for tracing (CIFAR: one 3x32x32 image).
EXAMPLE_INPUT_SHAPE = (1, 3, 32, 32)

_OUT_HANDLER = "prune_out_channels"
_IN_HANDLER = "prune_in_channels"


@dataclass(frozen=True)
class ChannelGroup:
    """One set of coupled output channels.

    Attributes:
        name: module name of the root conv; the group's key everywhere.
        size: number of channels in the original (dense) model.
        producers: names of the conv/linear modules whose output channels are
            the group's channels (more than one for residual or depthwise
            coupling).
        norms: names of the BatchNorm modules normalising those channels.
        consumers: names of the conv/linear modules that read those channels as
            input channels (their ``in_channels``/``in_features`` shrink when the
            group is pruned); empty when not traced.
    """

    name: str
    size: int
    producers: tuple[str, ...]
    norms: tuple[str, ...]
    consumers: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChannelGroups:
    """All prunable channel groups of one architecture, in module order."""

    groups: tuple[ChannelGroup, ...]
    _index: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._index.update({g.name: g for g in self.groups})

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, name: str) -> ChannelGroup:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"unknown channel group {name!r}; groups are {self.names}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._index

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    @property
    def sizes(self) -> dict[str, int]:
        return {g.name: g.size for g in self.groups}

    @property
    def total_channels(self) -> int:
        return sum(g.size for g in self.groups)


def build_dependency_graph(model: nn.Module) -> tp.DependencyGraph:
    """Trace ``model`` (in eval mode, so BN statistics are untouched)."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        example = torch.zeros(EXAMPLE_INPUT_SHAPE, dtype=param.dtype, device=param.device)
        return tp.DependencyGraph().build_dependency(model, example_inputs=example)
    finally:
        model.train(was_training)


def _output_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose outputs are logits: never pruned (the last Linear)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def root_handler(module: nn.Module):
    """The torch-pruning function that removes output channels of a root conv."""
    if _is_depthwise(module):
        return tp.prune_depthwise_conv_out_channels
    return tp.prune_conv_out_channels


def discover_groups(model: nn.Module) -> ChannelGroups:
    """Find the prunable conv channel groups of ``model``.

    Only Conv2d layers are roots (the notebook pruned conv channels; hidden
    Linear layers are left dense). The final classifier is never pruned.
    """
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    graph = build_dependency_graph(model)
    found: list[ChannelGroup] = []
    for group in graph.get_all_groups(ignored_layers=_output_layers(model), root_module_types=[nn.Conv2d]):
        producers, norms, consumers = [], [], []
        for item in group.items:
            module = item.dep.target.module
            handler = getattr(item.dep.handler, "__name__", "")
            if handler == _IN_HANDLER and isinstance(module, (nn.Conv2d, nn.Linear)) and module in names and not _is_depthwise(module):
                consumers.append(names[module])
            if handler != _OUT_HANDLER or module not in names:
                continue
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                producers.append(names[module])
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                norms.append(names[module])
        producers.sort(key=order.__getitem__)
        norms.sort(key=order.__getitem__)
        # Prefer a regular conv as root: its name is the group's key.
        regular = [p for p in producers if not _is_depthwise(model.get_submodule(p))]
        root = (regular or producers)[0]
        size = model.get_submodule(root).out_channels
        consumers = sorted(set(consumers), key=order.__getitem__)
        found.append(ChannelGroup(root, size, tuple(producers), tuple(norms), tuple(consumers)))
    found.sort(key=lambda g: order[g.name])
    return ChannelGroups(tuple(found))


@functools.lru_cache(maxsize=16)
def groups_for(model_name: str, **model_kwargs) -> ChannelGroups:
    """Cached :func:`discover_groups` for a registered model name.

    The model it traces is built with torch's RNG forked, so the first call in a process draws nothing
    from the caller's stream: a seeded run gives the same numbers whether or not it ran first.
    """
    from fedprune.models import get_model

    with torch.random.fork_rng(devices=[]):
        return discover_groups(get_model(model_name, **model_kwargs))
