"""The PROD schedule: recipe -> stages (mine -> score -> [DPD filter] -> train -> evaluate) -> report.

    init        the student: the first k layers of its base model, measured on dev
    stage i     mine fresh negatives with the current model; the teacher (checked stronger than the student)
                scores them; train from the last stage's student; measure on dev          (warm-up: no teacher)
    dpd-r       the strongest teacher reranks the student's training run; train on the near misses
    final       test metrics (final.json), report.md, the model card; publish if the recipe asks

Each step is one call into the package that owns it: the run's data (training.stage_data), mining and the draw
of fresh negatives per epoch (training.resampling), the teachers (teachers.pool, .labels, .strength), DPD
(training.dpd), training (training.student_training, training.losses), evaluation (retrieval.retrieval_evaluator,
run.final), the run folder and its records (run.run_folder, run.records), the report and card (run.report,
run.model_card, publish.push). What a run folder holds: `prod_st/run/run_folder.py`.

A step whose DONE marker exists is skipped; mining and teacher work are cached by content (model fingerprint +
texts), and training resumes from the stage's last complete checkpoint, so a killed run picks up where it
stopped. A changed recipe redoes the first step it changes and every later one. Only rank 0 writes run files.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from prod_st import __version__
from prod_st.retrieval.mining import retrieve_ranked
from prod_st.run import run_folder
from prod_st.run.final import final_evaluation
from prod_st.run.records import StageRecord, write_json
from prod_st.run.run_log import RunLog
from prod_st.run.workspace import RunWorkspace
from prod_st.teachers.pool import TeacherPool
from prod_st.training import dpd
from prod_st.training.losses import PRODLoss, contrastive_loss
from prod_st.training.resampling import stage_rows
from prod_st.training.stage_data import labelled_dataset, load_run_data
from prod_st.util import cost, locks
from prod_st.util.distributed import barrier, is_main, launched_group, world_size
from prod_st.util.models import build_student, set_lengths
from prod_st.util.paths import writes_to
from prod_st.util.precision import resolve_precision, set_tf32

logger = logging.getLogger("prod_st.run")


class Runner(RunWorkspace):
    """PROD's schedule over a run folder; the steps' shared state and bookkeeping: `RunWorkspace`."""

    def __init__(self, recipe, run_dir: Path | None = None, *, force: bool = False, progress: bool = True) -> None:
        self.recipe = recipe
        self.dir = Path(run_dir) if run_dir else recipe.run_dir()
        self.force = force
        self.progress = progress  # the trainer's progress bars (off: --no-progress)
        self.stage_start_cache: Path | None = None  # the cache folder release_stage_start removes
        self.lock: locks.RunLock | None = None  # rank 0's hold on the run folder, for the run's life

    def prepare_folder(self) -> None:
        """Before any work: refuse a folder prod-st must not use (one line), make it a run folder of this
        recipe, and remove what a changed recipe invalidates (see prod_st.run.run_folder). `--force` first removes
        the earlier run's own files, and only from a folder prod-st created."""
        self.plan = run_folder.plan(self.recipe)
        if is_main():
            ours = run_folder.check_folder(self.dir, self.recipe.name, force=self.force)
            run_folder.check_writable(self.dir)
            self.lock = locks.lock_run_folder(self.dir)  # a second run into this folder stops here, in one line
            writes_to("the run folder", self.dir)  # (a full disk's error names it)
            run_folder.start(self.dir, self.recipe, self.plan, ours=ours, force=self.force)
        barrier()

    # ---- the schedule --------------------------------------------------------------------------------
    def run(self) -> dict:
        """The whole run, every log line also appended to <run>/run.log. Under torchrun the ranks join the
        process group first and leave it at the end."""
        with launched_group(self.recipe.distributed.timeout_minutes):
            log = RunLog.attach()
            try:
                return self._run(log)
            finally:
                log.close()
                if self.lock is not None:
                    self.lock.release()

    def _run(self, log: RunLog) -> dict:
        started = time.perf_counter()
        self.prepare_folder()
        if is_main():
            log.open(self.dir)
            sets = "".join(f" --set {o}" for o in self.recipe.overrides)
            logger.info("prod-st %s: recipe %s%s in %s", __version__, self.recipe.name, sets, self.dir)
        else:
            log.close()  # one run.log, rank 0's: other ranks keep nothing
        final = run_folder.final_payload(self.dir, self.plan.final)
        if final is None:
            final = self.run_steps(started)
        else:
            logger.info("run already finished: %s", self.dir)
        from prod_st.publish.push import publish_run
        from prod_st.run.report import write_report

        write_report(self.dir)
        if is_main() and (self.dir / "student" / "modules.json").is_file():
            from prod_st.run.model_card import write_card

            write_card(self.dir, self.dir / "student")  # the card `prod-st push` publishes
        barrier()
        publish_run(self.dir, self.recipe.publish, self.plan.publish)
        return final

    def load_data_and_teachers(self, teachers_folder: Path | None = None) -> None:
        """The run's data subsets and its teacher pool (teachers are built on first use), as every step reads
        them; teachers trained here are saved under `teachers_folder` (default: the run's `teachers/`)."""
        r, d = self.recipe, self.recipe.data
        with cost.step("load data", {}, "data"):
            self.data = load_run_data(  # an evaluate-only recipe reads no train split, and maybe no dev split
                d.dataset, splits=(d.train_split if r.trains else None, d.dev_split, d.test_split),
                sizes=(d.train_queries, d.dev_queries, d.test_queries), corpus_size=d.corpus_size,
                seed=r.seed if d.seed is None else d.seed, answer_positives=d.positives == "answers",
            )
        if r.training.precision == "auto":
            logger.info("training.precision auto: %s on this machine", resolve_precision("auto"))
        if set_tf32(r.training.tf32):
            logger.info("training.tf32: fp32 matrix products in TF32 on this GPU")
        e = r.eval
        self.teachers = TeacherPool(r.teachers, self.data, folder=teachers_folder or self.dir / "teachers", seed=r.seed,
                                    eval_batch_size=e.batch_size, index=e.index, corpus_dtype=e.corpus_dtype,
                                    index_train_size=e.index_train_size, search_backend=e.search,
                                    precision=resolve_precision(r.training.precision))

    def run_steps(self, started: float) -> dict:
        """Every step not finished yet, then the final test evaluation (final.json)."""
        r = self.recipe
        self.load_data_and_teachers()
        records = [self.init_stage()]
        for i, stage in enumerate(r.stages, 1):
            records.append(self.run_stage(i, stage, records))
        for round_no in range(1, r.dpd.rounds + 1 if r.dpd else 1):
            records.append(self.run_dpd(len(records), round_no, records))
        last = self.stage_dir(records[-1])
        if is_main():
            shutil.rmtree(self.dir / "student", ignore_errors=True)
            shutil.copytree(last / "student", self.dir / "student")
        logger.info("stage %d of %d: final test", len(self.plan.steps) + 1, len(self.plan.steps) + 1)
        return final_evaluation(r, self.data, self.teachers, self.load_student, last,
                                self.stage_dir(records[0]) if len(records) > 1 else None, fingerprint=self.plan.final,
                                seconds=time.perf_counter() - started, search=self.corpus_search(),
                                out=self.dir / "final.json")

    def init_stage(self) -> StageRecord:
        """Stage 0: the student before training."""
        folder = self.dir / "00-init"
        if record := self.done(folder):
            return record
        s = self.recipe.student
        record = StageRecord(0, "init", "init")
        with cost.step("init: build the student", record.seconds, "build"):
            student = build_student(s.init, s.num_layers, pooling=s.pooling, similarity=s.similarity)
            set_lengths(student, s.max_query_length, s.max_doc_length)
        if self.data.dev is not None:  # (only an evaluate-only recipe may have no dev split)
            record.student_dev = self.evaluate_dev(student, folder, record.seconds)
        return self.finish_stage(folder, student, record)

    def run_stage(self, index: int, stage, records: list[StageRecord]) -> StageRecord:
        """A warm-up or distillation stage: mine -> (check the teacher, score) -> train -> evaluate."""
        folder = self.dir / f"{index:02d}-{stage.name}"
        if record := self.done(folder):
            return record
        previous = self.stage_dir(records[-1])
        student = self.load_student(previous)
        start = (previous, self.corpus_key(student))
        record = StageRecord(index, stage.name, stage.kind, teacher=stage.teacher)
        in_batch = stage.candidates == "in_batch" or stage.kind == "warmup"  # every passage of the batch
        rows, reads, mined = stage_rows(
            lambda: self.teachers.miner_model(stage.negatives.miner, student), student, self.data, stage,
            record.seconds, seed=self.recipe.seed + index, in_batch=in_batch, search=self.corpus_search(),
            accumulation=self.recipe.training.gradient_accumulation_steps)
        write_json(folder / "negatives.json", {"epochs": reads, "queries": mined})  # (the pools: the cached run)
        if stage.kind == "warmup":
            loss = contrastive_loss(student, gather_across_devices=world_size() > 1)
            dataset = labelled_dataset(folder / "train_data", rows, None)
        else:
            self.check_teacher(record, student, previous, records, stage.loss.temperature)
            dataset = self.labelled(folder, record, rows, stage.candidates, student, stage.loss)
            loss = PRODLoss.for_stage(student, stage.candidates, stage.loss, gather_across_devices=world_size() > 1)
        return self.train_and_finish(student, dataset, loss, folder, stage, record, start, no_duplicates=in_batch,
                                     block_size=len(rows.queries) // reads)

    def run_dpd(self, index: int, round_no: int, records: list[StageRecord]) -> StageRecord:
        """A DPD round: the teacher reranks the student's training run; train on the queries DPD keeps."""
        spec, name = self.recipe.dpd, f"dpd-{round_no}"
        folder = self.dir / f"{index:02d}-{name}"
        if record := self.done(folder):
            return record
        previous = self.stage_dir(records[-1])
        student = self.load_student(previous)
        start = (previous, self.corpus_key(student))
        record = StageRecord(index, name, "dpd", teacher=spec.teacher)
        self.check_teacher(record, student, previous, records, spec.loss.temperature)
        queries = self.data.train.split_queries()
        cost.search_cost(f"{name}: student retrieval", student, len(self.data.corpus), len(queries), spec.rerank_depth)
        with cost.step(f"{name}: student top-{spec.rerank_depth} on {len(queries)} training queries", record.seconds,
                       "mine"):
            ranked = retrieve_ranked(student, self.data.train, queries, top_k=spec.rerank_depth,
                                     **self.corpus_search())
        qrels = self.data.relevance(ranked)
        selection = dpd.select_with_teacher(ranked, qrels, self.teachers.get(spec.teacher), self.data, spec, name,
                                            record.seconds)
        record.selection = dict(selection.counts)
        write_json(folder / "selection.json", {"counts": selection.counts, "kept": selection.kept})
        logger.info("%s: kept %d of %d training queries %s", name, len(selection.kept), len(ranked), selection.counts)
        if not selection.kept:
            record.warnings.append("no training query passed the DPD rule: nothing to train on")
            record.student_dev = records[-1].student_dev
            write_json(folder / "dev_run.json", self.dev_run(previous))
            return self.finish_stage(folder, student, record, start)
        rows, block_size = dpd.training_rows(self.data, selection.kept, qrels, spec, seed=self.recipe.seed + index,
                                             accumulation=self.recipe.training.gradient_accumulation_steps, name=name)
        if block_size is not None:
            write_json(folder / "negatives.json", {"epochs": len(rows.queries) // block_size,
                                                   "queries": len(selection.kept)})
        dataset = self.labelled(folder, record, rows, "list", student, spec.loss, key="score_rows")
        loss = PRODLoss.for_stage(student, "list", spec.loss, gather_across_devices=world_size() > 1)
        return self.train_and_finish(student, dataset, loss, folder, spec, record, start, no_duplicates=False,
                                     block_size=block_size)
