"""Teachers: one `score(queries, candidate_lists)` interface for bi-encoder and cross-encoder teachers, their
on-disk caches (embeddings, scores, trained models) and the training of PROD's own teachers."""

from __future__ import annotations

from prod_st.fingerprint import model_fingerprint, text_key

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
