"""A stand-in for the `conda` command, so that tests can run Snakemake's conda code paths.

Our machines can neither install conda (or mamba, micromamba) nor reach its channels, so every
`snakemake --use-conda` stops at "Error running conda info". Before it would create an environment,
Snakemake only asks conda three questions; this script answers them and nothing else:

    conda --version                              conda 25.1.1   (Snakemake wants at least 24.7.1)
    conda info --json                            {"conda_prefix": PREFIX, "platform": "linux-64", ...}
    conda config --get channel_priority --json   {"get": {"channel_priority": "strict"}, ...}

That is enough for `snakemake --use-conda -n` and `snakemake --use-conda --list-conda-envs`, which
check that every rule's env file exists and say where its environment would go. Any other command
(`conda env create`, `conda run`, ...) exits 1 with a message, so a test that really needs an
environment fails loudly rather than passing on nothing. PREFIX is the parent of the directory the
`conda` wrapper lives in (nothing is ever read from it); the platform is the machine's.

Use `install(bin_dir)`: it writes an executable `bin_dir/conda` that runs this file with the current
interpreter; put `bin_dir` first on PATH of the Snakemake subprocess.
"""

from __future__ import annotations

import json
import os
import platform
import stat
import sys
from pathlib import Path

VERSION = "25.1.1"


def conda_platform() -> str:
    """The conda subdir of this machine (linux-64, linux-aarch64, osx-arm64, osx-64, win-64)."""
    system = {"Linux": "linux", "Darwin": "osx", "Windows": "win"}.get(platform.system(), "linux")
    machine = platform.machine().lower()
    arch = {"x86_64": "64", "amd64": "64", "arm64": "arm64" if system == "osx" else "aarch64",
            "aarch64": "aarch64"}.get(machine, "64")
    return f"{system}-{arch}"


def answer(argv: list[str], prefix: Path) -> tuple[int, str]:
    """(exit status, stdout) of `conda *argv`."""
    if argv == ["--version"]:
        return 0, f"conda {VERSION}"
    if argv == ["info", "--json"]:
        return 0, json.dumps({"conda_prefix": str(prefix), "root_prefix": str(prefix),
                              "conda_version": VERSION, "platform": conda_platform(),
                              "channels": [], "envs": []})
    if argv == ["config", "--get", "channel_priority", "--json"]:
        return 0, json.dumps({"get": {"channel_priority": "strict"}, "rc_path": None,
                              "success": True, "warnings": []})
    return 1, ""


def install(bin_dir: Path) -> Path:
    """Write an executable `bin_dir/conda` that runs this stand-in; returns its path."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "conda"
    exe.write_text(f'#!/bin/sh\nexport FAKE_CONDA_PREFIX="{bin_dir.resolve().parent}"\n'
                   f'exec "{sys.executable}" "{Path(__file__).resolve()}" "$@"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return exe


def main() -> int:
    argv = sys.argv[1:]
    prefix = Path(os.environ.get("FAKE_CONDA_PREFIX", Path.cwd()))
    status, out = answer(argv, prefix)
    if status:
        print(f"fake conda: `conda {' '.join(argv)}` is not answered here (no conda on this machine); "
              "only --version, info --json and config --get channel_priority --json are",
              file=sys.stderr)
    else:
        print(out)
    return status


if __name__ == "__main__":
    sys.exit(main())
