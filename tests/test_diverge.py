"""Training loops stop at the first non-finite loss or parameter, name the run, the step and the value,
and write nothing (issue: `lr: 1e20` used to exit 0 with NaN θ and NaN in the tables)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gram import meta as M
from gram import tune as T
from gram.io import DivergedError, check_finite
from gram.tensorio import load_tensors
from test_meta import _Tasks, tiny_learner
from test_tune import with_method


def test_check_finite_names_the_run_the_step_and_the_value():
    check_finite("tune coop", 3, 10, 1.25, [("ctx", torch.ones(2, 3))])  # finite: no error
    with pytest.raises(DivergedError, match=r"tune coop: loss = nan at step 3 of 10"):
        check_finite("tune coop", 3, 10, float("nan"))
    with pytest.raises(DivergedError, match=r"meta vpt: loss = inf at step 1 of 5"):
        check_finite("meta vpt", 1, 5, float("inf"))
    bad = torch.ones(2, 3)
    bad[1, 2] = float("inf")
    with pytest.raises(DivergedError, match=r"parameter ctx holds inf at step 7 of 9.*nothing was written"):
        check_finite("x", 7, 9, 0.5, [("ok", torch.zeros(1)), ("ctx", bad)])


def test_a_diverging_tune_run_stops_and_writes_nothing(tmp_path, tiny_params, tiny_data, tiny_trained_dir):
    params, prof = tiny_params
    # 1e30, not the 1e20: the context vectors must overflow the text tower's LayerNorm whatever the scale
    # of the tiny backbone's gradients (1e20 stayed finite once pretraining read only train-split emojis)
    wild = with_method(prof, "coop", lr=1.0e30, optimizer="sgd", steps=20)
    out, prompt = tmp_path / "run.json", tmp_path / "coop.safetensors"
    with pytest.raises(DivergedError, match=r"tune coop \(subgroup16, 2 shots, seed 1\): .* at step \d+ of 20"):
        T.run(params, wild, "few-shot", "subgroup16", "coop", 2, 1, tiny_data, tiny_trained_dir, out, save=prompt)
    assert not out.exists() and not prompt.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left either


def test_a_diverging_meta_training_stops_before_its_checkpoint(tiny_clip_dir, tmp_path):
    ml = tiny_learner(tiny_clip_dir, "coop", torch.float32, steps=6, tasks_per_step=2, checkpoint_every=1)
    ml.cfg = dataclasses.replace(ml.cfg, lr=1.0e20, regulator_lr=1.0e20, inner_lr=1.0e20, grad_clip=0.0)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(DivergedError, match=r"meta coop-x: .* at step (\d+) of 6") as err:
        M.meta_train(ml, _Tasks(), ml.cfg, ckpt, "d", progress=False, what="meta coop-x")
    step = int(err.value.args[0].split(" at step ")[1].split()[0])
    state = ckpt / "state.safetensors"
    if state.exists():  # what was checkpointed is finite, and from before the step that diverged
        tensors, meta = load_tensors(state)
        assert int(meta["step"]) < step
        assert all(bool(t.isfinite().all()) for t in tensors.values() if t.is_floating_point())


def test_a_diverging_test_time_run_stops_and_writes_nothing(tmp_path, tiny_params, tiny_data, tiny_trained_dir):
    """TPT's per-image AdamW steps: the first non-finite entropy or context stops the run, naming the image."""
    from gram import tpt as TPT

    params, prof = tiny_params
    wild = dataclasses.replace(prof, tpt=dataclasses.replace(prof.tpt, lr=1.0e20, steps=4))
    out, views = tmp_path / "tpt.json", tmp_path / "views"
    views.mkdir()
    with pytest.raises(DivergedError, match=r"tpt tpt \(subgroup16, domain apple, seed 1\), image \S+: "
                                            r"(loss = nan|parameter ctx holds (nan|inf)) at step \d of 4"):
        TPT.run(params, wild, "subgroup16", "tpt", 1, tiny_data, tiny_trained_dir, out, progress=False,
                views_cache=views)
    assert not out.exists() and list(views.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["views"]  # no temporary file left either


def test_a_batch_check_names_the_first_image_that_diverged():
    from gram.tpt import check_finite_batch

    ctx = torch.zeros(3, 2, 4)
    check_finite_batch("tpt x", ["a", "b", "c"], 1, 1, torch.ones(3), ctx)  # finite: no error
    ctx[2, 1, 0] = float("nan")
    with pytest.raises(DivergedError, match=r"tpt x, image c: parameter ctx holds nan at step 2 of 3"):
        check_finite_batch("tpt x", ["a", "b", "c"], 2, 3, torch.ones(3), ctx)
    with pytest.raises(DivergedError, match=r"tpt x, image b: loss = inf at step 1 of 1"):
        check_finite_batch("tpt x", ["a", "b", "c"], 1, 1, torch.tensor([0.5, float("inf"), 0.5]), ctx)
    with pytest.raises(DivergedError, match=r"tpt x, image #2 of the batch: parameter ctx"):
        check_finite_batch("tpt x", None, 1, 1, torch.ones(3), ctx)
