"""PROD losses: the model-free maths, the sentence-transformers loss module, and the warm-up's contrastive
loss with the similarity-to-logit scale both share."""

from __future__ import annotations

from .contrastive import contrastive_loss, score_scale
from .prod_distill import prod_distill_loss
from .prod_loss import PRODLoss

__all__ = ["PRODLoss", "contrastive_loss", "prod_distill_loss", "score_scale"]
