"""The descent-preserving regulator "precond" (issue 19) and SUPMER's regulariser target: ⟨ψ(g; h), g⟩ ≥ ‖g‖²
row by row at any φ, identity at the start within PRECOND_START², directions that change, exact gradients
(first and second order), and a meta-training run whose θ and φ load back for tuning and test-time tuning."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from gram import config as C
from gram import meta as M
from gram import regulator as R
from gram.backbone import load
from gram.prompts import make_learner
from gram.tune import frozen_features, tune
from test_meta import PARAMS, Q, S, outer_loss, stage, tiny_learner

PRECOND = C.RegulatorParams(form="precond", rank=3, hidden=4)


def randomised(psi: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """ψ with every parameter moved by `scale`·N(0, 1): far from its start, where the guarantee must still hold."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in psi.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return psi


def gradients(seed: int, rows: int = 7, dim: int = 6) -> list[torch.Tensor]:
    """Random gradients at several scales (prompt gradients are often tiny), some with zero rows."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for scale in (1e-6, 1e-3, 1.0, 1e3):
        g = scale * torch.randn(rows, dim, generator=gen)
        g[::3] = 0.0  # zero rows
        out.append(g)
        out.append(scale * torch.randn(2, 3, dim, generator=gen))  # [C, M, D]-shaped
    return out


@pytest.mark.parametrize("context", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_precond_is_a_descent_direction_row_by_row_at_any_phi(context, seed):
    psi = R.Regulator(6, form="precond", rank=3, hidden=5, context_dim=4 if context else None)
    randomised(psi, scale=2.0 if seed % 2 else 0.3, seed=seed)
    gen = torch.Generator().manual_seed(100 + seed)
    for g in gradients(seed):
        for _ in range(3):
            h = 3.0 * torch.randn(4, generator=gen)
            out = psi(g, h)
            rows, prows = g.reshape(-1, 6).double(), out.reshape(-1, 6).double()
            inner = (prows * rows).sum(-1)
            sq = (rows * rows).sum(-1)
            # ⟨ψ(g), g⟩ = ‖g‖² + ‖Uᵀg‖² ≥ ‖g‖² ≥ 0 (float32 rounding allowed for)
            assert (inner >= sq * (1 - 1e-5)).all(), (inner - sq).min()
            assert (inner >= 0).all()
            zero = sq == 0
            assert torch.equal(prows[zero], torch.zeros_like(prows[zero]))  # a zero row stays zero
            u = psi.factor(h).double()
            torch.testing.assert_close(inner, sq + ((rows @ u) ** 2).sum(-1), rtol=1e-5, atol=0)
            big = out.detach() * 1e3  # equivariant to the scale (atol: cancellation in single entries)
            torch.testing.assert_close(psi(g * 1e3, h), big, rtol=1e-5, atol=1e-6 * float(big.abs().max()))


def test_precond_starts_within_precond_start_squared_of_the_identity():
    torch.manual_seed(0)
    psi = R.Regulator(10, form="precond", rank=4, context_dim=5)
    gen = torch.Generator().manual_seed(1)
    g, h = torch.randn(8, 10, generator=gen), torch.randn(5, generator=gen)
    out = psi(g, h)
    err = (out - g).norm(dim=-1)
    assert (err <= R.PRECOND_START ** 2 * g.norm(dim=-1) * (1 + 1e-5)).all()  # UUᵀ = 0.03² · a projection
    assert err.max() > 0  # U starts small, not zero (UUᵀ is quadratic in U: at zero no gradient reaches φ)
    torch.testing.assert_close(psi(g, h), psi(g, 10 * h))  # C(h) is zero at the start: h does not matter yet
    assert R.Regulator(3, form="precond", rank=8).rank == 3  # the rank is at most the row width


def test_precond_changes_directions_depending_on_the_context():
    psi = R.Regulator(6, form="precond", rank=2, hidden=5, context_dim=4)
    randomised(psi, scale=1.0, seed=3)
    gen = torch.Generator().manual_seed(4)
    g, h1, h2 = torch.randn(20, 6, generator=gen), torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    cos = torch.nn.functional.cosine_similarity(psi(g, h1), g, dim=-1)
    assert (cos < 0.99).any() and (cos > 0).all()  # rotated, never past 90°
    assert not torch.allclose(psi(g, h1), psi(g, h2))  # the rotation depends on h
    # Kantorovich: cos ≥ 2√κ/(1 + κ) with κ = 1 + ‖U(h)‖², P's condition number
    kappa = 1 + torch.linalg.matrix_norm(psi.factor(h1), ord=2) ** 2
    assert (cos >= 2 * kappa.sqrt() / (1 + kappa) - 1e-6).all()
    with pytest.raises(ValueError, match="pass h"):
        psi(g)


def test_precond_parameters():
    """φ of the precond form: the basis B and the map h -> C(h) (its gradients: test_regulator.py)."""
    psi = R.Regulator(5, form="precond", rank=2, hidden=4, context_dim=3)
    assert {n for n, _ in psi.named_parameters()} == {"basis", "coef_in.weight", "coef_in.bias", "coef_out.weight",
                                                      "coef_out.bias"}


def test_precond_meta_gradient_of_the_task_loss_matches_finite_differences(tiny_clip_dir):
    """The tiny CLIP's text-as-class task loss, two inner steps, second order, as for the other forms."""
    ml = tiny_learner(tiny_clip_dir, "coop", second_order=True, inner_steps=2, regulator=PRECOND)
    assert isinstance(ml.regs.psi["ctx"], R.Regulator) and ml.regs.psi["ctx"].form == "precond"
    outer_loss(ml, ml.theta, ml.phi).backward()
    gen = torch.Generator().manual_seed(3)
    for part, grads in (("theta", ml.theta), ("phi", ml.phi)):
        d = {n: torch.randn(v.shape, generator=gen, dtype=v.dtype) for n, v in grads.items()}
        analytic = sum((grads[n].grad * d[n]).sum() for n in grads).item()

        def at(eps):
            moved = {n: (v.detach() + eps * d[n]).requires_grad_() for n, v in grads.items()}
            return outer_loss(ml, moved if part == "theta" else ml.theta, moved if part == "phi" else ml.phi).item()

        numeric = (at(1e-5) - at(-1e-5)) / 2e-5
        assert abs(analytic) > 1e-6, part
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9), (part, analytic, numeric)


# ------------------------------------------------------------------------------------------------
# SUPMER's regulariser target
# ------------------------------------------------------------------------------------------------
def test_regulariser_target_is_one_plus_the_mean_row_cosine_over_two():
    g_q = {"ctx": torch.tensor([[1.0, 0.0], [0.0, 2.0]]), "vis": torch.tensor([[[3.0, 4.0]]])}
    reg = {"ctx": torch.tensor([[1.0, 1.0], [0.0, -5.0]]), "vis": torch.tensor([[[4.0, -3.0]]])}
    # row cosines: 1/√2, −1, 0 (orthogonal); their mean (1/√2 − 1)/3
    want = (1 + (2 ** -0.5 - 1.0 + 0.0) / 3) / 2
    assert M.regulariser_target(g_q, reg).item() == pytest.approx(want, abs=1e-7)
    assert M.regulariser_target({"ctx": g_q["ctx"]}, {"ctx": g_q["ctx"] * 1e-6}).item() == pytest.approx(1.0)


def test_the_regulariser_is_lambda_times_gate_minus_target_squared(tiny_clip_dir):
    """task_loss with reg_lambda adds λ (c − (1 + mean row cos(g_Q, ψ(g_S)))/2)², computed here by hand;
    first order it gives θ no gradient (the cosine's inputs are detached) but gives φ one."""
    lam = 0.7
    ml = tiny_learner(tiny_clip_dir, "joint", reg_lambda=lam)  # the default form: mix
    loss, _, lq, gate = ml.task_loss(ml.theta, ml.phi, S, Q)
    adapted, _, reg_s = ml.adapt(ml.theta, ml.phi, S)
    names = list(adapted)
    adapted = {n: v.detach().requires_grad_() for n, v in adapted.items()}
    g_q = torch.autograd.grad(ml.set_loss(adapted, Q), [adapted[n] for n in names])
    cos = []
    for n, g in zip(names, g_q):
        a, b = g.reshape(-1, g.shape[-1]), reg_s[n].detach().reshape(-1, g.shape[-1])
        cos += [float(x @ y / (x.norm() * y.norm())) for x, y in zip(a, b)]
    target = (1 + np.mean(cos)) / 2
    assert len(cos) > 2 and float(loss.detach()) == pytest.approx(float(lq) + lam * (float(gate) - target) ** 2, rel=1e-10)
    params = list(ml.theta.values()) + list(ml.phi.values())
    with_reg = torch.autograd.grad(loss, params, allow_unused=True)
    ml.cfg = dataclasses.replace(ml.cfg, reg_lambda=0.0)
    without = torch.autograd.grad(ml.task_loss(ml.theta, ml.phi, S, Q)[0], params, allow_unused=True)
    n_theta = len(ml.theta)
    for a, b in zip(with_reg[:n_theta], without[:n_theta]):  # θ: the same gradient with or without it
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert any(not torch.allclose(a, b) for a, b in zip(with_reg[n_theta:], without[n_theta:]) if a is not None)


@pytest.mark.parametrize("edit", [dict(form="precond"), dict(form="gate")])
def test_reg_lambda_is_refused_without_a_gate(edit):
    with pytest.raises(C.ConfigError, match=r"`reg_lambda` = 0\.5 > 0 applies to regulator\.form: mix only"):
        C.MetaParams(regulator=C.RegulatorParams(**edit), reg_lambda=0.5)
    assert C.reads_context(C.RegulatorParams(form="precond"))
    assert not C.reads_context(C.RegulatorParams(form="precond", context=False))


# ------------------------------------------------------------------------------------------------
# through the stages: meta-train with precond, load, tune
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_precond_meta_output_loads_back_and_tunes(tmp_path, tiny_data, tiny_trained_dir):
    """The tiny recipe coop-tpt-plain (form precond) through `gram meta`: the output records the form,
    load_meta rebuilds that ψ with the learned φ, and few-shot tuning with it runs (CLI) and steps along
    ψ(g; h) (by hand)."""
    d = {k: tmp_path / k for k in ("embed", "chc", "tasks", "meta")}
    assert stage("embed", "--data", str(tiny_data), "--backbone", str(tiny_trained_dir), "--out", str(d["embed"])) == 0
    assert stage("cluster", "--data", str(tiny_data), "--embed", str(d["embed"]), "--out", str(d["chc"])) == 0
    assert stage("tasks", "--chc", str(d["chc"]), "--out", str(d["tasks"])) == 0
    assert stage("meta", "--recipe", "coop-tpt-plain", "--data", str(tiny_data), "--chc", str(d["chc"]), "--tasks",
                 str(d["tasks"]), "--backbone", str(tiny_trained_dir), "--out", str(d["meta"])) == 0
    info = json.loads((d["meta"] / "meta.json").read_text())
    assert info["config"]["regulator"]["form"] == "precond"
    assert all(h["gate"] is None for h in info["history"])  # no gate to report

    cfg = C.load(PARAMS, "tiny")[1].meta["coop-tpt-plain"]
    bb = load(tiny_trained_dir, "cpu", "float32")
    learner = make_learner(bb, cfg.prompt, 0, 0)
    theta, regs, meta = R.load_meta(d["meta"], learner)
    psi = regs.psi["ctx"]
    assert psi.form == "precond" and psi.context_dim == info["context_dim"]
    torch.manual_seed(123)  # a fresh ψ differs: the loaded basis is the meta-learned one
    fresh = R.make_regulators(theta, cfg.regulator, info["context_dim"])
    assert not torch.equal(fresh.psi["ctx"].basis, psi.basis)
    assert not torch.equal(psi.coef_out.weight, torch.zeros_like(psi.coef_out.weight))  # φ moved off its start

    with torch.no_grad():
        for n, p in learner.named_parameters():
            p.copy_(theta[n])
    gen = torch.Generator().manual_seed(0)
    px = torch.randn(6, 3, bb.spec.crop, bb.spec.crop, generator=gen)
    labels, names = torch.tensor([0, 1, 2, 0, 1, 2]), ["smiling face", "red heart", "green tree"]
    with torch.no_grad():
        img = frozen_features(learner, px)
    logits = learner.clip.logit_scale.exp().float() * img @ learner.text_features(names).T
    g = dict(zip(theta, torch.autograd.grad(torch.nn.functional.cross_entropy(logits, labels),
                                            list(learner.parameters()))))
    step = regs(g, img.mean(0))
    assert all((step[n] * g[n]).sum() >= (g[n] ** 2).sum() for n in g)  # a descent direction
    want = {n: theta[n] - 0.1 * step[n] for n in theta}
    tune(learner, px, labels, names, steps=1, lr=0.1, batch_size=0, optimizer="sgd", regulator=regs)
    for n, p in learner.named_parameters():
        torch.testing.assert_close(p.detach(), want[n], rtol=1e-5, atol=1e-7)

    out = tmp_path / "run.json"
    assert stage("tune", "--protocol", "few-shot", "--dataset", "subgroup16", "--method", "coop+gram-reg",
                 "--shots", "2", "--seed", "1", "--data", str(tiny_data), "--backbone", str(tiny_trained_dir),
                 "--out", str(out), "--meta", str(d["meta"])) == 0
    rec = json.loads(out.read_text())
    assert rec["meta"]["recipe"] == "coop-tpt-plain" and rec["meta"]["regulator"] is True
