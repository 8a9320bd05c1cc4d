"""N-way meta-tasks (tasks.kind: nway), validation tasks over held-out clusters and early stopping on a
class-name dev task (meta select): the sampler's invariants, the class phrases, the N-way loss against a
hand computation, and the tasks + meta stages on the tiny world, where the meta-learned θ must still tell
the class names apart."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import params_with
from gram import cli
from gram import meta as M
from gram import tasks as T
from gram.backbone import load
from gram.data.datasets import split_images
from gram.images import preprocess
from gram.prompts import make_learner
from gram.regulator import load_meta
from test_meta import tiny_learner


# ------------------------------------------------------------------------------------------------
# class phrases and the sampler
# ------------------------------------------------------------------------------------------------
def test_cluster_phrases_name_clusters_by_their_shared_words():
    captions = ["red apple: fruit, food", "green apple: fruit", "pear: fruit, food",   # cluster 0
                "sports car: car, vehicle", "police car: car", "car: vehicle",       # cluster 1
                "dog face: dog, pet", "",                                            # cluster 2: one caption
                ""]                                                                  # cluster 3: none
    assign = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3])
    # fruit: 3 members; apple and food 2 each, apple rarer in the corpus (2 vs 2: tie -> alphabetical)
    assert T.cluster_phrases(captions, assign, 4) == ["fruit apple", "car vehicle", "dog", ""]
    assert T.cluster_phrases(captions, assign, 4, max_words=1) == ["fruit", "car", "dog", ""]
    assert T.caption_words("A cat, of the house: cat") == ["cat", "house"]


def _world(n_parents=4, per_parent=4, size=6, seed=0):
    """A two-level toy hierarchy: n_parents × per_parent clusters of `size` rows, distinct phrases."""
    n_c = n_parents * per_parent
    assign = np.repeat(np.arange(n_c), size)
    parent = np.arange(n_c) // per_parent
    rng = np.random.default_rng(seed)
    cen = rng.normal(size=(n_c, 8))
    return assign, parent, rng.random(n_c), cen, [f"word{c}" for c in range(n_c)]


def test_nway_tasks_are_named_classes_whose_queries_are_their_neighbours():
    assign, parent, comp, cen, phrases = _world()
    tasks = T.sample_nway(assign, parent, comp, cen, phrases, 60, [2, 3], [2, 4], [1, 3], seed=3)
    assert tasks.nway and len(tasks) == 60
    for t in range(len(tasks)):
        sc, qc = tasks.support_classes[t], tasks.query_classes[t]
        assert 2 <= len(sc) <= 3 and len(sc) == len(qc)
        assert len(set(sc) | set(qc)) == 2 * len(sc)  # no cluster twice in a task
        assert (parent[sc] == parent[qc]).all()  # every class has a free sibling in this world
        for rows, lab, cls, lo_hi in ((tasks.support[t], tasks.support_label[t], sc, [2, 4]),
                                      (tasks.query[t], tasks.query_label[t], qc, [1, 3])):
            assert (assign[rows] == cls[lab]).all()  # a row's label is its cluster's class
            per = np.bincount(lab, minlength=len(cls))
            assert (per >= lo_hi[0]).all() and (per <= lo_hi[1]).all()
        s, q = tasks.sets(t)
        assert s.names == [phrases[c] for c in sc] and q.names == [phrases[c] for c in qc]
    again = T.sample_nway(assign, parent, comp, cen, phrases, 60, [2, 3], [2, 4], [1, 3], seed=3)
    back = T.Tasks.from_dict(tasks.to_dict(), phrases)
    for other in (again, back):
        for t in range(len(tasks)):
            assert np.array_equal(other.support[t], tasks.support[t])
            assert np.array_equal(other.query_label[t], tasks.query_label[t])
            assert np.array_equal(other.query_classes[t], tasks.query_classes[t])


def test_nway_classes_of_a_task_have_distinct_phrases():
    assign, parent, comp, cen, _ = _world()
    phrases = [f"w{c % 5}" for c in range(16)]  # only 5 names for 16 clusters
    tasks = T.sample_nway(assign, parent, comp, cen, phrases, 80, [3, 4], [2, 2], [2, 2], seed=0)
    for t in range(len(tasks)):
        for cls in (tasks.support_classes[t], tasks.query_classes[t]):
            names = [phrases[c] for c in cls]
            assert len(set(names)) == len(names)


def test_same_cluster_nway_queries_the_support_classes_with_other_pairs():
    assign, parent, comp, cen, phrases = _world()
    tasks = T.sample_nway(assign, parent, comp, cen, phrases, 30, [2, 4], [2, 3], [2, 3], cross_cluster=False, seed=1)
    for t in range(len(tasks)):
        assert np.array_equal(tasks.support_classes[t], tasks.query_classes[t])
        assert not set(tasks.support[t]) & set(tasks.query[t])


def test_held_out_clusters_are_never_in_a_training_task():
    assign, parent, comp, cen, phrases = _world()
    held = T.held_out_clusters(16, 0.25, seed=0)
    assert held.sum() == 4
    train = T.sample_nway(assign, parent, comp, cen, phrases, 100, [2, 4], [2, 3], [2, 3], seed=0, allowed=~held)
    val = T.sample_nway(assign, parent, comp, cen, phrases, 20, [2, 2], [2, 3], [2, 3], seed=1, allowed=held)
    used = set(np.concatenate(train.support_classes + train.query_classes))
    assert not used & set(np.flatnonzero(held)) and len(used) == 12
    assert set(np.concatenate(val.support_classes + val.query_classes)) <= set(np.flatnonzero(held))
    pairs = T.sample_tasks(assign, comp, cen, 100, [2, 3], [2, 3], seed=0, allowed=~held)
    assert not set(pairs.support_cluster) & set(np.flatnonzero(held))
    assert not set(pairs.query_cluster) & set(np.flatnonzero(held))
    with pytest.raises(ValueError, match=r"an N-way task needs 2 of each"):
        T.sample_nway(assign, parent, comp, cen, phrases, 5, [2, 2], [2, 3], [2, 3], allowed=held & (parent == 9))


# ------------------------------------------------------------------------------------------------
# the N-way loss
# ------------------------------------------------------------------------------------------------
def test_nway_set_loss_is_the_cross_entropy_over_the_class_phrases(tiny_clip_dir):
    ml = tiny_learner(tiny_clip_dir, "coop")
    rows, labels, names = np.array([0, 3, 5, 6]), np.array([0, 1, 1, 2]), ["smiling circle", "square", "calm"]
    got = ml.set_loss(ml.theta, T.Labelled(rows, labels, names))
    img = ml.corpus.frozen[rows]
    txt = ml.learner.text_features(names, ml.theta)
    want = F.cross_entropy(ml.scale * img @ txt.T, torch.as_tensor(labels))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the meta-gradient flows: θ gets a non-zero outer gradient from an N-way task
    s, q = T.Labelled(rows[:2], np.array([0, 1]), names[:2]), T.Labelled(rows[2:], np.array([0, 1]), names[1:])
    ml.task_loss(ml.theta, ml.phi, s, q)[0].backward()
    assert all(v.grad is not None and v.grad.abs().max() > 0 for v in ml.theta.values())


# ------------------------------------------------------------------------------------------------
# the stages on the tiny world
# ------------------------------------------------------------------------------------------------
def _nway(raw):
    raw["tiny"]["tasks"].update(kind="nway", level=0, ways=[2, 3], support=[1, 3], query=[1, 2], val_fraction=0.25,
                                n_val=6, n_tasks=30)
    for r in raw["tiny"]["meta"].values():
        r["select"] = {"dataset": "subgroup", "split": "val", "every": 2}
    raw["tiny"]["meta"]["coop"]["steps"] = 6


@pytest.fixture(scope="module")
def nway_world(tmp_path_factory, tiny_data, tiny_trained_dir):
    root = tmp_path_factory.mktemp("nway")
    params = params_with(root, _nway, "tiny")
    d = {"data": tiny_data, "backbone": tiny_trained_dir, "embed": root / "embed", "chc": root / "chc",
         "tasks": root / "tasks", "meta": root / "meta" / "coop", "params": params}

    def stage(*argv):
        assert cli.main([argv[0], "--params", params, "--profile", "tiny", *argv[1:]]) == 0

    stage("embed", "--data", str(tiny_data), "--backbone", str(tiny_trained_dir), "--out", str(d["embed"]))
    stage("cluster", "--data", str(tiny_data), "--embed", str(d["embed"]), "--out", str(d["chc"]))
    stage("tasks", "--chc", str(d["chc"]), "--data", str(tiny_data), "--out", str(d["tasks"]))
    stage("meta", "--recipe", "coop", "--data", str(tiny_data), "--chc", str(d["chc"]), "--tasks", str(d["tasks"]),
          "--backbone", str(tiny_trained_dir), "--out", str(d["meta"]))
    return d


def test_tasks_stage_writes_named_nway_tasks_and_disjoint_validation_tasks(nway_world):
    tasks, meta = T.load_tasks(nway_world["tasks"])
    val, vmeta = T.load_tasks(nway_world["tasks"], "val")
    assert meta["kind"] == "nway" and tasks.nway and len(tasks) == 30 and len(val) == 6
    info = json.loads((nway_world["tasks"] / "tasks.json").read_text())
    n_c = info["clusters"]
    held = T.held_out_clusters(n_c, 0.25, 0)
    train_used = set(np.concatenate(tasks.support_classes + tasks.query_classes))
    val_used = set(np.concatenate(val.support_classes + val.query_classes))
    assert val_used <= set(np.flatnonzero(held)) and not train_used & val_used
    assert info["validation"]["held_out_clusters"] == int(held.sum())
    assert all(p for p in meta["phrases"]) and len(meta["phrases"]) == n_c
    words = {w for p in meta["phrases"] for w in p.split()}
    assert words & {"circle", "square", "triangle", "diamond", "ring", "cross", "bar", "star", "plus"}  # shapes


def test_tasks_stage_asks_for_the_data_of_nway_tasks(nway_world, tmp_path):
    code = cli.main(["tasks", "--params", nway_world["params"], "--profile", "tiny", "--chc", str(nway_world["chc"]),
                     "--out", str(tmp_path / "t")])
    assert code == 1 and not (tmp_path / "t").exists()


def test_meta_selects_the_best_dev_step_and_keeps_class_names_apart(nway_world):
    info = json.loads((nway_world["meta"] / "meta.json").read_text())
    assert info["tasks"]["kind"] == "nway" and info["validation"]["held_out_clusters"] is True
    sel = info["select"]
    scored = [h for h in info["history"] if "dev_loss" in h]
    assert [h["step"] for h in scored] == [2, 4, 6]
    bb = load(nway_world["backbone"], "cpu", "float32")
    from gram import config as C

    prof = C.load(nway_world["params"], "tiny")[1]
    learner = make_learner(bb, prof.meta["coop"].prompt, 0, 0)
    theta, _, _ = load_meta(nway_world["meta"], learner)
    dev = M.load_dev_task(learner, nway_world["data"], "subgroup", ["facebook"], "val")
    init = dev.score(dict(learner.named_parameters()))
    assert sel["initial"] == init
    best = max([(init["accuracy"], 0)] + [(h["dev_accuracy"], -h["step"]) for h in scored])  # ties: earlier
    assert sel["best"]["step"] == -best[1] and sel["best"]["accuracy"] == best[0]
    assert dev.score(theta)["loss"] == pytest.approx(sel["best"]["loss"], abs=1e-4)  # the written θ is that step's
    # no collapse: the class names' features at the meta θ stay apart, and tuning starts below uniform loss
    sp = split_images(nway_world["data"], "subgroup16", "apple", "train")
    with torch.no_grad():
        txt = learner.text_features(sp.classes, theta)
        cos = txt @ txt.T
        off = cos[~torch.eye(len(sp.classes), dtype=torch.bool)]
        img = learner.image_features(preprocess(sp.images, bb.spec), theta)
        ce = F.cross_entropy(learner.clip.logit_scale.exp() * img @ txt.T, torch.as_tensor(sp.labels))
    assert off.max() < 0.99, off.max()
    assert float(ce) < math.log(len(sp.classes)) - 0.01


def test_select_keeps_its_best_step_across_a_resume(tiny_clip_dir, tmp_path):
    """An interrupted meta-training with a dev task resumes to the same history, best step, best θ, φ and
    initial score as an uninterrupted one (the checkpoint carries them)."""
    from gram import config as C
    from test_meta import _Tasks

    cfg = dict(steps=5, tasks_per_step=2, checkpoint_every=2,
               select=C.SelectParams(dataset="x", every=1, metric="loss"))

    def dev(ml):
        gen = torch.Generator().manual_seed(5)
        crop = ml.learner.backbone.spec.crop
        return M.DevTask(ml.learner, torch.randn(6, 3, crop, crop, generator=gen, dtype=torch.float64),
                         np.array([0, 1, 2, 0, 1, 2]), ["smiling circle", "affection square", "calm"])

    whole = tiny_learner(tiny_clip_dir, "coop", **cfg)
    h_whole = M.meta_train(whole, _Tasks(), whole.cfg, tmp_path / "a.ckpt", "d", progress=False, dev=dev(whole))
    part = tiny_learner(tiny_clip_dir, "coop", **cfg)
    M.meta_train(part, _Tasks(), part.cfg, tmp_path / "b.ckpt", "d", progress=False, stop_after=3, dev=dev(part))
    resumed = tiny_learner(tiny_clip_dir, "coop", **cfg)
    h_resumed = M.meta_train(resumed, _Tasks(), resumed.cfg, tmp_path / "b.ckpt", "d", progress=False,
                             dev=dev(resumed))
    assert [h["dev_loss"] for h in h_whole] == [h["dev_loss"] for h in h_resumed]
    assert resumed.best["step"] == whole.best["step"] and resumed.dev_initial == whole.dev_initial
    losses = [whole.dev_initial["loss"]] + [h["dev_loss"] for h in h_whole]
    assert whole.best["loss"] == min(losses) and whole.best["step"] == int(np.argmin(losses))
    for n in whole.theta:
        torch.testing.assert_close(resumed.best["theta"][n], whole.best["theta"][n], rtol=1e-9, atol=1e-12)


def test_meta_seeds_train_one_run_per_seed_and_tuning_seeds_read_them_in_turn(nway_world, tmp_path):
    """`seeds: 2`: run 0 at the top of the output, run 1 in run1/ (another seed: another θ), meta.json lists
    both, and grid seeds 1, 2, 3 read runs 0, 1, 0."""
    from gram import regulator as R

    def edit(raw):
        _nway(raw)
        raw["tiny"]["meta"]["coop"].update(seeds=2, steps=2, select={"dataset": None})  # θ of the last step

    params = params_with(tmp_path, edit, "tiny")
    out = tmp_path / "meta" / "coop"
    w = nway_world
    assert cli.main(["meta", "--params", params, "--profile", "tiny", "--recipe", "coop", "--data", str(w["data"]),
                     "--chc", str(w["chc"]), "--tasks", str(w["tasks"]), "--backbone", str(w["backbone"]),
                     "--out", str(out)]) == 0
    info = json.loads((out / "meta.json").read_text())
    assert [(r["run"], r["seed"], r["dir"]) for r in info["runs"]] == [(0, 0, "."), (1, 1, "run1")]
    assert (out / "run1" / "meta.safetensors").exists() and not (tmp_path / "meta" / ".coop.runs").exists()
    assert json.loads((out / "run1" / "meta.json").read_text())["config"]["seed"] == 1
    assert [R.meta_run(out, s) for s in (1, 2, 3)] == [(out, 0), (out / "run1", 1), (out, 0)]
    assert R.meta_run(out, None) == (out, 0)
    from gram.tensorio import load_theta

    t0, _, _ = load_theta(out / "meta.safetensors")
    t1, _, _ = load_theta(out / "run1" / "meta.safetensors")
    assert any(not torch.equal(t0[n], t1[n]) for n in t0)


def test_report_shows_the_task_kind_and_the_dev_selection(nway_world, tmp_path):
    from gram import report

    report.meta_training(nway_world["meta"].parent, ["coop"], tmp_path, "tiny")
    md = (tmp_path / "meta_training.md").read_text()
    sel = json.loads((nway_world["meta"] / "meta.json").read_text())["select"]
    dev = f"{100 * sel['initial']['accuracy']:.1f} → {100 * sel['best']['accuracy']:.1f} ({sel['best']['step']})"
    assert "| coop | coop | tasks (nway) | 6 |" in md and f"| {dev} |" in md, md


def test_an_interrupted_multi_seed_meta_job_resumes_at_its_first_unfinished_run(nway_world, tmp_path, monkeypatch):
    from gram import config as C

    def edit(raw):
        _nway(raw)
        raw["tiny"]["meta"]["coop"].update(seeds=2, steps=2, select={"dataset": None})

    prof = C.load(params_with(tmp_path, edit, "tiny"), "tiny")[1]
    w, out = nway_world, tmp_path / "meta" / "coop"
    args = (prof, "coop", w["data"], w["chc"], w["tasks"], w["backbone"], out)
    real, seeds = M._run_one, []

    def flaky(prof, recipe, cfg, *a, **k):
        seeds.append(cfg.seed)
        if cfg.seed == 1 and seeds.count(1) == 1:
            raise KeyboardInterrupt  # the job is killed during its second run
        return real(prof, recipe, cfg, *a, **k)

    monkeypatch.setattr(M, "_run_one", flaky)
    with pytest.raises(KeyboardInterrupt):
        M.run(*args, progress=False)
    assert not out.exists() and (out.parent / ".coop.runs" / "run0" / "meta.json").exists()
    M.run(*args, progress=False)
    assert seeds == [0, 1, 1]  # run 0 was not trained again
    assert [r["seed"] for r in json.loads((out / "meta.json").read_text())["runs"]] == [0, 1]
    assert not (out.parent / ".coop.runs").exists()
