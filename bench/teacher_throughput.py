"""Cross-encoder teacher throughput: CrossEncoderTeacher (cold cache, then warm) vs plain CrossEncoder.predict
on the same wordnet-gloss (query, document) pairs, in one process.

The cross-encoder is the packaged all-MiniLM-L6-v2 backbone with a fresh 1-logit head (its scores are
meaningless; only speed is measured). Each query is paired with its relevant document(s) and seeded random
corpus documents, `--per-query` candidates in all.

    python bench/teacher_throughput.py --pairs 2000
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from harness import timed  # noqa: E402

from prod_st.data import document_text, load_retrieval_data  # noqa: E402
from prod_st.teachers import CrossEncoderTeacher, load_cross_encoder  # noqa: E402


def build_rows(num_pairs: int, per_query: int, seed: int) -> tuple[list[str], list[list[str]]]:
    """Queries of wordnet-gloss train with [relevant docs..., random docs...], `num_pairs` pairs in all."""
    data = load_retrieval_data("wordnet-gloss", "train")
    rng = random.Random(seed)
    row_of = {doc_id: i for i, doc_id in enumerate(data.corpus["_id"])}
    queries = data.split_queries()
    qids = rng.sample(list(queries), k=min(len(queries), -(-num_pairs // per_query)))
    texts, lists, total = [], [], 0
    for qid in qids:
        rows = [row_of[d] for d in data.qrels[qid]][:per_query]
        rows += rng.sample(range(len(data.corpus)), k=per_query - len(rows))
        rows = rows[: num_pairs - total]
        docs = data.corpus.select(rows)
        texts.append(queries[qid])
        lists.append([document_text(t, x) for t, x in zip(docs["title"], docs["text"])])
        total += len(rows)
        if total >= num_pairs:
            break
    return texts, lists


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000, help="number of (query, document) pairs")
    parser.add_argument("--per-query", type=int, default=8, help="candidates per query")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=2048, help="pairs per cache shard")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-root", default=None, help="teacher cache (default: a fresh temp folder)")
    args = parser.parse_args()

    queries, lists = build_rows(args.pairs, args.per_query, args.seed)
    pairs = [(q, d) for q, docs in zip(queries, lists) for d in docs]
    n = len(pairs)
    print(f"{n} pairs from {len(queries)} wordnet-gloss train queries; torch threads {torch.get_num_threads()}")

    torch.manual_seed(args.seed)
    model = load_cross_encoder("all-MiniLM-L6-v2", num_labels=1, max_length=args.max_length)
    model.predict(pairs[:16], batch_size=args.batch_size)  # warm-up (lazy init, allocator)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.cache_root or tmp
        plain, t_plain = timed(
            lambda: model.predict(pairs, batch_size=args.batch_size, activation_fn=torch.nn.Identity())
        )

        def teacher() -> CrossEncoderTeacher:
            return CrossEncoderTeacher(model, batch_size=args.batch_size, chunk_size=args.chunk_size, cache_root=root)

        cold_teacher, t_open = timed(teacher)  # fingerprint + opening the cache
        cold, t_cold = timed(lambda: cold_teacher.score(queries, lists, progress=False))
        warm, t_warm = timed(lambda: teacher().score(queries, lists, progress=False))  # reopened from disk
        _, t_mem = timed(lambda: cold_teacher.score(queries, lists, progress=False))  # same object, in memory

    flat = lambda scores: np.array([s for row in scores for s in row], dtype=np.float32)  # noqa: E731
    diff = float(np.abs(flat(cold) - plain).max()) if n else 0.0
    assert np.array_equal(flat(cold), flat(warm)), "warm scores differ from cold ones"
    rate = lambda t: n / t if t > 0 else float("inf")  # noqa: E731
    print(f"{'':34}{'seconds':>9}{'pairs/s':>12}{'vs plain':>10}")
    for label, t in (
        ("plain CrossEncoder.predict", t_plain),
        ("teacher, cold cache (+open)", t_cold + t_open),
        ("teacher, warm cache (reopened)", t_warm),
        ("teacher, warm cache (in memory)", t_mem),
    ):
        print(f"{label:34}{t:9.2f}{rate(t):12.0f}{t_plain / t if t > 0 else float('inf'):9.1f}x")
    print(f"fingerprint + cache open: {t_open:.2f} s; max |teacher - plain| = {diff:.2e}")


if __name__ == "__main__":
    main()
