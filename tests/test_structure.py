"""The meta-training data structure stages on the tiny world: embed (resumable), cluster (hierarchy
invariants, quality), tasks (deterministic, cross-cluster, complexity-informed) and prototypes."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_PARAMS
from gram import cli
from gram import cluster as CL
from gram import config as C
from gram import embed as E
from gram import prototypes as P
from gram import tasks as T
from gram.data.shards import iter_samples, shard_paths

PARAMS = TINY_PARAMS


def stage(*argv: str) -> None:
    assert cli.main([argv[0], "--params", PARAMS, "--profile", "tiny", *argv[1:]]) == 0


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_data, tiny_trained_dir):
    """embed -> cluster -> tasks, prototypes of the tiny profile, run through the CLI as the DAG runs them."""
    root = tmp_path_factory.mktemp("structure")
    d = {"data": tiny_data, "backbone": tiny_trained_dir, "embed": root / "embed", "chc": root / "chc",
         "tasks": root / "tasks", "prototypes": root / "prototypes"}
    stage("embed", "--data", str(tiny_data), "--backbone", str(tiny_trained_dir), "--out", str(d["embed"]))
    stage("cluster", "--data", str(tiny_data), "--embed", str(d["embed"]), "--out", str(d["chc"]))
    stage("tasks", "--chc", str(d["chc"]), "--out", str(d["tasks"]))
    stage("prototypes", "--embed", str(d["embed"]), "--chc", str(d["chc"]), "--out", str(d["prototypes"]))
    return d


def corpus_keys(data) -> list[str]:
    return [f"facebook/{s['__key__']}" for s in iter_samples(shard_paths(data / "shards" / "facebook"))]


# ------------------------------------------------------------------------------------------------
# embed
# ------------------------------------------------------------------------------------------------
def test_embed_covers_the_corpus_with_unit_rows(world):
    keys = corpus_keys(world["data"])
    ids, img, txt = CL.load_corpus(world["embed"], ["facebook"])
    assert ids == keys and len(keys) > 40  # every pair of every facebook shard, in order
    assert torch.allclose(img.norm(dim=1), torch.ones(len(ids))) and torch.allclose(txt.norm(dim=1),
                                                                                   torch.ones(len(ids)))
    rec = json.loads((world["embed"] / "embed.json").read_text())["domains"]["facebook"]
    assert rec["pairs"] == len(keys) and rec["shards"] == len(shard_paths(world["data"] / "shards" / "facebook"))
    assert 0.0 <= rec["input_wait_fraction"] <= 1.0


def test_an_interrupted_embed_stage_resumes_with_the_same_result(tmp_path, world, monkeypatch, tiny_params):
    _, prof = tiny_params
    out = tmp_path / "embed"
    n_shards = len(shard_paths(world["data"] / "shards" / "facebook"))
    assert n_shards >= 2
    real = E.ShardPairs
    calls = []

    def dies_on_the_second_shard(path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the job were killed while decoding shard 2
        return real(path)

    monkeypatch.setattr(E, "ShardPairs", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        E.run(prof.embed, prof.backbone, ["facebook"], world["data"], world["backbone"], out)
    assert not out.exists()  # nothing half-published
    cache = tmp_path / ".embed.cache" / "facebook"
    assert [p.name for p in cache.glob("*.safetensors")] == ["00000.safetensors"]
    monkeypatch.setattr(E, "ShardPairs", real)
    rec = E.run(prof.embed, prof.backbone, ["facebook"], world["data"], world["backbone"], out)
    assert rec["domains"]["facebook"]["kept"] == 1 and rec["domains"]["facebook"]["computed"] == n_shards - 1
    for f in sorted((world["embed"] / "facebook").glob("*.safetensors")):  # same bytes as an uninterrupted run
        assert (out / "facebook" / f.name).read_bytes() == f.read_bytes()
    again = E.run(prof.embed, prof.backbone, ["facebook"], world["data"], world["backbone"], out)
    assert again["domains"]["facebook"]["computed"] == 0  # a finished cache is reused, even after out is gone


def test_embed_stage_errors_name_what_is_missing(tmp_path, world, tiny_params):
    _, prof = tiny_params
    with pytest.raises(ValueError, match="data.vendors.meta is empty"):
        E.run(prof.embed, prof.backbone, [], world["data"], world["backbone"], tmp_path / "e")
    with pytest.raises(FileNotFoundError, match="shards/twitter: no shards of corpus domain 'twitter'"):
        E.run(prof.embed, prof.backbone, ["twitter"], world["data"], world["backbone"], tmp_path / "e")


# ------------------------------------------------------------------------------------------------
# cluster
# ------------------------------------------------------------------------------------------------
def test_hierarchy_every_pair_has_one_cluster_per_level_and_levels_nest(world, tiny_params):
    cfg = tiny_params[1].cluster
    h, ids, tensors, meta = CL.load_chc(world["chc"])
    assert ids == corpus_keys(world["data"]) and len(set(ids)) == len(ids)
    assert h.sizes == [cfg.fine_k, *cfg.levels] and meta["mode"] == "cross-modal"
    n = len(ids)
    for lev, k in zip(h.levels, h.sizes):
        assert lev.shape == (n,) and lev.min() == 0 and lev.max() == k - 1  # exactly one cluster per pair
        assert np.bincount(lev, minlength=k).min() >= 1  # no empty cluster
    for fine, coarse, par in zip(h.levels, h.levels[1:], h.parents):
        assert np.array_equal(par[fine], coarse)  # a pair's coarse cluster is its fine cluster's parent
    for i, k in enumerate(h.sizes):
        c = tensors[f"level{i}.complexity"].numpy()
        assert c.shape == (k,) and c.min() >= 0.0 and c.max() <= 1.0 and c.max() > c.min()
    with open(world["chc"] / "clusters.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(h.sizes)
    for i in range(len(h.sizes)):
        assert sum(int(r["size"]) for r in rows if int(r["level"]) == i) == n
    group = CL.read_truth(world["data"], ids, ["group"])["group"]
    for r in rows:  # the majority group of every cluster, against a direct count
        vals, cnt = np.unique(group[h.levels[int(r["level"])] == int(r["cluster"])], return_counts=True)
        assert r["group_share"] == str(round(cnt.max() / cnt.sum(), 4))
        assert r["group_majority"] in vals[cnt == cnt.max()]


def test_cluster_quality_covers_main_mode_and_ablations(world):
    q = json.loads((world["chc"] / "quality.json").read_text())
    assert list(q["modes"]) == ["cross-modal", "image", "text"]
    assert q["truth"] == {"subgroup": 9, "group": 3}
    for mode, v in q["modes"].items():
        assert (world["chc"] / f"hierarchy-{mode}.safetensors").exists() == (mode != "cross-modal")
        assert [lev["clusters"] for lev in v["levels"]] == [16, 9, 3]
        for lev in v["levels"]:
            for t in ("subgroup", "group"):
                assert 0.0 <= lev[t]["nmi"] <= 1.0 and -1.0 <= lev[t]["ari"] <= 1.0
        assert all(0.0 < p <= 1.0 for p in v["purity"].values())
        assert v["seeds"] == 2 and all(s >= 0.0 for s in v["purity_std"].values())


def test_the_filter_drops_the_lowest_image_text_cosines():
    img = F.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    txt = F.normalize(img + 0.1 * torch.randn(50, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    txt[[3, 17, 41]] = -img[[3, 17, 41]]  # three pairs whose caption contradicts the image
    kept = CL.filter_pairs(img, txt, 0.06)  # floor(0.06 * 50) = 3
    assert kept.tolist() == [i for i in range(50) if i not in (3, 17, 41)]
    assert CL.filter_pairs(img, txt, 0.0).tolist() == list(range(50))


# ------------------------------------------------------------------------------------------------
# tasks
# ------------------------------------------------------------------------------------------------
def test_tasks_are_deterministic_per_seed(world, tmp_path, tiny_params):
    cfg = tiny_params[1].tasks
    T.run(cfg, world["chc"], tmp_path / "a")
    assert (tmp_path / "a" / T.TASKS).read_bytes() == (world["tasks"] / T.TASKS).read_bytes()
    T.run(dataclasses.replace(cfg, seed=cfg.seed + 1), world["chc"], tmp_path / "b")
    assert (tmp_path / "b" / T.TASKS).read_bytes() != (world["tasks"] / T.TASKS).read_bytes()


def test_tasks_draw_support_and_query_from_different_clusters(world, tiny_params):
    cfg = tiny_params[1].tasks
    h, ids, tensors, _ = CL.load_chc(world["chc"])
    tasks, meta = T.load_tasks(world["tasks"])
    assert len(tasks) == cfg.n_tasks and meta["level"] == cfg.level
    assign, cen = h.levels[cfg.level], h.centroids[cfg.level]
    counts = np.bincount(assign)
    c = CL.minmax(tensors[f"level{cfg.level}.complexity"].double().numpy())
    assert c.min() == 0.0 and c.max() == 1.0  # the bounds are used in full
    lo = np.rint(cfg.support[0] + c * (cfg.support[1] - cfg.support[0]))
    for t in range(len(tasks)):
        s, q, a, b = tasks.support[t], tasks.query[t], tasks.support_cluster[t], tasks.query_cluster[t]
        assert a != b and set(assign[s]) == {a} and set(assign[q]) == {b}
        assert len(set(s.tolist())) == len(s) and len(set(q.tolist())) == len(q)
        assert len(s) == min(lo[a], counts[a]) and cfg.query[0] <= len(q) <= cfg.query[1]
        assert np.isclose(tasks.similarity[t], (1 + float(cen[a] @ cen[b])) / 2, atol=1e-6)
    info = json.loads((world["tasks"] / "tasks.json").read_text())
    assert info["tasks"] == cfg.n_tasks and info["same_cluster_tasks"] == 0


def test_same_cluster_ablation_keeps_sets_disjoint():
    rng = np.random.default_rng(0)
    assign = rng.integers(0, 5, 200)
    cen = F.normalize(torch.randn(5, 4), dim=-1).numpy()
    tasks = T.sample_tasks(assign, np.linspace(0, 1, 5), cen, 50, [4, 8], [4, 8], cross_cluster=False, seed=0)
    for s, q, a, b in zip(tasks.support, tasks.query, tasks.support_cluster, tasks.query_cluster):
        assert a == b and not set(s) & set(q) and set(assign[np.concatenate([s, q])]) == {a}


def test_complex_clusters_give_more_and_larger_tasks():
    assign = np.repeat(np.arange(4), 30)
    cen = np.eye(4)
    c = np.array([0.0, 0.0, 0.0, 1.0])
    tasks = T.sample_tasks(assign, c, cen, 7000, [4, 12], [5, 5], complexity_bias=3.0, seed=0)
    share = np.bincount(tasks.support_cluster, minlength=4) / len(tasks)
    assert np.allclose(share, [1 / 7, 1 / 7, 1 / 7, 4 / 7], atol=0.02)  # p ~ 1 + 3c
    sizes = {int(a): len(s) for a, s in zip(tasks.support_cluster, tasks.support)}
    assert sizes == {0: 4, 1: 4, 2: 4, 3: 12}
    assert np.allclose(tasks.similarity, 0.5)  # orthogonal centroids: (1 + 0) / 2
    uniform = T.sample_tasks(assign, c, cen, 7000, [4, 12], [5, 5], complexity_bias=0.0, seed=0)
    assert np.allclose(np.bincount(uniform.support_cluster) / 7000, 0.25, atol=0.02)


def test_tasks_refuse_clusters_too_small():
    with pytest.raises(ValueError, match=r"no cluster of the 3 \(sizes 2..2\) can form a task"):
        T.sample_tasks(np.repeat(np.arange(3), 2), np.zeros(3), np.eye(3), 5, [3, 4], [3, 4])


def test_task_and_cluster_params_are_checked(tmp_path):
    import yaml

    raw = yaml.safe_load(open(TINY_PARAMS).read())
    raw["tiny"]["tasks"]["level"] = 3
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(C.ConfigError, match=r"`tiny`: tasks.level = 3 but the hierarchy has levels 0..2"):
        C.load(tmp_path / "p.yaml")
    raw["tiny"]["tasks"]["level"] = 1
    raw["tiny"]["cluster"]["levels"] = [3, 9]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(C.ConfigError, match=r"`tiny.cluster`: levels \[3, 9\] must decrease strictly"):
        C.load(tmp_path / "p.yaml")


# ------------------------------------------------------------------------------------------------
# prototypes
# ------------------------------------------------------------------------------------------------
def test_prototypes_are_the_member_means_per_level(world, tiny_params):
    from gram.tensorio import load_tensors

    cfg = tiny_params[1].prototypes
    h, ids, tensors, _ = CL.load_chc(world["chc"])
    _, img, txt = CL.load_corpus(world["embed"], ["facebook"])
    protos, _ = load_tensors(world["prototypes"] / P.PROTOTYPES)
    for i, assign in enumerate(h.levels):
        for name, x in (("image", img), ("text", txt)):
            ref = torch.stack([F.normalize(x[torch.from_numpy(assign == c)].double().mean(0), dim=0)
                               for c in range(h.sizes[i])]).float()
            torch.testing.assert_close(protos[f"level{i}.{name}"], ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(protos[f"level{i}.fused"], torch.from_numpy(h.centroids[i]), rtol=0, atol=1e-6)
        comp = CL.minmax(tensors[f"level{i}.complexity"].double().numpy())
        m = P.sub_counts(comp, np.bincount(assign), cfg.max_per_cluster)
        owner = protos[f"level{i}.sub.cluster"].numpy()
        assert np.array_equal(np.bincount(owner, minlength=h.sizes[i]), m)  # complexity sets the count
        assert np.array_equal(owner, np.sort(owner))
        sub_size = protos[f"level{i}.sub.size"].numpy()
        assert np.array_equal(np.bincount(owner, weights=sub_size, minlength=h.sizes[i]).astype(int),
                              np.bincount(assign))  # sub-clusters partition their cluster
        one = np.flatnonzero(m == 1)
        first = np.searchsorted(owner, one)
        torch.testing.assert_close(protos[f"level{i}.sub.image"][first], protos[f"level{i}.image"][one],
                                   rtol=0, atol=1e-6)  # a single sub-prototype is the prototype


def test_sub_counts_follow_complexity_within_bounds():
    assert P.sub_counts(np.array([0.0, 0.5, 1.0, 1.0]), np.array([10, 10, 10, 2]), 5).tolist() == [1, 3, 5, 2]


def test_prototypes_refuse_a_hierarchy_of_other_embeddings(world, tmp_path, tiny_params):
    prof = tiny_params[1]
    other = tmp_path / "embed"
    shutil.copytree(world["embed"], other)
    files = sorted((other / "facebook").glob("*.safetensors"))
    files[0].unlink()  # fewer pairs than the hierarchy was built on
    with pytest.raises(ValueError, match="was clustered from other embeddings"):
        P.run(prof.prototypes, ["facebook"], other, world["chc"], tmp_path / "p")


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def test_clustering_report_tables(world, tmp_path):
    from gram import report

    report.clustering(world["chc"], tmp_path, "tiny")
    md = (tmp_path / "clustering.md").read_text()
    for mode in ("cross-modal", "image", "text"):
        assert f"| {mode} |" in md
    assert "purity subgroup" in md and "NMI against group" in md and "ARI against subgroup" in md and "**" in md
    assert "± " in md and "over 2 k-means seeds" in md
    with open(tmp_path / "clustering.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 * 3  # modes x truths x levels
    q = json.loads((world["chc"] / "quality.json").read_text())
    r = next(r for r in rows if r["mode"] == "image" and r["truth"] == "group" and r["level"] == "1")
    assert float(r["nmi"]) == pytest.approx(q["modes"]["image"]["levels"][1]["group"]["nmi"], abs=1e-6)
    assert (tmp_path / "clustering.png").stat().st_size > 1000
