"""Rank awareness for runs under `torchrun` / `accelerate launch`: only rank 0 writes shared files, and long
work is split across ranks (`shard`) and merged (`all_gather`).

torch is not imported here: a process that never imported it has no process group, and commands that need no
model (`prod-st validate`, the recipe schema) stay fast.

Why not `accelerate.PartialState` (issue 11, item 9; measured in bench/notes-house.md): it would not make this
shorter (a torch-free `rank()` for validate and the `shard`/`all_gather` helpers stay either way), importing it
costs what importing torch costs (1.2-1.3 s against 0.006 s here), and it covers no launcher prod-st misses:
under torchrun and `accelerate launch --multi_gpu` (torchrun underneath) both read RANK / WORLD_SIZE /
LOCAL_RANK, but `PartialState()` as transformers builds it on a machine without a GPU reports rank 0 of 1 on
every rank (a CPU group needs `cpu=True`), where this layer reports the launcher's ranks. The environments it
reads beyond those (MPI's PMI_* / OMPI_COMM_WORLD_*, for `accelerate launch --cpu --mpirun_hostfile`) are
multi-CPU only, and neither reads SLURM's: under SLURM, launch with `srun torchrun ...`. On GPUs the trainer's
own PartialState finds the group `init_if_launched` created and uses it (it creates one only when none exists)."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager


def _dist():
    """torch.distributed if some module imported torch already, else None (then nothing is initialised)."""
    return sys.modules.get("torch.distributed")


def is_distributed() -> bool:
    dist = _dist()
    return dist is not None and dist.is_available() and dist.is_initialized()


def rank() -> int:
    return _dist().get_rank() if is_distributed() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return _dist().get_world_size() if is_distributed() else int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        _dist().barrier()


def shard(n: int) -> tuple[int, int]:
    """This rank's contiguous share `[start, stop)` of `n` items (sizes differ by at most one; the whole range
    on a single process)."""
    r, w = rank(), world_size()
    return n * r // w, n * (r + 1) // w


def all_gather(obj) -> list:
    """Every rank's `obj` (any picklable value), in rank order; `[obj]` on a single process."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


DEFAULT_TIMEOUT_MINUTES = 180  # long enough for any step a rank may wait on (recipe: distributed.timeout_minutes)


def init_if_launched(timeout_minutes: float | None = None) -> bool:
    """Under torchrun / accelerate launch (WORLD_SIZE > 1), join the process group now, so the runner's
    barriers hold from its first step (the trainer reuses the same group). `timeout_minutes` (default 180)
    is how long a collective may wait for a slower rank before the job fails: NCCL's own default (10 min)
    would kill a job whose ranks wait on a long step. Returns whether it created the group: whoever did
    calls `leave_group` when the work is done (`launched_group` pairs the two; a group the caller made is
    the caller's to end)."""
    import datetime

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        _import_group_defaults()
        minutes = DEFAULT_TIMEOUT_MINUTES if timeout_minutes is None else timeout_minutes
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=minutes))
        return True
    return False


# torch modules whose functions take `group=dist.group.WORLD` (or `process_group=`) as a default argument: one
# imported after the group exists holds that group for good (sentence-transformers imports the first for its
# gathers with gradients, the trainer the others on first use).
GROUP_DEFAULT_MODULES = (
    "torch.distributed.nn.functional",
    "torch.distributed.optim.zero_redundancy_optimizer",
    "torch.distributed.fsdp.sharded_grad_scaler",
)


def _import_group_defaults() -> None:
    """Import GROUP_DEFAULT_MODULES before the group exists (about 1 s, only under a launcher). Otherwise
    destroy_process_group cannot free the group, and its gloo threads outlive the interpreter: a rank exiting
    while one of them still releases a collective's tensors aborts after all its work is done (SIGABRT,
    "terminate called without an active exception"; seen in CI on 2 loaded cores)."""
    import importlib

    for name in GROUP_DEFAULT_MODULES:
        importlib.import_module(name)


def leave_group() -> None:
    """The end of work under torchrun: wait for every rank, then destroy the process group while Python is
    still up, so its threads are joined before the interpreter shuts down (torch asks for this too)."""
    if is_distributed():
        import gc

        _dist().barrier()
        _dist().destroy_process_group()
        gc.collect()  # a group only a reference cycle still holds (a trainer's wrapped model) is freed now too


@contextmanager
def launched_group(timeout_minutes: float | None = None):
    """The block's work in the launcher's process group: joined first (`init_if_launched`) and left when the
    block ends normally (`leave_group`), if this made it. On an error the rank leaves nothing: it exits
    non-zero, and a barrier there could hang the other ranks."""
    joined = init_if_launched(timeout_minutes)
    yield
    if joined:
        leave_group()
