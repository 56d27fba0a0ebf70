"""Checks on client replies before the server uses them.

Every check returns ``None`` when the payload is fine, or a short reason (a
string naming what is wrong) when it is not; the ``parse_*`` functions combine
them per message type and raise :class:`InvalidReply` with that reason. The
server (:mod:`fedprune.federated`) drops a reply that fails, logs the client
and the reason, and counts it as a failure: a bad reply never reaches the
global model, the BN statistics, the gates or the consensus.

What is checked:

* weights and gates: the same array names as sent (none missing, none extra),
  the same shapes and dtypes, finite values of magnitude at most
  :data:`MAX_ABS_VALUE` (variances :data:`MAX_ABS_VALUE` squared; a trained
  network's are below 100, so larger values are an attack or a diverged client,
  and they would overflow the averages), BatchNorm variances not negative;
* importance vectors: one per channel group (none missing, none extra), 1-D
  of the group's size, floating point, finite and non-negative; layer
  sensitivity (when requested): one finite value per group, of magnitude at
  most :data:`MAX_ABS_VALUE`;
* sample counts: integers, positive (evaluation: non-negative) and at most the
  shard size the client registered with;
* registration: a known profile, a partition id in ``[0, num_partitions)``, at
  least one training image, a shard no larger than the training set the server
  knows (a client's self-declared size weighs its updates), and a label
  histogram of non-negative counts that sum to the shard;
* metrics: the training loss is finite (unless no local epoch was asked for),
  the compute time finite, non-negative and at most :data:`MAX_COMPUTE_S`,
  accuracies in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

__all__ = [
    "InvalidReply",
    "ArraySpec",
    "state_spec",
    "check_state",
    "check_importance",
    "check_sensitivity",
    "check_count",
    "check_finite_metric",
    "read_state",
    "read_vectors",
    "TrainReply",
    "ImportanceReply",
    "parse_train_reply",
    "parse_importance_reply",
    "parse_evaluate_reply",
    "parse_bn_stats_reply",
    "parse_register_reply",
]

#: Reasons quote at most this many offending names.
_SHOW = 3
#: Largest magnitude accepted in weights, BN means, gates and layer sensitivities (variances: its square).
MAX_ABS_VALUE = 1e6
#: Largest compute time (seconds) a client may report for one message.
MAX_COMPUTE_S = 1e6


class InvalidReply(ValueError):
    """A client reply that must not be used; the message is the reason."""


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


def state_spec(state: Mapping[str, torch.Tensor]) -> dict[str, ArraySpec]:
    """Names, shapes and dtypes of a state dict (what the server sent)."""
    return {k: ArraySpec(tuple(v.shape), v.dtype) for k, v in state.items()}


def _names(names) -> str:
    names = sorted(names)
    more = f" (+{len(names) - _SHOW} more)" if len(names) > _SHOW else ""
    return ", ".join(repr(n) for n in names[:_SHOW]) + more


def _check_names(expected, received, what: str, missing_as: str = "missing", extra_as: str = "unexpected") -> str | None:
    """Names in ``expected`` but not ``received`` (or the other way round), as a reason; None when equal."""
    missing = set(expected) - set(received)
    if missing:
        return f"{what}: {missing_as} {_names(missing)}"
    extra = set(received) - set(expected)
    if extra:
        return f"{what}: {extra_as} {_names(extra)}"
    return None


# ------------------------------------------------------------- single checks
#: Array names holding BatchNorm variances (the model's running statistics; per-width statistics of
#: :func:`fedprune.dynamic.width_state`), which must not be negative.
VARIANCE_SUFFIXES = ("running_var", ".var")


def check_state(expected: Mapping[str, ArraySpec], received: Mapping[str, torch.Tensor], what: str = "arrays") -> str | None:
    """Same names, shapes and dtypes as ``expected``, all values finite, variances (:data:`VARIANCE_SUFFIXES`) not negative."""
    bad = _check_names(expected, received, what)
    if bad:
        return bad
    for k, spec in expected.items():
        v = received[k]
        if not isinstance(v, torch.Tensor):
            return f"{what}: {k!r} is not an array"
        if tuple(v.shape) != spec.shape:
            return f"{what}: {k!r} has shape {tuple(v.shape)}, sent {spec.shape}"
        if v.dtype != spec.dtype:
            return f"{what}: {k!r} has dtype {v.dtype}, sent {spec.dtype}"
        if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()):
            return f"{what}: {k!r} holds non-finite values (NaN or inf)"
        if k.endswith(VARIANCE_SUFFIXES) and bool((v < 0).any()):
            return f"{what}: {k!r} holds negative variances"
        limit = MAX_ABS_VALUE ** 2 if k.endswith(VARIANCE_SUFFIXES) else MAX_ABS_VALUE
        if v.is_floating_point() and v.numel() and float(v.abs().max()) > limit:
            return f"{what}: {k!r} holds values of magnitude {float(v.abs().max()):.3g}, above {limit:.0e}"
    return None


def check_importance(groups, vectors: Mapping[str, np.ndarray]) -> str | None:
    """One floating, finite, non-negative vector of the group's size per channel group."""
    sizes = {g.name: g.size for g in groups}
    bad = _check_names(sizes, vectors, "importance", "missing groups", "unknown groups")
    if bad:
        return bad
    for name, size in sizes.items():
        v = np.asarray(vectors[name])
        if v.dtype.kind != "f":
            return f"importance: group {name!r} has dtype {v.dtype}, expected floating point"
        if v.shape != (size,):
            return f"importance: group {name!r} has shape {v.shape}, expected ({size},)"
        if not np.isfinite(v).all():
            return f"importance: group {name!r} holds non-finite values (NaN or inf)"
        if (v < 0).any():
            return f"importance: group {name!r} holds negative scores"
    return None


def check_sensitivity(groups, vectors: Mapping[str, np.ndarray]) -> str | None:
    """One finite value (a length-1 vector) per channel group."""
    names = set(groups.names)
    missing = names - set(vectors)
    if missing:
        return f"sensitivity: missing groups {_names(missing)}"
    extra = set(vectors) - names
    if extra:
        return f"sensitivity: unknown groups {_names(extra)}"
    for name in groups.names:
        v = np.asarray(vectors[name])
        if v.shape != (1,) or v.dtype.kind != "f" or not np.isfinite(v).all():
            return f"sensitivity: group {name!r} must be one finite number, got shape {v.shape} dtype {v.dtype}"
        if abs(float(v[0])) > MAX_ABS_VALUE:
            return f"sensitivity: group {name!r} = {float(v[0]):.3g} is above {MAX_ABS_VALUE:.0e} in magnitude"
    return None


def check_count(value, name: str, lo: int = 1, hi: int | None = None, hi_is: str = "the client's registered shard size") -> str | None:
    """``value`` is an integer (an integral float is accepted) in ``[lo, hi]``; ``hi_is`` says what ``hi`` is."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return f"{name} = {value!r} is not a number"
    if isinstance(value, (float, np.floating)) and not (math.isfinite(value) and float(value).is_integer()):
        return f"{name} = {value!r} is not an integer"
    if value < lo:
        return f"{name} = {value!r} is below {lo}"
    if hi is not None and value > hi:
        return f"{name} = {value!r} exceeds {hi} ({hi_is})"
    return None


def check_finite_metric(metrics: Mapping, key: str, lo: float | None = None, hi: float | None = None, required: bool = True) -> str | None:
    """``metrics[key]`` is a finite number in ``[lo, hi]`` (absent is fine when not ``required``)."""
    if key not in metrics:
        return f"metric {key!r} is missing" if required else None
    v = metrics[key]
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return f"metric {key!r} = {v!r} is not a number"
    if not math.isfinite(v):
        return f"metric {key!r} = {v!r} is not finite"
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        return f"metric {key!r} = {v!r} is outside [{lo}, {hi}]"
    return None


# ------------------------------------------------------------ record reading
def _record(content, key: str, kind: str):
    try:
        rec = content[key]
    except (KeyError, TypeError):
        raise InvalidReply(f"reply has no {key!r} {kind}") from None
    return rec


def read_state(content, key: str = "arrays") -> dict[str, torch.Tensor]:
    """``content[key]`` (an ArrayRecord) as a torch state dict."""
    rec = _record(content, key, "record")
    try:
        return rec.to_torch_state_dict()
    except Exception as exc:  # noqa: BLE001 - any decoding failure makes the reply unusable
        raise InvalidReply(f"{key}: cannot be read as arrays ({type(exc).__name__}: {exc})") from None


def read_vectors(content, key: str) -> dict[str, np.ndarray]:
    """``content[key]`` (an ArrayRecord of named vectors) as numpy arrays."""
    rec = _record(content, key, "record")
    try:
        return {k: rec[k].numpy() for k in rec.keys()}
    except Exception as exc:  # noqa: BLE001
        raise InvalidReply(f"{key}: cannot be read as arrays ({type(exc).__name__}: {exc})") from None


def _metrics(content) -> Mapping:
    return _record(content, "metrics", "record")


def _raise(reason: str | None) -> None:
    if reason is not None:
        raise InvalidReply(reason)


def _checked_states(content, expected: Mapping[str, Mapping[str, ArraySpec] | None]) -> dict[str, dict[str, torch.Tensor] | None]:
    """Each array record named in ``expected`` read and checked against its spec (:func:`check_state`);
    a record whose spec is None was not asked for and is not read (None)."""
    out = {}
    for key, spec in expected.items():
        out[key] = None if spec is None else read_state(content, key)
        if spec is not None:
            _raise(check_state(spec, out[key], key))
    return out


# ---------------------------------------------------------- per message type
@dataclass
class TrainReply:
    state: dict[str, torch.Tensor]
    gates: dict[str, torch.Tensor] | None
    num_examples: int
    loss: float
    compute_s: float


@dataclass
class ImportanceReply:
    scores: dict[str, np.ndarray]
    num_examples: int
    sensitivity: dict[str, float] | None


def parse_train_reply(content, sent: Mapping[str, ArraySpec], sent_gates: Mapping[str, ArraySpec] | None,
                      num_train: int, epochs: int) -> TrainReply:
    """Weights (and gates) as sent, finite; ``num-examples`` in [1, num_train]; finite loss and compute time."""
    state, gates = _checked_states(content, {"arrays": sent, "gates": sent_gates}).values()
    m = _metrics(content)
    _raise(check_count(m.get("num-examples"), "num-examples", 1, num_train))
    if epochs > 0:  # a client asked for no local epoch reports NaN: it did not train
        _raise(check_finite_metric(m, "train-loss"))
    elif "train-loss" not in m:
        raise InvalidReply("metric 'train-loss' is missing")
    _raise(check_finite_metric(m, "compute-s", lo=0.0, hi=MAX_COMPUTE_S))
    _raise(check_finite_metric(m, "gate-loss", required=False))
    return TrainReply(state, gates, int(m["num-examples"]), float(m["train-loss"]), float(m["compute-s"]))


def parse_importance_reply(content, groups, num_train: int, sensitivity: bool) -> ImportanceReply:
    """Valid importance vectors (and sensitivity when asked for); ``num-examples`` in [1, num_train]."""
    scores = read_vectors(content, "importance")
    _raise(check_importance(groups, scores))
    m = _metrics(content)
    _raise(check_count(m.get("num-examples"), "num-examples", 1, num_train))
    sens = None
    if sensitivity:
        vec = read_vectors(content, "sensitivity")
        _raise(check_sensitivity(groups, vec))
        sens = {k: float(vec[k][0]) for k in groups.names}
    return ImportanceReply({k: scores[k].astype(np.float64) for k in groups.names}, int(m["num-examples"]), sens)


def parse_evaluate_reply(content, num_val: int) -> tuple[int, float]:
    """``(num-examples, accuracy)``: a count in [0, num_val]; a finite accuracy in [0, 1] when the count is positive."""
    m = _metrics(content)
    _raise(check_count(m.get("num-examples"), "num-examples", 0, num_val))
    n = int(m["num-examples"])
    if n == 0:
        return 0, float("nan")
    _raise(check_finite_metric(m, "accuracy", 0.0, 1.0))
    return n, float(m["accuracy"])


def parse_bn_stats_reply(content, sent: Mapping[str, ArraySpec], num_train: int,
                         sent_widths: Mapping[str, ArraySpec] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, int]:
    """``(statistics, width statistics, num-examples)`` of a static-BN reply: the BatchNorm running
    statistics named in ``sent`` (same shapes and dtypes, finite, variances not negative), the
    narrower widths' statistics named in ``sent_widths`` when asked for (record ``widths``, same
    checks), and a count in [1, num_train]."""
    stats, widths = _checked_states(content, {"arrays": sent, "widths": sent_widths}).values()
    m = _metrics(content)
    _raise(check_count(m.get("num-examples"), "num-examples", 1, num_train))
    return stats, widths, int(m["num-examples"])


def parse_register_reply(content, profiles, num_partitions: int | None = None, max_images: int | None = None) -> dict:
    """The ``info`` record: a known profile, a partition id in ``[0, num_partitions)``, at least one training image,
    train + validation images at most ``max_images`` (the training set the server knows), and a label histogram: a
    list of non-negative integers that sum to train + validation images."""
    info = _record(content, "info", "record")
    for key in ("partition-id", "profile", "num-train", "num-val", "label-histogram"):
        if key not in info:
            raise InvalidReply(f"info: {key!r} is missing")
    top = None if num_partitions is None else num_partitions - 1
    _raise(check_count(info["partition-id"], "partition-id", 0, top, "the last partition id of federated.num_clients"))
    if str(info["profile"]) not in profiles:
        raise InvalidReply(f"info: unknown profile {info['profile']!r}; allowed: {list(profiles)}")
    _raise(check_count(info["num-train"], "num-train", 1, max_images, "the training set's size"))
    _raise(check_count(info["num-val"], "num-val", 0, max_images, "the training set's size"))
    shard = int(info["num-train"]) + int(info["num-val"])
    if max_images is not None and shard > max_images:
        raise InvalidReply(f"info: num-train + num-val = {shard} exceeds {max_images} (the training set's size)")
    hist = info["label-histogram"]
    if isinstance(hist, (str, bytes)) or not isinstance(hist, (list, tuple)):
        raise InvalidReply(f"info: label-histogram = {hist!r} is not a list of counts")
    for i, c in enumerate(hist):
        _raise(check_count(c, f"label-histogram[{i}]", 0))
    if sum(int(c) for c in hist) != shard:
        raise InvalidReply(f"info: label-histogram sums to {sum(int(c) for c in hist)}, not num-train + num-val = {shard}")
    return dict(info)
