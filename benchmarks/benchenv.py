"""Helpers shared by the benchmark scripts (run as `python benchmarks/<script>.py`, which puts this
folder on `sys.path`)."""

from __future__ import annotations

import ctypes
import os
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


def base_environment(device: torch.device, dtype: torch.dtype | None = None) -> dict:
    """What every benchmark records about where it ran; each script adds its own libraries."""
    env = {"device": str(device), "device_name": device_name(device)}
    if dtype is not None:
        env["dtype"] = str(dtype).removeprefix("torch.")
    env.update(torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads(),
               cpu_count=os.cpu_count())
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
    return env


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _vm_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS: resident now; VmHWM: peak since the last reset)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak(device: torch.device) -> dict:
    """Hand freed heap back to the OS (glibc malloc_trim: otherwise blocks freed earlier hide a stage's
    growth) and restart the peak marks: peak RSS ("5" into /proc/self/clear_refs resets VmHWM) and, on
    CUDA, torch's peak allocation. Returns the mark `read_peak` completes."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False  # the peak is then that of the whole process so far
    rss = _vm_kib("VmRSS")
    return {"rss_before_gib": None if rss is None else round(rss / 1024 ** 2, 3), "peak_reset": reset}


def read_peak(device: torch.device, mark: dict) -> dict:
    """`mark` with the peak RSS (and, on CUDA, torch's peak allocation) since `reset_peak`, in GiB."""
    hwm = _vm_kib("VmHWM")
    out = dict(mark, peak_rss_gib=None if hwm is None else round(hwm / 1024 ** 2, 3))
    if device.type == "cuda":
        out["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)
    return out
