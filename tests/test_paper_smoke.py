"""End to end: the paper profile's code path (paper_smoke) through Snakemake, on tiny fake data.

tests/fake_paper.py writes the real layouts: ImageNet with its four shifts (-A and -R holding 3 of
its 6 classes), Caltech101 and DTD with split_zhou JSONs, FGVCAircraft's list files, img2dataset-style
corpus shards and a tiny CLIP saved with save_pretrained. The paper_smoke profile is the paper profile
with small sizes (params.yaml): the download stage lists the datasets and resolves the corpus pattern,
the backbone stage loads the CLIP as it loads a hub model, and every protocol, GRAM meta-training and
test-time tuning run over them. This keeps the paper path from rotting: every table must come out
with the paper's datasets and shifts in it, ImageNet-A/-R scored among their own classes only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from test_pipeline_parity import copy_project, run

pytestmark = pytest.mark.slow

SHIFTS = ["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    cwd = copy_project(tmp_path_factory.mktemp("paper_smoke"), "paper_smoke")
    subprocess.run([sys.executable, str(ROOT / "tests" / "fake_paper.py"), "data/paper_smoke"], cwd=cwd, check=True,
                   capture_output=True)
    run(["snakemake", "--cores", "2", "--max-threads", "1", "--nocolor"], cwd, timeout=3000)  # two jobs at once
    return cwd


def grid(cwd: Path) -> dict:
    return yaml.safe_load((cwd / "params.yaml").read_text())["paper_smoke"]["grid"]


def test_download_describes_the_datasets_and_the_corpus(smoke):
    rec = json.loads((smoke / "data/paper_smoke/download.json").read_text())
    assert rec["datasets"]["imagenet"]["splits"] == {
        "default": {"train": 24, "test": 18}, "imagenet_v2": {"test": 12}, "imagenet_sketch": {"test": 12},
        "imagenet_a": {"test": 6}, "imagenet_r": {"test": 6}}
    assert rec["datasets"]["fgvc_aircraft"] == {"classes": 4, "splits": {"default": {"train": 16, "val": 4, "test": 12}}}
    assert rec["corpus"]["cc3m"]["shards"] == 3
    inet = json.loads((smoke / "data/paper_smoke/datasets/imagenet.json").read_text())
    assert inet["class_subsets"] == {"default": None, "imagenet_v2": None, "imagenet_sketch": None,
                                     "imagenet_a": [1, 3, 5], "imagenet_r": [0, 2, 4]}
    assert inet["base"] == [0, 1, 2] and inet["new"] == [3, 4, 5]
    embed = json.loads((smoke / "data/paper_smoke/embed/embed.json").read_text())
    assert embed["domains"]["cc3m"]["pairs"] == 120 and embed["domains"]["cc3m"]["skipped"]["total"] == 0


def test_zero_shot_scores_every_dataset_and_shift(smoke):
    out = smoke / "results/paper_smoke/eval/zeroshot"
    for ds in grid(smoke)["datasets"]:
        assert (out / ds / "default.json").is_file()
    for shift in SHIFTS:
        rec = json.loads((out / "imagenet" / f"{shift}.json").read_text())
        assert rec["n_classes"] == (3 if shift in ("imagenet_a", "imagenet_r") else 6), shift
        assert rec["n"] == (6 if shift in ("imagenet_a", "imagenet_r") else 12)
    table = (smoke / "results/paper_smoke/zero_shot.md").read_text()
    for name in ["imagenet", "caltech101", "fgvc_aircraft", "dtd", *SHIFTS]:
        assert name in table, name


def test_protocol_tables_name_the_paper_targets(smoke):
    g = grid(smoke)
    methods = g["tuned"] + [e["method"] for e in g["gram"]]
    few = (smoke / "results/paper_smoke/few_shot.md").read_text()
    for ds in g["datasets"]:
        assert ds in few
    dg = (smoke / "results/paper_smoke/domain_generalisation.md").read_text()
    cross = (smoke / "results/paper_smoke/cross_dataset.md").read_text()
    for shift in SHIFTS:
        assert shift in dg
    for target in ["caltech101", "fgvc_aircraft", "dtd"]:
        assert target in cross
    for m in methods:
        assert m in few and m in dg and m in cross, m
    # domain generalisation: a 6-way ImageNet prompt, restricted to -A's and -R's 3 classes there
    rec = json.loads((smoke / f"results/paper_smoke/runs/domain-generalisation/imagenet/coop/"
                              f"k{g['transfer']['shots']}-s{g['seeds'][0]}.json").read_text())
    by_target = {r["target"]: r for r in rec["results"]}
    assert set(by_target) == set(SHIFTS)
    assert {t: by_target[t]["n_classes"] for t in SHIFTS} == {"imagenet_v2": 6, "imagenet_sketch": 6,
                                                               "imagenet_a": 3, "imagenet_r": 3}
    # few-shot: k shots per class of ImageNet's train split, listed by their dataset-relative keys
    rec = json.loads((smoke / f"results/paper_smoke/runs/few-shot/imagenet/coop/k{g['shots'][-1]}-s{g['seeds'][0]}.json")
                     .read_text())
    assert rec["n_train"] == 6 * g["shots"][-1] and rec["subset_hash"]


def test_meta_training_and_test_time_ran_on_the_corpus(smoke):
    g = grid(smoke)
    for recipe in g["meta"]:
        meta = json.loads((smoke / f"models/paper_smoke/meta/{recipe}/meta.json").read_text())
        assert meta["recipe"] == recipe
    tt = (smoke / "results/paper_smoke/test_time.md").read_text()
    for ds in g["tpt"]["datasets"]:
        assert ds in tt
    rec = json.loads((smoke / f"results/paper_smoke/tpt/imagenet/tpt/s{g['seeds'][0]}.json").read_text())
    assert [d["domain"] for d in rec["domains"]] == ["default", *SHIFTS]
    assert [d["classes"] for d in rec["domains"]] == [6, 6, 6, 3, 3]
    rec = json.loads((smoke / f"results/paper_smoke/tpt/dtd/tpt/s{g['seeds'][0]}.json").read_text())
    assert rec["augment"] == "augmix"


def test_second_run_has_nothing_to_do(smoke):
    out = run(["snakemake", "-n", "--cores", "2", "--nocolor"], smoke)
    assert "Nothing to be done" in out, out[-2000:]
