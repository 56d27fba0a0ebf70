"""Tests for fedprune.data: loading, synthetic data, transforms, partitioning."""

from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedprune import data as D
from fedprune.data import (
    DataNotFoundError,
    ImageArrays,
    eval_transform,
    label_skew,
    load_cifar10,
    load_dataset,
    make_client_shard,
    make_loader,
    make_synthetic,
    partition_indices,
    read_cifar10_batches,
    train_transform,
)


# --------------------------------------------------------------------------- #
# Fixtures
# --------------------------------------------------------------------------- #
def _write_batch(path: Path, data: np.ndarray, labels: list[int], bytes_keys: bool) -> None:
    keys = (b"data", b"labels") if bytes_keys else ("data", "labels")
    with path.open("wb") as fh:
        pickle.dump({keys[0]: data, keys[1]: labels}, fh)


@pytest.fixture
def tiny_cifar(tmp_path: Path) -> tuple[Path, list[np.ndarray], list[list[int]]]:
    """Official layout with 2 train batches of 7 images and a test batch of 7."""
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    datas = [rng.integers(0, 256, size=(7, 3072), dtype=np.uint8) for _ in range(3)]
    labels = [rng.integers(0, 10, size=7).tolist() for _ in range(3)]
    _write_batch(root / "data_batch_1", datas[0], labels[0], bytes_keys=True)
    _write_batch(root / "data_batch_2", datas[1], labels[1], bytes_keys=True)
    _write_batch(root / "test_batch", datas[2], labels[2], bytes_keys=False)
    return tmp_path, datas, labels


def _as_hwc(data: np.ndarray) -> np.ndarray:
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


# --------------------------------------------------------------------------- #
# ImageArrays
# --------------------------------------------------------------------------- #
def test_image_arrays_validation_and_subset() -> None:
    images = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    arrays = ImageArrays(images, np.array([0, 1, 2, 3], dtype=np.int32))
    assert arrays.labels.dtype == np.int64 and len(arrays) == 4
    sub = arrays.subset(np.array([3, 1]))
    assert len(sub) == 2 and sub.labels.tolist() == [3, 1]
    with pytest.raises(ValueError, match=r"\(4, 3, 32, 32\)"):
        ImageArrays(np.zeros((4, 3, 32, 32), dtype=np.uint8), np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="uint8"):
        ImageArrays(images.astype(np.float32), np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="length"):
        ImageArrays(images, np.zeros(3, dtype=np.int64))


# --------------------------------------------------------------------------- #
# CIFAR-10 loading
# --------------------------------------------------------------------------- #
def test_read_official_layout_round_trip(tiny_cifar) -> None:
    base, datas, labels = tiny_cifar
    train, test = read_cifar10_batches(base / "cifar-10-batches-py")
    assert train.images.shape == (14, 32, 32, 3) and test.images.shape == (7, 32, 32, 3)
    np.testing.assert_array_equal(train.images, _as_hwc(np.concatenate(datas[:2])))
    np.testing.assert_array_equal(test.images, _as_hwc(datas[2]))
    assert train.labels.tolist() == labels[0] + labels[1]
    assert test.labels.tolist() == labels[2]
    # Pixel (0, 0) of image 0 is (R, G, B) from the three 1024-value planes.
    r, g, b = datas[0][0, 0], datas[0][0, 1024], datas[0][0, 2048]
    assert train.images[0, 0, 0].tolist() == [r, g, b]


def test_load_cifar10_explicit_dir_env_and_folder_itself(tiny_cifar, monkeypatch) -> None:
    base, _, _ = tiny_cifar
    monkeypatch.delenv("FEDPRUNE_DATA_DIR", raising=False)
    assert len(load_cifar10(base, download=False)[0]) == 14
    assert len(load_cifar10(base / "cifar-10-batches-py", download=False)[1]) == 7
    monkeypatch.setenv("FEDPRUNE_DATA_DIR", str(base))
    assert len(load_cifar10(download=False)[0]) == 14


def test_missing_train_batches_are_tolerated(tiny_cifar) -> None:
    base, _, _ = tiny_cifar
    (base / "cifar-10-batches-py" / "data_batch_1").unlink()
    train, _ = load_cifar10(base, download=False)
    assert len(train) == 7


def test_shared_subset_loads(shared_cifar: Path) -> None:
    train, test = load_dataset("cifar10", data_dir=shared_cifar, download=False)
    assert (len(train), len(test)) == (4068, 1017)
    assert set(np.unique(train.labels)) == set(range(10))
    assert test.labels.min() >= 0 and test.labels.max() <= 9


def test_explicit_bad_dir_names_options(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as info:
        load_cifar10(tmp_path / "nowhere", download=False)
    message = str(info.value)
    for needle in ("nowhere", "--data-dir", "FEDPRUNE_DATA_DIR", "./data", "synthetic"):
        assert needle in message
    assert "Traceback" not in message


def test_nothing_found_without_download(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEDPRUNE_DATA_DIR", raising=False)
    with pytest.raises(DataNotFoundError, match="--dataset synthetic") as info:
        load_cifar10(download=False)
    assert "download disabled" in str(info.value)


def test_download_network_error_is_caught(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEDPRUNE_DATA_DIR", raising=False)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataNotFoundError) as info:
        load_cifar10(download=True)
    assert "URLError" in str(info.value) and "synthetic" in str(info.value)


def test_load_dataset_unknown_name() -> None:
    with pytest.raises(ValueError, match="'mnist'.*cifar10.*synthetic"):
        load_dataset("mnist")


# --------------------------------------------------------------------------- #
# Synthetic data
# --------------------------------------------------------------------------- #
def test_synthetic_determinism_and_shape() -> None:
    a, b, c = make_synthetic(50, 3), make_synthetic(50, 3), make_synthetic(50, 4)
    assert a.images.shape == (50, 32, 32, 3) and a.images.dtype == np.uint8
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)
    assert np.bincount(a.labels, minlength=10).tolist() == [5] * 10
    assert len(make_synthetic(0, 1)) == 0


def test_load_dataset_synthetic_splits_differ() -> None:
    train, test = load_dataset("synthetic", seed=5, synthetic_sizes=(30, 20))
    assert (len(train), len(test)) == (30, 20)
    assert not np.array_equal(train.images[:20], test.images)
    again, _ = load_dataset("synthetic", seed=5, synthetic_sizes=(30, 20))
    np.testing.assert_array_equal(train.images, again.images)


def test_synthetic_is_learnable() -> None:
    torch.manual_seed(0)
    train, test = make_synthetic(2000, seed=1), make_synthetic(500, seed=2)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(4),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = make_loader(train, batch_size=32, train=True, seed=0)
    model.train()
    for _ in range(4):  # 4 epochs = 252 steps
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()
    x, y = next(iter(make_loader(test, batch_size=len(test), train=False)))
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.4


# --------------------------------------------------------------------------- #
# Transforms and loaders
# --------------------------------------------------------------------------- #
def test_transforms_shape_dtype_and_eval_determinism() -> None:
    image = make_synthetic(1, 0).images[0]
    for transform in (train_transform(), eval_transform()):
        out = transform(image)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    ev = eval_transform()
    torch.testing.assert_close(ev(image), ev(image))
    expected = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - torch.tensor(
        D.CIFAR10_MEAN).view(3, 1, 1)) / torch.tensor(D.CIFAR10_STD).view(3, 1, 1)
    torch.testing.assert_close(ev(image), expected)


def test_loaders(synthetic_data) -> None:
    train, test = synthetic_data
    x, y = next(iter(make_loader(train, 16, train=True, seed=0)))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    first = [b[1] for b in make_loader(train, 50, train=True, seed=1)]
    again = [b[1] for b in make_loader(train, 50, train=True, seed=1)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    ev = make_loader(test, 64, train=False)
    xs, ys = zip(*ev)
    assert torch.equal(torch.cat(ys), torch.from_numpy(test.labels))
    dataset = D.ImageDataset(test, eval_transform())
    torch.testing.assert_close(torch.cat(xs)[5], dataset[5][0])
    assert dataset[5][1] == int(test.labels[5])


# --------------------------------------------------------------------------- #
# Partitioning
# --------------------------------------------------------------------------- #
LABELS = np.random.default_rng(0).integers(0, 10, size=1000)


@pytest.mark.parametrize(
    "scheme,num_clients", [("iid", 7), ("dirichlet", 10), ("pathological", 10)]
)
def test_partitions_disjoint_and_cover(scheme: str, num_clients: int) -> None:
    parts = partition_indices(LABELS, num_clients, scheme, seed=0)
    assert len(parts) == num_clients
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) and len(p) > 0 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == len(LABELS)
    again = partition_indices(LABELS, num_clients, scheme, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_partitions_depend_on_seed() -> None:
    a = partition_indices(LABELS, 5, "iid", seed=0)
    b = partition_indices(LABELS, 5, "iid", seed=1)
    assert not np.array_equal(a[0], b[0])


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    skewed = label_skew(partition_indices(LABELS, 10, "dirichlet", 0, alpha=0.1), LABELS)
    flat = label_skew(partition_indices(LABELS, 10, "dirichlet", 0, alpha=10.0), LABELS)
    iid = label_skew(partition_indices(LABELS, 10, "iid", 0), LABELS)
    assert skewed > flat + 0.2 and iid < 0.2


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_limits_classes(k: int) -> None:
    for num_clients in (4, 10):
        for part in partition_indices(LABELS, num_clients, "pathological", 0, classes_per_client=k):
            assert len(np.unique(LABELS[part])) <= k


def test_client_shard_split_and_determinism() -> None:
    shard = make_client_shard(LABELS, 5, 2, "dirichlet", seed=3, val_fraction=0.2)
    again = make_client_shard(LABELS, 5, 2, "dirichlet", seed=3, val_fraction=0.2)
    np.testing.assert_array_equal(shard.train_idx, again.train_idx)
    np.testing.assert_array_equal(shard.val_idx, again.val_idx)
    assert len(np.intersect1d(shard.train_idx, shard.val_idx)) == 0
    part = partition_indices(LABELS, 5, "dirichlet", seed=3)[2]
    assert sorted(np.concatenate([shard.train_idx, shard.val_idx]).tolist()) == part.tolist()
    assert shard.num_train >= 1 and len(shard.val_idx) >= 1
    assert sum(shard.label_histogram) == len(part) and len(shard.label_histogram) == 10
    as_dict = shard.to_dict()
    assert as_dict["num_train"] == shard.num_train
    assert all(isinstance(i, int) for i in as_dict["train_idx"])


def test_client_shard_tiny_partition() -> None:
    labels = np.array([0, 1, 2, 3])
    shard = make_client_shard(labels, 4, 0, "iid", seed=0)
    assert shard.num_train == 1 and len(shard.val_idx) == 0
    shard = make_client_shard(labels, 2, 1, "iid", seed=0)
    assert shard.num_train == 1 and len(shard.val_idx) == 1


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"num_clients": 0}, "0"),
        ({"num_clients": 1001}, "1001"),
        ({"scheme": "quantity"}, "quantity"),
        ({"scheme": "dirichlet", "alpha": -1.0}, "-1.0"),
        ({"scheme": "pathological", "classes_per_client": 11}, "11"),
    ],
)
def test_partition_bad_inputs(kwargs: dict, needle: str) -> None:
    args = {"num_clients": 4, "scheme": "iid", "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=needle):
        partition_indices(LABELS, **args)


def test_client_shard_bad_client_id() -> None:
    with pytest.raises(ValueError, match="7"):
        make_client_shard(LABELS, 4, 7, "iid", seed=0)


def test_empty_train_loader_is_allowed(synthetic_data) -> None:
    loader = make_loader(synthetic_data[0].subset([]), 8, train=True)
    assert len(loader) == 0


def test_pathological_shards_that_leave_classes_to_no_client_are_warned_about(caplog) -> None:
    """3 clients x 2 classes of 10 leave 6 classes to nobody; the test split still has them: the run says so."""
    from fedprune.config import load_config
    from fedprune.task import check_partition

    base = ["data.dataset='synthetic'", "data.synthetic_train=400", "data.partition='pathological'", "data.classes_per_client=2"]
    with caplog.at_level("WARNING", logger="fedprune.task"):
        check_partition(load_config(None, base + ["federated.num_clients=3"]))
    assert "gives classes [4, 5, 6, 7, 8, 9] to no client: 240 of 400 training images are never used" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="fedprune.task"):
        check_partition(load_config(None, base + ["federated.num_clients=9"]))  # 9 + 2 - 1 >= 10: every class is held
    assert "to no client" not in caplog.text
