"""Exact search with torch (prod_st.retrieval.exact_search), the GPU path, run here on the CPU: the same top-k rows and
scores as faiss Flat / SQfp16 over the cached corpus blocks, through every entry point."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

import prod_st.retrieval.corpus_index as ci
import prod_st.retrieval.exact_search as es
from prod_st.data import load_retrieval_data
from prod_st.retrieval.evaluation import evaluate_model
from prod_st.util.errors import ProdStError
from prod_st.util.models import load_model


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(ci, "encoded_docs", ci.Counter())
    ci._last_index.clear()


def _corpus(rows: int, dim: int, block: int, dtype, tmp_path, seed: int = 0) -> list[np.ndarray]:
    """`rows` random vectors as memory-mapped blocks of `block` rows (the cache's layout), with a few exact ties
    (repeated vectors) to check their order."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, dim)).astype(dtype)
    x[rows - 3] = x[rows - 1] = x[5]  # ties: one in the first block, two in the last
    blocks = []
    for i, start in enumerate(range(0, rows, block)):
        np.save(tmp_path / f"b{i}.npy", x[start:start + block])
        blocks.append(np.load(tmp_path / f"b{i}.npy", mmap_mode="r"))
    return blocks


def _faiss(blocks, queries, k, factory="Flat"):
    index = faiss.index_factory(blocks[0].shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    for b in blocks:
        index.add(np.ascontiguousarray(b, dtype=np.float32))
    return index.search(queries, k)


def _agree(got, want, *, atol):
    """Same scores within `atol`; same rows wherever the score is not tied (within atol) with a neighbour."""
    (scores, rows), (want_scores, want_rows) = got, want
    np.testing.assert_allclose(scores, want_scores, atol=atol)
    tied = np.zeros_like(scores, dtype=bool)
    gaps = np.abs(np.diff(want_scores, axis=1)) <= atol
    tied[:, 1:] |= gaps
    tied[:, :-1] |= gaps
    assert (rows[~tied] == want_rows[~tied]).all()
    assert tied.mean() < 0.05  # (the comparison compared something)


@pytest.mark.parametrize("dtype, factory", [(np.float32, "Flat"), (np.float16, "Flat"), (np.float32, "SQfp16")])
@pytest.mark.parametrize("k", [5, 150, 1000])  # within a block, more than a block, more than the corpus
def test_torch_finds_what_faiss_finds(tmp_path, monkeypatch, dtype, factory, k):
    monkeypatch.setattr(es, "SCORE_ELEMENTS", 64 * 100)  # query chunks of 64: several chunks x several blocks
    blocks = _corpus(700, 24, 100, dtype, tmp_path)
    queries = np.random.default_rng(1).standard_normal((150, 24)).astype(np.float32)
    queries[7] = blocks[0][5]  # a query whose best documents are the three tied ones
    index = es.TorchFlatIndex(blocks, device="cpu", dtype=es.EXACT[factory])
    scores, rows = index.search(queries, k)
    assert scores.shape == rows.shape == (150, k) and scores.dtype == np.float32 and rows.dtype == np.int64
    found = min(k, 700)
    assert (rows[:, found:] == -1).all() and np.isneginf(scores[:, found:]).all()  # padded as faiss pads
    # SQfp16 is Flat over the vectors rounded to float16 ...
    exact = _faiss([b.astype(np.float16) for b in blocks] if factory == "SQfp16" else blocks, queries, k)
    _agree((scores[:, :found], rows[:, :found]), (exact[0][:, :found], exact[1][:, :found]), atol=1e-4)
    # ... but faiss's own float16 encoder rounds a value exactly halfway between two float16 away from zero, torch
    # to even (1 value in 16,800 here: 5e-4 x a query's coordinate)
    want = _faiss(blocks, queries, k, factory)[0][:, :found]
    np.testing.assert_allclose(scores[:, :found], want, atol=5e-3 if factory == "SQfp16" else 1e-4)
    assert rows[7, :3].tolist() == [5, 697, 699]  # ties: lower row first, across blocks


def test_rows_start_at_the_ranks_first_row(tmp_path):
    """A rank's share (blocks 2..) is searched with corpus rows as ids, like faiss's IndexIDMap."""
    blocks = _corpus(500, 16, 100, np.float32, tmp_path)
    queries = np.random.default_rng(2).standard_normal((10, 16)).astype(np.float32)
    scores, rows = es.TorchFlatIndex(blocks[2:], 200, device="cpu").search(queries, 20)
    want_scores, want_rows = _faiss(blocks[2:], queries, 20)
    _agree((scores, rows), (want_scores, want_rows + 200), atol=1e-5)
    assert rows.min() >= 200 and rows.max() < 500


def test_the_device_copy_lives_until_released(tmp_path):
    blocks = _corpus(300, 8, 100, np.float16, tmp_path)
    index = es.TorchFlatIndex(blocks, device="cpu")
    index.search(np.ones((2, 8), np.float32), 3)
    assert [t.dtype for t in index._on_device] == [torch.float16] * 3  # kept as the cache stores it
    index.release()
    assert index._on_device is None


def test_a_corpus_too_big_for_the_gpu_is_one_line(tmp_path, monkeypatch):
    blocks = _corpus(300, 8, 100, np.float16, tmp_path)

    def out_of_memory(block, device, dtype):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate ...")

    monkeypatch.setattr(es, "_upload", out_of_memory)
    with pytest.raises(ProdStError, match=r"^the corpus's 0.0 GB of vectors do not fit on cpu: set eval.search: faiss"):
        es.TorchFlatIndex(blocks, device="cpu").search(np.ones((1, 8), np.float32), 3)


def test_backend_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not es.uses_torch("auto", "Flat") and es.uses_torch("torch", "Flat") and not es.uses_torch("faiss", "Flat")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert es.uses_torch("auto", "Flat") and es.uses_torch("auto", "SQfp16")
    assert not es.uses_torch("auto", "HNSW32") and not es.uses_torch("faiss", "Flat")
    with pytest.raises(ProdStError, match="exact search only .* not 'HNSW32'"):
        es.uses_torch("torch", "HNSW32")
    with pytest.raises(ProdStError, match="search must be one of auto, torch, faiss"):
        es.uses_torch("gpu", "Flat")


def test_search_does_not_round_through_tf32(tmp_path):
    """A trainer's tf32 setting is lifted for the search and put back."""
    blocks = _corpus(100, 8, 100, np.float32, tmp_path)
    torch.set_float32_matmul_precision("high")
    try:
        seen = []
        real = torch.topk
        with pytest.MonkeyPatch.context() as m:
            m.setattr(torch, "topk", lambda *a, **k: seen.append(torch.get_float32_matmul_precision()) or real(*a, **k))
            es.TorchFlatIndex(blocks, device="cpu").search(np.ones((1, 8), np.float32), 3)
        assert seen == ["highest"] and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_evaluate_model_with_torch_matches_faiss(tiny_model_dir, toy_beir, dtype):
    """The whole evaluation through `search_backend="torch"`: the same run and metrics as faiss."""
    data = load_retrieval_data(toy_beir)
    model = load_model(tiny_model_dir)
    faiss_result = evaluate_model(model, data, top_k=4, dtype=dtype, search_backend="faiss", keep_run=True,
                                  progress=False)
    assert not isinstance(ci._last_index["index"], es.TorchFlatIndex)
    torch_result = evaluate_model(model, data, top_k=4, dtype=dtype, search_backend="torch", keep_run=True,
                                  progress=False)
    index = ci._last_index["index"]
    assert isinstance(index, es.TorchFlatIndex) and index._on_device is None  # released after the search
    assert list(ci.encoded_docs.values()) == [len(data.corpus)]  # one encoding for both
    assert torch_result.run.keys() == faiss_result.run.keys()
    for q, docs in faiss_result.run.items():
        assert list(torch_result.run[q]) == list(docs)
        np.testing.assert_allclose(list(torch_result.run[q].values()), list(docs.values()), atol=1e-5)
    assert torch_result.metrics == pytest.approx(faiss_result.metrics)


def test_torch_with_an_approximate_index_is_refused_before_encoding(tiny_model_dir, toy_beir):
    with pytest.raises(ProdStError, match="exact search only"):
        evaluate_model(load_model(tiny_model_dir), load_retrieval_data(toy_beir), index_factory="HNSW8",
                       search_backend="torch", progress=False)
    assert not ci.encoded_docs
