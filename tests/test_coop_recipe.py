"""CoOp's published training recipe (issue 19): the random-context prompt "X X X X <name>.", the constant
warm-up before the cosine, and weight decay, from a method recipe through `gram.tune` to the optimiser."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.optim.optimizer import register_optimizer_step_pre_hook

from conftest import ROOT
from gram import backbone as B
from gram import config as C
from gram import tune as T
from gram.data.datasets import load_dataset
from gram.images import preprocess
from gram.prompts import CoOp

# the last name ends in ")": a tokenizer that knows ")." as one token must see "ring)." whole, as in the hard prompt
NAMES = ["circle", "happy ring", "calm square", "bright star", "big ring)"]


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    """A tiny random CLIP whose word vocabulary has ".", ")" and ")." (the shared tiny CLIP maps "." to <unk>)."""
    from transformers import CLIPModel

    torch.manual_seed(0)
    p = dataclasses.replace(C.PretrainParams(), image_size=32, patch=8, vision=C.TowerParams(32, 2, 2, 64),
                            text=C.TowerParams(32, 2, 2, 64), context=16, projection=24, vocab_size=200)
    texts = ["a photo of the circle.", "a happy ring; a calm square, a bright star.", "a big ring).", "( ) ."]
    tok = B.train_tokenizer(texts, p.vocab_size, p.context)
    out = tmp_path_factory.mktemp("clip-dot")
    CLIPModel(B.small_config(p, len(tok))).save_pretrained(out)
    tok.save_pretrained(out)
    B.save_image_processor(out, p.image_size)
    return B.load(out, "cpu")


@pytest.fixture(scope="module")
def pixels(bb):
    imgs = np.random.default_rng(0).integers(0, 256, (6, 40, 40, 3), dtype=np.uint8)
    return preprocess(imgs, bb.spec)


LABELS = torch.tensor([0, 1, 2, 3, 4, 0])


def reference_text(bb, texts):
    tok = B.tokenize(bb.tokenizer, texts, bb.model.config.text_config.max_position_embeddings)
    return F.normalize(bb.model.get_text_features(**tok).pooler_output, dim=-1)


def words(bb, text: str) -> list[int]:
    return list(bb.tokenizer(text, add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------------------------------------
# 1. the random-context prompt ends with "<name>."
# ------------------------------------------------------------------------------------------------
def test_random_context_prompt_is_the_name_and_a_full_stop(bb):
    learner = CoOp(bb, init=None, n_ctx=4, generator=torch.Generator().manual_seed(0))
    ids, eos = learner.prompt_ids(NAMES)
    tokens = bb.tokenizer.convert_ids_to_tokens
    assert tokens(words(bb, "."))[0] == "." and tokens(words(bb, "ring)."))[-1] == ")."  # not <unk>: a real check
    for row, e, name in zip(ids.tolist(), eos.tolist(), NAMES):
        # what the text encoder is fed: [BOS], 4 context slots, the tokens of "<name>." whole, [EOS]
        assert row[:e + 1] == [learner.bos] + [learner.pad] * 4 + words(bb, f"{name}.") + [learner.eos]
        assert tokens(row[5:e])[-1] in (".", ").")
    assert tokens(ids[0, 5:int(eos[0])].tolist()) == ["circle", "."]
    assert tokens(ids[4, 5:int(eos[4])].tolist()) == ["big", "ring", ")."]  # not "ring", ")", "."

    # and through the encoder: context vectors equal to the embeddings of four words give exactly the
    # features of the hard prompt "<those words> <name>."
    with torch.no_grad():
        learner.ctx.copy_(bb.model.text_model.embeddings.token_embedding(torch.tensor(words(bb, "a photo of the"))))
    ref = reference_text(bb, [f"a photo of the {n}." for n in NAMES])
    torch.testing.assert_close(learner.text_features(NAMES), ref, rtol=0, atol=1e-5)


def test_a_long_name_is_cut_before_the_full_stop(bb):
    learner = CoOp(bb, init=None, n_ctx=4)
    name = " ".join(["happy"] * 20)
    ids, eos = learner.prompt_ids([name])
    e = int(eos[0])
    assert e == learner.context - 1  # [BOS] + 4 + 9 words + "." + [EOS] = 16 positions
    assert ids[0, 5:e].tolist() == words(bb, "happy") * 9 + words(bb, ".")


def test_a_template_keeps_its_own_text(bb):
    """From words, the template is the prompt as written: no "." is added where it has none."""
    for template in ("a photo of the {}", "a photo of the {}."):
        learner = CoOp(bb, init=template)
        ids, eos = learner.prompt_ids(NAMES)
        tail = template[template.index("{}"):]  # "{}" or "{}."
        for row, e, name in zip(ids.tolist(), eos.tolist(), NAMES):
            assert row[1 + learner.n_ctx:e] == words(bb, tail.replace("{}", name))
        ref = reference_text(bb, [template.format(n) for n in NAMES])
        torch.testing.assert_close(learner.text_features(NAMES), ref, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# 2. warm-up, then the cosine; 3. weight decay reaches the optimiser
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def optimiser_steps():
    """Records (lr, weight_decay, optimiser class) of every optimiser step taken inside the block."""
    seen: list[tuple[float, float, type]] = []

    def hook(opt, args, kwargs):
        g = opt.param_groups[0]
        seen.append((g["lr"], g["weight_decay"], type(opt)))

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def cosine(step: int, total: int, base: float, warmup: int) -> float:
    """The cosine after the warm-up, written out: base at the first step after it, towards 0 at the end."""
    return base / 2 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_warmup_runs_at_warmup_lr_then_the_cosine(bb, pixels, optimizer):
    learner = CoOp(bb, init=None, n_ctx=2, generator=torch.Generator().manual_seed(0))
    with optimiser_steps() as seen:
        T.tune(learner, pixels, LABELS, NAMES, steps=7, lr=0.01, batch_size=0, optimizer=optimizer, warmup=3,
               warmup_lr=2.5e-5, weight_decay=5.0e-4)
    lrs = [s[0] for s in seen]
    assert lrs[:3] == [2.5e-5] * 3  # exactly the warm-up rate, step by step
    assert lrs[3] == 0.01  # the peak at the first step after the warm-up
    assert lrs[3:] == pytest.approx([cosine(s, 7, 0.01, 3) for s in range(3, 7)], rel=1e-12, abs=0)
    assert all(a > b for a, b in itertools.pairwise(lrs[3:]))
    assert {s[1] for s in seen} == {5.0e-4}  # weight decay reaches the optimiser's parameter group
    assert {s[2] for s in seen} == {torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW}


def test_without_warmup_the_schedule_is_as_before(bb, pixels):
    learner = CoOp(bb, init=None, n_ctx=2, generator=torch.Generator().manual_seed(0))
    with optimiser_steps() as seen:
        T.tune(learner, pixels, LABELS, NAMES, steps=4, lr=0.01, batch_size=0, optimizer="adam")
    assert [s[0] for s in seen] == pytest.approx([cosine(s, 4, 0.01, 0) for s in range(4)], rel=1e-12, abs=0)
    assert {s[1] for s in seen} == {0.0}


def first_step(bb, pixels, theta0, optimizer: str, lr: float, wd: float) -> torch.Tensor:
    learner = CoOp(bb, init=None, n_ctx=2)
    learner.load_state_dict({"ctx": theta0})
    T.tune(learner, pixels, LABELS, NAMES, steps=1, lr=lr, batch_size=0, optimizer=optimizer, weight_decay=wd)
    return learner.ctx.detach().clone()


def test_one_step_with_weight_decay_by_hand(bb, pixels):
    """SGD (momentum 0.9, whose first step is the plain one): θ − lr·(g + wd·θ), the L2 form CoOp uses;
    Adam: decoupled, θ·(1 − lr·wd) − lr·g/(|g| + ε) (Adam's first step is lr times the gradient's sign)."""
    learner = CoOp(bb, init=None, n_ctx=2, generator=torch.Generator().manual_seed(1))
    theta0 = learner.ctx.detach().clone()
    loss = F.cross_entropy(learner.logits(pixels, NAMES), LABELS)
    (g,) = torch.autograd.grad(loss, [learner.ctx])
    assert g.abs().min() > 1e-6  # every entry moves, so the decay term is seen everywhere
    lr, wd = 0.5, 0.2
    plain = first_step(bb, pixels, theta0, "sgd", lr, 0.0)
    decayed = first_step(bb, pixels, theta0, "sgd", lr, wd)
    torch.testing.assert_close(plain, theta0 - lr * g, rtol=0, atol=1e-6)
    torch.testing.assert_close(decayed, theta0 - lr * (g + wd * theta0), rtol=0, atol=1e-6)
    assert (decayed - plain).abs().max() > 100 * 1e-6  # the decay is far above the tolerance
    adam = first_step(bb, pixels, theta0, "adam", lr, wd)
    torch.testing.assert_close(adam, theta0 * (1 - lr * wd) - lr * g / (g.abs() + 1e-8), rtol=0, atol=1e-6)


def test_the_method_recipe_reaches_the_optimiser(bb, tiny_params, tiny_data):
    """`gram tune`'s fit passes a recipe's warmup, warmup_lr and weight_decay on to `tune`."""
    prof = tiny_params[1]
    m = C.MethodParams(kind="coop", init=None, n_ctx=2, optimizer="sgd", lr=0.01, steps=5, warmup=2,
                       warmup_lr=3.0e-5, weight_decay=5.0e-4)
    classes = list(range(len(load_dataset(tiny_data, "subgroup16")["classes"])))
    with optimiser_steps() as seen:
        _, info = T.fit(bb, "coop-x", m, "subgroup16", prof.protocols, 1, 1, tiny_data, classes)
    assert info["train"]["steps"] == 5
    assert [s[0] for s in seen][:2] == [3.0e-5, 3.0e-5]
    assert [s[0] for s in seen][2:] == pytest.approx([cosine(s, 5, 0.01, 2) for s in range(2, 5)], rel=1e-12)
    assert {s[1:] for s in seen} == {(5.0e-4, torch.optim.SGD)}


# ------------------------------------------------------------------------------------------------
# the recipe's keys are checked, naming the key
# ------------------------------------------------------------------------------------------------
@pytest.fixture()
def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_the_emoji_coop_recipe_is_coops(raw):
    """The emoji CoOp recipe (and the GRAM methods that merge it) tunes CoOp's default context (16 vectors from
    a random init), warms up one full-batch step, an epoch, at 1e-5 and decays the weights by 5e-4; the coop
    meta recipes meta-learn a θ of that shape."""
    for profile in ("emoji", "demo"):
        prof = C.load(ROOT / "params.yaml", profile)[1]
        for name, m in prof.methods.items():
            if name.startswith("coop"):
                assert (m.init, m.n_ctx) == (None, 16), name
                assert (m.warmup, m.warmup_lr, m.weight_decay, m.batch_size) == (1, 1.0e-5, 5.0e-4, 0), name
        for recipe in ("coop", "coop-same"):
            assert (prof.meta[recipe].prompt.init, prof.meta[recipe].prompt.n_ctx) == (None, 16), recipe


@pytest.mark.parametrize("key, value, message", [
    ("weight_decay", -5.0e-4, r"`emoji\.methods\.coop\.weight_decay` = -0\.0005 is below its minimum 0\.0"),
    ("warmup", -1, r"`emoji\.methods\.coop\.warmup` = -1 is below its minimum 0"),
    ("warmup_lr", -1.0e-5, r"`emoji\.methods\.coop\.warmup_lr` = -1e-05 is below its minimum 0\.0"),
    ("warmup", 800, r"`emoji\.methods\.coop\.warmup` = 800 leaves none of the 800 steps to the cosine"),  # = steps
    ("warmup", 1.5, r"`emoji\.methods\.coop\.warmup` must be int, got 1\.5"),
])
def test_bad_recipe_values_name_the_key(tmp_path, raw, key, value, message):
    raw["emoji"]["methods"]["coop"][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(C.ConfigError, match=r"params\.yaml: " + message):
        C.load(path)


def test_a_recipe_built_in_code_is_checked_too():
    m = C.MethodParams(kind="coop", steps=10)
    with pytest.raises(C.ConfigError, match=r"MethodParams: `weight_decay` = -1\.0 is below its minimum") as e:
        dataclasses.replace(m, weight_decay=-1)
    assert e.value.key == "weight_decay"
    with pytest.raises(C.ConfigError, match=r"MethodParams: `warmup` = 10 leaves none of the 10 steps") as e:
        dataclasses.replace(m, warmup=10)
    assert e.value.key == "warmup"
    assert dataclasses.replace(m, warmup=9).warmup == 9
    assert dataclasses.replace(m, steps=0, warmup=3).steps == 0  # no training at all: the warm-up is moot
    assert C.MethodParams().weight_decay == 0.0 and C.MethodParams().warmup == 0  # off unless a recipe asks
