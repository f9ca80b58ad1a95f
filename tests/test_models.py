"""Packaged model resolution and PROD's first-k-layers student."""

from __future__ import annotations

import pytest
import torch
from sentence_transformers import SentenceTransformer

from prod_st.util.errors import ProdStError
from prod_st.util.models import build_student, load_model, resolve_model_path


def test_packaged_minilm_resolves_to_a_local_folder(minilm_path):
    assert resolve_model_path("sentence-transformers/all-MiniLM-L6-v2") == minilm_path
    assert (__import__("pathlib").Path(minilm_path) / "modules.json").is_file()


def test_student_is_the_first_k_layers(tmp_path, minilm_path):
    teacher = SentenceTransformer(minilm_path)
    out = tmp_path / "student"
    build_student("all-MiniLM-L6-v2", 3, out)
    student = SentenceTransformer(str(out))  # a normal SentenceTransformer folder
    bert = student[0].auto_model
    assert bert.config.num_hidden_layers == 3 and len(bert.encoder.layer) == 3
    # Its token embeddings are exactly the full model's hidden states after layer 3.
    features = teacher.tokenize(["the cat purred on my lap"])
    with torch.no_grad():
        hidden = teacher[0].auto_model(**features, output_hidden_states=True).hidden_states[3]
        got = student[0].auto_model(**features).last_hidden_state
    torch.testing.assert_close(got, hidden)
    # Layer 3's weights are the teacher's layer 3 (index 2), not re-initialised.
    torch.testing.assert_close(
        bert.encoder.layer[2].output.dense.weight, teacher[0].auto_model.encoder.layer[2].output.dense.weight
    )
    # pooling + normalisation kept: unit-norm embeddings of the original width
    emb = student.encode(["hello world"], convert_to_tensor=True)
    assert emb.shape == (1, 384) and torch.linalg.norm(emb).item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("k", [0, 7])
def test_student_layer_count_out_of_range(k):
    with pytest.raises(ProdStError, match="between 1 and 6"):
        build_student("all-MiniLM-L6-v2", k)


def test_unknown_model_is_one_line_error():
    with pytest.raises(ProdStError, match=r"unknown model 'nobody/no-such-model'.*packaged model"):
        load_model("nobody/no-such-model")


def test_missing_model_folder():
    with pytest.raises(ProdStError, match="model folder './no/such/dir' does not exist"):
        load_model("./no/such/dir")


def test_student_pooling_and_similarity_overrides(tiny_model_dir):
    """PROD's student: CLS pooling and dot product, whatever the base model used."""
    model = build_student(tiny_model_dir, None, pooling="cls", similarity="dot")
    assert model[1].pooling_mode == "cls" and model.similarity_fn_name == "dot"
    features = model.tokenize(["a cat"])
    with torch.no_grad():
        cls = model[0].auto_model(**features).last_hidden_state[:, 0]
    torch.testing.assert_close(model.encode(["a cat"], convert_to_tensor=True), cls)


def test_dot_similarity_drops_normalisation():
    model = build_student("all-MiniLM-L6-v2", 2, similarity="dot")
    assert "Normalize" not in [type(m).__name__ for m in model]
    assert model.similarity_fn_name == "dot"


@pytest.mark.parametrize("k", [1, 2])
def test_config_kwargs_student_equals_the_cut_model(tiny_model_dir, minilm_path, k, caplog):
    """`config_kwargs={"num_hidden_layers": k}` loads exactly the weights that cutting the full model keeps:
    same parameters, same embeddings; and build_student takes that path (no full load)."""
    import prod_st.util.models as models

    texts = ["the cat purred on my lap", "a bank of the river"]
    for base in (tiny_model_dir, minilm_path):
        loaded = models._load_first_layers(base, k)
        assert loaded is not None
        cut = SentenceTransformer(base)
        models.cut_layers(cut, k)
        a, b = loaded.state_dict(), cut.state_dict()
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
        embeddings = [m.encode(texts, convert_to_tensor=True) for m in (loaded, cut)]
        torch.testing.assert_close(*embeddings)
    assert "LOAD REPORT" not in caplog.text  # the dropped layers' "unexpected" weights are expected


def test_build_student_falls_back_to_cutting(tiny_model_dir, monkeypatch):
    """When config_kwargs cannot give the first k layers (here: it reports nothing usable), the full model is
    loaded and cut, with the same result."""
    import prod_st.util.models as models

    direct = build_student(tiny_model_dir, 1)
    monkeypatch.setattr(models, "_load_first_layers", lambda *a, **k: None)
    cut = build_student(tiny_model_dir, 1)
    texts = ["a cat", "money"]
    torch.testing.assert_close(direct.encode(texts, convert_to_tensor=True), cut.encode(texts, convert_to_tensor=True))
    assert len(cut[0].auto_model.encoder.layer) == 1 and cut[0].auto_model.config.num_hidden_layers == 1


def test_config_kwargs_deeper_than_the_model_is_refused(tiny_model_dir):
    import prod_st.util.models as models

    assert models._load_first_layers(tiny_model_dir, 3) is None  # layer 3 would be randomly initialised
    with pytest.raises(ProdStError, match="between 1 and 2"):
        build_student(tiny_model_dir, 3)


def test_the_run_gives_every_student_it_loads_the_recipes_query_and_document_lengths(tiny_model_dir, tmp_path):
    """A step's student (even one saved without a query length, by an older prod-st) cuts queries at
    student.max_query_length and documents at max_doc_length."""
    from prod_st.recipe import parse_recipe
    from prod_st.runner import Runner

    SentenceTransformer(tiny_model_dir).save(str(tmp_path / "01-step" / "student"))
    recipe = parse_recipe({"name": "lengths", "data": {"dataset": "wordnet-gloss"}, "stages": [],
                           "student": {"init": tiny_model_dir, "max_query_length": 12, "max_doc_length": 40}})
    student = Runner(recipe, tmp_path / "run").load_student(tmp_path / "01-step")
    assert (student[0].query_length, student.max_seq_length) == (12, 40)
    long = " ".join(["retrieval"] * 100)
    assert student.preprocess([long], task="query")["input_ids"].shape[1] == 12
    assert student.preprocess([long], task="document")["input_ids"].shape[1] == 40
