"""The paper profile's download stage and dataset access (gram/data/paper.py, gram.data.split_*).

On the fake CoOp tree of tests/test_fewshot_data.py: the descriptions and listings the stage writes,
ImageNet's shifts as domains with their labels in ImageNet's label space, the -A/-R class subsets
and the scorers' restriction to them, few-shot sampling that decodes only the drawn shots, the
errors (manual steps gathered for every missing dataset, an absent shard, an unknown corpus
domain), and the per-profile grid.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, params_with
from gram import config as C
from gram.data import fewshot, paper
from gram.data.datasets import split_images, split_index
from test_fewshot_data import IMAGENET, SUBSETS, build

SHIFTS = ["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]


def data_params(root: Path, datasets: dict, corpus: dict | None = None, meta=(), fetch=False) -> C.DataParams:
    base = C.load(ROOT / "params.yaml", "paper")[1].data
    return dataclasses.replace(
        base, datasets={n: C.DatasetParams(shifts=s) for n, s in datasets.items()},
        vendors=C.VendorParams(meta=list(meta)),
        paper=dataclasses.replace(base.paper, root=str(root), fetch=fetch, corpus=corpus or {}))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = build(tmp_path_factory.mktemp("fewshot"))
    shards = tmp_path_factory.mktemp("corpus")
    for i in range(2):
        (shards / f"{i:05d}.tar").write_bytes(b"\0" * 1024)
    out = tmp_path_factory.mktemp("data")
    cfg = data_params(root, {"imagenet": SHIFTS, "dtd": []}, {"cc3m": f"{shards}/{{00000..00001}}.tar"}, ["cc3m"])
    rec = paper.run(cfg, out)
    assert rec["corpus"]["cc3m"] == {"shards": 2, "bytes": 2048}
    return out


def test_descriptions_and_listings(prepared):
    from gram.data.datasets import load_dataset

    inet = load_dataset(prepared, "imagenet")
    assert inet["classes"] == [n for _, n in IMAGENET] and inet["domains"] == ["default", *SHIFTS]
    assert (inet["base"], inet["new"]) == ([0, 1], [2, 3])
    assert inet["class_subsets"] == {"default": None, "imagenet_v2": None, "imagenet_sketch": None,
                                     "imagenet_a": SUBSETS["imagenet_a"], "imagenet_r": SUBSETS["imagenet_r"]}
    assert inet["splits"]["default"] == {"train": 4, "test": 4}
    dtd = load_dataset(prepared, "dtd")
    assert dtd["domains"] == ["default"] and dtd["splits"]["default"] == {"train": 6, "val": 2, "test": 2}
    assert dtd["base"] == [0] and dtd["new"] == [1]  # ⌈2/2⌉ base classes
    man = (prepared / "shards" / "cc3m.json").read_text()
    assert "00000.tar" in man and "00001.tar" in man


def test_shift_labels_live_in_imagenet_label_space(prepared):
    a = split_index(prepared, "imagenet", "imagenet_a", "test")
    assert a.labels.tolist() == SUBSETS["imagenet_a"] and a.class_subset == SUBSETS["imagenet_a"]
    assert a.classes == [n for _, n in IMAGENET] and a.keys == ["imagenet_a/n01443537/x.JPEG",
                                                                  "imagenet_a/n01491361/x.JPEG"]
    sp = split_images(prepared, "imagenet", "imagenet_a", "test", size=16)
    assert sp.images.shape == (2, 16, 16, 3) and sp.labels.tolist() == [1, 3]
    r = sp.restricted()  # the split as a 2-class dataset of its own
    assert r.classes == ["goldfish", "tiger shark"] and r.labels.tolist() == [0, 1] and r.class_subset is None
    np.testing.assert_array_equal(r.images, sp.images)
    v2 = split_index(prepared, "imagenet", "imagenet_v2", "test")
    assert v2.labels.tolist() == [0, 1, 2, 3] and v2.class_subset is None


def test_images_equal_the_readers_decoding(prepared, tmp_path):
    root = Path(paper.read_json(prepared / "datasets" / "dtd.json")["root"])
    ref = fewshot.decode(fewshot.read(root, "dtd", "train"), 12, indices=[4, 1])
    sp = split_images(prepared, "dtd", "default", "train", size=12, indices=[4, 1])
    np.testing.assert_array_equal(sp.images, ref.images)
    assert sp.keys == ref.keys and sp.labels.tolist() == ref.labels.tolist() == [1, 0]
    with pytest.raises(ValueError, match="pass size"):
        split_images(prepared, "dtd", "default", "train")
    with pytest.raises(KeyError, match="no domain 'imagenet_a'"):
        split_index(prepared, "dtd", "imagenet_a", "test")
    with pytest.raises(FileNotFoundError, match="no 'val' split of imagenet/default"):
        split_index(prepared, "imagenet", "default", "val")


class Recorder:
    """A classifier stand-in that predicts the first class it is offered and remembers the offers."""

    def __init__(self):
        self.offers = []

    def predict(self, images, dataset, class_ids, names):
        self.offers.append((list(class_ids), list(names)))
        return np.zeros(len(images), dtype=np.int64)


def test_domain_generalisation_scores_a_and_r_among_their_classes(prepared):
    from gram.evaluate import score_protocol

    pc = C.ProtocolParams(domain="default", split="test", domain_generalisation=SHIFTS)
    clf = Recorder()
    out = score_protocol(clf, "domain-generalisation", "imagenet", prepared, pc, size=8)
    assert [o[0] for o in clf.offers] == [[0, 1, 2, 3], [0, 1, 2, 3], SUBSETS["imagenet_a"], SUBSETS["imagenet_r"]]
    assert clf.offers[2][1] == ["goldfish", "tiger shark"]
    by = {r["target"]: r for r in out["results"]}
    assert by["imagenet_a"]["n_classes"] == 2 and by["imagenet_a"]["n"] == 2
    assert by["imagenet_a"]["accuracy"] == 0.5  # predicts position 0 = goldfish; one of the two images is one


def test_few_shot_tuning_decodes_only_the_drawn_shots(prepared, monkeypatch):
    from gram import tune
    from gram.data import fewshot as fs

    calls = []
    real = fs.decode

    def counting(listing, size, indices=None, **kw):
        calls.append(None if indices is None else len(list(indices)))
        return real(listing, size, indices, **kw)

    monkeypatch.setattr(fs, "decode", counting)

    class BB:  # only what fit() reads before tuning: the spec's size
        spec = type("S", (), {"size": 8, "crop": 8})()

    pc = C.ProtocolParams(domain="default", split="test", batch_size=4)
    m = C.MethodParams(kind="linear-probe", C=1.0)
    monkeypatch.setattr(tune, "LinearProbe", lambda *a, **k: type("LP", (), {"fit": lambda self, x, y: None})())
    _, info = tune.fit(BB(), "linear-probe", m, "dtd", pc, 2, 1, prepared, [0, 1])
    assert calls == [4] and info["n_train"] == 4  # 2 shots x 2 classes of 6 train images
    assert all(k.startswith("dtd/") for k in info["train_keys"])


def test_missing_datasets_are_gathered_into_one_manual_message(tmp_path, monkeypatch):
    root = build(tmp_path / "fewshot", names=["dtd"])
    cfg = data_params(root, {"imagenet": SHIFTS, "dtd": [], "eurosat": []})
    with pytest.raises(paper.ManualSteps) as e:
        paper.run(cfg, tmp_path / "out")
    msg = str(e.value)
    assert "6 dataset(s)" in msg and "data.paper.fetch is off" in msg
    for name in ["imagenet", "imagenet_v2", "imagenet_a", "eurosat"]:
        assert f"--dataset {name}`" in msg, name
    assert not (tmp_path / "out" / "datasets").exists()  # nothing half-written
    from gram.data import fetch

    asked = []

    def fake_fetch(root, name):
        asked.append(name)
        raise fetch.ManualStep(f"steps for {name}")

    monkeypatch.setattr(fetch, "fetch", fake_fetch)
    with pytest.raises(paper.ManualSteps, match="steps for eurosat"):
        paper.run(dataclasses.replace(cfg, paper=dataclasses.replace(cfg.paper, fetch=True)), tmp_path / "out")
    assert asked == ["imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r", "eurosat"]


def test_corpus_errors_name_the_shard_or_the_key(tmp_path):
    root = build(tmp_path / "fewshot", names=["dtd"])
    cfg = data_params(root, {"dtd": []}, {"cc3m": f"{tmp_path}/cc3m/{{00000..00001}}.tar"}, ["cc3m"])
    with pytest.raises(FileNotFoundError, match=r"cc3m/00000.tar: shard of corpus domain 'cc3m'"):
        paper.run(cfg, tmp_path / "out")
    cfg = data_params(root, {"dtd": []}, {}, ["laion"])
    with pytest.raises(KeyError, match="corpus domain 'laion'"):
        paper.run(cfg, tmp_path / "out")
    cfg = data_params(root, {"dtd": ["imagenet_q"]})
    with pytest.raises(ValueError, match="imagenet_q"):
        paper.run(cfg, tmp_path / "out")


def test_a_profile_with_its_own_grid(tmp_path):
    params, prof = C.load(ROOT / "params.yaml", "paper")  # the file's profile is emoji: paper's grid is taken
    assert params.grid == prof.grid and "imagenet" in params.grid.datasets
    assert C.load(ROOT / "params.yaml", "emoji")[0].grid.datasets == ["subgroup16"]
    bad = params_with(tmp_path, lambda raw: raw.update(profile="paper"))  # grid left at the emoji one
    with pytest.raises(C.ConfigError, match=r"grid: \*grid_paper"):
        C.load(bad)


def test_paper_path_pixels_match_clips_image_processor(tmp_path):
    """Decoding a listing at the backbone's size, then `preprocess`, gives what CLIPImageProcessor gives on
    the original photo-like JPEGs (ViT-B/16's 224 geometry and CLIP's mean/std), within a stated tolerance."""
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from gram.images import image_spec, preprocess

    CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                          image_mean=[0.48145466, 0.4578275, 0.40821073],
                          image_std=[0.26862954, 0.26130258, 0.27577711], resample=3).save_pretrained(tmp_path / "clip")
    rng = np.random.default_rng(0)
    paths, originals = [], []
    for i, (w, h) in enumerate([(320, 240), (180, 300), (500, 375)]):
        yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
        rgb = np.stack([128 + 100 * np.sin(6 * xx + i), 128 + 100 * np.cos(4 * yy), 255 * xx * yy], -1)
        rgb[h // 4:h // 2, w // 3:w // 2] = [220, 30, 40]  # an object with edges
        rgb = np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)
        (tmp_path / "img").mkdir(exist_ok=True)
        Image.fromarray(rgb).save(tmp_path / "img" / f"{i}.jpg", quality=92)
        paths.append(f"{i}.jpg")
        originals.append(np.asarray(Image.open(tmp_path / "img" / f"{i}.jpg").convert("RGB")))
    listing = fewshot.Listing("x", "test", tmp_path / "img", paths, np.zeros(3, dtype=np.int64), ["a"], "test")
    spec = image_spec(tmp_path / "clip")
    ours = preprocess(fewshot.decode(listing, spec.size).images, spec)
    ref = CLIPImageProcessorPil.from_pretrained(tmp_path / "clip")(originals, return_tensors="pt")["pixel_values"]
    assert ours.shape == ref.shape == (3, 3, 224, 224)
    # torch's and PIL's antialiased bicubic kernels differ slightly, and both round to uint8 after the
    # resize: measured in pixel units (the normalised difference times CLIP's std) max 2.0/255, mean 0.19/255
    diff = (ours - ref).abs() * torch.tensor(spec.std).view(1, 3, 1, 1)
    assert diff.max() < 3 / 255 and diff.mean() < 0.3 / 255, (diff.max() * 255, diff.mean() * 255)


def test_decoded_mb_is_the_largest_test_split_and_the_shots(prepared, tiny_clip_dir, tmp_path):
    """What a SLURM job's mem_mb adds for its images: the largest test split of any domain of the
    job's datasets plus the shots of the first, at the backbone's decoded side, 3 bytes a pixel."""
    from gram.data.datasets import decoded_mb, load_dataset
    from gram.images import image_spec

    side = image_spec(tiny_clip_dir).size
    inet = load_dataset(prepared, "imagenet")["splits"]
    largest = max(s["test"] for s in inet.values())
    assert largest == 4 and inet["imagenet_a"]["test"] < largest
    assert decoded_mb(prepared, ["dtd", "imagenet", "sun397"], tiny_clip_dir, shots=3) == \
        (largest + 3 * 2) * side * side * 3 / 2**20  # dtd: 2 classes; sun397 not described: nothing
    assert decoded_mb(prepared, ["dtd"], tmp_path / "no-backbone-yet") == 2 * 224 * 224 * 3 / 2**20
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "smileys.json").write_text('{"source": "emoji", "classes": ["a"], "items": []}')
    assert decoded_mb(tmp_path, ["smileys"], tiny_clip_dir, shots=8) == 0.0  # shard-backed: not counted
