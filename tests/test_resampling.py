"""Fresh negatives per epoch: the block layout and its batch sampler."""

from __future__ import annotations

import datasets
import pytest

from prod_st.resampling import EpochBlockBatchSampler, epochs_read, total_steps


def test_steps_and_epochs_read():
    assert total_steps(100, 16, 1.0, None) == 7 and total_steps(100, 16, 2.5, None) == 17
    assert total_steps(100, 16, 1.0, 40) == 40
    assert epochs_read(100, 16, 40) == 7  # 640 rows read of 100 queries: 7 draws
    assert epochs_read(800, 16, 40) == 1


def blocks(num_blocks: int, size: int) -> datasets.Dataset:
    """Block b holds queries q0..q{size-1} with negatives drawn for epoch b."""
    return datasets.Dataset.from_dict({
        "query": [f"q{i}" for _ in range(num_blocks) for i in range(size)],
        "positive": [f"p{i}" for _ in range(num_blocks) for i in range(size)],
        "negative_1": [f"n{b}-{i}" for b in range(num_blocks) for i in range(size)],
    })


@pytest.mark.parametrize("no_duplicates", [False, True])
def test_block_sampler_reads_each_epoch_in_turn(no_duplicates):
    data = blocks(3, 10)
    sampler = EpochBlockBatchSampler(data, batch_size=4, drop_last=False, seed=5, block_size=10,
                                     no_duplicates=no_duplicates)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    seen = [i for batch in batches for i in batch]
    # every row exactly once, block 0 entirely before block 1, block 1 before block 2
    assert sorted(seen) == list(range(30)) and [i // 10 for i in seen] == sorted(i // 10 for i in seen)
    assert all(len({i // 10 for i in batch}) == 1 for batch in batches)  # a batch never mixes epochs
    assert seen[:10] != list(range(10))  # shuffled within the block
    assert list(EpochBlockBatchSampler(data, batch_size=4, drop_last=False, seed=5, block_size=10,
                                       no_duplicates=no_duplicates)) == batches  # seeded: resumable


def test_block_sampler_without_duplicate_texts_in_a_batch():
    data = datasets.Dataset.from_dict({"query": ["a", "b", "c", "d"], "positive": ["x", "x", "y", "z"]})
    sampler = EpochBlockBatchSampler(data, batch_size=2, drop_last=False, seed=0, block_size=4, no_duplicates=True)
    for batch in sampler:
        texts = [t for i in batch for t in (data[i]["query"], data[i]["positive"])]
        assert len(texts) == len(set(texts))


def test_block_sampler_needs_whole_blocks():
    with pytest.raises(ValueError):
        EpochBlockBatchSampler(blocks(1, 10), batch_size=4, drop_last=False, block_size=3)


def test_epochs_drawn_a_chunk_of_queries_at_a_time_equal_one_draw(monkeypatch):
    """epoch_rows draws DRAW_QUERIES queries' negatives at a time (no per-query list of negatives for the whole
    data set); the draws are seeded per query, so the rows are what one draw over every query gives."""
    import random

    import prod_st.resampling as resampling
    from prod_st.mining import NegativeWindow, negative_pools
    from prod_st.stage_data import load_run_data

    data = load_run_data("wordnet-gloss", sizes=(30, 5, 5), corpus_size=300, seed=3)
    corpus_ids, rng = data.corpus["_id"], random.Random(0)
    ranked = {q: rng.sample(corpus_ids, 20) + list(judged)[:1] for q, judged in data.train.qrels.items()}
    pools = negative_pools(ranked, data.train.qrels, NegativeWindow(1, 21, 3, "sample"))
    kwargs = dict(seed=5, rows_per_step=8, epochs=1.0, max_steps=10, drop_incomplete=False)

    whole, reads = resampling.epoch_rows(data, pools, data.train.qrels, NegativeWindow(1, 21, 3, "sample"), **kwargs)
    monkeypatch.setattr(resampling, "DRAW_QUERIES", 7)  # 30 queries: chunks of 7, 7, 7, 7, 2
    chunked, reads_chunked = resampling.epoch_rows(data, pools, data.train.qrels, NegativeWindow(1, 21, 3, "sample"),
                                                   **kwargs)
    assert reads == reads_chunked == 3 and len(whole) == 3 * 30
    assert chunked.query_ids == whole.query_ids and chunked.queries == whole.queries
    assert (chunked.positive_rows == whole.positive_rows).all() and (chunked.negative_rows == whole.negative_rows).all()
    assert (whole.negative_rows[:30] != whole.negative_rows[30:60]).any()  # epochs draw afresh
