"""Tables over backbone draws: one grid, run on several backbones, read together (`gram draws`). [ours]

The emoji profile pretrains its own small CLIP. Two draws of the same recipe (another
`backbone.pretrain.seed`, or the same seed on a CPU that rounds differently) move the protocol tables
by more than the tuning seeds and the finite test classes do, so a claim about a method on this world
is a claim over draws. Each draw is one pipeline run, whose results directory (`results/<profile>/`,
holding `eval/` and `runs/`) this stage reads with the grid of `--params`; the runs of every draw
must exist, as `gram report` needs them (a missing record is an error naming its file).

Outputs under `--out`:

    draws.md    zero-shot on every domain per draw (× chance); base / new / H and few-shot per draw and
                their mean ± std over draws; every (method, reference) pair of `gram.tables.paired`, per
                draw and pooled: Δ averaged over draws with a bootstrap over classes and draws
                (`gram.tables.pooled_difference`)
    draws.json  the same numbers
    draws.png   the paired differences: each draw's Δ and interval, and the pooled one

When `grid.tpt` names datasets and methods, each DIR must also hold the test-time runs
(`tpt/<dataset>/<method>/s<seed>.json`, as `gram tpt` writes them), and the outputs gain a test-time
section: every row of `test_time.md` (the initial prompts untuned, then each method after tuning) per
draw and over draws, and, per draw and pooled, each method against the first words method of
`grid.tpt.words` (both tuned) and each method's own test-time step (after − before). The score there is
the mean over the domains of their class-balanced accuracies, as in `test_time.md`.

With three draws, resampling the draws gives a coarse interval: it widens when the draws disagree,
which is the point, but its 95 % is nominal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gram import tables as T
from gram.io import read_json, save_png, write_json, write_text
from gram.report import tpt_rows
from gram.stage import stage_parser, stage_setup


def parse_draws(specs: list[str]) -> list[tuple[str, Path]]:
    """`NAME=DIR` (or `DIR`, named by itself) -> [(name, dir)]; each DIR holds a run's eval/ and runs/."""
    out = []
    for spec in specs:
        name, sep, where = spec.partition("=")
        name, where = (name, where) if sep else (spec, spec)
        if not name or not where:
            raise ValueError(f"--draw {spec!r}: write NAME=DIR (DIR: a results directory with eval/ and runs/)")
        path = Path(where)
        for sub in ("eval", "runs"):
            if not (path / sub).is_dir():
                raise FileNotFoundError(f"--draw {spec!r}: {path / sub} is not a directory (DIR must be a "
                                        "pipeline run's results directory, e.g. results/emoji)")
        out.append((name, path))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"--draw: a name is given twice ({', '.join(names)})")
    if len(out) < 1:
        raise ValueError("--draw: name at least one results directory")
    return out


def _count(n: int) -> str:
    return f"{n} draw{'s' if n != 1 else ''}"


def _zero_shot_classes(runs: T.Runs, grid) -> list[np.ndarray]:
    """The first zero-shot method's per-class accuracies on every protocol of the first dataset."""
    ds, m = grid.datasets[0], runs.zs[0]
    out = []
    for protocol in ("few-shot", "base-to-new", "domain-generalisation"):
        try:
            rec = runs.zero_shot(m, protocol, ds)
        except FileNotFoundError:
            continue  # a protocol the profile has no targets for
        out += [T.per_class([rec], r["target"])[0] for r in rec["results"] if r["applicable"]]
    return out


def check_distinct(draws: dict[str, T.Runs], grid) -> None:
    """Refuse two draws whose zero-shot scores agree on every class of every target: the same backbone
    (or the same results directory) listed twice would narrow the pooled interval for nothing."""
    if not grid.datasets or not grid.methods:
        return
    seen: dict[str, list[np.ndarray]] = {}
    for name, runs in draws.items():
        mine = _zero_shot_classes(runs, grid)
        for other, theirs in seen.items():
            if mine and len(mine) == len(theirs) and all(np.array_equal(x, y, equal_nan=True)
                                                         for x, y in zip(mine, theirs)):
                raise ValueError(f"draws {other!r} and {name!r} have the same zero-shot scores on every class: "
                                 "one backbone listed twice?")
        seen[name] = mine


def zero_shot_rows(draws: dict[str, T.Runs], grid, prof) -> tuple[list[str], dict]:
    """Per draw, the first zero-shot method on the protocol domain and every generalisation target."""
    if not grid.methods or not grid.datasets:
        return [], {}
    ds, m, pc = grid.datasets[0], grid.methods[0], prof.protocols
    roles = T.domain_roles(prof)
    targets = [pc.domain] + list(pc.domain_generalisation)
    out: dict = {}
    rows = []
    for name, runs in draws.items():
        recs = {pc.domain: runs.zero_shot(m, "few-shot", ds)["results"][0]}
        if pc.domain_generalisation:
            recs |= {r["target"]: r for r in runs.zero_shot(m, "domain-generalisation", ds)["results"]}
        out[name] = {t: {"balanced_accuracy": recs[t].get(T.METRIC),
                         "chance": recs[t].get("chance_balanced_accuracy")} for t in targets}
        cells = []
        for t in targets:
            v, chance = out[name][t]["balanced_accuracy"], out[name][t]["chance"]
            cells.append("–" if v is None else f"{100 * v:.1f}" + (f" ({v / chance:.1f}×)" if chance else ""))
        rows.append([name] + cells)
    head = ["draw"] + [f"{t} ({roles[t]})" if roles.get(t) else t for t in targets]
    md = ["", f"## Zero-shot (`{m}`) per draw, {ds}", "",
          "Class-balanced accuracy in % and its multiple of chance, the protocol domain first.", "",
          *T._md_table(head, rows)]
    return md, out


def method_cells(runs: T.Runs, grid, ds: str, m: str) -> dict[str, T.Cell]:
    """base / new / H (base-to-new) and k-shot accuracies of one method in one draw, over its seeds."""
    recs = runs.records(m, "base-to-new", ds, grid.base_to_new_shots)
    cells = {part: T.Cell([r["summary"][T.METRIC][part] for r in recs]) for part in ("base", "new", "hm")}
    for k in grid.shots:
        cells[f"{k}-shot"] = T.Cell([T.target_value(r, "all") for r in runs.records(m, "few-shot", ds, k)])
    return cells


def method_tables(draws: dict[str, T.Runs], grid) -> tuple[list[str], dict]:
    first = next(iter(draws.values()))
    parts = ["base", "new", "hm"] + [f"{k}-shot" for k in grid.shots]
    head_parts = ["base", "new", "H"] + [f"{k}-shot" for k in grid.shots]
    md, out = [], {}
    for ds in grid.datasets:
        per = {name: {m: method_cells(runs, grid, ds, m) for m in first.zs + first.tuned}
               for name, runs in draws.items()}
        pooled_rows, rows = [], []
        for m in first.zs + first.tuned:
            over = {p: T.Cell([per[name][m][p].mean for name in draws]) for p in parts}
            out.setdefault(ds, {})[m] = {p: {"per_draw": [per[name][m][p].record() for name in draws],
                                             "over_draws": over[p].record()} for p in parts}
            pooled_rows.append([m] + [over[p].text() for p in parts])
            rows += [[name, m] + [per[name][m][p].text() for p in parts] for name in draws]
        md += ["", f"## {ds}: mean ± std over draws", "",
               f"Each draw's mean over seeds {', '.join(map(str, grid.seeds))}, then their mean ± std over the "
               f"{_count(len(draws))} (base-to-new at {grid.base_to_new_shots} shots per base class).", "",
               *T._md_table(["method"] + head_parts, pooled_rows),
               "", f"## {ds}: per draw (mean ± std over seeds)", "",
               *T._md_table(["draw", "method"] + head_parts, rows)]
    return md, out


def paired_tables(draws: dict[str, T.Runs], grid) -> tuple[list[str], dict]:
    """Every pair of `tables.reference_of`, on few-shot at each k and on base / new / H: each draw's Δ with its
    interval over classes, and the pooled Δ with its interval over classes and draws."""
    first = next(iter(draws.values()))
    pairs = [(m, T.reference_of(m, first)) for m in first.tuned]
    pairs = [(m, ref) for m, ref in pairs if ref is not None]
    md, out = [], {}
    for ds in grid.datasets:
        rows = []
        for m, ref in pairs:
            entry = out.setdefault(ds, {})[f"{m} vs {ref}"] = {}
            for label, protocol, k, targets, combine in (
                    [(f"{k}-shot", "few-shot", k, ["all"], None) for k in grid.shots]
                    + [(part, "base-to-new", grid.base_to_new_shots, targets, combine) for part, targets, combine in
                       (("base", ["base"], None), ("new", ["new"], None), ("hm", ["base", "new"], T._harmonic))]):
                a, b = [], []
                for runs in draws.values():
                    a.append([T.per_class(runs.records(m, protocol, ds, k), t) for t in targets])
                    b.append([T.per_class(runs.records(ref, protocol, ds, k), t) for t in targets])
                if any(x is None for d in a + b for x in d):
                    entry[label] = None
                    continue
                each = [T.paired_difference(da, db, combine) for da, db in zip(a, b)]
                pooled = T.pooled_difference(a, b, combine)
                entry[label] = {"per_draw": dict(zip(draws, each)), "pooled": pooled}
                rows.append([m, ref, "H" if label == "hm" else label] + [T._delta_text(d) for d in each]
                            + [T._delta_text(pooled)])
        md += ["", f"## {ds}: paired differences per draw and pooled", "",
               "Δ in points of class-balanced accuracy; per draw, its 95 % bootstrap interval over the test "
               "classes (as in paired.md); pooled, the mean of the draws' Δ and its interval over classes and "
               "draws; `*`: the interval leaves out 0.", "",
               *T._md_table(["method", "reference", "score"] + [f"{n}" for n in draws] + ["pooled"], rows)]
    return md, out


def read_tpt(paths: list[tuple[str, Path]], grid) -> dict:
    """{draw: {dataset: {method: {seed: record}}}} of every test-time run of grid.tpt; every record of every
    draw must score the same domains (the first record's)."""
    out: dict = {}
    domains = None
    for name, path in paths:
        for ds in grid.tpt.datasets:
            for m in grid.tpt.methods():
                for s in grid.seeds:
                    f = path / "tpt" / ds / m / f"s{s}.json"
                    if not f.is_file():
                        raise FileNotFoundError(f"{f}: missing (grid.tpt runs {m} on {ds} at seed {s}; run the "
                                                f"test-time stage for draw {name!r}, or empty grid.tpt)")
                    rec = read_json(f)
                    have = [d["domain"] for d in rec["domains"]]
                    if domains is None:
                        domains = have
                    elif have != domains:
                        raise ValueError(f"{f}: domains {have}, but the first test-time run scores {domains}: "
                                         "every draw must run tpt.domains alike")
                    out.setdefault(name, {}).setdefault(ds, {}).setdefault(m, {})[s] = rec
    return out


def _tpt_per_class(recs: dict, stage: str) -> list[np.ndarray]:
    """Per domain, the per-class accuracies [seeds, classes] of one method's runs at `stage` (before | after)."""
    seeds = list(recs)
    n = len(recs[seeds[0]]["domains"])
    return [np.asarray([[np.nan if v is None else v for v in recs[s]["domains"][j][stage]["per_class_accuracy"]]
                        for s in seeds], dtype=np.float64) for j in range(n)]


def _mean_of_parts(parts):
    return np.mean(parts, axis=0)


def tpt_tables(records: dict, grid, prof) -> tuple[list[str], dict]:
    """The test-time rows per draw and over draws, and the paired differences per draw and pooled."""
    names = list(records)
    roles = T.domain_roles(prof)
    ref = grid.tpt.words[0] if grid.tpt.words else None
    md, out = [], {}
    for ds in grid.tpt.datasets:
        first = records[names[0]][ds]
        domains = [d["domain"] for d in next(iter(first[grid.tpt.methods()[0]].values()))["domains"]]
        rows, entry = [], {"domains": domains, "rows": [], "paired": {}}
        for label, m, stage in tpt_rows(grid, first):
            per_seed = {n: [[d[stage]["balanced_accuracy"] for d in rec["domains"]]
                            for rec in records[n][ds][m].values()] for n in names}  # [seeds, domains]
            per_draw = [T.Cell([float(np.mean(v)) for v in per_seed[n]]) for n in names]
            per_domain = {d: T.Cell([float(np.mean([v[j] for v in per_seed[n]])) for n in names])
                          for j, d in enumerate(domains)}
            over = T.Cell([c.mean for c in per_draw])
            entry["rows"].append({"label": label, "method": m, "stage": stage,
                                  "per_draw": dict(zip(names, (c.record() for c in per_draw))),
                                  "per_domain": {d: c.record() for d, c in per_domain.items()},
                                  "over_draws": over.record()})
            rows.append([label] + [c.text() for c in per_draw] + [per_domain[d].text() for d in domains]
                        + [f"**{over.text()}**"])
        pairs = [(f"{m} − {ref}", (m, "after"), (ref, "after")) for m in grid.tpt.methods() if ref and m != ref]
        pairs += [(f"{m}: after − before", (m, "after"), (m, "before")) for m in grid.tpt.methods()]
        prows = []
        for label, (ma, sa), (mb, sb) in pairs:
            a = [_tpt_per_class(records[n][ds][ma], sa) for n in names]
            b = [_tpt_per_class(records[n][ds][mb], sb) for n in names]
            each = [T.paired_difference(da, db, _mean_of_parts) for da, db in zip(a, b)]
            pooled = T.pooled_difference(a, b, _mean_of_parts)
            entry["paired"][label] = {"per_draw": dict(zip(names, each)), "pooled": pooled}
            prows.append([label] + [T._delta_text(d) for d in each] + [T._delta_text(pooled)])
        out[ds] = entry
        head = [f"{d} ({roles[d]})" if roles.get(d) else d for d in domains]
        seen = [d for d in domains if roles.get(d) == "meta-train"]
        md += ["", f"## {ds}: test-time tuning per draw and over draws", "",
               f"Class-balanced accuracy in % on the {prof.tpt.split} split. Per draw: the mean over "
               f"{', '.join(domains)}, mean ± std over seeds {', '.join(map(str, grid.seeds))}; per domain and in "
               "the last column: the mean ± std over draws of each draw's mean.", ""]
        if seen:
            md += [f"Meta-training read the image-text pairs of {', '.join(f'`{d}`' for d in seen)}: for the GRAM "
                   "rows that domain is not unseen.", ""]
        md += [*T._md_table(["row"] + names + head + ["mean over draws"], rows),
               "", f"## {ds}: test-time paired differences per draw and pooled", "",
               f"Δ in points of the mean over {', '.join(domains)} of the class-balanced accuracies; per draw its 95 % "
               "bootstrap interval over the test classes (every domain's classes resampled), pooled the mean of the "
               "draws' Δ and its interval over classes and draws; `*`: the interval leaves out 0. "
               + (f"`M − {ref}`: both after test-time tuning; " if ref else "")
               + "`M: after − before`: the test-time step of M from its own initial prompt.", "",
               *T._md_table(["Δ"] + names + ["pooled"], prows)]
    return md, out


def plot(paired: dict, names: list[str], path: Path, test_time: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"{pair} ({ds})", {"H" if lab == "hm" else lab: d for lab, d in entry.items()})
              for ds, pairs in paired.items() for pair, entry in pairs.items()]
    panels += [(f"test-time ({ds})", entry["paired"]) for ds, entry in (test_time or {}).items()]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.5 * max(1, len(panels)), 3.6), squeeze=False)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no method with a reference in the grid", ha="center", va="center")
    width = 0.7 / (len(names) + 1)
    for ax, (title, entry) in zip(axes[0], panels):
        labels = [lab for lab, d in entry.items() if d is not None]
        x = np.arange(len(labels))
        for j, name in enumerate(names + ["pooled"]):
            ds_ = [entry[lab]["pooled"] if name == "pooled" else entry[lab]["per_draw"][name] for lab in labels]
            mid = np.array([100 * d["delta"] for d in ds_])
            err = np.array([[100 * (d["delta"] - d["lo"]) for d in ds_], [100 * (d["hi"] - d["delta"]) for d in ds_]])
            ax.errorbar(x - 0.35 + (j + 0.5) * width, mid, yerr=err, fmt="D" if name == "pooled" else "o",
                        color="k" if name == "pooled" else None, ms=4, capsize=2, label=name)
        ax.axhline(0, color="grey", lw=0.8)
        long = max(map(len, labels), default=0) > 8
        ax.set_xticks(x, labels, rotation=25 if long else 0, ha="right" if long else "center",
                      fontsize=7 if long else None)
        ax.set_ylabel("Δ balanced accuracy (points)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    if panels:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def run(grid, prof, specs: list[str], out: str | Path) -> dict:
    """Read every draw's records and write draws.md, draws.json and draws.png under `out`; returns the json."""
    out = Path(out)
    paths = parse_draws(specs)
    draws = {name: T.Runs(grid, path / "eval", path / "runs") for name, path in paths}
    if not grid.datasets or not (grid.tuned or grid.gram or grid.methods):
        raise ValueError("gram draws: the grid names no dataset or no method (grid.datasets, grid.tuned, "
                         "grid.methods): nothing to read")
    check_distinct(draws, grid)
    tpt = read_tpt(paths, grid) if grid.tpt.datasets and grid.tpt.methods() else None
    zs_md, zs = zero_shot_rows(draws, grid, prof)
    m_md, methods = method_tables(draws, grid)
    p_md, paired = paired_tables(draws, grid)
    t_md, test_time = tpt_tables(tpt, grid, prof) if tpt else ([], {})
    md = ["# Over backbone draws", "",
          f"{_count(len(draws))}: " + ", ".join(f"`{n}` ({p})" for n, p in paths)
          + f". Test split, domain `{prof.protocols.domain}`; class-balanced accuracy in %.", *zs_md, *m_md, *p_md, *t_md]
    summary = {"draws": list(draws), "zero_shot": zs, "methods": methods, "paired": paired}
    if tpt:
        summary["test_time"] = test_time
    write_text(out / "draws.md", "\n".join(md) + "\n")
    write_json(out / "draws.json", summary)
    plot(paired, list(draws), out / "draws.png", test_time)
    return summary


def main(argv: list[str] | None = None) -> None:
    p = stage_parser("draws", __doc__)
    p.add_argument("--draw", action="append", required=True, metavar="NAME=DIR",
                   help="one draw: a name and its results directory (eval/ and runs/), e.g. "
                        "seed1=draws/seed1/results/emoji; give it once per draw")
    p.add_argument("--out", required=True, help="directory of draws.md, draws.json and draws.png")
    args = p.parse_args(argv)
    params, prof = stage_setup(args)
    run(params.grid, prof, args.draw, args.out)
