"""Few-shot subsets and the tuning loop."""

from __future__ import annotations

import numpy as np
import torch

from gram import backbone as B
from gram.data.datasets import split_images
from gram.data.fewshot import few_shot
from gram.images import preprocess
from gram.prompts import VPT, CoOp
from gram.tune import predict, tune


def test_few_shot_subset_depends_only_on_dataset_k_seed():
    keys = [f"k{i}" for i in range(30)]
    labels = np.array([i % 3 for i in range(30)])
    idx, h = few_shot(keys, labels, 4, seed=1, tag="subgroup")
    assert len(idx) == 12 and all((labels[idx] == c).sum() == 4 for c in range(3))
    perm = np.random.default_rng(0).permutation(30)
    idx2, h2 = few_shot([keys[i] for i in perm], labels[perm], 4, seed=1, tag="subgroup")
    assert sorted(keys[i] for i in idx) == sorted(keys[perm[i]] for i in idx2) and h == h2
    assert few_shot(keys, labels, 4, seed=2, tag="subgroup")[1] != h
    small, _ = few_shot(keys, labels, 50, seed=1, tag="subgroup")
    assert len(small) == 30  # classes with fewer than k items give all they have


def test_tuning_fits_the_support_set(tiny_data, tiny_trained_dir):
    bb = B.load(tiny_trained_dir, "cpu")
    sp = split_images(tiny_data, "subgroup", "apple", "train")  # the held-out vendor
    px = preprocess(sp.images, bb.spec)
    labels = torch.as_tensor(sp.labels)
    for learner, lr in [(CoOp(bb, init=None, n_ctx=4, generator=torch.Generator().manual_seed(0)), 0.002),
                      (VPT(bb, n_tokens=2, generator=torch.Generator().manual_seed(0)), 0.01)]:
        before = (predict(learner, px, sp.classes) == sp.labels).mean()
        losses = tune(learner, px, labels, sp.classes, steps=100, lr=lr, batch_size=len(labels), seed=0)
        after = (predict(learner, px, sp.classes) == sp.labels).mean()
        # full batch: the loss on the support set must fall clearly, and the fit not get worse
        assert losses[-1] < 0.8 * losses[0] and after > before, (type(learner), losses[0], losses[-1], before, after)
    assert not any(p.requires_grad for p in bb.model.parameters())


# ------------------------------------------------------------------------------------------------
# protocol runs (`gram tune`) on the tiny world
# ------------------------------------------------------------------------------------------------
import dataclasses  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402

from gram import config as C  # noqa: E402
from gram import tune as T  # noqa: E402
from gram.data.datasets import load_dataset  # noqa: E402
from gram.evaluate import ZeroShot, harmonic_mean, score_protocol  # noqa: E402
from gram.tensorio import load_prompt  # noqa: E402


def with_method(prof, name: str, **changes):
    methods = dict(prof.methods)
    methods[name] = dataclasses.replace(methods[name], **changes)
    return dataclasses.replace(prof, methods=methods)


def test_untuned_coop_scores_exactly_as_zero_shot(tiny_params, tiny_data, tiny_trained_dir):
    """CoOp initialised from a template's words, zero steps = zero-shot CLIP with that template."""
    params, prof = tiny_params
    bb = B.load(tiny_trained_dir, "cpu")
    m = C.MethodParams(kind="coop", init="a {} emoji", steps=0)
    classes = list(range(len(load_dataset(tiny_data, "subgroup16")["classes"])))
    clf, _ = T.fit(bb, "coop", m, "subgroup16", prof.protocols, 2, 1, tiny_data, classes)
    for protocol in ("few-shot", "domain-generalisation"):
        tuned = score_protocol(clf, protocol, "subgroup16", tiny_data, prof.protocols)
        zs = score_protocol(ZeroShot(bb, ["a {} emoji"]), protocol, "subgroup16", tiny_data, prof.protocols)
        assert tuned == zs


def test_few_shot_run_is_deterministic_and_transfers(tmp_path, tiny_params, tiny_data, tiny_trained_dir):
    params, prof = tiny_params
    args = dict(data_dir=tiny_data, backbone_dir=tiny_trained_dir)
    first = T.run(params, prof, "few-shot", "subgroup16", "coop", 2, 1, out=tmp_path / "a.json",
                  save=tmp_path / "coop.safetensors", **args)
    again = T.run(params, prof, "few-shot", "subgroup16", "coop", 2, 1, out=tmp_path / "b.json", **args)
    assert first["results"] == again["results"] and first["subset_hash"] == again["subset_hash"]
    other_seed = T.run(params, prof, "few-shot", "subgroup16", "coop", 2, 2, out=tmp_path / "c.json", **args)
    assert other_seed["subset_hash"] != first["subset_hash"]
    ds = load_dataset(tiny_data, "subgroup16")
    assert first["n_train"] <= 2 * len(ds["classes"]) and first["train"]["steps"] == prof.methods["coop"].steps
    assert json.loads((tmp_path / "a.json").read_text())["summary"] == first["summary"]

    # cross-dataset: the saved prompt, without tuning; test images of tuning emojis are left out
    cross = T.run(params, prof, "cross-dataset", "subgroup16", "coop", 2, 1, out=tmp_path / "x.json",
                  load_from=tmp_path / "coop.safetensors", **args)
    assert [r["target"] for r in cross["results"]] == list(prof.protocols.cross_dataset)
    theta, meta = load_prompt(tmp_path / "coop.safetensors")
    shots = set(meta["train_keys"])
    for r in cross["results"]:
        test = split_images(tiny_data, r["target"], prof.protocols.domain, "test")
        assert r["n_excluded"] == len(shots & set(test.keys))
        assert r["n"] == len(test.keys) - r["n_excluded"]
    dg = T.run(params, prof, "domain-generalisation", "subgroup16", "coop", 2, 1, out=tmp_path / "d.json",
               load_from=tmp_path / "coop.safetensors", **args)
    assert [r["domain"] for r in dg["results"]] == list(prof.protocols.domain_generalisation)

    # a prompt tuned with another recipe is refused, naming the file
    changed = with_method(prof, "coop", lr=0.5)
    with pytest.raises(ValueError, match="coop.safetensors.*rerun its few-shot job"):
        T.run(params, changed, "cross-dataset", "subgroup16", "coop", 2, 1, out=tmp_path / "y.json",
              load_from=tmp_path / "coop.safetensors", **args)
    with pytest.raises(ValueError, match="asked for subgroup16 k=2 seed 3"):
        T.run(params, prof, "cross-dataset", "subgroup16", "coop", 2, 3, out=tmp_path / "y.json",
              load_from=tmp_path / "coop.safetensors", **args)
    assert not (tmp_path / "y.json").exists()


def test_base_to_new_scores_base_and_new_apart(tmp_path, tiny_params, tiny_data, tiny_trained_dir):
    params, prof = tiny_params
    ds = load_dataset(tiny_data, "subgroup16")
    rec = T.run(params, prof, "base-to-new", "subgroup16", "vpt", 2, 1, tiny_data, tiny_trained_dir,
                tmp_path / "b2n.json")
    base, new = rec["results"]
    assert (base["target"], new["target"]) == ("base", "new")
    assert base["n_classes"] <= len(ds["base"]) and new["n_classes"] <= len(ds["new"])
    assert len(base["per_class_accuracy"]) == len(ds["base"]) and len(new["per_class_accuracy"]) == len(ds["new"])
    s = rec["summary"]["balanced_accuracy"]
    assert s["hm"] == pytest.approx(harmonic_mean(base["balanced_accuracy"], new["balanced_accuracy"]))


def test_linear_probe_scores_only_its_classes(tmp_path, tiny_params, tiny_data, tiny_trained_dir):
    params, prof = tiny_params
    args = dict(data_dir=tiny_data, backbone_dir=tiny_trained_dir)
    fs = T.run(params, prof, "few-shot", "subgroup16", "linear-probe", 4, 1, out=tmp_path / "f.json",
               save=tmp_path / "lp.safetensors", **args)
    assert fs["results"][0]["applicable"] and 0.0 <= fs["results"][0]["accuracy"] <= 1.0
    b2n = T.run(params, prof, "base-to-new", "subgroup16", "linear-probe", 4, 1, out=tmp_path / "b.json", **args)
    assert b2n["results"][0]["applicable"] and not b2n["results"][1]["applicable"]
    assert b2n["summary"]["balanced_accuracy"]["new"] is None and b2n["summary"]["balanced_accuracy"]["hm"] is None
    cross = T.run(params, prof, "cross-dataset", "subgroup16", "linear-probe", 4, 1, out=tmp_path / "c.json",
                  load_from=tmp_path / "lp.safetensors", **args)
    assert not any(r["applicable"] for r in cross["results"]) and cross["summary"]["balanced_accuracy"] is None
    dg = T.run(params, prof, "domain-generalisation", "subgroup16", "linear-probe", 4, 1, out=tmp_path / "d.json",
               load_from=tmp_path / "lp.safetensors", **args)
    assert all(r["applicable"] for r in dg["results"])
    # the saved probe predicts what the fitted one predicted
    restored, _ = T.restore(B.load(tiny_trained_dir, "cpu"), prof.methods["linear-probe"], "linear-probe",
                            tmp_path / "lp.safetensors", prof.protocols)
    again = score_protocol(restored, "few-shot", "subgroup16", tiny_data, prof.protocols)
    assert again["results"] == fs["results"]


def test_bad_requests_fail_clearly(tmp_path, tiny_params, tiny_data, tiny_trained_dir):
    params, prof = tiny_params
    with pytest.raises(KeyError, match="'nope' is not defined in .*methods"):
        T.run(params, prof, "few-shot", "subgroup16", "nope", 2, 1, tiny_data, tiny_trained_dir, tmp_path / "a.json")
    with pytest.raises(ValueError, match="pass --load-prompt"):
        T.run(params, prof, "cross-dataset", "subgroup16", "coop", 2, 1, tiny_data, tiny_trained_dir,
              tmp_path / "a.json")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        T.run(params, prof, "cross-dataset", "subgroup16", "coop", 2, 1, tiny_data, tiny_trained_dir,
              tmp_path / "a.json", load_from=tmp_path / "missing.safetensors")
