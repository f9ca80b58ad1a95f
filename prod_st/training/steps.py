"""How much a training run reads, under any number of processes: the one place that knows that an optimizer step
reads `batch_size` (per device) x `world_size` x `gradient_accumulation_steps` rows.

Every trainer in prod-st (the student's stages and DPD, the teachers trained in a run) takes its number of
optimizer steps from `plan_steps`, and `prod_st.training.resampling` takes from it how many fresh draws of negatives
(epochs) those steps read. The batches themselves come from `prod_st.training.resampling.EpochBlockBatchSampler`, which
deals an epoch in GLOBAL batches (batch_size x world_size rows, each rank its slice of batch_size), so that every
rank steps on equal shapes: the gathered losses (PRODLoss's global in-batch candidates, the warm-up's
MultipleNegativesRankingLoss with gather) need that, and a rank with one batch more than another would wait for
the others in a collective until the process group times out. With one process, the last batch of an epoch may be
short (as the trainer has always read it); with several, a short last global batch is filled up with rows of the
same epoch that the batch does not hold yet (in an epoch smaller than one global batch, its rows repeat: refused
where candidates are in-batch), so one epoch is ceil(rows / global batch) global batches on any
number of processes: a 2-process run reads the same number of steps and draws as a 1-process run whose
batch_size is twice as large.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prod_st.util import distributed
from prod_st.util.errors import ProdStError


def global_batches(rows: int, batch_size: int, world_size: int = 1) -> int:
    """Global batches (batch_size x world_size rows each, the last one short or filled up) in one epoch of `rows`."""
    return max(1, math.ceil(rows / (batch_size * world_size)))


@dataclass(frozen=True)
class StepPlan:
    """What a training run reads: `steps` optimizer steps over epochs of `rows` rows, `draws` epochs in all."""

    rows: int  # training rows of one epoch (one draw of negatives)
    batch_size: int  # per device
    world_size: int
    accumulation: int  # gradient accumulation steps
    steps: int  # optimizer steps
    draws: int  # epochs the steps read (each sampled stage draws its negatives afresh for every one)

    @property
    def global_batch(self) -> int:
        """Rows per optimizer step, over every process."""
        return self.batch_size * self.world_size * self.accumulation

    def describe(self) -> str:
        """'global batch 64 = 16 per device x 2 processes x 2 accumulation' (the factors that are not 1)."""
        parts = [f"{self.batch_size} per device"]
        parts += [f"{self.world_size} processes"] if self.world_size > 1 else []
        parts += [f"{self.accumulation} accumulation"] if self.accumulation > 1 else []
        return f"global batch {self.global_batch}" + (f" = {' x '.join(parts)}" if len(parts) > 1 else "")


def plan_steps(
    rows: int, batch_size: int, *, epochs: float = 1.0, max_steps: int | None = None, accumulation: int = 1,
    world_size: int | None = None, in_batch: bool = True, what: str = "training",
) -> StepPlan:
    """Optimizer steps and epochs read for `rows` training rows (queries) in per-device batches of `batch_size`:
    `max_steps` if set, else `epochs` passes (rounded down to whole steps, at least one); `world_size` defaults to
    the launcher's. An epoch smaller than one global batch on several processes must repeat rows to fill it:
    harmless where each query is scored against its own candidates only, but with `in_batch` candidates a
    repeated row is its own false negative, so that is a one-line error (`what` names the stage)."""
    world = distributed.world_size() if world_size is None else world_size
    if rows < 1:
        raise ProdStError(f"{what}: no training rows")
    if in_batch and world > 1 and rows < batch_size * world:
        most = rows // world
        raise ProdStError(
            f"{what}: {rows} training rows make less than one global batch of {batch_size} per device x {world} "
            f"processes; lower its batch_size to at most {most}" + (" or " if most else ", ")
            + "run on fewer processes")
    per_epoch = global_batches(rows, batch_size, world)  # per-rank batches of one epoch
    steps = max_steps or max(1, int(per_epoch * epochs / accumulation))
    draws = max(1, math.ceil(steps * accumulation / per_epoch))
    return StepPlan(rows, batch_size, world, accumulation, steps, draws)
