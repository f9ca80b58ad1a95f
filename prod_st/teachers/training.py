"""Training PROD's own teachers when a recipe has none pretrained, cached like scores.

- `train_cross_encoder`: a backbone + new 1-logit head, listwise softmax cross-entropy over 1 positive + N
  hard negatives per query (PROD's cross-encoder teacher recipe).
- `train_bi_encoder`: a SentenceTransformer trained contrastively (in-batch + hard negatives).

Both store the trained model under `<cache_root>/trained/<key>/` with a `DONE` marker, the key hashing the
base model's weights, the training rows and every hyperparameter: the same inputs return the saved model and
never train twice. The model is saved to a temp folder and renamed into place before `DONE` is written.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import datasets
import transformers
from safetensors import SafetensorError
from sentence_transformers import (
    CrossEncoder,
    CrossEncoderTrainer,
    CrossEncoderTrainingArguments,
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers.cross_encoder.losses import (
    MultipleNegativesRankingLoss as CEMultipleNegativesRankingLoss,
)

from prod_st.retrieval.encoding import is_cosine, training_roles
from prod_st.teachers.base import teacher_cache_root
from prod_st.teachers.cross_encoder import load_cross_encoder
from prod_st.training.losses.contrastive import contrastive_loss, score_scale
from prod_st.training.resampling import EpochBlockBatchSampler
from prod_st.training.steps import plan_steps
from prod_st.util import locks
from prod_st.util.distributed import all_gather, barrier, is_main, rank, world_size
from prod_st.util.errors import ProdStError
from prod_st.util.fingerprint import model_fingerprint, text_key
from prod_st.util.models import load_model
from prod_st.util.paths import write_text_atomic, writing
from prod_st.util.precision import precision_flags, resolve_precision

logger = logging.getLogger(__name__)

TrainRow = tuple[str, str, Sequence[str]]  # (query, positive, [hard negatives])
M = TypeVar("M", CrossEncoder, SentenceTransformer)


class ListwiseSoftmaxLoss(CEMultipleNegativesRankingLoss):
    """Softmax cross-entropy over each query's own list [positive, neg_1..neg_N] of raw logits.

    Why this loss: PROD trains its cross-encoders with -log softmax(logits over 1 positive + N hard negatives)
    [positive]. sentence-transformers' cross-encoder MultipleNegativesRankingLoss computes exactly
    CrossEntropy(logits over [positive, in-batch negatives, hard negatives], target = positive), so with no
    in-batch negatives, no activation (`activation_fn=None`, where its default sigmoid would squash logits to
    [0, 1]) and `scale=1` it IS that loss. ListNetLoss is not: it targets softmax(labels), so binary labels
    [1, 0, .., 0] give the positive only e / (e + N - 1) of the target mass instead of all of it.
    MNRL's `num_negatives=0` cannot express "no in-batch negatives" (torch.multinomial refuses 0 samples),
    hence this one-method override.
    """

    def __init__(self, model: CrossEncoder) -> None:
        super().__init__(model, num_negatives=0, scale=1.0, activation_fn=None)

    def get_in_batch_negatives(self, anchors: list[str], candidates: list[list[str]]):  # noqa: ARG002
        return iter(())


def _rows_dataset(rows: Sequence[TrainRow], *, min_negatives: int) -> datasets.Dataset:
    """Columns query, positive, negative_1..negative_N (N the same for every row, >= min_negatives)."""
    if not rows:
        raise ProdStError("no training rows for the teacher")
    counts = {len(negs) for _, _, negs in rows}
    if len(counts) > 1:
        raise ProdStError(f"every training row needs the same number of hard negatives, got {sorted(counts)}")
    n = counts.pop()
    if n < min_negatives:
        raise ProdStError(f"teacher training needs at least {min_negatives} hard negative(s) per row, got {n}")
    columns: dict[str, list[str]] = {"query": [r[0] for r in rows], "positive": [r[1] for r in rows]}
    for j in range(n):
        columns[f"negative_{j + 1}"] = [r[2][j] for r in rows]
    return datasets.Dataset.from_dict(columns)


def rows_key(rows: Sequence[TrainRow]) -> str:
    """Hash of the training rows, order and structure included."""
    return text_key(*(t for q, p, negs in rows for t in (q, p, str(len(negs)), *negs)))


def _cached_training(
    kind: str,
    base: M,
    rows: Sequence[TrainRow],
    settings: dict[str, Any],
    cache_root: str | Path | None,
    train: Callable[[M, Path], None],
    load: Callable[[Path], M],
) -> M:
    """Return the model trained from `base` on `rows` with `settings`, training (via `train(model, workdir)`)
    only when `<cache_root>/trained/<key>/DONE` does not exist yet."""
    key = text_key(model_fingerprint(base), rows_key(rows), settings={"kind": kind, **settings})
    trained = teacher_cache_root(cache_root) / "trained"
    final = trained / key
    if (final / "DONE").exists():
        logger.info("%s teacher: cached at %s, no training", kind, final)
        if (model := _load_or_discard(final, load)) is not None:
            return model
    # Two runs that share the cache train it once: the second waits for the first, then loads its model (under
    # torchrun rank 0 waits and the other ranks wait for rank 0).
    waiting = f"{kind} teacher: another run is training it ({final}); waiting for it"
    with locks.exclusive(trained / f".{key}.lock", waiting) if is_main() else contextlib.nullcontext():
        done = all(all_gather((final / "DONE").exists()))
        if not done:
            _train_into(kind, base, rows, settings, train, trained, final)
    return load(final)


def _load_or_discard(final: Path, load: Callable[[Path], M]) -> M | None:
    """The trained teacher in `final`, or None when its files cannot be read (then the entry is removed, on
    rank 0, and the teacher is trained again)."""
    try:
        model = load(final)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        model = None
        why = " ".join(str(e).split())[:200]
        logger.warning("damaged cached teacher %s (%s): removed, it will be trained again", final, why)
    if all(all_gather(model is not None)):  # every rank has tried before rank 0 removes it
        return model
    if is_main():
        shutil.rmtree(final, ignore_errors=True)
    barrier()
    return None


def _train_into(kind: str, base, rows, settings: dict, train: Callable, trained: Path, final: Path) -> None:
    """Train `base` in a temp folder and move the model to `final` with its DONE marker (rank 0 saves). The temp
    folder is named by the key and the rank, and only one run trains a key at a time (the lock): what a killed
    run left there (up to a saved model) is removed first, so kills do not pile up folders in the cache."""
    workdir = trained / f".{final.name}.work-rank{rank()}"
    shutil.rmtree(workdir, ignore_errors=True)
    started = time.time()
    with writing(workdir):
        train(base, workdir / "trainer")
        if is_main():
            base.save(str(workdir / "model"))
    if is_main():
        if final.exists():  # a half-finished earlier save (renamed, no DONE): not trusted
            shutil.rmtree(final)
        os.replace(workdir / "model", final)
        marker = {"kind": kind, "settings": settings, "rows": len(rows), "seconds": round(time.time() - started, 1)}
        write_text_atomic(final / "DONE", json.dumps(marker, indent=1, default=str))
        shutil.rmtree(workdir, ignore_errors=True)
        logger.info("%s teacher: trained in %.0f s, saved to %s", kind, time.time() - started, final)
    barrier()


def _common_args(
    workdir: Path, rows: int, epochs: float, max_steps: int | None, batch_size: int, lr: float, seed: int,
    warmup_ratio: float, precision: str, *, no_duplicates: bool,
) -> dict:
    """The trainer arguments both teachers share. The steps are given (`prod_st.training.steps.plan_steps`: every
    process's batches count), and the batches come from `EpochBlockBatchSampler`, so under torchrun every rank
    steps the same number of times on equal shapes (the trainer alone can neither count a sharded epoch nor
    even out its last batch)."""
    steps = plan_steps(rows, batch_size, epochs=epochs, max_steps=max_steps, in_batch=no_duplicates,
                       what="teacher training").steps
    return dict(
        output_dir=str(workdir), num_train_epochs=epochs, max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=lr, warmup_steps=warmup_ratio, max_grad_norm=2.0, seed=seed, data_seed=seed,
        save_strategy="no", report_to="none", logging_steps=50, **precision_flags(precision),
        batch_sampler=functools.partial(EpochBlockBatchSampler, block_size=rows, no_duplicates=no_duplicates),
    )


def _settings(precision: str, max_steps: int | None = None, **settings) -> dict:
    """The settings a trained teacher's cache key hashes: fp32 adds nothing (keys from before precision existed
    stay valid), another precision (`auto` as this machine resolves it) is a different teacher; `max_steps`
    and the number of processes only where set (they change the batches read)."""
    precision = resolve_precision(precision)
    world = world_size()
    return (settings | ({"precision": precision} if precision != "fp32" else {})
            | ({"max_steps": max_steps} if max_steps else {}) | ({"world_size": world} if world > 1 else {}))


def train_cross_encoder(
    backbone: CrossEncoder | str | Path,
    train_rows: Sequence[TrainRow],
    *,
    output_dir: str | Path | None = None,
    epochs: float = 1,
    max_steps: int | None = None,
    batch_size: int = 8,
    lr: float = 3e-5,
    max_length: int | None = 256,
    seed: int = 42,
    warmup_ratio: float = 0.1,
    cache_root: str | Path | None = None,
    precision: str = "fp32",
) -> CrossEncoder:
    """Train a 1-logit cross-encoder teacher with listwise softmax CE over [positive, hard negatives] per
    query (`ListwiseSoftmaxLoss`) and return it loaded from the cache (raw-logit activation).

    `backbone`: a CrossEncoder with a 1-logit head, or a name/folder (an encoder or SentenceTransformer gets a
    new 1-logit head, initialised under `seed`). `train_rows`: (query, positive, [N hard negatives]), the same
    N >= 1 for every row. `output_dir`: the trainer's working folder (logs only, no checkpoints); by default
    a temp folder in the cache. `max_length`: truncation of the (query, document) pair, None = the model's.
    """
    transformers.set_seed(seed)
    if isinstance(backbone, CrossEncoder):
        model = backbone
        if max_length is not None:
            model.max_seq_length = max_length
    else:
        model = load_cross_encoder(backbone, max_length=max_length, num_labels=1)
    if model.num_labels != 1:
        raise ProdStError(f"a cross-encoder teacher needs a 1-logit head, this one has {model.num_labels}")
    dataset = _rows_dataset(train_rows, min_negatives=1)
    settings = _settings(precision, max_steps, epochs=epochs, batch_size=batch_size, lr=lr,
                         max_length=model.max_seq_length, seed=seed, warmup_ratio=warmup_ratio,
                         loss="listwise-softmax-ce")

    def train(model: CrossEncoder, workdir: Path) -> None:
        args = CrossEncoderTrainingArguments(
            **_common_args(Path(output_dir or workdir), len(dataset), epochs, max_steps, batch_size, lr, seed,
                           warmup_ratio, precision, no_duplicates=False),
            # Every parameter of a cross-encoder gets a gradient. With the trainer's default for a model that is
            # not a transformers PreTrainedModel (find_unused_parameters=True), the first backward pass under
            # torchrun fails: "Parameter ... classifier.bias has been marked as ready twice" (seen with 2 gloo
            # ranks; tests/test_runner_distributed.py trains a cross-encoder teacher under the launcher).
            ddp_find_unused_parameters=False,
        )
        trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=dataset, loss=ListwiseSoftmaxLoss(model))
        trainer.train()

    def load(path: Path) -> CrossEncoder:
        return load_cross_encoder(path)

    return _cached_training("cross-encoder", model, train_rows, settings, cache_root, train, load)


def train_bi_encoder(
    base: SentenceTransformer | str | Path,
    train_rows: Sequence[TrainRow],
    *,
    output_dir: str | Path | None = None,
    epochs: float = 1,
    max_steps: int | None = None,
    batch_size: int = 32,
    lr: float = 2e-5,
    max_length: int | None = None,
    seed: int = 42,
    warmup_ratio: float = 0.1,
    cache_root: str | Path | None = None,
    precision: str = "fp32",
) -> SentenceTransformer:
    """Train a bi-encoder teacher contrastively (MultipleNegativesRankingLoss: in-batch negatives plus each
    row's hard negatives as extra columns, batches without duplicate texts) and return it from the cache.

    The similarity is the model's own: cosine models use cosine x 20 (the loss's default scale), dot-product
    models the raw dot product. `train_rows`: (query, positive, [N hard negatives]), the same N >= 0 for every
    row. `output_dir`: the trainer's working folder (logs only); by default a temp folder in the cache.
    """
    transformers.set_seed(seed)
    model = base if isinstance(base, SentenceTransformer) else load_model(base)
    if max_length is not None:
        model.max_seq_length = max_length
    dataset = _rows_dataset(train_rows, min_negatives=0)
    settings = _settings(precision, max_steps, epochs=epochs, batch_size=batch_size, lr=lr,
                         max_length=model.max_seq_length, seed=seed, warmup_ratio=warmup_ratio,
                         loss=f"mnrl-{'cos' if is_cosine(model) else 'dot'}{score_scale(model):g}")

    def train(model: SentenceTransformer, workdir: Path) -> None:
        loss = contrastive_loss(model)
        args = SentenceTransformerTrainingArguments(
            **_common_args(Path(output_dir or workdir), len(dataset), epochs, max_steps, batch_size, lr, seed,
                           warmup_ratio, precision, no_duplicates=True),
            **training_roles(model, dataset.column_names),
        )
        SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss).train()

    return _cached_training("bi-encoder", model, train_rows, settings, cache_root, train, load_model)
