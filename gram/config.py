"""Typed parameters: `params.yaml` -> frozen dataclasses, validated on load. [ours]

`params.yaml` is the single source of truth for every stage. Its layout:

    profile: emoji            # the active profile
    grid: {...}               # what the evaluate and tune stages fan out over (the active profile's)
    emoji: {data, backbone, evaluate, protocols, methods, embed, cluster, tasks, prototypes}
    paper: {...}

A file holds some of the known profiles (PROFILES): the user's params.yaml has emoji and paper; the
test profiles tiny and paper_smoke live in tests/params/<profile>.yaml, each a complete params file.
Asking for a profile that the file does not define is an error naming the file.

Each stage receives only its own section (e.g. `BackboneParams`). Unknown keys, wrong types and
out-of-range values raise `ConfigError` naming the file and the dotted key.

Each section checks itself when it is constructed (`Section.__post_init__`): the type of every field,
its bounds and allowed values, and the constraints between its own fields (`check`), so that a section
built in code (`dataclasses.replace(cfg, lr=-1)`) is refused like one read from a file. Such an error
names the field relative to the section; the loader (`from_dict`, `load`) re-raises it with the file
and the full dotted key. Checks that span sections (a grid entry naming a method, evaluate.datasets
naming data.datasets) need the whole file and stay in the loader. The JSON schema that
Snakemake validates against (`workflow/schemas/params.schema.yaml`) is generated from these
dataclasses by `gram schema`, and a test checks that the committed file has not drifted.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Optional, Union

import yaml

PROFILES = ("emoji", "demo", "paper", "tiny", "paper_smoke")
METHOD_NAME = re.compile(r"[A-Za-z0-9_+-]+")  # names of methods and recipes: they name folders and wildcards


class ConfigError(ValueError):
    """A parameter is invalid. From the loader, the message names the file and the dotted key. From a
    section's own check, `key` is the field relative to the section ("" for the section as a whole) and
    `detail` what is wrong with it, so that the loader can re-raise it with the file and the full key."""

    def __init__(self, message: str, key: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.key, self.detail = key, detail


def _field_error(key: str, detail: str) -> ConfigError:
    return ConfigError(f"`{key}` {detail}", key=key, detail=detail)


def _bad_method_names(pairs) -> ConfigError | None:
    """The error for the first (key, name) whose name is not letters, digits, `_`, `+` or `-` (names of
    methods and recipes become output folders and Snakemake wildcards)."""
    for key, name in pairs:
        if not METHOD_NAME.fullmatch(name):
            return _field_error(key, f"names method {name!r}: a method name must be letters, digits, `_`, `+` or "
                                     "`-` (it names output folders and Snakemake wildcards)")
    return None


def _f(default: Any = dataclasses.MISSING, *, help: str, min: float | None = None,
       max: float | None = None, factory: Any = None) -> Any:
    """A dataclass field carrying its documentation and numeric bounds."""
    meta = {"help": help, "min": min, "max": max}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class Section:
    """Base of every params section: construction validates the fields, then `check()`."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            try:
                typed = _validate(value, hints[f.name], f.name, f.metadata)
            except ConfigError as e:  # name the section too: built in code, there is no file to name
                raise ConfigError(f"{type(self).__name__}: {e}", key=e.key, detail=e.detail) from None
            if typed is not value:  # an int given for a float field, a list rebuilt item by item
                object.__setattr__(self, f.name, typed)
        self.check()

    def check(self) -> None:
        """Constraints between this section's own fields (none unless a section overrides it)."""

    def invalid(self, detail: str) -> ConfigError:
        """An error about the section as a whole (the loader names it by its dotted key)."""
        return ConfigError(f"{type(self).__name__}: {detail}", key="", detail=detail)

    def invalid_field(self, key: str, detail: str) -> ConfigError:
        """An error about one field, checked against the others (the loader names its full dotted key)."""
        return ConfigError(f"{type(self).__name__}: `{key}` {detail}", key=key, detail=detail)


def _validate(value: Any, tp: Any, key: str, meta: Mapping) -> Any:
    """Check `value` against the annotation `tp` and the bounds in `meta`; returns the typed value
    (float for an int given to a float field). Nested sections must be built already (they checked
    themselves)."""
    origin = typing.get_origin(tp)

    def bad() -> ConfigError:  # built only when raised: the repr of a large mapping is not free
        return _field_error(key, f"must be {_type_name(tp)}, got {value!r}")

    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        for a in args:
            try:
                return _validate(value, a, key, meta)
            except ConfigError:
                if len(args) == 1:
                    raise
        raise bad()
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad()
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad()
        (item,) = typing.get_args(tp)
        return [_validate(v, item, f"{key}[{i}]", meta) for i, v in enumerate(value)]  # bounds hold per item
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        _, item = typing.get_args(tp)
        return {k: _validate(v, item, f"{key}.{k}", {}) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, tp):
            raise bad()
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        value = value if type(value) is float else float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise _field_error(key, f"= {value!r} is below its minimum {lo}")
    if hi is not None and value > hi:
        raise _field_error(key, f"= {value!r} is above its maximum {hi}")
    return value


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NpmParams(Section):
    command: list[str] = _f(factory=lambda: ["npm", "pack"],
                            help="argv prefix that fetches one package as NAME-VERSION.tgz into the cwd")
    labels: str = _f("emojibase-data@17.0.0", help="npm package with Unicode/CLDR labels (en/data.json)")
    images: dict[str, str] = _f(factory=dict, help="vendor -> npm package with its artwork: emoji-datasource's "
                                                   "img/<vendor>/<size>/*.png, or a folder named in `files`")
    files: dict[str, str] = _f(factory=dict, help="vendor -> folder of its package that holds one image per emoji, "
                                                  "named by code points (<folder>/1f600.png or .webp; FE0F and "
                                                  "ZWJ may be left out), e.g. JoyPixels' emoji-assets png/64")
    keywords: Optional[str] = _f(None, help="npm package with more keywords per emoji (emojilib: "
                                            "dist/emoji-en-US.json); they join its own words (null: none)")
    image_size: int = _f(64, help="side of the stored images: emoji-datasource's PNG size folder to read; "
                                  "images of `files` vendors are resized to it", min=16, max=256)

    def check(self) -> None:
        extra = sorted(set(self.files) - set(self.images))
        if extra:
            raise self.invalid_field("files", f"names {extra}, which `images` does not define")


@dataclass(frozen=True)
class VendorParams(Section):
    pretrain: list[str] = _f(factory=list, help="vendors whose image-text pairs pretrain the backbone")
    meta: list[str] = _f(factory=list, help="vendors whose image-text pairs are the meta-training corpus")
    heldout: list[str] = _f(factory=list, help="vendors kept out of all training, for evaluation only")


@dataclass(frozen=True)
class SubsetParams(Section):
    groups: Optional[list[str]] = _f(None, help="keep only these Unicode groups (null: all)")
    max_per_subgroup: Optional[int] = _f(None, help="keep at most this many emojis per subgroup (null: all)", min=1)
    min_per_subgroup: int = _f(1, help="drop subgroups with fewer emojis than this", min=1)


@dataclass(frozen=True)
class SplitParams(Section):
    train: float = _f(0.5, help="fraction of each class's emojis in the train split", min=0.0, max=1.0)
    val: float = _f(0.1, help="fraction in the val split; the rest is test", min=0.0, max=1.0)
    base_fraction: float = _f(0.5, help="fraction of classes that are 'base' in base-to-new", min=0.0, max=1.0)
    seed: int = _f(0, help="seed of the split and of the base/new class draw", min=0)

    def check(self) -> None:
        if self.train + self.val >= 1.0:
            raise self.invalid(f"train + val = {self.train + self.val} leaves no test split")


@dataclass(frozen=True)
class DatasetParams(Section):
    level: Literal["subgroup", "group"] = _f("subgroup", help="emoji: Unicode level that defines the classes")
    min_per_class: int = _f(1, help="emoji: drop classes with fewer emojis than this", min=1)
    train: Optional[float] = _f(None, help="emoji: this dataset's train fraction instead of data.split.train "
                                           "(its val fraction stays data.split.val)", min=0.0, max=1.0)
    min_train: int = _f(1, help="emoji: drop classes with fewer train emojis than this (16: every class has "
                                "16 real shots)", min=1)
    shifts: list[str] = _f(factory=list, help="paper: test sets of the same classes scored as further domains "
                                              "of this dataset (imagenet: imagenet_v2, imagenet_sketch, "
                                              "imagenet_a, imagenet_r)")


@dataclass(frozen=True)
class Img2DatasetParams(Section):
    enabled: bool = _f(False, help="opt in: build the corpus shards with img2dataset from `url_list` "
                                   "(otherwise data.paper.corpus names existing shards)")
    url_list: str = _f("", help="the caption/URL table, e.g. CC3M's Train_GCC-training.tsv")
    input_format: Literal["tsv", "csv", "parquet", "txt", "json", "jsonl"] = _f("tsv", help="format of url_list")
    url_col: str = _f("url", help="column of the image URL")
    caption_col: str = _f("caption", help="column of the caption")
    image_size: int = _f(256, help="img2dataset image_size (resize_mode keep_ratio)", min=32)
    processes: int = _f(16, help="img2dataset processes_count", min=1)
    threads: int = _f(64, help="img2dataset thread_count", min=1)
    samples_per_shard: int = _f(10000, help="img2dataset number_sample_per_shard", min=1)
    output: str = _f("data/paper/corpus/cc3m", help="folder the shards are written to")
    domain: str = _f("cc3m", help="corpus domain the shards become (a name in data.vendors.meta)")


@dataclass(frozen=True)
class PaperDataParams(Section):
    root: str = _f("data/paper/fewshot", help="folder of the classification datasets in CoOp's DATASETS.md "
                                             "layout (CoOp's $DATA)")
    fetch: bool = _f(True, help="fetch a missing dataset from its official source when it has one (checksum "
                                "verified); false: only check what is there")
    corpus: dict[str, Union[str, list[str]]] = _f(
        factory=dict, help="corpus domain -> its image-text shards: a brace pattern, folder, URL or list "
                           "(e.g. cc3m: /data/cc3m/{00000..00331}.tar)")
    img2dataset: Img2DatasetParams = _f(factory=Img2DatasetParams, help="opt-in corpus download")
    allow_pipe: bool = _f(False, help="run `pipe:COMMAND` shard addresses of `corpus` and of the corpus "
                                      "manifests (the command's stdout is the shard): opt in, since a manifest or "
                                      "params file from elsewhere would otherwise run arbitrary commands")


@dataclass(frozen=True)
class DataParams(Section):
    source: Literal["npm", "paper"] = _f("npm", help="npm: emoji world; paper: external shards and datasets")
    npm: NpmParams = _f(factory=NpmParams, help="where the emoji artwork and labels come from")
    vendors: VendorParams = _f(factory=VendorParams, help="roles of the vendors (domains)")
    subset: SubsetParams = _f(factory=SubsetParams, help="restrict the emoji set (tests, quick runs)")
    split: SplitParams = _f(factory=SplitParams, help="train/val/test and base/new splits")
    datasets: dict[str, DatasetParams] = _f(factory=dict, help="classification datasets to build (paper: "
                                                                "names of gram.data.fewshot.SPECS)")
    shard_size: int = _f(1000, help="samples per webdataset shard", min=1)
    paper: PaperDataParams = _f(factory=PaperDataParams, help="source paper: where datasets and corpus live")

    def check(self) -> None:
        for name, ds in self.datasets.items():
            if ds.train is not None and ds.train + self.split.val >= 1.0:
                raise self.invalid_field(f"datasets.{name}.train", f"+ split.val = {ds.train + self.split.val} "
                                                                   "leaves no test split")


# --------------------------------------------------------------------------------------------
# backbone
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TowerParams(Section):
    width: int = _f(256, help="hidden size", min=8)
    layers: int = _f(4, help="transformer layers", min=1)
    heads: int = _f(4, help="attention heads (must divide width)", min=1)
    mlp: int = _f(1024, help="MLP hidden size", min=8)

    def check(self) -> None:
        if self.width % self.heads:
            raise self.invalid(f"width {self.width} is not divisible by heads {self.heads}")


@dataclass(frozen=True)
class AugmentParams(Section):
    scale: list[float] = _f(factory=lambda: [0.85, 1.1], help="random zoom range")
    rotate: float = _f(0.15, help="max rotation in radians", min=0.0, max=3.1416)
    shift: float = _f(0.1, help="max shift as a fraction of the image side", min=0.0, max=0.5)
    jitter: float = _f(0.2, help="brightness/contrast/saturation jitter strength", min=0.0, max=1.0)
    hue: float = _f(0.0, help="max hue rotation, a fraction of the colour wheel (0.5: any hue), about the grey "
                              "axis so that white and grey stay; 0 draws nothing (earlier backbones stay the same)",
                    min=0.0, max=0.5)
    vendor_mix: float = _f(0.0, help="probability that an image blends two pretraining vendors' artwork "
                                     "of the same emoji (weight ~ U(0, 1)): new styles between domains",
                           min=0.0, max=1.0)

    def check(self) -> None:
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise self.invalid(f"scale must be [low, high] with 0 < low <= high, got {self.scale}")


@dataclass(frozen=True)
class CaptionParams(Section):
    """Pretraining captions are an emoji's own words only (its label and CLDR tags), never a class name."""

    tags: int = _f(2, help="at most this many random tags in a caption", min=0)

    # keys of earlier versions that a params file may still set: the loader says why they are gone
    removed: ClassVar[dict[str, str]] = {
        "hierarchy_p": "it appended the subgroup/group phrase, i.e. the evaluated class names, to pretraining "
                       "captions, which made zero-shot supervised",
        "class_p": "it made captions that were exactly class prompts (\"a <subgroup> emoji\"), which made "
                   "zero-shot supervised",
    }


@dataclass(frozen=True)
class PretrainParams(Section):
    image_size: int = _f(32, help="input resolution of the vision tower", min=8)
    patch: int = _f(8, help="patch size (must divide image_size)", min=1)
    vision: TowerParams = _f(factory=lambda: TowerParams(256, 6, 4, 1024), help="vision tower")
    text: TowerParams = _f(factory=TowerParams, help="text tower")
    context: int = _f(24, help="text positions (max tokens incl. BOS/EOS)", min=4)
    projection: int = _f(256, help="shared embedding size", min=8)
    vocab_size: int = _f(3000, help="word vocabulary size (most frequent words of the pretraining captions and "
                                    "the class names)", min=64)
    steps: int = _f(700, help="optimiser steps", min=1)
    batch_size: int = _f(128, help="distinct emojis per step", min=2)
    lr: float = _f(1.0e-3, help="peak AdamW learning rate", min=0.0)
    logit_scale_lr: float = _f(1.0e-2, help="learning rate of the (log) temperature", min=0.0)
    warmup: int = _f(30, help="linear warm-up steps before the cosine decay", min=0)
    weight_decay: float = _f(0.1, help="AdamW weight decay on matrices only", min=0.0)
    grad_clip: float = _f(1.0, help="gradient norm clip (0: off)", min=0.0)
    augment: AugmentParams = _f(factory=AugmentParams, help="light image augmentation (no flips)")
    caption: CaptionParams = _f(factory=CaptionParams, help="caption variants, sampled afresh each step")
    checkpoint_every: int = _f(100, help="save a resumable checkpoint every N steps (0: never)", min=0)
    seed: int = _f(0, help="seed of initialisation, sampling and augmentation", min=0)

    def check(self) -> None:
        if self.image_size % self.patch:
            raise self.invalid(f"image_size {self.image_size} is not divisible by patch {self.patch}")


@dataclass(frozen=True)
class BackboneParams(Section):
    source: Literal["pretrain", "hub"] = _f("pretrain", help="pretrain a small CLIP here, or load `model`")
    model: Optional[str] = _f(None, help="hub id or local directory (source: hub)")
    device: str = _f("auto", help="auto, cpu, cuda or cuda:N")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", help="inference dtype on the device")
    pretrain: PretrainParams = _f(factory=PretrainParams, help="small-CLIP pretraining (source: pretrain)")

    def check(self) -> None:
        if self.source == "hub" and not self.model:
            raise self.invalid("source: hub needs `model` (a hub id or a local directory)")


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvaluateParams(Section):
    datasets: list[str] = _f(factory=list, help="classification datasets to evaluate (keys of data.datasets)")
    domains: list[str] = _f(factory=list, help="domains (vendors) to evaluate on (empty: every domain of each dataset)")
    split: Literal["train", "val", "test"] = _f("test", help="split that is scored")
    template: str = _f("a {} emoji.", help="prompt of the single-template zero-shot method")
    ensemble: list[str] = _f(factory=list, help="prompts averaged by the template-ensemble method")
    batch_size: int = _f(256, help="images per forward pass", min=1)


# --------------------------------------------------------------------------------------------
# prompt methods and evaluation protocols
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodParams(Section):
    kind: Literal["coop", "vpt", "joint", "linear-probe"] = _f(
        "coop", help="coop: text context; vpt: visual tokens; joint: both; linear-probe: logistic regression "
                     "on image features")
    init: Optional[str] = _f("a {} emoji", help="coop/joint: template whose words before `{}` initialise the "
                                                 "context and whose words after it stay fixed (null: random)")
    n_ctx: int = _f(4, help="coop/joint: context vectors when `init` is null", min=1)
    template: Optional[str] = _f(None, help="vpt: the fixed text prompt of every class, a template with `{}` for "
                                            "the name, e.g. \"a photo of a {}.\" (null: the bare class name)")
    class_specific: bool = _f(False, help="coop: one context per class (cannot score unseen classes)")
    n_tokens: int = _f(4, help="vpt/joint: visual tokens per layer", min=0)
    deep: bool = _f(True, help="vpt/joint: fresh tokens at every layer (false: first layer only)")
    coupled: bool = _f(True, help="joint: visual tokens also get a learned linear map of the text context")
    optimizer: Literal["adam", "sgd"] = _f("adam", help="optimiser of the prompt parameters")
    lr: float = _f(2.0e-3, help="peak learning rate (cosine decay to 0 over the steps after the warm-up)", min=0.0)
    warmup: int = _f(0, help="first steps at the constant `warmup_lr`, before the cosine decay (CoOp: one epoch; "
                             "0: none)", min=0)
    warmup_lr: float = _f(1.0e-5, help="learning rate of the warm-up steps (CoOp: 1e-5)", min=0.0)
    weight_decay: float = _f(0.0, help="weight decay of θ (CoOp: 5e-4). sgd: L2, wd·θ added to the gradient (as "
                                       "CoOp's SGD); adam: decoupled, θ ← θ − lr·wd·θ (AdamW). Added by the "
                                       "optimiser, after ψ_φ regulates the loss gradient", min=0.0)
    steps: int = _f(200, help="optimiser steps", min=0)
    batch_size: int = _f(0, help="images per step (0: all shots, full batch)", min=0)
    C: float = _f(10.0, help="linear-probe: inverse L2 regularisation strength (scikit-learn's C)", min=0.0)
    meta_init: bool = _f(False, help="GRAM: start from the meta-learned θ (grid.gram names the meta recipe)")
    meta_regulator: bool = _f(False, help="GRAM: replace every gradient by the meta-learned ψ_φ(g; h) before "
                                          "the optimiser step (h: mean frozen image feature of the batch)")

    def check(self) -> None:
        if self.kind == "vpt" and self.n_tokens < 1:
            raise self.invalid("vpt needs n_tokens >= 1")
        if self.template is not None:
            if self.kind != "vpt":
                raise self.invalid_field("template", f"= {self.template!r} applies to vpt only (coop and joint take "
                                                     "their text from `init`)")
            if self.template.count("{}") != 1:
                raise self.invalid_field("template", f"= {self.template!r} must hold `{{}}` once, where the class "
                                                     "name goes")
        if 0 < self.steps <= self.warmup:
            raise self.invalid_field("warmup", f"= {self.warmup} leaves none of the {self.steps} steps to the cosine "
                                               "schedule (it must be below `steps`)")
        if self.meta_init or self.meta_regulator:
            if self.kind == "linear-probe":
                raise self.invalid("meta_init/meta_regulator apply to prompt methods (coop, vpt, joint), not "
                                   "linear-probe")
            if self.class_specific and self.meta_init:
                raise self.invalid("meta_init starts from one shared context; it cannot initialise a class-specific "
                                   "one")


@dataclass(frozen=True)
class ProtocolParams(Section):
    domain: Optional[str] = _f(None, help="domain (emoji: vendor) in which few-shot and base-to-new tune and "
                                          "test; the source of domain generalisation")
    split: Literal["val", "test"] = _f("test", help="split that every protocol scores")
    cross_dataset: list[str] = _f(factory=list, help="datasets scored, without tuning, by prompts tuned on "
                                                     "grid.transfer.dataset")
    domain_generalisation: list[str] = _f(factory=list, help="domains scored, without tuning, by prompts "
                                                             "tuned in `domain`")
    batch_size: int = _f(256, help="images per forward pass when scoring", min=1)


# --------------------------------------------------------------------------------------------
# meta-training data structure: embed, cluster (CHC), tasks, prototypes
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EmbedParams(Section):
    batch_size: int = _f(256, help="images (and captions) per forward pass; device and dtype are backbone's",
                         min=1)
    workers: int = _f(0, help="threads that decode images; the encoder's device resizes them (0: one per CPU core)",
                      min=0)
    max_skip_fraction: float = _f(0.01, help="the stage fails (publishing nothing, keeping what it embedded) "
                                             "when more than this share of the corpus samples is skipped: no "
                                             "image, no caption, or an image that does not decode",
                                  min=0.0, max=1.0)


@dataclass(frozen=True)
class ComplexityParams(Section):
    spread: float = _f(0.5, help="weight of the members' mean cosine distance to their centroid", min=0.0)
    disagreement: float = _f(0.25, help="weight of 1 - corr(image distances, text distances) of members",
                             min=0.0)
    children: float = _f(0.25, help="weight of the number of sub-clusters one level finer", min=0.0)
    sample: int = _f(64, help="members per cluster (at most) for the disagreement term", min=3)


@dataclass(frozen=True)
class ClusterParams(Section):
    mode: Literal["cross-modal", "image", "text"] = _f(
        "cross-modal", help="features clustered: fused image+text (CHC), or one modality (ablation)")
    weights: list[float] = _f(factory=lambda: [1.0, 1.0], help="[image, text] weights of the fused feature")
    fine_k: int = _f(200, help="k-means clusters of the finest level (level 0)", min=2)
    levels: list[int] = _f(factory=list, help="cluster counts of the coarser levels (Ward over the k-means "
                                               "centroids), strictly decreasing; level i+1 = levels[i]")
    iters: int = _f(50, help="k-means iterations at most (stops when no assignment changes)", min=1)
    seed_sample: int = _f(0, help="k-means++ seeds from this many random pairs (0: all; at millions of pairs "
                                  "seeding is the dominant cost)", min=0)
    seed: int = _f(0, help="k-means seeding and complexity sampling", min=0)
    filter_quantile: float = _f(0.0, help="drop the pairs whose image-text cosine is in this lowest fraction "
                                          "(0: keep all)", min=0.0, max=0.9)
    ablations: list[Literal["cross-modal", "image", "text"]] = _f(
        factory=list, help="other modes clustered with the same settings, for the quality table")
    truth: list[str] = _f(factory=list, help="keys of the samples' JSON that are ground-truth labellings "
                                             "(emoji: subgroup, group); empty: no quality table")
    quality_seeds: int = _f(1, help="k-means seeds (seed, seed+1, ...) over which the quality table averages "
                                    "every mode (the saved hierarchy uses `seed`)", min=1)
    complexity: ComplexityParams = _f(factory=ComplexityParams, help="structure complexity of a cluster")
    batch_size: int = _f(16384, help="rows per k-means assignment block", min=1)

    def check(self) -> None:
        if len(self.weights) != 2 or min(self.weights) < 0 or sum(self.weights) <= 0:
            raise self.invalid(f"weights must be [image, text], non-negative, not both 0; got {self.weights}")
        sizes = self.levels
        if any(not 1 <= s < self.fine_k for s in sizes) or any(a <= b for a, b in zip(sizes, sizes[1:])):
            raise self.invalid(f"levels {sizes} must decrease strictly and lie in [1, fine_k={self.fine_k})")
        if 0 < self.seed_sample < self.fine_k:
            raise self.invalid(f"seed_sample {self.seed_sample} must be 0 or at least fine_k = {self.fine_k}")
        if self.mode in self.ablations:
            raise self.invalid(f"ablations {self.ablations} repeat the main mode {self.mode!r}")


@dataclass(frozen=True)
class TaskParams(Section):
    kind: Literal["pairs", "nway"] = _f(
        "pairs", help="pairs: a task's set is n pairs of one cluster, its captions the n classes (text-as-class); "
                      "nway: N clusters are the classes, named by the words their captions share, query classes "
                      "the neighbours (same parent) of the support's (gram/tasks.py)")
    level: int = _f(1, help="hierarchy level whose clusters are the domains (pairs) or classes (nway) of a task "
                            "(0: finest)", min=0)
    n_tasks: int = _f(1000, help="meta-tasks written", min=1)
    support: list[int] = _f(factory=lambda: [8, 16], help="[min, max] pairs of a support set (nway: per class); a "
                                                          "cluster's complexity picks within it")
    query: list[int] = _f(factory=lambda: [8, 16], help="[min, max] pairs of a query set, as for support")
    ways: list[int] = _f(factory=lambda: [5, 10], help="nway: [min, max] classes of a task (uniform)")
    phrase_words: int = _f(2, help="nway: at most this many words name a cluster", min=1)
    val_fraction: float = _f(0.0, help="fraction of the level's clusters held out of every training task; the "
                                       "validation tasks (tasks-val) use only them (0: none, meta-validation then "
                                       "reuses training tasks)", min=0.0, max=0.9)
    n_val: int = _f(64, help="validation tasks written when val_fraction > 0", min=1)
    complexity_bias: float = _f(1.0, help="support cluster drawn with probability ~ 1 + bias * complexity "
                                          "(0: uniform over eligible clusters)", min=0.0)
    cross_cluster: bool = _f(True, help="query from another cluster than support (false: the same cluster, "
                                        "disjoint pairs; an ablation)")
    seed: int = _f(0, help="seed of the task sampler", min=0)
    variants: list[Literal["same-cluster"]] = _f(
        factory=list, help="extra task files with the same sizes and seed: same-cluster (support and query "
                           "from one cluster, the ablation of the cross-cluster split)")

    def check(self) -> None:
        for key in ("support", "query"):
            lo_hi = getattr(self, key)
            if len(lo_hi) != 2 or not 1 <= lo_hi[0] <= lo_hi[1]:
                raise self.invalid(f"{key} must be [min, max] with 1 <= min <= max; got {lo_hi}")
        if len(self.ways) != 2 or not 2 <= self.ways[0] <= self.ways[1]:
            raise self.invalid_field("ways", f"must be [min, max] with 2 <= min <= max; got {self.ways}")


@dataclass(frozen=True)
class PrototypeParams(Section):
    max_per_cluster: int = _f(4, help="sub-cluster prototypes of the most complex cluster of a level; the "
                                      "least complex gets 1", min=1)
    iters: int = _f(20, help="k-means iterations inside a cluster for its sub-prototypes", min=1)
    seed: int = _f(0, help="seed of the sub-cluster k-means", min=0)


@dataclass(frozen=True)
class RegulatorParams(Section):
    form: Literal["mix", "gate", "precond"] = _f(
        "mix", help="mix: SUPMER-style low-rank map mixed with g by a gate (not always a descent direction); gate: "
                    "an elementwise sigmoid gate on g; precond: (I + U(h)U(h)ᵀ) g, a positive-definite "
                    "preconditioner conditioned on h, always a descent direction that can change directions "
                    "(gram/regulator.py)")
    rank: int = _f(16, help="mix: bottleneck width of the direction map; precond: rank of U(h) (at most the row "
                            "width)", min=1)
    hidden: int = _f(32, help="hidden width of the gates and of precond's map from h to U(h)", min=1)
    context: bool = _f(True, help="mix: the gate reads the task context h (mean support image feature), false: a "
                                  "learned scalar gate; precond: U reads h, false: a learned constant U")
    init: float = _f(0.95, help="mix, gate: starting gate value (ψ starts close to the identity); precond ignores "
                                "it (U starts small)", min=0.0, max=1.0)
    gate_context: bool = _f(False, help="gate: the gate also reads the context h (a linear map of h, zero at the "
                                        "start, added to its hidden layer)")

    def check(self) -> None:
        if self.gate_context and self.form != "gate":
            raise self.invalid("gate_context applies to form: gate (the mix gate reads h through `context`)")


@dataclass(frozen=True)
class SelectParams(Section):
    """Early stopping of meta-training on a class-name dev task [ours, issue 19]."""

    dataset: Optional[str] = _f(None, help="dataset (a key of data.datasets) whose classes, in the meta-training "
                                           "domains (data.vendors.meta; never a held-out one), score θ every `every` "
                                           "steps: the step with the best dev `metric` (the initialisation included) "
                                           "is the θ, φ written (null: the last step's)")
    split: Literal["val", "train"] = _f("val", help="split of that dataset scored (never test)")
    metric: Literal["accuracy", "loss"] = _f(
        "accuracy", help="highest accuracy (ties: the earlier step) or lowest cross-entropy; the loss also falls when "
                         "the class features draw together (towards the uniform ln N), so it can prefer a collapsing θ")
    every: int = _f(25, help="outer steps between two dev scores", min=1)


@dataclass(frozen=True)
class StructureParams(Section):
    levels: list[int] = _f(factory=lambda: [0, 1], help="hierarchy levels whose prototypes the relation uses "
                                                        "(0 = finest)")
    tau: float = _f(0.05, help="softmax temperature of the relation w = softmax(cos(f, P) / tau)", min=1.0e-6)
    modality: Literal["image", "text", "fused"] = _f("image", help="which prototypes (the test side has images)")
    sub: bool = _f(False, help="relate to the complexity-informed sub-prototypes instead of one per cluster")

    def check(self) -> None:
        if not self.levels or min(self.levels) < 0:
            raise self.invalid(f"levels must be a non-empty list of levels >= 0; got {self.levels}")


@dataclass(frozen=True)
class MetaParams(Section):
    prompt: MethodParams = _f(factory=MethodParams, help="the prompt whose θ is meta-learned (kind, init, n_ctx, "
                                                          "n_tokens, deep, coupled are read)")
    regulator: RegulatorParams = _f(factory=RegulatorParams, help="the gradient regulating function ψ_φ")
    tasks: Literal["default", "same-cluster"] = _f(
        "default", help="which task file of the tasks stage: default, or same-cluster (the ablation without "
                        "the cross-cluster split; needs `same-cluster` in tasks.variants)")
    steps: int = _f(500, help="outer steps", min=1)
    tasks_per_step: int = _f(4, help="meta-batch: tasks averaged per outer step", min=1)
    inner_steps: int = _f(1, help="regulated inner steps on the support set", min=1)
    inner_lr: float = _f(0.1, help="inner learning rate α of θ' = θ - α ψ(∇θ L_S)", min=0.0)
    lr: float = _f(1.0e-3, help="Adam learning rate of the initialisation θ", min=0.0)
    regulator_lr: float = _f(1.0e-3, help="Adam learning rate of the regulator φ", min=0.0)
    second_order: bool = _f(False, help="differentiate through the support gradient (false: first order in θ; "
                                        "φ gets its exact gradient either way)")
    reg_lambda: float = _f(
        0.0, help="weight λ of the sibling's meta-regulariser λ (c - (1 + mean row-wise cos(g_Q, ψ(g_S)))/2)^2 added "
                  "to the outer loss: pulls the mix gate c towards the agreement of the query gradient at θ' with the "
                  "regulated support gradient (form mix only). It trains φ (the gate, and ψ through the cosine); it "
                  "reaches θ only with second_order (first order: g_S and g_Q are detached), otherwise only "
                  "through φ's effect on θ'", min=0.0)
    anchor: float = _f(0.0, help="weight λ of λ·Σ‖θ − θ₀‖² added to every outer step's loss, θ₀ the prompt's "
                                 "initial θ (its words, or the random init): keeps the meta-learned θ near a prompt "
                                 "that still names classes (0: off) [ours]", min=0.0)
    symmetric: bool = _f(False, help="text-as-class loss in both directions (image->text and text->image)")
    context: Literal["support", "structure"] = _f(
        "support", help="task context h of ψ: the mean frozen support image feature, or its relation to the "
                        "prototypes (`structure`, the test-time regulator's context; needs the prototypes stage)")
    structure: StructureParams = _f(factory=StructureParams, help="the prototype relation of context: structure")
    grad_clip: float = _f(1.0, help="norm clip of the outer gradient of θ and of φ (0: off)", min=0.0)
    select: SelectParams = _f(factory=SelectParams, help="early stopping on a class-name dev task (off by default)")
    autocast: Literal["auto", "bf16", "off"] = _f("auto", help="auto: bf16 autocast on CUDA, fp32 on CPU")
    checkpoint_every: int = _f(100, help="write a resumable checkpoint every N outer steps (0: never)", min=0)
    seed: int = _f(0, help="seed of the random prompt init and the task order", min=0)
    seeds: int = _f(1, help="meta-training runs, with seeds seed, seed + 1, ...: a GRAM method tuned with grid seed s "
                            "reads run (s - 1) mod seeds, so its spread over seeds includes meta-training's", min=1)

    def check(self) -> None:
        if self.prompt.kind == "linear-probe":
            raise self.invalid("prompt.kind must be coop, vpt or joint: a linear probe has no prompt to meta-learn")
        if self.prompt.class_specific:
            raise self.invalid("prompt.class_specific: captions are the classes of a task, so the context must be "
                               "shared")
        if self.reg_lambda > 0 and self.regulator.form != "mix":
            raise self.invalid_field("reg_lambda", f"= {self.reg_lambda} > 0 applies to regulator.form: mix only (it "
                                                   f"regularises the mix gate c; form {self.regulator.form!r} has "
                                                   "none): set it to 0")
        if self.context == "structure" and not reads_context(self.regulator):
            raise self.invalid("context: structure needs a regulator that reads h (form: mix or precond with "
                               "context: true, or form: gate with gate_context: true)")


@dataclass(frozen=True)
class TptMethodParams(Section):
    prompt: MethodParams = _f(factory=MethodParams, help="the text prompt tuned per test image (kind coop, shared "
                                                          "context; init, n_ctx are read)")
    init: Literal["words", "tuned", "meta"] = _f(
        "words", help="θ before each image: the words of prompt.init; a few-shot-tuned prompt (grid.tpt.tuned); "
                      "or GRAM's meta-learned θ (grid.tpt.gram)")
    regulator: Literal["none", "plain", "structure"] = _f(
        "none", help="ψ_φ on the test-time gradient: none; plain (h = mean feature of the kept views); structure "
                     "(h = their relation to the meta-training prototypes)")
    lr: Optional[float] = _f(None, help="this method's AdamW learning rate (null: tpt.lr); a prompt of another "
                                        "scale than the words' (CoOp's random context) needs its own", min=0.0)

    def check(self) -> None:
        if self.prompt.kind != "coop" or self.prompt.class_specific:
            raise self.invalid("test-time tuning tunes a shared text context: prompt.kind must be coop, not "
                               "class-specific")


@dataclass(frozen=True)
class TptParams(Section):
    domains: list[str] = _f(factory=list, help="domains whose split is tuned on, image by image, and scored (empty: "
                                               "every domain of the dataset)")
    split: Literal["val", "test"] = _f("test", help="the scored split")
    views: int = _f(64, help="views per test image: the image itself and views - 1 augmented ones", min=1)
    keep: float = _f(0.1, help="fraction of views with the lowest prediction entropy that the loss uses "
                               "(chosen once, at the first step)", min=0.0, max=1.0)
    steps: int = _f(1, help="AdamW steps per test image (0: no tuning, the initial prompt's prediction)", min=0)
    lr: float = _f(5.0e-3, help="AdamW learning rate", min=0.0)
    weight_decay: float = _f(0.01, help="AdamW weight decay (torch's default)", min=0.0)
    augment: Literal["crop-flip", "augmix"] = _f("crop-flip", help="views of the datasets not in `augmix`: random "
                                                                    "resized crops and flips")
    augmix: list[str] = _f(factory=list, help="datasets whose views are AugMix-style (fine-grained sets, as TPT does)")
    crop_scale: list[float] = _f(factory=lambda: [0.08, 1.0], help="area range of the random resized crops")
    batch_size: int = _f(32, help="test images tuned together, each with its own prompt copy", min=1)
    max_prompts: int = _f(8192, help="bound on images x classes per text-encoder call (memory)", min=1)
    structure: StructureParams = _f(factory=StructureParams, help="prototype relation of the structure regulator")
    methods: dict[str, TptMethodParams] = _f(factory=dict, help="test-time methods by name (grid.tpt runs them)")

    def check(self) -> None:
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise self.invalid(f"crop_scale must be [low, high] with 0 < low <= high <= 1; got {self.crop_scale}")
        if self.keep * self.views < 1:
            raise self.invalid(f"keep = {self.keep} of views = {self.views} keeps no view (keep * views must be >= 1)")


@dataclass(frozen=True)
class ProfileParams(Section):
    data: DataParams = _f(factory=DataParams, help="download stage")
    backbone: BackboneParams = _f(factory=BackboneParams, help="backbone stage")
    evaluate: EvaluateParams = _f(factory=EvaluateParams, help="evaluate stage")
    protocols: ProtocolParams = _f(factory=ProtocolParams, help="few-shot, base-to-new, cross-dataset and "
                                                                "domain-generalisation protocols")
    methods: dict[str, MethodParams] = _f(factory=dict, help="tuned methods by name (grid.tuned picks the run ones)")
    embed: EmbedParams = _f(factory=EmbedParams, help="embed stage: frozen embeddings of the meta-training corpus")
    cluster: ClusterParams = _f(factory=ClusterParams, help="cluster stage: Cross-Modal Hierarchical Clustering")
    tasks: TaskParams = _f(factory=TaskParams, help="tasks stage: complexity-informed meta-tasks")
    prototypes: PrototypeParams = _f(factory=PrototypeParams, help="prototypes stage: multi-level prototypes")
    meta: dict[str, MetaParams] = _f(factory=dict, help="meta-training recipes by name (grid.meta picks the run ones)")
    tpt: TptParams = _f(factory=lambda: TptParams(), help="test-time prompt tuning (gram/tpt.py)")
    grid: Optional["GridParams"] = _f(None, help="this profile's own fan-out (paper); null: the top-level grid")

    def check(self) -> None:
        bad = _bad_method_names([(f"methods.{n}", n) for n in self.methods] + [(f"meta.{n}", n) for n in self.meta]
                                + [(f"tpt.methods.{n}", n) for n in self.tpt.methods])
        if bad is not None:
            raise bad


@dataclass(frozen=True)
class TransferParams(Section):
    dataset: str = _f("subgroup16", help="dataset whose few-shot prompts are scored on other datasets/domains")
    shots: int = _f(16, help="shots of those prompts (one of grid.shots)", min=1)


@dataclass(frozen=True)
class GramEntry(Section):
    method: str = _f("", help="a GRAM method (a key of <profile>.methods with meta_init or meta_regulator)")
    meta: str = _f("", help="the meta-training recipe whose θ and ψ_φ it uses (a key of <profile>.meta)")


@dataclass(frozen=True)
class TptTuned(Section):
    method: str = _f("", help="a test-time method with init: tuned (a key of <profile>.tpt.methods)")
    prompt: str = _f("", help="the tuned method whose few-shot prompt of grid.transfer (same seed) it starts from")


@dataclass(frozen=True)
class TptGram(Section):
    method: str = _f("", help="a test-time method with init: meta or a regulator (a key of <profile>.tpt.methods)")
    meta: str = _f("", help="the meta-training recipe whose θ and ψ_φ it uses (a key of <profile>.meta)")


@dataclass(frozen=True)
class TptGrid(Section):
    datasets: list[str] = _f(factory=list, help="datasets tuned on at test time (all their classes)")
    words: list[str] = _f(factory=list, help="test-time methods that start from words, without ψ: one job per "
                                             "(dataset, method, seed)")
    tuned: list[TptTuned] = _f(factory=list, help="test-time methods that start from a few-shot-tuned prompt")
    gram: list[TptGram] = _f(factory=list, help="test-time methods that read a meta-training output")

    def methods(self) -> list[str]:
        """Every test-time method of the grid: words, then tuned, then GRAM ones."""
        return list(self.words) + [e.method for e in self.tuned] + [e.method for e in self.gram]


@dataclass(frozen=True)
class GridParams(Section):
    methods: list[Literal["zeroshot", "zeroshot-ensemble"]] = _f(
        factory=lambda: ["zeroshot", "zeroshot-ensemble"], help="zero-shot methods, one evaluate job each")
    tuned: list[str] = _f(factory=list, help="tuned methods (keys of <profile>.methods): one job per "
                                             "(protocol, dataset, method, shots, seed)")
    meta: list[str] = _f(factory=list, help="meta-training recipes run (keys of <profile>.meta): one job each")
    gram: list[GramEntry] = _f(factory=list, help="GRAM methods, each with its meta recipe: one job per "
                                                  "(protocol, dataset, method, shots, seed), as for `tuned`")
    datasets: list[str] = _f(factory=list, help="datasets of the few-shot and base-to-new protocols")
    shots: list[int] = _f(factory=lambda: [1, 2, 4, 8, 16], help="shots per class of the few-shot protocol", min=1)
    seeds: list[int] = _f(factory=lambda: [1, 2, 3], help="seeds of every tuned run (subset, init, batches)")
    base_to_new_shots: int = _f(16, help="shots per base class in base-to-new", min=1)
    transfer: TransferParams = _f(factory=TransferParams, help="source of cross-dataset and domain "
                                                               "generalisation")
    tpt: TptGrid = _f(factory=TptGrid, help="test-time tuning runs (gram tpt), seeds from `seeds`")

    def check(self) -> None:
        t = self.tpt
        bad = _bad_method_names(
            [(f"tuned[{i}]", n) for i, n in enumerate(self.tuned)]
            + [(f"meta[{i}]", n) for i, n in enumerate(self.meta)]
            + [(f"gram[{i}].{k}", getattr(e, k)) for i, e in enumerate(self.gram) for k in ("method", "meta")]
            + [(f"tpt.words[{i}]", n) for i, n in enumerate(t.words)]
            + [(f"tpt.tuned[{i}].{k}", getattr(e, k)) for i, e in enumerate(t.tuned) for k in ("method", "prompt")]
            + [(f"tpt.gram[{i}].{k}", getattr(e, k)) for i, e in enumerate(t.gram) for k in ("method", "meta")])
        if bad is not None:
            raise bad


@dataclass(frozen=True)
class Params(Section):
    profile: Literal["emoji", "demo", "paper", "tiny", "paper_smoke"] = _f("emoji", help="active profile")
    grid: GridParams = _f(factory=GridParams, help="evaluation fan-out shared by all profiles")
    emoji: Optional[ProfileParams] = _f(None, help="laptop-sized emoji world")
    demo: Optional[ProfileParams] = _f(None, help="the emoji world with demo budgets and its own grid (`make demo`)")
    paper: Optional[ProfileParams] = _f(None, help="the paper's setup (real CLIP, CC3M, 11 datasets)")
    tiny: Optional[ProfileParams] = _f(None, help="seconds-sized profile for tests (tests/params/tiny.yaml)")
    paper_smoke: Optional[ProfileParams] = _f(None, help="the paper profile's code path on tiny fake data "
                                                         "(tests/fake_paper.py), for CI (tests/params/paper_smoke.yaml)")

    def defined(self) -> list[str]:
        """The profiles this file defines."""
        return [name for name in PROFILES if getattr(self, name) is not None]

    def active(self, profile: str | None = None) -> ProfileParams:
        """The section of `profile` (default: the `profile:` key)."""
        name = profile or self.profile
        section = getattr(self, name)
        if section is None:
            raise ConfigError(f"profile {name!r} is not defined in this params file (it defines "
                              f"{', '.join(self.defined()) or 'none'})")
        return section

    def grid_of(self, profile: str | None = None) -> GridParams:
        """The fan-out of `profile`: its own `grid` when it has one, else the top-level `grid`."""
        return self.active(profile).grid or self.grid


# --------------------------------------------------------------------------------------------
# parsing and validation
# --------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {_type_name(typing.get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _parse(value: Any, tp: Any, key: str, where: str) -> Any:
    """Build the sections of a parsed mapping: a mapping where the annotation `tp` is a section becomes
    that section (`_build`, recursively through lists, mappings and optionals). Everything else is left
    as it is for the enclosing section to check when it is constructed."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, where) if isinstance(value, dict) else value
    if origin in (Union, types.UnionType):
        sections = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return _build(sections[0], value, key, where) if sections and isinstance(value, dict) else value
    if origin is list and isinstance(value, list):
        (item,) = typing.get_args(tp)
        return [_parse(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        _, item = typing.get_args(tp)
        return {str(k): _parse(v, item, f"{key}.{k}", where) for k, v in value.items()}
    return value


def _build(cls: type, raw: dict, prefix: str, where: str) -> Any:
    """Section `cls` from the mapping `raw` found at dotted key `prefix` of file `where`."""
    hints = _hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(fields))
    gone = [k for k in unknown if k in getattr(cls, "removed", {})]
    if gone:
        raise ConfigError(f"{where}: `{prefix + '.' if prefix else ''}{gone[0]}` was removed: "
                          f"{cls.removed[gone[0]]}; delete it from the file")
    if unknown:
        dotted = ", ".join(f"`{prefix + '.' if prefix else ''}{k}`" for k in unknown)
        raise ConfigError(f"{where}: unknown key {dotted} (allowed here: {', '.join(sorted(fields))})")
    kwargs = {}
    for name in (f for f in fields if f in raw):  # in field order: the first bad field is reported
        kwargs[name] = _parse(raw[name], hints[name], f"{prefix}.{name}" if prefix else name, where)
    try:
        obj = cls(**kwargs)
    except ConfigError as e:
        if e.key is None:  # already names the file
            raise
        if e.key:  # a field: its full dotted key
            raise ConfigError(f"{where}: `{prefix + '.' if prefix else ''}{e.key}` {e.detail}") from None
        raise ConfigError(f"{where}: `{prefix}`: {e.detail}") from None
    if cls is ProfileParams:
        _check_profile(obj, prefix, where)
    elif cls is Params:
        _check_params(obj, where)
    return obj


def section_from_dict(cls: type, raw: dict, where: str, prefix: str = "") -> Any:
    """One section from a mapping (e.g. the config an output file records); errors name `where` and the
    keys under `prefix`."""
    return _build(cls, raw, prefix, where)


def _check_profile(obj: ProfileParams, prefix: str, where: str) -> None:
    """The checks of a profile that span its sections (a dataset, vendor or task file named in one section
    must exist in another)."""
    def err(msg: str) -> ConfigError:
        return ConfigError(f"{where}: `{prefix}`: {msg}")

    unknown = sorted(set(obj.evaluate.datasets) - set(obj.data.datasets))
    if unknown:
        raise err(f"evaluate.datasets names {unknown}, which data.datasets does not define")
    roles = obj.data.vendors
    known = set(obj.data.npm.images) if obj.data.source == "npm" else None
    for role in ("pretrain", "meta", "heldout"):
        for v in getattr(roles, role):
            if known is not None and v not in known:
                raise err(f"data.vendors.{role} names {v!r}, which data.npm.images does not define")
    if known is not None:
        extra = sorted(set(obj.evaluate.domains) - known)
        if extra:
            raise err(f"evaluate.domains names {extra}, which data.npm.images does not define")
        if obj.backbone.source == "pretrain" and not roles.pretrain:
            raise err("backbone.source: pretrain needs at least one vendor in data.vendors.pretrain")
        pr = obj.protocols
        for key, names in (("protocols.domain", [pr.domain] if pr.domain else []),
                           ("protocols.domain_generalisation", pr.domain_generalisation)):
            extra = sorted(set(names) - known)
            if extra:
                raise err(f"{key} names {extra}, which data.npm.images does not define")
    unknown = sorted(set(obj.protocols.cross_dataset) - set(obj.data.datasets))
    if unknown:
        raise err(f"protocols.cross_dataset names {unknown}, which data.datasets does not define")
    if obj.tasks.level > len(obj.cluster.levels):
        raise err(f"tasks.level = {obj.tasks.level} but the hierarchy has levels 0..{len(obj.cluster.levels)} "
                  "(cluster.levels gives the coarser ones)")
    for name, m in obj.meta.items():
        if m.tasks != "default" and m.tasks not in obj.tasks.variants:
            raise err(f"meta.{name}.tasks = {m.tasks!r} needs {m.tasks!r} in tasks.variants")
        if m.select.dataset is not None:
            if m.select.dataset not in obj.data.datasets:
                raise err(f"meta.{name}.select.dataset = {m.select.dataset!r}, which data.datasets does not define")
            if not obj.data.vendors.meta:
                raise err(f"meta.{name}.select.dataset scores the meta-training domains: data.vendors.meta is empty")
    n_levels = len(obj.cluster.levels) + 1
    for key, st in [(f"meta.{n}.structure", m.structure) for n, m in obj.meta.items() if m.context == "structure"] \
            + [("tpt.structure", obj.tpt.structure)]:
        if max(st.levels) >= n_levels:
            raise err(f"{key}.levels = {st.levels}, but the hierarchy has levels 0..{n_levels - 1}")
    unknown = sorted(set(obj.tpt.augmix) - set(obj.data.datasets))
    if unknown:
        raise err(f"tpt.augmix names {unknown}, which data.datasets does not define")
    if obj.data.source == "npm":
        extra = sorted(set(obj.tpt.domains) - set(obj.data.npm.images))
        if extra:
            raise err(f"tpt.domains names {extra}, which data.npm.images does not define")


def _check_params(obj: Params, where: str) -> None:
    """The checks of the whole file: the active profile exists here, and its grid."""
    if getattr(obj, obj.profile) is None:
        raise ConfigError(f"{where}: `profile: {obj.profile}` names a profile this file does not define (it "
                          f"defines {', '.join(obj.defined()) or 'none'}; the test profiles are in tests/params/)")
    own = obj.active().grid
    if own is not None and own != obj.grid:
        raise ConfigError(f"{where}: `grid` differs from `{obj.profile}.grid`, the active profile's own grid: "
                          f"dvc.yaml expands the top-level `grid`, so with `profile: {obj.profile}` write "
                          f"`grid: *grid_{obj.profile}` (Snakemake's --config profile={obj.profile} picks it "
                          "by itself)")
    check_grid(obj, obj.profile, where)


def prompt_shape(m: MethodParams) -> tuple[str, ...]:
    """The fields of a method that decide the shapes of its θ and what θ is read with (a meta-learned θ must
    agree on them): vpt's tokens were meta-learned against the class features of its `template`."""
    text = ("init",) + (("n_ctx",) if m.init is None else ())
    return ("kind",) + {"coop": text, "vpt": ("n_tokens", "deep", "template"),
                        "joint": text + ("n_tokens", "deep", "coupled")}.get(m.kind, ())


def check_grid(params: Params, profile: str, where: str) -> None:
    """The fan-out of `grid` must name methods and datasets that `profile` defines.

    Checked for the `profile:` key, the one the workflow runs; a stage run with another `--profile`
    checks what it uses itself (so `gram backbone --profile paper` works with an emoji grid)."""
    prof, g = params.active(profile), params.grid
    for key, names, have, where_ in (("grid.tuned", g.tuned, prof.methods, f"{profile}.methods"),
                                     ("grid.datasets", g.datasets, prof.data.datasets, f"{profile}.data.datasets")):
        extra = [n for n in names if n not in have]
        if extra:
            raise ConfigError(f"{where}: `{key}` names {extra}, which `{where_}` does not define")
    extra = [n for n in g.meta if n not in prof.meta]
    if extra:
        raise ConfigError(f"{where}: `grid.meta` names {extra}, which `{profile}.meta` does not define")
    for i, e in enumerate(g.gram):
        key = f"grid.gram[{i}]"
        if e.method not in prof.methods:
            raise ConfigError(f"{where}: `{key}.method` = {e.method!r} is not defined in `{profile}.methods`")
        m = prof.methods[e.method]
        if not (m.meta_init or m.meta_regulator):
            raise ConfigError(f"{where}: `{key}.method` = {e.method!r} uses neither meta_init nor meta_regulator "
                              "(list plain methods in grid.tuned)")
        if e.method in g.tuned:
            raise ConfigError(f"{where}: `{key}.method` = {e.method!r} is also in grid.tuned; list it once")
        if e.meta not in g.meta:
            raise ConfigError(f"{where}: `{key}.meta` = {e.meta!r} is not in grid.meta {g.meta} (it must be "
                              "meta-trained)")
        if e.meta in prof.meta:
            p = prof.meta[e.meta].prompt
            diff = [f for f in prompt_shape(m) if getattr(m, f) != getattr(p, f)]
            if diff:
                raise ConfigError(f"{where}: `{key}`: method {e.method!r} and the prompt of `{profile}.meta."
                                  f"{e.meta}` differ in {diff}: the meta-learned θ would not fit")
    for name in g.tuned:
        m = prof.methods.get(name)
        if m is not None and (m.meta_init or m.meta_regulator):
            raise ConfigError(f"{where}: `grid.tuned` names {name!r}, a GRAM method: list it in grid.gram with "
                              "its meta recipe")
    if g.datasets:
        if g.transfer.dataset not in g.datasets:
            raise ConfigError(f"{where}: `grid.transfer.dataset` = {g.transfer.dataset!r} is not in grid.datasets "
                              f"{g.datasets} (its few-shot prompts are what transfers)")
        if g.transfer.shots not in g.shots:
            raise ConfigError(f"{where}: `grid.transfer.shots` = {g.transfer.shots} is not in grid.shots {g.shots} "
                              "(its few-shot prompts are what transfers)")
    check_tpt_grid(params, profile, where)


def reads_context(r: RegulatorParams) -> bool:
    """Whether ψ built from `r` depends on the context h."""
    return (r.form in ("mix", "precond") and r.context) or (r.form == "gate" and r.gate_context)


def check_tpt_grid(params: Params, profile: str, where: str) -> None:
    """grid.tpt must name test-time methods whose init and regulator fit the list they are in."""
    prof, g, t = params.active(profile), params.grid, params.grid.tpt
    methods = prof.tpt.methods

    def err(msg: str) -> ConfigError:
        return ConfigError(f"{where}: {msg}")

    extra = [d for d in t.datasets if d not in prof.data.datasets]
    if extra:
        raise err(f"`grid.tpt.datasets` names {extra}, which `{profile}.data.datasets` does not define")
    names = t.methods()
    for name in names:
        if name not in methods:
            raise err(f"`grid.tpt` names {name!r}, which `{profile}.tpt.methods` does not define")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise err(f"`grid.tpt` lists {dup} more than once")
    for name in t.words:
        m = methods[name]
        if m.init != "words" or m.regulator != "none":
            raise err(f"`grid.tpt.words` names {name!r}, whose init is {m.init!r} and regulator {m.regulator!r}: "
                      "list it in grid.tpt.tuned (init: tuned) or grid.tpt.gram (init: meta or a regulator)")
    for i, e in enumerate(t.tuned):
        m, key = methods[e.method], f"grid.tpt.tuned[{i}]"
        if m.init != "tuned" or m.regulator != "none":
            raise err(f"`{key}.method` = {e.method!r} must have init: tuned and regulator: none")
        if e.prompt not in g.tuned:
            raise err(f"`{key}.prompt` = {e.prompt!r} is not in grid.tuned {g.tuned} (its few-shot prompt is the init)")
        src = prof.methods[e.prompt]
        diff = [f for f in prompt_shape(m.prompt) if getattr(m.prompt, f) != getattr(src, f)]
        if src.class_specific or diff:
            raise err(f"`{key}`: the prompt of {e.prompt!r} does not fit test-time method {e.method!r} "
                      f"({'class-specific' if src.class_specific else 'differs in ' + str(diff)})")
        if g.transfer.dataset not in g.datasets:
            raise err(f"`{key}` starts from the few-shot prompts of grid.transfer, which grid.datasets lacks")
    for i, e in enumerate(t.gram):
        m, key = methods[e.method], f"grid.tpt.gram[{i}]"
        if m.init == "tuned" or (m.init == "words" and m.regulator == "none"):
            raise err(f"`{key}.method` = {e.method!r} reads no meta-training output (init: meta or a regulator)")
        if e.meta not in g.meta:
            raise err(f"`{key}.meta` = {e.meta!r} is not in grid.meta {g.meta} (it must be meta-trained)")
        r = prof.meta[e.meta]
        diff = [f for f in prompt_shape(m.prompt) if getattr(m.prompt, f) != getattr(r.prompt, f)]
        if diff:
            raise err(f"`{key}`: method {e.method!r} and the prompt of `{profile}.meta.{e.meta}` differ in {diff}")
        if m.regulator == "structure" and not reads_context(r.regulator):
            raise err(f"`{key}`: regulator: structure needs a ψ that reads h, but `{profile}.meta.{e.meta}.regulator` "
                      "does not (form: mix or precond with context, or gate with gate_context)")


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the parameter file ({e.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return raw


def from_dict(raw: dict, where: str = "<params>") -> Params:
    """Validate a parsed params mapping (e.g. Snakemake's `config`)."""
    return _build(Params, raw, "", where)


def load(path: str | Path = "params.yaml", profile: str | None = None) -> tuple[Params, ProfileParams]:
    """Load and validate `path`; returns (all params, the section of `profile`)."""
    params = from_dict(read_yaml(path), str(path))
    if profile is not None and profile not in PROFILES:
        raise ConfigError(f"{path}: unknown profile {profile!r} (one of {', '.join(PROFILES)})")
    if profile is not None and getattr(params, profile) is None:
        raise ConfigError(f"{path}: profile {profile!r} is not defined in this file (it defines "
                          f"{', '.join(params.defined())}; the test profiles are in tests/params/)")
    if profile is not None and profile != params.profile and params.active(profile).grid is not None:
        params = dataclasses.replace(params, grid=params.grid_of(profile))  # as Snakemake's --config profile=
        check_grid(params, profile, str(path))
    return params, params.active(profile)


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain data (for JSON records)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


# --------------------------------------------------------------------------------------------
# JSON schema (for Snakemake's `validate`)
# --------------------------------------------------------------------------------------------
def _schema_of(tp: Any, meta: dict, defs: dict) -> dict:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        out = {"anyOf": [_schema_of(a, meta, defs) for a in typing.get_args(tp)]}
    elif origin is Literal:
        out = {"enum": list(typing.get_args(tp))}
    elif origin is list:
        out = {"type": "array", "items": _schema_of(typing.get_args(tp)[0], {}, defs)}
    elif origin is dict:
        out = {"type": "object", "additionalProperties": _schema_of(typing.get_args(tp)[1], {}, defs)}
    elif dataclasses.is_dataclass(tp):
        name = tp.__name__
        if name not in defs:
            defs[name] = {}  # placeholder against recursion
            hints = typing.get_type_hints(tp)
            props = {}
            for f in dataclasses.fields(tp):
                props[f.name] = _schema_of(hints[f.name], dict(f.metadata), defs)
                props[f.name]["description"] = f.metadata["help"]
            defs[name] = {"type": "object", "additionalProperties": False, "properties": props}
        out = {"$ref": f"#/$defs/{name}"}
    elif tp is type(None):
        out = {"type": "null"}
    else:
        out = {"type": {bool: "boolean", int: "integer", float: "number", str: "string"}[tp]}
        if meta.get("min") is not None:
            out["minimum"] = meta["min"]
        if meta.get("max") is not None:
            out["maximum"] = meta["max"]
    return out


def json_schema() -> dict:
    """JSON schema of params.yaml, generated from the dataclasses above."""
    defs: dict = {}
    root = _schema_of(Params, {}, defs)
    top = defs.pop("Params")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "description": "gram params.yaml (generated by `gram schema`; do not edit)",
            **top, "$defs": dict(sorted(defs.items()))} if root else {}
