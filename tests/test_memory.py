"""Memory that does not grow with the data: stage labels written to Arrow batch by batch (the teacher's and the
stage-start student's scores, checked against a plain encode-and-dot reference), teacher caches read
memory-mapped, the stage-start student's cache pruned when its stage ends, and the cost lines logged before
long steps."""

from __future__ import annotations

import logging
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import prod_st.teachers.labels as labels_module
from prod_st.runner import Runner
from prod_st.teachers import BiEncoderTeacher, EmbeddingCache, ScoreCache
from prod_st.training.losses import score_scale
from prod_st.training.stage_data import DATA_FILE, FILLER, TrainingRows, labelled_dataset, read_rows
from prod_st.util import cost

QUERIES = ["the bank of the river", "a cat on a mat", "play the violin", "deposit money", "a dog barks"]
POSITIVES = ["sloping land by water", "a small feline", "a bowed instrument", "a financial institution", "a canine"]
NEGATIVES = [["a piano", "a bank loan"], ["a dog", "a lion"], ["a cello", "a drum"], ["a river", "a stream"],
             ["a wolf", "a cat"]]


def negatives(filler: bool) -> list[list[str]]:
    """NEGATIVES, with row 3's second one a FILLER (a query short of negatives) if `filler`."""
    return [[FILLER if filler and (i, j) == (3, 1) else n for j, n in enumerate(row)] for i, row in enumerate(NEGATIVES)]


def small_rows(filler: bool = True) -> TrainingRows:
    """Five rows, two negatives each; row 3 has one filler (list mode masks it with -inf) unless not `filler`
    (in-batch rows have none)."""
    return TrainingRows.from_texts([f"q{i}" for i in range(5)], QUERIES, POSITIVES, negatives(filler))


class Pool:
    """The two things Runner.labels asks of a TeacherPool."""

    def __init__(self, teacher: BiEncoderTeacher) -> None:
        self.teacher = teacher

    def get(self, name, student=None):
        return self.teacher

    def scale(self, name) -> float:
        return score_scale(self.teacher.model)

    def cache_folders(self):
        return {self.teacher.cache_folder}


class Spec:
    def __init__(self, reg_weight: float) -> None:
        self.reg_weight = reg_weight


def bare_runner(teacher: BiEncoderTeacher) -> Runner:
    runner = Runner.__new__(Runner)
    runner.teachers, runner.stage_start_cache = Pool(teacher), None
    runner.stage_start_documents = lambda student: None  # rows of a text table, not of a corpus: encode them
    return runner


COSINE_X = 20.0  # a cosine model's similarities times 20 are its logits (both models here are cosine models)


def plain_labels(teacher_model, student, candidates: str, reg_weight: float, filler: bool) -> torch.Tensor:
    """The labels by hand, from the models alone: encode every text, normalise, dot. In-batch: per row the
    teacher's [20 x query, positive, negatives] unit vectors; list: per row 20 x the teacher's cosine of the query
    with each candidate, -inf for a filler, and with `reg_weight` the stage-start student's the same way."""

    def unit(model, texts: list[str], role: str) -> torch.Tensor:
        encode = model.encode_query if role == "query" else model.encode_document
        vectors = encode(texts, convert_to_tensor=True).float()
        return vectors / vectors.norm(dim=-1, keepdim=True)

    lists = [[p, *n] for p, n in zip(POSITIVES, negatives(filler))]
    if candidates == "in_batch":
        columns = [COSINE_X * unit(teacher_model, QUERIES, "query")]
        columns += [unit(teacher_model, [row[j] for row in lists], "document") for j in range(len(lists[0]))]
        return torch.stack(columns, dim=1)
    sets = []
    for model in [teacher_model] + ([student] if reg_weight > 0 else []):
        q = unit(model, QUERIES, "query")
        scores = torch.full((len(QUERIES), len(lists[0])), -math.inf)
        for i, row in enumerate(lists):
            for j, text in enumerate(row):
                if text != FILLER:
                    scores[i, j] = COSINE_X * float(q[i] @ unit(model, [text], "document")[0])
        sets.append(scores)
    return sets[0] if len(sets) == 1 else torch.stack(sets, dim=1)


@pytest.fixture
def models(tiny_model_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    teacher = BiEncoderTeacher(tiny_model_dir, name="bi", cache_root=tmp_path / "teachers")
    student = SentenceTransformer(tiny_model_dir)
    with torch.no_grad():  # another model than the teacher: its own cache folder
        next(student.parameters()).mul_(1.5)
    return teacher, student


@pytest.mark.parametrize("candidates, reg_weight, shape", [("in_batch", 0.0, (5, 4, 32)), ("list", 1.0, (5, 2, 3))])
def test_labels_are_arrow_float32_and_the_models_own_scores(
    models, tmp_path, monkeypatch, tiny_model_dir, candidates, reg_weight, shape
):
    from sentence_transformers import SentenceTransformer

    teacher, student = models
    filler = candidates == "list"  # in-batch rows have no fillers
    rows = small_rows(filler=filler)
    monkeypatch.setattr(labels_module, "LABEL_ROWS", 2)  # three batches: labels cross batch boundaries
    runner = bare_runner(teacher)
    batches = list(runner.labels("bi", rows, candidates, student, Spec(reg_weight)))
    assert [len(b) for b in batches] == [2, 2, 1]
    (tmp_path / "stage").mkdir()
    dataset = labelled_dataset(tmp_path / "stage" / "train_data", rows, iter(batches))

    # what the data collator hands PRODLoss (torch.tensor of the rows' labels) is what the teacher computed, bit
    # for bit, and those are the models' own scores: the reference encodes with the models, nothing of prod-st
    stored = torch.tensor(dataset["label"])
    assert stored.shape == shape and stored.dtype == torch.float32
    assert torch.equal(stored, torch.from_numpy(np.concatenate(batches)))
    want = plain_labels(SentenceTransformer(tiny_model_dir), student, candidates, reg_weight, filler)
    torch.testing.assert_close(stored, want, rtol=1e-4, atol=1e-4)
    if candidates == "list":
        assert torch.isinf(stored[3, :, 2]).all() and (stored[3, :, 2] < 0).all()  # the filler column
        assert not torch.isclose(stored[:, 0], stored[:, 1]).all()  # the teacher's row is not the student's

    # stored as Arrow float32 fixed-size lists, memory-mapped from the stage folder; no Python objects
    column_type = dataset.data.schema.field("label").type
    assert pa.types.is_fixed_size_list(column_type) and pa.types.is_fixed_size_list(column_type.value_type)
    assert column_type.value_type.value_type == pa.float32()
    assert dataset.cache_files and all("train_data" in f["filename"] for f in dataset.cache_files)
    assert dataset.column_names == ["query", "positive", "negative_1", "negative_2", "label"]
    assert dataset["query"] == QUERIES and dataset["negative_2"] == [n[1] for n in negatives(filler)]
    assert [p.name for p in (tmp_path / "stage").iterdir()] == ["train_data"]  # no temp file left


@pytest.mark.parametrize("candidates", ["in_batch", "list"])
def test_rows_hold_no_document_text_and_fetch_a_slice_at_a_time(models, monkeypatch, tmp_path, candidates):
    """A stage's rows are corpus rows (ints); the teacher's labels, and the dataset written with them, fetch
    the documents' texts one LABEL_ROWS slice at a time."""
    teacher, student = models
    rows = small_rows(filler=candidates == "list")
    assert rows.positive_rows.dtype == rows.negative_rows.dtype == np.int64 and rows.negative_rows.shape == (5, 2)
    fetched, texts_at = [], rows.doc_texts
    rows.doc_texts = lambda wanted: fetched.append(len(wanted)) or texts_at(wanted)
    monkeypatch.setattr(labels_module, "LABEL_ROWS", 2)
    (tmp_path / "stage").mkdir()
    labelled_dataset(tmp_path / "stage" / "train_data", rows,
                     bare_runner(teacher).labels("bi", rows, candidates, student, Spec(0.0)))
    assert len(fetched) == 6 and max(fetched) <= 2 * (1 + rows.count)  # 3 slices for the teacher, 3 for the file


def test_labels_column_is_written_batch_by_batch(tmp_path):
    """to_dataset takes the label batches as they come and never holds more than one."""
    rows = small_rows()
    seen = []

    def batches():
        for start in range(0, 5, 2):
            seen.append(start)
            yield np.full((min(2, 5 - start), 3), start, dtype=np.float32)

    (tmp_path / "rows").mkdir()
    dataset = rows.to_dataset(batches(), folder=tmp_path / "rows")
    assert seen == [0, 2, 4] and dataset["label"][4] == [4.0, 4.0, 4.0]
    assert [f.name for f in (tmp_path / "rows").iterdir()] == [DATA_FILE]  # datasets' ArrowWriter, no state.json
    assert read_rows(tmp_path / "rows")["label"] == [[float(2 * (i // 2))] * 3 for i in range(5)]
    assert str(dataset.features["label"]) == "List(Value('float32'), length=3)"
    (tmp_path / "short").mkdir()
    with pytest.raises(ValueError, match="2 labels for 5 training rows"):
        rows.to_dataset(iter([np.zeros((2, 3))]), folder=tmp_path / "short")
    for bad in (np.nan, np.inf):  # checked once here, not at every training step (a host sync on a GPU)
        (tmp_path / f"bad-{bad}").mkdir()
        labels = np.zeros((5, 3), dtype=np.float32)
        labels[3, 1] = bad
        with pytest.raises(ValueError, match=r"labels of training rows 2\.\.3 hold NaN or \+inf"):
            rows.to_dataset(iter([labels[:2], labels[2:4], labels[4:]]), folder=tmp_path / f"bad-{bad}")
    (tmp_path / "missing").mkdir()
    labels = np.zeros((5, 3), dtype=np.float32)
    labels[:, 2] = -np.inf  # a missing candidate is allowed
    assert len(rows.to_dataset(iter([labels]), folder=tmp_path / "missing")) == 5


def test_warmup_rows_are_written_a_batch_at_a_time(tmp_path, monkeypatch):
    """The warm-up's rows carry no labels: written TEXT_ROWS rows at a time (the whole stage's texts are never
    one set of Python lists), memory-mapped, and equal to the in-memory dataset of the same rows."""
    import prod_st.training.stage_data as stage_data

    rows = small_rows()
    fetched, texts_at = [], rows.doc_texts
    rows.doc_texts = lambda wanted: fetched.append(len(wanted)) or texts_at(wanted)
    monkeypatch.setattr(stage_data, "TEXT_ROWS", 2)
    dataset = labelled_dataset(tmp_path / "train_data", rows, None)
    assert len(fetched) == 3 and max(fetched) <= 2 * (1 + rows.count)  # rows 0-1, 2-3, 4
    assert dataset.to_dict() == {"query": QUERIES, "positive": POSITIVES, "negative_1": [n[0] for n in NEGATIVES],
                                 "negative_2": [n[1] if i != 3 else FILLER for i, n in enumerate(NEGATIVES)]}
    assert dataset.column_names == ["query", "positive", "negative_1", "negative_2"]
    assert dataset.cache_files and all("train_data" in f["filename"] for f in dataset.cache_files)


def test_cache_reopens_memory_mapped_without_loading_values(tmp_path):
    keys = [f"text-{i}" for i in range(20_000)]
    vectors = np.random.default_rng(0).random((20_000, 64), dtype=np.float32)  # 5 MB of values
    writer = EmbeddingCache(tmp_path / "e")
    for start in range(0, 20_000, 2_000):  # ten shards
        writer.put_many(keys[start : start + 2_000], vectors[start : start + 2_000])

    before = pa.total_allocated_bytes()
    cache = EmbeddingCache(tmp_path / "e")
    assert len(cache) == 20_000
    assert pa.total_allocated_bytes() - before < 100_000  # the values stay in the mapped files
    picked = [19_999, 3, 7_001, 3]
    np.testing.assert_array_equal(cache.matrix([keys[i] for i in picked]), vectors[picked])
    assert cache.missing(["text-5", "new", "text-19999", "new"]) == ["new"]
    with pytest.raises(KeyError):
        cache.matrix(["text-1", "never seen"])


def test_score_cache_lookups_across_shards_and_older_parquet_shards(tmp_path):
    cache = ScoreCache(tmp_path / "s")
    cache.put_many(["a", "b"], [1.5, -2.25])
    cache.put_many(["c", "a"], [3.0, 9.0])  # a key put twice: the first value stays
    pq.write_table(pa.table({"key": ["old"], "score": pa.array([0.5], pa.float32())}),
                   tmp_path / "s" / "part-00000000000000000000-1-000000.parquet")  # an older prod-st's shard
    reopened = ScoreCache(tmp_path / "s")
    assert reopened.get_many(["c", "old", "zz", "a", "b"]) == {"c": 3.0, "old": 0.5, "a": 1.5, "b": -2.25}
    assert len(reopened) == 4 and "old" in reopened and "zz" not in reopened


def test_stage_start_cache_is_pruned_and_nothing_else(models, tmp_path):
    teacher, student = models
    runner = bare_runner(teacher)
    (tmp_path / "stage").mkdir()
    labelled_dataset(tmp_path / "stage" / "train_data", small_rows(),
                     runner.labels("bi", small_rows(), "list", student, Spec(1.0)))
    stage_start = runner.stage_start_cache
    assert stage_start is not None and stage_start != teacher.cache_folder
    assert list((stage_start / "embeddings").glob("part-*.arrow"))
    other = tmp_path / "teachers" / "someone-else"
    (other / "embeddings").mkdir(parents=True)
    (other / "embeddings" / "part-1.arrow").write_bytes(b"another cache's shard")
    teacher_shards = sorted((teacher.cache_folder / "embeddings").iterdir())

    runner.release_stage_start(None, student)
    assert not stage_start.exists()  # every shard of the stage-start student's cache, and its folder
    assert sorted((teacher.cache_folder / "embeddings").iterdir()) == teacher_shards  # the teacher's kept
    assert (other / "embeddings" / "part-1.arrow").exists()
    runner.release_stage_start(None, student)  # nothing left to prune: a no-op

    # a file prod-st did not write keeps its folder; a stage-start student with the teacher's weights
    # (the same cache folder) prunes nothing
    list(runner.labels("bi", small_rows(), "list", student, Spec(1.0)))  # the same cache, written again
    (stage_start / "embeddings" / "notes.txt").write_text("mine")
    runner.release_stage_start(None, student)
    assert [p.name for p in (stage_start / "embeddings").iterdir()] == ["notes.txt"]
    runner.stage_start_cache = teacher.cache_folder
    runner.release_stage_start(None, student)
    assert sorted((teacher.cache_folder / "embeddings").iterdir()) == teacher_shards


def test_cost_lines_before_a_long_step(caplog):
    caplog.set_level(logging.INFO, logger="prod_st.run")
    cost.announce("ce: teacher scores (ce)", 1_500_000, "pairs", cost.label_bytes(8192, 2 * 31))
    assert "ce: teacher scores (ce): 1,500,000 pairs, est. memory 1.9 MB" in caplog.text
    assert cost.index_bytes(8_841_823, 768) / 2**30 == pytest.approx(25.3, abs=0.1)
    assert list(cost.timed("scoring", iter([1, 2, 3]), total=30, batch=10)) == [1, 2, 3]
    assert "scoring: first 10 of 30 in 0s, est. 0s in all" in caplog.text
    assert cost.human_seconds(7200) == "2.0 h" and cost.human_bytes(3 * 2**30) == "3.0 GB"
