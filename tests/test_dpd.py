"""DPD query selection (the PROD paper, "Data Progressive Distillation")."""

from __future__ import annotations

import pytest

from prod_st.training.dpd import (
    DPDSelection,
    drop_reason,
    first_relevant_rank,
    keep_query,
    queries_for_teacher,
    select_queries,
    teacher_rankings,
)


@pytest.mark.parametrize(
    ("student_rank", "teacher_rank", "keep", "reason"),
    [
        (1, 1, False, "student_top1"),
        (2, 1, True, None),
        (15, 1, True, None),
        (16, 1, False, "student_too_far"),
        (None, 1, False, "student_missed"),
        (2, 2, False, "teacher_wrong"),
        (15, 2, False, "teacher_wrong"),
        (5, None, False, "teacher_wrong"),
        (1, None, False, "student_top1"),
        (16, None, False, "student_too_far"),
        (None, None, False, "student_missed"),
    ],
)
def test_msmarco_rule(student_rank, teacher_rank, keep, reason):
    assert keep_query(student_rank, teacher_rank) is keep
    assert drop_reason(student_rank, teacher_rank) == reason


@pytest.mark.parametrize(
    ("student_rank", "teacher_rank", "kwargs", "keep"),
    [
        (3, 1, {"student_min": 4}, False),
        (20, 1, {"student_max": 20}, True),
        (21, 1, {"student_max": 20}, False),
        (5, 3, {"teacher_max": 3}, True),
        (5, 4, {"teacher_max": 3}, False),
    ],
)
def test_msmarco_rule_bounds_are_configurable(student_rank, teacher_rank, kwargs, keep):
    assert keep_query(student_rank, teacher_rank, **kwargs) is keep


@pytest.mark.parametrize(
    ("student_rank", "teacher_rank", "keep", "reason"),
    [
        (1, 1, False, "student_top1"),
        (2, 1, True, None),
        (15, 2, True, None),  # teacher better, not necessarily first
        (15, 14, True, None),
        (15, 15, False, "teacher_wrong"),  # not better than the student
        (5, 7, False, "teacher_wrong"),
        (30, 15, True, None),  # student beyond the window, teacher inside it
        (30, 16, False, "teacher_wrong"),  # teacher better but outside the window
        (8, None, False, "teacher_wrong"),
        (None, 1, False, "student_missed"),
        (None, None, False, "student_missed"),
    ],
)
def test_nq_rule(student_rank, teacher_rank, keep, reason):
    assert keep_query(student_rank, teacher_rank, variant="nq") is keep
    assert drop_reason(student_rank, teacher_rank, variant="nq") == reason


def test_unknown_variant_is_an_error():
    with pytest.raises(ValueError, match="'msmarco' or 'nq'"):
        keep_query(2, 1, variant="trec")


@pytest.mark.parametrize(
    ("ranked", "relevant", "rank"),
    [
        (["a", "b", "c"], {"a"}, 1),
        (["a", "b", "c"], {"c", "b"}, 2),
        (["a", "b", "c"], {"z"}, None),
        ([], {"a"}, None),
    ],
)
def test_first_relevant_rank(ranked, relevant, rank):
    assert first_relevant_rank(ranked, relevant) == rank


def test_select_queries_counts_and_negatives():
    student_runs = {
        "kept": ["n1", "n2", "pos", "n3", "n1", "n4"],  # student rank 3; duplicate n1 kept once
        "top1": ["pos", "n1"],
        "far": [f"n{i}" for i in range(20)] + ["pos"],  # rank 21
        "missed": ["n1", "n2"],
        "teacher_wrong": ["n1", "pos", "n2"],
        "no_qrels": ["n1", "pos"],
        "only_zero_rel": ["n1", "pos"],
        "no_teacher_run": ["n1", "pos"],
    }
    teacher_runs = {
        "kept": ["pos", "n1", "n2", "n3", "n4"],
        "top1": ["pos", "n1"],
        "far": ["pos"],
        "missed": ["n1", "n2"],
        "teacher_wrong": ["n1", "pos", "n2"],
        "no_qrels": ["pos"],
        "only_zero_rel": ["pos"],
    }
    qrels = {qid: {"pos": 1} for qid in student_runs if qid not in ("no_qrels", "only_zero_rel")}
    qrels["kept"] = {"pos": 1, "n2": 0}  # rel 0 is not relevant: n2 stays a negative
    qrels["only_zero_rel"] = {"pos": 0}

    selection = select_queries(student_runs, teacher_runs, qrels, num_negatives=3)
    assert isinstance(selection, DPDSelection)
    assert selection.kept == {"kept": ["n1", "n2", "n3"]}
    assert selection.counts == {
        "kept": 1,
        "student_top1": 1,
        "student_too_far": 1,
        "student_missed": 1,
        "teacher_wrong": 2,
        "no_qrels": 2,
    }
    assert sum(selection.counts.values()) == len(student_runs)


def test_select_queries_excludes_every_relevant_doc_from_negatives():
    selection = select_queries(
        {"q": ["n1", "p2", "p1", "n2"]}, {"q": ["p1", "p2", "n1", "n2"]}, {"q": {"p1": 2, "p2": 1}}
    )
    assert selection.kept == {"q": ["n1", "n2"]}


def test_select_queries_nq_variant():
    student_runs = {"a": ["n1", "n2", "n3", "pos"], "b": ["n1", "n2", "pos"], "c": ["pos", "n1"]}
    teacher_runs = {"a": ["n1", "pos", "n2", "n3"], "b": ["n1", "n2", "pos"], "c": ["pos", "n1"]}
    qrels = {qid: {"pos": 1} for qid in student_runs}
    selection = select_queries(student_runs, teacher_runs, qrels, variant="nq", num_negatives=15)
    assert selection.kept == {"a": ["n1", "n2", "n3"]}
    assert selection.counts["kept"] == 1
    assert selection.counts["teacher_wrong"] == 1  # b: teacher no better than the student
    assert selection.counts["student_top1"] == 1
    assert selection.counts["student_too_far"] == 0


@pytest.mark.parametrize("variant", ["msmarco", "nq"])
def test_the_teacher_is_asked_only_where_it_decides_and_the_selection_is_the_same(variant):
    """DPD's teacher reranks only `queries_for_teacher`, in chunks: the selection (kept queries, their negatives,
    every count) equals the one where the teacher reranked every query, and far fewer queries are asked."""
    import random

    rng = random.Random(7)
    docs = [f"d{i}" for i in range(60)]
    student_runs, teacher_runs, qrels = {}, {}, {}
    for i in range(400):
        qid = f"q{i}"
        student_runs[qid] = rng.sample(docs, 30)
        teacher_runs[qid] = rng.sample(student_runs[qid], 30)
        if i % 9:  # some queries unjudged
            qrels[qid] = {d: rng.choice([0, 1, 2]) for d in rng.sample(docs, rng.randint(1, 3))}
    rule = {"student_min": 2, "student_max": 6, "teacher_max": 2, "variant": variant}
    full = select_queries(student_runs, teacher_runs, qrels, num_negatives=5, **rule)

    asked = queries_for_teacher(student_runs, qrels, **rule)
    assert full.counts["kept"] + full.counts["teacher_wrong"] == len(asked) <= len(student_runs) // 2
    chunked = select_queries({q: r for q, r in student_runs.items() if q not in asked}, {}, qrels,
                             num_negatives=5, **rule)
    for first in range(0, len(asked), 37):
        chunk = {q: student_runs[q] for q in asked[first:first + 37]}
        chunked.update(select_queries(chunk, {q: teacher_runs[q] for q in chunk}, qrels, num_negatives=5, **rule))
    assert chunked.kept == full.kept and list(chunked.kept) == list(full.kept) and chunked.counts == full.counts


def test_select_queries_rejects_negative_num_negatives():
    with pytest.raises(ValueError, match="num_negatives"):
        select_queries({}, {}, {}, num_negatives=-1)


def test_teacher_rankings_put_the_highest_score_first():
    """The teacher's scores are relevances: its ranking is by descending score (ties keep the student's order),
    so a teacher that scores the positive highest ranks it first and the query can be kept."""
    ranked = {"q1": ["d1", "d2", "d3"], "q2": ["d4", "d5"]}
    got = teacher_rankings(ranked, [[0.1, 2.5, -1.0], [3.0, 3.0]])
    assert got == {"q1": ["d2", "d1", "d3"], "q2": ["d4", "d5"]}
    selection = select_queries(ranked, got, {"q1": {"d2": 1}, "q2": {"d5": 1}}, num_negatives=2)
    assert selection.kept == {"q1": ["d1", "d3"]}  # student rank 2, teacher rank 1: a near miss kept


def _random_run(seed: int, queries: int = 300, docs: int = 50, depth: int = 20):
    """A RankedRun over a corpus of `docs` documents (some rows padded with -1, as when fewer were found), the
    same run as a dict of id lists, and qrels with grades 0-2, unjudged queries and ids outside the corpus."""
    import datasets
    import numpy as np

    from prod_st.data.doc_ids import DocIds
    from prod_st.retrieval.mining import RankedRun

    rng = np.random.default_rng(seed)
    corpus = datasets.Dataset.from_dict({"_id": [f"d{i}" for i in range(docs)], "title": [""] * docs,
                                         "text": ["x"] * docs})
    rows = np.stack([rng.permutation(docs)[:depth] for _ in range(queries)]).astype(np.int32)
    rows[rng.random(queries) < 0.2, depth // 2:] = -1
    qids = [f"q{i}" for i in range(queries)]
    qrels = {q: {f"d{d}": int(rng.integers(0, 3)) for d in rng.choice(docs + 5, rng.integers(1, 4), replace=False)}
             for i, q in enumerate(qids) if i % 7}
    run = RankedRun(qids, rows, DocIds(corpus))
    return run, {q: run[q] for q in qids}, qrels


@pytest.mark.parametrize("variant", ["msmarco", "nq"])
def test_decided_by_student_from_the_run_arrays_matches_the_per_query_rule(variant):
    """Issue 18 item 6: DPD's ranks come from the RankedRun's arrays (no list of ids per query); the asked
    queries and the counts of the others are those of the per-query rule on the same run as id lists."""
    from prod_st.training.dpd import decided_by_student

    run, lists, qrels = _random_run(3)
    rule = {"student_min": 2, "student_max": 6, "teacher_max": 1, "variant": variant}
    asked, selection = decided_by_student(run, qrels, **rule)
    assert asked == queries_for_teacher(lists, qrels, **rule) and len(asked) > 20
    expected = select_queries({q: r for q, r in lists.items() if q not in set(asked)}, {}, qrels, **rule)
    assert selection.counts == expected.counts and not selection.kept
    assert sum(selection.counts.values()) + len(asked) == len(run)
    assert decided_by_student(lists, qrels, **rule) == (asked, selection)  # the dict path: the same
    ranks = run.first_relevant_ranks(qrels)
    for q, rank in zip(run, ranks.tolist()):
        assert rank == (first_relevant_rank(lists[q], {d for d, g in qrels.get(q, {}).items() if g > 0}) or 0)


@pytest.mark.parametrize("negatives", ["sample", "hardest"])
def test_dpd_negatives_are_drawn_afresh_from_the_near_miss_pool_every_epoch(tmp_path, negatives):
    """Issue 20 item 4: PROD's release keeps each kept query's near-miss pool and draws its negatives afresh every
    time it is read. `negatives: sample` lays out one block per epoch training reads, each a new seeded draw of
    num_negatives from the pool; `hardest` (the behaviour before issue 20) is the pool's first num_negatives, one
    block read repeatedly."""
    import random

    from prod_st.recipe import DPD
    from prod_st.training.dpd import training_rows
    from prod_st.training.stage_data import load_run_data

    data = load_run_data("wordnet-gloss", sizes=(30, 5, 5), corpus_size=300, seed=3)
    judged = {d for j in data.train.qrels.values() for d in j}
    unjudged, rng = [d for d in data.corpus["_id"] if d not in judged], random.Random(0)
    pools = {q: rng.sample(unjudged, 14) for q in data.train.qrels}
    spec = DPD(teacher="ce", rerank_depth=15, num_negatives=4, epochs=100.0, max_steps=12, batch_size=8,
               negatives=negatives)
    rows, block = training_rows(data, pools, data.train.qrels, spec, seed=3 + 5, accumulation=1, name="05-dpd-1")
    texts = dict(zip(data.corpus["_id"], data.texts_at(range(len(data.corpus)))))
    first = {q: {texts[d] for d in pool[:4]} for q, pool in pools.items()}
    if negatives == "hardest":
        assert block is None and len(rows) == 30
        assert all(set(negs) == first[q] for q, negs in zip(rows.query_ids, rows.texts()[2]))
        return
    assert block == 30 and len(rows) == 3 * 30  # 4 batches of 8 an epoch: 12 steps read 3 epochs
    drawn = rows.texts()[2]
    for q, negs in zip(rows.query_ids, drawn):
        assert len(set(negs)) == 4 and set(negs) <= {texts[d] for d in pools[q]}
    assert sum(set(negs) != first[q] for q, negs in zip(rows.query_ids, drawn)) > 60  # not the hardest 4
    assert any(set(drawn[i]) != set(drawn[i + 30]) for i in range(30))  # every epoch draws afresh
