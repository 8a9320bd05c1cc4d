"""Download stage of the emoji profile: npm packages -> corpus shards + classification datasets. [ours]

Sources (fetched with the ordinary npm client, versions pinned in params):
- `emojibase-data`: `en/data.json` (label, tags, group and subgroup ids) and `meta/groups.json`
  (the Unicode group and subgroup names);
- `emoji-datasource-<vendor>`: `emoji.json` (code points, `has_img_<vendor>`) and the artwork
  `img/<vendor>/<size>/<image>.png`;
- packages of one image file per emoji, named by its code points (`data.npm.files`: JoyPixels'
  `emoji-assets` png/64, Fluent's `@lobehub/fluent-emoji-3d` webp), resized to `image_size`;
- optionally `emojilib` (`data.npm.keywords`): more keywords per emoji, kept as `keywords` in each
  sample's metadata (the backbone's captions draw on them like on the tags).

The join is by code point with `FE0F` (the emoji presentation selector) removed on both sides,
matching emoji-datasource's `unified` and `non_qualified` fields (file names: ZWJ removed too). Regional indicators (no group)
and group 2 ("component": skin tones, hair) are not emojis of their own and are dropped. Only
emojis with artwork in every configured vendor are kept, so that every vendor (domain) shows
the same emojis and the splits are shared across domains.

Outputs under `out_dir`:
    shards/<vendor>/00000.tar ...   img2dataset layout: {key}.png (RGB, alpha on white),
                                    {key}.txt (caption: label, then tags), {key}.json (metadata)
    datasets/<name>.json            classes, base/new split, items with train/val/test split
    download.json                   per-vendor match counts and the reasons for every drop
    raw/                            the fetched .tgz files (a download cache, not an output)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from gram.config import DataParams, DatasetParams, SplitParams
from gram.data.names import words
from gram.data.shards import decode_rgb, encode_png, write_shards
from gram.io import atomic_dir, write_json

log = logging.getLogger("gram.data")

COMPONENT_GROUP = 2  # Unicode group "component": skin tones and hair styles, not emojis
IMAGE_EXTS = ("png", "webp")  # image files of one-file-per-emoji packages


def norm_code(code: str) -> str:
    """Code point string without the presentation selector, upper case: '1F600', '0023-20E3'."""
    return "-".join(p for p in code.upper().split("-") if p != "FE0F")


# ------------------------------------------------------------------------------------------------
# fetching
# ------------------------------------------------------------------------------------------------
def fetch(spec: str, raw_dir: Path, command: list[str]) -> Path:
    """Fetch the npm package `spec` (NAME@VERSION) as a .tgz into `raw_dir`; cached by spec.

    Runs `<command> NAME@VERSION --pack-destination DIR` (`npm pack` by default) from the current
    directory, so a relative path in `command` (a test stand-in) resolves against the project.
    """
    name, _, version = spec.rpartition("@")
    if not name or not version:
        raise ValueError(f"npm package {spec!r} must be pinned as NAME@VERSION")
    target = raw_dir / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"  # npm pack's own file name
    if target.exists():
        return target
    exe = shutil.which(command[0])
    if exe is None:
        raise FileNotFoundError(
            f"`{command[0]}` not found on PATH; it fetches {spec}. Install Node.js and npm "
            "(e.g. `apt-get install npm`) or point data.npm.command in params.yaml at another client.")
    raw_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=raw_dir, prefix=".fetch-") as tmp:
        argv = [exe, *command[1:], spec, "--pack-destination", tmp]
        proc = subprocess.run(argv, capture_output=True, text=True)
        tgzs = list(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or len(tgzs) != 1:
            raise RuntimeError(f"`{' '.join(command)} {spec}` failed (exit {proc.returncode}): "
                               f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
        tgzs[0].replace(target)
    return target


# ------------------------------------------------------------------------------------------------
# reading the packages
# ------------------------------------------------------------------------------------------------
def _open(tgz: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(tgz)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"{tgz}: not a readable package ({e}); delete it to fetch it again") from None


def _read_member(tf: tarfile.TarFile, name: str, tgz: Path) -> bytes:
    try:
        fh = tf.extractfile(name)
    except KeyError:
        fh = None
    if fh is None:
        raise FileNotFoundError(f"{tgz}: package has no {name}")
    return fh.read()


def read_labels(tgz: Path) -> tuple[list[dict], dict[int, str], dict[int, str]]:
    """emojibase-data -> (entries of en/data.json, group names, subgroup names)."""
    with _open(tgz) as tf:
        data = json.loads(_read_member(tf, "package/en/data.json", tgz))
        meta = json.loads(_read_member(tf, "package/meta/groups.json", tgz))
    groups = {int(k): v for k, v in meta["groups"].items()}
    subgroups = {int(k): v for k, v in meta["subgroups"].items()}
    return data, groups, subgroups


def read_vendor(tgz: Path, vendor: str, size: int) -> tuple[dict[str, dict], dict[str, bytes]]:
    """emoji-datasource-<vendor> -> (entries by normalised code, PNG bytes by image file name)."""
    prefix = f"package/img/{vendor}/{size}/"
    pngs: dict[str, bytes] = {}
    entries: dict[str, dict] = {}
    table = None
    with _open(tgz) as tf:
        for m in tf:  # one pass over the gzip stream: members are read in archive order
            if m.isfile() and m.name.startswith(prefix) and m.name.endswith(".png"):
                pngs[m.name[len(prefix):]] = tf.extractfile(m).read()
            elif m.name == "package/emoji.json":
                table = json.loads(tf.extractfile(m).read())
    if table is None:
        raise FileNotFoundError(f"{tgz}: package has no package/emoji.json")
    if not pngs:
        raise FileNotFoundError(f"{tgz}: no images under {prefix} (is data.npm.image_size right?)")
    for e in table:
        for field in ("unified", "non_qualified"):
            if e.get(field):
                entries.setdefault(norm_code(e[field]), e)
    return entries, pngs


def file_code(code: str) -> str:
    """The code points that name an emoji's image file in a one-file-per-emoji package: `norm_code` without
    the zero-width joiner 200D, which some packages leave out of their file names (JoyPixels) and others
    keep (Fluent); no two emojis of emojibase 17 differ by joiners alone."""
    return "-".join(p for p in norm_code(code).split("-") if p != "200D")


def read_files(tgz: Path, folder: str) -> dict[str, tuple[str, bytes]]:
    """A package of one image per emoji under `folder` (`<folder>/1f600.png`, `.webp`) -> image by
    `file_code`: (member name, bytes). Where two files name the same code points (with and without FE0F),
    the first by name is kept, whatever the archive order."""
    prefix = f"package/{folder.strip('/')}/"
    found: dict[str, tuple[str, bytes]] = {}
    with _open(tgz) as tf:
        for m in tf:
            stem, dot, ext = m.name[len(prefix):].rpartition(".")
            if not (m.isfile() and m.name.startswith(prefix) and dot and ext.lower() in IMAGE_EXTS and "/" not in stem):
                continue
            try:
                code = file_code(stem.replace("_", "-"))
                int(code.replace("-", ""), 16)
            except ValueError:
                continue  # not named by code points (a sprite sheet, a readme image)
            if code not in found or m.name < found[code][0]:
                found[code] = (m.name, tf.extractfile(m).read())
    if not found:
        raise FileNotFoundError(f"{tgz}: no images named by code points under {prefix} "
                                "(is data.npm.files right for this package?)")
    return found


def read_keywords(tgz: Path) -> dict[str, list[str]]:
    """emojilib -> keywords by `norm_code`: its dist/emoji-en-US.json maps each emoji (the characters) to
    keywords such as "grinning_face", "smile", ":D"; underscores become spaces."""
    with _open(tgz) as tf:
        table = json.loads(_read_member(tf, "package/dist/emoji-en-US.json", tgz))
    return {norm_code("-".join(f"{ord(ch):X}" for ch in emoji)): [k.replace("_", " ").strip() for k in words]
            for emoji, words in table.items()}


def own_keywords(e: dict, keywords: list[str]) -> list[str]:
    """The keywords that add words to the emoji's label and tags, in their order: no emoticons (":D", ":p"),
    none equal to its label or one of its tags."""
    seen = {e["label"].lower(), *(t.lower() for t in e["tags"])}
    out = []
    for k in keywords:
        if re.search(r"[a-z]{2}", k.lower()) and k.lower() not in seen:
            seen.add(k.lower())
            out.append(k)
    return out


# ------------------------------------------------------------------------------------------------
# join
# ------------------------------------------------------------------------------------------------
def base_emojis(data: list[dict], groups: dict[int, str], subgroups: dict[int, str]) -> tuple[list[dict], Counter]:
    """The emojibase entries that are emojis of their own, with readable group names."""
    kept, dropped = [], Counter()
    for e in data:
        if "group" not in e:
            dropped["no group (regional indicator)"] += 1
        elif e["group"] == COMPONENT_GROUP:
            dropped["component (skin tone / hair)"] += 1
        else:
            kept.append({"hexcode": e["hexcode"], "label": e["label"], "tags": list(e.get("tags", [])),
                         "group": groups[e["group"]], "subgroup": subgroups[e["subgroup"]],
                         "order": e.get("order", 0)})
    kept.sort(key=lambda e: e["order"])
    return kept, dropped


def match_vendor(emojis: list[dict], entries: dict[str, dict], pngs: dict[str, bytes],
                 vendor: str) -> tuple[dict[str, str], Counter]:
    """hexcode -> image file name for the emojis this vendor draws, and why the others are missing."""
    found, dropped = {}, Counter()
    for e in emojis:
        entry = entries.get(norm_code(e["hexcode"]))
        if entry is None:
            dropped["no entry in emoji.json"] += 1
        elif not entry.get(f"has_img_{vendor}", False):
            dropped[f"has_img_{vendor} is false"] += 1
        elif entry["image"] not in pngs:
            dropped["image file missing from package"] += 1
        else:
            found[e["hexcode"]] = entry["image"]
    return found, dropped


def match_files(emojis: list[dict], images: dict[str, tuple[str, bytes]]) -> tuple[dict[str, str], Counter]:
    """hexcode -> image member name for the emojis a one-file-per-emoji package draws, and the count of the
    others."""
    found, dropped = {}, Counter()
    for e in emojis:
        hit = images.get(file_code(e["hexcode"]))
        if hit is None:
            dropped["no image file"] += 1
        else:
            found[e["hexcode"]] = hit[0]
    return found, dropped


def apply_subset(emojis: list[dict], groups: list[str] | None, min_per: int, max_per: int | None) -> list[dict]:
    """Keep the configured groups, then subgroups with >= min_per emojis, at most max_per each."""
    if groups is not None:
        emojis = [e for e in emojis if e["group"] in groups]
    by_sub: dict[str, list[dict]] = defaultdict(list)
    for e in emojis:
        by_sub[e["subgroup"]].append(e)
    keep = set()
    for sub, members in by_sub.items():
        if len(members) >= min_per:
            keep.update(m["hexcode"] for m in members[:max_per])
    return [e for e in emojis if e["hexcode"] in keep]


def caption(e: dict) -> str:
    """The corpus caption: the label first (so that truncation drops tags, never the label)."""
    return f"{e['label']}: {', '.join(e['tags'])}" if e["tags"] else e["label"]


def resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """An image at `size` x `size` (bicubic; unchanged when it is that size already)."""
    if rgb.shape[0] == rgb.shape[1] == size:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC))


def sample_key(vendor: str, hexcode: str) -> str:
    return f"{vendor}_{hexcode.lower()}"


# ------------------------------------------------------------------------------------------------
# classification datasets and splits
# ------------------------------------------------------------------------------------------------
def _rank(seed: int, text: str) -> str:
    """A seeded, platform-independent shuffle key."""
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def split_counts(n: int, split: SplitParams) -> tuple[int, int, int]:
    """(train, val, test) sizes of a class of n items: test >= 1, and train >= 1 when n >= 2."""
    n_test = max(1, round(n * (1.0 - split.train - split.val)))
    n_val = round(n * split.val)
    n_val = min(n_val, n - n_test)
    n_train = n - n_test - n_val
    if n_train < 1 and n >= 2:
        if n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
        n_train = 1
    return n_train, n_val, n_test


def build_dataset(name: str, emojis: list[dict], ds: DatasetParams, split: SplitParams,
                  domains: list[str]) -> dict:
    """A classification dataset over `emojis`: class = Unicode `ds.level`, deterministic splits.

    Every class's emojis are ordered by a seeded hash and cut into train/val/test (the dataset's own
    train fraction `ds.train` where set); the same emojis land in the same split for every domain.
    Classes with fewer than `ds.min_per_class` emojis or `ds.min_train` train emojis are left out.
    Base and new classes are a seeded draw of `base_fraction` of the classes.
    """
    by_class: dict[str, list[dict]] = defaultdict(list)
    for e in emojis:
        by_class[e[ds.level]].append(e)
    if ds.train is not None:
        split = dataclasses.replace(split, train=ds.train)
    class_slugs = [c for c in dict.fromkeys(e[ds.level] for e in emojis)
                   if len(by_class[c]) >= ds.min_per_class and split_counts(len(by_class[c]), split)[0] >= ds.min_train]
    if not class_slugs:
        raise ValueError(f"dataset {name!r}: no {ds.level} has >= {ds.min_per_class} emojis and >= "
                         f"{ds.min_train} of them in its train split (train fraction {split.train})")
    items = []
    for ci, c in enumerate(class_slugs):
        members = sorted(by_class[c], key=lambda e: _rank(split.seed, e["hexcode"]))
        n_train, n_val, _ = split_counts(len(members), split)
        for j, e in enumerate(members):
            part = "train" if j < n_train else "val" if j < n_train + n_val else "test"
            items.append({"hexcode": e["hexcode"], "label": ci, "split": part})
    items.sort(key=lambda it: (it["label"], it["hexcode"]))
    shuffled = sorted(range(len(class_slugs)), key=lambda i: _rank(split.seed, "class:" + class_slugs[i]))
    n_base = max(1, round(len(class_slugs) * split.base_fraction)) if len(class_slugs) > 1 else 1
    return {
        "name": name, "level": ds.level,
        "classes": [words(c) for c in class_slugs], "class_slugs": class_slugs,
        "base": sorted(shuffled[:n_base]), "new": sorted(shuffled[n_base:]),
        "domains": domains, "key_format": "{domain}_{hexcode_lower}",
        "items": items,
    }


# ------------------------------------------------------------------------------------------------
# stage
# ------------------------------------------------------------------------------------------------
def run(cfg: DataParams, out_dir: str | Path) -> dict:
    """Fetch, join and write the emoji world under `out_dir`; returns the download report."""
    out_dir = Path(out_dir)
    raw = out_dir / "raw"
    vendors = list(cfg.npm.images)
    specs = [cfg.npm.labels] + [cfg.npm.images[v] for v in vendors] + ([cfg.npm.keywords] if cfg.npm.keywords else [])
    tgz = {spec: fetch(spec, raw, cfg.npm.command) for spec in tqdm(specs, desc="npm pack", unit="pkg")}

    data, group_names, subgroup_names = read_labels(tgz[cfg.npm.labels])
    emojis, dropped_labels = base_emojis(data, group_names, subgroup_names)
    report: dict = {"labels": {"package": cfg.npm.labels, "entries": len(data), "base_emojis": len(emojis),
                               "dropped": dict(dropped_labels)}, "vendors": {}}
    if cfg.npm.keywords:
        table = read_keywords(tgz[cfg.npm.keywords])
        for e in emojis:
            e["keywords"] = own_keywords(e, table.get(norm_code(e["hexcode"]), []))
        report["keywords"] = {"package": cfg.npm.keywords, "emojis_with_keywords": sum(bool(e["keywords"]) for e in emojis),
                              "keywords": sum(len(e["keywords"]) for e in emojis)}
    matched: dict[str, dict[str, str]] = {}
    pngs: dict[str, dict[str, bytes]] = {}
    for v in tqdm(vendors, desc="read vendors", unit="vendor"):
        if v in cfg.npm.files:
            images = read_files(tgz[cfg.npm.images[v]], cfg.npm.files[v])
            pngs[v] = dict(images.values())
            matched[v], why = match_files(emojis, images)
        else:
            entries, pngs[v] = read_vendor(tgz[cfg.npm.images[v]], v, cfg.npm.image_size)
            matched[v], why = match_vendor(emojis, entries, pngs[v], v)
        report["vendors"][v] = {"package": cfg.npm.images[v], "matched": len(matched[v]), "dropped": dict(why)}
        log.info("%s: %d of %d base emojis matched %s", v, len(matched[v]), len(emojis), dict(why))

    common = [e for e in emojis if all(e["hexcode"] in matched[v] for v in vendors)]
    for v in vendors:
        report["vendors"][v]["dropped"]["missing in another vendor"] = len(matched[v]) - len(common)
    selected = apply_subset(common, cfg.subset.groups, cfg.subset.min_per_subgroup, cfg.subset.max_per_subgroup)
    if not selected:
        raise ValueError("data.subset leaves no emojis (check data.subset.groups / min_per_subgroup)")
    report["in_all_vendors"] = len(common)
    report["selected"] = len(selected)
    report["groups"] = dict(Counter(e["group"] for e in selected))
    report["subgroups"] = len({e["subgroup"] for e in selected})

    def samples(v: str):
        for e in selected:
            rgb = resize(decode_rgb(pngs[v][matched[v][e["hexcode"]]], f"{cfg.npm.images[v]}:{e['hexcode']}"),
                         cfg.npm.image_size)
            meta = {"vendor": v, "hexcode": e["hexcode"], "label": e["label"], "tags": e["tags"],
                    "group": e["group"], "subgroup": e["subgroup"]}
            if "keywords" in e:
                meta["keywords"] = e["keywords"]
            yield {"__key__": sample_key(v, e["hexcode"]), "png": encode_png(rgb),
                   "txt": caption(e).encode(), "json": json.dumps(meta, sort_keys=True).encode()}

    with atomic_dir(out_dir / "shards") as tmp:
        for v in tqdm(vendors, desc="write shards", unit="vendor"):
            names = write_shards(samples(v), tmp / v, cfg.shard_size)
            report["vendors"][v]["shards"] = names
    with atomic_dir(out_dir / "datasets") as tmp:
        for name, ds in cfg.datasets.items():
            d = build_dataset(name, selected, ds, cfg.split, vendors)
            write_json(tmp / f"{name}.json", d)
            report.setdefault("datasets", {})[name] = {
                "classes": len(d["classes"]), "base": len(d["base"]), "new": len(d["new"]),
                **Counter(it["split"] for it in d["items"])}
    write_json(out_dir / "download.json", report)
    return report
