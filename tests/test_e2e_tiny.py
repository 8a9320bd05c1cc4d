"""End to end: the tiny profile's whole DAG through Snakemake and through DVC.

Each tool builds the zero-shot table from scratch in its own copy of the project; a second run has
nothing to do; changing one backbone parameter reruns the backbone and what depends on it, never the
download; and both tools produce the same table.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from test_pipeline_parity import copy_project, run

pytestmark = pytest.mark.slow


def bump_tiny_steps(params: Path) -> None:
    text = params.read_text()
    tiny = text.index("\ntiny:")
    head, tail = text[:tiny], text[tiny:]
    tail, n = re.subn(r"(\n      steps: )30\b", r"\g<1>31", tail, count=1)
    assert n == 1
    params.write_text(head + tail)


def jobs_snakemake_would_run(cwd: Path) -> set[str]:
    out = run(["snakemake", "-n", "--cores", "2", "--nocolor"], cwd)
    return set(re.findall(r"(?m)^rule (\w+):", out)) - {"all"}


@pytest.fixture(scope="module")
def snakemake_run(tmp_path_factory) -> Path:
    cwd = copy_project(tmp_path_factory.mktemp("smk"), "tiny")
    run(["snakemake", "--cores", "2", "--nocolor"], cwd)
    return cwd


@pytest.fixture(scope="module")
def dvc_run(tmp_path_factory) -> Path:
    cwd = copy_project(tmp_path_factory.mktemp("dvc"), "tiny")
    run(["dvc", "repro"], cwd)
    return cwd


def test_snakemake_builds_the_table(snakemake_run):
    md = (snakemake_run / "results/tiny/zero_shot.md").read_text()
    assert "## subgroup (9 classes" in md and "## group (3 classes" in md
    assert md.count("| zeroshot-ensemble |") == 2
    for f in ("zero_shot.csv", "zero_shot.json", "zero_shot.png", "backbone.png"):
        assert (snakemake_run / "results/tiny" / f).stat().st_size > 0
    assert (snakemake_run / "logs/tiny/backbone.log").read_text().count("pretrained 30 steps") == 1


def test_snakemake_second_run_does_nothing(snakemake_run):
    out = run(["snakemake", "-n", "--cores", "2", "--nocolor"], snakemake_run)
    assert "Nothing to be done" in out, out


def test_snakemake_backbone_param_reruns_only_its_dependants(snakemake_run):
    bump_tiny_steps(snakemake_run / "params.yaml")
    assert jobs_snakemake_would_run(snakemake_run) == {"backbone", "evaluate", "report"}


def test_dvc_builds_the_same_table(dvc_run, snakemake_run):
    for f in ("zero_shot.csv", "zero_shot.json"):
        assert (dvc_run / "results/tiny" / f).read_text() == (snakemake_run / "results/tiny" / f).read_text(), f

    def table(cwd: Path) -> str:  # the Markdown without the pretraining wall time
        return re.sub(r"in [0-9.]+ min", "", (cwd / "results/tiny/zero_shot.md").read_text())

    assert table(dvc_run) == table(snakemake_run)


def test_dvc_second_run_does_nothing(dvc_run):
    out = run(["dvc", "status"], dvc_run)
    assert "Data and pipelines are up to date" in out, out
    out = run(["dvc", "repro"], dvc_run)
    assert "didn't change, skipping" in out and "Running stage" not in out, out


def test_dvc_backbone_param_reruns_only_its_dependants(dvc_run):
    bump_tiny_steps(dvc_run / "params.yaml")
    out = run(["dvc", "repro"], dvc_run)
    ran = {s.split("@")[0] for s in re.findall(r"Running stage '([^']+)'", out)}
    assert ran == {"backbone", "evaluate", "report"}, out
    assert "Stage 'download' didn't change, skipping" in out
    assert "pretrained 31 steps" in (dvc_run / "logs/tiny/backbone.log").read_text()
