"""Gradient regulating functions ψ_φ (library part; meta-training that learns φ is issue 5). [sibling/ours]

GRAM meta-learns a lightweight function that maps the gradient of the prompt parameters θ to the
update direction used in the inner loop and in downstream tuning [abstract]. Its form is not public;
method-notes §2 gives the first two we implement; all act row by row (one row per prompt token, the last
dimension of a θ tensor) and all start close to the identity:

- "mix" [sibling: SUPMER's form]: ĝ = up(tanh(down(u))) with u the row's direction g/‖g‖ and a rank-r
  bottleneck, rescaled to the row's norm ‖g‖; a gate c = σ(gate(h)) from a task context h (e.g. the mean
  support feature; without a context, a learned scalar); ψ(g; h) = (1 − c)·ĝ + c·g. The gate's last bias
  starts at logit(`init`) (c ≈ 0.95 by default), so ψ starts near g. ĝ may point anywhere, so ψ is not
  guaranteed to be a descent direction: in the emoji runs ĝ became nearly the same direction for every input,
  orthogonal to g, while the gate fell from 0.95 to 0.14 (issue 19), hence "precond" below.
- "gate" [ours]: ψ(g) = σ(mlp(u)) ⊙ g elementwise, the last layer zero and its bias logit(`init`), so ψ
  starts at exactly `init`·g. With `gate_context`, the gate also reads the context h: a linear map of h
  (zero at the start) is added to the hidden layer, σ(out(tanh(hidden(u) + ctx(h)))) ⊙ g.
- "precond" [ours]: a positive-definite preconditioner conditioned on h, ψ(g; h) = g + U(h) U(h)ᵀ g, with
  U(h) = B (I + C(h)) of rank r: B [dim, r] learned (it starts as `PRECOND_START` times orthonormal
  columns), C(h) = out(tanh(in(h))) reshaped to [r, r] with `out` zero at the start (without a context, U = B).

Guarantee of "precond": for a fixed h, ψ(·; h) is the symmetric linear map P(h) = I + U(h)U(h)ᵀ, whose
eigenvalues lie in [1, 1 + ‖U(h)‖²], applied to every row; hence for every row g, whatever φ and h,
⟨ψ(g; h), g⟩ = ‖g‖² + ‖U(h)ᵀg‖² ≥ ‖g‖² (a descent direction: L(θ − αψ) < L(θ) for small α > 0 where
g ≠ 0), a zero row stays zero, ψ(λg) = λψ(g) for every λ (so the gradient's scale needs no care: the MLP
reads only h), and the angle to g is bounded by P's condition number κ = 1 + ‖U(h)‖²: cos(ψ(g), g) ≥
2√κ/(1 + κ) (Kantorovich). Directions do change (towards the span of U(h), by an amount that depends on
h), which matters to Adam-type steps that ignore a positive rescaling. At the start ‖ψ(g) − g‖ ≤
PRECOND_START²·‖g‖ row by row (≈ 9e-4·‖g‖). U does not read g: with U(u) for u = g/‖g‖, ⟨ψ(g), g⟩ ≥ ‖g‖²
would still hold pointwise (the inner product uses the P of that very g), but ψ would no longer be linear
in g nor a fixed metric, so we keep the stronger guarantee. U starts small rather than zero because
UUᵀ is quadratic in U: at U = 0 every gradient of φ vanishes and ψ could never leave the identity.

The structure-induced regulator of test-time tuning [abstract: "models the relation between test data
and the meta-learning prototypes"; the form is ours, method-notes §5] is ψ with a structure context:
`StructureContext` turns an image feature f into h = mean over the chosen hierarchy levels of
Σ_k softmax_k(cos(f, P_k)/τ)·P_k, the prototypes P of the prototypes stage. Meta-training with
`context: structure` feeds ψ the same h (of the mean support feature), so ψ learns to read it.

The meta stage (gram.meta) learns θ and φ and writes them to `META` in its output directory;
`load_meta` reads them back as θ and a frozen `Regulators`, for few-shot tuning (gram.tune) and
test-time tuning (gram.tpt), which therefore need not import the meta-training loop.

Feeding the MLPs the direction u rather than g makes them independent of the gradient's scale (prompt
gradients are often 1e-4 or smaller); a zero row stays zero. ψ is kept in float32 whatever the autocast
dtype (it computes in its parameters' dtype). `Regulators` holds one ψ per θ tensor; with `torch.func.functional_call` both θ and φ can be
treated functionally (`regulate`), which the meta-gradient needs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal, Mapping

import torch
import torch.nn as nn

from gram.config import RegulatorParams, reads_context, section_from_dict
from gram.tensorio import load_theta

FORMS = ("mix", "gate", "precond")
META = "meta.safetensors"  # the meta stage's θ and φ, in its output directory
EPS = 1.0e-12
PRECOND_START = 0.03  # "precond": U = PRECOND_START · (orthonormal columns) at the start, so ψ(g) ≈ g


def _logit(p: float) -> float:
    if not 0.0 < p < 1.0:
        raise ValueError(f"init must lie in (0, 1); got {p}")
    return math.log(p / (1.0 - p))


class Regulator(nn.Module):
    """ψ_φ for the gradient of one prompt tensor whose rows have width `dim`.

    Args:
        form: "mix", "gate" or "precond" (module docstring).
        rank: bottleneck width of the "mix" direction map, rank r of the "precond" factor U (at most `dim`);
            hidden: hidden width of the gates and of the "precond" context map.
        context_dim: width of the task context h of the "mix" gate (None: a learned scalar gate) or of the
            "precond" factor U(h) (None: a learned constant U).
        init: the gate's starting value (c for "mix", σ for "gate"; "precond" has no gate and ignores it).
        gate_context: "gate" form only: the gate reads h too (needs `context_dim`).
    """

    def __init__(self, dim: int, form: Literal["mix", "gate", "precond"] = "mix", rank: int = 16, hidden: int = 32,
                 context_dim: int | None = None, init: float = 0.95, gate_context: bool = False):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"unknown regulator form {form!r} (one of {', '.join(FORMS)})")
        if gate_context and (form != "gate" or context_dim is None):
            raise ValueError("gate_context needs form 'gate' and a context_dim")
        self.form, self.dim, self.context_dim, self.gate_context = form, dim, context_dim, gate_context
        if form == "mix":
            self.down = nn.Linear(dim, rank)
            self.up = nn.Linear(rank, dim)
            if context_dim is None:
                self.gate_bias = nn.Parameter(torch.tensor(_logit(init)))
            else:
                self.gate_in = nn.Linear(context_dim, hidden)
                self.gate_out = nn.Linear(hidden, 1)
                nn.init.zeros_(self.gate_out.weight)
                nn.init.constant_(self.gate_out.bias, _logit(init))
        elif form == "precond":
            basis, _ = torch.linalg.qr(torch.randn(dim, rank))  # [dim, r'] orthonormal, r' = min(dim, rank)
            self.rank = basis.shape[1]
            self.basis = nn.Parameter(PRECOND_START * basis)
            if context_dim is not None:
                self.coef_in = nn.Linear(context_dim, hidden)
                self.coef_out = nn.Linear(hidden, self.rank * self.rank)
                nn.init.zeros_(self.coef_out.weight)
                nn.init.zeros_(self.coef_out.bias)
        else:
            self.hidden_layer = nn.Linear(dim, hidden)
            self.out = nn.Linear(hidden, dim)
            nn.init.zeros_(self.out.weight)
            nn.init.constant_(self.out.bias, _logit(init))
            if gate_context:
                self.context_in = nn.Linear(context_dim, hidden)
                nn.init.zeros_(self.context_in.weight)
                nn.init.zeros_(self.context_in.bias)

    def _dtype(self) -> torch.dtype:
        """The dtype ψ computes in: its parameters' (float32 unless made otherwise), whatever θ's dtype."""
        if self.form == "precond":
            return self.basis.dtype
        return (self.down if self.form == "mix" else self.hidden_layer).weight.dtype

    def gate(self, h: torch.Tensor | None) -> torch.Tensor:
        """The "mix" gate c in (0, 1): a scalar tensor."""
        if self.context_dim is None:
            return torch.sigmoid(self.gate_bias)
        if h is None:
            raise ValueError("this regulator was built with a context (context_dim); pass h")
        return torch.sigmoid(self.gate_out(torch.tanh(self.gate_in(h.to(self._dtype()).reshape(-1))))).squeeze(-1)

    def factor(self, h: torch.Tensor | None) -> torch.Tensor:
        """The "precond" factor U(h) = B (I + C(h)) [dim, r] (B alone without a context)."""
        if self.context_dim is None:
            return self.basis
        if h is None:
            raise ValueError("this regulator was built with a context (context_dim); pass h")
        coef = self.coef_out(torch.tanh(self.coef_in(h.to(self._dtype()).reshape(-1))))  # [r·r]
        return self.basis + self.basis @ coef.reshape(self.rank, self.rank)  # [dim, r]

    def forward(self, g: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """ψ(g; h): the regulated gradient, same shape and dtype as g ([..., dim])."""
        if g.shape[-1] != self.dim:
            raise ValueError(f"gradient rows have width {g.shape[-1]}; this regulator expects {self.dim}")
        with torch.autocast(device_type=g.device.type, enabled=False):  # ψ stays in its own dtype
            rows = g.to(self._dtype()).reshape(-1, self.dim)  # [R, dim]
            if self.form == "precond":  # linear in g: no direction or norm needed
                u_h = self.factor(h)  # [dim, r]
                return (rows + (rows @ u_h) @ u_h.T).reshape(g.shape).to(g.dtype)  # (I + UUᵀ) g per row
            norm = rows.norm(dim=-1, keepdim=True)  # [R, 1]
            u = rows / norm.clamp(min=EPS)
            if self.form == "mix":
                d = self.up(torch.tanh(self.down(u)))  # [R, dim]
                g_hat = d / d.norm(dim=-1, keepdim=True).clamp(min=EPS) * norm  # row norms of g
                c = self.gate(h)
                out = (1.0 - c) * g_hat + c * rows
            else:
                pre = self.hidden_layer(u)  # [R, hidden]
                if self.gate_context:
                    if h is None:
                        raise ValueError("this regulator's gate reads a context (gate_context); pass h")
                    pre = pre + self.context_in(h.to(self._dtype()).reshape(-1))  # + [hidden]
                out = torch.sigmoid(self.out(torch.tanh(pre))) * rows
        return out.reshape(g.shape).to(g.dtype)


def _key(name: str) -> str:
    return name.replace(".", "__")


class Regulators(nn.Module):
    """One `Regulator` per θ tensor (by θ's names), each sized by that tensor's last dimension."""

    def __init__(self, theta: Mapping[str, torch.Tensor], **kwargs):
        super().__init__()
        self.names = list(theta)
        self.psi = nn.ModuleDict({_key(n): Regulator(t.shape[-1], **kwargs) for n, t in theta.items()})

    def forward(self, grads: Mapping[str, torch.Tensor], h: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        missing = [n for n in grads if _key(n) not in self.psi]
        if missing:
            raise KeyError(f"no regulator for prompt tensors {missing} (have {self.names})")
        return {n: self.psi[_key(n)](g, h) for n, g in grads.items()}


def regulate(regs: Regulators, phi: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor],
             h: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """ψ_φ(grads; h) with φ given explicitly (a dict like `dict(regs.named_parameters())`), so that a
    meta-gradient can flow to φ through `torch.func`."""
    return torch.func.functional_call(regs, dict(phi), (grads, h))


def inner_step(theta: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor], regs: Regulators,
               phi: Mapping[str, torch.Tensor], lr: float, h: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """θ' = θ − lr · ψ_φ(∇θ; h): one regulated gradient step, differentiable in θ, the gradients and φ."""
    reg = regulate(regs, phi, grads, h)
    return {n: t - lr * reg[n] if n in reg else t for n, t in theta.items()}



class StructureContext:
    """h(f) = mean over levels of Σ_k softmax_k(cos(f, P_k) / τ) · P_k: an image feature's relation to the
    meta-training prototypes of the hierarchy, as a context for ψ (module docstring).

    Args:
        prototypes: the tensors of the prototypes stage (`prototypes.safetensors`).
        levels: hierarchy levels to relate to (0 = the finest).
        tau: softmax temperature over the cosines.
        modality: "image", "text" or "fused" prototypes.
        sub: use the complexity-informed sub-prototypes instead of one prototype per cluster.
    """

    def __init__(self, prototypes: Mapping[str, torch.Tensor], levels: list[int], tau: float = 0.05,
                 modality: str = "image", sub: bool = False):
        if tau <= 0:
            raise ValueError(f"tau must be positive; got {tau}")
        self.levels, self.tau = list(levels), tau
        self.bank = []
        for lv in self.levels:
            key = f"level{lv}.sub.{modality}" if sub else f"level{lv}.{modality}"
            if key not in prototypes:
                have = sorted({k.split(".")[0] for k in prototypes})
                raise KeyError(f"prototypes have no {key!r} (levels present: {', '.join(have)})")
            self.bank.append(torch.nn.functional.normalize(prototypes[key].float(), dim=-1))  # [K, E]
        if not self.bank:
            raise ValueError("StructureContext needs at least one level")

    def to(self, device) -> "StructureContext":
        self.bank = [b.to(device) for b in self.bank]
        return self

    def weights(self, f: torch.Tensor) -> list[torch.Tensor]:
        """Per level, the relation w [..., K] of features f [..., E] to that level's prototypes."""
        f = torch.nn.functional.normalize(f.float(), dim=-1)
        return [torch.softmax(f @ b.T / self.tau, dim=-1) for b in self.bank]

    def __call__(self, f: torch.Tensor) -> torch.Tensor:
        """h [..., E] for image features f [..., E]."""
        return torch.stack([w @ b for w, b in zip(self.weights(f), self.bank)]).mean(0)


def make_regulators(theta: dict[str, torch.Tensor], cfg: RegulatorParams, context_dim: int) -> Regulators:
    """ψ_φ for every θ tensor, as `cfg` says; φ in float32."""
    r = cfg
    return Regulators(theta, form=r.form, rank=r.rank, hidden=r.hidden, init=r.init,
                      context_dim=context_dim if reads_context(r) else None,
                      gate_context=r.form == "gate" and r.gate_context)


def load_meta(meta_dir: str | Path, learner=None) -> tuple[dict[str, torch.Tensor], Regulators, dict]:
    """(θ, ψ_φ with φ loaded and frozen, metadata) of a meta-train output directory.

    With `learner`, θ's names and shapes must equal the learner's (the error names the file)."""
    path = Path(meta_dir) / META
    theta, phi, meta = load_theta(path)
    if learner is not None:
        want = {n: tuple(p.shape) for n, p in learner.named_parameters()}
        have = {n: tuple(v.shape) for n, v in theta.items()}
        if want != have:
            raise ValueError(f"{path}: meta-learned θ has tensors {have}, the method's prompt has {want} "
                             f"(meta recipe prompt {meta.get('config', {}).get('prompt')})")
    rcfg = section_from_dict(RegulatorParams, meta["config"]["regulator"], str(path), "regulator")
    regs = make_regulators(theta, rcfg, int(meta["context_dim"]))
    regs.load_state_dict(phi)
    regs.requires_grad_(False)
    return theta, regs, meta


def meta_run(meta_dir: str | Path, seed: int | None) -> tuple[Path, int]:
    """(directory, run index) of the meta-training run that grid seed `seed` reads: run (seed − 1) mod N of a
    recipe trained with `seeds` = N (`seed` None, or one run: run 0, the top of `meta_dir`)."""
    meta_dir = Path(meta_dir)
    info = meta_dir / "meta.json"
    n = len(json.loads(info.read_text()).get("runs", [])) if info.exists() else 0
    if seed is None or n <= 1:
        return meta_dir, 0
    k = (seed - 1) % n
    return (meta_dir if k == 0 else meta_dir / f"run{k}"), k
