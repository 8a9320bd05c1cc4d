"""Gradient regulating functions: identity-like start, scale invariance, exact gradients, and a
meta-gradient through one regulated inner step that matches finite differences."""

from __future__ import annotations

import pytest
import torch

from gram import regulator as R


def test_gate_form_starts_at_init_times_the_gradient():
    psi = R.Regulator(8, form="gate", init=0.95)
    g = torch.randn(5, 8)
    torch.testing.assert_close(psi(g), 0.95 * g, rtol=0, atol=1e-7)


def test_mix_form_mixes_a_rescaled_direction_with_the_gradient():
    torch.manual_seed(0)
    psi = R.Regulator(8, form="mix", rank=3, init=0.95)
    g = torch.randn(2, 4, 8) * 1e-4  # [C, M, D]-shaped, tiny like prompt gradients
    out = psi(g)
    g_hat = (out - 0.95 * g) / 0.05
    torch.testing.assert_close(g_hat.norm(dim=-1), g.norm(dim=-1), rtol=1e-4, atol=0)  # row norms kept
    assert not torch.allclose(g_hat, g)  # a learned direction, not the gradient itself
    torch.testing.assert_close(psi(g * 1e3), out * 1e3, rtol=1e-5, atol=0)  # equivariant to the scale


def test_zero_gradient_stays_zero_and_shapes_are_checked():
    for form in R.FORMS:
        psi = R.Regulator(6, form=form)
        assert torch.equal(psi(torch.zeros(3, 6)), torch.zeros(3, 6))
        with pytest.raises(ValueError, match="width 5; this regulator expects 6"):
            psi(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="unknown regulator form"):
        R.Regulator(6, form="film")


def test_context_gate_needs_a_context():
    psi = R.Regulator(6, form="mix", context_dim=4, init=0.8)
    g = torch.randn(2, 6)
    with pytest.raises(ValueError, match="pass h"):
        psi(g)
    assert torch.isclose(psi.gate(torch.randn(4)), torch.tensor(0.8))  # zero last layer: c = init for any h


@pytest.mark.parametrize("form", R.FORMS)
def test_regulator_gradients_match_finite_differences(form):
    torch.manual_seed(1)
    psi = R.Regulator(5, form=form, rank=2, hidden=4, context_dim=3 if form in ("mix", "precond") else None,
                      init=0.7).double()
    for p in psi.parameters():  # move away from the zero-initialised last layers
        p.data.add_(0.3 * torch.randn_like(p))
    names = [n for n, _ in psi.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in psi.parameters()]
    g = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    h = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(g, h, *ps):
        return torch.func.functional_call(psi, dict(zip(names, ps)), (g, h))

    assert torch.autograd.gradcheck(f, (g, h, *params))
    assert torch.autograd.gradgradcheck(f, (g, h, *params))  # the meta-gradient differentiates ψ twice


@pytest.mark.parametrize("form", ["mix", "precond"])
def test_meta_gradient_through_a_regulated_step_matches_finite_differences(form):
    """d/dθ and d/dφ of L_query(θ − α ψ_φ(∇θ L_support(θ))), second order, on a toy prompt problem."""
    torch.manual_seed(2)
    theta = {"ctx": torch.randn(3, 4, dtype=torch.float64)}
    regs = R.Regulators(theta, form=form, rank=2, hidden=3, context_dim=4).double()
    phi = {n: p.detach().clone() + 0.2 * torch.randn_like(p) for n, p in regs.named_parameters()}
    xs, xq = torch.randn(6, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    h = xs.mean(0)

    def loss(th, x):  # a prompt-like objective: log-sum-exp of token scores
        return torch.logsumexp(x @ th["ctx"].T, dim=1).mean() + 0.1 * (th["ctx"] ** 2).sum()

    def outer(th, ph):
        gs = torch.func.grad(loss)(th, xs)  # kept in the graph: full second order
        return loss(R.inner_step(th, gs, regs, ph, lr=0.5, h=h), xq)

    g_theta, g_phi = torch.func.grad(outer, argnums=(0, 1))(theta, phi)
    eps = 1e-6
    for which, tree, grads in (("theta", theta, g_theta), ("phi", phi, g_phi)):
        for name, t in tree.items():
            for idx in [(0,) * t.dim(), tuple(s - 1 for s in t.shape)]:
                plus = {k: v.clone() for k, v in tree.items()}
                minus = {k: v.clone() for k, v in tree.items()}
                plus[name][idx] += eps
                minus[name][idx] -= eps
                args_p = (plus, phi) if which == "theta" else (theta, plus)
                args_m = (minus, phi) if which == "theta" else (theta, minus)
                fd = (outer(*args_p) - outer(*args_m)) / (2 * eps)
                assert torch.isclose(grads[name][idx], fd, rtol=1e-5, atol=1e-8), (which, name, idx)


def test_regulators_cover_every_prompt_tensor():
    theta = {"ctx": torch.randn(4, 6), "visual.tokens": torch.randn(2, 3, 10)}
    regs = R.Regulators(theta, form="gate", init=0.5)
    out = regs({n: torch.ones_like(t) for n, t in theta.items()})
    assert {n: o.shape for n, o in out.items()} == {n: t.shape for n, t in theta.items()}
    assert all(torch.allclose(o, torch.full_like(o, 0.5)) for o in out.values())
    with pytest.raises(KeyError, match="no regulator for prompt tensors"):
        regs({"other": torch.ones(2, 6)})


def test_psi_ignores_autocast_and_returns_the_gradient_dtype():
    psi = R.Regulator(8, form="mix", rank=3)
    g = torch.randn(4, 8)
    ref = psi(g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = psi(g)
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    assert psi(g.bfloat16()).dtype == torch.bfloat16
