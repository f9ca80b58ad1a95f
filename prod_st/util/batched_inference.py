"""Inference over many inputs on a GPU without the GPU waiting for the host: the next batches are tokenised
(`model.preprocess`, sentence-transformers' own) while the GPU runs this one, and nothing is read back until the
end. sentence-transformers' `encode` / `predict` tokenise each batch on the main thread and copy each batch's
output to the host before tokenising the next, so the GPU idles while the host works, and the host ceiling
(`bench/gpu_throughput.py --size host`) bounds the rate.

Batches are length-sorted as in sentence-transformers (longest first: least padding). With `workers` > 0,
DataLoader worker processes (forked) tokenise `workers` batches at a time, in pinned memory; with 0, one
background thread does (the Rust tokenizer releases the GIL while it tokenises). Used on a GPU only: on a CPU the
model's own threads already use the cores, and sentence-transformers' loop runs as it is."""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader

PREFETCH = 4  # batches tokenised ahead of the GPU (per worker process, or by the thread)
BATCHES_PER_WORKER = 8  # a worker process (a fork of this one) only for this many batches or more: a thread else
MAX_AUTO_WORKERS = 4  # enough to tokenise a training batch of 64 x 17 texts while the GPU trains on the last one


def host_workers() -> int | None:
    """Processes that prepare batches ahead of the GPU, for this process (training's dataloader workers and
    `run_batches`): up to MAX_AUTO_WORKERS, its share of the cores less one (one core stays with the process
    itself); None without a GPU (sentence-transformers' own loops, on cores the model computes on)."""
    if not torch.cuda.is_available():
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return max(0, min(MAX_AUTO_WORKERS, share - 1))


class _Prepare:
    """One batch's features from its input indices (picklable: what a worker process runs)."""

    def __init__(self, model: torch.nn.Module, inputs: Sequence, kwargs: dict, pin: bool) -> None:
        self.model, self.inputs, self.kwargs, self.pin = model, inputs, kwargs, pin

    def __call__(self, index: np.ndarray) -> tuple[np.ndarray, dict]:
        features = self.model.preprocess([self.inputs[i] for i in index], **self.kwargs)
        if self.pin:
            features = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        return index, features


def _threaded(batches: list[np.ndarray], prepare: _Prepare) -> Iterator[tuple[np.ndarray, dict]]:
    """`prepare` of each batch, PREFETCH batches ahead, in one background thread."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prod-st-tokenize") as pool:
        ahead: deque = deque()
        for batch in batches:
            ahead.append(pool.submit(prepare, batch))
            if len(ahead) > PREFETCH:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def prepared_batches(model: torch.nn.Module, inputs: Sequence, batch_size: int, *, length: Callable[[object], int],
                     workers: int, **kwargs) -> Iterator[tuple[np.ndarray, dict]]:
    """(input indices, features on the host) per batch of `batch_size` inputs, longest first, prepared ahead by
    up to `workers` processes, one per BATCHES_PER_WORKER batches (none: one thread). `kwargs` go to
    `model.preprocess` (a prompt, a task)."""
    order = np.argsort([-length(x) for x in inputs], kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    pin = torch.cuda.is_available()
    workers = min(workers, len(batches) // BATCHES_PER_WORKER)
    if workers <= 0:
        yield from _threaded(batches, _Prepare(model, inputs, kwargs, pin=pin))
        return
    # forked workers must not touch CUDA: the DataLoader pins their batches in this process
    context = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
    yield from DataLoader(batches, batch_size=None, collate_fn=_Prepare(model, inputs, kwargs, pin=False),
                          num_workers=workers, prefetch_factor=PREFETCH, pin_memory=pin,
                          multiprocessing_context=context)


@torch.inference_mode()
def run_batches(model: torch.nn.Module, inputs: Sequence, batch_size: int, *, output: str,
                length: Callable[[object], int] = len, workers: int = 0, normalize: bool = False,
                **kwargs) -> torch.Tensor:
    """`model(features)[output]` of every input, in input order, as one float32 tensor on the model's device
    (rows normalised with `normalize`): the GPU runs batch after batch while the host prepares the next ones, and
    no value is read back before the caller asks. `kwargs` go to `model.preprocess` and the forward pass (as
    sentence-transformers passes `task`)."""
    model.eval()
    device = next(model.parameters()).device
    out = None
    preprocess_kwargs = {k: v for k, v in kwargs.items() if k == "prompt" or k == "task"}
    forward_kwargs = {k: v for k, v in kwargs.items() if k != "prompt"}
    for index, features in prepared_batches(model, inputs, batch_size, length=length, workers=workers,
                                            **preprocess_kwargs):
        features = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                    for k, v in features.items()}
        values = model(features, **forward_kwargs)[output].float()
        if normalize:
            values = torch.nn.functional.normalize(values, p=2, dim=1)
        if out is None:
            out = torch.empty((len(inputs), *values.shape[1:]), dtype=torch.float32, device=device)
        out[torch.from_numpy(index).to(device, non_blocking=True)] = values
    return out if out is not None else torch.empty((0,), dtype=torch.float32, device=device)
