"""Tests for fedprune.profiles: client -> device profile assignment and simulated time."""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction

import pytest

from fedprune.config import ProfileConfig
from fedprune.profiles import assign_profiles, capability_order, profile_order, simulated_client_seconds

DEFAULT = {"edge_gpu": 0.3, "mobile_cpu": 0.4, "microcontroller": 0.3}


def test_deterministic_in_arguments() -> None:
    a = assign_profiles(20, DEFAULT, seed=3)
    assert a == assign_profiles(20, DEFAULT, seed=3)
    assert len(a) == 20 and set(a) == set(DEFAULT)
    # Order of the proportions mapping does not matter.
    assert a == assign_profiles(20, dict(reversed(list(DEFAULT.items()))), seed=3)
    # Another seed shuffles ids but keeps the counts.
    others = [assign_profiles(20, DEFAULT, seed=s) for s in range(4, 9)]
    assert any(o != a for o in others)
    assert all(Counter(o) == Counter(a) for o in others)


@pytest.mark.parametrize(
    "n,proportions,expected",
    [
        (10, DEFAULT, {"edge_gpu": 3, "mobile_cpu": 4, "microcontroller": 3}),
        (7, DEFAULT, {"edge_gpu": 2, "mobile_cpu": 3, "microcontroller": 2}),  # 2.1 / 2.8 / 2.1
        (11, DEFAULT, {"edge_gpu": 3, "mobile_cpu": 5, "microcontroller": 3}),  # 3.3 / 4.4 / 3.3
        (9, {"edge_gpu": 0.5, "mobile_cpu": 0.25, "microcontroller": 0.25}, {"edge_gpu": 5, "mobile_cpu": 2, "microcontroller": 2}),  # 4.5 / 2.25 / 2.25
        (3, {"edge_gpu": 0.9, "mobile_cpu": 0.05, "microcontroller": 0.05}, {"edge_gpu": 1, "mobile_cpu": 1, "microcontroller": 1}),
        (4, {"edge_gpu": 0.9, "mobile_cpu": 0.05, "microcontroller": 0.05}, {"edge_gpu": 2, "mobile_cpu": 1, "microcontroller": 1}),
        (20, {"edge_gpu": 0.9, "mobile_cpu": 0.05, "microcontroller": 0.05}, {"edge_gpu": 18, "mobile_cpu": 1, "microcontroller": 1}),
        (5, {"edge_gpu": 0.5, "mobile_cpu": 0.5, "microcontroller": 0.0}, {"edge_gpu": 3, "mobile_cpu": 2}),
        (6, {"edge_gpu": 2.0, "mobile_cpu": 1.0}, {"edge_gpu": 4, "mobile_cpu": 2}),  # normalised by the total
        (1, {"mobile_cpu": 1.0}, {"mobile_cpu": 1}),
    ],
)
def test_counts_follow_proportions(n, proportions, expected) -> None:
    assert dict(Counter(assign_profiles(n, proportions, seed=0))) == expected


def _check_largest_remainder(n: int, proportions: dict[str, float], counts: Counter) -> None:
    """Counts are floor or ceil of the exact share; ceil goes to the largest remainders."""
    used = {k: Fraction(str(v)) for k, v in proportions.items() if v > 0}
    total = sum(used.values())
    exact = {k: n * v / total for k, v in used.items()}
    assert sum(counts.values()) == n and set(counts) == set(used)
    up, down = [], []
    for k, e in exact.items():
        assert math.floor(e) <= counts[k] <= math.ceil(e), (k, e, counts)
        rem = e - math.floor(e)
        (up if counts[k] > math.floor(e) else down).append(rem)
    if up and down:
        assert min(up) >= max(r for r in down), (exact, counts)


def test_largest_remainder_on_a_grid() -> None:
    grid = [i / 20 for i in range(1, 20)]
    checked = 0
    for a in grid:
        for b in grid:
            c = round(1.0 - a - b, 10)
            if c <= 0:
                continue
            props = {"edge_gpu": a, "mobile_cpu": b, "microcontroller": c}
            for n in (5, 9, 13, 28, 40):
                if min(n * v for v in props.values()) < 1:
                    continue  # the at-least-one-client rule overrides the remainders
                _check_largest_remainder(n, props, Counter(assign_profiles(n, props, seed=n)))
                checked += 1
    assert checked > 100


def test_every_nonzero_profile_gets_a_client() -> None:
    props = {"edge_gpu": 0.98, "mobile_cpu": 0.01, "microcontroller": 0.01}
    for n in range(3, 30):
        counts = Counter(assign_profiles(n, props, seed=n))
        assert sum(counts.values()) == n
        assert all(counts[k] >= 1 for k in props), (n, counts)
    zero = {"edge_gpu": 0.6, "mobile_cpu": 0.4, "microcontroller": 0.0}
    assert "microcontroller" not in assign_profiles(10, zero, seed=0)


@pytest.mark.parametrize(
    "n,proportions",
    [
        (2, DEFAULT),
        (1, {"edge_gpu": 0.5, "mobile_cpu": 0.5}),
        (0, {"edge_gpu": 1.0}),
    ],
)
def test_more_profiles_than_clients_raises(n, proportions) -> None:
    with pytest.raises(ValueError, match="num_clients"):
        assign_profiles(n, proportions, seed=0)


def test_profile_order_and_simulated_time() -> None:
    assert profile_order({"microcontroller": 1, "zeta": 1, "edge_gpu": 1, "alpha": 1}) == ["edge_gpu", "microcontroller", "alpha", "zeta"]
    # the capability order is the profiles file's (most capable first), whatever the names
    table = {"edge_gpu": 1, "zeta": 1, "alpha": 1, "microcontroller": 1}
    assert capability_order(table) == ["edge_gpu", "zeta", "alpha", "microcontroller"]
    assert capability_order(table, {"microcontroller", "zeta"}) == ["zeta", "microcontroller"]
    p = ProfileConfig(compute_speed=0.5, bandwidth_mbps=8.0)
    # 2 s of host compute at half speed + 2 MB over 8 Mbit/s = 4 + 2 = 6 s
    assert simulated_client_seconds(p, 2.0, 1_000_000, 1_000_000) == pytest.approx(6.0)
