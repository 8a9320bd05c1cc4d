"""The tiny DAG through `snakemake --profile workflow/profiles/slurm` on a real one-node SLURM cluster.

tests/slurm/cluster.py starts munged, slurmctld and slurmd (root; Debian's slurm-wlm and munge) with
two fake GPUs, so the GPU rules schedule. Every job must go through sbatch (a SLURM job id and a per-job
log each, all COMPLETED), and every job's output must equal the same job's output in the session's local
run of the tiny DAG (conftest.tiny_snakemake_run, whose grid holds these jobs and more). Skipped where
no cluster can be started (not root, slurm-wlm missing, or a real cluster's config in /etc/slurm),
unless GRAM_REQUIRE_SLURM=1 (CI sets it after `python tests/slurm/cluster.py install`): then it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from test_pipeline_parity import copy_project, run

sys.path.insert(0, str(ROOT / "tests" / "slurm"))
import cluster  # noqa: E402  (tests/slurm/cluster.py, also a command-line tool)

pytestmark = pytest.mark.slow

# every rule kind once: download, backbone, zero-shot, few-shot/base-to-new/transfer tuning of a plain and
# a GRAM method, the structure stages, meta-training, test-time tuning and both reports (19 jobs)
GRID = {"methods": ["zeroshot"], "tuned": ["coop"], "meta": ["coop"], "gram": [{"method": "coop+gram", "meta": "coop"}],
        "datasets": ["subgroup16"], "shots": [2], "seeds": [1], "base_to_new_shots": 2,
        "transfer": {"dataset": "subgroup16", "shots": 2},
        "tpt": {"datasets": ["subgroup16"], "words": ["tpt"], "tuned": [], "gram": []}}
JOBS = 19
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.")


def _why_no_cluster() -> str | None:
    if os.geteuid() != 0:
        return "the test cluster's daemons run as root"
    if not shutil.which("slurmctld") or not shutil.which("munged"):
        return "slurm-wlm/munge not installed (python tests/slurm/cluster.py install)"
    if cluster.CONF.exists() and cluster.MARK not in cluster.CONF.read_text():
        return f"{cluster.CONF} belongs to a real cluster"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm not installed (pip install -e '.[slurm]')"
    return None


@pytest.fixture(scope="module")
def slurm_cluster():
    why = _why_no_cluster()
    if why is not None:
        if os.environ.get("GRAM_REQUIRE_SLURM") == "1":
            pytest.fail(f"GRAM_REQUIRE_SLURM=1 but no SLURM cluster can be started: {why}")
        pytest.skip(why)
    cluster.start(gpus=2)
    yield
    cluster.stop()


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, tmp_path_factory) -> tuple[Path, str]:
    cwd = copy_project(tmp_path_factory.mktemp("slurm"), "tiny", GRID)
    log = cwd / "snakemake-slurm.log"
    t0 = time.time()
    with log.open("w") as f:
        # the node has 2 CPUs: cap the rules' threads; no slurmdbd here, so status comes from squeue
        cmd = [sys.executable, str(ROOT / "tests/slurm/cluster.py"), "run", "--timeout", "1500", "--",
               "snakemake", "--profile", "workflow/profiles/slurm", "--max-threads", "2",
               "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "5", "--nocolor"]
        rc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT).returncode
    out = log.read_text()
    assert rc == 0, f"the SLURM run failed (rc {rc}):\n{out[-4000:]}"
    print(f"SLURM run of {JOBS} jobs: {time.time() - t0:.0f} s")
    return cwd, out


@pytest.fixture(scope="module")
def local_run(tiny_snakemake_run) -> Path:
    """The session's local Snakemake run of the tiny DAG (conftest.TINY_GRID, a superset of GRID's jobs)."""
    return tiny_snakemake_run


def comparable(obj):
    """A job's JSON record without wall times (and rates or fractions derived from them), floats rounded
    to 5 decimals (BLAS summation order may differ between two processes in the last bits)."""
    if isinstance(obj, dict):
        return {k: comparable(v) for k, v in obj.items()
                if not (k.endswith("_s") or k.startswith("ms_") or any(w in k for w in ("time", "seconds", "wait")))}
    if isinstance(obj, list):
        return [comparable(v) for v in obj]
    return round(obj, 5) if isinstance(obj, float) else obj


def test_every_job_went_through_sbatch(slurm_run):
    cwd, out = slurm_run
    submitted = SUBMITTED.findall(out)
    ids = [int(i) for i, _ in submitted]
    assert len(ids) == JOBS and len(set(ids)) == JOBS, out[-3000:]
    rules = set()
    for job_id, path in submitted:
        text = Path(path).read_text()  # the per-job log (kept: the profile sets slurm-keep-successful-logs)
        assert Path(path).relative_to(cwd / "logs/slurm") and Path(path).name == f"{job_id}.log"
        assert "--executor slurm-jobstep" in text or "slurm-jobstep" in text, path
        rules.add(Path(path).parts[-3].removeprefix("rule_"))
        info = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
        assert "JobState=COMPLETED" in info, info  # MinJobAge=300 keeps finished jobs visible
    assert rules == {"download", "backbone", "evaluate", "few_shot", "base_to_new", "transfer", "embed", "cluster",
                     "tasks", "prototypes", "meta", "tpt", "report", "tpt_report"}


def test_gpu_rules_asked_for_a_gpu(slurm_run):
    _, out = slurm_run
    gpu_rules = {"backbone", "embed", "cluster", "evaluate", "few_shot", "base_to_new", "transfer", "meta", "tpt"}
    for block in out.split("\nrule ")[1:]:
        rule = block.split(":", 1)[0]
        resources = re.search(r"resources: (.*)", block)
        if resources is None or rule == "all":
            continue
        assert ("gpu=1" in resources.group(1)) == (rule in gpu_rules), (rule, resources.group(1))


def test_slurm_jobs_equal_the_local_run(slurm_run, local_run):
    """Every job's output of the SLURM run equals the same job's output in the local run."""
    import json

    import torch

    from gram.tensorio import load_tensors

    cwd, _ = slurm_run
    compared = set()
    for top in ("results/tiny/eval", "results/tiny/runs", "results/tiny/tpt", "data/tiny/embed", "data/tiny/chc",
                "data/tiny/tasks", "data/tiny/prototypes", "models/tiny/prompts", "models/tiny/meta"):
        # manifests record modification times: their directories' content is what is compared
        files = sorted(f for f in (cwd / top).rglob("*") if f.is_file() and not f.name.endswith(".manifest.json"))
        assert files, top
        for f in files:
            rel = f.relative_to(cwd)
            other = local_run / rel
            assert other.is_file(), f"{rel}: written by the SLURM run, not by the local run"
            if f.suffix == ".json":
                assert comparable(json.loads(f.read_text())) == comparable(json.loads(other.read_text())), rel
            elif f.suffix == ".safetensors" and top.startswith("models/"):  # tuned tensors: to float32 rounding
                (a, ma), (b, mb) = load_tensors(f), load_tensors(other)
                assert ma == mb and a.keys() == b.keys(), rel
                for k in a:
                    torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
            elif f.suffix != ".png":  # embeddings, hierarchy, tasks, prototypes: byte for byte
                assert f.read_bytes() == other.read_bytes(), rel
            compared.add(top.split("/")[-1])
    assert len(compared) == 9
    assert "Nothing to be done" in run(["snakemake", "-n", "--cores", "1", "--nocolor"], cwd)


def test_run_past_its_timeout_cancels_the_submitted_jobs(slurm_cluster, tmp_path):
    """The harness's bound: a command that submits a long job and hangs is interrupted and its job cancelled."""
    script = tmp_path / "hang.sh"
    script.write_text("#!/bin/bash\nsbatch --parsable --wrap 'sleep 600' > job.id\nsleep 600\n")
    t0 = time.time()
    rc = cluster.run(["bash", str(script)], timeout=5, cwd=str(tmp_path))
    assert rc == 124 and time.time() - t0 < 90
    job = (tmp_path / "job.id").read_text().strip()
    assert job.isdigit()
    queued = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()
    assert queued in ("", "CANCELLED", "COMPLETING"), queued
    for _ in range(60):  # COMPLETING while slurmd reaps the job step
        info = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
        if "JobState=COMPLETING" not in info:
            break
        time.sleep(0.5)
    assert "JobState=CANCELLED" in info, info


def test_snakemake_report_is_self_contained_with_every_table_and_plot(local_run):
    """`snakemake --report`: one HTML file holding the report() outputs with their captions, nothing fetched."""
    out = run(["snakemake", "--report", "report.html", "--cores", "1", "--nocolor"], local_run)
    assert "Report created" in out, out
    html = (local_run / "report.html").read_text()
    assert len(html) > 100_000
    for name in ("zero_shot.csv", "zero_shot.png", "backbone.png", "few_shot.csv", "few_shot.png", "base_to_new.csv",
                 "cross_dataset.csv", "domain_generalisation.csv", "clustering.csv", "clustering.png",
                 "meta_training.png", "test_time.csv", "test_time.png"):
        assert f"Adding {name}" in out, name
    for words in ("Cross-Modal Hierarchical Clustering of the meta-training pairs", "Test-time tuning (TPT) per method",
                  "Base-to-new protocol", "GRAM (gradient-regulated meta-prompt learning)"):
        assert words in html, words
    # self-contained: no script, stylesheet or image is loaded from elsewhere
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=[\"']https?://", html)
