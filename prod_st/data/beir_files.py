"""Readers for the files of a BEIR-format folder: corpus.jsonl, queries.jsonl (or an MS MARCO / TREC
topics style queries.tsv), qrels/<split>.tsv (BEIR's header format or TREC's `qid Q0 docid rel`). Plain or gzipped.

Corpus and queries become memory-mapped Arrow tables (`datasets.Dataset`) cached under the prod-st cache,
keyed by the file's path, size and modification time, so a large corpus is parsed once and never held
twice in memory. Every malformed line is reported as `file:line: what is wrong` (bytes that are not UTF-8
too); an empty file, and a corpus or queries file that repeats an id, are errors. The MS MARCO and DPR loaders
(`msmarco.py`, `dpr.py`) reuse these helpers with their own row generators.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from datasets.io.generator import GeneratorDatasetInputStream

from prod_st.data.layout import find_file, find_split_files  # noqa: F401  (the loaders import them from here)
from prod_st.util.errors import DataError, ProdStError
from prod_st.util.paths import cache_dir, discard_damaged

CORPUS_FEATURES = datasets.Features(
    {"_id": datasets.Value("string"), "title": datasets.Value("string"), "text": datasets.Value("string")}
)
QUERY_FEATURES = datasets.Features({"_id": datasets.Value("string"), "text": datasets.Value("string")})
ID_NAMES = {"corpus": "document", "queries": "query"}  # tables whose ids must be unique -> what an id names


def open_text(path: Path):
    """Open a text file, transparently gunzipping `*.gz`."""
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _jsonl_rows(path: str, kind: str, size: int, mtime_ns: int) -> Iterator[dict]:
    # size and mtime_ns are unused here: they are part of the cache key of Dataset.from_generator.
    with open_text(Path(path)) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: malformed JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict) or "_id" not in row or not isinstance(row.get("text"), str):
                raise DataError(f'{path}:{line_no}: expected an object with "_id" and a string "text"')
            out = {"_id": str(row["_id"]), "text": row["text"]}
            if kind == "corpus":
                out["title"] = str(row.get("title") or "")
            yield out


def tsv_id_text_rows(path: str, kind: str, size: int, mtime_ns: int) -> Iterator[dict]:
    """`id<TAB>text` lines: MS MARCO / TREC topics queries, or (kind="corpus", empty titles) MS MARCO's
    collection.tsv."""
    with open_text(Path(path)) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2:
                raise DataError(f"{path}:{line_no}: expected `id<TAB>text`, found {len(parts)} fields")
            row = {"_id": parts[0], "text": parts[1]}
            if kind == "corpus":
                row["title"] = ""
            yield row


def read_table(
    path: Path, kind: str, generator: Callable[..., Iterator[dict]] | None = None,
    features: datasets.Features | None = None, **options,
) -> datasets.Dataset:
    """Read a corpus (`kind="corpus"`) or queries file into a memory-mapped, cached Arrow dataset.

    By default the rows come from the BEIR JSONL reader (`*.jsonl*`) or the `id<TAB>text` reader; other formats
    pass their own `generator(path, kind, size, mtime_ns, **options)` (and `features` when the columns are not
    the corpus / queries ones). `options` are part of the cache key, like the file's path, size and mtime.
    A file without rows is an error, and so is a repeated id in a corpus or queries file (`check_unique_ids`)."""
    path = path.resolve()
    stat = path.stat()
    if generator is None:
        generator = _jsonl_rows if ".jsonl" in path.name else tsv_id_text_rows  # .tsv/.txt: `id<TAB>text`
    if features is None:
        features = CORPUS_FEATURES if kind == "corpus" else QUERY_FEATURES
    arguments = dict(
        generator=_rows_or_error, features=features, cache_dir=str(cache_dir("arrow")),
        gen_kwargs={"rows": generator, "path": str(path), "kind": kind, "size": stat.st_size,
                    "mtime_ns": stat.st_mtime_ns, **options},
    )
    try:
        try:
            table = datasets.Dataset.from_generator(**arguments)
        except (pa.ArrowException, OSError) as e:  # its cached Arrow copy is damaged: made again from the file
            discard_damaged(Path(GeneratorDatasetInputStream(**arguments).builder.cache_dir), e)
            table = datasets.Dataset.from_generator(**arguments)
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, ProdStError):  # a row generator's complaint about the file's contents
            raise DataError(str(e.__cause__)) from None
        if isinstance(e.__cause__, UnicodeDecodeError):
            raise not_utf8(path) from None
        raise DataError(f"{path}: could not read ({e.__cause__ or e})") from None
    if kind in ID_NAMES:
        check_unique_ids(table, path, ID_NAMES[kind])
    return table


def _rows_or_error(rows: Callable[..., Iterator[dict]], path: str, kind: str, **kwargs) -> Iterator[dict]:
    """The rows of `rows(path, kind, ...)`; none at all is an error (an empty table is no dataset)."""
    empty = True
    for row in rows(path=path, kind=kind, **kwargs):
        empty = False
        yield row
    if empty:
        rows_are = {"corpus": "documents", "queries": "queries", "questions": "questions"}.get(kind, "rows")
        raise DataError(f"{path}: no {rows_are} in this file (it is empty)")


def not_utf8(path: Path) -> DataError:
    """The error for a file that is not UTF-8, naming the first bad line: read again as bytes, line by line,
    which only an error pays for (a newline byte never occurs inside a multi-byte UTF-8 character)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return DataError(f"{path}:{line_no}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte "
                                   f"{e.start + 1} of the line): save the file as UTF-8")
    return DataError(f"{path}: not UTF-8 text: save the file as UTF-8")


def check_unique_ids(table: datasets.Dataset, path: Path, what: str) -> None:
    """A repeated `_id` is an error naming the first one repeated (duplicate documents or queries change the
    metrics silently). Counted with Arrow (one hash pass, no Python object per row, ~4 s for 8.8M ids), once
    per cached table: a marker in the cache records that the table was checked."""
    marker = cache_dir("arrow", "unique-ids") / table._fingerprint
    if marker.exists():
        return
    counts = pc.value_counts(table.data.column("_id"))  # distinct ids, in the order of their first occurrence
    if len(counts) != len(table):
        repeated = counts.filter(pc.greater(counts.field("counts"), 1))[0]
        raise DataError(f"{path}: {what} id {repeated['values'].as_py()!r} appears {repeated['counts'].as_py()} "
                          f"times ({len(table) - len(counts)} row(s) repeat an earlier id): ids must be unique")
    marker.touch()


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """Relevance judgements as {query id: {doc id: grade}}, from BEIR's `query-id corpus-id score` TSV
    (header line optional) or a TREC qrels file (`qid Q0 docid grade`, whitespace separated)."""
    qrels: dict[str, dict[str, int]] = {}
    try:
        _qrels_lines(path, qrels)
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    if not qrels:
        raise DataError(f"{path}: no relevance judgements in this file (empty, or only a header)")
    return qrels


def _qrels_lines(path: Path, qrels: dict[str, dict[str, int]]) -> None:
    with open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if line_no == 1 and parts[-1].lower() == "score":
                continue  # BEIR header
            if len(parts) == 3:
                qid, docid, grade = parts
            elif len(parts) == 4:
                qid, _, docid, grade = parts
            else:
                raise DataError(
                    f"{path}:{line_no}: expected `query-id corpus-id score` or TREC `qid Q0 docid grade`, "
                    f"found {len(parts)} fields"
                )
            try:
                qrels.setdefault(qid, {})[docid] = int(float(grade))
            except ValueError:
                raise DataError(f"{path}:{line_no}: relevance grade {grade!r} is not a number") from None
