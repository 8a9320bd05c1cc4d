"""Helpers shared by the benchmark scripts (run as `python benchmarks/<script>.py`, which puts this
folder on `sys.path`)."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo (else what `platform` knows)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_and_dtype(args) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of parsed `--device`, `--dtype` and `--threads` options: an error for CUDA
    without a GPU; float32 on the CPU whatever `--dtype` says (as `gram.backbone.load` does)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = args.dtype if device.type == "cuda" else "float32"
    if name != args.dtype:
        print(f"note: --dtype {args.dtype} ignored on the CPU; running float32", file=sys.stderr)
    return device, getattr(torch, name)
