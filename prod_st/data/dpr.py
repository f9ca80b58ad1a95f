"""DPR's Natural Questions release (facebookresearch/DPR, `dpr/data/download_data.py`), in one folder:

    psgs_w100.tsv        the 21M Wikipedia passages: header `id<TAB>text<TAB>title`, integer ids, fields
                         CSV-quoted (`"..."` with doubled inner quotes), read with csv like DPR does
    nq-train.json        a JSON list of {question, answers, positive_ctxs: [{title, text, passage_id | psg_id}],
    nq-dev.json          negative_ctxs, hard_negative_ctxs}; also named biencoder-nq-{train,dev}.json; or .json.gz
    nq-test.qa.csv       `question<TAB>['answer', ...]` (a Python list literal), no passage ids; also nq-test.csv

Splits: train / dev from the JSON files (query ids `train-<i>` / `dev-<i>`, i the 0-based position in the file;
qrels = the positive_ctxs' passage ids, grade 1; questions without positives have answers but no qrels), test
from the .qa.csv (ids `test-<i>`, answers only, no qrels: evaluate with `prod_st.answer_match.top_k_accuracy`).

The JSON lists are streamed with the standard library (`json.JSONDecoder.raw_decode` over 1 MiB chunks; ijson
is not a dependency), one question at a time, and only the question, answers and positive ids are kept
(the negative contexts are dropped), so the ~8 GB nq-train.json never sits in memory. The result is cached as
an Arrow table like every other file.
"""

from __future__ import annotations

import ast
import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets

from prod_st.data.beir_files import find_file, find_split_files, open_text, read_table
from prod_st.data.layout import DPR_PASSAGES as PASSAGES, DPR_SPLITS as SPLITS  # read without datasets
from prod_st.errors import ProdStError

QUESTION_FEATURES = datasets.Features({
    "_id": datasets.Value("string"),
    "text": datasets.Value("string"),
    "answers": datasets.Sequence(datasets.Value("string")),
    "positives": datasets.Sequence(datasets.Value("string")),
})

_CHUNK = 1 << 20  # characters read at a time from a JSON list
_MAX_ELEMENT = 1 << 28  # a list element this long without parsing is a malformed file, not a big question

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
    for index, (line_no, item) in enumerate(iter_json_list(Path(path))):
        where = f"{path}:{line_no}"
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            raise ProdStError(f'{where}: expected an object with a string "question" (question {index})')
        answers = item.get("answers") or []
        if not isinstance(answers, list):
            raise ProdStError(f'{where}: "answers" of question {index} is not a list')
        positives = []
        for ctx in item.get("positive_ctxs") or []:
            passage_id = ctx.get("passage_id", ctx.get("psg_id")) if isinstance(ctx, dict) else None
            if passage_id is None:
                raise ProdStError(f"{where}: a positive_ctxs entry of question {index} has no passage_id (or psg_id)")
            positives.append(str(passage_id))
        yield {"_id": f"{split}-{index}", "text": item["question"], "answers": [str(a) for a in answers],
               "positives": positives}


class _Reader:
    """A sliding window over a text file: `buf[pos:]` is unread; `line` is the line number at `counted`."""

    def __init__(self, f):
        self.f, self.buf, self.pos, self.eof = f, "", 0, False
        self.line, self.counted = 1, 0

    def fill(self) -> None:
        """Drop what was consumed and read one more chunk (sets `eof` at the end of the file)."""
        self.line_at(self.pos)
        self.buf, self.counted, self.pos = self.buf[self.pos:], 0, 0
        chunk = self.f.read(_CHUNK)
        self.eof = not chunk
        self.buf += chunk

    def peek(self) -> str:
        """The next non-whitespace character ('' at the end of the file), `pos` moved onto it."""
        while True:
            self.pos = _WHITESPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or self.eof:
                return self.buf[self.pos:self.pos + 1]
            self.fill()

    def line_at(self, index: int) -> int:
        if index >= self.counted:
            self.line += self.buf.count("\n", self.counted, index)
            self.counted = index
            return self.line
        return self.line - self.buf.count("\n", index, self.counted)


_WHITESPACE = re.compile(r"[ \t\n\r]*")


def iter_json_list(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, element) for each element of the JSON list in `path`, one at a time."""
    decoder = json.JSONDecoder()
    with open_text(path) as f:
        r = _Reader(f)
        if r.peek() != "[":
            raise ProdStError(f"{path}:{r.line_at(r.pos)}: expected a JSON list")
        r.pos += 1
        if r.peek() == "]":
            return
        while True:
            start = r.pos
            try:
                element, end = decoder.raw_decode(r.buf, r.pos)
                complete = end < len(r.buf) or r.eof  # a number could continue in the next chunk
            except json.JSONDecodeError as e:
                if r.eof or len(r.buf) - r.pos > _MAX_ELEMENT:
                    raise ProdStError(f"{path}:{r.line_at(e.pos)}: malformed JSON ({e.msg})") from None
                complete = False
            if not complete:
                r.fill()
                continue
            yield r.line_at(start), element
            r.pos = end
            following = r.peek()
            if following == "]":
                return
            if following != ",":
                raise ProdStError(f"{path}:{r.line_at(r.pos)}: expected ',' or ']' after a list element")
            r.pos += 1
            r.peek()
