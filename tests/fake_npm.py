"""A stand-in for `npm pack` that builds synthetic emoji packages with the real packages' layout.

Usage (what gram's download stage runs when `data.npm.command` is `[python, tests/fake_npm.py]`):

    python tests/fake_npm.py NAME@VERSION --pack-destination DIR

It writes DIR/NAME-VERSION.tgz. `emojibase-data` gets `package/en/data.json` and
`package/meta/groups.json`; `emoji-datasource-<vendor>` gets `package/emoji.json` and RGBA PNGs
under `package/img/<vendor>/64/`. The artwork is drawn so that the Unicode subgroup decides the
shape and the group the colour (learnable), and the vendor decides the style (a domain shift).
A few entries exercise every drop reason of the join: regional indicators (no group), a component,
an emoji without an emoji.json entry, one whose `has_img_apple` is false, one whose PNG is absent.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

GROUPS = {0: "smileys-emotion", 1: "people-body", 2: "component", 3: "animals-nature"}
SUBGROUPS = {0: "face-smiling", 1: "face-affection", 2: "face-tongue", 3: "hand-fingers-open",
             4: "hand-fingers-partial", 5: "person-role", 6: "skin-tone", 7: "animal-mammal",
             8: "animal-bird", 9: "plant-flower"}
HIERARCHY = {0: [0, 1, 2], 1: [3, 4, 5], 2: [6], 3: [7, 8, 9]}
GROUP_COLOUR = {0: (230, 180, 20), 1: (200, 90, 60), 3: (40, 150, 70)}
SHAPES = ["circle", "square", "triangle", "diamond", "ring", "cross", "bar", "star", "plus"]
ADJ = ["bright", "calm", "round", "tall", "small", "big", "happy", "quiet"]
PER_SUBGROUP = 8

# emojis of their own: 3 groups x 3 subgroups x 8
EMOJIS = []
for g, subs in HIERARCHY.items():
    if g == 2:
        continue
    for si, s in enumerate(subs):
        for j in range(PER_SUBGROUP):
            code = f"1F{0x300 + 16 * s + j:03X}"
            shape = SHAPES[s if s < 6 else s - 1]
            EMOJIS.append({"hexcode": code, "group": g, "subgroup": s, "j": j, "shape": shape,
                           "label": f"{ADJ[j]} {SUBGROUPS[s].split('-')[-1]} {shape}",
                           "tags": [shape, ADJ[j], SUBGROUPS[s].split("-")[0], GROUPS[g].split("-")[0]]})
# a variation-selector emoji: emojibase carries FE0F, emoji-datasource's `unified` does too, the
# `non_qualified` form does not
EMOJIS[0]["hexcode"] = "263A-FE0F"
NO_ENTRY = EMOJIS[1]["hexcode"]         # absent from every emoji.json
NO_APPLE = EMOJIS[2]["hexcode"]         # has_img_apple: false
NO_PNG_GOOGLE = EMOJIS[3]["hexcode"]    # listed, but its PNG is missing from the google package
VENDOR_STYLE = {"google": 0, "twitter": 1, "apple": 2, "facebook": 3}


def labels_package() -> dict[str, bytes]:
    data = [{"label": "regional indicator A", "hexcode": "1F1E6", "type": 1, "version": 0},
            {"label": "regional indicator B", "hexcode": "1F1E7", "type": 1, "version": 0},
            {"label": "light skin tone", "hexcode": "1F3FB", "group": 2, "subgroup": 6, "order": 1, "tags": []}]
    for i, e in enumerate(EMOJIS):
        data.append({"label": e["label"], "hexcode": e["hexcode"], "tags": e["tags"], "group": e["group"],
                     "subgroup": e["subgroup"], "order": 10 + i, "type": 1, "version": 1})
    meta = {"groups": {str(k): v for k, v in GROUPS.items()},
            "subgroups": {str(k): v for k, v in SUBGROUPS.items()},
            "hierarchy": {str(k): v for k, v in HIERARCHY.items()}}
    return {"package/en/data.json": json.dumps(data).encode(),
            "package/meta/groups.json": json.dumps(meta).encode(),
            "package/package.json": b'{"name": "emojibase-data"}'}


def draw(e: dict, vendor: str, size: int = 64) -> bytes:
    """RGBA artwork: transparent background, shape by subgroup, colour by group, style by vendor."""
    style = VENDOR_STYLE[vendor]
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    r, g, b = GROUP_COLOUR[e["group"]]
    k = e["j"] * 9 - 30
    fill = (max(0, min(255, r + k)), max(0, min(255, g + k)), max(0, min(255, b + k)), 255)
    if style == 3:  # a flatter, lighter palette
        fill = tuple(min(255, c + 50) for c in fill[:3]) + (255,)
    outline = (20, 20, 20, 255) if style in (1, 2) else None
    lw = 4 if style == 2 else 2
    c, s = size / 2, size * (0.28 + 0.02 * (e["j"] % 4))
    box = [c - s, c - s, c + s, c + s]
    shape = e["shape"]
    if shape == "circle":
        d.ellipse(box, fill=fill, outline=outline, width=lw)
    elif shape == "square":
        d.rectangle(box, fill=fill, outline=outline, width=lw)
    elif shape == "triangle":
        d.polygon([(c, c - s), (c + s, c + s), (c - s, c + s)], fill=fill, outline=outline)
    elif shape == "diamond":
        d.polygon([(c, c - s), (c + s, c), (c, c + s), (c - s, c)], fill=fill, outline=outline)
    elif shape == "ring":
        d.ellipse(box, outline=fill, width=7)
    elif shape in ("cross", "plus"):
        w = s / 3
        d.rectangle([c - w, c - s, c + w, c + s], fill=fill)
        d.rectangle([c - s, c - w, c + s, c + w], fill=fill)
    elif shape == "bar":
        d.rectangle([c - s, c - s / 3, c + s, c + s / 3], fill=fill, outline=outline)
    else:  # star
        pts = [(c + (s if i % 2 == 0 else s / 2.2) * math.cos(math.pi * i / 5 - math.pi / 2),
                c + (s if i % 2 == 0 else s / 2.2) * math.sin(math.pi * i / 5 - math.pi / 2)) for i in range(10)]
        d.polygon(pts, fill=fill, outline=outline)
    if style == 2:  # apple-like: a glossy highlight
        d.ellipse([c - s / 2, c - s * 0.8, c, c - s * 0.4], fill=(255, 255, 255, 160))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def vendor_package(vendor: str) -> dict[str, bytes]:
    table, files = [], {}
    for i, e in enumerate(EMOJIS):
        if e["hexcode"] == NO_ENTRY:
            continue
        unified = e["hexcode"]
        non_q = unified.replace("-FE0F", "") if "FE0F" in unified else None
        image = unified.lower() + ".png"
        row = {"name": e["label"].upper(), "unified": unified, "non_qualified": non_q, "image": image,
               "sort_order": i, **{f"has_img_{v}": True for v in VENDOR_STYLE}}
        if e["hexcode"] == NO_APPLE:
            row["has_img_apple"] = False
        table.append(row)
        if not (vendor == "google" and e["hexcode"] == NO_PNG_GOOGLE) and row[f"has_img_{vendor}"]:
            files[f"package/img/{vendor}/64/{image}"] = draw(e, vendor)
    files["package/emoji.json"] = json.dumps(table).encode()
    files["package/package.json"] = json.dumps({"name": f"emoji-datasource-{vendor}"}).encode()
    return files


# packages of one image per emoji named by code points (`data.npm.files`): name -> (vendor, folder, format, size)
FILE_PACKAGES = {"emoji-assets": ("joypixels", "png/64", "png", 64),
                 "@lobehub/fluent-emoji-3d": ("fluent", "assets", "webp", 96)}
NO_FLUENT = EMOJIS[4]["hexcode"]  # no image file in the fluent package
WORDS_EXTRA = ["shiny", "friend", "nice"]  # emojilib keywords that no label or tag of the tiny world holds


def emoji_chars(hexcode: str) -> str:
    return "".join(chr(int(p, 16)) for p in hexcode.split("-"))


def files_package(name: str) -> dict[str, bytes]:
    """One image per emoji under its folder: JoyPixels names files without FE0F, Fluent with it, and Fluent
    has a second file without it for the FE0F emoji (the reader keeps the first by name); both carry a file
    that is not named by code points."""
    vendor, folder, fmt, size = FILE_PACKAGES[name]
    files = {}
    for e in EMOJIS:
        if vendor == "fluent" and e["hexcode"] == NO_FLUENT:
            continue
        png = draw(e, "google", size)
        img = Image.open(io.BytesIO(png))
        if vendor == "fluent":  # a darker rendering: its own style
            img = Image.merge("RGBA", [*(b.point(lambda v: v * 3 // 4) for b in img.split()[:3]), img.split()[3]])
        buf = io.BytesIO()
        img.save(buf, format=fmt.upper(), **({"lossless": True} if fmt == "webp" else {}))
        code = e["hexcode"].lower() if vendor == "fluent" else e["hexcode"].lower().replace("-fe0f", "")
        files[f"package/{folder}/{code}.{fmt}"] = buf.getvalue()
        if vendor == "fluent" and "-fe0f" in code:
            files[f"package/{folder}/{code.replace('-fe0f', '')}.{fmt}"] = buf.getvalue()
    files[f"package/{folder}/sprite-sheet.png"] = draw(EMOJIS[0], "google", 16)
    files["package/package.json"] = json.dumps({"name": name}).encode()
    return files


def keywords_package() -> dict[str, bytes]:
    """emojilib's layout: emoji characters -> keywords (the label with underscores, a tag, a new word, a
    symbol-only one)."""
    table = {emoji_chars(e["hexcode"]): [e["label"].replace(" ", "_"), e["tags"][0], WORDS_EXTRA[i % 3], ":)"]
             for i, e in enumerate(EMOJIS)}
    return {"package/dist/emoji-en-US.json": json.dumps(table).encode(),
            "package/package.json": b'{"name": "emojilib"}'}


def pack(spec: str, dest: Path) -> Path:
    name, _, version = spec.rpartition("@")
    if name == "emojibase-data":
        files = labels_package()
    elif name.startswith("emoji-datasource-") and name.split("-")[-1] in VENDOR_STYLE:
        files = vendor_package(name.split("-")[-1])
    elif name in FILE_PACKAGES:
        files = files_package(name)
    elif name == "emojilib":
        files = keywords_package()
    else:
        raise SystemExit(f"fake_npm: unknown package {spec}")
    out = dest / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
    with tarfile.open(out, "w:gz") as tf:
        for path, data in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("spec")
    p.add_argument("--pack-destination", default=".")
    args = p.parse_args()
    print(pack(args.spec, Path(args.pack_destination)).name)


if __name__ == "__main__":
    main()
