"""Flower ClientApp: thin handlers that unpack records and call :mod:`fedprune.task`.

Message types (the server sends the resolved experiment config in every
``config`` record, so clients need no local config files):

* ``query.register``   -> profile, shard sizes, label histogram
* ``query.importance`` -> per-group channel importance (+ layer sensitivity)
                          and the number of samples used; no weights
* ``train``            -> fine-tune the received sub-network, return it (with
                          ``inner-mask.<i>`` records: also train those nested
                          sub-networks, see :mod:`fedprune.nested`)
* ``evaluate``         -> accuracy of the received sub-network on local val

* ``query.bnstats``    -> static BN after the last round: BatchNorm statistics of
                          the received final sub-network on the training shard
                          (forward passes only; with a ``gates`` record of dynamic
                          method "widths" also each narrower width's), and the
                          number of examples

With ``cache-model`` in its config, an ``evaluate`` or ``train`` message's model and
mask are kept in ``context.state`` for the ``query.importance`` that follows, which
then carries no model (the last warm-up round's ``train`` with
``federated.score_model = "last_warmup"``; else an ``evaluate`` just before). The
model scored is the mask's sub-network (dense before the first consensus; in
progressive pruning, the channels some client still holds), physically extracted;
its scores go back in the original index space, 0 outside it.

``train`` and ``query.importance`` may fail on purpose, deterministically from the
seed, with the client profile's ``failure_prob`` (see :mod:`fedprune.reliability`).

A client learns its partition from ``context.node_config["partition-id"]``
and ``["num-partitions"]`` (set by the Simulation Engine, or by
``flower-supernode --node-config`` in a deployment). A real device may also
declare its profile there (``profile="microcontroller"``); it replaces the
seeded assignment and must name a profile of the config.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedprune.records import (
    get_inner_masks,
    record_to_config,
    record_to_mask,
    record_to_state,
    state_to_record,
    vectors_to_record,
)
from fedprune.reliability import SimulatedClientFailure, client_failure, simulate_hang
from fedprune.task import client_bn_stats, client_evaluate, client_importance, client_register, client_train, model_groups

app = ClientApp()

#: Keys of ``context.state`` where the last global model sent for evaluation is cached, with its mask.
CACHED_MODEL, CACHED_MASK, CACHED_META = "cached-global-model", "cached-global-mask", "cached-global-meta"


def _cache_model(msg: Message, context: Context) -> None:
    """Keep the message's global model (the sub-network of its mask) in ``context.state`` when the server asks
    for it (``cache-model``): the importance round that follows scores it without sending it again."""
    conf = msg.content["config"]
    if bool(conf.get("cache-model", False)):
        context.state[CACHED_MODEL] = msg.content["arrays"]
        context.state[CACHED_MASK] = msg.content["mask"]
        context.state[CACHED_META] = ConfigRecord({"version": conf["model-version"]})


def _partition(context: Context) -> tuple[int, int]:
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


def _declared_profile(context: Context) -> str | None:
    """The device profile the node declares (``--node-config "... profile='mobile_cpu'"``), if any."""
    profile = context.node_config.get("profile")
    return None if profile in (None, "") else str(profile)


def _simulated_failure(msg: Message, context: Context, cfg, phase: str) -> Message | None:
    """This client's simulated failure on this message (profile failure_prob, see fedprune.reliability).

    ``crash`` raises, so Flower answers with an error reply; ``drop`` answers with the error
    Flower's SuperLink gives for a node that stopped responding; ``hang`` stalls just past
    ``federated.reply_timeout_s``, so the server stops waiting first. ``None``: no failure.
    """
    conf = msg.content["config"]
    pid, num = _partition(context)
    mode = client_failure(cfg, pid, num, phase, int(conf["round"]), int(conf.get("attempt", 0)), _declared_profile(context))
    if mode is None:
        return None
    what = f"simulated {mode} of partition {pid} in {phase} round {conf['round']}"
    if mode == "crash":
        raise SimulatedClientFailure(what)
    if mode == "hang":
        simulate_hang(cfg.federated.reply_timeout_s)
        return Message(Error(ErrorCode.CLIENT_APP_CRASHED, f"{what} (replied after the timeout)"), reply_to=msg)
    return Message(Error(ErrorCode.NODE_UNAVAILABLE, what), reply_to=msg)


@app.query("register")
def register(msg: Message, context: Context) -> Message:
    cfg = record_to_config(msg.content["config"])
    info = client_register(cfg, *_partition(context), _declared_profile(context))
    hist = info.pop("label-histogram")
    reply = RecordDict({"info": ConfigRecord({**info, "label-histogram": hist})})
    return Message(reply, reply_to=msg)


@app.query("importance")
def importance(msg: Message, context: Context) -> Message:
    conf = msg.content["config"]
    cfg = record_to_config(conf)
    if (failure := _simulated_failure(msg, context, cfg, "importance")) is not None:
        return failure
    if "arrays" in msg.content:  # with a mask: that sub-network (progressive pruning), else the dense model
        state, scope = record_to_state(msg.content["arrays"]), msg.content.get("mask")
    else:  # use the global model cached by the last evaluate message, if it is the right version
        meta = context.state.get(CACHED_META)
        if meta is None or meta["version"] != conf["model-version"]:
            return Message(RecordDict({"metrics": MetricRecord({"needs-model": 1})}), reply_to=msg)
        state, scope = record_to_state(context.state[CACHED_MODEL]), context.state[CACHED_MASK]
        # Used once: dropping it keeps the node's Context small between rounds (a retry, or a later
        # importance round, is preceded by an evaluation that caches the model again, or sends it).
        del context.state[CACHED_MODEL], context.state[CACHED_MASK], context.state[CACHED_META]
    out = client_importance(
        cfg, *_partition(context), state, str(conf["criterion"]), int(conf["num-batches"]),
        bool(conf["sensitivity"]), tuple(float(r) for r in conf["ratios"]), int(conf["round"]),
        record_to_mask(scope, model_groups(cfg)) if scope is not None else None,
    )
    content = {"importance": vectors_to_record(out["scores"]), "metrics": MetricRecord({"num-examples": out["num-examples"], "scored-samples": out["scored-samples"]})}
    if out["sensitivity"] is not None:
        content["sensitivity"] = vectors_to_record({k: [v] for k, v in out["sensitivity"].items()})
    return Message(RecordDict(content), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    conf = msg.content["config"]
    cfg = record_to_config(conf)
    if (failure := _simulated_failure(msg, context, cfg, "train")) is not None:
        return failure
    _cache_model(msg, context)  # federated.score_model = "last_warmup": the last warm-up round's model, before training
    mask = record_to_mask(msg.content["mask"], model_groups(cfg))
    gates = record_to_state(msg.content["gates"]) if "gates" in msg.content else None
    inner = get_inner_masks(msg.content, model_groups(cfg))
    received = record_to_state(msg.content["arrays"])
    state, metrics, gates = client_train(
        cfg, *_partition(context), mask, received,
        int(conf["epochs"]), int(conf["batch-size"]), int(conf["round"]), gates, inner,
    )
    # Send back exactly the arrays received (the server checks names, shapes and dtypes);
    # integer buffers such as num_batches_tracked never travel.
    reply = RecordDict({"arrays": state_to_record({k: state[k] for k in received}), "metrics": MetricRecord(metrics)})
    if gates is not None:
        reply["gates"] = state_to_record(gates)
    return Message(reply, reply_to=msg)


@app.query("bnstats")
def bn_stats(msg: Message, context: Context) -> Message:
    cfg = record_to_config(msg.content["config"])
    mask = record_to_mask(msg.content["mask"], model_groups(cfg))
    widths = record_to_state(msg.content["gates"]) if "gates" in msg.content else None
    stats, width_stats, seen = client_bn_stats(cfg, *_partition(context), mask, record_to_state(msg.content["arrays"]), widths)
    reply = RecordDict({"arrays": state_to_record(stats), "metrics": MetricRecord({"num-examples": seen})})
    if width_stats is not None:
        reply["widths"] = state_to_record(width_stats)
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    conf = msg.content["config"]
    cfg = record_to_config(conf)
    mask = record_to_mask(msg.content["mask"], model_groups(cfg))
    _cache_model(msg, context)
    metrics = client_evaluate(cfg, *_partition(context), mask, record_to_state(msg.content["arrays"]))
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


__all__ = ["app"]
