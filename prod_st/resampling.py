"""Fresh negatives every epoch, as PROD's dataset draws them: every time a query is read, its negatives are a new
seeded sample from its mined window.

The trainer reads a fixed dataset, so the epochs are laid out in it: block e holds every training query once with
the negatives drawn for epoch e, and `EpochBlockBatchSampler` walks the blocks in order, shuffling within each
(without duplicate texts in a batch where in-batch candidates need it). A stage of T steps of B queries over Q
queries reads ceil(T * B / Q) blocks; the teacher scores exactly the pairs that training will read (its cache
drops repeats), which is what scoring online would cost.
"""

from __future__ import annotations

import logging
import math

import torch
from sentence_transformers.base.sampler import DefaultBatchSampler, NoDuplicatesBatchSampler
from torch.utils.data import RandomSampler

from prod_st.mining import NegativeWindow, draw_negatives
from prod_st.stage_data import RunData, TrainingRows, build_rows

logger = logging.getLogger(__name__)

DRAW_QUERIES = 65536  # queries whose negatives are drawn (and turned into corpus rows) together


def total_steps(num_rows: int, batch_size: int, epochs: float, max_steps: int | None) -> int:
    """Optimizer steps of a stage: `max_steps`, else `epochs` passes over `num_rows` in batches."""
    return max_steps or max(1, int(math.ceil(num_rows / batch_size) * epochs))


def epochs_read(num_rows: int, batch_size: int, steps: int) -> int:
    """How many times training reads each query (rounded up): the number of negative draws it needs."""
    return max(1, math.ceil(steps * batch_size / max(1, num_rows)))


def epoch_rows(
    data: RunData, pools: dict[str, list[str]], qrels: dict[str, dict[str, int]], window: NegativeWindow, *,
    seed: int, rows_per_step: int, epochs: float, max_steps: int | None, drop_incomplete: bool,
) -> tuple[TrainingRows, int]:
    """The training rows of every epoch a stage will read, as consecutive blocks: epoch 0's draw of negatives
    from the mined `pools`, then epoch 1's, ..., and the number of blocks (`rows_per_step`: rows per optimizer
    step). Hardest-first negatives are the same every epoch: one block, read repeatedly. No rows (no query
    with a judged positive and negatives): empty rows, one block. `drop_incomplete`: see `build_rows`."""

    query_ids, texts = list(pools), data.train.split_queries()

    def rows_of(epoch: int) -> TrainingRows:
        """Epoch `epoch`'s rows, drawn DRAW_QUERIES queries at a time (the draws are seeded per query, so the
        chunks give what one draw would): no per-query list of negatives for the whole data set."""
        chunks = []
        for start in range(0, max(len(query_ids), 1), DRAW_QUERIES):  # (no query: one empty chunk)
            part = {q: pools[q] for q in query_ids[start:start + DRAW_QUERIES]}
            drawn = draw_negatives(part, window, seed=seed, epoch=epoch)
            chunks.append(build_rows(data, drawn, window.count, drop_incomplete=drop_incomplete, qrels=qrels,
                                     query_texts=texts, log=False))
        rows = TrainingRows.concatenate(chunks)
        if len(rows) < len(query_ids):
            logger.info("training rows: %d of %d queries kept", len(rows), len(query_ids))
        return rows

    rows = rows_of(0)
    if not rows.queries:
        return rows, 1
    steps = total_steps(len(rows.queries), rows_per_step, epochs, max_steps)
    reads = epochs_read(len(rows.queries), rows_per_step, steps) if window.strategy == "sample" else 1
    return TrainingRows.concatenate([rows, *(rows_of(epoch) for epoch in range(1, reads))]), reads


class EpochBlockBatchSampler(DefaultBatchSampler):
    """Batches from consecutive blocks of `block_size` rows: block 0 (epoch 0's rows) shuffled, then block 1, ...
    A batch never mixes blocks, so every query is read once per epoch. With `no_duplicates`, a batch holds no
    text twice (sentence-transformers' NoDuplicatesBatchSampler inside each block), as in-batch candidates need.
    Seeded: the same seed gives the same batches, so a run resumed from a checkpoint reads what it would have."""

    def __init__(
        self,
        dataset,
        batch_size: int,
        drop_last: bool,
        valid_label_columns: list[str] | None = None,
        generator: torch.Generator | None = None,
        seed: int = 0,
        *,
        block_size: int,
        no_duplicates: bool = False,
    ) -> None:
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last,
                         valid_label_columns=valid_label_columns, generator=generator, seed=seed)
        if block_size < 1 or len(dataset) % block_size:
            raise ValueError(f"{len(dataset)} rows do not split into blocks of {block_size}")
        self.dataset = dataset
        self.block_size = block_size
        self.num_blocks = len(dataset) // block_size
        self.no_duplicates = no_duplicates
        self._inner = [self._block_sampler(b) for b in range(self.num_blocks)]

    def _block_sampler(self, block: int):
        subset = self.dataset.select(range(block * self.block_size, (block + 1) * self.block_size))
        kwargs = dict(batch_size=self.batch_size, drop_last=self.drop_last,
                      valid_label_columns=self.valid_label_columns, generator=torch.Generator(), seed=self.seed + block)
        if self.no_duplicates:
            return NoDuplicatesBatchSampler(subset, **kwargs)
        return DefaultBatchSampler(RandomSampler(subset, generator=kwargs["generator"]), **kwargs)

    def __iter__(self):
        for block, inner in enumerate(self._inner):
            inner.set_epoch(self.epoch * self.num_blocks)  # a trainer epoch past the blocks draws new orders
            if not self.no_duplicates:
                inner.generator.manual_seed(self.seed + block + self.epoch * self.num_blocks)
            offset = block * self.block_size
            for batch in inner:
                yield [offset + i for i in batch]

    def __len__(self) -> int:
        return sum(len(inner) for inner in self._inner)
