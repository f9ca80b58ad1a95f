"""Retrieval datasets as (corpus, queries, qrels[, answers]), from these kinds of source:

- an embedded benchmark by name (`wordnet-gloss`, shipped inside the package);
- any BEIR-format folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv; gzipped files too);
- a BEIR dataset name (`scifact`, ...), downloaded once with beir's own utility into the prod-st cache;
- a folder of the original releases of the PROD paper's benchmarks, recognised by its files
  (`detect_format`): MS MARCO document and passage with TREC DL 2019 as test (`msmarco.py`), DPR's Natural
  Questions (`dpr.py`, whose splits also carry answer strings).

Which files a folder holds is `layout.py`'s (standard library only); this package imports datasets and pyarrow
only when a split is loaded, so `prod-st validate` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from prod_st.data.layout import beir_split_files, detect_format, split_files
from prod_st.data.sources import local_source, resolve_source
from prod_st.util.errors import DataError

if TYPE_CHECKING:
    import datasets

__all__ = [
    "RetrievalData", "load_retrieval_data", "resolve_source", "local_source", "document_text", "detect_format",
    "split_files",
]

def document_text(title: str, text: str) -> str:
    """The string a model encodes for a document: BEIR's convention, title then text."""
    return f"{title} {text}".strip() if title else text


@dataclass
class RetrievalData:
    """One split of a retrieval dataset. `corpus` and `queries` are memory-mapped Arrow tables with columns
    `_id`, `title`, `text` and `_id`, `text`; `qrels` maps query id -> {doc id: grade} for `split`.
    `answers` (query id -> answer strings) is set for question-answering data (DPR NQ), whose test split has
    answers but no qrels (`qrels == {}`)."""

    name: str
    split: str
    corpus: datasets.Dataset
    queries: datasets.Dataset
    qrels: dict[str, dict[str, int]]
    answers: dict[str, list[str]] | None = None
    _split: tuple | None = field(default=None, init=False, repr=False, compare=False)  # (order, size, queries)

    def split_queries(self) -> dict[str, str]:
        """{query id: text} of the queries judged in this split, in qrels order; without qrels, those with
        answers, in answers order. Built once per qrels (answers) object, with Arrow (each judged id looked up
        in the id column, only their texts read), and shared by every caller: read it, do not change it (the
        runner asks for it at every mining, DPD rerank and row build; at MS MARCO size the queries file holds
        800k queries)."""
        order = self.qrels if self.qrels or not self.answers else self.answers
        if self._split is None or self._split[0] is not order or self._split[1] != len(order):
            self._split = (order, len(order), self._texts_of(list(order)))
        return self._split[2]

    def _texts_of(self, qids: list[str]) -> dict[str, str]:
        """{query id: text} of `qids`, in order, from the queries table (KeyError naming an id it lacks)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        table = self.queries.with_format("arrow")
        at = pc.index_in(pa.array(qids, pa.string()), value_set=table["_id"])
        if at.null_count:
            raise KeyError(qids[pc.index(at.is_null(), True).as_py()])
        return dict(zip(qids, table["text"].take(at).to_pylist()))


def load_retrieval_data(
    source: str | Path, split: str = "test", *, check_ids: bool = True, max_body_chars: int | None = None
) -> RetrievalData:
    """Load `split` of `source` (embedded name, BEIR name, or a BEIR / MS MARCO / DPR NQ folder). With `check_ids`,
    qrels that name a query or document absent from the files are an error (one line, with the first offending
    id). `max_body_chars` cuts MS MARCO document bodies (None: `prod_st.data.msmarco.MAX_BODY_CHARS`)."""
    from prod_st.data import dpr, msmarco

    folder = resolve_source(source)
    answers = None
    kind = detect_format(folder)
    if kind == "beir":
        corpus, queries, qrels, qrels_file = _load_beir(folder, split)
    elif kind == "msmarco-doc":
        corpus, queries, qrels, qrels_file = msmarco.load_msmarco_doc(
            folder, split, msmarco.MAX_BODY_CHARS if max_body_chars is None else max_body_chars)
    elif kind == "msmarco-passage":
        corpus, queries, qrels, qrels_file = msmarco.load_msmarco_passage(folder, split)
    else:
        corpus, queries, qrels, answers, qrels_file = dpr.load_dpr_nq(folder, split)
    if check_ids and qrels:
        _check_ids(qrels_file, qrels, queries, corpus)
    return RetrievalData(str(source), split, corpus, queries, qrels, answers)


def _load_beir(folder: Path, split: str):
    from prod_st.data.beir_files import read_qrels, read_table

    corpus_file, queries_file, qrels_file = beir_split_files(folder, split)
    return read_table(corpus_file, "corpus"), read_table(queries_file, "queries"), read_qrels(qrels_file), qrels_file


def _check_ids(qrels_file: Path, qrels: dict, queries: datasets.Dataset, corpus: datasets.Dataset) -> None:
    """Every judged query and document is in the files: looked up with Arrow (`is_in` against the id column),
    not through a Python set of the whole corpus."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for what, ids, table, where in (
        ("query", list(qrels), queries, "the queries file"),
        ("document", [d for judged in qrels.values() for d in judged], corpus, "the corpus"),
    ):
        absent = pc.invert(pc.is_in(pa.array(ids, pa.string()), value_set=table.data.column("_id")))
        count = pc.sum(absent).as_py() or 0
        if count:
            first = ids[pc.index(absent, True).as_py()]
            raise DataError(f"{qrels_file}: {count} {what} id(s) not in {where}, e.g. {first!r}")
