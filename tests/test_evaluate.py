"""Zero-shot evaluation and the report, on the synthetic emoji world with a tiny CLIP."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from gram import evaluate as E
from gram import report as R


def test_scores_against_a_hand_computation():
    labels = np.array([0, 0, 0, 1, 2, 2])
    pred = np.array([0, 1, 0, 1, 0, 2])
    s = E.scores(pred, labels, 4)  # class 3 is absent from the split
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["per_class_accuracy"] == [pytest.approx(2 / 3), 1.0, 0.5, None]
    assert s["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0.5) / 3)
    assert s["majority_accuracy"] == pytest.approx(3 / 6)
    assert s["n_classes"] == 3 and s["chance_balanced_accuracy"] == pytest.approx(1 / 3)


def test_zero_shot_writes_one_json_per_dataset_and_domain(tiny_data, tiny_clip_dir, tiny_params, tmp_path):
    cfg = tiny_params[1].evaluate
    E.run(cfg, "zeroshot", tiny_data, tiny_clip_dir, tmp_path / "zs", device="cpu")
    files = sorted(p.relative_to(tmp_path / "zs").as_posix() for p in (tmp_path / "zs").rglob("*.json"))
    assert files == ["group/apple.json", "group/google.json", "subgroup/apple.json", "subgroup/google.json"]
    r = json.loads((tmp_path / "zs" / "subgroup" / "apple.json").read_text())
    assert r["method"] == "zeroshot" and r["split"] == "test" and r["n_classes"] == 9
    assert len(r["per_class_accuracy"]) == 9 and 0 <= r["balanced_accuracy"] <= 1
    assert r["config"]["templates"] == [cfg.template]


def test_ensemble_of_one_template_equals_the_single_template(tiny_data, tiny_clip_dir, tiny_params, tmp_path):
    cfg = dataclasses.replace(tiny_params[1].evaluate, ensemble=[tiny_params[1].evaluate.template])
    a = E.run(cfg, "zeroshot", tiny_data, tiny_clip_dir, tmp_path / "a", device="cpu")
    b = E.run(cfg, "zeroshot-ensemble", tiny_data, tiny_clip_dir, tmp_path / "b", device="cpu")
    for x, y in zip(a, b):
        assert x["per_class_accuracy"] == y["per_class_accuracy"] and x["accuracy"] == y["accuracy"]


def test_class_features_are_the_normalised_template_mean(tiny_clip_dir):
    import torch

    from gram.backbone import load

    bb = load(tiny_clip_dir, "cpu")
    w = E.class_text_features(bb, ["circle", "ring"], ["a {} emoji.", "{}"])
    a, b = bb.encode_texts(["a circle emoji.", "a ring emoji."]), bb.encode_texts(["circle", "ring"])
    torch.testing.assert_close(w, torch.nn.functional.normalize(a + b, dim=-1))


def test_report_tables(tiny_data, tiny_clip_dir, tiny_params, tmp_path):
    params, prof = tiny_params
    for m in params.grid.methods:
        E.run(prof.evaluate, m, tiny_data, tiny_clip_dir, tmp_path / "eval" / m, device="cpu")
    md = R.run(params, "tiny", tmp_path / "eval", tiny_clip_dir, tmp_path / "out")
    assert "| method | google (pretrain) | apple (held out) |" in md
    assert md.count("| chance |") == 2 and md.count("| majority |") == 2 and md.count("| zeroshot |") == 2
    rows = (tmp_path / "out" / "zero_shot.csv").read_text().splitlines()
    assert rows[0] == ",".join(R.CSV_FIELDS) and len(rows) == 1 + 2 * 2 * 2
    one = json.loads((tmp_path / "eval" / "zeroshot" / "subgroup" / "apple.json").read_text())
    assert f"subgroup,apple,held out,zeroshot,{one['n']},{one['n_classes']},{one['accuracy']:.4f}," \
           f"{one['balanced_accuracy']:.4f}" in rows
    summary = json.loads((tmp_path / "out" / "zero_shot.json").read_text())
    assert set(summary) == {"subgroup", "group"}
    for f in ("zero_shot.png", "backbone.png"):
        assert (tmp_path / "out" / f).read_bytes()[:4] == b"\x89PNG"


def test_report_names_a_missing_result(tiny_params, tmp_path):
    params, _ = tiny_params
    with pytest.raises(FileNotFoundError, match=r"zeroshot/subgroup/google\.json: missing"):
        R.run(params, "tiny", tmp_path / "eval", None, tmp_path / "out")
