"""Fresh negatives every epoch, as PROD's dataset draws them: every time a query is read, its negatives are a new
seeded sample from its mined window.

The trainer reads a fixed dataset, so the epochs are laid out in it: block e holds every training query once with
the negatives drawn for epoch e, and `EpochBlockBatchSampler` walks the blocks in order, shuffling within each
(without duplicate texts in a batch where in-batch candidates need it). How many blocks a stage reads is
`prod_st.training.steps.plan_steps`'s arithmetic (per-device batch x processes x gradient accumulation per step); the
teacher scores exactly the pairs that training will read (its cache drops repeats), which is what scoring online
would cost. Under torchrun the sampler deals each block in global batches, a slice of equal size per rank.
"""

from __future__ import annotations

import logging

import datasets
import torch
from sentence_transformers.base.sampler import DefaultBatchSampler, NoDuplicatesBatchSampler
from torch.utils.data import RandomSampler

from prod_st.retrieval.mining import NegativeWindow, draw_negatives, mine_pools
from prod_st.training.stage_data import RunData, TrainingRows, build_rows
from prod_st.training.steps import StepPlan, global_batches, plan_steps
from prod_st.util import cost, distributed
from prod_st.util.errors import ProdStError

logger = logging.getLogger(__name__)

DRAW_QUERIES = 65536  # queries whose negatives are drawn (and turned into corpus rows) together


def epoch_rows(
    data: RunData, pools: dict[str, list[str]], qrels: dict[str, dict[str, int]], window: NegativeWindow, *,
    seed: int, batch_size: int, accumulation: int = 1, epochs: float, max_steps: int | None, drop_incomplete: bool,
    what: str = "training",
) -> tuple[TrainingRows, StepPlan | None]:
    """The training rows of every epoch a stage will read, as consecutive blocks: epoch 0's draw of negatives
    from the mined `pools`, then epoch 1's, ..., and the stage's `StepPlan` (its steps, and its `draws`: the
    number of blocks). Hardest-first negatives are the same every epoch: one block, read repeatedly (draws 1).
    No rows (no query with a judged positive and negatives): empty rows and None. `drop_incomplete`: see
    `build_rows`; `what` names the stage in errors."""

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
        return rows, None
    plan = plan_steps(len(rows.queries), batch_size, epochs=epochs, max_steps=max_steps, accumulation=accumulation,
                      in_batch=drop_incomplete, what=what)
    reads = plan.draws if window.strategy == "sample" else 1
    return TrainingRows.concatenate([rows, *(rows_of(epoch) for epoch in range(1, reads))]), plan


class EpochBlockBatchSampler(DefaultBatchSampler):
    """Batches from consecutive blocks of `block_size` rows: block 0 (epoch 0's rows) shuffled, then block 1, ...
    A batch never mixes blocks, so every query is read once per epoch. With `no_duplicates`, a batch holds no
    text twice (sentence-transformers' NoDuplicatesBatchSampler inside each block), as in-batch candidates need.
    Seeded: the same seed gives the same batches, so a run resumed from a checkpoint reads what it would have.

    Under torchrun (`world_size` > 1, default: the launcher's) each block is dealt in global batches of
    batch_size x world_size rows (without duplicate texts across the whole global batch where asked), each
    yielded as world_size consecutive slices of batch_size rows: the trainer's accelerate gives slice r of every
    global batch to rank r, so every rank steps the same number of times on equal shapes, and a rank's slice
    starts at row rank x batch_size of the gathered batch. A block's short last global batch is filled up with
    rows of the block's first global batch (rows the short batch does not hold; their texts are not checked
    against its texts). Steps and draws: `prod_st.training.steps.plan_steps`."""

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
        world_size: int | None = None,
    ) -> None:
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last,
                         valid_label_columns=valid_label_columns, generator=generator, seed=seed)
        if block_size < 1 or len(dataset) % block_size:
            raise ValueError(f"{len(dataset)} rows do not split into blocks of {block_size}")
        self.dataset = dataset
        self.block_size = block_size
        self.num_blocks = len(dataset) // block_size
        self.no_duplicates = no_duplicates
        self.world = distributed.world_size() if world_size is None else world_size
        self._inner = [self._block_sampler(b) for b in range(self.num_blocks)]

    def _block_sampler(self, block: int):
        subset = self.dataset.select(range(block * self.block_size, (block + 1) * self.block_size))
        kwargs = dict(batch_size=self.batch_size * self.world, drop_last=self.drop_last and self.world == 1,
                      valid_label_columns=self.valid_label_columns, generator=torch.Generator(), seed=self.seed + block)
        if self.no_duplicates:
            return _hashed(NoDuplicatesBatchSampler(subset, precompute_hashes=True, precompute_num_proc=1, **kwargs))
        return DefaultBatchSampler(RandomSampler(subset, generator=kwargs["generator"]), **kwargs)

    def __iter__(self):
        for block, inner in enumerate(self._inner):
            inner.set_epoch(self.epoch * self.num_blocks)  # a trainer epoch past the blocks draws new orders
            if not self.no_duplicates:
                inner.generator.manual_seed(self.seed + block + self.epoch * self.num_blocks)
            offset = block * self.block_size
            if self.world == 1:
                for batch in inner:
                    yield [offset + i for i in batch]
                continue
            for batch in self._global_batches(inner):
                for r in range(self.world):
                    yield [offset + i for i in batch[r * self.batch_size:(r + 1) * self.batch_size]]

    def _global_batches(self, inner):
        """The block's global batches, each of exactly batch_size x world_size rows, ceil(block / that) of them:
        the inner sampler's full batches as they come; its short ones (the last; with `no_duplicates`, rows it
        had to defer) joined, and the last filled up from the block's first global batch (or, in a block
        smaller than one global batch, by cycling its rows)."""
        size = self.batch_size * self.world
        first: list[int] | None = None
        short: list[int] = []
        yielded = 0
        wanted = global_batches(self.block_size, self.batch_size, self.world)
        for batch in inner:
            batch = list(batch)
            if first is None:
                first = batch
            if len(batch) == size:
                yield batch
                yielded += 1
                continue
            short.extend(batch)
            while len(short) >= size:
                yield short[:size]
                yielded += 1
                short = short[size:]
        if short and yielded < wanted:
            held = set(short)
            fill = [i for i in first if i not in held] or short
            while len(short) < size:
                short.extend(fill[: size - len(short)])
            yield short

    def __len__(self) -> int:
        if self.world == 1:
            return sum(len(inner) for inner in self._inner)
        return self.num_blocks * global_batches(self.block_size, self.batch_size, self.world) * self.world


def stage_rows(miner, student, data: RunData, stage, seconds: dict, *, seed: int, accumulation: int, in_batch: bool,
               search: dict) -> tuple[TrainingRows, int, int]:
    """A stage's training rows: its negative pools mined by `miner()` (the student, or a teacher: built inside the
    timed step), then fresh negatives drawn for every epoch training will read (PROD resamples each time a query
    is read): the rows of epoch 0, then epoch 1, ..., the number of epochs, and the number of mined queries.
    Hardest-first negatives are the same every epoch: one block, read repeatedly. With `in_batch` candidates a
    query short of negatives is dropped (in-batch columns cannot be masked). `search`: `mine_pools`' settings."""
    neg = stage.negatives
    window = NegativeWindow(neg.start, neg.end, neg.count, neg.strategy)
    cost.search_cost(f"{stage.name}: mine negatives", student, len(data.corpus), len(data.train.qrels), neg.end)
    with cost.step(f"{stage.name}: mine negatives ({neg.miner}, ranks {neg.start}-{neg.end})", seconds, "mine"):
        pools, qrels = mine_pools(miner(), data.train, window, relevance=data.relevance, **search)
    rows, plan = epoch_rows(data, pools, qrels, window, seed=seed, epochs=stage.epochs, batch_size=stage.batch_size,
                            accumulation=accumulation, max_steps=stage.max_steps, drop_incomplete=in_batch,
                            what=f"stage {stage.name!r}")
    if plan is None:
        raise ProdStError(f"stage {stage.name!r}: no training query has a judged positive and negatives")
    reads = len(rows.queries) // plan.rows
    logger.info("%s: %d queries, negatives drawn afresh for each of %d epochs", stage.name, plan.rows, reads)
    return rows, reads, len(pools)


def _hashed(sampler: NoDuplicatesBatchSampler) -> NoDuplicatesBatchSampler:
    """`sampler` with its texts' hashes built now (sentence-transformers' `precompute_hashes`: one int64 per text,
    so a duplicate check reads no row back from the dataset), with datasets' caching off while it hashes: its
    `map` would otherwise leave a cache file in the stage's train_data folder, which is not prod-st's to litter.
    One process (`precompute_num_proc=1`): under torchrun a rank that forks hashing workers after CUDA and NCCL
    are up risks a hang, and hashing is seconds next to a stage."""
    build = getattr(sampler, "_build_hashes", None)
    if build is None:  # another sentence-transformers: it hashes on its first pass instead
        return sampler
    caching = datasets.is_caching_enabled()
    datasets.disable_caching()
    try:
        build()
    finally:
        if caching:
            datasets.enable_caching()
    return sampler
