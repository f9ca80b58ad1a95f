"""Before/after for issue 9 item 1, on the runner's own code path: the memory a stage's in-batch labels and a
teacher's embedding cache take, measured in a fresh process per case (peak RSS, and anonymous RSS = heap after
the step; memory-mapped file pages are not heap).

    python bench/labels_memory.py --code /work/main --rows 20000 80000     # before (main)
    python bench/labels_memory.py --rows 20000 80000                       # after (this checkout)

The teacher is a bi-encoder whose cache already holds every text's embedding (random, --dim wide), so the
step is what the runner does with them: Runner.labels (since issue 11: `teachers.labels.stage_labels`), then the
dataset the trainer reads (main: `rows.to_dataset(labels)`; then `Runner.labelled_dataset`; since issue 11:
`stage_data.labelled_dataset`), then a reopen of the cache and a lookup of every row.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def anon_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_rows(rows_n: int):
    from prod_st.training.stage_data import TrainingRows

    queries = [f"query {i}" for i in range(rows_n)]
    positives, negatives = [f"positive {i}" for i in range(rows_n)], [[f"negative {i}"] for i in range(rows_n)]
    return TrainingRows.from_texts([str(i) for i in range(rows_n)], queries, positives, negatives)


def fill(rows_n: int, dim: int, model: str, work: Path) -> None:
    """Write every text's (random) embedding into the teacher's cache, as the teacher would, chunk by chunk."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from prod_st.teachers import BiEncoderTeacher
    from prod_st.util.fingerprint import text_key

    teacher = BiEncoderTeacher(SentenceTransformer(model), cache_root=work / "teachers", name="bi")
    rows, rng = make_rows(rows_n), np.random.default_rng(0)
    _, positives, negatives = rows.texts()
    for role, texts in (("query", rows.queries), ("document", positives + [n[0] for n in negatives])):
        for start in range(0, len(texts), 4096):  # the teacher's own chunk size
            chunk = texts[start : start + 4096]
            teacher.cache.put_many([text_key(role, t) for t in chunk], rng.random((len(chunk), dim), dtype=np.float32))


def measure(rows_n: int, model: str, work: Path) -> dict:
    from sentence_transformers import SentenceTransformer

    from prod_st.runner import Runner
    from prod_st.teachers import BiEncoderTeacher

    rows, st = make_rows(rows_n), SentenceTransformer(model)
    out = {"before": {"peak": peak_mb(), "anon": anon_mb()}}
    start = time.perf_counter()
    teacher = BiEncoderTeacher(st, cache_root=work / "teachers", name="bi")  # opens the cache
    out["open"] = {"peak": peak_mb(), "anon": anon_mb(), "s": round(time.perf_counter() - start, 1)}

    class Pool:
        def get(self, name, student=None):
            return teacher

        def scale(self, name):
            return 20.0

        def cache_folders(self):
            return {teacher.cache_folder}

    runner = Runner.__new__(Runner)
    runner.teachers, runner.stage_start_cache = Pool(), None
    start = time.perf_counter()
    (work / "stage").mkdir()
    try:  # prod-st since the runner's steps moved into their modules
        from prod_st.teachers.labels import stage_labels
        from prod_st.training.stage_data import labelled_dataset
    except ImportError:  # earlier prod-st: the runner's own methods
        labels = runner.labels("bi", rows, "in_batch", None, None)
        if hasattr(runner, "labelled_dataset"):
            dataset = runner.labelled_dataset(work / "stage", rows, labels)
        else:
            dataset = rows.to_dataset(labels)
    else:
        labels, _ = stage_labels(teacher, 20.0, rows, "in_batch", None, 0.0, name="bi")
        dataset = labelled_dataset(work / "stage" / "train_data", rows, labels)
    out["labels"] = {"peak": peak_mb(), "anon": anon_mb(), "s": round(time.perf_counter() - start, 1), "n": len(dataset)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--code", type=Path, default=ROOT)
    parser.add_argument("--rows", type=int, nargs="+", default=[20000, 80000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, rows_n, model, work = args.child
        if what == "fill":
            fill(int(rows_n), args.dim, model, Path(work))
        else:
            print(json.dumps(measure(int(rows_n), model, Path(work))))
        return
    sys.path[:0] = [str(ROOT), str(ROOT / "cli")]
    from prod_st.util.models import resolve_model_path

    model = resolve_model_path("all-MiniLM-L6-v2")  # only its fingerprint and tokenizer are used: nothing encodes
    env = os.environ | {"PYTHONPATH": f"{args.code}:{args.code / 'cli'}", "HF_HUB_OFFLINE": "1"}
    print(f"code {args.code}, dim {args.dim}")
    print("| rows | peak RSS before MB | cache open: peak / heap MB, s | labels + dataset: peak / heap MB, s |")
    print("|---|---|---|---|")
    for n in args.rows:
        with tempfile.TemporaryDirectory() as work:
            results = []
            for what in ("fill", "measure"):
                done = subprocess.run([sys.executable, __file__, "--dim", str(args.dim), "--child", what, str(n), model, work],
                                      env=env | {"PROD_ST_CACHE": work}, cwd=args.code, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(done.stderr[-3000:])
                results.append(done.stdout)
            r = json.loads(results[-1].strip().splitlines()[-1])
        b, o, l = r["before"], r["open"], r["labels"]
        print(f"| {n:,} | {b['peak']:.0f} | {o['peak']:.0f} / {o['anon']:.0f}, {o['s']} | {l['peak']:.0f} / {l['anon']:.0f}, {l['s']} |")


if __name__ == "__main__":
    main()
