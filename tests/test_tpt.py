"""Test-time tuning (gram/tpt.py): the batched path against the plain per-image loop, the shared-prefix
text encoder, the regulated update by hand, views, the structure context, the stage and its errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import fake_npm
from conftest import TINY_PARAMS, params_with
from gram import cli
from gram import config as C
from gram import tpt as T
from gram.backbone import load
from gram.images import preprocess
from gram.prompts import make_learner
from gram.regulator import Regulators, StructureContext

PARAMS = TINY_PARAMS
NAMES = [e["label"] for e in fake_npm.EMOJIS][:6] + ["circle", "tall affection square big calm"]


def stage(*argv: str) -> int:
    return cli.main([argv[0], "--params", PARAMS, "--profile", "tiny", *argv[1:]])


def coop(clip_dir, dtype=torch.float32):
    bb = load(clip_dir, "cpu", "float32")
    if dtype != torch.float32:
        bb.model.to(dtype)
        bb = dataclasses.replace(bb, dtype=dtype)
    learner = make_learner(bb, C.MethodParams(kind="coop", init="a {} emoji"), 0, 0).to(dtype)
    return bb, learner


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 48, 40, 3), dtype=np.uint8)


def regulator_and_structure(learner, e: int, seed: int = 0):
    """A "mix" ψ with a context, moved off its near-identity start, and random prototypes on two levels."""
    regs = Regulators(learner.theta(), form="mix", rank=4, hidden=8, context_dim=e, init=0.6)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in regs.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    regs.requires_grad_(False)
    protos = {"level0.image": torch.randn(5, e, generator=gen), "level1.image": torch.randn(3, e, generator=gen)}
    return regs, StructureContext(protos, [0, 1], tau=0.2)


# ------------------------------------------------------------------------------------------------
# exactness
# ------------------------------------------------------------------------------------------------
def test_shared_prefix_encoder_equals_whole_sequences(tiny_clip_dir):
    bb, learner = coop(tiny_clip_dir, torch.float64)
    gen = torch.Generator().manual_seed(0)
    ctx = learner.ctx.detach()[None] + 0.3 * torch.randn(3, *learner.ctx.shape, generator=gen, dtype=torch.float64)
    shared = T.ClassPrompts(learner, NAMES, shared_prefix=True).features(ctx)  # [3, C, E]
    whole = T.ClassPrompts(learner, NAMES, shared_prefix=False).features(ctx)
    ref = torch.stack([learner.text_features(NAMES, {"ctx": c}, truncate=False) for c in ctx])
    assert shared.shape == (3, len(NAMES), bb.model.config.projection_dim)
    torch.testing.assert_close(shared, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(whole, ref, rtol=0, atol=1e-12)
    # and the gradient w.r.t. the contexts, through the cached prefix keys and values
    c1, c2 = ctx.clone().requires_grad_(), ctx.clone().requires_grad_()
    w = torch.randn(shared.shape, generator=gen, dtype=torch.float64)
    (T.ClassPrompts(learner, NAMES, True).features(c1) * w).sum().backward()
    (torch.stack([learner.text_features(NAMES, {"ctx": c}, truncate=False) for c in c2]) * w).sum().backward()
    assert c1.grad.abs().max() > 0
    torch.testing.assert_close(c1.grad, c2.grad, rtol=0, atol=1e-10)


def test_each_image_gets_exactly_its_own_gradient(tiny_clip_dir):
    bb, learner = coop(tiny_clip_dir, torch.float64)
    prompts = T.ClassPrompts(learner, NAMES)
    gen = torch.Generator().manual_seed(1)
    feats = torch.nn.functional.normalize(torch.randn(4, 8, 24, generator=gen, dtype=torch.float64), dim=-1)
    ctx = learner.ctx.detach()[None].repeat(4, 1, 1).requires_grad_()
    logits = 10 * torch.einsum("bve,bce->bvc", feats, prompts.features(ctx))
    T.average_entropy(logits).sum().backward()
    for b in range(4):
        one = learner.ctx.detach().clone().requires_grad_()
        T.average_entropy(10 * feats[b] @ learner.text_features(NAMES, {"ctx": one}).T).backward()
        torch.testing.assert_close(ctx.grad[b], one.grad, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("regulator", ["none", "plain", "structure"])
@pytest.mark.parametrize("steps", [1, 2])
def test_batched_tpt_gives_the_per_image_loop_predictions(tiny_clip_dir, regulator, steps):
    bb, learner = coop(tiny_clip_dir)
    names = NAMES[:-1]  # with the long name, this random CLIP predicts it for every image
    e = bb.model.config.projection_dim
    regs, structure = regulator_and_structure(learner, e)
    psi = None if regulator == "none" else regs
    context = structure if regulator == "structure" else None
    cfg = C.TptParams(views=12, keep=0.25, steps=steps, lr=0.2, batch_size=4)
    imgs, keys = images(7), [f"apple_{i:04x}" for i in range(7)]
    # a larger lr than TPT's so that predictions move and the comparison is not vacuous
    tuner = T.TestTimeTuner(learner, learner.ctx, cfg, psi, context)
    fast = tuner.run(imgs, keys, names, seed=3)  # two batches (4 + 3 images)
    ctx_fast = []
    for i in range(0, 7, 4):
        views = torch.stack([T.make_views(imgs[j], bb.spec, cfg.views, T.view_generator(3, keys[j]))
                             for j in range(i, min(i + 4, 7))])
        feats = tuner.view_features(views.flatten(0, 1)).view(*views.shape[:2], -1)
        out = T.tune_batch(T.ClassPrompts(learner, names), feats, learner.ctx, learner.clip.logit_scale.exp(),
                           steps, cfg.lr, cfg.weight_decay, cfg.keep, psi, context)
        ctx_fast.append(out["ctx"])
    ctx_fast = torch.cat(ctx_fast)
    for j in range(7):
        views = T.make_views(imgs[j], bb.spec, cfg.views, T.view_generator(3, keys[j]))
        ref = T.tpt_reference(learner, views, names, learner.ctx, steps, cfg.lr, cfg.weight_decay, cfg.keep, psi,
                              context)
        assert (fast["before"][j], fast["after"][j]) == (ref["before"], ref["after"]), j
        torch.testing.assert_close(ctx_fast[j], ref["ctx"], rtol=0, atol=2e-5)
    if regulator == "none":
        assert (fast["before"] != fast["after"]).any()  # tuning changed some predictions
    assert not torch.allclose(ctx_fast, learner.ctx.detach().expand_as(ctx_fast))


def test_regulated_adamw_step_by_hand(tiny_clip_dir):
    """One step: θ1 = θ0·(1 − lr·wd) − lr·ψ(g; h)/(|ψ(g; h)| + eps), AdamW's first step on ψ(g; h)."""
    bb, learner = coop(tiny_clip_dir, torch.float64)
    e = bb.model.config.projection_dim
    regs, structure = regulator_and_structure(learner, e)
    regs.to(torch.float64)
    prompts = T.ClassPrompts(learner, NAMES)
    gen = torch.Generator().manual_seed(2)
    feats = torch.nn.functional.normalize(torch.randn(3, 10, e, generator=gen, dtype=torch.float64), dim=-1)
    scale, lr, wd, keep = torch.tensor(12.0, dtype=torch.float64), 1.0e-2, 0.01, 0.3
    out = T.tune_batch(prompts, feats, learner.ctx, scale, 1, lr, wd, keep, regs, structure)
    plain = T.tune_batch(prompts, feats, learner.ctx, scale, 1, lr, wd, keep)
    for b in range(3):
        ctx0 = learner.ctx.detach().clone().requires_grad_()
        logits = scale * feats[b] @ learner.text_features(NAMES, {"ctx": ctx0}).T  # [V, C]
        kept = T.view_entropy(logits).argsort(stable=True)[:T.n_kept(10, keep)]
        assert torch.equal(kept, out["kept"][b])
        (g,) = torch.autograd.grad(T.average_entropy(logits[kept]), ctx0)
        h = structure(feats[b, kept].mean(0)[None])[0]
        psi = regs({"ctx": g}, h)["ctx"]
        want = ctx0.detach() * (1 - lr * wd) - lr * psi / (psi.abs() + 1e-8)
        torch.testing.assert_close(out["ctx"][b], want, rtol=0, atol=1e-12)
    assert not torch.allclose(out["ctx"], plain["ctx"])  # ψ changed the update


# ------------------------------------------------------------------------------------------------
# views and the structure context
# ------------------------------------------------------------------------------------------------
def test_views_are_a_function_of_seed_and_key(tiny_clip_dir):
    bb, _ = coop(tiny_clip_dir)
    img = images(1)[0]
    a = T.make_views(img, bb.spec, 9, T.view_generator(1, "k"))
    assert a.shape == (9, 3, bb.spec.crop, bb.spec.crop)
    assert torch.equal(a, T.make_views(img, bb.spec, 9, T.view_generator(1, "k")))
    assert not torch.equal(a, T.make_views(img, bb.spec, 9, T.view_generator(1, "other")))
    assert not torch.equal(a, T.make_views(img, bb.spec, 9, T.view_generator(2, "k")))
    assert torch.equal(a[0], preprocess(img[None], bb.spec)[0])  # view 0: the image itself
    mix = T.make_views(img, bb.spec, 9, T.view_generator(1, "k"), augment="augmix")
    assert torch.equal(mix[0], a[0]) and not torch.equal(mix[1:], a[1:])


def test_crops_flips_and_augmix_ops():
    gen = torch.Generator().manual_seed(0)
    boxes = T.crop_boxes(gen, 500, (0.08, 1.0))
    x0, y0, w, h = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 1 + 1e-6).all() and (y0 + h <= 1 + 1e-6).all()
    assert ((w * h) >= 0.08 - 1e-6).all() and ((w * h) <= 1 + 1e-6).all()
    img = torch.rand(3, 20, 20, generator=gen)
    one = boxes[:3]
    flipped = T.resized_crops(img, one, torch.tensor([True] * 3), 8)
    torch.testing.assert_close(flipped, T.resized_crops(img, one, torch.tensor([False] * 3), 8).flip(-1))
    x = torch.rand(16, 3, 8, 8, generator=gen)
    y = T.augmix(x, torch.Generator().manual_seed(5))
    assert y.shape == x.shape and torch.equal(y, T.augmix(x, torch.Generator().manual_seed(5)))
    assert not torch.allclose(y, x)
    m = torch.ones(16)
    assert torch.equal(T._solarize(x, m), torch.where(x >= 231 / 255, 1 - x, x))  # 256 - ⌊25.6⌋ at magnitude 1
    post = T._posterize(x, m)
    assert torch.equal(post, torch.floor(x * 255 / 16) * 16 / 255)  # 4 bits
    ac = T._autocontrast(x, m)
    torch.testing.assert_close(ac.amin(dim=(2, 3)), torch.zeros(16, 3))
    torch.testing.assert_close(ac.amax(dim=(2, 3)), torch.ones(16, 3))


def test_structure_context_by_hand():
    gen = torch.Generator().manual_seed(0)
    p0, p1 = torch.randn(4, 6, generator=gen), torch.randn(2, 6, generator=gen)
    s = StructureContext({"level0.image": p0, "level1.image": p1}, [0, 1], tau=0.5)
    f = torch.randn(3, 6, generator=gen)
    n = torch.nn.functional.normalize
    want = 0.5 * (torch.softmax(n(f) @ n(p0).T / 0.5, -1) @ n(p0) + torch.softmax(n(f) @ n(p1).T / 0.5, -1) @ n(p1))
    torch.testing.assert_close(s(f), want)
    assert all(torch.allclose(w.sum(-1), torch.ones(3)) for w in s.weights(f))
    sharp = StructureContext({"level0.image": p0}, [0], tau=1e-4)
    torch.testing.assert_close(sharp(f), n(p0)[(n(f) @ n(p0).T).argmax(-1)])  # a tiny τ picks the nearest
    with pytest.raises(KeyError, match="level2.image"):
        StructureContext({"level0.image": p0}, [2])


def test_gate_regulator_reads_the_context_only_with_gate_context():
    from gram.regulator import Regulator

    gen = torch.Generator().manual_seed(0)
    g, h1, h2 = torch.randn(5, 6, generator=gen), torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    r = Regulator(6, form="gate", hidden=8, context_dim=4, gate_context=True)
    torch.testing.assert_close(r(g, h1), 0.95 * g)  # starts at init·g whatever h
    with torch.no_grad():
        for p in r.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    assert not torch.allclose(r(g, h1), r(g, h2))
    with pytest.raises(ValueError, match="pass h"):
        r(g)
    with pytest.raises(ValueError, match="gate_context needs form 'gate'"):
        Regulator(6, form="mix", context_dim=4, gate_context=True)


# ------------------------------------------------------------------------------------------------
# the stage, through the CLI as the DAG runs it
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tptworld(tmp_path_factory, tiny_data, tiny_trained_dir):
    root = tmp_path_factory.mktemp("tpt")
    d = {"data": tiny_data, "backbone": tiny_trained_dir, "embed": root / "embed", "chc": root / "chc",
         "tasks": root / "tasks", "prototypes": root / "prototypes", "meta": root / "meta" / "coop-tpt",
         "prompt": root / "coop.safetensors", "root": root}
    assert stage("embed", "--data", str(tiny_data), "--backbone", str(tiny_trained_dir), "--out", str(d["embed"])) == 0
    assert stage("cluster", "--data", str(tiny_data), "--embed", str(d["embed"]), "--out", str(d["chc"])) == 0
    assert stage("tasks", "--chc", str(d["chc"]), "--out", str(d["tasks"])) == 0
    assert stage("prototypes", "--embed", str(d["embed"]), "--chc", str(d["chc"]), "--out", str(d["prototypes"])) == 0
    assert stage("meta", "--recipe", "coop-tpt", "--data", str(tiny_data), "--chc", str(d["chc"]), "--tasks",
                 str(d["tasks"]), "--prototypes", str(d["prototypes"]), "--backbone", str(tiny_trained_dir),
                 "--out", str(d["meta"])) == 0
    assert stage("tune", "--protocol", "few-shot", "--dataset", "subgroup16", "--method", "coop", "--shots", "4",
                 "--seed", "1", "--data", str(tiny_data), "--backbone", str(tiny_trained_dir), "--out",
                 str(root / "coop.json"), "--save-prompt", str(d["prompt"])) == 0
    return d


def tpt_args(w, method: str, out) -> list[str]:
    return ["tpt", "--dataset", "subgroup16", "--method", method, "--seed", "1", "--data", str(w["data"]),
            "--backbone", str(w["backbone"]), "--prototypes", str(w["prototypes"]), "--out", str(out)]


def test_structure_recipe_meta_trains_with_the_prototype_context(tptworld):
    info = json.loads((tptworld["meta"] / "meta.json").read_text())
    assert info["config"]["context"] == "structure" and info["config"]["regulator"]["form"] == "precond"
    assert np.isfinite(info["validation"]["after"]["query_loss_adapted"])


@pytest.mark.parametrize("method, extra", [("tpt", None), ("tpt+coop", "prompt"), ("tpt+gram", "meta"),
                                           ("tpt+gram-plain", "meta"), ("tpt+gram-struct", "meta")])
def test_tpt_stage_writes_scores_before_and_after(tptworld, tmp_path, method, extra, tiny_params):
    out = tmp_path / "run.json"
    args = tpt_args(tptworld, method, out) + ([f"--{extra}", str(tptworld[extra])] if extra else [])
    assert stage(*args) == 0
    rec = json.loads(out.read_text())
    cfg = tiny_params[1].tpt
    m = cfg.methods[method]
    assert [d["domain"] for d in rec["domains"]] == cfg.domains
    assert rec["init"]["init"] == m.init and rec["regulator"] == m.regulator
    for d in rec["domains"]:
        assert d["n"] > 0 and 0 <= d["before"]["balanced_accuracy"] <= 1 and 0 <= d["after"]["balanced_accuracy"] <= 1
        assert d["ms_per_image"] > 0 and set(d["time"]) == {"views_s", "encode_s", "tune_s"}
    if extra == "meta":
        assert rec["meta"]["recipe"] == "coop-tpt" and len(rec["meta"]["sha256"]) == 64
        assert ("prototypes_sha256" in rec["meta"]) == (m.regulator == "structure")
    if extra == "prompt":
        assert rec["init"]["source"]["method"] == "coop" and rec["init"]["source"]["shots"] == 4


def test_view_features_cache_gives_the_same_run(tptworld, tmp_path):
    """The first method's job writes the view features of (split, seed); the next one reads them and
    scores exactly as without the cache."""
    cache = tmp_path / "views"
    runs = []
    for i, extra in enumerate([["--views-cache", str(cache)], ["--views-cache", str(cache)], []]):
        out = tmp_path / f"r{i}.json"
        assert stage(*tpt_args(tptworld, "tpt", out), *extra) == 0
        runs.append(json.loads(out.read_text()))
    assert len(list(cache.iterdir())) == 1
    assert [d["views_cached"] for r in runs for d in r["domains"]] == [False, True, False]
    assert runs[0]["domains"][0]["after"] == runs[1]["domains"][0]["after"] == runs[2]["domains"][0]["after"]
    out = tmp_path / "s2.json"
    assert stage(*[a if a != "1" else "2" for a in tpt_args(tptworld, "tpt", out)], "--views-cache", str(cache)) == 0
    assert len(list(cache.iterdir())) == 2  # another seed, other views


def test_tpt_without_steps_predicts_with_the_initial_prompt(tptworld, tiny_params):
    """steps: 0 leaves the prompt as it is: the before and after predictions are those of zero-shot."""
    from gram.data.datasets import split_images

    bb = load(tptworld["backbone"], "cpu", "float32")
    learner = make_learner(bb, C.MethodParams(kind="coop", init="a {} emoji"), 0, 0)
    cfg = dataclasses.replace(tiny_params[1].tpt, steps=0)
    sp = split_images(tptworld["data"], "subgroup16", "apple", "test")
    res = T.TestTimeTuner(learner, learner.ctx, cfg).run(sp.images, sp.keys, sp.classes, seed=1)
    with torch.no_grad():
        zs = (learner.image_features(preprocess(sp.images, bb.spec)) @ learner.text_features(sp.classes).T).argmax(-1)
    assert np.array_equal(res["before"], res["after"]) and np.array_equal(res["after"], zs.numpy())


def test_a_methods_own_lr_replaces_tpts(tptworld, tmp_path, tiny_params):
    """`lr` of a test-time method replaces tpt.lr for that method alone: its run equals the run with tpt.lr set
    to the same value, and its lr 0 leaves every prediction where the initial prompt put it."""
    params, prof = tiny_params
    cfg = prof.tpt
    lr = cfg.lr * 10

    def scored(tpt_cfg, method):
        out = tmp_path / f"{method}-{tpt_cfg.lr}.json"
        return T.run(params, dataclasses.replace(prof, tpt=tpt_cfg), "subgroup16", method, 1, tptworld["data"],
                     tptworld["backbone"], out, progress=False)

    methods = {**cfg.methods, "own": dataclasses.replace(cfg.methods["tpt"], lr=lr),
               "frozen": dataclasses.replace(cfg.methods["tpt"], lr=0.0)}
    own, frozen = (scored(dataclasses.replace(cfg, methods=methods), m) for m in ("own", "frozen"))
    shared = scored(dataclasses.replace(cfg, lr=lr), "tpt")
    assert own["config"]["tpt"]["lr"] == shared["config"]["tpt"]["lr"] == lr
    assert [d["after"] for d in own["domains"]] == [d["after"] for d in shared["domains"]]
    assert all(d["after"] == d["before"] and d["changed"] == 0 for d in frozen["domains"])
    assert any(d["changed"] > 0 for d in shared["domains"])  # this lr does move predictions: the check can fail


def test_tpt_refuses_missing_or_extra_inputs(tptworld, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert stage(*tpt_args(tptworld, "tpt+gram", out)) == 1
    assert "pass --meta" in capsys.readouterr().err
    assert stage(*tpt_args(tptworld, "tpt", out), "--meta", str(tptworld["meta"])) == 1
    assert "uses neither a meta init nor a regulator" in capsys.readouterr().err
    assert stage(*tpt_args(tptworld, "tpt+coop", out)) == 1
    assert "pass --prompt" in capsys.readouterr().err
    assert stage(*tpt_args(tptworld, "nope", out)) == 1
    assert "is not defined in tiny.tpt.methods" in capsys.readouterr().err
    assert not out.exists()
    bad = tmp_path / "no-protos"
    assert stage("meta", "--recipe", "coop-tpt", "--data", str(tptworld["data"]), "--chc", str(tptworld["chc"]),
                 "--tasks", str(tptworld["tasks"]), "--backbone", str(tptworld["backbone"]), "--out", str(bad)) == 1
    assert "pass --prototypes" in capsys.readouterr().err
    assert not bad.exists()


@pytest.mark.parametrize("edit, message", [
    (lambda r: (r["grid"]["tpt"]["gram"].pop(1), r["grid"]["tpt"]["words"].append("tpt+gram-init")),
     "list it in grid.tpt.tuned"),
    (lambda r: r["grid"]["tpt"]["tuned"].__setitem__(0, {"method": "tpt+coop", "prompt": "vpt"}), "does not fit"),
    (lambda r: r["grid"]["tpt"]["tuned"].__setitem__(0, {"method": "tpt+coop", "prompt": "coop+gram"}),
     "is not in grid.tuned"),
    (lambda r: r["grid"]["tpt"]["gram"].append({"method": "tpt+gram", "meta": "coop"}), "more than once"),
    (lambda r: (r["emoji"]["meta"]["coop-tpt-plain"].update(  # a new dict: the recipes share one through `<<:`
                    regulator={**r["emoji"]["meta"]["coop-tpt-plain"]["regulator"], "context": False}),
                r["grid"]["tpt"]["gram"].__setitem__(0, {"method": "tpt+gram", "meta": "coop-tpt-plain"})),
     "regulator: structure needs a ψ that reads h"),
    (lambda r: r["grid"]["tpt"]["gram"].__setitem__(0, {"method": "tpt+gram", "meta": "coop"}),
     r"the prompt of `emoji\.meta\.coop` differ in \['init'\]"),
    (lambda r: (r["grid"]["tpt"].__setitem__("words", []),
                r["grid"]["tpt"]["gram"].__setitem__(0, {"method": "tpt", "meta": "coop-tpt"})), "reads no meta"),
    (lambda r: r["emoji"]["tpt"]["methods"]["tpt"].update(prompt={"kind": "vpt"}), "prompt.kind must be coop"),
    (lambda r: r["emoji"]["tpt"].update(keep=0.01), "keeps no view"),
    (lambda r: r["emoji"]["tpt"]["structure"].update(levels=[0, 7]), "tpt.structure.levels"),
    (lambda r: r["emoji"]["meta"]["coop-tpt"].update(regulator={"form": "gate"}, reg_lambda=0.0),
     "context: structure needs"),
    (lambda r: r["emoji"]["meta"]["coop"]["regulator"].update(form="mix", gate_context=True),
     "gate_context applies to form: gate"),
])
def test_tpt_config_errors_name_the_key(tmp_path, edit, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load(params_with(tmp_path, edit))
