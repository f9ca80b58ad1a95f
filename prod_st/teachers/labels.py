"""A distillation stage's label column: what the teacher says about each training row, computed and handed on
LABEL_ROWS rows at a time (so no label list of the whole stage is ever in memory).

In-batch candidates: the teacher's embeddings of [query, positive, negatives] (the loss scores every pair of
the batch). List candidates: the teacher's scores over [positive, negatives], -inf for fillers, and with PROD's
regularisation also the stage-start student's scores, computed once from its cached embeddings instead of a
frozen forward pass at every step: its document vectors are read by corpus row from the corpus encoding its
checkpoint already has (dev evaluation and this stage's mining built it), so no document is encoded again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from prod_st.teachers.base import scores_to_labels
from prod_st.teachers.bi_encoder import BiEncoderTeacher
from prod_st.training.losses import score_scale
from prod_st.training.stage_data import TrainingRows
from prod_st.util import cost
from prod_st.util.errors import ProdStError

LABEL_ROWS = 8192  # training rows labelled per batch: the most label values in memory at once


def stage_labels(
    teacher, scale: float, rows: TrainingRows, candidates: str, student: SentenceTransformer, reg_weight: float,
    *, name: str, student_documents: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[Iterator[np.ndarray], Path | None]:
    """The loss's label column, in logit scale (`scale` times the teacher's scores), as float32 arrays of
    LABEL_ROWS rows at a time, and the cache folder of the stage-start student's embeddings when the labels
    use them (list mode with `reg_weight` > 0; no later step reads it: the runner prunes it when the stage
    ends), else None. `name`: the teacher's name in the cost lines. `student_documents` (corpus rows -> the
    stage-start student's document vectors, e.g. `prod_st.retrieval.corpus_index.rows_of` over its cached corpus
    encoding) replaces encoding the rows' documents again (`rows` must then hold corpus rows)."""
    n, width = len(rows), 1 + rows.count
    if candidates == "in_batch":
        if not isinstance(teacher, BiEncoderTeacher):
            raise ProdStError(f"in-batch candidates need a bi-encoder teacher, {name!r} is not one")
        cost.announce(f"teacher embeddings ({name})", n * (1 + width), "texts",
                      cost.label_bytes(min(n, LABEL_ROWS), (1 + width) * teacher.dimension))

        def in_batch() -> Iterator[np.ndarray]:
            for start in range(0, n, LABEL_ROWS):
                embeddings = teacher.embeddings_for_rows(rows.queries[start : start + LABEL_ROWS],
                                                         rows.candidates(start, start + LABEL_ROWS))
                embeddings[:, 0] *= scale  # (scale * q) . p = scale * similarity
                yield embeddings.numpy()

        return cost.timed(f"teacher embeddings ({name})", in_batch(), n, LABEL_ROWS), None
    frozen = stage_start = None
    if reg_weight > 0:
        # the student before this stage trains: its embeddings are cached under its weights' fingerprint
        frozen = BiEncoderTeacher(student, name="stage-start student")
        stage_start = frozen.cache_folder
    pairs = n + int((rows.negative_rows >= 0).sum())  # fillers are never scored
    sets = 1 + (frozen is not None)
    cost.announce(f"teacher scores ({name})", pairs * sets, "pairs", cost.label_bytes(min(n, LABEL_ROWS), sets * width))

    def scaled(scores: list[list[float]], factor: float) -> torch.Tensor:
        return scores_to_labels([[factor * x for x in row] for row in scores], width)

    def scored() -> Iterator[np.ndarray]:
        for start in range(0, n, LABEL_ROWS):
            stop = start + LABEL_ROWS
            queries, lists = rows.queries[start:stop], rows.real_candidates(start, stop)
            labels = scaled(teacher.score(queries, lists), scale)
            if frozen is not None:
                own = (frozen.score(queries, lists) if student_documents is None
                       else _scores_by_row(frozen, student_documents, rows, start, stop))
                labels = torch.stack([labels, scaled(own, score_scale(student))], dim=1)
            yield labels.numpy()

    return cost.timed(f"teacher scores ({name})", scored(), n, LABEL_ROWS), stage_start


def _scores_by_row(
    frozen: BiEncoderTeacher, documents: Callable[[np.ndarray], np.ndarray], rows: TrainingRows, start: int, stop: int
) -> list[list[float]]:
    """The stage-start student's similarities of rows `start:stop` to their real candidates (fillers, which
    come last, left out): queries embedded (cached by text), the candidates' vectors read by corpus row."""
    candidates = np.concatenate([rows.positive_rows[start:stop, None], rows.negative_rows[start:stop]], axis=1)
    real = candidates >= 0
    queries = frozen.embed(rows.queries[start:stop], "query")
    scores = np.zeros(candidates.shape, np.float32)
    for j in range(candidates.shape[1]):  # a column at a time: (rows, dim) vectors, never (rows, width, dim)
        scores[real[:, j], j] = np.einsum("bd,bd->b", queries[real[:, j]], documents(candidates[real[:, j], j]))
    return [row[:count].tolist() for row, count in zip(scores, real.sum(axis=1).tolist())]
