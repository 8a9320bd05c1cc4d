"""Cluster stage (library part): Cross-Modal Hierarchical Clustering and structure complexity. [abstract/ours]

The GRAM abstracts say only that a cross-modal hierarchical clustering (CHC) organises the image-text
pre-training pairs and that a structure-complexity-informed strategy builds tasks and prototypes
from it [abstract]. Everything below is our reconstruction (method-notes §1) [ours]:

- `fuse(img, txt)`: one feature per pair, z = normalize(w_i·normalize(img) + w_t·normalize(txt)) [N, D];
  modes "image" and "text" are the single-modality ablations.
- `kmeans(x, k)`: Lloyd's k-means in torch, squared euclidean distance, centroids are plain means of
  their members (not renormalised), so every step lowers the within-cluster sum of squares (SSE). On
  unit vectors ‖x − c‖² = 1 + ‖c‖² − 2x·c, so this is cosine-like but keeps Lloyd's guarantee.
  Greedy k-means++ seeding from a `torch.Generator`, assignments in chunks of `batch_size` rows (so
  1M x 512 needs only the [batch, k] score block beside the data), an emptied cluster takes the point
  farthest from its centroid among clusters of two or more, stop when no assignment changes.
- `hierarchy(z, fine_k, level_sizes)`: level 0 = k-means with `fine_k` clusters; coarser levels =
  Ward agglomeration of the fine clusters cut at each size. Ward is weighted by cluster size, exactly:
  the merge cost of clusters A, B is ΔSSE = |A||B|/(|A|+|B|)·‖μ_A − μ_B‖², which needs only sizes and
  means, so agglomerating the k-means centroids with their sizes gives the same tree as Ward over all
  points started from the k-means partition (`ward_linkage`; scipy's `linkage` has no weights).
  Cutting one merge sequence at several sizes makes the levels nest by construction.
- `complexity(img, txt, h, level)`: per cluster, spread (mean cosine distance of members to the
  cluster's centroid in the fused space), cross-modal disagreement (1 − Pearson correlation of the
  members' pairwise image distances with their pairwise text distances, on at most `sample` members),
  and branching (number of sub-clusters one level finer); each min-max normalised over the clusters
  of the level and averaged with `COMPLEXITY_WEIGHTS`.
- `quality(h, truth)`: NMI and ARI of every level against every ground-truth labelling;
  `dendrogram_purity(tree, labels)`: the standard dendrogram purity, exact, with the fine clusters as
  leaves.

Level order: `levels[0]` is the finest (k-means) level, `levels[i + 1]` is coarser than `levels[i]`.
All outputs are numpy on the host except `fuse` and `kmeans`, which stay in torch on their device.

The stage (`gram cluster`) reads the embed stage's output (the domains of `data.vendors.meta`, in
order), optionally drops the pairs of lowest image-text cosine (`filter_quantile`), clusters the rest
in `cluster.mode` and writes into its output directory:
  hierarchy.safetensors  `level{i}.assign|parent|centroids|complexity|spread|disagreement|children`,
                         `linkage`, and `rows` (kept rows of the concatenated embeddings);
  keys.txt               the pair id (`<domain>/<sample key>`) of every hierarchy row;
  clusters.csv           one row per (level, cluster): size, parent, complexity and its parts, and the
                         majority ground-truth label and its share when `cluster.truth` is set;
  quality.json           with ground truth: NMI/ARI per level and dendrogram purity, mean and std over
                         `quality_seeds` k-means seeds, for `mode` and every mode of `cluster.ablations`
                         (whose trees, of seed `seed`, go to hierarchy-<mode>.safetensors);
  cluster.json           pairs, filter count, device, time per mode.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from gram.backbone import resolve_device
from gram.data.shards import iter_samples, shard_paths
from gram.embed import load_embeddings
from gram.io import atomic_dir, write_json, write_manifest, write_text
from gram.stage import stage_parser, stage_setup
from gram.tensorio import load_tensors, save_tensors

log = logging.getLogger("gram.cluster")

MODES = ("cross-modal", "image", "text")
# [ours] spread is the quantity method-notes §1 names; disagreement and branching refine it.
COMPLEXITY_WEIGHTS = {"spread": 0.5, "disagreement": 0.25, "children": 0.25}
FLAT = 1.0e-6  # std of a cluster's pairwise cosine distances below which a modality is taken as flat


def _as_matrix(x, name: str) -> torch.Tensor:
    """A float tensor [N, D] from a tensor or array, or a ValueError naming the shape."""
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be a matrix [N, D]; got shape {tuple(t.shape)}")
    return t if t.is_floating_point() else t.float()


# ------------------------------------------------------------------------------------------------
# fusion
# ------------------------------------------------------------------------------------------------
def fuse(img, txt, weights: Sequence[float] = (1.0, 1.0), mode: str = "cross-modal") -> torch.Tensor:
    """One unit-norm feature per image-text pair.

    Args:
        img, txt: image and text embeddings [N, D] (normalised here, so raw features are fine).
        weights: (w_image, w_text) of the cross-modal sum, non-negative, not both zero.
        mode: "cross-modal", or "image" / "text" for the single-modality ablations.
    Returns:
        z [N, D], float, unit rows, on the inputs' device.
    """
    img, txt = _as_matrix(img, "img"), _as_matrix(txt, "txt")
    if img.shape != txt.shape:
        raise ValueError(f"img {tuple(img.shape)} and txt {tuple(txt.shape)} must have the same shape [N, D]")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
    if mode == "image":
        return F.normalize(img, dim=-1)
    if mode == "text":
        return F.normalize(txt, dim=-1)
    if len(weights) != 2:
        raise ValueError(f"weights must be (w_image, w_text); got {tuple(weights)}")
    w_i, w_t = (float(w) for w in weights)
    if w_i < 0 or w_t < 0 or w_i + w_t == 0:
        raise ValueError(f"weights must be non-negative and not both zero; got {(w_i, w_t)}")
    return F.normalize(w_i * F.normalize(img, dim=-1) + w_t * F.normalize(txt, dim=-1), dim=-1)  # [N, D]


# ------------------------------------------------------------------------------------------------
# k-means
# ------------------------------------------------------------------------------------------------
def _sqdist(x: torch.Tensor, sq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared euclidean distances [N, M] of rows x [N, D] (squared norms sq [N]) to c [M, D]."""
    return torch.addmm((c * c).sum(1)[None], x, c.T, alpha=-2.0).add_(sq[:, None]).clamp_(min=0.0)


def _seed_pp(x: torch.Tensor, sq: torch.Tensor, k: int, gen: torch.Generator, trials: int) -> torch.Tensor:
    """Greedy k-means++: of `trials` D²-sampled candidates, keep the one that lowers the potential most."""
    n = x.shape[0]
    first = torch.randint(n, (1,), generator=gen).to(x.device)
    chosen = [first]
    d2 = _sqdist(x, sq, x[first])[:, 0]  # [N], squared distance to the nearest chosen centre
    for _ in range(1, k):
        u = torch.rand(trials, generator=gen, dtype=torch.float64).to(x.device)  # [T]
        cdf = torch.cumsum(d2.double(), 0)  # [N]; float64 so that 1M small terms still add up
        cand = torch.searchsorted(cdf, u * cdf[-1], right=True).clamp_(max=n - 1)  # [T]
        dc = torch.minimum(d2[:, None], _sqdist(x, sq, x[cand]))  # [N, T]
        best = dc.sum(0).argmin()
        chosen.append(cand[best][None])
        d2 = dc[:, best]
    return x[torch.cat(chosen)].clone()  # [k, D]


def _assign(x: torch.Tensor, sq: torch.Tensor, c: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid [N] and its squared distance [N], `batch_size` rows at a time."""
    assign = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for s in range(0, x.shape[0], batch_size):
        d = _sqdist(x[s:s + batch_size], sq[s:s + batch_size], c)  # [B, k]
        a = d.argmin(1)  # first index on ties
        assign[s:s + batch_size] = a
        dist[s:s + batch_size] = d.gather(1, a[:, None])[:, 0]
    return assign, dist


def _fill_empty(assign: torch.Tensor, dist: torch.Tensor, k: int) -> None:
    """Give every empty cluster, in id order, the farthest point of a cluster that has two or more (in place)."""
    counts = torch.bincount(assign, minlength=k)  # [k]
    for j in torch.nonzero(counts == 0).flatten().tolist():
        donor = counts[assign] > 1  # [N]
        p = torch.where(donor, dist, torch.full_like(dist, -math.inf)).argmax()
        counts[assign[p]] -= 1
        counts[j] = 1
        assign[p] = j
        dist[p] = 0.0


def _means(x: torch.Tensor, assign: torch.Tensor, k: int, batch_size: int, scatter: bool | None = None) -> torch.Tensor:
    """Member means [k, D] (every cluster non-empty); `scatter` (default: on the CPU) sums with index_add_."""
    counts = torch.bincount(assign, minlength=k).to(x.dtype)  # [k]
    if scatter is None:
        scatter = x.device.type == "cpu"
    if scatter:
        sums = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, assign, x)  # [k, D]
    else:
        # one-hot products instead of index_add_, whose float atomics would make GPU runs non-repeatable
        sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
        for s in range(0, x.shape[0], batch_size):
            onehot = F.one_hot(assign[s:s + batch_size], k).to(x.dtype)  # [B, k]
            sums += onehot.T @ x[s:s + batch_size]
    return sums / counts.clamp(min=1)[:, None]


def kmeans(x, k: int, iters: int = 50, seed: int = 0, device: str | torch.device = "cpu",
           batch_size: int = 16384, trials: int | None = None,
           seed_sample: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with squared euclidean distance; deterministic for a seed on a given device.

    Args:
        x: points [N, D] (for CHC, the unit-norm fused features).
        k: number of clusters, 1 <= k <= N.
        iters: at most this many centroid updates; stops early when no assignment changes.
        batch_size: rows per block of the [batch, k] distance computation.
        trials: candidates per k-means++ step (default 2 + ln k, the usual greedy choice).
        seed_sample: seed from this many points drawn at random (0 or >= N: all points). Greedy
            k-means++ makes k sequential passes over its points, the dominant cost at millions of
            points; Lloyd's iterations then run on all of them.
    Returns:
        centroids [k, D] float32 (means of their members, not renormalised) and assignments [N] int64,
        both on `device`; every cluster has at least one member.
    """
    x = _as_matrix(x, "x").to(device=device, dtype=torch.float32)  # [N, D]
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and N for x of shape {tuple(x.shape)}")
    if iters < 1 or batch_size < 1:
        raise ValueError(f"iters ({iters}) and batch_size ({batch_size}) must be positive")
    gen = torch.Generator().manual_seed(seed)
    sq = (x * x).sum(1)  # [N]
    if 0 < seed_sample < n:
        if seed_sample < k:
            raise ValueError(f"seed_sample={seed_sample} must be at least k={k}")
        idx = torch.randperm(n, generator=gen)[:seed_sample].to(x.device)
        centroids = _seed_pp(x[idx], sq[idx], k, gen, trials or 2 + int(math.log(k)))  # [k, D]
    else:
        centroids = _seed_pp(x, sq, k, gen, trials or 2 + int(math.log(k)))  # [k, D]
    assign, dist = _assign(x, sq, centroids, batch_size)
    _fill_empty(assign, dist, k)
    for _ in range(iters):
        centroids = _means(x, assign, k, batch_size)
        new, dist = _assign(x, sq, centroids, batch_size)
        _fill_empty(new, dist, k)
        if torch.equal(new, assign):
            return centroids, assign
        assign = new
    return _means(x, assign, k, batch_size), assign


# ------------------------------------------------------------------------------------------------
# Ward agglomeration of the fine clusters
# ------------------------------------------------------------------------------------------------
def ward_linkage(centroids: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """Ward's agglomeration of weighted points, as a scipy linkage matrix.

    The merge height of clusters A and B is sqrt(2·|A||B|/(|A|+|B|))·‖μ_A − μ_B‖, scipy's Ward height
    (with all counts 1 this is `scipy.cluster.hierarchy.linkage(centroids, "ward")`). Nearest-neighbour
    chain with the Lance-Williams update: O(K²) time, one K x K float64 matrix.

    Args:
        centroids: [K, D] cluster means; counts: [K] positive sizes (None: all 1).
    Returns:
        Z [K − 1, 4]: merged ids (leaves 0..K−1, merge i creates id K + i), height, number of leaves.
    """
    from scipy.spatial.distance import pdist, squareform

    c = np.asarray(centroids, dtype=np.float64)
    if c.ndim != 2 or len(c) < 2:
        raise ValueError(f"centroids must be [K, D] with K >= 2; got shape {c.shape}")
    k = len(c)
    w = np.ones(k) if counts is None else np.asarray(counts, dtype=np.float64)
    if w.shape != (k,) or (w <= 0).any():
        raise ValueError(f"counts must be [K] positive for centroids {c.shape}; got shape {w.shape}")
    d2 = squareform(pdist(c, "sqeuclidean")) * (2.0 * np.outer(w, w) / np.add.outer(w, w))  # [K, K]
    np.fill_diagonal(d2, np.inf)
    size, leaves, top = w.copy(), np.ones(k), np.zeros(k)  # per slot: weight, leaf count, height
    alive = np.ones(k, bool)
    merges = []  # (slot a, slot b, height, leaves); the merged cluster lives on in slot b
    chain: list[int] = []
    for _ in range(k - 1):
        if not chain:
            chain = [int(np.flatnonzero(alive)[0])]
        while True:
            x = chain[-1]
            y = int(np.argmin(d2[x]))
            if len(chain) > 1 and d2[x, chain[-2]] <= d2[x, y]:
                y = chain[-2]  # prefer the previous link on ties, so the chain always closes
            if len(chain) > 1 and y == chain[-2]:
                break
            chain.append(y)
        b, a = chain.pop(), chain.pop()
        h2 = d2[a, b]
        na, nb = size[a], size[b]
        new = ((na + size) * d2[a] + (nb + size) * d2[b] - size * h2) / (na + nb + size)  # [K]
        d2[b], d2[:, b] = new, new
        d2[a], d2[:, a] = np.inf, np.inf
        d2[b, b] = np.inf
        alive[a] = False
        size[b], leaves[b] = na + nb, leaves[a] + leaves[b]
        # Ward is reducible, so heights never fall along a branch; max() only absorbs rounding
        top[b] = max(math.sqrt(max(h2, 0.0)), top[a], top[b])
        merges.append((a, b, top[b], leaves[b]))
    z = np.zeros((k - 1, 4))
    node = np.arange(k)  # current cluster id held by each slot
    for i, m in enumerate(sorted(range(k - 1), key=lambda m: merges[m][2])):  # stable: parents after children
        a, b, h, n = merges[m]
        z[i] = (min(node[a], node[b]), max(node[a], node[b]), h, n)
        node[b] = k + i
    return z


def cut(linkage: np.ndarray, n_clusters: int) -> np.ndarray:
    """Leaf labels [K] after the first K − n_clusters merges: exactly n_clusters clusters, numbered in the
    order of their smallest leaf."""
    k = len(linkage) + 1
    if not 1 <= n_clusters <= k:
        raise ValueError(f"n_clusters={n_clusters} must be between 1 and {k} (linkage {linkage.shape})")
    up = np.arange(2 * k - 1)
    ids = linkage[:k - n_clusters, :2].astype(np.int64)  # [M, 2]
    up[ids[:, 0]] = up[ids[:, 1]] = k + np.arange(len(ids))
    while True:  # pointer jumping to the root of every node
        nxt = up[up]
        if np.array_equal(nxt, up):
            break
        up = nxt
    _, first, inv = np.unique(up[:k], return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inv]


# ------------------------------------------------------------------------------------------------
# the hierarchy
# ------------------------------------------------------------------------------------------------
@dataclass
class Hierarchy:
    """Nested clusterings of N pairs. Level 0 is the finest (k-means); level i + 1 is coarser than level i.

    levels[i]: [N] int64, the cluster of every pair at level i (ids 0..sizes[i]−1, all used).
    parents[i]: [sizes[i]] int64, the level-(i+1) cluster containing each level-i cluster (len = levels − 1).
    centroids[i]: [sizes[i], D] float32, the normalised mean of the members' fused features.
    linkage: [fine_k − 1, 4] float64, scipy linkage over the level-0 clusters (the leaves).
    """

    levels: list[np.ndarray]
    parents: list[np.ndarray]
    centroids: list[np.ndarray]
    linkage: np.ndarray

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.centroids]

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Flat name -> contiguous tensor, ready for `safetensors.torch.save_file`."""
        out = {"linkage": torch.from_numpy(np.array(self.linkage, dtype=np.float64))}
        for i, (lev, cen) in enumerate(zip(self.levels, self.centroids)):
            out[f"level{i}.assign"] = torch.from_numpy(np.array(lev, dtype=np.int64))
            out[f"level{i}.centroids"] = torch.from_numpy(np.array(cen, dtype=np.float32))
        for i, par in enumerate(self.parents):
            out[f"level{i}.parent"] = torch.from_numpy(np.array(par, dtype=np.int64))
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, torch.Tensor]) -> Hierarchy:
        n = sum(1 for key in d if key.endswith(".assign"))
        try:
            return cls(levels=[d[f"level{i}.assign"].numpy() for i in range(n)],
                       parents=[d[f"level{i}.parent"].numpy() for i in range(n - 1)],
                       centroids=[d[f"level{i}.centroids"].numpy() for i in range(n)],
                       linkage=d["linkage"].numpy())
        except KeyError as e:
            raise ValueError(f"not a saved Hierarchy: missing {e}") from None


def hierarchy(z, fine_k: int, level_sizes: Sequence[int] = (), seed: int = 0, iters: int = 50,
              device: str | torch.device = "cpu", batch_size: int = 16384, weighted: bool = True,
              seed_sample: int = 0) -> Hierarchy:
    """Cross-modal hierarchical clustering of fused features.

    Args:
        z: fused unit features [N, D] (see `fuse`).
        fine_k: clusters of the finest level (k-means), 2 <= fine_k <= N.
        level_sizes: cluster counts of the coarser levels, strictly decreasing, each below fine_k.
        weighted: Ward weighted by the fine clusters' sizes (exact, `ward_linkage`); False: scipy's
            Ward over the bare centroids, every fine cluster counting as one point.
    Returns:
        Hierarchy with 1 + len(level_sizes) levels, finest first.
    """
    from scipy.cluster.hierarchy import linkage as scipy_linkage

    z = _as_matrix(z, "z")
    sizes = [int(s) for s in level_sizes]
    if not 2 <= fine_k <= z.shape[0]:
        raise ValueError(f"fine_k={fine_k} must be between 2 and N for z of shape {tuple(z.shape)}")
    if any(not 1 <= s < fine_k for s in sizes) or any(a <= b for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"level_sizes {sizes} must decrease strictly and lie in [1, fine_k={fine_k})")
    cent, assign = kmeans(z, fine_k, iters=iters, seed=seed, device=device, batch_size=batch_size,
                          seed_sample=seed_sample)
    cent, assign = cent.double().cpu().numpy(), assign.cpu().numpy()  # [K, D], [N]
    counts = np.bincount(assign, minlength=fine_k)  # [K], all >= 1
    link = ward_linkage(cent, counts) if weighted else scipy_linkage(cent, "ward")
    leaf_labels = [np.arange(fine_k)] + [cut(link, s) for s in sizes]  # per level: fine cluster -> id
    sums = cent * counts[:, None]  # [K, D], member sums of the fine clusters
    centroids = []
    for lab in leaf_labels:
        acc = np.zeros((lab.max() + 1, sums.shape[1]))
        np.add.at(acc, lab, sums)
        centroids.append(F.normalize(torch.from_numpy(acc), dim=-1).float().numpy())
    parents = []
    for fine, coarse in zip(leaf_labels, leaf_labels[1:]):
        par = np.zeros(fine.max() + 1, np.int64)
        par[fine] = coarse
        if not np.array_equal(par[fine], coarse):
            raise AssertionError("levels do not nest")  # impossible for cuts of one merge sequence
        parents.append(par)
    return Hierarchy(levels=[lab[assign] for lab in leaf_labels], parents=parents, centroids=centroids,
                     linkage=link)


# ------------------------------------------------------------------------------------------------
# structure complexity
# ------------------------------------------------------------------------------------------------
def minmax(v: np.ndarray) -> np.ndarray:
    """(v − min) / (max − min) over the clusters; all zeros when v is constant."""
    v = np.asarray(v, dtype=np.float64)
    span = v.max() - v.min()
    return (v - v.min()) / span if span > 0 else np.zeros_like(v)


def disagreement(img: np.ndarray, txt: np.ndarray) -> float:
    """1 − Pearson r between the pairwise cosine distances of the same members in image and text space.

    0: the two modalities order the members' distances alike; 1: unrelated; 2: opposite. Fewer than
    three members, or both modalities flat (distance std < FLAT), give 0; one flat modality gives 1.

    Args:
        img, txt: unit rows [M, D] of the same M members.
    """
    m = len(img)
    if m < 3:
        return 0.0
    iu = np.triu_indices(m, 1)
    di, dt = (1.0 - img @ img.T)[iu], (1.0 - txt @ txt.T)[iu]  # [M(M−1)/2]
    flat_i, flat_t = di.std() < FLAT, dt.std() < FLAT
    if flat_i or flat_t:
        return 0.0 if flat_i and flat_t else 1.0
    return float(1.0 - np.corrcoef(di, dt)[0, 1])


def complexity(img, txt, h: Hierarchy, level: int, weights: Mapping[str, float] | None = None,
               fuse_weights: Sequence[float] = (1.0, 1.0), mode: str = "cross-modal", sample: int = 64,
               seed: int = 0, batch_size: int = 65536) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Structure complexity of every cluster of one level.

    Components, per cluster C (raw values are returned):
      spread: mean over members of 1 − cos(z_i, ĉ), ĉ the normalised member mean in the fused space
        (computed as 1 − ‖mean z_i‖, which is the same for unit z_i); z = fuse(img, txt, fuse_weights, mode),
        so pass the settings the hierarchy was built with.
      disagreement: `disagreement` on a seeded random sample of at most `sample` members (all if fewer).
      children: number of clusters of level − 1 inside C; at level 0 (no finer level) it is left out.
    Each is min-max normalised over the clusters of the level; the score is their weighted mean.

    Args:
        img, txt: embeddings [N, D] of the pairs the hierarchy was built on.
        weights: name -> weight (default COMPLEXITY_WEIGHTS), non-negative.
    Returns:
        score [n_clusters] in [0, 1], and the raw components {name: [n_clusters]}.
    """
    img, txt = _as_matrix(img, "img"), _as_matrix(txt, "txt")
    n = len(h.levels[0])
    if img.shape != txt.shape or img.shape[0] != n:
        raise ValueError(f"img {tuple(img.shape)} and txt {tuple(txt.shape)} must both be [N={n}, D]")
    if not 0 <= level < len(h.levels):
        raise ValueError(f"level {level} out of range for a hierarchy with {len(h.levels)} levels")
    w = dict(COMPLEXITY_WEIGHTS if weights is None else weights)
    if set(w) != set(COMPLEXITY_WEIGHTS) or any(v < 0 for v in w.values()):
        raise ValueError(f"weights must give non-negative {sorted(COMPLEXITY_WEIGHTS)}; got {w}")
    lab = np.asarray(h.levels[level])
    n_c = h.sizes[level]
    lab_t = torch.from_numpy(lab).long()

    sums = torch.zeros(n_c, img.shape[1], dtype=torch.float64)  # [C, D]
    for s in range(0, n, batch_size):
        zs = fuse(img[s:s + batch_size], txt[s:s + batch_size], fuse_weights, mode)  # [B, D]
        sums.index_add_(0, lab_t[s:s + batch_size], zs.to("cpu", torch.float64))
    counts = np.bincount(lab, minlength=n_c)  # [C]
    spread = 1.0 - (sums.norm(dim=1).numpy() / counts)

    rng = np.random.default_rng(seed)
    order = np.argsort(lab, kind="stable")
    ends = np.cumsum(counts)
    dis = np.zeros(n_c)
    for c in range(n_c):
        members = order[ends[c] - counts[c]:ends[c]]
        if len(members) > sample:
            members = np.sort(rng.choice(members, sample, replace=False))
        idx = torch.from_numpy(members)
        mi = F.normalize(img[idx].to("cpu", torch.float64), dim=-1).numpy()  # [M, D]
        mt = F.normalize(txt[idx].to("cpu", torch.float64), dim=-1).numpy()
        dis[c] = disagreement(mi, mt)

    children = (np.bincount(h.parents[level - 1], minlength=n_c) if level > 0 else np.ones(n_c)).astype(float)
    parts = {"spread": spread, "disagreement": dis, "children": children}
    used = [name for name in parts if level > 0 or name != "children"]
    total = sum(w[name] for name in used)
    if total <= 0:
        raise ValueError(f"weights {w} give nothing to combine at level {level}")
    score = sum(w[name] * minmax(parts[name]) for name in used) / total
    return score, parts


# ------------------------------------------------------------------------------------------------
# quality against ground truth
# ------------------------------------------------------------------------------------------------
def quality(h: Hierarchy, truth: Mapping[str, np.ndarray]) -> list[dict[str, dict[str, float]]]:
    """NMI (arithmetic normalisation) and ARI of every level against every ground-truth labelling.

    Returns:
        one dict per level (same order as h.levels): {truth name: {"nmi": ..., "ari": ...}}.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    n = len(h.levels[0])
    truth = {name: np.asarray(lab) for name, lab in truth.items()}
    for name, lab in truth.items():
        if lab.shape != (n,):
            raise ValueError(f"truth {name!r} has shape {lab.shape}; the hierarchy has N={n} pairs")
    return [{name: {"nmi": float(normalized_mutual_info_score(lab, lev)), "ari": float(adjusted_rand_score(lab, lev))}
             for name, lab in truth.items()} for lev in h.levels]


def dendrogram_purity(tree: Hierarchy | np.ndarray, labels, assign: np.ndarray | None = None) -> float:
    """Dendrogram purity: over all unordered pairs of points of the same class, the mean purity (share of
    that class) of the smallest subtree holding both.

    The leaves are the fine clusters: two points of one fine cluster meet in that leaf. Exact in
    O(K·C) with per-node class counts (K leaves, C classes): the same-class pairs that first meet at a
    node with children A, B number Σ_c n_A[c]·n_B[c], and Σ_c C(n_L[c], 2) inside a leaf L.

    Args:
        tree: a Hierarchy (its linkage, with levels[0] as the leaf of every point), or a scipy linkage
            matrix [K − 1, 4] with `assign` [N] (leaf of every point; None: the points are the leaves).
        labels: [N] class of every point.
    """
    if isinstance(tree, Hierarchy):
        if assign is not None:
            raise ValueError("assign comes from the Hierarchy; pass a linkage matrix to give your own")
        link, assign = np.asarray(tree.linkage), np.asarray(tree.levels[0])
    else:
        link = np.asarray(tree)
    if link.ndim != 2 or link.shape[1] != 4:
        raise ValueError(f"linkage must be [K - 1, 4]; got shape {link.shape}")
    k = len(link) + 1
    _, y = np.unique(np.asarray(labels), return_inverse=True)
    y = y.reshape(-1)
    leaf = np.arange(len(y)) if assign is None else np.asarray(assign).reshape(-1)
    if leaf.shape != y.shape or leaf.min() < 0 or leaf.max() >= k:
        raise ValueError(f"labels {np.shape(labels)} and leaf assignments {leaf.shape} must be [N] with leaves in "
                         f"[0, {k}) for linkage {link.shape}")
    n_cls = y.max() + 1
    counts: list[np.ndarray | None] = list(np.bincount(leaf * n_cls + y, minlength=k * n_cls).reshape(k, n_cls))
    total = 0.0
    for cnt in counts:  # pairs inside a leaf: purity of the leaf
        total += float((cnt * (cnt - 1) / 2 * cnt).sum() / max(cnt.sum(), 1))
    for a, b in link[:, :2].astype(np.int64):
        ca, cb = counts[a], counts[b]
        node = ca + cb
        counts.append(node)
        counts[a] = counts[b] = None
        total += float((ca * cb * node).sum() / max(node.sum(), 1))
    cls = np.bincount(y)
    pairs = float((cls * (cls - 1) / 2).sum())
    if pairs == 0:
        raise ValueError("dendrogram purity needs two points of one class")
    return total / pairs


# ------------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------------
HIERARCHY = "hierarchy.safetensors"  # the main mode's tree, assignments, complexity, kept rows
KEYS = "keys.txt"  # one pair id (`<domain>/<sample key>`) per hierarchy row


def load_corpus(embed_dir: str | Path, domains: Sequence[str]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(ids, image [N, E], text [N, E]) of the embedded corpus, domains in the given order.

    Pair ids are `<domain>/<sample key>`, unique across domains."""
    ids, imgs, txts = [], [], []
    for d in domains:
        keys, img, txt = load_embeddings(Path(embed_dir) / d)
        ids += [f"{d}/{k}" for k in keys]
        imgs.append(img)
        txts.append(txt)
    if not ids:
        raise ValueError(f"{embed_dir}: the corpus of {list(domains)} has no pairs")
    return ids, torch.cat(imgs), torch.cat(txts)


def read_truth(data_dir: str | Path, ids: Sequence[str], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Ground-truth labellings of the pairs `ids` from the `json` of their shard samples.

    Raises ValueError naming the shard and key when a sample lacks one of `names`."""
    wanted = {}
    for i, pid in enumerate(ids):
        wanted.setdefault(pid.split("/", 1)[0], {})[pid.split("/", 1)[1]] = i
    out = {n: np.empty(len(ids), dtype=object) for n in names}
    seen = 0
    for domain, rows in wanted.items():
        for path in shard_paths(Path(data_dir) / "shards" / domain):
            for s in iter_samples([path]):
                row = rows.get(s["__key__"])
                if row is None:
                    continue
                meta = json.loads(s.get("json", b"{}"))
                for n in names:
                    if n not in meta:
                        raise ValueError(f"{path}: sample {s['__key__']} has no {n!r} in its json "
                                         f"(cluster.truth names it)")
                    out[n][row] = str(meta[n])
                seen += 1
    if seen != len(ids):
        raise ValueError(f"{data_dir}: {len(ids) - seen} embedded pairs were not found in the shards "
                         "(are the embeddings stale?)")
    return out


def filter_pairs(img: torch.Tensor, txt: torch.Tensor, quantile: float, batch_size: int = 65536) -> np.ndarray:
    """Rows kept by the low-similarity filter: all but the floor(q·N) pairs of lowest image-text cosine
    (ties broken by row order), in row order. Computed in row blocks (no copy of the corpus)."""
    n = img.shape[0]
    drop = int(math.floor(quantile * n))
    if drop == 0:
        return np.arange(n)
    cos = np.concatenate([(F.normalize(img[s:s + batch_size].double(), dim=-1)
                           * F.normalize(txt[s:s + batch_size].double(), dim=-1)).sum(1).numpy()
                          for s in range(0, n, batch_size)])  # [N]
    order = np.argsort(cos, kind="stable")
    return np.sort(order[drop:])


def cluster_table(h: Hierarchy, scores: list[np.ndarray], parts: list[dict[str, np.ndarray]],
                  truth: Mapping[str, np.ndarray]) -> list[dict]:
    """One row per (level, cluster): size, parent, complexity and its parts, and for each ground truth
    the majority label and its share of the cluster."""
    codes = {name: np.unique(y, return_inverse=True) for name, y in truth.items()}  # name: (classes, [N] ids)
    rows = []
    for lev, lab in enumerate(h.levels):
        k = h.sizes[lev]
        counts = np.bincount(lab, minlength=k)
        majority = {}
        for name, (classes, y) in codes.items():  # [k, classes] contingency table, one pass over the pairs
            table = np.bincount(lab * len(classes) + y.reshape(-1), minlength=k * len(classes)).reshape(k, -1)
            majority[name] = (classes[table.argmax(1)], table.max(1) / counts)
        for c in range(k):
            row = {"level": lev, "cluster": c, "size": int(counts[c]),
                   "parent": int(h.parents[lev][c]) if lev < len(h.parents) else "",
                   "complexity": round(float(scores[lev][c]), 4)}
            row.update({key: round(float(v[c]), 4) for key, v in parts[lev].items()})
            for name, (label, share) in majority.items():
                row[f"{name}_majority"] = label[c]
                row[f"{name}_share"] = round(float(share[c]), 4)
            rows.append(row)
    return rows


def summarise_quality(sizes: Sequence[int], per_seed: list[tuple[list[dict], dict[str, float]]]) -> dict:
    """Mean and sample std over k-means seeds of `quality` (per level and truth) and of dendrogram purity."""
    def stat(values: list[float]) -> dict[str, float]:
        v = np.asarray(values, dtype=np.float64)
        return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}

    truths = list(per_seed[0][1])
    levels = []
    for i, size in enumerate(sizes):
        lev: dict = {"clusters": int(size)}
        for t in truths:
            nmi, ari = stat([q[i][t]["nmi"] for q, _ in per_seed]), stat([q[i][t]["ari"] for q, _ in per_seed])
            lev[t] = {"nmi": nmi["mean"], "nmi_std": nmi["std"], "ari": ari["mean"], "ari_std": ari["std"]}
        levels.append(lev)
    purity = {t: stat([p[t] for _, p in per_seed]) for t in truths}
    return {"seeds": len(per_seed), "levels": levels, "purity": {t: v["mean"] for t, v in purity.items()},
            "purity_std": {t: v["std"] for t, v in purity.items()}}


def run(cfg, domains: Sequence[str], data_dir: str | Path, embed_dir: str | Path, out: str | Path,
        device: str = "auto") -> dict:
    """Cluster the embedded corpus; write the hierarchy, the per-cluster table and, with ground truth,
    the quality of the main mode and of its ablations into `out`."""
    import csv
    import time

    t0 = time.perf_counter()
    dev = resolve_device(device)
    ids, img, txt = load_corpus(embed_dir, domains)
    total = len(ids)
    kept = filter_pairs(img, txt, cfg.filter_quantile, cfg.batch_size)
    ids = [ids[i] for i in kept]
    img, txt = img[torch.from_numpy(kept)], txt[torch.from_numpy(kept)]
    if len(ids) < cfg.fine_k:
        raise ValueError(f"cluster.fine_k = {cfg.fine_k} exceeds the {len(ids)} pairs of {list(domains)} "
                         f"(after the filter)")
    truth = read_truth(data_dir, ids, cfg.truth) if cfg.truth else {}
    cw = cfg.complexity
    weights = {"spread": cw.spread, "disagreement": cw.disagreement, "children": cw.children}
    record = {"pairs": len(ids), "dropped_by_filter": total - len(ids), "device": str(dev), "modes": {}}
    quality_out = {"pairs": len(ids), "truth": {n: int(len(set(y))) for n, y in truth.items()}, "modes": {}}
    trees = {}
    for mode in [cfg.mode, *cfg.ablations]:
        t = time.perf_counter()
        z = fuse(img, txt, cfg.weights, mode)
        per_seed = []
        for seed in range(cfg.seed, cfg.seed + (cfg.quality_seeds if truth else 1)):
            h = hierarchy(z, cfg.fine_k, cfg.levels, seed=seed, iters=cfg.iters, device=dev,
                          batch_size=cfg.batch_size, seed_sample=cfg.seed_sample)
            if seed == cfg.seed:
                trees[mode] = h
            if truth:
                per_seed.append((quality(h, truth), {n: dendrogram_purity(h, y) for n, y in truth.items()}))
        record["modes"][mode] = {"seconds": round(time.perf_counter() - t, 2), "sizes": trees[mode].sizes,
                                 "hierarchies": len(per_seed) or 1}
        if truth:
            quality_out["modes"][mode] = summarise_quality(trees[mode].sizes, per_seed)
    main = trees[cfg.mode]
    scores, parts = [], []
    for lev in range(len(main.levels)):
        s, p = complexity(img, txt, main, lev, weights, cfg.weights, cfg.mode, cw.sample, cfg.seed)
        scores.append(s)
        parts.append(p)
    tensors = main.to_dict()
    for lev, (s, p) in enumerate(zip(scores, parts)):
        tensors[f"level{lev}.complexity"] = torch.from_numpy(s.astype(np.float32))
        for name, v in p.items():
            tensors[f"level{lev}.{name}"] = torch.from_numpy(np.asarray(v, dtype=np.float32))
    tensors["rows"] = torch.from_numpy(kept.astype(np.int64))  # rows of the concatenated embeddings
    meta = {"mode": cfg.mode, "weights": list(cfg.weights), "domains": list(domains), "sizes": main.sizes}
    rows = cluster_table(main, scores, parts, truth)
    with atomic_dir(out) as tmp:
        save_tensors(tmp / HIERARCHY, tensors, meta)
        for mode in cfg.ablations:
            save_tensors(tmp / f"hierarchy-{mode}.safetensors", trees[mode].to_dict(), {**meta, "mode": mode})
        write_text(tmp / KEYS, "\n".join(ids) + "\n")
        with open(tmp / "clusters.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        if truth:
            write_json(tmp / "quality.json", quality_out)
        record["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(tmp / "cluster.json", record)
    log.info("clustered %d pairs (%s) into levels %s in %.1f s", len(ids), cfg.mode, main.sizes,
             record["seconds"])
    return record


def load_chc(chc_dir: str | Path) -> tuple[Hierarchy, list[str], dict[str, torch.Tensor], dict]:
    """(hierarchy, pair ids, all tensors, metadata) of a cluster stage output directory."""
    chc_dir = Path(chc_dir)
    tensors, meta = load_tensors(chc_dir / HIERARCHY)
    h = Hierarchy.from_dict(tensors)
    ids = (chc_dir / KEYS).read_text().splitlines()
    if len(ids) != len(h.levels[0]):
        raise ValueError(f"{chc_dir / KEYS}: {len(ids)} ids for a hierarchy of {len(h.levels[0])} pairs")
    return h, ids, tensors, meta


def main(argv: list[str] | None = None) -> None:
    p = stage_parser("cluster", __doc__)
    p.add_argument("--data", required=True, help="data directory of the profile (shards: ground truth)")
    p.add_argument("--embed", required=True, help="embeddings of the embed stage, e.g. data/emoji/embed")
    p.add_argument("--out", required=True, help="output directory, e.g. data/emoji/chc")
    args = p.parse_args(argv)
    _, prof = stage_setup(args)
    run(prof.cluster, prof.data.vendors.meta, args.data, args.embed, args.out, prof.backbone.device)
    write_manifest(args.out)
