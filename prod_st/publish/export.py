"""`prod-st export`: a run's teacher scores as a Hub dataset, in the layouts distillation code reads.

A distill stage or DPD round of a run folder keeps its training rows with the teacher's labels
(`NN-<stage>/train_data/`, see `prod_st.training.stage_data`) and, row for row, their query and corpus ids and what the
labels are (`row_ids.arrow`: teacher, kind, score scale, candidate mode). This module turns them into a folder a
`datasets` user (and the Hub's viewer) reads, parquet shards under `data/`:

    data/<stage>/        `query`, `positive`, `negative_1..k` (texts) and `score` (the teacher's scores, positive
                         first): sentence-transformers' n-tuple-with-scores layout, straight into
                         SentenceTransformerTrainer with DistillKLDivLoss / MarginMSELoss (`--format text`)
    data/<stage>-ids/    `query_id`, `corpus_ids` (positive first), `scores`, like the `msmarco-scores-*` datasets,
    data/corpus/         `_id`, `text` of every document the exported rows name (as the teacher read it), and
    data/queries/        `_id`, `text` of their queries (`--format ids`)
    README.md            the dataset card (`prod_st.publish.export_card`)

Streaming: a stage is read from its memory-mapped Arrow files BATCH_ROWS rows at a time, and each batch is
written out as Arrow/parquet before the next is read; the corpus and queries are kept unique by a sorted array
of 64-bit hashes (8 bytes per document), never a Python object per row. The folder is written to a temporary
folder next to OUT and renamed into place when complete. Scores are the label column the student trained on:
a cross-encoder's raw logits, a bi-encoder's similarity times its scale (cosine x 20), read from the stored
teacher embeddings for in-batch stages. Rows with a missing negative (a query with fewer candidates than the
stage's count; its score is -inf) are left out of the text layout and keep their real candidates in the id one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from prod_st.run.run_folder import MARKER, STEP_DIR
from prod_st.training.stage_data import ROW_IDS, read_rows
from prod_st.util.errors import ProdStError
from prod_st.util.paths import check_output_folder, write_folder_atomic
from prod_st.util.progress import enabled

logger = logging.getLogger(__name__)

FORMATS = ("text", "ids")
BATCH_ROWS = 8192  # training rows read, scored and written at a time
SHARD_ROWS = 500_000  # rows per parquet file (text rows of ~1 KB: shards of a few hundred MB, as the Hub likes)
TRAIN_DATA = "train_data"


@dataclass
class StageExport:
    """What one exported stage holds (the card's facts)."""

    folder: str  # the stage folder's name, e.g. 03-ce: the dataset config's name
    record: dict  # its metrics.json
    labels: dict  # row_ids.arrow's metadata: teacher, kind, scale, candidates ({} for an older run)
    rows: int = 0  # training rows of the stage (every epoch's draw)
    text_rows: int = 0  # rows in the text layout (rows with a missing negative left out)
    pairs: int = 0  # (query, document) scores exported in the id layout
    negatives: int = 0  # negatives per text row
    configs: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- the run folder
def check_run(run_dir: Path | str) -> Path:
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise ProdStError(f"run folder not found: {run}")
    if not (run / MARKER).is_file() or not (run / "recipe.yaml").is_file():
        raise ProdStError(f"{run} is not a prod-st run folder (no {MARKER} and recipe.yaml)")
    return run


def exportable_stages(run: Path) -> dict[str, Path]:
    """{folder name: folder} of the run's finished steps that trained on teacher scores (distill stages and DPD
    rounds with training rows), in schedule order."""
    out = {}
    for folder in sorted(p for p in run.iterdir() if p.is_dir() and STEP_DIR.match(p.name)):
        if (folder / "DONE").exists() and (folder / TRAIN_DATA).is_dir() and _record(folder).get("kind") != "warmup":
            out[folder.name] = folder
    return out


def choose_stages(run: Path, names: list[str] | None) -> list[Path]:
    """The stages `names` asks for (a folder name `03-ce` or a stage name `ce`; default: every exportable
    stage); a one-line error naming the choices for a name that is not one."""
    stages = exportable_stages(run)
    if not stages:
        raise ProdStError(f"{run} has no finished distill stage or DPD round with teacher scores to export")
    if not names:
        return list(stages.values())
    by_name = {name.split("-", 1)[1]: folder for name, folder in stages.items()} | stages
    chosen = []
    for name in names:
        if name not in by_name:
            raise ProdStError(f"no stage {name!r} with teacher scores in {run} (stages: {', '.join(stages)})")
        if by_name[name] not in chosen:
            chosen.append(by_name[name])
    return chosen


def _record(folder: Path) -> dict:
    try:
        return json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}


def _labels_metadata(ids: pa.Table | None) -> dict:
    if ids is None or not ids.schema.metadata or b"prod_st" not in ids.schema.metadata:
        return {}
    return json.loads(ids.schema.metadata[b"prod_st"])


def _memory_mapped(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return ipc.open_file(source).read_all()


# ---------------------------------------------------------------------------------------------- scores
def teacher_scores(label: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(rows, 1 + negatives) float32: the teacher's scores of each row's positive and negatives, in the scale
    the student trained on, from a train_data label column: list candidates hold the scores (and with PROD's
    regulariser a second row, the stage-start student's: dropped), in-batch candidates hold the teacher's
    embeddings of [query x scale, positive, negatives] (the scores are their dot products)."""
    values = label.combine_chunks() if isinstance(label, pa.ChunkedArray) else label
    shape = [len(values)]
    while pa.types.is_fixed_size_list(values.type):
        shape.append(values.type.list_size)
        values = values.flatten()  # (flatten honours a slice's offset, .values would not)
    x = values.to_numpy(zero_copy_only=False).reshape(shape)
    if x.ndim == 2:  # list candidates: the teacher's scores
        return x
    if x.shape[1] == 2:  # list candidates with the regulariser: [teacher, stage-start student]
        return np.ascontiguousarray(x[:, 0])
    return np.einsum("bd,bkd->bk", x[:, 0], x[:, 1:])  # in-batch: the teacher's embeddings


# ---------------------------------------------------------------------------------------------- writers
class _Shards:
    """Parquet files `train-NNNNN.parquet` in `folder`, a new one every SHARD_ROWS rows."""

    def __init__(self, folder: Path, schema: pa.Schema) -> None:
        self.folder, self.schema = folder, schema
        self.folder.mkdir(parents=True, exist_ok=True)
        self.writer, self.files, self.in_file, self.rows = None, 0, 0, 0

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        if self.writer is None or self.in_file >= SHARD_ROWS:
            self.close()
            self.writer = pq.ParquetWriter(str(self.folder / f"train-{self.files:05d}.parquet"), self.schema)
            self.files += 1
        self.writer.write_table(table.cast(self.schema))
        self.in_file += table.num_rows
        self.rows += table.num_rows

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer, self.in_file = None, 0


class _UniqueTexts:
    """(`_id`, `text`) rows written once per id, across batches and stages: the ids seen so far are a sorted
    array of their 64-bit hashes (np.searchsorted), 8 bytes each."""

    schema = pa.schema([("_id", pa.string()), ("text", pa.string())])

    def __init__(self, folder: Path) -> None:
        self.shards = _Shards(folder, self.schema)
        self.seen = np.empty(0, np.int64)

    def add(self, ids: pa.Array, texts: pa.Array) -> None:
        if not len(ids):
            return
        hashed = np.fromiter(map(hash, ids.to_pylist()), np.int64, len(ids))
        unique, first = np.unique(hashed, return_index=True)
        at = np.searchsorted(self.seen, unique)
        new = (at >= len(self.seen)) | (self.seen[np.minimum(at, len(self.seen) - 1)] != unique) \
            if len(self.seen) else np.ones(len(unique), bool)
        self.seen = np.insert(self.seen, at[new], unique[new])
        keep = pa.array(np.sort(first[new]))
        self.shards.write(pa.table([ids.take(keep), texts.take(keep)], schema=self.schema))

    def close(self) -> None:
        self.shards.close()


TEXT_SCORE = pa.list_(pa.float32())


def _scores_array(scores: np.ndarray) -> pa.Array:
    """A (rows, k) float32 array as a list<float32> column."""
    offsets = pa.array(np.arange(len(scores) + 1, dtype=np.int32) * scores.shape[1])
    return pa.ListArray.from_arrays(offsets, pa.array(scores.reshape(-1), pa.float32()))


def _export_stage(folder: Path, out: Path, formats: tuple[str, ...], corpus: _UniqueTexts | None,
                  queries: _UniqueTexts | None, bar) -> StageExport:
    data = read_rows(folder / TRAIN_DATA).data.table  # memory-mapped
    ids = _memory_mapped(folder / ROW_IDS) if (folder / ROW_IDS).is_file() else None
    negatives = [c for c in data.column_names if c.startswith("negative_")]
    width = 1 + len(negatives)
    stage = StageExport(folder.name, _record(folder), _labels_metadata(ids), rows=data.num_rows,
                        negatives=len(negatives))
    if "label" not in data.column_names:
        raise ProdStError(f"{folder} holds no teacher scores (its train_data has no label column)")
    if "ids" in formats and (ids is None or ids.num_rows != data.num_rows):
        raise ProdStError(f"{folder} has no {ROW_IDS} (a run of an older prod-st): the id layout needs it; "
                          "use --format text, or rerun the stage with this prod-st")
    text_schema = pa.schema([(c, pa.string()) for c in ("query", "positive", *negatives)] + [("score", TEXT_SCORE)])
    id_schema = pa.schema([("query_id", pa.string()), ("corpus_ids", pa.list_(pa.string())), ("scores", TEXT_SCORE)])
    text = _Shards(out / "data" / folder.name, text_schema) if "text" in formats else None
    by_id = _Shards(out / "data" / f"{folder.name}-ids", id_schema) if "ids" in formats else None
    columns = ["positive", *negatives]
    for start in range(0, data.num_rows, BATCH_ROWS):
        batch = data.slice(start, BATCH_ROWS)
        scores = teacher_scores(batch.column("label")).astype(np.float32, copy=False)
        if scores.shape[1] != width:
            raise ProdStError(f"{folder}: {scores.shape[1]} scores per row for {width} candidates")
        real = np.isfinite(scores)  # a filler negative scores -inf
        if text is not None:
            full = real.all(axis=1)
            kept = batch.select(["query", *columns]).filter(pa.array(full))
            text.write(kept.append_column("score", _scores_array(scores[full])))
        if by_id is not None:
            rows = ids.slice(start, BATCH_ROWS)
            flat_ids = rows.column("corpus_ids").combine_chunks().flatten()
            mask = pa.array(real.reshape(-1))
            offsets = pa.array(np.concatenate([[0], np.cumsum(real.sum(axis=1))]).astype(np.int32))
            query_ids = rows.column("query_id").combine_chunks()
            by_id.write(pa.table([query_ids, pa.ListArray.from_arrays(offsets, flat_ids.filter(mask)),
                                  pa.ListArray.from_arrays(offsets, pa.array(scores[real], pa.float32()))],
                                 schema=id_schema))
            stage.pairs += int(real.sum())
            # the documents' texts in row-major order (row 0's candidates, row 1's, ...), as the ids are
            order = pa.array((np.arange(len(scores))[:, None] + np.arange(width)[None, :] * len(scores)).reshape(-1))
            texts = pa.concat_arrays([batch.column(c).combine_chunks() for c in columns]).take(order)
            corpus.add(flat_ids.filter(mask), texts.filter(mask))
            queries.add(query_ids, batch.column("query").combine_chunks())
        bar.update(batch.num_rows)
    for shards, config in ((text, folder.name), (by_id, f"{folder.name}-ids")):
        if shards is not None:
            shards.close()
            stage.configs.append(config)
    stage.text_rows = text.rows if text is not None else 0
    return stage


# ---------------------------------------------------------------------------------------------- the export
def export_run(run_dir: Path | str, out: Path | str, *, stages: list[str] | None = None,
               formats: tuple[str, ...] = FORMATS, repo_id: str | None = None, progress: bool = True) -> list[StageExport]:
    """Write the chosen stages of a run (default: every distill stage and DPD round) into the new or empty folder
    `out`, in `formats`, with its dataset card; `repo_id`: the Hub id the card's loading code names. Returns
    what each stage holds. The run folder is only read."""
    from tqdm.auto import tqdm

    from prod_st.publish.export_card import write_card

    run = check_run(run_dir)
    chosen = choose_stages(run, stages)
    formats = tuple(f for f in FORMATS if f in formats)
    if not formats:
        raise ProdStError(f"no export format chosen (formats: {', '.join(FORMATS)})")
    out = check_output_folder(out, "export folder")
    if out.resolve() == run.resolve():
        raise ProdStError("the export folder is the run folder: give a new or empty folder")
    total = sum(_row_count(folder) for folder in chosen)
    exported: list[StageExport] = []

    def write(tmp: Path) -> None:
        unique = "ids" in formats
        corpus = _UniqueTexts(tmp / "data" / "corpus") if unique else None
        queries = _UniqueTexts(tmp / "data" / "queries") if unique else None
        with tqdm(total=total, desc="export", unit="rows", disable=not enabled(progress)) as bar:
            for folder in chosen:
                exported.append(_export_stage(folder, tmp, formats, corpus, queries, bar))
                logger.info("%s: %d rows exported", folder.name, exported[-1].rows)
        if unique:
            corpus.close()
            queries.close()
        write_card(tmp / "README.md", run, exported, formats=formats, repo_id=repo_id,
                   corpus_rows=corpus.shards.rows if unique else 0, query_rows=queries.shards.rows if unique else 0)

    write_folder_atomic(out, write)
    return exported


def _row_count(folder: Path) -> int:
    return read_rows(folder / TRAIN_DATA).num_rows


def folder_size(folder: Path) -> int:
    """Bytes of the files under `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def push_export(folder: Path | str, repo_id: str, *, private: bool = False, exist_ok: bool = False,
                token: str | None = None, api=None) -> str:
    """Upload an export folder as the Hub dataset `repo_id` (the errors of `prod-st push`: one line each)."""
    from prod_st.util.hub import hub_api, upload_folder

    return upload_folder(Path(folder), repo_id, api=api if api is not None else hub_api(token), repo_type="dataset",
                         private=private, exist_ok=exist_ok, message="Upload PROD teacher scores (prod-st export)")


__all__ = ["FORMATS", "StageExport", "choose_stages", "export_run", "exportable_stages", "push_export",
           "teacher_scores"]
