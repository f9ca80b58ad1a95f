"""Cache keys: a model's identity from its weights and settings (never its folder), and text hashes."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

DIGEST_SIZE = 16  # 128-bit keys: 32 hex characters


def _hasher() -> Any:
    return hashlib.blake2b(digest_size=DIGEST_SIZE)


def _canonical(value: Any) -> bytes:
    """Stable JSON bytes of settings (sorted keys; anything non-JSON by its str())."""
    return json.dumps(value, sort_keys=True, default=str, separators=(",", ":")).encode()


def text_key(*texts: str, settings: Any = None) -> str:
    """blake2b hex of `texts` (length-prefixed, so ("ab", "c") != ("a", "bc")) and of `settings` (any
    JSON-able value; None adds nothing)."""
    h = _hasher()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    if settings is not None:
        h.update(b"\x00settings")
        h.update(_canonical(settings))
    return h.hexdigest()


def _tokenizer_identity(tokenizer: Any) -> Any:
    """What makes a tokenizer split text the way it does: the fast tokenizer's JSON (vocab, normaliser,
    pre-tokeniser, post-processor) without the truncation/padding state that calls mutate; else its vocab."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        return spec
    vocab = getattr(tokenizer, "get_vocab", None)
    return sorted(vocab().items()) if vocab else type(tokenizer).__name__


def _module_settings(model: torch.nn.Module) -> list[Any]:
    """Class and saved config of each sentence-transformers module (pooling mode, normalisation, ...)."""
    children = list(model.children()) if isinstance(model, torch.nn.Sequential) else [model]
    settings = []
    for module in children:
        get_config = getattr(module, "get_config_dict", None)
        try:
            config = get_config() if callable(get_config) else None
        except Exception:  # a module without a serialisable config: its class still counts
            config = None
        settings.append([type(module).__name__, config])
    return settings


def model_fingerprint(model: torch.nn.Module) -> str:
    """blake2b hex identifying what a (SentenceTransformer / CrossEncoder) model computes: every
    state_dict tensor's name, dtype, shape and bytes, the model class, its modules' configs, its tokenizer,
    max_seq_length, similarity function and prompts. Identical weights and settings give the identical key
    whatever folder they were loaded from."""
    h = _hasher()
    settings = {
        "class": type(model).__name__,
        "modules": _module_settings(model),
        "max_seq_length": getattr(model, "max_seq_length", None),
        "similarity_fn_name": getattr(model, "similarity_fn_name", None),
        "prompts": getattr(model, "prompts", None),
        "default_prompt_name": getattr(model, "default_prompt_name", None),
        "tokenizer": _tokenizer_identity(getattr(model, "tokenizer", None)),
    }
    h.update(_canonical(settings))
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        h.update(_canonical([name, str(data.dtype), list(data.shape)]))
        h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()
