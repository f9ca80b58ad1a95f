"""prod_st.util.batched_inference: the GPU path of encoding and cross-encoder scoring (the next batches tokenised
by a thread or worker processes while the model runs) gives what sentence-transformers' own loops give. Run here
on the CPU, where prod-st itself keeps sentence-transformers' loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prod_st.retrieval.encoding import encode_texts, role_prompt
from prod_st.util import batched_inference as bi

TEXTS = [("word " * n).strip() + f" {n}" for n in (3, 40, 1, 17, 9, 25, 2, 60, 11, 5, 30)]


@pytest.fixture()
def prompted(tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(tiny_model_dir, device="cpu")
    model.prompts = {"query": "query: ", "passage": "passage: ", "other": "other: "}
    return model


@pytest.mark.parametrize("workers", [0, 2])
def test_run_batches_encodes_as_sentence_transformers(prompted, workers, monkeypatch):
    monkeypatch.setattr(bi, "PREFETCH", 2)  # fewer than the batches: the queue fills and drains
    monkeypatch.setattr(bi, "BATCHES_PER_WORKER", 1)  # 4 batches: 2 worker processes, not a thread
    forked, loader = [], bi.DataLoader
    monkeypatch.setattr(bi, "DataLoader", lambda *a, **k: forked.append(k["num_workers"]) or loader(*a, **k))
    for role in ("query", "document"):
        want = encode_texts(prompted, TEXTS, role, batch_size=3)  # sentence-transformers' encode_query / _document
        got = bi.run_batches(prompted, TEXTS, 3, output="sentence_embedding", workers=workers, normalize=True,
                             prompt=role_prompt(prompted, role), task=role)
        assert got.dtype == torch.float32 and got.shape == want.shape == (len(TEXTS), 32)
        np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    assert forked == ([workers] * 2 if workers else [])
    no_prompt = bi.run_batches(prompted, TEXTS, 3, output="sentence_embedding", workers=workers, normalize=True)
    assert not np.allclose(no_prompt.numpy(), want, atol=1e-3)  # the prompt reached the tokenizer


def test_role_prompts_are_sentence_transformers(prompted):
    assert role_prompt(prompted, "query") == "query: " and role_prompt(prompted, "document") == "passage: "
    prompted.prompts = {"corpus": "c: ", "other": "o: "}
    assert role_prompt(prompted, "document") == "c: " and role_prompt(prompted, "query") is None
    prompted.default_prompt_name = "other"
    assert role_prompt(prompted, "query") == "o: "
    np.testing.assert_allclose(prompted.encode_query(TEXTS[:2]), prompted.encode(TEXTS[:2], prompt="o: "), atol=1e-6)


@pytest.mark.parametrize("workers", [0, 1])
def test_run_batches_scores_pairs_as_cross_encoder_predict(tiny_model_dir, workers, monkeypatch):
    from prod_st.teachers.cross_encoder import load_cross_encoder

    monkeypatch.setattr(bi, "BATCHES_PER_WORKER", 1)

    torch.manual_seed(0)
    ce = load_cross_encoder(tiny_model_dir, num_labels=1)
    pairs = [(TEXTS[i], TEXTS[-1 - i]) for i in range(len(TEXTS))]
    want = ce.predict(pairs, batch_size=4, activation_fn=torch.nn.Identity(), convert_to_numpy=True)
    got = bi.run_batches(ce, pairs, 4, output="scores", workers=workers, length=lambda p: len(p[0]) + len(p[1]))
    np.testing.assert_allclose(got.reshape(-1).numpy(), want, atol=1e-5)
    assert len(set(np.round(want, 4))) > 1


def test_few_batches_take_a_thread_not_processes(prompted, monkeypatch):
    """A fork per call costs more than a few batches' tokenising: BATCHES_PER_WORKER batches per worker process."""
    monkeypatch.setattr(bi, "DataLoader", lambda *a, **k: pytest.fail("forked for 4 batches"))
    assert bi.run_batches(prompted, TEXTS, 3, output="sentence_embedding", workers=4).shape == (len(TEXTS), 32)


def test_host_workers_only_with_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bi.host_workers() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bi.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert bi.host_workers() == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert bi.host_workers() == 0  # one core per rank: a thread tokenises ahead instead
