"""The corpus is encoded once per checkpoint: cached by weights, shared by every step, resumed by block (the
whole run's count: tests/test_runner.py, test_tiny_recipe_end_to_end_then_rerun_does_nothing)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

import prod_st.retrieval.corpus_index as ci
from prod_st.data import load_retrieval_data
from prod_st.retrieval.evaluation import evaluate_model
from prod_st.util.errors import ProdStError


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(ci, "encoded_docs", ci.Counter())
    ci._last_index.clear()


def test_same_weights_encode_once_other_weights_again(tiny_model_dir, toy_beir, tmp_path):
    data = load_retrieval_data(toy_beir)
    model = SentenceTransformer(tiny_model_dir)
    first = np.concatenate(ci.corpus_embeddings(model, data.corpus, progress=False))
    assert first.shape == (len(data.corpus), 32) and first.dtype == np.float32
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)  # the same weights in another folder: the same key
    again = np.concatenate(ci.corpus_embeddings(SentenceTransformer(str(copy)), data.corpus, progress=False))
    np.testing.assert_array_equal(first, again)
    assert list(ci.encoded_docs.values()) == [len(data.corpus)]

    with __import__("torch").no_grad():
        next(model.parameters()).add_(0.5)  # other weights: a new encoding
    ci.corpus_embeddings(model, data.corpus, progress=False)
    assert sorted(ci.encoded_docs.values()) == [len(data.corpus)] * 2


def test_a_killed_encoding_resumes_from_its_finished_blocks(tiny_model_dir, toy_beir):
    data = load_retrieval_data(toy_beir)
    model = SentenceTransformer(tiny_model_dir)
    whole = np.concatenate(ci.corpus_embeddings(model, data.corpus, block_size=2, progress=False))
    key = ci.cache_key(model, data.corpus)
    blocks = sorted(ci.cache_dir("corpus", key).glob("block-*.npy"))
    assert len(blocks) == -(-len(data.corpus) // 2)
    blocks[-1].unlink()  # killed before the last block was written
    ci.encoded_docs.clear()
    resumed = np.concatenate(ci.corpus_embeddings(model, data.corpus, block_size=2, progress=False))
    np.testing.assert_allclose(resumed, whole, atol=1e-6)
    assert ci.encoded_docs[key] == len(data.corpus) - 2 * (len(blocks) - 1)  # only the missing block


def test_float16_embeddings_and_their_index(tiny_model_dir, toy_beir):
    data = load_retrieval_data(toy_beir)
    model = SentenceTransformer(tiny_model_dir)
    half = ci.corpus_embeddings(model, data.corpus, dtype="float16", progress=False)
    full = np.concatenate(ci.corpus_embeddings(model, data.corpus, progress=False))
    assert half[0].dtype == np.float16
    np.testing.assert_allclose(np.concatenate(half).astype(np.float32), full, atol=2e-3)
    index, ids = ci.corpus_index(model, data.corpus, dtype="float16", progress=False)
    assert index.ntotal == len(ids) == len(data.corpus)
    with pytest.raises(ProdStError, match="dtype"):
        ci.cache_key(model, data.corpus, "int8")


def test_evaluating_twice_encodes_the_corpus_once(tiny_model_dir, toy_beir):
    data = load_retrieval_data(toy_beir)
    model = SentenceTransformer(tiny_model_dir)
    first = evaluate_model(model, data, top_k=3, keep_run=True, progress=False)
    ci._last_index.clear()  # not the in-memory index: the cached embeddings
    second = evaluate_model(model, data, top_k=3, keep_run=True, progress=False)
    assert first.run == second.run and list(ci.encoded_docs.values()) == [len(data.corpus)]


def test_release_removes_one_encoding(tiny_model_dir, toy_beir):
    data = load_retrieval_data(toy_beir)
    model = SentenceTransformer(tiny_model_dir)
    ci.corpus_index(model, data.corpus, progress=False)
    key = ci.cache_key(model, data.corpus)
    ci.release(key)
    assert not ci.cache_path("corpus", key).exists() and not ci._last_index
    ci.corpus_index(model, data.corpus, progress=False)  # encoded again when asked again
    assert ci.encoded_docs[key] == 2 * len(data.corpus)


def test_rows_of_reads_vectors_by_corpus_row_across_blocks(tiny_model_dir, toy_beir):
    """What PROD's regulariser reads the stage-start student's document vectors with: any corpus rows, in any
    order, repeated, across block boundaries, as float32 (also from float16 blocks)."""
    data = load_retrieval_data(toy_beir)
    model = SentenceTransformer(tiny_model_dir)
    blocks = ci.corpus_embeddings(model, data.corpus, block_size=2, progress=False)
    whole = np.concatenate(blocks)
    rows = np.array([len(data.corpus) - 1, 0, 3, 3, 1, 2])
    got = ci.rows_of(blocks, rows)
    assert got.dtype == np.float32 and got.shape == (6, 32)
    np.testing.assert_array_equal(got, whole[rows])
    assert ci.rows_of(blocks, np.zeros(0, np.int64)).shape == (0, 32)
    half = ci.corpus_embeddings(model, data.corpus, dtype="float16", progress=False)
    np.testing.assert_allclose(ci.rows_of(half, rows), whole[rows], atol=2e-3)


def test_a_trained_index_learns_from_a_sample_across_the_corpus(tiny_model_dir, toy_beir, monkeypatch):
    """IVF / PQ train on `train_size` rows drawn at random (seeded) across the whole corpus, not its first rows
    (a corpus in file order is grouped by topic: NQ's passages come article by article)."""
    rows = ci.training_rows(100_000, 1000)
    assert len(np.unique(rows)) == 1000 and (np.diff(rows) > 0).all()  # distinct, sorted (read block by block)
    assert rows[0] < 1000 and rows[-1] > 99_000 and np.median(rows) == pytest.approx(50_000, rel=0.1)
    np.testing.assert_array_equal(rows, ci.training_rows(100_000, 1000))  # every rank draws the same rows
    np.testing.assert_array_equal(ci.training_rows(6, 32768), np.arange(6))  # a small corpus: all of it

    data = load_retrieval_data(toy_beir)
    model = SentenceTransformer(tiny_model_dir)
    trained = []
    real = ci.train_index
    monkeypatch.setattr(ci, "train_index", lambda index, name, vectors: trained.append(vectors) or real(
        index, name, vectors))
    index, ids = ci.corpus_index(model, data.corpus, index_factory="IVF2,Flat", train_size=3, progress=False)
    whole = np.concatenate(ci.corpus_embeddings(model, data.corpus, progress=False))
    sample = ci.training_rows(len(data.corpus), 3)
    assert sample.tolist() != [0, 1, 2]  # (this seed's draw is not the head: the check below can tell)
    np.testing.assert_array_equal(trained[0], whole[sample])
    assert index.ntotal == len(ids) == len(data.corpus)


def test_faiss_threads_under_a_launcher_are_the_ranks_share_of_the_cores(monkeypatch, caplog):
    """torchrun sets OMP_NUM_THREADS=1 for every rank: faiss gets cores // local ranks instead, once."""
    import logging
    import os

    import faiss

    cores = len(os.sched_getaffinity(0))
    before = faiss.omp_get_max_threads()
    try:
        for local, want in (("1", cores), ("2", max(1, cores // 2)), ("64", 1)):
            faiss.omp_set_num_threads(1)
            monkeypatch.setattr(ci, "_faiss_threads", [])
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
            with caplog.at_level(logging.INFO, logger="prod_st.retrieval.corpus_index"):
                assert ci.set_faiss_threads() == want == faiss.omp_get_max_threads()
            assert f"faiss searches with {want} threads ({cores} cores, {local} local ranks)" in caplog.text
        faiss.omp_set_num_threads(3)
        assert ci.set_faiss_threads() == 3  # once per process
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        monkeypatch.setattr(ci, "_faiss_threads", [])
        assert ci.set_faiss_threads() == 3  # no launcher: faiss's own setting stays
    finally:
        faiss.omp_set_num_threads(before)


def test_corpus_index_sets_faiss_threads_under_a_launcher(tiny_model_dir, toy_beir, monkeypatch):
    import faiss

    before = faiss.omp_get_max_threads()
    monkeypatch.setattr(ci, "_faiss_threads", [])
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # (one rank: WORLD_SIZE unset)
    faiss.omp_set_num_threads(1)
    try:
        ci.corpus_index(SentenceTransformer(tiny_model_dir), load_retrieval_data(toy_beir).corpus, progress=False)
        assert ci._faiss_threads and faiss.omp_get_max_threads() == ci._faiss_threads[0]
    finally:
        faiss.omp_set_num_threads(before)
