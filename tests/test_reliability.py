"""Client failures (crash / hang / drop, retry / skip policy) and validation of client replies."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import torch
from flwr.app import MetricRecord, RecordDict

from fedprune.config import ConfigError, load_config
from fedprune.federated import FederatedPruning, GridTransport, InProcessTransport, Reply
from fedprune.masks import StructuredMask
from fedprune.records import config_to_record, record_to_vectors, state_to_record, vectors_to_record
from fedprune.reliability import SimulatedClientFailure, client_failure, draw_failure, hang_seconds
from fedprune.validation import (
    ArraySpec,
    check_count,
    check_importance,
    check_state,
    parse_train_reply,
)

from conftest import TINY
LOGGER = "fedprune.server"


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, TINY)


# ------------------------------------------------------------------ transports
def _failed(node: int, down: int = 0) -> Reply:
    return Reply(node, None, "error reply, node unavailable: scripted", down, 0)


class ScriptedTransport:
    """Wraps a transport; ``fail(node, message_type, attempt)`` decides which clients fail (error reply)."""

    def __init__(self, inner, fail):
        self.inner, self.fail, self.timeout = inner, fail, None
        self.calls: list[tuple[int, str, int]] = []

    def node_ids(self):
        return self.inner.node_ids()

    def exchange(self, requests):
        out, passed = {}, []
        for i, (node, mtype, content) in enumerate(requests):
            attempt = int(content["config"].get("attempt", 0)) if "config" in content else 0
            self.calls.append((node, mtype, attempt))
            if self.fail(node, mtype, attempt):
                out[i] = _failed(node)
            else:
                passed.append((i, (node, mtype, content)))
        for (i, _), rep in zip(passed, self.inner.exchange([r for _, r in passed])):
            out[i] = rep
        return [out[i] for i in range(len(requests))]


class RecordingTransport:
    """Real in-process clients; keeps every reply by (node, message type)."""

    def __init__(self, n):
        self.inner = InProcessTransport(n)
        self.timeout = None
        self.replies: dict[tuple[int, str], Reply] = {}

    def node_ids(self):
        return self.inner.node_ids()

    def exchange(self, requests):
        out = self.inner.exchange(requests)
        for (node, mtype, _), rep in zip(requests, out):
            self.replies[(node, mtype)] = rep
        return out


class ReplayTransport:
    """Replays recorded replies; ``corrupt[(node, type)]`` rewrites a reply's content, ``absent`` nodes fail."""

    def __init__(self, recorded, corrupt=None, absent=()):
        self.recorded, self.corrupt, self.absent, self.timeout = recorded, corrupt or {}, set(absent), None

    def node_ids(self):
        return sorted({n for n, _ in self.recorded})

    def exchange(self, requests):
        out = []
        for node, mtype, _ in requests:
            rep = self.recorded[(node, mtype)]
            if node in self.absent and mtype != "query.register":
                out.append(_failed(node, rep.bytes_down))
                continue
            content = rep.content
            if (node, mtype) in self.corrupt:
                content = self.corrupt[(node, mtype)](RecordDict(dict(content.items())))
            out.append(Reply(node, content, None, rep.bytes_down, rep.bytes_up))
        return out


# ------------------------------------------------------------ failure draws
def test_failure_draws_are_deterministic_and_match_the_probability():
    modes = ["crash", "hang", "drop"]
    draws = [draw_failure(7, r, p, "train", 0.3, modes) for r in range(1, 201) for p in range(20)]
    again = [draw_failure(7, r, p, "train", 0.3, modes) for r in range(1, 201) for p in range(20)]
    assert draws == again
    rate = np.mean([d is not None for d in draws])
    assert abs(rate - 0.3) < 3 * np.sqrt(0.3 * 0.7 / len(draws))
    assert {d for d in draws if d} == set(modes)
    # other seed, phase or attempt: other draws; probability 0: never
    assert draws != [draw_failure(8, r, p, "train", 0.3, modes) for r in range(1, 201) for p in range(20)]
    assert draws != [draw_failure(7, r, p, "importance", 0.3, modes) for r in range(1, 201) for p in range(20)]
    assert draws != [draw_failure(7, r, p, "train", 0.3, modes, attempt=1) for r in range(1, 201) for p in range(20)]
    assert all(draw_failure(7, r, 0, "train", 0.0, modes) is None for r in range(100))


def test_failure_config_is_validated():
    with pytest.raises(ConfigError, match="failure_modes"):
        load_config(None, TINY + ["federated.failure_modes=['explode']"])
    with pytest.raises(ConfigError, match="failure_modes"):
        load_config(None, TINY + ["federated.failure_modes=[]"])
    with pytest.raises(ConfigError, match="reply_timeout_s"):
        load_config(None, TINY + ["federated.failure_modes=['hang']", "profiles.mobile_cpu.failure_prob=0.2"])
    with pytest.raises(ConfigError, match="on_too_few_replies"):
        load_config(None, TINY + ["federated.on_too_few_replies='ignore'"])
    ok = load_config(None, TINY + ["federated.failure_modes=['hang']", "profiles.mobile_cpu.failure_prob=0.2", "federated.reply_timeout_s=5"])
    assert ok.federated.reply_timeout_s == 5.0


def _first_failing_round(cfg, partition, phase="train"):
    return next(r for r in range(1, 500) if client_failure(cfg, partition, 3, phase, r) is not None)


def _message(cfg, round_num, mtype="train"):
    from flwr.app import Message, Metadata

    md = Metadata(run_id=0, message_id="m", src_node_id=0, dst_node_id=0, reply_to_message_id="", group_id="",
                  created_at=time.time(), ttl=60.0, message_type=mtype)
    return Message(content=RecordDict({"config": config_to_record(cfg, round=round_num)}), metadata=md)


def test_client_app_crashes_drops_and_hangs_as_flower_expects():
    from flwr.app import Context
    from flwr.common.constant import ErrorCode

    from fedprune.client_app import app

    ctx = Context(run_id=0, node_id=0, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(), run_config={})
    every = [f"profiles.{p}.failure_prob=0.5" for p in ("edge_gpu", "mobile_cpu", "microcontroller")]
    crash = load_config(None, TINY + every + ["federated.failure_modes=['crash']"])
    with pytest.raises(SimulatedClientFailure, match="simulated crash of partition 0"):
        app(_message(crash, _first_failing_round(crash, 0)), ctx)
    drop = load_config(None, TINY + every + ["federated.failure_modes=['drop']"])
    rep = app(_message(drop, _first_failing_round(drop, 0, "importance"), "query.importance"), ctx)
    assert rep.has_error() and rep.error.code == ErrorCode.NODE_UNAVAILABLE
    hang = load_config(None, TINY + every + ["federated.failure_modes=['hang']", "federated.reply_timeout_s=0.1"])
    msg = _message(hang, _first_failing_round(hang, 0))
    t0 = time.perf_counter()
    rep = app(msg, ctx)
    took = time.perf_counter() - t0
    assert hang_seconds(0.1) <= took < 1.0 and rep.has_error()
    # the in-process engine (like Grid.send_and_receive) gives up after the timeout: no reply
    [reply] = InProcessTransport(3, timeout=0.1).exchange([(0, "train", msg.content)])
    assert reply.content is None and reply.error == "no reply within the 0.1 s timeout"


def test_grid_transport_passes_the_timeout_and_turns_error_replies_into_failures(cfg, monkeypatch):
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):  # set by Flower inside a ServerApp
        monkeypatch.setattr(TaskIdentity, attr, 1)

    class FakeGrid:
        def get_node_ids(self):
            return [11, 12, 13]

        def send_and_receive(self, messages, *, timeout=None):
            self.timeout = timeout
            out = []
            for i, m in enumerate(messages):
                m.metadata.__dict__["_message_id"] = f"id{i}"  # as Grid.push_messages does
                if m.metadata.dst_node_id == 11:
                    out.append(Message(RecordDict({"metrics": MetricRecord({"x": 1})}), reply_to=m))
                elif m.metadata.dst_node_id == 12:
                    out.append(Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "boom"), reply_to=m))
            return out  # node 13 never answers

    grid = FakeGrid()
    timed = load_config(None, TINY + ["federated.reply_timeout_s=2.5"])
    transport = GridTransport(grid)
    FederatedPruning(timed, transport)  # a transport without its own timeout takes the config's
    assert transport.timeout == 2.5
    replies = transport.exchange([(n, "train", RecordDict({"config": config_to_record(cfg)})) for n in (11, 12, 13)])
    assert grid.timeout == 2.5
    assert replies[0].content is not None and replies[0].error is None
    assert replies[1].content is None and "ClientApp raised an exception: boom" in replies[1].error
    assert replies[2].content is None and replies[2].error == "no reply within the 2.5 s timeout"


# ------------------------------------------------------- runs with failures
def test_run_with_failures_completes_and_records_them():
    fail_cfg = load_config(None, TINY + ["profiles.mobile_cpu.failure_prob=0.5", "profiles.microcontroller.failure_prob=0.5",
                                         "federated.min_replies_fraction=0.3", "federated.finetune_rounds=2"])
    res = FederatedPruning(fail_cfg, InProcessTransport(3)).run()
    assert set(res["profiles"]) == {"edge_gpu", "mobile_cpu", "microcontroller"}
    total = 0
    for rec in res["rounds"]:
        assert rec["failures"] == len(rec["failed_clients"])
        total += rec["failures"]
        if rec["phase"] in ("warmup", "finetune", "importance"):
            phase = "importance" if rec["phase"] == "importance" else "train"
            expected = [p for p in range(3) if client_failure(fail_cfg, p, 3, phase, rec["round"]) is not None]
            assert sorted(f["partition"] for f in rec["failed_clients"]) == expected, rec
            for f in rec["failed_clients"]:
                assert f["profile"] in ("mobile_cpu", "microcontroller") and "simulated" in f["reason"]
    assert total > 0


def test_failed_clients_are_left_out_of_the_merge(cfg):
    """A round with failures gives the same global model as one where those clients were never there."""
    fail_cfg = load_config(None, TINY + ["profiles.mobile_cpu.failure_prob=0.5", "profiles.microcontroller.failure_prob=0.5",
                                         "federated.failure_modes=['crash', 'drop']"])
    rnd = next(r for r in range(1, 50) if sum(client_failure(fail_cfg, p, 3, "train", r) is not None for p in range(3)) == 1)
    failing = [p for p in range(3) if client_failure(fail_cfg, p, 3, "train", rnd) is not None]
    a = FederatedPruning(fail_cfg, InProcessTransport(3))
    a.register()
    rec = a.train_round(rnd, "warmup")
    assert rec["failures"] == 1 and [f["partition"] for f in rec["failed_clients"]] == failing
    b = FederatedPruning(cfg, ScriptedTransport(InProcessTransport(3), lambda n, t, k: n in failing))
    b.register()
    b.train_round(rnd, "warmup")
    _assert_same_state(a, b)


def test_too_few_replies_are_retried_with_a_fresh_draw(cfg, caplog):
    retry = load_config(None, TINY + ["federated.on_too_few_replies='retry'", "federated.max_retries=2"])
    transport = ScriptedTransport(InProcessTransport(3), lambda n, t, attempt: t == "train" and attempt == 0)
    fp = FederatedPruning(retry, transport)
    fp.register()
    before = {k: v.clone() for k, v in fp.state.items()}
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        rec = fp.train_round(1, "warmup")
    assert rec["attempts"] == 2 and not rec["skipped"] and rec["failures"] == 3 and rec["clients"] == 6
    assert [f["attempt"] for f in rec["failed_clients"]] == [0, 0, 0]
    assert [c[2] for c in transport.calls if c[1] == "train"] == [0, 0, 0, 1, 1, 1]
    assert "warmup round 1: 0 valid replies from 3 clients, fewer than the minimum 2; retrying" in caplog.text
    assert any(not torch.equal(before[k], fp.state[k]) for k in before)


def test_too_few_replies_skip_the_round(cfg, caplog):
    for policy in ("skip", "retry"):  # retry: re-sent max_retries times, then skipped
        conf = load_config(None, TINY + [f"federated.on_too_few_replies='{policy}'", "federated.max_retries=1"])
        transport = ScriptedTransport(InProcessTransport(3), lambda n, t, attempt: t == "train" and n != 0)
        fp = FederatedPruning(conf, transport)
        fp.register()
        before = {k: v.clone() for k, v in fp.state.items()}
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            rec = fp.train_round(1, "warmup")
        assert rec["skipped"] and rec["attempts"] == (1 if policy == "skip" else 2), policy
        assert rec["failures"] == 2 * rec["attempts"] and rec["valid_replies"] == 1
        assert fp.model_version == 0 and not fp.bn_stats
        assert all(torch.equal(before[k], fp.state[k]) for k in before)
        assert "warmup round 1: skipped after" in caplog.text and "the global model is unchanged" in caplog.text


def test_profile_whose_clients_all_fail_still_gets_a_mask(cfg, caplog):
    fp = FederatedPruning(cfg, None)
    fp.transport = ScriptedTransport(InProcessTransport(3), lambda n, t, k: t == "query.importance" and fp.nodes[n].profile == "microcontroller")
    fp.register()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        rec = fp.importance_round(2)
    assert rec["failures"] == 1 and rec["failed_clients"][0]["profile"] == "microcontroller" and not rec["skipped"]
    cons = fp.consensus_log[-1]
    assert cons["profiles_without_replies"] == ["microcontroller"] and cons["clients"] == 2 and cons["nested"]
    assert set(fp.profile_masks) == {"edge_gpu", "mobile_cpu", "microcontroller"}
    micro = fp.profile_masks["microcontroller"]
    assert micro.is_subset_of(fp.profile_masks["mobile_cpu"]) and abs(micro.channel_sparsity - cfg.profiles["microcontroller"].sparsity) < 0.02
    assert "no valid importance reply from profile(s) microcontroller" in caplog.text


def test_no_valid_importance_reply_is_retried_then_fails(cfg):
    for policy in ("retry", "skip"):  # with no mask yet, even "skip" re-sends before giving up
        conf = load_config(None, TINY + [f"federated.on_too_few_replies='{policy}'", "federated.max_retries=1"])
        transport = ScriptedTransport(InProcessTransport(3), lambda n, t, k: t == "query.importance")
        fp = FederatedPruning(conf, transport)
        fp.register()
        with pytest.raises(RuntimeError, match="importance round 2: no valid client reply after 2 attempt"):
            fp.importance_round(2)
        assert sorted({c[2] for c in transport.calls if c[1] == "query.importance"}) == [0, 1]


# --------------------------------------------------------- payload validation
@pytest.fixture(scope="module")
def recorded(cfg):
    """Honest replies of a register, a warm-up round and an importance round (3 in-process clients)."""
    rec = RecordingTransport(3)
    fp = FederatedPruning(cfg, rec)
    fp.register()
    fp.train_round(1, "warmup")
    imp = RecordingTransport(3)
    fp = FederatedPruning(cfg, imp)  # importance on the initial model, in a fresh server
    fp.register()
    fp.importance_round(2)
    return {**imp.replies, **rec.replies}


BAD = 1  # the client whose reply is corrupted


def _with_state(fn):
    def corrupt(content):
        state = content["arrays"].to_torch_state_dict()
        content["arrays"] = state_to_record(fn(state))
        return content
    return corrupt


def _with_metrics(**values):
    def corrupt(content):
        content["metrics"] = MetricRecord({**dict(content["metrics"]), **values})
        return content
    return corrupt


def _first_float(state):
    return next(k for k, v in state.items() if v.is_floating_point() and v.dim() > 1)


def _poke(value):
    def fn(state):
        k = _first_float(state)
        v = state[k].clone()
        v.view(-1)[3] = value
        return {**state, k: v}
    return fn


def _drop_key(state):
    k = _first_float(state)
    return {n: v for n, v in state.items() if n != k}


def _rename_key(state):
    k = _first_float(state)
    return {(n + "_renamed" if n == k else n): v for n, v in state.items()}


def _reshape(state):
    k = _first_float(state)
    return {**state, k: state[k][:-1].clone()}


def _retype(state):
    k = _first_float(state)
    return {**state, k: state[k].double()}


TRAIN_CASES = {
    "missing array": (_with_state(_drop_key), "missing"),
    "extra array": (_with_state(lambda s: {**s, "bogus.weight": torch.zeros(3)}), "unexpected 'bogus.weight'"),
    "renamed array": (_with_state(_rename_key), "missing"),
    "wrong shape": (_with_state(_reshape), "has shape"),
    "wrong dtype": (_with_state(_retype), "has dtype torch.float64, sent torch.float32"),
    "NaN weight": (_with_state(_poke(float("nan"))), "non-finite"),
    "inf weight": (_with_state(_poke(float("inf"))), "non-finite"),
    "huge finite weight": (_with_state(_poke(3e38)), "above 1e+06"),
    "huge compute time": (_with_metrics(**{"compute-s": 1e300}), "'compute-s' = 1e+300 is outside"),
    "zero examples": (_with_metrics(**{"num-examples": 0}), "num-examples = 0 is below 1"),
    "negative examples": (_with_metrics(**{"num-examples": -5}), "num-examples = -5 is below 1"),
    "too many examples": (_with_metrics(**{"num-examples": 10**6}), "exceeds"),
    "NaN loss": (_with_metrics(**{"train-loss": float("nan")}), "'train-loss' = nan is not finite"),
    "inf loss": (_with_metrics(**{"train-loss": float("inf")}), "'train-loss' = inf is not finite"),
    "no metrics": (lambda c: RecordDict({"arrays": c["arrays"]}), "no 'metrics'"),
}


def _assert_same_state(a, b):
    assert a.state.keys() == b.state.keys()
    for k in a.state:
        assert torch.equal(a.state[k], b.state[k]), k
    assert a.bn_stats.keys() == b.bn_stats.keys()
    for key in a.bn_stats:
        assert all(torch.equal(a.bn_stats[key][k], b.bn_stats[key][k]) for k in a.bn_stats[key])
    assert a.model_version == b.model_version


@pytest.fixture(scope="module")
def train_without_bad_client(cfg, recorded):
    fp = FederatedPruning(cfg, ReplayTransport(recorded, absent=[BAD]))
    fp.register()
    fp.train_round(1, "warmup")
    honest = FederatedPruning(cfg, ReplayTransport(recorded))
    honest.register()
    honest.train_round(1, "warmup")
    assert any(not torch.equal(fp.state[k], honest.state[k]) for k in fp.state)  # the comparison below means something
    return fp


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_bad_train_reply_is_dropped(case, cfg, recorded, train_without_bad_client, caplog):
    corrupt, reason = TRAIN_CASES[case]
    fp = FederatedPruning(cfg, ReplayTransport(recorded, corrupt={(BAD, "train"): corrupt}))
    fp.register()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        rec = fp.train_round(1, "warmup")
    assert rec["failures"] == 1 and rec["failed_clients"][0]["partition"] == BAD and reason in rec["failed_clients"][0]["reason"]
    _assert_same_state(fp, train_without_bad_client)  # bit-identical: the bad reply never reached the model
    assert all(torch.isfinite(v).all() for v in fp.state.values() if v.is_floating_point())
    profile = fp.nodes[BAD].profile
    assert f"warmup round 1: dropped the reply of client #{BAD} ({profile}): " in caplog.text and reason in caplog.text


def _with_vectors(fn):
    def corrupt(content):
        content["importance"] = vectors_to_record(fn(record_to_vectors(content["importance"])))
        return content
    return corrupt


def _first_group(vecs, fn):
    k = sorted(vecs)[0]
    return {**vecs, k: fn(vecs[k].copy())}


def _set(i, value):
    def fn(v):
        v[i] = value
        return v
    return fn


IMPORTANCE_CASES = {
    "wrong length": (_with_vectors(lambda v: _first_group(v, lambda x: x[:-1])), "expected"),
    "negative score": (_with_vectors(lambda v: _first_group(v, _set(0, -1.0))), "negative"),
    "NaN score": (_with_vectors(lambda v: _first_group(v, _set(0, np.nan))), "non-finite"),
    "inf score": (_with_vectors(lambda v: _first_group(v, _set(0, np.inf))), "non-finite"),
    "missing group": (_with_vectors(lambda v: {k: x for k, x in v.items() if k != sorted(v)[0]}), "missing groups"),
    "unknown group": (_with_vectors(lambda v: {**v, "nonsense": np.ones(4)}), "unknown groups 'nonsense'"),
    "zero examples": (_with_metrics(**{"num-examples": 0}), "num-examples = 0 is below 1"),
    "negative examples": (_with_metrics(**{"num-examples": -1}), "num-examples = -1 is below 1"),
    "too many examples": (_with_metrics(**{"num-examples": 10**6}), "exceeds"),
    "no importance": (lambda c: RecordDict({"metrics": c["metrics"]}), "no 'importance'"),
}


@pytest.fixture(scope="module")
def consensus_without_bad_client(cfg, recorded):
    fp = FederatedPruning(cfg, ReplayTransport(recorded, absent=[BAD]))
    fp.register()
    fp.importance_round(2)
    return fp


@pytest.mark.parametrize("case", list(IMPORTANCE_CASES))
def test_bad_importance_reply_is_dropped(case, cfg, recorded, consensus_without_bad_client, caplog):
    corrupt, reason = IMPORTANCE_CASES[case]
    fp = FederatedPruning(cfg, ReplayTransport(recorded, corrupt={(BAD, "query.importance"): corrupt}))
    fp.register()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        rec = fp.importance_round(2)
    assert rec["failures"] == 1 and rec["failed_clients"][0]["partition"] == BAD and reason in rec["failed_clients"][0]["reason"]
    ref = consensus_without_bad_client
    assert fp.consensus_log == ref.consensus_log  # the consensus ignores the bad reply entirely
    for p, m in ref.profile_masks.items():
        assert all(np.array_equal(a, b) for a, b in zip(m.to_arrays().values(), fp.profile_masks[p].to_arrays().values()))
    assert f"importance round 2: dropped the reply of client #{BAD} ({fp.nodes[BAD].profile}): " in caplog.text and reason in caplog.text


def test_bad_evaluation_reply_is_left_out(cfg, recorded, caplog):
    honest = FederatedPruning(cfg, ReplayTransport(recorded))
    honest.register()
    acc, _, _ = honest.federated_evaluate(sorted(honest.nodes), scored=(StructuredMask.dense(honest.groups), honest.substate(StructuredMask.dense(honest.groups))))
    prof = honest.nodes[BAD].profile
    for values, reason in (({"accuracy": 1.5}, "outside [0.0, 1.0]"), ({"accuracy": float("nan")}, "not finite"),
                           ({"num-examples": 10**6}, "exceeds")):
        fp = FederatedPruning(cfg, ReplayTransport(recorded, corrupt={(BAD, "evaluate"): _with_metrics(**values)}))
        fp.register()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            bad_acc, _, valid = fp.federated_evaluate(sorted(fp.nodes), scored=(StructuredMask.dense(fp.groups), fp.substate(StructuredMask.dense(fp.groups))))
        assert prof not in bad_acc and {p: a for p, a in acc.items() if p != prof} == bad_acc
        assert f"evaluate: dropped the reply of client #{BAD} ({prof}): " in caplog.text and reason in caplog.text
        assert prof not in valid and sum(valid.values()) == len(fp.nodes) - 1  # local_val_clients counts valid replies


# ----------------------------------------------------------- check functions
def test_bad_registrations_are_dropped_and_a_partition_counts_once(cfg, recorded, caplog):
    """Registration replies: a histogram that is not a list of counts summing to the shard, a partition id out of
    range or claimed by two nodes, no training image, or a shard larger than the training set: dropped, logged."""
    import re

    from flwr.app import ConfigRecord

    from fedprune.task import load_data
    from fedprune.validation import InvalidReply, parse_register_reply

    nodes = sorted({n for n, _ in recorded})
    info = dict(recorded[(nodes[BAD], "query.register")].content["info"])
    profiles, n_train = list(cfg.profiles), len(load_data(cfg)[0])

    def parse(**change):
        return parse_register_reply(RecordDict({"info": ConfigRecord({**info, **change})}), profiles, 3, n_train)

    assert parse()["partition-id"] == info["partition-id"]
    hist = list(info["label-histogram"])
    for change, reason in [({"label-histogram": 5}, "not a list of counts"), ({"label-histogram": "abc"}, "not a list of counts"),
                           ({"label-histogram": [-1] + hist[1:]}, "label-histogram[0] = -1 is below 0"),
                           ({"label-histogram": [0] * len(hist)}, "label-histogram sums to 0"),
                           ({"partition-id": 3}, "partition-id = 3 exceeds 2"), ({"num-train": 0}, "num-train = 0 is below 1"),
                           ({"num-train": 10**9}, "exceeds"), ({"num-val": n_train}, "num-train + num-val")]:
        with pytest.raises(InvalidReply, match=re.escape(reason)):
            parse(**change)
    # the last node claims the first node's partition: the lower node id keeps it, the other is dropped
    first = dict(recorded[(nodes[0], "query.register")].content["info"])
    fp = FederatedPruning(cfg, ReplayTransport(recorded, corrupt={(nodes[-1], "query.register"): lambda c: RecordDict({"info": ConfigRecord(first)})}))
    with caplog.at_level("WARNING", logger="fedprune.server"):
        fp.register()
    assert sorted(i.partition_id for i in fp.nodes.values()) == sorted(int(recorded[(n, "query.register")].content["info"]["partition-id"])
                                                                        for n in nodes[:-1])
    assert f"partition-id {first['partition-id']} is registered by node {nodes[0]} too" in caplog.text
    assert fp.registration_failures == [f"partition-id {first['partition-id']} is registered by node {nodes[0]} too; keeping that one"]


def test_check_functions_one_job_each(cfg):
    from fedprune.task import model_groups

    spec = {"w": ArraySpec((2, 2), torch.float32), "n": ArraySpec((), torch.int64)}
    good = {"w": torch.ones(2, 2), "n": torch.tensor(3)}
    assert check_state(spec, good) is None
    assert "missing 'n'" in check_state(spec, {"w": good["w"]}, "gates")
    assert check_state(spec, {**good, "w": torch.ones(2, 2, dtype=torch.float16)}).endswith("sent torch.float32")
    var_spec = {"bn.running_var": ArraySpec((2,), torch.float32), "bn[0.5].0.var": ArraySpec((2,), torch.float32)}
    assert check_state(var_spec, {k: torch.tensor([0.0, 2.0]) for k in var_spec}) is None
    assert check_state(var_spec, {"bn.running_var": torch.tensor([1.0, -1.0]), "bn[0.5].0.var": torch.ones(2)}) == \
        "arrays: 'bn.running_var' holds negative variances"
    assert "'bn[0.5].0.var' holds negative variances" in check_state(var_spec, {"bn.running_var": torch.ones(2), "bn[0.5].0.var": -torch.ones(2)}, "gates")
    groups = model_groups(cfg)
    vecs = {g.name: np.ones(g.size, dtype=np.float32) for g in groups}
    assert check_importance(groups, vecs) is None
    assert "expected floating point" in check_importance(groups, {**vecs, groups.names[0]: np.ones(groups[groups.names[0]].size, dtype=np.int64)})
    assert check_count(5, "n", 1, 5) is None and check_count(5.0, "n", 1, 5) is None
    # magnitudes no trained network has would overflow the averages: weights, BN means and sensitivities above 1e6
    assert "above 1e+06" in check_state(spec, {**good, "w": torch.full((2, 2), 1e20)})
    assert check_state(var_spec, {k: torch.full((2,), 1e11) for k in var_spec}) is None  # variances: up to 1e12
    from fedprune.validation import check_sensitivity

    assert check_sensitivity(groups, {g: np.array([0.3]) for g in groups.names}) is None
    assert "above 1e+06 in magnitude" in check_sensitivity(groups, {g: np.array([1e307]) for g in groups.names})
    assert "not an integer" in check_count(2.5, "n") and "not a number" in check_count("7", "n") and "not a number" in check_count(True, "n")
    # a client asked for no local epoch may report a NaN loss (it did not train); gates are checked like weights
    content = RecordDict({"arrays": state_to_record({"w": torch.ones(2, 2)}), "gates": state_to_record({"g": torch.ones(3)}),
                          "metrics": MetricRecord({"num-examples": 4, "train-loss": float("nan"), "compute-s": 0.1})})
    parsed = parse_train_reply(content, {"w": spec["w"]}, {"g": ArraySpec((3,), torch.float32)}, 10, epochs=0)
    assert parsed.num_examples == 4 and parsed.gates is not None
    from fedprune.validation import InvalidReply

    with pytest.raises(InvalidReply, match="gates: 'g' has shape"):
        parse_train_reply(content, {"w": spec["w"]}, {"g": ArraySpec((4,), torch.float32)}, 10, epochs=0)
    with pytest.raises(InvalidReply, match="train-loss"):
        parse_train_reply(content, {"w": spec["w"]}, None, 10, epochs=1)
