"""Encoding, the corpus index, exact search, hard-negative mining and retrieval evaluation."""
