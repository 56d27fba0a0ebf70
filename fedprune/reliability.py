"""Simulated client failures, drawn deterministically from the seed.

Each device profile has a ``failure_prob``: the probability that one of its
clients fails on a given message of a round. Whether a client fails, and how,
depends only on ``(seed, round, partition id, message phase, attempt)``, so a
run is reproducible whatever order the clients run in, and a retried round
(``attempt`` > 0, see ``federated.on_too_few_replies``) draws afresh.

Failure modes (``federated.failure_modes``), all reported through Flower's own
failure handling rather than a custom protocol:

* ``crash``: the ClientApp handler raises; Flower turns it into an error reply
  (``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``).
* ``drop``: the client drops out of the round; its reply is the error Flower's
  SuperLink sends for a node that stopped responding (``ErrorCode.NODE_UNAVAILABLE``).
* ``hang``: the client stalls for slightly longer than ``federated.reply_timeout_s``,
  so the server's ``Grid.send_and_receive(timeout=...)`` returns without its reply.

:func:`draw_failure` is the whole decision; it needs no Flower and is what the
ClientApp handlers call (through :func:`client_failure`).
"""

from __future__ import annotations

import time
import zlib
from typing import Sequence

import numpy as np

from fedprune.config import FAILURE_MODES, ExperimentConfig

__all__ = ["FAILURE_MODES", "SimulatedClientFailure", "draw_failure", "client_failure", "hang_seconds", "simulate_hang"]

class SimulatedClientFailure(RuntimeError):
    """Raised by a ClientApp handler to simulate a crash."""


def draw_failure(seed: int, round_num: int, partition_id: int, phase: str, prob: float,
                 modes: Sequence[str], attempt: int = 0) -> str | None:
    """``None`` if the client works on this message, else the failure mode (one of ``modes``).

    The draw is a seeded numpy Generator keyed by ``(seed, round, partition, phase, attempt)``:
    the same inputs always give the same answer; ``prob`` is the probability of failing.
    """
    if prob <= 0.0 or not modes:
        return None
    phase_id = zlib.crc32(phase.encode())  # stable across processes, unlike hash()
    rng = np.random.default_rng([seed, round_num, partition_id, phase_id, attempt, 7919])
    if rng.random() >= prob:
        return None
    return str(modes[int(rng.integers(len(modes)))])


def client_failure(cfg: ExperimentConfig, partition_id: int, num_partitions: int, phase: str,
                   round_num: int, attempt: int = 0, profile: str | None = None) -> str | None:
    """:func:`draw_failure` with this client's profile ``failure_prob`` and ``federated.failure_modes``.

    ``profile`` is the profile the node declares, if any (else the seeded assignment).
    """
    from fedprune.task import client_profile

    prob = cfg.profiles[profile or client_profile(cfg, partition_id, num_partitions)].failure_prob
    return draw_failure(cfg.seed, round_num, partition_id, phase, prob, cfg.federated.failure_modes, attempt)


def hang_seconds(timeout_s: float) -> float:
    """How long a hanging client stalls: just past the server's reply timeout (seconds).

    A simulated hang only has to outlast the timeout, so it is capped at the
    timeout plus 10% (at most 2 s) plus 50 ms instead of hanging for ever.
    """
    return float(timeout_s) + min(2.0, 0.1 * float(timeout_s)) + 0.05


def simulate_hang(timeout_s: float) -> None:
    """Stall for :func:`hang_seconds` (``timeout_s`` > 0; config validation ensures it)."""
    time.sleep(hang_seconds(timeout_s))
