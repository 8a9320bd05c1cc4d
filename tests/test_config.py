"""params.yaml loading and validation: every profile loads, bad input names the key and the file."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml

from conftest import ROOT
from gram import config as C
from gram.schema import render


@pytest.fixture()
def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.mark.parametrize("profile", C.PROFILES)
def test_every_profile_loads(profile):
    params, prof = C.load(ROOT / "params.yaml", profile)
    assert prof is getattr(params, profile)
    assert isinstance(prof.backbone, C.BackboneParams)


def test_default_profile_is_emoji():
    params, prof = C.load(ROOT / "params.yaml")
    assert params.profile == "emoji" and prof is params.emoji
    assert prof.data.vendors.pretrain == ["google", "twitter"]
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    lr = prof.backbone.pretrain.lr
    assert isinstance(lr, float) and lr == raw["emoji"]["backbone"]["pretrain"]["lr"]


def write(tmp_path, raw) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_unknown_key_names_key_and_file(tmp_path, raw):
    raw["emoji"]["backbone"]["pretrain"]["learning_rate"] = 0.1
    path = write(tmp_path, raw)
    with pytest.raises(C.ConfigError, match=r"params\.yaml: unknown key `emoji\.backbone\.pretrain\.learning_rate`"):
        C.load(path)


def test_wrong_type_names_key(tmp_path, raw):
    raw["emoji"]["backbone"]["pretrain"]["steps"] = "700"
    with pytest.raises(C.ConfigError, match=r"`emoji\.backbone\.pretrain\.steps` must be int, got '700'"):
        C.load(write(tmp_path, raw))


def test_bool_is_not_an_int(tmp_path, raw):
    raw["tiny"]["data"]["shard_size"] = True
    with pytest.raises(C.ConfigError, match=r"`tiny\.data\.shard_size` must be int"):
        C.load(write(tmp_path, raw))


def test_out_of_range_names_key(tmp_path, raw):
    raw["emoji"]["data"]["split"]["train"] = 1.5
    with pytest.raises(C.ConfigError, match=r"`emoji\.data\.split\.train` = 1\.5 is above its maximum 1\.0"):
        C.load(write(tmp_path, raw))


def test_literal_values(tmp_path, raw):
    raw["profile"] = "laptop"
    with pytest.raises(C.ConfigError, match=r"`profile` must be one of 'emoji', 'demo', 'paper', 'tiny'"):
        C.load(write(tmp_path, raw))


@pytest.mark.parametrize("edit, msg", [
    (lambda r: r["emoji"]["data"]["split"].update(train=0.6, val=0.4), "leaves no test split"),
    (lambda r: r["emoji"]["backbone"]["pretrain"]["vision"].update(heads=5), "not divisible by heads"),
    (lambda r: r["emoji"]["data"]["vendors"].update(heldout=["samsung"]), "'samsung'"),
    (lambda r: r["emoji"]["evaluate"].update(datasets=["flags"]), "'flags'"),
    (lambda r: r["paper"]["backbone"].update(model=None), "source: hub needs `model`"),
])
def test_cross_field_checks(tmp_path, raw, edit, msg):
    edit(raw)
    with pytest.raises(C.ConfigError, match=msg):
        C.load(write(tmp_path, raw))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(C.ConfigError, match="nope.yaml: cannot read"):
        C.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("profile: [emoji\n")
    with pytest.raises(C.ConfigError, match="bad.yaml: not valid YAML"):
        C.load(bad)


def test_yaml_1_1_and_1_2_readers_agree():
    """Snakemake reads params.yaml with PyYAML (YAML 1.1), DVC with ruamel (YAML 1.2)."""
    from ruamel.yaml import YAML

    text = (ROOT / "params.yaml").read_text()
    assert yaml.safe_load(text) == YAML(typ="safe", pure=True).load(text)


def test_schema_is_generated_from_config():
    committed = (ROOT / "workflow/schemas/params.schema.yaml").read_text()
    assert committed == render(), "run `gram schema` to regenerate workflow/schemas/params.schema.yaml"


def test_schema_accepts_params_and_rejects_what_the_loader_rejects(raw):
    schema = yaml.safe_load(render())
    jsonschema.validate(raw, schema)
    bad = copy.deepcopy(raw)
    bad["emoji"]["backbone"]["pretrain"]["steps"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(raw)
    bad["emoji"]["backbone"]["typo"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["grid"].update(tuned=["coop", "nope"]), r"`grid.tuned` names \['nope'\], which `emoji.methods`"),
    (lambda r: r["grid"].update(datasets=["nope"]), r"`grid.datasets` names \['nope'\], which `emoji.data.datasets`"),
    (lambda r: r["grid"]["transfer"].update(shots=3), r"`grid.transfer.shots` = 3 is not in grid.shots"),
    (lambda r: r["emoji"]["methods"]["coop"].update(lr="fast"), r"`emoji.methods.coop.lr` must be float"),
    (lambda r: r["emoji"]["protocols"].update(cross_dataset=["nope"]), r"protocols.cross_dataset names \['nope'\]"),
    (lambda r: r["emoji"]["protocols"].update(domain="nope"), r"protocols.domain names \['nope'\]"),
])
def test_grid_and_protocols_are_checked(tmp_path, edit, message):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(C.ConfigError, match=message) as e:
        C.load(path)
    assert str(path) in str(e.value)


# ---------------------------------------------------------------------------------------------
# sections check themselves when built in code (Section.__post_init__), not only when loaded


@pytest.fixture(scope="module")
def tiny() -> C.ProfileParams:
    return C.load(ROOT / "params.yaml", "tiny")[1]


@pytest.mark.parametrize("section, change, message", [
    (lambda p: p.meta["joint"], {"lr": -1}, r"MetaParams: `lr` = -1\.0 is below its minimum 0\.0"),
    (lambda p: p.meta["joint"], {"steps": "many"}, r"MetaParams: `steps` must be int, got 'many'"),
    (lambda p: p.methods["coop"], {"optimizer": "lbfgs"}, r"MethodParams: `optimizer` must be one of 'adam', 'sgd'"),
    (lambda p: p.data.split, {"train": True}, r"SplitParams: `train` must be float, got True"),
    (lambda p: p.cluster, {"ablations": ["image", "pixels"]}, r"`ablations\[1\]` must be one of"),
    (lambda p: p.backbone, {"pretrain": {"steps": 3}}, r"`pretrain` must be mapping"),
    (lambda p: p.tpt, {"keep": 0.001}, r"TptParams: keep = 0\.001 of views = \d+ keeps no view"),
    (lambda p: p.data.split, {"train": 0.7, "val": 0.3}, r"SplitParams: train \+ val = 1\.0 leaves no test split"),
    (lambda p: p.meta["joint"], {"reg_lambda": 1.0, "regulator": C.RegulatorParams(form="gate")},
     r"MetaParams: reg_lambda > 0 needs regulator.form: mix"),
])
def test_a_section_built_in_code_is_checked(tiny, section, change, message):
    """dataclasses.replace constructs the section anew: a bad value fails there, naming the field."""
    import dataclasses

    with pytest.raises(C.ConfigError, match=message) as e:
        dataclasses.replace(section(tiny), **change)
    assert e.value.key is not None and e.value.detail


def test_a_section_built_in_code_takes_what_the_file_takes(tiny):
    import dataclasses

    m = dataclasses.replace(tiny.meta["joint"], lr=1, steps=3)
    assert m.lr == 1.0 and type(m.lr) is float and m.steps == 3  # an int is a float, as in the file
    assert C.RegulatorParams() == C.section_from_dict(C.RegulatorParams, {}, "<test>")


def test_the_loader_names_file_and_full_key_of_a_section_error(tmp_path, raw):
    """The section raises with the key relative to itself; the loader adds the file and the dotted path."""
    raw["tiny"]["meta"]["joint"]["regulator"] = {"form": "mix", "gate_context": True}
    with pytest.raises(C.ConfigError, match=r"params\.yaml: `tiny\.meta\.joint\.regulator`: gate_context applies"):
        C.load(write(tmp_path, raw))
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tiny"]["methods"]["coop"]["steps"] = -2
    with pytest.raises(C.ConfigError, match=r"params\.yaml: `tiny\.methods\.coop\.steps` = -2 is below its minimum 0"):
        C.load(write(tmp_path, raw))
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["grid"]["gram"] = [{"method": "coop", "meta": 3}]
    with pytest.raises(C.ConfigError, match=r"params\.yaml: `grid\.gram\[0\]\.meta` must be str, got 3"):
        C.load(write(tmp_path, raw))


def test_cross_section_checks_stay_in_the_loader(tiny):
    """A profile naming a dataset another section lacks is a whole-file matter: constructing it is allowed."""
    import dataclasses

    odd = dataclasses.replace(tiny, evaluate=dataclasses.replace(tiny.evaluate, datasets=["nope"]))
    assert odd.evaluate.datasets == ["nope"]
    with pytest.raises(C.ConfigError, match=r"`tiny`: evaluate.datasets names \['nope'\]"):
        C.section_from_dict(C.ProfileParams, C.to_dict(odd), "<test>", "tiny")
