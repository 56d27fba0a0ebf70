"""Writing results: JSON, CSV and PNG plots, always atomically (write, then rename)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["to_jsonable", "write_json", "write_csv", "write_text", "atomic_write_bytes", "mean_std", "fmt_mean_std", "benchmark_parser"]

#: The shared CIFAR-10 subset beside the repository (benchmarks default to it).
SHARED_SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-subset"
BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def to_jsonable(obj: Any) -> Any:
    """Convert numpy/torch scalars and arrays, tuples and Paths into JSON types (NaN -> null)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # torch scalar
        return to_jsonable(obj.item())
    return obj


def _read_umask() -> int:
    """This process's umask, read once at import (setting it is process-wide, so never while threads write files)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


#: Permission bits of a new file under the umask at import (``mkstemp`` alone gives 0600).
FILE_MODE = 0o666 & ~_read_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temp file beside ``path`` and rename it into place, readable as any new file would be
    under the umask (results on a shared cluster stay readable by the group)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            try:
                os.fchmod(fh.fileno(), FILE_MODE)
            except OSError:  # a filesystem without modes (some network and FUSE mounts): keep mkstemp's
                pass
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """CSV with a header; columns default to the union of row keys in first-seen order."""
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: to_jsonable(v) for k, v in row.items()})
    return write_text(path, buf.getvalue())


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def mean_se(values: Iterable[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n); NaN for a single value), e.g. of paired differences."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else float("nan")


#: Two-sided 95% quantile of Student's t by degrees of freedom (1-10); above 10 the value for 10 (slightly wide).
T95 = (12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23)


def t95(n: int) -> float:
    """Two-sided 95% quantile of Student's t for the mean of ``n`` paired differences (:data:`T95`)."""
    return T95[min(n - 1, len(T95)) - 1]


def ci95(mean: float, se: float, n: int) -> tuple[float, float]:
    """95% confidence interval ``(low, high)`` of a mean of ``n`` values (e.g. paired per-seed differences) with
    standard error ``se``: mean ± :func:`t95` (n) x se, in the values' units."""
    t = t95(n)
    return mean - t * se, mean + t * se


def fmt_mean_std(values: Iterable[float], scale: float = 100.0, digits: int = 1) -> str:
    """``"61.2 ± 0.8"`` (values scaled, e.g. accuracy fraction to percent); one value: ``"61.2 (1 seed)"``."""
    values = list(values)
    m, s = mean_std(values)
    if math.isnan(m):
        return "n/a"
    if sum(v is not None for v in values) == 1:
        return f"{m * scale:.{digits}f} (1 seed)"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def check_out_dir(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as an output directory: an existing writable directory, or one that can be created there. Raises
    :class:`~fedprune.config.ConfigError` naming ``flag`` otherwise, before any work. It creates nothing (a probe
    file written to the nearest existing directory is removed at once)."""
    from fedprune.config import ConfigError

    if not str(path).strip():
        raise ConfigError(f"{flag} {str(path)!r} is empty; give a directory (it is created if missing)")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} is a file; give a directory (it is created if missing)")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} cannot be created: {str(parent)!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {str(path)!r} is not writable ({str(parent)!r} does not allow it)")
    try:  # permission bits are not the whole story (root, /proc, read-only mounts): write and remove a probe file
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".fedprune-probe-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {str(path)!r} is not writable: no file can be created in {str(parent)!r} "
                          f"({exc.strerror or exc})") from None
    return out


def read_saved_json(path: str | Path, flag: str) -> Any:
    """The JSON a benchmark wrote before, for an option (``flag``) that only reuses it; a clear
    :class:`~fedprune.config.ConfigError` when it is missing or unreadable."""
    from fedprune.config import ConfigError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag} reads {str(path)!r}, which does not exist: run the benchmark without {flag} first (or give its --out)")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{flag} reads {str(path)!r}, which is not valid JSON ({exc})") from None


def nonnegative_int(text: str) -> int:
    """``argparse`` type: an integer >= 0 (seeds, epochs, counts)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; allowed: an integer >= 0")
    return value


def benchmark_parser(doc: str | None, seeds: Sequence[int] = (0, 1, 2), epochs: int = 8, finetune_epochs: int = 4):
    """``argparse`` parser with the options every centralized benchmark script shares:
    ``--data-dir``, ``--seeds``, ``--epochs`` (dense), ``--finetune-epochs`` and ``--out``."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(SHARED_SUBSET), help="folder holding cifar-10-batches-py")
    parser.add_argument("--seeds", type=nonnegative_int, nargs="+", default=list(seeds))
    parser.add_argument("--epochs", type=nonnegative_int, default=epochs, help="dense training epochs")
    parser.add_argument("--finetune-epochs", type=nonnegative_int, default=finetune_epochs)
    parser.add_argument("--out", default=str(BENCHMARKS_DIR), help="where the .md/.json/.png tables go")
    return parser
