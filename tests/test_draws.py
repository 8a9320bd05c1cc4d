"""Tables over backbone draws (`gram draws`, gram.tables.pooled_difference) on synthetic run records.

Each draw is a results directory written by tests/test_tables.py's `write_world` (the records `gram tune`
and `gram evaluate` write), its per-class accuracies perturbed by a seeded draw so that two draws differ
and the bootstrap intervals are not points. The pooled numbers are checked against `gram.tables` run on
each draw alone and against a direct loop over resamples.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
from test_tables import GRID, N_CLASSES, PROF, write_world

from gram import cli
from gram import draws as D
from gram import tables as T
from gram.config import TptGram, TptGrid
from gram.evaluate import summarise
from gram.io import read_json, write_json


def write_draw(root: Path, seed: int) -> Path:
    """write_world's records with every class's accuracy moved by N(0, 0.1) (clipped to [0, 1]), the
    balanced accuracies and summaries recomputed from them; returns the results directory."""
    write_world(root)
    rng = np.random.default_rng(seed)
    for path in sorted(root.rglob("*.json")):
        rec = read_json(path)
        for r in rec["results"]:
            if r["applicable"]:
                pc = np.clip(np.asarray(r["per_class_accuracy"]) + rng.normal(0, 0.1, len(r["per_class_accuracy"])),
                             0, 1)
                r["per_class_accuracy"] = pc.tolist()
                r["balanced_accuracy"] = float(pc.mean())
        rec["summary"] = summarise(rec["protocol"], rec["results"])
        write_json(path, rec)
    return root


@pytest.fixture
def two_draws(tmp_path: Path) -> tuple[list[str], dict, Path]:
    specs = [f"one={write_draw(tmp_path / 'one', 1)}", f"two={write_draw(tmp_path / 'two', 2)}"]
    return specs, D.run(GRID, PROF, specs, tmp_path / "out"), tmp_path


def test_pooled_difference_of_one_draw_is_paired_difference_to_the_bit():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(size=(3, 9)), rng.uniform(size=(1, 9))
    a[:, 2] = np.nan
    pooled = T.pooled_difference([[a]], [[b]], resamples=300, seed=4)
    assert pooled.pop("per_draw") == [pooled["delta"]] and pooled.pop("draws") == 1
    assert pooled == T.paired_difference([a], [b], resamples=300, seed=4)


def test_pooled_difference_equals_a_loop_over_class_and_draw_resamples():
    rng = np.random.default_rng(1)
    a = [[rng.uniform(size=(3, 6)), rng.uniform(size=(3, 5))] for _ in range(3)]  # 3 draws of (base, new)
    b = [[rng.uniform(size=(1, 6)), rng.uniform(size=(1, 5))] for _ in range(3)]
    a[1][0][:, 4] = np.nan  # a class one draw lacks is left out of every draw
    d = T.pooled_difference(a, b, T._harmonic, resamples=400, seed=7)
    keep = [np.array([0, 1, 2, 3, 5]), np.arange(5)]
    h = lambda base, new: 2 * base * new / (base + new)  # noqa: E731

    def delta(i, cls):  # draw i's Δ on the class draws cls (per part)
        score = lambda parts: np.mean(h(*(p[:, k][:, c].mean(1) for p, k, c in zip(parts, keep, cls))))  # noqa: E731
        return score(a[i]) - score(b[i])

    full = [np.arange(5), np.arange(5)]
    assert d["per_draw"] == pytest.approx([delta(i, full) for i in range(3)], abs=1e-12)
    for i in range(3):  # each draw's Δ is what paired_difference gives that draw alone (on the kept classes)
        alone = T.paired_difference([a[i][0][:, keep[0]], a[i][1]], [b[i][0][:, keep[0]], b[i][1]], T._harmonic)
        assert d["per_draw"][i] == pytest.approx(alone["delta"], abs=1e-12)
    assert d["delta"] == pytest.approx(statistics.mean(d["per_draw"]), abs=1e-12)
    gen = np.random.default_rng(7)
    cls = [gen.integers(0, 5, size=(400, 5)), gen.integers(0, 5, size=(400, 5))]
    pick = gen.integers(0, 3, size=(400, 3))
    boot = [np.mean([delta(i, [cls[0][r], cls[1][r]]) for i in pick[r]]) for r in range(400)]
    assert (d["lo"], d["hi"]) == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5])), abs=1e-12)
    assert d["classes"] == [5, 5] and d["draws"] == 3


def test_pooled_difference_refuses_draws_with_other_classes():
    a = [[np.zeros((1, 4))], [np.zeros((1, 5))]]
    with pytest.raises(ValueError, match="differ in their classes"):
        T.pooled_difference(a, a)


def test_each_draw_matches_its_own_tables_and_the_pool_averages_them(two_draws):
    specs, summary, root = two_draws
    own = {name: T.run(GRID, PROF, root / name / "eval", root / name / "runs", root / f"tables-{name}")
           for name in ("one", "two")}
    assert summary["draws"] == ["one", "two"]
    for name in ("one", "two"):  # the per-draw Δ are paired.md's of that draw, to the bit
        for k in GRID.shots:
            got = summary["paired"]["ds"]["coop vs zeroshot"][f"{k}-shot"]["per_draw"][name]
            assert got == own[name]["paired"]["few-shot"]["ds"]["coop vs zeroshot"][str(k)]
        for part in ("base", "new", "hm"):
            got = summary["paired"]["ds"]["coop vs zeroshot"][part]["per_draw"][name]
            assert got == own[name]["paired"]["base-to-new"]["ds"]["coop vs zeroshot"][part]
    for part in ("base", "new", "hm"):
        cell = summary["methods"]["ds"]["coop"][part]
        means = [own[n]["base-to-new"]["ds"]["coop"][part]["mean"] for n in ("one", "two")]
        assert [c["mean"] for c in cell["per_draw"]] == pytest.approx(means, abs=1e-12)
        assert cell["over_draws"]["mean"] == pytest.approx(statistics.mean(means), abs=1e-12)
        assert cell["over_draws"]["std"] == pytest.approx(statistics.stdev(means), abs=1e-12)
        pooled = summary["paired"]["ds"]["coop vs zeroshot"][part]["pooled"]
        each = [summary["paired"]["ds"]["coop vs zeroshot"][part]["per_draw"][n]["delta"] for n in ("one", "two")]
        assert pooled["delta"] == pytest.approx(statistics.mean(each), abs=1e-12)
        assert pooled["lo"] < pooled["delta"] < pooled["hi"] and pooled["draws"] == 2
    # a linear probe has no weights for new classes: no Δ on new or H, a dash in the table
    assert summary["paired"]["ds"]["linear-probe vs zeroshot"]["new"] is None
    assert summary["methods"]["ds"]["linear-probe"]["new"]["over_draws"]["n"] == 0
    out = root / "out"
    assert {p.name for p in out.iterdir()} == {"draws.md", "draws.json", "draws.png"}
    assert json.loads((out / "draws.json").read_text()) == json.loads(json.dumps(summary))
    md = (out / "draws.md").read_text()
    zs = [own[n]["few-shot"]["ds"]["zeroshot"]["1"]["mean"] for n in ("one", "two")]
    assert f"| one | {100 * zs[0]:.1f} (" in md and f"| two | {100 * zs[1]:.1f} (" in md
    pooled_h = summary["paired"]["ds"]["coop vs zeroshot"]["hm"]["pooled"]
    assert f"| coop | zeroshot | H | " in md and T._delta_text(pooled_h) + " |" in md


def test_zero_shot_per_draw_names_each_domains_role_and_its_multiple_of_chance(two_draws):
    _, summary, root = two_draws
    rec = read_json(T.zero_shot_path(root / "two" / "eval", "zeroshot", "domain-generalisation", "ds"))
    google = next(r for r in rec["results"] if r["target"] == "google")
    got = summary["zero_shot"]["two"]["google"]
    assert got == {"balanced_accuracy": google["balanced_accuracy"], "chance": 1 / 4}
    md = (root / "out" / "draws.md").read_text()
    assert "| draw | apple | google |" in md
    assert f"{100 * google['balanced_accuracy']:.1f} ({google['balanced_accuracy'] * 4:.1f}×)" in md


def test_the_same_backbone_twice_is_refused(tmp_path: Path):
    path = write_draw(tmp_path / "one", 1)
    with pytest.raises(ValueError, match="'a' and 'b' have the same zero-shot scores"):
        D.run(GRID, PROF, [f"a={path}", f"b={path}"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_draws_are_errors_that_name_them(tmp_path: Path):
    path = write_draw(tmp_path / "one", 1)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere' / 'eval'} is not a directory"):
        D.run(GRID, PROF, [f"x={tmp_path / 'nowhere'}"], tmp_path / "out")
    for bad in ("x=", f"={path}"):
        with pytest.raises(ValueError, match=f"--draw '{bad}': write NAME=DIR"):
            D.run(GRID, PROF, [bad], tmp_path / "out")
    with pytest.raises(ValueError, match="a name is given twice"):
        D.run(GRID, PROF, [f"x={path}", f"x={write_draw(tmp_path / 'two', 2)}"], tmp_path / "out")
    victim = T.run_path(path / "runs", "base-to-new", "ds", "coop", GRID.base_to_new_shots, 2)
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"{victim}: missing"):
        D.run(GRID, PROF, [f"x={path}"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_cli_reports_a_bad_draw_in_one_line(tmp_path: Path, capsys):
    from conftest import ROOT

    rc = cli.main(["draws", "--params", str(ROOT / "tests" / "params" / "tiny.yaml"), "--draw",
                   f"x={tmp_path}", "--out", str(tmp_path / "out")])
    assert rc == 1
    err = capsys.readouterr().err
    assert f"gram draws: error: --draw 'x={tmp_path}': {tmp_path / 'eval'} is not a directory" in err


TPT_GRID = dataclasses.replace(GRID, tpt=TptGrid(datasets=["ds"], words=["tpt"],
                                                 gram=[TptGram(method="tpt+gram", meta="coop-tpt")]))
TPT_DOMAINS = ["apple", "fluent"]


def write_tpt(root: Path, seed: int, domains: list[str] = TPT_DOMAINS) -> None:
    """`gram tpt` records of TPT_GRID under root/tpt: random per-class accuracies (class 3 of fluent absent
    from the split), the balanced accuracies their mean over the classes present."""
    rng = np.random.default_rng(seed)
    for m, init in (("tpt", {"init": "words"}), ("tpt+gram", {"init": "meta"})):
        for s in TPT_GRID.seeds:
            doms = []
            for d in domains:
                stages = {}
                for stage in ("before", "after"):
                    pc = rng.uniform(size=N_CLASSES)
                    pc = [None if (d == "fluent" and c == 3) else float(v) for c, v in enumerate(pc)]
                    stages[stage] = {"accuracy": 0.0, "per_class_accuracy": pc,
                                     "balanced_accuracy": float(np.mean([v for v in pc if v is not None]))}
                doms.append({"domain": d, "n": 10, **stages})
            write_json(root / "tpt" / "ds" / m / f"s{s}.json",
                       {"init": init, "meta": {"recipe": "coop-tpt"} if init["init"] == "meta" else None,
                        "domains": doms})


def test_test_time_rows_and_differences_per_draw_and_pooled(tmp_path: Path):
    roots = {name: write_draw(tmp_path / name, k) for k, name in enumerate(("one", "two", "three"), 1)}
    for k, root in enumerate(roots.values(), 1):
        write_tpt(root, 10 + k)
    summary = D.run(TPT_GRID, PROF, [f"{n}={r}" for n, r in roots.items()], tmp_path / "out")
    tt = summary["test_time"]["ds"]
    assert tt["domains"] == TPT_DOMAINS
    assert [(r["label"], r["stage"]) for r in tt["rows"]] == [
        ("zero-shot (words), no test-time tuning", "before"), ("GRAM init (coop-tpt), no test-time tuning", "before"),
        ("tpt", "after"), ("tpt+gram", "after")]

    def score(name, m, stage):  # per seed, the mean over domains of the balanced accuracies, as test_time.md
        recs = [read_json(roots[name] / "tpt" / "ds" / m / f"s{s}.json") for s in TPT_GRID.seeds]
        return np.array([np.mean([d[stage]["balanced_accuracy"] for d in r["domains"]]) for r in recs])

    row = tt["rows"][3]
    means = [score(n, "tpt+gram", "after").mean() for n in roots]
    assert [row["per_draw"][n]["mean"] for n in roots] == pytest.approx(means, abs=1e-12)
    assert row["over_draws"]["mean"] == pytest.approx(statistics.mean(means), abs=1e-12)
    assert row["over_draws"]["std"] == pytest.approx(statistics.stdev(means), abs=1e-12)
    for label, (ma, sa), (mb, sb) in (("tpt+gram − tpt", ("tpt+gram", "after"), ("tpt", "after")),
                                      ("tpt: after − before", ("tpt", "after"), ("tpt", "before"))):
        entry = tt["paired"][label]
        each = [entry["per_draw"][n]["delta"] for n in roots]
        # Δ is the difference of the table's scores: the absent class is left out of fluent's balanced accuracy
        direct = [(score(n, ma, sa) - score(n, mb, sb)).mean() for n in roots]
        assert each == pytest.approx(direct, abs=1e-12)
        assert entry["pooled"]["delta"] == pytest.approx(statistics.mean(each), abs=1e-12)
        assert entry["pooled"]["classes"] == [N_CLASSES, N_CLASSES - 1] and entry["pooled"]["draws"] == 3
        assert entry["pooled"]["lo"] < entry["pooled"]["delta"] < entry["pooled"]["hi"]
        md = (tmp_path / "out" / "draws.md").read_text()
        assert f"| {label} | " + " | ".join(T._delta_text(entry["per_draw"][n]) for n in roots) in md
    assert "## ds: test-time tuning per draw and over draws" in md


def test_test_time_runs_that_are_missing_or_score_other_domains_are_named(tmp_path: Path):
    one, two = write_draw(tmp_path / "one", 1), write_draw(tmp_path / "two", 2)
    write_tpt(one, 1)
    with pytest.raises(FileNotFoundError, match=f"{two / 'tpt' / 'ds' / 'tpt' / 's1.json'}: missing .*draw 'two'"):
        D.run(TPT_GRID, PROF, [f"one={one}", f"two={two}"], tmp_path / "out")
    write_tpt(two, 2, domains=["apple"])
    with pytest.raises(ValueError, match=f"{two / 'tpt' / 'ds' / 'tpt' / 's1.json'}: domains \\['apple'\\], but"):
        D.run(TPT_GRID, PROF, [f"one={one}", f"two={two}"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
