"""The original release formats of the PROD paper's benchmarks (MS MARCO document / passage with TREC DL 2019,
DPR Natural Questions), format detection, and DPR's answer matching."""

from __future__ import annotations

import gzip
import json
import shutil
import unicodedata

import pytest
from conftest import FIXTURES

from prod_st.data import detect_format, document_text, dpr, load_retrieval_data
from prod_st.data.answer_match import RE_TOKEN, has_answer, tokens, top_k_accuracy
from prod_st.data.beir_files import read_qrels
from prod_st.util.errors import ProdStError

DOC = FIXTURES / "msmarco-doc"
PASSAGE = FIXTURES / "msmarco-passage"
NQ = FIXTURES / "dpr-nq"
DL19 = FIXTURES / "trec-dl19"


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / folder.name)


# ---- MS MARCO document ----

def test_msmarco_doc_splits():
    train = load_retrieval_data(DOC, "train")  # gzipped queries and qrels
    assert len(train.corpus) == 6 and len(train.queries) == 3
    assert train.qrels == {"1103812": {"D1555982": 1}, "104861": {"D301595": 1}, "1037798": {"D1359209": 1}}
    gray = train.corpus[2]
    assert gray["_id"] == "D1359209" and gray["title"] == "Robert Gray (sea captain)"
    assert gray["text"].startswith("Robert Gray (sea captain) From Wikipedia")  # body only, the url dropped
    assert train.corpus[0]["text"].endswith("signed an agreement creating the CIS.")  # trailing spaces stripped
    assert train.corpus[4]["title"] == ""  # an empty title field
    assert document_text(gray["title"], gray["text"]).startswith("Robert Gray (sea captain) Robert Gray")

    dev = load_retrieval_data(DOC, "dev")
    assert dev.split_queries() == {"174249": "define environment", "1063750": "why did the us volunterilay enter ww1"}

    test = load_retrieval_data(DOC, "test")  # TREC DL 2019: graded judgements, unjudged topics left out
    assert len(test.queries) == 5 and list(test.split_queries()) == ["1037798", "104861", "1063750", "47923"]
    assert test.qrels["1037798"] == {"D1359209": 3, "D1555982": 0}
    assert sorted({g for judged in test.qrels.values() for g in judged.values()}) == [0, 1, 2, 3]
    assert test.answers is None


def test_msmarco_doc_bodies_are_cut_to_max_body_chars(tmp_path):
    folder = copy_of(DOC, tmp_path)
    with open(folder / "msmarco-docs.tsv", "a") as f:
        f.write("D9\thttp://example.org/long\tA long page\t" + "word " * 2_400 + "\n")  # 12,000 characters
    long_doc = load_retrieval_data(folder, "test").corpus[-1]
    assert long_doc["title"] == "A long page" and len(long_doc["text"]) == 10_000
    short = load_retrieval_data(folder, "test", max_body_chars=40).corpus  # another cache entry
    assert len(short[-1]["text"]) == 40 and short[1]["text"] == "Concrete Floor Cost Interior concrete floo"[:40]


# ---- MS MARCO passage (original release) and TREC DL 2019 passage ----

def test_msmarco_passage_splits():
    train = load_retrieval_data(PASSAGE, "train")
    assert len(train.corpus) == 8 and train.corpus[0]["_id"] == "0" and set(train.corpus["title"]) == {""}
    assert train.corpus[3]["text"].startswith("Chattel is personal property")
    assert train.qrels == {"1185869": {"0": 1}, "634306": {"3": 1}, "121352": {"4": 1}}
    assert train.split_queries()["1185869"] == ")what was the immediate impact of the success of the manhattan project?"
    dev = load_retrieval_data(PASSAGE, "dev")  # queries.dev.small.tsv.gz
    assert dev.qrels == {"1048585": {"6": 1, "5": 1}, "156493": {"7": 1}}
    assert dev.split_queries() == {"1048585": "what is paula deen's brother", "156493": "do goldfish grow"}


def test_trec_dl19_passage_layout_with_the_real_judgements(tmp_path):
    folder = copy_of(PASSAGE, tmp_path)
    shutil.copy(DL19 / "qrels.dl19-passage.txt", folder / "2019qrels-pass.txt")
    shutil.copy(DL19 / "topics.dl19-passage.txt", folder / "msmarco-test2019-queries.tsv")
    judged = sorted({d for j in read_qrels(DL19 / "qrels.dl19-passage.txt").values() for d in j}, key=int)
    (folder / "collection.tsv").write_text("".join(f"{pid}\tpassage {pid}\n" for pid in judged))
    assert detect_format(folder) == "msmarco-passage"
    data = load_retrieval_data(folder, "test")
    assert len(data.qrels) == 43 and sum(len(j) for j in data.qrels.values()) == 9260
    assert len(data.corpus) == len(judged) and data.qrels["19335"]["1017759"] == 0
    assert data.split_queries()["156493"] == "do goldfish grow"


# ---- DPR Natural Questions ----

def test_dpr_nq_train_dev_and_answer_only_test():
    train = load_retrieval_data(NQ, "train")  # nq-train.json.gz
    assert len(train.corpus) == 8  # the header line is not a passage
    aaron = train.corpus[0]
    assert aaron == {"_id": "1", "title": "Aaron",
                     "text": 'Aaron Aaron ( or ; "Ahärôn") is a prophet, high priest, and the brother of Moses '
                             "in the Abrahamic religions."}  # CSV quotes undone
    assert list(train.queries["_id"]) == ["train-0", "train-1", "train-2"]
    assert train.qrels == {"train-0": {"18768923": 1, "18768924": 1}, "train-1": {"2": 1},  # psg_id too
                           "train-2": {"7612354": 1}}
    assert train.answers["train-2"] == ["Golden State Warriors", "the Warriors"]
    assert train.split_queries()["train-0"] == "big little lies season 2 how many episodes"

    dev = load_retrieval_data(NQ, "dev")  # a question without positives: answers, no qrels
    assert dev.qrels == {"dev-0": {"10404512": 1}} and set(dev.answers) == {"dev-0", "dev-1"}
    assert list(dev.split_queries()) == ["dev-0"]

    test = load_retrieval_data(NQ, "test")
    assert test.qrels == {}
    assert test.answers == {"test-0": ["Wilhelm Conrad Röntgen"], "test-1": ["May 18 , 2018"],
                            "test-2": ["Golden State Warriors", "the Warriors' dynasty"]}
    assert test.split_queries() == {"test-0": "who got the first nobel prize in physics",
                                    "test-1": "when is the next deadpool movie being released",
                                    "test-2": "who won the nba finals in 2018"}


def test_json_list_is_streamed_element_by_element(tmp_path):
    text = (NQ / "nq-dev.json").read_text()
    elements = dpr.iter_json_list(NQ / "nq-dev.json")
    assert next(elements) == json.loads(text)[0]  # one element at a time (a generator), as json reads them
    assert list(elements) == json.loads(text)[1:]
    with gzip.open(tmp_path / "nq-dev.json.gz", "wt") as f:
        f.write(text)
    assert list(dpr.iter_json_list(tmp_path / "nq-dev.json.gz")) == json.loads(text)


def test_dpr_positive_not_in_passages(tmp_path):
    folder = copy_of(NQ, tmp_path)
    text = (folder / "nq-dev.json").read_text().replace('"passage_id": "10404512"', '"passage_id": "99"')
    (folder / "nq-dev.json").write_text(text)
    with pytest.raises(ProdStError, match=r"nq-dev\.json: 1 document id\(s\) not in the corpus, e\.g\. '99'"):
        load_retrieval_data(folder, "dev")


# ---- detection and missing files ----

def test_detect_format(toy_beir, tmp_path):
    assert detect_format(DOC) == "msmarco-doc"
    assert detect_format(PASSAGE) == "msmarco-passage"
    assert detect_format(NQ) == "dpr-nq"
    assert detect_format(toy_beir) == "beir"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProdStError, match=r"empty: no corpus\.jsonl \(BEIR\), msmarco-docs\.tsv .* psgs_w100\.tsv"):
        load_retrieval_data(tmp_path / "empty")


def test_missing_file_of_a_split_lists_the_expected_files(tmp_path):
    folder = copy_of(DOC, tmp_path)
    (folder / "msmarco-docdev-qrels.tsv").unlink()
    load_retrieval_data(folder, "train")  # other splits still load
    with pytest.raises(ProdStError, match=r"split 'dev' of the MS MARCO document layout needs "
                                          r"msmarco-docdev-queries\.tsv and msmarco-docdev-qrels\.tsv \(each may be "
                                          r"\.gz\); missing: msmarco-docdev-qrels\.tsv$"):
        load_retrieval_data(folder, "dev")
    with pytest.raises(ProdStError, match=r"missing: msmarco-test2019-queries\.tsv, 2019qrels-pass\.txt$"):
        load_retrieval_data(PASSAGE, "test")
    with pytest.raises(ProdStError, match=r"no split 'valid' in the DPR Natural Questions layout \(splits: train, dev, "
                                          r"test\)"):
        load_retrieval_data(NQ, "valid")


# ---- malformed lines: file:line ----

@pytest.mark.parametrize("folder, name, line, split, message", [
    (DOC, "msmarco-docs.tsv", "D7\thttp://x\tno body", "test",
     r"msmarco-docs\.tsv:7: expected `docid<TAB>url<TAB>title<TAB>body`, found 3 fields"),
    (PASSAGE, "collection.tsv", "8\ttwo\ttabs", "train", r"collection\.tsv:9: expected `id<TAB>text`, found 3"),
    (NQ, "psgs_w100.tsv", "9\tno title", "test", r"psgs_w100\.tsv:10: expected `id<TAB>text<TAB>title`, found 2"),
    (NQ, "nq-test.qa.csv", "what\tnot a list", "test",
     r"nq-test\.qa\.csv:4: answers 'not a list' are not a Python list"),
])
def test_malformed_line_names_file_and_line(tmp_path, folder, name, line, split, message):
    folder = copy_of(folder, tmp_path)
    with open(folder / name, "a") as f:
        f.write(line + "\n")
    with pytest.raises(ProdStError, match=message):
        load_retrieval_data(folder, split)


@pytest.mark.parametrize("folder, name, line, split, message", [
    (PASSAGE, "collection.tsv", b"1\tthe same passage id again", "train",
     r"collection\.tsv: document id '1' appears 2 times"),
    (NQ, "psgs_w100.tsv", b"2\tsame id\tanother title", "test", r"psgs_w100\.tsv: document id '2' appears 2 times"),
    (DOC, "msmarco-docs.tsv", b"D9\thttp://x\tcaf\xe9\tbody", "test", r"msmarco-docs\.tsv:7: not UTF-8 text"),
    (NQ, "nq-test.qa.csv", b"caf\xe9?\t['x']", "test", r"nq-test\.qa\.csv:4: not UTF-8 text"),
])
def test_repeated_ids_and_bytes_that_are_not_utf8(tmp_path, folder, name, line, split, message):
    """The original-release readers share read_table's checks: unique ids, `file:line` for non-UTF-8 bytes."""
    folder = copy_of(folder, tmp_path)
    with open(folder / name, "ab") as f:
        f.write(line + b"\n")
    with pytest.raises(ProdStError, match=message):
        load_retrieval_data(folder, split)


def test_non_utf8_in_a_streamed_json_list_names_its_element(tmp_path):
    folder = copy_of(NQ, tmp_path)
    text = (folder / "nq-dev.json").read_bytes()
    (folder / "nq-dev.json").write_bytes(text.replace(b'"party"', b'"part\xff"', 1))
    message = r"nq-dev\.json: malformed JSON at element 1 of the list \(counting from 0\) \(lexical error: invalid"
    with pytest.raises(ProdStError, match=message):
        load_retrieval_data(folder, "dev")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('"passage_id": "10404512"', '"id": "10404512"'),
     r"nq-dev\.json: question 0: a positive_ctxs entry has no passage_id \(or psg_id\)"),
    (lambda t: t.replace('"answers": [\n            "party"', '"answers": [\n            "party",,'),
     r"nq-dev\.json: malformed JSON at element 1 of the list \(counting from 0\) \(parse error: unallowed token"),
    (lambda t: t.replace("    },\n    {", "    }\n    {"), r"nq-dev\.json: malformed JSON at element 1 of the list"),
])
def test_malformed_dpr_json(tmp_path, edit, message):
    folder = copy_of(NQ, tmp_path)
    (folder / "nq-dev.json").write_text(edit((folder / "nq-dev.json").read_text()))
    with pytest.raises(ProdStError, match=message):
        load_retrieval_data(folder, "dev")


def test_gzipped_dpr_json_malformed(tmp_path):
    folder = copy_of(NQ, tmp_path)
    with gzip.open(folder / "nq-train.json.gz", "wt") as f:
        f.write('{"question": "not a list"}\n')
    with pytest.raises(ProdStError, match=r"nq-train\.json\.gz: expected a JSON list"):
        load_retrieval_data(folder, "train")


# ---- DPR answer matching ----

@pytest.mark.parametrize("passage, answers, expected", [
    ("It was released in the United States on May 18, 2018.", ["May 18 , 2018"], True),  # punctuation tokens
    ("The second season, consisting of Seven episodes.", ["seven"], True),  # case
    ("awarded in 1901 to Wilhelm Conrad Röntgen, of Germany", ["wilhelm conrad röntgen"], True),
    ("awarded in 1901 to Wilhelm Conrad Ro\u0308ntgen", ["Wilhelm Conrad Röntgen"], True),  # NFD both sides
    ("awarded in 1901 to Wilhelm Conrad Röntgen", ["Rontgen"], False),  # accents are kept, as in DPR
    ("Big Little Lies is an American drama", ["big little lies"], True),  # multi-token, contiguous
    ("Big Little Lies is an American drama", ["big lies"], False),  # not contiguous
    ("a gathering of people invited to a party", ["art"], False),  # no partial-token match
    ("a museum of modern art.", ["art"], True),
    ("the Warriors' dynasty began", ["Warriors"], True),  # the apostrophe is its own token
    ("nothing here", ["", "absent"], False),  # an empty answer matches nothing
    ("nothing here", [], False),
])
def test_has_answer(passage, answers, expected):
    assert has_answer(passage, answers) is expected


def test_tokens_follow_dpr_simple_tokenizer():
    assert tokens("U.S. won 3-1, (at home)!") == ["u", ".", "s", ".", "won", "3", "-", "1", ",", "(", "at", "home",
                                                  ")", "!"]
    assert tokens("Röntgen") == [unicodedata.normalize("NFD", "röntgen")]


@pytest.mark.parametrize("text", ["U.S. won 3-1, (at home)!", "Wilhelm Conrad Röntgen", "snake_case x²",
                                  "Ǆemal Bijedić", "東京 is Tōkyō", "Ahärôn \"quoted\" — dash…", "Zoë's naïve café"])
def test_re_fallback_tokenizer_agrees_with_dpr_pattern(text):
    nfd = unicodedata.normalize("NFD", text)
    assert [m.group().lower() for m in RE_TOKEN.finditer(nfd)] == tokens(text)


def test_top_k_accuracy_on_a_hand_example():
    texts = {"p1": "nothing", "p2": "the answer is Paris", "p3": "Berlin is a city", "p4": "nope"}
    ranked = {"q1": ["p2", "p1"],  # hit at rank 1
              "q2": ["p1", "p4", "p1", "p4", "p1", "p3"],  # hit at rank 6
              "q3": ["p1", "p4"]}  # no hit; q4 was never ranked
    answers = {"q1": ["paris"], "q2": ["Berlin"], "q3": ["Rome"], "q4": ["Paris"]}
    calls = []

    def texts_of(ids):
        calls.append(ids)
        return [texts[i] for i in ids]

    assert top_k_accuracy(ranked, answers, texts_of, ks=(1, 5, 20)) == {"Acc@1": 0.25, "Acc@5": 0.25, "Acc@20": 0.5}
    assert calls[0] == ["p2", "p1"] and len(calls) == 3  # nothing fetched for an unranked question
    assert set(top_k_accuracy(ranked, answers, texts_of)) == {"Acc@5", "Acc@20", "Acc@100"}
    assert top_k_accuracy({}, {}, texts_of) == {"Acc@5": 0.0, "Acc@20": 0.0, "Acc@100": 0.0}


def test_nq_answer_bearing_passages_are_positives_never_negatives():
    """PROD and DPR on NQ: with `data.positives: answers`, a retrieved passage that contains an answer string is
    relevant: it is never mined as a negative, counts for DPD's ranks, and is the positive of a query that has no
    gold passage; a gold passage stays the positive when there is one."""
    from prod_st.retrieval.mining import NegativeWindow, negative_pools
    from prod_st.training.dpd import first_relevant_rank
    from prod_st.training.stage_data import build_rows, load_run_data

    data = load_run_data(str(NQ), splits=("train", "dev", "dev"), answer_positives=True)
    data.train.answers["train-0"] = ["Moses"]  # passage 1 mentions Moses; the gold ones (1876892x) do not
    data.train.answers["train-1"] = ["first High Priest"]  # passage 2: the gold one, found by the match too
    ranked = {"train-0": ["6537021", "1", "18768923"], "train-1": ["1", "2"], "train-2": ["6537021", "7612354"]}
    qrels = data.relevance(ranked)
    assert qrels["train-0"] == {"18768923": 1, "18768924": 1, "1": 1}
    assert qrels["train-1"] == {"2": 1} and qrels["train-2"] == {"7612354": 1}
    pools = negative_pools(ranked, qrels, NegativeWindow(1, 3, 2, "hardest"))
    assert pools == {"train-0": ["6537021"], "train-1": ["1"], "train-2": ["6537021"]}
    assert first_relevant_rank(ranked["train-0"], qrels["train-0"]) == 2  # DPD's rank: the answer-bearing one
    rows = build_rows(data, pools, 1, qrels=qrels)
    assert rows.texts()[1][0].startswith("Big Little Lies")  # gold first, not the answer-bearing passage 1

    plain = load_run_data(str(NQ), splits=("train", "dev", "dev"))
    assert plain.relevance(ranked) is plain.train.qrels  # qrels only, unless the recipe asks for answers


def test_answer_matching_is_split_across_ranks_and_fetches_a_chunk_at_once(monkeypatch):
    """Issue 18 item 6: under torchrun each rank string-matches the passages of its share of the queries (one
    corpus lookup per chunk of queries, not one per query) and the ranks' matches are gathered: the judgements
    are those one process finds."""
    import prod_st.training.stage_data as stage_data
    from prod_st.training.stage_data import load_run_data

    data = load_run_data(str(NQ), splits=("train", "dev", "dev"), answer_positives=True)
    data.train.answers["train-0"] = ["Moses"]
    data.train.answers["train-1"] = ["first High Priest"]
    ranked = {"train-0": ["6537021", "1", "18768923"], "train-1": ["1", "2"], "train-2": ["6537021", "7612354"]}
    single = data.relevance(ranked)
    lookups, docs = [], data._docs
    monkeypatch.setattr(data, "_docs", lambda ids: lookups.append(list(ids)) or docs(ids))
    shares = []
    monkeypatch.setattr(stage_data, "all_gather", lambda found: shares.append(found) or [found])
    for share in ((0, 1), (1, 3)):  # rank 0 of 2, then rank 1
        monkeypatch.setattr(stage_data, "shard", lambda n, share=share: share)
        data.relevance(ranked)
    assert shares == [{"train-0": ["1"]}, {}]  # each rank matched only its own queries ("2" is gold already)
    assert lookups == [ranked["train-0"], ranked["train-1"] + ranked["train-2"]]
    monkeypatch.setattr(stage_data, "all_gather", lambda found: shares)
    assert data.relevance(ranked) == single and single["train-0"] == {"18768923": 1, "18768924": 1, "1": 1}
