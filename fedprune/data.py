"""Datasets, transforms, loaders and federated partitioning for fedprune.

Images are kept in memory as ``uint8`` arrays of shape ``(N, 32, 32, 3)`` (HWC,
RGB, values 0..255) with ``int64`` labels of shape ``(N,)``.  Conversion to
normalised float tensors of shape ``(3, 32, 32)`` (CHW) happens in the
transforms / loaders.

Two datasets are available (:data:`DATASET_NAMES`):

* ``"cifar10"`` -- the official CIFAR-10 python pickles (``cifar-10-batches-py``),
  read by :func:`read_cifar10_batches` without any integrity check so that
  subset copies with fewer images per batch also work.
* ``"synthetic"`` -- a learnable CIFAR-shaped dataset generated on the fly by
  :func:`make_synthetic` (no files, no network).

Client partitions are produced with the flwr-datasets partitioners working on
an in-memory table that holds only indices and labels (:func:`partition_indices`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

if TYPE_CHECKING:
    from torchvision.transforms import v2

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
NUM_CLASSES = 10
IMAGE_SHAPE: tuple[int, int, int] = (32, 32, 3)

DATASET_NAMES: tuple[str, ...] = ("cifar10", "synthetic")
PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "pathological")

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
DATA_DIR_ENV = "FEDPRUNE_DATA_DIR"
DEFAULT_DATA_ROOT = Path("data")

#: Seed of the per-class templates of the synthetic dataset.  It is fixed (not
#: derived from the user seed) so that train and test splits generated with
#: different seeds share the same classes.
SYNTHETIC_TEMPLATE_SEED = 20240611


# --------------------------------------------------------------------------- #
# In-memory image arrays
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class ImageArrays:
    """A labelled image set held in memory.

    Attributes:
        images: ``uint8`` array of shape ``(N, 32, 32, 3)`` (HWC, RGB, 0..255).
        labels: ``int64`` array of shape ``(N,)`` with class ids.  Any integer
            dtype is accepted and converted to ``int64``.
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            raise ValueError(
                f"images must be a uint8 numpy array, got "
                f"{type(images).__name__} with dtype {getattr(images, 'dtype', None)}"
            )
        if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
            raise ValueError(
                f"images must have shape (N, 32, 32, 3) (HWC), got {images.shape}"
            )
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must have shape (N,), got {labels.shape}")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        if len(labels) != len(images):
            raise ValueError(
                f"images and labels differ in length: images {images.shape}, "
                f"labels {labels.shape}"
            )
        object.__setattr__(self, "labels", labels.astype(np.int64, copy=False))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: np.ndarray | Sequence[int]) -> ImageArrays:
        """Return the examples at positions ``idx`` (a copy, in the given order)."""
        idx = np.asarray(idx, dtype=np.int64)
        return ImageArrays(images=self.images[idx], labels=self.labels[idx])


# --------------------------------------------------------------------------- #
# CIFAR-10 loading
# --------------------------------------------------------------------------- #
class DataNotFoundError(RuntimeError):
    """Raised when a dataset cannot be found locally nor downloaded."""


class InvalidDataError(ValueError):
    """Raised when a dataset file exists but is not what it should be (e.g. a truncated CIFAR-10 batch)."""


def _pickle_get(batch: dict[Any, Any], key: str, path: Path) -> Any:
    """Read ``key`` from a CIFAR batch dict whose keys may be ``bytes`` or ``str``."""
    if not isinstance(batch, dict):
        raise InvalidDataError(f"{path} is not a CIFAR-10 batch: it holds a {type(batch).__name__}, not a dict")
    if key.encode() in batch:
        return batch[key.encode()]
    if key in batch:
        return batch[key]
    raise InvalidDataError(f"{path} is not a CIFAR-10 batch: missing key {key!r}")


def _read_batch(path: Path) -> ImageArrays:
    """Read one ``cifar-10-batches-py`` pickle (``data``: uint8 N x 3072 R,G,B planes); a file that is not one
    raises :class:`InvalidDataError` naming it."""
    try:
        with path.open("rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
    except Exception as exc:  # noqa: BLE001 - truncated, empty or foreign files all get one clear message
        raise InvalidDataError(f"{path} is not a readable CIFAR-10 batch ({type(exc).__name__}: {exc}); expected the "
                               "official cifar-10-batches-py pickles") from None
    try:
        data = np.asarray(_pickle_get(batch, "data", path), dtype=np.uint8)
        labels = np.asarray(_pickle_get(batch, "labels", path), dtype=np.int64)
    except InvalidDataError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidDataError(f"{path} is not a CIFAR-10 batch: its 'data' or 'labels' are not arrays of numbers ({exc})") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise InvalidDataError(f"{path}: 'data' must have shape (N, 3072), got {data.shape}")
    if labels.shape != (data.shape[0],):
        raise InvalidDataError(f"{path}: 'labels' must hold one label per image ({data.shape[0]}), got shape {labels.shape}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return ImageArrays(images=np.ascontiguousarray(images), labels=labels)


def _concat(parts: Sequence[ImageArrays]) -> ImageArrays:
    return ImageArrays(
        images=np.concatenate([p.images for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
    )


def _has_cifar_layout(folder: Path) -> bool:
    """True when ``folder`` holds ``test_batch`` and at least one ``data_batch_k``."""
    return (folder / CIFAR10_TEST_FILE).is_file() and any(
        (folder / name).is_file() for name in CIFAR10_TRAIN_FILES
    )


def _find_cifar_folder(base: Path) -> Path | None:
    """Return the ``cifar-10-batches-py`` folder in (or equal to) ``base``, if any."""
    for candidate in (base / CIFAR10_FOLDER, base):
        if _has_cifar_layout(candidate):
            return candidate
    return None


def read_cifar10_batches(root: Path) -> tuple[ImageArrays, ImageArrays]:
    """Read the official ``cifar-10-batches-py`` pickle layout.

    Args:
        root: the ``cifar-10-batches-py`` folder (or a directory containing
            it).  Batches may hold any number of images; missing
            ``data_batch_k`` files are skipped as long as at least one train
            batch and ``test_batch`` exist.

    Returns:
        ``(train, test)`` arrays, train batches concatenated in order 1..5.

    Raises:
        DataNotFoundError: no train batch or no ``test_batch`` in ``root``.
    """
    root = _find_cifar_folder(Path(root)) or Path(root)
    train_paths = [root / n for n in CIFAR10_TRAIN_FILES if (root / n).is_file()]
    test_path = root / CIFAR10_TEST_FILE
    if not train_paths or not test_path.is_file():
        raise DataNotFoundError(
            f"{root} does not contain the CIFAR-10 python layout "
            f"(need {CIFAR10_TEST_FILE} and at least one of data_batch_1..5)"
        )
    train = _concat([_read_batch(p) for p in train_paths])
    return train, _read_batch(test_path)


_OPTIONS_HELP = (
    "Options:\n"
    f"  - pass --data-dir DIR (DIR contains {CIFAR10_FOLDER}/ with data_batch_1..5 "
    "and test_batch)\n"
    f"  - set the environment variable {DATA_DIR_ENV}=DIR\n"
    f"  - put the extracted data in ./data/{CIFAR10_FOLDER}\n"
    "  - or use the synthetic dataset instead: --dataset synthetic"
)


def _download_cifar10(root: Path) -> str | None:
    """Download CIFAR-10 into ``root`` with torchvision; return an error line or None."""
    try:
        from torchvision.datasets import CIFAR10

        CIFAR10(root=str(root), train=True, download=True)
    except Exception as exc:  # network errors come in many types (URLError, OSError...)
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        return f"{type(exc).__name__}: {first_line}"
    return None


def load_cifar10(
    data_dir: str | Path | None = None, download: bool = True
) -> tuple[ImageArrays, ImageArrays]:
    """Load CIFAR-10 as ``(train, test)`` :class:`ImageArrays`.

    Resolution order:

    1. ``data_dir`` if given, else the ``FEDPRUNE_DATA_DIR`` environment variable:
       a directory containing ``cifar-10-batches-py`` (or that folder itself).
       If such a directory is given but holds no data, fail immediately.
    2. ``./data/cifar-10-batches-py`` (relative to the working directory).
    3. If ``download``: ``torchvision.datasets.CIFAR10(root="./data", download=True)``.

    Raises:
        DataNotFoundError: with a multi-line message listing what was tried and
            how to provide the data (or to use ``--dataset synthetic``).
    """
    env_value = os.environ.get(DATA_DIR_ENV, "").strip()
    if data_dir is not None or env_value:
        source = "data_dir/--data-dir" if data_dir is not None else DATA_DIR_ENV
        if data_dir is not None and env_value and Path(env_value).expanduser().resolve() == Path(data_dir).expanduser().resolve():
            source = f"data_dir, or {DATA_DIR_ENV}, which sets it when it is empty"
        explicit = Path(data_dir if data_dir is not None else env_value).expanduser()
        folder = _find_cifar_folder(explicit)
        if folder is None:
            raise DataNotFoundError(
                f"CIFAR-10 data not found in {explicit} (given via {source}).\n"
                f"Expected {explicit / CIFAR10_FOLDER}/ (or {explicit} itself) to "
                f"contain {CIFAR10_TEST_FILE} and data_batch_1..5.\n" + _OPTIONS_HELP
            )
        return read_cifar10_batches(folder)

    tried = [
        "  - data_dir argument / --data-dir: not given",
        f"  - {DATA_DIR_ENV}: not set",
    ]
    local = DEFAULT_DATA_ROOT / CIFAR10_FOLDER
    if _has_cifar_layout(local):
        return read_cifar10_batches(local)
    tried.append(f"  - {local.resolve()}: not found")

    if download:
        error = _download_cifar10(DEFAULT_DATA_ROOT)
        if error is None and _has_cifar_layout(local):
            return read_cifar10_batches(local)
        tried.append(f"  - download with torchvision: failed ({error or 'no files'})")
    else:
        tried.append("  - download with torchvision: skipped (download disabled)")

    raise DataNotFoundError(
        "CIFAR-10 data not found.\nTried:\n" + "\n".join(tried) + "\n" + _OPTIONS_HELP
    )


# --------------------------------------------------------------------------- #
# Synthetic data
# --------------------------------------------------------------------------- #
def _derive_seed(seed: int, stream: int) -> int:
    """Derive an independent 32-bit seed for ``stream`` from ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(stream)]).generate_state(1)[0])


def _smooth_noise(rng: np.random.Generator, n: int, grid: int, size: int) -> np.ndarray:
    """Low-frequency noise: ``(n, size, size, 3)`` float32, bilinear upsampled from a grid."""
    coarse = torch.from_numpy(rng.standard_normal((n, 3, grid, grid)).astype(np.float32))
    fine = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return fine.permute(0, 2, 3, 1).numpy()


def _class_templates(num_classes: int, size: int) -> np.ndarray:
    """Fixed per-class patterns: ``(num_classes, size, size, 3)`` float32, ~unit scale.

    Each template is a class colour plus a low-frequency spatial pattern; they
    depend only on :data:`SYNTHETIC_TEMPLATE_SEED` and ``num_classes``.
    """
    rng = np.random.default_rng([SYNTHETIC_TEMPLATE_SEED, num_classes])
    colour = rng.uniform(-1.0, 1.0, size=(num_classes, 1, 1, 3)).astype(np.float32)
    pattern = _smooth_noise(rng, num_classes, grid=4, size=size)
    return 0.4 * colour + pattern


_SYN_PAD = 4  # maximal random shift of the synthetic templates, in pixels
_SYN_CHUNK = 4096  # images generated per chunk (bounds float32 memory)


def _render_chunk(
    rng: np.random.Generator, templates: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """Render uint8 ``(n, 32, 32, 3)`` images of ``labels`` from padded ``templates``."""
    n = len(labels)
    dy = rng.integers(0, 2 * _SYN_PAD + 1, size=n)
    dx = rng.integers(0, 2 * _SYN_PAD + 1, size=n)
    rows = dy[:, None] + np.arange(32)[None, :]
    cols = dx[:, None] + np.arange(32)[None, :]
    shifted = templates[labels[:, None, None], rows[:, :, None], cols[:, None, :]]
    flip = rng.random(n) < 0.5
    shifted[flip] = shifted[flip, :, ::-1]
    contrast = rng.uniform(0.7, 1.3, size=(n, 1, 1, 1)).astype(np.float32)
    brightness = rng.normal(0.0, 0.25, size=(n, 1, 1, 1)).astype(np.float32)
    distractor = _smooth_noise(rng, n, grid=6, size=32)
    pixel_noise = rng.standard_normal((n, 32, 32, 3)).astype(np.float32)
    img = contrast * shifted + brightness + 1.2 * distractor + 0.5 * pixel_noise
    return np.clip(128.0 + 40.0 * img, 0, 255).astype(np.uint8)


def make_synthetic(n: int, seed: int, num_classes: int = NUM_CLASSES) -> ImageArrays:
    """Generate a learnable CIFAR-shaped dataset.

    Every class has a fixed low-frequency colour/pattern template (independent of
    ``seed``).  Each image is its class template randomly shifted by up to 4 px,
    randomly flipped horizontally, with random brightness/contrast, a random
    low-frequency distractor pattern and pixel noise.  Labels are balanced
    (``n // num_classes`` per class, remainder spread) in random order.

    Args:
        n: number of images (>= 0).
        seed: seed for labels, shifts and noise; same seed -> identical arrays.
        num_classes: number of classes (>= 2).

    Returns:
        :class:`ImageArrays` with ``uint8 (n, 32, 32, 3)`` images.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n, dtype=np.int64) % num_classes)
    templates = _class_templates(num_classes, 32 + 2 * _SYN_PAD)
    images = np.empty((n, *IMAGE_SHAPE), dtype=np.uint8)
    for start in range(0, n, _SYN_CHUNK):
        stop = min(start + _SYN_CHUNK, n)
        images[start:stop] = _render_chunk(rng, templates, labels[start:stop])
    return ImageArrays(images=images, labels=labels)


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    seed: int = 0,
    synthetic_sizes: tuple[int, int] = (2000, 500),
    download: bool = True,
) -> tuple[ImageArrays, ImageArrays]:
    """Load dataset ``name`` (one of :data:`DATASET_NAMES`) as ``(train, test)``.

    For ``"synthetic"``, ``synthetic_sizes`` gives ``(n_train, n_test)`` and the
    two splits use different seeds derived from ``seed``.  ``data_dir`` and
    ``download`` only apply to ``"cifar10"`` (see :func:`load_cifar10`).
    """
    key = str(name).strip().lower()
    if key == "cifar10":
        return load_cifar10(data_dir=data_dir, download=download)
    if key == "synthetic":
        n_train, n_test = synthetic_sizes
        return (
            make_synthetic(n_train, seed=_derive_seed(seed, 0)),
            make_synthetic(n_test, seed=_derive_seed(seed, 1)),
        )
    raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASET_NAMES)}")


# --------------------------------------------------------------------------- #
# Transforms, datasets and loaders
# --------------------------------------------------------------------------- #
class HWCToTensor:
    """Convert a ``uint8 (32, 32, 3)`` HWC numpy image to a ``uint8 (3, 32, 32)`` tensor."""

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def _v2():
    """``torchvision.transforms.v2``, imported on first use: it takes ~2 s of CPU, which every process that does not
    augment saves (a Deployment Engine ClientApp starts one per message; evaluation batches are made with
    :func:`normalised_tensors` in plain torch, not with :func:`eval_transform`)."""
    from torchvision.transforms import v2

    return v2


def _to_normalised_float() -> list[Callable[[torch.Tensor], torch.Tensor]]:
    v2 = _v2()
    return [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(CIFAR10_MEAN), std=list(CIFAR10_STD)),
    ]


def train_transform() -> v2.Compose:
    """Augmenting transform: uint8 HWC numpy -> float32 ``(3, 32, 32)`` normalised tensor.

    Random 32x32 crop with 4 px zero padding, random horizontal flip, then
    scaling to [0, 1] and per-channel normalisation with the CIFAR-10 statistics.
    """
    v2 = _v2()
    return v2.Compose(
        [
            HWCToTensor(),
            v2.RandomCrop(32, padding=4),
            v2.RandomHorizontalFlip(),
            *_to_normalised_float(),
        ]
    )


def eval_transform() -> v2.Compose:
    """Deterministic transform: uint8 HWC numpy -> float32 ``(3, 32, 32)`` normalised tensor."""
    return _v2().Compose([HWCToTensor(), *_to_normalised_float()])


class ImageDataset(Dataset):
    """Map-style dataset over :class:`ImageArrays`.

    Items are ``(image, label)``: ``image`` is ``transform(uint8 HWC array)``
    (float32 ``(3, 32, 32)`` for the transforms above) and ``label`` an ``int``.
    """

    def __init__(
        self, arrays: ImageArrays, transform: Callable[[np.ndarray], torch.Tensor]
    ) -> None:
        self.arrays = arrays
        self.transform = transform

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.transform(self.arrays.images[index])
        return image, int(self.arrays.labels[index])


_NORMALISE_CHUNK = 8192  # images normalised at a time in normalised_tensors()


def normalised_tensors(arrays: ImageArrays) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise all images at once.

    Returns:
        ``(x, y)``: ``x`` float32 ``(N, 3, 32, 32)`` equal to :func:`eval_transform`
        applied per image, ``y`` int64 ``(N,)``.
    """
    mean = torch.tensor(CIFAR10_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, dtype=torch.float32).view(1, 3, 1, 1)
    x = torch.empty((len(arrays), 3, 32, 32), dtype=torch.float32)
    for start in range(0, len(arrays), _NORMALISE_CHUNK):
        chunk = torch.from_numpy(arrays.images[start : start + _NORMALISE_CHUNK])
        chunk = chunk.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        x[start : start + len(chunk)] = (chunk - mean) / std
    return x, torch.from_numpy(arrays.labels.copy())


def make_loader(
    arrays: ImageArrays, batch_size: int, train: bool, seed: int = 0
) -> DataLoader:
    """Build a single-process :class:`DataLoader`.

    ``train=True``: shuffled with a ``torch.Generator`` seeded by ``seed`` and
    augmented with :func:`train_transform` (augmentation draws from torch's global
    RNG, see :func:`fedprune.training.set_seed`).  ``train=False``: fixed order,
    images pre-normalised once into a :class:`TensorDataset`.
    Batches are ``(x float32 (B, 3, 32, 32), y int64 (B,))``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if train:
        generator = torch.Generator().manual_seed(int(seed))
        return DataLoader(
            ImageDataset(arrays, train_transform()),
            batch_size=batch_size,
            shuffle=len(arrays) > 0,  # RandomSampler rejects empty datasets
            generator=generator,
            num_workers=0,
        )
    return DataLoader(
        TensorDataset(*normalised_tensors(arrays)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=0,
    )


# --------------------------------------------------------------------------- #
# Federated partitioning
# --------------------------------------------------------------------------- #
class _LabelsKey:
    """Hashable wrapper of a label array (hash = SHA-1 of its int64 bytes)."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = np.ascontiguousarray(labels, dtype=np.int64)
        self.digest = hashlib.sha1(self.labels.tobytes()).hexdigest()

    def __hash__(self) -> int:
        return hash(self.digest)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _LabelsKey) and other.digest == self.digest


def _index_table(idx: np.ndarray, labels: np.ndarray) -> Any:
    """In-memory HF ``datasets.Dataset`` with columns ``idx`` and ``label``."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    return datasets.Dataset.from_dict({"idx": idx, "label": labels})


def _load_all(partitioner: Any, table: Any, num_partitions: int) -> list[np.ndarray]:
    """Attach ``table`` to a fresh partitioner and read back every partition's ``idx``."""
    partitioner.dataset = table
    return [
        np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64)
        for i in range(num_partitions)
    ]


def _iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """IID: shuffle with ``seed``, then contiguous equal shards (IidPartitioner)."""
    from flwr_datasets.partitioner import IidPartitioner

    perm = np.random.default_rng(seed).permutation(len(labels))
    table = _index_table(perm, labels[perm])
    return _load_all(IidPartitioner(num_partitions=num_clients), table, num_clients)


def _dirichlet_min_size(n: int, num_clients: int) -> int:
    """Feasible minimum partition size: ``min(10, n // (2 * num_clients))``, at least 1."""
    return max(1, min(10, n // (2 * num_clients)))


def _dirichlet(
    labels: np.ndarray, num_clients: int, seed: int, alpha: float
) -> list[np.ndarray]:
    """Dirichlet(alpha) label skew (DirichletPartitioner).

    The partitioner resamples until every client has ``min_partition_size``
    examples (see :func:`_dirichlet_min_size`); if that fails after its 10
    attempts we retry once with a minimum of 1 example before giving up.
    """
    from flwr_datasets.partitioner import DirichletPartitioner

    table = _index_table(np.arange(len(labels)), labels)
    min_sizes = sorted({_dirichlet_min_size(len(labels), num_clients), 1}, reverse=True)
    for min_size in min_sizes:
        partitioner = DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=min_size,
            self_balancing=False,
            seed=seed,
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return _load_all(partitioner, table, num_clients)
        except ValueError:
            continue
    raise ValueError(
        f"Dirichlet partitioning with alpha={alpha} could not give every one of "
        f"{num_clients} clients at least one of {len(labels)} examples; "
        "use a larger alpha or fewer clients"
    )


def _pathological(
    labels: np.ndarray, num_clients: int, seed: int, classes_per_client: int
) -> list[np.ndarray]:
    """Each client holds ``classes_per_client`` classes (PathologicalPartitioner).

    Classes are assigned deterministically (client ``i`` gets classes
    ``i, i+1, ..., i+k-1`` modulo the number of classes) and each class is split
    evenly among the clients holding it.  Classes that no client holds (when
    ``num_clients + k - 1 < num_classes``) are left out of every partition.
    """
    from flwr_datasets.partitioner import PathologicalPartitioner

    table = _index_table(np.arange(len(labels)), labels)
    partitioner = PathologicalPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        num_classes_per_partition=classes_per_client,
        class_assignment_mode="deterministic",
        seed=seed,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Classes: .* will NOT be used")
        return _load_all(partitioner, table, num_clients)


@functools.lru_cache(maxsize=16)
def _partition_cached(
    key: _LabelsKey,
    num_clients: int,
    scheme: str,
    seed: int,
    alpha: float,
    classes_per_client: int,
) -> tuple[np.ndarray, ...]:
    """Compute all partitions (sorted, read-only int64 arrays); cached per argument set."""
    labels = key.labels
    if scheme == "iid":
        parts = _iid(labels, num_clients, seed)
    elif scheme == "dirichlet":
        parts = _dirichlet(labels, num_clients, seed, alpha)
    else:
        parts = _pathological(labels, num_clients, seed, classes_per_client)
    frozen = []
    for part in parts:
        part = np.sort(part)
        part.setflags(write=False)
        frozen.append(part)
    return tuple(frozen)


def _validate_partition_args(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    alpha: float,
    classes_per_client: int,
) -> None:
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(
            f"labels must be a 1-D integer array, got shape {labels.shape} "
            f"dtype {labels.dtype}"
        )
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(
            f"unknown partition scheme {scheme!r}; allowed: {', '.join(PARTITION_SCHEMES)}"
        )
    if not 1 <= num_clients <= len(labels):
        raise ValueError(
            f"num_clients must be between 1 and the number of examples "
            f"({len(labels)}), got {num_clients}"
        )
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    num_classes = len(np.unique(labels))
    if scheme == "pathological" and not 1 <= classes_per_client <= num_classes:
        raise ValueError(
            f"classes_per_client must be between 1 and the number of classes "
            f"({num_classes}), got {classes_per_client}"
        )


def partition_indices(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    seed: int,
    alpha: float = 0.5,
    classes_per_client: int = 2,
) -> list[np.ndarray]:
    """Split a dataset into ``num_clients`` disjoint client partitions.

    Args:
        labels: int array ``(N,)`` of class ids of the whole (train) dataset.
        num_clients: number of partitions, ``1 <= num_clients <= N``.
        scheme: ``"iid"`` (seeded shuffle, equal shards), ``"dirichlet"``
            (per-class Dirichlet(``alpha``) proportions; smaller alpha = more
            skew) or ``"pathological"`` (``classes_per_client`` classes each).
        seed: partitioning seed.
        alpha: Dirichlet concentration (> 0), used by ``"dirichlet"``.
        classes_per_client: classes per client (1..num classes), used by
            ``"pathological"``.

    Returns:
        One sorted int64 index array (positions into ``labels``) per client.
        Results are deterministic in the arguments and cached in-process.
    """
    labels = np.asarray(labels)
    _validate_partition_args(labels, num_clients, scheme, alpha, classes_per_client)
    cached = _partition_cached(
        _LabelsKey(labels),
        int(num_clients),
        scheme,
        int(seed),
        float(alpha),
        int(classes_per_client),
    )
    return [part.copy() for part in cached]


@dataclass
class ClientShard:
    """One client's share of the training set.

    Attributes:
        client_id: 0-based client index.
        train_idx: sorted int64 indices (into the global train set) for local training.
        val_idx: sorted int64 indices for local validation (disjoint from train_idx).
        label_histogram: example count per class over train_idx + val_idx
            (length ``max(10, largest global label + 1)``).
    """

    client_id: int
    train_idx: np.ndarray
    val_idx: np.ndarray
    label_histogram: list[int]

    @property
    def num_train(self) -> int:
        return int(len(self.train_idx))

    @property
    def num_val(self) -> int:
        return int(len(self.val_idx))

    def to_dict(self, include_indices: bool = True) -> dict[str, Any]:
        """JSON-friendly dict (plain ints and lists)."""
        out: dict[str, Any] = {
            "client_id": int(self.client_id),
            "num_train": self.num_train,
            "num_val": self.num_val,
            "label_histogram": [int(c) for c in self.label_histogram],
        }
        if include_indices:
            out["train_idx"] = [int(i) for i in self.train_idx]
            out["val_idx"] = [int(i) for i in self.val_idx]
        return out


def _num_val(n: int, val_fraction: float) -> int:
    """Validation size: ``round(val_fraction * n)`` clipped so train keeps >= 1 example.

    With ``val_fraction > 0`` and ``n >= 2`` at least one example goes to validation.
    """
    if val_fraction == 0 or n < 2:
        return 0
    return int(min(max(1, round(val_fraction * n)), n - 1))


def make_client_shard(
    labels: np.ndarray,
    num_clients: int,
    client_id: int,
    scheme: str,
    seed: int,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    val_fraction: float = 0.1,
) -> ClientShard:
    """Partition ``labels`` (see :func:`partition_indices`) and split one client's part.

    The client's indices are split into local train/val with a permutation seeded
    by ``(seed, client_id)``; ``val_fraction`` in ``[0, 1)``.
    """
    if not 0 <= client_id < num_clients:
        raise ValueError(f"client_id must be in [0, {num_clients - 1}], got {client_id}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    part = partition_indices(
        labels, num_clients, scheme, seed, alpha=alpha, classes_per_client=classes_per_client
    )[client_id]
    rng = np.random.default_rng([int(seed), int(client_id), 7919])
    shuffled = rng.permutation(part)
    n_val = _num_val(len(part), val_fraction)
    num_classes = max(NUM_CLASSES, int(labels.max()) + 1) if labels.size else NUM_CLASSES
    histogram = np.bincount(labels[part], minlength=num_classes)
    return ClientShard(
        client_id=int(client_id),
        train_idx=np.sort(shuffled[n_val:]),
        val_idx=np.sort(shuffled[:n_val]),
        label_histogram=[int(c) for c in histogram],
    )


def label_skew(parts: Sequence[np.ndarray], labels: np.ndarray) -> float:
    """Mean total-variation distance between client and global label distributions.

    ``0`` means every client has the global class mix; values approach ``1`` when
    clients hold disjoint classes.  Empty partitions are ignored.
    """
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = int(labels.max()) + 1
    global_dist = np.bincount(labels, minlength=num_classes) / len(labels)
    distances = []
    for part in parts:
        if len(part) == 0:
            continue
        local = np.bincount(labels[np.asarray(part)], minlength=num_classes) / len(part)
        distances.append(0.5 * np.abs(local - global_dist).sum())
    return float(np.mean(distances)) if distances else 0.0
