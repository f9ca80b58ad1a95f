"""Fresh negatives per epoch: the block layout and its batch sampler."""

from __future__ import annotations

import datasets
import pytest

from prod_st.training.resampling import EpochBlockBatchSampler
from prod_st.training.steps import plan_steps
from prod_st.util.errors import ProdStError


def test_steps_and_epochs_read():
    assert plan_steps(100, 16, epochs=1.0).steps == 7 and plan_steps(100, 16, epochs=2.5).steps == 17
    assert plan_steps(100, 16, max_steps=40).steps == 40
    assert plan_steps(100, 16, max_steps=40).draws == 6  # 7 batches an epoch (the last short): 40 steps read 6
    assert plan_steps(800, 16, max_steps=40).draws == 1
    assert plan_steps(100, 16, max_steps=40, accumulation=2).draws == 12  # 80 batches read
    assert plan_steps(100, 16, epochs=1.0, accumulation=2).steps == 3  # 7 batches: 3 whole optimizer steps


def test_a_step_reads_batch_size_times_world_size_rows():
    """World size counts: W processes with per-device batch B read what one process with batch W x B reads (the
    same steps and draws), so an epoch-sized stage trains one epoch, not W."""
    for rows, batch, world in [(51, 8, 2), (100, 16, 4), (1000, 16, 8), (17, 4, 2)]:
        for kwargs in [dict(epochs=1.0), dict(epochs=2.5), dict(max_steps=7), dict(max_steps=40)]:
            many = plan_steps(rows, batch, world_size=world, **kwargs)
            one = plan_steps(rows, batch * world, world_size=1, **kwargs)
            assert (many.steps, many.draws) == (one.steps, one.draws), (rows, batch, world, kwargs)
            assert many.global_batch == one.global_batch == batch * world
    plan = plan_steps(51, 8, epochs=1.0, world_size=2)
    assert plan.steps == 4 and plan.draws == 1  # not 7 steps: 51 rows are 4 global batches of 16
    assert plan.describe() == "global batch 16 = 8 per device x 2 processes"
    assert plan_steps(51, 8, world_size=1).describe() == "global batch 8"


def test_an_epoch_smaller_than_one_global_batch_is_refused_in_one_line():
    with pytest.raises(ProdStError, match=r"stage 'dpd-1': 5 training rows make less than one global batch of 8 "
                                          r"per device x 2 processes; lower its batch_size to at most 2 or run"):
        plan_steps(5, 8, world_size=2, what="stage 'dpd-1'")
    assert plan_steps(5, 8, world_size=1).steps == 1  # one process: a short batch, as always
    assert plan_steps(5, 8, world_size=2, in_batch=False).steps == 1  # own candidates only: the rows repeat


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

    import prod_st.training.resampling as resampling
    from prod_st.retrieval.mining import NegativeWindow, negative_pools
    from prod_st.training.stage_data import load_run_data

    data = load_run_data("wordnet-gloss", sizes=(30, 5, 5), corpus_size=300, seed=3)
    corpus_ids, rng = data.corpus["_id"], random.Random(0)
    ranked = {q: rng.sample(corpus_ids, 20) + list(judged)[:1] for q, judged in data.train.qrels.items()}
    pools = negative_pools(ranked, data.train.qrels, NegativeWindow(1, 21, 3, "sample"))
    kwargs = dict(seed=5, batch_size=8, epochs=1.0, max_steps=10, drop_incomplete=False)

    whole, plan = resampling.epoch_rows(data, pools, data.train.qrels, NegativeWindow(1, 21, 3, "sample"), **kwargs)
    monkeypatch.setattr(resampling, "DRAW_QUERIES", 7)  # 30 queries: chunks of 7, 7, 7, 7, 2
    chunked, plan_chunked = resampling.epoch_rows(data, pools, data.train.qrels, NegativeWindow(1, 21, 3, "sample"),
                                                  **kwargs)
    assert plan.draws == plan_chunked.draws == 3 and len(whole) == 3 * 30  # 4 batches an epoch: 10 steps read 3
    assert chunked.query_ids == whole.query_ids and chunked.queries == whole.queries
    assert (chunked.positive_rows == whole.positive_rows).all() and (chunked.negative_rows == whole.negative_rows).all()
    assert (whole.negative_rows[:30] != whole.negative_rows[30:60]).any()  # epochs draw afresh


@pytest.mark.parametrize("no_duplicates", [False, True])
@pytest.mark.parametrize("world", [2, 3])
def test_block_sampler_deals_equal_global_batches_to_every_rank(no_duplicates, world):
    """Under W processes every batch has batch_size rows, the count is a multiple of W (rank r takes batches
    r, r + W, ...: accelerate's sharding), each group of W batches is one global batch of distinct rows of one
    block, every row of a block is read in its epoch, and there are as many global batches per block as one
    process with batch_size x W has batches."""
    data = blocks(3, 23)  # 23 rows: not a multiple of 4 x W
    sampler = EpochBlockBatchSampler(data, batch_size=4, drop_last=False, seed=5, block_size=23,
                                     no_duplicates=no_duplicates, world_size=world)
    batches = list(sampler)
    assert len(batches) == len(sampler) and len(batches) % world == 0
    assert all(len(batch) == 4 for batch in batches)
    single = EpochBlockBatchSampler(data, batch_size=4 * world, drop_last=False, seed=5, block_size=23,
                                    no_duplicates=no_duplicates, world_size=1)
    assert len(batches) // world == len(single)
    groups = [sum(batches[g:g + world], []) for g in range(0, len(batches), world)]
    for group in groups:
        assert len(set(group)) == len(group) and len({i // 23 for i in group}) == 1
    for block in range(3):
        read = {i for group in groups for i in group if i // 23 == block}
        assert read == set(range(block * 23, (block + 1) * 23))
    assert [b for b in sampler] == batches  # seeded: every rank computes the same deal


def test_a_block_smaller_than_one_global_batch_repeats_its_rows_to_fill_it():
    """(List candidates only: `plan_steps` refuses it for in-batch ones.) 5 rows, 2 ranks x 4: one global batch
    of 8 holding every row, each rank a slice of 4."""
    sampler = EpochBlockBatchSampler(blocks(1, 5), batch_size=4, drop_last=False, seed=1, block_size=5, world_size=2)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2 and [len(b) for b in batches] == [4, 4]
    assert set(batches[0] + batches[1]) == set(range(5))


def test_duplicate_checks_read_precomputed_hashes_and_leave_no_file_in_the_stage_folder(tmp_path):
    """In-batch stages use sentence-transformers' hashed duplicate check (one int64 per text, built before the
    first batch), and its hashing writes nothing into the memory-mapped train_data folder."""
    datasets.Dataset.from_dict({"query": [f"q{i}" for i in range(8)], "positive": ["p0", "p1"] * 4,
                                "label": [[0.5]] * 8}).save_to_disk(str(tmp_path / "rows"))
    before = sorted(p.name for p in (tmp_path / "rows").iterdir())
    data = datasets.load_from_disk(str(tmp_path / "rows"))
    sampler = EpochBlockBatchSampler(data, batch_size=2, drop_last=False, valid_label_columns=["label"], seed=0,
                                     block_size=4, no_duplicates=True)
    assert all(inner._row_hashes is not None and inner._row_hashes.shape == (4, 2) for inner in sampler._inner)
    for batch in sampler:
        assert len({data[i]["positive"] for i in batch}) == len(batch)  # p0 and p1 never share a batch
    assert sorted(p.name for p in (tmp_path / "rows").iterdir()) == before
