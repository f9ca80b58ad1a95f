"""prod-st's code paths vs the plain sentence-transformers way of doing the same thing, side by side in ONE
process (so the ratios survive the machine's load and speed): issue 9 item 8.

 1. teacher scoring: `CrossEncoderTeacher.score` (the runner's path: fingerprint, score cache, cold) vs plain
    `CrossEncoder.predict` on the same pairs, model, batch size and max length;
 2. one training step through SentenceTransformerTrainer (prod-st's `train_student`, as the runner calls it):
    PRODLoss (list candidates, teacher scores as labels) vs sentence-transformers' DistillKLDivLoss, same
    student, batches and batch size; median step time after a warm-up;
 3. mining: prod-st's `mine_pools` + `draw_negatives` (the runner's path, cold cache) vs
    `sentence_transformers.util.mine_hard_negatives`, same model, corpus, queries, rank range and count; and
    how much their negatives overlap (hardest-first, where the choice is deterministic);
 4. corpus encodings per run before/after issue 9 item 2 (the rows bench/count_encodings.py measured, read from
    bench/RESULTS.md 2.2; that script was removed: `git show 69c3332:bench/count_encodings.py`).
Plus U = seconds of plain CrossEncoder.predict on bench's 2,000 pairs (bench/harness.py's `reference_unit`).

The data are the quickstart's shape: wordnet-gloss training queries, a seeded corpus slice holding their
judged documents, the quickstart's student (all-MiniLM-L6-v2's first 3 layers) as miner and trainee, and a
cross-encoder on the packaged MiniLM with a fresh 1-logit head (speed only: its scores mean nothing). The
pairs scored are what the runner's ce stage scores: each query's positive + `--negatives` negatives sampled
from its mined ranks 1-100 (documents repeat across queries, lengths vary).

    nice -n 10 python bench/ratios.py                       # ~3-4 min on 2 idle cores
    nice -n 10 python bench/ratios.py --json bench/out/ratios.json
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from harness import Timer, reference_unit, write_json  # noqa: E402
from harness import timed as timed_on  # noqa: E402

CLOCK = {"now": time.process_time}  # --clock: CPU seconds of this process (default) or wall seconds


def timed(fn):
    """(fn(), seconds on CLOCK). CPU time (one torch thread) counts this process's own work only, so a
    ratio survives other processes taking the cores; wall time is what a user waits on an idle machine."""
    return timed_on(fn, CLOCK["now"])


TMP = Path(tempfile.mkdtemp(prefix="prod-st-ratios-"))
os.environ["PROD_ST_CACHE"] = str(TMP / "cache")  # cold: a fresh prod-st cache for this run, whatever was set


def fresh(name: str) -> Path:
    path = TMP / name
    path.mkdir(parents=True)
    return path


# ---- 3. mining ------------------------------------------------------------------------------------------
def mining(data, student, window, count: int, seed: int) -> dict:
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    from prod_st.retrieval.mining import NegativeWindow, draw_negatives, mine_pools

    def prod(strategy: str):
        w = NegativeWindow(window[0], window[1], count, strategy)
        pools, qrels = mine_pools(student, data.train, w, relevance=data.relevance, index_factory="Flat",
                                  batch_size=64, progress=False)
        return draw_negatives(pools, w, seed=seed), qrels

    (negatives, qrels), t_prod = timed(lambda: prod("sample"))
    (hardest, _), t_prod_again = timed(lambda: prod("hardest"))  # same model: the cached run, no encoding

    # sentence-transformers on the same queries (those with a positive), the same corpus texts
    queries = data.train.split_queries()
    qids = [q for q in negatives if any(g > 0 for g in qrels.get(q, {}).values())]
    best = {q: max(qrels[q].items(), key=lambda kv: kv[1])[0] for q in qids}
    pos_text = dict(zip(qids, data.doc_texts([best[q] for q in qids])))
    corpus = data.doc_texts(list(data.corpus["_id"]))
    pairs = Dataset.from_dict({"query": [queries[q] for q in qids], "positive": [pos_text[q] for q in qids]})

    def st(strategy: str):
        return mine_hard_negatives(
            pairs, student, corpus=corpus, range_min=window[0] - 1, range_max=window[1], num_negatives=count,
            sampling_strategy=strategy, batch_size=64, use_faiss=True, verbose=False, output_format="n-tuple",
        )

    st_random, t_st = timed(lambda: st("random"))
    st_top, t_st_top = timed(lambda: st("top"))

    def by_query(ds) -> dict[str, set[str]]:
        cols = [c for c in ds.column_names if c.startswith("negative")]
        return {q: {row[c] for c in cols} for q, row in zip(ds["query"], ds)}

    text_of = dict(zip(data.corpus["_id"], corpus))
    ours_top = {queries[q]: {text_of[d] for d in hardest[q]} for q in qids}
    ours_rand = {queries[q]: {text_of[d] for d in negatives[q]} for q in qids}
    theirs_top, theirs_rand = by_query(st_top), by_query(st_random)
    common = [q for q in ours_top if q in theirs_top]

    def overlap(a, b) -> float:
        return float(np.mean([len(a[q] & b[q]) / max(1, len(a[q])) for q in common])) if common else float("nan")

    # the candidate pools themselves: prod-st's ranks 1..end minus positives vs the same from its ranked run
    return {
        "queries": len(qids), "corpus": len(corpus), "window": list(window), "count": count,
        "prod_st_s": t_prod, "prod_st_again_s": t_prod_again, "st_s": t_st, "st_top_s": t_st_top,
        "ratio": t_st / t_prod, "ratio_again": t_st_top / t_prod_again,
        "rows_prod_st": len(qids), "rows_st_random": len(st_random), "rows_st_top": len(st_top),
        "overlap_hardest": overlap(ours_top, theirs_top), "overlap_sampled": overlap(ours_rand, theirs_rand),
        "compared_queries": len(common),
        "_negatives": negatives, "_qrels": qrels,
    }


# ---- 1. teacher scoring -------------------------------------------------------------------------------
def scoring(rows_by_epoch, batch_size: int, max_length: int, reps: int) -> dict:
    from prod_st.teachers import CrossEncoderTeacher, load_cross_encoder

    torch.manual_seed(0)
    model = load_cross_encoder("all-MiniLM-L6-v2", num_labels=1, max_length=max_length)
    queries, lists = rows_by_epoch[0].queries, rows_by_epoch[0].real_candidates()
    pairs = [(q, d) for q, docs in zip(queries, lists) for d in docs]
    model.predict(pairs[:16], batch_size=batch_size, show_progress_bar=False)  # warm-up, as teacher_throughput

    def plain(pairs_):
        return model.predict(pairs_, batch_size=batch_size, activation_fn=torch.nn.Identity(), show_progress_bar=False)

    def teacher_run(queries_, lists_, precision="fp32"):
        """(scores, seconds to build the teacher (fingerprint + cache open), seconds to score, seconds inside
        the model's predict) on a fresh cache folder."""
        t, t_open = timed(lambda: CrossEncoderTeacher(model, batch_size=batch_size, cache_root=fresh(f"t{time.time_ns()}"),
                                                      precision=precision))
        inner = t._predict
        spent = []

        def counted(p):
            out, s = timed(lambda: inner(p))
            spent.append(s)
            return out

        t._predict = counted
        scores, t_score = timed(lambda: t.score(queries_, lists_, progress=False))
        return scores, t_open, t_score, sum(spent)

    plain_s, cold = [], []
    for i in range(reps):  # alternated (A B B A ...) so a change of load hits both
        order = ("plain", "teacher") if i % 2 == 0 else ("teacher", "plain")
        for which in order:
            if which == "plain":
                reference, s = timed(lambda: plain(pairs))
                plain_s.append(s)
            else:
                cold.append(teacher_run(queries, lists))
    scores = cold[0][0]
    flat = np.array([x for row in scores for x in row], dtype=np.float32)
    t_plain = statistics.median(plain_s)
    t_open = statistics.median(c[1] for c in cold)
    t_score = statistics.median(c[2] for c in cold)
    t_inner = statistics.median(c[3] for c in cold)
    out = {
        "pairs": len(pairs), "unique_pairs": len(set(pairs)), "queries": len(queries),
        "unique_docs": len({d for _, d in pairs}), "batch_size": batch_size, "max_length": max_length,
        "plain_s": t_plain, "teacher_open_s": t_open, "teacher_score_s": t_score, "teacher_predict_s": t_inner,
        "ratio_score": t_plain / t_score, "ratio_with_open": t_plain / (t_score + t_open),
        "max_abs_diff": float(np.abs(flat - np.asarray(reference)).max()),
        "_scores": scores,
    }
    # the runner's resampled epochs: every epoch's rows go through one teacher (fresh negatives, same positive)
    if len(rows_by_epoch) > 1:
        all_q = [q for r in rows_by_epoch for q in r.queries]
        all_l = [c for r in rows_by_epoch for c in r.real_candidates()]
        all_pairs = [(q, d) for q, docs in zip(all_q, all_l) for d in docs]
        _, t_all_plain = timed(lambda: plain(all_pairs))
        _, o, s, _ = teacher_run(all_q, all_l)
        out["epochs"] = {"epochs": len(rows_by_epoch), "pairs": len(all_pairs), "unique_pairs": len(set(all_pairs)),
                         "plain_s": t_all_plain, "teacher_s": s + o, "ratio": t_all_plain / (s + o)}
    # bf16 autocast (recipe `training.precision: bf16`): same pairs, ranking agreement with fp32
    bf, o, s, _ = teacher_run(queries, lists, "bf16")
    agree = np.mean([int(np.argmax(a) == np.argmax(b)) for a, b in zip(scores, bf) if len(a) > 1])
    out["bf16"] = {"teacher_s": s + o, "ratio": t_plain / (s + o), "top1_agreement": float(agree),
                   "max_abs_diff": float(np.abs(flat - np.array([x for r in bf for x in r])).max())}
    return out


# ---- 2. one training step -------------------------------------------------------------------------------
class StepTimes:
    """A trainer callback: seconds between consecutive optimizer steps (data, forward, backward, optimizer)."""

    def __init__(self):
        from transformers import TrainerCallback

        times = self.times = []
        last = [None]

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if last[0] is None:
                    last[0] = CLOCK["now"]()

            def on_step_end(self, args, state, control, **kwargs):
                now = CLOCK["now"]()
                times.append(now - last[0])
                last[0] = now

        self.callback = Callback()


def training(student, rows, scores, batch_size: int, steps: int, warmup: int, rounds: int) -> dict:
    from sentence_transformers import SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.losses import DistillKLDivLoss

    import prod_st.training.student_training as st_training
    from prod_st.teachers.base import scores_to_labels
    from prod_st.teachers.bi_encoder import BiEncoderTeacher
    from prod_st.training.losses import PRODLoss
    from prod_st.training.losses.contrastive import score_scale

    width = 1 + rows.count
    teacher = scores_to_labels(scores, width)
    # reg > 0 in list mode, as the runner does it: the stage-start student's scores precomputed into the labels
    frozen = BiEncoderTeacher(student, cache_root=fresh("frozen"), name="stage-start student")
    previous = scores_to_labels([[score_scale(student) * x for x in row]
                                 for row in frozen.score(rows.queries, rows.real_candidates(), progress=False)], width)
    datasets_ = {}
    for name, labels in (("2d", teacher), ("3d", torch.stack([teacher, previous], dim=1))):
        datasets_[name] = rows.to_dataset(iter([labels.numpy()]), folder=fresh(f"data-{name}"))

    configs = {
        "DistillKLDivLoss": ("2d", lambda m: DistillKLDivLoss(m)),
        "PRODLoss reg 0": ("2d", lambda m: PRODLoss(m, candidate_mode="list", reg_weight=0.0)),
        "PRODLoss reg 1 (runner: frozen scores in labels)": ("3d", lambda m: PRODLoss(m, candidate_mode="list",
                                                                                       reg_weight=1.0)),
        "PRODLoss reg 1 (frozen copy online)": ("2d", lambda m: PRODLoss(m, candidate_mode="list", reg_weight=1.0,
                                                                         previous_model=copy.deepcopy(m))),
    }
    base = SentenceTransformerTrainer
    timings: dict[str, list[float]] = {k: [] for k in configs}
    walls: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(rounds):
        for name in (list(configs) if r % 2 == 0 else list(configs)[::-1]):
            data_key, make_loss = configs[name]
            model = copy.deepcopy(student)
            timer = StepTimes()

            class Timed(base):  # train_student's own trainer, with the step timer added
                def __init__(self, *a, callbacks=None, **kw):
                    super().__init__(*a, callbacks=[*(callbacks or []), timer.callback], **kw)

            st_training.SentenceTransformerTrainer = Timed
            try:
                _, wall = timed(lambda: st_training.train_student(
                    model, datasets_[data_key], make_loss(model), workdir=fresh(f"train-{r}-{list(configs).index(name)}"),
                    lr=5e-5, epochs=1.0, max_steps=warmup + steps, batch_size=batch_size, warmup_ratio=0.1,
                    seed=13, no_duplicates=False, checkpoints=1, progress=False))
            finally:
                st_training.SentenceTransformerTrainer = base
            timings[name] += timer.times[warmup:]
            walls[name].append(wall)
    med = {k: statistics.median(v) for k, v in timings.items()}
    ref = med["DistillKLDivLoss"]
    return {
        "batch_size": batch_size, "texts_per_row": 1 + width, "steps_timed": {k: len(v) for k, v in timings.items()},
        "median_step_s": med, "ratio": {k: ref / v for k, v in med.items()},
        "train_call_wall_s": {k: statistics.median(v) for k, v in walls.items()},
    }


# ---- 4. encodings per run (measured by the removed bench/count_encodings.py, `git show
# 69c3332:bench/count_encodings.py`; read from bench/RESULTS.md) ---------------------------------------
def encodings_rows() -> list[str]:
    text = (ROOT / "bench" / "RESULTS.md").read_text()
    section = text.split("Item 2: corpus encodings per run", 1)[-1]
    return [line for line in section.splitlines() if line.startswith(("| after", "| before"))][:2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-queries", type=int, default=400, help="wordnet-gloss training queries")
    parser.add_argument("--corpus-size", type=int, default=3000, help="random documents (+ the judged ones)")
    parser.add_argument("--negatives", type=int, default=4, help="negatives per query (quickstart ce stage: 4)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of resampled negatives for the epochs row")
    parser.add_argument("--ce-batch-size", type=int, default=64)
    parser.add_argument("--ce-max-length", type=int, default=96)
    parser.add_argument("--reps", type=int, default=2, help="repetitions of plain and cold teacher scoring")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch (queries)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per run")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="training runs per loss (order alternated)")
    parser.add_argument("--no-unit", action="store_true", help="skip U (bench/harness.py's reference_unit)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on shared cores, 2 threads' spin-waits distort small ops)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: this process's CPU seconds (robust to other load); wall: elapsed seconds")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()  # before faiss.omp_set_num_threads, which changes it too
    CLOCK["now"] = time.process_time if args.clock == "cpu" else time.perf_counter
    import faiss

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)

    from prod_st.retrieval.mining import draw_negatives
    from prod_st.training.stage_data import build_rows, load_run_data
    from prod_st.util.models import build_student

    started = Timer()  # the whole script, wall seconds
    print(f"clock {args.clock}; torch threads {torch.get_num_threads()}; cache {os.environ['PROD_ST_CACHE']} (fresh)", flush=True)
    data = load_run_data("wordnet-gloss", splits=("train", None, "test"), sizes=(args.train_queries, None, 1),
                         corpus_size=args.corpus_size, seed=13)
    student = build_student("all-MiniLM-L6-v2", 3)
    student.max_seq_length = 64
    seed, window = 13, (1, 100)

    print("3. mining ...", flush=True)
    mine = mining(data, student, window, args.negatives, seed)
    from prod_st.retrieval.mining import NegativeWindow, negative_pools

    w = NegativeWindow(window[0], window[1], args.negatives, "sample")
    rows = [build_rows(data, mine["_negatives"], args.negatives, qrels=mine["_qrels"])]
    if args.epochs > 1:  # the runner's later epochs: fresh draws from the same pools
        from prod_st.retrieval.mining import retrieve_ranked

        ranked = retrieve_ranked(student, data.train, data.train.split_queries(), top_k=window[1],  # cached
                                 index_factory="Flat", batch_size=64, progress=False)
        pools = negative_pools(ranked, mine["_qrels"], w)
        for epoch in range(1, args.epochs):
            rows.append(build_rows(data, draw_negatives(pools, w, seed=seed, epoch=epoch), args.negatives,
                                   qrels=mine["_qrels"]))

    print("1. teacher scoring ...", flush=True)
    score = scoring(rows, args.ce_batch_size, args.ce_max_length, args.reps)
    print("2. training steps ...", flush=True)
    train = training(student, rows[0], score["_scores"], args.batch_size, args.steps, args.warmup_steps, args.rounds)
    unit = None
    if not args.no_unit:
        print("U ...", flush=True)
        torch.set_num_threads(default_threads)  # U as measured elsewhere: torch's default threads
        unit = reference_unit()
    total = started.seconds

    s, m, t = score, mine, train
    print()
    print("| ratio (prod-st vs plain sentence-transformers, same process) | prod-st | plain | ratio (plain / prod-st; > 1: prod-st faster) | goal |")
    print("|---|---|---|---|---|")
    print(f"| 1. ce teacher scoring, cold cache: {s['pairs']:,} mined pairs ({s['queries']} queries, {s['unique_docs']:,} distinct docs), "
          f"batch {s['batch_size']}, max length {s['max_length']} | {s['teacher_score_s']:.2f} s (+{s['teacher_open_s']:.2f} s fingerprint + cache open) "
          f"| {s['plain_s']:.2f} s `CrossEncoder.predict` | {s['ratio_score']:.2f}x ({s['ratio_with_open']:.2f}x with open) | >= 1.3x |")
    if "epochs" in s:
        e = s["epochs"]
        print(f"| 1b. the same over {e['epochs']} epochs of resampled negatives (runner: one teacher, {e['pairs']:,} pairs, "
              f"{e['unique_pairs']:,} distinct) | {e['teacher_s']:.2f} s | {e['plain_s']:.2f} s | {e['ratio']:.2f}x | |")
    b = s["bf16"]
    print(f"| 1c. teacher with `precision: bf16` (autocast) vs fp32 predict; top-1 agreement with fp32 {b['top1_agreement']:.3f} "
          f"| {b['teacher_s']:.2f} s | {s['plain_s']:.2f} s | {b['ratio']:.2f}x | |")
    med, ref = t["median_step_s"], t["median_step_s"]["DistillKLDivLoss"]
    for name, v in med.items():
        if name == "DistillKLDivLoss":
            continue
        goal = ">= 0.95x" if name == "PRODLoss reg 0" else ""
        print(f"| 2. training step, {name}, vs DistillKLDivLoss ({t['batch_size']} rows x {t['texts_per_row']} texts, "
              f"median of {t['steps_timed'][name]} steps) | {v * 1000:.0f} ms | {ref * 1000:.0f} ms | {ref / v:.2f}x | {goal} |")
    print(f"| 3. mining, cold ({m['queries']} queries, {m['corpus']:,} docs, ranks {m['window'][0]}-{m['window'][1]}, "
          f"{m['count']} sampled) vs `mine_hard_negatives` (random) | {m['prod_st_s']:.2f} s | {m['st_s']:.2f} s | {m['ratio']:.2f}x | |")
    print(f"| 3b. mining again with the same model (hardest-first) vs `mine_hard_negatives` (top) | {m['prod_st_again_s']:.2f} s "
          f"| {m['st_top_s']:.2f} s | {m['ratio_again']:.2f}x | |")
    print(f"\nmining overlap with mine_hard_negatives over {m['compared_queries']} queries: hardest-first "
          f"{m['overlap_hardest']:.3f} of the {m['count']} negatives; sampled {m['overlap_sampled']:.3f} (random draws)")
    print(f"teacher scoring: {s['teacher_predict_s']:.2f} s of {s['teacher_score_s']:.2f} s inside CrossEncoder.predict; "
          f"{s['unique_pairs']:,} distinct of {s['pairs']:,} pairs; max |teacher - plain| = {s['max_abs_diff']:.1e}")
    print("4. corpus encodings per run (from bench/RESULTS.md 2.2; measured by bench/count_encodings.py, removed: "
          "git show 69c3332:bench/count_encodings.py):")
    for line in encodings_rows():
        print("   " + line)
    if unit is not None:
        print(f"U = {unit} s (plain CrossEncoder.predict on bench's 2,000 pairs, this process, {default_threads} threads)")
    print(f"whole script: {total:.0f} s")

    if args.json:
        result = {"scoring": {k: v for k, v in s.items() if not k.startswith("_")},
                  "training": t, "mining": {k: v for k, v in m.items() if not k.startswith("_")},
                  "encodings_rows": encodings_rows(), "U_s": unit, "total_s": total, "args": vars(args)}
        write_json(args.json, result, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    try:
        main()
    finally:
        import shutil

        shutil.rmtree(TMP, ignore_errors=True)  # the fresh cache, datasets and checkpoints this run made
