"""How strong a teacher is, and how far its student is from it, measured on dev the way PROD cares about:
the teacher reranks the student's top-k (so both rank the same candidates), and the gap is the KL between
their temperature softmaxes and their rank agreement over those candidates."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
from scipy.stats import kendalltau

from prod_st.data import RetrievalData
from prod_st.retrieval.evaluation import Run, evaluate_model, score_run
from prod_st.teachers.bi_encoder import BiEncoderTeacher
from prod_st.training.losses import score_scale
from prod_st.training.stage_data import RunData

logger = logging.getLogger("prod_st.run")


def top_candidates(run: Run, depth: int) -> dict[str, list[str]]:
    """Each query's top-`depth` doc ids in rank order."""
    return {q: sorted(docs, key=docs.get, reverse=True)[:depth] for q, docs in run.items()}


def rerank(teacher, run: Run, queries: dict[str, str], data: RunData, depth: int, *, scale: float = 1.0) -> Run:
    """The teacher's scores (times `scale`) over each query's top-`depth` candidates of `run`."""
    candidates = top_candidates(run, depth)
    qids = [q for q in candidates if candidates[q]]
    texts = [data.doc_texts(candidates[q]) for q in qids]
    scores = teacher.score([queries[q] for q in qids], texts)
    return {q: {d: scale * s for d, s in zip(candidates[q], row)} for q, row in zip(qids, scores)}


def rerank_metrics(teacher_run: Run, data, relevance_level: int = 1) -> dict[str, float]:
    """The metrics of the teacher's reranking over the split's queries (qrels and/or answers); a query it had
    nothing to rerank for counts as a miss."""
    return score_run(teacher_run, data, list(data.qrels or data.answers or teacher_run), relevance_level)


def teacher_metrics(
    teacher, split: RetrievalData, data: RunData, student_run: Run | None, *, depth: int, relevance_level: int,
    **search,
) -> tuple[str, dict[str, float]]:
    """How strong a teacher is on `split`, and as what: a bi-encoder as a retriever over the corpus (`search`:
    `evaluate_model`'s settings), a cross-encoder as a reranker of the student's top-`depth` (`student_run`)."""
    if isinstance(teacher, BiEncoderTeacher):
        return "retriever", evaluate_model(teacher.model, split, relevance_level=relevance_level, **search).metrics
    run = rerank(teacher, student_run, split.split_queries(), data, depth)
    return reranker_as(depth), rerank_metrics(run, split, relevance_level)


def reranker_as(depth: int) -> str:
    """What a reranking teacher's metrics were measured as."""
    return f"reranker of the student's top {depth}"


def teacher_gap(
    teacher, student_run: Run, split: RetrievalData, data: RunData, *, depth: int, teacher_scale: float,
    student_scale: float, temperature: float, relevance_level: int,
) -> tuple[dict[str, float], dict[str, float]]:
    """The teacher reranks the student's top-`depth` of `split`: the `gap` between the two over those
    candidates, and the teacher's metrics as that reranker."""
    teacher_run = rerank(teacher, student_run, split.split_queries(), data, depth, scale=teacher_scale)
    measured = gap(student_run, teacher_run, student_scale=student_scale, temperature=temperature)
    return measured, rerank_metrics(teacher_run, split, relevance_level)


def gap(student_run: Run, teacher_run: Run, *, student_scale: float, temperature: float = 4.0) -> dict[str, float]:
    """Mean over queries of T^2 * KL(softmax(t/T) || softmax(s/T)) on the teacher-reranked candidates, the
    Kendall tau between the two orderings, and how often both put the same document first."""
    kls, taus, top1 = [], [], []
    for qid, t_scores in teacher_run.items():
        docs = list(t_scores)
        if len(docs) < 2:
            continue
        t = np.array([t_scores[d] for d in docs], dtype=np.float64) / temperature
        s = np.array([student_run[qid][d] * student_scale for d in docs], dtype=np.float64) / temperature
        log_p, log_q = t - np.logaddexp.reduce(t), s - np.logaddexp.reduce(s)
        kls.append(temperature**2 * float(np.sum(np.exp(log_p) * (log_p - log_q))))
        tau = kendalltau(t, s).statistic
        taus.append(0.0 if math.isnan(tau) else float(tau))
        top1.append(float(np.argmax(t) == np.argmax(s)))
    if not kls:
        return {"kl": float("nan"), "kendall_tau": float("nan"), "top1_agreement": float("nan")}
    return {"kl": float(np.mean(kls)), "kendall_tau": float(np.mean(taus)), "top1_agreement": float(np.mean(top1))}


def strength_warnings(
    name: str,
    metric: str,
    *,
    teacher: float,
    measured_as: str,
    student: float,
    reranking: float,
    previous: tuple[str, float] | None = None,
) -> list[str]:
    """PROD's two checks before a teacher teaches, as warning lines (none when both hold): the teacher
    (`teacher`, its dev `metric` measured as `measured_as`) beats the student it teaches (`student`); and,
    reranking the same student top-k, it is at least as strong as the previous stage's teacher (`previous` =
    (name, its reranking score); None when there is none or it is the same teacher)."""
    warnings = []
    if teacher <= student:
        warnings.append(
            f"teacher {name!r} ({metric} {teacher:.4f} on dev, as {measured_as}) is not stronger than the student "
            f"it teaches ({student:.4f}): PROD needs a stronger teacher"
        )
    if previous is not None and reranking < previous[1]:
        warnings.append(
            f"teacher {name!r} ({metric} {reranking:.4f} reranking the student's dev top-k) is weaker than the "
            f"previous stage's teacher {previous[0]!r} ({previous[1]:.4f} on the same candidates): the chain "
            "should get stronger"
        )
    return warnings


def measure_gap(pool, name: str, student_run: Run, data: RunData, *, student, depth: int, temperature: float,
                relevance_level: int) -> tuple[dict[str, float], dict[str, float]]:
    """`teacher_gap` for the pool's teacher `name` (in its logit scale) over `student`'s dev run `student_run`."""
    return teacher_gap(pool.get(name), student_run, data.dev, data, depth=depth, teacher_scale=pool.scale(name),
                       student_scale=score_scale(student), temperature=temperature, relevance_level=relevance_level)


def check_teacher(pool, name: str, stage: str, *, student, student_run: Run, student_metric: float, earlier: str | None,
                  data: RunData, depth: int, metric: str, temperature: float, relevance_level: int,
                  retriever_metrics: Callable[[str], dict]) -> dict:
    """Before teacher `name` teaches `student` in `stage` (whose dev run is `student_run`, dev `metric` `student_metric`):
    the gap between them and the teacher's metrics reranking the student's dev top-`depth`; its strength (a
    bi-encoder as a retriever, `retriever_metrics(name)`, else as that reranker); and `strength_warnings`,
    comparing with the `earlier` stage's teacher like with like (both reranking this student's dev top-k).
    Returns the StageRecord fields it fills."""
    teacher = pool.get(name, student)
    gap_of = lambda teacher_name: measure_gap(pool, teacher_name, student_run, data, student=student, depth=depth,  # noqa: E731
                                              temperature=temperature, relevance_level=relevance_level)
    gap_before, reranking = gap_of(name)
    if isinstance(teacher, BiEncoderTeacher):
        strength, measured_as = retriever_metrics(name), "retriever"
    else:  # a reranker is measured on the candidates the gap was just measured on
        strength, measured_as = reranking, reranker_as(depth)
    logger.info("%s: teacher %r dev %s %.4f (as %s) vs student %.4f", stage, name, metric, strength[metric], measured_as,
                student_metric)
    previous = (earlier, gap_of(earlier)[1][metric]) if earlier and earlier != name else None
    warnings = strength_warnings(name, metric, teacher=strength[metric], measured_as=measured_as,
                                 student=student_metric, reranking=reranking[metric], previous=previous)
    return dict(gap_before=gap_before, teacher_rerank_dev=reranking, teacher_dev=strength,
                teacher_measured_as=measured_as, warnings=warnings)


def teachers_on_test(pool, names, test: RetrievalData, data: RunData, student_run: Run, *, depth: int,
                     **search) -> dict[str, dict]:
    """Each teacher of `names` on the test split, as `teacher_metrics` measures it (built, or loaded from the
    cache, when a resumed run skipped its stages)."""
    teachers = {}
    for name in dict.fromkeys(names):
        measured_as, metrics = teacher_metrics(pool.get(name), test, data, student_run, depth=depth, **search)
        teachers[name] = {"as": measured_as, **metrics}
    return teachers
