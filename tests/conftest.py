"""Shared fixtures: synthetic emoji packages and a tiny CLIP saved the way the pipeline saves one."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub in tests
sys.path.insert(0, str(ROOT / "tests"))

import fake_npm  # noqa: E402


# The params file of each profile: the user's params.yaml holds emoji and paper, the test profiles
# are complete params files of their own (tests/params/), copied as params.yaml where a test runs the DAG.
PARAMS_FILES = {"emoji": ROOT / "params.yaml", "demo": ROOT / "params.yaml", "paper": ROOT / "params.yaml",
                "tiny": ROOT / "tests" / "params" / "tiny.yaml",
                "paper_smoke": ROOT / "tests" / "params" / "paper_smoke.yaml"}
TINY_PARAMS = str(PARAMS_FILES["tiny"])


def load_params_yaml(path: str | Path) -> dict:
    import yaml

    return yaml.safe_load(Path(path).read_text())


def dump_params_yaml(path: str | Path, raw: dict) -> None:
    """Write a params mapping as YAML (merge keys come out expanded; floats keep their exponent form)."""
    import yaml

    Path(path).write_text(yaml.safe_dump(raw, sort_keys=False, width=1000))


def params_with(tmp_path: Path, edit, profile: str = "emoji") -> str:
    """The params file of `profile` with `edit(raw_dict)` applied, written as tmp_path/params.yaml; its path."""
    raw = load_params_yaml(PARAMS_FILES[profile])
    edit(raw)
    path = tmp_path / "params.yaml"
    dump_params_yaml(path, raw)
    return str(path)


def use_params(dest: Path, profile: str, grid: dict | None = None, edit=None) -> Path:
    """Write `profile`'s params file as dest/params.yaml (a copy of the repository runs every `--params
    params.yaml` command unchanged) with `profile:` set to it. The top-level `grid:` becomes `grid`, or
    the profile's own grid when it has one (as the README says to switch to it); `edit(raw)` changes more.
    A file that needs no change is copied as it is (anchors and comments kept)."""
    src = PARAMS_FILES[profile]
    raw = load_params_yaml(src)
    own = raw[profile].get("grid")
    want = grid if grid is not None else own if own is not None else raw["grid"]
    path = dest / "params.yaml"
    if raw["profile"] == profile and raw["grid"] == want and edit is None:
        shutil.copy2(src, path)
        return path
    raw["profile"], raw["grid"] = profile, want
    if edit is not None:
        edit(raw)
    dump_params_yaml(path, raw)
    return path


@pytest.fixture(scope="session")
def fake_packages(tmp_path_factory) -> Path:
    """A raw/ directory holding the synthetic npm packages, as the download stage caches them."""
    raw = tmp_path_factory.mktemp("raw")
    for spec in ["emojibase-data@17.0.0", "emoji-datasource-google@16.0.0", "emoji-datasource-apple@16.0.0",
                 "emoji-datasource-facebook@16.0.0"]:
        fake_npm.pack(spec, raw)
    return raw


@pytest.fixture(scope="session")
def tiny_params():
    from gram import config as C

    params, prof = C.load(TINY_PARAMS, "tiny")
    return params, prof


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, fake_packages, tiny_params) -> Path:
    """The tiny profile's download stage output (synthetic emoji world)."""
    from gram.data import emoji

    out = tmp_path_factory.mktemp("data")
    shutil.copytree(fake_packages, out / "raw")
    emoji.run(tiny_params[1].data, out)
    return out


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP + BPE tokenizer + image processor config, saved with save_pretrained."""
    import dataclasses

    import torch
    from transformers import CLIPModel

    from gram import backbone as B
    from gram import config as C

    torch.manual_seed(0)
    p = dataclasses.replace(C.PretrainParams(), image_size=32, patch=8, vision=C.TowerParams(32, 2, 2, 64),
                            text=C.TowerParams(32, 2, 2, 64), context=16, projection=24, vocab_size=200)
    texts = [e["label"] + " " + " ".join(e["tags"]) for e in fake_npm.EMOJIS] + ["a emoji of the picture"]
    tok = B.train_tokenizer(texts, p.vocab_size, p.context)
    model = CLIPModel(B.small_config(p, len(tok)))
    out = tmp_path_factory.mktemp("clip")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    B.save_image_processor(out, p.image_size)
    return out


@pytest.fixture(scope="session")
def tiny_trained_dir(tmp_path_factory, tiny_data, tiny_params) -> Path:
    """The tiny profile's backbone stage output: a small CLIP pretrained on the synthetic world."""
    from gram import backbone as B

    out = tmp_path_factory.mktemp("trained") / "backbone"
    prof = tiny_params[1]
    B.run(prof.backbone, prof.data.vendors.pretrain, tiny_data, out)
    return out


# --------------------------------------------------------------------------------------------
# The tiny DAG, run once per test session by each tool: the end-to-end checks (test_e2e_tiny.py),
# the SLURM comparison and report (test_slurm.py) and the DVC remote (test_dvc_remote.py) all read
# these runs instead of building their own. Every job of a shared run computes on one thread: on two
# cores Snakemake runs two jobs at once (each job is mostly start-up: importing torch and
# transformers), and the local, DVC and SLURM runs of a job give the same bytes.
# --------------------------------------------------------------------------------------------
# 2 seeds (so std exists), 2 shot counts, three plain methods (text, joint text+visual, linear probe),
# one GRAM method over one meta-training recipe, and three test-time methods (words init, the few-shot
# CoOp prompt, GRAM's structure recipe)
TINY_GRID = {"methods": ["zeroshot", "zeroshot-ensemble"], "tuned": ["coop", "joint", "linear-probe"],
             "meta": ["coop", "coop-tpt"], "gram": [{"method": "coop+gram", "meta": "coop"}],
             "datasets": ["subgroup16"], "shots": [1, 2], "seeds": [1, 2], "base_to_new_shots": 2,
             "transfer": {"dataset": "subgroup16", "shots": 2},
             "tpt": {"datasets": ["subgroup16"], "words": ["tpt"], "tuned": [{"method": "tpt+coop", "prompt": "coop"}],
                     "gram": [{"method": "tpt+gram", "meta": "coop-tpt"}]}}
# every rule kind once, a subset of TINY_GRID's jobs (20): download, backbone, zero-shot, few-shot,
# base-to-new and transfer tuning of a plain and a GRAM method, the structure stages, meta-training,
# test-time tuning from words and from the few-shot prompt, and both reports. The DVC and SLURM runs
# use it; each of their jobs is compared with the same job of the Snakemake run over TINY_GRID.
SMALL_GRID = {"methods": ["zeroshot"], "tuned": ["coop"], "meta": ["coop"],
              "gram": [{"method": "coop+gram", "meta": "coop"}],
              "datasets": ["subgroup16"], "shots": [2], "seeds": [1], "base_to_new_shots": 2,
              "transfer": {"dataset": "subgroup16", "shots": 2},
              "tpt": {"datasets": ["subgroup16"], "words": ["tpt"], "tuned": [{"method": "tpt+coop", "prompt": "coop"}],
                      "gram": []}}
SMALL_JOBS = 20
# one thread per job (see above): `snakemake --max-threads 1`; under DVC, the variables Snakemake sets
ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
GIT = ["git", "-c", "user.name=gram-test", "-c", "user.email=gram-test@example.org", "-c", "init.defaultBranch=main"]
# the directories of per-job outputs (one file or folder per job) a run of the tiny DAG writes
JOB_OUTPUTS = ("results/tiny/eval", "results/tiny/runs", "results/tiny/tpt", "data/tiny/embed", "data/tiny/chc",
               "data/tiny/tasks", "data/tiny/prototypes", "models/tiny/prompts", "models/tiny/meta")


def dvc_outputs(cwd: Path) -> dict[str, bytes]:
    """The contents of every output dvc.lock records (files, and the files under directories), by path."""
    import yaml

    lock = yaml.safe_load((cwd / "dvc.lock").read_text())
    paths = [cwd / o["path"] for st in lock["stages"].values() for o in st.get("outs", [])]
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))]
    return {str(f.relative_to(cwd)): f.read_bytes() for f in files if f.is_file()}


def comparable(obj):
    """A job's JSON record without wall times (and rates or fractions derived from them) and without
    whether a cache served it (which of two jobs sharing a cache ran first), floats rounded to 5 decimals
    (BLAS summation order may differ between two processes in the last bits)."""
    if isinstance(obj, dict):
        skip = ("time", "seconds", "wait", "cached")
        return {k: comparable(v) for k, v in obj.items()
                if not (k.endswith("_s") or k.startswith("ms_") or any(w in k for w in skip))}
    if isinstance(obj, list):
        return [comparable(v) for v in obj]
    return round(obj, 5) if isinstance(obj, float) else obj


def assert_jobs_equal(cwd: Path, reference: Path) -> set[str]:
    """Every per-job output under JOB_OUTPUTS in `cwd` equals the same file in `reference` (a run over a
    grid holding these jobs): JSON records without wall times, tuned tensors to float32 rounding
    (summation order may differ between two processes, e.g. with a buffer's memory alignment), every
    other file (embeddings, hierarchy, tasks, prototypes) byte for byte. Returns the directories compared."""
    import json

    import torch

    from gram.tensorio import load_tensors

    compared = set()
    for top in JOB_OUTPUTS:
        # manifests record modification times: their directories' content is what is compared
        files = sorted(f for f in (cwd / top).rglob("*") if f.is_file() and not f.name.endswith(".manifest.json"))
        assert files, top
        for f in files:
            rel = f.relative_to(cwd)
            other = reference / rel
            assert other.is_file(), f"{rel}: in {cwd}, not in the reference run"
            if f.suffix == ".json":
                assert comparable(json.loads(f.read_text())) == comparable(json.loads(other.read_text())), rel
            elif f.suffix == ".safetensors" and top.startswith("models/"):
                (a, ma), (b, mb) = load_tensors(f), load_tensors(other)
                assert ma == mb and a.keys() == b.keys(), rel
                for k in a:
                    torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{rel}: {k}: {m}")
            elif f.suffix != ".png":
                assert f.read_bytes() == other.read_bytes(), rel
            compared.add(top.split("/")[-1])
    return compared


@pytest.fixture(scope="session")
def tiny_snakemake_run(tmp_path_factory) -> Path:
    """The tiny DAG over TINY_GRID, run by `snakemake --cores 2 --max-threads 1` in a copy of the project.

    Tests may dry-run with edited params but must restore params.yaml (see `edited_params`)."""
    from test_pipeline_parity import copy_project, run

    cwd = copy_project(tmp_path_factory.mktemp("smk"), "tiny", TINY_GRID)
    run(["snakemake", "--cores", "2", "--max-threads", "1", "--nocolor"], cwd)
    return cwd


@pytest.fixture(scope="session")
def tiny_dvc_run(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """The tiny DAG over SMALL_GRID, run by `dvc repro` (one thread per stage) in a git repository whose
    dvc.lock is committed and whose outputs are pushed to the project's default remote
    (`../gram-dvc-remote` beside it).

    Returns the repository and the outputs as published (later tests rerun stages in the repository)."""
    from test_pipeline_parity import copy_project, run

    src = copy_project(tmp_path_factory.mktemp("team") / "src", "tiny", SMALL_GRID)
    shutil.rmtree(src / ".dvc")
    shutil.copy2(ROOT / ".gitignore", src / ".gitignore")
    run([*GIT, "init", "-q"], src)
    run(["dvc", "init", "-q"], src)
    shutil.copy2(ROOT / ".dvc/config", src / ".dvc/config")  # the project's default remote
    run([*GIT, "add", "-A"], src)
    run([*GIT, "commit", "-q", "-m", "pipeline"], src)
    run(["dvc", "repro"], src, env=ONE_THREAD)
    run([*GIT, "add", "-A"], src)
    run([*GIT, "commit", "-q", "-m", "dvc.lock"], src)
    out = run(["dvc", "push"], src)
    assert "pushed" in out, out
    return src, dvc_outputs(src)


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected
def pytest_collection_modifyitems(session, config, items):
    """Start the SLURM run in the background when a test that reads it is selected (test_slurm.py)."""
    if config.option.collectonly or not any("slurm_run" in getattr(i, "fixturenames", ()) for i in items):
        return
    module = sys.modules.get("test_slurm")
    if module is not None:
        factory = getattr(config, "_tmp_path_factory", None)  # the session's tmp_path_factory (pytest's tmpdir plugin)
        module.Background.start(factory.mktemp("slurm") if factory else Path(tempfile.mkdtemp(prefix="gram-slurm-")))


def pytest_sessionfinish(session, exitstatus):
    module = sys.modules.get("test_slurm")
    if module is not None and module.Background.run is not None:
        module.Background.stop()


@contextlib.contextmanager
def edited_params(cwd: Path, edit):
    """params.yaml of a shared run with `edit(raw_dict)` applied, restored byte for byte afterwards."""
    import yaml

    path = cwd / "params.yaml"
    original = path.read_bytes()
    raw = yaml.safe_load(original)
    edit(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        yield path
    finally:
        path.write_bytes(original)
