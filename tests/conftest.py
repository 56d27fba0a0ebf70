"""Shared pytest fixtures for fedprune tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedprune.data import ImageArrays, make_synthetic

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)

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
