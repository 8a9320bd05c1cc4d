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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gram.cluster import KEYS, load_chc, minmax
from gram.io import atomic_dir, write_json, write_manifest
from gram.stage import stage_parser, stage_setup
from gram.tensorio import load_tensors, save_tensors

log = logging.getLogger("gram.tasks")

TASKS = "tasks.safetensors"


@dataclass
class Tasks:
    """Meta-tasks as hierarchy row ids."""

    support: list[np.ndarray]  # per task: [S_t] int64 rows
    query: list[np.ndarray]  # per task: [Q_t] int64 rows
    support_cluster: np.ndarray  # [T] int64
    query_cluster: np.ndarray  # [T] int64
    similarity: np.ndarray  # [T] float32, (1 + cos of the two clusters' centroids) / 2

    def __len__(self) -> int:
        return len(self.support)

    def to_dict(self) -> dict[str, torch.Tensor]:
        def flat(sets):
            offsets = np.concatenate([[0], np.cumsum([len(s) for s in sets])]).astype(np.int64)
            return torch.from_numpy(np.concatenate(sets).astype(np.int64)), torch.from_numpy(offsets)

        s, so = flat(self.support)
        q, qo = flat(self.query)
        return {"support": s, "support_offsets": so, "query": q, "query_offsets": qo,
                "support_cluster": torch.from_numpy(self.support_cluster.astype(np.int64)),
                "query_cluster": torch.from_numpy(self.query_cluster.astype(np.int64)),
                "similarity": torch.from_numpy(self.similarity.astype(np.float32))}

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> Tasks:
        def split(ids, offsets):
            ids, offsets = ids.numpy(), offsets.numpy()
            return [ids[a:b] for a, b in zip(offsets[:-1], offsets[1:])]

        try:
            return cls(support=split(d["support"], d["support_offsets"]), query=split(d["query"], d["query_offsets"]),
                       support_cluster=d["support_cluster"].numpy(), query_cluster=d["query_cluster"].numpy(),
                       similarity=d["similarity"].numpy())
        except KeyError as e:
            raise ValueError(f"not a saved task file: missing {e}") from None


def set_sizes(complexity: np.ndarray, lo_hi: list[int] | tuple[int, int]) -> np.ndarray:
    """Pairs per set for every cluster: round(min + c·(max − min)), c ∈ [0, 1]."""
    lo, hi = lo_hi
    return np.rint(lo + np.clip(complexity, 0.0, 1.0) * (hi - lo)).astype(np.int64)


def sample_tasks(assign: np.ndarray, complexity: np.ndarray, centroids: np.ndarray, n_tasks: int,
                 support: list[int], query: list[int], complexity_bias: float = 1.0, cross_cluster: bool = True,
                 seed: int = 0) -> Tasks:
    """Draw `n_tasks` tasks over the clusters `assign` [N] (ids 0..C−1) of one level.

    Args:
        complexity: [C] in [0, 1]; centroids: [C, D] unit rows (for the similarity).
        support, query: [min, max] pairs per set.
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
    if cross_cluster:
        can_s, can_q = counts >= support[0], counts >= query[0]
        ok = can_s & (can_q.sum() - can_q >= 1)  # a support cluster needs another query-eligible one
    else:
        ok = can_q = counts >= support[0] + query[0]
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


def summary(tasks: Tasks, complexity: np.ndarray, counts: np.ndarray, n_pairs: int) -> dict:
    """What the draw looks like: set sizes, coverage, and the share of tasks per complexity tercile."""
    s_len = np.array([len(s) for s in tasks.support])
    q_len = np.array([len(q) for q in tasks.query])
    used = np.unique(np.concatenate(tasks.support + tasks.query))
    tercile = np.digitize(complexity, [1 / 3, 2 / 3])  # 0 low, 1 mid, 2 high
    clusters_per = np.bincount(tercile, minlength=3)
    tasks_per = np.bincount(tercile[tasks.support_cluster], minlength=3)
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
    }


def run(cfg, chc_dir: str | Path, out: str | Path) -> dict:
    """Sample the tasks of `cfg` from the cluster stage's output; write `<out>/tasks.safetensors` + tasks.json."""
    h, ids, tensors, _ = load_chc(chc_dir)
    if cfg.level >= len(h.levels):
        raise ValueError(f"tasks.level = {cfg.level} but {Path(chc_dir)} has levels 0..{len(h.levels) - 1}")
    assign, cen = h.levels[cfg.level], h.centroids[cfg.level]
    complexity = minmax(tensors[f"level{cfg.level}.complexity"].double().numpy())
    tasks = sample_tasks(assign, complexity, cen, cfg.n_tasks, cfg.support, cfg.query, cfg.complexity_bias,
                         cfg.cross_cluster, cfg.seed)
    keys_sha = hashlib.sha256((Path(chc_dir) / KEYS).read_bytes()).hexdigest()
    meta = {"level": cfg.level, "seed": cfg.seed, "cross_cluster": cfg.cross_cluster, "keys_sha256": keys_sha}
    counts = np.bincount(assign, minlength=h.sizes[cfg.level])
    info = {"level": cfg.level, "cross_cluster": cfg.cross_cluster, "seed": cfg.seed,
            **summary(tasks, complexity, counts, len(ids))}
    files = {TASKS: (tasks, meta)}
    for variant in cfg.variants:  # "same-cluster": the ablation of the cross-cluster split
        v = sample_tasks(assign, complexity, cen, cfg.n_tasks, cfg.support, cfg.query, cfg.complexity_bias,
                         False, cfg.seed)
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
    """(tasks, metadata) of a tasks stage output directory (`variant`: default or one of tasks.variants)."""
    path = Path(out) / task_file(variant)
    if variant != "default" and not path.exists():
        raise FileNotFoundError(f"{path}: no {variant!r} tasks here (add {variant!r} to tasks.variants)")
    tensors, meta = load_tensors(path)
    return Tasks.from_dict(tensors), meta


def main(argv: list[str] | None = None) -> None:
    p = stage_parser("tasks", __doc__)
    p.add_argument("--chc", required=True, help="output directory of the cluster stage, e.g. data/emoji/chc")
    p.add_argument("--out", required=True, help="output directory, e.g. data/emoji/tasks")
    args = p.parse_args(argv)
    _, prof = stage_setup(args)
    run(prof.tasks, args.chc, args.out)
    write_manifest(args.out)
