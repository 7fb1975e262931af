"""Checkpoints as safetensors: no pickle, written atomically, checked on load.

A Lightning checkpoint is a nested structure of tensors and plain values (loop counters, optimizer
hyper-parameters). Tensors go into the safetensors body; everything else into a JSON skeleton kept in
the file's metadata, with tags that preserve what JSON would lose (int dict keys, tuples). Loading a
file therefore never executes code. The file is written next to its destination and renamed over it
(`write_atomically`, which the run directory's files use too), so a process killed mid-save or a full
disk leaves the previous checkpoint intact and no partial file under a final name.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

SKELETON_KEY = "moe_prefix_skeleton"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, truncated, or made for another model."""


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    raise CheckpointError(f"cannot store a {type(obj).__name__} in a safetensors checkpoint: {obj!r}")


def _decode(obj: Any, tensors) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    return obj


def _os_error(err: SafetensorError, path: Path) -> OSError | None:
    """safetensors reports an I/O failure as text ("... No space left on device (os error 28)"): an OSError
    naming the file instead, so callers meet one kind of error for every file a run writes."""
    found = re.search(r"\(os error (\d+)\)", str(err))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """write(tmp) into a hidden file next to path, flush it to disk, then rename it over path.

    A failure (a full disk: ENOSPC) removes the hidden file and raises OSError naming path, which is left
    as it was: readers never see half a file under its final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except SafetensorError as err:
        os_error = _os_error(err, path)
        if os_error is None:
            raise
        raise os_error from err
    except OSError as err:
        if err.filename is None or str(err.filename) == str(tmp):  # name the caller's file, not the hidden one
            raise OSError(err.errno or errno.EIO, err.strerror or str(err), str(path)) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint_file(checkpoint: dict, path: str | Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_encode(checkpoint, tensors))
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata={SKELETON_KEY: skeleton}))


def load_checkpoint_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupted ({err}); resume from another checkpoint in its folder"
        ) from None
    if SKELETON_KEY not in metadata:
        raise CheckpointError(f"{path} is a safetensors file but not a moe_prefix training checkpoint")
    return _decode(json.loads(metadata[SKELETON_KEY]), tensors)


def checkpoint_step(path: str | Path) -> int | None:
    """The training step a checkpoint holds, read from its header (no tensor loads); None if unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            skeleton = json.loads((f.metadata() or {})[SKELETON_KEY])
    except Exception:  # any unreadable file: the caller only names the step when it can
        return None
    top = dict(pair for pair in skeleton.get("__dict__", []) if isinstance(pair[0], str))
    step = top.get("global_step")
    return step if isinstance(step, int) else None


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning's checkpoint plugin, storing checkpoints with the functions above."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        save_checkpoint_file(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint_file(path)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)


def check_compatible(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], saved_model: str, model: str):
    """Fail, naming both models, when saved weights do not fit the network they are loaded into."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    wrong = [k for k in set(saved) & set(expected) if tuple(saved[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        detail = []
        if wrong:
            k = sorted(wrong)[0]
            detail.append(f"{k} is {tuple(saved[k].shape)} in the file but {tuple(expected[k].shape)} here")
        if missing:
            detail.append(f"missing {missing[:3]}")
        if unexpected:
            detail.append(f"unexpected {unexpected[:3]}")
        raise CheckpointError(
            f"weights saved for backbone {saved_model!r} do not fit backbone {model!r}: " + "; ".join(detail)
        )
