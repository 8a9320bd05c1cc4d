"""Tasks stage: complexity-informed meta-tasks drawn from the CHC hierarchy. [ours]

A meta-task is a support set and a query set of image-text pairs (captions as weak labels: in
meta-training each set is scored text-as-class, method-notes §1). GRAM's abstract says only that the
tasks are built with a structure-complexity-informed strategy [abstract]; the sibling method draws
support and query from different clusters, which act as domains [sibling]. What follows is our
reconstruction, every part a parameter (`<profile>.tasks`):

- Domains are the clusters of one hierarchy level (`level`, 0 = finest).
- Complexity c ∈ [0, 1] of a cluster (the cluster stage's score, min-max normalised again over the
  level so that the least complex cluster has 0 and the most complex 1) decides two things: how often it supplies a support set, with probability ∝ 1 + `complexity_bias`·c
  (0: uniform), and how large its sets are, round(min + c·(max − min)) pairs for `support` /
  `query` = [min, max]; a set never takes more pairs than its cluster has. Diverse clusters thus get
  more and larger tasks, as method-notes §1 asks.
- Query cluster: uniform over the other eligible clusters (cross-domain, the default), or, with
  `cross_cluster: false` (an ablation), the support cluster itself with disjoint pairs.
- Eligible: a cluster with at least `support[0]` pairs can give a support set, with `query[0]` a
  query set (with `cross_cluster: false`: at least support[0] + query[0]).
- Each task also records the domain similarity of its two clusters, (1 + cos(μ_S, μ_Q)) / 2 of the
  level's centroids (the sibling's 1 − d/2 with d the cosine distance), for the meta-regulariser.

The sampler is a `numpy.random.Generator(seed)` consumed in task order, so a seed gives the same
file byte for byte. Output (`gram tasks --chc DIR --out DIR`):
  tasks.safetensors  `support`/`query` (flat hierarchy row ids, int64) with `support_offsets`/
                     `query_offsets` [T + 1] (task t's ids are ids[offsets[t]:offsets[t + 1]]),
                     `support_cluster`/`query_cluster` [T], `similarity` [T]; metadata: level, seed,
                     cross_cluster, and the SHA-256 of the hierarchy's keys.txt (rows -> pair ids).
  tasks-<variant>.safetensors  the same for every entry of `variants` (same-cluster: support and query
                     from one cluster, disjoint pairs; same sizes and seed).
  tasks.json         a summary (sizes, coverage, how complexity shaped the draw).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from gram.cluster import KEYS, load_chc, minmax
from gram.io import atomic_dir, write_json, write_manifest
from gram.stage import stage_parser, stage_setup
from gram.tensorio import load_tensors, save_tensors

log = logging.getLogger("gram.tasks")

TASKS = "tasks.safetensors"
VAL_TASKS = "tasks-val.safetensors"  # validation tasks over the held-out clusters (tasks.val_fraction > 0)


@dataclass
class Tasks:
    """Meta-tasks as hierarchy row ids."""

    support: list[np.ndarray]  # per task: [S_t] int64 rows
    query: list[np.ndarray]  # per task: [Q_t] int64 rows
    support_cluster: np.ndarray  # [T] int64
    query_cluster: np.ndarray  # [T] int64
    similarity: np.ndarray  # [T] float32, (1 + cos of the two clusters' centroids) / 2
    # N-way tasks (kind nway) only: per task, the class (0..N−1) of every support / query row, and the
    # cluster of every class; the classes' names are `phrases[cluster]`
    support_label: list[np.ndarray] | None = None
    query_label: list[np.ndarray] | None = None
    support_classes: list[np.ndarray] | None = None
    query_classes: list[np.ndarray] | None = None
    phrases: list[str] | None = None

    def __len__(self) -> int:
        return len(self.support)

    @property
    def nway(self) -> bool:
        return self.support_label is not None

    def sets(self, t: int):
        """(support, query) of task t as the meta-learner reads them: row arrays (text-as-class tasks), or
        `Labelled` sets (N-way tasks: rows, their classes and the classes' names)."""
        if not self.nway:
            return self.support[t], self.query[t]
        return (Labelled(self.support[t], self.support_label[t], [self.phrases[c] for c in self.support_classes[t]]),
                Labelled(self.query[t], self.query_label[t], [self.phrases[c] for c in self.query_classes[t]]))

    def to_dict(self) -> dict[str, torch.Tensor]:
        def flat(sets):
            offsets = np.concatenate([[0], np.cumsum([len(s) for s in sets])]).astype(np.int64)
            return torch.from_numpy(np.concatenate(sets).astype(np.int64)), torch.from_numpy(offsets)

        s, so = flat(self.support)
        q, qo = flat(self.query)
        out = {"support": s, "support_offsets": so, "query": q, "query_offsets": qo,
               "support_cluster": torch.from_numpy(self.support_cluster.astype(np.int64)),
               "query_cluster": torch.from_numpy(self.query_cluster.astype(np.int64)),
               "similarity": torch.from_numpy(self.similarity.astype(np.float32))}
        if self.nway:
            out["support_label"], _ = flat(self.support_label)
            out["query_label"], _ = flat(self.query_label)
            out["support_classes"], out["support_classes_offsets"] = flat(self.support_classes)
            out["query_classes"], out["query_classes_offsets"] = flat(self.query_classes)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor], phrases: list[str] | None = None) -> Tasks:
        def split(ids, offsets):
            ids, offsets = ids.numpy(), offsets.numpy()
            return [ids[a:b] for a, b in zip(offsets[:-1], offsets[1:])]

        try:
            extra = {}
            if "support_label" in d:
                if phrases is None:
                    raise ValueError("an N-way task file without the clusters' phrases in its metadata")
                extra = {"support_label": split(d["support_label"], d["support_offsets"]),
                         "query_label": split(d["query_label"], d["query_offsets"]),
                         "support_classes": split(d["support_classes"], d["support_classes_offsets"]),
                         "query_classes": split(d["query_classes"], d["query_classes_offsets"]),
                         "phrases": list(phrases)}
            return cls(support=split(d["support"], d["support_offsets"]), query=split(d["query"], d["query_offsets"]),
                       support_cluster=d["support_cluster"].numpy(), query_cluster=d["query_cluster"].numpy(),
                       similarity=d["similarity"].numpy(), **extra)
        except KeyError as e:
            raise ValueError(f"not a saved task file: missing {e}") from None


class Labelled(NamedTuple):
    """One set of an N-way task: hierarchy rows, the class of each (0..N−1) and the N class names."""

    rows: np.ndarray
    labels: np.ndarray
    names: list[str]


def set_sizes(complexity: np.ndarray, lo_hi: list[int] | tuple[int, int]) -> np.ndarray:
    """Pairs per set for every cluster: round(min + c·(max − min)), c ∈ [0, 1]."""
    lo, hi = lo_hi
    return np.rint(lo + np.clip(complexity, 0.0, 1.0) * (hi - lo)).astype(np.int64)


def sample_tasks(assign: np.ndarray, complexity: np.ndarray, centroids: np.ndarray, n_tasks: int,
                 support: list[int], query: list[int], complexity_bias: float = 1.0, cross_cluster: bool = True,
                 seed: int = 0, allowed: np.ndarray | None = None) -> Tasks:
    """Draw `n_tasks` tasks over the clusters `assign` [N] (ids 0..C−1) of one level.

    Args:
        complexity: [C] in [0, 1]; centroids: [C, D] unit rows (for the similarity).
        support, query: [min, max] pairs per set.
        allowed: [C] bool, the clusters tasks may use (None: all; held-out clusters are False).
    Raises:
        ValueError when fewer clusters are eligible than a task needs (the message gives the counts).
    """
    assign = np.asarray(assign, dtype=np.int64)
    complexity = np.asarray(complexity, dtype=np.float64)
    n_c = len(complexity)
    if assign.min(initial=0) < 0 or assign.max(initial=0) >= n_c:
        raise ValueError(f"assignments must lie in [0, {n_c}) for {n_c} complexity values")
    counts = np.bincount(assign, minlength=n_c)
    order = np.argsort(assign, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    members = [order[starts[c]:starts[c + 1]] for c in range(n_c)]  # rows of cluster c, ascending
    s_size, q_size = set_sizes(complexity, support), set_sizes(complexity, query)
    allowed = np.ones(n_c, bool) if allowed is None else np.asarray(allowed, bool)
    if cross_cluster:
        can_s, can_q = allowed & (counts >= support[0]), allowed & (counts >= query[0])
        ok = can_s & (can_q.sum() - can_q >= 1)  # a support cluster needs another query-eligible one
    else:
        ok = can_q = allowed & (counts >= support[0] + query[0])
    if not ok.any():
        raise ValueError(f"no cluster of the {n_c} (sizes {counts.min()}..{counts.max()}) can form a task with "
                         f"support {support}, query {query}, cross_cluster={cross_cluster}: lower the set sizes or "
                         "take a coarser tasks.level")
    p = np.where(ok, 1.0 + complexity_bias * complexity, 0.0)
    p /= p.sum()
    q_ids = np.flatnonzero(can_q)
    cen = np.asarray(centroids, dtype=np.float64)
    cen = cen / np.linalg.norm(cen, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    sup, qry, sc, qc = [], [], np.zeros(n_tasks, np.int64), np.zeros(n_tasks, np.int64)
    for t in range(n_tasks):
        a = int(rng.choice(n_c, p=p))
        if cross_cluster:
            others = q_ids[q_ids != a]
            b = int(others[rng.integers(len(others))])
            s = rng.choice(members[a], min(s_size[a], counts[a]), replace=False)
            q = rng.choice(members[b], min(q_size[b], counts[b]), replace=False)
        else:
            b = a
            n_s = min(s_size[a], counts[a] - query[0])
            n_q = min(q_size[a], counts[a] - n_s)
            perm = rng.permutation(members[a])
            s, q = perm[:n_s], perm[n_s:n_s + n_q]
        sup.append(np.sort(s))
        qry.append(np.sort(q))
        sc[t], qc[t] = a, b
    sim = ((1.0 + (cen[sc] * cen[qc]).sum(1)) / 2.0).astype(np.float32)
    return Tasks(support=sup, query=qry, support_cluster=sc, query_cluster=qc, similarity=sim)


# ------------------------------------------------------------------------------------------------
# N-way tasks: clusters as classes, named by the words their captions share
# ------------------------------------------------------------------------------------------------
STOP_WORDS = frozenset("a an and as at by for from in of on or the to with".split())


def caption_words(caption: str) -> list[str]:
    """The distinct words of a caption (lower case letters, no stop words), in order."""
    return list(dict.fromkeys(w for w in re.findall(r"[a-z]+", caption.lower()) if w not in STOP_WORDS))


def cluster_phrases(captions: list[str], assign: np.ndarray, n_clusters: int, max_words: int = 2) -> list[str]:
    """A short class-like name for every cluster: the words that most of its members' captions hold.

    A word's share in a cluster is the number of members whose caption holds it; the name is the most shared
    word, then up to `max_words` − 1 more that at least two members share, the most shared first (ties: the
    word rarer in the whole corpus, then alphabetical). A cluster without captions is named "" (no task
    takes it as a class)."""
    words = [caption_words(c) for c in captions]
    corpus_df = Counter(w for ws in words for w in ws)
    members: list[list[int]] = [[] for _ in range(n_clusters)]
    for r, c in enumerate(np.asarray(assign)):
        members[int(c)].append(r)
    out = []
    for rows in members:
        df = Counter(w for r in rows for w in words[r])
        ranked = sorted(df, key=lambda w: (-df[w], corpus_df[w], w))
        picked = ranked[:1] + [w for w in ranked[1:] if df[w] >= 2][:max_words - 1]
        out.append(" ".join(picked))
    return out


def parents(assign: np.ndarray, upper: np.ndarray | None, n_clusters: int) -> np.ndarray:
    """The cluster one level up of every cluster (the hierarchy nests, so any member tells); all 0 at the top."""
    out = np.zeros(n_clusters, np.int64)
    if upper is not None:
        out[np.asarray(assign)] = np.asarray(upper)
    return out


def sample_nway(assign: np.ndarray, parent: np.ndarray, complexity: np.ndarray, centroids: np.ndarray,
                phrases: list[str], n_tasks: int, ways: list[int], support: list[int], query: list[int],
                complexity_bias: float = 1.0, cross_cluster: bool = True, seed: int = 0,
                allowed: np.ndarray | None = None) -> Tasks:
    """Draw `n_tasks` N-way tasks over the clusters `assign` [N] of one level [ours, issue 19].

    A task's support set is an N-way problem (N uniform in `ways` = [min, max]): N clusters with distinct
    phrases, drawn without replacement with probability ∝ 1 + bias·complexity, each a class named by its
    phrase, with round(min + c·(max − min)) of its pairs (`support`, per class). Its query set is the
    N-way problem of N related clusters: for each support class, a cluster with the same parent one level
    up (`parent`), otherwise any other, none of them in the support set, with distinct phrases and `query`
    pairs per class. So the inner step adapts θ to some classes and the outer loss scores it on their
    neighbours, whose names it has not seen. With `cross_cluster: false` (the ablation) the query classes
    are the support's, with disjoint pairs. `allowed` [C] restricts the clusters used (held-out clusters
    are False). The similarity of a task is the mean over classes of (1 + cos(μ_support, μ_query)) / 2.
    """
    assign = np.asarray(assign, dtype=np.int64)
    n_c = len(complexity)
    counts = np.bincount(assign, minlength=n_c)
    order = np.argsort(assign, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    members = [order[starts[c]:starts[c + 1]] for c in range(n_c)]
    allowed = np.ones(n_c, bool) if allowed is None else np.asarray(allowed, bool)
    named = np.array([bool(p) for p in phrases]) & allowed
    s_size, q_size = set_sizes(complexity, support), set_sizes(complexity, query)
    need = support[0] + (0 if cross_cluster else query[0])
    can_s, can_q = named & (counts >= need), named & (counts >= query[0])
    if can_s.sum() < 2 or (cross_cluster and can_q.sum() < 4):
        raise ValueError(f"{int(can_s.sum())} of the {n_c} clusters can be a support class and {int(can_q.sum())} a "
                         f"query class (support {support}, query {query} pairs per class): an N-way task needs "
                         "2 of each, apart: lower the set sizes, take a finer tasks.level or hold out fewer clusters")
    p_all = np.where(can_s, 1.0 + complexity_bias * np.asarray(complexity, np.float64), 0.0)
    cen = np.asarray(centroids, dtype=np.float64)
    cen = cen / np.linalg.norm(cen, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    _, pid = np.unique(np.asarray(phrases, dtype=object), return_inverse=True)  # phrase id of every cluster
    out: dict[str, list] = {k: [] for k in ("support", "query", "s_lab", "q_lab", "s_cls", "q_cls")}
    sims = np.zeros(n_tasks, np.float32)
    def draw_classes(n_way: int) -> tuple[list[int], list[int]]:
        p = p_all.copy()
        s_cls, q_cls = [], []
        taken = np.zeros(n_c, bool)
        s_names, q_names = np.zeros(len(pid), bool), np.zeros(len(pid), bool)  # phrase ids in use, per side
        while len(s_cls) < n_way and p.sum() > 0:
            a = int(rng.choice(n_c, p=p / p.sum()))
            p[a] = 0.0
            if s_names[pid[a]]:
                continue
            if cross_cluster:
                free = can_q & ~taken & ~q_names[pid] & (pid != pid[a])
                sib = np.flatnonzero(free & (parent == parent[a]))
                pool = sib if len(sib) else np.flatnonzero(free)
                if not len(pool):
                    continue
                b = int(pool[rng.integers(len(pool))])
            else:
                b = a
            s_cls.append(a)
            q_cls.append(b)
            s_names[pid[a]] = q_names[pid[b]] = True
            taken[[a, b]] = True
            p[b] = 0.0
        return s_cls, q_cls

    for t in range(n_tasks):
        n_way = int(rng.integers(ways[0], ways[1] + 1))
        for _ in range(50):  # an unlucky order can leave too few free names: draw again
            s_cls, q_cls = draw_classes(n_way)
            if len(s_cls) >= 2:
                break
        else:
            raise ValueError(f"task {t}: 50 draws found no 2 classes with distinct phrases and free neighbours "
                             f"among {int(can_s.sum())} clusters ({len(set(phrases))} distinct phrases)")
        s_rows, q_rows, s_lab, q_lab = [], [], [], []
        for i, (a, b) in enumerate(zip(s_cls, q_cls)):
            if cross_cluster:
                sr = rng.choice(members[a], min(s_size[a], counts[a]), replace=False)
                qr = rng.choice(members[b], min(q_size[b], counts[b]), replace=False)
            else:
                n_s = min(s_size[a], counts[a] - query[0])
                perm = rng.permutation(members[a])
                sr, qr = perm[:n_s], perm[n_s:n_s + min(q_size[a], counts[a] - n_s)]
            s_rows.append(np.sort(sr))
            q_rows.append(np.sort(qr))
            s_lab.append(np.full(len(sr), i))
            q_lab.append(np.full(len(qr), i))
        out["support"].append(np.concatenate(s_rows))
        out["query"].append(np.concatenate(q_rows))
        out["s_lab"].append(np.concatenate(s_lab).astype(np.int64))
        out["q_lab"].append(np.concatenate(q_lab).astype(np.int64))
        out["s_cls"].append(np.array(s_cls, np.int64))
        out["q_cls"].append(np.array(q_cls, np.int64))
        sims[t] = float(np.mean((1.0 + (cen[s_cls] * cen[q_cls]).sum(1)) / 2.0))
    return Tasks(support=out["support"], query=out["query"],
                 support_cluster=np.array([c[0] for c in out["s_cls"]], np.int64),
                 query_cluster=np.array([c[0] for c in out["q_cls"]], np.int64), similarity=sims,
                 support_label=out["s_lab"], query_label=out["q_lab"], support_classes=out["s_cls"],
                 query_classes=out["q_cls"], phrases=list(phrases))


def held_out_clusters(n_clusters: int, fraction: float, seed: int) -> np.ndarray:
    """[C] bool: the clusters kept for validation tasks (a seeded draw of round(fraction·C)); training tasks
    never use them."""
    out = np.zeros(n_clusters, bool)
    out[np.random.default_rng([seed, 7]).permutation(n_clusters)[:int(round(fraction * n_clusters))]] = True
    return out


def summary(tasks: Tasks, complexity: np.ndarray, counts: np.ndarray, n_pairs: int) -> dict:
    """What the draw looks like: set sizes, coverage, and the share of tasks per complexity tercile."""
    s_len = np.array([len(s) for s in tasks.support])
    q_len = np.array([len(q) for q in tasks.query])
    used = np.unique(np.concatenate(tasks.support + tasks.query))
    tercile = np.digitize(complexity, [1 / 3, 2 / 3])  # 0 low, 1 mid, 2 high
    clusters_per = np.bincount(tercile, minlength=3)
    tasks_per = np.bincount(tercile[tasks.support_cluster], minlength=3)
    extra = {}
    if tasks.nway:
        ways = np.array([len(c) for c in tasks.support_classes])
        extra = {"ways": {"mean": round(float(ways.mean()), 2), "min": int(ways.min()), "max": int(ways.max())},
                 "support_clusters_used": int(len(np.unique(np.concatenate(tasks.support_classes))))}
    return {
        "tasks": len(tasks), "clusters": int(len(counts)), "support_clusters_used": int(len(set(tasks.support_cluster))),
        "support_size": {"mean": round(float(s_len.mean()), 2), "min": int(s_len.min()), "max": int(s_len.max())},
        "query_size": {"mean": round(float(q_len.mean()), 2), "min": int(q_len.min()), "max": int(q_len.max())},
        "same_cluster_tasks": int((tasks.support_cluster == tasks.query_cluster).sum()),
        "coverage": round(len(used) / n_pairs, 4),
        "similarity_mean": round(float(tasks.similarity.mean()), 4),
        # complexity terciles (low < 1/3 <= mid < 2/3 <= high): clusters in each, and support sets drawn
        "complexity_terciles": {name: {"clusters": int(clusters_per[i]), "tasks": int(tasks_per[i])}
                                for i, name in enumerate(("low", "mid", "high"))},
        **extra,
    }


def run(cfg, chc_dir: str | Path, out: str | Path, data_dir: str | Path | None = None, allow_pipe: bool = False) -> dict:
    """Sample the tasks of `cfg` from the cluster stage's output; write `<out>/tasks.safetensors` + tasks.json.
    N-way tasks (`kind: nway`) name their classes from the captions in the shards of `data_dir`."""
    h, ids, tensors, _ = load_chc(chc_dir)
    if cfg.level >= len(h.levels):
        raise ValueError(f"tasks.level = {cfg.level} but {Path(chc_dir)} has levels 0..{len(h.levels) - 1}")
    assign, cen = h.levels[cfg.level], h.centroids[cfg.level]
    n_c = h.sizes[cfg.level]
    complexity = minmax(tensors[f"level{cfg.level}.complexity"].double().numpy())
    held = held_out_clusters(n_c, cfg.val_fraction, cfg.seed)
    meta = {"level": cfg.level, "seed": cfg.seed, "cross_cluster": cfg.cross_cluster, "kind": cfg.kind,
            "keys_sha256": hashlib.sha256((Path(chc_dir) / KEYS).read_bytes()).hexdigest()}
    if cfg.kind == "nway":
        if data_dir is None:
            raise ValueError("tasks.kind: nway names its classes from the corpus captions: pass --data")
        from gram.data.corpus import locate_pairs

        captions = locate_pairs(data_dir, ids, np.arange(len(ids)), allow_pipe)[0]
        phrases = cluster_phrases(captions, assign, n_c, cfg.phrase_words)
        upper = h.levels[cfg.level + 1] if cfg.level + 1 < len(h.levels) else None
        par = parents(assign, upper, n_c)
        meta["phrases"] = phrases

        def draw(n: int, cross: bool, allowed: np.ndarray, seed: int) -> Tasks:
            return sample_nway(assign, par, complexity, cen, phrases, n, cfg.ways, cfg.support, cfg.query,
                               cfg.complexity_bias, cross, seed, allowed)
    else:
        def draw(n: int, cross: bool, allowed: np.ndarray, seed: int) -> Tasks:
            return sample_tasks(assign, complexity, cen, n, cfg.support, cfg.query, cfg.complexity_bias, cross,
                                seed, allowed)
    tasks = draw(cfg.n_tasks, cfg.cross_cluster, ~held, cfg.seed)
    counts = np.bincount(assign, minlength=n_c)
    info = {"level": cfg.level, "kind": cfg.kind, "cross_cluster": cfg.cross_cluster, "seed": cfg.seed,
            **summary(tasks, complexity, counts, len(ids))}
    files = {TASKS: (tasks, meta)}
    if held.any():  # validation tasks: only the held-out clusters, which no training task touches
        val = draw(cfg.n_val, cfg.cross_cluster, held, cfg.seed + 1)
        files[VAL_TASKS] = (val, {**meta, "variant": "val"})
        info["validation"] = {"held_out_clusters": int(held.sum()), **summary(val, complexity, counts, len(ids))}
    if cfg.kind == "nway":
        info["phrases"] = {"distinct": len(set(phrases)), "clusters": n_c,
                           "examples": sorted(set(phrases))[:: max(1, len(set(phrases)) // 20)]}
    for variant in cfg.variants:  # "same-cluster": the ablation of the cross-cluster split
        v = draw(cfg.n_tasks, False, ~held, cfg.seed)
        files[task_file(variant)] = (v, {**meta, "cross_cluster": False, "variant": variant})
        info.setdefault("variants", {})[variant] = summary(v, complexity, counts, len(ids))
    with atomic_dir(out) as tmp:
        for name, (t, m) in files.items():
            save_tensors(tmp / name, t.to_dict(), m)
        write_json(tmp / "tasks.json", info)
    log.info("%d tasks at level %d (%d clusters): support %.1f pairs, query %.1f pairs on average; coverage %.0f%%",
             len(tasks), cfg.level, h.sizes[cfg.level], info["support_size"]["mean"], info["query_size"]["mean"],
             100 * info["coverage"])
    return info


def task_file(variant: str = "default") -> str:
    """File name of a task variant in the stage's output directory."""
    return TASKS if variant == "default" else f"tasks-{variant}.safetensors"


def load_tasks(out: str | Path, variant: str = "default") -> tuple[Tasks, dict]:
    """(tasks, metadata) of a tasks stage output directory (`variant`: default, val (the validation tasks, when
    tasks.val_fraction > 0) or one of tasks.variants)."""
    path = Path(out) / (VAL_TASKS if variant == "val" else task_file(variant))
    if variant != "default" and not path.exists():
        hint = "set tasks.val_fraction > 0" if variant == "val" else f"add {variant!r} to tasks.variants"
        raise FileNotFoundError(f"{path}: no {variant!r} tasks here ({hint})")
    tensors, meta = load_tensors(path)
    try:
        return Tasks.from_dict(tensors, meta.get("phrases")), meta
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def main(argv: list[str] | None = None) -> None:
    p = stage_parser("tasks", __doc__)
    p.add_argument("--chc", required=True, help="output directory of the cluster stage, e.g. data/emoji/chc")
    p.add_argument("--data", default=None, help="data directory of the profile (its shards: the captions that "
                                                "name N-way tasks' classes), e.g. data/emoji")
    p.add_argument("--out", required=True, help="output directory, e.g. data/emoji/tasks")
    args = p.parse_args(argv)
    _, prof = stage_setup(args)
    run(prof.tasks, args.chc, args.out, args.data, prof.data.paper.allow_pipe)
    write_manifest(args.out)
