"""Glue shared by the CLI, the Flower apps and the benchmarks (Flower's ``task.py``).

Builds models, data and training settings from an :class:`ExperimentConfig`,
with per-process caches so Ray workers load data and trace models once.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch.nn as nn

from fedprune.config import ExperimentConfig
from fedprune.data import ImageArrays, load_dataset
from fedprune.groups import ChannelGroups, groups_for
from fedprune.models import get_model
from fedprune.training import TrainConfig, train

__all__ = [
    "model_kwargs",
    "build_model",
    "model_groups",
    "load_data",
    "train_config",
    "make_train_fn",
    "hardware_model",
    "profile_constraints",
    "profile_budget_masks",
    "budget_group_weights",
    "budget_round_to",
    "gated_model",
    "gate_state",
    "client_register",
    "client_importance",
    "client_train",
    "client_bn_stats",
    "client_evaluate",
    "pruned_accuracy",
]


def model_kwargs(cfg: ExperimentConfig) -> dict:
    """Keyword arguments of the registered model (only mobilenetv2 takes width_mult)."""
    return {"width_mult": cfg.model.width_mult} if cfg.model.name == "mobilenetv2" else {}


def build_model(cfg: ExperimentConfig) -> nn.Module:
    """A fresh dense model (weights from torch's current RNG state)."""
    return get_model(cfg.model.name, **model_kwargs(cfg))


def model_groups(cfg: ExperimentConfig) -> ChannelGroups:
    """The model's channel groups (traced once per process)."""
    return groups_for(cfg.model.name, **model_kwargs(cfg))


@functools.lru_cache(maxsize=4)
def _load_data_cached(dataset: str, data_dir: str, seed: int, sizes: tuple[int, int], download: bool, test_samples: int):
    train, test = load_dataset(dataset, data_dir or None, seed, sizes, download)
    if test_samples and test_samples < len(test):
        test = test.subset(list(range(test_samples)))
    return train, test


def load_data(cfg: ExperimentConfig) -> tuple[ImageArrays, ImageArrays]:
    """(train, test) arrays for the config's dataset (cached per process)."""
    d = cfg.data
    data_dir = d.data_dir or os.environ.get("FEDPRUNE_DATA_DIR", "")
    return _load_data_cached(d.dataset, data_dir, cfg.seed, (d.synthetic_train, d.synthetic_test), d.download, d.test_samples)


def train_config(cfg: ExperimentConfig, epochs: int | None = None, batch_size: int | None = None, lr: float | None = None) -> TrainConfig:
    """The optimiser settings of ``[train]`` with optional epoch/batch/learning-rate overrides."""
    t = cfg.train
    return TrainConfig(
        epochs=max(1, epochs if epochs is not None else t.epochs),
        lr=lr or t.lr,
        optimizer=t.optimizer,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        batch_size=batch_size or t.batch_size,
        cosine=t.cosine,
        threads=t.threads,
    )


def make_train_fn(loader, base: TrainConfig, progress: str | None = None):
    """``train_fn(model, epochs, after_step)`` for :mod:`fedprune.schedules`."""

    def train_fn(model: nn.Module, epochs: int, after_step=None) -> dict:
        return train(model, loader, dataclasses.replace(base, epochs=epochs), after_step=after_step, progress=progress)

    return train_fn


# ----------------------------------------------------------------------------
# Client work: what one federated client does, callable with or without Flower.
# ----------------------------------------------------------------------------
import copy  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fedprune.adversarial import maybe_poison  # noqa: E402
from fedprune.aggregation import pool_bn_stats  # noqa: E402
from fedprune.data import ClientShard, make_client_shard, make_loader  # noqa: E402
from fedprune.dynamic import NestedWidthCNN, check_distinct_widths, conv_blocks, keep_count, train_gates, train_widths, width_state  # noqa: E402
from fedprune.groups import discover_groups  # noqa: E402
from fedprune.importance import compute_importance  # noqa: E402
from fedprune.masks import StructuredMask, descending_order, extract_submodel, pruned_scope  # noqa: E402
from fedprune.nested import inner_channel_masks, train_nested  # noqa: E402
from fedprune.profiles import assign_profiles  # noqa: E402
from fedprune.sensitivity import measure_sensitivity  # noqa: E402
from fedprune.training import evaluate, recalibrate_bn, set_seed  # noqa: E402

log = logging.getLogger(__name__)

#: Images of the local shard used for importance/sensitivity (eval transform).
CLIENT_SCORE_SUBSET = 512


def client_seed(cfg: ExperimentConfig, partition_id: int, round_num: int) -> int:
    """Per-client, per-round seed: runs are reproducible whatever the scheduling order."""
    return int(np.random.SeedSequence([cfg.seed, partition_id, round_num]).generate_state(1)[0])


def client_shard(cfg: ExperimentConfig, partition_id: int, num_partitions: int) -> ClientShard:
    """This client's private shard (indices into the training set), deterministic from the seed."""
    train, _ = load_data(cfg)
    d = cfg.data
    return make_client_shard(
        train.labels, num_partitions, partition_id, d.partition, cfg.seed, d.alpha, d.classes_per_client, d.val_fraction
    )


def check_partition(cfg: ExperimentConfig) -> None:
    """The clients' shards can be cut from the training set (as :func:`client_shard` will): a
    :class:`~fedprune.config.ConfigError` naming the keys and the training set's size otherwise, before any client starts."""
    from fedprune.config import ConfigError
    from fedprune.data import partition_indices

    train, _ = load_data(cfg)
    d, n = cfg.data, cfg.federated.num_clients
    try:  # the partition itself (cached in this process), not only its arguments: a Dirichlet draw can fail too
        parts = partition_indices(train.labels, n, d.partition, cfg.seed, d.alpha, d.classes_per_client)
    except ValueError as exc:
        raise ConfigError(f"data.partition = {d.partition!r} for federated.num_clients = {n} cannot be cut from the "
                          f"{len(train)} training images of data.dataset = {d.dataset!r}: {exc}") from None
    held = np.unique(np.asarray(train.labels)[np.concatenate(parts)]) if parts else np.array([], dtype=int)
    unused = sorted(set(np.unique(train.labels).tolist()) - set(held.tolist()))
    if unused:  # pathological shards with fewer clients than classes: no client learns these, the test split has them
        left = int(np.isin(train.labels, unused).sum())
        log.warning("data.partition = %r with data.classes_per_client = %d for federated.num_clients = %d gives classes %s to no "
                    "client: %d of %d training images are never used, while the test split still has those classes",
                    d.partition, d.classes_per_client, n, unused, left, len(train))


def client_profile(cfg: ExperimentConfig, partition_id: int, num_partitions: int) -> str:
    """This client's device profile (by the configured proportions, seeded)."""
    return assign_profiles(num_partitions, cfg.federated.proportions, cfg.seed)[partition_id]


@functools.lru_cache(maxsize=32)
def _skeleton(model_name: str, kwargs_items: tuple, mask_key: bytes, mask: StructuredMask) -> torch.nn.Module:
    model = get_model(model_name, **dict(kwargs_items))
    groups = groups_for(model_name, **dict(kwargs_items))
    return extract_submodel(model, mask, groups)


def submodel(cfg: ExperimentConfig, mask: StructuredMask, state: dict | None = None) -> torch.nn.Module:
    """The architecture of ``mask``'s sub-network (physically smaller), optionally loaded with ``state``."""
    mask.validate(model_groups(cfg))
    model = copy.deepcopy(_skeleton(cfg.model.name, tuple(sorted(model_kwargs(cfg).items())), mask.key(), mask))
    if state is not None:
        model.load_state_dict(state, strict=False)
    return model


@functools.lru_cache(maxsize=8)
def _sub_groups(model_name: str, kwargs_items: tuple, mask_key: bytes, mask: StructuredMask) -> ChannelGroups:
    with torch.random.fork_rng(devices=[]):  # tracing draws example inputs; the caller's stream must not move
        return discover_groups(copy.deepcopy(_skeleton(model_name, kwargs_items, mask_key, mask)))


def client_register(cfg: ExperimentConfig, partition_id: int, num_partitions: int, profile: str | None = None) -> dict:
    """What the server needs to know about a client: profile and data sizes (no data).

    ``profile`` is the device class the node declares (``profile`` in its SuperNode's node
    config); it replaces the seeded assignment of :func:`client_profile` and must be one of the
    config's profiles (``ValueError`` otherwise).
    """
    if profile is not None and str(profile) not in cfg.profiles:
        raise ValueError(f"node config 'profile' = {profile!r} of partition {partition_id} is not a known profile; "
                         f"allowed: {sorted(cfg.profiles)}")
    shard = client_shard(cfg, partition_id, num_partitions)
    return {
        "partition-id": partition_id,
        "profile": str(profile) if profile is not None else client_profile(cfg, partition_id, num_partitions),
        "num-train": shard.num_train,
        "num-val": shard.num_val,
        "label-histogram": list(shard.label_histogram),
    }


def client_importance(
    cfg: ExperimentConfig,
    partition_id: int,
    num_partitions: int,
    dense_state: dict,
    criterion: str,
    num_batches: int,
    sensitivity: bool,
    ratios: tuple[float, ...],
    round_num: int = 0,
    scope: StructuredMask | None = None,
) -> dict:
    """Score channels (and optionally layer sensitivity) of the global model on the private shard.

    ``scope``: the channels still in the network (progressive pruning: those some client holds);
    ``dense_state`` is then that sub-network's state, which is scored as the physically extracted
    sub-network it is (its layer sensitivity too), and the channels outside it score 0. None: the
    dense model.

    Returns ``{"scores": {group: vector}, "sensitivity": {group: float} | None,
    "num-examples": training examples on this client (the consensus weight),
    "scored-samples": samples the criterion actually used (0 for weight-only criteria)}``.
    If the partition is one of the ``federated.adversarial_fraction`` adversarial ones, the
    scores are poisoned (:func:`fedprune.adversarial.maybe_poison`; sensitivity stays honest).
    """
    scope = pruned_scope(scope)
    train, _ = load_data(cfg)
    shard = client_shard(cfg, partition_id, num_partitions)
    local = shard.train_idx[:CLIENT_SCORE_SUBSET]
    scores, sens = _score(cfg, dense_state, train.subset(local), train.subset(shard.val_idx if shard.num_val else local),
                          criterion, num_batches, sensitivity, ratios, client_seed(cfg, partition_id, round_num), scope)
    fed = cfg.federated  # a simulated adversarial partition replaces its scores (fedprune.adversarial)
    sent, _ = maybe_poison(scores.scores, partition_id, num_partitions, fed.adversarial_fraction, fed.adversarial_mode,
                           cfg.seed, fed.adversarial_scale, round_num)
    if scope is not None:
        sent = scope.widen(sent)  # the original index space, 0 outside the scope
    return {"scores": sent, "sensitivity": sens, "num-examples": shard.num_train, "scored-samples": scores.num_samples}


def central_importance(cfg: ExperimentConfig, num_partitions: int, dense_state: dict, sensitivity: bool,
                       round_num: int = 0, scope: StructuredMask | None = None) -> tuple[dict[str, np.ndarray], dict[str, float] | None]:
    """Channel scores (and optionally layer sensitivity) as a server holding every client's data would compute them.

    The baseline of mask source ``"central"`` (:class:`fedprune.federated.FederatedPruning`):
    ``pruning.criterion`` on the union of the images the clients score (the
    first :data:`CLIENT_SCORE_SUBSET` of every shard), shuffled so batches mix
    clients, over ``pruning.num_batches`` x ``num_partitions`` batches (as many
    as all clients score together; ``dense_state`` and ``scope`` as in
    :func:`client_importance`); sensitivity (``pruning.sensitivity_ratios``)
    on the union of their validation images. Only a simulation can do this: no
    federated client sends data. Seeded from ``cfg.seed`` and ``round_num`` in a
    fork of torch's RNG, so the caller's stream does not move. Returns
    ``(scores, sensitivity)``.
    """
    pr, scope = cfg.pruning, pruned_scope(scope)
    train, _ = load_data(cfg)
    shards = [client_shard(cfg, p, num_partitions) for p in range(num_partitions)]
    rng = np.random.default_rng([cfg.seed, round_num, 271828])
    pooled = rng.permutation(np.concatenate([s.train_idx[:CLIENT_SCORE_SUBSET] for s in shards]))
    val = np.concatenate([s.val_idx if s.num_val else s.train_idx[:CLIENT_SCORE_SUBSET] for s in shards])
    with torch.random.fork_rng(devices=[]):
        scores, sens = _score(cfg, dense_state, train.subset(pooled), train.subset(val), pr.criterion, pr.num_batches * num_partitions,
                              sensitivity, tuple(pr.sensitivity_ratios), int(rng.integers(2**31)), scope)
    return (scope.widen(scores.scores) if scope is not None else scores.scores), sens


def _score(cfg: ExperimentConfig, state: dict, score_set, val_set, criterion: str, num_batches: int, sensitivity: bool,
           ratios: tuple[float, ...], seed: int, scope: StructuredMask | None = None):
    """``criterion``'s scores of the model ``state`` on ``score_set`` (eval transform, ``num_batches`` batches) and,
    if ``sensitivity``, the layer sensitivity on ``val_set`` (else None); torch is seeded with ``seed`` first.
    ``state`` is the dense model's, or with a pruned ``scope`` that sub-network's: it is scored physically
    extracted, and the scores are the sub-network's (``scope.widen`` places them in the original index space)."""
    if pruned_scope(scope) is None:
        groups = model_groups(cfg)
        model = build_model(cfg)
        model.load_state_dict(state)
    else:
        model = submodel(cfg, scope, state)
        groups = _sub_groups(cfg.model.name, tuple(sorted(model_kwargs(cfg).items())), scope.key(), scope)
    set_seed(seed)
    scores = compute_importance(criterion, model, groups, make_loader(score_set, cfg.train.batch_size, train=False), num_batches)
    sens = None
    if sensitivity:
        sens = measure_sensitivity(model, groups, scores.scores, make_loader(val_set, 256, train=False), ratios).score()
    return scores, sens


def client_train(
    cfg: ExperimentConfig,
    partition_id: int,
    num_partitions: int,
    mask: StructuredMask,
    sub_state: dict,
    epochs: int,
    batch_size: int,
    round_num: int,
    gates: dict | None = None,
    inner_masks: list[StructuredMask] | None = None,
) -> tuple[dict, dict, dict | None]:
    """Fine-tune the received sub-network on the private shard; returns (state, metrics, dynamic state).

    ``inner_masks`` (original index space, each a subset of ``mask``): the
    narrower sub-networks nested in this one (``federated.nested_training``);
    every step also trains them, with distillation from this sub-network's
    outputs (:func:`fedprune.nested.train_nested`).

    ``gates`` is the sub-network's dynamic state (:mod:`fedprune.dynamic`), by
    ``dynamic.method``: ``gates`` -- channel-gate parameters, trained on the
    shard for ``dynamic.epochs`` after fine-tuning with the sub-network
    frozen; ``widths`` -- channel orders and per-width BatchNorm statistics
    (:meth:`~fedprune.dynamic.NestedWidthCNN.dynamic_state`): the fine-tuning
    itself trains every width of ``dynamic.widths`` (sandwich rule), and each
    narrower width's statistics are then measured on the shard. The trained
    state is returned in the same form.
    """
    train_arrays, _ = load_data(cfg)
    shard = client_shard(cfg, partition_id, num_partitions)
    model = submodel(cfg, mask, sub_state)
    seed = client_seed(cfg, partition_id, round_num)
    set_seed(seed)  # after building the model: cache misses must not shift the RNG stream
    loader = make_loader(train_arrays.subset(shard.train_idx), batch_size, train=True, seed=seed)
    dyn = cfg.dynamic
    nested = NestedWidthCNN.from_dynamic_state(model, gates, dyn.round_to) if gates is not None and dyn.method == "widths" else None
    start = time.perf_counter()
    tc = train_config(cfg, epochs=epochs, batch_size=batch_size)
    if epochs <= 0:
        out = {"loss": float("nan")}
    elif nested is not None:
        out = train_widths(nested, loader, tc, dyn.widths, dyn.width_distill, narrow_ce=dyn.narrow_ce)
    elif inner_masks:
        groups = model_groups(cfg)
        local = [inner_channel_masks(mask, m, groups) for m in inner_masks]
        out = train_nested(model, groups, local, loader, tc, cfg.federated.nested_distill)
    else:
        out = train(model, loader, tc)
    # Static BN: statistics of the final weights on this shard (batch-averaged, see recalibrate_bn).
    stats_loader = make_loader(train_arrays.subset(shard.train_idx), 256, train=False)
    recalibrate_bn(model, stats_loader)
    metrics = {"num-examples": shard.num_train, "train-loss": float(out["loss"]), "compute-s": time.perf_counter() - start}
    trained_gates = None
    if nested is not None:
        nested.calibrate_bn(stats_loader, dyn.widths)
        trained_gates = nested.dynamic_state(dyn.widths)
        metrics["compute-s"] = time.perf_counter() - start
    elif gates is not None:
        gated = gated_model(cfg, model, gates)
        if dyn.epochs > 0:
            stats = train_gates(gated, loader, train_config(cfg, epochs=dyn.epochs, batch_size=batch_size, lr=dyn.lr), dyn.train_budgets, dyn.distill)
            metrics["gate-loss"] = float(stats["loss"])
            metrics["compute-s"] = time.perf_counter() - start
        trained_gates = gate_state(gated)
    return {k: v.detach() for k, v in model.state_dict().items()}, metrics, trained_gates


def client_bn_stats(cfg: ExperimentConfig, partition_id: int, num_partitions: int, mask: StructuredMask, sub_state: dict,
                    widths: dict | None = None) -> tuple[dict, dict | None, int]:
    """Static BN (HeteroFL): BatchNorm running statistics of the received (final, global)
    sub-network on this client's training shard, forward passes only, no training; returns
    (``running_mean``/``running_var`` per BN layer, the narrower widths' statistics or None,
    examples used). ``widths``: the sub-network's dynamic state of method ``widths``
    (:func:`fedprune.dynamic.width_state`), whose narrower widths are measured too and
    returned as its ``bn[<width>].<block>.mean/.var`` entries. The server pools them
    (:func:`fedprune.aggregation.pool_bn_stats`)."""
    train_arrays, _ = load_data(cfg)
    shard = client_shard(cfg, partition_id, num_partitions)
    model = submodel(cfg, mask, sub_state)
    loader = make_loader(train_arrays.subset(shard.train_idx), 256, train=False)
    seen = recalibrate_bn(model, loader)
    stats = {k: v.detach() for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    width_stats = None
    if widths is not None:
        nested = NestedWidthCNN.from_dynamic_state(model, widths, cfg.dynamic.round_to)
        nested.calibrate_bn(loader, cfg.dynamic.widths)
        width_stats = {k: v for k, v in nested.dynamic_state(cfg.dynamic.widths).items() if k.endswith((".mean", ".var"))}
    return stats, width_stats, seen


def initial_width_state(cfg: ExperimentConfig, model: nn.Module, mask: StructuredMask, ranking) -> dict:
    """Dynamic state (method ``widths``, :func:`fedprune.dynamic.width_state`) of the sub-network of ``mask``
    in ``model`` (dense or any width with the mask's groups): each conv block's kept channels ordered by
    ``ranking`` (scores in the original index space, e.g. the consensus; ties to the lower index), BatchNorm
    statistics not yet measured."""
    dyn = cfg.dynamic
    names = {m: n for n, m in model.named_modules()}
    kept = [mask.kept(names[conv]) for conv, _, _ in conv_blocks(model)]
    orders = [torch.as_tensor(descending_order(np.asarray(ranking[names[conv]], dtype=np.float64)[k]), dtype=torch.long)
              for (conv, _, _), k in zip(conv_blocks(model), kept)]
    check_distinct_widths(dyn.widths, [k.size for k in kept], dyn.round_to)
    widths = [w for w in dyn.widths if [keep_count(w, k.size, dyn.round_to) for k in kept] != [k.size for k in kept]]
    stats = {w: [(torch.zeros(keep_count(w, k.size, dyn.round_to)), torch.ones(keep_count(w, k.size, dyn.round_to))) for k in kept] for w in widths}
    return width_state(orders, stats, calibrated=False)


def gated_model(cfg: ExperimentConfig, model: nn.Module, gates: dict | None = None):
    """:class:`fedprune.dynamic.GatedCNN` around ``model`` (eval mode, ``dynamic.gated_layers``), loaded with ``gates`` when given."""
    from fedprune.dynamic import GatedCNN

    gated = GatedCNN(model, cfg.dynamic.gated_layers or None, cfg.dynamic.round_to).eval()
    if gates is not None:
        gated.load_state_dict(gates, strict=False)
    return gated


def gate_state(gated) -> dict:
    """The gate parameters of a GatedCNN (names ``gates.*``), detached."""
    return {k: v.detach().clone() for k, v in gated.state_dict().items() if k.startswith("gates.")}


def client_evaluate(cfg: ExperimentConfig, partition_id: int, num_partitions: int, mask: StructuredMask, sub_state: dict) -> dict:
    """Accuracy and loss of the received sub-network on the local validation split."""
    train_arrays, _ = load_data(cfg)
    shard = client_shard(cfg, partition_id, num_partitions)
    if shard.num_val == 0:
        return {"num-examples": 0, "accuracy": float("nan"), "loss": float("nan")}
    model = submodel(cfg, mask, sub_state)
    m = evaluate(model, make_loader(train_arrays.subset(shard.val_idx), 256, train=False))
    return {"num-examples": int(m["num_examples"]), "accuracy": float(m["accuracy"]), "loss": float(m["loss"])}


def pruned_accuracy(cfg: ExperimentConfig, dense_state: dict, mask: StructuredMask, bn_partitions: int | None = None) -> float:
    """Test accuracy (fraction in [0, 1]) of ``mask``'s sub-network cut from the dense model ``dense_state``,
    right after pruning: no fine-tuning.

    ``bn_partitions=None`` keeps the dense model's BatchNorm running statistics. ``bn_partitions=n``
    gives the sub-network the statistics that static BN gives it in a run of ``n`` clients: each client
    measures them on its training shard (:func:`client_bn_stats`) and they are pooled
    (:func:`fedprune.aggregation.pool_bn_stats`). A simulation-side diagnostic: every client's shard is
    read in this process.
    """
    model = build_model(cfg)
    model.load_state_dict(dense_state)
    sub = extract_submodel(model, mask, model_groups(cfg))
    if bn_partitions:
        replies = [client_bn_stats(cfg, p, bn_partitions, mask, sub.state_dict()) for p in range(bn_partitions)]
        sub.load_state_dict(pool_bn_stats([stats for stats, _, _ in replies], [n for _, _, n in replies]), strict=False)
    _, test_arrays = load_data(cfg)
    return float(evaluate(sub, make_loader(test_arrays, 256, train=False))["accuracy"])


# ------------------------------------------------------------------ hardware
def hardware_model(cfg: ExperimentConfig, model: nn.Module | None = None):
    """The :class:`fedprune.cost.HardwareModel` of the configured architecture (LUT threads = eval.latency_threads)."""
    from fedprune.cost import HardwareModel

    if model is None:
        model = build_model(cfg)
    return HardwareModel(cfg.model.name, model_kwargs(cfg), model, model_groups(cfg), threads=cfg.eval.latency_threads,
                         latency_margin=cfg.pruning.latency_margin)


def profile_constraints(cfg: ExperimentConfig, hardware, names, scale: float = 1.0) -> list[list]:
    """Per profile in ``names``: its budgets as ``(cost_fn, limit)`` pairs in device units.

    A profile without budgets is held to its channel sparsity target as a
    kept-channel count (every channel costs one unit).
    """
    from fedprune.allocation import total_channels

    out = []
    for name in names:
        prof = cfg.profiles[name]
        if prof.budgets:
            out.append(hardware.constraints(prof.budgets, prof.compute_speed, scale))
        else:
            total = hardware.groups.total_channels
            out.append([(total_channels, total * (1.0 - prof.sparsity * scale))])
    return out


#: Kept-channel multiple of the budget allocations when ``pruning.round_to`` is 0: CPU
#: kernels (oneDNN) run channel counts off a multiple of 8 about 10% slower, even with
#: fewer channels, and the latency tables are measured at such multiples.
BUDGET_ROUND_TO = 8


def budget_round_to(cfg: ExperimentConfig) -> int:
    """``pruning.round_to`` for budget allocations (:data:`BUDGET_ROUND_TO` when unset)."""
    return cfg.pruning.round_to or BUDGET_ROUND_TO


#: How often :func:`profile_budget_masks` may allocate again after timing the chosen sub-networks.
LATENCY_REFITS = 3


def budget_group_weights(cfg: ExperimentConfig, sensitivity) -> dict[str, float] | None:
    """Per-group weights of lost importance for allocation ``budget`` (None: unweighted).

    ``(layer sensitivity / mean) ** pruning.budget_sensitivity``
    (:func:`fedprune.allocation.importance_weights`); ``sensitivity`` is one
    number per group (e.g. :meth:`fedprune.sensitivity.LayerSensitivity.score`
    or the clients' aggregate) and is required when the power is > 0.
    """
    from fedprune.allocation import importance_weights

    pr = cfg.pruning
    if not pr.budget_weighted:
        return None
    if sensitivity is None:
        raise ValueError(f"pruning.budget_sensitivity = {pr.budget_sensitivity:g} weights the budget allocation by layer sensitivity, "
                         "but none was measured (set it to 0 for an unweighted allocation)")
    return importance_weights(sensitivity, pr.budget_sensitivity)


def profile_budget_masks(cfg: ExperimentConfig, hardware, scores, names, scale: float = 1.0, group_weights=None,
                         within: StructuredMask | None = None):
    """Nested masks for ``names`` (most capable first) by ``cfg.pruning.allocation`` (a budget allocation).

    ``group_weights`` (allocation ``budget`` only; from :func:`budget_group_weights`) weight
    each group's lost importance. ``within``: allocate inside this mask's channels (progressive
    pruning); ``scores`` are then over its kept channels (:meth:`StructuredMask.narrow`), and the
    masks returned are in the original index space, subsets of it.

    For the final budgets (``scale`` 1) of every allocation but ``constant_cost`` the loop is closed on
    measurement: each profile's sub-network with a latency budget is timed on this host
    (:meth:`fedprune.cost.HardwareModel.refit_latency`) and, where the latency table was off, the
    masks are allocated again with corrected predictions (at most :data:`LATENCY_REFITS` times).
    The result is the last masks timed within their band, else the last ones not too slow, else
    the last ones allocated. A correction can make a budget look infeasible (e.g. one timing on a
    busy host came out far too slow); the refits then stop there with that same choice instead of
    failing (runs check feasibility on the uncorrected table before training), and corrections
    left by an earlier call that rule out every network are dropped.
    """
    from fedprune.allocation import InfeasibleBudgetError, budget_masks

    pr = cfg.pruning
    fallback = None
    groups = within.narrowed_groups(hardware.groups) if within is not None else hardware.groups
    for attempt in range(LATENCY_REFITS + 1):
        constraints = profile_constraints(cfg, hardware, names, scale)
        try:
            masks = budget_masks(pr.allocation, groups, scores, constraints, pr.min_channels, budget_round_to(cfg),
                                 objective=pr.budget_objective, group_weights=group_weights)
            masks = [within.widen_mask(m) for m in masks] if within is not None else masks
        except InfeasibleBudgetError as err:
            if not hardware.latency_corrections:
                raise err.naming(names) from None  # infeasible by the cost model itself
            if attempt == 0:  # corrections from an earlier step (e.g. progressive pruning) rule out every network
                log.warning("[hardware] latency budgets of %s: the timing corrections %s find them infeasible (%s); dropping the "
                            "corrections and allocating again", ", ".join(names), hardware.latency_corrections, err.naming(names))
                hardware.latency_corrections.clear()
                continue
            log.warning("[hardware] latency budgets of %s: after timing, the corrected latency table finds them infeasible (%s); "
                        "stopping the refits and using %s", ", ".join(names), err.naming(names),
                        "the last allocation that was not too slow" if fallback is not None else "the last allocation")
            return fallback if fallback is not None else masks
        if scale < 1.0 or pr.allocation == "constant_cost":
            return masks
        # "ok" without timing anything for profiles that have no latency budget
        status = [hardware.refit_latency(cfg.profiles[n].budgets, m, cfg.profiles[n].compute_speed, cfg.eval.latency_repeats)
                  for n, m in zip(names, masks)]
        if all(s == "ok" for s in status):
            return masks
        if "slow" not in status:
            fallback = masks
    log.warning("[hardware] latency budgets of %s: no allocation timed within the aimed band after %d refits; using %s",
                ", ".join(names), LATENCY_REFITS, "the last one that was not too slow" if fallback is not None else "the last one")
    return fallback if fallback is not None else masks
