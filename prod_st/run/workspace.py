"""What every step of a run shares, beside the schedule (`prod_st.runner`): the run's data, teachers and corpus
search settings, and a step folder's bookkeeping: a finished step's record, a step's dev evaluation, its teacher
labels and row ids, its training, and what it leaves when it ends (student, card, metrics.json, DONE)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sentence_transformers import SentenceTransformer

from prod_st.data.doc_ids import doc_ids
from prod_st.retrieval import corpus_index
from prod_st.retrieval.retrieval_evaluator import RetrievalEvaluator
from prod_st.run import run_folder
from prod_st.run.model_card import save_stage_card
from prod_st.run.records import StageRecord, fmt, write_json
from prod_st.teachers.cache import release_embedding_cache
from prod_st.teachers.labels import stage_labels
from prod_st.teachers.strength import check_teacher, teacher_metrics, top_candidates
from prod_st.training.stage_data import ROW_IDS, TrainingRows, labelled_dataset, write_row_ids
from prod_st.training.student_training import train_stage
from prod_st.util import cost
from prod_st.util.distributed import all_gather, barrier, is_main
from prod_st.util.models import set_lengths
from prod_st.util.paths import write_text_atomic, writing

logger = logging.getLogger("prod_st.run")


class RunWorkspace:
    """The Runner's shared state and step bookkeeping. Set by the Runner: `recipe`, `dir`, `plan` (the run folder's
    fingerprints), `data` (`RunData`), `teachers` (`TeacherPool`), `progress`, `stage_start_cache`."""

    def stage_dir(self, record: StageRecord) -> Path:
        return self.dir / f"{record.index:02d}-{record.name}"

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
            return StageRecord.read(folder)
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

    def train_and_finish(self, student, dataset, loss, folder: Path, spec, record: StageRecord, start, *,
                         no_duplicates: bool, block_size: int | None) -> StageRecord:
        """Train (`train_stage`), measure on dev and the gap to the teacher after training, finish the stage."""
        record.train = train_stage(student, dataset, loss, folder, spec, record.name, record.seconds,
                                   training=self.recipe.training, seed=self.recipe.seed, no_duplicates=no_duplicates,
                                   block_size=block_size, progress=self.progress, evaluator=self.dev_evaluator())
        record.student_dev = self.evaluate_dev(student, folder, record.seconds)
        if record.teacher:
            record.gap_after, _ = self.measure_gap(record.teacher, folder, spec.loss.temperature, student)
        return self.finish_stage(folder, student, record, start)

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

    # ---- dev evaluation and corpus search ------------------------------------------------------------
    def evaluate_dev(self, student: SentenceTransformer, folder: Path, seconds: dict) -> dict:
        """Dev metrics of the student; its dev run (top `teacher_rerank_depth`) is kept for teacher checks."""
        e = self.recipe.eval
        cost.search_cost(f"{folder.name}: dev evaluation", student, len(self.data.corpus),
                         len(self.data.dev.qrels), e.top_k)
        with cost.step(f"{folder.name}: dev evaluation", seconds, "eval"):
            evaluator = self.dev_evaluator()
            evaluator(student)  # the metrics go into the student's card data too
            result = evaluator.last_result
        run = top_candidates(result.run, e.teacher_rerank_depth)
        write_json(folder / "dev_run.json", {q: {doc: result.run[q][doc] for doc in docs} for q, docs in run.items()})
        logger.info("%s: student dev %s", folder.name, fmt(result.metrics))
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

    # ---- teachers: checked, measured, labels ---------------------------------------------------------
    def check_teacher(self, record: StageRecord, student, previous: Path, records, temperature: float) -> None:
        """`teachers.strength.check_teacher` for the stage-start student (its dev run in `previous`) before
        `record.teacher` teaches it: fills the record's teacher fields and warnings."""
        e = self.recipe.eval
        with cost.step(f"{record.name}: teacher {record.teacher!r} ready and measured on dev", record.seconds, "teacher"):
            earlier = [r.teacher for r in records if r.teacher]
            record.__dict__.update(check_teacher(
                self.teachers, record.teacher, record.name, student=student, student_run=self.dev_run(previous),
                student_metric=records[-1].student_dev[e.metric], data=self.data,
                earlier=earlier[-1] if earlier else None, depth=e.teacher_rerank_depth, metric=e.metric,
                temperature=temperature, relevance_level=self.recipe.data.relevance_level,
                retriever_metrics=self.retriever_dev_metrics))

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
        """KL and rank agreement between teacher and the student of `student_folder` (or `student`, its model)
        over its dev top-k, and the teacher's metrics as a reranker of that top-k."""
        from prod_st.teachers.strength import measure_gap

        return measure_gap(self.teachers, name, self.dev_run(student_folder), self.data,
                           student=student if student is not None else self.load_student(student_folder),
                           depth=self.recipe.eval.teacher_rerank_depth, temperature=temperature,
                           relevance_level=self.recipe.data.relevance_level)

    def labels(self, teacher_name: str, rows: TrainingRows, candidates: str, student, loss_spec):
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

    def stage_start_documents(self, student):
        return corpus_index.document_lookup(student, self.data.corpus, progress=self.progress, **self.corpus_search())

    def labelled(self, folder: Path, record: StageRecord, rows: TrainingRows, candidates: str, student, loss_spec,
                 key: str = "score"):
        """The stage's training dataset: its rows with the teacher's labels, and the rows' ids for `prod-st
        export` (the teacher, its kind, the scale its scores were multiplied by, the candidate mode; read by nothing
        in the run, so no fingerprint depends on it)."""
        teacher = record.teacher
        with cost.step(f"{record.name}: teacher scores ({teacher})", record.seconds, key):
            dataset = labelled_dataset(folder / "train_data", rows,
                                       self.labels(teacher, rows, candidates, student, loss_spec))
        if is_main():
            write_row_ids(folder / ROW_IDS, rows, doc_ids(self.data.corpus), {
                "teacher": teacher, "kind": self.recipe.teachers[teacher].kind,
                "scale": float(self.teachers.scale(teacher)), "candidates": candidates,
            })
        barrier()
        return dataset
