"""How a bi-encoder turns texts into scores, in one place: queries through `encode_query` and documents through
`encode_document` (so models with query/document prompts or a `Router`, e.g. E5, BGE, asymmetric models, get
theirs), the model's own similarity (cosine or dot product), and the same roles and prompts for training.

Every step that encodes (evaluation, mining, bi-encoder teachers, the frozen stage-start student's labels) and
every step that trains a bi-encoder goes through here, so training and inference can never disagree on prompts,
routing or similarity."""

from __future__ import annotations

from typing import Literal

import numpy as np
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import cos_sim, dot_score

from prod_st.util.batched_inference import host_workers, run_batches
from prod_st.util.errors import ProdStError

Role = Literal["query", "document"]
DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")  # the order `encode_document` tries them in


def is_cosine(model: SentenceTransformer) -> bool:
    """True when the model scores by cosine (sentence-transformers' default when a model names none)."""
    return model.similarity_fn_name in (None, "cosine")


def similarity_fct(model: SentenceTransformer):
    """The model's own similarity as a `(B, D) x (M, D) -> (B, M)` function: `cos_sim` or `dot_score`."""
    name = model.similarity_fn_name
    if name in (None, "cosine"):
        return cos_sim
    if name == "dot":
        return dot_score
    raise ProdStError(f"similarity {name!r} is not supported for retrieval training; use 'cosine' or 'dot'")


def role_prompt(model: SentenceTransformer, role: Role) -> str | None:
    """The prompt `encode_query` / `encode_document` give a role: the model's "query" prompt (documents: the
    first of DOCUMENT_PROMPT_NAMES it has), else its default prompt, else none."""
    prompts = model.prompts or {}
    names = ("query",) if role == "query" else DOCUMENT_PROMPT_NAMES
    name = next((n for n in names if n in prompts), model.default_prompt_name)
    return prompts.get(name) if name else None


def encode_texts(
    model: SentenceTransformer, texts: list[str], role: Role, batch_size: int = 64, **kwargs
) -> np.ndarray:
    """float32 embeddings of `texts` as queries or documents (the model's prompts and Router route for that
    role), normalised for cosine models so that an inner product is the model's score. On a GPU, a plain model
    (no Router, no truncate_dim) is run by `run_batches`: the next batches are tokenised while the GPU encodes."""
    workers = host_workers()
    if workers is not None and len(texts) > batch_size and not _has_router(model) and model.truncate_dim is None:
        return run_batches(model, texts, batch_size, output="sentence_embedding", workers=workers,
                           normalize=is_cosine(model), prompt=role_prompt(model, role), task=role).cpu().numpy()
    encode = model.encode_query if role == "query" else model.encode_document
    return encode(
        texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=is_cosine(model), **kwargs
    ).astype(np.float32, copy=False)


def _has_router(model: SentenceTransformer) -> bool:
    return any(type(module).__name__ == "Router" for module in model.modules())


def _has_query_length(model: SentenceTransformer) -> bool:
    """Whether a Transformer module of `model` cuts queries at their own length (`prod_st.util.models.set_lengths`)."""
    return any(getattr(module, "query_length", None) is not None for module in model.modules()
               if type(module).__name__ == "Transformer")


def training_roles(model: SentenceTransformer, columns: list[str]) -> dict:
    """`SentenceTransformerTrainingArguments` keywords that give every text column its role at training time:
    the "query" column the query prompt, Router route and query length, every other column the document's. The
    trainer's collator tells the model a column's role only through `router_mapping`, so a model with a query
    length of its own (PROD's student: 32 query tokens, 144 document tokens) gets one too, Router or not. Empty
    when the model has no prompts, no Router and no query length, so plain models train exactly as before."""
    prompts = model.prompts or {}
    document_prompt = next((prompts[n] for n in DOCUMENT_PROMPT_NAMES if n in prompts), None)  # as encode_document
    roles = {c: "query" if c == "query" else "document" for c in columns if c != "label"}
    kwargs = {}
    by_column = {c: prompts.get("query") if r == "query" else document_prompt for c, r in roles.items()}
    if any(by_column.values()):
        kwargs["prompts"] = {c: p for c, p in by_column.items() if p}
    if _has_router(model) or _has_query_length(model):
        kwargs["router_mapping"] = roles
    return kwargs
