"""Conversions between fedprune objects and Flower records, and message sizes.

Flower messages carry :class:`~flwr.app.RecordDict` objects. Importance
vectors and masks travel as named :class:`~flwr.app.Array` entries of an
:class:`~flwr.app.ArrayRecord`; weights as torch state dicts; settings as a
:class:`~flwr.app.ConfigRecord`.
"""

from __future__ import annotations

import json
from typing import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from fedprune.config import ExperimentConfig, config_from_dict, config_to_dict
from fedprune.masks import StructuredMask

__all__ = [
    "vectors_to_record",
    "record_to_vectors",
    "mask_to_record",
    "record_to_mask",
    "INNER_MASK_KEY",
    "put_inner_masks",
    "get_inner_masks",
    "state_to_record",
    "record_to_state",
    "config_to_record",
    "record_to_config",
    "recorddict_nbytes",
]


def vectors_to_record(vectors: Mapping[str, np.ndarray], dtype=np.float32) -> ArrayRecord:
    """Named 1-D vectors (e.g. per-group importance) as an ArrayRecord."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=dtype)) for k, v in vectors.items()})


def record_to_vectors(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record.keys()}


def mask_to_record(mask: StructuredMask) -> ArrayRecord:
    return vectors_to_record(mask.to_arrays(), dtype=np.uint8)


def record_to_mask(record: ArrayRecord, groups=None) -> StructuredMask:
    return StructuredMask.from_arrays(record_to_vectors(record), groups)


#: Record name of the i-th narrower mask of a train message (nested training, :mod:`fedprune.nested`).
INNER_MASK_KEY = "inner-mask.{}"


def put_inner_masks(content: RecordDict, masks: list[StructuredMask]) -> None:
    """Add ``masks`` to a train message, in order, as ``inner-mask.0``, ``inner-mask.1``, ..."""
    for i, mask in enumerate(masks):
        content[INNER_MASK_KEY.format(i)] = mask_to_record(mask)


def get_inner_masks(content: RecordDict, groups=None) -> list[StructuredMask]:
    """The masks of :func:`put_inner_masks`, in their order (none: an empty list)."""
    masks = []
    while INNER_MASK_KEY.format(len(masks)) in content:
        masks.append(record_to_mask(content[INNER_MASK_KEY.format(len(masks))], groups))
    return masks


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A torch state dict as an ArrayRecord (tensors detached to CPU)."""
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return record.to_torch_state_dict()


def config_to_record(cfg: ExperimentConfig, **extra) -> ConfigRecord:
    """The resolved experiment config (as JSON) plus per-message settings."""
    return ConfigRecord({"experiment": json.dumps(config_to_dict(cfg)), **extra})


def record_to_config(record: ConfigRecord) -> ExperimentConfig:
    return config_from_dict(json.loads(str(record["experiment"])), resolved=True)


def recorddict_nbytes(content: RecordDict) -> int:
    """Serialised size of a message's content in bytes (Flower's protobuf encoding)."""
    return int(recorddict_to_proto(content).ByteSize())
