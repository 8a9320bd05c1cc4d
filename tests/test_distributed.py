"""Multi-process meta-training (gram/distributed.py, gram/meta.py): two gloo processes on the CPU reach
the parameters of one process with the same outer batch; rank 0 alone checkpoints and a checkpoint
resumes; `GRAM_NPROC=2 gram meta` restarts itself under torchrun and writes what one process writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from gram import distributed as D
from gram import meta as M
from gram.tensorio import load_tensors, save_tensors
from test_meta import PARAMS, _Tasks, metaworld, stage, tiny_learner  # noqa: F401 (metaworld: a fixture)

# name -> (prompt kind, MetaParams overrides) of the runs compared with one process, in float64
SCENARIOS = {
    "even": ("joint", dict(steps=3, tasks_per_step=4)),  # 2 tasks per rank
    "odd": ("coop", dict(steps=3, tasks_per_step=3, reg_lambda=0.5)),  # 2 and 1: unequal shares
    "single": ("vpt", dict(steps=3, tasks_per_step=1)),  # rank 1 never has a task: it adds zeros
}
RESUMED = ("joint", dict(steps=5, tasks_per_step=3, checkpoint_every=2))
ATOL = 1e-10  # float64: only the order of the gradient sums differs between 1 and 2 processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _params(ml) -> dict[str, torch.Tensor]:
    """θ and φ of a MetaLearner, detached, named as in meta.safetensors."""
    return {**{f"theta.{n}": v.detach() for n, v in ml.theta.items()},
            **{f"phi.{n}": v.detach() for n, v in ml.phi.items()}}


def _save(path, ml, history, **extra) -> None:
    save_tensors(path, _params(ml), {"history": history, **extra})


def _worker(rank: int, port: int, clip_dir, out) -> None:
    """One of two ranks: every scenario, then a run interrupted after 3 steps and resumed by fresh learners."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    world = D.init("cpu")
    assert (world.rank, world.size) == (rank, 2)
    try:
        for name, (kind, over) in SCENARIOS.items():
            ml = tiny_learner(clip_dir, kind, **over)
            history = M.meta_train(ml, _Tasks(), ml.cfg, None, progress=False, world=world)
            _save(out / f"{name}.rank{rank}.safetensors", ml, history)
        writes = []  # the steps this rank checkpointed
        save = M.save_checkpoint
        M.save_checkpoint = lambda ckpt, ml, opt, step, *a: (writes.append(step), save(ckpt, ml, opt, step, *a))
        kind, over = RESUMED
        part = tiny_learner(clip_dir, kind, **over)
        M.meta_train(part, _Tasks(), part.cfg, out / "ckpt", "d", progress=False, stop_after=3, world=world)
        resumed = tiny_learner(clip_dir, kind, **over)
        history = M.meta_train(resumed, _Tasks(), resumed.cfg, out / "ckpt", "d", progress=False, world=world)
        _save(out / f"resumed.rank{rank}.safetensors", resumed, history, writes=writes)
    finally:
        D.close(world)


@pytest.fixture(scope="module")
def two_ranks(tiny_clip_dir, tmp_path_factory):
    """The outputs of `_worker` on two gloo processes (one spawn for every scenario)."""
    out = tmp_path_factory.mktemp("ranks")
    ctx = mp.spawn(_worker, args=(_free_port(), tiny_clip_dir, out), nprocs=2, join=False)
    deadline = time.time() + 300
    while not ctx.join(timeout=2):  # re-raises a rank's exception
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two meta-training processes did not finish in 300 s")
    return out


def _one_process(clip_dir, kind, over, ckpt=None):
    ml = tiny_learner(clip_dir, kind, **over)
    start = {n: v.clone() for n, v in _params(ml).items()}
    history = M.meta_train(ml, _Tasks(), ml.cfg, ckpt, "d", progress=False)
    return ml, history, start


def _assert_history_close(got, want):
    assert [h["step"] for h in got] == [h["step"] for h in want]
    for key in ("support_loss", "query_loss", "gate"):
        np.testing.assert_allclose([h[key] for h in got], [h[key] for h in want], rtol=0, atol=2e-5, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_gloo_processes_equal_one_with_the_same_global_batch(two_ranks, tiny_clip_dir, name):
    """θ, φ after 3 outer steps on 2 ranks equal the 1-process run (atol 1e-10 in float64), the two ranks
    hold bit-identical parameters, and the history holds the global means."""
    kind, over = SCENARIOS[name]
    ml, history, start = _one_process(tiny_clip_dir, kind, over)
    ranks = [load_tensors(two_ranks / f"{name}.rank{r}.safetensors") for r in (0, 1)]
    (t0, m0), (t1, m1) = ranks
    for n, v in t0.items():
        assert torch.equal(v, t1[n]), f"ranks differ in {n}"
    one = _params(ml)
    assert set(one) == set(t0)
    diff = max((t0[n] - v).abs().max().item() for n, v in one.items())
    assert diff <= ATOL, f"max |2 processes - 1 process| = {diff:.3g}"
    moved = min(max((one[n] - start[n]).abs().max().item() for n in one if n.startswith(part))
                for part in ("theta.", "phi."))
    assert moved > 1e-4  # non-vacuous: θ and φ moved
    _assert_history_close(m0["history"], history)
    assert m0["history"] == m1["history"]


@pytest.mark.slow
def test_rank_0_alone_checkpoints_and_a_two_process_checkpoint_resumes(two_ranks, tiny_clip_dir):
    """Interrupted after 3 of 5 steps and resumed, 2 ranks end where 1 uninterrupted process does; only
    rank 0 wrote checkpoints (steps 2 and 4), and one process resumes from the 2-process checkpoint too."""
    kind, over = RESUMED
    whole, history, _ = _one_process(tiny_clip_dir, kind, over)
    (t0, m0), (t1, m1) = (load_tensors(two_ranks / f"resumed.rank{r}.safetensors") for r in (0, 1))
    assert (m0["writes"], m1["writes"]) == ([2, 4], [])
    for n, v in _params(whole).items():
        torch.testing.assert_close(t0[n], v, rtol=0, atol=ATOL)
        assert torch.equal(t0[n], t1[n])
    _assert_history_close(m0["history"], history)
    # the last checkpoint (step 4, written by rank 0) resumed by one process
    one, rest, _ = _one_process(tiny_clip_dir, kind, over, ckpt=two_ranks / "ckpt")
    assert len(rest) == 5 and rest[:4] == m0["history"][:4]
    for n, v in _params(whole).items():
        torch.testing.assert_close(_params(one)[n], v, rtol=0, atol=ATOL)


@pytest.mark.slow
def test_gram_meta_on_two_processes_writes_what_one_writes(metaworld, tmp_path):  # noqa: F811
    """`GRAM_NPROC=2 gram meta` (the DAG's command) relaunches under torchrun with gloo: the same tensors
    (atol 1e-5, float32) and tensor metadata as the in-process one-process run; meta.json says world_size 2."""
    out, log = tmp_path / "meta" / "coop", tmp_path / "meta.log"
    cmd = [sys.executable, "-m", "gram", "meta", "--params", PARAMS, "--profile", "tiny", "--recipe", "coop",
           "--data", str(metaworld["data"]), "--chc", str(metaworld["chc"]), "--tasks", str(metaworld["tasks"]),
           "--backbone", str(metaworld["backbone"]), "--out", str(out), "--log", str(log)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", D.CHILD)}
    done = subprocess.run(cmd, env={**env, "GRAM_NPROC": "2"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two, two_meta = load_tensors(out / M.META)
    one, one_meta = load_tensors(metaworld["meta"] / M.META)
    assert two_meta == one_meta  # no trace of the process count in the tensor file
    assert set(two) == set(one)
    for n in one:
        torch.testing.assert_close(two[n], one[n], rtol=0, atol=1e-5)
    info2 = json.loads((out / "meta.json").read_text())
    info1 = json.loads((metaworld["meta"] / "meta.json").read_text())
    assert (info2["world_size"], info1["world_size"]) == (2, 1)
    _assert_history_close(info2["history"], info1["history"])
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "meta.png", "meta.safetensors"]
    assert not (out.parent / ".coop.ckpt").exists()
    text = log.read_text()
    assert "meta-training on 2 processes" in text and "process 0 of 2 (gloo backend)" in text
    assert text.count("meta-trained coop") == 1  # rank 1 does not log


@pytest.mark.parametrize("value", ["two", "0", "-1", "1.5"])
def test_a_bad_gram_nproc_is_a_clear_error(monkeypatch, capsys, tmp_path, value):
    monkeypatch.setenv("GRAM_NPROC", value)
    for name in ("RANK", "WORLD_SIZE", D.CHILD):
        monkeypatch.delenv(name, raising=False)
    paths = [arg for flag in ("--data", "--chc", "--tasks", "--backbone", "--out") for arg in (flag, str(tmp_path))]
    assert stage("meta", "--recipe", "coop", *paths) == 1
    err = capsys.readouterr().err
    assert f"GRAM_NPROC={value!r}: expected a positive integer" in err


def test_process_count_and_the_world_of_one(monkeypatch):
    """`auto`: one process per visible GPU when the backbone runs on CUDA, else one; without torchrun's
    variables `init` joins no process group."""
    for name in ("RANK", "WORLD_SIZE", "GRAM_NPROC", D.CHILD):
        monkeypatch.delenv(name, raising=False)
    assert not D.launched()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [D.processes_wanted(d) for d in ("auto", "cuda", "cuda:1", "cpu")] == [4, 4, 1, 1]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert D.processes_wanted("auto") == 1
    monkeypatch.setenv("GRAM_NPROC", "")  # set but empty: auto
    assert D.processes_wanted("auto") == 1
    monkeypatch.setenv("GRAM_NPROC", " 3 ")
    assert D.processes_wanted("cpu") == 3
    assert D.init("cpu") == D.World() and not torch.distributed.is_initialized()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="would put every meta-training process on one GPU"):
        D.init("cuda:1")
    ids = np.arange(5)
    world = D.World(1, 2)
    assert D.shard(ids, world).tolist() == [1, 3] and D.shard(ids, D.World()).tolist() == ids.tolist()
