"""Bad inputs and outputs fail clearly, naming the file, key or value; outputs are byte-reproducible.

Damaged tensor files, a full disk, `--shots` out of range, a missing `--backbone` directory, split-file
paths that leave the image folder, `pipe:` shard addresses without the opt-in, unsafe method names, and
wall times kept out of the tables (and out of the embed stage's backbone fingerprint)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, TINY_PARAMS, params_with
from gram import backbone as B
from gram import cli
from gram import config as C
from gram import embed as E
from gram import io as gio
from gram import report as R
from gram.tensorio import DamagedFile, load_tensors, save_tensors

PARAMS = TINY_PARAMS


def truncate(path: Path) -> None:
    """Cut a file in half, as an interrupted copy or a full disk leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


# ------------------------------------------------------------------------------------------------
# 1. truncated or damaged safetensors files
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, rerun", [("tasks.safetensors", "rerun the tasks stage"),
                                         ("hierarchy.safetensors", "rerun the cluster stage"),
                                         ("prototypes.safetensors", "rerun the prototypes stage"),
                                         ("meta.safetensors", "rerun the meta stage"),
                                         ("00000.safetensors", "rerun the stage that writes it")])
def test_a_truncated_tensor_file_names_itself_and_its_stage(tmp_path, name, rerun):
    path = tmp_path / name
    save_tensors(path, {"x": torch.arange(1000.0)}, {"k": 1})
    assert load_tensors(path)[1] == {"k": 1}
    truncate(path)
    with pytest.raises(DamagedFile, match=re.escape(f"{path}: truncated or damaged safetensors file") + ".*" + rerun):
        load_tensors(path)
    path.write_bytes(b"")
    with pytest.raises(DamagedFile, match=re.escape(str(path))):
        load_tensors(path, [])


def test_a_damaged_meta_output_names_meta_safetensors(tmp_path):
    from gram.regulator import META, load_meta

    save_tensors(tmp_path / META, {"theta.ctx": torch.zeros(4, 8)}, {"config": {}})
    truncate(tmp_path / META)
    with pytest.raises(DamagedFile, match=re.escape(str(tmp_path / META)) + ".*rerun the meta stage"):
        load_meta(tmp_path)


def test_a_truncated_prompt_names_itself_and_the_few_shot_job(tmp_path):
    from gram.tensorio import load_prompt, save_prompt

    path = tmp_path / "prompt.safetensors"
    save_prompt(path, {"ctx": torch.randn(4, 16)}, {"dataset": "d"})
    assert load_prompt(path)[1] == {"dataset": "d"}
    truncate(path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: truncated or damaged") + ".*few-shot"):
        load_prompt(path)


def test_a_truncated_backbone_weight_file_names_it(tiny_clip_dir, tmp_path):
    model = tmp_path / "backbone"
    shutil.copytree(tiny_clip_dir, model)
    truncate(model / "model.safetensors")
    with pytest.raises(RuntimeError, match=re.escape(f"{model / 'model.safetensors'}: ") + ".*"
                                           + re.escape(f"Rerun the backbone stage (`gram backbone --out {model}`)")):
        B.load(model, "cpu")
    shutil.copy2(tiny_clip_dir / "model.safetensors", model / "model.safetensors")
    (model / "tokenizer.json").write_text('{"truncated": ')
    with pytest.raises(RuntimeError, match=re.escape(f"{model / 'tokenizer.json'}: ") + ".*Rerun the backbone stage"):
        B.load(model, "cpu")


def test_a_damaged_pretraining_checkpoint_is_ignored(tmp_path, caplog):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "state.json").write_text(json.dumps({"digest": "d", "step": 3}))
    (ckpt / "state.safetensors").write_bytes(b"\x10\x00")
    start, losses, perm = B._load_checkpoint(ckpt, None, None, "d", None, None)
    assert (start, losses, perm) == (0, [], [])
    assert f"{ckpt / 'state.safetensors'} is truncated or damaged" in caplog.text


# ------------------------------------------------------------------------------------------------
# 2. a full disk
# ------------------------------------------------------------------------------------------------
def no_space_after(n: int):
    """A stand-in for a write that fills the device after `n` bytes (the partial bytes stay on disk)."""
    def write(self, data, *args, **kwargs):
        with open(self, "w") as f:
            f.write(data[:n])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))
    return write


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_full_disk_names_the_output_and_keeps_the_old_one(tmp_path, monkeypatch):
    out = tmp_path / "table.md"
    gio.write_text(out, "old\n")
    monkeypatch.setattr(Path, "write_text", no_space_after(3))
    with pytest.raises(gio.DiskFull, match=re.escape(f"{out}: no space left on the device while writing it")) as e:
        gio.write_text(out, "a much longer new table\n")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(out)
    monkeypatch.undo()
    assert out.read_text() == "old\n" and leftovers(tmp_path) == []


def test_a_full_disk_while_writing_tensors_leaves_no_partial_file(tmp_path, monkeypatch):
    import safetensors.torch

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    out = tmp_path / "tasks.safetensors"
    with pytest.raises(OSError, match=re.escape(str(out))) as e:
        save_tensors(out, {"x": torch.zeros(3)})
    assert e.value.errno == errno.ENOSPC
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_full_disk_in_an_output_directory_names_the_file(tmp_path):
    out = tmp_path / "backbone"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(gio.DiskFull, match=re.escape(f"{out / 'model.safetensors'}: no space left")):
        with gio.atomic_dir(out) as tmp:
            (tmp / "config.json").write_text('{"new": 1}')
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "model.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone"]  # no temporary directory left
    assert (out / "config.json").read_text() == "{}"  # the old output stays whole


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_get_the_mode_of_the_umask_not_the_temporary_files(tmp_path, umask):
    """Atomic writes go through mkstemp/mkdtemp (0o600/0o700); the renamed output must be what a plain
    write or mkdir would have made, or a shared cluster's group could not read the results."""
    old = os.umask(umask)
    try:
        gio.write_text(tmp_path / "table.md", "x\n")
        save_tensors(tmp_path / "tasks.safetensors", {"x": torch.zeros(2)})
        with gio.atomic_dir(tmp_path / "backbone") as tmp:
            (tmp / "config.json").write_text("{}")
            (tmp / "sub").mkdir()
        fetched = gio.make_temp_dir(tmp_path, ".fetch-")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "table.md") == mode(tmp_path / "tasks.safetensors") == 0o666 & ~umask
    assert mode(tmp_path / "backbone") == mode(fetched) == 0o777 & ~umask
    assert mode(tmp_path / "backbone" / "config.json") == 0o666 & ~umask
    assert mode(tmp_path / "backbone" / "sub") == 0o777 & ~umask
    assert gio.creation_mode() == 0o666 & ~old and os.umask(old) == old  # the umask is read, not changed


def test_a_full_disk_is_one_line_from_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Path, "write_text", no_space_after(10))
    out = tmp_path / "schema.yaml"
    assert cli.main(["schema", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gram schema: error: ") and f"{out}: no space left" in err and "Traceback" not in err
    monkeypatch.undo()
    assert not out.exists() and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# 3. --shots
# ------------------------------------------------------------------------------------------------
def test_max_shots_is_the_largest_class():
    import numpy as np

    from gram.tune import max_shots

    labels = np.array([0, 0, 0, 1, 2, 2])
    assert max_shots(labels, [0, 1, 2]) == 3 and max_shots(labels, [1, 2]) == 2 and max_shots(labels, []) == 0


@pytest.mark.parametrize("protocol", ["few-shot", "base-to-new"])
def test_shots_outside_the_range_are_refused(tiny_data, tiny_params, tmp_path, protocol, capsys):
    from gram.data.datasets import load_dataset, split_index
    from gram.tune import max_shots

    params, prof = tiny_params
    ds = load_dataset(tiny_data, "subgroup16")
    ids = list(range(len(ds["classes"]))) if protocol == "few-shot" else ds["base"]
    most = max_shots(split_index(tiny_data, "subgroup16", prof.protocols.domain, "train").labels, ids)
    assert most >= 2
    missing = tmp_path / "no-backbone"  # the range is checked before the backbone loads
    for shots in (0, -2, most + 1):
        argv = ["tune", "--params", PARAMS, "--profile", "tiny", "--protocol", protocol, "--dataset", "subgroup16",
                "--method", "coop", "--shots", str(shots), "--seed", "1", "--data", str(tiny_data),
                "--backbone", str(missing), "--out", str(tmp_path / "r.json")]
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert f"--shots {shots} is outside the allowed range 1..{most}" in err, err
    argv[argv.index("--shots") + 1] = str(most)  # in range: the next error is the missing backbone
    assert cli.main(argv) == 1
    assert f"{missing}: backbone directory does not exist" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_transfer_protocols_refuse_shots_below_one(tiny_data, tiny_params, tmp_path):
    from gram import tune

    params, prof = tiny_params
    with pytest.raises(ValueError, match=r"--shots 0 is outside the allowed range \(at least 1\)"):
        tune.run(params, prof, "cross-dataset", "subgroup16", "coop", 0, 1, tiny_data, tmp_path, tmp_path / "r.json",
                 load_from=tmp_path / "p.safetensors")


# ------------------------------------------------------------------------------------------------
# 4. --backbone
# ------------------------------------------------------------------------------------------------
def test_a_missing_backbone_directory_says_so(tmp_path):
    for name in (tmp_path / "models" / "backbone", "models/tiny/backbone", "org/model"):
        with pytest.raises(FileNotFoundError, match=re.escape(f"{name}: backbone directory does not exist")) as e:
            B.load(name, "cpu")
        assert "hf download" not in str(e.value)
    (tmp_path / "file").write_text("")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        B.load(tmp_path / "file", "cpu", hub=True)


def test_only_a_hub_id_with_source_hub_gets_the_hub_advice(tmp_path):
    with pytest.raises(RuntimeError, match="hf download no-such-org/no-such-clip"):
        B.load("no-such-org/no-such-clip", "cpu", hub=True)
    for path in (tmp_path / "no-such-dir", "./no/such/dir", "../x"):  # paths, not hub ids
        with pytest.raises(FileNotFoundError, match="backbone directory does not exist"):
            B.load(path, "cpu", hub=True)
    assert B.looks_like_hub_id("openai/clip-vit-base-patch16") and B.looks_like_hub_id("clip")
    assert not any(map(B.looks_like_hub_id, ["/abs/dir", "a/b/c", "./x", "..", "a/../b"]))


# ------------------------------------------------------------------------------------------------
# 5. split-file paths
# ------------------------------------------------------------------------------------------------
@pytest.fixture()
def pets(tmp_path):
    from test_fewshot_data import build

    from gram.data.fewshot import SPECS

    root = build(tmp_path / "data", ["oxford_pets"])
    spec = SPECS["oxford_pets"]
    return root, root / spec.folder / spec.file, root / spec.folder / spec.images


def set_entry(split_file: Path, path: str, i: int = 1) -> None:
    doc = json.loads(split_file.read_text())
    doc["train"][i][0] = path
    split_file.write_text(json.dumps(doc))


@pytest.mark.parametrize("bad", ["../../secret.jpg", "c0/../../split_zhou_OxfordPets.json", "/etc/passwd"])
def test_split_entries_outside_the_image_folder_are_refused(pets, bad):
    from gram.data.fewshot import read

    root, split_file, _ = pets
    set_entry(split_file, bad)
    with pytest.raises(ValueError, match=re.escape(f"{split_file} [train]: entry 1 ({bad!r})")):
        read(root, "oxford_pets", "train", check_files=False)


def test_split_entries_inside_the_image_folder_are_kept(pets):
    from gram.data.fewshot import read

    root, split_file, images = pets
    first = read(root, "oxford_pets", "train")
    set_entry(split_file, str(images / first.paths[1]))  # absolute, but inside: made relative
    set_entry(split_file, f"c1/../{first.paths[2]}", 2)  # `..` that stays inside
    again = read(root, "oxford_pets", "train")
    assert again.paths[1] == first.paths[1] and again.keys[1] == first.keys[1]
    assert again.paths[2] == f"c1/../{first.paths[2]}"


def test_aircraft_list_entries_outside_the_image_folder_are_refused(tmp_path):
    from test_fewshot_data import build

    from gram.data.fewshot import SPECS, read

    root = build(tmp_path / "data", ["fgvc_aircraft"])
    spec = SPECS["fgvc_aircraft"]
    listing = root / spec.folder / spec.splits["train"]
    listing.write_text("../../x 707-320\n" + listing.read_text())
    with pytest.raises(ValueError, match=re.escape(f"{listing}: entry 0 ('../../x.jpg') climbs out")):
        read(root, "fgvc_aircraft", "train", check_files=False)


# ------------------------------------------------------------------------------------------------
# 6. pipe: shard addresses
# ------------------------------------------------------------------------------------------------
def test_pipe_addresses_need_the_opt_in(tmp_path):
    from gram.data.paper import corpus_manifest
    from gram.data.shards import corpus_shards, expand_shards

    assert C.PaperDataParams().allow_pipe is False
    spec = "pipe:cat /data/{00000..00001}.tar"
    with pytest.raises(ValueError, match=re.escape(f"{spec}: shard address 'pipe:cat /data/00000.tar' runs a command")
                       + r".*data\.paper\.allow_pipe"):
        expand_shards(spec)
    assert expand_shards(spec, allow_pipe=True) == ["pipe:cat /data/00000.tar", "pipe:cat /data/00001.tar"]
    assert expand_shards("s3://bucket/{00000..00001}.tar") == ["s3://bucket/00000.tar", "s3://bucket/00001.tar"]

    with pytest.raises(ValueError, match=r"data\.paper\.corpus\.cc3m: shard address 'pipe:cat /data/00000.tar'.*"
                                         r"data\.paper\.allow_pipe"):
        corpus_manifest("cc3m", spec)
    assert len(corpus_manifest("cc3m", spec, allow_pipe=True)["shards"]) == 2

    manifest = tmp_path / "shards" / "cc3m.json"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"spec": "x", "shards": [{"url": "https://h/0.tar"}, {"url": "pipe:rm -rf ~"}]}))
    with pytest.raises(ValueError, match=re.escape(f"{manifest}: shard address 'pipe:rm -rf ~'")
                       + r".*data\.paper\.allow_pipe is true"):
        corpus_shards(tmp_path, "cc3m")
    assert corpus_shards(tmp_path, "cc3m", allow_pipe=True)[1] == "pipe:rm -rf ~"


def test_the_embed_stage_refuses_a_pipe_manifest(tmp_path, tiny_clip_dir, capsys):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "facebook.json").write_text(json.dumps({"shards": [{"url": "pipe:touch pwned.tar"}]}))
    argv = ["embed", "--params", PARAMS, "--profile", "tiny", "--data", str(tmp_path), "--backbone",
            str(tiny_clip_dir), "--out", str(tmp_path / "embed")]
    assert cli.main(argv) == 1
    assert "pipe:touch pwned.tar" in capsys.readouterr().err and not Path("pwned.tar").exists()


# ------------------------------------------------------------------------------------------------
# 7. method names
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where, key", [("methods", "tiny.methods.co op"), ("meta", "tiny.meta.../x"),
                                        ("tpt", "tiny.tpt.methods.tpt;rm")])
def test_unsafe_method_names_are_refused(tmp_path, where, key):
    name = key.rsplit(".", 1)[1] if where != "meta" else "../x"

    def edit(raw):
        section = raw["tiny"]["tpt"]["methods"] if where == "tpt" else raw["tiny"][where]
        section[name] = next(iter(section.values()))

    path = params_with(tmp_path, edit, profile="tiny")
    with pytest.raises(C.ConfigError, match=re.escape(f"`{key}` names method {name!r}: a method name must be letters")):
        C.load(path, "tiny")


def test_unsafe_names_in_the_grid_are_refused(tmp_path):
    path = params_with(tmp_path, lambda raw: raw["grid"]["tuned"].insert(0, "coop/../x"), profile="tiny")
    with pytest.raises(C.ConfigError, match=re.escape("`grid.tuned[0]` names method 'coop/../x'")):
        C.load(path)
    ok = C.load(PARAMS, "tiny")[1]
    assert all(C.METHOD_NAME.fullmatch(n) for n in [*ok.methods, *ok.meta, *ok.tpt.methods])


# ------------------------------------------------------------------------------------------------
# 8. byte-reproducible outputs
# ------------------------------------------------------------------------------------------------
def test_the_embed_fingerprint_ignores_pretraining_times_but_not_weights(tiny_clip_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, seconds in ((a, 12.5), (b, 99.0)):
        shutil.copytree(tiny_clip_dir, d)
        (d / B.PRETRAIN_LOG).write_text(json.dumps({"source": "pretrain", "seconds": seconds,
                                                    "seconds_per_step": seconds / 10}))
    assert B.backbone_fingerprint(a) == B.backbone_fingerprint(b)
    weights = bytearray((b / "model.safetensors").read_bytes())
    weights[-1] ^= 1  # one bit of one weight
    (b / "model.safetensors").write_bytes(bytes(weights))
    assert B.backbone_fingerprint(a) != B.backbone_fingerprint(b)
    shutil.copy2(a / "model.safetensors", b / "model.safetensors")
    (b / "tokenizer.json").write_text((b / "tokenizer.json").read_text().replace('"<unk>"', '"<UNK>"'))
    assert B.backbone_fingerprint(a) != B.backbone_fingerprint(b)


def test_the_zero_shot_table_has_no_wall_time(tiny_data, tiny_params, tiny_clip_dir, tmp_path):
    from gram import evaluate

    params, prof = tiny_params
    for m in params.grid.methods:
        evaluate.run(prof.evaluate, m, tiny_data, tiny_clip_dir, tmp_path / "eval" / m, device="cpu")
    outs = []
    for i, seconds in enumerate((61.0, 7322.5)):
        bb = tmp_path / f"bb{i}"
        bb.mkdir()
        (bb / B.PRETRAIN_LOG).write_text(json.dumps({"source": "pretrain", "parameters": 1.5e6, "steps": 30,
                                                     "seconds": seconds, "loss": [2.0, 1.25]}))
        R.run(params, "tiny", tmp_path / "eval", bb, tmp_path / f"out{i}")
        outs.append(tmp_path / f"out{i}")
        assert (outs[-1] / R.TIMINGS).read_text() == f"stage,item,seconds\nbackbone,pretrain,{seconds}\n"
    md = (outs[0] / "zero_shot.md").read_text()
    assert "30 steps, final loss 1.250" in md and " min" not in md
    for f in ("zero_shot.md", "zero_shot.csv", "zero_shot.json"):
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f


def tpt_records(root: Path, params, prof, tune_s: float) -> None:
    """Test-time records of every (dataset, method, seed) of grid.tpt, as `gram tpt` writes them."""
    g = params.grid
    for ds in g.tpt.datasets:
        for k, m in enumerate(g.tpt.methods()):
            for s in g.seeds:
                doms = [{"domain": d, "n": 10, "time": {"views_s": 1.0, "encode_s": 1.0, "tune_s": tune_s},
                         "before": {"accuracy": 0.1 * k, "balanced_accuracy": 0.2},
                         "after": {"accuracy": 0.3, "balanced_accuracy": 0.01 * (s + k)}} for d in prof.tpt.domains]
                gio.write_json(root / ds / m / f"s{s}.json", {"init": {"init": "words"}, "meta": None,
                                                              "domains": doms, "wall_time_s": 3 * tune_s})


def test_the_test_time_table_has_no_wall_time(tiny_params, tmp_path):
    params, prof = tiny_params
    outs = []
    for i, tune_s in enumerate((0.5, 4.25)):
        tpt_records(tmp_path / f"tpt{i}", params, prof, tune_s)
        R.test_time(params, "tiny", tmp_path / f"tpt{i}", tmp_path / f"out{i}")
        outs.append(tmp_path / f"out{i}")
        timing = (outs[-1] / R.TPT_TIMINGS).read_text().splitlines()
        assert timing[0] == "dataset,method,seed,domain,n,tune_s,tune_ms_per_image"
        assert timing[1] == f"subgroup16,tpt,1,apple,10,{tune_s},{round(100 * tune_s, 3)}"
        assert len(timing) == 1 + len(params.grid.tpt.methods()) * len(params.grid.seeds) * len(prof.tpt.domains)
    md = (outs[0] / "test_time.md").read_text()
    assert "ms/image" not in md and "| mean |" in md
    for f in ("test_time.md", "test_time.csv"):
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f
    assert "tune_ms_per_image" not in (outs[0] / "test_time.csv").read_text()


def test_the_report_stages_declare_the_timings():
    from gram import stages as S

    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage, name in (("report", R.TIMINGS), ("tpt-report", R.TPT_TIMINGS)):
        assert f"results/{{profile}}/{name}" in S.stage(stage).outputs.values()
        assert f"results/${{profile}}/{name}" in dvc[stage]["outs"]


def test_the_test_time_table_marks_the_meta_training_domain(tmp_path):
    """A test-time domain that meta-training read is labelled so, with a note on the GRAM rows."""
    from gram import config as C

    def edit(raw):
        raw["tiny"]["tpt"]["domains"] = ["apple", "facebook"]  # facebook: the tiny profile's meta vendor

    params, prof = C.load(params_with(tmp_path, edit, profile="tiny"), "tiny")
    tpt_records(tmp_path / "tpt", params, prof, 1.0)
    R.test_time(params, "tiny", tmp_path / "tpt", tmp_path / "out")
    md = (tmp_path / "out" / "test_time.md").read_text()
    assert "| | apple (held out) | facebook (meta-train) | mean |" in md
    assert "Meta-training read the image-text pairs of `facebook` (no class labels)" in md
    # after tuning, seeds 1, 2, 3 score 1, 2, 3 % in each domain: the sample std over seeds (1.0), as in the
    # protocol tables (the population std would read 0.8)
    assert "| tpt | 2.0 ± 1.0 | 2.0 ± 1.0 | **2.0** ± 1.0 |" in md, md
