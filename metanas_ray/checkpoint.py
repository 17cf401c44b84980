"""Checkpoints: everything needed to continue a run bit-identically, in one ``torch.save`` file.

A checkpoint holds the meta-step count, the meta-parameters (w_meta, α_meta), the meta-optimizer state, the
metrics rows logged so far, the torch RNG state and the resolved config. It contains only tensors and plain
Python values and is always read with ``weights_only=True``. Writes are atomic (temporary file, then rename).
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import uuid
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FORMAT = 1
_NAME = re.compile(r"^step_(\d{7})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or not a metanas_ray checkpoint."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}.pt"


def step_of(path: str | Path) -> int:
    """The meta-step in a checkpoint's file name (``step_0000040.pt`` → 40), without reading the file."""
    return int(_NAME.match(Path(path).name).group(1))


def save(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:  # Python's open and write name the OS error (permissions, a full disk)
            torch.save({"format": FORMAT, **payload}, f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # objects beyond tensors and plain data: never in a checkpoint of ours
        raise CheckpointError(f"checkpoint {path} holds Python objects other than tensors and plain data, which a "
                              f"metanas_ray checkpoint never does; it was not loaded (it may not be safe to load: do "
                              f"not unpickle it)") from None
    except Exception as e:  # truncated or corrupt
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {first})") from None
    needed = ("format", "step", "state", "meta_optimizer", "metrics", "config")
    if not isinstance(payload, dict) or any(k not in payload for k in needed):
        raise CheckpointError(f"{path} is not a metanas_ray checkpoint (expected keys {', '.join(needed)})")
    if payload["format"] != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {payload['format']}, this version reads {FORMAT}")
    return payload


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoints in ``directory``, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _NAME.match(p.name))


def latest(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_latest(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint in ``directory`` that can be read, and its path (None: there is none). A newer one
    that cannot be read (a write cut short, a bad disk) is skipped with a warning naming it and why; when none can
    be read, the newest one's error is raised."""
    found = list_checkpoints(directory)
    first_error: CheckpointError | None = None
    for path in reversed(found):
        try:
            payload = load(path, map_location)
        except CheckpointError as e:
            log.warning("skipping %s: %s", path.name, e)
            first_error = first_error or e
            continue
        if first_error is not None:
            log.warning("resuming from %s, the newest readable checkpoint", path.name)
        return payload, path
    if first_error is not None:
        raise first_error
    return None


def prune(directory: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
