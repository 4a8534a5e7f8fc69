"""Checkpoints as safetensors (tensors) plus JSON (configuration), written atomically.

A checkpoint of step k is two files in the run's ``checkpoints/`` folder:

- ``step_{k:08d}.safetensors``: weights (``model.*``), EMA weights (``ema.*``), optimizer state
  (``optim.{param index}.{name}``) and RNG states (``rng.*``), no pickled objects;
- ``step_{k:08d}.json``: the full run config, the step, and the optimizer's hyperparameters.

Each file is written to a temporary name in the same folder and renamed into place; the JSON is
written last, so a checkpoint counts only once both exist. Nothing already saved is overwritten
(except a checkpoint of the same step, whose JSON is removed first so that a crash cannot pair
it with the new tensors). A refused write (disk full, quota, read-only) raises
``difflab.io.WriteError`` naming the file; the checkpoints already saved stay intact.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..io import LoadError, atomic_write, read_json, read_safetensors

CKPT_RE = re.compile(r"step_(\d{8})\.json$")


def write_json(path: Path, obj: Any) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    atomic_write(Path(path), write)


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into flat tensors and JSON-able hyperparameters."""
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value).clone()
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                   meta: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    # Checkpoints store state contiguous; give it back its parameter's layout (channels-last
    # weights), which a fused optimizer kernel, walking both in memory order, relies on.
    for group in opt.param_groups:
        for p in group["params"]:
            for name, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    opt.state[p][name] = torch.empty_like(p).copy_(v)


def save_checkpoint(folder: Path, step: int, tensors: dict[str, torch.Tensor],
                    meta: dict[str, Any]) -> Path:
    """Write ``step_{step}.safetensors`` then ``step_{step}.json``; returns the JSON path."""
    folder = Path(folder)
    stem = folder / f"step_{step:08d}"
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    stem.with_suffix(".json").unlink(missing_ok=True)  # never old JSON + new tensors
    atomic_write(stem.with_suffix(".safetensors"), lambda tmp: _save_tensors(tensors, tmp))
    try:
        write_json(stem.with_suffix(".json"), {**meta, "step": step})
    except BaseException:
        stem.with_suffix(".safetensors").unlink(missing_ok=True)  # no half checkpoint left
        raise
    return stem.with_suffix(".json")


def _save_tensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    """``save_file``, with its I/O failures as ``OSError`` (safetensors reports a full disk
    as ``SafetensorError("... I/O error: No space left on device (os error 28)")``)."""
    try:
        save_file(tensors, path)
    except SafetensorError as e:
        m = re.search(r"os error (\d+)", str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code)) from e


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints (JSON and safetensors both present), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.with_suffix(".safetensors").exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run folder, its ``checkpoints/`` folder, or a checkpoint's .json/.safetensors;
    return the checkpoint's JSON path (the latest one for folders)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.is_dir():
        folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        found = list_checkpoints(folder)
        if not found:
            raise FileNotFoundError(f"no complete checkpoint (step_*.json + .safetensors) "
                                    f"in {folder}")
        return found[-1]
    if p.suffix == ".safetensors":
        p = p.with_suffix(".json")
    if p.suffix != ".json" or not p.exists() or not p.with_suffix(".safetensors").exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (need both "
                                f"{p.with_suffix('.json').name} and "
                                f"{p.with_suffix('.safetensors').name})")
    return p


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (tensors, meta) of the checkpoint at ``path`` (see ``resolve_checkpoint``).

    Raises:
        LoadError: either file is cut short or corrupt (the message names it).
    """
    p = resolve_checkpoint(path)
    meta = read_checkpoint_meta(p)
    return read_safetensors(p.with_suffix(".safetensors")), meta


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """The JSON half of a checkpoint: an object with an integer ``step``, else a LoadError."""
    meta = read_json(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise LoadError(f"{path} is not a difflab checkpoint (a JSON object with its 'step')")
    return meta


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints (keep <= 0 keeps all)."""
    if keep <= 0:
        return
    for p in list_checkpoints(folder)[:-keep]:
        p.unlink(missing_ok=True)
        p.with_suffix(".safetensors").unlink(missing_ok=True)


def sub_dict(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Entries under ``prefix.`` with the prefix removed."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
