"""End to end: the tiny profile's whole DAG through Snakemake and through DVC.

Each tool builds the zero-shot table and the four protocol tables from scratch in its own copy of
the project (a smaller grid than the committed one, to stay fast); a second run has nothing to do;
changing one backbone parameter reruns the backbone and what depends on it, never the download;
changing one method's recipe reruns that method's runs and the report only; changing the task
sampler reruns only the tasks stage, the meta-training and the GRAM methods' runs (tuning and test-time);
and both tools produce the same tables, hierarchy, tasks, meta-learned θ and φ and test-time scores.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import dump_params_yaml, load_params_yaml
from test_pipeline_parity import copy_project, run

pytestmark = pytest.mark.slow

# 2 seeds (so std exists), 2 shot counts, three plain methods (text, joint text+visual, linear probe),
# one GRAM method over one meta-training recipe, and three test-time methods (words init, the few-shot
# CoOp prompt, GRAM's structure recipe)
GRID = {"methods": ["zeroshot", "zeroshot-ensemble"], "tuned": ["coop", "joint", "linear-probe"],
        "meta": ["coop", "coop-tpt"], "gram": [{"method": "coop+gram", "meta": "coop"}],
        "datasets": ["subgroup16"], "shots": [1, 2], "seeds": [1, 2], "base_to_new_shots": 2,
        "transfer": {"dataset": "subgroup16", "shots": 2},
        "tpt": {"datasets": ["subgroup16"], "words": ["tpt"], "tuned": [{"method": "tpt+coop", "prompt": "coop"}],
                "gram": [{"method": "tpt+gram", "meta": "coop-tpt"}]}}
TPT_METHODS = ["tpt", "tpt+coop", "tpt+gram"]
METHODS = GRID["tuned"] + [e["method"] for e in GRID["gram"]]
TUNED_JOBS = 4 * 2 * 2 + 4 * 2 + 2 * 4 * 2  # few-shot + base-to-new + transfer
TABLES = ["few_shot", "base_to_new", "cross_dataset", "domain_generalisation"]


def edit_tiny(params: Path, edit) -> None:
    """Apply `edit` to the `tiny:` section of params.yaml: load, edit the mapping, dump."""
    raw = load_params_yaml(params)
    edit(raw["tiny"])
    dump_params_yaml(params, raw)


def bump_tiny_steps(params: Path) -> None:
    def edit(tiny):
        assert tiny["backbone"]["pretrain"]["steps"] == 30
        tiny["backbone"]["pretrain"]["steps"] = 31

    edit_tiny(params, edit)


def bump_coop_lr(params: Path) -> None:
    def edit(tiny):
        assert tiny["methods"]["coop"]["lr"] == 2.0e-3
        tiny["methods"]["coop"]["lr"] = 3.0e-3

    edit_tiny(params, edit)


def set_tiny_task_seed(params: Path, seed: int) -> None:
    edit_tiny(params, lambda tiny: tiny["tasks"].update(seed=seed))


STRUCTURE = ["data/tiny/chc/hierarchy.safetensors", "data/tiny/chc/keys.txt", "data/tiny/tasks/tasks.safetensors",
             "data/tiny/tasks/tasks-same-cluster.safetensors", "data/tiny/prototypes/prototypes.safetensors",
             "results/tiny/clustering.csv", "models/tiny/meta/coop-tpt/meta.safetensors",
             "models/tiny/meta/coop/meta.safetensors"]


def jobs_snakemake_would_run(cwd: Path) -> set[str]:
    out = run(["snakemake", "-n", "--cores", "2", "--nocolor"], cwd)
    return set(re.findall(r"(?m)^rule (\w+):", out)) - {"all"}


def tune_jobs_snakemake_would_run(cwd: Path) -> set[str]:
    out = run(["snakemake", "-n", "-p", "--cores", "2", "--nocolor"], cwd)
    return set(re.findall(r"--protocol (\S+) --dataset \S+ --method (\S+)", out))


@pytest.fixture(scope="module")
def snakemake_run(tmp_path_factory) -> Path:
    cwd = copy_project(tmp_path_factory.mktemp("smk"), "tiny", GRID)
    run(["snakemake", "--cores", "2", "--nocolor"], cwd)
    return cwd


@pytest.fixture(scope="module")
def dvc_run(tmp_path_factory) -> Path:
    cwd = copy_project(tmp_path_factory.mktemp("dvc"), "tiny", GRID)
    run(["dvc", "repro"], cwd)
    return cwd


def test_snakemake_builds_the_table(snakemake_run):
    md = (snakemake_run / "results/tiny/zero_shot.md").read_text()
    assert "## subgroup (9 classes" in md and "## group (3 classes" in md
    assert md.count("| zeroshot-ensemble |") == 2
    for f in ("zero_shot.csv", "zero_shot.json", "zero_shot.png", "backbone.png"):
        assert (snakemake_run / "results/tiny" / f).stat().st_size > 0
    assert (snakemake_run / "logs/tiny/backbone.log").read_text().count("pretrained 30 steps") == 1
    assert len(list((snakemake_run / "results/tiny/runs").rglob("*.json"))) == TUNED_JOBS


def test_snakemake_builds_the_protocol_tables(snakemake_run):
    out = snakemake_run / "results/tiny"
    for name in TABLES:
        md = (out / f"{name}.md").read_text()
        for m in GRID["methods"] + METHODS:
            assert f"| {m} |" in md, (name, m)
    assert (out / "few_shot.png").stat().st_size > 0
    few = (out / "few_shot.csv").read_text().splitlines()
    assert len(few) == 1 + 4 * 2 + 2  # header, tuned methods x shots, one row per zero-shot method
    b2n = (out / "base_to_new.md").read_text()
    assert re.search(r"\| linear-probe \| [0-9.]+ ± [0-9.]+ \| – \| – \|", b2n), b2n
    import json

    summary = json.loads((out / "protocols.json").read_text())
    cell = summary["few-shot"]["subgroup16"]["coop"]["2"]
    assert cell["n"] == 2 and 0.0 <= cell["mean"] <= 1.0

def test_snakemake_builds_the_meta_training_structure(snakemake_run):
    assert sorted(p.name for p in (snakemake_run / "data/tiny/embed/facebook").iterdir()) == ["00000.safetensors",
                                                                                            "00001.safetensors"]
    for f in STRUCTURE:
        assert (snakemake_run / f).stat().st_size > 0, f
    md = (snakemake_run / "results/tiny/clustering.md").read_text()
    assert all(f"| {m} |" in md for m in ("cross-modal", "image", "text")), md
    md = (snakemake_run / "results/tiny/meta_training.md").read_text()
    assert re.search(r"\| coop \| coop \| tasks \| 4 \| [0-9.]+ → [0-9.]+ \|", md), md
    assert (snakemake_run / "results/tiny/meta_training.png").stat().st_size > 0


def test_snakemake_builds_the_test_time_table(snakemake_run):
    import json

    out = snakemake_run / "results/tiny"
    md = (out / "test_time.md").read_text()
    for label in TPT_METHODS + ["zero-shot (words), no test-time tuning", "few-shot coop (k=2), no test-time tuning",
                                "GRAM init (coop-tpt), no test-time tuning"]:
        assert re.search(rf"\| {re.escape(label)} \| [0-9.]+ ± [0-9.]+ \|", md), (label, md)
    assert (out / "test_time.png").stat().st_size > 0
    assert len((out / "test_time.csv").read_text().splitlines()) == 1 + (3 + 3) * 2  # (3 before + 3 after) x 2 seeds
    rec = json.loads((out / "tpt/subgroup16/tpt+coop/s2.json").read_text())
    assert rec["init"]["source"] == {**rec["init"]["source"], "method": "coop", "shots": 2, "seed": 2}


def test_snakemake_task_param_reruns_only_tasks_and_gram(snakemake_run):
    set_tiny_task_seed(snakemake_run / "params.yaml", 5)
    assert jobs_snakemake_would_run(snakemake_run) == {"tasks", "meta", "few_shot", "base_to_new", "transfer",
                                                       "report", "tpt", "tpt_report"}
    out = run(["snakemake", "-n", "-p", "--cores", "2", "--nocolor"], snakemake_run)
    assert set(re.findall(r"gram tpt .*--method (\S+)", out)) == {"tpt+gram"}
    assert {m for _, m in tune_jobs_snakemake_would_run(snakemake_run)} == {"coop+gram"}
    set_tiny_task_seed(snakemake_run / "params.yaml", 0)
    assert "Nothing to be done" in run(["snakemake", "-n", "--cores", "2", "--nocolor"], snakemake_run)


def test_snakemake_second_run_does_nothing(snakemake_run):
    out = run(["snakemake", "-n", "--cores", "2", "--nocolor"], snakemake_run)
    assert "Nothing to be done" in out, out


def test_snakemake_backbone_param_reruns_only_its_dependants(snakemake_run):
    bump_coop_lr(snakemake_run / "params.yaml")
    # the coop prompt is tpt+coop's init: its test-time jobs follow
    assert jobs_snakemake_would_run(snakemake_run) == {"few_shot", "base_to_new", "transfer", "report", "tpt",
                                                       "tpt_report"}
    assert {m for _, m in tune_jobs_snakemake_would_run(snakemake_run)} == {"coop"}
    out = run(["snakemake", "-n", "-p", "--cores", "2", "--nocolor"], snakemake_run)
    assert set(re.findall(r"gram tpt .*--method (\S+)", out)) == {"tpt+coop"}
    bump_tiny_steps(snakemake_run / "params.yaml")
    assert jobs_snakemake_would_run(snakemake_run) == {"backbone", "evaluate", "few_shot", "base_to_new",
                                                       "transfer", "report", "embed", "cluster", "tasks",
                                                       "prototypes", "meta", "tpt", "tpt_report"}


def test_dvc_builds_the_same_table(dvc_run, snakemake_run):
    for f in ["zero_shot.csv", "zero_shot.json", "protocols.json"] + [f"{t}.csv" for t in TABLES]:
        assert (dvc_run / "results/tiny" / f).read_text() == (snakemake_run / "results/tiny" / f).read_text(), f

    def table(cwd: Path) -> str:  # the Markdown without the pretraining wall time
        return re.sub(r"in [0-9.]+ min", "", (cwd / "results/tiny/zero_shot.md").read_text())

    assert table(dvc_run) == table(snakemake_run)
    for t in TABLES + ["clustering", "meta_training"]:
        assert (dvc_run / f"results/tiny/{t}.md").read_text() == (snakemake_run / f"results/tiny/{t}.md").read_text()
    for f in STRUCTURE[:-2]:  # embeddings, hierarchy, tasks and prototypes: byte for byte
        assert (dvc_run / f).read_bytes() == (snakemake_run / f).read_bytes(), f

    def test_time(cwd: Path) -> str:  # the table without the wall-time column
        return re.sub(r"\| [0-9.]+ \|\n", "|\n", (cwd / "results/tiny/test_time.md").read_text())

    assert test_time(dvc_run) == test_time(snakemake_run)
    # meta-learned θ and φ: the same metadata; values equal to float32 rounding (BLAS summation order can
    # differ between two processes, e.g. with the memory alignment of a buffer)
    from gram.tensorio import load_tensors

    (a, ma), (b, mb) = (load_tensors(cwd / STRUCTURE[-1]) for cwd in (dvc_run, snakemake_run))
    assert ma == mb and a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_dvc_second_run_does_nothing(dvc_run):
    out = run(["dvc", "status"], dvc_run)
    assert "Data and pipelines are up to date" in out, out
    out = run(["dvc", "repro"], dvc_run)
    assert "didn't change, skipping" in out and "Running stage" not in out, out


def test_dvc_backbone_param_reruns_only_its_dependants(dvc_run):
    bump_coop_lr(dvc_run / "params.yaml")
    out = run(["dvc", "repro"], dvc_run)
    ran = re.findall(r"Running stage '([^']+)'", out)
    assert {s.split("@")[0] for s in ran} == {"few-shot", "base-to-new", "transfer", "report", "tpt-tuned",
                                               "tpt-report"}, out
    assert all("-coop-" in s or s.endswith("-coop") or s in ("report", "tpt-report") or s.startswith("tpt-tuned@")
               for s in ran), ran
    bump_tiny_steps(dvc_run / "params.yaml")
    out = run(["dvc", "repro"], dvc_run)
    ran = {s.split("@")[0] for s in re.findall(r"Running stage '([^']+)'", out)}
    assert ran == {"backbone", "evaluate", "few-shot", "base-to-new", "transfer", "report", "embed", "cluster",
                   "tasks", "prototypes", "meta", "few-shot-gram", "base-to-new-gram", "transfer-gram", "tpt",
                   "tpt-tuned", "tpt-gram", "tpt-report"}, out
    assert "Stage 'download' didn't change, skipping" in out
    assert "pretrained 31 steps" in (dvc_run / "logs/tiny/backbone.log").read_text()
