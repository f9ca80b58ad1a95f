"""The contrastive (hard-only) loss of PROD's warm-up and of bi-encoder teacher training, in the model's own
similarity, and the scale that turns that similarity into a logit."""

from __future__ import annotations

from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

from prod_st.retrieval.encoding import is_cosine, similarity_fct

COSINE_SCALE = 20.0  # MultipleNegativesRankingLoss's scale for cosine similarities (a softmax over [-1, 1] is flat)


def score_scale(model: SentenceTransformer) -> float:
    """Multiplier that turns the model's similarity into a logit: 20 for cosine models, 1 for dot product.
    The same scale is applied to a bi-encoder teacher's scores so both sides of the KL are comparable."""
    return COSINE_SCALE if is_cosine(model) else 1.0


def contrastive_loss(model: SentenceTransformer, *, gather_across_devices: bool = False) -> MultipleNegativesRankingLoss:
    """In-batch + hard-negative softmax cross-entropy (MultipleNegativesRankingLoss) in the model's own
    similarity: cosine x 20 for cosine models, the raw dot product otherwise. With `gather_across_devices`
    (under torchrun), every passage of the global batch is a candidate, as in PROD's warm-up."""
    return MultipleNegativesRankingLoss(
        model, scale=score_scale(model), similarity_fct=similarity_fct(model),
        gather_across_devices=gather_across_devices,
    )
