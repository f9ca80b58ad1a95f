"""Training the student for one stage with SentenceTransformerTrainer: checkpoints in the stage folder, so a
killed stage resumes from its last checkpoint."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import datasets
import torch
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.base.sampler import BatchSamplers
from transformers.trainer_utils import get_last_checkpoint

from prod_st.encoding import training_roles
from prod_st.resampling import EpochBlockBatchSampler

logger = logging.getLogger(__name__)

def train_student(
    model: SentenceTransformer,
    dataset: datasets.Dataset,
    loss: torch.nn.Module,
    *,
    workdir: Path,
    lr: float,
    epochs: float,
    max_steps: int | None,
    batch_size: int,
    warmup_ratio: float,
    seed: int,
    no_duplicates: bool,
    checkpoints: int = 4,
    block_size: int | None = None,
) -> dict[str, float]:
    """Train `model` in place on `dataset`, resuming from the newest checkpoint under `workdir` if any.
    About `checkpoints` checkpoints are written over the stage; only the last one is kept. With `block_size`,
    the dataset is consecutive epochs of `block_size` rows each (fresh negatives per epoch) read block after
    block (`prod_st.resampling`). Queries and documents get the model's own prompts / Router routes."""
    steps_per_epoch = max(1, -(-len(dataset) // batch_size))
    total = max_steps or max(1, int(steps_per_epoch * epochs))
    args = SentenceTransformerTrainingArguments(
        output_dir=str(workdir),
        num_train_epochs=epochs,
        max_steps=max_steps or -1,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        warmup_steps=warmup_ratio,  # a float < 1 is a ratio of the total steps (transformers 5)
        max_grad_norm=2.0,  # PROD's gradient clip
        seed=seed,
        data_seed=seed,
        save_strategy="steps",
        save_steps=max(1, total // checkpoints),
        save_total_limit=1,
        logging_steps=max(1, total // 10),
        report_to="none",
        batch_sampler=(
            functools.partial(EpochBlockBatchSampler, block_size=block_size, no_duplicates=no_duplicates)
            if block_size else BatchSamplers.NO_DUPLICATES if no_duplicates else BatchSamplers.BATCH_SAMPLER
        ),
        dataloader_drop_last=False,
        **training_roles(model, dataset.column_names),
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
    last = get_last_checkpoint(str(workdir)) if workdir.is_dir() else None
    if last:
        logger.info("resuming training from %s", last)
    result = trainer.train(resume_from_checkpoint=last)
    return {"steps": result.global_step, "train_loss": result.training_loss}
