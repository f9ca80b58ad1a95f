"""The student-teacher gap, the teacher-strength warnings and the similarity-to-logit scale, against hand values."""

from __future__ import annotations

import math

import pytest

from prod_st.teachers.strength import gap, strength_warnings
from prod_st.training.losses import score_scale


def test_gap_is_the_temperature_kl_and_rank_agreement():
    student = {"q1": {"d1": 0.3, "d2": 0.1, "d3": 0.0}, "q2": {"d4": 0.1, "d5": 0.2}}
    teacher = {"q1": {"d1": 2.0, "d2": 1.0, "d3": 0.0}, "q2": {"d4": 1.0, "d5": 0.0}}
    got = gap(student, teacher, student_scale=10.0, temperature=2.0)

    def kl(t, s, temperature=2.0):
        p = [math.exp(x / temperature) for x in t]
        q = [math.exp(x / temperature) for x in s]
        p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
        return temperature**2 * sum(a * math.log(a / b) for a, b in zip(p, q))

    want_kl = (kl([2.0, 1.0, 0.0], [3.0, 1.0, 0.0]) + kl([1.0, 0.0], [1.0, 2.0])) / 2
    assert got["kl"] == pytest.approx(want_kl, rel=1e-9)
    assert got["kendall_tau"] == pytest.approx((1.0 + -1.0) / 2)  # same order on q1, reversed on q2
    assert got["top1_agreement"] == pytest.approx(0.5)


def test_gap_of_identical_rankers_is_zero():
    run = {"q1": {"d1": 2.0, "d2": 1.0}}
    assert gap(run, run, student_scale=1.0) == {"kl": 0.0, "kendall_tau": 1.0, "top1_agreement": 1.0}


def test_strength_warnings():
    ok = strength_warnings("ce", "nDCG@10", teacher=0.6, measured_as="reranker", student=0.5, reranking=0.6,
                           previous=("bi", 0.55))
    assert ok == []
    weak = strength_warnings("ce", "nDCG@10", teacher=0.5, measured_as="reranker", student=0.5, reranking=0.5)
    assert len(weak) == 1 and "not stronger than the student" in weak[0]  # equal is not stronger
    chain = strength_warnings("ce", "nDCG@10", teacher=0.6, measured_as="reranker", student=0.5, reranking=0.58,
                              previous=("bi", 0.59))
    assert len(chain) == 1 and "weaker than the previous stage's teacher 'bi'" in chain[0]


@pytest.mark.parametrize("similarity, scale", [("cosine", 20.0), ("dot", 1.0)])
def test_score_scale(tiny_model_dir, similarity, scale):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(tiny_model_dir)
    model.similarity_fn_name = similarity
    assert score_scale(model) == scale
