"""Protocol tables and few-shot curves from the per-run JSONs (part of the report stage). [ours]

Inputs: the tuned runs `<runs>/<protocol>/<dataset>/<method>/k<shots>-s<seed>.json` (`gram tune`)
and the zero-shot records `<eval>/<method>/protocols/<protocol>/<dataset>.json` (`gram evaluate`).
Every cell is the mean ± sample standard deviation over the seeds of `grid.seeds` of the
class-balanced accuracy (mean per-class recall, %); zero-shot methods have one deterministic run.
Outputs under `--out`:

    few_shot.md / .csv / .png        methods x shots per dataset; the curves (accuracy vs shots)
    base_to_new.md / .csv            base, new and harmonic mean per dataset
    cross_dataset.md / .csv          source dataset and every target dataset, and their average
    domain_generalisation.md / .csv  source domain and every target domain, and their average
    paired.md                        each tuned method minus its reference (a GRAM method: its base recipe;
                                     others: zero-shot), few-shot and base-to-new, with a 95 % paired
                                     bootstrap interval over the test classes (`paired_difference`)
    protocols.json                   every cell (mean, std, n) for `dvc metrics`; the paired differences
                                     under "paired"
    runs.csv                         one row per (run, target): accuracy and balanced accuracy (the runs' wall
                                     times go to the report's timings.csv, `run_times`)

A missing run JSON is an error that names it.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from gram.io import read_json, save_png, write_json, write_text

METRIC = "balanced_accuracy"


def run_path(runs: Path, protocol: str, dataset: str, method: str, shots: int, seed: int) -> Path:
    return runs / protocol / dataset / method / f"k{shots}-s{seed}.json"


def zero_shot_path(eval_dir: Path, method: str, protocol: str, dataset: str) -> Path:
    return eval_dir / method / "protocols" / protocol / f"{dataset}.json"


class Cell:
    """Values of one table cell over seeds."""

    def __init__(self, values: list[float | None]):
        self.values = [v for v in values if v is not None]

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.values)) if self.values else None

    @property
    def std(self) -> float | None:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else (0.0 if self.values else None)

    def text(self) -> str:
        if self.mean is None:
            return "–"
        return f"{100 * self.mean:.1f}" + (f" ± {100 * self.std:.1f}" if len(self.values) > 1 else "")

    def record(self) -> dict:
        return {"mean": self.mean, "std": self.std, "n": len(self.values)}


class Runs:
    """The records of every zero-shot method and tuned run the grid asks for."""

    def __init__(self, grid, eval_dir: Path, runs_dir: Path):
        self.grid, self.eval_dir, self.runs_dir = grid, Path(eval_dir), Path(runs_dir)
        self.zs = list(grid.methods)
        self.tuned = list(grid.tuned) + [e.method for e in grid.gram]
        self._cache: dict[Path, dict] = {}

    def _read(self, path: Path) -> dict:
        """A record, read once: the tables and the paired differences read the same records again."""
        if path not in self._cache:
            self._cache[path] = read_json(path)
        return self._cache[path]

    def zero_shot(self, method: str, protocol: str, dataset: str) -> dict:
        return self._read(zero_shot_path(self.eval_dir, method, protocol, dataset))

    def tuned_runs(self, method: str, protocol: str, dataset: str, shots: int) -> list[dict]:
        return [self._read(run_path(self.runs_dir, protocol, dataset, method, shots, s)) for s in self.grid.seeds]

    def records(self, method: str, protocol: str, dataset: str, shots: int) -> list[dict]:
        if method in self.zs:
            return [self.zero_shot(method, protocol, dataset)]
        return self.tuned_runs(method, protocol, dataset, shots)


def target_value(rec: dict, target: str, metric: str = METRIC) -> float | None:
    for r in rec["results"]:
        if r["target"] == target:
            return r.get(metric) if r["applicable"] else None
    raise KeyError(f"run {rec['protocol']}/{rec['dataset']}/{rec['method']} k={rec['shots']} has no target {target!r}")


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def _csv(head: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    w.writerows(rows)
    return buf.getvalue()


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def preamble(title: str, runs: Runs, what: str, domain: str | None) -> list[str]:
    seeds = ", ".join(map(str, runs.grid.seeds))
    return [f"# {title}", "",
            f"{what} Cells: class-balanced accuracy (mean per-class recall, %) on the test split"
            + (f" in domain `{domain}`" if domain else "")
            + f", mean ± std over seeds {seeds} (zero-shot methods: one deterministic run). "
              "`–`: the method cannot score these classes (a linear probe has no weights for unseen classes)."]


# ------------------------------------------------------------------------------------------------
# the four tables
# ------------------------------------------------------------------------------------------------
def few_shot(runs: Runs, domain: str | None) -> tuple[str, str, dict]:
    g = runs.grid
    md = preamble("Few-shot classification", runs, "Prompts tuned on k shots per class, all classes.", domain)
    head = ["method"] + [f"{k} shot{'s' if k > 1 else ''}" for k in g.shots]
    csv_rows, metrics = [], {}
    for ds in g.datasets:
        n = runs.zero_shot(runs.zs[0], "few-shot", ds)["results"][0] if runs.zs else None
        md += ["", f"## {ds}" + (f" ({n['n_classes']} classes, {n['n']} test images)" if n else ""), ""]
        rows = []
        for m in runs.zs + runs.tuned:
            cells = []
            for k in g.shots:
                cells.append(Cell([target_value(r, "all") for r in runs.records(m, "few-shot", ds, k)]))
                metrics.setdefault(ds, {}).setdefault(m, {})[str(k)] = cells[-1].record()
            if m in runs.zs:  # the same zero-shot number under every k: shown once
                cells = [cells[0]] + [Cell([]) for _ in cells[1:]]
            rows.append([m] + [c.text() if c.values else ("" if m in runs.zs else "–") for c in cells])
            csv_rows += [[ds, m, k, _num(c.mean), _num(c.std), len(c.values)] for k, c in zip(g.shots, cells)
                         if c.values]
        md += _md_table(head, rows)
    md += ["", "Zero-shot methods are shown in the first column only (they use no shots); "
               "few_shot.png draws them as horizontal lines."]
    return "\n".join(md) + "\n", _csv(["dataset", "method", "shots", "mean", "std", "n"], csv_rows), metrics


def base_to_new(runs: Runs, domain: str | None) -> tuple[str, str, dict]:
    g = runs.grid
    md = preamble("Base-to-new generalisation", runs, f"Prompts tuned on {g.base_to_new_shots} shots per base "
                  "class; base classes scored among base classes, new classes among new ones; H is their "
                  "harmonic mean (per seed, then averaged).", domain)
    csv_rows, metrics = [], {}
    for ds in g.datasets:
        md += ["", f"## {ds}", ""]
        rows = []
        for m in runs.zs + runs.tuned:
            recs = runs.records(m, "base-to-new", ds, g.base_to_new_shots)
            cells = [Cell([r["summary"][METRIC][part] for r in recs]) for part in ("base", "new", "hm")]
            rows.append([m] + [c.text() for c in cells])
            metrics.setdefault(ds, {})[m] = {p: c.record() for p, c in zip(("base", "new", "hm"), cells)}
            csv_rows.append([ds, m] + [v for c in cells for v in (_num(c.mean), _num(c.std))] + [len(recs)])
        md += _md_table(["method", "base", "new", "H"], rows)
    head = ["dataset", "method", "base", "base_std", "new", "new_std", "hm", "hm_std", "n"]
    return "\n".join(md) + "\n", _csv(head, csv_rows), metrics


# ------------------------------------------------------------------------------------------------
# paired differences with a bootstrap interval over classes
# ------------------------------------------------------------------------------------------------
BOOTSTRAP = 2000  # resamples of the paired bootstrap
BOOTSTRAP_SEED = 0  # fixed: the tables are byte-reproducible


def reference_of(method: str, runs: Runs) -> str | None:
    """The method a row is compared with: a GRAM method (`<base>+gram…`) with its base recipe when the grid
    tunes it, any other tuned method with the first zero-shot method; None for zero-shot methods."""
    if method in runs.zs:
        return None
    base = method.split("+gram", 1)[0]
    if base != method and base in runs.tuned:
        return base
    return runs.zs[0] if runs.zs else None


def per_class(recs: list[dict], target: str) -> np.ndarray | None:
    """[runs, classes] per-class accuracies of `target` (NaN: a class absent from the split); None when a
    run cannot score the target."""
    rows = []
    for rec in recs:
        r = next(x for x in rec["results"] if x["target"] == target)
        if not r["applicable"]:
            return None
        rows.append([np.nan if v is None else v for v in r["per_class_accuracy"]])
    return np.asarray(rows, dtype=np.float64)


def paired_difference(a: list[np.ndarray], b: list[np.ndarray], combine=None, resamples: int = BOOTSTRAP,
                      seed: int = BOOTSTRAP_SEED) -> dict:
    """Δ = mean over a's runs of combine(class-balanced accuracy of each part) minus the same for b, and its
    95 % paired bootstrap interval over classes.

    Args:
        a, b: per part (e.g. [all] or [base, new]) the per-class accuracies [runs, classes] of the two
            methods; b may hold one run (a zero-shot method) or as many as a. Classes absent from the
            split (NaN in a) are left out.
        combine: maps the per-part accuracies (each [..., runs]) to the score; default the first part
            (for base-to-new: the harmonic mean of base and new).
    Each resample draws the classes of every part with replacement, the same draw for both methods and
    every run (paired: the class-to-class spread the two share cancels)."""
    out = pooled_difference([a], [b], combine, resamples, seed)
    del out["per_draw"], out["draws"]
    return out


def pooled_difference(a: list[list[np.ndarray]], b: list[list[np.ndarray]], combine=None,
                      resamples: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> dict:
    """`paired_difference` over several draws of the backbone (gram.draws): Δ is the mean over draws of each
    draw's Δ, and the bootstrap resamples the classes (one draw of them for every backbone draw: they are
    the same test classes) and, with more than one draw, the draws as well, with replacement.

    Args:
        a, b: per draw, the `paired_difference` arguments of that draw (the same parts and classes in each).
    Returns `paired_difference`'s dict with `per_draw` (each draw's own Δ, on the classes kept) and `draws`. With one
    draw the draws are not resampled and the result is `paired_difference`'s to the bit."""
    combine = combine or (lambda parts: parts[0])
    shapes = {tuple(pa.shape[1] for pa in d) for d in a + b}
    if len(shapes) != 1 or any(len(d) != len(a[0]) for d in a + b):
        raise ValueError(f"paired difference: the draws' parts differ in their classes ({sorted(shapes)})")
    keep = [np.all([~np.isnan(d[i]).any(0) for d in a], axis=0) for i in range(len(a[0]))]
    a = [[pa[:, k] for pa, k in zip(d, keep)] for d in a]
    b = [[pb[:, k] for pb, k in zip(d, keep)] for d in b]
    n = [int(k.sum()) for k in keep]

    def score(parts, idx):  # idx per part: [R, C] class draws -> [R] mean over runs of the combined score
        return combine([p[:, i].mean(-1) for p, i in zip(parts, idx)]).mean(-2)  # p[:, i]: [runs, R, C]

    full = [np.arange(c)[None] for c in n]
    per_draw = np.array([float((score(da, full) - score(db, full))[0]) for da, db in zip(a, b)])
    rng = np.random.default_rng(seed)
    classes = [rng.integers(0, c, size=(resamples, c)) for c in n]
    boot = np.stack([score(da, classes) - score(db, classes) for da, db in zip(a, b)], axis=1)  # [R, draws]
    if len(a) > 1:
        boot = np.take_along_axis(boot, rng.integers(0, len(a), size=(resamples, len(a))), axis=1)
    lo, hi = np.percentile(boot.mean(1), [2.5, 97.5])
    return {"delta": float(per_draw.mean()), "lo": float(lo), "hi": float(hi), "classes": n,
            "resamples": resamples, "per_draw": per_draw.tolist(), "draws": len(a)}


def _harmonic(parts):
    base, new = parts
    total = base + new
    return np.where(total > 0, 2 * base * new / np.where(total > 0, total, 1.0), 0.0)


def _delta_text(d: dict | None) -> str:
    if d is None:
        return "–"
    mark = "" if d["lo"] <= 0 <= d["hi"] else " *"
    return f"{100 * d['delta']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]{mark}"


def paired(runs: Runs) -> tuple[list[str], dict]:
    """Markdown sections and the protocols.json entry of every (method, reference) pair of
    `reference_of`: few-shot at every k, base-to-new on base, new and H."""
    g = runs.grid
    pairs = [(m, reference_of(m, runs)) for m in runs.tuned]
    pairs = [(m, ref) for m, ref in pairs if ref is not None]
    out: dict = {"few-shot": {}, "base-to-new": {}}
    if not pairs:
        return [], out
    md = ["# Paired differences", "",
          "Each tuned method against its reference (a GRAM method against its base recipe, any other against "
          f"zero-shot): Δ in points of class-balanced accuracy (mean over seeds) and its 95 % paired bootstrap "
          f"interval over the test classes ({BOOTSTRAP} resamples, the same classes drawn for both methods and "
          "every seed); `*`: the interval leaves out 0. It shows how much the finite set of test classes "
          "alone moves a difference, which a std over seeds does not."]
    for ds in g.datasets:
        rows = []
        for m, ref in pairs:
            cells = []
            for k in g.shots:
                a = per_class(runs.records(m, "few-shot", ds, k), "all")
                b = per_class(runs.records(ref, "few-shot", ds, k), "all")
                d = None if a is None or b is None else paired_difference([a], [b])
                out["few-shot"].setdefault(ds, {}).setdefault(f"{m} vs {ref}", {})[str(k)] = d
                cells.append(_delta_text(d))
            rows.append([m, ref] + cells)
        md += ["", f"## few-shot, {ds}", "", *_md_table(["method", "reference"] + [f"{k}-shot Δ" for k in g.shots],
                                                       rows)]
        rows = []
        for m, ref in pairs:
            recs = {x: runs.records(x, "base-to-new", ds, g.base_to_new_shots) for x in (m, ref)}
            parts = {x: [per_class(recs[x], t) for t in ("base", "new")] for x in (m, ref)}
            ds_out = out["base-to-new"].setdefault(ds, {})[f"{m} vs {ref}"] = {}
            cells = []
            for name, idx, combine in (("base", [0], None), ("new", [1], None), ("hm", [0, 1], _harmonic)):
                a, b = [parts[m][i] for i in idx], [parts[ref][i] for i in idx]
                d = None if any(x is None for x in a + b) else paired_difference(a, b, combine)
                ds_out[name] = d
                cells.append(_delta_text(d))
            rows.append([m, ref] + cells)
        md += ["", f"## base-to-new, {ds}", "", *_md_table(["method", "reference", "base Δ", "new Δ", "H Δ"], rows)]
    return md, out


def domain_roles(prof) -> dict[str, str]:
    """domain -> its role in training (`data.vendors`: "pretrain", "meta-train", "held out"); the first wins."""
    roles: dict[str, str] = {}
    for role, name in (("pretrain", "pretrain"), ("meta", "meta-train"), ("heldout", "held out")):
        for v in getattr(prof.data.vendors, role):
            roles.setdefault(v, name)
    return roles


def transfer(runs: Runs, protocol: str, targets: list[str], domain: str | None,
             roles: dict[str, str] | None = None) -> tuple[str, str, dict]:
    """Cross-dataset or domain-generalisation: the source column comes from the few-shot runs.

    Domain generalisation names each target domain's role in training (`roles`, `domain_roles`). A target
    that is a meta-training domain is not unseen for GRAM methods (meta-training read its image-text
    pairs, without class labels): the table then adds `average (unseen)`, the mean over the other
    targets (per run, then over seeds), and says why."""
    roles = roles or {}
    g = runs.grid
    src, k = g.transfer.dataset, g.transfer.shots
    if protocol == "cross-dataset":
        title, what = "Cross-dataset transfer", (
            f"Prompts tuned on {src} ({k} shots per class) scored without tuning on other datasets; test "
            "images that were among the tuning shots (the emoji datasets share images) are left out of the targets.")
        source_name = src
    else:
        title, what = "Domain generalisation", (
            f"Prompts tuned on {src} in domain `{domain}` ({k} shots per class) scored without tuning in "
            "other domains.")
        source_name = domain
    md = preamble(title, runs, what, None)
    seen = [t for t in targets if roles.get(t) == "meta-train"] if protocol == "domain-generalisation" else []
    unseen = [t for t in targets if t not in seen]
    if seen:
        md += ["", f"Meta-training read the image-text pairs of {', '.join(f'`{t}`' for t in seen)} (no class "
               "labels): for the GRAM methods that domain is not unseen. `average (unseen)` leaves it out."]
    labels = [f"{t} ({roles[t]})" if protocol == "domain-generalisation" and roles.get(t) else t for t in targets]
    extra = ["average (unseen)"] if seen and unseen else []
    head = ["method", f"{source_name} (source)"] + labels + ["average"] + extra
    rows, csv_rows, metrics = [], [], {}
    for m in runs.zs + runs.tuned:
        source = Cell([target_value(r, "all") for r in runs.records(m, "few-shot", src, k)])
        recs = runs.records(m, protocol, src, k)
        cells = [Cell([target_value(r, t) for r in recs]) for t in targets]
        avg = Cell([r["summary"][METRIC] for r in recs])
        more = []
        if extra:
            per_run = [[target_value(r, t) for t in unseen] for r in recs]
            more = [Cell([float(np.mean(v)) if None not in v else None for v in per_run])]
        rows.append([m, source.text()] + [c.text() for c in cells] + [avg.text()] + [c.text() for c in more])
        metrics[m] = {"source": source.record(), **{t: c.record() for t, c in zip(targets, cells)},
                      "average": avg.record(), **({"average_unseen": more[0].record()} if more else {})}
        csv_rows.append([m] + [_num(c.mean) for c in [source, *cells, avg, *more]] + [len(recs)])
    md += ["", *_md_table(head, rows)]
    csv_head = ["method", "source", *targets, "average"] + (["average_unseen"] if extra else []) + ["n"]
    return "\n".join(md) + "\n", _csv(csv_head, csv_rows), metrics


def _run_records(runs: Runs, prof):
    """(protocol, dataset, method, record) of every run the grid asks for, in table order."""
    g = runs.grid
    jobs = [("few-shot", ds, k) for ds in g.datasets for k in g.shots]
    jobs += [("base-to-new", ds, g.base_to_new_shots) for ds in g.datasets]
    if prof.protocols.cross_dataset:
        jobs.append(("cross-dataset", g.transfer.dataset, g.transfer.shots))
    if prof.protocols.domain_generalisation:
        jobs.append(("domain-generalisation", g.transfer.dataset, g.transfer.shots))
    for protocol, ds, k in jobs:
        for m in runs.zs + runs.tuned:
            if m in runs.zs and protocol == "few-shot" and k != g.shots[0]:
                continue  # one zero-shot record serves every k
            for r in runs.records(m, protocol, ds, k):
                yield protocol, ds, m, r


def runs_csv(runs: Runs, prof) -> str:
    """Every run and target, long format (no wall times: `run_times` has them)."""
    rows = []
    for protocol, ds, m, r in _run_records(runs, prof):
        for t in r["results"]:
            rows.append([protocol, ds, m, r["shots"], r["seed"], r["subset_hash"] or "", t["target"],
                         t["dataset"], t["domain"], t.get("n", ""), t["n_excluded"],
                         _num(t.get("accuracy")), _num(t.get(METRIC))])
    head = ["protocol", "dataset", "method", "shots", "seed", "subset_hash", "target", "target_dataset",
            "target_domain", "n", "n_excluded", "accuracy", "balanced_accuracy"]
    return _csv(head, rows)


def run_times(grid, prof, eval_dir: str | Path, runs_dir: str | Path) -> list[tuple[str, str, float]]:
    """(stage, run, wall seconds) of every run of `runs_csv`: `evaluate` for the zero-shot records, `tune` for
    the tuned runs (the report's `timings.csv`)."""
    runs = Runs(grid, eval_dir, runs_dir)
    if not grid.datasets or not (grid.tuned or grid.methods) or not prof.protocols.domain:
        return []
    out = []
    for protocol, ds, m, r in _run_records(runs, prof):
        seed = "" if r["seed"] is None else f"-s{r['seed']}"
        out.append(("evaluate" if m in runs.zs else "tune", f"{protocol}/{ds}/{m}/k{r['shots']}{seed}",
                    r["wall_time_s"]))
    return out


def plot_few_shot(metrics: dict, runs: Runs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = runs.grid
    datasets = [ds for ds in g.datasets if ds in metrics]
    fig, axes = plt.subplots(1, max(1, len(datasets)), figsize=(5 * max(1, len(datasets)), 3.8), squeeze=False)
    if not datasets:
        axes[0][0].text(0.5, 0.5, "no few-shot runs in the grid", ha="center", va="center")
    for ax, ds in zip(axes[0], datasets):
        for m in runs.tuned:
            mean = np.array([100 * metrics[ds][m][str(k)]["mean"] for k in g.shots])
            std = np.array([100 * metrics[ds][m][str(k)]["std"] for k in g.shots])
            (line,) = ax.plot(g.shots, mean, marker="o", label=m)
            ax.fill_between(g.shots, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        for i, m in enumerate(runs.zs):
            ax.axhline(100 * metrics[ds][m][str(g.shots[0])]["mean"], color="k", lw=1, ls=["--", ":", "-."][i % 3],
                       label=m)
        ax.set_xscale("log", base=2)
        ax.set_xticks(g.shots, [str(k) for k in g.shots])
        ax.set_xlabel("shots per class")
        ax.set_ylabel("class-balanced accuracy (%)")
        ax.set_title(ds)
        ax.grid(alpha=0.3)
    if datasets:
        axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def run(grid, prof, eval_dir: str | Path, runs_dir: str | Path, out: str | Path) -> dict:
    """Write the four protocol tables, the curves, the runs and the summary; returns the summary.

    Every output is written even when the grid asks for nothing (a note then says so), so that the
    workflow's declared outputs always exist.
    """
    out = Path(out)
    runs = Runs(grid, eval_dir, runs_dir)
    pc = prof.protocols
    summary: dict = {}
    names = {"few-shot": "few_shot", "base-to-new": "base_to_new", "cross-dataset": "cross_dataset",
             "domain-generalisation": "domain_generalisation"}
    empty = not grid.datasets or not (grid.tuned or grid.methods) or not pc.domain
    for protocol, name in names.items():
        targets = {"cross-dataset": pc.cross_dataset, "domain-generalisation": pc.domain_generalisation}.get(protocol)
        if empty or targets == []:
            md = f"# {protocol}\n\nNothing to report: the grid or `protocols` of this profile name no run.\n"
            table, summary[protocol] = "", {}
        elif protocol == "few-shot":
            md, table, summary[protocol] = few_shot(runs, pc.domain)
        elif protocol == "base-to-new":
            md, table, summary[protocol] = base_to_new(runs, pc.domain)
        else:
            md, table, summary[protocol] = transfer(runs, protocol, list(targets), pc.domain, domain_roles(prof))
        write_text(out / f"{name}.md", md)
        write_text(out / f"{name}.csv", table)
    md, summary["paired"] = paired(runs) if not empty else ([], {"few-shot": {}, "base-to-new": {}})
    write_text(out / "paired.md", "\n".join(md) + "\n" if md else
               "# Paired differences\n\nNothing to compare: the grid tunes no method with a reference.\n")
    plot_few_shot(summary["few-shot"], runs, out / "few_shot.png")
    write_text(out / "runs.csv", "" if empty else runs_csv(runs, prof))
    write_json(out / "protocols.json", summary)
    return summary
