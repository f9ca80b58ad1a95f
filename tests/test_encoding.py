"""Queries and documents in their roles: prompts and Router routes at inference and at training time."""

from __future__ import annotations

import numpy as np
from sentence_transformers import SentenceTransformer

from prod_st.encoding import encode_texts, training_roles

COLUMNS = ["query", "positive", "negative_1", "label"]


def test_plain_model_trains_as_before(tiny_model_dir):
    assert training_roles(SentenceTransformer(tiny_model_dir), COLUMNS) == {}


def test_prompts_by_column_role(tiny_model_dir):
    model = SentenceTransformer(tiny_model_dir, prompts={"query": "query: ", "document": "passage: "})
    assert training_roles(model, COLUMNS) == {
        "prompts": {"query": "query: ", "positive": "passage: ", "negative_1": "passage: "}
    }
    got = encode_texts(model, ["a text"], "document")
    np.testing.assert_allclose(got, model.encode(["a text"], prompt="passage: ", normalize_embeddings=True), rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, encode_texts(model, ["a text"], "query"))


def test_router_models_get_a_route_per_column(tiny_model_dir):
    from sentence_transformers.base.modules import Router

    base = SentenceTransformer(tiny_model_dir)
    router = Router.for_query_document(query_modules=[base[0], base[1]], document_modules=[base[0], base[1]])
    model = SentenceTransformer(modules=[router])
    assert training_roles(model, COLUMNS) == {
        "router_mapping": {"query": "query", "positive": "document", "negative_1": "document"}
    }


def test_student_training_passes_the_prompts_to_the_trainer(tiny_model_dir, tmp_path, monkeypatch):
    import datasets

    import prod_st.student_training as student_training
    from prod_st.losses import contrastive_loss

    seen = []
    real = student_training.SentenceTransformerTrainingArguments
    monkeypatch.setattr(student_training, "SentenceTransformerTrainingArguments",
                        lambda **kwargs: seen.append(kwargs) or real(**kwargs))
    model = SentenceTransformer(tiny_model_dir, prompts={"query": "query: ", "document": "passage: "})
    data = datasets.Dataset.from_dict({"query": ["q1", "q2"], "positive": ["p1", "p2"]})
    student_training.train_student(model, data, contrastive_loss(model), workdir=tmp_path / "ck", lr=1e-4, epochs=1.0,
                                   max_steps=1, batch_size=2, warmup_ratio=0.0, seed=0, no_duplicates=False)
    assert seen[0]["prompts"] == {"query": "query: ", "positive": "passage: "}
