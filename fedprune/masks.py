"""Structured masks in the original channel index space, and how to apply them.

A :class:`StructuredMask` holds, per channel group, a boolean keep-vector over
the group's ORIGINAL channels. That is the space the server aggregates in and
the only thing clients and server exchange about structure.

Two ways to apply a mask:

* :func:`apply_soft_mask` zeroes the pruned channels' producer weights, biases
  and BatchNorm affine parameters in place. Shapes stay; the model remains in
  the shared index space and can be trained (re-apply after each step).
* :func:`extract_submodel` physically removes the pruned channels with
  torch-pruning, returning a smaller, faster ``nn.Module``.

In eval mode both give the same outputs. :func:`extraction_index_map` records,
for every parameter and buffer of the extracted model, the flat index of each
entry in the dense tensor; :func:`slice_state` and :func:`merge_substates` use
it to cut sub-models out of and merge them back into dense weights
(HeteroFL-style averaging over the clients that hold each entry).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn

from fedprune.groups import ChannelGroups, build_dependency_graph, root_handler

__all__ = [
    "StructuredMask",
    "MaskError",
    "apply_soft_mask",
    "extract_submodel",
    "extraction_index_map",
    "slice_state",
    "round_keep_count",
]


class MaskError(ValueError):
    """A mask does not fit the model's channel groups."""


def round_keep_count(count: int, size: int, round_to: int | None) -> int:
    """Round a kept-channel count up to a multiple of ``round_to`` (capped at ``size``, at least 1)."""
    count = max(1, min(int(count), size))
    if round_to and round_to > 1:
        count = min(size, int(np.ceil(count / round_to) * round_to))
    return count


def descending_order(scores) -> np.ndarray:
    """Indices of ``scores`` from the highest to the lowest, ties broken towards the lower index."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.lexsort((np.arange(scores.size), -scores))


@dataclass(frozen=True)
class StructuredMask:
    """Per-group boolean keep-vectors in the original channel index space.

    ``keep[name][c]`` is True when channel ``c`` of group ``name`` is kept.
    Every group keeps at least one channel.
    """

    keep: Mapping[str, np.ndarray]

    def __post_init__(self) -> None:
        clean = {}
        for name, vec in self.keep.items():
            arr = np.asarray(vec)
            if arr.ndim != 1:
                raise MaskError(f"mask for group {name!r} must be 1-D, got shape {arr.shape}")
            if arr.dtype != np.bool_:
                if not np.isin(arr, (0, 1)).all():
                    raise MaskError(f"mask for group {name!r} must be boolean (0/1), got values {np.unique(arr)[:5]}")
                arr = arr.astype(bool)
            if not arr.any():
                raise MaskError(f"mask for group {name!r} keeps no channel; at least one is required")
            clean[name] = arr.copy()
            clean[name].setflags(write=False)
        object.__setattr__(self, "keep", clean)

    # ----------------------------------------------------------- constructors
    @classmethod
    def dense(cls, groups: ChannelGroups) -> "StructuredMask":
        """Keep every channel."""
        return cls({g.name: np.ones(g.size, dtype=bool) for g in groups})

    @classmethod
    def prefix(cls, groups: ChannelGroups, kept: Mapping[str, int]) -> "StructuredMask":
        """Keep the first ``kept[name]`` channels of each group (every channel of groups not named)."""
        return cls({g.name: np.arange(g.size) < kept.get(g.name, g.size) for g in groups})

    @classmethod
    def from_scores(
        cls,
        scores: Mapping[str, np.ndarray],
        keep_counts: Mapping[str, int],
        round_to: int | None = None,
    ) -> "StructuredMask":
        """Keep the ``keep_counts[name]`` highest-scoring channels of each group.

        Ties break towards the lower channel index, so the result is
        deterministic and masks with growing counts are nested.
        """
        keep = {}
        for name, score in scores.items():
            score = np.asarray(score, dtype=np.float64)
            k = round_keep_count(keep_counts[name], score.size, round_to)
            order = descending_order(score)
            vec = np.zeros(score.size, dtype=bool)
            vec[order[:k]] = True
            keep[name] = vec
        return cls(keep)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], groups: ChannelGroups | None = None) -> "StructuredMask":
        """Inverse of :meth:`to_arrays`; validates against ``groups`` if given."""
        # The constructor converts 0/1 vectors (e.g. uint8 from to_arrays) and rejects other values.
        mask = cls({k: np.asarray(v) for k, v in arrays.items()})
        if groups is not None:
            mask.validate(groups)
        return mask

    # ------------------------------------------------------------- accessors
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain ``{group: uint8 array}`` (what goes into a Flower ArrayRecord)."""
        return {k: v.astype(np.uint8) for k, v in self.keep.items()}

    def validate(self, groups: ChannelGroups) -> "StructuredMask":
        """Raise :class:`MaskError` unless the mask covers exactly ``groups`` with the right sizes."""
        missing = [n for n in groups.names if n not in self.keep]
        extra = [n for n in self.keep if n not in groups]
        if missing or extra:
            raise MaskError(f"mask groups do not match the model: missing {missing}, unknown {extra}")
        for g in groups:
            if self.keep[g.name].size != g.size:
                raise MaskError(f"mask for group {g.name!r} has {self.keep[g.name].size} channels, the model has {g.size}")
        return self

    def kept(self, name: str) -> np.ndarray:
        """Indices of kept channels of one group (ascending)."""
        return np.flatnonzero(self.keep[name])

    def pruned(self, name: str) -> np.ndarray:
        """Indices of pruned channels of one group (ascending)."""
        return np.flatnonzero(~self.keep[name])

    @property
    def kept_counts(self) -> dict[str, int]:
        return {k: int(v.sum()) for k, v in self.keep.items()}

    @property
    def channel_sparsity(self) -> float:
        """Fraction of all group channels that are pruned (0 = dense)."""
        total = sum(v.size for v in self.keep.values())
        kept = sum(int(v.sum()) for v in self.keep.values())
        return 1.0 - kept / total if total else 0.0

    def is_subset_of(self, other: "StructuredMask") -> bool:
        """True when every channel kept here is also kept by ``other``."""
        return all(not np.any(v & ~other.keep[k]) for k, v in self.keep.items())

    def intersection(self, other: "StructuredMask") -> "StructuredMask":
        return StructuredMask({k: v & other.keep[k] for k, v in self.keep.items()})

    def union(self, other: "StructuredMask") -> "StructuredMask":
        return StructuredMask({k: v | other.keep[k] for k, v in self.keep.items()})

    # ------------------------------------------- the mask's channels as a network of their own
    def narrowed_groups(self, groups: ChannelGroups) -> ChannelGroups:
        """``groups`` as this mask's sub-network has them: the same groups, each holding its kept channels only
        (channel ``i`` of group ``g`` there is original channel ``self.kept(g)[i]``). Allocating on them keeps
        the result inside this mask (progressive pruning: see :meth:`widen_mask`)."""
        return ChannelGroups(tuple(dataclasses.replace(g, size=int(self.keep[g.name].sum())) for g in groups))

    def narrow(self, vectors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per-channel vectors (e.g. scores) of the original index space, cut to this mask's kept channels."""
        return {k: np.asarray(v)[self.keep[k]] for k, v in vectors.items()}

    def widen(self, vectors: Mapping[str, np.ndarray], fill: float = 0.0) -> dict[str, np.ndarray]:
        """The inverse of :meth:`narrow`: vectors over the kept channels placed in the original index space,
        ``fill`` at the pruned channels."""
        out = {}
        for k, v in vectors.items():
            v = np.asarray(v)
            full = np.full(self.keep[k].size, fill, dtype=np.result_type(v.dtype, type(fill)))
            full[self.keep[k]] = v
            out[k] = full
        return out

    def narrow_mask(self, inner: "StructuredMask") -> "StructuredMask":
        """A subset of this mask, over this mask's kept channels only (the inverse of :meth:`widen_mask`)."""
        if not inner.is_subset_of(self):
            raise MaskError("narrow_mask needs a subset of this mask")
        return StructuredMask(self.narrow(inner.keep))

    def widen_mask(self, inner: "StructuredMask") -> "StructuredMask":
        """A mask over this mask's kept channels (e.g. allocated on :meth:`narrowed_groups`) in the original index
        space: a subset of this mask."""
        return StructuredMask(self.widen(inner.keep, fill=False))

    def jaccard(self, other: "StructuredMask") -> float:
        """Jaccard overlap of the kept (group, channel) sets."""
        inter = sum(int((v & other.keep[k]).sum()) for k, v in self.keep.items())
        union = sum(int((v | other.keep[k]).sum()) for k, v in self.keep.items())
        return inter / union if union else 1.0

    def key(self) -> bytes:
        """Hashable fingerprint (for caches)."""
        return b"|".join(k.encode() + b":" + np.packbits(v).tobytes() + str(v.size).encode() for k, v in sorted(self.keep.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StructuredMask) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())


def pruned_scope(scope: StructuredMask | None) -> StructuredMask | None:
    """``scope`` when it prunes a channel (a sub-network, e.g. a later stage of progressive pruning), else None
    (no scope, or every channel kept: the dense network)."""
    return scope if scope is not None and scope.channel_sparsity > 0.0 else None


# --------------------------------------------------------------- soft masks
@torch.no_grad()
def apply_soft_mask(model: nn.Module, mask: StructuredMask, groups: ChannelGroups) -> nn.Module:
    """Zero pruned channels in place (weights, biases, BN gamma and beta).

    With every producer and BatchNorm of a group zeroed, the group's channels
    are exactly 0 after BN, in train and eval mode, so the next layer sees the
    same inputs as the physically pruned model. Returns ``model``.
    """
    for g in groups:
        pruned = torch.as_tensor(mask.pruned(g.name), dtype=torch.long)
        if pruned.numel() == 0:
            continue
        for name in g.producers + g.norms:
            module = model.get_submodule(name)
            for attr in ("weight", "bias"):
                tensor = getattr(module, attr, None)
                if tensor is not None:
                    tensor.index_fill_(0, pruned.to(tensor.device), 0.0)
    return model


class SoftMaskHook:
    """Callable for ``train(after_step=...)``: keeps pruned channels at zero."""

    def __init__(self, mask: StructuredMask, groups: ChannelGroups):
        self.mask, self.groups = mask, groups

    def __call__(self, model: nn.Module) -> None:
        apply_soft_mask(model, self.mask, self.groups)


# ------------------------------------------------------- physical extraction
def _prune_in_place(model: nn.Module, mask: StructuredMask, groups: ChannelGroups) -> nn.Module:
    graph = build_dependency_graph(model)
    for g in groups:
        pruned = mask.pruned(g.name)
        if pruned.size == 0:
            continue
        root = model.get_submodule(g.name)
        group = graph.get_pruning_group(root, root_handler(root), idxs=pruned.tolist())
        group.prune()
    return model


def extract_submodel(model: nn.Module, mask: StructuredMask, groups: ChannelGroups) -> nn.Module:
    """A physically smaller copy of ``model`` holding only the kept channels.

    ``model`` is not modified. The copy keeps ``model``'s train/eval mode.
    """
    mask.validate(groups)
    sub = copy.deepcopy(model)
    _prune_in_place(sub, mask, groups)
    sub.train(model.training)
    return sub


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict(keep_vars=True))


def _compute_index_map(model: nn.Module, mask: StructuredMask, groups: ChannelGroups) -> dict[str, torch.Tensor]:
    # Every float entry holds its own flat index (exact in float64 up to 2**53);
    # torch-pruning only index-selects, so the pruned copy holds the indices of
    # the kept entries. Tracing ignores values.
    probe = copy.deepcopy(model).double()
    with torch.no_grad():
        for tensor in _state_tensors(probe).values():
            if tensor.is_floating_point():
                tensor.data = torch.arange(tensor.numel(), dtype=torch.float64).reshape(tensor.shape)
    _prune_in_place(probe, mask, groups)
    out = {}
    for name, tensor in _state_tensors(probe).items():
        if tensor.is_floating_point():
            out[name] = tensor.detach().round().long()
    return out


def extraction_index_map(model: nn.Module, mask: StructuredMask, groups: ChannelGroups) -> dict[str, torch.Tensor]:
    """For each float state entry of the extracted model: flat indices into the dense tensor.

    ``sub_state[k] == dense_state[k].flatten()[index_map[k]]`` for every float
    entry ``k`` (integer buffers such as ``num_batches_tracked`` are omitted:
    they have no channel dimension).
    """
    mask.validate(groups)
    return _compute_index_map(model, mask, groups)


def slice_state(dense_state: Mapping[str, torch.Tensor], index_map: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut the sub-model's float state out of dense weights using an index map."""
    return {k: dense_state[k].reshape(-1)[idx.reshape(-1)].reshape(idx.shape).clone() for k, idx in index_map.items()}

