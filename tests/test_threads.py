"""A stage computes with as many torch threads as its job was given (the rule's `threads`)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from gram import cli
from gram.io import job_threads


def test_job_threads_follow_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert job_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert job_threads() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("value", ["two", "0", "-2"])
def test_bad_omp_num_threads_is_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    with pytest.raises(ValueError, match=f"OMP_NUM_THREADS={value!r}"):
        job_threads()


def test_a_stage_runs_with_the_threads_of_its_job(monkeypatch, tmp_path):
    # a stand-in stage module that records the torch threads it computes with
    (tmp_path / "probe_stage.py").write_text(
        "import torch\nseen = []\ndef main(argv):\n    seen.append(torch.get_num_threads())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.STAGES, "probe", ("probe_stage", "records its threads"))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what Snakemake exports for a rule with threads: 1
        assert cli.main(["probe"]) == 0
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert cli.main(["probe"]) == 0
        assert sys.modules["probe_stage"].seen == [1, 2]
    finally:
        torch.set_num_threads(before)
