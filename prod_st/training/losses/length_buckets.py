"""The candidate columns of a training batch in a few forward passes of similar-length documents.

sentence-transformers' `embed_columns` runs the query column alone and merges the candidate columns into one
forward pass padded to the longest document of all of them: with PROD's 16 candidates per query and MS MARCO
passages (mean ~75 tokens, cut at 144), about half of that pass's tokens are padding. Here the merged rows are
sorted by length and cut into `buckets` groups, each trimmed to its own longest row (sentence-transformers'
`_create_minibatch`, as its chunked forward does): the same embeddings (up to floating-point noise) and
gradients for about 2/3 of the compute. Each group costs two small host reads on a GPU (its width)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

try:  # sentence-transformers >= 6
    from sentence_transformers.base.losses.gradcache import _create_minibatch
    from sentence_transformers.base.losses.merged_forward import embed_columns, merge_feature_batches
except ImportError:  # pragma: no cover - older releases: one forward pass per column
    _create_minibatch = merge_feature_batches = None

    def embed_columns(model: nn.Module, features_list: Iterable[dict[str, Any]]) -> list[Tensor]:
        return [model(features)["sentence_embedding"] for features in features_list]

MIN_ROWS = 32  # rows per group at least: smaller groups would leave a GPU's matmuls too small


def _rows(features: dict[str, Any], order: Tensor, rows: int) -> dict[str, Any]:
    """`features` with its per-row tensors reordered by `order` (metadata as it is)."""
    return {k: v.index_select(0, order) if isinstance(v, Tensor) and v.ndim and v.shape[0] == rows else v
            for k, v in features.items()}


def embed_columns_by_length(model: nn.Module, features_list: Iterable[dict[str, Any]], buckets: int = 4) -> list[Tensor]:
    """One `(batch, dim)` sentence embedding per column, as `embed_columns` (query column alone, candidate
    columns merged), the merged candidates run in up to `buckets` length-sorted groups of MIN_ROWS rows or more."""
    features_list = list(features_list)
    merged = merge_feature_batches(features_list[1:]) if merge_feature_batches and len(features_list) > 2 else None
    mask = merged.get("attention_mask") if merged is not None else None
    if not isinstance(mask, Tensor) or mask.ndim != 2 or "cu_seq_lens_q" in merged:
        return embed_columns(model, features_list)
    rows = mask.shape[0]
    groups = max(1, min(buckets, rows // MIN_ROWS))
    queries = model(features_list[0])["sentence_embedding"]
    if groups == 1:
        candidates = model(merged)["sentence_embedding"]
    else:
        order = torch.argsort(mask.sum(dim=1), descending=True, stable=True)
        ordered = _rows(merged, order, rows)
        bounds = [rows * g // groups for g in range(groups + 1)]
        parts = [model(_create_minibatch(ordered, begin, end))["sentence_embedding"]
                 for begin, end in zip(bounds, bounds[1:])]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(rows, device=order.device)
        candidates = torch.cat(parts).index_select(0, inverse)  # back in column-major row order
    return [queries, *candidates.reshape(len(features_list) - 1, -1, *candidates.shape[1:]).unbind(0)]
