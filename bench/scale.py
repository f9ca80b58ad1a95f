"""How prod-st's cost grows with the data (issue 9, item 6): the whole schedule (warm-up, bi-encoder stage,
cross-encoder stage, one DPD round, test) on tiny random models over growing slices of wordnet-gloss, the
corpus and the training queries grown separately (3 sizes each, an 8x range), each size in its own process.
Records peak RSS (and, per runner step, peak own memory and mapped file pages) and seconds per step, fits
memory and time per document and per query (least squares) and extrapolates to MS MARCO passage (8.8M
passages, 500k training queries) and NQ (21M passages) at the recipes' model sizes.

    nice -n 10 python bench/scale.py --small            # ~3 min on 2 idle cores: 500-4k docs, 40-320 queries
    python bench/scale.py                                # full: 10k-80k docs, 1k-8k queries
    python bench/scale.py --small --code /work/main      # the same runs on another checkout (before/after)
    python bench/scale.py --sizes 'corpus=2000,16000 queries=100'   # chosen sizes, no fit
    python bench/scale.py --sizes 'corpus=320000 queries=1000'      # past wordnet-gloss: + distractor documents
    SCALE_TRACE_MB=20 python bench/scale.py --sizes 'corpus=10000 queries=8000'  # + RssAnon trace in <out>/*.log
    python bench/scale.py --procs 2 --sizes 'corpus=4000 queries=320'   # under torchrun: peak RssAnon per rank

With `--procs N` every run is N processes under torchrun (gloo on CPU, OMP_NUM_THREADS=1, each per-device batch
divided by N so the global batch is the one-process run's): each rank samples its own memory, and the report
gives every rank's peak RssAnon (issue 18 item 8: what a rank other than 0 holds).

Models: student, bi-encoder and cross-encoder teachers of 2 layers, 128 wide, random weights, built here from
a BertConfig with all-MiniLM-L6-v2's (packaged) tokenizer: nothing is downloaded. Every run has its own
PROD_ST_CACHE (cold caches). Output: <out>/results.json and a markdown report on stdout.

The time projection is arithmetic, not a measurement: measured CPU seconds of the tiny models, times the
ratio of work per text (layers x width^2 x tokens) of the recipe's models, divided by the ratio of an assumed
GPU throughput (--gpu-tflops, effective) to this CPU's measured one. Memory: the measured per-document and
per-query slopes (at 128 dims), and the same slopes times 768/128 as an upper bound (as if every byte per item
were an embedding).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RssSampler, Timer, maxrss_mb, timed, write_json  # noqa: E402

TINY = {"layers": 2, "hidden": 128}
STEP_GROUPS = {  # metrics.json / final.json seconds keys -> what they are
    "encode+search": ("eval", "mine", "test"),
    "teacher": ("teacher", "score", "score_rows"),
    "train": ("train",),
}
TARGETS = {  # docs, training queries, dims, (student layers, width), (teacher layers, width), doc tokens
    "msmarco-passage": dict(docs=8_841_823, queries=502_939, dim=768, student=(6, 768), teacher=(12, 768), tokens=80),
    "nq": dict(docs=21_015_324, queries=58_880, dim=768, student=(6, 768), teacher=(12, 768), tokens=140),
}
WORDNET_TOKENS = 18  # wordnet-gloss documents, CALIBRATION.md
WORDNET_DOCS = 117_659  # past this, a corpus size adds distractor documents (`enlarged_dataset`)


# ---- the child: one run, its peak RSS and step seconds ----------------------------------------------------
def child(recipe: str, run_dir: str, result: str) -> None:
    import logging
    from contextlib import contextmanager

    import prod_st.runner as runner
    from prod_st.recipe import load_recipe
    from prod_st.util import cost

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cpu: dict[str, float] = {}  # CPU seconds per step (all threads): the work, whatever the machine's load
    wall_step = cost.step

    @contextmanager
    def step(what, seconds, key):
        start = time.process_time()
        outer, memory.step = memory.step, key
        try:
            with wall_step(what, seconds, key):
                yield
        finally:
            memory.step = outer
        cpu[key] = cpu.get(key, 0.0) + time.process_time() - start

    cost.step = step
    # peak RssAnon (own memory) and RssFile (pages of mapped files: caches, Arrow data, model weights, which the
    # kernel can drop and reread; ru_maxrss counts both), every 0.1 s, and per runner step (`memory.step`)
    memory = RssSampler(("RssAnon", "RssFile"), 0.1, trace_mb=float(os.environ.get("SCALE_TRACE_MB", 0)) or None)
    final, wall = timed(lambda: runner.Runner(load_recipe(recipe), Path(run_dir), force=True).run())
    memory.stop()
    seconds: dict[str, float] = {}
    spec = load_recipe(recipe)
    batch = {s.name: s.batch_size for s in spec.stages} | {f"dpd-{i}": spec.dpd.batch_size for i in range(1, 9)}
    rows_read, world = 0, int(os.environ.get("WORLD_SIZE", 1))  # rows read: steps x global batch of every stage
    for folder in sorted(Path(run_dir).iterdir()):
        metrics = folder / "metrics.json"
        if folder.name[:2].isdigit() and metrics.exists():
            record = json.loads(metrics.read_text())
            for key, value in record["seconds"].items():
                seconds[key] = seconds.get(key, 0.0) + value
            rows_read += record["train"].get("steps", 0) * batch.get(record["name"], 0) * world
    for key, value in final["seconds"].items():
        if key != "run":
            seconds[key] = seconds.get(key, 0.0) + value
    rank = int(os.environ.get("RANK", 0))
    write_json(result if not rank else f"{result}.rank{rank}", {
        "peak_rss_mb": maxrss_mb(),
        "wall_s": round(wall, 1), "seconds": seconds, "num_docs": final["num_docs"],
        "cpu_seconds": {k: round(v, 1) for k, v in cpu.items()},
        "cpu_s": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 1), "rows_read": rows_read,
        "peak_anon_mb": memory.peak["RssAnon"] / 1024, "peak_file_mb": memory.peak["RssFile"] / 1024,
        "step_anon_mb": {k: round(v["RssAnon"] / 1024) for k, v in memory.steps.items()},
        "step_file_mb": {k: round(v["RssFile"] / 1024) for k, v in memory.steps.items()},
    })


# ---- the parent ---------------------------------------------------------------------------------------------
def build_models(folder: Path) -> dict[str, str]:
    """Student, bi-encoder and cross-encoder of TINY size with random weights (fixed seeds)."""
    import torch
    from sentence_transformers import CrossEncoder, SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    from prod_st.util.models import resolve_model_path

    paths = {name: folder / name for name in ("student", "bi", "ce")}
    if all((p / "DONE").exists() for p in paths.values()):
        return {k: str(v) for k, v in paths.items()}
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    size = dict(vocab_size=tokenizer.vocab_size, hidden_size=TINY["hidden"], num_hidden_layers=TINY["layers"],
                num_attention_heads=2, intermediate_size=4 * TINY["hidden"], max_position_embeddings=512)
    config = BertConfig(**size)
    for seed, name in ((1, "student"), (2, "bi")):
        torch.manual_seed(seed)
        raw = folder / f"{name}-raw"
        BertModel(config).save_pretrained(raw)
        tokenizer.save_pretrained(raw)
        transformer = Transformer(str(raw), max_seq_length=64)
        SentenceTransformer(modules=[transformer, Pooling(TINY["hidden"], "mean")]).save(str(paths[name]))
    torch.manual_seed(3)
    raw = folder / "ce-raw"
    BertForSequenceClassification(BertConfig(**size, num_labels=1)).save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    CrossEncoder(str(raw), num_labels=1).save(str(paths["ce"]))
    for p in paths.values():
        (p / "DONE").write_text("")
    return {k: str(v) for k, v in paths.items()}


def enlarged_dataset(out: Path, docs: int) -> str:
    """A BEIR folder of `docs` documents for corpus sizes past wordnet-gloss's 117,659: its queries and qrels as
    they are, its corpus plus distractor documents (id `z...`) whose title and text are words drawn at random from
    wordnet-gloss's own texts (same length distribution), so no query is judged against them."""
    import gzip
    import random

    from prod_st.data.sources import EMBEDDED

    source = EMBEDDED["wordnet-gloss"]
    folder = out / f"wordnet-plus-{docs}"
    if (folder / "DONE").exists():
        return str(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "qrels").mkdir(exist_ok=True)
    for name in ("queries.jsonl.gz", "qrels/train.tsv.gz", "qrels/dev.tsv.gz", "qrels/test.tsv.gz"):
        target = folder / name
        if not target.exists():
            target.symlink_to(source / name)
    with gzip.open(source / "corpus.jsonl.gz", "rt") as f:
        lines = f.read().splitlines()
    records = [json.loads(line) for line in lines]
    words = [w for r in records for w in r["text"].split()]
    lengths = [len(r["text"].split()) for r in records]
    rng = random.Random(0)
    with gzip.open(folder / "corpus.jsonl.gz", "wt", compresslevel=1) as f:
        f.write("\n".join(lines) + "\n")
        for i in range(docs - len(records)):
            text = " ".join(rng.choices(words, k=rng.choice(lengths)))
            f.write(json.dumps({"_id": f"z{i:08d}", "title": " ".join(rng.choices(words, k=2)), "text": text}) + "\n")
    (folder / "DONE").write_text("")
    return str(folder)


def recipe(models: dict[str, str], docs: int, queries: int, small: bool, dataset: str = "wordnet-gloss",
           procs: int = 1) -> dict:
    """The run's recipe; with `procs` processes every per-device batch size is divided by `procs` (the same
    global batch, so the same steps)."""
    neg = {"miner": "student", "start": 1, "end": 100, "count": 1, "strategy": "sample"}
    held_out = 10 if small else 200
    return _per_device(procs, {
        "name": "scale",
        "seed": 13,
        "data": {"dataset": dataset, "train_queries": queries, "dev_queries": held_out,
                 "test_queries": 2 * held_out, "corpus_size": docs},
        "student": {"init": models["student"], "num_layers": TINY["layers"], "max_query_length": 32,
                    "max_doc_length": 64},
        "teachers": {"bi": {"kind": "bi-encoder", "model": models["bi"], "batch_size": 64},
                     "ce": {"kind": "cross-encoder", "model": models["ce"], "max_length": 96, "batch_size": 64}},
        "stages": [  # one epoch each: training grows with the training queries
            {"name": "warmup", "kind": "warmup", "candidates": "in_batch", "negatives": neg, "batch_size": 32},
            {"name": "bi", "teacher": "bi", "candidates": "in_batch", "negatives": neg, "batch_size": 32},
            {"name": "ce", "teacher": "ce", "candidates": "list", "negatives": neg | {"count": 4},
             "loss": {"reg_weight": 1.0}, "batch_size": 16},
        ],
        "dpd": {"teacher": "ce", "rerank_depth": 15, "num_negatives": 7, "batch_size": 16},
        "eval": {"top_k": 100, "teacher_rerank_depth": 10, "batch_size": 64},
    })


def _per_device(procs: int, spec: dict) -> dict:
    """`spec` with the training batch sizes of its stages and DPD divided by `procs`."""
    for part in (*spec["stages"], spec["dpd"]):
        part["batch_size"] //= procs
    return spec


def run_size(out: Path, models: dict, docs: int, queries: int, small: bool, code: Path, procs: int = 1) -> dict:
    label = f"d{docs}-q{queries}" + (f"-p{procs}" if procs > 1 else "")
    result = out / f"{label}.json"
    if result.exists():
        return json.loads(result.read_text())
    path = out / f"{label}.yaml"
    dataset = enlarged_dataset(out, docs) if docs > WORDNET_DOCS else "wordnet-gloss"
    path.write_text(yaml.safe_dump(recipe(models, docs, queries, small, dataset, procs), sort_keys=False))
    env = os.environ | {"PYTHONPATH": f"{code}:{code / 'cli'}", "HF_HUB_OFFLINE": "1",
                        "TOKENIZERS_PARALLELISM": "false", "PROD_ST_CACHE": str(out / f"cache-{label}")}
    launcher = [sys.executable]
    if procs > 1:
        env["OMP_NUM_THREADS"] = "1"
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(_free_port())]
    with Timer() as process, open(out / f"{label}.log", "w") as log:
        subprocess.run(launcher + [__file__, "--child", str(path), str(out / f"run-{label}"), str(result)],
                       env=env, cwd=code, stdout=log, stderr=subprocess.STDOUT, check=True)
    data = json.loads(result.read_text()) | {"docs": docs, "queries": queries, "procs": procs,
                                              "process_s": round(process.seconds, 1)}
    ranks = [data] + [json.loads(Path(f"{result}.rank{r}").read_text()) for r in range(1, procs)]
    data["rank_anon_mb"] = [round(r["peak_anon_mb"]) for r in ranks]
    data["rank_step_anon_mb"] = [r["step_anon_mb"] for r in ranks]
    write_json(result, data)
    print(f"  {label}: {data['num_docs']} docs, peak RSS {data['peak_rss_mb']:.0f} MB (anon {data.get('peak_anon_mb', 0):.0f}, "
          f"file {data.get('peak_file_mb', 0):.0f}), run {data['wall_s']}s "
          f"({data['cpu_s']} CPU s)" + (f"; peak RssAnon per rank {data['rank_anon_mb']} MB" if procs > 1 else ""),
          file=sys.stderr)
    return data


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def grouped(seconds: dict) -> dict[str, float]:
    return {group: sum(seconds.get(k, 0.0) for k in keys) for group, keys in STEP_GROUPS.items()}


def fit(xs, ys) -> tuple[float, float, float]:
    """Least-squares line y = a + b x: (a, b, R^2)."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    b, a = np.polyfit(xs, ys, 1)
    residual = ys - (a + b * xs)
    total = ((ys - ys.mean()) ** 2).sum()
    return float(a), float(b), float(1 - (residual ** 2).sum() / total) if total else 1.0


def cpu_tflops() -> float:
    """This CPU's effective fp32 throughput on the tiny student's forward pass (2 x weights x tokens)."""
    import torch
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(hidden_size=TINY["hidden"], num_hidden_layers=TINY["layers"], num_attention_heads=2,
                                 intermediate_size=4 * TINY["hidden"])).eval()
    weights = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    ids = torch.randint(1000, 2000, (64, 32))
    with torch.no_grad():
        model(ids)
        start = time.process_time()  # CPU seconds, like the steps' (a loaded machine gives fewer per second)
        for _ in range(5):
            model(ids)
    return 2 * weights * ids.numel() * 5 / (time.process_time() - start) / 1e12


def recipe_rows_read(name: str) -> int:
    """Training rows a recipe reads: max_steps x batch_size x 8 (PROD's 8 GPUs) over its stages and DPD rounds."""
    spec = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())
    stages = spec["stages"] + [spec["dpd"]] * spec["dpd"].get("rounds", 1)
    return sum(s["max_steps"] * s["batch_size"] * 8 for s in stages)


def work_ratio(layers_width: tuple[int, int], tokens: int) -> float:
    layers, width = layers_width
    return layers * width ** 2 * tokens / (TINY["layers"] * TINY["hidden"] ** 2 * WORDNET_TOKENS)


def memory_table(runs: list[dict]) -> list[str]:
    """Peak RssAnon (own memory) and RssFile (mapped files) per run and, per runner step, peak RssAnon."""
    runs = [r for r in runs if r.get("step_anon_mb")]
    if not runs:
        return []
    steps = sorted({k for r in runs for k in r["step_anon_mb"]}, key=lambda k: max(r["step_anon_mb"].get(k, 0) for r in runs),
                   reverse=True)
    lines = ["", "Peak own memory (RssAnon) and mapped file pages (RssFile), MB; then peak RssAnon during each step:", "",
             "| docs | train queries | processes | RssAnon (per rank) | RssFile | " + " | ".join(steps) + " |",
             "|---|---|---|---|---|" + "---|" * len(steps)]
    for r in sorted(runs, key=lambda r: (r["queries"], r["docs"], r.get("procs", 1))):
        ranks = r.get("rank_step_anon_mb") or [r["step_anon_mb"]]
        anon = " / ".join(str(m) for m in r.get("rank_anon_mb") or [round(r["peak_anon_mb"])])
        lines.append(f"| {r['num_docs']:,} | {r['queries']:,} | {r.get('procs', 1)} | {anon} | {r['peak_file_mb']:.0f} | "
                     + " | ".join(" / ".join(str(m.get(k, "-")) for m in ranks) for k in steps) + " |")
    return lines


def report(runs: list[dict], base: tuple[int, int], gpu_tflops: float, cpu: float) -> str:
    by_docs = sorted((r for r in runs if r["queries"] == base[1]), key=lambda r: r["docs"])
    by_queries = sorted((r for r in runs if r["docs"] == base[0]), key=lambda r: r["queries"])
    lines = ["Per step: CPU seconds (all threads; the machine's load does not change them) / wall seconds.", "",
             "| docs | train queries | peak RSS MB | run CPU s / wall s | " + " | ".join(f"{g}" for g in STEP_GROUPS) + " |",
             "|---|---|---|---|" + "---|" * len(STEP_GROUPS)]
    for r in sorted(runs, key=lambda r: (r["queries"], r["docs"])):
        c, w = grouped(r["cpu_seconds"]), grouped(r["seconds"])
        lines.append(f"| {r['num_docs']:,} | {r['queries']:,} | {r['peak_rss_mb']:.0f} | {r['cpu_s']:.0f} / {r['wall_s']:.0f} | "
                     + " | ".join(f"{c[k]:.1f} / {w[k]:.1f}" for k in STEP_GROUPS) + " |")
    lines += memory_table(runs)
    if len(by_docs) < 2 or len(by_queries) < 2:
        return "\n".join(lines)
    fits = {}
    for axis, series, x in (("doc", by_docs, "num_docs"), ("query", by_queries, "queries")):
        xs = [r[x] for r in series]
        fits[axis] = {"rss": fit(xs, [r["peak_rss_mb"] * 2**20 for r in series])}
        for group in STEP_GROUPS:
            fits[axis][group] = fit(xs, [grouped(r["cpu_seconds"])[group] for r in series])
    lines += ["", "Fitted slopes (least squares over the 3 sizes of each series; R^2 in brackets):", "",
              "| per | peak RSS | " + " | ".join(f"{g} CPU s" for g in STEP_GROUPS) + " |",
              "|---|---|" + "---|" * len(STEP_GROUPS)]
    for axis in fits:
        f = fits[axis]
        lines.append(f"| {axis} | {f['rss'][1] / 1024:.2f} KB ({f['rss'][2]:.2f}) | "
                     + " | ".join(f"{f[g][1] * 1e3:.3f} ms ({f[g][2]:.2f})" for g in STEP_GROUPS) + " |")
    base_run = by_docs[0]
    per_row = float(np.mean([grouped(r["cpu_seconds"])["train"] / r["rows_read"] for r in runs if r.get("rows_read")]))
    lines += ["", f"Projection (arithmetic, see the module docstring): this CPU {cpu * 1e3:.1f} GFLOP/s effective on "
              f"the tiny model, GPU assumed {gpu_tflops:.0f} TFLOP/s effective. Memory: base {base_run['peak_rss_mb']:.0f} MB "
              "+ slopes x items (as measured at 128 dims / x6 for 768 dims).", "",
              "| target | host memory (as measured) | host memory (x dims) | " +
              " | ".join(f"{g} GPU h" for g in STEP_GROUPS) + " | total GPU h | on 8 GPUs, h |",
              "|---|---|---|" + "---|" * (len(STEP_GROUPS) + 2)]
    for name, t in TARGETS.items():
        extra_docs, extra_q = t["docs"] - base_run["num_docs"], t["queries"] - base[1]
        grow = fits["doc"]["rss"][1] * extra_docs + fits["query"]["rss"][1] * extra_q
        scale_dim = t["dim"] / TINY["hidden"]
        memory = (base_run["peak_rss_mb"] * 2**20 + grow) / 2**30
        memory_dim = (base_run["peak_rss_mb"] * 2**20 + grow * scale_dim) / 2**30
        hours = {}
        for group in STEP_GROUPS:
            model = t["teacher"] if group == "teacher" else t["student"]
            if group == "train":  # the recipe's steps x global batch (8 GPUs), at the measured CPU s per row read
                cpu_s = per_row * recipe_rows_read(name)
            else:
                cpu_s = fits["doc"][group][1] * t["docs"] + fits["query"][group][1] * t["queries"]
            hours[group] = max(cpu_s, 0) * work_ratio(model, t["tokens"]) * cpu / gpu_tflops / 3600
        total = sum(hours.values())
        lines.append(f"| {name} | {memory:.1f} GB | {memory_dim:.1f} GB | " + " | ".join(f"{hours[g]:.1f}" for g in STEP_GROUPS)
                     + f" | {total:.1f} | {total / 8:.1f} |")
    lines += ["", f"Training: {per_row * 1e3:.2f} CPU ms per row read here (1 epoch per stage), times the target "
              "recipe's rows read (max_steps x per-device batch x 8 GPUs, every stage and DPD); rows of the real "
              "recipes hold more texts (ce stages: 17 vs 6 here), so that column is a lower bound."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="500-4k docs, 40-320 queries (~3 min idle)")
    parser.add_argument("--out", type=Path, default=None, help="working folder (default /tmp/prod-st-scale[-small])")
    parser.add_argument("--code", type=Path, default=ROOT, help="the prod-st checkout the runs import")
    parser.add_argument("--gpu-tflops", type=float, default=100.0, help="assumed effective GPU TFLOP/s")
    parser.add_argument("--sizes", default=None, help="'corpus=A,B,C queries=X,Y,Z' (first of each is the base)")
    parser.add_argument("--procs", type=int, default=1, help="processes per run, under torchrun (gloo on CPU)")
    parser.add_argument("--child", nargs=3, metavar=("RECIPE", "RUN_DIR", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    if args.sizes:
        spec = dict(part.split("=") for part in args.sizes.split())
        corpus = [int(x) for x in spec.get("corpus", "1000").split(",")]
        queries = [int(x) for x in spec.get("queries", "40").split(",")]
    elif args.small:
        corpus, queries = [500, 1414, 4000], [40, 113, 320]
    else:
        corpus, queries = [10000, 28284, 80000], [1000, 2828, 8000]
    out = args.out or Path(f"/tmp/prod-st-scale{'-small' if args.small else ''}")
    out.mkdir(parents=True, exist_ok=True)
    sys.path[:0] = [str(ROOT), str(ROOT / "cli")]
    models = build_models(out / "models")
    with Timer() as started:
        sizes = [(d, queries[0]) for d in corpus] + [(corpus[0], q) for q in queries[1:]]
        runs = [run_size(out, models, d, q, args.small, args.code.resolve(), args.procs) for d, q in sizes]
        cpu = cpu_tflops()
        text = report(runs, (corpus[0], queries[0]), args.gpu_tflops, cpu)
        write_json(out / "results.json", {"runs": runs, "cpu_tflops": cpu, "code": str(args.code)}, indent=1)
        print(text)
    print(f"\n({len(runs)} runs in {started.seconds:.0f}s; code {args.code}; results in {out})")


if __name__ == "__main__":
    main()
