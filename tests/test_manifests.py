"""Directory outputs are tracked by content: each stage writes `<dir>.manifest.json` (gram/io.py), a
declared output that downstream rules depend on, and Snakemake's parse (workflow/rules/common.smk)
removes a manifest that no longer matches its directory, so the stage that wrote it reruns."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from gram import io as IO
from gram import stages as S
from test_pipeline_parity import copy_project, run


def make_dir(root: Path) -> Path:
    d = root / "out"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(b"a" * 100)
    (d / "sub" / "b.json").write_text('{"b": 1}')
    return d


def test_manifest_lists_every_file_with_its_hash(tmp_path):
    d = make_dir(tmp_path)
    path = IO.write_manifest(d)
    assert path == tmp_path / "out.manifest.json"
    files = IO.read_json(path)["files"]
    assert sorted(files) == ["a.bin", "sub/b.json"]
    assert files["a.bin"]["size"] == 100 and len(files["a.bin"]["sha256"]) == 64
    assert IO.verify_manifest(path) is None


def test_verify_names_the_changed_file(tmp_path):
    d = make_dir(tmp_path)
    path = IO.write_manifest(d)
    os.utime(d / "a.bin", ns=(1, 1))  # touched only: hashed again, still the same
    (d / ".snakemake_timestamp").write_text("")  # Snakemake's own marker is not content
    assert IO.verify_manifest(path) is None
    (d / "a.bin").write_bytes(b"b" * 100)  # same size, other bytes
    assert IO.verify_manifest(path) == f"{d / 'a.bin'}: content changed (sha256)"
    (d / "a.bin").write_bytes(b"a" * 10)
    assert IO.verify_manifest(path) == f"{d / 'a.bin'}: size 100 -> 10"
    (d / "a.bin").write_bytes(b"a" * 100)
    (d / "sub" / "b.json").unlink()
    assert IO.verify_manifest(path) == f"{d / 'sub' / 'b.json'}: deleted"
    (d / "sub" / "b.json").write_text('{"b": 1}')
    (d / "c").write_text("")
    assert IO.verify_manifest(path) == f"{d / 'c'}: added"
    shutil.rmtree(d)
    assert IO.verify_manifest(path) == f"{d}: missing"


def test_stale_manifests_are_removed_with_a_warning(tmp_path, capsys):
    d = make_dir(tmp_path)
    kept = IO.write_manifest(make_dir(tmp_path / "other"))
    path = IO.write_manifest(d)
    (d / "a.bin").write_bytes(b"")
    assert IO.drop_stale_manifests(["*.manifest.json", "other/*.manifest.json"], tmp_path) == \
        [f"{d / 'a.bin'}: size 100 -> 0"]
    assert not path.exists() and kept.exists()
    assert "a.bin: size 100 -> 0: removed" in capsys.readouterr().err
    assert d.stat().st_mtime_ns > (d / "sub").stat().st_mtime_ns  # marked as changed (Snakemake reads the mtime)


def test_every_directory_output_has_a_manifest_in_both_tools():
    """dvc.yaml declares each directory output's manifest as an out; Snakemake rules output and read it."""
    import yaml

    from conftest import ROOT

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for st in S.STAGES:
        for p in st.outputs.values():
            if S.is_dir(p):
                fan = st.fans[0]
                assert S.dvc_template(S.manifest_of(p), fan) in stages[st.name + fan.suffix]["outs"]
                assert S.smk_outputs(st.name)[next(k for k, v in st.outputs.items() if v == p) + "_manifest"] \
                    == (S.manifest_of(p), False)
        for key, p in st.inputs.items():
            if S.is_dir(p):
                assert S.smk_inputs(st.name)[key + "_manifest"] == S.manifest_of(p)


# ---------------------------------------------------------------------------------------------------
# Snakemake, on the tiny profile's download and backbone stages

# the backbone's manifest as the target, as `rule all` asks for them: asking for a directory itself, Snakemake
# checks only that path (a job's missing output reruns it when that output is requested or needed downstream)
TARGET = "models/tiny/backbone.manifest.json"


def planned(cwd: Path, *targets: str) -> tuple[set[str], str]:
    out = run(["snakemake", "-n", "--cores", "2", "--nocolor", *(targets or [TARGET])], cwd)
    return set(re.findall(r"(?m)^rule (\w+):", out)), out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    cwd = copy_project(tmp_path_factory.mktemp("manifests"), "tiny")
    run(["snakemake", "--cores", "2", "--nocolor", TARGET], cwd)
    for d in ("data/tiny/shards", "data/tiny/datasets", "models/tiny/backbone"):
        assert IO.verify_manifest(cwd / f"{d}.manifest.json") is None, d
    return cwd


def damage_then_restore(cwd: Path, path: Path, damage, manifest: str, *targets: str) -> tuple[set[str], str]:
    """Apply `damage`, ask Snakemake what it would run, then put the file, the removed manifest and the
    directory's mtime back, as the stage left them."""
    saved = path.read_bytes()
    keep = cwd / "saved.manifest.json"
    shutil.copy2(cwd / manifest, keep)
    directory = cwd / manifest.removesuffix(IO.MANIFEST_SUFFIX)
    stamps = {p: p.stat().st_mtime_ns for p in (directory, directory / ".snakemake_timestamp") if p.exists()}
    damage(path)
    try:
        return planned(cwd, *targets)
    finally:
        path.write_bytes(saved)
        shutil.copy2(keep, cwd / manifest)
        for p, ns in stamps.items():  # the check marked the directory as changed: undo that too
            os.utime(p, ns=(ns, ns))
        assert "Nothing to be done" in planned(cwd, *targets)[1]


@pytest.mark.slow
def test_untouched_outputs_need_nothing(built):
    jobs, out = planned(built)
    assert not jobs and "Nothing to be done" in out, out


@pytest.mark.slow
def test_truncated_shard_reruns_the_download(built):
    shard = sorted((built / "data/tiny/shards").rglob("*.tar"))[0]
    jobs, out = damage_then_restore(built, shard, lambda p: p.write_bytes(p.read_bytes()[:100]),
                                    "data/tiny/shards.manifest.json")
    assert jobs == {"download", "backbone"}, out
    assert re.search(rf"gram: .*{re.escape(shard.name)}: size \d+ -> 100: removed", out), out


@pytest.mark.slow
def test_changed_backbone_weights_rerun_the_backbone_only(built):
    weights = built / "models/tiny/backbone/model.safetensors"
    jobs, out = damage_then_restore(built, weights, lambda p: p.write_bytes(bytes(len(p.read_bytes()))),
                                    "models/tiny/backbone.manifest.json")
    assert jobs == {"backbone"}, out
    assert "model.safetensors: content changed (sha256)" in out, out


@pytest.mark.slow
def test_deleted_split_file_reruns_the_download(built):
    split = sorted((built / "data/tiny/datasets").rglob("*.json"))[0]
    # the backbone reads the splits (it pretrains on train-split emojis only), so its target reaches them
    jobs, out = damage_then_restore(built, split, Path.unlink, "data/tiny/datasets.manifest.json")
    assert jobs == {"download", "backbone"}, out
    assert f"{split.name}: deleted" in out, out
