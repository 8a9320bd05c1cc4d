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

from conftest import ROOT, SMALL_GRID, SMALL_JOBS, assert_jobs_equal
from test_pipeline_parity import copy_project, run

sys.path.insert(0, str(ROOT / "tests" / "slurm"))
import cluster  # noqa: E402  (tests/slurm/cluster.py, also a command-line tool)

pytestmark = pytest.mark.slow

GRID, JOBS = SMALL_GRID, SMALL_JOBS  # every rule kind once (conftest)
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


# one thread per job, as in the local run (the node has 2 CPUs: two jobs at once); no slurmdbd here, so
# status comes from squeue, first checked 2 s after a submission or a finished job
COMMAND = ["snakemake", "--profile", "workflow/profiles/slurm", "--max-threads", "1", "--slurm-status-command",
           "squeue", "--slurm-init-seconds-before-status-checks", "2", "--nocolor"]
TIMEOUT = 1500


class Background:
    """The SLURM run of GRID in a copy of the project, started as the session begins (conftest's
    pytest_collection_modifyitems calls `start` when a test that needs it is selected): the run mostly
    waits on SLURM's status checks, so the session's other tests use the CPUs meanwhile."""

    run: Background | None = None

    def __init__(self, root: Path):
        self.cwd = copy_project(root, "tiny", GRID)
        self.log = self.cwd / "snakemake-slurm.log"
        self.t0 = time.time()
        self._out = self.log.open("w")
        self.proc = cluster.launch(COMMAND, self.cwd, self._out)
        self.rc: int | None = None

    @classmethod
    def start(cls, root: Path) -> None:
        if cls.run is None and _why_no_cluster() is None:
            try:
                cluster.start(gpus=2)
                cls.run = cls(root)
            except (Exception, SystemExit):  # the fixture starts it again, and that reports why
                return

    def result(self) -> tuple[Path, str]:
        if self.rc is None:
            self.rc = cluster.finish(self.proc, TIMEOUT - (time.time() - self.t0))
            self._out.close()
            print(f"SLURM run of {JOBS} jobs: {time.time() - self.t0:.0f} s")
        out = self.log.read_text()
        assert self.rc == 0, f"the SLURM run failed (rc {self.rc}):\n{out[-4000:]}"
        return self.cwd, out

    @classmethod
    def stop(cls) -> None:
        """Interrupt a run still going (the session ended before its tests) and stop the cluster."""
        if cls.run is not None:
            if cls.run.rc is None:
                cls.run.rc = cluster.finish(cls.run.proc, 0.001)
                cls.run._out.close()
            cluster.stop()


@pytest.fixture(scope="module")
def slurm_cluster():
    why = _why_no_cluster()
    if why is not None:
        if os.environ.get("GRAM_REQUIRE_SLURM") == "1":
            pytest.fail(f"GRAM_REQUIRE_SLURM=1 but no SLURM cluster can be started: {why}")
        pytest.skip(why)
    cluster.start(gpus=2)  # running already when the background run started it
    yield
    Background.stop()
    cluster.stop()


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, tmp_path_factory) -> tuple[Path, str]:
    if Background.run is None:  # not started with the session (e.g. the module run on its own by name)
        Background.start(tmp_path_factory.mktemp("slurm"))
    return Background.run.result()


@pytest.fixture(scope="module")
def local_run(tiny_snakemake_run) -> Path:
    """The session's local Snakemake run of the tiny DAG (conftest.TINY_GRID, a superset of GRID's jobs)."""
    return tiny_snakemake_run


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
        assert "JobState=COMPLETED" in info, info  # MinJobAge=3600 keeps finished jobs visible this long
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
    cwd, _ = slurm_run
    assert len(assert_jobs_equal(cwd, local_run)) == 9
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
