"""PROD losses: the model-free maths and the sentence-transformers loss module."""

from __future__ import annotations

from .prod_distill import prod_distill_loss
from .prod_loss import PRODLoss

__all__ = ["PRODLoss", "prod_distill_loss"]
