"""Shared pytest fixtures for fedprune tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedprune.data import ImageArrays, make_synthetic

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
#: Latency tables built by the tests (timed while other tests load the CPU) stay out of the user's cache
#: (~/.cache/fedprune), which `make demo` and the benchmarks read; subprocesses inherit the variable.
os.environ["FEDPRUNE_CACHE_DIR"] = str(Path(__file__).resolve().parents[1] / ".cache" / "tests")
torch.set_num_threads(1)

#: Overrides for a tiny federated run on synthetic data (3 clients, one per profile, 1 + 1 rounds, a few seconds).
TINY = [
    "data.dataset='synthetic'", "data.synthetic_train=160", "data.synthetic_test=64",
    "federated.num_clients=3", "federated.warmup_rounds=1", "federated.finetune_rounds=1",
    "pruning.criterion='taylor'", "pruning.num_batches=1", "train.threads=1", "train.batch_size=32",
    "eval.latency=false", "profiles.edge_gpu.local_epochs=1",
    "federated.proportions={edge_gpu=0.34, mobile_cpu=0.33, microcontroller=0.33}",
]

#: Subset copy of CIFAR-10 (official pickle layout) next to the repository:
#: ``<repo>/../shared/data/cifar10-subset/cifar-10-batches-py``.
SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-subset"


def require_shared_cifar() -> Path:
    """Return :data:`SHARED_CIFAR`, or skip the calling test when it is absent."""
    if not (SHARED_CIFAR / "cifar-10-batches-py" / "test_batch").is_file():
        pytest.skip(f"shared CIFAR-10 subset not found at {SHARED_CIFAR}")
    return SHARED_CIFAR


@pytest.fixture
def shared_cifar() -> Path:
    """Path of the shared CIFAR-10 subset (skips the test when absent)."""
    return require_shared_cifar()


@pytest.fixture(scope="session")
def synthetic_data() -> tuple[ImageArrays, ImageArrays]:
    """Small synthetic ``(train, test)`` pair: 600 and 200 images, 10 classes."""
    return make_synthetic(600, seed=11), make_synthetic(200, seed=12)


@pytest.fixture(scope="module")
def tiny_cfg(request):
    """The tiny config: the test module's own ``TINY`` overrides when it defines them, else :data:`TINY`."""
    from fedprune.config import load_config

    return load_config(None, getattr(request.module, "TINY", TINY))


@pytest.fixture(scope="module")
def tiny_run(tiny_cfg, tmp_path_factory):
    """One complete in-process run of :func:`tiny_cfg`: ``(results, out_dir)``. Read it; do not write to it."""
    from fedprune.federated import simulate

    out = tmp_path_factory.mktemp("tiny_run")
    return simulate(tiny_cfg, out, engine="inprocess"), out
