"""Server checkpoints: written atomically after every round, read by ``fedprune simulate --resume``.

A checkpoint is one ``torch.save`` file holding everything the server needs to
continue a run from its last complete step: global weights, per-sub-network BN
statistics and gates, masks (per profile, and per partition where a client has
its own), the round records and consensus log so far, the index of the next
step of the run plan, and the RNG states of torch, numpy and ``random``.
Client state is not needed: clients rebuild their shards from the seed and ask
for the global model again if they lack it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

__all__ = ["CHECKPOINT_FILE", "CheckpointError", "save_checkpoint", "load_checkpoint", "rng_states", "restore_rng_states"]

#: File name of the checkpoint inside a run's output directory.
CHECKPOINT_FILE = "checkpoint.pt"
#: Bumped when the payload layout changes; older files are refused with a clear message.
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A run directory has no usable checkpoint."""


def save_checkpoint(out_dir: str | Path, payload: dict) -> Path:
    """Write ``payload`` to ``out_dir/checkpoint.pt`` atomically (temporary file, fsync, rename).

    A crash while writing leaves the previous checkpoint intact.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CHECKPOINT_FILE
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save({"format": FORMAT_VERSION, **payload}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


#: Keys every checkpoint holds (:meth:`fedprune.federated.FederatedPruning.checkpoint_payload`).
REQUIRED_KEYS = ("config", "mask_source", "steps_done", "plan", "state", "rounds", "model_version", "rng")


def load_checkpoint(out_dir: str | Path, purpose: str = "resume") -> dict:
    """Read the checkpoint of a run directory; :class:`CheckpointError` names what is wrong (``purpose``: what the
    caller wanted to do with it, for the message, e.g. "resume" or "warm-start")."""
    path = Path(out_dir) / CHECKPOINT_FILE
    if not Path(out_dir).is_dir():
        what = "is a file, not a run directory" if Path(out_dir).exists() else "does not exist"
        raise CheckpointError(f"cannot {purpose}: run directory {str(out_dir)!r} {what}")
    if not path.is_file():
        raise CheckpointError(f"cannot {purpose}: {str(path)!r} does not exist (the run wrote no complete round yet, or this is not a run directory)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise CheckpointError(f"cannot {purpose}: {str(path)!r} is not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"cannot {purpose}: {str(path)!r} has checkpoint format {payload.get('format') if isinstance(payload, dict) else '?'}; "
                              f"this version of fedprune reads format {FORMAT_VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"cannot {purpose}: {str(path)!r} is not a complete checkpoint (it lacks {', '.join(missing)})")
    return payload


def rng_states() -> dict:
    """RNG states of torch (CPU), numpy's global generator and ``random``."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
