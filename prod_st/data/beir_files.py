"""Readers for the files of a BEIR-format folder: corpus.jsonl, queries.jsonl (or an MS MARCO / TREC
topics style queries.tsv), qrels/<split>.tsv (BEIR's header format or TREC's `qid Q0 docid rel`). Plain or gzipped.

Corpus and queries become memory-mapped Arrow tables (`datasets.Dataset`) cached under the prod-st cache,
keyed by the file's path, size and modification time, so a large corpus is parsed once and never held
twice in memory. A BEIR JSONL file is parsed by pyarrow's JSON reader, chunk by chunk of whole lines, written
as Arrow tables; anything that reader cannot take exactly as the line reader would hands the file to the
line reader (`json.loads` per line), which gives the same rows and today's errors. Every malformed line is
reported as `file:line: what is wrong` (bytes that are not UTF-8 too); an empty file, and a corpus or queries
file that repeats an id, are errors. The MS MARCO and DPR loaders (`msmarco.py`, `dpr.py`) reuse these helpers
with their own row generators.
"""

from __future__ import annotations

import gzip
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
from datasets.builder import Key
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


CHUNK_BYTES = 8 << 20  # whole lines handed to one pyarrow.json call (parsed in parallel blocks of BLOCK_BYTES)
BLOCK_BYTES = 2 << 20  # pyarrow parses a chunk in blocks of this size on its threads (a longer line still parses)
FALLBACK_ROWS = 10_000  # rows of the line reader per table written


class _NotFast(Exception):
    """A chunk pyarrow's reader cannot take exactly as `_jsonl_rows` would: the line reader takes over."""


def _jsonl_tables(path: str, kind: str, size: int, mtime_ns: int) -> Iterator[pa.Table]:
    """The rows of a BEIR JSONL file as Arrow tables, equal to `_jsonl_rows`'s (values, order, types).

    pyarrow.json parses the file in chunks of whole lines (`_pyarrow_tables`). On anything it cannot take as the
    line reader would (a parse or cast error, a line that is not one object, a missing "_id" or "text", bytes
    that are not UTF-8, a read error), the line reader reads the file again from line 1, skipping the rows
    already written: it raises today's `file:line:` error, or (pyarrow being stricter than `json.loads` on a few
    things, e.g. ids that mix numbers and strings) gives the remaining rows."""
    written = 0
    fast = _pyarrow_tables(Path(path), kind)
    while True:
        try:
            table = next(fast)
        except StopIteration:
            break
        except Exception:  # whatever it is, the line reader says it as today, or reads past it
            schema = (CORPUS_FEATURES if kind == "corpus" else QUERY_FEATURES).arrow_schema
            rows = itertools.islice(_jsonl_rows(path, kind, size, mtime_ns), written, None)
            while batch := list(itertools.islice(rows, FALLBACK_ROWS)):
                written += len(batch)
                yield pa.Table.from_pylist(batch, schema=schema)
            break
        written += len(table)
        yield table
    if not written:
        raise no_rows(path, kind)


def _pyarrow_tables(path: Path, kind: str) -> Iterator[pa.Table]:
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        rest = b""
        while block := f.read(CHUNK_BYTES):
            block = rest + block
            cut = block.rfind(b"\n") + 1
            rest = block[cut:]
            if cut:
                yield _parse_chunk(block[:cut] if rest else block, kind)
        if rest:
            yield _parse_chunk(rest, kind)


def _parse_chunk(chunk: bytes, kind: str) -> pa.Table:
    """The rows of whole lines `chunk`, or `_NotFast`. What makes them the line reader's rows: every line is one
    JSON object (`}` newline `{` at every line break: a newline never occurs inside a JSON string, and `}` then
    `{` never follows inside an object, so no object spans lines and no line is blank; as many rows as lines),
    the line breaks are Python's (no lone carriage return), the bytes are UTF-8, "_id" is a string or (as in
    the chunk's first line) an integer, cast to the same string as `str()`, "text" a string, "title" a string
    or absent/null (then "")."""
    lines = chunk.count(b"\n") + (not chunk.endswith(b"\n"))
    if (not chunk.startswith(b"{") or not chunk.endswith((b"}", b"}\n", b"}\r\n"))
            or chunk.count(b"}\n{") + chunk.count(b"}\r\n{") != lines - 1
            or chunk.count(b"\r") != chunk.count(b"\r\n")):
        raise _NotFast("not one JSON object per line")
    whole = pa.Array.from_buffers(pa.large_string(), 1, [None, pa.array([0, len(chunk)], pa.int64()).buffers()[1],
                                                          pa.py_buffer(chunk)])
    whole.validate(full=True)  # UTF-8 everywhere, fields pyarrow skips included (ArrowInvalid if not)
    end = chunk.find(b"\n")
    first = json.loads(chunk[:end] if end >= 0 else chunk)
    id_type = pa.int64() if type(first.get("_id")) is int else pa.string()  # bool is not an id
    names = ["_id", "title", "text"] if kind == "corpus" else ["_id", "text"]
    schema = pa.schema([("_id", id_type)] + [(name, pa.string()) for name in names[1:]])
    table = pa_json.read_json(pa.BufferReader(chunk), read_options=pa_json.ReadOptions(block_size=BLOCK_BYTES),
                              parse_options=pa_json.ParseOptions(explicit_schema=schema,
                                                                 unexpected_field_behavior="ignore"))
    if table.num_rows != lines or table["_id"].null_count or table["text"].null_count:
        raise _NotFast("a line without \"_id\" or a string \"text\"")
    columns = {"_id": table["_id"].cast(pa.string()), "text": table["text"]}
    if kind == "corpus":
        columns["title"] = table["title"].fill_null("")
    return pa.table({name: columns[name] for name in names})


@dataclass
class _TablesConfig(datasets.BuilderConfig):
    tables: Callable[..., Iterator[pa.Table]] | None = None
    gen_kwargs: dict | None = None
    features: datasets.Features | None = None


class BeirJsonl(datasets.ArrowBasedBuilder):
    """`Dataset.from_generator`'s builder (same cache folder, lock, memory-mapped result), fed Arrow tables
    instead of one dict per row: `config.tables(**config.gen_kwargs)` yields them. Its own folder in the cache
    (`beir_jsonl/`), so no table of the line reader's builder (`generator/`) is taken for one of its own."""

    BUILDER_CONFIG_CLASS = _TablesConfig

    def _info(self):
        return datasets.DatasetInfo(features=self.config.features)

    def _split_generators(self, dl_manager):
        return [datasets.SplitGenerator(name=datasets.Split.TRAIN, gen_kwargs=self.config.gen_kwargs)]

    def _generate_tables(self, **gen_kwargs):
        for index, table in enumerate(self.config.tables(**gen_kwargs)):
            yield Key(0, index), table


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
    if features is None:
        features = CORPUS_FEATURES if kind == "corpus" else QUERY_FEATURES
    gen_kwargs = {"path": str(path), "kind": kind, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, **options}
    if generator is None and ".jsonl" in path.name:  # BEIR JSONL: pyarrow's JSON reader
        def builder() -> datasets.builder.DatasetBuilder:
            return BeirJsonl(cache_dir=str(cache_dir("arrow")), dataset_name="beir_jsonl", features=features,
                             tables=_jsonl_tables, gen_kwargs=gen_kwargs)
    else:  # .tsv/.txt: `id<TAB>text`, or the format's own generator: one dict per row
        def builder() -> datasets.builder.DatasetBuilder:
            return GeneratorDatasetInputStream(
                generator=_rows_or_error, features=features, cache_dir=str(cache_dir("arrow")),
                gen_kwargs={"rows": generator or tsv_id_text_rows, **gen_kwargs}).builder
    try:
        try:
            table = _prepared(builder())
        except (pa.ArrowException, OSError) as e:  # its cached Arrow copy is damaged: made again from the file
            discard_damaged(Path(builder().cache_dir), e)
            table = _prepared(builder())
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, ProdStError):  # a row generator's complaint about the file's contents
            raise DataError(str(e.__cause__)) from None
        if isinstance(e.__cause__, UnicodeDecodeError):
            raise not_utf8(path) from None
        raise DataError(f"{path}: could not read ({e.__cause__ or e})") from None
    if kind in ID_NAMES:
        check_unique_ids(table, path, ID_NAMES[kind])
    return table


def _prepared(builder: datasets.builder.DatasetBuilder) -> datasets.Dataset:
    """What `Dataset.from_generator` does with its builder: write the table once, then map it."""
    builder.download_and_prepare()
    return builder.as_dataset(split=datasets.Split.TRAIN)


def _rows_or_error(rows: Callable[..., Iterator[dict]], path: str, kind: str, **kwargs) -> Iterator[dict]:
    """The rows of `rows(path, kind, ...)`; none at all is an error (an empty table is no dataset)."""
    empty = True
    for row in rows(path=path, kind=kind, **kwargs):
        empty = False
        yield row
    if empty:
        raise no_rows(path, kind)


def no_rows(path: str, kind: str) -> DataError:
    """The error for a file without rows (an empty table is no dataset)."""
    rows_are = {"corpus": "documents", "queries": "queries", "questions": "questions"}.get(kind, "rows")
    return DataError(f"{path}: no {rows_are} in this file (it is empty)")


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
