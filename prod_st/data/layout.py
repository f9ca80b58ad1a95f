"""Which files a dataset folder holds, found without reading them: each format's file names and splits, the
format of a folder, and the files a split needs. Standard library only, so that `prod-st validate` checks a
recipe's data without importing datasets or pyarrow (the loaders import this module too).
"""

from __future__ import annotations

from pathlib import Path

from prod_st.util.errors import ProdStError

# DPR's Natural Questions release (see dpr.py): the passages, and split -> (accepted names of the questions file,)
DPR_PASSAGES = "psgs_w100.tsv"
DPR_SPLITS = {
    "train": (("nq-train.json", "biencoder-nq-train.json"),),
    "dev": (("nq-dev.json", "biencoder-nq-dev.json"),),
    "test": (("nq-test.qa.csv", "nq-test.csv"),),
}
# MS MARCO's original releases (see msmarco.py): split -> (queries file, qrels file), each a tuple of accepted names
MSMARCO_DOC_CORPUS = "msmarco-docs.tsv"
MSMARCO_PASSAGE_CORPUS = "collection.tsv"
MSMARCO_DOC_SPLITS = {
    "train": (("msmarco-doctrain-queries.tsv",), ("msmarco-doctrain-qrels.tsv",)),
    "dev": (("msmarco-docdev-queries.tsv",), ("msmarco-docdev-qrels.tsv",)),
    "test": (("msmarco-test2019-queries.tsv",), ("2019qrels-docs.txt",)),
}
MSMARCO_PASSAGE_SPLITS = {
    "train": (("queries.train.tsv",), ("qrels.train.tsv",)),
    "dev": (("queries.dev.small.tsv",), ("qrels.dev.small.tsv",)),
    "test": (("msmarco-test2019-queries.tsv",), ("2019qrels-pass.txt",)),
}

# format -> the file whose presence identifies it (also as .gz), in the order they are tried
SIGNATURES = {
    "beir": "corpus.jsonl",
    "msmarco-doc": MSMARCO_DOC_CORPUS,
    "msmarco-passage": MSMARCO_PASSAGE_CORPUS,
    "dpr-nq": DPR_PASSAGES,
}


def find_file(folder: Path, *names: str) -> Path | None:
    """The first of `names` (each also tried with `.gz`) that exists in `folder`."""
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def find_split_files(
    folder: Path, layout: str, splits: dict[str, tuple[tuple[str, ...], ...]], split: str
) -> list[Path]:
    """The files `split` needs in a `layout` folder: `splits` maps each split to its files, each given as a tuple
    of accepted names (each also tried with `.gz`). A missing split or file is a one-line error naming them all."""
    if split not in splits:
        raise ProdStError(f"{folder}: no split {split!r} in the {layout} layout (splits: {', '.join(splits)})")
    found = [find_file(folder, *names) for names in splits[split]]
    missing = [" or ".join(names) for names, path in zip(splits[split], found) if path is None]
    if missing:
        needed = " and ".join(" or ".join(names) for names in splits[split])
        raise ProdStError(
            f"{folder}: split {split!r} of the {layout} layout needs {needed} (each may be .gz); "
            f"missing: {', '.join(missing)}"
        )
    return found


def detect_format(folder: Path) -> str:
    """"beir", "msmarco-doc", "msmarco-passage" or "dpr-nq", from the corpus file in `folder` (a folder with
    queries.jsonl or qrels/ but no corpus counts as BEIR, whose loader then says what is missing)."""
    for name, signature in SIGNATURES.items():
        if find_file(folder, signature) is not None:
            return name
    if find_file(folder, "queries.jsonl") is not None or (folder / "qrels").is_dir():
        return "beir"
    raise ProdStError(
        f"{folder}: no corpus.jsonl (BEIR), {MSMARCO_DOC_CORPUS} (MS MARCO document), {MSMARCO_PASSAGE_CORPUS} "
        f"(MS MARCO passage) or {DPR_PASSAGES} (DPR Natural Questions): not a dataset folder"
    )


def split_files(folder: Path, split: str) -> list[Path]:
    """The files that loading `split` of a dataset folder reads, found without reading them (a check before a
    run); a missing file or an unknown split is the loader's own one-line error."""
    kind = detect_format(folder)
    if kind == "beir":
        return list(beir_split_files(folder, split))
    if kind == "dpr-nq":
        return [find_file(folder, DPR_PASSAGES), *find_split_files(folder, "DPR Natural Questions", DPR_SPLITS, split)]
    if kind == "msmarco-doc":
        return [find_file(folder, MSMARCO_DOC_CORPUS),
                *find_split_files(folder, "MS MARCO document", MSMARCO_DOC_SPLITS, split)]
    return [find_file(folder, MSMARCO_PASSAGE_CORPUS),
            *find_split_files(folder, "MS MARCO passage", MSMARCO_PASSAGE_SPLITS, split)]


def beir_split_files(folder: Path, split: str) -> tuple[Path, Path, Path]:
    """(corpus, queries, qrels file) of `split` of a BEIR folder."""
    corpus_file = find_file(folder, "corpus.jsonl")
    queries_file = find_file(folder, "queries.jsonl", "queries.tsv")
    qrels_file = find_file(folder / "qrels", f"{split}.tsv", f"{split}.txt")
    for what, found in (("corpus.jsonl", corpus_file), ("queries.jsonl", queries_file)):
        if found is None:
            raise ProdStError(f"{folder}: no {what} (a BEIR folder holds corpus.jsonl, queries.jsonl, qrels/)")
    if qrels_file is None:
        available = sorted(p.name.split(".")[0] for p in (folder / "qrels").glob("*.*")) if (folder / "qrels").is_dir() else []
        raise ProdStError(f"{folder}: no qrels for split {split!r} (available: {', '.join(available) or 'none'})")
    return corpus_file, queries_file, qrels_file
