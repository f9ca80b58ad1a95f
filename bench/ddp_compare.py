"""One process vs two under torchrun (gloo, CPU): the long steps are split across ranks and give the same answer.

    python bench/ddp_compare.py [OUT_DIR] [--fast]

1. Sharded teacher scoring and evaluation, directly: a fixed set of (query, document) pairs scored by a
   cross-encoder teacher and the dev set evaluated, once by 1 process and once by 2 (each rank scores half
   the pairs, encodes and indexes half the corpus and searches every query in it); scores and metrics compared.
2. (unless --fast) A small recipe run end to end by 1 process and by 2, with the same pretrained teachers; the
   2-process recipe halves every per-device batch size, so both train on the same global batch. Compared:
   the dev metrics of the untrained student (exact: same model, sharded evaluation), the teacher scores of
   every pair both runs scored, and the final test metrics (within TOLERANCE: the two runs see their
   batches in a different order and reduce gradients in a different order).

Prints one JSON object and exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SCORE_ATOL = 1e-4  # cross-encoder logits: batches padded differently give float-rounding differences only
TOLERANCE = 0.05  # |difference| allowed in each final test metric between the 1- and 2-process runs
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from harness import Timer  # noqa: E402

RECIPE = """name: ddp-compare
seed: 3
data: {{dataset: wordnet-gloss, train_queries: 64, dev_queries: 32, test_queries: 64, corpus_size: 600}}
student: {{init: all-MiniLM-L6-v2, num_layers: 1, max_doc_length: 32}}
teachers:
  bi: {{kind: bi-encoder, model: all-MiniLM-L6-v2}}
  ce: {{kind: cross-encoder, model: {ce}, max_length: 48}}
stages:
  - {{name: warmup, kind: warmup, candidates: in_batch, negatives: {{count: 1, end: 20}}, max_steps: 6,
     batch_size: {b16}, lr: 5.0e-5}}
  - {{name: bi, teacher: bi, candidates: in_batch, negatives: {{count: 1, end: 20}}, max_steps: 6,
     batch_size: {b16}, loss: {{reg_weight: 0.0}}}}
  - {{name: ce, teacher: ce, candidates: list, negatives: {{count: 3, end: 20}}, max_steps: 6, batch_size: {b8},
     loss: {{reg_weight: 1.0}}}}
dpd: {{teacher: ce, rerank_depth: 15, num_negatives: 2, max_steps: 2, batch_size: {b8}}}
eval: {{top_k: 100, teacher_rerank_depth: 5}}
"""


def env(cache: Path) -> dict:
    return os.environ | {
        "PROD_ST_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'cli'}:{os.environ.get('PYTHONPATH', '')}",
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def share_data(out: Path, name: str) -> Path:
    """A fresh prod-st cache for one launch (teacher scores, corpus encodings) holding the Arrow copy of the
    data set an earlier launch made, so no launch builds it again."""
    cache = out / name
    earlier = next((c / "arrow" for c in sorted(out.glob("cache-*")) if (c / "arrow").is_dir()), None)
    if earlier is not None and not (cache / "arrow").exists():
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "arrow").symlink_to(earlier.resolve(), target_is_directory=True)
    return cache


def launch(procs: int, args: list[str], cache: Path, log: Path) -> float:
    """Run `python -m ...args` in 1 process or under torchrun with `procs`; returns wall seconds."""
    prefix = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                  "--nproc_per_node", str(procs), "--master_port", str(free_port())]
    with Timer() as wall, open(log, "w") as f:
        done = subprocess.run(prefix + args, env=env(cache), stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"{' '.join(prefix + args)} failed (rc {done.returncode}); see {log}")
    return wall.seconds


# ---- part 1, run inside each launched process ------------------------------------------------------------
def score_and_evaluate(out: str, ce: str) -> None:
    """Score fixed pairs with the teacher and evaluate dev, sharded over however many processes run this."""
    import logging
    import random

    import numpy as np

    from prod_st.retrieval.evaluation import evaluate_model
    from prod_st.teachers import CrossEncoderTeacher
    from prod_st.training.stage_data import load_run_data
    from prod_st.util.distributed import is_main, launched_group, world_size
    from prod_st.util.models import build_student

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    with launched_group(5):
        data = load_run_data("wordnet-gloss", sizes=(64, 32, 32), corpus_size=600, seed=3)
        queries = data.train.split_queries()
        ids = list(data.corpus["_id"])
        rng = random.Random(0)
        qids = sorted(data.train.qrels)
        candidates = [list(data.train.qrels[q]) + rng.sample(ids, 15) for q in qids]
        teacher = CrossEncoderTeacher(ce, max_length=48, batch_size=16)  # cache: this launch's own PROD_ST_CACHE
        scores = teacher.score([queries[q] for q in qids], [data.doc_texts(c) for c in candidates], progress=False)
        student = build_student("all-MiniLM-L6-v2", 1)
        student.max_seq_length = 32
        dev = evaluate_model(student, data.dev, top_k=100, keep_run=True, progress=False)
        if is_main():
            np.save(Path(out) / f"scores-{world_size()}.npy", np.array([x for row in scores for x in row], np.float32))
            (Path(out) / f"dev-{world_size()}.json").write_text(json.dumps({"metrics": dev.metrics, "run": dev.run}))


def rank_counts(log: Path) -> list[str]:
    return [line.strip() for line in log.read_text().splitlines() if " of 2 computed " in line or "encoding " in line]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", default="/tmp/prod-st-ddp-compare")
    parser.add_argument("--fast", action="store_true", help="part 1 only (no end-to-end runs)")
    parser.add_argument("--score-and-evaluate", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.score_and_evaluate:
        return score_and_evaluate(*args.score_and_evaluate)

    import numpy as np
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ce = out / "ce"
    if not (ce / "config.json").exists():  # one cross-encoder teacher for every run: MiniLM + a seeded head
        from prod_st.teachers import load_cross_encoder

        torch.manual_seed(0)
        load_cross_encoder("all-MiniLM-L6-v2", max_length=48, num_labels=1).save(str(ce))
    result: dict = {"procs": [1, 2]}
    checks: dict = {}

    # part 1: the same pairs and the same dev evaluation, 1 process vs 2
    this = [str(Path(__file__).resolve()), "--score-and-evaluate", str(out), str(ce)]
    seconds = {}
    for procs in (1, 2):
        if (out / f"scores-{procs}.npy").exists() and (out / f"dev-{procs}.json").exists():
            continue  # done by an earlier call with this OUT_DIR
        seconds[procs] = round(launch(procs, this, share_data(out, f"cache-direct-{procs}"), out / f"direct-{procs}.log"), 1)
    one, two = np.load(out / "scores-1.npy"), np.load(out / "scores-2.npy")
    dev1, dev2 = (json.loads((out / f"dev-{p}.json").read_text()) for p in (1, 2))
    result["direct"] = {
        "pairs": len(one), "max_abs_score_diff": float(np.abs(one - two).max()), "seconds": seconds,
        "rank_work": rank_counts(out / "direct-2.log"),
        "dev_metrics_1": dev1["metrics"], "dev_metrics_2": dev2["metrics"],
    }
    checks["scores_equal"] = bool(np.allclose(one, two, atol=SCORE_ATOL))
    checks["dev_runs_equal"] = dev1["run"].keys() == dev2["run"].keys() and all(
        list(dev1["run"][q]) == list(dev2["run"][q]) for q in dev1["run"])
    checks["dev_metrics_equal"] = dev1["metrics"] == approx_dict(dev2["metrics"])

    if not args.fast:  # part 2: a small recipe end to end
        runs = {}
        for procs, b16, b8 in ((1, 16, 8), (2, 8, 4)):
            recipe = out / f"recipe-{procs}.yaml"
            recipe.write_text(RECIPE.format(ce=ce, b16=b16, b8=b8))
            cli = ["-m", "prod_st_cli.main", "run", str(recipe), "--output", str(out / f"run-{procs}"), "--force"]
            done = (out / f"run-{procs}" / "final.json").exists()  # finished by an earlier call with this OUT_DIR
            seconds = 0.0 if done else launch(procs, cli, share_data(out, f"cache-run-{procs}"), out / f"run-{procs}.log")
            final = json.loads((out / f"run-{procs}" / "final.json").read_text())
            init = json.loads((out / f"run-{procs}" / "00-init" / "metrics.json").read_text())
            runs[procs] = {"seconds": round(seconds, 1), "test": final["test"]["student"],
                           "init_dev": init["student_dev"], "scores": read_scores(out / f"cache-run-{procs}")}
        common = runs[1]["scores"].keys() & runs[2]["scores"].keys()
        diff = max((abs(runs[1]["scores"][k] - runs[2]["scores"][k]) for k in common), default=0.0)
        deltas = {m: runs[2]["test"][m] - runs[1]["test"][m] for m in runs[1]["test"]}
        result["recipe"] = {
            "seconds": {p: runs[p]["seconds"] for p in runs},
            "teacher_pairs_scored": {p: len(runs[p]["scores"]) for p in runs}, "common_pairs": len(common),
            "max_abs_score_diff_common": diff, "rank_work": rank_counts(out / "run-2.log"),
            "test_1": runs[1]["test"], "test_2": runs[2]["test"], "test_delta": deltas, "tolerance": TOLERANCE,
        }
        checks["recipe_init_dev_equal"] = runs[1]["init_dev"] == approx_dict(runs[2]["init_dev"])
        checks["recipe_common_scores_equal"] = diff <= SCORE_ATOL and len(common) > 0
        checks["recipe_test_within_tolerance"] = all(abs(d) <= TOLERANCE for d in deltas.values())
    result["checks"] = checks
    print(json.dumps(result, indent=1))
    sys.exit(0 if all(checks.values()) else 1)


def approx_dict(expected: dict):
    """dict equality up to float rounding (the metrics are means of the same per-query values)."""

    class Approx:
        def __eq__(self, other):
            return other.keys() == expected.keys() and all(abs(other[k] - expected[k]) <= 1e-9 for k in expected)

    return Approx()


def read_scores(cache: Path) -> dict[str, float]:
    """Every pair score a run's cross-encoder teacher cached (key -> logit), read from its shards (Arrow, or
    the older parquet)."""
    from prod_st.teachers import ScoreCache
    from prod_st.teachers.cache import SHARD_PATTERNS, _read_shard

    scores = {}
    for pattern in SHARD_PATTERNS:
        for shard in sorted(cache.glob(f"teachers/*/scores/{pattern}")):
            table = _read_shard(shard)
            scores.update(zip(table.column("key").to_pylist(), table.column(ScoreCache.value_column).to_pylist()))
    return scores


if __name__ == "__main__":
    main()
