"""Multi-process meta-training (meta stage): the torchrun world and its few collectives. [ours]

One outer step of GRAM's meta-training averages the task losses of a meta-batch; the tasks are
independent, so N processes can each take every N-th task of the batch and sum their gradients.
Everything here is a no-op for a world of one process, so `gram meta` runs the same code either way:

    world = init(device)                  reads torchrun's RANK, WORLD_SIZE, LOCAL_RANK; else World()
    mine  = shard(ids, world)             rank r takes ids[r::N]
    all_reduce_grads(params, world)       Σ over ranks of the gradients, one flat buffer
    broadcast_params(params, world)       every rank starts from rank 0's θ, φ
    close(world)

`gram meta` starts the processes itself (`relaunch`) when `GRAM_NPROC` asks for more than one, so the
command line of the DAG is the same for any process count:

    GRAM_NPROC   a positive integer, or `auto` (the default, also when empty): one process per visible
                 CUDA device when `backbone.device` is auto or cuda and CUDA is there, else one
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

NPROC = "GRAM_NPROC"
CHILD = "GRAM_TORCHRUN_CHILD"  # set in the environment of the processes `relaunch` starts


@dataclass(frozen=True)
class World:
    """This process's place among the meta-training processes (a world of one without torchrun)."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs, checkpoints and writes outputs."""
        return self.rank == 0


def _torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launched() -> bool:
    """Whether this process was started by torchrun (it sets RANK and WORLD_SIZE) or by `relaunch`:
    then it must not start processes itself."""
    return _torchrun() or CHILD in os.environ


def uses_cuda(device: str) -> bool:
    """Whether a `backbone.device` setting ("auto", "cpu", "cuda", "cuda:1") resolves to CUDA here."""
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def processes_wanted(device: str) -> int:
    """The process count `GRAM_NPROC` asks for, for a backbone on `device`.

    Raises:
        ValueError naming the variable and its value when it is neither `auto` nor a positive integer.
    """
    value = os.environ.get(NPROC, "").strip() or "auto"  # set but empty: the default
    if value == "auto":  # one process per GPU, unless the backbone is pinned to the CPU or to one GPU
        return max(1, torch.cuda.device_count()) if device in ("auto", "cuda") and uses_cuda(device) else 1
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{NPROC}={value!r}: expected a positive integer (processes) or 'auto' "
                         f"(one per visible CUDA device)")
    return n


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run `python -m gram <argv>` on `nproc` processes under torchrun; returns its exit code."""
    # "--" ends torchrun's options: its parser would otherwise refuse our `--log` as an ambiguous
    # abbreviation of its `--log-dir` / `--logs-specs`, though it comes after the module name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "--", "gram", *argv]
    return subprocess.run(cmd, env={**os.environ, CHILD: "1"}).returncode


def init(device: str) -> World:
    """Join torchrun's process group (NCCL when the backbone runs on CUDA, else gloo); World() without torchrun.

    On CUDA this binds the process to GPU LOCAL_RANK first, so a backbone loaded on "cuda" or "auto"
    lands on this rank's GPU."""
    if not _torchrun():
        return World()
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if uses_cuda(device):
        if ":" in device and size > 1:
            raise ValueError(f"backbone.device {device!r} would put every meta-training process on one GPU; "
                             f"use 'cuda' or 'auto' with {NPROC} > 1")
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"process {rank} wants GPU {local}, but {torch.cuda.device_count()} are visible "
                               f"(lower {NPROC})")
        torch.cuda.set_device(local)
        where, backend = torch.device("cuda", local), "nccl"
    else:
        where, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=size)
    return World(rank, size, where)


def close(world: World) -> None:
    """Leave the process group (if `init` joined one)."""
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def shard(ids: np.ndarray, world: World) -> np.ndarray:
    """This rank's share of an outer step's task ids: every `size`-th from position `rank`."""
    return ids[world.rank::world.size]


def all_reduce_grads(params: list[torch.Tensor], world: World) -> None:
    """Replace each parameter's gradient by its sum over the ranks (one collective over a flat buffer).

    A rank that did not reach a parameter (no tasks this step, or a grad of None) adds zeros; a parameter
    that no rank reached keeps grad None, as in one process, so the optimiser skips it the same way."""
    if world.size == 1:
        return
    reached = [p.grad is not None for p in params]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    # [Σ numel + P]: the gradients, then one "reached" count per parameter
    flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor(reached, dtype=grads[0].dtype,
                                                                   device=grads[0].device)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    *summed, counts = flat.split([p.numel() for p in params] + [len(params)])
    for p, g, n in zip(params, summed, counts.tolist()):
        p.grad = g.view_as(p).to(p.dtype) if n > 0 else None


def all_reduce_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    """`t` summed over the ranks (in place; `t` itself in a world of one)."""
    if world.size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_params(params: list[torch.Tensor], world: World) -> None:
    """Overwrite every rank's `params` with rank 0's values."""
    if world.size == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def same_on_all(value: int, world: World) -> bool:
    """Whether every rank passed the same integer (the same answer on every rank)."""
    if world.size == 1:
        return True
    t = torch.tensor([value, -value], dtype=torch.long, device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # [max, -min]
    return int(t[0]) == -int(t[1])


def barrier(world: World) -> None:
    """Wait for every rank (a no-op in a world of one)."""
    if world.size > 1:
        dist.barrier()
