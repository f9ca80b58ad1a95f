"""Models: the packaged all-MiniLM-L6-v2, loading by path / packaged name / Hub id, and PROD's student
built from the FIRST k layers of a bigger encoder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer

from prod_st.util.errors import ProdStError
from prod_st.util.hub import hub_error
from prod_st.util.model_paths import LAYER_KEYS, PACKAGED, layer_count, looks_like_path, resolve_model_path  # noqa: F401
from prod_st.util.paths import check_output_folder, write_folder_atomic

logger = logging.getLogger(__name__)


def load_model(name: str | Path, device: str | None = None) -> SentenceTransformer:
    """Load a SentenceTransformer from a folder, a packaged name or a Hub id (huggingface_hub's own cache
    fallback and HF_HUB_OFFLINE apply), with a one-line error when none of these works."""
    path = resolve_model_path(name)
    if looks_like_path(name) and not Path(path).is_dir():
        raise ProdStError(f"model folder {str(name)!r} does not exist")
    try:
        return SentenceTransformer(path, device=device)
    except Exception as e:  # OSError wrapping huggingface_hub's typed errors, ValueError: no such model here
        if Path(path).is_dir():
            raise ProdStError(f"cannot load model folder {str(name)!r}: {type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]}") from None
        raise hub_error(e, f"unknown model {str(name)!r} (not a local folder, not a packaged model: "
                           f"{', '.join(PACKAGED)})", repo_id=str(name)) from None


def set_pooling_and_similarity(model: SentenceTransformer, pooling: str | None, similarity: str | None) -> None:
    """Switch the Pooling module's mode and the model's similarity in place (None leaves them)."""
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    if pooling is not None:
        pools = [m for m in model if isinstance(m, Pooling)]
        if not pools:
            raise ProdStError(f"the model has no Pooling module to set to {pooling!r}")
        pools[0].pooling_mode = pooling
    if similarity == "dot":
        for name, module in list(model.named_children()):
            if isinstance(module, Normalize):
                del model._modules[name]  # dot product on unnormalised vectors, as PROD
    if similarity is not None:
        model.similarity_fn_name = similarity


def _layer_list(encoder: torch.nn.Module, num_layers: int) -> tuple[torch.nn.Module, str]:
    """The (parent, attribute) holding the encoder's transformer blocks: the ModuleList with one entry per
    hidden layer (`encoder.layer` in BERT/RoBERTa/MPNet/ERNIE, `transformer.layer` in DistilBERT, ...)."""
    for parent in encoder.modules():
        for attr, child in parent.named_children():
            if isinstance(child, torch.nn.ModuleList) and len(child) == num_layers:
                return parent, attr
    raise ProdStError(f"cannot find the {num_layers} transformer layers of {type(encoder).__name__}")


def _load_first_layers(base: str | Path, num_layers: int) -> SentenceTransformer | None:
    """`base` built with `config_kwargs={"num_hidden_layers": k}`: transformers then loads only the first k
    layers' weights (the later ones are "unexpected" in its load report, which is kept quiet). None when that
    does not give the first k layers (a missing or mismatched weight, another depth): then build_student cuts."""
    path = resolve_model_path(base)
    if looks_like_path(base) and not Path(path).is_dir():
        raise ProdStError(f"model folder {str(base)!r} does not exist")
    reports: list[str] = []

    def keep_load_report(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            reports.append(record.getMessage())
            return False
        return True

    transformers_log = logging.getLogger("transformers.modeling_utils")
    transformers_log.addFilter(keep_load_report)
    try:
        model = SentenceTransformer(path, config_kwargs={"num_hidden_layers": num_layers})
    except Exception:  # noqa: BLE001 - the full load below gives the one-line error, if any
        return None
    finally:
        transformers_log.removeFilter(keep_load_report)
    if any(word in r for r in reports for word in ("MISSING", "MISMATCH")):
        return None
    encoder = model[0].auto_model
    found = getattr(encoder.config, "num_hidden_layers", None)
    blocks = [m for m in encoder.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == num_layers]
    return model if found == num_layers and blocks else None


def build_student(
    base: str | Path | SentenceTransformer,
    num_layers: int | None,
    output: str | Path | None = None,
    *,
    pooling: str | None = None,
    similarity: str | None = None,
):
    """PROD's student: the first `num_layers` transformer layers of `base` (embeddings, pooling and
    normalisation kept), saved to `output` as a normal SentenceTransformer folder when given.
    `pooling` ("cls" / "mean") and `similarity` ("dot" drops a Normalize module, "cosine") override the
    model's own, e.g. PROD's CLS pooling with dot product for a raw encoder such as ERNIE-2.0.
    `output` must be absent or an empty folder (checked before the model is loaded); it is written atomically.

    The student is loaded with `config_kwargs={"num_hidden_layers": k}` (only its k layers' weights are read);
    a model already loaded, or one that this does not cut cleanly, is loaded whole and cut (`cut_layers`)."""
    if output is not None:
        output = check_output_folder(output, "student folder")
    model = None
    if num_layers is not None and num_layers >= 1 and not isinstance(base, SentenceTransformer):
        model = _load_first_layers(base, num_layers)
    if model is None:
        model = base if isinstance(base, SentenceTransformer) else load_model(base)
        cut_layers(model, num_layers)
    else:
        logger.info("student: first %d layers of %s", num_layers, base)
    set_pooling_and_similarity(model, pooling, similarity)
    if output is not None:
        write_folder_atomic(output, lambda tmp: model.save(str(tmp)))
    return model


def set_lengths(model: SentenceTransformer, max_query_length: int | None, max_doc_length: int | None) -> None:
    """Truncate documents at `max_doc_length` tokens and queries at `max_query_length` (PROD: 144 and 32), in
    place; None leaves that length as it is.

    A SentenceTransformer has one `max_seq_length`, which cuts every text; the document length goes there. The
    query length goes to the Transformer module's `query_length`, which sentence-transformers applies to every
    text that reaches the module as a query: `encode_query` (so evaluation, mining, DPD and the frozen
    stage-start student's labels) and, in training, the columns `prod_st.retrieval.encoding.training_roles` maps to the
    "query" task. It is saved with the model (and so part of its fingerprint and every cache key built on it),
    so a student loaded elsewhere cuts its queries as it was trained to."""
    from sentence_transformers.sentence_transformer.modules import Transformer

    if max_doc_length is not None:
        model.max_seq_length = max_doc_length
    if max_query_length is None:
        return
    modules = [m for m in model.modules() if isinstance(m, Transformer)]
    if not modules or not all("query_length" in getattr(m, "config_keys", ()) for m in modules):
        raise ProdStError("student.max_query_length: this model's Transformer module cannot truncate queries apart "
                          "from documents (no query_length in this sentence-transformers version)")
    for module in modules:
        module.query_length = max_query_length


def cut_layers(model: SentenceTransformer, num_layers: int | None) -> None:
    """Keep the first `num_layers` transformer blocks of `model`'s encoder in place (None: all of them)."""
    encoder = model[0].auto_model
    config = encoder.config
    key = next((k for k in LAYER_KEYS if hasattr(config, k)), None)
    if key is None:
        raise ProdStError(f"{type(encoder).__name__} has no layer count in its config; cannot truncate it")
    total = getattr(config, key)
    num_layers = total if num_layers is None else num_layers
    if not 1 <= num_layers <= total:
        raise ProdStError(f"num_layers must be between 1 and {total} for this model, got {num_layers}")
    parent, attr = _layer_list(encoder, total)
    setattr(parent, attr, torch.nn.ModuleList(list(getattr(parent, attr))[:num_layers]))
    setattr(config, key, num_layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:num_layers]
    logger.info("student: first %d of %d layers of %s", num_layers, total, type(encoder).__name__)


def saved_layer_count(folder: Path | str) -> int | None:
    """The number of transformer layers of the SentenceTransformer saved in `folder`, read from the config of
    its Transformer module (no model is loaded); None when the folder does not say."""
    folder = Path(folder)
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        path = next(m.get("path", "") for m in modules if str(m.get("type", "")).endswith("Transformer"))
        config = json.loads((folder / path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, StopIteration, AttributeError, TypeError):
        return None
    return layer_count(config)
