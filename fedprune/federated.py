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

import copy
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fedprune.aggregation import aggregate_importance, mask_agreement, merge_substates
from fedprune.allocation import check_feasible, nested_masks
from fedprune.config import BUDGET_ALLOCATIONS, ExperimentConfig, config_to_dict
from fedprune.data import make_loader
from fedprune.masks import StructuredMask, extract_submodel, extraction_index_map, slice_state
from fedprune.metrics import model_costs
from fedprune.profiles import profile_order, simulated_client_seconds
from fedprune.records import (
    config_to_record,
    mask_to_record,
    record_to_state,
    record_to_vectors,
    recorddict_nbytes,
    state_to_record,
)
from fedprune.reporting import write_csv, write_json
from fedprune.task import budget_round_to, build_model, gate_state, gated_model, hardware_model, load_data, model_groups, profile_budget_masks, profile_constraints
from fedprune.training import evaluate, set_seed

log = logging.getLogger("fedprune.server")

__all__ = ["Reply", "Transport", "GridTransport", "InProcessTransport", "FederatedPruning", "simulate", "resolve_data_dir"]

MASK_SOURCES = ("consensus", "local", "random", "none")


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


class GridTransport:
    """Flower ``Grid``: messages go through the SuperLink (simulation or deployment)."""

    def __init__(self, grid, timeout: float | None = None):
        self.grid, self.timeout = grid, timeout

    def node_ids(self) -> list[int]:
        return sorted(int(n) for n in self.grid.get_node_ids())

    def exchange(self, requests):
        from flwr.app import Message

        messages = [Message(content, dst_node_id=node, message_type=mtype) for node, mtype, content in requests]
        sizes = [recorddict_nbytes(content) for _, _, content in requests]
        replies = {}
        for rep in self.grid.send_and_receive(messages, timeout=self.timeout):
            replies[int(rep.metadata.src_node_id)] = rep
        out = []
        for (node, _, _), down in zip(requests, sizes):
            rep = replies.get(node)
            if rep is None:
                out.append(Reply(node, None, "no reply (timeout or dropped)", down, 0))
            elif rep.has_error():
                out.append(Reply(node, None, f"client error {rep.error.code}: {rep.error.reason}", down, 0))
            else:
                out.append(Reply(node, rep.content, None, down, recorddict_nbytes(rep.content)))
        return out


class InProcessTransport:
    """Runs the ClientApp handlers in this process, one client at a time, with real Flower messages.

    Node ``i`` has ``partition-id = i``; each node keeps its own ``Context``
    (and therefore its ``context.state``) for the whole run.
    """

    def __init__(self, num_nodes: int, client_app=None):
        from flwr.app import Context, RecordDict

        if client_app is None:
            from fedprune.client_app import app as client_app
        self.app = client_app
        self.contexts = {
            i: Context(run_id=0, node_id=i, node_config={"partition-id": i, "num-partitions": num_nodes}, state=RecordDict(), run_config={})
            for i in range(num_nodes)
        }

    def node_ids(self) -> list[int]:
        return list(self.contexts)

    def exchange(self, requests):
        from flwr.app import Message, Metadata

        out = []
        for k, (node, mtype, content) in enumerate(requests):
            md = Metadata(run_id=0, message_id=f"m{k}", src_node_id=0, dst_node_id=node, reply_to_message_id="",
                          group_id="", created_at=time.time(), ttl=3600.0, message_type=mtype)
            down = recorddict_nbytes(content)
            try:
                rep = self.app(Message(content=content, metadata=md), self.contexts[node])
            except Exception as exc:  # a crashing client is a failed reply, as in Flower
                out.append(Reply(node, None, f"client raised {type(exc).__name__}: {exc}", down, 0))
                continue
            out.append(Reply(node, rep.content, None, down, recorddict_nbytes(rep.content)))
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

    def __init__(self, cfg: ExperimentConfig, transport: Transport, out_dir: str | Path | None = None, mask_source: str = "consensus"):
        if mask_source not in MASK_SOURCES:
            raise ValueError(f"unknown mask source {mask_source!r}; allowed: {list(MASK_SOURCES)}")
        self.cfg = resolve_data_dir(cfg)
        self.transport = transport
        self.out_dir = Path(out_dir) if out_dir else None
        self.mask_source = mask_source
        self.groups = model_groups(self.cfg)
        set_seed(self.cfg.seed)
        self.model = build_model(self.cfg)
        self.state = {k: v.clone() for k, v in self.model.state_dict().items()}
        _, test = load_data(self.cfg)
        self.test_loader = make_loader(test, 256, train=False)
        self.profiles = profile_order(self.cfg.profiles)
        self.nodes: dict[int, NodeInfo] = {}
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

    @property
    def hardware(self):
        """Cost models for profile budgets (:class:`fedprune.cost.HardwareModel`), built on first use."""
        if self._hardware is None:
            self._hardware = hardware_model(self.cfg, copy.deepcopy(self.model))
        return self._hardware

    def check_budgets(self) -> None:
        """Fail before training when a budget allocation cannot meet some profile's budget."""
        pr = self.cfg.pruning
        if pr.allocation in BUDGET_ALLOCATIONS and self.mask_source != "none":
            check_feasible(self.groups, profile_constraints(self.cfg, self.hardware, self.profiles), pr.min_channels, budget_round_to(self.cfg))

    # ------------------------------------------------------------ helpers
    def index_map(self, mask: StructuredMask) -> dict:
        key = mask.key()
        if key not in self._index_maps:
            self._index_maps[key] = extraction_index_map(self.model, mask, self.groups)
        return self._index_maps[key]

    def substate(self, mask: StructuredMask) -> dict[str, torch.Tensor]:
        """The sub-network's state: sliced global weights plus its own BN running statistics."""
        sub = slice_state(self.state, self.index_map(mask))
        sub.update({k: v.clone() for k, v in self.bn_stats.get(mask.key(), {}).items()})
        return sub

    def gates_for(self, mask: StructuredMask) -> dict[str, torch.Tensor]:
        """The sub-network's channel gates, initialised (seeded) on first use."""
        key = mask.key()
        if key not in self.gates:
            with torch.random.fork_rng():
                torch.manual_seed(self.cfg.seed)
                self.gates[key] = gate_state(gated_model(self.cfg, self.extracted(mask)))
        return self.gates[key]

    def _merge_gates(self, updates: list[tuple[dict, float, bytes]]) -> None:
        """Sample-weighted mean of the returned gates, per sub-network."""
        by_mask: dict[bytes, list[tuple[dict, float]]] = {}
        for g, w, key in updates:
            by_mask.setdefault(key, []).append((g, w))
        for key, items in by_mask.items():
            total = sum(w for _, w in items)
            self.gates[key] = {k: sum(g[k].double() * w for g, w in items).div(total).float() for k in items[0][0]}

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
            self.bn_stats[key] = {k: sum(st[k].double() * w for st, w in items).div(total).float() for k in self.bn_stat_keys}
        dense_key = StructuredMask.dense(self.groups).key()
        if dense_key in self.bn_stats:  # the dense model keeps its statistics in the global state
            self.state.update({k: v.clone() for k, v in self.bn_stats[dense_key].items()})

    def _config(self, **extra):
        return config_to_record(self.cfg, **extra)

    def sample(self, round_num: int) -> list[int]:
        """Nodes taking part in a round (all, or a seeded sample of ``clients_per_round``)."""
        ids = sorted(self.nodes, key=lambda n: self.nodes[n].partition_id)
        k = self.cfg.federated.clients_per_round
        if not k or k >= len(ids):
            return ids
        rng = np.random.default_rng([self.cfg.seed, round_num, 104729])
        picked = np.sort(rng.choice(len(ids), size=k, replace=False))  # positions: node ids are 64-bit
        return [ids[i] for i in picked]

    def _mask_for(self, node: int) -> StructuredMask:
        return self.node_masks.get(node) or StructuredMask.dense(self.groups)

    def _check_replies(self, replies: list[Reply], what: str) -> tuple[list[Reply], list[dict]]:
        ok, failed = [], []
        for r in replies:
            if r.content is None:
                failed.append({"node": r.node_id, "reason": r.error})
                log.warning("%s: client %s failed: %s", what, self._pid(r.node_id), r.error)
            else:
                ok.append(r)
        return ok, failed

    def _pid(self, node: int) -> str:
        info = self.nodes.get(node)
        return f"#{info.partition_id} ({info.profile})" if info else f"node {node}"

    # ------------------------------------------------------------- phases
    def register(self) -> None:
        from flwr.app import RecordDict

        ids = self.transport.node_ids()
        replies = self.transport.exchange([(n, "query.register", RecordDict({"config": self._config()})) for n in ids])
        ok, failed = self._check_replies(replies, "register")
        for r in ok:
            info = r.content["info"]
            self.nodes[r.node_id] = NodeInfo(r.node_id, int(info["partition-id"]), str(info["profile"]), int(info["num-train"]), int(info["num-val"]), list(info["label-histogram"]))
        if not self.nodes:
            raise RuntimeError("no client registered; cannot run")
        counts = {p: sum(1 for n in self.nodes.values() if n.profile == p) for p in self.profiles}
        log.info("[register] %d clients: %s", len(self.nodes), ", ".join(f"{p}={c}" for p, c in counts.items()))

    def train_round(self, round_num: int, phase: str) -> dict:
        from flwr.app import RecordDict

        t0 = time.perf_counter()
        nodes = self.sample(round_num)
        requests, sent = [], {}
        for n in nodes:
            mask = self._mask_for(n)
            imap = self.index_map(mask)
            prof = self.cfg.profiles[self.nodes[n].profile]
            sub = self.substate(mask)
            content = RecordDict({
                "arrays": state_to_record(sub),
                "mask": mask_to_record(mask),
                "config": self._config(round=round_num, epochs=prof.local_epochs, **{"batch-size": prof.batch_size}),
            })
            gate_shapes = None
            if phase == "finetune" and self.cfg.dynamic.enabled:
                gates = self.gates_for(mask)
                content["gates"] = state_to_record(gates)
                gate_shapes = {k: v.shape for k, v in gates.items()}
            sent[n] = (imap, {k: v.shape for k, v in sub.items()}, mask.key(), gate_shapes)
            requests.append((n, "train", content))
        replies = self.transport.exchange(requests)
        ok, failed = self._check_replies(replies, f"{phase} round {round_num}")
        updates, gate_updates, losses, sim_s = [], [], [], []
        for r in ok:
            imap, shapes, key, gate_shapes = sent[r.node_id]
            state = record_to_state(r.content["arrays"])
            bad = [k for k, s in shapes.items() if k not in state or tuple(state[k].shape) != tuple(s)]
            gates = None
            if gate_shapes is not None:
                gates = record_to_state(r.content["gates"]) if "gates" in r.content else {}
                bad += [k for k, s in gate_shapes.items() if k not in gates or tuple(gates[k].shape) != tuple(s)]
            if bad:
                failed.append({"node": r.node_id, "reason": f"reply arrays do not match what was sent: {bad[:3]}"})
                log.warning("%s round %d: dropped client %s: arrays %s do not match", phase, round_num, self._pid(r.node_id), bad[:3])
                continue
            m = r.content["metrics"]
            updates.append((state, imap, float(m["num-examples"]), key))
            if gates is not None:
                gate_updates.append((gates, float(m["num-examples"]), key))
            losses.append(float(m["train-loss"]))
            sim_s.append(simulated_client_seconds(self.cfg.profiles[self.nodes[r.node_id].profile], float(m["compute-s"]), r.bytes_down, r.bytes_up))
        if updates:
            self._merge(updates)
            self.model_version += 1
        if gate_updates:
            self._merge_gates(gate_updates)
        rec = self._round_record(round_num, phase, t0, replies, nodes, failed)
        rec["train_loss"] = float(np.mean(losses)) if losses else None
        rec["simulated_round_s"] = max(sim_s) if sim_s else None
        return rec

    def _round_record(self, round_num, phase, t0, replies, nodes, failed) -> dict:
        return {
            "round": round_num,
            "phase": phase,
            "wall_s": time.perf_counter() - t0,
            "bytes_up": sum(r.bytes_up for r in replies),
            "bytes_down": sum(r.bytes_down for r in replies),
            "clients": len(nodes),
            "failures": len(failed),
        }

    def federated_evaluate(self, nodes: list[int], dense: bool = False) -> tuple[dict, list[Reply]]:
        """Each node evaluates its own sub-model (or, with ``dense``, the dense global model) on
        local validation data; returns per-profile accuracy. The dense model is cached by the
        clients for the importance round that follows."""
        from flwr.app import RecordDict

        requests = []
        for n in nodes:
            mask = StructuredMask.dense(self.groups) if dense else self._mask_for(n)
            sub = self.substate(mask)
            conf = self._config(**{"cache-model": dense, "model-version": self.model_version})
            requests.append((n, "evaluate", RecordDict({"arrays": state_to_record(sub), "mask": mask_to_record(mask), "config": conf})))
        replies = self.transport.exchange(requests)
        ok, _ = self._check_replies(replies, "evaluate")
        per_profile: dict[str, list[tuple[float, int]]] = {}
        for r in ok:
            m = r.content["metrics"]
            if int(m["num-examples"]) > 0:
                per_profile.setdefault(self.nodes[r.node_id].profile, []).append((float(m["accuracy"]), int(m["num-examples"])))
        acc = {p: sum(a * n for a, n in v) / sum(n for _, n in v) for p, v in per_profile.items()}
        return acc, replies

    def importance_round(self, round_num: int, sparsity_scale: float = 1.0) -> dict:
        """Clients score channels on private data; the server builds consensus masks per profile."""
        from flwr.app import RecordDict

        t0 = time.perf_counter()
        fed, pr = self.cfg.federated, self.cfg.pruning
        nodes = self.sample(round_num)
        # The dense global model reaches the clients with the evaluation just before; they cache it.
        _, eval_replies = self.federated_evaluate(nodes, dense=True)
        eval_bytes = (sum(r.bytes_down for r in eval_replies), sum(r.bytes_up for r in eval_replies))

        def request(n, with_model):
            conf = self._config(round=round_num, criterion=pr.criterion, sensitivity=fed.sensitivity,
                                ratios=[float(r) for r in pr.sensitivity_ratios],
                                **{"num-batches": pr.num_batches, "model-version": self.model_version})
            content = {"config": conf}
            if with_model:
                content["arrays"] = state_to_record(self.state)
            return (n, "query.importance", RecordDict(content))

        replies = self.transport.exchange([request(n, False) for n in nodes])
        resend = [r.node_id for r in replies if r.content is not None and "importance" not in r.content]
        if resend:  # a client without the cached model gets it now (bytes are counted)
            log.info("[importance] %d clients lacked the cached model; sending it", len(resend))
            again = {r.node_id: r for r in self.transport.exchange([request(n, True) for n in resend])}
            replies = [Reply(r.node_id, again[r.node_id].content, again[r.node_id].error, r.bytes_down + again[r.node_id].bytes_down,
                             r.bytes_up + again[r.node_id].bytes_up) if r.node_id in again else r for r in replies]
        ok, failed = self._check_replies(replies, "importance")
        scores, weights, sens, owners = [], [], [], []
        for r in ok:
            vec = record_to_vectors(r.content["importance"])
            bad = [g.name for g in self.groups if g.name not in vec or vec[g.name].shape != (g.size,) or not np.isfinite(vec[g.name]).all() or (vec[g.name] < 0).any()]
            n_ex = int(r.content["metrics"]["num-examples"])
            if bad or n_ex <= 0:
                failed.append({"node": r.node_id, "reason": f"bad importance payload for groups {bad[:3]} or num-examples={n_ex}"})
                log.warning("importance: dropped client %s: bad payload (%s, num-examples=%d)", self._pid(r.node_id), bad[:3], n_ex)
                continue
            scores.append({k: vec[k].astype(np.float64) for k in self.groups.names})
            weights.append(n_ex)
            owners.append(r.node_id)
            if "sensitivity" in r.content:
                s = record_to_vectors(r.content["sensitivity"])
                sens.append({k: float(s[k][0]) for k in self.groups.names})
        if not scores:
            raise RuntimeError("importance round: no valid client reply; cannot build a consensus mask")
        self.build_masks(scores, weights, sens, owners, sparsity_scale)
        rec = self._round_record(round_num, "importance", t0, replies, nodes, failed)
        rec["evaluation_bytes_down"], rec["evaluation_bytes_up"] = eval_bytes
        return rec

    def build_masks(self, scores, weights, sens, owners, sparsity_scale: float = 1.0) -> None:
        fed, pr = self.cfg.federated, self.cfg.pruning
        consensus = aggregate_importance(scores, weights, fed.aggregation, fed.trim_fraction)
        sens_agg = None
        if sens:
            w = np.asarray(weights[: len(sens)], dtype=np.float64)
            sens_agg = {k: float(np.dot(w, [s[k] for s in sens]) / w.sum()) for k in self.groups.names}
        ranking = consensus
        if self.mask_source == "random":
            rng = np.random.default_rng([self.cfg.seed, 31337])
            ranking = {g.name: rng.random(g.size) for g in self.groups}
        if pr.allocation in BUDGET_ALLOCATIONS:
            masks = profile_budget_masks(self.cfg, self.hardware, ranking, self.profiles, sparsity_scale)
        else:
            sparsities = [self.cfg.profiles[p].sparsity * sparsity_scale for p in self.profiles]
            masks = nested_masks(self.groups, ranking, sparsities, pr.allocation, sens_agg, pr.min_channels, pr.round_to or None)
        self.profile_masks = dict(zip(self.profiles, masks))
        self.node_masks = {n: self.profile_masks[info.profile] for n, info in self.nodes.items()}
        if self.mask_source == "local":  # each client keeps its own top-k: no consensus
            for n, s in zip(owners, scores):
                prof = self.nodes[n].profile
                self.node_masks[n] = StructuredMask.from_scores(s, self.profile_masks[prof].kept_counts)
        agreement = {p: float(np.mean(mask_agreement(scores, m))) for p, m in self.profile_masks.items()}
        self.consensus_log.append({
            "criterion": pr.criterion,
            "aggregation": fed.aggregation,
            "allocation": pr.allocation,
            "mask_source": self.mask_source,
            "clients": len(scores),
            "samples": int(sum(weights)),
            "sparsity_scale": sparsity_scale,
            "agreement": agreement,
            "agreement_mean": float(np.mean(list(agreement.values()))),
            "nested": all(self.profile_masks[a].is_subset_of(self.profile_masks[b]) or self.profile_masks[b].is_subset_of(self.profile_masks[a])
                          for a in self.profiles for b in self.profiles),
            "kept_channels": {p: m.kept_counts for p, m in self.profile_masks.items()},
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

    def _evaluate_round(self, rec: dict) -> None:
        every = self.cfg.federated.eval_every
        if not every or rec["round"] % every:
            return
        if self.profile_masks:
            rec["accuracy"] = {p: self.test_accuracy(m) for p, m in self.profile_masks.items()}
        else:
            rec["accuracy"] = {"dense": self.test_accuracy()}

    def _log_round(self, rec: dict, total: int) -> None:
        acc = rec.get("accuracy")
        acc_s = " ".join(f"{k}={v:.3f}" for k, v in acc.items()) if acc else "-"
        loss = rec.get("train_loss")
        log.info("[%s round %d/%d] %d clients, %d failed, loss %s, test acc %s, %.1f s, %.2f MB down / %.2f MB up",
                 rec["phase"], rec["round"], total, rec["clients"], rec["failures"], f"{loss:.3f}" if loss is not None else "-",
                 acc_s, rec["wall_s"], rec["bytes_down"] / 1e6, rec["bytes_up"] / 1e6)

    # ---------------------------------------------------------------- run
    def run(self) -> dict:
        fed = self.cfg.federated
        start = time.perf_counter()
        self.check_budgets()
        self.register()
        r1, r2 = fed.warmup_rounds, fed.finetune_rounds
        total = r1 + r2
        dense_rounds = total if self.mask_source == "none" else r1
        for r in range(1, dense_rounds + 1):
            rec = self.train_round(r, "warmup" if self.mask_source != "none" else "dense")
            self._evaluate_round(rec)
            self.rounds.append(rec)
            self._log_round(rec, total)
        dense_acc = self.test_accuracy()
        dense_costs = model_costs(self.model)
        if self.mask_source != "none":
            stages = max(1, math.ceil(r2 / fed.repeat_every)) if fed.repeat_every else 1
            for r in range(r1 + 1, total + 1):
                k = r - r1 - 1  # fine-tune round index from 0
                if k == 0 or (fed.repeat_every and k % fed.repeat_every == 0):
                    stage = (k // fed.repeat_every + 1) if fed.repeat_every else 1
                    rec = self.importance_round(r, sparsity_scale=stage / stages)
                    self.rounds.append(rec)
                    self._log_round(rec, total)
                rec = self.train_round(r, "finetune")
                self._evaluate_round(rec)
                self.rounds.append(rec)
                self._log_round(rec, total)
            if r2 == 0:
                rec = self.importance_round(r1 + 1)
                self.rounds.append(rec)
                self._log_round(rec, total)
        results = self.final_results(dense_acc, dense_costs, time.perf_counter() - start)
        if self.out_dir:
            self.write(results)
        return results

    def final_results(self, dense_acc: float, dense_costs: dict, wall_s: float) -> dict:
        ev = self.cfg.eval
        log.info("[evaluate] final models: test split, local validation, params, FLOPs, latency")
        profiles = {}
        local_acc, _ = self.federated_evaluate(sorted(self.nodes))
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
                entry["budgets"] = self.hardware.report(prof.budgets, mask0, models[0], prof.compute_speed, host_ms, predict_latency)
                oks = [b["ok"] for b in entry["budgets"].values()]
                entry["budgets_ok"] = None if None in oks else all(oks)
            profiles[p] = entry
        dense = {"accuracy": dense_acc, "params": dense_costs["params"], "flops": dense_costs["flops"], "macs": dense_costs["macs"],
                 "note": "global dense model at the end of the dense rounds (before pruning)"}
        if ev.latency:
            dense["latency_ms"] = model_costs(self.model, True, ev.latency_threads, ev.latency_repeats)["latency_ms"]
        totals = {
            "bytes_up": sum(r["bytes_up"] for r in self.rounds),
            "bytes_down": sum(r["bytes_down"] for r in self.rounds),
            "wall_s": wall_s,
        }
        def budget_note(e: dict) -> str:
            ok = e.get("budgets_ok")
            return "" if ok is None else (", budgets met" if ok else ", budgets MISSED: " + ", ".join(k for k, b in e["budgets"].items() if not b["ok"]))

        summary = "; ".join([f"dense {dense_acc:.3f}"] + [f"{p} {e['accuracy']:.3f} @ {100 * e['channel_sparsity']:.0f}% ch, "
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
            "totals": totals,
            "summary": summary,
        }

    def dynamic_report(self, mask: StructuredMask, model: torch.nn.Module) -> dict:
        """``profiles.<name>.dynamic``: per budget the test accuracy, MACs executed per input and batch-1 latency."""
        from fedprune.dynamic import evaluate_gated, gated_latency_ms

        ev, dyn = self.cfg.eval, self.cfg.dynamic
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
            out["latency_ms_b1"] = {"static": lat["static"], "gated": [lat[f"gated@{b:g}"] for b in dyn.eval_budgets]}
        return out

    def write(self, results: dict) -> None:
        from fedprune.plots import plot_run

        out = self.out_dir
        out.mkdir(parents=True, exist_ok=True)
        torch.save(self.state, out / "global_model.pt")
        np.savez(out / "masks.npz", **{f"{p}/{g}": v for p, m in self.profile_masks.items() for g, v in m.to_arrays().items()})
        write_csv(out / "rounds.csv", [_flat_round(r) for r in results["rounds"]])
        budget_rows = [{"profile": p, "budget": k, **b} for p, e in results["profiles"].items() for k, b in e.get("budgets", {}).items()]
        if budget_rows:
            write_csv(out / "budgets.csv", budget_rows, ["profile", "budget", "limit", "predicted", "measured", "ok", "unit"])
        plot_run(results, out)
        write_json(out / "results.json", results)  # last: its presence marks a finished run
        log.info("[done] wrote %s", out / "results.json")


def _flat_round(rec: dict) -> dict:
    flat = {k: v for k, v in rec.items() if k != "accuracy"}
    for k, v in (rec.get("accuracy") or {}).items():
        flat[f"accuracy_{k}"] = v
    return flat


# -------------------------------------------------------------- entry point
def make_server_app(cfg: ExperimentConfig, out_dir: str | Path | None, mask_source: str = "consensus"):
    """A ServerApp bound to one resolved config (used by ``fedprune simulate``)."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:  # noqa: ARG001
        FederatedPruning(cfg, GridTransport(grid), out_dir, mask_source).run()

    return app


def _quiet_env() -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def simulate(cfg: ExperimentConfig, out_dir: str | Path, engine: str = "ray", mask_source: str = "consensus") -> dict:
    """Run one federated experiment and return its results (also written to ``out_dir``).

    ``engine="ray"`` uses Flower's Simulation Engine (Ray backend) with
    ``federated.num_cpus_per_client`` CPUs per client; ``"inprocess"`` runs
    the same ClientApp sequentially in this process.
    """
    _quiet_env()
    cfg = resolve_data_dir(cfg)
    load_data(cfg)  # fail early and clearly if the data is missing
    out = Path(out_dir)
    fed = cfg.federated
    if engine == "inprocess":
        return FederatedPruning(cfg, InProcessTransport(fed.num_clients), out, mask_source).run()
    if engine != "ray":
        raise ValueError(f"unknown engine {engine!r}; allowed: ['ray', 'inprocess']")
    from flwr.simulation import run_simulation

    from fedprune.client_app import app as client_app

    (out / "results.json").unlink(missing_ok=True)
    backend_config = {
        "client_resources": {"num_cpus": fed.num_cpus_per_client, "num_gpus": fed.num_gpus_per_client},
        "init_args": {"num_cpus": fed.ray_num_cpus, "include_dashboard": False, "log_to_driver": True},
    }
    run_simulation(make_server_app(cfg, out, mask_source), client_app, num_supernodes=fed.num_clients, backend_name="ray", backend_config=backend_config)
    path = out / "results.json"
    if not path.is_file():
        raise RuntimeError(f"the simulation ended without writing {path}; see the log above for the server error")
    import json

    return json.loads(path.read_text())
