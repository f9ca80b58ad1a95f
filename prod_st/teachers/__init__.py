"""Teachers: one `score(queries, candidate_lists)` interface for bi-encoder and cross-encoder teachers, their
on-disk caches (embeddings, scores, trained models) and the training of PROD's own teachers.

Also here, imported from their modules (they pull in faiss mining and the run's data): `pool.TeacherPool`, a
run's teachers built or trained on first use; `labels`, a distillation stage's label column; and `strength`,
how strong a teacher is on dev and how far its student is from it."""

from __future__ import annotations

from prod_st.util.fingerprint import model_fingerprint, text_key

from .base import Teacher, TeacherKind, scores_to_labels
from .bi_encoder import BiEncoderTeacher
from .cache import EmbeddingCache, ScoreCache
from .cross_encoder import CrossEncoderTeacher, load_cross_encoder
from .ensemble import EnsembleTeacher
from .training import ListwiseSoftmaxLoss, train_bi_encoder, train_cross_encoder

__all__ = [
    "BiEncoderTeacher",
    "CrossEncoderTeacher",
    "EmbeddingCache",
    "EnsembleTeacher",
    "ListwiseSoftmaxLoss",
    "ScoreCache",
    "Teacher",
    "TeacherKind",
    "load_cross_encoder",
    "scores_to_labels",
    "model_fingerprint",
    "text_key",
    "train_bi_encoder",
    "train_cross_encoder",
]
