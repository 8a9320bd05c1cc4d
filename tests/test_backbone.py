"""Backbone: tokenizer and EOS pooling, preprocessing, save/load round trip, pretraining and resume."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from gram import backbone as B
from gram import config as C
from gram.images import ImageSpec, image_spec, preprocess


def test_tokenizer_special_ids_and_padding(tiny_clip_dir):
    bb = B.load(tiny_clip_dir, "cpu")
    tok = B.tokenize(bb.tokenizer, ["a happy circle", "circle"], 16)
    ids = tok["input_ids"]
    assert bb.tokenizer.convert_tokens_to_ids(["<pad>", "<unk>", "<s>", "</s>"]) == [0, 1, 2, 3]
    assert (ids[:, 0] == 2).all()
    eos = tok["attention_mask"].sum(1) - 1
    assert (ids[torch.arange(2), eos] == 3).all() and ids[1, -1] == 0


def test_truncation_keeps_eos(tiny_clip_dir):
    bb = B.load(tiny_clip_dir, "cpu")
    ids = B.tokenize(bb.tokenizer, [" ".join(["circle"] * 40)], 16)["input_ids"]
    assert ids.shape[1] == 16 and ids[0, -1] == 3


def test_text_features_pool_at_the_eos_token(tiny_clip_dir):
    """transformers pools at argmax(ids) when eos_token_id == 2; ours (3) must pool at the EOS."""
    bb = B.load(tiny_clip_dir, "cpu")
    tok = B.tokenize(bb.tokenizer, ["a happy circle", "square"], 16)
    assert (tok["input_ids"].max(1).values > 3).all()  # argmax pooling would pick another position
    tm = bb.model.text_model
    out = tm(**tok)
    eos = tok["attention_mask"].sum(1) - 1
    expect = out.last_hidden_state[torch.arange(2), eos]
    torch.testing.assert_close(out.pooler_output, expect, rtol=0, atol=0)


def test_preprocess_matches_the_image_processor(tiny_clip_dir):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    imgs[:, 16:48, 16:48] = [200, 40, 40]  # structure, not only noise
    spec = image_spec(tiny_clip_dir)
    ours = preprocess(imgs, spec)
    ref = CLIPImageProcessorPil.from_pretrained(tiny_clip_dir)(list(imgs), return_tensors="pt")["pixel_values"]
    assert ours.shape == ref.shape == (3, 3, 32, 32)
    # PIL's and torch's antialiased bicubic kernels differ slightly at the same size: < 3/255 in
    # pixel units, i.e. 6/255 after normalisation with std 0.5
    assert (ours - ref).abs().max() < 6 / 255
    assert (ours - ref).abs().mean() < 1 / 255


def test_preprocess_resizes_shortest_side_and_centre_crops():
    spec = ImageSpec(size=8, crop=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    img = np.zeros((1, 16, 32, 3), np.uint8)
    img[:, :, 8:24] = 255  # the central half is white
    x = preprocess(img, spec)
    assert x.shape == (1, 3, 8, 8)
    # the crop keeps the white half; only the bicubic kernel at its border sees the black quarters
    torch.testing.assert_close(x[..., 1:-1], torch.ones_like(x[..., 1:-1]), atol=1e-3, rtol=0)
    assert x[..., 0].min() > 0.9


def test_round_trip_through_the_backbone_stage(tiny_clip_dir, tmp_path):
    """`source: hub` with a local directory saves a copy that loads to identical features."""
    cfg = C.BackboneParams(source="hub", model=str(tiny_clip_dir), device="cpu")
    B.run(cfg, [], None, tmp_path / "bb")
    a, b = B.load(tiny_clip_dir, "cpu"), B.load(tmp_path / "bb", "cpu")
    texts = ["a happy circle emoji.", "a calm ring"]
    imgs = np.random.default_rng(1).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    torch.testing.assert_close(a.encode_texts(texts), b.encode_texts(texts), rtol=0, atol=0)
    torch.testing.assert_close(a.encode_images(imgs), b.encode_images(imgs), rtol=0, atol=0)
    f = a.encode_images(imgs)
    torch.testing.assert_close(f.norm(dim=-1), torch.ones(4))
    assert not any(p.requires_grad for p in b.model.parameters())


def test_encode_images_is_the_tower_on_preprocessed_pixels(tiny_clip_dir):
    """Preprocessing moved onto the device after the uint8 copy: still `preprocess` then the tower,
    exactly, across batch boundaries and for images that need a resize (48x64 -> 32x42 -> crop 32)."""
    bb = B.load(tiny_clip_dir, "cpu")
    imgs = np.random.default_rng(2).integers(0, 256, (5, 48, 64, 3), dtype=np.uint8)
    with torch.no_grad():  # batch by batch: a GEMM's rounding depends on its row count
        ref = torch.cat([bb.model.get_image_features(pixel_values=preprocess(imgs[i:i + 2], bb.spec)).pooler_output
                         for i in (0, 2, 4)])
    torch.testing.assert_close(bb.encode_images(imgs, batch_size=2), torch.nn.functional.normalize(ref, dim=-1),
                               rtol=0, atol=0)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match=r"(?s)cannot load CLIP .no-such-org/no-such-clip.*hf download no-such-org/no-such-clip"):
        B.load("no-such-org/no-such-clip", "cpu", hub=True)


def test_augment_keeps_range_and_fills_white():
    gen = torch.Generator().manual_seed(0)
    x = torch.ones(4, 3, 16, 16) * 0.5
    y = B.augment(x, C.AugmentParams(scale=[0.5, 0.5], rotate=0.0, shift=0.0, jitter=0.0), gen)
    assert y.min() >= 0 and y.max() <= 1
    assert torch.allclose(y[:, :, 0, 0], torch.ones(4, 3)) and torch.allclose(y[:, :, 8, 8], x[:, :, 8, 8])


def test_hue_rotation_turns_the_colour_wheel_about_grey():
    third = torch.tensor([2 * math.pi / 3], dtype=torch.float64)
    red, green, blue = torch.eye(3, dtype=torch.float64)
    r = B.hue_rotation(third)[0]
    assert torch.allclose(r @ red, green, atol=1e-12) and torch.allclose(r @ green, blue, atol=1e-12)
    angles = torch.tensor([0.0, 0.3, -1.7, math.pi], dtype=torch.float64)
    rots = B.hue_rotation(angles)
    grey = torch.tensor([0.4, 0.4, 0.4], dtype=torch.float64)
    assert torch.allclose(rots @ grey, grey.expand(4, 3), atol=1e-12)  # grey (and the white fill) stays
    assert torch.allclose(rots @ rots.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(4, 3, 3), atol=1e-12)
    assert torch.allclose(rots[0], torch.eye(3, dtype=torch.float64), atol=1e-15)
    # a pixel's mean over the channels (its grey level) is kept by any rotation
    x = torch.rand(5, 3, dtype=torch.float64)
    assert torch.allclose((x @ rots[2].T).mean(1), x.mean(1), atol=1e-12)


def test_augment_with_hue_rotates_colour_and_without_it_draws_nothing_more():
    x = torch.rand(6, 3, 8, 8)
    # hue 0 draws the same random numbers as before the option existed (scale, angle, two shifts and three
    # jitters per image), so the backbones pretrained before keep their draw
    gen = torch.Generator().manual_seed(3)
    B.augment(x, C.AugmentParams(scale=[1.0, 1.0], rotate=0.0, shift=0.0, jitter=0.2), gen)
    assert torch.equal(gen.get_state(), _after_draws(3, 7 * 6))
    # with hue: one more draw per image, the rotation of the geometric result (identity here: no zoom,
    # rotation, shift or jitter), then the clamp
    plain = C.AugmentParams(scale=[1.0, 1.0], rotate=0.0, shift=0.0, jitter=0.0)
    y0 = B.augment(x, plain, torch.Generator().manual_seed(3))
    y1 = B.augment(x, dataclasses.replace(plain, hue=0.5), torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    torch.rand(4 * 6, generator=gen)
    angle = (-0.5 + torch.rand(6, generator=gen)) * 2 * math.pi
    assert torch.allclose(y0, x, atol=1e-6)
    want = torch.einsum("bij,bjhw->bihw", B.hue_rotation(angle), y0).clamp(0, 1)
    assert torch.allclose(y1, want, atol=1e-6) and (y1 - y0).abs().max() > 0.1


def _after_draws(seed: int, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    torch.rand(n, generator=gen)
    return gen.get_state()


def test_captions_start_from_the_label_and_vary():
    import random

    meta = {"label": "grinning face", "tags": ["face", "happy", "joy", "smile"], "group": "smileys-emotion",
            "subgroup": "face-smiling"}
    rng = random.Random(0)
    caps = {B.sample_caption(meta, rng, C.CaptionParams(tags=2), {"face smiling", "smileys emotion"})
            for _ in range(200)}
    assert len(caps) > 10 and all(c.startswith(("grinning face", "a grinning face", "an emoji of a grinning face"))
                                  for c in caps)
    assert "grinning face" in caps and any(c.startswith("grinning face, ") for c in caps)
    assert not any(w in c for c in caps for w in ("smiling", "smileys", "emotion"))  # the emoji's own words only


def tiny_pretrain(prof, **kw) -> C.PretrainParams:
    return dataclasses.replace(prof.backbone.pretrain, **kw)


def test_pretraining_lowers_the_loss_and_saves_a_loadable_model(tiny_data, tiny_params, tmp_path):
    prof = tiny_params[1]
    record = B.run(dataclasses.replace(prof.backbone, pretrain=tiny_pretrain(prof, steps=40)), ["google"],
                   tiny_data, tmp_path / "bb")
    loss = record["loss"]
    assert len(loss) == 40 and np.isfinite(loss).all()
    assert np.mean(loss[-5:]) < np.mean(loss[:5]) - 0.3
    bb = B.load(tmp_path / "bb", "cpu")
    assert bb.model.config.text_config.eos_token_id == 3 and bb.spec.crop == 32
    assert json.loads((tmp_path / "bb" / B.PRETRAIN_LOG).read_text())["steps"] == 40
    assert not (tmp_path / ".bb.ckpt").exists()  # the checkpoint is gone after success


def test_interrupted_pretraining_resumes_to_the_same_weights(tiny_data, tiny_params, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    prof = tiny_params[1]
    cfg = dataclasses.replace(prof.backbone, pretrain=tiny_pretrain(prof, steps=8, checkpoint_every=3))
    B.run(cfg, ["google"], tiny_data, tmp_path / "full")

    calls = {"n": 0}
    real = B.augment

    def crash_at_step_7(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(B, "augment", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        B.run(cfg, ["google"], tiny_data, tmp_path / "resumed")
    assert not (tmp_path / "resumed").exists()
    assert json.loads((tmp_path / ".resumed.ckpt" / "state.json").read_text())["step"] == 6
    monkeypatch.setattr(B, "augment", real)
    record = B.run(cfg, ["google"], tiny_data, tmp_path / "resumed")
    assert record["resumed_from"] == 6
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys()
    diff = {k: (a[k] - b[k]).abs().max().item() for k in a}
    assert max(diff.values()) == 0, diff


def test_a_label_that_is_a_class_name_always_comes_with_a_tag():
    """emojibase's "family" is also a Unicode subgroup: its captions must never be a class prompt."""
    import random

    meta = {"label": "Family", "tags": ["child", "family"], "group": "people-body", "subgroup": "person-symbol"}
    rng = random.Random(0)
    classes = {"family", "person symbol"}
    caps = {B.sample_caption(meta, rng, C.CaptionParams(tags=2), classes) for _ in range(200)}
    assert caps == {"a Family emoji: child", "Family, child"}
    assert B.captionable(meta, classes)
    alone = {**meta, "tags": ["family"]}  # no tag beyond its label: every caption would be a class prompt
    assert not B.captionable(alone, classes) and B.captionable(alone, {"person symbol"})
    with pytest.raises(ValueError, match="is a class name"):
        B.sample_caption(alone, rng, C.CaptionParams(tags=2), classes)
    assert {B.sample_caption(meta, rng, C.CaptionParams(tags=2)) for _ in range(200)} >= {"Family", "a Family emoji"}
