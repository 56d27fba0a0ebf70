"""Federated consensus pruning: the server's phases, independent of how messages travel.

:class:`FederatedPruning` drives the run through a :class:`Transport`:

* :class:`GridTransport` wraps Flower's ``Grid`` (Simulation Engine with Ray,
  or the Deployment Engine);
* :class:`InProcessTransport` calls the same :mod:`fedprune.client_app`
  handlers directly with real Flower messages, one client after another (the
  "plain loop" baseline, and fast tests).

Phases: register clients; dense warm-up rounds; importance round; consensus
(aggregate, allocate, nested per-profile masks); heterogeneous fine-tuning of
physically smaller sub-networks with HeteroFL-style merging; evaluation.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import itertools
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fedprune.adversarial import adversarial_partitions
from fedprune.aggregation import aggregate_importance, mask_agreement, merge_substates, pool_bn_stats, screen_clients
from fedprune.allocation import InfeasibleBudgetError, check_feasible, check_min_channels, nested_masks
from fedprune.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from fedprune.config import BUDGET_ALLOCATIONS, ExperimentConfig, config_to_dict, config_without
from fedprune.data import make_loader
from fedprune.masks import StructuredMask, extract_submodel, extraction_index_map, pruned_scope, slice_state
from fedprune.metrics import model_costs
from fedprune.profiles import capability_order, simulated_client_seconds
from fedprune.records import (
    config_to_record,
    mask_to_record,
    put_inner_masks,
    recorddict_nbytes,
    state_to_record,
)
from fedprune.reporting import check_out_dir, to_jsonable, write_csv, write_json
from fedprune.task import budget_group_weights, budget_round_to, build_model, central_importance, check_partition, gate_state, gated_model, hardware_model, initial_width_state, load_data, model_groups, profile_budget_masks, profile_constraints
from fedprune.training import evaluate, set_seed
from fedprune.validation import InvalidReply, parse_bn_stats_reply, parse_evaluate_reply, parse_importance_reply, parse_register_reply, parse_train_reply, state_spec

log = logging.getLogger("fedprune.server")

__all__ = ["Reply", "Transport", "GridTransport", "InProcessTransport", "FederatedPruning", "simulate", "resolve_data_dir"]

#: Where the fine-tuned sub-networks' masks come from: ``consensus`` -- the clients' aggregated importance;
#: ``local`` -- each client its own top-k (no consensus); ``random`` -- a random ranking; ``central`` -- the
#: importance a server holding every client's data would compute (:func:`fedprune.task.central_importance`, a
#: simulation-only baseline); ``none`` -- no pruning (dense FedAvg).
MASK_SOURCES = ("consensus", "local", "random", "central", "none")


# ---------------------------------------------------------------- transports
@dataclass
class Reply:
    """One client's answer (``content`` None when it failed) and the bytes each way."""

    node_id: int
    content: object | None
    error: str | None
    bytes_down: int
    bytes_up: int


class Transport(Protocol):
    def node_ids(self) -> list[int]: ...

    def exchange(self, requests: list[tuple[int, str, object]]) -> list[Reply]:
        """Send ``(node_id, message_type, RecordDict)`` requests; one Reply per request, same order."""
        ...


#: Flower's error codes (``flwr.common.constant.ErrorCode``) in words, for logs and round records.
FLOWER_ERRORS = {0: "unknown error", 1: "ClientApp could not be loaded", 2: "ClientApp raised an exception",
                 3: "message unavailable", 4: "reply unavailable", 5: "node unavailable",
                 6: "mod failed a precondition", 7: "invalid FAB", 8: "ClientApp crashed"}


def _error_summary(reason: str | None) -> str:
    """A one-line error reason: a traceback (Ray's, with colour codes) is cut to its exception message."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", reason or "").splitlines() if ln.strip()]
    if not lines:
        return ""
    text = lines[-1] if len(lines) > 1 else lines[0]
    if len(lines) > 1 and "Message: " in text:  # Flower's ClientAppException: "... occurred. Message: <message>'>"
        text = text.split("Message: ", 1)[1].rstrip("'>")
    return text[:300]


def reply_from_message(node: int, rep, bytes_down: int, timeout: float | None = None) -> Reply:
    """A :class:`Reply` from Flower's reply ``Message``: ``None`` (no reply before the timeout) and
    error replies (``Message.has_error()``) become failures with a readable reason."""
    if rep is None:
        return Reply(node, None, f"no reply within the {timeout:g} s timeout" if timeout else "no reply", bytes_down, 0)
    if rep.has_error():
        code = int(rep.error.code)
        reason = _error_summary(rep.error.reason)
        return Reply(node, None, f"error reply, {FLOWER_ERRORS.get(code, f'code {code}')}: {reason}", bytes_down, 0)
    return Reply(node, rep.content, None, bytes_down, recorddict_nbytes(rep.content))


class GridTransport:
    """Flower ``Grid``: messages go through the SuperLink (simulation or deployment).

    ``timeout`` (seconds, None = wait for every reply) is passed to
    ``Grid.send_and_receive``; a node without a reply by then counts as failed.
    """

    def __init__(self, grid, timeout: float | None = None):
        self.grid, self.timeout = grid, timeout

    def node_ids(self) -> list[int]:
        return sorted(int(n) for n in self.grid.get_node_ids())

    def exchange(self, requests):
        from flwr.app import Message

        messages = [Message(content, dst_node_id=node, message_type=mtype) for node, mtype, content in requests]
        sizes = [recorddict_nbytes(content) for _, _, content in requests]
        by_msg, by_node = {}, {}
        for rep in self.grid.send_and_receive(messages, timeout=self.timeout):
            by_msg[str(rep.metadata.reply_to_message_id)] = rep  # also matches errors the SuperLink sends for a node
            by_node[int(rep.metadata.src_node_id)] = rep
        out = []
        for msg, (node, _, _), down in zip(messages, requests, sizes):  # push_messages set each message_id
            rep = by_msg.get(str(msg.metadata.message_id)) or by_node.get(node)
            out.append(reply_from_message(node, rep, down, self.timeout))
        return out


class InProcessTransport:
    """Runs the ClientApp handlers in this process, one client at a time, with real Flower messages.

    Node ``i`` has ``partition-id = i``; each node keeps its own ``Context``
    (and therefore its ``context.state``) for the whole run. As in Flower's
    Simulation Engine, a handler that raises gives an error reply. With
    ``timeout`` (seconds, per client, since clients would run in parallel) a
    reply that took longer is discarded as missing.
    """

    def __init__(self, num_nodes: int, client_app=None, timeout: float | None = None):
        from flwr.app import Context, RecordDict

        if client_app is None:
            from fedprune.client_app import app as client_app
        self.app = client_app
        self.timeout = timeout
        self.contexts = {
            i: Context(run_id=0, node_id=i, node_config={"partition-id": i, "num-partitions": num_nodes}, state=RecordDict(), run_config={})
            for i in range(num_nodes)
        }

    def node_ids(self) -> list[int]:
        return list(self.contexts)

    def exchange(self, requests):
        from flwr.app import Error, Message, Metadata
        from flwr.common.constant import ErrorCode

        out = []
        for k, (node, mtype, content) in enumerate(requests):
            md = Metadata(run_id=0, message_id=f"m{k}", src_node_id=0, dst_node_id=node, reply_to_message_id="",
                          group_id="", created_at=time.time(), ttl=3600.0, message_type=mtype)
            msg = Message(content=content, metadata=md)
            down = recorddict_nbytes(content)
            t0 = time.perf_counter()
            try:
                rep = self.app(msg, self.contexts[node])
            except Exception as exc:  # a crashing client is an error reply, as in Flower
                rep = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            if self.timeout and time.perf_counter() - t0 > self.timeout:
                rep = None
            out.append(reply_from_message(node, rep, down, self.timeout))
        return out


# ------------------------------------------------------------------- server
@dataclass
class NodeInfo:
    node_id: int
    partition_id: int
    profile: str
    num_train: int
    num_val: int
    label_histogram: list[int] = field(default_factory=list)


def resolve_data_dir(cfg: ExperimentConfig) -> ExperimentConfig:
    """Copy of ``cfg`` whose ``data.data_dir`` is absolute (from FEDPRUNE_DATA_DIR if unset), so workers agree."""
    cfg = copy.deepcopy(cfg)
    if cfg.data.dataset == "cifar10":
        d = cfg.data.data_dir or os.environ.get("FEDPRUNE_DATA_DIR", "")
        cfg.data.data_dir = str(Path(d).resolve()) if d else ""
    return cfg


class FederatedPruning:
    """The server side of one federated consensus-pruning run."""

    def __init__(self, cfg: ExperimentConfig, transport: Transport | None, out_dir: str | Path | None = None, mask_source: str = "consensus"):
        if mask_source not in MASK_SOURCES:
            raise ValueError(f"unknown mask source {mask_source!r}; allowed: {list(MASK_SOURCES)}")
        self.cfg = resolve_data_dir(cfg)
        self.transport = transport
        if self.cfg.federated.reply_timeout_s > 0 and getattr(transport, "timeout", False) is None:
            transport.timeout = self.cfg.federated.reply_timeout_s  # a transport without its own timeout uses the config's
        self.out_dir = Path(out_dir) if out_dir else None
        self.mask_source = mask_source
        self.groups = model_groups(self.cfg)
        #: Clients measure layer sensitivity with the importance (asked for, or needed by the allocation).
        self.measure_sensitivity = self.cfg.federated.sensitivity or self.cfg.pruning.needs_sensitivity
        set_seed(self.cfg.seed)
        self.model = build_model(self.cfg)
        self.state = {k: v.clone() for k, v in self.model.state_dict().items()}
        train, test = load_data(self.cfg)
        self.train_images = len(train)  # no client's shard can be larger (registration checks it)
        self.test_loader = make_loader(test, 256, train=False)
        #: Profiles of the run, most capable first (:func:`capability_order`): before registration those with a
        #: client share in ``federated.proportions``; after it those of the registered clients (a SuperNode may
        #: declare its own). A profile without clients gets no mask, evaluation or budget check.
        self.profiles = capability_order(self.cfg.profiles, {p for p, share in self.cfg.federated.proportions.items() if share > 0})
        self.nodes: dict[int, NodeInfo] = {}
        self.registration_bytes = (0, 0)  # (down, up) of the register messages, in bytes
        self.registration_failures: list[str] = []  # why nodes that answered the registration were left out
        # federated.score_model = "last_warmup": the model sent in the last warm-up round, which its clients cached
        # ({"version", "state", "partitions"}), until the importance round after the warm-up has scored it.
        self.warmup_input: dict | None = None
        self.node_masks: dict[int, StructuredMask] = {}
        self.profile_masks: dict[str, StructuredMask] = {}
        self.rounds: list[dict] = []
        self.consensus_log: list[dict] = []
        self._index_maps: dict[bytes, dict] = {}
        self.model_version = 0
        # BN running statistics per sub-network (mask key): sub-networks of different
        # widths see different activation statistics, so they must not be averaged together.
        self.bn_stat_keys = {n for n in self.state if n.endswith(("running_mean", "running_var"))}
        self.bn_stats: dict[bytes, dict[str, torch.Tensor]] = {}
        self._hardware = None
        # Dynamic channel gates per sub-network (mask key), averaged over the clients that train them.
        self.gates: dict[bytes, dict[str, torch.Tensor]] = {}
        self.dense_acc: float | None = None  # test accuracy of the dense global model after the dense rounds

    @property
    def hardware(self):
        """Cost models for profile budgets (:class:`fedprune.cost.HardwareModel`), built on first use."""
        if self._hardware is None:
            self._hardware = hardware_model(self.cfg, copy.deepcopy(self.model))
        return self._hardware

    def check_budgets(self) -> None:
        """Fail before training when pruning cannot work (``pruning.min_channels`` keeps every channel) or a budget
        allocation cannot meet some profile's budget."""
        pr = self.cfg.pruning
        if self.mask_source == "none":
            return
        check_min_channels(self.groups, pr.min_channels)
        if pr.allocation in BUDGET_ALLOCATIONS:
            try:
                check_feasible(self.groups, profile_constraints(self.cfg, self.hardware, self.profiles), pr.min_channels, budget_round_to(self.cfg))
            except InfeasibleBudgetError as err:
                raise err.naming(self.profiles) from None

    # ------------------------------------------------------------ helpers
    #: Index maps kept at once (least recently used dropped first): the server's memory must not grow
    #: with the number of clients, even when each client has its own mask (mask source "local").
    INDEX_MAP_CACHE = 16

    def index_map(self, mask: StructuredMask) -> dict:
        key = mask.key()
        imap = self._index_maps.pop(key, None)
        if imap is None:
            imap = extraction_index_map(self.model, mask, self.groups)
        self._index_maps[key] = imap  # most recently used last
        while len(self._index_maps) > self.INDEX_MAP_CACHE:
            self._index_maps.pop(next(iter(self._index_maps)))
        return imap

    def substate(self, mask: StructuredMask) -> dict[str, torch.Tensor]:
        """The sub-network's state: sliced global weights plus its own BN running statistics."""
        sub = slice_state(self.state, self.index_map(mask))
        sub.update({k: v.clone() for k, v in self.bn_stats.get(mask.key(), {}).items()})
        return sub

    def scope(self) -> StructuredMask:
        """The channels still in the network: those some client's sub-network holds (every channel before the
        first consensus). An importance round scores this network, and its masks stay inside it: a later
        round of progressive pruning never brings back a channel that no client holds (whose weights
        stayed as the warm-up left them)."""
        masks = self.masks_in_use()
        return functools.reduce(StructuredMask.union, masks.values()) if masks else StructuredMask.dense(self.groups)

    def masks_in_use(self) -> dict[bytes, StructuredMask]:
        """The clients' sub-networks, one entry per distinct mask (by :meth:`StructuredMask.key`)."""
        return {m.key(): m for m in self.node_masks.values()}

    def scope_bn_stats(self, scope: StructuredMask) -> dict[str, torch.Tensor]:
        """BatchNorm statistics for the channels of :meth:`scope`, in the original index space: those of the
        sub-network in use that is the scope (with nested consensus masks, the largest one), else (mask source
        ``local``: the union of the clients' own) each the mean over the sub-networks in use that hold it,
        weighted by their clients. Channels outside keep the global state's."""
        own = {k: v for k, v in self.state.items() if k in self.bn_stat_keys}
        masks = self.masks_in_use()
        clients = collections.Counter(m.key() for m in self.node_masks.values())
        if scope.key() in masks and scope.key() in self.bn_stats:
            clients = collections.Counter({scope.key(): 1})
        updates = [(self.bn_stats[k], self._bn_index_map(masks[k]), float(c)) for k, c in clients.items() if k in self.bn_stats]
        return merge_substates(own, updates)

    def _bn_index_map(self, mask: StructuredMask) -> dict:
        return {n: i for n, i in self.index_map(mask).items() if n in self.bn_stat_keys}

    def scope_substate(self, scope: StructuredMask) -> dict[str, torch.Tensor]:
        """The sub-network of :meth:`scope`, as it is scored: global weights, BatchNorm statistics of
        :meth:`scope_bn_stats` (before the first consensus, the dense model's own)."""
        if not self.node_masks:
            return self.substate(scope)
        return slice_state({**self.state, **self.scope_bn_stats(scope)}, self.index_map(scope))

    def gates_for(self, mask: StructuredMask) -> dict[str, torch.Tensor]:
        """The sub-network's dynamic state (``dynamic.method``): channel gates, initialised (seeded) on first
        use, or channel orders and per-width BatchNorm statistics, set at the consensus step."""
        key = mask.key()
        if key not in self.gates:
            if self.cfg.dynamic.method == "widths":
                raise RuntimeError("dynamic method 'widths': the sub-network has no channel order (set at the consensus step)")
            with torch.random.fork_rng():
                torch.manual_seed(self.cfg.seed)
                self.gates[key] = gate_state(gated_model(self.cfg, self.extracted(mask)))
        return self.gates[key]

    def _merge_gates(self, updates: list[tuple[dict, float, bytes]]) -> None:
        """Sample-weighted mean of the returned dynamic states, per sub-network; integer entries
        (channel orders) stay the server's own."""
        by_mask: dict[bytes, list[tuple[dict, float]]] = {}
        for g, w, key in updates:
            by_mask.setdefault(key, []).append((g, w))
        for key, items in by_mask.items():
            total = sum(w for _, w in items)
            own = self.gates[key]
            self.gates[key] = {k: sum(g[k].double() * w for g, w in items).div(total).float() if own[k].is_floating_point() else own[k]
                               for k in own}

    def _merge(self, updates: list[tuple[dict, dict, float, bytes]]) -> None:
        """Merge weights across all clients (HeteroFL); BN running stats only within each sub-network."""
        shared = [({k: v for k, v in st.items() if k not in self.bn_stat_keys}, {k: v for k, v in im.items() if k not in self.bn_stat_keys}, w)
                  for st, im, w, _ in updates]
        self.state = merge_substates(self.state, shared)
        by_mask: dict[bytes, list[tuple[dict, float]]] = {}
        for st, _, w, key in updates:
            by_mask.setdefault(key, []).append((st, w))
        for key, items in by_mask.items():
            total = sum(w for _, w in items)
            self._set_bn_stats(key, {k: sum(st[k].double() * w for st, w in items).div(total).float() for k in self.bn_stat_keys})

    def _set_bn_stats(self, key: bytes, stats: dict[str, torch.Tensor]) -> None:
        """A sub-network's BatchNorm statistics; the dense model keeps its own in the global state too."""
        self.bn_stats[key] = stats
        if key == StructuredMask.dense(self.groups).key():
            self.state.update({k: v.clone() for k, v in stats.items()})

    def _config(self, **extra):
        return config_to_record(self.cfg, **extra)

    def sample(self, round_num: int, attempt: int = 0) -> list[int]:
        """Nodes taking part in a round (all, or a seeded sample of ``clients_per_round``; a retry draws a fresh sample)."""
        ids = sorted(self.nodes, key=lambda n: self.nodes[n].partition_id)
        k = self.cfg.federated.clients_per_round
        if not k or k >= len(ids):
            return ids
        rng = np.random.default_rng([self.cfg.seed, round_num, 104729] + ([attempt] if attempt else []))
        picked = np.sort(rng.choice(len(ids), size=k, replace=False))  # positions: node ids are 64-bit
        return [ids[i] for i in picked]

    def final_eval_nodes(self) -> list[int]:
        """Clients of the final local-validation evaluation: all, or (``federated.final_eval_clients``
        > 0) a seeded sample of that many, plus one client of any profile the sample missed, so the
        final evaluation does not grow with the number of registered clients."""
        k = self.cfg.federated.final_eval_clients
        if not k or k >= len(self.nodes):
            return sorted(self.nodes)
        ids = sorted(self.nodes, key=lambda n: self.nodes[n].partition_id)
        order = [ids[i] for i in np.random.default_rng([self.cfg.seed, 15485863]).permutation(len(ids))]
        picked, seen = order[:k], {self.nodes[n].profile for n in order[:k]}
        for n in order[k:]:
            if self.nodes[n].profile not in seen:
                picked.append(n)
                seen.add(self.nodes[n].profile)
        return sorted(picked)

    def inner_masks(self, mask: StructuredMask) -> list[StructuredMask]:
        """The profiles' sub-networks strictly nested in ``mask``, widest first (nested training).

        With consensus or random masks these are the narrower profiles' masks; a client's own
        mask (mask source "local") usually contains none, and then trains alone."""
        inner = {m.key(): m for m in self.profile_masks.values() if m != mask and m.is_subset_of(mask)}
        return sorted(inner.values(), key=lambda m: -sum(m.kept_counts.values()))

    def _mask_for(self, node: int) -> StructuredMask:
        return self.node_masks.get(node) or StructuredMask.dense(self.groups)

    def _check_replies(self, replies: list[Reply], what: str, attempt: int = 0) -> tuple[list[Reply], list[dict]]:
        """Split replies into those with content and failures (error replies, timeouts), logged."""
        ok, failed = [], []
        for r in replies:
            if r.content is None:
                self._fail(failed, r.node_id, what, r.error, attempt, dropped=False)
            else:
                ok.append(r)
        return ok, failed

    def _fail(self, failed: list[dict], node: int, what: str, reason: str, attempt: int = 0, dropped: bool = True) -> None:
        """Record and log a failed client: ``dropped`` replies arrived but did not pass validation."""
        info = self.nodes.get(node)
        failed.append({"partition": info.partition_id if info else None, "profile": info.profile if info else None,
                       "reason": reason, "attempt": attempt})
        log.warning("%s: %s client %s: %s", what, "dropped the reply of" if dropped else "no usable reply from", self._pid(node), reason)

    def min_replies(self, sampled: int) -> int:
        """Valid replies a round needs: max(1, ceil(federated.min_replies_fraction x sampled clients))."""
        return max(1, math.ceil(self.cfg.federated.min_replies_fraction * sampled - 1e-9))

    def _with_policy(self, attempt_fn, what: str, force_retry=None) -> list[dict]:
        """Run ``attempt_fn(attempt)`` (a round record with ``enough``) until a round has enough valid
        replies, re-sending it up to ``federated.max_retries`` times when ``on_too_few_replies`` is
        "retry" (or ``force_retry(record)`` says so); returns the records of all attempts."""
        fed = self.cfg.federated
        recs = []
        while True:
            rec = attempt_fn(len(recs))
            recs.append(rec)
            retry = fed.on_too_few_replies == "retry" or (force_retry is not None and force_retry(rec))
            if rec["enough"] or not retry or len(recs) > fed.max_retries:
                return recs
            log.warning("%s: %d valid replies from %d clients, fewer than the minimum %d; retrying with a fresh sample (retry %d of %d)",
                        what, rec["valid_replies"], rec["clients"], rec["min_replies"], len(recs), fed.max_retries)

    @staticmethod
    def _combine_attempts(recs: list[dict], t0: float) -> dict:
        """One round record for all attempts: the last attempt's values, bytes/clients/failures summed."""
        rec = dict(recs[-1])
        for key in ("bytes_up", "bytes_down", "clients", "failures", "model_delivery_bytes_down", "model_delivery_bytes_up"):
            if key in rec:
                rec[key] = sum(r[key] for r in recs)
        rec["failed_clients"] = [f for r in recs for f in r["failed_clients"]]
        rec["attempts"] = len(recs)
        rec["wall_s"] = time.perf_counter() - t0
        rec.pop("enough", None)
        return rec

    def _pid(self, node: int) -> str:
        info = self.nodes.get(node)
        return f"#{info.partition_id} ({info.profile})" if info else f"node {node}"

    # ------------------------------------------------------------- phases
    def register(self) -> None:
        from flwr.app import RecordDict

        ids = self.transport.node_ids()
        # Registration waits for every client, without the reply timeout: it includes the clients'
        # start-up (Ray workers, data loading); simulated failures hit only train and importance messages.
        timeout = getattr(self.transport, "timeout", None)
        if timeout:
            self.transport.timeout = None
        try:
            replies = self.transport.exchange([(n, "query.register", RecordDict({"config": self._config()})) for n in ids])
        finally:
            if timeout:
                self.transport.timeout = timeout
        self.registration_bytes = (sum(r.bytes_down for r in replies), sum(r.bytes_up for r in replies))
        ok, failed = self._check_replies(replies, "register")
        parsed: dict[int, dict] = {}
        for r in ok:
            try:
                parsed[r.node_id] = parse_register_reply(r.content, list(self.cfg.profiles), self.cfg.federated.num_clients, self.train_images)
            except InvalidReply as exc:
                self._fail(failed, r.node_id, "register", str(exc))
        holder: dict[int, int] = {}  # partition id -> the node that keeps it: the lowest node id claiming it
        for node, info in sorted(parsed.items()):
            holder.setdefault(int(info["partition-id"]), node)
        for node, info in parsed.items():
            pid = int(info["partition-id"])
            if holder[pid] != node:  # one client's shard must not count twice
                self._fail(failed, node, "register", f"partition-id {pid} is registered by node {holder[pid]} too; keeping that one")
                continue
            self.nodes[node] = NodeInfo(node, pid, str(info["profile"]), int(info["num-train"]), int(info["num-val"]), list(info["label-histogram"]))
        self.registration_failures = [f["reason"] for f in failed]
        if not self.nodes:
            raise RuntimeError("no client registered; cannot run")
        checked = set(self.profiles)
        self.profiles = capability_order(self.cfg.profiles, {n.profile for n in self.nodes.values()})
        counts = {p: sum(1 for n in self.nodes.values() if n.profile == p) for p in self.profiles}
        log.info("[register] %d clients: %s", len(self.nodes), ", ".join(f"{p}={c}" for p, c in counts.items()))
        if not checked.issuperset(self.profiles):  # nodes declared profiles the proportions left out
            self.check_budgets()

    def train_round(self, round_num: int, phase: str) -> dict:
        """One training round: clients fine-tune their sub-networks, the server merges the valid replies.

        Failed clients and dropped (invalid) replies are left out and listed in the record's
        ``failed_clients``. With fewer valid replies than :meth:`min_replies` nothing is merged
        and the round is re-sent or skipped per ``federated.on_too_few_replies``; the record
        then has ``attempts`` > 1 or ``skipped`` true (the global model is unchanged).
        """
        t0 = time.perf_counter()
        what = f"{phase} round {round_num}"
        rec = self._combine_attempts(self._with_policy(lambda attempt: self._train_attempt(round_num, phase, attempt), what), t0)
        if rec["skipped"]:
            log.warning("%s: skipped after %d attempt(s): %d valid replies, fewer than the minimum %d; the global model is unchanged",
                        what, rec["attempts"], rec["valid_replies"], rec["min_replies"])
        return rec

    def _train_attempt(self, round_num: int, phase: str, attempt: int) -> dict:
        from flwr.app import RecordDict

        t0 = time.perf_counter()
        what = f"{phase} round {round_num}"
        nodes = self.sample(round_num, attempt)
        requests, sent = [], {}
        fed = self.cfg.federated
        cache = {}
        if phase == "dense" and round_num > fed.warmup_rounds:
            self.warmup_input = None  # a dense run past its warm-up: nothing will score it
        if fed.score_model == "last_warmup" and round_num == fed.warmup_rounds and phase in ("warmup", "dense"):
            # the clients keep the model they receive; the importance round after the warm-up scores it (no delivery)
            cache = {"cache-model": True, "model-version": self.model_version}
            self.warmup_input = {"version": self.model_version, "state": self.substate(StructuredMask.dense(self.groups)),
                                 "partitions": [self.nodes[n].partition_id for n in nodes]}
        for n in nodes:
            mask = self._mask_for(n)
            imap = self.index_map(mask)
            prof = self.cfg.profiles[self.nodes[n].profile]
            sub = self.substate(mask)
            content = RecordDict({
                "arrays": state_to_record(sub),
                "mask": mask_to_record(mask),
                "config": self._config(round=round_num, epochs=prof.local_epochs, **{"batch-size": prof.batch_size}, **_attempt_key(attempt), **cache),
            })
            if phase == "finetune" and self.cfg.federated.nested_training:
                put_inner_masks(content, self.inner_masks(mask))
            gate_spec = None
            if phase == "finetune" and self.cfg.dynamic.enabled:
                gates = self.gates_for(mask)
                content["gates"] = state_to_record(gates)
                gate_spec = state_spec(gates)
            sent[n] = (imap, state_spec(sub), mask.key(), gate_spec, prof.local_epochs)
            requests.append((n, "train", content))
        replies = self.transport.exchange(requests)
        ok, failed = self._check_replies(replies, what, attempt)
        updates, gate_updates, losses, sim_s = [], [], [], []
        for r in ok:
            imap, spec, key, gate_spec, epochs = sent[r.node_id]
            try:
                tr = parse_train_reply(r.content, spec, gate_spec, self.nodes[r.node_id].num_train, epochs)
            except InvalidReply as exc:
                self._fail(failed, r.node_id, what, str(exc), attempt)
                continue
            updates.append((tr.state, imap, float(tr.num_examples), key))
            if tr.gates is not None:
                gate_updates.append((tr.gates, float(tr.num_examples), key))
            losses.append(tr.loss)
            sim_s.append(simulated_client_seconds(self.cfg.profiles[self.nodes[r.node_id].profile], tr.compute_s, r.bytes_down, r.bytes_up))
        rec = self._round_record(round_num, phase, t0, replies, nodes, failed, len(updates))
        if rec["enough"]:  # too few replies never touch the global model
            self._merge(updates)
            self.model_version += 1
            if gate_updates:
                self._merge_gates(gate_updates)
        rec["train_loss"] = float(np.mean(losses)) if losses else None
        rec["simulated_round_s"] = max(sim_s) if sim_s else None
        return rec

    def _round_record(self, round_num, phase, t0, replies, nodes, failed, valid: int) -> dict:
        need = self.min_replies(len(nodes))
        return {
            "round": round_num,
            "phase": phase,
            "wall_s": time.perf_counter() - t0,
            "bytes_up": sum(r.bytes_up for r in replies),
            "bytes_down": sum(r.bytes_down for r in replies),
            "clients": len(nodes),
            "failures": len(failed),
            "failed_clients": failed,
            "valid_replies": valid,
            "min_replies": need,
            "enough": valid >= need,
            "skipped": valid < need,
            "attempts": 1,
        }

    def federated_evaluate(self, nodes: list[int], scored: tuple[StructuredMask, dict] | None = None) -> tuple[dict, list[Reply], dict]:
        """Each node evaluates its own sub-model (or, with ``scored = (mask, sub-network state)``, that network:
        the one the importance round that follows scores, which the clients cache) on local validation data;
        returns per-profile accuracy (weighted by validation images), the replies, and per profile the number of
        clients whose reply was valid. Messages go out in batches of at most ``clients_per_round``, so no more
        models are in flight than in a training round."""
        from flwr.app import RecordDict

        def request(n):
            mask = scored[0] if scored is not None else self._mask_for(n)
            state = scored[1] if scored is not None else self.substate(mask)
            conf = self._config(**{"cache-model": scored is not None, "model-version": self.model_version})
            return (n, "evaluate", RecordDict({"arrays": state_to_record(state), "mask": mask_to_record(mask), "config": conf}))

        replies = self._exchange_in_batches(nodes, request)
        ok, failed = self._check_replies(replies, "evaluate")
        per_profile: dict[str, list[tuple[float, int]]] = {}
        valid: dict[str, int] = {}
        for r in ok:
            try:
                n_ex, accuracy = parse_evaluate_reply(r.content, self.nodes[r.node_id].num_val)
            except InvalidReply as exc:
                self._fail(failed, r.node_id, "evaluate", str(exc))
                continue
            profile = self.nodes[r.node_id].profile
            valid[profile] = valid.get(profile, 0) + 1
            if n_ex > 0:
                per_profile.setdefault(profile, []).append((accuracy, n_ex))
        acc = {p: sum(a * n for a, n in v) / sum(n for _, n in v) for p, v in per_profile.items()}
        return acc, replies, valid

    def _exchange_in_batches(self, nodes: list[int], request) -> list[Reply]:
        """``request(node)`` for every node, sent in batches of at most ``clients_per_round``
        (no more models in flight than in a training round); replies in node order."""
        replies = []
        step = max(1, self.cfg.federated.clients_per_round or len(nodes))
        for i in range(0, len(nodes), step):
            replies += self.transport.exchange([request(n) for n in nodes[i: i + step]])
        return replies

    def _trained_widths(self, mask: StructuredMask) -> dict | None:
        """The sub-network's dynamic state of method ``widths`` once fine-tuning measured its widths, else None."""
        if not (self.cfg.dynamic.enabled and self.cfg.dynamic.method == "widths"):
            return None
        from fedprune.dynamic import widths_calibrated

        state = self.gates.get(mask.key())
        return state if state is not None and widths_calibrated(state) else None

    def calibrate_bn(self, round_num: int) -> dict:
        """Static BN (HeteroFL) after the last round: the clients of the final evaluation
        (:meth:`final_eval_nodes`) each receive their final sub-network, measure its BatchNorm
        statistics on their training shard (forward passes only; with dynamic method ``widths``
        also each narrower width's), and the server pools them per sub-network
        (:func:`~fedprune.aggregation.pool_bn_stats`). Without it a sub-network's
        statistics are the mean of those its clients measured on their *local* models of the last
        round, before averaging. A sub-network without a valid reply keeps those; returns the
        round record (phase ``bn_calibration``)."""
        from flwr.app import RecordDict

        t0 = time.perf_counter()
        what = "BN calibration"
        nodes = self.final_eval_nodes()
        sent = {}

        def request(n):
            mask = self._mask_for(n)
            sub = self.substate(mask)
            content = RecordDict({"arrays": state_to_record(sub), "mask": mask_to_record(mask), "config": self._config(round=round_num)})
            widths = self._trained_widths(mask)
            if widths is not None:  # adaptive width: the narrower widths' statistics are static too
                content["gates"] = state_to_record(widths)
                widths = {k: v for k, v in state_spec(widths).items() if k.endswith((".mean", ".var"))}
            sent[n] = ({k: v for k, v in state_spec(sub).items() if k in self.bn_stat_keys}, widths, mask.key())
            return (n, "query.bnstats", content)

        replies = self._exchange_in_batches(nodes, request)
        ok, failed = self._check_replies(replies, what)
        by_mask: dict[bytes, list[tuple[dict, dict | None, int]]] = {}
        for r in ok:
            spec, width_spec, key = sent[r.node_id]
            try:
                stats, width_stats, n_ex = parse_bn_stats_reply(r.content, spec, self.nodes[r.node_id].num_train, width_spec)
            except InvalidReply as exc:
                self._fail(failed, r.node_id, what, str(exc))
                continue
            by_mask.setdefault(key, []).append((stats, width_stats, n_ex))
        for key, items in by_mask.items():
            weights = [n for *_, n in items]
            self._set_bn_stats(key, pool_bn_stats([st for st, _, _ in items], weights))
            if items[0][1] is not None:
                self.gates[key] = {**self.gates[key], **pool_bn_stats([ws for _, ws, _ in items], weights)}
        rec = self._round_record(round_num, "bn_calibration", t0, replies, nodes, failed, sum(len(v) for v in by_mask.values()))
        for k in ("enough", "min_replies"):
            rec.pop(k)
        held = {sent[n][-1] for n in nodes}
        missing = held - set(by_mask)
        rec["skipped"] = not by_mask
        rec["calibrated_subnetworks"] = len(by_mask)
        rec["uncalibrated_subnetworks"] = len(missing)
        if missing:
            log.warning("[%s] %d of %d sub-networks had no valid reply; they keep the statistics averaged in the last round",
                        what, len(missing), len(held))
        log.info("[%s] %d clients measured BatchNorm statistics of %d sub-network(s) on their shards, %.1f s",
                 what, rec["valid_replies"], len(by_mask), rec["wall_s"])
        return rec

    def importance_round(self, round_num: int, sparsity_scale: float = 1.0) -> dict:
        """Clients score channels on private data; the server builds consensus masks per profile.

        The consensus is global, so a profile whose clients all failed still gets its nested mask
        (from the other profiles' replies; the consensus log lists it under
        ``profiles_without_replies``). With too few valid replies the round is re-sent per
        ``federated.on_too_few_replies``; if it still has too few, the previous masks are kept
        (``skipped``), or, when there are none yet, the consensus is built from the valid replies
        there are. With no valid reply at all it is re-sent (up to ``max_retries`` times, whatever
        the policy) before it fails.
        """
        t0 = time.perf_counter()
        what = f"importance round {round_num}"
        collected = []
        cached = self.warmup_input if round_num == self.cfg.federated.warmup_rounds + 1 else None

        def attempt(k: int) -> dict:
            rec, data = self._importance_attempt(round_num, k, cached)
            collected.append(data)
            return rec

        recs = self._with_policy(attempt, what, force_retry=lambda r: r["valid_replies"] == 0 and not self.profile_masks)
        rec = self._combine_attempts(recs, t0)
        scores, weights, sens, owners, scope, scored = collected[-1]
        rec["skipped"] = False
        if not recs[-1]["enough"]:
            if self.profile_masks:
                log.warning("%s: skipped after %d attempt(s): %d valid replies, fewer than the minimum %d; keeping the previous masks",
                            what, rec["attempts"], rec["valid_replies"], rec["min_replies"])
                rec["skipped"] = True
                self.warmup_input = None
                return rec
            if not scores:
                raise RuntimeError(f"{what}: no valid client reply after {rec['attempts']} attempt(s) ({rec['failures']} failures, "
                                   f"see the log); cannot build a consensus mask")
            log.warning("%s: only %d valid replies (minimum %d) after %d attempt(s) and no previous masks; building the consensus from them",
                        what, rec["valid_replies"], rec["min_replies"], rec["attempts"])
        seed_stats = self.scope_bn_stats(scope) if self.node_masks else None
        self.build_masks(scores, weights, sens, owners, sparsity_scale, round_num, scope, scored)
        if seed_stats is not None:  # a new sub-network starts from the statistics of the network it was cut from
            for mask in self.masks_in_use().values():
                if mask.key() not in self.bn_stats:
                    self._set_bn_stats(mask.key(), slice_state(seed_stats, self._bn_index_map(mask)))
        self.warmup_input = None
        return rec

    def _importance_attempt(self, round_num: int, attempt: int, cached: dict | None = None) -> tuple[dict, tuple]:
        """One attempt of an importance round. ``cached``: the last warm-up round's input (:attr:`warmup_input`),
        which the clients it went to hold, so it needs no delivery; else the current global model is delivered.
        Returns the round record and ``(scores, weights, sensitivities, owners, scope, scored state)``."""
        from flwr.app import RecordDict

        t0 = time.perf_counter()
        pr = self.cfg.pruning
        what = f"importance round {round_num}"
        if cached is not None and attempt == 0:  # the clients that received it (a retry samples afresh; they get the model)
            by_pid = {i.partition_id: n for n, i in self.nodes.items()}
            nodes = [by_pid[pid] for pid in cached["partitions"] if pid in by_pid]
        else:
            nodes = self.sample(round_num, attempt)
        if cached is None:
            # The global model (the sub-network of the channels still in it, :meth:`scope`) reaches the clients in
            # an evaluate message just before; they cache it. Those messages are part of this round's traffic
            # (``model_delivery_bytes_*``, counted in ``bytes_*``).
            scope = self.scope()
            delivered = self.scope_substate(scope)
            _, eval_replies, _ = self.federated_evaluate(nodes, scored=(scope, delivered))
            delivery = (sum(r.bytes_down for r in eval_replies), sum(r.bytes_up for r in eval_replies))
            version = self.model_version
            scored = delivered if self.node_masks else self.state  # before the first consensus: the dense global model
        else:
            delivery, version, scope, scored = (0, 0), cached["version"], StructuredMask.dense(self.groups), cached["state"]

        def request(n, with_model):
            conf = self._config(round=round_num, criterion=pr.criterion, sensitivity=self.measure_sensitivity,
                                ratios=[float(r) for r in pr.sensitivity_ratios],
                                **{"num-batches": pr.num_batches, "model-version": version}, **_attempt_key(attempt))
            content = {"config": conf}
            if with_model:
                content["arrays"] = state_to_record(scored)
                if pruned_scope(scope) is not None:  # a sub-network (without a mask: the dense model)
                    content["mask"] = mask_to_record(scope)
            return (n, "query.importance", RecordDict(content))

        replies = self.transport.exchange([request(n, False) for n in nodes])
        resent = 0
        resend = [r.node_id for r in replies if r.content is not None and "importance" not in r.content]
        if resend:  # a client without the cached model gets it now (bytes are counted, as model delivery)
            log.info("[importance] %d clients lacked the cached model; sending it", len(resend))
            again = {r.node_id: r for r in self.transport.exchange([request(n, True) for n in resend])}
            resent = sum(r.bytes_down for r in again.values())  # in the replies' bytes already
            replies = [Reply(r.node_id, again[r.node_id].content, again[r.node_id].error, r.bytes_down + again[r.node_id].bytes_down,
                             r.bytes_up + again[r.node_id].bytes_up) if r.node_id in again else r for r in replies]
        ok, failed = self._check_replies(replies, what, attempt)
        scores, weights, sens, owners = [], [], [], []
        for r in ok:
            try:
                imp = parse_importance_reply(r.content, self.groups, self.nodes[r.node_id].num_train, self.measure_sensitivity)
            except InvalidReply as exc:
                self._fail(failed, r.node_id, what, str(exc), attempt)
                continue
            scores.append(imp.scores)
            weights.append(imp.num_examples)
            owners.append(r.node_id)
            if imp.sensitivity is not None:
                sens.append(imp.sensitivity)
        rec = self._round_record(round_num, "importance", t0, replies, nodes, failed, len(scores))
        rec["model_delivery_bytes_down"], rec["model_delivery_bytes_up"] = delivery[0] + resent, delivery[1]
        rec["scored_model_version"] = version  # the global model's version (merges so far) that the clients scored
        rec["bytes_down"] += delivery[0]
        rec["bytes_up"] += delivery[1]
        return rec, (scores, weights, sens, owners, scope, scored)

    def build_masks(self, scores, weights, sens, owners, sparsity_scale: float = 1.0, round_num: int = 0,
                    scope: StructuredMask | None = None, scored_state: dict | None = None) -> None:
        """Consensus masks from the clients' scores (original index space).

        ``scope``: the channels still in the network that the clients scored (None: every channel). With a
        pruned scope (a later stage of progressive pruning) the consensus is that sub-network's own: scores are
        cut to it before normalisation, screening and aggregation, the channels are allocated on its groups
        (:meth:`~fedprune.masks.StructuredMask.narrowed_groups`; each profile keeps the same share of the dense
        network's channels as at the final stage, scaled, and budgets are costed as always) and the masks are
        placed back in the original index space, inside the scope. ``scored_state``: the model the clients
        scored, ``scope``'s sub-network (None: the dense global model), which mask source ``central`` scores at
        the server.
        """
        fed, pr = self.cfg.federated, self.cfg.pruning
        within = pruned_scope(scope)
        groups = within.narrowed_groups(self.groups) if within else self.groups
        scores = [within.narrow(s) for s in scores] if within else scores
        kept, screen_agreement = screen_clients(scores) if fed.screen_clients else (list(range(len(scores))), None)
        consensus = aggregate_importance([scores[i] for i in kept], [weights[i] for i in kept], fed.aggregation, fed.trim_fraction)
        # Simulated poisoned importance (fedprune.adversarial): the scoring partitions that were adversarial.
        adversarial = adversarial_partitions(fed.num_clients, fed.adversarial_fraction, self.cfg.seed)
        pids = [self.nodes[n].partition_id for n in owners]
        sens_agg = None
        if sens:  # every valid reply carries it when asked for; screened-out clients do not count
            w = np.asarray([weights[i] for i in kept], dtype=np.float64)
            sens_agg = {k: float(np.dot(w, [sens[i][k] for i in kept]) / w.sum()) for k in self.groups.names}
        ranking = consensus
        if self.mask_source == "random":
            rng = np.random.default_rng([self.cfg.seed, 31337])
            ranking = {g.name: rng.random(g.size) for g in groups}
        elif self.mask_source == "central":  # the baseline: what the server would compute with all the clients' data
            ranking, central_sens = central_importance(self.cfg, fed.num_clients, self.state if scored_state is None else scored_state,
                                                       self.measure_sensitivity, round_num, scope)
            ranking = within.narrow(ranking) if within else ranking
            sens_agg = central_sens if central_sens is not None else sens_agg
        group_weights = budget_group_weights(self.cfg, sens_agg)
        if pr.allocation in BUDGET_ALLOCATIONS:
            masks = profile_budget_masks(self.cfg, self.hardware, ranking, self.profiles, sparsity_scale, group_weights, within)
            for above, below, a, b in zip(self.profiles, self.profiles[1:], masks, masks[1:]):
                # nested masks: `below` is cut within `above`; the same pruned sub-network for other budgets means that
                # `above`'s budgets bound it (not at a looser progressive stage, where both may keep everything)
                same_budgets = self.cfg.profiles[above].budgets == self.cfg.profiles[below].budgets
                if a == b and a.channel_sparsity > 0 and sparsity_scale >= 1.0 and not same_budgets:
                    log.warning("[consensus] profile %s gets the same sub-network as %s, listed above it: each profile's sub-network is "
                                "cut within the one above, so %s's own budgets may allow more (list profiles most capable first)",
                                below, above, below)
        else:
            sparsities = [self.cfg.profiles[p].sparsity * sparsity_scale for p in self.profiles]
            if within:  # the same number of channels as in the dense network, now as a share of the scope's
                sparsities = [max(0.0, 1.0 - (1.0 - s) * self.groups.total_channels / groups.total_channels) for s in sparsities]
            masks = nested_masks(groups, ranking, sparsities, pr.allocation, sens_agg, pr.min_channels, pr.round_to or None)
            masks = [within.widen_mask(m) for m in masks] if within else masks
        agreement = {p: float(np.mean(mask_agreement(scores, within.narrow_mask(m) if within else m)))  # within the scope
                     for p, m in zip(self.profiles, masks)}
        self.profile_masks = dict(zip(self.profiles, masks))
        self.node_masks = {n: self.profile_masks[info.profile] for n, info in self.nodes.items()}
        if self.mask_source == "local":  # each client keeps its own top-k: no consensus
            for n, s in zip(owners, scores):
                counts = self.profile_masks[self.nodes[n].profile].kept_counts
                own = StructuredMask.from_scores(s, counts)
                self.node_masks[n] = within.widen_mask(own) if within else own
        ranking = within.widen(ranking) if within else ranking  # the original index space, 0 outside the scope
        in_use = {m.key(): m for m in [*self.profile_masks.values(), *self.node_masks.values()]}
        # Sub-networks no longer in use drop their state (the dense model keeps its BatchNorm statistics).
        self.gates = {k: v for k, v in self.gates.items() if k in in_use}
        dense_key = StructuredMask.dense(self.groups).key()
        self.bn_stats = {k: v for k, v in self.bn_stats.items() if k in in_use or k == dense_key}
        if self.cfg.dynamic.enabled and self.cfg.dynamic.method == "widths":  # nested widths follow the ranking of the masks
            for key, mask in in_use.items():
                if key not in self.gates:  # an unchanged sub-network keeps its trained widths
                    self.gates[key] = initial_width_state(self.cfg, self.model, mask, ranking)
        replied = {self.nodes[n].profile for n in owners}
        without = [p for p in self.profiles if p not in replied and any(i.profile == p for i in self.nodes.values())]
        if without:  # the consensus is global: these profiles' masks come from the other profiles' replies
            log.warning("[consensus] no valid importance reply from profile(s) %s; their masks come from the consensus of %s",
                        ", ".join(without), ", ".join(p for p in self.profiles if p in replied))
        self.consensus_log.append({
            "criterion": pr.criterion,
            "aggregation": fed.aggregation,
            "allocation": pr.allocation,
            "mask_source": self.mask_source,
            "clients": len(scores),
            "profiles_without_replies": without,
            "samples": int(sum(weights)),
            "adversarial_mode": fed.adversarial_mode if adversarial else None,
            "adversarial_partitions": sorted(p for p in pids if p in adversarial),
            "screened_out_partitions": sorted(pids[i] for i in range(len(pids)) if i not in set(kept)),
            # per scoring partition, its ranking's agreement with the median ranking (fedprune.aggregation.screen_clients)
            "screen_agreement": None if screen_agreement is None else {int(pid): float(a) for pid, a in sorted(zip(pids, screen_agreement))},
            "sparsity_scale": sparsity_scale,
            "scored_channel_sparsity": scope.channel_sparsity if scope is not None else 0.0,  # of the network the clients scored
            "agreement": agreement,
            "agreement_mean": float(np.mean(list(agreement.values()))),
            "nested": all(self.profile_masks[a].is_subset_of(self.profile_masks[b]) or self.profile_masks[b].is_subset_of(self.profile_masks[a])
                          for a in self.profiles for b in self.profiles),
            "kept_channels": {p: m.kept_counts for p, m in self.profile_masks.items()},
            "layer_sensitivity": sens_agg,  # sample-weighted mean of the clients' (None when not measured)
            "budget_group_weights": group_weights,
        })
        log.info("[consensus] %s/%s over %d clients; agreement (mean Jaccard) %s", pr.criterion, fed.aggregation, len(scores),
                 ", ".join(f"{p}={a:.2f}" for p, a in agreement.items()))

    # --------------------------------------------------------- evaluation
    def test_accuracy(self, mask: StructuredMask | None = None) -> float:
        """Accuracy of the global model (or a profile's extracted sub-network) on the test split."""
        return float(evaluate(self.extracted(mask), self.test_loader)["accuracy"])

    def extracted(self, mask: StructuredMask | None = None) -> torch.nn.Module:
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.state)
        if mask is None:
            return model
        sub = extract_submodel(model, mask, self.groups)
        sub.load_state_dict(self.substate(mask), strict=False)
        return sub

    def evaluated_masks(self) -> dict[str, dict[str, StructuredMask]]:
        """Per profile, the sub-networks its clients train, by name: the profile's mask (name: the profile), or
        with mask source ``local`` each client's own mask (name: ``profile/client-<partition>``; profiles
        without clients are left out). Per-round accuracy and the saved sub-networks and masks use these."""
        if self.mask_source != "local":
            return {p: {p: m} for p, m in self.profile_masks.items()}
        out: dict[str, dict[str, StructuredMask]] = {}
        for n in sorted(self.nodes, key=lambda n: self.nodes[n].partition_id):
            info = self.nodes[n]
            out.setdefault(info.profile, {})[f"{info.profile}/client-{info.partition_id}"] = self._mask_for(n)
        return {p: out[p] for p in self.profile_masks if p in out}

    def _evaluate_round(self, rec: dict) -> None:
        every = self.cfg.federated.eval_every
        if not every or rec["round"] % every:
            return
        if self.profile_masks:  # a profile's accuracy: the mean over its distinct sub-networks (one unless masks are local), as at the end
            rec["accuracy"] = {p: float(np.mean([self.test_accuracy(m) for m in {m.key(): m for m in ms.values()}.values()]))
                               for p, ms in self.evaluated_masks().items()}
        else:
            rec["accuracy"] = {"dense": self.test_accuracy()}

    def _log_round(self, rec: dict, total: int) -> None:
        acc = rec.get("accuracy")
        acc_s = " ".join(f"{k}={v:.3f}" for k, v in acc.items()) if acc else "-"
        loss = rec.get("train_loss")
        log.info("[%s round %d/%d] %d clients, %d failed, loss %s, test acc %s, %.1f s, %.2f MB down / %.2f MB up",
                 rec["phase"], rec["round"], max(total, rec["round"]), rec["clients"], rec["failures"], f"{loss:.3f}" if loss is not None else "-",
                 acc_s, rec["wall_s"], rec["bytes_down"] / 1e6, rec["bytes_up"] / 1e6)

    # ---------------------------------------------------------------- run
    def plan(self) -> list[tuple[str, int, float]]:
        """The run as a list of steps ``(kind, round, sparsity_scale)``; kind is a training phase
        ("dense", "warmup", "finetune"), "importance" or "dense_eval" (test accuracy of the
        dense global model, recorded once the dense rounds are over). A checkpoint stores how
        many steps are complete."""
        fed = self.cfg.federated
        r1, r2 = fed.warmup_rounds, fed.finetune_rounds
        if self.mask_source == "none":
            return [("dense", r, 1.0) for r in range(1, r1 + r2 + 1)] + [("dense_eval", r1 + r2, 1.0)]
        steps = [("warmup", r, 1.0) for r in range(1, r1 + 1)] + [("dense_eval", r1, 1.0)]
        stages = fed.stages
        for r in range(r1 + 1, r1 + r2 + 1):
            k = r - r1 - 1  # fine-tune round index from 0
            stage = k // fed.repeat_every + 1 if fed.repeat_every else 1
            if k == 0 or (fed.repeat_every and k % fed.repeat_every == 0 and stage <= stages):
                steps.append(("importance", r, stage / stages))
            steps.append(("finetune", r, 1.0))
        if r2 == 0:
            steps.append(("importance", r1 + 1, 1.0))
        return steps

    def run_step(self, kind: str, round_num: int, scale: float) -> None:
        total = self.cfg.federated.warmup_rounds + self.cfg.federated.finetune_rounds
        if kind == "dense_eval":
            self.dense_acc = self.test_accuracy()
            return
        if kind == "importance":
            rec = self.importance_round(round_num, sparsity_scale=scale)
        else:
            rec = self.train_round(round_num, kind)
            self._evaluate_round(rec)
        self.rounds.append(rec)
        self._log_round(rec, total)

    def run(self, resume: bool = False, warm_start: str | Path | None = None) -> dict:
        """Run every step of :meth:`plan`, checkpointing after each when there is an output directory.

        With ``resume`` the server state is restored from ``out_dir``'s checkpoint and the run
        continues after its last complete step; the results equal those of an uninterrupted run.
        With ``warm_start`` (another run's directory) the run starts after that run's dense
        warm-up (:meth:`warm_start`), with the same results as if it had trained the warm-up itself.
        """
        start = time.perf_counter()
        self.check_budgets()
        self.register()
        steps = self.plan()
        done, elapsed = 0, 0.0
        if resume and warm_start:
            raise ValueError("resume and warm_start exclude each other: a resumed run already has its warm-up")
        if resume:
            done, elapsed = self.restore(load_checkpoint(self.out_dir))
            log.info("[resume] %s: %d of %d steps were complete; continuing", self.out_dir, done, len(steps))
        elif warm_start:
            done, elapsed = self.warm_start(load_checkpoint(warm_start, "warm-start"))
            log.info("[warm start] %s: its %d dense warm-up round(s) are this run's first %d of %d steps; continuing",
                     warm_start, len(self.rounds), done, len(steps))
        if not resume and self.out_dir:  # a fresh run never leaves another run's checkpoint behind
            (self.out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
        for i in range(done, len(steps)):
            self.run_step(*steps[i])
            if self.out_dir:
                save_checkpoint(self.out_dir, self.checkpoint_payload(i + 1, elapsed + time.perf_counter() - start))
        if self.cfg.eval.static_bn:
            fed = self.cfg.federated
            self.rounds.append(self.calibrate_bn(fed.warmup_rounds + fed.finetune_rounds))
            if self.mask_source == "none":  # the dense model ends the run: evaluate it with its pooled statistics
                self.dense_acc = self.test_accuracy()
        results = self.final_results(self.dense_acc, model_costs(self.model), elapsed + time.perf_counter() - start)
        if self.out_dir:
            self.write(results)
        return results

    # ------------------------------------------------------- checkpoints
    def checkpoint_payload(self, steps_done: int, wall_s: float) -> dict:
        """Everything :meth:`restore` needs; masks and clients are keyed by partition id
        because node ids change when the clients are restarted."""
        by_pid = {i.partition_id: n for n, i in self.nodes.items()}
        own_masks = {pid: self.node_masks[n].to_arrays() for pid, n in by_pid.items()
                     if n in self.node_masks and self.node_masks[n] != self.profile_masks.get(self.nodes[n].profile)}
        return {
            "config": config_to_dict(self.cfg),
            "mask_source": self.mask_source,
            "steps_done": steps_done,
            "plan": self.plan(),
            "wall_s": wall_s,
            "state": self.state,
            "bn_stats": self.bn_stats,
            "gates": self.gates,
            "profile_masks": {p: m.to_arrays() for p, m in self.profile_masks.items()},
            "partition_masks": own_masks,
            "partition_profiles": {i.partition_id: i.profile for i in self.nodes.values()},
            "rounds": self.rounds,
            "consensus_log": self.consensus_log,
            "model_version": self.model_version,
            "dense_acc": self.dense_acc,
            "warmup_input": self.warmup_input,
            "registration_bytes": self.registration_bytes,  # of every process of this run so far
            "rng": rng_states(),
        }

    def restore(self, ckpt: dict) -> tuple[int, float]:
        """Load a checkpoint into this server (after :meth:`register`); returns (steps done, wall seconds so far)."""
        if (without_final_eval(ckpt["config"]) != without_final_eval(config_to_dict(self.cfg)) or ckpt["mask_source"] != self.mask_source
                or ckpt["plan"] != self.plan()):
            raise CheckpointError(f"cannot resume: the checkpoint in {str(self.out_dir)!r} was written by a run with a different config or mask source")
        profiles = {i.partition_id: i.profile for i in self.nodes.values()}
        if profiles != ckpt["partition_profiles"]:
            raise CheckpointError(f"cannot resume: the registered clients {sorted(profiles)} differ from the checkpoint's {sorted(ckpt['partition_profiles'])}")
        self.state, self.bn_stats, self.gates = ckpt["state"], ckpt["bn_stats"], ckpt["gates"]
        # in the run's profile order; a checkpoint of an older version also holds masks of profiles without clients: dropped
        self.profile_masks = {p: StructuredMask.from_arrays(ckpt["profile_masks"][p], self.groups) for p in self.profiles if p in ckpt["profile_masks"]}
        self.node_masks = {}
        if self.profile_masks:
            for n, info in self.nodes.items():
                own = ckpt["partition_masks"].get(info.partition_id)
                self.node_masks[n] = StructuredMask.from_arrays(own, self.groups) if own is not None else self.profile_masks[info.profile]
        self.rounds, self.consensus_log = ckpt["rounds"], ckpt["consensus_log"]
        self.model_version, self.dense_acc = ckpt["model_version"], ckpt["dense_acc"]
        self.warmup_input = ckpt.get("warmup_input")  # the restarted clients lack their copy: it is sent to them (counted)
        # This process registered the clients again: the run's traffic counts both (a checkpoint written before
        # the key existed counts only this process's).
        before = ckpt.get("registration_bytes", (0, 0))
        self.registration_bytes = (self.registration_bytes[0] + before[0], self.registration_bytes[1] + before[1])
        restore_rng_states(ckpt["rng"])
        return int(ckpt["steps_done"]), float(ckpt["wall_s"])

    def warm_start(self, ckpt: dict) -> tuple[int, float]:
        """Take over the dense warm-up of another run's checkpoint (after :meth:`register`); returns
        (steps done, wall seconds of the warm-up).

        The checkpoint's run must have the same config except for keys that only act after the
        warm-up (:func:`warmup_config`: pruning, fine-tuning, dynamic, evaluation...), and its
        completed steps must be dense rounds that begin this run's plan (followed at most by the
        evaluation of the dense model). Criteria, mask sources and fine-tuning methods can so be
        compared from one warm-up, e.g. one ``mask_source="none"`` run with ``finetune_rounds = 0``.
        """
        check_warmup_config(self.cfg, ckpt)
        profiles = {i.partition_id: i.profile for i in self.nodes.values()}
        if profiles != ckpt["partition_profiles"]:
            raise CheckpointError(f"cannot warm-start: the registered clients {sorted(profiles)} differ from the checkpoint's")
        dense_kinds = {"dense": "warmup", "warmup": "warmup"}

        def norm(step):
            kind, r, scale = step
            return (dense_kinds.get(kind, kind), r, scale)

        done_steps, plan = [tuple(x) for x in ckpt["plan"][: ckpt["steps_done"]]], self.plan()
        k = 0
        while k < min(len(done_steps), len(plan)) and norm(done_steps[k]) == norm(plan[k]) and norm(plan[k])[0] in ("warmup", "dense_eval"):
            k += 1
        rest = done_steps[k:]
        if k == 0 or any(kind != "dense_eval" for kind, *_ in rest):
            raise CheckpointError("cannot warm-start: the checkpoint's completed steps "
                                  f"({', '.join(f'{kind} {r}' for kind, r, _ in done_steps[:4])}{'...' if len(done_steps) > 4 else ''}) "
                                  "are not dense rounds that begin this run")
        kinds = {r: kind for kind, r, _ in plan[:k] if kind != "dense_eval"}
        self.state, self.bn_stats = ckpt["state"], ckpt["bn_stats"]
        self.rounds = [{**rec, "phase": kinds[rec["round"]]} for rec in ckpt["rounds"]]
        self.model_version = ckpt["model_version"]
        self.dense_acc = ckpt["dense_acc"] if any(kind == "dense_eval" for kind, *_ in plan[:k]) else None
        last = self.cfg.federated.warmup_rounds
        if self.cfg.federated.score_model == "last_warmup" and any(kind != "dense_eval" and r == last for kind, r, _ in plan[:k]):
            # the warm-up's last round is taken over: so must be the model it sent (else this run trains that round itself)
            self.warmup_input = ckpt.get("warmup_input")
            if self.warmup_input is None:
                raise CheckpointError("cannot warm-start: federated.score_model = 'last_warmup' scores the model sent in the last "
                                      "warm-up round, and the checkpoint's run did not keep it (run its warm-up with the same setting)")
        restore_rng_states(ckpt["rng"])
        return k, float(ckpt["wall_s"])

    def final_results(self, dense_acc: float, dense_costs: dict, wall_s: float) -> dict:
        ev = self.cfg.eval
        log.info("[evaluate] final models: test split, local validation, params, FLOPs%s", ", latency" if self.cfg.eval.latency else "")
        profiles = {}
        local_nodes = self.final_eval_nodes()
        local_acc, final_replies, local_valid = self.federated_evaluate(local_nodes)
        for p in self.profiles:
            clients = [n for n, i in self.nodes.items() if i.profile == p]
            if not clients:
                continue
            masks = {self._mask_for(n).key(): self._mask_for(n) for n in clients}
            accs, costs, models = [], [], []
            for mask in masks.values():
                model = self.extracted(mask)
                models.append(model)
                accs.append(float(evaluate(model, self.test_loader)["accuracy"]))
                costs.append(model_costs(model, ev.latency, ev.latency_threads, ev.latency_repeats))
            mask0 = next(iter(masks.values()))
            entry = {
                "channel_sparsity": float(np.mean([m.channel_sparsity for m in masks.values()])),
                "target_sparsity": self.cfg.profiles[p].sparsity,
                "params": int(np.mean([c["params"] for c in costs])),
                "flops": int(np.mean([c["flops"] for c in costs])),
                "macs": int(np.mean([c["macs"] for c in costs])),
                "accuracy": float(np.mean(accs)),
                "local_val_accuracy": local_acc.get(p),
                "local_val_clients": local_valid.get(p, 0),  # whose final evaluation reply was valid
                "clients": len(clients),
                "distinct_masks": len(masks),
                "kept_channels": mask0.kept_counts,
            }
            if ev.latency:
                entry["latency_ms"] = {b: float(np.mean([c["latency_ms"][b] for c in costs])) for b in ("b1", "b64")}
            if self.cfg.dynamic.enabled and mask0.key() in self.gates:
                entry["dynamic"] = self.dynamic_report(mask0, models[0])
            prof = self.cfg.profiles[p]
            if prof.budgets:
                host_ms = {1: entry["latency_ms"]["b1"], 64: entry["latency_ms"]["b64"]} if ev.latency else None
                predict_latency = ev.latency or self.cfg.pruning.allocation in BUDGET_ALLOCATIONS
                entry["budgets"] = self.hardware.report(prof.budgets, mask0, models[0], prof.compute_speed, host_ms, predict_latency, ev.latency_repeats)
                oks = [b["ok"] for b in entry["budgets"].values()]
                entry["budgets_ok"] = None if None in oks else all(oks)
            profiles[p] = entry
        dense = {"accuracy": dense_acc, "params": dense_costs["params"], "flops": dense_costs["flops"], "macs": dense_costs["macs"],
                 "note": "global dense model at the end of the dense rounds (before pruning); BatchNorm statistics "
                         + ("pooled after the last round (static BN)" if self.cfg.eval.static_bn and self.mask_source == "none"
                            else "averaged from the clients' local models of the last dense round")}
        if ev.latency:
            dense["latency_ms"] = model_costs(self.model, True, ev.latency_threads, ev.latency_repeats)["latency_ms"]
        reg_down, reg_up = self.registration_bytes
        outside = {"registration_bytes_down": reg_down, "registration_bytes_up": reg_up,
                   "final_evaluation_bytes_down": sum(r.bytes_down for r in final_replies),
                   "final_evaluation_bytes_up": sum(r.bytes_up for r in final_replies)}
        totals = {  # every message of the run: the rounds', plus registration and the final evaluation (listed too)
            "bytes_up": sum(r["bytes_up"] for r in self.rounds) + reg_up + outside["final_evaluation_bytes_up"],
            "bytes_down": sum(r["bytes_down"] for r in self.rounds) + reg_down + outside["final_evaluation_bytes_down"],
            **outside,
            "wall_s": wall_s,
        }
        def budget_note(e: dict) -> str:
            ok = e.get("budgets_ok")
            return "" if ok is None else (", budgets met" if ok else ", budgets MISSED: " + ", ".join(k for k, b in e["budgets"].items() if not b["ok"]))

        summary = "; ".join([f"dense {dense_acc:.3f}"] + [f"{p} {e['accuracy']:.3f} @ {100 * e['channel_sparsity']:.0f}% ch pruned, "
                                                          f"{dense['flops'] / e['flops']:.2f}x fewer FLOPs{budget_note(e)}" for p, e in profiles.items()])
        return {
            "config": config_to_dict(self.cfg),
            "mask_source": self.mask_source,
            "dense": dense,
            "profiles": profiles,
            "rounds": self.rounds,
            "consensus": self.consensus_log[-1] if self.consensus_log else None,
            "consensus_history": self.consensus_log,
            "clients": [dataclasses.asdict(i) for i in sorted(self.nodes.values(), key=lambda i: i.partition_id)],
            "registration_failures": list(self.registration_failures),
            "totals": totals,
            "summary": summary,
        }

    def dynamic_report(self, mask: StructuredMask, model: torch.nn.Module) -> dict:
        """``profiles.<name>.dynamic``: per budget (gates) or exit threshold (widths) the test accuracy,
        MACs executed per input and batch-1 latency."""
        from fedprune.dynamic import evaluate_gated, gated_latency_ms

        ev, dyn = self.cfg.eval, self.cfg.dynamic
        if dyn.method == "widths":
            return self.cascade_report(mask, model)
        gated = gated_model(self.cfg, model, self.gates[mask.key()])
        rows = evaluate_gated(gated, self.test_loader, dyn.eval_budgets)
        out = {
            "budgets": [r["budget"] for r in rows],
            "accuracy": [r["accuracy"] for r in rows],
            "macs": [r["macs"] for r in rows],
            "channels": [r["channels"] for r in rows],
            "note": "masked path for accuracy; MACs per input from the sliced batch-1 path (gate predictors included)",
        }
        if ev.latency:
            lat = gated_latency_ms(gated, dyn.eval_budgets, ev.latency_threads, repeats=max(20, ev.latency_repeats))
            out["latency_ms_b1"] = {"runtime": "torch", "static": lat["static"], "gated": [lat[f"gated@{b:g}"] for b in dyn.eval_budgets]}
        return out

    def cascade_report(self, mask: StructuredMask, model: torch.nn.Module) -> dict:
        """``profiles.<name>.dynamic`` of method ``widths``: the early-exit cascade over the sub-network's nested widths."""
        from fedprune.dynamic import NestedWidthCNN, WidthCascade, cascade_latency_ms, evaluate_cascade, widths_calibrated

        ev, dyn = self.cfg.eval, self.cfg.dynamic
        state = self.gates[mask.key()]
        if not widths_calibrated(state):  # no fine-tuning round trained it (e.g. finetune_rounds = 0)
            return {"method": "widths", "calibrated": False, "note": "no client trained this sub-network's widths: nothing to report"}
        res = evaluate_cascade(NestedWidthCNN.from_dynamic_state(model, state, dyn.round_to), dyn.widths, self.test_loader, dyn.thresholds,
                               dyn.exit_rule)
        stages, rows = res["stages"], res["rows"]
        out = {
            "method": "widths",
            "calibrated": True,
            "widths": res["widths"],
            "width_accuracy": res["width_accuracy"],
            "stage_macs": res["stage_macs"],
            "exit_rule": dyn.exit_rule,
            "thresholds": [r["threshold"] for r in rows],
            "accuracy": [r["accuracy"] for r in rows],
            "macs": [r["macs"] for r in rows],
            "exits": [r["exits"] for r in rows],
            "note": "an input runs the widths in turn until its confidence (exit_rule: 'margin' = top-1 minus top-2 softmax "
                    "probability, 'max_prob' = top softmax probability) reaches the threshold; "
                    "MACs per input are the sum over the widths it ran; latency is the mean ms per test image of the static "
                    "sub-network and of each cascade, both run in latency_ms_b1.runtime",
        }
        if ev.latency:
            images = list(itertools.islice((x[None] for batch, _ in self.test_loader for x in batch), dyn.latency_inputs))
            lat = cascade_latency_ms(stages[-1], {f"{t:g}": WidthCascade(stages, t, rule=dyn.exit_rule) for t in dyn.thresholds}, images,
                                     ev.latency_threads, runtime=dyn.latency_runtime)
            out["latency_ms_b1"] = {"runtime": dyn.latency_runtime, "static": lat["static"], "cascade": [lat[f"{t:g}"] for t in dyn.thresholds]}
        return out

    def write(self, results: dict) -> None:
        from fedprune.plots import plot_run

        out = self.out_dir
        out.mkdir(parents=True, exist_ok=True)
        torch.save(self.state, out / "global_model.pt")
        # Each profile's final sub-network as evaluated (extracted weights and its own BatchNorm statistics);
        # with local masks one per client, named profile/client-<partition> (:meth:`evaluated_masks`).
        named = {name: m for ms in self.evaluated_masks().values() for name, m in ms.items()}
        torch.save({name: self.extracted(m).state_dict() for name, m in named.items()}, out / "subnetworks.pt")
        np.savez(out / "masks.npz", **{f"{name}/{g}": v for name, m in named.items() for g, v in m.to_arrays().items()})
        write_csv(out / "rounds.csv", [_flat_round(r) for r in results["rounds"]])
        budget_rows = [{"profile": p, "budget": k, **b} for p, e in results["profiles"].items() for k, b in e.get("budgets", {}).items()]
        if budget_rows:
            write_csv(out / "budgets.csv", budget_rows, ["profile", "budget", "limit", "predicted", "measured", "ok", "unit"])
        plot_run(results, out)
        write_json(out / "results.json", results)  # last: its presence marks a finished run
        log.info("[done] wrote %s", out / "results.json")


def _attempt_key(attempt: int) -> dict:
    """``{"attempt": k}`` for a re-sent round (clients draw failures afresh); nothing for the first attempt."""
    return {"attempt": attempt} if attempt else {}


def _flat_round(rec: dict) -> dict:
    flat = {k: v for k, v in rec.items() if k != "accuracy"}
    if "failed_clients" in flat:  # one CSV cell: "#3 (mobile_cpu): reason; ..."
        flat["failed_clients"] = "; ".join(f"#{f['partition']} ({f['profile']}): {f['reason']}" for f in flat["failed_clients"])
    for k, v in (rec.get("accuracy") or {}).items():
        flat[f"accuracy_{k}"] = v
    return flat


# -------------------------------------------------------------- entry point
#: Config keys that act only after the dense warm-up (whole sections, or keys of a section); runs that
#: differ only in these can share one warm-up (:meth:`FederatedPruning.warm_start`).
AFTER_WARMUP_KEYS: dict[str, tuple[str, ...] | None] = {
    "pruning": None,
    "dynamic": None,
    "eval": None,
    "federated": ("finetune_rounds", "repeat_every", "prune_stages", "score_model", "aggregation", "trim_fraction", "screen_clients", "adversarial_fraction",
                  "adversarial_mode", "adversarial_scale", "sensitivity", "nested_training", "nested_distill", "final_eval_clients"),
}
#: Keys of each profile that act only after the warm-up.
AFTER_WARMUP_PROFILE_KEYS = ("sparsity", "budgets")


#: Config keys that act only in the final evaluation, after the last step of the plan: a resumed run
#: may change them, e.g. to evaluate a finished run again with static BN (:meth:`FederatedPruning.restore`).
FINAL_EVAL_KEYS: dict[str, tuple[str, ...] | None] = {"eval": ("latency", "static_bn"), "federated": ("final_eval_clients",),
                                                      "dynamic": ("latency_inputs", "latency_runtime")}


def warmup_config(config: dict) -> dict:
    """The part of a config dict (:func:`~fedprune.config.config_to_dict`) that shapes the dense warm-up."""
    return config_without(config, AFTER_WARMUP_KEYS, AFTER_WARMUP_PROFILE_KEYS)


#: Keys added after runs were made, with the value that does what those runs did: :func:`acting_config` drops them
#: at that value, so a run made before a key existed still matches a config that has it.
ADDED_KEYS = {("federated", "score_model"): "current", ("federated", "prune_stages"): 0}


def acting_config(config: dict) -> dict:
    """A config dict without the settings that cannot act in its run: with ``dynamic.enabled`` false, the
    rest of the ``dynamic`` section; :data:`ADDED_KEYS` at their old behaviour. Two configs that differ only
    there describe the same run (e.g. a run finished before a key was added or a default changed), so a
    restart may reuse it."""
    dyn = config.get("dynamic")
    if isinstance(dyn, dict) and not dyn.get("enabled", False):
        config = {**config, "dynamic": {"enabled": False}}
    for (section, key), old in ADDED_KEYS.items():
        sec = config.get(section)
        if isinstance(sec, dict) and sec.get(key, old) == old and key in sec:
            config = {**config, section: {k: v for k, v in sec.items() if k != key}}
    return config


def without_final_eval(config: dict) -> dict:
    """The part of a config dict that shapes the run's steps (all but :data:`FINAL_EVAL_KEYS`, and only what acts:
    :func:`acting_config`)."""
    return config_without(acting_config(config), FINAL_EVAL_KEYS)


def check_warmup_config(cfg: ExperimentConfig, ckpt: dict) -> None:
    """:class:`CheckpointError` unless the run of checkpoint ``ckpt`` has ``cfg``'s config in every key that shapes
    the dense warm-up (:func:`warmup_config`), which a warm start takes over."""
    ours, theirs = warmup_config(config_to_dict(cfg)), warmup_config(ckpt["config"])
    if ours != theirs:
        diff = sorted(_config_diff(ours, theirs))
        raise CheckpointError(f"cannot warm-start: the checkpoint's run differs in keys that shape the dense warm-up: {', '.join(diff[:6])}")


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = set(a) | set(b)
    out = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k} ({vb!r} there, {va!r} here)")
    return out


def make_server_app(cfg: ExperimentConfig, out_dir: str | Path | None, mask_source: str = "consensus", resume: bool = False,
                    warm_start: str | Path | None = None):
    """A ServerApp bound to one resolved config (used by ``fedprune simulate``)."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:  # noqa: ARG001
        FederatedPruning(cfg, GridTransport(grid), out_dir, mask_source).run(resume=resume, warm_start=warm_start)

    return app


def _quiet_env() -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def resume_config(out_dir: str | Path) -> tuple[ExperimentConfig, str]:
    """The config and mask source of the run whose checkpoint lies in ``out_dir``."""
    from fedprune.config import config_from_dict

    ckpt = load_checkpoint(out_dir)
    return config_from_dict(ckpt["config"], resolved=True), ckpt["mask_source"]


def ray_init_args(fed) -> dict:
    """``ray.init`` arguments of the Simulation Engine (Flower's ``backend_config["init_args"]``).

    The cluster address is ``federated.ray_address``, else ``$RAY_ADDRESS``, else none: then a
    new local Ray instance with ``federated.ray_num_cpus`` CPUs starts (``address="local"``, so
    a cluster that ``ray start`` left on this machine is never joined by accident) and Flower
    shuts it down at the end. With an address (``host:port`` or ``auto``) the driver joins that
    cluster; Ray refuses ``num_cpus`` there (the cluster's own resources count), and Flower's
    ``ray.shutdown()`` at the end only disconnects, so the cluster keeps running.
    """
    address = fed.ray_address.strip() or os.environ.get("RAY_ADDRESS", "").strip()
    args = {"include_dashboard": False, "log_to_driver": True}
    if not address or address == "local":
        return {**args, "address": "local", "num_cpus": fed.ray_num_cpus}
    return {**args, "address": address}


def finished_results(out_dir: str | Path, cfg: ExperimentConfig, mask_source: str) -> dict | None:
    """The results of the finished run in ``out_dir`` when resuming it with ``cfg`` would only repeat its final
    evaluation (its ``results.json`` is newer than its checkpoint and has the same config and mask source), else None:
    a run killed before it finished, or one finished by an older version or with other final-evaluation keys (a
    resume evaluates it again, e.g. with static BN)."""
    import json

    out = Path(out_dir)
    path, ckpt = out / "results.json", out / CHECKPOINT_FILE
    if not (path.is_file() and ckpt.is_file()) or path.stat().st_mtime < ckpt.stat().st_mtime:
        return None
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same = res.get("config") == json.loads(json.dumps(to_jsonable(config_to_dict(cfg)))) and res.get("mask_source") == mask_source
    return res if same else None


#: What each kind of step of :meth:`FederatedPruning.plan` does, for people.
_STEP_NAMES = {"dense": "dense FedAvg", "warmup": "dense FedAvg warm-up", "finetune": "fine-tuning of the profiles' sub-networks",
               "importance": "importance round", "dense_eval": "test accuracy of the dense model"}


def describe_run(cfg: ExperimentConfig, mask_source: str = "consensus", warm_start: str | Path | None = None,
                 resume: str | Path | None = None) -> str:
    """What :func:`simulate` would do with ``cfg``, as text, without running a round or writing to a run directory:
    the data and model, every client's profile and shard size (cut as the clients will cut them), each profile's
    sparsity and budgets, and the steps of the run by round. It makes the checks a run makes before its first round
    on the config, the data, the budgets and the ``warm_start`` run's config; ``resume`` (the run directory ``cfg``
    came from) adds how far that run got. Latency budgets need the latency tables, which are measured (and cached,
    :func:`fedprune.cost.lut_cache_dir`) on first use."""
    from fedprune.cost import lut_cache_dir
    from fedprune.task import client_register

    cfg = resolve_data_dir(cfg)
    check_partition(cfg)
    server = FederatedPruning(cfg, transport=None, mask_source=mask_source)  # no transport: nothing is sent
    server.check_budgets()
    warm_rounds = ""
    if warm_start:
        check_warmup_config(cfg, load_checkpoint(warm_start, "warm-start"))
        warm_rounds = f" (taken over from the warm-start run {str(warm_start)!r}, not trained again)"
    fed, d, pr = cfg.federated, cfg.data, cfg.pruning
    train, test = load_data(cfg)
    dense = model_costs(server.model)
    per_round = fed.clients_per_round or fed.num_clients
    lines = [
        f"model {cfg.model.name}: {dense['params']:,} params, {dense['flops'] / 1e6:.1f} MFLOPs per image; data {d.dataset} "
        f"({len(train)} train / {len(test)} test images{', from ' + str(d.data_dir) if d.data_dir else ''}), partition {d.partition!r}, "
        f"seed {cfg.seed}",
        f"clients: {fed.num_clients}, {min(per_round, fed.num_clients)} sampled per round; mask source {mask_source!r}"
        + ("" if mask_source == "none" else f", criterion {pr.criterion!r}, aggregation {fed.aggregation!r}, allocation {pr.allocation!r}"),
    ]
    nodes = [client_register(cfg, i, fed.num_clients) for i in range(fed.num_clients)]
    for name in server.profiles:
        mine = [n for n in nodes if n["profile"] == name]
        p = cfg.profiles[name]
        ids = ", ".join(str(n["partition-id"]) for n in mine[:12]) + (", ..." if len(mine) > 12 else "")
        budgets = ", ".join(f"{k} <= {v:,.0f}" if float(v).is_integer() and v >= 1000 else f"{k} <= {v:g}"
                            for k, v in p.budgets.items()) or "none"
        width = ("dense" if mask_source == "none" else "width sized to its budgets" if pr.allocation in BUDGET_ALLOCATIONS
                 else f"{100 * p.sparsity:g}% of channels pruned")
        lines.append(f"  {name}: {len(mine)} client(s){f' (partitions {ids})' if mine else ''}, "
                     f"{sum(n['num-train'] for n in mine)} train / {sum(n['num-val'] for n in mine)} validation images, "
                     f"{width}, {p.local_epochs} local epoch(s) of batch {p.batch_size}, budgets: {budgets}")
    shards = [n["num-train"] for n in nodes]
    lines.append(f"  train images per client: min {min(shards)}, median {int(np.median(shards))}, max {max(shards)}")
    lines.append("steps:")
    for kind, steps in itertools.groupby(server.plan(), key=lambda step: step[0]):
        steps = list(steps)
        if kind == "dense_eval":
            continue
        first, last, scale = steps[0][1], steps[-1][1], steps[0][2]
        span = f"round {first}" if first == last else f"rounds {first}-{last}"
        what = _STEP_NAMES[kind] + (f" + {mask_source} masks" + (f" (progressive stage: sparsity x {scale:.2f})" if scale < 1 else "")
                                    if kind == "importance" else warm_rounds if kind == "warmup" else "")
        lines.append(f"  {span}: {what}")
    lines.append(f"evaluation every {fed.eval_every} round(s)" if fed.eval_every else "evaluation at the end only")
    if resume:
        ckpt, steps = load_checkpoint(resume), server.plan()
        if finished_results(resume, cfg, mask_source) is not None:
            lines.append(f"resume: the run in {str(resume)!r} finished already; --resume would do nothing")
        elif ckpt["steps_done"] < len(steps):
            kind, r, _ = steps[ckpt["steps_done"]]
            lines.append(f"resume: {ckpt['steps_done']} of {len(steps)} steps done; --resume continues with round {r} ({_STEP_NAMES[kind]})")
        else:
            lines.append(f"resume: every step is done; --resume runs the final evaluation of {str(resume)!r}")
    if server._hardware is not None and server.hardware.table_batches:
        lines.append(f"latency tables (batch {', '.join(map(str, server.hardware.table_batches))}) for the budget check: "
                     f"measured or read from the cache {str(lut_cache_dir())!r}")
    return "\n".join(lines)


def simulate(cfg: ExperimentConfig, out_dir: str | Path, engine: str = "ray", mask_source: str = "consensus", resume: bool = False,
             warm_start: str | Path | None = None) -> dict:
    """Run one federated experiment and return its results (also written to ``out_dir``).

    ``engine="ray"`` uses Flower's Simulation Engine (Ray backend) with
    ``federated.num_cpus_per_client`` CPUs per client, on a local Ray instance or on the
    cluster named by ``federated.ray_address`` / ``$RAY_ADDRESS`` (:func:`ray_init_args`); ``"inprocess"`` runs
    the same ClientApp sequentially in this process. The server checkpoints
    ``out_dir/checkpoint.pt`` after every round; ``resume=True`` continues from
    it (``cfg`` must be the checkpoint's config, see :func:`resume_config`).
    ``warm_start`` names another run's directory whose dense warm-up this run takes
    over instead of training it (:meth:`FederatedPruning.warm_start`).
    """
    _quiet_env()
    out = check_out_dir(out_dir, "out_dir")  # a file or an unwritable place fails now, not after the first round
    cfg = resolve_data_dir(cfg)
    check_partition(cfg)  # fail early and clearly if the data is missing or too small for the clients
    fed = cfg.federated
    if resume:
        load_checkpoint(out)  # fail early with a clear message
        finished = finished_results(out, cfg, mask_source)
        if finished is not None:
            log.info("[resume] %s: the run finished already with this config; nothing to do", out)
            return finished
    if warm_start:
        load_checkpoint(warm_start, "warm-start")
    if engine == "inprocess":
        return FederatedPruning(cfg, InProcessTransport(fed.num_clients), out, mask_source).run(resume=resume, warm_start=warm_start)
    if engine != "ray":
        raise ValueError(f"unknown engine {engine!r}; allowed: ['ray', 'inprocess']")
    from flwr.simulation import run_simulation

    from fedprune.client_app import app as client_app

    (out / "results.json").unlink(missing_ok=True)
    backend_config = {
        "client_resources": {"num_cpus": fed.num_cpus_per_client, "num_gpus": fed.num_gpus_per_client},
        "init_args": ray_init_args(fed),
    }
    if "num_cpus" not in backend_config["init_args"]:
        log.info("Simulation Engine: connecting to the Ray cluster at %s", backend_config["init_args"]["address"])
    run_simulation(make_server_app(cfg, out, mask_source, resume, warm_start), client_app, num_supernodes=fed.num_clients, backend_name="ray", backend_config=backend_config)
    path = out / "results.json"
    if not path.is_file():
        raise RuntimeError(f"the simulation ended without writing {path}; see the log above for the server error")
    import json

    return json.loads(path.read_text())
