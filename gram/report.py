"""Report stage: evaluation JSONs -> Markdown and CSV tables, a JSON summary and PNG plots. [ours]

Reads `<eval>/<method>/<dataset>/<domain>.json` for the methods of `grid.methods` and writes under
`--out`:
    zero_shot.md     per dataset, methods x domains: accuracy / class-balanced accuracy (%), with
                     chance and majority rows and each domain's role (pretrain, meta, held out)
    zero_shot.csv    the same, one row per (dataset, domain, method): for `dvc plots` and pandas
    zero_shot.json   mean balanced accuracy per (dataset, method) over the domains: `dvc metrics`
    zero_shot.png    balanced accuracy per domain, one panel per dataset
    backbone.png     the pretraining loss curve (a note for a hub backbone)

With `--runs`, also the protocol tables and few-shot curves of `gram.tables`. With `--chc` (the
cluster stage's output), also:
    clustering.md    the hierarchy (levels, sizes, complexity) and, where the corpus has ground truth
                     (emoji: Unicode subgroups and groups), dendrogram purity and NMI / ARI per level of
                     the main mode against its single-modality ablations
    clustering.csv   one row per (mode, truth, level)
    clustering.png   NMI against the number of clusters, one line per mode, one panel per truth
    meta_training.md/.png  (with --meta) GRAM meta-training: held-out query loss before/after, gate
    timings.csv      the wall times, kept out of every table so that a rerun gives byte-equal tables:
                     `stage,item,seconds` for the backbone's pretraining, the clustering modes, the
                     meta-training recipes and (with --runs) every zero-shot record and tuned run

`gram tpt-report --tpt DIR --out DIR` (`test_time`) renders the test-time runs of `grid.tpt`
(`<tpt>/<dataset>/<method>/s<seed>.json`):
    test_time.md     per dataset, class-balanced accuracy (%) per domain and their mean, mean ± std over
                     seeds: each initial prompt without test-time tuning, then every test-time method
    test_time.csv    one row per (dataset, row, seed, domain)
    test_time.png    the domain mean of every row, with the seeds' spread
    test_time_timings.csv  the wall times of test-time tuning, one row per (dataset, method, seed, domain):
                     seconds of tuning alone and ms per image (kept out of the tables: byte-equal reruns)
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from gram import tables
from gram.config import Params, ProfileParams
from gram.io import read_json, save_png, write_json, write_text
from gram.stage import stage_parser, stage_setup

log = logging.getLogger("gram.report")

CSV_FIELDS = ["dataset", "domain", "role", "method", "n", "n_classes", "accuracy", "balanced_accuracy"]
TIMINGS = "timings.csv"  # the report's wall times (see the module docstring)
TPT_TIMINGS = "test_time_timings.csv"  # the test-time report's wall times


def eval_domains(prof: ProfileParams, eval_dir: Path, method: str, datasets: list[str]) -> dict[str, list[str]]:
    """The domains of each dataset in the zero-shot table: `evaluate.domains`, or (empty: every domain of
    each dataset) those the evaluate stage wrote, the protocols' domain first and its shifts in their order."""
    if prof.evaluate.domains:
        return {ds: list(prof.evaluate.domains) for ds in datasets}
    order = [prof.protocols.domain, *prof.protocols.domain_generalisation]
    out = {}
    for ds in datasets:
        found = sorted(p.stem for p in (eval_dir / method / ds).glob("*.json"))
        if not found:
            raise FileNotFoundError(f"{eval_dir / method / ds}: no evaluation records (did the evaluate stage run?)")
        out[ds] = sorted(found, key=lambda d: (order.index(d) if d in order else len(order), d))
    return out


def collect(eval_dir: Path, methods: list[str], datasets: list[str], domains: dict[str, list[str]]) -> list[dict]:
    """All evaluation records, in table order; a missing file is an error naming it."""
    rows = []
    for ds in datasets:
        for dom in domains[ds]:
            for m in methods:
                rows.append(read_json(eval_dir / m / ds / f"{dom}.json"))
    return rows


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(rows: list[dict], profile: str, methods: list[str], datasets: list[str], domains_of: dict[str, list[str]],
             roles: dict[str, str], backbone: dict | None, emoji: bool = True) -> str:
    by = {(r["dataset"], r["domain"], r["method"]): r for r in rows}
    out = [f"# Zero-shot classification — profile `{profile}`"]
    split = rows[0]["split"] if rows else "test"
    out.append(f"\nSplit: **{split}**. Cells: accuracy / class-balanced accuracy (mean per-class recall), in %. "
               "`chance` is 1/classes; `majority` always predicts the most frequent class of the split.")
    if emoji:
        out.append("\nThe backbone pretrains on the emojis of the train splits only, with captions of each emoji's "
                   "own words (label, tags, keywords), never a class name as such: a class name's words reach it only "
                   "where an emoji's own words use them. Each column names its vendor's role.")
    if backbone and backbone.get("source") == "pretrain":
        on = f" on {len(backbone['emojis'])} emojis" if "emojis" in backbone else ""
        out.append(f"\nBackbone: small CLIP pretrained here{on}, {backbone['parameters'] / 1e6:.1f} M parameters, "
                   f"{backbone['steps']} steps, final loss "
                   f"{backbone['loss'][-1]:.3f}.")
    elif backbone:
        out.append(f"\nBackbone: `{backbone.get('model')}`.")
    for ds in datasets:
        domains = domains_of[ds]
        first = by[(ds, domains[0], methods[0])]
        ns = sorted({by[(ds, d, methods[0])]["n"] for d in domains})
        out += ["", f"## {ds} ({first['n_classes']} classes, "
                    f"{ns[0] if len(ns) == 1 else '/'.join(str(by[(ds, d, methods[0])]['n']) for d in domains)} "
                    "test images per domain)", ""]
        head = "| method | " + " | ".join(f"{d} ({roles.get(d, 'eval')})" for d in domains) + " |"
        out += [head, "|" + "---|" * (len(domains) + 1)]
        cells = [pct(by[(ds, d, methods[0])]["chance_balanced_accuracy"]) for d in domains]
        out.append("| chance | " + " | ".join(f"{c} / {c}" for c in cells) + " |")
        out.append("| majority | " + " | ".join(
            f"{pct(by[(ds, d, methods[0])]['majority_accuracy'])} / {pct(by[(ds, d, methods[0])]['chance_balanced_accuracy'])}"
            for d in domains) + " |")
        for m in methods:
            out.append(f"| {m} | " + " | ".join(
                f"{pct(by[(ds, d, m)]['accuracy'])} / {pct(by[(ds, d, m)]['balanced_accuracy'])}" for d in domains) + " |")
    return "\n".join(out) + "\n"


def to_csv(rows: list[dict], roles: dict[str, str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({"dataset": r["dataset"], "domain": r["domain"], "role": roles.get(r["domain"], "eval"),
                    "method": r["method"], "n": r["n"], "n_classes": r["n_classes"],
                    "accuracy": f"{r['accuracy']:.4f}", "balanced_accuracy": f"{r['balanced_accuracy']:.4f}"})
    return buf.getvalue()


def summary(rows: list[dict], methods: list[str], datasets: list[str]) -> dict:
    out: dict = {}
    for ds in datasets:
        for m in methods:
            sel = [r for r in rows if r["dataset"] == ds and r["method"] == m]
            out.setdefault(ds, {})[m] = {
                "balanced_accuracy": round(sum(r["balanced_accuracy"] for r in sel) / len(sel), 4),
                "accuracy": round(sum(r["accuracy"] for r in sel) / len(sel), 4)}
    return out


def plot_zero_shot(rows: list[dict], path: Path, methods: list[str], datasets: list[str],
                   domains_of: dict[str, list[str]], roles: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    by = {(r["dataset"], r["domain"], r["method"]): r for r in rows}
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.6), squeeze=False)
    width = 0.8 / len(methods)
    for ax, ds in zip(axes[0], datasets):
        domains = domains_of[ds]
        x = np.arange(len(domains))
        for i, m in enumerate(methods):
            ax.bar(x + i * width - 0.4 + width / 2, [100 * by[(ds, d, m)]["balanced_accuracy"] for d in domains],
                   width, label=m)
        chance = 100 * by[(ds, domains[0], methods[0])]["chance_balanced_accuracy"]
        ax.axhline(chance, color="k", ls="--", lw=1, label="chance")
        ax.set_xticks(x, [f"{d}\n({roles.get(d, 'eval')})" for d in domains], fontsize=8)
        ax.set_title(f"{ds} ({by[(ds, domains[0], methods[0])]['n_classes']} classes)")
        ax.set_ylabel("class-balanced accuracy (%)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def plot_loss(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    if record.get("loss"):
        ax.plot(range(1, len(record["loss"]) + 1), record["loss"], lw=1)
    else:  # a hub model: nothing was trained here, but the output exists for every profile
        ax.text(0.5, 0.5, f"no pretraining: {record.get('model', 'loaded backbone')}", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_title("backbone pretraining")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def _bold_best(cells: list[float], stds: list[float] | None = None) -> list[str]:
    """Cells with 3 decimals (± std when given), the largest mean in bold."""
    best = max(cells)
    out = [f"**{c:.3f}**" if c == best else f"{c:.3f}" for c in cells]
    return out if stds is None else [f"{c} ± {sd:.3f}" for c, sd in zip(out, stds)]


def _std_or_none(seeds: int, values: list[float]) -> list[float] | None:
    return values if seeds > 1 else None


def clustering(chc_dir: str | Path, out: str | Path, profile: str) -> None:
    """clustering.md/.csv/.png from the cluster stage's output (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chc_dir, out = Path(chc_dir), Path(out)
    rec = read_json(chc_dir / "cluster.json")
    quality = read_json(chc_dir / "quality.json") if (chc_dir / "quality.json").exists() else None
    with open(chc_dir / "clusters.csv", newline="") as f:
        clusters = list(csv.DictReader(f))
    main_mode = next(iter(rec["modes"]))
    sizes = rec["modes"][main_mode]["sizes"]
    md = [f"# Meta-training data structure — profile `{profile}`",
          f"\nCorpus: {rec['pairs']:,} image-text pairs clustered ({rec['dropped_by_filter']:,} dropped by the "
          f"low-similarity filter). Mode `{main_mode}`; levels (finest first): "
          + " / ".join(map(str, sizes)) + " clusters (level 0: k-means; coarser: Ward cuts over its centroids).",
          "\n## Structure complexity of the main mode\n",
          "| level | clusters | mean size | complexity mean | most complex cluster (size) |", "|---|---|---|---|---|"]
    for lev, n in enumerate(sizes):
        rows = [r for r in clusters if int(r["level"]) == lev]
        top = max(rows, key=lambda r: float(r["complexity"]))
        label = next((top[k] for k in top if k.endswith("_majority")), "")
        md.append(f"| {lev} | {n} | {sum(int(r['size']) for r in rows) / n:.1f} | "
                  f"{sum(float(r['complexity']) for r in rows) / n:.2f} | {top['cluster']}"
                  f"{f' ({label})' if label else ''}, {top['size']} pairs |")
    fields = ["mode", "truth", "level", "clusters", "nmi", "nmi_std", "ari", "ari_std", "dendrogram_purity",
              "dendrogram_purity_std"]
    table = io.StringIO()
    w = csv.writer(table, lineterminator="\n")
    w.writerow(fields)
    fig, axes = plt.subplots(1, max(1, len(quality["truth"]) if quality else 1), figsize=(9, 3.4), squeeze=False)
    if quality is None:
        md.append("\n## Quality\n\nNo ground truth (`cluster.truth` is empty): clustering quality is not measured.")
        axes[0][0].text(0.5, 0.5, "no ground truth: quality not measured", ha="center", va="center",
                        transform=axes[0][0].transAxes)
    else:
        modes, truths = list(quality["modes"]), list(quality["truth"])
        md.append("\n## Quality against the ground truth\n")
        seeds = quality["modes"][modes[0]].get("seeds", 1)
        spread = f"mean ± sample std over {seeds} k-means seeds" if seeds > 1 else "one k-means seed"
        md.append("Dendrogram purity (the mean, over pairs of points of the same class, of the class's share of "
                  f"the smallest subtree holding both; 1 = perfect) and NMI and ARI of every level, {spread}. "
                  "Best mean per column in bold. Ground truth: "
                  + ", ".join(f"{t} ({n} classes)" for t, n in quality["truth"].items()) + ".\n")
        md += ["| mode | " + " | ".join(f"purity {t}" for t in truths) + " |", "|---" * (1 + len(truths)) + "|"]
        pur = {t: _bold_best([quality["modes"][m]["purity"][t] for m in modes],
                             _std_or_none(seeds, [quality["modes"][m]["purity_std"][t] for m in modes]))
               for t in truths}
        md += [f"| {m} | " + " | ".join(pur[t][i] for t in truths) + " |" for i, m in enumerate(modes)]
        for t in truths:
            levels = quality["modes"][modes[0]]["levels"]
            for metric in ("nmi", "ari"):
                md += [f"\n{metric.upper()} against {t}:\n",
                       "| mode | " + " | ".join(f"{lev['clusters']} clusters" for lev in levels) + " |",
                       "|---" * (1 + len(levels)) + "|"]
                cols = [_bold_best([quality["modes"][m]["levels"][i][t][metric] for m in modes],
                                   _std_or_none(seeds, [quality["modes"][m]["levels"][i][t][f"{metric}_std"]
                                                        for m in modes]))
                        for i in range(len(levels))]
                md += [f"| {m} | " + " | ".join(cols[i][j] for i in range(len(levels))) + " |"
                       for j, m in enumerate(modes)]
        for ax, t in zip(axes[0], truths):
            for m in modes:
                levels = quality["modes"][m]["levels"]
                ax.plot([lev["clusters"] for lev in levels], [lev[t]["nmi"] for lev in levels], marker="o",
                        label=f"{m} (purity {quality['modes'][m]['purity'][t]:.2f})")
                for i, lev in enumerate(levels):
                    q = lev[t]
                    w.writerow([m, t, i, lev["clusters"], round(q["nmi"], 6), round(q["nmi_std"], 6),
                                round(q["ari"], 6), round(q["ari_std"], 6), round(quality["modes"][m]["purity"][t], 6),
                                round(quality["modes"][m]["purity_std"][t], 6)])
            ax.axvline(quality["truth"][t], color="k", ls=":", lw=1)
            ax.set_xscale("log")
            ax.set_xlabel("clusters (dotted: classes of the truth)")
            ax.set_ylabel(f"NMI vs {t}")
            ax.set_title(f"{t} ({quality['truth'][t]} classes)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    write_text(out / "clustering.md", "\n".join(md) + "\n")
    write_text(out / "clustering.csv", table.getvalue())
    save_png(fig, out / "clustering.png")
    plt.close(fig)


def meta_training(meta_dir: str | Path, recipes: list[str], out: str | Path, profile: str) -> None:
    """meta_training.md/.png from the meta stage's outputs `<meta_dir>/<recipe>/meta.json`."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    md = [f"# GRAM meta-training ({profile})", "",
          "Validation query loss (the task loss, mean over the same validation tasks before and after "
          "meta-training: tasks over held-out clusters where the tasks stage held some out, else a fixed sample of "
          "the training tasks): at θ unadapted, and at θ' after the regulated inner step(s). Dev: the accuracy of "
          "θ's prompts of the `select` dataset's class names in the meta-training domain (val split) at the "
          "initialisation and at the step selected (0: the initialisation was best). Gate: the mean mix gate c at "
          "the end (1 = raw gradient). With several meta-training seeds, run 0's figures. Written by `gram report` "
          "from `models/<profile>/meta/<recipe>/meta.json` (which also has every run and the wall times).", "",
          "| recipe | prompt | tasks | steps | query loss before → after | adapted before → after | dev accuracy "
          "init → selected (step) | gate |",
          "|---|---|---|---:|---|---|---|---:|"]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for r in recipes:
        info = read_json(Path(meta_dir) / r / "meta.json")
        v, hist = info["validation"], info["history"]
        gate, sel = hist[-1]["gate"], info.get("select")
        dev = (f"{100 * sel['initial']['accuracy']:.1f} → {100 * sel['best']['accuracy']:.1f} ({sel['best']['step']})"
               if sel else "–")
        kind = info["tasks"].get("kind", "pairs")
        md.append(f"| {r} | {info['kind']} | {info['tasks']['file'].removesuffix('.safetensors')} ({kind}) | "
                  f"{info['steps']} | {v['before']['query_loss']:.3f} → {v['after']['query_loss']:.3f} | "
                  f"{v['before']['query_loss_adapted']:.3f} → {v['after']['query_loss_adapted']:.3f} | {dev} | "
                  f"{'–' if gate is None else f'{gate:.2f}'} |")
        y = np.array([h["query_loss"] for h in hist])
        w = max(1, len(y) // 25)
        ax.plot(np.arange(w, len(y) + 1), np.convolve(y, np.ones(w) / w, mode="valid"), label=r)
    ax.set_xlabel("outer step")
    ax.set_ylabel("query loss at θ' (running mean)")
    ax.set_title(f"GRAM meta-training ({profile})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_text(out / "meta_training.md", "\n".join(md) + "\n")
    save_png(fig, out / "meta_training.png")
    plt.close(fig)


def timings_csv(rows: list[tuple[str, str, float | None]]) -> str:
    """`stage,item,seconds` rows (the wall times the tables leave out)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["stage", "item", "seconds"])
    w.writerows([stage, item, "" if sec is None else sec] for stage, item, sec in rows)
    return buf.getvalue()


def run(params: Params, profile: str, eval_dir: str | Path, backbone_dir: str | Path | None, out: str | Path,
        runs_dir: str | Path | None = None, chc_dir: str | Path | None = None,
        meta_dir: str | Path | None = None) -> str:
    prof = params.active(profile)
    eval_dir, out = Path(eval_dir), Path(out)
    methods, datasets = list(params.grid.methods), list(prof.evaluate.datasets)
    if not (methods and datasets):
        raise ValueError(f"profile {profile}: nothing to report (grid.methods and evaluate.datasets must both be "
                         "non-empty)")
    domains = eval_domains(prof, eval_dir, methods[0], datasets)
    roles = tables.domain_roles(prof)
    rows = collect(eval_dir, methods, datasets, domains)
    backbone = None
    if backbone_dir is not None and (Path(backbone_dir) / "pretrain.json").exists():
        backbone = read_json(Path(backbone_dir) / "pretrain.json")
    md = markdown(rows, profile, methods, datasets, domains, roles, backbone, emoji=prof.data.source == "npm")
    write_text(out / "zero_shot.md", md)
    write_text(out / "zero_shot.csv", to_csv(rows, roles))
    write_json(out / "zero_shot.json", summary(rows, methods, datasets))
    plot_zero_shot(rows, out / "zero_shot.png", methods, datasets, domains, roles)
    plot_loss(backbone or {}, out / "backbone.png")
    times = [("backbone", "pretrain", backbone.get("seconds"))] if backbone and backbone.get("source") == "pretrain" \
        else []
    if runs_dir is not None:
        tables.run(params.grid, prof, eval_dir, runs_dir, out)
        times += tables.run_times(params.grid, prof, eval_dir, runs_dir)
    if chc_dir is not None:
        clustering(chc_dir, out, profile)
        rec = read_json(Path(chc_dir) / "cluster.json")
        times += [("cluster", mode, m.get("seconds")) for mode, m in rec["modes"].items()]
        times.append(("cluster", "total", rec.get("seconds")))
    if meta_dir is not None:
        meta_training(meta_dir, list(params.grid.meta), out, profile)
        for r in params.grid.meta:
            info = read_json(Path(meta_dir) / r / "meta.json")
            times += [("meta", f"{r}/train", info.get("train_time_s")), ("meta", f"{r}/total", info.get("time_s"))]
    write_text(out / TIMINGS, timings_csv(times))
    return md


def tpt_rows(grid, records: dict) -> list[tuple[str, str, str]]:
    """(label, method, "before" | "after") rows of the test-time table: each distinct initial prompt
    untuned (from the first method that starts from it), then every method after tuning."""
    t = grid.tpt
    source = {m: "words" for m in t.words}
    source.update({e.method: f"few-shot {e.prompt} (k={grid.transfer.shots})" for e in t.tuned})
    rows, seen = [], set()
    for m in t.methods():
        rec = next(iter(records[m].values()))
        init = rec["init"]["init"]
        label = {"words": "zero-shot (words)", "meta": f"GRAM init ({(rec.get('meta') or {}).get('recipe')})"}.get(
            init, source.get(m, init))
        if label not in seen:
            seen.add(label)
            rows.append((f"{label}, no test-time tuning", m, "before"))
    for m in t.methods():
        rows.append((m, m, "after"))
    return rows


def _sample_std(values) -> float:
    """The sample standard deviation (ddof=1, as the protocol tables report over seeds); 0 for one value."""
    import numpy as np

    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def test_time(params: Params, profile: str, tpt_dir: str | Path, out: str | Path) -> str:
    """test_time.md/.csv/.png from the test-time runs of grid.tpt (see the module docstring)."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g, prof, tpt_dir, out = params.grid, params.active(profile), Path(tpt_dir), Path(out)
    methods = g.tpt.methods()
    if not (g.tpt.datasets and methods):
        raise ValueError("grid.tpt has no datasets or no methods: no test-time table to write")
    wanted, seeds = list(prof.tpt.domains), list(g.seeds)  # empty: every domain of each dataset, as tpt ran it
    roles = tables.domain_roles(prof)
    md = [f"# Test-time prompt tuning ({profile})", "",
          f"Class-balanced accuracy (%) on the {prof.tpt.split} split, mean ± std over seeds {seeds} (the seed "
          f"draws the {prof.tpt.views} views of each image and picks the few-shot prompt's run). Each image is tuned "
          f"alone: {prof.tpt.steps} AdamW step(s) at lr {prof.tpt.lr:g} on the entropy of the "
          f"{prof.tpt.keep:g} most confident views, then the prompt is reset. Rows \"…, no test-time tuning\" score "
          f"the same initial prompt on the images themselves. The wall times of the tuning are in {TPT_TIMINGS}.",
          ""]
    table = io.StringIO()
    w = csv.writer(table, lineterminator="\n")
    w.writerow(["dataset", "row", "method", "stage", "seed", "domain", "n", "accuracy", "balanced_accuracy"])
    timing = io.StringIO()  # ms per image: the tuning alone (views and their features, made once per seed and
    tw = csv.writer(timing, lineterminator="\n")  # shared by the methods, are not counted)
    tw.writerow(["dataset", "method", "seed", "domain", "n", "tune_s", "tune_ms_per_image"])
    fig, axes = plt.subplots(1, len(g.tpt.datasets), figsize=(7.5 * len(g.tpt.datasets), 0.5 + 0.42 * 12),
                             squeeze=False)
    for k, ds in enumerate(g.tpt.datasets):
        records = {m: {s: read_json(tpt_dir / ds / m / f"s{s}.json") for s in seeds} for m in methods}
        domains = wanted or [d["domain"] for d in records[methods[0]][seeds[0]]["domains"]]
        for m in methods:
            for s, rec in records[m].items():
                have = [d["domain"] for d in rec["domains"]]
                if have != domains:
                    raise ValueError(f"{tpt_dir / ds / m / f's{s}.json'}: domains {have}, but tpt.domains is "
                                     f"{wanted or 'every domain of ' + ds} ({domains} in the other runs); rerun it")
        head = [f"{d} ({roles.get(d, '')})" if roles.get(d) else d for d in domains]
        md += [f"## {ds}", ""]
        seen = [d for d in domains if roles.get(d) == "meta-train"]
        if seen:
            md += [f"Meta-training read the image-text pairs of {', '.join(f'`{d}`' for d in seen)} (no class labels): "
                   "for the GRAM rows that domain is not unseen.", ""]
        md += ["| | " + " | ".join(head) + " | mean |", "|---|" + "---:|" * (len(domains) + 1)]
        labels, means, stds = [], [], []
        for label, m, stage in tpt_rows(g, records):
            per = np.array([[d[stage]["balanced_accuracy"] for d in records[m][s]["domains"]] for s in seeds])  # [S, D]
            avg = per.mean(1)  # [S]
            cells = [f"{100 * per[:, j].mean():.1f} ± {100 * _sample_std(per[:, j]):.1f}" for j in range(len(domains))]
            md.append(f"| {label} | " + " | ".join(cells) + f" | **{100 * avg.mean():.1f}** ± "
                      f"{100 * _sample_std(avg):.1f} |")
            labels.append(label)
            means.append(100 * avg.mean())
            stds.append(100 * _sample_std(avg))
            for s in seeds:
                for d in records[m][s]["domains"]:
                    w.writerow([ds, label, m, stage, s, d["domain"], d["n"], round(d[stage]["accuracy"], 5),
                                round(d[stage]["balanced_accuracy"], 5)])
                    if stage == "after":
                        tw.writerow([ds, m, s, d["domain"], d["n"], d["time"]["tune_s"],
                                     round(1000 * d["time"]["tune_s"] / d["n"], 3)])
        md.append("")
        ax = axes[0][k]
        y = np.arange(len(labels))[::-1]
        ax.barh(y, means, xerr=stds, color=["#999999" if "no test-time" in lb else "#3b75af" for lb in labels])
        ax.set_yticks(y, labels, fontsize=8)
        ax.set_xlim(min(means) - 3, max(means) + 3)
        ax.set_xlabel(f"balanced accuracy (%), mean over {', '.join(domains)}")
        ax.set_title(f"test-time tuning: {ds} ({profile})")
    fig.tight_layout()
    text = "\n".join(md) + "\n"
    write_text(out / "test_time.md", text)
    write_text(out / "test_time.csv", table.getvalue())
    write_text(out / TPT_TIMINGS, timing.getvalue())
    save_png(fig, out / "test_time.png")
    plt.close(fig)
    return text


def main_tpt(argv: list[str] | None = None) -> None:
    p = stage_parser("tpt-report", test_time.__doc__)
    p.add_argument("--tpt", required=True, help="test-time runs directory, e.g. results/emoji/tpt")
    p.add_argument("--out", required=True, help="directory of the table, e.g. results/emoji")
    args = p.parse_args(argv)
    params, _ = stage_setup(args)
    test_time(params, args.profile or params.profile, args.tpt, args.out)


def main(argv: list[str] | None = None) -> None:
    p = stage_parser("report", __doc__)
    p.add_argument("--eval", required=True, help="evaluation directory, e.g. results/emoji/eval")
    p.add_argument("--backbone", default=None, help="backbone directory (for its pretraining record)")
    p.add_argument("--runs", default=None, help="tuned runs directory, e.g. results/emoji/runs: also write the "
                                                "protocol tables (gram.tables)")
    p.add_argument("--chc", default=None, help="cluster stage output, e.g. data/emoji/chc: also write the "
                                               "clustering tables")
    p.add_argument("--meta", default=None, help="meta stage outputs, e.g. models/emoji/meta: also write the "
                                                "meta-training table of grid.meta's recipes")
    p.add_argument("--out", required=True, help="directory of the tables, e.g. results/emoji")
    args = p.parse_args(argv)
    params, _ = stage_setup(args)
    run(params, args.profile or params.profile, args.eval, args.backbone, args.out, args.runs, args.chc, args.meta)
