"""Document ids <-> corpus rows without a Python object per document.

At MS MARCO size a `{doc id: row}` dict and a list of the ids would hold 8.8M Python strings and dict entries
(~1.5 GB per process). Here the ids stay one Arrow string array (their bytes and offsets: ~100 MB), and the
row of an id is found by binary search in a sorted array of the ids' hashes (16 bytes per document); only the
ids and rows a step asks for become Python objects. An id whose hash another id shares (a 64-bit collision) is
looked up exactly with `pyarrow.compute.index_in`, whose hash set is rebuilt per call (2.4 s at 8.8M ids, measured
loaded): fine for a rare collided id, too slow for every lookup, hence the sorted hashes."""

from __future__ import annotations

import logging
import operator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

logger = logging.getLogger(__name__)

BATCH = 65536  # ids read (and hashed) at a time when the lookup is built
_last: dict = {}  # the last corpus's DocIds (one entry): the runner's steps and the corpus index share it


class DocIds:
    """The `_id` column of a corpus (an Arrow-backed `datasets.Dataset`, maybe a `select`ed view), in corpus
    order: `take(rows)` gives the ids of rows, `rows(ids)` the rows of ids (KeyError naming an unknown id)."""

    def __init__(self, corpus) -> None:
        view = corpus.with_format("arrow")
        chunks, hashes = [], []
        for start in range(0, len(corpus), BATCH):
            column = view[start:start + BATCH].column("_id").combine_chunks()
            chunks.append(column)
            hashes.append(np.fromiter(map(hash, column.to_pylist()), dtype=np.int64, count=len(column)))
        self.ids = pa.chunked_array(chunks, pa.string()).combine_chunks() if chunks else pa.array([], pa.string())
        hashed = np.concatenate(hashes) if hashes else np.zeros(0, np.int64)
        self._order = np.argsort(hashed, kind="stable")
        self._sorted = hashed[self._order]
        shared = self._sorted[1:] == self._sorted[:-1]
        # hashes several ids share (a 64-bit collision, or a repeated id): their ids are looked up exactly
        self._collided = np.unique(self._sorted[1:][shared])
        if len(self._collided):
            logger.info("doc ids: %d hashes collide; their ids are looked up exactly", len(self._collided))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, row: int) -> str:
        return self.ids[int(row)].as_py()

    def take(self, rows) -> list[str]:
        """The ids of corpus rows `rows` (integers), in order."""
        rows = np.asarray(rows, dtype=np.int64)
        return self.ids.take(pa.array(rows)).to_pylist() if len(rows) else []

    def rows(self, doc_ids: list[str]) -> np.ndarray:
        """The corpus rows of `doc_ids`, in order."""
        rows = self.find(doc_ids)
        if (rows < 0).any():
            raise KeyError(doc_ids[int(np.argmax(rows < 0))])
        return rows

    def find(self, doc_ids: list[str]) -> np.ndarray:
        """The corpus rows of `doc_ids`, in order, -1 for an id the corpus does not hold (judgements may name
        documents outside a run's corpus subset)."""
        if not len(self._sorted):
            return np.full(len(doc_ids), -1, dtype=np.int64)
        wanted = np.fromiter(map(hash, doc_ids), dtype=np.int64, count=len(doc_ids))
        rows = self._order[np.minimum(np.searchsorted(self._sorted, wanted), len(self._sorted) - 1)]
        same = np.fromiter(map(operator.eq, doc_ids, self.take(rows)), dtype=bool, count=len(doc_ids))
        rows = np.where(same, rows, -1)
        if len(self._collided):  # the first id of a shared hash was not the one asked for: pyarrow's exact lookup
            redo = ~same & np.isin(wanted, self._collided)
            if redo.any():
                asked = pa.array([d for d, r in zip(doc_ids, redo.tolist()) if r], pa.string())
                rows[redo] = pc.index_in(asked, value_set=self.ids).fill_null(-1).to_numpy()
        return rows

def doc_ids(corpus) -> DocIds:
    """The DocIds of `corpus`, built once per corpus (by its datasets fingerprint) and shared."""
    key = getattr(corpus, "_fingerprint", None)
    if key is None or _last.get("key") != key:
        _last.clear()
        _last.update(key=key, ids=DocIds(corpus))
    return _last["ids"]
