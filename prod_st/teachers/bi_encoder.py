"""Bi-encoder teacher: every text embedded once, cached, and scores as dot products of cached vectors.

Also what the frozen stage-start student behind PROD's regulariser is wrapped in: any SentenceTransformer
whose weights no longer change is a `BiEncoderTeacher`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from prod_st.retrieval.encoding import Role, encode_texts
from prod_st.teachers.base import Precision, TeacherKind, cache_folder, check_rows, model_name, precision_context
from prod_st.teachers.cache import EmbeddingCache
from prod_st.teachers.sharded import fill_missing_shared
from prod_st.util.errors import ProdStError
from prod_st.util.fingerprint import model_fingerprint, text_key
from prod_st.util.models import load_model


class BiEncoderTeacher:
    """Scores candidates by the model's own similarity: dot product, or cosine when the model was trained
    with cosine (its `similarity_fn_name`; vectors are then cached normalised, so a dot product is the cosine).

    Embeddings are cached per text under `<cache_root>/<model fingerprint>/embeddings/`; only texts never
    seen by these exact weights and settings are encoded, `chunk_size` texts per written shard. The model
    must not be trained while wrapped (its fingerprint is taken once, here). `precision` (bf16 / fp16) encodes
    under torch.autocast, cached apart from fp32 embeddings (`cache_folder`); the cached vectors are float32.
    """

    kind: TeacherKind = "bi-encoder"

    def __init__(
        self,
        model: SentenceTransformer | str | Path,
        *,
        batch_size: int = 64,
        cache_root: str | Path | None = None,
        chunk_size: int = 4096,
        name: str | None = None,
        precision: Precision = "fp32",
    ) -> None:
        self.model = model if isinstance(model, SentenceTransformer) else load_model(model)
        self.name = name or model_name(self.model, None if isinstance(model, SentenceTransformer) else model)
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.precision = precision
        self.fingerprint = model_fingerprint(self.model)
        self.cache_folder = cache_folder(cache_root, self.fingerprint, precision)
        self.cache = EmbeddingCache(self.cache_folder / "embeddings")

    def embed(self, texts: list[str], role: Role, *, progress: bool = False) -> np.ndarray:
        """(len(texts), dim) float32 embeddings of `texts` as queries or documents (`encode_query` /
        `encode_document`: prompts and Router routes differ), normalised for cosine models; only texts never
        embedded in that role by these weights are encoded."""
        keys = [text_key(role, t) for t in texts]

        def encode(batch: list[str]) -> np.ndarray:
            with precision_context(self.precision, self.model.device):
                vectors = encode_texts(self.model, batch, role, batch_size=self.batch_size, show_progress_bar=False)
            return np.asarray(vectors, dtype=np.float32)

        fill_missing_shared(  # under torchrun: each rank its share
            self.cache, dict(zip(keys, texts)), encode, chunk_size=self.chunk_size, length=len,
            progress=progress, desc=f"embedding {'queries' if role == 'query' else role + 's'} ({self.name})",
        )
        if not keys:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return self.cache.matrix(keys)

    @property
    def dimension(self) -> int:
        """Embedding width."""
        return int(self.model.get_embedding_dimension() or 0)

    def score(
        self, queries: list[str], candidate_lists: list[list[str]], *, progress: bool = True
    ) -> list[list[float]]:
        """Per query, its similarity to each of its candidates (raw dot products / cosines)."""
        check_rows(queries, candidate_lists)
        q = self.embed(list(queries), "query", progress=progress)
        docs = self.embed([c for cands in candidate_lists for c in cands], "document", progress=progress)
        scores, start = [], 0
        for i, cands in enumerate(candidate_lists):
            block = docs[start : start + len(cands)]
            scores.append((block @ q[i]).astype(np.float32).tolist())
            start += len(cands)
        return scores

    def embeddings_for_rows(self, queries: list[str], candidate_lists: list[list[str]]) -> torch.Tensor:
        """(B, N+2, D) float32 teacher embeddings of [query, positive, neg_1..neg_N] per row: PRODLoss's
        in-batch `labels`. Every row needs the same number of candidates."""
        check_rows(queries, candidate_lists)
        widths = {len(c) for c in candidate_lists}
        if len(widths) > 1:
            raise ProdStError(
                f"every row needs the same number of candidates for in-batch labels, got {sorted(widths)}"
            )
        if not queries:
            return torch.zeros((0, 0, self.dimension), dtype=torch.float32)
        q = torch.from_numpy(np.ascontiguousarray(self.embed(list(queries), "query")))
        docs = self.embed([c for cands in candidate_lists for c in cands], "document")
        docs = torch.from_numpy(np.ascontiguousarray(docs)).reshape(len(queries), len(candidate_lists[0]), -1)
        return torch.cat([q.unsqueeze(1), docs], dim=1)

    def __repr__(self) -> str:
        return f"BiEncoderTeacher({self.name!r}, fingerprint={self.fingerprint[:12]})"
