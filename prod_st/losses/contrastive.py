"""The contrastive (hard-only) loss of PROD's warm-up and of bi-encoder teacher training, in the model's own
similarity, and the scale that turns that similarity into a logit."""

from __future__ import annotations

from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from sentence_transformers.util import cos_sim, dot_score

COSINE_SCALE = 20.0  # MultipleNegativesRankingLoss's scale for cosine similarities (a softmax over [-1, 1] is flat)


def is_cosine(model: SentenceTransformer) -> bool:
    return model.similarity_fn_name in (None, "cosine")


def score_scale(model: SentenceTransformer) -> float:
    """Multiplier that turns the model's similarity into a logit: 20 for cosine models, 1 for dot product.
    The same scale is applied to a bi-encoder teacher's scores so both sides of the KL are comparable."""
    return COSINE_SCALE if is_cosine(model) else 1.0


def contrastive_loss(model: SentenceTransformer) -> MultipleNegativesRankingLoss:
    """In-batch + hard-negative softmax cross-entropy (MultipleNegativesRankingLoss) in the model's own
    similarity: cosine x 20 for cosine models, the raw dot product otherwise."""
    return MultipleNegativesRankingLoss(
        model, scale=score_scale(model), similarity_fct=cos_sim if is_cosine(model) else dot_score
    )
