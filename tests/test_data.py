"""The data layer: embedded benchmark, BEIR folders, TREC-format files, and every bad-input error."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
from conftest import FIXTURES, TOY_QRELS, write_beir

from prod_st.data import load_retrieval_data
from prod_st.data.beir_files import read_qrels, read_table
from prod_st.util.errors import ProdStError

DL19 = FIXTURES / "trec-dl19"


def test_beir_folder_loads_corpus_queries_and_split_qrels(toy_beir):
    data = load_retrieval_data(toy_beir, "test")
    assert len(data.corpus) == 6 and len(data.queries) == 4
    assert data.qrels == TOY_QRELS
    assert data.corpus[1] == {"_id": "d2", "title": "bank", "text": "sloping land beside a body of water"}
    assert data.split_queries()["q3"] == "the cat purred on my lap"


def test_corpus_is_a_memory_mapped_arrow_table_reused_across_loads(toy_beir):
    first = load_retrieval_data(toy_beir).corpus
    second = load_retrieval_data(toy_beir).corpus
    assert first.cache_files and first.cache_files == second.cache_files  # parsed once, then mapped
    assert Path(first.cache_files[0]["filename"]).suffix == ".arrow"


def test_gzipped_beir_files_and_integer_ids(tmp_path):
    folder = tmp_path / "gz"
    (folder / "qrels").mkdir(parents=True)
    with gzip.open(folder / "corpus.jsonl.gz", "wt") as f:
        f.write(json.dumps({"_id": 7, "text": "seven"}) + "\n")  # no title, integer id
    with gzip.open(folder / "queries.jsonl.gz", "wt") as f:
        f.write(json.dumps({"_id": 1, "text": "what is seven"}) + "\n")
    (folder / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\n1\t7\t1\n")
    data = load_retrieval_data(folder, "dev")
    assert data.corpus[0] == {"_id": "7", "title": "", "text": "seven"}
    assert data.qrels == {"1": {"7": 1}}


def test_real_trec_dl19_passage_qrels_and_topics():
    qrels = read_qrels(DL19 / "qrels.dl19-passage.txt")
    assert len(qrels) == 43
    assert sum(len(v) for v in qrels.values()) == 9260
    grades = [g for judged in qrels.values() for g in judged.values()]
    assert {g: grades.count(g) for g in set(grades)} == {0: 5158, 1: 1601, 2: 1804, 3: 697}
    topics = read_table(DL19 / "topics.dl19-passage.txt", "queries")
    assert len(topics) == 43
    assert topics[0] == {"_id": "156493", "text": "do goldfish grow"}
    assert set(topics["_id"]) == set(qrels)


def test_trec_format_folder_end_to_end(tmp_path):
    """A BEIR-like folder with MS MARCO-style queries.tsv and TREC qrels: the DL19 layout."""
    folder = tmp_path / "dl19"
    (folder / "qrels").mkdir(parents=True)
    shutil.copy(DL19 / "topics.dl19-passage.txt", folder / "queries.tsv")
    shutil.copy(DL19 / "qrels.dl19-passage.txt", folder / "qrels" / "test.tsv")
    doc_ids = {d for judged in read_qrels(DL19 / "qrels.dl19-passage.txt").values() for d in judged}
    with open(folder / "corpus.jsonl", "w") as f:
        for doc_id in sorted(doc_ids):
            f.write(json.dumps({"_id": doc_id, "text": f"passage {doc_id}"}) + "\n")
    data = load_retrieval_data(folder, "test")
    assert len(data.qrels) == 43 and len(data.corpus) == len(doc_ids)
    assert data.qrels["19335"]["1017759"] == 0


def test_embedded_wordnet_gloss():
    data = load_retrieval_data("wordnet-gloss", "test")
    assert len(data.corpus) == 117_659  # every WordNet 3.0 synset with a definition
    bank = data.corpus.filter(lambda row: row["_id"] == "n08420278")[0]
    assert bank["title"] == "depository financial institution, bank, banking concern, banking company"
    assert bank["text"].startswith("a financial institution that accepts deposits")
    sizes = {split: len(load_retrieval_data("wordnet-gloss", split, check_ids=False).qrels) for split in ("train", "dev")}
    assert sizes == {"train": 25_830, "dev": 3_229} and len(data.qrels) == 3_228
    # one positive per query, and no synset (document) in two splits
    positives = {split: {d for j in load_retrieval_data("wordnet-gloss", split, check_ids=False).qrels.values() for d in j}
                 for split in ("train", "dev", "test")}
    assert not positives["train"] & positives["test"] and not positives["dev"] & positives["test"]
    assert all(len(j) == 1 for j in data.qrels.values())


# ---- bad input: one-line ProdStError naming what is wrong ----

def test_missing_folder():
    with pytest.raises(ProdStError, match="does not exist"):
        load_retrieval_data("/no/such/folder")


def test_unknown_dataset_name_lists_what_is_accepted():
    with pytest.raises(ProdStError, match=r"unknown dataset 'wordnet-glos'.*wordnet-gloss.*scifact"):
        load_retrieval_data("wordnet-glos")


def test_beir_name_offline_says_how_to_pass_a_folder(monkeypatch):
    import beir.util

    def offline(url, out_dir):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(beir.util, "download_and_unzip", offline)
    with pytest.raises(ProdStError, match=r"could not download BEIR dataset 'scifact'.*pass the folder"):
        load_retrieval_data("scifact")


def test_malformed_jsonl_line_names_file_and_line(toy_beir):
    lines = (toy_beir / "corpus.jsonl").read_text().splitlines()
    lines[2] = '{"_id": "d3", "text": "broken'
    (toy_beir / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ProdStError, match=r"corpus\.jsonl:3: malformed JSON"):
        load_retrieval_data(toy_beir)


def test_jsonl_line_without_text(toy_beir):
    with open(toy_beir / "queries.jsonl", "a") as f:
        f.write('{"_id": "q9"}\n')
    with pytest.raises(ProdStError, match=r"queries\.jsonl:5: expected an object"):
        load_retrieval_data(toy_beir)


@pytest.mark.parametrize(
    "line, message",
    [("q1\tnope\t1", r"1 document id\(s\) not in the corpus, e\.g\. 'nope'"),
     ("q404\td1\t1", r"1 query id\(s\) not in the queries file, e\.g\. 'q404'")],
)
def test_qrels_naming_unknown_ids(toy_beir, line, message):
    with open(toy_beir / "qrels" / "test.tsv", "a") as f:
        f.write(line + "\n")
    with pytest.raises(ProdStError, match=message):
        load_retrieval_data(toy_beir)


def test_malformed_qrels_line(toy_beir):
    with open(toy_beir / "qrels" / "test.tsv", "a") as f:
        f.write("q1 d1\n")
    with pytest.raises(ProdStError, match=r"test\.tsv:6: expected"):
        load_retrieval_data(toy_beir)


def test_unknown_split_lists_available(toy_beir):
    with pytest.raises(ProdStError, match=r"no qrels for split 'dev' \(available: test\)"):
        load_retrieval_data(toy_beir, "dev")


def test_folder_without_corpus(tmp_path):
    write_beir(tmp_path / "x", {}, {}, {})
    (tmp_path / "x" / "corpus.jsonl").unlink()
    with pytest.raises(ProdStError, match="no corpus.jsonl"):
        load_retrieval_data(tmp_path / "x")


# ---- empty files, bytes that are not UTF-8, repeated ids ----

@pytest.mark.parametrize("name, content, message", [
    ("corpus.jsonl", "", r"corpus\.jsonl: no documents in this file \(it is empty\)"),
    ("corpus.jsonl", "\n\n", r"corpus\.jsonl: no documents in this file"),
    ("queries.jsonl", "", r"queries\.jsonl: no queries in this file"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\n", r"test\.tsv: no relevance judgements in this file"),
])
def test_empty_file_is_an_error(toy_beir, name, content, message):
    (toy_beir / name).write_text(content)
    with pytest.raises(ProdStError, match=message):
        load_retrieval_data(toy_beir)


@pytest.mark.parametrize("name, index, bad", [
    ("corpus.jsonl", 2, b'{"_id": "d3", "title": "cat", "text": "caf\xe9 au lait"}'),
    ("queries.jsonl", 2, b'{"_id": "q3", "text": "\xff the cat purred"}'),
    ("qrels/test.tsv", 2, b"q1\td\xff\t1"),
])
@pytest.mark.parametrize("gz", [False, True])
def test_bytes_that_are_not_utf8_name_file_and_line(toy_beir, name, index, bad, gz):
    path = toy_beir / name
    lines = path.read_bytes().splitlines()
    lines[index] = bad
    data = b"\n".join(lines) + b"\n"
    if gz:
        path.unlink()
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    with pytest.raises(ProdStError, match=rf"{path.name.replace('.', '[.]')}:{index + 1}: not UTF-8 text \(byte 0x"):
        load_retrieval_data(toy_beir)


def test_repeated_document_id_names_the_first_one(toy_beir):
    load_retrieval_data(toy_beir)  # checked once and marked clean in the cache...
    corpus = toy_beir / "corpus.jsonl"
    lines = corpus.read_text().splitlines()
    corpus.write_text("\n".join(lines + [lines[3], lines[1], lines[1]]) + "\n")  # d4 once, d2 twice
    with pytest.raises(ProdStError, match=r"corpus\.jsonl: document id 'd2' appears 3 times \(3 row\(s\) repeat"):
        load_retrieval_data(toy_beir)  # ...but a changed file is a new table, checked again


def test_repeated_query_id(toy_beir):
    with open(toy_beir / "queries.jsonl", "a") as f:
        f.write(json.dumps({"_id": "q2", "text": "another text under the same id"}) + "\n")
    with pytest.raises(ProdStError, match=r"queries\.jsonl: query id 'q2' appears 2 times"):
        load_retrieval_data(toy_beir)


def test_split_queries_is_built_once_per_qrels_and_follows_a_new_one(toy_beir):
    """Issue 18 item 6: the runner asks for `split_queries()` at every mining, rerank and row build; it is read
    with Arrow once per qrels object and shared, and a split whose qrels are replaced (a recipe's subset) gets
    the new queries."""
    data = load_retrieval_data(toy_beir)
    texts = dict(zip(data.queries["_id"], data.queries["text"]))
    first = data.split_queries()
    assert first == {q: texts[q] for q in data.qrels} and list(first) == list(data.qrels)
    assert data.split_queries() is first
    data.qrels = dict(list(data.qrels.items())[::-1][:2])
    assert list(data.split_queries()) == list(data.qrels) and len(data.split_queries()) == 2
    data.qrels = {"not-a-query": {"d1": 1}}
    with pytest.raises(KeyError, match="not-a-query"):
        data.split_queries()


def test_corpus_subset_matched_with_arrow_is_the_subset_of_the_per_document_loop():
    """Issue 18 item 6, re-drawn in issue 20: the recipe's corpus subset matches judged ids with Arrow instead of a
    Python pass over every document id, and is what a per-document loop over the same draws gives: every dev and
    test judged document, the seeded fill, every training judged document (rows and datasets fingerprint, which
    the run's caches are keyed on)."""
    import numpy as np

    from prod_st.training.stage_data import _sample_queries, load_run_data, split_rng

    data = load_run_data("wordnet-gloss", sizes=(30, 5, 5), corpus_size=300, seed=3)
    every = [load_retrieval_data("wordnet-gloss", split) for split in ("train", "dev", "test")]
    for split, n, name in zip(every, (30, 5, 5), ("train", "dev", "test")):
        split.qrels = _sample_queries(split.qrels, n, split_rng(3, name))
    evaluated = {d for split in every[1:] for j in split.qrels.values() for d in j}
    trained = {d for j in every[0].qrels.values() for d in j}
    ids = every[0].corpus["_id"]
    needed = [i for i, d in enumerate(ids) if d in evaluated]
    others = [i for i, d in enumerate(ids) if d not in evaluated]
    drawn = np.random.default_rng(split_rng(3, "corpus").getrandbits(128)).choice(len(others), 300 - len(needed),
                                                                                   replace=False)
    rows = sorted({*needed, *(others[i] for i in drawn), *(i for i, d in enumerate(ids) if d in trained)})
    expected = every[0].corpus.select(rows)
    assert data.corpus["_id"] == expected["_id"] and len(needed) >= 10 and len(rows) > 300
    assert data.corpus._fingerprint == expected._fingerprint


def test_dev_test_and_corpus_slice_do_not_move_with_the_training_size():
    """Issue 20 item 1: each subset has its own RNG (seed + name). Another training size leaves the dev and test
    queries and the evaluation slice of the corpus (dev/test judged documents + the seeded fill) as they were;
    the run's corpus is that slice plus the training judged documents it lacks. Another seed moves them all."""
    from prod_st.training.stage_data import load_run_data

    def load(train, seed=3, splits=("train", "dev", "test")):
        return load_run_data("wordnet-gloss", splits=splits, sizes=(train, 20, 20), corpus_size=400, seed=seed)

    small, large = load(30), load(240)
    alone = load(None, splits=(None, "dev", "test"))  # no training split: the evaluation slice alone
    assert len(large.train.qrels) == 240 and len(small.train.qrels) == 30
    for split in ("dev", "test"):
        ids = [sorted(getattr(data, split).qrels) for data in (small, large, alone)]
        assert ids[0] == ids[1] == ids[2]
    evaluation_slice = set(alone.corpus["_id"])
    assert len(evaluation_slice) == 400
    for data in (small, large):
        trained = {d for judged in data.train.qrels.values() for d in judged}
        corpus = set(data.corpus["_id"])
        assert evaluation_slice <= corpus and corpus - evaluation_slice <= trained and trained <= corpus
    other = load(30, seed=4)
    assert sorted(other.dev.qrels) != sorted(small.dev.qrels) and sorted(other.test.qrels) != sorted(small.test.qrels)
    assert not set(load(None, seed=4, splits=(None, "dev", "test")).corpus["_id"]) == evaluation_slice


# ---- BEIR JSONL through pyarrow's JSON reader, the line reader as the fallback ----

def _read_both(path: Path, kind: str = "corpus"):
    """(rows, column types) or the error message, from the pyarrow reader and from the line reader (today's)."""
    from prod_st.data import beir_files

    out = []
    for generator in (None, beir_files._jsonl_rows):  # None: the default (pyarrow); _jsonl_rows: the old route
        try:
            table = read_table(path, kind, generator)
            out.append((table.to_list(), table.features))
        except ProdStError as e:
            out.append(str(e))
    return out


@pytest.fixture
def line_reader_calls(monkeypatch):
    """How often the line reader was asked for rows: zero means pyarrow's reader did the whole file."""
    from prod_st.data import beir_files

    calls = []
    original = beir_files._jsonl_rows

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(beir_files, "_jsonl_rows", counted)
    return calls


def test_jsonl_through_pyarrow_integer_ids_titles_and_extra_fields(tmp_path, line_reader_calls):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        '{"_id": 12, "text": "no title", "metadata": {"url": "http://x", "tags": [1, {"a": null}]}}\n'
        '{"_id": -3, "title": null, "text": "null title"}\n'
        '{"_id": 0, "title": "", "text": "empty title", "extra": 1.5e300}\n'
        '{"_id": 123456789012, "title": "T\\u00e9 \\ud83d\\ude00", "text": "caf\\u00e9 \\"quoted\\"\\n"}\n')
    table = read_table(corpus, "corpus")
    assert not line_reader_calls  # pyarrow's reader took the whole file
    assert table.to_list() == [
        {"_id": "12", "title": "", "text": "no title"},
        {"_id": "-3", "title": "", "text": "null title"},
        {"_id": "0", "title": "", "text": "empty title"},
        {"_id": "123456789012", "title": "Té 😀", "text": 'café "quoted"\n'},
    ]
    assert [str(table.data.column(name).type) for name in table.column_names] == ["string"] * 3
    assert _read_both(corpus)[0] == _read_both(corpus)[1]  # the line reader's rows and types


def test_gzipped_jsonl_through_pyarrow(tmp_path, line_reader_calls):
    queries = tmp_path / "queries.jsonl.gz"
    with gzip.open(queries, "wt") as f:
        for i in range(1000):
            f.write(json.dumps({"_id": f"q{i}", "text": f"question {i}", "metadata": {}}) + "\n")
    table = read_table(queries, "queries")
    assert not line_reader_calls and len(table) == 1000 and table.column_names == ["_id", "text"]
    assert table[999] == {"_id": "q999", "text": "question 999"}


def _large_corpus(path: Path, lines: int = 40_000) -> list[str]:
    """About 5 MB of JSONL: more than one of pyarrow's parse blocks (BLOCK_BYTES, 2 MiB)."""
    rows = [json.dumps({"_id": f"d{i}", "title": "" if i % 3 else f"t{i}", "text": f"document {i} " + "x" * 100})
            for i in range(lines)]
    path.write_text("\n".join(rows) + "\n")
    return rows


@pytest.mark.parametrize("chunk_bytes", [None, 64 << 10])  # one chunk of several blocks; many chunks
def test_malformed_line_far_into_a_large_file_names_its_line(tmp_path, monkeypatch, chunk_bytes):
    from prod_st.data import beir_files

    if chunk_bytes:
        monkeypatch.setattr(beir_files, "CHUNK_BYTES", chunk_bytes)
    corpus = tmp_path / "corpus.jsonl"
    rows = _large_corpus(corpus)
    assert corpus.stat().st_size > beir_files.BLOCK_BYTES
    rows[36_999] = '{"_id": "d36999", "text": "broken'
    corpus.write_text("\n".join(rows) + "\n")
    with pytest.raises(ProdStError, match=r"corpus\.jsonl:37000: malformed JSON \("):
        read_table(corpus, "corpus")
    rows[36_999] = '{"_id": "d36999", "title": "no text"}'
    corpus.write_text("\n".join(rows) + "\n")
    with pytest.raises(ProdStError, match=r'corpus\.jsonl:37000: expected an object with "_id" and a string "text"'):
        read_table(corpus, "corpus")


def test_line_reader_takes_over_midway_and_gives_the_remaining_rows(tmp_path, monkeypatch, line_reader_calls):
    """Ids that turn from strings into numbers after the first chunks: pyarrow refuses that chunk, the line reader
    (which takes both) writes the rest; the rows are the line reader's, in order, none twice."""
    from prod_st.data import beir_files

    monkeypatch.setattr(beir_files, "CHUNK_BYTES", 64 << 10)
    corpus = tmp_path / "corpus.jsonl"
    rows = _large_corpus(corpus, 5_000)
    rows[4_000] = json.dumps({"_id": 4000, "title": "an integer id", "text": "among strings"})
    corpus.write_text("\n".join(rows) + "\n")
    new, old = _read_both(corpus)
    assert line_reader_calls and new == old and len(new[0]) == 5_000 and new[0][4_000]["_id"] == "4000"


@pytest.mark.parametrize("content", [
    b'\xef\xbb\xbf{"_id": "a", "text": "a BOM"}\n',  # json.loads refuses the BOM, pyarrow would not
    b'{"_id": "a", "text": "t"} {"_id": "b", "text": "two objects on one line"}\n',
    b'{"_id": "0", "text": "t"}\n{"_id": "a",\n "text": "one object on two lines"}\n{"_id": "b", "text": "u"}\n',
    b'{"_id": "0", "text": "t"}\n{"_id": "a",\n "text": "t"} {"_id": "b", "text": "both at once"}\n',
    b'{"_id": "a", "text": "t"}\r{"_id": "b", "text": "a lone carriage return"}\n',
    b'{"_id": "0", "text": "t"}\n{"_id": "a",\r"text": "t"}\n',
    b'{"_id": "a", "text": "windows"}\r\n{"_id": "b", "text": "line ends"}\r\n',
    b'{"_id": "a", "text": "t"}\n\n   \n{"_id": "b", "text": "blank lines"}\n\n',
    b'{"_id": "a", "text": "t"}   \n{"_id": "b", "text": "trailing spaces"}',
    b'{"_id": "a", "text": "t", "text": "a repeated key"}\n',
    b'{"_id": null, "text": "null id"}\n',
    b'{"_id": true, "text": "bool id"}\n',
    b'{"_id": 1.5, "text": "float id"}\n{"_id": 1e3, "text": "float id"}\n',
    b'{"_id": 9223372036854775808, "text": "beyond int64"}\n',
    b'{"_id": 1, "text": "int then string"}\n{"_id": "2", "text": "t"}\n',
    b'{"_id": "a", "title": 5, "text": "a number title"}\n{"_id": "b", "title": false, "text": "false"}\n',
    b'{"_id": "a", "text": 5}\n',
    b'{"_id": "a", "text": null}\n',
    b'{"_id": "a"}\n',
    b'["_id", "text"]\n',
    b'{"_id": "a", "text": "t", "metadata": "caf\xe9"}\n',  # not UTF-8 in a field nobody reads
    b'{"_id": "a", "text": "t", "m": NaN}\n',
    b'{"_id": "a", "text": "a lone surrogate \\ud800"}\n',
    b'{"_id": "a", "text": "no final newline"}',
    b'\n\n',
])
def test_what_pyarrow_takes_differently_goes_to_the_line_reader(tmp_path, content):
    """Rows, types and error messages of the pyarrow route are those of the line reader (today's), also where
    pyarrow alone would take a file json.loads refuses, or refuse one it takes."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(content)
    new, old = _read_both(corpus)
    assert new == old


def test_jsonl_through_pyarrow_equals_the_line_reader_on_a_generated_file(tmp_path, line_reader_calls):
    import random

    rng = random.Random(5)
    words = ["dense", "retrieval", "café", "naïve", "数据", "😀", 'a "quote"', "back\\slash", "tab\there", "new\nline"]
    with open(tmp_path / "corpus.jsonl", "w") as f:
        for i in range(3_000):
            row = {"_id": f"doc-{i}", "title": rng.choice(["", None, "Über", "t"]),
                   "text": " ".join(rng.choices(words, k=rng.randint(0, 40))), "metadata": {"n": i, "w": words}}
            if i % 5 == 0:
                del row["title"]
            f.write(json.dumps(row, ensure_ascii=rng.random() < 0.5) + "\n")
    with open(tmp_path / "int-ids.jsonl", "w") as f:
        for i in range(3_000):
            f.write(json.dumps({"_id": i * 7919 - 100_000, "text": f"passage {i}"}) + "\n")
    for name in ("corpus.jsonl", "int-ids.jsonl"):
        new, old = _read_both(tmp_path / name)
        assert new == old and len(new[0]) == 3_000
    assert len(line_reader_calls) == 2  # the two reference reads only: pyarrow took both files
