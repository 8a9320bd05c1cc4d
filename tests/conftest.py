"""Shared fixtures: synthetic emoji packages and a tiny CLIP saved the way the pipeline saves one."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub in tests
sys.path.insert(0, str(ROOT / "tests"))

import fake_npm  # noqa: E402


def params_with(tmp_path: Path, edit) -> str:
    """A copy of params.yaml with `edit(raw_dict)` applied, written under tmp_path; returns its path."""
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="session")
def fake_packages(tmp_path_factory) -> Path:
    """A raw/ directory holding the synthetic npm packages, as the download stage caches them."""
    raw = tmp_path_factory.mktemp("raw")
    for spec in ["emojibase-data@17.0.0", "emoji-datasource-google@16.0.0", "emoji-datasource-apple@16.0.0",
                 "emoji-datasource-facebook@16.0.0"]:
        fake_npm.pack(spec, raw)
    return raw


@pytest.fixture(scope="session")
def tiny_params():
    from gram import config as C

    params, prof = C.load(ROOT / "params.yaml", "tiny")
    return params, prof


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, fake_packages, tiny_params) -> Path:
    """The tiny profile's download stage output (synthetic emoji world)."""
    from gram.data import emoji

    out = tmp_path_factory.mktemp("data")
    shutil.copytree(fake_packages, out / "raw")
    emoji.run(tiny_params[1].data, out)
    return out


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP + BPE tokenizer + image processor config, saved with save_pretrained."""
    import dataclasses

    import torch
    from transformers import CLIPModel

    from gram import backbone as B
    from gram import config as C

    torch.manual_seed(0)
    p = dataclasses.replace(C.PretrainParams(), image_size=32, patch=8, vision=C.TowerParams(32, 2, 2, 64),
                            text=C.TowerParams(32, 2, 2, 64), context=16, projection=24, vocab_size=200)
    texts = [e["label"] + " " + " ".join(e["tags"]) for e in fake_npm.EMOJIS] + ["a emoji of the picture"]
    tok = B.train_tokenizer(texts, p.vocab_size, p.context)
    model = CLIPModel(B.small_config(p, len(tok)))
    out = tmp_path_factory.mktemp("clip")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    B.save_image_processor(out, p.image_size)
    return out


@pytest.fixture(scope="session")
def tiny_trained_dir(tmp_path_factory, tiny_data, tiny_params) -> Path:
    """The tiny profile's backbone stage output: a small CLIP pretrained on the synthetic world."""
    from gram import backbone as B

    out = tmp_path_factory.mktemp("trained") / "backbone"
    prof = tiny_params[1]
    B.run(prof.backbone, prof.data.vendors.pretrain, tiny_data, out)
    return out
