"""The PROD schedule: recipe -> stages (mine -> score -> [DPD filter] -> train -> evaluate) -> report.

Run folder (what resume reads; prod_st.run.run_folder owns its rules):
    <run>/.prod-st-run        prod-st's marker: only a folder with it is resumed, or cleared by --force
    <run>/recipe.yaml         the resolved recipe; a recipe of another name refuses to run here
    <run>/00-init/            the untrained student (first k layers) and its dev metrics
    <run>/NN-<stage>/         FINGERPRINT, negatives.json, train_data/ (rows + teacher labels), row_ids.arrow
                              (those rows as query / corpus ids: prod-st export), checkpoints/, student/,
                              metrics.json, DONE
    <run>/teachers/<name>/    a teacher trained in the run (model/) and its dev metrics
    <run>/student/            the final student, a SentenceTransformer folder
    <run>/final.json          test metrics; <run>/report.md, report.png
    <run>/run.log             every log line of every run and resume in this folder, appended

Each step is a short call into the module that does it: the run's data (stage_data), mining and the draw of
fresh negatives per epoch (mining, resampling), the teachers: built, labels, strength (teachers.pool,
teachers.labels, teachers.strength), training (student_training, losses), the DPD rule (dpd), evaluation
(retrieval_evaluator, evaluation), the report and card (report, model_card, publish). The Runner holds the
schedule and the run folder's bookkeeping.

A step whose DONE marker exists is skipped; mining and teacher work are cached by content (model
fingerprint + texts), and training resumes from the stage's last complete checkpoint, so a killed run picks
up where it stopped. A changed recipe redoes the first step it changes and every later one. Only rank 0
writes run files.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer

from prod_st import __version__
from prod_st.retrieval import corpus_index
from prod_st.util import cost, locks
from prod_st.run import run_folder
from prod_st.util.distributed import all_gather, barrier, is_main, launched_group, world_size
from prod_st.training.dpd import decided_by_student, select_queries, teacher_rankings
from prod_st.util.errors import ProdStError
from prod_st.retrieval.evaluation import evaluate_beir, evaluate_model
from prod_st.training.losses import PRODLoss, contrastive_loss, score_scale
from prod_st.retrieval.mining import NegativeWindow, mine_pools, retrieve_ranked
from prod_st.run.model_card import save_stage_card
from prod_st.util.models import build_student, set_lengths
from prod_st.util.paths import write_text_atomic, writes_to, writing
from prod_st.util.precision import resolve_precision
from prod_st.training.resampling import epoch_rows
from prod_st.run.run_log import RunLog
from prod_st.retrieval.retrieval_evaluator import RetrievalEvaluator
from prod_st.data.doc_ids import doc_ids
from prod_st.training.stage_data import ROW_IDS, TrainingRows, build_rows, labelled_dataset, load_run_data, write_row_ids
from prod_st.training.steps import plan_steps
from prod_st.training.student_training import train_student
from prod_st.teachers import BiEncoderTeacher
from prod_st.teachers.cache import release_embedding_cache
from prod_st.teachers.labels import stage_labels
from prod_st.teachers.pool import TeacherPool
from prod_st.teachers.strength import reranker_as, strength_warnings, teacher_gap, teacher_metrics, top_candidates

logger = logging.getLogger("prod_st.run")
RERANK_CHUNK = 4096  # training queries DPD's teacher reranks at a time: memory holds one chunk's texts and scores


def atomic_json(path: Path, payload) -> None:
    """Write JSON to a temp file and rename it into place: a killed process never leaves half a file."""
    write_text_atomic(path, json.dumps(payload, indent=2, default=float) + "\n")


def write_json(path: Path, payload) -> None:
    """Rank 0 writes `path`; every rank calls this and returns once the file is there (a barrier), so any
    rank may read it next."""
    if is_main():
        atomic_json(path, payload)
    barrier()


@contextmanager
def step(what: str, seconds: dict, key: str):
    """Log one line per step with its duration, and record the duration under `seconds[key]`."""
    start = time.perf_counter()
    yield
    seconds[key] = round(time.perf_counter() - start, 1)
    logger.info("%s: done in %.1fs", what, seconds[key])


@dataclass
class StageRecord:
    """What a finished stage leaves in its metrics.json (and what the report reads)."""

    index: int
    name: str
    kind: str
    teacher: str | None = None
    student_dev: dict = field(default_factory=dict)
    teacher_dev: dict = field(default_factory=dict)
    teacher_measured_as: str | None = None
    teacher_rerank_dev: dict = field(default_factory=dict)  # the teacher reranking the student's dev top-k
    gap_before: dict = field(default_factory=dict)
    gap_after: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    selection: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)


class Runner:
    def __init__(self, recipe, run_dir: Path | None = None, *, force: bool = False, progress: bool = True) -> None:
        self.recipe = recipe
        self.dir = Path(run_dir) if run_dir else recipe.run_dir()
        self.force = force
        self.progress = progress  # the trainer's progress bars (off: --no-progress)
        self.stage_start_cache: Path | None = None  # the cache folder release_stage_start removes
        self.lock: locks.RunLock | None = None  # rank 0's hold on the run folder, for the run's life

    # ---- run folder ----------------------------------------------------------------------------------
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
            if ours and self.force:
                removed = run_folder.clear(self.dir)
                logger.info("--force: removed the earlier run (%s) from %s", ", ".join(removed), self.dir)
            if not ours or self.force:
                logger.info("new run in %s", self.dir)
                run_folder.create(self.dir, self.recipe.name)
            run_folder.reconcile(self.dir, self.recipe, self.plan)
            write_text_atomic(self.dir / "recipe.yaml", self.recipe.run_yaml())
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
        r = self.recipe
        final = run_folder.final_payload(self.dir, self.plan.final)
        if final is None:
            final = self.run_steps(started)
        else:
            logger.info("run already finished: %s", self.dir)
        from prod_st.run.report import write_report

        write_report(self.dir)
        if is_main() and (self.dir / "student" / "modules.json").is_file():
            from prod_st.run.model_card import write_card

            write_card(self.dir, self.dir / "student")  # the card `prod-st push` publishes
        barrier()
        if r.publish is not None and run_folder.marker(self.dir).get("published") != self.plan.publish:
            from prod_st.publish.push import push_run

            p = r.publish
            where = push_run(self.dir, p.repo_id, private=p.private, exist_ok=p.exist_ok, dry_run=p.dry_run)
            if is_main():
                run_folder.write_marker(self.dir, run_folder.marker(self.dir) | {"published": self.plan.publish})
            barrier()
            logger.info("published: %s", where)
        return final

    def run_steps(self, started: float) -> dict:
        """Every step not finished yet, then the final test evaluation (final.json)."""
        r = self.recipe
        d = r.data
        with step("load data", {}, "data"):
            self.data = load_run_data(  # an evaluate-only recipe reads no train split, and maybe no dev split
                d.dataset, splits=(d.train_split if r.trains else None, d.dev_split, d.test_split),
                sizes=(d.train_queries, d.dev_queries, d.test_queries), corpus_size=d.corpus_size,
                seed=r.seed if d.seed is None else d.seed,
                answer_positives=d.positives == "answers",
            )
        if r.training.precision == "auto":
            logger.info("training.precision auto: %s on this machine", resolve_precision("auto"))
        self.teachers = TeacherPool(r.teachers, self.data, folder=self.dir / "teachers", seed=r.seed,
                                    eval_batch_size=r.eval.batch_size, index=r.eval.index,
                                    corpus_dtype=r.eval.corpus_dtype, index_train_size=r.eval.index_train_size,
                                    search_backend=r.eval.search,
                                    precision=resolve_precision(r.training.precision))
        records = [self.init_stage()]
        for i, stage in enumerate(r.stages, 1):
            records.append(self.run_stage(i, stage, records))
        if r.dpd is not None:
            for round_no in range(1, r.dpd.rounds + 1):
                records.append(self.run_dpd(len(records), round_no, records))
        return self.finish(records, time.perf_counter() - started)

    def stage_dir(self, index: int, name: str) -> Path:
        return self.dir / f"{index:02d}-{name}"

    def load_student(self, folder: Path) -> SentenceTransformer:
        """A step's student, cutting queries and documents at the recipe's lengths (a student saved by an older
        prod-st has no query length of its own)."""
        model = SentenceTransformer(str(folder / "student"))
        set_lengths(model, self.recipe.student.max_query_length, self.recipe.student.max_doc_length)
        return model

    def done(self, folder: Path) -> StageRecord | None:
        """The record of a finished step (prepare_folder kept its folder only if it matches the recipe), or None:
        then the step starts, and its folder records the fingerprint it runs under."""
        names = list(self.plan.steps)
        logger.info("stage %d of %d: %s", names.index(folder.name) + 1, len(names) + 1, folder.name)
        if (folder / "DONE").exists():
            logger.info("%s: finished earlier, skipped", folder.name)
            return StageRecord(**json.loads((folder / "metrics.json").read_text()))
        if is_main():
            write_text_atomic(folder / run_folder.FINGERPRINT, self.plan.steps[folder.name] + "\n")
        barrier()
        return None

    def finish_stage(
        self, folder: Path, student: SentenceTransformer, record: StageRecord, start: tuple[Path, str] | None = None
    ) -> StageRecord:
        """Save the stage's student and metrics, release what only its start needed, then mark it DONE.
        `start`: the folder of the student the stage started from and that student's corpus cache key."""
        if is_main():
            with writing(folder / "student"):
                student.save(str(folder / "student"))
            save_stage_card(student, folder, record.name, self.recipe.data.dataset)
        write_json(folder / "metrics.json", record.__dict__)
        self.release_stage_start(start, student)  # before DONE: a stage killed before it resumes with its caches
        if is_main():
            (folder / "DONE").write_text("")
        barrier()
        for warning in record.warnings:
            logger.warning("%s: %s", record.name, warning)
        return record

    def release_stage_start(self, start: tuple[Path, str] | None, student: SentenceTransformer) -> None:
        """What no later step reads, as every later step starts from another student: the stage-start
        student's cached embeddings (kept when a teacher has the same weights: its cache is the same folder),
        and its cached corpus encoding (kept for the untrained student, and when the stage left the student as
        it was: the test searches with the untrained student and the last one only)."""
        folder, self.stage_start_cache = self.stage_start_cache, None
        if folder is not None and folder not in self.teachers.cache_folders() and release_embedding_cache(folder):
            logger.info("pruned the stage-start student's cached embeddings (%s)", folder.name[:12])
        if start is not None and start[0].name != "00-init":
            if start[1] != self.corpus_key(student):
                corpus_index.release(start[1])

    def evaluate_dev(self, student: SentenceTransformer, folder: Path, seconds: dict) -> dict:
        """Dev metrics of the student; its dev run (top `teacher_rerank_depth`) is kept for teacher checks."""
        e = self.recipe.eval
        cost.search_cost(f"{folder.name}: dev evaluation", student, len(self.data.corpus),
                         len(self.data.dev.qrels), e.top_k)
        with step(f"{folder.name}: dev evaluation", seconds, "eval"):
            evaluator = self.dev_evaluator()
            evaluator(student)  # the metrics go into the student's card data too
            result = evaluator.last_result
        run = top_candidates(result.run, e.teacher_rerank_depth)
        scores = {q: {doc: result.run[q][doc] for doc in docs} for q, docs in run.items()}
        write_json(folder / "dev_run.json", scores)
        logger.info("%s: student dev %s", folder.name, _fmt(result.metrics))
        return result.metrics

    def dev_evaluator(self) -> RetrievalEvaluator:
        e = self.recipe.eval
        return RetrievalEvaluator(self.data.dev, metric=e.metric, top_k=e.top_k, **self.corpus_search(),
                                  relevance_level=self.recipe.data.relevance_level, progress=True)

    def corpus_search(self) -> dict:
        """How every step searches the corpus: the recipe's index, its training sample size and search backend, the
        encoding batch size and the dtype of the cached corpus embeddings (`build_index`'s settings)."""
        e = self.recipe.eval
        return dict(index_factory=e.index, batch_size=e.batch_size, dtype=e.corpus_dtype,
                    index_train_size=e.index_train_size, search_backend=e.search)

    def corpus_key(self, student: SentenceTransformer) -> str:
        """The cache key of `student`'s corpus encoding (what `release_stage_start` may remove)."""
        return corpus_index.cache_key(student, self.data.corpus, self.recipe.eval.corpus_dtype)

    def dev_run(self, folder: Path) -> dict:
        return json.loads((folder / "dev_run.json").read_text())

    # ---- stage 0: the student before training --------------------------------------------------------
    def init_stage(self) -> StageRecord:
        folder = self.stage_dir(0, "init")
        if record := self.done(folder):
            return record
        s = self.recipe.student
        record = StageRecord(0, "init", "init")
        with step("init: build the student", record.seconds, "build"):
            student = build_student(s.init, s.num_layers, pooling=s.pooling, similarity=s.similarity)
            set_lengths(student, s.max_query_length, s.max_doc_length)
        if self.data.dev is not None:  # (only an evaluate-only recipe may have no dev split)
            record.student_dev = self.evaluate_dev(student, folder, record.seconds)
        return self.finish_stage(folder, student, record)

    # ---- warm-up and distillation stages -------------------------------------------------------------
    def run_stage(self, index: int, stage, records: list[StageRecord]) -> StageRecord:
        folder = self.stage_dir(index, stage.name)
        if record := self.done(folder):
            return record
        previous_folder = self.stage_dir(records[-1].index, records[-1].name)
        student = self.load_student(previous_folder)
        start = (previous_folder, self.corpus_key(student))
        record = StageRecord(index, stage.name, stage.kind, teacher=stage.teacher)
        in_batch = stage.candidates == "in_batch" or stage.kind == "warmup"  # every passage of the batch
        rows, reads = self.stage_rows(stage, student, index, folder, record, in_batch=in_batch)
        if stage.kind == "warmup":
            loss = contrastive_loss(student, gather_across_devices=world_size() > 1)
            dataset = labelled_dataset(folder / "train_data", rows, None)
        else:
            self.check_teacher(stage.teacher, student, previous_folder, record, records, stage.loss.temperature)
            with step(f"{stage.name}: teacher scores ({stage.teacher})", record.seconds, "score"):
                labels = self.labels(stage.teacher, rows, stage.candidates, student, stage.loss)
                dataset = labelled_dataset(folder / "train_data", rows, labels)
            self.keep_row_ids(folder, rows, stage.teacher, stage.candidates)
            loss = self.prod_loss(student, stage.candidates, stage.loss)
        record.train = self.train(student, dataset, loss, folder, stage, record, no_duplicates=in_batch,
                                  block_size=len(rows.queries) // reads)
        record.student_dev = self.evaluate_dev(student, folder, record.seconds)
        if stage.teacher:
            record.gap_after, _ = self.measure_gap(stage.teacher, folder, stage.loss.temperature, student)
        return self.finish_stage(folder, student, record, start)

    def stage_rows(
        self, stage, student, index: int, folder: Path, record: StageRecord, *, in_batch: bool
    ) -> tuple[TrainingRows, int]:
        """Mine the stage's negative pools with its miner, then draw fresh negatives for every epoch training
        will read (PROD resamples each time a query is read): the rows of epoch 0, then epoch 1, ... and the
        number of epochs. Hardest-first negatives are the same every epoch: one block, read repeatedly. With
        `in_batch` candidates a query short of negatives is dropped (in-batch columns cannot be masked)."""
        neg = stage.negatives
        window = NegativeWindow(neg.start, neg.end, neg.count, neg.strategy)
        cost.search_cost(f"{stage.name}: mine negatives", student, len(self.data.corpus),
                         len(self.data.train.qrels), neg.end)
        with step(f"{stage.name}: mine negatives ({neg.miner}, ranks {neg.start}-{neg.end})", record.seconds, "mine"):
            miner = self.teachers.miner_model(neg.miner, student)
            pools, qrels = mine_pools(miner, self.data.train, window, relevance=self.data.relevance,
                                      **self.corpus_search())
        rows, plan = epoch_rows(
            self.data, pools, qrels, window, seed=self.recipe.seed + index, epochs=stage.epochs,
            batch_size=stage.batch_size, accumulation=self.recipe.training.gradient_accumulation_steps,
            max_steps=stage.max_steps, drop_incomplete=in_batch, what=f"stage {stage.name!r}",
        )
        if plan is None:
            raise ProdStError(f"stage {stage.name!r}: no training query has a judged positive and negatives")
        reads = len(rows.queries) // plan.rows
        write_json(folder / "negatives.json", {"epochs": reads, "queries": len(pools)})  # (the pools: the cached run)
        logger.info("%s: %d queries, negatives drawn afresh for each of %d epochs", stage.name, plan.rows, reads)
        return rows, reads

    def train(self, student, dataset, loss, folder: Path, spec, record: StageRecord, *, no_duplicates: bool,
              block_size: int | None = None) -> dict:
        """Train with the stage's (or DPD's) optimisation settings; checkpoints under <stage>/checkpoints.
        `block_size`: the dataset holds consecutive epochs of that many rows (`prod_st.training.resampling`)."""
        rows = block_size or len(dataset)
        training = self.recipe.training
        plan = plan_steps(rows, spec.batch_size, epochs=spec.epochs, max_steps=spec.max_steps,
                          accumulation=training.gradient_accumulation_steps, in_batch=no_duplicates,
                          what=f"stage {record.name!r}")
        steps = plan.steps
        frozen = getattr(loss, "previous_model", None)  # PRODLoss's frozen stage-start student, if online
        cost.announce(f"{record.name}: train", steps * plan.global_batch, f"rows read ({steps:,} steps, "
                      f"{plan.describe()})",
                      cost.training_bytes(student) + (cost.model_bytes(frozen) if frozen is not None else 0))
        with step(f"{record.name}: train ({rows} queries, {steps} steps)", record.seconds, "train"), \
                writing(folder / "checkpoints"):
            return train_student(
                student, dataset, loss, workdir=folder / "checkpoints", lr=spec.lr, epochs=spec.epochs,
                max_steps=steps, batch_size=spec.batch_size, warmup_ratio=spec.warmup_ratio,
                seed=self.recipe.seed, no_duplicates=no_duplicates, block_size=block_size, training=training,
                progress=self.progress, evaluator=self.dev_evaluator(),
            )

    def prod_loss(self, student: SentenceTransformer, candidates: str, spec) -> PRODLoss:
        previous = None
        if spec.reg_weight > 0 and candidates == "in_batch":
            # the frozen stage-start student, run online (list mode gets its scores precomputed in the labels)
            previous = copy.deepcopy(student)
        return PRODLoss(
            student, candidate_mode=candidates, temperature=spec.temperature, hard_weight=spec.hard_weight,
            kd_weight=spec.kd_weight, reg_weight=spec.reg_weight,  # the student's own similarity and scale
            previous_model=previous, gather_across_devices=world_size() > 1,
        )

    def stage_start_documents(self, student: SentenceTransformer) -> Callable[[np.ndarray], np.ndarray] | None:
        """Corpus rows -> `student`'s document vectors, read from its cached corpus encoding (built by this
        stage's mining or the last dev evaluation; encoded again, shared across ranks, only if it was pruned)."""
        search = self.corpus_search()
        blocks = corpus_index.corpus_embeddings(student, self.data.corpus, batch_size=search["batch_size"],
                                                dtype=search["dtype"], progress=self.progress)
        return partial(corpus_index.rows_of, blocks)

    def labels(
        self, teacher_name: str, rows: TrainingRows, candidates: str, student, loss_spec
    ) -> Iterator[np.ndarray]:
        """The loss's label column from the teacher (`prod_st.teachers.labels`); the stage-start student's
        cache it reads, if any, is released when the stage ends. With PROD's regularisation (list mode) the
        stage-start student's document vectors come from its corpus encoding, by row."""
        reg = candidates == "list" and loss_spec.reg_weight > 0
        documents = self.stage_start_documents(student) if reg else None
        labels, self.stage_start_cache = stage_labels(
            self.teachers.get(teacher_name), self.teachers.scale(teacher_name), rows, candidates, student,
            loss_spec.reg_weight, name=teacher_name, student_documents=documents,
        )
        return labels

    def keep_row_ids(self, folder: Path, rows: TrainingRows, teacher: str, candidates: str) -> None:
        """What `prod-st export` needs beside train_data: the rows' query and corpus ids, and what the label
        column holds (the teacher, its kind, the scale its scores were multiplied by, the candidate mode).
        Written after train_data; read by nothing in the run, so no fingerprint depends on it."""
        if is_main():
            write_row_ids(folder / ROW_IDS, rows, doc_ids(self.data.corpus), {
                "teacher": teacher, "kind": self.recipe.teachers[teacher].kind,
                "scale": float(self.teachers.scale(teacher)), "candidates": candidates,
            })
        barrier()

    # ---- teacher checks: is the teacher stronger than the student it teaches? -------------------------
    def check_teacher(
        self, name: str, student, previous_folder: Path, record: StageRecord, records, temperature: float
    ) -> object:
        with step(f"{record.name}: teacher {name!r} ready and measured on dev", record.seconds, "teacher"):
            teacher = self.teachers.get(name, student)
            record.gap_before, record.teacher_rerank_dev = self.measure_gap(name, previous_folder, temperature, None)
            if isinstance(teacher, BiEncoderTeacher):
                record.teacher_dev, record.teacher_measured_as = self.retriever_dev_metrics(name), "retriever"
            else:  # a reranker is measured on the candidates the gap was just measured on
                record.teacher_dev = record.teacher_rerank_dev
                record.teacher_measured_as = reranker_as(self.recipe.eval.teacher_rerank_depth)
        metric = self.recipe.eval.metric
        logger.info("%s: teacher %r dev %s (as %s) vs student %.4f", record.name, name, _fmt(record.teacher_dev),
                    record.teacher_measured_as, records[-1].student_dev[metric])
        previous = None
        earlier = [r.teacher for r in records if r.teacher]
        if earlier and earlier[-1] != name:  # like with like: both rerank this student's dev top-k
            previous = (earlier[-1], self.measure_gap(earlier[-1], previous_folder, temperature, None)[1][metric])
        record.warnings += strength_warnings(
            name, metric, teacher=record.teacher_dev[metric], measured_as=record.teacher_measured_as,
            student=records[-1].student_dev[metric], reranking=record.teacher_rerank_dev[metric], previous=previous,
        )
        return teacher

    def retriever_dev_metrics(self, name: str) -> dict:
        """A bi-encoder teacher's dev metrics as a retriever over the corpus (cached in the run: they do not
        depend on the student)."""
        e = self.recipe.eval
        cached = self.dir / "teachers" / name / "dev_metrics.json"
        if not all(all_gather(cached.exists())):  # every rank takes its share of the evaluation
            _, metrics = teacher_metrics(
                self.teachers.get(name), self.data.dev, self.data, None, depth=e.teacher_rerank_depth,
                relevance_level=self.recipe.data.relevance_level, top_k=e.top_k, **self.corpus_search(),
            )
            write_json(cached, metrics)
        return json.loads(cached.read_text())

    def measure_gap(self, name: str, student_folder: Path, temperature: float, student) -> tuple[dict, dict]:
        """KL and rank agreement between teacher and student over the student's dev top-k, and the teacher's
        metrics as a reranker of that top-k."""
        return teacher_gap(
            self.teachers.get(name), self.dev_run(student_folder), self.data.dev, self.data,
            depth=self.recipe.eval.teacher_rerank_depth, teacher_scale=self.teachers.scale(name),
            student_scale=score_scale(student if student is not None else self.load_student(student_folder)),
            temperature=temperature, relevance_level=self.recipe.data.relevance_level,
        )

    # ---- data progressive distillation ---------------------------------------------------------------
    def run_dpd(self, index: int, round_no: int, records: list[StageRecord]) -> StageRecord:
        spec = self.recipe.dpd
        name = f"dpd-{round_no}"
        folder = self.stage_dir(index, name)
        if record := self.done(folder):
            return record
        previous_folder = self.stage_dir(records[-1].index, records[-1].name)
        student = self.load_student(previous_folder)
        start = (previous_folder, self.corpus_key(student))
        record = StageRecord(index, name, "dpd", teacher=spec.teacher)
        teacher = self.check_teacher(spec.teacher, student, previous_folder, record, records, spec.loss.temperature)
        queries = self.data.train.split_queries()
        cost.search_cost(f"{name}: student retrieval", student, len(self.data.corpus), len(queries), spec.rerank_depth)
        with step(f"{name}: student top-{spec.rerank_depth} on {len(queries)} training queries", record.seconds, "mine"):
            ranked = retrieve_ranked(student, self.data.train, queries, top_k=spec.rerank_depth,
                                     **self.corpus_search())
        qrels, rule = self.data.relevance(ranked), spec.rule.model_dump()
        asked, selection = decided_by_student(ranked, qrels, **rule)  # the others: the student's rank alone
        cost.announce(f"{name}: teacher rerank of the {len(asked)} of {len(ranked)} queries the rule asks it about",
                      int((ranked.rows[ranked.positions(asked)] >= 0).sum()), "pairs",
                      cost.run_bytes(min(len(asked), RERANK_CHUNK), spec.rerank_depth) * 2)
        pool = spec.rerank_depth if spec.negatives == "sample" else spec.num_negatives  # what a kept query keeps
        with step(f"{name}: teacher reranks them", record.seconds, "score"):
            for first in range(0, len(asked), RERANK_CHUNK):  # memory holds one chunk's ranked lists
                chunk = {q: ranked[q] for q in asked[first:first + RERANK_CHUNK]}
                scores = teacher.score([queries[q] for q in chunk], self.data.doc_texts_per_query(chunk.values()))
                selection.update(select_queries(chunk, teacher_rankings(chunk, scores), qrels,
                                                num_negatives=pool, **rule))
        record.selection = dict(selection.counts)
        write_json(folder / "selection.json", {"counts": selection.counts, "kept": selection.kept})
        logger.info("%s: kept %d of %d training queries %s", name, len(selection.kept), len(ranked), selection.counts)
        if not selection.kept:
            record.warnings.append("no training query passed the DPD rule: nothing to train on")
            record.student_dev = records[-1].student_dev
            write_json(folder / "dev_run.json", self.dev_run(previous_folder))
            return self.finish_stage(folder, student, record, start)
        rows, block_size = self.dpd_rows(selection.kept, qrels, index, folder)
        with step(f"{name}: teacher scores", record.seconds, "score_rows"):
            labels = self.labels(spec.teacher, rows, "list", student, spec.loss)
            dataset = labelled_dataset(folder / "train_data", rows, labels)
        self.keep_row_ids(folder, rows, spec.teacher, "list")
        loss = self.prod_loss(student, "list", spec.loss)
        record.train = self.train(student, dataset, loss, folder, spec, record, no_duplicates=False,
                                  block_size=block_size)
        record.student_dev = self.evaluate_dev(student, folder, record.seconds)
        record.gap_after, _ = self.measure_gap(spec.teacher, folder, spec.loss.temperature, student)
        return self.finish_stage(folder, student, record, start)

    def dpd_rows(self, pools: dict[str, list[str]], qrels, index: int, folder: Path) -> tuple[TrainingRows, int | None]:
        """DPD's training rows from the kept queries' near-miss pools, and the block size training reads them in.
        `negatives: sample` (PROD's release): `num_negatives` drawn afresh from the pool for every epoch training
        will read, as the stages do (`epoch_rows`); `hardest`: the pool's first `num_negatives`, one block read
        repeatedly (block size None: the whole dataset, as before issue 20)."""
        spec = self.recipe.dpd
        if spec.negatives == "hardest":
            return build_rows(self.data, pools, spec.num_negatives, qrels=qrels), None
        window = NegativeWindow(1, spec.rerank_depth, spec.num_negatives, "sample")
        rows, plan = epoch_rows(
            self.data, pools, qrels, window, seed=self.recipe.seed + index, epochs=spec.epochs,
            batch_size=spec.batch_size, accumulation=self.recipe.training.gradient_accumulation_steps,
            max_steps=spec.max_steps, drop_incomplete=False, what=f"dpd {folder.name!r}",
        )
        reads = len(rows.queries) // plan.rows if plan is not None else 1
        write_json(folder / "negatives.json", {"epochs": reads, "queries": len(pools)})
        logger.info("%s: %d queries, negatives drawn afresh from their near-miss pools for each of %d epochs",
                    folder.name, len(rows.queries) // reads, reads)
        return rows, len(rows.queries) // reads

    # ---- final test evaluation -----------------------------------------------------------------------
    def finish(self, records: list[StageRecord], seconds: float) -> dict:
        last = self.stage_dir(records[-1].index, records[-1].name)
        if is_main():
            if (self.dir / "student").exists():
                shutil.rmtree(self.dir / "student")
            shutil.copytree(last / "student", self.dir / "student")
        e, test = self.recipe.eval, self.data.test
        level = self.recipe.data.test_relevance_level or self.recipe.data.relevance_level
        kwargs = dict(top_k=e.top_k, relevance_level=level, **self.corpus_search())
        timing: dict = {}
        logger.info("stage %d of %d: final test", len(self.plan.steps) + 1, len(self.plan.steps) + 1)
        student = self.load_student(last)
        cost.search_cost("final: test evaluation", student, len(test.corpus), len(test.qrels or test.answers), e.top_k)
        with step("final: test evaluation", timing, "test"):
            final = evaluate_model(student, test, keep_run=True, **kwargs)
            tested = {"student": final.metrics}
            if len(records) > 1:  # (an evaluate-only run has one student, tested as it is)
                initial = evaluate_model(self.load_student(self.stage_dir(0, "init")), test, **kwargs)
                tested["student_before_training"] = initial.metrics
            teachers = {}
            used = [s.teacher for s in self.recipe.stages if s.teacher]
            used += [self.recipe.dpd.teacher] if self.recipe.dpd else []
            for name in dict.fromkeys(used):  # built (or loaded from the cache) when a resumed run skipped them
                measured_as, metrics = teacher_metrics(self.teachers.get(name), test, self.data, final.run,
                                                       depth=e.teacher_rerank_depth, **kwargs)
                teachers[name] = {"as": measured_as, **metrics}
        beir = {}
        if e.beir:
            with step(f"final: zero-shot BEIR ({', '.join(e.beir)})", timing, "beir"):
                beir = evaluate_beir(self.load_student(last), list(e.beir), **kwargs | {"relevance_level": 1})
        payload = {
            "recipe": self.recipe.name,
            "fingerprint": self.plan.final,  # what prod_st.run.run_folder compares on a rerun
            "beir": beir,
            "test": tested | {"teachers": teachers},
            "num_test_queries": final.num_queries,
            "num_docs": final.num_docs,
            "seconds": {"run": round(seconds + sum(timing.values()), 1), **timing},
        }
        write_json(self.dir / "final.json", payload)
        before = tested.get("student_before_training")
        logger.info("final test: student %s%s", _fmt(final.metrics), f" (before training {_fmt(before)})" if before else "")
        return payload


def _fmt(metrics: dict) -> str:
    from prod_st.run.report import metric_columns

    return ", ".join(f"{k} {metrics[k]:.4f}" for k in metric_columns([metrics]) if k in metrics)

