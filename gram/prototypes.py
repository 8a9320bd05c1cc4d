"""Prototypes stage: multi-level cluster prototypes of the meta-training corpus. [ours]

The TPAMI abstract says the test-time regulator relates a test sample to the meta-training
prototypes, made with the structure-complexity-informed strategy [abstract]. Our reconstruction
(method-notes §1 and §5), parameters in `<profile>.prototypes`:

- Every cluster of every hierarchy level has one prototype per modality: the normalised mean of its
  members' image embeddings, of their text embeddings, and (the hierarchy's centroid) of their fused
  features.
- Complex clusters get more: `m = clamp(round(1 + c·(max_per_cluster − 1)), 1, size)` sub-prototypes
  for a cluster of complexity c ∈ [0, 1] (the cluster stage's score min-max normalised over the
  level, as for the tasks), the means of a k-means (`gram.cluster.kmeans`, seed
  `seed + cluster id`) of its members' fused features, again per modality. A cluster of complexity 0
  has one sub-prototype, which equals its prototype.

Output (`gram prototypes --embed DIR --chc DIR --out DIR`): `prototypes.safetensors` with, per level i,
`level{i}.image|text|fused` [C_i, E], `level{i}.size` [C_i], `level{i}.complexity` [C_i] and
`level{i}.sub.image|text|fused` [P_i, E] with `level{i}.sub.cluster` [P_i] (the cluster each belongs
to, ascending) and `level{i}.sub.size` [P_i]; and `prototypes.json` (counts per level).
`load_structure` reads the file back as the structure context of meta-training and test-time tuning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gram.cluster import Hierarchy, fuse, kmeans, load_chc, load_corpus, minmax
from gram.io import atomic_dir, file_sha256, write_json, write_manifest
from gram.regulator import StructureContext
from gram.stage import stage_parser, stage_setup
from gram.tensorio import load_tensors, save_tensors

log = logging.getLogger("gram.prototypes")

PROTOTYPES = "prototypes.safetensors"


def sub_counts(complexity: np.ndarray, sizes: np.ndarray, max_per_cluster: int) -> np.ndarray:
    """Sub-prototypes per cluster: round(1 + c·(max − 1)), at least 1, at most the cluster's size."""
    m = np.rint(1 + np.clip(complexity, 0.0, 1.0) * (max_per_cluster - 1)).astype(np.int64)
    return np.clip(m, 1, sizes)


def _means(x: torch.Tensor, lab: torch.Tensor, k: int, block: int = 65536) -> torch.Tensor:
    """Normalised per-label means [k, E] of rows x [N, E] (float64 sums, `block` rows at a time)."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64)
    for s in range(0, x.shape[0], block):
        sums.index_add_(0, lab[s:s + block], x[s:s + block].double())
    return F.normalize(sums, dim=-1).float()


def prototypes(img: torch.Tensor, txt: torch.Tensor, h: Hierarchy, complexity: list[np.ndarray],
               max_per_cluster: int, weights=(1.0, 1.0), mode: str = "cross-modal", iters: int = 20,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """Prototypes and complexity-informed sub-prototypes of every level (see the module docstring).

    Args:
        img, txt: [N, E] embeddings of the hierarchy's rows; complexity: per level, [C_i] in [0, 1].
        weights, mode: the fusion the hierarchy was built with.
    """
    z = fuse(img, txt, weights, mode).cpu()  # [N, E]
    img, txt = img.cpu(), txt.cpu()
    out: dict[str, torch.Tensor] = {}
    for lev, assign in enumerate(h.levels):
        k = h.sizes[lev]
        lab = torch.from_numpy(np.asarray(assign, dtype=np.int64))
        sizes = np.bincount(assign, minlength=k)
        for name, x in (("image", img), ("text", txt), ("fused", z)):
            out[f"level{lev}.{name}"] = _means(x, lab, k)
        out[f"level{lev}.size"] = torch.from_numpy(sizes.astype(np.int64))
        out[f"level{lev}.complexity"] = torch.from_numpy(np.asarray(complexity[lev], dtype=np.float32))
        m = sub_counts(complexity[lev], sizes, max_per_cluster)
        order = np.argsort(assign, kind="stable")
        starts = np.concatenate([[0], np.cumsum(sizes)])
        sub_lab = torch.empty(len(assign), dtype=torch.long)  # global sub-prototype id of every row
        owner, offset = [], 0
        for c in range(k):
            rows = torch.from_numpy(order[starts[c]:starts[c + 1]])
            if m[c] == 1:
                local = torch.zeros(len(rows), dtype=torch.long)
            else:
                _, local = kmeans(z[rows], int(m[c]), iters=iters, seed=seed + c)
            sub_lab[rows] = local.cpu() + offset
            owner += [c] * int(m[c])
            offset += int(m[c])
        for name, x in (("image", img), ("text", txt), ("fused", z)):
            out[f"level{lev}.sub.{name}"] = _means(x, sub_lab, offset)
        out[f"level{lev}.sub.cluster"] = torch.tensor(owner, dtype=torch.long)
        out[f"level{lev}.sub.size"] = torch.bincount(sub_lab, minlength=offset)
    return out


def run(cfg, domains: list[str], embed_dir: str | Path, chc_dir: str | Path, out: str | Path) -> dict:
    """Write `<out>/prototypes.safetensors` and `<out>/prototypes.json` from the embed and cluster outputs."""
    h, ids, tensors, meta = load_chc(chc_dir)
    all_ids, img, txt = load_corpus(embed_dir, domains)
    rows = tensors["rows"]
    if len(all_ids) <= int(rows.max()) or [all_ids[i] for i in rows.tolist()] != ids:
        raise ValueError(f"{chc_dir} was clustered from other embeddings than {embed_dir} (rerun the cluster stage)")
    img, txt = img[rows], txt[rows]
    mode, weights = meta["mode"], meta["weights"]  # the fusion the hierarchy was built with
    complexity = [minmax(tensors[f"level{i}.complexity"].double().numpy()) for i in range(len(h.levels))]
    protos = prototypes(img, txt, h, complexity, cfg.max_per_cluster, weights, mode, cfg.iters, cfg.seed)
    info = {"pairs": len(ids), "mode": mode,
            "levels": [{"clusters": h.sizes[i], "sub_prototypes": int(protos[f"level{i}.sub.cluster"].numel())}
                       for i in range(len(h.levels))]}
    with atomic_dir(out) as tmp:
        save_tensors(tmp / PROTOTYPES, protos, {"mode": mode, "weights": weights, "levels": h.sizes})
        write_json(tmp / "prototypes.json", info)
    log.info("prototypes per level: %s", ", ".join(f"{d['clusters']} (+{d['sub_prototypes']} sub)"
                                                   for d in info["levels"]))
    return info


def load_structure(prototypes_dir: str | Path | None, cfg, who: str):
    """The `StructureContext` of StructureParams `cfg` over the prototypes stage's output, and its SHA-256."""
    if prototypes_dir is None:
        raise ValueError(f"{who} relates samples to the prototypes: pass --prototypes (e.g. data/emoji/prototypes)")
    path = Path(prototypes_dir) / PROTOTYPES
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (did the prototypes stage run?)")
    tensors, _ = load_tensors(path)
    return StructureContext(tensors, cfg.levels, cfg.tau, cfg.modality, cfg.sub), file_sha256(path)


def main(argv: list[str] | None = None) -> None:
    p = stage_parser("prototypes", __doc__)
    p.add_argument("--embed", required=True, help="embeddings of the embed stage, e.g. data/emoji/embed")
    p.add_argument("--chc", required=True, help="output directory of the cluster stage, e.g. data/emoji/chc")
    p.add_argument("--out", required=True, help="output directory, e.g. data/emoji/prototypes")
    args = p.parse_args(argv)
    _, prof = stage_setup(args)
    run(prof.prototypes, prof.data.vendors.meta, args.embed, args.chc, args.out)
    write_manifest(args.out)
