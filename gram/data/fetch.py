"""`gram fetch-data`: download one paper-profile dataset into CoOp's layout. [ours]

    gram fetch-data --root DIR --dataset NAME [--downloads DIR] [--record FILE.json] [--dry-run]

`SOURCES` says where each dataset of `gram.data.fewshot.SPECS` comes from: its archives (URL, file
name, published checksum, and which part of the unpacked archive lands where in the dataset
folder), CoOp's split file, and what has to be done by hand. `fetch` then works in this order:

1. If `fewshot.read` already lists every split, nothing is touched (no network access).
2. Each archive whose content is not yet in place is downloaded to `<downloads>/<file>.part`
   (resumed with an HTTP Range request when the server allows it), renamed to `<file>` and
   checked against its published digest; a mismatch deletes the file and stops with both digests.
   Only files with a published checksum are ever downloaded.
3. The archives are unpacked into a temporary folder beside the dataset folder (absolute paths,
   `..` members and links leaving the folder are refused), arranged into CoOp's layout there and
   renamed into place, so an interrupted run never leaves a half-made dataset folder.
4. What cannot be automatic raises `ManualStep` with numbered steps (URLs, commands, destination
   paths) and the expected folder tree: ImageNet (login and licence), Stanford Cars (the original
   host is gone), UCF101's middle frames, and CoOp's split files and ImageNet's `classnames.txt`,
   which are shared on Google Drive without a published checksum. After those steps the same
   command finishes the job.
5. Every split is read back with `fewshot.read`; the returned record lists the archives (URL,
   digest, size) and the item count per split. `--record` writes it as JSON.

Verified archives stay in `<downloads>` (default `<root>/.downloads`) and are reused by later
runs; delete the folder once every dataset is in place. Exit status: 0 when the dataset is in
place, 3 when steps by hand remain (the steps go to stderr), 1 on any other error.
`--params`/`--profile` are accepted like every stage's but not used: the root is explicit.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import posixpath
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from gram.data.fewshot import SPECS, read
from gram.io import make_temp_dir, setup_logging, write_json
from gram.stage import stage_parser

log = logging.getLogger("gram")

CHUNK = 1 << 20  # bytes per read while downloading and hashing
TIMEOUT_S = 60  # per connection attempt and per read; a stalled server fails instead of hanging
USER_AGENT = "gram-fetch-data (Python urllib)"
MANUAL_EXIT = 3  # exit status of the CLI when steps by hand remain
DIGEST_HEX = {"md5": 32, "sha256": 64}  # the algorithms the table uses -> hex digits of a digest


class FetchError(RuntimeError):
    """A download failed (network, HTTP status, truncated transfer) or an archive is unusable."""


class ChecksumMismatch(FetchError):
    """A downloaded file does not have its published digest (the file has been deleted)."""


class UnsafeArchive(FetchError):
    """An archive member would be written outside the extraction folder."""


class ManualStep(RuntimeError):
    """Part of a dataset must be fetched by hand; the message lists the steps and the layout."""


@dataclass(frozen=True)
class Archive:
    """One downloadable file and where its content goes in the dataset folder."""

    url: str  # "" = no host serves it any more: the user puts the file into the downloads folder
    file: str  # its name in the downloads folder
    algorithm: str  # hashlib name of the published checksum: "md5" or "sha256"
    digest: str  # the published digest, lower-case hex
    take: str = ""  # path inside the unpacked archive to keep ("" = all of it); a plain file is kept whole
    into: str = ""  # where `take` lands in the dataset folder ("" = its entries are merged into the folder)
    marker: str = ""  # path in the dataset folder whose presence means "installed" (default: `into`)
    inner: str = ""  # an archive inside this one to unpack in turn; `take` is then a path inside it

    @property
    def done(self) -> str:
        return self.marker or self.into


@dataclass(frozen=True)
class Single:
    """A file used as is (a split JSON, classnames.txt)."""

    url: str  # a page to fetch it from; with a digest, a direct download link
    algorithm: str = ""  # "" (and digest ""): no published checksum, so never downloaded by gram
    digest: str = ""


@dataclass(frozen=True)
class Hand:
    """A step only a person can do; pending while `marker` (a path in the dataset folder) is absent.
    In `text`, {root}, {ds} and {downloads} stand for the data root, dataset folder and downloads folder."""

    marker: str
    text: str


@dataclass(frozen=True)
class Source:
    """Where one dataset comes from."""

    archives: tuple[Archive, ...] = ()
    split: Single | None = None  # CoOp's split_zhou_*.json (file name from SPECS); None when the format has none
    by_hand: tuple[Hand, ...] = ()
    manual: str = ""  # why part of it cannot be fetched automatically ("" only for fully automatic sources)


# ImageNet's class names as CLIP's evaluations spell them, the file DATASETS.md asks for; the
# ImageNet shifts need it too (in imagenet/ or in their own folder).
CLASSNAMES = Single("https://drive.google.com/file/d/1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF/view?usp=sharing")
SPLIT_WHY = "CoOp's split file is shared on Google Drive without a published checksum, so gram does not download it."
CLASSNAMES_WHY = ("It needs ImageNet's classnames.txt, shared (by CoOp) on Google Drive without a published "
                  "checksum, so gram does not download it.")

# Split-file links: CoOp's DATASETS.md (KaiyangZhou/CoOp). Checksum sources, by abbreviation:
#   torchvision = pytorch/vision, torchvision/datasets/<module>.py (md5 of the official archives)
#   TFDS = tensorflow/datasets checksum files (sha256 and size of the archive behind the same URL,
#          unless noted): tensorflow_datasets/url_checksums/<name>.txt or datasets/<name>/checksums.tsv
SOURCES: dict[str, Source] = {
    "imagenet": Source(
        by_hand=(
            Hand("images/train",
                 "Log in at https://image-net.org/download-images.php (a free account that accepts the terms of "
                 "access), download ILSVRC2012_img_train.tar (138 GB; md5 1d675b47d978889d74fa0da5fadfb00e, as in "
                 "torchvision's imagenet.py) into {downloads}, check it with `md5sum "
                 "{downloads}/ILSVRC2012_img_train.tar`, and unpack its per-class tars:\n"
                 "mkdir -p {ds}/images/train && tar -xf {downloads}/ILSVRC2012_img_train.tar -C {ds}/images/train"
                 " && cd {ds}/images/train && for f in n*.tar; do mkdir \"${f%.tar}\" && tar -xf \"$f\" -C "
                 "\"${f%.tar}\" && rm \"$f\"; done"),
            Hand("images/val",
                 "From the same page download ILSVRC2012_img_val.tar (md5 29b22e2961454d5413ddabcf34fc5622) and "
                 "ILSVRC2012_devkit_t12.tar.gz (md5 fa75699e90414af021442c21a62c3abf) into {downloads}/imagenet and "
                 "sort the 50,000 validation images into one folder per wnid; torchvision does this (it checks the "
                 "md5s too), in an environment of its own so gram's torch stays as pinned:\n"
                 "python -m venv /tmp/tv && /tmp/tv/bin/pip install torchvision scipy && /tmp/tv/bin/python -c "
                 "\"from torchvision.datasets import ImageNet; ImageNet('{downloads}/imagenet', split='val')\" && "
                 "mkdir -p {ds}/images && mv {downloads}/imagenet/val {ds}/images/val"),
        ),
        manual="ImageNet is handed out only after a login that accepts its terms of access, so gram cannot fetch it.",
    ),
    "caltech101": Source(
        archives=(
            # md5: mlverse/torchvision R/dataset-caltech.R (the CaltechDATA zip, which holds the original
            # 101_ObjectCategories.tar.gz, whose own integrity the outer digest covers)
            Archive("https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip?download=1",
                    "caltech-101.zip", "md5", "3138e1922a9193bfa496528edbbc45d0",
                    inner="caltech-101/101_ObjectCategories.tar.gz", take="101_ObjectCategories",
                    into="101_ObjectCategories"),
        ),
        split=Single("https://drive.google.com/file/d/1hyarUivQE36mY6jSomru6Fjd-JzwcCzN/view?usp=sharing"),
        manual=SPLIT_WHY,
    ),
    "oxford_pets": Source(
        archives=(
            # md5s: torchvision oxford_iiit_pet.py (_RESOURCES)
            Archive("https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz", "oxford_pets-images.tar.gz",
                    "md5", "5c4f3ee8e5d25df40f4fd59a7f44e54c", take="images", into="images"),
            Archive("https://www.robots.ox.ac.uk/~vgg/data/pets/data/annotations.tar.gz",
                    "oxford_pets-annotations.tar.gz", "md5", "95a8c909bbe2e81eed6a22bccdf3f68f",
                    take="annotations", into="annotations"),
        ),
        split=Single("https://drive.google.com/file/d/1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs/view?usp=sharing"),
        manual=SPLIT_WHY,
    ),
    "stanford_cars": Source(
        archives=(
            # sha256 (and sizes 979269282 / 977350468 bytes): TFDS url_checksums/cars196.txt, recorded when
            # http://ai.stanford.edu/~jkrause/car196/ still served them; torchvision's stanford_cars.py now
            # says that host is broken (pytorch/vision#7545)
            Archive("", "cars_train.tgz", "sha256", "512b227b30e2f0a8aab9e09485786ab4479582073a144998da74d64b801fd288",
                    take="cars_train", into="cars_train"),
            Archive("", "cars_test.tgz", "sha256", "bffea656d6f425cba3c91c6d83336e4c5f86c6cffd8975b0f375d3a10da8e243",
                    take="cars_test", into="cars_test"),
        ),
        split=Single("https://drive.google.com/file/d/1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT/view?usp=sharing"),
        manual=("The original host of Stanford Cars (ai.stanford.edu/~jkrause/car196/) no longer serves it; copies "
                "circulate (pytorch/vision#7545 points to one on Kaggle, behind a login). If your copy is the "
                "original .tgz pair, put it in the downloads folder and gram checks it against the published "
                "sha256; if it is already unpacked, place the image folders as {ds}/cars_train/ and "
                "{ds}/cars_test/ yourself. " + SPLIT_WHY),
    ),
    "oxford_flowers": Source(
        archives=(
            # md5s: torchvision flowers102.py (_file_dict)
            Archive("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz", "102flowers.tgz",
                    "md5", "52808999861908f626f3c1f4e79d11fa", take="jpg", into="jpg"),
            Archive("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/imagelabels.mat", "imagelabels.mat",
                    "md5", "e0620be6f572b9609742df49c70aed4d", into="imagelabels.mat"),
        ),
        split=Single("https://drive.google.com/file/d/1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT/view?usp=sharing"),
        manual=SPLIT_WHY,
    ),
    "food101": Source(
        archives=(
            # sha256: TFDS url_checksums/food101.txt (4996278331 bytes); torchvision food101.py publishes
            # md5 85eeb15f3717b99a5da872d97d918f87 for the same URL
            Archive("http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz", "food-101.tar.gz", "sha256",
                    "d97d15e438b7f4498f96086a4f7e2fa42a32f2712e87d3295441b2b6314053a4",
                    take="food-101", marker="images"),
        ),
        split=Single("https://drive.google.com/file/d/1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl/view?usp=sharing"),
        manual=SPLIT_WHY,
    ),
    "fgvc_aircraft": Source(
        archives=(
            # sha256: TFDS url_checksums/fgvc.txt (2770575360 bytes, recorded for the http:// form of this URL);
            # torchvision fgvc_aircraft.py downloads it without a checksum
            Archive("https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
                    "fgvc-aircraft-2013b.tar.gz", "sha256",
                    "d5f68b1b81d6d7831eb9d5c5517074176b5dfbce6bcb43dc14ed1c66a87b8d75",
                    take="fgvc-aircraft-2013b/data", marker="images"),
        ),
    ),
    "sun397": Source(
        archives=(
            # sha256: TFDS url_checksums/sun397.txt (39077296924 bytes); torchvision sun397.py publishes
            # md5 8ca2778205c41d23104230ba66911c7a for the http:// form of this URL
            Archive("https://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz", "SUN397.tar.gz", "sha256",
                    "f404130965a7ad77bed5ececc71e720ab50f3cc1e1bb257257610d38f3b928ec", take="SUN397", into="SUN397"),
        ),
        split=Single("https://drive.google.com/file/d/1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq/view?usp=sharing"),
        manual=SPLIT_WHY,
    ),
    "dtd": Source(
        archives=(
            # sha256: TFDS url_checksums/dtd.txt (625239812 bytes); torchvision dtd.py publishes
            # md5 fff73e5086ae6bdbea199a49dfb8a4c1 for the same URL
            Archive("https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz", "dtd-r1.0.1.tar.gz",
                    "sha256", "e42855a52a4950a3b59612834602aa253914755c95b0cff9ead6d07395f8e205",
                    take="dtd", marker="images"),
        ),
        split=Single("https://drive.google.com/file/d/1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x/view?usp=sharing"),
        manual=SPLIT_WHY,
    ),
    "eurosat": Source(
        archives=(
            # md5: torchvision eurosat.py (this pinned Hugging Face copy; DATASETS.md's madm.dfki.de host is gone)
            Archive("https://huggingface.co/datasets/torchgeo/eurosat/resolve/c877bcd43f099cd0196738f714544e355477f3fd"
                    "/EuroSAT.zip", "EuroSAT.zip", "md5", "c8fa014336c82ac7804f0398fcb19387", take="2750", into="2750"),
        ),
        split=Single("https://drive.google.com/file/d/1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o/view?usp=sharing"),
        manual=SPLIT_WHY,
    ),
    "ucf101": Source(
        by_hand=(
            Hand("UCF-101-midframes",
                 "Download UCF-101-midframes.zip (CoOp's middle frame of every UCF101 video) from "
                 "https://drive.google.com/file/d/10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O/view?usp=sharing into "
                 "{downloads} and unpack it: mkdir -p {ds} && unzip -q {downloads}/UCF-101-midframes.zip -d {ds}"),
        ),
        split=Single("https://drive.google.com/file/d/1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y/view?usp=sharing"),
        manual=("CoOp's UCF101 middle frames and split file are shared on Google Drive without a published "
                "checksum, so gram does not download them."),
    ),
    "imagenet_v2": Source(
        archives=(
            # sha256: TFDS datasets/imagenet_v2/checksums.tsv (1264079360 bytes, this Hugging Face URL; for
            # the S3 URL DATASETS.md names, TFDS url_checksums/imagenet_v2.txt has another size and digest)
            Archive("https://huggingface.co/datasets/vaishaal/ImageNetV2/resolve/main/"
                    "imagenetv2-matched-frequency.tar.gz",
                    "imagenetv2-matched-frequency.tar.gz", "sha256",
                    "f0c37fdf925916b19ea1323cd9a2208cdb6959ba2c32eef2a7fc393835c9ca7c",
                    take="imagenetv2-matched-frequency-format-val", into="imagenetv2-matched-frequency-format-val"),
        ),
        manual=CLASSNAMES_WHY,
    ),
    "imagenet_sketch": Source(
        archives=(
            # sha256 (7593573012 bytes): TFDS datasets/imagenet_sketch/checksums.tsv (the authors' Google Drive
            # file) and huggingface/datasets datasets/imagenet_sketch/dataset_infos.json (the same digest for
            # the Hugging Face copy, then named imagenet_sketch, now songweig/imagenet_sketch)
            Archive("https://huggingface.co/datasets/songweig/imagenet_sketch/resolve/main/data/ImageNet-Sketch.zip",
                    "ImageNet-Sketch.zip", "sha256", "4d3ce6b82a7c48aabf14aeac105eb533e75707f152cc858f55bfc022031a72ed",
                    take="sketch", into="images"),
        ),
        manual=CLASSNAMES_WHY,
    ),
    "imagenet_a": Source(
        archives=(
            # sha256: TFDS url_checksums/imagenet_a.txt (687552512 bytes)
            Archive("https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar", "imagenet-a.tar", "sha256",
                    "3bb3632277e6ba6392ea64c02ddbf4dd2266c9caffd6bc09c9656d28f012589e",
                    take="imagenet-a", into="imagenet-a"),
        ),
        manual=CLASSNAMES_WHY,
    ),
    "imagenet_r": Source(
        archives=(
            # sha256: TFDS url_checksums/imagenet_r.txt (2191079936 bytes)
            Archive("https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar", "imagenet-r.tar", "sha256",
                    "18c6bf493b39a0d975d48e587437f562caab9c52ae6327dcfa9dd8eb54aa1b52",
                    take="imagenet-r", into="imagenet-r"),
        ),
        manual=CLASSNAMES_WHY,
    ),
}


# ------------------------------------------------------------------------------------------------
# what is manual, what is pending, what the folder should look like
# ------------------------------------------------------------------------------------------------
def needs_classnames(name: str) -> bool:
    """The ImageNet family names its classes through ImageNet's classnames.txt."""
    return SPECS[name].format in ("wnid", "wnid-subset", "index")


def manual_parts(name: str) -> list[str]:
    """The parts of a dataset gram can never fetch itself, whatever is on disk (empty: fully automatic)."""
    src, spec = SOURCES[name], SPECS[name]
    parts = [f"archive {a.file} (no host)" for a in src.archives if not a.url]
    if src.split is not None and not src.split.digest:
        parts.append(spec.file)
    parts += [h.marker for h in src.by_hand]
    if needs_classnames(name):
        parts.append("classnames.txt")
    return parts


def _fill(text: str, root: Path, ds: Path, downloads: Path) -> str:
    return text.replace("{root}", str(root)).replace("{ds}", str(ds)).replace("{downloads}", str(downloads))


def _has_classnames(name: str, root: Path) -> bool:
    return (root / "imagenet" / "classnames.txt").is_file() or (root / SPECS[name].folder / "classnames.txt").is_file()


def pending_steps(name: str, root: str | Path, downloads: str | Path | None = None) -> list[str]:
    """The steps by hand still to do for a dataset, given what is on disk (each a paragraph)."""
    root = Path(root)
    downloads = Path(downloads) if downloads else root / ".downloads"
    src, spec = SOURCES[name], SPECS[name]
    ds = root / spec.folder
    steps = []
    for a in src.archives:
        if not a.url and not (ds / a.done).exists() and not (downloads / a.file).is_file():
            steps.append(f"Obtain {a.file} ({a.algorithm} {a.digest}) and put it at {downloads / a.file}; "
                         f"gram checks the digest and unpacks it into {ds / a.done}.")
    for h in src.by_hand:
        if not (ds / h.marker).exists():
            steps.append(_fill(h.text, root, ds, downloads))
    if src.split is not None and not src.split.digest and not (ds / spec.file).is_file():
        steps.append(f"Download {spec.file} (CoOp's fixed train/val/test split) from {src.split.url} "
                     f"and save it as {ds / spec.file}.")
    if needs_classnames(name) and not _has_classnames(name, root):
        also = "" if name == "imagenet" else f" (a copy at {ds / 'classnames.txt'} works too)"
        steps.append(f"Download classnames.txt (ImageNet's class names, one '<wnid> <name>' line each) from "
                     f"{CLASSNAMES.url} and save it as {root / 'imagenet' / 'classnames.txt'}{also}.")
    return steps


def layout(name: str, root: str | Path) -> str:
    """The folder tree `fewshot.read` expects for one dataset (after CoOp's DATASETS.md)."""
    root = Path(root)
    spec, src = SPECS[name], SOURCES[name]
    entries: list[tuple[str, str]] = []  # (path under the dataset folder, what it is)
    if spec.format == "zhou":
        if spec.images:
            entries.append((f"{spec.images}/", "the images; the split file's paths are relative to this folder"))
        else:
            for a in src.archives:
                entries.append((f"{a.done}/", "images; the split file's paths start at the dataset folder"))
        entries.append((spec.file, '{"train"|"val"|"test": [[relpath, label, classname], ...]}'))
    elif spec.format == "aircraft":
        entries.append((f"{spec.images}/", "<image id>.jpg"))
        entries.append((spec.file, "one variant (class) name per line"))
        entries += [(f, "'<image id> <variant>' per line") for f in spec.splits.values()]
    else:
        for split, sub in spec.splits.items():
            folder = "/".join(p for p in (spec.images, sub) if p)
            what = "<0..999>" if spec.format == "index" else "<wnid>"
            note = "200 of ImageNet's classes" if spec.format == "wnid-subset" else f"{split} images"
            entries.append((f"{folder}/{what}/*.jpg|*.JPEG|*.png", f"one folder per class ({note})"))
        if name == "imagenet":
            entries.append(("classnames.txt", "'<wnid> <class name>' per line, in ImageNet's label order"))
        else:
            entries.append(("classnames.txt", f"a copy of {root / 'imagenet' / 'classnames.txt'} (either will do)"))
    width = max(len(p) for p, _ in entries) + 2
    lines = [f"{root / spec.folder}/"]
    for i, (path, what) in enumerate(entries):
        branch = "└──" if i == len(entries) - 1 else "├──"
        lines.append(f"{branch} {path:<{width}}{what}")
    return "\n".join(lines)


def _manual_message(name: str, root: Path, downloads: Path, steps: list[str]) -> str:
    src = SOURCES[name]
    ds = root / SPECS[name].folder
    numbered = "\n".join(f"  {i}. {s}".replace("\n", "\n     ") for i, s in enumerate(steps, 1))
    tree = "\n".join("    " + line for line in layout(name, root).splitlines())
    head = f"{name}: {len(steps)} step{'s' if len(steps) != 1 else ''} to do by hand."
    why = _fill(src.manual, root, ds, downloads)
    return (f"{head} {why}\n{numbered}\n"
            f"Then run `gram fetch-data --root {root} --dataset {name}` again; it fetches the rest and "
            f"checks the result with gram.data.fewshot.read.\n"
            f"Expected layout (gram.data.fewshot, after CoOp's DATASETS.md):\n{tree}")


# ------------------------------------------------------------------------------------------------
# downloading and checking
# ------------------------------------------------------------------------------------------------
def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, url: str, algorithm: str, expected: str, delete: bool = True) -> int:
    """Check a finished download against its published digest. Returns its size.

    On a mismatch the file is deleted (unless `delete` is False: a file the user put there by hand)
    and `ChecksumMismatch` names the URL, the file and both digests.
    """
    actual = file_digest(path, algorithm)
    if actual != expected.lower():
        size = path.stat().st_size
        if delete:
            path.unlink()
            what = ("the file was deleted. Run again to download it anew; a second mismatch means the host "
                    "now serves a different file.")
        else:
            what = "it is not the published file; replace it with one that is."
        raise ChecksumMismatch(f"{url}: {path} ({size} bytes) has {algorithm} {actual}, expected {expected} "
                               f"(the published checksum); {what}")
    return path.stat().st_size


def _open(url: str, start: int):
    """urlopen with an optional `Range: bytes=start-`; HTTP and network errors name the URL."""
    headers = {"User-Agent": USER_AGENT}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:
            return e  # the range starts at or past the end: the .part file may already be whole
        raise FetchError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise FetchError(f"{url}: cannot connect ({e.reason})") from None
    except OSError as e:  # timeouts, resets
        raise FetchError(f"{url}: network error ({e})") from None


def download(url: str, dest: Path, algorithm: str, digest: str) -> int:
    """Download `url` to `dest` through `dest.part` (resumed when possible) and verify it.

    Args:
        url: where the file is served.
        dest: its final path; an existing `dest` is only verified.
        algorithm, digest: the published checksum.
    Returns:
        The file's size in bytes.
    """
    from tqdm import tqdm

    if dest.is_file():
        return verify(dest, url, algorithm, digest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    resp = _open(url, have)
    with resp:
        if resp.status == 416:
            log.info("%s: %s already holds the whole file", url, part)
        else:
            if have and resp.status != 206:
                log.info("%s: the server ignores Range requests; starting %s over", url, dest.name)
                have = 0
            elif have and not resp.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                raise FetchError(f"{url}: asked for bytes {have}- and got Content-Range "
                                 f"{resp.headers.get('Content-Range')!r}; delete {part} and run again")
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            written = have
            bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=dest.name, disable=None, leave=False)
            try:
                with open(part, "ab" if have else "wb") as f:
                    while block := resp.read(CHUNK):
                        f.write(block)
                        written += len(block)
                        bar.update(len(block))
            except (OSError, http.client.HTTPException) as e:  # resets, timeouts, IncompleteRead
                raise FetchError(f"{url}: transfer broke off after {written} bytes ({e}); {part} is kept "
                                 "and a new run resumes it") from None
            finally:
                bar.close()
            if total is not None and written != total:
                raise FetchError(f"{url}: transfer ended after {written} of {total} bytes; {part} is kept "
                                 "and a new run resumes it")
    os.replace(part, dest)
    return verify(dest, url, algorithm, digest)


# ------------------------------------------------------------------------------------------------
# unpacking and arranging
# ------------------------------------------------------------------------------------------------
def _check_member(name: str, archive: Path) -> None:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and p.parts[0].endswith(":")):
        raise UnsafeArchive(f"{archive}: member {name!r} would be written outside the extraction folder; "
                            "refusing to unpack this archive")


def unpack(archive: Path, dest: Path) -> None:
    """Unpack a tar (any compression) or zip archive into `dest`, refusing members that would escape it."""
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for m in members:
                _check_member(m.filename, archive)
            for m in members:
                zf.extract(m, dest)
        return
    try:
        tf = tarfile.open(archive, "r:*")
    except tarfile.TarError as e:
        raise FetchError(f"{archive}: not a tar or zip archive ({e})") from None
    with tf:
        for m in tf:  # one pass: a member is checked just before it is written, all inside `dest`
            _check_member(m.name, archive)
            if m.issym() or m.islnk():  # a link must point inside the folder too
                target = posixpath.join(posixpath.dirname(m.name), m.linkname) if m.issym() else m.linkname
                if posixpath.isabs(m.linkname) or posixpath.normpath(target).split("/")[0] == "..":
                    raise UnsafeArchive(f"{archive}: member {m.name!r} links to {m.linkname!r}, outside the "
                                        "extraction folder; refusing to unpack this archive")
            if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                raise UnsafeArchive(f"{archive}: member {m.name!r} is a device or pipe; refusing to unpack")
            try:
                if hasattr(tarfile, "data_filter"):
                    tf.extract(m, dest, filter="data")
                else:  # Python without extraction filters; the checks above apply
                    tf.extract(m, dest)
            except tarfile.FilterError as e:
                raise UnsafeArchive(f"{archive}: member {m.name!r} refused ({e})") from None


def is_archive(file: str) -> bool:
    """Whether a download is unpacked (zip, tar, tar.gz/tgz, ...) or used as is (e.g. imagelabels.mat)."""
    return file.endswith((".zip", ".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz"))


def _arrange(archive: Archive, path: Path, work: Path, staged: Path) -> None:
    """Unpack one verified download under `work` and move its kept part into `staged` (the new dataset folder)."""
    if not is_archive(archive.file):
        target = staged / (archive.into or archive.file)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)  # a copy: the verified download stays reusable
        return
    out = work / "unpacked"
    unpack(path, out)
    if archive.inner:
        nested = out / archive.inner
        if not nested.is_file():
            raise FetchError(f"{path}: expected the archive {archive.inner!r} inside it; not found")
        unpack(nested, work / "inner")
        out = work / "inner"
    kept = out / archive.take if archive.take else out
    if not kept.exists():
        found = sorted(p.name for p in out.iterdir())[:10]
        raise FetchError(f"{path}: expected {archive.take!r} in the unpacked archive; found {found}")
    if archive.into:
        target = staged / archive.into
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(kept, target)
        return
    for entry in sorted(kept.iterdir()):  # merged into the dataset folder
        if not (staged / entry.name).exists():
            os.replace(entry, staged / entry.name)


def _install(ds: Path, todo: list[tuple[Archive, Path]]) -> None:
    """Arrange the downloads in a temporary folder beside `ds`, then rename them into place."""
    ds.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(ds.parent, f".{ds.name}.fetch-")  # same file system: renames are atomic
    try:
        staged = tmp / ds.name
        staged.mkdir()
        for i, (archive, path) in enumerate(todo):
            log.info("unpacking %s", path.name)
            _arrange(archive, path, tmp / f"work{i}", staged)
        if not ds.exists():
            os.replace(staged, ds)  # the whole folder appears at once
            return
        # the folder holds parts already (e.g. a split file put there by hand): rename the new entries
        # in one by one, the archives' markers last, so that a run cut short in between leaves a marker
        # absent and the next run installs that archive again
        markers = {PurePosixPath(a.done).parts[0] for a, _ in todo}
        for entry in sorted(staged.iterdir(), key=lambda p: (p.name in markers, p.name)):
            target = ds / entry.name
            if target.exists():
                log.warning("%s exists already; keeping it and dropping the fetched copy", target)
                continue
            os.replace(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# the entry points
# ------------------------------------------------------------------------------------------------
def _counts(root: Path, name: str) -> dict[str, int]:
    return {split: len(read(root, name, split)) for split in SPECS[name].splits}


def fetch(root: str | Path, name: str, downloads: str | Path | None = None, dry_run: bool = False) -> dict:
    """Put one dataset into CoOp's layout under `root`, downloading what can be verified.

    Args:
        root: the data root (CoOp's `$DATA`); created if needed.
        name: a key of `SOURCES` (= of `fewshot.SPECS`).
        downloads: folder for the downloaded archives (default `<root>/.downloads`).
        dry_run: only report what would be done; no network access, nothing written.
    Returns:
        {"dataset", "status": "present"|"fetched"|"planned", "splits": {split: n} (present/fetched),
        "archives": [{"url", "file", "algorithm", "digest", "bytes", "action"}], "manual": [...] (planned)}.
    Raises:
        ManualStep: when steps by hand remain (after the automatic parts are in place).
        FetchError: a download, checksum or archive problem (naming the URL or file).
    """
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(SOURCES)}")
    root = Path(root)
    downloads = Path(downloads) if downloads else root / ".downloads"
    try:
        return {"dataset": name, "status": "present", "splits": _counts(root, name)}
    except (OSError, ValueError):
        pass  # absent or incomplete: fetch what is missing
    src = SOURCES[name]
    ds = root / SPECS[name].folder
    rows, todo = [], []
    for a in src.archives:
        path = downloads / a.file
        row = {"url": a.url, "file": a.file, "algorithm": a.algorithm, "digest": a.digest,
               "bytes": path.stat().st_size if path.is_file() else None}
        if (ds / a.done).exists():
            row["action"] = "in place"
        elif not a.url and not path.is_file():
            row["action"] = "by hand"
        else:
            row["action"] = "install"
            todo.append((a, path))
        rows.append(row)
    if dry_run:
        return {"dataset": name, "status": "planned", "archives": rows,
                "manual": pending_steps(name, root, downloads)}
    root.mkdir(parents=True, exist_ok=True)
    for a, path in todo:
        if a.url:
            log.info("%s: fetching %s", name, a.url)
            size = download(a.url, path, a.algorithm, a.digest)
        else:  # put there by hand: checked, never deleted
            size = verify(path, f"{a.file} (supplied by hand)", a.algorithm, a.digest, delete=False)
        next(r for r in rows if r["file"] == a.file)["bytes"] = size
    if todo:
        _install(ds, todo)
    split = src.split
    if split is not None and split.digest and not (ds / SPECS[name].file).is_file():
        path = downloads / SPECS[name].file
        download(split.url, path, split.algorithm, split.digest)
        ds.mkdir(parents=True, exist_ok=True)
        tmp = ds / f".{path.name}.tmp"
        shutil.copyfile(path, tmp)
        os.replace(tmp, ds / path.name)
    steps = pending_steps(name, root, downloads)
    if steps:
        raise ManualStep(_manual_message(name, root, downloads, steps))
    return {"dataset": name, "status": "fetched", "archives": rows, "splits": _counts(root, name)}


def main(argv: list[str] | None = None) -> None:
    p = stage_parser("fetch-data", __doc__)
    p.add_argument("--root", required=True, help="folder holding the dataset folders (CoOp's $DATA)")
    p.add_argument("--dataset", required=True, choices=list(SOURCES), metavar="NAME",
                   help=f"one of: {', '.join(SOURCES)}")
    p.add_argument("--downloads", default=None, help="folder for the archives (default: ROOT/.downloads)")
    p.add_argument("--record", default=None, metavar="FILE.json", help="also write the result as JSON")
    p.add_argument("--dry-run", action="store_true", help="say what would be done; no network, nothing written")
    args = p.parse_args(argv)
    setup_logging(args.log, args.verbose)
    try:
        record = fetch(args.root, args.dataset, args.downloads, args.dry_run)
    except ManualStep as e:
        print(e, file=sys.stderr)
        raise SystemExit(MANUAL_EXIT) from None
    counts = ", ".join(f"{s} {n}" for s, n in record.get("splits", {}).items())
    print(f"{args.dataset}: {record['status']}" + (f" ({counts})" if counts else ""))
    for row in record.get("archives", []):
        if row["action"] != "by hand":  # those appear among the steps below
                print(f"  {row['action']}: {row['file']} {row['url'] or '(supplied by hand)'}")
    for step in record.get("manual", []):
        print(f"  by hand: {step}")
    if args.record:
        write_json(args.record, record)
