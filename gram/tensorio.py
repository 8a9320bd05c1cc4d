"""Tensor files: safetensors written atomically with one JSON metadata entry. [ours]

safetensors writes several metadata entries in a random order, so a file with two or more is not
byte-reproducible; one sorted JSON entry (`gram`) makes the same content give the same bytes (stable
DVC and Snakemake hashes, byte-equal reruns). Used by the embed, cluster, tasks and prototypes stages.
"""

from __future__ import annotations

import json
from pathlib import Path

from gram.io import atomic_path


def save_tensors(path: str | Path, tensors: dict, meta: dict | None = None) -> None:
    """Write `tensors` (name -> torch.Tensor) as safetensors, atomically, with `meta` as one JSON entry.

    One entry with sorted keys, because safetensors writes several metadata entries in a random order:
    the same content then gives the same bytes (stable DVC/Snakemake hashes, byte-equal reruns)."""
    from safetensors.torch import save_file

    blob = {"gram": json.dumps(meta or {}, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=blob)


class DamagedFile(ValueError):
    """A tensor file that safetensors cannot read: truncated (an interrupted copy, a full disk) or damaged."""


def writer_of(path: Path) -> str:
    """What to rerun for a damaged tensor file, from its fixed name (see each stage module's docstring)."""
    name = path.name
    if name == "state.safetensors":
        return f"delete the checkpoint folder {path.parent} (the stage then starts afresh)"
    for prefix, stage in (("meta.", "meta"), ("hierarchy", "cluster"), ("tasks", "tasks"),
                          ("prototypes.", "prototypes")):
        if name.startswith(prefix):
            return f"rerun the {stage} stage (`gram {stage}`), which writes it"
    return "rerun the stage that writes it"


def damaged(path: Path, e: Exception, rerun: str | None = None) -> DamagedFile:
    """The error for a safetensors file that does not open: names it, says why and what to rerun."""
    return DamagedFile(f"{path}: truncated or damaged safetensors file ({e}); {rerun or writer_of(path)}")


def load_tensors(path: str | Path, names: list[str] | None = None, rerun: str | None = None) -> tuple[dict, dict]:
    """(tensors, meta) of a file written by `save_tensors`; `names` picks tensors ([]: metadata only).

    Raises:
        FileNotFoundError or DamagedFile (a ValueError) naming `path`; `rerun` says what to rerun for a
        damaged file (default: `writer_of(path)`)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (did the stage that writes it run?)")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            if "gram" not in raw:
                raise ValueError(f"{path}: not a gram tensor file (no `gram` entry in its metadata)")
            keys = list(f.keys()) if names is None else names
            return {k: f.get_tensor(k) for k in keys}, json.loads(raw["gram"])
    except SafetensorError as e:
        raise damaged(path, e, rerun) from None


def save_prompt(path: str | Path, theta: dict, meta: dict) -> None:
    """Write a tuned θ (name -> tensor, on any device) and its record (method, dataset, class ids, ...)."""
    save_tensors(path, {k: v.detach().cpu() for k, v in theta.items()}, meta)


def load_prompt(path: str | Path) -> tuple[dict, dict]:
    """(θ, record) of a prompt written by `save_prompt`; the error for a missing file says who writes it."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no tuned prompt here (the few-shot job of grid.transfer writes it)")
    return load_tensors(path, rerun="rerun the few-shot job of grid.transfer that writes it "
                                    "(`gram tune --protocol few-shot … --save-prompt`)")


def save_theta(path: str | Path, theta: dict, phi: dict, meta: dict) -> None:
    """Write prompt parameters θ and regulator parameters φ (float32, on the CPU) as `theta.<name>` and
    `phi.<name>` tensors of one file, with `meta`."""
    tensors = {**{f"theta.{n}": v.detach().float().cpu() for n, v in theta.items()},
               **{f"phi.{n}": v.detach().float().cpu() for n, v in phi.items()}}
    save_tensors(path, tensors, meta)


def load_theta(path: str | Path) -> tuple[dict, dict, dict]:
    """(θ, φ, meta) of a file written by `save_theta`."""
    tensors, meta = load_tensors(path)
    theta = {n[len("theta."):]: v for n, v in tensors.items() if n.startswith("theta.")}
    phi = {n[len("phi."):]: v for n, v in tensors.items() if n.startswith("phi.")}
    return theta, phi, meta
