"""Benchmark: how Cross-Modal Hierarchical Clustering (`gram.cluster.hierarchy`) scales, next to exact Ward.

Exact Ward over N points needs all N(N-1)/2 pairwise distances: time and memory grow with N². `hierarchy`
runs k-means to K = `--fine-k` clusters (each pass linear in N), then exact size-weighted Ward over the K
centroids only (independent of N). References run in the same process and are reported as ratios.
Data: N unit vectors in 512-d, a seeded mixture on the sphere (`--centres` unit centres, log-normal
weights, member = normalize(centre + noise)); img and txt are two noisier views of each member and
z = `fuse(img, txt)`, written chunk by chunk so that only img, txt and z are resident.

- `centroid`, each N of `--sizes`: one `hierarchy(z, fine_k, --levels, iters=--iters,
  seed_sample=--seed-sample)`, with timing
  wrappers swapped into `gram.cluster` for the call (`kmeans`, `_seed_pp`, `_assign`, `_means`,
  `ward_linkage`, `cut`): k-means++ seeding, Lloyd phase, seconds per assignment pass (Lloyd / passes;
  passes = iterations run + the first assignment; k-means stops early once nothing changes), Ward over
  the centroids, the rest (cuts, level centroids, parents); then `complexity(img, txt, h, level=1)`.
  Peak RSS per phase (the mark is reset through /proc/self/clear_refs).
- `sklearn_kmeans` (smallest N; `--no-sklearn`): `kmeans_plusplus` (the same greedy k-means++) then
  `KMeans(init=those, n_init=1, max_iter=--iters, tol=0, algorithm="lloyd")`. Ratios: sklearn / gram.
- `exact_ward` (`--exact-sizes`): scipy `linkage(x, "ward")` over all points of subsamples (what
  sklearn's AgglomerativeClustering(linkage="ward") calls), and the log-log slope of time against n.
  Both approaches are extrapolated to `--target` pairs under the JSON key `extrapolated`.

Run from the repository root; the JSON goes to `benchmarks/results/clustering-<device>.json`, rewritten
atomically after every size (see `benchmarks/README.md`):

    python benchmarks/clustering.py --threads 2                  # defaults; cuda if available
    python benchmarks/clustering.py --sizes 20000,50000 --exact-sizes 1000,2000 --iters 3
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a plain script from anywhere: make `gram` importable
    sys.path.insert(0, str(ROOT))

from gram import cluster  # noqa: E402
from gram.io import write_json  # noqa: E402
from benchenv import read_peak, reset_peak  # noqa: E402

DIM, CHUNK, GIB = 512, 65536, 2.0 ** 30
PROBED = ("kmeans", "_seed_pp", "_assign", "_means", "ward_linkage", "cut")
CPU = torch.device("cpu")


def clock(fn, device: torch.device):
    """(seconds, result) of fn(); on CUDA the device is synchronised before each reading of the clock."""
    wait = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    wait()
    t0 = time.perf_counter()
    out = fn()
    wait()
    return time.perf_counter() - t0, out



def environment(device: torch.device) -> dict:
    import scipy
    import sklearn

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    name = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), platform.machine())
    env = {"device": str(device), "device_name": name, "torch": torch.__version__, "numpy": np.__version__,
           "scipy": scipy.__version__, "sklearn": sklearn.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(),
           "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)}
    if device.type == "cuda":
        env.update(device_name=torch.cuda.get_device_name(device), host_cpu=name, cuda=torch.version.cuda)
    return env


def make_data(n: int, args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """img, txt, z [n, DIM] float32 on the CPU: two noisy views of a seeded mixture on the sphere, fused."""
    gen = torch.Generator().manual_seed(args.seed)
    mu = F.normalize(torch.randn(args.centres, DIM, generator=gen), dim=1)  # [C, D]
    weight = torch.randn(args.centres, generator=gen).exp()  # log-normal mixture weights
    img, txt, z = (torch.empty(n, DIM) for _ in range(3))
    s_member, s_view = args.noise / math.sqrt(DIM), args.view_noise / math.sqrt(DIM)  # per coordinate
    for s in range(0, n, CHUNK):
        m = min(CHUNK, n - s)
        lab = torch.multinomial(weight, m, replacement=True, generator=gen)
        member = F.normalize(mu[lab] + s_member * torch.randn(m, DIM, generator=gen), dim=1)
        img[s:s + m] = F.normalize(member + s_view * torch.randn(m, DIM, generator=gen), dim=1)
        txt[s:s + m] = F.normalize(member + s_view * torch.randn(m, DIM, generator=gen), dim=1)
        z[s:s + m] = cluster.fuse(img[s:s + m], txt[s:s + m])
    return img, txt, z


@contextlib.contextmanager
def probe(device: torch.device):
    """Times every call of the PROBED functions of gram.cluster while active: yields {name: [seconds]}, plus
    the last k-means output under "kmeans_out". A refactored gram.cluster fails here: update PROBED."""
    calls, saved = {name: [] for name in PROBED}, {name: getattr(cluster, name) for name in PROBED}

    def wrap(name: str, fn):
        def timed(*a, **kw):
            seconds, out = clock(lambda: fn(*a, **kw), device)
            calls[name].append(seconds)
            if name == "kmeans":
                calls["kmeans_out"] = out
            return out
        return timed

    for name, fn in saved.items():
        setattr(cluster, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(cluster, name, fn)


def run_centroid(n: int, args, device: torch.device) -> tuple[dict, torch.Tensor, tuple]:
    """hierarchy() then complexity() at size n; returns the record, z and the k-means output."""
    gen_s, (img, txt, z) = clock(lambda: make_data(n, args), CPU)
    zd = z.to(device)
    mark = reset_peak(device)
    with probe(device) as c:
        total_s, h = clock(lambda: cluster.hierarchy(zd, args.fine_k, args.levels, seed=args.seed, iters=args.iters,
                                                     device=device, batch_size=args.batch_size,
                                                     seed_sample=args.seed_sample), device)
    mem = read_peak(device, mark)
    passes, seed_s, kmeans_s, ward_s = len(c["_assign"]), c["_seed_pp"][0], c["kmeans"][0], c["ward_linkage"][0]
    level = 1 if args.levels else 0
    mark = reset_peak(device)
    cx_s, _ = clock(lambda: cluster.complexity(img, txt, h, level), CPU)
    rec = {"n": n, "data_gib_each": round(n * DIM * 4 / GIB, 3), "generate_s": gen_s,
           "iterations_run": passes - 1, "converged_early": len(c["_means"]) == passes - 1,
           "assignment_passes": passes, "hierarchy_s": total_s, "kmeans_s": kmeans_s, "seed_s": seed_s,
           "lloyd_s": kmeans_s - seed_s, "s_per_pass": (kmeans_s - seed_s) / passes,
           "assign_median_s": statistics.median(c["_assign"]), "means_median_s": statistics.median(c["_means"]),
           "ward_s": ward_s, "cut_s": sum(c["cut"]), "rest_s": total_s - kmeans_s - ward_s,
           "level_sizes": h.sizes, "complexity_level": level, "complexity_s": cx_s,
           "memory_hierarchy": mem, "memory_complexity": read_peak(device, mark), "loadavg_after": os.getloadavg()}
    return rec, z, c["kmeans_out"]


def run_sklearn(z: torch.Tensor, gram: dict, gram_kmeans, args) -> dict:
    """sklearn's k-means++ seeding and Lloyd on the same points and settings; ratios are sklearn / gram."""
    from sklearn.cluster import KMeans, kmeans_plusplus
    from threadpoolctl import threadpool_limits

    x = z.numpy()
    with threadpool_limits(limits=torch.get_num_threads()):
        seed_s, (init, _) = clock(lambda: kmeans_plusplus(x, args.fine_k, random_state=args.seed), CPU)
        km = KMeans(args.fine_k, init=init, n_init=1, max_iter=args.iters, tol=0.0, algorithm="lloyd",
                    random_state=args.seed)
        lloyd_s, _ = clock(lambda: km.fit(x), CPU)
    per_pass = lloyd_s / (km.n_iter_ + 1)  # iterations + the final assignment, as counted for gram
    c, a = (t.cpu() for t in gram_kmeans)  # gram's within-cluster sum of squares, in float64
    gram_sse = sum(float((z[s:s + CHUNK] - c[a[s:s + CHUNK]]).double().pow(2).sum()) for s in range(0, len(z), CHUNK))
    return {"n": len(x), "seed_s": seed_s, "lloyd_s": lloyd_s, "total_s": seed_s + lloyd_s,
            "iterations_run": int(km.n_iter_), "s_per_pass": per_pass, "sse": float(km.inertia_),
            "gram_sse": gram_sse, "gram_kmeans_s": gram["kmeans_s"],
            "ratio_total": (seed_s + lloyd_s) / gram["kmeans_s"], "ratio_seed": seed_s / gram["seed_s"],
            "ratio_per_pass": per_pass / gram["s_per_pass"], "loadavg_after": os.getloadavg(),
            "ratio_is": "sklearn seconds / gram seconds (above 1: gram is faster)"}


def slope(rows: list[dict], key: str) -> float:  # least-squares slope of log(row[key]) on log(row["n"])
    return float(np.polyfit(np.log([r["n"] for r in rows]), np.log([r[key] for r in rows]), 1)[0])


def run_exact(args, device: torch.device) -> dict:
    """scipy's exact Ward on the first n points of one sample (the rows are i.i.d.), for every n."""
    from scipy.cluster.hierarchy import linkage

    x = make_data(max(args.exact_sizes), args)[2].double().numpy()
    runs = []
    for n in args.exact_sizes:
        mark = reset_peak(device)
        s, _ = clock(lambda: linkage(x[:n], method="ward"), CPU)
        runs.append({"n": n, "s": s, "condensed_gib": n * (n - 1) / 2 * 8 / GIB, **read_peak(device, mark),
                     "loadavg_after": os.getloadavg()})
        print(f"exact Ward n={n}: {s:.2f} s", file=sys.stderr, flush=True)
    out = {"call": 'scipy.cluster.hierarchy.linkage(x, method="ward") on float64', "runs": runs}
    return dict(out, exponent=slope(runs, "s")) if len(runs) >= 2 else out


def extrapolate(cent: list[dict], exact: dict | None, args) -> dict:
    """Both approaches at n = args.target, computed from the measurements; nothing here was run."""
    t = args.target
    out = {"note": f"EXTRAPOLATED to n={t}, not measured", "n": t}
    if exact and exact["runs"]:
        big = exact["runs"][-1]
        grown = big["peak_rss_gib"] - big.get("rss_before_gib", 0.0)  # what linkage() added at n_sub
        e = out["exact_ward"] = {
            "s_quadratic": big["s"] * (t / big["n"]) ** 2, "memory_condensed_tib": t * (t - 1) / 2 * 8 / 2 ** 40,
            "measured_rss_over_condensed": grown / big["condensed_gib"],
            "method": "time: the largest subsample's time scaled by (n / n_sub)^2 (NN-chain Ward is O(n^2)) and by "
                      "(n / n_sub)^exponent; memory: scipy's condensed distance matrix, n(n-1)/2 float64 (the "
                      "measured RSS growth over it at n_sub says how many such matrices scipy held)"}
        if "exponent" in exact:
            e["s_fitted_exponent"] = big["s"] * (t / big["n"]) ** exact["exponent"]
    if cent:
        big = cent[-1]
        f, passes = t / big["n"], args.iters + 1
        c = out["centroid"] = {k: big[k] * f for k in ("seed_s", "s_per_pass", "rest_s", "complexity_s")}
        mem = big["memory_hierarchy"]
        fixed = mem.get("rss_before_gib", 0.0) - 3 * big["data_gib_each"]  # interpreter and libraries
        c.update(passes=passes, ward_s=big["ward_s"], data_gib_each=t * DIM * 4 / GIB,
                 peak_rss_gib=fixed + (mem["peak_rss_gib"] - fixed) * f)
        c["hierarchy_s"] = c["seed_s"] + passes * c["s_per_pass"] + c["ward_s"] + c["rest_s"]
        c["method"] = (f"n={big['n']} (largest measured) scaled in proportion to n, fixed costs too (leans high); "
                       "Ward over the centroids unchanged (depends on fine_k only); passes = --iters + 1; peak RSS: "
                       "all but the interpreter and libraries scaled")
        if len(cent) >= 2:
            c.update({f"measured_exponent_{k}": slope(cent, k) for k in ("hierarchy_s", "seed_s", "s_per_pass")})
    return out


def table(report: dict) -> str:
    head = f"{'N':>9} {'iters':>5} {'seed s':>8} {'s/pass':>7} {'lloyd s':>8} {'ward s':>6} {'rest s':>6} " \
           f"{'total s':>8} {'cplx s':>6} {'peak GiB':>8}"
    rows = [head, "-" * len(head)]
    for r in report["centroid"]:
        rows.append(f"{r['n']:>9} {r['iterations_run']:>5} {r['seed_s']:>8.1f} {r['s_per_pass']:>7.3f} "
                    f"{r['lloyd_s']:>8.1f} {r['ward_s']:>6.2f} {r['rest_s']:>6.2f} {r['hierarchy_s']:>8.1f} "
                    f"{r['complexity_s']:>6.2f} {r['memory_hierarchy']['peak_rss_gib']:>8.2f}")
    if sk := report.get("sklearn_kmeans"):
        rows.append(f"sklearn KMeans n={sk['n']}: seed {sk['seed_s']:.1f} s, {sk['s_per_pass']:.3f} s/pass, "
                    f"total {sk['total_s']:.1f} s; sklearn/gram: total {sk['ratio_total']:.2f}x, "
                    f"seed {sk['ratio_seed']:.2f}x, per pass {sk['ratio_per_pass']:.2f}x; "
                    f"SSE sklearn/gram {sk['sse'] / sk['gram_sse']:.4f}")
    if ex := report.get("exact_ward"):
        rows.append("exact Ward: " + ", ".join(f"n={r['n']} {r['s']:.2f} s" for r in ex["runs"])
                    + f"; exponent {ex.get('exponent', math.nan):.2f}")
    x, e, c = report["extrapolated"], report["extrapolated"].get("exact_ward"), report["extrapolated"].get("centroid")
    if e and c:
        rows.append(f"EXTRAPOLATED to n={x['n']}: exact Ward {e['s_quadratic'] / 86400:.1f} days (n^2) and "
                    f"{e['memory_condensed_tib']:.1f} TiB of distances; centroid hierarchy {c['hierarchy_s']:.0f} s "
                    f"and {c['peak_rss_gib']:.1f} GiB peak RSS")
    return "\n".join(rows)


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", type=ints, default=[100000, 300000, 1000000], help="N values for hierarchy()")
    p.add_argument("--fine-k", type=int, default=1000, help="k-means clusters (the finest level)")
    p.add_argument("--levels", type=ints, default=[200, 50, 10], help="coarser level sizes, decreasing")
    p.add_argument("--iters", type=int, default=10, help="at most this many Lloyd iterations (may stop early)")
    p.add_argument("--batch-size", type=int, default=16384, help="k-means rows per distance block")
    p.add_argument("--seed-sample", type=int, default=0,
                   help="k-means++ seeding from this many random points (0: all; cluster.seed_sample)")
    p.add_argument("--exact-sizes", type=ints, default=[2000, 4000, 8000, 16000], help="exact-Ward subsamples")
    p.add_argument("--no-sklearn", action="store_true", help="skip the sklearn KMeans reference")
    p.add_argument("--target", type=int, default=3_000_000, help="n to extrapolate both approaches to")
    p.add_argument("--centres", type=int, default=2000, help="mixture components of the synthetic data")
    p.add_argument("--noise", type=float, default=0.5, help="norm of a member's noise around its centre")
    p.add_argument("--view-noise", type=float, default=0.3, help="norm of the image/text noise around a member")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; also the sklearn/BLAS limit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/clustering-<device>.json)")
    args = p.parse_args(argv)
    args.sizes, args.exact_sizes = sorted(args.sizes), sorted(args.exact_sizes)
    if not args.sizes or not 2 <= args.fine_k <= args.sizes[0]:
        p.error(f"--fine-k {args.fine_k} must lie between 2 and the smallest of --sizes")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = args.out or ROOT / "benchmarks" / "results" / f"clustering-{device.type}.json"
    report = {
        "benchmark": "clustering",
        "what": "gram.cluster.hierarchy (k-means to fine_k clusters, then exact size-weighted Ward over the "
                "centroids) against exact Ward over all points (scipy) and sklearn KMeans; seconds per call",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "environment": environment(device),
        "settings": dict(vars(args), out=os.path.relpath(out, ROOT), dim=DIM),
        "memory_note": "peak_rss_gib: getrusage ru_maxrss over the phase (mark reset before it); rss_before_gib: "
                       "the RSS at the reset (interpreter, libraries and the resident img/txt/z)",
        "complete": False, "centroid": [], "extrapolated": {},
    }
    for i, n in enumerate(args.sizes):
        print(f"hierarchy n={n} fine_k={args.fine_k} levels={args.levels} iters={args.iters}", file=sys.stderr)
        rec, z, km = run_centroid(n, args, device)
        report["centroid"].append(rec)
        print(f"  {rec['hierarchy_s']:.1f} s, {rec['iterations_run']} iterations", file=sys.stderr, flush=True)
        if i == 0 and not args.no_sklearn:  # the reference on the same points, right after gram's run
            report["sklearn_kmeans"] = run_sklearn(z, rec, km, args)
        del z, km
        write_json(out, report)
    report["exact_ward"] = run_exact(args, device) if args.exact_sizes else None
    report["extrapolated"] = extrapolate(report["centroid"], report["exact_ward"], args)
    report["environment"]["loadavg_end"] = os.getloadavg()
    report["complete"] = True
    write_json(out, report)
    print(table(report))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
