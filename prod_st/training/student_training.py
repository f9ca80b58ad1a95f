"""Training the student for one stage with SentenceTransformerTrainer: checkpoints in the stage folder, so a
killed stage resumes from its last checkpoint.

The trainer writes a `checkpoint-N` folder file by file, and `get_last_checkpoint` takes the highest N whatever
it holds, so a kill during a save would leave a folder that resume trusts. Here a checkpoint counts only once
the trainer has finished saving it (`on_save` writes COMPLETE into it); resume takes the newest complete one,
and the others (older complete ones, half-written ones: prod-st made them) are removed. Older checkpoints
are removed only after a newer one is complete (the trainer's own rotation, `save_total_limit`, runs before
`on_save` and is off), so once a checkpoint was completed there is always a complete one on disk.
"""

from __future__ import annotations

import functools
import logging
import re
import shutil
from pathlib import Path

import datasets
import torch
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from transformers import TrainerCallback

from prod_st.retrieval.encoding import training_roles
from prod_st.training.resampling import EpochBlockBatchSampler
from prod_st.training.steps import plan_steps
from prod_st.util import cost
from prod_st.util.batched_inference import host_workers
from prod_st.util.distributed import barrier, is_main
from prod_st.util.paths import write_text_atomic, writing
from prod_st.util.precision import precision_flags

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"  # in checkpoint-N once the trainer has saved all of it
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _checkpoints(workdir: Path) -> list[tuple[int, Path]]:
    if not workdir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in workdir.iterdir() if (m := CHECKPOINT.match(p.name)) and p.is_dir()]
    return sorted(found)


def last_complete_checkpoint(workdir: Path) -> Path | None:
    """The newest checkpoint the trainer finished saving, or None."""
    complete = [p for _, p in _checkpoints(workdir) if (p / COMPLETE).is_file()]
    return complete[-1] if complete else None


def prune_checkpoints(workdir: Path, keep: Path | None) -> None:
    """Remove every checkpoint folder but `keep` (rank 0 only: prod-st made them)."""
    for _, path in _checkpoints(workdir):
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)


class CompleteCheckpoints(TrainerCallback):
    """Mark a checkpoint complete once the trainer has saved it, then remove the older ones."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def on_save(self, args, state, control, **kwargs):
        barrier()  # every rank has written its part (rank 0 the model and optimizer, each rank its RNG state)
        if is_main():
            folder = self.workdir / f"checkpoint-{state.global_step}"
            write_text_atomic(folder / COMPLETE, f"{state.global_step}\n")
            prune_checkpoints(self.workdir, keep=folder)
        return control


def dataloader_workers(setting: int | str) -> int:
    """The trainer's dataloader worker processes for `training.dataloader_num_workers`. `auto`: on a GPU, workers
    that tokenise and collate the next batches while the GPU trains (`host_workers`): without them the GPU waits
    for every batch's tokenising. On the CPU 0: there workers would take the cores the training computes on."""
    return int(setting) if setting != "auto" else host_workers() or 0


def trainer_settings(training) -> dict:
    """SentenceTransformerTrainingArguments keywords from the recipe's `training:` block (None = defaults). Loss
    values are not checked for NaN at every step (`logging_nan_inf_filter`: two host syncs per loss component and
    step on a GPU); a NaN loss shows in the logs as it is."""
    workers = dataloader_workers("auto" if training is None else training.dataloader_num_workers)
    settings = {"logging_nan_inf_filter": False, "dataloader_num_workers": workers,
                "dataloader_persistent_workers": workers > 0}
    if training is None:
        return {"report_to": "none", **precision_flags("fp32"), **settings}
    return {
        **precision_flags(training.precision),
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "report_to": training.report_list(),
        **settings,
    }


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
    training=None,
    progress: bool = True,
    evaluator=None,
    callbacks: list | None = None,
) -> dict[str, float]:
    """Train `model` in place on `dataset`, resuming from the newest complete checkpoint under `workdir` if any.
    About `checkpoints` checkpoints are written over the stage; only the last complete one is kept. With
    `block_size`, the dataset is consecutive epochs of `block_size` rows each (fresh negatives per epoch) read
    block after block (`prod_st.training.resampling`). Queries and documents get the model's own prompts / Router routes.
    `training`: the recipe's `training:` block (precision, gradient accumulation, dataloader workers, report_to);
    None = its defaults. `max_steps` counts optimizer steps; without it, `epochs` passes over one block. Either
    way the trainer is given its steps (`prod_st.training.steps.plan_steps`, which counts every process's batches), and
    under torchrun every rank reads equal batches (`EpochBlockBatchSampler`). `evaluator` (a RetrievalEvaluator
    on dev) is the trainer's, run when the arguments set an eval_strategy. `callbacks`: more TrainerCallbacks, after
    the checkpointing one (bench/gpu_throughput.py times steps with one)."""
    accumulation = training.gradient_accumulation_steps if training is not None else 1
    block_size = block_size or len(dataset)
    total = plan_steps(block_size, batch_size, epochs=epochs, max_steps=max_steps, accumulation=accumulation,
                       in_batch=no_duplicates).steps
    args = SentenceTransformerTrainingArguments(
        output_dir=str(workdir),
        num_train_epochs=epochs,
        max_steps=total,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        warmup_steps=warmup_ratio,  # a float < 1 is a ratio of the total steps (transformers 5)
        max_grad_norm=2.0,  # PROD's gradient clip
        seed=seed,
        data_seed=seed,
        save_strategy="steps",
        save_steps=max(1, total // checkpoints),
        save_total_limit=None,  # CompleteCheckpoints rotates, after the new checkpoint is complete
        logging_steps=max(1, total // 10),
        disable_tqdm=not progress,
        **trainer_settings(training),
        batch_sampler=functools.partial(EpochBlockBatchSampler, block_size=block_size, no_duplicates=no_duplicates),
        dataloader_drop_last=False,
        **training_roles(model, dataset.column_names),
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss,
                                         evaluator=evaluator, callbacks=[CompleteCheckpoints(workdir), *(callbacks or ())])
    last = last_complete_checkpoint(workdir)
    if is_main():
        prune_checkpoints(workdir, keep=last)  # half-written ones from a kill, and older complete ones
    barrier()
    if last:
        logger.info("resuming training from %s", last)
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    return {"steps": result.global_step, "train_loss": result.training_loss}


def train_stage(student, dataset, loss, folder: Path, spec, name: str, seconds: dict, *, training, seed: int,
                no_duplicates: bool, block_size: int | None = None, progress: bool = True, evaluator=None,
                callbacks: list | None = None) -> dict:
    """One stage's (or DPD round's) training with its optimisation settings (`spec`: lr, epochs, max_steps,
    batch_size, warmup_ratio), checkpoints under `<folder>/checkpoints`: its steps from `plan_steps` (every
    process's batches), a cost line, then `train_student`. `block_size`: the dataset holds consecutive epochs of
    that many rows (`prod_st.training.resampling`)."""
    rows = block_size or len(dataset)
    plan = plan_steps(rows, spec.batch_size, epochs=spec.epochs, max_steps=spec.max_steps,
                      accumulation=training.gradient_accumulation_steps, in_batch=no_duplicates,
                      what=f"stage {name!r}")
    steps = plan.steps
    frozen = getattr(loss, "previous_model", None)  # PRODLoss's frozen stage-start student, if online
    cost.announce(f"{name}: train", steps * plan.global_batch, f"rows read ({steps:,} steps, {plan.describe()})",
                  cost.training_bytes(student) + (cost.model_bytes(frozen) if frozen is not None else 0))
    with cost.step(f"{name}: train ({rows} queries, {steps} steps)", seconds, "train"), writing(folder / "checkpoints"):
        return train_student(
            student, dataset, loss, workdir=folder / "checkpoints", lr=spec.lr, epochs=spec.epochs, max_steps=steps,
            batch_size=spec.batch_size, warmup_ratio=spec.warmup_ratio, seed=seed, no_duplicates=no_duplicates,
            block_size=block_size, training=training, progress=progress, evaluator=evaluator, callbacks=callbacks,
        )
