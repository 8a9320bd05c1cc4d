"""Prompt learners: exact equalities with CLIP's own features, the functional θ interface, gradients."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gram import backbone as B
from gram.images import image_spec, preprocess
from gram.prompts import VPT, CoOp, Joint

NAMES = ["circle", "happy ring", "calm square", "bright star"]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def bb(request, tiny_clip_dir):
    from transformers import CLIPModel

    loaded = B.load(tiny_clip_dir, "cpu")
    model = CLIPModel.from_pretrained(tiny_clip_dir, attn_implementation=request.param).eval().requires_grad_(False)
    return dataclasses.replace(loaded, model=model)


@pytest.fixture(scope="module")
def pixels(tiny_clip_dir):
    imgs = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    return preprocess(imgs, image_spec(tiny_clip_dir))


def reference_text(bb, texts):
    tok = B.tokenize(bb.tokenizer, texts, bb.model.config.text_config.max_position_embeddings)
    return F.normalize(bb.model.get_text_features(**tok).pooler_output, dim=-1)


def test_coop_from_template_words_reproduces_the_hard_prompt(bb):
    learner = CoOp(bb, init="a {} emoji")
    assert learner.n_ctx == 1 and set(learner.theta()) == {"ctx"}
    ours = learner.text_features(NAMES)
    ref = reference_text(bb, [f"a {n} emoji" for n in NAMES])
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_longer_prefix_and_class_specific_context(bb):
    unified = CoOp(bb, init="an emoji of a {}")
    specific = CoOp(bb, init="an emoji of a {}", class_specific=True, n_classes=len(NAMES))
    assert unified.ctx.shape[0] == 4 and specific.ctx.shape[:2] == (len(NAMES), 4)
    ref = reference_text(bb, [f"an emoji of a {n}" for n in NAMES])
    torch.testing.assert_close(unified.text_features(NAMES), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(specific.text_features(NAMES), ref, rtol=0, atol=1e-5)


def test_truncation_to_the_longest_eos_changes_nothing(bb):
    learner = CoOp(bb, init=None, n_ctx=3, generator=torch.Generator().manual_seed(0))
    names = ["circle", "bright happy calm ring star"]
    full = learner.text_features(names, truncate=False)
    torch.testing.assert_close(learner.text_features(names, truncate=True), full, rtol=0, atol=1e-6)


def test_vpt_without_tokens_reproduces_the_image_features(bb, pixels):
    learner = VPT(bb, n_tokens=0)
    ref = F.normalize(bb.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    torch.testing.assert_close(learner.image_features(pixels), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("template", ["an emoji of a {}", "a {} emoji.", "{}"])
def test_vpt_class_features_are_its_templates_hard_prompt(bb, template):
    learner = VPT(bb, n_tokens=2, deep=True, template=template, generator=torch.Generator().manual_seed(0))
    ref = reference_text(bb, [template.format(n) for n in NAMES])
    torch.testing.assert_close(learner.text_features(NAMES), ref, rtol=0, atol=1e-5)
    # without a template: the bare names, which are other features
    bare = VPT(bb, n_tokens=2).text_features(NAMES)
    torch.testing.assert_close(bare, reference_text(bb, NAMES), rtol=0, atol=1e-5)
    if template != "{}":
        assert (bare - ref).abs().max() > 1e-2


def test_a_vpt_template_is_checked_where_it_is_written():
    from gram.config import ConfigError, MethodParams

    with pytest.raises(ConfigError, match="template.*applies to vpt only"):
        MethodParams(kind="coop", template="a {}")
    with pytest.raises(ConfigError, match="template.*once"):
        MethodParams(kind="vpt", template="a photo")
    assert MethodParams(kind="vpt", template="a photo of a {}.").template == "a photo of a {}."


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_tokens_change_the_features_and_get_gradients(bb, pixels, deep):
    learner = VPT(bb, n_tokens=2, deep=deep, generator=torch.Generator().manual_seed(0))
    layers = bb.model.config.vision_config.num_hidden_layers
    assert learner.vpt.shape == (layers if deep else 1, 2, bb.model.config.vision_config.hidden_size)
    ref = F.normalize(bb.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    feats = learner.image_features(pixels)
    assert (feats - ref).abs().max() > 1e-4
    loss = learner.logits(pixels, NAMES).logsumexp(-1).mean()
    (g,) = torch.autograd.grad(loss, [learner.vpt])
    assert torch.isfinite(g).all() and (g.abs().sum(dim=(1, 2)) > 0).all()  # every layer's tokens matter
    assert not any(p.requires_grad for p in bb.model.parameters())


def test_joint_starts_as_its_two_parts(bb, pixels):
    joint = Joint(bb, init="a {} emoji", n_tokens=2, deep=True, coupled=True,
                  generator=torch.Generator().manual_seed(0))
    assert set(joint.theta()) == {"ctx", "vpt", "couple"}
    vpt = VPT(bb, n_tokens=2, deep=True)
    with torch.no_grad():
        vpt.vpt.copy_(joint.vpt)
    torch.testing.assert_close(joint.image_features(pixels), vpt.image_features(pixels), rtol=0, atol=0)
    torch.testing.assert_close(joint.text_features(NAMES), CoOp(bb, init="a {} emoji").text_features(NAMES),
                               rtol=0, atol=0)
    # the coupling carries the text context's gradient into the visual side
    loss = joint.logits(pixels, NAMES).logsumexp(-1).mean()
    g = torch.autograd.grad(loss, [joint.couple])[0]
    assert g.abs().sum() > 0


def test_functional_call_evaluates_any_theta(bb, pixels):
    learner = Joint(bb, n_tokens=2, generator=torch.Generator().manual_seed(0))
    theta = {k: v.detach() + 0.05 * torch.randn_like(v) for k, v in learner.theta().items()}
    a = torch.func.functional_call(learner, theta, (pixels, NAMES))
    b = learner.logits(pixels, NAMES, theta)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, learner(pixels, NAMES))


def test_theta_gradient_matches_finite_differences(bb, pixels):
    learner = CoOp(bb, init="a {} emoji")
    labels = torch.tensor([0, 2, 1])
    theta = {k: v.detach().double().requires_grad_(False) for k, v in learner.theta().items()}

    def loss_of(th):
        return F.cross_entropy(learner.logits(pixels, NAMES, {"ctx": th["ctx"].float()}).double(), labels)

    grad = torch.func.grad(loss_of)(theta)["ctx"]
    eps = 1e-3
    for idx in [(0, 0), (0, 5), (0, 17)]:
        plus = {k: v.clone() for k, v in theta.items()}
        minus = {k: v.clone() for k, v in theta.items()}
        plus["ctx"][idx] += eps
        minus["ctx"][idx] -= eps
        fd = (loss_of(plus) - loss_of(minus)) / (2 * eps)
        assert abs(fd.item() - grad[idx].item()) < 2e-3 * max(1.0, abs(fd.item())), (idx, fd, grad[idx])


def test_no_room_for_the_name_is_a_clear_error(bb):
    learner = CoOp(bb, init=None, n_ctx=15)
    with pytest.raises(ValueError, match="leave no room for the class name"):
        learner.text_features(["circle"])
