"""Cross-modal hierarchical clustering on planted synthetic structure: 3 groups x 3 sub-groups in 16-D."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.cluster.hierarchy import cut_tree, linkage

from gram import cluster as C

DIM = 16


def planted(n_per: int = 30, s_img: float = 0.02, s_txt: float = 0.02, seed: int = 0, blind_img: int | None = None,
            blind_txt: int | None = None, noisy_sub: int | None = None, s_noisy: float = 0.0):
    """Pairs of 9 sub-groups (3 per group). A group is one axis (0..2, length 1), a sub-group adds its own axis
    (3..11, length 0.4), so groups are far apart and sub-groups of a group nearer. Image and text are two
    independently noisy views of the same signal. `blind_*`: that modality cannot see the sub-groups of that
    group (their offsets are dropped); `noisy_sub`: that sub-group gets extra noise `s_noisy` in both views."""
    rng = np.random.default_rng(seed)
    sub = np.repeat(np.arange(9), n_per)
    grp = sub // 3
    base = np.zeros((9, DIM))
    base[np.arange(9), np.arange(9) // 3] = 1.0
    off = np.zeros((9, DIM))
    off[np.arange(9), 3 + np.arange(9)] = 0.4
    off_i, off_t = off.copy(), off.copy()
    if blind_img is not None:
        off_i[3 * blind_img:3 * blind_img + 3] = 0.0
    if blind_txt is not None:
        off_t[3 * blind_txt:3 * blind_txt + 3] = 0.0
    s_i = np.full((len(sub), 1), s_img)
    s_t = np.full((len(sub), 1), s_txt)
    if noisy_sub is not None:
        s_i[sub == noisy_sub] = s_t[sub == noisy_sub] = s_noisy
    img = (base + off_i)[sub] + s_i * rng.standard_normal((len(sub), DIM))
    txt = (base + off_t)[sub] + s_t * rng.standard_normal((len(sub), DIM))
    return torch.from_numpy(img).float(), torch.from_numpy(txt).float(), grp, sub


def canon(labels) -> np.ndarray:
    """Relabel a partition by order of first appearance, so equal partitions compare equal."""
    _, first, inv = np.unique(np.asarray(labels).reshape(-1), return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inv]


def brute_purity(node_sets: list[set[int]], labels: np.ndarray) -> float:
    """Dendrogram purity from its definition: smallest node holding each same-class pair."""
    total, pairs = 0.0, 0
    for i, j in itertools.combinations(range(len(labels)), 2):
        if labels[i] != labels[j]:
            continue
        lca = min((s for s in node_sets if i in s and j in s), key=len)
        total += sum(labels[m] == labels[i] for m in lca) / len(lca)
        pairs += 1
    return total / pairs


def node_sets_of(z: np.ndarray, leaf_members: list[set[int]]) -> list[set[int]]:
    sets = list(leaf_members)
    for a, b in z[:, :2].astype(int):
        sets.append(sets[a] | sets[b])
    return sets


# ------------------------------------------------------------------------------------------------
def test_fuse_formula_and_ablations():
    img, txt, _, _ = planted(n_per=4)
    z = C.fuse(img, txt, weights=(2.0, 1.0))
    ref = F.normalize(2.0 * F.normalize(img, dim=-1) + 1.0 * F.normalize(txt, dim=-1), dim=-1)
    assert torch.equal(z, ref) and z.shape == img.shape
    assert torch.equal(C.fuse(img, txt, mode="image"), F.normalize(img, dim=-1))
    assert torch.equal(C.fuse(img, txt, mode="text"), F.normalize(txt, dim=-1))
    assert torch.allclose(C.fuse(img, txt, weights=(1.0, 0.0)), F.normalize(img, dim=-1), atol=1e-7)


def test_bad_inputs_raise_naming_the_shapes():
    img, txt, grp, _ = planted(n_per=4)  # N = 36
    with pytest.raises(ValueError, match=re.escape("img (5, 16) and txt (4, 16)")):
        C.fuse(torch.zeros(5, 16), torch.zeros(4, 16))
    with pytest.raises(ValueError, match=re.escape("img must be a matrix [N, D]; got shape (16,)")):
        C.fuse(torch.zeros(16), torch.zeros(16))
    with pytest.raises(ValueError, match="unknown mode"):
        C.fuse(img, txt, mode="both")
    with pytest.raises(ValueError, match=re.escape("k=40 must be between 1 and N for x of shape (36, 16)")):
        C.kmeans(img, 40)
    with pytest.raises(ValueError, match=re.escape("x must be a matrix [N, D]; got shape (2, 3, 4)")):
        C.kmeans(torch.zeros(2, 3, 4), 1)
    with pytest.raises(ValueError, match="level_sizes"):
        C.hierarchy(img, 6, [3, 4])
    h = C.hierarchy(C.fuse(img, txt), 6, [3])
    with pytest.raises(ValueError, match=re.escape("img (35, 16) and txt (35, 16) must both be [N=36, D]")):
        C.complexity(img[:35], txt[:35], h, 0)
    with pytest.raises(ValueError, match=re.escape("truth 'grp' has shape (35,)")):
        C.quality(h, {"grp": grp[:35]})
    with pytest.raises(ValueError, match=re.escape("labels (35,) and leaf assignments (36,)")):
        C.dendrogram_purity(h.linkage, grp[:35], h.levels[0])
    with pytest.raises(ValueError, match=re.escape("centroids must be [K, D] with K >= 2; got shape (1, 16)")):
        C.ward_linkage(np.zeros((1, 16)))


def test_kmeans_is_deterministic_and_recovers_planted_structure():
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    img, txt, _, sub = planted()
    z = C.fuse(img, txt)
    cen, a = C.kmeans(z, 9, seed=3)
    cen2, a2 = C.kmeans(z, 9, seed=3)
    assert torch.equal(cen, cen2) and torch.equal(a, a2)
    _, a_small = C.kmeans(z, 9, seed=3, batch_size=7)  # chunked assignment gives the same partition
    assert torch.equal(a, a_small)
    assert normalized_mutual_info_score(sub, a) > 0.9 and adjusted_rand_score(sub, a) == 1.0
    means = torch.stack([z[a == j].mean(0) for j in range(9)])  # centroids are the member means
    assert torch.allclose(cen, means, atol=1e-6)


def test_kmeans_fills_empty_clusters():
    x = torch.eye(4).repeat(5, 1)  # 4 distinct points, 5 copies each: k = 6 must empty clusters
    _, a = C.kmeans(x, 6, seed=0)
    assert torch.bincount(a, minlength=6).min() >= 1
    assign, dist = torch.tensor([0, 0, 0, 1]), torch.tensor([0.1, 0.5, 0.2, 0.9])
    C._fill_empty(assign, dist, 3)  # cluster 2 takes the farthest point of a cluster with >= 2 members
    assert assign.tolist() == [0, 2, 0, 1] and dist.tolist()[1] == 0.0


def test_kmeans_means_without_scatter_match():
    x, _, _, _ = planted(n_per=5)
    a = torch.arange(len(x)) % 4
    ref = C._means(x, a, 4, batch_size=8, scatter=True)
    assert torch.allclose(C._means(x, a, 4, batch_size=8, scatter=False), ref, atol=1e-6)  # the GPU path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kmeans_on_gpu_is_repeatable_and_agrees_with_cpu():
    img, txt, _, _ = planted()
    z = C.fuse(img, txt)
    cen, a = C.kmeans(z, 9, seed=3, device="cuda")
    cen2, a2 = C.kmeans(z, 9, seed=3, device="cuda")
    assert torch.equal(cen, cen2) and torch.equal(a, a2)
    assert torch.equal(a.cpu(), C.kmeans(z, 9, seed=3)[1])


def test_hierarchy_levels_are_complete_nested_and_sized():
    img, txt, _, _ = planted()
    z = C.fuse(img, txt)
    h = C.hierarchy(z, 12, [6, 3], seed=1)
    assert h.sizes == [12, 6, 3] and len(h.parents) == 2 and h.linkage.shape == (11, 4)
    for i, (lev, k) in enumerate(zip(h.levels, h.sizes)):
        assert lev.shape == (len(z),) and lev.dtype == np.int64  # one cluster per pair
        assert np.bincount(lev, minlength=k).min() >= 1 and lev.max() == k - 1
        ref = F.normalize(torch.stack([z[torch.from_numpy(lev == c)].double().mean(0) for c in range(k)]), dim=-1)
        assert np.allclose(h.centroids[i], ref.numpy(), atol=1e-6)
    for fine, coarse, par in zip(h.levels, h.levels[1:], h.parents):
        for c in range(par.shape[0]):
            assert np.unique(coarse[fine == c]).tolist() == [par[c]]  # members of a cluster share one parent
        assert np.array_equal(par[fine], coarse)


def test_ward_linkage_matches_scipy_unweighted_and_weighted():
    rng = np.random.default_rng(0)
    cen = rng.standard_normal((15, 5))
    z = C.ward_linkage(cen)
    ref = linkage(cen, "ward")
    assert np.array_equal(z[:, [0, 1, 3]], ref[:, [0, 1, 3]])
    np.testing.assert_allclose(z[:, 2], ref[:, 2], rtol=1e-12)
    # weighted: the same as scipy's Ward over the points with each centroid repeated `count` times
    counts = rng.integers(1, 5, size=15)
    zw = C.ward_linkage(cen, counts)
    rep = np.repeat(np.arange(15), counts)
    full = linkage(cen[rep], "ward")  # duplicates merge first, at height 0
    np.testing.assert_allclose(full[:len(rep) - 15, 2], 0.0, atol=1e-12)
    np.testing.assert_allclose(zw[:, 2], full[len(rep) - 15:, 2], rtol=1e-10)
    for s in range(1, 16):
        assert np.array_equal(canon(C.cut(zw, s)[rep]), canon(cut_tree(full, n_clusters=s)[:, 0]))
    assert not np.array_equal(canon(C.cut(zw, 4)), canon(C.cut(z, 4)))  # the weights do matter here


def test_cut_matches_scipy_cut_tree():
    cen = np.random.default_rng(1).standard_normal((20, 4))
    z = C.ward_linkage(cen, np.arange(1, 21))
    for s in range(1, 21):
        lab = C.cut(z, s)
        assert np.array_equal(canon(lab), canon(cut_tree(z, n_clusters=s)[:, 0]))
        assert lab.max() == s - 1 and np.array_equal(canon(lab), lab)  # numbered by smallest leaf


def test_quality_and_purity_are_perfect_on_clean_planted_data():
    img, txt, grp, sub = planted()
    h = C.hierarchy(C.fuse(img, txt), 9, [3], seed=0)
    q = C.quality(h, {"group": grp, "subgroup": sub})
    assert q[0]["subgroup"] == {"nmi": 1.0, "ari": 1.0}
    assert q[1]["group"] == {"nmi": 1.0, "ari": 1.0}
    assert q[1]["subgroup"]["nmi"] < 1.0
    assert C.dendrogram_purity(h, sub) == 1.0 and C.dendrogram_purity(h, grp) == 1.0


def test_dendrogram_purity_matches_brute_force():
    rng = np.random.default_rng(2)
    pts = rng.standard_normal((12, 3))  # points as leaves
    labels = rng.integers(0, 3, size=12)
    z = linkage(pts, "average")
    exact = C.dendrogram_purity(z, labels)
    assert exact == pytest.approx(brute_purity(node_sets_of(z, [{i} for i in range(12)]), labels), rel=1e-12)
    assert exact < 1.0
    leaf = rng.integers(0, 6, size=25)  # fine clusters as leaves: 25 points in 6 leaves
    leaf[:6] = np.arange(6)
    labels = rng.integers(0, 3, size=25)
    zf = linkage(rng.standard_normal((6, 3)), "ward")
    members = [set(np.flatnonzero(leaf == f).tolist()) for f in range(6)]
    got = C.dendrogram_purity(zf, labels, leaf)
    assert got == pytest.approx(brute_purity(node_sets_of(zf, members), labels), rel=1e-12)


def test_cross_modal_beats_a_noisy_or_blind_modality():
    def nmi(img, txt, mode, truth):
        h = C.hierarchy(C.fuse(img, txt, mode=mode), 9, [3], seed=0)
        return C.quality(h, {"t": truth})[0]["t"]

    # image noise per axis 0.25 (norm 1.0, beyond the sub-group spacing 0.57); fusing halves it
    img, txt, _, sub = planted(s_img=0.25)
    assert nmi(img, txt, "cross-modal", sub)["nmi"] > nmi(img, txt, "image", sub)["nmi"] + 0.2
    # each modality is blind to the sub-groups of one group: alone it cannot reach 9 sub-groups, together exact
    img, txt, _, sub = planted(blind_img=0, blind_txt=1)
    assert nmi(img, txt, "cross-modal", sub)["ari"] == 1.0
    assert nmi(img, txt, "image", sub)["nmi"] < 0.9 and nmi(img, txt, "text", sub)["nmi"] < 0.9


def test_complexity_components_against_references():
    img, txt, _, sub = planted(n_per=20, seed=4)
    z = C.fuse(img, txt)
    h = C.hierarchy(z, 9, [3], seed=0)
    score, parts = C.complexity(img, txt, h, 1, sample=1000)
    assert score.shape == (3,) and score.min() >= 0.0 and score.max() <= 1.0
    for c in range(3):
        m = torch.from_numpy(h.levels[1] == c)
        spread = (1.0 - z[m].double() @ torch.from_numpy(h.centroids[1][c]).double()).mean().item()
        assert parts["spread"][c] == pytest.approx(spread, abs=1e-6)
        di = (1.0 - F.normalize(img[m].double(), dim=-1) @ F.normalize(img[m].double(), dim=-1).T).numpy()
        dt = (1.0 - F.normalize(txt[m].double(), dim=-1) @ F.normalize(txt[m].double(), dim=-1).T).numpy()
        iu = np.triu_indices(int(m.sum()), 1)
        assert parts["disagreement"][c] == pytest.approx(1.0 - np.corrcoef(di[iu], dt[iu])[0, 1], abs=1e-12)
    assert np.array_equal(parts["children"], np.bincount(h.parents[0], minlength=3))
    expected = sum(C.COMPLEXITY_WEIGHTS[k] * C.minmax(parts[k]) for k in parts) / sum(C.COMPLEXITY_WEIGHTS.values())
    np.testing.assert_allclose(score, expected, rtol=0, atol=1e-15)
    _, same = C.complexity(img, img, h, 0)  # identical modalities never disagree
    assert np.abs(same["disagreement"]).max() < 1e-12
    assert C.disagreement(np.eye(3)[:2], np.eye(3)[:2]) == 0.0  # fewer than three members


def test_complexity_is_higher_for_a_more_diverse_cluster():
    img, txt, grp, sub = planted(noisy_sub=4, s_noisy=0.1)  # sub-group 4 (group 1) spread out in both views
    h = C.hierarchy(C.fuse(img, txt), 9, [3], seed=0)
    assert C.quality(h, {"s": sub})[0]["s"]["ari"] == 1.0  # still recovered, so clusters are comparable
    for level, truth, diverse in [(0, sub, 4), (1, grp, 1)]:
        score, parts = C.complexity(img, txt, h, level)
        c = np.bincount(h.levels[level][truth == diverse]).argmax()  # the cluster holding the diverse one
        assert score.argmax() == c and parts["spread"].argmax() == c
        others = np.delete(np.arange(len(score)), c)
        assert score[c] > score[others].max()
    # within a group the sub-group layout is shared by both views, the extra noise is not: lower agreement.
    # (Within one sub-group both views are the signal plus independent noise: ~1 everywhere, no signal.)
    assert parts["disagreement"].argmax() == c


def test_hierarchy_round_trips_through_safetensors():
    from safetensors.torch import load, save

    img, txt, _, _ = planted(n_per=5)
    h = C.hierarchy(C.fuse(img, txt), 6, [4, 2], seed=0)
    back = C.Hierarchy.from_dict(load(save(h.to_dict())))
    assert back.sizes == h.sizes and np.array_equal(back.linkage, h.linkage)
    for a, b in zip(h.levels + h.parents + h.centroids, back.levels + back.parents + back.centroids):
        assert np.array_equal(a, b) and a.dtype == b.dtype
    with pytest.raises(ValueError, match="missing"):
        C.Hierarchy.from_dict({"level0.assign": torch.zeros(3, dtype=torch.long)})


def test_kmeans_seeding_from_a_sample():
    img, txt, _, _ = planted()
    z = C.fuse(img, txt)
    full = C.kmeans(z, 9, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(full, C.kmeans(z, 9, seed=3, seed_sample=len(z))))  # all = off
    cen, a = C.kmeans(z, 9, seed=3, seed_sample=40)
    cen2, a2 = C.kmeans(z, 9, seed=3, seed_sample=40)
    assert torch.equal(cen, cen2) and torch.equal(a, a2)  # deterministic
    assert np.bincount(a.numpy(), minlength=9).min() >= 1
    with pytest.raises(ValueError, match="seed_sample=5 must be at least k=9"):
        C.kmeans(z, 9, seed_sample=5)
