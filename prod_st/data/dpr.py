"""DPR's Natural Questions release (facebookresearch/DPR, `dpr/data/download_data.py`), in one folder:

    psgs_w100.tsv        the 21M Wikipedia passages: header `id<TAB>text<TAB>title`, integer ids, fields
                         CSV-quoted (`"..."` with doubled inner quotes), read with csv like DPR does
    nq-train.json        a JSON list of {question, answers, positive_ctxs: [{title, text, passage_id | psg_id}],
    nq-dev.json          negative_ctxs, hard_negative_ctxs}; also named biencoder-nq-{train,dev}.json; or .json.gz
    nq-test.qa.csv       `question<TAB>['answer', ...]` (a Python list literal), no passage ids; also nq-test.csv

Splits: train / dev from the JSON files (query ids `train-<i>` / `dev-<i>`, i the 0-based position in the file;
qrels = the positive_ctxs' passage ids, grade 1; questions without positives have answers but no qrels), test
from the .qa.csv (ids `test-<i>`, answers only, no qrels: evaluate with `prod_st.data.answer_match.top_k_accuracy`).

The JSON lists are streamed with ijson (its C backend: as fast as the standard library's decoder here), one
question at a time, and only the question, answers and positive ids are kept
(the negative contexts are dropped), so the ~8 GB nq-train.json never sits in memory. The result is cached as
an Arrow table like every other file.
"""

from __future__ import annotations

import ast
import csv
import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import ijson

from prod_st.data.beir_files import find_file, find_split_files, open_text, read_table
from prod_st.data.layout import DPR_PASSAGES as PASSAGES  # read without datasets
from prod_st.data.layout import DPR_SPLITS as SPLITS
from prod_st.util.errors import ProdStError

QUESTION_FEATURES = datasets.Features({
    "_id": datasets.Value("string"),
    "text": datasets.Value("string"),
    "answers": datasets.Sequence(datasets.Value("string")),
    "positives": datasets.Sequence(datasets.Value("string")),
})

Tables = tuple[datasets.Dataset, datasets.Dataset, dict[str, dict[str, int]], dict[str, list[str]], Path]


def load_dpr_nq(folder: Path, split: str) -> Tables:
    """(corpus, queries, qrels, answers, questions file) of `split` of a DPR NQ folder."""
    (questions_file,) = find_split_files(folder, "DPR Natural Questions", SPLITS, split)
    passages = find_file(folder, PASSAGES)
    if passages is None:
        raise ProdStError(f"{folder}: no {PASSAGES} (or {PASSAGES}.gz), the DPR Wikipedia passages")
    generator = qa_csv_rows if ".csv" in questions_file.name else json_question_rows
    table = read_table(questions_file, "questions", generator, QUESTION_FEATURES, split=split)
    qrels = {qid: dict.fromkeys(positives, 1) for qid, positives in zip(table["_id"], table["positives"]) if positives}
    answers = dict(zip(table["_id"], table["answers"]))
    corpus = read_table(passages, "corpus", passage_rows)
    return corpus, table.select_columns(["_id", "text"]), qrels, answers, questions_file


def passage_rows(path: str, kind: str, size: int, mtime_ns: int) -> Iterator[dict]:
    """Rows of psgs_w100.tsv (`id<TAB>text<TAB>title`, header line, CSV quoting) -> {_id, title, text}."""
    with open_text(Path(path)) as f:
        reader = csv.reader(f, delimiter="\t")
        try:
            for row in reader:
                if not row or (reader.line_num == 1 and row == ["id", "text", "title"]):
                    continue
                if len(row) != 3:
                    raise ProdStError(
                        f"{path}:{reader.line_num}: expected `id<TAB>text<TAB>title`, found {len(row)} fields"
                    )
                yield {"_id": row[0], "title": row[2], "text": row[1]}
        except csv.Error as e:
            raise ProdStError(f"{path}:{reader.line_num}: malformed TSV ({e})") from None


def qa_csv_rows(path: str, kind: str, size: int, mtime_ns: int, split: str) -> Iterator[dict]:
    """Rows of a DPR .qa.csv (`question<TAB>['answer', ...]`) -> {_id: <split>-<i>, text, answers, positives=[]}."""
    with open_text(Path(path)) as f:
        reader = csv.reader(f, delimiter="\t")  # as DPR reads it
        index = 0
        for row in reader:
            if not row:
                continue
            where = f"{path}:{reader.line_num}"
            if len(row) != 2:
                raise ProdStError(f"{where}: expected `question<TAB>['answer', ...]`, found {len(row)} fields")
            try:
                answers = ast.literal_eval(row[1])
            except (ValueError, SyntaxError):
                answers = None
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                raise ProdStError(f"{where}: answers {row[1][:60]!r} are not a Python list of strings")
            yield {"_id": f"{split}-{index}", "text": row[0], "answers": answers, "positives": []}
            index += 1


def json_question_rows(path: str, kind: str, size: int, mtime_ns: int, split: str) -> Iterator[dict]:
    """Rows of a DPR retriever JSON (nq-train.json) -> {_id: <split>-<i>, text, answers, positives}."""
    for index, item in enumerate(iter_json_list(Path(path))):
        where = f"{path}: question {index}"
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            raise ProdStError(f'{where}: expected an object with a string "question"')
        answers = item.get("answers") or []
        if not isinstance(answers, list):
            raise ProdStError(f'{where}: "answers" is not a list')
        positives = []
        for ctx in item.get("positive_ctxs") or []:
            passage_id = ctx.get("passage_id", ctx.get("psg_id")) if isinstance(ctx, dict) else None
            if passage_id is None:
                raise ProdStError(f"{where}: a positive_ctxs entry has no passage_id (or psg_id)")
            positives.append(str(passage_id))
        yield {"_id": f"{split}-{index}", "text": item["question"], "answers": [str(a) for a in answers],
               "positives": positives}


def iter_json_list(path: Path) -> Iterator[Any]:
    """Each element of the JSON list in `path` (or `path.gz`), one at a time (ijson)."""
    index = 0
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        try:
            if next(ijson.parse(f), (None, None))[1] != "start_array":
                raise ProdStError(f"{path}: expected a JSON list")
            f.seek(0)
            for index, element in enumerate(ijson.items(f, "item", use_float=True), 1):
                yield element
        except (ijson.JSONError, UnicodeDecodeError, OSError) as e:
            reason = e.args[0] if e.args else e
            reason = reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)
            raise ProdStError(f"{path}: malformed JSON at element {index} of the list (counting from 0) "
                              f"({' '.join(reason.split())[:120]})") from None
