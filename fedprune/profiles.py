"""Device profiles: which client is which device, and what a round costs it.

Profiles themselves (sparsity target, local epochs, speed, bandwidth, failure
probability, budgets) are configured in ``configs/profiles.toml`` and
validated by :mod:`fedprune.config`.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from fedprune.config import PROFILE_NAMES, ProfileConfig

__all__ = ["assign_profiles", "capability_order", "profile_order", "simulated_client_seconds"]


def capability_order(profiles: Mapping[str, ProfileConfig], in_use: set[str] | None = None) -> list[str]:
    """Profile names from most to least capable: the order of their tables in the profiles file
    (``configs/profiles.toml`` lists them so), optionally only those ``in_use``. Nested masks follow it under
    the budget allocations: each profile's sub-network is cut within the one before it."""
    return [n for n in profiles if in_use is None or n in in_use]


def profile_order(names) -> list[str]:
    """The fixed order in which :func:`assign_profiles` deals profiles out (known names first, then by name): it
    does not depend on the order of a mapping, so a server and its clients, which read the config from records,
    assign alike. Not the capability order (:func:`capability_order`)."""
    known = [n for n in PROFILE_NAMES if n in names]
    return known + sorted(n for n in names if n not in PROFILE_NAMES)


def assign_profiles(num_clients: int, proportions: Mapping[str, float], seed: int) -> list[str]:
    """Profile name of each client id, deterministic in (num_clients, proportions, seed).

    Counts follow the proportions by largest remainder, every profile with a
    non-zero proportion gets at least one client, and the assignment to ids
    is a seeded shuffle.
    """
    names = [n for n in profile_order(proportions) if proportions[n] > 0]
    if len(names) > num_clients:
        raise ValueError(f"{len(names)} profiles need at least as many clients, got num_clients={num_clients}")
    total = sum(proportions[n] for n in names)
    exact = np.array([num_clients * proportions[n] / total for n in names])
    counts = np.maximum(np.floor(exact).astype(int), 1)
    while counts.sum() < num_clients:
        counts[int(np.argmax(exact - counts))] += 1
    while counts.sum() > num_clients:
        i = int(np.argmax(np.where(counts > 1, counts - exact, -np.inf)))
        counts[i] -= 1
    labels = np.repeat(np.arange(len(names)), counts)
    np.random.default_rng([seed, 7919]).shuffle(labels)
    return [names[i] for i in labels]


def simulated_client_seconds(profile: ProfileConfig, host_compute_s: float, bytes_down: int, bytes_up: int) -> float:
    """Simulated wall time of one client's round on its device, in seconds.

    Host compute time is divided by the profile's relative ``compute_speed``;
    transfers take ``bytes * 8 / (bandwidth_mbps * 1e6)`` seconds each way.
    """
    link = profile.bandwidth_mbps * 1e6
    return host_compute_s / profile.compute_speed + (bytes_down + bytes_up) * 8.0 / link
