"""How many times a run encodes its whole corpus: runs a recipe in this process with
`SentenceTransformer.encode_document` counted per model (weights fingerprint), and prints one JSON line.
Works on any prod-st version (it only wraps sentence-transformers), so the same command measures the code
before and after the corpus was cached per checkpoint:

    PYTHONPATH=/path/to/prod-st:/path/to/prod-st/cli python bench/count_encodings.py RECIPE.yaml OUT_DIR
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

from sentence_transformers import SentenceTransformer

from prod_st.util.fingerprint import model_fingerprint


def main(recipe_path: str, out: str) -> None:
    from prod_st.recipe import load_recipe
    from prod_st.runner import Runner

    docs: Counter[str] = Counter()  # documents encoded per model fingerprint
    calls: list[tuple[str, int]] = []
    real = SentenceTransformer.encode_document

    def counted(self, sentences, *args, **kwargs):
        fingerprint = model_fingerprint(self)
        n = 1 if isinstance(sentences, str) else len(sentences)
        docs[fingerprint] += n
        calls.append((fingerprint, n))
        return real(self, sentences, *args, **kwargs)

    SentenceTransformer.encode_document = counted
    start = time.perf_counter()
    final = Runner(load_recipe(recipe_path), Path(out), force=True).run()
    seconds = time.perf_counter() - start
    n = final["num_docs"]
    full = Counter(f for f, k in calls if k >= n)  # calls that encode (at least) the whole corpus
    print(json.dumps({
        "corpus_docs": n,
        "corpus_encodings": round(sum(docs.values()) / n, 2),  # all documents encoded / corpus size
        "full_corpus_calls": sum(full.values()),
        "models": len(docs),
        "full_corpus_calls_per_model": sorted(full.values(), reverse=True),
        "run_seconds": round(seconds, 1),
    }))


if __name__ == "__main__":
    main(*sys.argv[1:3])
