"""Nested sub-network training: a client trains its own sub-network and the narrower ones inside it.

With nested profile masks (``microcontroller ⊆ mobile_cpu ⊆ edge_gpu``) the
channels of a small sub-network are also held by every larger one. Under plain
HeteroFL aggregation those shared channels are trained only *in the context of*
each client's own width, so the small sub-networks receive updates computed for
networks they are not. FjORD (Horváth et al., 2021, "ordered dropout") trains
each client's sub-network together with the narrower ones it contains; this
module does that with the sandwich rule of slimmable networks: every step adds,
for each narrower sub-network, its cross-entropy and ``distill`` x the
distillation loss to the client's own (widest) outputs.

A narrower sub-network runs inside the client's physically extracted model by
zeroing the channels it does not hold after their BatchNorm (or after the
producer when the group has none). Zeros propagate exactly like removed
channels, in train and eval mode, so the masked pass equals the narrower
network extracted on its own (tested). Running BatchNorm statistics are only
meaningful for the client's own width; :func:`fedprune.training.recalibrate_bn`
recomputes them after training, as every client already does.

Everything here works on plain PyTorch modules; :func:`fedprune.task.client_train`
calls it when the server sends inner masks (``federated.nested_training``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedprune.dynamic import distillation_loss
from fedprune.groups import ChannelGroups
from fedprune.masks import MaskError, StructuredMask
from fedprune.training import TrainConfig, train

__all__ = ["LocalChannelMask", "inner_channel_masks", "masked_channels", "train_nested"]

#: Per group name, a float 0/1 vector over the channels of the extracted sub-network.
LocalChannelMask = dict[str, torch.Tensor]


def inner_channel_masks(outer: StructuredMask, inner: StructuredMask, groups: ChannelGroups) -> LocalChannelMask:
    """The channels of ``inner`` as 0/1 vectors in the index space of ``outer``'s extracted sub-network.

    Both masks live in the original (dense) index space; the extracted
    sub-network of ``outer`` holds ``outer.kept(g)`` in ascending order, so
    position ``i`` of group ``g`` is original channel ``outer.kept(g)[i]``.
    Raises :class:`~fedprune.masks.MaskError` unless ``inner ⊆ outer``.
    """
    if not inner.is_subset_of(outer):
        raise MaskError("nested training needs an inner mask that is a subset of the client's mask")
    return {g.name: torch.from_numpy(np.isin(outer.kept(g.name), inner.kept(g.name)).astype(np.float32)) for g in groups}


def _masked_modules(model: nn.Module, groups: ChannelGroups) -> dict[str, list[nn.Module]]:
    """Per group, the modules whose outputs carry the group's channels last (its norms, else producers)."""
    return {g.name: [model.get_submodule(n) for n in (g.norms or g.producers)] for g in groups}


@contextmanager
def masked_channels(model: nn.Module, groups: ChannelGroups, local: LocalChannelMask | None) -> Iterator[nn.Module]:
    """Within the block, ``model``'s forward zeroes every channel that ``local`` marks 0 (``None``: no masking)."""
    if local is None:
        yield model
        return
    handles = []
    try:
        for name, modules in _masked_modules(model, groups).items():
            keep = local[name]
            if bool(keep.all()):
                continue
            for m in modules:

                def hook(_m, _inp, out, keep=keep):
                    return out * keep.to(out.device, out.dtype).view(1, -1, *([1] * (out.dim() - 2)))

                handles.append(m.register_forward_hook(hook))
        yield model
    finally:
        for h in handles:
            h.remove()


def train_nested(
    model: nn.Module,
    groups: ChannelGroups,
    inner: Sequence[LocalChannelMask],
    loader,
    cfg: TrainConfig,
    distill: float = 1.0,
    temperature: float = 1.0,
) -> dict[str, float | int]:
    """Train ``model`` (a client's extracted sub-network) and the narrower sub-networks ``inner`` inside it.

    Each step's loss: cross-entropy of the full model, plus for every inner
    mask its cross-entropy and ``distill`` x the distillation loss to the full
    model's detached outputs (temperature ``temperature``). With no inner
    masks this is plain :func:`fedprune.training.train`. Returns
    ``{"loss": mean loss of the last epoch, "steps", "examples"}``.
    """
    for local in inner:
        missing = [g.name for g in groups if g.name not in local]
        if missing:
            raise MaskError(f"inner channel mask lacks groups {missing}")
        for g in groups:
            if local[g.name].numel() != model.get_submodule(g.producers[0]).weight.shape[0]:
                raise MaskError(f"inner channel mask of group {g.name!r} has {local[g.name].numel()} entries; "
                                f"the model has {model.get_submodule(g.producers[0]).weight.shape[0]} channels there")
            if not bool(local[g.name].any()):
                raise MaskError(f"inner channel mask keeps no channel of group {g.name!r}")
    if not inner:
        return train(model, loader, cfg)

    def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        full = m(x)
        loss = F.cross_entropy(full, y)
        for local in inner:
            with masked_channels(m, groups, local):
                logits = m(x)
            loss = loss + F.cross_entropy(logits, y)
            if distill:
                loss = loss + distill * distillation_loss(logits, full, temperature)
        return loss

    return train(model, loader, cfg, loss_fn=loss_fn)
