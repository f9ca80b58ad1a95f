"""Queries and documents in their roles: prompts and Router routes at inference and at training time."""

from __future__ import annotations

import numpy as np
from sentence_transformers import SentenceTransformer

from prod_st.retrieval.encoding import encode_texts, training_roles

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

    import prod_st.training.student_training as student_training
    from prod_st.training.losses import contrastive_loss

    seen = []
    real = student_training.SentenceTransformerTrainingArguments
    monkeypatch.setattr(student_training, "SentenceTransformerTrainingArguments",
                        lambda **kwargs: seen.append(kwargs) or real(**kwargs))
    model = SentenceTransformer(tiny_model_dir, prompts={"query": "query: ", "document": "passage: "})
    data = datasets.Dataset.from_dict({"query": ["q1", "q2"], "positive": ["p1", "p2"]})
    student_training.train_student(model, data, contrastive_loss(model), workdir=tmp_path / "ck", lr=1e-4, epochs=1.0,
                                   max_steps=1, batch_size=2, warmup_ratio=0.0, seed=0, no_duplicates=False)
    assert seen[0]["prompts"] == {"query": "query: ", "positive": "passage: "}


# ---------------------------------------------------------------------------- query length (PROD: 32 vs 144)
LONG = " ".join(["retrieval"] * 100)  # far longer than either length below


def _spy_widths(model) -> list[tuple[str | None, int]]:
    """Record (task, input_ids width) of every batch that reaches the model's Transformer module's preprocess,
    where the tokenizer is called: in training (the collator) and in encoding alike."""
    seen: list[tuple[str | None, int]] = []
    module = model[0]
    real = module.preprocess

    def spy(inputs, *args, **kwargs):
        features = real(inputs, *args, **kwargs)
        seen.append((kwargs.get("task"), features["input_ids"].shape[1]))
        return features

    module.preprocess = spy
    return seen


def test_queries_reach_the_tokenizer_cut_at_max_query_length_when_encoding(tiny_model_dir):
    from prod_st.util.models import set_lengths

    model = SentenceTransformer(tiny_model_dir)
    set_lengths(model, 8, 32)
    seen = _spy_widths(model)
    encode_texts(model, [LONG, "short"], "query")
    encode_texts(model, [LONG, "short"], "document")
    assert seen == [("query", 8), ("document", 32)]


def test_queries_reach_the_tokenizer_cut_at_max_query_length_in_training(tiny_model_dir, tmp_path):
    import datasets

    from prod_st.training.losses import contrastive_loss
    from prod_st.training.student_training import train_student
    from prod_st.util.models import set_lengths

    model = SentenceTransformer(tiny_model_dir)
    set_lengths(model, 8, 32)
    assert training_roles(model, COLUMNS) == {
        "router_mapping": {"query": "query", "positive": "document", "negative_1": "document"}
    }
    seen = _spy_widths(model)
    data = datasets.Dataset.from_dict({"query": [LONG, LONG + " a"], "positive": [LONG + " b", LONG + " c"],
                                       "negative_1": [LONG + " d", LONG + " e"]})
    train_student(model, data, contrastive_loss(model), workdir=tmp_path / "ck", lr=1e-4, epochs=1.0, max_steps=1,
                  batch_size=2, warmup_ratio=0.0, seed=0, no_duplicates=False)
    assert seen[:3] == [("query", 8), ("document", 32), ("document", 32)]


def test_query_length_is_saved_and_changes_the_model_fingerprint(tiny_model_dir, tmp_path):
    from prod_st.util.fingerprint import model_fingerprint
    from prod_st.util.models import set_lengths

    model = SentenceTransformer(tiny_model_dir)
    before = model_fingerprint(model)
    set_lengths(model, 8, 64)
    cut = model_fingerprint(model)
    assert cut != before  # every cache keyed by the student (mining, corpus, labels) sees the change
    model.save(str(tmp_path / "saved"))
    loaded = SentenceTransformer(str(tmp_path / "saved"))
    assert loaded[0].query_length == 8 and model_fingerprint(loaded) == cut
