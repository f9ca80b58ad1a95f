"""Build the embedded `wordnet-gloss` retrieval benchmark from Debian's `wordnet-base`.

    apt-get install wordnet-base
    python scripts/build_wordnet_gloss.py [--wordnet-dir /usr/share/wordnet] [--seed 13]

Documents: every synset with a definition; _id = pos letter + offset ("n02787772"), title = its lemmas
("bank, depository financial institution"), text = its definition. Queries: one example sentence per
synset (its first usable one), _id = "q" + the synset's id; the relevant document is the synset. Two traps are
removed: queries whose synset shares its definition with another synset (an unlabelled twin of the positive:
1,630 synsets share their definition text with another), and example sentences that belong to several synsets. Queries are split train/dev/test 80/10/10 BY SYNSET
(no synset in two splits), seeded. Output is a gzipped BEIR folder in prod_st/data/wordnet_gloss/.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import random
import re
from pathlib import Path

POS_FILES = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
OUT = Path(__file__).resolve().parents[1] / "prod_st" / "data" / "wordnet_gloss"
SPLITS = (("train", 0.8), ("dev", 0.1), ("test", 0.1))


def parse_synset_line(line: str, pos: str) -> tuple[str, list[str], str, list[str]] | None:
    """One data.<pos> line -> (doc id, lemmas, definition, example sentences), None for licence lines."""
    if line.startswith("  "):
        return None
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    offset, n_words = fields[0], int(fields[3], 16)
    lemmas = []
    for word in fields[4 : 4 + 2 * n_words : 2]:
        word = re.sub(r"\((a|p|ip)\)$", "", word).replace("_", " ")
        if word not in lemmas:
            lemmas.append(word)
    examples = [e.strip() for e in re.findall(r'"([^"]+)"', gloss)]
    first_quote = gloss.find('"')
    definition = (gloss if first_quote < 0 else gloss[:first_quote]).strip().rstrip(";").strip()
    return f"{pos}{offset}", lemmas, definition, [e for e in examples if e]


def read_wordnet(wordnet_dir: Path) -> list[tuple[str, list[str], str, list[str]]]:
    synsets = []
    for name, pos in POS_FILES.items():
        with open(wordnet_dir / f"data.{name}", encoding="utf-8") as f:
            for line in f:
                parsed = parse_synset_line(line.rstrip("\n"), pos)
                if parsed and parsed[2]:
                    synsets.append(parsed)
    return synsets


def build(wordnet_dir: Path, out: Path, seed: int) -> dict:
    synsets = read_wordnet(wordnet_dir)
    definition_count = collections.Counter(definition for _, _, definition, _ in synsets)
    example_count = collections.Counter(e for _, _, _, examples in synsets for e in set(examples))

    queries_by_doc: dict[str, list[tuple[str, str]]] = {}
    dropped = collections.Counter()
    for doc_id, _, definition, examples in synsets:
        if not examples:
            continue
        if definition_count[definition] > 1:
            dropped["definition shared with another synset"] += 1
            continue
        usable = [e for e in examples if example_count[e] == 1]
        if not usable:
            dropped["example sentence of several synsets"] += 1
            continue
        queries_by_doc[doc_id] = [(f"q{doc_id}", usable[0])]

    doc_ids = sorted(queries_by_doc)
    random.Random(seed).shuffle(doc_ids)
    total = sum(len(v) for v in queries_by_doc.values())
    split_of_doc, seen, bounds = {}, 0, []
    acc = 0.0
    for name, share in SPLITS:
        acc += share
        bounds.append((name, acc * total))
    for doc_id in doc_ids:
        split_of_doc[doc_id] = next(name for name, bound in bounds if seen < bound)
        seen += len(queries_by_doc[doc_id])

    out.mkdir(parents=True, exist_ok=True)
    (out / "qrels").mkdir(exist_ok=True)

    def gz(path: Path):  # mtime=0: the same input gives byte-identical files
        return gzip.GzipFile(path, "wb", mtime=0, compresslevel=9)

    with gz(out / "corpus.jsonl.gz") as f:
        for doc_id, lemmas, definition, _ in synsets:
            row = {"_id": doc_id, "title": ", ".join(lemmas), "text": definition}
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
    with gz(out / "queries.jsonl.gz") as f:
        for doc_id in sorted(queries_by_doc):
            for qid, text in queries_by_doc[doc_id]:
                f.write((json.dumps({"_id": qid, "text": text}, ensure_ascii=False) + "\n").encode())
    counts = {}
    for name, _ in SPLITS:
        with gz(out / "qrels" / f"{name}.tsv.gz") as f:
            f.write(b"query-id\tcorpus-id\tscore\n")
            n = 0
            for doc_id in sorted(queries_by_doc):
                if split_of_doc[doc_id] == name:
                    for qid, _ in queries_by_doc[doc_id]:
                        f.write(f"{qid}\t{doc_id}\t1\n".encode())
                        n += 1
            counts[name] = n
    stats = {
        "documents": len(synsets),
        "queries": total,
        "queries_per_split": counts,
        "dropped_synsets": dict(dropped),
        "seed": seed,
        "source": "WordNet 3.0 (Debian wordnet-base): data.noun, data.verb, data.adj, data.adv",
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    if not (args.wordnet_dir / "data.noun").exists():
        raise SystemExit(f"error: no WordNet data files in {args.wordnet_dir} (apt-get install wordnet-base)")
    print(json.dumps(build(args.wordnet_dir, args.out, args.seed), indent=2))


if __name__ == "__main__":
    main()
