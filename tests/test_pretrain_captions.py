"""Backbone pretraining keeps zero-shot zero-shot: no class prompt is a caption, no held-out emoji is read.

The tiny world's labels ("bright smiling circle") and tags ("face", "smileys") share words with its class
names ("face smiling", "smileys emotion") without being one, so that a caption built from class names
would be caught here and an emoji's own words are not.
"""

from __future__ import annotations

import dataclasses
import random
import re

import pytest
import torch

from gram import backbone as B
from gram.data.datasets import load_dataset

DATASETS = ("subgroup", "subgroup16", "group")


def class_prompts(prof, data_dir) -> set[str]:
    """Every text a class name is put in anywhere the profile evaluates: the zero-shot templates and the
    templates prompt learners start from, applied to every class of every dataset."""
    templates = {prof.evaluate.template, *prof.evaluate.ensemble}
    templates |= {m.init for m in prof.methods.values() if m.init}
    templates |= {r.prompt.init for r in prof.meta.values() if r.prompt.init}
    templates |= {t.prompt.init for t in prof.tpt.methods.values() if t.prompt.init}
    names = {c for d in DATASETS for c in load_dataset(data_dir, d)["classes"]}
    return {B.phrase(t.format(c)) for t in templates for c in names}


def segments(text: str) -> list[str]:
    """The comma- and colon-separated parts of a caption, as words (a class phrase must lie within one)."""
    return [" ".join(re.findall(r"\w+", part.lower())) for part in re.split(r"[,:]", text)]


def contains(text: str, phrase: str) -> bool:
    return f" {phrase} " in f" {text} "


def problems(meta: dict, text: str, prompts: set[str], names: set[str]) -> list[str]:
    """What is wrong with caption `text` of emoji `meta`: it is a class prompt, or it holds a class name
    that is not one of the emoji's own words (its label, a tag)."""
    out = [f"{text!r} is a class prompt"] if B.phrase(text) in prompts else []
    own = [" ".join(re.findall(r"\w+", w.lower())) for w in [meta["label"], *meta["tags"], *meta.get("keywords", [])]]
    for name in sorted(names):
        if any(contains(part, name) for part in segments(text)) and not any(contains(w, name) for w in own):
            out.append(f"{text!r} names the class {name!r}")
    return out


@pytest.fixture(scope="module")
def pretraining(tiny_data, tiny_params, tmp_path_factory):
    """A short pretraining run of the tiny profile that records the captions it samples and the samples
    it asks the shards for."""
    prof = tiny_params[1]
    captions: list[tuple[dict, str]] = []
    keys: list[str] = []
    sample, load_images = B.sample_caption, B.load_images

    def spy_caption(meta, rng, c, class_names=frozenset()):
        text = sample(meta, rng, c, class_names)
        captions.append((meta, text))
        return text

    def spy_images(shard_dir, wanted=None):
        assert wanted is not None, "pretraining decoded every sample of the shards"
        keys.extend(wanted)
        return load_images(shard_dir, wanted)

    mp = pytest.MonkeyPatch()
    mp.setattr(B, "sample_caption", spy_caption)
    mp.setattr(B, "load_images", spy_images)
    try:
        cfg = dataclasses.replace(prof.backbone, pretrain=dataclasses.replace(prof.backbone.pretrain, steps=6))
        out = tmp_path_factory.mktemp("pretrain") / "bb"
        record = B.run(cfg, prof.data.vendors.pretrain, tiny_data, out)
    finally:
        mp.undo()
    return {"record": record, "captions": captions, "keys": keys, "out": out, "cfg": cfg}


def splits(data_dir) -> dict[str, dict[str, set[str]]]:
    """dataset -> split -> hexcodes."""
    out: dict[str, dict[str, set[str]]] = {}
    for d in DATASETS:
        for it in load_dataset(data_dir, d)["items"]:
            out.setdefault(d, {}).setdefault(it["split"], set()).add(it["hexcode"])
    return out


def test_pretraining_reads_only_train_split_emojis(pretraining, tiny_data, tiny_params):
    prof = tiny_params[1]
    by = splits(tiny_data)
    read = set(pretraining["record"]["emojis"])
    every = set().union(*(x for s in by.values() for x in s.values()))
    assert read and read <= every
    for d, s in by.items():  # in the train split of each dataset that holds it, in no test or val split
        assert read & set().union(*s.values()) <= s["train"], d
        assert not read & s["test"] and not read & s.get("val", set()), d
    # and it is every such emoji: the split, not some other filter, decides
    assert read == {h for h in every if all(h in s["train"] for s in by.values() if h in set().union(*s.values()))}
    # only their samples are decoded, under every pretraining vendor, and only they are captioned
    asked = {(k.split("_", 1)[0], k.split("_", 1)[1]) for k in pretraining["keys"]}
    assert asked == {(v, h.lower()) for v in prof.data.vendors.pretrain for h in read}
    assert {m["hexcode"] for m, _ in pretraining["captions"]} <= read


def test_no_caption_is_a_class_prompt_or_names_a_class_beyond_its_own_words(pretraining, tiny_data, tiny_params):
    """Every caption the run sampled, and many more of every emoji it read (three seeds), is none of the
    evaluated class prompts and holds no class name that is not one of the emoji's own words."""
    prof = tiny_params[1]
    prompts = class_prompts(prof, tiny_data)
    names = {B.phrase(c) for d in DATASETS for c in load_dataset(tiny_data, d)["classes"]}
    seen = pretraining["captions"]
    metas = {m["hexcode"]: m for m, _ in seen}
    assert len(metas) == len(pretraining["record"]["emojis"])  # 6 steps of 32 cover the ~30 emojis
    more = [(m, B.sample_caption(m, rng, prof.backbone.pretrain.caption, names))
            for seed in (0, 1, 2) for rng in [random.Random(seed)] for m in metas.values() for _ in range(100)]
    bad = [p for meta, text in seen + more for p in problems(meta, text, prompts, names)]
    assert not bad, bad[:5]


def test_the_old_class_captions_would_be_caught(tiny_data, tiny_params):
    """The check above is not vacuous: it refuses the class and hierarchy captions pretraining used to sample."""
    prompts = class_prompts(tiny_params[1], tiny_data)
    names = {B.phrase(c) for d in DATASETS for c in load_dataset(tiny_data, d)["classes"]}
    meta = {"label": "bright smiling circle", "tags": ["circle", "bright", "face", "smileys"]}
    assert problems(meta, "bright smiling circle, face, smileys", prompts, names) == []
    assert problems(meta, "a face smiling emoji", prompts, names) == [
        "'a face smiling emoji' is a class prompt", "'a face smiling emoji' names the class 'face smiling'"]
    assert problems(meta, "bright smiling circle, a face smiling emoji from smileys emotion", prompts, names) == [
        "'bright smiling circle, a face smiling emoji from smileys emotion' names the class 'face smiling'",
        "'bright smiling circle, a face smiling emoji from smileys emotion' names the class 'smileys emotion'"]


def test_class_words_no_caption_holds_keep_their_initial_embedding(pretraining, tiny_data):
    """Class names are in the vocabulary (distinct prompts) but never trained: rows of words that no caption
    holds are exactly their initialisation, rows of caption words moved."""
    from transformers import CLIPModel

    p = pretraining["cfg"].pretrain
    bb = B.load(pretraining["out"], "cpu")
    caption_words = {w for _, text in pretraining["captions"] for w in re.findall(r"\w+", text.lower())}
    names = {c for d in DATASETS for c in load_dataset(tiny_data, d)["classes"]}
    vocab = bb.tokenizer.get_vocab()
    class_only = {w for c in names for w in c.split() if w not in caption_words}
    assert class_only and class_only <= set(vocab)  # e.g. "emotion", "nature": tokenised, not <unk>
    torch.manual_seed(p.seed)
    fresh = CLIPModel(B.small_config(p, len(bb.tokenizer))).text_model.embeddings.token_embedding.weight
    trained = bb.model.text_model.embeddings.token_embedding.weight
    for w in class_only:
        assert torch.equal(trained[vocab[w]], fresh[vocab[w]]), w
    assert not torch.equal(trained[vocab["circle"]], fresh[vocab["circle"]])
