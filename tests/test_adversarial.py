"""Poisoned importance (fedprune.adversarial) and robust consensus (screening, robust aggregators)."""

from __future__ import annotations

import numpy as np
import pytest

from fedprune.adversarial import ADVERSARIAL_MODES, adversarial_partitions, maybe_poison, poison_rng, poison_scores
from fedprune.aggregation import AGGREGATORS, aggregate_importance, normalize_scores, screen_clients
from fedprune.config import ConfigError, load_config
from fedprune.masks import StructuredMask

ROBUST = ("median", "trimmed_mean", "rank_vote")


# ------------------------------------------------------- adversary selection
def test_adversarial_partitions_are_deterministic_and_sized():
    for n, f in [(10, 0.2), (20, 0.2), (7, 0.3), (5, 0.1), (3, 0.5)]:
        a = adversarial_partitions(n, f, seed=3)
        assert a == adversarial_partitions(n, f, seed=3)
        assert len(a) == int(np.floor(f * n + 0.5)) and a <= set(range(n))
    assert adversarial_partitions(10, 0.0, 0) == frozenset()
    assert adversarial_partitions(10, 0.04, 0) == frozenset()  # 0.4 clients round to none
    # Different seeds choose different adversaries (for some seed), and larger fractions only add adversaries.
    assert len({adversarial_partitions(20, 0.2, s) for s in range(5)}) > 1
    for s in range(5):
        sets = [adversarial_partitions(10, f, s) for f in (0.1, 0.2, 0.3, 0.4)]
        assert all(a < b for a, b in zip(sets, sets[1:]))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        adversarial_partitions(10, 1.0, 0)


# ------------------------------------------------------------- poison modes
def _client(rng, sizes=(16, 33)):
    return {f"g{i}": rng.gamma(2.0, 1.0, n) for i, n in enumerate(sizes)}


def test_inverted_reverses_the_ranking_within_the_honest_range():
    s = _client(np.random.default_rng(0))
    orig = {k: v.copy() for k, v in s.items()}
    p = poison_scores(s, "inverted")
    for k, v in s.items():
        assert np.array_equal(v, orig[k])  # input untouched
        assert np.allclose(p[k], v.max() + v.min() - v)
        assert np.array_equal(np.argsort(p[k]), np.argsort(-v))  # highest becomes lowest
        assert p[k].min() == pytest.approx(v.min()) and p[k].max() == pytest.approx(v.max())


def test_random_is_seeded_noise_in_the_honest_range():
    s = _client(np.random.default_rng(1), sizes=(200,))
    a = poison_scores(s, "random", poison_rng(0, 3, 1))
    b = poison_scores(s, "random", poison_rng(0, 3, 1))
    c = poison_scores(s, "random", poison_rng(0, 4, 1))
    v = s["g0"]
    assert np.array_equal(a["g0"], b["g0"]) and not np.array_equal(a["g0"], c["g0"])
    assert v.min() <= a["g0"].min() and a["g0"].max() <= v.max()
    assert abs(np.corrcoef(a["g0"], v)[0, 1]) < 0.2  # unrelated to the honest scores
    assert np.array_equal(poison_scores({"g": np.full(5, 2.0)}, "random", poison_rng(0, 0))["g"], np.full(5, 2.0))
    with pytest.raises(ValueError, match="needs a numpy Generator"):
        poison_scores(s, "random")


def test_scaled_boosts_the_clients_own_bottom_half_and_survives_normalisation():
    s = _client(np.random.default_rng(2))
    p = poison_scores(s, "scaled", scale=100.0)
    inv = poison_scores(s, "inverted")
    for k, v in s.items():
        bottom = np.argsort(-v, kind="stable")[v.size - v.size // 2:]
        boosted = np.zeros(v.size, dtype=bool)
        boosted[bottom] = True
        assert np.allclose(p[k][boosted], 100.0 * inv[k][boosted]) and np.allclose(p[k][~boosted], inv[k][~boosted])
        # After the server's mean normalisation the boosted channels carry almost all the vote mass.
        n = normalize_scores(p)[k]
        assert n[boosted].sum() > 0.95 * v.size and n[~boosted].max() < 0.1
    # A uniform scale would be useless: normalisation removes it.
    assert np.allclose(normalize_scores({k: 100 * v for k, v in inv.items()})["g0"], normalize_scores(inv)["g0"])


@pytest.mark.parametrize("mode", ADVERSARIAL_MODES)
def test_poison_keeps_a_valid_payload(mode):
    s = _client(np.random.default_rng(3))
    s["zeros"] = np.zeros(8)
    p = poison_scores(s, mode, poison_rng(0, 0), scale=1e6)
    for k, v in s.items():
        assert p[k].shape == v.shape and np.isfinite(p[k]).all() and (p[k] >= 0).all()
    with pytest.raises(ValueError, match="unknown adversarial mode 'flip'"):
        poison_scores(s, "flip")
    with pytest.raises(ValueError, match="scale must be"):
        poison_scores(s, "scaled", scale=0.0)


def test_maybe_poison_only_touches_adversarial_partitions():
    s = _client(np.random.default_rng(4))
    adv = adversarial_partitions(10, 0.2, 7)
    for pid in range(10):
        out, poisoned = maybe_poison(s, pid, 10, 0.2, "inverted", 7)
        assert poisoned == (pid in adv)
        assert all(np.array_equal(out[k], v) for k, v in s.items()) != poisoned


# ------------------------------------------------------- robust consensus
SIZES = {"a": 128, "b": 256}
COUNTS = {g: n // 2 for g, n in SIZES.items()}  # 50% sparsity


def _honest_clients(n: int, noise: float, seed: int = 0):
    """Clients that agree on one underlying ranking, each with its own noise."""
    rng = np.random.default_rng(seed)
    base = {g: rng.uniform(0.1, 1.0, size) for g, size in SIZES.items()}
    return [{g: np.abs(v + rng.normal(0, noise, v.size)) for g, v in base.items()} for _ in range(n)]


def _jaccard(clients, honest, method, screen=False):
    def mask(scores):
        if screen:
            scores = [scores[i] for i in screen_clients(scores)[0]]
        return StructuredMask.from_scores(aggregate_importance(scores, method=method), COUNTS)

    return mask(clients).jaccard(mask(honest))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_robust_aggregators_resist_20_percent_poison_and_the_mean_does_not(seed):
    honest = _honest_clients(10, noise=0.05, seed=seed)
    for mode in ("inverted", "scaled"):
        poisoned = [maybe_poison(s, i, 10, 0.2, mode, seed)[0] for i, s in enumerate(honest)]
        for method in ROBUST:
            assert _jaccard(poisoned, honest, method) >= 0.9, (mode, method)
    scaled = [maybe_poison(s, i, 10, 0.2, "scaled", seed)[0] for i, s in enumerate(honest)]
    assert _jaccard(scaled, honest, "mean") < 0.8


@pytest.mark.parametrize("mode", ADVERSARIAL_MODES)
def test_screening_finds_the_adversaries_and_restores_the_honest_mask(mode):
    honest = _honest_clients(10, noise=0.2, seed=5)  # noisy honest clients: element-wise statistics alone drift
    for fraction in (0.2, 0.4):
        poisoned = [maybe_poison(s, i, 10, fraction, mode, 1)[0] for i, s in enumerate(honest)]
        kept, agreement = screen_clients(poisoned)
        assert set(range(10)) - set(kept) == adversarial_partitions(10, fraction, 1)
        assert len(agreement) == 10
        for method in AGGREGATORS:
            # Exactly the oracle that drops the adversaries; close to the all-honest consensus.
            oracle = [s for i, s in enumerate(honest) if i in kept]
            assert _jaccard(poisoned, oracle, method, screen=True) == 1.0
            assert _jaccard(poisoned, honest, method, screen=True) >= 0.8
    assert screen_clients(honest)[0] == list(range(10))  # honest clients are never dropped here
    assert screen_clients(honest[:2])[0] == [0, 1]


# ------------------------------------------------------------------ config
def test_config_keys_and_validation():
    cfg = load_config(None)
    fed = cfg.federated
    assert fed.adversarial_fraction == 0.0 and fed.adversarial_mode == "inverted" and fed.adversarial_scale == 100.0
    assert fed.screen_clients is False
    cfg = load_config(None, ["federated.adversarial_fraction=0.2", "federated.adversarial_mode='scaled'", "federated.screen_clients=true"])
    assert cfg.federated.adversarial_fraction == 0.2 and cfg.federated.adversarial_mode == "scaled"
    with pytest.raises(ConfigError) as info:
        load_config(None, ["federated.adversarial_mode='flip'"])
    msg = str(info.value)
    assert "'federated.adversarial_mode'" in msg and all(m in msg for m in ADVERSARIAL_MODES)
    for bad in ("1.0", "-0.1"):
        with pytest.raises(ConfigError) as info:
            load_config(None, [f"federated.adversarial_fraction={bad}"])
        assert "'federated.adversarial_fraction'" in str(info.value) and "[0.0, 1.0)" in str(info.value)
    with pytest.raises(ConfigError, match=r"'federated.adversarial_scale' = 0.0 is out of range: allowed \(0.0, inf"):
        load_config(None, ["federated.adversarial_scale=0.0"])


# -------------------------------------------------------------- end to end
TINY = [
    "data.dataset='synthetic'", "data.synthetic_train=200", "data.synthetic_test=64",
    "federated.num_clients=5", "federated.warmup_rounds=1", "federated.finetune_rounds=0",
    "pruning.criterion='l2'", "train.threads=1", "train.batch_size=32", "eval.latency=false",
]


def test_inprocess_run_with_adversaries_records_them_and_screening_removes_them():
    from fedprune.federated import FederatedPruning, InProcessTransport

    def run(*extra):
        fp = FederatedPruning(load_config(None, TINY + list(extra)), InProcessTransport(5))
        res = fp.run()
        return res["consensus"], fp.profile_masks

    honest, honest_masks = run()
    assert honest["adversarial_partitions"] == [] and honest["adversarial_mode"] is None
    adv = sorted(adversarial_partitions(5, 0.2, 0))
    assert len(adv) == 1
    attack = ["federated.adversarial_fraction=0.2", "federated.adversarial_mode='scaled'"]
    poisoned, poisoned_masks = run(*attack)
    assert poisoned["adversarial_partitions"] == adv and poisoned["adversarial_mode"] == "scaled"
    assert poisoned["screened_out_partitions"] == [] and poisoned["clients"] == 5
    # l2 importance is the same on every honest client (same global weights), so the
    # poisoned client is the only dissenter: it moves the plain mean, screening drops it.
    assert poisoned_masks != honest_masks
    screened, screened_masks = run(*attack, "federated.screen_clients=true")
    assert screened["screened_out_partitions"] == adv and screened["adversarial_partitions"] == adv
    agreement = screened["screen_agreement"]  # recorded per scoring partition: the dropped one agrees least
    assert sorted(agreement) == list(range(5)) and min(agreement, key=agreement.get) == adv[0] and poisoned["screen_agreement"] is None
    assert screened_masks == honest_masks
