"""The paper profile's dataset readers (gram.data.fewshot) and `gram check-data`, on tiny fake trees."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gram import cli
from gram.data.fewshot import SPECS, DatasetMissing, Listing, decode, few_shot_listing, read
from gram.images import ImageSpec, preprocess

IMAGENET = [("n01440764", "tench"), ("n01443537", "goldfish"), ("n01484850", "great white shark"),
            ("n01491361", "tiger shark")]
SUBSETS = {"imagenet_a": [1, 3], "imagenet_r": [0, 2]}  # ImageNet labels of the classes of each 200-class set
CLASSES = ["face", "leopard"]  # every split-file dataset gets these two classes
PER_CLASS = {"train": 3, "val": 1, "test": 1}
AIRCRAFT = ["707-320", "Cessna 172", "F/A-18"]
ZHOU = [n for n, s in SPECS.items() if s.format == "zhou"]


def image(path: Path, seed: int = 0, size: tuple[int, int] = (8, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def zhou_path(name: str, label: int, split: str, i: int) -> str:
    if name == "stanford_cars":  # paths start at the dataset folder: cars_train/, cars_test/
        return f"cars_{'test' if split == 'test' else 'train'}/{label}{split}{i}.jpg"
    return f"c{label}/{split}_{i}.jpg"


def build(root: Path, names=tuple(SPECS)) -> Path:
    """Write the CoOp layout of `names` under root, with tiny images."""
    for name in names:
        spec = SPECS[name]
        ds, img = root / spec.folder, root / spec.folder / spec.images
        if spec.format == "zhou":
            doc = {s: [[zhou_path(name, c, s, i), c, CLASSES[c]] for c in range(2) for i in range(n)]
                   for s, n in PER_CLASS.items()}
            for entries in doc.values():
                for k, (rel, _, _) in enumerate(entries):
                    image(img / rel, k)
            (ds / spec.file).write_text(json.dumps(doc))
        elif spec.format == "aircraft":
            (ds / "variants.txt").parent.mkdir(parents=True, exist_ok=True)
            (ds / "variants.txt").write_text("\n".join(AIRCRAFT) + "\n")
            for s in PER_CLASS:
                ids = [f"{s}{c}" for c in range(3)]
                (ds / f"images_variant_{s}.txt").write_text("".join(f"{i} {v}\n" for i, v in zip(ids, AIRCRAFT)))
                for i in ids:
                    image(img / f"{i}.jpg")
        else:
            for sub in spec.splits.values():
                ids = SUBSETS.get(name, range(len(IMAGENET)))
                for i in ids:
                    folder = str(i) if spec.format == "index" else IMAGENET[i][0]
                    image(img / sub / folder / "x.JPEG", i)
            (img / "README.txt").write_text("not a class folder\n")  # as in the ImageNet-A/-R archives
    (root / "imagenet").mkdir(parents=True, exist_ok=True)
    (root / "imagenet" / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in IMAGENET))
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("name", ZHOU)
def test_split_file_datasets(tree, name):
    for split, n in PER_CLASS.items():
        ls = read(tree, name, split)
        assert ls.paths == [zhou_path(name, c, split, i) for c in (0, 1) for i in range(n)]
        assert ls.labels.tolist() == [0] * n + [1] * n and ls.classes == CLASSES
        assert ls.keys[0] == f"{name}/{ls.paths[0]}" and ls.imagenet_index is None
    assert read(tree, "stanford_cars", "test").paths == ["cars_test/0test0.jpg", "cars_test/1test0.jpg"]
    assert read(tree, "caltech101", "train").image_dir == tree / "caltech-101" / "101_ObjectCategories"


def test_aircraft(tree):
    ls = read(tree, "fgvc_aircraft", "val")
    assert ls.paths == ["val0.jpg", "val1.jpg", "val2.jpg"]
    assert ls.labels.tolist() == [0, 1, 2] and ls.classes == AIRCRAFT  # "Cessna 172": a name with a space


def test_imagenet_and_full_shifts(tree):
    names = [n for _, n in IMAGENET]
    train, test = read(tree, "imagenet", "train"), read(tree, "imagenet", "test")
    assert train.paths == [f"train/{w}/x.JPEG" for w, _ in IMAGENET]
    assert test.paths == [f"val/{w}/x.JPEG" for w, _ in IMAGENET]  # test = the official val folder
    assert train.labels.tolist() == [0, 1, 2, 3] and train.classes == names
    v2 = read(tree, "imagenet_v2", "test")
    assert v2.paths == ["0/x.JPEG", "1/x.JPEG", "2/x.JPEG", "3/x.JPEG"] and v2.classes == names
    sketch = read(tree, "imagenet_sketch", "test")
    assert sketch.paths[1] == "n01443537/x.JPEG" and sketch.labels.tolist() == [0, 1, 2, 3]
    assert sketch.imagenet_index == v2.imagenet_index == [0, 1, 2, 3]
    assert list(SPECS["imagenet"].splits) == ["train", "test"]


def test_imagenet_a_r_local_labels_and_imagenet_index(tree):
    a, r = read(tree, "imagenet_a", "test"), read(tree, "imagenet_r", "test")
    assert a.paths == ["n01443537/x.JPEG", "n01491361/x.JPEG"] and a.labels.tolist() == [0, 1]
    assert a.classes == ["goldfish", "tiger shark"] and a.imagenet_index == [1, 3]
    assert r.classes == ["tench", "great white shark"] and r.imagenet_index == [0, 2]
    logits = np.arange(8.0).reshape(2, 4)  # a 4-way "ImageNet" classifier, restricted to -A's classes
    assert logits[:, a.imagenet_index].tolist() == [[1.0, 3.0], [5.0, 7.0]]


def test_decode_shape_labels_keys(tree):
    ls = read(tree, "caltech101", "train")
    sp = decode(ls, 5, indices=[0, 4])
    assert sp.images.shape == (2, 5, 5, 3) and sp.images.dtype == np.uint8
    assert sp.labels.tolist() == [0, 1] and sp.keys == ["caltech101/c0/train_0.jpg", "caltech101/c1/train_1.jpg"]
    assert sp.classes == CLASSES and (sp.dataset, sp.split) == ("caltech101", "train")


def test_decode_geometry_is_clips(tmp_path):
    image(tmp_path / "wide.png", 3, size=(12, 6))
    rgb = np.array(Image.open(tmp_path / "wide.png"))  # [6, 12, 3]
    ls = Listing("x", "test", tmp_path, ["wide.png"], np.zeros(1, np.int64), ["c"], "by hand")
    assert np.array_equal(decode(ls, 6).images[0], rgb[:, 3:9])  # no resize: centre crop only
    ref = preprocess(rgb[None], ImageSpec(4, 4, (0, 0, 0), (1, 1, 1)), normalize=False)  # [1, 3, 4, 4]
    ref = (ref[0].permute(1, 2, 0) * 255).round().byte().numpy()
    assert np.array_equal(decode(ls, 4).images[0], ref)  # bicubic to 4x8, then the middle 4 columns


def test_decode_in_worker_processes_equals_in_process(tmp_path, monkeypatch):
    """Spawned decoding processes, chunked: the same bytes in listing order; a bad image in a
    worker is the same error naming its file, raised in the caller."""
    from gram.data import fewshot

    paths = [f"i{k}.png" for k in range(21)]
    for k, rel in enumerate(paths):
        image(tmp_path / rel, k, size=(9 + k % 4, 7))
    ls = Listing("x", "test", tmp_path, paths, np.arange(21) % 3, ["a", "b", "c"], "by hand")
    one = decode(ls, 5, workers=1)
    monkeypatch.setattr(fewshot, "PROCESS_MIN_IMAGES", 1)
    two = decode(ls, 5, workers=2, indices=range(3, 21))  # 18 images: chunks of 8, 8, 2
    assert np.array_equal(two.images, one.images[3:]) and two.keys == one.keys[3:]
    assert two.labels.tolist() == one.labels[3:].tolist()
    (tmp_path / "i17.png").write_bytes(b"not a PNG")
    with pytest.raises(ValueError, match=r"i17.png \(image x/i17.png\): cannot decode"):
        decode(ls, 5, workers=2)


def test_few_shot_listing_reproducible(tree):
    ls = read(tree, "caltech101", "train")
    a, ha = few_shot_listing(ls, 1, seed=1)
    b, hb = few_shot_listing(read(tree, "caltech101", "train"), 1, seed=1)
    assert a.paths == b.paths and ha == hb and a.labels.tolist() == [0, 1]
    others = {few_shot_listing(ls, 1, seed=s)[1] for s in range(2, 6)}
    assert others - {ha}, "other seeds should give other subsets"
    assert few_shot_listing(ls, 5, seed=1)[0].paths == ls.paths  # fewer than k in a class: all of it


def test_missing_dataset_and_split_file(tmp_path):
    with pytest.raises(DatasetMissing, match="does not exist"):
        read(tmp_path / "nowhere", "dtd", "test")
    build(tmp_path, ["caltech101"])
    with pytest.raises(DatasetMissing, match="dtd"):
        read(tmp_path, "dtd", "test")
    (tmp_path / "caltech-101" / "split_zhou_Caltech101.json").unlink()
    with pytest.raises(FileNotFoundError, match="split_zhou_Caltech101.json"):
        read(tmp_path, "caltech101", "train")


def edit_split(root: Path, edit) -> None:
    path = root / "caltech-101" / "split_zhou_Caltech101.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def test_malformed_split_files(tmp_path):
    build(tmp_path, ["caltech101"])
    edit_split(tmp_path, lambda d: d["test"][0].__setitem__(2, "cheetah"))
    with pytest.raises(ValueError, match=r"split_zhou_Caltech101.json: label 0 .*'face' and 'cheetah'.*test\[0\]"):
        read(tmp_path, "caltech101", "train")
    edit_split(tmp_path, lambda d: d["test"].__setitem__(0, ["c0/test_0.jpg", 0]))  # replaces the bad name
    with pytest.raises(ValueError, match=r"entry test\[0\].*expected \[relpath, int label, class name\]"):
        read(tmp_path, "caltech101", "train")
    edit_split(tmp_path, lambda d: d.update(test=[["c0/test_0.jpg", 5, "lynx"]]))
    with pytest.raises(ValueError, match=r"expected labels 0\.\.2; found \[5\]"):
        read(tmp_path, "caltech101", "train")


def test_aircraft_class_name_mismatch(tmp_path):
    build(tmp_path, ["fgvc_aircraft"])
    (tmp_path / "fgvc_aircraft" / "images_variant_test.txt").write_text("test0 707-320\ntest1 Cessna 182\n")
    with pytest.raises(ValueError, match=r"images_variant_test.txt: line 2 .*'Cessna 182'.*variants.txt"):
        read(tmp_path, "fgvc_aircraft", "test")


def test_listed_but_absent_and_unreadable_images(tmp_path):
    build(tmp_path, ["caltech101"])
    img = tmp_path / "caltech-101" / "101_ObjectCategories"
    (img / "c1/val_0.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"c1/val_0.jpg: listed in .*split_zhou_Caltech101.json \[val\]"):
        read(tmp_path, "caltech101", "val")
    (img / "c0/test_0.jpg").write_bytes(b"no JPEG here")
    ls = read(tmp_path, "caltech101", "test")  # listing does not decode
    with pytest.raises(ValueError, match=r"c0/test_0.jpg \(image caltech101/c0/test_0.jpg\): cannot decode"):
        decode(ls, 4)


def test_unknown_and_missing_class_folders(tmp_path):
    build(tmp_path, ["imagenet_a", "imagenet_sketch"])
    image(tmp_path / "imagenet-adversarial/imagenet-a/n09999999/x.jpg")
    with pytest.raises(ValueError, match=r"imagenet-a/n09999999: class folder is not a wnid of classnames.txt"):
        read(tmp_path, "imagenet_a", "test")
    for f in (tmp_path / "imagenet-sketch/images/n01484850").iterdir():
        f.unlink()
    (tmp_path / "imagenet-sketch/images/n01484850").rmdir()
    with pytest.raises(FileNotFoundError, match=r"1 of 4 class folders missing.*n01484850"):
        read(tmp_path, "imagenet_sketch", "test")


def test_check_data_cli(tmp_path, capsys):
    root = build(tmp_path / "data", ["caltech101", "imagenet", "imagenet_a", "eurosat"])
    (root / "eurosat" / "split_zhou_EuroSAT.json").unlink()
    out = tmp_path / "check.json"
    names = "caltech101,imagenet,imagenet_a,dtd,eurosat"
    with pytest.raises(SystemExit) as e:
        cli.main(["check-data", "--root", str(root), "--datasets", names, "--json", str(out)])
    assert e.value.code == 1
    rows = {r["dataset"]: r for r in json.loads(out.read_text())["datasets"]}
    assert {n: r["status"] for n, r in rows.items()} == {"caltech101": "present", "imagenet": "present",
                                                       "imagenet_a": "present", "dtd": "missing",
                                                       "eurosat": "malformed"}
    assert rows["caltech101"]["splits"] == {"train": 6, "val": 2, "test": 2} and rows["caltech101"]["classes"] == 2
    assert rows["imagenet"]["splits"] == {"train": 4, "test": 4} and rows["imagenet_a"]["classes"] == 2
    assert "split_zhou_EuroSAT.json" in rows["eurosat"]["reason"]
    text = capsys.readouterr().out.splitlines()
    assert text[0].split() == ["dataset", "status", "train", "val", "test", "classes", "reason"]
    assert text[1].split()[:6] == ["caltech101", "present", "6", "2", "2", "2"]
    col = text[0].index("status")  # aligned: every row's status starts under the header's
    assert [line[col:].split()[0] for line in text[1:]] == ["present"] * 3 + ["missing", "malformed"]

    assert cli.main(["check-data", "--root", str(root), "--datasets", "caltech101,imagenet_a", "--decode", "2"]) == 0
    (root / "caltech-101/101_ObjectCategories/c1/train_2.jpg").write_bytes(b"garbage")
    assert cli.main(["check-data", "--root", str(root), "--datasets", "caltech101", "--decode", "2"]) == 0
    with pytest.raises(SystemExit):  # the 6th train image is only decoded with N >= 6
        cli.main(["check-data", "--root", str(root), "--datasets", "caltech101", "--decode", "6"])
    assert "train_2.jpg" in capsys.readouterr().out
    assert cli.main(["check-data", "--root", str(root), "--datasets", "nope"]) == 1  # a clear error line
