"""Tests for fedprune.masks (StructuredMask, soft masks, extraction, index maps)
and fedprune.aggregation.merge_substates (HeteroFL-style merging)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from fedprune.aggregation import merge_substates
from fedprune.groups import ChannelGroup, ChannelGroups, discover_groups
from fedprune.masks import (
    MaskError,
    StructuredMask,
    apply_soft_mask,
    extract_submodel,
    extraction_index_map,
    slice_state,
)
from fedprune.metrics import count_params
from fedprune.models import MODEL_NAMES, get_model

MODEL_KWARGS = {"seed_cnn": {}, "resnet20": {}, "mobilenetv2": {"width_mult": 0.5}}


def _toy_groups(sizes: dict[str, int]) -> ChannelGroups:
    return ChannelGroups(tuple(ChannelGroup(n, s, (n,), ()) for n, s in sizes.items()))


def _random_mask(groups: ChannelGroups, seed: int, keep_fraction: float = 0.5) -> StructuredMask:
    """About ``keep_fraction`` of each group's channels, at random, at least one kept and one pruned."""
    rng = np.random.default_rng(seed)
    keep = {}
    for g in groups:
        k = max(1, min(g.size - 1, int(round(g.size * keep_fraction))))
        vec = np.zeros(g.size, dtype=bool)
        vec[rng.choice(g.size, size=k, replace=False)] = True
        keep[g.name] = vec
    return StructuredMask(keep)


@torch.no_grad()
def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random BN running stats and affine params, and random conv/linear biases.

    With default init (gamma=1, beta=0, mean=0, var=1) a wrongly sliced BN
    would go unnoticed; random values make every index matter.
    """
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            m.weight.copy_(0.5 + torch.rand(n, generator=gen))
            m.bias.copy_(0.2 * torch.randn(n, generator=gen))
            m.num_batches_tracked.fill_(7)
        elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    return model


# ------------------------------------------------------------ StructuredMask
def test_to_arrays_from_arrays_round_trip() -> None:
    groups = _toy_groups({"a": 5, "b": 8, "c": 1})
    mask = _random_mask(groups, seed=0)
    arrays = mask.to_arrays()
    assert set(arrays) == {"a", "b", "c"}
    for name, arr in arrays.items():
        assert arr.dtype == np.uint8 and arr.shape == (groups[name].size,)
        assert set(np.unique(arr)) <= {0, 1}
    back = StructuredMask.from_arrays(arrays, groups)
    assert back == mask and back.key() == mask.key() and hash(back) == hash(mask)
    for name in groups.names:
        assert back.keep[name].dtype == np.bool_
        np.testing.assert_array_equal(back.keep[name], mask.keep[name])
    # Boolean arrays work too, and kept vectors are read-only copies.
    back2 = StructuredMask.from_arrays({k: v.astype(bool) for k, v in arrays.items()}, groups)
    assert back2 == mask
    with pytest.raises(ValueError):
        back2.keep["a"][0] = not back2.keep["a"][0]


def test_dense_mask_and_accessors() -> None:
    groups = _toy_groups({"a": 4, "b": 6})
    dense = StructuredMask.dense(groups).validate(groups)
    assert dense.channel_sparsity == 0.0
    assert dense.kept_counts == {"a": 4, "b": 6}
    mask = StructuredMask({"a": [1, 0, 1, 0], "b": [0, 0, 0, 0, 0, 1]})
    assert mask.kept_counts == {"a": 2, "b": 1}
    np.testing.assert_array_equal(mask.kept("a"), [0, 2])
    np.testing.assert_array_equal(mask.pruned("a"), [1, 3])
    assert mask.channel_sparsity == pytest.approx(7 / 10)
    assert mask.is_subset_of(dense) and not dense.is_subset_of(mask)
    assert mask.intersection(dense) == mask
    assert mask.jaccard(dense) == pytest.approx(3 / 10)


@pytest.mark.parametrize(
    "arrays,match",
    [
        ({"a": np.ones(4, bool), "b": np.ones(5, bool)}, r"'b' has 5 channels, the model has 6"),  # wrong size
        ({"a": np.ones(4, bool)}, r"missing \['b'\]"),  # missing group
        ({"a": np.ones(4, bool), "b": np.ones(6, bool), "zz": np.ones(2, bool)}, r"unknown \['zz'\]"),  # unknown group
        ({"a": np.zeros(4, bool), "b": np.ones(6, bool)}, r"'a' keeps no channel"),  # all False
        ({"a": np.zeros(4, np.uint8), "b": np.ones(6, np.uint8)}, r"'a' keeps no channel"),  # all 0 (uint8)
        ({"a": np.array([0, 2, 1, 1], np.uint8), "b": np.ones(6, bool)}, r"'a' must be boolean"),  # not 0/1
        ({"a": np.array([0.5, 1, 1, 0]), "b": np.ones(6, bool)}, r"'a' must be boolean"),  # fractional
        ({"a": np.ones((2, 2), bool), "b": np.ones(6, bool)}, r"'a' must be 1-D"),
    ],
)
def test_from_arrays_validation_errors(arrays, match) -> None:
    groups = _toy_groups({"a": 4, "b": 6})
    with pytest.raises(MaskError, match=match):
        StructuredMask.from_arrays(arrays, groups)


def test_constructor_rejects_non_boolean_and_validate_rejects_mismatch() -> None:
    with pytest.raises(MaskError, match="boolean"):
        StructuredMask({"a": [0, 1, 3]})
    with pytest.raises(MaskError, match="keeps no channel"):
        StructuredMask({"a": [False, False]})
    mask = StructuredMask({"a": [1, 1, 0]})  # 0/1 ints are fine
    assert mask.keep["a"].dtype == np.bool_
    with pytest.raises(MaskError):
        mask.validate(_toy_groups({"a": 4}))
    assert issubclass(MaskError, ValueError)


def test_from_scores_round_to_multiples_of_8() -> None:
    rng = np.random.default_rng(3)
    sizes = {"a": 64, "b": 20, "c": 5, "d": 16, "e": 33}
    scores = {k: rng.random(n) for k, n in sizes.items()}
    counts = {"a": 9, "b": 17, "c": 2, "d": 8, "e": 1}
    mask = StructuredMask.from_scores(scores, counts, round_to=8)
    expected = {"a": 16, "b": 20, "c": 5, "d": 8, "e": 8}  # capped at the group size
    assert mask.kept_counts == expected
    for name, k in mask.kept_counts.items():
        assert k % 8 == 0 or k == sizes[name]
        # the kept channels are the k best-scoring ones
        np.testing.assert_array_equal(np.sort(mask.kept(name)), np.sort(np.argsort(-scores[name], kind="stable")[:k]))
    # round_to off: exact counts
    assert StructuredMask.from_scores(scores, counts).kept_counts == counts


def test_from_scores_tie_breaking_is_deterministic() -> None:
    scores = {"a": np.array([1.0, 3.0, 3.0, 2.0, 3.0, 3.0]), "b": np.zeros(5)}
    m2 = StructuredMask.from_scores(scores, {"a": 2, "b": 2})
    np.testing.assert_array_equal(m2.kept("a"), [1, 2])  # ties -> lower index first
    np.testing.assert_array_equal(m2.kept("b"), [0, 1])
    m3 = StructuredMask.from_scores(scores, {"a": 3, "b": 3})
    np.testing.assert_array_equal(m3.kept("a"), [1, 2, 4])
    # Same input -> same mask; growing counts -> nested masks.
    assert StructuredMask.from_scores(scores, {"a": 2, "b": 2}) == m2
    masks = [StructuredMask.from_scores(scores, {"a": k, "b": k}) for k in range(1, 6)]
    for smaller, larger in zip(masks, masks[1:]):
        assert smaller.is_subset_of(larger)
    # Counts are clamped to [1, size].
    assert StructuredMask.from_scores(scores, {"a": 0, "b": 99}).kept_counts == {"a": 1, "b": 5}


# ------------------------------------------------------------- every model
@pytest.fixture(scope="module", params=MODEL_NAMES)
def model_and_groups(request):
    name = request.param
    torch.manual_seed(0)
    model = _randomise(get_model(name, **MODEL_KWARGS[name]), seed=1).eval()
    return name, model, discover_groups(model)


def test_discover_groups_structure(model_and_groups) -> None:
    name, model, groups = model_and_groups
    assert len(groups) > 0
    modules = dict(model.named_modules())
    for g in groups:
        assert g.name in g.producers and g.size == modules[g.name].out_channels
        for p in g.producers:
            assert isinstance(modules[p], nn.Conv2d) and modules[p].out_channels == g.size
        for n in g.norms:
            assert modules[n].num_features == g.size
    final = [n for n, m in modules.items() if isinstance(m, nn.Linear)][-1]
    assert all(final not in g.producers for g in groups)
    if name == "resnet20":
        coupled = [g for g in groups if len(g.producers) > 1]
        assert coupled, "resnet20 needs residual-coupled groups"
        assert any(len(g.norms) > 1 for g in coupled)
    if name == "mobilenetv2":
        depthwise = [g for g in groups if any(modules[p].groups > 1 for p in g.producers)]
        assert depthwise, "mobilenetv2 needs a group holding a depthwise conv"


def test_soft_mask_equals_extracted_submodel(model_and_groups) -> None:
    name, model, groups = model_and_groups
    mask = _random_mask(groups, seed=5)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}

    soft = apply_soft_mask(copy.deepcopy(model), mask, groups).eval()
    sub = extract_submodel(model, mask, groups)
    assert not sub.training
    with torch.no_grad():
        y_soft, y_sub, y_dense = soft(x), sub(x), model(x)
    assert y_sub.shape == y_soft.shape == (4, 10)
    torch.testing.assert_close(y_sub, y_soft, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y_dense, y_soft, atol=1e-3)  # the mask does something
    assert count_params(sub) < count_params(model)
    # extract_submodel does not modify the dense model
    for k, v in model.state_dict().items():
        assert torch.equal(v, dense_state[k]), k

    index_map = extraction_index_map(model, mask, groups)
    sub_state = sub.state_dict()
    float_keys = {k for k, v in sub_state.items() if v.is_floating_point()}
    assert set(index_map) == float_keys
    sliced = slice_state(dense_state, index_map)
    for k in float_keys:
        assert sliced[k].shape == sub_state[k].shape, k
        assert torch.equal(sliced[k], sub_state[k]), k
    # The sub-model reloaded from the slice gives the same outputs.
    fresh = extract_submodel(get_model(name, **MODEL_KWARGS[name]), mask, groups).eval()
    fresh.load_state_dict(sliced, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y_sub, atol=1e-5, rtol=1e-5)


def test_a_mask_narrows_and_widens_vectors_groups_and_masks() -> None:
    """Progressive pruning works inside the channels still held: vectors and groups narrowed to a mask's kept
    channels, and masks allocated there widened back to the original index space (as subsets of it)."""
    groups = _toy_groups({"a": 8, "b": 6})
    rng = np.random.default_rng(0)
    scores = {g.name: rng.random(g.size) for g in groups}
    outer = _random_mask(groups, seed=3)
    narrow = outer.narrow(scores)
    assert {k: v.size for k, v in narrow.items()} == outer.kept_counts == outer.narrowed_groups(groups).sizes
    assert outer.narrowed_groups(groups).names == groups.names
    wide = outer.widen(narrow)
    for k in scores:
        np.testing.assert_array_equal(wide[k][outer.keep[k]], scores[k][outer.keep[k]])
        np.testing.assert_array_equal(wide[k][~outer.keep[k]], 0.0)
    inner = StructuredMask.from_scores(narrow, {"a": 2, "b": 1})  # the best 2 / 1 of outer's channels
    placed = outer.widen_mask(inner)
    assert placed.is_subset_of(outer) and placed.kept_counts == {"a": 2, "b": 1}
    for k in scores:
        best = outer.kept(k)[np.argsort(-scores[k][outer.kept(k)], kind="stable")][: placed.kept_counts[k]]
        assert set(placed.kept(k)) == set(best)
    assert outer.narrow_mask(placed) == inner and outer.widen_mask(outer.narrow_mask(outer)) == outer
    with pytest.raises(MaskError, match="subset"):
        outer.narrow_mask(StructuredMask.dense(groups))
    assert outer.union(placed) == outer and placed.union(outer) == outer


def test_an_extracted_sub_network_has_the_same_groups_narrower(model_and_groups) -> None:
    """Progressive federated pruning scores an extracted sub-network with its own traced groups and puts the
    scores back by group name: every group is there, holding the mask's kept channels."""
    _, model, groups = model_and_groups
    mask = _random_mask(groups, seed=9, keep_fraction=0.4)
    sub_groups = discover_groups(extract_submodel(model, mask, groups))
    assert sub_groups.names == groups.names
    assert {g.name: g.size for g in sub_groups} == mask.kept_counts


def test_extract_rejects_mismatched_mask(model_and_groups) -> None:
    _, model, groups = model_and_groups
    keep = dict(StructuredMask.dense(groups).keep)
    keep.pop(groups.names[0])
    with pytest.raises(MaskError):
        extract_submodel(model, StructuredMask(keep), groups)


# ----------------------------------------------------------- merge_substates
@pytest.fixture(scope="module")
def resnet_setup():
    torch.manual_seed(0)
    model = _randomise(get_model("resnet20"), seed=3)
    groups = discover_groups(model)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    return model, groups, dense_state


def _assert_states_equal(a, b) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_merge_single_unchanged_client_is_identity(resnet_setup) -> None:
    model, groups, dense = resnet_setup
    mask = _random_mask(groups, seed=11)
    imap = extraction_index_map(model, mask, groups)
    merged = merge_substates(dense, [(slice_state(dense, imap), imap, 37.0)])
    _assert_states_equal(merged, dense)


def test_merge_entries_held_by_nobody_keep_their_value(resnet_setup) -> None:
    model, groups, dense = resnet_setup
    mask = _random_mask(groups, seed=12, keep_fraction=0.4)
    imap = extraction_index_map(model, mask, groups)
    update = {k: v + 1.0 for k, v in slice_state(dense, imap).items()}
    merged = merge_substates(dense, [(update, imap, 2.0)])
    some_unheld = False
    for k, v in dense.items():
        if k not in imap:  # integer buffers
            assert torch.equal(merged[k], v), k
            continue
        held = torch.zeros(v.numel(), dtype=torch.bool)
        held[imap[k].reshape(-1)] = True
        flat_m, flat_d = merged[k].reshape(-1), v.reshape(-1)
        assert torch.equal(flat_m[~held], flat_d[~held]), k
        torch.testing.assert_close(flat_m[held], flat_d[held] + 1.0)
        some_unheld |= bool((~held).any())
    assert some_unheld


def test_merge_weighted_mean_of_two_clients(resnet_setup) -> None:
    model, groups, dense = resnet_setup
    mask = _random_mask(groups, seed=13)
    imap = extraction_index_map(model, mask, groups)
    base = slice_state(dense, imap)
    a = {k: torch.full_like(v, 2.0) for k, v in base.items()}
    b = {k: torch.full_like(v, 10.0) for k, v in base.items()}
    merged = merge_substates(dense, [(a, imap, 1), (b, imap, 3)])
    # (1 * 2 + 3 * 10) / (1 + 3) = 8
    for k, idx in imap.items():
        got = merged[k].reshape(-1)[idx.reshape(-1)]
        assert torch.equal(got, torch.full_like(got, 8.0)), k
    # Non-constant values: hand-computed per entry.
    a = {k: torch.randn_like(v) for k, v in base.items()}
    b = {k: torch.randn_like(v) for k, v in base.items()}
    merged = merge_substates(dense, [(a, imap, 1.0), (b, imap, 3.0)])
    for k, idx in imap.items():
        torch.testing.assert_close(merged[k].reshape(-1)[idx.reshape(-1)], ((a[k] + 3 * b[k]) / 4).reshape(-1))


def test_merge_overlapping_masks_average_only_over_holders(resnet_setup) -> None:
    model, groups, dense = resnet_setup
    big = _random_mask(groups, seed=14, keep_fraction=0.7)
    small = StructuredMask.from_scores({k: v.astype(float) for k, v in big.keep.items()}, {k: max(1, c // 2) for k, c in big.kept_counts.items()})
    assert small.is_subset_of(big)
    imap_b, imap_s = extraction_index_map(model, big, groups), extraction_index_map(model, small, groups)
    up_b = {k: torch.full(v.shape, 4.0) for k, v in imap_b.items()}
    up_s = {k: torch.full(v.shape, 1.0) for k, v in imap_s.items()}
    merged = merge_substates(dense, [(up_b, imap_b, 1.0), (up_s, imap_s, 1.0)])
    for k, v in dense.items():
        if k not in imap_b:
            continue
        held_b = torch.zeros(v.numel(), dtype=torch.bool)
        held_s = torch.zeros(v.numel(), dtype=torch.bool)
        held_b[imap_b[k].reshape(-1)] = True
        held_s[imap_s[k].reshape(-1)] = True
        flat = merged[k].reshape(-1)
        assert torch.all(flat[held_b & held_s] == 2.5), k
        assert torch.all(flat[held_b & ~held_s] == 4.0), k
        assert torch.equal(flat[~held_b & ~held_s], v.reshape(-1)[~held_b & ~held_s]), k


def test_merge_with_dense_masks_is_fedavg(resnet_setup) -> None:
    model, groups, dense = resnet_setup
    imap = extraction_index_map(model, StructuredMask.dense(groups), groups)
    assert {k for k, v in dense.items() if v.is_floating_point()} == set(imap)
    gen = torch.Generator().manual_seed(4)
    clients = [{k: torch.randn(v.shape, generator=gen) for k, v in dense.items() if v.is_floating_point()} for _ in range(3)]
    weights = [10.0, 30.0, 60.0]
    merged = merge_substates(dense, [(c, imap, w) for c, w in zip(clients, weights)])
    for k, v in dense.items():
        if not v.is_floating_point():
            assert torch.equal(merged[k], v)  # num_batches_tracked keeps the dense value
            continue
        expected = sum(w * c[k].double() for c, w in zip(clients, weights)) / sum(weights)
        assert merged[k].dtype == v.dtype
        torch.testing.assert_close(merged[k], expected.float(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("weight", [0, 0.0, -1.0, float("nan")])
def test_merge_rejects_non_positive_weight(resnet_setup, weight) -> None:
    model, groups, dense = resnet_setup
    imap = extraction_index_map(model, StructuredMask.dense(groups), groups)
    with pytest.raises(ValueError, match="weight must be positive"):
        merge_substates(dense, [(slice_state(dense, imap), imap, weight)])


def test_tracing_a_model_for_its_groups_draws_nothing_from_torch_rng() -> None:
    """The first (uncached) group tracing in a process leaves torch's RNG where it was, so a seeded run gives
    the same numbers whether or not another run traced the model before it in the same process."""
    from fedprune.groups import groups_for

    groups_for.cache_clear()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    groups = groups_for("seed_cnn")
    assert torch.equal(torch.get_rng_state(), before) and len(groups.names) == 4
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    groups_for.cache_clear()
    groups_for("seed_cnn")
    assert torch.equal(torch.rand(3), expected)
