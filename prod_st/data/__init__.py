"""Retrieval datasets as (corpus, queries, qrels), from three kinds of source:

- an embedded benchmark by name (`wordnet-gloss`, shipped inside the package);
- any BEIR-format folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv; gzipped files too);
- a BEIR dataset name (`scifact`, ...), downloaded once with beir's own utility into the prod-st cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets

from prod_st.data.beir_files import find_file, read_qrels, read_table
from prod_st.data.sources import resolve_source
from prod_st.errors import ProdStError

__all__ = ["RetrievalData", "load_retrieval_data", "resolve_source", "document_text"]


def document_text(title: str, text: str) -> str:
    """The string a model encodes for a document: BEIR's convention, title then text."""
    return f"{title} {text}".strip() if title else text


@dataclass
class RetrievalData:
    """One split of a retrieval dataset. `corpus` and `queries` are memory-mapped Arrow tables with columns
    `_id`, `title`, `text` and `_id`, `text`; `qrels` maps query id -> {doc id: grade} for `split`."""

    name: str
    split: str
    corpus: datasets.Dataset
    queries: datasets.Dataset
    qrels: dict[str, dict[str, int]]

    def split_queries(self) -> dict[str, str]:
        """{query id: text} of the queries judged in this split, in qrels order."""
        wanted = self.qrels.keys()
        texts = {qid: text for qid, text in zip(self.queries["_id"], self.queries["text"]) if qid in wanted}
        return {qid: texts[qid] for qid in self.qrels}


def load_retrieval_data(source: str | Path, split: str = "test", *, check_ids: bool = True) -> RetrievalData:
    """Load `split` of `source` (embedded name, BEIR folder or BEIR name). With `check_ids`, qrels that name
    a query or document absent from the files are an error (one line, with the first offending id)."""
    folder = resolve_source(source)
    corpus_file = find_file(folder, "corpus.jsonl")
    queries_file = find_file(folder, "queries.jsonl", "queries.tsv")
    qrels_file = find_file(folder / "qrels", f"{split}.tsv", f"{split}.txt")
    for what, found in (("corpus.jsonl", corpus_file), ("queries.jsonl", queries_file)):
        if found is None:
            raise ProdStError(f"{folder}: no {what} (a BEIR folder holds corpus.jsonl, queries.jsonl, qrels/)")
    if qrels_file is None:
        available = sorted(p.name.split(".")[0] for p in (folder / "qrels").glob("*.*")) if (folder / "qrels").is_dir() else []
        raise ProdStError(f"{folder}: no qrels for split {split!r} (available: {', '.join(available) or 'none'})")

    corpus = read_table(corpus_file, "corpus")
    queries = read_table(queries_file, "queries")
    qrels = read_qrels(qrels_file)
    if check_ids:
        _check_ids(qrels_file, qrels, set(queries["_id"]), set(corpus["_id"]))
    return RetrievalData(str(source), split, corpus, queries, qrels)


def _check_ids(qrels_file: Path, qrels: dict, query_ids: set, doc_ids: set) -> None:
    bad_queries = [qid for qid in qrels if qid not in query_ids]
    if bad_queries:
        raise ProdStError(
            f"{qrels_file}: {len(bad_queries)} query id(s) not in the queries file, e.g. {bad_queries[0]!r}"
        )
    bad_docs = [d for judged in qrels.values() for d in judged if d not in doc_ids]
    if bad_docs:
        raise ProdStError(f"{qrels_file}: {len(bad_docs)} document id(s) not in the corpus, e.g. {bad_docs[0]!r}")
