"""prod-st: PROD (PROgressive Distillation, Lin et al., WWW 2023) for dense retrievers on
sentence-transformers."""

__version__ = "0.1.0"
