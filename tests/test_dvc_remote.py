"""Shared results through a DVC remote: `dvc push` from one clone, `dvc pull` into a fresh one.

The session's tiny DVC run (conftest.tiny_dvc_run: a git repository with the project's pipeline and
its default remote, .dvc/config: `shared`, the directory `../gram-dvc-remote` beside the checkout)
ran the tiny DAG with `dvc repro`, committed dvc.lock and pushed. A fresh `git clone` beside it pulls:
every model, embedding, evaluation, run and table comes back byte for byte, `dvc status` is clean and
`dvc repro` has nothing to do.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import GIT, dvc_outputs
from test_pipeline_parity import run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def published(tiny_dvc_run) -> tuple[Path, dict[str, bytes]]:
    """The repository that pushed, and its outputs as they were when pushed."""
    return tiny_dvc_run


def test_remote_is_the_directory_beside_the_checkout(published):
    src, _ = published
    remote = src.parent / "gram-dvc-remote"
    assert run(["dvc", "remote", "list"], src).split()[:2] == ["shared", str(remote)]
    assert (remote / "files/md5").is_dir() and any((remote / "files/md5").rglob("*"))


def test_pull_into_a_fresh_clone_restores_everything(published):
    src, want = published
    clone = src.parent / "clone"  # beside the checkout that pushed: the same default remote
    run([*GIT, "clone", "-q", str(src), str(clone)], src.parent)
    assert not (clone / "results").exists() and not (clone / "models").exists()
    run(["dvc", "pull"], clone)
    got = dvc_outputs(clone)
    assert any(k.startswith("models/tiny/meta/") for k in want) and "results/tiny/few_shot.md" in want
    assert any(k.startswith("data/tiny/embed/") for k in want) and any(k.startswith("results/tiny/eval/") for k in want)
    assert got.keys() == want.keys()
    assert [k for k in want if got[k] != want[k]] == []
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone)
    out = run(["dvc", "repro"], clone)
    assert "Data and pipelines are up to date" in out and "Running stage" not in out, out
    git_status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout
    assert git_status == "", git_status  # outputs are ignored by git; nothing to commit after the pull
