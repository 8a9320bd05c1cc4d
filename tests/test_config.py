"""params.yaml loading and validation: every profile loads, bad input names the key and the file.

The user's params.yaml holds emoji and paper; the test profiles are files of their own (tests/params/)."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml

from conftest import PARAMS_FILES, ROOT, TINY_PARAMS
from gram import config as C
from gram.schema import render


@pytest.fixture()
def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.mark.parametrize("profile", C.PROFILES)
def test_every_profile_loads(profile):
    params, prof = C.load(PARAMS_FILES[profile], profile)
    assert prof is getattr(params, profile)
    assert isinstance(prof.backbone, C.BackboneParams)


def test_params_files_hold_their_profiles():
    """The user's file defines emoji and paper only; each test file its own profile, `profile:` and `grid:`."""
    assert C.load(ROOT / "params.yaml")[0].defined() == ["emoji", "demo", "paper"]
    for profile in ("tiny", "paper_smoke"):
        raw = yaml.safe_load(PARAMS_FILES[profile].read_text())
        assert raw["profile"] == profile and "grid" in raw
        assert C.load(PARAMS_FILES[profile])[0].defined() == [profile]


def test_a_profile_missing_from_the_file_names_the_file(tmp_path):
    with pytest.raises(C.ConfigError, match=r"params\.yaml: profile 'tiny' is not defined in this file"):
        C.load(ROOT / "params.yaml", "tiny")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["profile"] = "tiny"
    with pytest.raises(C.ConfigError, match=r"params\.yaml: `profile: tiny` names a profile this file does not"):
        C.load(write(tmp_path, raw))
    with pytest.raises(C.ConfigError, match="'paper' is not defined"):
        C.load(PARAMS_FILES["tiny"])[0].active("paper")


def test_gram_methods_reuse_their_base_recipe():
    """A GRAM method is its base recipe (a YAML merge key) plus meta_init/meta_regulator: one edit of the
    base's lr changes every method built on it."""
    text = (ROOT / "params.yaml").read_text()
    for profile, anchor in (("emoji", "coop"), ("paper", "paper_coop")):
        assert f"coop+gram: {{<<: *{anchor}," in text
        raw = yaml.safe_load(text)
        methods = raw[profile]["methods"]
        for name, m in methods.items():
            if "+gram" in name:
                base = methods[name.split("+")[0]]
                assert {k: v for k, v in m.items() if k not in ("meta_init", "meta_regulator")} == base, name
    import io

    from ruamel.yaml import YAML

    rt = YAML()  # round-trip, as `dvc exp run -S emoji.methods.coop.lr=0.5` edits: the merged methods follow
    doc = rt.load(text)
    doc["emoji"]["methods"]["coop"]["lr"] = 0.5
    out = io.StringIO()
    rt.dump(doc, out)
    methods = yaml.safe_load(out.getvalue())["emoji"]["methods"]
    assert {n: m["lr"] for n, m in methods.items() if n.startswith("coop")} == \
        {n: 0.5 for n in methods if n.startswith("coop")}


def test_default_profile_is_emoji():
    params, prof = C.load(ROOT / "params.yaml")
    assert params.profile == "emoji" and prof is params.emoji
    assert prof.data.vendors.pretrain == ["google", "twitter", "joypixels"] and prof.data.vendors.heldout == ["apple", "fluent"]
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


@pytest.mark.parametrize("key", ["class_p", "hierarchy_p"])
def test_a_removed_key_says_why(tmp_path, raw, key):
    """Captions that named the classes made zero-shot supervised; an old params file is told so, not ignored."""
    raw["emoji"]["backbone"]["pretrain"]["caption"][key] = 0.0
    path = write(tmp_path, raw)
    with pytest.raises(C.ConfigError, match=rf"params\.yaml: `emoji\.backbone\.pretrain\.caption\.{key}` was "
                                            r"removed: .*zero-shot supervised; delete it"):
        C.load(path)


def test_wrong_type_names_key(tmp_path, raw):
    raw["emoji"]["backbone"]["pretrain"]["steps"] = "700"
    with pytest.raises(C.ConfigError, match=r"`emoji\.backbone\.pretrain\.steps` must be int, got '700'"):
        C.load(write(tmp_path, raw))


def test_bool_is_not_an_int(tmp_path):
    raw = yaml.safe_load(PARAMS_FILES["tiny"].read_text())
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


@pytest.mark.parametrize("path", sorted({str(p) for p in PARAMS_FILES.values()}))
def test_yaml_1_1_and_1_2_readers_agree(path):
    """Snakemake reads params.yaml with PyYAML (YAML 1.1), DVC with ruamel (YAML 1.2): merge keys too."""
    from ruamel.yaml import YAML

    text = open(path).read()
    assert yaml.safe_load(text) == YAML(typ="safe", pure=True).load(text)
    assert yaml.safe_load(text) == YAML(typ="safe", pure=False).load(text)


def test_schema_is_generated_from_config():
    committed = (ROOT / "workflow/schemas/params.schema.yaml").read_text()
    assert committed == render(), "run `gram schema` to regenerate workflow/schemas/params.schema.yaml"


def test_schema_accepts_params_and_rejects_what_the_loader_rejects(raw):
    schema = yaml.safe_load(render())
    jsonschema.validate(raw, schema)
    for path in PARAMS_FILES.values():
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
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
    return C.load(TINY_PARAMS, "tiny")[1]


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
     r"MetaParams: `reg_lambda` = 1\.0 > 0 applies to regulator\.form: mix only"),
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
    raw["emoji"]["meta"]["joint"]["regulator"] = {"form": "mix", "gate_context": True}
    with pytest.raises(C.ConfigError, match=r"params\.yaml: `emoji\.meta\.joint\.regulator`: gate_context applies"):
        C.load(write(tmp_path, raw))
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["emoji"]["methods"]["coop"]["steps"] = -2
    with pytest.raises(C.ConfigError, match=r"params\.yaml: `emoji\.methods\.coop\.steps` = -2 is below its minimum 0"):
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
