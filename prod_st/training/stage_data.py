"""The data a run works on: the recipe's (seeded) subsets of queries and corpus, and the training rows
(query, positive, negatives) that every stage builds from mined negatives."""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc  # noqa: F401  (pa.ipc)
from datasets.arrow_writer import ArrowWriter

from prod_st.data import RetrievalData, document_text, load_retrieval_data
from prod_st.data.answer_match import has_answer
from prod_st.data.doc_ids import doc_ids as doc_ids_of
from prod_st.util.distributed import all_gather, barrier, is_main, shard
from prod_st.util.paths import atomic_path, write_folder_atomic

logger = logging.getLogger(__name__)
DATA_FILE = "data-00000-of-00001.arrow"  # one Arrow file, named as `Dataset.save_to_disk` names a shard
ROW_IDS = "row_ids.arrow"  # a stage folder's rows as ids (query id, corpus ids) + what the labels are: prod-st export
TEXT_ROWS = 8192  # rows written per batch when they carry no labels (the warm-up)
ANSWER_CHUNK = 1024  # training queries whose retrieved passages are fetched together for answer matching
FILLER = ""  # text of a missing negative: its teacher score is -inf, so it is masked out of every softmax


@dataclass
class RunData:
    """train / dev / test splits sharing one corpus (the recipe's subset of it); an evaluate-only recipe has no
    train split (None), and maybe no dev split."""

    train: RetrievalData | None
    dev: RetrievalData | None
    test: RetrievalData
    answer_positives: bool = False  # question answering: a passage containing an answer is a positive

    def __post_init__(self) -> None:
        self.corpus = self.test.corpus

    def _docs(self, ids: list[str]):
        """The corpus rows of `ids`, in order (a view on the memory-mapped corpus)."""
        return self.corpus.select(doc_ids_of(self.corpus).rows(ids))

    def doc_texts(self, doc_ids: list[str]) -> list[str]:
        """Encoded text (title + text) of each doc id, fetched from the memory-mapped corpus."""
        return self.texts_at(doc_ids_of(self.corpus).rows(doc_ids))

    def texts_at(self, rows) -> list[str]:
        """Encoded text (title + text) of each corpus row, fetched from the memory-mapped corpus."""
        docs = self.corpus.select(rows)
        return [document_text(t, x) for t, x in zip(docs["title"], docs["text"])]

    def doc_texts_per_query(self, lists: Iterable[list[str]]) -> list[list[str]]:
        """`doc_texts` of each list of doc ids, fetched with one corpus lookup for them all (not one
        `Dataset.select` per query)."""
        lists = list(lists)
        texts = iter(self.doc_texts([d for docs in lists for d in docs]))
        return [[next(texts) for _ in docs] for docs in lists]

    def relevance(self, ranked: dict[str, list[str]]) -> dict[str, dict[str, int]]:
        """The training judgements behind positives, mined negatives and DPD's ranks. By default the qrels.
        With `answer_positives` (PROD and DPR on Natural Questions), also every passage of `ranked` whose text
        contains one of the query's answers (DPR's string match, on the passage body), at grade 1 after the
        gold ones, so a gold passage stays the positive a row trains on when there is one. The matching (a
        tokenisation of every retrieved passage) is split across ranks under torchrun, each rank a share of
        the queries, and the matches gathered: every rank calls this."""
        qrels, answers = self.train.qrels, self.train.answers
        if not self.answer_positives or not answers:
            return qrels
        qids = list(ranked)
        start, stop = shard(len(qids))
        out = dict(qrels)
        for found in all_gather(self._answer_bearing(ranked, qids[start:stop], answers, qrels)):
            for qid, docs in found.items():  # an explicit judgement wins over the string match
                out[qid] = qrels.get(qid, {}) | dict.fromkeys(docs, 1)
        return out

    def _answer_bearing(self, ranked, qids: list[str], answers: dict[str, list[str]],
                        qrels: dict[str, dict[str, int]]) -> dict[str, list[str]]:
        """{query: its retrieved, unjudged passages that contain one of its answers} for the queries `qids` that
        have any, the passage bodies fetched ANSWER_CHUNK queries at a time (one corpus lookup each)."""
        qids = [q for q in qids if answers.get(q)]
        found = {}
        for first in range(0, len(qids), ANSWER_CHUNK):
            chunk = qids[first:first + ANSWER_CHUNK]
            lists = [ranked[q] for q in chunk]
            bodies = iter(self._docs([d for docs in lists for d in docs])["text"])
            for qid, docs in zip(chunk, lists):
                judged = qrels.get(qid, {})
                hits = [d for d, body in zip(docs, bodies) if d not in judged and has_answer(body, answers[qid])]
                if hits:
                    found[qid] = hits
        return found


SPLIT_NAMES = ("train", "dev", "test")  # the subsets' names, as their RNGs are named (whatever the split files)


def split_rng(seed: int, name: str) -> random.Random:
    """The RNG of one subset (`name`: train, dev, test, corpus): seeded with the data seed and the subset's name
    alone, so no subset moves when another one's size changes."""
    return random.Random(f"{seed}/{name}")


def _sample_queries(qrels: dict, n: int | None, rng: random.Random) -> dict:
    if n is None or n >= len(qrels):
        return qrels
    keep = set(rng.sample(sorted(qrels), n))
    return {q: judged for q, judged in qrels.items() if q in keep}


def load_run_data(
    dataset: str,
    *,
    splits: tuple[str | None, str | None, str] = ("train", "dev", "test"),
    sizes: tuple[int | None, int | None, int | None] = (None, None, None),
    corpus_size: int | None = None,
    seed: int = 13,
    answer_positives: bool = False,
) -> RunData:
    """Load the three splits (a None split is skipped: it stays None), keep a seeded subset of each split's
    queries, and (with `corpus_size`) a seeded subset of the corpus (`_corpus_subset`). Each subset has its own
    RNG (`split_rng`: the seed and the subset's name), so the dev and test queries and the evaluation slice of
    the corpus depend on `seed` and their own sizes only, not on the training size."""
    every = [None if split is None else load_retrieval_data(dataset, split) for split in splits]
    loaded = [data for data in every if data is not None]
    for data, n, name in zip(every, sizes, SPLIT_NAMES):
        if data is None:
            continue
        data.qrels = _sample_queries(data.qrels, n, split_rng(seed, name))
        if data.answers and not data.qrels:  # question answering test split (DPR NQ): answers, no qrels
            data.answers = _sample_queries(data.answers, n, split_rng(seed, name))
    corpus: datasets.Dataset = loaded[0].corpus
    if corpus_size is not None and corpus_size < len(corpus):
        # (answer-only test queries have no judged passages to keep: their accuracy is over the subset)
        train, evaluated = every[0], [data for data in every[1:] if data is not None]
        rows = _corpus_subset(corpus, evaluated, [train] if train is not None else [], corpus_size,
                              split_rng(seed, "corpus"))
        corpus = corpus.select(rows.tolist())  # an index mapping
        for data in loaded:
            data.corpus = corpus
    logger.info(
        "data %s: %d train / %d dev / %d test queries, %d documents",
        dataset, *(len(d.qrels) if d is not None else 0 for d in every), len(corpus),
    )
    return RunData(*every, answer_positives=answer_positives)


def _judged_rows(corpus: datasets.Dataset, splits: list[RetrievalData]) -> np.ndarray:
    """Boolean mask over the corpus rows: judged in one of `splits`. Ids are matched with Arrow (`is_in` on the id
    column), so an 8.8M-document corpus becomes a boolean array, not 8.8M Python strings."""
    judged = pa.array(list({d for data in splits for j in data.qrels.values() for d in j}), pa.string())
    return pc.is_in(corpus.with_format("arrow")["_id"], value_set=judged).to_numpy(zero_copy_only=False)


def _corpus_subset(corpus: datasets.Dataset, evaluated: list[RetrievalData], train: list[RetrievalData], size: int,
                   rng: random.Random) -> np.ndarray:
    """The sorted corpus rows of the run's corpus: the evaluation slice, `size` documents (every document judged
    in `evaluated`, the dev and test splits, then a fill drawn with `rng` from the others), plus every document
    judged in `train` that the slice lacks. The slice depends on the seed, the evaluation queries and `size`
    only; the training size adds its judged documents on top (also searched by dev and test: the one residual
    dependence). The fill is a numpy draw seeded from `rng` over the row numbers (no Python object per row)."""
    needed = _judged_rows(corpus, evaluated)
    others = np.flatnonzero(~needed)
    fill = np.random.default_rng(rng.getrandbits(128)).choice(len(others), max(0, size - int(needed.sum())),
                                                              replace=False)
    in_slice = needed
    in_slice[others[fill]] = True
    if train:
        in_slice |= _judged_rows(corpus, train)
    return np.flatnonzero(in_slice)


@dataclass
class TrainingRows:
    """One row per training query: its id and text, and the corpus rows of its positive and of `count`
    negatives (-1 for a FILLER, where the query had fewer). Document texts are fetched from the memory-mapped
    corpus (`doc_texts`: rows -> texts) a slice of rows at a time (`texts`), so a stage's rows hold no
    document text: 8 bytes per document reference, whatever the number of rows and epochs."""

    query_ids: list[str]
    queries: list[str]
    positive_rows: np.ndarray  # (rows,) int64
    negative_rows: np.ndarray  # (rows, count) int64, -1 = filler
    doc_texts: Callable[[np.ndarray], list[str]]

    @classmethod
    def from_texts(cls, query_ids: list[str], queries: list[str], positives: list[str],
                   negatives: list[list[str]]) -> TrainingRows:
        """Rows given as texts (FILLER for a missing negative), over an in-memory table of those texts."""
        table = list(dict.fromkeys([*positives, *(n for negs in negatives for n in negs if n != FILLER)]))
        at = {text: i for i, text in enumerate(table)}
        negative_rows = np.array([[at[n] if n != FILLER else -1 for n in negs] for negs in negatives], np.int64)
        return cls(list(query_ids), list(queries), np.array([at[p] for p in positives], np.int64),
                   negative_rows.reshape(len(queries), len(negatives[0]) if negatives else 0),
                   lambda rows: [table[r] for r in rows])

    def __len__(self) -> int:
        return len(self.query_ids)

    @property
    def count(self) -> int:
        """Negatives per row (fillers included)."""
        return self.negative_rows.shape[1]

    @classmethod
    def concatenate(cls, parts: list[TrainingRows]) -> TrainingRows:
        """The rows of `parts` in order (chunks of queries, epochs' draws), over the first part's documents:
        one copy of the row arrays, however many parts."""
        return cls([q for p in parts for q in p.query_ids], [q for p in parts for q in p.queries],
                   np.concatenate([p.positive_rows for p in parts]),
                   np.concatenate([p.negative_rows for p in parts]), parts[0].doc_texts)

    def texts(self, start: int = 0, stop: int | None = None) -> tuple[list[str], list[str], list[list[str]]]:
        """(queries, positive texts, negative texts with FILLER for a missing one) of rows `start:stop`."""
        positive, negative = self.positive_rows[start:stop], self.negative_rows[start:stop]
        wanted = np.unique(np.concatenate([positive, negative[negative >= 0]]))
        text_of = dict(zip(wanted.tolist(), self.doc_texts(wanted))) if len(wanted) else {}
        return (self.queries[start:stop], [text_of[r] for r in positive.tolist()],
                [[text_of[r] if r >= 0 else FILLER for r in row] for row in negative.tolist()])

    def candidates(self, start: int = 0, stop: int | None = None) -> list[list[str]]:
        """[positive, negatives] of rows `start:stop` (fillers included)."""
        _, positives, negatives = self.texts(start, stop)
        return [[p, *negs] for p, negs in zip(positives, negatives)]

    def real_candidates(self, start: int = 0, stop: int | None = None) -> list[list[str]]:
        """[positive, negatives] of rows `start:stop` without the fillers (which always come last)."""
        _, positives, negatives = self.texts(start, stop)
        real = (self.negative_rows[start:stop] >= 0).tolist()
        return [[p, *(n for n, kept in zip(negs, row) if kept)] for p, negs, row in zip(positives, negatives, real)]

    @property
    def missing(self) -> list[list[bool]]:
        """`missing[i][j]`: row i's negative j is a filler."""
        return (self.negative_rows < 0).tolist()

    def to_dataset(self, labels: Iterable[np.ndarray] | None = None, *, folder: Path | None = None) -> datasets.Dataset:
        """Columns query, positive, negative_1..negative_N (+ label), in the order losses expect.

        With `folder` (an existing empty folder) the rows are written there a batch at a time by datasets'
        `ArrowWriter`, and the dataset returned memory-maps that file (`read_rows`): no Python object per row or
        label value outlives its batch. `labels` (None: text columns only, TEXT_ROWS rows a batch) come batch by
        batch: arrays whose first axis runs over consecutive rows (in row order), all of one shape otherwise,
        written as a float32 fixed-size-list column (nested for a label of several axes). Without `folder`, the
        text columns are built in memory (small row sets)."""
        if folder is None:
            if labels is not None:
                raise ValueError("labelled training rows are written to a dataset folder: give it")
            return datasets.Dataset.from_dict(self._text_columns(0, len(self)))
        done = 0
        with ArrowWriter(path=str(Path(folder) / DATA_FILE)) as writer:
            for table in self._tables(labels):
                writer.write_table(table)
                done += table.num_rows
            writer.finalize()
        if done != len(self):
            raise ValueError(f"{done} labels for {len(self)} training rows")
        return read_rows(Path(folder))

    def _tables(self, labels: Iterable[np.ndarray] | None) -> Iterator[pa.Table]:
        """The rows as Arrow tables, one per label batch (or per TEXT_ROWS rows without labels)."""
        if labels is None:
            for start in range(0, len(self), TEXT_ROWS):
                yield pa.table(self._text_columns(start, min(start + TEXT_ROWS, len(self))))
            return
        done = 0
        for batch in labels:
            batch = np.asarray(batch, dtype=np.float32)
            if np.isnan(batch).any() or np.isposinf(batch).any():  # checked here, once: not per step on the GPU
                raise ValueError(f"labels of training rows {done}..{done + len(batch) - 1} hold NaN or +inf: a "
                                 "teacher gave non-finite scores (only -inf, a missing candidate, is allowed)")
            yield pa.table(self._text_columns(done, done + len(batch)) | {"label": _fixed_size_lists(batch)})
            done += len(batch)

    def _text_columns(self, start: int, end: int) -> dict[str, list[str]]:
        queries, positives, negatives = self.texts(start, end)
        columns = {"query": queries, "positive": positives}
        for j in range(self.count):
            columns[f"negative_{j + 1}"] = [negs[j] for negs in negatives]
        return columns


def write_row_ids(path: Path, rows: TrainingRows, doc_ids, metadata: dict) -> None:
    """`rows` as ids, row for row with the stage's train_data: `query_id` and `corpus_ids` (the positive's, then
    the negatives', null for a filler), TEXT_ROWS rows at a time into an Arrow IPC file renamed into place when
    complete; `metadata` (what the label column holds: teacher, its score scale, candidates) goes into the
    schema's metadata under b"prod_st". `doc_ids`: corpus rows -> ids (`prod_st.data.doc_ids.DocIds`). Only what
    `prod-st export` reads: nothing in a run depends on it."""
    schema = pa.schema([("query_id", pa.string()), ("corpus_ids", pa.list_(pa.string(), 1 + rows.count))],
                       metadata={b"prod_st": json.dumps(metadata).encode()})

    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for start in range(0, len(rows), TEXT_ROWS):
            stop = min(start + TEXT_ROWS, len(rows))
            refs = np.concatenate([rows.positive_rows[start:stop, None], rows.negative_rows[start:stop]], axis=1)
            ids = pa.array(doc_ids.take(np.maximum(refs, 0).reshape(-1)), pa.string())
            ids = pc.if_else(pa.array(refs.reshape(-1) >= 0), ids, pa.scalar(None, pa.string()))
            writer.write_table(pa.table([pa.array(rows.query_ids[start:stop], pa.string()),
                                         pa.FixedSizeListArray.from_arrays(ids, 1 + rows.count)], schema=schema))


def labelled_dataset(target: Path, rows: TrainingRows, labels: Iterable[np.ndarray] | None) -> datasets.Dataset:
    """`rows` with their `labels` (None: the warm-up's text columns only) as a dataset memory-mapped from the
    folder `target`. Rank 0 writes it a batch at a time (into a temp folder renamed when complete; an earlier
    one, from a killed stage, is rewritten from the same cached teacher outputs); the other ranks take part in
    the teacher's work (the same label batches) and read the finished folder."""
    if is_main():
        if target.exists():
            shutil.rmtree(target)
        write_folder_atomic(target, lambda tmp: rows.to_dataset(labels, folder=tmp))
    else:
        for _ in labels or ():
            pass
    barrier()
    return read_rows(target)


def read_rows(folder: Path) -> datasets.Dataset:
    """A stage's training rows (its `train_data` folder), memory-mapped (`datasets.Dataset.from_file`)."""
    return datasets.Dataset.from_file(str(Path(folder) / DATA_FILE))


def _fixed_size_lists(batch: np.ndarray) -> pa.Array:
    """A (rows, d1, d2, ...) float32 array as an Arrow column of (nested) fixed-size lists of float32."""
    array = pa.array(np.ascontiguousarray(batch).reshape(-1), pa.float32())
    for size in reversed(batch.shape[1:]):
        array = pa.FixedSizeListArray.from_arrays(array, size)
    return array


def build_rows(
    data: RunData, negatives: dict[str, list[str]], count: int, *, drop_incomplete: bool = False,
    qrels: dict[str, dict[str, int]] | None = None, query_texts: dict[str, str] | None = None, log: bool = True,
) -> TrainingRows:
    """Training rows from mined negatives: the positive is the query's highest-graded document in `qrels`
    (default: the training qrels; `RunData.relevance` adds answer-bearing passages); a query with fewer than
    `count` negatives is padded with FILLER (or dropped with `drop_incomplete`, as in-batch candidates cannot
    be masked). `query_texts`: the training queries' texts when the caller has them (`split_queries()`), `log`:
    whether to log how many queries were kept."""
    split = data.train
    queries = split.split_queries() if query_texts is None else query_texts
    qrels = split.qrels if qrels is None else qrels
    kept = []
    for qid, negs in negatives.items():
        judged = qrels.get(qid, {})
        best = max(judged.items(), key=lambda kv: kv[1], default=(None, 0))
        if best[1] <= 0 or (drop_incomplete and len(negs) < count):
            continue
        kept.append((qid, best[0], negs[:count]))
    if log and len(kept) < len(negatives):
        logger.info("training rows: %d of %d queries kept", len(kept), len(negatives))
    ids = doc_ids_of(data.corpus)
    negative_rows = np.full((len(kept), count), -1, dtype=np.int64)
    lengths = np.array([len(negs) for _, _, negs in kept], dtype=np.int64).reshape(-1, 1)
    negative_rows[np.arange(count) < lengths] = ids.rows([d for _, _, negs in kept for d in negs])  # row-major
    return TrainingRows(
        query_ids=[q for q, _, _ in kept],
        queries=[queries[q] for q, _, _ in kept],
        positive_rows=ids.rows([p for _, p, _ in kept]),
        negative_rows=negative_rows,
        doc_texts=data.texts_at,
    )
