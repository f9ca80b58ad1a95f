"""Data progressive distillation (DPD): pick the training queries the student nearly gets right.

The PROD paper (arXiv:2209.13335), "Data Progressive Distillation": the strongest teacher reranks the student's top
results of every training query; queries where the student is a near miss and the teacher is right
are kept, with the student's hardest negatives, for a further round of distillation.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from prod_st.retrieval.mining import NegativeWindow
from prod_st.training.resampling import epoch_rows
from prod_st.training.stage_data import TrainingRows, build_rows
from prod_st.util import cost

__all__ = ["DPDSelection", "decided_by_student", "drop_reason", "first_relevant_rank", "keep_query",
           "queries_for_teacher", "select_queries", "select_with_teacher", "student_drop_reason", "teacher_rankings",
           "training_rows"]

Variant = Literal["msmarco", "nq"]
logger = logging.getLogger("prod_st.run")
RERANK_CHUNK = 4096  # training queries the teacher reranks at a time: memory holds one chunk's texts and scores
DROP_REASONS = ("student_top1", "student_too_far", "student_missed", "teacher_wrong", "no_qrels")


def first_relevant_rank(ranked_doc_ids: Iterable[str], relevant_ids: Container[str]) -> int | None:
    """1-based rank of the first relevant document in ``ranked_doc_ids``, or None if none is retrieved."""
    for rank, doc_id in enumerate(ranked_doc_ids, start=1):
        if doc_id in relevant_ids:
            return rank
    return None


def teacher_rankings(
    ranked: Mapping[str, Sequence[str]], scores: Sequence[Sequence[float]]
) -> dict[str, list[str]]:
    """The teacher's reranking of each query's candidates: `ranked`'s doc ids (in its query order) sorted by the
    teacher's scores, highest first (a teacher score is a relevance: higher = more relevant); ties keep the
    student's order."""
    return {
        qid: [doc for _, doc in sorted(zip(row, docs), key=lambda pair: -pair[0])]
        for (qid, docs), row in zip(ranked.items(), scores)
    }


def drop_reason(
    student_rank: int | None,
    teacher_rank: int | None,
    *,
    student_min: int = 2,
    student_max: int = 15,
    teacher_max: int = 1,
    variant: Variant = "msmarco",
) -> str | None:
    """Why :func:`keep_query` drops a query (one of ``DROP_REASONS`` but ``no_qrels``), or None if kept.

    Checks run in this order: student_missed, student_top1, student_too_far (msmarco only), teacher_wrong.
    """
    reason = student_drop_reason(student_rank, student_min=student_min, student_max=student_max, variant=variant)
    if reason is not None:
        return reason
    if variant == "msmarco":
        return "teacher_wrong" if teacher_rank is None or teacher_rank > teacher_max else None
    if teacher_rank is None or teacher_rank >= student_rank or teacher_rank > student_max:
        return "teacher_wrong"
    return None


def student_drop_reason(
    student_rank: int | None, *, student_min: int = 2, student_max: int = 15, variant: Variant = "msmarco"
) -> str | None:
    """The checks of :func:`drop_reason` that read the student's rank alone (student_missed, student_top1,
    student_too_far): a query they drop is dropped whatever the teacher does."""
    if variant not in ("msmarco", "nq"):
        raise ValueError(f"variant must be 'msmarco' or 'nq', got {variant!r}.")
    if student_rank is None:
        return "student_missed"
    if student_rank < student_min:
        return "student_top1"
    if variant == "msmarco" and student_rank > student_max:
        return "student_too_far"
    return None


def keep_query(
    student_rank: int | None,
    teacher_rank: int | None,
    *,
    student_min: int = 2,
    student_max: int = 15,
    teacher_max: int = 1,
    variant: Variant = "msmarco",
) -> bool:
    """PROD's DPD rule (the paper's "Data Progressive Distillation"), on 1-based ranks of the first relevant
    document (None = not retrieved).

    - ``"msmarco"``: keep when ``student_min <= student_rank <= student_max`` (a near miss, 2..15 by
      default) and the teacher ranks a relevant document within ``teacher_max`` (first, by default).
    - ``"nq"``: keep when ``student_rank >= student_min`` and the teacher does better than the student
      within the window: ``teacher_rank < student_rank`` and ``teacher_rank <= student_max``
      (``teacher_max`` is unused).
    """
    return (
        drop_reason(
            student_rank,
            teacher_rank,
            student_min=student_min,
            student_max=student_max,
            teacher_max=teacher_max,
            variant=variant,
        )
        is None
    )


@dataclass
class DPDSelection:
    """Result of :func:`select_queries`.

    Attributes:
        kept: kept query id -> its hardest negatives (non-relevant, in the student's rank order).
        counts: ``kept`` plus one count per drop reason; every query is counted exactly once.
    """

    kept: dict[str, list[str]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("kept", *DROP_REASONS), 0))

    def update(self, other: DPDSelection) -> None:
        """Add `other`'s queries (another set of queries, e.g. the next chunk) to this selection."""
        self.kept.update(other.kept)
        for reason, count in other.counts.items():
            self.counts[reason] += count


def queries_for_teacher(
    student_runs: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Mapping[str, int]],
    *,
    student_min: int = 2,
    student_max: int = 15,
    variant: Variant = "msmarco",
    teacher_max: int = 1,
) -> list[str]:
    """The queries of ``student_runs`` whose fate depends on the teacher: judged, and not dropped by the
    student's rank alone (:func:`student_drop_reason`). Only these need the teacher's rerank; for every other
    query :func:`select_queries` gives the same answer without one. (``teacher_max`` is the rule's, taken so
    the whole rule can be passed; it does not decide who is asked.)"""
    return decided_by_student(student_runs, qrels, student_min=student_min, student_max=student_max,
                              variant=variant)[0]


def decided_by_student(
    student_runs: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Mapping[str, int]],
    *,
    student_min: int = 2,
    student_max: int = 15,
    variant: Variant = "msmarco",
    teacher_max: int = 1,
) -> tuple[list[str], DPDSelection]:
    """(:func:`queries_for_teacher`, the selection of every other query): the second counts the queries the
    student's rank alone decides (``no_qrels`` and the student's drop reasons; it keeps none), as
    :func:`select_queries` would. One pass: the first relevant ranks come from the run's arrays when it has
    them (a `prod_st.retrieval.mining.RankedRun`: no list of ids per query, so 500k training queries take seconds),
    and the rule is applied once per distinct rank, not once per query."""
    judged = np.fromiter((any(g > 0 for g in qrels.get(q, {}).values()) for q in student_runs), dtype=bool,
                         count=len(student_runs))
    ranks = _first_relevant_ranks(student_runs, qrels)
    outcomes = ("", "no_qrels", *DROP_REASONS[:3])  # "": the teacher decides
    by_rank = np.array([outcomes.index(student_drop_reason(rank or None, student_min=student_min,
                                                           student_max=student_max, variant=variant) or "")
                        for rank in range(int(ranks.max(initial=0)) + 1)], dtype=np.int8)  # rank 0: none
    codes = np.where(judged, by_rank[ranks], outcomes.index("no_qrels"))
    selection = DPDSelection()
    for code, count in zip(*np.unique(codes, return_counts=True)):
        if code:
            selection.counts[outcomes[code]] += int(count)
    asked = np.flatnonzero(codes == 0)
    qids = list(student_runs)
    return [qids[i] for i in asked], selection


def _first_relevant_ranks(student_runs: Mapping[str, Sequence[str]],
                          qrels: Mapping[str, Mapping[str, int]]) -> np.ndarray:
    """Per query of ``student_runs``, in order: :func:`first_relevant_rank`, 0 for None."""
    if hasattr(student_runs, "first_relevant_ranks"):  # a RankedRun: from its arrays
        return student_runs.first_relevant_ranks(qrels)
    return np.fromiter((first_relevant_rank(run, {d for d, g in qrels.get(q, {}).items() if g > 0}) or 0
                        for q, run in student_runs.items()), dtype=np.int32, count=len(student_runs))


def select_queries(
    student_runs: Mapping[str, Sequence[str]],
    teacher_runs: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Mapping[str, int]],
    *,
    num_negatives: int = 15,
    student_min: int = 2,
    student_max: int = 15,
    teacher_max: int = 1,
    variant: Variant = "msmarco",
) -> DPDSelection:
    """Apply :func:`keep_query` to every query of ``student_runs``.

    Args:
        student_runs: query id -> the student's retrieved doc ids, best first.
        teacher_runs: query id -> the teacher's reranking of the student's list, best first
            (a query without one counts as ``teacher_wrong``; only the queries of
            :func:`queries_for_teacher` need one).
        qrels: query id -> {doc id: relevance}; relevance > 0 is relevant.
        num_negatives: at most this many negatives per kept query.
        student_min, student_max, teacher_max, variant: see :func:`keep_query`.

    A query with no relevant document in ``qrels`` counts as ``no_qrels``; the others count under
    the first failing check of :func:`drop_reason`, or as ``kept``.
    """
    if num_negatives < 0:
        raise ValueError(f"num_negatives must be >= 0, got {num_negatives}.")
    selection = DPDSelection()
    for qid, student_run in student_runs.items():
        relevant = {doc_id for doc_id, rel in qrels.get(qid, {}).items() if rel > 0}
        if not relevant:
            selection.counts["no_qrels"] += 1
            continue
        reason = drop_reason(
            first_relevant_rank(student_run, relevant),
            first_relevant_rank(teacher_runs.get(qid, ()), relevant),
            student_min=student_min,
            student_max=student_max,
            teacher_max=teacher_max,
            variant=variant,
        )
        if reason is not None:
            selection.counts[reason] += 1
            continue
        negatives = [doc_id for doc_id in dict.fromkeys(student_run) if doc_id not in relevant]
        selection.kept[qid] = negatives[:num_negatives]
        selection.counts["kept"] += 1
    return selection


def select_with_teacher(ranked, qrels, teacher, data, spec, name: str, seconds: dict) -> DPDSelection:
    """DPD's selection over the student's `ranked` training run: the queries the student's rank alone decides,
    then the teacher (`teacher.score(queries, texts)`) reranks the rest, RERANK_CHUNK queries at a time, and
    `select_queries` decides them. `spec`: the recipe's `dpd:` block. A kept query keeps its near-miss pool (the
    student's top `rerank_depth` minus positives) with `negatives: sample`, its first `num_negatives` with
    `hardest`."""
    rule = spec.rule.model_dump()
    asked, selection = decided_by_student(ranked, qrels, **rule)
    cost.announce(f"{name}: teacher rerank of the {len(asked)} of {len(ranked)} queries the rule asks it about",
                  int((ranked.rows[ranked.positions(asked)] >= 0).sum()), "pairs",
                  cost.run_bytes(min(len(asked), RERANK_CHUNK), spec.rerank_depth) * 2)
    pool = spec.rerank_depth if spec.negatives == "sample" else spec.num_negatives
    queries = data.train.split_queries()
    with cost.step(f"{name}: teacher reranks them", seconds, "score"):
        for first in range(0, len(asked), RERANK_CHUNK):  # memory holds one chunk's ranked lists
            chunk = {q: ranked[q] for q in asked[first:first + RERANK_CHUNK]}
            scores = teacher.score([queries[q] for q in chunk], data.doc_texts_per_query(chunk.values()))
            selection.update(select_queries(chunk, teacher_rankings(chunk, scores), qrels, num_negatives=pool, **rule))
    return selection


def training_rows(data, pools: dict[str, list[str]], qrels, spec, *, seed: int, accumulation: int,
                  name: str) -> tuple[TrainingRows, int | None]:
    """DPD's training rows from the kept queries' near-miss `pools`, and the block size training reads them in.
    `negatives: sample` (PROD's release): `num_negatives` drawn afresh from the pool for every epoch training
    will read, as the stages do (`epoch_rows`); `hardest`: the pool's first `num_negatives`, one block read
    repeatedly (block size None: the whole dataset, as before issue 20)."""
    if spec.negatives == "hardest":
        return build_rows(data, pools, spec.num_negatives, qrels=qrels), None
    window = NegativeWindow(1, spec.rerank_depth, spec.num_negatives, "sample")
    rows, plan = epoch_rows(data, pools, qrels, window, seed=seed, epochs=spec.epochs, batch_size=spec.batch_size,
                            accumulation=accumulation, max_steps=spec.max_steps, drop_incomplete=False,
                            what=f"dpd {name!r}")
    reads = len(rows.queries) // plan.rows if plan is not None else 1
    logger.info("%s: %d queries, negatives drawn afresh from their near-miss pools for each of %d epochs",
                name, len(rows.queries) // reads, reads)
    return rows, len(rows.queries) // reads
