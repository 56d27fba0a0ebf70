"""Poisoned importance: simulated adversarial clients for the robust-consensus experiments.

A fraction ``federated.adversarial_fraction`` of the partitions is
adversarial. Which ones is decided by :func:`adversarial_partitions` from the
seed alone, so the server, every client and the benchmarks agree without
talking to each other. An adversarial client computes its honest channel
importance and then replaces it by :func:`poison_scores` before replying.
The poisoned scores always stay finite, non-negative and of the right shape,
so they pass the server's payload checks: the attack is in the values, not
the format.

Modes (per channel group; ``s`` is the client's honest score vector):

* ``inverted``: ``max(s) + min(s) - s``. The ranking is reversed (the most
  important channel gets the lowest score and vice versa), while the values
  stay in the honest range ``[min(s), max(s)]``.
* ``random``: i.i.d. uniform values in ``[min(s), max(s)]`` (all zeros if the
  group's honest scores are all zero): the client reports noise of a plausible
  scale.
* ``scaled``: the inverted scores, with the channels in the lower half of the
  client's honest ranking (the ``floor(n / 2)`` channels it would itself prune
  at 50% sparsity) multiplied by ``scale``. Multiplying a whole vector by a
  constant would do nothing, because the server divides every client's vector
  by its group mean (:func:`fedprune.aggregation.normalize_scores`); this
  mode instead concentrates the client's entire normalised vote mass
  (about 2 per boosted channel, ``2 / scale`` elsewhere) on the channels that
  honest clients want to prune, which is what drags a plain mean.

Robust aggregation (:mod:`fedprune.aggregation`): ``median`` and
``trimmed_mean`` bound the influence of a minority of extreme values per
channel (``trim_fraction`` should be at least the adversarial fraction, so
that every adversarial value can be trimmed when all of them sit at the same
end); ``rank_vote`` only sees each client's ranking, so ``scaled`` degenerates
to ``inverted`` for it. These element-wise statistics still drift when honest
clients disagree (data-driven criteria on non-IID shards); client screening
(``federated.screen_clients``, :func:`fedprune.aggregation.screen_clients`)
drops the clients whose whole ranking disagrees with the median ranking before
aggregating. ``benchmarks/reliability.md`` measures both.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from fedprune.config import ADVERSARIAL_MODES
from fedprune.masks import descending_order

__all__ = ["ADVERSARIAL_MODES", "adversarial_partitions", "poison_scores", "poison_rng", "maybe_poison"]

#: Salt of the seed streams, so adversary selection and poison noise are independent of other RNG uses.
_SELECT_SALT, _POISON_SALT = 0xAD7E, 0xBAD5


def adversarial_partitions(num_clients: int, fraction: float, seed: int) -> frozenset[int]:
    """The adversarial partition ids: ``round(fraction * num_clients)`` of ``range(num_clients)``.

    Rounded half up, chosen with a numpy Generator seeded by ``seed``: the
    first ``k`` entries of one seeded permutation, so for a fixed seed a larger
    fraction only adds adversaries (the sets are nested).
    """
    if num_clients < 0:
        raise ValueError(f"num_clients must be >= 0, got {num_clients}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"adversarial fraction must be in [0, 1), got {fraction!r}")
    k = min(num_clients, int(math.floor(fraction * num_clients + 0.5)))
    if k == 0:
        return frozenset()
    perm = np.random.default_rng([int(seed), _SELECT_SALT]).permutation(num_clients)
    return frozenset(int(i) for i in perm[:k])


def poison_rng(seed: int, partition_id: int, round_num: int = 0) -> np.random.Generator:
    """The Generator an adversarial client uses for ``random`` poison (per seed, partition and round)."""
    return np.random.default_rng([int(seed), int(partition_id), int(round_num), _POISON_SALT])


def poison_scores(
    scores: Mapping[str, np.ndarray],
    mode: str,
    rng: np.random.Generator | None = None,
    scale: float = 100.0,
) -> dict[str, np.ndarray]:
    """Poisoned copy of one client's ``{group: importance vector}`` (see the module docstring for the modes).

    ``rng`` is needed by ``random`` only; ``scale`` (> 0) by ``scaled`` only.
    The input is not modified.
    """
    if mode not in ADVERSARIAL_MODES:
        raise ValueError(f"unknown adversarial mode {mode!r}; allowed: {list(ADVERSARIAL_MODES)}")
    if mode == "random" and rng is None:
        raise ValueError("adversarial mode 'random' needs a numpy Generator (rng)")
    if mode == "scaled" and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"adversarial scale must be a finite number > 0, got {scale!r}")
    out = {}
    for name, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        if s.size == 0:
            out[name] = s.copy()
            continue
        lo, hi = float(s.min()), float(s.max())
        if mode == "random":
            out[name] = rng.uniform(lo, hi, size=s.size) if hi > lo else np.full(s.size, lo)
            continue
        inv = hi + lo - s
        if mode == "scaled":
            # The client's own bottom half (ties towards the higher index, as masks keep lower indices).
            order = descending_order(s)  # best first
            inv[order[s.size - s.size // 2:]] *= scale
        out[name] = inv
    return out


def maybe_poison(
    scores: Mapping[str, np.ndarray],
    partition_id: int,
    num_clients: int,
    fraction: float,
    mode: str,
    seed: int,
    scale: float = 100.0,
    round_num: int = 0,
) -> tuple[dict[str, np.ndarray], bool]:
    """``(scores, poisoned)``: the poisoned scores if ``partition_id`` is adversarial, else the scores unchanged.

    This is what an adversarial client does in the importance round
    (:func:`fedprune.task.client_importance`); benchmarks call it directly.
    """
    if partition_id not in adversarial_partitions(num_clients, fraction, seed):
        return dict(scores), False
    return poison_scores(scores, mode, poison_rng(seed, partition_id, round_num), scale), True
