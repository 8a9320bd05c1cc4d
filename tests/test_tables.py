"""Protocol tables (`gram.tables`) on synthetic run records: no model, no data.

Every test writes tuned runs `<runs>/<protocol>/<dataset>/<method>/k<shots>-s<seed>.json` and zero-shot
records `<eval>/<method>/protocols/<protocol>/<dataset>.json` the way `gram tune` and `gram evaluate` write
them, runs `tables.run`, and checks the cells against values computed here from the numbers written.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml

from gram import tables as T
from gram.config import GridParams, ProfileParams, ProtocolParams, TransferParams
from gram.evaluate import harmonic_mean, protocol_jobs, summarise
from gram.io import write_json

GRID = GridParams(methods=["zeroshot"], tuned=["coop", "linear-probe"], datasets=["ds"], shots=[1, 2],
                  seeds=[1, 2, 3], base_to_new_shots=2, transfer=TransferParams("ds", 2))
PROF = ProfileParams(protocols=ProtocolParams(domain="apple", cross_dataset=["other"],
                                              domain_generalisation=["google"]))
OUTPUTS = ["few_shot.md", "few_shot.csv", "few_shot.png", "base_to_new.md", "base_to_new.csv", "cross_dataset.md",
           "cross_dataset.csv", "domain_generalisation.md", "domain_generalisation.csv", "paired.md", "runs.csv",
           "protocols.json"]
N_TEST, N_CLASSES = 20, 4

# Class-balanced accuracies written into the records (a list: one value per seed of GRID.seeds; None: the
# target is not applicable). Tuned methods:
FEW_SHOT = {("coop", 1): [0.2, 0.3, 0.4], ("coop", 2): [0.4, 0.5, 0.6],
            ("linear-probe", 1): [0.1, 0.2, 0.3], ("linear-probe", 2): [0.4, 0.6, 0.8]}
BASE_NEW = {"coop": [(0.9, 0.3), (0.6, 0.6), (0.3, 0.9)],  # H per seed 0.45, 0.6, 0.45; H of the means 0.6
            "linear-probe": [(0.7, None), (0.8, None), (0.9, None)]}  # no weights for the new classes
CROSS = {"coop": {"other": [0.2, 0.3, 0.4], "third": [0.6, 0.7, 0.2]},
         "linear-probe": {"other": [None] * 3, "third": [None] * 3}}
DOMAIN = {"coop": {"google": [0.1, 0.2, 0.3]}, "linear-probe": {"google": [0.3, 0.4, 0.5]}}
# zero-shot methods: one deterministic record
ZS_FEW_SHOT = {"zeroshot": 0.25}
ZS_BASE_NEW = {"zeroshot": (0.5, 0.7)}
ZS_CROSS = {"zeroshot": {"other": 0.35, "third": 0.45}}
ZS_DOMAIN = {"zeroshot": {"google": 0.15}}


# ------------------------------------------------------------------------------------------------
# writing records
# ------------------------------------------------------------------------------------------------
def result(target: str, dataset: str, domain: str, value: float | None, n_excluded: int = 0) -> dict:
    """One entry of a record's `results`, as `gram.evaluate.score_split` returns it."""
    out = {"target": target, "dataset": dataset, "domain": domain, "n_excluded": n_excluded}
    if value is None:
        return {**out, "applicable": False, "reason": "linear probe: no weights for these classes"}
    return {**out, "applicable": True, "n": N_TEST, "n_classes": N_CLASSES, "accuracy": value / 2,
            "balanced_accuracy": value, "per_class_accuracy": [value] * N_CLASSES,
            "majority_accuracy": 0.25, "chance_balanced_accuracy": 1 / N_CLASSES}


def write_record(path: Path, protocol: str, dataset: str, method: str, results: list[dict],
                 shots: int = 0, seed: int | None = None, domain: str = "apple") -> dict:
    """A record as `gram.tune.run` (seed given) or `gram.evaluate.run` (seed None: zero-shot) writes it."""
    rec = {"protocol": protocol, "dataset": dataset, "domain": domain, "method": method}
    if seed is None:
        rec |= {"kind": "zero-shot", "shots": 0, "seed": None, "subset_hash": None,
                "results": results, "summary": summarise(protocol, results),
                "config": {"templates": ["a {} emoji."]}, "wall_time_s": 0.5}
    else:
        rec |= {"kind": method, "shots": shots, "seed": seed, "subset_hash": f"h{shots}{seed}",
                "n_train": shots * N_CLASSES, "results": results, "summary": summarise(protocol, results),
                "train": {"steps": 10, "loss_first": 1.0}, "config": {"method": {}}, "wall_time_s": 1.5}
    write_json(path, rec)
    return rec


def protocol_results(protocol: str, values, pc: ProtocolParams, source: str) -> list[dict]:
    """`results` of one run: values is a float (few-shot), a (base, new) pair or a {target: value} mapping."""
    if protocol == "few-shot":
        return [result("all", source, pc.domain, values)]
    if protocol == "base-to-new":
        return [result("base", source, pc.domain, values[0]), result("new", source, pc.domain, values[1])]
    if protocol == "cross-dataset":
        return [result(t, t, pc.domain, values[t], n_excluded=3) for t in pc.cross_dataset]
    return [result(t, source, t, values[t]) for t in pc.domain_generalisation]


def write_world(root: Path, grid: GridParams = GRID, prof: ProfileParams = PROF) -> tuple[Path, Path]:
    """Every record the grid asks for; returns (eval_dir, runs_dir)."""
    eval_dir, runs_dir, pc = root / "eval", root / "runs", prof.protocols
    zs_values = {"few-shot": ZS_FEW_SHOT, "base-to-new": ZS_BASE_NEW, "cross-dataset": ZS_CROSS,
                 "domain-generalisation": ZS_DOMAIN}
    for m in grid.methods:  # the jobs `gram evaluate` runs
        for protocol, ds in protocol_jobs(grid, pc):
            write_record(T.zero_shot_path(eval_dir, m, protocol, ds), protocol, ds, m,
                         protocol_results(protocol, zs_values[protocol][m], pc, ds))
    jobs = [("few-shot", ds, k) for ds in grid.datasets for k in grid.shots]
    jobs += [("base-to-new", ds, grid.base_to_new_shots) for ds in grid.datasets]
    jobs += [(p, grid.transfer.dataset, grid.transfer.shots) for p, targets in
             (("cross-dataset", pc.cross_dataset), ("domain-generalisation", pc.domain_generalisation)) if targets]
    for protocol, ds, k in jobs:  # the jobs `gram tune` runs
        for m in grid.tuned:
            values = {"few-shot": FEW_SHOT.get((m, k)), "base-to-new": BASE_NEW[m], "cross-dataset": CROSS[m],
                      "domain-generalisation": DOMAIN[m]}[protocol]
            for i, seed in enumerate(grid.seeds):
                v = values[i] if protocol in ("few-shot", "base-to-new") else {t: x[i] for t, x in values.items()}
                write_record(T.run_path(runs_dir, protocol, ds, m, k, seed), protocol, ds, m,
                             protocol_results(protocol, v, pc, ds), shots=k, seed=seed)
    return eval_dir, runs_dir


# ------------------------------------------------------------------------------------------------
# expected values and reading the outputs
# ------------------------------------------------------------------------------------------------
def cell(values: list[float | None]) -> dict:
    """The expected protocols.json cell: mean and sample std (ddof=1) over the applicable values."""
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}


def text(values: list[float | None]) -> str:
    """The expected Markdown cell."""
    c = cell(values)
    if c["n"] == 0:
        return "–"
    return f"{100 * c['mean']:.1f}" + (f" ± {100 * c['std']:.1f}" if c["n"] > 1 else "")


def assert_cell(got: dict, values: list[float | None]) -> None:
    want = cell(values)
    assert got["n"] == want["n"]
    for key in ("mean", "std"):
        assert got[key] == (None if want[key] is None else pytest.approx(want[key], rel=1e-12, abs=1e-15)), key


def md_rows(md: str) -> dict[str, list[str]]:
    """Markdown table rows by their first cell (the method), header and rule left out."""
    rows = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| method "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


@pytest.fixture
def world(tmp_path: Path) -> tuple[Path, dict]:
    """The records of GRID and PROF, and the summary `tables.run` returns; the outputs lie in <tmp>/out."""
    eval_dir, runs_dir = write_world(tmp_path)
    summary = T.run(GRID, PROF, eval_dir, runs_dir, tmp_path / "out")
    return tmp_path / "out", summary


# ------------------------------------------------------------------------------------------------
# cells
# ------------------------------------------------------------------------------------------------
def test_cell_mean_sample_std_and_text():
    c = T.Cell([0.2, None, 0.3, 0.4])
    assert c.record() == {"mean": pytest.approx(0.3), "std": pytest.approx(0.1), "n": 3}
    assert c.text() == "30.0 ± 10.0"
    assert T.Cell([0.5]).record() == {"mean": 0.5, "std": 0.0, "n": 1} and T.Cell([0.5]).text() == "50.0"
    assert T.Cell([None, None]).record() == {"mean": None, "std": None, "n": 0}
    assert T.Cell([]).text() == "–"


def test_target_value_reads_the_metric_and_names_a_missing_target():
    rec = {"protocol": "few-shot", "dataset": "ds", "method": "coop", "shots": 1,
           "results": [result("base", "ds", "apple", 0.6), result("new", "ds", "apple", None)]}
    assert T.target_value(rec, "base") == 0.6 and T.target_value(rec, "base", "accuracy") == 0.3
    assert T.target_value(rec, "new") is None
    with pytest.raises(KeyError, match="no target 'all'"):
        T.target_value(rec, "all")


# ------------------------------------------------------------------------------------------------
# the whole report
# ------------------------------------------------------------------------------------------------
def test_run_writes_every_output(world):
    out, summary = world
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)  # no temporary file left behind
    assert (out / "few_shot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "protocols.json").read_text()) == summary
    assert list(summary) == ["few-shot", "base-to-new", "cross-dataset", "domain-generalisation", "paired"]


def test_few_shot_cells_are_mean_and_sample_std_over_seeds(world):
    out, summary = world
    fs = json.loads((out / "protocols.json").read_text())["few-shot"]
    assert set(fs) == {"ds"} and set(fs["ds"]) == {"zeroshot", "coop", "linear-probe"}
    for (m, k), values in FEW_SHOT.items():
        assert_cell(fs["ds"][m][str(k)], values)
    for k in GRID.shots:  # the one zero-shot record stands for every k
        assert_cell(fs["ds"]["zeroshot"][str(k)], [ZS_FEW_SHOT["zeroshot"]])
    assert fs["ds"]["coop"]["1"]["std"] == pytest.approx(0.1)  # sample std: ddof=1, not 0.0816


def test_few_shot_markdown(world):
    out, _ = world
    md = (out / "few_shot.md").read_text()
    assert md.startswith("# Few-shot classification\n")
    assert f"## ds ({N_CLASSES} classes, {N_TEST} test images)" in md
    assert "| method | 1 shot | 2 shots |" in md
    assert "seeds 1, 2, 3" in md and "in domain `apple`" in md
    rows = md_rows(md)
    assert rows["coop"] == ["30.0 ± 10.0", "50.0 ± 10.0"]
    assert rows["linear-probe"] == ["20.0 ± 10.0", "60.0 ± 20.0"]
    assert rows["zeroshot"] == ["25.0", ""]  # shown once, without a std
    for (m, k), values in FEW_SHOT.items():
        assert rows[m][GRID.shots.index(k)] == text(values)


def test_few_shot_csv_has_a_row_per_tuned_method_and_shots_and_one_per_zero_shot_method(world):
    out, _ = world
    rows = read_csv(out / "few_shot.csv")
    assert list(rows[0]) == ["dataset", "method", "shots", "mean", "std", "n"]
    assert len(rows) == len(GRID.tuned) * len(GRID.shots) + len(GRID.methods)
    by = {(r["method"], int(r["shots"])): r for r in rows}
    assert len(by) == len(rows)
    assert by[("zeroshot", GRID.shots[0])] == {"dataset": "ds", "method": "zeroshot", "shots": "1",
                                               "mean": "0.2500", "std": "0.0000", "n": "1"}
    for (m, k), values in FEW_SHOT.items():
        c = cell(values)
        assert by[(m, k)] == {"dataset": "ds", "method": m, "shots": str(k), "mean": f"{c['mean']:.4f}",
                              "std": f"{c['std']:.4f}", "n": str(len(GRID.seeds))}
    assert by[("coop", 1)]["mean"] == "0.3000" and by[("coop", 1)]["std"] == "0.1000"


def test_base_to_new_h_is_the_mean_of_per_seed_harmonic_means(world):
    out, _ = world
    b2n = json.loads((out / "protocols.json").read_text())["base-to-new"]["ds"]
    base, new = zip(*BASE_NEW["coop"])
    per_seed_h = [harmonic_mean(b, n) for b, n in BASE_NEW["coop"]]
    assert_cell(b2n["coop"]["base"], list(base))
    assert_cell(b2n["coop"]["new"], list(new))
    assert_cell(b2n["coop"]["hm"], per_seed_h)
    assert b2n["coop"]["hm"]["mean"] == pytest.approx(0.5)
    assert harmonic_mean(statistics.mean(base), statistics.mean(new)) == pytest.approx(0.6)  # not what H is
    zb, zn = ZS_BASE_NEW["zeroshot"]
    assert_cell(b2n["zeroshot"]["hm"], [harmonic_mean(zb, zn)])
    rows = md_rows((out / "base_to_new.md").read_text())
    assert rows["coop"] == ["60.0 ± 30.0", "60.0 ± 30.0", text(per_seed_h)]
    assert rows["coop"][2].startswith("50.0 ± ")
    assert rows["zeroshot"] == ["50.0", "70.0", f"{100 * harmonic_mean(zb, zn):.1f}"]


def test_base_to_new_linear_probe_without_new_classes_shows_a_dash(world):
    out, _ = world
    b2n = json.loads((out / "protocols.json").read_text())["base-to-new"]["ds"]["linear-probe"]
    assert_cell(b2n["base"], [b for b, _ in BASE_NEW["linear-probe"]])
    assert b2n["new"] == b2n["hm"] == {"mean": None, "std": None, "n": 0}
    md = (out / "base_to_new.md").read_text()
    assert md_rows(md)["linear-probe"] == ["80.0 ± 10.0", "–", "–"]
    assert "| method | base | new | H |" in md
    rows = {r["method"]: r for r in read_csv(out / "base_to_new.csv")}
    assert rows["linear-probe"] == {"dataset": "ds", "method": "linear-probe", "base": "0.8000", "base_std": "0.1000",
                                    "new": "", "new_std": "", "hm": "", "hm_std": "", "n": "3"}
    assert rows["zeroshot"]["n"] == "1" and rows["coop"]["hm"] == "0.5000"


@pytest.mark.parametrize("targets", [["other"], ["other", "third"]])
def test_cross_dataset(tmp_path: Path, targets: list[str]):
    prof = dataclasses.replace(PROF, protocols=dataclasses.replace(PROF.protocols, cross_dataset=targets))
    eval_dir, runs_dir = write_world(tmp_path, prof=prof)
    summary = T.run(GRID, prof, eval_dir, runs_dir, tmp_path / "out")["cross-dataset"]
    k = GRID.transfer.shots
    averages = {m: [statistics.mean(v[t][i] for t in targets) for i in range(len(GRID.seeds))]
                for m, v in CROSS.items() if m == "coop"}  # each run's summary: the mean over its targets
    assert set(summary) == {"zeroshot", "coop", "linear-probe"}
    assert_cell(summary["coop"]["source"], FEW_SHOT[("coop", k)])  # the few-shot runs at transfer.shots
    assert_cell(summary["linear-probe"]["source"], FEW_SHOT[("linear-probe", k)])
    assert_cell(summary["zeroshot"]["source"], [ZS_FEW_SHOT["zeroshot"]])
    for t in targets:
        assert_cell(summary["coop"][t], CROSS["coop"][t])
        assert summary["linear-probe"][t] == {"mean": None, "std": None, "n": 0}
        assert_cell(summary["zeroshot"][t], [ZS_CROSS["zeroshot"][t]])
    assert_cell(summary["coop"]["average"], averages["coop"])
    assert summary["linear-probe"]["average"] == {"mean": None, "std": None, "n": 0}
    assert_cell(summary["zeroshot"]["average"], [statistics.mean(ZS_CROSS["zeroshot"][t] for t in targets)])

    md = (tmp_path / "out" / "cross_dataset.md").read_text()
    assert "| method | ds (source) | " + " | ".join(targets) + " | average |" in md
    rows = md_rows(md)
    assert rows["coop"] == ["50.0 ± 10.0", *(text(CROSS["coop"][t]) for t in targets), text(averages["coop"])]
    assert rows["linear-probe"] == ["60.0 ± 20.0", *(["–"] * len(targets)), "–"]
    assert rows["zeroshot"][0] == "25.0"
    if targets == ["other"]:
        assert rows["coop"] == ["50.0 ± 10.0", "30.0 ± 10.0", "30.0 ± 10.0"]
    else:  # per-run averages 0.4, 0.5, 0.3
        assert rows["coop"][-1] == "40.0 ± 10.0"
    csv_rows = {r["method"]: r for r in read_csv(tmp_path / "out" / "cross_dataset.csv")}
    assert list(csv_rows["coop"]) == ["method", "source", *targets, "average", "n"]
    assert csv_rows["linear-probe"] == {"method": "linear-probe", "source": "0.6000", **{t: "" for t in targets},
                                        "average": "", "n": "3"}


def test_domain_generalisation(world):
    out, summary = world
    dg = summary["domain-generalisation"]
    k = GRID.transfer.shots
    for m in GRID.tuned:
        assert_cell(dg[m]["source"], FEW_SHOT[(m, k)])
        assert_cell(dg[m]["google"], DOMAIN[m]["google"])
        assert_cell(dg[m]["average"], DOMAIN[m]["google"])
    md = (out / "domain_generalisation.md").read_text()
    assert "| method | apple (source) | google | average |" in md
    rows = md_rows(md)
    assert rows["coop"] == ["50.0 ± 10.0", "20.0 ± 10.0", "20.0 ± 10.0"]
    assert rows["linear-probe"] == ["60.0 ± 20.0", "40.0 ± 10.0", "40.0 ± 10.0"]
    assert rows["zeroshot"] == ["25.0", "15.0", "15.0"]


def test_runs_csv_has_a_row_per_run_and_target(world):
    out, _ = world
    rows = read_csv(out / "runs.csv")
    assert list(rows[0]) == ["protocol", "dataset", "method", "shots", "seed", "subset_hash", "target",
                             "target_dataset", "target_domain", "n", "n_excluded", "accuracy", "balanced_accuracy"]
    n_tuned, n_seeds = len(GRID.tuned), len(GRID.seeds)
    per_protocol = {"few-shot": 1 + len(GRID.shots) * n_tuned * n_seeds,  # zero-shot: one record for every k
                    "base-to-new": 2 * (1 + n_tuned * n_seeds), "cross-dataset": 1 + n_tuned * n_seeds,
                    "domain-generalisation": 1 + n_tuned * n_seeds}
    assert {p: sum(r["protocol"] == p for r in rows) for p in per_protocol} == per_protocol
    assert len(rows) == sum(per_protocol.values())
    key = ("few-shot", "coop", "1", "2")
    coop = next(r for r in rows if (r["protocol"], r["method"], r["shots"], r["seed"]) == key)
    assert coop == {
        "protocol": "few-shot", "dataset": "ds", "method": "coop", "shots": "1", "seed": "2", "subset_hash": "h12",
        "target": "all", "target_dataset": "ds", "target_domain": "apple", "n": str(N_TEST), "n_excluded": "0",
        "accuracy": "0.1500", "balanced_accuracy": "0.3000"}
    lp_new = [r for r in rows if (r["protocol"], r["method"], r["target"]) == ("base-to-new", "linear-probe", "new")]
    assert len(lp_new) == n_seeds and all(r["n"] == r["accuracy"] == r["balanced_accuracy"] == "" for r in lp_new)
    zs = next(r for r in rows if (r["protocol"], r["method"]) == ("cross-dataset", "zeroshot"))
    assert (zs["shots"], zs["seed"], zs["subset_hash"], zs["target_dataset"], zs["n_excluded"]) == ("0", "", "",
                                                                                                  "other", "3")


def test_runs_csv_lists_each_run_and_target_once(world):
    out, _ = world
    rows = [tuple(r.values()) for r in read_csv(out / "runs.csv")]
    assert len(rows) == len(set(rows))


# ------------------------------------------------------------------------------------------------
# missing and empty
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["tuned", "zero-shot", "transfer"])
def test_a_missing_run_is_an_error_that_names_it(tmp_path: Path, which: str):
    eval_dir, runs_dir = write_world(tmp_path)
    path = {"tuned": T.run_path(runs_dir, "few-shot", "ds", "coop", 2, 3),
            "zero-shot": T.zero_shot_path(eval_dir, "zeroshot", "base-to-new", "ds"),
            "transfer": T.run_path(runs_dir, "domain-generalisation", "ds", "linear-probe", 2, 1)}[which]
    path.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{path}: missing")):
        T.run(GRID, PROF, eval_dir, runs_dir, tmp_path / "out")


@pytest.mark.parametrize("change", [{"tuned": [], "methods": []}, {"datasets": []}])
def test_an_empty_grid_still_writes_every_output(tmp_path: Path, change: dict):
    grid = dataclasses.replace(GRID, **change)
    summary = T.run(grid, PROF, tmp_path / "eval", tmp_path / "runs", tmp_path / "out")  # nothing on disk
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    assert summary == json.loads((out / "protocols.json").read_text()) == {
        "few-shot": {}, "base-to-new": {}, "cross-dataset": {}, "domain-generalisation": {},
        "paired": {"few-shot": {}, "base-to-new": {}}}
    for name in ("few_shot", "base_to_new", "cross_dataset", "domain_generalisation"):
        assert "Nothing to report" in (out / f"{name}.md").read_text()
        assert (out / f"{name}.csv").read_text() == ""
    assert "Nothing to compare" in (out / "paired.md").read_text()
    assert (out / "runs.csv").read_text() == ""
    assert (out / "few_shot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_protocol_without_targets_is_reported_empty(tmp_path: Path):
    prof = dataclasses.replace(PROF, protocols=dataclasses.replace(PROF.protocols, cross_dataset=[]))
    eval_dir, runs_dir = write_world(tmp_path, prof=prof)  # writes no cross-dataset record
    summary = T.run(GRID, prof, eval_dir, runs_dir, tmp_path / "out")
    out = tmp_path / "out"
    assert summary["cross-dataset"] == {} and set(summary["domain-generalisation"]) == {"zeroshot", "coop",
                                                                                        "linear-probe"}
    assert "Nothing to report" in (out / "cross_dataset.md").read_text()
    assert (out / "cross_dataset.csv").read_text() == ""
    protocols = {r["protocol"] for r in read_csv(out / "runs.csv")}
    assert protocols == {"few-shot", "base-to-new", "domain-generalisation"}


def test_tuned_methods_only(tmp_path: Path):
    grid = dataclasses.replace(GRID, methods=[])
    eval_dir, runs_dir = write_world(tmp_path, grid=grid)
    summary = T.run(grid, PROF, eval_dir, runs_dir, tmp_path / "out")
    assert set(summary["few-shot"]["ds"]) == set(summary["cross-dataset"]) == {"coop", "linear-probe"}
    md = (tmp_path / "out" / "few_shot.md").read_text()
    assert "## ds\n" in md and "zeroshot |" not in md


def test_a_transfer_dataset_outside_the_grid_is_refused_even_without_tuned_methods():
    """Otherwise `gram evaluate` would skip its transfer records and the tables would miss them."""
    from gram import config as C

    raw = yaml.safe_load((C.Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["grid"].update(tuned=[], transfer={"dataset": "group", "shots": 16})
    with pytest.raises(C.ConfigError, match="`grid.transfer.dataset` = 'group' is not in grid.datasets"):
        C.from_dict(raw)


def test_wall_times_stay_out_of_the_tables(tmp_path):
    """The tables of two runs that differ only in wall times are byte-equal; `run_times` has the times."""
    outs = []
    for i, wall in enumerate((1.5, 99.25)):
        eval_dir, runs_dir = write_world(tmp_path / f"w{i}")
        for f in runs_dir.rglob("*.json"):
            rec = json.loads(f.read_text())
            write_json(f, rec | {"wall_time_s": wall})
        T.run(GRID, PROF, eval_dir, runs_dir, tmp_path / f"out{i}")
        outs.append(tmp_path / f"out{i}")
        times = T.run_times(GRID, PROF, eval_dir, runs_dir)
        assert ("tune", "few-shot/ds/coop/k1-s2", wall) in times and ("evaluate", "few-shot/ds/zeroshot/k0", 0.5) in times
        runs = {(r["protocol"], r["method"], r["shots"], r["seed"]) for r in read_csv(outs[-1] / "runs.csv")}
        assert len(times) == len(runs)  # one time per run, not per target
    for f in OUTPUTS:
        if not f.endswith(".png"):
            assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f



def test_domain_generalisation_marks_the_meta_training_domain(tmp_path: Path, monkeypatch):
    """A target domain that meta-training read is labelled, and `average (unseen)` leaves it out."""
    from gram.config import DataParams, VendorParams

    dg = ["google", "facebook"]
    prof = dataclasses.replace(PROF, protocols=dataclasses.replace(PROF.protocols, domain_generalisation=dg),
                               data=DataParams(vendors=VendorParams(pretrain=["google"], meta=["facebook"],
                                                                    heldout=["apple"])))
    values = {"coop": {"google": [0.1, 0.2, 0.3], "facebook": [0.9, 0.8, 0.7]},
              "linear-probe": {"google": [0.3, 0.4, 0.5], "facebook": [0.5, 0.5, 0.5]}}
    zs = {"zeroshot": {"google": 0.15, "facebook": 0.35}}
    for table, new in ((DOMAIN, values), (ZS_DOMAIN, zs)):  # the records write_world writes
        for m, v in new.items():
            monkeypatch.setitem(table, m, v)
    eval_dir, runs_dir = write_world(tmp_path, prof=prof)
    summary = T.run(GRID, prof, eval_dir, runs_dir, tmp_path / "out")["domain-generalisation"]
    for m in GRID.tuned:
        per_run = [statistics.mean(values[m][t][i] for t in dg) for i in range(len(GRID.seeds))]
        assert_cell(summary[m]["average"], per_run)
        assert_cell(summary[m]["average_unseen"], values[m]["google"])  # facebook left out
    assert_cell(summary["zeroshot"]["average_unseen"], [0.15])
    md = (tmp_path / "out" / "domain_generalisation.md").read_text()
    assert "| method | apple (source) | google (pretrain) | facebook (meta-train) | average | average (unseen) |" in md
    assert "Meta-training read the image-text pairs of `facebook`" in md
    assert md_rows(md)["coop"] == ["50.0 ± 10.0", "20.0 ± 10.0", "80.0 ± 10.0", "50.0 ± 0.0", "20.0 ± 10.0"]
    rows = {r["method"]: r for r in read_csv(tmp_path / "out" / "domain_generalisation.csv")}
    assert list(rows["coop"]) == ["method", "source", "google", "facebook", "average", "average_unseen", "n"]
    assert rows["coop"]["average_unseen"] == "0.2000"


# ------------------------------------------------------------------------------------------------
# paired differences
# ------------------------------------------------------------------------------------------------
def test_paired_difference_equals_a_loop_over_resamples():
    """Δ and the interval against a direct computation: the same class draws, one resample at a time."""
    rng = np.random.default_rng(3)
    a = rng.uniform(size=(3, 7))  # 3 seeds x 7 classes
    b = rng.uniform(size=(3, 7))
    a[:, 4] = np.nan  # a class absent from the split: left out
    b[:, 4] = np.nan
    d = T.paired_difference([a], [b], resamples=500, seed=11)
    keep = [0, 1, 2, 3, 5, 6]
    assert d["delta"] == pytest.approx(np.mean(a[:, keep].mean(1) - b[:, keep].mean(1)), abs=1e-12)
    draws = np.random.default_rng(11).integers(0, 6, size=(500, 6))
    diffs = [np.mean(a[:, keep][:, i].mean(1) - b[:, keep][:, i].mean(1)) for i in draws]
    assert (d["lo"], d["hi"]) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])), abs=1e-12)
    assert d["classes"] == [6] and d["lo"] <= d["delta"] <= d["hi"]
    # a deterministic reference (one run) is compared with every seed of the method
    one = T.paired_difference([a], [b[:1]], resamples=10)
    assert one["delta"] == pytest.approx(np.mean(a[:, keep].mean(1)) - np.mean(b[0, keep]), abs=1e-12)
    # identical methods: Δ = 0 and an interval of one point
    assert T.paired_difference([a], [a.copy()], resamples=50) | {"classes": None} == {
        "delta": 0.0, "lo": 0.0, "hi": 0.0, "classes": None, "resamples": 50}


def test_paired_difference_of_the_harmonic_mean_draws_base_and_new_classes_apart():
    rng = np.random.default_rng(5)
    ab, an, bb, bn = (rng.uniform(size=(2, c)) for c in (4, 4, 4, 4))
    an[:, 1] += 0.5
    h = lambda base, new: 2 * base * new / (base + new)  # noqa: E731
    d = T.paired_difference([ab, an], [bb, bn], T._harmonic, resamples=300, seed=2)
    assert d["delta"] == pytest.approx(np.mean(h(ab.mean(1), an.mean(1)) - h(bb.mean(1), bn.mean(1))), abs=1e-12)
    gen = np.random.default_rng(2)
    ib, inew = gen.integers(0, 4, size=(300, 4)), gen.integers(0, 4, size=(300, 4))
    diffs = [np.mean(h(ab[:, i].mean(1), an[:, j].mean(1)) - h(bb[:, i].mean(1), bn[:, j].mean(1)))
             for i, j in zip(ib, inew)]
    assert (d["lo"], d["hi"]) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])), abs=1e-12)


def test_paired_table_compares_gram_with_its_base_and_the_rest_with_zero_shot(tmp_path: Path):
    grid = dataclasses.replace(GRID, tuned=["coop", "linear-probe"])
    runs = T.Runs(grid, tmp_path, tmp_path)
    runs.tuned = ["coop", "linear-probe", "coop+gram", "coop+gram-init", "vpt+gram"]
    assert [T.reference_of(m, runs) for m in ["zeroshot", *runs.tuned]] == [
        None, "zeroshot", "zeroshot", "coop", "coop", "zeroshot"]  # vpt is not tuned: zero-shot


def test_paired_md_and_summary(world):
    out, summary = world
    md = (out / "paired.md").read_text()
    assert md.startswith("# Paired differences\n") and "## few-shot, ds" in md and "## base-to-new, ds" in md
    assert "| method | reference | 1-shot Δ | 2-shot Δ |" in md
    # every class scores the same in these records: the interval is the point itself, and it leaves out 0
    coop = summary["paired"]["few-shot"]["ds"]["coop vs zeroshot"]["1"]
    assert coop["delta"] == pytest.approx(statistics.mean(FEW_SHOT[("coop", 1)]) - ZS_FEW_SHOT["zeroshot"])
    assert coop["lo"] == pytest.approx(coop["delta"]) and coop["hi"] == pytest.approx(coop["delta"])
    assert "| coop | zeroshot | +5.0 [+5.0, +5.0] * |" in md
    b2n = summary["paired"]["base-to-new"]["ds"]["linear-probe vs zeroshot"]
    assert b2n["new"] is None and b2n["hm"] is None and b2n["base"] is not None  # no weights for new classes
