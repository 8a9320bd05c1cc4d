"""GRAM meta-training (gram/meta.py) and GRAM methods in tuning: the meta-gradient against finite
differences, the first-order rule, exact resumption, bf16 autocast, the stage, and ψ_φ in tuning."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import TINY_PARAMS, params_with
from gram import cli
from gram import config as C
from gram import meta as M
from gram import regulator as R
from gram.backbone import load
from gram.prompts import make_learner
from gram.tune import frozen_features, tune

PARAMS = TINY_PARAMS
CAPTIONS = ["bright smiling circle face", "calm affection square", "round smiling circle", "tall affection square",
            "small smiling circle bright", "big affection square calm", "happy smiling circle", "quiet affection square"]


def stage(*argv: str) -> int:
    return cli.main([argv[0], "--params", PARAMS, "--profile", "tiny", *argv[1:]])


def tiny_learner(clip_dir, kind: str, dtype=torch.float64, seed: int = 0, **cfg_over):
    """A MetaLearner over a random tiny CLIP and a synthetic corpus of 8 pairs (float64 by default)."""
    bb = load(clip_dir, "cpu", "float32")
    bb.model.to(dtype)
    bb = dataclasses.replace(bb, dtype=dtype)
    prompt = C.MethodParams(kind=kind, init="a {} emoji", n_tokens=2, deep=True)
    cfg = dataclasses.replace(C.MetaParams(), prompt=prompt, inner_lr=0.5, seed=seed, **cfg_over)
    torch.manual_seed(seed)
    learner = make_learner(bb, prompt, 0, seed).to(dtype)
    e = bb.model.config.projection_dim
    regs = R.make_regulators(dict(learner.named_parameters()), cfg.regulator, e).to(dtype)
    with torch.no_grad():  # move φ off its near-identity start so every part of ψ matters
        for p in regs.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=dtype))
    gen = torch.Generator().manual_seed(1)
    n = len(CAPTIONS)
    frozen = torch.nn.functional.normalize(torch.randn(n, e, generator=gen, dtype=dtype), dim=-1)
    corpus = M.Corpus(keys=[f"d/{i}" for i in range(n)], captions=CAPTIONS,
                      pixels=torch.randn(n, 3, bb.spec.crop, bb.spec.crop, generator=gen, dtype=dtype), frozen=frozen)
    return M.MetaLearner(learner, regs, cfg, corpus)


S, Q = np.array([0, 1, 2, 3]), np.array([4, 5, 6, 7])


def outer_loss(ml, theta, phi):
    return ml.task_loss(theta, phi, S, Q)[0]


@pytest.mark.parametrize("kind", ["coop", pytest.param("joint", marks=pytest.mark.slow)])
def test_meta_gradient_matches_finite_differences(tiny_clip_dir, kind):
    """∇θ and ∇φ of L_Q(θ − α ψ_φ(∇θ L_S(θ); h)) (second order, torch.func) against central differences
    along random directions, in float64; for joint θ spans the text context, visual tokens and coupling."""
    ml = tiny_learner(tiny_clip_dir, kind, second_order=True, inner_steps=2)
    loss = outer_loss(ml, ml.theta, ml.phi)
    loss.backward()
    gen = torch.Generator().manual_seed(3)
    for part, grads in (("theta", ml.theta), ("phi", ml.phi)):
        for _ in range(2):
            d = {n: torch.randn(v.shape, generator=gen, dtype=v.dtype) for n, v in grads.items()}
            analytic = sum((grads[n].grad * d[n]).sum() for n in grads).item()

            def at(eps):
                moved = {n: (v.detach() + eps * d[n]).requires_grad_() for n, v in grads.items()}
                theta = moved if part == "theta" else ml.theta
                phi = moved if part == "phi" else ml.phi
                return outer_loss(ml, theta, phi).item()

            eps = 1e-5
            numeric = (at(eps) - at(-eps)) / (2 * eps)
            assert abs(analytic) > 1e-6, part  # the check must be able to fail
            assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9), (part, analytic, numeric)


def test_first_order_gives_theta_the_query_gradient_at_the_adapted_point(tiny_clip_dir):
    """First order: ∂θ'/∂θ = I, so ∇θ = ∇L_Q(θ'); φ still gets its exact gradient (with one inner step
    it is the second-order one, since g_S does not depend on φ)."""
    first = tiny_learner(tiny_clip_dir, "vpt", second_order=False)
    outer_loss(first, first.theta, first.phi).backward()
    adapted, _, _ = first.adapt(first.theta, first.phi, S)
    adapted = {n: v.detach().requires_grad_() for n, v in adapted.items()}
    ref = torch.autograd.grad(first.set_loss(adapted, Q), list(adapted.values()))
    for (n, p), g in zip(first.theta.items(), ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
    second = tiny_learner(tiny_clip_dir, "vpt", second_order=True)
    outer_loss(second, second.theta, second.phi).backward()
    for n in first.phi:
        torch.testing.assert_close(first.phi[n].grad, second.phi[n].grad, rtol=1e-10, atol=1e-12)
    assert any((first.theta[n].grad - second.theta[n].grad).abs().max() > 1e-8 for n in first.theta)


class _Tasks:
    """Four tasks over the 8 synthetic pairs."""

    support = [S, Q, S[:3], Q[1:]]
    query = [Q, S, Q[:3], S[1:]]
    similarity = np.array([0.5, 0.6, 0.7, 0.8], np.float32)

    def __len__(self):
        return 4


@pytest.mark.slow
def test_an_interrupted_meta_training_resumes_to_the_same_result(tiny_clip_dir, tmp_path):
    cfg = dict(steps=5, tasks_per_step=2, checkpoint_every=2)
    whole = tiny_learner(tiny_clip_dir, "joint", torch.float32, **cfg)
    h_whole = M.meta_train(whole, _Tasks(), whole.cfg, tmp_path / "a.ckpt", "d", progress=False)
    part = tiny_learner(tiny_clip_dir, "joint", torch.float32, **cfg)
    M.meta_train(part, _Tasks(), part.cfg, tmp_path / "b.ckpt", "d", progress=False, stop_after=3)  # ckpt at 2
    resumed = tiny_learner(tiny_clip_dir, "joint", torch.float32, **cfg)  # a fresh process: fresh θ, φ
    h_resumed = M.meta_train(resumed, _Tasks(), resumed.cfg, tmp_path / "b.ckpt", "d", progress=False)
    assert h_resumed == h_whole and len(h_whole) == 5
    for n in whole.theta:
        assert torch.equal(whole.theta[n], resumed.theta[n]), n
    for n in whole.phi:
        assert torch.equal(whole.phi[n], resumed.phi[n]), n
    # a checkpoint of other parameters is ignored, not trusted
    other = tiny_learner(tiny_clip_dir, "joint", torch.float32, **cfg)
    assert M.load_checkpoint(tmp_path / "b.ckpt", other, torch.optim.Adam(other.theta.values()), "other") == (0, [])


def _theta_grads_of_one_step(ml) -> dict[str, torch.Tensor]:
    """The gradient of θ that meta_train's Adam step receives (one outer step, no clip)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    seen = {}

    def hook(opt, args, kwargs):
        seen.update({n: v.grad.detach().clone() for n, v in ml.theta.items()})

    handle = register_optimizer_step_pre_hook(hook)
    try:
        M.meta_train(ml, _Tasks(), ml.cfg, None, progress=False)
    finally:
        handle.remove()
    return seen


def test_anchor_adds_exactly_its_gradient_to_theta(tiny_clip_dir):
    """anchor λ adds 2λ(θ − θ₀) to θ's outer gradient, θ₀ the init (here θ is moved off it first)."""
    grads = {}
    for lam in (0.0, 0.7):
        ml = tiny_learner(tiny_clip_dir, "coop", steps=1, tasks_per_step=2, grad_clip=0.0, anchor=lam)
        with torch.no_grad():
            for n, v in ml.theta.items():
                v.add_(0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(7), dtype=v.dtype))
        moved = {n: (v - ml.theta0[n]).detach().clone() for n, v in ml.theta.items()}
        grads[lam] = _theta_grads_of_one_step(ml)
    for n in grads[0.0]:
        torch.testing.assert_close(grads[0.7][n] - grads[0.0][n], 2 * 0.7 * moved[n], rtol=1e-9, atol=1e-12)
    assert M.anchor_loss({"a": torch.ones(2)}, {"a": torch.zeros(2)}, 0.5).item() == 1.0


def test_anchor_keeps_meta_learned_theta_near_its_words(tiny_clip_dir):
    drift = {}
    for lam in (0.0, 1.0e3):
        ml = tiny_learner(tiny_clip_dir, "coop", torch.float32, steps=6, tasks_per_step=2, lr=1.0e-2, anchor=lam)
        M.meta_train(ml, _Tasks(), ml.cfg, None, progress=False)
        drift[lam] = sum(float((ml.theta[n].detach() - ml.theta0[n]).norm() ** 2) for n in ml.theta) ** 0.5
    assert drift[0.0] > 0 and drift[1.0e3] < 0.5 * drift[0.0], drift


def test_task_order_is_a_function_of_seed_and_step():
    steps = [M.task_batch(10, 4, s, seed=3) for s in range(5)]
    assert np.array_equal(np.sort(np.concatenate(steps[:5])[:10]), np.arange(10))  # epoch 0 covers every task
    assert np.array_equal(M.task_batch(10, 4, 3, seed=3), steps[3])
    assert not np.array_equal(M.task_batch(10, 4, 0, seed=4), steps[0])


def test_bf16_autocast_step_keeps_theta_and_psi_in_float32(tiny_clip_dir):
    ml = tiny_learner(tiny_clip_dir, "joint", torch.float32, steps=2, tasks_per_step=2, autocast="bf16")
    before = {n: v.detach().clone() for n, v in ml.theta.items()}
    hist = M.meta_train(ml, _Tasks(), ml.cfg, None, progress=False)
    assert all(np.isfinite([h["support_loss"], h["query_loss"], h["gate"]]).all() for h in hist)
    assert all(v.dtype == torch.float32 for v in list(ml.theta.values()) + list(ml.phi.values()))
    assert any(not torch.equal(before[n], ml.theta[n]) for n in ml.theta)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = {n: torch.randn_like(v) for n, v in ml.theta.items()}
        assert all(v.dtype == torch.float32 for v in ml.regs(g, ml.frozen[:2].mean(0)).values())


def test_tuning_with_the_regulator_steps_along_psi_of_the_gradient(tiny_clip_dir):
    """One SGD step of `tune` with ψ_φ: θ1 = θ0 − lr · ψ_φ(∇θ L; h), h the mean frozen image feature."""
    ml = tiny_learner(tiny_clip_dir, "coop", torch.float64)
    learner, regs = ml.learner, ml.regs.requires_grad_(False)
    px, labels, names = ml.corpus.pixels[:6], torch.tensor([0, 1, 2, 0, 1, 2]), CAPTIONS[:3]
    theta0 = {n: v.detach().clone() for n, v in learner.named_parameters()}
    with torch.no_grad():
        img = frozen_features(learner, px)
    loss = (learner.clip.logit_scale.exp().float() * img @ learner.text_features(names).T)
    loss = torch.nn.functional.cross_entropy(loss, labels)
    g = dict(zip(theta0, torch.autograd.grad(loss, list(learner.parameters()))))
    want = {n: theta0[n] - 0.1 * v for n, v in regs(g, img.mean(0)).items()}
    tune(learner, px, labels, names, steps=1, lr=0.1, batch_size=0, optimizer="sgd", regulator=regs)
    for n, p in learner.named_parameters():
        torch.testing.assert_close(p.detach(), want[n], rtol=1e-9, atol=1e-12)
        assert not torch.allclose(want[n], theta0[n] - 0.1 * g[n])  # ψ really changed the step


# ------------------------------------------------------------------------------------------------
# the stage and the GRAM methods, through the CLI as the DAG runs them
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def metaworld(tmp_path_factory, tiny_data, tiny_trained_dir):
    root = tmp_path_factory.mktemp("meta")
    d = {"data": tiny_data, "backbone": tiny_trained_dir, "embed": root / "embed", "chc": root / "chc",
         "tasks": root / "tasks", "meta": root / "meta" / "coop", "root": root}
    assert stage("embed", "--data", str(tiny_data), "--backbone", str(tiny_trained_dir), "--out", str(d["embed"])) == 0
    assert stage("cluster", "--data", str(tiny_data), "--embed", str(d["embed"]), "--out", str(d["chc"])) == 0
    assert stage("tasks", "--chc", str(d["chc"]), "--out", str(d["tasks"])) == 0
    assert stage("meta", "--recipe", "coop", "--data", str(tiny_data), "--chc", str(d["chc"]), "--tasks",
                 str(d["tasks"]), "--backbone", str(tiny_trained_dir), "--out", str(d["meta"])) == 0
    return d


@pytest.mark.slow
def test_meta_stage_writes_theta_phi_history_and_validation(metaworld, tiny_params):
    out = metaworld["meta"]
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "meta.png", "meta.safetensors"]
    info = json.loads((out / "meta.json").read_text())
    cfg = tiny_params[1].meta["coop"]
    assert info["steps"] == cfg.steps == len(info["history"])
    assert info["tasks"]["cross_cluster"] is True and info["tasks"]["file"] == "tasks.safetensors"
    assert set(info["validation"]["before"]) == {"query_loss", "query_loss_adapted"}
    assert not (out.parent / ".coop.ckpt").exists()  # checkpoints go once the output is published
    bb = load(metaworld["backbone"], "cpu", "float32")
    learner = make_learner(bb, cfg.prompt, 0, 0)
    theta, regs, meta = R.load_meta(out, learner)
    assert {n: list(v.shape) for n, v in theta.items()} == info["theta"]
    assert not any(torch.equal(theta[n], p) for n, p in learner.named_parameters())  # θ moved
    assert meta["recipe"] == "coop" and not any(p.requires_grad for p in regs.parameters())
    vpt = make_learner(bb, C.MethodParams(kind="vpt", n_tokens=2), 0, 0)
    with pytest.raises(ValueError, match="meta.safetensors: meta-learned θ has tensors"):
        R.load_meta(out, vpt)


@pytest.mark.slow
def test_same_cluster_task_variant(metaworld):
    from gram.tasks import load_tasks

    same, meta = load_tasks(metaworld["tasks"], "same-cluster")
    assert meta["cross_cluster"] is False and (same.support_cluster == same.query_cluster).all()
    assert all(not set(s) & set(q) for s, q in zip(same.support, same.query))
    cross, _ = load_tasks(metaworld["tasks"])
    assert (cross.support_cluster != cross.query_cluster).all()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["coop+gram", "coop+gram-init", "coop+gram-reg"])
def test_gram_methods_tune_from_the_meta_output(metaworld, tmp_path, method):
    out = tmp_path / "run.json"
    common = ["--dataset", "subgroup16", "--method", method, "--shots", "2", "--seed", "1", "--data",
              str(metaworld["data"]), "--backbone", str(metaworld["backbone"])]
    assert stage("tune", "--protocol", "few-shot", *common, "--out", str(out), "--meta", str(metaworld["meta"]),
                 "--save-prompt", str(tmp_path / "p.safetensors")) == 0
    rec = json.loads(out.read_text())
    m = C.load(PARAMS, "tiny")[1].methods[method]
    assert rec["meta"]["recipe"] == "coop"
    assert (rec["meta"]["init"], rec["meta"]["regulator"]) == (m.meta_init, m.meta_regulator)
    assert 0.0 <= rec["summary"]["balanced_accuracy"] <= 1.0
    # the transfer protocols score the saved prompt without the meta output
    assert stage("tune", "--protocol", "domain-generalisation", *common, "--out", str(tmp_path / "dg.json"),
                 "--load-prompt", str(tmp_path / "p.safetensors")) == 0


@pytest.mark.slow
def test_gram_tuning_without_meta_is_refused(metaworld, tmp_path, capsys):
    common = ["--protocol", "few-shot", "--dataset", "subgroup16", "--shots", "1", "--seed", "1", "--data",
              str(metaworld["data"]), "--backbone", str(metaworld["backbone"]), "--out", str(tmp_path / "r.json")]
    assert stage("tune", *common, "--method", "coop+gram") == 1
    assert "is a GRAM method" in capsys.readouterr().err
    assert stage("tune", *common, "--method", "coop", "--meta", str(metaworld["meta"])) == 1
    assert "uses neither meta_init nor meta_regulator" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_meta_stage_refuses_tasks_of_another_hierarchy(metaworld, tmp_path, capsys):
    import shutil

    chc = tmp_path / "chc"
    shutil.copytree(metaworld["chc"], chc)
    (chc / "keys.txt").write_text((chc / "keys.txt").read_text().replace("facebook/", "facebook/x", 1))
    assert stage("meta", "--recipe", "coop", "--data", str(metaworld["data"]), "--chc", str(chc), "--tasks",
                 str(metaworld["tasks"]), "--backbone", str(metaworld["backbone"]), "--out", str(tmp_path / "m")) == 1
    assert "was drawn from another hierarchy" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["grid"]["gram"].append({"method": "coop", "meta": "coop"}), "uses neither meta_init"),
    (lambda r: r["grid"]["gram"].append({"method": "coop+gram", "meta": "nope"}), "is not in grid.meta"),
    (lambda r: r["grid"]["gram"].__setitem__(0, {"method": "coop+gram", "meta": "vpt"}), "differ in"),
    # VPT's tokens are meta-learned against its template's class features: another template would misread them
    (lambda r: r["emoji"]["meta"]["vpt"].update(prompt={"kind": "vpt", "n_tokens": 4, "deep": True,
                                                         "template": "a {} emoji"}),
     r"method 'vpt\+gram' and the prompt of `emoji\.meta\.vpt` differ in \['template'\]"),
    (lambda r: (r["grid"]["gram"].pop(1), r["grid"]["tuned"].append("vpt+gram")), "a GRAM method: list it in"),
    (lambda r: r["grid"]["tuned"].append("vpt+gram"), "is also in grid.tuned"),
    (lambda r: r["emoji"]["tasks"].__setitem__("variants", []), "needs 'same-cluster' in tasks.variants"),
    (lambda r: r["emoji"]["meta"]["coop"].update(reg_lambda=0.5, regulator={"form": "gate"}),
     r"`emoji\.meta\.coop\.reg_lambda` = 0\.5 > 0 applies to regulator\.form: mix only"),
    (lambda r: r["emoji"]["methods"]["linear-probe"].update(meta_init=True), "not linear-probe"),
])
def test_gram_config_errors_name_the_key(tmp_path, edit, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load(params_with(tmp_path, edit))
