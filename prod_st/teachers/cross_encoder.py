"""Cross-encoder teacher: raw logits of (query, document) pairs, each pair scored once and cached."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sentence_transformers import CrossEncoder

from prod_st.teachers.base import Precision, TeacherKind, cache_folder, check_rows, model_name, precision_context
from prod_st.teachers.cache import ScoreCache
from prod_st.teachers.sharded import fill_missing_shared
from prod_st.util.batched_inference import host_workers, run_batches
from prod_st.util.errors import ProdStError
from prod_st.util.fingerprint import model_fingerprint, text_key
from prod_st.util.hub import hub_error
from prod_st.util.models import resolve_model_path


def load_cross_encoder(
    name: str | Path, *, max_length: int | None = None, num_labels: int | None = None
) -> CrossEncoder:
    """A CrossEncoder from a folder, packaged name or Hub id, predicting raw logits (Identity activation).
    A SentenceTransformer folder (e.g. all-MiniLM-L6-v2) becomes its backbone with a new classifier head of
    `num_labels` outputs."""
    path = resolve_model_path(name)
    local = Path(path).is_dir()
    if (Path(str(name)).is_absolute() or str(name).startswith((".", "~"))) and not local:
        raise ProdStError(f"model folder {str(name)!r} does not exist")
    try:
        return CrossEncoder(
            path, num_labels=num_labels, max_length=max_length, activation_fn=torch.nn.Identity(),
        )
    except Exception as e:  # OSError wrapping huggingface_hub's typed errors, ValueError: no such model here
        raise hub_error(e, f"cannot load cross-encoder {str(name)!r}", repo_id=None if local else str(name)) from None


class CrossEncoderTeacher:
    """Scores each (query, candidate) pair with the cross-encoder's raw logit (no sigmoid).

    Scores are cached per pair under `<cache_root>/<model fingerprint>/scores/`; the fingerprint covers the
    weights, tokenizer and max length, so a different `max_length` or different weights never reuse
    scores. Only uncached pairs go through the model, longest first, `chunk_size` pairs per written shard:
    an interrupted scoring keeps its finished chunks and a rerun scores only the rest.
    `max_length`, when given, is set on the model (it is the model's truncation length from then on).
    `precision` (bf16 / fp16) scores under torch.autocast, cached apart from fp32 scores (`cache_folder`).
    """

    kind: TeacherKind = "cross-encoder"

    def __init__(
        self,
        model: CrossEncoder | str | Path,
        *,
        batch_size: int = 64,
        max_length: int | None = None,
        cache_root: str | Path | None = None,
        chunk_size: int = 2048,
        name: str | None = None,
        precision: Precision = "fp32",
    ) -> None:
        if isinstance(model, CrossEncoder):
            self.model = model
            if max_length is not None:
                self.model.max_seq_length = max_length
        else:
            self.model = load_cross_encoder(model, max_length=max_length)
        if self.model.num_labels != 1:
            raise ProdStError(f"a cross-encoder teacher needs a 1-logit head, this one has {self.model.num_labels}")
        self.name = name or model_name(self.model, None if isinstance(model, CrossEncoder) else model)
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.max_length = self.model.max_seq_length
        self.precision = precision
        self.fingerprint = model_fingerprint(self.model)
        self.cache_folder = cache_folder(cache_root, self.fingerprint, precision)
        self.cache = ScoreCache(self.cache_folder / "scores")

    def _predict(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        """Raw logits of `pairs`; on a GPU by `run_batches` (the next batches tokenised while the GPU scores)."""
        workers = host_workers()
        with precision_context(self.precision, self.model.device):
            if workers is not None:
                scores = run_batches(self.model, pairs, self.batch_size, output="scores", workers=workers,
                                     length=lambda pair: len(pair[0]) + len(pair[1]))
            else:
                scores = self.model.predict(
                    pairs, batch_size=self.batch_size, activation_fn=torch.nn.Identity(), convert_to_tensor=True,
                    show_progress_bar=False,
                )
        return scores.float().reshape(len(pairs)).cpu().numpy()

    def score(
        self, queries: list[str], candidate_lists: list[list[str]], *, progress: bool = True
    ) -> list[list[float]]:
        """Per query, the raw logit of each of its candidates."""
        check_rows(queries, candidate_lists)
        keys = [[text_key(q, c) for c in cands] for q, cands in zip(queries, candidate_lists)]
        pairs = {k: (q, c) for q, cands, row in zip(queries, candidate_lists, keys) for c, k in zip(cands, row)}
        fill_missing_shared(  # under torchrun: each rank its share
            self.cache, pairs, self._predict, chunk_size=self.chunk_size,
            length=lambda pair: len(pair[0]) + len(pair[1]), progress=progress, desc=f"scoring ({self.name})",
        )
        found = self.cache.get_many(pairs)
        return [[found[k] for k in row] for row in keys]

    def __repr__(self) -> str:
        return (f"CrossEncoderTeacher({self.name!r}, max_length={self.max_length}, precision={self.precision}, "
                f"fingerprint={self.fingerprint[:12]})")
