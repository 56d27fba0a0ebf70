"""Flower ClientApp: thin handlers that unpack records and call :mod:`fedprune.task`.

Message types (the server sends the resolved experiment config in every
``config`` record, so clients need no local config files):

* ``query.register``   -> profile, shard sizes, label histogram
* ``query.importance`` -> per-group channel importance (+ layer sensitivity)
                          and the number of samples used; no weights
* ``train``            -> fine-tune the received sub-network, return it
* ``evaluate``         -> accuracy of the received sub-network on local val

A client learns its partition from ``context.node_config["partition-id"]``
and ``["num-partitions"]`` (set by the Simulation Engine, or by
``flower-supernode --node-config`` in a deployment).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedprune.records import (
    record_to_config,
    record_to_mask,
    record_to_state,
    state_to_record,
    vectors_to_record,
)
from fedprune.task import client_evaluate, client_importance, client_register, client_train, model_groups

app = ClientApp()

#: Keys of ``context.state`` where the last global model sent for evaluation is cached.
CACHED_MODEL, CACHED_META = "cached-global-model", "cached-global-meta"


def _partition(context: Context) -> tuple[int, int]:
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


@app.query("register")
def register(msg: Message, context: Context) -> Message:
    cfg = record_to_config(msg.content["config"])
    info = client_register(cfg, *_partition(context))
    hist = info.pop("label-histogram")
    reply = RecordDict({"info": ConfigRecord({**info, "label-histogram": hist})})
    return Message(reply, reply_to=msg)


@app.query("importance")
def importance(msg: Message, context: Context) -> Message:
    conf = msg.content["config"]
    cfg = record_to_config(conf)
    if "arrays" in msg.content:
        state = record_to_state(msg.content["arrays"])
    else:  # use the global model cached by the last evaluate message, if it is the right version
        meta = context.state.get(CACHED_META)
        if meta is None or meta["version"] != conf["model-version"]:
            return Message(RecordDict({"metrics": MetricRecord({"needs-model": 1})}), reply_to=msg)
        state = record_to_state(context.state[CACHED_MODEL])
    out = client_importance(
        cfg, *_partition(context), state, str(conf["criterion"]), int(conf["num-batches"]),
        bool(conf["sensitivity"]), tuple(float(r) for r in conf["ratios"]), int(conf["round"]),
    )
    content = {"importance": vectors_to_record(out["scores"]), "metrics": MetricRecord({"num-examples": out["num-examples"], "scored-samples": out["scored-samples"]})}
    if out["sensitivity"] is not None:
        content["sensitivity"] = vectors_to_record({k: [v] for k, v in out["sensitivity"].items()})
    return Message(RecordDict(content), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    conf = msg.content["config"]
    cfg = record_to_config(conf)
    mask = record_to_mask(msg.content["mask"], model_groups(cfg))
    gates = record_to_state(msg.content["gates"]) if "gates" in msg.content else None
    state, metrics, gates = client_train(
        cfg, *_partition(context), mask, record_to_state(msg.content["arrays"]),
        int(conf["epochs"]), int(conf["batch-size"]), int(conf["round"]), gates,
    )
    reply = RecordDict({"arrays": state_to_record(state), "metrics": MetricRecord(metrics)})
    if gates is not None:
        reply["gates"] = state_to_record(gates)
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    conf = msg.content["config"]
    cfg = record_to_config(conf)
    mask = record_to_mask(msg.content["mask"], model_groups(cfg))
    if bool(conf.get("cache-model", False)):
        context.state[CACHED_MODEL] = msg.content["arrays"]
        context.state[CACHED_META] = ConfigRecord({"version": conf["model-version"]})
    metrics = client_evaluate(cfg, *_partition(context), mask, record_to_state(msg.content["arrays"]))
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


__all__ = ["app"]
