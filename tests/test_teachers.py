"""Teachers: cached scoring (no teacher work twice, resumable), cache keys, raw scores, cached training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from prod_st.teachers import (
    BiEncoderTeacher,
    CrossEncoderTeacher,
    EmbeddingCache,
    ListwiseSoftmaxLoss,
    ScoreCache,
    Teacher,
    load_cross_encoder,
    model_fingerprint,
    scores_to_labels,
    text_key,
    train_bi_encoder,
    train_cross_encoder,
)
from prod_st.teachers import training as training_module
from prod_st.util.errors import ProdStError

QUERIES = ["I deposited my salary at the bank", "we sat on the river bank", "the cat purred on my lap"]
CANDIDATES = [
    ["bank a financial institution", "bank sloping land beside water", "cat a small feline", "a keyboard"],
    ["bank sloping land beside water", "bank a financial institution", "dog a canine kept as a pet", "violin"],
    ["cat a small domesticated feline animal", "dog a canine", "piano a keyboard instrument", "a bowed string"],
]
NUM_PAIRS = sum(len(c) for c in CANDIDATES)  # 12 distinct (query, candidate) pairs


@pytest.fixture(scope="session")
def tiny_ce_dir(tmp_path_factory, tiny_model_dir) -> str:
    """The tiny BERT as a cross-encoder with a saved 1-logit head, scaled so logits leave [0, 1]."""
    torch.manual_seed(0)
    model = load_cross_encoder(tiny_model_dir, num_labels=1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "classifier" in name:
                param.mul_(50.0)
    folder = tmp_path_factory.mktemp("tiny-ce") / "ce"
    model.save(str(folder))
    return str(folder)


def _count_calls(monkeypatch, obj, method: str, fail_on_call: int | None = None) -> list[int]:
    """Wrap obj.method; the returned list records the number of inputs of each call. With fail_on_call=k,
    the k-th call (1-based) raises instead, as an interrupted run would."""
    calls: list[int] = []
    original = getattr(obj, method)

    def wrapper(inputs, *args, **kwargs):
        if fail_on_call is not None and len(calls) + 1 == fail_on_call:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(len(inputs))
        return original(inputs, *args, **kwargs)

    monkeypatch.setattr(obj, method, wrapper)
    return calls


# ---------------------------------------------------------------------------------------------------- caches
def test_score_cache_roundtrip_and_atomic_shards(tmp_path):
    cache = ScoreCache(tmp_path / "s")
    cache.put_many(["a", "b"], [1.5, -2.25])
    cache.put_many(["c"], np.array([3.0], dtype=np.float32))
    (tmp_path / "s" / ".part-junk.arrow.tmp").write_bytes(b"half written")  # a killed write: ignored
    reopened = ScoreCache(tmp_path / "s")
    assert reopened.get_many(["a", "b", "c", "zz"]) == {"a": 1.5, "b": -2.25, "c": 3.0}
    assert reopened.missing(["a", "zz", "zz", "yy"]) == ["zz", "yy"]
    assert len(list((tmp_path / "s").glob("part-*.arrow"))) == 2


def test_embedding_cache_roundtrip_and_only_rank0_writes(tmp_path, monkeypatch):
    vectors = np.arange(6, dtype=np.float32).reshape(2, 3)
    EmbeddingCache(tmp_path / "e").put_many(["x", "y"], vectors)
    np.testing.assert_array_equal(EmbeddingCache(tmp_path / "e").matrix(["y", "x"]), vectors[::-1])

    monkeypatch.setenv("RANK", "1")
    other = EmbeddingCache(tmp_path / "e")
    other.put_many(["z"], vectors[:1])
    assert "z" in other and "z" not in EmbeddingCache(tmp_path / "e")


def test_text_key_is_unambiguous():
    assert text_key("ab", "c") != text_key("a", "bc")
    assert text_key("a", settings={"n": 1}) != text_key("a", settings={"n": 2}) != text_key("a")
    assert text_key("a", "b") == text_key("a", "b")


def test_scores_to_labels_pads_with_minus_inf():
    labels = scores_to_labels([[1.0, 2.0, 3.0], [4.0]])
    assert labels.shape == (2, 3) and labels[1, 0] == 4.0 and torch.isinf(labels[1, 1:]).all()
    with pytest.raises(ProdStError):
        scores_to_labels([[1.0, 2.0]], width=1)


# ------------------------------------------------------------------------------------------ cross-encoder
def test_cross_encoder_counts_forward_passes_and_resumes(tiny_ce_dir, tmp_path, monkeypatch):
    # Uninterrupted reference run, own cache.
    reference = CrossEncoderTeacher(tiny_ce_dir, batch_size=4, chunk_size=4, cache_root=tmp_path / "ref")
    expected = reference.score(QUERIES, CANDIDATES, progress=False)

    # Interrupted run: the second chunk's forward pass raises.
    root = tmp_path / "cache"
    teacher = CrossEncoderTeacher(tiny_ce_dir, batch_size=4, chunk_size=4, cache_root=root)
    calls = _count_calls(monkeypatch, teacher.model, "predict", fail_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        teacher.score(QUERIES, CANDIDATES, progress=False)
    assert calls == [4]
    assert len(ScoreCache(teacher.cache_folder / "scores")) == 4  # the finished chunk is on disk

    # Resume in a fresh process-like teacher: only the 8 missing pairs go through the model.
    resumed = CrossEncoderTeacher(tiny_ce_dir, batch_size=4, chunk_size=4, cache_root=root)
    calls = _count_calls(monkeypatch, resumed.model, "predict")
    got = resumed.score(QUERIES, CANDIDATES, progress=False)
    assert sum(calls) == NUM_PAIRS - 4
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    # Rerun: no teacher work at all, same object or a new one.
    assert resumed.score(QUERIES, CANDIDATES, progress=False) == got
    again = CrossEncoderTeacher(tiny_ce_dir, batch_size=4, chunk_size=4, cache_root=root)
    forward_calls = _count_calls(monkeypatch, again.model, "forward")
    predict_calls = _count_calls(monkeypatch, again.model, "predict")
    assert again.score(QUERIES, CANDIDATES, progress=False) == got
    assert predict_calls == [] and forward_calls == []


def test_cross_encoder_returns_raw_logits(tiny_ce_dir, tmp_path):
    from sentence_transformers import CrossEncoder

    teacher = CrossEncoderTeacher(tiny_ce_dir, cache_root=tmp_path)
    assert isinstance(teacher, Teacher) and teacher.kind == "cross-encoder"
    scores = teacher.score(QUERIES, CANDIDATES, progress=False)
    assert [len(s) for s in scores] == [len(c) for c in CANDIDATES]

    plain = CrossEncoder(tiny_ce_dir, activation_fn=torch.nn.Identity())
    pairs = [(q, c) for q, cands in zip(QUERIES, CANDIDATES) for c in cands]
    logits = plain.predict(pairs, activation_fn=torch.nn.Identity())
    np.testing.assert_allclose([s for row in scores for s in row], logits, rtol=1e-5, atol=1e-5)
    assert any(s < 0 or s > 1 for row in scores for s in row)  # not squashed by a sigmoid


def test_cache_key_depends_on_weights_and_max_length_not_folder(tiny_ce_dir, tmp_path):
    base = CrossEncoderTeacher(tiny_ce_dir, max_length=32, cache_root=tmp_path)
    shorter = CrossEncoderTeacher(tiny_ce_dir, max_length=16, cache_root=tmp_path)
    assert base.fingerprint != shorter.fingerprint and base.cache_folder != shorter.cache_folder

    copy = tmp_path / "copy"
    base.model.save(str(copy))
    assert CrossEncoderTeacher(str(copy), max_length=32, cache_root=tmp_path).fingerprint == base.fingerprint

    changed = load_cross_encoder(copy)
    changed.max_seq_length = 32
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-3
    assert model_fingerprint(changed) != base.fingerprint


def test_score_rejects_mismatched_rows(tiny_ce_dir, tmp_path):
    with pytest.raises(ProdStError):
        CrossEncoderTeacher(tiny_ce_dir, cache_root=tmp_path).score(QUERIES, CANDIDATES[:2])


# --------------------------------------------------------------------------------------------- bi-encoder
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_bi_encoder_scores_are_model_similarities(tiny_model_dir, tmp_path, similarity):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(tiny_model_dir)
    model.similarity_fn_name = similarity
    teacher = BiEncoderTeacher(model, cache_root=tmp_path)
    assert isinstance(teacher, Teacher) and teacher.kind == "bi-encoder"
    scores = teacher.score(QUERIES, CANDIDATES, progress=False)
    for query, cands, row in zip(QUERIES, CANDIDATES, scores):
        q = model.encode([query], convert_to_tensor=True)
        c = model.encode(cands, convert_to_tensor=True)
        expected = model.similarity(q, c)[0] if similarity == "cosine" else (c @ q[0])
        np.testing.assert_allclose(row, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_bi_encoder_embeds_each_text_once_and_builds_row_tensors(tiny_model_dir, tmp_path, monkeypatch):
    teacher = BiEncoderTeacher(tiny_model_dir, cache_root=tmp_path, chunk_size=5)
    calls = _count_calls(monkeypatch, teacher.model, "encode")
    labels = teacher.embeddings_for_rows(QUERIES, CANDIDATES)
    distinct = len(set(QUERIES) | {c for cands in CANDIDATES for c in cands})
    assert sum(calls) == distinct and max(calls) <= 5
    assert labels.shape == (3, 1 + 4, teacher.dimension) and labels.dtype == torch.float32
    np.testing.assert_array_equal(labels[1, 0].numpy(), teacher.embed([QUERIES[1]], "query")[0])
    # In-batch teacher scores are dot products of these rows, e.g. query 0 against every candidate.
    np.testing.assert_allclose(
        (labels[0, 1:] @ labels[0, 0]).numpy(), teacher.score(QUERIES[:1], CANDIDATES[:1])[0], rtol=1e-5
    )

    calls.clear()
    fresh = BiEncoderTeacher(tiny_model_dir, cache_root=tmp_path)  # reopened from disk
    fresh_calls = _count_calls(monkeypatch, fresh.model, "encode")
    teacher.embed(QUERIES, "query")
    np.testing.assert_array_equal(fresh.embeddings_for_rows(QUERIES, CANDIDATES).numpy(), labels.numpy())
    assert calls == [] and fresh_calls == []

    with pytest.raises(ProdStError):
        teacher.embeddings_for_rows(QUERIES[:2], [CANDIDATES[0], CANDIDATES[1][:2]])


def test_bi_encoder_encodes_queries_and_documents_in_their_roles(tiny_model_dir, tmp_path):
    """A model with query/document prompts (E5, BGE, ...): queries go through encode_query, candidates through
    encode_document, in the teacher's scores, its in-batch labels and the cache (one text, two roles)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(tiny_model_dir, prompts={"query": "query: ", "document": "passage: "})
    model.similarity_fn_name = "dot"
    teacher = BiEncoderTeacher(model, cache_root=tmp_path)
    q = model.encode_query(QUERIES[:1])
    docs = model.encode_document(CANDIDATES[0])
    np.testing.assert_allclose(teacher.score(QUERIES[:1], CANDIDATES[:1], progress=False)[0], docs @ q[0], rtol=1e-4)
    plain = model.encode(CANDIDATES[0]) @ model.encode(QUERIES[:1])[0]
    assert not np.allclose(docs @ q[0], plain, rtol=1e-3)  # the prompts change the scores: the test can fail
    labels = teacher.embeddings_for_rows(QUERIES[:1], CANDIDATES[:1])
    np.testing.assert_allclose(labels[0, 0].numpy(), q[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(labels[0, 1:].numpy(), docs, rtol=1e-4, atol=1e-6)
    same = CANDIDATES[0][0]
    assert not np.allclose(teacher.embed([same], "query"), teacher.embed([same], "document"))


# --------------------------------------------------------------------------------------------- training
ROWS = [
    (f"query number {i} about {topic}", f"{topic} passage {i}", [f"negative {i} a", f"negative {i} b"])
    for i, topic in enumerate(["bank", "river", "cat", "dog", "piano", "violin", "tree", "car"])
]


def _refuse_training(monkeypatch, name: str) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was trained again")

    monkeypatch.setattr(training_module, name, refuse)


def test_listwise_loss_is_softmax_ce_over_own_list(tiny_ce_dir):
    model = load_cross_encoder(tiny_ce_dir)
    queries = [r[0] for r in ROWS[:3]]
    columns = [queries, [r[1] for r in ROWS[:3]], [r[2][0] for r in ROWS[:3]], [r[2][1] for r in ROWS[:3]]]
    model.eval()
    with torch.no_grad():
        loss = ListwiseSoftmaxLoss(model)(columns, labels=None)
        per_column = [model.predict(list(zip(queries, col)), activation_fn=torch.nn.Identity()) for col in columns[1:]]
        logits = torch.from_numpy(np.stack(per_column, axis=1))
    expected = torch.nn.functional.cross_entropy(logits, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


def test_train_cross_encoder_is_cached(tiny_ce_dir, tmp_path, monkeypatch):
    kwargs = dict(output_dir=tmp_path / "run", batch_size=4, epochs=1, max_length=32, seed=1, cache_root=tmp_path)
    model = train_cross_encoder(tiny_ce_dir, ROWS, **kwargs)
    done = next((tmp_path / "trained").glob("*/DONE"))
    mtime = done.stat().st_mtime_ns
    untrained = load_cross_encoder(tiny_ce_dir, max_length=32)
    assert model.num_labels == 1 and model.max_seq_length == 32
    assert model_fingerprint(model) != model_fingerprint(untrained)  # the 2 steps changed the weights

    _refuse_training(monkeypatch, "CrossEncoderTrainer")
    again = train_cross_encoder(tiny_ce_dir, ROWS, **kwargs)
    assert done.stat().st_mtime_ns == mtime
    assert model_fingerprint(again) == model_fingerprint(model)
    assert np.isfinite(again.predict([("q", "d")], activation_fn=torch.nn.Identity())).all()
    with pytest.raises(AssertionError, match="trained again"):  # other rows = another key
        train_cross_encoder(tiny_ce_dir, ROWS[:4], **kwargs)


def test_a_cross_encoder_teacher_is_the_same_whatever_ran_before_it(tiny_model_dir, tmp_path):
    """The cache (and every ablation row sharing a teacher) relies on it: the same rows, settings and seed give the
    same weights, the new 1-logit head included, whatever the process's random state was (bf16, as the ablation)."""
    kwargs = dict(batch_size=4, epochs=2, max_length=32, seed=13, precision="bf16")
    first = train_cross_encoder(tiny_model_dir, ROWS, cache_root=tmp_path / "a", **kwargs)
    torch.rand(1000)
    np.random.rand(1000)
    second = train_cross_encoder(tiny_model_dir, ROWS, cache_root=tmp_path / "b", **kwargs)
    assert model_fingerprint(first) == model_fingerprint(second)
    assert model_fingerprint(first) != model_fingerprint(load_cross_encoder(tiny_model_dir, max_length=32, num_labels=1))


def test_train_bi_encoder_is_cached(tiny_model_dir, tmp_path, monkeypatch):
    kwargs = dict(output_dir=tmp_path / "run", batch_size=4, epochs=1, seed=1, cache_root=tmp_path)
    model = train_bi_encoder(tiny_model_dir, ROWS, **kwargs)
    done = next((tmp_path / "trained").glob("*/DONE"))
    mtime = done.stat().st_mtime_ns

    _refuse_training(monkeypatch, "SentenceTransformerTrainer")
    again = train_bi_encoder(tiny_model_dir, ROWS, **kwargs)
    assert done.stat().st_mtime_ns == mtime
    assert model_fingerprint(again) == model_fingerprint(model)
    assert again.encode(["a query"]).shape == (1, model.get_embedding_dimension())


def test_bf16_teacher_training_is_another_cached_teacher(tiny_model_dir, tmp_path):
    """precision bf16 trains under the trainer's bf16 flag and is cached under its own key; fp32 keeps its key."""
    kwargs = dict(output_dir=tmp_path / "run", batch_size=4, epochs=1, seed=1, cache_root=tmp_path)
    fp32 = train_bi_encoder(tiny_model_dir, ROWS, **kwargs)
    bf16 = train_bi_encoder(tiny_model_dir, ROWS, precision="bf16", **kwargs)
    markers = [json.loads(p.read_text()) for p in (tmp_path / "trained").glob("*/DONE")]
    assert sorted(m["settings"].get("precision", "fp32") for m in markers) == ["bf16", "fp32"]
    assert model_fingerprint(bf16) != model_fingerprint(fp32)


def test_training_rows_must_be_rectangular(tiny_model_dir, tmp_path):
    with pytest.raises(ProdStError):
        train_bi_encoder(tiny_model_dir, [ROWS[0], ("q", "p", ["n"])], cache_root=tmp_path)


# --------------------------------------------------------------------------------------------- precision
def test_teacher_precision_scores_under_autocast_and_keys_the_cache(tiny_ce_dir, tiny_model_dir, tmp_path,
                                                                    monkeypatch):
    """bf16 scoring runs the model under torch.autocast (bf16 activations), is close to fp32, and is cached in its
    own folder; fp32 keeps the folder it always had (<root>/<fingerprint>), so existing caches stay valid."""
    fp32 = CrossEncoderTeacher(tiny_ce_dir, cache_root=tmp_path)
    bf16 = CrossEncoderTeacher(tiny_ce_dir, cache_root=tmp_path, precision="bf16")
    assert fp32.cache_folder == tmp_path / fp32.fingerprint
    assert bf16.cache_folder == tmp_path / f"{fp32.fingerprint}-bf16"
    dtypes = []
    linear = next(m for m in bf16.model.modules() if isinstance(m, torch.nn.Linear))
    hook = linear.register_forward_hook(lambda module, inputs, out: dtypes.append(out.dtype))
    low = bf16.score(QUERIES, CANDIDATES, progress=False)
    hook.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    full = fp32.score(QUERIES, CANDIDATES, progress=False)
    assert low != full  # computed, not read from the fp32 cache
    np.testing.assert_allclose(low, full, rtol=0.05, atol=0.5)
    assert len(ScoreCache(bf16.cache_folder / "scores")) == NUM_PAIRS

    bi = BiEncoderTeacher(tiny_model_dir, cache_root=tmp_path, precision="bf16")
    assert bi.cache_folder.name.endswith("-bf16")
    vectors = bi.embed(QUERIES, "query")
    assert vectors.dtype == np.float32
    reference = BiEncoderTeacher(tiny_model_dir, cache_root=tmp_path).embed(QUERIES, "query")
    np.testing.assert_allclose(vectors, reference, atol=0.05)


def test_fp16_teacher_on_cpu_is_a_one_line_error(tiny_ce_dir, tmp_path):
    teacher = CrossEncoderTeacher(tiny_ce_dir, cache_root=tmp_path, precision="fp16")
    with pytest.raises(ProdStError, match="fp16 teacher scoring needs a GPU"):
        teacher.score(QUERIES, CANDIDATES, progress=False)
class _FixedTeacher:
    def __init__(self, name, table):
        self.name, self.table, self.calls = name, table, 0

    def score(self, queries, candidate_lists, *, progress=True):
        self.calls += 1
        return [[self.table[(q, d)] for d in docs] for q, docs in zip(queries, candidate_lists)]


def test_ensemble_teacher_sums_the_members_logits():
    from prod_st.teachers import EnsembleTeacher

    bi = _FixedTeacher("bi", {("q", "a"): 0.9, ("q", "b"): 0.1, ("r", "a"): 0.5})
    ce = _FixedTeacher("ce", {("q", "a"): -2.0, ("q", "b"): 3.0, ("r", "a"): 1.0})
    ensemble = EnsembleTeacher([(bi, 0.5, 20.0), (ce, 0.5, 1.0)], name="ens")
    scores = ensemble.score(["q", "r"], [["a", "b"], ["a"]])
    assert scores[0] == pytest.approx([0.5 * 18.0 - 1.0, 0.5 * 2.0 + 1.5]) and scores[1] == pytest.approx([5.5])
    assert bi.calls == ce.calls == 1
    with pytest.raises(ProdStError, match="2 queries but 1 candidate lists"):
        ensemble.score(["q", "r"], [["a"]])


def test_pool_cache_folders_skip_an_ensemble(tmp_path):
    """Pruning asks the pool which cache folders its teachers use; an ensemble has none of its own."""
    from pathlib import Path

    from prod_st.teachers import EnsembleTeacher
    from prod_st.teachers.pool import TeacherPool

    member = _FixedTeacher("bi", {})
    member.cache_folder = Path(tmp_path / "bi")
    pool = TeacherPool.__new__(TeacherPool)
    pool._built = {"bi": member, "ens": EnsembleTeacher([(member, 1.0, 20.0)], name="ens")}
    assert pool.cache_folders() == {tmp_path / "bi"}
