"""Shared results through a DVC remote: `dvc push` from one clone, `dvc pull` into a fresh one.

A git repository with the project's pipeline and its default remote (.dvc/config: `shared`, the
directory `../gram-dvc-remote` beside the checkout) runs the tiny DAG with `dvc repro`, commits
dvc.lock and pushes. A fresh `git clone` beside it pulls: every model, embedding, evaluation, run and
table comes back byte for byte, `dvc status` is clean and `dvc repro` has nothing to do.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from test_pipeline_parity import copy_project, run
from test_slurm import GRID

pytestmark = pytest.mark.slow

GIT = ["git", "-c", "user.name=gram-test", "-c", "user.email=gram-test@example.org", "-c", "init.defaultBranch=main"]


def outputs(cwd: Path) -> dict[str, bytes]:
    """The contents of every output dvc.lock records (files, and the files under directories), by path."""
    lock = yaml.safe_load((cwd / "dvc.lock").read_text())
    paths = [cwd / o["path"] for st in lock["stages"].values() for o in st.get("outs", [])]
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))]
    return {str(f.relative_to(cwd)): f.read_bytes() for f in files if f.is_file()}


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """The tiny DAG run with DVC in a git repository, dvc.lock committed, outputs pushed to the remote."""
    src = copy_project(tmp_path_factory.mktemp("team") / "src", "tiny", GRID)
    shutil.rmtree(src / ".dvc")
    shutil.copy2(ROOT / ".gitignore", src / ".gitignore")
    run([*GIT, "init", "-q"], src)
    run(["dvc", "init", "-q"], src)
    shutil.copy2(ROOT / ".dvc/config", src / ".dvc/config")  # the project's default remote
    run([*GIT, "add", "-A"], src)
    run([*GIT, "commit", "-q", "-m", "pipeline"], src)
    run(["dvc", "repro"], src)
    run([*GIT, "add", "-A"], src)
    run([*GIT, "commit", "-q", "-m", "dvc.lock"], src)
    out = run(["dvc", "push"], src)
    assert "pushed" in out, out
    return src


def test_remote_is_the_directory_beside_the_checkout(published):
    remote = published.parent / "gram-dvc-remote"
    assert run(["dvc", "remote", "list"], published).split()[:2] == ["shared", str(remote)]
    assert (remote / "files/md5").is_dir() and any((remote / "files/md5").rglob("*"))


def test_pull_into_a_fresh_clone_restores_everything(published):
    clone = published.parent / "clone"
    run([*GIT, "clone", "-q", str(published), str(clone)], published.parent)
    assert not (clone / "results").exists() and not (clone / "models").exists()
    run(["dvc", "pull"], clone)
    got, want = outputs(clone), outputs(published)
    assert any(k.startswith("models/tiny/meta/") for k in want) and "results/tiny/few_shot.md" in want
    assert any(k.startswith("data/tiny/embed/") for k in want) and any(k.startswith("results/tiny/eval/") for k in want)
    assert got.keys() == want.keys()
    assert [k for k in want if got[k] != want[k]] == []
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone)
    out = run(["dvc", "repro"], clone)
    assert "Data and pipelines are up to date" in out and "Running stage" not in out, out
    git_status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout
    assert git_status == "", git_status  # outputs are ignored by git; nothing to commit after the pull
