"""`gram img2dataset`: build the meta-training corpus shards from a caption/URL table. [ours]

    gram img2dataset --params params.yaml --profile paper [--log F]

The opt-in corpus download of the paper profile (`data.paper.img2dataset`): img2dataset fetches every
URL of `url_list` (CC3M's `Train_GCC-training.tsv`) and writes webdataset shards `<output>/00000.tar`,
... holding `{key}.jpg` (resized so that the shorter side is `image_size`: resize_mode keep_ratio),
`{key}.txt` (the caption) and `{key}.json` (img2dataset's metadata: url, caption, status, sizes), the
layout `gram.data.shards` reads. Beside each shard img2dataset writes `<shard>.parquet` (every row,
failed ones included) and `<shard>_stats.json` (counts and failure reasons).

Resumable: img2dataset runs with `incremental_mode="incremental"`, which skips every shard that has
its `_stats.json`, the file it writes when a shard is finished. A rerun after an interruption fetches
only the unfinished shards (a half-written `.tar` of an interrupted shard is rewritten). A rerun
with other settings that change the shards (table, columns, image size, samples per shard) is
refused: the output would mix both.

After img2dataset, the stage sums the `_stats.json` files into `<output>.img2dataset.json` (beside
the folder: img2dataset reads every `*.json` inside it as a shard's stats): shards, samples,
successes, failures by kind and by reason. A shard with no stats (img2dataset gave up on it after
its retry) makes the stage fail after writing the record, so a rerun finishes it.

The table needs a header line naming `url_col` and `caption_col`; CC3M's TSV has none (its columns
are caption, then URL), so prepend one: `sed -i '1i caption\\turl' Train_GCC-training.tsv`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import signal
import time
from pathlib import Path

from gram.config import Img2DatasetParams
from gram.io import read_json, write_json
from gram.stage import stage_parser, stage_setup

log = logging.getLogger("gram.data.img2dataset")

SUMMARY_SUFFIX = ".img2dataset.json"  # <output>.img2dataset.json, beside the shard folder
MAX_REASONS = 100  # most frequent failure reasons kept by name; the rest are summed under "(other)"
# settings that change what the shards hold: a rerun with other values would mix two corpora
SHARD_SETTINGS = ("url_list", "input_format", "url_col", "caption_col", "image_size", "samples_per_shard")
_STATS = re.compile(r"^(\d+)_stats\.json$")


def summary_path(output: str | Path) -> Path:
    """The summary record of an output folder: `<output>.img2dataset.json`."""
    output = Path(output)
    return output.with_name(output.name + SUMMARY_SUFFIX)


def _img2dataset():
    """The img2dataset module, imported on first use (an optional dependency)."""
    # albumentations, imported by img2dataset, asks PyPI for a newer version on import (also in every
    # worker process, which inherits the environment)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        import img2dataset
    except ImportError as e:
        raise RuntimeError(f"img2dataset is not installed ({e}); install the corpus extra: "
                           "pip install -e '.[corpus]' -c constraints.txt") from e
    return img2dataset


def _check_table(cfg: Img2DatasetParams) -> None:
    """Refuse a disabled stage, a missing table, or a csv/tsv table whose header lacks the columns."""
    if not cfg.enabled:
        raise ValueError("data.paper.img2dataset.enabled is false: set it to true to build the corpus shards "
                         "with img2dataset (otherwise data.paper.corpus names existing shards)")
    if not cfg.url_list:
        raise ValueError("data.paper.img2dataset.url_list is empty: name the caption/URL table")
    table = Path(cfg.url_list)
    if "://" in cfg.url_list:
        return  # a remote table (fsspec): img2dataset reads it
    if not table.exists():
        raise FileNotFoundError(f"{table}: the caption/URL table (data.paper.img2dataset.url_list) does not exist")
    if cfg.input_format not in ("tsv", "csv") or not table.is_file():
        return
    with open(table, newline="", encoding="utf-8", errors="replace") as f:
        header = next(csv.reader(f, delimiter="\t" if cfg.input_format == "tsv" else ","), [])
    missing = [c for c in (cfg.url_col, cfg.caption_col) if c not in header]
    if missing:
        raise ValueError(f"{table}: the header line {header[:4]} lacks the column(s) {missing} "
                         "(data.paper.img2dataset.url_col/caption_col); CC3M's TSV has no header: prepend one "
                         "with `sed -i '1i caption\\turl' FILE`")


def summarize(output: str | Path) -> dict:
    """Sum the `<shard>_stats.json` files of an img2dataset output folder.

    Returns:
        {"shards", "samples", "successes", "failures", "failed_to_download", "failed_to_resize",
        "reasons": {reason: count} (most frequent first), "unfinished": shard names without stats}.
        A shard is unfinished when its `.tar` has no stats, or when its number is missing between
        finished ones (img2dataset gave up on it before it opened the tar).
    """
    output = Path(output)
    stats = {int(m[1]): p for p in output.iterdir() if (m := _STATS.match(p.name))}
    tars = {int(p.stem): p for p in output.glob("*.tar") if p.stem.isdigit()}
    record = {"shards": len(stats), "samples": 0, "successes": 0, "failures": 0, "failed_to_download": 0,
              "failed_to_resize": 0, "reasons": {}, "unfinished": []}
    reasons: dict[str, int] = {}
    for shard in sorted(stats):
        s = json.loads(stats[shard].read_text())
        record["samples"] += s["count"]
        record["successes"] += s["successes"]
        record["failed_to_download"] += s["failed_to_download"]
        record["failed_to_resize"] += s["failed_to_resize"]
        for reason, n in s["status_dict"].items():
            if reason != "success":
                reasons[reason] = reasons.get(reason, 0) + n
    record["failures"] = record["failed_to_download"] + record["failed_to_resize"]
    ranked = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    record["reasons"] = dict(ranked[:MAX_REASONS])
    if len(ranked) > MAX_REASONS:
        record["reasons"]["(other)"] = sum(n for _, n in ranked[MAX_REASONS:])
    width = max([len(p.stem) for p in tars.values()] + [len(p.name.split("_")[0]) for p in stats.values()] + [5])
    gaps = set(range(max(stats, default=-1))) - set(stats)
    record["unfinished"] = [f"{i:0{width}d}" for i in sorted((set(tars) - set(stats)) | gaps)]
    return record


def run(cfg: Img2DatasetParams) -> dict:
    """Download the corpus of `cfg.url_list` into webdataset shards in `cfg.output` (see the module docstring).

    Returns:
        The summary record, also written to `<output>.img2dataset.json`.
    Raises:
        ValueError when the stage is not enabled, the table's header lacks the columns, or the output
        holds shards made with other settings; FileNotFoundError when the table is missing;
        RuntimeError when img2dataset is not installed or left shards unfinished (after writing the record).
    """
    from importlib.metadata import version

    _check_table(cfg)
    i2d = _img2dataset()
    output = Path(cfg.output)
    summary = summary_path(output)
    settings = {k: getattr(cfg, k) for k in SHARD_SETTINGS}
    if output.is_dir() and any(output.glob("*_stats.json")) and summary.is_file():
        before = read_json(summary).get("settings", {})
        changed = {k: (before[k], v) for k, v in settings.items() if k in before and before[k] != v}
        if changed:
            raise ValueError(f"{output}: holds shards made with other settings {changed} (was, now); remove the "
                             "folder to rebuild it, or restore data.paper.img2dataset")
    log.info("img2dataset %s: %s -> %s", version("img2dataset"), cfg.url_list, output)
    t0 = time.perf_counter()
    previous = signal.getsignal(signal.SIGINT)
    try:
        i2d.download(
            url_list=cfg.url_list,
            input_format=cfg.input_format,
            url_col=cfg.url_col,
            caption_col=cfg.caption_col,
            output_folder=str(output),
            output_format="webdataset",
            image_size=cfg.image_size,
            resize_mode="keep_ratio",
            processes_count=cfg.processes,
            thread_count=cfg.threads,
            number_sample_per_shard=cfg.samples_per_shard,
            save_additional_columns=None,
            incremental_mode="incremental",
            enable_wandb=False,
        )
    except SystemExit as e:
        # img2dataset's SIGINT handler exits with status 0: an interrupted download is no success
        raise KeyboardInterrupt("img2dataset was interrupted; rerun to fetch the unfinished shards") from e
    finally:
        signal.signal(signal.SIGINT, previous)  # img2dataset replaces the handler for the whole process
    record = {"url_list": cfg.url_list, "output": str(output), "domain": cfg.domain,
              "img2dataset": version("img2dataset"), "settings": settings, **summarize(output),
              "seconds": round(time.perf_counter() - t0, 1)}
    write_json(summary, record)
    log.info("%d shards: %d of %d samples downloaded, %d failed to download, %d failed to resize; record: %s",
             record["shards"], record["successes"], record["samples"], record["failed_to_download"],
             record["failed_to_resize"], summary)
    if record["unfinished"]:
        raise RuntimeError(f"{output}: img2dataset left {len(record['unfinished'])} shard(s) unfinished "
                           f"({', '.join(record['unfinished'][:5])}); rerun `gram img2dataset` to finish them")
    return record


def main(argv: list[str] | None = None) -> None:
    args = stage_parser("img2dataset", __doc__).parse_args(argv)
    _, prof = stage_setup(args)
    run(prof.data.paper.img2dataset)
