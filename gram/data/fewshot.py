"""The paper profile's classification datasets: listings and decoding. [sibling/ours]

The eleven few-shot datasets of the prompt-learning literature and the four ImageNet shifts, read
from one root folder in the layout of CoOp's DATASETS.md (the layout is theirs, the code ours):

    imagenet/              images/{train,val}/<wnid>/*.JPEG, classnames.txt ("<wnid> <name>" lines)
    caltech-101/           101_ObjectCategories/,  split_zhou_Caltech101.json
    oxford_pets/           images/,                split_zhou_OxfordPets.json
    stanford_cars/         cars_{train,test}/,     split_zhou_StanfordCars.json (paths from this folder)
    oxford_flowers/        jpg/,                   split_zhou_OxfordFlowers.json
    food-101/              images/,                split_zhou_Food101.json
    fgvc_aircraft/         images/<id>.jpg, variants.txt, images_variant_{train,val,test}.txt
    sun397/                SUN397/,                split_zhou_SUN397.json
    dtd/                   images/,                split_zhou_DescribableTextures.json
    eurosat/               2750/,                  split_zhou_EuroSAT.json
    ucf101/                UCF-101-midframes/,     split_zhou_UCF101.json
    imagenetv2/            imagenetv2-matched-frequency-format-val/<0..999>/*
    imagenet-sketch/       images/<wnid>/*
    imagenet-adversarial/  imagenet-a/<wnid>/*     (200 of the ImageNet classes)
    imagenet-rendition/    imagenet-r/<wnid>/*     (200 of the ImageNet classes)

A split file (`split_zhou_*.json`) is `{"train"|"val"|"test": [[relpath, label, classname], ...]}`
with paths relative to the image folder; its class names are the cleaned ones CLIP evaluations use.
ImageNet has no held-out labels, so its `test` split is the official val folder (and it has no
`val` split). The shifts name their classes through ImageNet's `classnames.txt` (from `imagenet/`,
or the copy in the shift's own folder that DATASETS.md also asks for); ImageNet-A and -R hold 200
classes, labelled 0..199 in ImageNet order, and `Listing.imagenet_index` maps them back so that a
1000-way ImageNet classifier can be scored on them by keeping only those logits.

`read(root, name, split)` returns a `Listing` (paths, labels, class names; nothing decoded);
`decode(listing, size)` turns a listing, or a subset such as `few_shot_listing`'s, into a
`gram.data.Split` with CLIP's geometry (shortest side to `size`, bicubic, centre crop).
Every malformed input raises an error that names the file and says what was expected;
a dataset whose folder is absent raises `DatasetMissing`.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np

from gram.data import Split
from gram.data.shards import decode_rgb
from gram.images import ImageSpec, preprocess
from gram.io import job_threads

IMAGE_EXTS = {".jpg", ".jpeg", ".png"}  # what a class folder may hold (compared lower-case)


class DatasetMissing(FileNotFoundError):
    """The data root or the dataset's folder does not exist (as opposed to a broken dataset)."""


@dataclass(frozen=True)
class Spec:
    """Where one dataset lives and how its labels are stored."""

    folder: str  # the dataset's folder under the root
    images: str  # image folder inside `folder`; listing paths are relative to it ("" = `folder`)
    format: str  # "zhou": split JSON; "aircraft": list files; "wnid"/"wnid-subset"/"index": class folders
    splits: dict[str, str]  # split -> its key in the JSON / its list file / its sub-folder of `images`
    file: str = ""  # zhou: the split JSON; aircraft: the class list


ZHOU = {"train": "train", "val": "val", "test": "test"}
SHIFT = {"test": ""}  # the ImageNet shifts are test sets with class folders right in `images`

SPECS: dict[str, Spec] = {
    "imagenet": Spec("imagenet", "images", "wnid", {"train": "train", "test": "val"}),
    "caltech101": Spec("caltech-101", "101_ObjectCategories", "zhou", ZHOU, "split_zhou_Caltech101.json"),
    "oxford_pets": Spec("oxford_pets", "images", "zhou", ZHOU, "split_zhou_OxfordPets.json"),
    "stanford_cars": Spec("stanford_cars", "", "zhou", ZHOU, "split_zhou_StanfordCars.json"),
    "oxford_flowers": Spec("oxford_flowers", "jpg", "zhou", ZHOU, "split_zhou_OxfordFlowers.json"),
    "food101": Spec("food-101", "images", "zhou", ZHOU, "split_zhou_Food101.json"),
    "fgvc_aircraft": Spec("fgvc_aircraft", "images", "aircraft",
                          {s: f"images_variant_{s}.txt" for s in ZHOU}, "variants.txt"),
    "sun397": Spec("sun397", "SUN397", "zhou", ZHOU, "split_zhou_SUN397.json"),
    "dtd": Spec("dtd", "images", "zhou", ZHOU, "split_zhou_DescribableTextures.json"),
    "eurosat": Spec("eurosat", "2750", "zhou", ZHOU, "split_zhou_EuroSAT.json"),
    "ucf101": Spec("ucf101", "UCF-101-midframes", "zhou", ZHOU, "split_zhou_UCF101.json"),
    "imagenet_v2": Spec("imagenetv2", "imagenetv2-matched-frequency-format-val", "index", SHIFT),
    "imagenet_sketch": Spec("imagenet-sketch", "images", "wnid", SHIFT),
    "imagenet_a": Spec("imagenet-adversarial", "imagenet-a", "wnid-subset", SHIFT),
    "imagenet_r": Spec("imagenet-rendition", "imagenet-r", "wnid-subset", SHIFT),
}


@dataclass(frozen=True, eq=False)
class Listing:
    """The images of one (dataset, split), undecoded."""

    dataset: str
    split: str
    image_dir: Path
    paths: list[str]  # relative to image_dir
    labels: np.ndarray  # [N] int64 in 0..C-1
    classes: list[str]  # C class names, index = label
    source: str  # the file or folder the listing was read from (for messages)
    imagenet_index: list[int] | None = None  # ImageNet family: the ImageNet label of each class

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def keys(self) -> list[str]:
        """Stable item ids, `<dataset>/<relative path>` (independent of the root and of file order)."""
        return [f"{self.dataset}/{p}" for p in self.paths]

    def subset(self, indices) -> Listing:
        idx = np.asarray(indices, dtype=np.int64)
        return replace(self, paths=[self.paths[i] for i in idx], labels=self.labels[idx])


# ------------------------------------------------------------------------------------------------
# the per-format parts of the reader: (paths, labels, classes, imagenet_index, source)
# ------------------------------------------------------------------------------------------------
def _zhou(spec: Spec, ds_dir: Path, split: str):
    path = ds_dir / spec.file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split file missing (expected beside {spec.images or 'the images'}/, "
                                "see CoOp's DATASETS.md)")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in spec.splits.values()):
        raise ValueError(f"{path}: expected an object with lists {sorted(spec.splits.values())}")
    names: dict[int, str] = {}  # from every split, so that all splits share one class list
    for key in spec.splits.values():
        for i, e in enumerate(doc[key]):
            ok = (isinstance(e, list) and len(e) == 3 and isinstance(e[0], str)
                  and isinstance(e[1], int) and not isinstance(e[1], bool) and isinstance(e[2], str))
            if not ok:
                raise ValueError(f"{path}: entry {key}[{i}] is {e!r}, expected [relpath, int label, class name]")
            if names.setdefault(e[1], e[2]) != e[2]:
                raise ValueError(f"{path}: label {e[1]} is named {names[e[1]]!r} and {e[2]!r} "
                                 f"(entry {key}[{i}]); expected one class name per label")
    classes = _contiguous(names, path)
    entries = doc[spec.splits[split]]
    return [e[0] for e in entries], [e[1] for e in entries], classes, None, f"{path} [{spec.splits[split]}]"


def _contiguous(names: dict[int, str], where: Path) -> list[str]:
    """The class names in label order; labels must be exactly 0..C-1."""
    outside = sorted(c for c in names if not 0 <= c < len(names))
    if outside:
        raise ValueError(f"{where}: {len(names)} labels, so expected labels 0..{len(names) - 1}; "
                         f"found {outside[:5]} (labels must be contiguous from 0)")
    return [names[c] for c in range(len(names))]


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def _aircraft(spec: Spec, ds_dir: Path, split: str):
    classes = _lines(ds_dir / spec.file)
    if len(set(classes)) != len(classes):
        raise ValueError(f"{ds_dir / spec.file}: a variant is listed twice; expected one name per line")
    label = {c: i for i, c in enumerate(classes)}
    path = ds_dir / spec.splits[split]
    paths, labels = [], []
    for n, line in enumerate(_lines(path), 1):
        image_id, _, name = line.partition(" ")  # the name may itself contain spaces
        if name not in label:
            raise ValueError(f"{path}: line {n} names class {name!r}, which is not in {spec.file}")
        paths.append(f"{image_id}.jpg")
        labels.append(label[name])
    return paths, labels, classes, None, str(path)


def _imagenet_classes(root: Path, ds_dir: Path) -> tuple[list[str], list[str]]:
    """(wnids, clean names) in ImageNet label order, from `imagenet/classnames.txt` or a local copy."""
    candidates = [root / "imagenet" / "classnames.txt", ds_dir / "classnames.txt"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{candidates[0]}: missing (ImageNet's class names, needed for {ds_dir.name}; "
                                f"a copy at {candidates[1]} would do too)")
    wnids, names = [], []
    for n, line in enumerate(_lines(path), 1):
        wnid, _, name = line.partition(" ")
        if not name:
            raise ValueError(f"{path}: line {n} is {line!r}, expected '<wnid> <class name>'")
        wnids.append(wnid)
        names.append(name.strip())
    if len(set(wnids)) != len(wnids):
        raise ValueError(f"{path}: a wnid is listed twice; expected one line per class")
    return wnids, names


def _class_folders(root: Path, ds_dir: Path, image_dir: Path, spec: Spec, split: str):
    wnids, names = _imagenet_classes(root, ds_dir)
    folder = image_dir / spec.splits[split]
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: missing (expected one folder per class)")
    found = sorted(d.name for d in os.scandir(folder) if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise FileNotFoundError(f"{folder}: no class folders")
    index = {str(i): i for i in range(len(wnids))} if spec.format == "index" else {w: i for i, w in enumerate(wnids)}
    unknown = [d for d in found if d not in index]
    if unknown:
        what = f"0..{len(wnids) - 1}" if spec.format == "index" else "a wnid of classnames.txt"
        raise ValueError(f"{folder / unknown[0]}: class folder is not {what} ({len(unknown)} such folders)")
    if spec.format == "wnid-subset":
        ids = sorted(index[d] for d in found)  # local labels follow ImageNet's order
    else:
        ids = list(range(len(wnids)))
        absent = sorted(set(index) - set(found), key=index.get)
        if absent:
            raise FileNotFoundError(f"{folder}: {len(absent)} of {len(wnids)} class folders missing, "
                                    f"e.g. {absent[:3]}")
    key = {i: k for k, i in index.items()}
    paths, labels = [], []
    for label, i in enumerate(ids):
        sub = Path(spec.splits[split]) / key[i]
        files = sorted(f.name for f in os.scandir(image_dir / sub)
                       if f.is_file() and not f.name.startswith(".") and Path(f.name).suffix.lower() in IMAGE_EXTS)
        paths += [(sub / f).as_posix() for f in files]
        labels += [label] * len(files)
    return paths, labels, [names[i] for i in ids], ids, str(folder)


# ------------------------------------------------------------------------------------------------
# the shared reader
# ------------------------------------------------------------------------------------------------
def read(root: str | Path, name: str, split: str, check_files: bool = True) -> Listing:
    """List one split of one dataset without decoding it.

    Args:
        root: the folder holding every dataset folder (CoOp's `$DATA`).
        name: a key of `SPECS`.
        split: one of `SPECS[name].splits`.
        check_files: verify that every image a split/list file names exists (one directory
            listing per folder; class-folder datasets are listed from disk and need no check).
    Returns:
        The `Listing`.
    """
    if name not in SPECS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(SPECS)}")
    spec = SPECS[name]
    if split not in spec.splits:
        raise ValueError(f"{name} has no split {split!r}; expected one of {', '.join(spec.splits)}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetMissing(f"{root}: data root does not exist")
    ds_dir = root / spec.folder
    if not ds_dir.is_dir():
        raise DatasetMissing(f"{ds_dir}: dataset folder missing (see CoOp's DATASETS.md for {name})")
    image_dir = ds_dir / spec.images
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: image folder missing")
    if spec.format == "zhou":
        paths, labels, classes, ids, source = _zhou(spec, ds_dir, split)
    elif spec.format == "aircraft":
        paths, labels, classes, ids, source = _aircraft(spec, ds_dir, split)
    else:
        paths, labels, classes, ids, source = _class_folders(root, ds_dir, image_dir, spec, split)
    if spec.format in ("zhou", "aircraft"):
        paths = _inside(image_dir, paths, source)
        if check_files:
            _check_present(image_dir, paths, source)
    return Listing(name, split, image_dir, paths, np.asarray(labels, dtype=np.int64), classes, source, ids)


def _inside(image_dir: Path, paths: list[str], source: str) -> list[str]:
    """The listed paths, each relative to `image_dir` and inside it, judged by its text (the image folder may be
    a link to another disk): a `..` that climbs out of it, or an absolute path elsewhere, is an error naming the
    split file and the entry. An absolute path inside `image_dir` becomes relative (keys do not depend on where
    the data root is)."""
    out = []
    for i, p in enumerate(paths):
        pure = PurePosixPath(p)
        if pure.is_absolute():
            try:
                p = Path(p).relative_to(image_dir).as_posix()
            except ValueError:
                raise ValueError(f"{source}: entry {i} ({pure.as_posix()!r}) is an absolute path outside the image "
                                 f"folder {image_dir}; split files list paths relative to it") from None
            pure = PurePosixPath(p)
        depth = 0
        for part in pure.parts:
            depth += -1 if part == ".." else part != "."
            if depth < 0:
                raise ValueError(f"{source}: entry {i} ({paths[i]!r}) climbs out of the image folder {image_dir} "
                                 "with `..`; split files list paths inside it")
        out.append(p)
    return out


def _check_present(image_dir: Path, paths: list[str], source: str) -> None:
    """Error naming the first listed image that is not on disk (one `listdir` per folder)."""
    seen: dict[str, set[str] | None] = {}
    for i, p in enumerate(paths):
        parent, _, base = p.rpartition("/")
        if parent not in seen:
            d = image_dir / parent
            seen[parent] = set(os.listdir(d)) if d.is_dir() else None
        if seen[parent] is None or base not in seen[parent]:
            raise FileNotFoundError(f"{image_dir / p}: listed in {source} (item {i}) but absent")


def few_shot(keys: list[str], labels: np.ndarray, k: int, seed: int, tag: str) -> tuple[np.ndarray, str]:
    """Indices of k items per class (all of a class with fewer than k) and the subset's hash.

    Items are ranked by a seeded hash of their key (`tag` names the dataset), so the subset depends only
    on (dataset, k, seed) and not on file order; every result records the hash. Used for both profiles."""
    def rank(key: str) -> str:
        return hashlib.sha256(f"{tag}:{k}:{seed}:{key}".encode()).hexdigest()

    chosen = []
    for c in np.unique(labels):
        members = [i for i in np.flatnonzero(labels == c)]
        members.sort(key=lambda i: rank(keys[i]))
        chosen += members[:k]
    chosen = np.array(sorted(chosen), dtype=np.int64)
    digest = hashlib.sha256("\n".join(sorted(keys[i] for i in chosen)).encode()).hexdigest()[:16]
    return chosen, digest


def few_shot_listing(listing: Listing, k: int, seed: int) -> tuple[Listing, str]:
    """k items per class chosen by `few_shot` (tag = the dataset), and the subset's hash."""
    idx, digest = few_shot(listing.keys, listing.labels, k, seed, listing.dataset)
    return listing.subset(idx), digest


PROCESS_MIN_IMAGES = 256  # fewer images than this are decoded in the calling process (no start-up cost)


def usable_cpus() -> int:
    """CPUs this job may use (its `threads` under Snakemake, a SLURM allocation; gram.io.job_threads)."""
    return job_threads()


def _decode_one(path: Path, key: str, source: str, size: int) -> np.ndarray:
    """One listed image -> [size, size, 3] uint8 with the backbone's geometry (not normalised)."""
    import torch

    try:
        data = path.read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read image {key} listed in {source} ({e.strerror})") from None
    rgb = decode_rgb(data, f"{path} (image {key})")
    geometry = ImageSpec(size, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # only size and crop are used
    x = preprocess(np.array(rgb)[None], geometry, normalize=False)  # writable copy; [1, 3, size, size] in [0, 1]
    return (x[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()  # -> [size, size, 3]


def _decode_chunk(image_dir: Path, paths: list[str], keys: list[str], source: str, size: int) -> np.ndarray:
    """Consecutive images of a listing -> [n, size, size, 3] uint8 (what a worker process runs)."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for j, (path, key) in enumerate(zip(paths, keys)):
        out[j] = _decode_one(image_dir / path, key, source, size)
    return out


def _one_thread() -> None:
    """Worker initialiser: one intra-op thread per decoding process (N processes x N threads each
    would oversubscribe the CPUs: the parallelism is across images)."""
    import torch

    torch.set_num_threads(1)


_POOL: dict[int, object] = {}  # workers -> the ProcessPoolExecutor kept for later decodes


def _decoder_pool(workers: int):
    """`workers` spawned decoding processes, started once per process and kept: a job decodes several
    splits (its shots, then a test split per domain), and each start imports torch (1-2 s)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    pool = _POOL.get(workers)
    if pool is None:
        _close_pools()
        pool = _POOL[workers] = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                                    initializer=_one_thread)
    return pool


def _close_pools() -> None:
    """Stop the kept decoding processes (at exit too: a pool left to interpreter teardown prints errors)."""
    for pool in _POOL.values():
        pool.shutdown(cancel_futures=True)
    _POOL.clear()


atexit.register(_close_pools)


def decode(listing: Listing, size: int, indices=None, workers: int | None = None, domain: str = "default"):
    """Decode (a subset of) a listing to a `gram.data.Split` of size x size images.

    Decoding (JPEG, resize, crop) is CPU work that holds up a GPU evaluation; it runs in `workers`
    processes, in chunks of consecutive images, with the results placed in listing order (threads
    scaled poorly: 16 of them decoded 577 images/s on a 16-core node). The processes are spawned (safe
    beside CUDA and torch's thread pools; like any spawning code, a script calling this needs an
    `if __name__ == "__main__":` guard) and kept for the next call. Fewer than `PROCESS_MIN_IMAGES`
    images, or one worker, are decoded in this process.

    Args:
        listing: what to decode.
        size: output side; shortest side resized to it (bicubic, antialiased), then centre-cropped,
            i.e. `gram.images.preprocess` without normalisation.
        indices: items of the listing to decode (default: all).
        workers: decoding processes (default: the usable CPUs, at most 16).
        domain: the `Split.domain` to record.
    Returns:
        A `Split` with images [n, size, size, 3] uint8.
    Raises:
        FileNotFoundError / ValueError naming the image file (and the listing) that cannot be read or
        decoded; the remaining chunks are cancelled.
    """
    from concurrent.futures.process import BrokenProcessPool

    from tqdm import tqdm

    sub = listing if indices is None else listing.subset(indices)
    n, keys = len(sub), sub.keys
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    workers = min(workers or min(16, usable_cpus()), max(1, n))
    bar = tqdm(total=n, disable=n < 500, desc=f"decode {sub.dataset}/{sub.split}", unit="img")
    if workers == 1 or n < PROCESS_MIN_IMAGES:
        for j in range(n):
            out[j] = _decode_one(sub.image_dir / sub.paths[j], keys[j], sub.source, size)
            bar.update()
        bar.close()
        return Split(sub.dataset, domain, sub.split, list(sub.classes), out, sub.labels.copy(), keys)
    chunk = int(np.clip(n // (4 * workers), 8, 64))  # >= 4 chunks per worker keeps them all busy to the end
    pool = _decoder_pool(workers)
    starts = range(0, n, chunk)
    futures = [pool.submit(_decode_chunk, sub.image_dir, sub.paths[i:i + chunk], keys[i:i + chunk],
                           sub.source, size) for i in starts]
    try:
        for i, fut in zip(starts, futures):
            block = fut.result()
            out[i:i + len(block)] = block
            bar.update(len(block))
    except BrokenProcessPool as e:
        _POOL.pop(workers, None)
        raise RuntimeError(f"decoding {sub.source}: a decoding process died ({e}); out of memory, or a script "
                           "without `if __name__ == \"__main__\":` (spawned processes import the main module)") from e
    finally:
        bar.close()
        for fut in futures:  # after the first bad image, do not decode the rest
            fut.cancel()
    return Split(sub.dataset, domain, sub.split, list(sub.classes), out, sub.labels.copy(), keys)
