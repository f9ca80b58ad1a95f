"""MS MARCO in its original release formats (not BEIR's conversion), with TREC DL 2019 as the test split.

Document ranking (the TREC DL / MS MARCO document release), in one folder, each file plain or `.gz`:

    msmarco-docs.tsv                 docid<TAB>url<TAB>title<TAB>body   (tabs removed from bodies upstream)
    msmarco-doctrain-queries.tsv     qid<TAB>text            msmarco-doctrain-qrels.tsv   qid 0 docid 1
    msmarco-docdev-queries.tsv       qid<TAB>text            msmarco-docdev-qrels.tsv     qid 0 docid 1
    msmarco-test2019-queries.tsv     qid<TAB>text            2019qrels-docs.txt           qid Q0 docid 0-3

Passage ranking (collectionandqueries.tar.gz, plus the TREC DL 2019 passage files):

    collection.tsv                   pid<TAB>passage
    queries.train.tsv                qrels.train.tsv          (qid 0 pid 1)
    queries.dev.small.tsv            qrels.dev.small.tsv
    msmarco-test2019-queries.tsv     2019qrels-pass.txt       (qid Q0 pid 0-3)

Splits: train, dev (the doc dev set / the passage dev.small set), test (TREC DL 2019: 200 topics, of which the 43
judged ones are the split's queries). Corpus rows are `_id, title, text` like BEIR's corpus; passages have an
empty title. Document bodies are cut to their first `max_body_chars` characters (default 10,000) while reading:
PROD truncates documents anyway (the model's maximum length truncates tokens, far fewer than 10,000
characters), and some bodies are megabytes long, which keeps the Arrow table of 3.2M documents sane. The cut
is part of the cache key.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import datasets

from prod_st.data.beir_files import find_file, find_split_files, open_text, read_qrels, read_table
from prod_st.data.layout import (  # file names and splits: read without datasets
    MSMARCO_DOC_CORPUS as DOC_CORPUS,
)
from prod_st.data.layout import (
    MSMARCO_DOC_SPLITS as DOC_SPLITS,
)
from prod_st.data.layout import (
    MSMARCO_PASSAGE_CORPUS as PASSAGE_CORPUS,
)
from prod_st.data.layout import (
    MSMARCO_PASSAGE_SPLITS as PASSAGE_SPLITS,
)
from prod_st.util.errors import ProdStError

MAX_BODY_CHARS = 10_000

Tables = tuple[datasets.Dataset, datasets.Dataset, dict[str, dict[str, int]], Path]


def doc_rows(path: str, kind: str, size: int, mtime_ns: int, max_body_chars: int) -> Iterator[dict]:
    """Rows of msmarco-docs.tsv: `docid<TAB>url<TAB>title<TAB>body` -> {_id, title, text=body[:max_body_chars]}."""
    with open_text(Path(path)) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 4:
                raise ProdStError(
                    f"{path}:{line_no}: expected `docid<TAB>url<TAB>title<TAB>body`, found {len(parts)} fields"
                )
            yield {"_id": parts[0], "title": parts[2].strip(), "text": parts[3].strip()[:max_body_chars]}


def load_msmarco_doc(folder: Path, split: str, max_body_chars: int = MAX_BODY_CHARS) -> Tables:
    """(corpus, queries, qrels, qrels file) of `split` of an MS MARCO document folder."""
    queries_file, qrels_file = find_split_files(folder, "MS MARCO document", DOC_SPLITS, split)
    corpus = read_table(_corpus_file(folder, DOC_CORPUS), "corpus", doc_rows, max_body_chars=max_body_chars)
    return corpus, read_table(queries_file, "queries"), read_qrels(qrels_file), qrels_file


def load_msmarco_passage(folder: Path, split: str) -> Tables:
    """(corpus, queries, qrels, qrels file) of `split` of an MS MARCO passage folder (original release)."""
    queries_file, qrels_file = find_split_files(folder, "MS MARCO passage", PASSAGE_SPLITS, split)
    corpus = read_table(_corpus_file(folder, PASSAGE_CORPUS), "corpus")  # `pid<TAB>passage`, empty titles
    return corpus, read_table(queries_file, "queries"), read_qrels(qrels_file), qrels_file


def _corpus_file(folder: Path, name: str) -> Path:
    found = find_file(folder, name)
    if found is None:
        raise ProdStError(f"{folder}: no {name} (or {name}.gz)")
    return found
